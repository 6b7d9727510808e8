//! Client configs for the upstream leg (gateway → database/API).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tollgate_config::{TlsMode, UpstreamTls};

use crate::server::{certified_key, client_roots, parse_key};
use crate::{certs_from_pem, provider, read_file, TlsError};

/// Upstream (gateway → database/API) verification modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamVerify {
    /// Chain to `ca` and hostname must match (the default).
    Full,
    /// Chain to `ca`; hostname not checked.
    Ca,
    /// Accept any certificate. Only handshake signatures are checked.
    InsecureSkipVerify,
}

impl UpstreamVerify {
    fn name(self) -> &'static str {
        match self {
            Self::Full => "verify-full",
            Self::Ca => "verify-ca",
            Self::InsecureSkipVerify => "insecure-skip-verify",
        }
    }
}

/// A resource's upstream client config as its `[resources.tls]` table says, for every adapter:
/// verify-full unless the resource opts out. `None`: `mode = "disable"`, a plaintext leg, said
/// loudly in the log (as `insecure-skip-verify` is by [`upstream_client_config`]).
pub fn resource_client_config(
    resource: &str,
    tls: &UpstreamTls,
    alpn: Vec<Vec<u8>>,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let mode = match tls.mode {
        TlsMode::VerifyFull => UpstreamVerify::Full,
        TlsMode::VerifyCa => UpstreamVerify::Ca,
        TlsMode::InsecureSkipVerify => UpstreamVerify::InsecureSkipVerify,
        TlsMode::Disable => {
            tracing::warn!(
                resource,
                "upstream TLS is DISABLED for this resource: traffic to it is plaintext; \
                 `tollgate check` fails this config"
            );
            return Ok(None);
        }
    };
    let client_cert = tls.cert.as_deref().zip(tls.key.as_deref());
    upstream_client_config(mode, tls.ca.as_deref(), client_cert, alpn).map(Some)
}

/// Build a client config for the upstream leg. `Full` and `Ca` need `ca`: tollgate has no
/// implicit system trust. `client_cert` is `(cert, key)` for upstreams that want mTLS.
pub fn upstream_client_config(
    mode: UpstreamVerify,
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let identity = match client_cert {
        None => None,
        Some((cert_path, key_path)) => {
            let certs = certs_from_pem(&read_file(cert_path, "certificate")?, cert_path)?;
            let key = parse_key(&read_file(key_path, "private key")?, key_path)?;
            crate::server::check_validity(&certs[0], cert_path)?;
            certified_key(certs.clone(), key.clone_key(), cert_path, key_path)?;
            Some((certs, key, cert_path))
        }
    };
    client_config(mode, ca, identity, alpn)
}

/// A client config for one replica's connection to another (a forwarded cancel request):
/// the peer's server certificate verified (chain to `ca`, host name) and this replica's
/// certificate and key (PEM, made in memory) presented.
pub fn replica_client_config(
    ca: &Path,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let what = Path::new("(replica certificate)");
    let certs = certs_from_pem(cert_pem.as_bytes(), what)?;
    let key = parse_key(key_pem.as_bytes(), what)?;
    client_config(
        UpstreamVerify::Full,
        Some(ca),
        Some((certs, key, what)),
        vec![b"postgresql".to_vec()],
    )
}

type ClientIdentity<'a> = (
    Vec<CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
    &'a Path,
);

fn client_config(
    mode: UpstreamVerify,
    ca: Option<&Path>,
    identity: Option<ClientIdentity<'_>>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        UpstreamVerify::Full | UpstreamVerify::Ca => {
            let ca = ca.ok_or(TlsError::CaRequired { mode: mode.name() })?;
            let (roots, _) = client_roots(&read_file(ca, "upstream CA file")?, ca)?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Other(format!("upstream CA {}: {e}", ca.display())))?;
            if mode == UpstreamVerify::Full {
                webpki
            } else {
                Arc::new(IgnoreHostname(webpki))
            }
        }
        UpstreamVerify::InsecureSkipVerify => {
            tracing::warn!(
                "upstream TLS verification is DISABLED (insecure-skip-verify): any certificate \
                 is accepted and the connection can be intercepted; use verify-full with tls.ca"
            );
            Arc::new(AcceptAnyCert(provider.clone()))
        }
    };

    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(crate::PROTOCOL_VERSIONS)
        .map_err(|source| TlsError::Rustls {
            context: "cannot select TLS versions".into(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((certs, key, cert_path)) => {
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| TlsError::Rustls {
                    context: format!("client certificate {}", cert_path.display()),
                    source,
                })?
        }
    };
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// verify-ca: the chain must verify; a hostname mismatch alone is accepted.
/// webpki checks the name only after the chain, so NotValidForName implies a good chain.
#[derive(Debug)]
struct IgnoreHostname(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostname {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// insecure-skip-verify: any certificate, but handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: TlsMode) -> UpstreamTls {
        UpstreamTls {
            mode,
            ca: None,
            server_name: "db.internal".into(),
            cert: None,
            key: None,
        }
    }

    #[test]
    fn resource_tls_disable_is_plaintext_and_verifying_modes_need_a_ca() {
        let plain = resource_client_config("r", &settings(TlsMode::Disable), vec![]).unwrap();
        assert!(plain.is_none());
        for mode in [TlsMode::VerifyFull, TlsMode::VerifyCa] {
            let err = resource_client_config("r", &settings(mode), vec![]).unwrap_err();
            assert!(matches!(err, TlsError::CaRequired { .. }), "{err}");
        }
        let any = resource_client_config(
            "r",
            &settings(TlsMode::InsecureSkipVerify),
            vec![b"h2".to_vec()],
        )
        .unwrap()
        .expect("a TLS config");
        assert_eq!(any.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
