//! Outgoing webhooks: one HTTPS POST (plain HTTP only to a loopback receiver) with the
//! receiver's certificate verified against a CA bundle, and a retry loop with exponential
//! back-off. Shared by scan alerts (`tollgate-scan`) and review notifications (`tollgate-review`).
//!
//! It owns the wire exchange only: it must not decide what is sent, queue documents or count
//! metrics; its callers do.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The system CA bundle on Debian/Ubuntu (and Alpine), used when no CA file is configured.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Longest one delivery attempt (connect, TLS, request, status line) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// One webhook receiver: its URL and, for https, the TLS client configuration that verifies it.
#[derive(Clone)]
pub struct Target {
    pub url: WebhookUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish()
    }
}

impl Target {
    /// `ca`: the bundle the receiver's certificate must chain to (default: [`SYSTEM_BUNDLE`]).
    /// `what` names the setting in errors (e.g. "alert webhook CA").
    pub fn new(url: &str, ca: Option<&Path>, what: &str) -> Result<Target, String> {
        let url = WebhookUrl::parse(url)?;
        let tls = if url.tls {
            let bundle = ca
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(SYSTEM_BUNDLE));
            Some(client_config(&bundle, what)?)
        } else {
            None
        };
        Ok(Target { url, tls })
    }

    /// One POST of `body`; `Ok` only for a 2xx answer.
    pub async fn post(&self, content_type: &str, body: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            post(&self.url, self.tls.clone(), content_type, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {}s", ATTEMPT_TIMEOUT.as_secs())),
        }
    }

    /// POST until a 2xx answer, at most `attempts` times, sleeping `first_delay` after the first
    /// failure and doubling it after each next one. Returns the attempts made, or the last error.
    pub async fn deliver(
        &self,
        content_type: &str,
        body: &[u8],
        attempts: u32,
        first_delay: Duration,
        what: &str,
    ) -> Result<u32, String> {
        let mut delay = first_delay;
        let mut last = String::new();
        for attempt in 1..=attempts.max(1) {
            match self.post(content_type, body).await {
                Ok(()) => return Ok(attempt),
                Err(e) => {
                    tracing::warn!(attempt, host = %self.url.host, error = %e, "{what} delivery failed");
                    last = e;
                }
            }
            if attempt < attempts {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
        Err(last)
    }
}

fn client_config(bundle: &Path, what: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = tollgate_tls::load_certs(bundle).map_err(|e| format!("{what}: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{what}: no usable certificate in {}",
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
    content_type: &str,
    body: &[u8],
) -> Result<(), String> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| e.to_string())?;
    match tls {
        None => exchange(tcp, url, content_type, body).await,
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| e.to_string())?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            exchange(s, url, content_type, body).await
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &WebhookUrl,
    content_type: &str,
    body: &[u8],
) -> Result<(), String> {
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: tollgate\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.path,
        url.port,
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.map_err(|e| e.to_string())?;
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

    #[test]
    fn urls() {
        let u = WebhookUrl::parse("https://hooks.example/a/b?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "hooks.example", 443, "/a/b?x=1")
        );
        let u = WebhookUrl::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((u.port, u.path.as_str()), (9000, "/"));
        let u = WebhookUrl::parse("https://[::1]:8443/h").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert!(WebhookUrl::parse("http://hooks.example/x").is_err());
        assert!(WebhookUrl::parse("ftp://x").is_err());
        assert!(WebhookUrl::parse("https://user:pw@x/").is_err());
        assert!(WebhookUrl::parse("https://user:pw@x/").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("tg-webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e =
            Target::new("https://hooks.example/x", Some(&empty), "review webhook CA").unwrap_err();
        assert!(e.starts_with("review webhook CA"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
