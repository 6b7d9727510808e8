//! The `tollgate` binary's commands as an operator runs them: `pki`, config errors from `serve`,
//! `audit verify` on a store written by real traffic, `--help`, and `demo` end to end.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn tollgate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run tollgate")
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tollgate-cli-")
        .tempdir()
        .unwrap()
}

/// Run a command that must exit by itself within `timeout`; kills it and panics otherwise.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} did not exit within {timeout:?}; stderr: {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pki_init_issue_inspect() {
    let tmp = tempdir();
    let d = tmp.path().join("ca");
    let ds = d.to_str().unwrap();

    let out = tollgate(&["pki", "init", "--dir", ds]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key_mode = std::fs::metadata(d.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "CA key mode {key_mode:o}");
    assert!(d.join("ca.crt").is_file());
    let ca_before = std::fs::read(d.join("ca.key")).unwrap();

    let out = tollgate(&["pki", "init", "--dir", ds]);
    assert!(!out.status.success(), "a second init overwrote the CA");
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(d.join("ca.key")).unwrap(), ca_before);

    let srv = d.join("srv");
    let out = tollgate(&[
        "pki",
        "issue",
        "--dir",
        ds,
        "--server",
        "--dns",
        "db.example",
        "--ip",
        "127.0.0.1",
        "--out",
        srv.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let alice = d.join("alice");
    let out = tollgate(&[
        "pki",
        "issue",
        "--dir",
        ds,
        "--client",
        "--name",
        "alice",
        "--spiffe",
        "spiffe://example.org/agent/1",
        "--group",
        "sre",
        "--group",
        "agents",
        "--ttl",
        "2h",
        "--out",
        alice.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let ca_crt = d.join("ca.crt");
    for name in ["srv.crt", "alice.crt"] {
        let cert = d.join(name);
        let out = openssl(&[
            "verify",
            "-CAfile",
            ca_crt.to_str().unwrap(),
            cert.to_str().unwrap(),
        ]);
        assert_eq!(
            stdout(&out),
            format!("{}: OK", cert.display()),
            "{}",
            stderr(&out)
        );
        let key_mode = std::fs::metadata(cert.with_extension("key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o077, 0, "{name} key is readable by others");
    }

    let text = |p: &Path| {
        stdout(&openssl(&[
            "x509",
            "-in",
            p.to_str().unwrap(),
            "-text",
            "-noout",
        ]))
    };
    let srv_text = text(&d.join("srv.crt"));
    assert!(srv_text.contains("DNS:db.example"), "{srv_text}");
    assert!(srv_text.contains("IP Address:127.0.0.1"), "{srv_text}");
    assert!(
        srv_text.contains("TLS Web Server Authentication"),
        "{srv_text}"
    );
    let alice_text = text(&d.join("alice.crt"));
    for want in [
        "CN = alice",
        "OU = sre",
        "OU = agents",
        "URI:spiffe://example.org/agent/1",
        "TLS Web Client Authentication",
    ] {
        assert!(alice_text.contains(want), "missing {want}:\n{alice_text}");
    }

    // About two hours of validity: notAfter - notBefore, and notAfter from now.
    let dates = stdout(&openssl(&[
        "x509",
        "-in",
        d.join("alice.crt").to_str().unwrap(),
        "-noout",
        "-dates",
    ]));
    let date = |field: &str| {
        let v = dates
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} in {dates}"));
        let out = Command::new("python3")
            .args([
                "-c",
                "import ssl,sys; print(int(ssl.cert_time_to_seconds(sys.argv[1])))",
                v,
            ])
            .output()
            .unwrap();
        stdout(&out).parse::<i64>().unwrap()
    };
    let lifetime = date("notAfter=") - date("notBefore=");
    assert_eq!(lifetime, 2 * 3600, "{dates}");
    let alice_crt = d.join("alice.crt");
    let checkend = |secs: &str| {
        openssl(&[
            "x509",
            "-in",
            alice_crt.to_str().unwrap(),
            "-noout",
            "-checkend",
            secs,
        ])
        .status
        .success()
    };
    assert!(checkend("6900"), "expires within 1h55m: {dates}");
    assert!(!checkend("7500"), "still valid in 2h05m: {dates}");

    let out = tollgate(&["pki", "inspect", alice_crt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let inspect = stdout(&out);
    let field = |name: &str| {
        inspect
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .unwrap_or_else(|| panic!("no {name} in:\n{inspect}"))
            .to_string()
    };
    assert!(field("subject:").contains("alice"), "{inspect}");
    assert_eq!(field("groups:"), "sre, agents");
    assert_eq!(field("uri:"), "spiffe://example.org/agent/1");
    assert!(!field("not before:").is_empty());
    assert!(
        field("not after:").contains("expires in 0 days"),
        "{inspect}"
    );
    let fp = field("sha256:");
    assert!(
        fp.len() == 64 && fp.chars().all(|c| c.is_ascii_hexdigit()),
        "fingerprint {fp:?}"
    );
    // The same fingerprint openssl computes.
    let ossl = stdout(&openssl(&[
        "x509",
        "-in",
        alice_crt.to_str().unwrap(),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]));
    let ossl = ossl
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(fp.to_lowercase(), ossl);
    let out = tollgate(&["pki", "inspect", d.join("srv.crt").to_str().unwrap()]);
    let inspect_srv = stdout(&out);
    assert!(inspect_srv.contains("db.example"), "{inspect_srv}");
    assert!(inspect_srv.contains("127.0.0.1"), "{inspect_srv}");

    // Refusals that explain themselves.
    let out = tollgate(&[
        "pki",
        "issue",
        "--dir",
        ds,
        "--client",
        "--out",
        d.join("nobody").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--name"), "{}", stderr(&out));
    assert!(!d.join("nobody.crt").exists());
    let out = tollgate(&[
        "pki",
        "issue",
        "--dir",
        ds,
        "--server",
        "--out",
        d.join("nameless").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--dns"), "{}", stderr(&out));
}

const GOOD_CONFIG: &str = r#"[server]
postgres_listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9090"
tls_cert = "pki/gateway.crt"
tls_key = "pki/gateway.key"
client_ca = "pki/ca.crt"
store = "sqlite://audit.db"

[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:5432"
database = "app"
allow_groups = ["sre"]
[resources.tls]
mode = "verify-full"
ca = "pki/db-ca.crt"
server_name = "localhost"
[resources.credentials]
user = "app"
password_env = "APP_DB_PASSWORD"
"#;

/// `tollgate serve --config F` with `text` in F: must exit non-zero promptly; returns (F, stderr).
fn serve_fails(text: Option<&str>) -> (String, String) {
    let tmp = tempdir();
    let path = tmp.path().join("tollgate.toml");
    if let Some(t) = text {
        std::fs::write(&path, t).unwrap();
    }
    let out = run_with_timeout(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("TOLLGATE_CONFIG"),
        Duration::from_secs(10),
    );
    assert!(!out.status.success(), "serve accepted: {text:?}");
    assert_eq!(out.status.code(), Some(1));
    (path.display().to_string(), stderr(&out))
}

#[test]
fn serve_refuses_bad_configs_with_file_key_and_line() {
    // The good config itself loads (so every failure below is the one edit's doing).
    let tmp = tempdir();
    std::fs::write(tmp.path().join("tollgate.toml"), GOOD_CONFIG).unwrap();
    tollgate_config::load(&tmp.path().join("tollgate.toml")).expect("GOOD_CONFIG is valid");

    let (path, err) = serve_fails(None);
    assert!(
        err.contains(&format!("cannot read config file {path}")),
        "{err}"
    );

    // Line 5 is tls_key; misspell it.
    let (path, err) = serve_fails(Some(&GOOD_CONFIG.replace("tls_key =", "tls_kye =")));
    assert!(err.contains(&path), "{err}");
    assert!(err.contains("tls_kye"), "{err}");
    assert!(err.contains("line 5"), "{err}");

    let (path, err) = serve_fails(Some(
        &GOOD_CONFIG.replace("\"127.0.0.1:6432\"", "\"localhost\""),
    ));
    assert!(
        err.contains(&format!("{path}:2: server.postgres_listen:")),
        "{err}"
    );
    assert!(
        err.contains("\"localhost\" is not a socket address"),
        "{err}"
    );

    let second = &GOOD_CONFIG[GOOD_CONFIG.find("[[resources]]").unwrap()..];
    let dup = format!("{GOOD_CONFIG}\n{second}");
    let dup_line = dup.lines().position(|l| l == "name = \"app\"").unwrap();
    let dup_line = dup
        .lines()
        .skip(dup_line + 1)
        .position(|l| l == "name = \"app\"")
        .unwrap()
        + dup_line
        + 2;
    let (path, err) = serve_fails(Some(&dup));
    assert!(err.contains("duplicate resource name \"app\""), "{err}");
    assert!(
        err.contains(&format!("{path}:{dup_line}:")),
        "want line {dup_line}: {err}"
    );
}

/// Run `python3 -c SCRIPT DB` against a SQLite file.
fn sqlite(db: &Path, script: &str) {
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn audit_verify(config: &Path, json: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["audit", "verify", "--config"]).arg(config);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn audit_verify_detects_altered_and_deleted_events() {
    let mut env = Env::start();
    for q in ["SELECT 1", "SELECT 'two'", "SELECT 3"] {
        let out = env.psql(&env.conninfo("app"), &["-c", q]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    env.events_until("three closed sessions with their commands", |evs| {
        evs.iter().filter(|e| e["kind"] == "session.close").count() >= 3
            && evs.iter().filter(|e| e["kind"] == "command").count() >= 3
    });
    // No writer may race the tampering below.
    env.gw.kill();

    let config = env.gw.config_path.clone();
    let db = env.tmp.path().join("audit.db");
    let out = audit_verify(&config, false);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.starts_with("ok:"), "{text}");

    // A second copy of the intact store (via SQLite's backup API, WAL included) for the deletion.
    let copy_dir = env.tmp.path().join("copy");
    std::fs::create_dir(&copy_dir).unwrap();
    let copy_config = copy_dir.join("tollgate.toml");
    std::fs::copy(&config, &copy_config).unwrap();
    std::fs::copy(
        env.tmp.path().join("app.password"),
        copy_dir.join("app.password"),
    )
    .unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys\nsrc=sqlite3.connect(sys.argv[1]); dst=sqlite3.connect(sys.argv[2]); src.backup(dst); dst.close()",
        ])
        .arg(&db)
        .arg(copy_dir.join("audit.db"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(audit_verify(&copy_config, false).status.code(), Some(0));

    // Alter one recorded statement.
    sqlite(
        &db,
        "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\n\
         n=c.execute(\"UPDATE events SET payload = replace(payload, 'SELECT', 'DELETE') WHERE id = (SELECT min(id) FROM events WHERE kind='command')\").rowcount\n\
         assert n == 1, n\nc.commit()",
    );
    let out = audit_verify(&config, false);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("BROKEN"), "{text}");
    assert!(text.contains("hash mismatch"), "{text}");
    let out = audit_verify(&config, true);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    let first_break = &report["first_break"];
    assert!(first_break.is_object(), "{report:#}");
    assert!(
        first_break["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("hash"),
        "{report:#}"
    );
    let altered_id = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT min(id) FROM events WHERE kind='command'\").fetchone()[0])",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(
        first_break["event_id"].to_string(),
        stdout(&altered_id),
        "the break must point at the altered event: {report:#}"
    );

    // Delete one event from the intact copy.
    sqlite(
        &copy_dir.join("audit.db"),
        "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\n\
         n=c.execute(\"DELETE FROM events WHERE id = (SELECT min(id) FROM events WHERE kind='command')\").rowcount\n\
         assert n == 1, n\nc.commit()",
    );
    let out = audit_verify(&copy_config, false);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("BROKEN"), "{text}");
    assert!(text.contains("missing (event deleted)"), "{text}");

    // A store that cannot be opened is exit 2, not a verdict.
    let out = audit_verify(&env.tmp.path().join("no-such.toml"), false);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn help_lists_only_working_commands() {
    let out = tollgate(&["--help"]);
    assert!(out.status.success());
    let help = stdout(&out);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        [
            "serve", "demo", "pki", "check", "scan", "audit", "store", "sessions", "mcp",
            "reviews", "access", "login", "help"
        ],
        "{help}"
    );
    // `login` takes a workload token; without one it says what it needs (exit 2).
    let out = tollgate(&["login"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "`tollgate login` ran without a token"
    );
    assert!(stderr(&out).contains("--gateway"), "{}", stderr(&out));
}

/// The demo process; interrupted, then killed, if a test leaves it running.
struct Demo {
    child: Child,
}

impl Demo {
    /// Ctrl-C as a terminal delivers it: SIGINT to the demo's whole process group.
    fn interrupt(&self) {
        // SAFETY: a plain signal to the process group of the child this test started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGINT) };
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.interrupt();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgrep(pattern: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .unwrap();
    stdout(&out)
}

#[test]
fn demo_serves_alice_and_stops_cleanly_on_ctrl_c() {
    let tmp = tempdir();
    let demo_dir = tmp.path().join("demo");
    let child = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(&demo_dir)
        .current_dir(tmp.path())
        .process_group(0)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut demo = Demo { child };
    let (tx, rx) = mpsc::channel::<String>();
    let out = demo.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_pipe = demo.child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err_pipe), &mut s);
        s
    });

    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut alice_cmd = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.starts_with("psql \"host=localhost port=")
                    && line.contains("user=alice")
                    && line.contains("sslcert=")
                {
                    alice_cmd = Some(line.clone());
                }
                lines.push(line);
                // The copy-paste commands follow the ready line and end with the Ctrl-C hint.
                if alice_cmd.is_some()
                    && lines.last().is_some_and(|l| l.starts_with("Press Ctrl-C"))
                {
                    break;
                }
            }
            Err(_) => panic!(
                "demo never became ready; stdout so far:\n{}",
                lines.join("\n")
            ),
        }
    }
    let alice_cmd = alice_cmd.unwrap();
    let conninfo = alice_cmd.split('"').nth(1).unwrap().to_string();
    let port: u16 = conninfo
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .unwrap()
        .parse()
        .unwrap();

    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM customers"])
        .arg(&conninfo)
        .current_dir(tmp.path())
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "4");

    // The printed curl commands work as printed: the agent sees the demo API masked, and a
    // guardrail refuses its DELETE.
    let printed = |needle: &str| {
        let line = lines
            .iter()
            .find(|l| l.starts_with("curl ") && l.contains(needle))
            .unwrap_or_else(|| panic!("no curl line with {needle:?}: {lines:#?}"));
        let cmd = line
            .split("   #")
            .next()
            .unwrap()
            .split("  #")
            .next()
            .unwrap();
        let out = Command::new("sh")
            .args(["-c", &format!("{cmd} -sS -w '\\n%{{http_code}}'")])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        stdout(&out)
    };
    let masked = printed("/v1/customers          # the agent");
    assert!(masked.ends_with("\n200"), "{masked}");
    assert!(masked.contains("Ada Lovelace"), "{masked}");
    assert!(
        !masked.contains("ada@example.com") && !masked.contains("4242 4242 4242 4242"),
        "{masked}"
    );
    let denied = printed("-X DELETE");
    assert!(
        denied.ends_with("\n403") && denied.contains("no-deletes"),
        "{denied}"
    );
    // The demo MCP server: the denied tool is not listed, a tool's answer is masked.
    let listed = printed("\"tools/list\"");
    assert!(
        listed.ends_with("\n200")
            && listed.contains("lookup_customer")
            && !listed.contains("delete_customer"),
        "{listed}"
    );
    let looked_up = printed("lookup_customer");
    assert!(
        looked_up.ends_with("\n200") && looked_up.contains("Ada Lovelace"),
        "{looked_up}"
    );
    assert!(
        !looked_up.contains("ada@example.com") && !looked_up.contains("4242 4242 4242 4242"),
        "{looked_up}"
    );

    // The web console signs in with the printed reviewer token.
    let console = lines
        .iter()
        .find_map(|l| l.strip_prefix("#   "))
        .filter(|l| l.contains("/reviews") && l.contains("token: "))
        .unwrap_or_else(|| panic!("no console line: {lines:#?}"));
    let url = console.split_whitespace().next().unwrap();
    let token = console.rsplit("token: ").next().unwrap().trim();
    let origin = url.trim_end_matches("/reviews");
    let browser = ConsoleCurl {
        ca: demo_dir.join("pki/ca.crt"),
        origin: origin.to_string(),
    };
    let session = browser.login(token);
    let (status, page) = browser.page(&session, "/reviews");
    assert!(
        status == 200 && page.contains("Waiting for your decision"),
        "{page}"
    );

    // alice's certificate as a PKCS#12 bundle for the browser, with its printed password.
    let p12_line = lines
        .iter()
        .find(|l| l.contains("alice.p12") && l.contains("password: "))
        .unwrap_or_else(|| panic!("no PKCS#12 line: {lines:#?}"));
    let password = p12_line.rsplit("password: ").next().unwrap().trim();
    let p12 = demo_dir.join("pki/alice.p12");
    assert!(p12.is_file(), "{} missing", p12.display());
    assert!(
        lines.iter().any(|l| l.contains("Firefox")) && lines.iter().any(|l| l.contains("Chrome")),
        "{lines:#?}"
    );
    let out = Command::new("openssl")
        .args(["pkcs12", "-info", "-nokeys", "-passin"])
        .arg(format!("pass:{password}"))
        .arg("-in")
        .arg(&p12)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info = stdout(&out);
    assert!(
        info.contains("CN = alice") || info.contains("CN=alice"),
        "{info}"
    );
    // The leaf in alice.crt, base64 line for line, is the certificate in the bundle.
    let alice_pem = std::fs::read_to_string(demo_dir.join("pki/alice.crt")).unwrap();
    let leaf: Vec<&str> = alice_pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    assert!(!leaf.is_empty(), "{alice_pem}");
    assert!(
        info.contains(&leaf.join("\n")),
        "the bundle does not hold alice's certificate: {info}"
    );
    // ... and signs alice in to the console, as a browser that imported it would.
    let (status, _, by_cert) = browser.curl(&[
        "--cert-type",
        "P12",
        "--cert",
        &format!("{}:{password}", p12.display()),
        url,
    ]);
    assert!(status == 200 && by_cert.contains(">alice<"), "{by_cert}");
    let wrong = Command::new("openssl")
        .args(["pkcs12", "-info", "-nokeys", "-passin", "pass:wrong"])
        .arg("-in")
        .arg(&p12)
        .output()
        .unwrap();
    assert!(
        !wrong.status.success(),
        "the bundle opens without its password"
    );

    let pg_dir = demo_dir.canonicalize().unwrap();
    assert!(
        !pgrep(pg_dir.to_str().unwrap()).is_empty(),
        "the demo's PostgreSQL is not running under {}",
        pg_dir.display()
    );

    demo.interrupt();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = demo.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "demo still running 15 s after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let err_text = err_reader.join().unwrap();
    assert!(status.success(), "demo exited {status}: {err_text}");
    assert!(
        rest.iter().any(|l| l.starts_with("demo stopped")),
        "{rest:?}\n{err_text}"
    );
    let left = pgrep(pg_dir.to_str().unwrap());
    assert!(left.is_empty(), "processes left behind: {left}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the gateway port {port} is still open"
    );
}

#[test]
fn pki_revoke_writes_a_crl_openssl_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ds = d.to_str().unwrap();
    assert!(tollgate(&["pki", "init", "--dir", ds]).status.success());
    let issue = |name: &str| {
        let out = d.join(name);
        let o = tollgate(&[
            "pki",
            "issue",
            "--dir",
            ds,
            "--client",
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        out.with_extension("crt")
    };
    let (bob, eve) = (issue("bob"), issue("eve"));
    let serial_of = |crt: &std::path::Path| {
        let o = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(crt)
            .output()
            .unwrap();
        stdout(&o).trim_start_matches("serial=").to_uppercase()
    };
    for crt in [&bob, &eve] {
        let out = tollgate(&["pki", "revoke", "--dir", ds, crt.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(stdout(&tollgate(&["pki", "revoke", "--dir", ds])).contains("2 revoked"));
    let out = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-CAfile"])
        .arg(d.join("ca.crt"))
        .arg("-in")
        .arg(d.join("ca.crl"))
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("verify OK"), "{text}");
    for crt in [&bob, &eve] {
        let serial = serial_of(crt);
        assert!(
            text.to_uppercase().contains(&serial),
            "{serial} not in {text}"
        );
    }
}
