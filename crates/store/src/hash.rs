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
    hex_lower(ctx.finish().as_ref())
}

/// The digest of an `audit.checkpoint`: chain heads sorted by `chain_id`, each encoded as
/// `str(chain_id) || i64(seq) || str(hash)`, SHA-256, hex. An operator who copies it elsewhere
/// can later prove the chains were not rewritten up to those heads.
pub fn checkpoint_digest(heads: &[crate::ChainPoint]) -> String {
    let mut sorted: Vec<&crate::ChainPoint> = heads.iter().collect();
    sorted.sort_by(|a, b| a.chain_id.as_bytes().cmp(b.chain_id.as_bytes()));
    let mut ctx = Context::new(&SHA256);
    for h in sorted {
        put_bytes(&mut ctx, h.chain_id.as_bytes());
        ctx.update(&h.seq.to_be_bytes());
        put_bytes(&mut ctx, h.hash.as_bytes());
    }
    hex::encode(ctx.finish().as_ref())
}

fn put_bytes(ctx: &mut Context, bytes: &[u8]) {
    ctx.update(&(bytes.len() as u64).to_be_bytes());
    ctx.update(bytes);
}

/// Compact JSON with object keys sorted bytewise at every depth.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical(value, &mut out);
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

/// Appends the canonical JSON of `value` to `out`, without an allocation per node (this runs
/// for every event on the gateway's hot path).
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        // `Number`'s Display is its JSON form (itoa / ryu), as `to_string` was.
        Value::Number(n) => {
            use std::io::Write;
            write!(out, "{n}").expect("writing to memory cannot fail");
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            // serde_json's default map iterates in key order already; sort only if it does not
            // (the `preserve_order` feature).
            let sorted = map
                .keys()
                .zip(map.keys().skip(1))
                .all(|(a, b)| a.as_bytes() <= b.as_bytes());
            if sorted {
                for (i, (key, item)) in map.iter().enumerate() {
                    write_entry(i, key, item, out);
                }
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    write_entry(i, key, item, out);
                }
            }
            out.push(b'}');
        }
    }
}

fn write_entry(i: usize, key: &str, item: &Value, out: &mut Vec<u8>) {
    if i > 0 {
        out.push(b',');
    }
    write_string(key, out);
    out.push(b':');
    write_canonical(item, out);
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    push_json_str(s, out);
}

/// Appends `s` as a JSON string exactly as serde_json writes it: deterministic escaping of `"`,
/// `\` and control characters, UTF-8 kept as is. Most strings need no escape: those are copied.
pub(crate) fn push_json_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    // No early exit: the whole scan vectorizes.
    let plain = !bytes.iter().fold(false, |acc, &c| {
        acc | (c < 0x20) | (c == b'"') | (c == b'\\')
    });
    if plain {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("serializing a str cannot fail");
    }
}

/// Appends `n` in decimal, as serde_json writes an integer.
pub(crate) fn push_int(n: i64, out: &mut Vec<u8>) {
    use std::io::Write;
    write!(out, "{n}").expect("writing to memory cannot fail");
}

/// Writes one JSON object in canonical form field by field, for hot paths that know their
/// fields and would otherwise build a `Value` only to serialize it: the result is what
/// [`canonical_json`] writes for the same object, provided the keys come in byte order (checked
/// in debug builds).
pub struct CanonicalObject {
    out: Vec<u8>,
    last_key: &'static str,
    /// No key written yet at this depth.
    first: bool,
}

impl Default for CanonicalObject {
    fn default() -> Self {
        CanonicalObject::new()
    }
}

impl CanonicalObject {
    pub fn new() -> Self {
        CanonicalObject::with_capacity(160)
    }

    /// An object whose text is expected to take about `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut out = Vec::with_capacity(bytes);
        out.push(b'{');
        CanonicalObject {
            out,
            last_key: "",
            first: true,
        }
    }

    fn key(&mut self, key: &'static str) {
        debug_assert!(
            self.first || self.last_key.as_bytes() < key.as_bytes(),
            "canonical keys go in byte order: {key:?} after {:?}",
            self.last_key
        );
        self.last_key = key;
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        push_json_str(key, &mut self.out);
        self.out.push(b':');
    }

    pub fn bool(&mut self, key: &'static str, value: bool) -> &mut Self {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    /// Any JSON value, in canonical form.
    pub fn value(&mut self, key: &'static str, value: &Value) -> &mut Self {
        self.key(key);
        write_canonical(value, &mut self.out);
        self
    }

    /// An array of JSON values, in canonical form.
    pub fn values(&mut self, key: &'static str, values: &[Value]) -> &mut Self {
        self.key(key);
        self.out.push(b'[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            write_canonical(v, &mut self.out);
        }
        self.out.push(b']');
        self
    }

    /// Pairs of strings as an array of two-element arrays (`[["k","v"],...]`), as serde writes
    /// a `Vec<(String, String)>`.
    pub fn str_pairs(&mut self, key: &'static str, pairs: &[(String, String)]) -> &mut Self {
        self.key(key);
        self.out.push(b'[');
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out.push(b'[');
            push_json_str(k, &mut self.out);
            self.out.push(b',');
            push_json_str(v, &mut self.out);
            self.out.push(b']');
        }
        self.out.push(b']');
        self
    }

    /// A nested object, written field by field by `fill` (keys in byte order there too).
    pub fn object(
        &mut self,
        key: &'static str,
        fill: impl FnOnce(&mut CanonicalObject),
    ) -> &mut Self {
        self.key(key);
        let mut inner = CanonicalObject {
            out: std::mem::take(&mut self.out),
            last_key: "",
            first: true,
        };
        inner.out.push(b'{');
        fill(&mut inner);
        inner.out.push(b'}');
        self.out = inner.out;
        self
    }

    pub fn uint(&mut self, key: &'static str, value: u64) -> &mut Self {
        use std::io::Write;
        self.key(key);
        write!(self.out, "{value}").expect("writing to memory cannot fail");
        self
    }

    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Self {
        self.key(key);
        push_json_str(value, &mut self.out);
        self
    }

    /// A string, or `null`.
    pub fn opt_str(&mut self, key: &'static str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => {
                self.key(key);
                self.out.extend_from_slice(b"null");
                self
            }
        }
    }

    pub fn finish(mut self) -> String {
        self.out.push(b'}');
        String::from_utf8(self.out).expect("canonical JSON is UTF-8")
    }
}

/// Lowercase hex, as `hex::encode`, without going through `char`s.
pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
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
    fn a_canonical_object_written_field_by_field_is_canonical_json() {
        for (text, n) in [
            ("ok", 0u64),
            ("q\"b\\s\u{0}\u{1f}é😀\r\n", u64::MAX),
            ("", 7),
        ] {
            let mut o = CanonicalObject::new();
            o.uint("a_n", n)
                .str("b", text)
                .opt_str("c", Some(text))
                .opt_str("d", None);
            let v = json!({"a_n": n, "b": text, "c": text, "d": null});
            assert_eq!(o.finish(), canonical_json(&v));
        }
        assert_eq!(CanonicalObject::new().finish(), canonical_json(&json!({})));
    }

    #[test]
    fn nested_objects_pairs_and_values_written_field_by_field_are_canonical_json() {
        let text = "q\"b\\s\u{0}é\n";
        let pairs = vec![
            ("x-a".to_string(), text.to_string()),
            ("b".to_string(), String::new()),
        ];
        let decision = json!({"rule": text, "action": "allow", "n": [1, 2.5]});
        let mut o = CanonicalObject::new();
        o.object("a", |b| {
            b.uint("bytes", 3)
                .opt_str("sha", Some("ab"))
                .bool("z", true);
        })
        .object("b_empty", |_| {})
        .value("c", &decision)
        .values("d", &[decision.clone(), json!(null)])
        .str_pairs("e", &pairs)
        .str_pairs("f", &[])
        .bool("g", false)
        .uint("h", 9);
        let v = json!({
            "a": {"bytes": 3, "sha": "ab", "z": true},
            "b_empty": {},
            "c": decision.clone(),
            "d": [decision, null],
            "e": pairs,
            "f": [],
            "g": false,
            "h": 9,
        });
        assert_eq!(o.finish(), canonical_json(&v));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "canonical keys go in byte order")]
    fn a_canonical_object_refuses_keys_out_of_order() {
        let mut o = CanonicalObject::new();
        o.uint("tag", 1).uint("t_us", 2);
    }

    #[test]
    fn canonical_json_round_trips_to_equal_value() {
        let v = json!({"n": -12, "f": 0.1, "big": u64::MAX, "s": "\u{1}tab\t"});
        let back: Value = serde_json::from_str(&canonical_json(&v)).unwrap();
        assert_eq!(back, v);
    }

    /// The encoder before it stopped allocating per node: the output must not change.
    fn reference_canonical(value: &Value) -> String {
        fn write(value: &Value, out: &mut String) {
            match value {
                Value::Null => out.push_str("null"),
                Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Value::Number(n) => out.push_str(&n.to_string()),
                Value::String(s) => out.push_str(&serde_json::to_string(s).unwrap()),
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        write(item, out);
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
                        out.push_str(&serde_json::to_string(key).unwrap());
                        out.push(':');
                        write(item, out);
                    }
                    out.push('}');
                }
            }
        }
        let mut out = String::new();
        write(value, &mut out);
        out
    }

    #[test]
    fn canonical_json_is_byte_identical_to_the_reference_encoder() {
        let values = [
            json!(null),
            json!(true),
            json!(-0.0),
            json!(1e300),
            json!(-1.5e-7),
            json!(0.1),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(""),
            json!("\u{0}\u{1f}\u{7f}\"\\/\u{2028}é😀\r\n\t"),
            json!([]),
            json!({}),
            json!({"é": 1, "e": 2, "Z": 3, "": 4, "a\u{0}": [{"y": null, "x": [1, 2.5, "s"]}]}),
            json!({"n": 3, "protocol": "simple", "text": "SELECT 'a\"b' FROM t WHERE x = $1;",
                   "params": ["1", null], "decision": {"action": "allow", "rule": null}}),
            json!({"n": 3, "outcome": "ok", "sqlstate": null, "rows": 1, "tag": "SELECT 1",
                   "duration_us": 180}),
        ];
        for v in &values {
            assert_eq!(canonical_json(v), reference_canonical(v), "{v:?}");
        }
    }

    #[test]
    fn hex_lower_matches_hex_encode() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_lower(&bytes), hex::encode(&bytes));
        assert_eq!(hex_lower(&[]), "");
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
