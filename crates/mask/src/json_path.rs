//! JSON paths in masking rules (`json_paths = ["$.email", "$.cards[*].number", "$..ssn"]`):
//! the values they select inside json/jsonb columns (and, later, HTTP bodies) are masked with
//! the rule's strategy; the rest of the document is kept, and the result stays valid JSON.
//!
//! Syntax: `$` then any of `.key`, `['key']`, `[n]`, `[*]` / `.*` (every member or element)
//! and `..key` (that key at any depth). Keys compare case-sensitively, as JSON does.

use crate::strategy::{write_mask, MaskKey, Strategy, REDACTED};
use serde_json::Value;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    Any,
    /// `..key`: the key at this level or any below.
    Descend(String),
}

/// A parsed JSON path.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON path {path:?}: {why} (paths look like $.email, $.cards[*].number or $..ssn)")]
pub struct BadJsonPath {
    pub path: String,
    pub why: &'static str,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, BadJsonPath> {
        let bad = |why| BadJsonPath {
            path: text.to_string(),
            why,
        };
        let rest = text
            .trim()
            .strip_prefix('$')
            .ok_or_else(|| bad("must start with $"))?;
        let b = rest.as_bytes();
        let mut steps = Vec::new();
        let mut i = 0;
        let name_end = |from: usize| {
            b[from..]
                .iter()
                .position(|c| matches!(c, b'.' | b'['))
                .map_or(b.len(), |p| from + p)
        };
        while i < b.len() {
            match b[i] {
                b'.' if b.get(i + 1) == Some(&b'.') => {
                    let end = name_end(i + 2);
                    if end == i + 2 {
                        return Err(bad("`..` needs a key after it"));
                    }
                    steps.push(Step::Descend(rest[i + 2..end].to_string()));
                    i = end;
                }
                b'.' => {
                    let end = name_end(i + 1);
                    match &rest[i + 1..end] {
                        "" => return Err(bad("empty key after `.`")),
                        "*" => steps.push(Step::Any),
                        k => steps.push(Step::Key(k.to_string())),
                    }
                    i = end;
                }
                b'[' => {
                    let close = rest[i..].find(']').ok_or_else(|| bad("unclosed `[`"))? + i;
                    let inner = rest[i + 1..close].trim();
                    if inner == "*" {
                        steps.push(Step::Any);
                    } else if let Some(q) = inner
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    {
                        steps.push(Step::Key(q.to_string()));
                    } else {
                        let n = inner
                            .parse()
                            .map_err(|_| bad("`[...]` holds a number, * or a quoted key"))?;
                        steps.push(Step::Index(n));
                    }
                    i = close + 1;
                }
                _ => return Err(bad("expected `.` or `[`")),
            }
        }
        if steps.is_empty() {
            return Err(bad(
                "`$` alone would select the whole value; use columns for that",
            ));
        }
        Ok(JsonPath {
            text: text.trim().to_string(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How deep the values it selects are: (least depth, whether that is the only one). A
    /// `..key` step can match deeper.
    pub(crate) fn depth(&self) -> (usize, bool) {
        let fixed = !self.steps.iter().any(|s| matches!(s, Step::Descend(_)));
        (self.steps.len(), fixed)
    }

    /// Whether the path selects the value at `path` (the keys and indices from the root), as
    /// a streaming reader sees it; `..key` matches that key at any depth.
    pub fn matches(&self, path: &[PathSeg<'_>]) -> bool {
        steps_match(&self.steps, path)
    }
}

/// One step from the root to a value: an object member or an array element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathSeg<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps_match(steps: &[Step], path: &[PathSeg<'_>]) -> bool {
    let Some((step, rest)) = steps.split_first() else {
        return path.is_empty();
    };
    match step {
        Step::Key(k) => {
            matches!(path.first(), Some(PathSeg::Key(p)) if p == k) && steps_match(rest, &path[1..])
        }
        Step::Index(n) => {
            matches!(path.first(), Some(PathSeg::Index(i)) if i == n)
                && steps_match(rest, &path[1..])
        }
        Step::Any => !path.is_empty() && steps_match(rest, &path[1..]),
        Step::Descend(k) => (0..path.len()).any(|i| {
            matches!(path[i], PathSeg::Key(p) if p == k) && steps_match(rest, &path[i + 1..])
        }),
    }
}

impl fmt::Debug for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonPath({})", self.text)
    }
}

/// Masks what `paths` select in the JSON text `doc`, each with its strategy. Appends the new
/// document to `out` and returns the index (in `paths`) of the first path that matched; writes
/// nothing and returns `None` when none matched or `doc` is not JSON.
pub(crate) fn mask_paths(
    doc: &[u8],
    paths: &[(JsonPath, Strategy, usize)],
    key: Option<&MaskKey>,
    out: &mut Vec<u8>,
) -> Option<usize> {
    let mut value: Value = serde_json::from_slice(doc).ok()?;
    let mut first = None;
    for (i, (path, strategy, _)) in paths.iter().enumerate() {
        if apply(&mut value, &path.steps, *strategy, key) && first.is_none() {
            first = Some(i);
        }
    }
    let first = first?;
    serde_json::to_writer(&mut *out, &value).ok()?;
    Some(first)
}

fn apply(v: &mut Value, steps: &[Step], strategy: Strategy, key: Option<&MaskKey>) -> bool {
    let Some((step, rest)) = steps.split_first() else {
        return replace(v, strategy, key);
    };
    match step {
        Step::Key(k) => match v {
            Value::Object(m) => m.get_mut(k).is_some_and(|c| apply(c, rest, strategy, key)),
            _ => false,
        },
        Step::Index(n) => match v {
            Value::Array(a) => a.get_mut(*n).is_some_and(|c| apply(c, rest, strategy, key)),
            _ => false,
        },
        Step::Any => {
            let mut hit = false;
            match v {
                Value::Object(m) => m
                    .values_mut()
                    .for_each(|c| hit |= apply(c, rest, strategy, key)),
                Value::Array(a) => a
                    .iter_mut()
                    .for_each(|c| hit |= apply(c, rest, strategy, key)),
                _ => {}
            }
            hit
        }
        Step::Descend(k) => {
            let mut hit = false;
            match v {
                Value::Object(m) => {
                    for (name, c) in m.iter_mut() {
                        if name == k {
                            hit |= apply(c, rest, strategy, key);
                        } else {
                            hit |= apply(c, steps, strategy, key);
                        }
                    }
                }
                Value::Array(a) => a
                    .iter_mut()
                    .for_each(|c| hit |= apply(c, steps, strategy, key)),
                _ => {}
            }
            hit
        }
    }
}

/// The selected value becomes its mask: a string keeps the strategy's shape (partial, hash),
/// anything else (number, bool, object, array) becomes the redaction string; `null` strategy
/// makes it JSON null. A JSON null is left alone (there is nothing to hide).
fn replace(v: &mut Value, strategy: Strategy, key: Option<&MaskKey>) -> bool {
    if v.is_null() {
        return false;
    }
    if strategy == Strategy::Null {
        *v = Value::Null;
        return true;
    }
    let mut out = Vec::new();
    match &*v {
        Value::String(s) => write_mask(strategy, None, s.as_bytes(), key, &mut out),
        other => match strategy {
            Strategy::Hash => {
                write_mask(strategy, None, other.to_string().as_bytes(), key, &mut out)
            }
            _ => out.extend_from_slice(REDACTED),
        },
    }
    *v = Value::String(String::from_utf8_lossy(&out).into_owned());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(doc: &str, paths: &[&str], strategy: Strategy) -> Option<String> {
        let paths: Vec<_> = paths
            .iter()
            .map(|p| (JsonPath::parse(p).unwrap(), strategy, 0))
            .collect();
        let mut out = Vec::new();
        mask_paths(doc.as_bytes(), &paths, None, &mut out)?;
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn paths_parse_and_bad_ones_say_why() {
        for ok in [
            "$.a",
            "$.a.b",
            "$.a[*].b",
            "$.a.*",
            "$..ssn",
            "$['weird key'][0]",
        ] {
            JsonPath::parse(ok).unwrap();
        }
        for bad in ["a.b", "$", "$.", "$[x]", "$.a[", "$..", "$a"] {
            let e = JsonPath::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad.trim()), "{e}");
        }
    }

    #[test]
    fn selected_values_are_masked_and_the_rest_kept() {
        let doc = r#"{"id":7,"email":"ann@example.com","cards":[{"number":"4242424242424242","exp":"12/30"},{"number":"5555555555554444"}],"profile":{"ssn":"078-05-1120","deep":{"ssn":123456789}}}"#;
        let got = run(
            doc,
            &["$.email", "$.cards[*].number", "$..ssn"],
            Strategy::Redact,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["cards"][0]["exp"], "12/30");
        for original in [
            "ann@example.com",
            "4242424242424242",
            "5555555555554444",
            "078-05-1120",
            "123456789",
        ] {
            assert!(!got.contains(original), "{original} in {got}");
        }
        // Partial keeps the tail of a string.
        let got = run(
            doc,
            &["$.cards[0].number"],
            Strategy::Partial { keep_last: 4 },
        )
        .unwrap();
        assert!(got.contains("4242\""), "{got}");
        assert!(!got.contains("4242424242424242"), "{got}");
        // Null strategy: JSON null.
        let got = run(doc, &["$.profile"], Strategy::Null).unwrap();
        assert!(got.contains("\"profile\":null"), "{got}");
    }

    #[test]
    fn matches_follows_the_streaming_path() {
        use PathSeg::{Index as I, Key as K};
        let p = |s: &str| JsonPath::parse(s).unwrap();
        assert!(p("$.a.b").matches(&[K("a"), K("b")]));
        assert!(!p("$.a.b").matches(&[K("a")]));
        assert!(!p("$.a.b").matches(&[K("a"), K("b"), K("c")]));
        assert!(p("$.cards[*].number").matches(&[K("cards"), I(3), K("number")]));
        assert!(!p("$.cards[*].number").matches(&[K("cards"), K("x"), K("nope")]));
        assert!(p("$.a.*").matches(&[K("a"), K("z")]));
        assert!(p("$[1]").matches(&[I(1)]) && !p("$[1]").matches(&[I(2)]));
        assert!(p("$..ssn").matches(&[K("ssn")]));
        assert!(p("$..ssn").matches(&[K("x"), I(0), K("ssn")]));
        assert!(!p("$..ssn").matches(&[K("ssn"), K("x")]));
        assert!(p("$..a.b").matches(&[K("a"), K("a"), K("b")]));
        assert!(p("$['weird key']").matches(&[K("weird key")]));
    }

    #[test]
    fn no_match_or_not_json_writes_nothing() {
        assert_eq!(run(r#"{"a":1}"#, &["$.b"], Strategy::Redact), None);
        assert_eq!(run("not json", &["$.a"], Strategy::Redact), None);
        assert_eq!(run(r#"{"a":null}"#, &["$.a"], Strategy::Redact), None);
    }
}
