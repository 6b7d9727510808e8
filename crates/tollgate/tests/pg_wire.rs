//! The PostgreSQL wire protocol as a raw client sees it: encryption negotiation (GSSENCRequest,
//! SSLRequest, PostgreSQL 17 direct TLS), protocol 3.2 and NegotiateProtocolVersion, long cancel
//! keys, and malformed or oversized messages.

mod common;
use common::*;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const V3_0: i32 = 3 << 16;
const V3_2: i32 = (3 << 16) | 2;
const V3_9: i32 = (3 << 16) | 9;

// ---------------------------------------------------------------------------------------------
// byte builders

fn special(code: i32) -> Vec<u8> {
    let mut b = 8i32.to_be_bytes().to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b
}

fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 0];
    b.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

fn alice_startup(version: i32) -> Vec<u8> {
    startup(version, &[("user", "alice"), ("database", "app")])
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    b.extend_from_slice(body);
    b
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

fn cancel(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut b = ((12 + secret.len()) as i32).to_be_bytes().to_vec();
    b.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(secret);
    b
}

// ---------------------------------------------------------------------------------------------
// reading

type Msg = (u8, Vec<u8>);

async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Msg> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    assert!(
        (4..=1 << 24).contains(&len),
        "implausible length {len} for {:?}",
        head[0] as char
    );
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).await?;
    Ok((head[0], body))
}

async fn read_msg_timeout<S: AsyncRead + Unpin>(s: &mut S) -> Msg {
    tokio::time::timeout(Duration::from_secs(15), read_msg(s))
        .await
        .expect("timed out waiting for a message")
        .expect("read a message")
}

/// Messages up to and including ReadyForQuery; panics on an ErrorResponse before it.
async fn until_ready<S: AsyncRead + Unpin>(s: &mut S) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        let m = read_msg_timeout(s).await;
        let tag = m.0;
        if tag == b'E' {
            panic!("unexpected error: {:?}", fields(&m.1));
        }
        out.push(m);
        if tag == b'Z' {
            return out;
        }
    }
}

/// Messages up to and including ReadyForQuery, errors included.
async fn until_ready_any<S: AsyncRead + Unpin>(s: &mut S) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        let m = read_msg_timeout(s).await;
        let tag = m.0;
        out.push(m);
        if tag == b'Z' {
            return out;
        }
    }
}

/// ErrorResponse / NoticeResponse fields by their one-letter code.
fn fields(body: &[u8]) -> HashMap<char, String> {
    let mut f = HashMap::new();
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let nul = tail
            .iter()
            .position(|b| *b == 0)
            .expect("NUL-terminated field");
        f.insert(
            t as char,
            String::from_utf8_lossy(&tail[..nul]).into_owned(),
        );
        rest = &tail[nul + 1..];
    }
    f
}

/// The next message must be an ErrorResponse; its fields.
async fn expect_error<S: AsyncRead + Unpin>(s: &mut S) -> HashMap<char, String> {
    let (tag, body) = read_msg_timeout(s).await;
    assert_eq!(
        tag as char, 'E',
        "expected ErrorResponse, got {:?} {body:?}",
        tag as char
    );
    fields(&body)
}

/// The peer closes: EOF or a reset, within a few seconds, with nothing more to read.
async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "expected the connection to close, got {n} more bytes: {:?}",
            &buf[..n]
        ),
        Err(_) => panic!("connection still open after 5 s"),
    }
}

/// The DataRow values of a simple query's answer, as text.
fn rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| {
            let n = i16::from_be_bytes([b[0], b[1]]) as usize;
            let mut pos = 2;
            (0..n)
                .map(|_| {
                    let len = i32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
                    pos += 4;
                    if len < 0 {
                        return None;
                    }
                    let v = String::from_utf8_lossy(&b[pos..pos + len as usize]).into_owned();
                    pos += len as usize;
                    Some(v)
                })
                .collect()
        })
        .collect()
}

async fn simple<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sql: &str,
) -> Vec<Vec<Option<String>>> {
    s.write_all(&query(sql)).await.unwrap();
    s.flush().await.unwrap();
    rows(&until_ready(s).await)
}

// ---------------------------------------------------------------------------------------------
// connecting

async fn tcp(env: &Env) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", env.gw.pg_port))
        .await
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

async fn tls_over(tcp: TcpStream, cfg: rustls::ClientConfig) -> std::io::Result<Tls> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

async fn read_byte(s: &mut TcpStream) -> u8 {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("timed out")
        .expect("read one byte");
    b[0]
}

/// SSLRequest, 'S', TLS as `who` (alice by default).
async fn ssl_connect(env: &Env, alice: bool) -> Tls {
    let mut s = tcp(env).await;
    s.write_all(&special(SSL_REQUEST)).await.unwrap();
    assert_eq!(read_byte(&mut s).await, b'S');
    let cfg = client_tls(&env.pki.ca, alice.then_some(&env.alice));
    tls_over(s, cfg)
        .await
        .expect("TLS handshake with the gateway")
}

/// A started session as alice with protocol `version`; the start-up messages.
async fn session(env: &Env, version: i32) -> (Tls, Vec<Msg>) {
    let mut s = ssl_connect(env, true).await;
    s.write_all(&alice_startup(version)).await.unwrap();
    s.flush().await.unwrap();
    let msgs = until_ready(&mut s).await;
    (s, msgs)
}

fn backend_key(msgs: &[Msg]) -> (i32, Vec<u8>) {
    let (_, b) = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    (
        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        b[4..].to_vec(),
    )
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

async fn start_env(opts: EnvOptions) -> Env {
    tokio::task::spawn_blocking(move || Env::start_with(opts))
        .await
        .unwrap()
}

fn events_where(
    env: &Env,
    what: &str,
    f: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    tokio::task::block_in_place(|| env.events_until(what, f))
}

fn closes(evs: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    evs.iter()
        .filter(|e| e["kind"] == "session.close")
        .map(|e| &e["payload"])
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. GSSENCRequest, then SSLRequest

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_declined_then_ssl_request_works_on_the_same_connection() {
    let env = start_env(EnvOptions::default()).await;
    let mut s = tcp(&env).await;
    s.write_all(&special(GSSENC_REQUEST)).await.unwrap();
    assert_eq!(read_byte(&mut s).await, b'N');
    s.write_all(&special(SSL_REQUEST)).await.unwrap();
    assert_eq!(read_byte(&mut s).await, b'S');
    let mut t = tls_over(s, client_tls(&env.pki.ca, Some(&env.alice)))
        .await
        .unwrap();
    t.write_all(&alice_startup(V3_0)).await.unwrap();
    let msgs = until_ready(&mut t).await;
    assert_eq!(
        msgs[0],
        (b'R', 0i32.to_be_bytes().to_vec()),
        "AuthenticationOk first"
    );
    assert!(tags(&msgs).ends_with('Z'));
    assert_eq!(
        simple(&mut t, "SELECT 1").await,
        vec![vec![Some("1".into())]]
    );
    t.write_all(&terminate()).await.unwrap();
    t.flush().await.unwrap();
    expect_closed(&mut t).await;
    let evs = events_where(&env, "the session's close", |evs| !closes(evs).is_empty());
    assert_eq!(closes(&evs)[0]["outcome"], "closed", "{evs:#?}");
    let open = evs.iter().find(|e| e["kind"] == "session.open").unwrap();
    assert_eq!(open["payload"]["direct_tls"], false);
}

// ---------------------------------------------------------------------------------------------
// 2. PostgreSQL 17 direct TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let env = start_env(EnvOptions::default()).await;
    let mut cfg = client_tls(&env.pki.ca, Some(&env.alice));
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    let mut t = tls_over(tcp(&env).await, cfg).await.expect("direct TLS");
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    t.write_all(&alice_startup(V3_0)).await.unwrap();
    until_ready(&mut t).await;
    assert_eq!(
        simple(&mut t, "SELECT 1").await,
        vec![vec![Some("1".into())]]
    );
    t.write_all(&terminate()).await.unwrap();
    t.flush().await.unwrap();
    expect_closed(&mut t).await;

    // Without ALPN: refused (an error, or the handshake itself fails), never a session.
    let cfg = client_tls(&env.pki.ca, Some(&env.alice));
    match tls_over(tcp(&env).await, cfg).await {
        Err(e) => eprintln!("handshake without ALPN failed: {e}"),
        Ok(mut t) => {
            eprintln!("handshake without ALPN succeeded; expecting an ErrorResponse");
            let f = expect_error(&mut t).await;
            assert_eq!(f[&'C'], "08P01", "{f:?}");
            assert!(f[&'M'].contains("ALPN"), "{f:?}");
            expect_closed(&mut t).await;
        }
    }
    // A refusal before anyone is identified is counted in aggregate, not recorded as a session.
    let evs = events_where(&env, "an alpn or handshake refusal", |evs| {
        refused_count(evs, "alpn") + refused_count(evs, "tls_handshake") >= 1
    });
    let open = evs
        .iter()
        .find(|e| e["kind"] == "session.open" && e["payload"]["direct_tls"] == true)
        .expect("the direct-TLS session");
    assert_eq!(open["payload"]["client_tls"]["alpn"], "postgresql");
}

// ---------------------------------------------------------------------------------------------
// 3. protocol 3.2, NegotiateProtocolVersion, long cancel keys

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_negotiation_and_long_cancel_keys() {
    let env = start_env(EnvOptions::default()).await;

    // 3.0: a classic 4-byte secret.
    let (mut s30, msgs30) = session(&env, V3_0).await;
    assert!(!tags(&msgs30).contains('v'), "{}", tags(&msgs30));
    assert_eq!(backend_key(&msgs30).1.len(), 4);

    // 3.2: accepted as is, 32-byte secret.
    let (mut s32, msgs) = session(&env, V3_2).await;
    assert!(!tags(&msgs).contains('v'), "{}", tags(&msgs));
    let (pid, secret) = backend_key(&msgs);
    assert_eq!(secret.len(), 32);
    assert!(pid > 0);

    // 3.9 with an unknown protocol option: NegotiateProtocolVersion first, then a normal session.
    let mut s = ssl_connect(&env, true).await;
    s.write_all(&startup(
        V3_9,
        &[("user", "alice"), ("database", "app"), ("_pq_.foo", "bar")],
    ))
    .await
    .unwrap();
    let msgs = until_ready(&mut s).await;
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v', "{}", tags(&msgs));
    assert_eq!(i32::from_be_bytes(body[0..4].try_into().unwrap()), V3_2);
    assert_eq!(i32::from_be_bytes(body[4..8].try_into().unwrap()), 1);
    assert_eq!(&body[8..], b"_pq_.foo\0");
    assert_eq!(backend_key(&msgs).1.len(), 32);
    assert_eq!(
        simple(&mut s, "SELECT 'negotiated'").await,
        vec![vec![Some("negotiated".into())]]
    );

    // Cancel with the long key on a new TLS connection.
    s32.write_all(&query("SELECT pg_sleep(30)")).await.unwrap();
    s32.flush().await.unwrap();
    let running = || {
        tokio::task::block_in_place(|| {
            env.pg
                .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
                .unwrap()
                .trim()
                == "1"
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running() {
        assert!(Instant::now() < deadline, "pg_sleep never started upstream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A wrong secret (one bit off) cancels nothing.
    let mut wrong = secret.clone();
    wrong[31] ^= 1;
    let mut c = ssl_connect(&env, false).await;
    c.write_all(&cancel(pid, &wrong)).await.unwrap();
    c.flush().await.unwrap();
    expect_closed(&mut c).await;
    let mut probe = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), s32.read(&mut probe))
            .await
            .is_err(),
        "a cancel with the wrong secret must not interrupt the query"
    );
    // The right one does.
    let t = Instant::now();
    let mut c = ssl_connect(&env, false).await;
    let packet = cancel(pid, &secret);
    assert_eq!(packet.len(), 12 + 32);
    c.write_all(&packet).await.unwrap();
    c.flush().await.unwrap();
    let msgs = until_ready_any(&mut s32).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (_, e) = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("ErrorResponse");
    assert_eq!(fields(e)[&'C'], "57014", "{:?}", fields(e));
    // The session survives the cancel.
    assert_eq!(
        simple(&mut s32, "SELECT 2").await,
        vec![vec![Some("2".into())]]
    );

    // libpq before 17 (psql 15's Ctrl-C) sends its CancelRequest without TLS: a 3.0 session's
    // 4-byte key works that way too.
    let (pid30, secret30) = backend_key(&msgs30);
    s30.write_all(&query("SELECT pg_sleep(29)")).await.unwrap();
    s30.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tokio::task::block_in_place(|| {
        env.pg
            .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(29)' AND state = 'active'")
            .unwrap()
            .trim()
            == "1"
    }) {
        assert!(
            Instant::now() < deadline,
            "pg_sleep(29) never started upstream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut plain = tcp(&env).await;
    plain.write_all(&cancel(pid30, &secret30)).await.unwrap();
    expect_closed(&mut plain).await;
    let msgs = until_ready_any(&mut s30).await;
    let (_, e) = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("ErrorResponse");
    assert_eq!(fields(e)[&'C'], "57014", "{:?}", fields(e));
    let m = env.gw.metrics();
    assert!(
        m.contains("tollgate_cancel_requests_total{matched=\"no\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_cancel_requests_total{matched=\"yes\"} 2"),
        "{m}"
    );

    let evs = events_where(&env, "session.open with protocol 3.2", |evs| {
        evs.iter()
            .filter(|e| e["kind"] == "session.open" && e["payload"]["protocol"] == "3.2")
            .count()
            >= 2
    });
    let cancelled = evs
        .iter()
        .find(|e| e["kind"] == "result" && e["payload"]["sqlstate"] == "57014")
        .expect("the cancelled query's result");
    assert_eq!(cancelled["payload"]["outcome"], "error");
}

// ---------------------------------------------------------------------------------------------
// 4. malformed and oversized messages

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

async fn assert_protocol_error(env: &Env, bytes: &[u8], needle: &str) -> HashMap<char, String> {
    let (mut s, _) = session(env, V3_0).await;
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
    let f = expect_error(&mut s).await;
    assert_eq!(f[&'C'], "08P01", "{f:?}");
    assert_eq!(f[&'S'], "FATAL", "{f:?}");
    assert!(f[&'M'].contains(needle), "{needle:?} not in {f:?}");
    expect_closed(&mut s).await;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_are_protocol_errors() {
    let env = start_env(EnvOptions::default()).await;
    let pid = env.gw.pid();
    // Warm up (threads, TLS, arenas) before measuring.
    let (mut s, _) = session(&env, V3_0).await;
    simple(&mut s, "SELECT 1").await;
    drop(s);
    let rss0 = proc_status_kb(pid, "VmRSS:");
    let peak0 = proc_status_kb(pid, "VmPeak:");

    // A Query declaring 2 GB.
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&0x7fff_ffffi32.to_be_bytes());
    huge.extend_from_slice(b"SELECT 1");
    assert_protocol_error(&env, &huge, "exceeds the limit").await;
    let rss1 = proc_status_kb(pid, "VmRSS:");
    let peak1 = proc_status_kb(pid, "VmPeak:");
    assert!(
        rss1 < rss0 + 32 * 1024,
        "RSS grew from {rss0} kB to {rss1} kB"
    );
    assert!(
        peak1 < peak0 + 1024 * 1024,
        "virtual size peaked at {peak1} kB (was {peak0} kB): something reserved the declared length"
    );

    // A length below the minimum of 4.
    let mut short = vec![b'Q'];
    short.extend_from_slice(&2i32.to_be_bytes());
    assert_protocol_error(&env, &short, "below the minimum").await;

    // An unknown message type.
    assert_protocol_error(&env, &message(b'@', &[]), "unexpected message type").await;

    // The gateway is fine afterwards.
    let (mut s, _) = session(&env, V3_0).await;
    assert_eq!(
        simple(&mut s, "SELECT 3").await,
        vec![vec![Some("3".into())]]
    );
    drop(s);

    // A start-up packet of 100000 bytes before TLS: refused before it is read.
    let mut t = tcp(&env).await;
    t.write_all(&100_000i32.to_be_bytes()).await.unwrap();
    let f = expect_error(&mut t).await;
    assert_eq!(f[&'C'], "08P01", "{f:?}");
    assert!(f[&'M'].contains("100000"), "{f:?}");
    expect_closed(&mut t).await;

    let evs = events_where(&env, "three protocol_error closes and a rejection", |evs| {
        let c = closes(evs);
        c.iter()
            .filter(|c| c["outcome"] == "protocol_error")
            .count()
            >= 3
            && refused_count(evs, "protocol") >= 1
    });
    let errors: Vec<String> = closes(&evs)
        .iter()
        .filter(|c| c["outcome"] == "protocol_error")
        .map(|c| c["error"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("exceeds the limit")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("below the minimum")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("unexpected message type")),
        "{errors:?}"
    );
    // None of the bad messages became a command: only the two good sessions' statements did.
    let texts: Vec<_> = evs
        .iter()
        .filter(|e| e["kind"] == "command")
        .map(|e| e["payload"]["text"].clone())
        .collect();
    assert_eq!(
        texts,
        vec![serde_json::json!("SELECT 1"), serde_json::json!("SELECT 3")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_bytes_limits_client_messages() {
    let env = start_env(EnvOptions {
        server_extra: "max_message_bytes = 1048576".into(),
        ..Default::default()
    })
    .await;
    // Under the limit: a ~900 kB statement runs.
    let (mut s, _) = session(&env, V3_0).await;
    let lit = "x".repeat(900_000);
    assert_eq!(
        simple(&mut s, &format!("SELECT length('{lit}')")).await,
        vec![vec![Some("900000".into())]]
    );
    drop(s);
    // Over it: a 2 MB Query (header and the first kilobyte; the gateway decides on the header).
    let body_len: i32 = 2 * 1024 * 1024;
    let mut big = vec![b'Q'];
    big.extend_from_slice(&(body_len + 4).to_be_bytes());
    big.extend_from_slice(b"SELECT '");
    big.extend(std::iter::repeat_n(b'y', 1024));
    let f = assert_protocol_error(&env, &big, "exceeds the limit").await;
    assert!(f[&'M'].contains("1048576"), "{f:?}");
    let evs = events_where(&env, "a protocol_error close", |evs| {
        closes(evs).iter().any(|c| c["outcome"] == "protocol_error")
    });
    // The oversized statement never became a command event.
    assert!(
        !evs.iter().any(|e| e["kind"] == "command"
            && e["payload"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("yyyy"))),
        "{evs:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. plaintext

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_startup_gets_an_explanation_not_a_silent_drop() {
    let env = start_env(EnvOptions::default()).await;
    let mut s = tcp(&env).await;
    s.write_all(&alice_startup(V3_0)).await.unwrap();
    let f = expect_error(&mut s).await;
    assert_eq!(f[&'S'], "FATAL", "{f:?}");
    assert_eq!(f[&'C'], "28000", "{f:?}");
    assert!(f[&'M'].contains("requires TLS"), "{f:?}");
    assert!(f.get(&'H').is_some_and(|h| h.contains("sslmode")), "{f:?}");
    expect_closed(&mut s).await;
    // Counted in the aggregate `connection.refused` summary, never a session of its own.
    let evs = events_where(&env, "a plaintext refusal summary", |evs| {
        refused_count(evs, "plaintext") >= 1
    });
    let summary = evs
        .iter()
        .find(|e| e["kind"] == "connection.refused")
        .unwrap();
    assert_eq!(
        summary["payload"]["sample_sources"][0], "127.0.0.1",
        "{summary}"
    );
    assert!(!evs.iter().any(|e| e["kind"] == "session.open"), "{evs:#?}");
}

/// Parse, Bind, Execute, Sync with no Describe: the client never asks for the result's shape,
/// so the gateway asks for it itself (and hides the answer) to mask by column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_portal_nobody_described_are_masked_by_column() {
    let env = start_env(EnvOptions {
        resource_extra: "[[resources.masks]]\ncolumns = [\"email\"]\nstrategy = \"redact\"\n"
            .into(),
        ..Default::default()
    })
    .await;
    let (mut s, _) = session(&env, V3_0).await;
    let mut batch = Vec::new();
    for round in 0..2 {
        batch.clear();
        if round == 0 {
            batch.extend(message(
                b'P',
                b"s1\0SELECT 7 AS id, 'alice@example.com'::text AS email\0\0\0",
            ));
        }
        // Portal "", statement "s1", no parameters, results in text.
        batch.extend(message(b'B', b"\0s1\0\0\0\0\0\0\0"));
        batch.extend(message(b'E', b"\0\0\0\0\0"));
        batch.extend(message(b'S', b""));
        s.write_all(&batch).await.unwrap();
        s.flush().await.unwrap();
        let msgs = until_ready(&mut s).await;
        let expected = if round == 0 { "12DCZ" } else { "2DCZ" };
        assert_eq!(
            tags(&msgs),
            expected,
            "the gateway's own Describe must not reach the client"
        );
        let r = rows(&msgs);
        assert_eq!(r[0][0].as_deref(), Some("7"));
        let email = r[0][1].clone().unwrap();
        assert!(!email.contains("alice"), "email not masked: {email}");
    }
    // The same statement with binary results is masked too.
    batch.clear();
    batch.extend(message(b'B', b"p\0s1\0\0\0\0\0\0\x01\0\x01"));
    batch.extend(message(b'E', b"p\0\0\0\0\0"));
    batch.extend(message(b'S', b""));
    s.write_all(&batch).await.unwrap();
    s.flush().await.unwrap();
    let msgs = until_ready(&mut s).await;
    assert_eq!(tags(&msgs), "2DCZ");
    let raw = &msgs[1].1;
    assert!(
        !String::from_utf8_lossy(raw).contains("alice"),
        "binary email not masked"
    );
}

/// A refused Execute in a pipeline the client never described: the gateway's own Describe and
/// the failing stand-in both go upstream, the client sees only its answers in order, the
/// refusal in place of the Execute's, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_execute_of_an_undescribed_portal_answers_in_order() {
    let env = start_env(EnvOptions {
        resource_extra: "capture_results = true\n[[resources.rules]]\nname = \"no-drop\"\nstatements = [\"drop\"]\naction = \"deny\"\n".into(),
        ..Default::default()
    })
    .await;
    let (mut s, _) = session(&env, V3_0).await;
    let mut batch = Vec::new();
    batch.extend(message(b'P', b"\0DROP TABLE IF EXISTS nothing_here\0\0\0"));
    batch.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(message(b'E', b"\0\0\0\0\0"));
    batch.extend(message(b'S', b""));
    s.write_all(&batch).await.unwrap();
    s.flush().await.unwrap();
    let msgs = until_ready_any(&mut s).await;
    assert_eq!(tags(&msgs), "12EZ");
    let err = fields(&msgs[2].1);
    assert_eq!(err[&'C'], "42501", "{err:?}");
    assert!(err[&'M'].contains("no-drop"), "{err:?}");
    assert_eq!(
        simple(&mut s, "SELECT 1").await,
        vec![vec![Some("1".to_string())]]
    );
}
