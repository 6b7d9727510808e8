//! Two `tollgate serve` replicas on one PostgreSQL store (a throwaway TLS cluster, verify-full,
//! password from a file): a DELETE held on replica A (psql through A) runs when a reviewer
//! approves it through replica B's API; both replicas' audit chains land in the shared store
//! and `audit verify` checks them; `/readyz` turns 503 when the store goes away.

mod common;

use common::idp::{Browsed, Consent, Idp};
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
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
    replicas: Vec<Replica>,
    app: PgCluster,
    store: PgCluster,
    pki: Pki,
    alice: IssuedFiles,
    bob: IssuedFiles,
    _tmp: tempfile::TempDir,
}

fn start_replica(config: &str, tmp: &Path, https: u16) -> Replica {
    let dir = tempfile::Builder::new()
        .prefix("replica-")
        .tempdir_in(tmp)
        .unwrap();
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

/// What differs between the fleets of the tests below.
struct FleetOptions {
    replicas: usize,
    /// Lines added to `[server]`.
    server_extra: &'static str,
    /// Lines added to the resource PostgreSQL's configuration.
    app_conf: Vec<String>,
    /// Appended to the configuration (tables after the resource).
    tail: String,
    /// The replicas' `https_listen` ports, in order (free ports past the list).
    https_ports: Vec<u16>,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            replicas: 2,
            server_extra: "",
            app_conf: Vec::new(),
            tail: String::new(),
            https_ports: Vec::new(),
        }
    }
}

/// The resource logs every statement it executes: the witness of what reached it.
fn log_statements() -> Vec<String> {
    vec![
        "log_statement = 'all'".into(),
        "log_line_prefix = '%m [%p] %a '".into(),
    ]
}

fn start() -> Fleet {
    start_with(FleetOptions::default())
}

fn start_with(opts: FleetOptions) -> Fleet {
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-replicas-")
        .tempdir()
        .unwrap();
    let app = PgCluster::start(ClusterOptions {
        init_sql: vec![
            "CREATE TABLE items (id int PRIMARY KEY, name text)".into(),
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g".into(),
        ],
        extra_conf: opts.app_conf,
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
issuing_ca_cert = "{ca}"
issuing_ca_key = "{ca_key}"
store = "{store_url}"
{server_extra}
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
{tail}"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
        ca_key = pki.dir.join("ca.key").display(),
        up_port = app.port,
        db = app.database,
        app_ca = app.ca_cert.display(),
        user = app.user,
        app_pw = app_pw.display(),
        server_extra = opts.server_extra,
        tail = opts.tail,
    );
    let replicas = (0..opts.replicas)
        .map(|n| {
            let https = opts
                .https_ports
                .get(n)
                .copied()
                .unwrap_or_else(tollgate_testsupport::free_port);
            start_replica(&config, tmp.path(), https)
        })
        .collect();
    Fleet {
        replicas,
        app,
        store,
        pki,
        alice,
        bob,
        _tmp: tmp,
    }
}

impl Fleet {
    fn a(&self) -> &Replica {
        &self.replicas[0]
    }

    fn b(&self) -> &Replica {
        &self.replicas[1]
    }

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

    fn psql(&self, r: &Replica, who: &IssuedFiles, sql: &str) -> Output {
        self.psql_bg(r, who, sql).wait_with_output().unwrap()
    }

    /// Tags in the `command` events of the shared store.
    fn stored_command_tags(&self) -> BTreeSet<String> {
        let out = self
            .store
            .psql("SELECT payload FROM events WHERE kind = 'command'")
            .unwrap();
        let mut tags = BTreeSet::new();
        tags_in(&out, &mut tags);
        tags
    }

    /// Events of the chains named in an `audit import --json` report.
    fn stored_events_of(&self, import: &Value) -> i64 {
        let chains: Vec<String> = import["chains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("'{}'", c["chain_id"].as_str().unwrap()))
            .collect();
        assert!(!chains.is_empty(), "{import}");
        let out = self
            .store
            .psql(&format!(
                "SELECT count(*) FROM events WHERE chain_id IN ({})",
                chains.join(", ")
            ))
            .unwrap();
        out.trim().parse().unwrap()
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

    /// `sql` (a DELETE returning the database's clock at execution, in ms) as bob through
    /// replica A, held for review; once replica B lists the review, alice approves it through
    /// B. The review id, psql's output and the milliseconds from the approval (B's record of it)
    /// to the execution.
    fn approve_held_through_b(&self, sql: &str) -> (String, Output, i64) {
        let before = self.items();
        let child = self.psql_bg(self.a(), &self.bob, sql);
        let review = self.pending_delete_on_b();
        let id = review["id"].as_str().unwrap().to_string();
        assert_eq!(self.items(), before, "nothing ran while held");
        let out = self.reviews(
            self.b(),
            &self.alice,
            &["approve", &id, "--reason", "ok", "--json"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let decided: Value = serde_json::from_slice(&out.stdout).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(before > self.items(), "the approved statement ran");
        let executed_ms: i64 = stdout(&out).lines().next().unwrap().trim().parse().unwrap();
        let approved_ms = decided["decided_at_unix_ms"].as_i64().unwrap();
        (id, out, executed_ms - approved_ms)
    }

    /// The pending review of a DELETE, once replica B lists it.
    fn pending_delete_on_b(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.reviews(self.b(), &self.alice, &["list", "--json"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let list: Value = serde_json::from_slice(&out.stdout).unwrap();
            let found = list["reviews"].as_array().and_then(|l| {
                l.iter()
                    .find(|r| {
                        r["status"] == "pending"
                            && r["statement"]
                                .as_str()
                                .is_some_and(|s| s.starts_with("DELETE"))
                    })
                    .cloned()
            });
            if let Some(r) = found {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "replica B never saw the review: {list}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Replica `r`'s console as curl sees it.
    fn console(&self, r: &Replica) -> ConsoleCurl {
        ConsoleCurl {
            ca: self.pki.ca.clone(),
            origin: format!("https://localhost:{}", r.https),
        }
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

/// `tollgate audit verify --json` with `config`, which must pass; its report.
fn audit_verify(config: &Path) -> Value {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--json", "--config"])
        .arg(config)
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
    assert!(report["first_break"].is_null(), "{report}");
    report
}

#[test]
fn a_statement_held_on_one_replica_runs_when_approved_through_another() {
    let f = start();
    // bob's DELETE through replica A waits for a review; replica B lists it (the review lives
    // in the shared store); alice approves through B; the statement held on A runs.
    let (id, out, first_ms) = f.approve_held_through_b(
        "DELETE FROM items WHERE id <= 3 RETURNING (extract(epoch from clock_timestamp()) * 1000)::bigint",
    );
    assert!(stdout(&out).contains("DELETE 3"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&id),
        "the NOTICE names the review: {}",
        stderr(&out)
    );
    assert_eq!(f.items(), 7);
    // Approval on B to execution on A, by the database's clock: reported, not asserted.
    let mut took = vec![first_ms];
    for row in 4..=7 {
        let (_, out, ms) = f.approve_held_through_b(&format!(
            "DELETE FROM items WHERE id = {row} RETURNING (extract(epoch from clock_timestamp()) * 1000)::bigint"
        ));
        assert!(stdout(&out).contains("DELETE 1"), "{}", stdout(&out));
        took.push(ms);
    }
    assert_eq!(f.items(), 3);
    let mut sorted = took.clone();
    sorted.sort();
    eprintln!(
        "cross-replica approval-to-execution: median {} ms of {} approvals ({took:?} ms; review {id})",
        sorted[sorted.len() / 2],
        sorted.len()
    );
    // A's review shows the decision made on B.
    let out = f.reviews(f.a(), &f.alice, &["show", &id, "--json"]);
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
    for r in [f.a(), f.b()] {
        let report = audit_verify(&r.gw.config_path);
        assert!(report["chains"].as_u64().unwrap() >= 2, "{report}");
    }
    // No replica logged the store password.
    for r in [f.a(), f.b()] {
        assert!(!r.gw.logs().contains(&f.store.password));
    }
}

#[test]
fn readyz_reports_an_unreachable_store() {
    let audit_timeout = Duration::from_secs(2);
    let mut f = start_with(FleetOptions {
        server_extra: "audit_timeout = \"2s\"\n",
        ..Default::default()
    });
    assert!(matches!(f.a().gw.http_get("/readyz"), Some((200, _))));
    let out = f.psql(f.a(), &f.alice, "SELECT 'tg-before'");
    assert!(out.status.success(), "{}", stderr(&out));
    // Timed from before the stop: the store is gone somewhere inside it.
    let stopped = Instant::now();
    f.store.stop();
    // The journal takes commands while the store is away, until its oldest unshipped event is
    // older than audit_timeout; then statements are refused (fail closed), not run unrecorded.
    let mut answered = 0;
    let refused_after = loop {
        let out = f.psql(f.a(), &f.alice, "SELECT 'tg-while-away'");
        if !out.status.success() {
            assert!(
                stderr(&out).contains("could not record this command in the audit trail"),
                "{}",
                stderr(&out)
            );
            break stopped.elapsed();
        }
        answered += 1;
        assert!(
            stopped.elapsed() < audit_timeout + Duration::from_secs(10),
            "statements still run {:?} after the store went away",
            stopped.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "store stopped: {answered} statements answered from the journal, the first refused {refused_after:?} after the stop (audit_timeout {audit_timeout:?})"
    );
    // Not before audit_timeout, less what an event journaled just before the stop (shipped
    // every 50 ms, under load later) had already waited.
    assert!(
        refused_after + Duration::from_millis(250) >= audit_timeout,
        "{refused_after:?}"
    );
    wait_for(
        Duration::from_secs(30),
        "replica A not ready",
        || matches!(f.a().gw.http_get("/readyz"), Some((503, body)) if body.contains("audit store is unreachable")),
    );
    assert!(matches!(f.b().gw.http_get("/readyz"), Some((503, _))));
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

/// `audit_durability = "store"`: a command is answered only once its event is in the shared
/// store; with the store's PostgreSQL stopped, a statement is refused within `audit_timeout`
/// and never reaches the resource (its own statement log is the witness).
#[test]
fn with_store_durability_a_command_waits_for_the_shared_store_and_fails_closed_without_it() {
    let mut f = start_with(FleetOptions {
        replicas: 1,
        server_extra: "audit_durability = \"store\"\naudit_timeout = \"2s\"\n",
        app_conf: log_statements(),
        ..Default::default()
    });
    let audit_timeout = Duration::from_secs(2);
    let out = f.psql(f.a(), &f.alice, "SELECT 'tg-stored-1'");
    assert!(out.status.success(), "{}", stderr(&out));
    // Read once, right after the answer: no polling, the event was stored before forwarding.
    assert!(
        f.stored_command_tags().contains("tg-stored-1"),
        "the command was answered before its event was in the store"
    );

    f.store.stop();
    let mut took = Vec::new();
    for tag in ["tg-refused-1", "tg-refused-2"] {
        let started = Instant::now();
        let out = f.psql(f.a(), &f.alice, &format!("SELECT '{tag}'"));
        took.push(started.elapsed());
        assert!(!out.status.success(), "{tag} ran without the store");
        assert!(
            stderr(&out).contains("could not record this command in the audit trail"),
            "{}",
            stderr(&out)
        );
    }
    eprintln!(
        "store stopped: first statement refused after {:?}, the next after {:?} (audit_timeout {audit_timeout:?}; psql's TLS connect included)",
        took[0], took[1]
    );
    // The first waits out audit_timeout (it may have been the store's last moment); the next is
    // refused at once, the store having been away longer than that.
    assert!(took[0] < audit_timeout + Duration::from_secs(3), "{took:?}");
    assert!(took[1] < took[0], "{took:?}");

    let log = std::fs::read_to_string(f.app.log_path()).unwrap();
    let executed = pg_logged_tags(&log);
    assert!(
        executed.contains("tg-stored-1"),
        "statement log: {executed:?}"
    );
    assert!(
        !executed.iter().any(|t| t.starts_with("tg-refused")),
        "a refused statement reached the resource: {executed:?}"
    );
    assert!(!f.a().gw.logs().contains(&f.store.password));
}

/// One pgbench client script: tagged statements (`tg-<prefix>-<client>-<random>`), which
/// PostgreSQL's statement log and the audit trail both show.
fn pgbench_script(dir: &Path, prefix: &str) -> std::path::PathBuf {
    let path = dir.join(format!("load-{prefix}.sql"));
    std::fs::write(
        &path,
        format!("\\set r random(1, 999999999999)\nSELECT 'tg-{prefix}-:client_id-:r' AS tag;\n"),
    )
    .unwrap();
    path
}

fn pgbench(f: &Fleet, r: &Replica, script: &Path, seconds: u32) -> Child {
    Command::new("pgbench")
        .args(["-n", "-c", "2", "-T", &seconds.to_string(), "-f"])
        .arg(script)
        .arg(f.conninfo(r, &f.alice))
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench")
}

/// "number of transactions actually processed: N", when pgbench finished cleanly.
fn pgbench_processed(out: &Output) -> Option<u64> {
    let text = stdout(out);
    if !out.status.success() || !text.contains("number of failed transactions: 0 ") {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
}

/// Three replicas under pgbench load; `kill -9` of one. The clients of the other two go on, the
/// killed one's clients reconnect to another and go on; an operator imports the dead replica's
/// journal from elsewhere (`tollgate audit import`, twice: idempotent), and every statement the
/// resource executed (its `log_statement` log) has its command event in the shared store;
/// `audit verify` passes, and so it does after the killed replica restarts on its journal.
#[test]
fn kill_9_of_a_replica_under_pgbench_load_loses_no_command_event() {
    let mut f = start_with(FleetOptions {
        replicas: 3,
        app_conf: log_statements(),
        ..Default::default()
    });
    let tmp = f._tmp.path().to_path_buf();
    let scripts: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|p| pgbench_script(&tmp, p))
        .collect();
    let mut runs: Vec<Child> = f
        .replicas
        .iter()
        .zip(&scripts)
        .map(|(r, script)| pgbench(&f, r, script, 8))
        .collect();
    // Until A's clients have run a fair number of statements.
    let log_path = f.app.log_path();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if pg_logged_tags(&log)
            .iter()
            .filter(|t| t.starts_with("tg-a-"))
            .count()
            >= 100
        {
            break;
        }
        assert!(Instant::now() < deadline, "no load through replica A");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed_dir = f.replicas[0]._dir.path().to_path_buf();
    let journal = f.replicas[0].gw.config_path.with_extension("events.log");
    let killed_config = f.replicas[0].gw.config_template();
    f.replicas[0].gw.kill();
    let killed_at = Instant::now();

    let out_a = runs.remove(0).wait_with_output().unwrap();
    eprintln!(
        "pgbench through the killed replica: {} / {}",
        out_a.status,
        stderr(&out_a).lines().last().unwrap_or_default()
    );
    // The killed replica's clients reconnect to another replica and go on.
    let reconnect_script = pgbench_script(&tmp, "r");
    let reconnect = pgbench(&f, &f.replicas[1], &reconnect_script, 2)
        .wait_with_output()
        .unwrap();
    let reconnected = pgbench_processed(&reconnect)
        .unwrap_or_else(|| panic!("{}{}", stdout(&reconnect), stderr(&reconnect)));
    assert!(reconnected > 0);
    // The other replicas' clients never noticed.
    for (name, run) in ["b", "c"].iter().zip(runs) {
        let out = run.wait_with_output().unwrap();
        let processed = pgbench_processed(&out).unwrap_or_else(|| {
            panic!(
                "pgbench through replica {name}: {}{}",
                stdout(&out),
                stderr(&out)
            )
        });
        assert!(processed > 0);
    }
    eprintln!(
        "replicas: after the kill, B and C finished their runs and A's clients ran {reconnected} transactions through B ({:?} after the kill)",
        killed_at.elapsed()
    );

    // Every backend is gone (the killed replica's too): the statement log is complete.
    wait_for(
        Duration::from_secs(60),
        "the resource's backends to exit",
        || {
            f.app
            .psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
            .is_ok_and(|n| n.trim() == "0")
        },
    );
    let executed = pg_logged_tags(&std::fs::read_to_string(&log_path).unwrap());
    assert!(
        executed.iter().filter(|t| t.starts_with("tg-a-")).count() >= 100,
        "is log_statement on? {} tags",
        executed.len()
    );

    // An operator imports the killed replica's journal through replica B's config (another
    // host, the same store); twice, the second a no-op.
    let import = || {
        let out = Command::new(BIN)
            .args(["audit", "import", "--json", "--journal"])
            .arg(&journal)
            .arg("--config")
            .arg(&f.replicas[1].gw.config_path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // What the store holds before the import: the live replicas' importers have shipped
    // theirs (50 ms batches), the killed replica's unshipped tail is only in its journal.
    std::thread::sleep(Duration::from_secs(1));
    let missing_before = executed.difference(&f.stored_command_tags()).count();
    let first = import();
    // The live replicas' importers ship what they journaled within moments.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut audited = f.stored_command_tags();
    while !executed.is_subset(&audited) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        audited = f.stored_command_tags();
    }
    let missing: Vec<_> = executed.difference(&audited).collect();
    eprintln!(
        "replicas: {} statements executed per the resource's log, {} with command events, {} missing; \
         before the journal import {missing_before} were missing (acknowledged by the killed replica, not yet shipped); \
         the import read {} events",
        executed.len(),
        audited.len(),
        missing.len(),
        first["events"]
    );
    assert!(
        missing.is_empty(),
        "executed without a command event: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert!(first["events"].as_u64().unwrap() > 0, "{first}");
    let events = f.stored_events_of(&first);
    // The journal holds the chain's tail (stored segments are deleted), the store all of it.
    assert!(
        events as u64 >= first["events"].as_u64().unwrap(),
        "{first}"
    );
    let second = import();
    assert_eq!(second["chains"], first["chains"]);
    assert_eq!(
        f.stored_events_of(&first),
        events,
        "a second import added events"
    );

    let report = audit_verify(&f.replicas[1].gw.config_path);
    assert!(report["chains"].as_u64().unwrap() >= 3, "{report}");

    // The killed replica restarts on its own journal: it imports it again (nothing new) and serves.
    let restarted = Gateway::start(&killed_dir, &killed_config, &[]);
    assert!(
        restarted
            .logs()
            .contains("imported audit events left by a previous gateway process"),
        "{}",
        restarted.logs()
    );
    assert_eq!(
        f.stored_events_of(&first),
        events,
        "the restart's import added events"
    );
    f.replicas[0].gw = restarted;
    let out = f.psql(f.a(), &f.alice, "SELECT 'tg-after-restart'");
    assert!(out.status.success(), "{}", stderr(&out));
    audit_verify(&f.replicas[1].gw.config_path);
}

/// Chains that hold `audit.checkpoint` events, with how many each.
fn checkpoint_chains(f: &Fleet) -> Vec<(String, i64)> {
    f.store
        .psql("SELECT chain_id, count(*) FROM events WHERE kind = 'audit.checkpoint' GROUP BY 1 ORDER BY 1")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (chain, n) = l.split_once('|')?;
            Some((chain.trim().to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

/// Replicas register in the store (id, address, version, heartbeat; `tollgate store replicas`);
/// `tollgate scan` combines their upstream connections; one of them leads the housekeeping:
/// checkpoints come from one chain only, and from another replica's once the leader is killed.
#[test]
fn replicas_register_and_one_of_them_leads_the_checkpoints() {
    let mut f = start_with(FleetOptions {
        server_extra: "checkpoint_interval = \"300ms\"\n",
        ..FleetOptions::default()
    });
    let out = Command::new(BIN)
        .args(["store", "replicas", "--json", "--config"])
        .arg(&f.b().gw.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = doc["replicas"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{doc}");
    for r in &f.replicas {
        let me = listed
            .iter()
            .find(|l| l["address"] == format!("127.0.0.1:{}", r.gw.pg_port))
            .unwrap_or_else(|| panic!("replica on {} not registered: {doc}", r.gw.pg_port));
        assert_eq!(me["alive"], true, "{doc}");
        assert_eq!(me["version"], env!("CARGO_PKG_VERSION"), "{doc}");
        assert_eq!(
            me["admin_address"],
            format!("127.0.0.1:{}", r.gw.admin_port),
            "{doc}"
        );
        assert!(me["id"].as_str().unwrap().starts_with("gw-"), "{doc}");
    }

    // `tollgate scan` (from either replica's config) counts both replicas' upstream sessions as
    // through the gateway: one held through each.
    let held: Vec<Child> = f
        .replicas
        .iter()
        .map(|r| f.psql_bg(r, &f.alice, "SELECT pg_sleep(6)"))
        .collect();
    wait_for(Duration::from_secs(20), "two sleeping sessions", || {
        f.app
            .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(6)'")
            .is_ok_and(|n| n.trim() == "2")
    });
    let out = Command::new(BIN)
        .args(["scan", "--json", "--min-days", "1", "--config"])
        .arg(&f.a().gw.config_path)
        .output()
        .unwrap();
    let scan: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}{}", stdout(&out), stderr(&out)));
    let app = &scan["resources"][0];
    assert_eq!(app["sessions"]["through_gateway"], 2, "{scan:#}");
    assert!(
        !scan.to_string().contains("bypass_session"),
        "a replica's session taken for a bypass: {scan:#}"
    );
    for c in held {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }

    let mut chains = Vec::new();
    wait_for(Duration::from_secs(30), "checkpoints", || {
        chains = checkpoint_chains(&f);
        chains.iter().map(|c| c.1).sum::<i64>() >= 4
    });
    assert_eq!(
        chains.len(),
        1,
        "checkpoints from more than one replica: {chains:?}"
    );
    let leader_chain = chains[0].0.clone();
    let leader = listed
        .iter()
        .position(|l| l["id"] == leader_chain.as_str())
        .expect("the leader is a registered replica");
    let leader_port = listed[leader]["address"].as_str().unwrap().to_string();
    let at = f
        .replicas
        .iter()
        .position(|r| format!("127.0.0.1:{}", r.gw.pg_port) == leader_port)
        .unwrap();
    f.replicas[at].gw.kill();
    wait_for(
        Duration::from_secs(30),
        "the other replica to take over the checkpoints",
        || checkpoint_chains(&f).len() == 2,
    );
    // A replica that shuts down cleanly leaves the registry.
    let other = 1 - at;
    let pid = f.replicas[other].gw.pid();
    // SAFETY: a plain SIGTERM to the gateway this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_for(Duration::from_secs(30), "the replica to deregister", || {
        f.store
            .psql("SELECT count(*) FROM replicas")
            .is_ok_and(|n| n.trim() == "1")
    });
}

/// A TCP relay on a free port whose first connection goes to port `first` and every later one
/// to `then`: a client's CancelRequest (a new connection to the address it used) lands on
/// another replica than its session, as behind a load balancer.
fn split_relay(first: u16, then: u16) -> u16 {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let to = if n == 0 { first } else { then };
            std::thread::spawn(move || {
                let Ok(up) = TcpStream::connect(("127.0.0.1", to)) else {
                    return;
                };
                let (mut c_in, mut u_out) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                let forward = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut u_out);
                    let _ = u_out.shutdown(Shutdown::Write);
                });
                let (mut c_out, mut u_in) = (client, up);
                let _ = std::io::copy(&mut u_in, &mut c_out);
                let _ = c_out.shutdown(Shutdown::Write);
                let _ = forward.join();
            });
        }
    });
    port
}

/// `SELECT pg_sleep(30)` through `port` as alice, running upstream when this returns; the
/// query's task and its cancel token.
async fn long_query(
    f: &Fleet,
    port: u16,
) -> (
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    tokio_postgres::CancelToken,
) {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(&f.pki.ca, Some(&f.alice)));
    let conninfo = format!("host=localhost port={port} dbname=app user=alice sslmode=require");
    let (client, conn) = tokio_postgres::connect(&conninfo, tls)
        .await
        .expect("connect through replica A");
    tokio::spawn(conn);
    let token = client.cancel_token();
    let query =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    let deadline = Instant::now() + Duration::from_secs(20);
    while running_sleeps(f) != 1 {
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (query, token)
}

fn running_sleeps(f: &Fleet) -> i64 {
    f.app
        .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Sends the client's CancelRequest (TLS, to the address it connected to) and waits for the
/// query to end with 57014.
async fn cancel_and_expect_it(
    f: &Fleet,
    token: &tokio_postgres::CancelToken,
    query: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(&f.pki.ca, Some(&f.alice)));
    token
        .cancel_query(tls)
        .await
        .expect("send the cancel request");
    let err = tokio::time::timeout(Duration::from_secs(20), query)
        .await
        .expect("the query was not cancelled")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err:?}"
    );
}

/// A CancelRequest that reaches replica B for a query running through replica A cancels it:
/// the key names A (its tag), B passes the request on over mutual TLS (A's certificate
/// verified, B's naming it a replica of the cluster), A matches the secret.
#[test]
fn a_cancel_request_through_another_replica_cancels_the_query() {
    let f = start();
    let relay = split_relay(f.a().gw.pg_port, f.b().gw.pg_port);
    let took = runtime().block_on(async {
        let (query, token) = long_query(&f, relay).await;
        let started = Instant::now();
        cancel_and_expect_it(&f, &token, query).await;
        started.elapsed()
    });
    eprintln!("replicas: cancel through replica B ended the query on A {took:?} after it was sent");
    assert_eq!(
        f.b()
            .gw
            .metric("tollgate_cancel_requests_total{matched=\"forwarded\"}"),
        Some(1),
        "{}",
        f.b().gw.metrics()
    );
    assert_eq!(
        f.a()
            .gw
            .metric("tollgate_cancel_requests_total{matched=\"yes\"}"),
        Some(1)
    );
}

/// tollgate's forwarded-cancel code (1234.5677), as one replica sends it to another.
const FORWARDED_CANCEL: i32 = 80877101;

fn forwarded_cancel(pid: i32, secret: i32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(&16i32.to_be_bytes());
    msg.extend_from_slice(&FORWARDED_CANCEL.to_be_bytes());
    msg.extend_from_slice(&pid.to_be_bytes());
    msg.extend_from_slice(&secret.to_be_bytes());
    msg
}

/// Sends a forwarded cancel request to `port` inside TLS with `who`'s certificate; returns once
/// the gateway hung up.
async fn forge_forward_over_tls(f: &Fleet, port: u16, who: &IssuedFiles, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut ssl_request = 8i32.to_be_bytes().to_vec();
    ssl_request.extend_from_slice(&80877103i32.to_be_bytes());
    tcp.write_all(&ssl_request).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_tls_arc(&f.pki.ca, Some(who)))
        .connect(name, tcp)
        .await
        .expect("TLS with a valid client certificate");
    tls.write_all(msg).await.unwrap();
    tls.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "a cancel request gets no reply: {rest:?}");
}

/// A forwarded cancel request with the right key but not from a replica is refused: from a
/// user's valid certificate of the very CA that issues the replicas' (inside TLS), and in
/// plaintext. The query keeps running; the owner counts both as refused.
#[test]
fn a_forged_forwarded_cancel_is_refused() {
    let f = start();
    let a = f.a().gw.pg_port;
    runtime().block_on(async {
        let (query, token) = long_query(&f, a).await;
        let (pid, secret) = cancel_key(&token, &f.pki).await;
        let msg = forwarded_cancel(pid, secret);
        forge_forward_over_tls(&f, a, &f.alice, &msg).await;
        {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", a)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&msg).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            running_sleeps(&f),
            1,
            "a forged forward cancelled the query"
        );
        assert!(!query.is_finished());
        assert_eq!(
            f.a()
                .gw
                .metric("tollgate_cancel_requests_total{matched=\"refused\"}"),
            Some(2),
            "{}",
            f.a().gw.metrics()
        );
        assert_eq!(
            f.a()
                .gw
                .metric("tollgate_cancel_requests_total{matched=\"yes\"}"),
            None
        );
        // The same key as an ordinary CancelRequest from the client still works.
        cancel_and_expect_it(&f, &token, query).await;
    });
}

/// curl as a browser with cookie jar `jar`, trusting `bundle`: status, head, body.
fn curl_with_jar(bundle: &Path, jar: &Path, url: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "20", "--cacert"])
        .arg(bundle)
        .arg("-b")
        .arg(jar)
        .arg(url)
        .output()
        .expect("curl");
    curl_answer(&out, url)
}

/// A console sign-in with the identity provider started on replica A finishes on replica B
/// (the provider's redirect reached another replica, as behind a load balancer): the pending
/// sign-in (state, nonce, PKCE verifier) is in the shared store, under the SHA-256 of the
/// browser's cookie only, and is used once across the replicas.
#[test]
fn an_oidc_sign_in_started_on_one_replica_finishes_on_another() {
    let idp_dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::new(idp_dir.path(), tollgate_testsupport::free_port(), "keys");
    // The provider is up before the replicas start (their key fetch does not wait for it).
    let (a, b) = (
        tollgate_testsupport::free_port(),
        tollgate_testsupport::free_port(),
    );
    idp.redirect_uris = vec![format!("https://localhost:{a}/auth/oidc/callback")];
    idp.up();
    let f = start_with(FleetOptions {
        tail: format!(
            "\n[[identity.oidc]]\nissuer = \"{}\"\nca = \"{}\"\nclient_id = \"tollgate-login\"\naudiences = [\"tollgate\"]\n",
            idp.issuer,
            idp.ca.display()
        ),
        https_ports: vec![a, b],
        ..Default::default()
    });
    let bundle = idp_dir.path().join("cas.pem");
    std::fs::write(
        &bundle,
        [&idp.ca, &f.pki.ca]
            .map(|p| std::fs::read_to_string(p).unwrap())
            .concat(),
    )
    .unwrap();
    let jar = idp_dir.path().join("jar");
    let start = format!("https://localhost:{a}/auth/oidc/start?next=/reviews");
    let Browsed::Left(back) = idp.browse_trusting(&start, "alice", Consent::Approve, &jar, &bundle)
    else {
        panic!("the provider did not redirect back");
    };
    let cookie = std::fs::read_to_string(&jar).unwrap();
    let pending_id = cookie
        .lines()
        .find(|l| l.contains("__Host-tollgate_oidc"))
        .and_then(|l| l.split('\t').next_back())
        .expect("the pre-login cookie")
        .to_string();
    // The store holds the pending sign-in, keyed by the cookie's digest, never the cookie.
    let stored = f
        .store
        .psql("SELECT key || ' ' || value FROM one_time WHERE kind = 'console.oidc.pending'")
        .unwrap();
    assert_eq!(stored.trim().lines().count(), 1, "{stored}");
    assert!(!stored.contains(&pending_id), "{stored}");

    let on_b = back.replace(&format!("localhost:{a}/"), &format!("localhost:{b}/"));
    assert_ne!(on_b, back);
    let (status, head, body) = curl_with_jar(&bundle, &jar, &on_b);
    assert_eq!(status, 303, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("set-cookie: __host-tollgate_console="),
        "{head}"
    );
    assert!(
        head.contains("location: /reviews") || head.contains("Location: /reviews"),
        "{head}"
    );
    // Used once across the replicas: the same answer on A finds nothing.
    let (status, _, body) = curl_with_jar(&bundle, &jar, &back);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("expired, was already used, or was started in another browser"),
        "{body}"
    );
}

/// A console session opened on replica A serves the browser on replica B (the session is in
/// the shared store under its cookie's SHA-256, the service token sealed under the cookie):
/// B shows the held statement, takes the approval with B's page's CSRF token, and the
/// statement held on A runs; signing out on B ends the session on A too.
#[test]
fn a_console_session_opened_on_one_replica_is_served_and_ended_by_another() {
    const TOKEN: &str = "tg_console_replicas_reviewer_token";
    let mut f = start_with(FleetOptions {
        tail: format!(
            "\n[[identity.tokens]]\nsubject = \"rita\"\nsha256 = \"{}\"\ngroups = [\"sre\"]\n",
            sha256_hex(TOKEN)
        ),
        ..Default::default()
    });
    let (a, b) = (f.console(f.a()), f.console(f.b()));
    let cookie = a.login(TOKEN);
    let (status, body) = a.page(&cookie, "/reviews");
    assert_eq!(status, 200, "{body}");
    // The store holds the session under the cookie's digest, the token sealed.
    let stored = f
        .store
        .psql("SELECT key || ' ' || value FROM one_time WHERE kind = 'console.session'")
        .unwrap();
    assert_eq!(stored.trim().lines().count(), 1, "{stored}");
    assert!(stored.contains(&sha256_hex(&cookie)), "{stored}");
    assert!(
        !stored.contains(&cookie) && !stored.contains(TOKEN),
        "{stored}"
    );

    let child = f.psql_bg(f.a(), &f.bob, "DELETE FROM items WHERE id = 1");
    let id = f.pending_delete_on_b()["id"].as_str().unwrap().to_string();
    let (status, page) = b.page(&cookie, &format!("/reviews/{id}"));
    assert_eq!(status, 200, "B serves A's session: {page}");
    assert!(page.contains("DELETE FROM items WHERE id = 1"), "{page}");
    let csrf = csrf_of(&page);
    let (status, _, body) = b.post(
        &format!("/reviews/{id}/approve"),
        &cookie,
        Some(&b.origin),
        &[("csrf", &csrf), ("reason", "approved through B")],
    );
    assert_eq!(status, 303, "{body}");
    let out = child.wait_with_output().unwrap();
    assert!(stdout(&out).contains("DELETE 1"), "{}", stderr(&out));
    assert_eq!(f.items(), 9);

    let (status, _, body) = b.post("/logout", &cookie, Some(&b.origin), &[("csrf", &csrf)]);
    assert_eq!(status, 303, "{body}");
    assert!(
        sent_to_sign_in(&a, &cookie),
        "A refuses the signed-out cookie"
    );
    let left = f
        .store
        .psql("SELECT count(*) FROM one_time WHERE kind = 'console.session'")
        .unwrap();
    assert_eq!(left.trim(), "0");

    // Without the store no session is honoured (fail closed): a live one is sent to sign in.
    let live = a.login(TOKEN);
    f.store.stop();
    let asked = Instant::now();
    assert!(
        sent_to_sign_in(&a, &live),
        "a session the store cannot confirm"
    );
    eprintln!(
        "console request with the store stopped: refused in {} ms",
        asked.elapsed().as_millis()
    );
}

/// `cookie`'s request for `/reviews` is redirected to `/login`.
fn sent_to_sign_in(console: &ConsoleCurl, cookie: &str) -> bool {
    let (status, head, _) = console.curl(&[
        "-H",
        &format!("Cookie: __Host-tollgate_console={cookie}"),
        &format!("{}/reviews", console.origin),
    ]);
    status == 303 && head.to_ascii_lowercase().contains("location: /login")
}
