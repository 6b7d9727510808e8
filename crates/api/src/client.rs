//! A small blocking HTTPS client for the API: GET and JSON POST, one request per connection
//! (`Connection: close`), bodies by `Content-Length`, chunked encoding or end of stream.
//! The gateway's certificate is always verified against the given CA, hostname included.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;
pub use serde::de::DeserializeOwned;

use crate::view::ErrorBody;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_HEAD: usize = 64 * 1024;
const MAX_ERROR_BODY: u64 = 1024 * 1024;

/// How to reach and authenticate to the gateway.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `https://host:port`.
    pub gateway: String,
    /// CA certificate(s) the gateway's certificate must chain to.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the gateway at {gateway}: {source} (is the gateway running with server.https_listen set, and is the address right?)")]
    Unreachable {
        gateway: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS with the gateway at {gateway} failed: {reason}")]
    Tls { gateway: String, reason: String },
    /// A non-2xx answer, with the API's error body.
    #[error("the gateway answered {status}: {}", body.error)]
    Status { status: u16, body: ErrorBody },
    #[error("the gateway's answer could not be read: {0}")]
    Protocol(String),
}

/// A configured client; each request opens its own connection.
pub struct ApiClient {
    gateway: String,
    host: String,
    port: u16,
    base_path: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

/// `https://host[:port][/base]` → (host, port, base path).
fn parse_gateway(url: &str) -> Result<(String, u16, String), ClientError> {
    let usage = |why: &str| {
        ClientError::Usage(format!(
            "gateway URL {url:?} {why}: write https://HOST:PORT (the gateway's server.https_listen)"
        ))
    };
    if url.starts_with("http://") {
        return Err(usage("is plain HTTP; the API is served over HTTPS only"));
    }
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| usage("does not start with https://"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| usage("has an unclosed ["))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(usage("has no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| usage("has a bad port"))?,
        None => 443,
    };
    Ok((
        host.to_string(),
        port,
        path.trim_end_matches('/').to_string(),
    ))
}

impl ApiClient {
    pub fn new(opts: &ClientOptions) -> Result<Self, ClientError> {
        let (host, port, base_path) = parse_gateway(&opts.gateway)?;
        let ca = opts.ca.as_ref().ok_or_else(|| {
            ClientError::Usage(
                "the gateway's CA certificate is needed to verify it: pass --ca FILE (or set TOLLGATE_CA)".into(),
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in
            tollgate_tls::load_certs(ca).map_err(|e| ClientError::Usage(format!("--ca: {e}")))?
        {
            roots
                .add(c)
                .map_err(|e| ClientError::Usage(format!("--ca {}: {e}", ca.display())))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(tollgate_tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Usage(format!("TLS set-up: {e}")))?
            .with_root_certificates(roots);
        let mut tls = match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                let certs = tollgate_tls::load_certs(cert)
                    .map_err(|e| ClientError::Usage(format!("--cert: {e}")))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| ClientError::Usage(format!("--key {}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| ClientError::Usage(format!("--cert/--key do not match: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(ClientError::Usage(
                    "--cert and --key go together (TOLLGATE_CERT and TOLLGATE_KEY)".into(),
                ))
            }
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(host.clone()).map_err(|_| {
            ClientError::Usage(format!("{host:?} is not a valid host name or IP address"))
        })?;
        Ok(ApiClient {
            gateway: opts.gateway.clone(),
            host,
            port,
            base_path,
            server_name,
            tls: Arc::new(tls),
            token: opts.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// GET `path_and_query` and decode a JSON answer.
    pub fn get_json<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, ClientError> {
        let mut body = Vec::new();
        self.get_to(path_and_query, &mut body)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("bad JSON: {e}")))
    }

    /// GET `path_and_query` and copy a 2xx body to `out` as it arrives; returns its length.
    pub fn get_to(&self, path_and_query: &str, out: &mut dyn Write) -> Result<u64, ClientError> {
        self.send("GET", path_and_query, None, out)
    }

    /// POST `body` as JSON to `path` and decode a JSON answer.
    pub fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let mut out = Vec::new();
        let body = serde_json::to_vec(body).expect("JSON values serialize");
        self.send("POST", path, Some(&body), &mut out)?;
        serde_json::from_slice(&out).map_err(|e| ClientError::Protocol(format!("bad JSON: {e}")))
    }

    fn send(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
        out: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let mut stream = self.connect()?;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let content = body.map_or(String::new(), |b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        });
        let mut request = format!(
            "{method} {}{} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: tollgate-cli\r\nAccept: application/json, application/x-ndjson\r\n{auth}{content}Connection: close\r\n\r\n",
            self.base_path, path_and_query, self.port
        )
        .into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        stream
            .write_all(&request)
            .and_then(|_| stream.flush())
            .map_err(|e| self.io_error(e))?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader).map_err(|e| self.io_error(e))?;
        if !(200..300).contains(&head.status) {
            let mut body = Vec::new();
            read_body(
                &mut reader,
                &head,
                &mut (&mut body).take_writer(MAX_ERROR_BODY),
            )
            .map_err(|e| self.io_error(e))?;
            let body = serde_json::from_slice::<ErrorBody>(&body).unwrap_or_else(|_| ErrorBody {
                error: String::from_utf8_lossy(&body).trim().to_string(),
                hint: None,
            });
            return Err(ClientError::Status {
                status: head.status,
                body,
            });
        }
        read_body(&mut reader, &head, out).map_err(|e| self.io_error(e))
    }

    fn connect(
        &self,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            gateway: self.gateway.clone(),
            source,
        };
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(unreachable)?
            .collect();
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            "the host name resolves to no address",
        );
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut tcp = tcp.ok_or_else(|| unreachable(last))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT)).ok();
        tcp.set_write_timeout(Some(READ_TIMEOUT)).ok();
        let mut conn = rustls::ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(|e| self.tls_error(&e))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| self.io_error(e))?;
        }
        Ok(rustls::StreamOwned::new(conn, tcp))
    }

    fn tls_error(&self, e: &rustls::Error) -> ClientError {
        let hint = match e {
            rustls::Error::InvalidCertificate(_) => {
                " (the gateway's certificate does not verify against --ca for this host name; check --ca / TOLLGATE_CA and the URL)"
            }
            rustls::Error::AlertReceived(_) => {
                " (the gateway refused the TLS session; is --cert issued by the gateway's client CA?)"
            }
            _ => "",
        };
        ClientError::Tls {
            gateway: self.gateway.clone(),
            reason: format!("{e}{hint}"),
        }
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return self.tls_error(tls);
        }
        match e.kind() {
            io::ErrorKind::InvalidData => ClientError::Protocol(e.to_string()),
            _ => ClientError::Unreachable {
                gateway: self.gateway.clone(),
                source: e,
            },
        }
    }
}

/// Writer adapter that keeps at most `limit` bytes (error bodies are small; never trust that).
trait TakeWriter: Write + Sized {
    fn take_writer(self, limit: u64) -> Limited<Self> {
        Limited {
            inner: self,
            left: limit,
        }
    }
}
impl<W: Write> TakeWriter for W {}

struct Limited<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.inner.write_all(&buf[..n])?;
        self.left -= n as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[derive(Debug)]
struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line(r: &mut impl BufRead, budget: &mut usize) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(bad("the connection closed before the answer was complete"));
    }
    if n > *budget {
        return Err(bad("response head too large"));
    }
    *budget -= n;
    let line = String::from_utf8(line).map_err(|_| bad("response head is not UTF-8"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(r, &mut budget)?;
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1.x answer: {status_line:?}")));
    }
    let status = code
        .parse()
        .map_err(|_| bad(format!("bad status line {status_line:?}")))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
    };
    loop {
        let line = read_line(r, &mut budget)?;
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().map_err(|_| bad("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        }
    }
}

fn read_body(r: &mut impl BufRead, head: &Head, out: &mut dyn Write) -> io::Result<u64> {
    if head.chunked {
        let mut total = 0u64;
        loop {
            let mut budget = MAX_HEAD;
            let line = read_line(r, &mut budget)?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the blank line that ends the body.
                while !read_line(r, &mut budget)?.is_empty() {}
                return Ok(total);
            }
            copy_exact(r, size, out)?;
            total += size;
            if !read_line(r, &mut budget)?.is_empty() {
                return Err(bad("chunk not followed by CRLF"));
            }
        }
    }
    if let Some(len) = head.content_length {
        copy_exact(r, len, out)?;
        return Ok(len);
    }
    // Neither: the body runs to the end of the connection.
    match io::copy(r, out) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(e),
    }
}

fn copy_exact(r: &mut impl BufRead, len: u64, out: &mut dyn Write) -> io::Result<()> {
    let n = io::copy(&mut r.take(len), out)?;
    if n != len {
        return Err(bad("the connection closed in the middle of the answer"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(raw: &str) -> io::Result<(u16, Vec<u8>)> {
        let mut r = BufReader::new(raw.as_bytes());
        let head = read_head(&mut r)?;
        let mut out = Vec::new();
        read_body(&mut r, &head, &mut out)?;
        Ok((head.status, out))
    }

    #[test]
    fn reads_content_length_chunked_and_to_eof_bodies() {
        assert_eq!(
            body_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap(),
            (200, b"hello".to_vec())
        );
        assert_eq!(
            body_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n")
                .unwrap(),
            (200, b"hello world".to_vec())
        );
        assert_eq!(
            body_of("HTTP/1.0 404 Not Found\r\n\r\n{}").unwrap(),
            (404, b"{}".to_vec())
        );
    }

    #[test]
    fn truncated_answers_are_errors_not_short_bodies() {
        assert!(body_of("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello").is_err());
        assert!(
            body_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").is_err()
        );
        assert!(body_of("SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn gateway_urls() {
        assert_eq!(
            parse_gateway("https://localhost:8443").unwrap(),
            ("localhost".into(), 8443, String::new())
        );
        assert_eq!(
            parse_gateway("https://[::1]:9/x/").unwrap(),
            ("::1".into(), 9, "/x".into())
        );
        assert_eq!(parse_gateway("https://gw.example").unwrap().1, 443);
        for bad in [
            "http://localhost:8443",
            "localhost:8443",
            "https://:1",
            "https://h:port",
        ] {
            let e = parse_gateway(bad).unwrap_err().to_string();
            assert!(e.contains("https://HOST:PORT"), "{bad}: {e}");
        }
    }
}
