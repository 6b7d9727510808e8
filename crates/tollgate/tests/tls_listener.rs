//! The PostgreSQL listener's TLS behaviour with real clients against the real `tollgate serve`:
//! client certificates from another CA or expired are refused, plaintext and TLS 1.1 are refused
//! with a reason, certificates hot-reload without dropping sessions, and every refusal is counted
//! and recorded.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tollgate_tls::pki::{self, IssuedFiles};

/// SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Connect and negotiate TLS the PostgreSQL way: SSLRequest, then the 'S' answer.
async fn ssl_request(port: u16) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S', "the gateway must accept an SSLRequest");
    tcp
}

/// A TLS session to the gateway as a PostgreSQL client opens it, trusting `ca`.
async fn tls_connect(
    port: u16,
    ca: &Path,
    who: Option<&IssuedFiles>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = ssl_request(port).await;
    let connector = tokio_rustls::TlsConnector::from(client_tls_arc(ca, who));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
}

/// SHA-256 of the leaf certificate the gateway presents to a new client.
async fn served_fingerprint(port: u16, ca: &Path) -> String {
    let tls = tls_connect(port, ca, None)
        .await
        .expect("TLS handshake with the gateway");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tollgate_tls::cert_fingerprint_sha256(&leaf)
}

fn file_fingerprint(cert: &Path) -> String {
    tollgate_tls::cert_fingerprint_sha256(&tollgate_tls::load_certs(cert).unwrap()[0])
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Wait until the metric series reaches `want` (the gateway counts asynchronously to the client).
fn wait_metric(gw: &Gateway, series: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = gw.metric(series);
        if got == Some(want) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{series} is {got:?}, want {want}\n{}",
                gw.metrics()
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn handshake_failures(reason: &str) -> String {
    format!(
        "tollgate_handshakes_total{{listener=\"postgres\",outcome=\"failed\",reason=\"{reason}\"}}"
    )
}

/// Replace `path` by `bytes` atomically (temp file + rename), as a certificate manager does.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("swap");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start_env() -> Env {
    Env::start()
}

#[test]
fn client_certificate_from_another_ca_or_expired_is_refused() {
    let env = start_env();
    // A CA of its own name: the certificate chains to nothing the gateway trusts.
    let other_dir = env.tmp.path().join("other-ca");
    let other = Pki {
        ca: pki::init_ca(&other_dir, "someone else's CA").unwrap().cert,
        dir: other_dir,
    };
    let mallory = other.client("mallory", &["sre"]);
    let out = env.psql(&env.conninfo_as(&mallory, "app"), &["-c", "SELECT 1"]);
    assert!(!out.status.success(), "a foreign-CA certificate got in");
    assert!(stderr(&out).contains("unknown ca"), "{}", stderr(&out));
    wait_metric(&env.gw, &handshake_failures("unknown_ca"), 1);

    let expired = pki::issue_client(
        &env.pki.dir,
        &pki::ClientCertSpec {
            name: "alice".into(),
            spiffe: None,
            groups: vec!["sre".into()],
            ttl: Duration::from_secs(3600),
            not_before: Some(SystemTime::now() - Duration::from_secs(2 * 3600)),
        },
        &env.pki.dir.join("alice-expired"),
    )
    .unwrap();
    let out = env.psql(&env.conninfo_as(&expired, "app"), &["-c", "SELECT 1"]);
    assert!(!out.status.success(), "an expired certificate got in");
    assert!(
        stderr(&out).contains("certificate expired"),
        "{}",
        stderr(&out)
    );
    wait_metric(&env.gw, &handshake_failures("expired"), 1);
    // Neither refusal was mistaken for the other.
    assert_eq!(env.gw.metric(&handshake_failures("unknown_ca")), Some(1));

    // An impostor CA with the very same name as the gateway's client CA is refused too.
    let impostor = Pki::new(&env.tmp.path().join("impostor-ca"));
    let eve = impostor.client("alice", &["sre"]);
    let out = env.psql(&env.conninfo_as(&eve, "app"), &["-c", "SELECT 1"]);
    assert!(!out.status.success(), "an impostor-CA certificate got in");
    assert!(stderr(&out).contains("alert"), "{}", stderr(&out));

    // The same gateway still lets the right certificate through.
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1");
}

#[test]
fn plaintext_is_refused_with_how_to_connect() {
    let env = start_env();
    let conninfo = format!(
        "host=localhost port={} dbname=app user=alice sslmode=disable",
        env.gw.pg_port
    );
    let out = env.psql(&conninfo, &["-c", "SELECT 1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("tollgate requires TLS"), "{err}");
    assert!(err.contains("sslmode=require"), "{err}");
    wait_metric(&env.gw, &handshake_failures("plaintext"), 1);
}

/// A ClientHello whose highest version is TLS 1.1 (0x0302), as an old client sends it.
fn tls11_client_hello(with_sig_algs: bool) -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend([0x01, 0x00]); // null compression
    if with_sig_algs {
        // extensions: signature_algorithms = [ecdsa_secp256r1_sha256]
        body.extend([0x00, 0x08, 0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    }
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x02, (hs.len() >> 8) as u8, hs.len() as u8];
    record.extend(hs);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused_with_a_protocol_version_alert() {
    let env = tokio::task::spawn_blocking(start_env).await.unwrap();
    for (i, sig_algs) in [false, true].into_iter().enumerate() {
        let mut tcp = ssl_request(env.gw.pg_port).await;
        tcp.write_all(&tls11_client_hello(sig_algs)).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
            .await
            .expect("the gateway must close a TLS 1.1 connection")
            .ok();
        // One fatal alert record, then the connection closes. rustls answers protocol_version (70),
        // or handshake_failure (40) when the hello also lacks TLS 1.2's signature_algorithms.
        assert!(reply.len() >= 7, "no alert before close: {reply:02x?}");
        assert_eq!(reply[0], 0x15, "not an alert record: {reply:02x?}");
        assert_eq!(reply[5], 2, "alert is not fatal: {reply:02x?}");
        assert!(
            [70, 40].contains(&reply[6]),
            "unexpected alert description: {reply:02x?}"
        );
        assert_eq!(reply.len(), 7, "more than one alert: {reply:02x?}");
        let gw = &env.gw;
        let series = handshake_failures("protocol_version");
        let want = i as i64 + 1;
        tokio::task::block_in_place(|| wait_metric(gw, &series, want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_hot_reload_keeps_sessions_and_survives_bad_files() {
    let env = tokio::task::spawn_blocking(start_env).await.unwrap();
    let port = env.gw.pg_port;
    let ca = env.pki.ca.clone();
    let cert_path = env.pki.dir.join("gateway.crt");
    let key_path = env.pki.dir.join("gateway.key");
    let metric = |series: String| {
        let gw = &env.gw;
        tokio::task::block_in_place(|| gw.metric(&series))
    };
    let reloads = |outcome: &str| {
        metric(format!(
            "tollgate_tls_reloads_total{{listener=\"postgres\",outcome=\"{outcome}\"}}"
        ))
        .unwrap_or(0)
    };

    let session = env.client().await;
    let old_fp = served_fingerprint(port, &ca).await;
    assert_eq!(old_fp, file_fingerprint(&cert_path));

    // Rotate: a new certificate (longer-lived, so the expiry gauge must move) renamed into place.
    let next = pki::issue_server(
        &env.pki.dir,
        &pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            ttl: Duration::from_secs(2 * 86400),
            not_before: None,
        },
        &env.pki.dir.join("gateway-next"),
    )
    .unwrap();
    let new_fp = file_fingerprint(&next.cert);
    assert_ne!(new_fp, old_fp);
    std::fs::rename(&next.key, &key_path).unwrap();
    std::fs::rename(&next.cert, &cert_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_fingerprint(port, &ca).await != new_fp {
        assert!(
            Instant::now() < deadline,
            "new handshakes still see the old certificate 5 s after the rename:\n{}",
            env.gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloads("success") >= 1);
    let gauge = metric("tollgate_cert_expiry_timestamp_seconds{cert=\"gateway\"}".into())
        .expect("gateway expiry gauge");
    let want = unix_now() - 60 + 2 * 86400;
    assert!(
        (gauge - want).abs() < 30,
        "expiry gauge {gauge} does not follow the new certificate ({want})"
    );

    // The session opened before the rotation is untouched.
    let row = session.query_one("SELECT 1::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);

    // Garbage in the certificate file: refused, counted once, logged; the last good one keeps serving.
    let good_cert = std::fs::read(&cert_path).unwrap();
    // Let any transient failure from the two-file rename above settle before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failures_before = reloads("failure");
    let successes_before = reloads("success");
    replace_file(&cert_path, b"-----BEGIN CERTIFICATE-----\ngarbage\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads("failure") == failures_before {
        assert!(
            Instant::now() < deadline,
            "bad certificate file not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // several polls
    assert_eq!(
        reloads("failure"),
        failures_before + 1,
        "the same broken file must be reported once, not every poll"
    );
    assert!(
        env.gw.logs().contains("TLS reload rejected"),
        "{}",
        env.gw.logs()
    );
    assert_eq!(served_fingerprint(port, &ca).await, new_fp);
    assert!(tollgate_testsupport::process_alive(env.gw.pid() as i32));
    let row = session.query_one("SELECT 2::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);

    // SIGHUP forces a reload attempt even though the file did not change again: counted again.
    // SAFETY: a plain signal to the gateway child this test started.
    unsafe { libc::kill(env.gw.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads("failure") != failures_before + 2 {
        assert!(Instant::now() < deadline, "SIGHUP did not trigger a reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tollgate_testsupport::process_alive(env.gw.pid() as i32));

    // The good bytes back: unchanged from what is served, so polling does not count a reload...
    replace_file(&cert_path, &good_cert);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(reloads("success"), successes_before);
    // ...but SIGHUP reloads unconditionally.
    // SAFETY: as above.
    unsafe { libc::kill(env.gw.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads("success") != successes_before + 1 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP with valid files did not reload:\n{}",
            env.gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_fingerprint(port, &ca).await, new_fp);
    let row = session.query_one("SELECT 3::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    // A brand-new session works with the reloaded material.
    let fresh = env.client().await;
    let row = fresh.query_one("SELECT 4::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 4);
}

#[test]
fn admin_endpoints_and_certificate_expiry_gauges() {
    let env = start_env();
    assert_eq!(env.gw.http_get("/healthz").map(|r| r.0), Some(200));
    let (status, body) = env.gw.http_get("/readyz").unwrap();
    assert_eq!((status, body.trim()), (200, "ready"));
    assert_eq!(env.gw.http_get("/nope").map(|r| r.0), Some(404));

    let now = unix_now();
    let gateway = env
        .gw
        .metric("tollgate_cert_expiry_timestamp_seconds{cert=\"gateway\"}")
        .expect("gateway certificate expiry gauge");
    // Pki::server issues for one day, backdated by a minute for clock skew.
    let want = now - 60 + 86400;
    assert!(
        (gateway - want).abs() < 30,
        "gateway expiry {gateway}, want about {want}"
    );
    let client_ca = env
        .gw
        .metric("tollgate_cert_expiry_timestamp_seconds{cert=\"client_ca\"}")
        .expect("client CA expiry gauge");
    assert!(
        client_ca > now + 365 * 86400,
        "client CA expiry {client_ca} is not the CA's"
    );
}

/// Connect with tokio-postgres; the error is returned instead of panicking.
async fn try_connect(
    env: &Env,
    who: Option<&IssuedFiles>,
    user: &str,
    db: &str,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .port(env.gw.pg_port)
        .user(user)
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    if let Some(p) = password {
        cfg.password(p);
    }
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(&env.pki.ca, who));
    let (client, conn) = cfg.connect(tls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn db_error(e: &tokio_postgres::Error) -> (SqlState, String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not an error from the gateway: {e:?}"));
    (
        db.code().clone(),
        db.message().to_string(),
        db.hint().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_group_and_wrong_token_are_refused_counted_and_recorded() {
    let env = tokio::task::spawn_blocking(start_env).await.unwrap();
    let mallory = env.pki.client("mallory", &["interns"]);

    let err = try_connect(&env, Some(&mallory), "mallory", "app", None)
        .await
        .expect_err("an intern reached the app resource");
    let (code, message, hint) = db_error(&err);
    assert_eq!(code, SqlState::INSUFFICIENT_PRIVILEGE, "{message}");
    assert!(message.starts_with("permission denied"), "{message}");
    // Nothing about who may get in.
    for leak in ["sre", "ci"] {
        assert!(!message.contains(&format!("\"{leak}\"")), "{message}");
        assert!(!hint.contains(&format!("\"{leak}\"")), "{hint}");
    }
    // An unknown resource looks the same and names no resource that exists.
    let alice = env.alice.clone();
    let err = try_connect(&env, Some(&alice), "alice", "payroll", None)
        .await
        .expect_err("a resource that does not exist was reached");
    let (code, message, hint) = db_error(&err);
    assert_eq!(code, SqlState::INSUFFICIENT_PRIVILEGE, "{message}");
    assert!(message.starts_with("permission denied"), "{message}");
    assert!(
        !message.contains("app") && !hint.contains("app"),
        "{message} / {hint}"
    );

    let err = try_connect(&env, None, "ci-bot", "app", Some("not-the-token"))
        .await
        .expect_err("a wrong token was accepted");
    let (code, message, _) = db_error(&err);
    assert_eq!(code, SqlState::INVALID_PASSWORD, "{message}");
    assert!(message.contains("authentication failed"), "{message}");
    assert!(!message.contains(TOKEN));

    // psql shows the same to a person.
    let out = psql_env(
        &env.conninfo_token("app"),
        &["-c", "SELECT 1"],
        &[("PGPASSWORD", "still-not-the-token")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );

    let gw = &env.gw;
    tokio::task::block_in_place(|| {
        wait_metric(
            gw,
            "tollgate_auth_failures_total{listener=\"postgres\",reason=\"forbidden\"}",
            2,
        );
        wait_metric(
            gw,
            "tollgate_auth_failures_total{listener=\"postgres\",reason=\"unknown_token\"}",
            2,
        );
    });

    // Forbidden identities are recorded session by session; unauthenticated attempts (wrong
    // tokens) only in the aggregate `connection.refused` summary.
    let events = tokio::task::block_in_place(|| {
        env.events_until("two rejected sessions and two refused tokens", |evs| {
            evs.iter()
                .filter(|e| e["kind"] == "session.close" && e["payload"]["outcome"] == "rejected")
                .count()
                >= 2
                && refused_count(evs, "authentication") >= 2
        })
    });
    let closes: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "session.close")
        .collect();
    let open_of = |session: &serde_json::Value| {
        events
            .iter()
            .find(|e| e["kind"] == "session.open" && e["session_id"] == *session)
            .unwrap_or_else(|| panic!("no session.open for {session}: {events:#?}"))
    };
    let by_reason = |reason: &str| -> Vec<&serde_json::Value> {
        closes
            .iter()
            .filter(|e| e["payload"]["reason"] == reason)
            .copied()
            .collect()
    };
    let forbidden = by_reason("forbidden");
    assert_eq!(forbidden.len(), 2, "{closes:#?}");
    assert_eq!(by_reason("authentication").len(), 0, "{closes:#?}");
    assert_eq!(refused_count(&events, "authentication"), 2);
    for close in &forbidden {
        assert_eq!(close["payload"]["outcome"], "rejected");
        let open = &open_of(&close["session_id"])["payload"];
        let addr = open["client_addr"].as_str().unwrap_or_default();
        assert!(addr.starts_with("127.0.0.1:"), "{open}");
    }
    let subjects: Vec<_> = forbidden
        .iter()
        .map(|c| open_of(&c["session_id"])["payload"]["subject"].clone())
        .collect();
    assert!(
        subjects.contains(&serde_json::json!("mallory")),
        "{subjects:?}"
    );
    assert!(!serde_json::to_string(&events)
        .unwrap()
        .contains("not-the-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let env = tokio::task::spawn_blocking(start_env).await.unwrap();
    let connect = |alpn: bool| {
        let mut tls = client_tls(&env.pki.ca, Some(&env.alice));
        if alpn {
            tls.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("localhost")
            .port(env.gw.pg_port)
            .user("alice")
            .dbname("app")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
        async move {
            let (client, conn) = cfg
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };

    // PostgreSQL 17 direct TLS: no SSLRequest round trip, ALPN "postgresql".
    let client = connect(true).await.expect("direct TLS with ALPN");
    let row = client.query_one("SELECT 7::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    drop(client);

    // Without ALPN a direct TLS client is refused (a cross-protocol safeguard), with a reason.
    let err = connect(false)
        .await
        .expect_err("direct TLS without ALPN got in");
    let (code, message, _) = db_error(&err);
    assert_eq!(code, SqlState::PROTOCOL_VIOLATION, "{message}");
    assert!(message.contains("ALPN"), "{message}");
    let gw = &env.gw;
    tokio::task::block_in_place(|| wait_metric(gw, &handshake_failures("alpn"), 1));

    // The session that got in is recorded; the refusal only in the aggregate summary.
    let events = tokio::task::block_in_place(|| {
        env.events_until("a session and an alpn refusal", |evs| {
            evs.iter().any(|e| e["kind"] == "session.close") && refused_count(evs, "alpn") == 1
        })
    });
    let open = events
        .iter()
        .find(|e| e["kind"] == "session.open" && e["payload"]["subject"] == "alice")
        .expect("session.open of the direct TLS session");
    assert_eq!(open["payload"]["direct_tls"], true, "{open:#}");
    assert_eq!(
        open["payload"]["client_tls"]["alpn"], "postgresql",
        "{open:#}"
    );
}
