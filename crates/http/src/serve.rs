//! Client connections: TLS, then HTTP/1.1 or HTTP/2 (by ALPN), each request handed to the
//! relay with what the connection established (peer, client certificate, TLS parameters).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tollgate_gate::event::TlsLeg;
use tollgate_gate::limits::{ConnectionLimits, SourceSlot};
use tollgate_identity::{Identity, IdentityError};
use tollgate_tls::ReloadableServerTls;

use crate::HttpGateway;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How requests name their resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mount {
    /// `https_listen`: `/r/<name>/<path>`, beside the API and console.
    Prefixed,
    /// `http_listen`: the first label of the request's host (`<name>.gateway.example`).
    ByHost,
}

impl Mount {
    pub fn listener(self) -> &'static str {
        match self {
            Mount::Prefixed => "https",
            Mount::ByHost => "http",
        }
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// What a client connection established before its first request.
pub struct ConnCtx {
    pub id: u64,
    pub peer: SocketAddr,
    /// The identity of a verified client certificate, if one was presented.
    pub cert: Option<Result<Identity, IdentityError>>,
    pub tls: TlsLeg,
    pub mount: Mount,
    /// `HTTP/2` or `HTTP/1.1`, by ALPN.
    pub http_version: &'static str,
    /// The peer's address as `X-Forwarded-For` carries it upstream.
    pub forwarded_for: Option<hyper::header::HeaderValue>,
}

impl ConnCtx {
    /// The context of a TLS connection just accepted.
    pub fn new(peer: SocketAddr, conn: &rustls::ServerConnection, mount: Mount) -> ConnCtx {
        let info = tollgate_tls::session_info(conn);
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|der| tollgate_identity::from_certificate(der));
        ConnCtx {
            id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            peer,
            cert,
            http_version: if info.alpn.as_deref() == Some("h2") {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            tls: crate::tls_leg(&info),
            mount,
            forwarded_for: hyper::header::HeaderValue::from_str(&peer.ip().to_string()).ok(),
        }
    }
}

/// The connection builder both listeners use: HTTP/1.1 and HTTP/2, bounded heads, slow
/// clients timed out.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(MAX_HEAD_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(128)
        .keep_alive_interval(Duration::from_secs(30));
    b
}

/// Take a connection slot for an accepted connection, or count it refused (over a cap the
/// connection is closed before TLS: a flood costs the gateway no handshakes).
pub fn admit(
    limits: &Arc<ConnectionLimits>,
    peer: SocketAddr,
    listener: &'static str,
) -> Option<SourceSlot> {
    match limits.admit(peer.ip()) {
        Ok(slot) => Some(slot),
        Err(cap) => {
            tollgate_metrics::registry()
                .counter(
                    "tollgate_connections_refused_total",
                    "Client connections (or API requests) refused before authentication completed, or over a connection cap, by listener and reason.",
                    &[("listener", listener), ("reason", cap.as_label())],
                )
                .inc();
            None
        }
    }
}

/// Serve `server.http_listen`: every request goes to the resource its host names. `limits`:
/// `server.max_connections` and `max_connections_per_source`, counted for this listener.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadableServerTls>,
    gw: Arc<HttpGateway>,
    limits: Arc<ConnectionLimits>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "accept failed on the http listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = admit(&limits, peer, "http") else {
            continue;
        };
        let (tls, gw) = (tls.clone(), gw.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%peer, "http listener: TLS handshake failed or timed out");
                    return;
                }
            };
            let ctx = Arc::new(ConnCtx::new(peer, stream.get_ref().1, Mount::ByHost));
            let id = ctx.id;
            let svc_gw = gw.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (gw, ctx) = (svc_gw.clone(), ctx.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(crate::relay::handle(&gw, &ctx, req).await)
                }
            });
            let _ = builder()
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
            gw.connection_closed(id);
        });
    }
}
