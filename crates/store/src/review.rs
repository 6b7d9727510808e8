//! Review (approval) rows as the store keeps them. The lifecycle rules live in
//! `tollgate-review`; the store only guarantees that a decision is made once, atomically.

/// Status of a review that still waits for reviewers.
pub const REVIEW_PENDING: &str = "pending";
pub const REVIEW_APPROVED: &str = "approved";
pub const REVIEW_DENIED: &str = "denied";
pub const REVIEW_EXPIRED: &str = "expired";
pub const REVIEW_WITHDRAWN: &str = "withdrawn";

/// Kind of a review that holds a command (SQL statement, HTTP request, tool call).
pub const REVIEW_KIND_COMMAND: &str = "command";
/// Kind of a review that grants just-in-time access to a resource.
pub const REVIEW_KIND_ACCESS: &str = "access";
/// Kind of a review that grants a view of a resource with its masking switched off.
pub const REVIEW_KIND_UNMASK: &str = "unmask";
/// Kind of a review that approves an MCP tool's changed definition (its new pin).
pub const REVIEW_KIND_PIN: &str = "pin";

/// Kinds whose approval is a time-bounded grant (kept until `grant_until_unix_ms`).
pub fn grants(kind: &str) -> bool {
    kind == REVIEW_KIND_ACCESS || kind == REVIEW_KIND_UNMASK
}

/// A review, with its votes and (for an approved access or unmask review) its grant.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReviewRecord {
    pub id: String,
    /// `command` (a held statement), `access` (just-in-time access to a resource) or `unmask`
    /// (the resource seen without masking for a while).
    pub kind: String,
    pub session_id: Option<String>,
    pub resource: String,
    /// Who asked, as people read it (the credential's subject or principal name).
    pub requester: String,
    /// Who asked, for comparisons: the canonical principal (`cert:cn:alice`, `token:ci-bot`,
    /// a mapped name). None for a caller that did not say (and reviews from before principals),
    /// whose requester is then compared by `requester`.
    pub requester_principal: Option<String>,
    pub requester_groups: Vec<String>,
    pub rule: Option<String>,
    /// Already redacted and clipped by the caller.
    pub statement: Option<String>,
    pub statement_sha256: Option<String>,
    /// Groups whose members may approve (admins may approve any review).
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    /// Why the requester asks.
    pub request_reason: Option<String>,
    /// For an access or unmask review: how long the grant is asked for.
    pub access_ms: Option<i64>,
    pub status: String,
    pub created_at_unix_ms: i64,
    /// A pending review expires at this time.
    pub expires_at_unix_ms: i64,
    pub decided_at_unix_ms: Option<i64>,
    /// Who made the final decision (the denier, or the approver whose vote reached the quorum).
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    /// When an approved command review was consumed (by its held session or a rerun).
    pub used_at_unix_ms: Option<i64>,
    /// For an approved access or unmask review: when the grant ends.
    pub grant_until_unix_ms: Option<i64>,
    pub votes: Vec<VoteRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VoteRecord {
    pub reviewer: String,
    /// The reviewer's principal: one vote per principal (see [`ReviewRecord::requester_principal`]).
    pub principal: String,
    pub groups: Vec<String>,
    pub approve: bool,
    pub reason: Option<String>,
    pub at_unix_ms: i64,
}

/// A vote to record with [`crate::Store::review_vote`].
#[derive(Clone, Debug)]
pub struct ReviewVote {
    pub review_id: String,
    /// Shown as who voted.
    pub reviewer: String,
    /// Compared: a principal votes once and never on its own request.
    pub principal: String,
    pub groups: Vec<String>,
    pub approve: bool,
    pub reason: Option<String>,
    pub at_unix_ms: i64,
}

/// What a vote did. Everything but `Recorded` left the review unchanged, except `Expired`,
/// which is this call moving a review past its deadline to `expired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoteOutcome {
    /// The vote counted; the record shows whether it decided the review.
    Recorded(ReviewRecord),
    NotFound,
    NotPending(String),
    /// The deadline had passed: this call marked it expired.
    Expired(ReviewRecord),
    SelfApproval,
    AlreadyVoted,
}

/// Which reviews to list: newest first.
#[derive(Clone, Debug, Default)]
pub struct ReviewFilter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub resource: Option<String>,
    pub requester: Option<String>,
    pub limit: Option<usize>,
}

/// Whose grants or approved reruns to look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requester<'a> {
    /// Reviews that recorded this requester principal ([`ReviewRecord::requester_principal`]).
    Principal(&'a str),
    /// Reviews whose requester subject is this string, whatever credential asked: for callers
    /// that know no principal (a token and a certificate of the same name both match).
    Subject(&'a str),
}

/// What an approved access or unmask review grants, until `until_unix_ms`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GrantRecord {
    pub review_id: String,
    /// The kind of the review that granted it: `access` or `unmask`.
    pub kind: String,
    pub subject: String,
    pub resource: String,
    pub granted_at_unix_ms: i64,
    pub until_unix_ms: i64,
}

/// A review changed state in the store: decided, expired, withdrawn, or its grant revoked.
/// Sent by a store that can tell (PostgreSQL's LISTEN/NOTIFY) to every process sharing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewChange {
    pub review_id: String,
    /// The review's grant was revoked (sessions holding it must re-check at once).
    pub revoked: bool,
}

impl ReviewChange {
    /// The NOTIFY payload: `d:<id>` (decided or closed) or `r:<id>` (grant revoked).
    pub fn to_payload(&self) -> String {
        format!(
            "{}:{}",
            if self.revoked { 'r' } else { 'd' },
            self.review_id
        )
    }

    pub fn from_payload(payload: &str) -> Option<ReviewChange> {
        let (kind, id) = payload.split_once(':')?;
        let revoked = match kind {
            "r" => true,
            "d" => false,
            _ => return None,
        };
        Some(ReviewChange {
            review_id: id.to_string(),
            revoked,
        })
    }
}

/// Why `v` cannot count on the pending review `rec` (self-approval, a second vote of one
/// principal), if it cannot: both stores apply this inside the vote's transaction.
pub(crate) fn vote_refused(rec: &ReviewRecord, v: &ReviewVote) -> Option<VoteOutcome> {
    let own = match &rec.requester_principal {
        Some(p) => *p == v.principal,
        None => rec.requester == v.reviewer,
    };
    if own {
        return Some(VoteOutcome::SelfApproval);
    }
    if rec.votes.iter().any(|x| x.principal == v.principal) {
        return Some(VoteOutcome::AlreadyVoted);
    }
    None
}

/// The status `v` decides `rec` to, if it decides it: one deny, or the `min_approvals`-th
/// distinct approval (`rec.votes` are the votes before this one).
pub(crate) fn vote_decides(rec: &ReviewRecord, v: &ReviewVote) -> Option<&'static str> {
    let approvals = rec.votes.iter().filter(|x| x.approve).count() as u32 + 1;
    if !v.approve {
        Some(REVIEW_DENIED)
    } else if approvals >= rec.min_approvals.max(1) {
        Some(REVIEW_APPROVED)
    } else {
        None
    }
}

/// The review columns both stores read (same names and order in SQLite and PostgreSQL), and
/// the join that brings a grant's end.
pub(crate) const COLUMNS: &str =
    "r.id, r.kind, r.session_id, r.resource, r.requester, r.rule, r.statement, \
     r.statement_sha256, r.min_approvals, r.access_ms, r.status, r.created_at, r.expires_at, \
     r.decided_at, r.decided_by, r.reason, r.used_at, r.payload, g.until, r.requester_principal";
pub(crate) const FROM: &str = "FROM reviews r LEFT JOIN access_grants g ON g.review_id = r.id";

/// Request details kept in a review's `payload` column.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(crate) struct Payload {
    #[serde(default)]
    pub requester_groups: Vec<String>,
    #[serde(default)]
    pub approvers: Vec<String>,
    #[serde(default)]
    pub request_reason: Option<String>,
}

impl Payload {
    pub fn of(r: &ReviewRecord) -> Result<String, crate::StoreError> {
        serde_json::to_string(&Payload {
            requester_groups: r.requester_groups.clone(),
            approvers: r.approvers.clone(),
            request_reason: r.request_reason.clone(),
        })
        .map_err(json_err)
    }
}

pub(crate) fn json_err(e: serde_json::Error) -> crate::StoreError {
    crate::StoreError::Corrupt(format!("review payload: {e}"))
}

/// The value a lookup by `requester` compares, and what it is compared with.
pub(crate) fn requester_key(requester: Requester<'_>) -> (&str, &'static str) {
    match requester {
        Requester::Principal(p) => (p, "principal"),
        Requester::Subject(s) => (s, "subject"),
    }
}
