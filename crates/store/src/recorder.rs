//! The audit writer on the gateway's hot path.
//!
//! [`Recorder::append`] numbers and hash-chains events and appends them to a journal file in
//! one copy into its shared mapping (see [`crate::journal`]) — synchronously, in the caller's
//! thread, so that when it returns the events survive a crash of the gateway process (they are
//! in the kernel's page cache). A background thread then imports the journal into the
//! [`Store`] in large transactions (tiny per-event transactions are what made SQLite the
//! bottleneck). When the journal grows past a size it is sealed (renamed `<journal>.<seq>`) and
//! a new one started; a sealed segment is deleted once every event in it is stored. At start,
//! segments left by a crashed process are imported first.
//!
//! Priority: the importer thread runs a few nice steps below the process ([`IMPORT_NICE`]), so
//! that on busy cores the relay threads, which clients wait on, go first.
//!
//! Durability: with [`Durability::Written`] `append` returns once the journal is written, and a
//! sync thread fsyncs it in the background (at most every [`WRITTEN_SYNC_PAUSE`]), so a power
//! loss can lose the last few milliseconds. With [`Durability::Fsync`] `append` returns only once
//! its bytes are fsynced; appenders that arrive while an fsync is running share the next one
//! (group commit). A sealed segment is fsynced before it is renamed. With [`Durability::Store`]
//! the shared store is the durability point: `append` returns only once the importer has
//! committed its events there; the importer then imports as soon as anything is journaled, and
//! appenders that arrive during one transaction share the next (group commit again).
//!
//! Failure: a journal append error (no room on disk for the segment's next chunk) fails the
//! append (the caller refuses the command). When the store stops accepting imports, appends keep
//! landing in the journal until the oldest event not yet stored is older than `stall_limit`;
//! after that, appends fail until the store is back.
//! Nothing is dropped: unimported events stay in the journal and in memory, and are retried.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hash::{
    canonical_json, event_hash, push_int, push_json_str, HashedFields, GENESIS_HASH,
};
use crate::journal::{trim_zeros, Segment};
use crate::{
    unix_ms, CanonicalEvent, EventInput, HashedEvent, Store, StoreError, KIND_SESSION_CLOSE,
};

/// How often the importer imports, unless woken early: also the least time between two of
/// its transactions, so that a busy gateway makes a few large commits rather than many small
/// ones (each SQLite commit rewrites its partly filled pages and fsyncs: the cost is per commit).
const IMPORT_INTERVAL: Duration = Duration::from_millis(50);
/// Backlog size that wakes the importer early.
const IMPORT_WAKE_AT: usize = 4096;
/// Most events imported in one transaction.
const IMPORT_BATCH: usize = 8192;
/// How many nice steps the importer thread runs below the process. The events it imports are
/// already safe in the journal; the sessions' relay threads are what clients wait on, so when
/// the cores are busy the scheduler runs them first and the importer catches up in larger (cheaper per event) batches.
/// Still a weighted share, never starved: 5 steps lower is about a third of a relay thread's.
const IMPORT_NICE: libc::c_int = 5;
/// Journal size above which the segment is sealed and a new one started.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// With [`Durability::Written`], the pause after a background fsync: bounds their rate.
pub const WRITTEN_SYNC_PAUSE: Duration = Duration::from_millis(5);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RecorderOptions {
    /// The journal file (created mode 0600; one gateway process per journal, enforced by a lock).
    pub journal: PathBuf,
    /// How long events may wait to reach the store before appends are refused; also the
    /// longest an append waits for its fsync with [`Durability::Fsync`].
    pub stall_limit: Duration,
    pub durability: Durability,
}

/// When [`Recorder::append`] returns (config `server.audit_durability`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Once the journal `write` returned (survives a crash of the process); fsync in background.
    #[default]
    Written,
    /// Once the journal bytes are fsynced (survives a power loss); concurrent appends share fsyncs.
    Fsync,
    /// Once the events are committed to the store (survives the loss of this host, for a shared
    /// store); concurrent appends share transactions. Bounded by `stall_limit`.
    Store,
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecorderStats {
    /// Events written to the journal.
    pub written: u64,
    /// Events imported into the store.
    pub stored: u64,
    /// Failed imports and failed appends.
    pub failed: u64,
    /// Events in the journal not yet in the store.
    pub queued: u64,
    /// fsyncs of the journal.
    pub fsyncs: u64,
    /// Time spent in those fsyncs, in microseconds.
    pub fsync_micros: u64,
}

struct Writer {
    path: PathBuf,
    /// The live segment (its file is shared with the sync thread through `live_journal`).
    journal: Segment,
    /// Successful journal writes so far; the sync thread's progress is measured against it.
    gen: u64,
    chain_seq: i64,
    prev_hash: String,
    session_seqs: HashMap<String, i64>,
    /// Journaled, not yet handed to the importer.
    backlog: Vec<HashedEvent>,
    /// When the oldest event not yet in the store was journaled.
    oldest_unstored: Option<Instant>,
    line: Vec<u8>,
}

struct Inner {
    writer: Mutex<Writer>,
    wake: Condvar,
    /// The chain this process appends to.
    chain_id: String,
    /// The live journal segment, for the sync thread (which must not contend for the writer
    /// lock): replaced together with `Writer::journal`, under the writer lock, when sealing.
    live_journal: Mutex<Arc<File>>,
    store: Arc<dyn Store>,
    stall_limit: Duration,
    written: AtomicU64,
    stored: AtomicU64,
    failed: AtomicU64,
    import_failing: AtomicBool,
    /// Set by `flush` and `shutdown`: import what is there without waiting for the interval.
    import_now: AtomicBool,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    durability: Durability,
    /// Latest `Writer::gen`, readable without the writer lock.
    written_gen: AtomicU64,
    /// Set by an append in `Written` mode when the sync thread may be asleep.
    dirty: AtomicBool,
    sync: Mutex<SyncState>,
    /// Wakes the sync thread.
    sync_kick: Condvar,
    /// Wakes appenders blocked in `append` (fsync mode).
    sync_done: Condvar,
    /// The same progress for appenders awaiting in `append_async`.
    synced_tx: tokio::sync::watch::Sender<SyncState>,
    fsyncs: AtomicU64,
    fsync_micros: AtomicU64,
    /// The last `chain_seq` committed to the store (every event before it is stored too: the
    /// importer imports in order), for appenders that wait for it ([`Durability::Store`]).
    stored_seq: Mutex<i64>,
    stored_done: Condvar,
    stored_tx: tokio::sync::watch::Sender<i64>,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
    #[cfg(test)]
    test_fsync_delay: Mutex<Duration>,
    /// Held for the recorder's life: one gateway process per journal.
    _lock: File,
}

/// Where one journal write stands: its generation (fsyncs) and its last event's `chain_seq`
/// (imports).
#[derive(Clone, Copy, Debug)]
struct Written {
    gen: u64,
    last_seq: i64,
}

impl Inner {
    /// Backlog size that wakes the importer: one event when appenders wait for the store.
    fn import_wake_at(&self) -> usize {
        if self.durability == Durability::Store {
            1
        } else {
            IMPORT_WAKE_AT
        }
    }

    fn publish_stored(&self, seq: i64) {
        *lock(&self.stored_seq) = seq;
        self.stored_done.notify_all();
        self.stored_tx.send_replace(seq);
    }
}

/// How far the journal is known to be on disk.
#[derive(Clone, Copy, Debug, Default)]
struct SyncState {
    /// Every write up to this generation is fsynced.
    synced: u64,
    /// The last fsync that failed covered writes up to this generation.
    failed: u64,
    stop: bool,
}

impl SyncState {
    /// `Some` once generation `gen` is known durable (`Ok`) or its fsync failed (`Err`).
    fn outcome(&self, gen: u64) -> Option<Result<(), StoreError>> {
        if self.synced >= gen {
            Some(Ok(()))
        } else if self.failed >= gen {
            Some(Err(StoreError::Unavailable(
                "the audit journal could not be fsynced".into(),
            )))
        } else {
            None
        }
    }
}

/// Cheap to clone; all clones share one journal, chain and importer thread.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on `cv` until `done` holds for the value behind `m`, at most `limit`; false if it
/// did not hold by then.
fn wait_until<T>(
    m: &Mutex<T>,
    cv: &Condvar,
    limit: Duration,
    mut done: impl FnMut(&T) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    let mut v = lock(m);
    while !done(&v) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        v = cv
            .wait_timeout(v, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}

/// The writer lock for an append. Its holder runs for a microsecond or two (numbering, hashing,
/// one copy into the journal), usually on another core: waiting that out beats sleeping on the lock, which
/// costs two context switches. Sleeps only if the holder takes much longer (it was preempted).
fn lock_writer(m: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    const SPIN: Duration = Duration::from_micros(20);
    let mut started: Option<Instant> = None;
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        let since = *started.get_or_insert_with(Instant::now);
        if since.elapsed() > SPIN {
            return lock(m);
        }
        for _ in 0..16 {
            std::hint::spin_loop();
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One journal line: a hashed event as a JSON object, with the payload, which is canonical JSON
/// already, embedded as is (not escaped into a string: less to write, and to copy).
fn encode_line(out: &mut Vec<u8>, ev: &HashedEvent) {
    out.extend_from_slice(b"{\"chain_id\":");
    push_json_str(&ev.chain_id, out);
    out.extend_from_slice(b",\"chain_seq\":");
    push_int(ev.chain_seq, out);
    out.extend_from_slice(b",\"session_id\":");
    push_json_str(&ev.session_id, out);
    out.extend_from_slice(b",\"session_seq\":");
    push_int(ev.session_seq, out);
    out.extend_from_slice(b",\"at_unix_ms\":");
    push_int(ev.at_unix_ms, out);
    out.extend_from_slice(b",\"kind\":");
    push_json_str(&ev.kind, out);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(ev.payload.as_bytes());
    out.extend_from_slice(b",\"prev_hash\":");
    push_json_str(&ev.prev_hash, out);
    out.extend_from_slice(b",\"hash\":");
    push_json_str(&ev.hash, out);
    out.extend_from_slice(b"}\n");
}

impl Recorder {
    /// Opens (and locks) the journal, imports whatever a previous process left in it, and
    /// starts the importer thread. Events go to the chain `chain_id` (one per process).
    pub fn start(
        store: Arc<dyn Store>,
        chain_id: String,
        opts: RecorderOptions,
    ) -> Result<Recorder, StoreError> {
        let path = &opts.journal;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let lock_path = segment_path(path, "lock");
        let lock_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Unavailable(format!(
                "the audit journal {} is locked by another tollgate process; each gateway needs its own store",
                path.display()
            )));
        }
        let mut segments = sealed_segments(path)?;
        segments.push(path.clone());
        for seg in &segments {
            if seg.exists() {
                replay(&*store, seg)?;
            }
        }
        for seg in &segments[..segments.len() - 1] {
            std::fs::remove_file(seg).map_err(io_err(seg))?;
        }
        // Replayed above: the live segment starts empty.
        let journal = Segment::create(path).map_err(io_err(path))?;
        let inner = Arc::new(Inner {
            live_journal: Mutex::new(Arc::clone(journal.file())),
            writer: Mutex::new(Writer {
                path: path.clone(),
                journal,
                gen: 0,
                chain_seq: 0,
                prev_hash: GENESIS_HASH.to_string(),
                session_seqs: HashMap::new(),
                backlog: Vec::new(),
                oldest_unstored: None,
                line: Vec::with_capacity(4096),
            }),
            wake: Condvar::new(),
            chain_id,
            store,
            stall_limit: opts.stall_limit,
            written: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            import_failing: AtomicBool::new(false),
            import_now: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            durability: opts.durability,
            written_gen: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            sync: Mutex::new(SyncState::default()),
            sync_kick: Condvar::new(),
            sync_done: Condvar::new(),
            synced_tx: tokio::sync::watch::Sender::new(SyncState::default()),
            fsyncs: AtomicU64::new(0),
            fsync_micros: AtomicU64::new(0),
            stored_seq: Mutex::new(0),
            stored_done: Condvar::new(),
            stored_tx: tokio::sync::watch::Sender::new(0),
            sync_thread: Mutex::new(None),
            #[cfg(test)]
            test_fsync_delay: Mutex::new(Duration::ZERO),
            _lock: lock_file,
        });
        let worker = Arc::clone(&inner);
        let handle = std::thread::Builder::new()
            .name("tollgate-record".into())
            .spawn(move || import_loop(&worker))
            .map_err(|e| StoreError::Internal(format!("cannot start the audit importer: {e}")))?;
        *lock(&inner.thread) = Some(handle);
        let worker = Arc::clone(&inner);
        let handle = std::thread::Builder::new()
            .name("tollgate-fsync".into())
            .spawn(move || sync_loop(&worker))
            .map_err(|e| {
                StoreError::Internal(format!("cannot start the audit fsync thread: {e}"))
            })?;
        *lock(&inner.sync_thread) = Some(handle);
        Ok(Recorder { inner })
    }

    /// Number, hash-chain and journal `events` in one write. When this returns `Ok`, the events
    /// survive a crash of this process, and with [`Durability::Fsync`] they are fsynced (this
    /// blocks; async callers use [`Recorder::append_async`]). `Err` means they may not be
    /// recorded: the command they describe must not run.
    ///
    /// Refused while the store has been unavailable for longer than `stall_limit`: this is the
    /// call that gates new commands.
    pub fn append(&self, events: &[EventInput]) -> Result<(), StoreError> {
        let w = self.write(events, true)?;
        match self.inner.durability {
            Durability::Written => Ok(()),
            Durability::Fsync => self.wait_synced(w.gen),
            Durability::Store => self.wait_stored(w.last_seq),
        }
    }

    /// [`Recorder::append`] for async callers: the write happens at once, the wait for its
    /// fsync (with [`Durability::Fsync`]) yields instead of blocking the runtime's thread.
    pub async fn append_async(&self, events: &[EventInput]) -> Result<(), StoreError> {
        let written = self.write(events, true)?;
        self.wait_durable_async(written).await
    }

    /// [`Recorder::append_async`] for events whose payloads are already canonical JSON (see
    /// [`Recorder::record_canonical`]): the same numbering, chain and durability wait.
    pub async fn append_canonical_async(
        &self,
        events: Vec<CanonicalEvent>,
    ) -> Result<(), StoreError> {
        let mut hashed = self.unchain_canonical(events);
        let written = self.write_hashed(&mut hashed, true)?;
        self.wait_durable_async(written).await
    }

    /// Waits, without blocking the runtime's thread, until a write is as durable as the
    /// recorder's [`Durability`] asks.
    async fn wait_durable_async(&self, written: Written) -> Result<(), StoreError> {
        let Written { gen, last_seq } = written;
        match self.inner.durability {
            Durability::Written => return Ok(()),
            Durability::Store => return self.wait_stored_async(last_seq).await,
            Durability::Fsync => {}
        }
        let mut rx = self.inner.synced_tx.subscribe();
        let waited = tokio::time::timeout(
            self.inner.stall_limit,
            rx.wait_for(|s| s.outcome(gen).is_some()),
        )
        .await;
        match waited {
            Ok(Ok(s)) => s.outcome(gen).expect("checked by wait_for"),
            Ok(Err(_)) => Err(StoreError::RecorderStopped),
            Err(_) => Err(self.fsync_timeout()),
        }
    }

    fn wait_synced(&self, gen: u64) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let mut outcome = None;
        let decided = wait_until(&inner.sync, &inner.sync_done, inner.stall_limit, |s| {
            outcome = s.outcome(gen);
            outcome.is_some()
        });
        match outcome {
            Some(o) if decided => o,
            _ => Err(self.fsync_timeout()),
        }
    }

    /// [`Durability::Store`]: until the event numbered `seq` is committed to the store.
    fn wait_stored(&self, seq: i64) -> Result<(), StoreError> {
        let inner = &*self.inner;
        if wait_until(
            &inner.stored_seq,
            &inner.stored_done,
            inner.stall_limit,
            |s| *s >= seq,
        ) {
            Ok(())
        } else {
            Err(self.store_timeout())
        }
    }

    async fn wait_stored_async(&self, seq: i64) -> Result<(), StoreError> {
        let mut rx = self.inner.stored_tx.subscribe();
        let waited = tokio::time::timeout(self.inner.stall_limit, rx.wait_for(|s| *s >= seq))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::RecorderStopped),
            Err(_) => Err(self.store_timeout()),
        }
    }

    fn store_timeout(&self) -> StoreError {
        self.inner.failed.fetch_add(1, Ordering::Relaxed);
        StoreError::Unavailable(format!(
            "the audit store did not confirm the event within {} ms",
            self.inner.stall_limit.as_millis()
        ))
    }

    fn fsync_timeout(&self) -> StoreError {
        self.inner.failed.fetch_add(1, Ordering::Relaxed);
        StoreError::Unavailable(format!(
            "the audit journal was not fsynced within {} ms",
            self.inner.stall_limit.as_millis()
        ))
    }

    /// Append one event that gates nothing (session open/close, results): it is journaled even
    /// while the store is stalled; only a journal write failure loses it, loudly.
    pub fn record(&self, ev: EventInput) {
        self.record_all(std::slice::from_ref(&ev));
    }

    /// [`Recorder::record`] for several events, in one journal append.
    pub fn record_all(&self, events: &[EventInput]) {
        self.record_unchained(self.unchain_all(events));
    }

    /// [`Recorder::record_all`] for events whose payloads are already canonical JSON: no `Value`
    /// is built or walked. Debug builds check that each payload is what [`canonical_json`]
    /// writes for it.
    pub fn record_canonical(&self, events: Vec<CanonicalEvent>) {
        self.record_unchained(self.unchain_canonical(events));
    }

    /// Canonical events ready for the chain. Debug builds check that each payload is what
    /// [`canonical_json`] writes for it.
    fn unchain_canonical(&self, events: Vec<CanonicalEvent>) -> Vec<HashedEvent> {
        for ev in &events {
            debug_assert!(
                serde_json::from_str::<serde_json::Value>(&ev.payload)
                    .is_ok_and(|v| canonical_json(&v) == ev.payload),
                "not canonical JSON: {}",
                ev.payload
            );
        }
        events
            .into_iter()
            .map(|ev| self.unchained(ev.session_id, ev.kind, ev.at, ev.payload))
            .collect()
    }

    /// Journals events that gate nothing; only a journal write failure loses them, loudly.
    fn record_unchained(&self, mut hashed: Vec<HashedEvent>) {
        if hashed.is_empty() {
            return;
        }
        if let Err(e) = self.write_hashed(&mut hashed, false) {
            for ev in &hashed {
                tracing::error!(error = %e, kind = %ev.kind, session = %ev.session_id, "an audit event could not be recorded");
            }
        }
    }

    /// An event ready for the chain: everything but its numbers and hashes.
    fn unchained(
        &self,
        session_id: String,
        kind: String,
        at: std::time::SystemTime,
        payload: String,
    ) -> HashedEvent {
        HashedEvent {
            chain_id: self.inner.chain_id.clone(),
            chain_seq: 0,
            session_id,
            session_seq: 0,
            at_unix_ms: unix_ms(at),
            kind,
            payload,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// Journal `events`; returns where the write stands (for waiting on its fsync or import).
    fn write(&self, events: &[EventInput], gate: bool) -> Result<Written, StoreError> {
        self.write_hashed(&mut self.unchain_all(events), gate)
    }

    /// `events` ready for the chain. Everything that does not depend on the chain is done here,
    /// before the writer lock, which every session's appends share: only numbering, hashing and
    /// the append are inside it.
    fn unchain_all(&self, events: &[EventInput]) -> Vec<HashedEvent> {
        events
            .iter()
            .map(|ev| {
                self.unchained(
                    ev.session_id.clone(),
                    ev.kind.clone(),
                    ev.at,
                    canonical_json(&ev.payload),
                )
            })
            .collect()
    }

    /// Number, chain and journal `hashed` (built by [`Recorder::unchained`]); they move to the
    /// importer's backlog, or stay in `hashed` when this fails.
    fn write_hashed(
        &self,
        hashed: &mut Vec<HashedEvent>,
        gate: bool,
    ) -> Result<Written, StoreError> {
        let inner = &*self.inner;
        let mut guard = lock_writer(&inner.writer);
        if let (true, Some(since)) = (gate, guard.oldest_unstored) {
            if since.elapsed() > inner.stall_limit {
                inner.failed.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!(
                    "events have not reached the store for {}s",
                    since.elapsed().as_secs()
                )));
            }
        }
        let w = &mut *guard;
        w.line.clear();
        let mut chain_seq = w.chain_seq;
        let mut prev_hash = std::mem::take(&mut w.prev_hash);
        for i in 0..hashed.len() {
            chain_seq += 1;
            let (earlier, rest) = hashed.split_at_mut(i);
            let h = &mut rest[0];
            h.chain_seq = chain_seq;
            h.session_seq = w.session_seqs.get(&h.session_id).copied().unwrap_or(0)
                + 1
                + earlier
                    .iter()
                    .filter(|e| e.session_id == h.session_id)
                    .count() as i64;
            h.hash = event_hash(
                &prev_hash,
                &HashedFields {
                    chain_id: &h.chain_id,
                    chain_seq,
                    session_id: &h.session_id,
                    session_seq: h.session_seq,
                    at_unix_ms: h.at_unix_ms,
                    kind: &h.kind,
                    payload: h.payload.as_bytes(),
                },
            );
            h.prev_hash = std::mem::replace(&mut prev_hash, h.hash.clone());
            encode_line(&mut w.line, h);
        }
        if let Err(e) = w.journal.append(&w.line) {
            // Nothing was appended: the chain goes on from where it was.
            w.prev_hash = hashed
                .first()
                .map(|h| h.prev_hash.clone())
                .unwrap_or(prev_hash);
            inner.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot write the audit journal");
            return Err(StoreError::Io {
                path: PathBuf::from("audit journal"),
                source: e,
            });
        }
        w.gen += 1;
        let gen = w.gen;
        inner.written_gen.store(gen, Ordering::SeqCst);
        w.chain_seq = chain_seq;
        w.prev_hash = prev_hash;
        for h in hashed.iter() {
            if h.kind == KIND_SESSION_CLOSE {
                w.session_seqs.remove(&h.session_id);
            } else if let Some(seq) = w.session_seqs.get_mut(&h.session_id) {
                *seq = h.session_seq;
            } else {
                w.session_seqs.insert(h.session_id.clone(), h.session_seq);
            }
        }
        inner
            .written
            .fetch_add(hashed.len() as u64, Ordering::Relaxed);
        w.oldest_unstored.get_or_insert_with(Instant::now);
        w.backlog.append(hashed);
        if w.backlog.len() >= inner.import_wake_at() {
            inner.wake.notify_one();
        }
        drop(guard);
        // Fsync mode: every write wants the next fsync. Written mode: wake the sync thread only
        // if it may be asleep.
        if inner.durability == Durability::Fsync || !inner.dirty.swap(true, Ordering::SeqCst) {
            let _s = lock(&inner.sync);
            inner.sync_kick.notify_one();
        }
        Ok(Written {
            gen,
            last_seq: chain_seq,
        })
    }

    /// Resolves once every event appended before the call is in the store, or with `Err` if the
    /// store is failing imports.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let target = self.inner.written.load(Ordering::SeqCst);
        loop {
            if self.inner.stored.load(Ordering::SeqCst) >= target {
                return Ok(());
            }
            if self.inner.import_failing.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable(
                    "the store is not accepting events".into(),
                ));
            }
            self.inner.import_now.store(true, Ordering::SeqCst);
            self.inner.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn stats(&self) -> RecorderStats {
        let i = &self.inner;
        let written = i.written.load(Ordering::Relaxed);
        let stored = i.stored.load(Ordering::Relaxed);
        RecorderStats {
            written,
            stored,
            failed: i.failed.load(Ordering::Relaxed),
            queued: written.saturating_sub(stored),
            fsyncs: i.fsyncs.load(Ordering::Relaxed),
            fsync_micros: i.fsync_micros.load(Ordering::Relaxed),
        }
    }

    /// False while imports into the store are failing.
    pub fn healthy(&self) -> bool {
        !self.inner.import_failing.load(Ordering::Relaxed)
    }

    /// Stop the importer after a last import of everything journaled, and the sync thread
    /// after a last fsync (blocking).
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.import_now.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        if let Some(h) = lock(&self.inner.thread).take() {
            let _ = h.join();
        }
        lock(&self.inner.sync).stop = true;
        self.inner.sync_kick.notify_one();
        if let Some(h) = lock(&self.inner.sync_thread).take() {
            let _ = h.join();
        }
    }
}

/// A journal line as `encode_line` writes it; the payload is the exact canonical JSON that was
/// hashed. Lines from before payloads were embedded hold it as a JSON string instead.
#[derive(serde::Deserialize)]
struct JournalLine<'a> {
    chain_id: String,
    chain_seq: i64,
    session_id: String,
    session_seq: i64,
    at_unix_ms: i64,
    kind: String,
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
    prev_hash: String,
    hash: String,
}

/// Parses one journal line (`None`: not a whole event, as a torn last line).
fn decode_line(line: &[u8]) -> Option<HashedEvent> {
    let l: JournalLine<'_> = serde_json::from_slice(line).ok()?;
    let raw = l.payload.get();
    let payload = if raw.starts_with('"') {
        serde_json::from_str::<String>(raw).ok()?
    } else {
        raw.to_owned()
    };
    Some(HashedEvent {
        chain_id: l.chain_id,
        chain_seq: l.chain_seq,
        session_id: l.session_id,
        session_seq: l.session_seq,
        at_unix_ms: l.at_unix_ms,
        kind: l.kind,
        payload,
        prev_hash: l.prev_hash,
        hash: l.hash,
    })
}

/// What [`import_journal`] found and imported.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JournalImport {
    /// The files read, oldest first (sealed segments, then the live one).
    pub files: Vec<PathBuf>,
    /// Events read (those already in the store are skipped by the store, not counted apart).
    pub events: u64,
    /// The last event of each chain in the journal.
    pub chains: Vec<crate::ChainPoint>,
}

/// Imports the journal at `journal` (and its sealed segments `<journal>.<seq>`) into `store`,
/// as a gateway does at start with the journal a crashed process left: for an operator on
/// another host (`tollgate audit import`). Idempotent; the files are left as they are. Refused
/// while a running gateway holds the journal's lock.
pub fn import_journal(store: &dyn Store, journal: &Path) -> Result<JournalImport, StoreError> {
    let lock_path = segment_path(journal, "lock");
    if let Ok(lock_file) = File::open(&lock_path) {
        // SAFETY: flock on a file descriptor we own; released when it is closed.
        if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Unavailable(format!(
                "the audit journal {} is in use by a running tollgate process, which imports it itself",
                journal.display()
            )));
        }
    }
    let mut files = sealed_segments(journal)?;
    if journal.exists() {
        files.push(journal.to_path_buf());
    }
    if files.is_empty() {
        return Err(StoreError::Io {
            path: journal.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let mut report = JournalImport::default();
    let mut heads: std::collections::BTreeMap<String, (i64, String)> = Default::default();
    for file in &files {
        report.events += replay_with(store, file, |ev| {
            let head = heads.entry(ev.chain_id.clone()).or_default();
            if ev.chain_seq > head.0 {
                *head = (ev.chain_seq, ev.hash.clone());
            }
        })?;
    }
    report.files = files;
    report.chains = heads
        .into_iter()
        .map(|(chain_id, (seq, hash))| crate::ChainPoint {
            chain_id,
            seq,
            hash,
        })
        .collect();
    Ok(report)
}

/// Import a journal left by a previous process; a torn last line (a crash mid-write, whose
/// command was therefore never forwarded) is skipped.
fn replay(store: &dyn Store, path: &Path) -> Result<(), StoreError> {
    replay_with(store, path, |_| {}).map(|_| ())
}

/// [`replay`], showing each event to `seen`; returns how many were read.
fn replay_with(
    store: &dyn Store,
    path: &Path,
    mut seen: impl FnMut(&HashedEvent),
) -> Result<u64, StoreError> {
    let reader = BufReader::new(File::open(path).map_err(io_err(path))?);
    let mut batch = Vec::new();
    let mut total = 0usize;
    for line in reader.split(b'\n') {
        let line = line.map_err(io_err(path))?;
        // The unwritten end of a segment its writer never closed (a crash).
        let line = trim_zeros(&line);
        if line.is_empty() {
            continue;
        }
        match decode_line(line) {
            Some(ev) => {
                seen(&ev);
                batch.push(ev)
            }
            None => {
                tracing::warn!(journal = %path.display(), "skipping a torn line at the end of the audit journal");
                continue;
            }
        }
        if batch.len() >= IMPORT_BATCH {
            total += batch.len();
            store.import(&batch)?;
            batch.clear();
        }
    }
    total += batch.len();
    store.import(&batch)?;
    if total > 0 {
        tracing::info!(events = total, journal = %path.display(), "imported audit events left by a previous gateway process");
    }
    Ok(total as u64)
}

/// `<journal>.<suffix>`
fn segment_path(journal: &Path, suffix: &str) -> PathBuf {
    let mut name = journal.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// Sealed segments of `journal` (`<journal>.<last chain_seq>`), oldest first.
fn sealed_segments(journal: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let dir = journal
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = format!(
        "{}.",
        journal
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    );
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Seal the current segment once it is large, so that the journal never grows without bound.
/// Returns the sealed file and the last chain_seq it holds.
fn maybe_seal(w: &mut Writer, live: &Mutex<Arc<File>>) -> Option<(PathBuf, i64)> {
    if w.journal.len() < SEGMENT_BYTES {
        return None;
    }
    let sealed = segment_path(&w.path, &w.chain_seq.to_string());
    // The sync thread only ever fsyncs the live segment: make this one durable first.
    if let Err(e) = w.journal.file().sync_data() {
        tracing::error!(error = %e, journal = %w.path.display(), "cannot fsync the audit journal before sealing it");
    }
    if let Err(e) = std::fs::rename(&w.path, &sealed) {
        tracing::error!(error = %e, journal = %w.path.display(), "cannot rotate the audit journal; it keeps growing");
        return None;
    }
    let fresh = match Segment::create(&w.path) {
        Ok(f) => f,
        Err(e) => {
            // Keep appending to the segment under its live name.
            let _ = std::fs::rename(&sealed, &w.path);
            tracing::error!(error = %e, journal = %w.path.display(), "cannot start a new audit journal segment; the current one keeps growing");
            return None;
        }
    };
    *lock(live) = Arc::clone(fresh.file());
    let old = std::mem::replace(&mut w.journal, fresh);
    if let Err(e) = old.close() {
        // Only its zero tail stays: a reader skips that.
        tracing::warn!(error = %e, file = %sealed.display(), "cannot trim a sealed audit journal segment");
    }
    Some((sealed, w.chain_seq))
}

/// The journal's fsyncs: as soon as there is something to sync in fsync mode (one fsync covers
/// every write before it: group commit), at most every `WRITTEN_SYNC_PAUSE` in written mode.
fn sync_loop(inner: &Inner) {
    loop {
        {
            let mut s = lock(&inner.sync);
            loop {
                if inner.written_gen.load(Ordering::SeqCst) > s.synced.max(s.failed) {
                    break;
                }
                if s.stop {
                    return;
                }
                s = inner
                    .sync_kick
                    .wait_timeout(s, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        inner.dirty.store(false, Ordering::SeqCst);
        // The generation first: a write it counts is either in the live segment read next, or
        // in a sealed one, which was fsynced when it was sealed.
        let gen = inner.written_gen.load(Ordering::SeqCst);
        let file = Arc::clone(&lock(&inner.live_journal));
        #[cfg(test)]
        std::thread::sleep(*lock(&inner.test_fsync_delay));
        let started = Instant::now();
        let result = file.sync_data();
        inner.fsync_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        inner.fsyncs.fetch_add(1, Ordering::Relaxed);
        let state = {
            let mut s = lock(&inner.sync);
            match &result {
                Ok(()) => s.synced = s.synced.max(gen),
                Err(e) => {
                    tracing::error!(error = %e, "cannot fsync the audit journal");
                    s.failed = s.failed.max(gen);
                }
            }
            *s
        };
        if inner.durability == Durability::Fsync {
            // Only fsync-mode appenders wait for an fsync.
            inner.sync_done.notify_all();
        }
        inner.synced_tx.send_replace(state);
        if result.is_err() {
            std::thread::sleep(RETRY_MIN);
        } else if inner.durability == Durability::Written {
            std::thread::sleep(WRITTEN_SYNC_PAUSE);
        }
    }
}

/// Lowers the calling thread's priority by `by` nice steps from what the process runs at (on
/// Linux `setpriority` on a thread id is per thread). Lowering needs no privilege; if it fails
/// anyway the thread just keeps the process's priority.
fn lower_priority(by: libc::c_int) {
    // SAFETY: gettid, getpriority, setpriority and the errno location have no memory
    // preconditions; errno is cleared first because -1 is also a valid nice value.
    let rc = unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            -1
        } else {
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19))
        }
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the audit importer's priority");
    }
}

fn import_loop(inner: &Inner) {
    // With `Durability::Store` clients wait on the importer: it keeps the process's priority,
    // and retries a failing store sooner (their wait is bounded by the stall limit anyway).
    let retry_max = if inner.durability == Durability::Store {
        RETRY_MIN * 10
    } else {
        lower_priority(IMPORT_NICE);
        RETRY_MAX
    };
    let mut pending: Vec<HashedEvent> = Vec::new();
    let mut sealed: Vec<(PathBuf, i64)> = Vec::new();
    let mut stored_seq: i64 = 0;
    let mut backoff: Option<Duration> = None;
    let mut last_attempt = Instant::now();
    loop {
        {
            let mut w = lock(&inner.writer);
            // Until the interval since the last attempt is over (a full one when idle), unless
            // the backlog fills a batch, or `flush`/`shutdown` asks.
            let due = if w.backlog.is_empty() && pending.is_empty() {
                Instant::now() + IMPORT_INTERVAL
            } else {
                last_attempt + backoff.unwrap_or(IMPORT_INTERVAL)
            };
            loop {
                if inner.import_now.swap(false, Ordering::SeqCst)
                    || inner.stop.load(Ordering::SeqCst)
                    || (backoff.is_none() && w.backlog.len() >= inner.import_wake_at())
                {
                    break;
                }
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                w = inner
                    .wake
                    .wait_timeout(w, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if pending.len() < IMPORT_BATCH {
                let take = (IMPORT_BATCH - pending.len()).min(w.backlog.len());
                pending.extend(w.backlog.drain(..take));
            }
        }
        let stopping = inner.stop.load(Ordering::SeqCst);
        if pending.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        last_attempt = Instant::now();
        match inner.store.import(&pending) {
            Ok(()) => {
                inner
                    .stored
                    .fetch_add(pending.len() as u64, Ordering::SeqCst);
                stored_seq = stored_seq.max(pending.last().map_or(0, |e| e.chain_seq));
                pending.clear();
                inner.publish_stored(stored_seq);
                inner.import_failing.store(false, Ordering::SeqCst);
                backoff = None;
                {
                    let mut w = lock(&inner.writer);
                    w.oldest_unstored = if w.backlog.is_empty() {
                        None
                    } else {
                        Some(Instant::now())
                    };
                    sealed.extend(maybe_seal(&mut w, &inner.live_journal));
                }
                // A sealed segment whose every event is stored is no longer needed.
                sealed.retain(|(file, last)| {
                    if *last > stored_seq {
                        return true;
                    }
                    if let Err(e) = std::fs::remove_file(file) {
                        tracing::warn!(error = %e, file = %file.display(), "cannot remove a stored audit journal segment");
                    }
                    false
                });
            }
            Err(e) => {
                inner.failed.fetch_add(1, Ordering::Relaxed);
                inner.import_failing.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, events = pending.len(), "audit events could not be stored yet; they are kept in the journal and retried");
                if stopping {
                    tracing::error!(events = pending.len(), "stopping with audit events only in the journal; they are imported at the next start");
                    return;
                }
                backoff = Some(backoff.map_or(RETRY_MIN, |d| (d * 2).min(retry_max)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;
    use serde_json::json;
    use std::io::Write;
    use std::time::SystemTime;

    fn ev(session: &str, kind: &str, n: u64) -> EventInput {
        EventInput {
            session_id: session.into(),
            kind: kind.into(),
            at: SystemTime::now(),
            payload: json!({ "n": n }),
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<SqliteStore>, RecorderOptions) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("a.db")).unwrap());
        let opts = RecorderOptions {
            journal: dir.path().join("a.db.events.log"),
            stall_limit: Duration::from_secs(5),
            durability: Durability::Written,
        };
        (dir, store, opts)
    }

    /// `per_thread` command events from each of `threads` threads at once, to sessions `s<t>`.
    fn append_from_threads(rec: &Recorder, threads: usize, per_thread: u64) {
        let threads: Vec<_> = (0..threads)
            .map(|t| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        rec.append(&[ev(&format!("s{t}"), "command", i)]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A store that takes nothing: a journal written to it stays unimported, as after a crash.
    struct Down;
    impl Store for Down {
        fn append(&self, _: &str, _: &[EventInput]) -> Result<Vec<crate::StoredEvent>, StoreError> {
            Err(StoreError::Internal("down".into()))
        }
        fn import(&self, evs: &[HashedEvent]) -> Result<(), StoreError> {
            if evs.is_empty() {
                Ok(())
            } else {
                Err(StoreError::Internal("down".into()))
            }
        }
        fn sessions(&self, _: &crate::SessionFilter) -> Result<Vec<crate::SessionRow>, StoreError> {
            Ok(vec![])
        }
        fn session(&self, _: &str) -> Result<Option<crate::SessionRow>, StoreError> {
            Ok(None)
        }
        fn events(&self, _: &str) -> Result<Vec<crate::StoredEvent>, StoreError> {
            Ok(vec![])
        }
        fn verify(&self) -> Result<crate::VerifyReport, StoreError> {
            Err(StoreError::Internal("down".into()))
        }
        fn ping(&self) -> Result<(), StoreError> {
            Err(StoreError::Internal("down".into()))
        }
    }

    /// The nice value of this process's thread named `name`, from /proc.
    fn thread_nice(name: &str) -> Option<i64> {
        std::fs::read_dir("/proc/self/task").ok()?.find_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?;
            if comm.trim_end() != name {
                return None;
            }
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            // After the parenthesised command: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(16)?.parse().ok()
        })
    }

    #[test]
    fn the_importer_runs_below_the_relay_threads_priority() {
        let (_dir, store, opts) = setup();
        let rec = Recorder::start(store, "gw-nice".into(), opts).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The sync thread keeps the process's priority: its fsyncs bound what a power loss can
        // take.
        let base = thread_nice("tollgate-fsync").unwrap();
        let want = (base + i64::from(IMPORT_NICE)).min(19);
        let nice = loop {
            match thread_nice("tollgate-record") {
                Some(n) if n == want || Instant::now() > deadline => break n,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert_eq!(
            nice, want,
            "the importer runs {IMPORT_NICE} nice steps below the process"
        );
        rec.shutdown();
    }

    #[test]
    fn journal_lines_embed_the_canonical_payload_and_decode_to_the_event() {
        let strange = "q\"b\\s\u{0}\u{1f}\u{7f}/é😀\r\n";
        for (text, n) in [
            ("plain", 0i64),
            (strange, -7),
            ("", i64::MAX),
            ("x", i64::MIN),
        ] {
            let ev = HashedEvent {
                chain_id: format!("gw-{text}"),
                chain_seq: n,
                session_id: text.into(),
                session_seq: n.wrapping_add(1),
                at_unix_ms: 1_764_000_000_000,
                kind: text.into(),
                payload: canonical_json(&json!({"text": text, "n": n})),
                prev_hash: GENESIS_HASH.into(),
                hash: text.into(),
            };
            let mut line = Vec::new();
            encode_line(&mut line, &ev);
            assert_eq!(line.last(), Some(&b'\n'));
            // One JSON object whose payload is the canonical text itself, not a string.
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["payload"], json!({"text": text, "n": n}));
            let needle = format!(",\"payload\":{},", ev.payload);
            assert!(String::from_utf8_lossy(&line).contains(&needle));
            assert_eq!(decode_line(&line).as_ref(), Some(&ev));
            // A journal written before payloads were embedded: the payload as a JSON string.
            let old = serde_json::to_vec(&ev).unwrap();
            assert_eq!(decode_line(&old).as_ref(), Some(&ev));
            // Torn lines are not events.
            for cut in [line.len() / 2, line.len() - 2] {
                assert_eq!(decode_line(&line[..cut]), None);
            }
        }
    }

    #[tokio::test]
    async fn appended_events_are_chained_stored_and_verified() {
        let (_d, store, opts) = setup();
        let rec = Recorder::start(store.clone(), "c1".into(), opts).unwrap();
        append_from_threads(&rec, 8, 1000);
        rec.flush().await.unwrap();
        let st = rec.stats();
        assert_eq!(
            (st.written, st.stored, st.failed, st.queued),
            (8000, 8000, 0, 0)
        );
        let r = store.verify().unwrap();
        assert_eq!((r.events, r.first_break.is_none()), (8000, true), "{r:?}");
        let s3 = store.events("s3").unwrap();
        let ns: Vec<u64> = s3
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ns,
            (0..1000).collect::<Vec<_>>(),
            "per-session order is kept"
        );
        assert_eq!(
            s3.iter().map(|e| e.session_seq).collect::<Vec<_>>(),
            (1..=1000).collect::<Vec<_>>()
        );
        rec.shutdown();
    }

    #[tokio::test]
    async fn a_journal_left_by_a_crash_is_imported_at_the_next_start() {
        let (dir, store, opts) = setup();
        // Simulate a crash: journal written, importer never ran (a failing store).
        let crashed = Recorder::start(Arc::new(Down), "old".into(), opts.clone()).unwrap();
        crashed
            .append(&[ev("s", "session.open", 0), ev("s", "command", 1)])
            .unwrap();
        crashed.append(&[ev("s", "command", 2)]).unwrap();
        assert!(crashed.flush().await.is_err());
        assert_eq!(crashed.stats().queued, 3);
        crashed.shutdown();
        drop(crashed);
        // A torn last line, as from a crash in the middle of an append, and the unwritten
        // (zero) rest of the segment's last allocated chunk, as a crashed writer leaves it.
        let mut f = OpenOptions::new().append(true).open(&opts.journal).unwrap();
        f.write_all(b"{\"chain_id\":\"old\",\"chain_s").unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        drop(f);

        let rec = Recorder::start(store.clone(), "new".into(), opts.clone()).unwrap();
        let evs = store.events("s").unwrap();
        assert_eq!(
            evs.iter()
                .map(|e| e.payload["n"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(store.verify().unwrap().first_break.is_none());
        assert_eq!(
            std::fs::metadata(&opts.journal).unwrap().len(),
            0,
            "imported journal is truncated"
        );
        // A second gateway cannot share the journal.
        assert!(matches!(
            Recorder::start(store.clone(), "x".into(), opts.clone()),
            Err(StoreError::Unavailable(_))
        ));
        rec.shutdown();
        drop(dir);
    }

    #[tokio::test]
    async fn an_operator_imports_a_journal_idempotently_but_not_a_live_one() {
        let (dir, _store, opts) = setup();
        let rec = Recorder::start(Arc::new(Down), "crashed".into(), opts.clone()).unwrap();
        rec.append(&[ev("s", "session.open", 0), ev("s", "command", 1)])
            .unwrap();
        rec.append(&[ev("s", "command", 2)]).unwrap();
        // While its gateway runs, the journal is that gateway's to import.
        let other = SqliteStore::open(dir.path().join("other.db")).unwrap();
        let err = import_journal(&other, &opts.journal).unwrap_err();
        assert!(
            err.to_string().contains("in use by a running tollgate"),
            "{err}"
        );
        rec.shutdown();
        drop(rec);
        // "Another host": a store that never saw this journal, twice.
        for _ in 0..2 {
            let report = import_journal(&other, &opts.journal).unwrap();
            assert_eq!(report.events, 3);
            assert_eq!(report.files, vec![opts.journal.clone()]);
            assert_eq!(report.chains.len(), 1);
            assert_eq!(
                (report.chains[0].chain_id.as_str(), report.chains[0].seq),
                ("crashed", 3)
            );
            let evs = other.events("s").unwrap();
            assert_eq!(evs.len(), 3);
            assert_eq!(evs[2].hash, report.chains[0].hash);
            let v = other.verify().unwrap();
            assert!(v.first_break.is_none(), "{v:?}");
            assert_eq!(v.events, 3);
        }
        // The files are left for the replica's own restart, which imports them again (a no-op).
        assert!(std::fs::metadata(&opts.journal).unwrap().len() > 0);
        let missing = dir.path().join("nothing.events.log");
        assert!(matches!(
            import_journal(&other, &missing),
            Err(StoreError::Io { .. })
        ));
    }

    #[tokio::test]
    async fn appends_are_refused_once_the_store_stalls_past_the_limit() {
        let (_d, store, mut opts) = setup();
        opts.stall_limit = Duration::from_millis(300);
        let db = _d.path().join("a.db");
        let rec = Recorder::start(store.clone(), "c".into(), opts).unwrap();
        let blocker = rusqlite::Connection::open(&db).unwrap();
        blocker
            .execute_batch("PRAGMA busy_timeout = 0; BEGIN EXCLUSIVE")
            .unwrap();
        rec.append(&[ev("s", "command", 1)]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(matches!(
            rec.append(&[ev("s", "command", 2)]),
            Err(StoreError::Unavailable(_))
        ));
        blocker.execute_batch("ROLLBACK").unwrap();
        rec.flush().await.ok();
        // Back to normal once the store takes the backlog.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rec.append(&[ev("s", "command", 3)]).is_err() {
            assert!(Instant::now() < deadline, "the recorder never recovered");
            std::thread::sleep(Duration::from_millis(50));
        }
        rec.flush().await.unwrap();
        let ns: Vec<u64> = store
            .events("s")
            .unwrap()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ns,
            vec![1, 3],
            "the refused event is not recorded, the others are"
        );
        assert!(store.verify().unwrap().first_break.is_none());
        rec.shutdown();
    }

    #[tokio::test]
    async fn the_journal_rotates_and_stored_segments_are_removed() {
        let (dir, store, opts) = setup();
        let rec = Recorder::start(store.clone(), "c".into(), opts.clone()).unwrap();
        let big = "x".repeat(4000);
        for i in 0..5000 {
            rec.append(&[EventInput {
                session_id: "s".into(),
                kind: "command".into(),
                at: SystemTime::now(),
                payload: json!({"n": i, "text": big}),
            }])
            .unwrap();
            if i % 1000 == 0 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
        rec.flush().await.unwrap();
        // ~20 MB went through; what is left on disk is at most the live segment and one sealed one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("events.log"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(
            on_disk <= 2 * SEGMENT_BYTES + 64 * 1024,
            "journal kept {on_disk} bytes"
        );
        assert_eq!(store.verify().unwrap().events, 5000);
        rec.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_refuses_the_append_and_the_chain_goes_on_afterwards() {
        let (_d, store, opts) = setup();
        let rec = Recorder::start(store.clone(), "c".into(), opts.clone()).unwrap();
        rec.append(&[ev("s", "session.open", 0)]).unwrap();
        // No room beyond the chunk already allocated.
        let room = lock(&rec.inner.writer).journal.len() as usize;
        lock(&rec.inner.writer).journal.room = Some(room.max(1));
        let big = EventInput {
            payload: json!({"n": 1, "text": "x".repeat(2 << 20)}),
            ..ev("s", "command", 1)
        };
        let err = rec
            .append_async(std::slice::from_ref(&big))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{err:?}"
        );
        assert_eq!(rec.stats().failed, 1);
        // Space again: the next events continue the chain where the refused one would have been.
        lock(&rec.inner.writer).journal.room = None;
        rec.append(&[ev("s", "command", 2)]).unwrap();
        rec.record(ev("s", "result", 3));
        rec.flush().await.unwrap();
        let evs = store.events("s").unwrap();
        assert_eq!(
            evs.iter()
                .map(|e| e.payload["n"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            vec![0, 2, 3]
        );
        let report = store.verify().unwrap();
        assert!(report.first_break.is_none(), "{report:?}");
        assert_eq!(report.events, 3);
        // And the journal holds exactly those three lines.
        let text = std::fs::read(&opts.journal).unwrap();
        assert_eq!(
            trim_zeros(&text)
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            3
        );
        rec.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fsync_mode_appends_return_only_after_an_fsync() {
        let (_d, store, mut opts) = setup();
        opts.durability = Durability::Fsync;
        let rec = Recorder::start(store.clone(), "c".into(), opts).unwrap();
        for i in 0..20 {
            let before = rec.stats().fsyncs;
            if i % 2 == 0 {
                rec.append(&[ev("s", "command", i)]).unwrap();
            } else {
                rec.append_async(&[ev("s", "command", i)]).await.unwrap();
            }
            let s = *lock(&rec.inner.sync);
            assert!(
                s.synced >= rec.inner.written_gen.load(Ordering::SeqCst),
                "append {i} returned before its write was fsynced: {s:?}"
            );
            assert!(
                rec.stats().fsyncs > before,
                "append {i} did not wait for an fsync"
            );
        }
        rec.flush().await.unwrap();
        assert_eq!(store.verify().unwrap().events, 20);
        rec.shutdown();
    }

    #[test]
    fn fsync_mode_groups_concurrent_appenders_into_shared_fsyncs() {
        let (_d, store, mut opts) = setup();
        opts.durability = Durability::Fsync;
        let rec = Recorder::start(store, "c".into(), opts).unwrap();
        // A slow disk: while one fsync runs, the other appenders queue up for the next.
        *lock(&rec.inner.test_fsync_delay) = Duration::from_millis(3);
        append_from_threads(&rec, 8, 25);
        let st = rec.stats();
        assert_eq!(st.written, 200);
        assert!(
            st.fsyncs < 200 / 2,
            "{} fsyncs for 200 concurrent appends: not grouped",
            st.fsyncs
        );
        rec.shutdown();
    }

    #[tokio::test]
    async fn written_mode_returns_at_once_and_fsyncs_in_the_background() {
        let (_d, store, opts) = setup();
        let rec = Recorder::start(store, "c".into(), opts).unwrap();
        *lock(&rec.inner.test_fsync_delay) = Duration::from_millis(200);
        let started = Instant::now();
        for i in 0..50 {
            rec.append(&[ev("s", "command", i)]).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "written-mode appends waited for an fsync"
        );
        *lock(&rec.inner.test_fsync_delay) = Duration::ZERO;
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&rec.inner.sync).synced < 50 {
            assert!(Instant::now() < deadline, "the journal was never fsynced");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(rec.stats().fsyncs >= 1 && rec.stats().fsyncs < 50);
        rec.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_mode_appends_return_only_once_the_events_are_in_the_store() {
        let (_d, store, mut opts) = setup();
        opts.durability = Durability::Store;
        let rec = Recorder::start(store.clone(), "c".into(), opts).unwrap();
        for i in 0..20u64 {
            if i % 2 == 0 {
                rec.append(&[ev("s", "command", i)]).unwrap();
            } else {
                rec.append_async(&[ev("s", "command", i)]).await.unwrap();
            }
            // No flush: the store already holds it when the append returns.
            let stored = store.events("s").unwrap();
            assert_eq!(
                stored.len() as u64,
                i + 1,
                "append {i} returned before its import"
            );
            assert_eq!(stored.last().unwrap().payload["n"], i);
        }
        // Concurrent appenders share transactions.
        append_from_threads(&rec, 8, 25);
        assert_eq!(store.verify().unwrap().events, 220);
        rec.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_mode_refuses_an_append_the_store_does_not_take_within_the_limit() {
        let (d, store, mut opts) = setup();
        opts.durability = Durability::Store;
        opts.stall_limit = Duration::from_millis(400);
        let rec = Recorder::start(store.clone(), "c".into(), opts).unwrap();
        rec.append_async(&[ev("s", "command", 1)]).await.unwrap();
        let blocker = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
        blocker
            .execute_batch("PRAGMA busy_timeout = 0; BEGIN EXCLUSIVE")
            .unwrap();
        let started = Instant::now();
        let err = rec
            .append_async(&[ev("s", "command", 2)])
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("within 400 ms"), "{err}");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "refused after {took:?}"
        );
        // Past the limit, the next append is refused at once (the blocking form too).
        let started = Instant::now();
        assert!(rec.append(&[ev("s", "command", 3)]).is_err());
        assert!(started.elapsed() < Duration::from_millis(200));
        blocker.execute_batch("ROLLBACK").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rec.append_async(&[ev("s", "command", 4)]).await.is_err() {
            assert!(Instant::now() < deadline, "the recorder never recovered");
        }
        // The refused event is kept as evidence (it was journaled); the chain verifies.
        let ns: Vec<u64> = store
            .events("s")
            .unwrap()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(&ns[..2], &[1, 2], "{ns:?}");
        assert_eq!(ns.last(), Some(&4));
        assert!(store.verify().unwrap().first_break.is_none());
        rec.shutdown();
    }

    #[test]
    fn journal_is_private() {
        let (_d, store, opts) = setup();
        let rec = Recorder::start(store, "c".into(), opts.clone()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&opts.journal)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        rec.shutdown();
    }
}
