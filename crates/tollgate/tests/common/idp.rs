//! A real OpenID provider for the OIDC tests: npm `oidc-provider` 8 run by node over TLS with
//! its own CA (tests/oidc/idp.mjs), issuing real signed tokens.

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
