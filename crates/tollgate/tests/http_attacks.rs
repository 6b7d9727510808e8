//! HTTP resources as attackers and real clients use them: hand-written HTTP/1.1 over raw TLS
//! (request smuggling, framing, oversized and slow requests, absolute-form targets, userinfo,
//! two Hosts, TRACE), paths, methods and queries that try to pass a deny rule in disguise (as
//! lenient upstream frameworks would read them), upstream cookies on the shared origin, HTTP/2
//! through reqwest and hyper (the resource is the one each request's `:authority` names,
//! whatever the TLS SNI said), and Python's httpx. Every case also checks what the upstream
//! received: a refused request must reach nothing.

mod common;

use common::http_env::{HttpEnv, HttpEnvOptions};
use common::upstream::CUSTOMER;
use common::{wait_for, TOKEN};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The second resource: on the same upstream, for group "ops" only (which no caller has).
const SECRET_RESOURCE: &str = r#"
[[resources]]
name = "secret"
kind = "http"
upstream = "https://localhost:{up_port}"
allow_groups = ["ops"]
[resources.tls]
ca = "{ca}"
"#;

/// `resource_keys`: keys of the "billing" resource; `tables`: its rules and masks; and the
/// "secret" resource no caller may reach.
fn attack_env(resource_keys: &str, tables: &str) -> HttpEnv {
    HttpEnv::start_opts(HttpEnvOptions {
        resource_keys,
        tables,
        resources_extra: SECRET_RESOURCE,
        ..Default::default()
    })
}

impl HttpEnv {
    /// Hand-written bytes over TLS as alice to `port` (SNI `sni`); each part is written after
    /// `gap`; then everything the gateway answers until it closes or is silent for `silence`.
    fn raw(&self, port: u16, sni: &str, parts: &[&[u8]], gap: Duration, silence: Duration) -> Raw {
        let mut cfg = common::client_tls(&self.pki.ca, Some(&self.alice));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(silence)).unwrap();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(gap);
            }
            // The gateway may refuse and close before it has read everything.
            if tls.write_all(part).and_then(|_| tls.flush()).is_err() {
                break;
            }
        }
        let mut bytes = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let closed = loop {
            match tls.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        Raw::parse(bytes, closed)
    }

    /// One request over a fresh connection to `/r/billing` on https_listen.
    fn https(&self, wire: &str) -> Raw {
        self.raw(
            self.https_port,
            "localhost",
            &[wire.as_bytes()],
            Duration::ZERO,
            Duration::from_secs(5),
        )
    }

    fn seen_paths(&self) -> Vec<String> {
        self.up
            .seen
            .all()
            .iter()
            .map(|r| r["path"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

/// The responses read off a raw connection.
struct Raw {
    responses: Vec<Response>,
    /// The gateway closed the connection (rather than waiting for more).
    closed: bool,
    text: String,
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.head, self.body))
    }
}

impl Raw {
    fn parse(bytes: Vec<u8>, closed: bool) -> Raw {
        let mut responses = Vec::new();
        let mut rest = &bytes[..];
        while rest.starts_with(b"HTTP/1.") {
            let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
                break;
            };
            let head = String::from_utf8_lossy(&rest[..end]).into_owned();
            let status = head[9..12].parse().unwrap_or(0);
            let lower = head.to_ascii_lowercase();
            rest = &rest[end + 4..];
            let header = |name: &str| {
                lower
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let body: Vec<u8> = if status / 100 == 1 || status == 204 || status == 304 {
                Vec::new()
            } else if let Some(n) = header("content-length:").and_then(|v| v.parse().ok()) {
                let n = usize::min(n, rest.len());
                let b = rest[..n].to_vec();
                rest = &rest[n..];
                b
            } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
                let mut b = Vec::new();
                loop {
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        rest = &[];
                        break;
                    };
                    let size = usize::from_str_radix(
                        String::from_utf8_lossy(&rest[..eol])
                            .split(';')
                            .next()
                            .unwrap()
                            .trim(),
                        16,
                    )
                    .unwrap_or(0);
                    rest = &rest[eol + 2..];
                    let take = size.min(rest.len());
                    b.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    rest = rest.strip_prefix(b"\r\n").unwrap_or(rest);
                    if size == 0 {
                        break;
                    }
                }
                b
            } else {
                std::mem::take(&mut rest).to_vec()
            };
            responses.push(Response {
                status,
                head,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Raw {
            responses,
            closed,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }

    fn first(&self) -> &Response {
        self.responses
            .first()
            .unwrap_or_else(|| panic!("no response (closed: {}): {:?}", self.closed, self.text))
    }
}

/// A request that smuggles `GET /r/billing/smuggled` in its body when read one way.
const SMUGGLED: &str = "GET /r/billing/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[test]
fn request_smuggling_and_ambiguous_framing() {
    let env = attack_env("", "");
    let assert_nothing_smuggled = |what: &str| {
        let paths = env.seen_paths();
        assert!(
            !paths.iter().any(|p| p.contains("smuggled")),
            "{what}: a smuggled request reached the upstream: {paths:?}"
        );
    };

    // Content-Length and Transfer-Encoding together, in either order: hyper (RFC 9112 §6.3)
    // drops the Content-Length, reads the body as chunked and closes the connection after the
    // answer, so what would be a second request under the Content-Length reading never runs,
    // and the upstream gets the body as the chunked reading has it (with the gateway's own
    // framing).
    let chunked_body = format!("0\r\n\r\n{SMUGGLED}");
    let mut forwarded = 0;
    for order in [
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            chunked_body.len()
        ),
        format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
            chunked_body.len()
        ),
    ] {
        let before = env.up.seen.count();
        let r = env.https(&format!(
            "POST /r/billing/te-cl/echo HTTP/1.1\r\nHost: localhost\r\n{order}\r\n{chunked_body}"
        ));
        eprintln!("{order:?}: {:?}, closed: {}", r.statuses(), r.closed);
        assert_eq!(r.statuses().len(), 1, "{order}: {}", r.text);
        assert!(r.closed, "{order}: the connection stayed open");
        match r.first().status {
            400 => assert_eq!(env.up.seen.count(), before, "{order}"),
            200 => {
                forwarded += 1;
                let echo = r.first().json();
                assert_eq!(echo["path"], "/te-cl/echo");
                assert_eq!(echo["body"], "", "{order}: forwarded with the CL reading");
                assert_eq!(
                    echo["headers"]["transfer-encoding"],
                    serde_json::Value::Null
                );
                assert!(
                    matches!(echo["headers"]["content-length"].as_str(), None | Some("0")),
                    "{order}: {echo}"
                );
            }
            s => panic!("{order}: {s}: {}", r.text),
        }
        assert_nothing_smuggled(&order);
    }

    // Two different lengths; Transfer-Encodings that do not end in chunked, or spelt so that
    // one parser sees chunked and another does not; a header folded over two lines; a
    // Transfer-Encoding in HTTP/1.0. Each is refused and the connection closed.
    let n = SMUGGLED.len();
    for (what, request) in [
        (
            "two lengths",
            format!("POST /r/billing/cl-cl HTTP/1.1\r\nHost: localhost\r\nContent-Length: {n}\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "chunked, identity",
            format!("POST /r/billing/te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunked_body}"),
        ),
        (
            "space before the colon",
            format!("POST /r/billing/te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding : chunked\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "xchunked",
            format!("POST /r/billing/te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: xchunked\r\n\r\n{chunked_body}"),
        ),
        (
            "two Transfer-Encoding lines",
            format!("POST /r/billing/te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{chunked_body}"),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!("POST /r/billing/te HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"),
        ),
        (
            "obs-fold",
            format!("GET /r/billing/fold HTTP/1.1\r\nHost: localhost\r\nX-Note: a\r\n folded: b\r\n\r\n"),
        ),
        (
            "obs-fold of Transfer-Encoding",
            format!("POST /r/billing/fold HTTP/1.1\r\nHost: localhost\r\nContent-Length: {n}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n{SMUGGLED}"),
        ),
        (
            "a bare CR",
            "GET /r/billing/cr HTTP/1.1\rHost: localhost\r\n\r\n".to_string(),
        ),
        (
            "a signed length",
            format!("POST /r/billing/cl HTTP/1.1\r\nHost: localhost\r\nContent-Length: +{n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "a length list",
            format!("POST /r/billing/cl HTTP/1.1\r\nHost: localhost\r\nContent-Length: {n}, {n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "a hexadecimal length",
            format!("POST /r/billing/cl HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0x{n:x}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "a negative chunk size",
            format!("POST /r/billing/chunk HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n{SMUGGLED}"),
        ),
        (
            "an overflowing chunk size",
            format!("POST /r/billing/chunk HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n{SMUGGLED}"),
        ),
        (
            "a NUL in a header value",
            "GET /r/billing/nul HTTP/1.1\r\nHost: localhost\r\nX-A: a\0b\r\n\r\n".to_string(),
        ),
        (
            "HTTP/1.1 without a space before the version",
            "GET /r/billing/v HTTP/1.1 \r\nHost: localhost\r\n\r\n".to_string(),
        ),
    ] {
        let r = env.https(&request);
        assert!(
            matches!(r.statuses()[..], [400] | [501]),
            "{what}: {:?}",
            r.text
        );
        assert!(r.closed, "{what}: the connection stayed open");
        assert_nothing_smuggled(what);
    }
    assert_eq!(
        env.up.seen.count(),
        forwarded,
        "a refused request reached the upstream: {:?}",
        env.seen_paths()
    );

    // Bare LF line endings (RFC 9112 §2.2 lets a recipient accept them): one request, read as
    // the gateway then writes it to the upstream.
    let r = env
        .https("GET /r/billing/lf/echo HTTP/1.1\nHost: localhost\nX-A: 1\nConnection: close\n\n");
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    assert_eq!(r.first().json()["headers"]["x-a"], "1");
    assert_eq!(env.seen_paths().last().unwrap(), "/lf/echo");

    // A head over 64 KiB, and too many headers: 431, closed, nothing forwarded.
    let before = env.up.seen.count();
    let big = format!(
        "GET /r/billing/big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let r = env.https(&big);
    assert!(
        matches!(r.statuses()[..], [431] | [400]) || (r.responses.is_empty() && r.closed),
        "{:?}",
        r.statuses()
    );
    eprintln!("70 KiB head: {:?}", r.statuses());
    assert!(r.closed);
    let many: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let r = env.https(&format!(
        "GET /r/billing/many HTTP/1.1\r\nHost: localhost\r\n{many}\r\n"
    ));
    assert_eq!(r.statuses(), vec![431], "{}", r.text);
    assert!(r.closed);
    assert_eq!(env.up.seen.count(), before);

    // A request refused before its body is read (an encoded '/'): the body is never read as a
    // request, whether framed by length or chunked, and nothing runs after it.
    for framing in [
        format!("Content-Length: {n}\r\n\r\n{SMUGGLED}"),
        format!("Transfer-Encoding: chunked\r\n\r\n{n:x}\r\n{SMUGGLED}\r\n0\r\n\r\n"),
    ] {
        let r = env.https(&format!(
            "POST /r/billing/a%2fb HTTP/1.1\r\nHost: localhost\r\n{framing}"
        ));
        assert_eq!(r.first().status, 400, "{}", r.text);
        assert_eq!(r.first().json()["code"], "bad_request");
        assert_nothing_smuggled(&framing);
    }
    // The upstream never saw a Transfer-Encoding or a second request in a body.
    for rec in env.up.seen.all() {
        assert!(
            !rec["body"].as_str().unwrap_or("").contains("HTTP/1.1"),
            "{rec}"
        );
    }
}

#[test]
fn pipelined_requests_after_a_refusal() {
    let env = attack_env(
        "",
        r#"[[resources.rules]]
name = "no invoice deletes"
methods = ["DELETE"]
paths = ["/v1/invoices/*"]
action = "deny"
"#,
    );
    let n = SMUGGLED.len();
    // Denied after its body was read: the body was a body; the next request is served.
    let r = env.https(&format!(
        "POST /r/billing/v1/invoices/7 HTTP/1.1\r\nHost: localhost\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}GET /r/billing/after/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(r.statuses(), vec![403, 200], "{}", r.text);
    assert_eq!(r.responses[0].json()["code"], "denied");
    assert_eq!(env.seen_paths(), vec!["/after/echo"]);
    // Refused before its body was read: whatever follows on the connection is either served
    // as its own request or dropped with the connection, never joined to the refused one.
    let r = env.https(&format!(
        "POST /r/billing/a%2fb HTTP/1.1\r\nHost: localhost\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}GET /r/billing/after2/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(r.first().status, 400, "{}", r.text);
    let paths = env.seen_paths();
    assert!(!paths.iter().any(|p| p.contains("smuggled")), "{paths:?}");
    if r.statuses() == [400, 200] {
        assert_eq!(paths.last().unwrap(), "/after2/echo");
    }
}

#[test]
fn absolute_form_targets_and_hosts() {
    let env = attack_env("", "");
    // On https_listen the path names the resource; an absolute-form authority proxies to
    // nowhere else, and the upstream is asked for its own host.
    let r = env.https("GET https://evil.example/r/billing/abs/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    let echo = r.first().json();
    assert_eq!(echo["path"], "/abs/echo");
    assert_eq!(
        echo["headers"]["host"],
        format!("localhost:{}", env.up.port)
    );
    let before = env.up.seen.count();
    let r = env.https(
        "GET https://evil.example/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert!(!r.responses.is_empty(), "{}", r.text);
    eprintln!("absolute-form to /: {:?}", r.statuses());
    let r2 = env.https("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n");
    assert_ne!(r2.first().status / 100, 2, "{}", r2.text);
    assert_eq!(env.up.seen.count(), before, "{:?}", env.seen_paths());

    // On http_listen the request's own host names the resource, not the TLS SNI: a connection
    // opened for billing cannot reach "secret" (for group ops only) by naming it.
    let http = |sni: &str, wire: String| {
        env.raw(
            env.http_port,
            sni,
            &[wire.as_bytes()],
            Duration::ZERO,
            Duration::from_secs(5),
        )
    };
    let port = env.http_port;
    let r = http(
        "billing.localhost",
        format!("GET /host/echo HTTP/1.1\r\nHost: billing.localhost:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    for (what, wire) in [
        (
            "Host",
            format!("GET /echo HTTP/1.1\r\nHost: secret.localhost:{port}\r\nConnection: close\r\n\r\n"),
        ),
        (
            "absolute-form",
            format!("GET https://secret.localhost:{port}/echo HTTP/1.1\r\nHost: billing.localhost:{port}\r\nConnection: close\r\n\r\n"),
        ),
        (
            "upper-case absolute-form",
            format!("GET https://SECRET.localhost:{port}/echo HTTP/1.1\r\nHost: billing.localhost:{port}\r\nConnection: close\r\n\r\n"),
        ),
    ] {
        let r = http("billing.localhost", wire);
        assert_eq!(r.statuses(), vec![403], "{what}: {}", r.text);
        assert_eq!(r.first().json()["code"], "forbidden", "{what}");
    }
    // Userinfo in an absolute-form target is an error (RFC 9110 §4.2.4): it would otherwise
    // travel on in X-Forwarded-Host and into the audit record.
    for target in [
        format!("https://alice:hunter2@billing.localhost:{port}/userinfo/echo"),
        format!("https://hunter2@billing.localhost:{port}/userinfo/echo"),
    ] {
        let r = http(
            "billing.localhost",
            format!("GET {target} HTTP/1.1\r\nHost: billing.localhost:{port}\r\nConnection: close\r\n\r\n"),
        );
        assert!(!r.text.contains("hunter2"), "{}", r.text);
        assert!(matches!(r.statuses()[..], [400]), "{target}: {}", r.text);
    }
    for wire in [
        "GET https://alice:hunter2@localhost/r/billing/userinfo/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "GET /r/billing/userinfo/echo HTTP/1.1\r\nHost: alice:hunter2@localhost\r\nConnection: close\r\n\r\n",
    ] {
        let r = env.https(wire);
        assert!(!r.text.contains("hunter2"), "{}", r.text);
        assert!(matches!(r.statuses()[..], [400]), "{wire}: {}", r.text);
    }
    // A Host that is no host name (RFC 9112 §3.2: 400) would travel on in X-Forwarded-Host,
    // where an upstream building links from it would take a path, a list or a fragment along.
    for host in [
        "billing.localhost/evil",
        "billing.localhost\\evil",
        "billing.localhost,evil.example",
        "billing.localhost evil.example",
        "billing.localhost#x",
        "billing.localhost:443/x",
        "billing.localhost:x",
        "billing.localhost\"",
    ] {
        let r = http(
            "billing.localhost",
            format!("GET /badhost/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(r.statuses(), vec![400], "{host}: {}", r.text);
        let r = env.https(&format!(
            "GET /r/billing/badhost/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(r.statuses(), vec![400], "https_listen, {host}: {}", r.text);
    }
    for host in ["[::1]:8443", "127.0.0.1", "LOCALHOST:1"] {
        let r = env.https(&format!(
            "GET /r/billing/okhost/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(r.statuses(), vec![200], "{host}: {}", r.text);
    }
    // Absolute-form wins over Host (RFC 9112 §3.2.2), and two Host lines are refused
    // (RFC 9112 §3.2: 400), whichever of them a reader would take.
    let r = http(
        "secret.localhost",
        format!("GET https://billing.localhost:{port}/abs2/echo HTTP/1.1\r\nHost: secret.localhost:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    for hosts in [
        format!("Host: billing.localhost:{port}\r\nHost: secret.localhost:{port}\r\n"),
        format!("Host: secret.localhost:{port}\r\nHost: billing.localhost:{port}\r\n"),
    ] {
        let r = http(
            "billing.localhost",
            format!("GET /twohosts/echo HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n"),
        );
        assert_eq!(r.statuses(), vec![400], "{hosts}: {}", r.text);
    }
    let paths = env.seen_paths();
    let all = serde_json::to_string(&env.events()).unwrap();
    assert!(!all.contains("hunter2"), "userinfo in the audit trail");
    assert_eq!(
        paths[before..],
        [
            "/host/echo",
            "/okhost/echo",
            "/okhost/echo",
            "/okhost/echo",
            "/abs2/echo"
        ],
        "{paths:?}"
    );
}

#[test]
fn trace_cannot_echo_the_injected_credential() {
    let env = attack_env("", "");
    // An upstream that allows TRACE echoes the request it received, and that request carries
    // the credential the gateway injects. The gateway does not relay TRACE (nor TRACK, nor
    // an override to either).
    for wire in [
        "TRACE /r/billing/t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "TRACK /r/billing/t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "trace /r/billing/t HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "POST /r/billing/t HTTP/1.1\r\nHost: localhost\r\nX-HTTP-Method-Override: TRACE\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ] {
        let r = env.https(wire);
        assert!(
            !r.text.contains("upstream-secret"),
            "the injected credential came back: {}",
            r.text
        );
        assert_eq!(r.statuses(), vec![405], "{wire}: {}", r.text);
        assert_eq!(r.first().json()["code"], "method_not_allowed");
    }
    assert_eq!(env.up.seen.count(), 0, "{:?}", env.seen_paths());
}

#[test]
fn bodies_are_bounded_in_size_and_time() {
    let env = attack_env("max_request_body = 1024", "");
    let post = |framing: &str, body: &str| {
        env.https(&format!(
            "POST /r/billing/upload/echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n{framing}\r\n{body}"
        ))
    };
    let too_large = |r: &Raw, what: &str| {
        assert_eq!(r.first().status, 413, "{what}: {}", r.text);
        let v = r.first().json();
        assert_eq!(v["code"], "body_too_large", "{what}");
        assert!(v["error"].as_str().unwrap().contains("1024"), "{what}: {v}");
    };
    let big = "x".repeat(2000);
    too_large(
        &post(&format!("Content-Length: {}\r\n", big.len()), &big),
        "length",
    );
    too_large(
        &post(
            "Transfer-Encoding: chunked\r\n",
            &format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len()),
        ),
        "chunked",
    );
    // A declared length over the limit is refused at once: no 100 Continue, no waiting for a
    // body that will be refused anyway.
    let r = post("Content-Length: 10000000\r\nExpect: 100-continue\r\n", "");
    assert!(!r.text.contains("100 Continue"), "{}", r.text);
    too_large(&r, "expect 100-continue");
    assert_eq!(env.up.seen.count(), 0, "{:?}", env.seen_paths());

    // Over HTTP/2 too, and the connection serves the next request.
    runtime().block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&env.pki.ca).unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .build()
            .unwrap();
        let url = format!("https://localhost:{}/r/billing/h2/echo", env.https_port);
        let resp = client
            .post(&url)
            .bearer_auth(TOKEN)
            .body("z".repeat(2000))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 413);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["code"], "body_too_large");
        let resp = client.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    });
    assert_eq!(env.seen_paths(), vec!["/h2/echo"]);

    // Within the limit it goes through whole.
    let ok = "y".repeat(1000);
    let r = post(
        &format!("Content-Length: {}\r\nConnection: close\r\n", ok.len()),
        &ok,
    );
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    assert_eq!(r.first().json()["body"], ok);

    // A body that stops coming is not waited for: 408, recorded, nothing forwarded.
    let started = Instant::now();
    let r = env.raw(
        env.https_port,
        "localhost",
        &[b"POST /r/billing/stalled/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500\r\n\r\n0123456789"],
        Duration::ZERO,
        Duration::from_secs(40),
    );
    let waited = started.elapsed();
    assert_eq!(
        r.statuses(),
        vec![408],
        "after {waited:?}: {}\n{}",
        r.text,
        env.gw.logs()
    );
    assert_eq!(r.first().json()["code"], "body_timeout");
    assert!(r.closed, "the connection stayed open after 408");
    assert!(waited < Duration::from_secs(35), "{waited:?}");
    assert_eq!(env.up.seen.count(), 2, "{:?}", env.seen_paths());
    let mut evs = Vec::new();
    wait_for(Duration::from_secs(15), "the 408 recorded", || {
        evs = env.events();
        evs.iter().any(|e| {
            e["kind"] == "http.response"
                && e["payload"]["status"] == 408
                && e["payload"]["outcome"] == "refused"
        })
    });
}

#[test]
fn slow_request_heads_are_cut_off() {
    let env = attack_env("", "");
    // One header line every 4 s: hyper's header read timeout (30 s) ends it.
    let lines: Vec<String> = std::iter::once("GET /r/billing/slow HTTP/1.1\r\n".to_string())
        .chain((0..12).map(|i| format!("X-Slow-{i}: {i}\r\n")))
        .collect();
    let parts: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    let started = Instant::now();
    let r = env.raw(
        env.https_port,
        "localhost",
        &parts,
        Duration::from_secs(4),
        Duration::from_secs(20),
    );
    assert!(r.closed, "{}", r.text);
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
    assert!(r.responses.iter().all(|x| x.status != 200), "{}", r.text);
    assert_eq!(env.up.seen.count(), 0);
}

#[test]
fn disguised_paths_and_methods_cannot_reach_what_rules_deny() {
    let env = attack_env(
        "",
        r#"[[resources.rules]]
name = "no admin"
paths = ["/admin/**"]
action = "deny"
[[resources.rules]]
name = "no invoice deletes"
methods = ["DELETE"]
paths = ["/v1/invoices/*"]
action = "deny"
"#,
    );
    let status = |method: &str, target: &str| -> Raw {
        env.https(&format!(
            "{method} /r/billing{target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ))
    };
    // (target, what the gateway answers)
    let cases: &[(&str, u16)] = &[
        ("/admin/x", 403),
        ("/ADMIN/x", 403),
        ("/%61dmin/x", 403),
        ("/%41DMIN/x", 403),
        ("/./admin/x", 403),
        ("/v1/../admin/x", 403),
        ("/v1/..;/admin/x", 403),
        ("/v1/.;x=1/../admin/x", 403),
        ("/v1/%2e%2e/admin/x", 403),
        ("/v1/%2E%2e/admin", 403),
        ("/v1/.%2e/admin/x", 403),
        ("/admin", 403),
        ("/admin/", 403),
        ("/admin;/x", 403),
        ("/admin#/../../v1", 403),
        // Trailing dots and spaces, which IIS and ASP.NET strip from a segment.
        ("/admin./x", 403),
        ("/admin%2e/x", 403),
        ("/admin%20/x", 403),
        ("/admin.%20./x", 403),
        // Encoded separators, NUL, control characters and non-UTF-8 escapes: refused.
        ("/%2e%2e%2fadmin/x", 400),
        ("/v1/%2e%2e%2fadmin/x", 400),
        ("/v1/..%2fadmin/x", 400),
        ("/v1/..%5cadmin/x", 400),
        ("/v1\\..\\admin/x", 400),
        ("/admin%00/x", 400),
        ("/v1/%00/../admin/x", 400),
        ("/admin%09/x", 400),
        ("/admin%0d%0a/x", 400),
        ("/%c0%ae%c0%ae/admin/x", 400),
        ("/v1/%c0%ae%c0%ae%c0%afadmin/x", 400),
        ("/v1/%e0%80%ae%e0%80%ae/admin/x", 400),
        ("/%ff/admin", 400),
        ("/v1/%2", 400),
    ];
    let mut report = Vec::new();
    for (target, want) in cases {
        let r = status("GET", target);
        let got = r.responses.first().map_or(0, |x| x.status);
        if got != *want {
            report.push(format!("GET {target}: {got} (want {want}): {}", r.text));
        } else if got == 403 {
            assert_eq!(r.first().json()["rule"], "no admin", "{target}");
        }
    }
    // Raw whitespace in the target: not one request line.
    for target in ["/admin\t/x", "/admin /x", "/ad min/x"] {
        let r = env.https(&format!(
            "GET /r/billing{target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ));
        let got = r.responses.first().map_or(0, |x| x.status);
        if got != 400 && got != 0 {
            report.push(format!("GET {target:?}: {got} (want 400): {}", r.text));
        }
    }
    // A path thousands of segments long that climbs back to /admin is still /admin; one too
    // long for the head is refused.
    let long = format!("{}/admin/x", "/a/b/../..".repeat(3000));
    let r = status("GET", &long);
    if r.responses.first().map(|x| x.status) != Some(403) {
        report.push(format!("long path: {:?}", r.statuses()));
    }
    let r = status("GET", &format!("/{}", "a".repeat(70_000)));
    eprintln!("70 KB path: {:?}", r.statuses());
    if !matches!(r.statuses()[..], [414] | [431] | [400]) && !(r.responses.is_empty() && r.closed) {
        report.push(format!("70 KB path: {:?}", r.statuses()));
    }

    // Double encoding is decoded once: the upstream and the rules both see %252e.
    let r = status("GET", "/%252e%252e/admin/echo");
    if r.responses.first().map(|x| x.status) == Some(200) {
        let echo = r.first().json();
        assert_eq!(echo["path"], "/%252e%252e/admin/echo");
    } else {
        report.push(format!("double encoding: {}", r.text));
    }
    // Methods: a DELETE rule also stops `delete` (frameworks such as Django and Werkzeug read
    // the method upper-cased), and an override header in any case.
    for (method, extra) in [
        ("DELETE", ""),
        ("delete", ""),
        ("Delete", ""),
        (
            "POST",
            "X-HTTP-Method-Override: delete\r\nContent-Length: 0\r\n",
        ),
        (
            "POST",
            "X-Method-Override:  DeLeTe \r\nContent-Length: 0\r\n",
        ),
    ] {
        let r = env.https(&format!(
            "{method} /r/billing/v1/invoices/7 HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
        ));
        let got = r.responses.first().map_or(0, |x| x.status);
        if got != 403 {
            report.push(format!("{method} {extra:?}: {got}: {}", r.text));
        }
    }
    // `_method` in the query or a form body: how Rails, Laravel and Symfony override a POST.
    for (target, body) in [
        ("/v1/invoices/7?_method=DELETE", ""),
        ("/v1/invoices/7?_method=delete", ""),
        ("/v1/invoices/7", "_method=DELETE"),
        ("/v1/invoices/7", "amount=1&_method=delete"),
        ("/v1/invoices/7", "%5Fmethod=DELETE"),
    ] {
        let r = env.https(&format!(
            "POST /r/billing{target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let got = r.responses.first().map_or(0, |x| x.status);
        if got != 403 {
            report.push(format!("POST {target} {body:?}: {got}: {}", r.text));
        }
    }

    let seen = env.up.seen.all();
    for rec in &seen {
        let p = rec["path"].as_str().unwrap().to_ascii_lowercase();
        let overridden = rec["query"].as_str().unwrap_or("").contains("_method")
            || rec["body"].as_str().unwrap_or("").contains("method=");
        if p.starts_with("/admin")
            || rec["method"]
                .as_str()
                .unwrap()
                .eq_ignore_ascii_case("delete")
            || overridden
        {
            report.push(format!("reached the upstream: {rec}"));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[test]
fn upstream_cookies_stay_with_their_resource() {
    let env = attack_env("", "");
    let set_cookies = |r: &Raw| -> Vec<String> {
        r.first()
            .head
            .lines()
            .filter_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .collect()
    };
    // On https_listen every resource shares the gateway's origin: a cookie the upstream sets
    // for "/" would go to every other resource (and the gateway strips only its own cookies
    // on the way in). Its Path is moved under /r/<name>/, Domain is dropped, and a cookie
    // named like the gateway's is not set at all.
    let r = env.https(
        "GET /r/billing/set-cookie HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    assert_eq!(
        set_cookies(&r),
        vec![
            "sid=s3cr3t; Path=/r/billing/; Secure; HttpOnly",
            "pref=1; Path=/r/billing/v1/; SameSite=Lax",
            "lang=en",
        ],
        "{}",
        r.text
    );
    // On http_listen each resource has its own host: Domain (which would share the cookie
    // with sibling resources' hosts) is dropped, the path kept.
    let port = env.http_port;
    let r = env.raw(
        port,
        "billing.localhost",
        &[format!("GET /set-cookie HTTP/1.1\r\nHost: billing.localhost:{port}\r\nConnection: close\r\n\r\n").as_bytes()],
        Duration::ZERO,
        Duration::from_secs(5),
    );
    assert_eq!(r.statuses(), vec![200], "{}", r.text);
    assert_eq!(
        set_cookies(&r),
        vec![
            "sid=s3cr3t; Path=/; Secure; HttpOnly",
            "pref=1; Path=/v1/; SameSite=Lax",
            "tollgate_session=fixed; Path=/",
            "lang=en",
        ],
        "{}",
        r.text
    );
}

#[test]
fn upstream_redirects_point_through_the_gateway() {
    let env = attack_env("", "");
    let location = |r: &Raw| -> Option<String> {
        r.first().head.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_string())
        })
    };
    let port = env.http_port;
    for (route, prefixed, by_host) in [
        // The upstream's own URL: its address is not shown, the path is the gateway's.
        ("/redirect", "/r/billing/v1/next?a=1", "/v1/next?a=1"),
        ("/redirect-rel", "/r/billing/v1/next", "/v1/next"),
        (
            "/redirect-away",
            "https://example.org/x",
            "https://example.org/x",
        ),
    ] {
        let r = env.https(&format!(
            "GET /r/billing{route} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(r.statuses(), vec![302], "{}", r.text);
        assert_eq!(
            location(&r).as_deref(),
            Some(prefixed),
            "{route}: {}",
            r.text
        );
        let r = env.raw(
            port,
            "billing.localhost",
            &[format!("GET {route} HTTP/1.1\r\nHost: billing.localhost:{port}\r\nConnection: close\r\n\r\n").as_bytes()],
            Duration::ZERO,
            Duration::from_secs(5),
        );
        assert_eq!(
            location(&r).as_deref(),
            Some(by_host),
            "{route}: {}",
            r.text
        );
        assert!(!r.text.contains(&format!(":{}", env.up.port)), "{}", r.text);
    }
}

/// A runtime for the async clients, and the ring provider rustls needs (reqwest is built
/// without one).
fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn http2_clients_and_the_authority_of_each_request() {
    let env = attack_env(
        "",
        r#"[[resources.masks]]
json_paths = ["$.customer.email", "$..card_number"]
strategy = "partial"
"#,
    );
    let rt = runtime();
    rt.block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&env.pki.ca).unwrap()).unwrap();
        let local = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {TOKEN}").parse().unwrap(),
        );
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .resolve("billing.localhost", local(env.http_port))
            .resolve("secret.localhost", local(env.http_port))
            .default_headers(headers)
            .build()
            .unwrap();

        // http_listen, by host name, over HTTP/2.
        let resp = client
            .get(format!(
                "https://billing.localhost:{}/h2/echo?a=1",
                env.http_port
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let echo: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(echo["path"], "/h2/echo");
        assert_eq!(echo["query"], "a=1");
        let resp = client
            .get(format!("https://secret.localhost:{}/echo", env.http_port))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);

        // https_listen: a masked JSON GET and a JSON POST.
        let resp = client
            .get(format!(
                "https://localhost:{}/r/billing/customers/1",
                env.https_port
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        let orig: serde_json::Value = serde_json::from_str(CUSTOMER).unwrap();
        assert_eq!(v["customer"]["name"], "Ada");
        assert_ne!(v["customer"]["email"], orig["customer"]["email"]);
        let card = v["payments"][0]["card_number"].as_str().unwrap();
        assert!(
            card.ends_with("1111") && card != "4111 1111 1111 1111",
            "{card}"
        );
        let resp = client
            .post(format!(
                "https://localhost:{}/r/billing/v1/payments/echo",
                env.https_port
            ))
            .json(&serde_json::json!({"amount": 12, "currency": "EUR"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let echo: serde_json::Value = resp.json().await.unwrap();
        let sent: serde_json::Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
        assert_eq!(sent, serde_json::json!({"amount": 12, "currency": "EUR"}));
        assert_eq!(echo["headers"]["content-type"], "application/json");

        // One HTTP/2 connection, SNI billing.localhost: each request is judged by the resource
        // its :authority names, so naming "secret" on it is refused.
        let answers = h2_one_connection(
            &env,
            "billing.localhost",
            &[
                format!("https://billing.localhost:{}/one/echo", env.http_port),
                format!("https://secret.localhost:{}/echo", env.http_port),
                format!("https://SECRET.localhost:{}/echo", env.http_port),
                format!("https://billing.localhost:{}/two/echo", env.http_port),
            ],
        )
        .await;
        let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, vec![200, 403, 403, 200], "{answers:?}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&answers[1].1).unwrap()["code"],
            "forbidden"
        );
    });
    let paths = env.seen_paths();
    assert_eq!(
        paths,
        vec![
            "/h2/echo",
            "/customers/1",
            "/v1/payments/echo",
            "/one/echo",
            "/two/echo"
        ],
        "{paths:?}"
    );
}

/// Requests on one HTTP/2 connection (as alice) opened with SNI `sni`: (status, body) each.
async fn h2_one_connection(env: &HttpEnv, sni: &str, uris: &[String]) -> Vec<(u16, String)> {
    use http_body_util::BodyExt;
    let mut cfg = common::client_tls(&env.pki.ca, Some(&env.alice));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.http_port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for uri in uris {
        let req = hyper::Request::get(uri.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        out.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    out
}

#[test]
fn python_httpx_reads_masked_json() {
    // scripts/test installs httpx when it is missing (python3-httpx, else pip); the system's
    // python3 has it when the one first on PATH (a pyenv, a venv) does not.
    let python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import httpx"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("no python3 can import httpx: run scripts/test, or install python3-httpx");
    let env = attack_env(
        "",
        r#"[[resources.masks]]
json_paths = ["$.customer.email", "$..card_number"]
strategy = "partial"
[[resources.masks]]
detectors = ["email"]
strategy = "redact"
"#,
    );
    let script = r#"
import json, ssl, sys, httpx
ca, crt, key, url = sys.argv[1:5]
# An SSLContext, as httpx documents it: from 0.28, verify=<path> makes httpx ignore cert=.
tls = ssl.create_default_context(cafile=ca)
tls.load_cert_chain(crt, key)
with httpx.Client(verify=tls) as client:
    r = client.get(url, headers={"Accept": "application/json"})
    print(json.dumps({"status": r.status_code, "version": r.http_version,
                      "content_type": r.headers.get("content-type"), "body": r.json()}))
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&env.pki.ca)
        .arg(&env.alice.cert)
        .arg(&env.alice.key)
        .arg(format!(
            "https://localhost:{}/r/billing/customers/1",
            env.https_port
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], 200, "{v}");
    assert!(v["content_type"]
        .as_str()
        .unwrap()
        .starts_with("application/json"));
    let body = &v["body"];
    assert_eq!(body["customer"]["name"], "Ada");
    assert_eq!(body["payments"][1]["amount"], 30);
    let card = body["payments"][0]["card_number"].as_str().unwrap();
    assert!(
        card.ends_with("1111") && !card.contains("4111 1111"),
        "{card}"
    );
    let text = body.to_string();
    assert!(
        !text.contains("ada@example.com") && !text.contains("bob@example.org"),
        "{text}"
    );
    assert_eq!(env.seen_paths(), vec!["/customers/1"]);
}

#[test]
fn query_rules_see_every_reading_of_the_query() {
    let env = attack_env(
        "",
        r#"[[resources.rules]]
name = "no dry runs off"
query = { dry_run = "false" }
action = "deny"
"#,
    );
    let mut report = Vec::new();
    for q in [
        "dry_run=false",
        "dry_run=FALSE",
        "DRY_RUN=false",
        "dry_run=fal%73e",
        "dry%5Frun=false",
        "a=1&dry_run=false",
        "dry_run=true&dry_run=false",
        "a=1;dry_run=false",
        "dry_run=false;a=1",
        "dry.run=false",
        "dry+run=false",
        "dry_run[]=false",
        "dry_run=false%00",
        "%20dry_run=false",
    ] {
        let r = env.https(&format!(
            "GET /r/billing/q/echo?{q} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ));
        eprintln!("{q}: {:?}", r.statuses());
        if r.statuses() != [403] {
            report.push(format!("{q}: {:?}", r.statuses()));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}
