//! Pooled upstream connections (`pool_mode`): a session's connection reused by the next client
//! after `DISCARD ALL`; many clients on a few connections between transactions, each still with
//! its own identity, guardrails, holds, prepared statements, settings, cancel key and audit
//! session.

mod common;
use common::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

fn env(resource_extra: &str) -> Env {
    Env::start_with(EnvOptions {
        resource_extra: resource_extra.into(),
        ..Default::default()
    })
}

async fn start(resource_extra: &'static str) -> Env {
    tokio::task::spawn_blocking(move || env(resource_extra))
        .await
        .unwrap()
}

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn first_value(c: &tokio_postgres::Client, sql: &str) -> Option<String> {
    c.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

fn refused(err: tokio_postgres::Error) -> (SqlState, String) {
    let db = err.as_db_error().expect("a server error");
    (db.code().clone(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_reuses_a_connection_after_discard_all() {
    let env = start("pool_mode = \"session\"\npool_idle_timeout = \"1m\"").await;
    let c1 = env.client().await;
    let first = pid(&c1).await;
    c1.batch_execute("CREATE TEMP TABLE scratch (a int); SET work_mem = '7MB'")
        .await
        .unwrap();
    assert_eq!(
        first_value(&c1, "SHOW work_mem").await.as_deref(),
        Some("7MB")
    );
    drop(c1);
    // The connection is reset and parked once the session has ended.
    wait_for(Duration::from_secs(10), "a parked connection", || {
        env.gw
            .metric("tollgate_pool_connections{resource=\"app\",state=\"idle\"}")
            == Some(1)
    });

    let c2 = env.client().await;
    assert_eq!(
        pid(&c2).await,
        first,
        "the second session reuses the connection"
    );
    assert_ne!(
        first_value(&c2, "SHOW work_mem").await.as_deref(),
        Some("7MB")
    );
    assert_eq!(
        first_value(&c2, "SELECT to_regclass('pg_temp.scratch')::text").await,
        None,
        "the first session's temporary table is gone"
    );
    // A session that ends inside a transaction leaves a connection no one may inherit.
    c2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    drop(c2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c3 = env.client().await;
    assert_ne!(
        pid(&c3).await,
        first,
        "a dirty connection is closed, not reused"
    );
    let metrics = env.gw.metrics();
    assert!(
        metrics.contains("tollgate_pool_checkouts_total{resource=\"app\",outcome=\"reused\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_two_connections_between_transactions() {
    let env = start("pool_mode = \"transaction\"\npool_size = 2\npool_timeout = \"60s\"").await;
    let setup = env.client().await;
    setup
        .batch_execute("CREATE TABLE hits (client int, n int)")
        .await
        .unwrap();
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(env.client().await);
    }
    let pids: Vec<Vec<i32>> = futures_util::future::join_all(clients.iter().enumerate().map(
        |(i, c)| async move {
            let i = i as i32;
            let mut seen = Vec::new();
            for n in 0..3 {
                // A simple query, a transaction, an extended-protocol query with parameters.
                seen.push(
                    first_value(c, "SELECT pg_backend_pid()")
                        .await
                        .unwrap()
                        .parse()
                        .unwrap(),
                );
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO hits VALUES ({i}, {n}); INSERT INTO hits VALUES ({i}, {n}); COMMIT"
                ))
                .await
                .unwrap();
                let row = c
                    .query_one(
                        "SELECT count(*)::int, pg_backend_pid() FROM hits WHERE client = $1",
                        &[&i],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), 2 * (n + 1));
                seen.push(row.get(1));
            }
            seen
        },
    ))
    .await;
    let distinct: HashSet<i32> = pids.into_iter().flatten().collect();
    assert!(distinct.len() <= 2, "{distinct:?}");
    // Every client is between transactions: no connection stays leased (once the Close and
    // Sync tokio-postgres sends, unawaited, for each dropped statement are answered).
    env.wait_pool_idle();
    assert!(
        env.gateway_backends() <= 2,
        "at most pool_size upstream connections"
    );
    assert_eq!(
        first_value(&setup, "SELECT count(*) FROM hits")
            .await
            .as_deref(),
        Some("300")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_refuses_session_state_and_keeps_guardrails() {
    let env = start(
        r#"pool_mode = "transaction"
pool_size = 2
[[resources.rules]]
statements = ["drop"]
action = "deny"
message = "no drops here"
"#,
    )
    .await;
    let c = env.client().await;
    for sql in [
        "SET ROLE alice",
        "SET SESSION AUTHORIZATION alice",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET standard_conforming_strings = off",
        "SET client_encoding = 'LATIN1'",
        "SET work_mem = '1MB'; SET search_path = public",
        "LISTEN jobs",
        "SELECT pg_advisory_lock(7)",
        "CREATE TEMP TABLE t (a int)",
        "PREPARE p AS SELECT 1",
        "BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        // Hidden behind another statement, a comment, odd case or an escaped name.
        "SELECT 1; /* x */ sEt work_mem = '1MB'",
        "SELECT set_config('work_mem', '1MB', false)",
        "SELECT U&\"pg_\\0061dvisory_lock\"(7)",
        "CREATE TABLE pg_temp.t (a int)",
    ] {
        let (code, message) = refused(c.batch_execute(sql).await.unwrap_err());
        assert_eq!(code, SqlState::FEATURE_NOT_SUPPORTED, "{sql}: {message}");
        assert!(
            message.contains("pool_mode = \"transaction\""),
            "{sql}: {message}"
        );
    }
    // The same through the extended protocol (refused at its Parse).
    let (code, message) = refused(c.query("SET ROLE alice", &[]).await.unwrap_err());
    assert_eq!(code, SqlState::FEATURE_NOT_SUPPORTED, "{message}");
    assert!(message.contains("session-level SET"), "{message}");
    // What lasts only for a transaction is fine.
    c.batch_execute("BEGIN; SET LOCAL work_mem = '9MB'; SELECT set_config('app.user', 'x', true); SELECT pg_advisory_xact_lock(7); COMMIT")
        .await
        .unwrap();
    // Guardrails still decide per client.
    let (code, message) = refused(c.batch_execute("DROP TABLE nothing").await.unwrap_err());
    assert_eq!(code, SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(message.contains("no drops here"), "{message}");
    assert_eq!(
        first_value(&c, "SELECT 41 + 1").await.as_deref(),
        Some("42")
    );
    // Nothing of it reached either connection: another client sees the defaults.
    let other = env.client().await;
    for _ in 0..4 {
        let (unchanged, locks) = tokio::join!(
            first_value(
                &other,
                "SELECT setting = reset_val FROM pg_settings WHERE name = 'work_mem'"
            ),
            first_value(
                &c,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            )
        );
        assert_eq!(unchanged.as_deref(), Some("t"));
        assert_eq!(locks.as_deref(), Some("0"));
    }
}

async fn show(c: &tokio_postgres::Client, setting: &str) -> String {
    first_value(c, &format!("SHOW {setting}"))
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_are_carried_between_clients_on_one_connection() {
    let env = start("pool_mode = \"transaction\"\npool_size = 1").await;
    let a = env.client().await;
    let b = env.client().await;
    let (style, zone, digits) = (
        show(&b, "DateStyle").await,
        show(&b, "TimeZone").await,
        show(&b, "extra_float_digits").await,
    );
    assert_ne!(style, "SQL, DMY");
    a.batch_execute("SET DateStyle = 'SQL, DMY'").await.unwrap();
    // Through the extended protocol too (as pgjdbc, node-pg and psycopg send it).
    a.execute("SET TimeZone TO 'Asia/Tokyo'", &[])
        .await
        .unwrap();
    a.execute("set session extra_float_digits = 1", &[])
        .await
        .unwrap();
    let date = "SELECT '2024-03-01 12:00+00'::timestamptz::text";
    for round in 0..3 {
        // One connection serves both, each sees its own settings every time.
        assert_eq!(pid(&a).await, pid(&b).await, "round {round}");
        assert_eq!(show(&a, "DateStyle").await, "SQL, DMY", "round {round}");
        assert_eq!(
            first_value(&a, date).await.as_deref(),
            Some("01/03/2024 21:00:00 JST")
        );
        assert_eq!(show(&a, "extra_float_digits").await, "1");
        assert_eq!(show(&b, "DateStyle").await, style, "round {round}");
        assert_eq!(show(&b, "TimeZone").await, zone, "round {round}");
        assert_eq!(show(&b, "extra_float_digits").await, digits);
        let shown = first_value(&b, "SELECT current_setting('TimeZone')").await;
        assert_eq!(shown.as_deref(), Some(zone.as_str()));
    }
    // A SET the server refuses is the server's error and changes nothing.
    let err = a
        .batch_execute("SET DateStyle = 'bogus'")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
    assert_eq!(show(&b, "DateStyle").await, style);
    assert_eq!(show(&a, "DateStyle").await, "SQL, DMY");
    // RESET name, SET name TO DEFAULT, RESET ALL.
    a.batch_execute("RESET DateStyle").await.unwrap();
    assert_eq!(show(&b, "extra_float_digits").await, digits);
    assert_eq!(show(&a, "DateStyle").await, style);
    assert_eq!(show(&a, "TimeZone").await, "Asia/Tokyo");
    a.execute("SET TimeZone TO DEFAULT", &[]).await.unwrap();
    assert_eq!(show(&b, "DateStyle").await, style);
    assert_eq!(show(&a, "TimeZone").await, zone);
    assert_eq!(show(&a, "extra_float_digits").await, "1");
    a.batch_execute("SET search_path = 'my schema', public")
        .await
        .unwrap();
    assert_eq!(show(&b, "DateStyle").await, style);
    assert_eq!(show(&a, "search_path").await, "\"my schema\", public");
    a.batch_execute("RESET ALL").await.unwrap();
    for c in [&a, &b] {
        assert_eq!(show(c, "extra_float_digits").await, digits);
        assert_eq!(show(c, "search_path").await, "\"$user\", public");
    }
    // Inside a transaction block a session-level SET is refused (the server would keep or undo
    // it at COMMIT or ROLLBACK); SET LOCAL is the way.
    a.batch_execute("BEGIN").await.unwrap();
    let (code, message) = refused(a.batch_execute("SET work_mem = '3MB'").await.unwrap_err());
    assert_eq!(code, SqlState::FEATURE_NOT_SUPPORTED, "{message}");
    assert!(
        message.contains("transaction block") && message.contains("pool_mode = \"transaction\""),
        "{message}"
    );
    a.batch_execute("ROLLBACK; BEGIN").await.unwrap();
    let (code, _) = refused(a.execute("RESET ALL", &[]).await.unwrap_err());
    assert_eq!(code, SqlState::FEATURE_NOT_SUPPORTED);
    a.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("SET work_mem = '5MB'").await.unwrap();
    assert_ne!(show(&b, "work_mem").await, "5MB");
    assert_eq!(show(&a, "work_mem").await, "5MB");
    // SET ROLE still is refused, saying why.
    let (code, message) = refused(a.batch_execute("SET ROLE alice").await.unwrap_err());
    assert_eq!(code, SqlState::FEATURE_NOT_SUPPORTED);
    assert!(message.contains("pool_mode"), "{message}");
    assert_eq!(pid(&a).await, pid(&b).await);
    // A driver pool's reset among other statements (asyncpg's) is followed too.
    a.batch_execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
        .await
        .unwrap();
    assert_eq!(show(&b, "work_mem").await, show(&a, "work_mem").await);
    assert_ne!(show(&a, "work_mem").await, "5MB");
    // A prepared SET run inside a transaction block may be kept or undone by its end: the
    // session's settings are unknown, and it ends (saying why) before its next transaction.
    let set = a.prepare("SET work_mem = '6MB'").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(&set, &[]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let err = a.batch_execute("SELECT 1").await.unwrap_err();
    let db = err.as_db_error().expect("a FATAL from the gateway");
    assert_eq!(db.code(), &SqlState::FEATURE_NOT_SUPPORTED);
    assert!(db.message().contains("pool_mode"), "{}", db.message());
    // Its connection was closed, not handed on with a setting no one tracks.
    assert_ne!(show(&b, "work_mem").await, "6MB");
    env.wait_pool_idle();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_are_prepared_again_on_another_connection() {
    let env = start("pool_mode = \"transaction\"\npool_size = 2").await;
    let a = env.client().await;
    let b = env.client().await;
    let stmt = a
        .prepare("SELECT $1::int * 2, pg_backend_pid()")
        .await
        .unwrap();
    let row = a.query_one(&stmt, &[&21i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let prepared_on: i32 = row.get(1);
    // b holds that connection in a transaction: a's next execution runs on the other one.
    b.batch_execute("BEGIN").await.unwrap();
    let held = pid(&b).await;
    let row = a.query_one(&stmt, &[&5i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 10);
    let elsewhere: i32 = row.get(1);
    assert_ne!(elsewhere, held, "a ran on a connection b holds");
    b.batch_execute("COMMIT").await.unwrap();
    // Both connections now know the statement; unnamed statements (query_typed) work too.
    for i in 0..10i32 {
        let row = a.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 2 * i);
        let row = a
            .query_typed(
                "SELECT $1::text || '!'",
                &[(&"hi", tokio_postgres::types::Type::TEXT)],
            )
            .await
            .unwrap();
        assert_eq!(row[0].get::<_, String>(0), "hi!");
    }
    let _ = prepared_on;
    // Closing the statement is the client's business only; b can prepare the same text.
    drop(stmt);
    let s2 = b
        .prepare("SELECT $1::int * 2, pg_backend_pid()")
        .await
        .unwrap();
    assert_eq!(
        b.query_one(&s2, &[&4i32]).await.unwrap().get::<_, i32>(0),
        8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_connection_running_the_clients_query() {
    let env = start("pool_mode = \"transaction\"\npool_size = 2").await;
    let a = env.client().await;
    let b = env.client().await;
    // b keeps one connection in a transaction, and runs a short sleep on it later.
    b.batch_execute("BEGIN").await.unwrap();
    let token = a.cancel_token();
    let slow = tokio::spawn(async move {
        let r = a.simple_query("SELECT pg_sleep(30)").await;
        (r, a)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    token
        .cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(
            &env.pki.ca,
            Some(&env.alice),
        )))
        .await
        .unwrap();
    let (r, a) = slow.await.unwrap();
    let (code, _) = refused(r.unwrap_err());
    assert_eq!(code, SqlState::QUERY_CANCELED);
    assert!(started.elapsed() < Duration::from_secs(10));
    // b's transaction was not touched, and a goes on.
    b.batch_execute("SELECT pg_sleep(0.1); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        first_value(&a, "SELECT 'after'").await.as_deref(),
        Some("after")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_statement_does_not_keep_a_connection_and_audit_stays_per_client() {
    let env = start(
        r#"pool_mode = "transaction"
pool_size = 1
review_timeout = "4s"
[[resources.rules]]
statements = ["delete"]
action = "review"
approvers = ["sre"]
"#,
    )
    .await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("CREATE TABLE IF NOT EXISTS gone (a int)")
        .await
        .unwrap();
    let held = tokio::spawn(async move {
        let r = a.batch_execute("DELETE FROM gone").await;
        (r, a)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // With one connection in the pool, b runs while a's DELETE waits for its review.
    let started = Instant::now();
    assert_eq!(
        first_value(&b, "SELECT 'b ran'").await.as_deref(),
        Some("b ran")
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!held.is_finished(), "a's DELETE is still held");
    let (r, a) = held.await.unwrap();
    assert!(r.is_err(), "the review timed out");
    assert_eq!(
        first_value(&a, "SELECT 'a ran'").await.as_deref(),
        Some("a ran")
    );
    drop((a, b));
    let events = tokio::task::spawn_blocking(move || {
        let evs = env.events_after_closes(2);
        drop(env);
        evs
    })
    .await
    .unwrap();
    let session_of = |text: &str| {
        events
            .iter()
            .find(|e| e["kind"] == "command" && e["payload"]["text"] == text)
            .unwrap_or_else(|| panic!("no command event for {text}"))["session_id"]
            .clone()
    };
    let (sa, sb) = (session_of("SELECT 'a ran'"), session_of("SELECT 'b ran'"));
    assert_ne!(sa, sb);
    assert_eq!(session_of("DELETE FROM gone"), sa);
    for s in [&sa, &sb] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "session.open" && &e["session_id"] == s),
            "session {s} was opened"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_tls_clients_on_ten_connections() {
    let env = tokio::task::spawn_blocking(|| {
        Env::start_with(EnvOptions {
            resource_extra: "pool_mode = \"transaction\"\npool_size = 10\npool_timeout = \"50s\""
                .into(),
            // 2,000 handshakes at once on two shared cores: each may wait its turn.
            server_extra: "handshake_timeout = \"60s\"".into(),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let started = Instant::now();
    let cfg = client_tls(&env.pki.ca, Some(&env.alice));
    let conninfo = format!(
        "host=localhost port={} dbname=app user=alice sslmode=require connect_timeout=30",
        env.gw.pg_port
    );
    let mut connecting = Vec::new();
    for _ in 0..2000 {
        let (cfg, conninfo) = (cfg.clone(), conninfo.clone());
        connecting.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(
                &conninfo,
                tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
            )
            .await
            .expect("connect");
            tokio::spawn(conn);
            client
        }));
    }
    let mut clients = Vec::new();
    for c in connecting {
        clients.push(c.await.unwrap());
    }
    let connected = started.elapsed();
    let results =
        futures_util::future::join_all(clients.iter().enumerate().map(|(i, c)| async move {
            c.query_one("SELECT $1::int + 1", &[&(i as i32)])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }))
        .await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(*r, i as i32 + 1);
    }
    assert!(env.gateway_backends() <= 10);
    eprintln!(
        "2000 TLS clients: connected in {connected:?}, all queried in {:?}, gateway RSS {:?} KiB",
        started.elapsed(),
        rss_kib(env.gw.pid())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_past_pool_timeout_and_clients_over_max_client_conn_are_told_why() {
    let env = start(
        "pool_mode = \"transaction\"\npool_size = 1\npool_timeout = \"1s\"\nmax_client_conn = 2",
    )
    .await;
    let a = env.client().await;
    let b = env.client().await;
    // A third client of the resource is refused at start-up.
    let cfg = client_tls(&env.pki.ca, Some(&env.alice));
    let conninfo = format!(
        "host=localhost port={} dbname=app user=alice sslmode=require",
        env.gw.pg_port
    );
    let err = match tokio_postgres::connect(
        &conninfo,
        tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
    )
    .await
    {
        Ok(_) => panic!("a third client got in past max_client_conn = 2"),
        Err(e) => e,
    };
    let (code, message) = refused(err);
    assert_eq!(code, SqlState::TOO_MANY_CONNECTIONS);
    assert!(message.contains("max_client_conn"), "{message}");
    // a holds the only connection; b waits for it no longer than pool_timeout.
    a.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let (code, message) = refused(b.batch_execute("SELECT 1").await.unwrap_err());
    assert_eq!(code, SqlState::TOO_MANY_CONNECTIONS, "{message}");
    assert!(message.contains("pool_size = 1"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // a's transaction is unharmed.
    a.batch_execute("COMMIT").await.unwrap();
    assert!(env
        .gw
        .metrics()
        .contains("tollgate_pool_checkouts_total{resource=\"app\",outcome=\"timeout\"} 1"));
}

/// pgbench's TPC-B-like transactions in every query mode (`prepared` prepares named statements
/// once per connection, then only binds them) on a transaction-pooled resource.
#[test]
fn pgbench_in_every_query_mode_through_a_transaction_pool() {
    use std::process::{Command, Stdio};
    // Nine clients on two connections, beside the other tests on two shared cores: a client
    // may wait a while for its turn.
    let env = env("pool_mode = \"transaction\"\npool_size = 2\npool_timeout = \"60s\"");
    env.pgbench_init();
    let runs: Vec<_> = ["simple", "extended", "prepared"]
        .into_iter()
        .map(|mode| {
            let child = Command::new("pgbench")
                // One thread per client: in prepared mode pgbench prepares each statement
                // synchronously, which would stall a thread's other clients while they hold
                // both connections in their transactions (with any pooler).
                .args(["-n", "-t", "40", "-c", "3", "-j", "3", "-M", mode])
                .arg(env.conninfo("app"))
                .env_remove("PGPASSWORD")
                .env_remove("PGSSLMODE")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("pgbench");
            (mode, child)
        })
        .collect();
    for (mode, child) in runs {
        let out = child.wait_with_output().unwrap();
        let text = stdout(&out);
        assert!(out.status.success(), "-M {mode}: {text}\n{}", stderr(&out));
        assert!(
            text.contains("number of transactions actually processed: 120/120"),
            "-M {mode}: {text}"
        );
    }
    assert!(env.gateway_backends() <= 2);
    env.wait_pool_idle();
    let out = env.psql(
        &env.conninfo("app"),
        &["-c", "SELECT count(*) FROM pgbench_history"],
    );
    assert_eq!(stdout(&out), "360");
}

/// `pgbench -C` (a new client connection per transaction) on a session-pooled resource: the
/// upstream connections are reused, not opened per client.
#[test]
fn pgbench_connect_per_transaction_reuses_upstream_sessions() {
    use std::process::Command;
    let env = env("pool_mode = \"session\"");
    env.pgbench_init();
    let out = Command::new("pgbench")
        .args(["-n", "-S", "-C", "-t", "50", "-c", "2"])
        .arg(env.conninfo("app"))
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .output()
        .expect("pgbench");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("number of transactions actually processed: 100/100"),
        "{text}"
    );
    let series = |outcome: &str| {
        env.gw
            .metric(&format!(
                "tollgate_pool_checkouts_total{{resource=\"app\",outcome=\"{outcome}\"}}"
            ))
            .unwrap_or(0)
    };
    let (reused, opened) = (series("reused"), series("opened"));
    assert!(
        reused > opened,
        "100 client connections: {reused} reused, {opened} opened upstream"
    );
}

/// `reserve_pool`: a client that waited `reserve_pool_timeout` for one of the `pool_size`
/// connections gets an extra one, up to `reserve_pool` of them; past those it waits out
/// `pool_timeout` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waited_reserve_pool_timeout_gets_a_reserve_connection() {
    let env = start(
        "pool_mode = \"transaction\"\npool_size = 1\nreserve_pool = 1\nreserve_pool_timeout = \"700ms\"\npool_timeout = \"3s\"",
    )
    .await;
    let (a, b, c) = (env.client().await, env.client().await, env.client().await);
    a.batch_execute("BEGIN").await.unwrap();
    let held = pid(&a).await;
    let started = Instant::now();
    b.batch_execute("BEGIN").await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(2500),
        "b waited {waited:?} for its reserve connection"
    );
    assert_ne!(pid(&b).await, held, "b runs on a connection of its own");
    // Both places taken: c waits out pool_timeout.
    let (code, message) = refused(c.batch_execute("SELECT 1").await.unwrap_err());
    assert_eq!(code, SqlState::TOO_MANY_CONNECTIONS, "{message}");
    assert!(message.contains("pool_size = 1"), "{message}");
    b.batch_execute("COMMIT").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        env.gw
            .metric("tollgate_pool_reserve_leases_total{resource=\"app\"}"),
        Some(1)
    );
    assert!(env.gateway_backends() <= 2);
    // Without a wait no reserve connection is used.
    assert_eq!(
        first_value(&b, "SELECT 'quick'").await.as_deref(),
        Some("quick")
    );
    assert_eq!(
        env.gw
            .metric("tollgate_pool_reserve_leases_total{resource=\"app\"}"),
        Some(1)
    );
}
