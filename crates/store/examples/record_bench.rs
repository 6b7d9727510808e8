//! Audit recording cost per query, without PostgreSQL: what `scripts/bench-pg` pays for
//! `record_commands = true`, isolated. Each simulated query is a `command` event appended
//! through [`Recorder::append`] (the gate) and a `result` event through [`Recorder::record`],
//! spread over `--sessions` sessions, with payloads shaped like the relay's.
//!
//! ```text
//! cargo run --release -p tollgate-store --example record_bench -- paced [--qps 10000] [--seconds 3]
//! cargo run --release -p tollgate-store --example record_bench -- fixed [--queries 20000] [--batch 1000]
//! ```
//!
//! - `paced` offers queries at a steady rate (as pgbench does) to a real recorder and SQLite
//!   store, and prints CPU per 1000 queries of each thread (appender, importer, fsync) and
//!   how many import transactions the importer made.
//! - `fixed` is deterministic, for instruction counts: it journals `--queries` queries through
//!   a recorder whose store only collects them, then imports those events into a fresh SQLite
//!   store in transactions of `--batch`. Under callgrind, toggle collection on the hot path
//!   or on the importer's transactions (SHA-256 runs ring's AVX code there, not SHA-NI):
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='tollgate_store::recorder::Recorder::write' \
//!     target/release/examples/record_bench fixed --queries 5000
//! valgrind --tool=callgrind --toggle-collect='*SqliteStore as tollgate_store::Store>::import' \
//!     target/release/examples/record_bench fixed --queries 5000
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tollgate_store::{
    Durability, EventInput, HashedEvent, Recorder, RecorderOptions, SessionFilter, SessionRow,
    SqliteStore, Store, StoreError, StoredEvent, VerifyReport,
};

/// Delegates to a real store and counts import transactions; or, without one, only collects.
struct Probe {
    inner: Option<Arc<SqliteStore>>,
    imports: AtomicU64,
    imported: AtomicU64,
    collected: Mutex<Vec<HashedEvent>>,
}

impl Store for Probe {
    fn append(&self, c: &str, e: &[EventInput]) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.as_ref().expect("a store").append(c, e)
    }
    fn import(&self, events: &[HashedEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.imports.fetch_add(1, Ordering::Relaxed);
        self.imported
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        match &self.inner {
            Some(s) => s.import(events),
            None => {
                self.collected.lock().unwrap().extend_from_slice(events);
                Ok(())
            }
        }
    }
    fn sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRow>, StoreError> {
        self.inner.as_ref().expect("a store").sessions(f)
    }
    fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError> {
        self.inner.as_ref().expect("a store").session(id)
    }
    fn events(&self, id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.as_ref().expect("a store").events(id)
    }
    fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.inner.as_ref().expect("a store").verify()
    }
    fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

struct Args {
    mode: String,
    qps: u64,
    seconds: u64,
    queries: u64,
    batch: usize,
    sessions: usize,
    fsync: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: "paced".into(),
        qps: 10_000,
        seconds: 3,
        queries: 20_000,
        batch: 1000,
        sessions: 8,
        fsync: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "paced" | "fixed" => a.mode = arg.clone(),
            "--qps" => a.qps = num(),
            "--seconds" => a.seconds = num(),
            "--queries" => a.queries = num(),
            "--batch" => a.batch = num() as usize,
            "--sessions" => a.sessions = num() as usize,
            "--fsync" => a.fsync = true,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn session_ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("0193a5b2c3d4{:012x}", 0x5eed_0000_u64 + i as u64))
        .collect()
}

fn open_event(session: &str) -> EventInput {
    EventInput {
        session_id: session.into(),
        kind: "session.open".into(),
        at: SystemTime::now(),
        payload: json!({
            "listener": "postgres", "client_addr": "127.0.0.1:50312", "client_user": "bench",
            "database": "bench", "subject": "bench", "groups": ["bench"], "auth_method": "cert",
            "resource": "bench", "protocol": "3.0",
        }),
    }
}

/// The relay's `command` event for `pgbench -S` (simple protocol).
fn command(session: &str, n: u64) -> EventInput {
    EventInput {
        session_id: session.into(),
        kind: "command".into(),
        at: SystemTime::now(),
        payload: json!({
            "n": n,
            "protocol": "simple",
            "text": format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", 1 + (n * 7919) % 1_000_000),
        }),
    }
}

/// The relay's `result` event.
fn result(session: &str, n: u64) -> EventInput {
    EventInput {
        session_id: session.into(),
        kind: "result".into(),
        at: SystemTime::now(),
        payload: json!({
            "n": n, "outcome": "ok", "sqlstate": null, "rows": 1, "tag": "SELECT 1",
            "duration_us": 180 + n % 97,
        }),
    }
}

/// CPU time (user + system) of each of this process's threads, by name.
fn thread_cpu() -> Vec<(String, Duration)> {
    let tick = 100.0; // USER_HZ on Linux
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = entry.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
        out.push((
            name.trim().to_string(),
            Duration::from_secs_f64(ticks / tick),
        ));
    }
    out
}

fn cpu_of(snapshot: &[(String, Duration)], name: &str) -> Duration {
    snapshot
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, d)| *d)
        .sum()
}

fn paced(a: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(dir.path().join("a.db")).unwrap());
    let probe = Arc::new(Probe {
        inner: Some(sqlite.clone()),
        imports: AtomicU64::new(0),
        imported: AtomicU64::new(0),
        collected: Mutex::new(Vec::new()),
    });
    let rec = Recorder::start(
        probe.clone(),
        "gw-0123456789abcdef".into(),
        RecorderOptions {
            journal: dir.path().join("a.db.events.log"),
            stall_limit: Duration::from_secs(30),
            durability: if a.fsync {
                Durability::Fsync
            } else {
                Durability::Written
            },
        },
    )
    .unwrap();
    let sessions = session_ids(a.sessions);
    for s in &sessions {
        rec.record(open_event(s));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(rec.flush()).unwrap();
    let (imports0, imported0) = (
        probe.imports.load(Ordering::Relaxed),
        probe.imported.load(Ordering::Relaxed),
    );
    std::thread::Builder::new()
        .name("appender".into())
        .spawn({
            let rec = rec.clone();
            let (qps, seconds) = (a.qps, a.seconds);
            move || {
                let before = thread_cpu();
                let start = Instant::now();
                let total = qps * seconds;
                for q in 0..total {
                    let due = start + Duration::from_secs_f64(q as f64 / qps as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let s = &sessions[q as usize % sessions.len()];
                    let n = q / sessions.len() as u64 + 1;
                    rec.append(&[command(s, n)]).unwrap();
                    rec.record(result(s, n));
                }
                let after = thread_cpu();
                let own = cpu_of(&after, "appender").saturating_sub(cpu_of(&before, "appender"));
                eprintln!(
                    "offered {total} queries in {:.2} s",
                    start.elapsed().as_secs_f64()
                );
                own
            }
        })
        .unwrap()
        .join()
        .map(|own| {
            rt.block_on(rec.flush()).unwrap();
            let snap = thread_cpu();
            let per_k = |d: Duration| d.as_secs_f64() * 1e3 / (a.qps * a.seconds) as f64 * 1e3;
            let imports = probe.imports.load(Ordering::Relaxed) - imports0;
            let imported = probe.imported.load(Ordering::Relaxed) - imported0;
            let st = rec.stats();
            println!(
                "paced {} q/s x {} s, {} sessions, {}: CPU ms per 1000 queries: appender {:.1}, importer {:.1}, fsync {:.1}; {} import transactions ({:.0} events each), {} journal fsyncs",
                a.qps,
                a.seconds,
                a.sessions,
                if a.fsync { "fsync" } else { "written" },
                per_k(own),
                per_k(cpu_of(&snap, "tollgate-record")),
                per_k(cpu_of(&snap, "tollgate-fsync")),
                imports,
                imported as f64 / imports.max(1) as f64,
                st.fsyncs,
            );
        })
        .unwrap();
    rec.shutdown();
    let r = sqlite.verify().unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!(r.events, a.qps * a.seconds * 2 + a.sessions as u64);
}

fn fixed(a: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe {
        inner: None,
        imports: AtomicU64::new(0),
        imported: AtomicU64::new(0),
        collected: Mutex::new(Vec::new()),
    });
    let rec = Recorder::start(
        probe.clone(),
        "gw-0123456789abcdef".into(),
        RecorderOptions {
            journal: dir.path().join("a.db.events.log"),
            stall_limit: Duration::from_secs(600),
            durability: Durability::Written,
        },
    )
    .unwrap();
    let sessions = session_ids(a.sessions);
    let inputs: Vec<(EventInput, EventInput)> = (0..a.queries)
        .map(|q| {
            let s = &sessions[q as usize % sessions.len()];
            let n = q / sessions.len() as u64 + 1;
            (command(s, n), result(s, n))
        })
        .collect();
    for s in &sessions {
        rec.record(open_event(s));
    }
    let started = Instant::now();
    for (c, r) in &inputs {
        rec.append(std::slice::from_ref(c)).unwrap();
        rec.record(r.clone());
    }
    let journaled = started.elapsed();
    rec.shutdown();
    let mut events = std::mem::take(&mut *probe.collected.lock().unwrap());
    events.sort_by_key(|e| e.chain_seq);
    assert_eq!(events.len() as u64, a.queries * 2 + a.sessions as u64);

    let store = SqliteStore::open(dir.path().join("b.db")).unwrap();
    let started = Instant::now();
    for batch in events.chunks(a.batch.max(1)) {
        store.import(batch).unwrap();
    }
    let imported = started.elapsed();
    let r = store.verify().unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!(r.events, events.len() as u64);
    let per_q = |d: Duration| d.as_secs_f64() * 1e6 / a.queries as f64;
    println!(
        "fixed {} queries, {} sessions: journal {:.2} µs/query (wall), import in batches of {} {:.2} µs/query (wall)",
        a.queries,
        a.sessions,
        per_q(journaled),
        a.batch,
        per_q(imported),
    );
}

fn main() {
    let a = parse_args();
    match a.mode.as_str() {
        "fixed" => fixed(&a),
        _ => paced(&a),
    }
}
