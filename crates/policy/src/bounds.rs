//! Bounds on what reaches the SQL parser, so that no statement text can overflow a stack.
//!
//! libpg_query's parser is iterative, but turning its tree into protobuf (C), and everything
//! that walks the tree afterwards, recurses once per level: `select not not … true` 9,000 deep
//! needs more stack than a tokio worker has, and a stack overflow aborts the whole process
//! (`catch_unwind` cannot catch it). So before anything is parsed, [`nesting_depth`] estimates
//! an upper bound of the tree's depth with a pure scan of the text (it follows quotes, `E''`
//! strings, dollar quoting, quoted identifiers and both comment styles as PostgreSQL's lexer
//! does), and [`guard`] decides where the parse may run:
//!
//! - up to [`INLINE_DEPTH`] (and any text of at most that many bytes, the hot path): on the
//!   caller's thread, which then needs well under 256 KiB of stack;
//! - up to [`MAX_DEPTH`]: on a short-lived thread with a [`BIG_STACK`] stack;
//! - beyond: not parsed at all; the text is [`Classification::Unparsable`].
//!
//! The estimate only ever errs upwards: every word, literal and operator character counts one
//! level in the chain it is part of, each bracket or `CASE` opens a nested chain, and a chain
//! starts again only where PostgreSQL's tree is flat: at `,` and `;`, at `AND`/`OR` (which the
//! grammar flattens; the `AND` of a `BETWEEN` does not count as one), and at `WHEN`/`THEN`/`ELSE`.
//! Set operations and joins nest left-deep, so they keep counting across those.
//! Legitimately large texts (a 5,000-element `IN` list, thousands of `OR` terms or `VALUES`
//! rows) stay shallow. PostgreSQL only builds a tree for text it accepts, so the estimate has
//! to be an upper bound for valid SQL only.

use crate::classify::Classification;
use std::cell::Cell;

/// Deepest estimate parsed on the caller's own stack. A level costs the C tree conversion
/// about 1 KiB at worst (nested subqueries), so this needs at most ~128 KiB.
pub const INLINE_DEPTH: u32 = 128;
/// Deepest estimate parsed at all. PostgreSQL trees this deep are far beyond what the
/// protobuf decoding behind `pg_query::parse` accepts (100 message levels), so nothing that
/// classifies today is refused here; the limit only keeps the parse's stack use bounded.
pub const MAX_DEPTH: u32 = 1000;
/// Stack of the thread that parses texts estimated deeper than [`INLINE_DEPTH`]: about
/// ten times what [`MAX_DEPTH`] levels need. Only the pages used are ever committed.
pub const BIG_STACK: usize = 16 << 20;

thread_local! {
    static ON_BIG_STACK: Cell<bool> = const { Cell::new(false) };
}

/// Why a text was not handed to the parser (or the parse did not finish).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundError {
    #[error("the statement nests deeper than the gateway parses (more than {MAX_DEPTH} levels)")]
    TooDeep,
    #[error("the SQL parser could not get a thread for this deeply nested statement")]
    NoThread,
    #[error("the SQL parser failed on this input")]
    Panicked,
}

enum Placement {
    Inline,
    BigStack,
    Refused,
}

fn placement(sql: &str) -> Placement {
    // The estimate never exceeds the length: short texts, the hot path, are not scanned.
    if sql.len() <= INLINE_DEPTH as usize || ON_BIG_STACK.with(Cell::get) {
        return Placement::Inline;
    }
    match nesting_depth(sql.as_bytes(), MAX_DEPTH) {
        d if d <= INLINE_DEPTH => Placement::Inline,
        d if d <= MAX_DEPTH => Placement::BigStack,
        _ => Placement::Refused,
    }
}

/// Runs `parse(sql)` (anything that has libpg_query build a tree for `sql`, such as
/// `pg_query::parse`) where its stack use is bounded: on this thread for shallow texts, on a
/// [`BIG_STACK`] thread for deeper ones, not at all beyond [`MAX_DEPTH`]. Every parse of
/// client-supplied SQL goes through here (or through [`crate::classify`], which does).
pub fn bounded<T: Send>(sql: &str, parse: impl FnOnce(&str) -> T + Send) -> Result<T, BoundError> {
    match placement(sql) {
        Placement::Inline => Ok(parse(sql)),
        Placement::BigStack => on_big_stack(sql, parse),
        Placement::Refused => Err(BoundError::TooDeep),
    }
}

/// Called first by [`crate::classify`]: `None` when `sql` may be parsed on this thread,
/// otherwise the classification (`classify` run on a big stack, or unparsable when too deep).
pub(crate) fn guard(sql: &str, classify: fn(&str) -> Classification) -> Option<Classification> {
    let done = match placement(sql) {
        Placement::Inline => return None,
        Placement::BigStack => on_big_stack(sql, classify),
        Placement::Refused => Err(BoundError::TooDeep),
    };
    Some(done.unwrap_or_else(|e| Classification::Unparsable {
        error: e.to_string(),
    }))
}

fn on_big_stack<T: Send>(sql: &str, parse: impl FnOnce(&str) -> T + Send) -> Result<T, BoundError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("tollgate-classify".into())
            .stack_size(BIG_STACK)
            .spawn_scoped(scope, || {
                ON_BIG_STACK.with(|b| b.set(true));
                parse(sql)
            })
            .map_err(|_| BoundError::NoThread)?;
        handle.join().map_err(|_| BoundError::Panicked)
    })
}

/// One open bracket or `CASE`, and the chains inside it.
struct Frame {
    /// Depth at which this frame's content starts.
    base: u32,
    /// Levels of the expression chain being read (starts again at `,`, `AND`, ...).
    chain: u32,
    /// Levels of set operations and joins, which nest left-deep across `,` and `AND`.
    nested: u32,
    /// `BETWEEN`s still waiting for their `AND`.
    between: u32,
    case: bool,
}

impl Frame {
    fn depth(&self) -> u32 {
        self.base
            .saturating_add(self.chain)
            .saturating_add(self.nested)
    }
}

/// Upper bound of the nesting depth of the tree PostgreSQL would build for `sql` (if it
/// accepts it), in levels of roughly one expression node. Stops counting once the result is
/// known to exceed `stop_above`.
pub fn nesting_depth(sql: &[u8], stop_above: u32) -> u32 {
    let mut frames = vec![Frame {
        base: 0,
        chain: 0,
        nested: 0,
        between: 0,
        case: false,
    }];
    let mut max = 0u32;
    let mut i = 0;
    let n = sql.len();
    while i < n {
        let b = sql[i];
        let next = sql.get(i + 1).copied().unwrap_or(0);
        let mut levels = 1u32; // what this token adds to the current chain
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => {
                i += 1;
                continue;
            }
            b'-' if next == b'-' => {
                i = sql[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(n, |p| i + p + 1);
                continue;
            }
            b'/' if next == b'*' => {
                i = skip_block_comment(sql, i);
                continue;
            }
            b'\'' => i = skip_quoted(sql, i + 1, b'\'', false),
            b'"' => i = skip_quoted(sql, i + 1, b'"', false),
            b'e' | b'E' if next == b'\'' => i = skip_quoted(sql, i + 2, b'\'', true),
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == b'\'' => {
                i = skip_quoted(sql, i + 2, b'\'', false)
            }
            b'u' | b'U'
                if next == b'&' && matches!(sql.get(i + 2).copied(), Some(b'\'' | b'"')) =>
            {
                i = skip_quoted(sql, i + 3, sql[i + 2], false)
            }
            b'$' => i = skip_dollar(sql, i),
            b'0'..=b'9' => {
                i += 1;
                while i < n && (sql[i].is_ascii_alphanumeric() || matches!(sql[i], b'_' | b'.')) {
                    i += 1;
                }
            }
            b'.' if next.is_ascii_digit() => {
                i += 1;
                while i < n && (sql[i].is_ascii_alphanumeric() || matches!(sql[i], b'_' | b'.')) {
                    i += 1;
                }
            }
            b'.' => {
                // Qualified names and field selection are flat lists.
                i += 1;
                continue;
            }
            b'(' | b'[' => {
                let top = frames.last().expect("the outermost frame is never closed");
                let base = top.depth().saturating_add(1);
                frames.push(Frame {
                    base,
                    chain: 0,
                    nested: 0,
                    between: 0,
                    case: false,
                });
                max = max.max(base);
                i += 1;
                continue;
            }
            b')' | b']' => {
                // Closes the innermost bracket (and any CASE left open in it, which PostgreSQL
                // would reject anyway); the group then counts as one operand outside.
                while frames.len() > 1 {
                    if !frames.pop().expect("more than one frame").case {
                        break;
                    }
                }
                i += 1;
            }
            b',' | b';' => {
                let top = frames
                    .last_mut()
                    .expect("the outermost frame is never closed");
                top.chain = 0;
                top.between = 0;
                if b == b';' {
                    top.nested = 0;
                }
                i += 1;
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                i += 1;
                while i < n
                    && (sql[i].is_ascii_alphanumeric()
                        || matches!(sql[i], b'_' | b'$')
                        || sql[i] >= 0x80)
                {
                    i += 1;
                }
                let word = &sql[start..i];
                let top = frames
                    .last_mut()
                    .expect("the outermost frame is never closed");
                let is = |k: &str| word.eq_ignore_ascii_case(k.as_bytes());
                if is("and") && top.between > 0 {
                    top.between -= 1;
                } else if is("and") || is("or") {
                    // Flattened by the grammar: one boolean node above each operand, two when
                    // AND and OR alternate.
                    top.chain = 2;
                    continue;
                } else if is("when") || is("then") || is("else") {
                    top.chain = 1;
                    continue;
                } else if is("between") {
                    top.between += 1;
                } else if is("union") || is("intersect") || is("except") || is("join") {
                    top.nested = top.nested.saturating_add(1);
                    levels = 0;
                } else if is("case") {
                    let base = top.depth().saturating_add(1);
                    frames.push(Frame {
                        base,
                        chain: 0,
                        nested: 0,
                        between: 0,
                        case: true,
                    });
                    max = max.max(base);
                    continue;
                } else if is("end") && top.case && frames.len() > 1 {
                    frames.pop();
                }
            }
            // Operator characters (each counts: PostgreSQL may split a run into several
            // operators), `::`, and anything else that is not whitespace.
            _ => i += 1,
        }
        let top = frames
            .last_mut()
            .expect("the outermost frame is never closed");
        top.chain = top.chain.saturating_add(levels);
        max = max.max(top.depth());
        if max > stop_above {
            return max;
        }
    }
    max
}

/// Past a `/* ... */` comment starting at `at`; PostgreSQL's block comments nest.
fn skip_block_comment(sql: &[u8], at: usize) -> usize {
    let mut depth = 0usize;
    let mut i = at;
    while i < sql.len() {
        match (sql[i], sql.get(i + 1).copied()) {
            (b'/', Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            (b'*', Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    sql.len()
}

/// Past the closing `quote` of a literal whose content starts at `from`. A doubled quote is
/// part of the content (for bit and hex strings PostgreSQL reads it as the end of one literal
/// and the start of the next, which ends at the same place); with `backslash` (`E''`), a
/// backslash escapes the next byte.
fn skip_quoted(sql: &[u8], from: usize, quote: u8, backslash: bool) -> usize {
    let mut i = from;
    while i < sql.len() {
        let c = sql[i];
        if backslash && c == b'\\' {
            i += 2;
        } else if c == quote {
            if sql.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    sql.len()
}

/// Past a `$n` parameter, a `$tag$ ... $tag$` string, or a lone `$`, starting at `at`.
fn skip_dollar(sql: &[u8], at: usize) -> usize {
    let mut i = at + 1;
    if sql.get(i).is_some_and(u8::is_ascii_digit) {
        while sql.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        return i;
    }
    let tag_char = |c: u8, first: bool| {
        c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 || (!first && c.is_ascii_digit())
    };
    while i < sql.len() && tag_char(sql[i], i == at + 1) {
        i += 1;
    }
    if sql.get(i) != Some(&b'$') {
        return at + 1;
    }
    let tag = &sql[at..=i];
    let body = i + 1;
    match sql[body..].windows(tag.len()).position(|w| w == tag) {
        Some(p) => body + p + tag.len(),
        None => sql.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify;

    fn depth(sql: &str) -> u32 {
        nesting_depth(sql.as_bytes(), u32::MAX)
    }

    fn unparsable(c: &Classification) -> bool {
        matches!(c, Classification::Unparsable { .. })
    }

    /// Every construct that nests, 9,000 deep: refused before parsing, on a stack no bigger
    /// than a tokio worker's, and quickly.
    #[test]
    fn deep_nesting_is_unparsable_not_fatal() {
        let n = 9000;
        let texts = [
            format!("select {} true", "not ".repeat(n)),
            format!("select {}1{}", "(".repeat(n), ")".repeat(n)),
            format!("select {}a", "- ".repeat(n)),
            format!("select {}a", "~".repeat(n)),
            format!("select 1{}", "+1".repeat(n)),
            format!("select 'a'{}", "||'a'".repeat(n)),
            format!("select 1{}", "::int".repeat(n)),
            format!("select {}1{}", "array[".repeat(n), "]".repeat(n)),
            format!("select {}1{}", "f(".repeat(n), ")".repeat(n)),
            format!("select {}1{}", "(select ".repeat(n), ")".repeat(n)),
            format!(
                "select {}1{}",
                "case when true then ".repeat(n),
                " end".repeat(n)
            ),
            format!("select 1{}", " between 1 and 1".repeat(n)),
            format!("select a{}", " is null".repeat(n)),
            format!("select 1, 2{}", " union select 1, 2".repeat(n)),
            format!("select 1 and 1{}", " union select 1 and 1".repeat(n)),
            format!("select * from a{}", " join a on true and true".repeat(n)),
        ];
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                for sql in &texts {
                    let c = classify(sql);
                    assert!(unparsable(&c), "{}: {c:?}", &sql[..60]);
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Large but flat texts still classify, and stay on the caller's stack.
    #[test]
    fn large_flat_texts_classify() {
        let n = 5000;
        let list = (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let ors = (0..n)
            .map(|i| format!("a = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let ands = (0..n)
            .map(|i| format!("a <> {i}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let rows = (0..n)
            .map(|i| format!("({i}, 'x{i}', now())"))
            .collect::<Vec<_>>()
            .join(", ");
        let whens = (0..n)
            .map(|i| format!("WHEN a = {i} THEN 'v{i}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let betweens = (0..n)
            .map(|i| format!("a BETWEEN {i} AND {}", i + 1))
            .collect::<Vec<_>>()
            .join(" OR ");
        let texts = [
            format!("SELECT * FROM t WHERE a IN ({list})"),
            format!("SELECT * FROM t WHERE {ors}"),
            format!("DELETE FROM t WHERE {ands}"),
            format!("INSERT INTO t (a, b, c) VALUES {rows}"),
            format!("SELECT CASE {whens} ELSE 'none' END FROM t"),
            format!("SELECT * FROM t WHERE {betweens}"),
            format!("SELECT {list}"),
        ];
        for sql in &texts {
            assert!(depth(sql) <= INLINE_DEPTH, "{} {}", depth(sql), &sql[..60]);
            assert!(
                matches!(classify(sql), Classification::Statements(s) if s.len() == 1),
                "{}",
                &sql[..60]
            );
        }
    }

    #[test]
    fn quotes_and_comments_hide_their_content() {
        let base = depth("select 1");
        let deep = "(".repeat(500);
        for sql in [
            format!("select '{deep}'"),
            format!("select 'it''s {deep}'"),
            format!("select E'\\' {deep}'"),
            format!("select e'\\\\''{deep}'"),
            format!("select $${deep}$$"),
            format!("select $a$ $$ {deep} $a$"),
            format!("select \"{deep}\""),
            format!("select U&\"{deep}\""),
            format!("select 1 -- {deep}"),
            format!("select 1 /* {deep} /* */ {deep} */"),
            format!("select X'{deep}'"),
        ] {
            assert_eq!(depth(&sql), base, "{sql}");
        }
        // Not a string: the content counts.
        assert!(depth(&format!("select a$$ {deep}")) > 500);
        assert!(depth(&format!("select 1 -/**/- {deep}")) > 500);
        // An E'' string read as a standard one would end early and hide what follows.
        assert!(depth(&format!("select E'\\' , {deep} --'")) < 10);
        assert!(depth(&format!("select '\\' , {deep} --'")) >= 500);
    }

    #[test]
    fn estimate_stays_below_length() {
        for sql in [
            "",
            "(",
            "((((",
            "not not",
            "a+-b",
            "case case case",
            "select $1::int[]",
        ] {
            assert!(depth(sql) as usize <= sql.len(), "{sql}");
        }
    }

    /// Other parses of client text get the same bounds.
    #[test]
    fn bounded_parses_refuse_what_classify_refuses() {
        let deep = format!("copy (select {} true) to stdout", "not ".repeat(9000));
        let shallow = format!(
            "copy (select {}1{}) to stdout",
            "(".repeat(300),
            ")".repeat(300)
        );
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                assert_eq!(
                    bounded(&deep, |s| pg_query::parse(s).is_ok()),
                    Err(BoundError::TooDeep)
                );
                assert_eq!(bounded(&shallow, |s| pg_query::parse(s).is_ok()), Ok(true));
                assert_eq!(bounded("select 1", |s| s.len()), Ok(8));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Texts estimated between the two limits are parsed on a big stack, with the right answer.
    #[test]
    fn moderately_deep_texts_parse_on_a_big_stack() {
        let sql = format!("SELECT {}1{} FROM t", "(".repeat(300), ")".repeat(300));
        assert!((INLINE_DEPTH..=MAX_DEPTH).contains(&depth(&sql)));
        let c = classify(&sql);
        assert!(
            matches!(&c, Classification::Statements(s) if s[0].tables == ["t"]),
            "{c:?}"
        );
    }
}
