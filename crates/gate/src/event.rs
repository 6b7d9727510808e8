//! Typed audit events, one struct per kind and one serializer ([`crate::SessionLog::input`]):
//! the store, the API and the CLI read the same field names whatever protocol produced them.
//!
//! Kinds shared by every adapter: `session.open`, `session.close`, `review.*`. HTTP adds
//! `http.request` and `http.response`, and for upgraded WebSockets `ws.message` and `ws.close`.
//! MCP (on HTTP) adds, per JSON-RPC message, `mcp.request` (judged, before it is forwarded),
//! `mcp.response` (an answer, masked) and `mcp.message` (anything else the server sent), and
//! `mcp.session_refused` for a session id used by a principal that did not open it, and with
//! pinning `mcp.pinned` (a tool definition first seen) and `mcp.pin_changed`.
//! PostgreSQL adds, per client command, `command` (judged, before it is forwarded) and
//! `result` (its answer), `command.refused`, `session.terminated`, and its own shapes of
//! `session.open` ([`PgSessionOpen`]) and `session.close` ([`PgSessionClose`]).

use serde::Serialize;
use serde_json::{Map, Value};
use std::time::SystemTime;
use tollgate_store::{canonical_json, CanonicalObject, EventInput};

/// An audit event: its kind, and a payload serialized as a JSON object.
pub trait Event: Serialize {
    fn kind(&self) -> &'static str;

    /// The payload [`to_input`] makes, written as canonical JSON field by field, for the events
    /// of every request (`None`: it goes through a `Value`). Byte for byte what
    /// `canonical_json(&to_input(..).payload)` is: that is the text the chain hash covers.
    fn canonical(&self, _t_us: u64) -> Option<String> {
        None
    }
}

/// The one serializer: the stored form of `event` in session `session_id`, made `at`, `t_us`
/// microseconds after the session began (added to the payload, as every event has it).
pub fn to_input(session_id: &str, event: &impl Event, at: SystemTime, t_us: u64) -> EventInput {
    let mut payload = match serde_json::to_value(event) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    payload.insert("t_us".into(), Value::from(t_us));
    EventInput {
        session_id: session_id.to_string(),
        kind: event.kind().into(),
        at,
        payload: Value::Object(payload),
    }
}

/// [`to_input`]'s payload, turned into the record of a gating event that was refused
/// (`<kind>.refused` with the reason): the evidence is kept.
pub fn refused(mut input: EventInput, reason: &str) -> EventInput {
    input.kind = format!("{}.refused", input.kind);
    input.payload["reason"] = Value::from(reason);
    input
}

/// The TLS parameters of a client or upstream leg.
#[derive(Debug, Clone, Serialize)]
pub struct TlsLeg {
    pub version: Option<String>,
    pub cipher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
}

/// A session begins: who, from where, to which resource.
#[derive(Debug, Clone, Serialize)]
pub struct SessionOpen {
    pub listener: &'static str,
    pub client_addr: String,
    pub subject: String,
    pub groups: Vec<String>,
    pub auth_method: &'static str,
    pub principal: String,
    pub client_cert_fingerprint: Option<String>,
    pub resource: String,
    pub resource_kind: &'static str,
    pub client_tls: TlsLeg,
    /// Adapter facts (grants, protocol version, host name, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Event for SessionOpen {
    fn kind(&self) -> &'static str {
        tollgate_store::KIND_SESSION_OPEN
    }
}

/// A session ends.
#[derive(Debug, Clone, Serialize)]
pub struct SessionClose {
    /// `ok`, `rejected`, `error`, `revoked`, ...
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub duration_ms: u64,
    /// Commands (statements, requests) the session carried.
    pub commands: u64,
}

impl Event for SessionClose {
    fn kind(&self) -> &'static str {
        tollgate_store::KIND_SESSION_CLOSE
    }
}

/// A body as recorded: its size, digest and (masked, clipped) capture.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BodyRecord {
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The first `capture_bytes` (request bodies as sent; response bodies as masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// An HTTP request, as judged (recorded before it is forwarded).
#[derive(Debug, Clone, Serialize)]
pub struct HttpRequest {
    pub n: u64,
    pub method: String,
    /// The normalised path the rules saw and the upstream receives (relative to the resource).
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub version: &'static str,
    pub authority: Option<String>,
    /// Header names and values, secrets redacted.
    pub headers: Vec<(String, String)>,
    pub body: BodyRecord,
    pub decision: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<Value>,
}

impl Event for HttpRequest {
    fn kind(&self) -> &'static str {
        "http.request"
    }

    fn canonical(&self, t_us: u64) -> Option<String> {
        let capture = self.body.capture.as_ref().map_or(0, String::len);
        let mut o = CanonicalObject::with_capacity(
            256 + capture + self.path.len() + headers_len(&self.headers),
        );
        o.opt_str("authority", self.authority.as_deref())
            .object("body", |b| self.body.write(b))
            .value("decision", &self.decision);
        if !self.dry_run.is_empty() {
            o.values("dry_run", &self.dry_run);
        }
        o.str_pairs("headers", &self.headers)
            .str("method", &self.method)
            .uint("n", self.n)
            .str("path", &self.path);
        if let Some(q) = &self.query {
            o.str("query", q);
        }
        o.uint("t_us", t_us).str("version", self.version);
        Some(o.finish())
    }
}

fn headers_len(headers: &[(String, String)]) -> usize {
    headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum()
}

impl BodyRecord {
    /// The fields as serde writes them, in canonical order.
    fn write(&self, o: &mut CanonicalObject) {
        o.uint("bytes", self.bytes);
        if let Some(c) = &self.capture {
            o.str("capture", c);
        }
        if let Some(sha) = &self.sha256 {
            o.str("sha256", sha);
        }
        if self.truncated {
            o.bool("truncated", true);
        }
    }
}

/// The answer to an HTTP request, recorded once its body has passed.
#[derive(Debug, Clone, Serialize)]
pub struct HttpResponse {
    pub n: u64,
    /// `ok` (relayed), `refused` (by the gateway), `upstream_error`, `interrupted`.
    pub outcome: &'static str,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: BodyRecord,
    /// Masking applied: values masked, and the rules or detectors that fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<Value>,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Event for HttpResponse {
    fn kind(&self) -> &'static str {
        "http.response"
    }

    fn canonical(&self, t_us: u64) -> Option<String> {
        let capture = self.body.capture.as_ref().map_or(0, String::len);
        let mut o = CanonicalObject::with_capacity(256 + capture + headers_len(&self.headers));
        o.object("body", |b| self.body.write(b))
            .uint("duration_us", self.duration_us);
        if let Some(e) = &self.error {
            o.str("error", e);
        }
        o.str_pairs("headers", &self.headers);
        if let Some(m) = &self.masked {
            o.value("masked", m);
        }
        o.uint("n", self.n)
            .str("outcome", self.outcome)
            .uint("status", u64::from(self.status))
            .uint("t_us", t_us);
        Some(o.finish())
    }
}

/// Review lifecycle events of a held command, in the held session's log.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewEvent {
    #[serde(skip)]
    pub kind: &'static str,
    pub n: u64,
    pub review: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reviewers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

impl Event for ReviewEvent {
    fn kind(&self) -> &'static str {
        self.kind
    }
}

/// A held command (SQL of either adapter) that did not run (`review.refused`).
#[derive(Debug, Clone, Serialize)]
pub struct ReviewRefused {
    pub n: u64,
    pub review: String,
    /// `denied`, `expired`, `withdrawn` or `unavailable`.
    pub outcome: &'static str,
    pub waited_ms: u64,
}

impl Event for ReviewRefused {
    fn kind(&self) -> &'static str {
        "review.refused"
    }
}

/// One WebSocket message (its fragments reassembled) relayed on an upgraded HTTP request.
#[derive(Debug, Clone, Serialize)]
pub struct WsMessage {
    /// The upgrade request's `n`.
    pub n: u64,
    /// Which side sent it: `client` or `upstream`.
    pub direction: &'static str,
    /// The message's place among those `direction` sent (from 1).
    pub seq: u64,
    /// `text` or `binary`.
    pub opcode: &'static str,
    pub frames: u32,
    /// Size and digest of the message as sent; text captured masked, binary never captured.
    pub body: BodyRecord,
    /// Payload compressed by a negotiated extension (not captured).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub compressed: bool,
    /// `relayed`, `masked` (rewritten for the client), `passed_unmasked`, or `refused`.
    pub outcome: &'static str,
    /// Masking applied to what the client received: values masked, and what fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<Value>,
}

impl Event for WsMessage {
    fn kind(&self) -> &'static str {
        "ws.message"
    }
}

/// The end of a relayed WebSocket: who closed it, with which codes, and what passed.
#[derive(Debug, Clone, Serialize)]
pub struct WsClose {
    pub n: u64,
    /// `closed` (close handshake seen), `gateway` (the gateway closed it), `ended` (a
    /// connection ended without a close frame), `error`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_code: Option<u16>,
    /// The code of a close the gateway sent itself (1008 policy, 1009 too big, 1002 protocol).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub client_messages: u64,
    pub client_bytes: u64,
    pub upstream_messages: u64,
    pub upstream_bytes: u64,
    pub duration_ms: u64,
}

impl Event for WsClose {
    fn kind(&self) -> &'static str {
        "ws.close"
    }
}

/// One JSON-RPC request or notification an MCP client sent, as judged.
#[derive(Debug, Clone, Serialize)]
pub struct McpRequest {
    /// The HTTP request that carried it.
    pub n: u64,
    /// Its JSON-RPC id (`None`: a notification, or a response to the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub method: String,
    /// The tool (`tools/call`), resource URI (`resources/read`) or prompt (`prompts/get`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The call's arguments as JSON text, masked with the resource's masks, clipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
    /// SHA-256 of the arguments' canonical JSON (what an approval binds to with the name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments_sha256: Option<String>,
    pub decision: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<Value>,
    /// A digest (SHA-256, first 16 hex digits) of the `Mcp-Session-Id` the request carried:
    /// the id itself is a bearer secret of the session's owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_session: Option<String>,
}

impl Event for McpRequest {
    fn kind(&self) -> &'static str {
        "mcp.request"
    }
}

/// The answer to one MCP request, as the client received it (masked).
#[derive(Debug, Clone, Serialize)]
pub struct McpResponse {
    pub n: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The request's method and name, when the gateway saw the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `result`, `error` (from the server), `refused` (the gateway answered).
    pub outcome: &'static str,
    /// A tool result with `isError`, or a JSON-RPC error.
    pub is_error: bool,
    /// The result (or error) as JSON text, masked with the resource's masks, clipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Tools a listing left out for this caller (denied by a rule, or changed definitions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<Value>,
    pub duration_us: u64,
}

impl Event for McpResponse {
    fn kind(&self) -> &'static str {
        "mcp.response"
    }
}

/// A message the MCP server sent that answers no request of the client's (a notification or
/// a request of its own), masked.
#[derive(Debug, Clone, Serialize)]
pub struct McpMessage {
    pub n: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<Value>,
}

impl Event for McpMessage {
    fn kind(&self) -> &'static str {
        "mcp.message"
    }
}

/// A request that carried an `Mcp-Session-Id` this caller did not open (or the gateway does
/// not know): refused with 404, as MCP answers an unknown session.
#[derive(Debug, Clone, Serialize)]
pub struct McpSessionRefused {
    pub n: u64,
    /// A digest of the session id (the id itself is a bearer secret of its owner).
    pub mcp_session_sha256: String,
    /// `other_principal` or `unknown`.
    pub reason: &'static str,
}

impl Event for McpSessionRefused {
    fn kind(&self) -> &'static str {
        "mcp.session_refused"
    }
}

/// A stdio MCP server process started for an MCP session (`mcp.process_started`) or ended
/// (`mcp.process_exited`).
#[derive(Debug, Clone, Serialize)]
pub struct McpProcess {
    #[serde(skip)]
    pub kind: &'static str,
    pub pid: u32,
    /// The program (`command[0]`).
    pub program: String,
    /// How it ended (`mcp.process_exited`): "exit status: 0", "signal: 15 (SIGTERM)"...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why the gateway stopped it ("deleted", "idle", "protocol", "shutdown"), when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<&'static str>,
}

impl Event for McpProcess {
    fn kind(&self) -> &'static str {
        self.kind
    }
}

/// A tool definition fingerprinted at its first listing (`mcp.pinned`), seen changed since
/// (`mcp.pin_changed`), or its new definition pinned once a `pin` review approved it
/// (`mcp.pin_approved`).
#[derive(Debug, Clone, Serialize)]
pub struct McpPin {
    #[serde(skip)]
    pub kind: &'static str,
    pub n: u64,
    pub tool: String,
    /// SHA-256 of the definition as pinned.
    pub pinned_sha256: String,
    /// SHA-256 of the definition now listed (`mcp.pin_changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_sha256: Option<String>,
    /// `warn` or `enforce` (`mcp.pin_changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// The `pin` review that decides the new definition (`mcp.pin_changed`,
    /// `mcp.pin_approved`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<String>,
    /// Who approved the new definition (`mcp.pin_approved`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
}

impl Event for McpPin {
    fn kind(&self) -> &'static str {
        self.kind
    }
}

/// A SQL client command as judged (PostgreSQL: Query, Execute, FunctionCall; MySQL: a query,
/// a prepare or execution of a prepared statement, ...): recorded before it is forwarded (a
/// command whose record cannot be written does not run under fail-closed audit).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Command {
    /// The session's command number (from 1), which its `result` repeats.
    pub n: u64,
    /// The wire command. PostgreSQL: `simple` (Query), `extended` (Execute of a portal) or
    /// `function_call`; MySQL: `query`, `prepare`, `execute`, `init_db`, `field_list`,
    /// `change_user`, ...
    pub protocol: &'static str,
    /// The statement, clipped, its values masked by the resource's content detectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// An Execute's bound parameters (secrets redacted, binary ones by size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<Value>>,
    /// `sha256:` over the full text (and a portal's parameters): what an approval binds to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// An Execute's row limit, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<i32>,
    /// The guardrails' decision (with `dry_run` and `opaque` when they apply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Value>,
    /// What it is, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classified: Option<String>,
    /// The full classification of a refused or held command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classification: Option<Value>,
    /// The review that holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<String>,
    /// MySQL: the prepared statement an execution runs (its text is the prepared text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_id: Option<u32>,
}

impl Event for Command {
    fn kind(&self) -> &'static str {
        "command"
    }
}

/// Values masked in a command's answer: by column, and the rule or detector that fired.
#[derive(Debug, Clone, Serialize)]
pub struct MaskedCount {
    pub column: String,
    pub by: String,
    pub values: u64,
}

/// The first rows of a command's answer, as the client received them (masked), clipped.
#[derive(Debug, Clone, Serialize)]
pub struct RowCapture {
    pub columns: Vec<String>,
    /// Each row an array of its values (`null`, text, or `<binary N bytes>`).
    pub rows: Vec<Value>,
    pub truncated: bool,
}

/// The answer to a SQL command (PostgreSQL or MySQL), recorded once it is on its way to the
/// client, rows masked.
#[derive(Debug, Clone, Serialize)]
pub struct CommandResult {
    pub n: u64,
    /// `ok`, `error`, `skipped` (a pipeline aborted before it), `refused` (by the gateway),
    /// `interrupted` (the session ended first).
    pub outcome: &'static str,
    /// `null` when it succeeded.
    pub sqlstate: Option<String>,
    pub rows: u64,
    /// The CommandComplete tag (`SELECT 3`); `null` when there was none.
    pub tag: Option<String>,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<MaskedCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<RowCapture>,
    /// MySQL: the server's (or the gateway's) error number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u16>,
    /// MySQL: the error message the client got (values in it masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Event for CommandResult {
    fn kind(&self) -> &'static str {
        "result"
    }
}

impl CommandResult {
    /// The payload [`to_input`] makes, as canonical JSON, written field by field when there is
    /// nothing masked or captured (the relay's hot path: no `Value` is built).
    pub fn canonical_payload(&self, t_us: u64) -> String {
        if !self.masked.is_empty()
            || self.capture.is_some()
            || self.error_code.is_some()
            || self.message.is_some()
        {
            let input = to_input("", self, SystemTime::UNIX_EPOCH, t_us);
            return canonical_json(&input.payload);
        }
        let mut o = CanonicalObject::new();
        o.uint("duration_us", self.duration_us)
            .uint("n", self.n)
            .str("outcome", self.outcome)
            .uint("rows", self.rows)
            .opt_str("sqlstate", self.sqlstate.as_deref())
            .uint("t_us", t_us)
            .opt_str("tag", self.tag.as_deref());
        o.finish()
    }
}

/// A PostgreSQL statement refused before it had a command number (a Parse in a pipeline that
/// must settle first).
#[derive(Debug, Clone, Serialize)]
pub struct StatementRefused {
    pub reason: &'static str,
    pub protocol: &'static str,
}

impl Event for StatementRefused {
    fn kind(&self) -> &'static str {
        "command.refused"
    }
}

/// More about why a session ended or was refused.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Detail {
    /// The grant that ended: its review.
    Review { review: String },
    /// Why the upstream connection failed.
    Failure { failure: &'static str },
    /// Nothing more (`{}`).
    Empty {},
    /// What the relay reported (`null` when nothing).
    Text(Option<String>),
}

/// The gateway ended a session: its standing ended (certificate, token, grant) or the relay
/// had to stop (a limit, a changed setting).
#[derive(Debug, Clone, Serialize)]
pub struct SessionTerminated {
    pub reason: &'static str,
    /// What ended (a grant's review) or why, as the relay saw it.
    pub detail: Detail,
    /// The error the client was sent, when it was told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Event for SessionTerminated {
    fn kind(&self) -> &'static str {
        "session.terminated"
    }
}

/// A PostgreSQL leg's TLS parameters (`alpn` is recorded even when none was negotiated).
#[derive(Debug, Clone, Serialize)]
pub struct PgTls {
    pub version: String,
    pub cipher: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Option<String>>,
}

/// The client's TLS, once its handshake succeeded.
#[derive(Debug, Clone, Serialize)]
pub struct PgClientLeg {
    pub direct_tls: bool,
    pub client_tls: PgTls,
}

/// What the startup message asked for.
#[derive(Debug, Clone, Serialize)]
pub struct PgStartup {
    pub client_user: String,
    pub database: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// `3.0` or `3.2`.
    pub protocol: String,
}

/// Who the client is, once identified.
#[derive(Debug, Clone, Serialize)]
pub struct PgIdentity {
    pub subject: String,
    pub groups: Vec<String>,
    pub auth_method: &'static str,
    pub client_cert_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_expires_unix: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_not_after_unix: Option<u64>,
}

/// The upstream connection (`upstream_tls` null: plaintext).
#[derive(Debug, Clone, Serialize)]
pub struct PgUpstreamLeg {
    pub upstream_tls: Option<PgTls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_cert_fingerprint: Option<Option<String>>,
}

/// A PostgreSQL session's `session.open`: the facts gathered so far (a connection refused
/// part-way records those it reached).
#[derive(Debug, Clone, Serialize)]
pub struct PgSessionOpen {
    pub listener: &'static str,
    pub client_addr: String,
    #[serde(flatten)]
    pub client: Option<PgClientLeg>,
    #[serde(flatten)]
    pub startup: Option<PgStartup>,
    #[serde(flatten)]
    pub identity: Option<PgIdentity>,
    /// `access_grant` and `unmask_grant`, when a grant let the session in.
    #[serde(flatten)]
    pub grants: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(flatten)]
    pub upstream: Option<PgUpstreamLeg>,
}

impl Event for PgSessionOpen {
    fn kind(&self) -> &'static str {
        tollgate_store::KIND_SESSION_OPEN
    }
}

/// What a PostgreSQL relay carried, for `session.close`.
#[derive(Debug, Clone, Serialize)]
pub struct RelayTotals {
    pub error: Option<String>,
    pub commands: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

/// A PostgreSQL session's `session.close`.
#[derive(Debug, Clone, Serialize)]
pub struct PgSessionClose {
    /// The relay's outcome (`closed`, `client_disconnected`, ...), `terminated`, or `rejected`
    /// (no command ran).
    pub outcome: &'static str,
    pub reason: Option<String>,
    /// A rejected connection's details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
    pub duration_ms: u64,
    /// Absent when the relay was stopped by a termination.
    #[serde(flatten)]
    pub totals: Option<RelayTotals>,
}

impl Event for PgSessionClose {
    fn kind(&self) -> &'static str {
        tollgate_store::KIND_SESSION_CLOSE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The payload as stored (without `t_us`): these tests fail when a key changes, since the
    /// store, `sessions replay`, the API and the console read these names.
    fn payload(event: &impl Event) -> Value {
        let mut input = to_input("s", event, SystemTime::UNIX_EPOCH, 42);
        assert_eq!(input.payload["t_us"], json!(42));
        input.payload.as_object_mut().unwrap().remove("t_us");
        input.payload
    }

    #[test]
    fn a_command_records_what_ran_and_how_it_was_judged() {
        let simple = Command {
            n: 3,
            protocol: "simple",
            text: Some("SELECT 1".into()),
            ..Default::default()
        };
        assert_eq!(simple.kind(), "command");
        assert_eq!(
            payload(&simple),
            json!({"n": 3, "protocol": "simple", "text": "SELECT 1"})
        );
        let held = Command {
            n: 4,
            protocol: "extended",
            text: Some("DELETE FROM t WHERE id = $1".into()),
            params: Some(vec![json!("7"), Value::Null]),
            digest: Some("sha256:ab".into()),
            max_rows: Some(10),
            decision: Some(json!({"action": "review", "rule": "r"})),
            classified: Some("delete on public.t".into()),
            classification: Some(json!({"statements": []})),
            review: Some("rv1".into()),
            statement_id: None,
        };
        assert_eq!(
            payload(&held),
            json!({
                "n": 4, "protocol": "extended", "text": "DELETE FROM t WHERE id = $1",
                "params": ["7", null], "digest": "sha256:ab", "max_rows": 10,
                "decision": {"action": "review", "rule": "r"},
                "classified": "delete on public.t", "classification": {"statements": []},
                "review": "rv1",
            })
        );
        // A fast-path call has no text, and an Execute with no parameters records `[]`.
        let call = Command {
            n: 5,
            protocol: "function_call",
            ..Default::default()
        };
        assert_eq!(payload(&call), json!({"n": 5, "protocol": "function_call"}));
        let refused = refused(
            to_input("s", &call, SystemTime::UNIX_EPOCH, 1),
            "audit_unavailable",
        );
        assert_eq!(refused.kind, "command.refused");
        assert_eq!(
            refused.payload,
            json!({"n": 5, "protocol": "function_call", "t_us": 1, "reason": "audit_unavailable"})
        );
    }

    #[test]
    fn a_result_written_directly_is_the_canonical_json_of_its_serialized_form() {
        let plain = CommandResult {
            n: 7,
            outcome: "ok",
            sqlstate: None,
            rows: 3,
            tag: Some("SELECT \"1\"".into()),
            duration_us: 1234,
            masked: vec![],
            capture: None,
            error_code: None,
            message: None,
        };
        assert_eq!(plain.kind(), "result");
        assert_eq!(
            payload(&plain),
            json!({"n": 7, "outcome": "ok", "sqlstate": null, "rows": 3, "tag": "SELECT \"1\"", "duration_us": 1234})
        );
        let failed = CommandResult {
            sqlstate: Some("23505".into()),
            tag: None,
            outcome: "error",
            ..plain.clone()
        };
        let masked = CommandResult {
            masked: vec![MaskedCount {
                column: "email".into(),
                by: "email".into(),
                values: 2,
            }],
            capture: Some(RowCapture {
                columns: vec!["email".into()],
                rows: vec![json!(["[REDACTED]"]), json!([null])],
                truncated: false,
            }),
            ..plain.clone()
        };
        assert_eq!(
            payload(&masked),
            json!({
                "n": 7, "outcome": "ok", "sqlstate": null, "rows": 3, "tag": "SELECT \"1\"",
                "duration_us": 1234, "masked": [{"column": "email", "by": "email", "values": 2}],
                "capture": {"columns": ["email"], "rows": [["[REDACTED]"], [null]], "truncated": false},
            })
        );
        let mysql_error = CommandResult {
            outcome: "error",
            sqlstate: Some("23000".into()),
            tag: None,
            error_code: Some(1062),
            message: Some("Duplicate entry '[REDACTED]' for key 'PRIMARY'".into()),
            ..plain.clone()
        };
        assert_eq!(payload(&mysql_error)["error_code"], 1062);
        for r in [plain, failed, masked, mysql_error] {
            let want = canonical_json(&to_input("s", &r, SystemTime::UNIX_EPOCH, u64::MAX).payload);
            assert_eq!(r.canonical_payload(u64::MAX), want);
        }
    }

    #[test]
    fn http_events_written_directly_are_the_canonical_json_of_their_serialized_form() {
        let odd = "q\"b\\s\u{0}\u{1f}é😀\r\n";
        let headers = vec![
            ("accept".to_string(), "*/*".to_string()),
            ("authorization".to_string(), "[redacted]".to_string()),
            ("x-odd".to_string(), odd.to_string()),
        ];
        let body = BodyRecord {
            bytes: 12,
            sha256: Some("ab".repeat(32)),
            capture: Some(odd.to_string()),
            truncated: true,
        };
        let request = HttpRequest {
            n: 3,
            method: "POST as DELETE".into(),
            path: "/a b/é".into(),
            query: Some("x=1&y=\"".into()),
            version: "HTTP/2",
            authority: Some("api.example:8443".into()),
            headers: headers.clone(),
            body: body.clone(),
            decision: json!({"action": "deny", "rule": odd, "n": [1, 2.5, null]}),
            dry_run: vec![json!({"action": "review", "rule": "r"}), json!(null)],
        };
        let bare = HttpRequest {
            query: None,
            authority: None,
            headers: vec![],
            body: BodyRecord::default(),
            dry_run: vec![],
            ..request.clone()
        };
        let response = HttpResponse {
            n: 3,
            outcome: "ok",
            status: 200,
            headers,
            body,
            masked: Some(json!({"values": 2, "by": ["email"]})),
            duration_us: 1234,
            error: Some(odd.into()),
        };
        let plain = HttpResponse {
            masked: None,
            error: None,
            headers: vec![],
            body: BodyRecord {
                bytes: 0,
                sha256: None,
                capture: None,
                truncated: false,
            },
            ..response.clone()
        };
        for t_us in [0, u64::MAX] {
            for r in [&request, &bare] {
                let want = canonical_json(&to_input("s", r, SystemTime::UNIX_EPOCH, t_us).payload);
                assert_eq!(r.canonical(t_us).as_deref(), Some(want.as_str()));
            }
            for r in [&response, &plain] {
                let want = canonical_json(&to_input("s", r, SystemTime::UNIX_EPOCH, t_us).payload);
                assert_eq!(r.canonical(t_us).as_deref(), Some(want.as_str()));
            }
        }
    }

    #[test]
    fn review_and_termination_events_keep_their_keys() {
        let refused = ReviewRefused {
            n: 2,
            review: "rv".into(),
            outcome: "denied",
            waited_ms: 5,
        };
        assert_eq!(refused.kind(), "review.refused");
        assert_eq!(
            payload(&refused),
            json!({"n": 2, "review": "rv", "waited_ms": 5, "outcome": "denied"})
        );
        let approved = ReviewEvent {
            kind: "review.approved",
            n: 2,
            review: "rv".into(),
            reviewers: vec!["bob".into()],
            waited_ms: Some(5),
        };
        assert_eq!(
            payload(&approved),
            json!({"n": 2, "review": "rv", "reviewers": ["bob"], "waited_ms": 5})
        );
        let pipeline = StatementRefused {
            reason: "unsettled_pipeline",
            protocol: "extended",
        };
        assert_eq!(pipeline.kind(), "command.refused");
        assert_eq!(
            payload(&pipeline),
            json!({"reason": "unsettled_pipeline", "protocol": "extended"})
        );
        let by_relay = SessionTerminated {
            reason: "limit_reached",
            detail: Detail::Text(None),
            sqlstate: None,
            message: None,
        };
        assert_eq!(by_relay.kind(), "session.terminated");
        assert_eq!(
            payload(&by_relay),
            json!({"reason": "limit_reached", "detail": null})
        );
        let by_standing = SessionTerminated {
            reason: "access_grant_revoked",
            detail: Detail::Review {
                review: "rv".into(),
            },
            sqlstate: Some("57P01"),
            message: Some("ended".into()),
        };
        assert_eq!(
            payload(&by_standing),
            json!({"reason": "access_grant_revoked", "detail": {"review": "rv"}, "sqlstate": "57P01", "message": "ended"})
        );
        assert_eq!(serde_json::to_value(Detail::Empty {}).unwrap(), json!({}));
        assert_eq!(
            serde_json::to_value(Detail::Failure { failure: "tls" }).unwrap(),
            json!({"failure": "tls"})
        );
        assert_eq!(
            serde_json::to_value(Detail::Text(Some("x".into()))).unwrap(),
            json!("x")
        );
    }

    #[test]
    fn a_postgres_session_records_the_facts_it_reached() {
        let mut open = PgSessionOpen {
            listener: "postgres",
            client_addr: "127.0.0.1:5".into(),
            client: None,
            startup: None,
            identity: None,
            grants: Map::new(),
            resource: None,
            upstream: None,
        };
        assert_eq!(open.kind(), "session.open");
        assert_eq!(
            payload(&open),
            json!({"listener": "postgres", "client_addr": "127.0.0.1:5"})
        );
        open.client = Some(PgClientLeg {
            direct_tls: false,
            client_tls: PgTls {
                version: "TLSv1.3".into(),
                cipher: "C".into(),
                alpn: Some(None),
            },
        });
        open.startup = Some(PgStartup {
            client_user: "app".into(),
            database: "orders".into(),
            application_name: None,
            protocol: "3.0".into(),
        });
        open.identity = Some(PgIdentity {
            subject: "alice".into(),
            groups: vec!["dev".into()],
            auth_method: "cert",
            client_cert_fingerprint: None,
            token_expires_unix: None,
            client_cert_not_after_unix: Some(9),
        });
        open.grants.insert(
            "access_grant".into(),
            json!({"review": "rv", "until_unix": 1}),
        );
        open.resource = Some("orders".into());
        open.upstream = Some(PgUpstreamLeg {
            upstream_tls: Some(PgTls {
                version: "TLSv1.3".into(),
                cipher: "C".into(),
                alpn: None,
            }),
            upstream_cert_fingerprint: Some(Some("ff".into())),
        });
        assert_eq!(
            payload(&open),
            json!({
                "listener": "postgres", "client_addr": "127.0.0.1:5", "direct_tls": false,
                "client_tls": {"version": "TLSv1.3", "cipher": "C", "alpn": null},
                "client_user": "app", "database": "orders", "protocol": "3.0",
                "subject": "alice", "groups": ["dev"], "auth_method": "cert",
                "client_cert_fingerprint": null, "client_cert_not_after_unix": 9,
                "access_grant": {"review": "rv", "until_unix": 1}, "resource": "orders",
                "upstream_tls": {"version": "TLSv1.3", "cipher": "C"},
                "upstream_cert_fingerprint": "ff",
            })
        );
        open.upstream = Some(PgUpstreamLeg {
            upstream_tls: None,
            upstream_cert_fingerprint: None,
        });
        let p = payload(&open);
        assert_eq!(p["upstream_tls"], Value::Null);
        assert!(p.get("upstream_cert_fingerprint").is_none());

        let rejected = PgSessionClose {
            outcome: "rejected",
            reason: Some("forbidden".into()),
            detail: Some(Detail::Empty {}),
            duration_ms: 3,
            totals: None,
        };
        assert_eq!(rejected.kind(), "session.close");
        assert_eq!(
            payload(&rejected),
            json!({"outcome": "rejected", "reason": "forbidden", "detail": {}, "duration_ms": 3})
        );
        let closed = PgSessionClose {
            outcome: "closed",
            reason: None,
            detail: None,
            duration_ms: 3,
            totals: Some(RelayTotals {
                error: None,
                commands: 2,
                bytes_from_client: 10,
                bytes_to_client: 20,
            }),
        };
        assert_eq!(
            payload(&closed),
            json!({
                "outcome": "closed", "reason": null, "duration_ms": 3, "error": null,
                "commands": 2, "bytes_from_client": 10, "bytes_to_client": 20,
            })
        );
    }
}
