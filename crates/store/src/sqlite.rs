//! The embedded SQLite store: WAL mode, one writer connection behind a mutex and a separate
//! read connection so readers never wait for a write transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde_json::Value;

use crate::chaincheck::{self, AuditChecks, ChainState, ChainWalk, RawEvent};
use crate::hash::{canonical_json, event_hash, HashedFields, GENESIS_HASH};
use crate::{
    unix_ms, ChainBreak, EventInput, HashedEvent, SessionFilter, SessionRow, Store, StoreError,
    StoredEvent, VerifyReport, KIND_SESSION_CLOSE, KIND_SESSION_OPEN,
};

mod audit;
mod one_time;
mod pins;
mod reviews;

/// The page size of a new store.
const PAGE_SIZE: i64 = 16 * 1024;

/// Ordered schema migrations; entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE chains (
    chain_id           TEXT PRIMARY KEY,
    last_seq           INTEGER NOT NULL,
    last_hash          TEXT NOT NULL,
    created_at_unix_ms INTEGER NOT NULL,
    updated_at_unix_ms INTEGER NOT NULL
);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_id    TEXT NOT NULL,
    chain_seq   INTEGER NOT NULL,
    session_id  TEXT NOT NULL,
    session_seq INTEGER NOT NULL,
    at_unix_ms  INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,   -- canonical JSON, exactly the bytes that were hashed
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    UNIQUE (chain_id, chain_seq),
    UNIQUE (session_id, session_seq)
);
CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY,
    started_at_unix_ms INTEGER NOT NULL,
    ended_at_unix_ms   INTEGER,
    listener           TEXT,
    client_addr        TEXT,
    resource           TEXT,
    subject            TEXT,
    auth_method        TEXT,
    outcome            TEXT,
    event_count        INTEGER NOT NULL DEFAULT 0,
    open_payload       TEXT NOT NULL,
    close_payload      TEXT
);
CREATE INDEX sessions_by_start ON sessions (started_at_unix_ms);
CREATE INDEX sessions_by_subject ON sessions (subject, started_at_unix_ms);
CREATE INDEX sessions_by_resource ON sessions (resource, started_at_unix_ms);
CREATE TABLE reviews (
    id          TEXT PRIMARY KEY,
    session_id  TEXT,
    resource    TEXT NOT NULL,
    requester   TEXT NOT NULL,
    status      TEXT NOT NULL,
    rule        TEXT,
    statement   TEXT,
    created_at  INTEGER NOT NULL,   -- unix ms
    decided_at  INTEGER,            -- unix ms
    decided_by  TEXT,
    reason      TEXT,
    payload     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX reviews_by_status ON reviews (status, created_at);
"#,
    audit::MIGRATION,
    reviews::MIGRATION,
    reviews::MIGRATION_PRINCIPALS,
    pins::MIGRATION,
    one_time::MIGRATION,
];

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const EVENT_COLUMNS: &str =
    "id, chain_id, chain_seq, session_id, session_seq, at_unix_ms, kind, payload, prev_hash, hash";
const SESSION_COLUMNS: &str = "id, started_at_unix_ms, ended_at_unix_ms, listener, client_addr, \
     resource, subject, auth_method, outcome, event_count, open_payload, close_payload";

pub struct SqliteStore {
    writer: Mutex<Connection>,
    /// `None` for an in-memory database, which a second connection could not see.
    reader: Option<Mutex<Connection>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating with mode 0600, and creating parent directories) and migrates a database file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        prepare_file(path)?;
        let mut writer = Connection::open(path)?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        // Larger pages for a new store (an existing one keeps its own): the audit importer
        // appends rows to three b-trees, and with 16 KiB pages it splits and rewrites fewer of
        // them (~20 % less CPU per imported event than 4 KiB; `record_bench -- fixed`).
        writer.pragma_update(None, "page_size", PAGE_SIZE)?;
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "sqlite store is not in WAL mode");
        }
        // WAL + FULL: a commit survives a power loss too (one fsync per commit; the recorder
        // commits in large batches), so a journal segment is deleted only once its events are.
        writer.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut writer)?;

        let reader = Connection::open(path)?;
        reader.busy_timeout(BUSY_TIMEOUT)?;
        reader.pragma_update(None, "query_only", true)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Some(Mutex::new(reader)),
            path: Some(path.to_path_buf()),
        })
    }

    /// A private in-memory database (tests); reads share the writer connection.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let mut writer = Connection::open_in_memory()?;
        migrate(&mut writer)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: None,
            path: None,
        })
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction rolls the transaction back when it is dropped,
        // so the connection is still usable.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => r.lock().unwrap_or_else(|p| p.into_inner()),
            None => self.writer(),
        }
    }
}

fn prepare_file(path: &Path) -> Result<(), StoreError> {
    let io_err = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        // SQLite creates -wal and -shm with the main file's permissions.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // IMMEDIATE: two processes opening a fresh database at once migrate one after the other.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at INTEGER NOT NULL
         )",
    )?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![index as i64 + 1, unix_ms(SystemTime::now())],
        )?;
    }
    tx.commit()?;
    Ok(())
}

impl Store for SqliteStore {
    fn mcp_pin_see(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
        at_unix_ms: i64,
    ) -> Result<crate::PinSeen, StoreError> {
        self.sql_mcp_pin_see(resource, tool, sha256, at_unix_ms)
    }
    fn mcp_pins(&self, resource: Option<&str>) -> Result<Vec<crate::McpPinRecord>, StoreError> {
        self.sql_mcp_pins(resource)
    }
    fn mcp_pin_approve(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
        at_unix_ms: i64,
        by: &str,
    ) -> Result<bool, StoreError> {
        self.sql_mcp_pin_approve(resource, tool, sha256, at_unix_ms, by)
    }
    fn append(
        &self,
        chain_id: &str,
        events: &[EventInput],
    ) -> Result<Vec<StoredEvent>, StoreError> {
        crate::check_append(chain_id, events)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head: Option<(i64, String)> = tx
            .query_row(
                "SELECT last_seq, last_hash FROM chains WHERE chain_id = ?1",
                [chain_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (mut chain_seq, mut prev_hash) = head
            .clone()
            .unwrap_or_else(|| (0, GENESIS_HASH.to_string()));
        let mut stored = Vec::with_capacity(events.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (chain_id, chain_seq, session_id, session_seq, at_unix_ms, \
                 kind, payload, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut last_session_seq = tx.prepare_cached(
                "SELECT COALESCE(MAX(session_seq), 0) FROM events WHERE session_id = ?1",
            )?;
            let mut session_seqs: HashMap<&str, i64> = HashMap::new();
            for ev in events {
                chain_seq += 1;
                let session_seq = match session_seqs.get_mut(ev.session_id.as_str()) {
                    Some(seq) => {
                        *seq += 1;
                        *seq
                    }
                    None => {
                        let seq = last_session_seq
                            .query_row([&ev.session_id], |r| r.get::<_, i64>(0))?
                            + 1;
                        session_seqs.insert(&ev.session_id, seq);
                        seq
                    }
                };
                let at_unix_ms = unix_ms(ev.at);
                let payload = canonical_json(&ev.payload);
                let hash = event_hash(
                    &prev_hash,
                    &HashedFields {
                        chain_id,
                        chain_seq,
                        session_id: &ev.session_id,
                        session_seq,
                        at_unix_ms,
                        kind: &ev.kind,
                        payload: payload.as_bytes(),
                    },
                );
                insert.execute(params![
                    chain_id,
                    chain_seq,
                    ev.session_id,
                    session_seq,
                    at_unix_ms,
                    ev.kind,
                    payload,
                    prev_hash,
                    hash
                ])?;
                let id = tx.last_insert_rowid();
                materialize_session(&tx, ev, session_seq, at_unix_ms, &payload)?;
                stored.push(StoredEvent {
                    id,
                    chain_id: chain_id.to_string(),
                    chain_seq,
                    session_id: ev.session_id.clone(),
                    session_seq,
                    at_unix_ms,
                    kind: ev.kind.clone(),
                    payload: ev.payload.clone(),
                    prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
                    hash,
                });
            }
            let mut count =
                tx.prepare_cached("UPDATE sessions SET event_count = ?1 WHERE id = ?2")?;
            for (session_id, seq) in &session_seqs {
                count.execute(params![seq, session_id])?;
            }
        }
        let now = unix_ms(SystemTime::now());
        let updated = match &head {
            Some((old_seq, old_hash)) => tx.execute(
                "UPDATE chains SET last_seq = ?1, last_hash = ?2, updated_at_unix_ms = ?3 \
                 WHERE chain_id = ?4 AND last_seq = ?5 AND last_hash = ?6",
                params![chain_seq, prev_hash, now, chain_id, old_seq, old_hash],
            )?,
            None => tx.execute(
                "INSERT INTO chains (chain_id, last_seq, last_hash, created_at_unix_ms, \
                 updated_at_unix_ms) VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (chain_id) DO NOTHING",
                params![chain_id, chain_seq, prev_hash, now],
            )?,
        };
        if updated != 1 {
            return Err(StoreError::ChainConflict {
                chain_id: chain_id.to_string(),
            });
        }
        tx.commit()?;
        Ok(stored)
    }

    fn import(&self, events: &[HashedEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer();
        // Many rows per statement while every row is new (the live importer); row by row,
        // skipping those already stored, when a replayed journal overlaps the store.
        if import_batch(&mut conn, events, true)? {
            return Ok(());
        }
        import_batch(&mut conn, events, false).map(|_| ())
    }

    fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRow>, StoreError> {
        use rusqlite::types::Value as Sql;
        let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE 1 = 1");
        let mut args: Vec<Sql> = Vec::new();
        let mut add = |clause: &str, value: Sql| {
            sql.push_str(clause);
            args.push(value);
        };
        if let Some(s) = &filter.subject {
            add(" AND subject = ?", Sql::Text(s.clone()));
        }
        if let Some(r) = &filter.resource {
            add(" AND resource = ?", Sql::Text(r.clone()));
        }
        if let Some(t) = filter.since_unix_ms {
            add(" AND started_at_unix_ms >= ?", Sql::Integer(t));
        }
        if let Some(t) = filter.until_unix_ms {
            add(" AND started_at_unix_ms < ?", Sql::Integer(t));
        }
        if let Some(o) = &filter.outcome {
            add(" AND outcome = ?", Sql::Text(o.clone()));
        }
        let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        add(
            " ORDER BY started_at_unix_ms DESC, id LIMIT ?",
            Sql::Integer(filter.limit.map_or(-1, to_i64)),
        );
        add(" OFFSET ?", Sql::Integer(filter.offset.map_or(0, to_i64)));

        let conn = self.reader();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), read_session)?;
        rows.map(|r| r?).collect()
    }

    fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"
        ))?;
        stmt.query_row([id], read_session).optional()?.transpose()
    }

    fn events(&self, session_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE session_id = ?1 ORDER BY session_seq"
        ))?;
        let rows = stmt.query_map([session_id], read_event)?;
        rows.map(|r| r?).collect()
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut conn = self.reader();
        // One read transaction: a consistent snapshot of heads and rows while writers go on.
        let tx = conn.transaction()?;
        let chains: Vec<ChainState> = {
            let mut stmt = tx.prepare(
                "SELECT ids.chain_id, c.last_seq, c.last_hash, c.anchor_seq, c.anchor_hash FROM \
                 (SELECT chain_id FROM chains UNION SELECT DISTINCT chain_id FROM events) AS ids \
                 LEFT JOIN chains c ON c.chain_id = ids.chain_id ORDER BY ids.chain_id",
            )?;
            let rows = stmt.query_map([], |r| {
                let head = match r.get::<_, Option<i64>>(1)? {
                    Some(seq) => Some((seq, r.get::<_, String>(2)?)),
                    None => None,
                };
                let anchor = (
                    r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                    r.get::<_, Option<String>>(4)?
                        .unwrap_or_else(|| GENESIS_HASH.to_string()),
                );
                Ok(ChainState {
                    chain_id: r.get(0)?,
                    head,
                    anchor,
                })
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut report = VerifyReport {
            chains: chains.len(),
            events: 0,
            checkpoints: 0,
            first_break: None,
        };
        let mut checks = AuditChecks::default();
        for c in &chains {
            let (count, brk) = verify_chain(&tx, c, &mut checks)?;
            report.events += count;
            if report.first_break.is_none() {
                report.first_break = brk;
            }
        }
        let mut hash_at =
            tx.prepare_cached("SELECT hash FROM events WHERE chain_id = ?1 AND chain_seq = ?2")?;
        let (checkpoints, brk) = checks.finish(&chains, |chain_id, seq| {
            Ok(hash_at
                .query_row(params![chain_id, seq], |r| r.get(0))
                .optional()?)
        })?;
        report.checkpoints = checkpoints;
        if report.first_break.is_none() {
            report.first_break = brk;
        }
        Ok(report)
    }

    fn review_create(&self, review: &crate::ReviewRecord) -> Result<(), StoreError> {
        self.sql_review_create(review)
    }
    fn review(&self, id: &str) -> Result<Option<crate::ReviewRecord>, StoreError> {
        self.sql_review(id)
    }
    fn reviews(
        &self,
        filter: &crate::ReviewFilter,
    ) -> Result<Vec<crate::ReviewRecord>, StoreError> {
        self.sql_reviews(filter)
    }
    fn review_vote(&self, vote: &crate::ReviewVote) -> Result<crate::VoteOutcome, StoreError> {
        self.sql_review_vote(vote)
    }
    fn review_close(
        &self,
        id: &str,
        status: &str,
        at_unix_ms: i64,
        reason: Option<&str>,
    ) -> Result<Option<crate::ReviewRecord>, StoreError> {
        self.sql_review_close(id, status, at_unix_ms, reason)
    }
    fn review_expire_due(&self, now_unix_ms: i64) -> Result<Vec<crate::ReviewRecord>, StoreError> {
        self.sql_review_expire_due(now_unix_ms)
    }
    fn review_revoke_grant(
        &self,
        id: &str,
        at_unix_ms: i64,
    ) -> Result<Option<crate::ReviewRecord>, StoreError> {
        self.sql_review_revoke_grant(id, at_unix_ms)
    }
    fn review_mark_used(&self, id: &str, at_unix_ms: i64) -> Result<bool, StoreError> {
        self.sql_review_mark_used(id, at_unix_ms)
    }
    fn once_put(
        &self,
        kind: &str,
        key: &str,
        value: &str,
        expires_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Result<bool, StoreError> {
        self.sql_once_put(kind, key, value, expires_unix_ms, now_unix_ms)
    }
    fn once_get(
        &self,
        kind: &str,
        key: &str,
        now_unix_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.sql_once_get(kind, key, now_unix_ms)
    }
    fn once_take(
        &self,
        kind: &str,
        key: &str,
        now_unix_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.sql_once_take(kind, key, now_unix_ms)
    }
    fn review_take_rerun(
        &self,
        requester: crate::Requester<'_>,
        resource: &str,
        statement_sha256: &str,
        decided_since_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Result<Option<crate::ReviewRecord>, StoreError> {
        self.sql_review_take_rerun(
            requester,
            resource,
            statement_sha256,
            decided_since_unix_ms,
            now_unix_ms,
        )
    }
    fn access_grant(
        &self,
        requester: crate::Requester<'_>,
        resource: &str,
        now_unix_ms: i64,
    ) -> Result<Option<crate::GrantRecord>, StoreError> {
        self.sql_grant(
            crate::review::REVIEW_KIND_ACCESS,
            requester,
            resource,
            now_unix_ms,
        )
    }
    fn unmask_grant(
        &self,
        requester: crate::Requester<'_>,
        resource: &str,
        now_unix_ms: i64,
    ) -> Result<Option<crate::GrantRecord>, StoreError> {
        self.sql_grant(
            crate::review::REVIEW_KIND_UNMASK,
            requester,
            resource,
            now_unix_ms,
        )
    }

    fn chain_heads(&self) -> Result<Vec<crate::ChainPoint>, StoreError> {
        self.sql_chain_heads()
    }

    fn prune(&self, cutoff_unix_ms: i64, dry_run: bool) -> Result<crate::PruneReport, StoreError> {
        self.sql_prune(cutoff_unix_ms, dry_run)
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.reader().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn events_page(
        &self,
        after_id: i64,
        since_unix_ms: Option<i64>,
        until_unix_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 \
             AND (?2 IS NULL OR at_unix_ms >= ?2) AND (?3 IS NULL OR at_unix_ms < ?3) \
             ORDER BY id LIMIT ?4"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(
            params![after_id, since_unix_ms, until_unix_ms, limit],
            read_event,
        )?;
        rows.map(|r| r?).collect()
    }
}

/// Rows per `INSERT` statement in a bulk import: one statement's fixed costs (AUTOINCREMENT
/// bookkeeping, cursors) are paid once for all of them.
const IMPORT_ROWS: usize = 32;

const INSERT_EVENT: &str = "INSERT OR IGNORE INTO events (chain_id, chain_seq, session_id, \
     session_seq, at_unix_ms, kind, payload, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// `INSERT_EVENT` for `IMPORT_ROWS` rows.
fn insert_events_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let row = "(?, ?, ?, ?, ?, ?, ?, ?, ?)";
        format!(
            "INSERT OR IGNORE INTO events (chain_id, chain_seq, session_id, session_seq, \
             at_unix_ms, kind, payload, prev_hash, hash) VALUES {}",
            vec![row; IMPORT_ROWS].join(", ")
        )
    })
}

/// One import transaction ([`Store::import`]). With `bulk`, rows go in `IMPORT_ROWS` per
/// statement, and the transaction is abandoned (`Ok(false)`, nothing written) as soon as a row
/// turns out to be stored already: which ones were is then known only row by row.
fn import_batch(
    conn: &mut Connection,
    events: &[HashedEvent],
    bulk: bool,
) -> Result<bool, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        // Per chain in this batch (one, but for a replay): its anchor, and the head it
        // reaches. A batch holds one or two chains: a list beats hashing every event.
        struct Chain<'e> {
            id: &'e str,
            anchor: i64,
            head: (i64, &'e str),
        }
        let mut chains: Vec<Chain<'_>> = Vec::new();
        let mut anchor_of =
            tx.prepare_cached("SELECT anchor_seq FROM chains WHERE chain_id = ?1")?;
        // The events to insert, with their chain.
        let mut fresh: Vec<(usize, &HashedEvent)> = Vec::with_capacity(events.len());
        for ev in events {
            let c = match chains.iter().position(|c| c.id == ev.chain_id) {
                Some(i) => i,
                None => {
                    let anchor: i64 = anchor_of
                        .query_row([&ev.chain_id], |r| r.get(0))
                        .optional()?
                        .unwrap_or(0);
                    chains.push(Chain {
                        id: &ev.chain_id,
                        anchor,
                        head: (0, ""),
                    });
                    chains.len() - 1
                }
            };
            // A journal replayed after a prune must not bring pruned events back.
            if ev.chain_seq > chains[c].anchor {
                fresh.push((c, ev));
            }
        }
        let mut insert = tx.prepare_cached(INSERT_EVENT)?;
        let mut inserted: Vec<(usize, &HashedEvent)> = Vec::with_capacity(fresh.len());
        if bulk {
            let mut insert_many = tx.prepare_cached(insert_events_sql())?;
            let mut rows = fresh.chunks_exact(IMPORT_ROWS);
            for chunk in &mut rows {
                for (i, (_, ev)) in chunk.iter().enumerate() {
                    let at = i * 9;
                    insert_many.raw_bind_parameter(at + 1, &ev.chain_id)?;
                    insert_many.raw_bind_parameter(at + 2, ev.chain_seq)?;
                    insert_many.raw_bind_parameter(at + 3, &ev.session_id)?;
                    insert_many.raw_bind_parameter(at + 4, ev.session_seq)?;
                    insert_many.raw_bind_parameter(at + 5, ev.at_unix_ms)?;
                    insert_many.raw_bind_parameter(at + 6, &ev.kind)?;
                    insert_many.raw_bind_parameter(at + 7, &ev.payload)?;
                    insert_many.raw_bind_parameter(at + 8, &ev.prev_hash)?;
                    insert_many.raw_bind_parameter(at + 9, &ev.hash)?;
                }
                if insert_many.raw_execute()? != chunk.len() {
                    return Ok(false);
                }
            }
            for &(_, ev) in rows.remainder() {
                if insert_one(&mut insert, ev)? != 1 {
                    return Ok(false);
                }
            }
            inserted = fresh;
        } else {
            for (c, ev) in fresh {
                if insert_one(&mut insert, ev)? == 1 {
                    inserted.push((c, ev));
                }
            }
        }
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for (c, ev) in inserted {
            if ev.kind == KIND_SESSION_OPEN || ev.kind == KIND_SESSION_CLOSE {
                let input = EventInput {
                    session_id: ev.session_id.clone(),
                    kind: ev.kind.clone(),
                    at: SystemTime::UNIX_EPOCH,
                    payload: serde_json::from_str(&ev.payload)
                        .map_err(|e| StoreError::Corrupt(format!("event payload: {e}")))?,
                };
                materialize_session(&tx, &input, ev.session_seq, ev.at_unix_ms, &ev.payload)?;
            }
            let head = &mut chains[c].head;
            if ev.chain_seq > head.0 {
                *head = (ev.chain_seq, &ev.hash);
            }
            let count = counts.entry(&ev.session_id).or_insert(0);
            *count = (*count).max(ev.session_seq);
        }
        let now = unix_ms(SystemTime::now());
        let mut head_stmt = tx.prepare_cached(
            "INSERT INTO chains (chain_id, last_seq, last_hash, created_at_unix_ms, updated_at_unix_ms) \
             VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (chain_id) DO UPDATE SET \
             last_seq = excluded.last_seq, last_hash = excluded.last_hash, \
             updated_at_unix_ms = excluded.updated_at_unix_ms WHERE excluded.last_seq > chains.last_seq",
        )?;
        for c in chains.iter().filter(|c| c.head.0 > 0) {
            head_stmt.execute(params![c.id, c.head.0, c.head.1, now])?;
        }
        let mut count_stmt = tx.prepare_cached(
            "UPDATE sessions SET event_count = ?1 WHERE id = ?2 AND event_count < ?1",
        )?;
        for (session, seq) in &counts {
            count_stmt.execute(params![seq, session])?;
        }
    }
    tx.commit()?;
    Ok(true)
}

fn insert_one(
    insert: &mut rusqlite::CachedStatement<'_>,
    ev: &HashedEvent,
) -> Result<usize, StoreError> {
    Ok(insert.execute(params![
        ev.chain_id,
        ev.chain_seq,
        ev.session_id,
        ev.session_seq,
        ev.at_unix_ms,
        ev.kind,
        ev.payload,
        ev.prev_hash,
        ev.hash
    ])?)
}

fn materialize_session(
    tx: &rusqlite::Transaction<'_>,
    ev: &EventInput,
    session_seq: i64,
    at_unix_ms: i64,
    payload: &str,
) -> Result<(), StoreError> {
    // session_seq has no gaps, so it is also the session's event count.
    let field = |name: &str| payload_field(&ev.payload, name);
    match ev.kind.as_str() {
        KIND_SESSION_OPEN => {
            // A row made earlier by a lone session.close (open_payload 'null') gets its open data.
            tx.prepare_cached(
                "INSERT INTO sessions (id, started_at_unix_ms, listener, client_addr, resource, \
                 subject, auth_method, event_count, open_payload) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (id) DO UPDATE SET started_at_unix_ms = excluded.started_at_unix_ms, \
                 listener = excluded.listener, client_addr = excluded.client_addr, \
                 resource = excluded.resource, subject = excluded.subject, \
                 auth_method = excluded.auth_method, event_count = excluded.event_count, \
                 open_payload = excluded.open_payload WHERE sessions.open_payload = 'null'",
            )?
            .execute(params![
                ev.session_id,
                at_unix_ms,
                field("listener"),
                field("client_addr"),
                field("resource"),
                field("subject"),
                field("auth_method"),
                session_seq,
                payload
            ])?;
        }
        KIND_SESSION_CLOSE => {
            tx.prepare_cached(
                "INSERT INTO sessions (id, started_at_unix_ms, ended_at_unix_ms, outcome, \
                 event_count, open_payload, close_payload) VALUES (?1, ?2, ?2, ?3, ?4, 'null', ?5) \
                 ON CONFLICT (id) DO UPDATE SET ended_at_unix_ms = excluded.ended_at_unix_ms, \
                 outcome = excluded.outcome, event_count = excluded.event_count, \
                 close_payload = excluded.close_payload",
            )?
            .execute(params![
                ev.session_id,
                at_unix_ms,
                field("outcome"),
                session_seq,
                payload
            ])?;
        }
        // Other events: the count is brought up to date once per session per batch, by `append`.
        _ => {}
    }
    Ok(())
}

pub(crate) fn payload_field(payload: &Value, name: &str) -> Option<String> {
    match payload.get(name)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(canonical_json(other)),
    }
}

pub(crate) fn parse_json(column: &str, text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn read_session(r: &Row<'_>) -> rusqlite::Result<Result<SessionRow, StoreError>> {
    let open: String = r.get(10)?;
    let close: Option<String> = r.get(11)?;
    let row = || -> rusqlite::Result<SessionRow> {
        Ok(SessionRow {
            id: r.get(0)?,
            started_at_unix_ms: r.get(1)?,
            ended_at_unix_ms: r.get(2)?,
            listener: r.get(3)?,
            client_addr: r.get(4)?,
            resource: r.get(5)?,
            subject: r.get(6)?,
            auth_method: r.get(7)?,
            outcome: r.get(8)?,
            event_count: r.get(9)?,
            open: Value::Null,
            close: None,
        })
    };
    let mut session = row()?;
    Ok((|| {
        session.open = parse_json("sessions.open_payload", &open)?;
        session.close = close
            .map(|c| parse_json("sessions.close_payload", &c))
            .transpose()?;
        Ok(session)
    })())
}

fn read_event(r: &Row<'_>) -> rusqlite::Result<Result<StoredEvent, StoreError>> {
    let payload: String = r.get(7)?;
    let event = StoredEvent {
        id: r.get(0)?,
        chain_id: r.get(1)?,
        chain_seq: r.get(2)?,
        session_id: r.get(3)?,
        session_seq: r.get(4)?,
        at_unix_ms: r.get(5)?,
        kind: r.get(6)?,
        payload: Value::Null,
        prev_hash: r.get(8)?,
        hash: r.get(9)?,
    };
    Ok(parse_json("events.payload", &payload).map(|payload| StoredEvent { payload, ..event }))
}

/// A column as raw bytes, whatever type a tamperer left in it.
fn raw_bytes(r: &Row<'_>, idx: usize) -> rusqlite::Result<Vec<u8>> {
    Ok(match r.get_ref(idx)? {
        ValueRef::Text(b) | ValueRef::Blob(b) => b.to_vec(),
        ValueRef::Integer(n) => n.to_string().into_bytes(),
        ValueRef::Real(f) => f.to_string().into_bytes(),
        ValueRef::Null => Vec::new(),
    })
}

/// A column as an integer; `None` if a tamperer stored something else.
fn raw_i64(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<i64>> {
    Ok(match r.get_ref(idx)? {
        ValueRef::Integer(n) => Some(n),
        _ => None,
    })
}

/// Walks one chain in `chain_seq` order from its anchor; returns the number of rows and the
/// first break. Events that verify are shown to `checks` (prune and checkpoint events).
fn verify_chain(
    tx: &rusqlite::Transaction<'_>,
    chain: &ChainState,
    checks: &mut AuditChecks,
) -> Result<(u64, Option<ChainBreak>), StoreError> {
    let below: i64 = tx.query_row(
        "SELECT COUNT(*) FROM events WHERE chain_id = ?1 AND chain_seq <= ?2",
        params![chain.chain_id, chain.anchor.0],
        |r| r.get(0),
    )?;
    if let Some((count, brk)) = chaincheck::below_anchor_break(chain, below) {
        return Ok((count, Some(brk)));
    }
    let mut stmt = tx.prepare(
        "SELECT id, chain_seq, session_id, session_seq, at_unix_ms, kind, payload, prev_hash, hash \
         FROM events WHERE chain_id = ?1 AND chain_seq > ?2 ORDER BY chain_seq",
    )?;
    let mut rows = stmt.query(params![chain.chain_id, chain.anchor.0])?;
    let mut walk = ChainWalk::new(chain);
    while let Some(r) = rows.next()? {
        walk.row(
            RawEvent {
                id: r.get(0)?,
                chain_seq: raw_i64(r, 1)?,
                session_id: String::from_utf8_lossy(&raw_bytes(r, 2)?).into_owned(),
                session_seq: raw_i64(r, 3)?,
                at_unix_ms: raw_i64(r, 4)?,
                kind: raw_bytes(r, 5)?,
                payload: raw_bytes(r, 6)?,
                prev_hash: raw_bytes(r, 7)?,
                hash: raw_bytes(r, 8)?,
            },
            checks,
        );
    }
    Ok(walk.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::UNIX_EPOCH;

    fn ev(session: &str, kind: &str, ms: u64, payload: Value) -> EventInput {
        EventInput {
            session_id: session.into(),
            kind: kind.into(),
            at: UNIX_EPOCH + Duration::from_millis(ms),
            payload,
        }
    }

    fn open_ev(session: &str, ms: u64, subject: &str) -> EventInput {
        ev(
            session,
            KIND_SESSION_OPEN,
            ms,
            json!({"listener": "postgres", "client_addr": "10.0.0.1:5000",
                   "resource": "orders", "subject": subject, "auth_method": "cert"}),
        )
    }

    /// A store on a temp file plus a raw connection for tampering with it.
    fn file_store() -> (tempfile::TempDir, SqliteStore, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = SqliteStore::open(&path).unwrap();
        let raw = Connection::open(&path).unwrap();
        raw.busy_timeout(BUSY_TIMEOUT).unwrap();
        (dir, store, raw)
    }

    /// Chain "c1": 6 events over sessions a and b.
    fn seed(store: &SqliteStore) -> Vec<StoredEvent> {
        store
            .append(
                "c1",
                &[
                    open_ev("a", 1000, "alice"),
                    ev("a", "query", 1001, json!({"sql": "select 1"})),
                    open_ev("b", 1002, "bob"),
                    ev("b", "query", 1003, json!({"sql": "select 2"})),
                    ev("a", "query", 1004, json!({"sql": "select 3"})),
                    ev("b", KIND_SESSION_CLOSE, 1005, json!({"outcome": "ok"})),
                ],
            )
            .unwrap()
    }

    fn assert_break(store: &SqliteStore, chain_seq: i64, event_id: i64, reason: &str) {
        let report = store.verify().unwrap();
        let brk = report.first_break.expect("verify must report a break");
        assert_eq!(
            (
                brk.chain_id.as_str(),
                brk.chain_seq,
                brk.event_id,
                brk.reason.as_str()
            ),
            ("c1", chain_seq, event_id, reason),
            "{brk:?}"
        );
    }

    /// `n` events of chain "j" as a journal holds them: sessions s0..s2 opened first, s0 closed
    /// last, commands in between.
    fn journal(n: i64) -> Vec<HashedEvent> {
        let mut prev = GENESIS_HASH.to_string();
        let mut session_seqs = [0i64; 3];
        (1..=n)
            .map(|seq| {
                let s = if seq <= 3 { seq - 1 } else { seq % 3 } as usize;
                session_seqs[s] += 1;
                let kind = match seq {
                    1..=3 => KIND_SESSION_OPEN,
                    _ if seq == n => KIND_SESSION_CLOSE,
                    _ => "command",
                };
                let payload = canonical_json(&match kind {
                    KIND_SESSION_OPEN => json!({"subject": format!("u{s}"), "resource": "db"}),
                    KIND_SESSION_CLOSE => json!({"outcome": "ok"}),
                    _ => json!({"n": seq, "text": "select 1"}),
                });
                let session_id = format!("s{s}");
                let fields = HashedFields {
                    chain_id: "j",
                    chain_seq: seq,
                    session_id: &session_id,
                    session_seq: session_seqs[s],
                    at_unix_ms: 1000 + seq,
                    kind,
                    payload: payload.as_bytes(),
                };
                let hash = event_hash(&prev, &fields);
                HashedEvent {
                    chain_id: "j".into(),
                    chain_seq: seq,
                    session_id: session_id.clone(),
                    session_seq: session_seqs[s],
                    at_unix_ms: 1000 + seq,
                    kind: kind.into(),
                    payload,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                }
            })
            .collect()
    }

    #[test]
    fn import_is_idempotent_in_bulk_and_when_replays_overlap() {
        let (_d, store, raw) = file_store();
        let evs = journal(100);
        store.import(&evs[..50]).unwrap();
        // Overlapping the store (a replay after a crash), then entirely stored already.
        store.import(&evs[30..]).unwrap();
        store.import(&evs).unwrap();
        let report = store.verify().unwrap();
        assert!(report.first_break.is_none(), "{report:?}");
        assert_eq!(report.events, 100);
        let stored: Vec<(i64, String)> = raw
            .prepare("SELECT chain_seq, hash FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let expected: Vec<(i64, String)> =
            evs.iter().map(|e| (e.chain_seq, e.hash.clone())).collect();
        assert_eq!(stored, expected, "each event once, in journal order");
        let head: (i64, String) = raw
            .query_row(
                "SELECT last_seq, last_hash FROM chains WHERE chain_id = 'j'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(head, (100, evs[99].hash.clone()));
        for s in 0..3 {
            let id = format!("s{s}");
            let row = store.session(&id).unwrap().unwrap();
            let last = evs.iter().filter(|e| e.session_id == id).count() as i64;
            assert_eq!(row.event_count, last, "{id}");
            assert_eq!(row.subject.as_deref(), Some(format!("u{s}").as_str()));
        }
        let closed = &evs[99].session_id;
        assert_eq!(
            store.session(closed).unwrap().unwrap().outcome.as_deref(),
            Some("ok")
        );
        // An event already stored is skipped entirely: its session row is not written again.
        raw.execute("UPDATE sessions SET outcome = 'marked'", [])
            .unwrap();
        store.import(&evs[100 - IMPORT_ROWS..]).unwrap();
        assert_eq!(
            store.session(closed).unwrap().unwrap().outcome.as_deref(),
            Some("marked")
        );
    }

    #[test]
    fn append_then_read_back() {
        let store = SqliteStore::open_in_memory().unwrap();
        let payload = json!({"sql": "select 1", "params": [1, "x"], "z": {"b": 1, "a": 2}});
        let stored = store
            .append(
                "c1",
                &[
                    open_ev("s1", 1000, "alice"),
                    ev("s1", "query", 1001, payload.clone()),
                ],
            )
            .unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0].prev_hash, GENESIS_HASH);
        assert_eq!(stored[1].prev_hash, stored[0].hash);
        let events = store.events("s1").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].payload, payload);
        assert_eq!(events[1].kind, "query");
        assert_eq!(events[1].at_unix_ms, 1001);
        assert_eq!(events[1].id, stored[1].id);
        assert_eq!(events[1].hash, stored[1].hash);
        assert!(store.events("nope").unwrap().is_empty());
        assert!(store.append("c1", &[]).unwrap().is_empty());
        assert!(matches!(
            store.append("c1", &[ev("", "query", 1, json!({}))]),
            Err(StoreError::InvalidEvent(_))
        ));
    }

    #[test]
    fn session_row_is_materialized_with_outcome() {
        let store = SqliteStore::open_in_memory().unwrap();
        seed(&store);
        let b = store.session("b").unwrap().unwrap();
        assert_eq!(b.started_at_unix_ms, 1002);
        assert_eq!(b.ended_at_unix_ms, Some(1005));
        assert_eq!(b.outcome.as_deref(), Some("ok"));
        assert_eq!(b.subject.as_deref(), Some("bob"));
        assert_eq!(b.listener.as_deref(), Some("postgres"));
        assert_eq!(b.client_addr.as_deref(), Some("10.0.0.1:5000"));
        assert_eq!(b.resource.as_deref(), Some("orders"));
        assert_eq!(b.auth_method.as_deref(), Some("cert"));
        assert_eq!(b.event_count, 3);
        assert_eq!(b.open["subject"], "bob");
        assert_eq!(b.close, Some(json!({"outcome": "ok"})));
        let a = store.session("a").unwrap().unwrap();
        assert_eq!(a.event_count, 3);
        assert_eq!(a.ended_at_unix_ms, None);
        assert_eq!(a.outcome, None);
        assert!(store.session("zzz").unwrap().is_none());
    }

    #[test]
    fn sessions_filter_by_subject_time_outcome_and_page() {
        let store = SqliteStore::open_in_memory().unwrap();
        seed(&store);
        store.append("c1", &[open_ev("c", 2000, "alice")]).unwrap();
        let ids = |f: SessionFilter| -> Vec<String> {
            store
                .sessions(&f)
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(ids(SessionFilter::default()), ["c", "b", "a"]);
        let alice = SessionFilter {
            subject: Some("alice".into()),
            ..Default::default()
        };
        assert_eq!(ids(alice.clone()), ["c", "a"]);
        assert_eq!(
            ids(SessionFilter {
                limit: Some(1),
                offset: Some(1),
                ..alice
            }),
            ["a"]
        );
        assert_eq!(
            ids(SessionFilter {
                offset: Some(1),
                ..Default::default()
            }),
            ["b", "a"]
        );
        assert_eq!(
            ids(SessionFilter {
                since_unix_ms: Some(1002),
                until_unix_ms: Some(2000),
                ..Default::default()
            }),
            ["b"]
        );
        assert_eq!(
            ids(SessionFilter {
                outcome: Some("ok".into()),
                resource: Some("orders".into()),
                ..Default::default()
            }),
            ["b"]
        );
    }

    #[test]
    fn session_and_chain_seq_numbering_with_interleaved_sessions() {
        let store = SqliteStore::open_in_memory().unwrap();
        let first = seed(&store);
        // A second batch continues both sequences from the database.
        let second = store
            .append(
                "c1",
                &[
                    ev("b", "query", 1006, json!({})),
                    ev("a", "query", 1007, json!({})),
                ],
            )
            .unwrap();
        let seqs: Vec<(i64, &str, i64)> = first
            .iter()
            .chain(&second)
            .map(|e| (e.chain_seq, e.session_id.as_str(), e.session_seq))
            .collect();
        assert_eq!(
            seqs,
            [
                (1, "a", 1),
                (2, "a", 2),
                (3, "b", 1),
                (4, "b", 2),
                (5, "a", 3),
                (6, "b", 3),
                (7, "b", 4),
                (8, "a", 4)
            ]
        );
        assert_eq!(second[0].prev_hash, first[5].hash);
        let a: Vec<i64> = store
            .events("a")
            .unwrap()
            .iter()
            .map(|e| e.session_seq)
            .collect();
        assert_eq!(a, [1, 2, 3, 4]);
        assert_eq!(store.session("b").unwrap().unwrap().event_count, 4);
    }

    #[test]
    fn events_page_walks_every_event_in_id_order_within_a_time_range() {
        let store = SqliteStore::open_in_memory().unwrap();
        let all = seed(&store);
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = store.events_page(after, None, None, 4).unwrap();
            let Some(last) = page.last() else { break };
            after = last.id;
            seen.extend(page.iter().map(|e| e.id));
        }
        assert_eq!(seen, all.iter().map(|e| e.id).collect::<Vec<_>>());
        let ranged: Vec<i64> = store
            .events_page(0, Some(1002), Some(1005), 100)
            .unwrap()
            .iter()
            .map(|e| e.at_unix_ms)
            .collect();
        assert_eq!(ranged, [1002, 1003, 1004]);
        assert!(store
            .events_page(all[5].id, None, None, 10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn verify_passes_on_a_clean_database() {
        let (_dir, store, _raw) = file_store();
        let empty = store.verify().unwrap();
        assert_eq!((empty.chains, empty.events), (0, 0));
        seed(&store);
        store
            .append("c1", &[ev("a", "query", 1010, json!({"n": 0.1}))])
            .unwrap();
        let report = store.verify().unwrap();
        assert!(report.first_break.is_none(), "{report:?}");
        assert_eq!((report.chains, report.events), (1, 7));
    }

    #[test]
    fn verify_reports_payload_edited_by_sql_update() {
        let (_dir, store, raw) = file_store();
        let events = seed(&store);
        raw.execute(
            "UPDATE events SET payload = '{\"sql\":\"select 42\"}' WHERE id = ?1",
            [events[3].id],
        )
        .unwrap();
        assert_break(
            &store,
            4,
            events[3].id,
            "hash mismatch: event content was altered",
        );
    }

    #[test]
    fn verify_reports_event_deleted_by_sql_delete() {
        let (_dir, store, raw) = file_store();
        let events = seed(&store);
        raw.execute("DELETE FROM events WHERE id = ?1", [events[2].id])
            .unwrap();
        assert_break(
            &store,
            3,
            events[3].id,
            "gap: chain_seq 3 missing (event deleted)",
        );
    }

    #[test]
    fn verify_reports_last_event_deleted_via_chain_head() {
        let (_dir, store, raw) = file_store();
        let events = seed(&store);
        raw.execute("DELETE FROM events WHERE id = ?1", [events[5].id])
            .unwrap();
        assert_break(
            &store,
            6,
            events[4].id,
            "gap: chain_seq 6 missing (event deleted)",
        );
    }

    #[test]
    fn verify_reports_swapped_payloads() {
        let (_dir, store, raw) = file_store();
        let events = seed(&store);
        let (x, y) = (events[1].id, events[3].id);
        let payload = |id: i64| -> String {
            raw.query_row("SELECT payload FROM events WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let (px, py) = (payload(x), payload(y));
        let set = "UPDATE events SET payload = ?1 WHERE id = ?2";
        raw.execute(set, params![py, x]).unwrap();
        raw.execute(set, params![px, y]).unwrap();
        let a = store.events("a").unwrap();
        assert_eq!(
            a[1].payload,
            json!({"sql": "select 2"}),
            "the swap happened"
        );
        assert_break(&store, 2, x, "hash mismatch: event content was altered");
    }

    #[test]
    fn verify_reports_reordered_events() {
        let (_dir, store, raw) = file_store();
        let events = seed(&store);
        // Swap the positions of events 2 and 3 (whole rows, hashes included).
        raw.execute_batch(&format!(
            "UPDATE events SET chain_seq = -1 WHERE id = {a};
             UPDATE events SET chain_seq = 2 WHERE id = {b};
             UPDATE events SET chain_seq = 3 WHERE id = {a};",
            a = events[1].id,
            b = events[2].id
        ))
        .unwrap();
        assert_break(
            &store,
            2,
            events[2].id,
            "prev_hash does not match predecessor",
        );
    }

    #[test]
    fn two_chains_in_one_database_both_verify() {
        let (_dir, store, _raw) = file_store();
        let path = store.path.clone().unwrap();
        let replica = SqliteStore::open(&path).unwrap();
        for i in 0..3u64 {
            store
                .append("gw-1", &[ev("s1", "query", i, json!({"i": i}))])
                .unwrap();
            replica
                .append("gw-2", &[ev("s2", "query", i, json!({"i": i}))])
                .unwrap();
        }
        let s1 = store.events("s1").unwrap();
        assert_eq!(
            s1.iter().map(|e| e.chain_seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let report = replica.verify().unwrap();
        assert!(report.first_break.is_none(), "{report:?}");
        assert_eq!((report.chains, report.events), (2, 6));
    }

    #[test]
    fn reopen_is_idempotent_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteStore::open(&path).unwrap();
        seed(&store);
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.events("a").unwrap().len(), 3);
        let raw = Connection::open(&path).unwrap();
        let versions: Vec<i64> = raw
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        raw.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, known } if found == SCHEMA_VERSION + 1 && known == SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade tollgate"), "{err}");
    }

    #[test]
    fn file_is_created_with_mode_0600_in_a_new_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/dir/t.db");
        let store = SqliteStore::open(&path).unwrap();
        seed(&store);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        let wal = path.with_file_name("t.db-wal");
        assert_eq!(mode(&wal), 0o600);
    }

    #[test]
    fn store_is_in_wal_mode() {
        let (_dir, _store, raw) = file_store();
        let mode: String = raw
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_new_store_has_large_pages_and_an_existing_one_keeps_its_own() {
        let (dir, _store, raw) = file_store();
        let size =
            |c: &Connection| -> i64 { c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap() };
        assert_eq!(size(&raw), PAGE_SIZE);
        // A store created with another page size (an older tollgate) opens as it is.
        let old = dir.path().join("old.db");
        {
            let c = Connection::open(&old).unwrap();
            c.execute_batch(
                "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE x (y)",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&old).unwrap();
        store.ping().unwrap();
        assert_eq!(size(&Connection::open(&old).unwrap()), 4096);
    }

    #[test]
    fn another_writer_on_the_same_chain_is_detected() {
        let (_dir, store, raw) = file_store();
        seed(&store);
        // Simulate a concurrent writer that moved the head between our read and our update.
        raw.execute_batch(
            "CREATE TRIGGER bump AFTER INSERT ON events WHEN NEW.chain_seq = 7 BEGIN
                 UPDATE chains SET last_seq = 99 WHERE chain_id = 'c1';
             END;",
        )
        .unwrap();
        let err = store
            .append("c1", &[ev("a", "query", 2000, json!({}))])
            .unwrap_err();
        assert!(matches!(err, StoreError::ChainConflict { .. }), "{err}");
        assert_eq!(store.events("a").unwrap().len(), 3, "batch rolled back");
    }
}
