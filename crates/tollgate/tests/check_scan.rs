//! `tollgate check` and `tollgate scan` as an operator runs them, against real PostgreSQL
//! clusters, and the same scan running periodically inside the gateway.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use tollgate_testsupport::ClusterOptions;

fn tollgate(args: &[&str], config: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("TOLLGATE_CONFIG")
        .env("RUST_LOG", "error")
        .output()
        .expect("run tollgate")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

fn kinds(doc: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_passes_a_clean_config_and_fails_each_weakness() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(&d.join("pki"));
    let gateway_cert = |ttl_days: u64| {
        let spec = tollgate_tls::pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec![],
            ttl: Duration::from_secs(ttl_days * 86_400),
            not_before: None,
        };
        tollgate_tls::pki::issue_server(&pki.dir, &spec, &pki.dir.join("gateway")).unwrap();
    };
    gateway_cert(90);
    let db = Pki::new(&d.join("db"));
    std::fs::write(d.join("app.password"), "pw").unwrap();
    std::fs::set_permissions(d.join("app.password"), PermissionsExt::from_mode(0o600)).unwrap();
    pki.write_crl(&[]);
    let server = "[server]\npostgres_listen = \"127.0.0.1:6432\"\ntls_cert = \"pki/gateway.crt\"\ntls_key = \"pki/gateway.key\"\nclient_ca = \"pki/ca.crt\"\nclient_crl = [\"pki/crl.pem\"]\nstore = \"sqlite://audit.db\"\n";
    let clean = format!(
        "{server}\n[[resources]]\nname = \"app\"\nkind = \"postgres\"\nupstream = \"127.0.0.1:5432\"\nallow_groups = [\"sre\"]\n[resources.tls]\nca = \"{}\"\nserver_name = \"localhost\"\n[resources.credentials]\nuser = \"app\"\npassword_file = \"app.password\"\n",
        db.ca.display()
    );
    let config = write(d, "clean.toml", &clean);
    let out = tollgate(&["check"], &config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).starts_with("ok: "), "{}", stdout(&out));
    assert_eq!(stdout(&out).lines().count(), 1);

    // Every weakness at once: each must be reported on its own line, naming resource, key and fix.
    gateway_cert(3);
    std::fs::set_permissions(
        pki.dir.join("gateway.key"),
        PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let weak = format!(
        r#"{server}audit_failure = "open"
max_connections = 0

[[resources]]
name = "plain"
kind = "postgres"
upstream = "127.0.0.1:5432"
allow_groups = ["sre"]
[resources.tls]
mode = "disable"
[resources.credentials]
user = "app"
password_file = "missing.password"

[[resources]]
name = "loose"
kind = "postgres"
upstream = "127.0.0.1:5432"
allow_groups = []
[resources.tls]
mode = "verify-ca"
ca = "{ca}"
[resources.credentials]
user = "app"
password_env = "TOLLGATE_CHECK_TEST_UNSET"
[[resources.rules]]
statements = ["delete"]
groups = ["agents"]
action = "review"
approvers = ["dbas"]
"#,
        ca = db.ca.display()
    );
    let config = write(d, "weak.toml", &weak);
    let out = tollgate(&["check"], &config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    for (kind, resource, key) in [
        (
            "upstream_tls_not_verify_full",
            "[plain]",
            "resources.tls.mode",
        ),
        (
            "upstream_tls_not_verify_full",
            "[loose]",
            "resources.tls.mode",
        ),
        ("cert_expiring", "", "server.tls_cert"),
        ("key_permissions", "", "server.tls_key"),
        ("audit_fail_open", "", "server.audit_failure"),
        ("connection_limit_disabled", "", "server.max_connections"),
        (
            "missing_file",
            "[plain]",
            "resources.credentials.password_file",
        ),
        ("unset_env", "[loose]", "resources.credentials.password_env"),
        ("unreachable_resource", "[loose]", "resources.allow_groups"),
        ("unknown_group", "[loose]", "resources.rules[0].groups"),
        ("unknown_group", "[loose]", "resources.rules[0].approvers"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(&format!(" {kind}"))
                && l.contains(resource)
                && l.contains(&format!(" {key}: "))
                && l.contains("(fix: ")),
            "no {kind} line for {resource} {key}:\n{text}"
        );
    }
    assert_eq!(text.lines().count(), 11, "{text}");
    assert!(
        text.contains("expires in 2 days") || text.contains("expires in 3 days"),
        "{text}"
    );

    let out = tollgate(&["check", "--json"], &config);
    assert_eq!(out.status.code(), Some(1));
    let doc = json(&out);
    assert_eq!(doc["ok"], false);
    assert_eq!(
        kinds(&doc),
        [
            "audit_fail_open",
            "cert_expiring",
            "connection_limit_disabled",
            "key_permissions",
            "missing_file",
            "unknown_group",
            "unknown_group",
            "unreachable_resource",
            "unset_env",
            "upstream_tls_not_verify_full",
            "upstream_tls_not_verify_full"
        ]
    );
    let f = &doc["findings"][0];
    assert_eq!(f["severity"], "critical", "most severe first: {f}");
    for field in ["resource", "key", "message", "fix"] {
        assert!(doc["findings"][1].get(field).is_some(), "{field}");
    }
    // A shorter window clears the expiry finding only.
    let out = tollgate(&["check", "--json", "--min-days", "1"], &config);
    assert!(!kinds(&json(&out)).contains(&"cert_expiring".to_string()));

    // Could not run: exit 2.
    let out = tollgate(&["check"], &d.join("nope.toml"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// `psql` straight to the cluster (not through tollgate), idle on its open stdin until dropped.
struct DirectPsql(Child);

impl DirectPsql {
    fn open(env: &Env) -> (DirectPsql, i32) {
        let child = Command::new("psql")
            .args(["-X", "-q"])
            .arg(format!(
                "{} application_name=direct-psql",
                env.direct_conninfo()
            ))
            .env("PGPASSWORD", &env.pg.password)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        let direct = DirectPsql(child);
        let mut pid = 0;
        wait_for(Duration::from_secs(10), "the direct psql session", || {
            let out = env
                .pg
                .psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'direct-psql'")
                .unwrap();
            pid = out.trim().parse().unwrap_or(0);
            pid != 0
        });
        (direct, pid)
    }
}

impl Drop for DirectPsql {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn findings_of<'a>(doc: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_reports_plaintext_bypass_and_wrong_hostname() {
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            also_allow_plaintext: true,
            ..Default::default()
        },
        ..Default::default()
    });
    // A session through tollgate, and a direct psql around it.
    let through = env.client().await;
    let gw_pid: i32 = through
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let (direct, direct_pid) = DirectPsql::open(&env);

    // The gateway lists its own upstream connection (address and backend pid, nothing else).
    let (status, body) = env.gw.http_get("/upstreams").unwrap();
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["resource"], "app");
    assert_eq!(list[0]["backend_pid"], gw_pid);
    assert!(list[0]["local_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(!body.contains(&env.pg.password));

    let config = env.gw.config_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        tollgate(&["scan", "--json", "--min-days", "3"], &config)
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let doc = json(&out);
    let app = &doc["resources"][0];
    assert_eq!(app["resource"], "app");
    assert_eq!(app["plaintext_accepted"], true, "{app:#}");
    assert_eq!(findings_of(&doc, "plaintext_accepted").len(), 1, "{doc:#}");
    assert_eq!(app["tls"]["hostname_matches"], true);
    assert_eq!(app["tls"]["chain_trusted"], true);
    assert!(app["tls"]["leaf_days_left"].as_i64().unwrap() >= 6);
    let versions = app["versions"].as_array().unwrap();
    let accepted =
        |v: &str| versions.iter().find(|x| x["version"] == v).unwrap()["accepted"].clone();
    assert_eq!(accepted("TLSv1.3"), true, "{versions:?}");
    assert_eq!(accepted("TLSv1.1"), false, "{versions:?}");
    assert_eq!(accepted("TLSv1.0"), false, "{versions:?}");

    // The direct session is a bypass; the one through tollgate is not.
    let bypass = findings_of(&doc, "bypass_session");
    assert_eq!(bypass.len(), 1, "{doc:#}");
    let msg = bypass[0]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("pid {direct_pid} ")), "{msg}");
    assert!(msg.contains("direct-psql"), "{msg}");
    assert!(
        !doc.to_string().contains(&format!("pid {gw_pid} ")),
        "{doc:#}"
    );
    assert_eq!(app["sessions"]["through_gateway"], 1, "{app:#}");
    assert_eq!(app["sessions"]["total"], 2, "{app:#}");
    assert!(findings_of(&doc, "hostname_mismatch").is_empty());

    // Without an admin listener to ask, the direct session cannot be told apart: unverified.
    let original = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let no_admin: String = original
        .lines()
        .filter(|l| !l.starts_with("admin_listen"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = write(env.tmp.path(), "no-admin.toml", &no_admin);
    let out = tokio::task::spawn_blocking(move || tollgate(&["scan", "--min-days", "3"], &path))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let human = stdout(&out);
    assert!(
        human.contains("gateway not reachable to confirm"),
        "{human}"
    );
    assert!(
        human.contains("MEDIUM   gateway_unreachable [app] server.admin_listen:"),
        "{human}"
    );
    let unverified: Vec<&str> = human
        .lines()
        .filter(|l| l.contains("unverified_session"))
        .collect();
    // Both the direct and the gateway's session are unverified now.
    assert_eq!(unverified.len(), 2, "{human}");
    assert!(
        unverified
            .iter()
            .any(|l| l.contains(&format!("pid {direct_pid} "))),
        "{human}"
    );
    assert!(!human.contains("bypass_session"), "{human}");

    // The same upstream under a name its certificate does not carry: the hostname is reported
    // (and the scanner, verifying like the gateway, cannot log in to list sessions).
    let wrong = original.replace(
        "server_name = \"localhost\"",
        "server_name = \"db.internal\"",
    );
    let path = write(env.tmp.path(), "wrong-name.toml", &wrong);
    let out = tokio::task::spawn_blocking(move || tollgate(&["scan", "--min-days", "3"], &path))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let human = stdout(&out);
    assert!(
        human.lines().any(|l| l
            .contains("HIGH     hostname_mismatch [app] resources.tls.server_name:")
            && l.contains("is for [localhost, 127.0.0.1], not \"db.internal\"")),
        "{human}"
    );
    assert!(
        human.contains("chain trusted, hostname MISMATCH"),
        "{human}"
    );
    assert!(human.contains("sessions_unchecked"), "{human}");
    drop(direct);
    drop(through);
}

#[test]
fn scan_of_a_tls_only_upstream_is_clean() {
    let env = Env::start();
    // The harness's server certificates live 7 days; a 3-day window keeps expiry out of it.
    let out = tollgate(&["scan", "--min-days", "3"], &env.gw.config_path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("plaintext: refused"), "{text}");
    assert!(text.contains("chain trusted, hostname matches"), "{text}");
    assert!(
        text.trim_end()
            .ends_with("ok: 1 resource(s) scanned, no findings"),
        "{text}"
    );
}

/// A webhook receiver: collects the bodies of POSTs to /hook, answering 204.
fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 8192];
            let body = loop {
                let n = s.read(&mut buf).unwrap_or(0);
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break head.starts_with("POST /hook ").then(|| body.to_string());
                    }
                }
                if n == 0 {
                    break None;
                }
            };
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            if let Some(b) = body {
                if tx.send(b).is_err() {
                    return;
                }
            }
        }
    });
    (port, rx)
}

#[test]
fn periodic_scan_updates_metrics_audit_and_webhook() {
    let (hook_port, hooks) = webhook_receiver();
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            also_allow_plaintext: true,
            ..Default::default()
        },
        server_extra: format!(
            "scan_interval = \"300ms\"\nalert_webhook = \"http://127.0.0.1:{hook_port}/hook\""
        ),
        ..Default::default()
    });
    let plaintext = "tollgate_scan_findings{resource=\"app\",kind=\"plaintext_accepted\"}";
    let bypass = "tollgate_scan_findings{resource=\"app\",kind=\"bypass_session\"}";
    wait_for(
        Duration::from_secs(15),
        "the plaintext finding metric",
        || env.gw.metric(plaintext) == Some(1),
    );
    let expiry = env
        .gw
        .metric("tollgate_upstream_cert_expiry_timestamp_seconds{resource=\"app\"}")
        .expect("upstream certificate expiry gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(expiry > now + 6 * 86_400, "{expiry}");
    assert_ne!(env.gw.metric(bypass), Some(1));

    // A direct session appears as a bypass, and the gauge returns to 0 once it is gone.
    let (direct, direct_pid) = DirectPsql::open(&env);
    wait_for(Duration::from_secs(15), "the bypass metric", || {
        env.gw.metric(bypass) == Some(1)
    });
    drop(direct);
    wait_for(
        Duration::from_secs(15),
        "the bypass metric to reset",
        || env.gw.metric(bypass) == Some(0),
    );

    let events = env.events_until("scan.finding events", |evs| {
        let kinds: Vec<&serde_json::Value> = evs
            .iter()
            .filter(|e| e["kind"] == "scan.finding")
            .map(|e| &e["payload"]["kind"])
            .collect();
        kinds.contains(&&serde_json::json!("plaintext_accepted"))
            && kinds.contains(&&serde_json::json!("bypass_session"))
    });
    let ev = events
        .iter()
        .find(|e| e["kind"] == "scan.finding" && e["payload"]["kind"] == "bypass_session")
        .unwrap();
    assert!(ev["session_id"].as_str().unwrap().starts_with("scan-"));
    assert!(
        ev["payload"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {direct_pid} ")),
        "{ev:#}"
    );

    // The webhook got the plaintext finding first, then the bypass as a new finding.
    let mut seen = Vec::new();
    while !seen.iter().any(|b: &String| b.contains("bypass_session")) {
        let body = hooks
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("webhook bodies so far: {seen:#?}"));
        seen.push(body);
    }
    let first: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(first["kind"], "scan.findings");
    assert_eq!(
        first["new_findings"][0]["kind"], "plaintext_accepted",
        "{first:#}"
    );
}
