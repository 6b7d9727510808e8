//! May this identity reach this resource, and does it see it masked? One answer for every
//! adapter: by group (`allow_groups`), else by an approved just-in-time access grant; an
//! approved unmask grant switches masking off for its holder (audit captures stay masked).

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tollgate_identity::Identity;
use tollgate_review::{Grant, Reviews};

/// How often a long-running exchange that rests on a grant re-reads it from the store, for a
/// revocation made by another gateway process (one made here is seen at once).
pub const GRANT_RECHECK: Duration = Duration::from_secs(5);

/// What an authorized caller holds on a resource.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Reached through a just-in-time grant (not by group); the session ends with it.
    pub grant: Option<Grant>,
    /// Sees the resource unmasked until this grant ends.
    pub unmask: Option<Grant>,
}

/// The caller may not reach the resource. Unknown and forbidden resources look the same to the
/// client, so the answer does not reveal which resources exist.
#[derive(Debug, thiserror::Error)]
#[error(
    "permission denied: \"{subject}\" may not reach resource \"{resource}\" (or it does not exist)"
)]
pub struct Forbidden {
    pub subject: String,
    pub resource: String,
}

/// Authorize `who` on `resource` (`None`: no such resource). `masked`: the resource has masks,
/// so an unmask grant is worth looking up.
pub fn authorize(
    who: &Identity,
    resource: Option<(&str, &[String])>,
    reviews: Option<&Reviews>,
    masked: bool,
    asked: &str,
) -> Result<Access, Forbidden> {
    let forbidden = || Forbidden {
        subject: who.subject.clone(),
        resource: asked.to_string(),
    };
    let (name, allow_groups) = resource.ok_or_else(forbidden)?;
    let grant = if who.in_any(allow_groups) {
        None
    } else {
        Some(
            reviews
                .and_then(|r| r.active_grant_for(who, name))
                .ok_or_else(forbidden)?,
        )
    };
    let unmask = match (masked, reviews) {
        (true, Some(r)) => r.active_unmask_for(who, name),
        _ => None,
    };
    Ok(Access { grant, unmask })
}

impl Access {
    /// Whether what this access rests on still holds at `now` (a grant can expire or be
    /// revoked: `still_granted` re-reads it).
    pub fn holds(&self, now: SystemTime, still_granted: impl Fn(&Grant) -> bool) -> bool {
        self.grant
            .as_ref()
            .is_none_or(|g| g.until > now && still_granted(g))
    }

    /// The grants as a session's `session.open` records them.
    pub fn audit_fields(&self, open: &mut serde_json::Map<String, serde_json::Value>) {
        if let Some(g) = &self.grant {
            open.insert("access_grant".into(), grant_json(g));
        }
        if let Some(g) = &self.unmask {
            open.insert("unmask_grant".into(), grant_json(g));
        }
    }
}

/// Completes when `grant` no longer lets `who` reach `resource`: it ran out, or it was revoked
/// (seen at once when revoked in this process, within [`GRANT_RECHECK`] otherwise). For
/// exchanges that outlive one request (streams, upgrades), which must end with their grant.
pub async fn grant_ended(reviews: Arc<Reviews>, who: Identity, resource: String, grant: Grant) {
    let mut revoked = reviews.revocations();
    let until = tokio::time::Instant::now()
        + grant
            .until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return,
            Ok(()) = revoked.changed() => {}
            _ = tokio::time::sleep(GRANT_RECHECK) => {}
        }
        let still = reviews
            .active_grant_for(&who, &resource)
            .is_some_and(|g| g.review_id == grant.review_id || g.until >= grant.until);
        if !still {
            return;
        }
    }
}

/// A grant as audit events record it.
pub fn grant_json(g: &Grant) -> serde_json::Value {
    let until = g
        .until
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({"review": g.review_id, "until_unix": until})
}
