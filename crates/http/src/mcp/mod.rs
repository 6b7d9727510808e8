//! MCP resources (`kind = "mcp"`): the streamable-HTTP transport (protocol 2024-11-05 through
//! 2025-11-25) on the HTTP adapter. The HTTP leg (identity, access, body limits, headers,
//! upstream TLS and credential) is the adapter's; here each JSON-RPC message of a POST is
//! parsed ([`jsonrpc`]), judged by the resource's rules (tool, resource URI or prompt and the
//! call's arguments), recorded, held for review when a rule says so, and forwarded only when
//! every message of the body may run. The answer (JSON or server-sent events, each event one
//! message) is read message by message: listings leave out the tools this caller may not call,
//! results are masked ([`masking`]) and each answer is recorded.
//!
//! An `Mcp-Session-Id` the upstream hands out in answer to `initialize` belongs to the principal
//! that opened it: another caller presenting it, or an id the gateway never saw, gets 404, which
//! MCP clients read as "start a new session".

mod jsonrpc;
mod masking;
pub mod pin;
mod stdio;
mod tasks;

pub(crate) use stdio::StdioServers;
pub(crate) use tasks::HeldTasks;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tollgate_gate::event::{
    BodyRecord, HttpRequest, HttpResponse, McpMessage, McpPin, McpRequest, McpResponse,
    McpSessionRefused, ReviewEvent,
};
use tollgate_gate::hold::{self, HoldRequest, Opened};
use tollgate_gate::rules::{Caller, CommandKind, Decision, Judgement};
use tollgate_gate::{Access, Command, Identity};
use tollgate_mask::BodyPlan;
use tollgate_metrics::registry;
use tollgate_review::{PinChange, PinDecision, PinStatus, Reviews, Verdict};
use tollgate_store::PinSeen;

use crate::relay::{capture, forwarded_headers, reasons_json, recorded_headers, upstream_failed};
use crate::serve::ConnCtx;
use crate::upstream::UpstreamBody;
use crate::{micros, HttpGateway, HttpSession, Target};

/// Protocol versions whose streamable-HTTP transport tollgate understands. A request naming
/// another (`MCP-Protocol-Version`), or a server choosing another in `initialize`, is refused:
/// a revision that moves what the gateway judges (the stateless 2026 revision carries method
/// and name in headers too) must not pass unjudged.
pub const PROTOCOL_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// The stateless revision: no sessions, POST only, every request's method and name in
/// `Mcp-Method`/`Mcp-Name` headers that must match its body, its version in `_meta`.
pub const STATELESS_VERSION: &str = "2026-07-28";

/// Largest single message of an answer (a JSON body, or one server-sent event) the gateway
/// holds to mask it; past it the answer is cut off.
pub const MAX_MESSAGE: usize = 16 << 20;

/// What the upstreams created for a caller, by resource and id, and the principal whose
/// request created each: sessions (`Mcp-Session-Id`) and tasks (`taskId`).
#[derive(Default)]
pub(crate) struct Owners(Mutex<HashMap<(String, String), String>>);

/// Most ids remembered; past it the oldest half is forgotten (a session's client re-initialises
/// on the 404 it then gets; a task is then not found).
const MAX_SESSIONS: usize = 100_000;

impl Owners {
    fn bind(&self, resource: &str, id: &str, principal: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_SESSIONS {
            let drop: Vec<_> = m.keys().take(MAX_SESSIONS / 2).cloned().collect();
            for k in drop {
                m.remove(&k);
            }
        }
        m.insert(
            (resource.to_string(), id.to_string()),
            principal.to_string(),
        );
    }

    pub(crate) fn owner(&self, resource: &str, id: &str) -> Option<String> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(resource.to_string(), id.to_string())).cloned()
    }

    fn forget(&self, resource: &str, id: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(resource.to_string(), id.to_string()));
    }
}

/// Tool descriptions as last listed (shown to the reviewer of a held call), and what calls
/// learn of pins: the pins themselves live in the store (`Reviews::pin_seen`), so neither a
/// restart nor another replica forgets one.
#[derive(Default)]
pub(crate) struct Pins {
    /// Each tool's description as last listed.
    described: Mutex<HashMap<(String, String), String>>,
    /// Per resource and tool: when the store last said its calls are free (its definition is
    /// the pinned one). Cleared for a tool whenever a listing here sees it.
    free: Mutex<HashMap<(String, String), Instant>>,
}

/// Longest tool description kept for reviewers.
const MAX_DESCRIPTION: usize = 2048;

/// How long a call's pin verdict is reused before the store is asked again (what another
/// replica's listing or an approval changed is seen within it).
const PIN_VERDICT_TTL: Duration = Duration::from_secs(2);

/// What a tool's pin says of calling it under `enforce`.
enum CallVerdict {
    Free,
    /// Its definition changed since it was pinned; `review` decides the new one.
    Blocked {
        pinned: String,
        seen: String,
        review: Option<String>,
    },
    /// Its changed definition was approved (and is pinned now, by this call).
    Approved {
        pinned: String,
        seen: String,
        review: String,
        by: String,
    },
}

impl Pins {
    fn describe(&self, resource: &str, tool: &str, description: &str) {
        let mut m = self.described.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_SESSIONS {
            m.clear();
        }
        let mut d = description.to_string();
        clip(&mut d, MAX_DESCRIPTION);
        m.insert((resource.to_string(), tool.to_string()), d);
    }

    fn description(&self, resource: &str, tool: &str) -> Option<String> {
        let m = self.described.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(resource.to_string(), tool.to_string())).cloned()
    }

    fn forget_verdict(&self, resource: &str, tool: &str) {
        let mut m = self.free.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(resource.to_string(), tool.to_string()));
    }

    /// Whether `tool` may be called under `enforce`: a free verdict is reused for
    /// [`PIN_VERDICT_TTL`]; a changed definition is looked up in the store each time (so an
    /// approval counts at once). A store failure is an `Err`: the call is refused (fail closed).
    fn call_verdict(
        &self,
        reviews: &Reviews,
        resource: &str,
        tool: &str,
    ) -> Result<CallVerdict, String> {
        let key = (resource.to_string(), tool.to_string());
        {
            let m = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if m.get(&key).is_some_and(|at| at.elapsed() < PIN_VERDICT_TTL) {
                return Ok(CallVerdict::Free);
            }
        }
        let pin = reviews.pin(resource, tool).map_err(|e| e.to_string())?;
        let changed = pin
            .as_ref()
            .and_then(|p| Some((p.pinned_sha256.clone(), p.changed()?.to_string())));
        let verdict = match changed {
            None => CallVerdict::Free,
            Some((pinned, seen)) => {
                let review = match reviews
                    .pin_status(resource, tool, &seen)
                    .map_err(|e| e.to_string())?
                {
                    PinStatus::Approved { review, by } => {
                        return Ok(CallVerdict::Approved {
                            pinned,
                            seen,
                            review,
                            by,
                        })
                    }
                    PinStatus::Pending(r) => Some(r.id),
                    PinStatus::Undecided => None,
                };
                CallVerdict::Blocked {
                    pinned,
                    seen,
                    review,
                }
            }
        };
        if matches!(verdict, CallVerdict::Free) {
            let mut m = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() >= MAX_SESSIONS {
                m.clear();
            }
            m.insert(key, Instant::now());
        }
        Ok(verdict)
    }
}

/// The fingerprint of a tool definition: SHA-256 of the canonical JSON of what a model reads
/// and what the server accepts and returns.
fn tool_fingerprint(tool: &Value) -> String {
    let mut def = serde_json::Map::new();
    for key in [
        "name",
        "title",
        "description",
        "annotations",
        "inputSchema",
        "outputSchema",
    ] {
        if let Some(v) = tool.get(key) {
            def.insert(key.into(), v.clone());
        }
    }
    sha256_hex(jsonrpc::canonical(&Value::Object(def)).as_bytes())
}

/// One HTTP request to an MCP resource, read whole and about to be judged.
pub(crate) struct Exchange {
    pub gw: Arc<HttpGateway>,
    pub ctx: Arc<ConnCtx>,
    pub target: Arc<Target>,
    pub session: Arc<HttpSession>,
    pub n: u64,
    pub started: Instant,
    pub who: Identity,
    pub access: Access,
    pub parts: hyper::http::request::Parts,
    pub path: String,
    pub query: Option<String>,
    pub body: Bytes,
}

fn session_digest(id: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, id.as_bytes()))[..16].to_string()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

/// A JSON answer the gateway makes itself.
fn json_answer(status: StatusCode, body: &Value) -> Response<UpstreamBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl Exchange {
    fn caller(&self) -> Caller<'_> {
        Caller {
            subject: &self.who.subject,
            groups: &self.who.groups,
        }
    }

    fn judge(&self, method: &str, name: Option<&str>, arguments: Option<&Value>) -> Judgement {
        self.target.rules.judge(
            &Command {
                kind: CommandKind::Mcp {
                    method,
                    name,
                    arguments,
                },
            },
            self.caller(),
            time::OffsetDateTime::now_utc(),
        )
    }

    fn audit_plan(&self) -> Option<BodyPlan> {
        self.target.audit_plan()
    }

    /// Records the gateway's own answer (`http.response`) and counts it.
    fn answered(
        &self,
        status: StatusCode,
        code: &'static str,
        error: &str,
        body: &Value,
    ) -> Response<UpstreamBody> {
        registry()
            .counter(
                "tollgate_mcp_refused_total",
                "MCP requests the gateway answered itself, by reason.",
                &[("reason", code)],
            )
            .inc();
        self.session.log.record(&HttpResponse {
            n: self.n,
            outcome: "refused",
            status: status.as_u16(),
            headers: Vec::new(),
            body: BodyRecord::default(),
            masked: None,
            duration_us: micros(self.started),
            error: Some(error.to_string()),
        });
        json_answer(status, body)
    }

    /// A request refused for its protocol (malformed, repeated or mismatched headers, an
    /// unknown version): recorded as denied by rule `protocol`, answered with a JSON-RPC error.
    async fn refused(
        &self,
        status: StatusCode,
        code: &'static str,
        rpc_code: i64,
        msg: &str,
    ) -> Response<UpstreamBody> {
        let _ = self
            .record_request(&Decision::Deny {
                rule: "protocol".into(),
                message: msg.to_string(),
            })
            .await;
        self.answered(
            status,
            code,
            msg,
            &jsonrpc::error_response(None, rpc_code, msg, None),
        )
    }

    /// `http.request` for the exchange, before anything is forwarded (fail closed).
    async fn record_request(&self, decision: &Decision) -> Result<(), Response<UpstreamBody>> {
        let ev = HttpRequest {
            n: self.n,
            method: self.parts.method.as_str().to_string(),
            path: self.path.clone(),
            query: self.query.clone(),
            version: self.ctx.http_version,
            authority: self
                .parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string),
            headers: recorded_headers(&self.parts.headers),
            body: capture(
                &self.body,
                sha256_hex(&self.body),
                self.target.resource.capture_bytes,
                self.audit_plan().as_ref(),
            ),
            decision: decision.summary(),
            dry_run: Vec::new(),
        };
        if let Err(e) = self.session.log.append(&ev).await {
            tracing::error!(session = %self.session.log.id, error = %e, "audit event could not be written");
            if self.gw.fail_closed() {
                self.session.log.record_refused(&ev, "audit_unavailable");
                return Err(self.answered(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "audit store unavailable",
                    &jsonrpc::error_response(
                        None,
                        jsonrpc::UNAVAILABLE,
                        "the gateway cannot record this request, so it was not forwarded",
                        None,
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The `aud` values an OIDC token must carry one of at MCP resource `t` (RFC 8707): the
/// resource's URL as its protected resource metadata names it (on the host the request names,
/// when that is one of the gateway's), and the resource's `audiences`. `None` for other kinds
/// (their tokens are for the gateway as a whole).
pub(crate) fn token_audiences(
    gw: &HttpGateway,
    t: &Target,
    host: Option<&str>,
) -> Option<Vec<String>> {
    if t.resource.kind != tollgate_config::ResourceKind::Mcp {
        return None;
    }
    let mut auds = t.resource.audiences.clone();
    if let Some(host) = host.filter(|h| gw.serves(crate::relay::host_of(h))) {
        let url = format!("https://{host}/r/{}", t.resource.name);
        auds.push(format!("{url}/"));
        auds.push(url);
    }
    Some(auds)
}

/// The URL of the OAuth protected resource metadata (RFC 9728) of MCP resource `name`, when
/// OIDC issuers are configured and `host` (the request's) is one of the gateway's names.
pub(crate) fn metadata_url(gw: &HttpGateway, name: &str, host: Option<&str>) -> Option<String> {
    let host = host?;
    let t = gw.target(name)?;
    (t.resource.kind == tollgate_config::ResourceKind::Mcp
        && !gw.oidc.is_empty()
        && gw.serves(crate::relay::host_of(host)))
    .then(|| format!("https://{host}/.well-known/oauth-protected-resource/r/{name}"))
}

/// The host a request names: its target's authority (HTTP/2 `:authority`) or its `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// `GET /.well-known/oauth-protected-resource/r/<name>`: where MCP clients get a token for the
/// resource (RFC 9728), naming the configured OIDC issuers as its authorization servers.
pub fn protected_resource_metadata<B>(
    gw: &HttpGateway,
    req: &Request<B>,
) -> Response<UpstreamBody> {
    let name = req
        .uri()
        .path()
        .strip_prefix("/.well-known/oauth-protected-resource/r/")
        .unwrap_or("");
    let host = request_host(req);
    match metadata_url(gw, name, host) {
        Some(_) => {
            let host = host.unwrap_or_default();
            json_answer(
                StatusCode::OK,
                &json!({
                    "resource": format!("https://{host}/r/{name}"),
                    "authorization_servers": gw.oidc.issuers(),
                    "bearer_methods_supported": ["header"],
                    "resource_name": name,
                }),
            )
        }
        None => json_answer(
            StatusCode::NOT_FOUND,
            &json!({"error": "no protected resource metadata here: it is served for MCP resources when OIDC issuers are configured", "code": "not_found"}),
        ),
    }
}

/// Handles one HTTP request to an MCP resource.
pub(crate) async fn exchange(x: Exchange) -> Response<UpstreamBody> {
    let headers = &x.parts.headers;
    // One reading of each MCP header: the gateway checks the first, a server might use another.
    for name in [
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
    ] {
        if headers.get_all(name).iter().nth(1).is_some() {
            let msg = format!("the request has more than one {name} header");
            return x
                .refused(
                    StatusCode::BAD_REQUEST,
                    "header_repeated",
                    jsonrpc::INVALID_REQUEST,
                    &msg,
                )
                .await;
        }
    }
    // The protocol revision: one tollgate does not understand is never passed on unjudged.
    let mut stateless = false;
    if let Some(v) = headers.get("mcp-protocol-version") {
        let v = String::from_utf8_lossy(v.as_bytes()).trim().to_string();
        stateless = v == STATELESS_VERSION;
        if !stateless && !PROTOCOL_VERSIONS.contains(&v.as_str()) {
            let msg = format!(
                "MCP protocol version {v:?} is not supported by this gateway; it relays {} and {STATELESS_VERSION}",
                PROTOCOL_VERSIONS.join(", ")
            );
            return x
                .refused(
                    StatusCode::BAD_REQUEST,
                    "protocol_version",
                    jsonrpc::INVALID_REQUEST,
                    &msg,
                )
                .await;
        }
    }
    if stateless {
        let refusal = if x.parts.method != Method::POST {
            Some((
                StatusCode::METHOD_NOT_ALLOWED,
                format!("the {STATELESS_VERSION} revision of MCP takes POST only"),
            ))
        } else if headers.contains_key("mcp-session-id") {
            Some((StatusCode::BAD_REQUEST, format!("the {STATELESS_VERSION} revision of MCP has no sessions: send no Mcp-Session-Id")))
        } else {
            None
        };
        if let Some((status, msg)) = refusal {
            return x
                .refused(status, "stateless", jsonrpc::INVALID_REQUEST, &msg)
                .await;
        }
    }
    // The session: only its opener may use it.
    let mcp_session = headers
        .get("mcp-session-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if let Some(sid) = &mcp_session {
        let owner = x.gw.mcp_sessions.owner(&x.target.resource.name, sid);
        let reason = match owner {
            Some(p) if p == x.who.principal.to_string() => None,
            Some(_) => Some("other_principal"),
            None => Some("unknown"),
        };
        if let Some(reason) = reason {
            x.session.log.record(&McpSessionRefused {
                n: x.n,
                mcp_session_sha256: session_digest(sid),
                reason,
            });
            let msg = "session not found: this Mcp-Session-Id was not opened by this caller through the gateway; start a new session (initialize)";
            return x.answered(
                StatusCode::NOT_FOUND,
                "mcp_session",
                msg,
                &jsonrpc::error_response(None, jsonrpc::INVALID_REQUEST, msg, None),
            );
        }
    }
    match x.parts.method {
        Method::POST => post(x, mcp_session, stateless).await,
        Method::GET | Method::DELETE => {
            // The server's stream of its own messages, or the end of a session: judged as a
            // request without a name (rules naming tools, resources or prompts do not apply).
            let j = x.judge(x.parts.method.as_str(), None, None);
            if let Err(r) = x.record_request(&j.decision).await {
                return r;
            }
            if let Decision::Deny { rule, message } = &j.decision {
                return x.answered(
                    StatusCode::FORBIDDEN,
                    "denied",
                    message,
                    &jsonrpc::error_response(
                        None,
                        jsonrpc::DENIED,
                        message,
                        Some(json!({"rule": rule})),
                    ),
                );
            }
            let deleting = x.parts.method == Method::DELETE;
            let r = forward(&x, Replies::new(&x, HashMap::new())).await;
            if deleting && r.status().is_success() {
                if let Some(sid) = &mcp_session {
                    x.gw.mcp_sessions.forget(&x.target.resource.name, sid);
                    x.gw.end_mcp_session(&x.target.resource.name, &x.who, sid);
                }
            }
            r
        }
        _ => {
            let msg = "an MCP endpoint takes POST (messages), GET (the server's stream) and DELETE (end of session)";
            let mut r = x
                .refused(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    jsonrpc::INVALID_REQUEST,
                    msg,
                )
                .await;
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            r
        }
    }
}

/// One judged message of a POST.
struct Judged {
    msg: jsonrpc::ClientMessage,
    judgement: Judgement,
    args_sha: Option<String>,
    /// `params._meta.progressToken`: the client takes progress notifications.
    progress_token: Option<Value>,
}

async fn post(x: Exchange, mcp_session: Option<String>, stateless: bool) -> Response<UpstreamBody> {
    let body = match jsonrpc::parse(&x.body) {
        Ok(b) => b,
        Err(e) => {
            return x
                .refused(
                    StatusCode::BAD_REQUEST,
                    if e.code == jsonrpc::PARSE_ERROR {
                        "parse_error"
                    } else {
                        "invalid_request"
                    },
                    e.code,
                    &e.message,
                )
                .await;
        }
    };
    if stateless {
        let h = &x.parts.headers;
        let why = if body.batch {
            Some(format!("the {STATELESS_VERSION} revision of MCP takes one message per request, not a batch"))
        } else {
            jsonrpc::stateless_mismatch(
                &body.messages[0],
                STATELESS_VERSION,
                h.get("mcp-method").map(HeaderValue::as_bytes),
                h.get("mcp-name").map(HeaderValue::as_bytes),
            )
        };
        if let Some(msg) = why {
            return x
                .refused(
                    StatusCode::BAD_REQUEST,
                    "header_mismatch",
                    jsonrpc::HEADER_MISMATCH,
                    &msg,
                )
                .await;
        }
    }
    // The `Mcp-Method` header of later revisions must say what the body says.
    if let Some(m) = x.parts.headers.get("mcp-method") {
        let said = String::from_utf8_lossy(m.as_bytes());
        if body.batch || body.messages[0].method != said {
            let msg = "the Mcp-Method header does not match the message's method";
            return x
                .refused(
                    StatusCode::BAD_REQUEST,
                    "header_mismatch",
                    jsonrpc::INVALID_REQUEST,
                    msg,
                )
                .await;
        }
    }
    let judged: Vec<Judged> = body
        .messages
        .into_iter()
        .map(|msg| {
            let judgement = match msg.kind {
                // An answer to the server's own request is no command.
                jsonrpc::Kind::Response => Judgement {
                    decision: Decision::Allow { rule: None },
                    dry_run: Vec::new(),
                },
                _ => x.judge(&msg.method, msg.name.as_deref(), msg.arguments.as_ref()),
            };
            let judgement = match pin_block(&x, &msg).or_else(|| task_block(&x, &msg)) {
                Some(deny) => Judgement {
                    decision: deny,
                    dry_run: judgement.dry_run,
                },
                None => judgement,
            };
            let args_sha = msg
                .arguments
                .as_ref()
                .map(|a| sha256_hex(jsonrpc::canonical(a).as_bytes()));
            Judged {
                progress_token: msg.progress_token.clone(),
                msg,
                judgement,
                args_sha,
            }
        })
        .collect();
    let strictest = judged
        .iter()
        .map(|j| j.judgement.decision.clone())
        .fold(Decision::Allow { rule: None }, Decision::stricter);
    if let Err(r) = x.record_request(&strictest).await {
        return r;
    }
    let audit_plan = x.audit_plan();
    let session_digest = mcp_session.as_deref().map(session_digest);
    for j in &judged {
        let arguments = j.msg.arguments.as_ref().map(|a| {
            let mut text = masked_arguments(a, audit_plan.as_ref()).to_string();
            clip(&mut text, x.target.resource.capture_bytes);
            text
        });
        let ev = McpRequest {
            n: x.n,
            id: j.msg.id.clone(),
            method: if j.msg.kind == jsonrpc::Kind::Response {
                "(response)".into()
            } else {
                j.msg.method.clone()
            },
            name: j.msg.name.clone(),
            arguments,
            arguments_sha256: j.args_sha.clone(),
            decision: j.judgement.decision.summary(),
            dry_run: j.judgement.dry_run.iter().map(Decision::summary).collect(),
            mcp_session: session_digest.clone(),
        };
        if let Err(e) = x.session.log.append(&ev).await {
            tracing::error!(session = %x.session.log.id, error = %e, "audit event could not be written");
            if x.gw.fail_closed() {
                x.session.log.record_refused(&ev, "audit_unavailable");
                return x.answered(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "audit store unavailable",
                    &jsonrpc::error_response(
                        j.msg.id.as_ref(),
                        jsonrpc::UNAVAILABLE,
                        "the gateway cannot record this request, so it was not forwarded",
                        None,
                    ),
                );
            }
        }
        registry()
            .counter(
                "tollgate_mcp_requests_total",
                "MCP requests judged, by resource, method and decision.",
                &[
                    ("resource", &x.target.resource.name),
                    ("method", method_label(&j.msg)),
                    ("decision", decision_label(&j.judgement.decision)),
                ],
            )
            .inc();
    }

    // Deny: the whole body is refused; each request gets an error naming why.
    if let Some(denied) = judged.iter().find(|j| j.judgement.decision.is_deny()) {
        let Decision::Deny { rule, message } = &denied.judgement.decision else {
            unreachable!()
        };
        let data = json!({"rule": rule, "session": x.session.log.id});
        let errors: Vec<Value> = judged
            .iter()
            .filter(|j| j.msg.kind == jsonrpc::Kind::Request)
            .map(|j| {
                let m = match &j.judgement.decision {
                    Decision::Deny { message, .. } => message.clone(),
                    _ => format!("not run: another request of this batch was denied ({message})"),
                };
                refused_reply(&x, &j.msg, &m);
                jsonrpc::error_response(j.msg.id.as_ref(), jsonrpc::DENIED, &m, Some(data.clone()))
            })
            .collect();
        return deny_answer(&x, body.batch, errors, message);
    }

    // The gateway's own tasks (held calls) are answered here; whose they are was checked.
    if let [j] = judged.as_slice() {
        let task = j.msg.task_id.as_deref().unwrap_or_default();
        if j.msg.method.starts_with("tasks/") && x.gw.mcp_held_tasks.owns(task) {
            let answer = tasks::answer(&x, &j.msg).await;
            let pending = HashMap::from([(
                j.msg.id.clone().unwrap_or_default().to_string(),
                (j.msg.method.clone(), None),
            )]);
            let (parts, body) = json_answer(StatusCode::OK, &answer).into_parts();
            return relay(&x, Replies::new(&x, pending), parts, body);
        }
    }
    // A held call whose client asked for a task: answered with a task of the gateway's.
    if tasks::wants_task(&judged) {
        return tasks::hold_as_task(x, judged, audit_plan);
    }
    // Review: held until approved; the approval binds to the name and the arguments' digest.
    let reviewed: Vec<&Judged> = judged
        .iter()
        .filter(|j| matches!(j.judgement.decision, Decision::Review { .. }))
        .collect();
    let initializing = judged.iter().any(|j| j.msg.method == "initialize");
    if let Some(token) = reviewed.first().and_then(|j| j.progress_token.clone()) {
        if !initializing && accepts_event_stream(&x.parts.headers) {
            drop(reviewed);
            return held_streaming(x, judged, body.batch, audit_plan, token);
        }
    }
    if let Some(first) = reviewed.first() {
        if let Err(message) = held(
            &x,
            &reviewed,
            audit_plan.as_ref(),
            x.target.resource.hold_wait,
        )
        .await
        {
            let Decision::Review { rule, .. } = &first.judgement.decision else {
                unreachable!()
            };
            let data = json!({"rule": rule, "review": message.1, "session": x.session.log.id});
            let errors: Vec<Value> = judged
                .iter()
                .filter(|j| j.msg.kind == jsonrpc::Kind::Request)
                .map(|j| {
                    refused_reply(&x, &j.msg, &message.0);
                    jsonrpc::error_response(
                        j.msg.id.as_ref(),
                        jsonrpc::NOT_APPROVED,
                        &message.0,
                        Some(data.clone()),
                    )
                })
                .collect();
            return deny_answer(&x, body.batch, errors, &message.0);
        }
    }

    let pending: HashMap<String, (String, Option<String>)> = judged
        .iter()
        .filter(|j| j.msg.kind == jsonrpc::Kind::Request)
        .filter_map(|j| {
            j.msg
                .id
                .as_ref()
                .map(|id| (id.to_string(), (j.msg.method.clone(), j.msg.name.clone())))
        })
        .collect();
    let replies = Replies::new(&x, pending);
    let r = forward(&x, replies).await;
    if initializing && r.status().is_success() {
        if let Some(sid) = r
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            x.gw.mcp_sessions
                .bind(&x.target.resource.name, sid, &x.who.principal.to_string());
            x.gw.adopt_mcp_session(&x.target.resource.name, &x.who, sid, &x.session);
        }
    }
    r
}

/// Whether the request is of the stateless revision (checked, when it is, by [`exchange`]).
fn is_stateless(headers: &hyper::HeaderMap) -> bool {
    headers
        .get("mcp-protocol-version")
        .is_some_and(|v| v.as_bytes() == STATELESS_VERSION.as_bytes())
}

/// Runs a synchronous store call (a PostgreSQL store waits on the network) without stalling
/// the other tasks of this worker thread: on the multi-threaded runtime the gateway serves on,
/// they move to another worker meanwhile; a current-thread runtime has none to move them to.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
    match flavor {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The messages of an answer's body: JSON (one or a batch) or server-sent events.
pub(crate) fn messages_of(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    if text.trim_start().starts_with(['{', '[']) {
        return match serde_json::from_str(&text) {
            Ok(Value::Array(a)) => a,
            Ok(v) => vec![v],
            Err(_) => Vec::new(),
        };
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

/// Whether the client takes a server-sent event stream as the answer.
fn accepts_event_stream(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// How often a held call tells its client it is still waiting: well within the ~60 s after
/// which clients give up, and several times within `hold_wait`.
fn progress_every(hold_wait: std::time::Duration) -> std::time::Duration {
    (hold_wait / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(15),
    )
}

fn sse_event(msg: &Value) -> Bytes {
    Bytes::from(format!("event: message\ndata: {msg}\n\n"))
}

/// The answer to a held call whose client sent a progress token: an event stream at once,
/// `notifications/progress` while the review is open (so the client keeps waiting), then the
/// call's answer (or the error naming the review) on the same stream.
fn held_streaming(
    x: Exchange,
    judged: Vec<Judged>,
    batch: bool,
    audit_plan: Option<BodyPlan>,
    token: Value,
) -> Response<UpstreamBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let reviewed: Vec<&Judged> = judged
            .iter()
            .filter(|j| matches!(j.judgement.decision, Decision::Review { .. }))
            .collect();
        let rule = match &reviewed[0].judgement.decision {
            Decision::Review { rule, .. } => rule.clone(),
            _ => String::new(),
        };
        let outcome = {
            let hold = held(
                &x,
                &reviewed,
                audit_plan.as_ref(),
                x.target.resource.hold_wait,
            );
            tokio::pin!(hold);
            let every = progress_every(x.target.resource.hold_wait);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let mut k = 0u64;
            loop {
                tokio::select! {
                    r = &mut hold => break Some(r),
                    _ = tick.tick() => {
                        k += 1;
                        let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                            "progressToken": token, "progress": k,
                            "message": format!("held for approval (tollgate rule \"{rule}\"); waiting for a reviewer"),
                        }});
                        if tx.send(sse_event(&note)).await.is_err() {
                            break None;
                        }
                    }
                    // The client went away: the hold is dropped, which withdraws the review.
                    _ = tx.closed() => break None,
                }
            }
        };
        let Some(outcome) = outcome else { return };
        if let Err((message, review)) = outcome {
            let data = json!({"rule": rule, "review": review, "session": x.session.log.id});
            let errors: Vec<Value> = judged
                .iter()
                .filter(|j| j.msg.kind == jsonrpc::Kind::Request)
                .map(|j| {
                    refused_reply(&x, &j.msg, &message);
                    jsonrpc::error_response(
                        j.msg.id.as_ref(),
                        jsonrpc::NOT_APPROVED,
                        &message,
                        Some(data.clone()),
                    )
                })
                .collect();
            let _ = deny_answer(&x, batch, errors.clone(), &message);
            for e in errors {
                if tx.send(sse_event(&e)).await.is_err() {
                    return;
                }
            }
            return;
        }
        let pending: HashMap<String, (String, Option<String>)> = judged
            .iter()
            .filter(|j| j.msg.kind == jsonrpc::Kind::Request)
            .filter_map(|j| {
                j.msg
                    .id
                    .as_ref()
                    .map(|id| (id.to_string(), (j.msg.method.clone(), j.msg.name.clone())))
            })
            .collect();
        let r = forward(&x, Replies::new(&x, pending)).await;
        let sse = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"));
        let mut body = r.into_body();
        let mut whole = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(|f| f.into_data()) else {
                return;
            };
            let Ok(data) = data else { continue };
            if sse {
                if tx.send(data).await.is_err() {
                    return;
                }
            } else {
                whole.extend_from_slice(&data);
            }
        }
        // A JSON answer (already masked), as events: one per message.
        if let Ok(v) = serde_json::from_slice::<Value>(&whole) {
            let msgs = match v {
                Value::Array(a) => a,
                m => vec![m],
            };
            for m in msgs {
                if tx.send(sse_event(&m)).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut r = Response::new(ChannelBody { rx }.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A body fed by a task.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// A call's arguments as the record and the reviewer see them: masked like a tool's
/// structured result.
fn masked_arguments(a: &Value, plan: Option<&BodyPlan>) -> Value {
    let mut wrapped = json!({"result": {"structuredContent": a}});
    if let Some(p) = plan {
        if masking::mask_message(&mut wrapped, p).is_err() {
            return Value::String("[arguments could not be masked]".into());
        }
    }
    wrapped["result"]["structuredContent"].take()
}

/// Under `pinning = enforce`, a call of a tool whose definition changed since it was pinned is
/// denied, naming the change and the review that would allow it.
fn pin_block(x: &Exchange, msg: &jsonrpc::ClientMessage) -> Option<Decision> {
    if x.target.resource.pinning != tollgate_config::PinMode::Enforce || msg.method != "tools/call"
    {
        return None;
    }
    let tool = msg.name.as_deref()?;
    let verdict = blocking(|| {
        x.gw.mcp_pins
            .call_verdict(x.gw.reviews(), &x.target.resource.name, tool)
    });
    let message = match verdict {
        Ok(CallVerdict::Free) => return None,
        Ok(CallVerdict::Approved {
            pinned,
            seen,
            review,
            by,
        }) => {
            x.session.log.record(&McpPin {
                kind: "mcp.pin_approved",
                n: x.n,
                tool: tool.to_string(),
                pinned_sha256: pinned,
                seen_sha256: Some(seen),
                mode: None,
                review: Some(review),
                approved_by: Some(by),
            });
            return None;
        }
        Ok(CallVerdict::Blocked {
            pinned,
            seen,
            review,
        }) => format!(
            "tool \"{tool}\" changed its definition since it was pinned (sha256 {} is now {}); it may not be called until an administrator approves the new definition{}",
            &pinned[..16.min(pinned.len())],
            &seen[..16.min(seen.len())],
            review
                .map(|id| format!(" (review {id}: `tollgate reviews approve {id}`)"))
                .unwrap_or_default()
        ),
        Err(e) => {
            tracing::error!(resource = %x.target.resource.name, tool, error = %e, "could not read the tool's pin");
            format!("tool \"{tool}\" could not be checked against its pinned definition (the gateway's store is unavailable), so it was not called")
        }
    };
    Some(Decision::Deny {
        rule: "pinning".into(),
        message,
    })
}

/// Records the gateway's refusal of one request as its `mcp.response`.
fn refused_reply(x: &Exchange, msg: &jsonrpc::ClientMessage, error: &str) {
    x.session.log.record(&McpResponse {
        n: x.n,
        id: msg.id.clone(),
        method: Some(msg.method.clone()),
        name: msg.name.clone(),
        outcome: "refused",
        is_error: true,
        capture: Some(error.to_string()),
        truncated: false,
        hidden: Vec::new(),
        masked: None,
        duration_us: micros(x.started),
    });
}

/// The answer to a refused body: JSON-RPC errors (HTTP 200), or 403 when it held only
/// notifications (which get no JSON-RPC answer).
fn deny_answer(
    x: &Exchange,
    batch: bool,
    errors: Vec<Value>,
    message: &str,
) -> Response<UpstreamBody> {
    let (status, body) = match (batch, errors.len()) {
        (_, 0) => (
            StatusCode::FORBIDDEN,
            jsonrpc::error_response(None, jsonrpc::DENIED, message, None),
        ),
        (false, _) => (
            StatusCode::OK,
            errors.into_iter().next().unwrap_or_default(),
        ),
        (true, _) => (StatusCode::OK, Value::Array(errors)),
    };
    x.answered(status, "denied", message, &body)
}

/// Holds reviewed requests. `Err((message, review id))` when they may not run.
/// Holds the reviewed requests for their review, waiting for it at most `wait` (`Err`: the
/// client's message and the review's id).
async fn held(
    x: &Exchange,
    reviewed: &[&Judged],
    audit_plan: Option<&BodyPlan>,
    wait: Duration,
) -> Result<(), (String, String)> {
    let Decision::Review {
        rule,
        approvers,
        min_approvals,
        timeout,
    } = &reviewed[0].judgement.decision
    else {
        return Ok(());
    };
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut shown = Vec::new();
    for j in reviewed {
        for part in [
            "mcp",
            j.msg.method.as_str(),
            j.msg.name.as_deref().unwrap_or(""),
            j.args_sha.as_deref().unwrap_or(""),
        ] {
            digest.update(&(part.len() as u64).to_be_bytes());
            digest.update(part.as_bytes());
        }
        let args = j
            .msg
            .arguments
            .as_ref()
            .map(|a| masked_arguments(a, audit_plan));
        let described = match (j.msg.method.as_str(), j.msg.name.as_deref()) {
            ("tools/call", Some(tool)) => {
                x.gw.mcp_pins
                    .description(&x.target.resource.name, tool)
                    .map(|d| {
                        let d = masked_arguments(&Value::String(d), audit_plan);
                        format!("\n  tool description: {}", d.as_str().unwrap_or_default())
                    })
            }
            _ => None,
        };
        shown.push(format!(
            "MCP {} {}{}{}",
            j.msg.method,
            j.msg.name.as_deref().unwrap_or(""),
            args.map(|a| format!(" arguments {a}")).unwrap_or_default(),
            described.unwrap_or_default()
        ));
    }
    let asked = HoldRequest {
        session_id: &x.session.log.id,
        resource: &x.target.resource.name,
        subject: &x.who.subject,
        groups: &x.who.groups,
        principal: &x.who.principal,
        rule,
        shown: shown.join("\n"),
        digest: hex::encode(digest.finish()),
        approvers,
        min_approvals: *min_approvals,
        timeout: *timeout,
    };
    let reviews = x.gw.reviews();
    let review = match blocking(|| hold::open(reviews, asked, x.gw.rerun_window())) {
        Ok(Opened::Rerun(r)) => {
            x.session.log.record(&ReviewEvent {
                kind: "review.rerun",
                n: x.n,
                review: r.id,
                reviewers: vec![],
                waited_ms: None,
            });
            return Ok(());
        }
        Ok(Opened::Pending(r)) => r,
        Err(e) => {
            tracing::error!(session = %x.session.log.id, error = %e, "could not open a review");
            return Err((
                "the gateway could not open a review for this request, so it was not run".into(),
                String::new(),
            ));
        }
    };
    // The client's request future is dropped if it goes away: the review is then withdrawn.
    struct Withdraw<'a>(&'a tollgate_review::Reviews, &'a str, bool);
    impl Drop for Withdraw<'_> {
        fn drop(&mut self) {
            if !self.2 {
                self.0.withdraw(self.1);
            }
        }
    }
    let mut guard = Withdraw(reviews, &review.id, false);
    let since = Instant::now();
    // MCP clients give up on a call after about a minute: past `hold_wait` the client is told
    // the review is pending, and the review stays open for the identical call's repeat.
    let verdict = match tokio::time::timeout(
        wait,
        hold::hold(reviews, &review.id, std::future::pending()),
    )
    .await
    {
        Ok(v) => v,
        Err(_) => {
            guard.2 = true;
            let id = review.id.clone();
            x.session.log.record(&ReviewEvent {
                kind: "review.async",
                n: x.n,
                review: id.clone(),
                reviewers: vec![],
                waited_ms: Some(since.elapsed().as_millis() as u64),
            });
            return Err((
                format!(
                    "review {id} (rule \"{rule}\") is pending: the call was not run; once a reviewer approves it (`tollgate reviews approve {id}`), repeat the identical call within the rerun window"
                ),
                id,
            ));
        }
    };
    guard.2 = true;
    let waited_ms = since.elapsed().as_millis() as u64;
    let id = review.id.clone();
    let message = match verdict {
        Verdict::Approved { reviewers } => {
            x.session.log.record(&ReviewEvent {
                kind: "review.approved",
                n: x.n,
                review: id,
                reviewers,
                waited_ms: Some(waited_ms),
            });
            return Ok(());
        }
        Verdict::Denied { reviewer, reason } => format!(
            "review {id} (rule \"{rule}\") denied by {reviewer}: {}",
            reason.as_deref().unwrap_or("no reason given")
        ),
        Verdict::Expired => format!(
            "review {id} (rule \"{rule}\") expired after {} without a decision; the call was not run (once approved, the identical call runs when repeated)",
            tollgate_review::format_duration(*timeout)
        ),
        Verdict::Withdrawn => format!("review {id} was withdrawn"),
        Verdict::Unavailable(e) => {
            tracing::error!(session = %x.session.log.id, error = %e, "review unavailable");
            format!("review {id} cannot be read; the call was not run")
        }
    };
    Err((message, id))
}

fn method_label(m: &jsonrpc::ClientMessage) -> &'static str {
    match m.method.as_str() {
        "initialize" => "initialize",
        "tools/call" => "tools/call",
        "tools/list" => "tools/list",
        "resources/read" => "resources/read",
        "resources/list" => "resources/list",
        "prompts/get" => "prompts/get",
        "prompts/list" => "prompts/list",
        "ping" => "ping",
        _ if m.kind == jsonrpc::Kind::Notification => "notification",
        _ if m.kind == jsonrpc::Kind::Response => "response",
        _ => "other",
    }
}

fn decision_label(d: &Decision) -> &'static str {
    match d {
        Decision::Allow { .. } => "allow",
        Decision::Deny { .. } => "deny",
        Decision::Review { .. } => "review",
    }
}

fn clip(s: &mut String, limit: usize) -> bool {
    if s.len() <= limit {
        return false;
    }
    let mut at = limit;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    true
}

/// `tasks/get`, `tasks/result` and `tasks/cancel` may name only a task the caller's own
/// request created through the gateway: a task id is no capability, and another principal's
/// task (or one the gateway never saw created) is not found.
fn task_block(x: &Exchange, msg: &jsonrpc::ClientMessage) -> Option<Decision> {
    let bound = msg.kind == jsonrpc::Kind::Request
        && msg.method.starts_with("tasks/")
        && msg.method != "tasks/list";
    if !bound {
        return None;
    }
    let principal = x.who.principal.to_string();
    let owner = msg
        .task_id
        .as_deref()
        .and_then(|t| x.gw.mcp_tasks.owner(&x.target.resource.name, t));
    if owner.as_deref() == Some(principal.as_str()) {
        return None;
    }
    let message = match &msg.task_id {
        Some(t) => format!("task {t:?} not found: it was not created by a request of this caller through the gateway"),
        None => format!("{}: params.taskId must be a string", msg.method),
    };
    Some(Decision::Deny {
        rule: "tasks".into(),
        message,
    })
}

/// Forwards the request and relays the answer through [`McpBody`].
async fn forward(x: &Exchange, replies: Replies) -> Response<UpstreamBody> {
    let target: &Target = &x.target;
    if let Some(server) = &target.resource.stdio {
        let (parts, body) = stdio::exchange(x, server).await.into_parts();
        return relay(x, replies, parts, body);
    }
    let http = target.resource.http.as_ref().expect("an mcp resource");
    // `/r/<name>` alone is the MCP endpoint itself (`upstream = "https://host/mcp"`).
    let path = if x.path == "/" && !http.base_path.is_empty() {
        ""
    } else {
        x.path.as_str()
    };
    let uri = format!(
        "{}{}{}{}",
        target.origin,
        http.base_path,
        path,
        x.query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let Ok(mut up) = Request::builder()
        .method(x.parts.method.clone())
        .uri(uri)
        .body(
            Full::new(x.body.clone())
                .map_err(|never| match never {})
                .boxed(),
        )
    else {
        return x.answered(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not forwardable",
            &jsonrpc::error_response(
                None,
                jsonrpc::INVALID_REQUEST,
                "the request cannot be forwarded as written",
                None,
            ),
        );
    };
    if let Err(r) = forwarded_headers(
        &x.ctx,
        target,
        &x.parts,
        true,
        (&x.who, &x.session.log.id),
        up.headers_mut(),
    ) {
        return r.into_response();
    }
    *up.version_mut() = hyper::Version::HTTP_11;
    let resp = match tokio::time::timeout(http.response_timeout, target.client.request(up)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let r = upstream_failed(target, &x.session, x.n, x.started, &e);
            return json_answer(
                r.status,
                &jsonrpc::error_response(None, jsonrpc::UNAVAILABLE, &r.error, None),
            );
        }
        Err(_) => {
            let msg = format!(
                "resource \"{}\" did not answer within {} s",
                target.resource.name,
                http.response_timeout.as_secs()
            );
            return x.answered(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                &msg,
                &jsonrpc::error_response(None, jsonrpc::UNAVAILABLE, &msg, None),
            );
        }
    };
    let (rparts, rbody) = resp.into_parts();
    relay(x, replies, rparts, rbody.map_err(io::Error::other).boxed())
}

/// Relays an answer to the client through [`McpBody`], message by message.
fn relay(
    x: &Exchange,
    replies: Replies,
    mut rparts: hyper::http::response::Parts,
    rbody: UpstreamBody,
) -> Response<UpstreamBody> {
    let target: &Target = &x.target;
    let encoded = rparts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    if encoded {
        let msg = format!(
            "the answer of resource \"{}\" is compressed and cannot be masked, so it was not relayed",
            target.resource.name
        );
        return x.answered(
            StatusCode::BAD_GATEWAY,
            "unmaskable",
            &msg,
            &jsonrpc::error_response(None, jsonrpc::UNAVAILABLE, &msg, None),
        );
    }
    let content_type = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mode = if content_type == "text/event-stream" {
        Mode::Sse
    } else {
        Mode::Whole {
            json: content_type == "application/json" || content_type.ends_with("+json"),
        }
    };
    let listed = crate::relay::connection_tokens(&rparts.headers);
    let names: Vec<_> = rparts.headers.keys().cloned().collect();
    for k in names {
        if crate::relay::HOP_BY_HOP.contains(&k.as_str())
            || listed.iter().any(|c| c == k.as_str())
            || k == header::CONTENT_LENGTH
        {
            rparts.headers.remove(&k);
        }
    }
    let status = rparts.status.as_u16();
    let recorded = recorded_headers(&rparts.headers);
    let body = McpBody {
        inner: rbody,
        mode,
        buf: Vec::new(),
        replies,
        bytes: 0,
        finish: Some((status, recorded)),
        done: false,
    };
    Response::from_parts(rparts, body.boxed())
}

/// What the answers of one exchange are read against: the requests sent (by id), the caller
/// (listings are filtered by what it may call), the masks for the caller and for the record.
struct Replies {
    gw: Arc<HttpGateway>,
    session: Arc<HttpSession>,
    target: Arc<Target>,
    n: u64,
    started: Instant,
    subject: String,
    groups: Vec<String>,
    /// Whose requests these are (tasks they create are bound to it).
    principal: String,
    pending: HashMap<String, (String, Option<String>)>,
    client_plan: Option<BodyPlan>,
    audit_plan: Option<BodyPlan>,
    /// The request was of the stateless revision.
    stateless: bool,
}

impl Replies {
    fn new(x: &Exchange, pending: HashMap<String, (String, Option<String>)>) -> Replies {
        let client_plan = match (&x.target.mask, &x.access.unmask) {
            (Some(p), None) => Some(p.body_plan(&x.who.groups)),
            _ => None,
        }
        .filter(BodyPlan::is_active);
        Replies {
            gw: x.gw.clone(),
            session: x.session.clone(),
            target: x.target.clone(),
            n: x.n,
            started: x.started,
            subject: x.who.subject.clone(),
            groups: x.who.groups.clone(),
            principal: x.who.principal.to_string(),
            pending,
            client_plan,
            audit_plan: x.audit_plan(),
            stateless: is_stateless(&x.parts.headers),
        }
    }

    /// One message of the answer, as the client will get it; `Err` when it cannot be masked.
    fn message(&mut self, mut msg: Value) -> Result<Value, String> {
        let is_reply = msg.get("method").is_none()
            && (msg.get("result").is_some() || msg.get("error").is_some());
        let asked = if is_reply {
            msg.get("id")
                .and_then(|id| self.pending.remove(&id.to_string()))
        } else {
            None
        };
        let mut hidden = Vec::new();
        if let Some((method, _)) = &asked {
            match method.as_str() {
                "tools/list" => {
                    hidden = self.filter_listing(&mut msg, "tools", "tools/call", "name")
                }
                "prompts/list" => {
                    hidden = self.filter_listing(&mut msg, "prompts", "prompts/get", "name")
                }
                "resources/list" => {
                    hidden = self.filter_listing(&mut msg, "resources", "resources/read", "uri")
                }
                "initialize" => self.check_version(&mut msg),
                "server/discover" => discovered_versions(&mut msg),
                "tasks/list" => self.own_tasks(&mut msg),
                "tools/call" => self.bind_task(&msg),
                _ => {}
            }
            if self.stateless && method.ends_with("/list") {
                self.cache_scope(&mut msg);
            }
        }
        // The record keeps the audit masking; the client gets its own.
        let mut recorded = msg.clone();
        let audit = match &self.audit_plan {
            Some(p) => Some(masking::mask_message(&mut recorded, p).map_err(|e| e.to_string())?),
            None => None,
        };
        if let Some(p) = &self.client_plan {
            masking::mask_message(&mut msg, p).map_err(|e| e.to_string())?;
        }
        let masked = audit
            .as_ref()
            .filter(|m| m.summary.masked_values > 0)
            .map(|m| reasons_json(&m.summary));
        let limit = self.target.resource.capture_bytes;
        if is_reply {
            let (method, name) = asked.unzip();
            let is_error = recorded.get("error").is_some()
                || recorded["result"]["isError"].as_bool() == Some(true);
            let mut capture = match recorded.get("error") {
                Some(e) => e.to_string(),
                None => recorded
                    .get("result")
                    .map(Value::to_string)
                    .unwrap_or_default(),
            };
            let truncated = clip(&mut capture, limit);
            self.session.log.record(&McpResponse {
                n: self.n,
                id: recorded.get("id").cloned(),
                method,
                name: name.flatten(),
                outcome: if recorded.get("error").is_some() {
                    "error"
                } else {
                    "result"
                },
                is_error,
                capture: Some(capture),
                truncated,
                hidden,
                masked,
                duration_us: micros(self.started),
            });
        } else {
            let mut capture = recorded.to_string();
            let truncated = clip(&mut capture, limit);
            self.session.log.record(&McpMessage {
                n: self.n,
                id: recorded.get("id").cloned(),
                method: recorded
                    .get("method")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                capture: Some(capture),
                truncated,
                masked,
            });
        }
        Ok(msg)
    }

    /// Pins a listed tool's definition, or checks it against its pin: false when it changed
    /// under `enforce` and no `pin` review approved the new definition (the tool is then left
    /// out). A change opens that review (once) and is recorded, counted and logged at each listing.
    fn pin_allows(&self, name: &str, tool: &Value) -> bool {
        let resource = &self.target.resource;
        let enforce = resource.pinning == tollgate_config::PinMode::Enforce;
        let mode = if enforce { "enforce" } else { "warn" };
        let fingerprint = tool_fingerprint(tool);
        let reviews = self.gw.reviews();
        self.gw.mcp_pins.forget_verdict(&resource.name, name);
        let pin_event = |kind, pinned_sha256, seen_sha256, mode, review, approved_by| {
            self.session.log.record(&McpPin {
                kind,
                n: self.n,
                tool: name.to_string(),
                pinned_sha256,
                seen_sha256,
                mode,
                review,
                approved_by,
            })
        };
        let seen = match blocking(|| reviews.pin_seen(&resource.name, name, &fingerprint)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(resource = %resource.name, tool = %name, error = %e, "could not check the tool against its pin");
                return !enforce;
            }
        };
        let pinned = match seen {
            PinSeen::Same(_) => return true,
            PinSeen::New(_) => {
                pin_event("mcp.pinned", fingerprint, None, None, None, None);
                return true;
            }
            PinSeen::Changed(p) => p.pinned_sha256,
        };
        // What the reviewer reads: the new definition, masked as the record is.
        let mut shown = tool.to_string();
        clip(&mut shown, MAX_DESCRIPTION);
        let shown = masked_arguments(&Value::String(shown), self.audit_plan.as_ref());
        let change = PinChange {
            resource: &resource.name,
            tool: name,
            pinned_sha256: &pinned,
            seen_sha256: &fingerprint,
            shown: format!("new definition: {}", shown.as_str().unwrap_or_default()),
            approvers: &resource.pin_approvers,
        };
        let decided = blocking(|| reviews.pin_changed(&change));
        match decided {
            Ok(PinDecision::Approved { review, by }) => {
                tracing::info!(resource = %resource.name, tool = %name, %review, "MCP tool's new definition approved and pinned");
                pin_event(
                    "mcp.pin_approved",
                    pinned,
                    Some(fingerprint),
                    None,
                    Some(review),
                    Some(by),
                );
                true
            }
            Ok(PinDecision::Pending { review, opened }) => {
                tracing::warn!(resource = %resource.name, tool = %name, mode, review = %review.id, opened, "MCP tool definition changed since it was pinned");
                registry()
                    .counter(
                        "tollgate_mcp_pin_changes_total",
                        "MCP tool definitions listed changed since they were pinned, by resource and mode.",
                        &[("resource", &resource.name), ("mode", mode)],
                    )
                    .inc();
                pin_event(
                    "mcp.pin_changed",
                    pinned,
                    Some(fingerprint),
                    Some(mode),
                    Some(review.id),
                    None,
                );
                !enforce
            }
            Err(e) => {
                tracing::error!(resource = %resource.name, tool = %name, error = %e, "could not open a review of the tool's changed definition");
                pin_event(
                    "mcp.pin_changed",
                    pinned,
                    Some(fingerprint),
                    Some(mode),
                    None,
                    None,
                );
                !enforce
            }
        }
    }

    /// Leaves out of a listing (`tools/list`, `prompts/list`, `resources/list`) what this caller
    /// would be denied using (judged without arguments: a rule on arguments does not hide its
    /// tool); tools are pinned on the way (`[resources.pinning]`).
    fn filter_listing(
        &self,
        msg: &mut Value,
        list: &str,
        use_method: &str,
        name_key: &str,
    ) -> Vec<String> {
        let Some(tools) = msg
            .get_mut("result")
            .and_then(|r| r.get_mut(list))
            .and_then(Value::as_array_mut)
        else {
            return Vec::new();
        };
        let now = time::OffsetDateTime::now_utc();
        let caller = Caller {
            subject: &self.subject,
            groups: &self.groups,
        };
        let mut hidden = Vec::new();
        let resource = &self.target.resource;
        let tools_listed = list == "tools";
        tools.retain(|t| {
            let name = t.get(name_key).and_then(Value::as_str).unwrap_or("");
            if tools_listed {
                if let Some(d) = t.get("description").and_then(Value::as_str) {
                    self.gw.mcp_pins.describe(&resource.name, name, d);
                }
            }
            if tools_listed
                && resource.pinning != tollgate_config::PinMode::Off
                && !self.pin_allows(name, t)
            {
                hidden.push(name.to_string());
                return false;
            }
            let j = self.target.rules.judge(
                &Command {
                    kind: CommandKind::Mcp {
                        method: use_method,
                        name: Some(name),
                        arguments: None,
                    },
                },
                caller,
                now,
            );
            if j.decision.is_deny() {
                hidden.push(name.to_string());
                false
            } else {
                true
            }
        });
        hidden
    }

    /// A listing the gateway filters by caller (rules or pins) is `cacheScope: "private"`: a
    /// shared cache must not hand one caller's list to another.
    /// A `CreateTaskResult` (a task-augmented call was accepted): the task is the caller's
    /// (the first to be told of an id keeps it).
    fn bind_task(&self, msg: &Value) {
        let task = msg.get("result").and_then(|r| r.get("task"));
        if let Some(id) = task.and_then(|t| t.get("taskId")).and_then(Value::as_str) {
            let resource = &self.target.resource.name;
            if self.gw.mcp_tasks.owner(resource, id).is_none() {
                self.gw.mcp_tasks.bind(resource, id, &self.principal);
            }
        }
    }

    /// `tasks/list` shows the caller only its own tasks.
    fn own_tasks(&self, msg: &mut Value) {
        let resource = &self.target.resource.name;
        let tasks = msg
            .get_mut("result")
            .and_then(|r| r.get_mut("tasks"))
            .and_then(Value::as_array_mut);
        if let Some(tasks) = tasks {
            tasks.retain(|t| {
                let id = t.get("taskId").and_then(Value::as_str);
                id.and_then(|id| self.gw.mcp_tasks.owner(resource, id))
                    .is_some_and(|p| p == self.principal)
            });
        }
    }

    fn cache_scope(&self, msg: &mut Value) {
        let r = &self.target.resource;
        if r.rules.is_empty() && r.pinning == tollgate_config::PinMode::Off {
            return;
        }
        if let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) {
            result.insert("cacheScope".into(), "private".into());
        }
    }

    /// A server that settles on a protocol revision tollgate does not understand: the session
    /// is not opened.
    fn check_version(&self, msg: &mut Value) {
        let Some(v) = msg
            .get("result")
            .and_then(|r| r.get("protocolVersion"))
            .and_then(Value::as_str)
        else {
            return;
        };
        if !PROTOCOL_VERSIONS.contains(&v) {
            let m = format!(
                "the server chose MCP protocol version {v:?}, which this gateway does not relay (it relays {})",
                PROTOCOL_VERSIONS.join(", ")
            );
            *msg = jsonrpc::error_response(msg.get("id"), jsonrpc::INVALID_REQUEST, &m, None);
        }
    }
}

/// `server/discover` offers only the revisions the gateway relays (a client picking another
/// would be refused).
fn discovered_versions(msg: &mut Value) {
    if let Some(v) = msg
        .get_mut("result")
        .and_then(|r| r.get_mut("supportedVersions"))
        .and_then(Value::as_array_mut)
    {
        v.retain(|v| {
            v.as_str()
                .is_some_and(|v| v == STATELESS_VERSION || PROTOCOL_VERSIONS.contains(&v))
        });
    }
}

enum Mode {
    /// Server-sent events: each event's `data` is one message.
    Sse,
    /// One body: a message or a batch when `json`; anything else is masked as text by
    /// detectors.
    Whole { json: bool },
}

/// The upstream's answer on its way to the client, message by message.
struct McpBody {
    inner: UpstreamBody,
    mode: Mode,
    buf: Vec<u8>,
    replies: Replies,
    bytes: u64,
    finish: Option<(u16, Vec<(String, String)>)>,
    done: bool,
}

/// The end of the next complete event in `buf` (after its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

impl McpBody {
    fn record(&mut self, outcome: &'static str, error: Option<String>) {
        let Some((status, headers)) = self.finish.take() else {
            return;
        };
        self.replies.session.log.record(&HttpResponse {
            n: self.replies.n,
            outcome,
            status,
            headers,
            body: BodyRecord {
                bytes: self.bytes,
                ..BodyRecord::default()
            },
            masked: None,
            duration_us: micros(self.replies.started),
            error,
        });
    }

    /// One server-sent event, rewritten.
    fn event(&mut self, raw: &[u8]) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(raw);
        let mut data = Vec::new();
        let mut other = Vec::new();
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            } else if !line.is_empty() {
                other.push(line);
            }
        }
        let mut out = String::new();
        for l in &other {
            out.push_str(l);
            out.push('\n');
        }
        if !data.is_empty() {
            let joined = data.join("\n");
            if joined.trim().is_empty() {
                out.push_str("data: \n");
            } else {
                let shown = match serde_json::from_str::<Value>(&joined) {
                    Ok(v) => self.replies.message(v)?.to_string(),
                    // Not a message: what detectors find is masked.
                    Err(_) => self.text(joined.as_bytes())?,
                };
                out.push_str("data: ");
                out.push_str(&shown);
                out.push('\n');
            }
        }
        out.push('\n');
        Ok(out.into_bytes())
    }

    fn text(&self, raw: &[u8]) -> Result<String, String> {
        let Some(plan) = &self.replies.client_plan else {
            return Ok(String::from_utf8_lossy(raw).into_owned());
        };
        let mut m = tollgate_mask::BodyMasker::new(plan, tollgate_mask::BodyKind::Text);
        let mut out = Vec::new();
        m.feed(raw, &mut out).map_err(|e| e.to_string())?;
        m.finish(&mut out).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The whole body, rewritten.
    fn whole(&mut self, json: bool) -> Result<Vec<u8>, String> {
        let raw = std::mem::take(&mut self.buf);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(raw);
        }
        if json {
            if let Ok(v) = serde_json::from_slice::<Value>(&raw) {
                let v = match v {
                    Value::Array(items) => Value::Array(
                        items
                            .into_iter()
                            .map(|m| self.replies.message(m))
                            .collect::<Result<_, _>>()?,
                    ),
                    m => self.replies.message(m)?,
                };
                return Ok(v.to_string().into_bytes());
            }
        }
        Ok(self.text(&raw)?.into_bytes())
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.done = true;
        tracing::warn!(session = %self.replies.session.log.id, error = %why, "MCP answer cut off");
        self.record("mask_error", Some(why));
        Poll::Ready(Some(Err(io::Error::other(
            "the MCP answer could not be masked; it was cut off",
        ))))
    }
}

impl Body for McpBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            // A complete event waiting: send it.
            if matches!(this.mode, Mode::Sse) {
                if let Some(end) = event_end(&this.buf) {
                    let raw: Vec<u8> = this.buf.drain(..end).collect();
                    match this.event(&raw) {
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                        Err(e) => return this.fail(e),
                    }
                }
            }
            if this.buf.len() > MAX_MESSAGE {
                return this.fail(format!("an MCP message is larger than {MAX_MESSAGE} bytes"));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.bytes += data.len() as u64;
                        this.buf.extend_from_slice(&data);
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    this.done = true;
                    this.record("upstream_error", Some("upstream body failed".into()));
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the upstream response was cut off",
                    ))));
                }
                Poll::Ready(None) => {
                    let out = match this.mode {
                        Mode::Sse if this.buf.is_empty() => Ok(Vec::new()),
                        Mode::Sse => {
                            let raw = std::mem::take(&mut this.buf);
                            this.event(&raw)
                        }
                        Mode::Whole { json } => this.whole(json),
                    };
                    let out = match out {
                        Ok(o) => o,
                        Err(e) => return this.fail(e),
                    };
                    this.done = true;
                    this.record("ok", None);
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for McpBody {
    fn drop(&mut self) {
        self.record("interrupted", None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line() {
        assert_eq!(event_end(b"data: {}\n\nnext"), Some(10));
        assert_eq!(event_end(b"data: {}\r\n\r\n"), Some(12));
        assert_eq!(event_end(b"data: {}\n"), None);
    }
}
