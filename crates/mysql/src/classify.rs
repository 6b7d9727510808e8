//! MySQL statement classification with sqlparser's MySQL grammar, into the policy engine's
//! vocabulary ([`Classification`] of [`Statement`]s), so that a MySQL resource's rules are
//! judged by the same engine as PostgreSQL's.
//!
//! Before parsing, version comments (`/*!80000 … */`, MariaDB's `/*M!100100 … */`) are read
//! as the SQL they are to the server. A string is split into its statements at top-level
//! semicolons, each parsed on its own; MySQL forms the grammar lacks are read here: `PREPARE
//! s FROM '…'` (its text classified), `PREPARE s FROM @var` (opaque code), `EXECUTE`,
//! `DEALLOCATE PREPARE`, `LOAD DATA`. What cannot be read is [`Classification::Unparsable`].
//!
//! Beside the rules, some statements are refused outright ([`Analysis::refusal`]): `LOAD DATA
//! LOCAL` (the server would make the client read a file), `INTO OUTFILE/DUMPFILE`, databases
//! the resource does not list, and settings that change how the rest of the text is read.
//! Pure: no I/O.

use sqlparser::ast::{
    self, Expr, ObjectName, ObjectType, Set, Statement as Ast, TruncateTableTarget, Visit, Visitor,
};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use tollgate_policy::{Classification, DdlVerb, Kind, Statement, TxOp};

/// Where statements may reach: the resource's database and the others it lists; and how the
/// session's server reads SQL text.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub database: &'a str,
    pub databases: &'a [String],
    pub mode: SqlMode,
}

/// The `sql_mode` flags that change how the server splits SQL text into tokens: the gateway
/// reads text as the server will, so it must know them (read from the server at connect and
/// after anything that may have changed them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqlMode {
    /// `"…"` quotes an identifier, not a string.
    pub ansi_quotes: bool,
    /// A backslash in a string is an ordinary character.
    pub no_backslash_escapes: bool,
}

impl SqlMode {
    /// From the value of `@@sql_mode` (`ANSI` includes `ANSI_QUOTES`).
    pub fn parse(value: &str) -> SqlMode {
        let mut m = SqlMode::default();
        for flag in value.split(',').map(str::trim) {
            if flag.eq_ignore_ascii_case("ANSI_QUOTES") || flag.eq_ignore_ascii_case("ANSI") {
                m.ansi_quotes = true;
            }
            if flag.eq_ignore_ascii_case("NO_BACKSLASH_ESCAPES") {
                m.no_backslash_escapes = true;
            }
        }
        m
    }
}

impl Scope<'_> {
    fn allows(&self, db: &str) -> bool {
        let db = unquote(db);
        db.eq_ignore_ascii_case(self.database)
            || db.eq_ignore_ascii_case("information_schema")
            || self.databases.iter().any(|d| d.eq_ignore_ascii_case(db))
    }
}

/// What a query string holds, and whether it is refused before any rule is consulted.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub classification: Classification,
    /// A message for the client: the string may not run through the gateway.
    pub refusal: Option<String>,
}

/// Character sets the gateway reads SQL in: ASCII-compatible, without multi-byte sequences
/// whose trailing byte can be a backslash or quote (GBK, Big5, SJIS...).
const SAFE_CHARSETS: &[&str] = &[
    "utf8mb4", "utf8mb3", "utf8", "ascii", "latin1", "binary", "default",
];

/// `sql_mode` flags that change how SQL text is read.
const READING_MODES: &[&str] = &["ANSI_QUOTES", "NO_BACKSLASH_ESCAPES", "ANSI"];

/// Whether `name` is a character set the gateway reads SQL in.
pub fn safe_charset(name: &str) -> bool {
    SAFE_CHARSETS.contains(&name.to_ascii_lowercase().as_str())
}

/// Whether running `c` may change how the server reads the session's next statements
/// (`sql_mode`, `character_set_client`): a SET, or code the gateway cannot see into.
pub fn may_change_reading(c: &Classification) -> bool {
    match c {
        Classification::Unparsable { .. } => true,
        Classification::Statements(s) => s.iter().any(|s| {
            matches!(
                s.kind,
                Kind::Set { .. } | Kind::Execute { .. } | Kind::Call | Kind::Do
            )
        }),
    }
}

pub fn analyze(sql: &str, scope: Scope<'_>) -> Analysis {
    let unparsable = |error: String| Analysis {
        classification: Classification::Unparsable { error },
        refusal: None,
    };
    let text = match as_default_mode(sql, scope.mode) {
        Ok(t) => t,
        Err(e) => return unparsable(e.into()),
    };
    let dialect = MySqlDialect {};
    let tokens = match Tokenizer::new(&dialect, &text).tokenize() {
        Ok(t) => t,
        Err(e) => return unparsable(e.to_string()),
    };
    let pieces = split_statements(tokens);
    let mut out = Vec::with_capacity(pieces.len());
    let mut refusal = None;
    let mut failed = None;
    for piece in &pieces {
        match piece_statement(piece, scope) {
            Ok(Piece::Statement(st, facts)) => {
                if refusal.is_none() {
                    refusal = facts.refusal(scope, pieces.len() > 1);
                }
                out.push(st);
            }
            Ok(Piece::Refused(msg)) => {
                refusal.get_or_insert(msg);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        // A construct that spans semicolons (a routine body): the whole string, as one parse.
        match Parser::parse_sql(&dialect, &text) {
            Ok(stmts) => {
                out.clear();
                refusal = None;
                for s in &stmts {
                    let (st, facts) = statement(s);
                    if refusal.is_none() {
                        refusal = facts.refusal(scope, stmts.len() > 1);
                    }
                    out.push(st);
                }
            }
            Err(_) => return unparsable(e),
        }
    }
    Analysis {
        classification: Classification::Statements(out),
        refusal,
    }
}

/// The text as the server reads it, rewritten for the parser's reading (the default
/// `sql_mode`): version comments' markers are blanked so that their content is read as SQL;
/// with `NO_BACKSLASH_ESCAPES`, a backslash in a string is doubled (it is an ordinary
/// character there); with `ANSI_QUOTES`, a `"…"` identifier becomes `` `…` ``. Quotes and
/// other comments are skipped as the server's lexer does.
pub fn as_default_mode(sql: &str, mode: SqlMode) -> Result<String, &'static str> {
    let b = sql.as_bytes();
    let mut out = Vec::with_capacity(b.len() + 8);
    let mut i = 0;
    let mut in_version = false;
    while i < b.len() {
        match b[i] {
            b'"' if mode.ansi_quotes => {
                // An identifier: `""` inside is one quote; a backtick is doubled.
                out.push(b'`');
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err("unterminated quoted identifier"),
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                            out.push(b'"');
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'`') => {
                            out.extend_from_slice(b"``");
                            i += 1;
                        }
                        Some(&c) => {
                            out.push(c);
                            i += 1;
                        }
                    }
                }
                out.push(b'`');
            }
            q @ (b'\'' | b'"' | b'`') => {
                out.push(q);
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err("unterminated quoted text"),
                        Some(b'\\') if q != b'`' && mode.no_backslash_escapes => {
                            out.extend_from_slice(b"\\\\");
                            i += 1;
                        }
                        Some(b'\\') if q != b'`' => {
                            out.push(b'\\');
                            if let Some(&c) = b.get(i + 1) {
                                out.push(c);
                            }
                            i += 2;
                        }
                        Some(&c) if c == q => {
                            out.push(c);
                            i += 1;
                            if b.get(i) == Some(&q) {
                                out.push(q);
                                i += 1;
                            } else {
                                break;
                            }
                        }
                        Some(&c) => {
                            out.push(c);
                            i += 1;
                        }
                    }
                }
            }
            b'#' => {
                let end = skip_line(b, i);
                out.extend_from_slice(&b[i..end]);
                i = end;
            }
            b'-' if b.get(i + 1) == Some(&b'-')
                && b.get(i + 2).is_none_or(|c| c.is_ascii_whitespace()) =>
            {
                let end = skip_line(b, i);
                out.extend_from_slice(&b[i..end]);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let version = match (b.get(i + 2), b.get(i + 3)) {
                    (Some(b'!'), _) => Some(3),
                    (Some(b'M'), Some(b'!')) => Some(4),
                    _ => None,
                };
                match version {
                    Some(n) if !in_version => {
                        let mut j = i + n;
                        while j < b.len() && b[j].is_ascii_digit() {
                            j += 1;
                        }
                        out.resize(out.len() + (j - i), b' ');
                        in_version = true;
                        i = j;
                    }
                    _ => {
                        let end = find(b, i + 2, b"*/").ok_or("unterminated comment")?;
                        out.extend_from_slice(&b[i..end + 2]);
                        i = end + 2;
                    }
                }
            }
            b'*' if in_version && b.get(i + 1) == Some(&b'/') => {
                out.extend_from_slice(b"  ");
                in_version = false;
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    if in_version {
        return Err("unterminated version comment");
    }
    String::from_utf8(out).map_err(|_| "not UTF-8")
}

/// `KILL [QUERY | CONNECTION] <id>`: whether it stops only the query, and the id.
pub fn kill_target(sql: &str) -> Option<(bool, u64)> {
    let dialect = MySqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql).tokenize().ok()?;
    let mut pieces = split_statements(tokens);
    if pieces.len() != 1 {
        return None;
    }
    let piece = pieces.remove(0);
    let w = words(&piece);
    if !word_is(w.first(), "KILL") {
        return None;
    }
    let (query, at) = if word_is(w.get(1), "QUERY") {
        (true, 2)
    } else if word_is(w.get(1), "CONNECTION") {
        (false, 2)
    } else {
        (false, 1)
    };
    match (w.get(at), w.len() == at + 1) {
        (Some(Token::Number(n, _)), true) => n.parse().ok().map(|id| (query, id)),
        _ => None,
    }
}

fn skip_line(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| i + p + 1)
}

fn find(b: &[u8], from: usize, pat: &[u8]) -> Option<usize> {
    b.get(from..)?
        .windows(pat.len())
        .position(|w| w == pat)
        .map(|p| from + p)
}

/// Tokens of each statement, without the semicolons; pieces with nothing but whitespace and
/// comments are dropped.
fn split_statements(tokens: Vec<Token>) -> Vec<Vec<Token>> {
    let mut pieces = vec![Vec::new()];
    for t in tokens {
        if t == Token::SemiColon {
            pieces.push(Vec::new());
        } else {
            pieces.last_mut().expect("one").push(t);
        }
    }
    pieces.retain(|p| p.iter().any(|t| !matches!(t, Token::Whitespace(_))));
    pieces
}

enum Piece {
    Statement(Statement, Facts),
    Refused(String),
}

fn words(piece: &[Token]) -> Vec<&Token> {
    piece
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect()
}

fn word_is(t: Option<&&Token>, kw: &str) -> bool {
    matches!(t, Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(kw))
}

fn ident(t: Option<&&Token>) -> Option<String> {
    match t {
        Some(Token::Word(w)) => Some(w.value.to_ascii_lowercase()),
        _ => None,
    }
}

fn piece_statement(piece: &[Token], scope: Scope<'_>) -> Result<Piece, String> {
    let w = words(piece);
    let plain = |kind: Kind| Statement {
        kind,
        tables: Vec::new(),
        functions: Vec::new(),
        where_missing: false,
        dml: Vec::new(),
        changes_sql_reading: false,
        sets_settings: false,
    };
    if w.iter()
        .any(|t| word_is(Some(t), "OUTFILE") || word_is(Some(t), "DUMPFILE"))
    {
        return Ok(Piece::Refused(
            "SELECT ... INTO OUTFILE/DUMPFILE writes a file on the database server: not allowed through tollgate".into(),
        ));
    }
    if word_is(w.first(), "LOAD") && (word_is(w.get(1), "DATA") || word_is(w.get(1), "XML")) {
        let infile = w.iter().position(|t| word_is(Some(t), "INFILE"));
        if w[..infile.unwrap_or(w.len())]
            .iter()
            .any(|t| word_is(Some(t), "LOCAL"))
        {
            return Ok(Piece::Refused("LOAD DATA LOCAL INFILE is refused by tollgate: the server would make your client send a local file; load the data with INSERT statements instead".into()));
        }
        let table = w
            .iter()
            .position(|t| word_is(Some(t), "TABLE"))
            .and_then(|i| table_after(&w[i + 1..]));
        let mut st = plain(Kind::Copy {
            from: true,
            program: false,
        });
        let mut facts = Facts::default();
        if let Some(t) = table {
            facts.note_name(&t);
            st.tables.push(t);
        }
        return Ok(Piece::Statement(st, facts));
    }
    if word_is(w.first(), "PREPARE") && word_is(w.get(2), "FROM") {
        let name = ident(w.get(1)).ok_or("PREPARE without a name")?;
        let inner = match w.get(3) {
            Some(Token::SingleQuotedString(s)) | Some(Token::DoubleQuotedString(s))
                if w.len() == 4 =>
            {
                let a = analyze(s, scope);
                if let Some(r) = a.refusal {
                    return Ok(Piece::Refused(r));
                }
                match a.classification {
                    Classification::Statements(mut v) if v.len() == 1 => v.remove(0),
                    Classification::Statements(_) => {
                        return Err("PREPARE of several statements".into())
                    }
                    Classification::Unparsable { error } => return Err(error),
                }
            }
            // The text is only known when it runs: code the gateway cannot see into.
            _ => plain(Kind::Do),
        };
        return Ok(Piece::Statement(
            plain(Kind::Prepare {
                name,
                statement: Box::new(inner),
            }),
            Facts::default(),
        ));
    }
    if word_is(w.first(), "EXECUTE") && word_is(w.get(1), "IMMEDIATE") {
        // MariaDB runs the text at once: a literal is judged as the statement it holds;
        // anything else is only known when it runs, code the gateway cannot see into.
        return match w.get(2) {
            Some(Token::SingleQuotedString(s)) | Some(Token::DoubleQuotedString(s))
                if w.len() == 3 || word_is(w.get(3), "USING") =>
            {
                let a = analyze(s, scope);
                if let Some(r) = a.refusal {
                    return Ok(Piece::Refused(r));
                }
                match a.classification {
                    Classification::Statements(mut v) if v.len() == 1 => {
                        Ok(Piece::Statement(v.remove(0), Facts::default()))
                    }
                    Classification::Statements(_) => {
                        Ok(Piece::Statement(plain(Kind::Do), Facts::default()))
                    }
                    Classification::Unparsable { error } => Err(error),
                }
            }
            _ => Ok(Piece::Statement(plain(Kind::Do), Facts::default())),
        };
    }
    if word_is(w.first(), "EXECUTE") {
        let name = ident(w.get(1)).ok_or("EXECUTE without a name")?;
        if w.len() > 2 && !word_is(w.get(2), "USING") {
            return Err("EXECUTE ... not understood".into());
        }
        return Ok(Piece::Statement(
            plain(Kind::Execute { name }),
            Facts::default(),
        ));
    }
    if (word_is(w.first(), "DEALLOCATE") || word_is(w.first(), "DROP"))
        && word_is(w.get(1), "PREPARE")
        && w.len() == 3
    {
        let name = ident(w.get(2)).ok_or("DEALLOCATE without a name")?;
        return Ok(Piece::Statement(
            plain(Kind::Deallocate { name: Some(name) }),
            Facts::default(),
        ));
    }
    let dialect = MySqlDialect {};
    let mut parser = Parser::new(&dialect).with_tokens(piece.to_vec());
    let parsed = parser.parse_statement().map_err(|e| e.to_string())?;
    if parser.peek_token().token != Token::EOF {
        return Err("unexpected text after the statement".into());
    }
    let (st, facts) = statement(&parsed);
    Ok(Piece::Statement(st, facts))
}

fn table_after(w: &[&Token]) -> Option<String> {
    let mut name = ident(w.first())?;
    if matches!(w.get(1), Some(Token::Period)) {
        name = format!("{name}.{}", ident(w.get(2))?);
    }
    Some(name)
}

/// What the MySQL-specific checks need to know about one statement.
#[derive(Debug, Default)]
struct Facts {
    /// Databases it names (`db.table`, `USE db`, `db.func()`).
    databases: BTreeSet<String>,
    /// Settings it assigns: name (lower case, scope removed) and the value's literal text
    /// (`None`: not a literal).
    sets: Vec<(String, Option<String>)>,
}

impl Facts {
    fn note_name(&mut self, name: &str) {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() >= 2 {
            self.databases
                .insert(unquote(parts[parts.len() - 2]).to_string());
        }
    }

    fn refusal(&self, scope: Scope<'_>, multi: bool) -> Option<String> {
        if let Some(db) = self.databases.iter().find(|d| !scope.allows(d)) {
            return Some(format!(
                "database \"{db}\" is not part of this resource: statements may use \"{}\"{} (ask an admin to list it in the resource's `databases`)",
                scope.database,
                if scope.databases.is_empty() { String::new() } else { format!(" and {}", scope.databases.join(", ")) }
            ));
        }
        for (name, value) in &self.sets {
            let reading = matches!(
                name.as_str(),
                "sql_mode" | "names" | "character_set_client" | "character set" | "charset"
            );
            if !reading {
                continue;
            }
            if multi {
                return Some(format!("SET {name} changes how the rest of the text is read: send it as a statement of its own, not inside a multi-statement string"));
            }
            let Some(v) = value else {
                return Some(format!(
                    "SET {name} must be given a literal value through tollgate"
                ));
            };
            let v = v
                .trim_matches(|c| c == '\'' || c == '"')
                .to_ascii_uppercase();
            if name == "sql_mode" {
                if let Some(m) = v
                    .split(',')
                    .map(str::trim)
                    .find(|m| READING_MODES.contains(m))
                {
                    return Some(format!("sql_mode {m} changes how SQL text is read and is not allowed through tollgate"));
                }
            } else if !SAFE_CHARSETS.contains(&v.to_ascii_lowercase().as_str()) {
                return Some(format!("character set {} is not allowed through tollgate, which reads SQL as utf8mb4 (use utf8mb4)", v.to_ascii_lowercase()));
            }
        }
        None
    }
}

fn unquote(s: &str) -> &str {
    s.trim_matches(|c| c == '`' || c == '"')
}

fn name_of(n: &ObjectName) -> String {
    n.0.iter()
        .map(|p| match p {
            ast::ObjectNamePart::Identifier(i) => i.value.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Tables and called functions anywhere in a statement.
#[derive(Default)]
struct Collect {
    tables: BTreeSet<String>,
    functions: BTreeSet<String>,
}

impl Visitor for Collect {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.tables.insert(name_of(relation));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            // Built-in function names are case-insensitive.
            let name = name_of(&f.name);
            self.functions.insert(if name.contains('.') {
                name
            } else {
                name.to_ascii_lowercase()
            });
        }
        ControlFlow::Continue(())
    }
}

fn ddl(verb: DdlVerb, object: &str) -> Kind {
    Kind::Ddl {
        verb,
        object: object.into(),
    }
}

fn other(write: bool) -> Kind {
    Kind::Utility {
        tag: "other",
        write,
    }
}

fn statement(s: &Ast) -> (Statement, Facts) {
    let mut c = Collect::default();
    let _ = s.visit(&mut c);
    let mut facts = Facts::default();
    let mut extra_tables: Vec<String> = Vec::new();
    let mut where_missing = false;
    let kind = match s {
        Ast::Query(_) => Kind::Select { into: false },
        Ast::Insert(_) => Kind::Insert,
        Ast::Update { selection, .. } => {
            where_missing = selection.is_none();
            Kind::Update
        }
        Ast::Delete(d) => {
            where_missing = d.selection.is_none();
            extra_tables.extend(d.tables.iter().map(name_of));
            Kind::Delete
        }
        Ast::CreateTable(t) => {
            extra_tables.push(name_of(&t.name));
            match &t.like {
                Some(ast::CreateTableLikeKind::Plain(l))
                | Some(ast::CreateTableLikeKind::Parenthesized(l)) => {
                    extra_tables.push(name_of(&l.name))
                }
                None => {}
            }
            extra_tables.extend(t.clone.iter().map(name_of));
            ddl(DdlVerb::Create, "table")
        }
        Ast::CreateView { name, .. } => {
            extra_tables.push(name_of(name));
            ddl(DdlVerb::Create, "view")
        }
        Ast::CreateIndex(i) => {
            extra_tables.push(name_of(&i.table_name));
            ddl(DdlVerb::Create, "index")
        }
        Ast::CreateDatabase { .. } | Ast::CreateSchema { .. } => ddl(DdlVerb::Create, "schema"),
        Ast::CreateFunction(_) => ddl(DdlVerb::Create, "function"),
        Ast::CreateProcedure { .. } => ddl(DdlVerb::Create, "procedure"),
        Ast::CreateTrigger(_) => ddl(DdlVerb::Create, "trigger"),
        Ast::CreateUser(_) | Ast::CreateRole { .. } => ddl(DdlVerb::Create, "role"),
        Ast::CreateSequence { .. } => ddl(DdlVerb::Create, "sequence"),
        Ast::AlterTable {
            name, operations, ..
        } => {
            extra_tables.push(name_of(name));
            for op in operations {
                if let ast::AlterTableOperation::RenameTable {
                    table_name: ast::RenameTableNameKind::As(to) | ast::RenameTableNameKind::To(to),
                } = op
                {
                    extra_tables.push(name_of(to));
                }
            }
            ddl(DdlVerb::Alter, "table")
        }
        Ast::AlterView { name, .. } => {
            extra_tables.push(name_of(name));
            ddl(DdlVerb::Alter, "view")
        }
        Ast::AlterIndex { .. } => ddl(DdlVerb::Alter, "index"),
        Ast::AlterRole { .. } => ddl(DdlVerb::Alter, "role"),
        Ast::RenameTable(r) => {
            for t in r {
                extra_tables.push(name_of(&t.old_name));
                extra_tables.push(name_of(&t.new_name));
            }
            ddl(DdlVerb::Alter, "table")
        }
        Ast::Drop {
            object_type, names, ..
        } => {
            let object = match object_type {
                ObjectType::Table => "table",
                ObjectType::View => "view",
                ObjectType::Index => "index",
                ObjectType::Schema | ObjectType::Database => "schema",
                ObjectType::Role | ObjectType::User => "role",
                ObjectType::Sequence => "sequence",
                _ => "other",
            };
            if matches!(object_type, ObjectType::Table | ObjectType::View) {
                extra_tables.extend(names.iter().map(name_of));
            }
            if matches!(object_type, ObjectType::Schema | ObjectType::Database) {
                for n in names {
                    facts.databases.insert(unquote(&name_of(n)).to_string());
                }
            }
            ddl(DdlVerb::Drop, object)
        }
        Ast::DropFunction { .. } => ddl(DdlVerb::Drop, "function"),
        Ast::DropProcedure { .. } => ddl(DdlVerb::Drop, "procedure"),
        Ast::DropTrigger(_) => ddl(DdlVerb::Drop, "trigger"),
        Ast::Truncate { table_names, .. } => {
            extra_tables.extend(
                table_names
                    .iter()
                    .map(|t: &TruncateTableTarget| name_of(&t.name)),
            );
            ddl(DdlVerb::Truncate, "table")
        }
        Ast::Comment { .. } => ddl(DdlVerb::Comment, "other"),
        Ast::Grant { objects, .. } => {
            grant_objects(objects.as_ref(), &mut facts);
            Kind::Grant
        }
        Ast::Revoke { objects, .. } => {
            grant_objects(objects.as_ref(), &mut facts);
            Kind::Revoke
        }
        // Text run at once, known only when it runs.
        Ast::Execute {
            immediate: true, ..
        } => Kind::Do,
        Ast::Call(f) => {
            c.functions.insert(name_of(&f.name));
            Kind::Call
        }
        Ast::Set(set) => {
            let (name, read_write) = set_facts(set, &mut facts);
            Kind::Set { name, read_write }
        }
        Ast::StartTransaction { .. } => Kind::Transaction {
            op: TxOp::Begin,
            read_write: false,
        },
        Ast::Commit { .. } => Kind::Transaction {
            op: TxOp::Commit,
            read_write: false,
        },
        Ast::Rollback { savepoint, .. } => Kind::Transaction {
            op: if savepoint.is_some() {
                TxOp::Savepoint
            } else {
                TxOp::Rollback
            },
            read_write: false,
        },
        Ast::Savepoint { .. } | Ast::ReleaseSavepoint { .. } => Kind::Transaction {
            op: TxOp::Savepoint,
            read_write: false,
        },
        Ast::Explain {
            analyze, statement, ..
        } => {
            let (inner, inner_facts) = self::statement(statement);
            facts = inner_facts;
            Kind::Explain {
                analyze: *analyze,
                statement: Box::new(inner),
            }
        }
        Ast::ExplainTable { table_name, .. } => {
            extra_tables.push(name_of(table_name));
            Kind::Utility {
                tag: "show",
                write: false,
            }
        }
        Ast::ShowTables { show_options, .. } | Ast::ShowViews { show_options, .. } => {
            // `SHOW TABLES FROM db`: the name is a database.
            if let Some(db) = show_options
                .show_in
                .as_ref()
                .and_then(|i| i.parent_name.as_ref())
            {
                facts.databases.insert(unquote(&name_of(db)).to_string());
            }
            Kind::Utility {
                tag: "show",
                write: false,
            }
        }
        Ast::ShowCreate { obj_name, .. } => {
            extra_tables.push(name_of(obj_name));
            Kind::Utility {
                tag: "show",
                write: false,
            }
        }
        Ast::ShowColumns { .. }
        | Ast::ShowFunctions { .. }
        | Ast::ShowDatabases { .. }
        | Ast::ShowSchemas { .. }
        | Ast::ShowVariables { .. }
        | Ast::ShowVariable { .. }
        | Ast::ShowStatus { .. }
        | Ast::ShowCollation { .. }
        | Ast::ShowCharset(_) => Kind::Utility {
            tag: "show",
            write: false,
        },
        Ast::Use(u) => {
            if let ast::Use::Object(n) | ast::Use::Database(n) | ast::Use::Schema(n) = u {
                facts.databases.insert(unquote(&name_of(n)).to_string());
            }
            other(false)
        }
        Ast::LockTables { .. } | Ast::UnlockTables => Kind::Utility {
            tag: "lock",
            write: false,
        },
        Ast::Analyze { .. } => Kind::Utility {
            tag: "analyze",
            write: false,
        },
        _ => other(true),
    };
    let mut tables: BTreeSet<String> = c.tables;
    tables.extend(extra_tables);
    for t in &tables {
        facts.note_name(t);
    }
    for f in &c.functions {
        facts.note_name(f);
    }
    (
        Statement {
            kind,
            tables: tables.into_iter().collect(),
            functions: c.functions.into_iter().collect(),
            where_missing,
            dml: Vec::new(),
            changes_sql_reading: false,
            sets_settings: false,
        },
        facts,
    )
}

/// `GRANT … ON db.*`, `ON db.t`, `ON DATABASE db`: the databases it reaches.
fn grant_objects(objects: Option<&ast::GrantObjects>, facts: &mut Facts) {
    match objects {
        Some(ast::GrantObjects::Tables(names)) | Some(ast::GrantObjects::Views(names)) => {
            for n in names {
                facts.note_name(&name_of(n));
            }
        }
        Some(ast::GrantObjects::Databases(names)) | Some(ast::GrantObjects::Schemas(names)) => {
            for n in names {
                facts.databases.insert(unquote(&name_of(n)).to_string());
            }
        }
        _ => {}
    }
}

/// The setting a SET names first (for the rules) and whether it may lift read-only mode;
/// every assignment is noted in `facts`.
fn set_facts(set: &Set, facts: &mut Facts) -> (String, bool) {
    let mut note = |name: &ObjectName, value: Option<&Expr>| {
        let raw = name_of(name).to_ascii_lowercase();
        let last = raw.rsplit('.').next().unwrap_or(&raw);
        let n = last.trim_start_matches('@').to_string();
        let v = if n == "sql_mode" {
            value.and_then(sql_mode_value)
        } else {
            value.and_then(literal)
        };
        facts.sets.push((n, v));
    };
    match set {
        Set::SingleAssignment {
            variable, values, ..
        } => note(variable, values.first().filter(|_| values.len() == 1)),
        Set::MultipleAssignments { assignments } => {
            for a in assignments {
                note(&a.name, Some(&a.value));
            }
        }
        Set::SetNames { charset_name, .. } => facts
            .sets
            .push(("names".into(), Some(charset_name.value.clone()))),
        Set::SetNamesDefault {} => facts.sets.push(("names".into(), Some("default".into()))),
        Set::SetTransaction { .. } => {
            return ("transaction".into(), false);
        }
        _ => {}
    }
    let name = facts
        .sets
        .first()
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| "other".into());
    let read_write = facts
        .sets
        .iter()
        .any(|(n, _)| n.contains("read_only") || n == "transaction");
    (name, read_write)
}

/// What a `sql_mode` assignment adds: a literal, or `CONCAT(@@sql_mode, '<flags>', ...)` (the
/// current mode plus literal flags, as MariaDB Connector/J sends), as the added flags.
fn sql_mode_value(e: &Expr) -> Option<String> {
    if let Some(l) = literal(e) {
        return Some(l);
    }
    let Expr::Function(f) = e else { return None };
    if !name_of(&f.name).eq_ignore_ascii_case("concat") {
        return None;
    }
    let ast::FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let mut parts = list.args.iter().map(|a| match a {
        ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => Some(e),
        _ => None,
    });
    let current = match parts.next()?? {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(ids) => ids
            .iter()
            .map(|i| i.value.as_str())
            .collect::<Vec<_>>()
            .join("."),
        _ => return None,
    };
    let current = current.to_ascii_lowercase();
    if !matches!(
        current.as_str(),
        "@@sql_mode" | "@@session.sql_mode" | "@@local.sql_mode"
    ) {
        return None;
    }
    let mut added = Vec::new();
    for p in parts {
        added.push(literal(p?)?);
    }
    Some(added.join(","))
}

/// A literal's text (strings unquoted), or an identifier used as a value (`SET NAMES utf8mb4`,
/// `SET sql_mode = DEFAULT`).
fn literal(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => {
                Some(s.clone())
            }
            ast::Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        Expr::Identifier(i) if !i.value.starts_with('@') => Some(i.value.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope<'static> {
        Scope {
            database: "crm",
            databases: &[],
            mode: SqlMode::default(),
        }
    }

    fn kinds(sql: &str) -> Vec<String> {
        match analyze(sql, scope()).classification {
            Classification::Statements(s) => s.iter().map(|s| s.summary_line()).collect(),
            Classification::Unparsable { .. } => vec!["unparsable".into()],
        }
    }

    fn refusal(sql: &str) -> Option<String> {
        analyze(sql, scope()).refusal
    }

    #[test]
    fn statements_are_classified() {
        assert_eq!(kinds("SELECT * FROM customers"), ["select on customers"]);
        assert_eq!(kinds("delete from t"), ["delete on t (no WHERE)"]);
        assert_eq!(
            kinds("UPDATE t SET a = 1 WHERE id = 2; DROP TABLE x"),
            ["update on t", "ddl/drop on x"]
        );
        assert_eq!(kinds("insert into t select * from s"), ["insert on s, t"]);
        assert_eq!(kinds("CALL purge(1)"), ["call calling purge"]);
        assert_eq!(kinds("select 1;"), ["select"]);
        assert_eq!(kinds("-- nothing\n"), Vec::<String>::new());
        assert_eq!(kinds("SELEC 1"), ["unparsable"]);
    }

    #[test]
    fn version_comments_are_read_as_sql() {
        assert_eq!(
            kinds("SELECT 1 /*!50000 ; DROP TABLE t */"),
            ["select", "ddl/drop on t"]
        );
        assert_eq!(
            kinds("select 1 /*M!100100 ;delete from t*/"),
            ["select", "delete on t (no WHERE)"]
        );
        // Inside a string, a version comment is text.
        assert_eq!(kinds("select '/*! drop table t */'"), ["select"]);
        // Ordinary comments stay comments.
        assert_eq!(kinds("select 1 /* ; drop table t */"), ["select"]);
        assert_eq!(kinds("/*! unterminated"), ["unparsable"]);
    }

    #[test]
    fn prepared_sql_statements() {
        let a = analyze("PREPARE s FROM 'DELETE FROM t'", scope());
        let Classification::Statements(s) = a.classification else {
            panic!()
        };
        match &s[0].kind {
            Kind::Prepare { name, statement } => {
                assert_eq!(name, "s");
                assert_eq!(statement.kind, Kind::Delete);
            }
            k => panic!("{k:?}"),
        }
        let a = analyze("PREPARE s FROM @q", scope());
        let Classification::Statements(s) = a.classification else {
            panic!()
        };
        match &s[0].kind {
            Kind::Prepare { statement, .. } => assert_eq!(statement.kind, Kind::Do),
            k => panic!("{k:?}"),
        }
        assert_eq!(kinds("EXECUTE s USING @a"), ["execute"]);
        assert_eq!(kinds("EXECUTE IMMEDIATE 'DROP TABLE t'"), ["ddl/drop on t"]);
        assert_eq!(kinds("EXECUTE IMMEDIATE @q"), ["do"]);
        assert_eq!(
            kinds("EXECUTE IMMEDIATE CONCAT('DROP ', 'TABLE t')"),
            ["do"]
        );
        assert!(refusal("EXECUTE IMMEDIATE 'SELECT * FROM mysql.user'").is_some());
        assert_eq!(kinds("DEALLOCATE PREPARE s"), ["deallocate"]);
    }

    #[test]
    fn refusals() {
        assert!(refusal("LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE t")
            .unwrap()
            .contains("LOCAL INFILE"));
        assert!(refusal("select * from t into outfile '/tmp/x'").is_some());
        assert!(refusal("select * from mysql.user")
            .unwrap()
            .contains("\"mysql\""));
        assert!(refusal("select * from crm.t").is_none());
        assert!(refusal("select * from information_schema.tables").is_none());
        assert!(refusal("use other").is_some());
        assert!(refusal("SET NAMES gbk").unwrap().contains("gbk"));
        assert!(refusal("SET NAMES utf8mb4").is_none());
        assert!(refusal("SET NAMES utf8mb4; select 1")
            .unwrap()
            .contains("multi-statement"));
        assert!(refusal("set sql_mode = 'ANSI_QUOTES'").is_some());
        assert!(
            refusal("set @@session.sql_mode = 'STRICT_TRANS_TABLES,NO_BACKSLASH_ESCAPES'")
                .is_some()
        );
        assert!(refusal("set sql_mode = 'STRICT_TRANS_TABLES'").is_none());
        assert!(refusal("set sql_mode = @x").is_some());
        assert!(
            refusal("SET autocommit=1, sql_mode = concat(@@sql_mode,',STRICT_TRANS_TABLES')")
                .is_none()
        );
        assert!(refusal("SET sql_mode = concat(@@sql_mode,',ANSI_QUOTES')").is_some());
        assert!(refusal("SET sql_mode = concat(@x,',STRICT_TRANS_TABLES')").is_some());
        assert!(refusal("select 1; set character_set_client = 'utf8mb4'").is_some());
        let other = Scope {
            database: "crm",
            databases: &["reporting".to_string()],
            mode: SqlMode::default(),
        };
        assert!(analyze("select * from reporting.t", other)
            .refusal
            .is_none());
    }

    fn kinds_in(sql: &str, mode: &str) -> Vec<String> {
        let scope = Scope {
            mode: SqlMode::parse(mode),
            ..scope()
        };
        match analyze(sql, scope).classification {
            Classification::Statements(s) => s.iter().map(|s| s.summary_line()).collect(),
            Classification::Unparsable { .. } => vec!["unparsable".into()],
        }
    }

    /// The same text splits differently under the server's sql_mode: the gateway reads it
    /// as the server does.
    #[test]
    fn text_is_read_in_the_servers_sql_mode() {
        let sql = r"SELECT '\'; DROP TABLE customers; -- '";
        // Default mode: one string holding the rest.
        assert_eq!(kinds_in(sql, "STRICT_TRANS_TABLES"), ["select"]);
        // NO_BACKSLASH_ESCAPES: the string ends at the second quote, and a DROP follows.
        assert_eq!(
            kinds_in(sql, "STRICT_TRANS_TABLES,NO_BACKSLASH_ESCAPES"),
            ["select", "ddl/drop on customers"]
        );
        assert_eq!(
            kinds_in(r"SELECT 'a\' FROM t", "NO_BACKSLASH_ESCAPES"),
            ["select on t"]
        );
        // ANSI_QUOTES: "..." names a table.
        assert_eq!(
            kinds_in(r#"SELECT * FROM "customers""#, "ANSI"),
            ["select on customers"]
        );
        assert_eq!(
            kinds_in(r#"DELETE FROM "a""b" WHERE 1"#, "ANSI_QUOTES"),
            [r#"delete on a"b"#]
        );
        assert!(analyze(
            r#"SELECT * FROM "mysql"."user""#,
            Scope {
                mode: SqlMode::parse("ANSI_QUOTES"),
                ..scope()
            }
        )
        .refusal
        .is_some());
        // Version comments and comment markers inside strings stay text in both modes.
        assert_eq!(
            kinds_in(r"SELECT '\/*!'", "NO_BACKSLASH_ESCAPES"),
            ["select"]
        );
        assert_eq!(
            kinds_in("SELECT 1 /*!50000 ; DELETE FROM t */", "ANSI_QUOTES"),
            ["select", "delete on t (no WHERE)"]
        );
    }

    #[test]
    fn other_databases_are_found_wherever_a_statement_names_them() {
        for sql in [
            "SHOW TABLES FROM mysql",
            "SHOW TABLES IN `mysql`",
            "SHOW CREATE TABLE mysql.user",
            "ALTER TABLE customers RENAME TO other.customers",
            "CREATE TABLE c2 LIKE other.customers",
            "GRANT SELECT ON other.* TO 'x'@'%'",
            "RENAME TABLE customers TO other.c",
            "INSERT INTO other.t SELECT * FROM customers",
            "SELECT * FROM customers c JOIN `other`.`t` o ON o.id = c.id",
            "SELECT other.f(1)",
            "CALL other.p()",
            "DROP DATABASE other",
            "USE other",
        ] {
            let r = refusal(sql);
            assert!(
                r.as_deref()
                    .is_some_and(|r| r.contains("is not part of this resource")),
                "{sql}: {r:?}"
            );
        }
        assert!(refusal("SHOW TABLES").is_none());
        assert!(refusal("SHOW TABLES FROM crm").is_none());
        assert!(refusal("ALTER TABLE customers RENAME TO clients").is_none());
        assert!(refusal("SELECT c.email FROM customers c").is_none());
    }

    /// `--` starts a comment only before whitespace: `1--1` is arithmetic and what follows runs.
    #[test]
    fn double_dash_without_a_space_is_not_a_comment() {
        assert_eq!(
            kinds("SELECT 1--1; DROP TABLE t"),
            ["select", "ddl/drop on t"]
        );
        assert_eq!(kinds("SELECT 1 -- ; DROP TABLE t"), ["select"]);
    }
}
