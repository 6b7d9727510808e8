//! The review hold: a command a rule sends to review is held until enough approvers decide,
//! its deadline passes or its client goes away (which withdraws the review). An approval binds
//! to the command's digest: the identical command by the same principal may run once more
//! within the rerun window (a client that gave up waiting, or a gateway restart).

use std::future::Future;
use std::time::Duration;
use tollgate_identity::Principal;
use tollgate_review::{NewReview, Review, ReviewError, ReviewKind, Reviewer, Reviews, Verdict};

/// How a hold ended.
pub type HoldOutcome = Verdict;

/// A command to hold.
pub struct HoldRequest<'a> {
    pub session_id: &'a str,
    pub resource: &'a str,
    /// Who asked: readable subject and groups, and the principal reviews compare by.
    pub subject: &'a str,
    pub groups: &'a [String],
    pub principal: &'a Principal,
    pub rule: &'a str,
    /// What the reviewer reads (already redacted by the adapter).
    pub shown: String,
    /// Hex SHA-256 of everything the approval binds to.
    pub digest: String,
    pub approvers: &'a [String],
    pub min_approvals: u32,
    pub timeout: Duration,
}

/// What opening a hold gave.
pub enum Opened {
    /// The same principal's identical command was approved within the rerun window: run it.
    Rerun(Review),
    /// A new review is pending.
    Pending(Review),
}

/// Open the review of a held command, or take a still-valid approval of the identical command.
pub fn open(
    reviews: &Reviews,
    req: HoldRequest<'_>,
    rerun_window: Duration,
) -> Result<Opened, ReviewError> {
    if let Some(r) =
        reviews.take_approved_rerun_by(req.principal, req.resource, &req.digest, rerun_window)
    {
        return Ok(Opened::Rerun(r));
    }
    let new = NewReview {
        kind: ReviewKind::Command,
        session_id: Some(req.session_id.to_string()),
        resource: req.resource.to_string(),
        requester: Reviewer {
            subject: req.subject.to_string(),
            groups: req.groups.to_vec(),
        },
        rule: Some(req.rule.to_string()),
        statement: Some(req.shown),
        statement_sha256: Some(req.digest),
        approvers: req.approvers.to_vec(),
        min_approvals: req.min_approvals,
        timeout: req.timeout,
        reason: None,
        access_for: None,
    };
    reviews.request_by(new, req.principal).map(Opened::Pending)
}

/// Wait for the decision on `review`; when `withdrawn` completes first (the client went away
/// or cancelled), the review is withdrawn with the reason it gives.
pub async fn hold(
    reviews: &Reviews,
    review: &str,
    withdrawn: impl Future<Output = String>,
) -> HoldOutcome {
    tokio::select! {
        v = reviews.wait(review) => v,
        why = withdrawn => {
            reviews.withdraw_because(review, &why);
            Verdict::Withdrawn
        }
    }
}
