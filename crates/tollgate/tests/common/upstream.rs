//! A real HTTPS API for the HTTP-resource tests, with its own certificate: it echoes what it
//! received, serves customer records (with e-mails and card numbers to mask), a large streamed
//! JSON body, server-sent events released by the test, bodies compressed against the gateway's
//! wish (gzip, br, zstd, a bad one, an unknown coding), a few bodies masks cannot handle, and a
//! WebSocket echo on any path ending in `/ws`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use rustls_pki_types::pem::PemObject;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the upstream saw: one JSON record per request (method, path, query, headers, body).
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<serde_json::Value>>>);

impl Seen {
    pub fn all(&self) -> Vec<serde_json::Value> {
        self.0.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

pub struct Upstream {
    pub port: u16,
    pub seen: Seen,
    /// Each send releases one more server-sent event on `/sse`.
    pub sse_release: Arc<Mutex<Option<mpsc::UnboundedSender<()>>>>,
    _rt: tokio::runtime::Runtime,
}

fn full(ct: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .header("content-type", ct)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

pub const CUSTOMER: &str = r#"{"id":1,"customer":{"name":"Ada","email":"ada@example.com","phone":"+1 415 555 0100"},"payments":[{"card_number":"4111 1111 1111 1111","amount":12},{"card_number":"5500 0000 0000 0004","amount":30}],"note":"contact bob@example.org"}"#;

impl Upstream {
    pub fn start(cert: &Path, key: &Path) -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Seen::default();
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let seen2 = seen.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, rx) = (acceptor.clone(), seen2.clone(), rx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (seen, rx) = (seen.clone(), rx.clone());
                        async move { Ok::<_, Infallible>(serve(req, seen, rx).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            port,
            seen,
            sse_release: Arc::new(Mutex::new(Some(tx))),
            _rt: rt,
        }
    }

    /// Release the next server-sent event.
    pub fn release_event(&self) {
        if let Some(tx) = self.sse_release.lock().unwrap().as_ref() {
            let _ = tx.send(());
        }
    }
}

async fn serve(
    req: Request<hyper::body::Incoming>,
    seen: Seen,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<()>>>,
) -> Response<Body> {
    if req.uri().path().ends_with("/ws") && req.headers().contains_key("upgrade") {
        return websocket(req, seen);
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        // Credentials are echoed as their digest, so that the echo itself leaks nothing.
        let value = if k == "authorization" {
            format!(
                "sha256:{}",
                super::sha256_hex(&String::from_utf8_lossy(v.as_bytes()))
            )
        } else {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        };
        headers.insert(k.as_str().to_string(), serde_json::Value::String(value));
    }
    let record = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    seen.0.lock().unwrap().push(record.clone());
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    // TRACE, answered as servers that allow it do: the request as received, credentials and all.
    if parts.method == hyper::Method::TRACE {
        let mut echo = format!("TRACE {} HTTP/1.1\r\n", parts.uri);
        for (k, v) in &parts.headers {
            echo.push_str(&format!(
                "{k}: {}\r\n",
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        return full("message/http", echo);
    }
    match path {
        p if p.ends_with("/echo") => full("application/json", record.to_string()),
        "/customers/1" => full("application/json", CUSTOMER),
        // An upstream that takes its time to answer.
        "/slow" => {
            tokio::time::sleep(std::time::Duration::from_secs(20)).await;
            full("application/json", "{}")
        }
        // JSON served as text/plain: masks must recognise it by content.
        "/customers/1.txt" => full("text/plain", CUSTOMER),
        "/note" => full(
            "text/plain; charset=utf-8",
            "call me: ada@example.com\nbye\n",
        ),
        // Cookies as an application sets them: site-wide, for a parent domain, and one named
        // like the gateway's own.
        "/set-cookie" => Response::builder()
            .header("content-type", "application/json")
            .header(
                "set-cookie",
                "sid=s3cr3t; Path=/; Domain=localhost; Secure; HttpOnly",
            )
            .header("set-cookie", "pref=1; Path=/v1/; SameSite=Lax")
            .header("set-cookie", "tollgate_session=fixed; Path=/")
            .header("set-cookie", "lang=en")
            .body(Full::new(Bytes::from_static(b"{}")).boxed())
            .unwrap(),
        // Redirects to itself (absolute, with its own origin, and by path) and elsewhere.
        "/redirect" | "/redirect-rel" | "/redirect-away" => {
            let host = parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let location = match path {
                "/redirect" => format!("https://{host}/v1/next?a=1"),
                "/redirect-rel" => "/v1/next".to_string(),
                _ => "https://example.org/x".to_string(),
            };
            Response::builder()
                .status(302)
                .header("location", location)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{}")).boxed())
                .unwrap()
        }
        "/image" => full("image/png", vec![0x89u8, b'P', b'N', b'G', 0, 1, 2, 3]),
        // Compressed although the gateway asked for identity: it must decode (and mask) them.
        "/gzipped" => compressed("gzip", gzip(CUSTOMER.as_bytes())),
        "/brotli" => compressed("br", brotli(CUSTOMER.as_bytes())),
        "/zstd" => compressed("zstd", zstd::encode_all(CUSTOMER.as_bytes(), 3).unwrap()),
        // Claims gzip, is not.
        "/gzipped-bad" => compressed("gzip", b"\x1f\x8b\x08\x00not-really".to_vec()),
        // A coding nobody decodes any more.
        "/compress" => compressed("compress", CUSTOMER.as_bytes().to_vec()),
        "/big" => {
            // A JSON array of `n` records, streamed in chunks of 100 records.
            let n: usize = query
                .strip_prefix("n=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            let stream = futures_util::stream::iter((0..n.div_ceil(100)).map(move |chunk| {
                Ok::<_, Infallible>(Frame::data(Bytes::from(big_chunk(n, chunk))))
            }));
            Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "/big.gz" => {
            // The same array gzipped, streamed in 4 KiB pieces of the compressed bytes.
            let n: usize = query
                .strip_prefix("n=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            let plain: String = (0..n.div_ceil(100)).map(|c| big_chunk(n, c)).collect();
            let gz = gzip(plain.as_bytes());
            let pieces: Vec<Bytes> = gz.chunks(4096).map(Bytes::copy_from_slice).collect();
            let stream = futures_util::stream::iter(
                pieces
                    .into_iter()
                    .map(|p| Ok::<_, Infallible>(Frame::data(p))),
            );
            Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        "/sse" => {
            // Three events, each sent when the test releases it.
            let stream = futures_util::stream::unfold(0u32, move |i| {
                let rx = rx.clone();
                async move {
                    if i == 3 {
                        return None;
                    }
                    rx.lock().await.recv().await?;
                    let ev = format!(
                        "id: {i}\ndata: {{\"n\":{i},\"email\":\"user{i}@example.com\"}}\n\n"
                    );
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(ev))), i + 1))
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        _ => full(
            "application/json",
            serde_json::json!({"ok": true, "method": parts.method.as_str(), "path": path})
                .to_string(),
        ),
    }
}

/// Records `chunk * 100 ..` of `/big`'s array of `n`.
fn big_chunk(n: usize, chunk: usize) -> String {
    let mut s = String::new();
    if chunk == 0 {
        s.push('[');
    }
    for i in chunk * 100..((chunk + 1) * 100).min(n) {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"i":{i},"customer":{{"email":"user{i}@example.com"}},"card_number":"4111111111111111","filler":"{}"}}"#,
            "x".repeat(64)
        ));
    }
    if (chunk + 1) * 100 >= n {
        s.push(']');
    }
    s
}

/// A JSON answer sent with `Content-Encoding: coding`.
fn compressed(coding: &str, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .header("content-encoding", coding)
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

fn gzip(plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(plain).unwrap();
    e.finish().unwrap()
}

fn brotli(plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(plain).unwrap();
    }
    out
}

/// A WebSocket echo: records the upgrade request (headers as seen) and each message received
/// (`{"ws": direction, "text"|"binary": ...}`), and sends every text and binary message back.
fn websocket(mut req: Request<hyper::body::Incoming>, seen: Seen) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};

    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let value = if k == "authorization" {
            format!(
                "sha256:{}",
                super::sha256_hex(&String::from_utf8_lossy(v.as_bytes()))
            )
        } else {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        };
        headers.insert(k.as_str().to_string(), serde_json::Value::String(value));
    }
    seen.0.lock().unwrap().push(serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    }));
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return full("text/plain", "no key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let protocol = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_string());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => {
                    seen.0
                        .lock()
                        .unwrap()
                        .push(serde_json::json!({"ws": "received", "text": t.as_str()}));
                    Message::Text(t)
                }
                Message::Binary(b) => {
                    seen.0
                        .lock()
                        .unwrap()
                        .push(serde_json::json!({"ws": "received", "binary": b.len()}));
                    Message::Binary(b)
                }
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
        // The close handshake is answered by the stream itself; let it flush.
        let _ = ws.close(None).await;
    });
    let mut r = Response::builder()
        .status(101)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept);
    if let Some(p) = protocol {
        r = r.header("sec-websocket-protocol", p);
    }
    r.body(Full::new(Bytes::new()).boxed()).unwrap()
}
