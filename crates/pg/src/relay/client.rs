//! The client-to-upstream direction: each message the client sends is checked against the
//! pipeline and pooling state, inspected (tracked, recorded, judged), refused with a stand-in,
//! held for review, or forwarded; a command that may change how SQL reads is settled before
//! anything after it is read.

use super::*;
use crate::proto::Frame;

/// What one message leaves the batch to do.
enum Next {
    /// Read the next message.
    Continue,
    /// Forward the valid messages before this one, then end the session.
    EndBatch(Stop),
    /// End the session now.
    Return(Stop),
}

/// What the guardrails made of a command before any hold.
enum Judgement {
    /// Forward it (`None`) or refuse it.
    Done(Option<CommandRefusal>),
    /// Hold it for review.
    Hold(Ask),
}

/// The client-to-upstream direction's state between messages.
struct ClientLoop<'s, 'a, 'g, CW> {
    side: &'s ClientSide<'a>,
    guard: Option<Guard<'g, CW>>,
    prepared: Prepared,
    events: Vec<Stamped<event::Command>>,
    splice: Splice,
    /// ReadyForQuery messages the requests forwarded so far will bring (one per Query,
    /// FunctionCall and Sync).
    boundaries: u64,
    /// Syncs so far: the current pipeline segment.
    segment: u64,
    /// A command of the current pipeline may change settings: nothing is parsed until its Sync.
    risky_pipeline: bool,
}

pub(super) async fn client_to_upstream<R, W, CW>(
    side: &ClientSide<'_>,
    rd: &mut R,
    wr: &mut W,
    guard: Option<Guard<'_, CW>>,
) -> Stop
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let limit = side.gw.max_message;
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut st = ClientLoop {
        side,
        guard,
        prepared: Prepared::default(),
        events: Vec::new(),
        splice: Splice::default(),
        boundaries: 0,
        segment: 0,
        risky_pipeline: false,
    };
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Stop::Outcome(Outcome::ClientGone),
            Ok(n) => {
                side.bytes.fetch_add(n as u64, Ordering::Relaxed);
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
            match st.on_message(f, rd, wr, &mut buf, &mut pos).await {
                Next::Continue => {}
                Next::EndBatch(s) => {
                    stop = Some(s);
                    break;
                }
                Next::Return(s) => return s,
            }
        }
        if let Err(stop) = st.forward(wr, &mut buf, pos).await {
            return stop;
        }
        if let Some(stop) = stop {
            return stop;
        }
        reserve_for_next(&mut buf, limit);
    }
}

impl<CW: AsyncWrite + Unpin> ClientLoop<'_, '_, '_, CW> {
    /// One message, `f` at `buf[*pos..]`; `*pos` moves past it when it is to be forwarded
    /// (and back to 0 when the batch so far was forwarded meanwhile).
    async fn on_message<R, W>(
        &mut self,
        f: Frame,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        pos: &mut usize,
    ) -> Next
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let side = self.side;
        self.absorb_settled();
        let msg = f.client();
        let body = f.body(&buf[*pos..]);
        if let Some((reason, refusal)) = self.parse_refusal(msg, body) {
            let end = *pos + f.total_len;
            self.refuse_parse(reason, refusal, body, buf, *pos, end);
            *pos = end;
            return Next::Continue;
        }
        let (inject, mut judged) = match self.inspect(msg, body) {
            Ok(inspected) => inspected,
            Err(stop) => return Next::EndBatch(stop),
        };
        if let Some(e) = judged.limit.take() {
            return Next::EndBatch(Stop::Limit(e));
        }
        self.count_boundaries(msg, inject.is_some());
        self.deny_in_unsettled_pipeline(msg, &mut judged);
        let n = self.events.last().map_or(0, |e| e.event.n);
        let pool_refusal = self.pool_refusal(msg, body);
        let refusal = match self.judge(msg, body, n, &mut judged, pool_refusal) {
            Judgement::Done(refusal) => refusal,
            Judgement::Hold(ask) => match self.hold(&ask, rd, wr, buf, pos).await {
                Ok(refusal) => refusal,
                Err(stop) => return Next::Return(stop),
            },
        };
        let end = *pos + f.total_len;
        let refused = refusal.is_some();
        self.splice_answer(buf, *pos, end, msg, n, refusal, inject);
        *pos = end;
        if msg == ClientMsg::Terminate {
            return Next::EndBatch(Stop::Outcome(Outcome::Closed));
        }
        if self.settle_now(msg, &judged, refused) {
            if let Err(stop) = self.forward(wr, buf, *pos).await {
                return Next::Return(stop);
            }
            *pos = 0;
            let settled = await_settled(
                side.tracker,
                rd,
                wr,
                buf,
                side.bytes,
                side.gw.max_message,
                self.boundaries,
            )
            .await;
            if let Err(stop) = settled {
                return Next::Return(stop);
            }
        }
        Next::Continue
    }

    /// What the server settled since: prepared statements, portals, finished pipelines.
    fn absorb_settled(&mut self) {
        for settled in self.side.tracker.take_settled() {
            if let Settled::Idle(seg) = settled {
                self.prepared.portals.retain(|_, p| p.segment > seg);
            }
            if let Some(g) = self.guard.as_mut() {
                match settled {
                    Settled::Change(seq, how) => g.session.confirm(seq, how),
                    Settled::Idle(seg) => g.session.idle(seg),
                }
            }
        }
    }

    /// A Parse refused before it is inspected, and the reason its event gives.
    fn parse_refusal(&self, msg: ClientMsg, body: &[u8]) -> Option<(&'static str, CommandRefusal)> {
        if msg != ClientMsg::Parse {
            None
        } else if self.guard.is_some() && self.risky_pipeline {
            // The server parses this after a command that may have changed how SQL reads,
            // before the gateway can see the outcome: refused.
            Some(("unsettled_pipeline", CommandRefusal::UnsettledPipeline))
        } else if self.side.transaction_pooled {
            frontend::parse_parse(body)
                .ok()
                .and_then(|p| tollgate_policy::session_state(&p.query))
                .map(|st| ("pool_mode", CommandRefusal::PoolMode(st.what())))
        } else {
            None
        }
    }

    fn refuse_parse(
        &mut self,
        reason: &'static str,
        refusal: CommandRefusal,
        body: &[u8],
        buf: &[u8],
        pos: usize,
        end: usize,
    ) {
        let tracker = self.side.tracker;
        // Always queued: the client's answer is the refusal, not the stand-in's error.
        let name = frontend::parse_parse(body)
            .map(|p| p.statement)
            .unwrap_or_default();
        tracker.push(Kind::Parse { name, seq: None });
        tracker.deny_last(refusal.error());
        tracker.log.record(&StatementRefused {
            reason,
            protocol: "extended",
        });
        self.splice
            .replace(buf, pos, end, &failing_stand_in(ClientMsg::Execute));
    }

    /// Tracks, records and judges the message: the Describe to send before it (when its
    /// result shape must be learned) and what the guardrails decided.
    fn inspect(&mut self, msg: ClientMsg, body: &[u8]) -> Result<(Option<Vec<u8>>, Judged), Stop> {
        let side = self.side;
        let mut inject = None;
        let mut judged = Judged::default();
        let ctx = Inspect {
            track: side.track,
            copy_columns: side.copy_columns,
            segment: self.segment,
            limits: side.limits,
        };
        let command = inspect_client(
            msg,
            body,
            &mut self.prepared,
            side.tracker,
            &mut self.events,
            side.shapes.then_some(&mut inject),
            &ctx,
            self.guard.as_mut().map(|g| {
                let who = Caller {
                    subject: g.subject,
                    groups: g.groups,
                };
                (&mut g.session, g.policy, who, &mut judged)
            }),
        )?;
        if command {
            side.commands.inc();
            if let (Some(plan), Some(ev)) = (side.redact, self.events.last_mut()) {
                redact_command(&mut ev.event, plan);
            }
        }
        Ok((inject, judged))
    }

    fn count_boundaries(&mut self, msg: ClientMsg, injected: bool) {
        if matches!(
            msg,
            ClientMsg::Query | ClientMsg::FunctionCall | ClientMsg::Sync
        ) {
            self.boundaries += 1;
        }
        if msg == ClientMsg::Query && injected {
            // The Sync of the gateway's own COPY shape request.
            self.boundaries += 1;
        }
        if msg == ClientMsg::Sync {
            self.segment += 1;
        }
    }

    /// A simple Query after a pipelined command that may change settings is refused.
    fn deny_in_unsettled_pipeline(&self, msg: ClientMsg, judged: &mut Judged) {
        if self.guard.is_some()
            && self.risky_pipeline
            && msg == ClientMsg::Query
            && judged.decision.is_none()
        {
            judged.decision = Some(Decision::Deny {
                rule: "sql_safety".into(),
                message: UNSETTLED_PIPELINE.into(),
            });
            judged.unsettled = true;
        }
    }

    /// `pool_mode = "transaction"`: a simple Query that would leave session state behind.
    fn pool_refusal(&self, msg: ClientMsg, body: &[u8]) -> Option<CommandRefusal> {
        let refusal = (self.side.transaction_pooled && msg == ClientMsg::Query)
            .then(|| frontend::parse_query(body).ok())
            .flatten()
            .and_then(|text| tollgate_policy::session_state(&text))
            .map(|st| CommandRefusal::PoolMode(st.what()));
        if refusal.is_some() {
            self.side.tracker.log.record(&StatementRefused {
                reason: "pool_mode",
                protocol: "simple",
            });
        }
        refusal
    }

    fn judge(
        &self,
        msg: ClientMsg,
        body: &[u8],
        n: u64,
        judged: &mut Judged,
        pool_refusal: Option<CommandRefusal>,
    ) -> Judgement {
        if pool_refusal.is_some() {
            judged.decision = None;
            return Judgement::Done(pool_refusal);
        }
        let refusal = match judged.decision.take() {
            None | Some(Decision::Allow { .. }) => None,
            Some(Decision::Deny { .. }) if judged.unsettled => {
                Some(CommandRefusal::UnsettledPipeline)
            }
            Some(Decision::Deny { message, .. }) => Some(CommandRefusal::Rule(message)),
            Some(Decision::Review {
                rule,
                approvers,
                min_approvals,
                timeout,
            }) => {
                let g = self.guard.as_ref().expect("a decision comes from a guard");
                let event = self.events.last().map(|e| &e.event);
                return Judgement::Hold(Ask {
                    n,
                    shown: review_text(
                        msg,
                        body,
                        &self.prepared,
                        &g.session,
                        event,
                        self.side.redact,
                    ),
                    sha256: event
                        .and_then(|e| e.digest.as_deref())
                        .map(|d| d.trim_start_matches("sha256:").to_string())
                        .unwrap_or_default(),
                    rule,
                    approvers,
                    min_approvals,
                    timeout,
                });
            }
        };
        Judgement::Done(refusal)
    }

    /// Holds the command for review: opens it, forwards everything before it, and waits for
    /// the verdict. `Ok(None)`: run it.
    async fn hold<R, W>(
        &mut self,
        ask: &Ask,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        pos: &mut usize,
    ) -> Result<Option<CommandRefusal>, Stop>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let side = self.side;
        let g = self.guard.as_ref().expect("a decision comes from a guard");
        let review = match open_review(g, side.tracker, ask) {
            Err(Held::Run) => return Ok(None),
            Err(Held::Refuse(r)) => return Ok(Some(r)),
            Err(Held::ClientGone) => return Err(Stop::Outcome(Outcome::ClientGone)),
            Ok(review) => review,
        };
        if let Some(ev) = self.events.last_mut() {
            ev.event.review = Some(review.id.clone());
        }
        // Everything before the held command goes upstream now, with the events (the held
        // command's too: it is recorded before it waits).
        self.forward(wr, buf, *pos).await?;
        *pos = 0;
        let g = self.guard.as_ref().expect("a decision comes from a guard");
        let limit = side.gw.max_message;
        match await_review(g, side.tracker, rd, buf, side.bytes, limit, ask, &review).await {
            Held::Run => Ok(None),
            Held::Refuse(r) => Ok(Some(r)),
            Held::ClientGone => Err(Stop::Outcome(Outcome::ClientGone)),
        }
    }

    /// Replaces the message at `buf[pos..end]` with its stand-in when refused, and puts the
    /// gateway's Describe before it when one was made.
    #[allow(clippy::too_many_arguments)]
    fn splice_answer(
        &mut self,
        buf: &[u8],
        pos: usize,
        end: usize,
        msg: ClientMsg,
        n: u64,
        refusal: Option<CommandRefusal>,
        inject: Option<Vec<u8>>,
    ) {
        if let Some(refusal) = refusal {
            // A Describe queued for this Execute still goes first: its answer is expected.
            let mut with = inject.unwrap_or_default();
            with.extend_from_slice(&failing_stand_in(msg));
            self.splice.replace(buf, pos, end, &with);
            self.side.tracker.deny(n, refusal.error());
        } else if let Some(describe) = inject {
            let mut with = describe;
            with.extend_from_slice(&buf[pos..end]);
            self.splice.replace(buf, pos, end, &with);
        }
    }

    /// A command that may change a setting the parser depends on: nothing after it is read
    /// until the server's answer (and its ParameterStatus) has been checked. In a pipeline, the
    /// wait is at its Sync, and no statement may be parsed before it.
    fn settle_now(&mut self, msg: ClientMsg, judged: &Judged, refused: bool) -> bool {
        match msg {
            ClientMsg::Query | ClientMsg::FunctionCall => judged.may_change_settings && !refused,
            ClientMsg::Execute => {
                self.risky_pipeline |= judged.may_change_settings && !refused;
                false
            }
            ClientMsg::Sync => std::mem::take(&mut self.risky_pipeline),
            _ => false,
        }
    }

    /// Sends `buf[..pos]` (as spliced) upstream, after writing the events of its commands.
    async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        buf: &mut BytesMut,
        pos: usize,
    ) -> Result<(), Stop> {
        let side = self.side;
        forward(
            side.gw,
            side.tracker,
            wr,
            buf,
            &mut self.splice,
            pos,
            &mut self.events,
        )
        .await
    }
}
