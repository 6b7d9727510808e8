//! A real OpenID provider for the OIDC tests: npm `oidc-provider` 8 run by node over TLS with
//! its own CA (tests/oidc/idp.mjs), issuing real signed tokens. People sign in through its own
//! login and consent pages: [`Idp::browse`] goes through them as a browser would (curl with a
//! cookie jar).

use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use super::{stderr, Pki};

/// `oidc-provider` installed once per target directory (npm, at test time).
pub fn node_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oidc-provider-8");
        if !dir.join("node_modules/oidc-provider/package.json").exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let out = Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--no-save",
                    "oidc-provider@8",
                ])
                .current_dir(&dir)
                .output()
                .expect("npm (scripts/test installs node and npm)");
            assert!(
                out.status.success(),
                "npm install oidc-provider@8 failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc/idp.mjs"),
            dir.join("idp.mjs"),
        )
        .unwrap();
        dir
    })
}

/// The IdP process (killed on drop) and where its signing key is.
pub struct Idp {
    pub child: Option<Child>,
    pub cert: tollgate_tls::pki::IssuedFiles,
    pub port: u16,
    pub issuer: String,
    pub keys: PathBuf,
    pub ca: PathBuf,
    pub log: PathBuf,
    /// Redirect URIs registered for `tollgate-login` besides the loopback one (the console's).
    pub redirect_uris: Vec<String>,
}

/// What the person does at the provider's consent page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    Approve,
    /// "Cancel": the provider answers `access_denied`.
    Decline,
}

/// Where browsing the provider's pages ended.
#[derive(Debug)]
pub enum Browsed {
    /// A redirect away from the provider (the relying party's callback URL).
    Left(String),
    /// A page of the provider's with nothing left to submit (the device flow's result page).
    Page(String),
}

impl Idp {
    pub fn start(tmp: &Path, port: u16, keys: &str) -> Idp {
        let mut idp = Idp::new(tmp, port, keys);
        idp.up();
        idp
    }

    /// The IdP's settings and TLS certificate, not started yet.
    pub fn new(tmp: &Path, port: u16, keys: &str) -> Idp {
        let pki_dir = tmp.join("idp-pki");
        let pki = if pki_dir.join("ca.crt").exists() {
            Pki {
                dir: pki_dir.clone(),
                ca: pki_dir.join("ca.crt"),
            }
        } else {
            Pki::new(&pki_dir)
        };
        let cert = pki.server("idp");
        let issuer = format!("https://localhost:{port}");
        let keys = tmp.join(keys);
        let log = tmp.join(format!(
            "idp-{}.log",
            keys.file_name().unwrap().to_string_lossy()
        ));
        Idp {
            child: None,
            cert,
            port,
            issuer,
            keys,
            ca: pki.ca.clone(),
            log,
            redirect_uris: Vec::new(),
        }
    }

    pub fn up(&mut self) {
        let child = Command::new("node")
            .arg(node_modules().join("idp.mjs"))
            .arg(self.port.to_string())
            .arg(&self.cert.cert)
            .arg(&self.cert.key)
            .arg(&self.keys)
            .arg(&self.issuer)
            .arg(self.redirect_uris.join(","))
            .current_dir(node_modules())
            .stdout(std::fs::File::create(&self.log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("node");
        self.child = Some(child);
        super::wait_for(Duration::from_secs(30), "the IdP to listen", || {
            std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains("listening"))
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A real access token (JWT) for `client` by the client_credentials grant.
    pub fn token(&self, client: &str, resource: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
            .arg(&self.ca)
            .args(["-u", &format!("{client}:{client}-secret")])
            .args(["-d", "grant_type=client_credentials", "-d", "scope=db"])
            .args(["-d", &format!("resource={resource}")])
            .arg(format!("{}/token", self.issuer))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["access_token"].as_str().unwrap().to_string()
    }

    /// A person at the provider's pages from `url` on, as a browser: redirects within the
    /// provider followed, every form submitted (the login form with `login` and any password;
    /// the consent form approved, or cancelled), cookies kept in `jar`.
    pub fn browse(&self, url: &str, login: &str, consent: Consent, jar: &Path) -> Browsed {
        self.browse_trusting(url, login, consent, jar, &self.ca)
    }

    /// [`Idp::browse`] trusting `cacert` (a bundle that holds the IdP's CA and, when `url` is
    /// the relying party's, its CA too).
    pub fn browse_trusting(
        &self,
        url: &str,
        login: &str,
        consent: Consent,
        jar: &Path,
        cacert: &Path,
    ) -> Browsed {
        let origin = self.issuer.clone();
        let (mut url, mut form): (String, Option<Vec<(String, String)>>) = (url.to_string(), None);
        // After "Cancel", the provider's next page is the end (the device flow's shows its
        // code form again, with the error).
        let mut cancelled = false;
        for _ in 0..20 {
            let mut cmd = Command::new("curl");
            cmd.args(["-s", "-i", "--max-time", "20", "--cacert"])
                .arg(cacert)
                .arg("-b")
                .arg(jar)
                .arg("-c")
                .arg(jar);
            for (k, v) in form.iter().flatten() {
                cmd.args(["--data-urlencode", &format!("{k}={v}")]);
            }
            let out = cmd.arg(&url).output().expect("curl");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{url}: {text}"));
            if (300..400).contains(&status) {
                let location = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("location")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_else(|| panic!("a redirect without Location: {head}"));
                let next = if location.starts_with('/') {
                    format!("{origin}{location}")
                } else {
                    location
                };
                if !next.starts_with(&origin) {
                    return Browsed::Left(next);
                }
                (url, form) = (next, None);
                continue;
            }
            assert_eq!(status, 200, "{url}:\n{text}");
            if cancelled {
                return Browsed::Page(body.to_string());
            }
            let Some((action, hidden)) = first_form(body) else {
                return Browsed::Page(body.to_string());
            };
            let action = if action.starts_with('/') {
                format!("{origin}{action}")
            } else {
                action
            };
            let is = |name: &str, value: &str| hidden.iter().any(|(k, v)| k == name && v == value);
            if is("prompt", "consent") && consent == Consent::Decline {
                let abort = attribute_after(body, "href=\"", "/abort")
                    .unwrap_or_else(|| panic!("a cancel link on the consent page:\n{body}"));
                let abort = if abort.starts_with('/') {
                    format!("{origin}{abort}")
                } else {
                    abort
                };
                (url, form) = (abort, None);
                cancelled = true;
                continue;
            }
            let mut fields = hidden;
            if body.contains("name=\"login\"") {
                fields.push(("login".into(), login.into()));
                fields.push(("password".into(), "any".into()));
            }
            (url, form) = (action, Some(fields));
        }
        panic!("browsing {url} did not end");
    }

    pub fn signing_jwk(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.keys.join("signing.jwk")).unwrap())
            .unwrap()
    }

    /// A token signed with the IdP's own key but with claims of our choosing.
    pub fn craft(&self, claims: serde_json::Value) -> String {
        let pem = std::fs::read_to_string(self.keys.join("signing.pem")).unwrap();
        let key = ring::signature::RsaKeyPair::from_pkcs8(&pem_der(&pem)).unwrap();
        let header =
            serde_json::json!({"alg": "RS256", "typ": "at+jwt", "kid": self.signing_jwk()["kid"]});
        let input = format!(
            "{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{input}.{}", enc(&sig))
    }

    pub fn claims(&self, sub: &str, groups: &[&str]) -> serde_json::Value {
        serde_json::json!({"iss": self.issuer, "aud": "tollgate", "sub": sub, "groups": groups,
            "iat": now() - 5, "exp": now() + 300})
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first `<form>`'s action and its hidden inputs.
fn first_form(html: &str) -> Option<(String, Vec<(String, String)>)> {
    let start = html.find("<form")?;
    let form = &html[start..];
    let end = form.find("</form>").unwrap_or(form.len());
    let form = &form[..end];
    let action = attr(&form[..form.find('>')?], "action")?;
    let hidden = form
        .match_indices("<input")
        .filter_map(|(i, _)| {
            let tag = &form[i..i + form[i..].find('>')?];
            (attr(tag, "type").as_deref() == Some("hidden"))
                .then(|| Some((attr(tag, "name")?, attr(tag, "value").unwrap_or_default())))?
        })
        .collect();
    Some((action.replace("&amp;", "&"), hidden))
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(tag[at..].split('"').next()?.to_string())
}

/// The value of the first `attribute"...` that contains `needle`.
fn attribute_after(html: &str, attribute: &str, needle: &str) -> Option<String> {
    html.match_indices(attribute).find_map(|(i, _)| {
        let v = html[i + attribute.len()..].split('"').next()?;
        v.contains(needle).then(|| v.replace("&amp;", "&"))
    })
}

pub fn enc(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
