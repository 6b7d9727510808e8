//! The audit trail's crash guarantee, end to end: a `kill -9` of the gateway under load loses no
//! event of a command that reached the database. PostgreSQL's own statement log
//! (`log_statement = 'all'`) is the witness of what reached the database; the restarted
//! gateway's audit store (after it has imported the journal left by the killed process) must
//! hold a `command` event for every statement in it.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_testsupport::ClusterOptions;

/// Concurrent client connections through the gateway.
const CLIENTS: usize = 4;
/// Concurrent (pipelined) tasks per connection, so that one read by the gateway often holds
/// several commands and is journaled with one append.
const TASKS_PER_CLIENT: usize = 3;
/// Load runs at least this long before the kill...
const MIN_LOAD: Duration = Duration::from_millis(1500);
/// ...and until at least this many statements have been answered (a loaded machine is slow).
const MIN_ANSWERED: u64 = 400;

/// Tags in the `text` of the audit store's `command` events.
fn audited_tags(evs: &[serde_json::Value]) -> BTreeSet<String> {
    let mut tags = BTreeSet::new();
    for e in evs.iter().filter(|e| e["kind"] == "command") {
        if let Some(text) = e["payload"]["text"].as_str() {
            tags_in(text, &mut tags);
        }
    }
    tags
}

/// One load task: distinct tagged statements, alternating simple and extended protocol, until
/// the connection fails (the gateway is killed) or `stop` is set. Returns the tags whose answer
/// the client received, and why it stopped.
async fn load(
    client: Arc<tokio_postgres::Client>,
    c: usize,
    t: usize,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> (Vec<String>, String) {
    let mut acked = Vec::new();
    for i in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return (acked, "stopped".into());
        }
        let (tag, r) = if i % 3 == 2 {
            let tag = format!("tg-{c}-{t}-{i}-e");
            let sql = format!("SELECT '{tag}'::text AS tag, $1::int4 AS i");
            let r = client
                .query(sql.as_str(), &[&((i % 1_000_000) as i32)])
                .await
                .map(|_| ());
            (tag, r)
        } else {
            let tag = format!("tg-{c}-{t}-{i}-s");
            let r = client
                .simple_query(&format!("SELECT '{tag}'"))
                .await
                .map(|_| ());
            (tag, r)
        };
        match r {
            Ok(()) => {
                acked.push(tag);
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return (acked, e.to_string()),
        }
    }
    unreachable!()
}

fn count_backends(env: &Env) -> Option<i64> {
    let out = psql_env(
        &env.direct_conninfo(),
        &[
            "-c",
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        ],
        &[("PGPASSWORD", env.pg.password.as_str())],
    );
    if !out.status.success() {
        return None;
    }
    stdout(&out).parse().ok()
}

#[test]
fn sigkill_under_load_loses_no_event_of_a_command_that_reached_the_database() {
    let started = Instant::now();
    let mut env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            extra_conf: vec![
                "log_statement = 'all'".into(),
                "log_line_prefix = '%m [%p] %a '".into(),
            ],
            ..ClusterOptions::default()
        },
        ..EnvOptions::default()
    });
    let pg_log = env.pg.log_path();
    let db = env.tmp.path().join("audit.db");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // ---- load
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    rt.block_on(async {
        for c in 0..CLIENTS {
            let client = Arc::new(env.client().await);
            for t in 0..TASKS_PER_CLIENT {
                tasks.push(tokio::spawn(load(
                    client.clone(),
                    c,
                    t,
                    stop.clone(),
                    answered.clone(),
                )));
            }
        }
    });
    let load_start = Instant::now();
    let deadline = load_start + Duration::from_secs(120);
    while load_start.elapsed() < MIN_LOAD || answered.load(Ordering::Relaxed) < MIN_ANSWERED {
        assert!(
            Instant::now() < deadline,
            "the load never reached {MIN_ANSWERED} answered statements (got {})",
            answered.load(Ordering::Relaxed)
        );
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "a load task ended before the kill; gateway log:\n{}",
            env.gw.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // ---- kill -9 under load
    let old_pid = env.gw.pid();
    env.gw.kill();
    let answered_at_kill = answered.load(Ordering::Relaxed);
    let killed_log = env.gw.logs();
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    let mut why_stopped = BTreeSet::new();
    rt.block_on(async {
        for t in tasks {
            let (tags, why) = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a load task did not end within 60 s of the kill")
                .expect("load task panicked");
            acked.extend(tags);
            why_stopped.insert(why);
        }
    });
    drop(rt);

    // Backends may still execute what the dead gateway had already forwarded (it is in their
    // socket buffers); wait until they have all gone so the statement log is complete.
    wait_for(
        Duration::from_secs(60),
        "PostgreSQL backends of the killed gateway to exit",
        || count_backends(&env) == Some(0),
    );
    let log_text = std::fs::read_to_string(&pg_log)
        .unwrap_or_else(|e| panic!("read PostgreSQL log {}: {e}", pg_log.display()));
    let in_pg = pg_logged_tags(&log_text);

    // The matching must work (no vacuous pass): every statement a client got an answer for was
    // executed, so PostgreSQL must have logged it.
    assert!(
        acked.len() as u64 >= MIN_ANSWERED,
        "only {} statements were answered",
        acked.len()
    );
    let acked_not_logged: Vec<_> = acked.difference(&in_pg).collect();
    assert!(
        acked_not_logged.is_empty(),
        "{} answered statements are not in PostgreSQL's log {} (is log_statement on? matching \
         broken?), e.g. {:?}; tags in log: {}",
        acked_not_logged.len(),
        pg_log.display(),
        &acked_not_logged[..acked_not_logged.len().min(10)],
        in_pg.len()
    );

    // ---- restart on the same config (ports as placeholders; Gateway::start picks new ones)
    let config = env.gw.config_template();
    let restart_at = Instant::now();
    env.gw = Gateway::start(env.tmp.path(), &config, &[]);
    let restart_took = restart_at.elapsed();
    let restarted_log = env.gw.logs();
    let imported_on_start =
        restarted_log.contains("imported audit events left by a previous gateway process");

    // The restart imports the killed process's journal before it is ready; poll a little in
    // case an import runs late, but the assertion below is about content, not timing.
    let mut evs = read_events(&db);
    let mut audited = audited_tags(&evs);
    let poll_deadline = Instant::now() + Duration::from_secs(20);
    while !in_pg.is_subset(&audited) && Instant::now() < poll_deadline {
        std::thread::sleep(Duration::from_millis(200));
        evs = read_events(&db);
        audited = audited_tags(&evs);
    }
    let missing: Vec<_> = in_pg.difference(&audited).collect();
    let recorded_not_executed = audited.difference(&in_pg).count();
    let summary = format!(
        "answered before kill: {answered_at_kill} (total acked {}), executed per PostgreSQL's \
         log: {}, command tags in audit store: {}, recorded but not in PostgreSQL's log \
         (allowed): {recorded_not_executed}, missing from the audit record: {}; events in \
         store: {}; journal imported at restart (log line seen): {imported_on_start}; \
         restart took {restart_took:?}; killed pid {old_pid}; load tasks stopped with: \
         {why_stopped:?}",
        acked.len(),
        in_pg.len(),
        audited.len(),
        missing.len(),
        evs.len(),
    );
    eprintln!("audit_crash: {summary}");
    assert!(
        missing.is_empty(),
        "statements PostgreSQL executed have no command event after kill -9 + restart: {:?}\n\
         {summary}\n--- killed gateway's log:\n{killed_log}\n--- restarted gateway's log:\n{restarted_log}",
        &missing[..missing.len().min(20)]
    );
    assert!(!audited.is_empty() && !in_pg.is_empty(), "{summary}");

    // The restarted store, journal import included, is a valid hash chain.
    let out = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&env.gw.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify failed ({}):\n{}\n{}\n{summary}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("audit_crash: total {:?}", started.elapsed());
}
