//! A replica on a shared (PostgreSQL) store: registers itself and renews its heartbeat, and
//! tells the cluster-wide housekeeping (checkpoints, retention, the periodic scan) whether this
//! replica leads it, so that it runs once per cluster rather than once per replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tollgate_store::{unix_ms, ReplicaRecord, Store, StoreError};

/// How often a replica renews its heartbeat; it counts as alive for three of these.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Whether this process leads the cluster's housekeeping: always, alone on its store.
#[derive(Clone)]
pub(crate) struct Leadership(Option<tokio::sync::watch::Receiver<bool>>);

impl Leadership {
    pub(crate) fn of(store: &dyn Store) -> Self {
        Leadership(store.cluster_leader())
    }

    pub(crate) fn leads(&self) -> bool {
        self.0.as_ref().is_none_or(|rx| *rx.borrow())
    }
}

/// `addr` as peers can reach it: a wildcard address is replaced by the host's name.
fn reachable(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    }
}

pub(crate) fn record(
    id: &str,
    postgres: SocketAddr,
    admin: Option<SocketAddr>,
    cancel_tag: Option<i32>,
) -> ReplicaRecord {
    let now = unix_ms(SystemTime::now());
    ReplicaRecord {
        id: id.to_string(),
        address: reachable(postgres),
        admin_address: admin.map(reachable),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cancel_tag,
        started_at_unix_ms: now,
        heartbeat_at_unix_ms: now,
    }
}

/// Registers the replica and renews its heartbeat until aborted; returns at once on a store
/// without a registry (SQLite).
pub(crate) async fn heartbeat_loop(store: Arc<dyn Store>, mut me: ReplicaRecord) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        me.heartbeat_at_unix_ms = unix_ms(SystemTime::now());
        let (s, r) = (store.clone(), me.clone());
        match tokio::task::spawn_blocking(move || s.replica_heartbeat(&r)).await {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(replica = %me.id, "replica heartbeat renewed again");
                }
                failing = false;
            }
            Ok(Err(StoreError::Unsupported(_))) => return,
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(replica = %me.id, error = %e, "cannot renew this replica's heartbeat in the store");
                }
                failing = true;
            }
            Err(e) => tracing::error!(error = %e, "replica heartbeat task failed"),
        }
    }
}

/// A cancel-key tag no live replica uses (`None` on a store without a registry, where this
/// gateway is alone). Two replicas starting at the same moment may still draw the same tag:
/// 1 in 1023, and a collision only misroutes a cancel request between them.
pub(crate) fn pick_cancel_tag(store: &dyn Store) -> Option<i32> {
    let taken: Vec<i32> = match store.replicas() {
        Ok(list) => {
            let now = unix_ms(SystemTime::now());
            let interval = HEARTBEAT_INTERVAL.as_millis() as i64;
            list.iter()
                .filter(|r| r.alive(now, interval))
                .filter_map(|r| r.cancel_tag)
                .collect()
        }
        Err(StoreError::Unsupported(_)) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the replica registry; picking a cancel-key tag blind");
            Vec::new()
        }
    };
    let mut b = [0u8; 2];
    loop {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .expect("the system random source works");
        let tag = 1 + i32::from(u16::from_be_bytes(b)) % tollgate_pg::MAX_REPLICA_TAG;
        if !taken.contains(&tag) || taken.len() >= tollgate_pg::MAX_REPLICA_TAG as usize {
            return Some(tag);
        }
    }
}

/// Removes the replica from the registry (at shutdown); a store without one is fine.
pub(crate) fn deregister(store: &dyn Store, id: &str) {
    match store.replica_deregister(id) {
        Ok(()) | Err(StoreError::Unsupported(_)) => {}
        Err(e) => {
            tracing::warn!(replica = %id, error = %e, "cannot remove this replica from the registry")
        }
    }
}

/// The admin listeners of the live replicas other than `me` (for a bypass check, which needs
/// every replica's upstream connections); `Err` says why they are not all known.
pub async fn peer_admins(store: Arc<dyn Store>, me: &str) -> Result<Vec<SocketAddr>, String> {
    let list = match tokio::task::spawn_blocking(move || store.replicas()).await {
        Ok(Ok(l)) => l,
        Ok(Err(StoreError::Unsupported(_))) => return Ok(Vec::new()),
        Ok(Err(e)) => return Err(format!("the replica registry cannot be read: {e}")),
        Err(e) => return Err(format!("the replica registry task failed: {e}")),
    };
    let now = unix_ms(SystemTime::now());
    let interval = HEARTBEAT_INTERVAL.as_millis() as i64;
    let mut peers = Vec::new();
    for r in list.iter().filter(|r| r.id != me && r.alive(now, interval)) {
        let Some(admin) = &r.admin_address else {
            return Err(format!(
                "replica {} has no admin listener, so its upstream connections are unknown",
                r.id
            ));
        };
        let addr = tokio::net::lookup_host(admin.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("replica {}'s admin address {admin} does not resolve", r.id))?;
        peers.push(addr);
    }
    Ok(peers)
}
