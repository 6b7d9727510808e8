//! The guardrail boundary as an attacker probes it with a raw client: a portal bound to one
//! statement and executed after the name was re-parsed, a session dialect switched off through
//! opaque code, MERGE's actions, opaque code judged as any write, per-session limits, and
//! command events that always carry the classification and a digest.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tollgate_testsupport::ClusterOptions;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
type Msg = (u8, Vec<u8>);

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    b.extend_from_slice(body);
    b
}

fn cstr(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &b)
}

fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(cstr(statement));
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    message(b'B', &b)
}

fn execute(portal: &str) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    message(b'E', &b)
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'C', &b)
}

fn sync() -> Vec<u8> {
    message(b'S', &[])
}

async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Msg> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let mut body = vec![0u8; (len as usize).saturating_sub(4)];
    s.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// Messages up to ReadyForQuery (included), or up to the end of the connection.
async fn until_ready<S: AsyncRead + Unpin>(s: &mut S) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(15), read_msg(s)).await {
            Err(_) => panic!("timed out; so far: {:?}", tags(&out)),
            Ok(Err(_)) => return out,
            Ok(Ok(m)) => {
                let ready = m.0 == b'Z';
                out.push(m);
                if ready {
                    return out;
                }
            }
        }
    }
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// Field `code` ('C' SQLSTATE, 'M' message, 'S' severity) of the first ErrorResponse.
fn error_field(msgs: &[Msg], code: u8) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    let mut rest = &body[..];
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let nul = tail.iter().position(|b| *b == 0)?;
        if t == code {
            return Some(String::from_utf8_lossy(&tail[..nul]).into_owned());
        }
        rest = &tail[nul + 1..];
    }
    None
}

/// A started session as alice (group sre) on resource "app".
async fn session(env: &Env) -> Tls {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.gw.pg_port))
        .await
        .unwrap();
    let mut req = 8i32.to_be_bytes().to_vec();
    req.extend_from_slice(&80877103i32.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], b'S');
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s =
        tokio_rustls::TlsConnector::from(Arc::new(client_tls(&env.pki.ca, Some(&env.alice))))
            .connect(name, tcp)
            .await
            .unwrap();
    let mut body = (3i32 << 16).to_be_bytes().to_vec();
    for (k, v) in [("user", "alice"), ("database", "app")] {
        body.extend(cstr(k));
        body.extend(cstr(v));
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend(body);
    s.write_all(&startup).await.unwrap();
    let msgs = until_ready(&mut s).await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{:?}", tags(&msgs));
    s
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, parts: &[Vec<u8>]) {
    s.write_all(&parts.concat()).await.unwrap();
    s.flush().await.unwrap();
}

/// Sends `parts`, reads the answer up to ReadyForQuery, and checks its first error's SQLSTATE
/// (`None`: no error).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    parts: &[Vec<u8>],
    code: Option<&str>,
) -> Vec<Msg> {
    send(s, parts).await;
    let msgs = until_ready(s).await;
    assert_eq!(
        error_field(&msgs, b'C').as_deref(),
        code,
        "{:?} {:?}",
        tags(&msgs),
        error_field(&msgs, b'M')
    );
    msgs
}

async fn start(resource_extra: &str) -> Env {
    let extra = resource_extra.to_string();
    tokio::task::spawn_blocking(move || {
        Env::start_with(EnvOptions {
            cluster: ClusterOptions {
                init_sql: vec![
                    "CREATE TABLE victim (id int PRIMARY KEY, note text)".into(),
                    "INSERT INTO victim SELECT g, 'row ' || g FROM generate_series(1, 5) g".into(),
                    // Owned by the gateway's upstream role, so that only the gateway stands
                    // between a client and a DROP.
                    "ALTER TABLE victim OWNER TO tollgate_app".into(),
                    "CREATE TABLE src (id int PRIMARY KEY)".into(),
                    "INSERT INTO src VALUES (1), (2)".into(),
                    "CREATE FUNCTION app_purge() RETURNS int LANGUAGE sql AS 'DELETE FROM victim RETURNING 1'".into(),
                ],
                ..Default::default()
            },
            resource_extra: extra,
            ..Default::default()
        })
    })
    .await
    .unwrap()
}

/// Rows in `victim`, read directly (not through the gateway).
fn victim_rows(env: &Env) -> i64 {
    env.pg
        .psql("SELECT count(*) FROM victim")
        .expect("count victim rows")
        .trim()
        .parse()
        .unwrap_or(-1)
}

fn victim_exists(env: &Env) -> bool {
    env.pg
        .psql("SELECT to_regclass('victim') IS NOT NULL")
        .expect("look up victim")
        .trim()
        == "t"
}

const DENY_DROP: &str = r#"[[resources.rules]]
name = "no-drop"
statements = ["drop", "truncate"]
action = "deny"
[[resources.rules]]
name = "no-delete"
statements = ["delete"]
action = "deny"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_runs_and_is_judged_as_the_statement_it_was_bound_to() {
    let env = start(DENY_DROP).await;
    let mut s = session(&env).await;
    // Parse "" as DROP, bind it, Parse "" again as SELECT, execute the portal.
    let msgs = exchange(
        &mut s,
        &[
            parse("", "DROP TABLE victim"),
            bind("", ""),
            parse("", "SELECT 1"),
            execute(""),
            sync(),
        ],
        Some("42501"),
    )
    .await;
    assert!(error_field(&msgs, b'M').unwrap().contains("no-drop"));
    assert!(victim_exists(&env), "the DROP ran");
    // The same with a named statement closed and parsed again between Bind and Execute.
    exchange(
        &mut s,
        &[
            parse("st", "DROP TABLE victim"),
            bind("p", "st"),
            close_statement("st"),
            parse("st", "SELECT 1"),
            execute("p"),
            sync(),
        ],
        Some("42501"),
    )
    .await;
    assert!(victim_exists(&env), "the DROP ran");
    // The session goes on, and an honest pipeline works.
    send(
        &mut s,
        &[
            parse("", "SELECT count(*) FROM victim"),
            bind("", ""),
            execute(""),
            sync(),
        ],
    )
    .await;
    let msgs = until_ready(&mut s).await;
    assert!(
        error_field(&msgs, b'C').is_none(),
        "{:?}",
        error_field(&msgs, b'M')
    );
    assert!(tags(&msgs).contains('D'));
    // The audit trail records what was judged: the DROP, not the SELECT.
    let evs = tokio::task::block_in_place(|| {
        env.events_until("the refused executes", |evs| {
            evs.iter()
                .filter(|e| e["kind"] == "command" && e["payload"]["decision"]["action"] == "deny")
                .count()
                >= 2
        })
    });
    let denied: Vec<&serde_json::Value> = evs
        .iter()
        .filter(|e| e["kind"] == "command" && e["payload"]["decision"]["action"] == "deny")
        .collect();
    for d in &denied {
        assert_eq!(d["payload"]["text"], "DROP TABLE victim", "{d}");
        assert_eq!(d["payload"]["decision"]["rule"], "no-drop");
        assert_eq!(d["payload"]["classified"], "ddl/drop on victim");
        assert!(
            d["payload"]["classification"]["statements"].is_array(),
            "{d}"
        );
    }
    // Every command event carries its classification and a digest.
    // A simple query's digest is recorded when its text alone does not give it (clipped,
    // refused or held); an Execute's always (it covers the parameters too).
    for e in evs.iter().filter(|e| {
        e["kind"] == "command"
            && (e["payload"]["protocol"] == "extended"
                || e["payload"]["decision"]["action"] != "allow")
    }) {
        assert!(
            e["payload"]["digest"]
                .as_str()
                .unwrap()
                .starts_with("sha256:"),
            "{e}"
        );
    }
    for e in evs.iter().filter(|e| e["kind"] == "command") {
        assert!(
            e["payload"]["classified"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_code_is_judged_as_any_write_and_merge_as_its_actions() {
    let env = start(DENY_DROP).await;
    let mut s = session(&env).await;
    for sql in [
        // A DO block and a procedure may drop or delete.
        "DO $$ BEGIN EXECUTE 'DROP TABLE victim'; END $$",
        // A SQL function that deletes, called from a SELECT.
        "SELECT app_purge()",
        // MERGE counts as every action it contains.
        "MERGE INTO victim v USING src ON v.id = src.id WHEN MATCHED THEN DELETE",
    ] {
        send(&mut s, &[query(sql)]).await;
        let msgs = until_ready(&mut s).await;
        assert_eq!(
            error_field(&msgs, b'C').as_deref(),
            Some("42501"),
            "{sql}: {:?} {:?}",
            tags(&msgs),
            error_field(&msgs, b'M')
        );
    }
    assert!(victim_exists(&env));
    assert_eq!(victim_rows(&env), 5);
    // Built-ins, learned from the upstream's catalog, are not opaque.
    exchange(
        &mut s,
        &[query(
            "SELECT count(*), now(), lower('X'), pg_catalog.upper('y') FROM victim",
        )],
        None,
    )
    .await;
    // A function that shadows a built-in by name makes calls of that name opaque, for
    // sessions that start after it exists.
    env.pg
        .psql("CREATE FUNCTION public.lower(v varchar) RETURNS text LANGUAGE sql AS 'SELECT app_purge()::text'")
        .unwrap();
    // The catalog is re-read after a DO (even a refused one starts no reload; a new
    // session past the catalog's lifetime would): force one by running an allowed DO-free DDL.
    send(
        &mut s,
        &[query(
            "CREATE FUNCTION tmp_noop() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        )],
    )
    .await;
    until_ready(&mut s).await;
    let mut s2 = session(&env).await;
    send(&mut s2, &[query("SELECT lower('x'::varchar)")]).await;
    let msgs = until_ready(&mut s2).await;
    assert_eq!(
        error_field(&msgs, b'C').as_deref(),
        Some("42501"),
        "{:?}",
        tags(&msgs)
    );
    assert_eq!(victim_rows(&env), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialect_switched_off_through_opaque_code_ends_the_session() {
    // opaque_code = "kind" lets the DO block run: the last line of defence is the watch on
    // what the server reports.
    let env = start(&format!("opaque_code = \"kind\"\n{DENY_DROP}")).await;
    let mut s = session(&env).await;
    // The DO block turns standard_conforming_strings off; the pipelined query would then be a
    // SELECT to the gateway's parser and a SELECT plus a DROP to the server.
    send(
        &mut s,
        &[
            query("DO $$ BEGIN PERFORM set_config('standard_conforming_strings', 'off', false); END $$"),
            query("SELECT 'x\\'' ; DROP TABLE victim; --'"),
        ],
    )
    .await;
    let msgs = until_ready(&mut s).await;
    let fatal = msgs
        .iter()
        .rev()
        .find(|(t, _)| *t == b'E')
        .map(|m| vec![m.clone()])
        .unwrap_or_default();
    assert_eq!(
        error_field(&fatal, b'S').as_deref(),
        Some("FATAL"),
        "{:?}",
        tags(&msgs)
    );
    assert!(
        error_field(&fatal, b'M')
            .unwrap()
            .contains("standard_conforming_strings"),
        "{:?}",
        error_field(&fatal, b'M')
    );
    assert!(victim_exists(&env), "the DROP ran");
    let evs = tokio::task::block_in_place(|| {
        env.events_until("the termination", |evs| {
            evs.iter().any(|e| e["kind"] == "session.terminated")
        })
    });
    let t = evs
        .iter()
        .find(|e| e["kind"] == "session.terminated")
        .unwrap();
    assert_eq!(t["payload"]["reason"], "dialect_changed");
    // A plain SET of it is refused outright.
    let mut s = session(&env).await;
    send(&mut s, &[query("SET standard_conforming_strings = off")]).await;
    let msgs = until_ready(&mut s).await;
    assert_eq!(error_field(&msgs, b'C').as_deref(), Some("42501"));
    // A statement parsed in the same pipeline after one that may change settings is refused.
    let msgs = exchange(
        &mut s,
        &[
            parse("", "DO $$ BEGIN NULL; END $$"),
            bind("", ""),
            execute(""),
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            sync(),
        ],
        Some("0A000"),
    )
    .await;
    assert!(error_field(&msgs, b'H').unwrap().contains("Sync"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_limits_end_the_session_clearly() {
    let env = start(&format!("max_prepared_statements = 3\n{DENY_DROP}")).await;
    let mut s = session(&env).await;
    let mut batch = Vec::new();
    for i in 0..4 {
        batch.push(parse(&format!("s{i}"), "SELECT 1"));
    }
    batch.push(sync());
    send(&mut s, &batch).await;
    let msgs = until_ready(&mut s).await;
    assert_eq!(
        error_field(&msgs, b'S').as_deref(),
        Some("FATAL"),
        "{:?}",
        tags(&msgs)
    );
    assert_eq!(error_field(&msgs, b'C').as_deref(), Some("54000"));
    assert!(error_field(&msgs, b'M')
        .unwrap()
        .contains("too many prepared statements"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_rules_record_what_they_would_have_done() {
    let env = start(
        "[[resources.rules]]\nname = \"would-deny\"\nstatements = [\"delete\"]\naction = \"deny\"\ndry_run = true\n",
    )
    .await;
    let mut s = session(&env).await;
    send(&mut s, &[query("DELETE FROM victim WHERE id = 1")]).await;
    let msgs = until_ready(&mut s).await;
    assert!(error_field(&msgs, b'C').is_none());
    assert_eq!(victim_rows(&env), 4);
    let evs = tokio::task::block_in_place(|| {
        env.events_until("the dry-run decision", |evs| {
            evs.iter()
                .any(|e| e["kind"] == "command" && !e["payload"]["decision"]["dry_run"].is_null())
        })
    });
    let e = evs
        .iter()
        .find(|e| e["kind"] == "command" && !e["payload"]["decision"]["dry_run"].is_null())
        .unwrap();
    assert_eq!(e["payload"]["decision"]["action"], "allow");
    assert_eq!(e["payload"]["decision"]["dry_run"]["action"], "deny");
    assert_eq!(e["payload"]["decision"]["dry_run"]["rule"], "would-deny");
    assert!(env.gw.metrics().contains("tollgate_policy_dry_run_total"));
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'D', &b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_again_in_sql_is_masked_by_its_new_shape() {
    let env = tokio::task::spawn_blocking(|| {
        Env::start_with(EnvOptions {
            cluster: ClusterOptions {
                init_sql: vec![
                    "CREATE TABLE vault (id int, secret_col text)".into(),
                    "INSERT INTO vault VALUES (1, 'hunter2-plain')".into(),
                ],
                ..Default::default()
            },
            resource_extra:
                "[[resources.masks]]\ncolumns = [\"secret_col\"]\nstrategy = \"redact\"\n".into(),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let mut s = session(&env).await;
    // The name is described once with a harmless shape...
    send(
        &mut s,
        &[
            parse("s", "SELECT 'x'::text AS harmless"),
            describe_statement("s"),
            sync(),
        ],
    )
    .await;
    let msgs = until_ready(&mut s).await;
    assert!(
        error_field(&msgs, b'C').is_none(),
        "{:?}",
        error_field(&msgs, b'M')
    );
    // ...then deallocated and prepared again in SQL as a query of the masked column.
    exchange(
        &mut s,
        &[query(
            "DEALLOCATE s; PREPARE s AS SELECT secret_col FROM vault",
        )],
        None,
    )
    .await;
    let msgs = exchange(&mut s, &[bind("p", "s"), execute("p"), sync()], None).await;
    let rows: Vec<&Msg> = msgs.iter().filter(|(t, _)| *t == b'D').collect();
    assert_eq!(rows.len(), 1, "{:?}", tags(&msgs));
    let row = String::from_utf8_lossy(&rows[0].1);
    assert!(
        !row.contains("hunter2"),
        "the old shape let the value through: {row:?}"
    );
}

fn vm_data_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmData:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmData in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_message_length_reserves_nothing_until_its_bytes_arrive() {
    let env = start(DENY_DROP).await;
    let pid = env.gw.pid();
    let before = vm_data_kib(pid);
    // Twenty sessions each announce a 60 MB Query (under max_message_bytes) and send 100 bytes.
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = session(&env).await;
        let mut m = vec![b'Q'];
        m.extend_from_slice(&(60 * 1024 * 1024i32).to_be_bytes());
        m.extend_from_slice(&[b' '; 100]);
        send(&mut s, &[m]).await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = vm_data_kib(pid).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 200,
        "20 announced 60 MB messages made the gateway reserve {grown_mib} MiB"
    );
    // Another session is unaffected.
    let mut s = session(&env).await;
    exchange(&mut s, &[query("SELECT 1")], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_after_a_settings_changing_command_does_not_stall() {
    let env = start(DENY_DROP).await;
    let mut s = session(&env).await;
    // RESET ALL may change what the parser depends on, so the gateway waits for the server's
    // answer before reading on; the COPY in the same query needs the client's data first.
    send(&mut s, &[query("RESET ALL; COPY src FROM STDIN")]).await;
    let mut msgs = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s))
            .await
            .expect("CopyInResponse")
            .unwrap();
        let tag = m.0;
        msgs.push(m);
        if tag == b'G' {
            break;
        }
        assert_ne!(tag, b'Z', "{:?}", tags(&msgs));
    }
    let mut data = message(b'd', b"7\n8\n");
    data.extend(message(b'c', &[]));
    exchange(&mut s, &[data], None).await;
    assert_eq!(
        env.pg.psql("SELECT count(*) FROM src").unwrap().trim(),
        "4",
        "the copied rows arrived"
    );
    exchange(&mut s, &[query("SELECT 1")], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_that_are_not_utf8_end_the_session() {
    // The gateway follows statements by name; two names differing only in invalid bytes would
    // read as one (on a SQL_ASCII database the server keeps them apart). Refused outright.
    let env = start(DENY_DROP).await;
    let mut s = session(&env).await;
    let mut body = b"\xff\0DROP TABLE victim\0".to_vec();
    body.extend_from_slice(&0i16.to_be_bytes());
    let msgs = exchange(&mut s, &[message(b'P', &body), sync()], Some("08P01")).await;
    assert_eq!(error_field(&msgs, b'S').as_deref(), Some("FATAL"));
    assert!(error_field(&msgs, b'M').unwrap().contains("UTF-8"));
    assert!(victim_exists(&env));
}
