//! Retention and checkpoints in SQLite: pruning a prefix of each chain behind an attested
//! anchor, listing chain heads, and the anchor and checkpoint checks of `verify`.
//!
//! Prune rule, per chain (the chain of one gateway process runs across all its sessions):
//! remove the longest prefix (from the current anchor) such that
//! - every event in it is *expired*: its session ended before the cutoff; or, for an event
//!   with no session row (scan findings, checkpoints), it happened before the cutoff; or its
//!   session never closed and the whole chain has been silent since before the cutoff (its
//!   gateway is gone: a live gateway appends a checkpoint every `checkpoint_interval`, which
//!   config keeps shorter than the retention);
//! - and no session is split: every session with events in it has all of them in it.
//!
//! So an open session (and everything after its first event) is never pruned, and a long
//! session holds back the prefix behind it until it ends and expires. The chain's new anchor
//! (`chain_seq` and hash of its last pruned event) is stored in `chains` and attested by the
//! `audit.pruned` event appended to [`PRUNE_CHAIN`] in the same transaction; `verify` starts
//! each chain at its anchor and requires the anchor to match the latest `audit.pruned`
//! event that names the chain (or genesis when none does).

use std::time::SystemTime;

use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::{json, Value};

use super::SqliteStore;
use crate::chaincheck::{self, Cut, CutRow};
use crate::hash::{canonical_json, event_hash, HashedFields, GENESIS_HASH};
use crate::{
    unix_ms, ChainPoint, PruneReport, StoreError, KIND_AUDIT_PRUNED, PRUNE_CHAIN, PRUNE_SESSION,
};

/// Each chain's anchor: where verification starts after a prune (0 and genesis before any).
pub(super) const MIGRATION: &str = r#"
ALTER TABLE chains ADD COLUMN anchor_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chains ADD COLUMN anchor_hash TEXT NOT NULL DEFAULT '0000000000000000000000000000000000000000000000000000000000000000';
"#;

impl SqliteStore {
    pub(super) fn sql_chain_heads(&self) -> Result<Vec<ChainPoint>, StoreError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare("SELECT chain_id, last_seq, last_hash FROM chains ORDER BY chain_id")?;
        let rows = stmt.query_map([], |r| {
            Ok(ChainPoint {
                chain_id: r.get(0)?,
                seq: r.get(1)?,
                hash: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn sql_prune(
        &self,
        cutoff_unix_ms: i64,
        dry_run: bool,
    ) -> Result<PruneReport, StoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let chains: Vec<(String, i64, Option<i64>)> = {
            let mut stmt = tx.prepare(
                "SELECT c.chain_id, c.anchor_seq, \
                 (SELECT e.at_unix_ms FROM events e WHERE e.chain_id = c.chain_id \
                  ORDER BY e.chain_seq DESC LIMIT 1) \
                 FROM chains c WHERE c.chain_id <> ?1 ORDER BY c.chain_id",
            )?;
            let rows = stmt.query_map([PRUNE_CHAIN], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut report = PruneReport {
            cutoff_unix_ms,
            dry_run,
            ..PruneReport::default()
        };
        let mut cuts = Vec::new();
        for (chain_id, anchor_seq, last_at) in chains {
            let silent = last_at.is_none_or(|t| t < cutoff_unix_ms);
            if let Some(cut) = find_cut(&tx, &chain_id, anchor_seq, cutoff_unix_ms, silent)? {
                cuts.push(cut);
            }
        }
        if cuts.is_empty() {
            return Ok(report);
        }
        for cut in &cuts {
            report.events += cut.events;
            report.sessions += cut.sessions.len() as u64;
            report.anchors.push(ChainPoint {
                chain_id: cut.chain_id.clone(),
                seq: cut.seq,
                hash: cut.hash.clone(),
            });
        }
        if dry_run {
            return Ok(report); // the transaction rolls back when dropped
        }
        {
            let mut del_events =
                tx.prepare_cached("DELETE FROM events WHERE chain_id = ?1 AND chain_seq <= ?2")?;
            let mut del_session = tx.prepare_cached("DELETE FROM sessions WHERE id = ?1")?;
            let mut anchor = tx.prepare_cached(
                "UPDATE chains SET anchor_seq = ?1, anchor_hash = ?2 WHERE chain_id = ?3",
            )?;
            for cut in &cuts {
                del_events.execute(params![cut.chain_id, cut.seq])?;
                for s in &cut.sessions {
                    del_session.execute([s])?;
                }
                anchor.execute(params![cut.seq, cut.hash, cut.chain_id])?;
            }
        }
        let payload = json!({
            "cutoff_unix_ms": cutoff_unix_ms,
            "sessions": report.sessions,
            "events": report.events,
            "anchors": report.anchors,
        });
        append_one(
            &tx,
            PRUNE_CHAIN,
            PRUNE_SESSION,
            KIND_AUDIT_PRUNED,
            unix_ms(SystemTime::now()),
            &payload,
        )?;
        tx.commit()?;
        Ok(report)
    }
}

/// The longest prefix of `chain_id` after `anchor_seq` that may be pruned (module docs).
fn find_cut(
    tx: &Transaction<'_>,
    chain_id: &str,
    anchor_seq: i64,
    cutoff: i64,
    silent: bool,
) -> Result<Option<Cut>, StoreError> {
    let mut rows_stmt = tx.prepare(
        "SELECT e.chain_seq, e.session_id, e.at_unix_ms, e.hash, s.id IS NOT NULL, s.ended_at_unix_ms \
         FROM events e LEFT JOIN sessions s ON s.id = e.session_id \
         WHERE e.chain_id = ?1 AND e.chain_seq > ?2 ORDER BY e.chain_seq",
    )?;
    let mut last_of_session = tx.prepare_cached(
        "SELECT MAX(chain_seq) FROM events WHERE session_id = ?1 AND chain_id = ?2",
    )?;
    let rows = rows_stmt.query_map(params![chain_id, anchor_seq], |r| {
        Ok(CutRow {
            chain_seq: r.get(0)?,
            session_id: r.get(1)?,
            at_unix_ms: r.get(2)?,
            hash: r.get(3)?,
            has_session_row: r.get(4)?,
            session_ended_at: r.get(5)?,
        })
    })?;
    chaincheck::find_cut(
        chain_id,
        rows.map(|r| r.map_err(StoreError::from)),
        cutoff,
        silent,
        |session| Ok(last_of_session.query_row(params![session, chain_id], |r| r.get(0))?),
    )
}

/// Append one event to `chain_id` inside `tx` (the chain's head is read and moved in `tx`).
fn append_one(
    tx: &Transaction<'_>,
    chain_id: &str,
    session_id: &str,
    kind: &str,
    at_unix_ms: i64,
    payload: &Value,
) -> Result<(), StoreError> {
    let head: Option<(i64, String)> = tx
        .query_row(
            "SELECT last_seq, last_hash FROM chains WHERE chain_id = ?1",
            [chain_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (prev_seq, prev_hash) = head.unwrap_or_else(|| (0, GENESIS_HASH.to_string()));
    let chain_seq = prev_seq + 1;
    let session_seq: i64 = tx.query_row(
        "SELECT COALESCE(MAX(session_seq), 0) + 1 FROM events WHERE session_id = ?1",
        [session_id],
        |r| r.get(0),
    )?;
    let text = canonical_json(payload);
    let hash = event_hash(
        &prev_hash,
        &HashedFields {
            chain_id,
            chain_seq,
            session_id,
            session_seq,
            at_unix_ms,
            kind,
            payload: text.as_bytes(),
        },
    );
    tx.execute(
        "INSERT INTO events (chain_id, chain_seq, session_id, session_seq, at_unix_ms, kind, \
         payload, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            chain_id,
            chain_seq,
            session_id,
            session_seq,
            at_unix_ms,
            kind,
            text,
            prev_hash,
            hash
        ],
    )?;
    let now = unix_ms(SystemTime::now());
    tx.execute(
        "INSERT INTO chains (chain_id, last_seq, last_hash, created_at_unix_ms, updated_at_unix_ms) \
         VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (chain_id) DO UPDATE SET \
         last_seq = excluded.last_seq, last_hash = excluded.last_hash, \
         updated_at_unix_ms = excluded.updated_at_unix_ms",
        params![chain_id, chain_seq, hash, now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        checkpoint_digest, EventInput, HashedEvent, Store, KIND_AUDIT_CHECKPOINT,
        KIND_SESSION_CLOSE, KIND_SESSION_OPEN,
    };
    use rusqlite::Connection;
    use std::time::{Duration, UNIX_EPOCH};

    fn ev(session: &str, kind: &str, ms: u64) -> EventInput {
        let payload = match kind {
            KIND_SESSION_OPEN => json!({"subject": "alice", "resource": "orders"}),
            KIND_SESSION_CLOSE => json!({"outcome": "closed"}),
            _ => json!({"text": format!("{kind} at {ms}")}),
        };
        EventInput {
            session_id: session.into(),
            kind: kind.into(),
            at: UNIX_EPOCH + Duration::from_millis(ms),
            payload,
        }
    }

    fn file_store() -> (tempfile::TempDir, SqliteStore, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = SqliteStore::open(&path).unwrap();
        let raw = Connection::open(&path).unwrap();
        (dir, store, raw)
    }

    /// Chain c1: a (1-3) and b (4-5) closed early, c open (6), d closed (7-8), a scan event (9),
    /// and a checkpoint-like event at 10 s (10) that keeps the chain live for a 5 s cutoff.
    fn seed(store: &SqliteStore) {
        store
            .append(
                "c1",
                &[
                    ev("a", KIND_SESSION_OPEN, 1000),
                    ev("a", "command", 1001),
                    ev("a", KIND_SESSION_CLOSE, 1002),
                    ev("b", KIND_SESSION_OPEN, 1003),
                    ev("b", KIND_SESSION_CLOSE, 1004),
                    ev("c", KIND_SESSION_OPEN, 1005),
                    ev("d", KIND_SESSION_OPEN, 1006),
                    ev("d", KIND_SESSION_CLOSE, 1007),
                    ev("scan-1", "scan.finding", 1008),
                    ev("checkpoint-c1", "heartbeat", 10_000),
                ],
            )
            .unwrap();
    }

    fn assert_ok(store: &SqliteStore) -> crate::VerifyReport {
        let r = store.verify().unwrap();
        assert!(r.first_break.is_none(), "{r:?}");
        r
    }

    fn break_reason(store: &SqliteStore) -> String {
        let r = store.verify().unwrap();
        r.first_break.expect("verify must report a break").reason
    }

    #[test]
    fn prune_removes_the_expired_prefix_and_verify_still_passes() {
        let (_d, store, _raw) = file_store();
        seed(&store);
        let dry = store.prune(5000, true).unwrap();
        assert_eq!((dry.sessions, dry.events), (2, 5));
        assert_eq!(
            store.events("a").unwrap().len(),
            3,
            "a dry run changes nothing"
        );

        let r = store.prune(5000, false).unwrap();
        assert_eq!((r.sessions, r.events), (2, 5), "{r:?}");
        let hash5 = &r.anchors[0];
        assert_eq!((hash5.chain_id.as_str(), hash5.seq), ("c1", 5));
        assert!(store.events("a").unwrap().is_empty());
        assert!(store.session("a").unwrap().is_none());
        assert!(store.session("b").unwrap().is_none());
        // The open session c stops the prefix: c, and d behind it, are kept.
        assert_eq!(store.events("c").unwrap().len(), 1);
        assert!(store.session("d").unwrap().is_some());
        let v = assert_ok(&store);
        assert_eq!(
            (v.chains, v.events),
            (2, 5 + 1),
            "c1 from seq 6, and the prune chain"
        );
        let pruned = store.events(crate::PRUNE_SESSION).unwrap();
        assert_eq!(pruned.len(), 1);
        assert_eq!(pruned[0].kind, KIND_AUDIT_PRUNED);
        assert_eq!(pruned[0].payload["anchors"][0]["seq"], 5);
        assert_eq!(pruned[0].payload["cutoff_unix_ms"], 5000);
        assert_eq!(pruned[0].payload["sessions"], 2);
        // Nothing left to prune: no new audit.pruned event.
        assert_eq!(store.prune(5000, false).unwrap().events, 0);
        assert_eq!(store.events(crate::PRUNE_SESSION).unwrap().len(), 1);
        // A journal replayed after the prune does not bring pruned events back.
        let a1: HashedEvent = HashedEvent {
            chain_id: "c1".into(),
            chain_seq: 1,
            session_id: "a".into(),
            session_seq: 1,
            at_unix_ms: 1000,
            kind: KIND_SESSION_OPEN.into(),
            payload: "{}".into(),
            prev_hash: GENESIS_HASH.into(),
            hash: "x".into(),
        };
        store.import(&[a1]).unwrap();
        assert!(store.events("a").unwrap().is_empty());
        assert_ok(&store);
    }

    #[test]
    fn an_open_session_on_a_live_chain_is_never_pruned_and_no_session_is_split() {
        let (_d, store, _raw) = file_store();
        seed(&store);
        // c closes late; its close lands after the checkpoint, so c spans seq 6..11.
        store
            .append("c1", &[ev("c", KIND_SESSION_CLOSE, 1009)])
            .unwrap();
        let r = store.prune(5000, false).unwrap();
        assert_eq!(
            r.events, 5,
            "only a and b: c would be split by the live checkpoint"
        );
        assert_eq!(store.events("c").unwrap().len(), 2);
        assert_eq!(store.events("d").unwrap().len(), 2);
        // With everything expired (and the chain silent), the rest goes too.
        let r = store.prune(20_000, false).unwrap();
        assert_eq!((r.sessions, r.events), (2, 6), "{r:?}");
        assert_ok(&store);
    }

    #[test]
    fn a_session_left_open_by_a_gone_gateway_is_pruned_once_its_chain_is_silent() {
        let (_d, store, _raw) = file_store();
        store
            .append(
                "dead",
                &[ev("x", KIND_SESSION_OPEN, 1000), ev("x", "command", 1001)],
            )
            .unwrap();
        store
            .append("live", &[ev("y", KIND_SESSION_OPEN, 1000)])
            .unwrap();
        store
            .append("live", &[ev("checkpoint-live", "heartbeat", 9000)])
            .unwrap();
        let r = store.prune(5000, false).unwrap();
        assert_eq!(r.anchors.len(), 1, "{r:?}");
        assert_eq!(r.anchors[0].chain_id, "dead");
        assert!(store.events("x").unwrap().is_empty());
        assert_eq!(
            store.events("y").unwrap().len(),
            1,
            "open on a live chain: kept"
        );
        assert_ok(&store);
    }

    #[test]
    fn verify_after_a_prune_reports_an_edited_kept_event() {
        let (_d, store, raw) = file_store();
        seed(&store);
        store.prune(5000, false).unwrap();
        raw.execute(
            "UPDATE events SET payload = '{\"text\":\"edited\"}' WHERE chain_id = 'c1' AND chain_seq = 7",
            [],
        )
        .unwrap();
        assert_eq!(
            break_reason(&store),
            "hash mismatch: event content was altered"
        );
    }

    #[test]
    fn verify_reports_a_prefix_deleted_without_a_recorded_prune() {
        let (_d, store, raw) = file_store();
        seed(&store);
        raw.execute(
            "DELETE FROM events WHERE chain_id = 'c1' AND chain_seq <= 3",
            [],
        )
        .unwrap();
        assert_eq!(
            break_reason(&store),
            "gap: chain_seq 1 missing (event deleted)"
        );
        // Moving the anchor to hide the gap is caught: no audit.pruned event attests it.
        let hash3: String = raw
            .query_row(
                "SELECT prev_hash FROM events WHERE chain_id = 'c1' AND chain_seq = 4",
                [],
                |r| r.get(0),
            )
            .unwrap();
        raw.execute(
            "UPDATE chains SET anchor_seq = 3, anchor_hash = ?1 WHERE chain_id = 'c1'",
            [hash3],
        )
        .unwrap();
        let reason = break_reason(&store);
        assert!(
            reason.contains("not the one recorded by the latest audit.pruned event"),
            "{reason}"
        );
    }

    #[test]
    fn verify_reports_events_deleted_beyond_a_recorded_prune() {
        let (_d, store, raw) = file_store();
        seed(&store);
        store.prune(5000, false).unwrap();
        assert_ok(&store);
        // Delete seq 6..7 as well and move the anchor past them.
        let hash7: String = raw
            .query_row(
                "SELECT hash FROM events WHERE chain_id = 'c1' AND chain_seq = 7",
                [],
                |r| r.get(0),
            )
            .unwrap();
        raw.execute_batch("DELETE FROM events WHERE chain_id = 'c1' AND chain_seq <= 7")
            .unwrap();
        raw.execute(
            "UPDATE chains SET anchor_seq = 7, anchor_hash = ?1 WHERE chain_id = 'c1'",
            [hash7],
        )
        .unwrap();
        let r = store.verify().unwrap();
        let b = r.first_break.expect("a break");
        assert_eq!((b.chain_id.as_str(), b.chain_seq), ("c1", 7));
        assert!(b.reason.contains("(chain_seq 5)"), "{}", b.reason);
    }

    /// A checkpoint of `store`'s heads, appended to chain `cp`.
    fn checkpoint(store: &SqliteStore, at: u64) {
        let heads = store.chain_heads().unwrap();
        let digest = checkpoint_digest(&heads);
        store
            .append(
                "cp",
                &[EventInput {
                    session_id: "checkpoint-cp".into(),
                    kind: KIND_AUDIT_CHECKPOINT.into(),
                    at: UNIX_EPOCH + Duration::from_millis(at),
                    payload: json!({"heads": heads, "digest": digest}),
                }],
            )
            .unwrap();
    }

    #[test]
    fn verify_checks_checkpoints_against_the_chains() {
        let (_d, store, raw) = file_store();
        seed(&store);
        checkpoint(&store, 11_000);
        assert_eq!(assert_ok(&store).checkpoints, 1);
        store.prune(5000, false).unwrap();
        checkpoint(&store, 12_000);
        assert_eq!(
            assert_ok(&store).checkpoints,
            2,
            "a checkpoint before a prune still verifies"
        );

        // Truncate c1's last event and move its head back: the chain alone looks fine...
        let (prev, prev_seq): (String, i64) = raw
            .query_row(
                "SELECT prev_hash, chain_seq - 1 FROM events WHERE chain_id = 'c1' ORDER BY chain_seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        raw.execute(
            "DELETE FROM events WHERE chain_id = 'c1' AND chain_seq = 10",
            [],
        )
        .unwrap();
        raw.execute(
            "UPDATE chains SET last_seq = ?1, last_hash = ?2 WHERE chain_id = 'c1'",
            params![prev_seq, prev],
        )
        .unwrap();
        // ...but the checkpoints recorded seq 10.
        let b = store.verify().unwrap().first_break.expect("a break");
        assert_eq!((b.chain_id.as_str(), b.chain_seq), ("c1", 10));
        assert!(b.reason.contains("but the chain ends at 9"), "{}", b.reason);
    }

    #[test]
    fn verify_reports_a_chain_rewritten_after_a_checkpoint() {
        let (_d, store, raw) = file_store();
        seed(&store);
        checkpoint(&store, 11_000);
        // Rewrite c1's last event with a recomputed, valid hash, and the head with it.
        let (prev, kind, at): (String, String, i64) = raw
            .query_row(
                "SELECT prev_hash, kind, at_unix_ms FROM events WHERE chain_id = 'c1' AND chain_seq = 10",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let forged = "{\"forged\":true}";
        let hash = event_hash(
            &prev,
            &HashedFields {
                chain_id: "c1",
                chain_seq: 10,
                session_id: "checkpoint-c1",
                session_seq: 1,
                at_unix_ms: at,
                kind: &kind,
                payload: forged.as_bytes(),
            },
        );
        raw.execute(
            "UPDATE events SET payload = ?1, hash = ?2 WHERE chain_id = 'c1' AND chain_seq = 10",
            params![forged, hash],
        )
        .unwrap();
        raw.execute(
            "UPDATE chains SET last_hash = ?1 WHERE chain_id = 'c1'",
            [&hash],
        )
        .unwrap();
        let b = store.verify().unwrap().first_break.expect("a break");
        assert!(b.reason.contains("recorded another hash"), "{}", b.reason);
        // And an edited checkpoint payload is caught by its own chain's hash.
        raw.execute(
            "UPDATE events SET payload = replace(payload, 'c1', 'c9') WHERE chain_id = 'cp'",
            [],
        )
        .unwrap();
        assert_eq!(
            break_reason(&store),
            "hash mismatch: event content was altered"
        );
    }
}
