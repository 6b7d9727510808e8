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
