//! Attempts refused before anyone was identified (plaintext, garbage, failed handshakes,
//! unknown tokens, connection caps, unauthenticated API requests) are recorded in aggregate:
//! at most one `connection.refused` event per reason and interval, with the count and a few
//! sample source addresses. A flood of attempts therefore costs a tally (and the caller's
//! counter), not one audit event each.

use crate::{EventInput, Recorder};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Sample addresses kept per reason and interval.
const MAX_SAMPLES: usize = 8;
/// Distinct addresses counted per reason and interval (beyond it the count says "at least").
const MAX_DISTINCT: usize = 1024;

#[derive(Default)]
struct Tally {
    count: u64,
    sources: Vec<IpAddr>,
    distinct: std::collections::HashSet<IpAddr>,
}

/// Refusals since the last summary, by reason.
pub struct Refusals {
    listener: &'static str,
    /// The audit session under which summaries are recorded (one per process).
    session: String,
    pending: Mutex<BTreeMap<&'static str, Tally>>,
}

impl Refusals {
    pub fn new(listener: &'static str, session: String) -> Self {
        Refusals {
            listener,
            session,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// Count one refused attempt. `reason` is a fixed label, never client input.
    pub fn record(&self, reason: &'static str, source: IpAddr) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let t = p.entry(reason).or_default();
        t.count += 1;
        if t.distinct.len() < MAX_DISTINCT
            && t.distinct.insert(source)
            && t.sources.len() < MAX_SAMPLES
        {
            t.sources.push(source);
        }
    }

    /// The summary events of the interval that just ended (one per reason seen), and a fresh tally.
    pub fn drain(&self, interval: Duration) -> Vec<EventInput> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        pending
            .into_iter()
            .map(|(reason, t)| EventInput {
                session_id: self.session.clone(),
                kind: "connection.refused".into(),
                at: SystemTime::now(),
                payload: json!({
                    "listener": self.listener,
                    "reason": reason,
                    "count": t.count,
                    "interval_ms": interval.as_millis() as u64,
                    "distinct_sources": t.distinct.len(),
                    "distinct_sources_capped": t.distinct.len() >= MAX_DISTINCT,
                    "sample_sources": t.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                }),
            })
            .collect()
    }

    /// Record a summary every `every` until the task is aborted.
    pub async fn summary_loop(self: std::sync::Arc<Self>, recorder: Recorder, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for e in self.drain(every) {
                recorder.record(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_becomes_one_event_per_reason_with_a_count() {
        let r = Refusals::new("postgres", "s1".into());
        for i in 0..2000u32 {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            r.record("plaintext", ip);
        }
        r.record("timeout", IpAddr::from([127, 0, 0, 1]));
        let evs = r.drain(Duration::from_secs(5));
        assert_eq!(evs.len(), 2);
        let plain = evs
            .iter()
            .find(|e| e.payload["reason"] == "plaintext")
            .unwrap();
        assert_eq!(plain.kind, "connection.refused");
        assert_eq!(plain.payload["count"], 2000);
        assert_eq!(plain.payload["distinct_sources"], 1024);
        assert_eq!(plain.payload["distinct_sources_capped"], true);
        assert_eq!(
            plain.payload["sample_sources"].as_array().unwrap().len(),
            MAX_SAMPLES
        );
        // The tally starts again.
        assert!(r.drain(Duration::from_secs(5)).is_empty());
    }
}
