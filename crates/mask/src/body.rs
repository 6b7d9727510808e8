//! Masking HTTP bodies as they stream through, chunk by chunk, in bounded memory.
//!
//! A [`BodyPlan`] holds what a resource's rules mask in a body for one viewer: the JSON paths
//! (`json_paths`, each with its rule's strategy) and the content detectors. Column and type
//! rules have no meaning in a body and are left out; a rule's `columns` do not scope its paths.
//! A [`BodyMasker`] then rewrites one body:
//!
//! - JSON: a push tokenizer over bytes. Untouched bytes (structure, whitespace, clean strings)
//!   pass through verbatim; only masked scalars are rewritten. It holds the path stack (at most
//!   [`MAX_DEPTH`] levels, keys of at most [`MAX_KEY`] bytes, kept only when paths need them)
//!   and the scalar being read (at most [`MAX_SCALAR`] bytes); anything beyond is an error, as
//!   is JSON that is invalid or ends early: the caller must not forward the rest unmasked.
//! - Text: detector matches are masked; a match may straddle chunks, so the masker holds back
//!   the last incomplete line (see [`TEXT_LINE_HOLD`], [`TEXT_TAIL`], [`TEXT_MAX_HOLD`]).
//!
//! Errors and the [`BodySummary`] name positions, limits, rules and detectors, never content.

use crate::detect::{first_match, matches, DetectorSet, Match};
use crate::json_path::{JsonPath, PathSeg};
use crate::policy::{Policy, Reason};
use crate::strategy::{write_mask, MaskKey, Strategy, REDACTED};
use std::sync::Arc;

/// Deepest nesting of JSON objects and arrays accepted.
pub const MAX_DEPTH: usize = 128;
/// Longest JSON string or number accepted (raw bytes, escapes included).
pub const MAX_SCALAR: usize = 8 << 20;
/// Longest object key accepted while JSON paths need the keys (they are held on the path stack).
pub const MAX_KEY: usize = 64 << 10;
/// Text: a line shorter than this is held until its newline (no detector but PEM matches
/// across a newline), so that no match is cut.
pub const TEXT_LINE_HOLD: usize = 64 << 10;
/// Text: past [`TEXT_LINE_HOLD`] without a newline, the masker cuts at whitespace and keeps at
/// least this tail, longer than any match that can hold whitespace (e-mail, card, phone, IBAN).
pub const TEXT_TAIL: usize = 1 << 10;
/// Text: most held back at once, for a whitespace-free run or a PEM key without its END line
/// yet; past it the held part is masked as it stands and flushed.
pub const TEXT_MAX_HOLD: usize = 1 << 20;

/// Holding more of the leading whitespace than this, [`BodyKind::Sniff`] decides for text.
const SNIFF_HOLD: usize = 4 << 10;
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What masks apply to bodies for one viewer; cheap to clone.
#[derive(Clone, Debug)]
pub struct BodyPlan(Arc<PlanInner>);

#[derive(Debug)]
struct PlanInner {
    detectors: DetectorSet,
    strategies: [Strategy; 11],
    /// Path, strategy, rule index (configuration order: the first match wins).
    paths: Vec<(JsonPath, Strategy, usize)>,
    /// `path_depths[n]`: some path can select a value `n` levels deep.
    path_depths: Vec<bool>,
    key: Option<Arc<MaskKey>>,
}

impl Policy {
    /// What masks apply to a body for a viewer in `groups` (rules whose except/only groups
    /// exclude the viewer are dropped). When several rules name a detector, the first wins.
    pub fn body_plan(&self, groups: &[String]) -> BodyPlan {
        let mut inner = PlanInner {
            detectors: DetectorSet::EMPTY,
            strategies: [Strategy::Redact; 11],
            paths: Vec::new(),
            path_depths: vec![false; MAX_DEPTH + 1],
            key: self.key().cloned(),
        };
        for (idx, rule) in self.rules().iter().enumerate() {
            if !rule.applies_to(groups) {
                continue;
            }
            for path in &rule.json_paths {
                inner.paths.push((path.clone(), rule.strategy, idx));
                let (min, fixed) = path.depth();
                for (n, d) in inner.path_depths.iter_mut().enumerate() {
                    *d |= n == min || (!fixed && n > min);
                }
            }
            for d in rule.detectors.iter() {
                if !inner.detectors.contains(d) {
                    inner.detectors.insert(d);
                    inner.strategies[d as usize] = rule.strategy;
                }
            }
        }
        BodyPlan(Arc::new(inner))
    }
}

impl BodyPlan {
    /// A plan that masks nothing.
    pub fn passthrough() -> BodyPlan {
        BodyPlan(Arc::new(PlanInner {
            detectors: DetectorSet::EMPTY,
            strategies: [Strategy::Redact; 11],
            paths: Vec::new(),
            path_depths: Vec::new(),
            key: None,
        }))
    }

    /// The same plan without its JSON paths: detectors only, for parts of a document the
    /// paths were not written against (an MCP message's envelope, around the tool result).
    pub fn detectors_only(&self) -> BodyPlan {
        BodyPlan(Arc::new(PlanInner {
            detectors: self.0.detectors,
            strategies: self.0.strategies,
            paths: Vec::new(),
            path_depths: Vec::new(),
            key: self.0.key.clone(),
        }))
    }

    /// False when nothing in any body can be masked: the caller may forward bodies untouched.
    pub fn is_active(&self) -> bool {
        !self.0.detectors.is_empty() || !self.0.paths.is_empty()
    }
}

/// How to read a body (from its Content-Type, or [`BodyKind::Sniff`] when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Text,
    /// JSON when the first non-whitespace byte (after an optional UTF-8 BOM) is `{`, `[` or
    /// `"`; text otherwise.
    Sniff,
}

impl BodyKind {
    /// The kind for a `Content-Type` header value: JSON for `application/json` and any
    /// `+json` type, [`BodyKind::Sniff`] when there is none, text otherwise (detectors work on
    /// bytes, so any other type is scanned as it is; decoding `Content-Encoding` is the
    /// caller's). NDJSON is text: its detectors apply, its paths do not.
    pub fn for_content_type(content_type: Option<&str>) -> BodyKind {
        let Some(ct) = content_type else {
            return BodyKind::Sniff;
        };
        let essence = ct.split(';').next().unwrap_or("").trim();
        let Some((_, subtype)) = essence.split_once('/') else {
            return BodyKind::Sniff;
        };
        let json = subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5
                && subtype.as_bytes()[subtype.len() - 5..].eq_ignore_ascii_case(b"+json");
        if json {
            BodyKind::Json
        } else {
            BodyKind::Text
        }
    }
}

/// What masking one body did, for the audit event: counts and causes, never values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodySummary {
    /// Values (JSON scalars, selected containers, text matches) replaced.
    pub masked_values: u64,
    /// Each cause once, in the order first seen: `Reason::Detector` for a detector match,
    /// `Reason::Column { rule }` for a value selected by that rule's JSON path.
    pub reasons: Vec<Reason>,
    /// Whether the body was read as JSON (false for text, and for a passthrough plan).
    pub json: bool,
}

impl BodySummary {
    fn record(&mut self, reason: Reason) {
        self.masked_values += 1;
        if !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
    }
}

/// Why a body could not be masked. The messages give byte offsets and limits, never content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("response body is not valid JSON (at byte {at})")]
    InvalidJson { at: u64 },
    #[error("response body ends inside a JSON value (after {at} bytes)")]
    Truncated { at: u64 },
    #[error("response body nests JSON deeper than {limit} levels (at byte {at})")]
    TooDeep { at: u64, limit: usize },
    #[error(
        "response body has a JSON string, number or key longer than {limit} bytes (at byte {at})"
    )]
    TooLong { at: u64, limit: usize },
    #[error("response body masker was used after it finished")]
    Finished,
}

/// Masks one body, fed in chunks; see the module documentation.
pub struct BodyMasker {
    plan: BodyPlan,
    state: State,
    summary: BodySummary,
    failed: Option<BodyError>,
}

enum State {
    Pass,
    Sniff(Vec<u8>),
    Json(Box<JsonMasker>),
    Text(TextMasker),
    Done,
}

impl BodyMasker {
    pub fn new(plan: &BodyPlan, kind: BodyKind) -> BodyMasker {
        let state = match kind {
            _ if !plan.is_active() => State::Pass,
            BodyKind::Json => State::Json(Box::new(JsonMasker::new())),
            BodyKind::Text if plan.0.detectors.is_empty() => State::Pass,
            BodyKind::Text => State::Text(TextMasker::default()),
            BodyKind::Sniff => State::Sniff(Vec::new()),
        };
        BodyMasker {
            plan: plan.clone(),
            state,
            summary: BodySummary::default(),
            failed: None,
        }
    }

    /// Masks what it can of `chunk` and appends it to `out`; holds back only an incomplete
    /// scalar (JSON) or line (text). After an error every call returns that error.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BodyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.feed_inner(chunk, out);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn feed_inner(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BodyError> {
        let plan = &*self.plan.0;
        match &mut self.state {
            State::Pass => out.extend_from_slice(chunk),
            State::Json(j) => j.feed(plan, chunk, out, &mut self.summary)?,
            State::Text(t) => t.feed(plan, chunk, out, &mut self.summary),
            State::Done => return Err(BodyError::Finished),
            State::Sniff(held) => {
                held.extend_from_slice(chunk);
                let Some(json) = sniff(held) else {
                    return Ok(());
                };
                let held = std::mem::take(held);
                self.state = if json {
                    self.summary.json = true;
                    State::Json(Box::new(JsonMasker::new()))
                } else if plan.detectors.is_empty() {
                    State::Pass
                } else {
                    State::Text(TextMasker::default())
                };
                return self.feed_inner(&held, out);
            }
        }
        Ok(())
    }

    /// End of the body: flushes what was held. JSON that is incomplete is an error (the caller
    /// aborts the response rather than pass unmasked data); an empty body is not.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<BodySummary, BodyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let plan = &*self.plan.0;
        let r = match std::mem::replace(&mut self.state, State::Done) {
            State::Pass => Ok(()),
            State::Json(mut j) => j.finish(plan, out, &mut self.summary),
            State::Text(mut t) => {
                t.finish(plan, out, &mut self.summary);
                Ok(())
            }
            State::Sniff(held) => {
                // Whitespace alone (or nothing): nothing to mask.
                out.extend_from_slice(&held);
                Ok(())
            }
            State::Done => Err(BodyError::Finished),
        };
        match r {
            Ok(()) => Ok(std::mem::take(&mut self.summary)),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Bytes of buffer the masker holds allocated (capacity): what a body costs in memory.
    pub fn buffer_capacity(&self) -> usize {
        match &self.state {
            State::Sniff(h) => h.capacity(),
            State::Json(j) => j.buffer_capacity(),
            State::Text(t) => t.pending.capacity() + t.scratch.capacity(),
            State::Pass | State::Done => 0,
        }
    }
}

/// `Some(true)` for JSON, `Some(false)` for text, `None` while only whitespace (or part of a
/// BOM) has arrived.
fn sniff(held: &[u8]) -> Option<bool> {
    if held.len() < BOM.len() && BOM.starts_with(held) {
        return None;
    }
    let rest = held.strip_prefix(BOM).unwrap_or(held);
    match rest.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b) => Some(matches!(b, b'{' | b'[' | b'"')),
        None if held.len() > SNIFF_HOLD => Some(false),
        None => None,
    }
}

// ------------------------------------------------------------------------------------- text

#[derive(Default)]
struct TextMasker {
    pending: Vec<u8>,
    scratch: Vec<Match>,
}

impl TextMasker {
    fn feed(&mut self, plan: &PlanInner, chunk: &[u8], out: &mut Vec<u8>, s: &mut BodySummary) {
        self.pending.extend_from_slice(chunk);
        // Only a newline or a long held part can let anything go: skip the scan until then.
        if !chunk.contains(&b'\n') && self.pending.len() <= TEXT_LINE_HOLD {
            return;
        }
        self.scratch.clear();
        self.scratch.extend(matches(plan.detectors, &self.pending));
        let cut = text_cut(&self.pending, &self.scratch);
        write_text(plan, &self.pending[..cut], &self.scratch, out, s);
        self.pending.drain(..cut);
        if self.pending.capacity() > 2 * TEXT_LINE_HOLD.max(self.pending.len()) {
            self.pending.shrink_to(TEXT_LINE_HOLD);
        }
    }

    fn finish(&mut self, plan: &PlanInner, out: &mut Vec<u8>, s: &mut BodySummary) {
        self.scratch.clear();
        self.scratch.extend(matches(plan.detectors, &self.pending));
        write_text(plan, &self.pending, &self.scratch, out, s);
        self.pending.clear();
    }
}

/// Where the held text can be cut: no match found in `t` crosses the cut, and none can start
/// before it and continue past the end of `t` (see the bounds on the constants).
fn text_cut(t: &[u8], found: &[Match]) -> usize {
    // The match that starts before `p` and ends after it, or reaches the end of `t` (it may
    // go on: a PEM key without its END line yet). Matches are in order and do not overlap.
    let crosses = |p: usize| {
        let k = found.partition_point(|m| m.range.start < p);
        found[..k]
            .last()
            .filter(|m| m.range.end > p || m.range.end == t.len())
    };
    let mut cut = t.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    // A PEM key spans lines: hold it from its start (matches do not overlap, one adjustment).
    if let Some(m) = crosses(cut) {
        cut = m.range.start;
    }
    if t.len() - cut <= TEXT_LINE_HOLD {
        return cut;
    }
    // A long line: cut at whitespace, keeping a tail no whitespace-holding match outgrows.
    let limit = t.len() - TEXT_TAIL;
    let mut before = limit;
    while let Some(w) = t[cut..before].iter().rposition(|b| b.is_ascii_whitespace()) {
        let p = cut + w + 1;
        match crosses(p) {
            Some(m) => before = m.range.start.max(cut),
            None => return p,
        }
    }
    if t.len() - cut <= TEXT_MAX_HOLD {
        return cut;
    }
    // Past the hard bound: flush, masking whole any match that crosses the cut.
    match crosses(limit) {
        Some(m) => m.range.end,
        None => limit,
    }
}

/// Writes `t` with the matches of `found` that lie inside it masked.
fn write_text(plan: &PlanInner, t: &[u8], found: &[Match], out: &mut Vec<u8>, s: &mut BodySummary) {
    let mut last = 0;
    for m in found.iter().take_while(|m| m.range.end <= t.len()) {
        out.extend_from_slice(&t[last..m.range.start]);
        let strategy = plan.strategies[m.detector as usize];
        write_mask(
            strategy,
            Some(m.detector),
            &t[m.range.clone()],
            plan.key.as_deref(),
            out,
        );
        s.record(Reason::Detector(m.detector));
        last = m.range.end;
    }
    out.extend_from_slice(&t[last..]);
}

// ------------------------------------------------------------------------------------- JSON

/// A value selected by a JSON path: the strategy and the rule.
#[derive(Debug, Clone, Copy)]
struct Selected {
    strategy: Strategy,
    rule: usize,
    /// Selected by a path itself, not as part of a selected object or array.
    direct: bool,
}

enum Seg {
    Key(String),
    Index(usize),
    /// Keys are not kept when no path needs them.
    Unnamed,
}

struct Frame {
    object: bool,
    seg: Seg,
    /// Set when this object or array is (inside) a selected value.
    selected: Option<Selected>,
}

impl Frame {
    fn path_seg(&self) -> PathSeg<'_> {
        match &self.seg {
            Seg::Key(k) => PathSeg::Key(k),
            Seg::Index(n) => PathSeg::Index(*n),
            Seg::Unnamed => PathSeg::Key(""),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (top level, after `:`, after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object.
    Key,
    Colon,
    CommaOrClose,
    /// The top-level value is complete: whitespace only.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    /// Hex digits of a `\u` escape still expected.
    Hex(u8),
}

enum Lex {
    Between,
    /// Inside a string; `hold`: buffered in `scalar` (else passed through as read).
    Str {
        key: bool,
        hold: bool,
        esc: Esc,
        sel: Option<Selected>,
    },
    Num {
        sel: Option<Selected>,
    },
    Lit {
        word: &'static [u8],
        pos: usize,
        sel: Option<Selected>,
    },
}

struct JsonMasker {
    frames: Vec<Frame>,
    expect: Expect,
    lex: Lex,
    /// Raw bytes (escapes as written, no quotes) of the held string, key or number.
    scalar: Vec<u8>,
    decoded: Vec<u8>,
    masked: Vec<u8>,
    /// Output is dropped while `frames.len() >= suppress` (a container that became `null`).
    suppress: usize,
    /// Bytes consumed so far, for error positions.
    offset: u64,
    /// BOM bytes seen at the start.
    bom: usize,
    started: bool,
}

impl JsonMasker {
    fn new() -> JsonMasker {
        JsonMasker {
            frames: Vec::new(),
            expect: Expect::Value,
            lex: Lex::Between,
            scalar: Vec::new(),
            decoded: Vec::new(),
            masked: Vec::new(),
            suppress: usize::MAX,
            offset: 0,
            bom: 0,
            started: false,
        }
    }

    fn buffer_capacity(&self) -> usize {
        let keys: usize = self
            .frames
            .iter()
            .map(|f| match &f.seg {
                Seg::Key(k) => k.capacity(),
                _ => 0,
            })
            .sum();
        self.scalar.capacity()
            + self.decoded.capacity()
            + self.masked.capacity()
            + self.frames.capacity() * std::mem::size_of::<Frame>()
            + keys
    }

    fn emitting(&self) -> bool {
        self.frames.len() < self.suppress
    }

    fn put(&self, out: &mut Vec<u8>, bytes: &[u8]) {
        if self.emitting() {
            out.extend_from_slice(bytes);
        }
    }

    fn invalid(&self, i: usize) -> BodyError {
        BodyError::InvalidJson {
            at: self.offset + i as u64,
        }
    }

    fn feed(
        &mut self,
        plan: &PlanInner,
        chunk: &[u8],
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) -> Result<(), BodyError> {
        s.json = true;
        let mut i = 0;
        while i < chunk.len() {
            i = match self.lex {
                Lex::Str { .. } => self.string_bytes(plan, chunk, i, out, s)?,
                Lex::Num { sel } => {
                    let run = chunk[i..]
                        .iter()
                        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                        .unwrap_or(chunk.len() - i);
                    self.hold(&chunk[i..i + run], MAX_SCALAR, i)?;
                    if i + run < chunk.len() {
                        self.end_number(plan, sel, out, s, i + run)?;
                    }
                    i + run
                }
                Lex::Lit { word, pos, sel } => {
                    if chunk[i] != word[pos] {
                        return Err(self.invalid(i));
                    }
                    if pos + 1 == word.len() {
                        self.lex = Lex::Between;
                        self.literal(plan, word, sel, out, s);
                        self.after_value();
                    } else {
                        self.lex = Lex::Lit {
                            word,
                            pos: pos + 1,
                            sel,
                        };
                    }
                    i + 1
                }
                Lex::Between => self.structural(plan, chunk, i, out, s)?,
            };
        }
        self.offset += chunk.len() as u64;
        Ok(())
    }

    fn finish(
        &mut self,
        plan: &PlanInner,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) -> Result<(), BodyError> {
        s.json = true;
        if let Lex::Num { sel } = self.lex {
            if self.frames.is_empty() {
                self.end_number(plan, sel, out, s, 0)?;
            }
        }
        let truncated = BodyError::Truncated { at: self.offset };
        match (&self.lex, self.expect) {
            (Lex::Between, Expect::Done) => Ok(()),
            // Nothing but whitespace (or nothing at all): no JSON, nothing to hide.
            (Lex::Between, Expect::Value) if !self.started => Ok(()),
            _ => Err(truncated),
        }
    }

    /// Appends raw scalar bytes, within `limit`.
    fn hold(&mut self, bytes: &[u8], limit: usize, i: usize) -> Result<(), BodyError> {
        if self.scalar.len() + bytes.len() > limit {
            return Err(BodyError::TooLong {
                at: self.offset + i as u64,
                limit,
            });
        }
        self.scalar.extend_from_slice(bytes);
        Ok(())
    }

    /// Bytes between tokens; returns where to continue.
    fn structural(
        &mut self,
        plan: &PlanInner,
        chunk: &[u8],
        i: usize,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) -> Result<usize, BodyError> {
        let b = chunk[i];
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            let run = chunk[i..]
                .iter()
                .position(|&c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(chunk.len() - i);
            self.put(out, &chunk[i..i + run]);
            return Ok(i + run);
        }
        let at = self.offset + i as u64;
        if !self.started && at == self.bom as u64 && self.bom < 3 && b == BOM[self.bom] {
            self.bom += 1;
            out.push(b);
            return Ok(i + 1);
        }
        if matches!(self.bom, 1 | 2) {
            return Err(self.invalid(i));
        }
        match (self.expect, b) {
            (Expect::Value | Expect::ValueOrClose, _) if b != b']' => {
                self.value_start(plan, b, i, out, s)?
            }
            (Expect::ValueOrClose | Expect::CommaOrClose, b']')
                if self.frames.last().is_some_and(|f| !f.object) =>
            {
                self.close(out)
            }
            (Expect::KeyOrClose | Expect::CommaOrClose, b'}')
                if self.frames.last().is_some_and(|f| f.object) =>
            {
                self.close(out)
            }
            (Expect::KeyOrClose | Expect::Key, b'"') => {
                self.put(out, b"\"");
                self.scalar.clear();
                self.lex = Lex::Str {
                    key: true,
                    hold: !plan.paths.is_empty(),
                    esc: Esc::None,
                    sel: None,
                };
            }
            (Expect::Colon, b':') => {
                self.put(out, b":");
                self.expect = Expect::Value;
            }
            (Expect::CommaOrClose, b',') => {
                self.put(out, b",");
                let top = self.frames.last_mut().expect("inside a container");
                if top.object {
                    self.expect = Expect::Key;
                } else {
                    if let Seg::Index(n) = &mut top.seg {
                        *n += 1;
                    }
                    self.expect = Expect::Value;
                }
            }
            _ => return Err(self.invalid(i)),
        }
        Ok(i + 1)
    }

    /// The first byte of a value.
    fn value_start(
        &mut self,
        plan: &PlanInner,
        b: u8,
        i: usize,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) -> Result<(), BodyError> {
        self.started = true;
        let sel = self.selection(plan);
        match b {
            b'"' => {
                let hold = sel.is_some() || !plan.detectors.is_empty();
                if !hold {
                    self.put(out, b"\"");
                }
                self.scalar.clear();
                self.lex = Lex::Str {
                    key: false,
                    hold,
                    esc: Esc::None,
                    sel,
                };
            }
            b'{' | b'[' => {
                if self.frames.len() >= MAX_DEPTH {
                    return Err(BodyError::TooDeep {
                        at: self.offset + i as u64,
                        limit: MAX_DEPTH,
                    });
                }
                let object = b == b'{';
                match sel {
                    // The whole container becomes `null`: one masked value.
                    Some(sel) if sel.strategy == Strategy::Null && self.emitting() => {
                        out.extend_from_slice(b"null");
                        s.record(Reason::Column { rule: sel.rule });
                        self.suppress = self.frames.len() + 1;
                    }
                    _ => self.put(out, &[b]),
                }
                self.frames.push(Frame {
                    object,
                    seg: if object { Seg::Unnamed } else { Seg::Index(0) },
                    selected: sel.map(|s| Selected { direct: false, ..s }),
                });
                self.expect = if object {
                    Expect::KeyOrClose
                } else {
                    Expect::ValueOrClose
                };
            }
            b'-' | b'0'..=b'9' => {
                self.scalar.clear();
                self.scalar.push(b);
                self.lex = Lex::Num { sel };
            }
            b't' => {
                self.lex = Lex::Lit {
                    word: b"true",
                    pos: 1,
                    sel,
                }
            }
            b'f' => {
                self.lex = Lex::Lit {
                    word: b"false",
                    pos: 1,
                    sel,
                }
            }
            b'n' => {
                self.lex = Lex::Lit {
                    word: b"null",
                    pos: 1,
                    sel,
                }
            }
            _ => return Err(self.invalid(i)),
        }
        Ok(())
    }

    /// The path rule (if any) selecting the value that starts now.
    fn selection(&self, plan: &PlanInner) -> Option<Selected> {
        if let Some(sel) = self.frames.last().and_then(|f| f.selected) {
            return Some(sel);
        }
        if plan.paths.is_empty() {
            return None;
        }
        let depth = self.frames.len();
        if !plan.path_depths.get(depth).is_some_and(|&d| d) {
            return None;
        }
        let seg = Frame::path_seg;
        // On the stack for the usual depths: this runs for every value.
        let mut short = [PathSeg::Index(0); 16];
        let long: Vec<PathSeg<'_>>;
        let path: &[PathSeg<'_>] = if depth <= short.len() {
            for (slot, f) in short.iter_mut().zip(&self.frames) {
                *slot = seg(f);
            }
            &short[..depth]
        } else {
            long = self.frames.iter().map(seg).collect();
            &long
        };
        plan.paths
            .iter()
            .find(|(p, _, _)| p.matches(path))
            .map(|&(_, strategy, rule)| Selected {
                strategy,
                rule,
                direct: true,
            })
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        let was_emitting = self.emitting();
        let frame = self.frames.pop().expect("inside a container");
        if was_emitting {
            out.push(if frame.object { b'}' } else { b']' });
        }
        if self.frames.len() < self.suppress && self.suppress != usize::MAX {
            self.suppress = usize::MAX;
        }
        self.after_value();
    }

    fn after_value(&mut self) {
        self.expect = if self.frames.is_empty() {
            Expect::Done
        } else {
            Expect::CommaOrClose
        };
    }

    /// Inside a string: consumes up to its closing quote; returns where to continue.
    fn string_bytes(
        &mut self,
        plan: &PlanInner,
        chunk: &[u8],
        mut i: usize,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) -> Result<usize, BodyError> {
        let Lex::Str {
            key,
            hold,
            mut esc,
            sel,
        } = self.lex
        else {
            unreachable!("called inside a string")
        };
        let limit = if key { MAX_KEY } else { MAX_SCALAR };
        let start = i;
        while i < chunk.len() {
            let b = chunk[i];
            match esc {
                Esc::None => {
                    let run = chunk[i..]
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                        .unwrap_or(chunk.len() - i);
                    i += run;
                    if i == chunk.len() {
                        break;
                    }
                    match chunk[i] {
                        b'\\' => esc = Esc::Backslash,
                        b'"' => {
                            self.string_run(hold, limit, &chunk[start..i], start, out)?;
                            self.lex = Lex::Between;
                            self.end_string(plan, key, hold, sel, out, s);
                            return Ok(i + 1);
                        }
                        _ => return Err(self.invalid(i)),
                    }
                }
                Esc::Backslash => {
                    esc = match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Esc::None,
                        b'u' => Esc::Hex(4),
                        _ => return Err(self.invalid(i)),
                    }
                }
                Esc::Hex(n) => {
                    if !b.is_ascii_hexdigit() {
                        return Err(self.invalid(i));
                    }
                    esc = if n == 1 { Esc::None } else { Esc::Hex(n - 1) };
                }
            }
            i += 1;
        }
        self.string_run(hold, limit, &chunk[start..i], start, out)?;
        self.lex = Lex::Str {
            key,
            hold,
            esc,
            sel,
        };
        Ok(i)
    }

    fn string_run(
        &mut self,
        hold: bool,
        limit: usize,
        run: &[u8],
        i: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BodyError> {
        if hold {
            self.hold(run, limit, i)
        } else {
            self.put(out, run);
            Ok(())
        }
    }

    fn end_string(
        &mut self,
        plan: &PlanInner,
        key: bool,
        hold: bool,
        sel: Option<Selected>,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) {
        if key {
            if hold {
                self.put(out, &self.scalar);
                let raw: &[u8] = if self.scalar.contains(&b'\\') {
                    decode(&self.scalar, &mut self.decoded);
                    &self.decoded
                } else {
                    &self.scalar
                };
                let name = String::from_utf8_lossy(raw);
                let top = self.frames.last_mut().expect("key inside an object");
                match &mut top.seg {
                    Seg::Key(k) => {
                        k.clear();
                        k.push_str(&name);
                    }
                    seg => *seg = Seg::Key(name.into_owned()),
                }
            }
            self.put(out, b"\"");
            self.expect = Expect::Colon;
            return;
        }
        self.after_value();
        if !hold {
            self.put(out, b"\"");
            return;
        }
        if !self.emitting() {
            return;
        }
        let key_ref = plan.key.as_deref();
        if let Some(sel) = sel {
            s.record(Reason::Column { rule: sel.rule });
            if sel.strategy == Strategy::Null {
                out.extend_from_slice(b"null");
                return;
            }
            decode(&self.scalar, &mut self.decoded);
            self.masked.clear();
            write_mask(sel.strategy, None, &self.decoded, key_ref, &mut self.masked);
            write_json_string(&self.masked, out);
            return;
        }
        let text: &[u8] = if self.scalar.contains(&b'\\') {
            decode(&self.scalar, &mut self.decoded);
            &self.decoded
        } else {
            &self.scalar
        };
        let mut last = 0;
        let mut any = false;
        self.masked.clear();
        for m in matches(plan.detectors, text) {
            any = true;
            self.masked.extend_from_slice(&text[last..m.range.start]);
            let strategy = plan.strategies[m.detector as usize];
            write_mask(
                strategy,
                Some(m.detector),
                &text[m.range.clone()],
                key_ref,
                &mut self.masked,
            );
            s.record(Reason::Detector(m.detector));
            last = m.range.end;
        }
        if !any {
            out.push(b'"');
            out.extend_from_slice(&self.scalar);
            out.push(b'"');
            return;
        }
        self.masked.extend_from_slice(&text[last..]);
        write_json_string(&self.masked, out);
    }

    /// A number ended (at byte `i` of the chunk, for error positions).
    fn end_number(
        &mut self,
        plan: &PlanInner,
        sel: Option<Selected>,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
        i: usize,
    ) -> Result<(), BodyError> {
        self.lex = Lex::Between;
        if !valid_number(&self.scalar) {
            return Err(self.invalid(i));
        }
        self.after_value();
        if !self.emitting() {
            return Ok(());
        }
        let key_ref = plan.key.as_deref();
        let (strategy, detector, reason) = if let Some(sel) = sel {
            (sel.strategy, None, Reason::Column { rule: sel.rule })
        } else if let Some(m) = first_match(plan.detectors, &self.scalar) {
            (
                plan.strategies[m.detector as usize],
                Some(m.detector),
                Reason::Detector(m.detector),
            )
        } else {
            out.extend_from_slice(&self.scalar);
            return Ok(());
        };
        s.record(reason);
        self.masked.clear();
        match (strategy, detector) {
            (Strategy::Null, _) => {
                out.extend_from_slice(b"null");
                return Ok(());
            }
            (_, Some(d)) => write_mask(strategy, Some(d), &self.scalar, key_ref, &mut self.masked),
            (Strategy::Hash, None) => {
                write_mask(strategy, None, &self.scalar, key_ref, &mut self.masked)
            }
            (_, None) => self.masked.extend_from_slice(REDACTED),
        }
        write_json_string(&self.masked, out);
        Ok(())
    }

    /// `true`, `false` or `null` read: kept, unless a path selected it directly.
    fn literal(
        &mut self,
        plan: &PlanInner,
        word: &'static [u8],
        sel: Option<Selected>,
        out: &mut Vec<u8>,
        s: &mut BodySummary,
    ) {
        if !self.emitting() {
            return;
        }
        match sel {
            Some(sel) if sel.direct && word != b"null" => {
                s.record(Reason::Column { rule: sel.rule });
                match sel.strategy {
                    Strategy::Null => out.extend_from_slice(b"null"),
                    strategy => {
                        self.masked.clear();
                        match strategy {
                            Strategy::Hash => write_mask(
                                strategy,
                                None,
                                word,
                                plan.key.as_deref(),
                                &mut self.masked,
                            ),
                            _ => self.masked.extend_from_slice(REDACTED),
                        }
                        write_json_string(&self.masked, out);
                    }
                }
            }
            _ => out.extend_from_slice(word),
        }
    }
}

/// JSON number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn valid_number(n: &[u8]) -> bool {
    let mut i = usize::from(n.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < n.len() && n[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - s
    };
    let lead = i;
    let d = digits(&mut i);
    if d == 0 || (d > 1 && n[lead] == b'0') {
        return false;
    }
    if i < n.len() && n[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if i < n.len() && matches!(n[i], b'e' | b'E') {
        i += 1;
        if i < n.len() && matches!(n[i], b'+' | b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == n.len()
}

/// Decodes the escapes of a JSON string's raw content (already validated) into `out`.
/// Surrogate pairs become one character; a lone surrogate becomes U+FFFD.
fn decode(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let hex4 = |at: usize| -> Option<u32> {
        let h = raw.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            let run = raw[i..]
                .iter()
                .position(|&c| c == b'\\')
                .unwrap_or(raw.len() - i);
            out.extend_from_slice(&raw[i..i + run]);
            i += run;
            continue;
        }
        let e = raw.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        let c = match e {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hi = hex4(i).unwrap_or(0xFFFD);
                i += 4;
                let ch = if (0xD800..0xDC00).contains(&hi)
                    && raw.get(i..i + 2) == Some(b"\\u")
                    && hex4(i + 2).is_some_and(|lo| (0xDC00..0xE000).contains(&lo))
                {
                    let lo = hex4(i + 2).expect("checked");
                    i += 6;
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                } else {
                    char::from_u32(hi)
                };
                let mut buf = [0u8; 4];
                out.extend_from_slice(
                    ch.unwrap_or(char::REPLACEMENT_CHARACTER)
                        .encode_utf8(&mut buf)
                        .as_bytes(),
                );
                continue;
            }
            other => other,
        };
        out.push(c);
    }
}

/// Writes `s` as a JSON string: quotes, `\"`, `\\` and control characters escaped; other bytes
/// (UTF-8 included) as they are.
fn write_json_string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut last = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[last..i]);
        if esc.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(esc);
        }
        last = i + 1;
    }
    out.extend_from_slice(&s[last..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests;
