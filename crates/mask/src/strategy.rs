//! What replaces a sensitive value: a fixed mask, a partial mask, a keyed pseudonym, or NULL.

use crate::detect::Detector;
use ring::hmac;
use std::fmt;
use std::str::FromStr;

/// The fixed mask of `redact`: the same for every value, so it does not leak length.
pub const REDACTED: &[u8] = b"****";

/// Characters kept by `partial` when the configuration does not say.
pub const DEFAULT_KEEP_LAST: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Replace with [`REDACTED`].
    Redact,
    /// Mask every letter and digit except the last `keep_last`, keeping separators
    /// (`**** **** **** 4242`); e-mail addresses keep their domain (`****@example.com`).
    /// Never keeps more than half of a value's characters; JWTs and private keys are redacted.
    Partial { keep_last: usize },
    /// `h:` + 16 hex digits of HMAC-SHA256(key, value): the same value gives the same
    /// pseudonym, so joins and group-bys on masked output still line up.
    Hash,
    /// SQL NULL for a whole field; inside free text (where NULL cannot be) it redacts.
    Null,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown masking strategy {0:?} (known: redact, partial, hash, null)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "redact" => Strategy::Redact,
            "partial" => Strategy::Partial {
                keep_last: DEFAULT_KEEP_LAST,
            },
            "hash" => Strategy::Hash,
            "null" => Strategy::Null,
            _ => return Err(UnknownStrategy(s.to_string())),
        })
    }
}

/// The secret behind `hash`. At least 32 bytes; never printed.
#[derive(Clone)]
pub struct MaskKey(hmac::Key);

/// Smallest key accepted by [`MaskKey::new`].
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("masking key is {len} bytes; it must be at least {MIN_KEY_BYTES} bytes of random data (for example `openssl rand -hex 32`)")]
    TooShort { len: usize },
    #[error("masking key is not valid hex")]
    NotHex,
}

impl MaskKey {
    pub fn new(secret: &[u8]) -> Result<MaskKey, KeyError> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { len: secret.len() });
        }
        Ok(MaskKey(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// A key written as hex (64 hex digits for 32 bytes), as kept in an environment variable.
    pub fn from_hex(s: &str) -> Result<MaskKey, KeyError> {
        let bytes = hex::decode(s.trim()).map_err(|_| KeyError::NotHex)?;
        MaskKey::new(&bytes)
    }

    /// The pseudonym of `value`: `h:` followed by 16 lowercase hex digits.
    pub fn pseudonym(&self, value: &[u8]) -> [u8; 18] {
        let tag = hmac::sign(&self.0, value);
        let mut out = [0u8; 18];
        out[..2].copy_from_slice(b"h:");
        hex::encode_to_slice(&tag.as_ref()[..8], &mut out[2..]).expect("16 hex digits fit");
        out
    }
}

impl fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskKey(<redacted>)")
    }
}

/// Writes the replacement of `original` (a detector match, or a whole value when `detector`
/// is `None`). `Null` writes the fixed mask: the caller turns a whole field into NULL itself.
/// `Hash` without a key redacts (it never falls back to the original).
pub(crate) fn write_mask(
    strategy: Strategy,
    detector: Option<Detector>,
    original: &[u8],
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) {
    match strategy {
        Strategy::Redact | Strategy::Null => out.extend_from_slice(REDACTED),
        Strategy::Hash => match key {
            Some(k) => out.extend_from_slice(&k.pseudonym(original)),
            None => out.extend_from_slice(REDACTED),
        },
        Strategy::Partial { keep_last } => match detector {
            Some(Detector::Jwt | Detector::PemPrivateKey) => out.extend_from_slice(REDACTED),
            Some(Detector::Email) => {
                let at = original.iter().rposition(|&b| b == b'@').unwrap_or(0);
                out.extend_from_slice(REDACTED);
                out.extend_from_slice(&original[at..]);
            }
            _ => partial(original, keep_last, out),
        },
    }
}

/// Masks letters, digits and non-ASCII characters except the last `keep_last` of them (at most
/// half), keeping ASCII punctuation and spaces in place.
fn partial(original: &[u8], keep_last: usize, out: &mut Vec<u8>) {
    let maskable = |b: u8| b.is_ascii_alphanumeric() || b >= 0xC0;
    // Count characters: ASCII alnum bytes and UTF-8 lead bytes (continuation bytes 0x80..0xC0
    // belong to the character before them).
    let total = original.iter().filter(|&&b| maskable(b)).count();
    let keep = keep_last.min(total / 2);
    let mut seen = 0;
    let mut k = 0;
    while k < original.len() {
        let b = original[k];
        if b >= 0x80 {
            let len = utf8_len(b);
            let end = (k + len).min(original.len());
            if maskable(b) {
                seen += 1;
            }
            if maskable(b) && seen > total - keep {
                out.extend_from_slice(&original[k..end]);
            } else {
                out.push(b'*');
            }
            k = end;
            continue;
        }
        if maskable(b) {
            seen += 1;
            out.push(if seen > total - keep { b } else { b'*' });
        } else {
            out.push(b);
        }
        k += 1;
    }
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MaskKey {
        MaskKey::new(&[7u8; 32]).unwrap()
    }

    fn apply(s: Strategy, d: Option<Detector>, v: &str) -> String {
        let mut out = Vec::new();
        write_mask(s, d, v.as_bytes(), Some(&key()), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn short_keys_are_refused_and_never_printed() {
        let err = MaskKey::new(&[1u8; 31]).unwrap_err();
        assert_eq!(err, KeyError::TooShort { len: 31 });
        assert!(err.to_string().contains("at least 32 bytes"));
        let k = MaskKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(format!("{k:?}"), "MaskKey(<redacted>)");
        assert_eq!(MaskKey::from_hex("zz").unwrap_err(), KeyError::NotHex);
    }

    #[test]
    fn strategies_parse() {
        assert_eq!(
            "partial".parse::<Strategy>().unwrap(),
            Strategy::Partial { keep_last: 4 }
        );
        assert_eq!("null".parse::<Strategy>().unwrap(), Strategy::Null);
        assert!("mask"
            .parse::<Strategy>()
            .unwrap_err()
            .to_string()
            .contains("redact"));
    }

    #[test]
    fn redact_is_fixed_length() {
        assert_eq!(apply(Strategy::Redact, None, "a"), "****");
        assert_eq!(apply(Strategy::Redact, None, &"x".repeat(100)), "****");
    }

    #[test]
    fn partial_keeps_shape() {
        let p = Strategy::Partial { keep_last: 4 };
        assert_eq!(
            apply(p, Some(Detector::CreditCard), "4242 4242 4242 4242"),
            "**** **** **** 4242"
        );
        assert_eq!(
            apply(p, Some(Detector::UsSsn), "078-05-1120"),
            "***-**-1120"
        );
        assert_eq!(
            apply(p, Some(Detector::Email), "jane.doe@example.com"),
            "****@example.com"
        );
        assert_eq!(apply(p, Some(Detector::Jwt), "eyJhbGciOi.eyJ.sig"), "****");
        // never more than half of the characters
        assert_eq!(apply(p, None, "Bob"), "**b");
        assert_eq!(apply(p, None, "Zoë Ann"), "*** Ann");
        assert_eq!(
            apply(Strategy::Partial { keep_last: 2 }, None, "José"),
            "**sé"
        );
    }

    #[test]
    fn hash_is_deterministic_and_keyed() {
        let a = apply(Strategy::Hash, None, "jane@example.com");
        assert_eq!(a, apply(Strategy::Hash, None, "jane@example.com"));
        assert_ne!(a, apply(Strategy::Hash, None, "john@example.com"));
        assert!(a.starts_with("h:") && a.len() == 18);
        let other = MaskKey::new(&[8u8; 32]).unwrap();
        assert_ne!(a.as_bytes(), &other.pseudonym(b"jane@example.com")[..]);
        let mut out = Vec::new();
        write_mask(Strategy::Hash, None, b"jane@example.com", None, &mut out);
        assert_eq!(out, REDACTED, "no key: redact, never the original");
    }
}
