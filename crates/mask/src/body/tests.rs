use super::*;
use crate::policy::MaskSpec;
use crate::Detector;
use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just};
use proptest::strategy::Strategy as Gen;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Value};

fn spec(paths: &[&str], detectors: &[&str], strategy: &str) -> MaskSpec {
    MaskSpec {
        json_paths: paths.iter().map(|s| s.to_string()).collect(),
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        strategy: strategy.into(),
        ..MaskSpec::default()
    }
}

fn plan(specs: &[MaskSpec]) -> BodyPlan {
    let key = MaskKey::new(&[9u8; 32]).unwrap();
    Policy::from_specs(specs, Some(key)).unwrap().body_plan(&[])
}

/// Feeds `body` in the given chunk sizes (cycled), then finishes.
fn run_chunked(
    plan: &BodyPlan,
    kind: BodyKind,
    body: &[u8],
    sizes: &[usize],
) -> Result<(Vec<u8>, BodySummary), BodyError> {
    let mut m = BodyMasker::new(plan, kind);
    let mut out = Vec::new();
    let mut rest = body;
    let mut k = 0;
    while !rest.is_empty() {
        let n = sizes[k % sizes.len()].clamp(1, rest.len());
        k += 1;
        m.feed(&rest[..n], &mut out)?;
        rest = &rest[n..];
    }
    let summary = m.finish(&mut out)?;
    Ok((out, summary))
}

fn run(plan: &BodyPlan, kind: BodyKind, body: &str) -> Result<(String, BodySummary), BodyError> {
    let (out, s) = run_chunked(plan, kind, body.as_bytes(), &[usize::MAX])?;
    Ok((String::from_utf8(out).unwrap(), s))
}

fn json_out(plan: &BodyPlan, body: &str) -> String {
    let (out, _) = run(plan, BodyKind::Json, body).unwrap();
    serde_json::from_str::<Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    out
}

#[test]
fn paths_mask_nested_values_and_keep_the_rest_verbatim() {
    let p = plan(&[spec(
        &["$.user.email", "$.cards[*].number", "$..ssn"],
        &[],
        "redact",
    )]);
    let body = r#"{ "user": {"email": "ann@example.com", "name": "Ann"},
  "cards": [{"number": "4242424242424242", "exp": "12/30"}, {"number": 5555555555554444}],
  "deep": [{"x": {"ssn": "078-05-1120"}}], "ssn": 123456789, "id": 7 }"#;
    let (out, summary) = run(&p, BodyKind::Json, body).unwrap();
    assert_eq!(
        out,
        r#"{ "user": {"email": "****", "name": "Ann"},
  "cards": [{"number": "****", "exp": "12/30"}, {"number": "****"}],
  "deep": [{"x": {"ssn": "****"}}], "ssn": "****", "id": 7 }"#
    );
    assert_eq!(summary.masked_values, 5);
    assert_eq!(summary.reasons, vec![Reason::Column { rule: 0 }]);
    assert!(summary.json);
}

#[test]
fn a_selected_container_masks_every_scalar_inside() {
    let p = plan(&[spec(&["$.profile"], &[], "redact")]);
    let out = json_out(
        &p,
        r#"{"profile":{"a":"x","b":[1,true,null,{"c":"y"}]},"keep":"z"}"#,
    );
    assert_eq!(
        out,
        r#"{"profile":{"a":"****","b":["****",true,null,{"c":"****"}]},"keep":"z"}"#
    );
    // `null` makes the container itself null, however deep it goes.
    let p = plan(&[spec(&["$.profile"], &[], "null")]);
    let out = json_out(&p, r#"{"profile":{"a":{"b":[1,{"c":2}]}},"keep":[1]}"#);
    assert_eq!(out, r#"{"profile":null,"keep":[1]}"#);
    // A scalar selected directly: a boolean is masked too, null stays null.
    let p = plan(&[spec(&["$.flag", "$.none"], &[], "redact")]);
    assert_eq!(
        json_out(&p, r#"{"flag":true,"none":null}"#),
        r#"{"flag":"****","none":null}"#
    );
}

#[test]
fn strategies_partial_hash_null_on_paths_and_detectors() {
    let p = plan(&[spec(&["$.a"], &[], "partial")]);
    assert_eq!(json_out(&p, r#"{"a":"abcdefgh"}"#), r#"{"a":"****efgh"}"#);
    let p = plan(&[spec(&["$.a"], &[], "hash")]);
    let out = json_out(&p, r#"{"a":"jane@example.com","b":"jane@example.com"}"#);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["a"].as_str().unwrap().starts_with("h:"), "{out}");
    let p = plan(&[spec(&[], &["email"], "null")]);
    // In a string a match is free text: redacted in place; a whole value stays a string.
    assert_eq!(
        json_out(&p, r#"["mail bob@example.org now"]"#),
        r#"["mail **** now"]"#
    );
    let p = plan(&[spec(&[], &["credit_card"], "null")]);
    assert_eq!(json_out(&p, r#"[4111111111111111]"#), r#"[null]"#);
}

#[test]
fn detectors_mask_values_and_numbers_but_not_keys() {
    let p = plan(&[spec(&[], &["email", "credit_card"], "partial")]);
    let (out, s) = run(
        &p,
        BodyKind::Json,
        r#"{"bob@example.org": "write to jane@example.com", "card": 4111111111111111, "n": [1, 2.5e3, -0]}"#,
    )
    .unwrap();
    assert_eq!(
        out,
        r#"{"bob@example.org": "write to ****@example.com", "card": "************1111", "n": [1, 2.5e3, -0]}"#
    );
    assert_eq!(s.masked_values, 2);
    assert_eq!(
        s.reasons,
        vec![
            Reason::Detector(Detector::Email),
            Reason::Detector(Detector::CreditCard)
        ]
    );
}

#[test]
fn escapes_are_decoded_before_detection_and_written_back_escaped() {
    let p = plan(&[spec(&[], &["email"], "redact")]);
    // `\u0040` is `@`: no bypass.
    assert_eq!(json_out(&p, r#"{"m":"a\u0040b.com"}"#), r#"{"m":"****"}"#);
    // Unmasked parts are re-escaped: quotes, backslashes, controls; é and 😀 decoded.
    let out = json_out(
        &p,
        r#"["say \"hi\" \\ caf\u00e9 \ud83d\ude00 \t to x@example.org"]"#,
    );
    assert_eq!(out, "[\"say \\\"hi\\\" \\\\ café 😀 \\t to ****\"]");
    // Keys are decoded before paths compare them, and written back as they came.
    let p2 = plan(&[spec(&["$.email"], &[], "redact")]);
    assert_eq!(
        json_out(&p2, r#"{"e\u006dail":"x","email2":"y"}"#),
        r#"{"e\u006dail":"****","email2":"y"}"#
    );
    // Clean strings keep their escapes byte for byte.
    let clean = r#"["caf\u00e9 \"q\" \/ \ud83d\ude00 \ud800"]"#;
    assert_eq!(run(&p, BodyKind::Json, clean).unwrap().0, clean);
}

#[test]
fn decode_handles_every_escape() {
    let mut out = Vec::new();
    decode(
        br#"\"\\\/\b\f\n\r\t\u0041\u00e9\ud83d\ude00\udc00x"#,
        &mut out,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "\"\\/\u{8}\u{c}\n\r\tAé😀\u{fffd}x"
    );
    let mut out = Vec::new();
    write_json_string(b"a\"b\\c\nd\x01", &mut out);
    assert_eq!(out, br#""a\"b\\c\nd\u0001""#);
}

#[test]
fn invalid_or_truncated_json_is_an_error_that_leaks_nothing() {
    let p = plan(&[spec(&[], &["email"], "redact")]);
    for (body, at) in [
        (r#"{"a":1,}"#, 7),
        (r#"[1,]"#, 3),
        (r#"{"a" 1}"#, 5),
        (r#"{"a":tru}"#, 8),
        (r#"[01]"#, 3),
        (r#"[1.]"#, 3),
        (r#"["\x"]"#, 3),
        (r#"["\u12G4"]"#, 6),
        ("[\"a\nb\"]", 3),
        (r#"{"a":1}}"#, 7),
        (r#"{"a":1} x"#, 8),
        (r#"secret@example.com"#, 0),
        ("\u{feff}[\u{feff}]", 4),
    ] {
        let e = run(&p, BodyKind::Json, body).unwrap_err();
        assert_eq!(e, BodyError::InvalidJson { at }, "{body}");
        assert!(!e.to_string().contains("example"), "{e}");
    }
    for body in [r#"{"a":"jane@exam"#, r#"{"a":"#, "[1,2", r#"{"a":tr"#, "-"] {
        let e = run(&p, BodyKind::Json, body).unwrap_err();
        assert_eq!(
            e,
            if body == "-" {
                BodyError::InvalidJson { at: 1 }
            } else {
                BodyError::Truncated {
                    at: body.len() as u64,
                }
            },
            "{body}"
        );
        assert!(!e.to_string().contains("jane"), "{e}");
    }
    assert_eq!(
        BodyError::Truncated { at: 12 }.to_string(),
        "response body ends inside a JSON value (after 12 bytes)"
    );
    // An error sticks: nothing more passes.
    let mut m = BodyMasker::new(&p, BodyKind::Json);
    let mut out = Vec::new();
    assert!(m.feed(b"[1,,", &mut out).is_err());
    assert!(m.feed(b"\"x@example.org\"]", &mut out).is_err());
    assert!(m.finish(&mut out).is_err());
    // Top-level scalars, a BOM, and an empty body are fine.
    assert_eq!(json_out(&p, "42"), "42");
    assert_eq!(json_out(&p, " \"a@example.org\" "), " \"****\" ");
    assert_eq!(
        run(&p, BodyKind::Json, "\u{feff}[]").unwrap().0,
        "\u{feff}[]"
    );
    assert_eq!(run(&p, BodyKind::Json, "  ").unwrap().0, "  ");
}

#[test]
fn depth_and_length_limits() {
    let p = plan(&[spec(&[], &["email"], "redact")]);
    let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert_eq!(run(&p, BodyKind::Json, &ok).unwrap().0, ok);
    let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
    assert_eq!(
        run(&p, BodyKind::Json, &deep).unwrap_err(),
        BodyError::TooDeep {
            at: MAX_DEPTH as u64,
            limit: MAX_DEPTH
        }
    );
    let long = format!("[\"{}\"]", "a".repeat(MAX_SCALAR + 1));
    let e = run_chunked(&p, BodyKind::Json, long.as_bytes(), &[1 << 16]).unwrap_err();
    assert!(
        matches!(
            e,
            BodyError::TooLong {
                limit: MAX_SCALAR,
                ..
            }
        ),
        "{e}"
    );
    // Without detectors or paths on it, a long string streams through, unheld.
    let p = plan(&[spec(&["$.x"], &[], "redact")]);
    let (out, _) = run_chunked(&p, BodyKind::Json, long.as_bytes(), &[1 << 16]).unwrap();
    assert_eq!(out, long.as_bytes());
    let long_key = format!("{{\"{}\":1}}", "k".repeat(MAX_KEY + 1));
    assert!(matches!(
        run(&p, BodyKind::Json, &long_key).unwrap_err(),
        BodyError::TooLong { limit: MAX_KEY, .. }
    ));
}

#[test]
fn a_large_body_streams_in_bounded_memory() {
    let p = plan(&[spec(&["$..secret"], &["email", "credit_card"], "redact")]);
    let mut m = BodyMasker::new(&p, BodyKind::Json);
    let mut out = Vec::new();
    let record = br#"{"id":12345,"secret":{"k":"v"},"note":"contact jane.doe@example.com about card 4111 1111 1111 1111 and nothing else at all here","tags":["a","b","c"],"ok":true},"#;
    let mut chunk = b"[".to_vec();
    while chunk.len() < 64 << 10 {
        chunk.extend_from_slice(record);
    }
    let per_chunk = (chunk.len() - 1) / record.len();
    let (mut fed, mut feeds, mut written, mut max_buf) = (0usize, 0u64, 0usize, 0usize);
    while fed < 50 << 20 {
        m.feed(&chunk, &mut out).unwrap();
        fed += chunk.len();
        feeds += 1;
        written += out.len();
        assert!(!out.windows(8).any(|w| w == b"jane.doe"));
        out.clear();
        max_buf = max_buf.max(m.buffer_capacity());
        chunk.drain(..usize::from(chunk[0] == b'['));
    }
    m.feed(b"{}]", &mut out).unwrap();
    let s = m.finish(&mut out).unwrap();
    assert!(written > 40 << 20);
    assert!(max_buf < 16 << 10, "masker held {max_buf} bytes");
    // Per record: the `secret` member, the e-mail and the card.
    assert_eq!(s.masked_values, 3 * per_chunk as u64 * feeds);
    assert_eq!(
        s.reasons,
        vec![
            Reason::Column { rule: 0 },
            Reason::Detector(Detector::Email),
            Reason::Detector(Detector::CreditCard)
        ]
    );
}

#[test]
fn text_matches_split_across_chunks_are_masked() {
    let p = plan(&[spec(&[], &["email", "credit_card"], "partial")]);
    let body = b"hello jane.doe@example.com, card 4111 1111 1111 1111\nbye x@example.org";
    for at in 0..=body.len() {
        let mut m = BodyMasker::new(&p, BodyKind::Text);
        let mut out = Vec::new();
        m.feed(&body[..at], &mut out).unwrap();
        m.feed(&body[at..], &mut out).unwrap();
        let s = m.finish(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "hello ****@example.com, card **** **** **** 1111\nbye ****@example.org",
            "split at {at}"
        );
        assert_eq!(s.masked_values, 3);
        assert!(!s.json);
    }
}

#[test]
fn text_holds_a_bounded_tail() {
    let p = plan(&[spec(&[], &["email", "pem_private_key"], "redact")]);
    // Complete lines go out at once; the incomplete last line is held.
    let mut m = BodyMasker::new(&p, BodyKind::Text);
    let mut out = Vec::new();
    m.feed(b"line one a@example.org\nline two b@exa", &mut out)
        .unwrap();
    assert_eq!(out, b"line one ****\n");
    // A line without a newline is cut at whitespace past the hold.
    let mut m = BodyMasker::new(&p, BodyKind::Text);
    let mut out = Vec::new();
    let words = "word a@example.org ".repeat(TEXT_LINE_HOLD / 10);
    m.feed(words.as_bytes(), &mut out).unwrap();
    assert!(out.len() > words.len() / 2, "flushed {}", out.len());
    assert!(m.buffer_capacity() <= 2 * words.len());
    m.finish(&mut out).unwrap();
    assert_eq!(out, "word **** ".repeat(TEXT_LINE_HOLD / 10).as_bytes());
    // A PEM key is held across lines until its END line, whatever the chunking.
    let pem = "x\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\ny\n";
    for size in [1, 3, 7, 16, 64] {
        let (out, _) = run_chunked(&p, BodyKind::Text, pem.as_bytes(), &[size]).unwrap();
        assert_eq!(out, b"x\n****\ny\n", "chunks of {size}");
    }
    // A whitespace-free run longer than the hard bound is flushed (bounded memory).
    let mut m = BodyMasker::new(&p, BodyKind::Text);
    let mut out = Vec::new();
    for _ in 0..40 {
        m.feed(&[b'z'; 64 << 10], &mut out).unwrap();
        assert!(m.buffer_capacity() <= 4 * TEXT_MAX_HOLD);
    }
    m.finish(&mut out).unwrap();
    assert_eq!(out.len(), 40 * (64 << 10));
}

#[test]
fn long_lines_are_cut_only_where_no_match_is() {
    let set = DetectorSet::EMPTY
        .with(Detector::Email)
        .with(Detector::CreditCard)
        .with(Detector::Phone)
        .with(Detector::Iban);
    let p = plan(&[spec(
        &[],
        &["email", "credit_card", "phone", "iban"],
        "redact",
    )]);
    // No newline for 300 KiB; matches with spaces inside sit everywhere.
    let unit = "pay 4111 1111 1111 1111 or call +1 415 555 0100, IBAN GB82 WEST 1234 5698 7654 32, mail a.b@example.com; ";
    let body = unit.repeat((300 << 10) / unit.len());
    let expected = crate::mask_text(set, Strategy::Redact, None, body.as_bytes());
    for size in [1000, 4093, 8192, 65537] {
        let (out, s) = run_chunked(&p, BodyKind::Text, body.as_bytes(), &[size]).unwrap();
        assert!(out == *expected, "chunks of {size}");
        assert_eq!(s.masked_values, 4 * (body.len() / unit.len()) as u64);
    }
}

#[test]
fn kinds_from_content_type() {
    for (ct, kind) in [
        (Some("application/json"), BodyKind::Json),
        (Some("application/JSON; charset=utf-8"), BodyKind::Json),
        (Some("application/problem+json"), BodyKind::Json),
        (Some("text/html; charset=utf-8"), BodyKind::Text),
        (Some("application/x-ndjson"), BodyKind::Text),
        (Some("application/octet-stream"), BodyKind::Text),
        (Some("garbage"), BodyKind::Sniff),
        (None, BodyKind::Sniff),
    ] {
        assert_eq!(BodyKind::for_content_type(ct), kind, "{ct:?}");
    }
}

#[test]
fn sniff_picks_json_or_text() {
    let p = plan(&[spec(&["$.a"], &["email"], "redact")]);
    for (body, json) in [
        (" \n {\"a\":1}", true),
        ("\u{feff}[\"x@example.org\"]", true),
        ("\"x@example.org\"", true),
        ("x@example.org {\"a\":1}", false),
        ("\u{feff}hello a@example.org", false),
        ("", false),
        ("   ", false),
    ] {
        for size in [1, 2, 100] {
            let (out, s) = run_chunked(&p, BodyKind::Sniff, body.as_bytes(), &[size]).unwrap();
            assert_eq!(s.json, json, "{body:?}");
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains("example.org"), "{out}");
            if json {
                assert!(!out.contains("\"a\":1"), "{out}");
            }
        }
    }
    // Text that starts like nothing JSON: invalid JSON is not an error there.
    assert_eq!(run(&p, BodyKind::Sniff, "oops {").unwrap().0, "oops {");
}

#[test]
fn groups_and_inactive_plans() {
    let mut s = spec(&["$.a"], &[], "redact");
    s.except_groups = vec!["sre".into()];
    let policy = Policy::from_specs(&[s], None).unwrap();
    assert!(policy.body_plan(&[]).is_active());
    let sre = policy.body_plan(&["sre".into()]);
    assert!(!sre.is_active());
    // Inactive: passed through untouched, even if it is not JSON.
    assert_eq!(run(&sre, BodyKind::Json, "{\"a\":1").unwrap().0, "{\"a\":1");
    assert!(!BodyPlan::passthrough().is_active());
    // Column rules have no meaning in a body.
    let cols = MaskSpec {
        columns: vec!["email".into()],
        strategy: "redact".into(),
        ..MaskSpec::default()
    };
    assert!(!Policy::from_specs(&[cols], None)
        .unwrap()
        .body_plan(&[])
        .is_active());
    // Paths only: text bodies pass through.
    let p = plan(&[spec(&["$.a"], &[], "redact")]);
    assert_eq!(run(&p, BodyKind::Text, "a@b.io").unwrap().0, "a@b.io");
}

#[test]
fn first_rule_wins_for_paths_and_detectors() {
    let p = plan(&[
        spec(&["$.a"], &["email"], "partial"),
        spec(&["$.a", "$.b"], &["email"], "redact"),
    ]);
    let (out, s) = run(
        &p,
        BodyKind::Json,
        r#"{"a":"abcdefgh","b":"x","c":"jane@example.com"}"#,
    )
    .unwrap();
    assert_eq!(out, r#"{"a":"****efgh","b":"****","c":"****@example.com"}"#);
    assert_eq!(
        s.reasons,
        vec![
            Reason::Column { rule: 0 },
            Reason::Column { rule: 1 },
            Reason::Detector(Detector::Email)
        ]
    );
}

// ------------------------------------------------------------------------------ properties

fn arb_json() -> impl Gen<Value = Value> {
    let email = "[a-z]{1,8}\\.[a-z]{1,8}@[a-z]{2,8}\\.(com|org|net)".prop_map(Value::String);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::String),
        "\\PC{0,8}".prop_map(Value::String),
        email.clone(),
        ("[a-z ]{0,6}", email.clone(), "[a-z \"\\\\\n]{0,6}")
            .prop_map(|(a, e, b)| Value::String(format!("{a} {}{b}", e.as_str().unwrap()))),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("(secret|[a-z\"\\\\]{1,5})", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn collect_emails(v: &Value, acc: &mut Vec<String>) {
    match v {
        Value::String(s) => acc.extend(
            s.split([' ', '"', '\\', '\n'])
                .filter(|w| generated_email(w))
                .map(String::from),
        ),
        Value::Array(a) => a.iter().for_each(|x| collect_emails(x, acc)),
        Value::Object(m) => m.values().for_each(|x| collect_emails(x, acc)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn chunking_never_changes_the_output(
        v in arb_json(),
        pretty in any::<bool>(),
        sizes in prop::collection::vec(1usize..9, 1..6),
    ) {
        let p = plan(&[spec(&["$..secret"], &["email"], "partial")]);
        let body = if pretty { serde_json::to_vec_pretty(&v) } else { serde_json::to_vec(&v) }
            .unwrap();
        let (whole, s1) = run_chunked(&p, BodyKind::Json, &body, &[usize::MAX]).unwrap();
        let (chunked, s2) = run_chunked(&p, BodyKind::Json, &body, &sizes).unwrap();
        prop_assert_eq!(&whole, &chunked);
        prop_assert_eq!(s1, s2);
        let parsed: Value = serde_json::from_slice(&whole).unwrap();
        let text = String::from_utf8(whole).unwrap();
        let mut emails = Vec::new();
        collect_emails(&v, &mut emails);
        for e in emails {
            let local = &e[..e.find('@').unwrap()];
            prop_assert!(!text.contains(&format!("{local}@")), "{} in {}", e, text);
        }
        // Same structure: every array keeps its length, every object its keys.
        prop_assert!(same_shape(&v, &parsed, false), "{} vs {}", v, parsed);
    }

    #[test]
    fn text_chunking_never_changes_the_output(
        words in prop::collection::vec(
            prop_oneof![
                "[a-z]{1,6}", "[a-z]{1,5}@[a-z]{2,5}\\.com", Just("4111 1111 1111 1111".to_string()),
                Just("\n".to_string()), "[ ,.;]{1,2}",
            ],
            0..60,
        ),
        sizes in prop::collection::vec(1usize..9, 1..6),
    ) {
        let p = plan(&[spec(&[], &["email", "credit_card", "phone"], "redact")]);
        let body = words.join(" ");
        let expected = crate::mask_text(
            DetectorSet::EMPTY.with(Detector::Email).with(Detector::CreditCard).with(Detector::Phone),
            Strategy::Redact,
            None,
            body.as_bytes(),
        );
        let (chunked, _) = run_chunked(&p, BodyKind::Text, body.as_bytes(), &sizes).unwrap();
        prop_assert_eq!(String::from_utf8_lossy(&chunked), String::from_utf8_lossy(&expected));
    }
}

/// The shape the generator gives e-mails: `a.b@c.com`.
fn generated_email(w: &str) -> bool {
    let Some((local, domain)) = w.split_once('@') else {
        return false;
    };
    let lower = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    local
        .split_once('.')
        .is_some_and(|(a, b)| lower(a) && lower(b))
        && domain
            .split_once('.')
            .is_some_and(|(d, tld)| lower(d) && matches!(tld, "com" | "org" | "net"))
}

/// Whether `masked` has the structure of `orig`: containers alike, scalars anywhere (a masked
/// scalar is a string or null); inside a `secret` member, everything is masked.
fn same_shape(orig: &Value, masked: &Value, secret: bool) -> bool {
    match (orig, masked) {
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_shape(x, y, secret))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter().all(|(k, x)| {
                    b.get(k)
                        .is_some_and(|y| same_shape(x, y, secret || k == "secret"))
                })
        }
        (Value::Array(_) | Value::Object(_), _) => false,
        (Value::String(_) | Value::Number(_), y) if secret => y.is_string(),
        _ => true,
    }
}
