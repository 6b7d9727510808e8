//! Requests forwarded and not yet answered, in order, shared by the relay's two directions:
//! what each backend message answers, the guardrails' view it settles, and the `result` events
//! of finished commands.

use super::*;

/// A request whose answer the response direction still expects, in the order sent.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Kind {
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
    pub(super) fn is_command(&self) -> bool {
        matches!(self, Kind::Query { .. } | Kind::Execute { .. })
    }

    /// The guardrails' change this request carries: its own, or those of the command.
    pub(super) fn changes(&self) -> &[u64] {
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
pub(super) struct ReadyCount {
    pub(super) seen: AtomicU64,
    pub(super) waiting: std::sync::atomic::AtomicBool,
    pub(super) notify: tokio::sync::Notify,
}

impl ReadyCount {
    pub(super) fn add(&self) {
        self.seen.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    /// Resolves once `target` ReadyForQuery messages have been seen.
    pub(super) async fn reached(&self, target: u64) {
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
pub(super) enum Settled {
    Change(u64, Confirmation),
    /// ReadyForQuery outside a transaction after the Sync that closed this segment.
    Idle(u64),
}

pub(super) struct Pending {
    pub(super) n: u64,
    pub(super) kind: Kind,
    pub(super) started: Instant,
    pub(super) rows: u64,
    pub(super) tag: Option<String>,
    pub(super) error: Option<String>,
    /// The request was refused by the gateway: it was replaced upstream by a statement that
    /// fails, and the client gets this ErrorResponse instead of that failure.
    pub(super) denial: Option<Vec<u8>>,
}

impl Pending {
    pub(super) fn settle(&self, how: Confirmation, out: &mut Vec<Settled>) {
        for &seq in self.kind.changes() {
            out.push(Settled::Change(seq, how));
        }
    }
}

/// Requests forwarded and not yet answered, in order; shared by the two directions. Finished
/// commands are handed back to the response direction, which records their results.
pub(super) struct Tracker<'a> {
    pub(super) pending: Mutex<VecDeque<Pending>>,
    pub(super) next: AtomicU64,
    pub(super) log: &'a SessionLog,
    /// Result events not yet journaled: the response direction records them once the answer
    /// they describe is on its way to the client (off the round trip's critical path, and in
    /// one journal append per batch of answers); every other path flushes them first.
    pub(super) results: Mutex<Vec<CommandResult>>,
    /// Answers that settle the guardrails' view (prepared statements, portals).
    pub(super) settled: Mutex<Vec<Settled>>,
    /// `settled` is not empty (read without the lock, for every client message).
    pub(super) has_settled: std::sync::atomic::AtomicBool,
    /// ReadyForQuery messages seen so far, each after the ParameterStatus before it was checked.
    pub(super) ready: ReadyCount,
}

pub(super) type Finished = Vec<(Pending, &'static str)>;

impl Tracker<'_> {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, kind: Kind) -> u64 {
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
    pub(super) fn deny(&self, n: u64, error: Vec<u8>) {
        let mut q = self.lock();
        if let Some(p) = q.iter_mut().rev().find(|p| p.n == n && p.kind.is_command()) {
            p.denial = Some(error);
        }
    }

    /// The request queued last (a Parse) was refused: its answer becomes `error`.
    pub(super) fn deny_last(&self, error: Vec<u8>) {
        if let Some(p) = self.lock().back_mut() {
            p.denial = Some(error);
        }
    }

    /// The ErrorResponse to send for the oldest request, when the gateway refused it.
    pub(super) fn take_denial(&self) -> Option<Vec<u8>> {
        // Only when the request is next: otherwise the error answers an earlier request.
        self.lock().front_mut().and_then(|p| p.denial.take())
    }

    pub(super) fn settle(&self, mut settled: Vec<Settled>) {
        if !settled.is_empty() {
            self.settled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut settled);
            self.has_settled.store(true, Ordering::Release);
        }
    }

    /// The server answered `p`: its changes took effect.
    pub(super) fn confirm(&self, p: &Pending) {
        if !p.kind.changes().is_empty() {
            let mut settled = Vec::new();
            p.settle(Confirmation::Done, &mut settled);
            self.settle(settled);
        }
    }

    /// What the server settled since the last call.
    pub(super) fn take_settled(&self) -> Vec<Settled> {
        if !self.has_settled.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *self.settled.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn emit(&self, p: &Pending, outcome: &'static str, extra: Option<ResultExtra>) {
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
            error_code: None,
            message: None,
        };
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// Journals the result events emitted so far, in the order they were emitted.
    pub(super) fn flush_results(&self) {
        let results = std::mem::take(&mut *self.results.lock().unwrap_or_else(|e| e.into_inner()));
        self.log.record_results(results.into_iter());
    }

    /// Whether the oldest request still waiting for its answer is of this kind.
    pub(super) fn front_is(&self, kind: impl Fn(&Kind) -> bool) -> bool {
        self.lock().front().is_some_and(|p| kind(&p.kind))
    }

    /// The oldest request still waiting for its answer.
    pub(super) fn front(&self) -> Option<Kind> {
        self.lock().front().map(|p| p.kind.clone())
    }

    /// Removes the oldest request when it is of the kind a response answers (which confirms it).
    pub(super) fn pop_if(&self, answers: impl Fn(&Kind) -> bool) -> Option<Kind> {
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
    pub(super) fn complete(&self, rows: u64, tag: String) -> Option<Pending> {
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
    pub(super) fn refused(&self, code: &str) -> Option<Pending> {
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
    pub(super) fn error(&self, code: String) -> Finished {
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
    pub(super) fn ready(&self, status: u8) -> Finished {
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
    pub(super) fn forget(&self, n: u64) {
        let mut q = self.lock();
        if let Some(i) = q.iter().position(|p| p.n == n && p.kind.is_command()) {
            q.truncate(i);
        }
    }

    /// At the end of a session: every command still waiting for its answer is recorded as
    /// interrupted; returns whether there was one.
    pub(super) fn interrupt_pending(&self) -> bool {
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

/// Pops the request a ParseComplete, BindComplete, CloseComplete, RowDescription or NoData
/// answers (which confirms it to the guardrails).
pub(super) fn answered(msg: ServerMsg, tracker: &Tracker<'_>) -> Option<Kind> {
    match msg {
        ServerMsg::ParseComplete => tracker.pop_if(|k| matches!(k, Kind::Parse { .. })),
        ServerMsg::BindComplete => tracker.pop_if(|k| matches!(k, Kind::Bind { .. })),
        ServerMsg::CloseComplete => tracker.pop_if(|k| matches!(k, Kind::Close { .. })),
        ServerMsg::RowDescription | ServerMsg::NoData => {
            tracker.pop_if(|k| matches!(k, Kind::Describe { .. }))
        }
        _ => None,
    }
}

/// The audit bookkeeping of one backend message: rows, completions, errors, readiness.
pub(super) fn account(
    msg: ServerMsg,
    body: &[u8],
    tracker: &Tracker<'_>,
    rows_since: &mut u64,
    mut filter: Option<&mut Filter>,
) {
    let mut extra = || filter.as_mut().and_then(|f| f.take_result_extra());
    let finished = match msg {
        ServerMsg::DataRow => {
            *rows_since += 1;
            return;
        }
        ServerMsg::CommandComplete => {
            let rows = backend::command_rows(body).unwrap_or(*rows_since);
            *rows_since = 0;
            tracker
                .complete(rows, backend::command_word(body))
                .map(|p| vec![(p, "ok")])
        }
        ServerMsg::EmptyQueryResponse => {
            tracker.complete(0, "EMPTY".into()).map(|p| vec![(p, "ok")])
        }
        ServerMsg::PortalSuspended => {
            let rows = std::mem::take(rows_since);
            tracker
                .complete(rows, "SUSPENDED".into())
                .map(|p| vec![(p, "ok")])
        }
        ServerMsg::ErrorResponse => {
            let e = backend::parse_error(body).unwrap_or_default();
            *rows_since = 0;
            Some(tracker.error(e.code))
        }
        ServerMsg::ReadyForQuery => Some(tracker.ready(body.first().copied().unwrap_or(b'I'))),
        _ => None,
    };
    for (i, (p, outcome)) in finished.into_iter().flatten().enumerate() {
        tracker.emit(&p, outcome, if i == 0 { extra() } else { None });
    }
}
