//! Statement classification with PostgreSQL's own grammar (libpg_query).

use crate::walk::{walk, Dml};
use pg_query::protobuf::{self, a_const::Val, ObjectType, TransactionStmtKind, VariableSetKind};
use pg_query::{Node, NodeEnum};
use serde_json::{json, Value};
use std::sync::Arc;

/// What a SQL string holds, statement by statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    /// Every statement of the string, in order (empty for an empty or comment-only string).
    Statements(Vec<Statement>),
    /// PostgreSQL's grammar rejects the string; `error` is the parser's message (for the audit
    /// log, not for the client).
    Unparsable { error: String },
}

/// One statement, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub kind: Kind,
    /// Relations touched, as written (`schema.table` when qualified), sorted; CTE names included.
    pub tables: Vec<String>,
    /// Functions called, as written (`schema.func` when qualified), sorted.
    pub functions: Vec<String>,
    /// An UPDATE or DELETE that runs as part of this statement has no WHERE clause.
    pub where_missing: bool,
    /// Data-modifying statements that run as part of this one (a DML's own kind, a
    /// data-modifying CTE, the statement `EXPLAIN ANALYZE` runs, `COPY (DELETE ... RETURNING)`).
    pub dml: Vec<Dml>,
    /// It would change how the server reads later SQL text (`standard_conforming_strings` off,
    /// a client encoding other than UTF8, or a `set_config` of those or of a computed name), so
    /// that the gateway's parser and the server's would disagree about what a string says.
    pub changes_sql_reading: bool,
    /// It may change session or role settings besides a plain `SET`/`RESET`: a `set_config`
    /// call anywhere, a write to `pg_settings`, `ALTER ROLE/DATABASE ... SET`. Such a statement
    /// also counts as the kind `set`.
    pub sets_settings: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `into`: `SELECT ... INTO new_table`, which creates a table.
    Select {
        into: bool,
    },
    Insert,
    Update,
    Delete,
    Merge,
    /// `verb`: create, alter, drop, truncate or comment; `object`: e.g. "table", "function".
    Ddl {
        verb: DdlVerb,
        object: String,
    },
    Grant,
    Revoke,
    Copy {
        from: bool,
        program: bool,
    },
    Call,
    Do,
    /// `SET name ...` (`SET TRANSACTION` and `SET SESSION CHARACTERISTICS` too, as "transaction"
    /// and "session characteristics"); `read_write`: it would let the session write while the
    /// gateway made it read-only.
    Set {
        name: String,
        read_write: bool,
    },
    /// `RESET name`; `name` is None for `RESET ALL`.
    Reset {
        name: Option<String>,
        read_write: bool,
    },
    Transaction {
        op: TxOp,
        read_write: bool,
    },
    Prepare {
        name: String,
        statement: Box<Statement>,
    },
    Execute {
        name: String,
    },
    /// `name` is None for `DEALLOCATE ALL`.
    Deallocate {
        name: Option<String>,
    },
    Explain {
        analyze: bool,
        statement: Box<Statement>,
    },
    /// Other statements: `tag` is one of show, listen, notify, unlisten, lock, vacuum, analyze,
    /// refresh, cursor, discard, or other.
    Utility {
        tag: &'static str,
        write: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlVerb {
    Create,
    Alter,
    Drop,
    Truncate,
    Comment,
}

impl DdlVerb {
    pub fn as_str(self) -> &'static str {
        match self {
            DdlVerb::Create => "create",
            DdlVerb::Alter => "alter",
            DdlVerb::Drop => "drop",
            DdlVerb::Truncate => "truncate",
            DdlVerb::Comment => "comment",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOp {
    Begin,
    Commit,
    Rollback,
    /// SAVEPOINT, RELEASE and ROLLBACK TO.
    Savepoint,
    /// PREPARE TRANSACTION, COMMIT PREPARED and ROLLBACK PREPARED.
    TwoPhase,
}

impl TxOp {
    pub fn as_str(self) -> &'static str {
        match self {
            TxOp::Begin => "begin",
            TxOp::Commit => "commit",
            TxOp::Rollback => "rollback",
            TxOp::Savepoint => "savepoint",
            TxOp::TwoPhase => "transaction",
        }
    }
}

/// Parse `sql` with PostgreSQL's grammar and classify every statement in it.
pub fn classify(sql: &str) -> Classification {
    // Depth is bounded before anything is parsed: a stack overflow would abort the process.
    if let Some(refused_or_parsed_elsewhere) = crate::bounds::guard(sql, classify) {
        return refused_or_parsed_elsewhere;
    }
    // libpg_query is C; a panic in the Rust glue must not take a session task down with it.
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql));
    let parsed = match parsed {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Classification::Unparsable {
                error: e.to_string(),
            }
        }
        Err(_) => {
            return Classification::Unparsable {
                error: "the SQL parser failed on this input".into(),
            }
        }
    };
    Classification::Statements(
        parsed
            .protobuf
            .stmts
            .iter()
            .filter_map(|raw| raw.stmt.as_deref())
            .filter_map(|n| n.node.as_ref())
            .map(statement)
            .collect(),
    )
}

fn statement(node: &NodeEnum) -> Statement {
    let facts = walk(node);
    let mut st = Statement {
        kind: Kind::Utility {
            tag: "other",
            write: true,
        },
        tables: facts.tables,
        functions: facts.functions,
        where_missing: facts.where_missing,
        dml: facts.dml,
        changes_sql_reading: facts.set_config.iter().any(|p| {
            p.as_deref()
                .is_none_or(|p| p == "standard_conforming_strings" || p == "client_encoding")
        }),
        sets_settings: false,
    };
    let writes_settings_table = !st.dml.is_empty()
        && st.tables.iter().any(|t| {
            t.eq_ignore_ascii_case("pg_settings")
                || t.eq_ignore_ascii_case("pg_catalog.pg_settings")
        });
    st.sets_settings = !facts.set_config.is_empty()
        || writes_settings_table
        || matches!(
            node,
            NodeEnum::AlterRoleSetStmt(_) | NodeEnum::AlterDatabaseSetStmt(_)
        );
    if let NodeEnum::VariableSetStmt(v) = node {
        st.changes_sql_reading |= changes_sql_reading(v);
    }
    st.kind = match node {
        NodeEnum::SelectStmt(s) => Kind::Select {
            into: s.into_clause.is_some(),
        },
        NodeEnum::InsertStmt(_) => Kind::Insert,
        NodeEnum::UpdateStmt(_) => Kind::Update,
        NodeEnum::DeleteStmt(_) => Kind::Delete,
        NodeEnum::MergeStmt(_) => Kind::Merge,
        NodeEnum::CopyStmt(c) => Kind::Copy {
            from: c.is_from,
            program: c.is_program,
        },
        NodeEnum::CallStmt(_) => Kind::Call,
        NodeEnum::DoStmt(_) => Kind::Do,
        NodeEnum::GrantStmt(g) => {
            if g.is_grant {
                Kind::Grant
            } else {
                Kind::Revoke
            }
        }
        NodeEnum::GrantRoleStmt(g) => {
            if g.is_grant {
                Kind::Grant
            } else {
                Kind::Revoke
            }
        }
        NodeEnum::AlterDefaultPrivilegesStmt(_) => Kind::Grant,
        NodeEnum::VariableSetStmt(v) => set_kind(v),
        NodeEnum::VariableShowStmt(_) => Kind::Utility {
            tag: "show",
            write: false,
        },
        NodeEnum::TransactionStmt(t) => {
            let op = match TransactionStmtKind::try_from(t.kind) {
                Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                    TxOp::Begin
                }
                Ok(TransactionStmtKind::TransStmtCommit) => TxOp::Commit,
                Ok(TransactionStmtKind::TransStmtRollback) => TxOp::Rollback,
                Ok(
                    TransactionStmtKind::TransStmtSavepoint
                    | TransactionStmtKind::TransStmtRelease
                    | TransactionStmtKind::TransStmtRollbackTo,
                ) => TxOp::Savepoint,
                _ => TxOp::TwoPhase,
            };
            Kind::Transaction {
                op,
                read_write: asks_read_write(&t.options),
            }
        }
        NodeEnum::PrepareStmt(p) => {
            let inner = p.query.as_deref().and_then(|q| q.node.as_ref());
            let inner = inner
                .map(statement)
                .unwrap_or_else(|| statement(node_placeholder()));
            st.tables = inner.tables.clone();
            st.functions = inner.functions.clone();
            st.where_missing = false;
            st.dml.clear();
            Kind::Prepare {
                name: p.name.clone(),
                statement: Box::new(inner),
            }
        }
        NodeEnum::ExecuteStmt(e) => Kind::Execute {
            name: e.name.clone(),
        },
        NodeEnum::DeallocateStmt(d) => Kind::Deallocate {
            name: (!d.isall).then(|| d.name.clone()),
        },
        NodeEnum::ExplainStmt(e) => {
            let analyze = e.options.iter().any(|o| option_is_on(o, "analyze"));
            let inner = e.query.as_deref().and_then(|q| q.node.as_ref());
            let inner = inner
                .map(statement)
                .unwrap_or_else(|| statement(node_placeholder()));
            st.tables = inner.tables.clone();
            st.functions = inner.functions.clone();
            st.where_missing = analyze && inner.where_missing;
            st.dml = if analyze {
                inner.dml.clone()
            } else {
                Vec::new()
            };
            Kind::Explain {
                analyze,
                statement: Box::new(inner),
            }
        }
        NodeEnum::CreateTableAsStmt(c) => Kind::Ddl {
            verb: DdlVerb::Create,
            object: object_name(c.objtype),
        },
        NodeEnum::DropStmt(d) => {
            let relation_like = matches!(
                ObjectType::try_from(d.remove_type),
                Ok(ObjectType::ObjectTable
                    | ObjectType::ObjectView
                    | ObjectType::ObjectMatview
                    | ObjectType::ObjectIndex
                    | ObjectType::ObjectSequence
                    | ObjectType::ObjectForeignTable)
            );
            if relation_like {
                st.tables.extend(d.objects.iter().filter_map(dotted_name));
                st.tables.sort();
                st.tables.dedup();
            }
            Kind::Ddl {
                verb: DdlVerb::Drop,
                object: object_name(d.remove_type),
            }
        }
        NodeEnum::TruncateStmt(_) => Kind::Ddl {
            verb: DdlVerb::Truncate,
            object: "table".into(),
        },
        NodeEnum::RenameStmt(r) => Kind::Ddl {
            verb: DdlVerb::Alter,
            object: object_name(r.rename_type),
        },
        NodeEnum::AlterObjectSchemaStmt(a) => Kind::Ddl {
            verb: DdlVerb::Alter,
            object: object_name(a.object_type),
        },
        NodeEnum::AlterOwnerStmt(a) => Kind::Ddl {
            verb: DdlVerb::Alter,
            object: object_name(a.object_type),
        },
        NodeEnum::CommentStmt(c) => Kind::Ddl {
            verb: DdlVerb::Comment,
            object: object_name(c.objtype),
        },
        NodeEnum::NotifyStmt(_) => Kind::Utility {
            tag: "notify",
            write: true,
        },
        NodeEnum::ListenStmt(_) => Kind::Utility {
            tag: "listen",
            write: false,
        },
        NodeEnum::UnlistenStmt(_) => Kind::Utility {
            tag: "unlisten",
            write: false,
        },
        NodeEnum::LockStmt(_) => Kind::Utility {
            tag: "lock",
            write: false,
        },
        NodeEnum::VacuumStmt(v) => Kind::Utility {
            tag: if v.is_vacuumcmd { "vacuum" } else { "analyze" },
            write: true,
        },
        NodeEnum::RefreshMatViewStmt(_) => Kind::Utility {
            tag: "refresh",
            write: true,
        },
        NodeEnum::DeclareCursorStmt(_) | NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => {
            Kind::Utility {
                tag: "cursor",
                write: false,
            }
        }
        NodeEnum::DiscardStmt(d) => Kind::Utility {
            tag: "discard",
            // DISCARD ALL includes RESET ALL.
            write: d.target == protobuf::DiscardMode::DiscardAll as i32,
        },
        NodeEnum::ConstraintsSetStmt(_) => Kind::Utility {
            tag: "other",
            write: false,
        },
        _ => by_node_name(facts.top.unwrap_or("")),
    };
    st
}

/// Statements without dedicated handling, by their node type's name.
fn by_node_name(name: &str) -> Kind {
    let name = name.strip_suffix("Stmt").unwrap_or(name);
    let verb = if name.starts_with("Create")
        || name.starts_with("Define")
        || name.starts_with("Import")
        || name == "Index"
        || name == "View"
        || name == "Rule"
        || name == "CompositeType"
        || name == "Createdb"
    {
        Some(DdlVerb::Create)
    } else if name.starts_with("Alter") || name.starts_with("Reassign") || name == "ReplicaIdentity"
    {
        Some(DdlVerb::Alter)
    } else if name.starts_with("Drop") || name == "Dropdb" {
        Some(DdlVerb::Drop)
    } else if name == "SecLabel" {
        Some(DdlVerb::Comment)
    } else {
        None
    };
    match verb {
        Some(verb) => {
            let object = name
                .trim_start_matches("Create")
                .trim_start_matches("Define")
                .trim_start_matches("Alter")
                .trim_start_matches("Drop")
                .to_ascii_lowercase();
            let object = match (name, object.as_str()) {
                ("Create", _) => "table",
                (_, "db") => "database",
                (_, "") => "object",
                (_, "trig") | (_, "eventtrig") => "trigger",
                (_, "seq") => "sequence",
                (_, "plang") => "language",
                (_, o) => o,
            };
            Kind::Ddl {
                verb,
                object: object.to_string(),
            }
        }
        // CLUSTER, REINDEX, CHECKPOINT, LOAD and anything newer: they change state.
        None => Kind::Utility {
            tag: "other",
            write: true,
        },
    }
}

fn node_placeholder() -> &'static NodeEnum {
    static EMPTY: std::sync::OnceLock<NodeEnum> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| NodeEnum::SelectStmt(Box::default()))
}

fn object_name(objtype: i32) -> String {
    match ObjectType::try_from(objtype) {
        Ok(t) => format!("{t:?}")
            .trim_start_matches("Object")
            .to_ascii_lowercase(),
        Err(_) => "object".into(),
    }
}

/// `List(String, String)` → "schema.table".
fn dotted_name(n: &Node) -> Option<String> {
    match n.node.as_ref()? {
        NodeEnum::List(l) => {
            let parts: Vec<&str> = l
                .items
                .iter()
                .filter_map(|i| match i.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                    _ => None,
                })
                .collect();
            (!parts.is_empty()).then(|| parts.join("."))
        }
        _ => None,
    }
}

/// `SET standard_conforming_strings` to anything but on, `SET client_encoding`/`SET NAMES` to
/// anything but UTF8.
fn changes_sql_reading(v: &protobuf::VariableSetStmt) -> bool {
    let name = v.name.to_ascii_lowercase();
    let value_set = VariableSetKind::try_from(v.kind) == Ok(VariableSetKind::VarSetValue);
    match name.as_str() {
        "standard_conforming_strings" => !(value_set && v.args.first().is_some_and(is_true)),
        "client_encoding" => {
            !(value_set
                && v.args.first().and_then(constant).is_some_and(
                    |c| matches!(c, Err(s) if matches!(s.as_str(), "utf8" | "utf-8" | "unicode")),
                ))
        }
        _ => false,
    }
}

/// The two settings that keep a session read-only.
fn guards_read_only(name: &str) -> bool {
    name.eq_ignore_ascii_case("default_transaction_read_only")
        || name.eq_ignore_ascii_case("transaction_read_only")
}

fn set_kind(v: &protobuf::VariableSetStmt) -> Kind {
    let name = v.name.to_ascii_lowercase();
    match VariableSetKind::try_from(v.kind) {
        Ok(VariableSetKind::VarReset) => Kind::Reset {
            read_write: guards_read_only(&name),
            name: Some(name),
        },
        Ok(VariableSetKind::VarResetAll) => Kind::Reset {
            name: None,
            read_write: true,
        },
        // SET TRANSACTION ... / SET SESSION CHARACTERISTICS AS TRANSACTION ...
        Ok(VariableSetKind::VarSetMulti) => Kind::Set {
            read_write: asks_read_write(&v.args),
            name,
        },
        Ok(VariableSetKind::VarSetValue) => Kind::Set {
            read_write: guards_read_only(&name) && !v.args.first().is_some_and(is_true),
            name,
        },
        // SET x TO DEFAULT, SET x FROM CURRENT, and anything unknown.
        _ => Kind::Set {
            read_write: guards_read_only(&name),
            name,
        },
    }
}

/// Transaction options (`BEGIN READ WRITE`, `SET TRANSACTION READ WRITE`) that ask for writes.
fn asks_read_write(options: &[Node]) -> bool {
    options.iter().any(|o| match o.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if guards_read_only(&d.defname) => {
            !d.arg.as_deref().is_some_and(is_true)
        }
        _ => false,
    })
}

/// EXPLAIN-style option `name` is on (a bare option is on; an unclear value counts as on).
fn option_is_on(o: &Node, name: &str) -> bool {
    match o.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case(name) => {
            d.arg.as_deref().is_none_or(|a| !is_false(a))
        }
        _ => false,
    }
}

fn constant(n: &Node) -> Option<Result<bool, String>> {
    let v = match n.node.as_ref()? {
        NodeEnum::AConst(c) => c.val.as_ref()?,
        NodeEnum::String(s) => return Some(Err(s.sval.to_ascii_lowercase())),
        NodeEnum::Integer(i) => return Some(Ok(i.ival != 0)),
        NodeEnum::Boolean(b) => return Some(Ok(b.boolval)),
        _ => return None,
    };
    Some(match v {
        Val::Ival(i) => Ok(i.ival != 0),
        Val::Boolval(b) => Ok(b.boolval),
        Val::Sval(s) => Err(s.sval.to_ascii_lowercase()),
        _ => return None,
    })
}

/// A boolean setting's value is certainly true.
fn is_true(n: &Node) -> bool {
    match constant(n) {
        Some(Ok(b)) => b,
        Some(Err(s)) => matches!(s.as_str(), "on" | "true" | "yes" | "1" | "t" | "y"),
        None => false,
    }
}

/// A boolean option's value is certainly false.
fn is_false(n: &Node) -> bool {
    match constant(n) {
        Some(Ok(b)) => !b,
        Some(Err(s)) => matches!(s.as_str(), "off" | "false" | "no" | "0" | "f" | "n"),
        None => false,
    }
}

impl Kind {
    /// The names rules' `statements` match (see `tollgate_config::STATEMENT_KINDS`), without
    /// "write", which depends on the resource's writing functions.
    pub fn names(&self) -> Vec<&'static str> {
        match self {
            Kind::Select { .. } => vec!["select"],
            Kind::Insert => vec!["insert"],
            Kind::Update => vec!["update"],
            Kind::Delete => vec!["delete"],
            Kind::Merge => vec!["merge"],
            Kind::Ddl { verb, .. } => vec!["ddl", verb.as_str()],
            Kind::Grant => vec!["grant"],
            Kind::Revoke => vec!["revoke"],
            Kind::Copy { from, program } => {
                let mut v = vec!["copy", if *from { "copy_from" } else { "copy_to" }];
                if *program {
                    v.push("copy_program");
                }
                v
            }
            Kind::Call => vec!["call"],
            Kind::Do => vec!["do"],
            Kind::Set { .. } => vec!["set"],
            Kind::Reset { .. } => vec!["reset"],
            Kind::Transaction { op, .. } => vec!["transaction", op.as_str()],
            Kind::Prepare { .. } => vec!["prepare"],
            Kind::Execute { .. } => vec!["execute"],
            Kind::Deallocate { .. } => vec!["deallocate"],
            Kind::Explain { analyze, statement } => {
                let mut v = vec!["explain"];
                if *analyze {
                    v.extend(statement.kind.names());
                }
                v
            }
            Kind::Utility { tag, .. } => vec![tag],
        }
    }

    /// The primary name, for logs and the audit summary.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Ddl { verb, .. } => verb.as_str(),
            Kind::Transaction { op, .. } => op.as_str(),
            other => other.names()[0],
        }
    }
}

impl Statement {
    /// Rule names this statement matches, without "write" (see [`Kind::names`]).
    pub fn kind_names(&self) -> Vec<&'static str> {
        let mut v = self.kind.names();
        for d in &self.dml {
            if !v.contains(&d.as_str()) {
                v.push(d.as_str());
            }
        }
        if self.sets_settings && !v.contains(&"set") {
            v.push("set");
        }
        v
    }

    /// The statement changes data, schema, privileges, server state, or would lift the
    /// session's read-only mode, not counting the functions it calls.
    pub fn writes_by_itself(&self) -> bool {
        let kind_writes = match &self.kind {
            Kind::Select { into } => *into,
            Kind::Insert | Kind::Update | Kind::Delete | Kind::Merge => true,
            Kind::Ddl { .. } | Kind::Grant | Kind::Revoke | Kind::Call | Kind::Do => true,
            Kind::Copy { from, program } => *from || *program,
            Kind::Set { read_write, .. }
            | Kind::Reset { read_write, .. }
            | Kind::Transaction { read_write, .. } => *read_write,
            Kind::Prepare { .. } | Kind::Deallocate { .. } => false,
            // Resolved against the session's prepared statements by the engine.
            Kind::Execute { .. } => false,
            Kind::Explain { analyze, statement } => *analyze && statement.writes_by_itself(),
            Kind::Utility { write, .. } => *write,
        };
        kind_writes || !self.dml.is_empty() || self.sets_settings
    }

    /// One line for people: kind, tables and functions (e.g. "delete on public.t").
    pub fn summary_line(&self) -> String {
        let mut line = self.kind_names().join("/");
        if !self.tables.is_empty() {
            line.push_str(&format!(" on {}", self.tables.join(", ")));
        }
        if !self.functions.is_empty() {
            line.push_str(&format!(" calling {}", self.functions.join(", ")));
        }
        if self.where_missing {
            line.push_str(" (no WHERE)");
        }
        line
    }

    fn summary(&self) -> Value {
        let mut v = json!({
            "kind": self.kind.name(),
            "kinds": self.kind_names(),
            "tables": self.tables,
            "functions": self.functions,
            "where_missing": self.where_missing,
        });
        let extra = match &self.kind {
            Kind::Ddl { object, .. } => Some(("object", json!(object))),
            Kind::Set { name, .. } => Some(("parameter", json!(name))),
            Kind::Reset { name, .. } => Some(("parameter", json!(name))),
            Kind::Prepare { name, .. } | Kind::Execute { name } => Some(("name", json!(name))),
            Kind::Explain { analyze, .. } => Some(("analyze", json!(analyze))),
            Kind::Select { into: true } => Some(("into", json!(true))),
            _ => None,
        };
        if let (Some((k, x)), Some(m)) = (extra, v.as_object_mut()) {
            m.insert(k.into(), x);
        }
        v
    }
}

/// A classification as the cache keeps it: with its audit summary, built once per text.
#[derive(Debug)]
pub struct Classified {
    classification: Classification,
    summary: std::sync::OnceLock<Value>,
    line: std::sync::OnceLock<Arc<str>>,
}

impl Classified {
    /// [`Classification::summary`], built on first use.
    pub fn summary(&self) -> &Value {
        self.summary.get_or_init(|| self.classification.summary())
    }

    /// One line for every command's audit event, built on first use: each statement's
    /// [`Statement::summary_line`], joined by "; " ("unparsable" when the parser refused it).
    pub fn line(&self) -> Arc<str> {
        self.line
            .get_or_init(|| match &self.classification {
                Classification::Statements(s) => s
                    .iter()
                    .map(Statement::summary_line)
                    .collect::<Vec<_>>()
                    .join("; ")
                    .into(),
                Classification::Unparsable { .. } => "unparsable".into(),
            })
            .clone()
    }
}

impl From<Classification> for Classified {
    fn from(classification: Classification) -> Self {
        Classified {
            classification,
            summary: std::sync::OnceLock::new(),
            line: std::sync::OnceLock::new(),
        }
    }
}

impl std::ops::Deref for Classified {
    type Target = Classification;
    fn deref(&self) -> &Classification {
        &self.classification
    }
}

impl Classification {
    /// For the audit event: per statement its kind, kinds, tables, functions and where_missing.
    pub fn summary(&self) -> Value {
        match self {
            Classification::Statements(s) => {
                json!({ "statements": s.iter().map(Statement::summary).collect::<Vec<_>>() })
            }
            Classification::Unparsable { error } => json!({ "unparsable": error }),
        }
    }

    pub fn statements(&self) -> &[Statement] {
        match self {
            Classification::Statements(s) => s,
            Classification::Unparsable { .. } => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        match classify(sql) {
            Classification::Statements(mut s) if s.len() == 1 => s.remove(0),
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn kinds_keep_their_details() {
        assert_eq!(
            one("drop index concurrently if exists i").kind,
            Kind::Ddl {
                verb: DdlVerb::Drop,
                object: "index".into()
            }
        );
        assert_eq!(
            one("CREATE TABLE t (a int)").kind,
            Kind::Ddl {
                verb: DdlVerb::Create,
                object: "table".into()
            }
        );
        assert_eq!(
            one("create sequence s").kind,
            Kind::Ddl {
                verb: DdlVerb::Create,
                object: "sequence".into()
            }
        );
        assert_eq!(
            one("DROP DATABASE d").kind,
            Kind::Ddl {
                verb: DdlVerb::Drop,
                object: "database".into()
            }
        );
        assert_eq!(
            one("COPY t FROM PROGRAM 'x'").kind,
            Kind::Copy {
                from: true,
                program: true
            }
        );
        assert_eq!(
            one("set Search_Path to x").kind,
            Kind::Set {
                name: "search_path".into(),
                read_write: false
            }
        );
        assert_eq!(
            one("BEGIN ISOLATION LEVEL SERIALIZABLE READ WRITE").kind,
            Kind::Transaction {
                op: TxOp::Begin,
                read_write: true
            }
        );
        assert_eq!(
            one("begin read only").kind,
            Kind::Transaction {
                op: TxOp::Begin,
                read_write: false
            }
        );
        assert_eq!(one("ROLLBACK TO SAVEPOINT a").kind.name(), "savepoint");
        assert_eq!(one("DEALLOCATE ALL").kind, Kind::Deallocate { name: None });
        assert_eq!(
            one("execute p(1, 2)").kind,
            Kind::Execute { name: "p".into() }
        );
        match one("PREPARE p (int) AS UPDATE t SET a = $1").kind {
            Kind::Prepare { name, statement } => {
                assert_eq!(name, "p");
                assert_eq!(statement.kind, Kind::Update);
                assert!(statement.where_missing);
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(one("SELECT 1 INTO t2").kind, Kind::Select { into: true });
        assert_eq!(
            one("CLUSTER t").kind,
            Kind::Utility {
                tag: "other",
                write: true
            }
        );
        assert_eq!(
            one("ALTER SYSTEM SET default_transaction_read_only = off")
                .kind
                .names(),
            vec!["ddl", "alter"]
        );
        assert_eq!(
            one("ALTER ROLE bob SET search_path = x").kind.names(),
            vec!["ddl", "alter"]
        );
    }

    #[test]
    fn where_missing_only_for_update_and_delete_without_where() {
        assert!(one("DELETE FROM t").where_missing);
        assert!(!one("DELETE FROM t WHERE true").where_missing);
        assert!(one("UPDATE t SET a = (SELECT max(b) FROM s WHERE s.x = 1)").where_missing);
        assert!(!one("SELECT * FROM t").where_missing);
        assert!(!one("INSERT INTO t VALUES (1)").where_missing);
        assert!(
            one("WITH x AS (UPDATE t SET a = 1 RETURNING a) SELECT * FROM x WHERE a = 1")
                .where_missing
        );
    }

    #[test]
    fn multi_statement_and_empty_strings() {
        let c = classify("select 1; ; -- nothing\n insert into t values (1);");
        assert_eq!(c.statements().len(), 2);
        assert_eq!(c.statements()[1].kind, Kind::Insert);
        assert_eq!(classify("-- only a comment").statements().len(), 0);
        assert!(matches!(
            classify("SELECT (1"),
            Classification::Unparsable { .. }
        ));
    }

    #[test]
    fn summary_for_the_audit_event() {
        let v = classify("DELETE FROM public.t; SELECT nextval('s')").summary();
        assert_eq!(
            v,
            json!({"statements": [
                {"kind": "delete", "kinds": ["delete"], "tables": ["public.t"], "functions": [], "where_missing": true},
                {"kind": "select", "kinds": ["select"], "tables": [], "functions": ["nextval"], "where_missing": false},
            ]})
        );
        let v = classify("DROP TABLE x.y").summary();
        assert_eq!(v["statements"][0]["object"], "table");
        assert_eq!(v["statements"][0]["kinds"], json!(["ddl", "drop"]));
        assert_eq!(v["statements"][0]["tables"], json!(["x.y"]));
        assert!(classify("SELEC").summary()["unparsable"]
            .as_str()
            .unwrap()
            .contains("syntax error"));
    }
}
