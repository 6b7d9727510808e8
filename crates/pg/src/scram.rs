//! Client side of PostgreSQL password authentication, used when the gateway logs in to an
//! upstream with injected credentials: SCRAM-SHA-256 (RFC 5802 / RFC 7677, optionally with
//! `tls-server-end-point` channel binding, RFC 5929) and the legacy md5 scheme.
//!
//! Pure logic, no I/O: the caller moves the SASL payloads between this state machine and
//! the socket. Errors never carry the password or anything derived from it.
//!
//! SASLprep: like PostgreSQL's `pg_saslprep`, a pure-ASCII password is used unchanged.
//! Non-ASCII passwords are used as their raw UTF-8 bytes without NFKC normalization or
//! mapping; this matches the verifier PostgreSQL stores whenever the password is already
//! in normalized form (the common case) and differs only for passwords that SASLprep would
//! rewrite (e.g. non-ASCII spaces, compatibility characters).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

/// Fewer iterations than this make the stored verifier cheap to brute-force; refuse.
const MIN_ITERATIONS: u32 = 1000;
/// More iterations than this would let an upstream stall the gateway's CPU; refuse.
const MAX_ITERATIONS: u32 = 10_000_000;
const NONCE_BYTES: usize = 24;

/// Whether (and how) the SCRAM exchange is bound to the upstream TLS session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// No channel binding: gs2 header `n,,`, mechanism `SCRAM-SHA-256`.
    None,
    /// `tls-server-end-point` binding: the hash of the upstream's leaf certificate
    /// (see [`tls_server_end_point`]); mechanism `SCRAM-SHA-256-PLUS`.
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ChannelBinding::None => "n,,",
            ChannelBinding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }
}

/// The `tls-server-end-point` channel binding data for a certificate (RFC 5929 §4.1):
/// the certificate DER hashed with its signature's hash, where MD5 and SHA-1 are
/// replaced by SHA-256. `None` when the certificate does not parse or its signature
/// algorithm names no single hash (e.g. Ed25519, RSA-PSS), where PostgreSQL fails too.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let algorithm = match cert.signature_algorithm.algorithm.to_id_string().as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, sha224WithRSA
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.113549.1.1.14"
        // ecdsa-with-SHA1, -SHA224, -SHA256
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.1"
        | "1.2.840.10045.4.3.2"
        // dsa-with-sha1, dsa-with-sha256
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => &digest::SHA256,
        // sha384WithRSA, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &digest::SHA384,
        // sha512WithRSA, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, cert_der).as_ref().to_vec())
}

#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message from server: {0}")]
    Malformed(&'static str),
    #[error("SCRAM server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("SCRAM iteration count {0} is outside the accepted range {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    UnsafeIterations(u32),
    #[error("SCRAM server requires an unsupported extension")]
    UnsupportedExtension,
    #[error("SCRAM message received out of order")]
    OutOfOrder,
    #[error("SCRAM authentication rejected by server: {0}")]
    ServerError(String),
    #[error("SCRAM server signature is invalid (server does not know the password)")]
    InvalidServerSignature,
}

/// Keys and transcript kept between `server_first` and `server_final`.
struct Verifier {
    server_key: [u8; 32],
    auth_message: Vec<u8>,
}

/// One SCRAM-SHA-256(-PLUS) exchange, client side.
pub struct ScramSha256 {
    password: Vec<u8>,
    binding: ChannelBinding,
    user: String,
    nonce: String,
    verifier: Option<Verifier>,
}

impl std::fmt::Debug for ScramSha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSha256")
            .field("mechanism", &self.mechanism())
            .finish_non_exhaustive()
    }
}

impl ScramSha256 {
    pub fn new(password: &str, binding: ChannelBinding) -> Self {
        let mut raw = [0u8; NONCE_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .expect("system random number generator failed");
        Self::with_user_and_nonce(password, binding, "", &B64.encode(raw))
    }

    /// PostgreSQL ignores the SCRAM user name (it uses the startup packet's), so `new`
    /// sends `n=`; tests use this to replay the RFC 7677 vector, which has `n=user`.
    pub(crate) fn with_user_and_nonce(
        password: &str,
        binding: ChannelBinding,
        user: &str,
        nonce: &str,
    ) -> Self {
        ScramSha256 {
            password: password.as_bytes().to_vec(),
            binding,
            user: user.to_owned(),
            nonce: nonce.to_owned(),
            verifier: None,
        }
    }

    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ChannelBinding::None => "SCRAM-SHA-256",
            ChannelBinding::TlsServerEndPoint(_) => "SCRAM-SHA-256-PLUS",
        }
    }

    fn client_first_bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    /// The SASLInitialResponse payload.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare()).into_bytes()
    }

    /// Consumes the server-first message (`r=...,s=...,i=...`) and returns the client-final
    /// message (`c=...,r=...,p=...`) to send as SASLResponse.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if self.verifier.is_some() {
            return Err(ScramError::OutOfOrder);
        }
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut attrs = text.split(',');
        let mut next = |name: &'static str, what: &'static str| -> Result<&str, ScramError> {
            let attr = attrs.next().ok_or(ScramError::Malformed(what))?;
            if attr.starts_with("m=") {
                return Err(ScramError::UnsupportedExtension);
            }
            attr.strip_prefix(name).ok_or(ScramError::Malformed(what))
        };
        let server_nonce = next("r=", "expected r= nonce")?;
        let salt = next("s=", "expected s= salt")?;
        let iterations = next("i=", "expected i= iteration count")?;

        if server_nonce.len() <= self.nonce.len()
            || !server_nonce.starts_with(&self.nonce)
            || !server_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            return Err(ScramError::NonceMismatch);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::UnsafeIterations(iterations));
        }

        let mut salted_password = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(iterations).expect("checked above"),
            &salt,
            &self.password,
            &mut salted_password,
        );
        let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted_password);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let mut server_key = [0u8; 32];
        server_key.copy_from_slice(hmac::sign(&salted_key, b"Server Key").as_ref());

        let mut cbind_input = self.binding.gs2_header().as_bytes().to_vec();
        if let ChannelBinding::TlsServerEndPoint(hash) = &self.binding {
            cbind_input.extend_from_slice(hash);
        }
        let client_final_without_proof =
            format!("c={},r={}", B64.encode(&cbind_input), server_nonce);
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare(),
            text,
            client_final_without_proof
        )
        .into_bytes();

        let stored_key = hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref());
        let client_signature = hmac::sign(&stored_key, &auth_message);
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();

        self.verifier = Some(Verifier {
            server_key,
            auth_message,
        });
        Ok(format!("{},p={}", client_final_without_proof, B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: `v=` must carry the ServerSignature (compared in
    /// constant time), proving the server knows the password; `e=` is a server rejection.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let verifier = self.verifier.as_ref().ok_or(ScramError::OutOfOrder)?;
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let first = text.split(',').next().unwrap_or_default();
        if let Some(error) = first.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let signature = first
            .strip_prefix("v=")
            .ok_or(ScramError::Malformed("expected v= or e="))?;
        let signature = B64
            .decode(signature)
            .map_err(|_| ScramError::Malformed("server signature is not base64"))?;
        let server_key = hmac::Key::new(hmac::HMAC_SHA256, &verifier.server_key);
        hmac::verify(&server_key, &verifier.auth_message, &signature)
            .map_err(|_| ScramError::InvalidServerSignature)
    }
}

/// The response to PostgreSQL's AuthenticationMD5Password:
/// `"md5" + hex(md5(hex(md5(password + user)) + salt))`.
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex::encode(
        Md5::new()
            .chain_update(password)
            .chain_update(user)
            .finalize(),
    );
    let outer = Md5::new().chain_update(inner).chain_update(salt).finalize();
    format!("md5{}", hex::encode(outer))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client() -> ScramSha256 {
        ScramSha256::with_user_and_nonce("pencil", ChannelBinding::None, "user", RFC_NONCE)
    }

    #[test]
    fn rfc7677_vector() {
        let mut scram = rfc_client();
        assert_eq!(scram.mechanism(), "SCRAM-SHA-256");
        assert_eq!(scram.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let client_final = scram.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(client_final).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram.server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
    }

    #[test]
    fn wrong_server_signature_is_rejected() {
        let mut scram = rfc_client();
        scram.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        let forged = format!("v={}", B64.encode([7u8; 32]));
        assert!(matches!(
            scram.server_final(forged.as_bytes()),
            Err(ScramError::InvalidServerSignature)
        ));
        // A truncated but otherwise correct signature must not pass either.
        let truncated = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95A==";
        assert!(matches!(
            scram.server_final(truncated.as_bytes()),
            Err(ScramError::InvalidServerSignature)
        ));
    }

    #[test]
    fn server_error_is_reported_with_its_text() {
        let mut scram = rfc_client();
        scram.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        let err = scram.server_final(b"e=invalid-proof").unwrap_err();
        assert!(matches!(&err, ScramError::ServerError(t) if t == "invalid-proof"));
        assert!(err.to_string().contains("invalid-proof"));
    }

    #[test]
    fn server_nonce_must_extend_ours() {
        for server_first in [
            "r=XXXXNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWg,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        ] {
            let mut scram = rfc_client();
            assert!(
                matches!(
                    scram.server_first(server_first.as_bytes()),
                    Err(ScramError::NonceMismatch)
                ),
                "{server_first}"
            );
        }
    }

    #[test]
    fn malformed_or_unsafe_server_first_is_rejected() {
        type Check = fn(&ScramError) -> bool;
        let cases: &[(&str, Check)] = &[
            (
                "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999",
                |e| matches!(e, ScramError::UnsafeIterations(999)),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4000000000",
                |e| matches!(e, ScramError::UnsafeIterations(_)),
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            ("r=rOprNGfwEbeRWgbNEkqOabc,s=!!!,i=4096", |e| {
                matches!(e, ScramError::Malformed(_))
            }),
            ("r=rOprNGfwEbeRWgbNEkqOabc,s=,i=4096", |e| {
                matches!(e, ScramError::Malformed(_))
            }),
            (
                "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=x",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                "m=ext,r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                |e| matches!(e, ScramError::UnsupportedExtension),
            ),
            ("", |e| matches!(e, ScramError::Malformed(_))),
        ];
        for (msg, expected) in cases {
            let mut scram = rfc_client();
            let err = scram.server_first(msg.as_bytes()).unwrap_err();
            assert!(expected(&err), "{msg}: {err:?}");
        }
    }

    #[test]
    fn messages_out_of_order_are_rejected() {
        let mut scram = rfc_client();
        assert!(matches!(
            scram.server_final(RFC_SERVER_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder)
        ));
        scram.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert!(matches!(
            scram.server_first(RFC_SERVER_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder)
        ));
    }

    #[test]
    fn channel_binding_is_in_gs2_header_and_c_attribute() {
        let hash = vec![0xAB; 32];
        let mut scram = ScramSha256::with_user_and_nonce(
            "pencil",
            ChannelBinding::TlsServerEndPoint(hash.clone()),
            "",
            RFC_NONCE,
        );
        assert_eq!(scram.mechanism(), "SCRAM-SHA-256-PLUS");
        assert_eq!(
            scram.client_first(),
            b"p=tls-server-end-point,,n=,r=rOprNGfwEbeRWgbNEkqO"
        );
        let client_final =
            String::from_utf8(scram.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap()).unwrap();
        let mut expected = b"p=tls-server-end-point,,".to_vec();
        expected.extend_from_slice(&hash);
        let c = client_final
            .split(',')
            .next()
            .unwrap()
            .strip_prefix("c=")
            .unwrap();
        assert_eq!(B64.decode(c).unwrap(), expected);
        // The binding is part of the signed transcript: the RFC signature no longer fits.
        assert!(!client_final.contains("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="));
        assert!(matches!(
            scram.server_final(RFC_SERVER_FINAL.as_bytes()),
            Err(ScramError::InvalidServerSignature)
        ));
    }

    #[test]
    fn new_uses_fresh_random_nonce_and_empty_user() {
        let a = ScramSha256::new("pw", ChannelBinding::None);
        let b = ScramSha256::new("pw", ChannelBinding::None);
        let a_first = String::from_utf8(a.client_first()).unwrap();
        assert!(a_first.starts_with("n,,n=,r="), "{a_first}");
        let nonce = a_first.strip_prefix("n,,n=,r=").unwrap();
        assert_eq!(B64.decode(nonce).unwrap().len(), NONCE_BYTES);
        assert_ne!(a.client_first(), b.client_first());
        assert!(!format!("{a:?}").contains("pw"));
    }

    #[test]
    fn tls_server_end_point_hash_follows_signature_algorithm() {
        for (alg, digest_alg) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, &digest::SHA256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, &digest::SHA384),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["db.internal".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let der = cert.der().as_ref();
            assert_eq!(
                tls_server_end_point(der).unwrap(),
                digest::digest(digest_alg, der).as_ref()
            );
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(tls_server_end_point(cert.der().as_ref()), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }

    #[test]
    fn md5_known_value() {
        // python3 -c 'import hashlib; i=hashlib.md5(b"secretpostgres").hexdigest();
        //   print("md5"+hashlib.md5(i.encode()+bytes([1,2,3,4])).hexdigest())'
        assert_eq!(
            md5_password("postgres", "secret", [1, 2, 3, 4]),
            "md5bb41a296aab6baccb36ff243a562abff"
        );
    }
}
