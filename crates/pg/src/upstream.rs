//! The gateway → database leg: a fresh TCP + TLS connection per client session, verified
//! against the resource's CA and server name, authenticated with credentials the client never sees.

use crate::io::{read_frame, FrameBuf, IoError};
use crate::proto::backend::{self, AuthRequest};
use crate::proto::{frontend, startup};
use crate::scram::{self, ChannelBinding, ScramSha256};
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tollgate_config::Resource;
use tollgate_tls::TlsSessionInfo;

/// Everything needed to open (or cancel on) a resource's upstream, prepared once at start-up.
pub struct UpstreamTarget {
    pub resource: Resource,
    /// `None` only for `tls.mode = "disable"`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The resource's masking rules, compiled (`None` when it has none).
    pub mask: Option<Arc<tollgate_mask::Policy>>,
    /// The masking rules without group exceptions, for captured results.
    pub audit_mask: Option<Arc<tollgate_mask::Policy>>,
    /// The resource's guardrails (`None`: no rules and not read-only, nothing to decide).
    pub policy: Option<tollgate_policy::ResourcePolicy>,
}

impl UpstreamTarget {
    pub fn new(resource: Resource) -> Result<Self, tollgate_tls::TlsError> {
        let tls = tollgate_tls::resource_client_config(
            &resource.name,
            &resource.tls,
            vec![b"postgresql".to_vec()],
        )?;
        Ok(UpstreamTarget {
            resource,
            tls,
            mask: None,
            audit_mask: None,
            policy: None,
        })
    }

    /// Open a TCP (+TLS) connection to the upstream, without speaking PostgreSQL yet.
    pub async fn open_stream(&self) -> Result<UpStream, UpstreamError> {
        let r = &self.resource;
        let tcp = tokio::time::timeout(
            r.connect_timeout,
            TcpStream::connect((r.upstream_host.as_str(), r.upstream_port)),
        )
        .await
        .map_err(|_| UpstreamError::Timeout(r.connect_timeout))?
        .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(UpStream::Plain(tcp));
        };
        let mut tcp = tcp;
        tcp.write_all(&startup::encode_ssl_request())
            .await
            .map_err(UpstreamError::Connect)?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(r.connect_timeout, tcp.read_exact(&mut answer))
            .await
            .map_err(|_| UpstreamError::Timeout(r.connect_timeout))?
            .map_err(UpstreamError::Connect)?;
        if answer[0] != b'S' {
            return Err(UpstreamError::TlsRefused);
        }
        let name = ServerName::try_from(r.tls.server_name.clone())
            .map_err(|_| UpstreamError::BadServerName(r.tls.server_name.clone()))?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        let stream = tokio::time::timeout(r.connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::Timeout(r.connect_timeout))?
            .map_err(|e| UpstreamError::Tls(tollgate_tls::classify_handshake_error(&e), e))?;
        Ok(UpStream::Tls(Box::new(stream)))
    }

    /// Connect, start up as the resource's user and authenticate; returns once the upstream is ready for queries.
    pub async fn connect(
        &self,
        client_params: &[(String, String)],
        max_message: usize,
    ) -> Result<Connected, UpstreamError> {
        let r = &self.resource;
        let creds = r.credentials.as_ref().ok_or(UpstreamError::NoCredentials)?;
        let password = creds.password.read().map_err(UpstreamError::Secret)?;
        let mut stream = self.open_stream().await?;
        let tls_info = stream.tls_info();
        let database = r.database.clone().unwrap_or_else(|| r.name.clone());
        let guarded = r.read_only || !r.rules.is_empty();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", creds.user.as_str()),
            ("database", database.as_str()),
        ];
        for (k, v) in client_params {
            // Setting names are case-insensitive, and `options` also takes `--name-with-dashes`.
            let (k_norm, v_norm) = (
                k.to_ascii_lowercase().replace('-', "_"),
                v.to_ascii_lowercase().replace('-', "_"),
            );
            let (k, v) = (k.as_str(), v.as_str());
            // A read-only resource's sessions start read-only, and the client cannot undo that
            // at start-up (the policy refuses SET default_transaction_read_only and friends).
            let weakens_read_only = r.read_only
                && (k_norm.contains("read_only")
                    || (k_norm == "options" && v_norm.contains("read_only")));
            // Under guardrails the server must read SQL as the classifier does: standard strings
            // and UTF-8, so a backslash or a multi-byte character cannot hide a statement.
            let changes_reading = guarded
                && (k_norm == "standard_conforming_strings"
                    || k_norm == "client_encoding"
                    || (k_norm == "options"
                        && (v_norm.contains("standard_conforming")
                            || v_norm.contains("encoding"))));
            if passthrough(k) && !weakens_read_only && !changes_reading {
                params.push((k, v));
            }
        }
        if r.read_only {
            params.push(("default_transaction_read_only", "on"));
        }
        if guarded {
            params.push(("standard_conforming_strings", "on"));
            params.push(("client_encoding", "UTF8"));
        }
        stream
            .write_all(&startup::encode_startup(0, &params))
            .await
            .map_err(UpstreamError::Connect)?;

        let deadline = tokio::time::Instant::now() + r.connect_timeout;
        let mut buf = FrameBuf::new();
        let mut scram: Option<ScramSha256> = None;
        let mut server_params = Vec::new();
        let mut key = None;
        loop {
            let (tag, body) =
                tokio::time::timeout_at(deadline, read_frame(&mut stream, &mut buf, max_message))
                    .await
                    .map_err(|_| UpstreamError::Timeout(r.connect_timeout))?
                    .map_err(UpstreamError::Io)?;
            match tag {
                b'R' => {
                    let req = backend::parse_auth(&body)
                        .map_err(|_| UpstreamError::Protocol("malformed authentication request"))?;
                    let reply = match req {
                        AuthRequest::Ok => None,
                        AuthRequest::Cleartext => {
                            if tls_info.is_none() {
                                return Err(UpstreamError::Protocol("upstream asked for a cleartext password over a connection without TLS; refusing to send it"));
                            }
                            Some(frontend::password(password.as_deref().ok_or(UpstreamError::PasswordNeeded)?))
                        }
                        AuthRequest::Md5(salt) => Some(frontend::password(&scram::md5_password(&creds.user, password.as_deref().ok_or(UpstreamError::PasswordNeeded)?, salt))),
                        AuthRequest::Sasl(mechs) => {
                            let pw = password.as_deref().ok_or(UpstreamError::PasswordNeeded)?;
                            let binding = match (&stream, mechs.iter().any(|m| m == "SCRAM-SHA-256-PLUS")) {
                                (UpStream::Tls(t), true) => t
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| scram::tls_server_end_point(c))
                                    .map(ChannelBinding::TlsServerEndPoint)
                                    .unwrap_or(ChannelBinding::None),
                                _ => ChannelBinding::None,
                            };
                            if matches!(binding, ChannelBinding::None) && !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                                return Err(UpstreamError::Protocol("upstream offers no SASL mechanism tollgate supports (SCRAM-SHA-256)"));
                            }
                            let s = ScramSha256::new(pw, binding);
                            let msg = frontend::sasl_initial(s.mechanism(), &s.client_first());
                            scram = Some(s);
                            Some(msg)
                        }
                        AuthRequest::SaslContinue(data) => {
                            let s = scram.as_mut().ok_or(UpstreamError::Protocol("SASL continue without SASL start"))?;
                            Some(frontend::sasl_response(&s.server_first(&data).map_err(|e| UpstreamError::Scram(e.to_string()))?))
                        }
                        AuthRequest::SaslFinal(data) => {
                            let s = scram.as_ref().ok_or(UpstreamError::Protocol("SASL final without SASL start"))?;
                            s.server_final(&data).map_err(|e| UpstreamError::Scram(e.to_string()))?;
                            None
                        }
                        AuthRequest::Other(_) => return Err(UpstreamError::Protocol("upstream asked for an authentication method tollgate does not support (use scram-sha-256, md5 or password)")),
                    };
                    if let Some(reply) = reply {
                        stream
                            .write_all(&reply)
                            .await
                            .map_err(UpstreamError::Connect)?;
                    }
                }
                b'S' => server_params.push(
                    backend::parse_parameter_status(&body)
                        .map_err(|_| UpstreamError::Protocol("malformed ParameterStatus"))?,
                ),
                b'K' => {
                    key = Some(
                        backend::parse_backend_key(&body)
                            .map_err(|_| UpstreamError::Protocol("malformed BackendKeyData"))?,
                    )
                }
                b'Z' => {
                    let status = body.first().copied().unwrap_or(b'I');
                    let (pid, secret) =
                        key.ok_or(UpstreamError::Protocol("upstream sent no BackendKeyData"))?;
                    // Bytes the upstream sent after ReadyForQuery belong to the relay.
                    let leftover = buf.take_rest();
                    return Ok(Connected {
                        stream,
                        params: server_params,
                        pid,
                        secret,
                        status,
                        tls_info,
                        leftover,
                    });
                }
                b'E' => {
                    let e = backend::parse_error(&body).unwrap_or_default();
                    return Err(UpstreamError::Rejected {
                        code: e.code,
                        message: e.message,
                    });
                }
                b'N' | b'v' => {}
                _ => {
                    return Err(UpstreamError::Protocol(
                        "unexpected message during upstream start-up",
                    ))
                }
            }
        }
    }

    /// Ask the upstream to cancel what backend `pid` is running (a CancelRequest on a new connection).
    pub async fn cancel(&self, pid: i32, secret: &[u8]) -> Result<(), UpstreamError> {
        let mut s = self.open_stream().await?;
        s.write_all(&startup::encode_cancel(pid, secret))
            .await
            .map_err(UpstreamError::Connect)?;
        s.flush().await.map_err(UpstreamError::Connect)?;
        // The server closes the connection without replying; wait briefly so the request is read.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
        Ok(())
    }
}

/// Client start-up parameters forwarded upstream. `user`/`database` come from the resource;
/// protocol extensions (`_pq_.*`) and replication are not forwarded.
fn passthrough(name: &str) -> bool {
    !matches!(name, "user" | "database" | "replication") && !name.starts_with("_pq_.")
}

/// An upstream ready for queries.
pub struct Connected {
    pub stream: UpStream,
    pub params: Vec<(String, String)>,
    pub pid: i32,
    pub secret: Vec<u8>,
    pub status: u8,
    pub tls_info: Option<TlsSessionInfo>,
    pub leftover: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream refused TLS (answered the SSLRequest with N)")]
    TlsRefused,
    #[error("TLS handshake failed ({label}): {1}", label = .0.as_label())]
    Tls(tollgate_tls::HandshakeFailure, io::Error),
    #[error("invalid tls.server_name {0:?}")]
    BadServerName(String),
    #[error("resource has no credentials")]
    NoCredentials,
    #[error("upstream asked for a password but the resource has none configured")]
    PasswordNeeded,
    #[error("{0}")]
    Secret(String),
    #[error("SCRAM authentication failed: {0}")]
    Scram(String),
    #[error("upstream rejected the connection: {code} {message}")]
    Rejected { code: String, message: String },
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("{0}")]
    Io(IoError),
}

impl UpstreamError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Io(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::TlsRefused => "tls_refused",
            UpstreamError::Tls(..) | UpstreamError::BadServerName(_) => "tls",
            UpstreamError::NoCredentials
            | UpstreamError::PasswordNeeded
            | UpstreamError::Secret(_) => "credentials",
            UpstreamError::Scram(_) | UpstreamError::Rejected { .. } => "auth",
            UpstreamError::Protocol(_) => "protocol",
        }
    }
}

/// The upstream byte stream: TLS, or plain TCP for an explicit `tls.mode = "disable"`.
pub enum UpStream {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Plain(TcpStream),
    /// Either, wrapped so that the session can be ended from outside the relay.
    Interruptible(Box<crate::interrupt::Interruptible<UpStream>>),
    /// Connections leased from the resource's pool (`pool_mode`).
    Pooled(Box<crate::pool::PoolStream>),
}

impl UpStream {
    /// The gateway's own address on this connection: what the upstream sees as the client
    /// (`pg_stat_activity.client_addr` / `client_port`).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            UpStream::Tls(t) => t.get_ref().0.local_addr(),
            UpStream::Plain(t) => t.local_addr(),
            UpStream::Interruptible(t) => t.get_ref().local_addr(),
            // The pool registers each of its connections itself.
            UpStream::Pooled(_) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    pub fn tls_info(&self) -> Option<TlsSessionInfo> {
        match self {
            UpStream::Tls(t) => Some(tollgate_tls::session_info(t.get_ref().1)),
            UpStream::Plain(_) => None,
            UpStream::Interruptible(t) => t.get_ref().tls_info(),
            UpStream::Pooled(_) => None,
        }
    }
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            UpStream::Plain(t) => Pin::new(t).poll_read(cx, buf),
            UpStream::Interruptible(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            UpStream::Pooled(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            UpStream::Plain(t) => Pin::new(t).poll_write(cx, buf),
            UpStream::Interruptible(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            UpStream::Pooled(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
            UpStream::Plain(t) => Pin::new(t).poll_flush(cx),
            UpStream::Interruptible(t) => Pin::new(t.as_mut()).poll_flush(cx),
            UpStream::Pooled(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            UpStream::Plain(t) => Pin::new(t).poll_shutdown(cx),
            UpStream::Interruptible(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            UpStream::Pooled(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
            UpStream::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            UpStream::Interruptible(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
            UpStream::Pooled(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpStream::Tls(t) => t.is_write_vectored(),
            UpStream::Plain(t) => t.is_write_vectored(),
            UpStream::Interruptible(t) => t.is_write_vectored(),
            UpStream::Pooled(_) => false,
        }
    }
}
