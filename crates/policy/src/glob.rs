//! Shell-style globs (`*` any run, `?` one character), ASCII case-insensitive: SQL folds
//! unquoted identifiers to lower case, and a guardrail on `Orders` must not miss `orders`.

pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi].eq_ignore_ascii_case(&t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Whether `name` (as written in SQL: `schema.name` or `name`) matches `pattern`.
///
/// `strict` (for allow rules): the pattern must match the name as written. Otherwise (deny and
/// review rules, writing functions) the schema is not trusted to settle it: a pattern without a
/// dot matches the last part (`orders` covers `public.orders`), and an unqualified name matches
/// a qualified pattern's last part (`public.orders` covers `orders`, which the search path may
/// resolve to it). When unsure, the restrictive rule applies.
pub(crate) fn name_matches(pattern: &str, name: &str, strict: bool) -> bool {
    if glob(pattern, name) {
        return true;
    }
    if strict {
        return false;
    }
    let last = |s: &str| s.rsplit('.').next().unwrap_or("").to_string();
    (!pattern.contains('.') && glob(pattern, &last(name)))
        || (!name.contains('.') && glob(&last(pattern), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("pg_advisory*", "pg_advisory_xact_lock"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "ABC"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*ssn*", "customer_ssn_hash"));
        assert!(!glob("pg_write_*", "pg_read_file"));
        assert!(glob("spiffe://prod/*", "spiffe://prod/agent/7"));
    }

    #[test]
    fn qualified_names() {
        assert!(name_matches("orders", "public.orders", false));
        assert!(!name_matches("orders", "public.orders", true));
        assert!(name_matches("public.orders", "public.orders", true));
        assert!(name_matches("public.orders", "orders", false));
        assert!(!name_matches("public.orders", "orders", true));
        assert!(!name_matches("sales.*", "public.orders", false));
        assert!(name_matches("set_config", "pg_catalog.set_config", false));
        assert!(!name_matches("orders", "orders_archive", false));
    }
}
