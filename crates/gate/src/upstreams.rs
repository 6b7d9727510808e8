//! The live upstream connections the gateway holds, by resource, for every SQL adapter: the
//! gateway's own socket address on each one is what the upstream sees as the client, so
//! `tollgate scan` can tell the gateway's sessions in `pg_stat_activity` or MySQL's process
//! list from sessions that went around it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One upstream connection opened by the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConn {
    pub resource: String,
    /// The resource's `upstream` (`host:port`), so resources sharing a server can be matched.
    pub upstream: String,
    /// The gateway's local address on the connection (the upstream's `client_addr:client_port`).
    pub local_addr: SocketAddr,
    /// The upstream backend's process id, when known.
    pub backend_pid: Option<i32>,
}

/// Live upstream connections; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct UpstreamRegistry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, UpstreamConn>>,
}

impl UpstreamRegistry {
    /// Record a connection for as long as the returned guard lives.
    pub fn register(&self, conn: UpstreamConn) -> UpstreamGuard {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn);
        UpstreamGuard {
            registry: self.clone(),
            id,
        }
    }

    /// Every live connection, in no particular order.
    pub fn snapshot(&self) -> Vec<UpstreamConn> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Removes its connection from the registry when dropped.
pub struct UpstreamGuard {
    registry: UpstreamRegistry,
    id: u64,
}

impl Drop for UpstreamGuard {
    fn drop(&mut self) {
        self.registry
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_scopes_the_entry() {
        let reg = UpstreamRegistry::default();
        let conn = |port| UpstreamConn {
            resource: "app".into(),
            upstream: "db:5432".into(),
            local_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            backend_pid: Some(7),
        };
        let a = reg.register(conn(1000));
        let b = reg.register(conn(1000));
        assert_eq!(reg.snapshot().len(), 2);
        drop(a);
        assert_eq!(reg.snapshot(), vec![conn(1000)]);
        drop(b);
        assert!(reg.snapshot().is_empty());
    }
}
