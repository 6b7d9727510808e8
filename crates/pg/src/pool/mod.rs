//! Reuse of authenticated upstream connections (`resources.pool_mode`).
//!
//! A pool holds one resource's idle upstream connections for one set of client start-up
//! parameters (the server applies those at start-up; `DISCARD ALL` returns to them). With
//! `pool_mode = "session"` a client session leases a connection for its whole life, and a
//! session that ends cleanly (idle, nothing in flight) hands it back reset with `DISCARD ALL`;
//! with `"transaction"` a client session leases one per transaction through a [`PoolStream`],
//! at most `pool_size` at once. A connection that ended dirty (in a transaction, in COPY, with
//! requests unanswered, or after a setting the guardrails pin changed) is closed, never reused.
//! Under `"transaction"` a client's own `SET`s are carried: each connection knows the settings
//! left on it, and one leased for a client whose settings differ gets them applied first.

mod carry;
mod settings;
mod stream;

pub use stream::PoolStream;

use crate::cancel::BackendKey;
use crate::io::FrameBuf;
use crate::proto::backend;
use crate::proto::frontend;
use crate::refusal::SessionEnd;
use crate::upstream::{Connected, UpStream, UpstreamError, UpstreamTarget};
use carry::BackendStatements;
use settings::Settings;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tollgate_config::{PoolMode, Pooling};
use tollgate_gate::upstreams::{UpstreamConn, UpstreamGuard, UpstreamRegistry};
use tollgate_metrics::{registry, Cell, GaugeGuard};
use tollgate_tls::TlsSessionInfo;

/// Every pool of the gateway, by resource and start-up parameters.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Client sessions per pooled resource (for `max_client_conn`).
    clients: Arc<Mutex<HashMap<String, usize>>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    resource: String,
    params: Vec<(String, String)>,
}

/// Why a pooled session could not get an upstream connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    #[error("no upstream connection became free within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client's settings could not be applied to the connection leased for it.
    #[error("applying the session's settings failed: {0}")]
    Settings(String),
}

impl PoolError {
    pub fn label(&self) -> &'static str {
        match self {
            PoolError::Timeout(_) => "pool_timeout",
            PoolError::Upstream(e) => e.label(),
            PoolError::Settings(_) => "pool_settings",
        }
    }
}

/// A client's place under its resource's `max_client_conn`, released when dropped.
pub(crate) struct ClientSlot {
    clients: Arc<Mutex<HashMap<String, usize>>>,
    resource: String,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.resource) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A pooled session's upstream, ready for the relay: what [`crate::upstream::UpstreamTarget::connect`]
/// gives an unpooled one, with the stream leased from the pool.
pub(crate) struct PooledConnect {
    pub connected: Connected,
    pub key: Arc<BackendKey>,
}

impl Pools {
    /// Admit one more client session of `resource` under `max`, or `None` when it is full.
    pub(crate) fn admit(&self, resource: &str, max: Option<usize>) -> Option<ClientSlot> {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(resource.to_string()).or_default();
        if max.is_some_and(|max| *n >= max) {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: self.clients.clone(),
            resource: resource.to_string(),
        })
    }

    /// The pool for `target` and these client start-up parameters (made on first use; a
    /// reloaded resource gets a new pool, the old one's connections close as they come back).
    fn pool(
        &self,
        target: &Arc<UpstreamTarget>,
        client_params: &[(String, String)],
        registry: &UpstreamRegistry,
        max_message: usize,
    ) -> Arc<Pool> {
        // application_name is reported back to the client as it asked, never sent upstream:
        // connections serve many clients.
        let mut params: Vec<(String, String)> = client_params
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("application_name"))
            .cloned()
            .collect();
        params.sort();
        let key = PoolKey {
            resource: target.resource.name.clone(),
            params,
        };
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get(&key) {
            if Arc::ptr_eq(&p.target, target) {
                return p.clone();
            }
        }
        let pool = Pool::new(
            target.clone(),
            key.params.clone(),
            registry.clone(),
            max_message,
        );
        pools.insert(key, pool.clone());
        pool
    }

    /// A pooled upstream for one client session of `target` (whose `pool_mode` is not none).
    pub(crate) async fn connect(
        &self,
        target: &Arc<UpstreamTarget>,
        client_params: &[(String, String)],
        registry: &UpstreamRegistry,
        max_message: usize,
    ) -> Result<PooledConnect, PoolError> {
        let pool = self.pool(target, client_params, registry, max_message);
        let key = Arc::new(BackendKey::default());
        let transaction = target.resource.pool.mode == PoolMode::Transaction;
        let lease = if transaction {
            if pool.facts().is_none() {
                // The first client learns what the server reports at start-up.
                pool.clone().lease().await?.finish(End::Keep);
            }
            None
        } else {
            Some(pool.clone().lease().await?)
        };
        let (pid, secret) = lease
            .as_ref()
            .map(|l| (l.backend().pid, l.backend().secret.clone()))
            .unwrap_or_default();
        let facts = match &lease {
            Some(l) => l.backend().facts.clone(),
            None => pool.facts().expect("learned above"),
        };
        let mut params = facts.params.clone();
        if let Some((_, app)) = client_params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("application_name"))
        {
            params.retain(|(k, _)| k != "application_name");
            params.push(("application_name".into(), app.clone()));
        }
        let stream = PoolStream::new(pool, lease, transaction, key.clone(), max_message);
        Ok(PooledConnect {
            connected: Connected {
                stream: UpStream::Pooled(Box::new(stream)),
                params,
                pid,
                secret,
                status: b'I',
                tls_info: facts.tls_info,
                leftover: Vec::new(),
            },
            key,
        })
    }
}

/// What a connection reported at start-up, for the clients that are served by it.
#[derive(Clone)]
struct Facts {
    params: Vec<(String, String)>,
    tls_info: Option<TlsSessionInfo>,
}

/// One authenticated upstream connection the pool owns.
pub(crate) struct Backend {
    stream: UpStream,
    pid: i32,
    secret: Vec<u8>,
    facts: Facts,
    statements: BackendStatements,
    /// What carried client `SET`s left on the connection (under `transaction`).
    settings: Settings,
    idle_since: Instant,
    _entry: Option<UpstreamGuard>,
}

impl Backend {
    /// Whether the connection is still open and quiet: an idle server sends nothing, so
    /// anything readable (a close, an administrator's termination) means it is not reusable.
    async fn alive(&mut self) -> bool {
        let mut probe = [0u8; 64];
        tokio::time::timeout(Duration::ZERO, self.stream.read(&mut probe))
            .await
            .is_err()
    }
}

struct Metrics {
    idle: Arc<Cell>,
    active: Arc<Cell>,
    waiting: Arc<Cell>,
    reused: Arc<Cell>,
    opened: Arc<Cell>,
    timeouts: Arc<Cell>,
    reserve: Arc<Cell>,
}

impl Metrics {
    fn new(resource: &str) -> Self {
        let conns = |state| {
            registry().gauge(
                "tollgate_pool_connections",
                "Pooled upstream connections by resource and state (idle, active).",
                &[("resource", resource), ("state", state)],
            )
        };
        let checkouts = |outcome| {
            registry().counter(
                "tollgate_pool_checkouts_total",
                "Upstream connections handed to client sessions by pooled resources, by outcome (reused, opened, timeout).",
                &[("resource", resource), ("outcome", outcome)],
            )
        };
        Metrics {
            idle: conns("idle"),
            active: conns("active"),
            waiting: registry().gauge(
                "tollgate_pool_clients_waiting",
                "Client sessions waiting for a free upstream connection, by resource.",
                &[("resource", resource)],
            ),
            reused: checkouts("reused"),
            opened: checkouts("opened"),
            timeouts: checkouts("timeout"),
            reserve: registry().counter(
                "tollgate_pool_reserve_leases_total",
                "Transactions that ran on a reserve_pool connection after waiting reserve_pool_timeout, by resource.",
                &[("resource", resource)],
            ),
        }
    }
}

/// One resource's connections for one set of start-up parameters.
pub(crate) struct Pool {
    target: Arc<UpstreamTarget>,
    params: Vec<(String, String)>,
    cfg: Pooling,
    idle: Mutex<VecDeque<Backend>>,
    /// `transaction`: a permit per connection in use (`pool_size`), and the `reserve_pool`
    /// ones for clients that waited `reserve_pool_timeout`.
    slots: Option<Arc<Semaphore>>,
    reserve: Option<Arc<Semaphore>>,
    facts: Mutex<Option<Facts>>,
    registry: UpstreamRegistry,
    max_message: usize,
    metrics: Metrics,
}

impl Pool {
    fn new(
        target: Arc<UpstreamTarget>,
        params: Vec<(String, String)>,
        registry: UpstreamRegistry,
        max_message: usize,
    ) -> Arc<Pool> {
        let cfg = target.resource.pool.clone();
        let pool = Arc::new(Pool {
            metrics: Metrics::new(&target.resource.name),
            slots: (cfg.mode == PoolMode::Transaction).then(|| Arc::new(Semaphore::new(cfg.size))),
            reserve: (cfg.mode == PoolMode::Transaction && cfg.reserve_size > 0)
                .then(|| Arc::new(Semaphore::new(cfg.reserve_size))),
            target,
            params,
            cfg,
            idle: Mutex::new(VecDeque::new()),
            facts: Mutex::new(None),
            registry,
            max_message,
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    fn facts(&self) -> Option<Facts> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn resource(&self) -> &str {
        &self.target.resource.name
    }

    pub(crate) fn guarded(&self) -> bool {
        self.target.policy.is_some()
    }

    fn set_idle_gauge(&self, idle: &VecDeque<Backend>) {
        self.metrics.idle.set(idle.len() as i64);
    }

    /// A connection for one client: under `transaction` it waits (at most `pool_timeout`)
    /// for one of the `pool_size` places; an idle connection that is still open is reused,
    /// else a new one is opened.
    pub(crate) async fn lease(self: Arc<Self>) -> Result<Lease, PoolError> {
        let permit = match &self.slots {
            None => None,
            Some(slots) => Some(self.place(slots).await?),
        };
        loop {
            let candidate = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let b = idle.pop_back();
                self.set_idle_gauge(&idle);
                b
            };
            let Some(mut b) = candidate else { break };
            if b.idle_since.elapsed() < self.cfg.idle_timeout && b.alive().await {
                self.metrics.reused.inc();
                return Ok(Lease::new(self, b, permit));
            }
        }
        let b = self.open().await?;
        self.metrics.opened.inc();
        Ok(Lease::new(self, b, permit))
    }

    /// A connection for a client with these settings: when the connection's differ, one simple
    /// query moves it to them first (its answers go nowhere); if that fails the connection is
    /// closed and the client is told, never left half-applied.
    pub(crate) async fn lease_for(self: Arc<Self>, wanted: Settings) -> Result<Lease, PoolError> {
        let mut lease = self.clone().lease().await?;
        let Some(sql) = settings::reapply(&lease.backend().settings, &wanted) else {
            return Ok(lease);
        };
        let b = lease.backend_mut();
        match run_quietly(b, &sql, self.guarded(), self.max_message).await {
            Ok(()) => {
                b.settings = wanted;
                Ok(lease)
            }
            Err(why) => {
                tracing::warn!(resource = %self.resource(), backend_pid = b.pid, error = %why, "a pooled connection did not take a session's settings; closing it");
                lease.finish(End::Close);
                Err(PoolError::Settings(why.into()))
            }
        }
    }

    /// One of the `pool_size` places, or (once the client has waited `reserve_pool_timeout`)
    /// one of the `reserve_pool` extra ones, whichever frees first; at most `pool_timeout` in all.
    async fn place(&self, slots: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, PoolError> {
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        let _waiting = GaugeGuard::new(self.metrics.waiting.clone());
        let cfg = &self.cfg;
        let wait = async {
            let reserve = match &self.reserve {
                Some(r) if cfg.reserve_timeout < cfg.queue_timeout => r.clone(),
                _ => return slots.clone().acquire_owned().await.ok(),
            };
            if let Ok(p) =
                tokio::time::timeout(cfg.reserve_timeout, slots.clone().acquire_owned()).await
            {
                return p.ok();
            }
            tokio::select! {
                p = slots.clone().acquire_owned() => p.ok(),
                p = reserve.acquire_owned() => {
                    self.metrics.reserve.inc();
                    p.ok()
                }
            }
        };
        match tokio::time::timeout(cfg.queue_timeout, wait).await {
            Ok(Some(p)) => Ok(p),
            _ => {
                self.metrics.timeouts.inc();
                Err(PoolError::Timeout(cfg.queue_timeout))
            }
        }
    }

    async fn open(&self) -> Result<Backend, UpstreamError> {
        let c = self.target.connect(&self.params, self.max_message).await?;
        if !c.leftover.is_empty() {
            return Err(UpstreamError::Protocol(
                "upstream sent messages after its first ReadyForQuery",
            ));
        }
        let facts = Facts {
            params: c.params,
            tls_info: c.tls_info,
        };
        *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = Some(facts.clone());
        let entry = c.stream.local_addr().ok().map(|local_addr| {
            self.registry.register(UpstreamConn {
                resource: self.target.resource.name.clone(),
                upstream: self.target.resource.upstream.clone(),
                local_addr,
                backend_pid: Some(c.pid),
            })
        });
        Ok(Backend {
            stream: c.stream,
            pid: c.pid,
            secret: c.secret,
            facts,
            statements: BackendStatements::default(),
            settings: Settings::new(),
            idle_since: Instant::now(),
            _entry: entry,
        })
    }

    /// Keep a clean connection for the next client (up to `pool_max_idle`).
    fn park(&self, mut b: Backend) {
        b.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.cfg.max_idle {
            idle.push_back(b);
        }
        self.set_idle_gauge(&idle);
    }

    /// Close idle connections unused for `pool_idle_timeout`.
    fn prune(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.cfg.idle_timeout;
        idle.retain(|b| b.idle_since.elapsed() < timeout);
        self.set_idle_gauge(&idle);
    }
}

/// Closes a pool's idle connections as they pass `pool_idle_timeout`, until the pool is gone.
async fn reap(pool: Weak<Pool>) {
    let every = match pool.upgrade() {
        Some(p) => {
            (p.cfg.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.prune(),
            None => return,
        }
    }
}

/// A connection lent to one client session (and its `pool_size` place).
pub(crate) struct Lease {
    pool: Arc<Pool>,
    backend: Option<Backend>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    fn new(pool: Arc<Pool>, backend: Backend, permit: Option<OwnedSemaphorePermit>) -> Lease {
        pool.metrics.active.inc();
        Lease {
            pool,
            backend: Some(backend),
            _permit: permit,
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        self.backend
            .as_ref()
            .expect("a lease holds its backend until it ends")
    }

    pub(crate) fn backend_mut(&mut self) -> &mut Backend {
        self.backend
            .as_mut()
            .expect("a lease holds its backend until it ends")
    }

    /// Give the connection back: kept for the next client (under `session`, once `DISCARD ALL`
    /// succeeds), or closed, and with [`End::Cancel`] whatever it still runs is cancelled.
    pub(crate) fn finish(mut self, end: End) {
        let Some(b) = self.backend.take() else { return };
        let pool = self.pool.clone();
        match (end, pool.cfg.mode) {
            (End::Close, _) => drop(b),
            (End::Cancel, _) => {
                let target = pool.target.clone();
                let (pid, secret) = (b.pid, b.secret.clone());
                drop(b);
                tokio::spawn(async move {
                    if let Err(e) = target.cancel(pid, &secret).await {
                        tracing::warn!(resource = %target.resource.name, error = %e, "could not cancel what a closed pooled connection was running");
                    }
                });
            }
            (End::Keep, PoolMode::Transaction) => pool.park(b),
            (End::Keep, _) => {
                tokio::spawn(async move {
                    if let Some(b) = reset(b, pool.guarded(), pool.max_message).await {
                        pool.park(b);
                    }
                });
            }
        }
    }
}

/// How a lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Idle and clean: back to the pool.
    Keep,
    /// Left in a transaction or another state no other client may inherit: closed.
    Close,
    /// Closed while requests were in flight: they are cancelled too.
    Cancel,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.metrics.active.dec();
    }
}

/// Run the gateway's own simple query on an idle connection, its answers kept from every
/// client; `Ok` when it succeeded and left the connection idle, with no setting the guardrails
/// pin moved.
async fn run_quietly(
    b: &mut Backend,
    sql: &str,
    guarded: bool,
    limit: usize,
) -> Result<(), &'static str> {
    let run = async {
        b.stream
            .write_all(&frontend::query(sql))
            .await
            .map_err(|_| "write failed")?;
        b.stream.flush().await.map_err(|_| "write failed")?;
        let mut fb = FrameBuf::new();
        let mut failed = false;
        loop {
            let (tag, body) = crate::io::read_frame(&mut b.stream, &mut fb, limit)
                .await
                .map_err(|_| "read failed")?;
            match tag {
                b'C' | b'N' => {}
                b'E' => failed = true,
                b'S' => {
                    let (name, value) =
                        backend::parse_parameter_status(&body).map_err(|_| "malformed answer")?;
                    if guarded && crate::relay::dialect_change(&name, &value).is_some() {
                        return Err("a pinned setting changed");
                    }
                }
                b'Z' if failed => return Err("the server refused it"),
                b'Z' if body.first() == Some(&b'I') && fb.take_rest().is_empty() => return Ok(()),
                _ => return Err("unexpected answer"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or(Err("no answer within 5s"))
}

/// `DISCARD ALL` on a connection whose session ended cleanly: everything the session set up
/// (settings, prepared statements, temporary tables, LISTEN, advisory locks) is gone, and the
/// settings the guardrails pin are checked again. `None`: it is closed instead.
async fn reset(mut b: Backend, guarded: bool, limit: usize) -> Option<Backend> {
    match run_quietly(&mut b, "DISCARD ALL", guarded, limit).await {
        Ok(()) => {
            b.settings.clear();
            Some(b)
        }
        Err(_) => {
            tracing::debug!(
                backend_pid = b.pid,
                "a pooled connection failed its reset; closing it"
            );
            None
        }
    }
}

/// The FATAL a pooled session gets when no connection could be had for its next statement.
pub(crate) fn unavailable(pool: &Pool, e: &PoolError) -> Vec<u8> {
    let resource = pool.resource();
    match e {
        PoolError::Timeout(waited) => SessionEnd::PoolTimeout {
            resource,
            waited: *waited,
            pool_size: pool.cfg.size,
        },
        PoolError::Upstream(_) => SessionEnd::PoolConnectFailed { resource },
        PoolError::Settings(_) => SessionEnd::PoolSettingsFailed { resource },
    }
    .fatal()
}
