//! Flood resistance: connection caps answered with 53300, a handshake timeout for silent
//! connections, and unauthenticated connects recorded in aggregate rather than one audit
//! session each.

mod common;
use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tollgate_tls::pki::IssuedFiles;

async fn connect(
    env: &Env,
    who: &IssuedFiles,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let cfg = client_tls(&env.pki.ca, Some(who));
    let conninfo = format!(
        "host=localhost port={} dbname=app user={user} sslmode=require connect_timeout=10",
        env.gw.pg_port
    );
    let (client, conn) = tokio_postgres::connect(
        &conninfo,
        tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connect, retrying while the gateway is still releasing the place of a connection that just
/// ended (the client learns of the end before the gateway has counted it).
async fn connect_eventually(env: &Env, who: &IssuedFiles, user: &str) -> tokio_postgres::Client {
    let mut last = None;
    for _ in 0..50 {
        match connect(env, who, user).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not connect: {last:?}");
}

fn too_many(err: tokio_postgres::Error, what: &str) -> String {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: not a server error: {err:?}"));
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{what}: {db:?}");
    assert_eq!(db.severity(), "FATAL");
    db.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_per_source_and_identity_refuse_with_53300() {
    let env = tokio::task::spawn_blocking(|| {
        Env::start_with(EnvOptions {
            server_extra: "max_connections_per_source = 3\nmax_connections_per_identity = 2\n"
                .into(),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let bob = env.pki.client("bob", &["sre"]);
    let a1 = connect(&env, &env.alice, "alice").await.unwrap();
    let _a2 = connect(&env, &env.alice, "alice").await.unwrap();
    // Alice's third session is over the per-identity cap.
    let msg = too_many(
        connect(&env, &env.alice, "alice")
            .await
            .err()
            .expect("third alice session"),
        "per identity",
    );
    assert!(msg.contains("max_connections_per_identity"), "{msg}");
    // Bob's first is the third connection from this address; his second is over that cap.
    let b1 = connect_eventually(&env, &bob, "bob").await;
    let msg = too_many(
        connect(&env, &bob, "bob")
            .await
            .err()
            .expect("fourth connection from 127.0.0.1"),
        "per source",
    );
    assert!(msg.contains("max_connections_per_source"), "{msg}");
    b1.simple_query("SELECT 1").await.unwrap();

    // Closing one frees its place.
    drop(a1);
    let again = connect_eventually(&env, &bob, "bob").await;
    again.simple_query("SELECT 1").await.unwrap();

    let gw = &env.gw;
    for reason in ["max_connections_per_source", "max_connections_per_identity"] {
        let series = format!(
            "tollgate_connections_refused_total{{listener=\"postgres\",reason=\"{reason}\"}}"
        );
        tokio::task::block_in_place(|| {
            wait_for(Duration::from_secs(5), &series, || {
                gw.metric(&series).is_some_and(|n| n >= 1)
            })
        });
    }
    // Refusals are aggregated, not recorded as sessions.
    let evs = tokio::task::block_in_place(|| {
        env.events_until("the refusal summaries", |evs| {
            refused_count(evs, "max_connections_per_source") >= 1
                && refused_count(evs, "max_connections_per_identity") >= 1
        })
    });
    assert!(
        !evs.iter()
            .any(|e| e["kind"] == "session.close" && e["payload"]["outcome"] == "rejected"),
        "{evs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_plaintext_and_garbage_connects_is_recorded_in_aggregate() {
    let env = tokio::task::spawn_blocking(Env::start).await.unwrap();
    const N: usize = 2000;
    let port = env.gw.pg_port;
    let mut startup = Vec::new();
    let body = b"\0\x03\0\0user\0mallory\0database\0app\0\0";
    startup.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    startup.extend_from_slice(body);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let startup = startup.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            // Half send a plaintext start-up, half garbage.
            let bytes: &[u8] = if i % 2 == 0 {
                &startup
            } else {
                b"GET / HTTP/1.1\r\n\r\n"
            };
            let _ = s.write_all(bytes).await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
            buf
        }));
    }
    let mut explained = 0;
    for t in tasks {
        let answer = t.await.unwrap();
        if answer.first() == Some(&b'E') {
            explained += 1;
        }
    }
    assert_eq!(explained, N, "every refused connect gets an ErrorResponse");

    let evs = tokio::task::block_in_place(|| {
        env.events_until("the aggregate of 2000 refusals", |evs| {
            refused_count(evs, "plaintext") + refused_count(evs, "protocol") >= N as u64
        })
    });
    assert_eq!(refused_count(&evs, "plaintext"), (N / 2) as u64);
    assert_eq!(refused_count(&evs, "protocol"), (N / 2) as u64);
    // A handful of summary events, no session per connect.
    let summaries = evs
        .iter()
        .filter(|e| e["kind"] == "connection.refused")
        .count();
    assert!(summaries <= 20, "{summaries} summary events");
    assert!(
        !evs.iter().any(|e| e["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("session."))),
        "a refused connect was recorded as a session"
    );
    assert_eq!(
        env.gw.metric(
            "tollgate_connections_refused_total{listener=\"postgres\",reason=\"plaintext\"}"
        ),
        Some((N / 2) as i64)
    );
    // Legitimate clients are unaffected.
    let c = connect(&env, &env.alice, "alice").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_timeout_closes_silent_connections() {
    let env = tokio::task::spawn_blocking(|| {
        Env::start_with(EnvOptions {
            server_extra: "handshake_timeout = \"1s\"\n".into(),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let port = env.gw.pg_port;
    // Silent after the TCP connect.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the gateway kept a silent connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));

    // An SSLRequest, then silence in the middle of the TLS handshake: the same deadline.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"S");
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the gateway kept a stalled handshake open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));

    let evs = tokio::task::block_in_place(|| {
        env.events_until("the timeout summary", |evs| {
            refused_count(evs, "handshake_timeout") >= 2
        })
    });
    assert!(!evs.iter().any(|e| e["kind"] == "session.open"));
    // A client that does its handshake in time is served.
    let c = connect(&env, &env.alice, "alice").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}
