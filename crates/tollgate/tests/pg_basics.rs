//! The PostgreSQL data path with real clients: psql and tokio-postgres through the gateway,
//! client certificate and token identities, and what the audit trail records about it.

mod common;
use common::*;

#[test]
fn psql_with_client_certificate_and_with_token() {
    let env = Env::start();
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT current_user, ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE pid = pg_backend_pid()"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The upstream user is the resource's, and the upstream leg is TLS.
    assert_eq!(stdout(&out), format!("{}|t", env.pg.user));

    let out = psql_env(
        &env.conninfo_token("app"),
        &["-c", "SELECT 40 + 2"],
        &[("PGPASSWORD", TOKEN)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42");

    let events = env.events_after_closes(2);
    let opens: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "session.open")
        .map(|e| &e["payload"])
        .collect();
    assert_eq!(opens.len(), 2, "{events:#?}");
    assert_eq!(opens[0]["subject"], "alice");
    assert_eq!(opens[0]["auth_method"], "cert");
    assert_eq!(opens[0]["resource"], "app");
    assert_eq!(opens[0]["client_tls"]["version"], "TLSv1.3");
    assert_eq!(opens[0]["upstream_tls"]["version"], "TLSv1.3");
    assert!(opens[0]["client_cert_fingerprint"]
        .as_str()
        .is_some_and(|f| f.len() == 64));
    assert_eq!(opens[1]["subject"], "ci-bot");
    assert_eq!(opens[1]["auth_method"], "token");
    let texts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "command")
        .map(|e| {
            e["payload"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(texts.iter().any(|t| t == "SELECT 40 + 2"), "{texts:?}");
    // The token itself never reaches the audit trail.
    assert!(!serde_json::to_string(&events).unwrap().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_text_and_binary() {
    let env = tokio::task::spawn_blocking(Env::start).await.unwrap();
    let c = env.client().await;
    // Text (simple protocol).
    let rows = c
        .simple_query("SELECT 'a'::text AS x, 2::int AS y")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(row.get("x"), Some("a"));
    assert_eq!(row.get("y"), Some("2"));
    // Binary results and parameters (extended protocol).
    let row = c
        .query_one(
            "SELECT $1::int8 * 2, $2::text || '!', now() > '2000-01-01'::timestamptz, $3::bytea",
            &[&21i64, &"hi", &vec![0u8, 1, 2]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, Vec<u8>>(3), vec![0u8, 1, 2]);
    drop(c);
    let events = tokio::task::spawn_blocking(move || env.events_after_closes(1))
        .await
        .unwrap();
    let cmd = events
        .iter()
        .find(|e| {
            e["kind"] == "command"
                && e["payload"]["protocol"] == "extended"
                && e["payload"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("$1::int8")
        })
        .expect("extended command event");
    assert_eq!(
        cmd["payload"]["params"],
        serde_json::json!(["<binary 8 bytes>", "<binary 2 bytes>", "<binary 3 bytes>"])
    );
    let result = events
        .iter()
        .find(|e| {
            e["kind"] == "result"
                && e["payload"]["n"] == cmd["payload"]["n"]
                && e["session_id"] == cmd["session_id"]
        })
        .expect("result event");
    assert_eq!(result["payload"]["outcome"], "ok");
    assert_eq!(result["payload"]["rows"], 1);
}
