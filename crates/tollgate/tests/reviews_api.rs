//! The review (approval) workflow end to end: the real gateway's HTTPS API driven by the real
//! `tollgate access request` and `tollgate reviews` commands, with the review webhook received
//! by a local HTTP server and every step checked in the audit store.
//!
//! The PostgreSQL relay does not hold commands yet, so reviews are created as just-in-time
//! access and unmask requests; no PostgreSQL is needed (the resource's upstream is never dialled).

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tollgate_api::client::{ApiClient, ClientError, ClientOptions};
use tollgate_tls::pki::IssuedFiles;

struct Setup {
    gw: Gateway,
    https: u16,
    ca: PathBuf,
    alice: IssuedFiles,
    bob: IssuedFiles,
    mallory: IssuedFiles,
    olga: IssuedFiles,
    pia: IssuedFiles,
    hooks: mpsc::Receiver<(String, Value)>,
    dir: tempfile::TempDir,
}

/// A loopback HTTP receiver: every POST's path and JSON body go to the channel; answers 200.
fn webhook_receiver() -> (u16, mpsc::Receiver<(String, Value)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if tx
                .send((path, serde_json::from_slice(&body).unwrap()))
                .is_err()
            {
                return;
            }
        }
    });
    (port, rx)
}

/// The gateway with an HTTPS API, admins `ops`, one resource "app" whose access approvers are
/// `dba` and unmask approvers `privacy` (max 2h), and whose review webhook is the local receiver.
/// alice (agents) asks, bob (dba) approves access, pia (privacy) approves unmasking, mallory
/// (dev) may not approve, olga (ops) is an admin.
fn start() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("tollgate-rv-")
        .tempdir()
        .unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let gw_cert = pki.server("gateway");
    let https = tollgate_testsupport::free_port();
    let (hook_port, hooks) = webhook_receiver();
    std::fs::write(dir.path().join("app.password"), "unused").unwrap();
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{https}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "sqlite://audit.db"
console_url = "https://localhost:{https}/"

[roles]
admin_groups = ["ops"]
auditor_groups = ["audit"]

[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:1"
database = "app"
allow_groups = ["agents"]
access_approvers = ["dba"]
unmask_approvers = ["privacy"]
max_access = "2h"
review_webhook = "http://127.0.0.1:{hook_port}/hooks/app"
[resources.tls]
ca = "{ca}"
server_name = "localhost"
[resources.credentials]
user = "app"
password_file = "app.password"
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
    );
    let gw = Gateway::start(dir.path(), &config, &[]);
    Setup {
        gw,
        https,
        ca: pki.ca.clone(),
        alice: pki.client("alice", &["agents"]),
        bob: pki.client("bob", &["dba"]),
        mallory: pki.client("mallory", &["dev"]),
        olga: pki.client("olga", &["ops"]),
        pia: pki.client("pia", &["privacy"]),
        hooks,
        dir,
    }
}

impl Setup {
    fn cli(&self, who: &IssuedFiles, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env(
                "TOLLGATE_GATEWAY",
                format!("https://localhost:{}", self.https),
            )
            .env("TOLLGATE_CA", &self.ca)
            .env("TOLLGATE_CERT", &who.cert)
            .env("TOLLGATE_KEY", &who.key)
            .env_remove("TOLLGATE_TOKEN")
            .env("RUST_LOG", "warn");
        cmd
    }

    fn run(&self, who: &IssuedFiles, args: &[&str]) -> Output {
        self.cli(who, args).output().expect("run tollgate")
    }

    fn api(&self, who: &IssuedFiles) -> ApiClient {
        ApiClient::new(&ClientOptions {
            gateway: format!("https://localhost:{}", self.https),
            ca: Some(self.ca.clone()),
            cert: Some(who.cert.clone()),
            key: Some(who.key.clone()),
            token: None,
        })
        .unwrap()
    }

    fn events(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let db = self.dir.path().join("audit.db");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let evs = read_events(&db);
            if done(&evs) {
                return evs;
            }
            if std::time::Instant::now() > deadline {
                panic!("audit store never showed {what}: {evs:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tollgate failed ({}): {}\n{}",
        out.status,
        stderr(out),
        stdout(out)
    );
    stdout(out)
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", stdout(out));
    stderr(out)
}

fn status_of(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Status { status, body } => (status, body.error),
        other => panic!("expected an HTTP status, got {other}"),
    }
}

fn request_access(s: &Setup, dur: &str, reason: &str) -> String {
    let out = s.run(
        &s.alice,
        &["access", "request", "app", "--for", dur, "--reason", reason],
    );
    let id = ok(&out).lines().next().unwrap_or("").to_string();
    assert!(
        id.starts_with("rv_") && id.len() == 15,
        "{id:?}\n{}",
        stderr(&out)
    );
    id
}

#[test]
fn access_request_reviewed_through_the_cli_with_webhook_and_audit() {
    let s = start();

    // alice asks; the id is the first line, the rest goes to stderr.
    let out = s.run(
        &s.alice,
        &[
            "access",
            "request",
            "app",
            "--for",
            "1h",
            "--reason",
            "INC-42 hotfix",
        ],
    );
    let id = ok(&out);
    assert!(id.starts_with("rv_"), "{id}");
    let err = stderr(&out);
    assert!(err.contains("alice -> app for 1h; approvers: dba"), "{err}");
    assert!(
        err.contains(&format!(
            "review: https://localhost:{}/reviews/{id}",
            s.https
        )),
        "{err}"
    );

    // The resource's webhook got the generic JSON document with console links.
    let (path, doc) = s
        .hooks
        .recv_timeout(Duration::from_secs(10))
        .expect("webhook POST");
    assert_eq!(path, "/hooks/app");
    assert_eq!(doc["event"], "review.requested");
    assert_eq!(doc["review"]["id"], id.as_str());
    assert_eq!(doc["review"]["kind"], "access");
    assert_eq!(doc["review"]["requester"], "alice");
    assert_eq!(doc["review"]["reason"], "INC-42 hotfix");
    assert_eq!(doc["review"]["access_for_ms"], 3_600_000);
    assert_eq!(
        doc["approve_url"],
        format!("https://localhost:{}/reviews/{id}?action=approve", s.https)
    );
    wait_for(
        Duration::from_secs(5),
        "the delivered-notification metric",
        || {
            s.gw.metric("tollgate_review_notifications_total{result=\"delivered\"}") == Some(1)
        },
    );

    // Who sees it: the approver (bob) does, an outsider (mallory) does not.
    let list: Value =
        serde_json::from_str(&ok(&s.run(&s.bob, &["reviews", "list", "--json"]))).unwrap();
    let ids: Vec<&str> = list["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let table = ok(&s.run(&s.bob, &["reviews", "list"]));
    assert!(table.lines().next().unwrap().starts_with("ID "), "{table}");
    assert!(
        table.contains(&id)
            && table.contains("pending")
            && table.contains("access for 1h: INC-42 hotfix"),
        "{table}"
    );
    let none: Value =
        serde_json::from_str(&ok(&s.run(&s.mallory, &["reviews", "list", "--json"]))).unwrap();
    assert_eq!(none["reviews"], serde_json::json!([]));
    let (status, _) = status_of(
        s.api(&s.mallory)
            .get_json::<Value>(&format!("/api/v1/reviews/{id}"))
            .unwrap_err(),
    );
    assert_eq!(status, 404);

    // alice may not approve her own request; mallory is in no approver group.
    let err = failed(&s.run(&s.alice, &["reviews", "approve", &id]));
    assert!(
        err.contains("not allowed (403)") && err.contains("you requested this review"),
        "{err}"
    );
    let err = failed(&s.run(&s.mallory, &["reviews", "approve", &id]));
    assert!(
        err.contains("not allowed (403)") && err.contains("allowed groups: dba, ops"),
        "{err}"
    );

    // bob approves: access granted for an hour.
    let out = ok(&s.run(
        &s.bob,
        &["reviews", "approve", &id, "--reason", "ok for INC-42"],
    ));
    assert!(
        out.starts_with(&format!("{id}: approved; alice may reach app until ")),
        "{out}"
    );
    let err = failed(&s.run(&s.bob, &["reviews", "approve", &id]));
    assert!(
        err.contains("(409)") && err.contains("already approved"),
        "{err}"
    );
    let shown: Value =
        serde_json::from_str(&ok(&s.run(&s.alice, &["reviews", "show", &id, "--json"]))).unwrap();
    assert_eq!(shown["status"], "approved");
    assert_eq!(shown["decided_by"], "bob");
    assert_eq!(shown["votes"][0]["reason"], "ok for INC-42");
    let granted = shown["grant_until_unix_ms"].as_i64().unwrap()
        - shown["decided_at_unix_ms"].as_i64().unwrap();
    assert_eq!(granted, 3_600_000);

    // An admin may deny any review; a deny needs --reason.
    let second = request_access(&s, "30m", "look at the slow query");
    let err = failed(&s.run(&s.olga, &["reviews", "deny", &second]));
    assert!(err.contains("--reason"), "{err}");
    let out = ok(&s.run(
        &s.olga,
        &["reviews", "deny", &second, "--reason", "use the replica"],
    ));
    assert_eq!(out, format!("{second}: denied"));

    // Longer than max_access is refused before any review exists.
    let err = failed(&s.run(
        &s.alice,
        &["access", "request", "app", "--for", "3h", "--reason", "x"],
    ));
    assert!(
        err.contains("bad request (400)")
            && err.contains("3h is longer than this resource allows (2h"),
        "{err}"
    );

    // Bad bodies, unknown reviews and resources, as the API answers them.
    let alice = s.api(&s.alice);
    let bad = |body: Value| {
        status_of(
            alice
                .post_json::<Value>("/api/v1/access", &body)
                .unwrap_err(),
        )
    };
    let (st, msg) = bad(serde_json::json!({"resource": "app", "for": "forever", "reason": "x"}));
    assert_eq!(st, 400, "{msg}");
    assert!(msg.contains("\"for\""), "{msg}");
    let (st, msg) = bad(serde_json::json!({"resource": "app", "reason": "x"}));
    assert_eq!(st, 400, "{msg}");
    let (st, _) = bad(serde_json::json!({"resource": "nope", "for": "1h", "reason": "x"}));
    assert_eq!(st, 404);
    let (st, _) = status_of(
        s.api(&s.bob)
            .post_json::<Value>(
                "/api/v1/reviews/rv_aaaaaaaaaaaa/approve",
                &serde_json::json!({}),
            )
            .unwrap_err(),
    );
    assert_eq!(st, 404);
    let (st, msg) = status_of(
        s.api(&s.bob)
            .post_json::<Value>(
                &format!("/api/v1/reviews/{second}/approve"),
                &serde_json::json!({"why": 1}),
            )
            .unwrap_err(),
    );
    assert_eq!(st, 400, "{msg}");

    // --wait returns once bob approves.
    let mut waiting = s
        .cli(
            &s.alice,
            &[
                "access", "request", "app", "--for", "15m", "--reason", "deploy", "--wait",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(waiting.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let third = first.trim().to_string();
    assert!(third.starts_with("rv_"), "{first:?}");
    ok(&s.run(&s.bob, &["reviews", "approve", &third]));
    let out = wait_child(&mut waiting, Duration::from_secs(15));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("granted by bob until "),
        "{}",
        stderr(&out)
    );

    // The audit trail: each request, vote and decision, with reviewer and reason; the refused
    // self-approval as an api.write with status 403.
    let evs = s.events("the third decision", |evs| {
        evs.iter().filter(|e| e["kind"] == "review.decided").count() >= 3
    });
    let of = |kind: &str, review: &str| -> Vec<Value> {
        evs.iter()
            .filter(|e| e["kind"] == kind && e["payload"]["review"] == review)
            .map(|e| e["payload"].clone())
            .collect()
    };
    let requested = of("review.requested", &id);
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["requester"], "alice");
    assert_eq!(requested[0]["reason"], "INC-42 hotfix");
    let votes = of("review.vote", &id);
    assert_eq!(votes.len(), 1, "refused attempts are not votes");
    assert_eq!(
        (votes[0]["reviewer"].as_str(), votes[0]["reason"].as_str()),
        (Some("bob"), Some("ok for INC-42"))
    );
    let decided = of("review.decided", &second);
    assert_eq!(
        (
            decided[0]["status"].as_str(),
            decided[0]["decided_by"].as_str(),
            decided[0]["reason"].as_str()
        ),
        (Some("denied"), Some("olga"), Some("use the replica"))
    );
    let refused: Vec<&Value> = evs
        .iter()
        .filter(|e| {
            e["kind"] == "api.write"
                && e["payload"]["review"] == id.as_str()
                && e["payload"]["status"] == 403
        })
        .collect();
    assert_eq!(refused.len(), 2, "alice's and mallory's refused approvals");
    assert_eq!(refused[0]["payload"]["subject"], "alice");
    assert_eq!(
        refused[0]["payload"]["route"],
        "/api/v1/reviews/{id}/approve"
    );
}

#[test]
fn unmask_request_reviewed_through_the_cli_is_granted_apart_from_access_and_recorded() {
    let s = start();

    // alice asks to see "app" without masking.
    let out = s.run(
        &s.alice,
        &[
            "access",
            "request",
            "app",
            "--unmask",
            "--for",
            "1h",
            "--reason",
            "GDPR-7 subject export",
        ],
    );
    let id = ok(&out).trim().to_string();
    assert!(id.starts_with("rv_") && id.len() == 15, "{id:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "unmask review {id} requested: alice -> app without masking for 1h; approvers: privacy"
        )),
        "{err}"
    );

    // The webhook fires as for access reviews; the body says what is asked.
    let (path, doc) = s
        .hooks
        .recv_timeout(Duration::from_secs(10))
        .expect("webhook POST");
    assert_eq!(path, "/hooks/app");
    assert_eq!(doc["event"], "review.requested");
    assert_eq!(doc["review"]["id"], id.as_str());
    assert_eq!(doc["review"]["kind"], "unmask");
    assert_eq!(doc["review"]["approvers"], serde_json::json!(["privacy"]));
    assert_eq!(
        doc["text"],
        "alice asks to see app without masking for 1h: GDPR-7 subject export"
    );

    // An access request next to it, for the same person and resource.
    let access = request_access(&s, "2h", "INC-9");

    // The lists show the kind, and filter by it.
    let table = ok(&s.run(&s.olga, &["reviews", "list"]));
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("ID ") && header.contains(" KIND "),
        "{table}"
    );
    let row = |rid: &str| {
        table
            .lines()
            .find(|l| l.starts_with(rid))
            .unwrap_or_else(|| panic!("{rid} not in {table}"))
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row(&id), format!("{id} unmask pending"));
    assert_eq!(row(&access), format!("{access} access pending"));
    assert!(
        table.contains("unmask for 1h: GDPR-7 subject export"),
        "{table}"
    );
    let only: Value = serde_json::from_str(&ok(
        &s.run(&s.olga, &["reviews", "list", "--kind", "unmask", "--json"])
    ))
    .unwrap();
    let kinds: Vec<(&str, &str)> = only["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [(id.as_str(), "unmask")]);
    let err = failed(&s.run(&s.olga, &["reviews", "list", "--kind", "unmasked"]));
    assert!(
        err.contains("(400)") && err.contains("use command, access, unmask or pin"),
        "{err}"
    );

    // Access approvers do not decide unmasking; the requester never does.
    let err = failed(&s.run(&s.bob, &["reviews", "approve", &id]));
    assert!(
        err.contains("not allowed (403)") && err.contains("allowed groups: privacy, ops"),
        "{err}"
    );
    let err = failed(&s.run(&s.alice, &["reviews", "approve", &id]));
    assert!(err.contains("you requested this review"), "{err}");

    // pia approves through the CLI.
    let out = ok(&s.run(
        &s.pia,
        &["reviews", "approve", &id, "--reason", "scoped to GDPR-7"],
    ));
    assert!(
        out.starts_with(&format!(
            "{id}: approved; alice may see app without masking until "
        )),
        "{out}"
    );
    let shown: Value =
        serde_json::from_str(&ok(&s.run(&s.alice, &["reviews", "show", &id, "--json"]))).unwrap();
    assert_eq!(shown["kind"], "unmask");
    assert_eq!(shown["status"], "approved");
    assert_eq!(shown["requester"], "alice");
    assert_eq!(shown["resource"], "app");
    assert_eq!(shown["decided_by"], "pia");
    assert_eq!(shown["approvers"], serde_json::json!(["privacy"]));
    assert_eq!(shown["reason"], "GDPR-7 subject export");
    assert_eq!(shown["access_for_ms"], 3_600_000);
    assert_eq!(shown["votes"][0]["reviewer"], "pia");
    assert_eq!(shown["votes"][0]["reason"], "scoped to GDPR-7");
    let decided_at = shown["decided_at_unix_ms"].as_i64().unwrap();
    assert_eq!(
        shown["grant_until_unix_ms"].as_i64().unwrap() - decided_at,
        3_600_000
    );
    let text = ok(&s.run(&s.alice, &["reviews", "show", &id]));
    assert!(
        text.contains("kind       unmask\n")
            && text.contains("asks       unmask for 1h: GDPR-7 subject export\n"),
        "{text}"
    );

    // In the gateway's store: an unmask grant, and (the access request still pending) no access.
    let store = tollgate_store::SqliteStore::open(s.dir.path().join("audit.db")).unwrap();
    let g = tollgate_store::Store::unmask_grant(
        &store,
        tollgate_store::Requester::Subject("alice"),
        "app",
        decided_at,
    )
    .unwrap()
    .expect("an unmask grant");
    assert_eq!(
        (g.review_id.as_str(), g.kind.as_str()),
        (id.as_str(), "unmask")
    );
    assert!(
        tollgate_store::Store::access_grant(
            &store,
            tollgate_store::Requester::Subject("alice"),
            "app",
            decided_at
        )
        .unwrap()
        .is_none(),
        "approving unmasking grants no access"
    );
    ok(&s.run(&s.bob, &["reviews", "approve", &access]));
    let a = tollgate_store::Store::access_grant(
        &store,
        tollgate_store::Requester::Subject("alice"),
        "app",
        decided_at + 60_000,
    )
    .unwrap()
    .expect("an access grant");
    assert_eq!(
        (a.review_id.as_str(), a.kind.as_str()),
        (access.as_str(), "access")
    );
    assert_eq!(
        tollgate_store::Store::unmask_grant(
            &store,
            tollgate_store::Requester::Subject("alice"),
            "app",
            decided_at + 60_000
        )
        .unwrap()
        .map(|g| g.review_id),
        Some(id.clone()),
        "the later, longer access grant is not an unmask grant"
    );

    // Longer than max_access, and bad bodies, are refused before any review exists.
    let alice = s.api(&s.alice);
    let (st, msg) = status_of(
        alice
            .post_json::<Value>(
                "/api/v1/access",
                &serde_json::json!({"resource": "app", "for": "3h", "reason": "x", "unmask": true}),
            )
            .unwrap_err(),
    );
    assert_eq!(st, 400, "{msg}");
    assert!(
        msg.contains("3h is longer than this resource allows (2h"),
        "{msg}"
    );
    let (st, msg) = status_of(
        alice
            .post_json::<Value>(
                "/api/v1/access",
                &serde_json::json!({"resource": "app", "for": "1h", "reason": "x", "unmask": "yes"}),
            )
            .unwrap_err(),
    );
    assert_eq!(st, 400, "{msg}");

    // The audit trail: request, vote and decision, each saying kind unmask; bob's refused
    // approval as an api.write with status 403.
    let evs = s.events("both decisions", |evs| {
        evs.iter().filter(|e| e["kind"] == "review.decided").count() >= 2
    });
    let of = |kind: &str| -> Vec<Value> {
        evs.iter()
            .filter(|e| e["kind"] == kind && e["payload"]["review"] == id.as_str())
            .map(|e| e["payload"].clone())
            .collect()
    };
    let requested = of("review.requested");
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["review_kind"], "unmask");
    assert_eq!(requested[0]["requester"], "alice");
    assert_eq!(requested[0]["resource"], "app");
    assert_eq!(requested[0]["reason"], "GDPR-7 subject export");
    assert_eq!(requested[0]["access_for_ms"], 3_600_000);
    assert_eq!(requested[0]["approvers"], serde_json::json!(["privacy"]));
    let votes = of("review.vote");
    assert_eq!(votes.len(), 1, "refused attempts are not votes");
    assert_eq!(
        (
            votes[0]["review_kind"].as_str(),
            votes[0]["reviewer"].as_str(),
            votes[0]["reason"].as_str()
        ),
        (Some("unmask"), Some("pia"), Some("scoped to GDPR-7"))
    );
    let decided = of("review.decided");
    assert_eq!(decided.len(), 1);
    assert_eq!(
        (
            decided[0]["review_kind"].as_str(),
            decided[0]["status"].as_str(),
            decided[0]["decided_by"].as_str(),
            decided[0]["grant_until_unix_ms"].as_i64()
        ),
        (
            Some("unmask"),
            Some("approved"),
            Some("pia"),
            shown["grant_until_unix_ms"].as_i64()
        )
    );
    let access_requested: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "review.requested" && e["payload"]["review"] == access.as_str())
        .collect();
    assert_eq!(access_requested[0]["payload"]["review_kind"], "access");
    let refused: Vec<&Value> = evs
        .iter()
        .filter(|e| {
            e["kind"] == "api.write"
                && e["payload"]["review"] == id.as_str()
                && e["payload"]["status"] == 403
        })
        .collect();
    assert_eq!(refused.len(), 2, "bob's and alice's refused approvals");
    assert_eq!(refused[0]["payload"]["subject"], "bob");
}

fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Output {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the waiting `tollgate access request --wait` did not return");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    }
}
