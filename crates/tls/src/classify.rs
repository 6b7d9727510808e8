//! Bounded labels for why a handshake failed.

use rustls::{AlertDescription, CertificateError, Error, InvalidMessage, PeerIncompatible};

/// Why a TLS handshake failed, as a bounded metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    NoClientCert,
    UnknownCa,
    Expired,
    NotYetValid,
    Revoked,
    BadCertificate,
    ProtocolVersion,
    NoCommonCipher,
    NotTls,
    Timeout,
    Io,
    Other,
}

impl HandshakeFailure {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::NoClientCert => "no_client_cert",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::BadCertificate => "bad_certificate",
            Self::ProtocolVersion => "protocol_version",
            Self::NoCommonCipher => "no_common_cipher",
            Self::NotTls => "not_tls",
            Self::Timeout => "timeout",
            Self::Io => "io",
            Self::Other => "other",
        }
    }
}

/// Classify the io::Error returned by a tokio-rustls accept or connect.
/// rustls errors arrive wrapped as `ErrorKind::InvalidData`; anything else is transport.
pub fn classify_handshake_error(err: &std::io::Error) -> HandshakeFailure {
    if let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    {
        return classify_rustls(tls);
    }
    match err.kind() {
        std::io::ErrorKind::TimedOut => HandshakeFailure::Timeout,
        std::io::ErrorKind::InvalidData => HandshakeFailure::Other,
        _ => HandshakeFailure::Io,
    }
}

fn classify_rustls(err: &Error) -> HandshakeFailure {
    match err {
        Error::NoCertificatesPresented => HandshakeFailure::NoClientCert,
        Error::InvalidCertificate(c) => classify_cert(c),
        Error::InvalidMessage(
            InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
        ) => HandshakeFailure::NotTls,
        Error::PeerIncompatible(p) => match p {
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
            | PeerIncompatible::SupportedVersionsExtensionRequired
            // Only pre-TLS 1.2 clients omit signature_algorithms (it was added in 1.2).
            | PeerIncompatible::SignatureAlgorithmsExtensionRequired => {
                HandshakeFailure::ProtocolVersion
            }
            PeerIncompatible::NoCipherSuitesInCommon
            | PeerIncompatible::NoKxGroupsInCommon
            | PeerIncompatible::NoSignatureSchemesInCommon => HandshakeFailure::NoCommonCipher,
            _ => HandshakeFailure::Other,
        },
        // The peer rejected us and told us why.
        Error::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA => HandshakeFailure::UnknownCa,
            AlertDescription::CertificateExpired => HandshakeFailure::Expired,
            AlertDescription::CertificateRevoked => HandshakeFailure::Revoked,
            AlertDescription::CertificateRequired => HandshakeFailure::NoClientCert,
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown => HandshakeFailure::BadCertificate,
            AlertDescription::ProtocolVersion => HandshakeFailure::ProtocolVersion,
            AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
                HandshakeFailure::NoCommonCipher
            }
            _ => HandshakeFailure::Other,
        },
        _ => HandshakeFailure::Other,
    }
}

fn classify_cert(err: &CertificateError) -> HandshakeFailure {
    match err {
        CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            HandshakeFailure::Expired
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            HandshakeFailure::NotYetValid
        }
        CertificateError::Revoked => HandshakeFailure::Revoked,
        _ => HandshakeFailure::BadCertificate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn wrap(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn maps_rustls_errors() {
        let cases = [
            (
                wrap(Error::NoCertificatesPresented),
                HandshakeFailure::NoClientCert,
            ),
            (
                wrap(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                HandshakeFailure::UnknownCa,
            ),
            (
                wrap(Error::InvalidCertificate(CertificateError::Expired)),
                HandshakeFailure::Expired,
            ),
            (
                wrap(Error::InvalidMessage(InvalidMessage::InvalidContentType)),
                HandshakeFailure::NotTls,
            ),
            (
                wrap(Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered)),
                HandshakeFailure::ProtocolVersion,
            ),
            (
                io::Error::from(io::ErrorKind::TimedOut),
                HandshakeFailure::Timeout,
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                HandshakeFailure::Io,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(classify_handshake_error(&err), want, "{err}");
        }
    }

    #[test]
    fn labels_are_snake_case() {
        assert_eq!(HandshakeFailure::NoClientCert.as_label(), "no_client_cert");
        assert_eq!(HandshakeFailure::NotTls.as_label(), "not_tls");
    }
}
