//! Typed audit events, one struct per kind and one serializer ([`crate::SessionLog::input`]):
//! the store, the API and the CLI read the same field names whatever protocol produced them.
//!
//! Kinds shared by every adapter: `session.open`, `session.close`, `review.*`. HTTP adds
//! `http.request` and `http.response`, and for upgraded WebSockets `ws.message` and `ws.close`.
//! MCP (on HTTP) adds, per JSON-RPC message, `mcp.request` (judged, before it is forwarded),
//! `mcp.response` (an answer, masked) and `mcp.message` (anything else the server sent), and
//! `mcp.session_refused` for a session id used by a principal that did not open it, and with
//! pinning `mcp.pinned` (a tool definition first seen) and `mcp.pin_changed`.
//! (PostgreSQL's `command` and `result` are still written by its relay.)

use serde::Serialize;
use serde_json::{Map, Value};

/// An audit event: its kind, and a payload serialized as a JSON object.
pub trait Event: Serialize {
    fn kind(&self) -> &'static str;
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

/// A tool definition fingerprinted at its first listing (`mcp.pinned`), or seen changed since
/// (`mcp.pin_changed`).
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
}

impl Event for McpPin {
    fn kind(&self) -> &'static str {
        self.kind
    }
}

/// A SQL command as judged, recorded before it is forwarded (MySQL adapter; PostgreSQL's
/// relay writes the same kind and field names untyped).
#[derive(Debug, Clone, Serialize)]
pub struct SqlCommand {
    pub n: u64,
    /// The wire command: `query`, `prepare`, `execute`, `init_db`, `field_list`, ...
    pub protocol: &'static str,
    /// The SQL text, clipped (a prepared statement's execution shows the prepared text).
    pub text: String,
    /// SHA-256 of the full text when `text` was clipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_id: Option<u32>,
    /// One line per statement: kind, tables, functions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classified: Option<String>,
    pub decision: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<Value>,
}

impl Event for SqlCommand {
    fn kind(&self) -> &'static str {
        "command"
    }
}

/// How a SQL command ended, as the client saw it (rows masked).
#[derive(Debug, Clone, Serialize)]
pub struct SqlResult {
    pub n: u64,
    /// `ok`, `error` (from the server) or `refused` (by the gateway).
    pub outcome: &'static str,
    pub rows: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Values masked, and the rules or detectors that fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<Value>,
    pub duration_us: u64,
}

impl Event for SqlResult {
    fn kind(&self) -> &'static str {
        "result"
    }
}
