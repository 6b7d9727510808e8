//! `tollgate login` for workload identity tokens, against a real OpenID provider (npm
//! `oidc-provider`, the harness in common/idp.rs): a real access token → the real binary →
//! a key (0600) and a certificate signed by the gateway's issuing CA → psql with that
//! certificate reaches a resource allowed to the token's group, as the token's subject. The
//! certificate never outlives the token; service tokens and client certificates are refused on
//! `POST /api/v1/certificates` (403), a bad CSR is a 400, a gateway without an issuing CA
//! answers 503, and one whose issuing CA does not chain to client_ca does not start.
//!
//! People sign in through the provider's own login and consent pages (driven over HTTP by
//! `Idp::browse`): in the browser flow (authorization code + PKCE to the CLI's loopback
//! listener) and in the device flow (the CLI prints a URL and code and polls). Both end with a
//! certificate for the person's subject and groups that psql uses; declining consent, a
//! forged redirect to the listener and an expired device code each end the login with a
//! clear error.

mod common;

use base64::Engine;
use common::idp::{now, Browsed, Consent, Idp};
use common::{psql_env, stderr, stdout, Gateway, Pki};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};
use tollgate_testsupport::{ClusterOptions, PgCluster};

const SERVICE_TOKEN: &str = "svc-token-for-login-test";

struct Env {
    idp: Idp,
    gw: Gateway,
    gw_ca: PathBuf,
    pki: Pki,
    https_port: u16,
    _pg: PgCluster,
    tmp: tempfile::TempDir,
}

fn config(
    pki: &Pki,
    gw_cert: &tollgate_tls::pki::IssuedFiles,
    idp: &Idp,
    https_port: u16,
    pg: Option<(&Path, &PgCluster)>,
    issuing: &str,
) -> String {
    let mut c = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{https_port}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "optional"
store = "sqlite://audit.db"
reload_interval = "200ms"
{issuing}

[[identity.tokens]]
subject = "ci-bot"
sha256 = "{svc}"
groups = ["sre"]

[[identity.oidc]]
issuer = "{issuer}"
ca = "{idp_ca}"
client_id = "tollgate-login"
audiences = ["tollgate"]
max_cert_ttl = "12h"
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
        issuer = idp.issuer,
        idp_ca = idp.ca.display(),
        svc = common::sha256_hex(SERVICE_TOKEN),
    );
    if let Some((dir, pg)) = pg {
        c.push_str(&common::app_resource(dir, pg));
    }
    c
}

impl Env {
    fn start() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-login-")
            .tempdir()
            .unwrap();
        let idp = Idp::start(tmp.path(), tollgate_testsupport::free_port(), "keys1");
        let pg = PgCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
        let pki = Pki::new(&tmp.path().join("pki"));
        let gw_cert = pki.server("gateway");
        let https_port = tollgate_testsupport::free_port();
        // The gateway's own client CA issues (an intermediate of it would do as well).
        let issuing = format!(
            "issuing_ca_cert = \"{}\"\nissuing_ca_key = \"{}\"",
            pki.ca.display(),
            pki.dir.join("ca.key").display()
        );
        let text = config(
            &pki,
            &gw_cert,
            &idp,
            https_port,
            Some((tmp.path(), &pg)),
            &issuing,
        );
        let gw = Gateway::start(tmp.path(), &text, &[]);
        Env {
            idp,
            gw,
            gw_ca: pki.ca.clone(),
            pki,
            https_port,
            _pg: pg,
            tmp,
        }
    }

    fn gateway(&self) -> String {
        format!("https://localhost:{}", self.https_port)
    }

    /// The real `tollgate login` with the token in an environment variable.
    fn login(&self, token: &str, out_dir: &Path, extra: &[&str]) -> Output {
        Command::new(common::BIN)
            .args(["login", "--gateway", &self.gateway(), "--ca"])
            .arg(&self.gw_ca)
            .args(["--id-token-env", "CI_ID_TOKEN", "--out-dir"])
            .arg(out_dir)
            .args(extra)
            .env("CI_ID_TOKEN", token)
            .env_remove("TOLLGATE_GATEWAY")
            .env_remove("TOLLGATE_CA")
            .output()
            .unwrap()
    }

    /// curl POST /api/v1/certificates: (status, body, headers).
    fn post(&self, auth: &[&str], body: &str) -> (u16, String, String) {
        let headers = self.tmp.path().join("curl-headers");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-D"])
            .arg(&headers)
            .args(["-w", "\n%{http_code}", "--cacert"])
            .arg(&self.gw_ca)
            .args(auth)
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("{}/api/v1/certificates", self.gateway()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.trim().parse().unwrap_or(0),
            format!("{body}{}", stderr(&out)),
            std::fs::read_to_string(&headers).unwrap_or_default(),
        )
    }
}

fn token_exp(token: &str) -> u64 {
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["exp"].as_u64().unwrap()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

fn csr_json() -> String {
    let (_, csr) = tollgate_tls::pki::key_and_csr("anything").unwrap();
    serde_json::json!({ "csr": csr }).to_string()
}

#[test]
fn a_workload_token_becomes_a_client_certificate_for_psql() {
    let env = Env::start();
    let token = env.idp.token("sre-agent", "urn:tollgate");
    let exp = token_exp(&token);
    let out_dir = env.tmp.path().join("home/.tollgate");

    let out = env.login(&token, &out_dir, &[]);
    assert!(out.status.success(), "login failed: {}", stderr(&out));
    let text = stdout(&out);
    let crt = out_dir.join("sre-agent.crt");
    let key = out_dir.join("sre-agent.key");
    assert!(
        text.contains("PGSSLCERT=") && text.contains("PGSSLKEY="),
        "{text}"
    );
    assert!(
        text.contains(&format!("sslcert={}", crt.display())),
        "{text}"
    );
    assert!(text.contains("export TOLLGATE_CERT="), "{text}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The certificate: the token's subject and groups, from the gateway's CA, capped by the
    // token's expiry (the issuer's max_cert_ttl is 12h, the token lives 10 minutes).
    let certs = tollgate_tls::pki::inspect(&crt).unwrap();
    assert_eq!(certs.len(), 2, "leaf and chain");
    let leaf = &certs[0];
    assert_eq!(leaf.common_name.as_deref(), Some("sre-agent"));
    assert_eq!(leaf.groups, ["sre"]);
    assert!(certs[1].is_ca);
    assert!(
        unix(leaf.not_after) <= exp,
        "{} > token exp {exp}",
        unix(leaf.not_after)
    );
    assert!(
        unix(leaf.not_after) + 120 >= exp,
        "capped far below the token's exp"
    );

    // psql with that certificate reaches the resource the token's group may use.
    let conninfo = format!(
        "host=localhost port={} dbname=app user=agent sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        env.gw.pg_port,
        env.gw_ca.display(),
        crt.display(),
        key.display()
    );
    let out = psql_env(&conninfo, &["-c", "SELECT 40 + 2"], &[]);
    assert!(out.status.success(), "psql: {}", stderr(&out));
    assert_eq!(stdout(&out), "42");

    // A shorter TTL on request; --print-env prints only exports.
    let out = env.login(&token, &out_dir, &["--ttl", "2m", "--print-env"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines().count() == 4 && text.lines().all(|l| l.starts_with("export ")),
        "{text}"
    );
    let leaf = &tollgate_tls::pki::inspect(&crt).unwrap()[0];
    assert!(unix(leaf.not_after) <= now() + 125, "--ttl 2m");

    // The issuer's max_cert_ttl caps too (changed by a config reload); the token from a file.
    let text = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let staged = env.tmp.path().join("tollgate.toml.new");
    std::fs::write(
        &staged,
        text.replace("max_cert_ttl = \"12h\"", "max_cert_ttl = \"3m\""),
    )
    .unwrap();
    std::fs::rename(&staged, &env.gw.config_path).unwrap();
    common::wait_for(Duration::from_secs(20), "the reload", || {
        env.gw.logs().contains("config reloaded")
    });
    std::thread::sleep(Duration::from_secs(1));
    let token_file = env.tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let out = Command::new(common::BIN)
        .args(["login", "--gateway", &env.gateway(), "--ca"])
        .arg(&env.gw_ca)
        .arg("--id-token-file")
        .arg(&token_file)
        .arg("--out-dir")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let leaf = &tollgate_tls::pki::inspect(&crt).unwrap()[0];
    assert!(unix(leaf.not_after) <= now() + 185, "max_cert_ttl 3m");

    // Service tokens and client certificates get no certificate; bad CSRs and tokens are refused.
    let (status, body, _) = env.post(
        &["-H", &format!("Authorization: Bearer {SERVICE_TOKEN}")],
        &csr_json(),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("OIDC"), "{body}");
    let alice = env.pki.client("alice", &["sre"]);
    let (status, body, _) = env.post(
        &[
            "--cert",
            &alice.cert.display().to_string(),
            "--key",
            &alice.key.display().to_string(),
        ],
        &csr_json(),
    );
    assert_eq!(status, 403, "{body}");
    let bearer = format!("Authorization: Bearer {token}");
    let (status, body, _) = env.post(
        &["-H", &bearer],
        r#"{"csr": "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n-----END CERTIFICATE REQUEST-----\n"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("CSR"), "{body}");
    let (status, body, _) = env.post(&["-H", &bearer], r#"{"csr": "garbage"}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body, headers) =
        env.post(&["-H", "Authorization: Bearer not.a.token"], &csr_json());
    assert_eq!(status, 401, "{body}");
    assert!(
        headers.to_ascii_lowercase().contains("www-authenticate"),
        "{headers}"
    );
    // A CSR whose signature does not verify.
    let (_, good) = tollgate_tls::pki::key_and_csr("x").unwrap();
    let tampered = tamper(&good);
    let (status, body, _) = env.post(
        &["-H", &bearer],
        &serde_json::json!({ "csr": tampered }).to_string(),
    );
    assert_eq!(status, 400, "{body}");

    // The audit trail: the session as the token's subject on the issued certificate, and a
    // cert.issued event per certificate with no trace of the token.
    let events = common::read_events(&env.tmp.path().join("audit.db"));
    let open = events
        .iter()
        .find(|e| e["kind"] == "session.open" && e["payload"]["auth_method"] == "cert")
        .unwrap_or_else(|| panic!("no cert session.open in {events:#?}"));
    assert_eq!(open["payload"]["subject"], "sre-agent");
    let issued: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "cert.issued")
        .collect();
    assert_eq!(issued.len(), 3, "{events:#?}");
    let first = &issued[0]["payload"];
    assert_eq!(first["subject"], "sre-agent");
    assert_eq!(first["groups"], serde_json::json!(["sre"]));
    assert_eq!(first["token_issuer"], env.idp.issuer.as_str());
    assert!(first["serial"].as_str().is_some_and(|s| s.len() >= 16));
    assert!(first["not_after"].as_str().is_some());
    let all = serde_json::to_string(&events).unwrap();
    let signature = token.rsplit('.').next().unwrap();
    assert!(!all.contains(signature), "the token is in the audit trail");
    assert!(!all.contains(SERVICE_TOKEN));
    assert!(events.iter().any(|e| e["kind"] == "api.write"
        && e["payload"]["route"] == "/api/v1/certificates"
        && e["payload"]["status"] == 403));
}

/// Flip a byte inside the CSR's signature.
fn tamper(pem: &str) -> String {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let n = der.len();
    der[n - 5] ^= 0x01;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
}

#[test]
fn without_an_issuing_ca_the_route_is_503_and_a_foreign_one_stops_start_up() {
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-login-503-")
        .tempdir()
        .unwrap();
    let idp = Idp::start(tmp.path(), tollgate_testsupport::free_port(), "keys1");
    let pki = Pki::new(&tmp.path().join("pki"));
    let gw_cert = pki.server("gateway");
    let https_port = tollgate_testsupport::free_port();
    let gw = Gateway::start(
        tmp.path(),
        &config(&pki, &gw_cert, &idp, https_port, None, ""),
        &[],
    );
    let token = idp.token("sre-agent", "urn:tollgate");
    let out = Command::new(common::BIN)
        .args([
            "login",
            "--gateway",
            &format!("https://localhost:{https_port}"),
            "--ca",
        ])
        .arg(&pki.ca)
        .args(["--id-token-env", "CI_ID_TOKEN", "--out-dir"])
        .arg(tmp.path().join("out"))
        .env("CI_ID_TOKEN", &token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("503") && err.contains("server.issuing_ca_cert/key"),
        "{err}"
    );
    drop(gw);

    // An issuing CA from another PKI: the gateway would refuse what it issues, so it does not start.
    let other = Pki::new(&tmp.path().join("other-pki"));
    let issuing = format!(
        "issuing_ca_cert = \"{}\"\nissuing_ca_key = \"{}\"",
        other.ca.display(),
        other.dir.join("ca.key").display()
    );
    let text = config(&pki, &gw_cert, &idp, https_port, None, &issuing)
        .replace("{pg_port}", &tollgate_testsupport::free_port().to_string())
        .replace(
            "{admin_port}",
            &tollgate_testsupport::free_port().to_string(),
        );
    let path = tmp.path().join("foreign.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the gateway started with a foreign issuing CA");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("server.client_ca") && err.contains("issuing"),
        "{err}"
    );
}

/// The real `tollgate login` for a person, started: its stderr lines come through `lines`.
struct Interactive {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Vec<String>,
}

impl Interactive {
    fn start(env: &Env, out_dir: &Path, extra: &[&str]) -> Interactive {
        use std::io::BufRead;
        let mut child = Command::new(common::BIN)
            .args(["login", "--gateway", &env.gateway(), "--ca"])
            .arg(&env.gw_ca)
            .arg("--idp-ca")
            .arg(&env.idp.ca)
            .arg("--out-dir")
            .arg(out_dir)
            .args(extra)
            .env_remove("TOLLGATE_GATEWAY")
            .env_remove("TOLLGATE_CA")
            .env_remove("TOLLGATE_IDP_CA")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Interactive {
            child,
            lines,
            stderr: Vec::new(),
        }
    }

    /// The first URL on a stderr line that contains `marker`.
    fn url_after(&mut self, marker: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("login printed no {marker:?}: {:?}", self.stderr));
            self.stderr.push(line.clone());
            if line.contains(marker) {
                let at = line.find("https://").expect("a URL");
                return line[at..]
                    .split(|c: char| c.is_whitespace() || c == ')')
                    .next()
                    .unwrap()
                    .to_string();
            }
        }
    }

    /// Exit status, stdout and all of stderr.
    fn finish(mut self) -> (bool, String, String) {
        use std::io::Read;
        let status = self.child.wait().unwrap();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push(l);
        }
        (status.success(), out, self.stderr.join("\n"))
    }
}

/// GET a URL on the CLI's loopback listener, as the browser does after the provider's redirect.
fn follow(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn query_value(url: &str, name: &str) -> String {
    let query = url.split_once('?').unwrap().1;
    let pair = query
        .split('&')
        .find(|p| p.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {url}"));
    let raw = &pair[name.len() + 1..];
    tollgate_api::params::decode(raw).unwrap()
}

/// psql with the certificate `tollgate login` wrote for `subject`: `SELECT current_user`-like
/// proof that the resource is reachable.
fn psql_with(env: &Env, out_dir: &Path, subject: &str) -> Output {
    let conninfo = format!(
        "host=localhost port={} dbname=app user=person sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        env.gw.pg_port,
        env.gw_ca.display(),
        out_dir.join(format!("{subject}.crt")).display(),
        out_dir.join(format!("{subject}.key")).display(),
    );
    psql_env(&conninfo, &["-c", "SELECT 6 * 7"], &[])
}

#[test]
fn people_sign_in_with_the_browser_or_a_device_code() {
    let env = Env::start();
    let jar = |n: &str| env.tmp.path().join(format!("cookies-{n}"));

    // A device code that expires (3 s at the provider) before anyone enters it: the CLI stops.
    let short_dir = env.tmp.path().join("short");
    let mut short = Interactive::start(
        &env,
        &short_dir,
        &[
            "--device",
            "--issuer",
            &env.idp.issuer,
            "--client-id",
            "tollgate-short",
        ],
    );
    short.url_after("enter the code");

    // Browser flow: the CLI prints the authorization URL (PKCE S256, state, nonce, loopback
    // redirect on a random port); alice signs in at the provider and approves.
    let dir = env.tmp.path().join("alice");
    let mut cli = Interactive::start(&env, &dir, &["--no-browser"]);
    let url = cli.url_after("/auth?");
    assert_eq!(query_value(&url, "code_challenge_method"), "S256");
    assert_eq!(query_value(&url, "client_id"), "tollgate-login");
    assert_eq!(query_value(&url, "code_challenge").len(), 43);
    let redirect = query_value(&url, "redirect_uri");
    assert!(
        redirect.starts_with("http://127.0.0.1:") && redirect.ends_with("/callback"),
        "{redirect}"
    );
    let state = query_value(&url, "state");
    assert!(state.len() >= 43 && !query_value(&url, "nonce").is_empty());
    // The listener answers only its own path.
    let port_path = redirect.trim_start_matches("http://127.0.0.1:");
    let port = port_path.split('/').next().unwrap();
    assert_eq!(
        follow(&format!("http://127.0.0.1:{port}/favicon.ico")).0,
        404
    );
    let Browsed::Left(back) = env
        .idp
        .browse(&url, "alice", Consent::Approve, &jar("alice"))
    else {
        panic!("the provider did not redirect back");
    };
    assert!(back.starts_with(&format!("{redirect}?code=")), "{back}");
    assert_eq!(query_value(&back, "state"), state);
    let (status, page) = follow(&back);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Signed in"), "{page}");
    let (ok, out, err) = cli.finish();
    assert!(ok, "login failed:\n{err}\n{out}");
    assert!(out.contains("certificate for alice (groups: sre)"), "{out}");
    let leaf = &tollgate_tls::pki::inspect(&dir.join("alice.crt")).unwrap()[0];
    assert_eq!(leaf.common_name.as_deref(), Some("alice"));
    assert_eq!(leaf.groups, ["sre"]);
    let out = psql_with(&env, &dir, "alice");
    assert!(out.status.success(), "psql: {}", stderr(&out));
    assert_eq!(stdout(&out), "42");

    // A redirect to the listener with another state (a forged or stale one) ends the login.
    let mut cli = Interactive::start(&env, &env.tmp.path().join("forged"), &["--no-browser"]);
    let url = cli.url_after("/auth?");
    let redirect = query_value(&url, "redirect_uri");
    let (status, _) = follow(&format!("{redirect}?code=stolen&state=not-this-one"));
    assert_eq!(status, 400);
    let (ok, _, err) = cli.finish();
    assert!(!ok && err.contains("another state"), "{err}");

    // Declining at the provider's consent page: access_denied comes back, the login says so.
    let mut cli = Interactive::start(&env, &env.tmp.path().join("declined"), &["--no-browser"]);
    let url = cli.url_after("/auth?");
    let Browsed::Left(back) = env
        .idp
        .browse(&url, "alice", Consent::Decline, &jar("declined"))
    else {
        panic!("the provider did not redirect back");
    };
    assert_eq!(query_value(&back, "error"), "access_denied");
    assert_eq!(follow(&back).0, 400);
    let (ok, out, err) = cli.finish();
    assert!(
        !ok && err.contains("did not sign you in (access_denied"),
        "{err}"
    );
    assert!(!out.contains("certificate for"), "{out}");

    // Device flow: the CLI prints the verification URI and the code; dave (group dev) enters it
    // on the provider's device page, signs in and approves; the CLI, polling, gets the token.
    let dir = env.tmp.path().join("dave");
    let mut cli = Interactive::start(&env, &dir, &["--device"]);
    let plain = cli.url_after("enter the code");
    assert_eq!(plain, format!("{}/device", env.idp.issuer));
    let complete = cli.url_after("(or open");
    let Browsed::Page(done) = env
        .idp
        .browse(&complete, "dave", Consent::Approve, &jar("dave"))
    else {
        panic!("the device flow redirected away");
    };
    assert!(done.contains("successful"), "{done}");
    let (ok, out, err) = cli.finish();
    assert!(ok, "device login failed:\n{err}\n{out}");
    assert!(out.contains("certificate for dave (groups: dev)"), "{out}");
    // dev may not use the resource (allow_groups = sre): groups from the token decide.
    let out = psql_with(&env, &dir, "dave");
    assert!(!out.status.success(), "dev reached an sre resource");
    // The provider answered the first poll slow_down: the next came at least 1 + 5 s later.
    let log = std::fs::read_to_string(&env.idp.log).unwrap();
    let gaps: Vec<u64> = log
        .lines()
        .filter_map(|l| l.strip_prefix("device-poll 2 "))
        .filter_map(|g| g.trim().parse().ok())
        .collect();
    assert!(
        !gaps.is_empty() && gaps.iter().all(|g| *g >= 5_900),
        "{log}"
    );

    // Declining the device sign-in: the CLI stops polling with the provider's refusal.
    let mut cli = Interactive::start(&env, &env.tmp.path().join("nodevice"), &["--device"]);
    let complete = cli.url_after("(or open");
    env.idp
        .browse(&complete, "alice", Consent::Decline, &jar("nodevice"));
    let (ok, _, err) = cli.finish();
    assert!(
        !ok && err.contains("refused at the identity provider"),
        "{err}"
    );

    let (ok, _, err) = short.finish();
    assert!(!ok && err.contains("the code expired"), "{err}");
    assert!(!short_dir.exists(), "nothing written for a failed login");

    // Each person's certificate is a cert.issued event; no token or code in the audit trail.
    let events = common::read_events(&env.tmp.path().join("audit.db"));
    let issued: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "cert.issued")
        .filter_map(|e| e["payload"]["subject"].as_str())
        .collect();
    assert_eq!(issued, ["alice", "dave"], "{events:#?}");
}
