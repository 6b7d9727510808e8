//! Content detectors: a first pass over a value, then a left-to-right scan.
//!
//! The first pass ([`crate::prefilter`]) keeps only the detectors whose necessary conditions
//! the value meets; most values keep none and are done. The scanner then stops only at bytes
//! every match of a remaining detector contains (a digit for cards, `@` for e-mail, `:` for
//! IPv6, ...), examines the word around a stop from its start, and tries there only the
//! detectors that can start with that word, each with its own validation (Luhn, SSN area
//! rules, IBAN mod-97, ...). Matches are non-overlapping; at one start the longest candidate
//! wins. `tests/fast_path.rs` checks that this finds exactly what scanning with every detector
//! at every stop finds (the previous scanner, kept in `tests/reference/detect.rs`).
//!
//! Decisions on ambiguous input (also pinned by the corpus tests):
//! - dotted quads such as `1.2.3.4` are IPv4 addresses unless glued to a letter (`v1.2.3.4`)
//!   or part of a longer dotted run (`1.2.3.4.5`);
//! - bare 9-digit numbers are not SSNs and bare 10-digit numbers are not phone numbers (too
//!   common as ids); use a column rule (`*ssn*`, `phone`) for such columns;
//! - hex strings (UUIDs, digests) are not secrets; IPv6 needs 8 groups, or `::` with two
//!   explicit groups and a digit (`fe80::1`, not `::1` or `abc::def`);
//! - an e-mail's local part starts after the previous match (a match never overlaps another).

use crate::prefilter::candidates;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// A kind of sensitive content, named as in configuration (`"credit_card"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Detector {
    Email,
    CreditCard,
    UsSsn,
    Iban,
    Phone,
    Ipv4,
    Ipv6,
    Jwt,
    AwsKey,
    SecretToken,
    PemPrivateKey,
}

impl Detector {
    pub const ALL: [Detector; 11] = [
        Detector::Email,
        Detector::CreditCard,
        Detector::UsSsn,
        Detector::Iban,
        Detector::Phone,
        Detector::Ipv4,
        Detector::Ipv6,
        Detector::Jwt,
        Detector::AwsKey,
        Detector::SecretToken,
        Detector::PemPrivateKey,
    ];

    /// The configuration name.
    pub const fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::CreditCard => "credit_card",
            Detector::UsSsn => "us_ssn",
            Detector::Iban => "iban",
            Detector::Phone => "phone",
            Detector::Ipv4 => "ipv4",
            Detector::Ipv6 => "ipv6",
            Detector::Jwt => "jwt",
            Detector::AwsKey => "aws_key",
            Detector::SecretToken => "secret_token",
            Detector::PemPrivateKey => "pem_private_key",
        }
    }

    pub fn from_name(name: &str) -> Option<Detector> {
        Detector::ALL.into_iter().find(|d| d.name() == name)
    }

    const fn bit(self) -> u16 {
        1 << self as u8
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown detector {0:?} (known: email, credit_card, us_ssn, iban, phone, ipv4, ipv6, jwt, aws_key, secret_token, pem_private_key)")]
pub struct UnknownDetector(pub String);

impl FromStr for Detector {
    type Err = UnknownDetector;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Detector::from_name(s).ok_or_else(|| UnknownDetector(s.to_string()))
    }
}

/// A set of detectors (a bit set; `Copy`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DetectorSet(u16);

impl DetectorSet {
    pub const EMPTY: DetectorSet = DetectorSet(0);

    pub(crate) const fn bits(self) -> u16 {
        self.0
    }
    pub(crate) const fn without(self, d: Detector) -> DetectorSet {
        DetectorSet(self.0 & !d.bit())
    }
    pub(crate) const fn from_bits(bits: u16) -> DetectorSet {
        DetectorSet(bits & DetectorSet::all().0)
    }

    pub const fn all() -> DetectorSet {
        DetectorSet((1 << Detector::ALL.len()) - 1)
    }
    pub const fn with(self, d: Detector) -> DetectorSet {
        DetectorSet(self.0 | d.bit())
    }
    pub fn insert(&mut self, d: Detector) {
        self.0 |= d.bit();
    }
    pub const fn contains(self, d: Detector) -> bool {
        self.0 & d.bit() != 0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub const fn union(self, other: DetectorSet) -> DetectorSet {
        DetectorSet(self.0 | other.0)
    }
    pub fn iter(self) -> impl Iterator<Item = Detector> {
        Detector::ALL.into_iter().filter(move |d| self.contains(*d))
    }
}

impl FromIterator<Detector> for DetectorSet {
    fn from_iter<I: IntoIterator<Item = Detector>>(iter: I) -> Self {
        let mut s = DetectorSet::EMPTY;
        for d in iter {
            s.insert(d);
        }
        s
    }
}

impl fmt::Debug for DetectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Detector::name))
            .finish()
    }
}

/// One detected span of a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub detector: Detector,
    pub range: Range<usize>,
}

/// All matches of `detectors` in `text`, non-overlapping, in order.
pub fn find(detectors: DetectorSet, text: &[u8]) -> Vec<Match> {
    matches(detectors, text).collect()
}

/// The matches as an iterator (no allocation).
///
/// A first pass over the bytes drops the detectors whose necessary conditions the value does
/// not meet, so the scanner stops only where a remaining detector can start.
pub fn matches(detectors: DetectorSet, text: &[u8]) -> Matches<'_> {
    let set = candidates(detectors, text);
    if set.is_empty() {
        return Matches {
            text,
            set,
            stop: 0,
            words: false,
            pos: text.len(),
            last_end: 0,
            no_token_until: 0,
        };
    }
    scan(set, text)
}

/// [`matches`] when the first pass leaves a detector to try, `None` otherwise: a clean value
/// costs the first pass alone, without building an iterator.
#[inline]
pub(crate) fn try_matches(detectors: DetectorSet, text: &[u8]) -> Option<Matches<'_>> {
    let set = candidates(detectors, text);
    (!set.is_empty()).then(|| scan(set, text))
}

/// The first match, if any (see [`try_matches`]).
#[inline]
pub(crate) fn first_match(detectors: DetectorSet, text: &[u8]) -> Option<Match> {
    try_matches(detectors, text)?.next()
}

/// The scanner alone, over every detector of `set`.
pub(crate) fn scan(set: DetectorSet, text: &[u8]) -> Matches<'_> {
    const WORD: DetectorSet = DetectorSet::EMPTY
        .with(Detector::CreditCard)
        .with(Detector::UsSsn)
        .with(Detector::Iban)
        .with(Detector::Phone)
        .with(Detector::Ipv4)
        .with(Detector::Ipv6)
        .with(Detector::Jwt)
        .with(Detector::AwsKey)
        .with(Detector::SecretToken);
    // Each detector's stops: a byte every one of its matches contains (the word around a stop
    // is examined from its start; a word ending at punctuation is examined there).
    // IBANs have check digits; an IPv6 address has a `:` (its first group is the word before).
    const DIGIT_STOPS: DetectorSet = DIGIT_LED.with(Detector::Iban);
    let mut stop = 0u16;
    if set.0 & DIGIT_STOPS.0 != 0 {
        stop |= DG;
    }
    if set.contains(Detector::Jwt) || set.contains(Detector::AwsKey) {
        stop |= UP;
    }
    if set.contains(Detector::SecretToken) {
        stop |= DG | UP | T_TOKP;
    }
    if set.contains(Detector::Email) {
        stop |= T_AT;
    }
    if set.contains(Detector::Phone) {
        stop |= T_PHONE;
    }
    if set.contains(Detector::Ipv6) {
        stop |= T_COLON;
    }
    if set.contains(Detector::PemPrivateKey) {
        stop |= T_DASH;
    }
    Matches {
        text,
        set,
        stop,
        words: set.0 & WORD.0 != 0,
        pos: if set.is_empty() { text.len() } else { 0 },
        last_end: 0,
        no_token_until: 0,
    }
}

/// Iterator over the matches of a detector set; see [`matches`].
pub struct Matches<'a> {
    text: &'a [u8],
    set: DetectorSet,
    stop: u16,
    /// Examine the word that ends at a punctuation stop.
    words: bool,
    pos: usize,
    last_end: usize,
    no_token_until: usize,
}

// Byte classes.
const DG: u16 = 1;
const UP: u16 = 2;
const LO: u16 = 4;
const HX: u16 = 8;
const LOCAL: u16 = 16; // e-mail local part
const TOK: u16 = 32; // secret token alphabet (alnum + _-+/=)
const B64U: u16 = 64; // base64url
const T_AT: u16 = 128;
const T_PHONE: u16 = 256; // + (
const T_COLON: u16 = 512;
const T_DASH: u16 = 1024;
const T_TOKP: u16 = 2048; // token punctuation: _ - + / =
const LABEL: u16 = 4096; // DNS label: alnum and -
const AN: u16 = DG | UP | LO;

static CLASS: [u16; 256] = build_classes();

const fn build_classes() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut v = 0;
        if c.is_ascii_alphanumeric() || c == b'-' {
            v |= LABEL;
        }
        if c.is_ascii_digit() {
            v |= DG | HX | LOCAL | TOK | B64U;
        } else if c.is_ascii_uppercase() {
            v |= UP | LOCAL | TOK | B64U;
            if c <= b'F' {
                v |= HX;
            }
        } else if c.is_ascii_lowercase() {
            v |= LO | LOCAL | TOK | B64U;
            if c <= b'f' {
                v |= HX;
            }
        } else {
            v |= match c {
                b'.' | b'%' => LOCAL,
                b'+' => LOCAL | TOK | T_PHONE | T_TOKP,
                b'-' => LOCAL | TOK | B64U | T_DASH | T_TOKP,
                b'_' => LOCAL | TOK | B64U | T_TOKP,
                b'/' | b'=' => TOK | T_TOKP,
                b'@' => T_AT,
                b'(' => T_PHONE,
                b':' => T_COLON,
                _ => 0,
            };
        }
        t[i] = v;
        i += 1;
    }
    t
}

#[inline(always)]
fn cls(c: u8) -> u16 {
    CLASS[c as usize]
}
#[inline(always)]
fn is_an(c: u8) -> bool {
    cls(c) & AN != 0
}
#[inline(always)]
fn is_digit(c: u8) -> bool {
    c.is_ascii_digit()
}
#[inline(always)]
fn digit_at(t: &[u8], i: usize) -> bool {
    i < t.len() && is_digit(t[i])
}
/// True when `t[i]` continues a number: a digit, or `.`/`,` followed by a digit.
fn continues_number(t: &[u8], i: usize) -> bool {
    i < t.len() && (is_an(t[i]) || (matches!(t[i], b'.' | b',' | b'-') && digit_at(t, i + 1)))
}
/// True when the byte before `i` glues a number onto ours (`3.4111...`, `12-078-05-1120`).
fn glued_before(t: &[u8], i: usize) -> bool {
    i > 0
        && (is_an(t[i - 1])
            || (i >= 2 && matches!(t[i - 1], b'.' | b',' | b'-') && is_digit(t[i - 2])))
}

impl Iterator for Matches<'_> {
    type Item = Match;

    fn next(&mut self) -> Option<Match> {
        let t = self.text;
        let n = t.len();
        if self.pos >= n {
            return None;
        }
        let stop = self.stop;
        let words = self.words;
        let mut i = self.pos;
        // Words before `floor` have been looked at (or cannot start a match).
        let mut floor = self.pos;
        loop {
            // Skip bytes that cannot start or reveal a match, eight at a time.
            while i + 8 <= n {
                let b = &t[i..i + 8];
                let m = cls(b[0])
                    | cls(b[1])
                    | cls(b[2])
                    | cls(b[3])
                    | cls(b[4])
                    | cls(b[5])
                    | cls(b[6])
                    | cls(b[7]);
                if m & stop != 0 {
                    break;
                }
                i += 8;
            }
            while i < n && cls(t[i]) & stop == 0 {
                i += 1;
            }
            if i >= n {
                break;
            }
            let c = t[i];
            let cl = cls(c);
            if cl & AN != 0 {
                // A digit or capital: the word around it is worth a look (lowercase letters alone
                // never start a match, so the scan jumps over them).
                let start = word_start(t, i, floor);
                let mut end = i + 1;
                while end < n && is_an(t[end]) {
                    end += 1;
                }
                if let Some(s) = start {
                    if let Some((d, e)) = self.at_word(s, end) {
                        return Some(self.emit(d, s, e));
                    }
                }
                i = end;
                floor = end;
                continue;
            }
            // Punctuation: first the word that ends here (`ghp_...`, `abcd:...`), then the
            // punctuation's own detectors.
            if words && i > floor && is_an(t[i - 1]) {
                if let Some(s) = word_start(t, i - 1, floor) {
                    if let Some((d, e)) = self.at_word(s, i) {
                        return Some(self.emit(d, s, e));
                    }
                }
                floor = i;
            }
            let hit = match c {
                b'@' if self.set.contains(Detector::Email) => email(t, i, self.last_end),
                b'+' | b'(' if self.set.contains(Detector::Phone) => {
                    phone_punct(t, i).map(|e| (Detector::Phone, i, e))
                }
                b':' if self.set.contains(Detector::Ipv6) => {
                    ipv6(t, i).map(|e| (Detector::Ipv6, i, e))
                }
                b'-' if self.set.contains(Detector::PemPrivateKey) => {
                    pem(t, i).map(|e| (Detector::PemPrivateKey, i, e))
                }
                _ => None,
            };
            if let Some((d, s, e)) = hit {
                return Some(self.emit(d, s, e));
            }
            i += 1;
            floor = floor.max(i);
        }
        self.pos = n;
        None
    }
}

/// Detectors that start at a word beginning with a digit (phone also at `+` and `(`).
pub(crate) const DIGIT_LED: DetectorSet = DetectorSet::EMPTY
    .with(Detector::CreditCard)
    .with(Detector::UsSsn)
    .with(Detector::Phone)
    .with(Detector::Ipv4);

/// Whether the scanner could report any of the detectors of `set` among [`DIGIT_LED`] in `t`:
/// each is tried, with the same shape checks as [`Matches::at_word`], at every word that starts
/// with a digit (and phone at every `+` and `(`). Stops at the first candidate: the scan that
/// follows stops at every digit anyway. `punct` says whether `t` has a `+` or `(` at all.
pub(crate) fn digit_led_candidate(set: DetectorSet, t: &[u8], punct: bool) -> bool {
    let phone = set.contains(Detector::Phone) && punct;
    let n = t.len();
    let mut i = 0;
    loop {
        let Some(start) = next_digit(t, i, phone) else {
            return false;
        };
        if !is_digit(t[start]) {
            if phone_punct(t, start).is_some() {
                return true;
            }
            i = start + 1;
            continue;
        }
        i = start + 1;
        while i < n && is_digit(t[i]) {
            i += 1;
        }
        if digit_run_candidate(set, t, start, i) {
            return true;
        }
    }
}

/// Whether the digit run `t[start..end]` starts a candidate of a digit-led detector of `set`.
#[inline]
fn digit_run_candidate(set: DetectorSet, t: &[u8], start: usize, end: usize) -> bool {
    let run = end - start;
    let next = t.get(end).copied().unwrap_or(0);
    // Inside a word led by a letter, or followed by nothing any of them accepts.
    if (start > 0 && is_an(t[start - 1])) || (run < 13 && !matches!(next, b' ' | b'-' | b'.')) {
        return false;
    }
    let digit_after = digit_at(t, end + 1);
    let glued = glued_before(t, start);
    (set.contains(Detector::CreditCard)
        && card_shape(t, start, glued, run, next)
        && card(t, start).is_some())
        || (set.contains(Detector::UsSsn)
            && ssn_shape(glued, run, next, digit_after)
            && ssn(t, start).is_some())
        || (set.contains(Detector::Phone)
            && phone_shape(t, start, glued, run, next, digit_after)
            && phone_national(t, start).is_some())
        || (set.contains(Detector::Ipv4)
            && ipv4_shape(run, next, digit_after)
            && ipv4(t, start).is_some())
}

/// The position of the next digit at or after `from` (or `+` or `(` when `punct`), 8 bytes at
/// a time: in `x ^ c`, the bytes equal to `c` are zero and digits are below 10.
fn next_digit(t: &[u8], from: usize, punct: bool) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit of each byte below `n` (the lowest flagged byte is exact; only bytes above a
    // flagged one can be flagged by the borrow).
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let mut i = from;
    while let Some(chunk) = t.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let mut m = below(x ^ (ONES * u64::from(b'0')), 10);
        if punct {
            m |= below(x ^ (ONES * u64::from(b'+')), 1) | below(x ^ (ONES * u64::from(b'(')), 1);
        }
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    t[i.min(t.len())..]
        .iter()
        .position(|&c| c.is_ascii_digit() || (punct && matches!(c, b'+' | b'(')))
        .map(|p| i + p)
}

/// Whether an IBAN can start anywhere in `t` (the scanner tries one at words led by a capital).
pub(crate) fn iban_candidate(t: &[u8]) -> bool {
    // An IBAN's third byte is a check digit after two capitals: try only two bytes before
    // each run of digits (inside a run, the byte before a digit is a digit).
    let mut from = 2;
    while let Some(d) = next_digit(t, from, false) {
        let i = d - 2;
        if cls(t[i]) & UP != 0 && (i == 0 || !is_an(t[i - 1])) && iban(t, i).is_some() {
            return true;
        }
        from = d + 1;
        while from < t.len() && is_digit(t[from]) {
            from += 1;
        }
    }
    false
}

// The shape checks on a word's leading digit run (`run` digits, then `next`) before each
// digit-led validator; shared by the scanner and `digit_led_candidate`.

/// 13 to 19 digits, or a group of 3 to 6 then a separator and another group of 3 or more.
fn card_shape(t: &[u8], i: usize, glued: bool, run: usize, next: u8) -> bool {
    let j = i + run;
    !glued
        && (run >= 13
            || ((3..=6).contains(&run)
                && matches!(next, b' ' | b'-')
                && digit_at(t, j + 1)
                && digit_at(t, j + 2)
                && digit_at(t, j + 3)))
}

fn ssn_shape(glued: bool, run: usize, next: u8, digit_after: bool) -> bool {
    !glued && run == 3 && matches!(next, b'-' | b' ') && digit_after
}

fn phone_shape(t: &[u8], i: usize, glued: bool, run: usize, next: u8, digit_after: bool) -> bool {
    !glued
        && (i == 0 || t[i - 1] != b'+')
        && phone_first_group_ok(t[i], run)
        && matches!(next, b' ' | b'-' | b'.')
        && (digit_after || t.get(i + run + 1) == Some(&b'('))
}

fn ipv4_shape(run: usize, next: u8, digit_after: bool) -> bool {
    run <= 3 && next == b'.' && digit_after
}

/// The start of the alphanumeric word containing `i`, if it starts at or after `floor`
/// (a word that began before `floor` was already looked at, or is glued to a match).
fn word_start(t: &[u8], i: usize, floor: usize) -> Option<usize> {
    let mut s = i;
    while s > floor && is_an(t[s - 1]) {
        s -= 1;
    }
    (s == 0 || !is_an(t[s - 1])).then_some(s)
}

impl Matches<'_> {
    fn emit(&mut self, detector: Detector, start: usize, end: usize) -> Match {
        self.pos = end;
        self.last_end = end;
        Match {
            detector,
            range: start..end,
        }
    }

    /// Tries the detectors that can start at the word starting at `i` (ends at `word_end`).
    fn at_word(&mut self, i: usize, word_end: usize) -> Option<(Detector, usize)> {
        let t = self.text;
        let s = self.set;
        let c = t[i];
        let mut best: Option<(Detector, usize)> = None;
        let mut consider = |d: Detector, end: Option<usize>| {
            if let Some(e) = end {
                if best.is_none_or(|(_, b)| e > b) {
                    best = Some((d, e));
                }
            }
        };
        if is_digit(c) {
            // Cheap shape checks on the leading digit run before each validator.
            let mut run = 1;
            while i + run < word_end && is_digit(t[i + run]) {
                run += 1;
            }
            let next = t.get(i + run).copied().unwrap_or(0);
            let digit_after = digit_at(t, i + run + 1);
            let glued = glued_before(t, i);
            if s.contains(Detector::CreditCard) && card_shape(t, i, glued, run, next) {
                consider(Detector::CreditCard, card(t, i));
            }
            if s.contains(Detector::UsSsn) && ssn_shape(glued, run, next, digit_after) {
                consider(Detector::UsSsn, ssn(t, i));
            }
            if s.contains(Detector::Phone) && phone_shape(t, i, glued, run, next, digit_after) {
                consider(Detector::Phone, phone_national(t, i));
            }
            if s.contains(Detector::Ipv4) && ipv4_shape(run, next, digit_after) {
                consider(Detector::Ipv4, ipv4(t, i));
            }
        } else {
            if s.contains(Detector::Iban) && cls(c) & UP != 0 {
                consider(Detector::Iban, iban(t, i));
            }
            if s.contains(Detector::Jwt) && c == b'e' {
                consider(Detector::Jwt, jwt(t, i));
            }
            if s.contains(Detector::AwsKey) && c == b'A' {
                consider(Detector::AwsKey, aws_key(t, i, word_end));
            }
        }
        if s.contains(Detector::Ipv6)
            && word_end - i <= 4
            && word_end < t.len()
            && t[word_end] == b':'
        {
            consider(Detector::Ipv6, ipv6(t, i));
        }
        if s.contains(Detector::SecretToken)
            && i >= self.no_token_until
            && (word_end - i >= 16 || (word_end < t.len() && cls(t[word_end]) & TOK != 0))
        {
            let (end, ext_end) = secret_token(t, i);
            self.no_token_until = ext_end;
            consider(Detector::SecretToken, end);
        }
        best
    }
}

// ---------------------------------------------------------------- e-mail

fn email(t: &[u8], at: usize, floor: usize) -> Option<(Detector, usize, usize)> {
    let lower = floor.max(at.saturating_sub(64));
    let mut s = at;
    while s > lower && cls(t[s - 1]) & LOCAL != 0 {
        s -= 1;
    }
    if s > floor && s == lower && cls(t[s - 1]) & LOCAL != 0 {
        return None; // local part longer than 64
    }
    while s < at && matches!(t[s], b'.' | b'-' | b'+') {
        s += 1;
    }
    if s == at || t[at - 1] == b'.' {
        return None;
    }
    let end = domain(t, at + 1)?;
    Some((Detector::Email, s, end))
}

/// A DNS name of two or more labels with an alphabetic TLD; returns its end.
fn domain(t: &[u8], start: usize) -> Option<usize> {
    let n = t.len();
    let mut j = start;
    let mut labels = 0;
    let mut last_label = start..start;
    loop {
        let k = j;
        while j < n && cls(t[j]) & LABEL != 0 && j - k <= 63 {
            j += 1;
        }
        if j == k || j - k > 63 || t[k] == b'-' || t[j - 1] == b'-' {
            break;
        }
        labels += 1;
        last_label = k..j;
        if j + 1 < n && t[j] == b'.' && is_an(t[j + 1]) {
            j += 1;
        } else {
            break;
        }
    }
    if labels < 2 || j - start > 253 {
        return None;
    }
    let tld = &t[last_label.clone()];
    if tld.len() < 2 || !tld.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    if last_label.end < n && matches!(t[last_label.end], b'@' | b'-' | b'_') {
        return None;
    }
    Some(last_label.end)
}

// ---------------------------------------------------------------- payment card

fn card(t: &[u8], i: usize) -> Option<usize> {
    let n = t.len();
    let mut digits = [0u8; 19];
    let mut nd = 0;
    let mut j = i;
    while j < n && is_digit(t[j]) {
        if nd == 19 {
            return None;
        }
        digits[nd] = t[j] - b'0';
        nd += 1;
        j += 1;
    }
    if nd >= 13 {
        if continues_number(t, j) {
            return None;
        }
        return card_valid(&digits[..nd]).then_some(j);
    }
    if !(3..=6).contains(&nd) || j >= n || !matches!(t[j], b' ' | b'-') {
        return None;
    }
    // Grouped form: `4242 4242 4242 4242`, `3782-822463-10005`, one separator kind.
    let sep = t[j];
    let mut ends: [(usize, usize); 8] = [(0, 0); 8];
    let mut ng = 1;
    ends[0] = (nd, j);
    while ng < 8 && j + 1 < n && t[j] == sep && is_digit(t[j + 1]) {
        let k = j + 1;
        let mut m = k;
        while m < n && is_digit(t[m]) && m - k < 7 {
            m += 1;
        }
        let len = m - k;
        if !(3..=6).contains(&len) || nd + len > 19 || (m < n && is_digit(t[m])) {
            break;
        }
        for &b in &t[k..m] {
            digits[nd] = b - b'0';
            nd += 1;
        }
        j = m;
        ends[ng] = (nd, j);
        ng += 1;
    }
    for g in (1..ng).rev() {
        let (count, end) = ends[g];
        if count < 13 {
            break;
        }
        let boundary_ok =
            end >= n || !(is_an(t[end]) || (matches!(t[end], b'.' | b',') && digit_at(t, end + 1)));
        if boundary_ok && card_valid(&digits[..count]) {
            return Some(end);
        }
    }
    None
}

fn card_valid(d: &[u8]) -> bool {
    iin_ok(d) && luhn(d)
}

/// Issuer prefix and length (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro 6x).
fn iin_ok(d: &[u8]) -> bool {
    let len = d.len();
    let p2 = u32::from(d[0]) * 10 + u32::from(d[1]);
    let p3 = p2 * 10 + u32::from(d[2]);
    let p4 = p3 * 10 + u32::from(d[3]);
    match d[0] {
        4 => matches!(len, 13 | 16 | 19),
        5 => (51..=55).contains(&p2) && len == 16,
        2 => (2221..=2720).contains(&p4) && len == 16,
        3 => {
            ((p2 == 34 || p2 == 37) && len == 15)
                || ((p2 == 36 || p2 == 38 || p2 == 39 || (300..=305).contains(&p3))
                    && (14..=19).contains(&len))
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&len))
        }
        6 => {
            (p4 == 6011
                || p2 == 65
                || (644..=649).contains(&p3)
                || p2 == 62
                || p2 == 67
                || p2 == 63)
                && (16..=19).contains(&len)
        }
        _ => false,
    }
}

#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
pub(crate) fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, &x) in d.iter().rev().enumerate() {
        let mut v = u32::from(x);
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

// ---------------------------------------------------------------- US SSN

fn ssn(t: &[u8], i: usize) -> Option<usize> {
    if i + 11 > t.len() {
        return None;
    }
    let s = &t[i..i + 11];
    let sep = s[3];
    if !matches!(sep, b'-' | b' ') || s[6] != sep {
        return None;
    }
    let num = |r: Range<usize>| -> Option<u32> {
        s[r].iter().try_fold(0u32, |a, &b| {
            is_digit(b).then(|| a * 10 + u32::from(b - b'0'))
        })
    };
    let (area, group, serial) = (num(0..3)?, num(4..6)?, num(7..11)?);
    if continues_number(t, i + 11) || (sep == b' ' && digit_at(t, i + 12) && t[i + 11] == b' ') {
        return None;
    }
    (area != 0 && area != 666 && area < 900 && group != 0 && serial != 0).then_some(i + 11)
}

// ---------------------------------------------------------------- phone

#[derive(Default)]
struct PhoneScan {
    digits: [u8; 16],
    nd: usize,
    groups: usize,
    first_group: usize,
    end: usize,
}

/// Digit groups separated by one of ` -.`, with an optional `(...)` group.
fn scan_phone(t: &[u8], start: usize) -> Option<PhoneScan> {
    let n = t.len();
    let mut p = PhoneScan::default();
    let mut j = start;
    let push = |p: &mut PhoneScan, r: Range<usize>| -> bool {
        for &b in &t[r.clone()] {
            if p.nd == 15 {
                return false;
            }
            p.digits[p.nd] = b - b'0';
            p.nd += 1;
        }
        if p.groups == 0 {
            p.first_group = r.len();
        }
        p.groups += 1;
        p.groups <= 8
    };
    loop {
        let paren = j < n && t[j] == b'(';
        if paren {
            let k = j + 1;
            let mut m = k;
            while m < n && is_digit(t[m]) && m - k <= 4 {
                m += 1;
            }
            if m == k || m - k > 4 || m >= n || t[m] != b')' || !push(&mut p, k..m) {
                return None;
            }
            j = m + 1;
        } else {
            let k = j;
            while j < n && is_digit(t[j]) {
                j += 1;
                if j - k > 15 {
                    return None;
                }
            }
            if j == k || !push(&mut p, k..j) {
                return None;
            }
        }
        if j + 1 < n
            && matches!(t[j], b' ' | b'-' | b'.')
            && (is_digit(t[j + 1]) || t[j + 1] == b'(')
        {
            j += 1;
        } else if paren && j < n && is_digit(t[j]) {
        } else {
            break;
        }
    }
    if j < n && is_an(t[j]) {
        return None;
    }
    p.end = j;
    Some(p)
}

fn nanp_ok(d: &[u8]) -> bool {
    d.len() == 10 && d[0] >= 2 && d[3] >= 2
}

/// Whether a national number can start with a group of `run` digits led by `c`: what
/// [`phone_national`] accepts (a 3-digit NANP area code, the NANP trunk `1`, or a trunk `0` with
/// a 2 to 5 digit area code), checked before scanning the groups.
fn phone_first_group_ok(c: u8, run: usize) -> bool {
    (run == 3 && c >= b'2') || (run == 1 && c == b'1') || (c == b'0' && (2..=5).contains(&run))
}

/// `+` (E.164) or `(` (national with area code in parentheses).
fn phone_punct(t: &[u8], i: usize) -> Option<usize> {
    if i > 0 && is_an(t[i - 1]) {
        return None;
    }
    if t[i] == b'(' {
        return phone_national(t, i);
    }
    if !digit_at(t, i + 1) || t[i + 1] == b'0' {
        return None;
    }
    let p = scan_phone(t, i + 1)?;
    if !(8..=15).contains(&p.nd) {
        return None;
    }
    if p.digits[0] == 1 && !(p.nd == 11 && nanp_ok(&p.digits[1..11])) {
        return None;
    }
    Some(p.end)
}

/// NANP `(415) 555-2671`, `415-555-2671`, `1 415 555 2671`, or trunk-prefixed national
/// `020 7946 0958`, `06 12 34 56 78`. Unseparated runs are not phone numbers here.
fn phone_national(t: &[u8], i: usize) -> Option<usize> {
    let p = scan_phone(t, i)?;
    if p.groups < 2 {
        return None;
    }
    let d = &p.digits[..p.nd];
    let ok = (p.nd == 10 && p.groups >= 3 && p.first_group == 3 && nanp_ok(d))
        || (p.nd == 11 && p.groups >= 4 && p.first_group == 1 && d[0] == 1 && nanp_ok(&d[1..]))
        || ((10..=11).contains(&p.nd)
            && d[0] == 0
            && d[1] != 0
            && (2..=5).contains(&p.first_group)
            && p.groups >= 2);
    ok.then_some(p.end)
}

// ---------------------------------------------------------------- IP addresses

/// A dotted quad without boundary checks; returns its end.
fn ipv4_body(t: &[u8], i: usize) -> Option<usize> {
    let n = t.len();
    let mut j = i;
    for octet in 0..4 {
        let k = j;
        let mut v = 0u32;
        while j < n && is_digit(t[j]) && j - k < 3 {
            v = v * 10 + u32::from(t[j] - b'0');
            j += 1;
        }
        if j == k || v > 255 || (j - k > 1 && t[k] == b'0') || digit_at(t, j) {
            return None;
        }
        if octet < 3 {
            if j >= n || t[j] != b'.' {
                return None;
            }
            j += 1;
        }
    }
    Some(j)
}

fn ipv4(t: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (is_an(t[i - 1]) || t[i - 1] == b'.') {
        return None;
    }
    let end = ipv4_body(t, i)?;
    if end < t.len()
        && (is_an(t[end]) || (t[end] == b'.' && end + 1 < t.len() && is_an(t[end + 1])))
    {
        return None;
    }
    Some(end)
}

fn ipv6(t: &[u8], i: usize) -> Option<usize> {
    let n = t.len();
    if i > 0 && (is_an(t[i - 1]) || t[i - 1] == b':' || t[i - 1] == b'.') {
        return None;
    }
    let mut j = i;
    let mut groups = 0;
    let mut explicit = 0;
    let mut compressed = false;
    let mut has_digit = false;
    if t[j..].starts_with(b"::") {
        compressed = true;
        j += 2;
    } else if t[j] == b':' {
        return None;
    }
    loop {
        let k = j;
        while j < n && cls(t[j]) & HX != 0 && j - k < 5 {
            j += 1;
        }
        let len = j - k;
        if len == 0 {
            if j == i + 2 {
                return None; // a lone `::`
            }
            break; // a trailing `::`
        }
        if len > 4 {
            return None;
        }
        if j < n && t[j] == b'.' {
            let e = ipv4_body(t, k)?;
            groups += 2;
            explicit += 2;
            has_digit = true;
            j = e;
            break;
        }
        has_digit |= t[k..j].iter().any(|b| is_digit(*b));
        groups += 1;
        explicit += 1;
        if groups > 8 {
            return None;
        }
        if j + 1 < n && t[j] == b':' && t[j + 1] == b':' {
            if compressed {
                return None;
            }
            compressed = true;
            j += 2;
        } else if j + 1 < n && t[j] == b':' && cls(t[j + 1]) & HX != 0 {
            j += 1;
        } else {
            break;
        }
    }
    finish_ipv6(j, groups, explicit, compressed, has_digit, t)
}

fn finish_ipv6(
    j: usize,
    groups: usize,
    explicit: usize,
    compressed: bool,
    has_digit: bool,
    t: &[u8],
) -> Option<usize> {
    let ok = if compressed {
        groups <= 7 && explicit >= 2 && has_digit
    } else {
        groups == 8
    };
    if !ok || (j < t.len() && (is_an(t[j]) || t[j] == b':')) {
        return None;
    }
    Some(j)
}

// ---------------------------------------------------------------- IBAN

fn iban_length(cc: [u8; 2]) -> Option<usize> {
    Some(match &cc {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FO" | b"GL" | b"NL" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"XK" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"PL" | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        _ => return None,
    })
}

fn iban(t: &[u8], i: usize) -> Option<usize> {
    let n = t.len();
    if i + 4 > n || cls(t[i + 1]) & UP == 0 || !is_digit(t[i + 2]) || !is_digit(t[i + 3]) {
        return None;
    }
    let want = iban_length([t[i], t[i + 1]])?;
    let mut buf = [0u8; 34];
    let mut got = 0;
    let mut j = i;
    while got < want && j < n {
        let c = t[j];
        if is_digit(c) || cls(c) & UP != 0 {
            buf[got] = c;
            got += 1;
            j += 1;
        } else if c == b' ' && got % 4 == 0 && j + 1 < n && is_an(t[j + 1]) {
            j += 1;
        } else {
            break;
        }
    }
    if got != want || (j < n && is_an(t[j])) {
        return None;
    }
    iban_checksum(&buf[..want]).then_some(j)
}

pub(crate) fn iban_checksum(s: &[u8]) -> bool {
    let mut rem = 0u32;
    for &c in s[4..].iter().chain(&s[..4]) {
        if is_digit(c) {
            rem = (rem * 10 + u32::from(c - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

// ---------------------------------------------------------------- tokens

fn b64u_run(t: &[u8], mut j: usize) -> usize {
    while j < t.len() && cls(t[j]) & B64U != 0 {
        j += 1;
    }
    j
}

fn jwt(t: &[u8], i: usize) -> Option<usize> {
    use base64::Engine;
    let n = t.len();
    if !t[i..].starts_with(b"eyJ") {
        return None;
    }
    let h_end = b64u_run(t, i);
    if h_end - i < 10 || h_end >= n || t[h_end] != b'.' {
        return None;
    }
    let p_start = h_end + 1;
    let p_end = b64u_run(t, p_start);
    if !t[p_start..].starts_with(b"eyJ") || p_end - p_start < 4 || p_end >= n || t[p_end] != b'.' {
        return None;
    }
    let s_end = b64u_run(t, p_end + 1);
    if s_end < n && (is_an(t[s_end]) || t[s_end] == b'.') {
        return None;
    }
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&t[i..h_end])
        .ok()?;
    let header = header.trim_ascii_start();
    (header.first() == Some(&b'{') && header.windows(5).any(|w| w == b"\"alg\"")).then_some(s_end)
}

fn aws_key(t: &[u8], i: usize, word_end: usize) -> Option<usize> {
    const PREFIXES: [&[u8; 4]; 12] = [
        b"AKIA", b"ASIA", b"ABIA", b"ACCA", b"AGPA", b"AIDA", b"AIPA", b"ANPA", b"ANVA", b"APKA",
        b"AROA", b"ASCA",
    ];
    if word_end - i != 20 {
        return None;
    }
    let w = &t[i..word_end];
    let prefixed = PREFIXES.iter().any(|p| w.starts_with(*p)) || w.starts_with(b"A3T");
    (prefixed && w.iter().all(|&c| is_digit(c) || c.is_ascii_uppercase())).then_some(word_end)
}

/// Returns (match end, end of the token-alphabet run starting at `i`).
fn secret_token(t: &[u8], i: usize) -> (Option<usize>, usize) {
    let n = t.len();
    let mut j = i;
    let (mut up, mut lo, mut dg) = (0usize, 0usize, 0usize);
    // Characters inside word-like runs (`[A-Z]?[a-z]{3,}`): identifiers and paths are made of
    // words, random tokens are not.
    let (mut word_chars, mut run, mut capital) = (0usize, 0usize, false);
    let mut prev = 0u16;
    while j < n {
        let c = cls(t[j]);
        if c & TOK == 0 {
            break;
        }
        if t[j] == b'=' {
            // `=` is padding at the end of a token, and a separator (`key=value`) otherwise.
            while j < n && t[j] == b'=' {
                j += 1;
            }
            if j < n && cls(t[j]) & AN != 0 {
                j -= 1;
                while t[j] == b'=' {
                    j -= 1;
                }
                j += 1;
            }
            break;
        }
        let k = c & AN;
        match k {
            UP => up += 1,
            LO => lo += 1,
            DG => dg += 1,
            _ => {}
        }
        if k == LO {
            if run == 0 {
                capital = prev == UP;
            }
            run += 1;
        } else {
            if run >= 3 {
                word_chars += run + usize::from(capital);
            }
            run = 0;
        }
        prev = k;
        j += 1;
    }
    if run >= 3 {
        word_chars += run + usize::from(capital);
    }
    let ext_end = j;
    // Trailing separators are punctuation, not part of the token (`=` padding is).
    while j > i && matches!(t[j - 1], b'-' | b'_' | b'+' | b'/') {
        j -= 1;
    }
    if ext_end < n && t[ext_end] == b'@' {
        return (None, ext_end);
    }
    let w = &t[i..j];
    if w.len() < 15 {
        return (None, ext_end);
    }
    const PREFIXED: [(&[u8], usize); 22] = [
        (b"ghp_", 30),
        (b"gho_", 30),
        (b"ghu_", 30),
        (b"ghs_", 30),
        (b"ghr_", 30),
        (b"github_pat_", 20),
        (b"glpat-", 20),
        (b"xoxb-", 10),
        (b"xoxp-", 10),
        (b"xoxa-", 10),
        (b"xoxr-", 10),
        (b"xoxs-", 10),
        (b"xapp-", 10),
        (b"sk_live_", 16),
        (b"sk_test_", 16),
        (b"rk_live_", 16),
        (b"rk_test_", 16),
        (b"sk-", 20),
        (b"AIza", 30),
        (b"npm_", 30),
        (b"dop_v1_", 40),
        (b"hf_", 30),
    ];
    for (p, min_rest) in PREFIXED.iter().filter(|(p, _)| p[0] == w[0]) {
        if w.starts_with(p) && w.len() - p.len() >= *min_rest {
            return (Some(j), ext_end);
        }
    }
    let len = w.len();
    let random_looking = len >= 20 && up >= 1 && lo >= 1 && dg >= 1 && word_chars * 2 < len;
    (random_looking.then_some(j), ext_end)
}

// ---------------------------------------------------------------- PEM

fn find_sub(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut j = from;
    while j + needle.len() <= hay.len() {
        let off = hay[j..hay.len() - needle.len() + 1]
            .iter()
            .position(|&b| b == first)?;
        j += off;
        if hay[j..].starts_with(needle) {
            return Some(j);
        }
        j += 1;
    }
    None
}

/// `-----BEGIN ... PRIVATE KEY-----` through its END line; to the end of the value when the
/// END line is missing (a truncated key still leaks).
fn pem(t: &[u8], i: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    if !t[i..].starts_with(BEGIN) {
        return None;
    }
    let n = t.len();
    let l = i + BEGIN.len();
    let mut j = l;
    while j < n && j - l < 48 && (t[j].is_ascii_uppercase() || t[j] == b' ') {
        j += 1;
    }
    if !t[l..j].ends_with(b"PRIVATE KEY") || !t[j..].starts_with(b"-----") {
        return None;
    }
    let Some(e) = find_sub(t, j + 5, b"-----END ") else {
        return Some(n);
    };
    match find_sub(&t[..n.min(e + 9 + 48)], e + 9, b"-----") {
        Some(c) => Some(c + 5),
        None => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(d: Detector, s: &str) -> Vec<String> {
        find(DetectorSet::EMPTY.with(d), s.as_bytes())
            .into_iter()
            .map(|m| s[m.range].to_string())
            .collect()
    }

    #[test]
    fn names_round_trip() {
        for d in Detector::ALL {
            assert_eq!(Detector::from_name(d.name()), Some(d));
            assert_eq!(d.name().parse::<Detector>().unwrap(), d);
        }
        assert!("ssn"
            .parse::<Detector>()
            .unwrap_err()
            .to_string()
            .contains("us_ssn"));
    }

    #[test]
    fn set_operations() {
        let s: DetectorSet = [Detector::Email, Detector::Jwt].into_iter().collect();
        assert!(s.contains(Detector::Jwt) && !s.contains(Detector::Iban));
        assert_eq!(s.iter().count(), 2);
        assert_eq!(DetectorSet::all().iter().count(), 11);
        assert_eq!(format!("{s:?}"), r#"{"email", "jwt"}"#);
    }

    #[test]
    fn luhn_and_mod97() {
        assert!(luhn(&[4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 2]));
        assert!(!luhn(&[4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 3]));
        assert!(iban_checksum(b"GB82WEST12345698765432"));
        assert!(!iban_checksum(b"GB83WEST12345698765432"));
    }

    #[test]
    fn leftmost_longest_and_in_order() {
        let s = "mail a.b@example.org card 4111 1111 1111 1111 ip 10.0.0.1";
        let got: Vec<_> = find(DetectorSet::all(), s.as_bytes())
            .into_iter()
            .map(|m| (m.detector, &s[m.range]))
            .collect();
        assert_eq!(
            got,
            vec![
                (Detector::Email, "a.b@example.org"),
                (Detector::CreditCard, "4111 1111 1111 1111"),
                (Detector::Ipv4, "10.0.0.1")
            ]
        );
    }

    #[test]
    fn email_local_part_does_not_reach_into_previous_match() {
        assert_eq!(
            one(Detector::Email, "x@y.io,z@w.io"),
            vec!["x@y.io", "z@w.io"]
        );
        assert_eq!(
            one(Detector::Email, "user_john@example.com."),
            vec!["user_john@example.com"]
        );
    }
}
