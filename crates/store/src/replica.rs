//! The registry of gateway replicas sharing one store (PostgreSQL): who runs, where, which
//! version, and when each was last heard of.

/// One replica as registered in the store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRecord {
    /// The replica's id: its audit chain's id (`gw-…`), new at every start.
    pub id: String,
    /// Where clients reach it (its PostgreSQL listener, `host:port`).
    pub address: String,
    /// Its admin listener (`/readyz`, `/upstreams`), if it has one.
    pub admin_address: Option<String>,
    /// The tollgate version it runs.
    pub version: String,
    /// The tag its PostgreSQL cancel keys carry, so other replicas can pass a CancelRequest on.
    pub cancel_tag: Option<i32>,
    pub started_at_unix_ms: i64,
    pub heartbeat_at_unix_ms: i64,
}

impl ReplicaRecord {
    /// Whether its last heartbeat is recent: within three heartbeat intervals of `now`.
    pub fn alive(&self, now_unix_ms: i64, interval_ms: i64) -> bool {
        now_unix_ms.saturating_sub(self.heartbeat_at_unix_ms) <= 3 * interval_ms
    }
}
