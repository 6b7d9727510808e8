//! PostgreSQL protocol adapter: terminates TLS from PostgreSQL clients, establishes who they are,
//! picks the resource by database name, opens a fresh verified TLS session upstream with injected
//! credentials, and relays the session while recording every command.
//!
//! It speaks the wire protocol and translates it into the shared vocabulary (identity, command,
//! event); it must not decide policy or implement masking itself, and it never logs secrets.

mod cancel;
mod filter;
mod interrupt;
pub mod io;
pub mod limits;
pub mod proto;
mod relay;
pub mod scram;
mod session;
mod standing;
pub mod upstream;
mod upstreams;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tollgate_config::StaticToken;
use tollgate_identity::TokenVerifier;
use tollgate_store::Recorder;
use tollgate_tls::ReloadableServerTls;

pub use cancel::CancelRegistry;
pub use upstream::UpstreamTarget;
pub use upstreams::{UpstreamConn, UpstreamGuard, UpstreamRegistry};

/// Shared state of the PostgreSQL listener.
pub struct PgGateway {
    pub tls: Arc<ReloadableServerTls>,
    /// PostgreSQL resources by name (the database name clients ask for).
    pub targets: HashMap<String, Arc<UpstreamTarget>>,
    /// Service tokens, swapped whole when the config is reloaded.
    pub tokens: arc_swap::ArcSwap<TokenSet>,
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

/// The masking key for `hash` from `server.mask_key_env`/`mask_key_file`: 64+ hex digits, or
/// at least 32 raw bytes. `Ok(None)` when none is configured. The error never shows the key.
pub fn load_mask_key(
    source: &tollgate_config::SecretSource,
) -> Result<Option<tollgate_mask::MaskKey>, String> {
    let Some(secret) = source.read()? else {
        return Ok(None);
    };
    let secret = secret.trim();
    let hex = secret.len() % 2 == 0 && secret.bytes().all(|b| b.is_ascii_hexdigit());
    let key = if hex {
        tollgate_mask::MaskKey::from_hex(secret)
    } else {
        tollgate_mask::MaskKey::new(secret.as_bytes())
    };
    key.map(Some).map_err(|e| format!("server.mask_key: {e}"))
}

/// A resource's `[[resources.masks]]`, compiled; `Ok(None)` when it has none.
pub fn masking_policy(
    resource: &tollgate_config::Resource,
    key: Option<tollgate_mask::MaskKey>,
) -> Result<Option<tollgate_mask::Policy>, tollgate_mask::PolicyError> {
    compile_masks(resource, key, false)
}

/// The same rules for everyone (no group exceptions): what the audit record's captured rows
/// are masked with, so that no original value is stored even when the viewer was exempt.
pub fn audit_masking_policy(
    resource: &tollgate_config::Resource,
    key: Option<tollgate_mask::MaskKey>,
) -> Result<Option<tollgate_mask::Policy>, tollgate_mask::PolicyError> {
    compile_masks(resource, key, true)
}

fn compile_masks(
    resource: &tollgate_config::Resource,
    key: Option<tollgate_mask::MaskKey>,
    for_everyone: bool,
) -> Result<Option<tollgate_mask::Policy>, tollgate_mask::PolicyError> {
    if resource.masks.is_empty() {
        return Ok(None);
    }
    let specs: Vec<tollgate_mask::MaskSpec> = resource
        .masks
        .iter()
        .map(|m| tollgate_mask::MaskSpec {
            columns: m.columns.clone(),
            types: m.types.clone(),
            detectors: m.detectors.clone(),
            json_paths: m.json_paths.clone(),
            strategy: m.strategy.clone(),
            keep_last: m.keep_last,
            except_groups: if for_everyone {
                vec![]
            } else {
                m.except_groups.clone()
            },
            only_groups: if for_everyone {
                vec![]
            } else {
                m.only_groups.clone()
            },
        })
        .collect();
    tollgate_mask::Policy::from_specs(&specs, key).map(Some)
}
