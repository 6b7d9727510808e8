//! A session's audit log: its id, the facts `session.open` records, and the events that follow,
//! each stamped with wall-clock time (`at`) and `t_us`, microseconds since the session began on
//! a monotonic clock (so replay keeps order and pacing when the wall clock steps).

use crate::event::Event;
use std::time::{Instant, SystemTime};
use tollgate_store::{CanonicalEvent, EventInput, Recorder, StoreError};

pub struct SessionLog {
    pub id: String,
    pub started: Instant,
    recorder: Recorder,
}

/// A fresh session id: milliseconds since the epoch (hex) and 48 random bits, so ids sort by
/// start time and cannot be guessed.
pub fn new_session_id() -> String {
    let mut r = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{ms:012x}{}", hex::encode(r))
}

impl SessionLog {
    pub fn new(recorder: Recorder) -> SessionLog {
        SessionLog {
            id: new_session_id(),
            started: Instant::now(),
            recorder,
        }
    }

    /// Microseconds since the session began.
    pub fn t_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// The stored form of `event`, made now.
    pub fn input(&self, event: &impl Event) -> EventInput {
        crate::event::to_input(&self.id, event, SystemTime::now(), self.t_us())
    }

    /// The stored form of `event` with its payload written as canonical JSON directly, when
    /// its kind can be (see [`Event::canonical`]).
    fn canonical_input(&self, event: &impl Event) -> Option<CanonicalEvent> {
        let payload = event.canonical(self.t_us())?;
        Some(CanonicalEvent {
            session_id: self.id.clone(),
            kind: event.kind().into(),
            at: SystemTime::now(),
            payload,
        })
    }

    /// Record an event that gates nothing (it is journaled even while the store is stalled).
    pub fn record(&self, event: &impl Event) {
        match self.canonical_input(event) {
            Some(ev) => self.recorder.record_canonical(vec![ev]),
            None => self.recorder.record(self.input(event)),
        }
    }

    /// Record an event that gates a command: `Err` means it may not be recorded, and the
    /// command it describes must not run (fail closed).
    pub async fn append(&self, event: &impl Event) -> Result<(), StoreError> {
        match self.canonical_input(event) {
            Some(ev) => self.recorder.append_canonical_async(vec![ev]).await,
            None => self.recorder.append_async(&[self.input(event)]).await,
        }
    }

    /// [`SessionLog::append`]'s input, recorded anyway as refused (the evidence is kept).
    pub fn record_refused(&self, event: &impl Event, reason: &str) {
        self.recorder
            .record(crate::event::refused(self.input(event), reason));
    }
}
