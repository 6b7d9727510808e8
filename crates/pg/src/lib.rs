//! PostgreSQL protocol adapter: terminates TLS from PostgreSQL clients, establishes who they are,
//! picks the resource by database name, opens a fresh verified TLS session upstream with injected
//! credentials, and relays the session while recording every command.
//!
//! It speaks the wire protocol and translates it into the shared vocabulary (identity, command,
//! event); it must not decide policy or implement masking itself, and it never logs secrets.
//!
//! Config reload ([`PgGateway::reload`]): each resource's compiled policy (rules, masks,
//! read-only, limits) is swapped whole. A session keeps the [`UpstreamTarget`] it was opened
//! with until it ends; only new connections see the new config (and added or removed resources).

mod cancel;
mod cancel_forward;
mod filter;
mod interrupt;
pub mod io;
mod pool;
pub use tollgate_gate::limits;
pub mod proto;
mod refusal;
mod relay;
pub mod rows;
pub mod scram;
mod session;
mod standing;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tollgate_config::{Config, StaticToken};
use tollgate_identity::TokenVerifier;
use tollgate_store::Recorder;
use tollgate_tls::ReloadableServerTls;

pub use cancel::{replica_tag_of, CancelRegistry, MAX_REPLICA_TAG};
pub use cancel_forward::CancelPeers;
pub use pool::Pools;
pub use tollgate_gate::upstreams::{UpstreamConn, UpstreamGuard, UpstreamRegistry};
pub use upstream::UpstreamTarget;

/// Shared state of the PostgreSQL listener.
pub struct PgGateway {
    pub tls: Arc<ReloadableServerTls>,
    /// PostgreSQL resources by name (the database name clients ask for), compiled; swapped whole
    /// when the config is reloaded (running sessions keep the target they started with).
    pub targets: arc_swap::ArcSwap<Targets>,
    /// Service tokens, swapped whole when the config is reloaded.
    pub tokens: arc_swap::ArcSwap<TokenSet>,
    /// `[[identity.oidc]]` issuers: an OIDC token is accepted as the password too.
    pub oidc: Arc<tollgate_identity::oidc::OidcVerifiers>,
    /// Bumped whenever something a running session's standing depends on was reloaded (tokens,
    /// revocation lists) or revoked: every session re-checks its own.
    pub standing: tokio::sync::watch::Sender<u64>,
    /// How often a session that depends on an access or unmask grant re-reads it from the store
    /// (a revocation or a shorter grant by another replica is seen within this).
    pub grant_recheck: Duration,
    /// Connection caps (`server.max_connections*`).
    pub limits: Arc<limits::ConnectionLimits>,
    /// Connections refused before authentication, recorded in aggregate.
    pub refusals: Arc<tollgate_store::refused::Refusals>,
    pub recorder: Recorder,
    pub cancels: CancelRegistry,
    /// The other replicas on a shared store, to which a CancelRequest for a key one of them
    /// issued is passed on (`None`: this gateway is alone).
    pub cancel_peers: Option<CancelPeers>,
    pub max_message: usize,
    /// Limit on everything before the session is established (TLS, start-up, authentication).
    pub handshake_timeout: Duration,
    /// Forward a command only once its audit event is written (fail closed).
    pub audit_fail_closed: bool,
    /// How long a command may wait for its audit event before it is refused.
    pub audit_timeout: Duration,
    /// Record command and result events (`server.record_commands`; false only for benchmarks).
    pub record_commands: bool,
    /// The gateway's live upstream connections (for `tollgate scan`'s bypass detection).
    pub upstreams: UpstreamRegistry,
    /// Pooled upstream connections (`resources.pool_mode`).
    pub pools: Pools,
    /// The review workflow that holds commands for approval (`None`: a `review` rule refuses).
    pub reviews: Option<Arc<tollgate_review::Reviews>>,
    /// How long an approval may be reused by the same statement after a restart.
    pub review_rerun_window: Duration,
}

impl PgGateway {
    /// Tell running sessions to re-check their standing (after a reload or a revocation).
    pub fn standing_changed(&self) {
        self.standing.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Compile this adapter's part of `config` (its PostgreSQL resources and service tokens)
    /// completely, exactly as start-up does, swapping nothing yet: a config that fails here
    /// leaves the running one untouched.
    pub fn prepare_reload(&self, config: &Config) -> Result<PreparedReload<'_>, CompileError> {
        let targets = compile_targets(config)?;
        let current = self.targets.load();
        let mut summary = ReloadSummary {
            tokens: config.identity.tokens.len(),
            ..Default::default()
        };
        for (name, t) in &targets {
            match current.get(name) {
                None => summary.added.push(name.clone()),
                Some(old) if fingerprint(&old.resource) != fingerprint(&t.resource) => {
                    summary.changed.push(name.clone())
                }
                Some(_) => {}
            }
        }
        summary.removed = current
            .keys()
            .filter(|n| !targets.contains_key(*n))
            .cloned()
            .collect();
        for names in [
            &mut summary.added,
            &mut summary.changed,
            &mut summary.removed,
        ] {
            names.sort();
        }
        Ok(PreparedReload {
            gw: self,
            targets,
            tokens: TokenSet::new(&config.identity.tokens),
            summary,
        })
    }

    /// [`PgGateway::prepare_reload`] and apply it: new connections use the new resources and
    /// tokens; running sessions keep their resource's old policy, and re-check their token.
    pub fn reload(&self, config: &Config) -> Result<ReloadSummary, CompileError> {
        Ok(self.prepare_reload(config)?.apply())
    }
}

/// PostgreSQL resources by name, compiled.
pub type Targets = HashMap<String, Arc<UpstreamTarget>>;

/// Why a config cannot be served: `file:line: resource "name": ...`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(String);

/// Compile every PostgreSQL resource of `config`: upstream TLS, masks (with
/// `server.mask_key`) and rules. What start-up and reload both use.
pub fn compile_targets(config: &Config) -> Result<Targets, CompileError> {
    let path = config.path.display();
    let mask_key =
        load_mask_key(&config.server.mask_key).map_err(|e| CompileError(format!("{path}: {e}")))?;
    let mut targets = HashMap::new();
    for r in config
        .resources
        .iter()
        .filter(|r| r.kind == tollgate_config::ResourceKind::Postgres)
    {
        let at = |e: &dyn std::fmt::Display| {
            CompileError(format!("{path}:{}: resource {:?}: {e}", r.line, r.name))
        };
        let mut t =
            UpstreamTarget::new(r.clone()).map_err(|e| at(&format!("upstream TLS: {e}")))?;
        t.mask = masking_policy(r, mask_key.clone())
            .map_err(|e| at(&e))?
            .map(Arc::new);
        t.audit_mask = audit_masking_policy(r, mask_key.clone())
            .ok()
            .flatten()
            .map(Arc::new);
        if !r.rules.is_empty() || r.read_only {
            t.policy = Some(
                tollgate_policy::ResourcePolicy::from_config(r)
                    .map_err(|e| CompileError(format!("{path}:{}: {e}", r.line)))?,
            );
        }
        targets.insert(r.name.clone(), Arc::new(t));
    }
    Ok(targets)
}

/// A resource's settings, for telling whether a reload changed it (its line in the file
/// does not count). Compared, never shown: it may name secret files or variables.
fn fingerprint(r: &tollgate_config::Resource) -> String {
    let mut r = r.clone();
    r.line = 0;
    format!("{r:?}")
}

/// What a reload changed in this adapter, by resource name (never a setting's value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Service tokens now configured.
    pub tokens: usize,
}

impl ReloadSummary {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "resources_added": self.added,
            "resources_removed": self.removed,
            "resources_changed": self.changed,
            "tokens": self.tokens,
        })
    }
}

/// A config compiled by [`PgGateway::prepare_reload`], not yet in force.
pub struct PreparedReload<'a> {
    gw: &'a PgGateway,
    targets: Targets,
    tokens: TokenSet,
    summary: ReloadSummary,
}

impl PreparedReload<'_> {
    pub fn summary(&self) -> &ReloadSummary {
        &self.summary
    }

    /// Swap it in: resources first, then tokens; running sessions re-check their standing.
    pub fn apply(self) -> ReloadSummary {
        self.gw.targets.store(Arc::new(self.targets));
        self.gw.tokens.store(Arc::new(self.tokens));
        self.gw.standing_changed();
        self.summary
    }
}

/// The `[[identity.tokens]]` in force: the verifier and, per token digest, its subject (so that
/// a session can tell whether the token it authenticated with is still configured).
pub struct TokenSet {
    pub verifier: TokenVerifier,
    subjects: HashMap<String, String>,
}

impl TokenSet {
    pub fn new(tokens: &[StaticToken]) -> Self {
        TokenSet {
            verifier: TokenVerifier::new(tokens),
            subjects: tokens
                .iter()
                .map(|t| (t.sha256.to_ascii_lowercase(), t.subject.clone()))
                .collect(),
        }
    }

    /// Whether a token with this SHA-256 (lowercase hex) is configured for `subject`.
    pub fn holds(&self, sha256_hex: &str, subject: &str) -> bool {
        self.subjects.get(sha256_hex).is_some_and(|s| s == subject)
    }

    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
}

pub use tollgate_gate::masks::{audit_masking_policy, load_mask_key, masking_policy};
