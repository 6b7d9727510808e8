//! The audit hash chain: canonical encoding of an event and its SHA-256 link.
//!
//! ```text
//! hash = hex(SHA256( prev_hash                      -- 64 ASCII hex chars, raw
//!                  || str(chain_id)
//!                  || i64(chain_seq)
//!                  || str(session_id)
//!                  || i64(session_seq)
//!                  || i64(at_unix_ms)
//!                  || str(kind)
//!                  || str(canonical_json(payload)) ))
//! str(s) = u64 big-endian byte length of s, then the UTF-8 bytes of s
//! i64(n) = 8 bytes, big-endian two's complement
//! ```
//!
//! `canonical_json` is compact JSON with object keys sorted by their UTF-8 bytes, at every
//! depth; it does not depend on serde_json's `preserve_order` feature. The store keeps the
//! exact canonical text it hashed, so verification never depends on re-parsing numbers.

use ring::digest::{Context, SHA256};
use serde_json::Value;

/// `prev_hash` of the first event of every chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hashed fields of one event, besides `prev_hash`.
#[derive(Clone, Copy, Debug)]
pub struct HashedFields<'a> {
    pub chain_id: &'a str,
    pub chain_seq: i64,
    pub session_id: &'a str,
    pub session_seq: i64,
    pub at_unix_ms: i64,
    pub kind: &'a str,
    /// The canonical JSON text of the payload, as stored.
    pub payload: &'a [u8],
}

/// Computes an event's hash from its predecessor's hash and its own fields.
pub fn event_hash(prev_hash: &str, f: &HashedFields<'_>) -> String {
    let mut ctx = Context::new(&SHA256);
    ctx.update(prev_hash.as_bytes());
    put_bytes(&mut ctx, f.chain_id.as_bytes());
    ctx.update(&f.chain_seq.to_be_bytes());
    put_bytes(&mut ctx, f.session_id.as_bytes());
    ctx.update(&f.session_seq.to_be_bytes());
    ctx.update(&f.at_unix_ms.to_be_bytes());
    put_bytes(&mut ctx, f.kind.as_bytes());
    put_bytes(&mut ctx, f.payload);
    hex::encode(ctx.finish().as_ref())
}

fn put_bytes(ctx: &mut Context, bytes: &[u8]) {
    ctx.update(&(bytes.len() as u64).to_be_bytes());
    ctx.update(bytes);
}

/// Compact JSON with object keys sorted bytewise at every depth.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    // serde_json's escaping is deterministic: `"`, `\`, control characters; UTF-8 kept as is.
    out.push_str(&serde_json::to_string(s).expect("serializing a str cannot fail"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_is_compact() {
        let v = json!({"b": 1, "a": {"z": [true, null, "x\"y"], "m": 2.5}, "A": "é\n"});
        assert_eq!(
            canonical_json(&v),
            r#"{"A":"é\n","a":{"m":2.5,"z":[true,null,"x\"y"]},"b":1}"#
        );
    }

    #[test]
    fn canonical_json_round_trips_to_equal_value() {
        let v = json!({"n": -12, "f": 0.1, "big": u64::MAX, "s": "\u{1}tab\t"});
        let back: Value = serde_json::from_str(&canonical_json(&v)).unwrap();
        assert_eq!(back, v);
    }

    /// Pins the encoding: changing it would break verification of every stored chain.
    #[test]
    fn event_hash_matches_the_documented_encoding() {
        let fields = HashedFields {
            chain_id: "c1",
            chain_seq: 1,
            session_id: "s1",
            session_seq: 2,
            at_unix_ms: 1_700_000_000_000,
            kind: "query",
            payload: br#"{"sql":"select 1"}"#,
        };
        let mut bytes = GENESIS_HASH.as_bytes().to_vec();
        for (s, n) in [("c1", Some(1i64)), ("s1", Some(2))] {
            bytes.extend_from_slice(&(s.len() as u64).to_be_bytes());
            bytes.extend_from_slice(s.as_bytes());
            bytes.extend_from_slice(&n.unwrap().to_be_bytes());
        }
        bytes.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
        for s in ["query", r#"{"sql":"select 1"}"#] {
            bytes.extend_from_slice(&(s.len() as u64).to_be_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
        let expected = hex::encode(ring::digest::digest(&SHA256, &bytes).as_ref());
        assert_eq!(event_hash(GENESIS_HASH, &fields), expected);
        assert_eq!(
            event_hash(GENESIS_HASH, &fields),
            "4396ab2b32ea3e64135d96268fdab2bd8d8a0bb8befa23c20ad8079a8fb0ebd1",
            "golden value for the v1 encoding"
        );
        let other = HashedFields {
            chain_seq: 2,
            ..fields
        };
        assert_ne!(
            event_hash(GENESIS_HASH, &fields),
            event_hash(GENESIS_HASH, &other)
        );
    }
}
