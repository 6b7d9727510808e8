//! Throughput of the masking engine on one core.
//!
//! `cargo run --release -p tollgate-pg --example mask_bench [MB] [ITERATIONS]` generates
//! realistic DataRow bodies from a fixed seed (pgbench accounts and history rows, customers with
//! names, e-mails, phones, addresses and card numbers, support tickets with free text, JSON
//! events) and reports the median MB/s per core over the iterations for:
//! - all detectors on over the realistic mix (the headline number);
//! - all detectors on over clean rows only (the common case: nothing to mask);
//! - column rules only (no detectors) over the mix;
//! - column rules and all detectors over the mix;
//!
//! each against a baseline measured in the same run: a plain byte sum over the same bodies.
//! `mask_bench --profile CASE [TABLE]` runs one case once over a small set (only the rows of
//! TABLE when given), for callgrind: `valgrind --tool=callgrind --toggle-collect='*mask_all*'`
//! counts the masking alone.

use std::hint::black_box;
use std::time::Instant;
use tollgate_mask::{ColumnInfo, Detector, MaskKey, MaskSpec, Policy, RowPlan};
use tollgate_pg::rows::{column_info, Format, RowMasking, RowOutcome};

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
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const FIRST: &[&str] = &[
    "Jane", "John", "Amélie", "Oliver", "Priya", "Chen", "Fatima", "Lucas", "Sofia", "Noah",
    "Mateo", "Yuki", "Olu", "Zoë", "Ahmed", "Ingrid",
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
    "O'Brien",
    "van der Berg",
];
const STREETS: &[&str] = &[
    "Main St",
    "Baker Street",
    "Rue de Rivoli",
    "Hauptstraße",
    "Elm Avenue",
    "Calle Mayor",
    "Queen's Road",
];
const CITIES: &[&str] = &[
    "Springfield, IL 62704",
    "London NW1 6XE",
    "75001 Paris",
    "10115 Berlin",
    "28013 Madrid",
    "Osaka 530-0001",
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
    "of",
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
    "SKU-10442",
    "#4471",
    "Thanks!",
    "OK.",
    "I",
    "We",
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
const PHONES: &[&str] = &[
    "+44 20 7946 0958",
    "(415) 555-2671",
    "+1 415 555 2671",
    "020 7946 0958",
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
    "4111 1111 1111 1111",
    "jane.doe@example.com",
];

fn prose(r: &mut XorShift, words: usize, sensitive: bool) -> String {
    let mut s = String::new();
    for k in 0..words {
        if k > 0 {
            s.push(' ');
        }
        if sensitive && r.below(15) == 0 {
            s.push_str(r.pick(SECRETS));
        } else {
            s.push_str(r.pick(WORDS));
        }
    }
    s
}

fn timestamp(r: &mut XorShift) -> String {
    format!(
        "2024-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        1 + r.below(12),
        1 + r.below(28),
        r.below(24),
        r.below(60),
        r.below(60),
        r.below(1_000_000)
    )
}

/// One table of the mix: its columns, and a row generator (`sensitive` rows carry personal data
/// or secrets where a real application would put them).
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, u32)],
    /// Share of the mix, in rows out of 100.
    weight: usize,
    row: fn(&mut XorShift, bool) -> Vec<Vec<u8>>,
}

const TABLES: &[Table] = &[
    Table {
        name: "pgbench_accounts",
        columns: &[("aid", 23), ("bid", 23), ("abalance", 23), ("filler", 1042)],
        weight: 35,
        row: |r, _| {
            let aid = 1 + r.below(10_000_000);
            vec![
                aid.to_string().into_bytes(),
                (1 + aid / 100_000).to_string().into_bytes(),
                (r.below(20_000) as i64 - 10_000).to_string().into_bytes(),
                vec![b' '; 84],
            ]
        },
    },
    Table {
        name: "pgbench_history",
        columns: &[
            ("tid", 23),
            ("bid", 23),
            ("aid", 23),
            ("delta", 23),
            ("mtime", 1114),
            ("filler", 1042),
        ],
        weight: 20,
        row: |r, _| {
            vec![
                (1 + r.below(1000)).to_string().into_bytes(),
                (1 + r.below(100)).to_string().into_bytes(),
                (1 + r.below(10_000_000)).to_string().into_bytes(),
                (r.below(10_000) as i64 - 5000).to_string().into_bytes(),
                timestamp(r).into_bytes(),
                vec![b' '; 22],
            ]
        },
    },
    Table {
        name: "customers",
        columns: &[
            ("id", 20),
            ("name", 25),
            ("email", 1043),
            ("phone", 1043),
            ("address", 25),
            ("card_number", 1043),
            ("notes", 25),
            ("created_at", 1184),
        ],
        weight: 25,
        row: |r, sensitive| {
            let first = r.pick(FIRST);
            let last = r.pick(LAST);
            let email = format!(
                "{}.{}{}@{}",
                first.to_lowercase(),
                last.to_lowercase().replace(' ', ""),
                r.below(100),
                r.pick(DOMAINS)
            );
            let phone = r.pick(PHONES).to_string();
            let card = if sensitive {
                r.pick(CARDS).to_string()
            } else {
                String::new()
            };
            let address = format!(
                "{} {}, {}",
                1 + r.below(400),
                r.pick(STREETS),
                r.pick(CITIES)
            );
            let nwords = r.below(12);
            vec![
                (1 + r.below(5_000_000)).to_string().into_bytes(),
                format!("{first} {last}").into_bytes(),
                email.into_bytes(),
                phone.into_bytes(),
                address.into_bytes(),
                card.into_bytes(),
                prose(r, nwords, false).into_bytes(),
                format!("{}+00", timestamp(r)).into_bytes(),
            ]
        },
    },
    Table {
        name: "tickets",
        columns: &[
            ("id", 20),
            ("customer_id", 20),
            ("subject", 25),
            ("body", 25),
            ("status", 25),
            ("opened_at", 1184),
        ],
        weight: 12,
        row: |r, sensitive| {
            let nsubject = 3 + r.below(6);
            let nbody = 10 + r.below(60);
            vec![
                (1 + r.below(50_000_000)).to_string().into_bytes(),
                (1 + r.below(5_000_000)).to_string().into_bytes(),
                prose(r, nsubject, false).into_bytes(),
                prose(r, nbody, sensitive).into_bytes(),
                r.pick(&["open", "pending", "closed"]).as_bytes().to_vec(),
                format!("{}+00", timestamp(r)).into_bytes(),
            ]
        },
    },
    Table {
        name: "events",
        columns: &[("id", 20), ("kind", 25), ("payload", 3802)],
        weight: 8,
        row: |r, sensitive| {
            let first = r.pick(FIRST);
            let last = r.pick(LAST);
            let contact = if sensitive {
                format!("{}@{}", first.to_lowercase(), r.pick(DOMAINS))
            } else {
                "none".into()
            };
            let nnote = 2 + r.below(8);
            let payload = format!(
                r#"{{"customer": {{"name": "{first} {last}", "tier": "{}", "contact": "{contact}"}}, "items": [{}, {}], "total": {}.{:02}, "note": "{}"}}"#,
                r.pick(&["gold", "silver", "basic"]),
                r.below(1000),
                r.below(1000),
                r.below(10_000),
                r.below(100),
                prose(r, nnote, sensitive)
            );
            vec![
                (1 + r.below(50_000_000)).to_string().into_bytes(),
                r.pick(&["order.created", "order.paid", "login", "refund.requested"])
                    .as_bytes()
                    .to_vec(),
                payload.into_bytes(),
            ]
        },
    },
];

fn data_row(fields: &[Vec<u8>]) -> Vec<u8> {
    let mut b = (fields.len() as i16).to_be_bytes().to_vec();
    for f in fields {
        b.extend_from_slice(&(f.len() as i32).to_be_bytes());
        b.extend_from_slice(f);
    }
    b
}

/// DataRow bodies of the mix, each with the index of its table; about `target` bytes.
/// `sensitive_percent` of the rows that can carry sensitive content do.
fn generate(r: &mut XorShift, target: usize, sensitive_percent: usize) -> Vec<(usize, Vec<u8>)> {
    let total_weight: usize = TABLES.iter().map(|t| t.weight).sum();
    let mut rows = Vec::new();
    let mut size = 0;
    while size < target {
        let mut w = r.below(total_weight);
        let table = TABLES
            .iter()
            .position(|t| {
                let hit = w < t.weight;
                w = w.saturating_sub(t.weight);
                hit
            })
            .expect("weights cover the range");
        let sensitive = r.chance(sensitive_percent);
        let mut fields = (TABLES[table].row)(r, sensitive);
        if sensitive_percent == 0 && table == 2 {
            // Clean rows: customers without personal data (as after an anonymised export).
            fields[2] = b"n/a".to_vec();
            fields[3] = Vec::new();
        }
        let body = data_row(&fields);
        size += body.len();
        rows.push((table, body));
    }
    rows
}

fn columns(table: &Table) -> Vec<ColumnInfo> {
    table
        .columns
        .iter()
        .map(|(name, oid)| column_info(name, Some(table.name), *oid, Format::Text))
        .collect()
}

fn all_detectors() -> Vec<String> {
    Detector::ALL.iter().map(|d| d.name().to_string()).collect()
}

fn column_rules() -> Vec<MaskSpec> {
    vec![
        MaskSpec {
            columns: vec!["email".into(), "*.contact*".into()],
            strategy: "partial".into(),
            ..MaskSpec::default()
        },
        MaskSpec {
            columns: vec!["*card*".into()],
            strategy: "hash".into(),
            ..MaskSpec::default()
        },
        MaskSpec {
            columns: vec!["phone".into(), "address".into()],
            strategy: "redact".into(),
            ..MaskSpec::default()
        },
    ]
}

fn detector_rule() -> MaskSpec {
    MaskSpec {
        detectors: all_detectors(),
        strategy: "redact".into(),
        ..MaskSpec::default()
    }
}

/// One plan per table of the mix.
fn plans(specs: &[MaskSpec]) -> Vec<RowPlan> {
    let key = MaskKey::new(&[0x42; 32]).expect("32-byte key");
    let policy = Policy::from_specs(specs, Some(key)).expect("valid policy");
    TABLES
        .iter()
        .map(|t| policy.plan(&columns(t), &["agents".into()]))
        .collect()
}

fn byte_sum(rows: &[(usize, Vec<u8>)]) -> u64 {
    let mut sum = 0u64;
    for (_, b) in rows {
        sum = sum.wrapping_add(b.iter().map(|&x| u64::from(x)).sum::<u64>());
    }
    sum
}

/// Masks every row once; returns the number of rows rewritten (not inlined: the profile
/// counts this function alone).
#[inline(never)]
fn mask_all(rows: &[(usize, Vec<u8>)], plans: &[RowPlan], out: &mut Vec<u8>) -> usize {
    let mut rewritten = 0;
    for (table, body) in rows {
        out.clear();
        match plans[*table]
            .mask_data_row(black_box(body), out)
            .expect("well-formed rows")
        {
            RowOutcome::Unchanged => {}
            RowOutcome::Rewritten(_) => rewritten += 1,
        }
    }
    rewritten
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Case {
    name: &'static str,
    label: &'static str,
    clean: bool,
    specs: Vec<MaskSpec>,
}

fn cases() -> Vec<Case> {
    let mut both = column_rules();
    both.push(detector_rule());
    vec![
        Case {
            name: "mix",
            label: "realistic mix, all detectors",
            clean: false,
            specs: vec![detector_rule()],
        },
        Case {
            name: "clean",
            label: "clean rows, all detectors",
            clean: true,
            specs: vec![detector_rule()],
        },
        Case {
            name: "columns",
            label: "realistic mix, column rules only",
            clean: false,
            specs: column_rules(),
        },
        Case {
            name: "full",
            label: "realistic mix, columns + detectors",
            clean: false,
            specs: both,
        },
    ]
}

const SENSITIVE_PERCENT: usize = 30;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::with_capacity(1 << 16);
    if args.first().map(String::as_str) == Some("--profile") {
        let name = args.get(1).map_or("mix", String::as_str);
        let case = cases()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("unknown case {name:?} (mix, clean, columns, full)"));
        let mut r = XorShift(0x9E37_79B9_7F4A_7C15);
        let ratio = if case.clean { 0 } else { SENSITIVE_PERCENT };
        let mut rows = generate(&mut r, 2 << 20, ratio);
        if let Some(table) = args.get(2) {
            let t = TABLES
                .iter()
                .position(|t| t.name == table)
                .unwrap_or_else(|| panic!("unknown table {table:?}"));
            rows.retain(|(k, _)| *k == t);
        }
        let bytes: usize = rows.iter().map(|(_, b)| b.len()).sum();
        let plans = plans(&case.specs);
        println!(
            "{}: {} of {} rows rewritten, {bytes} bytes",
            case.label,
            mask_all(&rows, &plans, &mut out),
            rows.len()
        );
        return;
    }
    let set_mb: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(16);
    let iterations: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(9);
    let mut r = XorShift(0x9E37_79B9_7F4A_7C15);
    let mixed = generate(&mut r, set_mb << 20, SENSITIVE_PERCENT);
    let clean = generate(&mut r, set_mb << 20, 0);
    println!(
        "tollgate-mask benchmark: DataRow bodies, {set_mb} MB per case, median of {iterations} \
         iterations, 1 thread (MB/s per core)"
    );
    for case in cases() {
        let rows = if case.clean { &clean } else { &mixed };
        let plans = plans(&case.specs);
        let bytes: usize = rows.iter().map(|(_, b)| b.len()).sum();
        let (mut speeds, mut ratios) = (Vec::new(), Vec::new());
        let mut rewritten = 0;
        for _ in 0..iterations {
            let t = Instant::now();
            black_box(byte_sum(black_box(rows)));
            let baseline = t.elapsed().as_secs_f64();
            let t = Instant::now();
            rewritten = mask_all(rows, &plans, &mut out);
            let secs = t.elapsed().as_secs_f64();
            speeds.push(bytes as f64 / 1e6 / secs);
            ratios.push(secs / baseline);
        }
        let (lo, hi) = speeds
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        println!(
            "{:<36} {:>6.0} MB/s per core  (min {lo:.0}, max {hi:.0}; {:.1}x a plain byte sum)  \
             {rewritten}/{} rows rewritten",
            case.label,
            median(speeds),
            median(ratios),
            rows.len()
        );
    }
}
