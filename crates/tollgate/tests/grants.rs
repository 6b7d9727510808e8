//! Grants can be listed and revoked: a user outside `allow_groups` asks for access through the
//! API, an admin approves, the user works through the gateway; `tollgate access list` (the real
//! binary) shows the grant, `tollgate access revoke` ends the live session at once and refuses
//! new ones, and every step is in the audit trail.

mod common;
use common::*;
use serde_json::Value;
use std::process::Output;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tollgate_api::client::{ApiClient, ClientError, ClientOptions};
use tollgate_tls::pki::IssuedFiles;

type Conn = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

async fn start() -> (Env, u16) {
    let https = tollgate_testsupport::free_port();
    let env = tokio::task::spawn_blocking(move || {
        Env::start_with(EnvOptions {
            server_extra: format!(
                "https_listen = \"127.0.0.1:{https}\"\n\n[roles]\nadmin_groups = [\"sre\"]\nauditor_groups = [\"audit\"]\n"
            ),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    (env, https)
}

fn api(env: &Env, https: u16, who: &IssuedFiles) -> ApiClient {
    ApiClient::new(&ClientOptions {
        gateway: format!("https://localhost:{https}"),
        ca: Some(env.pki.ca.clone()),
        cert: Some(who.cert.clone()),
        key: Some(who.key.clone()),
        token: None,
    })
    .unwrap()
}

/// The status and error message of a refused API call.
fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r.expect_err("the request was accepted") {
        ClientError::Status { status, body } => (status, body.error),
        other => panic!("expected an HTTP status, got {other}"),
    }
}

/// `tollgate ARGS` as `who`, against this gateway's API.
fn cli(env: &Env, https: u16, who: &IssuedFiles, args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env("TOLLGATE_GATEWAY", format!("https://localhost:{https}"))
        .env("TOLLGATE_CA", &env.pki.ca)
        .env("TOLLGATE_CERT", &who.cert)
        .env("TOLLGATE_KEY", &who.key)
        .output()
        .unwrap()
}

async fn connect(
    env: &Env,
    who: &IssuedFiles,
) -> Result<(tokio_postgres::Client, Conn), tokio_postgres::Error> {
    let conninfo = format!(
        "host=localhost port={} dbname=app user=carol sslmode=require connect_timeout=10",
        env.gw.pg_port
    );
    let (client, conn) = tokio_postgres::connect(
        &conninfo,
        tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(&env.pki.ca, Some(who))),
    )
    .await?;
    Ok((client, tokio::spawn(conn)))
}

fn grants_of(list: &Value) -> Vec<Value> {
    list["grants"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_grant_is_listed_and_its_revocation_ends_the_session() {
    let (env, https) = start().await;
    let carol = env.pki.client("carol", &["interns"]);
    let mallory = env.pki.client("mallory", &["interns"]);
    let auditor = env.pki.client("audrey", &["audit"]);
    let err = connect(&env, &carol)
        .await
        .err()
        .expect("carol is outside allow_groups");
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );

    // carol asks through the API, alice (admin) approves.
    let review: Value = api(&env, https, &carol)
        .post_json(
            "/api/v1/access",
            &serde_json::json!({"resource": "app", "for": "1h", "reason": "INC-7"}),
        )
        .unwrap();
    let id = review["id"].as_str().unwrap().to_string();
    let out = cli(
        &env,
        https,
        &env.alice,
        &["reviews", "approve", &id, "--reason", "ok"],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let (client, conn) = connect(&env, &carol)
        .await
        .expect("the grant lets carol in");
    let rows = client.simple_query("SELECT 41 + 1").await.unwrap();
    assert!(rows.iter().any(
        |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
    ));

    // The admin's table shows the grant.
    let out = cli(&env, https, &env.alice, &["access", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
    for cell in ["access", "carol", "app", "alice", "active"] {
        assert!(row.contains(cell), "{cell} missing: {row}");
    }
    // --json is the API's shape.
    let out = cli(
        &env,
        https,
        &env.alice,
        &["access", "list", "--subject", "carol", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let grants = grants_of(&list);
    assert_eq!(grants.len(), 1, "{list}");
    let g = &grants[0];
    assert_eq!(g["id"], id.as_str());
    assert_eq!(g["kind"], "access");
    assert_eq!(g["subject"], "carol");
    assert_eq!(g["resource"], "app");
    assert_eq!(g["granted_by"], "alice");
    assert_eq!(g["active"], true);
    assert!(g["revoked"].is_null(), "{g}");
    let until = g["until_unix_ms"].as_i64().unwrap();
    let granted = g["granted_at_unix_ms"].as_i64().unwrap();
    assert!((3_599_000..=3_601_000).contains(&(until - granted)), "{g}");

    // An auditor sees it; carol sees her own; mallory sees nothing of carol's, even by name.
    let seen: Value = api(&env, https, &auditor)
        .get_json("/api/v1/grants")
        .unwrap();
    assert_eq!(grants_of(&seen).len(), 1, "{seen}");
    let seen: Value = api(&env, https, &carol).get_json("/api/v1/grants").unwrap();
    assert_eq!(grants_of(&seen).len(), 1, "{seen}");
    let out = cli(
        &env,
        https,
        &mallory,
        &["access", "list", "--subject", "carol", "--all"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "no grants match");
    // A bad parameter is a 400 that names it.
    let (status, msg) =
        refused(api(&env, https, &env.alice).get_json::<Value>("/api/v1/grants?active=maybe"));
    assert_eq!(status, 400);
    assert!(msg.starts_with("active="), "{msg}");
    let (status, msg) =
        refused(api(&env, https, &env.alice).get_json::<Value>("/api/v1/grants?kind=command"));
    assert_eq!(status, 400);
    assert!(msg.starts_with("kind="), "{msg}");

    // mallory may not revoke it; an unknown grant is a 404.
    let out = cli(
        &env,
        https,
        &mallory,
        &["access", "revoke", &id, "--reason", "x"],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("(403)"), "{}", stderr(&out));
    let (status, _) = refused(api(&env, https, &env.alice).post_json::<Value>(
        "/api/v1/grants/rv_nosuchgrant/revoke",
        &serde_json::json!({"reason": "x"}),
    ));
    assert_eq!(status, 404);
    client
        .simple_query("SELECT 1")
        .await
        .expect("still granted");

    // alice revokes it: carol's live session ends with the gateway's error.
    let out = cli(
        &env,
        https,
        &env.alice,
        &["access", "revoke", &id, "--reason", "INC-7 closed"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the session was not ended")
        .unwrap()
        .expect_err("the session ended without an error");
    let db = ended
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {ended:?}"));
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN, "{db:?}");
    assert!(db.message().contains("was revoked"), "{db:?}");
    assert!(db.message().contains(&id), "{db:?}");
    client
        .simple_query("SELECT 1")
        .await
        .expect_err("a query after the revocation ran");
    let err = connect(&env, &carol)
        .await
        .err()
        .expect("a new session was let in");
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );

    // Twice is a conflict, by either route.
    let out = cli(
        &env,
        https,
        &env.alice,
        &["access", "revoke", &id, "--reason", "again"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("(409)"), "{}", stderr(&out));
    assert!(stderr(&out).contains("already revoked"), "{}", stderr(&out));
    let (status, _) = refused(api(&env, https, &env.alice).post_json::<Value>(
        &format!("/api/v1/reviews/{id}/revoke"),
        &serde_json::json!({"reason": "again"}),
    ));
    assert_eq!(status, 409);

    // The list: gone from the active grants, shown as revoked with who and why.
    let out = cli(&env, https, &env.alice, &["access", "list"]);
    assert_eq!(stdout(&out), "no grants match");
    let out = cli(
        &env,
        https,
        &env.alice,
        &["access", "list", "--all", "--json"],
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = &grants_of(&list)[0];
    assert_eq!(g["active"], false);
    assert_eq!(g["revoked"]["by"], "alice", "{g}");
    assert_eq!(g["revoked"]["reason"], "INC-7 closed", "{g}");
    let out = cli(&env, https, &env.alice, &["access", "list", "--all"]);
    assert!(
        stdout(&out).contains("revoked by alice: INC-7 closed"),
        "{}",
        stdout(&out)
    );

    // The audit trail: the revocation, the API write that made it, and the session's end.
    let evs = tokio::task::block_in_place(|| {
        env.events_until("the revocation events", |evs| {
            evs.iter().any(|e| e["kind"] == "review.revoked")
                && evs.iter().any(|e| {
                    e["kind"] == "session.terminated"
                        && e["payload"]["reason"] == "access_grant_revoked"
                })
        })
    });
    let revoked: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "review.revoked")
        .collect();
    assert_eq!(revoked.len(), 1, "one revocation only");
    assert_eq!(revoked[0]["payload"]["review"], id.as_str());
    assert_eq!(revoked[0]["payload"]["revoked_by"], "alice");
    assert_eq!(revoked[0]["payload"]["reason"], "INC-7 closed");
    assert!(
        evs.iter().any(|e| e["kind"] == "api.write"
            && e["payload"]["route"] == "/api/v1/grants/{id}/revoke"
            && e["payload"]["review"] == id.as_str()),
        "no api.write for the grant revocation"
    );
}
