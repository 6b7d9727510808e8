//! Failure paths of the PostgreSQL data path: upstream certificates that must not be trusted,
//! upstreams without TLS, credential injection across auth methods, timeouts, either end dying
//! mid-query, and what the audit trail records about all of it.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::types::{private::BytesMut, to_sql_checked, Format, IsNull, ToSql, Type};
use tollgate_testsupport::{AuthMethod, ClusterOptions};

// ---------------------------------------------------------------------------------------------
// helpers

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Connect with tokio-postgres as `who` to a gateway on `port`; the connection task runs on `rt`.
fn try_client(
    rt: &tokio::runtime::Runtime,
    port: u16,
    ca: &Path,
    who: &tollgate_tls::pki::IssuedFiles,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let cfg = client_tls(ca, Some(who));
    let conninfo = format!(
        "host=localhost port={port} dbname=app user=alice sslmode=require connect_timeout=20"
    );
    rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(
            &conninfo,
            tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
        )
        .await?;
        tokio::spawn(conn);
        Ok(client)
    })
}

/// The server-sent error of a failed connection attempt.
fn db_error(e: &tokio_postgres::Error) -> &tokio_postgres::error::DbError {
    e.as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse from the gateway, got: {e:?}"))
}

/// Everything a client is told in an ErrorResponse, for leak checks.
fn client_visible(e: &tokio_postgres::error::DbError) -> String {
    format!(
        "{} | {} | {} | {}",
        e.message(),
        e.detail().unwrap_or(""),
        e.hint().unwrap_or(""),
        e.where_().unwrap_or("")
    )
}

/// A second gateway (own directory, own audit store) for resource "app" with custom tables.
struct Extra {
    dir: tempfile::TempDir,
    gw: Gateway,
}

impl Extra {
    fn events(&self) -> Vec<serde_json::Value> {
        read_events(&self.dir.path().join("audit.db"))
    }

    fn events_until(
        &self,
        what: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let evs = self.events();
            if done(&evs) {
                return evs;
            }
            if Instant::now() > deadline {
                panic!("audit store never showed {what}; events: {evs:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn extra_gateway(
    pki: &Pki,
    upstream_port: u16,
    database: &str,
    user: &str,
    tls: &str,
    resource_extra: &str,
    password_line: &str,
    envs: &[(&str, &str)],
) -> Extra {
    let dir = tempfile::Builder::new()
        .prefix("tollgate-it-extra-")
        .tempdir()
        .unwrap();
    let n = tollgate_testsupport::free_port();
    let gw_cert = pki.server(&format!("gateway-{n}"));
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "optional"
store = "sqlite://audit.db"

[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:{upstream_port}"
database = "{database}"
allow_groups = ["sre", "ci"]
{resource_extra}
{tls}
[resources.credentials]
user = "{user}"
{password_line}
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
    );
    let gw = Gateway::start(dir.path(), &config, envs);
    Extra { dir, gw }
}

fn verify_full(ca: &Path, server_name: &str) -> String {
    format!(
        "[resources.tls]\nmode = \"verify-full\"\nca = \"{}\"\nserver_name = \"{server_name}\"\n",
        ca.display()
    )
}

fn closes(evs: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    evs.iter()
        .filter(|e| e["kind"] == "session.close")
        .map(|e| &e["payload"])
        .collect()
}

fn rejected_upstream(evs: &[serde_json::Value], failure: &str) -> bool {
    closes(evs).iter().any(|c| {
        c["outcome"] == "rejected" && c["reason"] == "upstream" && c["detail"]["failure"] == failure
    })
}

/// The session id of the first `command` event whose text contains `needle`.
fn session_of(evs: &[serde_json::Value], needle: &str) -> Option<String> {
    evs.iter()
        .find(|e| {
            e["kind"] == "command"
                && e["payload"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(needle))
        })
        .and_then(|e| e["session_id"].as_str().map(str::to_string))
}

fn close_of<'a>(evs: &'a [serde_json::Value], session: &str) -> Option<&'a serde_json::Value> {
    evs.iter()
        .find(|e| e["kind"] == "session.close" && e["session_id"] == session)
        .map(|e| &e["payload"])
}

/// Check that a refused connection told the client only the generic 08001 text.
fn assert_generic_08001(err: &tokio_postgres::Error, upstream_port: u16) {
    let db = db_error(err);
    assert_eq!(db.code().code(), "08001", "{db:?}");
    assert_eq!(
        db.message(),
        "tollgate could not connect to resource \"app\"",
        "{db:?}"
    );
    let seen = client_visible(db);
    assert!(
        !seen.contains("127.0.0.1"),
        "upstream address leaked: {seen}"
    );
    assert!(
        !seen.contains(&upstream_port.to_string()),
        "upstream port leaked: {seen}"
    );
}

/// psql's stderr from the gateway's FATAL onwards (libpq itself prints the gateway's address first).
fn server_part(stderr: &str) -> &str {
    stderr.find("FATAL").map(|i| &stderr[i..]).unwrap_or(stderr)
}

fn make_ca(dir: &Path, name: &str) -> PathBuf {
    tollgate_tls::pki::init_ca(dir, name).expect("init CA");
    dir.to_path_buf()
}

fn count_active(env: &Env, like: &str) -> i64 {
    env.pg
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{like}%' AND pid <> pg_backend_pid()"
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn count_running(env: &Env, like: &str) -> i64 {
    env.pg
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{like}%' AND state = 'active' AND pid <> pg_backend_pid()"
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. upstream certificates

#[test]
fn upstream_certificate_for_another_hostname_is_refused_without_leaking_the_address() {
    let tmp = tempfile::tempdir().unwrap();
    let up_ca = make_ca(&tmp.path().join("upca"), "upstream CA");
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            server_dns: vec!["db.other".into()],
            ca_dir: Some(up_ca.clone()),
            ..Default::default()
        },
        resource_tls: Some(verify_full(&up_ca.join("ca.crt"), "db.internal")),
        ..Default::default()
    });
    let port = env.pg.port;

    // psql: the client sees the generic refusal, not where the upstream is.
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let fatal = server_part(&err);
    assert!(
        fatal.contains("tollgate could not connect to resource \"app\""),
        "{err}"
    );
    assert!(!fatal.contains("127.0.0.1"), "{err}");
    assert!(!fatal.contains(&port.to_string()), "{err}");

    // tokio-postgres: the SQLSTATE is 08001.
    let rt = rt();
    let e = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).expect_err("must fail");
    assert_generic_08001(&e, port);

    // The operator has the detail.
    let logs = env.gw.logs();
    assert!(logs.contains("upstream connection failed"), "{logs}");
    assert!(logs.contains(&format!("127.0.0.1:{port}")), "{logs}");
    assert!(
        env.gw
            .metric("tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"tls\"}")
            .unwrap_or(0)
            >= 2,
        "{}",
        env.gw.metrics()
    );
    let evs = env.events_until("two upstream rejections", |evs| {
        closes(evs)
            .iter()
            .filter(|c| c["reason"] == "upstream" && c["detail"]["failure"] == "tls")
            .count()
            >= 2
    });
    // No session ever opened upstream.
    assert!(!evs.iter().any(|e| e["kind"] == "command"), "{evs:#?}");
    assert!(
        evs.iter()
            .filter(|e| e["kind"] == "session.open")
            .all(|e| e["payload"]["upstream_tls"].is_null()),
        "{evs:#?}"
    );

    // Positive control: the same upstream with the name its certificate does carry works,
    // so the refusal above was the hostname check and nothing else.
    let good = extra_gateway(
        &env.pki,
        port,
        &env.pg.database,
        &env.pg.user,
        &verify_full(&up_ca.join("ca.crt"), "db.other"),
        "",
        &format!(
            "password_file = \"{}\"",
            env.tmp.path().join("app.password").display()
        ),
        &[],
    );
    let c = try_client(&rt, good.gw.pg_port, &env.pki.ca, &env.alice)
        .expect("verify-full with the right name");
    let row = rt.block_on(c.query_one("SELECT 7::int", &[])).unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[test]
fn upstream_certificate_from_another_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let other = make_ca(&tmp.path().join("other"), "some other CA");
    let env = Env::start_with(EnvOptions {
        resource_tls: Some(verify_full(&other.join("ca.crt"), "localhost")),
        ..Default::default()
    });
    let rt = rt();
    let e = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).expect_err("must fail");
    assert_generic_08001(&e, env.pg.port);
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("tollgate could not connect to resource \"app\""));
    let logs = env.gw.logs();
    assert!(logs.contains("upstream connection failed"), "{logs}");
    assert!(logs.contains(&env.pg.port.to_string()), "{logs}");
    assert!(
        env.gw
            .metric("tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"tls\"}")
            .unwrap_or(0)
            >= 2,
        "{}",
        env.gw.metrics()
    );
    env.events_until("upstream/tls rejection", |evs| {
        rejected_upstream(evs, "tls")
    });
}

#[test]
fn verify_ca_opt_out_accepts_a_certificate_for_another_hostname() {
    let tmp = tempfile::tempdir().unwrap();
    let up_ca = make_ca(&tmp.path().join("upca"), "upstream CA");
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            server_dns: vec!["db.other".into()],
            ca_dir: Some(up_ca.clone()),
            ..Default::default()
        },
        resource_tls: Some(format!(
            "[resources.tls]\nmode = \"verify-ca\"\nca = \"{}\"\nserver_name = \"db.internal\"\n",
            up_ca.join("ca.crt").display()
        )),
        ..Default::default()
    });
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 'through'"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "through");
    let evs = env.events_after_closes(1);
    let open = evs.iter().find(|e| e["kind"] == "session.open").unwrap();
    // Still TLS upstream, only the name check is off.
    assert!(
        open["payload"]["upstream_tls"]["version"]
            .as_str()
            .is_some(),
        "{open:#?}"
    );
    assert_eq!(
        env.gw
            .metric("tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"tls\"}"),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// 2. upstream without TLS

#[test]
fn upstream_that_refuses_tls_is_an_error_and_disable_is_a_loud_opt_out() {
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            tls: false,
            ..Default::default()
        },
        ..Default::default()
    });
    let rt = rt();
    let e = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).expect_err("must fail");
    assert_generic_08001(&e, env.pg.port);
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("tollgate could not connect to resource \"app\""),
        "{}",
        stderr(&out)
    );
    let logs = env.gw.logs();
    assert!(logs.contains("refused TLS"), "{logs}");
    assert!(
        env.gw
            .metric(
                "tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"tls_refused\"}"
            )
            .unwrap_or(0)
            >= 2,
        "{}",
        env.gw.metrics()
    );
    env.events_until("tls_refused rejection", |evs| {
        rejected_upstream(evs, "tls_refused")
    });

    // Explicit opt-out: plaintext upstream works, and the gateway says so loudly.
    let plain = extra_gateway(
        &env.pki,
        env.pg.port,
        &env.pg.database,
        &env.pg.user,
        "[resources.tls]\nmode = \"disable\"\n",
        "",
        &format!(
            "password_file = \"{}\"",
            env.tmp.path().join("app.password").display()
        ),
        &[],
    );
    let logs = plain.gw.logs();
    assert!(logs.contains("DISABLED"), "{logs}");
    let c =
        try_client(&rt, plain.gw.pg_port, &env.pki.ca, &env.alice).expect("disable mode connects");
    let row = rt
        .block_on(c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        ))
        .unwrap();
    assert!(
        !row.get::<_, bool>(0),
        "upstream leg is plaintext in disable mode"
    );
    drop(c);
    let evs = plain.events_until("a closed session", |evs| !closes(evs).is_empty());
    let open = evs.iter().find(|e| e["kind"] == "session.open").unwrap();
    assert!(open["payload"]["upstream_tls"].is_null(), "{open:#?}");
    // The client leg is still TLS.
    assert!(open["payload"]["client_tls"]["version"].as_str().is_some());
}

#[test]
fn cleartext_password_is_never_sent_to_a_plaintext_upstream() {
    // An upstream without TLS that asks for the password in cleartext: even with the explicit
    // `disable` opt-out, the gateway must not hand the password over an unencrypted socket.
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            tls: false,
            auth: AuthMethod::Password,
            ..Default::default()
        },
        resource_tls: Some("[resources.tls]\nmode = \"disable\"\n".into()),
        ..Default::default()
    });
    let rt = rt();
    let e = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).expect_err("must fail");
    assert_generic_08001(&e, env.pg.port);
    let logs = env.gw.logs();
    assert!(logs.contains("cleartext password"), "{logs}");
    assert!(!logs.contains(&env.pg.password), "{logs}");
    assert!(
        env.gw
            .metric(
                "tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"protocol\"}"
            )
            .unwrap_or(0)
            >= 1,
        "{}",
        env.gw.metrics()
    );
    env.events_until("protocol rejection", |evs| {
        rejected_upstream(evs, "protocol")
    });
}

// ---------------------------------------------------------------------------------------------
// 3. credential injection

/// psql through the gateway as `SELECT current_user`; the password is nowhere in what the
/// client, the audit trail or the log shows.
fn assert_injection_works(env: &Env) {
    let out = env.psql(
        &env.conninfo("app"),
        &[
            "-c",
            "SELECT current_user",
            "-c",
            "SHOW password_encryption",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = format!("{}\n{}", stdout(&out), stderr(&out));
    assert!(text.starts_with(&env.pg.user), "{text}");
    assert!(
        !text.contains(&env.pg.password),
        "password reached the client"
    );
    let evs = env.events_after_closes(1);
    let dump = serde_json::to_string(&evs).unwrap();
    assert!(
        !dump.contains(&env.pg.password),
        "password in the audit store"
    );
    assert!(
        !env.gw.logs().contains(&env.pg.password),
        "password in the log"
    );
    assert!(dump.contains("SELECT current_user"));
}

#[test]
fn injects_scram_credentials_and_handles_wrong_or_missing_passwords() {
    let env = Env::start();
    assert_injection_works(&env);

    // A wrong password (the file is read per connection) → 08001 for the client, detail in the log.
    let pw_file = env.tmp.path().join("app.password");
    std::fs::write(&pw_file, "definitely-not-the-password\n").unwrap();
    let rt = rt();
    let e = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).expect_err("must fail");
    assert_generic_08001(&e, env.pg.port);
    let logs = env.gw.logs();
    assert!(logs.contains("authentication failed"), "{logs}");
    assert!(!logs.contains("definitely-not-the-password"), "{logs}");
    assert!(
        env.gw
            .metric("tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"auth\"}")
            .unwrap_or(0)
            >= 1,
        "{}",
        env.gw.metrics()
    );
    let evs = env.events_until("auth rejection", |evs| rejected_upstream(evs, "auth"));
    assert!(!serde_json::to_string(&evs)
        .unwrap()
        .contains("definitely-not-the-password"));

    // Fixed again without a restart.
    std::fs::write(&pw_file, &env.pg.password).unwrap();
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // password_env: from the gateway's environment.
    let creds = "password_env = \"APP_DB_PW\"";
    let tls = verify_full(&env.pg.ca_cert, "localhost");
    let g = extra_gateway(
        &env.pki,
        env.pg.port,
        &env.pg.database,
        &env.pg.user,
        &tls,
        "",
        creds,
        &[("APP_DB_PW", env.pg.password.as_str())],
    );
    let c = try_client(&rt, g.gw.pg_port, &env.pki.ca, &env.alice).expect("password_env works");
    let row = rt
        .block_on(c.query_one("SELECT current_user::text", &[]))
        .unwrap();
    assert_eq!(row.get::<_, String>(0), env.pg.user);
    drop(c);

    // …and with the variable unset, connecting fails with the same generic 08001.
    let g2 = extra_gateway(
        &env.pki,
        env.pg.port,
        &env.pg.database,
        &env.pg.user,
        &tls,
        "",
        "password_env = \"APP_DB_PW_NOT_SET_ANYWHERE\"",
        &[],
    );
    let e = try_client(&rt, g2.gw.pg_port, &env.pki.ca, &env.alice).expect_err("must fail");
    assert_generic_08001(&e, env.pg.port);
    assert!(
        g2.gw
            .metric(
                "tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"credentials\"}"
            )
            .unwrap_or(0)
            >= 1,
        "{}",
        g2.gw.metrics()
    );
}

#[test]
fn injects_md5_credentials() {
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            auth: AuthMethod::Md5,
            ..Default::default()
        },
        ..Default::default()
    });
    // The role's verifier is md5, so pg_hba's md5 does the md5 exchange.
    let verifier = env
        .pg
        .psql(&format!(
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = '{}'",
            env.pg.user
        ))
        .unwrap();
    assert_eq!(verifier.trim(), "md5");
    assert_injection_works(&env);
}

#[test]
fn injects_cleartext_password_only_inside_tls() {
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            auth: AuthMethod::Password,
            ..Default::default()
        },
        ..Default::default()
    });
    assert_injection_works(&env);
}

// ---------------------------------------------------------------------------------------------
// 4. connect timeout

#[test]
fn connect_timeout_against_a_silent_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let alice = pki.client("alice", &["sre"]);
    // Accepts TCP (the kernel completes the handshake into the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "x").unwrap();
    let g = extra_gateway(
        &pki,
        port,
        "app",
        "someone",
        &verify_full(&pki.ca, "localhost"),
        "connect_timeout = \"1s\"",
        &format!("password_file = \"{}\"", pw.display()),
        &[],
    );
    let rt = rt();
    let t = Instant::now();
    let e = try_client(&rt, g.gw.pg_port, &pki.ca, &alice).expect_err("must fail");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "gave up before the timeout: {took:?}"
    );
    assert_generic_08001(&e, port);
    assert!(g.gw.logs().contains("timed out"), "{}", g.gw.logs());
    assert_eq!(
        g.gw.metric(
            "tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"timeout\"}"
        ),
        Some(1),
        "{}",
        g.gw.metrics()
    );
    g.events_until("timeout rejection", |evs| rejected_upstream(evs, "timeout"));
    drop(silent);
}

// ---------------------------------------------------------------------------------------------
// 5. upstream death

/// Start `sql` on a tokio-postgres client; returns a handle resolving to (SQLSTATE, elapsed since resolve start).
fn spawn_query(
    rt: &tokio::runtime::Runtime,
    c: tokio_postgres::Client,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>>
{
    rt.spawn(async move { c.simple_query(sql).await })
}

#[test]
fn upstream_backend_terminated_mid_query() {
    let env = Env::start();
    let rt = rt();
    let c = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    let q = spawn_query(&rt, c, "SELECT pg_sleep(30)");
    wait_for(
        Duration::from_secs(10),
        "pg_sleep(30) running upstream",
        || count_running(&env, "pg_sleep(30)") == 1,
    );
    let killed = env
        .pg
        .psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()")
        .unwrap();
    assert_eq!(killed.trim(), "t");
    let t = Instant::now();
    let res = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), q).await })
        .expect("client must hear about it promptly")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let e = res.expect_err("the query must fail");
    let code = e.code().map(|c| c.code().to_string());
    eprintln!("client saw {code:?} after {:?}: {e}", t.elapsed());
    assert!(
        matches!(code.as_deref(), Some("57P01") | Some("08006")),
        "expected 57P01 or 08006, got {e:?}"
    );

    // The gateway carries on.
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 'still here'"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "still here");

    let evs = env.events_after_closes(2);
    let sid = session_of(&evs, "pg_sleep(30)").expect("command recorded");
    let close = close_of(&evs, &sid).expect("session.close recorded");
    assert!(
        close["outcome"] == "upstream_lost" || close["outcome"] == "closed",
        "{close:#?}"
    );
    eprintln!(
        "close: {close}; results: {:?}",
        evs.iter()
            .filter(|e| e["kind"] == "result" && e["session_id"] == sid.as_str())
            .collect::<Vec<_>>()
    );
}

#[test]
fn upstream_cluster_stopped_mid_session() {
    let mut env = Env::start();
    let rt = rt();
    let c = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    let q = spawn_query(&rt, c, "SELECT pg_sleep(30)");
    wait_for(
        Duration::from_secs(10),
        "pg_sleep(30) running upstream",
        || count_running(&env, "pg_sleep(30)") == 1,
    );
    let t = Instant::now();
    env.pg.stop();
    let res = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), q).await })
        .expect("client must hear about it promptly")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    let e = res.expect_err("the query must fail");
    eprintln!("cluster stop: client saw {:?}: {e}", e.code());
    let code = e.code().map(|c| c.code().to_string());
    assert!(
        matches!(code.as_deref(), Some("57P01") | Some("08006")),
        "expected 57P01 or 08006, got {e:?}"
    );

    // The gateway is still up and now refuses new sessions with the generic 08001.
    assert!(matches!(env.gw.http_get("/healthz"), Some((200, _))));
    let e = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).expect_err("upstream is down");
    assert_generic_08001(&e, env.pg.port);
    assert!(
        env.gw
            .metric("tollgate_upstream_connect_failures_total{resource=\"app\",reason=\"connect\"}")
            .unwrap_or(0)
            >= 1,
        "{}",
        env.gw.metrics()
    );

    let evs = env.events_until("the lost session's close", |evs| {
        session_of(evs, "pg_sleep(30)").is_some_and(|s| close_of(evs, &s).is_some())
    });
    let sid = session_of(&evs, "pg_sleep(30)").unwrap();
    assert_eq!(
        close_of(&evs, &sid).unwrap()["outcome"],
        "upstream_lost",
        "{evs:#?}"
    );
    assert!(env.gw.logs().contains("upstream connection lost"));
    assert!(
        env.gw
            .metric("tollgate_sessions_total{resource=\"app\",outcome=\"upstream_lost\"}")
            .unwrap_or(0)
            >= 1,
        "{}",
        env.gw.metrics()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. client death

#[test]
fn client_killed_mid_query_cancels_and_releases_the_upstream_backend() {
    let env = Env::start();
    let mut child = Command::new("psql")
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .arg(env.conninfo("app"))
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(15),
        "pg_sleep(60) running upstream",
        || count_running(&env, "pg_sleep(60)") == 1,
    );
    child.kill().unwrap(); // SIGKILL: no Terminate, no close_notify
    let _ = child.wait();
    let t = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "the upstream backend to be cancelled and gone",
        || count_active(&env, "pg_sleep(60)") == 0,
    );
    eprintln!("upstream backend released after {:?}", t.elapsed());
    // Nothing is left open on the gateway either.
    wait_for(Duration::from_secs(5), "active gauges back to 0", || {
        let m = env.gw.metrics();
        m.contains("tollgate_connections_active{listener=\"postgres\"} 0\n")
            && m.contains("tollgate_sessions_active{resource=\"app\"} 0\n")
    });
    let evs = env.events_until("the killed session's close", |evs| {
        session_of(evs, "pg_sleep(60)").is_some_and(|s| close_of(evs, &s).is_some())
    });
    let sid = session_of(&evs, "pg_sleep(60)").unwrap();
    assert_eq!(
        close_of(&evs, &sid).unwrap()["outcome"],
        "client_disconnected",
        "{evs:#?}"
    );
    // The cancel reached PostgreSQL (rather than the backend dying some other way).
    let pglog = std::fs::read_to_string(env.pg.log_path()).unwrap_or_default();
    assert!(
        pglog.contains("canceling statement due to user request"),
        "{pglog}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. audit content

/// A parameter tokio-postgres sends in text format (its own types all go binary).
#[derive(Debug)]
struct TextParam(&'static str);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }
    to_sql_checked!();
}

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig";
const NEW_PASSWORD: &str = "Tr0ub4dor&3-new-password";

#[test]
fn audit_trail_records_commands_results_and_redacts_parameters() {
    let mut env = Env::start();
    // Simple protocol via psql: one statement that works, one that fails.
    let out = env.psql(
        &env.conninfo("app"),
        &["-c", "SELECT 1", "-c", "SELECT 1/0"],
    );
    assert!(!out.status.success());
    assert_eq!(stdout(&out), "1");
    assert!(
        stderr(&out).contains("division by zero"),
        "{}",
        stderr(&out)
    );

    // Extended protocol via tokio-postgres, with secret-looking parameters.
    let rt = rt();
    let c = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    rt.block_on(async {
        let row = c.query_one("SELECT $1::text", &[&JWT]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), JWT);
        let row = c.query_one("SELECT $1::text AS echoed", &[&TextParam(JWT)]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), JWT);
        c.batch_execute("CREATE TEMP TABLE accounts (name text, password text); INSERT INTO accounts VALUES ('bob', 'old')")
            .await
            .unwrap();
        let n = c
            .execute(
                "UPDATE accounts SET password = $1 WHERE name = $2",
                &[&TextParam(NEW_PASSWORD), &TextParam("bob")],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
        let row = c
            .query_one("SELECT $1::text || '-plain'", &[&TextParam("harmless")])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "harmless-plain");
    });
    drop(c);

    let evs = env.events_after_closes(2);
    let dump = serde_json::to_string(&evs).unwrap();
    assert!(!dump.contains(JWT), "JWT in the audit store");
    assert!(
        !dump.contains(NEW_PASSWORD),
        "password parameter in the audit store"
    );

    let cmd = |needle: &str| -> &serde_json::Value {
        evs.iter()
            .find(|e| e["kind"] == "command" && e["payload"]["text"] == needle)
            .unwrap_or_else(|| panic!("no command event {needle:?}: {evs:#?}"))
    };
    let result_of = |c: &serde_json::Value| -> &serde_json::Value {
        evs.iter()
            .find(|e| {
                e["kind"] == "result"
                    && e["session_id"] == c["session_id"]
                    && e["payload"]["n"] == c["payload"]["n"]
            })
            .map(|e| &e["payload"])
            .unwrap_or_else(|| panic!("no result for {c:#?}"))
    };

    let ok = cmd("SELECT 1");
    assert_eq!(ok["payload"]["protocol"], "simple");
    let r = result_of(ok);
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["rows"], 1);
    assert!(r["sqlstate"].is_null());

    let bad = cmd("SELECT 1/0");
    let r = result_of(bad);
    assert_eq!(r["outcome"], "error", "{r:#?}");
    assert_eq!(r["sqlstate"], "22012", "{r:#?}");

    let binary = cmd("SELECT $1::text");
    assert_eq!(binary["payload"]["protocol"], "extended");
    assert_eq!(
        binary["payload"]["params"],
        serde_json::json!([format!("<binary {} bytes>", JWT.len())])
    );
    let text = cmd("SELECT $1::text AS echoed");
    assert_eq!(text["payload"]["params"], serde_json::json!(["[REDACTED]"]));
    assert_eq!(result_of(text)["outcome"], "ok");
    let upd = cmd("UPDATE accounts SET password = $1 WHERE name = $2");
    assert_eq!(
        upd["payload"]["params"],
        serde_json::json!(["[REDACTED]", "[REDACTED]"])
    );
    let r = result_of(upd);
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["rows"], 1);
    // Redaction is not blanket: an innocent text value is kept.
    let plain = cmd("SELECT $1::text || '-plain'");
    assert_eq!(plain["payload"]["params"], serde_json::json!(["harmless"]));

    let opens: Vec<_> = evs
        .iter()
        .filter(|e| e["kind"] == "session.open")
        .map(|e| &e["payload"])
        .collect();
    assert_eq!(opens.len(), 2);
    for o in &opens {
        assert!(
            o["client_tls"]["version"]
                .as_str()
                .is_some_and(|v| v.starts_with("TLS")),
            "{o:#?}"
        );
        assert!(
            o["upstream_tls"]["cipher"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{o:#?}"
        );
        assert!(
            o["client_cert_fingerprint"]
                .as_str()
                .is_some_and(|f| f.len() == 64),
            "{o:#?}"
        );
        assert_eq!(o["subject"], "alice");
    }

    // `tollgate audit verify` passes on the real store (Env::events asserts its exit status)…
    let verified = env.events();
    assert!(verified.len() >= evs.len());
    // …and is not vacuous: edit one recorded statement and it fails.
    env.gw.kill();
    let db = env.tmp.path().join("audit.db");
    let edit = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nn=c.execute(\"update events set payload=replace(payload,'SELECT 1/0','SELECT 1/1') where kind='command' and payload like '%SELECT 1/0%'\").rowcount\nc.commit()\nprint(n)")
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&edit.stdout).trim(),
        "1",
        "{edit:?}"
    );
    let out = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&env.gw.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BROKEN"),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. audit store unavailable (DESIGN: "a command is forwarded only after its event is durably
//    written (fail closed when the store is unavailable)")

/// Hold SQLite's write lock on the gateway's audit store from another process until dropped.
struct StoreLock(std::process::Child);

impl StoreLock {
    fn take(db: &Path) -> StoreLock {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys\nc=sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\nc.execute('ROLLBACK')")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        StoreLock(child)
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn commands_are_refused_once_the_audit_store_has_been_unavailable_past_audit_timeout() {
    let env = Env::start_with(EnvOptions {
        server_extra: "audit_timeout = \"1s\"".into(),
        ..EnvOptions::default()
    });
    let rt = rt();
    let c = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    rt.block_on(c.simple_query("SELECT 1")).unwrap();
    let lock = StoreLock::take(&env.tmp.path().join("audit.db"));
    // Within audit_timeout a command is journaled (durable against a gateway crash) and runs.
    rt.block_on(c.simple_query("CREATE TABLE journaled_during_outage (x int)"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Past it, new commands are refused and never reach the database.
    let started = Instant::now();
    let err = rt
        .block_on(c.simple_query("CREATE TABLE refused_without_audit (x int)"))
        .unwrap_err();
    let db = db_error(&err);
    assert_eq!(db.code().code(), "58030", "{db:?}");
    assert!(
        db.message()
            .contains("could not record this command in the audit trail"),
        "{db:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(
        env.pg
            .psql("SELECT to_regclass('public.refused_without_audit') IS NOT NULL")
            .unwrap()
            .trim(),
        "f",
        "a refused command must not run upstream"
    );
    assert_eq!(
        env.pg
            .psql("SELECT to_regclass('public.journaled_during_outage') IS NOT NULL")
            .unwrap()
            .trim(),
        "t"
    );
    drop(lock);
    // Nothing is lost: the journaled events reach the store once it is writable again.
    let evs = env.events_until("the refused session's close", |evs| {
        evs.iter()
            .any(|e| e["kind"] == "session.close" && e["payload"]["outcome"] == "audit_unavailable")
    });
    assert!(evs.iter().any(|e| e["kind"] == "command"
        && e["payload"]["text"] == "CREATE TABLE journaled_during_outage (x int)"));
    // The refused command is evidence too: recorded as refused, never as run.
    let refused: Vec<_> = evs
        .iter()
        .filter(|e| e["payload"]["text"] == "CREATE TABLE refused_without_audit (x int)")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0]["kind"], "command.refused");
    assert_eq!(refused[0]["payload"]["reason"], "audit_unavailable");
    assert!(env.gw.logs().contains("audit event could not be written"));
    // The gateway serves again once the store is back.
    let c2 = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    rt.block_on(c2.simple_query("SELECT 1")).unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&env.gw.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn audit_failure_open_forwards_while_the_store_is_locked() {
    let env = Env::start_with(EnvOptions {
        server_extra: "audit_failure = \"open\"\naudit_timeout = \"1s\"".into(),
        ..EnvOptions::default()
    });
    assert!(
        env.gw.logs().contains("audit_failure = \"open\""),
        "fail-open must be loud in the log"
    );
    let rt = rt();
    let c = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    let lock = StoreLock::take(&env.tmp.path().join("audit.db"));
    rt.block_on(c.simple_query("SELECT 1")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    rt.block_on(c.simple_query("CREATE TABLE ran_fail_open (x int)"))
        .unwrap();
    assert_eq!(
        env.pg
            .psql("SELECT to_regclass('public.ran_fail_open') IS NOT NULL")
            .unwrap()
            .trim(),
        "t"
    );
    drop(lock);
    assert!(env.gw.logs().contains("forwarding anyway"));
}

#[test]
fn journaled_events_survive_a_gateway_crash() {
    let mut env = Env::start();
    let rt = rt();
    let c = try_client(&rt, env.gw.pg_port, &env.pki.ca, &env.alice).unwrap();
    let db = env.tmp.path().join("audit.db");
    // Keep the store locked so the events can only be in the journal when the gateway dies.
    let lock = StoreLock::take(&db);
    rt.block_on(c.simple_query("CREATE TABLE before_the_crash (x int)"))
        .unwrap();
    env.gw.kill(); // SIGKILL: no shutdown, no flush
    drop(lock);
    assert!(
        !read_events(&db)
            .iter()
            .any(|e| e["payload"]["text"] == "CREATE TABLE before_the_crash (x int)"),
        "the event should still be only in the journal"
    );
    // A restarted gateway imports the journal before serving.
    let config = env.gw.config_template();
    let restarted = Gateway::start(env.tmp.path(), &config, &[]);
    let evs = read_events(&db);
    assert!(
        evs.iter().any(|e| e["kind"] == "command"
            && e["payload"]["text"] == "CREATE TABLE before_the_crash (x int)"),
        "{evs:#?}"
    );
    assert!(restarted
        .logs()
        .contains("imported audit events left by a previous gateway process"));
    let out = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&restarted.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
