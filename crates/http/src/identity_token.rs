//! The caller's identity, passed upstream (`identity_header`): a short-lived JWT the gateway
//! signs with its Ed25519 identity key (`server.identity_key`), which upstreams verify with the
//! public key the gateway publishes at `/.well-known/jwks.json` on `https_listen`. The claims
//! name the caller as the gateway authenticated it; a client can never supply them (any copy of
//! the header from the client is stripped).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_identity::Identity;

/// How long a token is valid: long enough for one request's trip, short enough that a
/// captured one is soon worthless.
pub const TOKEN_TTL_SECS: u64 = 60;

pub struct IdentityKey {
    pair: Ed25519KeyPair,
    kid: String,
    issuer: String,
}

impl IdentityKey {
    /// A PKCS#8 PEM Ed25519 private key (`openssl genpkey -algorithm ed25519 -out identity.key`).
    pub fn load(path: &Path, issuer: &str) -> anyhow::Result<IdentityKey> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| {
            anyhow::anyhow!(
                "server.identity_key {}: not a PKCS#8 PEM private key ({e})",
                path.display()
            )
        })?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).map_err(
            |_| {
                anyhow::anyhow!(
                    "server.identity_key {}: not an Ed25519 key (create one with `openssl genpkey -algorithm ed25519`)",
                    path.display()
                )
            },
        )?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        Ok(IdentityKey {
            kid: hex::encode(&digest.as_ref()[..8]),
            pair,
            issuer: issuer.to_string(),
        })
    }

    /// The public key as a JSON Web Key Set.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": self.kid,
            "x": B64.encode(self.pair.public_key().as_ref()),
        }]})
    }

    /// A token for one request of `who` to `audience` (the resource's name) in `session`.
    pub fn sign(&self, who: &Identity, audience: &str, session: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 12];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti);
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let claims = serde_json::json!({
            "iss": self.issuer,
            "aud": audience,
            "sub": who.subject,
            "principal": who.principal.to_string(),
            "groups": who.groups,
            "auth_method": who.method.as_str(),
            "sid": session,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_TTL_SECS,
            "jti": B64.encode(jti),
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self.pair.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ED25519};

    #[test]
    fn tokens_verify_with_the_published_key() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        std::fs::write(&path, pem).unwrap();
        let key = IdentityKey::load(&path, "https://gw.example").unwrap();
        let who = tollgate_identity::TokenVerifier::new(&[tollgate_config::StaticToken {
            subject: "alice".into(),
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, b"t")),
            groups: vec!["sre".into()],
        }])
        .verify("t")
        .unwrap();
        let token = key.sign(&who, "billing", "s1");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let x = key.jwks()["keys"][0]["x"].as_str().unwrap().to_string();
        let public = B64.decode(x).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&ED25519, public)
            .verify(signed.as_bytes(), &B64.decode(parts[2]).unwrap())
            .expect("the signature verifies");
        let claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["aud"], "billing");
        assert_eq!(claims["groups"][0], "sre");
        assert_eq!(claims["iss"], "https://gw.example");
    }
}
