//! Statements that leave state on their upstream connection after their transaction ends:
//! under transaction pooling the client's next transaction may run on another connection (and
//! the state would leak to another client), so the PostgreSQL adapter refuses them, except the
//! plain setting changes it carries from connection to connection ([`setting_change`]).

use pg_query::protobuf::{a_const::Val, DiscardMode, VariableSetKind};
use pg_query::{NodeEnum, NodeRef};

/// Session-level state a statement would create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// A session-level `SET` the adapter cannot carry: `SET ROLE`, `SET SESSION
    /// AUTHORIZATION`, `SET SESSION CHARACTERISTICS`, a pinned setting, `SET ... FROM CURRENT`,
    /// a `SET` among other statements, `set_config(.., false)`.
    Set,
    /// `LISTEN`.
    Listen,
    /// `pg_advisory_lock` and its session-level kin (not the `_xact_` ones).
    AdvisoryLock,
    /// `CREATE TEMP TABLE` / view / sequence, `SELECT ... INTO TEMP`.
    TempTable,
    /// SQL `PREPARE`.
    Prepare,
    /// `DECLARE ... WITH HOLD`.
    HoldCursor,
}

impl SessionState {
    /// What the client is told it used.
    pub fn what(self) -> &'static str {
        match self {
            SessionState::Set => {
                "this session-level SET (of a role, the session authorization or characteristics, client_encoding or standard_conforming_strings, FROM CURRENT, set_config(..., false), or SET among other statements in one query)"
            }
            SessionState::Listen => "LISTEN",
            SessionState::AdvisoryLock => {
                "session-level advisory locks (use pg_advisory_xact_lock)"
            }
            SessionState::TempTable => "temporary tables",
            SessionState::Prepare => {
                "SQL PREPARE (use protocol-level prepared statements, which the gateway carries)"
            }
            SessionState::HoldCursor => "cursors WITH HOLD",
        }
    }
}

const SESSION_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// A session setting change the PostgreSQL adapter carries under transaction pooling: it runs
/// on the connection leased for it, and is applied again to every connection the session uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    /// `SET [SESSION] name = value`: `name` in lower case, `statement` the same `SET` as the
    /// gateway sends it again (deparsed: names and values quoted).
    Set { name: String, statement: String },
    /// `RESET name`, `SET name TO DEFAULT`.
    Reset { name: String },
    /// `RESET ALL`, `DISCARD ALL`.
    ResetAll,
}

/// Settings a session may not move under transaction pooling: whose it is (role, authorization),
/// what the guardrails' parser and the pool's start-up parameters pin, and per-transaction ones.
const NOT_CARRIED: &[&str] = &[
    "role",
    "session_authorization",
    "client_encoding",
    "standard_conforming_strings",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// The setting change `sql` is, when it is exactly one carriable statement: `SET [SESSION]
/// name = value | TO DEFAULT`, `RESET name`, `RESET ALL` or `DISCARD ALL`, written first in
/// the text (a comment before it makes it uncarried).
pub fn setting_change(sql: &str) -> Option<SettingChange> {
    let first: String = sql
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    if !matches!(first.as_str(), "set" | "reset" | "discard") {
        return None;
    }
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql))
        .ok()?
        .ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    match raw.stmt.as_ref()?.node.as_ref()? {
        NodeEnum::DiscardStmt(d) if d.target == DiscardMode::DiscardAll as i32 => {
            Some(SettingChange::ResetAll)
        }
        NodeEnum::VariableSetStmt(s) if !s.is_local => {
            let name = s.name.to_ascii_lowercase();
            let kind = VariableSetKind::try_from(s.kind).ok()?;
            if kind == VariableSetKind::VarResetAll {
                return Some(SettingChange::ResetAll);
            }
            if name.is_empty() || NOT_CARRIED.contains(&name.as_str()) {
                return None;
            }
            match kind {
                VariableSetKind::VarReset | VariableSetKind::VarSetDefault => {
                    Some(SettingChange::Reset { name })
                }
                VariableSetKind::VarSetValue if !s.args.is_empty() => {
                    let values = s.args.iter().map(literal).collect::<Option<Vec<_>>>()?;
                    let statement = format!("SET {} TO {}", quote_ident(&name), values.join(", "));
                    Some(SettingChange::Set { name, statement })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The resets in a text of several statements (as a driver's pool runs when a connection goes
/// back to it: `...; UNLISTEN *; RESET ALL`): `RESET name`, `RESET ALL`, `DISCARD ALL`, in
/// order. Empty when there are none (a `SET` with a value among other statements is not carried
/// at all: [`session_state`] refuses it).
pub fn resets(sql: &str) -> Vec<SettingChange> {
    // Most queries name neither word: no allocation, no parse.
    let names = |word: &[u8]| {
        sql.as_bytes()
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    };
    if !names(b"reset") && !names(b"discard") {
        return Vec::new();
    }
    let Some(parsed) = std::panic::catch_unwind(|| pg_query::parse(sql))
        .ok()
        .and_then(Result::ok)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        match raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
            Some(NodeEnum::DiscardStmt(d)) if d.target == DiscardMode::DiscardAll as i32 => {
                out.push(SettingChange::ResetAll)
            }
            Some(NodeEnum::VariableSetStmt(s)) if !s.is_local => {
                let name = s.name.to_ascii_lowercase();
                match VariableSetKind::try_from(s.kind) {
                    Ok(VariableSetKind::VarResetAll) => out.push(SettingChange::ResetAll),
                    Ok(VariableSetKind::VarReset) if !NOT_CARRIED.contains(&name.as_str()) => {
                        out.push(SettingChange::Reset { name })
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out
}

/// The statement that returns `name` to its default, as the gateway sends it (quoted).
pub fn reset_statement(name: &str) -> String {
    format!("RESET {}", quote_ident(name))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One value of a `SET` as SQL: a string, number or boolean constant (what the grammar makes
/// of names and strings alike); anything else (an interval with a type) is not carried.
fn literal(arg: &pg_query::protobuf::Node) -> Option<String> {
    let NodeEnum::AConst(c) = arg.node.as_ref()? else {
        return None;
    };
    Some(match c.val.as_ref()? {
        // E'' reads the same whatever standard_conforming_strings is.
        Val::Sval(s) if s.sval.contains('\\') => {
            format!("E'{}'", s.sval.replace('\\', "\\\\").replace('\'', "''"))
        }
        Val::Sval(s) => format!("'{}'", s.sval.replace('\'', "''")),
        Val::Ival(i) => i.ival.to_string(),
        Val::Fval(f) => f.fval.clone(),
        Val::Boolval(b) => b.boolval.to_string(),
        _ => return None,
    })
}

/// The first session-level state `sql` would create, if any. SQL the parser rejects creates
/// none (the server rejects it too); a setting change the adapter carries creates none either.
pub fn session_state(sql: &str) -> Option<SessionState> {
    if setting_change(sql).is_some() {
        return None;
    }
    // Most statements name none of these words (and a keyword cannot be escaped; a function
    // name written with U& escapes is parsed).
    let lower = sql.to_ascii_lowercase();
    if !["set", "listen", "advisory", "temp", "prepare", "hold", "u&"]
        .iter()
        .any(|w| lower.contains(w))
    {
        return None;
    }
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql))
        .ok()?
        .ok()?;
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        if let Some(state) = top_level(node) {
            return Some(state);
        }
    }
    let mut set_config = 0usize;
    for (node, ..) in parsed.protobuf.nodes() {
        if let NodeRef::FuncCall(f) = node {
            let name = f
                .funcname
                .last()
                .and_then(|n| match n.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
                    _ => None,
                })
                .unwrap_or_default();
            if SESSION_LOCKS.contains(&name.as_str()) {
                return Some(SessionState::AdvisoryLock);
            }
            if name == "set_config" {
                set_config += 1;
                if !literal_true(f.args.get(2)) {
                    return Some(SessionState::Set);
                }
            }
        }
    }
    // The walk above does not reach every clause: the classifier's list of called functions
    // does, and a call it names that the walk did not see is judged session-level.
    let called = match crate::classify(sql) {
        crate::Classification::Statements(st) => st,
        crate::Classification::Unparsable { .. } => return None,
    };
    let functions = || called.iter().flat_map(|s| s.functions.iter());
    if functions().any(|f| SESSION_LOCKS.contains(&base_name(f).as_str())) {
        return Some(SessionState::AdvisoryLock);
    }
    if set_config == 0 && functions().any(|f| base_name(f) == "set_config") {
        return Some(SessionState::Set);
    }
    None
}

fn base_name(f: &str) -> String {
    f.rsplit('.').next().unwrap_or(f).to_ascii_lowercase()
}

fn literal_true(arg: Option<&pg_query::protobuf::Node>) -> bool {
    match arg.and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(Val::Boolval(b)) => b.boolval,
            Some(Val::Sval(s)) => {
                matches!(s.sval.to_ascii_lowercase().as_str(), "t" | "true" | "on")
            }
            _ => false,
        },
        Some(NodeEnum::TypeCast(t)) => literal_true(t.arg.as_deref()),
        _ => false,
    }
}

fn temp(rel: Option<&pg_query::protobuf::RangeVar>) -> bool {
    rel.is_some_and(|r| {
        r.relpersistence == "t" || r.schemaname.to_ascii_lowercase().starts_with("pg_temp")
    })
}

fn top_level(node: &NodeEnum) -> Option<SessionState> {
    const CURSOR_OPT_HOLD: i32 = 0x0020;
    match node {
        NodeEnum::VariableSetStmt(s) => {
            let kind = VariableSetKind::try_from(s.kind).unwrap_or(VariableSetKind::Undefined);
            let session = match kind {
                VariableSetKind::VarReset | VariableSetKind::VarResetAll => false,
                // SET TRANSACTION ... lasts for the transaction.
                VariableSetKind::VarSetMulti => !s.name.eq_ignore_ascii_case("transaction"),
                _ => !s.is_local,
            };
            session.then_some(SessionState::Set)
        }
        NodeEnum::ListenStmt(_) => Some(SessionState::Listen),
        NodeEnum::PrepareStmt(_) => Some(SessionState::Prepare),
        NodeEnum::DeclareCursorStmt(d) if d.options & CURSOR_OPT_HOLD != 0 => {
            Some(SessionState::HoldCursor)
        }
        NodeEnum::CreateStmt(s) if temp(s.relation.as_ref()) => Some(SessionState::TempTable),
        NodeEnum::CreateTableAsStmt(s) if temp(s.into.as_ref().and_then(|i| i.rel.as_ref())) => {
            Some(SessionState::TempTable)
        }
        NodeEnum::SelectStmt(s) if temp(s.into_clause.as_ref().and_then(|i| i.rel.as_ref())) => {
            Some(SessionState::TempTable)
        }
        NodeEnum::ViewStmt(s) if temp(s.view.as_ref()) => Some(SessionState::TempTable),
        NodeEnum::CreateSeqStmt(s) if temp(s.sequence.as_ref()) => Some(SessionState::TempTable),
        // EXPLAIN ANALYZE runs its statement.
        NodeEnum::ExplainStmt(e) => e
            .query
            .as_ref()
            .and_then(|q| q.node.as_ref())
            .and_then(top_level),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_is_found() {
        let cases = [
            ("SET search_path = x", None),
            ("set session statement_timeout to 5", None),
            ("SET statement_timeout TO DEFAULT", None),
            ("SET ROLE nobody", Some(SessionState::Set)),
            ("SET SESSION AUTHORIZATION nobody", Some(SessionState::Set)),
            ("SET client_encoding = 'LATIN1'", Some(SessionState::Set)),
            ("SET NAMES 'LATIN1'", Some(SessionState::Set)),
            (
                "SET standard_conforming_strings = off",
                Some(SessionState::Set),
            ),
            ("SET work_mem FROM CURRENT", Some(SessionState::Set)),
            (
                "SET work_mem = '1MB'; SET search_path = x",
                Some(SessionState::Set),
            ),
            ("/* x */ SET work_mem = '1MB'", Some(SessionState::Set)),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                Some(SessionState::Set),
            ),
            ("SET LOCAL search_path = x", None),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
            ("RESET ALL", None),
            ("select 1; SET work_mem = '1MB'", Some(SessionState::Set)),
            (
                "SELECT set_config('a.b', 'c', false)",
                Some(SessionState::Set),
            ),
            ("SELECT set_config('a.b', 'c', true)", None),
            (
                "SELECT 1 FROM t WHERE x = set_config('a.b', 'c', false)",
                Some(SessionState::Set),
            ),
            ("LISTEN chan", Some(SessionState::Listen)),
            ("UNLISTEN *", None),
            ("NOTIFY chan", None),
            (
                "SELECT pg_advisory_lock(1)",
                Some(SessionState::AdvisoryLock),
            ),
            (
                "SELECT * FROM pg_catalog.pg_try_advisory_lock(1)",
                Some(SessionState::AdvisoryLock),
            ),
            ("SELECT pg_advisory_xact_lock(1)", None),
            ("CREATE TEMP TABLE t (a int)", Some(SessionState::TempTable)),
            (
                "create temporary table t as select 1",
                Some(SessionState::TempTable),
            ),
            ("SELECT 1 INTO TEMP t", Some(SessionState::TempTable)),
            (
                "CREATE TABLE pg_temp.t (a int)",
                Some(SessionState::TempTable),
            ),
            (
                "CREATE TEMP VIEW v AS SELECT 1",
                Some(SessionState::TempTable),
            ),
            ("CREATE TABLE t (a int)", None),
            ("PREPARE p AS SELECT 1", Some(SessionState::Prepare)),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Some(SessionState::HoldCursor),
            ),
            ("DECLARE c CURSOR FOR SELECT 1", None),
            (
                "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
                Some(SessionState::TempTable),
            ),
            ("SELECT 1", None),
            (
                "SELECT U&\"pg_\\0061dvisory_lock\"(1)",
                Some(SessionState::AdvisoryLock),
            ),
            ("not sql at all", None),
        ];
        for (sql, want) in cases {
            assert_eq!(session_state(sql), want, "{sql}");
        }
    }

    #[test]
    fn carried_setting_changes_are_read_and_quoted() {
        let set = |name: &str, statement: &str| {
            Some(SettingChange::Set {
                name: name.into(),
                statement: statement.into(),
            })
        };
        let reset = |name: &str| Some(SettingChange::Reset { name: name.into() });
        let cases = [
            (
                "SET DateStyle = 'SQL, DMY'",
                set("datestyle", "SET \"datestyle\" TO 'SQL, DMY'"),
            ),
            (
                "  set session extra_float_digits = 3;",
                set("extra_float_digits", "SET \"extra_float_digits\" TO 3"),
            ),
            (
                "SET application_name = 'it''s \\ ok'",
                set(
                    "application_name",
                    "SET \"application_name\" TO E'it''s \\\\ ok'",
                ),
            ),
            (
                "SET search_path TO \"My Schema\", public",
                set(
                    "search_path",
                    "SET \"search_path\" TO 'My Schema', 'public'",
                ),
            ),
            (
                "SET TIME ZONE 'Europe/Paris'",
                set("timezone", "SET \"timezone\" TO 'Europe/Paris'"),
            ),
            (
                "SET \"TimeZone\" = 'UTC'",
                set("timezone", "SET \"timezone\" TO 'UTC'"),
            ),
            (
                "SET app.flag = on",
                set("app.flag", "SET \"app.flag\" TO 'on'"),
            ),
            (
                "SET x.ratio = -1.5",
                set("x.ratio", "SET \"x.ratio\" TO -1.5"),
            ),
            ("SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE", None),
            ("SET work_mem TO DEFAULT", reset("work_mem")),
            ("RESET DateStyle", reset("datestyle")),
            ("RESET ALL", Some(SettingChange::ResetAll)),
            ("DISCARD ALL", Some(SettingChange::ResetAll)),
            ("DISCARD PLANS", None),
            ("SET LOCAL work_mem = '1MB'", None),
            ("SET TRANSACTION READ ONLY", None),
            ("SET ROLE nobody", None),
            ("RESET ROLE", None),
            ("SET work_mem = '1MB'; SELECT 1", None),
            ("SELECT 1", None),
            ("settle", None),
        ];
        for (sql, want) in cases {
            assert_eq!(setting_change(sql), want, "{sql}");
        }
        assert_eq!(
            resets("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"),
            [SettingChange::ResetAll]
        );
        assert_eq!(
            resets("RESET work_mem; RESET role; SELECT 'reset'; DISCARD ALL"),
            [
                SettingChange::Reset {
                    name: "work_mem".into()
                },
                SettingChange::ResetAll
            ]
        );
        assert_eq!(resets("SELECT 'reset'"), []);
        assert_eq!(reset_statement("datestyle"), "RESET \"datestyle\"");
        assert_eq!(reset_statement("a\"b"), "RESET \"a\"\"b\"");
    }
}
