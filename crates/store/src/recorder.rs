//! The batching writer on the gateway's hot path: callers enqueue without blocking; one OS
//! thread drains the queue and commits everything queued in one transaction (group commit).
//!
//! Events are never dropped silently: a batch that cannot be written is retried with backoff,
//! its waiters get `Err`, and its events stay queued (in order) until a later write succeeds.
//!
//! Shutdown: once every clone is dropped (or passed to [`Recorder::shutdown`]), the thread
//! writes what is queued and exits. `shutdown` returns its `JoinHandle` so a caller can wait
//! for that (join from a blocking context, e.g. `tokio::task::spawn_blocking`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{EventInput, Store, StoreError};

/// Most events committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Immediate retries of a failed batch, with these pauses before each.
const RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];
/// Pause before re-trying events kept after a failed batch; doubles up to the maximum.
const REQUEUE_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REQUEUE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Failed rounds tolerated after the last handle is gone before kept events are abandoned.
const SHUTDOWN_ROUNDS: u32 = 3;

type Waiter = oneshot::Sender<Result<(), StoreError>>;

enum Msg {
    Event {
        ev: EventInput,
        done: Option<Waiter>,
    },
    Flush(Waiter),
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecorderStats {
    /// Events committed.
    pub written: u64,
    /// Batches that failed after all retries (their events stay queued).
    pub failed: u64,
    /// Batches committed.
    pub batches: u64,
    /// Events enqueued and not yet committed.
    pub queued: u64,
}

#[derive(Default)]
struct Shared {
    written: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    queued: AtomicU64,
    unhealthy: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Cheap to clone; all clones feed the same writer thread and chain.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Recorder {
    /// Starts the writer thread for `chain_id` (one chain per gateway process).
    pub fn start(store: Arc<dyn Store>, chain_id: String) -> Recorder {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            store,
            chain_id,
            rx,
            shared: Arc::clone(&shared),
            pending: Vec::new(),
            waiters: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("tollgate-recorder".into())
            .spawn(move || worker.run())
            .expect("cannot spawn the recorder thread");
        *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Recorder { tx, shared }
    }

    /// Enqueues an event; never blocks.
    pub fn record(&self, ev: EventInput) {
        self.send(Msg::Event { ev, done: None });
    }

    /// Enqueues an event; resolves once the batch holding it is committed (`Ok`) or has
    /// failed (`Err`; the event stays queued and is written later).
    pub fn record_durable(
        &self,
        ev: EventInput,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.send(Msg::Event {
            ev,
            done: Some(done),
        });
        wait(rx)
    }

    /// Resolves once everything enqueued before this call is committed (or its batch failed).
    pub fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.send(Msg::Flush(done));
        wait(rx)
    }

    pub fn stats(&self) -> RecorderStats {
        let s = &self.shared;
        RecorderStats {
            written: s.written.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
        }
    }

    /// `false` after a batch failed, `true` again after the next successful one.
    pub fn healthy(&self) -> bool {
        !self.shared.unhealthy.load(Ordering::Relaxed)
    }

    /// Gives up this handle. The thread exits after every other clone is dropped too and the
    /// queue is written; the first caller gets its handle to join.
    pub fn shutdown(self) -> Option<JoinHandle<()>> {
        let handle = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(self);
        handle
    }

    fn send(&self, msg: Msg) {
        let is_event = matches!(msg, Msg::Event { .. });
        if is_event {
            self.shared.queued.fetch_add(1, Ordering::Relaxed);
        }
        if self.tx.send(msg).is_err() {
            // Only if the writer thread died; a waiter sees RecorderStopped.
            if is_event {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("recorder thread has stopped; an audit event was not recorded");
            }
        }
    }
}

async fn wait(rx: oneshot::Receiver<Result<(), StoreError>>) -> Result<(), StoreError> {
    rx.await.unwrap_or(Err(StoreError::RecorderStopped))
}

struct Worker {
    store: Arc<dyn Store>,
    chain_id: String,
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    /// The next batch, in enqueue order; kept across a failed write.
    pending: Vec<EventInput>,
    waiters: Vec<Waiter>,
}

impl Worker {
    fn run(mut self) {
        let mut connected = true;
        let mut backoff: Option<Duration> = None;
        let mut rounds_after_close = 0u32;
        loop {
            if self.pending.is_empty() && self.waiters.is_empty() {
                if !connected {
                    return;
                }
                match self.rx.recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => return,
                }
            }
            if let (Some(delay), true) = (backoff, connected) {
                // Wait before retrying, while still collecting new work.
                let deadline = Instant::now() + delay;
                while self.pending.len() < MAX_BATCH {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(left) {
                        Ok(msg) => self.take(msg),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            connected = false;
                            break;
                        }
                    }
                }
            }
            while connected && self.pending.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(msg) => self.take(msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => connected = false,
                }
            }
            if self.write_batch() {
                backoff = None;
                continue;
            }
            backoff =
                Some(backoff.map_or(REQUEUE_BACKOFF_MIN, |d| (d * 2).min(REQUEUE_BACKOFF_MAX)));
            if !connected {
                rounds_after_close += 1;
                if rounds_after_close >= SHUTDOWN_ROUNDS {
                    self.abandon();
                    return;
                }
                std::thread::sleep(backoff.unwrap_or(REQUEUE_BACKOFF_MIN));
            }
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Event { ev, done } => {
                self.pending.push(ev);
                self.waiters.extend(done);
            }
            Msg::Flush(done) => self.waiters.push(done),
        }
    }

    /// Writes `pending` in one transaction; `true` on success.
    fn write_batch(&mut self) -> bool {
        if self.pending.is_empty() {
            self.notify(|| Ok(()));
            return true;
        }
        let mut attempts = 0u32;
        let err = loop {
            attempts += 1;
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.store.append(&self.chain_id, &self.pending)
            }))
            .unwrap_or_else(|_| Err(StoreError::Internal("store panicked in append".into())));
            match result {
                Ok(_) => {
                    let n = self.pending.len() as u64;
                    self.pending.clear();
                    let s = &self.shared;
                    s.written.fetch_add(n, Ordering::Relaxed);
                    s.batches.fetch_add(1, Ordering::Relaxed);
                    s.queued.fetch_sub(n, Ordering::Relaxed);
                    s.unhealthy.store(false, Ordering::Relaxed);
                    self.notify(|| Ok(()));
                    return true;
                }
                Err(e) => match RETRY_PAUSES.get(attempts as usize - 1) {
                    Some(pause) => {
                        tracing::warn!(error = %e, attempts, "audit batch write failed; retrying");
                        std::thread::sleep(*pause);
                    }
                    None => break e,
                },
            }
        };
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        self.shared.unhealthy.store(true, Ordering::Relaxed);
        tracing::error!(
            error = %err,
            attempts,
            events = self.pending.len(),
            "audit batch write failed; events kept for a later retry"
        );
        let source = Arc::new(err);
        self.notify(|| {
            Err(StoreError::BatchFailed {
                attempts,
                source: Arc::clone(&source),
            })
        });
        false
    }

    fn notify(&mut self, result: impl Fn() -> Result<(), StoreError>) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(result()); // the caller may have stopped waiting
        }
    }

    /// Last resort at shutdown with a store that keeps failing.
    fn abandon(&mut self) {
        let lost = self.pending.len() as u64
            + self
                .rx
                .try_iter()
                .filter(|m| matches!(m, Msg::Event { .. }))
                .count() as u64;
        self.shared.queued.fetch_sub(lost, Ordering::Relaxed);
        tracing::error!(
            lost,
            "recorder shutting down with a failing store; audit events were not written"
        );
        self.pending.clear();
        self.notify(|| Err(StoreError::RecorderStopped));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteStore, StoredEvent, KIND_SESSION_OPEN};
    use serde_json::json;
    use std::sync::atomic::AtomicUsize;
    use std::time::SystemTime;

    fn ev(session: &str, kind: &str, n: u64) -> EventInput {
        EventInput {
            session_id: session.into(),
            kind: kind.into(),
            at: SystemTime::now(),
            payload: json!({ "n": n }),
        }
    }

    fn file_store() -> (tempfile::TempDir, Arc<SqliteStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("rec.db")).unwrap());
        (dir, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_events_from_eight_threads_are_group_committed_in_order() {
        let (_dir, store) = file_store();
        let recorder = Recorder::start(store.clone(), "gw-test".into());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    let session = format!("s{t}");
                    recorder.record(ev(&session, KIND_SESSION_OPEN, 0));
                    for n in 1..1250 {
                        recorder.record(ev(&session, "query", n));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        recorder.flush().await.unwrap();
        let stats = recorder.stats();
        assert_eq!(stats.written, 10_000);
        assert_eq!((stats.queued, stats.failed), (0, 0));
        assert!(stats.batches < stats.written, "{stats:?}");
        for t in 0..8 {
            let events = store.events(&format!("s{t}")).unwrap();
            assert_eq!(events.len(), 1250);
            let order: Vec<(i64, u64)> = events
                .iter()
                .map(|e| (e.session_seq, e.payload["n"].as_u64().unwrap()))
                .collect();
            let expected: Vec<(i64, u64)> = (0..1250).map(|n| (n as i64 + 1, n)).collect();
            assert_eq!(order, expected);
            assert_eq!(
                store
                    .session(&format!("s{t}"))
                    .unwrap()
                    .unwrap()
                    .event_count,
                1250
            );
        }
        let report = store.verify().unwrap();
        assert!(report.first_break.is_none(), "{report:?}");
        assert_eq!(report.events, 10_000);
        assert!(recorder.healthy());
    }

    #[tokio::test]
    async fn record_durable_resolves_after_the_row_is_readable() {
        let (_dir, store) = file_store();
        let recorder = Recorder::start(store.clone(), "gw-test".into());
        for n in 0..50 {
            recorder.record(ev("s", "query", n));
        }
        recorder.record_durable(ev("s", "query", 50)).await.unwrap();
        let events = store.events("s").unwrap();
        assert_eq!(events.len(), 51, "the durable event and all before it");
        assert_eq!(events[50].payload, json!({"n": 50}));
    }

    #[test]
    fn dropping_every_handle_writes_the_queue_before_the_thread_exits() {
        let (_dir, store) = file_store();
        let recorder = Recorder::start(store.clone(), "gw-test".into());
        let clone = recorder.clone();
        for n in 0..100 {
            clone.record(ev("s", "query", n));
        }
        drop(clone);
        let handle = recorder.shutdown().expect("first shutdown gets the handle");
        handle.join().unwrap();
        assert_eq!(store.events("s").unwrap().len(), 100);
    }

    /// Fails the first `failures` appends, then delegates.
    struct FlakyStore {
        inner: SqliteStore,
        failures: AtomicUsize,
    }

    impl Store for FlakyStore {
        fn append(&self, chain: &str, evs: &[EventInput]) -> Result<Vec<StoredEvent>, StoreError> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(StoreError::Internal("disk on fire".into()));
            }
            self.inner.append(chain, evs)
        }
        fn sessions(&self, f: &crate::SessionFilter) -> Result<Vec<crate::SessionRow>, StoreError> {
            self.inner.sessions(f)
        }
        fn session(&self, id: &str) -> Result<Option<crate::SessionRow>, StoreError> {
            self.inner.session(id)
        }
        fn events(&self, session_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
            self.inner.events(session_id)
        }
        fn verify(&self) -> Result<crate::VerifyReport, StoreError> {
            self.inner.verify()
        }
        fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping()
        }
    }

    #[tokio::test]
    async fn a_failed_batch_reports_err_keeps_its_events_and_writes_them_later() {
        let store = Arc::new(FlakyStore {
            inner: SqliteStore::open_in_memory().unwrap(),
            failures: AtomicUsize::new(1 + RETRY_PAUSES.len()),
        });
        let recorder = Recorder::start(store.clone(), "gw-test".into());
        let err = recorder
            .record_durable(ev("s", "query", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::BatchFailed { attempts: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(!recorder.healthy());
        assert_eq!(recorder.stats().failed, 1);

        recorder.record_durable(ev("s", "query", 2)).await.unwrap();
        let ns: Vec<u64> = store
            .events("s")
            .unwrap()
            .iter()
            .map(|e| e.payload["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, [1, 2], "the failed event was kept and written first");
        assert!(recorder.healthy());
        let stats = recorder.stats();
        assert_eq!((stats.written, stats.queued, stats.failed), (2, 0, 1));
    }

    #[tokio::test]
    async fn flush_with_nothing_queued_resolves() {
        let store = Arc::new(SqliteStore::open_in_memory().unwrap());
        let recorder = Recorder::start(store, "gw-test".into());
        recorder.flush().await.unwrap();
        assert_eq!(recorder.stats(), RecorderStats::default());
    }
}
