//! Reviews in PostgreSQL: the rules of `sqlite/reviews.rs` (same rows, same outcomes). A vote
//! locks its review row (`FOR UPDATE`), so two reviewers on two replicas cannot both finalize
//! it; every other state change is one `UPDATE ... WHERE status = 'pending'` (or `used_at IS NULL`).

use tokio_postgres::{Client, GenericClient, Row};

use super::REVIEW_CHANNEL;
use crate::review::*;
use crate::StoreError;

/// Tells every replica's LISTEN connection (on commit, when `c` is in a transaction).
async fn notify(c: &impl GenericClient, id: &str, revoked: bool) -> Result<(), StoreError> {
    let change = ReviewChange {
        review_id: id.to_string(),
        revoked,
    };
    c.execute(
        "SELECT pg_notify($1, $2)",
        &[&REVIEW_CHANNEL, &change.to_payload()],
    )
    .await?;
    Ok(())
}

fn read_row(r: &Row) -> Result<ReviewRecord, StoreError> {
    let payload: String = r.try_get(17)?;
    let p: Payload = serde_json::from_str(&payload).map_err(json_err)?;
    let min_approvals: i64 = r.try_get(8)?;
    Ok(ReviewRecord {
        id: r.try_get(0)?,
        kind: r.try_get(1)?,
        session_id: r.try_get(2)?,
        resource: r.try_get(3)?,
        requester: r.try_get(4)?,
        requester_principal: r.try_get(19)?,
        requester_groups: p.requester_groups,
        rule: r.try_get(5)?,
        statement: r.try_get(6)?,
        statement_sha256: r.try_get(7)?,
        approvers: p.approvers,
        min_approvals: u32::try_from(min_approvals).unwrap_or(u32::MAX),
        request_reason: p.request_reason,
        access_ms: r.try_get(9)?,
        status: r.try_get(10)?,
        created_at_unix_ms: r.try_get(11)?,
        expires_at_unix_ms: r.try_get(12)?,
        decided_at_unix_ms: r.try_get(13)?,
        decided_by: r.try_get(14)?,
        decision_reason: r.try_get(15)?,
        used_at_unix_ms: r.try_get(16)?,
        grant_until_unix_ms: r.try_get(18)?,
        votes: Vec::new(),
    })
}

/// One review with its votes, read on `c` (inside or outside a transaction).
pub(super) async fn load(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<ReviewRecord>, StoreError> {
    let Some(row) = c
        .query_opt(&format!("SELECT {COLUMNS} {FROM} WHERE r.id = $1"), &[&id])
        .await?
    else {
        return Ok(None);
    };
    let mut rec = read_row(&row)?;
    rec.votes = votes(c, id).await?;
    Ok(Some(rec))
}

async fn votes(c: &impl GenericClient, id: &str) -> Result<Vec<VoteRecord>, StoreError> {
    let rows = c
        .query(
            "SELECT reviewer, groups, approve, reason, at, principal FROM review_votes \
             WHERE review_id = $1 ORDER BY at, reviewer, principal",
            &[&id],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let groups: String = r.try_get(1)?;
            Ok(VoteRecord {
                reviewer: r.try_get(0)?,
                principal: r.try_get(5)?,
                groups: serde_json::from_str(&groups).map_err(json_err)?,
                approve: r.try_get(2)?,
                reason: r.try_get(3)?,
                at_unix_ms: r.try_get(4)?,
            })
        })
        .collect()
}

pub(super) async fn create(c: &mut Client, r: &ReviewRecord) -> Result<(), StoreError> {
    let payload = Payload::of(r)?;
    c.execute(
        "INSERT INTO reviews (id, kind, session_id, resource, requester, status, rule, statement, \
         statement_sha256, min_approvals, access_ms, created_at, expires_at, payload, \
         requester_principal) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &r.id,
            &r.kind,
            &r.session_id,
            &r.resource,
            &r.requester,
            &r.status,
            &r.rule,
            &r.statement,
            &r.statement_sha256,
            &i64::from(r.min_approvals),
            &r.access_ms,
            &r.created_at_unix_ms,
            &r.expires_at_unix_ms,
            &payload,
            &r.requester_principal,
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn list(
    c: &mut Client,
    f: &ReviewFilter,
) -> Result<Vec<ReviewRecord>, StoreError> {
    let limit = f.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let rows = c
        .query(
            &format!(
                "SELECT {COLUMNS} {FROM} WHERE ($1::text IS NULL OR r.status = $1) \
                 AND ($2::text IS NULL OR r.kind = $2) AND ($3::text IS NULL OR r.resource = $3) \
                 AND ($4::text IS NULL OR r.requester = $4) \
                 ORDER BY r.created_at DESC, r.id LIMIT $5"
            ),
            &[&f.status, &f.kind, &f.resource, &f.requester, &limit],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut rec = read_row(row)?;
        rec.votes = votes(&*c, &rec.id).await?;
        out.push(rec);
    }
    Ok(out)
}

pub(super) async fn vote(c: &mut Client, v: &ReviewVote) -> Result<VoteOutcome, StoreError> {
    let tx = c.transaction().await?;
    // Serializes votes (and closes) on this review across every replica.
    if tx
        .query_opt(
            "SELECT 1 FROM reviews WHERE id = $1 FOR UPDATE",
            &[&v.review_id],
        )
        .await?
        .is_none()
    {
        return Ok(VoteOutcome::NotFound);
    }
    let rec = load(&tx, &v.review_id)
        .await?
        .ok_or_else(|| StoreError::Internal("review vanished under its row lock".into()))?;
    if rec.status != REVIEW_PENDING {
        return Ok(VoteOutcome::NotPending(rec.status));
    }
    if v.at_unix_ms >= rec.expires_at_unix_ms {
        tx.execute(
            "UPDATE reviews SET status = $1, decided_at = expires_at WHERE id = $2 AND status = $3",
            &[&REVIEW_EXPIRED, &v.review_id, &REVIEW_PENDING],
        )
        .await?;
        let rec = load(&tx, &v.review_id).await?.expect("locked row");
        notify(&tx, &v.review_id, false).await?;
        tx.commit().await?;
        return Ok(VoteOutcome::Expired(rec));
    }
    if let Some(refused) = vote_refused(&rec, v) {
        return Ok(refused);
    }
    tx.execute(
        "INSERT INTO review_votes (review_id, reviewer, principal, groups, approve, reason, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &v.review_id,
            &v.reviewer,
            &v.principal,
            &serde_json::to_string(&v.groups).map_err(json_err)?,
            &v.approve,
            &v.reason,
            &v.at_unix_ms,
        ],
    )
    .await?;
    let decided = vote_decides(&rec, v);
    if let Some(status) = decided {
        tx.execute(
            "UPDATE reviews SET status = $1, decided_at = $2, decided_by = $3, reason = $4 \
             WHERE id = $5 AND status = $6",
            &[
                &status,
                &v.at_unix_ms,
                &v.reviewer,
                &v.reason,
                &v.review_id,
                &REVIEW_PENDING,
            ],
        )
        .await?;
        if status == REVIEW_APPROVED && grants(&rec.kind) {
            let until = v.at_unix_ms.saturating_add(rec.access_ms.unwrap_or(0));
            tx.execute(
                "INSERT INTO access_grants (review_id, subject, resource, granted_at, until) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &v.review_id,
                    &rec.requester,
                    &rec.resource,
                    &v.at_unix_ms,
                    &until,
                ],
            )
            .await?;
        }
        notify(&tx, &v.review_id, false).await?;
    }
    let rec = load(&tx, &v.review_id).await?.expect("locked row");
    tx.commit().await?;
    Ok(VoteOutcome::Recorded(rec))
}

pub(super) async fn close(
    c: &mut Client,
    id: &str,
    status: &str,
    at_unix_ms: i64,
    reason: Option<&str>,
) -> Result<Option<ReviewRecord>, StoreError> {
    let changed = c
        .execute(
            "UPDATE reviews SET status = $1, decided_at = $2, reason = $3 WHERE id = $4 AND status = $5",
            &[&status, &at_unix_ms, &reason, &id, &REVIEW_PENDING],
        )
        .await?;
    if changed == 0 {
        return Ok(None);
    }
    notify(&*c, id, false).await?;
    load(&*c, id).await
}

pub(super) async fn revoke_grant(
    c: &mut Client,
    id: &str,
    at_unix_ms: i64,
) -> Result<Option<ReviewRecord>, StoreError> {
    let changed = c
        .execute(
            "UPDATE access_grants SET until = $2 WHERE review_id = $1 AND until > $2",
            &[&id, &at_unix_ms],
        )
        .await?;
    if changed == 0 {
        return Ok(None);
    }
    notify(&*c, id, true).await?;
    load(&*c, id).await
}

pub(super) async fn expire_due(
    c: &mut Client,
    now_unix_ms: i64,
) -> Result<Vec<ReviewRecord>, StoreError> {
    let tx = c.transaction().await?;
    let ids: Vec<String> = tx
        .query(
            "UPDATE reviews SET status = $1, decided_at = expires_at \
             WHERE status = $2 AND expires_at <= $3 RETURNING id",
            &[&REVIEW_EXPIRED, &REVIEW_PENDING, &now_unix_ms],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in &ids {
        notify(&tx, id, false).await?;
        out.extend(load(&tx, id).await?);
    }
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn mark_used(
    c: &mut Client,
    id: &str,
    at_unix_ms: i64,
) -> Result<bool, StoreError> {
    let changed = c
        .execute(
            "UPDATE reviews SET used_at = $1 WHERE id = $2 AND status = $3 AND used_at IS NULL",
            &[&at_unix_ms, &id, &REVIEW_APPROVED],
        )
        .await?;
    Ok(changed == 1)
}

pub(super) async fn take_rerun(
    c: &mut Client,
    requester: Requester<'_>,
    resource: &str,
    statement_sha256: &str,
    decided_since_unix_ms: i64,
    now_unix_ms: i64,
) -> Result<Option<ReviewRecord>, StoreError> {
    let (who, by) = requester_key(requester);
    let id: Option<String> = c
        .query_opt(
            "UPDATE reviews SET used_at = $1 WHERE id = (SELECT id FROM reviews WHERE kind = 'command' \
             AND status = $2 AND used_at IS NULL AND resource = $4 \
             AND CASE $7::text WHEN 'principal' THEN requester_principal = $3 ELSE requester = $3 END \
             AND statement_sha256 = $5 AND decided_at >= $6 ORDER BY decided_at DESC LIMIT 1 \
             FOR UPDATE SKIP LOCKED) \
             AND used_at IS NULL RETURNING id",
            &[
                &now_unix_ms,
                &REVIEW_APPROVED,
                &who,
                &resource,
                &statement_sha256,
                &decided_since_unix_ms,
                &by,
            ],
        )
        .await?
        .map(|r| r.get(0));
    match id {
        Some(id) => load(&*c, &id).await,
        None => Ok(None),
    }
}

/// The latest-ending grant of an approved review of `kind` for `requester` on `resource` that
/// is in force at `now_unix_ms`.
pub(super) async fn grant(
    c: &mut Client,
    kind: &str,
    requester: Requester<'_>,
    resource: &str,
    now_unix_ms: i64,
) -> Result<Option<GrantRecord>, StoreError> {
    let (who, by) = requester_key(requester);
    let row = c
        .query_opt(
            "SELECT g.review_id, r.kind, g.subject, g.resource, g.granted_at, g.until \
             FROM access_grants g JOIN reviews r ON r.id = g.review_id \
             WHERE r.kind = $1 AND r.status = $2 AND g.resource = $4 \
             AND CASE $6::text WHEN 'principal' THEN r.requester_principal = $3 ELSE g.subject = $3 END \
             AND g.granted_at <= $5 AND g.until > $5 \
             ORDER BY g.until DESC LIMIT 1",
            &[&kind, &REVIEW_APPROVED, &who, &resource, &now_unix_ms, &by],
        )
        .await?;
    row.map(|r| {
        Ok(GrantRecord {
            review_id: r.try_get(0)?,
            kind: r.try_get(1)?,
            subject: r.try_get(2)?,
            resource: r.try_get(3)?,
            granted_at_unix_ms: r.try_get(4)?,
            until_unix_ms: r.try_get(5)?,
        })
    })
    .transpose()
}
