//! Query strings and times, parsed apart from any socket: what the API accepts and how it
//! explains a value it cannot use.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Most sessions one page of `GET /api/v1/sessions` may ask for.
pub const MAX_LIMIT: usize = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 50;

/// A parameter the API cannot use; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadParam(pub String);

/// `application/x-www-form-urlencoded` pairs, percent-decoded (`+` is a space).
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, BadParam> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Percent-decode one component (`+` is a space).
pub fn decode(s: &str) -> Result<String, BadParam> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        BadParam(format!(
                            "bad percent-encoding in {s:?}: write %XX with two hex digits"
                        ))
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| BadParam(format!("{s:?} does not decode to UTF-8")))
}

/// Percent-encode a query or path component (everything but unreserved characters).
pub fn encode(s: &str) -> String {
    tollgate_identity::oidc_login::percent_encode(s)
}

/// A point in time given as RFC 3339 (`2026-11-25T10:00:00Z`) or as Unix milliseconds.
pub fn parse_time(name: &str, value: &str) -> Result<i64, BadParam> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    OffsetDateTime::parse(value, &Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            BadParam(format!(
                "{name}={value:?} is not a time: write RFC 3339 (e.g. 2026-11-25T10:00:00Z) or Unix milliseconds"
            ))
        })
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-25T10:00:00.123Z`.
pub fn format_time(unix_ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The parameters of `GET /api/v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionsQuery {
    pub subject: Option<String>,
    pub resource: Option<String>,
    pub outcome: Option<String>,
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
    pub limit: usize,
    pub offset: usize,
}

/// The parameters of `GET /api/v1/export`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportQuery {
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
}

fn unknown(name: &str, accepted: &str) -> BadParam {
    BadParam(format!(
        "unknown parameter {name:?}: accepted parameters are {accepted}"
    ))
}

fn non_empty(name: &str, v: String) -> Result<Option<String>, BadParam> {
    if v.is_empty() {
        return Err(BadParam(format!(
            "{name} is empty: give a value or leave it out"
        )));
    }
    Ok(Some(v))
}

pub fn sessions_query(query: &str) -> Result<SessionsQuery, BadParam> {
    let mut q = SessionsQuery {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (k, v) in parse_query(query)? {
        match k.as_str() {
            "subject" => q.subject = non_empty(&k, v)?,
            "resource" => q.resource = non_empty(&k, v)?,
            "outcome" => q.outcome = non_empty(&k, v)?,
            "since" => q.since_unix_ms = Some(parse_time(&k, &v)?),
            "until" => q.until_unix_ms = Some(parse_time(&k, &v)?),
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        BadParam(format!(
                            "limit={v:?}: write a whole number from 1 to {MAX_LIMIT}"
                        ))
                    })?
            }
            "offset" => {
                q.offset = v.parse().map_err(|_| {
                    BadParam(format!("offset={v:?}: write a whole number, 0 or more"))
                })?
            }
            _ => {
                return Err(unknown(
                    &k,
                    "subject, resource, outcome, since, until, limit, offset",
                ))
            }
        }
    }
    check_range(q.since_unix_ms, q.until_unix_ms)?;
    Ok(q)
}

pub fn export_query(query: &str) -> Result<ExportQuery, BadParam> {
    let mut q = ExportQuery::default();
    for (k, v) in parse_query(query)? {
        match k.as_str() {
            "since" => q.since_unix_ms = Some(parse_time(&k, &v)?),
            "until" => q.until_unix_ms = Some(parse_time(&k, &v)?),
            _ => return Err(unknown(&k, "since, until")),
        }
    }
    check_range(q.since_unix_ms, q.until_unix_ms)?;
    Ok(q)
}

/// Routes without parameters refuse any, so a typo is not silently ignored.
pub fn no_query(query: &str) -> Result<(), BadParam> {
    match parse_query(query)?.first() {
        Some((k, _)) => Err(BadParam(format!(
            "unknown parameter {k:?}: this route takes no parameters"
        ))),
        None => Ok(()),
    }
}

fn check_range(since: Option<i64>, until: Option<i64>) -> Result<(), BadParam> {
    match (since, until) {
        (Some(s), Some(u)) if s >= u => Err(BadParam(
            "since must be earlier than until (since is inclusive, until exclusive)".into(),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_query_defaults_and_filters() {
        assert_eq!(
            sessions_query("").unwrap(),
            SessionsQuery {
                limit: 50,
                ..Default::default()
            }
        );
        let q = sessions_query(
            "subject=spiffe%3A%2F%2Fex.org%2Fa+b&resource=app&outcome=closed&since=1000&until=2026-01-01T00:00:00Z&limit=1000&offset=5",
        )
        .unwrap();
        assert_eq!(q.subject.as_deref(), Some("spiffe://ex.org/a b"));
        assert_eq!(q.resource.as_deref(), Some("app"));
        assert_eq!(q.outcome.as_deref(), Some("closed"));
        assert_eq!(q.since_unix_ms, Some(1000));
        assert_eq!(q.until_unix_ms, Some(1_767_225_600_000));
        assert_eq!((q.limit, q.offset), (1000, 5));
    }

    #[test]
    fn bad_parameters_say_what_to_write() {
        let err = |q: &str| sessions_query(q).unwrap_err().0;
        assert!(
            err("limit=1001").contains("from 1 to 1000"),
            "{}",
            err("limit=1001")
        );
        assert!(err("limit=0").contains("from 1 to 1000"));
        assert!(err("offset=-1").contains("0 or more"));
        assert!(err("since=yesterday").contains("RFC 3339"));
        assert!(err("subjet=alice").contains("accepted parameters are subject"));
        assert!(err("since=2000&until=1000").contains("earlier"));
        assert!(err("subject=%G1").contains("%XX"));
        assert!(err("subject=").contains("empty"));
        assert!(export_query("limit=5")
            .unwrap_err()
            .0
            .contains("since, until"));
        assert!(no_query("x=1").is_err());
        assert!(no_query("").is_ok());
    }

    #[test]
    fn encode_round_trips_and_times_format_in_utc_with_millis() {
        let s = "spiffe://ex.org/agent 7?&=%";
        assert_eq!(decode(&encode(s)).unwrap(), s);
        assert_eq!(format_time(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(
            parse_time("t", &format_time(1_767_225_600_123)).unwrap(),
            1_767_225_600_123
        );
    }
}
