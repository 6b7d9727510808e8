//! Throughput of HTTP body masking on one core.
//!
//! `cargo run --release -p tollgate-mask --example body_bench [MB] [ITERATIONS]` generates a
//! JSON API response (an array of customer records, one in five with an e-mail, card or phone
//! in free text) and the same records as text lines, from a fixed seed, then reports the
//! median MB/s over the iterations of feeding each through a [`BodyMasker`] in 16 KiB chunks,
//! against a baseline measured in the same run: copying the same chunks to the output.

use std::hint::black_box;
use std::time::Instant;
use tollgate_mask::{BodyKind, BodyMasker, BodyPlan, MaskSpec, Policy};

const CHUNK: usize = 16 << 10;

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
}

fn record(r: &mut XorShift, id: usize) -> String {
    let names = [
        "Ann Lee",
        "Bo Chen",
        "Carla Díaz",
        "Dmitri Ivanov",
        "Eve Martin",
    ];
    let note = match r.next() % 5 {
        0 => match r.next() % 3 {
            0 => format!("write to user{}@example.com please", r.next() % 10_000),
            1 => "paid with 4111 1111 1111 1111 last week".to_string(),
            _ => "call +1 415 555 0100 after 5pm".to_string(),
        },
        _ => "asked about the invoice, resolved on the first call".to_string(),
    };
    format!(
        r#"{{"id":{id},"name":"{}","active":{},"balance":{}.{:02},"tags":["retail","eu"],"contact":{{"email":"c{id}@example.org","phone":"+44 20 7946 0958"}},"note":"{note}"}}"#,
        names[(r.next() % 5) as usize],
        r.next() & 1 == 0,
        r.next() % 100_000,
        r.next() % 100
    )
}

fn bodies(mb: usize) -> (Vec<u8>, Vec<u8>) {
    let mut r = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut json, mut text) = (b"[".to_vec(), Vec::new());
    let mut id = 0;
    while json.len() < mb << 20 {
        let rec = record(&mut r, id);
        if id > 0 {
            json.push(b',');
        }
        json.extend_from_slice(rec.as_bytes());
        text.extend_from_slice(rec.as_bytes());
        text.push(b'\n');
        id += 1;
    }
    json.push(b']');
    (json, text)
}

fn plan(specs: &[(&[&str], &[&str])]) -> BodyPlan {
    let specs: Vec<MaskSpec> = specs
        .iter()
        .map(|(paths, detectors)| MaskSpec {
            json_paths: paths.iter().map(|s| s.to_string()).collect(),
            detectors: detectors.iter().map(|s| s.to_string()).collect(),
            strategy: "partial".into(),
            ..MaskSpec::default()
        })
        .collect();
    Policy::from_specs(&specs, None).unwrap().body_plan(&[])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mb: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(32);
    let iterations: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let (json, text) = bodies(mb);
    let all: &[&str] = &["email", "credit_card", "phone", "us_ssn", "iban", "jwt"];
    let cases: Vec<(&str, BodyKind, &[u8], BodyPlan)> = vec![
        (
            "JSON, paths only",
            BodyKind::Json,
            &json,
            plan(&[(&["$[*].contact", "$..email"], &[])]),
        ),
        (
            "JSON, detectors only",
            BodyKind::Json,
            &json,
            plan(&[(&[], all)]),
        ),
        (
            "JSON, paths and detectors",
            BodyKind::Json,
            &json,
            plan(&[(&["$[*].contact"], all)]),
        ),
        (
            "text lines, detectors",
            BodyKind::Text,
            &text,
            plan(&[(&[], all)]),
        ),
    ];
    println!(
        "tollgate-mask body benchmark: {mb} MB per case in {} KiB chunks, median of \
         {iterations} iterations, 1 thread",
        CHUNK >> 10
    );
    let mut out = Vec::with_capacity(2 * CHUNK);
    for (label, kind, body, plan) in cases {
        let (mut speeds, mut ratios) = (Vec::new(), Vec::new());
        let mut masked = 0;
        for _ in 0..iterations {
            let t = Instant::now();
            for chunk in body.chunks(CHUNK) {
                out.clear();
                out.extend_from_slice(black_box(chunk));
                black_box(&out);
            }
            let baseline = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut m = BodyMasker::new(&plan, kind);
            for chunk in body.chunks(CHUNK) {
                out.clear();
                m.feed(chunk, &mut out).expect("valid body");
                black_box(&out);
            }
            out.clear();
            masked = m.finish(&mut out).expect("valid body").masked_values;
            let secs = t.elapsed().as_secs_f64();
            speeds.push(body.len() as f64 / 1e6 / secs);
            ratios.push(secs / baseline);
        }
        println!(
            "{label:<28} {:>6.0} MB/s  ({:.1}x copying the chunks)  {masked} values masked",
            median(speeds),
            median(ratios)
        );
    }
}
