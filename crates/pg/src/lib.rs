//! PostgreSQL protocol adapter: terminates TLS from PostgreSQL clients, establishes who they are,
//! picks the resource by database name, opens a fresh verified TLS session upstream with injected
//! credentials, and relays the session while recording every command.
//!
//! It speaks the wire protocol and translates it into the shared vocabulary (identity, command,
//! event); it must not decide policy or implement masking itself, and it never logs secrets.

mod cancel;
pub mod io;
pub mod proto;
mod relay;
pub mod scram;
mod session;
pub mod upstream;
mod upstreams;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
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
    pub tokens: TokenVerifier,
    pub recorder: Recorder,
    pub cancels: CancelRegistry,
    pub max_message: usize,
    /// Limit on everything before the session is established (TLS, start-up, authentication).
    pub handshake_timeout: Duration,
    /// Forward a command only once its audit event is written (fail closed).
    pub audit_fail_closed: bool,
    /// How long a command may wait for its audit event before it is refused.
    pub audit_timeout: Duration,
    /// The gateway's live upstream connections (for `tollgate scan`'s bypass detection).
    pub upstreams: UpstreamRegistry,
}
