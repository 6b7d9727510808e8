//! Column-name globs: `email`, `*ssn*`, `customers.card_*` (case-insensitive; `*` and `?`).

use std::fmt;

/// A column pattern. Without a `.` it matches the column name; with one it matches
/// `table.column` (with or without the table's schema), or, when the column's table is unknown,
/// the column part alone (over-masking rather than leaking).
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<u8>,
    qualified: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            pattern: pattern.to_ascii_lowercase().into_bytes(),
            qualified: pattern.contains('.'),
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.pattern).unwrap_or_default()
    }

    /// Does the pattern match this column (`table` may be schema-qualified)?
    pub fn matches_column(&self, table: Option<&str>, column: &str) -> bool {
        if !self.qualified {
            return wildcard(&self.pattern, column.as_bytes());
        }
        // The table is unknown (an adapter that cannot name a column's source table): match
        // the column part, so that `customers.card_*` masks more rather than less.
        let Some(table) = table else {
            return match self.pattern.iter().rposition(|b| *b == b'.') {
                Some(dot) => wildcard(&self.pattern[dot + 1..], column.as_bytes()),
                None => false,
            };
        };
        let qualified = format!("{table}.{column}");
        if wildcard(&self.pattern, qualified.as_bytes()) {
            return true;
        }
        match table.rfind('.') {
            Some(dot) => wildcard(&self.pattern, &qualified.as_bytes()[dot + 1..]),
            None => false,
        }
    }

    /// Matches a whole string (for instance a JSON key), case-insensitively.
    pub fn matches(&self, text: &str) -> bool {
        wildcard(&self.pattern, text.as_bytes())
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.as_str())
    }
}

/// Iterative wildcard match with single-star backtracking (linear in practice).
fn wildcard(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let c = text[t].to_ascii_lowercase();
        if p < pat.len() && (pat[p] == b'?' || pat[p] == c) {
            p += 1;
            t += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_and_stars() {
        assert!(Glob::new("email").matches_column(None, "EMAIL"));
        assert!(!Glob::new("email").matches_column(None, "email2"));
        assert!(Glob::new("*ssn*").matches_column(Some("people"), "customer_SSN_last"));
        assert!(Glob::new("*ssn*").matches_column(None, "ssn"));
        assert!(!Glob::new("*ssn*").matches_column(None, "session"));
        assert!(Glob::new("card_?").matches_column(None, "card_1"));
        assert!(!Glob::new("card_?").matches_column(None, "card_12"));
        assert!(Glob::new("a*b*c").matches_column(None, "axxbyyc"));
        assert!(!Glob::new("a*b*c").matches_column(None, "axxbyy"));
        assert!(Glob::new("*").matches_column(None, ""));
    }

    #[test]
    fn qualified_patterns_match_the_table_when_it_is_known() {
        let g = Glob::new("customers.card_*");
        assert!(g.matches_column(Some("customers"), "card_number"));
        assert!(g.matches_column(Some("public.Customers"), "CARD_number"));
        assert!(!g.matches_column(Some("orders"), "card_number"));
        // Unknown table: the column part decides, masking more rather than less.
        assert!(g.matches_column(None, "card_number"));
        assert!(!g.matches_column(None, "cardnumber"));
        assert!(Glob::new("*.ssn").matches_column(Some("hr.people"), "ssn"));
        assert!(Glob::new("public.customers.*").matches_column(Some("public.customers"), "x"));
    }
}
