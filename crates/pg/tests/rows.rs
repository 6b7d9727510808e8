//! DataRow, COPY and free-text rewriting through a compiled policy.

use proptest::prelude::*;
use tollgate_mask::Strategy as Mask;
use tollgate_mask::*;
use tollgate_pg::rows::{column_info, CopyFormat, Format, Malformed, RowMasking, RowOutcome};

fn col(name: &str, table: Option<&str>, oid: u32, format: Format) -> ColumnInfo {
    column_info(name, table, oid, format)
}

fn spec(columns: &[&str], detectors: &[&str], strategy: &str) -> MaskSpec {
    MaskSpec {
        columns: columns.iter().map(|s| s.to_string()).collect(),
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        strategy: strategy.into(),
        ..MaskSpec::default()
    }
}

fn key() -> MaskKey {
    MaskKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

fn data_row(fields: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = (fields.len() as i16).to_be_bytes().to_vec();
    for f in fields {
        match f {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b
}

fn parse_row(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes(body[pos..pos + 4].try_into().unwrap());
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(body[pos..pos + len as usize].to_vec()));
            pos += len as usize;
        }
    }
    assert_eq!(pos, body.len(), "lengths add up to the body");
    out
}

fn shop_policy() -> Policy {
    let mut sre = spec(&["email"], &[], "partial");
    sre.except_groups = vec!["sre".into()];
    Policy::from_specs(
        &[
            sre,
            spec(&["*ssn*"], &[], "null"),
            spec(&["customers.card_*"], &[], "partial"),
            spec(&["user_id_hash*"], &[], "hash"),
            spec(
                &[],
                &[
                    "credit_card",
                    "email",
                    "us_ssn",
                    "iban",
                    "phone",
                    "jwt",
                    "aws_key",
                ],
                "redact",
            ),
        ],
        Some(key()),
    )
    .unwrap()
}

fn shop_columns(format: Format) -> Vec<ColumnInfo> {
    vec![
        col("id", Some("customers"), 20, format),
        col("email", Some("customers"), 25, format),
        col("ssn", Some("customers"), 1043, format),
        col("card_number", Some("customers"), 25, format),
        col("notes", Some("customers"), 25, format),
        col("user_id_hash", None, 25, format),
    ]
}

#[test]
fn data_row_text_masks_columns_and_content() {
    let plan = shop_policy().plan(&shop_columns(Format::Text), &["agents".into()]);
    let body = data_row(&[
        Some(b"42"),
        Some(b"jane@example.com"),
        Some(b"078-05-1120"),
        Some(b"4242 4242 4242 4242"),
        Some(b"call +1 415 555 2671 or mail bob@example.org"),
        Some(b"u-1001"),
    ]);
    let mut out = Vec::new();
    let outcome = plan.mask_data_row(&body, &mut out).unwrap();
    let fields = parse_row(&out);
    assert_eq!(fields[0].as_deref(), Some(&b"42"[..]));
    assert_eq!(fields[1].as_deref(), Some(&b"****@example.com"[..]));
    assert_eq!(fields[2], None, "ssn under strategy null");
    assert_eq!(fields[3].as_deref(), Some(&b"**** **** **** 4242"[..]));
    assert_eq!(fields[4].as_deref(), Some(&b"call **** or mail ****"[..]));
    let hashed = fields[5].clone().unwrap();
    assert!(hashed.starts_with(b"h:") && hashed.len() == 18);
    let RowOutcome::Rewritten(masked) = outcome else {
        panic!("expected a rewrite")
    };
    let summary: Vec<_> = masked
        .iter()
        .map(|f| (f.column, f.reason, f.nulled))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, Reason::Column { rule: 0 }, false),
            (2, Reason::Column { rule: 1 }, true),
            (3, Reason::Column { rule: 2 }, false),
            (4, Reason::Detector(Detector::Phone), false),
            (5, Reason::Column { rule: 3 }, false),
        ]
    );

    // Same value, same pseudonym: joins on masked output still line up.
    let mut again = Vec::new();
    plan.mask_data_row(&body, &mut again).unwrap();
    assert_eq!(parse_row(&again)[5], fields[5]);
}

#[test]
fn groups_see_more_and_clean_rows_are_unchanged() {
    let policy = shop_policy();
    let sre = policy.plan(&shop_columns(Format::Text), &["sre".into()]);
    let body = data_row(&[
        Some(b"1"),
        Some(b"jane@example.com"),
        None,
        None,
        Some(b"fine"),
        None,
    ]);
    let mut out = Vec::new();
    // The SRE is exempt from the column rule on `email`, but the content rule still applies.
    let RowOutcome::Rewritten(m) = sre.mask_data_row(&body, &mut out).unwrap() else {
        panic!()
    };
    assert_eq!(m[0].reason, Reason::Detector(Detector::Email));
    assert_eq!(parse_row(&out)[1].as_deref(), Some(&b"****"[..]));

    let clean = data_row(&[
        Some(b"1"),
        None,
        None,
        None,
        Some(b"all good here, order 12345"),
        None,
    ]);
    let mut out = Vec::new();
    assert_eq!(
        sre.mask_data_row(&clean, &mut out).unwrap(),
        RowOutcome::Unchanged
    );
    assert!(
        out.is_empty() && out.capacity() == 0,
        "no allocation on the clean path"
    );

    let nothing = Policy::from_specs(&[spec(&["nope"], &[], "redact")], None)
        .unwrap()
        .plan(&shop_columns(Format::Text), &[]);
    assert!(!nothing.is_active());
    assert_eq!(
        nothing.mask_data_row(&body, &mut out).unwrap(),
        RowOutcome::Unchanged
    );
    assert_eq!(
        RowPlan::passthrough()
            .mask_data_row(&body, &mut out)
            .unwrap(),
        RowOutcome::Unchanged
    );
}

#[test]
fn data_row_appends_to_existing_output_and_keeps_it_on_error() {
    let plan = shop_policy().plan(&shop_columns(Format::Text), &[]);
    let mut out = b"prefix".to_vec();
    let body = data_row(&[Some(b"1"), Some(b"a@b.io"), None, None, None, None]);
    plan.mask_data_row(&body, &mut out).unwrap();
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(parse_row(&out[6..])[1].as_deref(), Some(&b"****@b.io"[..]));

    let mut out = b"prefix".to_vec();
    let short = data_row(&[Some(b"1"), Some(b"a@b.io")]);
    assert_eq!(
        plan.mask_data_row(&short, &mut out),
        Err(Malformed::ColumnCount {
            expected: 6,
            found: 2
        })
    );
    let mut truncated = body.clone();
    truncated.pop();
    assert_eq!(
        plan.mask_data_row(&truncated, &mut out),
        Err(Malformed::Truncated)
    );
    let mut trailing = body.clone();
    trailing.push(0);
    assert_eq!(
        plan.mask_data_row(&trailing, &mut out),
        Err(Malformed::TrailingBytes(1))
    );
    let mut bad = data_row(&[Some(b"1"), None, None, None, None, None]);
    bad[7..11].copy_from_slice(&(-2i32).to_be_bytes());
    assert_eq!(
        plan.mask_data_row(&bad, &mut out),
        Err(Malformed::BadLength { column: 1, len: -2 })
    );
    assert_eq!(
        plan.mask_data_row(&[0xff, 0xff], &mut out),
        Err(Malformed::BadCount(-1))
    );
    assert_eq!(out, b"prefix");
}

#[test]
fn binary_format_is_type_correct() {
    let policy = Policy::from_specs(
        &[
            spec(&["secret_num", "tags"], &[], "partial"),
            spec(&[], &["credit_card", "email"], "redact"),
        ],
        None,
    )
    .unwrap();
    let cols = vec![
        col("secret_num", None, 23, Format::Binary), // int4 under a column rule: NULL
        col("tags", None, 1043, Format::Binary),     // varchar: in place
        col("card", None, 20, Format::Binary),       // int8 holding a card number: NULL
        col("doc", None, 3802, Format::Binary),      // jsonb: version byte + text
        col("amount", None, 701, Format::Binary),    // float8: never scanned
        col("blob", None, 99999, Format::Binary),    // unknown type: scanned raw, NULL on a match
    ];
    let plan = policy.plan(&cols, &[]);
    let card = 4111111111111111i64.to_be_bytes();
    let mut jsonb = vec![1u8];
    jsonb.extend_from_slice(br#"{"email": "jane@example.com", "n": 1}"#);
    let body = data_row(&[
        Some(&7i32.to_be_bytes()),
        Some(b"vip-customer"),
        Some(&card),
        Some(&jsonb),
        Some(&1.5f64.to_be_bytes()),
        Some(b"\x00\x01mail a@b.io"),
    ]);
    let mut out = Vec::new();
    plan.mask_data_row(&body, &mut out).unwrap();
    let f = parse_row(&out);
    assert_eq!(f[0], None);
    assert_eq!(f[1].as_deref(), Some(&b"***-****omer"[..]));
    assert_eq!(f[2], None);
    assert_eq!(
        f[3].as_deref(),
        Some(&b"\x01{\"email\": \"****\", \"n\": 1}"[..])
    );
    assert_eq!(f[4].as_deref(), Some(&1.5f64.to_be_bytes()[..]));
    assert_eq!(f[5], None);

    let small = data_row(&[None, None, Some(&42i64.to_be_bytes()), None, None, None]);
    assert_eq!(
        plan.mask_data_row(&small, &mut Vec::new()).unwrap(),
        RowOutcome::Unchanged
    );
}

#[test]
fn text_format_non_text_types_become_null() {
    let policy =
        Policy::from_specs(&[spec(&[], &["credit_card", "ipv4"], "partial")], None).unwrap();
    let cols = vec![
        col("n", None, 20, Format::Text),
        col("addr", None, 869, Format::Text),
        col("doc", None, 114, Format::Text),
    ];
    let plan = policy.plan(&cols, &[]);
    let body = data_row(&[
        Some(b"4111111111111111"),
        Some(b"10.1.2.3"),
        Some(br#"{"ip":"10.1.2.3","card":4111111111111111}"#),
    ]);
    let mut out = Vec::new();
    plan.mask_data_row(&body, &mut out).unwrap();
    let f = parse_row(&out);
    assert_eq!(f[0], None);
    assert_eq!(f[1], None);
    assert_eq!(
        f[2].as_deref(),
        Some(&br#"{"ip":"**.*.2.3","card":"************1111"}"#[..])
    );
}

#[test]
fn whole_json_columns_stay_json() {
    let policy = Policy::from_specs(
        &[
            spec(&["profile"], &[], "redact"),
            spec(&["doc"], &[], "hash"),
        ],
        Some(key()),
    )
    .unwrap();
    let plan = policy.plan(
        &[
            col("profile", None, 3802, Format::Text),
            col("doc", None, 114, Format::Text),
        ],
        &[],
    );
    let body = data_row(&[Some(br#"{"a":1}"#), Some(br#"[1,2]"#)]);
    let mut out = Vec::new();
    plan.mask_data_row(&body, &mut out).unwrap();
    let f = parse_row(&out);
    assert_eq!(f[0].as_deref(), Some(&b"\"****\""[..]));
    let doc = String::from_utf8(f[1].clone().unwrap()).unwrap();
    assert!(
        doc.starts_with("\"h:") && doc.ends_with('"') && doc.len() == 20,
        "{doc}"
    );
}

#[test]
fn copy_text_csv_and_binary() {
    let policy = shop_policy();
    let plan = policy.plan(&shop_columns(Format::Text), &[]);
    let mut out = Vec::new();
    let row = b"1\tjane@example.com\t078-05-1120\t\\N\tline one\\nmail bob@example.org\\tx\t\\N\n";
    let RowOutcome::Rewritten(m) = plan
        .mask_copy_data(CopyFormat::TEXT, row, &mut out)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(m.len(), 3);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "1\t****@example.com\t\\N\t\\N\tline one\\nmail ****\\tx\t\\N\n"
    );

    let mut out = Vec::new();
    let row = b"1,jane@example.com,,\"4242,4242\",\"she said \"\"hi\"\" to a@b.io\",u1\n";
    plan.mask_copy_data(CopyFormat::CSV, row, &mut out).unwrap();
    let csv = String::from_utf8(out).unwrap();
    assert!(
        csv.starts_with(
            "1,\"****@example.com\",,\"****,4242\",\"she said \"\"hi\"\" to ****\",\"h:"
        ),
        "{csv}"
    );
    assert!(csv.ends_with("\"\n"), "{csv}");
    let clean = b"1,,,,plain,\n";
    assert_eq!(
        plan.mask_copy_data(CopyFormat::CSV, clean, &mut Vec::new())
            .unwrap(),
        RowOutcome::Unchanged
    );
    assert_eq!(
        plan.mask_copy_data(CopyFormat::CSV, b"1,\"open\n", &mut Vec::new()),
        Err(Malformed::UnterminatedQuote { column: 1 })
    );

    let bin_plan = policy.plan(&shop_columns(Format::Binary), &[]);
    let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
    data.extend_from_slice(&0i32.to_be_bytes());
    data.extend_from_slice(&0i32.to_be_bytes());
    let tuple = data_row(&[
        Some(&1i64.to_be_bytes()),
        Some(b"jane@example.com"),
        None,
        None,
        Some(b"ok"),
        None,
    ]);
    data.extend_from_slice(&tuple);
    data.extend_from_slice(&tuple);
    data.extend_from_slice(&(-1i16).to_be_bytes());
    let mut out = Vec::new();
    let RowOutcome::Rewritten(m) = bin_plan
        .mask_copy_data(CopyFormat::Binary, &data, &mut out)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(m.len(), 2);
    assert!(out.starts_with(&data[..19]) && out.ends_with(&[0xff, 0xff]));
    let one = &out[19..out.len() - 2];
    assert_eq!(one.len() % 2, 0);
    let half = &one[..one.len() / 2];
    assert_eq!(
        parse_row(half)[1].as_deref(),
        Some(&b"****@example.com"[..])
    );
}

#[test]
fn undescribed_plans_and_free_text() {
    let plan = shop_policy().plan_undescribed(&[]);
    let mut out = Vec::new();
    plan.mask_copy_data(CopyFormat::TEXT, b"a\tjane@example.com\tc\td\n", &mut out)
        .unwrap();
    assert_eq!(out, b"a\t****\tc\td\n");
    let mut out = Vec::new();
    assert_eq!(
        plan.mask_value(3, b"ssn 078-05-1120", &mut out),
        Outcome::Masked(Reason::Detector(Detector::UsSsn))
    );
    assert_eq!(out, b"ssn ****");

    let detail = b"Key (email)=(jane@example.com) already exists.";
    let masked = mask_text(DetectorSet::all(), Mask::Hash, Some(&key()), detail);
    let masked = String::from_utf8(masked.into_owned()).unwrap();
    assert!(
        masked.starts_with("Key (email)=(h:") && !masked.contains("jane"),
        "{masked}"
    );
}

fn all_detectors_policy(strategy: &str) -> Policy {
    let names: Vec<&str> = Detector::ALL.iter().map(|d| d.name()).collect();
    Policy::from_specs(&[spec(&["masked_*"], &names, strategy)], Some(key())).unwrap()
}

fn sensitive_value() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"4111 1111 1111 1111".to_vec()),
        Just(b"jane.doe@example.com".to_vec()),
        Just(b"078-05-1120".to_vec()),
        Just(b"DE89370400440532013000".to_vec()),
        Just(b"+44 20 7946 0958".to_vec()),
        Just(b"AKIAIOSFODNN7EXAMPLE".to_vec()),
        Just(b"10.20.30.40".to_vec()),
        Just(b"Zx9Kq2LmP8vT4rW7yB1nC6dF".to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn data_row_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..200), ncols in 0usize..5) {
        let cols: Vec<_> = (0..ncols).map(|i| col(&format!("c{i}"), None, [25, 20, 3802, 0, 17][i % 5], if i % 2 == 0 { Format::Text } else { Format::Binary })).collect();
        let plan = all_detectors_policy("partial").plan(&cols, &[]);
        let mut out = Vec::new();
        match plan.mask_data_row(&body, &mut out) {
            Ok(RowOutcome::Unchanged) | Err(_) => prop_assert!(out.is_empty()),
            Ok(RowOutcome::Rewritten(_)) => { parse_row(&out); }
        }
        for f in [CopyFormat::TEXT, CopyFormat::CSV, CopyFormat::Binary] {
            let _ = plan.mask_copy_data(f, &body, &mut Vec::new());
        }
        let _ = mask_text(DetectorSet::all(), Mask::Partial { keep_last: 4 }, None, &body);
    }

    #[test]
    fn masked_rows_never_contain_the_detected_value(
        prefix in "[a-z ,.]{0,20}",
        secret in sensitive_value(),
        suffix in "[a-z ,.]{0,20}",
        strategy in prop_oneof![Just("redact"), Just("partial"), Just("hash"), Just("null")],
    ) {
        let mut value = prefix.into_bytes();
        value.push(b' ');
        value.extend_from_slice(&secret);
        value.push(b' ');
        value.extend_from_slice(suffix.as_bytes());
        let found = find(DetectorSet::all(), &value);
        prop_assert!(!found.is_empty());
        let plan = all_detectors_policy(strategy).plan(&[col("notes", None, 25, Format::Text), col("masked_x", None, 25, Format::Text)], &[]);
        let body = data_row(&[Some(&value), Some(&value)]);
        let mut out = Vec::new();
        prop_assert!(!plan.mask_data_row(&body, &mut out).unwrap().is_unchanged());
        for field in parse_row(&out).into_iter().flatten() {
            for m in &found {
                let original = &value[m.range.clone()];
                prop_assert!(!field.windows(original.len()).any(|w| w == original), "{:?} leaked in {:?}", String::from_utf8_lossy(original), String::from_utf8_lossy(&field));
            }
        }
    }
}
