//! The relay between an authenticated client and its upstream backend.
//!
//! Each direction reads what the socket has, walks the complete messages in it (headers only,
//! except the few it records), and forwards them in one write per read: batching per round trip
//! is what keeps the gateway close to a direct connection. Every client command is seen
//! *before* its bytes are forwarded — that is where a policy decision will sit — and every
//! response message passes through one place — where a masking filter will sit.

use crate::proto::backend::{self, Severity};
use crate::proto::frontend::{self, ParamValue};
use crate::proto::next_frame;
use crate::session::SessionLog;
use crate::upstream::{Connected, UpstreamTarget};
use crate::PgGateway;
use bytes::BytesMut;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_metrics::registry;
use tollgate_store::EventInput;

const READ_BUF: usize = 64 * 1024;
/// Longest statement text or parameter value kept in an audit event.
const MAX_TEXT: usize = 16 * 1024;
const MAX_PARAM: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The client sent Terminate.
    Closed,
    /// The client's connection ended without Terminate.
    ClientGone,
    /// The upstream connection ended or failed.
    UpstreamLost,
    /// A malformed or oversized message.
    ProtocolError,
    /// A command's audit event could not be written, so the command was refused.
    AuditUnavailable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientGone => "client_disconnected",
            Outcome::UpstreamLost => "upstream_lost",
            Outcome::ProtocolError => "protocol_error",
            Outcome::AuditUnavailable => "audit_unavailable",
        }
    }
}

pub(crate) struct RelayEnd {
    pub outcome: Outcome,
    /// A command was in flight when the session ended.
    pub pending: bool,
    pub error: Option<String>,
    pub commands: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub upstream_pid: i32,
    pub upstream_secret: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A simple Query or FunctionCall: complete at ReadyForQuery.
    Query,
    /// An extended-protocol Execute: complete at CommandComplete/EmptyQuery/PortalSuspended/Error.
    Execute,
    /// A Sync: the end of an extended-protocol pipeline.
    Sync,
}

struct Pending {
    n: u64,
    kind: Kind,
    started: Instant,
    rows: u64,
    tag: Option<String>,
    error: Option<String>,
}

/// Commands forwarded and not yet answered, in order; shared by the two directions.
struct Tracker<'a> {
    pending: Mutex<VecDeque<Pending>>,
    next: AtomicU64,
    log: &'a SessionLog,
}

impl Tracker<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, kind: Kind) -> u64 {
        let n = if kind == Kind::Sync {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) + 1
        };
        self.lock().push_back(Pending {
            n,
            kind,
            started: Instant::now(),
            rows: 0,
            tag: None,
            error: None,
        });
        n
    }

    fn emit(&self, p: &Pending, outcome: &str) {
        self.log.event(
            "result",
            json!({
                "n": p.n,
                "outcome": outcome,
                "sqlstate": p.error,
                "rows": p.rows,
                "tag": p.tag,
                "duration_us": p.started.elapsed().as_micros() as u64,
            }),
        );
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    fn complete(&self, rows: u64, tag: String) {
        let mut q = self.lock();
        let Some(i) = q.iter().position(|p| p.kind != Kind::Sync) else {
            return;
        };
        match q[i].kind {
            Kind::Execute => {
                let mut p = q.remove(i).expect("index is in range");
                drop(q);
                p.rows = rows;
                p.tag = Some(tag);
                self.emit(&p, "ok");
            }
            _ => {
                let p = &mut q[i];
                p.rows += rows;
                p.tag = Some(tag);
            }
        }
    }

    /// ErrorResponse: fails the current command; PostgreSQL skips the rest of the pipeline up to Sync.
    fn error(&self, code: String) {
        let mut q = self.lock();
        let Some(i) = q.iter().position(|p| p.kind != Kind::Sync) else {
            return;
        };
        if q[i].kind == Kind::Query {
            q[i].error = Some(code);
            return;
        }
        let mut failed = q.remove(i).expect("index is in range");
        failed.error = Some(code);
        let mut skipped = Vec::new();
        while q.get(i).is_some_and(|p| p.kind == Kind::Execute) {
            skipped.extend(q.remove(i));
        }
        drop(q);
        self.emit(&failed, "error");
        for p in &skipped {
            self.emit(p, "skipped");
        }
    }

    /// ReadyForQuery: everything up to the first Sync or Query is finished.
    fn ready(&self) {
        let mut done = Vec::new();
        {
            let mut q = self.lock();
            while let Some(p) = q.pop_front() {
                let boundary = p.kind != Kind::Execute;
                done.push(p);
                if boundary {
                    break;
                }
            }
        }
        for p in done.iter().filter(|p| p.kind != Kind::Sync) {
            let outcome = match (p.kind, &p.error) {
                (Kind::Execute, _) => "skipped",
                (_, Some(_)) => "error",
                _ => "ok",
            };
            self.emit(p, outcome);
        }
    }

    /// Drop command `n` (never forwarded) and the Syncs after it.
    fn forget(&self, n: u64) {
        let mut q = self.lock();
        if let Some(i) = q.iter().position(|p| p.n == n && p.kind != Kind::Sync) {
            q.truncate(i);
        }
    }

    /// At the end of a session: every command still waiting for its answer is recorded as
    /// interrupted; returns whether there was one.
    fn interrupt_pending(&self) -> bool {
        let left: Vec<Pending> = self
            .lock()
            .drain(..)
            .filter(|p| p.kind != Kind::Sync)
            .collect();
        for p in &left {
            self.emit(p, "interrupted");
        }
        !left.is_empty()
    }
}

enum Stop {
    Outcome(Outcome),
    Protocol(String),
}

pub(crate) async fn run(
    gw: &PgGateway,
    log: &SessionLog,
    target: &UpstreamTarget,
    client: tokio_rustls::server::TlsStream<TcpStream>,
    up: Connected,
) -> RelayEnd {
    let Connected {
        stream,
        pid: upstream_pid,
        secret: upstream_secret,
        leftover,
        ..
    } = up;
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (mut urd, mut uwr) = tokio::io::split(stream);
    let tracker = Tracker {
        pending: Mutex::new(VecDeque::new()),
        next: AtomicU64::new(0),
        log,
    };
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let commands = registry().counter(
        "tollgate_commands_total",
        "Client commands forwarded, by resource.",
        &[("resource", &target.resource.name)],
    );
    let limit = gw.max_message;

    let stop = tokio::select! {
        s = client_to_upstream(gw, &mut crd, &mut uwr, &tracker, &from_client, &commands) => s,
        s = upstream_to_client(&mut urd, &mut cwr, &tracker, &to_client, leftover, limit) => s,
    };
    let (outcome, error) = match stop {
        Stop::Outcome(o) => (o, None),
        Stop::Protocol(e) => (Outcome::ProtocolError, Some(e)),
    };
    let pending = tracker.interrupt_pending();
    match outcome {
        Outcome::UpstreamLost => {
            tracing::warn!(session = %log.id, resource = %target.resource.name, "upstream connection lost");
            let msg = format!(
                "tollgate lost the connection to resource \"{}\"",
                target.resource.name
            );
            let _ = cwr
                .write_all(&backend::error(Severity::Fatal, "08006", &msg, None))
                .await;
            let _ = cwr.flush().await;
        }
        Outcome::ProtocolError => {
            let msg = format!(
                "protocol error: {}",
                error.as_deref().unwrap_or("invalid message")
            );
            tracing::info!(session = %log.id, error = %msg, "closing session");
            let _ = cwr
                .write_all(&backend::error(Severity::Fatal, "08P01", &msg, None))
                .await;
            let _ = cwr.flush().await;
            let _ = uwr.write_all(&frontend::terminate()).await;
            let _ = uwr.flush().await;
        }
        Outcome::AuditUnavailable => {
            tracing::error!(session = %log.id, "refusing a command: its audit event could not be written in time (audit_failure = closed)");
            let msg = "tollgate could not record this command in the audit trail, so it was not forwarded";
            let hint = "the gateway's audit store is unavailable; try again later or contact the gateway's operator";
            let _ = cwr
                .write_all(&backend::error(Severity::Fatal, "58030", msg, Some(hint)))
                .await;
            let _ = cwr.flush().await;
            let _ = uwr.write_all(&frontend::terminate()).await;
            let _ = uwr.flush().await;
        }
        Outcome::ClientGone => {
            let _ = uwr.write_all(&frontend::terminate()).await;
            let _ = uwr.flush().await;
        }
        Outcome::Closed => {}
    }
    let _ = cwr.shutdown().await;
    let _ = uwr.shutdown().await;
    RelayEnd {
        outcome,
        pending,
        error,
        commands: tracker.next.load(Ordering::Relaxed),
        bytes_from_client: from_client.load(Ordering::Relaxed),
        bytes_to_client: to_client.load(Ordering::Relaxed),
        upstream_pid,
        upstream_secret,
    }
}

/// Statement and portal texts, so an Execute can be recorded with the SQL it runs.
#[derive(Default)]
struct Prepared {
    statements: HashMap<String, Arc<str>>,
    portals: HashMap<String, (Arc<str>, Value)>,
}

async fn client_to_upstream<R, W>(
    gw: &PgGateway,
    rd: &mut R,
    wr: &mut W,
    tracker: &Tracker<'_>,
    bytes: &AtomicU64,
    commands: &tollgate_metrics::Cell,
) -> Stop
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limit = gw.max_message;
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut prepared = Prepared::default();
    let mut events: Vec<EventInput> = Vec::new();
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Stop::Outcome(Outcome::ClientGone),
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let mut pos = 0;
        // Set when the batch ends the session; the valid messages before it are still forwarded.
        let mut stop = None;
        loop {
            let f = match next_frame(&buf[pos..], limit) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    stop = Some(Stop::Protocol(e.to_string()));
                    break;
                }
            };
            let body = f.body(&buf[pos..]);
            match inspect_client(f.tag, body, &mut prepared, tracker, &mut events) {
                Ok(true) => commands.inc(),
                Ok(false) => {}
                Err(e) => {
                    stop = Some(Stop::Protocol(e));
                    break;
                }
            }
            pos += f.total_len;
            if f.tag == b'X' {
                stop = Some(Stop::Outcome(Outcome::Closed));
                break;
            }
        }
        // The commands of this batch reach the upstream only once their events are in the audit
        // journal (one write per round trip). Fail closed refuses them when that is impossible.
        if !events.is_empty() {
            if let Err(e) = gw.recorder.append(&events) {
                if gw.audit_fail_closed {
                    tracing::error!(session = %tracker.log.id, error = %e, "audit event could not be written");
                    // Keep the evidence of what was refused, and do not await answers to it.
                    for mut ev in events.drain(..) {
                        tracker.forget(ev.payload["n"].as_u64().unwrap_or(0));
                        ev.kind = "command.refused".into();
                        ev.payload["reason"] = json!("audit_unavailable");
                        gw.recorder.record(ev);
                    }
                    return Stop::Outcome(Outcome::AuditUnavailable);
                }
                tracing::error!(session = %tracker.log.id, error = %e, "audit event could not be written; forwarding anyway (audit_failure = open)");
            }
            events.clear();
        }
        if pos > 0 {
            let chunk = buf.split_to(pos);
            if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                return Stop::Outcome(Outcome::UpstreamLost);
            }
        }
        if let Some(stop) = stop {
            return stop;
        }
        reserve_for_next(&mut buf, limit);
    }
}

/// Make room for the whole of a large message whose header is already buffered.
fn reserve_for_next(buf: &mut BytesMut, limit: usize) {
    if let Ok(None) = next_frame(buf, limit) {
        if buf.len() >= 5 {
            let total = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
            buf.reserve(total.saturating_sub(buf.len()).max(READ_BUF));
            return;
        }
    }
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_BUF);
    }
}

/// Record what a client message asks for; `Ok(true)` when it is a command, whose event is
/// added to `events` (written before the batch is forwarded).
fn inspect_client(
    tag: u8,
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    events: &mut Vec<EventInput>,
) -> Result<bool, String> {
    let malformed = |what: &str| format!("malformed {what} message");
    match tag {
        b'Q' => {
            let text = frontend::parse_query(body).map_err(|_| malformed("Query"))?;
            let n = tracker.push(Kind::Query);
            events.push(tracker.log.input(
                "command",
                json!({"n": n, "protocol": "simple", "text": clip(&text, MAX_TEXT)}),
            ));
            Ok(true)
        }
        b'P' => {
            let p = frontend::parse_parse(body).map_err(|_| malformed("Parse"))?;
            prepared
                .statements
                .insert(p.statement, Arc::from(clip(&p.query, MAX_TEXT)));
            Ok(false)
        }
        b'B' => {
            let b = frontend::parse_bind(body).map_err(|_| malformed("Bind"))?;
            let text = prepared
                .statements
                .get(&b.statement)
                .cloned()
                .unwrap_or_else(|| Arc::from(""));
            let params = redact_params(&text, &b.params);
            prepared.portals.insert(b.portal, (text, params));
            Ok(false)
        }
        b'E' => {
            let e = frontend::parse_execute(body).map_err(|_| malformed("Execute"))?;
            let n = tracker.push(Kind::Execute);
            let (text, params) = prepared
                .portals
                .get(&e.portal)
                .cloned()
                .unwrap_or_else(|| (Arc::from(""), Value::Array(vec![])));
            let mut ev = json!({"n": n, "protocol": "extended", "text": &*text, "params": params});
            if e.max_rows > 0 {
                ev["max_rows"] = json!(e.max_rows);
            }
            events.push(tracker.log.input("command", ev));
            Ok(true)
        }
        b'F' => {
            let n = tracker.push(Kind::Query);
            events.push(
                tracker
                    .log
                    .input("command", json!({"n": n, "protocol": "function_call"})),
            );
            Ok(true)
        }
        b'S' => {
            tracker.push(Kind::Sync);
            Ok(false)
        }
        b'C' => {
            let (kind, name) = frontend::parse_target(body).map_err(|_| malformed("Close"))?;
            match kind {
                b'S' => prepared.statements.remove(&name),
                _ => prepared.portals.remove(&name).map(|(t, _)| t),
            };
            Ok(false)
        }
        b'D' | b'H' | b'd' | b'c' | b'f' | b'X' => Ok(false),
        other => Err(format!(
            "unexpected message type {:?} from client",
            other as char
        )),
    }
}

async fn upstream_to_client<R, W>(
    rd: &mut R,
    wr: &mut W,
    tracker: &Tracker<'_>,
    bytes: &AtomicU64,
    leftover: Vec<u8>,
    limit: usize,
) -> Stop
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_BUF.max(leftover.len()));
    buf.extend_from_slice(&leftover);
    let mut rows_since: u64 = 0;
    let mut first = !buf.is_empty();
    loop {
        if !first {
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Stop::Outcome(Outcome::UpstreamLost),
                Ok(_) => {}
            }
        }
        first = false;
        let mut pos = 0;
        loop {
            let f = match next_frame(&buf[pos..], limit) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Stop::Protocol(format!("from upstream: {e}")),
            };
            let body = f.body(&buf[pos..]);
            match f.tag {
                b'D' => rows_since += 1,
                b'C' => {
                    let rows = backend::command_rows(body).unwrap_or(rows_since);
                    tracker.complete(rows, backend::command_word(body));
                    rows_since = 0;
                }
                b'I' => tracker.complete(0, "EMPTY".into()),
                b's' => {
                    tracker.complete(rows_since, "SUSPENDED".into());
                    rows_since = 0;
                }
                b'E' => {
                    let e = backend::parse_error(body).unwrap_or_default();
                    tracker.error(e.code);
                    rows_since = 0;
                }
                b'Z' => tracker.ready(),
                _ => {}
            }
            pos += f.total_len;
        }
        if pos > 0 {
            let chunk = buf.split_to(pos);
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                return Stop::Outcome(Outcome::ClientGone);
            }
        }
        reserve_for_next(&mut buf, limit);
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes]", &s[..end], s.len())
}

/// Parameters as recorded: values bound to a statement that handles credentials, and values that
/// look like secrets, are replaced by a marker; binary values are recorded by size only.
fn redact_params(statement: &str, params: &[ParamValue]) -> Value {
    if params.is_empty() {
        return Value::Array(vec![]);
    }
    let lower = statement.to_ascii_lowercase();
    let sensitive_statement = [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
        "private_key",
    ]
    .iter()
    .any(|w| lower.contains(w));
    Value::Array(
        params
            .iter()
            .map(|p| match p {
                ParamValue::Null => Value::Null,
                ParamValue::Binary(n) => json!(format!("<binary {n} bytes>")),
                ParamValue::Text(_) if sensitive_statement => json!("[REDACTED]"),
                ParamValue::Text(t) if looks_secret(t) => json!("[REDACTED]"),
                ParamValue::Text(t) => json!(clip(t, MAX_PARAM)),
            })
            .collect(),
    )
}

/// Tokens and keys that must not land in an audit trail even when bound to an innocent statement.
fn looks_secret(v: &str) -> bool {
    let jwt = v.starts_with("eyJ") && v.matches('.').count() == 2;
    let aws = v.len() == 20
        && (v.starts_with("AKIA") || v.starts_with("ASIA"))
        && v.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    let pem = v.contains("-----BEGIN") && v.contains("PRIVATE KEY");
    let bearer = v.starts_with("Bearer ")
        || v.starts_with("ghp_")
        || v.starts_with("xox")
        || v.starts_with("sk_live_");
    jwt || aws || pem || bearer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        let p = vec![
            ParamValue::Text("alice".into()),
            ParamValue::Text("hunter2".into()),
        ];
        assert_eq!(
            redact_params("UPDATE users SET password = $2 WHERE name = $1", &p),
            json!(["[REDACTED]", "[REDACTED]"])
        );
        assert_eq!(
            redact_params("SELECT * FROM t WHERE a = $1 AND b = $2", &p),
            json!(["alice", "hunter2"])
        );
        let s = vec![
            ParamValue::Text("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc".into()),
            ParamValue::Text("AKIAIOSFODNN7EXAMPLE".into()),
            ParamValue::Binary(8),
            ParamValue::Null,
        ];
        assert_eq!(
            redact_params("SELECT $1, $2, $3, $4", &s),
            json!(["[REDACTED]", "[REDACTED]", "<binary 8 bytes>", null])
        );
    }

    #[test]
    fn clipping_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h…[6 bytes]");
        assert_eq!(clip("abc", 5), "abc");
    }
}
