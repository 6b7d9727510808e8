//! The review (approval) workflow: a command held on the wire, a just-in-time access request,
//! or an unmask request (see a resource without masking for a while) waits for people in
//! approver groups to decide.
//!
//! Owns the review lifecycle (pending → approved | denied | expired | withdrawn), who may vote
//! (approver groups or `roles.admin_groups`, never the requester), the quorum
//! (`min_approvals` distinct reviewers, one deny ends it; requesters and reviewers are compared
//! by [`Principal`], resolved through `[[identity.principals]]`, never by subject string), in-process waiting for a decision,
//! the approved-statement rerun after a gateway restart, access and unmask grants (each kind
//! only ever answers for itself: [`Reviews::active_grant`], [`Reviews::active_unmask`]), the
//! `review.*` audit events and the webhook notifications ([`notify`]).
//!
//! It must not parse a wire protocol or decide which commands need a review (that is the
//! policy engine), and it never sees unredacted statements: callers pass text already redacted.
//! Durable state is in the [`Store`]; a decision is one store transaction, so two reviewers or
//! two gateway processes cannot both finalize a review. Methods other than [`Reviews::wait`]
//! block on the store (fast SQLite calls); async callers with long-running work around them
//! may prefer `spawn_blocking`.

pub mod notify;
mod pins;

pub use pins::{PinChange, PinDecision, PinStatus, PIN_REQUESTER, PIN_REVIEW_TIMEOUT};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tollgate_store::review::{
    REVIEW_APPROVED, REVIEW_DENIED, REVIEW_EXPIRED, REVIEW_KIND_ACCESS, REVIEW_KIND_COMMAND,
    REVIEW_KIND_PIN, REVIEW_KIND_UNMASK, REVIEW_PENDING, REVIEW_WITHDRAWN,
};
use tollgate_store::{
    EventInput, Recorder, Requester, ReviewRecord, ReviewVote, Store, StoreError, VoteOutcome,
};

pub use notify::{Notifier, NotifierConfig, WebhookFormat};
pub use tollgate_identity::{Identity, Principal, Principals};
pub use tollgate_store::ReviewFilter;

/// Audit event kinds.
pub const EVENT_REQUESTED: &str = "review.requested";
pub const EVENT_VOTE: &str = "review.vote";
pub const EVENT_DECIDED: &str = "review.decided";
pub const EVENT_EXPIRED: &str = "review.expired";
pub const EVENT_WITHDRAWN: &str = "review.withdrawn";
/// An approved command review consumed by a rerun of the same statement.
pub const EVENT_USED: &str = "review.used";
/// The grant of an approved access or unmask review ended early by a reviewer.
pub const EVENT_REVOKED: &str = "review.revoked";

/// Longest statement text kept in a review (characters); the rest is cut with a marker.
pub const MAX_STATEMENT_CHARS: usize = 256 * 1024;
/// How long an access (or unmask) request stays pending before it expires.
pub const ACCESS_REVIEW_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often a waiter re-reads the store, for decisions made by another gateway process.
const POLL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewKind {
    /// A held command (SQL statement, HTTP request, tool call).
    Command,
    /// Just-in-time access to a resource for a while.
    Access,
    /// The resource's responses without masking, for the requester, for a while.
    Unmask,
    /// An MCP tool's changed definition, to be pinned (used again) once approved.
    Pin,
}

impl ReviewKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewKind::Command => REVIEW_KIND_COMMAND,
            ReviewKind::Access => REVIEW_KIND_ACCESS,
            ReviewKind::Unmask => REVIEW_KIND_UNMASK,
            ReviewKind::Pin => REVIEW_KIND_PIN,
        }
    }
}

/// A person or service account: a requester or a reviewer, as shown (its subject) and as
/// authorized (its groups). Who it *is*, for self-approval and the quorum, is its [`Principal`],
/// passed beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reviewer {
    pub subject: String,
    pub groups: Vec<String>,
}

impl Reviewer {
    fn in_any(&self, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.contains(g))
    }
}

impl From<&Identity> for Reviewer {
    fn from(who: &Identity) -> Self {
        Reviewer {
            subject: who.subject.clone(),
            groups: who.groups.clone(),
        }
    }
}

/// What a caller asks to have reviewed.
#[derive(Clone, Debug)]
pub struct NewReview {
    pub kind: ReviewKind,
    /// The held session (command reviews).
    pub session_id: Option<String>,
    pub resource: String,
    pub requester: Reviewer,
    /// The policy rule that asked for the review.
    pub rule: Option<String>,
    /// Statement text, already redacted by the caller; clipped to [`MAX_STATEMENT_CHARS`].
    pub statement: Option<String>,
    /// Hex SHA-256 of the statement as the client sent it (for the rerun after a restart).
    pub statement_sha256: Option<String>,
    /// Groups whose members may approve; admins always may.
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    /// How long the review stays pending.
    pub timeout: Duration,
    pub reason: Option<String>,
    /// Access and unmask reviews: how long the grant is asked for.
    pub access_for: Option<Duration>,
}

/// A review as the API, the CLI and webhooks show it. Field names are a contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub id: String,
    pub kind: String,
    /// pending, approved, denied, expired or withdrawn.
    pub status: String,
    pub resource: String,
    /// Who asked, readable (the subject of the credential used).
    pub requester: String,
    /// Who asked, canonical (`cert:cn:alice`, `token:ci-bot`, a mapped name); absent when the
    /// requester's credential was not known (then the subject is what is compared).
    pub requester_principal: Option<String>,
    pub requester_groups: Vec<String>,
    pub session_id: Option<String>,
    pub rule: Option<String>,
    pub statement: Option<String>,
    pub statement_sha256: Option<String>,
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    pub approvals: u32,
    pub votes: Vec<Vote>,
    /// The requester's reason.
    pub reason: Option<String>,
    pub access_for_ms: Option<i64>,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    pub created_at_unix_ms: i64,
    pub expires_at: String,
    pub expires_at_unix_ms: i64,
    pub decided_at: Option<String>,
    pub decided_at_unix_ms: Option<i64>,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    pub used_at_unix_ms: Option<i64>,
    /// Approved access and unmask reviews: when the grant ends.
    pub grant_until: Option<String>,
    pub grant_until_unix_ms: Option<i64>,
    /// The review in the web console (`server.console_url`), when configured.
    pub url: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub reviewer: String,
    /// The reviewer's principal: each counts once toward `min_approvals`.
    #[serde(default)]
    pub principal: String,
    pub groups: Vec<String>,
    pub approve: bool,
    pub reason: Option<String>,
    pub at: String,
    pub at_unix_ms: i64,
}

/// How a wait for a decision ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Run the command: these reviewers approved it.
    Approved { reviewers: Vec<String> },
    Denied {
        reviewer: String,
        reason: Option<String>,
    },
    /// Nobody decided before the deadline.
    Expired,
    /// The review was withdrawn (the client went away).
    Withdrawn,
    /// The review cannot be read (store failure, unknown id): refuse the command.
    Unavailable(String),
}

/// What an approved access review (reach the resource) or unmask review (see it without
/// masking) grants, until `until`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub until: SystemTime,
    pub review_id: String,
}

fn resource_settings(config: &tollgate_config::Config) -> HashMap<String, ResourceSettings> {
    config
        .resources
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                ResourceSettings {
                    access_approvers: r.access_approvers.clone(),
                    unmask_approvers: r.unmask_approvers.clone(),
                    max_access: r.max_access,
                },
            )
        })
        .collect()
}

/// An access or unmask grant (the approved review it comes from) as the API and the CLI show
/// it. Field names are a contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// The id of the review that granted it.
    pub id: String,
    /// `access` (reach the resource) or `unmask` (see it without masking).
    pub kind: String,
    /// Who holds it, readable (the subject of the credential that asked).
    pub subject: String,
    /// Who holds it, canonical (see [`Review::requester_principal`]).
    pub principal: Option<String>,
    pub resource: String,
    /// The requester's reason.
    pub reason: Option<String>,
    /// The approver whose vote granted it.
    pub granted_by: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    pub granted_at: String,
    pub granted_at_unix_ms: i64,
    /// When it ends (or ended: the revocation time of a revoked grant).
    pub until: String,
    pub until_unix_ms: i64,
    /// Whether it is in force now.
    pub active: bool,
    /// Set when it was ended early.
    pub revoked: Option<Revocation>,
}

/// Who ended a grant early, when and why. `by` and `reason` come from the `review.revoked`
/// audit event and are `null` when that event cannot be found (e.g. pruned by retention).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub by: Option<String>,
    pub at: String,
    pub at_unix_ms: i64,
    pub reason: Option<String>,
}

/// Which grants [`Reviews::grants`] lists (newest first); `None` matches any.
#[derive(Clone, Debug, Default)]
pub struct GrantFilter {
    /// The holder's subject.
    pub subject: Option<String>,
    pub resource: Option<String>,
    pub kind: Option<ReviewKind>,
    /// In force now (`true`) or ended (`false`).
    pub active: Option<bool>,
}

/// Whether an approved grant ended before the time it was granted for (it was revoked).
fn ended_early(rec: &ReviewRecord) -> bool {
    match (
        rec.decided_at_unix_ms,
        rec.access_ms,
        rec.grant_until_unix_ms,
    ) {
        (Some(from), Some(asked), Some(until)) => until < from.saturating_add(asked),
        _ => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("no review {0:?}")]
    NotFound(String),
    #[error("the review is already {0}")]
    NotPending(String),
    #[error("you requested this review; someone else must approve or deny it")]
    SelfApproval,
    #[error("you are not in a group that may decide this review (allowed groups: {})", if groups.is_empty() { "none".to_string() } else { groups.join(", ") })]
    NotAnApprover { groups: Vec<String> },
    #[error("{0} has already voted on this review")]
    AlreadyVotedBy(String),
    #[error("no resource {0:?}")]
    UnknownResource(String),
    /// Revoking something that is not the grant of an approved access or unmask review.
    #[error("only the grant of an approved access or unmask review can be revoked; {0}")]
    NotAGrant(String),
    /// The grant was revoked before, or has run out.
    #[error("the grant of review {id} {}", if *revoked { "was already revoked" } else { "has already ended" })]
    GrantEnded { id: String, revoked: bool },
    #[error("{asked} is longer than this resource allows ({max}, its max_access)")]
    TooLong { asked: String, max: String },
    #[error("{0}")]
    Invalid(String),
    /// The `review.requested` event could not be recorded: the review is refused.
    #[error("the audit store is unavailable: {0}")]
    Audit(#[source] StoreError),
    #[error("the review store failed: {0}")]
    Store(#[from] StoreError),
}

/// Per-resource settings from `[[resources]]`.
#[derive(Clone, Debug)]
pub struct ResourceSettings {
    /// Groups that may approve just-in-time access (`access_approvers`).
    pub access_approvers: Vec<String>,
    /// Groups that may approve an unmasked view (`unmask_approvers`, default `access_approvers`).
    pub unmask_approvers: Vec<String>,
    /// Longest access or unmasked view that may be asked for (`max_access`).
    pub max_access: Duration,
}

type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The review workflow of one gateway process.
pub struct Reviews {
    store: Arc<dyn Store>,
    recorder: Recorder,
    notifier: Arc<Notifier>,
    console_url: Option<String>,
    admin_groups: Vec<String>,
    /// Per resource; replaced whole when the config is reloaded ([`Reviews::reload_resources`]).
    resources: std::sync::RwLock<HashMap<String, ResourceSettings>>,
    /// The session id under which this process records `review.*` events (one per process:
    /// a decision can come from any replica, so events never go into the held session's own
    /// sequence, which belongs to the process that holds it).
    audit_session: String,
    waiters: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    clock: Clock,
    /// `[[identity.principals]]`: credentials of one person resolve to one principal.
    principals: Principals,
    /// Bumped when a grant is revoked here, so running sessions re-check theirs at once
    /// (sessions re-read their grants periodically too, which covers other replicas).
    revocations: tokio::sync::watch::Sender<u64>,
    /// Revocations made by this process, by review id: shown by [`Reviews::grants`] before their
    /// `review.revoked` event reaches the store.
    revoked_here: Mutex<HashMap<String, Revocation>>,
}

fn now_ms() -> i64 {
    tollgate_store::unix_ms(SystemTime::now())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    b
}

/// `rv_` and 12 base32 characters (60 random bits): short, URL-safe, unguessable.
pub fn new_review_id() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let b = random_bytes::<8>();
    let n = u64::from_le_bytes(b);
    let mut id = String::from("rv_");
    for i in 0..12 {
        id.push(ALPHABET[((n >> (i * 5)) & 31) as usize] as char);
    }
    id
}

/// RFC 3339 with milliseconds, UTC.
pub fn format_time(unix_ms: i64) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| unix_ms.to_string())
}

/// Human form of a duration: 90m → "1h30m", 45s → "45s".
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_STATEMENT_CHARS) {
        None => text.to_string(),
        Some((at, _)) => format!("{}… [clipped]", &text[..at]),
    }
}

impl Reviews {
    /// `console_url`: base URL of the web console (`server.console_url`), for review links.
    pub fn new(
        store: Arc<dyn Store>,
        recorder: Recorder,
        notifier: Notifier,
        console_url: Option<String>,
    ) -> Self {
        Reviews {
            store,
            recorder,
            notifier: Arc::new(notifier),
            console_url: console_url.map(|u| u.trim_end_matches('/').to_string()),
            admin_groups: Vec::new(),
            resources: Default::default(),
            audit_session: format!("reviews-{}", hex(&random_bytes::<8>())),
            waiters: Mutex::new(HashMap::new()),
            clock: Arc::new(now_ms),
            principals: Principals::default(),
            revocations: tokio::sync::watch::Sender::new(0),
            revoked_here: Mutex::new(HashMap::new()),
        }
    }

    /// Follow the store's review changes (other replicas' decisions, closes and revocations on
    /// a shared PostgreSQL store): wake this process's waiters and grant holders at once instead
    /// of at their next poll. A no-op for a store that cannot tell. Needs a tokio runtime.
    pub fn follow_store_changes(self: &Arc<Self>) {
        let Some(mut changes) = self.store.review_changes() else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let change = changes.recv().await;
                let Some(me) = me.upgrade() else { return };
                match change {
                    Ok(c) => {
                        me.wake(&c.review_id);
                        if c.revoked {
                            me.revocations.send_modify(|n| *n = n.wrapping_add(1));
                        }
                    }
                    // Missed some: everyone re-reads.
                    Err(RecvError::Lagged(_)) => {
                        for n in me
                            .waiters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .values()
                        {
                            n.notify_waiters();
                        }
                        me.revocations.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    /// Notified whenever a grant is revoked in this process (or, with a store that reports
    /// review changes, in another replica).
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// End the grant of an approved access or unmask review now. Whoever may decide the review
    /// (its approvers, admins) may revoke it, and so may its requester (giving it up). Sessions
    /// that depend on the grant end. A reason is required.
    pub fn revoke_grant(
        &self,
        id: &str,
        who: &Identity,
        reason: Option<String>,
    ) -> Result<Review, ReviewError> {
        let reviewer = &Reviewer::from(who);
        let reason = reason
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| ReviewError::Invalid("a revocation needs a reason".into()))?;
        let rec = self
            .store
            .review(id)?
            .ok_or_else(|| ReviewError::NotFound(id.to_string()))?;
        if !tollgate_store::review::grants(&rec.kind) || rec.status != REVIEW_APPROVED {
            return Err(ReviewError::NotAGrant(format!(
                "this is a {} review, {}",
                rec.kind, rec.status
            )));
        }
        let ended = |rec: &ReviewRecord| ReviewError::GrantEnded {
            id: rec.id.clone(),
            revoked: ended_early(rec),
        };
        if rec.grant_until_unix_ms.is_some_and(|u| u <= self.now()) {
            return Err(ended(&rec));
        }
        let principal = self.principals.resolve(&who.principal);
        let own = match &rec.requester_principal {
            Some(p) => p == principal.as_str(),
            None => rec.requester == reviewer.subject,
        };
        if !own && !reviewer.in_any(&rec.approvers) && !reviewer.in_any(&self.admin_groups) {
            let mut groups = rec.approvers.clone();
            groups.extend(
                self.admin_groups
                    .iter()
                    .filter(|g| !rec.approvers.contains(g))
                    .cloned(),
            );
            return Err(ReviewError::NotAnApprover { groups });
        }
        let Some(rec) = self.store.review_revoke_grant(id, self.now())? else {
            // Ended between the read and the update (run out, or revoked by someone else).
            let now = self.store.review(id)?.unwrap_or(rec);
            return Err(ended(&now));
        };
        let revocation = Revocation {
            by: Some(reviewer.subject.clone()),
            at: format_time(rec.grant_until_unix_ms.unwrap_or_else(|| self.now())),
            at_unix_ms: rec.grant_until_unix_ms.unwrap_or_else(|| self.now()),
            reason: Some(reason.clone()),
        };
        self.revoked_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.clone(), revocation);
        self.recorder.record(self.event(
            EVENT_REVOKED,
            json!({"review": rec.id, "review_kind": rec.kind, "resource": rec.resource,
                   "requester": rec.requester, "requester_principal": rec.requester_principal,
                   "revoked_by": reviewer.subject, "principal": principal.as_str(),
                   "reason": reason, "grant_until_unix_ms": rec.grant_until_unix_ms}),
        ));
        tracing::info!(review = %rec.id, by = %reviewer.subject, "grant revoked");
        self.revocations.send_modify(|n| *n = n.wrapping_add(1));
        Ok(self.view(rec))
    }

    /// Credentials that belong to one principal (`[[identity.principals]]`).
    pub fn with_principals(mut self, principals: Principals) -> Self {
        self.principals = principals;
        self
    }

    /// Groups that may decide any review (`roles.admin_groups`).
    pub fn with_admin_groups(mut self, groups: Vec<String>) -> Self {
        self.admin_groups = groups;
        self
    }

    /// Resources that accept just-in-time access and unmask requests.
    pub fn with_resource(mut self, name: impl Into<String>, settings: ResourceSettings) -> Self {
        self.resources
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), settings);
        self
    }

    /// Take every resource's review settings (approvers, `max_access`) from `config`, replacing
    /// the previous ones at once. Reviews already requested keep the approvers they were given.
    pub fn reload_resources(&self, config: &tollgate_config::Config) {
        let settings = resource_settings(config);
        *self.resources.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// Everything from the gateway's config: admins, resources, webhooks, console URL.
    pub fn from_config(
        config: &tollgate_config::Config,
        store: Arc<dyn Store>,
        recorder: Recorder,
    ) -> Result<Self, String> {
        let notifier = Notifier::new(&NotifierConfig::from_config(config))?;
        let reviews = Reviews::new(store, recorder, notifier, config.server.console_url.clone())
            .with_admin_groups(config.roles.admin_groups.clone())
            .with_principals(Principals::new(&config.identity.principals));
        reviews.reload_resources(config);
        Ok(reviews)
    }

    #[cfg(test)]
    fn with_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The session id of this process's `review.*` audit events.
    pub fn audit_session(&self) -> &str {
        &self.audit_session
    }

    /// Persist a pending review, notify its webhook in the background, and return it.
    /// Refused (nothing stored) when its `review.requested` event cannot be recorded.
    /// `requester` is the principal of the credential the requester used (resolved here through
    /// `[[identity.principals]]`): no credential of that principal may then vote on it.
    pub fn request_by(&self, r: NewReview, requester: &Principal) -> Result<Review, ReviewError> {
        self.create(r, Some(self.principals.resolve(requester)))
    }

    /// [`Reviews::request_by`] for a caller that cannot name the requester's principal: the
    /// requester is then compared by subject, so no reviewer with the same subject string, by
    /// whatever credential, may vote on it.
    pub fn request(&self, r: NewReview) -> Result<Review, ReviewError> {
        self.create(r, None)
    }

    fn create(&self, r: NewReview, principal: Option<Principal>) -> Result<Review, ReviewError> {
        if r.min_approvals == 0 {
            return Err(ReviewError::Invalid(
                "min_approvals must be at least 1".into(),
            ));
        }
        if r.timeout.is_zero() {
            return Err(ReviewError::Invalid("a review needs a timeout".into()));
        }
        if r.requester.subject.is_empty() {
            return Err(ReviewError::Invalid("a review needs a requester".into()));
        }
        let now = self.now();
        let rec = ReviewRecord {
            id: new_review_id(),
            kind: r.kind.as_str().into(),
            session_id: r.session_id,
            resource: r.resource,
            requester: r.requester.subject,
            requester_principal: principal.map(|p| p.as_str().to_string()),
            requester_groups: r.requester.groups,
            rule: r.rule,
            statement: r.statement.as_deref().map(clip),
            statement_sha256: r.statement_sha256,
            approvers: r.approvers,
            min_approvals: r.min_approvals,
            request_reason: r.reason,
            access_ms: r.access_for.map(ms),
            status: REVIEW_PENDING.into(),
            created_at_unix_ms: now,
            expires_at_unix_ms: now.saturating_add(ms(r.timeout)),
            decided_at_unix_ms: None,
            decided_by: None,
            decision_reason: None,
            used_at_unix_ms: None,
            grant_until_unix_ms: None,
            votes: Vec::new(),
        };
        self.recorder
            .append(&[self.event(
                EVENT_REQUESTED,
                json!({
                    "review": rec.id,
                    "review_kind": rec.kind,
                    "session": rec.session_id,
                    "resource": rec.resource,
                    "requester": rec.requester,
                    "requester_principal": rec.requester_principal,
                    "requester_groups": rec.requester_groups,
                    "rule": rec.rule,
                    "statement": rec.statement,
                    "statement_sha256": rec.statement_sha256,
                    "approvers": rec.approvers,
                    "min_approvals": rec.min_approvals,
                    "reason": rec.request_reason,
                    "access_for_ms": rec.access_ms,
                    "expires_at_unix_ms": rec.expires_at_unix_ms,
                }),
            )])
            .map_err(ReviewError::Audit)?;
        self.store.review_create(&rec)?;
        let review = self.view(rec);
        tracing::info!(review = %review.id, kind = %review.kind, resource = %review.resource, requester = %review.requester, "review requested");
        self.notifier.spawn(&review);
        Ok(review)
    }

    /// A just-in-time access request for `resource`: checked against the resource's
    /// `max_access`, approvable by its `access_approvers`.
    pub fn request_access(
        &self,
        requester: &Identity,
        resource: &str,
        access_for: Duration,
        reason: &str,
    ) -> Result<Review, ReviewError> {
        self.request_grant(ReviewKind::Access, requester, resource, access_for, reason)
    }

    /// A request to see `resource` without masking for `unmask_for` (the only way masking is
    /// bypassed): checked against the resource's `max_access`, approvable by its
    /// `unmask_approvers`. It grants no access: the requester must reach the resource anyway.
    pub fn request_unmask(
        &self,
        requester: &Identity,
        resource: &str,
        unmask_for: Duration,
        reason: &str,
    ) -> Result<Review, ReviewError> {
        self.request_grant(ReviewKind::Unmask, requester, resource, unmask_for, reason)
    }

    fn request_grant(
        &self,
        kind: ReviewKind,
        requester: &Identity,
        resource: &str,
        grant_for: Duration,
        reason: &str,
    ) -> Result<Review, ReviewError> {
        let settings = self
            .resources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(resource)
            .cloned()
            .ok_or_else(|| ReviewError::UnknownResource(resource.to_string()))?;
        let approvers = match kind {
            ReviewKind::Access => &settings.access_approvers,
            ReviewKind::Unmask => &settings.unmask_approvers,
            ReviewKind::Command | ReviewKind::Pin => {
                return Err(ReviewError::Invalid(format!(
                    "a {} review is requested by the gateway, not by a person",
                    kind.as_str()
                )))
            }
        };
        if grant_for.is_zero() {
            return Err(ReviewError::Invalid(format!(
                "the {} duration must be more than 0",
                kind.as_str()
            )));
        }
        if grant_for > settings.max_access {
            return Err(ReviewError::TooLong {
                asked: format_duration(grant_for),
                max: format_duration(settings.max_access),
            });
        }
        if reason.trim().is_empty() {
            return Err(ReviewError::Invalid(format!(
                "an {} request needs a reason",
                kind.as_str()
            )));
        }
        self.request_by(
            NewReview {
                kind,
                session_id: None,
                resource: resource.to_string(),
                requester: Reviewer::from(requester),
                rule: None,
                statement: None,
                statement_sha256: None,
                approvers: approvers.clone(),
                min_approvals: 1,
                timeout: ACCESS_REVIEW_TIMEOUT,
                reason: Some(reason.trim().to_string()),
                access_for: Some(grant_for),
            },
            &requester.principal,
        )
    }

    /// Wait until the review is decided, withdrawn or past its deadline (which is then
    /// persisted as expired). An approved command review is consumed here, so its approval
    /// runs the command once. Decisions made by another gateway process are seen within a second.
    pub async fn wait(&self, id: &str) -> Verdict {
        let notify = {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            w.entry(id.to_string()).or_default().clone()
        };
        let verdict = self.wait_on(id, &notify).await;
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Two entries: the map's and ours; anyone else still waiting keeps it.
        if Arc::strong_count(&notify) <= 2 {
            w.remove(id);
        }
        verdict
    }

    async fn wait_on(&self, id: &str, notify: &tokio::sync::Notify) -> Verdict {
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let store = self.store.clone();
            let key = id.to_string();
            let rec = match tokio::task::spawn_blocking(move || store.review(&key)).await {
                Ok(Ok(Some(rec))) => rec,
                Ok(Ok(None)) => return Verdict::Unavailable(format!("no review {id:?}")),
                Ok(Err(e)) => return Verdict::Unavailable(e.to_string()),
                Err(e) => return Verdict::Unavailable(e.to_string()),
            };
            match rec.status.as_str() {
                REVIEW_APPROVED => return self.consume(rec),
                REVIEW_DENIED => {
                    return Verdict::Denied {
                        reviewer: rec.decided_by.unwrap_or_default(),
                        reason: rec.decision_reason,
                    }
                }
                REVIEW_EXPIRED => return Verdict::Expired,
                REVIEW_WITHDRAWN => return Verdict::Withdrawn,
                _ => {}
            }
            let left = rec.expires_at_unix_ms - self.now();
            if left <= 0 {
                match self
                    .store
                    .review_close(id, REVIEW_EXPIRED, self.now(), None)
                {
                    Ok(Some(r)) => self.expired(&r),
                    Ok(None) => {} // decided meanwhile: read it again
                    Err(e) => return Verdict::Unavailable(e.to_string()),
                }
                continue;
            }
            let nap = POLL.min(Duration::from_millis(left as u64));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// An approved review reached its waiter: consume a command approval exactly once.
    fn consume(&self, rec: ReviewRecord) -> Verdict {
        let reviewers: Vec<String> = rec
            .votes
            .iter()
            .filter(|v| v.approve)
            .map(|v| v.reviewer.clone())
            .collect();
        if rec.kind == ReviewKind::Command.as_str() {
            match self.store.review_mark_used(&rec.id, self.now()) {
                Ok(true) => {}
                Ok(false) => {
                    return Verdict::Denied {
                        reviewer: "tollgate".into(),
                        reason: Some(
                            "the approval was already used by a rerun of the statement".into(),
                        ),
                    }
                }
                Err(e) => return Verdict::Unavailable(e.to_string()),
            }
        }
        Verdict::Approved { reviewers }
    }

    /// The held client went away: the review is withdrawn (if still pending).
    pub fn withdraw(&self, id: &str) {
        self.withdraw_because(id, "the client disconnected while the command was held");
    }

    /// Withdraw a pending review, saying why (recorded in `review.withdrawn` and the review).
    pub fn withdraw_because(&self, id: &str, reason: &str) {
        match self
            .store
            .review_close(id, REVIEW_WITHDRAWN, self.now(), Some(reason))
        {
            Ok(Some(r)) => {
                self.recorder.record(self.event(
                    EVENT_WITHDRAWN,
                    json!({"review": r.id, "review_kind": r.kind, "session": r.session_id,
                           "resource": r.resource, "requester": r.requester, "reason": reason}),
                ));
                self.wake(id);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(review = %id, error = %e, "cannot withdraw a review"),
        }
    }

    /// A reviewer's vote. Approvals count distinct principals until `min_approvals` (two
    /// credentials of one principal count once); one deny decides. A deny needs a reason.
    pub fn decide(
        &self,
        id: &str,
        who: &Identity,
        approve: bool,
        reason: Option<String>,
    ) -> Result<Review, ReviewError> {
        let principal = self.principals.resolve(&who.principal);
        let reviewer = &Reviewer::from(who);
        let reason = reason
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty());
        if !approve && reason.is_none() {
            return Err(ReviewError::Invalid("a denial needs a reason".into()));
        }
        self.sweep();
        let rec = self
            .store
            .review(id)?
            .ok_or_else(|| ReviewError::NotFound(id.to_string()))?;
        if rec.status != REVIEW_PENDING {
            return Err(ReviewError::NotPending(rec.status));
        }
        let own = match &rec.requester_principal {
            Some(p) => p == principal.as_str(),
            None => rec.requester == reviewer.subject,
        };
        if own {
            return Err(ReviewError::SelfApproval);
        }
        if !reviewer.in_any(&rec.approvers) && !reviewer.in_any(&self.admin_groups) {
            let mut groups = rec.approvers.clone();
            groups.extend(
                self.admin_groups
                    .iter()
                    .filter(|g| !rec.approvers.contains(g))
                    .cloned(),
            );
            return Err(ReviewError::NotAnApprover { groups });
        }
        let outcome = self.store.review_vote(&ReviewVote {
            review_id: id.to_string(),
            reviewer: reviewer.subject.clone(),
            principal: principal.as_str().to_string(),
            groups: reviewer.groups.clone(),
            approve,
            reason: reason.clone(),
            at_unix_ms: self.now(),
        })?;
        let rec = match outcome {
            VoteOutcome::Recorded(rec) => rec,
            VoteOutcome::NotFound => return Err(ReviewError::NotFound(id.to_string())),
            VoteOutcome::NotPending(s) => return Err(ReviewError::NotPending(s)),
            VoteOutcome::Expired(rec) => {
                self.expired(&rec);
                return Err(ReviewError::NotPending(rec.status));
            }
            VoteOutcome::SelfApproval => return Err(ReviewError::SelfApproval),
            VoteOutcome::AlreadyVoted => {
                return Err(ReviewError::AlreadyVotedBy(reviewer.subject.clone()))
            }
        };
        let approvals = rec.votes.iter().filter(|v| v.approve).count();
        self.recorder.record(self.event(
            EVENT_VOTE,
            json!({"review": rec.id, "review_kind": rec.kind, "resource": rec.resource,
                   "requester": rec.requester, "reviewer": reviewer.subject, "principal": principal, "groups": reviewer.groups, "approve": approve,
                   "reason": reason, "approvals": approvals, "min_approvals": rec.min_approvals}),
        ));
        if rec.status != REVIEW_PENDING {
            self.recorder.record(self.event(
                EVENT_DECIDED,
                json!({"review": rec.id, "review_kind": rec.kind, "session": rec.session_id,
                       "resource": rec.resource, "requester": rec.requester, "status": rec.status,
                       "decided_by": rec.decided_by, "reason": rec.decision_reason,
                       "reviewers": rec.votes.iter().filter(|v| v.approve == approve).map(|v| &v.reviewer).collect::<Vec<_>>(),
                       "grant_until_unix_ms": rec.grant_until_unix_ms}),
            ));
            tracing::info!(review = %rec.id, status = %rec.status, by = %reviewer.subject, "review decided");
            self.wake(id);
        }
        Ok(self.view(rec))
    }

    /// Whether [`Reviews::decide`] would take a vote of `who` on `review` as it stands (pending,
    /// not the requester's, an approver or admin, not yet voted): what a console shows forms for.
    /// `decide` checks again; this only answers what to offer.
    pub fn may_decide(&self, review: &Review, who: &Identity) -> bool {
        let principal = self.principals.resolve(&who.principal);
        let reviewer = Reviewer::from(who);
        review.status == REVIEW_PENDING
            && !self.is_requester(review, who)
            && (reviewer.in_any(&review.approvers) || reviewer.in_any(&self.admin_groups))
            && !review
                .votes
                .iter()
                .any(|v| v.principal == principal.as_str())
    }

    /// Whether `who` asked for `review` (by principal; by subject when the requester's is unknown).
    pub fn is_requester(&self, review: &Review, who: &Identity) -> bool {
        match &review.requester_principal {
            Some(p) => *p == self.principals.resolve(&who.principal).as_str(),
            None => review.requester == who.subject,
        }
    }

    /// Reviews, newest first (pending ones past their deadline are expired first).
    pub fn list(&self, filter: &ReviewFilter) -> Result<Vec<Review>, ReviewError> {
        self.sweep();
        Ok(self
            .store
            .reviews(filter)?
            .into_iter()
            .map(|r| self.view(r))
            .collect())
    }

    pub fn get(&self, id: &str) -> Result<Option<Review>, ReviewError> {
        self.sweep();
        Ok(self.store.review(id)?.map(|r| self.view(r)))
    }

    /// Restart survival: the newest approved, unused command review of this requester, resource
    /// and statement hash, decided within `window`, is consumed and returned (the statement may
    /// run without a new review). Only reviews requested by `requester`'s principal count.
    pub fn take_approved_rerun_by(
        &self,
        requester: &Principal,
        resource: &str,
        statement_sha256: &str,
        window: Duration,
    ) -> Option<Review> {
        let principal = self.principals.resolve(requester);
        self.take_rerun(
            Requester::Principal(principal.as_str()),
            resource,
            statement_sha256,
            window,
        )
    }

    /// [`Reviews::take_approved_rerun_by`] for a caller that knows only the requester's subject:
    /// any review requested under that subject string counts, whatever the credential.
    pub fn take_approved_rerun(
        &self,
        requester: &str,
        resource: &str,
        statement_sha256: &str,
        window: Duration,
    ) -> Option<Review> {
        self.take_rerun(
            Requester::Subject(requester),
            resource,
            statement_sha256,
            window,
        )
    }

    fn take_rerun(
        &self,
        requester: Requester<'_>,
        resource: &str,
        statement_sha256: &str,
        window: Duration,
    ) -> Option<Review> {
        let now = self.now();
        match self.store.review_take_rerun(
            requester,
            resource,
            statement_sha256,
            now.saturating_sub(ms(window)),
            now,
        ) {
            Ok(Some(rec)) => {
                self.recorder.record(self.event(
                    EVENT_USED,
                    json!({"review": rec.id, "resource": rec.resource, "requester": rec.requester,
                           "statement_sha256": rec.statement_sha256, "rerun": true}),
                ));
                Some(self.view(rec))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot look up an approved rerun; a new review is needed");
                None
            }
        }
    }

    /// Just-in-time access: the grant (from an approved access review) that lets `who` reach
    /// `resource` now: one asked for by `who`'s principal, by whichever of its credentials.
    /// An unmask grant never counts. A store failure means no grant.
    pub fn active_grant_for(&self, who: &Identity, resource: &str) -> Option<Grant> {
        let principal = self.principals.resolve(&who.principal);
        grant_of(
            ReviewKind::Access,
            self.store.access_grant(
                Requester::Principal(principal.as_str()),
                resource,
                self.now(),
            ),
        )
    }

    /// The grant (from an approved unmask review) that lets `who` see `resource` without
    /// masking now (by principal, as [`Reviews::active_grant_for`]). An access grant never
    /// counts. A store failure means no grant, so masking stays on.
    pub fn active_unmask_for(&self, who: &Identity, resource: &str) -> Option<Grant> {
        let principal = self.principals.resolve(&who.principal);
        grant_of(
            ReviewKind::Unmask,
            self.store.unmask_grant(
                Requester::Principal(principal.as_str()),
                resource,
                self.now(),
            ),
        )
    }

    /// [`Reviews::active_grant_for`] by subject string, for a caller that knows no principal:
    /// a grant asked for under that subject by any credential counts.
    pub fn active_grant(&self, subject: &str, resource: &str) -> Option<Grant> {
        grant_of(
            ReviewKind::Access,
            self.store
                .access_grant(Requester::Subject(subject), resource, self.now()),
        )
    }

    /// [`Reviews::active_unmask_for`] by subject string (see [`Reviews::active_grant`]).
    pub fn active_unmask(&self, subject: &str, resource: &str) -> Option<Grant> {
        grant_of(
            ReviewKind::Unmask,
            self.store
                .unmask_grant(Requester::Subject(subject), resource, self.now()),
        )
    }

    /// Access and unmask grants (approved reviews of those kinds), newest first.
    pub fn grants(&self, filter: &GrantFilter) -> Result<Vec<GrantView>, ReviewError> {
        let kinds = match filter.kind {
            Some(k) => vec![k],
            None => vec![ReviewKind::Access, ReviewKind::Unmask],
        };
        let now = self.now();
        let mut out = Vec::new();
        for kind in kinds {
            let recs = self.store.reviews(&ReviewFilter {
                status: Some(REVIEW_APPROVED.into()),
                kind: Some(kind.as_str().into()),
                resource: filter.resource.clone(),
                requester: filter.subject.clone(),
                limit: None,
            })?;
            for rec in recs {
                let Some(until) = rec.grant_until_unix_ms else {
                    continue;
                };
                if filter.active.is_some_and(|a| a != (until > now)) {
                    continue;
                }
                out.push(self.grant_view(rec, now));
            }
        }
        out.sort_by(|a, b| {
            b.granted_at_unix_ms
                .cmp(&a.granted_at_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Whether `who` holds `grant` (by principal; by subject when the holder's is unknown).
    pub fn is_holder(&self, grant: &GrantView, who: &Identity) -> bool {
        match &grant.principal {
            Some(p) => *p == self.principals.resolve(&who.principal).as_str(),
            None => grant.subject == who.subject,
        }
    }

    fn grant_view(&self, rec: ReviewRecord, now: i64) -> GrantView {
        let until = rec.grant_until_unix_ms.unwrap_or_default();
        let granted_at = rec.decided_at_unix_ms.unwrap_or(rec.created_at_unix_ms);
        let revoked = ended_early(&rec).then(|| self.revocation(&rec.id, until));
        GrantView {
            id: rec.id,
            kind: rec.kind,
            subject: rec.requester,
            principal: rec.requester_principal,
            resource: rec.resource,
            reason: rec.request_reason,
            granted_by: rec.decided_by,
            granted_at: format_time(granted_at),
            granted_at_unix_ms: granted_at,
            until: format_time(until),
            until_unix_ms: until,
            active: until > now,
            revoked,
        }
    }

    /// Who revoked the grant of review `id` (which ended at `at_unix_ms`) and why: from this
    /// process's memory, else from its `review.revoked` event in the store.
    fn revocation(&self, id: &str, at_unix_ms: i64) -> Revocation {
        if let Some(r) = self
            .revoked_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return r.clone();
        }
        let event = find_event_near(&*self.store, at_unix_ms, |e| {
            e.kind == EVENT_REVOKED && e.payload["review"] == id
        });
        let field = |k: &str| {
            event
                .as_ref()
                .and_then(|e| e.payload[k].as_str())
                .map(str::to_string)
        };
        Revocation {
            by: field("revoked_by"),
            at: format_time(at_unix_ms),
            at_unix_ms,
            reason: field("reason"),
        }
    }

    /// Expire every pending review past its deadline (whoever notices first records it).
    fn sweep(&self) {
        match self.store.review_expire_due(self.now()) {
            Ok(expired) => {
                for r in &expired {
                    self.expired(r);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot expire overdue reviews"),
        }
    }

    fn expired(&self, r: &ReviewRecord) {
        self.recorder.record(self.event(
            EVENT_EXPIRED,
            json!({"review": r.id, "review_kind": r.kind, "session": r.session_id,
                   "resource": r.resource, "requester": r.requester,
                   "expires_at_unix_ms": r.expires_at_unix_ms,
                   "approvals": r.votes.iter().filter(|v| v.approve).count()}),
        ));
        self.wake(&r.id);
    }

    fn wake(&self, id: &str) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get(id) {
            n.notify_waiters();
        }
    }

    fn event(&self, kind: &str, payload: serde_json::Value) -> EventInput {
        EventInput {
            session_id: self.audit_session.clone(),
            kind: kind.into(),
            at: SystemTime::now(),
            payload,
        }
    }

    /// The console link of a review.
    pub fn url(&self, id: &str) -> Option<String> {
        self.console_url
            .as_ref()
            .map(|b| format!("{b}/reviews/{id}"))
    }

    fn view(&self, r: ReviewRecord) -> Review {
        Review {
            url: self.url(&r.id),
            approvals: r.votes.iter().filter(|v| v.approve).count() as u32,
            votes: r
                .votes
                .into_iter()
                .map(|v| Vote {
                    at: format_time(v.at_unix_ms),
                    reviewer: v.reviewer,
                    principal: v.principal,
                    groups: v.groups,
                    approve: v.approve,
                    reason: v.reason,
                    at_unix_ms: v.at_unix_ms,
                })
                .collect(),
            id: r.id,
            kind: r.kind,
            status: r.status,
            resource: r.resource,
            requester: r.requester,
            requester_principal: r.requester_principal,
            requester_groups: r.requester_groups,
            session_id: r.session_id,
            rule: r.rule,
            statement: r.statement,
            statement_sha256: r.statement_sha256,
            approvers: r.approvers,
            min_approvals: r.min_approvals,
            reason: r.request_reason,
            access_for_ms: r.access_ms,
            created_at: format_time(r.created_at_unix_ms),
            created_at_unix_ms: r.created_at_unix_ms,
            expires_at: format_time(r.expires_at_unix_ms),
            expires_at_unix_ms: r.expires_at_unix_ms,
            decided_at: r.decided_at_unix_ms.map(format_time),
            decided_at_unix_ms: r.decided_at_unix_ms,
            decided_by: r.decided_by,
            decision_reason: r.decision_reason,
            used_at_unix_ms: r.used_at_unix_ms,
            grant_until: r.grant_until_unix_ms.map(format_time),
            grant_until_unix_ms: r.grant_until_unix_ms,
        }
    }
}

fn grant_of(
    kind: ReviewKind,
    found: Result<Option<tollgate_store::GrantRecord>, StoreError>,
) -> Option<Grant> {
    match found {
        // The store filters on the kind; checked again because a wrong kind here would let an
        // access grant switch masking off, or an unmask grant open a resource.
        Ok(Some(g)) if g.kind == kind.as_str() => Some(Grant {
            until: UNIX_EPOCH + Duration::from_millis(g.until_unix_ms.max(0) as u64),
            review_id: g.review_id,
        }),
        Ok(Some(g)) => {
            tracing::error!(review = %g.review_id, kind = %g.kind, wanted = kind.as_str(), "the store returned a grant of another kind; treating as none");
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, kind = kind.as_str(), "cannot read grants; treating as none");
            None
        }
    }
}

/// How far before and after a revocation its event is looked for (clocks of replicas differ;
/// the event is written just after the grant ends).
const EVENT_SEARCH_BEFORE_MS: i64 = 5_000;
const EVENT_SEARCH_AFTER_MS: i64 = 60_000;
/// Most events read while looking for one event near a time.
const EVENT_SEARCH_MAX: usize = 8192;

/// The first event recorded near `at_unix_ms` that `matches`. Event ids follow insertion order,
/// which follows time closely: a binary search over ids finds where that time starts, then a
/// bounded scan reads forward. `None` when the store cannot page through events.
fn find_event_near(
    store: &dyn Store,
    at_unix_ms: i64,
    matches: impl Fn(&tollgate_store::StoredEvent) -> bool,
) -> Option<tollgate_store::StoredEvent> {
    let from = at_unix_ms.saturating_sub(EVENT_SEARCH_BEFORE_MS);
    let to = at_unix_ms.saturating_add(EVENT_SEARCH_AFTER_MS);
    // The time of the first event after id `after` (None: there is none).
    let time_after = |after: i64| -> Option<Option<i64>> {
        store
            .events_page(after, None, None, 1)
            .ok()
            .map(|p| p.first().map(|e| e.at_unix_ms))
    };
    // Invariant: the event after `lo` is before `from` (or lo = 0); the one after `hi` is not.
    let (mut lo, mut hi) = (0i64, 1i64);
    loop {
        match time_after(hi)? {
            Some(t) if t < from && hi < i64::MAX / 2 => {
                lo = hi;
                hi *= 2;
            }
            _ => break,
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match time_after(mid)? {
            Some(t) if t < from => lo = mid,
            _ => hi = mid,
        }
    }
    let mut after = lo;
    let mut read = 0;
    while read < EVENT_SEARCH_MAX {
        let page = store.events_page(after, None, None, 512).ok()?;
        let last = page.last()?.id;
        for e in page {
            if e.at_unix_ms >= to {
                return None;
            }
            if matches(&e) {
                return Some(e);
            }
            read += 1;
        }
        after = last;
    }
    None
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
