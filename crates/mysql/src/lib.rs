//! MySQL and MariaDB protocol adapter: terminates TLS from MySQL clients, establishes who they
//! are (client certificate, or a token sent as the password inside TLS), picks the resource by
//! the database named at connect, opens a fresh verified TLS session upstream with injected
//! credentials, and relays commands one at a time: each judged by the shared rule engine
//! (classified with MySQL's grammar), result rows masked, everything recorded.
//!
//! It translates the wire protocol into the shared vocabulary ([`tollgate_gate`],
//! [`tollgate_policy`], [`tollgate_mask`]); it must not decide policy or implement masking
//! itself, and it never logs secrets.

mod capture;
pub mod classify;
pub mod errmask;
pub mod io;
pub mod proto;
mod relay;
mod session;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_config::Config;
use tollgate_gate::limits::ConnectionLimits;
use tollgate_gate::masks::{audit_masking_policy, load_mask_key, masking_policy};
use tollgate_identity::TokenVerifier;
use tollgate_store::Recorder;
use tollgate_tls::ReloadableServerTls;

pub use upstream::Target;

/// MySQL resources by name (the database clients ask for), compiled.
pub type Targets = HashMap<String, Arc<Target>>;

/// Shared state of the MySQL listener.
pub struct MysqlGateway {
    /// The gateway's certificate, as on the PostgreSQL listener.
    pub tls: Arc<ReloadableServerTls>,
    pub targets: arc_swap::ArcSwap<Targets>,
    pub tokens: arc_swap::ArcSwap<TokenVerifier>,
    pub oidc: Arc<tollgate_identity::oidc::OidcVerifiers>,
    /// Changes whenever tokens, issuers or revocation lists were reloaded (the PostgreSQL
    /// listener's, which shares the certificate): running sessions re-check their standing.
    pub standing: tokio::sync::watch::Receiver<u64>,
    /// How often a session resting on an access or unmask grant re-reads it.
    pub grant_recheck: Duration,
    pub limits: Arc<ConnectionLimits>,
    /// Connections refused before authentication, recorded in aggregate.
    pub refusals: Arc<tollgate_store::refused::Refusals>,
    pub recorder: Recorder,
    pub reviews: Option<Arc<tollgate_review::Reviews>>,
    pub review_rerun_window: Duration,
    pub max_message: usize,
    pub handshake_timeout: Duration,
    pub audit_fail_closed: bool,
    pub audit_timeout: Duration,
    pub record_commands: bool,
    /// The gateway's live upstream connections (for `tollgate scan`'s bypass detection).
    pub upstreams: tollgate_gate::upstreams::UpstreamRegistry,
    /// Connection ids the gateway gave its clients, for `KILL QUERY` from another connection.
    pub threads: Threads,
    /// The server version the greeting announces: the upstreams', so that clients pick
    /// collations and features the server behind the gateway has.
    pub announced: Announced,
}

/// The version string the gateway's greeting carries. Clients read it before they name a
/// database (so before the resource is known): MySQL 8 clients ask for `utf8mb4_0900_ai_ci`,
/// which MariaDB does not have, when told "8.0". It is learned from the upstreams' own
/// greetings (probed at start, then from every upstream connection), the last one seen
/// winning; "8.0.40-tollgate" until one is known.
#[derive(Default)]
pub struct Announced(std::sync::RwLock<Option<String>>);

impl Announced {
    pub const DEFAULT: &'static str = "8.0.40-tollgate";

    pub fn get(&self) -> String {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            Some(v) => v.clone(),
            None => Self::DEFAULT.to_string(),
        }
    }

    /// Remember an upstream's version (control characters dropped, length bounded).
    pub fn learn(&self, upstream_version: &str) {
        let clean: String = upstream_version
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        if clean.is_empty() {
            return;
        }
        let v = format!("{clean}-tollgate");
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_deref() != Some(v.as_str()) {
            *slot = Some(v);
        }
    }
}

impl tollgate_gate::standing::Authorities for MysqlGateway {
    fn cert_revoked(&self, der: &[u8]) -> bool {
        self.tls.is_revoked(der)
    }

    fn token_holds(&self, sha256_hex: &str, subject: &str) -> bool {
        self.tokens.load().holds(sha256_hex, subject)
    }

    fn has_issuer(&self, issuer: &str) -> bool {
        self.oidc.has_issuer(issuer)
    }

    fn reviews(&self) -> Option<&tollgate_review::Reviews> {
        self.reviews.as_deref()
    }

    fn standing_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.standing.clone()
    }

    fn grant_recheck(&self) -> Duration {
        self.grant_recheck
    }
}

/// The gateway's connection ids: which session (subject, resource, upstream connection id)
/// each belongs to.
#[derive(Default)]
pub struct Threads {
    next: AtomicU32,
    live: Mutex<HashMap<u32, ThreadEntry>>,
}

#[derive(Clone)]
pub struct ThreadEntry {
    pub subject: String,
    pub resource: String,
    pub upstream_thread: u32,
    /// Wakes the session so that a held statement is withdrawn.
    pub cancelled: Arc<Kill>,
}

/// A `KILL` of a session from another connection.
#[derive(Default)]
pub struct Kill {
    /// Woken by each `KILL`.
    pub notify: tokio::sync::Notify,
    /// Set (before the wake-up) by `KILL [CONNECTION]`, which ends the connection, not only
    /// its statement.
    pub connection: std::sync::atomic::AtomicBool,
}

impl Threads {
    pub fn allocate(&self) -> u32 {
        self.next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1)
    }

    pub fn register(&self, id: u32, e: ThreadEntry) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, e);
    }

    pub fn remove(&self, id: u32) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub fn get(&self, id: u32) -> Option<ThreadEntry> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
}

/// Why a config cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(String);

/// Compile every MySQL resource of `config`: upstream TLS, masks and rules.
pub fn compile_targets(config: &Config) -> Result<Targets, CompileError> {
    let path = config.path.display();
    let mask_key =
        load_mask_key(&config.server.mask_key).map_err(|e| CompileError(format!("{path}: {e}")))?;
    let mut targets = HashMap::new();
    for r in config
        .resources
        .iter()
        .filter(|r| r.kind == tollgate_config::ResourceKind::Mysql)
    {
        let at = |e: &dyn std::fmt::Display| {
            CompileError(format!("{path}:{}: resource {:?}: {e}", r.line, r.name))
        };
        let mut t = Target::new(r.clone()).map_err(|e| at(&e))?;
        t.mask = masking_policy(r, mask_key.clone())
            .map_err(|e| at(&e))?
            .map(Arc::new);
        t.audit_mask = audit_masking_policy(r, mask_key.clone())
            .ok()
            .flatten()
            .map(Arc::new);
        targets.insert(r.name.clone(), Arc::new(t));
    }
    Ok(targets)
}

/// A config's MySQL resources and tokens, compiled by [`MysqlGateway::prepare_reload`], not
/// yet in force.
pub struct PreparedReload<'a> {
    gw: &'a MysqlGateway,
    targets: Targets,
    tokens: TokenVerifier,
}

impl PreparedReload<'_> {
    /// Swap it in: new connections use the new resources and tokens; running sessions keep
    /// their resource's policy and re-check their standing when told (the PostgreSQL
    /// listener's reload tells them). Returns the resources now served.
    pub fn apply(self) -> serde_json::Value {
        let mut names: Vec<&String> = self.targets.keys().collect();
        names.sort();
        let summary = serde_json::json!({ "resources": names });
        self.gw.targets.store(Arc::new(self.targets));
        self.gw.tokens.store(Arc::new(self.tokens));
        summary
    }
}

impl MysqlGateway {
    /// Compile a new config's MySQL resources and tokens completely, swapping nothing yet.
    pub fn prepare_reload(&self, config: &Config) -> Result<PreparedReload<'_>, CompileError> {
        Ok(PreparedReload {
            gw: self,
            targets: compile_targets(config)?,
            tokens: TokenVerifier::new(&config.identity.tokens),
        })
    }

    /// Serve clients accepted on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        // Learn the upstreams' version before the first greeting (connections wait in the
        // backlog meanwhile, at most a few seconds; an unreachable upstream is retried by every
        // session's own connection, which teaches the version too).
        let targets = self.targets.load_full();
        let announced = &self.announced;
        let probes = targets.values().map(|target| async move {
            match target.server_version().await {
                Ok(v) => announced.learn(&v),
                Err(e) => {
                    tracing::warn!(resource = %target.resource.name, error = %e, "could not read the upstream's greeting")
                }
            }
        });
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            futures_util::future::join_all(probes),
        )
        .await;
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    tokio::spawn(self.clone().handle(tcp, peer));
                }
                Err(e) => {
                    tracing::error!(error = %e, "accept failed on the mysql listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Announced;

    #[test]
    fn the_greeting_announces_the_upstreams_version() {
        let a = Announced::default();
        assert_eq!(a.get(), Announced::DEFAULT);
        a.learn("5.5.5-10.11.6-MariaDB-0+deb12u1");
        assert_eq!(a.get(), "5.5.5-10.11.6-MariaDB-0+deb12u1-tollgate");
        // A NUL or newline from a hostile upstream never reaches the greeting's NUL-ended string.
        a.learn("8.0.36\0evil\n");
        assert_eq!(a.get(), "8.0.36evil-tollgate");
        a.learn("");
        assert_eq!(a.get(), "8.0.36evil-tollgate");
    }
}
