//! OIDC tokens as credentials, against a real OpenID provider (npm `oidc-provider` 8, run by
//! node over TLS with its own CA): psql with the token as the password, curl with a bearer
//! token to an HTTP resource and to the API, groups from the token deciding access, and the
//! attacks a verifier must refuse (alg none, HS256 "signed" with the public key, expired, wrong
//! aud, wrong iss, unknown kid, a forged signature, no groups claim). Key rotation at the IdP
//! is picked up without restarting the gateway.

mod common;

use base64::Engine;
use common::idp::{enc, now, Idp};
use common::upstream::Upstream;
use common::{psql_env, stderr, stdout, wait_for, Gateway, Pki};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_testsupport::{ClusterOptions, PgCluster};

struct Env {
    idp: Idp,
    gw: Gateway,
    gw_ca: PathBuf,
    https_port: u16,
    _pg: PgCluster,
    _up: Upstream,
    tmp: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        Env::start_with_idp(true)
    }

    /// `idp_up`: whether the IdP is running when the gateway starts.
    fn start_with_idp(idp_up: bool) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-oidc-")
            .tempdir()
            .unwrap();
        let mut idp = Idp::new(tmp.path(), tollgate_testsupport::free_port(), "keys1");
        if idp_up {
            idp.up();
        }
        let pg = PgCluster::start(ClusterOptions::default()).expect("start PostgreSQL");
        let pki = Pki::new(&tmp.path().join("pki"));
        let gw_cert = pki.server("gateway");
        let up_cert = pki.server("upstream");
        let up = Upstream::start(&up_cert.cert, &up_cert.key);
        let https_port = tollgate_testsupport::free_port();
        let config = format!(
            r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{https_port}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "sqlite://audit.db"
reload_interval = "200ms"

[roles]
auditor_groups = ["sre"]

[[identity.oidc]]
issuer = "{issuer}"
ca = "{idp_ca}"
audiences = ["tollgate"]
group_map = {{ "6f1c-guid" = "sre" }}
{app}

[[resources]]
name = "billing"
kind = "http"
upstream = "https://localhost:{up_port}"
allow_groups = ["sre"]
[resources.tls]
ca = "{ca}"

[[resources]]
name = "tools"
kind = "mcp"
upstream = "https://localhost:{up_port}/mcp"
allow_groups = ["sre"]
audiences = ["https://tools.example/mcp"]
[resources.tls]
ca = "{ca}"
"#,
            cert = gw_cert.cert.display(),
            key = gw_cert.key.display(),
            ca = pki.ca.display(),
            issuer = idp.issuer,
            idp_ca = idp.ca.display(),
            app = common::app_resource(tmp.path(), &pg),
            up_port = up.port,
        );
        let gw = Gateway::start(tmp.path(), &config, &[]);
        Env {
            idp,
            gw,
            gw_ca: pki.ca.clone(),
            https_port,
            _pg: pg,
            _up: up,
            tmp,
        }
    }

    /// psql through the gateway with `token` as the password: `Ok(stdout)` or `Err(stderr)`.
    fn psql(&self, token: &str, sql: &str) -> Result<String, String> {
        let conninfo = format!(
            "host=localhost port={} dbname=app user=agent sslmode=verify-full sslrootcert={}",
            self.gw.pg_port,
            self.gw_ca.display()
        );
        let out = psql_env(&conninfo, &["-c", sql], &[("PGPASSWORD", token)]);
        if out.status.success() {
            Ok(stdout(&out))
        } else {
            Err(stderr(&out))
        }
    }

    /// curl with `Authorization: Bearer <token>`: status and `WWW-Authenticate`.
    fn curl(&self, token: &str, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(&self.gw_ca)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://localhost:{}{path}", self.https_port))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = text
            .lines()
            .last()
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0);
        (code, text)
    }
}

/// RFC 8707: an MCP resource takes only OIDC tokens issued for it (its URL, as its protected
/// resource metadata names it, or its configured `audiences`), and such a token is no credential
/// for anything else.
#[test]
fn mcp_resources_take_only_tokens_issued_for_them() {
    let env = Env::start();
    let idp = &env.idp;
    let url = format!("https://localhost:{}/r/tools", env.https_port);
    let for_gateway = idp.token("sre-agent", "urn:tollgate");
    let for_tools = idp.token("sre-agent", &url);
    let for_tools_public = idp.token("sre-agent", "https://tools.example/mcp");
    let for_other = idp.token(
        "sre-agent",
        &format!("https://localhost:{}/r/billing", env.https_port),
    );
    let refused_here = |token: &str, what: &str| {
        let (code, head) = env.curl(token, "/r/tools");
        assert_eq!(code, 401, "{what}: {head}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("error=\"invalid_token\""), "{what}: {head}");
        assert!(
            head.contains("resource_metadata=\"https://localhost:"),
            "{what}: the client is told where to get a token: {head}"
        );
    };
    refused_here(&for_gateway, "a token for the gateway as a whole");
    refused_here(&for_other, "a token for another resource");
    for (token, what) in [
        (&for_tools, "its URL"),
        (&for_tools_public, "its configured audience"),
    ] {
        let (code, head) = env.curl(token, "/r/tools");
        assert!(
            code != 401 && code != 403,
            "a token for {what} is accepted: {head}"
        );
    }
    // A token for the MCP resource is no credential for the database or the other resources.
    refused(env.psql(&for_tools, "select 1"), "authentication failed");
    assert_eq!(env.curl(&for_tools, "/r/billing/v1/x").0, 401);
    assert!(env.psql(&for_gateway, "select 1").is_ok());
    // The refusals are counted by reason, never with the token.
    wait_for(Duration::from_secs(5), "counted", || {
        env.gw
            .metrics()
            .lines()
            .any(|l| l.contains("tollgate_oidc_validations_total") && l.contains("wrong_audience"))
    });
    assert!(!env.gw.logs().contains(&for_tools), "no token in the log");
}

/// SQLSTATE-bearing psql errors are matched on their text; psql prints the message only.
fn refused(r: Result<String, String>, says: &str) {
    match r {
        Ok(out) => panic!("accepted (expected {says:?}): {out}"),
        Err(e) => assert!(e.contains(says), "expected {says:?} in: {e}"),
    }
}

#[test]
fn oidc_tokens_are_credentials_for_postgres_http_and_the_api() {
    let env = Env::start();
    let idp = &env.idp;

    // psql with a real access token as the password: groups from the token decide.
    let sre = idp.token("sre-agent", "urn:tollgate");
    assert_eq!(env.psql(&sre, "SELECT 41 + 1").unwrap(), "42");
    // A group id mapped by group_map (an Entra-style GUID → sre).
    let entra = idp.token("entra-agent", "urn:tollgate");
    assert_eq!(env.psql(&entra, "SELECT 1").unwrap(), "1");
    let dev = idp.token("dev-agent", "urn:tollgate");
    refused(env.psql(&dev, "SELECT 1"), "may not");
    // No groups claim at all → no groups → forbidden.
    let none = idp.token("nogroups-agent", "urn:tollgate");
    refused(env.psql(&none, "SELECT 1"), "may not");

    // The audit trail says who it was and how they authenticated.
    let events = common::read_events(&env.tmp.path().join("audit.db"));
    let open = events
        .iter()
        .find(|e| e["kind"] == "session.open" && e["payload"]["auth_method"] == "oidc")
        .unwrap_or_else(|| panic!("no oidc session.open in {events:#?}"));
    assert_eq!(open["payload"]["subject"], "sre-agent");
    assert!(open["payload"]["token_expires_unix"].as_u64().unwrap() > now());

    // Bearer on an HTTP resource and on the API.
    assert_eq!(env.curl(&sre, "/r/billing/customers/1").0, 200);
    assert_eq!(env.curl(&dev, "/r/billing/customers/1").0, 403);
    assert_eq!(env.curl(&sre, "/api/v1/sessions").0, 200);
    assert_eq!(env.curl(&dev, "/api/v1/sessions").0, 403);
    assert_eq!(env.curl(&none, "/r/billing/customers/1").0, 403);
    assert_eq!(env.curl(&entra, "/r/billing/customers/1").0, 200);
    let accepted = env.gw.metric(
        "tollgate_oidc_validations_total{issuer=\"localhost\",outcome=\"accepted\",reason=\"ok\"}",
    );
    assert!(accepted.unwrap_or(0) >= 8, "{}", env.gw.metrics());

    // Attacks: every one refused on every listener, with a generic answer.
    let jwk = idp.signing_jwk();
    let kid = jwk["kid"].as_str().unwrap();
    let claims = idp.claims("mallory", &["sre"]);
    let none_alg = format!(
        "{}.{}.",
        enc(serde_json::json!({"alg": "none", "kid": kid})
            .to_string()
            .as_bytes()),
        enc(claims.to_string().as_bytes())
    );
    // HS256 with the IdP's public key (PEM) as the HMAC secret: the classic key-confusion forgery.
    let public_pem = std::fs::read(idp.keys.join("public.pem")).unwrap();
    let hs_input = format!(
        "{}.{}",
        enc(serde_json::json!({"alg": "HS256", "kid": kid})
            .to_string()
            .as_bytes()),
        enc(claims.to_string().as_bytes())
    );
    let hs_sig = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public_pem),
        hs_input.as_bytes(),
    );
    let hs256 = format!("{hs_input}.{}", enc(hs_sig.as_ref()));
    // A key the IdP never published, under a kid it does not know, and under its real kid.
    let rng = ring::rand::SystemRandom::new();
    let p8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let mine = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        p8.as_ref(),
        &rng,
    )
    .unwrap();
    let own_key = |kid: &str| {
        let input = format!(
            "{}.{}",
            enc(serde_json::json!({"alg": "ES256", "kid": kid})
                .to_string()
                .as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let sig = mine.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", enc(sig.as_ref()))
    };
    let unknown_kid = own_key("attacker-key");
    // A real token whose claims were edited (sre added to dev's token).
    let tampered = {
        let parts: Vec<&str> = dev.split('.').collect();
        let mut c: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap();
        c["groups"] = serde_json::json!(["sre"]);
        format!(
            "{}.{}.{}",
            parts[0],
            enc(c.to_string().as_bytes()),
            parts[2]
        )
    };
    let mut expired = idp.claims("sre-agent", &["sre"]);
    expired["exp"] = (now() - 120).into();
    expired["iat"] = (now() - 900).into();
    let mut not_yet = idp.claims("sre-agent", &["sre"]);
    not_yet["nbf"] = (now() + 600).into();
    let mut wrong_iss = idp.claims("sre-agent", &["sre"]);
    wrong_iss["iss"] = "https://evil.example".into();
    let wrong_aud = idp.token("sre-agent", "urn:another");
    let attacks = [
        ("alg none", none_alg, "bad_algorithm"),
        ("HS256 with the public key", hs256, "bad_algorithm"),
        ("unknown kid", unknown_kid, "unknown_kid"),
        ("tampered claims", tampered, "bad_signature"),
        ("expired", idp.craft(expired), "expired"),
        ("not yet valid", idp.craft(not_yet), "not_yet_valid"),
        ("wrong issuer", idp.craft(wrong_iss), "unknown_issuer"),
        (
            "wrong audience (real token for another resource)",
            wrong_aud,
            "wrong_audience",
        ),
    ];
    let host = "localhost";
    for (what, token, reason) in &attacks {
        let label = if *reason == "unknown_issuer" {
            "unknown"
        } else {
            host
        };
        let series = format!(
            "tollgate_oidc_validations_total{{issuer=\"{label}\",outcome=\"refused\",reason=\"{reason}\"}}"
        );
        let before = env.gw.metric(&series).unwrap_or(0);
        refused(env.psql(token, "SELECT 1"), "authentication failed");
        let (code, head) = env.curl(token, "/r/billing/customers/1");
        assert_eq!(code, 401, "{what}: {head}");
        let challenge = "www-authenticate: bearer realm=\"tollgate\", error=\"invalid_token\"";
        assert!(
            head.to_ascii_lowercase().contains(challenge),
            "{what}: {head}"
        );
        let (code, head) = env.curl(token, "/api/v1/sessions");
        assert_eq!(code, 401, "{what}");
        assert!(
            head.to_ascii_lowercase().contains(challenge),
            "{what}: {head}"
        );
        let after = env.gw.metric(&series).unwrap_or(0);
        assert!(
            after >= before + 3,
            "{what}: {reason} counted {before} → {after}"
        );
    }
    // The crafted token with the IdP's key and sane claims passes: the refusals above are
    // about what was changed, not about crafting.
    assert_eq!(
        env.psql(&idp.craft(idp.claims("sre-agent", &["sre"])), "SELECT 7")
            .unwrap(),
        "7"
    );
    let logs = env.gw.logs();
    for (_, token, _) in &attacks {
        let sig = token.rsplit('.').next().unwrap();
        assert!(
            sig.is_empty() || !logs.contains(sig),
            "a token reached the log"
        );
    }
    assert!(logs.contains("OIDC token refused"), "{logs}");
}

/// The session ends when its token expires (as for certificates), and the IdP's key can be
/// rotated without restarting the gateway.
#[test]
fn sessions_end_at_token_expiry_and_rotated_keys_are_fetched() {
    let mut env = Env::start();
    let started = Instant::now();

    // A token that expires in a few seconds, signed by the IdP's key: the session is ended.
    let mut short = env.idp.claims("sre-agent", &["sre"]);
    short["exp"] = (now() + 3).into();
    let token = env.idp.craft(short);
    let r = env.psql(&token, "SELECT 1; SELECT pg_sleep(10); SELECT 2");
    refused(r, "the token this session authenticated with has expired");
    let events = common::read_events(&env.tmp.path().join("audit.db"));
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "session.close" && e["payload"]["reason"] == "token_expired"),
        "{events:#?}"
    );

    // Rotation: the IdP restarts with a new key (same issuer and port); its tokens carry a kid
    // the gateway has not seen, which makes it fetch the JWKS again (at most every 30 s).
    let port = env.idp.port;
    let old_kid = env.idp.signing_jwk()["kid"].as_str().unwrap().to_string();
    env.idp.stop();
    env.idp = Idp::start(env.tmp.path(), port, "keys2");
    let new_kid = env.idp.signing_jwk()["kid"].as_str().unwrap().to_string();
    assert_ne!(old_kid, new_kid);
    let fresh = env.idp.token("sre-agent", "urn:tollgate");
    let deadline = started + Duration::from_secs(75);
    loop {
        match env.psql(&fresh, "SELECT 'rotated'") {
            Ok(out) => {
                assert_eq!(out, "rotated");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert!(e.contains("authentication failed"), "{e}");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => panic!(
                "a token signed by the rotated key was never accepted: {e}\n{}",
                env.gw.logs()
            ),
        }
    }
}

/// An issuer removed from the config by a reload: its tokens are refused from then on, and the
/// sessions that authenticated with them end.
#[test]
fn removing_an_issuer_by_reload_ends_its_sessions() {
    let env = Env::start();
    let token = env.idp.token("sre-agent", "urn:tollgate");
    assert_eq!(env.psql(&token, "SELECT 1").unwrap(), "1");
    let running = {
        let conninfo = format!(
            "host=localhost port={} dbname=app user=agent sslmode=verify-full sslrootcert={}",
            env.gw.pg_port,
            env.gw_ca.display()
        );
        let token = token.clone();
        std::thread::spawn(move || {
            psql_env(
                &conninfo,
                &["-c", "SELECT pg_sleep(30)"],
                &[("PGPASSWORD", &token)],
            )
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let start = text.find("[[identity.oidc]]").unwrap();
    let end = start + text[start..].find("[[resources]]").unwrap();
    let without = format!("{}{}", &text[..start], &text[end..]);
    let staged = env.tmp.path().join("tollgate.toml.new");
    std::fs::write(&staged, without).unwrap();
    std::fs::rename(&staged, &env.gw.config_path).unwrap();

    let out = running.join().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "the identity provider that issued this session's token is no longer accepted"
        ),
        "{}",
        stderr(&out)
    );
    refused(env.psql(&token, "SELECT 1"), "authentication failed");
    assert_eq!(env.curl(&token, "/api/v1/sessions").0, 401);
    let events = common::read_events(&env.tmp.path().join("audit.db"));
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "session.close" && e["payload"]["reason"] == "issuer_removed"),
        "{events:#?}"
    );
}

/// An IdP that is down when the gateway starts does not hold it up; its tokens are refused
/// (keys_unavailable) until it answers, then accepted without a restart.
#[test]
fn an_idp_down_at_start_up_delays_nothing() {
    let mut env = Env::start_with_idp(false);
    common::wait_for(
        Duration::from_secs(15),
        "the failed key fetch to be logged",
        || {
            env.gw
                .logs()
                .contains("could not fetch the OIDC issuer's signing keys")
        },
    );
    // Crafted with the key the IdP will publish (made when it first starts).
    env.idp.up();
    let token = env.idp.token("sre-agent", "urn:tollgate");
    env.idp.stop();
    refused(env.psql(&token, "SELECT 1"), "authentication failed");
    assert!(
        env.gw
            .metric("tollgate_oidc_validations_total{issuer=\"localhost\",outcome=\"refused\",reason=\"keys_unavailable\"}")
            .unwrap_or(0)
            >= 1,
        "{}",
        env.gw.metrics()
    );
    env.idp.up();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match env.psql(&token, "SELECT 'up'") {
            Ok(out) => {
                assert_eq!(out, "up");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert!(e.contains("authentication failed"), "{e}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("never accepted once the IdP was up: {e}\n{}", env.gw.logs()),
        }
    }
}

/// `tollgate scan` fetches each issuer's discovery document and JWKS over verified TLS, as the
/// gateway does: a healthy issuer passes (keys, PKCE S256, device flow reported), an issuer
/// whose TLS does not verify with the configured CA and one with no key for the configured
/// algorithms are findings (exit 1).
#[test]
fn scan_reaches_issuers_over_verified_tls_and_checks_their_keys() {
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-oidc-scan-")
        .tempdir()
        .unwrap();
    let idp = Idp::start(tmp.path(), tollgate_testsupport::free_port(), "keys1");
    let pki = Pki::new(&tmp.path().join("pki"));
    let gw = pki.server("gateway");
    let scan = |name: &str, ca: &std::path::Path, extra: &str| -> (bool, serde_json::Value) {
        let path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[server]\npostgres_listen = \"127.0.0.1:{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nstore = \"sqlite://{name}.db\"\n\n[[identity.oidc]]\nissuer = \"{}\"\nca = \"{}\"\nclient_id = \"tollgate-login\"\naudiences = [\"tollgate\"]\n{extra}",
                tollgate_testsupport::free_port(),
                gw.cert.display(),
                gw.key.display(),
                idp.issuer,
                ca.display(),
            ),
        )
        .unwrap();
        let out = Command::new(common::BIN)
            .args(["scan", "--json", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let doc = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&out), stderr(&out)));
        (out.status.success(), doc)
    };
    let kinds = |doc: &serde_json::Value| -> Vec<String> {
        doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["kind"].as_str().unwrap().to_string())
            .collect()
    };

    let (ok, doc) = scan("good", &idp.ca, "");
    assert!(ok, "{doc:#}");
    let issuer = &doc["issuers"][0];
    assert_eq!(issuer["issuer"], idp.issuer.as_str());
    assert_eq!(issuer["reachable"], true);
    assert_eq!(issuer["usable_keys"], 1);
    assert_eq!(issuer["algorithms_with_keys"], serde_json::json!(["RS256"]));
    assert_eq!(issuer["pkce_s256"], true);
    assert_eq!(issuer["device_flow"], true);

    // The IdP's certificate does not chain to the configured CA: never fetched unverified.
    let (ok, doc) = scan("wrong-ca", &pki.ca, "");
    assert!(!ok);
    assert_eq!(kinds(&doc), ["oidc_issuer_unreachable"], "{doc:#}");
    assert!(
        doc["findings"][0]["message"]
            .as_str()
            .unwrap()
            .contains("TLS"),
        "{doc:#}"
    );

    // Only ES256 accepted, but the IdP signs with an RSA key: no token could validate.
    let (ok, doc) = scan("es256", &idp.ca, "algorithms = [\"ES256\"]\n");
    assert!(!ok);
    assert_eq!(kinds(&doc), ["oidc_no_key_for_algorithms"], "{doc:#}");
}
