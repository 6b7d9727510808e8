//! MySQL and MariaDB protocol adapter: terminates TLS from MySQL clients, establishes who they
//! are (client certificate, or a token sent as the password inside TLS), picks the resource by
//! the database named at connect, opens a fresh verified TLS session upstream with injected
//! credentials, and relays commands one at a time: each judged by the shared rule engine
//! (classified with MySQL's grammar), result rows masked, everything recorded.
//!
//! It translates the wire protocol into the shared vocabulary ([`tollgate_gate`],
//! [`tollgate_policy`], [`tollgate_mask`]); it must not decide policy or implement masking
//! itself, and it never logs secrets.

pub mod classify;
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
    /// Connection ids the gateway gave its clients, for `KILL QUERY` from another connection.
    pub threads: Threads,
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

impl MysqlGateway {
    /// Swap in a new config's MySQL resources and tokens (running sessions keep theirs).
    pub fn reload(&self, config: &Config) -> Result<(), CompileError> {
        let targets = compile_targets(config)?;
        self.targets.store(Arc::new(targets));
        self.tokens
            .store(Arc::new(TokenVerifier::new(&config.identity.tokens)));
        Ok(())
    }

    /// Serve clients accepted on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
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
