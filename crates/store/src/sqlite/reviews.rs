//! Reviews in SQLite: rows, votes, grants. Every state change is one `UPDATE ... WHERE
//! status = 'pending'` (or a vote inside an IMMEDIATE transaction), so two reviewers, or two
//! gateway processes sharing the file, cannot both finalize a review.
//!
//! Approved access and unmask reviews both keep their grant in `access_grants`; the kind is the
//! granting review's, so every grant lookup joins `reviews` and filters on it (an unmask grant
//! must never let anyone reach a resource, nor an access grant switch masking off).

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::SqliteStore;
use crate::review::*;
use crate::StoreError;

/// Schema for the review workflow: votes, grants, rerun bookkeeping.
pub(super) const MIGRATION: &str = r#"
ALTER TABLE reviews ADD COLUMN kind TEXT NOT NULL DEFAULT 'command';
ALTER TABLE reviews ADD COLUMN statement_sha256 TEXT;
ALTER TABLE reviews ADD COLUMN min_approvals INTEGER NOT NULL DEFAULT 1;
ALTER TABLE reviews ADD COLUMN access_ms INTEGER;
ALTER TABLE reviews ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0;  -- unix ms
ALTER TABLE reviews ADD COLUMN used_at INTEGER;                        -- unix ms
CREATE INDEX reviews_for_rerun ON reviews (requester, resource, statement_sha256, decided_at);
CREATE TABLE review_votes (
    review_id TEXT NOT NULL REFERENCES reviews (id),
    reviewer  TEXT NOT NULL,
    groups    TEXT NOT NULL,     -- JSON array
    approve   INTEGER NOT NULL,
    reason    TEXT,
    at        INTEGER NOT NULL,  -- unix ms
    PRIMARY KEY (review_id, reviewer)
);
CREATE TABLE access_grants (
    review_id  TEXT PRIMARY KEY REFERENCES reviews (id),
    subject    TEXT NOT NULL,
    resource   TEXT NOT NULL,
    granted_at INTEGER NOT NULL,  -- unix ms
    until      INTEGER NOT NULL   -- unix ms
);
CREATE INDEX access_grants_by_subject ON access_grants (subject, resource, until);
"#;

/// Requesters and reviewers are compared by principal: votes are unique per principal (two
/// credentials of one person count once; a token and a certificate that share a subject string
/// are two reviewers). Votes from before keep their reviewer string as principal.
pub(super) const MIGRATION_PRINCIPALS: &str = r#"
ALTER TABLE reviews ADD COLUMN requester_principal TEXT;
CREATE TABLE review_votes_by_principal (
    review_id TEXT NOT NULL REFERENCES reviews (id),
    reviewer  TEXT NOT NULL,
    principal TEXT NOT NULL,
    groups    TEXT NOT NULL,     -- JSON array
    approve   INTEGER NOT NULL,
    reason    TEXT,
    at        INTEGER NOT NULL,  -- unix ms
    PRIMARY KEY (review_id, principal)
);
INSERT INTO review_votes_by_principal (review_id, reviewer, principal, groups, approve, reason, at)
    SELECT review_id, reviewer, reviewer, groups, approve, reason, at FROM review_votes;
DROP TABLE review_votes;
ALTER TABLE review_votes_by_principal RENAME TO review_votes;
"#;

fn read_row(r: &Row<'_>) -> rusqlite::Result<Result<ReviewRecord, StoreError>> {
    let payload: String = r.get(17)?;
    let p: Payload = match serde_json::from_str(&payload) {
        Ok(p) => p,
        Err(e) => return Ok(Err(json_err(e))),
    };
    Ok(Ok(ReviewRecord {
        id: r.get(0)?,
        kind: r.get(1)?,
        session_id: r.get(2)?,
        resource: r.get(3)?,
        requester: r.get(4)?,
        requester_principal: r.get(19)?,
        requester_groups: p.requester_groups,
        rule: r.get(5)?,
        statement: r.get(6)?,
        statement_sha256: r.get(7)?,
        approvers: p.approvers,
        min_approvals: r.get(8)?,
        request_reason: p.request_reason,
        access_ms: r.get(9)?,
        status: r.get(10)?,
        created_at_unix_ms: r.get(11)?,
        expires_at_unix_ms: r.get(12)?,
        decided_at_unix_ms: r.get(13)?,
        decided_by: r.get(14)?,
        decision_reason: r.get(15)?,
        used_at_unix_ms: r.get(16)?,
        grant_until_unix_ms: r.get(18)?,
        votes: Vec::new(),
    }))
}

/// One review with its votes, read on `conn` (inside or outside a transaction).
fn load(conn: &Connection, id: &str) -> Result<Option<ReviewRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} {FROM} WHERE r.id = ?1"))?;
    let Some(rec) = stmt.query_row([id], read_row).optional()? else {
        return Ok(None);
    };
    let mut rec = rec?;
    rec.votes = votes(conn, id)?;
    Ok(Some(rec))
}

fn votes(conn: &Connection, id: &str) -> Result<Vec<VoteRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT reviewer, groups, approve, reason, at, principal FROM review_votes WHERE review_id = ?1 ORDER BY at, reviewer, principal",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (reviewer, groups, approve, reason, at_unix_ms, principal) = row?;
        out.push(VoteRecord {
            reviewer,
            principal,
            groups: serde_json::from_str(&groups).map_err(json_err)?,
            approve,
            reason,
            at_unix_ms,
        });
    }
    Ok(out)
}

impl SqliteStore {
    pub(super) fn sql_review_create(&self, r: &ReviewRecord) -> Result<(), StoreError> {
        let payload = Payload::of(r)?;
        self.writer().execute(
            "INSERT INTO reviews (id, kind, session_id, resource, requester, status, rule, statement, \
             statement_sha256, min_approvals, access_ms, created_at, expires_at, payload, \
             requester_principal) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                r.id,
                r.kind,
                r.session_id,
                r.resource,
                r.requester,
                r.status,
                r.rule,
                r.statement,
                r.statement_sha256,
                r.min_approvals,
                r.access_ms,
                r.created_at_unix_ms,
                r.expires_at_unix_ms,
                payload,
                r.requester_principal
            ],
        )?;
        Ok(())
    }

    pub(super) fn sql_review(&self, id: &str) -> Result<Option<ReviewRecord>, StoreError> {
        load(&self.reader(), id)
    }

    pub(super) fn sql_reviews(&self, f: &ReviewFilter) -> Result<Vec<ReviewRecord>, StoreError> {
        let conn = self.reader();
        let limit = f.limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} {FROM} WHERE (?1 IS NULL OR r.status = ?1) AND (?2 IS NULL OR r.kind = ?2) \
             AND (?3 IS NULL OR r.resource = ?3) AND (?4 IS NULL OR r.requester = ?4) \
             ORDER BY r.created_at DESC, r.id LIMIT ?5"
        ))?;
        let rows = stmt.query_map(
            params![f.status, f.kind, f.resource, f.requester, limit],
            read_row,
        )?;
        let mut out = Vec::new();
        for row in rows {
            let mut rec = row??;
            rec.votes = votes(&conn, &rec.id)?;
            out.push(rec);
        }
        Ok(out)
    }

    pub(super) fn sql_review_vote(&self, v: &ReviewVote) -> Result<VoteOutcome, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(rec) = load(&tx, &v.review_id)? else {
            return Ok(VoteOutcome::NotFound);
        };
        if rec.status != REVIEW_PENDING {
            return Ok(VoteOutcome::NotPending(rec.status));
        }
        if v.at_unix_ms >= rec.expires_at_unix_ms {
            tx.execute(
                "UPDATE reviews SET status = ?1, decided_at = expires_at WHERE id = ?2 AND status = ?3",
                params![REVIEW_EXPIRED, v.review_id, REVIEW_PENDING],
            )?;
            let rec = load(&tx, &v.review_id)?.expect("read in this transaction");
            tx.commit()?;
            return Ok(VoteOutcome::Expired(rec));
        }
        if let Some(refused) = vote_refused(&rec, v) {
            return Ok(refused);
        }
        tx.execute(
            "INSERT INTO review_votes (review_id, reviewer, principal, groups, approve, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                v.review_id,
                v.reviewer,
                v.principal,
                serde_json::to_string(&v.groups).map_err(json_err)?,
                v.approve,
                v.reason,
                v.at_unix_ms
            ],
        )?;
        let decided = vote_decides(&rec, v);
        if let Some(status) = decided {
            tx.execute(
                "UPDATE reviews SET status = ?1, decided_at = ?2, decided_by = ?3, reason = ?4 WHERE id = ?5 AND status = ?6",
                params![status, v.at_unix_ms, v.reviewer, v.reason, v.review_id, REVIEW_PENDING],
            )?;
            if status == REVIEW_APPROVED && grants(&rec.kind) {
                let until = v.at_unix_ms.saturating_add(rec.access_ms.unwrap_or(0));
                tx.execute(
                    "INSERT INTO access_grants (review_id, subject, resource, granted_at, until) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![v.review_id, rec.requester, rec.resource, v.at_unix_ms, until],
                )?;
            }
        }
        let rec = load(&tx, &v.review_id)?.expect("read in this transaction");
        tx.commit()?;
        Ok(VoteOutcome::Recorded(rec))
    }

    pub(super) fn sql_review_close(
        &self,
        id: &str,
        status: &str,
        at_unix_ms: i64,
        reason: Option<&str>,
    ) -> Result<Option<ReviewRecord>, StoreError> {
        let conn = self.writer();
        let changed = conn.execute(
            "UPDATE reviews SET status = ?1, decided_at = ?2, reason = ?3 WHERE id = ?4 AND status = ?5",
            params![status, at_unix_ms, reason, id, REVIEW_PENDING],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        load(&conn, id)
    }

    pub(super) fn sql_review_revoke_grant(
        &self,
        id: &str,
        at_unix_ms: i64,
    ) -> Result<Option<ReviewRecord>, StoreError> {
        let conn = self.writer();
        let changed = conn.execute(
            "UPDATE access_grants SET until = ?2 WHERE review_id = ?1 AND until > ?2",
            params![id, at_unix_ms],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        load(&conn, id)
    }

    pub(super) fn sql_review_expire_due(
        &self,
        now_unix_ms: i64,
    ) -> Result<Vec<ReviewRecord>, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids: Vec<String> = {
            let mut stmt = tx.prepare_cached(
                "UPDATE reviews SET status = ?1, decided_at = expires_at WHERE status = ?2 AND expires_at <= ?3 RETURNING id",
            )?;
            let rows = stmt
                .query_map(params![REVIEW_EXPIRED, REVIEW_PENDING, now_unix_ms], |r| {
                    r.get(0)
                })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            out.extend(load(&tx, id)?);
        }
        tx.commit()?;
        Ok(out)
    }

    pub(super) fn sql_review_mark_used(
        &self,
        id: &str,
        at_unix_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = self.writer().execute(
            "UPDATE reviews SET used_at = ?1 WHERE id = ?2 AND status = ?3 AND used_at IS NULL",
            params![at_unix_ms, id, REVIEW_APPROVED],
        )?;
        Ok(changed == 1)
    }

    pub(super) fn sql_review_take_rerun(
        &self,
        requester: Requester<'_>,
        resource: &str,
        statement_sha256: &str,
        decided_since_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Result<Option<ReviewRecord>, StoreError> {
        let (who, by) = requester_key(requester);
        let conn = self.writer();
        let id: Option<String> = conn
            .query_row(
                "UPDATE reviews SET used_at = ?1 WHERE id = (SELECT id FROM reviews WHERE kind = 'command' \
                 AND status = ?2 AND used_at IS NULL AND resource = ?4 \
                 AND CASE ?7 WHEN 'principal' THEN requester_principal = ?3 ELSE requester = ?3 END \
                 AND statement_sha256 = ?5 AND decided_at >= ?6 ORDER BY decided_at DESC LIMIT 1) \
                 AND used_at IS NULL RETURNING id",
                params![
                    now_unix_ms,
                    REVIEW_APPROVED,
                    who,
                    resource,
                    statement_sha256,
                    decided_since_unix_ms,
                    by
                ],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => load(&conn, &id),
            None => Ok(None),
        }
    }

    /// The latest-ending grant of an approved review of `kind` for `subject` on `resource` that
    /// is in force at `now_unix_ms`.
    pub(super) fn sql_grant(
        &self,
        kind: &str,
        requester: Requester<'_>,
        resource: &str,
        now_unix_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError> {
        let (who, by) = requester_key(requester);
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT g.review_id, r.kind, g.subject, g.resource, g.granted_at, g.until \
             FROM access_grants g JOIN reviews r ON r.id = g.review_id \
             WHERE r.kind = ?1 AND r.status = ?2 AND g.resource = ?4 \
             AND CASE ?6 WHEN 'principal' THEN r.requester_principal = ?3 ELSE g.subject = ?3 END \
             AND g.granted_at <= ?5 AND g.until > ?5 \
             ORDER BY g.until DESC LIMIT 1",
        )?;
        let g = stmt
            .query_row(
                params![kind, REVIEW_APPROVED, who, resource, now_unix_ms, by],
                |r| {
                    Ok(GrantRecord {
                        review_id: r.get(0)?,
                        kind: r.get(1)?,
                        subject: r.get(2)?,
                        resource: r.get(3)?,
                        granted_at_unix_ms: r.get(4)?,
                        until_unix_ms: r.get(5)?,
                    })
                },
            )
            .optional()?;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    fn review(id: &str, kind: &str, min: u32) -> ReviewRecord {
        ReviewRecord {
            id: id.into(),
            kind: kind.into(),
            session_id: Some("s1".into()),
            resource: "orders".into(),
            requester: "agent-7".into(),
            requester_principal: Some("cert:cn:agent-7".into()),
            requester_groups: vec!["agents".into()],
            rule: Some("deletes".into()),
            statement: Some("delete from t where id = $1".into()),
            statement_sha256: Some("ab".repeat(32)),
            approvers: vec!["sre".into()],
            min_approvals: min,
            request_reason: None,
            access_ms: grants(kind).then_some(3_600_000),
            status: REVIEW_PENDING.into(),
            created_at_unix_ms: 1000,
            expires_at_unix_ms: 10_000,
            decided_at_unix_ms: None,
            decided_by: None,
            decision_reason: None,
            used_at_unix_ms: None,
            grant_until_unix_ms: None,
            votes: vec![],
        }
    }

    fn vote(id: &str, who: &str, approve: bool, at: i64) -> ReviewVote {
        ReviewVote {
            review_id: id.into(),
            reviewer: who.into(),
            principal: format!("cert:cn:{who}"),
            groups: vec!["sre".into()],
            approve,
            reason: Some(format!("{who} says so")),
            at_unix_ms: at,
        }
    }

    fn recorded(o: VoteOutcome) -> ReviewRecord {
        match o {
            VoteOutcome::Recorded(r) => r,
            other => panic!("expected a recorded vote, got {other:?}"),
        }
    }

    #[test]
    fn create_read_back_and_list_by_status() {
        let s = SqliteStore::open_in_memory().unwrap();
        let r = review("rv_a", "command", 1);
        s.review_create(&r).unwrap();
        s.review_create(&ReviewRecord {
            created_at_unix_ms: 2000,
            ..review("rv_b", "access", 1)
        })
        .unwrap();
        assert_eq!(s.review("rv_a").unwrap().unwrap(), r);
        assert!(s.review("nope").unwrap().is_none());
        let ids = |f: ReviewFilter| -> Vec<String> {
            s.reviews(&f).unwrap().into_iter().map(|r| r.id).collect()
        };
        assert_eq!(ids(ReviewFilter::default()), ["rv_b", "rv_a"]);
        assert_eq!(
            ids(ReviewFilter {
                kind: Some("access".into()),
                ..Default::default()
            }),
            ["rv_b"]
        );
        recorded(s.review_vote(&vote("rv_a", "bob", false, 1500)).unwrap());
        assert_eq!(
            ids(ReviewFilter {
                status: Some("pending".into()),
                ..Default::default()
            }),
            ["rv_b"]
        );
        assert_eq!(
            ids(ReviewFilter {
                status: Some("denied".into()),
                ..Default::default()
            }),
            ["rv_a"]
        );
    }

    #[test]
    fn votes_are_counted_and_refused_by_principal() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_a", "command", 3)).unwrap();
        let as_principal = |who: &str, principal: &str, at| ReviewVote {
            principal: principal.into(),
            ..vote("rv_a", who, true, at)
        };
        // A token whose subject is the requester's CN is another principal: it is not the requester.
        let r = recorded(
            s.review_vote(&as_principal("agent-7", "token:agent-7", 1100))
                .unwrap(),
        );
        assert_eq!(r.votes[0].principal, "token:agent-7");
        // Two credentials of one principal count once.
        recorded(s.review_vote(&as_principal("bob", "bob", 1200)).unwrap());
        assert_eq!(
            s.review_vote(&as_principal("spiffe://corp/bob", "bob", 1300))
                .unwrap(),
            VoteOutcome::AlreadyVoted
        );
        // The requester under another credential mapped to the same principal.
        s.review_create(&ReviewRecord {
            requester_principal: Some("alice".into()),
            ..review("rv_b", "command", 1)
        })
        .unwrap();
        let alice_token = ReviewVote {
            principal: "alice".into(),
            ..vote("rv_b", "alice-bot", true, 1400)
        };
        assert_eq!(
            s.review_vote(&alice_token).unwrap(),
            VoteOutcome::SelfApproval
        );
        // A review whose requester gave no principal is compared by subject, as before.
        s.review_create(&ReviewRecord {
            requester_principal: None,
            ..review("rv_c", "command", 1)
        })
        .unwrap();
        let same_subject = ReviewVote {
            principal: "token:agent-7".into(),
            ..vote("rv_c", "agent-7", true, 1500)
        };
        assert_eq!(
            s.review_vote(&same_subject).unwrap(),
            VoteOutcome::SelfApproval
        );
        let r = s.review("rv_b").unwrap().unwrap();
        assert_eq!(r.requester_principal.as_deref(), Some("alice"));
    }

    #[test]
    fn two_distinct_approvals_decide_and_a_vote_after_that_is_refused() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_a", "command", 2)).unwrap();
        assert_eq!(
            s.review_vote(&vote("rv_a", "agent-7", true, 1100)).unwrap(),
            VoteOutcome::SelfApproval
        );
        let r = recorded(s.review_vote(&vote("rv_a", "bob", true, 1200)).unwrap());
        assert_eq!((r.status.as_str(), r.votes.len()), ("pending", 1));
        assert_eq!(
            s.review_vote(&vote("rv_a", "bob", true, 1300)).unwrap(),
            VoteOutcome::AlreadyVoted
        );
        let r = recorded(s.review_vote(&vote("rv_a", "carol", true, 1400)).unwrap());
        assert_eq!(r.status, "approved");
        assert_eq!(r.decided_by.as_deref(), Some("carol"));
        assert_eq!(r.decided_at_unix_ms, Some(1400));
        assert_eq!(
            r.votes
                .iter()
                .map(|v| v.reviewer.as_str())
                .collect::<Vec<_>>(),
            ["bob", "carol"]
        );
        assert_eq!(
            s.review_vote(&vote("rv_a", "dave", false, 1500)).unwrap(),
            VoteOutcome::NotPending("approved".into())
        );
        assert_eq!(
            s.review_vote(&vote("zz", "dave", false, 1500)).unwrap(),
            VoteOutcome::NotFound
        );
    }

    #[test]
    fn a_vote_after_the_deadline_expires_the_review_once() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_a", "command", 1)).unwrap();
        let VoteOutcome::Expired(r) = s.review_vote(&vote("rv_a", "bob", true, 10_000)).unwrap()
        else {
            panic!("expected expiry")
        };
        assert_eq!(
            (r.status.as_str(), r.decided_at_unix_ms),
            ("expired", Some(10_000))
        );
        assert!(r.votes.is_empty());
        assert_eq!(
            s.review_vote(&vote("rv_a", "bob", true, 10_001)).unwrap(),
            VoteOutcome::NotPending("expired".into())
        );
    }

    #[test]
    fn expire_due_and_close_change_only_pending_reviews() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_a", "command", 1)).unwrap();
        s.review_create(&ReviewRecord {
            expires_at_unix_ms: 50_000,
            ..review("rv_b", "command", 1)
        })
        .unwrap();
        assert!(s.review_expire_due(9_999).unwrap().is_empty());
        let due = s.review_expire_due(10_000).unwrap();
        assert_eq!(
            due.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["rv_a"]
        );
        assert!(s.review_expire_due(10_000).unwrap().is_empty(), "only once");
        let w = s
            .review_close("rv_b", "withdrawn", 11_000, Some("client went away"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (w.status.as_str(), w.decision_reason.as_deref()),
            ("withdrawn", Some("client went away"))
        );
        assert!(s
            .review_close("rv_b", "expired", 12_000, None)
            .unwrap()
            .is_none());
        assert_eq!(s.review("rv_b").unwrap().unwrap().status, "withdrawn");
    }

    #[test]
    fn rerun_takes_an_approved_statement_once_within_the_window() {
        let s = SqliteStore::open_in_memory().unwrap();
        let sha = "ab".repeat(32);
        s.review_create(&review("rv_a", "command", 1)).unwrap();
        assert!(
            s.review_take_rerun(Requester::Subject("agent-7"), "orders", &sha, 0, 2000)
                .unwrap()
                .is_none(),
            "pending"
        );
        recorded(s.review_vote(&vote("rv_a", "bob", true, 5000)).unwrap());
        assert!(
            s.review_take_rerun(Requester::Subject("agent-7"), "orders", &sha, 5001, 6000)
                .unwrap()
                .is_none(),
            "outside window"
        );
        assert!(s
            .review_take_rerun(
                Requester::Subject("agent-7"),
                "orders",
                &"cd".repeat(32),
                0,
                6000
            )
            .unwrap()
            .is_none());
        assert!(s
            .review_take_rerun(Requester::Subject("mallory"), "orders", &sha, 0, 6000)
            .unwrap()
            .is_none());
        let r = s
            .review_take_rerun(Requester::Subject("agent-7"), "orders", &sha, 5000, 6000)
            .unwrap()
            .unwrap();
        assert_eq!((r.id.as_str(), r.used_at_unix_ms), ("rv_a", Some(6000)));
        assert!(
            s.review_take_rerun(Requester::Subject("agent-7"), "orders", &sha, 0, 7000)
                .unwrap()
                .is_none(),
            "used once"
        );
        assert!(!s.review_mark_used("rv_a", 8000).unwrap());
    }

    #[test]
    fn an_approved_access_review_grants_until_its_duration_ends() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_x", "access", 1)).unwrap();
        assert!(s
            .access_grant(Requester::Subject("agent-7"), "orders", 2000)
            .unwrap()
            .is_none());
        let r = recorded(s.review_vote(&vote("rv_x", "bob", true, 2000)).unwrap());
        assert_eq!(r.grant_until_unix_ms, Some(2000 + 3_600_000));
        let g = s
            .access_grant(Requester::Subject("agent-7"), "orders", 2000)
            .unwrap()
            .unwrap();
        assert_eq!((g.review_id.as_str(), g.until_unix_ms), ("rv_x", 3_602_000));
        assert!(
            s.access_grant(Requester::Subject("agent-7"), "orders", 3_602_000)
                .unwrap()
                .is_none(),
            "expired"
        );
        assert!(s
            .access_grant(Requester::Subject("agent-7"), "billing", 3000)
            .unwrap()
            .is_none());
        assert!(s
            .access_grant(Requester::Subject("bob"), "orders", 3000)
            .unwrap()
            .is_none());
    }

    /// By principal, a grant or an approved rerun belongs to the requester's principal only:
    /// a token sharing the requester's subject gets neither.
    #[test]
    fn grants_and_reruns_by_principal() {
        let s = SqliteStore::open_in_memory().unwrap();
        let sha = "ab".repeat(32);
        s.review_create(&review("rv_x", "access", 1)).unwrap();
        s.review_create(&review("rv_c", "command", 1)).unwrap();
        recorded(s.review_vote(&vote("rv_x", "bob", true, 2000)).unwrap());
        recorded(s.review_vote(&vote("rv_c", "bob", true, 2000)).unwrap());
        let mine = Requester::Principal("cert:cn:agent-7");
        let namesake = Requester::Principal("token:agent-7");
        assert!(s.access_grant(namesake, "orders", 3000).unwrap().is_none());
        assert_eq!(
            s.access_grant(mine, "orders", 3000)
                .unwrap()
                .unwrap()
                .review_id,
            "rv_x"
        );
        assert!(s.unmask_grant(mine, "orders", 3000).unwrap().is_none());
        assert!(s
            .review_take_rerun(namesake, "orders", &sha, 0, 3000)
            .unwrap()
            .is_none());
        let r = s.review_take_rerun(mine, "orders", &sha, 0, 3000).unwrap();
        assert_eq!(r.unwrap().id, "rv_c");
    }

    #[test]
    fn a_revoked_grant_ends_at_once_and_only_once() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_r", "access", 1)).unwrap();
        assert!(
            s.review_revoke_grant("rv_r", 1500).unwrap().is_none(),
            "pending"
        );
        recorded(s.review_vote(&vote("rv_r", "bob", true, 2000)).unwrap());
        let who = Requester::Subject("agent-7");
        assert!(s.access_grant(who, "orders", 3000).unwrap().is_some());
        let r = s.review_revoke_grant("rv_r", 3000).unwrap().unwrap();
        assert_eq!(r.grant_until_unix_ms, Some(3000));
        assert!(s.access_grant(who, "orders", 3000).unwrap().is_none());
        assert!(
            s.review_revoke_grant("rv_r", 4000).unwrap().is_none(),
            "already over"
        );
        assert!(s.review_revoke_grant("rv_nope", 4000).unwrap().is_none());
    }

    #[test]
    fn an_unmask_grant_and_an_access_grant_never_stand_in_for_each_other() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.review_create(&review("rv_u", "unmask", 1)).unwrap();
        assert!(
            s.unmask_grant(Requester::Subject("agent-7"), "orders", 2000)
                .unwrap()
                .is_none(),
            "pending"
        );
        let r = recorded(s.review_vote(&vote("rv_u", "bob", true, 2000)).unwrap());
        assert_eq!(r.grant_until_unix_ms, Some(3_602_000));
        let g = s
            .unmask_grant(Requester::Subject("agent-7"), "orders", 2000)
            .unwrap()
            .unwrap();
        assert_eq!(
            (g.review_id.as_str(), g.kind.as_str(), g.until_unix_ms),
            ("rv_u", "unmask", 3_602_000)
        );
        assert!(
            s.access_grant(Requester::Subject("agent-7"), "orders", 2000)
                .unwrap()
                .is_none(),
            "an unmask grant is not access"
        );

        // An access grant (ending later) for the same subject and resource.
        s.review_create(&review("rv_a", "access", 1)).unwrap();
        recorded(s.review_vote(&vote("rv_a", "bob", true, 3000)).unwrap());
        let a = s
            .access_grant(Requester::Subject("agent-7"), "orders", 3000)
            .unwrap()
            .unwrap();
        assert_eq!((a.review_id.as_str(), a.kind.as_str()), ("rv_a", "access"));
        let u = s
            .unmask_grant(Requester::Subject("agent-7"), "orders", 3000)
            .unwrap()
            .unwrap();
        assert_eq!(u.review_id, "rv_u", "the later access grant is not unmask");

        // The unmask grant ends; the access grant (1s later) still holds, and is still not unmask.
        assert!(s
            .unmask_grant(Requester::Subject("agent-7"), "orders", 3_602_000)
            .unwrap()
            .is_none());
        assert!(s
            .access_grant(Requester::Subject("agent-7"), "orders", 3_602_000)
            .unwrap()
            .is_some());
        assert!(s
            .unmask_grant(Requester::Subject("agent-7"), "billing", 3000)
            .unwrap()
            .is_none());
        assert!(s
            .unmask_grant(Requester::Subject("bob"), "orders", 3000)
            .unwrap()
            .is_none());

        // A denied unmask review and an approved command review grant nothing.
        s.review_create(&review("rv_d", "unmask", 1)).unwrap();
        recorded(s.review_vote(&vote("rv_d", "bob", false, 4000)).unwrap());
        s.review_create(&review("rv_c", "command", 1)).unwrap();
        recorded(s.review_vote(&vote("rv_c", "bob", true, 4000)).unwrap());
        assert_eq!(s.review("rv_c").unwrap().unwrap().grant_until_unix_ms, None);
        assert_eq!(
            s.unmask_grant(Requester::Subject("agent-7"), "orders", 5000)
                .unwrap()
                .unwrap()
                .review_id,
            "rv_u"
        );
        let kinds = |k: &str| -> Vec<String> {
            s.reviews(&ReviewFilter {
                kind: Some(k.into()),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
        };
        assert_eq!(kinds("unmask"), ["rv_d", "rv_u"]);
        assert_eq!(kinds("access"), ["rv_a"]);
    }

    /// Two processes (two connections to one file), many reviewers racing: exactly one final
    /// decision, and the quorum counts each reviewer once.
    #[test]
    fn concurrent_votes_from_two_stores_finalize_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let a = SqliteStore::open(&path).unwrap();
        let b = SqliteStore::open(&path).unwrap();
        for i in 0..20 {
            a.review_create(&review(&format!("rv_{i}"), "command", 1))
                .unwrap();
        }
        let run = |store: &SqliteStore, who: &'static str, approve: bool| {
            (0..20)
                .map(|i| {
                    store
                        .review_vote(&vote(&format!("rv_{i}"), who, approve, 2000))
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let outcomes = std::thread::scope(|sc| {
            let x = sc.spawn(|| run(&a, "bob", true));
            let y = sc.spawn(|| run(&b, "carol", false));
            (x.join().unwrap(), y.join().unwrap())
        });
        for i in 0..20 {
            let (x, y) = (&outcomes.0[i], &outcomes.1[i]);
            let wins = [x, y]
                .iter()
                .filter(|o| matches!(o, VoteOutcome::Recorded(_)))
                .count();
            assert_eq!(wins, 1, "review {i}: {x:?} / {y:?}");
            let r = a.review(&format!("rv_{i}")).unwrap().unwrap();
            assert_eq!(r.votes.len(), 1, "{r:?}");
            let expected = if r.votes[0].approve {
                "approved"
            } else {
                "denied"
            };
            assert_eq!(r.status, expected);
        }
    }
}
