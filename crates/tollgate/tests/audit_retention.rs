//! Retention, checkpoints, strict durability and the no-recording baseline, through the real
//! gateway: sessions that ended before the retention are pruned by the gateway itself (an open
//! one is not), the chain still verifies and the prune is on record; checkpoints are logged and
//! recorded; a prefix deleted by hand is reported; `record_commands = false` keeps only session
//! events and fails `tollgate check`.

mod common;
use common::*;

use std::process::Command;

fn tollgate(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// The log without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn sql(db: &std::path::Path, statement: &str) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.execute(sys.argv[2])\nc.commit()",
        ])
        .arg(db)
        .arg(statement)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_prunes_expired_sessions_keeps_open_ones_and_verify_holds() {
    let mut env = Env::start_with(EnvOptions {
        server_extra:
            "retention = \"3s\"\ncheckpoint_interval = \"300ms\"\naudit_durability = \"fsync\""
                .into(),
        ..EnvOptions::default()
    });
    for q in ["SELECT 'short-1'", "SELECT 'short-2'"] {
        let out = env.psql(&env.conninfo("app"), &["-c", q]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    env.events_after_closes(2);
    // A session that stays open for the whole test, started after the two short ones.
    let open = env.client_as(&env.alice, "app").await;
    open.simple_query("SELECT 'long-lived'").await.unwrap();

    // The gateway prunes on its own (every second with this retention), in several steps.
    let pruned_sessions = |evs: &[serde_json::Value]| -> u64 {
        evs.iter()
            .filter(|e| e["kind"] == "audit.pruned")
            .filter_map(|e| e["payload"]["sessions"].as_u64())
            .sum()
    };
    let evs = env.events_until("audit.pruned events for the two short sessions", |evs| {
        pruned_sessions(evs) >= 2
    });
    let texts: Vec<&str> = evs
        .iter()
        .filter(|e| e["kind"] == "command")
        .filter_map(|e| e["payload"]["text"].as_str())
        .collect();
    assert!(!texts.iter().any(|t| t.contains("short-")), "{texts:?}");
    assert!(
        texts.contains(&"SELECT 'long-lived'"),
        "the open session is kept: {texts:?}"
    );
    assert_eq!(pruned_sessions(&evs), 2, "only the two short sessions");
    let pruned = evs.iter().rfind(|e| e["kind"] == "audit.pruned").unwrap();
    assert!(
        pruned["payload"]["anchors"][0]["hash"].is_string(),
        "{pruned}"
    );
    assert!(pruned["payload"]["cutoff_unix_ms"].is_i64(), "{pruned}");
    assert!(evs.iter().any(|e| e["kind"] == "audit.checkpoint"));

    // Checkpoints: logged on one line with the digest, recorded, and checked by verify.
    let logs = strip_ansi(&env.gw.logs());
    let line = logs
        .lines()
        .find(|l| l.contains("audit checkpoint") && !l.contains("chains=0"))
        .unwrap_or_else(|| panic!("no checkpoint log line with a chain:\n{logs}"));
    assert!(
        line.contains(" digest=") && line.contains(" heads="),
        "{line}"
    );
    assert!(line.contains("gw-"), "{line}");
    let out = tollgate(&["audit", "verify", "--json"], &env.gw.config_path);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["checkpoints"].as_u64().unwrap() >= 1, "{report}");

    // Strict durability: every command waited for an fsync.
    assert!(env.gw.metric("tollgate_audit_fsyncs_total").unwrap() >= 1);

    // By hand: nothing more to prune while the long session is open.
    let out = tollgate(&["audit", "prune", "--dry-run"], &env.gw.config_path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("would prune "), "{}", stdout(&out));
    drop(open);
    env.gw.kill();

    // Once the gateway is gone and its chain silent for the retention, `audit prune` by hand
    // takes the rest (the long session too: its gateway can no longer close it).
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let out = tollgate(&["audit", "prune"], &env.gw.config_path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("pruned 1 session(s)"),
        "{}",
        stdout(&out)
    );
    let out = tollgate(&["audit", "verify"], &env.gw.config_path);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    // Deleting old events by SQL, without a recorded prune, is reported.
    let db = env.tmp.path().join("audit.db");
    sql(
        &db,
        "DELETE FROM events WHERE chain_id = 'audit-prune' AND chain_seq = 1",
    );
    let out = tollgate(&["audit", "verify"], &env.gw.config_path);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("gap: chain_seq 1 missing (event deleted)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn record_commands_false_keeps_only_session_events_and_fails_check() {
    let env = Env::start_with(EnvOptions {
        server_extra: "record_commands = false".into(),
        ..EnvOptions::default()
    });
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 'not recorded'"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("not recorded"));
    let evs = env.events_after_closes(1);
    let kinds: Vec<&str> = evs
        .iter()
        .filter(|e| !e["kind"].as_str().unwrap_or("").starts_with("audit."))
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["session.open", "session.close"], "{evs:#?}");
    assert!(
        env.gw
            .logs()
            .contains("COMMANDS AND RESULTS ARE NOT RECORDED"),
        "{}",
        env.gw.logs()
    );
    let out = tollgate(&["check"], &env.gw.config_path);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.contains("commands_not_recorded") && l.contains("server.record_commands")),
        "{}",
        stdout(&out)
    );
}
