//! Time-bounded sessions: a session ends, with a FATAL that says why and a `session.terminated`
//! event, when the client certificate expires or is revoked by a reloaded CRL, when the service
//! token it used is removed from the config, and when the access grant it depends on ends.

mod common;
use common::*;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tollgate_tls::pki::IssuedFiles;

type Conn = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// A tokio-postgres client to resource "app" as `user`, with a certificate and/or a password.
async fn connect(
    env: &Env,
    who: Option<&IssuedFiles>,
    user: &str,
    password: Option<&str>,
) -> Result<(tokio_postgres::Client, Conn), tokio_postgres::Error> {
    let cfg = client_tls(&env.pki.ca, who);
    let mut conninfo = format!(
        "host=localhost port={} dbname=app user={user} sslmode=require connect_timeout=10",
        env.gw.pg_port
    );
    if let Some(p) = password {
        conninfo.push_str(&format!(" password={p}"));
    }
    let (client, conn) = tokio_postgres::connect(
        &conninfo,
        tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
    )
    .await?;
    Ok((client, tokio::spawn(conn)))
}

/// Run a long query in the background; its result is the session's end as the client saw it.
fn long_query(client: tokio_postgres::Client) -> tokio::task::JoinHandle<tokio_postgres::Error> {
    tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(60)").await;
        r.expect_err("the query outlived the session's standing")
    })
}

async fn ended_with(
    query: tokio::task::JoinHandle<tokio_postgres::Error>,
    within: Duration,
) -> (SqlState, String, String) {
    let err = tokio::time::timeout(within, query)
        .await
        .expect("the session was not ended in time")
        .unwrap();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err:?}"));
    assert_eq!(db.severity(), "FATAL", "{db:?}");
    (
        db.code().clone(),
        db.message().to_string(),
        db.hint().unwrap_or_default().to_string(),
    )
}

/// The `session.terminated` event with `reason`, and the matching `session.close`.
fn terminated(env: &Env, reason: &str) -> (serde_json::Value, serde_json::Value) {
    let evs = tokio::task::block_in_place(|| {
        env.events_until(&format!("a session terminated for {reason}"), |evs| {
            evs.iter().any(|e| {
                e["kind"] == "session.close"
                    && e["payload"]["outcome"] == "terminated"
                    && e["payload"]["reason"] == reason
            })
        })
    });
    let t = evs
        .iter()
        .find(|e| e["kind"] == "session.terminated" && e["payload"]["reason"] == reason)
        .unwrap_or_else(|| panic!("no session.terminated event: {evs:#?}"))
        .clone();
    let close = evs
        .iter()
        .find(|e| e["kind"] == "session.close" && e["session_id"] == t["session_id"])
        .unwrap()
        .clone();
    (t, close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_with_a_fatal_when_its_client_certificate_expires() {
    let env = tokio::task::spawn_blocking(Env::start).await.unwrap();
    let short = env
        .pki
        .client_until("shortlived", &["sre"], Duration::from_secs(5));
    let started = Instant::now();
    let (client, _conn) = connect(&env, Some(&short), "shortlived", None)
        .await
        .expect("connect with a certificate that is still valid");
    let rows = client.simple_query("SELECT 1").await.unwrap();
    assert!(!rows.is_empty());

    let (code, message, hint) = ended_with(long_query(client), Duration::from_secs(20)).await;
    assert_eq!(
        code,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "{message}"
    );
    assert!(message.contains("certificate has expired"), "{message}");
    assert!(hint.contains("renewed certificate"), "{hint}");
    assert!(started.elapsed() < Duration::from_secs(15));

    let (t, close) = terminated(&env, "cert_expired");
    assert_eq!(t["payload"]["sqlstate"], "28000");
    assert_eq!(close["payload"]["outcome"], "terminated");

    // A new connection with the expired certificate fails the handshake.
    assert!(connect(&env, Some(&short), "shortlived", None)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoking_crl_refuses_the_handshake_and_ends_running_sessions() {
    let env = tokio::task::spawn_blocking(|| {
        Env::start_with(EnvOptions {
            server_extra: "client_crl = [\"pki/crl.pem\"]\n".into(),
            prepare: Some(|pki| {
                pki.write_crl(&[]);
            }),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let bob = env.pki.client("bob", &["sre"]);
    let (alice_client, _a) = connect(&env, Some(&env.alice), "alice", None)
        .await
        .unwrap();
    let (bob_client, _b) = connect(&env, Some(&bob), "bob", None)
        .await
        .expect("bob is not revoked yet");
    bob_client.simple_query("SELECT 1").await.unwrap();
    let query = long_query(bob_client);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The CA revokes bob; the gateway re-reads the CRL with its certificates.
    env.pki.write_crl(&[&bob]);
    let (code, message, _) = ended_with(query, Duration::from_secs(15)).await;
    assert_eq!(
        code,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "{message}"
    );
    assert!(message.contains("revoked"), "{message}");
    terminated(&env, "cert_revoked");

    // Alice is not affected; bob can no longer complete a handshake.
    alice_client.simple_query("SELECT 1").await.unwrap();
    let err = match connect(&env, Some(&bob), "bob", None).await {
        Err(e) => e,
        Ok((c, _)) => c
            .simple_query("SELECT 1")
            .await
            .expect_err("a revoked certificate was accepted"),
    };
    assert!(err.as_db_error().is_none(), "{err:?}");
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(10), "the tls_revoked refusal", || {
            env.gw
                .metric("tollgate_connections_refused_total{listener=\"postgres\",reason=\"tls_revoked\"}")
                .is_some_and(|n| n >= 1)
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_from_the_config_ends_its_session_and_is_refused_after_reload() {
    let env = tokio::task::spawn_blocking(Env::start).await.unwrap();
    let (client, _c) = connect(&env, None, "ci-bot", Some(TOKEN))
        .await
        .expect("connect with the token");
    client.simple_query("SELECT 1").await.unwrap();
    let original = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &env.gw.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };

    // A broken file is refused whole: the token keeps working.
    std::fs::write(&env.gw.config_path, format!("{original}\nnot toml [")).unwrap();
    hup();
    tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(10),
            "the rejected reload in the log",
            || env.gw.logs().contains("config reload rejected"),
        )
    });
    client.simple_query("SELECT 1").await.unwrap();
    let (again, _c2) = connect(&env, None, "ci-bot", Some(TOKEN))
        .await
        .expect("the token still works after a rejected reload");
    again.simple_query("SELECT 1").await.unwrap();
    drop(again);

    // The token is removed: its running session ends, new connections are refused.
    let without = original.replace(
        &format!(
            "[[identity.tokens]]\nsubject = \"ci-bot\"\nsha256 = \"{}\"\ngroups = [\"ci\"]\n",
            sha256_hex(TOKEN)
        ),
        "",
    );
    assert_ne!(without, original);
    let query = long_query(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&env.gw.config_path, without).unwrap();
    hup();
    let (code, message, _) = ended_with(query, Duration::from_secs(15)).await;
    assert_eq!(
        code,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "{message}"
    );
    assert!(message.contains("token"), "{message}");
    assert!(!message.contains(TOKEN));
    terminated(&env, "token_removed");

    let err = connect(&env, None, "ci-bot", Some(TOKEN))
        .await
        .err()
        .expect("a removed token was accepted");
    assert_eq!(
        err.as_db_error().map(|e| e.code().clone()),
        Some(SqlState::INVALID_PASSWORD),
        "{err:?}"
    );
}

/// The gateway with an HTTPS API (alice, `sre`, is an admin who may approve) and an e-mail
/// mask on "app"; `cli(who, args)` runs a `tollgate` API command as `who`.
async fn grant_env() -> (Env, u16) {
    let https = tollgate_testsupport::free_port();
    let env = tokio::task::spawn_blocking(move || {
        Env::start_with(EnvOptions {
            server_extra: format!(
                "https_listen = \"127.0.0.1:{https}\"\n\n[roles]\nadmin_groups = [\"sre\"]\n"
            ),
            resource_extra: "[[resources.masks]]\ncolumns = [\"email\"]\nstrategy = \"redact\"\n"
                .into(),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    (env, https)
}

fn cli(env: &Env, https: u16, who: &IssuedFiles, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env("TOLLGATE_GATEWAY", format!("https://localhost:{https}"))
        .env("TOLLGATE_CA", &env.pki.ca)
        .arg("--cert")
        .arg(&who.cert)
        .arg("--key")
        .arg(&who.key)
        .output()
        .unwrap()
}

/// `who` asks for a grant (`extra`: e.g. `--unmask`) for `for_`, alice approves; the review id.
fn approved_grant(env: &Env, https: u16, who: &IssuedFiles, for_: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "access", "request", "app", "--for", for_, "--reason", "INC-7", "--json",
    ];
    args.extend_from_slice(extra);
    let out = cli(env, https, who, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = review["id"].as_str().unwrap().to_string();
    let out = cli(
        env,
        https,
        &env.alice,
        &["reviews", "approve", &id, "--reason", "ok"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reached_through_an_access_grant_ends_when_the_grant_ends() {
    let (env, https) = grant_env().await;
    // carol is in no allowed group: she reaches "app" only through an approved access review.
    let carol = env.pki.client("carol", &["interns"]);
    assert!(connect(&env, Some(&carol), "carol", None).await.is_err());
    let id = approved_grant(&env, https, &carol, "6s", &[]);

    let (client, _c) = connect(&env, Some(&carol), "carol", None)
        .await
        .expect("the grant lets carol in");
    client.simple_query("SELECT 1").await.unwrap();
    let (code, message, hint) = ended_with(long_query(client), Duration::from_secs(20)).await;
    assert_eq!(code, SqlState::ADMIN_SHUTDOWN, "{message}");
    assert!(message.contains("temporary access"), "{message}");
    assert!(message.contains(&id), "{message}");
    assert!(hint.contains("tollgate access request app"), "{hint}");
    let (t, _) = terminated(&env, "access_grant_ended");
    assert_eq!(t["payload"]["detail"]["review"], id.as_str());
    // And she cannot come back.
    assert!(connect(&env, Some(&carol), "carol", None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmasked_session_ends_when_its_unmask_grant_ends() {
    let (env, https) = grant_env().await;
    // bob may reach "app" (group ci) but sees it masked unless an unmask review is approved.
    let bob = env.pki.client("bob", &["ci"]);
    let id = approved_grant(&env, https, &bob, "6s", &["--unmask"]);
    let (client, _c) = connect(&env, Some(&bob), "bob", None).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let (code, message, _) = ended_with(long_query(client), Duration::from_secs(20)).await;
    assert_eq!(code, SqlState::ADMIN_SHUTDOWN, "{message}");
    assert!(message.contains("unmasked view"), "{message}");
    let (t, _) = terminated(&env, "unmask_grant_ended");
    assert_eq!(t["payload"]["detail"]["review"], id.as_str());
    // A new session is masked again, and allowed.
    let (again, _c) = connect(&env, Some(&bob), "bob", None).await.unwrap();
    again.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_access_grant_ends_its_sessions_at_once() {
    let (env, https) = grant_env().await;
    let carol = env.pki.client("carol", &["interns"]);
    let id = approved_grant(&env, https, &carol, "1h", &[]);
    let (client, _c) = connect(&env, Some(&carol), "carol", None)
        .await
        .expect("the grant lets carol in");
    client.simple_query("SELECT 1").await.unwrap();
    let query = long_query(client);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Someone who neither approved nor asked for the grant may not revoke it.
    let mallory = env.pki.client("mallory", &["interns"]);
    let out = cli(
        &env,
        https,
        &mallory,
        &["reviews", "revoke", &id, "--reason", "x"],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    let started = Instant::now();
    let out = cli(
        &env,
        https,
        &env.alice,
        &["reviews", "revoke", &id, "--reason", "INC-7 closed"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, message, _) = ended_with(query, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(code, SqlState::ADMIN_SHUTDOWN, "{message}");
    assert!(message.contains("was revoked"), "{message}");
    terminated(&env, "access_grant_revoked");
    let evs = env.events();
    let revoked = evs
        .iter()
        .find(|e| e["kind"] == "review.revoked")
        .expect("a review.revoked event");
    assert_eq!(revoked["payload"]["review"], id.as_str());
    assert_eq!(revoked["payload"]["revoked_by"], "alice");
    assert_eq!(revoked["payload"]["reason"], "INC-7 closed");
    assert!(connect(&env, Some(&carol), "carol", None).await.is_err());
}
