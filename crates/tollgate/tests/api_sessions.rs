//! The audit read path end to end: real psql traffic through the gateway, then the HTTPS API
//! on `https_listen` through the real `tollgate sessions` commands.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use tollgate_tls::pki::IssuedFiles;

/// The gateway of [`Env`] plus the HTTPS API; `sre` (alice) and `ci` (the ci-bot token) are
/// auditor groups, `ops` the admin group.
fn start() -> (Env, u16) {
    let https_port = tollgate_testsupport::free_port();
    let env = Env::start_with(EnvOptions {
        // `[roles]` opens its own table after the `[server]` keys.
        server_extra: format!(
            "https_listen = \"127.0.0.1:{https_port}\"\n\n[roles]\nadmin_groups = [\"ops\"]\nauditor_groups = [\"sre\", \"ci\"]\n"
        ),
        ..EnvOptions::default()
    });
    (env, https_port)
}

enum Cred<'a> {
    None,
    Cert(&'a IssuedFiles),
    Token(&'a str),
}

/// `tollgate sessions ARGS` against the gateway: URL and CA from the environment variables,
/// credentials as flags.
fn sessions(_env: &Env, port: u16, ca: &Path, cred: Cred<'_>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("sessions")
        .args(args)
        .env("TOLLGATE_GATEWAY", format!("https://localhost:{port}"))
        .env("TOLLGATE_CA", ca)
        .env_remove("TOLLGATE_CERT")
        .env_remove("TOLLGATE_KEY")
        .env_remove("TOLLGATE_TOKEN")
        .env("RUST_LOG", "warn");
    match cred {
        Cred::None => {}
        Cred::Cert(who) => {
            cmd.arg("--cert").arg(&who.cert).arg("--key").arg(&who.key);
        }
        Cred::Token(t) => {
            cmd.args(["--token", t]);
        }
    }
    cmd.output().expect("run tollgate sessions")
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "tollgate sessions failed: {}\n{}",
        stderr(out),
        stdout(out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn psql_ok(_env: &Env, conninfo: &str, args: &[&str], envs: &[(&str, &str)]) {
    let out = psql_env(conninfo, args, envs);
    assert!(out.status.success(), "psql failed: {}", stderr(&out));
}

/// The three recorded sessions every test starts from: alice's two queries, alice's failing
/// query, ci-bot's query (with its token as the password).
fn traffic(env: &Env) {
    psql_ok(
        env,
        &env.conninfo("app"),
        &[
            "-c",
            "select 1",
            "-c",
            "select n from generate_series(1,3) n",
        ],
        &[],
    );
    let failed = env.psql(&env.conninfo("app"), &["-c", "select * from no_such_table"]);
    assert!(!failed.status.success());
    psql_ok(
        env,
        &env.conninfo_token("app"),
        &["-c", "select 2"],
        &[("PGPASSWORD", TOKEN)],
    );
    env.events_after_closes(3);
}

fn ids_of(list: &Value) -> Vec<String> {
    list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sessions_list_show_replay_and_export_through_the_https_api() {
    let (env, port) = start();
    traffic(&env);
    let ca = env.pki.ca.clone();
    let run = |args: &[&str]| sessions(&env, port, &ca, Cred::Cert(&env.alice), args);

    // list: newest first, with subject, resource, outcome and command counts.
    let list = ok_json(&run(&["list", "--json"]));
    let all = list["sessions"].as_array().unwrap().clone();
    assert_eq!(all.len(), 3, "{list:#}");
    assert_eq!(list["next_offset"], Value::Null);
    let summary: Vec<(&str, &str, &str, i64)> = all
        .iter()
        .map(|s| {
            (
                s["subject"].as_str().unwrap(),
                s["resource"].as_str().unwrap(),
                s["outcome"].as_str().unwrap(),
                s["commands"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("ci-bot", "app", "closed", 1),
            ("alice", "app", "closed", 1),
            ("alice", "app", "closed", 2),
        ]
    );
    let first = all[2]["id"].as_str().unwrap().to_string();
    assert!(all[0]["started_at"].as_str().unwrap().ends_with('Z'));

    // Filters and paging.
    let by_token = ok_json(&run(&["list", "--json", "--subject", "ci-bot"]));
    assert_eq!(ids_of(&by_token), [all[0]["id"].as_str().unwrap()]);
    let by_resource = ok_json(&run(&["list", "--json", "--resource", "nope"]));
    assert!(ids_of(&by_resource).is_empty());
    let rejected = ok_json(&run(&["list", "--json", "--outcome", "rejected"]));
    assert!(ids_of(&rejected).is_empty());
    let closed = ok_json(&run(&["list", "--json", "--outcome", "closed"]));
    assert_eq!(ids_of(&closed).len(), 3);
    let since_first = all[1]["started_at"].as_str().unwrap();
    let recent = ok_json(&run(&["list", "--json", "--since", since_first]));
    assert_eq!(ids_of(&recent).len(), 2, "since {since_first}: {recent:#}");
    let before = ok_json(&run(&["list", "--json", "--until", since_first]));
    assert_eq!(ids_of(&before), [first.as_str()]);
    let future = ok_json(&run(&["list", "--json", "--since", "2999-01-01T00:00:00Z"]));
    assert!(ids_of(&future).is_empty());
    let page = ok_json(&run(&["list", "--json", "--limit", "2"]));
    assert_eq!(ids_of(&page).len(), 2);
    assert_eq!(page["next_offset"], 2);
    let last = ok_json(&run(&["list", "--json", "--limit", "2", "--offset", "2"]));
    assert_eq!(ids_of(&last), [first.as_str()]);
    assert_eq!(last["next_offset"], Value::Null);

    // Human table: a header and one aligned row per session.
    let table = run(&["list"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("ID "), "{text}");
    for col in [
        "STARTED", "DURATION", "SUBJECT", "RESOURCE", "OUTCOME", "COMMANDS",
    ] {
        assert!(lines[0].contains(col), "{text}");
    }
    let at = lines[0].find("RESOURCE").unwrap();
    assert!(
        lines.iter().skip(1).all(|l| l[at..].starts_with("app ")),
        "{text}"
    );
    assert!(
        lines[1].contains("ci-bot") && lines[3].contains("alice"),
        "{text}"
    );

    // show: metadata plus the statements in order with their results.
    let detail = ok_json(&run(&["show", &first, "--json"]));
    assert_eq!(detail["session"]["id"], first.as_str());
    assert_eq!(detail["session"]["subject"], "alice");
    let events = detail["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "session.open",
            "command",
            "result",
            "command",
            "result",
            "session.close"
        ]
    );
    assert_eq!(events[1]["payload"]["text"], "select 1");
    assert_eq!(events[2]["payload"]["rows"], 1);
    assert_eq!(
        events[3]["payload"]["text"],
        "select n from generate_series(1,3) n"
    );
    assert_eq!(events[4]["payload"]["rows"], 3);
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    let shown = run(&["show", &first]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let text = stdout(&shown);
    assert!(
        text.contains("subject    alice (cert; groups sre)"),
        "{text}"
    );
    assert!(text.contains("outcome    closed"), "{text}");
    let timeline: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "timeline")
        .skip(1)
        .map(|l| l.trim_start().split_once("  ").unwrap().1.trim_start())
        .collect();
    assert!(timeline[1].starts_with("command #1     select 1"), "{text}");
    assert!(
        timeline[4].starts_with("result #2      3 rows (SELECT), "),
        "{text}"
    );

    // The failed statement's result carries its SQLSTATE.
    let failed_id = all[1]["id"].as_str().unwrap();
    let failed = ok_json(&run(&["show", failed_id, "--json"]));
    let result = failed["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "result")
        .unwrap()
        .clone();
    assert_eq!(result["payload"]["sqlstate"], "42P01");

    // replay --speed 0: the statements and their results, in order, without pauses.
    let replayed = run(&["replay", &first, "--speed", "0"]);
    assert!(replayed.status.success(), "{}", stderr(&replayed));
    let text = stdout(&replayed);
    let lines: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| {
            let (stamp, rest) = l.split_once("] ").unwrap();
            assert!(stamp.starts_with("[+") && stamp.ends_with('s'), "{l}");
            let rest = if rest.starts_with("  -> ") {
                rest.rsplit_once(", ").unwrap().0
            } else if rest.starts_with("connected: ") {
                rest.split(" from ").next().unwrap()
            } else if rest.starts_with("disconnected: ") {
                rest.split(" after ").next().unwrap()
            } else {
                rest
            };
            rest.to_string()
        })
        .collect();
    assert_eq!(
        lines,
        [
            "connected: alice (cert)",
            "SQL> select 1",
            "  -> 1 row (SELECT)",
            "SQL> select n from generate_series(1,3) n",
            "  -> 3 rows (SELECT)",
            "disconnected: closed",
        ],
        "{text}"
    );
    let failed_replay = stdout(&run(&["replay", failed_id, "--speed", "0"]));
    assert!(
        failed_replay.contains("  -> ERROR 42P01, "),
        "{failed_replay}"
    );

    // export: JSON Lines, one event per line, stable fields, hash chains that verify.
    let file = env.tmp.path().join("export.jsonl");
    let exported = run(&["export", "--out", file.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let body = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert!(body.ends_with('\n'));
    assert!(
        stderr(&exported).contains(&format!("wrote {} events", lines.len())),
        "{}",
        stderr(&exported)
    );
    let keys: Vec<&str> = lines[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "at",
        "at_unix_ms",
        "chain_id",
        "chain_seq",
        "hash",
        "id",
        "kind",
        "payload",
        "prev_hash",
        "seq",
        "session_id",
    ];
    expected.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, expected);
    for l in &lines {
        assert_eq!(l.as_object().unwrap().len(), expected.len(), "{l}");
    }
    // Every event of the recorded sessions is there, once.
    for s in &all {
        let id = s["id"].as_str().unwrap();
        let n = lines.iter().filter(|l| l["session_id"] == id).count() as i64;
        assert_eq!(n, s["event_count"].as_i64().unwrap(), "session {id}");
    }
    // Recompute every hash and link from the export alone.
    let mut chains: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for l in &lines {
        chains
            .entry(l["chain_id"].as_str().unwrap().into())
            .or_default()
            .push(l);
    }
    for (chain, mut evs) in chains {
        evs.sort_by_key(|e| e["chain_seq"].as_i64().unwrap());
        let mut prev = tollgate_store::GENESIS_HASH.to_string();
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["chain_seq"].as_i64().unwrap(), i as i64 + 1, "{chain}");
            assert_eq!(e["prev_hash"].as_str().unwrap(), prev, "{chain} {e}");
            let payload = tollgate_store::canonical_json(&e["payload"]);
            let hash = tollgate_store::event_hash(
                &prev,
                &tollgate_store::HashedFields {
                    chain_id: &chain,
                    chain_seq: e["chain_seq"].as_i64().unwrap(),
                    session_id: e["session_id"].as_str().unwrap(),
                    session_seq: e["seq"].as_i64().unwrap(),
                    at_unix_ms: e["at_unix_ms"].as_i64().unwrap(),
                    kind: e["kind"].as_str().unwrap(),
                    payload: payload.as_bytes(),
                },
            );
            assert_eq!(e["hash"].as_str().unwrap(), hash, "{chain} {e}");
            prev = hash;
        }
    }
    // ... and the same chain verifies in the store, over the API.
    let verify = sessions_raw(&env, port, &Cred::Cert(&env.alice), "/api/v1/audit/verify");
    let verify: Value = serde_json::from_slice(&verify.expect("verify over the API")).unwrap();
    assert_eq!(verify["first_break"], Value::Null, "{verify}");
    assert!(verify["events"].as_u64().unwrap() >= lines.len() as u64);

    // Every API call above is an api.read event naming alice, the route and the filters.
    let evs = env.events_until("api.read events for every call", |evs| {
        evs.iter().filter(|e| e["kind"] == "api.read").count() >= 18
    });
    let reads: Vec<&Value> = evs.iter().filter(|e| e["kind"] == "api.read").collect();
    assert!(reads.iter().all(|e| e["payload"]["subject"] == "alice"));
    assert!(reads
        .iter()
        .any(|e| e["payload"]["route"] == "/api/v1/sessions"
            && e["payload"]["query"]["subject"] == "ci-bot"
            && e["payload"]["status"] == 200));
    assert!(reads
        .iter()
        .any(|e| e["payload"]["route"] == "/api/v1/export"));
    assert!(reads
        .iter()
        .any(|e| e["payload"]["route"] == "/api/v1/sessions/{id}"
            && e["payload"]["session"] == first.as_str()));
}

/// One GET through the library client (the CLI's), for routes the CLI has no command for.
fn sessions_raw(
    env: &Env,
    port: u16,
    cred: &Cred<'_>,
    path: &str,
) -> Result<Vec<u8>, tollgate_api::client::ClientError> {
    let (cert, key, token) = match cred {
        Cred::None => (None, None, None),
        Cred::Cert(w) => (Some(w.cert.clone()), Some(w.key.clone()), None),
        Cred::Token(t) => (None, None, Some(t.to_string())),
    };
    let client = tollgate_api::client::ApiClient::new(&tollgate_api::client::ClientOptions {
        gateway: format!("https://localhost:{port}"),
        ca: Some(env.pki.ca.clone()),
        cert,
        key,
        token,
    })?;
    let mut body = Vec::new();
    client.get_to(path, &mut body)?;
    Ok(body)
}

#[test]
fn api_authenticates_checks_roles_and_is_verified() {
    let (env, port) = start();
    traffic(&env);
    let ca = env.pki.ca.clone();

    // A token identity in an auditor group reads sessions with --token.
    let by_token = ok_json(&sessions(
        &env,
        port,
        &ca,
        Cred::Token(TOKEN),
        &["list", "--json"],
    ));
    assert_eq!(ids_of(&by_token).len(), 3);

    // No credentials: 401, and the CLI says which credential to pass.
    let out = sessions(&env, port, &ca, Cred::None, &["list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not authenticated (401)"), "{err}");
    assert!(err.contains("--cert") && err.contains("--token"), "{err}");
    match sessions_raw(&env, port, &Cred::None, "/api/v1/sessions") {
        Err(tollgate_api::client::ClientError::Status { status, body }) => {
            assert_eq!(status, 401);
            assert_eq!(body.error, "authentication required");
            assert!(body.hint.unwrap().contains("client certificate"));
        }
        other => panic!("expected 401, got {other:?}"),
    }

    // A wrong token: 401 too, and it never lands in the audit trail.
    let bad_token = "not-the-token-0123456789";
    let out = sessions(&env, port, &ca, Cred::Token(bad_token), &["list"]);
    assert!(
        stderr(&out).contains("the token is not valid"),
        "{}",
        stderr(&out)
    );

    // A valid certificate outside the auditor and admin groups: 403 naming the role needed.
    let bob = env.pki.client("bob", &["dev"]);
    let out = sessions(&env, port, &ca, Cred::Cert(&bob), &["list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not allowed (403)"), "{err}");
    assert!(err.contains("bob may not read the audit trail"), "{err}");
    assert!(err.contains("auditor role"), "{err}");
    assert!(
        !err.contains("sre") && !err.contains("\"ci\""),
        "must not list others' groups: {err}"
    );

    // A CA that did not issue the gateway's certificate: a TLS verification error.
    let other = Pki::new(&env.tmp.path().join("other-ca"));
    let out = sessions(&env, port, &other.ca, Cred::Cert(&env.alice), &["list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("TLS with the gateway"), "{err}");
    assert!(err.contains("invalid peer certificate"), "{err}");
    assert!(stdout(&out).is_empty());

    // Unknown session: 404; bad parameters: 400 saying what to write.
    let out = sessions(
        &env,
        port,
        &ca,
        Cred::Cert(&env.alice),
        &["show", "0000nosuch"],
    );
    let err = stderr(&out);
    assert!(
        err.contains("not found (404): no session \"0000nosuch\""),
        "{err}"
    );
    let out = sessions(
        &env,
        port,
        &ca,
        Cred::Cert(&env.alice),
        &["list", "--limit", "5000"],
    );
    let err = stderr(&out);
    assert!(
        err.contains("bad request (400)") && err.contains("from 1 to 1000"),
        "{err}"
    );
    match sessions_raw(
        &env,
        port,
        &Cred::Cert(&env.alice),
        "/api/v1/sessions?subjet=alice",
    ) {
        Err(tollgate_api::client::ClientError::Status { status, body }) => {
            assert_eq!(status, 400);
            assert!(
                body.error.contains("accepted parameters are subject"),
                "{}",
                body.error
            );
        }
        other => panic!("expected 400, got {other:?}"),
    }

    // Refused reads are recorded too, with who (if known) and the status; never the token.
    // Unauthenticated ones only in the aggregate `connection.refused` summary of the listener.
    let evs = env.events_until("api.read events for refused calls", |evs| {
        let st = |s: i64| {
            evs.iter()
                .any(|e| e["kind"] == "api.read" && e["payload"]["status"] == s)
        };
        st(403) && st(404) && st(400) && refused_count(evs, "unauthenticated") >= 3
    });
    assert!(!evs
        .iter()
        .any(|e| e["kind"] == "api.read" && e["payload"]["status"] == 401));
    let summary = evs
        .iter()
        .find(|e| e["kind"] == "connection.refused")
        .unwrap();
    assert_eq!(summary["payload"]["listener"], "https");
    let reads: Vec<&Value> = evs.iter().filter(|e| e["kind"] == "api.read").collect();
    assert!(reads
        .iter()
        .any(|e| e["payload"]["status"] == 403 && e["payload"]["subject"] == "bob"));
    assert!(reads.iter().any(|e| e["payload"]["status"] == 200
        && e["payload"]["subject"] == "ci-bot"
        && e["payload"]["auth_method"] == "token"));
    let all_text = serde_json::to_string(&evs).unwrap();
    assert!(!all_text.contains(TOKEN) && !all_text.contains(bad_token));
}
