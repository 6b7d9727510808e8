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
use crate::proto::next_frame;
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
    self, CommandResult, Detail, ReviewEvent, SessionTerminated, StatementRefused,
};
use tollgate_gate::hold::{HoldRequest, Opened};
use tollgate_identity::Identity;
use tollgate_mask::{CopyFormat, RowPlan};
use tollgate_metrics::registry;
use tollgate_policy::{
    Caller, Confirmation, Decision, Judgement, ResourcePolicy, SessionPolicy, CATALOG_QUERY,
};
use tollgate_review::{Review, Reviews, Verdict as ReviewVerdict};
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

/// A request whose answer the response direction still expects, in the order sent.
#[derive(Clone, PartialEq, Eq)]
enum Kind {
    /// A simple Query or FunctionCall: complete at ReadyForQuery. `effects`: the guardrails'
    /// prepared-statement changes it makes, settled by its outcome.
    Query {
        copy: Option<CopyFormat>,
        effects: Vec<u64>,
        /// It may prepare, deallocate or discard named statements (SQL `PREPARE` and kin):
        /// the result shapes learned for statement names are forgotten when it completes.
        redefines: bool,
    },
    /// An extended-protocol Execute: complete at CommandComplete/EmptyQuery/PortalSuspended/Error.
    Execute {
        portal: String,
        copy: Option<CopyFormat>,
        effects: Vec<u64>,
    },
    /// A Sync: the end of an extended-protocol pipeline (`segment`: the guardrails' number for
    /// it, whose portals are gone when the server reports it is idle).
    Sync {
        segment: u64,
    },
    // Only tracked when the session filters responses or has guardrails (`seq`: the
    // guardrails' number for the change, confirmed by the server's answer):
    Parse {
        name: String,
        seq: Option<u64>,
    },
    Bind {
        portal: String,
        statement: String,
        formats: Vec<i16>,
        seq: Option<u64>,
    },
    /// `injected`: sent by the gateway to learn a result's shape; its answer is not forwarded.
    Describe {
        kind: u8,
        name: String,
        injected: bool,
    },
    Close {
        kind: u8,
        name: String,
        seq: Option<u64>,
    },
    /// The gateway's own Parse/Describe/Close/Sync that learns the columns of a `COPY ... TO
    /// STDOUT` before it runs; none of its answers is forwarded.
    CopyShape,
}

impl Kind {
    fn is_command(&self) -> bool {
        matches!(self, Kind::Query { .. } | Kind::Execute { .. })
    }

    /// The guardrails' change this request carries: its own, or those of the command.
    fn changes(&self) -> &[u64] {
        match self {
            Kind::Parse { seq, .. } | Kind::Bind { seq, .. } | Kind::Close { seq, .. } => {
                seq.as_slice()
            }
            Kind::Query { effects, .. } | Kind::Execute { effects, .. } => effects,
            _ => &[],
        }
    }
}

/// ReadyForQuery messages seen so far. Counting is one atomic add; waking happens only while
/// the client direction waits (after a command that may change settings).
#[derive(Default)]
struct ReadyCount {
    seen: AtomicU64,
    waiting: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl ReadyCount {
    fn add(&self) {
        self.seen.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    /// Resolves once `target` ReadyForQuery messages have been seen.
    async fn reached(&self, target: u64) {
        self.waiting.store(true, Ordering::SeqCst);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.seen.load(Ordering::SeqCst) >= target {
                break;
            }
            notified.await;
        }
        self.waiting.store(false, Ordering::SeqCst);
    }
}

/// What the server's answers settled about the guardrails' view of the session, for the client
/// direction to apply before it judges the next message.
enum Settled {
    Change(u64, Confirmation),
    /// ReadyForQuery outside a transaction after the Sync that closed this segment.
    Idle(u64),
}

struct Pending {
    n: u64,
    kind: Kind,
    started: Instant,
    rows: u64,
    tag: Option<String>,
    error: Option<String>,
    /// The request was refused by the gateway: it was replaced upstream by a statement that
    /// fails, and the client gets this ErrorResponse instead of that failure.
    denial: Option<Vec<u8>>,
}

impl Pending {
    fn settle(&self, how: Confirmation, out: &mut Vec<Settled>) {
        for &seq in self.kind.changes() {
            out.push(Settled::Change(seq, how));
        }
    }
}

/// Requests forwarded and not yet answered, in order; shared by the two directions. Finished
/// commands are handed back to the response direction, which records their results.
struct Tracker<'a> {
    pending: Mutex<VecDeque<Pending>>,
    next: AtomicU64,
    log: &'a SessionLog,
    /// Result events not yet journaled: the response direction records them once the answer
    /// they describe is on its way to the client (off the round trip's critical path, and in
    /// one journal append per batch of answers); every other path flushes them first.
    results: Mutex<Vec<CommandResult>>,
    /// Answers that settle the guardrails' view (prepared statements, portals).
    settled: Mutex<Vec<Settled>>,
    /// `settled` is not empty (read without the lock, for every client message).
    has_settled: std::sync::atomic::AtomicBool,
    /// ReadyForQuery messages seen so far, each after the ParameterStatus before it was checked.
    ready: ReadyCount,
}

type Finished = Vec<(Pending, &'static str)>;

impl Tracker<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, kind: Kind) -> u64 {
        let n = if kind.is_command() {
            self.next.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        self.lock().push_back(Pending {
            n,
            kind,
            started: Instant::now(),
            rows: 0,
            tag: None,
            error: None,
            denial: None,
        });
        n
    }

    /// Command `n` was refused: its answer becomes `error`.
    fn deny(&self, n: u64, error: Vec<u8>) {
        let mut q = self.lock();
        if let Some(p) = q.iter_mut().rev().find(|p| p.n == n && p.kind.is_command()) {
            p.denial = Some(error);
        }
    }

    /// The request queued last (a Parse) was refused: its answer becomes `error`.
    fn deny_last(&self, error: Vec<u8>) {
        if let Some(p) = self.lock().back_mut() {
            p.denial = Some(error);
        }
    }

    /// The ErrorResponse to send for the oldest request, when the gateway refused it.
    fn take_denial(&self) -> Option<Vec<u8>> {
        // Only when the request is next: otherwise the error answers an earlier request.
        self.lock().front_mut().and_then(|p| p.denial.take())
    }

    fn settle(&self, mut settled: Vec<Settled>) {
        if !settled.is_empty() {
            self.settled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut settled);
            self.has_settled.store(true, Ordering::Release);
        }
    }

    /// The server answered `p`: its changes took effect.
    fn confirm(&self, p: &Pending) {
        if !p.kind.changes().is_empty() {
            let mut settled = Vec::new();
            p.settle(Confirmation::Done, &mut settled);
            self.settle(settled);
        }
    }

    /// What the server settled since the last call.
    fn take_settled(&self) -> Vec<Settled> {
        if !self.has_settled.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *self.settled.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn emit(&self, p: &Pending, outcome: &'static str, extra: Option<ResultExtra>) {
        if !self.log.records_commands() {
            return;
        }
        let ResultExtra { masked, capture } = extra.unwrap_or_default();
        let event = CommandResult {
            n: p.n,
            outcome,
            sqlstate: p.error.clone(),
            rows: p.rows,
            tag: p.tag.clone(),
            duration_us: p.started.elapsed().as_micros() as u64,
            masked,
            capture,
        };
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// Journals the result events emitted so far, in the order they were emitted.
    fn flush_results(&self) {
        let results = std::mem::take(&mut *self.results.lock().unwrap_or_else(|e| e.into_inner()));
        self.log.record_results(results.into_iter());
    }

    /// Whether the oldest request still waiting for its answer is of this kind.
    fn front_is(&self, kind: impl Fn(&Kind) -> bool) -> bool {
        self.lock().front().is_some_and(|p| kind(&p.kind))
    }

    /// The oldest request still waiting for its answer.
    fn front(&self) -> Option<Kind> {
        self.lock().front().map(|p| p.kind.clone())
    }

    /// Removes the oldest request when it is of the kind a response answers (which confirms it).
    fn pop_if(&self, answers: impl Fn(&Kind) -> bool) -> Option<Kind> {
        let mut q = self.lock();
        if q.front().is_some_and(|p| answers(&p.kind)) {
            let p = q.pop_front()?;
            drop(q);
            self.confirm(&p);
            Some(p.kind)
        } else {
            None
        }
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended: an Execute is finished; a
    /// Query's statement adds its rows.
    fn complete(&self, rows: u64, tag: String) -> Option<Pending> {
        let mut q = self.lock();
        let i = q.iter().position(|p| p.kind.is_command())?;
        match q[i].kind {
            Kind::Execute { .. } => {
                let mut p = q.remove(i).expect("index is in range");
                drop(q);
                p.rows = rows;
                p.tag = Some(tag);
                self.confirm(&p);
                Some(p)
            }
            _ => {
                let p = &mut q[i];
                p.rows += rows;
                p.tag = Some(tag);
                None
            }
        }
    }

    /// The gateway answered the current command with an error of its own (a refused COPY)
    /// while the server went on: an Execute is finished; a Query is marked failed.
    fn refused(&self, code: &str) -> Option<Pending> {
        let mut q = self.lock();
        let i = q.iter().position(|p| p.kind.is_command())?;
        if matches!(q[i].kind, Kind::Execute { .. }) {
            let mut p = q.remove(i).expect("index is in range");
            p.error = Some(code.into());
            return Some(p);
        }
        q[i].error = Some(code.into());
        None
    }

    /// ErrorResponse: fails the oldest request; PostgreSQL skips the rest of the pipeline up to
    /// Sync. An error at Sync itself (a failed implicit commit) fails nothing still queued.
    fn error(&self, code: String) -> Finished {
        let mut q = self.lock();
        match q.front().map(|p| &p.kind) {
            None | Some(Kind::Sync { .. }) => return Vec::new(),
            Some(Kind::Query { .. }) => {
                q[0].error = Some(code);
                return Vec::new();
            }
            _ => {}
        }
        let mut settled = Vec::new();
        let mut failed = q.pop_front().expect("front exists");
        failed.settle(Confirmation::Failed, &mut settled);
        let mut done = Vec::new();
        if failed.kind.is_command() {
            failed.error = Some(code);
            done.push((failed, "error"));
        } else if let Some(i) = q.iter().position(|p| p.kind.is_command()) {
            // A Parse, Bind or Describe failed: the command it prepared is the one that failed.
            if i == 0
                || q.iter()
                    .take(i)
                    .all(|p| !matches!(p.kind, Kind::Sync { .. }))
            {
                let mut p = q.remove(i).expect("index is in range");
                p.settle(Confirmation::Skipped, &mut settled);
                p.error = Some(code);
                done.push((p, "error"));
            }
        }
        while q
            .front()
            .is_some_and(|p| !matches!(p.kind, Kind::Sync { .. } | Kind::Query { .. }))
        {
            let p = q.pop_front().expect("front exists");
            p.settle(Confirmation::Skipped, &mut settled);
            if p.kind.is_command() {
                done.push((p, "skipped"));
            }
        }
        drop(q);
        self.settle(settled);
        done
    }

    /// ReadyForQuery (`status`: I idle, T in a transaction, E failed transaction): everything
    /// up to the first Sync or Query is finished.
    fn ready(&self, status: u8) -> Finished {
        let mut done = Vec::new();
        let mut settled = Vec::new();
        let mut q = self.lock();
        while let Some(p) = q.pop_front() {
            let boundary = matches!(p.kind, Kind::Sync { .. } | Kind::Query { .. });
            match (&p.kind, &p.error) {
                (Kind::Query { .. }, None) => p.settle(Confirmation::Done, &mut settled),
                (Kind::Query { .. }, Some(_)) => p.settle(Confirmation::Failed, &mut settled),
                (Kind::Sync { segment: s }, _) if status == b'I' => settled.push(Settled::Idle(*s)),
                // Unanswered before ReadyForQuery: skipped.
                (Kind::Execute { .. }, _) => p.settle(Confirmation::Skipped, &mut settled),
                _ => {}
            }
            if p.kind.is_command() {
                let outcome = match (&p.kind, &p.error) {
                    (Kind::Execute { .. }, _) => "skipped",
                    (_, Some(_)) => "error",
                    _ => "ok",
                };
                done.push((p, outcome));
            }
            if boundary {
                break;
            }
        }
        drop(q);
        self.settle(settled);
        self.ready.add();
        done
    }

    /// Drop command `n` (never forwarded) and everything queued after it.
    fn forget(&self, n: u64) {
        let mut q = self.lock();
        if let Some(i) = q.iter().position(|p| p.n == n && p.kind.is_command()) {
            q.truncate(i);
        }
    }

    /// At the end of a session: every command still waiting for its answer is recorded as
    /// interrupted; returns whether there was one.
    fn interrupt_pending(&self) -> bool {
        let left: Vec<Pending> = self
            .lock()
            .drain(..)
            .filter(|p| p.kind.is_command())
            .collect();
        for p in &left {
            self.emit(p, "interrupted", None);
        }
        self.flush_results();
        !left.is_empty()
    }
}

impl Drop for Tracker<'_> {
    /// A relay dropped mid-batch (the session task cancelled) still records what it relayed.
    fn drop(&mut self) {
        self.flush_results();
    }
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
        Outcome::DialectChanged | Outcome::LimitReached => {
            let (code, msg, hint) = if outcome == Outcome::DialectChanged {
                tracing::warn!(session = %log.id, setting = %error.as_deref().unwrap_or(""), "a setting the guardrails depend on changed upstream; ending the session");
                (
                    "08P01",
                    format!(
                        "tollgate ended this session: the server reported {}, which the gateway's guardrails cannot read SQL under",
                        error.as_deref().unwrap_or("a changed setting")
                    ),
                    "reconnect; standard_conforming_strings must stay on and client_encoding UTF8 through the gateway",
                )
            } else {
                (
                    "54000",
                    format!("tollgate ended this session: {}", error.as_deref().unwrap_or("a limit was reached")),
                    "close prepared statements and portals the session no longer uses (Close, DEALLOCATE), or ask the operator to raise max_prepared_statements / max_portals",
                )
            };
            log.record(&SessionTerminated {
                reason: outcome.as_str(),
                detail: Detail::Text(error.clone()),
                sqlstate: None,
                message: None,
            });
            let _ = cwr
                .write_all(&backend::error(Severity::Fatal, code, &msg, Some(hint)))
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
                match f.tag {
                    b'D' => {
                        row = match backend::parse_data_row(body).ok().as_deref() {
                            Some([Some(a), Some(b)]) => Some((
                                String::from_utf8_lossy(a).into_owned(),
                                String::from_utf8_lossy(b).into_owned(),
                            )),
                            _ => None,
                        }
                    }
                    b'E' => failed = Some(backend::parse_error(body).unwrap_or_default().message),
                    b'Z' => {
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
fn failing_stand_in(tag: u8) -> Vec<u8> {
    if tag != b'E' {
        // Query and FunctionCall: an error, then ReadyForQuery.
        frontend::query("TOLLGATE REFUSED THIS STATEMENT")
    } else {
        // A Parse of a named statement that never exists: the unnamed one is left alone.
        let body = b"tollgate_refused\0TOLLGATE REFUSED THIS STATEMENT\0\0\0";
        let mut m = vec![b'P'];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }
}

async fn client_to_upstream<R, W, CW>(
    side: &ClientSide<'_>,
    rd: &mut R,
    wr: &mut W,
    mut guard: Option<Guard<'_, CW>>,
) -> Stop
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let ClientSide {
        gw,
        tracker,
        bytes,
        commands,
        track,
        shapes,
        redact,
        limits,
        copy_columns,
    } = *side;
    let limit = gw.max_message;
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut prepared = Prepared::default();
    let mut events: Vec<Stamped<event::Command>> = Vec::new();
    let mut splice = Splice::default();
    // ReadyForQuery messages the requests forwarded so far will bring (one per Query,
    // FunctionCall and Sync), and the pipeline state of a command that may change settings.
    let mut boundaries: u64 = 0;
    let mut segment: u64 = 0;
    let mut risky_pipeline = false;
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
            // What the server settled since: prepared statements, portals, finished pipelines.
            for settled in tracker.take_settled() {
                if let Settled::Idle(seg) = settled {
                    prepared.portals.retain(|_, p| p.segment > seg);
                }
                if let Some(g) = guard.as_mut() {
                    match settled {
                        Settled::Change(seq, how) => g.session.confirm(seq, how),
                        Settled::Idle(seg) => g.session.idle(seg),
                    }
                }
            }
            let end = pos + f.total_len;
            if guard.is_some() && risky_pipeline && f.tag == b'P' {
                // The server parses this after a command that may have changed how SQL reads,
                // before the gateway can see the outcome: refused.
                let (code, msg, hint) = unsettled_pipeline();
                if track {
                    let name = frontend::parse_parse(body)
                        .map(|p| p.statement)
                        .unwrap_or_default();
                    tracker.push(Kind::Parse { name, seq: None });
                    tracker.deny_last(backend::error(Severity::Error, code, msg, Some(hint)));
                }
                tracker.log.record(&StatementRefused {
                    reason: "unsettled_pipeline",
                    protocol: "extended",
                });
                splice.replace(&buf, pos, end, &failing_stand_in(b'E'));
                pos = end;
                continue;
            }
            let mut inject = None;
            let mut judged = Judged::default();
            let ctx = Inspect {
                track,
                copy_columns,
                segment,
                limits,
            };
            match inspect_client(
                f.tag,
                body,
                &mut prepared,
                tracker,
                &mut events,
                shapes.then_some(&mut inject),
                &ctx,
                guard.as_mut().map(|g| {
                    let who = Caller {
                        subject: g.subject,
                        groups: g.groups,
                    };
                    (&mut g.session, g.policy, who, &mut judged)
                }),
            ) {
                Ok(true) => {
                    commands.inc();
                    if let (Some(plan), Some(ev)) = (redact, events.last_mut()) {
                        redact_command(&mut ev.event, plan);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    stop = Some(e);
                    break;
                }
            }
            if let Some(e) = judged.limit.take() {
                stop = Some(Stop::Limit(e));
                break;
            }
            if matches!(f.tag, b'Q' | b'F' | b'S') {
                boundaries += 1;
            }
            if f.tag == b'Q' && inject.is_some() {
                // The Sync of the gateway's own COPY shape request.
                boundaries += 1;
            }
            if f.tag == b'S' {
                segment += 1;
            }
            if guard.is_some() && risky_pipeline && f.tag == b'Q' && judged.decision.is_none() {
                let (code, msg, hint) = unsettled_pipeline();
                judged.decision = Some(Decision::Deny {
                    rule: "sql_safety".into(),
                    message: msg.into(),
                });
                judged.hint = Some((code, hint));
            }
            let n = events.last().map_or(0, |e| e.event.n);
            let refusal: Option<(&'static str, String, Option<String>)> = match judged
                .decision
                .take()
            {
                None | Some(Decision::Allow { .. }) => None,
                Some(Decision::Deny { message, .. }) => {
                    let (code, hint) = judged.hint.take().unwrap_or(("42501", ""));
                    Some((code, message, (!hint.is_empty()).then(|| hint.to_string())))
                }
                Some(Decision::Review {
                    rule,
                    approvers,
                    min_approvals,
                    timeout,
                }) => {
                    let g = guard.as_mut().expect("a decision comes from a guard");
                    let ask = Ask {
                        n,
                        shown: review_text(
                            f.tag,
                            body,
                            &prepared,
                            &g.session,
                            events.last().map(|e| &e.event),
                            redact,
                        ),
                        sha256: events
                            .last()
                            .and_then(|e| e.event.digest.as_deref())
                            .map(|d| d.trim_start_matches("sha256:").to_string())
                            .unwrap_or_default(),
                        rule,
                        approvers,
                        min_approvals,
                        timeout,
                    };
                    match open_review(g, tracker, &ask) {
                        Err(Held::Run) => None,
                        Err(Held::Refuse(code, msg, hint)) => Some((code, msg, hint)),
                        Err(Held::ClientGone) => return Stop::Outcome(Outcome::ClientGone),
                        Ok(review) => {
                            if let Some(ev) = events.last_mut() {
                                ev.event.review = Some(review.id.clone());
                            }
                            // Everything before the held command goes upstream now, with the
                            // events (the held command's too: it is recorded before it waits).
                            if let Err(stop) =
                                forward(gw, tracker, wr, &mut buf, &mut splice, pos, &mut events)
                                    .await
                            {
                                return stop;
                            }
                            pos = 0;
                            match await_review(
                                g, tracker, rd, &mut buf, bytes, limit, &ask, &review,
                            )
                            .await
                            {
                                Held::Run => None,
                                Held::Refuse(code, msg, hint) => Some((code, msg, hint)),
                                Held::ClientGone => return Stop::Outcome(Outcome::ClientGone),
                            }
                        }
                    }
                }
            };
            let end = pos + f.total_len;
            let refused = refusal.is_some();
            if let Some((code, msg, hint)) = refusal {
                // A Describe queued for this Execute still goes first: its answer is expected.
                let mut with = inject.unwrap_or_default();
                with.extend_from_slice(&failing_stand_in(f.tag));
                splice.replace(&buf, pos, end, &with);
                tracker.deny(
                    n,
                    backend::error(Severity::Error, code, &msg, hint.as_deref()),
                );
            } else if let Some(describe) = inject {
                let mut with = describe;
                with.extend_from_slice(&buf[pos..end]);
                splice.replace(&buf, pos, end, &with);
            }
            pos = end;
            if f.tag == b'X' {
                stop = Some(Stop::Outcome(Outcome::Closed));
                break;
            }
            // A command that may change a setting the parser depends on: nothing after it is
            // read until the server's answer (and its ParameterStatus) has been checked. In a
            // pipeline, the wait is at its Sync, and no statement may be parsed before it.
            let settle_now = match f.tag {
                b'Q' | b'F' => judged.may_change_settings && !refused,
                b'E' => {
                    risky_pipeline |= judged.may_change_settings && !refused;
                    false
                }
                b'S' => std::mem::take(&mut risky_pipeline),
                _ => false,
            };
            if settle_now {
                if let Err(stop) =
                    forward(gw, tracker, wr, &mut buf, &mut splice, pos, &mut events).await
                {
                    return stop;
                }
                pos = 0;
                if let Err(stop) =
                    await_settled(tracker, rd, wr, &mut buf, bytes, limit, boundaries).await
                {
                    return stop;
                }
            }
        }
        if let Err(stop) = forward(gw, tracker, wr, &mut buf, &mut splice, pos, &mut events).await {
            return stop;
        }
        if let Some(stop) = stop {
            return stop;
        }
        reserve_for_next(&mut buf, limit);
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
                Ok(Some(f)) if matches!(f.tag, b'd' | b'c' | b'f') => copy += f.total_len,
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

/// The refusal of a statement sent after a command that may change session settings, in the
/// same pipeline.
fn unsettled_pipeline() -> (&'static str, &'static str, &'static str) {
    (
        "0A000",
        "tollgate refused this statement: it follows a command that may change session settings in the same pipeline (rule \"sql_safety\")",
        "send Sync after a command that may change settings (SET, DO, CALL, a function the gateway cannot inspect) and wait for ReadyForQuery before the next statement",
    )
}

/// What a reviewer is shown for a held command: its full text (values masked, never its
/// structure), the bound parameters (secrets redacted), what a prepared name runs, and the
/// digest an approval binds to.
fn review_text(
    tag: u8,
    body: &[u8],
    prepared: &Prepared,
    session: &SessionPolicy,
    event: Option<&event::Command>,
    redact: Option<&RowPlan>,
) -> String {
    let original = statement_of(tag, body, prepared);
    let mut shown = match redact {
        Some(plan) => redact_sql(&original, plan),
        None => original.clone(),
    };
    if let Some(params) = event.and_then(|e| e.params.as_ref()) {
        if !params.is_empty() {
            let list: Vec<String> = params
                .iter()
                .enumerate()
                .map(|(i, v)| format!("${} = {}", i + 1, v))
                .collect();
            shown.push_str(&format!("\n-- parameters: {}", list.join(", ")));
        }
    }
    if tag == b'Q' {
        // `EXECUTE name`: what the name runs.
        for st in session.classify(&original).statements() {
            let tollgate_policy::Kind::Execute { name } = &st.kind else {
                continue;
            };
            if let Some(text) = prepared.statements.get(name) {
                let text = match redact {
                    Some(plan) => redact_sql(&text.text, plan),
                    None => text.text.to_string(),
                };
                shown.push_str(&format!("\n-- EXECUTE {name} runs: {text}"));
            }
            for body in session.prepared(name) {
                shown.push_str(&format!("\n-- {name} is: {}", body.summary_line()));
            }
        }
    }
    if let Some(c) = event.and_then(|e| e.classification.as_ref()) {
        shown.push_str(&format!("\n-- classification: {c}"));
    }
    if let Some(d) = event.and_then(|e| e.digest.as_deref()) {
        shown.push_str(&format!("\n-- digest: {d}"));
    }
    shown
}

/// A command held for review.
struct Ask {
    n: u64,
    /// The statement as recorded (content detectors applied), for reviewers.
    shown: String,
    /// SHA-256 of the statement as the client sent it (an approval survives a restart by it).
    sha256: String,
    rule: String,
    approvers: Vec<String>,
    min_approvals: u32,
    timeout: std::time::Duration,
}

enum Held {
    Run,
    Refuse(&'static str, String, Option<String>),
    ClientGone,
}

/// The text a held message runs: a Query's SQL, or an Execute's prepared statement.
fn statement_of(tag: u8, body: &[u8], prepared: &Prepared) -> String {
    match tag {
        b'Q' => frontend::parse_query(body).unwrap_or_default(),
        b'E' => frontend::parse_execute(body)
            .ok()
            .and_then(|e| prepared.portals.get(&e.portal))
            .map(|p| p.text.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Opens the review of a held command (`Err` when it runs or is refused without one: an
/// approval of the same statement kept from before a restart, or no review service).
fn open_review<CW>(g: &Guard<'_, CW>, tracker: &Tracker<'_>, ask: &Ask) -> Result<Review, Held> {
    let Some(reviews) = g.reviews.as_ref() else {
        return Err(Held::Refuse(
            "42501",
            format!("this statement needs a review (rule \"{}\"), and this gateway has no review service", ask.rule),
            None,
        ));
    };
    let request = HoldRequest {
        session_id: &tracker.log.id,
        resource: &g.resource.name,
        subject: g.subject,
        groups: g.groups,
        principal: g.principal,
        rule: &ask.rule,
        shown: ask.shown.clone(),
        digest: ask.sha256.clone(),
        approvers: &ask.approvers,
        min_approvals: ask.min_approvals,
        timeout: ask.timeout,
    };
    match tollgate_gate::hold::open(reviews, request, g.rerun_window) {
        Ok(Opened::Rerun(r)) => {
            tracker.log.record(&ReviewEvent {
                kind: "review.rerun",
                n: ask.n,
                review: r.id,
                reviewers: vec![],
                waited_ms: None,
                outcome: None,
            });
            Err(Held::Run)
        }
        Ok(Opened::Pending(r)) => Ok(r),
        Err(e) => {
            tracing::error!(session = %tracker.log.id, error = %e, "could not open a review");
            Err(Held::Refuse(
                "58030",
                "tollgate could not open a review for this statement, so it was not run".into(),
                Some("try again later or contact the gateway's operator".into()),
            ))
        }
    }
}

/// Tells the client its command is held, then waits for the decision, the deadline, a cancel
/// or the client's disconnection (which withdraws the review).
#[allow(clippy::too_many_arguments)]
async fn await_review<R, CW>(
    g: &Guard<'_, CW>,
    tracker: &Tracker<'_>,
    rd: &mut R,
    buf: &mut BytesMut,
    bytes: &AtomicU64,
    limit: usize,
    ask: &Ask,
    review: &Review,
) -> Held
where
    R: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let reviews = g.reviews.as_ref().expect("a review was opened");
    let where_ = review
        .url
        .as_deref()
        .map(|u| format!(" or at {u}"))
        .unwrap_or_default();
    let msg = format!(
        "tollgate: this statement needs approval (rule \"{}\"); it is held as review {} until it is approved or denied, for at most {}",
        ask.rule,
        review.id,
        tollgate_review::format_duration(ask.timeout)
    );
    let hint = format!(
        "a reviewer approves with `tollgate reviews approve {}`{where_}",
        review.id
    );
    let notice = backend::error(Severity::Notice, "00000", &msg, Some(&hint));
    {
        let mut c = g.client.lock().await;
        if c.write_all(&notice).await.is_err() || c.flush().await.is_err() {
            reviews.withdraw(&review.id);
            return Held::ClientGone;
        }
    }
    let held_since = Instant::now();
    let wait = reviews.wait(&review.id);
    tokio::pin!(wait);
    let cancelled = g.held.notified();
    tokio::pin!(cancelled);
    let verdict = loop {
        tokio::select! {
            v = &mut wait => break v,
            _ = &mut cancelled => {
                reviews.withdraw(&review.id);
                break ReviewVerdict::Withdrawn;
            }
            // The client may pipeline more (kept for later) or go away (the review is withdrawn).
            r = rd.read_buf(buf), if buf.len() < limit => match r {
                Ok(0) | Err(_) => {
                    reviews.withdraw(&review.id);
                    return Held::ClientGone;
                }
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            },
        }
    };
    let waited_ms = held_since.elapsed().as_millis() as u64;
    let (outcome, held) = match verdict {
        ReviewVerdict::Approved { reviewers } => {
            tracker.log.record(&ReviewEvent {
                kind: "review.approved",
                n: ask.n,
                review: review.id.clone(),
                reviewers,
                waited_ms: Some(waited_ms),
                outcome: None,
            });
            return Held::Run;
        }
        ReviewVerdict::Denied { reviewer, reason } => (
            "denied",
            Held::Refuse(
                "42501",
                format!(
                    "review {} denied by {reviewer}: {}",
                    review.id,
                    reason.as_deref().unwrap_or("no reason given")
                ),
                None,
            ),
        ),
        ReviewVerdict::Expired => (
            "expired",
            Held::Refuse(
                "42501",
                format!(
                    "review {} expired after {} without a decision; the statement was not run",
                    review.id,
                    tollgate_review::format_duration(ask.timeout)
                ),
                Some("ask a reviewer to decide sooner, then run it again".into()),
            ),
        ),
        ReviewVerdict::Withdrawn => (
            "withdrawn",
            Held::Refuse(
                "57014",
                "canceling statement due to user request".into(),
                None,
            ),
        ),
        ReviewVerdict::Unavailable(e) => {
            tracing::error!(session = %tracker.log.id, review = %review.id, error = %e, "review unavailable");
            (
                "unavailable",
                Held::Refuse(
                    "58030",
                    format!(
                        "tollgate could not read review {}, so the statement was not run",
                        review.id
                    ),
                    None,
                ),
            )
        }
    };
    tracker.log.record(&ReviewEvent {
        kind: "review.refused",
        n: ask.n,
        review: review.id.clone(),
        reviewers: vec![],
        waited_ms: Some(waited_ms),
        outcome: Some(outcome),
    });
    held
}

/// Sends `buf[..pos]` (as spliced) upstream once the events of its commands are in the audit
/// journal (one write per round trip); fail closed refuses them when that is impossible.
async fn forward<W: AsyncWrite + Unpin>(
    gw: &PgGateway,
    tracker: &Tracker<'_>,
    wr: &mut W,
    buf: &mut BytesMut,
    splice: &mut Splice,
    pos: usize,
    events: &mut Vec<Stamped<event::Command>>,
) -> Result<(), Stop> {
    // Answers already relayed are recorded before the commands that follow them.
    tracker.flush_results();
    if !events.is_empty() && !tracker.log.records_commands() {
        // server.record_commands = false (a benchmark baseline): nothing is written.
        events.clear();
    }
    if !events.is_empty() {
        let inputs: Vec<EventInput> = events
            .iter()
            .map(|e| tracker.log.stamped_input(e))
            .collect();
        if let Err(e) = gw.recorder.append_async(&inputs).await {
            if gw.audit_fail_closed {
                tracing::error!(session = %tracker.log.id, error = %e, "audit event could not be written");
                // Keep the evidence of what was refused, and do not await answers to it.
                for (ev, input) in events.drain(..).zip(inputs) {
                    tracker.forget(ev.event.n);
                    gw.recorder
                        .record(event::refused(input, "audit_unavailable"));
                }
                return Err(Stop::Outcome(Outcome::AuditUnavailable));
            }
            tracing::error!(session = %tracker.log.id, error = %e, "audit event could not be written; forwarding anyway (audit_failure = open)");
        }
        events.clear();
    }
    if pos > 0 {
        let written = match splice.finish(buf, pos) {
            None => wr.write_all(&buf[..pos]).await,
            Some(out) => wr.write_all(&out).await,
        };
        let _ = buf.split_to(pos);
        if written.is_err() || wr.flush().await.is_err() {
            return Err(Stop::Outcome(Outcome::UpstreamLost));
        }
    }
    Ok(())
}

/// Applies the content detectors to a SQL text's values only (literals and comments, found by
/// PostgreSQL's scanner), so a mask can never hide keywords or a statement behind it.
fn redact_sql(text: &str, plan: &RowPlan) -> String {
    let mut out = Vec::new();
    let mask = |s: &str, out: &mut Vec<u8>| -> Option<String> {
        out.clear();
        match plan.mask_value(0, s.as_bytes(), out) {
            tollgate_mask::Outcome::Unchanged => None,
            tollgate_mask::Outcome::Masked(_) => Some(String::from_utf8_lossy(out).into_owned()),
            tollgate_mask::Outcome::Null(_) => Some("[REDACTED]".into()),
        }
    };
    // Nearly every text has nothing to mask: one pass over the whole of it tells.
    let Some(whole) = mask(text, &mut out) else {
        return text.to_string();
    };
    let Some(spans) = tollgate_policy::value_spans(text) else {
        // The scanner rejects it (an unterminated quote): it runs nothing the server can parse.
        return whole;
    };
    let mut shown = String::with_capacity(text.len());
    let mut at = 0;
    for span in spans {
        shown.push_str(&text[at..span.start]);
        let value = &text[span.clone()];
        match mask(value, &mut out) {
            Some(masked) => shown.push_str(&masked),
            None => shown.push_str(value),
        }
        at = span.end;
    }
    shown.push_str(&text[at..]);
    shown
}

/// Applies the resource's content detectors to a command event's text (its values only) and
/// parameters.
fn redact_command(ev: &mut event::Command, plan: &RowPlan) {
    let mut out = Vec::new();
    let mut mask = |v: &mut Value| {
        if let Some(s) = v.as_str() {
            out.clear();
            match plan.mask_value(0, s.as_bytes(), &mut out) {
                tollgate_mask::Outcome::Unchanged => {}
                tollgate_mask::Outcome::Masked(_) => {
                    *v = Value::String(String::from_utf8_lossy(&out).into_owned());
                }
                tollgate_mask::Outcome::Null(_) => *v = Value::from(REDACTED),
            }
        }
    };
    if let Some(text) = ev.text.as_mut() {
        let shown = redact_sql(text, plan);
        if shown != *text {
            *text = shown;
        }
    }
    if let Some(params) = ev.params.as_mut() {
        params.iter_mut().for_each(&mut mask);
    }
}

/// Make room for more of a large message whose header is already buffered: as its bytes
/// arrive (at most doubling what is buffered), never what its header merely claims, so a
/// 5-byte header cannot make the gateway hold `max_message_bytes` it was never sent.
fn reserve_for_next(buf: &mut BytesMut, limit: usize) {
    if let Ok(None) = next_frame(buf, limit) {
        if buf.len() >= 5 {
            let total = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
            let missing = total.saturating_sub(buf.len());
            buf.reserve(missing.min(buf.len().max(READ_BUF)));
            return;
        }
    }
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_BUF);
    }
}

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
    /// SQLSTATE and hint for a refusal other than a rule's (42501).
    hint: Option<(&'static str, &'static str)>,
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

/// SHA-256 of a simple query's full text: what a review approves and what every command
/// event records, whatever its size (see [`bound_digest`] for a portal).
fn digest(text: &str) -> String {
    digest_text(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// A portal's digest: over the full text's digest and the Bind's parameter section.
fn bound_digest(full: Option<&[u8; 32]>, values: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(full.map_or(&[0u8; 32][..], |f| &f[..]));
    ctx.update(&[0]);
    ctx.update(values);
    digest_text(ctx.finish().as_ref())
}

/// "sha256:" and the hex of a SHA-256 digest, in one allocation.
fn digest_text(d: &[u8]) -> String {
    let mut hexed = [0u8; 64];
    hex::encode_to_slice(d, &mut hexed).expect("a SHA-256 digest is 32 bytes");
    let mut s = String::with_capacity(7 + hexed.len());
    s.push_str("sha256:");
    s.push_str(std::str::from_utf8(&hexed).expect("hex is ASCII"));
    s
}

/// A Bind body after its portal and statement names.
fn bind_values(body: &[u8]) -> &[u8] {
    let mut at = 0;
    for _ in 0..2 {
        match body[at..].iter().position(|b| *b == 0) {
            Some(i) => at += i + 1,
            None => return &[],
        }
    }
    &body[at..]
}

/// Adds the judgement to a command event (decision, what dry-run rules would have done, and
/// the classification of what runs) and hands a refusal or hold back to the relay.
fn decided(
    ev: &mut event::Command,
    j: Judgement,
    policy: &ResourcePolicy,
    text: &str,
    classified: Option<Arc<str>>,
    out: &mut Judged,
) {
    let mut decision = j.decision.summary();
    if let Some(dry) = &j.dry_run {
        decision["dry_run"] = dry.summary();
        registry()
            .counter(
                "tollgate_policy_dry_run_total",
                "Commands a dry-run rule would have refused or held, by action.",
                &[("action", if dry.is_deny() { "deny" } else { "review" })],
            )
            .inc();
    }
    if j.opaque {
        decision["opaque"] = Value::Bool(true);
    }
    ev.decision = Some(decision);
    // Every command: what it is, in one line; refused or held ones: the full classification.
    if ev.digest.is_none() && !j.decision.is_allow() {
        // A refused or held simple query: reviews and reruns go by its digest.
        ev.digest = Some(digest(text));
    }
    let line = classified.unwrap_or_else(|| policy.classify(text).line());
    ev.classified = Some(line.to_string());
    out.may_change_settings = j.may_change_settings;
    if !j.decision.is_allow() {
        ev.classification = Some(policy.classify(text).summary().clone());
        registry()
            .counter(
                "tollgate_policy_decisions_total",
                "Commands refused or held by a rule, by action.",
                &[(
                    "action",
                    if j.decision.is_deny() {
                        "deny"
                    } else {
                        "review"
                    },
                )],
            )
            .inc();
        out.decision = Some(j.decision);
    }
}

/// Record what a client message asks for; `Ok(true)` when it is a command, whose event is
/// added to `events` (written before the batch is forwarded). Every request whose answer the
/// relay follows is queued (`ctx.track`); with `shapes` (the session filters responses), an
/// Execute of a portal whose shape nobody asked for gets a Describe sent before it.
#[allow(clippy::too_many_arguments)]
fn inspect_client(
    tag: u8,
    body: &[u8],
    prepared: &mut Prepared,
    tracker: &Tracker<'_>,
    events: &mut Vec<Stamped<event::Command>>,
    shapes: Option<&mut Option<Vec<u8>>>,
    ctx: &Inspect,
    mut policy: Option<PolicyArgs<'_, '_>>,
) -> Result<bool, Stop> {
    let malformed = |what: &str| Stop::Protocol(format!("malformed {what} message"));
    let track = ctx.track;
    if (track || policy.is_some()) && !frontend::names_are_utf8(tag, body) {
        // Prepared statements and portals are followed by name: two names that differ only in
        // bytes that are not UTF-8 must not read as one.
        return Err(Stop::Protocol(
            "statement and portal names must be valid UTF-8 through the gateway".into(),
        ));
    }
    let filtering = shapes.is_some();
    let (max_statements, max_portals) = ctx.limits;
    match tag {
        b'Q' => {
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
                                let full =
                                    ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
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
        b'P' => {
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
        b'B' => {
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
        b'D' => {
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
        b'E' => {
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
        b'F' => {
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
        b'S' => {
            if let Some((session, ..)) = policy.as_mut() {
                session.sync();
            }
            tracker.push(Kind::Sync {
                segment: ctx.segment,
            });
            Ok(false)
        }
        b'C' => {
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
        b'H' | b'd' | b'c' | b'f' | b'X' => Ok(false),
        other => Err(Stop::Protocol(format!(
            "unexpected message type {:?} from client",
            other as char
        ))),
    }
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
            if watch_dialect && f.tag == b'S' {
                let status = backend::parse_parameter_status(body).ok();
                if let Some(changed) =
                    status.and_then(|(name, value)| dialect_change(&name, &value))
                {
                    return Stop::Dialect(changed);
                }
            }
            if track && f.tag != b'A' && tracker.front_is(|k| matches!(k, Kind::CopyShape)) {
                // Answers to the gateway's own Describe of a COPY's source: kept, not forwarded.
                if let Some(flt) = filter.as_mut() {
                    let columns = match f.tag {
                        b'T' => Some(Some(body)),
                        b'n' | b'E' => Some(None),
                        _ => None,
                    };
                    if let Some(c) = columns {
                        if let Err(e) = flt.copy_columns(c) {
                            return Stop::Protocol(e);
                        }
                    }
                }
                if f.tag == b'Z' {
                    tracker.pop_if(|k| matches!(k, Kind::CopyShape));
                    tracker.ready.add();
                }
                splice.replace(&buf, pos, pos + f.total_len, &[]);
                pos += f.total_len;
                continue;
            }
            // The request this message answers, when it is one the relay follows.
            let answered = if track {
                answered(f.tag, tracker)
            } else {
                None
            };
            let denial = if f.tag == b'E' {
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
                account(b'E', &err[5..], tracker, &mut rows_since, filter.as_mut());
                Verdict::Replace(err)
            } else {
                match filter.as_mut() {
                    None => {
                        account(f.tag, body, tracker, &mut rows_since, None);
                        Verdict::Forward
                    }
                    Some(flt) => {
                        match filter_message(f.tag, body, tracker, flt, &mut rows_since, answered) {
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
fn dialect_change(name: &str, value: &str) -> Option<String> {
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

/// Pops the request a ParseComplete, BindComplete, CloseComplete, RowDescription or NoData
/// answers (which confirms it to the guardrails).
fn answered(tag: u8, tracker: &Tracker<'_>) -> Option<Kind> {
    match tag {
        b'1' => tracker.pop_if(|k| matches!(k, Kind::Parse { .. })),
        b'2' => tracker.pop_if(|k| matches!(k, Kind::Bind { .. })),
        b'3' => tracker.pop_if(|k| matches!(k, Kind::Close { .. })),
        b'T' | b'n' => tracker.pop_if(|k| matches!(k, Kind::Describe { .. })),
        _ => None,
    }
}

/// The audit bookkeeping of one backend message: rows, completions, errors, readiness.
fn account(
    tag: u8,
    body: &[u8],
    tracker: &Tracker<'_>,
    rows_since: &mut u64,
    mut filter: Option<&mut Filter>,
) {
    let mut extra = || filter.as_mut().and_then(|f| f.take_result_extra());
    let finished = match tag {
        b'D' => {
            *rows_since += 1;
            return;
        }
        b'C' => {
            let rows = backend::command_rows(body).unwrap_or(*rows_since);
            *rows_since = 0;
            tracker
                .complete(rows, backend::command_word(body))
                .map(|p| vec![(p, "ok")])
        }
        b'I' => tracker.complete(0, "EMPTY".into()).map(|p| vec![(p, "ok")]),
        b's' => {
            let rows = std::mem::take(rows_since);
            tracker
                .complete(rows, "SUSPENDED".into())
                .map(|p| vec![(p, "ok")])
        }
        b'E' => {
            let e = backend::parse_error(body).unwrap_or_default();
            *rows_since = 0;
            Some(tracker.error(e.code))
        }
        b'Z' => Some(tracker.ready(body.first().copied().unwrap_or(b'I'))),
        _ => None,
    };
    for (i, (p, outcome)) in finished.into_iter().flatten().enumerate() {
        tracker.emit(&p, outcome, if i == 0 { extra() } else { None });
    }
}

/// One backend message through the session's filter: keeps result shapes in step with the
/// requests they answer, masks, and drops the answers to the gateway's own Describes.
fn filter_message(
    tag: u8,
    body: &[u8],
    tracker: &Tracker<'_>,
    flt: &mut Filter,
    rows_since: &mut u64,
    answered: Option<Kind>,
) -> Result<Verdict, String> {
    let verdict = match tag {
        b'D' => {
            if !flt.has_current() {
                if let Some(Kind::Execute { portal, .. }) = tracker.front() {
                    flt.execute_rows(&portal);
                }
            }
            flt.data_row(body)?
        }
        b'T' | b'n' => match answered {
            Some(Kind::Describe {
                kind,
                name,
                injected,
            }) => {
                flt.described(kind, &name, (tag == b'T').then_some(body))?;
                if injected {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            }
            _ => {
                if tag == b'T' {
                    flt.row_description(body)?;
                }
                Verdict::Forward
            }
        },
        b'1' => {
            if let Some(Kind::Parse { name, .. }) = answered {
                flt.parsed(&name);
            }
            Verdict::Forward
        }
        b'2' => {
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
        b'3' => {
            if let Some(Kind::Close { kind, name, .. }) = answered {
                flt.closed(kind, &name);
            }
            Verdict::Forward
        }
        b'H' => {
            let hint = match tracker.front() {
                Some(Kind::Query { copy, .. } | Kind::Execute { copy, .. }) => copy,
                _ => None,
            };
            flt.copy_out(body, hint)?
        }
        b'd' => flt.copy_data(body)?,
        b'c' => flt.copy_done(),
        b'C' => {
            if flt.command_complete() {
                *rows_since = 0;
                if let Some(p) = tracker.refused("42501") {
                    let extra = flt.take_result_extra();
                    tracker.emit(&p, "refused", extra);
                }
                return Ok(Verdict::Drop);
            }
            Verdict::Forward
        }
        b'Z' => {
            if let Some(Kind::Query {
                redefines: true, ..
            }) = tracker.front()
            {
                flt.forget_statement_shapes();
            }
            Verdict::Forward
        }
        b'E' | b'N' => flt.error_or_notice(tag, body)?,
        b'A' => flt.notification(body)?,
        b'V' => flt.function_result(body)?,
        _ => Verdict::Forward,
    };
    if matches!(tag, b'C' | b'I' | b's' | b'E' | b'Z') {
        flt.result_done();
    }
    account(tag, body, tracker, rows_since, Some(flt));
    Ok(verdict)
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
fn redact_params(statement: &str, params: &[ParamValue]) -> Vec<Value> {
    if params.is_empty() {
        return Vec::new();
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
    params
        .iter()
        .map(|p| match p {
            ParamValue::Null => Value::Null,
            ParamValue::Binary(n) => Value::String(format!("<binary {n} bytes>")),
            ParamValue::Text(_) if sensitive_statement => Value::from(REDACTED),
            ParamValue::Text(t) if looks_secret(t) => Value::from(REDACTED),
            ParamValue::Text(t) => Value::String(clip(t, MAX_PARAM)),
        })
        .collect()
}

/// What a recorded value that may not be shown becomes.
const REDACTED: &str = "[REDACTED]";

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
    use serde_json::json;

    #[test]
    fn digests_bind_the_text_and_every_parameter_byte() {
        let full = [7u8; 32];
        let bind = |v: &[u8]| {
            let mut body = b"portal\0stmt\0".to_vec();
            body.extend_from_slice(v);
            bound_digest(Some(&full), bind_values(&body))
        };
        let nine = bind(b"\0\0\0\x01\0\0\0\x019");
        assert_eq!(nine, bind(b"\0\0\0\x01\0\0\0\x019"));
        assert_ne!(nine, bind(b"\0\0\0\x01\0\0\0\x018"));
        assert_ne!(
            nine,
            bound_digest(Some(&[8u8; 32]), b"\0\0\0\x01\0\0\0\x019")
        );
        assert!(nine.starts_with("sha256:") && nine.len() == 7 + 64);
        assert_eq!(bind_values(b"no terminator"), b"");
        assert_ne!(
            digest("DELETE FROM t WHERE id = 1"),
            digest("DELETE FROM t WHERE id = 2")
        );
    }

    #[test]
    fn values_are_masked_inside_literals_only() {
        let policy = tollgate_mask::Policy::from_specs(
            &[tollgate_mask::MaskSpec {
                detectors: vec!["pem_private_key".into(), "email".into()],
                strategy: "redact".into(),
                ..Default::default()
            }],
            None,
        )
        .unwrap();
        let plan = policy.text_plan(&[]);
        let sql = "SELECT '-----BEGIN RSA PRIVATE KEY-----' AS k; DELETE FROM t WHERE email = 'a@b.example'";
        let shown = redact_sql(sql, &plan);
        assert!(shown.contains("; DELETE FROM t WHERE email = "), "{shown}");
        assert!(!shown.contains("a@b.example"), "{shown}");
        assert!(!shown.contains("BEGIN RSA PRIVATE KEY"), "{shown}");
        assert_eq!(redact_sql("SELECT 1", &plan), "SELECT 1");
    }

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
    fn redaction() {
        let p = vec![
            ParamValue::Text("alice".into()),
            ParamValue::Text("hunter2".into()),
        ];
        assert_eq!(
            Value::Array(redact_params(
                "UPDATE users SET password = $2 WHERE name = $1",
                &p
            )),
            json!(["[REDACTED]", "[REDACTED]"])
        );
        assert_eq!(
            Value::Array(redact_params("SELECT * FROM t WHERE a = $1 AND b = $2", &p)),
            json!(["alice", "hunter2"])
        );
        let s = vec![
            ParamValue::Text("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc".into()),
            ParamValue::Text("AKIAIOSFODNN7EXAMPLE".into()),
            ParamValue::Binary(8),
            ParamValue::Null,
        ];
        assert_eq!(
            Value::Array(redact_params("SELECT $1, $2, $3, $4", &s)),
            json!(["[REDACTED]", "[REDACTED]", "<binary 8 bytes>", null])
        );
    }

    #[test]
    fn clipping_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h…[6 bytes]");
        assert_eq!(clip("abc", 5), "abc");
    }
}
