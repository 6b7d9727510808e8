//! Reviews, masking, standing and scanning on the MySQL listener with real clients: a DELETE
//! held for review (the `mariadb` client simply waits) runs when approved with `tollgate
//! reviews approve` and is refused with the review's id when denied; values echoed in server
//! errors are masked; rows of a prepared statement (binary protocol, node `mysql2`'s
//! `execute`) are masked; sessions end when their certificate expires or their token is
//! removed; `tollgate scan` tells the gateway's sessions from a direct one.

mod common;

use common::mysql::mariadb;
use common::mysql::{
    closed, err, err_answer, node_modules, out, Answer, Login, MyEnv, MyOptions, Raw,
};
use common::{gateway_cli, pending_review, reviews_cli, stderr, stdout, TOKEN};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tollgate_tls::pki::IssuedFiles;

const HOLD: &str = r#"review_timeout = "30s"
[[resources.rules]]
name = "agent-deletes"
statements = ["delete"]
groups = ["ci"]
action = "review"
approvers = ["sre"]
"#;

struct Setup {
    env: MyEnv,
    https: u16,
    /// ci: the agent whose deletes need review.
    bob: IssuedFiles,
}

fn start_held() -> Setup {
    let https = tollgate_testsupport::free_port();
    let env = MyEnv::start_with(MyOptions {
        server_extra: format!(
            "https_listen = \"127.0.0.1:{https}\"\n\n[roles]\nadmin_groups = []\nauditor_groups = [\"sre\"]\n"
        ),
        resource_extra: HOLD.into(),
        ..Default::default()
    });
    let bob = env.pki.client("bob", &["ci"]);
    Setup { env, https, bob }
}

impl Setup {
    fn reviews(&self, who: &IssuedFiles, args: &[&str]) -> Output {
        reviews_cli(self.https, &self.env.pki.ca, who, args)
    }

    /// The review once it reaches `status` (waits up to 10 s).
    fn review_when(&self, id: &str, status: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = self.reviews(&self.env.alice, &["show", id, "--json"]);
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            if r["status"] == status {
                return r;
            }
            assert!(Instant::now() < deadline, "not {status}: {r}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pending(&self, prefix: &str) -> String {
        let r = pending_review(self.https, &self.env.pki.ca, &self.env.alice, prefix);
        assert_eq!(r["status"], "pending");
        assert_eq!(r["rule"], "agent-deletes");
        r["id"].as_str().unwrap().to_string()
    }
}

#[test]
fn a_held_delete_waits_runs_when_approved_and_names_its_review_when_denied() {
    let s = start_held();
    let child = s.env.mariadb_bg(
        &s.bob,
        "DELETE FROM customers WHERE id = 2; SELECT ROW_COUNT()",
    );
    let started = Instant::now();
    let id = s.pending("DELETE FROM customers WHERE id = 2");
    assert_eq!(s.env.customers(), "2", "nothing ran while held");
    // bob cannot approve his own request.
    let o = s.reviews(&s.bob, &["approve", &id]);
    assert!(!o.status.success());
    let o = s.reviews(&s.env.alice, &["approve", &id, "--reason", "ok"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "1\n");
    assert_eq!(s.env.customers(), "1");
    eprintln!("held for {:?}", started.elapsed());

    // Denied: the client gets the reviewer's reason and the review id.
    let child = s
        .env
        .mariadb_bg(&s.bob, "DELETE FROM customers WHERE id = 1");
    let id = s.pending("DELETE FROM customers WHERE id = 1");
    let o = s.reviews(
        &s.env.alice,
        &["deny", &id, "--reason", "not during the freeze"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let e = err(&o);
    assert!(e.contains("ERROR 1227"), "{e}");
    assert!(e.contains(&id) && e.contains("denied by alice"), "{e}");
    assert!(e.contains("not during the freeze"), "{e}");
    assert_eq!(s.env.customers(), "1");

    // A client that goes away withdraws its request.
    let mut child = s
        .env
        .mariadb_bg(&s.bob, "DELETE FROM customers WHERE id = 1 AND 1 = 1");
    let id = s.pending("DELETE FROM customers WHERE id = 1 AND");
    child.kill().unwrap();
    let _ = child.wait();
    let r = s.review_when(&id, "withdrawn");
    assert!(r.to_string().contains("the client disconnected"), "{r}");
    assert_eq!(s.env.customers(), "1");

    let evs = s.env.events();
    for kind in ["review.requested", "review.approved", "review.refused"] {
        assert!(evs.iter().any(|e| e["kind"] == kind), "no {kind}");
    }
    // The review id went to the log at once (MySQL has no notices).
    assert!(s.env.gw.logs().contains("statement held for review"));
}

/// A held statement never stays pending for a session that cannot run it: another connection
/// of the same identity cancels it with `KILL QUERY` (the held client gets ER_QUERY_INTERRUPTED
/// naming the review, and its session goes on) or `KILL` (ER_CONNECTION_KILLED, and its
/// connection ends), and a reload that removes the session's token
/// ends the session and withdraws its review (the client is told which review).
#[test]
fn a_held_statement_is_withdrawn_by_kill_query_or_when_its_session_ends() {
    let s = start_held();
    let mut held = Raw::connect(&s.env, Login::Cert(&s.bob), "app").expect("bob's session");
    held.send(0, b"\x03DELETE FROM customers WHERE id = 2");
    let id = s.pending("DELETE FROM customers WHERE id = 2");
    let mut other = Raw::connect(&s.env, Login::Cert(&s.bob), "app").expect("bob again");
    let a = other.query(&format!("KILL QUERY {}", held.thread_id));
    assert!(matches!(a, Answer::Ok), "{a:?}");
    let a = err_answer(&held.read());
    assert_eq!(a.code(), Some(1317), "{a:?}");
    assert!(
        a.message().contains(&id) && a.message().contains("withdrawn"),
        "{a:?}"
    );
    assert_eq!(held.query("SELECT 1").text_rows(), [["1"]]);
    let r = s.review_when(&id, "withdrawn");
    assert!(r.to_string().contains("KILL QUERY"), "{r}");

    // `KILL <id>` (CONNECTION) withdraws the held statement too, and ends the connection.
    let mut killed = Raw::connect(&s.env, Login::Cert(&s.bob), "app").expect("bob's third");
    killed.send(0, b"\x03DELETE FROM customers WHERE id = 2");
    let kill_id = s.pending("DELETE FROM customers WHERE id = 2");
    let a = other.query(&format!("KILL {}", killed.thread_id));
    assert!(matches!(a, Answer::Ok), "{a:?}");
    let a = err_answer(&killed.read());
    assert_eq!(a.code(), Some(1927), "{a:?}");
    assert!(
        a.message().contains(&kill_id) && a.message().contains("KILL CONNECTION"),
        "{a:?}"
    );
    assert!(closed(&mut killed.s));
    let r = s.review_when(&kill_id, "withdrawn");
    assert!(r.to_string().contains("KILL CONNECTION"), "{r}");
    assert_eq!(other.query("SELECT 1").text_rows(), [["1"]]);

    // The token's session holds a DELETE when a reload removes the token.
    let mut t = Raw::connect(&s.env, Login::Token(TOKEN), "app").expect("token session");
    t.send(0, b"\x03DELETE FROM customers WHERE id = 1");
    let token_id = s.pending("DELETE FROM customers WHERE id = 1");
    reassign_token(&s.env);
    let a = err_answer(&t.read());
    assert_eq!(a.code(), Some(1927), "{a:?}");
    assert!(a.message().contains("no longer accepted"), "{a:?}");
    assert!(a.message().contains(&token_id), "{a:?}");
    assert!(closed(&mut t.s));
    let r = s.review_when(&token_id, "withdrawn");
    assert!(r.to_string().contains("no longer accepted"), "{r}");
    // Approving it now changes nothing: it is closed, and nothing ran.
    let o = s.reviews(&s.env.alice, &["approve", &token_id]);
    assert!(!o.status.success());
    assert_eq!(s.env.customers(), "2");

    let evs = s.env.events();
    for review in [&id, &token_id] {
        assert!(
            evs.iter().any(|e| e["kind"] == "review.refused"
                && e["payload"]["review"] == review.as_str()
                && e["payload"]["outcome"] == "withdrawn"),
            "no withdrawn review.refused for {review}"
        );
        assert!(
            evs.iter()
                .any(|e| e["kind"] == "review.withdrawn"
                    && e["payload"]["review"] == review.as_str()),
            "no review.withdrawn for {review}"
        );
    }
    assert!(evs
        .iter()
        .any(|e| e["kind"] == "session.terminated" && e["payload"]["reason"] == "token_removed"));
}

/// Reload the gateway with `TOKEN` configured for another subject: ci-bot's sessions end.
fn reassign_token(env: &MyEnv) {
    let path = &env.gw.config_path;
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(
        path,
        text.replace("subject = \"ci-bot\"", "subject = \"other-bot\""),
    )
    .unwrap();
    let rc = unsafe { libc::kill(env.gw.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "SIGHUP");
}

const MASKS: &str = r#"[[resources.masks]]
columns = ["email"]
strategy = "redact"
[[resources.masks]]
detectors = ["email"]
strategy = "redact"
"#;

#[test]
fn values_echoed_in_server_errors_are_masked() {
    let env = MyEnv::start(MASKS, false);
    let o = env.as_alice(
        "app",
        "INSERT INTO customers VALUES (3, 'Eve', 'ada@example.com')",
    );
    // The client echoes its own statement; the server's error is the ERROR line.
    let stderr_text = err(&o);
    let e = stderr_text
        .lines()
        .find(|l| l.starts_with("ERROR"))
        .unwrap_or_default();
    assert!(e.contains("ERROR 1062"), "{stderr_text}");
    assert!(!e.contains("ada@example.com"), "{e}");
    assert!(e.contains("Duplicate entry '"), "{e}");
    // A value the detectors find, echoed in an error about something else.
    let o = env.as_alice("app", "SELECT `carol@example.net` FROM customers");
    let stderr_text = err(&o);
    let e = stderr_text
        .lines()
        .find(|l| l.starts_with("ERROR"))
        .unwrap_or_default();
    assert!(e.contains("ERROR 1054"), "{stderr_text}");
    assert!(!e.contains("carol@example.net"), "{e}");
    // The audit's result holds the masked error.
    let evs = env.events();
    let dup = evs
        .iter()
        .find(|e| e["kind"] == "result" && e["payload"]["error_code"] == 1062)
        .expect("the duplicate's result is recorded");
    let msg = dup["payload"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Duplicate entry '") && !msg.contains("ada@"),
        "{msg}"
    );
    assert!(
        common::masked_values(&dup["payload"]) >= 1
            && dup["payload"]["masked"][0]["column"] == "error",
        "{dup}"
    );
}

/// A prepared SELECT through a real driver: node mysql2's `execute` uses the binary protocol.
#[test]
fn binary_protocol_rows_are_masked_through_mysql2() {
    let env = MyEnv::start(MASKS, false);
    let script = r#"
const mysql = require('mysql2/promise');
const fs = require('fs');
(async () => {
  const c = await mysql.createConnection({
    host: 'localhost', port: +process.env.PORT, user: 'alice', database: 'app',
    ssl: { ca: fs.readFileSync(process.env.CA), cert: fs.readFileSync(process.env.CERT),
           key: fs.readFileSync(process.env.KEY) },
  });
  const [rows] = await c.execute('SELECT id, name, email FROM customers WHERE id >= ? ORDER BY id', [1]);
  const [text] = await c.query('SELECT email FROM customers ORDER BY id');
  console.log(JSON.stringify({ rows, text }));
  await c.end();
})().catch(e => { console.error(e); process.exit(1); });
"#;
    let o = Command::new("node")
        .args(["-e", script])
        .env("NODE_PATH", node_modules())
        .env("PORT", env.mysql_port.to_string())
        .env("CA", &env.pki.ca)
        .env("CERT", &env.alice.cert)
        .env("KEY", &env.alice.key)
        .output()
        .expect("node");
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(out(&o).trim()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], 1, "ints stay binary ints: {v}");
    assert_eq!(rows[0]["name"], "Ada");
    for r in rows.iter().chain(v["text"].as_array().unwrap()) {
        let email = r["email"].as_str().unwrap();
        assert!(!email.contains("@example"), "{v}");
    }
    let evs = env.events();
    assert!(evs.iter().any(|e| e["kind"] == "result"
        && common::masked_values(&e["payload"]) == 2
        && e["payload"]["masked"][0]["column"] == "email"
        && e["payload"]["tag"] == "SELECT 2"));
}

/// A session ends when what it rests on ends, as on the PostgreSQL listener: its certificate
/// expires, or its token is no longer configured after a reload. The client gets the reason
/// in answer to its next command.
#[test]
fn sessions_end_when_their_certificate_expires_or_their_token_is_removed() {
    let env = MyEnv::start("", false);
    let carol = env
        .pki
        .client_until("carol", &["sre"], Duration::from_secs(3));
    let mut c = Raw::connect(&env, Login::Cert(&carol), "app").expect("carol's session");
    assert_eq!(c.query("SELECT 1").text_rows(), [["1"]]);
    let mut t = Raw::connect(&env, Login::Token(TOKEN), "app").expect("token session");
    assert_eq!(t.query("SELECT 2").text_rows(), [["2"]]);

    // The error is sent when the certificate expires (a client reads it with the answer to
    // its next command).
    let a = err_answer(&c.read());
    assert_eq!(a.code(), Some(1927), "{a:?}");
    assert!(a.message().contains("certificate has expired"), "{a:?}");
    assert!(closed(&mut c.s));

    // The token is configured for someone else now.
    reassign_token(&env);
    let a = err_answer(&t.read());
    assert_eq!(a.code(), Some(1927), "{a:?}");
    assert!(a.message().contains("no longer accepted"), "{a:?}");
    assert!(closed(&mut t.s));

    let evs = env.events();
    for reason in ["cert_expired", "token_removed"] {
        assert!(
            evs.iter()
                .any(|e| e["kind"] == "session.terminated" && e["payload"]["reason"] == reason),
            "no session.terminated for {reason}"
        );
    }
}

/// `tollgate scan` on a MySQL resource: TLS facts, the plaintext login refused, and the
/// sessions of the process list told apart: the gateway's (from its admin listener) and one
/// connected directly with the resource's credentials.
#[test]
fn scan_tells_gateway_sessions_from_direct_ones() {
    let env = MyEnv::start("", false);
    let mut through = env.raw();
    let gw_thread = through.query("SELECT CONNECTION_ID()").text_rows()[0][0].clone();
    let mut direct = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &env.db.port.to_string(),
            "--ssl",
            &format!("--ssl-ca={}", env.db.ca_cert.display()),
            "-u",
            &env.db.user,
            &format!("--password={}", env.db.password),
            "-D",
            "app",
            "-e",
            "SELECT SLEEP(120)",
        ])
        .env("HOME", "/nonexistent")
        .spawn()
        .expect("mariadb");
    let mut direct_id = String::new();
    common::wait_for(Duration::from_secs(10), "the direct session", || {
        direct_id = env
            .db
            .sql("SELECT ID FROM information_schema.PROCESSLIST WHERE INFO = 'SELECT SLEEP(120)'")
            .unwrap_or_default()
            .trim()
            .to_string();
        !direct_id.is_empty()
    });
    let doc = scan(&env);
    let _ = direct.kill();
    let _ = direct.wait();
    let app = &doc["resources"][0];
    assert_eq!(app["resource"], "app");
    assert_eq!(app["plaintext_accepted"], false, "{app:#}");
    assert_eq!(app["tls"]["chain_trusted"], true, "{app:#}");
    assert_eq!(app["tls"]["hostname_matches"], true, "{app:#}");
    let versions = app["versions"].as_array().unwrap();
    let accepted =
        |v: &str| versions.iter().find(|x| x["version"] == v).unwrap()["accepted"].clone();
    assert_eq!(accepted("TLSv1.2"), true, "{versions:?}");
    assert_eq!(accepted("TLSv1.0"), false, "{versions:?}");
    let findings = doc["findings"].as_array().unwrap();
    let bypass: Vec<_> = findings
        .iter()
        .filter(|f| f["kind"] == "bypass_session")
        .collect();
    assert_eq!(bypass.len(), 1, "{doc:#}");
    let msg = bypass[0]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("pid {direct_id} ")), "{msg}");
    assert!(
        !doc.to_string().contains(&format!("pid {gw_thread} ")),
        "{doc:#}"
    );
    assert_eq!(app["sessions"]["through_gateway"], 1, "{app:#}");
    assert_eq!(app["sessions"]["total"], 2, "{app:#}");
    assert!(!doc.to_string().contains(&env.db.password));
}

/// An upstream MariaDB that also lets sessions in without TLS (`require_secure_transport`
/// off, the server's default) is a critical finding of `tollgate scan`; the one above (ON) is
/// not flagged.
#[test]
fn scan_flags_an_upstream_that_accepts_plaintext() {
    let env = MyEnv::start_with(MyOptions {
        plaintext: true,
        ..Default::default()
    });
    let doc = scan(&env);
    let app = &doc["resources"][0];
    assert_eq!(app["plaintext_accepted"], true, "{app:#}");
    let finding = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "plaintext_accepted")
        .unwrap_or_else(|| panic!("no plaintext finding: {doc:#}"));
    assert_eq!(finding["severity"], "critical", "{finding}");
    assert_eq!(finding["resource"], "app", "{finding}");
    let msg = finding["message"].as_str().unwrap();
    assert!(msg.contains("accepts unencrypted connections"), "{msg}");
    assert!(!doc.to_string().contains(&env.db.password));
}

/// `tollgate scan --json` of the gateway's config: it found something (exit 1).
fn scan(env: &MyEnv) -> serde_json::Value {
    let scan = Command::new(common::BIN)
        .args(["scan", "--json", "--min-days", "3", "--config"])
        .arg(&env.gw.config_path)
        .env_remove("TOLLGATE_CONFIG")
        .env("RUST_LOG", "error")
        .output()
        .expect("tollgate scan");
    assert_eq!(
        scan.status.code(),
        Some(1),
        "{}\n{}",
        out(&scan),
        err(&scan)
    );
    serde_json::from_slice(&scan.stdout).unwrap()
}

const CAPTURED: &str = r#"capture_results = true
[[resources.masks]]
columns = ["email"]
strategy = "redact"
except_groups = ["sre"]
"#;

/// A MySQL session is recorded as a PostgreSQL one: `tollgate sessions show` and `replay` give
/// the rows its client saw, masked, from the text and the binary protocol, and masked with
/// every rule even when the viewer was exempt or held an unmask grant; an approved unmask
/// review lifts masking for its requester only; `tollgate audit verify` checks the chain.
#[test]
fn sessions_replay_masked_rows_unmask_grants_apply_and_the_audit_verifies() {
    let https = tollgate_testsupport::free_port();
    let env = MyEnv::start_with(MyOptions {
        server_extra: format!(
            "https_listen = \"127.0.0.1:{https}\"\n\n[roles]\nadmin_groups = [\"sre\"]\n"
        ),
        resource_extra: CAPTURED.into(),
        ..Default::default()
    });
    let cli = |who: &IssuedFiles, args: &[&str]| gateway_cli(https, &env.pki.ca, who, args);
    let bob = env.pki.client("bob", &["ci"]);
    let select = "SELECT id, email FROM customers ORDER BY id";
    let as_bob = || mariadb(&env.args_as(&bob, "app", select));
    let o = as_bob();
    assert_eq!(out(&o), "1\t****\n2\t****\n", "{}", err(&o));
    // The binary protocol, through a prepared statement.
    let mut raw = env.raw_as(&bob, "app");
    let st = raw
        .prepare("SELECT id, email FROM customers WHERE id = ?")
        .unwrap();
    let Answer::Rows(rows) = raw.execute(st.id, 0, &["2"]) else {
        panic!("no rows")
    };
    assert_eq!(rows.len(), 1);
    drop(raw);
    // alice (sre) is exempt: she sees the e-mails, her record does not.
    let o = env.as_alice("app", select);
    assert!(out(&o).contains("ada@example.com"), "{}", err(&o));

    // bob asks for an unmasked view; pending, he is still masked; approved, he is not.
    let o = cli(
        &bob,
        &[
            "access", "request", "app", "--unmask", "--for", "10m", "--reason", "case 7", "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let review: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = review["id"].as_str().unwrap();
    assert_eq!(review["kind"], "unmask");
    assert!(!out(&as_bob()).contains("ada@"));
    let o = cli(&env.alice, &["reviews", "approve", id, "--reason", "ok"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_bob();
    assert_eq!(
        out(&o),
        "1\tada@example.com\n2\tbob@example.org\n",
        "{}",
        err(&o)
    );
    let carol = env.pki.client("carol", &["ci"]);
    let o = mariadb(&env.args_as(&carol, "app", select));
    assert!(!out(&o).contains("ada@"), "{}", out(&o));

    let evs = env.events();
    let granted = evs
        .iter()
        .find(|e| e["kind"] == "session.open" && e["payload"]["unmask_grant"].is_object())
        .expect("the unmasked session records its grant");
    assert_eq!(granted["payload"]["unmask_grant"]["review"], id);
    // Every captured row is masked: bob's, his binary one, alice's, bob's unmasked one.
    let captures: Vec<_> = evs
        .iter()
        .filter(|e| e["kind"] == "result" && e["payload"]["capture"].is_object())
        .map(|e| e["payload"]["capture"].clone())
        .collect();
    assert!(captures.len() >= 5, "{captures:?}");
    let record = serde_json::to_string(&captures).unwrap();
    assert!(!record.contains("@example"), "{record}");
    assert_eq!(captures[0]["columns"], serde_json::json!(["id", "email"]));
    assert_eq!(
        captures[0]["rows"],
        serde_json::json!([["1", "****"], ["2", "****"]])
    );
    assert_eq!(captures[1]["rows"], serde_json::json!([["2", "****"]]));

    // The same through the HTTPS API: show and replay of bob's first session.
    let session = evs
        .iter()
        .find(|e| e["kind"] == "result" && e["payload"]["capture"].is_object())
        .unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = cli(&env.alice, &["sessions", "show", &session, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let results: Vec<_> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| (e["kind"] == "result").then(|| e["payload"]["capture"].clone()))
        .collect();
    assert_eq!(results, [captures[0].clone()]);
    let o = cli(
        &env.alice,
        &["sessions", "replay", &session, "--speed", "0"],
    );
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains(&format!("SQL> {select}")), "{text}");
    assert!(
        text.contains("****") && !text.contains("@example"),
        "{text}"
    );

    let o = Command::new(common::BIN)
        .args(["audit", "verify", "--config"])
        .arg(&env.gw.config_path)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
}
