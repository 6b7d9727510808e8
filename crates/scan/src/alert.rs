//! Findings to a webhook: a JSON POST over HTTPS (plain HTTP only to a loopback receiver),
//! from a background task with a bounded queue, retries and backoff, so alerting can never
//! block or slow the gateway.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The system CA bundle on Debian/Ubuntu (and Alpine), used when no `alert_webhook_ca` is set.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const QUEUE: usize = 32;
const ATTEMPTS: u32 = 4;

/// A parsed webhook URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl WebhookUrl {
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?}: expected an https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(
                "credentials in the webhook URL are not supported; put a token in the path".into(),
            );
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or("unbalanced [ in host")?;
            (
                h.to_string(),
                p.strip_prefix(':')
                    .map(str::parse)
                    .transpose()
                    .map_err(|_| "bad port")?
                    .unwrap_or(default_port),
            )
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| "bad port")?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err(format!(
                "{url:?}: plain http:// is only allowed to a loopback address"
            ));
        }
        Ok(WebhookUrl {
            tls,
            host,
            port,
            path,
        })
    }
}

/// Sends JSON documents to the webhook in the background.
#[derive(Clone)]
pub struct Webhook {
    tx: mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Start the sender task (needs a tokio runtime).
    pub fn start(url: &str, ca: Option<&Path>) -> Result<Webhook, String> {
        let url = WebhookUrl::parse(url)?;
        let tls = if url.tls {
            let bundle = ca
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(SYSTEM_BUNDLE));
            Some(client_config(&bundle)?)
        } else {
            None
        };
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(QUEUE);
        tokio::spawn(async move {
            while let Some(doc) = rx.recv().await {
                let body = doc.to_string();
                let mut delay = Duration::from_millis(500);
                for attempt in 1..=ATTEMPTS {
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        post(&url, tls.clone(), &body),
                    )
                    .await
                    {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => {
                            tracing::warn!(attempt, host = %url.host, error = %e, "alert webhook delivery failed")
                        }
                        Err(_) => {
                            tracing::warn!(attempt, host = %url.host, "alert webhook delivery timed out")
                        }
                    }
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        });
        Ok(Webhook { tx })
    }

    /// Queue a document; when the queue is full (receiver down for long) it is dropped and logged.
    pub fn send(&self, doc: serde_json::Value) {
        if self.tx.try_send(doc).is_err() {
            tracing::warn!("alert webhook queue is full; dropping an alert");
        }
    }
}

fn client_config(bundle: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = tollgate_tls::load_certs(bundle).map_err(|e| format!("alert webhook CA: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "alert webhook CA: no usable certificate in {}",
            bundle.display()
        ));
    }
    let c = rustls::ClientConfig::builder_with_provider(tollgate_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(c))
}

async fn post(
    url: &WebhookUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    body: &str,
) -> Result<(), String> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| e.to_string())?;
    match tls {
        None => exchange(tcp, url, body).await,
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| e.to_string())?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            exchange(s, url, body).await
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &WebhookUrl,
    body: &str,
) -> Result<(), String> {
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: tollgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.path,
        url.port,
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Only the status line matters.
    while !head.ends_with(b"\r\n") && head.len() < 1024 {
        if s.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {:?}", line.trim()))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("the receiver answered {}", line.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls() {
        let u = WebhookUrl::parse("https://hooks.example/a/b?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "hooks.example", 443, "/a/b?x=1")
        );
        let u = WebhookUrl::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((u.port, u.path.as_str()), (9000, "/"));
        assert!(WebhookUrl::parse("http://hooks.example/x").is_err());
        assert!(WebhookUrl::parse("ftp://x").is_err());
        assert!(WebhookUrl::parse("https://user:pw@x/").is_err());
    }

    /// A receiver that answers 503 once, then 204: the sender retries and the second POST lands.
    #[tokio::test]
    async fn posts_json_and_retries() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let receiver = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for status in ["503 Service Unavailable", "204 No Content"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len {
                            assert!(head.starts_with("POST /hook HTTP/1.1\r\n"), "{head}");
                            bodies.push(body.to_string());
                            break;
                        }
                    }
                    assert!(n > 0, "request cut short");
                }
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            bodies
        });
        let hook = Webhook::start(&format!("http://127.0.0.1:{port}/hook"), None).unwrap();
        hook.send(serde_json::json!({"kind": "scan.findings", "n": 1}));
        let bodies = tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bodies.len(), 2);
        let doc: serde_json::Value = serde_json::from_str(&bodies[1]).unwrap();
        assert_eq!(doc["kind"], "scan.findings");
    }
}
