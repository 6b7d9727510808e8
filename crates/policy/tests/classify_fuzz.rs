//! Stable-toolchain fuzzing of the classifier: whatever the text, `classify` returns (never
//! panics, never overflows a stack), and the corpus in `tests/corpus/` (interesting inputs kept
//! in the repository, each with the class of answer it must get) is replayed.
//!
//! Everything runs on threads whose stack is no bigger than a tokio worker's, so a text that
//! recursed deeply on the caller's stack would abort this test binary. Case counts are small by
//! default; `PROPTEST_CASES=5000 cargo test -p tollgate-policy --test classify_fuzz` digs deeper.

use proptest::prelude::*;
use tollgate_policy::{classify, nesting_depth, Classification, MAX_DEPTH};

/// A tokio worker's default stack.
const WORKER_STACK: usize = 2 << 20;

fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(WORKER_STACK)
        .spawn(f)
        .expect("thread")
        .join()
        .expect("the classifier panicked")
}

const TOKENS: &[&str] = &[
    "select", "SELECT", "from", "where", "and", "or", "not", "between", "case", "when", "then",
    "else", "end", "union", "join", "on", "in", "is", "null", "array", "values", "insert", "into",
    "delete", "update", "set", "drop", "table", "do", "copy", "with", "as", "explain", "prepare",
    "execute", "t", "a", "f", "1", "2.5e3", "$1", "(", ")", "[", "]", ",", ";", "'", "''", "\"",
    "E'", "e'\\'", "\\", "$$", "$a$", "--", "\n", "/*", "*/", "::", ":", ".", "+", "-", "*", "/",
    "<", ">", "=", "~", "!", "@", "#", "%", "^", "&", "|", "`", "?", "U&'", "X'", "{", "}", " ",
    "\u{e9}", "\0",
];

/// Constructs that nest, one level each (prefix, suffix).
const NESTERS: &[(&str, &str)] = &[
    ("not ", ""),
    ("- ", ""),
    ("~", ""),
    ("(", ")"),
    ("f(", ")"),
    ("array[", "]"),
    ("(select ", ")"),
    ("case when true then ", " end"),
    ("", "::int"),
    ("", "+1"),
    ("", " is null"),
    ("", " between 1 and 1"),
    ("1 and ", ""),
    ("exists (select ", ")"),
];

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..120).prop_map(|t| t.join(" "))
}

fn glued_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..120).prop_map(|t| t.concat())
}

/// A random stack of nesting constructs, `depth` levels, around `1`.
fn deep() -> impl Strategy<Value = String> {
    (prop::collection::vec(0..NESTERS.len(), 1..40), 1usize..4000).prop_map(|(kinds, depth)| {
        let mut head = String::from("select ");
        let mut tail = String::new();
        for level in 0..depth {
            let (pre, post) = NESTERS[kinds[level % kinds.len()]];
            head.push_str(pre);
            tail.insert_str(0, post);
        }
        head + "1" + &tail
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn token_soup_never_panics(sql in prop_oneof![soup(), glued_soup()]) {
        let depth = nesting_depth(sql.as_bytes(), u32::MAX);
        prop_assert!(depth as usize <= sql.len());
        on_worker_stack(move || classify(&sql));
    }

    #[test]
    fn arbitrary_text_never_panics(sql in ".{0,400}") {
        on_worker_stack(move || classify(&sql));
    }

    #[test]
    fn deep_nesting_is_refused_or_classified(sql in deep()) {
        let estimate = nesting_depth(sql.as_bytes(), u32::MAX);
        let c = on_worker_stack(move || classify(&sql));
        if estimate > MAX_DEPTH {
            let refused = matches!(c, Classification::Unparsable { .. });
            prop_assert!(refused, "estimated {} levels, yet classified", estimate);
        }
    }
}

/// The crash that was: `not` 9,000 deep on a worker's stack aborted the whole process. Run in a
/// child process, so that a regression fails this test instead of killing the test binary.
#[test]
fn a_deep_query_does_not_abort_the_process() {
    const CHILD: &str = "TOLLGATE_DEEP_QUERY_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let sql = format!("select {} true", "not ".repeat(9000));
        let c = on_worker_stack(move || classify(&sql));
        assert!(matches!(c, Classification::Unparsable { .. }), "{c:?}");
        return;
    }
    let me = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(me)
        .args([
            "--exact",
            "a_deep_query_does_not_abort_the_process",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    assert!(
        out.status.success(),
        "the child process died: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[test]
fn corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/corpus") {
        let path = entry.expect("corpus entry").path();
        if path.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("corpus file");
        let (head, sql) = text.split_once('\n').unwrap_or((&text, ""));
        let expect = head
            .strip_prefix("-- expect: ")
            .unwrap_or_else(|| panic!("{}: first line must be `-- expect: ...`", path.display()))
            .to_string();
        let sql = sql.to_string();
        let c = on_worker_stack(move || classify(&sql));
        let got = match c {
            Classification::Unparsable { .. } => "unparsable",
            Classification::Statements(_) => "statements",
        };
        assert_eq!(got, expect, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 10, "the corpus is missing ({seen} files)");
}
