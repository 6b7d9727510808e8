//! Stable-toolchain fuzzing of every codec in `proto/` (frame, startup, frontend, backend):
//! arbitrary bytes never panic, and no parser allocates more than the bytes it was given can
//! justify, whatever counts and lengths those bytes declare (a count of 32,767 parameters in a
//! 10-byte Bind must not reserve 32,767 slots). A counting allocator measures each call.
//!
//! Case counts are small by default; `PROPTEST_CASES=20000 cargo test -p tollgate-pg --test
//! proto_fuzz` digs deeper.

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use tollgate_pg::proto::{backend, frame, frontend, startup};

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated on this thread while `f` runs (its result is dropped outside the count).
fn allocated_by<T>(f: impl FnOnce() -> T) -> usize {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    let used = ALLOCATED.with(Cell::get) - before;
    drop(out);
    used
}

/// What parsing `input` bytes may allocate: a few result records per input byte (a parsed
/// field is at most a 32-byte record plus a copy of its bytes) and a small constant.
fn budget(input: usize) -> usize {
    64 * input + 256
}

/// Bodies that declare large counts and lengths early, plus plain random bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let declared = (
        any::<i16>(),
        any::<i32>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(count, len, rest)| {
            let mut b = count.to_be_bytes().to_vec();
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&rest);
            b
        });
    let named_bind = (
        prop::collection::vec(1u8..=255, 0..8),
        any::<i16>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(name, count, rest)| {
            let mut b = name.clone();
            b.push(0);
            b.extend_from_slice(&name);
            b.push(0);
            b.extend_from_slice(&count.to_be_bytes());
            b.extend_from_slice(&rest);
            b
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        declared,
        named_bind,
    ]
}

type Check = fn(&[u8]) -> bool;
type Parser = (&'static str, Check);

const PARSERS: [Parser; 18] = [
    ("query", |b| frontend::parse_query(b).is_ok()),
    ("parse", |b| frontend::parse_parse(b).is_ok()),
    ("bind", |b| frontend::parse_bind(b).is_ok()),
    ("execute", |b| frontend::parse_execute(b).is_ok()),
    ("target", |b| frontend::parse_target(b).is_ok()),
    ("password", |b| frontend::parse_password(b).is_ok()),
    ("error", |b| backend::parse_error(b).is_ok()),
    ("auth", |b| backend::parse_auth(b).is_ok()),
    ("backend key", |b| backend::parse_backend_key(b).is_ok()),
    ("parameter status", |b| {
        backend::parse_parameter_status(b).is_ok()
    }),
    ("data row", |b| backend::parse_data_row(b).is_ok()),
    ("row description", |b| {
        backend::parse_row_description(b).is_ok()
    }),
    ("copy response", |b| backend::parse_copy_response(b).is_ok()),
    ("fields", |b| backend::parse_fields(b).is_ok()),
    ("notification", |b| backend::parse_notification(b).is_ok()),
    ("command rows", |b| backend::command_rows(b).is_some()),
    ("command word", |b| !backend::command_word(b).is_empty()),
    ("startup", |b| startup::parse(b).is_ok()),
];

fn check_parsers(b: &[u8]) -> Result<(), TestCaseError> {
    for (name, parse) in PARSERS {
        let used = allocated_by(|| parse(b));
        prop_assert!(
            used <= budget(b.len()),
            "{}: {} bytes allocated for a {}-byte input",
            name,
            used,
            b.len()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn message_parsers_never_panic_nor_overallocate(b in body()) {
        check_parsers(&b)?;
    }

    /// A buffer of messages as a client or server sends them: framing never allocates, never
    /// returns a frame over the limit or beyond the buffer, and every body parses safely.
    #[test]
    fn framing_never_allocates_nor_exceeds_the_limit(
        buf in prop::collection::vec(any::<u8>(), 0..512),
        limit in 5usize..1024,
    ) {
        let mut at = 0;
        while at < buf.len() {
            let mut next = None;
            let used = allocated_by(|| next = Some(frame::next_frame(&buf[at..], limit)));
            prop_assert_eq!(used, 0);
            match next.expect("set above") {
                Ok(Some(f)) => {
                    prop_assert!(f.total_len >= 5 && f.total_len <= limit);
                    prop_assert!(at + f.total_len <= buf.len());
                    check_parsers(f.body(&buf[at..]))?;
                    at += f.total_len;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Startup packets: the declared length is checked before anything is read or allocated.
    #[test]
    fn startup_packets_are_bounded(
        body in prop::collection::vec(any::<u8>(), 0..300),
        declared in any::<i32>(),
        code in prop_oneof![
            Just(startup::SSL_REQUEST),
            Just(startup::GSSENC_REQUEST),
            Just(startup::CANCEL_REQUEST),
            Just(3 << 16),
            Just((3 << 16) | 2),
            any::<i32>(),
        ],
    ) {
        let mut p = declared.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(&body);
        match startup::packet_len(&p) {
            Ok(Some(n)) => prop_assert!((8..=startup::MAX_STARTUP_LEN).contains(&n)),
            Ok(None) => prop_assert!(p.len() < 4),
            Err(_) => {}
        }
        let used = allocated_by(|| startup::parse(&p));
        prop_assert!(used <= budget(p.len()), "{} bytes for {}", used, p.len());
        // And with a consistent length word.
        let len = (p.len() as i32).to_be_bytes();
        p[..4].copy_from_slice(&len);
        let used = allocated_by(|| startup::parse(&p));
        prop_assert!(used <= budget(p.len()), "{} bytes for {}", used, p.len());
    }
}

/// Declared counts far beyond the body: the parsers refuse without reserving for them.
#[test]
fn huge_declared_counts_reserve_nothing() {
    let mut bind = b"p\0s\0".to_vec();
    bind.extend_from_slice(&i16::MAX.to_be_bytes());
    let mut data_row = i16::MAX.to_be_bytes().to_vec();
    data_row.extend_from_slice(&i32::MAX.to_be_bytes());
    let mut row_description = i16::MAX.to_be_bytes().to_vec();
    row_description.extend_from_slice(b"x\0");
    let mut copy = vec![0u8];
    copy.extend_from_slice(&i16::MAX.to_be_bytes());
    let cases: [(&[u8], Check); 4] = [
        (&bind, |b| frontend::parse_bind(b).is_ok()),
        (&data_row, |b| backend::parse_data_row(b).is_ok()),
        (&row_description, |b| {
            backend::parse_row_description(b).is_ok()
        }),
        (&copy, |b| backend::parse_copy_response(b).is_ok()),
    ];
    for (b, parse) in cases {
        let mut ok = true;
        let used = allocated_by(|| ok = parse(b));
        assert!(!ok);
        assert!(used <= budget(b.len()), "{used} bytes for {b:?}");
    }
    assert!(matches!(
        frame::next_frame(b"D\x7f\xff\xff\xff", 1 << 20),
        Err(frame::FrameError::TooLarge { .. })
    ));
}
