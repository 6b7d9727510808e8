//! A command held for review: what reviewers are shown, opening the review, and waiting for
//! its decision (or the client's cancel or disconnection, which withdraws it).

use super::*;

/// What a reviewer is shown for a held command: its full text (values masked, never its
/// structure), the bound parameters (secrets redacted), what a prepared name runs, and the
/// digest an approval binds to.
pub(super) fn review_text(
    msg: ClientMsg,
    body: &[u8],
    prepared: &Prepared,
    session: &SessionPolicy,
    event: Option<&event::Command>,
    redact: Option<&RowPlan>,
) -> String {
    let original = statement_of(msg, body, prepared);
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
    if msg == ClientMsg::Query {
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
pub(super) struct Ask {
    pub(super) n: u64,
    /// The statement as recorded (content detectors applied), for reviewers.
    pub(super) shown: String,
    /// SHA-256 of the statement as the client sent it (an approval survives a restart by it).
    pub(super) sha256: String,
    pub(super) rule: String,
    pub(super) approvers: Vec<String>,
    pub(super) min_approvals: u32,
    pub(super) timeout: std::time::Duration,
}

pub(super) enum Held {
    Run,
    Refuse(CommandRefusal),
    ClientGone,
}

/// The text a held message runs: a Query's SQL, or an Execute's prepared statement.
pub(super) fn statement_of(msg: ClientMsg, body: &[u8], prepared: &Prepared) -> String {
    match msg {
        ClientMsg::Query => frontend::parse_query(body).unwrap_or_default(),
        ClientMsg::Execute => frontend::parse_execute(body)
            .ok()
            .and_then(|e| prepared.portals.get(&e.portal))
            .map(|p| p.text.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Opens the review of a held command (`Err` when it runs or is refused without one: an
/// approval of the same statement kept from before a restart, or no review service).
pub(super) fn open_review<CW>(
    g: &Guard<'_, CW>,
    tracker: &Tracker<'_>,
    ask: &Ask,
) -> Result<Review, Held> {
    let Some(reviews) = g.reviews.as_ref() else {
        return Err(Held::Refuse(CommandRefusal::NoReviewService {
            rule: ask.rule.clone(),
        }));
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
            });
            Err(Held::Run)
        }
        Ok(Opened::Pending(r)) => Ok(r),
        Err(e) => {
            tracing::error!(session = %tracker.log.id, error = %e, "could not open a review");
            Err(Held::Refuse(CommandRefusal::ReviewNotOpened))
        }
    }
}

/// Tells the client its command is held, then waits for the decision, the deadline, a cancel
/// or the client's disconnection (which withdraws the review).
#[allow(clippy::too_many_arguments)]
pub(super) async fn await_review<R, CW>(
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
    let (outcome, refusal) = match verdict {
        ReviewVerdict::Approved { reviewers } => {
            tracker.log.record(&ReviewEvent {
                kind: "review.approved",
                n: ask.n,
                review: review.id.clone(),
                reviewers,
                waited_ms: Some(waited_ms),
            });
            return Held::Run;
        }
        ReviewVerdict::Denied { reviewer, reason } => (
            "denied",
            CommandRefusal::ReviewDenied {
                review: review.id.clone(),
                reviewer,
                reason,
            },
        ),
        ReviewVerdict::Expired => (
            "expired",
            CommandRefusal::ReviewExpired {
                review: review.id.clone(),
                timeout: tollgate_review::format_duration(ask.timeout),
            },
        ),
        ReviewVerdict::Withdrawn => ("withdrawn", CommandRefusal::Withdrawn),
        ReviewVerdict::Unavailable(e) => {
            tracing::error!(session = %tracker.log.id, review = %review.id, error = %e, "review unavailable");
            (
                "unavailable",
                CommandRefusal::ReviewUnreadable {
                    review: review.id.clone(),
                },
            )
        }
    };
    tracker.log.record(&ReviewRefused {
        n: ask.n,
        review: review.id.clone(),
        outcome,
        waited_ms,
    });
    Held::Refuse(refusal)
}
