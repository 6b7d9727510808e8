//! Throughput of the masking engine on one core, all detectors on.
//!
//! `cargo run --release -p tollgate-mask --example mask_bench [MB]` generates realistic rows
//! (names, e-mails, card numbers, prose, numbers, JSON) from a fixed seed and reports MB/s for:
//! scanning clean data, scanning mixed data, and rewriting DataRow bodies, each against a
//! baseline (a plain byte sum over the same data, i.e. what merely touching the bytes costs).

use std::hint::black_box;
use std::time::Instant;
use tollgate_mask::{
    matches, ColumnInfo, DetectorSet, Format, MaskKey, MaskSpec, Policy, RowOutcome,
};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const FIRST: &[&str] = &[
    "Jane", "John", "Amélie", "Oliver", "Priya", "Chen", "Fatima", "Lucas", "Sofia", "Noah",
    "Mateo", "Yuki",
];
const LAST: &[&str] = &[
    "Smith",
    "García",
    "Nguyen",
    "Müller",
    "Okafor",
    "Rossi",
    "Kowalski",
    "Andersson",
    "Tanaka",
    "Dubois",
];
const WORDS: &[&str] = &[
    "the",
    "order",
    "arrived",
    "late",
    "and",
    "customer",
    "asked",
    "for",
    "a",
    "refund",
    "please",
    "check",
    "status",
    "shipment",
    "delayed",
    "warehouse",
    "in",
    "Berlin",
    "invoice",
    "paid",
    "on",
    "time",
    "support",
    "ticket",
    "closed",
    "product",
    "quality",
    "excellent",
    "would",
    "buy",
    "again",
    "v2.1.0",
    "2024-01-15",
    "12:30",
    "qty",
    "3",
    "$19.99",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "corp.example.net",
    "example.co.uk",
];
const CARDS: &[&str] = &[
    "4111 1111 1111 1111",
    "5555555555554444",
    "378282246310005",
    "4242-4242-4242-4242",
    "6011111111111117",
];
const SECRETS: &[&str] = &[
    "078-05-1120",
    "+44 20 7946 0958",
    "(415) 555-2671",
    "DE89 3704 0044 0532 0130 00",
    "10.20.30.40",
    "2001:db8::1",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
];

fn prose(r: &mut XorShift, words: usize, sensitive: bool) -> String {
    let mut s = String::new();
    for k in 0..words {
        if k > 0 {
            s.push(' ');
        }
        if sensitive && r.below(12) == 0 {
            s.push_str(r.pick(SECRETS));
        } else {
            s.push_str(r.pick(WORDS));
        }
    }
    s
}

/// One row: id, name, email, card, notes, amount, json document.
fn row(r: &mut XorShift, sensitive: bool) -> Vec<Vec<u8>> {
    let first = r.pick(FIRST);
    let last = r.pick(LAST);
    let id = (100_000 + r.below(900_000)).to_string();
    let email = if sensitive {
        format!(
            "{}.{}{}@{}",
            first.to_lowercase(),
            last.to_lowercase(),
            r.below(100),
            r.pick(DOMAINS)
        )
    } else {
        format!("{} {}", r.pick(WORDS), r.pick(WORDS))
    };
    let card = if sensitive && r.below(2) == 0 {
        r.pick(CARDS).to_string()
    } else {
        format!("{}", r.below(1_000_000_000))
    };
    let nwords = 5 + r.below(40);
    let notes = prose(r, nwords, sensitive);
    let amount = format!("{}.{:02}", r.below(100_000), r.below(100));
    let json = format!(
        r#"{{"customer": {{"name": "{first} {last}", "tier": "{}", "contact": "{}"}}, "items": [{}, {}], "note": "{}"}}"#,
        r.pick(&["gold", "silver", "basic"]),
        if sensitive {
            email.clone()
        } else {
            "none".into()
        },
        r.below(1000),
        r.below(1000),
        prose(r, 6, sensitive)
    );
    vec![
        id.into_bytes(),
        format!("{first} {last}").into_bytes(),
        email.into_bytes(),
        card.into_bytes(),
        notes.into_bytes(),
        amount.into_bytes(),
        json.into_bytes(),
    ]
}

fn data_row(fields: &[Vec<u8>]) -> Vec<u8> {
    let mut b = (fields.len() as i16).to_be_bytes().to_vec();
    for f in fields {
        b.extend_from_slice(&(f.len() as i32).to_be_bytes());
        b.extend_from_slice(f);
    }
    b
}

fn generate(r: &mut XorShift, target: usize, sensitive_ratio: usize) -> Vec<Vec<Vec<u8>>> {
    let mut rows = Vec::new();
    let mut size = 0;
    while size < target {
        let sensitive = sensitive_ratio > 0 && r.below(100) < sensitive_ratio;
        let row = row(r, sensitive);
        size += row.iter().map(Vec::len).sum::<usize>();
        rows.push(row);
    }
    rows
}

fn report(label: &str, bytes: usize, secs: f64, baseline_secs: f64, extra: &str) {
    let mbps = bytes as f64 / 1e6 / secs;
    println!(
        "{label:<34} {:>8.0} MB/s per core   ({:.1}x a plain byte sum){extra}",
        mbps,
        secs / baseline_secs
    );
}

fn policy_specs_content_only() -> Vec<MaskSpec> {
    let names = tollgate_mask::Detector::ALL
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    vec![MaskSpec {
        detectors: names,
        strategy: "partial".into(),
        ..MaskSpec::default()
    }]
}

fn main() {
    let total_mb: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let set_mb = 25.min(total_mb);
    let passes = total_mb.div_ceil(set_mb);
    let mut r = XorShift(0x9E37_79B9_7F4A_7C15);
    let clean = generate(&mut r, set_mb << 20, 0);
    let mixed = generate(&mut r, set_mb << 20, 30);
    let all = DetectorSet::all();
    println!("tollgate-mask benchmark: {} MB per case ({passes} passes over {set_mb} MB), all 11 detectors, 1 thread", passes * set_mb);

    for (label, rows) in [
        ("clean rows: detect", &clean),
        ("mixed rows (30% sensitive): detect", &mixed),
    ] {
        let bytes: usize = rows.iter().flatten().map(Vec::len).sum::<usize>() * passes;
        let t = Instant::now();
        let mut sum = 0u64;
        for _ in 0..passes {
            for v in rows.iter().flatten() {
                sum = sum.wrapping_add(v.iter().map(|&b| u64::from(b)).sum::<u64>());
            }
        }
        black_box(sum);
        let baseline = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut found = 0usize;
        for _ in 0..passes {
            for v in rows.iter().flatten() {
                found += matches(all, black_box(v)).count();
            }
        }
        let secs = t.elapsed().as_secs_f64();
        report(
            label,
            bytes,
            secs,
            baseline,
            &format!("   {} matches", found / passes),
        );
    }

    let key = MaskKey::new(&[0x42; 32]).expect("32-byte key");
    let names: Vec<String> = tollgate_mask::Detector::ALL
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    let policy = Policy::from_specs(
        &[
            MaskSpec {
                columns: vec!["email".into()],
                strategy: "partial".into(),
                ..MaskSpec::default()
            },
            MaskSpec {
                columns: vec!["*card*".into()],
                strategy: "hash".into(),
                ..MaskSpec::default()
            },
            MaskSpec {
                detectors: names,
                strategy: "redact".into(),
                ..MaskSpec::default()
            },
        ],
        Some(key),
    )
    .expect("valid policy");
    let columns: Vec<ColumnInfo> = [
        ("id", 23),
        ("name", 25),
        ("email", 25),
        ("card_number", 25),
        ("notes", 25),
        ("amount", 1700),
        ("doc", 3802),
    ]
    .iter()
    .map(|(n, oid)| ColumnInfo {
        name: n.to_string(),
        table: Some("customers".into()),
        type_oid: *oid,
        format: Format::Text,
    })
    .collect();
    let full = policy.plan(&columns, &["agents".into()]);
    let content_only = Policy::from_specs(&policy_specs_content_only(), None)
        .expect("valid policy")
        .plan(&columns, &[]);
    for (label, rows, plan) in [
        ("clean rows: DataRow, detectors", &clean, &content_only),
        ("mixed rows: DataRow, detectors", &mixed, &content_only),
        ("mixed rows: DataRow, +column rules", &mixed, &full),
    ] {
        let bodies: Vec<Vec<u8>> = rows.iter().map(|r| data_row(r)).collect();
        let bytes: usize = bodies.iter().map(Vec::len).sum::<usize>() * passes;
        let t = Instant::now();
        let mut sum = 0u64;
        for _ in 0..passes {
            for b in &bodies {
                sum = sum.wrapping_add(b.iter().map(|&x| u64::from(x)).sum::<u64>());
            }
        }
        black_box(sum);
        let baseline = t.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(1 << 16);
        let mut rewritten = 0usize;
        let t = Instant::now();
        for _ in 0..passes {
            for b in &bodies {
                out.clear();
                match plan
                    .mask_data_row(black_box(b), &mut out)
                    .expect("well-formed rows")
                {
                    RowOutcome::Unchanged => {}
                    RowOutcome::Rewritten(_) => rewritten += 1,
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        report(
            label,
            bytes,
            secs,
            baseline,
            &format!("   {}/{} rows rewritten", rewritten / passes, bodies.len()),
        );
    }
}
