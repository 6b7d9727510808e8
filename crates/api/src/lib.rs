//! tollgate's HTTPS API on `server.https_listen`: its routes, who is calling (a verified client
//! certificate or a service token), and role checks (`roles.auditor_groups` / `admin_groups`).
//! Requests under `/r/<name>/` go to the HTTP resource adapter (`tollgate-http`).
//! Also a small blocking HTTPS client for it ([`client`]), used by the `tollgate` CLI.
//!
//! It must not speak PostgreSQL, and it writes no audit data except its own access events
//! (`api.read`, or `api.write` for a POST; one per request, through the [`Recorder`]).
//! Store queries are blocking (SQLite) and run on tokio's blocking pool.
//!
//! Routes (GET, JSON): `/api/v1/sessions`, `/api/v1/sessions/{id}`,
//! `/api/v1/sessions/{id}/events`, `/api/v1/export` (JSON Lines, streamed) and
//! `/api/v1/audit/verify`. Shapes are in [`view`].
//!
//! Review (approval) routes, GET and POST, are in `review_routes`: `/api/v1/reviews`,
//! `/api/v1/reviews/{id}`, `/api/v1/reviews/{id}/approve`, `/api/v1/reviews/{id}/deny`,
//! `/api/v1/reviews/{id}/revoke`, `/api/v1/access`, `/api/v1/grants` and
//! `/api/v1/grants/{id}/revoke`; the workflow itself is `tollgate-review`.
//!
//! `POST /api/v1/certificates` (`cert_routes`, what `tollgate login` calls) issues a short-lived
//! client certificate to the caller of an OIDC token, signed by `server.issuing_ca_cert`.
//!
//! The web console (HTML for reviewers and auditors: `/`, `/reviews`, `/sessions`, `/resources`,
//! `/login`)
//! is `console`; it shares the API's authentication, role checks and audit events.

mod cert_routes;
pub mod client;
mod console;
pub mod params;
mod review_routes;
mod routes;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tollgate_config::{Config, Roles};
use tollgate_identity::{Identity, IdentityError, TokenVerifier};
use tollgate_store::{Recorder, Store};
use tollgate_tls::ReloadableServerTls;

/// Event kind of the API's own access records.
pub const KIND_API_READ: &str = "api.read";
/// Event kind of the API's own records of POST requests (review decisions, access requests).
pub const KIND_API_WRITE: &str = "api.write";
pub use cert_routes::KIND_CERT_ISSUED;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API needs from the running gateway.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub recorder: Recorder,
    pub tls: Arc<ReloadableServerTls>,
    /// Service tokens; swapped whole when the config file is reloaded.
    pub tokens: arc_swap::ArcSwap<TokenVerifier>,
    /// `[[identity.oidc]]` issuers, shared with the other listeners (reloaded in place).
    pub oidc: Arc<tollgate_identity::oidc::OidcVerifiers>,
    /// `[identity.saml]`: the SAML service provider (`None`: not configured).
    pub saml: arc_swap::ArcSwapOption<tollgate_identity::saml::SamlSp>,
    pub roles: Roles,
    /// The review (approval) workflow.
    pub reviews: Arc<tollgate_review::Reviews>,
    /// The session id under which this process records `api.read` events (one per process,
    /// so the recorder tracks a single sequence; it is not a row in `sessions`).
    pub audit_session: String,
    /// Unauthenticated requests are tallied here (aggregate `connection.refused` events)
    /// instead of recorded one event each; `None` records them one by one.
    pub refusals: Option<Arc<tollgate_store::refused::Refusals>>,
    /// HTTP resources, served under `/r/<name>/` (`None`: the config has none).
    pub http: Option<Arc<tollgate_http::HttpGateway>>,
    /// Connection caps of this listener (`server.max_connections`, `..._per_source`).
    pub limits: Arc<tollgate_gate::limits::ConnectionLimits>,
    /// Signed-in console sessions (in memory: a restart signs everyone out).
    pub console: console::ConsoleSessions,
    /// The CA `POST /api/v1/certificates` issues client certificates with (`None`: 503).
    pub issuing: Option<Arc<tollgate_tls::pki::IssuingCa>>,
    /// The config in force (the console's read-only `/resources` view); swapped whole when the
    /// config file is reloaded.
    pub config: arc_swap::ArcSwap<Config>,
    /// What the periodic upstream scan (`server.scan_interval`) found last; empty until it runs.
    pub latest_scan: Arc<arc_swap::ArcSwapOption<ScanSnapshot>>,
}

/// The latest periodic upstream scan, as the console shows it.
#[derive(Debug, Clone, Default)]
pub struct ScanSnapshot {
    pub at_unix_ms: i64,
    /// Findings as `tollgate scan --json` has them (`kind`, `severity`, `resource`, `key`,
    /// `message`, `fix`).
    pub findings: Vec<serde_json::Value>,
    /// Expiry (unix seconds) of the certificate each upstream presented, by resource name.
    pub cert_expiry: std::collections::BTreeMap<String, i64>,
}

impl ApiState {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        recorder: Recorder,
        tls: Arc<ReloadableServerTls>,
        reviews: Arc<tollgate_review::Reviews>,
    ) -> Self {
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        ApiState {
            store,
            recorder,
            tls,
            tokens: arc_swap::ArcSwap::from_pointee(TokenVerifier::new(&config.identity.tokens)),
            oidc: Default::default(),
            saml: Default::default(),
            roles: config.roles.clone(),
            reviews,
            audit_session: format!(
                "api-{}",
                id.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            refusals: None,
            http: None,
            limits: tollgate_gate::limits::ConnectionLimits::unlimited(),
            console: Default::default(),
            issuing: None,
            config: arc_swap::ArcSwap::from_pointee(config.clone()),
            latest_scan: Default::default(),
        }
    }

    /// Record a refused request: an unauthenticated one only in the aggregate (a flood of them
    /// must not fill the audit store), any other as its own event.
    pub(crate) fn record_refused(
        &self,
        conn: &Conn,
        status: hyper::StatusCode,
        event: tollgate_store::EventInput,
    ) {
        if let (hyper::StatusCode::UNAUTHORIZED, Some(refusals)) = (status, &self.refusals) {
            tollgate_metrics::registry()
                .counter(
                    "tollgate_connections_refused_total",
                    "Client connections (or API requests) refused before authentication completed, or over a connection cap, by listener and reason.",
                    &[("listener", "https"), ("reason", "unauthenticated")],
                )
                .inc();
            refusals.record("unauthenticated", conn.peer.ip());
            return;
        }
        self.recorder.record(event);
    }
}

/// What is known about one TLS connection before any request is read.
pub(crate) struct Conn {
    pub peer: SocketAddr,
    /// The identity of a verified client certificate, if one was presented.
    pub cert: Option<Result<Identity, IdentityError>>,
}

/// Accept connections on `listener` forever: TLS (certificate material from `state.tls`, read
/// per connection so reloads apply), then HTTP/1.1.
pub async fn serve(listener: TcpListener, state: Arc<ApiState>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "accept failed on the https listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = tollgate_http::admit(&state.limits, peer, "https") else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(state.tls.config());
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "https handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "https handshake timed out");
                    return;
                }
            };
            // HTTP resources under /r/<name>/ share the connection with the API.
            let ctx = Arc::new(tollgate_http::ConnCtx::new(
                peer,
                tls.get_ref().1,
                tollgate_http::Mount::Prefixed,
            ));
            let conn = Arc::new(Conn {
                peer,
                cert: ctx.cert.clone(),
            });
            let conn_id = ctx.id;
            let svc_state = state.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (state, conn, ctx) = (svc_state.clone(), conn.clone(), ctx.clone());
                async move {
                    let response = match &state.http {
                        Some(gw) if req.uri().path().starts_with("/r/") => {
                            tollgate_http::handle(gw, &ctx, req).await
                        }
                        // The key HTTP resources' upstreams verify identity tokens with: public.
                        Some(gw)
                            if req.uri().path() == "/.well-known/jwks.json"
                                && gw.jwks().is_some() =>
                        {
                            tollgate_http::jwks_response(gw)
                        }
                        // RFC 9728 metadata of MCP resources: public, like the JWKS.
                        Some(gw)
                            if req
                                .uri()
                                .path()
                                .starts_with("/.well-known/oauth-protected-resource/r/") =>
                        {
                            tollgate_http::protected_resource_metadata(gw, &req)
                        }
                        _ if console::is_console_path(req.uri().path()) => {
                            console::handle(&state, &conn, req).await
                        }
                        _ => routes::handle(&state, &conn, req).await,
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            // With upgrades: a WebSocket on an HTTP resource takes the connection over.
            let _ = tollgate_http::builder()
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            if let Some(gw) = &state.http {
                gw.connection_closed(conn_id);
            }
        });
    }
}
