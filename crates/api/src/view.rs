//! The API's JSON shapes. Field names are a contract (the CLI, the web console and SIEM exports
//! read them): add fields, never rename or remove one.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_store::{SessionRow, StoredEvent};

use crate::params::format_time;

/// One session as `GET /api/v1/sessions` and `GET /api/v1/sessions/{id}` return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// RFC 3339, UTC, milliseconds.
    pub started_at: String,
    pub started_at_unix_ms: i64,
    pub ended_at: Option<String>,
    pub ended_at_unix_ms: Option<i64>,
    /// From the connection's first byte to its end (`null` while open).
    pub duration_ms: Option<i64>,
    pub listener: Option<String>,
    pub client_addr: Option<String>,
    pub resource: Option<String>,
    pub subject: Option<String>,
    pub auth_method: Option<String>,
    /// `null` while the session is still open.
    pub outcome: Option<String>,
    /// Commands run (from `session.close`; `null` while open).
    pub commands: Option<i64>,
    pub event_count: i64,
    /// The `session.open` payload (identity, groups, TLS of both legs, ...).
    pub open: Value,
    pub close: Option<Value>,
}

impl From<SessionRow> for Session {
    fn from(r: SessionRow) -> Self {
        let commands = r
            .close
            .as_ref()
            .and_then(|c| c.get("commands"))
            .and_then(Value::as_i64);
        // session.close measures from the first byte (TLS and upstream connect included),
        // which session.open, written once the caller is identified, does not.
        let measured = r
            .close
            .as_ref()
            .and_then(|c| c.get("duration_ms"))
            .and_then(Value::as_i64);
        Session {
            started_at: format_time(r.started_at_unix_ms),
            ended_at: r.ended_at_unix_ms.map(format_time),
            duration_ms: measured.or(r.ended_at_unix_ms.map(|e| e - r.started_at_unix_ms)),
            id: r.id,
            started_at_unix_ms: r.started_at_unix_ms,
            ended_at_unix_ms: r.ended_at_unix_ms,
            listener: r.listener,
            client_addr: r.client_addr,
            resource: r.resource,
            subject: r.subject,
            auth_method: r.auth_method,
            outcome: r.outcome,
            commands,
            event_count: r.event_count,
            open: r.open,
            close: r.close,
        }
    }
}

/// One audit event: in session timelines and, one per line, in exports.
/// `payload` is the exact JSON that was hashed (its canonical form re-encodes to the same bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Store-wide position; an export can resume after it.
    pub id: i64,
    pub session_id: String,
    /// Position within the session, from 1.
    pub seq: i64,
    pub chain_id: String,
    pub chain_seq: i64,
    /// RFC 3339, UTC, milliseconds.
    pub at: String,
    pub at_unix_ms: i64,
    pub kind: String,
    pub payload: Value,
    pub hash: String,
    pub prev_hash: String,
}

impl From<StoredEvent> for Event {
    fn from(e: StoredEvent) -> Self {
        Event {
            id: e.id,
            at: format_time(e.at_unix_ms),
            session_id: e.session_id,
            seq: e.session_seq,
            chain_id: e.chain_id,
            chain_seq: e.chain_seq,
            at_unix_ms: e.at_unix_ms,
            kind: e.kind,
            payload: e.payload,
            hash: e.hash,
            prev_hash: e.prev_hash,
        }
    }
}

/// `GET /api/v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionsPage {
    pub sessions: Vec<Session>,
    /// Pass as `offset` for the next page; `null` on the last page.
    pub next_offset: Option<usize>,
}

/// `GET /api/v1/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDetail {
    pub session: Session,
    pub events: Vec<Event>,
}

/// `GET /api/v1/sessions/{id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<Event>,
}

/// `GET /api/v1/reviews`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewList {
    pub reviews: Vec<tollgate_review::Review>,
}

/// `GET /api/v1/grants`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantList {
    pub grants: Vec<tollgate_review::GrantView>,
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}
