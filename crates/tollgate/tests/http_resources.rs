//! HTTP resources end to end: real curl through the real gateway to a real HTTPS upstream
//! with its own certificate. Identity both ways, header injection and stripping, rules on the
//! normalised request, review holds, masking of JSON and text (streamed), SSE, recording.

mod common;

use common::http_env::{HttpEnv, HttpEnvOptions, UPSTREAM_SECRET};
use common::upstream::CUSTOMER;
use common::{wait_for, TOKEN};
use std::process::Command;
use std::time::Duration;
use tollgate_tls::pki::IssuedFiles;

impl HttpEnv {
    /// curl as `who` (a certificate), or with the service token when `None`.
    fn curl(&self, who: Option<&IssuedFiles>, args: &[&str]) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&self.pki.ca);
        match who {
            Some(w) => {
                cmd.arg("--cert").arg(&w.cert).arg("--key").arg(&w.key);
            }
            None => {
                cmd.args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
            }
        }
        let out = cmd.args(args).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn json(&self, who: Option<&IssuedFiles>, args: &[&str]) -> (u16, serde_json::Value) {
        let (code, body) = self.curl(who, args);
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {body}\n{}", self.gw.logs()));
        (code, v)
    }

    /// The pending review's id, as an approver sees it in the API.
    fn pending_review(&self) -> String {
        let mut id = String::new();
        wait_for(Duration::from_secs(15), "a pending review", || {
            let (_, v) = self.json(
                Some(&self.alice),
                &[&format!(
                    "https://localhost:{}/api/v1/reviews?status=pending",
                    self.https_port
                )],
            );
            match v["reviews"].as_array().and_then(|a| a.first()) {
                Some(r) => {
                    id = r["id"].as_str().unwrap().to_string();
                    true
                }
                None => false,
            }
        });
        id
    }
}

/// How the test upstream echoes the injected credential.
fn secret_digest() -> String {
    format!("sha256:{}", common::sha256_hex(UPSTREAM_SECRET))
}

fn header<'a>(echo: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    echo["headers"][name].as_str()
}

#[test]
fn identity_injection_and_header_hygiene() {
    let env = HttpEnv::start("", "");
    // A certificate holder: the upstream sees the injected credential, never the client's.
    let (code, echo) = env.json(
        Some(&env.alice),
        &[
            // Connection-specific headers exist in HTTP/1.1 only.
            "--http1.1",
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "X-Original-URL: /admin/users",
            "-H",
            "X-Rewrite-URL: /admin/users",
            "-H",
            "X-Tollgate-Identity: forged",
            "-H",
            "Cookie: tollgate_session=abc; theme=dark",
            "-H",
            "Proxy-Authorization: Basic Zm9vOmJhcg==",
            "-H",
            "Connection: keep-alive, X-Secret-Hop",
            "-H",
            "X-Secret-Hop: 1",
            &env.url("/v1/echo?x=1&y=two"),
        ],
    );
    assert_eq!(code, 200, "{echo}");
    assert_eq!(echo["path"], "/v1/echo");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(
        header(&echo, "authorization"),
        Some(secret_digest().as_str())
    );
    assert_eq!(header(&echo, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(&echo, "x-forwarded-proto"), Some("https"));
    assert_eq!(header(&echo, "cookie"), Some("theme=dark"));
    assert_eq!(header(&echo, "x-tollgate-identity"), None);
    assert_eq!(
        header(&echo, "x-original-url"),
        None,
        "a target override rode along"
    );
    assert_eq!(header(&echo, "x-rewrite-url"), None);
    assert_eq!(header(&echo, "proxy-authorization"), None);
    assert_eq!(
        header(&echo, "x-secret-hop"),
        None,
        "a Connection-listed header is hop-by-hop"
    );
    assert_eq!(
        header(&echo, "host"),
        Some(format!("localhost:{}", env.up.port).as_str())
    );

    // A service token: the token is the gateway's credential and goes no further.
    let (code, echo) = env.json(None, &[&env.url("/echo")]);
    assert_eq!(code, 200);
    assert_eq!(
        header(&echo, "authorization"),
        Some(secret_digest().as_str())
    );
    assert!(!echo.to_string().contains(TOKEN));

    // Responses on the API's origin are sandboxed.
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--cacert"])
        .arg(&env.pki.ca)
        .args([
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            &env.url("/x"),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains("content-security-policy: sandbox"), "{head}");

    // Who may not reach it: unauthenticated, a wrong token, a group not allowed, an unknown
    // resource (which looks the same as a forbidden one).
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(&env.pki.ca)
        .arg(env.url("/echo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n401"), "{text}");
    assert!(text.contains("authentication required"), "{text}");
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(&env.pki.ca)
        .args(["-H", "Authorization: Bearer wrong", &env.url("/echo")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n401") && text.contains("the token is not valid"),
        "{text}"
    );
    let (code, v) = env.json(Some(&env.bob), &[&env.url("/echo")]);
    assert_eq!(code, 403);
    assert_eq!(v["code"], "forbidden");
    let (code, v2) = env.json(
        Some(&env.bob),
        &[&format!("https://localhost:{}/r/nope/echo", env.https_port)],
    );
    assert_eq!(code, 403);
    assert_eq!(
        v["error"].as_str().unwrap().replace("billing", "X"),
        v2["error"].as_str().unwrap().replace("nope", "X")
    );
    // Nothing the refused callers sent reached the upstream.
    assert_eq!(env.up.seen.count(), 3);

    // The record: sessions with subject and resource, requests and responses, no secrets.
    let evs = env.events_until("three http.response events", |evs| {
        evs.iter().filter(|e| e["kind"] == "http.response").count() >= 3
    });
    let opens: Vec<_> = evs
        .iter()
        .filter(|e| e["kind"] == "session.open" && e["payload"]["resource"] == "billing")
        .collect();
    assert!(
        opens
            .iter()
            .any(|e| e["payload"]["subject"] == "alice" && e["payload"]["auth_method"] == "cert"),
        "{opens:#?}"
    );
    assert!(opens
        .iter()
        .any(|e| e["payload"]["subject"] == "ci-bot" && e["payload"]["auth_method"] == "token"));
    let req = evs
        .iter()
        .find(|e| e["kind"] == "http.request" && e["payload"]["path"] == "/v1/echo")
        .unwrap();
    assert_eq!(req["payload"]["method"], "GET");
    assert_eq!(req["payload"]["decision"]["action"], "allow");
    let all = serde_json::to_string(&evs).unwrap();
    assert!(
        !all.contains(TOKEN),
        "the client's token is in the audit trail"
    );
    assert!(
        !all.contains("upstream-secret"),
        "the injected credential is in the audit trail"
    );
    assert!(
        !all.contains("Zm9vOmJhcg"),
        "a proxy credential is in the audit trail"
    );
}

#[test]
fn rules_judge_the_normalised_request() {
    let env = HttpEnv::start(
        "",
        r#"[[resources.rules]]
name = "no admin"
paths = ["/admin/**"]
action = "deny"
message = "the admin API is not for agents"
[[resources.rules]]
name = "no invoice deletes"
methods = ["DELETE"]
paths = ["/v1/invoices/*"]
action = "deny"
[[resources.rules]]
name = "no dry runs off"
query = { dry_run = "false" }
action = "deny"
"#,
    );
    let denied = |args: &[&str]| {
        let (code, v) = env.json(Some(&env.alice), args);
        assert_eq!(code, 403, "{args:?}: {v}");
        assert_eq!(v["code"], "denied", "{args:?}: {v}");
        v
    };
    let v = denied(&[&env.url("/admin/users")]);
    assert_eq!(v["rule"], "no admin");
    assert_eq!(v["error"], "the admin API is not for agents");
    // Spellings of the same path.
    denied(&["--path-as-is", &env.url("/v1/../admin/users")]);
    denied(&["--path-as-is", &env.url("/v1/%2e%2e/admin/users")]);
    denied(&[&env.url("//admin//users")]);
    denied(&[&env.url("/%61dmin/users")]);
    denied(&[&env.url("/admin;jsessionid=x/users")]);
    denied(&[&env.url("/ADMIN/users")]);
    // Methods, including an override header a framework would honour.
    denied(&["-X", "DELETE", &env.url("/v1/invoices/7")]);
    denied(&[
        "-X",
        "POST",
        "-H",
        "X-HTTP-Method-Override: DELETE",
        &env.url("/v1/invoices/7"),
    ]);
    denied(&[&env.url("/v1/invoices?dry_run=false")]);
    denied(&[&env.url("/v1/invoices?dry%5Frun=fals%65")]);
    // An encoded separator is refused outright (the rules and the upstream could read it differently).
    let (code, v) = env.json(Some(&env.alice), &[&env.url("/admin%2fusers")]);
    assert_eq!(code, 400, "{v}");
    let (code, v) = env.json(Some(&env.alice), &[&env.url("/v1%5cadmin")]);
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        env.up.seen.count(),
        0,
        "a refused request reached the upstream: {:?}",
        env.up.seen.all()
    );

    // What is allowed reaches the upstream exactly as it was judged.
    let (code, v) = env.json(
        Some(&env.alice),
        &["--path-as-is", &env.url("/v1//invoices/./7/../8")],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["path"], "/v1/invoices/8");
    let (code, _) = env.json(
        Some(&env.alice),
        &["-X", "GET", &env.url("/v1/invoices/7?dry_run=true")],
    );
    assert_eq!(code, 200);

    let evs = env.events_until("denials recorded", |evs| {
        evs.iter()
            .filter(|e| e["kind"] == "http.request" && e["payload"]["decision"]["action"] == "deny")
            .count()
            >= 10
    });
    let override_ev = evs
        .iter()
        .find(|e| e["kind"] == "http.request" && e["payload"]["method"] == "POST as DELETE")
        .expect("the override is recorded");
    assert_eq!(
        override_ev["payload"]["decision"]["rule"],
        "no invoice deletes"
    );
}

#[test]
fn held_requests_wait_for_review() {
    let env = HttpEnv::start(
        "review_timeout = \"4s\"",
        r#"[[resources.rules]]
name = "refunds"
methods = ["POST"]
paths = ["/v1/invoices/*/refund"]
action = "review"
approvers = ["sre"]
"#,
    );
    // ci-bot's refund is held until alice approves it with the CLI.
    let url = env.url("/v1/invoices/42/refund");
    let held = {
        let (ca, url) = (env.pki.ca.clone(), url.clone());
        std::thread::spawn(move || {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "-w",
                    "\n%{http_code}",
                    "--max-time",
                    "30",
                    "--cacert",
                ])
                .arg(&ca)
                .args([
                    "-H",
                    &format!("Authorization: Bearer {TOKEN}"),
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    r#"{"amount":10}"#,
                    &url,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let id = env.pending_review();
    assert_eq!(
        env.up.seen.count(),
        0,
        "a held request reached the upstream"
    );
    let (_, review) = env.json(
        Some(&env.alice),
        &[&format!(
            "https://localhost:{}/api/v1/reviews/{id}",
            env.https_port
        )],
    );
    let statement = review["statement"].as_str().unwrap();
    assert!(
        statement.starts_with("POST /v1/invoices/42/refund"),
        "{statement}"
    );
    let out = env.cli(&env.alice, &["reviews", "approve", &id, "--reason", "ok"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = held.join().unwrap();
    assert!(text.ends_with("\n200"), "{text}");
    let seen = env.up.seen.all();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["body"], r#"{"amount":10}"#);

    // Prefer: respond-async → 202 with the review; the identical request runs once approved;
    // a different body is a different request.
    let ask = |body: &str| {
        env.json(
            None,
            &[
                "-H",
                "Prefer: respond-async",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                &url,
            ],
        )
    };
    let (code, v) = ask(r#"{"amount":99}"#);
    assert_eq!(code, 202, "{v}");
    let id = v["review"].as_str().unwrap().to_string();
    assert_eq!(v["rule"], "refunds");
    let out = env.cli(&env.alice, &["reviews", "approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, v) = ask(r#"{"amount":100}"#);
    assert_eq!(code, 202, "an approval of one body ran another: {v}");
    let (code, _) = ask(r#"{"amount":99}"#);
    assert_eq!(code, 200);
    assert_eq!(env.up.seen.count(), 2);
    // The approval ran once.
    let (code, _) = ask(r#"{"amount":99}"#);
    assert_eq!(code, 202);

    // Denied → 403 with the review; no decision → 504.
    let denied = {
        let (ca, url) = (env.pki.ca.clone(), url.clone());
        std::thread::spawn(move || {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "-w",
                    "\n%{http_code}",
                    "--max-time",
                    "30",
                    "--cacert",
                ])
                .arg(&ca)
                .args([
                    "-H",
                    &format!("Authorization: Bearer {TOKEN}"),
                    "-d",
                    "x",
                    &url,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let mut id = String::new();
    wait_for(Duration::from_secs(15), "the review with body x", || {
        let (_, v) = env.json(
            Some(&env.alice),
            &[&format!(
                "https://localhost:{}/api/v1/reviews?status=pending",
                env.https_port
            )],
        );
        match v["reviews"].as_array().unwrap().iter().find(|r| {
            r["statement"]
                .as_str()
                .unwrap_or("")
                .contains("body 1 bytes")
        }) {
            Some(r) => {
                id = r["id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    let out = env.cli(
        &env.alice,
        &["reviews", "deny", &id, "--reason", "not today"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = denied.join().unwrap();
    assert!(text.ends_with("\n403"), "{text}");
    assert!(
        text.contains("not today") && text.contains("review_denied"),
        "{text}"
    );
    let (code, v) = env.json(None, &["-d", "y", &url]);
    assert_eq!(code, 504, "{v}");
    assert_eq!(v["code"], "review_expired");
    assert_eq!(env.up.seen.count(), 2);
}

#[test]
fn responses_are_masked_as_they_stream() {
    let env = HttpEnv::start(
        "",
        r#"[[resources.masks]]
json_paths = ["$.customer.email", "$..card_number"]
strategy = "partial"
[[resources.masks]]
detectors = ["email"]
strategy = "redact"
"#,
    );
    let (code, body) = env.curl(Some(&env.alice), &[&env.url("/customers/1")]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("masked JSON stays JSON");
    let orig: serde_json::Value = serde_json::from_str(CUSTOMER).unwrap();
    assert_eq!(v["id"], 1);
    assert_eq!(v["customer"]["name"], "Ada");
    assert_ne!(v["customer"]["email"], orig["customer"]["email"]);
    assert!(v["payments"][0]["card_number"]
        .as_str()
        .unwrap()
        .ends_with("1111"));
    assert!(!body.contains("4111 1111 1111 1111"), "{body}");
    assert!(
        !body.contains("ada@example.com") && !body.contains("bob@example.org"),
        "{body}"
    );
    assert_eq!(v["payments"][1]["amount"], 30);

    // JSON served as text/plain is recognised by its content; plain text by detectors.
    let (_, body) = env.curl(Some(&env.alice), &[&env.url("/customers/1.txt")]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["payments"][0]["card_number"]
        .as_str()
        .unwrap()
        .ends_with("1111"));
    assert!(!body.contains("4111 1111 1111 1111"));
    let (_, body) = env.curl(Some(&env.alice), &[&env.url("/note")]);
    assert!(
        !body.contains("ada@example.com") && body.contains("call me:"),
        "{body}"
    );

    // A large body streams through, masked, still one valid JSON document.
    let (code, body) = env.curl(Some(&env.alice), &[&env.url("/big?n=20000")]);
    assert_eq!(code, 200);
    assert!(body.len() > 2_000_000, "{}", body.len());
    let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
    assert_eq!(v.as_array().unwrap().len(), 20000);
    assert!(!body.contains("@example.com") && !body.contains("4111111111111111"));

    // What masks cannot read is refused, and ranges and compression are not asked for.
    let (code, v) = env.json(Some(&env.alice), &[&env.url("/image")]);
    assert_eq!(code, 502);
    assert_eq!(v["code"], "unmaskable");
    // An upstream that compresses anyway: gzip, br and zstd bodies are decoded, then masked; a
    // body that is not what its coding says is cut off; a coding tollgate cannot decode is
    // refused. None passes unmasked.
    for path in ["/gzipped", "/brotli", "/zstd"] {
        let (code, body) = env.curl(Some(&env.alice), &[&env.url(path)]);
        assert_eq!(code, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not decoded JSON ({e}): {body}"));
        assert_eq!(v["customer"]["name"], "Ada", "{path}");
        assert!(
            !body.contains("ada@example.com") && !body.contains("4111 1111 1111 1111"),
            "{path}: {body}"
        );
    }
    let (code, body) = env.curl(Some(&env.alice), &[&env.url("/big.gz?n=20000")]);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("decoded, masked, valid JSON");
    assert_eq!(v.as_array().unwrap().len(), 20000);
    assert!(!body.contains("@example.com") && !body.contains("4111111111111111"));
    let (_, body) = env.curl(Some(&env.alice), &[&env.url("/gzipped-bad")]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).is_err(),
        "{body}"
    );
    let (code, v) = env.json(Some(&env.alice), &[&env.url("/compress")]);
    assert_eq!(code, 502, "{v}");
    assert_eq!(v["code"], "unmaskable");
    assert!(v["error"].as_str().unwrap().contains("\"compress\""), "{v}");
    let (_, echo) = env.json(
        Some(&env.alice),
        &[
            "-H",
            "Range: bytes=0-10",
            "-H",
            "Accept-Encoding: gzip, br",
            &env.url("/echo"),
        ],
    );
    assert_eq!(header(&echo, "range"), None);
    assert_eq!(header(&echo, "accept-encoding"), Some("identity"));

    // The record keeps the masked capture, never the originals.
    let evs = env.events_until("the customer response", |evs| {
        evs.iter().filter(|e| e["kind"] == "http.response").count() >= 7
    });
    let resp = evs
        .iter()
        .find(|e| {
            e["kind"] == "http.response"
                && e["payload"]["body"]["capture"]
                    .as_str()
                    .is_some_and(|c| c.contains("\"Ada\""))
        })
        .expect("captured customer");
    assert!(
        resp["payload"]["masked"]["values"].as_u64().unwrap() >= 3,
        "{resp}"
    );
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains("ada@example.com") && !all.contains("4111 1111 1111 1111"));
    let bad = env.events_until("the bad gzip body's record", |evs| {
        evs.iter()
            .any(|e| e["kind"] == "http.response" && e["payload"]["outcome"] == "decode_error")
    });
    let bad = bad
        .iter()
        .find(|e| e["payload"]["outcome"] == "decode_error")
        .unwrap();
    assert!(
        bad["payload"]["error"]
            .as_str()
            .unwrap()
            .contains("gzip body could not be decoded"),
        "{bad}"
    );

    // Replay shows the exchanges, with the masked bodies.
    let session = resp["session_id"].as_str().unwrap();
    let out = env.cli(&env.alice, &["sessions", "replay", session, "--speed", "0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("HTTP> GET /customers/1 (allow)"), "{text}");
    assert!(
        text.contains("values masked") && text.contains("\"Ada\""),
        "{text}"
    );
    assert!(!text.contains("ada@example.com"), "{text}");
}

#[test]
fn server_sent_events_stream_through_masked() {
    let env = HttpEnv::start(
        "",
        r#"[[resources.masks]]
detectors = ["email"]
"#,
    );
    let mut child = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", "--cacert"])
        .arg(&env.pki.ca)
        .args([
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            &env.url("/sse"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // Each event reaches the client before the upstream sends the next one.
    let mut got = String::new();
    for i in 0..3 {
        env.up.release_event();
        let mut buf = [0u8; 4096];
        while !got.contains(&format!("\"n\":{i}")) {
            let n = std::io::Read::read(&mut out, &mut buf).unwrap();
            assert!(n > 0, "stream ended early: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    let _ = child.wait();
    assert!(got.contains("id: 2"), "{got}");
    assert!(!got.contains("@example.com"), "{got}");
}

#[test]
fn resources_by_host_name_on_their_own_listener() {
    let env = HttpEnv::start("", "");
    let resolve = format!("billing.localhost:{}:127.0.0.1", env.http_port);
    for http in ["--http1.1", "--http2"] {
        let (code, echo) = env.json(
            Some(&env.alice),
            &[
                http,
                "--resolve",
                &resolve,
                &format!("https://billing.localhost:{}/v1/echo", env.http_port),
            ],
        );
        assert_eq!(code, 200, "{http}: {echo}");
        assert_eq!(echo["path"], "/v1/echo");
        assert_eq!(
            header(&echo, "authorization"),
            Some(secret_digest().as_str())
        );
    }
    // Over HTTP/2 on https_listen too.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--cacert",
        ])
        .arg(&env.pki.ca)
        .args([
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            &env.url("/x"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2");
}

#[test]
fn a_reloaded_config_changes_the_rules_of_new_requests() {
    let env = HttpEnv::start("", "");
    let (code, _) = env.json(
        Some(&env.alice),
        &["-X", "DELETE", &env.url("/v1/invoices/1")],
    );
    assert_eq!(code, 200);
    let text = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let text = format!(
        "{text}\n[[resources.rules]]\nname = \"frozen\"\nmethods = [\"DELETE\"]\naction = \"deny\"\nmessage = \"invoices are frozen\"\n"
    );
    std::fs::write(&env.gw.config_path, text).unwrap();
    unsafe {
        libc::kill(env.gw.pid() as i32, libc::SIGHUP);
    }
    wait_for(Duration::from_secs(15), "the reloaded rule", || {
        let (code, v) = env.json(
            Some(&env.alice),
            &["-X", "DELETE", &env.url("/v1/invoices/2")],
        );
        code == 403 && v["error"] == "invoices are frozen"
    });
    let evs = env.events_until("the reload event", |evs| {
        evs.iter()
            .any(|e| e["kind"] == "config.reload" && e["payload"]["outcome"] == "success")
    });
    assert!(evs
        .iter()
        .any(|e| e["kind"] == "config.reload" && e["payload"]["sha256"].is_string()));
}

#[test]
fn a_just_in_time_grant_opens_the_resource_and_its_revocation_cuts_streams() {
    let env = HttpEnv::start("", "");
    let (code, _) = env.json(Some(&env.bob), &[&env.url("/echo")]);
    assert_eq!(code, 403);
    // bob (group dev) asks for access; alice (sre, an admin) approves.
    let out = env.cli(
        &env.bob,
        &[
            "access",
            "request",
            "billing",
            "--for",
            "1h",
            "--reason",
            "incident 7",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = review["id"].as_str().unwrap().to_string();
    let out = env.cli(&env.alice, &["reviews", "approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, echo) = env.json(Some(&env.bob), &[&env.url("/echo")]);
    assert_eq!(code, 200, "{echo}");

    // A stream bob opened under the grant is cut when the grant is revoked.
    let mut child = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", "--cacert"])
        .arg(&env.pki.ca)
        .arg("--cert")
        .arg(&env.bob.cert)
        .arg("--key")
        .arg(&env.bob.key)
        .arg(env.url("/sse"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    env.up.release_event();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("\"n\":0") {
        let n = std::io::Read::read(&mut out, &mut buf).unwrap();
        assert!(n > 0, "stream ended early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let out_rev = env.cli(
        &env.alice,
        &["access", "revoke", &id, "--reason", "incident over"],
    );
    assert!(
        out_rev.status.success(),
        "{}",
        String::from_utf8_lossy(&out_rev.stderr)
    );
    // curl sees the stream end (with an error) without the upstream sending anything more.
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the stream ended cleanly instead of being cut"
    );
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    assert!(!rest.contains("\"n\":1"), "{rest}");
    // And the next request is refused.
    let (code, _) = env.json(Some(&env.bob), &[&env.url("/echo")]);
    assert_eq!(code, 403);
    env.events_until("the grant.ended event", |evs| {
        evs.iter()
            .any(|e| e["kind"] == "grant.ended" && e["payload"]["review"] == id.as_str())
    });
    let opens = env.events();
    assert!(opens.iter().any(|e| e["kind"] == "session.open"
        && e["payload"]["subject"] == "bob"
        && e["payload"]["access_grant"]["review"] == id.as_str()));
}

#[test]
fn the_callers_identity_reaches_the_upstream_signed_and_unforgeable() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("identity.key");
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = HttpEnv::start_opts(HttpEnvOptions {
        server_extra: &format!("identity_key = \"{}\"", key.display()),
        resource_keys: "identity_header = \"X-Caller\"",
        ..Default::default()
    });
    let (code, echo) = env.json(
        Some(&env.alice),
        &[
            "-H",
            "X-Caller: eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0.",
            &env.url("/echo"),
        ],
    );
    assert_eq!(code, 200, "{echo}");
    let token = header(&echo, "x-caller")
        .expect("identity header")
        .to_string();
    assert!(
        !token.contains("eyJzdWIiOiJyb290In0"),
        "the client's copy was forwarded"
    );

    // The upstream verifies it with the key the gateway publishes.
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&env.pki.ca)
        .arg(format!(
            "https://localhost:{}/.well-known/jwks.json",
            env.https_port
        ))
        .output()
        .unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jwk = &jwks["keys"][0];
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    let b64 = |s: &str| {
        let out = Command::new("python3")
            .args(["-c", "import base64,sys;s=sys.argv[1];sys.stdout.buffer.write(base64.urlsafe_b64decode(s+'='*(-len(s)%4)))", s])
            .output()
            .unwrap();
        out.stdout
    };
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value = serde_json::from_slice(&b64(parts[0])).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["kid"], jwk["kid"]);
    let public = b64(jwk["x"].as_str().unwrap());
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &b64(parts[2]),
        )
        .expect("the identity token verifies with the published key");
    let claims: serde_json::Value = serde_json::from_slice(&b64(parts[1])).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "billing");
    assert_eq!(claims["groups"], serde_json::json!(["sre"]));
    assert_eq!(claims["auth_method"], "cert");
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert!(exp > iat && exp - iat <= 300, "{claims}");
    // The session the token names is the request's audit session.
    let evs = env.events_until("the request", |evs| {
        evs.iter().any(|e| e["kind"] == "http.request")
    });
    let req = evs.iter().find(|e| e["kind"] == "http.request").unwrap();
    assert_eq!(claims["sid"], req["session_id"]);
    // The request's record keeps what the client sent, not the token the gateway made.
    assert!(!req.to_string().contains(parts[2]));
}

#[test]
fn slow_upstreams_time_out_and_refused_callers_are_recorded() {
    let env = HttpEnv::start("response_timeout = \"1s\"", "");
    let (code, v) = env.json(Some(&env.alice), &[&env.url("/slow")]);
    assert_eq!(code, 504, "{v}");
    assert_eq!(v["code"], "upstream_timeout");
    // bob may not reach billing: the attempt is on record as a rejected session.
    let (code, _) = env.json(Some(&env.bob), &[&env.url("/echo")]);
    assert_eq!(code, 403);
    let evs = env.events_until("bob's rejected session", |evs| {
        evs.iter()
            .any(|e| e["kind"] == "session.close" && e["payload"]["reason"] == "forbidden")
    });
    let close = evs
        .iter()
        .find(|e| e["kind"] == "session.close" && e["payload"]["reason"] == "forbidden")
        .unwrap();
    let open = evs
        .iter()
        .find(|e| e["kind"] == "session.open" && e["session_id"] == close["session_id"])
        .unwrap();
    assert_eq!(open["payload"]["subject"], "bob");
    assert_eq!(open["payload"]["resource"], "billing");
    assert_eq!(close["payload"]["outcome"], "rejected");
    let resp = evs
        .iter()
        .find(|e| e["kind"] == "http.response" && e["payload"]["status"] == 504)
        .expect("the timeout is recorded");
    assert_eq!(resp["payload"]["outcome"], "refused");
}

#[test]
fn an_http2_upload_refused_before_its_body_is_read_gets_a_clean_answer() {
    // The gateway answers before it reads the body (no credentials, or a caller who may not
    // reach the resource): the client still gets the JSON error, not a reset stream.
    let env = HttpEnv::start("", "");
    let body = "x".repeat(20_000);
    let post = |who: Option<&IssuedFiles>| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--http2",
            "-w",
            "\n%{http_code} %{http_version}",
            "--cacert",
        ])
        .arg(&env.pki.ca);
        if let Some(w) = who {
            cmd.arg("--cert").arg(&w.cert).arg("--key").arg(&w.key);
        }
        let out = cmd
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ])
            .arg(env.url("/echo"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "curl failed: {stderr}\n{text}");
        let (json, status) = text.rsplit_once('\n').unwrap();
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status.to_string(), v)
    };
    let (status, v) = post(None);
    assert_eq!(status, "401 2", "{v}");
    assert_eq!(v["code"], "unauthenticated", "{v}");
    let (status, v) = post(Some(&env.bob));
    assert_eq!(status, "403 2", "{v}");
    assert_eq!(v["code"], "forbidden", "{v}");
    // An authorised upload on HTTP/2 reaches the upstream.
    let (code, v) = env.json(
        Some(&env.alice),
        &["--http2", "--data-binary", &body, &env.url("/echo")],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(env.up.seen.count(), 1);
}

#[test]
fn https_listeners_cap_connections_per_source() {
    let env = HttpEnv::start_opts(HttpEnvOptions {
        server_extra: "max_connections_per_source = 2",
        ..Default::default()
    });
    let cfg = std::sync::Arc::new(common::client_tls(&env.pki.ca, Some(&env.alice)));
    let open = |port: u16| -> std::io::Result<
        rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    > {
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let conn =
            rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        // Complete the handshake (a refused connection is closed before it).
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(s)
    };
    for port in [env.https_port, env.http_port] {
        let a = open(port).expect("first");
        let b = open(port).expect("second");
        assert!(
            open(port).is_err(),
            "a third connection from one source was served on {port}"
        );
        drop(a);
        wait_for(Duration::from_secs(5), "a slot to free up", || {
            open(port).is_ok()
        });
        drop(b);
    }
    let m = env.gw.metrics();
    assert!(
        m.contains("tollgate_connections_refused_total{listener=\"https\",reason=\"max_connections_per_source\"}"),
        "{m}"
    );
    assert!(m.contains("tollgate_connections_refused_total{listener=\"http\",reason=\"max_connections_per_source\"}"));
}

#[test]
fn audit_captures_stay_masked_whoever_the_viewer() {
    // The rule masks for the ci group only, and exempts sre: alice (sre) sees the e-mail, the
    // audit trail never does.
    let env = HttpEnv::start(
        "",
        r#"[[resources.masks]]
detectors = ["email"]
only_groups = ["ci"]
[[resources.masks]]
json_paths = ["$..card_number"]
except_groups = ["sre"]
"#,
    );
    let (code, body) = env.curl(Some(&env.alice), &[&env.url("/customers/1")]);
    assert_eq!(code, 200);
    assert!(
        body.contains("ada@example.com") && body.contains("4111 1111 1111 1111"),
        "{body}"
    );
    let (_, body) = env.curl(None, &[&env.url("/customers/1")]);
    assert!(
        !body.contains("ada@example.com") && !body.contains("4111 1111 1111 1111"),
        "{body}"
    );
    let evs = env.events_until("both responses", |evs| {
        evs.iter().filter(|e| e["kind"] == "http.response").count() >= 2
    });
    let all = serde_json::to_string(&evs).unwrap();
    assert!(all.contains("\\\"Ada\\\""), "no capture recorded");
    assert!(
        !all.contains("ada@example.com"),
        "an exempt viewer's capture leaked the e-mail"
    );
    assert!(
        !all.contains("4111 1111 1111 1111"),
        "an exempt viewer's capture leaked the card"
    );
}

#[test]
fn only_the_gateways_own_names_pick_resources_or_reach_x_forwarded_host() {
    let env = HttpEnv::start("", "");
    let resolve = format!("billing.localhost:{}:127.0.0.1", env.http_port);
    let url = format!("https://billing.localhost:{}/echo", env.http_port);
    for http in ["--http1.1", "--http2"] {
        // The TLS name is the gateway's, the Host is not: misdirected, nothing forwarded.
        let (code, v) = env.json(
            Some(&env.alice),
            &[
                http,
                "--resolve",
                &resolve,
                "-H",
                "Host: billing.attacker.example",
                &url,
            ],
        );
        assert_eq!(code, 421, "{http}: {v}");
        assert_eq!(v["code"], "misdirected");
    }
    assert_eq!(env.up.seen.count(), 0);
    // On https_listen the path picks the resource; a foreign Host is not passed on.
    let (code, echo) = env.json(
        Some(&env.alice),
        &["--http1.1", "-H", "Host: evil.example", &env.url("/echo")],
    );
    assert_eq!(code, 200, "{echo}");
    assert_eq!(header(&echo, "x-forwarded-host"), None);
    let (_, echo) = env.json(Some(&env.alice), &[&env.url("/echo")]);
    assert_eq!(
        header(&echo, "x-forwarded-host"),
        Some(format!("localhost:{}", env.https_port).as_str())
    );
}

#[test]
fn a_reload_that_removes_a_group_takes_effect_on_the_next_request() {
    // Masks make every request look up the caller's grants; what was found is reused for a
    // few seconds, but never past a reload that removes the group access rested on.
    let env = HttpEnv::start("", "[[resources.masks]]\ndetectors = [\"email\"]\n");
    let (code, _) = env.json(Some(&env.alice), &[&env.url("/echo")]);
    assert_eq!(code, 200);
    let text = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let text = text.replacen(
        "allow_groups = [\"sre\", \"ci\"]",
        "allow_groups = [\"ci\"]",
        1,
    );
    std::fs::write(&env.gw.config_path, text).unwrap();
    unsafe {
        libc::kill(env.gw.pid() as i32, libc::SIGHUP);
    }
    env.events_until("the reload", |evs| {
        evs.iter()
            .any(|e| e["kind"] == "config.reload" && e["payload"]["outcome"] == "success")
    });
    let (code, v) = env.json(Some(&env.alice), &[&env.url("/echo")]);
    assert_eq!(code, 403, "{v}");
}

#[test]
fn header_rules_see_every_header_and_every_copy() {
    // A rule may name a header whose value the audit trail redacts; an allow rule must hold
    // for every copy of a repeated header.
    let env = HttpEnv::start(
        "",
        r#"[[resources.rules]]
name = "no admin sessions"
headers = { "x-session-token" = "admin*" }
action = "deny"
[[resources.rules]]
name = "dev deletes"
methods = ["DELETE"]
headers = { "x-env" = "dev" }
action = "allow"
[[resources.rules]]
name = "no deletes"
methods = ["DELETE"]
action = "deny"
"#,
    );
    let (code, v) = env.json(
        Some(&env.alice),
        &["-H", "X-Session-Token: admin-77", &env.url("/echo")],
    );
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["rule"], "no admin sessions");
    let del = |extra: &[&str]| {
        let mut args = vec!["--http1.1", "-X", "DELETE"];
        args.extend_from_slice(extra);
        let url = env.url("/v1/x");
        args.push(&url);
        env.json(Some(&env.alice), &args).0
    };
    assert_eq!(del(&["-H", "X-Env: dev"]), 200);
    assert_eq!(del(&["-H", "X-Env: dev", "-H", "X-Env: prod"]), 403);
    assert_eq!(del(&[]), 403);
    // The redacted header stays redacted in the record.
    let evs = env.events_until("the denial", |evs| {
        evs.iter().any(|e| {
            e["kind"] == "http.request" && e["payload"]["decision"]["rule"] == "no admin sessions"
        })
    });
    assert!(!serde_json::to_string(&evs).unwrap().contains("admin-77"));
}
