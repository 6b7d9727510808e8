//! The HTTP adapter: HTTPS APIs behind the gateway (`kind = "http"` resources).
//!
//! A request reaches a resource at `https://<gateway>/r/<name>/<path>` on `server.https_listen`
//! (beside the API; the gateway's own cookies are stripped and responses sandboxed there) or,
//! with `server.http_listen`, at `https://<name>.<any domain>/<path>` chosen per request by its
//! `Host` / `:authority`. Per request: identify (client certificate, else bearer token), authorize
//! (groups or a just-in-time grant), normalise the target and judge it by the resource's rules,
//! record it (before it is forwarded; fail closed), hold it for review when a rule says so,
//! forward it over a fresh verified TLS connection with the resource's credential injected, and
//! stream the answer back through the masking engine, recording it as it passes. A WebSocket
//! upgrade (HTTP/1.1) goes the same way up to the forward; then its frames are relayed, masked
//! and recorded message by message (`websocket`).
//!
//! An MCP resource (`kind = "mcp"`, streamable HTTP) is served the same way; its POSTs are read
//! as JSON-RPC and judged, held, masked and recorded message by message (`mcp`).
//!
//! It owns no policy of its own: authentication, authorization, rules, the review hold and
//! event shapes are `tollgate-gate`'s; masking is `tollgate-mask`'s.

mod decode;
mod error;
mod identity_token;
mod mcp;
mod names;
mod normalize;
mod relay;
mod serve;
mod upstream;
mod websocket;

pub use error::{challenge_for, Refusal, CHALLENGE};
pub use mcp::pin::{upstream_tools, ListedTool};
pub use mcp::protected_resource_metadata;
pub use normalize::{normalize_path, query_pairs, BadTarget};
pub use relay::handle;
pub use serve::{admit, builder, serve, ConnCtx, Mount};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::{HeaderName, HeaderValue};
use tollgate_config::{Config, Resource, ResourceKind};
use tollgate_gate::access::Access;
use tollgate_gate::event::{SessionClose, SessionOpen, TlsLeg};
use tollgate_gate::{Identity, RuleSet, SessionLog};
use tollgate_identity::TokenVerifier;
use tollgate_mask::{BodyPlan, MaskKey, Policy};
use tollgate_review::Reviews;
use tollgate_store::Recorder;

/// One HTTP resource, compiled.
pub(crate) struct Target {
    pub resource: Resource,
    pub rules: RuleSet,
    /// The resource's masks (`None`: it has none).
    pub mask: Option<Policy>,
    pub client: upstream::UpstreamClient,
    /// The credential header and its value (never logged: marked sensitive).
    pub inject: Option<(HeaderName, HeaderValue)>,
    /// `identity_header`: the header that carries the caller's signed identity upstream.
    pub identity: Option<(HeaderName, Arc<identity_token::IdentityKey>)>,
    /// `scheme://host:port` of the upstream.
    pub origin: String,
    /// The `Host` the upstream expects.
    pub host: String,
    /// The host names the gateway serves (its certificate's), for `X-Forwarded-Host`.
    pub served: Arc<names::ServedNames>,
    /// `host` as the header the upstream is sent (`None`: not a valid header value).
    pub host_header: Option<HeaderValue>,
    /// The resource's masks for everyone, as audit captures are masked ([`Target::audit_plan`]).
    audit_plan: Option<BodyPlan>,
    /// `tollgate_http_requests_total` of this resource by decision (allow, deny, review),
    /// looked up once rather than per request.
    pub requests_total: [Arc<tollgate_metrics::Cell>; 3],
}

impl Target {
    /// The plan audit captures are masked with (`None`: nothing to mask). Group exceptions do
    /// not apply: no original value reaches the audit trail, whoever the caller was.
    pub(crate) fn audit_plan(&self) -> Option<BodyPlan> {
        self.audit_plan.clone()
    }

    fn new(
        resource: &Resource,
        key: Option<&MaskKey>,
        identity_key: Option<&Arc<identity_token::IdentityKey>>,
        served: &Arc<names::ServedNames>,
    ) -> anyhow::Result<Target> {
        let http = resource.http.as_ref().expect("an http resource");
        let inject = match &http.inject {
            None => None,
            Some((name, source)) => {
                let value = source
                    .read()
                    .map_err(|e| anyhow::anyhow!("resource {:?}: credentials: {e}", resource.name))?
                    .unwrap_or_default();
                let mut value = HeaderValue::from_str(&value).map_err(|_| {
                    anyhow::anyhow!(
                        "resource {:?}: the injected {name} value is not a valid header value",
                        resource.name
                    )
                })?;
                value.set_sensitive(true);
                Some((HeaderName::from_bytes(name.as_bytes())?, value))
            }
        };
        let masks_error = |e| anyhow::anyhow!("resource {:?}: masks: {e}", resource.name);
        let mask =
            tollgate_gate::masks::masking_policy(resource, key.cloned()).map_err(masks_error)?;
        let audit_mask = tollgate_gate::masks::audit_masking_policy(resource, key.cloned())
            .map_err(masks_error)?;
        let connector = upstream::Connector::new(resource)
            .map_err(|e| anyhow::anyhow!("resource {:?}: upstream TLS: {e}", resource.name))?;
        let scheme = if http.tls { "https" } else { "http" };
        let default_port = if http.tls { 443 } else { 80 };
        let host = if resource.upstream_port == default_port {
            resource.upstream_host.clone()
        } else {
            resource.upstream.clone()
        };
        let identity = match (&http.identity_header, identity_key) {
            (Some(name), Some(key)) => {
                Some((HeaderName::from_bytes(name.as_bytes())?, key.clone()))
            }
            (Some(_), None) => anyhow::bail!(
                "resource {:?}: identity_header needs server.identity_key",
                resource.name
            ),
            (None, _) => None,
        };
        let audit_plan = audit_mask
            .as_ref()
            .map(|p| p.body_plan(&[]))
            .filter(BodyPlan::is_active);
        let requests_total = ["allow", "deny", "review"].map(|decision| {
            tollgate_metrics::registry().counter(
                "tollgate_http_requests_total",
                "HTTP resource requests judged, by resource and decision.",
                &[("resource", &resource.name), ("decision", decision)],
            )
        });
        Ok(Target {
            served: served.clone(),
            identity,
            audit_plan,
            requests_total,
            host_header: HeaderValue::from_str(&host).ok(),
            rules: RuleSet::try_new(&resource.rules, resource.review_timeout, resource.dry_run)
                .map_err(|e| anyhow::anyhow!("resource {:?}: rules: {e}", resource.name))?,
            mask,
            client: connector.client(),
            inject,
            origin: format!("{scheme}://{}", resource.upstream),
            host,
            resource: resource.clone(),
        })
    }
}

/// Which audit session a request belongs to: one per client connection, resource and caller;
/// for MCP, one per `Mcp-Session-Id` (and its caller), whatever connections carry it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    /// 0 for an MCP session.
    conn: u64,
    resource: String,
    principal: String,
    mcp: Option<String>,
}

/// An MCP session's audit session closes after this long without a request (or at its
/// DELETE): MCP clients need not end their sessions.
const MCP_SESSION_IDLE: Duration = Duration::from_secs(3600);

/// An audit session of HTTP exchanges; `session.close` is recorded when the connection has
/// ended (for MCP: the session was deleted or went idle) and its last response body is done.
pub(crate) struct HttpSession {
    pub log: SessionLog,
    pub n: AtomicU64,
    /// Microseconds (since the session began) of its latest request.
    last_used_us: AtomicU64,
}

impl HttpSession {
    pub fn next_n(&self) -> u64 {
        self.last_used_us.store(self.log.t_us(), Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn idle(&self) -> Duration {
        self.log
            .started
            .elapsed()
            .saturating_sub(Duration::from_micros(
                self.last_used_us.load(Ordering::Relaxed),
            ))
    }
}

impl Drop for HttpSession {
    fn drop(&mut self) {
        self.log.record(&SessionClose {
            outcome: "ok",
            reason: None,
            duration_ms: self.log.started.elapsed().as_millis() as u64,
            commands: self.n.load(Ordering::Relaxed),
        });
    }
}

/// How long a caller's grants are trusted without a new look in the store: the delay within
/// which a grant revoked by another gateway process takes effect (PostgreSQL sessions re-read
/// theirs as often).
pub const ACCESS_RECHECK: Duration = Duration::from_secs(5);

struct CachedAccess {
    access: tollgate_gate::Access,
    at: Instant,
    revocations: u64,
}

/// The HTTP adapter of one gateway process.
pub struct HttpGateway {
    targets: arc_swap::ArcSwap<HashMap<String, Arc<Target>>>,
    /// Service tokens; swapped whole when the config file is reloaded.
    pub tokens: arc_swap::ArcSwap<TokenVerifier>,
    /// `[[identity.oidc]]` issuers, shared with the other listeners (reloaded in place).
    pub oidc: Arc<tollgate_identity::oidc::OidcVerifiers>,
    reviews: Arc<Reviews>,
    recorder: Recorder,
    rerun_window: Duration,
    audit_fail_closed: bool,
    mask_key: Option<MaskKey>,
    /// The host names of the gateway's certificate.
    served: arc_swap::ArcSwap<names::ServedNames>,
    /// Signs the identity tokens of `identity_header` (`server.identity_key`; read at start).
    identity_key: Option<Arc<identity_token::IdentityKey>>,
    sessions: Mutex<HashMap<SessionKey, Arc<HttpSession>>>,
    /// Grants looked up in the store, per principal and resource, re-read after
    /// [`ACCESS_RECHECK`] or at once when a grant is revoked here (as PostgreSQL sessions do).
    access_cache: Mutex<HashMap<(String, String), CachedAccess>>,
    /// MCP sessions the upstreams opened, and whose they are.
    pub(crate) mcp_sessions: mcp::Owners,
    /// MCP tasks the upstreams created, and whose they are.
    pub(crate) mcp_tasks: mcp::Owners,
    /// Held MCP calls answered with tasks of the gateway's own.
    pub(crate) mcp_held_tasks: mcp::HeldTasks,
    /// MCP tool definitions pinned at their first listing (kept across config reloads).
    pub(crate) mcp_pins: mcp::Pins,
    /// stdio MCP servers running, one per MCP session (or principal, for stateless clients).
    pub(crate) mcp_stdio: mcp::StdioServers,
}

impl HttpGateway {
    /// The adapter for the config's HTTP resources (possibly none yet: a reload may add some).
    pub fn new(
        config: &Config,
        reviews: Arc<Reviews>,
        recorder: Recorder,
        mask_key: Option<MaskKey>,
        oidc: Arc<tollgate_identity::oidc::OidcVerifiers>,
    ) -> anyhow::Result<Arc<HttpGateway>> {
        let issuer = config.server.console_url.as_deref().unwrap_or("tollgate");
        let identity_key = match &config.server.identity_key {
            Some(path) => Some(Arc::new(identity_token::IdentityKey::load(path, issuer)?)),
            None => None,
        };
        let targets = compile(config, mask_key.as_ref(), identity_key.as_ref())?;
        Ok(Arc::new(HttpGateway {
            served: arc_swap::ArcSwap::from_pointee(names::ServedNames::load(
                &config.server.tls_cert,
            )?),
            identity_key,
            targets: arc_swap::ArcSwap::from_pointee(targets),
            tokens: arc_swap::ArcSwap::from_pointee(TokenVerifier::new(&config.identity.tokens)),
            oidc,
            reviews,
            recorder,
            rerun_window: config.server.review_rerun_window,
            audit_fail_closed: config.server.audit_failure == tollgate_config::AuditFailure::Closed,
            mask_key,
            sessions: Mutex::new(HashMap::new()),
            access_cache: Mutex::new(HashMap::new()),
            mcp_sessions: mcp::Owners::default(),
            mcp_tasks: mcp::Owners::default(),
            mcp_held_tasks: mcp::HeldTasks::default(),
            mcp_pins: mcp::Pins::default(),
            mcp_stdio: mcp::StdioServers::default(),
        }))
    }

    /// Compile the HTTP resources of a new config, swapping nothing yet: `Err` says why the
    /// config cannot be served (the running one stays).
    pub fn prepare_reload(&self, config: &Config) -> anyhow::Result<PreparedReload<'_>> {
        Ok(PreparedReload {
            gw: self,
            targets: compile(config, self.mask_key.as_ref(), self.identity_key.as_ref())?,
            tokens: TokenVerifier::new(&config.identity.tokens),
            served: names::ServedNames::load(&config.server.tls_cert)?,
        })
    }

    /// The public key upstreams verify identity tokens with, as a JSON Web Key Set (`None`
    /// without `server.identity_key`).
    pub fn jwks(&self) -> Option<serde_json::Value> {
        self.identity_key.as_ref().map(|k| k.jwks())
    }

    pub(crate) fn target(&self, name: &str) -> Option<Arc<Target>> {
        self.targets.load().get(name).cloned()
    }

    /// May `who` reach `target` (`None`: no such resource; `asked` is the name it was asked
    /// by)? Groups decide at once; grants (just-in-time access, unmasked view) come from the
    /// store, looked up at most every [`ACCESS_RECHECK`] per caller and resource, and at once
    /// after a revocation in this process.
    pub(crate) fn authorize(
        &self,
        who: &Identity,
        target: Option<&Target>,
        asked: &str,
    ) -> Result<tollgate_gate::Access, tollgate_gate::Forbidden> {
        let needs_store =
            target.is_some_and(|t| t.mask.is_some() || !who.in_any(&t.resource.allow_groups));
        let decide = || {
            tollgate_gate::authorize(
                who,
                target.map(|t| (t.resource.name.as_str(), t.resource.allow_groups.as_slice())),
                Some(&self.reviews),
                target.is_some_and(|t| t.mask.is_some()),
                asked,
            )
        };
        if !needs_store {
            return decide();
        }
        let key = (who.principal.to_string(), asked.to_string());
        let revocations = *self.reviews.revocations().borrow();
        {
            let cache = self.access_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&key) {
                let grant_live = c
                    .access
                    .grant
                    .as_ref()
                    .is_none_or(|g| g.until > std::time::SystemTime::now());
                // Access by group holds only while the (possibly reloaded) resource still
                // lists one of the caller's groups.
                let basis_holds = c.access.grant.is_some()
                    || target.is_some_and(|t| who.in_any(&t.resource.allow_groups));
                if c.revocations == revocations
                    && c.at.elapsed() < ACCESS_RECHECK
                    && grant_live
                    && basis_holds
                {
                    return Ok(c.access.clone());
                }
            }
        }
        let access = decide()?;
        {
            let mut cache = self.access_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 10_000 {
                cache.retain(|_, c| c.at.elapsed() < ACCESS_RECHECK);
            }
            cache.insert(
                key,
                CachedAccess {
                    access: access.clone(),
                    at: Instant::now(),
                    revocations,
                },
            );
        }
        Ok(access)
    }

    /// Whether `host` is one of the gateway's own names (its certificate's).
    pub(crate) fn serves(&self, host: &str) -> bool {
        self.served.load().covers(host)
    }

    /// The session this request belongs to, opened (and recorded) on first use. A request to
    /// an MCP resource carrying an `Mcp-Session-Id` its caller opened goes to that MCP
    /// session's audit session.
    pub(crate) fn session(
        &self,
        ctx: &ConnCtx,
        target: &Target,
        who: &Identity,
        access: &Access,
        mcp_session: Option<&str>,
    ) -> Arc<HttpSession> {
        let principal = who.principal.to_string();
        let mcp = mcp_session
            .filter(|sid| {
                self.mcp_sessions
                    .owner(&target.resource.name, sid)
                    .as_deref()
                    == Some(principal.as_str())
            })
            .map(str::to_string);
        let key = SessionKey {
            conn: if mcp.is_some() { 0 } else { ctx.id },
            resource: target.resource.name.clone(),
            principal,
            mcp,
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sessions.get(&key) {
            return s.clone();
        }
        // Idle MCP sessions close (checked as new sessions open).
        sessions.retain(|k, s| k.mcp.is_none() || s.idle() < MCP_SESSION_IDLE);
        let session = Arc::new(HttpSession {
            log: SessionLog::new(self.recorder.clone()),
            n: AtomicU64::new(0),
            last_used_us: AtomicU64::new(0),
        });
        let mut extra = serde_json::Map::new();
        access.audit_fields(&mut extra);
        extra.insert("http_version".into(), ctx.http_version.into());
        session.log.record(&SessionOpen {
            listener: ctx.mount.listener(),
            client_addr: ctx.peer.to_string(),
            subject: who.subject.clone(),
            groups: who.groups.clone(),
            auth_method: who.method.as_str(),
            principal: who.principal.to_string(),
            client_cert_fingerprint: who.cert_fingerprint.clone(),
            resource: target.resource.name.clone(),
            resource_kind: if target.resource.kind == ResourceKind::Mcp {
                "mcp"
            } else {
                "http"
            },
            client_tls: ctx.tls.clone(),
            extra,
        });
        sessions.insert(key, session.clone());
        session
    }

    /// The upstream opened MCP session `sid` in answer to a request of `session`: the MCP
    /// session's later requests are recorded there too.
    pub(crate) fn adopt_mcp_session(
        &self,
        resource: &str,
        who: &Identity,
        sid: &str,
        session: &Arc<HttpSession>,
    ) {
        let key = SessionKey {
            conn: 0,
            resource: resource.to_string(),
            principal: who.principal.to_string(),
            mcp: Some(sid.to_string()),
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.insert(key, session.clone());
    }

    /// MCP session `sid` ended (DELETE): its audit session closes once its last answer is done
    /// (and its first connection has ended).
    pub(crate) fn end_mcp_session(&self, resource: &str, who: &Identity, sid: &str) {
        let key = SessionKey {
            conn: 0,
            resource: resource.to_string(),
            principal: who.principal.to_string(),
            mcp: Some(sid.to_string()),
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&key);
    }

    /// An identified caller refused before its request was judged (no access to the resource
    /// it named): a session of its own, opened and closed as `rejected`.
    pub(crate) fn record_rejected(&self, ctx: &ConnCtx, who: &Identity, asked: &str, reason: &str) {
        let log = SessionLog::new(self.recorder.clone());
        let mut extra = serde_json::Map::new();
        extra.insert("http_version".into(), ctx.http_version.into());
        log.record(&SessionOpen {
            listener: ctx.mount.listener(),
            client_addr: ctx.peer.to_string(),
            subject: who.subject.clone(),
            groups: who.groups.clone(),
            auth_method: who.method.as_str(),
            principal: who.principal.to_string(),
            client_cert_fingerprint: who.cert_fingerprint.clone(),
            resource: asked.to_string(),
            resource_kind: "http",
            client_tls: ctx.tls.clone(),
            extra,
        });
        log.record(&SessionClose {
            outcome: "rejected",
            reason: Some(reason.to_string()),
            duration_ms: 0,
            commands: 0,
        });
    }

    /// A client connection ended: its sessions close once their last response is done.
    pub fn connection_closed(&self, conn: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|k, _| k.conn != conn);
    }

    /// Whether any resource is served on `https_listen` (always, when the adapter exists).
    pub fn has_resources(&self) -> bool {
        !self.targets.load().is_empty()
    }

    pub(crate) fn reviews(&self) -> &Reviews {
        &self.reviews
    }

    pub(crate) fn reviews_arc(&self) -> Arc<Reviews> {
        self.reviews.clone()
    }

    pub(crate) fn rerun_window(&self) -> Duration {
        self.rerun_window
    }

    pub(crate) fn fail_closed(&self) -> bool {
        self.audit_fail_closed
    }
}

/// A compiled config, ready to be swapped in.
pub struct PreparedReload<'a> {
    gw: &'a HttpGateway,
    targets: HashMap<String, Arc<Target>>,
    tokens: TokenVerifier,
    served: names::ServedNames,
}

impl PreparedReload<'_> {
    /// New requests use the new resources, rules, masks and tokens; responses in flight finish
    /// with the old ones. Returns the HTTP resources now served.
    pub fn apply(self) -> Vec<String> {
        let mut names: Vec<String> = self.targets.keys().cloned().collect();
        names.sort();
        self.gw.mcp_stdio.stop_removed(|name| {
            let stdio = self.targets.get(name)?.resource.stdio.as_ref()?;
            Some(stdio.command.as_slice())
        });
        self.gw.targets.store(Arc::new(self.targets));
        self.gw.tokens.store(Arc::new(self.tokens));
        self.gw.served.store(Arc::new(self.served));
        names
    }
}

fn compile(
    config: &Config,
    key: Option<&MaskKey>,
    identity_key: Option<&Arc<identity_token::IdentityKey>>,
) -> anyhow::Result<HashMap<String, Arc<Target>>> {
    let served = Arc::new(names::ServedNames::load(&config.server.tls_cert)?);
    let mut out = HashMap::new();
    for r in config
        .resources
        .iter()
        .filter(|r| matches!(r.kind, ResourceKind::Http | ResourceKind::Mcp))
    {
        out.insert(
            r.name.clone(),
            Arc::new(Target::new(r, key, identity_key, &served)?),
        );
    }
    Ok(out)
}

/// `GET /.well-known/jwks.json`: the identity key's public half (cacheable for an hour).
pub fn jwks_response(gw: &HttpGateway) -> hyper::Response<upstream::UpstreamBody> {
    use http_body_util::BodyExt;
    let body = gw.jwks().unwrap_or_default().to_string();
    let mut r = hyper::Response::new(
        http_body_util::Full::new(bytes::Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=3600"),
    );
    r
}

/// Microseconds since `t`.
pub(crate) fn micros(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

/// The TLS leg of a client connection as `session.open` records it.
pub fn tls_leg(info: &tollgate_tls::TlsSessionInfo) -> TlsLeg {
    TlsLeg {
        version: Some(info.version.clone()),
        cipher: Some(info.cipher.clone()),
        alpn: info.alpn.clone(),
    }
}
