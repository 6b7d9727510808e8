//! Microseconds per classification and per decision, parsed every time and through the cache.
//!
//! `cargo run --release -p tollgate-policy --example classify_bench [iterations]`
//! Prints the cost per call and the cached/uncached ratio measured in the same run, and the
//! share of a parse that the depth pre-scan (tollgate_policy::nesting_depth) costs.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;
use tollgate_policy::{classify, nesting_depth, Caller, ResourcePolicy, MAX_DEPTH};

const PGBENCH: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const FIVE: &str = "BEGIN; \
    UPDATE pgbench_accounts SET abalance = abalance + 10 WHERE aid = 42; \
    SELECT abalance FROM pgbench_accounts WHERE aid = 42; \
    INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 42, 10, CURRENT_TIMESTAMP); \
    END;";

const CONFIG: &str = r#"[server]
tls_cert = "c"
tls_key = "k"
[[resources]]
name = "bench"
kind = "postgres"
upstream = "db:5432"
[resources.tls]
ca = "ca"
[resources.credentials]
user = "u"
[[resources.rules]]
statements = ["ddl"]
action = "deny"
[[resources.rules]]
statements = ["delete", "update"]
where_missing = true
action = "deny"
[[resources.rules]]
statements = ["write"]
groups = ["agents"]
action = "review"
"#;

fn per_call(iterations: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iterations / 10 + 1 {
        f();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let config = tollgate_config::parse(CONFIG, Path::new("/bench.toml")).expect("config");
    let policy = ResourcePolicy::from_config(&config.resources[0]).expect("policy");
    let groups = vec!["dev".to_string()];
    let who = Caller {
        subject: "bench",
        groups: &groups,
    };
    let now = time::OffsetDateTime::now_utc();

    println!("{iterations} iterations each; µs per call");
    for (label, sql) in [("pgbench select", PGBENCH), ("5 statements", FIVE)] {
        let parse = per_call(iterations, || {
            black_box(classify(black_box(sql)));
        });
        let cached = per_call(iterations, || {
            black_box(policy.classify(black_box(sql)));
        });
        let mut session = policy.session();
        let decide = per_call(iterations, || {
            black_box(session.decide_query(black_box(sql), &who, now));
        });
        println!(
            "{label:>15}: classify {parse:8.2}  cached {cached:6.3}  decide_query (cached) {decide:6.3}  parse/cached {:.0}x",
            parse / cached
        );
    }
    // The depth pre-scan that runs before every parse of a text longer than 128 bytes.
    let long = format!(
        "SELECT * FROM pgbench_accounts WHERE aid IN ({})",
        (0..800)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (label, sql) in [("5 statements", FIVE), ("4 KiB IN list", long.as_str())] {
        let parse = per_call(iterations / 10, || {
            black_box(classify(black_box(sql)));
        });
        let scan = per_call(iterations, || {
            black_box(nesting_depth(black_box(sql.as_bytes()), MAX_DEPTH));
        });
        println!(
            "{label:>15}: depth pre-scan {scan:8.3} of classify {parse:8.2} ({:.2} %, {} bytes)",
            scan / parse * 100.0,
            sql.len()
        );
    }
    // Distinct texts each time (simple-protocol pgbench inlines literals): every call parses.
    let mut i = 0u64;
    let mut session = policy.session();
    let distinct = per_call(iterations, || {
        i += 1;
        let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}");
        black_box(session.decide_query(&sql, &who, now));
    });
    println!(
        "{:>15}: decide_query {distinct:8.2} (cache miss every time)",
        "distinct texts"
    );
}
