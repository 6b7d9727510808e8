//! The demo's HTTPS API behind the gateway: a small customer/invoice service with its own
//! certificate, which answers only requests that carry the credential the gateway injects.
//! At `/mcp` it is also a minimal MCP server (streamable HTTP, JSON answers) with tools to
//! look a customer up, refund an invoice and delete a customer.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use rustls_pki_types::pem::PemObject;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

const CUSTOMERS: &str = r#"[
  {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "card_number": "4242 4242 4242 4242", "plan": "pro"},
  {"id": 2, "name": "Grace Hopper", "email": "grace@example.com", "card_number": "5555 5555 5555 4444", "plan": "team"},
  {"id": 3, "name": "Alan Turing", "email": "alan@example.org", "card_number": "4000 0566 5566 5556", "plan": "free"}
]"#;

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    credential: Arc<String>,
) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == credential.as_bytes());
    if !authorized {
        return json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"missing or wrong API credential"}"#.into(),
        );
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "customers"]) => json(StatusCode::OK, format!(r#"{{"customers": {CUSTOMERS}}}"#)),
        (&Method::GET, ["v1", "customers", id]) => {
            let all: serde_json::Value = serde_json::from_str(CUSTOMERS).expect("static JSON");
            match all.as_array().and_then(|a| a.iter().find(|c| c["id"].to_string() == *id)) {
                Some(c) => json(StatusCode::OK, c.to_string()),
                None => json(StatusCode::NOT_FOUND, r#"{"error":"no such customer"}"#.into()),
            }
        }
        (&Method::POST, ["v1", "invoices", id, "refund"]) => json(
            StatusCode::OK,
            serde_json::json!({"invoice": id, "refunded": true, "request": String::from_utf8_lossy(&body)}).to_string(),
        ),
        (&Method::POST, ["mcp"]) => mcp(&body),
        (&Method::GET, ["mcp"]) => json(StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"this MCP server has no server-initiated stream"}"#.into()),
        (&Method::DELETE, _) => json(StatusCode::OK, r#"{"deleted": true}"#.into()),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"no such route"}"#.into()),
    }
}

/// The demo MCP server: one JSON-RPC message (or a batch) in, JSON out.
fn mcp(body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}"#.into(),
        );
    };
    let batch = v.is_array();
    let msgs = match v {
        serde_json::Value::Array(a) => a,
        m => vec![m],
    };
    let mut session = None;
    let answers: Vec<serde_json::Value> = msgs
        .iter()
        .filter_map(|m| {
            let id = m.get("id")?.clone();
            let method = m["method"].as_str().unwrap_or("");
            let result = match method {
                "initialize" => {
                    session = Some(format!("demo-{}", tollgate_server::random_hex(16)));
                    let asked = m["params"]["protocolVersion"].as_str().unwrap_or("");
                    let version = if ["2025-03-26", "2025-06-18", "2025-11-25"].contains(&asked) {
                        asked
                    } else {
                        "2025-06-18"
                    };
                    serde_json::json!({"protocolVersion": version, "capabilities": {"tools": {}},
                        "serverInfo": {"name": "tollgate-demo-billing", "version": "1.0.0"}})
                }
                "ping" => serde_json::json!({}),
                "tools/list" => serde_json::json!({"tools": [
                    {"name": "lookup_customer", "description": "Look a customer up by id",
                     "inputSchema": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
                    {"name": "refund_invoice", "description": "Refund an invoice",
                     "inputSchema": {"type": "object", "properties": {"invoice": {"type": "string"}, "amount_cents": {"type": "integer"}}, "required": ["invoice", "amount_cents"]}},
                    {"name": "delete_customer", "description": "Delete a customer",
                     "inputSchema": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
                ]}),
                "tools/call" => {
                    let args = &m["params"]["arguments"];
                    match m["params"]["name"].as_str().unwrap_or("") {
                        "lookup_customer" => {
                            let all: serde_json::Value =
                                serde_json::from_str(CUSTOMERS).expect("static JSON");
                            let id = args["id"].as_str().unwrap_or("");
                            match all.as_array().and_then(|a| a.iter().find(|c| c["id"].to_string() == id)) {
                                Some(c) => serde_json::json!({
                                    "content": [{"type": "text", "text": format!("{} <{}>, card {}, plan {}", c["name"].as_str().unwrap_or(""), c["email"].as_str().unwrap_or(""), c["card_number"].as_str().unwrap_or(""), c["plan"].as_str().unwrap_or(""))}],
                                    "structuredContent": {"customer": c},
                                }),
                                None => serde_json::json!({"content": [{"type": "text", "text": "no such customer"}], "isError": true}),
                            }
                        }
                        "refund_invoice" => serde_json::json!({"content": [{"type": "text", "text": format!("invoice {} refunded ({} cents)", args["invoice"].as_str().unwrap_or("?"), args["amount_cents"])}]}),
                        "delete_customer" => serde_json::json!({"content": [{"type": "text", "text": "deleted"}]}),
                        other => {
                            return Some(serde_json::json!({"jsonrpc": "2.0", "id": id,
                                "error": {"code": -32602, "message": format!("unknown tool {other:?}")}}))
                        }
                    }
                }
                other => {
                    return Some(serde_json::json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32601, "message": format!("method {other:?} not found")}}))
                }
            };
            Some(serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}))
        })
        .collect();
    if answers.is_empty() {
        return Response::builder()
            .status(StatusCode::ACCEPTED)
            .body(Full::new(Bytes::new()))
            .expect("static response");
    }
    let body = if batch {
        serde_json::Value::Array(answers)
    } else {
        answers.into_iter().next().unwrap_or_default()
    };
    let mut r = json(StatusCode::OK, body.to_string());
    if let Some(s) = session.and_then(|s| hyper::header::HeaderValue::from_str(&s).ok()) {
        r.headers_mut().insert("mcp-session-id", s);
    }
    r
}

/// Serve the demo API over TLS on `127.0.0.1:port` until the runtime stops.
pub async fn serve(port: u16, cert: &Path, key: &Path, credential: String) -> anyhow::Result<()> {
    let certs =
        rustls_pki_types::CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let credential = Arc::new(credential);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, credential) = (acceptor.clone(), credential.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let credential = credential.clone();
                    async move { Ok::<_, Infallible>(answer(req, credential).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok(())
}
