//! SAML 2.0 sign-in against a real identity provider: pysaml2 (tests/saml/idp.py) with keys
//! made at test time, signing with xmlsec1, answering the gateway's AuthnRequests (HTTP-Redirect
//! binding) with signed assertions posted back through its HTTP-POST binding form. The browser
//! is curl with a cookie jar, following redirects and posting the IdP's forms as a browser does.
//!
//! - The console: "Sign in with SAML" → IdP login → ACS → the console session; the groups
//!   attribute (mapped by `group_map`) decides the role.
//! - `tollgate login --saml` (the real binary): its loopback listener gets a one-time code bound
//!   to its key, redeemed for a certificate that psql then uses; the code works once, only with
//!   that key.
//! - Attacks, each refused at the ACS with a generic page and its reason in the log: unsigned,
//!   signed by another key, another audience, another recipient, expired, unsolicited (no or an
//!   unknown RelayState), a wrong InResponseTo, a replayed POST, signature wrapping (a signed
//!   assertion plus an injected unsigned one), and a sign-in collected by another browser.

mod common;

use common::{psql_env, stderr, stdout, Gateway, Pki};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tollgate_testsupport::{ClusterOptions, PgCluster};

/// pysaml2 for the python3 on PATH, installed when missing (as scripts/test does).
fn python_with_pysaml2() -> &'static str {
    let has = || {
        Command::new("python3")
            .args(["-c", "import saml2"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "pysaml2"])
            .output()
            .expect("python3");
        assert!(
            out.status.success() && has(),
            "pip install pysaml2 failed: {}",
            stderr(&out)
        );
    }
    assert!(
        Command::new("xmlsec1").arg("--version").output().is_ok(),
        "xmlsec1 is missing: apt-get install xmlsec1 (scripts/test installs it)"
    );
    "python3"
}

fn idp_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/saml/idp.py")
}

/// The pysaml2 IdP process (killed on drop).
struct Idp {
    child: Child,
    log: PathBuf,
}

impl Idp {
    /// Keys and metadata now; the server once the SP's metadata is known.
    fn prepare(dir: &Path) -> (u16, PathBuf) {
        let port = tollgate_testsupport::free_port();
        let out = Command::new(python_with_pysaml2())
            .arg(idp_script())
            .args(["metadata", "--port", &port.to_string(), "--dir"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "idp.py metadata: {}", stderr(&out));
        (port, dir.join("idp-metadata.xml"))
    }

    fn serve(dir: &Path, port: u16, sp_metadata: &Path) -> Idp {
        let log = dir.join("idp.log");
        let child = Command::new("python3")
            .arg(idp_script())
            .args(["serve", "--port", &port.to_string(), "--dir"])
            .arg(dir)
            .arg("--sp-metadata")
            .arg(sp_metadata)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let idp = Idp { child, log };
        common::wait_for(Duration::from_secs(30), "the SAML IdP", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        idp
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn location(&self) -> String {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location ({}): {}", self.status, self.body))
            .to_string()
    }
    /// The hidden inputs and action of the page's form.
    fn form(&self) -> (String, Vec<(String, String)>) {
        let action = attr_after(&self.body, "action=\"").unwrap_or_default();
        let mut fields = Vec::new();
        let mut rest = self.body.as_str();
        while let Some(i) = rest.find("<input type=\"hidden\" name=\"") {
            rest = &rest[i + 27..];
            let name = rest[..rest.find('"').unwrap()].to_string();
            let value = attr_after(rest, "value=\"").unwrap_or_default();
            fields.push((name, value));
        }
        (action, fields)
    }
}

/// The gateway's log without terminal colours.
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

fn attr_after(text: &str, marker: &str) -> Option<String> {
    let i = text.find(marker)? + marker.len();
    let v = &text[i..i + text[i..].find('"')?];
    Some(
        v.replace("&amp;", "&")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&#x27;", "'"),
    )
}

/// A browser: curl with its own cookie jar, trusting the gateway's CA.
struct Browser {
    jar: PathBuf,
    ca: PathBuf,
}

impl Browser {
    fn new(dir: &Path, name: &str, ca: &Path) -> Browser {
        Browser {
            jar: dir.join(format!("{name}.cookies")),
            ca: ca.to_path_buf(),
        }
    }

    fn request(&self, url: &str, form: Option<&[(String, String)]>) -> Answer {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-i", "--max-time", "30", "--cacert"])
            .arg(&self.ca)
            .arg("-b")
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar);
        for (k, v) in form.into_iter().flatten() {
            cmd.args(["--data-urlencode", &format!("{k}={v}")]);
        }
        let out = cmd.arg(url).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{url}: {text} {}", stderr(&out)));
        let headers = lines
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        Answer {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn get(&self, url: &str) -> Answer {
        self.request(url, None)
    }

    fn post(&self, url: &str, form: &[(String, String)]) -> Answer {
        self.request(url, Some(form))
    }

    /// From a gateway URL that starts a sign-in to the IdP's answer: the ACS URL and the form
    /// (SAMLResponse, RelayState) the IdP's page would post. `attack` asks the IdP for a
    /// hostile answer (see idp.py).
    fn sign_in_at_idp(
        &self,
        start: &str,
        user: &str,
        attack: &str,
    ) -> (String, Vec<(String, String)>) {
        let a = self.get(start);
        assert_eq!(a.status, 303, "{start}: {}", a.body);
        let idp_url = a.location();
        let page = self.get(&idp_url);
        assert_eq!(page.status, 200, "{idp_url}: {}", page.body);
        let (action, mut fields) = page.form();
        let base = idp_url.split("/sso/").next().unwrap();
        fields.push(("username".into(), user.into()));
        fields.push(("password".into(), format!("{user}-pw")));
        if !attack.is_empty() {
            fields.push(("attack".into(), attack.into()));
        }
        let answer = self.post(&format!("{base}{action}"), &fields);
        assert_eq!(answer.status, 200, "{}", answer.body);
        let (acs, fields) = answer.form();
        assert!(
            fields.iter().any(|(k, _)| k == "SAMLResponse"),
            "{}",
            answer.body
        );
        (acs, fields)
    }
}

struct Env {
    gw: Gateway,
    idp: Idp,
    pki: Pki,
    https_port: u16,
    dir: tempfile::TempDir,
    _pg: Option<PgCluster>,
}

impl Env {
    fn start(with_pg: bool) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-saml-")
            .tempdir()
            .unwrap();
        let idp_dir = dir.path().join("idp");
        std::fs::create_dir_all(&idp_dir).unwrap();
        let (idp_port, idp_metadata) = Idp::prepare(&idp_dir);
        let pki = Pki::new(&dir.path().join("pki"));
        let gw_cert = pki.server("gateway");
        let https_port = tollgate_testsupport::free_port();
        let pg =
            with_pg.then(|| PgCluster::start(ClusterOptions::default()).expect("start PostgreSQL"));
        let mut config = format!(
            r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{https_port}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "optional"
store = "sqlite://audit.db"
console_url = "https://localhost:{https_port}"
issuing_ca_cert = "{ca}"
issuing_ca_key = "{ca_key}"

[roles]
admin_groups = ["sre"]

[identity.saml]
idp_metadata = "{idp_metadata}"
entity_id = "https://gw.test/saml"
groups_attribute = "groups"
group_map = {{ "idp-sre" = "sre" }}
static_groups = ["people"]
max_cert_ttl = "2h"
"#,
            cert = gw_cert.cert.display(),
            key = gw_cert.key.display(),
            ca = pki.ca.display(),
            ca_key = pki.dir.join("ca.key").display(),
            idp_metadata = idp_metadata.display(),
        );
        if let Some(pg) = &pg {
            config.push_str(&common::app_resource(dir.path(), pg));
        }
        let gw = Gateway::start(dir.path(), &config, &[]);
        // The IdP learns the SP from the gateway's own metadata.
        let browser = Browser::new(dir.path(), "metadata", &pki.ca);
        let md = browser.get(&format!("https://localhost:{https_port}/saml/metadata"));
        assert_eq!(md.status, 200, "{}", md.body);
        assert!(
            md.body.contains("https://gw.test/saml")
                && md
                    .body
                    .contains(&format!("https://localhost:{https_port}/saml/acs")),
            "{}",
            md.body
        );
        let sp_metadata = dir.path().join("sp-metadata.xml");
        std::fs::write(&sp_metadata, &md.body).unwrap();
        let idp = Idp::serve(&idp_dir, idp_port, &sp_metadata);
        Env {
            gw,
            idp,
            pki,
            https_port,
            dir,
            _pg: pg,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https_port)
    }

    fn browser(&self, name: &str) -> Browser {
        Browser::new(self.dir.path(), name, &self.pki.ca)
    }

    /// The console sign-in up to the ACS answer.
    fn console_sign_in(
        &self,
        b: &Browser,
        user: &str,
        attack: &str,
    ) -> (Answer, Vec<(String, String)>) {
        let (acs, fields) = b.sign_in_at_idp(&self.url("/saml/login?next=/sessions"), user, attack);
        assert_eq!(acs, self.url("/saml/acs"));
        (b.post(&acs, &fields), fields)
    }

    /// The ACS refused the answer with the generic page, and the log says `reason`.
    fn assert_refused(&self, a: &Answer, reason: &str) {
        assert_eq!(a.status, 400, "{reason}: {}", a.body);
        assert!(
            a.body.contains("was not accepted"),
            "{reason}: generic page: {}",
            a.body
        );
        self.assert_logged_refusal(a, reason);
    }

    /// The ACS refused the answer to a `tollgate login --saml` and sent the browser back to
    /// the CLI's loopback listener with the refusal; the log says `reason`.
    fn assert_refused_to_cli(&self, a: &Answer, reason: &str) {
        assert_eq!(a.status, 303, "{reason}: {}", a.body);
        let back = a.location();
        assert!(
            back.starts_with("http://127.0.0.1:")
                && back.contains("error=access_denied")
                && back.contains("state=")
                && !back.contains("code="),
            "{back}"
        );
        self.assert_logged_refusal(a, reason);
    }

    fn assert_logged_refusal(&self, a: &Answer, reason: &str) {
        assert!(
            a.header("set-cookie")
                .is_none_or(|c| !c.contains("tollgate_console=")),
            "{reason}: no console session"
        );
        let logged = |logs: &str| {
            strip_ansi(logs).lines().any(|l| {
                l.contains("SAML response refused")
                    && (l.contains(&format!("reason=\"{reason}\""))
                        || l.contains(&format!("reason={reason} ")))
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !logged(&self.gw.logs()) {
            assert!(
                std::time::Instant::now() < deadline,
                "no refusal with reason {reason} in the log:\n{}",
                self.gw.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Signed in: the console session cookie was set and the page at `next` loads.
fn finish(env: &Env, b: &Browser, acs_answer: &Answer) -> Answer {
    assert_eq!(acs_answer.status, 303, "{}", acs_answer.body);
    let finish = acs_answer.location();
    assert!(finish.starts_with("/saml/finish?code="), "{finish}");
    let done = b.get(&env.url(&finish));
    assert_eq!(done.status, 303, "{}", done.body);
    assert!(
        done.headers.iter().any(|(k, v)| k == "set-cookie"
            && v.starts_with("__Host-tollgate_console=")
            && v.contains("Secure")
            && v.contains("HttpOnly")
            && v.contains("SameSite=Lax")),
        "{:?}",
        done.headers
    );
    assert_eq!(done.location(), "/sessions");
    b.get(&env.url("/sessions"))
}

#[test]
fn console_sign_in_with_saml_and_the_attacks_it_refuses() {
    let env = Env::start(false);

    // The sign-in page offers SAML next to the other ways in.
    let login = env.browser("anon").get(&env.url("/login"));
    assert!(
        login.body.contains("Sign in with SAML") && login.body.contains("/saml/login?next="),
        "{}",
        login.body
    );

    // alice: her IdP group idp-sre maps to sre, an admin group: she may browse sessions.
    let alice = env.browser("alice");
    let (acs, _) = env.console_sign_in(&alice, "alice", "");
    let page = finish(&env, &alice, &acs);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("alice"), "{}", page.body);

    // bob: staff only (plus the static group): signed in, but not an auditor or admin.
    let bob = env.browser("bob");
    let (acs, _) = env.console_sign_in(&bob, "bob", "");
    let page = finish(&env, &bob, &acs);
    assert_eq!(page.status, 403, "{}", page.body);
    let reviews = bob.get(&env.url("/reviews"));
    assert_eq!(reviews.status, 200, "{}", reviews.body);

    // The audit trail has the sign-ins, with the IdP's subjects.
    let events = common::read_events(&env.dir.path().join("audit.db"));
    assert!(
        events.iter().any(|e| e["payload"]["route"] == "/saml/acs"
            && e["payload"]["outcome"] == "signed_in"),
        "{events:?}"
    );

    // Replay: the very same POST again.
    let eve = env.browser("eve");
    let (acs, fields) = env.console_sign_in(&eve, "alice", "");
    assert_eq!(acs.status, 303);
    let again = eve.post(&env.url("/saml/acs"), &fields);
    env.assert_refused(&again, "replayed");

    // Unsolicited: no RelayState (IdP-initiated), or one this gateway never issued.
    let (_, fields) = env
        .browser("u1")
        .sign_in_at_idp(&env.url("/saml/login"), "alice", "");
    let without: Vec<_> = fields
        .iter()
        .filter(|(k, _)| k != "RelayState")
        .cloned()
        .collect();
    env.assert_refused(&eve.post(&env.url("/saml/acs"), &without), "unsolicited");
    let (_, fields) = env
        .browser("u2")
        .sign_in_at_idp(&env.url("/saml/login"), "alice", "");
    let forged: Vec<_> = fields
        .iter()
        .map(|(k, v)| match k.as_str() {
            "RelayState" => (k.clone(), "0".repeat(64)),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    env.assert_refused(&eve.post(&env.url("/saml/acs"), &forged), "unsolicited");

    // Hostile answers from the IdP's side, each refused for its reason.
    for (attack, reason) in [
        ("unsigned", "signature"),
        ("other_key", "signature"),
        ("audience", "audience"),
        ("recipient", "recipient"),
        ("expired", "expired"),
        ("irt", "in_response_to"),
        ("xsw", "assertion_count"),
    ] {
        let b = env.browser(attack);
        let (acs, _) = env.console_sign_in(&b, "alice", attack);
        env.assert_refused(&acs, reason);
        assert_eq!(
            b.get(&env.url("/sessions")).status,
            303,
            "{attack}: not signed in (sent to /login)"
        );
    }

    // A verified sign-in collected by another browser than the one that started it.
    let starter = env.browser("starter");
    let (acs, _) = env.console_sign_in(&starter, "alice", "");
    assert_eq!(acs.status, 303);
    let thief = env.browser("thief");
    let stolen = thief.get(&env.url(&acs.location()));
    assert_eq!(stolen.status, 400, "{}", stolen.body);
    assert!(stolen.body.contains("another browser"), "{}", stolen.body);

    // Refusals are counted by reason.
    let metrics = env.gw.metrics();
    assert!(
        metrics
            .contains("tollgate_saml_responses_total{outcome=\"refused\",reason=\"signature\"} 2"),
        "{metrics}"
    );
    // The IdP really signed what it was asked to (its log shows the sign-ins).
    assert!(std::fs::read_to_string(&env.idp.log)
        .unwrap()
        .contains("POST /login"));
}

/// Starts `tollgate login --saml --no-browser`; returns it, its stderr, the sign-in URL it
/// printed, and what it printed up to that.
fn cli_login(
    env: &Env,
    out_dir: &Path,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    String,
    String,
) {
    let mut cli = Command::new(common::BIN)
        .args([
            "login",
            "--saml",
            "--no-browser",
            "--gateway",
            &env.url(""),
            "--ca",
        ])
        .arg(&env.pki.ca)
        .arg("--out-dir")
        .arg(out_dir)
        .env_remove("TOLLGATE_GATEWAY")
        .env_remove("TOLLGATE_CA")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(cli.stderr.take().unwrap());
    let mut url = String::new();
    let mut seen = String::new();
    while url.is_empty() {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the CLI printed no URL: {seen}"
        );
        seen.push_str(&line);
        if let Some(u) = line.trim().strip_prefix(&env.url("/saml/login?")) {
            url = format!("{}{u}", env.url("/saml/login?"));
        }
    }
    (cli, err, url, seen)
}

/// A `tollgate login --saml` whose IdP answer the gateway refuses is told so at once (the
/// browser is sent back to its loopback listener with the refusal), not after its timeout;
/// no certificate is written.
#[test]
fn a_refused_saml_login_ends_the_waiting_cli_at_once() {
    let env = Env::start(false);
    let out_dir = env.dir.path().join("home/.tollgate");
    let (cli, mut err, url, _) = cli_login(&env, &out_dir);
    let b = env.browser("cli-user");
    let (acs, fields) = b.sign_in_at_idp(&url, "alice", "unsigned");
    let answer = b.post(&acs, &fields);
    env.assert_refused_to_cli(&answer, "signature");
    let back = answer.location();
    let started = std::time::Instant::now();
    let loopback = b.get(&back);
    assert_eq!(loopback.status, 400, "{}", loopback.body);
    assert!(
        loopback.body.contains("Sign-in failed"),
        "{}",
        loopback.body
    );
    let out = cli.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(!out.status.success(), "{rest}");
    assert!(
        rest.contains("access_denied") && rest.contains("(signature)"),
        "{rest}"
    );
    assert!(!out_dir.join("alice.crt").exists());
}

/// `tollgate login --saml`: the CLI's own browser URL, printed, is driven by the test.
#[test]
fn login_with_saml_becomes_a_certificate_for_psql() {
    let env = Env::start(true);
    let out_dir = env.dir.path().join("home/.tollgate");
    let (cli, mut err, url, seen) = cli_login(&env, &out_dir);
    let b = env.browser("cli-user");
    let (acs, fields) = b.sign_in_at_idp(&url, "alice", "");
    let answer = b.post(&acs, &fields);
    assert_eq!(answer.status, 303, "{}", answer.body);
    let back = answer.location();
    assert!(back.starts_with("http://127.0.0.1:"), "{back}");
    assert!(back.contains("code=") && back.contains("state="), "{back}");
    let loopback = b.get(&back);
    assert_eq!(loopback.status, 200, "{}", loopback.body);
    let out = cli.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(out.status.success(), "login --saml failed: {seen}{rest}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("certificate for alice"), "{text}");

    // The certificate: alice, her mapped and static groups, at most max_cert_ttl (2h).
    let crt = out_dir.join("alice.crt");
    let key = out_dir.join("alice.key");
    let leaf = &tollgate_tls::pki::inspect(&crt).unwrap()[0];
    assert_eq!(leaf.common_name.as_deref(), Some("alice"));
    let mut groups = leaf.groups.clone();
    groups.sort();
    assert_eq!(groups, ["people", "sre", "staff"]);
    let left = leaf
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(2 * 3600 + 120), "{left:?}");

    // psql with it reaches the resource her group may use.
    let conninfo = format!(
        "host=localhost port={} dbname=app user=alice sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        env.gw.pg_port,
        env.pki.ca.display(),
        crt.display(),
        key.display()
    );
    let out = psql_env(&conninfo, &["-c", "SELECT 40 + 2"], &[]);
    assert!(out.status.success(), "psql: {}", stderr(&out));
    assert_eq!(stdout(&out), "42");

    // The issue is audited as the OIDC path's is.
    let events = common::read_events(&env.dir.path().join("audit.db"));
    let issued = events
        .iter()
        .find(|e| e["kind"] == "cert.issued")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(issued["payload"]["subject"], "alice");
    assert_eq!(issued["payload"]["method"], "saml");

    // The code is bound to the key announced at the start, and works once.
    let (_, csr_a) = tollgate_tls::pki::key_and_csr("a").unwrap();
    let (_, csr_b) = tollgate_tls::pki::key_and_csr("b").unwrap();
    let key_a = tollgate_tls::pki::csr_key_sha256(&csr_a).unwrap();
    let start = env.url(&format!(
        "/saml/login?cli_port=9&cli_state=abcdefghijklmnopqrstuv&cli_key={key_a}"
    ));
    let redeem = |code: &str, csr: &str| -> (u16, String) {
        let body = serde_json::json!({"csr": csr, "saml_code": code}).to_string();
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(&env.pki.ca)
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ])
            .arg(env.url("/api/v1/certificates"))
            .output()
            .unwrap();
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_string())
    };
    let code_of = |b: &Browser| -> String {
        let (acs, fields) = b.sign_in_at_idp(&start, "alice", "");
        let a = b.post(&acs, &fields);
        assert_eq!(a.status, 303, "{}", a.body);
        let loc = a.location();
        let q: HashMap<String, String> = loc
            .split_once('?')
            .unwrap()
            .1
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        assert!(loc.starts_with("http://127.0.0.1:9/callback?"), "{loc}");
        assert_eq!(q["state"], "abcdefghijklmnopqrstuv");
        q["code"].clone()
    };
    let code = code_of(&env.browser("k1"));
    let (status, body) = redeem(&code, &csr_b);
    assert_eq!(status, 403, "another key: {body}");
    let (status, body) = redeem(&code, &csr_a);
    assert_eq!(
        status, 401,
        "the code was used up by the refused attempt: {body}"
    );
    let code = code_of(&env.browser("k2"));
    let (status, body) = redeem(&code, &csr_a);
    assert_eq!(status, 200, "{body}");
    let (status, body) = redeem(&code, &csr_a);
    assert_eq!(status, 401, "once only: {body}");
    assert!(body.contains("unknown, expired or already used"), "{body}");
    let (status, _) = redeem("made-up", &csr_a);
    assert_eq!(status, 401);
}
