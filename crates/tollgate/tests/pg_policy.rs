//! Guardrails and reviews on the wire, with real clients: a denied DROP, bypass attempts
//! caught, a read-only resource, a DELETE held until approved with `tollgate reviews approve`
//! (and the approval-to-execution time measured), an UPDATE denied with a reason, a review
//! that expires, self-approval refused, two approvals required, a client that disconnects or
//! cancels while held, and just-in-time access.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_testsupport::ClusterOptions;
use tollgate_tls::pki::IssuedFiles;

struct Setup {
    env: Env,
    https: u16,
    /// ci: the agent whose deletes and updates need review.
    bob: IssuedFiles,
    /// ops: a second approver.
    olga: IssuedFiles,
}

/// With result capture on, so the relay also tracks result shapes (and injects Describes)
/// while refusing and holding: the read-only test covers the path without.
const RULES: &str = r#"review_timeout = "8s"
capture_results = true
[[resources.rules]]
name = "no-drop"
statements = ["drop", "truncate", "do"]
action = "deny"
message = "dropping or truncating tables is not allowed through tollgate"
[[resources.rules]]
name = "agent-deletes"
statements = ["delete"]
groups = ["ci"]
action = "review"
approvers = ["sre"]
[[resources.rules]]
name = "two-person-update"
statements = ["update"]
groups = ["ci"]
action = "review"
approvers = ["sre", "ops"]
min_approvals = 2
"#;

fn start(resource_extra: &str) -> Setup {
    let https = tollgate_testsupport::free_port();
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            init_sql: vec![
                "CREATE TABLE items (id int PRIMARY KEY, name text)".into(),
                "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g".into(),
            ],
            ..Default::default()
        },
        server_extra: format!(
            "https_listen = \"127.0.0.1:{https}\"\n\n[roles]\nadmin_groups = []\nauditor_groups = [\"sre\"]\n"
        ),
        resource_extra: resource_extra.into(),
        ..Default::default()
    });
    let bob = env.pki.client("bob", &["ci"]);
    let olga = env.pki.client("olga", &["ops", "ci"]);
    Setup {
        env,
        https,
        bob,
        olga,
    }
}

impl Setup {
    fn reviews(&self, who: &IssuedFiles, args: &[&str]) -> Output {
        reviews_cli(self.https, &self.env.pki.ca, who, args)
    }

    /// The pending review of `statement_prefix`, once the held session has opened it.
    fn pending(&self, statement_prefix: &str) -> Value {
        pending_review(
            self.https,
            &self.env.pki.ca,
            &self.env.alice,
            statement_prefix,
        )
    }

    /// psql as `who` in the background.
    fn psql_bg(&self, who: &IssuedFiles, sql: &str) -> Child {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(self.env.conninfo_as(who, "app"))
            .args(["-c", sql])
            .env_remove("PGPASSWORD")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn psql_as(s: &Setup, who: &IssuedFiles, sql: &str) -> Output {
    s.env.psql(&s.env.conninfo_as(who, "app"), &["-c", sql])
}

fn count(s: &Setup) -> i64 {
    let out = psql_as(s, &s.env.alice, "SELECT count(*) FROM items");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().parse().unwrap()
}

#[test]
fn denied_statements_and_bypasses_are_refused_before_they_reach_the_database() {
    let s = start(RULES);
    let out = psql_as(&s, &s.bob, "DROP TABLE items");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("dropping or truncating tables is not allowed"),
        "{err}"
    );
    assert!(err.contains("no-drop"), "{err}");

    // Bypass attempts the real grammar sees through, each refused with the rule's message.
    for sql in [
        "/* harmless */ dRoP tAbLe \"items\"",
        "SELECT 1; DROP TABLE items",
        "DO $$ BEGIN EXECUTE 'DROP TABLE items'; END $$",
        "TRUNCATE items",
    ] {
        let out = psql_as(&s, &s.bob, sql);
        assert!(!out.status.success(), "{sql} was not refused");
        let err = stderr(&out);
        assert!(
            err.contains("42501") || err.contains("not allowed"),
            "{sql}: {err}"
        );
    }
    // (DO runs code the parser cannot see into, so the rule lists it.)
    assert_eq!(count(&s), 10);

    // A refused statement inside a transaction aborts it, exactly like a server error.
    let out = s.env.psql(
        &s.env.conninfo_as(&s.bob, "app"),
        &[
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "BEGIN; INSERT INTO items VALUES (99, 'x'); DROP TABLE items; COMMIT;",
        ],
    );
    assert!(stderr(&out).contains("not allowed"), "{}", stderr(&out));
    assert_eq!(
        count(&s),
        10,
        "the INSERT before the refused DROP must not commit"
    );

    // Extended protocol: a DELETE hidden in a CTE, prepared by tokio-postgres, is held like any
    // DELETE (here: refused after its review expires would take 8 s; a DROP is enough).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = s.env.client_as(&s.bob, "app").await;
        let e = c
            .execute("DROP TABLE IF EXISTS items", &[])
            .await
            .expect_err("DROP over the extended protocol must be refused");
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
        // The session goes on.
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 10);
    });

    let events = s.env.events_until("deny decisions", |evs| {
        evs.iter()
            .filter(|e| e["kind"] == "command" && e["payload"]["decision"]["action"] == "deny")
            .count()
            >= 6
    });
    let denied = events
        .iter()
        .find(|e| e["kind"] == "command" && e["payload"]["decision"]["action"] == "deny")
        .unwrap();
    assert_eq!(denied["payload"]["decision"]["rule"], "no-drop");
    assert!(denied["payload"]["classification"].is_object(), "{denied}");
}

#[test]
fn read_only_resource_refuses_writes_and_cannot_be_switched_back() {
    let s = start("read_only = true\n");
    for sql in [
        "INSERT INTO items VALUES (50, 'x')",
        "WITH d AS (DELETE FROM items RETURNING *) SELECT count(*) FROM d",
        "EXPLAIN ANALYZE DELETE FROM items",
        "SET default_transaction_read_only = off",
        "SELECT pg_terminate_backend(1)",
        "PREPARE p AS DELETE FROM items; EXECUTE p",
    ] {
        let out = psql_as(&s, &s.bob, sql);
        assert!(!out.status.success(), "{sql} ran on a read-only resource");
        assert!(
            stderr(&out).contains("read-only"),
            "{sql}: {}",
            stderr(&out)
        );
    }
    let out = psql_as(&s, &s.bob, "SELECT count(*) FROM items");
    assert_eq!(stdout(&out).trim(), "10", "{}", stderr(&out));
    // Even a statement the policy cannot see into (a function that writes) meets a read-only
    // upstream session.
    let out = psql_as(&s, &s.bob, "SHOW default_transaction_read_only");
    assert_eq!(stdout(&out).trim(), "on", "{}", stderr(&out));
}

#[test]
fn held_delete_runs_when_approved_and_held_update_needs_two_approvers() {
    let s = start(RULES);
    // bob's DELETE waits; alice approves it from the CLI; psql gets the row count.
    let child = s.psql_bg(
        &s.bob,
        "DELETE FROM items WHERE id <= 3 RETURNING (extract(epoch from clock_timestamp()) * 1000)::bigint",
    );
    let review = s.pending("DELETE FROM items");
    let id = review["id"].as_str().unwrap().to_string();
    assert_eq!(review["status"], "pending");
    assert_eq!(review["rule"], "agent-deletes");
    assert_eq!(count(&s), 10, "nothing ran while held");

    // bob cannot approve his own request.
    let out = s.reviews(&s.bob, &["approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("you requested this review"),
        "{}",
        stderr(&out)
    );

    let out = s.reviews(
        &s.env.alice,
        &["approve", &id, "--reason", "cleanup ok", "--json"],
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
    assert_eq!(count(&s), 7);
    // Approval to execution, by the database's own clock: reported, not asserted.
    let executed_ms: i64 = text.lines().next().unwrap().trim().parse().unwrap();
    let approved_ms = decided["decided_at_unix_ms"]
        .as_i64()
        .expect("decided_at_unix_ms");
    eprintln!(
        "approval-to-execution: {} ms (review {id})",
        executed_ms - approved_ms
    );

    // An UPDATE needs two distinct approvers: one approval is not enough.
    let child = s.psql_bg(&s.bob, "UPDATE items SET name = 'renamed' WHERE id = 5");
    let id = s.pending("UPDATE items")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.reviews(&s.env.alice, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(500));
    let out = psql_as(&s, &s.env.alice, "SELECT name FROM items WHERE id = 5");
    assert_eq!(
        stdout(&out).trim(),
        "item 5",
        "ran after one approval of two"
    );
    let out = s.reviews(&s.olga, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = child.wait_with_output().unwrap();
    assert!(stdout(&out).contains("UPDATE 1"), "{}", stderr(&out));

    // A held UPDATE that is denied returns the reviewer's reason.
    let child = s.psql_bg(&s.bob, "UPDATE items SET name = 'no' WHERE id = 6");
    let id = s.pending("UPDATE items SET name = 'no'")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.reviews(
        &s.env.alice,
        &["deny", &id, "--reason", "not during the freeze"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("not during the freeze") && err.contains("denied by alice"),
        "{err}"
    );

    let events = s.env.events_until("review events", |evs| {
        evs.iter().any(|e| e["kind"] == "review.refused")
    });
    for kind in ["review.approved", "review.refused"] {
        assert!(events.iter().any(|e| e["kind"] == kind), "no {kind}");
    }
    let held = events
        .iter()
        .find(|e| e["kind"] == "command" && e["payload"]["decision"]["action"] == "review")
        .unwrap();
    assert!(held["payload"]["review"].as_str().is_some(), "{held}");
}

#[test]
fn held_statements_expire_and_are_withdrawn_by_disconnect_or_cancel() {
    let s = start(RULES);
    // Nobody decides: the review expires and the client gets an error saying so.
    let started = Instant::now();
    let out = psql_as(&s, &s.bob, "DELETE FROM items WHERE id = 1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("expired"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "expired too early"
    );
    assert_eq!(count(&s), 10);

    // A client that goes away while held withdraws its request.
    let mut child = s.psql_bg(&s.bob, "DELETE FROM items WHERE id = 2");
    let id = s.pending("DELETE FROM items WHERE id = 2")["id"]
        .as_str()
        .unwrap()
        .to_string();
    child.kill().unwrap();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = s.reviews(&s.env.alice, &["show", &id, "--json"]);
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if r["status"] == "withdrawn" {
            break;
        }
        assert!(Instant::now() < deadline, "not withdrawn: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A cancel (what Ctrl-C in psql sends) withdraws it too, and the client is told.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(s.env.client_as(&s.bob, "app"));
    let token = c.cancel_token();
    let held = rt.spawn(async move { c.batch_execute("DELETE FROM items WHERE id = 3").await });
    assert_eq!(
        s.pending("DELETE FROM items WHERE id = 3")["status"],
        "pending"
    );
    let tls = client_tls(&s.env.pki.ca, Some(&s.bob));
    rt.block_on(token.cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
        .unwrap();
    let e = rt
        .block_on(held)
        .unwrap()
        .expect_err("the cancelled statement must fail");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert_eq!(count(&s), 10);
}

#[test]
fn just_in_time_access_opens_a_resource_until_the_grant_ends() {
    let s = start("access_approvers = [\"sre\"]\n");
    // mallory is in no allowed group: refused.
    let mallory = s.env.pki.client("mallory", &["contractors"]);
    let out = psql_as(&s, &mallory, "SELECT 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(BIN)
        .args([
            "access",
            "request",
            "app",
            "--for",
            "10m",
            "--reason",
            "incident 42",
            "--json",
        ])
        .env("TOLLGATE_GATEWAY", format!("https://localhost:{}", s.https))
        .env("TOLLGATE_CA", &s.env.pki.ca)
        .arg("--cert")
        .arg(&mallory.cert)
        .arg("--key")
        .arg(&mallory.key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = r["id"].as_str().unwrap();
    // Still closed while pending.
    assert!(!psql_as(&s, &mallory, "SELECT 1").status.success());
    let out = s.reviews(&s.env.alice, &["approve", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = psql_as(&s, &mallory, "SELECT 40 + 2");
    assert_eq!(stdout(&out).trim(), "42", "{}", stderr(&out));
}

#[test]
fn an_approval_outlives_a_gateway_restart_and_runs_the_same_statement_once() {
    let mut s = start(RULES);
    let sql = "DELETE FROM items WHERE id = 9";
    let child = s.psql_bg(&s.bob, sql);
    let id = s.pending(sql)["id"].as_str().unwrap().to_string();
    // The gateway goes away while the statement is held: the client loses its connection.
    let template = s.env.gw.config_template();
    s.env.gw.kill();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    s.env.gw = Gateway::start(s.env.tmp.path(), &template, &[]);
    assert_eq!(count(&s), 10);
    // The review is kept; approved on the new gateway, the same statement by the same identity
    // runs without a new review ...
    let out = s.reviews(&s.env.alice, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = psql_as(&s, &s.bob, sql);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("DELETE 1"), "{}", stdout(&out));
    assert_eq!(count(&s), 9);
    // ... once: the approval is used up, so the next run is held again.
    let mut child = s.psql_bg(&s.bob, sql);
    let again = s.pending(sql);
    assert_ne!(again["id"].as_str().unwrap(), id);
    child.kill().unwrap();
    let _ = child.wait();
    let events = s.env.events_until("the rerun", |evs| {
        evs.iter().any(|e| e["kind"] == "review.rerun")
    });
    assert!(
        events.iter().any(|e| e["kind"] == "review.used"),
        "no review.used"
    );
}

#[test]
fn a_review_shows_and_binds_to_the_exact_statement_and_its_parameters() {
    let mut s = start(&format!(
        "{RULES}[[resources.masks]]\ndetectors = [\"pem_private_key\", \"email\"]\nstrategy = \"redact\"\n"
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sql = "DELETE FROM items WHERE id = $1";
    // bob's parameterised DELETE (extended protocol) is held: the reviewer sees the full
    // text, the bound parameter and the digest the approval binds to.
    let c = rt.block_on(s.env.client_as(&s.bob, "app"));
    let c = Arc::new(c);
    let runner = {
        let c = c.clone();
        rt.spawn(async move { c.execute(sql, &[&9i32]).await })
    };
    let review = s.pending(sql);
    let shown = review["statement"].as_str().unwrap().to_string();
    assert!(shown.contains("-- parameters: $1 = "), "{shown}");
    assert!(shown.contains("-- digest: sha256:"), "{shown}");
    assert!(shown.contains("delete"), "{shown}");
    let id = review["id"].as_str().unwrap().to_string();
    // The gateway goes away while it is held; approved afterwards, only the identical
    // statement with the identical parameter runs without a new review.
    let template = s.env.gw.config_template();
    s.env.gw.kill();
    assert!(rt.block_on(runner).unwrap().is_err());
    drop(c);
    s.env.gw = Gateway::start(s.env.tmp.path(), &template, &[]);
    let out = s.reviews(&s.env.alice, &["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c = Arc::new(rt.block_on(s.env.client_as(&s.bob, "app")));
    // Another parameter is another statement: held again.
    let other = {
        let c = c.clone();
        rt.spawn(async move { c.execute(sql, &[&8i32]).await })
    };
    let again = s.pending(sql);
    assert_ne!(again["id"].as_str().unwrap(), id);
    assert_eq!(count(&s), 10);
    let out = s.reviews(
        &s.env.alice,
        &["deny", again["id"].as_str().unwrap(), "--reason", "no"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let e = rt.block_on(other).unwrap().expect_err("denied");
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    // The approved one runs, once.
    let n = rt
        .block_on(c.execute(sql, &[&9i32]))
        .expect("the approved DELETE runs");
    assert_eq!(n, 1);
    assert_eq!(count(&s), 9);

    // A value that looks like the start of a private key cannot hide the statement after it
    // from the reviewer: values are masked inside their literal only.
    let hidden = "SELECT '-----BEGIN RSA PRIVATE KEY-----' AS k; DELETE FROM items WHERE id = 4";
    let mut child = s.psql_bg(&s.bob, hidden);
    let review = s.pending("SELECT ");
    let shown = review["statement"].as_str().unwrap();
    assert!(
        shown.contains("; DELETE FROM items WHERE id = 4"),
        "the reviewer must see the DELETE: {shown}"
    );
    assert!(!shown.contains("BEGIN RSA PRIVATE KEY"), "{shown}");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn a_review_of_execute_shows_what_the_prepared_name_runs() {
    let s = start(RULES);
    let mut child = s.psql_bg(
        &s.bob,
        "PREPARE q(int) AS DELETE FROM items WHERE id = $1; EXECUTE q(5)",
    );
    let review = s.pending("PREPARE q");
    let shown = review["statement"].as_str().unwrap();
    assert!(
        shown.contains("-- EXECUTE q runs: PREPARE q(int) AS DELETE FROM items WHERE id = $1"),
        "{shown}"
    );
    assert!(shown.contains("-- q is: delete"), "{shown}");
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(count(&s), 10);
}
