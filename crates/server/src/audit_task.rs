//! Audit housekeeping inside the gateway: the retention prune (`server.retention`, at start and
//! then periodically) and checkpoints of every chain head (`server.checkpoint_interval`), which
//! are recorded as `audit.checkpoint` events and logged on one line for an external system.
//! On a shared store only the cluster's leader runs them (see `replica_task`).

use crate::replica_task::Leadership;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tollgate_store::{
    checkpoint_digest, unix_ms, ChainPoint, EventInput, PruneReport, Recorder, Store, StoreError,
    KIND_AUDIT_CHECKPOINT,
};

/// How often the retention prune runs: a quarter of the retention, between 1 s and 1 h.
pub(crate) fn prune_period(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Prune what ended before now − `retention` (blocking: one SQLite transaction).
pub fn prune_now(
    store: &dyn Store,
    retention: Duration,
    dry_run: bool,
) -> Result<PruneReport, StoreError> {
    let cutoff = unix_ms(
        SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    );
    store.prune(cutoff, dry_run)
}

pub(crate) async fn prune_loop(store: Arc<dyn Store>, retention: Duration, leader: Leadership) {
    let mut tick = tokio::time::interval(prune_period(retention));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !leader.leads() {
            continue;
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || prune_now(&*s, retention, false)).await {
            Ok(Ok(r)) if r.events > 0 => tracing::info!(
                sessions = r.sessions,
                events = r.events,
                cutoff_unix_ms = r.cutoff_unix_ms,
                chains = r.anchors.len(),
                "audit retention: pruned sessions that ended before the cutoff"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit retention: prune failed; retrying later")
            }
            Err(e) => tracing::error!(error = %e, "audit retention: prune task failed"),
        }
    }
}

/// `chain:seq:hash` for each head, comma-separated: the log line's copyable form.
pub(crate) fn heads_text(heads: &[ChainPoint]) -> String {
    heads
        .iter()
        .map(|h| format!("{}:{}:{}", h.chain_id, h.seq, h.hash))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) async fn checkpoint_loop(
    store: Arc<dyn Store>,
    recorder: Recorder,
    chain_id: String,
    every: Duration,
    leader: Leadership,
) {
    let session_id = format!("checkpoint-{chain_id}");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !leader.leads() {
            continue;
        }
        let s = store.clone();
        let heads = match tokio::task::spawn_blocking(move || s.chain_heads()).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit checkpoint: cannot read the chain heads");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint task failed");
                continue;
            }
        };
        let digest = checkpoint_digest(&heads);
        tracing::info!(
            digest = %digest,
            chains = heads.len(),
            heads = %heads_text(&heads),
            "audit checkpoint"
        );
        recorder.record(EventInput {
            session_id: session_id.clone(),
            kind: KIND_AUDIT_CHECKPOINT.into(),
            at: SystemTime::now(),
            payload: serde_json::json!({ "heads": heads, "digest": digest }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_period_is_a_quarter_of_retention_within_bounds() {
        assert_eq!(prune_period(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            prune_period(Duration::from_secs(400)),
            Duration::from_secs(100)
        );
        assert_eq!(
            prune_period(Duration::from_secs(90 * 86400)),
            Duration::from_secs(3600)
        );
    }
}
