//! Where a SQL text holds values: its string and number literals and its comments, found with
//! PostgreSQL's own scanner. Masking for the audit trail and for reviewers rewrites these
//! spans only, so a detector can never hide keywords or a second statement behind a mask.

use pg_query::protobuf::Token;
use std::ops::Range;

/// Byte ranges of `sql`'s literals and comments, in order; `None` when the scanner rejects it
/// (an unterminated quote or comment).
pub fn value_spans(sql: &str) -> Option<Vec<Range<usize>>> {
    let scanned = std::panic::catch_unwind(|| pg_query::scan(sql))
        .ok()?
        .ok()?;
    Some(
        scanned
            .tokens
            .iter()
            .filter(|t| {
                matches!(
                    Token::try_from(t.token),
                    Ok(Token::Sconst
                        | Token::Usconst
                        | Token::Bconst
                        | Token::Xconst
                        | Token::Iconst
                        | Token::Fconst
                        | Token::SqlComment
                        | Token::CComment)
                )
            })
            .filter_map(|t| {
                let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
                (start < end
                    && end <= sql.len()
                    && sql.is_char_boundary(start)
                    && sql.is_char_boundary(end))
                .then_some(start..end)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_comments_only() {
        let sql = "SELECT 'a@b.example' AS \"email\", 42 -- note\nFROM t /* c */ WHERE x = E'\\x'";
        let spans: Vec<&str> = value_spans(sql)
            .unwrap()
            .into_iter()
            .map(|r| &sql[r])
            .collect();
        assert_eq!(
            spans,
            vec!["'a@b.example'", "42", "-- note", "/* c */", "E'\\x'"]
        );
        assert!(value_spans("SELECT 'unterminated").is_none());
        let dollar = "SELECT $q$ -----BEGIN PRIVATE KEY $q$; DELETE FROM t";
        let spans: Vec<&str> = value_spans(dollar)
            .unwrap()
            .into_iter()
            .map(|r| &dollar[r])
            .collect();
        assert_eq!(spans, vec!["$q$ -----BEGIN PRIVATE KEY $q$"]);
    }
}

/// For a text that is exactly one `COPY ... TO STDOUT`: a `SELECT` with the same output
/// columns, which the gateway can describe to mask COPY data column by column.
/// `COPY (query) TO STDOUT` gives the query; `COPY table [(cols)] TO STDOUT` selects those
/// columns (or all) from the table.
pub fn copy_to_stdout_source(sql: &str) -> Option<String> {
    use pg_query::protobuf::{self, node::Node as N};
    let parsed = crate::bounded(sql, |s| std::panic::catch_unwind(|| pg_query::parse(s)))
        .ok()?
        .ok()?
        .ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let Some(N::CopyStmt(copy)) = raw.stmt.as_ref()?.node.as_ref() else {
        return None;
    };
    if copy.is_from || copy.is_program || !copy.filename.is_empty() {
        return None;
    }
    if let Some(query) = copy.query.as_deref() {
        let tree = protobuf::ParseResult {
            version: parsed.protobuf.version,
            stmts: vec![protobuf::RawStmt {
                stmt: Some(Box::new(query.clone())),
                stmt_location: 0,
                stmt_len: 0,
            }],
        };
        return pg_query::deparse(&tree).ok();
    }
    let rel = copy.relation.as_ref()?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let table = [&rel.catalogname, &rel.schemaname, &rel.relname]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| quote(p))
        .collect::<Vec<_>>()
        .join(".");
    let columns: Vec<String> = copy
        .attlist
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(N::String(s)) => Some(quote(&s.sval)),
            _ => None,
        })
        .collect();
    let columns = if columns.is_empty() {
        "*".to_string()
    } else {
        columns.join(", ")
    };
    Some(format!("SELECT {columns} FROM {table}"))
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    #[test]
    fn copy_sources() {
        assert_eq!(
            copy_to_stdout_source("COPY people TO STDOUT").as_deref(),
            Some("SELECT * FROM \"people\"")
        );
        assert_eq!(
            copy_to_stdout_source("copy app.people (id, \"E mail\") to stdout with (format csv)")
                .as_deref(),
            Some("SELECT \"id\", \"E mail\" FROM \"app\".\"people\"")
        );
        let q = copy_to_stdout_source("COPY (SELECT email FROM people WHERE id > 1) TO STDOUT")
            .unwrap();
        assert!(q.starts_with("SELECT email FROM people"), "{q}");
        assert!(copy_to_stdout_source("COPY people FROM STDIN").is_none());
        assert!(copy_to_stdout_source("COPY people TO '/tmp/x'").is_none());
        assert!(copy_to_stdout_source("SELECT 1; COPY people TO STDOUT").is_none());
        assert!(copy_to_stdout_source("SELECT 1").is_none());
    }
}
