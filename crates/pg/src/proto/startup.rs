//! The untyped packets that open a connection: `len: i32, code: i32, ...`.

use super::frame::{Malformed, Reader};

pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;
/// tollgate's own code (1234.5677, unused by PostgreSQL): a CancelRequest one replica passes on
/// to the replica that issued its key, accepted only inside TLS from a replica's certificate.
pub const FORWARDED_CANCEL: i32 = 80877101;
/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The first byte of a TLS record: a PostgreSQL 17 client using `sslnegotiation=direct`.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// Newest protocol minor version tollgate speaks to clients (3.2: 256-bit cancel keys).
pub const LATEST_MINOR: u16 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Vec<u8> },
    ForwardedCancel { pid: i32, secret: Vec<u8> },
    Startup(Startup),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Startup {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the order sent (user, database, options, application_name, `_pq_.*`, ...).
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(usize),
    #[error("unsupported frontend protocol {0}.{1}: tollgate speaks protocol 3")]
    UnsupportedProtocol(u16, u16),
    #[error("malformed startup packet")]
    Malformed,
}

impl From<Malformed> for StartupError {
    fn from(_: Malformed) -> Self {
        StartupError::Malformed
    }
}

/// Total length of the packet at the front of `buf`, once its 4-byte header is there.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(StartupError::BadLength(len.max(0) as usize));
    }
    Ok(Some(len as usize))
}

/// Parse a whole startup packet (including its length word).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = Reader::new(packet);
    let len = r.i32()? as usize;
    if len != packet.len() {
        return Err(StartupError::BadLength(len));
    }
    let code = r.i32()?;
    match code {
        SSL_REQUEST if len == 8 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST if len == 8 => Ok(StartupPacket::GssEncRequest),
        // Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256.
        CANCEL_REQUEST if (16..=12 + 256).contains(&len) => {
            let pid = r.i32()?;
            Ok(StartupPacket::Cancel {
                pid,
                secret: r.rest().to_vec(),
            })
        }
        FORWARDED_CANCEL if (16..=12 + 256).contains(&len) => {
            let pid = r.i32()?;
            Ok(StartupPacket::ForwardedCancel {
                pid,
                secret: r.rest().to_vec(),
            })
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST | FORWARDED_CANCEL => {
            Err(StartupError::BadLength(len))
        }
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            let mut params = Vec::new();
            loop {
                let k = r.cstr()?;
                if k.is_empty() {
                    break;
                }
                let v = r.cstr()?;
                params.push((utf8(k)?, utf8(v)?));
            }
            if r.remaining() != 0 {
                return Err(StartupError::Malformed);
            }
            Ok(StartupPacket::Startup(Startup {
                major,
                minor,
                params,
            }))
        }
    }
}

fn utf8(b: &[u8]) -> Result<String, StartupError> {
    String::from_utf8(b.to_vec()).map_err(|_| StartupError::Malformed)
}

/// Encode a startup message (used towards the upstream).
pub fn encode_startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(&((3i32 << 16) | minor as i32).to_be_bytes());
    for (k, v) in params {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.push(0);
    let len = out.len() as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

pub fn encode_ssl_request() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&8i32.to_be_bytes());
    b[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    b
}

pub fn encode_cancel(pid: i32, secret: &[u8]) -> Vec<u8> {
    encode_cancel_code(CANCEL_REQUEST, pid, secret)
}

/// A [`FORWARDED_CANCEL`] packet: a CancelRequest passed on between replicas.
pub fn encode_forwarded_cancel(pid: i32, secret: &[u8]) -> Vec<u8> {
    encode_cancel_code(FORWARDED_CANCEL, pid, secret)
}

fn encode_cancel_code(code: i32, pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + secret.len());
    out.extend_from_slice(&((12 + secret.len()) as i32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(secret);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_startup() {
        let p = encode_startup(
            2,
            &[("user", "alice"), ("database", "orders"), ("_pq_.x", "1")],
        );
        match parse(&p).unwrap() {
            StartupPacket::Startup(s) => {
                assert_eq!((s.major, s.minor), (3, 2));
                assert_eq!(s.param("database"), Some("orders"));
                assert_eq!(s.params.len(), 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn special_requests() {
        assert_eq!(
            parse(&encode_ssl_request()).unwrap(),
            StartupPacket::SslRequest
        );
        let c = encode_cancel(42, &[1, 2, 3, 4]);
        assert_eq!(
            parse(&c).unwrap(),
            StartupPacket::Cancel {
                pid: 42,
                secret: vec![1, 2, 3, 4]
            }
        );
        let long = encode_cancel(42, &[9; 32]);
        assert!(
            matches!(parse(&long).unwrap(), StartupPacket::Cancel { secret, .. } if secret.len() == 32)
        );
        assert!(parse(&encode_cancel(1, &[0; 300])).is_err());
        assert_eq!(
            parse(&encode_forwarded_cancel(42, &[9; 32])).unwrap(),
            StartupPacket::ForwardedCancel {
                pid: 42,
                secret: vec![9; 32]
            }
        );
        assert!(parse(&encode_forwarded_cancel(1, &[0; 300])).is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(packet_len(&[0, 0, 0, 4]), Err(StartupError::BadLength(4)));
        assert_eq!(
            packet_len(&[0, 1, 0, 0]),
            Err(StartupError::BadLength(65536))
        );
        assert_eq!(packet_len(&[0, 0, 0, 8]), Ok(Some(8)));
        let mut v2 = encode_startup(0, &[("user", "a")]);
        v2[4..8].copy_from_slice(&(2i32 << 16).to_be_bytes());
        assert_eq!(parse(&v2), Err(StartupError::UnsupportedProtocol(2, 0)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(any::<u8>(), 4..200)) {
            let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
            p.extend_from_slice(&body);
            let _ = parse(&p);
        }
    }
}
