//! How fast the SQLite store imports audit events (what the recorder's importer thread does
//! under load): gateway-shaped command/result pairs from 8 sessions, imported in batches as the
//! importer does, into a fresh on-disk store. Prints microseconds of CPU per event (the
//! importer's cost per proxied query is about twice that: a command and a result event).
//!
//! `cargo run --release -p tollgate-store --example import_bench [events] [batch]`

use std::time::Instant;
use tollgate_store::{event_hash, HashedEvent, HashedFields, SqliteStore, Store, GENESIS_HASH};

fn main() {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("audit.db")).expect("open the store");
    let sessions: Vec<String> = (0..8).map(|i| format!("01a215fb7{i:015x}")).collect();
    let chain = "gw-e69cf4e86d516451".to_string();
    let mut prev = GENESIS_HASH.to_string();
    let mut events = Vec::with_capacity(total);
    let mut seqs = vec![0i64; sessions.len()];
    for i in 0..total {
        let s = i / 2 % sessions.len();
        seqs[s] += 1;
        let n = (seqs[s] + 1) / 2;
        let (kind, payload) = if i % 2 == 0 {
            ("command", format!("{{\"n\":{n},\"protocol\":\"simple\",\"t_us\":{},\"text\":\"SELECT abalance FROM pgbench_accounts WHERE aid = {};\"}}", i * 50, i * 7919 % 1_000_000))
        } else {
            ("result", format!("{{\"duration_us\":129,\"n\":{n},\"outcome\":\"ok\",\"rows\":1,\"sqlstate\":null,\"t_us\":{},\"tag\":\"SELECT\"}}", i * 50 + 40))
        };
        let fields = HashedFields {
            chain_id: &chain,
            chain_seq: i as i64 + 1,
            session_id: &sessions[s],
            session_seq: seqs[s],
            at_unix_ms: 1_795_665_134_557 + i as i64 / 40,
            kind,
            payload: payload.as_bytes(),
        };
        let hash = event_hash(&prev, &fields);
        events.push(HashedEvent {
            chain_id: chain.clone(),
            chain_seq: fields.chain_seq,
            session_id: sessions[s].clone(),
            session_seq: seqs[s],
            at_unix_ms: fields.at_unix_ms,
            kind: kind.into(),
            payload,
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
        });
    }
    let cpu = || {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct we own.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    let (wall, c0) = (Instant::now(), cpu());
    for chunk in events.chunks(batch) {
        store.import(chunk).expect("import");
    }
    let (secs, used) = (wall.elapsed().as_secs_f64(), cpu() - c0);
    println!(
        "{total} events in batches of {batch}: {:.2} µs CPU/event, {:.0} events/s wall, db {:.1} MB",
        used * 1e6 / total as f64,
        total as f64 / secs,
        std::fs::metadata(dir.path().join("audit.db")).map_or(0.0, |m| m.len() as f64 / 1e6)
            + std::fs::metadata(dir.path().join("audit.db-wal")).map_or(0.0, |m| m.len() as f64 / 1e6)
    );
}
