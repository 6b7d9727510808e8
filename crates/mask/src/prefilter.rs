//! The first pass of detection: one table-driven pass over a value, 8 bytes at a time, that
//! drops the detectors whose necessary conditions the value does not meet (no `@` for e-mail,
//! fewer than 13 digits for a card, no block of token bytes for a secret, ...). The few values
//! that meet some get a second look, by the detectors' own validators where the scanner would
//! call them (every word led by a digit, for instance).
//!
//! Each condition must hold for every match the scanner can report: the property tests in
//! `detect.rs` and `tests/detectors.rs` check that the filtered scan finds exactly what the full
//! scan finds. Most values (ids, names, amounts, timestamps, short prose) cost this pass alone.

use crate::detect::{digit_led_candidate, iban_candidate, Detector, DetectorSet, DIGIT_LED};

// Counters, one 4-bit lane each in a `u64` (a block of 8 bytes adds at most 8 to a lane): the
// table entry of a byte has 1 in the lanes it counts.
const DIGIT: u32 = 0;
const DASH: u32 = 4;
const AT: u32 = 8;
const COLON: u32 = 12;
const DOT: u32 = 16;
const CAP_J: u32 = 20;
/// `+` and `(`: where a phone number can start with punctuation.
const PLUS: u32 = 24;
/// Capitals other than `J`.
const UPPER: u32 = 28;
/// Bytes outside the secret-token alphabet (alphanumerics and `_-+/=`).
const NON_TOKEN: u32 = 32;
const SPACE: u32 = 36;
/// Bytes that cannot be in an IBAN: not a capital, a digit or a space (the lane above SPACE).
const NON_IBAN: u32 = 40;
const LANES: usize = 11;

static FEATURES: [u64; 256] = build_features();

const fn build_features() -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let lane = match c {
            b'0'..=b'9' => Some(DIGIT),
            b'-' => Some(DASH),
            b'@' => Some(AT),
            b':' => Some(COLON),
            b'.' => Some(DOT),
            b'J' => Some(CAP_J),
            b'+' | b'(' => Some(PLUS),
            b'A'..=b'I' | b'K'..=b'Z' => Some(UPPER),
            b' ' => Some(SPACE),
            _ => None,
        };
        let mut v = match lane {
            Some(l) => 1u64 << l,
            None => 0,
        };
        if !(c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'+' | b'/' | b'=')) {
            v |= 1 << NON_TOKEN;
        }
        if !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == b' ') {
            v |= 1 << NON_IBAN;
        }
        t[i] = v;
        i += 1;
    }
    t
}

/// The detectors of `set` that can match somewhere in `t`: a superset of those that do.
#[inline(never)]
pub(crate) fn candidates(set: DetectorSet, t: &[u8]) -> DetectorSet {
    if set.is_empty() {
        return DetectorSet::EMPTY;
    }
    // The counts skip trailing spaces (the padding of `char(n)`): every match ends before them
    // (a PEM key without its END line, which runs to the end, starts before them).
    let core = trim_trailing_spaces(t);
    let n = core.len();
    // The shortest match of any detector is an IPv6 address such as `1::2`; below 8 bytes only
    // e-mail (`a@b.io`), IPv4 (`1.2.3.4`) and IPv6 can match, and all of them need punctuation.
    if n < 4 || (n < 8 && !short_has_punctuation(core)) {
        return DetectorSet::EMPTY;
    }
    let f = Features::of(core);
    // Most values meet no condition: one test on all the lanes at once (a lane is at most 127
    // in a value under 128 bytes, so adding a bias below 128 cannot carry into the next).
    if n < 128
        && f.even & 0xFF < 8
        && !((f.token_block || f.iban_block) && n >= 15)
        && (f.even + EVEN_BIAS) & EVEN_HIGH == 0
        && (f.odd + ODD_BIAS) & ODD_HIGH == 0
    {
        return DetectorSet::EMPTY;
    }
    refine(set, t, n, &f.counts())
}

/// `t` without its trailing spaces, 8 at a time.
#[inline]
fn trim_trailing_spaces(t: &[u8]) -> &[u8] {
    let mut n = t.len();
    const SPACES: u64 = u64::from_le_bytes(*b"        ");
    while n >= 8 && u64::from_le_bytes(t[n - 8..n].try_into().expect("8 bytes")) == SPACES {
        n -= 8;
    }
    while n > 0 && t[n - 1] == b' ' {
        n -= 1;
    }
    &t[..n]
}

/// Whether a value of 4 to 7 bytes has an `@`, `.` or `:`: its first and last 4 bytes (they
/// overlap) in one word, each byte compared at once.
#[inline]
fn short_has_punctuation(t: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let n = t.len();
    let word = |b: &[u8]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let x = word(&t[..4]) | word(&t[n - 4..]) << 32;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    zero_byte(x ^ (ONES * u64::from(b'@')))
        | zero_byte(x ^ (ONES * u64::from(b'.')))
        | zero_byte(x ^ (ONES * u64::from(b':')))
        != 0
}

/// What one pass over a value counts.
struct Features {
    /// The lanes of the last (up to 31) blocks widened to bytes: even and odd nibbles.
    even: u64,
    odd: u64,
    /// Earlier blocks, folded here before a byte lane can overflow (values over 240 bytes).
    wide: [u32; LANES],
    /// A block of 8 token-alphabet bytes: a run of 15 or more contains an aligned one.
    token_block: bool,
    /// Bit `k`: block `k` (bytes `8k..8k + 8`) is all token-alphabet bytes (the first 64
    /// blocks; see [`TOKEN_BLOCKS_MAX`]).
    token_blocks: u64,
    /// A block of capitals, digits and at most 2 spaces: an IBAN (15 or more characters, a
    /// single space at most every 4) contains an aligned one.
    iban_block: bool,
}

impl Features {
    #[inline]
    fn of(t: &[u8]) -> Features {
        let (mut even, mut odd) = (0u64, 0u64);
        let mut wide = [0u32; LANES];
        // Per block, bit 3 of a biased lane is set when the block fails a test; ANDed over the
        // blocks, a clear bit means some block passed.
        let mut fail = !0u64;
        let mut blocks = 0u64;
        let mut block = 0u32;
        let whole = t.len() & !7;
        // A byte lane gains at most 8 per block: 30 blocks (240 bytes) and the tail fit in a
        // byte; longer values fold their counts every 240 bytes.
        for (k, segment) in t[..whole].chunks(240).enumerate() {
            if k > 0 {
                fold(&mut wide, &mut even, &mut odd);
            }
            for b in segment.chunks_exact(8) {
                let s = FEATURES[b[0] as usize]
                    + FEATURES[b[1] as usize]
                    + FEATURES[b[2] as usize]
                    + FEATURES[b[3] as usize]
                    + FEATURES[b[4] as usize]
                    + FEATURES[b[5] as usize]
                    + FEATURES[b[6] as usize]
                    + FEATURES[b[7] as usize];
                let biased = s + BLOCK_BIAS;
                // NON_IBAN's bit joins SPACE's; a token block has no space, so SPACE's bit
                // cannot reach NON_TOKEN's.
                fail &= biased | (biased >> 4);
                // NON_TOKEN's biased bit is clear when the block is all token bytes.
                blocks |= (!biased >> (NON_TOKEN + 3) & 1) << (block & 63);
                block += 1;
                even += s & NIBBLES;
                odd += (s >> 4) & NIBBLES;
            }
        }
        // The tail (padding counts as outside both alphabets).
        let rest = &t[whole..];
        let mut s = (8 - rest.len() as u64) * ((1 << NON_TOKEN) | (1 << NON_IBAN));
        for &c in rest {
            s += FEATURES[c as usize];
        }
        even += s & NIBBLES;
        odd += (s >> 4) & NIBBLES;
        Features {
            even,
            odd,
            wide,
            token_block: fail & TOKEN_TEST == 0,
            token_blocks: blocks,
            iban_block: fail & IBAN_TEST == 0,
        }
    }

    fn lane(&self, l: u32) -> u32 {
        let k = (l / 4) as usize;
        let bytes = if k & 1 == 0 { self.even } else { self.odd };
        self.wide[k] + ((bytes >> (8 * (k / 2))) & 0xFF) as u32
    }

    fn counts(&self) -> Counts {
        let j = self.lane(CAP_J);
        Counts {
            digits: self.lane(DIGIT),
            dashes: self.lane(DASH),
            ats: self.lane(AT),
            colons: self.lane(COLON),
            dots: self.lane(DOT),
            js: j,
            pluses: self.lane(PLUS),
            capitals: self.lane(UPPER) + j,
            token_block: self.token_block,
            token_blocks: self.token_blocks,
            iban_block: self.iban_block,
        }
    }
}

/// What the first pass found, as plain counts (see the lanes above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    digits: u32,
    dashes: u32,
    ats: u32,
    colons: u32,
    dots: u32,
    /// `J` (a JWT part starts with `eyJ`).
    js: u32,
    /// `+` and `(`.
    pluses: u32,
    /// `A` to `Z`, `J` included.
    capitals: u32,
    token_block: bool,
    token_blocks: u64,
    iban_block: bool,
}

/// The exact conditions, for the values that pass the quick test. `f` counts the first `n`
/// bytes of `t` (the rest are spaces); the second looks see all of `t`.
#[inline(never)]
fn refine(set: DetectorSet, t: &[u8], n: usize, f: &Counts) -> DetectorSet {
    let digits = f.digits;
    let dots = f.dots;
    let j = f.js;
    let capitals = f.capitals;
    let colons = f.colons;
    let mut possible = 0u16;
    let mut keep = |d: Detector, ok: bool| possible |= u16::from(ok) << d as u8;
    keep(Detector::Email, f.ats >= 1 && dots >= 1);
    keep(Detector::CreditCard, digits >= 13);
    keep(Detector::UsSsn, digits >= 9);
    // National numbers have 10 or 11 digits; E.164 (`+`) 8 to 15.
    keep(
        Detector::Phone,
        digits >= 10 || (digits >= 8 && f.pluses >= 1),
    );
    // A country code, two check digits; the shortest IBAN (Norway) has 15 characters.
    keep(
        Detector::Iban,
        f.iban_block && digits >= 2 && capitals >= 2 && n >= 15,
    );
    keep(Detector::Ipv4, digits >= 4 && dots >= 3);
    // Compressed (`::`), or 8 groups (7 colons; 6 before an embedded IPv4 address).
    keep(Detector::Ipv6, digits >= 1 && colons >= 2);
    // `eyJ` starts the header and the payload, each followed by a `.`.
    keep(Detector::Jwt, j >= 2 && dots >= 2);
    // 20 capitals and digits; tokens are 15 or more bytes of their alphabet.
    keep(Detector::AwsKey, f.token_block && capitals >= 2 && n >= 20);
    keep(Detector::SecretToken, f.token_block && n >= 15);
    // `-----BEGIN ... PRIVATE KEY-----`.
    keep(Detector::PemPrivateKey, f.dashes >= 10);
    let mut possible = DetectorSet::from_bits(possible & set.bits());

    // Second looks: where the scanner would try a detector, does its validator accept anything?
    // Not for the digit-led ones in short values (a phone or card number alone): there the scan
    // costs what the look does, and the look would only double the work when a number matches.
    if possible.bits() & DIGIT_LED.bits() != 0
        && n > 20
        && !digit_led_candidate(possible, t, f.pluses >= 1)
    {
        possible = DetectorSet::from_bits(possible.bits() & !DIGIT_LED.bits());
    }
    if possible.contains(Detector::Iban) && !iban_candidate(t) {
        possible = possible.without(Detector::Iban);
    }
    if possible.contains(Detector::Ipv6) && !ipv6_colons(t, colons >= 6) {
        possible = possible.without(Detector::Ipv6);
    }
    if possible.contains(Detector::SecretToken) || possible.contains(Detector::AwsKey) {
        // A run of 15 contains an aligned block of 8 token bytes: look around the blocks the
        // first pass marked. Longer values: a run of 15 contains 3 consecutive aligned 4-byte
        // groups of token bytes.
        let run = if n / 8 <= TOKEN_BLOCKS_MAX {
            token_run_around(t, f.token_blocks)
        } else if token_quads(t) >= 3 {
            longest_token_run(t)
        } else {
            0
        };
        if run < 15 {
            possible = possible.without(Detector::SecretToken);
        }
        if run < 20 {
            possible = possible.without(Detector::AwsKey);
        }
    }
    possible
}

const NIBBLES: u64 = 0x0F0F_0F0F_0F0F_0F0F;

/// Biases that set bit 3 of a lane when a block fails: NON_TOKEN >= 1, SPACE >= 3,
/// NON_IBAN >= 1 (a lane is at most 8, so nothing carries).
const BLOCK_BIAS: u64 = 7 << NON_TOKEN | 5 << SPACE | 7 << NON_IBAN;
const TOKEN_TEST: u64 = 8 << NON_TOKEN;
/// The IBAN test: NON_IBAN's bit, shifted down, ORed into SPACE's.
const IBAN_TEST: u64 = 8 << SPACE;

/// Sets a byte lane's high bit when it reaches its threshold: `@` 1, `.` 3, `-` 10, `:` 2, `J` 2
/// (the even lanes' bytes are DIGIT, AT, DOT, PLUS, NON_TOKEN, NON_IBAN; the odd lanes' are
/// DASH, COLON, CAP_J, UPPER, SPACE).
const EVEN_BIAS: u64 = (128 - 1) << 8 | (128 - 3) << 16;
const EVEN_HIGH: u64 = 0x80 << 8 | 0x80 << 16;
const ODD_BIAS: u64 = (128 - 10) | (128 - 2) << 8 | (128 - 2) << 16;
const ODD_HIGH: u64 = 0x80 | 0x80 << 8 | 0x80 << 16;

fn fold(wide: &mut [u32; LANES], even: &mut u64, odd: &mut u64) {
    for (k, total) in wide.iter_mut().enumerate() {
        let bytes = if k & 1 == 0 { *even } else { *odd };
        *total += ((bytes >> (8 * (k / 2))) & 0xFF) as u32;
    }
    (*even, *odd) = (0, 0);
}

/// Blocks of 8 bytes the first pass marks in [`Features::token_blocks`].
const TOKEN_BLOCKS_MAX: usize = 64;

/// The longest run of secret-token bytes through the blocks of `blocks` (bit `k`: `t[8k..8k+8]`
/// is all token bytes), counted up to 20. Every run of 15 or more contains an aligned block,
/// so the answer agrees with [`longest_token_run`] wherever either reaches 15.
fn token_run_around(t: &[u8], mut blocks: u64) -> usize {
    const CAP: usize = 20;
    let is_token = |c: u8| FEATURES[c as usize] & (1 << NON_TOKEN) == 0;
    let mut longest = 0;
    let mut covered = 0;
    while blocks != 0 {
        let start = 8 * blocks.trailing_zeros() as usize;
        blocks &= blocks - 1;
        if start + 8 <= covered {
            continue;
        }
        let mut s = start;
        while s > covered && start - s < CAP && is_token(t[s - 1]) {
            s -= 1;
        }
        let mut e = start + 8;
        while e < t.len() && e - s < CAP && is_token(t[e]) {
            e += 1;
        }
        longest = longest.max(e - s);
        if longest >= CAP {
            return CAP;
        }
        covered = e;
    }
    longest
}

/// The most consecutive aligned 4-byte groups of secret-token bytes, counted up to 3.
fn token_quads(t: &[u8]) -> u32 {
    let (mut run, mut most) = (0, 0);
    for q in t.chunks_exact(4) {
        let s = FEATURES[q[0] as usize]
            + FEATURES[q[1] as usize]
            + FEATURES[q[2] as usize]
            + FEATURES[q[3] as usize];
        if (s >> NON_TOKEN) & 0xF == 0 {
            run += 1;
            most = most.max(run);
            if most == 3 {
                break;
            }
        } else {
            run = 0;
        }
    }
    most
}

/// The longest run of secret-token bytes, counted up to 20 (an AWS key is 20 alphanumerics).
fn longest_token_run(t: &[u8]) -> usize {
    let (mut run, mut longest) = (0, 0);
    for &c in t {
        if FEATURES[c as usize] & (1 << NON_TOKEN) == 0 {
            run += 1;
            longest = longest.max(run);
            if longest == 20 {
                break;
            }
        } else {
            run = 0;
        }
    }
    longest
}

/// The position of the next `c` at or after `from`, 8 bytes at a time (in `x ^ c`, the bytes
/// equal to `c` are zero; the lowest flagged byte is exact).
fn next_byte(t: &[u8], from: usize, c: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = t.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes")) ^ (ONES * u64::from(c));
        let m = x.wrapping_sub(ONES) & !x & HIGH;
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let p = t.get(i..)?.iter().position(|&b| b == c)?;
    Some(i + p)
}

/// Whether `t` has a `::`, or (when `eight_groups`) the 6 colons between hex digits that an
/// IPv6 address without `::` needs (8 groups, or 6 and an embedded IPv4 address): JSON's
/// `"key": value` has neither.
fn ipv6_colons(t: &[u8], eight_groups: bool) -> bool {
    let mut flanked = 0;
    let mut from = 0;
    while let Some(i) = next_byte(t, from, b':') {
        let next = t.get(i + 1).copied().unwrap_or(0);
        if next == b':' {
            return true;
        }
        if eight_groups && i > 0 && t[i - 1].is_ascii_hexdigit() && next.is_ascii_hexdigit() {
            flanked += 1;
            if flanked == 6 {
                return true;
            }
        }
        from = i + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn word_at_a_time_helpers_agree_with_bytewise(
            t in proptest::collection::vec(
                proptest::sample::select(b"ab :.@ 1+(".to_vec()), 0..40),
            from in 0usize..48,
        ) {
            let naive_next = t.iter().enumerate().skip(from).find(|(_, &b)| b == b':').map(|(i, _)| i);
            prop_assert_eq!(next_byte(&t, from, b':'), naive_next);
            let kept = t.len() - t.iter().rev().take_while(|&&b| b == b' ').count();
            prop_assert_eq!(trim_trailing_spaces(&t).len(), kept);
            if (4..8).contains(&t.len()) {
                let naive = t.iter().any(|&c| matches!(c, b'@' | b'.' | b':'));
                prop_assert_eq!(short_has_punctuation(&t), naive);
            }
        }
    }

    proptest! {
        #[test]
        fn token_runs_around_marked_blocks_agree_with_bytewise(
            t in proptest::collection::vec(
                proptest::sample::select(b"aZ9_-+/= .:@\xc3\xa9".to_vec()), 0..200),
            pad in 0usize..12,
        ) {
            let mut t = t;
            t.extend(std::iter::repeat_n(b' ', pad));
            let core = trim_trailing_spaces(&t);
            let f = Features::of(core);
            let naive = longest_token_run(&t);
            let around = token_run_around(&t, f.token_blocks);
            prop_assert_eq!(naive >= 15, around >= 15, "{:?}", String::from_utf8_lossy(&t));
            prop_assert_eq!(naive >= 20, around >= 20);
            if naive >= 15 {
                prop_assert_eq!(naive, around);
            }
            prop_assert_eq!(f.token_block, f.token_blocks != 0 || core.len() / 8 > 64);
        }
    }

    #[test]
    fn token_runs_at_block_edges() {
        let run = |s: &[u8]| {
            let core = trim_trailing_spaces(s);
            token_run_around(s, Features::of(core).token_blocks)
        };
        // 15 token bytes from the first byte, and ending on the last one.
        assert_eq!(run(b"abcdefghijklmno"), 15);
        assert_eq!(run(b"abcdefghijklmn"), 14);
        assert_eq!(run(b" abcdefghijklmno"), 15);
        assert_eq!(run(b"x abcdefghijklmno   "), 15);
        // A run of 15 that starts one byte after a block boundary still contains a block.
        assert_eq!(run(b"1234567 abcdefghijklmno"), 15);
        assert_eq!(run(b"1234567 abcdefghijklmn"), 14);
        // Multibyte UTF-8 ends a run on both sides.
        assert_eq!(run("é0123456789abcdeé".as_bytes()), 15);
        assert_eq!(run("é0123456789abcdé".as_bytes()), 14);
        // Capped at 20; two blocks of one run count once.
        assert_eq!(run(&[b'A'; 40]), 20);
        assert_eq!(run(b"AKIAIOSFODNN7EXAMPLE"), 20);
        assert_eq!(run(b"AKIAIOSFODNN7EXAMPL"), 19);
        // The last marked block (bytes 504..512) of a value of 64 blocks, and one more.
        let mut long = vec![b' '; 497];
        long.extend_from_slice(b"abcdefghijklmno");
        assert_eq!(long.len(), 512);
        assert_eq!(run(&long), 15);
        let token = |t: &[u8]| candidates(DetectorSet::all(), t).contains(Detector::SecretToken);
        assert!(token(&long));
        long.insert(0, b' ');
        assert!(token(&long), "513 bytes: the bytewise count");
        long.pop();
        assert!(!token(&long), "a run of 14");
    }

    #[test]
    fn json_keys_are_not_ipv6_colons() {
        assert!(!ipv6_colons(
            br#"{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7}"#,
            true
        ));
        assert!(ipv6_colons(b"x 2001:db8:0:0:0:0:2:1 y", true));
        assert!(ipv6_colons(b"::ffff:1.2.3.4", false));
        assert!(!ipv6_colons(b"2001:db8:0:0:0:0:2:1", false));
    }
}
