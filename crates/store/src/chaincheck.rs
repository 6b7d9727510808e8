//! The store-independent half of `verify` and `prune`: walking one chain's rows, checking
//! anchors and checkpoints, and choosing a chain's prunable prefix. Each store reads the rows
//! (SQLite, PostgreSQL) and feeds them here, so both apply exactly the same rules.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::hash::{checkpoint_digest, event_hash, HashedFields, GENESIS_HASH};
use crate::{
    ChainBreak, ChainPoint, StoreError, KIND_AUDIT_CHECKPOINT, KIND_AUDIT_PRUNED, PRUNE_CHAIN,
};

/// One chain's stored state, as `verify` read it.
pub(crate) struct ChainState {
    pub chain_id: String,
    pub head: Option<(i64, String)>,
    pub anchor: (i64, String),
}

/// An event row as `verify` reads it: raw, whatever a tamperer left in each column
/// (`None` where an integer column holds something else).
pub(crate) struct RawEvent {
    pub id: i64,
    pub chain_seq: Option<i64>,
    pub session_id: String,
    pub session_seq: Option<i64>,
    pub at_unix_ms: Option<i64>,
    pub kind: Vec<u8>,
    pub payload: Vec<u8>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The break reported when events at or before a chain's anchor are still stored.
pub(crate) fn below_anchor_break(chain: &ChainState, below: i64) -> Option<(u64, ChainBreak)> {
    let anchor_seq = chain.anchor.0;
    (below > 0).then(|| {
        (
            below as u64,
            ChainBreak {
                chain_id: chain.chain_id.clone(),
                chain_seq: anchor_seq,
                event_id: 0,
                session_id: String::new(),
                reason: format!("{below} event(s) at or before the prune anchor (chain_seq {anchor_seq}) are still stored"),
            },
        )
    })
}

/// Walks one chain's rows after its anchor, in `chain_seq` order; [`ChainWalk::finish`] returns
/// the number of rows and the first break. Events that verify are shown to the [`AuditChecks`].
pub(crate) struct ChainWalk<'c> {
    chain: &'c ChainState,
    count: u64,
    first_break: Option<ChainBreak>,
    expected_seq: i64,
    prev_hash: String,
    /// (event id, session id) of the last row that verified.
    last: Option<(i64, String)>,
}

impl<'c> ChainWalk<'c> {
    pub fn new(chain: &'c ChainState) -> Self {
        ChainWalk {
            chain,
            count: 0,
            first_break: None,
            expected_seq: chain.anchor.0 + 1,
            prev_hash: chain.anchor.1.clone(),
            last: None,
        }
    }

    fn brk(&self, seq: i64, id: i64, session_id: &str, reason: String) -> ChainBreak {
        ChainBreak {
            chain_id: self.chain.chain_id.clone(),
            chain_seq: seq,
            event_id: id,
            session_id: session_id.to_string(),
            reason,
        }
    }

    pub fn row(&mut self, r: RawEvent, checks: &mut AuditChecks) {
        self.count += 1;
        if self.first_break.is_some() {
            return; // everything after a break is unanchored; just count it
        }
        let expected_seq = self.expected_seq;
        let Some(seq) = r.chain_seq else {
            self.first_break = Some(self.brk(
                expected_seq,
                r.id,
                &r.session_id,
                "hash mismatch: event content was altered (chain_seq is not an integer)".into(),
            ));
            return;
        };
        if seq != expected_seq {
            let reason = if seq > expected_seq {
                format!("gap: chain_seq {expected_seq} missing (event deleted)")
            } else {
                format!("duplicate chain_seq {seq} (event inserted)")
            };
            self.first_break = Some(self.brk(expected_seq, r.id, &r.session_id, reason));
            return;
        }
        if r.prev_hash != self.prev_hash.as_bytes() {
            self.first_break = Some(self.brk(
                seq,
                r.id,
                &r.session_id,
                "prev_hash does not match predecessor".into(),
            ));
            return;
        }
        let chain_id = self.chain.chain_id.as_str();
        let recomputed = match (r.session_seq, r.at_unix_ms) {
            (Some(session_seq), Some(at_unix_ms)) => Some(event_hash(
                &self.prev_hash,
                &HashedFields {
                    chain_id,
                    chain_seq: seq,
                    session_id: &r.session_id,
                    session_seq,
                    at_unix_ms,
                    kind: &String::from_utf8_lossy(&r.kind),
                    payload: &r.payload,
                },
            )),
            _ => None,
        };
        if recomputed.as_deref().map(str::as_bytes) != Some(r.hash.as_slice()) {
            self.first_break = Some(self.brk(
                seq,
                r.id,
                &r.session_id,
                "hash mismatch: event content was altered".into(),
            ));
            return;
        }
        checks.observe(chain_id, r.id, &r.session_id, &r.kind, &r.payload);
        self.prev_hash = String::from_utf8_lossy(&r.hash).into_owned();
        self.expected_seq += 1;
        self.last = Some((r.id, r.session_id));
    }

    /// The rows seen and the first break, including a head that does not match the rows.
    pub fn finish(self) -> (u64, Option<ChainBreak>) {
        if self.first_break.is_some() {
            return (self.count, self.first_break);
        }
        let last_seq = self.expected_seq - 1;
        let (last_id, last_session) = self.last.clone().unwrap_or((0, String::new()));
        let at_end = |seq, reason| Some(self.brk(seq, last_id, &last_session, reason));
        let head_break = match &self.chain.head {
            None => at_end(
                last_seq,
                "chain head is missing from the chains table".to_string(),
            ),
            Some((head_seq, _)) if *head_seq > last_seq => at_end(
                last_seq + 1,
                format!("gap: chain_seq {} missing (event deleted)", last_seq + 1),
            ),
            Some((head_seq, _)) if *head_seq < last_seq => at_end(
                last_seq,
                format!("chain head is at chain_seq {head_seq} but events continue to {last_seq}"),
            ),
            Some((_, head_hash)) if *head_hash != self.prev_hash => at_end(
                last_seq,
                "chain head hash does not match the last event (event replaced)".to_string(),
            ),
            Some(_) => None,
        };
        (self.count, head_break)
    }
}

struct Checkpoint {
    event_id: i64,
    session_id: String,
    payload: Vec<u8>,
}

/// What `verify` collects while it walks the chains: the anchors attested by `audit.pruned`
/// events (the latest per chain wins) and the `audit.checkpoint` events to check afterwards.
#[derive(Default)]
pub(crate) struct AuditChecks {
    attested: HashMap<String, (i64, String)>,
    checkpoints: Vec<Checkpoint>,
}

impl AuditChecks {
    /// Called for every event that verified, in chain order.
    pub fn observe(
        &mut self,
        chain_id: &str,
        event_id: i64,
        session_id: &str,
        kind: &[u8],
        payload: &[u8],
    ) {
        if kind == KIND_AUDIT_CHECKPOINT.as_bytes() {
            self.checkpoints.push(Checkpoint {
                event_id,
                session_id: session_id.to_string(),
                payload: payload.to_vec(),
            });
        } else if kind == KIND_AUDIT_PRUNED.as_bytes() && chain_id == PRUNE_CHAIN {
            let anchors = serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<ChainPoint>>(v["anchors"].clone()).ok())
                .unwrap_or_default();
            for a in anchors {
                self.attested.insert(a.chain_id, (a.seq, a.hash));
            }
        }
    }

    /// Every (chain, chain_seq) a checkpoint recorded: the hashes `finish` may look up, for a
    /// store that reads them in one query.
    pub fn wanted_hashes(&self) -> Vec<(String, i64)> {
        let mut out: HashSet<(String, i64)> = HashSet::new();
        for cp in &self.checkpoints {
            let heads = serde_json::from_slice::<Value>(&cp.payload)
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<ChainPoint>>(v["heads"].clone()).ok())
                .unwrap_or_default();
            out.extend(heads.into_iter().map(|h| (h.chain_id, h.seq)));
        }
        out.into_iter().collect()
    }

    /// Anchors, then checkpoints; returns the number of checkpoints and the first break.
    /// `hash_at(chain_id, chain_seq)` reads the stored hash of one event.
    pub fn finish(
        self,
        chains: &[ChainState],
        mut hash_at: impl FnMut(&str, i64) -> Result<Option<String>, StoreError>,
    ) -> Result<(u64, Option<ChainBreak>), StoreError> {
        let brk = |chain_id: &str, seq: i64, event_id: i64, session_id: &str, reason: String| {
            Some(ChainBreak {
                chain_id: chain_id.to_string(),
                chain_seq: seq,
                event_id,
                session_id: session_id.to_string(),
                reason,
            })
        };
        let genesis = (0i64, GENESIS_HASH.to_string());
        for c in chains {
            let expected = self.attested.get(&c.chain_id).unwrap_or(&genesis);
            if *expected != c.anchor {
                let reason = if c.anchor.0 == 0 {
                    format!("the chain starts at genesis but the latest audit.pruned event anchors it at chain_seq {}", expected.0)
                } else {
                    format!(
                        "anchor at chain_seq {} is not the one recorded by the latest audit.pruned event ({}): events were deleted outside a recorded prune",
                        c.anchor.0,
                        if expected.0 == 0 { "none".to_string() } else { format!("chain_seq {}", expected.0) }
                    )
                };
                return Ok((0, brk(&c.chain_id, c.anchor.0, 0, "", reason)));
            }
        }
        let by_id: HashMap<&str, &ChainState> =
            chains.iter().map(|c| (c.chain_id.as_str(), c)).collect();
        let mut checked: HashSet<(String, i64, String)> = HashSet::new();
        let count = self.checkpoints.len() as u64;
        for cp in &self.checkpoints {
            let at_cp = |chain: &str, seq: i64, reason: String| {
                brk(chain, seq, cp.event_id, &cp.session_id, reason)
            };
            let parsed: Option<(Vec<ChainPoint>, String)> =
                serde_json::from_slice::<Value>(&cp.payload)
                    .ok()
                    .and_then(|v| {
                        let heads = serde_json::from_value(v["heads"].clone()).ok()?;
                        Some((heads, v["digest"].as_str()?.to_string()))
                    });
            let Some((heads, digest)) = parsed else {
                return Ok((
                    count,
                    at_cp("", 0, "audit.checkpoint payload is unreadable".into()),
                ));
            };
            if checkpoint_digest(&heads) != digest {
                return Ok((
                    count,
                    at_cp(
                        "",
                        0,
                        "audit.checkpoint digest does not match its heads".into(),
                    ),
                ));
            }
            for h in heads {
                if !checked.insert((h.chain_id.clone(), h.seq, h.hash.clone())) {
                    continue;
                }
                let Some(c) = by_id.get(h.chain_id.as_str()) else {
                    return Ok((count, at_cp(&h.chain_id, h.seq, format!("checkpoint event {} names chain {}, which is missing (chain deleted)", cp.event_id, h.chain_id))));
                };
                let last = c.head.as_ref().map_or(0, |h| h.0);
                let matches = if h.seq > last {
                    return Ok((count, at_cp(&h.chain_id, h.seq, format!("checkpoint event {} recorded chain_seq {} but the chain ends at {} (events deleted)", cp.event_id, h.seq, last))));
                } else if h.seq > c.anchor.0 {
                    hash_at(&h.chain_id, h.seq)?.as_deref() == Some(h.hash.as_str())
                } else if h.seq == c.anchor.0 {
                    c.anchor.1 == h.hash
                } else {
                    true // pruned since; the anchor check covers what is left
                };
                if !matches {
                    return Ok((count, at_cp(&h.chain_id, h.seq, format!("checkpoint event {} recorded another hash at this chain_seq (chain rewritten)", cp.event_id))));
                }
            }
        }
        Ok((count, None))
    }
}

/// One event of a chain as the prune rule sees it (module docs of `sqlite/audit.rs`).
pub(crate) struct CutRow {
    pub chain_seq: i64,
    pub session_id: String,
    pub at_unix_ms: i64,
    pub hash: String,
    /// Whether the event's session has a session row.
    pub has_session_row: bool,
    pub session_ended_at: Option<i64>,
}

/// One chain's prunable prefix.
pub(crate) struct Cut {
    pub chain_id: String,
    pub seq: i64,
    pub hash: String,
    pub events: u64,
    pub sessions: Vec<String>,
}

/// The longest prefix of `chain_id` (rows after its anchor, in `chain_seq` order) that may be
/// pruned. `last_of_session(session)` is the session's last `chain_seq` in this chain.
pub(crate) fn find_cut(
    chain_id: &str,
    rows: impl IntoIterator<Item = Result<CutRow, StoreError>>,
    cutoff: i64,
    silent: bool,
    mut last_of_session: impl FnMut(&str) -> Result<i64, StoreError>,
) -> Result<Option<Cut>, StoreError> {
    let mut need = 0i64; // the cut must reach this far not to split a session
    let mut count = 0u64;
    let mut touched: Vec<(i64, String)> = Vec::new(); // (first chain_seq, session) with a row
    let mut seen: HashSet<String> = HashSet::new();
    let mut best: Option<(i64, String, u64)> = None;
    for r in rows {
        let r = r?;
        let expired = match (r.has_session_row, r.session_ended_at) {
            (false, _) => r.at_unix_ms < cutoff,
            (true, Some(end)) => end < cutoff,
            (true, None) => silent,
        };
        if !expired {
            break;
        }
        count += 1;
        if r.has_session_row && seen.insert(r.session_id.clone()) {
            need = need.max(last_of_session(&r.session_id)?);
            touched.push((r.chain_seq, r.session_id));
        }
        if need <= r.chain_seq {
            best = Some((r.chain_seq, r.hash, count));
        }
    }
    Ok(best.map(|(seq, hash, events)| Cut {
        chain_id: chain_id.to_string(),
        seq,
        hash,
        events,
        sessions: touched
            .into_iter()
            .filter(|(first, _)| *first <= seq)
            .map(|(_, s)| s)
            .collect(),
    }))
}
