//! MCP tool pins and their `pin` reviews. A listing that shows a tool's definition for the first
//! time pins it; one that shows another definition than the pinned one opens a `pin` review
//! (one per resource, tool and new definition), and the new definition is pinned once that
//! review is approved, by the next listing or call on any replica that sees it.

use std::time::Duration;

use tollgate_store::review::{REVIEW_APPROVED, REVIEW_KIND_PIN, REVIEW_PENDING};
use tollgate_store::{McpPinRecord, PinSeen, ReviewFilter, ReviewRecord};

use crate::{NewReview, Review, ReviewError, ReviewKind, Reviewer, Reviews};

/// How long a pin review stays open; a changed definition still listed after that opens another.
pub const PIN_REVIEW_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who asks for a pin review: the gateway itself (no person, so anyone allowed may decide it).
pub const PIN_REQUESTER: &str = "tollgate (mcp pinning)";

/// Where one definition of a tool stands among the `pin` reviews.
#[derive(Debug)]
pub enum PinStatus {
    /// Approved (and pinned now) by this review, decided by `by`.
    Approved { review: String, by: String },
    /// Waiting for a decision.
    Pending(Review),
    /// No review approved it or waits on it.
    Undecided,
}

/// Where a changed definition stands.
#[derive(Debug)]
pub enum PinDecision {
    /// A `pin` review approved exactly this definition: it is the pin now.
    Approved { review: String, by: String },
    /// Waiting for a decision (`opened`: the review was opened by this call).
    Pending { review: Review, opened: bool },
}

/// A changed definition shown to the reviewer.
pub struct PinChange<'a> {
    pub resource: &'a str,
    pub tool: &'a str,
    pub pinned_sha256: &'a str,
    pub seen_sha256: &'a str,
    /// What changed, already masked by the caller (the new definition, clipped).
    pub shown: String,
    pub approvers: &'a [String],
}

impl Reviews {
    /// A listing showed `tool` of `resource` with definition `sha256` (see
    /// [`tollgate_store::Store::mcp_pin_see`]).
    pub fn pin_seen(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
    ) -> Result<PinSeen, ReviewError> {
        Ok(self.store.mcp_pin_see(resource, tool, sha256, self.now())?)
    }

    /// Every pin (of one resource).
    pub fn pins(&self, resource: Option<&str>) -> Result<Vec<McpPinRecord>, ReviewError> {
        Ok(self.store.mcp_pins(resource)?)
    }

    /// The pin of one tool, if it has one.
    pub fn pin(&self, resource: &str, tool: &str) -> Result<Option<McpPinRecord>, ReviewError> {
        Ok(self
            .store
            .mcp_pins(Some(resource))?
            .into_iter()
            .find(|p| p.tool == tool))
    }

    /// Every `pin` review of `resource`, newest first: one store read, for [`Self::pin_status_in`].
    fn pin_reviews(&self, resource: &str) -> Result<Vec<ReviewRecord>, ReviewError> {
        Ok(self.store.reviews(&ReviewFilter {
            kind: Some(REVIEW_KIND_PIN.into()),
            resource: Some(resource.into()),
            ..Default::default()
        })?)
    }

    /// Where definition `sha256` of `tool` stands: approved by a `pin` review (and pinned now,
    /// if the store still has it as the one seen), waiting for one, or neither.
    pub fn pin_status(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
    ) -> Result<PinStatus, ReviewError> {
        self.pin_status_in(&self.pin_reviews(resource)?, resource, tool, sha256)
    }

    /// [`Self::pin_status`] among `found`, the resource's `pin` reviews. The fingerprint covers
    /// the tool's name, so it names one tool's one definition.
    fn pin_status_in(
        &self,
        found: &[ReviewRecord],
        resource: &str,
        tool: &str,
        sha256: &str,
    ) -> Result<PinStatus, ReviewError> {
        let now = self.now();
        let of_this = || {
            found
                .iter()
                .filter(|r| r.statement_sha256.as_deref() == Some(sha256))
        };
        if let Some(r) = of_this().find(|r| r.status == REVIEW_APPROVED) {
            let by = r.decided_by.clone().unwrap_or_default();
            // False when another replica pinned it first: either way it is the pin now.
            self.store
                .mcp_pin_approve(resource, tool, sha256, now, &by)?;
            return Ok(PinStatus::Approved {
                review: r.id.clone(),
                by,
            });
        }
        Ok(
            match of_this().find(|r| r.status == REVIEW_PENDING && r.expires_at_unix_ms > now) {
                Some(r) => PinStatus::Pending(self.view(r.clone())),
                None => PinStatus::Undecided,
            },
        )
    }

    /// A changed definition: pinned now when a `pin` review approved exactly it, else the
    /// review waiting for a decision on it (opened now when there is none).
    pub fn pin_changed(&self, change: &PinChange<'_>) -> Result<PinDecision, ReviewError> {
        let found = self.pin_reviews(change.resource)?;
        match self.pin_status_in(&found, change.resource, change.tool, change.seen_sha256)? {
            PinStatus::Approved { review, by } => return Ok(PinDecision::Approved { review, by }),
            PinStatus::Pending(review) => {
                return Ok(PinDecision::Pending {
                    review,
                    opened: false,
                })
            }
            PinStatus::Undecided => {}
        }
        // One pending review per tool: a definition that changed again supersedes the one
        // waiting (a server cannot pile reviews up by changing a tool over and over).
        let rule = format!("pinning:{}", change.tool);
        for r in &found {
            if r.status == REVIEW_PENDING && r.rule.as_deref() == Some(rule.as_str()) {
                self.withdraw_because(
                    &r.id,
                    "the tool's definition changed again: a newer review replaces this one",
                );
            }
        }
        let review = self.request(NewReview {
            kind: ReviewKind::Pin,
            session_id: None,
            resource: change.resource.into(),
            requester: Reviewer {
                subject: PIN_REQUESTER.into(),
                groups: Vec::new(),
            },
            rule: Some(rule),
            statement: Some(format!(
                "MCP tool \"{}\" changed its definition: pinned sha256 {}, now listed as sha256 {}\n{}",
                change.tool, change.pinned_sha256, change.seen_sha256, change.shown
            )),
            statement_sha256: Some(change.seen_sha256.into()),
            approvers: change.approvers.to_vec(),
            min_approvals: 1,
            timeout: PIN_REVIEW_TIMEOUT,
            reason: Some(
                "the tool's definition differs from the one pinned; approve to allow the new one".into(),
            ),
            access_for: None,
        })?;
        Ok(PinDecision::Pending {
            review,
            opened: true,
        })
    }
}
