//! Owns tollgate's durable state (sessions, events, reviews) and the audit hash chain.
//! It never parses a wire protocol: protocol adapters hand it [`EventInput`]s, usually through
//! the batching [`Recorder`].
//!
//! - [`Store`] is the storage interface; [`SqliteStore`] is the embedded implementation
//!   and [`PgStore`] the shared one for several replicas. [`open_store`] picks one from a URL.
//! - Every writer process appends to its own hash chain (`chain_id`); the chain head lives in
//!   the database, updated in the same transaction as the events, so nothing about a chain
//!   is held only in memory. See [`hash`] for the exact encoding.
//! - [`Store::verify`] recomputes every chain and reports the first break.
//! - [`Store::prune`] (retention) removes a prefix of each chain behind an anchor that an
//!   `audit.pruned` event attests; `audit.checkpoint` events record every chain head, and
//!   `verify` checks both (rules in `sqlite/audit.rs`).

mod chaincheck;
pub mod hash;
mod journal;
pub mod migrate;
pub mod pins;
pub mod postgres;
mod recorder;
pub mod refused;
mod replica;
pub mod review;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use hash::{
    canonical_json, checkpoint_digest, event_hash, CanonicalObject, HashedFields, GENESIS_HASH,
};
pub use pins::{McpPinRecord, PinSeen};
pub use postgres::{PgStore, PgStoreUrl};
pub use recorder::{
    import_journal, Durability, JournalImport, Recorder, RecorderOptions, RecorderStats,
};
pub use replica::ReplicaRecord;
pub use review::{
    GrantRecord, Requester, ReviewChange, ReviewFilter, ReviewRecord, ReviewVote, VoteOutcome,
    VoteRecord,
};
pub use sqlite::{SqliteStore, SCHEMA_VERSION};

/// Event kind that creates a session row.
pub const KIND_SESSION_OPEN: &str = "session.open";
/// Event kind that closes a session row (sets `ended_at`, `outcome` and the close payload).
pub const KIND_SESSION_CLOSE: &str = "session.close";
/// Event kind that records a retention prune and the new anchor of every chain it shortened.
pub const KIND_AUDIT_PRUNED: &str = "audit.pruned";
/// Event kind that records every chain's head (and their digest) at one moment.
pub const KIND_AUDIT_CHECKPOINT: &str = "audit.checkpoint";
/// The chain `audit.pruned` events are appended to (by whoever prunes, in the prune's
/// transaction). It is never pruned itself: its latest word on each chain attests that chain's anchor.
pub const PRUNE_CHAIN: &str = "audit-prune";
/// The session id of `audit.pruned` events.
pub const PRUNE_SESSION: &str = "audit.prune";

/// Where a chain stands: its last event (a head), or its last pruned event (an anchor).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainPoint {
    pub chain_id: String,
    pub seq: i64,
    pub hash: String,
}

/// What a retention prune removed (or, with `dry_run`, would remove).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PruneReport {
    pub cutoff_unix_ms: i64,
    pub dry_run: bool,
    pub sessions: u64,
    pub events: u64,
    /// The new anchor of every chain that was shortened.
    pub anchors: Vec<ChainPoint>,
}

/// An event to append; `seq` numbers and hashes are assigned by the store.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EventInput {
    pub session_id: String,
    pub kind: String,
    pub at: SystemTime,
    pub payload: serde_json::Value,
}

/// An [`EventInput`] whose payload is already canonical JSON, byte for byte what
/// [`canonical_json`] writes for it: for the hot paths that write it directly instead of building
/// a `Value` first (see [`Recorder::record_canonical`]).
#[derive(Clone, Debug)]
pub struct CanonicalEvent {
    pub session_id: String,
    pub kind: String,
    pub at: SystemTime,
    pub payload: String,
}

/// An event already numbered and hashed by a journal writer (see [`Recorder`]), with its
/// payload as the exact canonical JSON text that was hashed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HashedEvent {
    pub chain_id: String,
    pub chain_seq: i64,
    pub session_id: String,
    pub session_seq: i64,
    pub at_unix_ms: i64,
    pub kind: String,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

/// An event as stored: the evidence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StoredEvent {
    pub id: i64,
    pub chain_id: String,
    pub chain_seq: i64,
    pub session_id: String,
    pub session_seq: i64,
    pub at_unix_ms: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// A session, materialized from its `session.open` / `session.close` events.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SessionRow {
    pub id: String,
    pub started_at_unix_ms: i64,
    pub ended_at_unix_ms: Option<i64>,
    pub listener: Option<String>,
    pub client_addr: Option<String>,
    pub resource: Option<String>,
    pub subject: Option<String>,
    pub auth_method: Option<String>,
    pub outcome: Option<String>,
    pub event_count: i64,
    /// Payload of `session.open` (`null` if only a `session.close` was seen).
    pub open: serde_json::Value,
    pub close: Option<serde_json::Value>,
}

/// Which sessions to list. Newest first; `since` is inclusive, `until` exclusive
/// (both on `started_at_unix_ms`).
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    pub subject: Option<String>,
    pub resource: Option<String>,
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
    pub outcome: Option<String>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    pub chains: usize,
    pub events: u64,
    /// `audit.checkpoint` events whose recorded heads were checked against the chains.
    pub checkpoints: u64,
    pub first_break: Option<ChainBreak>,
}

/// Where a chain stops verifying. For a deleted event, `chain_seq` is the missing number and
/// `event_id`/`session_id` name the nearest event still present (0/"" if none).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChainBreak {
    pub chain_id: String,
    pub chain_seq: i64,
    pub event_id: i64,
    pub session_id: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is echoed by scheme only: it may carry credentials.
    #[error("unsupported store URL scheme {scheme:?}: accepted forms are sqlite://PATH, sqlite:///ABSOLUTE/PATH, sqlite::memory: and postgres://USER@HOST:PORT/DBNAME?sslrootcert=CA_FILE")]
    InvalidUrl { scheme: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot prepare the store file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The server's message and SQLSTATE, or what broke the connection.
    #[error("postgres store: {0}")]
    Postgres(String),
    #[error("the database schema is version {found}, newer than this tollgate build knows ({known}); upgrade tollgate")]
    SchemaTooNew { found: i64, known: i64 },
    #[error(
        "chain {chain_id} was extended by another writer; each process must use its own chain_id"
    )]
    ChainConflict { chain_id: String },
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error("recording failed after {attempts} attempts: {source}")]
    BatchFailed {
        attempts: u32,
        #[source]
        source: Arc<StoreError>,
    },
    #[error("the recorder has stopped")]
    RecorderStopped,
    #[error("the audit store is unavailable: {0}")]
    Unavailable(String),
    #[error("internal store error: {0}")]
    Internal(String),
}

/// Durable state. Implementations must be safe for several processes sharing one database:
/// all chain state lives in the database.
pub trait Store: Send + Sync + 'static {
    /// Append a batch atomically (one transaction), extending this writer's chain.
    fn append(&self, chain_id: &str, events: &[EventInput])
        -> Result<Vec<StoredEvent>, StoreError>;
    /// Insert events numbered and hashed elsewhere (the recorder's journal), in one transaction.
    /// Events already present (same chain and `chain_seq`) are skipped, so replaying a journal
    /// after a crash is idempotent; each chain's head advances to its last imported event.
    fn import(&self, events: &[HashedEvent]) -> Result<(), StoreError>;
    fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRow>, StoreError>;
    fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError>;
    /// A session's events in `session_seq` order.
    fn events(&self, session_id: &str) -> Result<Vec<StoredEvent>, StoreError>;
    /// Recompute every chain from its anchor; check each anchor against the latest
    /// `audit.pruned` event and each `audit.checkpoint` against the chains. Reports the first
    /// break (chains in `chain_id` order, then anchors, then checkpoints).
    fn verify(&self) -> Result<VerifyReport, StoreError>;
    /// The last event of every chain, in `chain_id` order.
    fn chain_heads(&self) -> Result<Vec<ChainPoint>, StoreError> {
        Err(StoreError::Unsupported(
            "this store cannot list chain heads".into(),
        ))
    }
    /// Delete the sessions that ended before `cutoff_unix_ms` with their events, in one
    /// transaction, re-anchoring each chain and appending an `audit.pruned` event to
    /// [`PRUNE_CHAIN`]. Only a prefix of each chain is removed; see the implementation for the
    /// exact rule. `dry_run` reports without changing anything.
    fn prune(&self, cutoff_unix_ms: i64, dry_run: bool) -> Result<PruneReport, StoreError> {
        let _ = (cutoff_unix_ms, dry_run);
        Err(StoreError::Unsupported("this store cannot prune".into()))
    }
    fn ping(&self) -> Result<(), StoreError>;
    /// Up to `limit` events with `id > after_id` in `id` order (insertion order), optionally
    /// only those with `since_unix_ms <= at_unix_ms < until_unix_ms`: pages for an export that
    /// walks the whole store without holding it in memory.
    fn events_page(
        &self,
        after_id: i64,
        since_unix_ms: Option<i64>,
        until_unix_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let _ = (after_id, since_unix_ms, until_unix_ms, limit);
        Err(StoreError::Unsupported(
            "this store cannot page through events".into(),
        ))
    }

    // ---- replicas sharing the store (PostgreSQL; an SQLite store has one gateway) ----

    /// Register `replica`, or renew its heartbeat.
    fn replica_heartbeat(&self, replica: &ReplicaRecord) -> Result<(), StoreError> {
        let _ = replica;
        Err(no_replicas())
    }
    /// Every registered replica, in id order (alive or not: see [`ReplicaRecord::alive`]).
    fn replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        Err(no_replicas())
    }
    /// Remove a replica from the registry (it is shutting down).
    fn replica_deregister(&self, id: &str) -> Result<(), StoreError> {
        let _ = id;
        Err(no_replicas())
    }
    /// Whether this process leads the cluster's housekeeping (checkpoints, retention, the
    /// periodic scan), as it changes. `None`: this process is the store's only writer, and leads.
    fn cluster_leader(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    // ---- one-time values: SAML request ids, the assertion replay cache, login codes ----

    /// Keep `value` under (`kind`, `key`) until `expires_unix_ms`, unless a live entry is there:
    /// true when this call stored it. The first claim wins across every process sharing the
    /// store (the replay cache: an assertion id is accepted once).
    fn once_put(
        &self,
        kind: &str,
        key: &str,
        value: &str,
        expires_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Result<bool, StoreError> {
        let _ = (kind, key, value, expires_unix_ms, now_unix_ms);
        Err(StoreError::Unsupported(
            "this store keeps no one-time values".into(),
        ))
    }
    /// The live value under (`kind`, `key`), left in place.
    fn once_get(
        &self,
        kind: &str,
        key: &str,
        now_unix_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        let _ = (kind, key, now_unix_ms);
        Err(StoreError::Unsupported(
            "this store keeps no one-time values".into(),
        ))
    }
    /// The live value under (`kind`, `key`), removed: of two callers at most one gets it.
    fn once_take(
        &self,
        kind: &str,
        key: &str,
        now_unix_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        let _ = (kind, key, now_unix_ms);
        Err(StoreError::Unsupported(
            "this store keeps no one-time values".into(),
        ))
    }

    // ---- reviews (approvals); the lifecycle rules are in tollgate-review ----

    /// Review changes as the store learns of them, including those made by other processes
    /// sharing it (a dedicated LISTEN connection for PostgreSQL). `None` when the store cannot
    /// tell: callers then rely on polling alone. A lagging receiver should re-read everything.
    fn review_changes(&self) -> Option<tokio::sync::broadcast::Receiver<ReviewChange>> {
        None
    }

    /// Insert a new review (its `votes` and `grant_until_unix_ms` are ignored).
    fn review_create(&self, review: &ReviewRecord) -> Result<(), StoreError> {
        let _ = review;
        Err(no_reviews())
    }
    fn review(&self, id: &str) -> Result<Option<ReviewRecord>, StoreError> {
        let _ = id;
        Err(no_reviews())
    }
    /// Newest first.
    fn reviews(&self, filter: &ReviewFilter) -> Result<Vec<ReviewRecord>, StoreError> {
        let _ = filter;
        Err(no_reviews())
    }
    /// Record a vote atomically: checks pending, deadline, self-vote and duplicate vote; one
    /// deny, or the `min_approvals`-th distinct approval, decides; an approved access or unmask
    /// review gets its grant in the same transaction.
    fn review_vote(&self, vote: &ReviewVote) -> Result<VoteOutcome, StoreError> {
        let _ = vote;
        Err(no_reviews())
    }
    /// Move a pending review to `status` (expired, withdrawn); `None` if it was not pending.
    fn review_close(
        &self,
        id: &str,
        status: &str,
        at_unix_ms: i64,
        reason: Option<&str>,
    ) -> Result<Option<ReviewRecord>, StoreError> {
        let _ = (id, status, at_unix_ms, reason);
        Err(no_reviews())
    }
    /// End the still-running grant of an approved access or unmask review now (a revocation);
    /// the review, its grant ending at `at_unix_ms`, or `None` if no grant of it was running.
    fn review_revoke_grant(
        &self,
        id: &str,
        at_unix_ms: i64,
    ) -> Result<Option<ReviewRecord>, StoreError> {
        let _ = (id, at_unix_ms);
        Err(no_reviews())
    }
    /// Mark every pending review past its deadline expired; returns those this call changed.
    fn review_expire_due(&self, now_unix_ms: i64) -> Result<Vec<ReviewRecord>, StoreError> {
        let _ = now_unix_ms;
        Err(no_reviews())
    }
    /// Consume an approved review; false if it was not approved or already used.
    fn review_mark_used(&self, id: &str, at_unix_ms: i64) -> Result<bool, StoreError> {
        let _ = (id, at_unix_ms);
        Err(no_reviews())
    }
    /// Consume the newest approved, unused command review matching requester, resource and
    /// statement hash, decided at or after `decided_since_unix_ms`.
    fn review_take_rerun(
        &self,
        requester: Requester<'_>,
        resource: &str,
        statement_sha256: &str,
        decided_since_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Result<Option<ReviewRecord>, StoreError> {
        let _ = (
            requester,
            resource,
            statement_sha256,
            decided_since_unix_ms,
            now_unix_ms,
        );
        Err(no_reviews())
    }
    /// The access grant (approved `access` review) that lets `requester` reach `resource` at
    /// `now_unix_ms`, if any (latest-ending). An unmask grant never counts.
    fn access_grant(
        &self,
        requester: Requester<'_>,
        resource: &str,
        now_unix_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError> {
        let _ = (requester, resource, now_unix_ms);
        Err(no_reviews())
    }
    /// The unmask grant (approved `unmask` review) that lets `requester` see `resource` without
    /// masking at `now_unix_ms`, if any (latest-ending). An access grant never counts.
    fn unmask_grant(
        &self,
        requester: Requester<'_>,
        resource: &str,
        now_unix_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError> {
        let _ = (requester, resource, now_unix_ms);
        Err(no_reviews())
    }

    // ---- MCP tool pins (see `pins`) ----

    /// A listing showed tool `tool` of `resource` with definition `sha256`: pins it when the
    /// tool has no pin yet, records it as seen when it differs from the pin (clears that when it
    /// is the pinned one again), atomically.
    fn mcp_pin_see(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
        at_unix_ms: i64,
    ) -> Result<PinSeen, StoreError> {
        let _ = (resource, tool, sha256, at_unix_ms);
        Err(StoreError::Unsupported(
            "this store cannot keep MCP tool pins".into(),
        ))
    }
    /// Every pin (of one resource), by resource and tool.
    fn mcp_pins(&self, resource: Option<&str>) -> Result<Vec<McpPinRecord>, StoreError> {
        let _ = resource;
        Err(StoreError::Unsupported(
            "this store cannot keep MCP tool pins".into(),
        ))
    }
    /// Pin the definition `sha256` a listing saw (an approved `pin` review); false when the tool
    /// was not seen with that definition (already approved, or changed again since).
    fn mcp_pin_approve(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
        at_unix_ms: i64,
        by: &str,
    ) -> Result<bool, StoreError> {
        let _ = (resource, tool, sha256, at_unix_ms, by);
        Err(StoreError::Unsupported(
            "this store cannot keep MCP tool pins".into(),
        ))
    }
}

/// What every store refuses in [`Store::append`] before it writes anything.
pub(crate) fn check_append(chain_id: &str, events: &[EventInput]) -> Result<(), StoreError> {
    if chain_id.is_empty() {
        return Err(StoreError::InvalidEvent("chain_id is empty".into()));
    }
    if let Some(ev) = events
        .iter()
        .find(|e| e.session_id.is_empty() || e.kind.is_empty())
    {
        return Err(StoreError::InvalidEvent(format!(
            "session_id and kind must not be empty (session_id {:?}, kind {:?})",
            ev.session_id, ev.kind
        )));
    }
    Ok(())
}

fn no_replicas() -> StoreError {
    StoreError::Unsupported(
        "this store has no replica registry (one gateway per SQLite store)".into(),
    )
}

fn no_reviews() -> StoreError {
    StoreError::Unsupported("this store does not keep reviews".into())
}

/// Opens a store from a URL: `sqlite://relative/or/abs/path.db`, `sqlite:///abs/path.db`,
/// `sqlite::memory:` (tests), or `postgres://USER@HOST:PORT/DB?sslrootcert=CA&password_env=VAR`
/// for several replicas (see [`postgres::url`]).
pub fn open_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url == "sqlite::memory:" {
        return Ok(Arc::new(SqliteStore::open_in_memory()?));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Unsupported(
                "the sqlite store URL has no path; use sqlite://PATH".into(),
            ));
        }
        return Ok(Arc::new(SqliteStore::open(path)?));
    }
    if PgStoreUrl::is_postgres(url) {
        return Ok(Arc::new(PgStore::open(url)?));
    }
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    Err(StoreError::InvalidUrl {
        scheme: scheme.to_string(),
    })
}

/// Milliseconds since the Unix epoch (negative before it, saturating).
pub fn unix_ms(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_store_accepts_the_documented_forms() {
        let dir = tempfile::tempdir().unwrap();
        let rel_dir = tempfile::tempdir_in(".").unwrap();
        let rel = format!(
            "sqlite://{}/a.db",
            rel_dir.path().file_name().unwrap().to_str().unwrap()
        );
        open_store(&rel).unwrap().ping().unwrap();
        assert!(rel_dir.path().join("a.db").exists());
        let abs = format!("sqlite://{}/nested/b.db", dir.path().display());
        assert!(abs.starts_with("sqlite:///"));
        open_store(&abs).unwrap().ping().unwrap();
        assert!(dir.path().join("nested/b.db").exists());
        open_store("sqlite::memory:").unwrap().ping().unwrap();
    }

    #[test]
    fn open_store_rejects_bad_postgres_urls_and_unknown_schemes_without_echoing_secrets() {
        let err = open_store("postgres://u:hunter2@db/x").err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("password_env"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let err = open_store("mysql://u:hunter2@db/x").err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("\"mysql\""), "{msg}");
        assert!(msg.contains("sqlite://PATH"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(matches!(
            open_store("sqlite://").err().unwrap(),
            StoreError::Unsupported(_)
        ));
    }

    #[test]
    fn unix_ms_handles_both_sides_of_the_epoch() {
        use std::time::Duration;
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_millis(5)), -5);
    }
}
