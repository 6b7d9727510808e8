//! The relay between an authenticated client and its upstream backend.
//!
//! Each direction reads what the socket has, walks the complete messages in it (headers only,
//! except the few it records), and forwards them in one write per read: batching per round trip
//! is what keeps the gateway close to a direct connection. Every client command is seen
//! *before* its bytes are forwarded — that is where a policy decision will sit — and every
//! response message passes through one place — where a masking filter will sit.

use crate::filter::ResultExtra;
use crate::filter::{copy_format_of, Filter, Verdict};
use crate::proto::backend::{self, Severity};
use crate::proto::frontend::{self, ParamValue};
use crate::proto::{next_frame, ClientMsg, ServerMsg};
use crate::refusal::{CommandRefusal, SessionEnd, UNSETTLED_PIPELINE};
use crate::rows::CopyFormat;
use crate::session::{SessionLog, Stamped};
use crate::upstream::{Connected, UpstreamTarget};
use crate::PgGateway;
use bytes::BytesMut;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_gate::event::{
    self, CommandResult, Detail, ReviewEvent, ReviewRefused, SessionTerminated, StatementRefused,
};
use tollgate_gate::hold::{HoldRequest, Opened};
use tollgate_identity::Identity;
use tollgate_mask::RowPlan;
use tollgate_metrics::registry;
use tollgate_policy::{
    Caller, Confirmation, Decision, Judgement, ResourcePolicy, SessionPolicy, CATALOG_QUERY,
};
use tollgate_review::{Review, Reviews, Verdict as ReviewVerdict};
use tollgate_store::EventInput;

mod audit;
mod client;
mod review;
mod tracker;

use audit::*;
use client::client_to_upstream;
use review::*;
use tracker::*;

const READ_BUF: usize = 64 * 1024;

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
    /// A setting the guardrails' SQL parser depends on left its pinned value upstream.
    DialectChanged,
    /// A per-session limit (prepared statements, portals) was reached.
    LimitReached,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientGone => "client_disconnected",
            Outcome::UpstreamLost => "upstream_lost",
            Outcome::ProtocolError => "protocol_error",
            Outcome::AuditUnavailable => "audit_unavailable",
            Outcome::DialectChanged => "dialect_changed",
            Outcome::LimitReached => "limit_reached",
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

enum Stop {
    Outcome(Outcome),
    Protocol(String),
    /// A setting the guardrails depend on changed upstream (its name and value).
    Dialect(String),
    /// A per-session limit.
    Limit(String),
}

/// Who is on the client side of a relay.
pub(crate) struct Client<'a> {
    pub identity: &'a Identity,
    /// Notified when the client sends a CancelRequest (withdraws a held command).
    pub held: &'a tokio::sync::Notify,
    /// An approved unmask review lifts masking for this session.
    pub unmasked: bool,
}

pub(crate) async fn run(
    gw: &PgGateway,
    log: &SessionLog,
    target: &UpstreamTarget,
    client: tokio_rustls::server::TlsStream<TcpStream>,
    up: Connected,
    caller: Client<'_>,
) -> RelayEnd {
    let Client {
        identity,
        held,
        unmasked,
    } = caller;
    let Connected {
        mut stream,
        pid: upstream_pid,
        secret: upstream_secret,
        leftover,
        params,
        ..
    } = up;
    // The dialect the guardrails' parser assumes, as the server reported it at start-up.
    let started_off_dialect = target
        .policy
        .as_ref()
        .and_then(|_| params.iter().find_map(|(k, v)| dialect_change(k, v)));
    if let Some(policy) = target.policy.as_ref() {
        if policy.needs_catalog() && leftover.is_empty() {
            learn_catalog(&mut stream, policy, gw.max_message, &target.resource.name).await;
        }
    }
    let (mut crd, cwr) = tokio::io::split(client);
    // Both directions write to the client: responses, and the notice of a held command.
    let client_out = tokio::sync::Mutex::new(cwr);
    let (mut urd, mut uwr) = tokio::io::split(stream);
    let tracker = Tracker {
        pending: Mutex::new(VecDeque::new()),
        next: AtomicU64::new(0),
        log,
        results: Mutex::new(Vec::new()),
        settled: Mutex::new(Vec::new()),
        has_settled: std::sync::atomic::AtomicBool::new(false),
        ready: ReadyCount::default(),
    };
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let commands = registry().counter(
        "tollgate_commands_total",
        "Client commands forwarded, by resource.",
        &[("resource", &target.resource.name)],
    );
    let limit = gw.max_message;
    let resource = &target.resource;
    let filter = Filter::new(
        target.mask.clone().filter(|_| !unmasked),
        target.audit_mask.clone(),
        &identity.groups,
        resource.capture_results.then_some(resource.capture_bytes),
        &resource.name,
    );
    // Guardrails follow prepared statements and portals by the server's answers, as the
    // filter follows result shapes: both need every request queued.
    let track = filter.is_some() || target.policy.is_some();
    let watch_dialect = target.policy.is_some();
    // Statement texts and parameters are recorded with the content detectors applied, so a
    // literal in a statement does not put an original value in the audit record.
    let redact = target.audit_mask.as_ref().map(|p| p.text_plan(&[]));

    let guard = target.policy.as_ref().map(|p| Guard {
        session: p.session(),
        principal: &identity.principal,
        policy: p,
        subject: &identity.subject,
        groups: &identity.groups,
        resource: &target.resource,
        reviews: gw.reviews.clone(),
        rerun_window: gw.review_rerun_window,
        held,
        client: &client_out,
    });
    let side = ClientSide {
        gw,
        tracker: &tracker,
        bytes: &from_client,
        commands: &commands,
        track,
        shapes: filter.is_some(),
        redact: redact.as_ref(),
        limits: (resource.max_prepared_statements, resource.max_portals),
        copy_columns: filter.as_ref().is_some_and(Filter::masks_columns),
        transaction_pooled: resource.pool.mode == tollgate_config::PoolMode::Transaction,
    };

    let stop = if let Some(changed) = started_off_dialect {
        Stop::Dialect(changed)
    } else {
        tokio::select! {
        s = client_to_upstream(&side, &mut crd, &mut uwr, guard) => s,
        s = upstream_to_client(&mut urd, &client_out, &tracker, &to_client, leftover, limit, filter, (track, watch_dialect)) => s,
        }
    };
    let mut cwr = client_out.into_inner();
    let (outcome, error) = match stop {
        Stop::Outcome(o) => (o, None),
        Stop::Protocol(e) => (Outcome::ProtocolError, Some(e)),
        Stop::Dialect(e) => (Outcome::DialectChanged, Some(e)),
        Stop::Limit(e) => (Outcome::LimitReached, Some(e)),
    };
    let pending = tracker.interrupt_pending();
    close_legs(
        log,
        &target.resource.name,
        outcome,
        &error,
        &mut cwr,
        &mut uwr,
    )
    .await;
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

/// Ends both legs: the client is told why the gateway ended its session (with the audit event
/// of a dialect change or limit), the upstream backend that the session is over.
async fn close_legs<C, U>(
    log: &SessionLog,
    resource: &str,
    outcome: Outcome,
    error: &Option<String>,
    cwr: &mut C,
    uwr: &mut U,
) where
    C: AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    let detail = error.as_deref();
    let end = match outcome {
        Outcome::UpstreamLost => {
            tracing::warn!(session = %log.id, %resource, "upstream connection lost");
            Some(SessionEnd::UpstreamLost { resource })
        }
        Outcome::ProtocolError => Some(SessionEnd::Protocol(detail)),
        Outcome::AuditUnavailable => {
            tracing::error!(session = %log.id, "refusing a command: its audit event could not be written in time (audit_failure = closed)");
            Some(SessionEnd::AuditUnavailable)
        }
        Outcome::DialectChanged => {
            tracing::warn!(session = %log.id, setting = %detail.unwrap_or(""), "a setting the guardrails depend on changed upstream; ending the session");
            Some(SessionEnd::DialectChanged(detail))
        }
        Outcome::LimitReached => Some(SessionEnd::LimitReached(detail)),
        Outcome::ClientGone | Outcome::Closed => None,
    };
    if let Some(end) = &end {
        if outcome == Outcome::ProtocolError {
            tracing::info!(session = %log.id, error = %end.message(), "closing session");
        }
        if matches!(outcome, Outcome::DialectChanged | Outcome::LimitReached) {
            log.record(&SessionTerminated {
                reason: outcome.as_str(),
                detail: Detail::Text(error.clone()),
                sqlstate: None,
                message: None,
            });
        }
        let _ = cwr.write_all(&end.fatal()).await;
        let _ = cwr.flush().await;
    }
    // Whatever the client did, the upstream backend is told the session is over.
    if !matches!(outcome, Outcome::UpstreamLost | Outcome::Closed) {
        let _ = uwr.write_all(&frontend::terminate()).await;
        let _ = uwr.flush().await;
    }
    let _ = cwr.shutdown().await;
    let _ = uwr.shutdown().await;
}

/// Reads the upstream's function catalog for the guardrails ([`CATALOG_QUERY`]) on a session's
/// own upstream connection, before the client's first message. Failure leaves the catalog
/// unknown, which judges every call as opaque (fail closed) and is logged.
async fn learn_catalog(
    stream: &mut crate::upstream::UpStream,
    policy: &ResourcePolicy,
    limit: usize,
    resource: &str,
) {
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        stream.write_all(&frontend::query(CATALOG_QUERY)).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let mut row: Option<(String, String)> = None;
        let mut failed = None;
        loop {
            while let Some(f) = next_frame(&buf, limit).map_err(std::io::Error::other)? {
                let body = f.body(&buf);
                match f.server() {
                    ServerMsg::DataRow => {
                        row = match backend::parse_data_row(body).ok().as_deref() {
                            Some([Some(a), Some(b)]) => Some((
                                String::from_utf8_lossy(a).into_owned(),
                                String::from_utf8_lossy(b).into_owned(),
                            )),
                            _ => None,
                        }
                    }
                    ServerMsg::ErrorResponse => {
                        failed = Some(backend::parse_error(body).unwrap_or_default().message)
                    }
                    ServerMsg::ReadyForQuery => {
                        return Ok::<_, std::io::Error>(row.ok_or_else(|| {
                            std::io::Error::other(failed.unwrap_or_else(|| "no row".into()))
                        })?)
                    }
                    _ => {}
                }
                let _ = buf.split_to(f.total_len);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
        }
    })
    .await;
    let parsed = match result {
        Ok(Ok((builtin, elsewhere))) => serde_json::from_str::<Vec<String>>(&builtin)
            .and_then(|b| Ok((b, serde_json::from_str::<Vec<String>>(&elsewhere)?)))
            .map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    };
    match parsed {
        Ok((builtin, elsewhere)) => policy.set_catalog(builtin, elsewhere),
        Err(e) => {
            tracing::warn!(resource, error = %e, "could not read the upstream's function catalog; every function call is judged as opaque code")
        }
    }
}

/// Statement and portal texts, so an Execute can be recorded with the SQL it runs, and (when
/// responses are filtered) whether the client had their result shape described.
#[derive(Default)]
struct Prepared {
    statements: HashMap<String, Statement>,
    portals: HashMap<String, PortalText>,
}

#[derive(Clone)]
struct Statement {
    /// Its text, clipped to `MAX_TEXT` (what the audit record shows).
    text: Arc<str>,
    /// SHA-256 of its full text.
    full: [u8; 32],
    described: bool,
    /// What it is, in one line (under guardrails), for its executions' audit events.
    classified: Option<Arc<str>>,
}

#[derive(Clone)]
struct PortalText {
    text: Arc<str>,
    params: Vec<Value>,
    described: bool,
    /// SHA-256 over the statement's full text and the Bind's parameters (what an approval binds to).
    digest: String,
    /// The pipeline segment it was bound in (gone once the server is idle after it).
    segment: u64,
    /// Its statement's [`Statement::classified`].
    classified: Option<Arc<str>>,
}

/// Rewrites a batch of messages: the untouched runs are copied as they are, and nothing is
/// copied at all while nothing changes (the common case forwards the read buffer itself).
#[derive(Default)]
struct Splice {
    out: Vec<u8>,
    flushed: usize,
    active: bool,
}

impl Splice {
    /// Replace `buf[start..end]` (one message) by `with` (zero or more messages).
    fn replace(&mut self, buf: &[u8], start: usize, end: usize, with: &[u8]) {
        self.out.extend_from_slice(&buf[self.flushed..start]);
        self.out.extend_from_slice(with);
        self.flushed = end;
        self.active = true;
    }

    /// The bytes to send for `buf[..end]`, or `None` when they are `buf[..end]` unchanged.
    fn finish(&mut self, buf: &[u8], end: usize) -> Option<Vec<u8>> {
        if !self.active {
            return None;
        }
        self.out.extend_from_slice(&buf[self.flushed..end]);
        self.flushed = 0;
        self.active = false;
        Some(std::mem::take(&mut self.out))
    }
}

/// What the client-to-upstream direction shares with the rest of the relay.
struct ClientSide<'a> {
    gw: &'a PgGateway,
    tracker: &'a Tracker<'a>,
    bytes: &'a AtomicU64,
    commands: &'a tollgate_metrics::Cell,
    /// Queue every request (the session filters responses or has guardrails).
    track: bool,
    /// Send a Describe before an Execute whose result shape nobody asked for (filtering).
    shapes: bool,
    /// Content detectors for the recorded statement texts and parameters.
    redact: Option<&'a RowPlan>,
    /// `resources.max_prepared_statements` and `max_portals`.
    limits: (usize, usize),
    /// Column masking rules apply to this viewer (see [`Inspect`]).
    copy_columns: bool,
    /// `pool_mode = "transaction"`: statements that leave session state are refused.
    transaction_pooled: bool,
}

/// The guardrails of a session: the resource's rules with this session's prepared statements,
/// and what a hold for review needs.
struct Guard<'a, CW> {
    session: SessionPolicy,
    /// The caller's principal: reviews compare requesters and voters by it.
    principal: &'a tollgate_identity::Principal,
    policy: &'a ResourcePolicy,
    subject: &'a str,
    groups: &'a [String],
    resource: &'a tollgate_config::Resource,
    reviews: Option<Arc<Reviews>>,
    /// How long an approval may be reused by the same statement after a restart.
    rerun_window: std::time::Duration,
    /// Notified when the client sends a CancelRequest.
    held: &'a tokio::sync::Notify,
    client: &'a tokio::sync::Mutex<CW>,
}

/// What the relay does with a refused command upstream: it sends a statement that fails in its
/// place, so that PostgreSQL itself aborts the pipeline (and the transaction block) exactly as
/// for a real error, and the client's answer stays in order.
fn failing_stand_in(msg: ClientMsg) -> Vec<u8> {
    if msg != ClientMsg::Execute {
        // Query and FunctionCall: an error, then ReadyForQuery.
        frontend::query("TOLLGATE REFUSED THIS STATEMENT")
    } else {
        // A Parse of a named statement that never exists: the unnamed one is left alone.
        let body = b"tollgate_refused\0TOLLGATE REFUSED THIS STATEMENT\0\0\0";
        let mut m = vec![ClientMsg::Parse.tag()];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }
}

/// Waits until the server has answered every Query and Sync forwarded so far (`boundaries`
/// ReadyForQuery messages, each checked with the ParameterStatus before it). Meanwhile the
/// client's COPY data (CopyData, CopyDone, CopyFail at the front of what it sends) goes through
/// untouched, since a `COPY ... FROM STDIN` in the command waits for it; anything else stays
/// buffered, unread, until then.
async fn await_settled<R, W>(
    tracker: &Tracker<'_>,
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    bytes: &AtomicU64,
    limit: usize,
    boundaries: u64,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Leading COPY stream messages are forwarded as they come.
        let mut copy = 0;
        loop {
            match next_frame(&buf[copy..], limit) {
                Ok(Some(f))
                    if matches!(
                        f.client(),
                        ClientMsg::CopyData | ClientMsg::CopyDone | ClientMsg::CopyFail
                    ) =>
                {
                    copy += f.total_len
                }
                Ok(_) => break,
                Err(e) => return Err(Stop::Protocol(e.to_string())),
            }
        }
        if copy > 0 {
            let chunk = buf.split_to(copy);
            if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                return Err(Stop::Outcome(Outcome::UpstreamLost));
            }
        }
        tokio::select! {
            _ = tracker.ready.reached(boundaries) => return Ok(()),
            r = rd.read_buf(buf), if buf.len() < limit => match r {
                Ok(0) | Err(_) => return Err(Stop::Outcome(Outcome::ClientGone)),
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            },
        }
    }
}

/// Make room for more of a large message whose header is already buffered: as its bytes
/// arrive (at most doubling what is buffered), never what its header merely claims, so a
/// 5-byte header cannot make the gateway hold `max_message_bytes` it was never sent.
///
/// Once a large message has gone through, the buffer shrinks back to [`READ_BUF`] (what is
/// left in it is copied), so a session that once relayed a big row or COPY does not hold that
/// much memory while it idles.
fn reserve_for_next(buf: &mut BytesMut, limit: usize) {
    if let Ok(None) = next_frame(buf, limit) {
        if buf.len() >= 5 {
            let total = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
            let missing = total.saturating_sub(buf.len());
            buf.reserve(missing.min(buf.len().max(READ_BUF)));
            return;
        }
    }
    if buf.capacity() > SHRINK_ABOVE && buf.len() <= READ_BUF / 2 {
        let mut fresh = BytesMut::with_capacity(READ_BUF);
        fresh.extend_from_slice(buf);
        *buf = fresh;
        return;
    }
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_BUF);
    }
}

/// A read buffer larger than this shrinks back to [`READ_BUF`] between messages.
const SHRINK_ABOVE: usize = 4 * READ_BUF;

/// The session's guardrails as one message needs them, and where their judgement goes.
type PolicyArgs<'p, 'a> = (
    &'p mut SessionPolicy,
    &'p ResourcePolicy,
    Caller<'a>,
    &'p mut Judged,
);

/// What the guardrails made of one client message, for the relay to act on.
#[derive(Default)]
struct Judged {
    /// A refusal or hold (None: forward it).
    decision: Option<Decision>,
    /// The refusal is the pipeline's, not a rule's ([`CommandRefusal::UnsettledPipeline`]).
    unsettled: bool,
    /// The command may change a setting the SQL parser depends on.
    may_change_settings: bool,
    /// A per-session limit was reached: the session ends with this message.
    limit: Option<String>,
}

/// What `inspect_client` needs besides the message.
struct Inspect {
    track: bool,
    /// Column masking rules apply to this viewer: COPY TO output needs its columns learned.
    copy_columns: bool,
    /// The relay's count of Syncs so far (the current pipeline segment).
    segment: u64,
    /// `max_prepared_statements`, `max_portals`.
    limits: (usize, usize),
}

/// Record what a client message asks for; `Ok(true)` when it is a command, whose event is
/// added to `events` (written before the batch is forwarded). Every request whose answer the
/// relay follows is queued (`ctx.track`); with `shapes` (the session filters responses), an
/// Execute of a portal whose shape nobody asked for gets a Describe sent before it.
#[allow(clippy::too_many_arguments)]
fn inspect_client(
    msg: ClientMsg,
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    events: &mut Vec<Stamped<event::Command>>,
    shapes: Option<&mut Option<Vec<u8>>>,
    ctx: &Inspect,
    mut policy: Option<PolicyArgs<'_, '_>>,
) -> Result<bool, Stop> {
    let track = ctx.track;
    if (track || policy.is_some()) && !frontend::names_are_utf8(msg.tag(), body) {
        // Prepared statements and portals are followed by name: two names that differ only in
        // bytes that are not UTF-8 must not read as one.
        return Err(Stop::Protocol(
            "statement and portal names must be valid UTF-8 through the gateway".into(),
        ));
    }
    match msg {
        ClientMsg::Query => inspect_query(body, prepared, tracker, events, shapes, ctx, policy),
        ClientMsg::Parse => inspect_parse(body, prepared, tracker, shapes.is_some(), ctx, policy),
        ClientMsg::Bind => inspect_bind(body, prepared, tracker, shapes.is_some(), ctx, policy),
        ClientMsg::Describe => {
            if track {
                let (kind, name) =
                    frontend::parse_target(body).map_err(|_| malformed("Describe"))?;
                if kind == b'S' {
                    if let Some(s) = prepared.statements.get_mut(&name) {
                        s.described = true;
                    }
                } else if let Some(p) = prepared.portals.get_mut(&name) {
                    p.described = true;
                }
                tracker.push(Kind::Describe {
                    kind,
                    name,
                    injected: false,
                });
            }
            Ok(false)
        }
        ClientMsg::Execute => inspect_execute(body, prepared, tracker, events, shapes, policy),
        ClientMsg::FunctionCall => {
            let n = tracker.push(Kind::Query {
                copy: None,
                effects: Vec::new(),
                redefines: false,
            });
            let mut ev = event::Command {
                n,
                protocol: "function_call",
                ..Default::default()
            };
            if let Some((_, _, _, out)) = policy {
                // A fast-path call names a function by OID: no statement to judge, so none runs.
                let d = Decision::Deny {
                    rule: "function_call".into(),
                    message: "fast-path function calls are not allowed on a resource with guardrails; call the function in a SELECT".into(),
                };
                ev.decision = Some(d.summary());
                out.decision = Some(d);
            }
            events.push(tracker.log.stamp(ev));
            Ok(true)
        }
        ClientMsg::Sync => {
            if let Some((session, ..)) = policy.as_mut() {
                session.sync();
            }
            tracker.push(Kind::Sync {
                segment: ctx.segment,
            });
            Ok(false)
        }
        ClientMsg::Close => {
            let (kind, name) = frontend::parse_target(body).map_err(|_| malformed("Close"))?;
            let mut seq = None;
            if let Some((session, _, _, out)) = policy.as_mut() {
                match session.close(kind == b'P', &name) {
                    Ok(s) => seq = Some(s),
                    Err(e) => {
                        out.limit = Some(e.to_string());
                        return Ok(false);
                    }
                }
            }
            if track {
                tracker.push(Kind::Close {
                    kind,
                    name: name.clone(),
                    seq,
                });
            }
            match kind {
                b'S' => prepared.statements.remove(&name).map(|s| s.text),
                _ => prepared.portals.remove(&name).map(|p| p.text),
            };
            Ok(false)
        }
        ClientMsg::Flush
        | ClientMsg::CopyData
        | ClientMsg::CopyDone
        | ClientMsg::CopyFail
        | ClientMsg::Terminate => Ok(false),
        ClientMsg::Other(other) => Err(Stop::Protocol(format!(
            "unexpected message type {:?} from client",
            other as char
        ))),
    }
}

/// A simple Query: queued, judged and recorded as a command (with the `PREPARE`d texts it
/// defines); a `COPY ... TO STDOUT` under column rules first has its columns learned.
fn inspect_query(
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    events: &mut Vec<Stamped<event::Command>>,
    shapes: Option<&mut Option<Vec<u8>>>,
    ctx: &Inspect,
    mut policy: Option<PolicyArgs<'_, '_>>,
) -> Result<bool, Stop> {
    let filtering = shapes.is_some();
    let (max_statements, _) = ctx.limits;
    let text = frontend::parse_query(body).map_err(|_| malformed("Query"))?;
    let copy = if filtering {
        copy_format_of(&text)
    } else {
        None
    };
    let redefines = filtering && redefines_statements(&text);
    if let (Some(inject), true, Some(_)) = (shapes, ctx.copy_columns, copy) {
        if let Some(source) = tollgate_policy::copy_to_stdout_source(&text) {
            tracker.push(Kind::CopyShape);
            *inject = Some(frontend::describe_only("tollgate_copy_shape", &source));
        }
    }
    if redefines {
        // Whatever a name held before, its shape is learned again before it is used.
        prepared
            .statements
            .values_mut()
            .for_each(|s| s.described = false);
    }
    let judged = policy.as_mut().map(|(session, _, who, _)| {
        session.judge_query_classified(&text, who, OffsetDateTime::now_utc())
    });
    let effects = judged
        .as_ref()
        .map(|(j, _)| j.effects.clone())
        .unwrap_or_default();
    let n = tracker.push(Kind::Query {
        copy,
        effects,
        redefines,
    });
    let mut ev = event::Command {
        n,
        protocol: "simple",
        text: Some(clip(&text, MAX_TEXT)),
        // The recorded text is clipped: the digest is what proves the rest.
        digest: (text.len() > MAX_TEXT).then(|| digest(&text)),
        ..Default::default()
    };
    if let (Some((_, rp, _, out)), Some((j, classified))) = (policy, judged) {
        // SQL PREPARE: keep its text, so an EXECUTE of the name can be shown with it.
        if !j.effects.is_empty() {
            for st in classified.statements() {
                if let tollgate_policy::Kind::Prepare { name, .. } = &st.kind {
                    if prepared.statements.contains_key(name)
                        || prepared.statements.len() < max_statements
                    {
                        let full = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
                        prepared.statements.insert(
                            name.clone(),
                            Statement {
                                text: Arc::from(clip(&text, MAX_TEXT)),
                                full: full.as_ref().try_into().expect("32 bytes"),
                                described: false,
                                classified: Some(st.summary_line().into()),
                            },
                        );
                    }
                }
            }
        }
        decided(&mut ev, j, rp, &text, Some(classified.line()), out);
    }
    events.push(tracker.log.stamp(ev));
    Ok(true)
}

/// A Parse: the statement's text kept (for the Executes of its portals) and its change queued.
fn inspect_parse(
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    filtering: bool,
    ctx: &Inspect,
    mut policy: Option<PolicyArgs<'_, '_>>,
) -> Result<bool, Stop> {
    let track = ctx.track;
    let (max_statements, _) = ctx.limits;
    let p = frontend::parse_parse(body).map_err(|_| malformed("Parse"))?;
    let mut seq = None;
    if let Some((session, _, _, out)) = policy.as_mut() {
        match session.parse(&p.statement, &p.query) {
            Ok(s) => seq = Some(s),
            Err(e) => {
                out.limit = Some(e.to_string());
                return Ok(false);
            }
        }
    }
    if !prepared.statements.contains_key(&p.statement)
        && prepared.statements.len() >= max_statements
    {
        return Err(Stop::Limit(format!(
            "this session holds too many prepared statements (limit {max_statements}); close the ones it no longer uses"
        )));
    }
    if track {
        // The name only matters to the filter (shapes); the guardrails go by `seq`.
        tracker.push(Kind::Parse {
            name: if filtering {
                p.statement.clone()
            } else {
                String::new()
            },
            seq,
        });
    }
    let full = ring::digest::digest(&ring::digest::SHA256, p.query.as_bytes());
    let classified = policy
        .as_ref()
        .map(|(_, rp, ..)| rp.classify(&p.query).line());
    prepared.statements.insert(
        p.statement,
        Statement {
            text: Arc::from(clip(&p.query, MAX_TEXT)),
            full: full.as_ref().try_into().expect("32 bytes"),
            described: false,
            classified,
        },
    );
    Ok(false)
}

/// A Bind: the portal's text, parameters (redacted) and digest kept for its Executes.
fn inspect_bind(
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    filtering: bool,
    ctx: &Inspect,
    mut policy: Option<PolicyArgs<'_, '_>>,
) -> Result<bool, Stop> {
    let track = ctx.track;
    let (_, max_portals) = ctx.limits;
    let b = frontend::parse_bind(body).map_err(|_| malformed("Bind"))?;
    let mut seq = None;
    if let Some((session, _, _, out)) = policy.as_mut() {
        match session.bind(&b.portal, &b.statement) {
            Ok(s) => seq = Some(s),
            Err(e) => {
                out.limit = Some(e.to_string());
                return Ok(false);
            }
        }
    }
    if !prepared.portals.contains_key(&b.portal) && prepared.portals.len() >= max_portals {
        return Err(Stop::Limit(format!(
            "this session holds too many portals (limit {max_portals}); close the ones it no longer uses"
        )));
    }
    let stmt = prepared.statements.get(&b.statement);
    let text = stmt.map_or_else(|| Arc::from(""), |s| s.text.clone());
    let described = stmt.is_some_and(|s| s.described);
    let classified = stmt.and_then(|s| s.classified.clone());
    let params = redact_params(&text, &b.params);
    let digest = bound_digest(stmt.map(|s| &s.full), bind_values(body));
    if track {
        let (portal, statement, formats) = if filtering {
            (b.portal.clone(), b.statement.clone(), b.result_formats)
        } else {
            (String::new(), String::new(), Vec::new())
        };
        tracker.push(Kind::Bind {
            portal,
            statement,
            formats,
            seq,
        });
    }
    prepared.portals.insert(
        b.portal,
        PortalText {
            text,
            params,
            described,
            digest,
            segment: ctx.segment,
            classified,
        },
    );
    Ok(false)
}

/// An Execute: queued, judged and recorded as a command with its portal's text and
/// parameters; a portal whose result shape nobody asked for gets a Describe sent first.
fn inspect_execute(
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    events: &mut Vec<Stamped<event::Command>>,
    shapes: Option<&mut Option<Vec<u8>>>,
    mut policy: Option<PolicyArgs<'_, '_>>,
) -> Result<bool, Stop> {
    let e = frontend::parse_execute(body).map_err(|_| malformed("Execute"))?;
    let portal = prepared.portals.get_mut(&e.portal);
    let (text, params, digest, classified) = portal.as_ref().map_or_else(
        || (Arc::from(""), Vec::new(), digest(""), None),
        |p| {
            (
                p.text.clone(),
                p.params.clone(),
                p.digest.clone(),
                p.classified.clone(),
            )
        },
    );
    let mut copy = None;
    if let Some(inject) = shapes {
        copy = copy_format_of(&text);
        if let Some(p) = portal.filter(|p| !p.described) {
            p.described = true;
            tracker.push(Kind::Describe {
                kind: b'P',
                name: e.portal.clone(),
                injected: true,
            });
            *inject = Some(frontend::describe(b'P', &e.portal));
        }
    }
    let judgement = policy.as_mut().map(|(session, _, who, _)| {
        session.judge_execute(&e.portal, who, OffsetDateTime::now_utc())
    });
    let effects = judgement
        .as_ref()
        .map(|j| j.effects.clone())
        .unwrap_or_default();
    let n = tracker.push(Kind::Execute {
        portal: e.portal,
        copy,
        effects,
    });
    let mut ev = event::Command {
        n,
        protocol: "extended",
        text: Some(clip(&text, MAX_TEXT)),
        params: Some(params),
        digest: Some(digest),
        max_rows: (e.max_rows > 0).then_some(e.max_rows),
        ..Default::default()
    };
    if let (Some((_, rp, _, out)), Some(j)) = (policy, judgement) {
        decided(&mut ev, j, rp, &text, classified, out);
    }
    events.push(tracker.log.stamp(ev));
    Ok(true)
}

fn malformed(what: &str) -> Stop {
    Stop::Protocol(format!("malformed {what} message"))
}

#[allow(clippy::too_many_arguments)]
async fn upstream_to_client<R, W>(
    rd: &mut R,
    client: &tokio::sync::Mutex<W>,
    tracker: &Tracker<'_>,
    bytes: &AtomicU64,
    leftover: Vec<u8>,
    limit: usize,
    mut filter: Option<Filter>,
    (track, watch_dialect): (bool, bool),
) -> Stop
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_BUF.max(leftover.len()));
    buf.extend_from_slice(&leftover);
    let mut rows_since: u64 = 0;
    let mut first = !buf.is_empty();
    let mut splice = Splice::default();
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
            let msg = f.server();
            if watch_dialect && msg == ServerMsg::ParameterStatus {
                let status = backend::parse_parameter_status(body).ok();
                if let Some(changed) =
                    status.and_then(|(name, value)| dialect_change(&name, &value))
                {
                    return Stop::Dialect(changed);
                }
            }
            if track
                && msg != ServerMsg::NotificationResponse
                && tracker.front_is(|k| matches!(k, Kind::CopyShape))
            {
                // Answers to the gateway's own Describe of a COPY's source: kept, not forwarded.
                if let Some(flt) = filter.as_mut() {
                    let columns = match msg {
                        ServerMsg::RowDescription => Some(Some(body)),
                        ServerMsg::NoData | ServerMsg::ErrorResponse => Some(None),
                        _ => None,
                    };
                    if let Some(c) = columns {
                        if let Err(e) = flt.copy_columns(c) {
                            return Stop::Protocol(e);
                        }
                    }
                }
                if msg == ServerMsg::ReadyForQuery {
                    tracker.pop_if(|k| matches!(k, Kind::CopyShape));
                    tracker.ready.add();
                }
                splice.replace(&buf, pos, pos + f.total_len, &[]);
                pos += f.total_len;
                continue;
            }
            // The request this message answers, when it is one the relay follows.
            let answered = if track { answered(msg, tracker) } else { None };
            let denial = if msg == ServerMsg::ErrorResponse {
                tracker.take_denial()
            } else {
                None
            };
            let verdict = if let Some(err) = denial {
                // The stand-in of a refused command failed, as intended: the client gets the
                // refusal instead, and the result is recorded with its SQLSTATE.
                if let Some(flt) = filter.as_mut() {
                    flt.result_done();
                }
                account(
                    ServerMsg::ErrorResponse,
                    &err[5..],
                    tracker,
                    &mut rows_since,
                    filter.as_mut(),
                );
                Verdict::Replace(err)
            } else {
                match filter.as_mut() {
                    None => {
                        account(msg, body, tracker, &mut rows_since, None);
                        Verdict::Forward
                    }
                    Some(flt) => {
                        match filter_message(msg, body, tracker, flt, &mut rows_since, answered) {
                            Ok(v) => v,
                            Err(e) => return Stop::Protocol(e),
                        }
                    }
                }
            };
            match verdict {
                Verdict::Forward => {}
                Verdict::Drop => splice.replace(&buf, pos, pos + f.total_len, &[]),
                Verdict::Replace(with) => splice.replace(&buf, pos, pos + f.total_len, &with),
            }
            pos += f.total_len;
        }
        if pos > 0 {
            let mut wr = client.lock().await;
            let written = match splice.finish(&buf, pos) {
                None => {
                    bytes.fetch_add(pos as u64, Ordering::Relaxed);
                    wr.write_all(&buf[..pos]).await
                }
                Some(out) => {
                    bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
                    wr.write_all(&out).await
                }
            };
            let _ = buf.split_to(pos);
            if written.is_err() || wr.flush().await.is_err() {
                return Stop::Outcome(Outcome::ClientGone);
            }
            drop(wr);
        }
        tracker.flush_results();
        reserve_for_next(&mut buf, limit);
    }
}

/// A simple query that may prepare, deallocate or discard named statements (a conservative
/// test on the text: a false positive only costs a Describe).
fn redefines_statements(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    ["prepare", "dealloc", "discard"]
        .iter()
        .any(|w| lower.contains(w))
}

/// A ParameterStatus that moves a setting the guardrails' SQL parser depends on away from
/// its pinned value ("name=value"), or None.
pub(crate) fn dialect_change(name: &str, value: &str) -> Option<String> {
    let pinned = match name.to_ascii_lowercase().as_str() {
        "standard_conforming_strings" => value.eq_ignore_ascii_case("on"),
        "client_encoding" => matches!(
            value.to_ascii_uppercase().as_str(),
            "UTF8" | "UTF-8" | "UNICODE"
        ),
        _ => true,
    };
    (!pinned).then(|| format!("{name}={value}"))
}

/// One backend message through the session's filter: keeps result shapes in step with the
/// requests they answer, masks, and drops the answers to the gateway's own Describes.
fn filter_message(
    msg: ServerMsg,
    body: &[u8],
    tracker: &Tracker<'_>,
    flt: &mut Filter,
    rows_since: &mut u64,
    answered: Option<Kind>,
) -> Result<Verdict, String> {
    let verdict = match msg {
        ServerMsg::DataRow => {
            if !flt.has_current() {
                if let Some(Kind::Execute { portal, .. }) = tracker.front() {
                    flt.execute_rows(&portal);
                }
            }
            flt.data_row(body)?
        }
        ServerMsg::RowDescription | ServerMsg::NoData => match answered {
            Some(Kind::Describe {
                kind,
                name,
                injected,
            }) => {
                flt.described(
                    kind,
                    &name,
                    (msg == ServerMsg::RowDescription).then_some(body),
                )?;
                if injected {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            }
            _ => {
                if msg == ServerMsg::RowDescription {
                    flt.row_description(body)?;
                }
                Verdict::Forward
            }
        },
        ServerMsg::ParseComplete => {
            if let Some(Kind::Parse { name, .. }) = answered {
                flt.parsed(&name);
            }
            Verdict::Forward
        }
        ServerMsg::BindComplete => {
            if let Some(Kind::Bind {
                portal,
                statement,
                formats,
                ..
            }) = answered
            {
                flt.bound(&portal, &statement, formats);
            }
            Verdict::Forward
        }
        ServerMsg::CloseComplete => {
            if let Some(Kind::Close { kind, name, .. }) = answered {
                flt.closed(kind, &name);
            }
            Verdict::Forward
        }
        ServerMsg::CopyOutResponse => {
            let hint = match tracker.front() {
                Some(Kind::Query { copy, .. } | Kind::Execute { copy, .. }) => copy,
                _ => None,
            };
            flt.copy_out(body, hint)?
        }
        ServerMsg::CopyData => flt.copy_data(body)?,
        ServerMsg::CopyDone => flt.copy_done(),
        ServerMsg::CommandComplete => {
            if flt.command_complete() {
                *rows_since = 0;
                if let Some(p) = tracker.refused(CommandRefusal::REFUSED) {
                    let extra = flt.take_result_extra();
                    tracker.emit(&p, "refused", extra);
                }
                return Ok(Verdict::Drop);
            }
            Verdict::Forward
        }
        ServerMsg::ReadyForQuery => {
            if let Some(Kind::Query {
                redefines: true, ..
            }) = tracker.front()
            {
                flt.forget_statement_shapes();
            }
            Verdict::Forward
        }
        ServerMsg::ErrorResponse | ServerMsg::NoticeResponse => {
            flt.error_or_notice(msg.tag(), body)?
        }
        ServerMsg::NotificationResponse => flt.notification(body)?,
        ServerMsg::FunctionCallResponse => flt.function_result(body)?,
        _ => Verdict::Forward,
    };
    if matches!(
        msg,
        ServerMsg::CommandComplete
            | ServerMsg::EmptyQueryResponse
            | ServerMsg::PortalSuspended
            | ServerMsg::ErrorResponse
            | ServerMsg::ReadyForQuery
    ) {
        flt.result_done();
    }
    account(msg, body, tracker, rows_since, Some(flt));
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_length_does_not_reserve_what_was_not_sent() {
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(b"Q");
        buf.extend_from_slice(&(64 * 1024 * 1024i32).to_be_bytes());
        reserve_for_next(&mut buf, 128 * 1024 * 1024);
        assert!(buf.capacity() <= 2 * READ_BUF, "{}", buf.capacity());
        // As bytes arrive, room grows with them (geometrically), up to the message.
        buf.resize(1024 * 1024, b'x');
        reserve_for_next(&mut buf, 128 * 1024 * 1024);
        assert!(buf.capacity() <= 4 * 1024 * 1024, "{}", buf.capacity());
        assert!(buf.capacity() >= 2 * 1024 * 1024 - 16);
    }

    #[test]
    fn the_read_buffer_shrinks_back_after_a_large_message() {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let body = vec![b'x'; 3 * 1024 * 1024];
        buf.extend_from_slice(b"d");
        buf.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        buf.extend_from_slice(&body);
        buf.extend_from_slice(b"c\0\0"); // the start of the next message
        let frame = buf.split_to(5 + body.len());
        drop(frame);
        // A large buffer is reclaimed by `reserve`: make it so, as the relay's reads would.
        buf.reserve(2 * 1024 * 1024);
        assert!(buf.capacity() > SHRINK_ABOVE, "{}", buf.capacity());
        reserve_for_next(&mut buf, 128 * 1024 * 1024);
        assert!(buf.capacity() <= 2 * READ_BUF, "{}", buf.capacity());
        assert_eq!(&buf[..], b"c\0\0", "what was buffered is kept");
        // A large message still arriving is not shrunk under it.
        let mut big = BytesMut::with_capacity(8 * READ_BUF);
        big.extend_from_slice(b"d");
        big.extend_from_slice(&(1024 * 1024i32).to_be_bytes());
        big.resize(1000, b'x');
        let cap = big.capacity();
        reserve_for_next(&mut big, 128 * 1024 * 1024);
        assert!(big.capacity() >= cap, "{} < {cap}", big.capacity());
    }
}
