//! The fast path (a first pass that drops detectors a value cannot match, then a scan that
//! stops only where a remaining detector can start) finds exactly what the original scanner
//! finds: same detectors, same spans, in order, for every subset of detectors. The original is
//! kept frozen in `tests/reference/detect.rs`.

#[allow(dead_code)]
#[path = "reference/detect.rs"]
mod reference;

use proptest::prelude::*;
use tollgate_mask::{find, mask_text, Detector, DetectorSet, Strategy as MaskStrategy};

fn reference_set(set: DetectorSet) -> reference::DetectorSet {
    set.iter()
        .map(|d| reference::Detector::from_name(d.name()).expect("same names"))
        .collect()
}

fn fast(set: DetectorSet, text: &[u8]) -> Vec<(&'static str, std::ops::Range<usize>)> {
    find(set, text)
        .into_iter()
        .map(|m| (m.detector.name(), m.range))
        .collect()
}

fn slow(set: DetectorSet, text: &[u8]) -> Vec<(&'static str, std::ops::Range<usize>)> {
    reference::find(reference_set(set), text)
        .into_iter()
        .map(|m| (m.detector.name(), m.range))
        .collect()
}

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

/// Pieces that are, or nearly are, what a detector looks for.
const PIECES: &[&str] = &[
    "4111 1111 1111 1111",
    "4111111111111111",
    "4222222222222",
    "4222 2222 22222",
    "5555555555554444",
    "378282246310005",
    "3782-822463-10005",
    "4242-4242-4242-4242",
    "6011111111111117",
    "4111 1111 1111 1112",
    "078-05-1120",
    "078 05 1120",
    "666-05-1120",
    "+44 20 7946 0958",
    "+1 415 555 2671",
    "+14155552671",
    "+49 30 1234",
    "+32 2 555 12 12",
    "(415) 555-2671",
    "415-555-2671",
    "415.555.2671",
    "1 415 555 2671",
    "020 7946 0958",
    "06 12 34 56 78",
    "DE89 3704 0044 0532 0130 00",
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "GB82 WEST 1234 5698 7654 32",
    "NO9386011117947",
    "10.20.30.40",
    "1.2.3.4",
    "192.168.0.1",
    "256.1.1.1",
    "1.2.3.4.5",
    "2001:db8::1",
    "fe80::1",
    "1::2",
    "1:2:3:4:5:6:7:8",
    "::ffff:1.2.3.4",
    "abcd:ef01::",
    "12:30:45",
    "AKIAIOSFODNN7EXAMPLE",
    "ASIAIOSFODNN7EXAMPLE",
    "A3T0IOSFODNN7EXAMPLE",
    "ghp_aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4",
    "xoxb-1234567890",
    "sk_live_abcdefghijklmnop",
    "glpat-abcdefghijklmnopqrst",
    "Zx9Qw3Er7Ty1Ui5Op2As",
    "dGhpcyBpcyBub3QgYSBzZWNyZXQ=",
    JWT,
    "eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\nMIIE",
    "-----END RSA PRIVATE KEY-----",
    "-----BEGIN CERTIFICATE-----",
    "jane.doe@example.com",
    "a@b.io",
    "x@y_z.com",
    "user@localhost",
    "2024-08-08 08:50:05.532057-05",
    "2024-01-15 12:30:45.123456+00",
    "08.08.2024 20:50:45",
    "$19.99",
    "v2.1.0",
    "SKU-10442",
    "550e8400-e29b-41d4-a716-446655440000",
];

const PUNCT: &[&str] = &[
    " ", " ", "-", ".", ":", "::", "+", "(", ")", ",", "@", "_", "/", "=", "\n", "\"", "'", "\t",
    "é",
];

fn fragment() -> impl proptest::strategy::Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(PIECES).prop_map(str::to_string),
        3 => proptest::sample::select(PUNCT).prop_map(str::to_string),
        2 => "[0-9]{1,20}",
        2 => "[a-z]{1,10}",
        1 => "[A-Z][a-z]{0,8}",
        1 => "[A-Z0-9]{1,24}",
        1 => "[a-zA-Z0-9_+/=-]{8,40}",
        1 => "[0-9a-f]{1,5}",
    ]
}

fn text() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(fragment(), 0..14).prop_map(|v| v.concat().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..80),
        1 => proptest::collection::vec(
            proptest::sample::select(b"0123456789 -.:+()@AaJeyZ_=/".to_vec()),
            0..60
        ),
    ]
}

fn detector_set() -> impl proptest::strategy::Strategy<Value = DetectorSet> {
    prop_oneof![
        2 => Just(DetectorSet::all()),
        1 => proptest::sample::subsequence(Detector::ALL.to_vec(), 0..=Detector::ALL.len())
            .prop_map(|ds| ds.into_iter().collect()),
        1 => proptest::sample::select(Detector::ALL.to_vec()).prop_map(|d| DetectorSet::EMPTY.with(d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn fast_path_finds_what_the_reference_finds(set in detector_set(), t in text()) {
        prop_assert_eq!(fast(set, &t), slow(set, &t), "input {:?}", String::from_utf8_lossy(&t));
    }

    #[test]
    fn padded_values_agree(set in detector_set(), t in text(), pad in 0usize..40) {
        // `char(n)` values end in spaces, which the first pass skips.
        let mut t = t;
        t.resize(t.len() + pad, b' ');
        prop_assert_eq!(fast(set, &t), slow(set, &t), "input {:?}", String::from_utf8_lossy(&t));
    }

    #[test]
    fn long_values_fold_their_counts(set in detector_set(), parts in proptest::collection::vec(fragment(), 40..120)) {
        // Values over 240 bytes take the folding path of the first pass.
        let t = parts.concat().into_bytes();
        prop_assert_eq!(fast(set, &t), slow(set, &t), "input {:?}", String::from_utf8_lossy(&t));
    }
}

#[test]
fn every_piece_alone_and_glued_agrees() {
    let sets = std::iter::once(DetectorSet::all())
        .chain(Detector::ALL.iter().map(|&d| DetectorSet::EMPTY.with(d)));
    for set in sets {
        for a in PIECES {
            for t in [
                a.to_string(),
                format!("x {a} y"),
                format!("{a}{a}"),
                format!("{a}{}", " ".repeat(13)),
                format!("x {a}{}", " ".repeat(24)),
            ] {
                assert_eq!(
                    fast(set, t.as_bytes()),
                    slow(set, t.as_bytes()),
                    "{set:?} {t:?}"
                );
            }
            for b in PIECES {
                for sep in ["", " ", "-", "."] {
                    let t = format!("{a}{sep}{b}");
                    assert_eq!(
                        fast(set, t.as_bytes()),
                        slow(set, t.as_bytes()),
                        "{set:?} {t:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn masked_text_matches_the_reference_spans() {
    // The rewrite uses the fast path; check one full round on the realistic pieces.
    for piece in PIECES {
        let t = format!("note: {piece} end");
        let spans = slow(DetectorSet::all(), t.as_bytes());
        let mut expected = Vec::new();
        let mut last = 0;
        for (_, r) in &spans {
            expected.extend_from_slice(&t.as_bytes()[last..r.start]);
            expected.extend_from_slice(b"****");
            last = r.end;
        }
        expected.extend_from_slice(&t.as_bytes()[last..]);
        let got = mask_text(DetectorSet::all(), MaskStrategy::Redact, None, t.as_bytes());
        assert_eq!(&*got, &expected[..], "{t:?}");
    }
}
