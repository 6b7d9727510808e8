//! `tollgate sessions ...`: the audit trail read through the gateway's HTTPS API.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;
use tollgate_api::client::{ApiClient, ClientError, ClientOptions};
use tollgate_api::params::{encode, format_time, parse_time};
use tollgate_api::view::{Event, Session, SessionDetail, SessionsPage};

/// Longest pause `replay` makes between two events, whatever the recording says.
const MAX_REPLAY_GAP: Duration = Duration::from_secs(2);

/// How to reach the gateway's HTTPS API (`server.https_listen`) and who to be there.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// The gateway's HTTPS API, e.g. https://gateway.example:8443.
    #[arg(long, env = "TOLLGATE_GATEWAY")]
    gateway: String,
    /// Client certificate (PEM) issued by the gateway's client CA.
    #[arg(long, env = "TOLLGATE_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long, env = "TOLLGATE_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// A service token (instead of a certificate); prefer TOLLGATE_TOKEN, which `ps` does not show.
    #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate the gateway's certificate must chain to.
    #[arg(long, env = "TOLLGATE_CA")]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum SessionsCmd {
    /// Sessions, newest first.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this identity (certificate CN or SPIFFE ID, or token subject).
        #[arg(long)]
        subject: Option<String>,
        /// Only this resource.
        #[arg(long)]
        resource: Option<String>,
        /// e.g. closed, rejected, client_disconnected, upstream_lost.
        #[arg(long)]
        outcome: Option<String>,
        /// Started at or after: RFC 3339, Unix milliseconds, or a duration ago (30m, 12h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Started before (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Sessions per page (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Skip this many (the `next_offset` of the previous page).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// JSON (the API's page: `sessions`, `next_offset`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A session's metadata and its event timeline.
    Show {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        /// JSON (`session`, `events`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Play a session back on the terminal with its original pacing.
    Replay {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        /// Playback speed: 2 = twice as fast, 0 = no pauses. Pauses are capped at 2 s.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Every event as JSON Lines (one event per line, stable field names), for a SIEM.
    Export {
        #[command(flatten)]
        api: ApiArgs,
        /// Events at or after (same forms as `list --since`).
        #[arg(long)]
        since: Option<String>,
        /// Events before.
        #[arg(long)]
        until: Option<String>,
        /// Write to FILE (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: SessionsCmd) -> anyhow::Result<()> {
    match cmd {
        SessionsCmd::List {
            api,
            subject,
            resource,
            outcome,
            since,
            until,
            limit,
            offset,
            json,
        } => {
            let mut q = vec![("limit", limit.to_string()), ("offset", offset.to_string())];
            q.extend(subject.map(|v| ("subject", v)));
            q.extend(resource.map(|v| ("resource", v)));
            q.extend(outcome.map(|v| ("outcome", v)));
            q.extend(time_arg("--since", since)?.map(|v| ("since", v)));
            q.extend(time_arg("--until", until)?.map(|v| ("until", v)));
            let page: SessionsPage = get(&api, &format!("/api/v1/sessions{}", query(&q)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                print!("{}", sessions_table(&page.sessions));
                if let Some(next) = page.next_offset {
                    println!("(more: --offset {next})");
                }
            }
        }
        SessionsCmd::Show { id, api, json } => {
            let detail: SessionDetail = get(&api, &format!("/api/v1/sessions/{}", encode(&id)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                print!("{}", show_text(&detail));
            }
        }
        SessionsCmd::Replay { id, api, speed } => {
            if !speed.is_finite() || speed < 0.0 {
                bail!("--speed {speed}: write a number, 0 or more (1 = real time, 0 = no pauses)");
            }
            let detail: SessionDetail = get(&api, &format!("/api/v1/sessions/{}", encode(&id)))?;
            replay(&detail, speed, &mut io::stdout().lock())?;
        }
        SessionsCmd::Export {
            api,
            since,
            until,
            out,
        } => {
            let mut q = Vec::new();
            q.extend(time_arg("--since", since)?.map(|v| ("since", v)));
            q.extend(time_arg("--until", until)?.map(|v| ("until", v)));
            let path = format!("/api/v1/export{}", query(&q));
            let client = client(&api)?;
            match out {
                Some(file) => {
                    let f = open_private(&file)?;
                    let mut w = LineCounter::new(io::BufWriter::new(f));
                    client.get_to(&path, &mut w).map_err(|e| explain(e, &api))?;
                    w.flush()?;
                    eprintln!("wrote {} events to {}", w.lines, file.display());
                }
                None => {
                    let stdout = io::stdout();
                    let mut w = io::BufWriter::new(stdout.lock());
                    client.get_to(&path, &mut w).map_err(|e| explain(e, &api))?;
                    w.flush()?;
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn client(api: &ApiArgs) -> anyhow::Result<ApiClient> {
    ApiClient::new(&ClientOptions {
        gateway: api.gateway.clone(),
        ca: api.ca.clone(),
        cert: api.cert.clone(),
        key: api.key.clone(),
        token: api.token.clone(),
    })
    .map_err(|e| explain(e, api))
}

fn get<T: tollgate_api::client::DeserializeOwned>(api: &ApiArgs, path: &str) -> anyhow::Result<T> {
    client(api)?.get_json(path).map_err(|e| explain(e, api))
}

/// Turn an API error into what the person at the terminal should do next.
pub(crate) fn explain(e: ClientError, api: &ApiArgs) -> anyhow::Error {
    let ClientError::Status { status, body } = &e else {
        return anyhow::anyhow!(e);
    };
    let advice = match status {
        401 if api.cert.is_none() && api.token.is_none() => "no credentials were given: pass --cert FILE --key FILE (a client certificate from the gateway's CA) or --token TOKEN (or set TOLLGATE_CERT/TOLLGATE_KEY or TOLLGATE_TOKEN)".to_string(),
        401 => body.hint.clone().unwrap_or_else(|| "check --cert/--key or --token".into()),
        _ => body.hint.clone().unwrap_or_default(),
    };
    let what = match status {
        401 => "not authenticated",
        403 => "not allowed",
        404 => "not found",
        400 => "bad request",
        _ => "the gateway refused the request",
    };
    if advice.is_empty() {
        anyhow::anyhow!("{what} ({status}): {}", body.error)
    } else {
        anyhow::anyhow!("{what} ({status}): {}\nhint: {advice}", body.error)
    }
}

/// `--since`/`--until` as Unix milliseconds: RFC 3339, milliseconds, or a duration ago.
fn time_arg(flag: &str, value: Option<String>) -> anyhow::Result<Option<String>> {
    let Some(v) = value else { return Ok(None) };
    if let Ok(ago) = tollgate_tls::pki::parse_ttl(&v) {
        let at = SystemTime::now() - ago;
        let ms = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        return Ok(Some(ms.to_string()));
    }
    parse_time(flag, &v)
        .map(|ms| Some(ms.to_string()))
        .map_err(|_| anyhow::anyhow!("{flag} {v:?}: write RFC 3339 (2026-11-25T10:00:00Z), Unix milliseconds, or a duration ago (30m, 12h, 7d)"))
}

fn query(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    format!("?{}", parts.join("&"))
}

fn open_private(path: &PathBuf) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Counts the lines (events) written through it.
struct LineCounter<W> {
    inner: W,
    lines: u64,
}

impl<W> LineCounter<W> {
    fn new(inner: W) -> Self {
        LineCounter { inner, lines: 0 }
    }
}

impl<W: Write> Write for LineCounter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

/// `2026-11-25 10:00:00Z` from the API's millisecond RFC 3339.
fn short_time(ms: i64) -> String {
    let t = format_time(ms);
    format!("{} {}Z", &t[..10], &t[11..19])
}

fn duration(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn sessions_table(sessions: &[Session]) -> String {
    if sessions.is_empty() {
        return "no sessions match\n".into();
    }
    let header = [
        "ID", "STARTED", "DURATION", "SUBJECT", "RESOURCE", "OUTCOME", "COMMANDS",
    ];
    let rows: Vec<[String; 7]> = sessions
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                short_time(s.started_at_unix_ms),
                s.duration_ms.map_or_else(|| "open".into(), duration),
                opt(&s.subject).to_string(),
                opt(&s.resource).to_string(),
                s.outcome.clone().unwrap_or_else(|| "open".into()),
                s.commands.map_or_else(|| "-".into(), |c| c.to_string()),
            ]
        })
        .collect();
    aligned(&header, &rows)
}

/// Rows under a header, in columns two spaces apart (the last column is not padded).
pub(crate) fn aligned<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows
        .iter()
        .map(|r| r.clone().map(|c| terminal_safe(&c, true)))
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

fn show_text(d: &SessionDetail) -> String {
    let s = &d.session;
    let groups = s
        .open
        .get("groups")
        .and_then(Value::as_array)
        .map(|g| {
            g.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|g| !g.is_empty());
    let mut who = opt(&s.subject).to_string();
    if let Some(m) = &s.auth_method {
        who.push_str(&format!(" ({m}"));
        if let Some(g) = &groups {
            who.push_str(&format!("; groups {g}"));
        }
        who.push(')');
    }
    let mut out = String::new();
    let mut field =
        |k: &str, v: String| out.push_str(&format!("{k:<10} {}\n", terminal_safe(&v, true)));
    field("session", s.id.clone());
    field("subject", who);
    field("resource", opt(&s.resource).to_string());
    field("client", opt(&s.client_addr).to_string());
    field("started", s.started_at.clone());
    match (&s.ended_at, s.duration_ms) {
        (Some(end), Some(ms)) => field("ended", format!("{end} ({})", duration(ms))),
        _ => field("ended", "- (still open)".into()),
    }
    field(
        "outcome",
        s.outcome.clone().unwrap_or_else(|| "open".into()),
    );
    field(
        "commands",
        s.commands.map_or_else(|| "-".into(), |c| c.to_string()),
    );
    field("events", s.event_count.to_string());
    out.push_str("\ntimeline\n");
    let t0 = d
        .events
        .first()
        .map_or(s.started_at_unix_ms, |e| e.at_unix_ms);
    for e in &d.events {
        let (label, text) = describe(e);
        out.push_str(&format!(
            "  {}  {label:<14} {}\n",
            offset(e.at_unix_ms - t0),
            terminal_safe(&text, true)
        ));
        for l in capture_lines(&e.payload) {
            out.push_str(&format!("{:28}{l}\n", ""));
        }
    }
    out
}

/// Text from the wire (a statement, a tool definition, a reason) as a terminal shows it
/// safely: control characters other than newline and tab are escaped, so a statement cannot
/// move the cursor, clear a line or recolour what the reviewer reads; `one_line` escapes
/// newlines too.
pub(crate) fn terminal_safe(s: &str, one_line: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let keep = !one_line && (c == '\n' || c == '\t');
        // Bidi overrides and isolates reorder what is displayed (Trojan Source).
        let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && !keep) || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest cell shown in a captured-rows table, in characters.
const MAX_CELL: usize = 60;

/// A captured value as one safe line: control characters (newlines, terminal escapes) are
/// shown escaped, long values clipped; SQL NULL is `NULL`.
fn cell(v: &Value) -> String {
    let raw = match v {
        Value::Null => return "NULL".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    for (i, c) in raw.chars().enumerate() {
        if i == MAX_CELL {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The rows a result event captured (`payload.capture`: `columns`, `rows`, `truncated`) as an
/// aligned table, one string per line; empty when nothing was captured.
fn capture_lines(p: &Value) -> Vec<String> {
    let Some(cap) = p.get("capture").filter(|c| c.is_object()) else {
        return Vec::new();
    };
    let columns: Vec<String> = cap
        .get("columns")
        .and_then(Value::as_array)
        .map(|c| c.iter().map(cell).collect())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = cap
        .get("rows")
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .map(|r| r.iter().map(cell).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let truncated = cap.get("truncated").and_then(Value::as_bool) == Some(true);
    let ncols = rows
        .iter()
        .map(Vec::len)
        .chain([columns.len()])
        .max()
        .unwrap_or(0);
    let mut lines = Vec::new();
    if ncols > 0 {
        let mut widths = vec![0usize; ncols];
        for r in std::iter::once(&columns).chain(&rows) {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |r: &[String]| -> String {
            let cells: Vec<String> = (0..ncols)
                .map(|i| format!("{:<w$}", r.get(i).map_or("", String::as_str), w = widths[i]))
                .collect();
            cells.join(" | ").trim_end().to_string()
        };
        lines.push(line(&columns));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        lines.push(rule.join("-+-"));
        lines.extend(rows.iter().map(|r| line(r)));
    }
    if truncated {
        lines.push("(truncated)".into());
    }
    lines
}

fn offset(ms: i64) -> String {
    format!("+{}.{:03}s", ms / 1000, ms % 1000)
}

fn num(p: &Value, k: &str) -> Option<i64> {
    p.get(k).and_then(Value::as_i64)
}

fn text<'a>(p: &'a Value, k: &str) -> Option<&'a str> {
    p.get(k).and_then(Value::as_str)
}

/// A result event as a person reads it: `1 row (SELECT), 0.31 ms` or `ERROR 42P01, 0.20 ms`.
fn result_summary(p: &Value) -> String {
    let dur = num(p, "duration_us").map(|us| format!("{:.2} ms", us as f64 / 1000.0));
    let main = match text(p, "outcome") {
        Some("ok") | None => {
            let rows = num(p, "rows").unwrap_or(0);
            let s = if rows == 1 { "" } else { "s" };
            match text(p, "tag") {
                Some(tag) => format!("{rows} row{s} ({tag})"),
                None => format!("{rows} row{s}"),
            }
        }
        Some("error") => format!("ERROR {}", text(p, "sqlstate").unwrap_or("?")),
        Some(other) => other.to_string(),
    };
    match dur {
        Some(d) => format!("{main}, {d}"),
        None => main,
    }
}

/// `GET /v1/invoices?x=1 (allow)`, with the rule when one decided.
fn http_request_line(p: &Value) -> String {
    let mut t = format!(
        "{} {}",
        text(p, "method").unwrap_or("?"),
        text(p, "path").unwrap_or("?")
    );
    if let Some(q) = text(p, "query") {
        t.push('?');
        t.push_str(q);
    }
    let d = &p["decision"];
    match (text(d, "action"), text(d, "rule")) {
        (Some(a), Some(r)) => t.push_str(&format!(" ({a}: rule \"{r}\")")),
        (Some(a), None) => t.push_str(&format!(" ({a})")),
        _ => {}
    }
    if let Some(bytes) = num(&p["body"], "bytes").filter(|b| *b > 0) {
        t.push_str(&format!(", body {bytes} bytes"));
    }
    t
}

/// `200, 1234 bytes, 3 values masked, 1.20 ms` or `403 refused: ...`.
fn http_response_line(p: &Value) -> String {
    let mut t = num(p, "status").map_or("?".into(), |s| s.to_string());
    match text(p, "outcome") {
        Some("ok") | None => {}
        Some(o) => t.push_str(&format!(" {o}")),
    }
    if let Some(e) = text(p, "error") {
        t.push_str(&format!(": {e}"));
    }
    if let Some(bytes) = num(&p["body"], "bytes") {
        t.push_str(&format!(", {bytes} bytes"));
    }
    if let Some(v) = num(&p["masked"], "values") {
        t.push_str(&format!(", {v} values masked"));
    }
    if let Some(us) = num(p, "duration_us") {
        t.push_str(&format!(", {:.2} ms", us as f64 / 1000.0));
    }
    t
}

/// `tools/call delete_ticket {"project":"p"} (deny: rule "no-deletes")`.
fn mcp_request_line(p: &Value) -> String {
    let mut t = text(p, "method").unwrap_or("?").to_string();
    if let Some(name) = text(p, "name") {
        t.push(' ');
        t.push_str(name);
    }
    if let Some(args) = text(p, "arguments") {
        t.push(' ');
        t.push_str(args);
    }
    let d = &p["decision"];
    match (text(d, "action"), text(d, "rule")) {
        (Some("allow"), None) => {}
        (Some(a), Some(r)) => t.push_str(&format!(" ({a}: rule \"{r}\")")),
        (Some(a), None) => t.push_str(&format!(" ({a})")),
        _ => {}
    }
    t
}

/// `tools/call lookup_customer: result, 3 values masked, 1.20 ms` (the capture follows).
fn mcp_response_line(p: &Value) -> String {
    let mut t = text(p, "method").unwrap_or("(answer)").to_string();
    if let Some(name) = text(p, "name") {
        t.push(' ');
        t.push_str(name);
    }
    t.push_str(&format!(": {}", text(p, "outcome").unwrap_or("?")));
    if p["is_error"].as_bool() == Some(true) && text(p, "outcome") == Some("result") {
        t.push_str(" (isError)");
    }
    if let Some(hidden) = p["hidden"].as_array().filter(|h| !h.is_empty()) {
        let names: Vec<&str> = hidden.iter().filter_map(Value::as_str).collect();
        t.push_str(&format!(", hidden: {}", names.join(", ")));
    }
    if let Some(v) = num(&p["masked"], "values") {
        t.push_str(&format!(", {v} values masked"));
    }
    if let Some(us) = num(p, "duration_us") {
        t.push_str(&format!(", {:.2} ms", us as f64 / 1000.0));
    }
    t
}

fn mcp_other_line(kind: &str, p: &Value) -> String {
    match kind {
        "mcp.message" => format!("server sent {}", text(p, "method").unwrap_or("a message")),
        "mcp.session_refused" => format!(
            "Mcp-Session-Id refused ({})",
            text(p, "reason").unwrap_or("?")
        ),
        "mcp.pinned" => format!("tool {} pinned", text(p, "tool").unwrap_or("?")),
        _ => format!(
            "tool {} changed since it was pinned ({})",
            text(p, "tool").unwrap_or("?"),
            text(p, "mode").unwrap_or("?")
        ),
    }
}

fn command_text(p: &Value) -> String {
    let mut t = match text(p, "protocol") {
        Some("function_call") => "(function call)".to_string(),
        _ => text(p, "text").unwrap_or("").to_string(),
    };
    if let Some(params) = p
        .get("params")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
    {
        t.push_str(&format!("  -- params {}", Value::Array(params.clone())));
    }
    t
}

fn describe(e: &Event) -> (String, String) {
    let p = &e.payload;
    let n = num(p, "n").map(|n| format!(" #{n}")).unwrap_or_default();
    match e.kind.as_str() {
        "session.open" => (
            e.kind.clone(),
            format!(
                "{} from {} via {}",
                text(p, "subject").unwrap_or("(unidentified)"),
                text(p, "client_addr").unwrap_or("?"),
                text(p, "listener").unwrap_or("?")
            ),
        ),
        "session.close" => {
            let mut t = text(p, "outcome").unwrap_or("?").to_string();
            if let Some(r) = text(p, "reason") {
                t.push_str(&format!(" ({r})"));
            }
            if let Some(ms) = num(p, "duration_ms") {
                t.push_str(&format!(" after {}", duration(ms)));
            }
            (e.kind.clone(), t)
        }
        "command" => (format!("command{n}"), command_text(p)),
        "result" => (format!("result{n}"), result_summary(p)),
        "http.request" => (format!("request{n}"), http_request_line(p)),
        "http.response" => (format!("response{n}"), http_response_line(p)),
        "mcp.request" => (format!("mcp{n}"), mcp_request_line(p)),
        "mcp.response" => (format!("mcp answer{n}"), mcp_response_line(p)),
        k @ ("mcp.message" | "mcp.session_refused" | "mcp.pinned" | "mcp.pin_changed") => {
            (e.kind.clone(), mcp_other_line(k, p))
        }
        _ => (e.kind.clone(), p.to_string()),
    }
}

/// Lines and characters per line of an HTTP body shown by `replay`.
const REPLAY_BODY_LINES: usize = 20;
const REPLAY_BODY_WIDTH: usize = 200;

/// Print the session event by event, sleeping the recorded gaps divided by `speed`.
fn replay(d: &SessionDetail, speed: f64, out: &mut impl Write) -> anyhow::Result<()> {
    let s = &d.session;
    writeln!(
        out,
        "replaying session {}: {} -> {}, started {}{}",
        s.id,
        opt(&s.subject),
        opt(&s.resource),
        s.started_at,
        if speed == 0.0 {
            ", no pauses".to_string()
        } else {
            format!(", speed {speed}x")
        }
    )?;
    // Pacing from the monotonic `t_us` when every event carries it, else the wall clock.
    let mono = d.events.iter().all(|e| e.payload["t_us"].is_u64());
    let at_us = |e: &tollgate_api::view::Event| match e.payload["t_us"].as_i64() {
        Some(t) if mono => t,
        _ => e.at_unix_ms.saturating_mul(1000),
    };
    let t0 = d.events.first().map_or(0, |e| e.at_unix_ms);
    let mut prev = d.events.first().map_or(0, at_us);
    for e in &d.events {
        if speed > 0.0 {
            let gap = Duration::from_micros((at_us(e) - prev).max(0) as u64).div_f64(speed);
            out.flush()?;
            std::thread::sleep(gap.min(MAX_REPLAY_GAP));
        }
        prev = at_us(e);
        let p = &e.payload;
        let line = match e.kind.as_str() {
            "session.open" => format!(
                "connected: {} ({}) from {}",
                text(p, "subject").unwrap_or("(unidentified)"),
                text(p, "auth_method").unwrap_or("-"),
                text(p, "client_addr").unwrap_or("?")
            ),
            "session.close" => format!("disconnected: {}", describe(e).1),
            "command" => format!("SQL> {}", command_text(p)),
            "result" => format!("  -> {}", result_summary(p)),
            "http.request" => format!("HTTP> {}", http_request_line(p)),
            "http.response" => format!("  -> {}", http_response_line(p)),
            "mcp.request" => format!("MCP> {}", mcp_request_line(p)),
            "mcp.response" => format!("  <= {}", mcp_response_line(p)),
            k @ ("mcp.message" | "mcp.session_refused" | "mcp.pinned" | "mcp.pin_changed") => {
                format!("  MCP {}", mcp_other_line(k, p))
            }
            _ => format!("{} {}", e.kind, p),
        };
        writeln!(
            out,
            "[{}] {}",
            offset(e.at_unix_ms - t0),
            terminal_safe(&line, true)
        )?;
        for l in capture_lines(p) {
            writeln!(out, "{:16}{l}", "")?;
        }
        // HTTP bodies and MCP answers as captured (masked), a few lines of each.
        let cap = p["body"]["capture"].as_str().or(match e.kind.as_str() {
            "mcp.response" | "mcp.message" => p["capture"].as_str(),
            _ => None,
        });
        if let Some(cap) = cap {
            for l in cap.lines().take(REPLAY_BODY_LINES) {
                let clipped: String = l.chars().take(REPLAY_BODY_WIDTH).collect();
                writeln!(out, "{:16}{}", "", terminal_safe(&clipped, true))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn http_exchanges_read_as_one_line_each() {
        assert_eq!(
            http_request_line(
                &json!({"method": "POST", "path": "/v1/invoices/4/refund", "query": "x=1",
                "decision": {"action": "review", "rule": "refunds"}, "body": {"bytes": 12}})
            ),
            "POST /v1/invoices/4/refund?x=1 (review: rule \"refunds\"), body 12 bytes"
        );
        assert_eq!(
            http_response_line(
                &json!({"status": 200, "outcome": "ok", "body": {"bytes": 800},
                "masked": {"values": 3}, "duration_us": 1200})
            ),
            "200, 800 bytes, 3 values masked, 1.20 ms"
        );
        assert_eq!(
            http_response_line(&json!({"status": 403, "outcome": "refused", "error": "denied"})),
            "403 refused: denied"
        );
    }

    #[test]
    fn mcp_exchanges_read_as_one_line_each() {
        assert_eq!(
            mcp_request_line(&json!({"method": "tools/call", "name": "delete_ticket",
                "arguments": "{\"project\":\"p\"}", "decision": {"action": "deny", "rule": "no-deletes"}})),
            "tools/call delete_ticket {\"project\":\"p\"} (deny: rule \"no-deletes\")"
        );
        assert_eq!(
            mcp_request_line(
                &json!({"method": "tools/list", "decision": {"action": "allow", "rule": null}})
            ),
            "tools/list"
        );
        assert_eq!(
            mcp_response_line(&json!({"method": "tools/list", "outcome": "result",
                "hidden": ["delete_ticket"], "duration_us": 2000})),
            "tools/list: result, hidden: delete_ticket, 2.00 ms"
        );
        assert_eq!(
            mcp_response_line(
                &json!({"method": "tools/call", "name": "lookup", "outcome": "result",
                "is_error": false, "masked": {"values": 3}})
            ),
            "tools/call lookup: result, 3 values masked"
        );
    }

    #[test]
    fn result_summaries() {
        assert_eq!(
            result_summary(
                &json!({"outcome": "ok", "rows": 1, "tag": "SELECT", "duration_us": 310})
            ),
            "1 row (SELECT), 0.31 ms"
        );
        assert_eq!(
            result_summary(
                &json!({"outcome": "error", "sqlstate": "42P01", "rows": 0, "duration_us": 2000})
            ),
            "ERROR 42P01, 2.00 ms"
        );
        assert_eq!(
            result_summary(&json!({"outcome": "interrupted"})),
            "interrupted"
        );
    }

    fn event(seq: i64, at_unix_ms: i64, kind: &str, payload: Value) -> Event {
        Event {
            id: seq,
            session_id: "s1".into(),
            seq,
            chain_id: "gw-1".into(),
            chain_seq: seq,
            at: format_time(at_unix_ms),
            at_unix_ms,
            kind: kind.into(),
            payload,
            hash: String::new(),
            prev_hash: String::new(),
        }
    }

    /// A session with a captured result, a truncated one and one without capture.
    fn captured_session() -> SessionDetail {
        let session = Session {
            id: "s1".into(),
            started_at: format_time(1_000),
            started_at_unix_ms: 1_000,
            ended_at: Some(format_time(1_400)),
            ended_at_unix_ms: Some(1_400),
            duration_ms: Some(400),
            listener: Some("postgres".into()),
            client_addr: Some("127.0.0.1:5000".into()),
            resource: Some("app".into()),
            subject: Some("alice".into()),
            auth_method: Some("cert".into()),
            outcome: Some("closed".into()),
            commands: Some(3),
            event_count: 8,
            open: json!({}),
            close: None,
        };
        let events = vec![
            event(
                1,
                1_000,
                "session.open",
                json!({"subject": "alice", "auth_method": "cert", "client_addr": "127.0.0.1:5000"}),
            ),
            event(
                2,
                1_100,
                "command",
                json!({"n": 1, "protocol": "simple", "text": "select id, email from users"}),
            ),
            event(
                3,
                1_101,
                "result",
                json!({"n": 1, "outcome": "ok", "rows": 2, "tag": "SELECT 2", "duration_us": 310,
                "capture": {"columns": ["id", "email"], "rows": [["1", "a***@example.com"], [null, "x\u{1b}[2Jy"]], "truncated": false}}),
            ),
            event(
                4,
                1_200,
                "command",
                json!({"n": 2, "protocol": "simple", "text": "select payload from big"}),
            ),
            event(
                5,
                1_201,
                "result",
                json!({"n": 2, "outcome": "ok", "rows": 500, "tag": "SELECT 500", "duration_us": 2000,
                "capture": {"columns": ["payload"], "rows": [["<binary 16 bytes>"]], "truncated": true}}),
            ),
            event(
                6,
                1_300,
                "command",
                json!({"n": 3, "protocol": "simple", "text": "update t set x = 1\u{1b}[2K\r-- hidden"}),
            ),
            event(
                7,
                1_301,
                "result",
                json!({"n": 3, "outcome": "ok", "rows": 1, "tag": "UPDATE 1", "duration_us": 90}),
            ),
            event(
                8,
                1_400,
                "session.close",
                json!({"outcome": "closed", "duration_ms": 400}),
            ),
        ];
        SessionDetail { session, events }
    }

    #[test]
    fn replay_renders_captured_rows_under_their_statement() {
        let mut out = Vec::new();
        replay(&captured_session(), 0.0, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let body: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            body,
            [
                "[+0.000s] connected: alice (cert) from 127.0.0.1:5000",
                "[+0.100s] SQL> select id, email from users",
                "[+0.101s]   -> 2 rows (SELECT 2), 0.31 ms",
                "                id   | email",
                "                -----+-----------------",
                "                1    | a***@example.com",
                "                NULL | x\\u{1b}[2Jy",
                "[+0.200s] SQL> select payload from big",
                "[+0.201s]   -> 500 rows (SELECT 500), 2.00 ms",
                "                payload",
                "                -----------------",
                "                <binary 16 bytes>",
                "                (truncated)",
                "[+0.300s] SQL> update t set x = 1\\u{1b}[2K\\r-- hidden",
                "[+0.301s]   -> 1 row (UPDATE 1), 0.09 ms",
                "[+0.400s] disconnected: closed after 400ms",
            ],
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "terminal escapes are not replayed raw"
        );
    }

    #[test]
    fn replay_paces_captured_rows_with_their_result() {
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        replay(&captured_session(), 4.0, &mut out).unwrap();
        // 400 ms of recording at 4x: about 100 ms.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(95), "{took:?}");
        assert!(String::from_utf8(out).unwrap().contains("(truncated)"));
    }

    #[test]
    fn show_renders_captured_rows_in_the_timeline() {
        let text = show_text(&captured_session());
        let at = text.find("result #1").unwrap();
        let after: Vec<&str> = text[at..].lines().take(5).collect();
        assert!(after[1].trim_start().starts_with("id   | email"), "{text}");
        assert!(
            after[3].trim_start().starts_with("1    | a***@example.com"),
            "{text}"
        );
        assert!(text.contains("(truncated)"), "{text}");
        let col = |l: &str| l.find('|').unwrap();
        assert_eq!(col(after[1]), col(after[3]), "{text}");
    }

    #[test]
    fn table_is_aligned() {
        let s = |id: &str, subject: &str| Session {
            id: id.into(),
            started_at: format_time(0),
            started_at_unix_ms: 0,
            ended_at: Some(format_time(1500)),
            ended_at_unix_ms: Some(1500),
            duration_ms: Some(1500),
            listener: Some("postgres".into()),
            client_addr: None,
            resource: Some("app".into()),
            subject: Some(subject.into()),
            auth_method: Some("cert".into()),
            outcome: Some("closed".into()),
            commands: Some(2),
            event_count: 6,
            open: json!({}),
            close: None,
        };
        let t = sessions_table(&[s("a", "alice"), s("bb", "spiffe://x/y")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("RESOURCE").or_else(|| l.find("app")).unwrap();
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
        assert!(
            lines[1].starts_with("a   1970-01-01 00:00:00Z  1.5s"),
            "{t}"
        );
    }
}
