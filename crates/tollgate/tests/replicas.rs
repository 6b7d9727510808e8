//! Two `tollgate serve` replicas on one PostgreSQL store (a throwaway TLS cluster, verify-full,
//! password from a file): a DELETE held on replica A (psql through A) runs when a reviewer
//! approves it through replica B's API; both replicas' audit chains land in the shared store
//! and `audit verify` checks them; `/readyz` turns 503 when the store goes away.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tollgate_testsupport::{ClusterOptions, PgCluster};
use tollgate_tls::pki::IssuedFiles;

struct Replica {
    gw: Gateway,
    https: u16,
    _dir: tempfile::TempDir,
}

struct Fleet {
    a: Replica,
    b: Replica,
    app: PgCluster,
    store: PgCluster,
    pki: Pki,
    alice: IssuedFiles,
    bob: IssuedFiles,
    _tmp: tempfile::TempDir,
}

fn start_replica(config: &str, tmp: &Path) -> Replica {
    let dir = tempfile::Builder::new()
        .prefix("replica-")
        .tempdir_in(tmp)
        .unwrap();
    let https = tollgate_testsupport::free_port();
    let gw = Gateway::start(
        dir.path(),
        &config.replace("{https_port}", &https.to_string()),
        &[],
    );
    Replica {
        gw,
        https,
        _dir: dir,
    }
}

fn start() -> Fleet {
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-replicas-")
        .tempdir()
        .unwrap();
    let app = PgCluster::start(ClusterOptions {
        init_sql: vec![
            "CREATE TABLE items (id int PRIMARY KEY, name text)".into(),
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g".into(),
        ],
        ..Default::default()
    })
    .expect("start the resource PostgreSQL");
    let store = PgCluster::start(ClusterOptions {
        user: "tollgate_store".into(),
        database: "tollgate".into(),
        ..Default::default()
    })
    .expect("start the store PostgreSQL");
    let pki = Pki::new(&tmp.path().join("pki"));
    let gw_cert = pki.server("gateway");
    let alice = pki.client("alice", &["sre"]);
    let bob = pki.client("bob", &["ci"]);
    let app_pw = tmp.path().join("app.password");
    std::fs::write(&app_pw, &app.password).unwrap();
    let store_pw = tmp.path().join("store.password");
    std::fs::write(&store_pw, &store.password).unwrap();
    let store_url = format!(
        "postgres://{}@localhost:{}/{}?sslrootcert={}&password_file={}",
        store.user,
        store.port,
        store.database,
        store.ca_cert.display(),
        store_pw.display()
    );
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{{https_port}}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "{store_url}"

[roles]
admin_groups = []
auditor_groups = ["sre"]

[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:{up_port}"
database = "{db}"
allow_groups = ["sre", "ci"]
review_timeout = "20s"
[[resources.rules]]
name = "agent-deletes"
statements = ["delete"]
groups = ["ci"]
action = "review"
approvers = ["sre"]
[resources.tls]
mode = "verify-full"
ca = "{app_ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "{app_pw}"
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
        up_port = app.port,
        db = app.database,
        app_ca = app.ca_cert.display(),
        user = app.user,
        app_pw = app_pw.display(),
    );
    let a = start_replica(&config, tmp.path());
    let b = start_replica(&config, tmp.path());
    Fleet {
        a,
        b,
        app,
        store,
        pki,
        alice,
        bob,
        _tmp: tmp,
    }
}

impl Fleet {
    fn conninfo(&self, r: &Replica, who: &IssuedFiles) -> String {
        format!(
            "host=localhost port={} dbname=app user={} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            r.gw.pg_port,
            who.cert.file_stem().unwrap().to_string_lossy(),
            self.pki.ca.display(),
            who.cert.display(),
            who.key.display()
        )
    }

    fn psql_bg(&self, r: &Replica, who: &IssuedFiles, sql: &str) -> Child {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(self.conninfo(r, who))
            .args(["-c", sql])
            .env_remove("PGPASSWORD")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn reviews(&self, r: &Replica, who: &IssuedFiles, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("reviews")
            .args(args)
            .env("TOLLGATE_GATEWAY", format!("https://localhost:{}", r.https))
            .env("TOLLGATE_CA", &self.pki.ca)
            .arg("--cert")
            .arg(&who.cert)
            .arg("--key")
            .arg(&who.key)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run tollgate reviews")
    }

    fn items(&self) -> i64 {
        self.app
            .psql("SELECT count(*) FROM items")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

#[test]
fn a_statement_held_on_one_replica_runs_when_approved_through_another() {
    let f = start();
    // bob's DELETE through replica A waits for a review.
    let child = f.psql_bg(
        &f.a,
        &f.bob,
        "DELETE FROM items WHERE id <= 3 RETURNING (extract(epoch from clock_timestamp()) * 1000)::bigint",
    );
    // Replica B lists it: the review lives in the shared store.
    let deadline = Instant::now() + Duration::from_secs(20);
    let review = loop {
        let out = f.reviews(&f.b, &f.alice, &["list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let found = list["reviews"].as_array().and_then(|l| {
            l.iter()
                .find(|r| {
                    r["statement"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("DELETE"))
                })
                .cloned()
        });
        if let Some(r) = found {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "replica B never saw the review: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let id = review["id"].as_str().unwrap().to_string();
    assert_eq!(review["status"], "pending");
    assert_eq!(f.items(), 10, "nothing ran while held");

    // alice approves through replica B; the statement held on A runs.
    let out = f.reviews(
        &f.b,
        &f.alice,
        &["approve", &id, "--reason", "ok", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let decided: Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("DELETE 3"), "{text}");
    assert!(
        stderr(&out).contains(&id),
        "the NOTICE names the review: {}",
        stderr(&out)
    );
    assert_eq!(f.items(), 7);
    // Approval on B to execution on A, by the database's clock: reported, not asserted.
    let executed_ms: i64 = text.lines().next().unwrap().trim().parse().unwrap();
    let approved_ms = decided["decided_at_unix_ms"].as_i64().unwrap();
    eprintln!(
        "cross-replica approval-to-execution: {} ms (review {id})",
        executed_ms - approved_ms
    );
    // A's review shows the decision made on B.
    let out = f.reviews(&f.a, &f.alice, &["show", &id, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "approved", "{shown}");

    // Both replicas' chains are in the store; `audit verify` (run from either config) checks
    // them all. A's chain holds the session and its command events.
    let deadline = Instant::now() + Duration::from_secs(20);
    let chains: Vec<String> = loop {
        let out = f
            .store
            .psql("SELECT chain_id FROM chains WHERE chain_id LIKE 'gw-%' ORDER BY 1")
            .unwrap();
        let chains: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
        let commands = f
            .store
            .psql("SELECT count(*) FROM events WHERE kind = 'command' AND payload LIKE '%DELETE FROM items%'")
            .unwrap();
        if chains.len() >= 2 && commands.trim() != "0" {
            break chains;
        }
        assert!(
            Instant::now() < deadline,
            "chains {chains:?}, command events {commands}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(chains.len(), 2, "one chain per replica: {chains:?}");
    for r in [&f.a, &f.b] {
        let out = Command::new(BIN)
            .args(["audit", "verify", "--json", "--config"])
            .arg(&r.gw.config_path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(report["chains"].as_u64().unwrap() >= 2, "{report}");
        assert!(report["first_break"].is_null(), "{report}");
    }
    // No replica logged the store password.
    for r in [&f.a, &f.b] {
        assert!(!r.gw.logs().contains(&f.store.password));
    }
}

#[test]
fn readyz_reports_an_unreachable_store() {
    let mut f = start();
    assert!(matches!(f.a.gw.http_get("/readyz"), Some((200, _))));
    f.store.stop();
    wait_for(
        Duration::from_secs(30),
        "replica A not ready",
        || matches!(f.a.gw.http_get("/readyz"), Some((503, body)) if body.contains("audit store is unreachable")),
    );
    // A statement through a replica whose store is gone is refused, not run unrecorded, once
    // the audit timeout has passed; here only readiness is checked, which the load balancer uses.
    assert!(matches!(f.b.gw.http_get("/readyz"), Some((503, _))));
}

/// `tollgate store migrate`: a gateway's SQLite trail moves into a PostgreSQL store with its
/// chains intact (`audit verify` passes before and after, with the same events).
#[test]
fn store_migrate_moves_a_sqlite_trail_with_its_chains() {
    let mut env = Env::start();
    for sql in ["SELECT 1", "SELECT 2"] {
        let out = env.psql(&env.conninfo("app"), &["-c", sql]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    env.events_after_closes(2);
    env.gw.kill();
    let out = Command::new(BIN)
        .args(["audit", "verify", "--json", "--config"])
        .arg(&env.gw.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let before: Value = serde_json::from_slice(&out.stdout).unwrap();

    let store = PgCluster::start(ClusterOptions {
        user: "tollgate_store".into(),
        database: "tollgate".into(),
        ..Default::default()
    })
    .expect("start the store PostgreSQL");
    let pw = env.tmp.path().join("store.password");
    std::fs::write(&pw, &store.password).unwrap();
    let url = format!(
        "postgres://{}@localhost:{}/{}?sslrootcert={}&password_file={}",
        store.user,
        store.port,
        store.database,
        store.ca_cert.display(),
        pw.display()
    );
    let from = format!("sqlite://{}", env.tmp.path().join("audit.db").display());
    let out = Command::new(BIN)
        .args(["store", "migrate", "--json", "--from", &from, "--to", &url])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["after"]["events"], before["events"], "{doc}");
    assert_eq!(doc["after"]["chains"], before["chains"], "{doc}");
    assert!(doc["after"]["first_break"].is_null(), "{doc}");
    let commands = store
        .psql("SELECT count(*) FROM events WHERE kind = 'command'")
        .unwrap();
    assert!(commands.trim().parse::<i64>().unwrap() >= 2, "{commands}");
    assert!(!stdout(&out).contains(&store.password));

    // Migrating again into the now non-empty store is refused and changes nothing.
    let out = Command::new(BIN)
        .args(["store", "migrate", "--from", &from, "--to", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("migrate into an empty store"),
        "{}",
        stderr(&out)
    );
}
