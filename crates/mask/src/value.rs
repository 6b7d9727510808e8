//! Masking one value according to its column plan: spans of text, JSON strings and numbers,
//! whole values, and the type-correct fallback (NULL) for non-text types.

use crate::detect::{first_match, scan, try_matches, Detector, DetectorSet, Matches};
use crate::policy::{ColumnPlan, Encoding, Outcome, Reason};
use crate::prefilter::candidates;
use crate::strategy::{write_mask, MaskKey, Strategy, REDACTED};
use std::borrow::Cow;

/// Masks the detector matches in `text` with the strategy of each detector. Appends the masked
/// text to `out` and returns the first detector when anything matched; writes nothing otherwise.
pub(crate) fn mask_spans(
    text: &[u8],
    set: DetectorSet,
    strategy_of: impl Fn(Detector) -> Strategy,
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) -> Option<Detector> {
    mask_spans_after(&[], text, set, strategy_of, key, out)
}

/// [`mask_spans`], writing `prefix` first when anything matched (so that a clean `text` costs
/// one scan and no write).
fn mask_spans_after(
    prefix: &[u8],
    text: &[u8],
    set: DetectorSet,
    strategy_of: impl Fn(Detector) -> Strategy,
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) -> Option<Detector> {
    write_spans(prefix, text, try_matches(set, text)?, strategy_of, key, out)
}

/// Writes `prefix`, then `text` with the matches of `it` masked, when `it` finds any.
fn write_spans(
    prefix: &[u8],
    text: &[u8],
    mut it: Matches<'_>,
    strategy_of: impl Fn(Detector) -> Strategy,
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) -> Option<Detector> {
    let first = it.next()?;
    out.extend_from_slice(prefix);
    let mut last = 0;
    for m in std::iter::once(first.clone()).chain(it) {
        out.extend_from_slice(&text[last..m.range.start]);
        write_mask(
            strategy_of(m.detector),
            Some(m.detector),
            &text[m.range.clone()],
            key,
            out,
        );
        last = m.range.end;
    }
    out.extend_from_slice(&text[last..]);
    Some(first.detector)
}

/// Masks the detector matches in free text (error details, notification payloads, audit
/// parameters) with one strategy. `Null` redacts here; `Hash` without a key redacts.
pub fn mask_text<'a>(
    detectors: DetectorSet,
    strategy: Strategy,
    key: Option<&MaskKey>,
    text: &'a [u8],
) -> Cow<'a, [u8]> {
    let mut out = Vec::new();
    match mask_spans(text, detectors, |_| strategy, key, &mut out) {
        Some(_) => Cow::Owned(out),
        None => Cow::Borrowed(text),
    }
}

#[inline]
pub(crate) fn mask_value(
    plan: &ColumnPlan,
    key: Option<&MaskKey>,
    value: &[u8],
    out: &mut Vec<u8>,
) -> Outcome {
    if let Some((strategy, reason)) = plan.whole {
        return mask_whole(plan.kind, strategy, reason, key, value, out);
    }
    if !plan.json_paths.is_empty() {
        if let Some(outcome) = mask_json_paths(plan, key, value, out) {
            return outcome;
        }
    }
    // The first pass alone settles most values, before any call into the masking below.
    let set = match plan.kind {
        Encoding::Text | Encoding::Json | Encoding::TypedText | Encoding::Opaque => {
            candidates(plan.detectors, value)
        }
        _ => plan.detectors,
    };
    if set.is_empty() {
        return Outcome::Unchanged;
    }
    mask_content(plan, key, value, set, out)
}

/// Masks the detector matches of a value; `set` is what the first pass left of the plan's
/// detectors for text, JSON and typed text (the plan's detectors for the other kinds).
#[inline(never)]
fn mask_content(
    plan: &ColumnPlan,
    key: Option<&MaskKey>,
    value: &[u8],
    set: DetectorSet,
    out: &mut Vec<u8>,
) -> Outcome {
    let strategy_of = |d: Detector| plan.strategies[d as usize];
    match plan.kind {
        Encoding::Text => match write_spans(&[], value, scan(set, value), strategy_of, key, out) {
            Some(d) => Outcome::Masked(Reason::Detector(d)),
            None => Outcome::Unchanged,
        },
        Encoding::Json => {
            match mask_json_scanned(value, set, plan.detectors, strategy_of, key, out) {
                Some(d) => Outcome::Masked(Reason::Detector(d)),
                None => Outcome::Unchanged,
            }
        }
        Encoding::VersionedJson => {
            let Some((&version, json)) = value.split_first() else {
                return Outcome::Unchanged;
            };
            let mark = out.len();
            match mask_json(json, plan.detectors, strategy_of, key, out) {
                Some(d) => {
                    out.push(version);
                    out[mark..].rotate_right(1);
                    Outcome::Masked(Reason::Detector(d))
                }
                None => Outcome::Unchanged,
            }
        }
        Encoding::TypedText | Encoding::Opaque => match scan(set, value).next() {
            Some(m) => Outcome::Null(Reason::Detector(m.detector)),
            None => Outcome::Unchanged,
        },
        Encoding::BigEndianI64 => {
            let Ok(bytes) = <[u8; 8]>::try_from(value) else {
                return Outcome::Unchanged;
            };
            let mut buf = [0u8; 20];
            let text = render_i64(i64::from_be_bytes(bytes), &mut buf);
            match first_match(plan.detectors, text) {
                Some(m) => Outcome::Null(Reason::Detector(m.detector)),
                None => Outcome::Unchanged,
            }
        }
        Encoding::Fixed => Outcome::Unchanged,
    }
}

/// JSON paths first, then the detectors over what is left; `None` when no path matched (the
/// value then goes through the detectors alone).
#[inline(never)]
fn mask_json_paths(
    plan: &ColumnPlan,
    key: Option<&MaskKey>,
    value: &[u8],
    out: &mut Vec<u8>,
) -> Option<Outcome> {
    let (version, doc) = match plan.kind {
        Encoding::VersionedJson => {
            let (v, d) = value.split_first()?;
            (Some(*v), d)
        }
        _ => (None, value),
    };
    let mut masked = Vec::new();
    let i = crate::json_path::mask_paths(doc, &plan.json_paths, key, &mut masked)?;
    let strategy_of = |d: Detector| plan.strategies[d as usize];
    out.extend(version);
    let mut scanned = Vec::new();
    match mask_json(&masked, plan.detectors, strategy_of, key, &mut scanned) {
        Some(_) => out.extend_from_slice(&scanned),
        None => out.extend_from_slice(&masked),
    }
    Some(Outcome::Masked(Reason::Column {
        rule: plan.json_paths[i].2,
    }))
}

fn mask_whole(
    kind: Encoding,
    strategy: Strategy,
    reason: Reason,
    key: Option<&MaskKey>,
    value: &[u8],
    out: &mut Vec<u8>,
) -> Outcome {
    if strategy == Strategy::Null {
        return Outcome::Null(reason);
    }
    match kind {
        Encoding::Text => {
            // A value that is exactly one detected item keeps that item's partial shape
            // (an e-mail keeps its domain).
            let detector = match strategy {
                Strategy::Partial { .. } => first_match(DetectorSet::all(), value)
                    .filter(|m| m.range.start == 0 && m.range.end == value.len())
                    .map(|m| m.detector),
                _ => None,
            };
            write_mask(strategy, detector, value, key, out);
            Outcome::Masked(reason)
        }
        Encoding::Json | Encoding::VersionedJson => {
            // The JSON string "****" or "h:...": valid json/jsonb, never the original.
            if kind == Encoding::VersionedJson {
                out.push(value.first().copied().unwrap_or(1));
            }
            out.push(b'"');
            match strategy {
                Strategy::Hash => write_mask(strategy, None, value, key, out),
                _ => out.extend_from_slice(REDACTED),
            }
            out.push(b'"');
            Outcome::Masked(reason)
        }
        _ => Outcome::Null(reason),
    }
}

fn render_i64(v: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Masks detector matches inside the strings (keys included) and numbers of a JSON text,
/// keeping it valid JSON: a string keeps its quotes, a masked number becomes a JSON string
/// (or `null` under strategy `null`). Invalid JSON is scanned as plain text.
pub(crate) fn mask_json(
    json: &[u8],
    set: DetectorSet,
    strategy_of: impl Fn(Detector) -> Strategy + Copy,
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) -> Option<Detector> {
    let first_pass = candidates(set, json);
    if first_pass.is_empty() {
        return None;
    }
    mask_json_scanned(json, first_pass, set, strategy_of, key, out)
}

/// [`mask_json`] once the first pass over the whole text left `first_pass` of `set`.
fn mask_json_scanned(
    json: &[u8],
    first_pass: DetectorSet,
    set: DetectorSet,
    strategy_of: impl Fn(Detector) -> Strategy + Copy,
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) -> Option<Detector> {
    // Pre-filter: quotes and JSON punctuation are boundaries for every detector, so a value
    // with no match in its raw text has none inside its strings or numbers either.
    scan(first_pass, json).next()?;
    let mark = out.len();
    let n = json.len();
    let mut first: Option<Detector> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < n {
        let c = json[i];
        if c == b'"' {
            let start = i + 1;
            let mut j = start;
            while j < n && json[j] != b'"' {
                j += if json[j] == b'\\' { 2 } else { 1 };
            }
            if j >= n {
                // Unterminated string: not JSON, scan it as text.
                out.truncate(mark);
                return mask_spans(json, set, strategy_of, key, out);
            }
            // One scan of the string; nothing is written unless it matches.
            let (before, string) = (&json[copied..start], &json[start..j]);
            if let Some(d) = mask_spans_after(before, string, set, strategy_of, key, out) {
                first.get_or_insert(d);
                copied = j;
            }
            i = j + 1;
        } else if c == b'-' || c.is_ascii_digit() {
            let start = i;
            while i < n && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                i += 1;
            }
            if let Some(m) = first_match(set, &json[start..i]) {
                first.get_or_insert(m.detector);
                out.extend_from_slice(&json[copied..start]);
                match strategy_of(m.detector) {
                    Strategy::Null => out.extend_from_slice(b"null"),
                    s => {
                        out.push(b'"');
                        write_mask(s, Some(m.detector), &json[start..i], key, out);
                        out.push(b'"');
                    }
                }
                copied = i;
            }
        } else {
            i += 1;
        }
    }
    match first {
        Some(_) => {
            out.extend_from_slice(&json[copied..]);
            first
        }
        None => {
            out.truncate(mark);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Option<String> {
        let mut out = Vec::new();
        mask_json(
            s.as_bytes(),
            DetectorSet::all(),
            |_| Strategy::Partial { keep_last: 4 },
            None,
            &mut out,
        )
        .map(|_| String::from_utf8(out).unwrap())
    }

    #[test]
    fn json_strings_and_numbers_stay_valid() {
        assert_eq!(json(r#"{"a": 1, "b": "plain"}"#), None);
        let got =
            json(r#"{"user":{"email":"jane@example.com","card":4111111111111111,"n":[1,2]}}"#)
                .unwrap();
        assert_eq!(
            got,
            r#"{"user":{"email":"****@example.com","card":"************1111","n":[1,2]}}"#
        );
        let got = json(r#"["say \"hi\" to bob@example.org", "x"]"#).unwrap();
        assert_eq!(got, r#"["say \"hi\" to ****@example.org", "x"]"#);
        let pem = "{\"k\":\"-----BEGIN PRIVATE KEY-----\\nMIIE\"}";
        assert_eq!(
            json(pem).unwrap(),
            r#"{"k":"****"}"#,
            "a PEM without END stops at the string's end"
        );
    }

    #[test]
    fn mask_text_borrows_when_clean() {
        let clean = b"relation \"users\" does not exist";
        assert!(matches!(
            mask_text(DetectorSet::all(), Strategy::Redact, None, clean),
            Cow::Borrowed(_)
        ));
        let got = mask_text(
            DetectorSet::all(),
            Strategy::Null,
            None,
            b"Key (email)=(a@b.io) already exists.",
        );
        assert_eq!(&*got, b"Key (email)=(****) already exists.");
    }

    #[test]
    fn i64_rendering() {
        let mut b = [0u8; 20];
        assert_eq!(render_i64(i64::MIN, &mut b), b"-9223372036854775808");
        assert_eq!(render_i64(0, &mut b), b"0");
        assert_eq!(render_i64(4111111111111111, &mut b), b"4111111111111111");
    }
}
