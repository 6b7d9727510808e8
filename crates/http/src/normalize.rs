//! The request as the upstream will see it, so rules judge what will run: the path normalised
//! (unreserved percent-escapes decoded, `;` parameters, empty and dot segments removed; an
//! encoded `/` or `\`, a NUL, a raw non-ASCII byte or escapes that are not UTF-8 refused) and the method as any override
//! header would make it. The normalised path is also what is forwarded.

/// Why a request target is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTarget {
    #[error("the request path holds an encoded '/' or '\\' (%2F, %5C) or a backslash; tollgate refuses these so that its rules and the upstream read the same path")]
    EncodedSeparator,
    #[error("the request path holds a NUL, a control character or a raw non-ASCII byte")]
    BadByte,
    #[error("the request path holds a malformed percent-escape")]
    BadEscape,
    #[error("the request path holds percent-escapes that are not UTF-8 (such as the overlong %C0%AE); tollgate refuses these so that its rules and the upstream read the same path")]
    NotUtf8,
    #[error("the request path must start with '/'")]
    NotAbsolute,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalise a raw (still percent-encoded) path. The result starts with `/`; it ends with `/`
/// when the input did (after dot-segment removal), so `/a/` and `/a` stay distinct.
pub fn normalize_path(raw: &str) -> Result<String, BadTarget> {
    if !raw.starts_with('/') {
        return Err(BadTarget::NotAbsolute);
    }
    let b = raw.as_bytes();
    // 1. Decode unreserved escapes, upper-case the others; refuse separators in disguise.
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (h, l) = match (b.get(i + 1).copied(), b.get(i + 2).copied()) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(BadTarget::BadEscape),
                };
                let v = match (hex_val(h), hex_val(l)) {
                    (Some(h), Some(l)) => h * 16 + l,
                    _ => return Err(BadTarget::BadEscape),
                };
                match v {
                    b'/' | b'\\' => return Err(BadTarget::EncodedSeparator),
                    0..=0x1f | 0x7f => return Err(BadTarget::BadByte),
                    v if unreserved(v) => decoded.push(v),
                    v => decoded.extend_from_slice(format!("%{v:02X}").as_bytes()),
                }
                i += 3;
            }
            b'\\' => return Err(BadTarget::EncodedSeparator),
            0..=0x20 | 0x7f..=0xff => return Err(BadTarget::BadByte),
            _ => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(decoded).map_err(|_| BadTarget::BadByte)?;
    // Escapes that decode to no UTF-8 (overlong forms of `.` and `/` above all) are read as
    // something else by lenient upstream decoders: the rules would judge one path, the
    // upstream serve another.
    if !escapes_are_utf8(&decoded) {
        return Err(BadTarget::NotUtf8);
    }
    // 2. Segments: drop `;` parameters, empty segments and `.`; `..` pops (never above the root).
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (trailing && !path.ends_with('/')) {
        path.push('/');
    }
    Ok(path)
}

/// The readings of a normalised path that rules judge (the relay takes the strictest
/// decision): the path itself and, when it differs, the path with trailing dots and spaces cut
/// from every segment, as IIS and ASP.NET read it (`/admin./x`, `/admin%20/x`: `/admin/x`).
pub fn path_readings(path: &str) -> Vec<String> {
    let mut lenient = String::with_capacity(path.len());
    for seg in path.split('/').skip(1) {
        let mut s = seg;
        loop {
            let t = s.trim_end_matches('.');
            let t = t.strip_suffix("%20").unwrap_or(t);
            if t == s {
                break;
            }
            s = t;
        }
        if s.is_empty() && !seg.is_empty() {
            continue;
        }
        lenient.push('/');
        lenient.push_str(s);
    }
    if lenient.is_empty() {
        lenient.push('/');
    }
    if lenient == path {
        vec![path.to_string()]
    } else {
        vec![path.to_string(), lenient]
    }
}

/// Whether the path, its (well-formed, already checked) escapes decoded, is UTF-8.
fn escapes_are_utf8(path: &str) -> bool {
    if !path.contains('%') {
        return true;
    }
    let b = path.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex_val),
            b.get(i + 2).copied().and_then(hex_val),
        ) {
            (b'%', Some(h), Some(l)) => {
                bytes.push(h * 16 + l);
                i += 3;
            }
            (c, _, _) => {
                bytes.push(c);
                i += 1;
            }
        }
    }
    std::str::from_utf8(&bytes).is_ok()
}

/// Query pairs, decoded (`+` is a space), for rule conditions. Undecodable escapes are kept
/// as written.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    pairs(query, &['&'])
}

/// Every reading of a query that rules judge (the relay takes the strictest decision), so that
/// no upstream parser finds a pair the rules did not see: split on `&`; split on `;` too, the
/// separator some servers still accept (Python's urllib before 3.9.2 and frameworks on it);
/// and with keys as lenient frameworks read them and values cut at a NUL (see [`lenient_key`]).
pub fn query_readings(query: &str) -> Vec<Vec<(String, String)>> {
    let strict = pairs(query, &['&']);
    let split = if query.contains(';') {
        pairs(query, &['&', ';'])
    } else {
        strict.clone()
    };
    let lenient: Vec<(String, String)> = split
        .iter()
        .map(|(k, v)| {
            (
                lenient_key(k),
                v.split('\0').next().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut readings = vec![strict];
    for r in [split, lenient] {
        if !readings.contains(&r) {
            readings.push(r);
        }
    }
    readings
}

/// A key as lenient frameworks read it: PHP drops leading spaces, turns `.` and spaces into
/// `_` and `k[]` into `k`; ASP.NET ignores case.
fn lenient_key(k: &str) -> String {
    let k = k.trim_start();
    let k = match k.find('[') {
        Some(i) if i > 0 && k.ends_with(']') => &k[..i],
        _ => k,
    };
    k.chars()
        .map(|c| match c {
            '.' | ' ' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn pairs(query: &str, separators: &[char]) -> Vec<(String, String)> {
    query
        .split(separators)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode_component(k), decode_component(v))
        })
        .collect()
}

fn decode_component(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    b.get(i + 1).and_then(|c| hex_val(*c)),
                    b.get(i + 2).and_then(|c| hex_val(*c)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parameter Rails, Laravel and Symfony read as the real method of a POST, in the query
/// or a form body.
pub const METHOD_OVERRIDE_PARAM: &str = "_method";

/// The methods `_method` names (upper-cased) in a query and in a form body (`form_body`: the
/// body, when it is `application/x-www-form-urlencoded` or has no type, as Rack reads it).
pub fn method_params(query: Option<&str>, form_body: Option<&[u8]>) -> Vec<String> {
    let mut out = Vec::new();
    let body = form_body.map(String::from_utf8_lossy);
    for text in [query, body.as_deref()].into_iter().flatten() {
        for (k, v) in pairs(text, &['&', ';']) {
            let m = v.trim().to_ascii_uppercase();
            if k.trim() == METHOD_OVERRIDE_PARAM && !m.is_empty() && !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

/// Headers some frameworks read as the real method of a POST.
pub const METHOD_OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_normalise() {
        let n = |p| normalize_path(p).unwrap();
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/b"), "/a/b");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("//admin//users"), "/admin/users");
        assert_eq!(n("/v1/../admin/x"), "/admin/x");
        assert_eq!(n("/../../admin"), "/admin");
        assert_eq!(n("/./admin/."), "/admin/");
        assert_eq!(n("/%61dmin/%7e"), "/admin/~");
        assert_eq!(n("/%2e%2e/admin"), "/admin");
        assert_eq!(n("/v1/%2E%2E/admin"), "/admin");
        assert_eq!(n("/admin;jsessionid=1/users;x"), "/admin/users");
        assert_eq!(n("/a%20b/%c3%a9"), "/a%20b/%C3%A9");
        assert_eq!(n("/a/.."), "/");
    }

    #[test]
    fn disguised_separators_and_bad_bytes_are_refused() {
        assert_eq!(normalize_path("/a%2fb"), Err(BadTarget::EncodedSeparator));
        assert_eq!(normalize_path("/a%2Fb"), Err(BadTarget::EncodedSeparator));
        assert_eq!(normalize_path("/a%5cb"), Err(BadTarget::EncodedSeparator));
        assert_eq!(normalize_path("/a\\b"), Err(BadTarget::EncodedSeparator));
        assert_eq!(normalize_path("/a%00"), Err(BadTarget::BadByte));
        assert_eq!(normalize_path("/a%zz"), Err(BadTarget::BadEscape));
        assert_eq!(normalize_path("/a%2"), Err(BadTarget::BadEscape));
        // Overlong UTF-8 for `.` and `/`, a lone Latin-1 byte: not what the rules would judge.
        assert_eq!(
            normalize_path("/%c0%ae%c0%ae/admin"),
            Err(BadTarget::NotUtf8)
        );
        assert_eq!(normalize_path("/v1/%c0%af/admin"), Err(BadTarget::NotUtf8));
        assert_eq!(normalize_path("/caf%e9"), Err(BadTarget::NotUtf8));
        // Double encoding is decoded once, never twice.
        assert_eq!(
            normalize_path("/%252e%252e/admin").unwrap(),
            "/%252e%252e/admin"
        );
        assert_eq!(normalize_path("a"), Err(BadTarget::NotAbsolute));
    }

    #[test]
    fn query_pairs_decode() {
        assert_eq!(
            query_pairs("a=1&b=x+y&c=%41&d&e=%zz"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "A".into()),
                ("d".into(), "".into()),
                ("e".into(), "%zz".into()),
            ]
        );
    }

    #[test]
    fn queries_are_read_every_way_an_upstream_might() {
        assert_eq!(query_readings("a=1&b=2").len(), 1);
        let r = query_readings("a=1;dry_run=false");
        assert_eq!(r[0], vec![("a".into(), "1;dry_run=false".into())]);
        let pair = ("dry_run".to_string(), "false".to_string());
        assert!(r[1].contains(&pair));
        for q in [
            "DRY_RUN=false",
            "dry.run=false",
            "dry+run=false",
            "dry_run[]=false",
            "%20dry_run=false",
            "dry_run=false%00x",
        ] {
            assert!(
                query_readings(q).iter().any(|r| r.contains(&pair)),
                "{q}: {:?}",
                query_readings(q)
            );
        }
    }

    #[test]
    fn trailing_dots_and_spaces_are_a_second_reading() {
        assert_eq!(path_readings("/admin/x"), vec!["/admin/x"]);
        assert_eq!(path_readings("/"), vec!["/"]);
        assert_eq!(path_readings("/a/"), vec!["/a/"]);
        assert_eq!(path_readings("/admin./x"), vec!["/admin./x", "/admin/x"]);
        assert_eq!(
            path_readings("/admin.%20./x/"),
            vec!["/admin.%20./x/", "/admin/x/"]
        );
        assert_eq!(path_readings("/a/.../b"), vec!["/a/.../b", "/a/b"]);
        assert_eq!(path_readings("/v1.2/x"), vec!["/v1.2/x"]);
    }

    #[test]
    fn method_parameters() {
        assert_eq!(
            method_params(Some("a=1&_method=delete"), Some(b"x=1&%5Fmethod=PUT")),
            vec!["DELETE".to_string(), "PUT".to_string()]
        );
        assert!(method_params(Some("method=DELETE"), None).is_empty());
        assert!(method_params(None, None).is_empty());
    }

    proptest! {
        // Normalising twice changes nothing, and a normalised path has no dot or empty segment.
        #[test]
        fn normalisation_is_idempotent(segs in proptest::collection::vec("[a-zA-Z0-9._~%;-]{0,6}", 0..8)) {
            let raw = format!("/{}", segs.join("/"));
            if let Ok(once) = normalize_path(&raw) {
                prop_assert_eq!(normalize_path(&once).unwrap(), once.clone());
                for s in once.trim_matches('/').split('/') {
                    prop_assert!(s != "." && s != "..");
                }
                prop_assert!(!once.contains("//"));
            }
        }
    }
}
