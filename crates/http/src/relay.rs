//! One request, from its head to the last byte of its answer: resource, identity, access,
//! the normalised target, the rules, the audit record, the review hold, the forwarded request
//! and the masked, recorded response.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tollgate_config::Unmaskable;
use tollgate_gate::authn::identify_for;
use tollgate_gate::event::{BodyRecord, HttpRequest, HttpResponse, ReviewEvent};
use tollgate_gate::hold::{self, HoldRequest, Opened};
use tollgate_gate::rules::{Caller, CommandKind, Decision};
use tollgate_gate::{AuthError, Command};
use tollgate_identity::oidc::Audience;
use tollgate_mask::{BodyKind, BodyMasker, BodyPlan, Reason};
use tollgate_metrics::registry;
use tollgate_review::Verdict;

use crate::decode::{Coding, Decoded, ReadError};
use crate::error::Refusal;
use crate::normalize::{
    method_params, normalize_path, path_readings, query_readings, METHOD_OVERRIDE_HEADERS,
};
use crate::serve::{ConnCtx, Mount};
use crate::upstream::UpstreamBody;
use crate::{micros, HttpGateway, HttpSession, Target};

/// Headers that belong to one hop (RFC 9110 §7.6.1), never forwarded either way.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the gateway sets itself or that carry the client's credentials.
const NOT_FORWARDED: &[&str] = &[
    "host",
    "authorization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-tollgate-identity",
    // Headers some frameworks (IIS, Symfony, Spring behind proxies) read as the real target:
    // the rules judged the request line, so no other target may ride along.
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-prefix",
    "x-original-method",
    // The gateway has read the whole body already.
    "expect",
];

/// Name fragments of headers whose values are never recorded.
const SECRET_HEADER_HINTS: &[&str] = &[
    "authorization",
    "cookie",
    "token",
    "secret",
    "password",
    "api-key",
    "apikey",
    "x-api",
    "session",
    "signature",
    "credential",
];

/// A request body is read whole before it is judged: a client that stops sending it mid-way,
/// or drips it, must not hold the request, its connection and its session open. Idle: no byte
/// for this long (a working link delivers far sooner); total: the whole body.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
const BODY_TOTAL_TIMEOUT: Duration = Duration::from_secs(60);

/// Methods whose answer echoes the request, with the credential the gateway injects in it.
const ECHO_METHODS: &[&str] = &["TRACE", "TRACK"];

/// Where the gateway's own cookies start (never forwarded to a resource), after any
/// `__Host-`/`__Secure-` prefix (the console's is `__Host-tollgate_console`).
const GATEWAY_COOKIE_PREFIX: &str = "tollgate";

/// Whether a cookie of this name is the gateway's own (case-insensitive).
fn is_gateway_cookie(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    let bare = name
        .strip_prefix("__host-")
        .or_else(|| name.strip_prefix("__secure-"))
        .unwrap_or(&name);
    bare.starts_with(GATEWAY_COOKIE_PREFIX)
}

pub async fn handle(
    gw: &Arc<HttpGateway>,
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Response<UpstreamBody> {
    match run(gw, ctx, req).await {
        Ok(r) => r,
        Err(refusal) => {
            registry()
                .counter(
                    "tollgate_http_refused_total",
                    "HTTP resource requests the gateway answered itself, by reason.",
                    &[("reason", refusal.code)],
                )
                .inc();
            refusal.into_response()
        }
    }
}

/// The resource a request names, and the raw path within it.
fn route<'a>(
    gw: &HttpGateway,
    ctx: &ConnCtx,
    req: &'a Request<()>,
) -> Result<(String, &'a str), Refusal> {
    let path = req.uri().path();
    match ctx.mount {
        Mount::Prefixed => {
            let rest = path.strip_prefix("/r/").unwrap_or("");
            let (name, within) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            Ok((name.to_string(), within))
        }
        Mount::ByHost => {
            let host = req
                .uri()
                .authority()
                .map(|a| a.host().to_string())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(|h| host_of(h).to_string())
                })
                .ok_or_else(|| Refusal::bad_request("the request names no host; resources on this listener are chosen by host name (<resource>.<gateway domain>)"))?;
            // The host picks the resource: only the gateway's own names may (a client must not
            // reach `billing` as `billing.attacker.example`, which an upstream might then echo).
            if !gw.serves(&host) {
                return Err(Refusal::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected",
                    format!("this gateway does not serve host {host:?}"),
                )
                .hint("resources on this listener are reached as <resource>.<a name in the gateway's certificate>"));
            }
            let name = host.split('.').next().unwrap_or("").to_ascii_lowercase();
            Ok((name, path))
        }
    }
}

pub(crate) fn host_of(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host)
}

/// Framing a proxy must not guess at: both Content-Length and Transfer-Encoding, or several
/// different Content-Lengths (hyper already settles both in HTTP/1.1: Transfer-Encoding wins,
/// the connection closes), or more than one Host (RFC 9112 §3.2), which readers pick from
/// differently.
fn check_framing(headers: &HeaderMap) -> Result<(), Refusal> {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Refusal::bad_request(
            "the request has more than one Host header",
        ));
    }
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if headers.contains_key(header::TRANSFER_ENCODING) && !lengths.is_empty() {
        return Err(Refusal::bad_request(
            "the request has both Content-Length and Transfer-Encoding; send one",
        ));
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Err(Refusal::bad_request(
            "the request has conflicting Content-Length headers",
        ));
    }
    Ok(())
}

/// Userinfo (`user:password@`) in the target or the Host is an error (RFC 9110 §4.2.4,
/// RFC 9112 §3.2): a credential that would otherwise travel on in X-Forwarded-Host and into
/// the audit record.
fn check_authority(req: &Request<()>) -> Result<(), Refusal> {
    let in_target = req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'));
    let hosts = req.headers().get_all(header::HOST);
    let in_host = hosts.iter().any(|h| h.as_bytes().contains(&b'@'));
    if in_target || in_host {
        return Err(Refusal::bad_request(
            "the request's host holds userinfo (user:password@); send credentials in a header",
        ));
    }
    // Anything else would travel on in X-Forwarded-Host, where an upstream building links
    // from it would take a path, a list or a fragment along.
    if hosts.iter().any(|h| !valid_host(h.as_bytes())) {
        return Err(Refusal::bad_request(
            "the request's Host is not a host name with an optional port",
        ));
    }
    Ok(())
}

/// Whether a Host value is `host[:port]`: a name of letters, digits, `.`, `-` and `_`, or a
/// bracketed IPv6 literal (RFC 9112 §3.2 answers any other with 400).
fn valid_host(h: &[u8]) -> bool {
    let (host_ok, rest) = match h.strip_prefix(b"[") {
        Some(inner) => {
            let Some(end) = inner.iter().position(|b| *b == b']') else {
                return false;
            };
            let literal = &inner[..end];
            let ok = !literal.is_empty()
                && literal
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
            (ok, &inner[end + 1..])
        }
        None => {
            let end = h.iter().position(|b| *b == b':').unwrap_or(h.len());
            let ok = end > 0
                && h[..end]
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            (ok, &h[end..])
        }
    };
    host_ok
        && match rest.split_first() {
            None => true,
            Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

fn auth_refusal(e: AuthError) -> Refusal {
    registry()
        .counter(
            "tollgate_auth_failures_total",
            "Failed client authentications by listener and reason.",
            &[("listener", "http"), ("reason", e.label())],
        )
        .inc();
    Refusal::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string())
        .challenge(crate::error::challenge_for(&e))
        .hint(
        "present a client certificate issued by the gateway's CA, or a token as \"Authorization: Bearer <token>\"",
    )
}

async fn run(
    gw: &Arc<HttpGateway>,
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<UpstreamBody>, Refusal> {
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let result = judge_and_forward(gw, ctx, Request::from_parts(parts, ()), &mut body).await;
    if let (Err(_), Some(body)) = (&result, body) {
        if ctx.http_version == "HTTP/2" {
            discard_body(body).await;
        }
    }
    result
}

/// An HTTP/2 request refused before its body was read: this much of it, within this long, is
/// read and dropped before the answer goes out, so that the stream ends cleanly (a client whose
/// stream is reset while it uploads reports a framing error instead of the refusal). A larger
/// or slower body is not waited for: its stream is reset.
const REFUSED_BODY_DISCARD: usize = 64 * 1024;
const REFUSED_BODY_DISCARD_TIME: Duration = Duration::from_secs(2);

async fn discard_body(body: Incoming) {
    if body.is_end_stream() || body.size_hint().lower() > REFUSED_BODY_DISCARD as u64 {
        return;
    }
    let mut body = Limited::new(body, REFUSED_BODY_DISCARD);
    let _ = tokio::time::timeout(REFUSED_BODY_DISCARD_TIME, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// [`run`] with the request's head; `body` is taken when the request is read whole.
async fn judge_and_forward(
    gw: &Arc<HttpGateway>,
    ctx: &Arc<ConnCtx>,
    req: Request<()>,
    body: &mut Option<Incoming>,
) -> Result<Response<UpstreamBody>, Refusal> {
    let started = Instant::now();
    // A malformed head (400) is said before the host is weighed (421).
    check_framing(req.headers())?;
    check_authority(&req)?;
    let (name, raw_path) = route(gw, ctx, &req)?;
    let raw_path = raw_path.to_string();
    let target = gw.target(&name);
    // RFC 8707: an MCP resource takes only OIDC tokens issued for it.
    let audiences = target
        .as_deref()
        .and_then(|t| crate::mcp::token_audiences(gw, t, crate::mcp::request_host(&req)));
    let who = identify_for(
        ctx.cert.as_ref(),
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        &gw.tokens.load_full(),
        &gw.oidc,
        match &audiences {
            Some(a) => Audience::Resource(a),
            None => Audience::Gateway,
        },
    )
    .await
    .map_err(|e| {
        let r = auth_refusal(e);
        // RFC 9728: a standard MCP client finds where to get a token from here.
        match crate::mcp::metadata_url(gw, &name, crate::mcp::request_host(&req)) {
            Some(url) => {
                let c = format!("{}, resource_metadata=\"{url}\"", r.challenge);
                r.challenge(c)
            }
            None => r,
        }
    })?;
    let access = gw.authorize(&who, target.as_deref(), &name).map_err(|e| {
        // An identified caller's refused attempt is evidence: recorded as a rejected session.
        gw.record_rejected(ctx, &who, &name, "forbidden");
        Refusal::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            .hint("ask an administrator for access, or request it with `tollgate access request`")
    })?;
    let target = target.expect("authorized");
    let mcp_session = (target.resource.kind == tollgate_config::ResourceKind::Mcp)
        .then(|| req.headers().get("mcp-session-id"))
        .flatten()
        .and_then(|v| v.to_str().ok());
    let session = gw.session(ctx, &target, &who, &access, mcp_session);
    let n = session.next_n();

    // A WebSocket upgrade is judged and recorded like any GET, then relayed by `websocket`.
    let websocket = crate::websocket::is_upgrade(&req);
    if req.headers().contains_key(header::UPGRADE) && !websocket {
        return Err(refused_event(
            &session,
            n,
            Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "upgrade_unsupported",
                "only WebSocket upgrades (an HTTP/1.1 GET with \"Upgrade: websocket\") are relayed",
            ),
        ));
    }

    // The target as the upstream will see it.
    let path = normalize_path(&raw_path)
        .map_err(|e| refused_event(&session, n, Refusal::bad_request(e.to_string())))?;
    let raw_query = req.uri().query().map(str::to_string);
    let queries = raw_query
        .as_deref()
        .map(query_readings)
        .unwrap_or_else(|| vec![Vec::new()]);
    let method = req.method().clone();
    let mut methods = vec![method.as_str().to_string()];
    // Methods are case-sensitive, but frameworks such as Django and Werkzeug upper-case them:
    // `delete` is judged as DELETE too.
    let upper = method.as_str().to_ascii_uppercase();
    if upper != methods[0] {
        methods.push(upper);
    }
    for h in METHOD_OVERRIDE_HEADERS {
        for v in req.headers().get_all(*h) {
            let m = String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_uppercase();
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
    }
    if let Some(m) = methods.iter().find(|m| ECHO_METHODS.contains(&m.as_str())) {
        return Err(refused_event(
            &session,
            n,
            Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{m} is not relayed: the upstream would echo the request back, with the credential tollgate adds to it"),
            ),
        ));
    }
    // The headers some rule looks at, as rules see them (what is recorded is redacted
    // separately); no rule and no approval digest reads any other.
    let rule_headers: Vec<&str> = target.rules.header_names().collect();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(k, _)| rule_headers.contains(&k.as_str()))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();

    // The body is read whole (up to max_request_body): the approval of a held request binds to
    // its digest, and nothing is forwarded before it is judged and recorded.
    let (parts, ()) = req.into_parts();
    let body = body.take().expect("the body is read once");
    let limit = target
        .resource
        .http
        .as_ref()
        .map_or(0, |h| h.max_request_body);
    let body = match read_body(body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return Err(refused_event(&session, n, Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than this resource accepts ({limit} bytes, its max_request_body)"),
            ).closing()));
        }
        Err(BodyError::Timeout) => {
            return Err(refused_event(&session, n, Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive in time (nothing for {} s, or not all within {} s)",
                    BODY_IDLE_TIMEOUT.as_secs(),
                    BODY_TOTAL_TIMEOUT.as_secs()
                ),
            ).closing()));
        }
        Err(BodyError::Unreadable) => {
            return Err(refused_event(
                &session,
                n,
                Refusal::bad_request("the request body could not be read").closing(),
            ));
        }
    };
    let body_sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
    if target.resource.kind == tollgate_config::ResourceKind::Mcp {
        return Ok(crate::mcp::exchange(crate::mcp::Exchange {
            gw: gw.clone(),
            ctx: ctx.clone(),
            target: target.clone(),
            session: session.clone(),
            n,
            started,
            who: who.clone(),
            access: access.clone(),
            parts,
            path,
            query: raw_query,
            body,
        })
        .await);
    }
    // `_method` in the query or a form body overrides a POST in Rails, Laravel and Symfony.
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .is_none_or(|ct| {
            ct.split(';').next().unwrap_or("").trim() == "application/x-www-form-urlencoded"
        });
    for m in method_params(raw_query.as_deref(), form.then_some(&body[..])) {
        if !methods.contains(&m) {
            methods.push(m);
        }
    }

    // The strictest decision over every method, path and query the request may be read as.
    let now = time::OffsetDateTime::now_utc();
    let caller = Caller {
        subject: &who.subject,
        groups: &who.groups,
    };
    let mut judgement: Option<tollgate_gate::rules::Judgement> = None;
    let paths = path_readings(&path);
    for m in &methods {
        for p in &paths {
            for query in &queries {
                let j = target.rules.judge(
                    &Command {
                        kind: CommandKind::Http {
                            method: m,
                            path: p,
                            query,
                            headers: &headers,
                        },
                    },
                    caller,
                    now,
                );
                judgement = Some(match judgement {
                    None => j,
                    Some(prev) if j.decision.severity() > prev.decision.severity() => j,
                    Some(prev) => prev,
                });
            }
        }
    }
    let judgement = judgement.expect("at least the request method");

    let audit_plan = target.audit_plan();
    let capture_limit = target.resource.capture_bytes;
    let request_event = HttpRequest {
        n,
        method: methods.join(" as "),
        path: path.clone(),
        query: raw_query.clone(),
        version: ctx.http_version,
        authority: parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        }),
        headers: recorded_headers(&parts.headers),
        body: capture(&body, body_sha.clone(), capture_limit, audit_plan.as_ref()),
        decision: judgement.decision.summary(),
        dry_run: judgement.dry_run.iter().map(Decision::summary).collect(),
    };
    if let Err(e) = session.log.append(&request_event).await {
        tracing::error!(session = %session.log.id, error = %e, "audit event could not be written");
        if gw.fail_closed() {
            session
                .log
                .record_refused(&request_event, "audit_unavailable");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the gateway cannot record this request, so it was not forwarded",
            )
            .hint("try again later; the gateway's audit store is unavailable"));
        }
    }
    target.requests_total[match judgement.decision {
        Decision::Allow { .. } => 0,
        Decision::Deny { .. } => 1,
        Decision::Review { .. } => 2,
    }]
    .inc();

    match &judgement.decision {
        Decision::Allow { .. } => {}
        Decision::Deny { rule, message } => {
            let mut r = Refusal::new(StatusCode::FORBIDDEN, "denied", message.clone());
            r.rule = Some(rule.clone());
            r.session = Some(session.log.id.clone());
            return Err(responded(&session, n, started, r));
        }
        Decision::Review {
            rule,
            approvers,
            min_approvals,
            timeout,
        } => {
            let digest = approval_digest(
                &methods,
                &path,
                raw_query.as_deref(),
                &headers,
                &target,
                &body_sha,
            );
            let shown = format!(
                "{} {}{}{}",
                methods.join(" as "),
                path,
                raw_query
                    .as_deref()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default(),
                if body.is_empty() {
                    String::new()
                } else {
                    format!("  -- body {} bytes, sha256 {body_sha}", body.len())
                }
            );
            let asked = HoldRequest {
                session_id: &session.log.id,
                resource: &target.resource.name,
                subject: &who.subject,
                groups: &who.groups,
                principal: &who.principal,
                rule,
                shown,
                digest,
                approvers,
                min_approvals: *min_approvals,
                timeout: *timeout,
            };
            let respond_async = parts.headers.get_all("prefer").iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
                })
            });
            if let Some(r) = held(gw, &session, n, started, asked, rule, respond_async).await {
                return r;
            }
        }
    }

    if websocket {
        let grant_ended = access.grant.clone().map(|g| {
            Box::pin(tollgate_gate::access::grant_ended(
                gw.reviews_arc(),
                who.clone(),
                target.resource.name.clone(),
                g,
            )) as crate::websocket::GrantEnded
        });
        return crate::websocket::forward(
            ctx,
            &target,
            &session,
            n,
            started,
            &who,
            &access,
            parts,
            path,
            raw_query,
            grant_ended,
        )
        .await;
    }
    forward(
        gw, ctx, &target, &session, n, started, &who, &access, parts, path, raw_query, body,
    )
    .await
}

enum BodyError {
    TooLarge,
    Timeout,
    Unreadable,
}

/// The whole request body, up to `limit` bytes, within the body timeouts. A declared length
/// over the limit is refused before anything is read (so no `100 Continue` is sent for it).
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge);
    }
    let deadline = tokio::time::Instant::now() + BODY_TOTAL_TIMEOUT;
    let mut body = Limited::new(body, limit);
    let mut out = bytes::BytesMut::new();
    loop {
        let until = deadline.min(tokio::time::Instant::now() + BODY_IDLE_TIMEOUT);
        match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Ok(frame))) => {
                // Trailers are not forwarded.
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(e))) => {
                return Err(
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        BodyError::TooLarge
                    } else {
                        BodyError::Unreadable
                    },
                )
            }
        }
    }
}

/// Holds a request for review. `None`: approved, forward it; `Some`: the answer to send.
async fn held(
    gw: &Arc<HttpGateway>,
    session: &Arc<HttpSession>,
    n: u64,
    started: Instant,
    asked: HoldRequest<'_>,
    rule: &str,
    respond_async: bool,
) -> Option<Result<Response<UpstreamBody>, Refusal>> {
    let timeout = asked.timeout;
    let reviews = gw.reviews();
    let review =
        match hold::open(reviews, asked, gw.rerun_window()) {
            Ok(Opened::Rerun(r)) => {
                session.log.record(&ReviewEvent {
                    kind: "review.rerun",
                    n,
                    review: r.id,
                    reviewers: vec![],
                    waited_ms: None,
                });
                return None;
            }
            Ok(Opened::Pending(r)) => r,
            Err(e) => {
                tracing::error!(session = %session.log.id, error = %e, "could not open a review");
                return Some(Err(responded(session, n, started, Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "review_unavailable",
                "the gateway could not open a review for this request, so it was not forwarded",
            ))));
            }
        };
    let with_review = |mut r: Refusal| {
        r.rule = Some(rule.to_string());
        r.review = Some(review.id.clone());
        r.review_url = review.url.clone();
        r.session = Some(session.log.id.clone());
        r
    };
    if respond_async {
        // The client will not wait: it repeats the identical request once approved.
        session.log.record(&ReviewEvent {
            kind: "review.async",
            n,
            review: review.id.clone(),
            reviewers: vec![],
            waited_ms: None,
        });
        let mut r = with_review(Refusal::new(
            StatusCode::ACCEPTED,
            "review_pending",
            format!("this request needs approval (rule \"{rule}\"); it is held as review {}", review.id),
        ))
        .hint(format!("a reviewer approves with `tollgate reviews approve {}`; then send the identical request again within the rerun window", review.id));
        r.status = StatusCode::ACCEPTED;
        return Some(Err(responded(session, n, started, r)));
    }
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
    let held_since = Instant::now();
    let verdict = hold::hold(reviews, &review.id, std::future::pending()).await;
    guard.2 = true;
    let waited_ms = held_since.elapsed().as_millis() as u64;
    let refusal = match verdict {
        Verdict::Approved { reviewers } => {
            session.log.record(&ReviewEvent { kind: "review.approved", n, review: review.id.clone(), reviewers, waited_ms: Some(waited_ms) });
            return None;
        }
        Verdict::Denied { reviewer, reason } => Refusal::new(
            StatusCode::FORBIDDEN,
            "review_denied",
            format!("review {} denied by {reviewer}: {}", review.id, reason.as_deref().unwrap_or("no reason given")),
        ),
        Verdict::Expired => Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            "review_expired",
            format!("review {} expired after {} without a decision; the request was not forwarded", review.id, tollgate_review::format_duration(timeout)),
        )
        .hint("ask a reviewer to decide sooner, or send `Prefer: respond-async` and repeat the request once approved"),
        Verdict::Withdrawn => Refusal::new(StatusCode::GATEWAY_TIMEOUT, "review_withdrawn", format!("review {} was withdrawn", review.id)),
        Verdict::Unavailable(e) => {
            tracing::error!(session = %session.log.id, error = %e, "review unavailable");
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "review_unavailable", format!("review {} cannot be read; the request was not forwarded", review.id))
        }
    };
    Some(Err(responded(session, n, started, with_review(refusal))))
}

/// The hash an approval binds to: method(s), normalised path, query, the headers some rule
/// looks at, and the body's digest.
fn approval_digest(
    methods: &[String],
    path: &str,
    query: Option<&str>,
    headers: &[(String, String)],
    target: &Target,
    body_sha: &str,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut part = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    part(methods.join(" ").as_bytes());
    part(path.as_bytes());
    part(query.unwrap_or("").as_bytes());
    let mut names: Vec<&str> = target.rules.header_names().collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        for (k, v) in headers.iter().filter(|(k, _)| k == name) {
            part(k.as_bytes());
            part(v.as_bytes());
        }
    }
    part(body_sha.as_bytes());
    hex::encode(ctx.finish())
}

fn is_secret_header(name: &str) -> bool {
    SECRET_HEADER_HINTS.iter().any(|h| name.contains(h))
}

/// Header names and values as the audit trail keeps them: secrets redacted.
pub(crate) fn recorded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let value = if is_secret_header(k.as_str()) {
                "[redacted]".to_string()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            (k.as_str().to_string(), value)
        })
        .collect()
}

/// A body as the audit record keeps it: size, digest, and its first `limit` bytes masked with
/// the resource's masks (for every viewer: captures stay masked).
pub(crate) fn capture(
    body: &[u8],
    sha256: String,
    limit: usize,
    plan: Option<&BodyPlan>,
) -> BodyRecord {
    if body.is_empty() {
        return BodyRecord::default();
    }
    let (shown, truncated) = match plan {
        Some(plan) if plan.is_active() => {
            let mut m = BodyMasker::new(plan, BodyKind::Sniff);
            let mut out = Vec::new();
            let ok = m.feed(body, &mut out).is_ok() && m.finish(&mut out).is_ok();
            if !ok {
                // Unparseable as what it claims: keep only what text detectors mask.
                out.clear();
                let mut t = BodyMasker::new(plan, BodyKind::Text);
                let _ = t.feed(body, &mut out);
                let _ = t.finish(&mut out);
            }
            let truncated = out.len() > limit;
            out.truncate(limit);
            (out, truncated)
        }
        _ => (body[..body.len().min(limit)].to_vec(), body.len() > limit),
    };
    BodyRecord {
        bytes: body.len() as u64,
        sha256: Some(sha256),
        capture: Some(String::from_utf8_lossy(&shown).into_owned()),
        truncated,
    }
}

/// Records the refusal of a request before it was judged (bad target, too large, upgrade).
fn refused_event(session: &HttpSession, n: u64, r: Refusal) -> Refusal {
    session.log.record(&HttpResponse {
        n,
        outcome: "refused",
        status: r.status.as_u16(),
        headers: Vec::new(),
        body: BodyRecord::default(),
        masked: None,
        duration_us: 0,
        error: Some(r.error.clone()),
    });
    r
}

/// Records the gateway's own answer to a judged request.
pub(crate) fn responded(session: &HttpSession, n: u64, started: Instant, r: Refusal) -> Refusal {
    session.log.record(&HttpResponse {
        n,
        outcome: "refused",
        status: r.status.as_u16(),
        headers: Vec::new(),
        body: BodyRecord::default(),
        masked: None,
        duration_us: micros(started),
        error: Some(r.error.clone()),
    });
    r
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    gw: &Arc<HttpGateway>,
    ctx: &Arc<ConnCtx>,
    target: &Arc<Target>,
    session: &Arc<HttpSession>,
    n: u64,
    started: Instant,
    who: &tollgate_gate::Identity,
    access: &tollgate_gate::Access,
    parts: hyper::http::request::Parts,
    path: String,
    query: Option<String>,
    body: Bytes,
) -> Result<Response<UpstreamBody>, Refusal> {
    let http = target.resource.http.as_ref().expect("http resource");
    // What the caller sees: masked unless an unmask grant says otherwise.
    let plan = match (&target.mask, &access.unmask) {
        (Some(p), None) => Some(p.body_plan(&who.groups)),
        _ => None,
    }
    .filter(BodyPlan::is_active);
    let audit_plan = target.audit_plan();
    let masking = plan.is_some() || audit_plan.is_some();

    let uri = format!(
        "{}{}{}{}",
        target.origin,
        http.base_path,
        path,
        query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let mut up = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(Full::new(body).map_err(|never| match never {}).boxed())
        .map_err(|_| {
            responded(
                session,
                n,
                started,
                Refusal::bad_request("the request cannot be forwarded as written"),
            )
        })?;
    forwarded_headers(
        ctx,
        target,
        &parts,
        masking,
        (who, &session.log.id),
        up.headers_mut(),
    )?;
    *up.version_mut() = hyper::Version::HTTP_11;
    let resp = match tokio::time::timeout(http.response_timeout, target.client.request(up)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(upstream_failed(target, session, n, started, &e)),
        Err(_) => {
            let mut r = Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "resource \"{}\" did not answer within {} s",
                    target.resource.name,
                    http.response_timeout.as_secs()
                ),
            );
            r.session = Some(session.log.id.clone());
            return Err(responded(session, n, started, r));
        }
    };
    let head_only = parts.method == Method::HEAD;
    let response = relay_response(
        ctx, target, session, n, started, head_only, plan, audit_plan, resp,
    )?;
    // A caller who reached the resource through a just-in-time grant loses a long answer
    // (server-sent events, a large download) when the grant ends, as a PostgreSQL session does.
    Ok(match &access.grant {
        None => response,
        Some(grant) => {
            let ended = tollgate_gate::access::grant_ended(
                gw.reviews_arc(),
                who.clone(),
                target.resource.name.clone(),
                grant.clone(),
            );
            response.map(|body| {
                GrantBound {
                    inner: body,
                    ended: Box::pin(ended),
                    session: session.clone(),
                    n,
                    review: grant.review_id.clone(),
                }
                .boxed()
            })
        }
    })
}

/// A response body that ends when the grant it rests on does.
struct GrantBound {
    inner: UpstreamBody,
    ended: Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>,
    session: Arc<HttpSession>,
    n: u64,
    review: String,
}

impl Body for GrantBound {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.ended.as_mut().poll(cx).is_ready() {
            let this = &*self;
            this.session.log.record(&ReviewEvent {
                kind: "grant.ended",
                n: this.n,
                review: this.review.clone(),
                reviewers: vec![],
                waited_ms: None,
            });
            return Poll::Ready(Some(Err(io::Error::other(
                "the access grant ended; the response was cut off",
            ))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The headers of a request as forwarded upstream: hop-by-hop headers, the client's credentials
/// and the gateway's cookies out; the resource's credential and `X-Forwarded-*` in.
pub(crate) fn forwarded_headers(
    ctx: &ConnCtx,
    target: &Target,
    parts: &hyper::http::request::Parts,
    masking: bool,
    caller: (&tollgate_gate::Identity, &str),
    h: &mut HeaderMap,
) -> Result<(), Refusal> {
    let connection_listed = connection_tokens(&parts.headers);
    let inject_name = target.inject.as_ref().map(|(k, _)| k.clone());
    let identity_name = target.identity.as_ref().map(|(k, _)| k.clone());
    for (k, v) in parts.headers.iter() {
        let name = k.as_str();
        if HOP_BY_HOP.contains(&name)
            || NOT_FORWARDED.contains(&name)
            || connection_listed.iter().any(|c| c == name)
            || inject_name.as_ref() == Some(k)
            || identity_name.as_ref() == Some(k)
            || (masking && matches!(name, "range" | "if-range" | "accept-encoding"))
        {
            continue;
        }
        if name == "cookie" && ctx.mount == Mount::Prefixed {
            if let Some(kept) = without_gateway_cookies(v) {
                h.append(k.clone(), kept);
            }
            continue;
        }
        h.append(k.clone(), v.clone());
    }
    h.insert(
        header::HOST,
        target
            .host_header
            .clone()
            .ok_or_else(|| Refusal::bad_request("bad upstream host"))?,
    );
    if let Some(v) = &ctx.forwarded_for {
        h.insert("x-forwarded-for", v.clone());
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    if let Some(host) = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }) {
        // Only a name the gateway really answers to: an upstream may build links from it.
        if target.served.covers(host_of(&host)) {
            if let Ok(v) = HeaderValue::from_str(&host) {
                h.insert("x-forwarded-host", v);
            }
        }
    }
    if let Some((k, v)) = &target.inject {
        h.insert(k.clone(), v.clone());
    }
    if let Some((name, key)) = &target.identity {
        let (who, session) = caller;
        let token = key.sign(who, &target.resource.name, session);
        let mut value = HeaderValue::from_str(&token)
            .map_err(|_| Refusal::bad_request("the caller's identity cannot be passed upstream"))?;
        value.set_sensitive(true);
        h.insert(name.clone(), value);
    }
    if masking {
        // Compressed bodies cannot be masked as they pass; ask for them plain.
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    Ok(())
}

/// Records an upstream request that failed, and the client's answer to it.
pub(crate) fn upstream_failed(
    target: &Target,
    session: &HttpSession,
    n: u64,
    started: Instant,
    e: &hyper_util::client::legacy::Error,
) -> Refusal {
    registry()
        .counter(
            "tollgate_upstream_connect_failures_total",
            "Failed upstream connections by resource and reason.",
            &[("resource", &target.resource.name), ("reason", "http")],
        )
        .inc();
    tracing::error!(session = %session.log.id, resource = %target.resource.name, error = %e, "upstream request failed");
    let mut r = Refusal::new(
        StatusCode::BAD_GATEWAY,
        "upstream_unavailable",
        format!(
            "tollgate could not reach resource \"{}\"",
            target.resource.name
        ),
    )
    .hint(format!(
        "the gateway log has the details under session {}",
        session.log.id
    ));
    r.session = Some(session.log.id.clone());
    session.log.record(&HttpResponse {
        n,
        outcome: "upstream_error",
        status: 502,
        headers: Vec::new(),
        body: BodyRecord::default(),
        masked: None,
        duration_us: micros(started),
        error: Some(upstream_error_label(e).into()),
    });
    r
}

/// The upstream's answer on its way to the client: checked for what can be masked, its
/// headers cleaned, its body masked and recorded as it streams (see [`RelayBody`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn relay_response(
    ctx: &ConnCtx,
    target: &Target,
    session: &Arc<HttpSession>,
    n: u64,
    started: Instant,
    head_only: bool,
    plan: Option<BodyPlan>,
    audit_plan: Option<BodyPlan>,
    resp: Response<Incoming>,
) -> Result<Response<UpstreamBody>, Refusal> {
    let http = target.resource.http.as_ref().expect("http resource");
    let masking = plan.is_some() || audit_plan.is_some();
    let (mut rparts, rbody) = resp.into_parts();
    let coding = Coding::of(&rparts.headers);
    let content_type = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let kind = body_kind(&content_type);
    let head_only = head_only
        || rparts.status == StatusCode::NO_CONTENT
        || rparts.status == StatusCode::NOT_MODIFIED;
    let body_masked = masking && !head_only;
    let refuse = |why: String, hint: &str| {
        session.log.record(&HttpResponse {
            n,
            outcome: "refused",
            status: 502,
            headers: recorded_headers(&rparts.headers),
            body: BodyRecord::default(),
            masked: None,
            duration_us: micros(started),
            error: Some(format!(
                "unmaskable upstream response (status {})",
                rparts.status.as_u16()
            )),
        });
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "unmaskable",
            format!(
                "the response of resource \"{}\" cannot be masked ({why}), so it was not relayed",
                target.resource.name,
            ),
        )
        .hint(hint)
    };
    let mut passed_unmasked = false;
    if body_masked && kind.is_none() {
        match http.unmaskable {
            Unmaskable::Refuse => {
                return Err(refuse(
                    "its content type is not text or JSON".into(),
                    "the resource's operator can set unmaskable = \"pass\" for such responses",
                ))
            }
            Unmaskable::Pass => passed_unmasked = true,
        }
    }
    // A text or JSON body compressed although the gateway asked for identity is decoded to be
    // masked; one in a coding the gateway cannot decode is refused whatever `unmaskable` says.
    let decode = match coding {
        _ if !body_masked || passed_unmasked => None,
        Ok(c) => c,
        Err(c) => {
            return Err(refuse(
                format!("it is compressed as {c:?}, which tollgate cannot decode"),
                "the upstream should honour Accept-Encoding: identity (tollgate decodes gzip, deflate, br and zstd)",
            ))
        }
    };
    let kind = kind.unwrap_or(BodyKind::Text);
    let client_plan = if passed_unmasked { None } else { plan };
    let audit = if passed_unmasked { None } else { audit_plan };
    let rewrites = client_plan.is_some();

    // Response headers: hop-by-hop out; a masked body changes length.
    let listed = connection_tokens(&rparts.headers);
    let names: Vec<HeaderName> = rparts.headers.keys().cloned().collect();
    for k in names {
        if HOP_BY_HOP.contains(&k.as_str())
            || listed.iter().any(|c| c == k.as_str())
            || ((rewrites || decode.is_some()) && k == header::CONTENT_LENGTH)
            || (decode.is_some() && k == header::CONTENT_ENCODING)
        {
            rparts.headers.remove(&k);
        }
    }
    if ctx.mount == Mount::Prefixed {
        // Served on the console's origin: the resource's pages may run no script there.
        rparts.headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        );
    }
    scope_set_cookies(&mut rparts.headers, ctx.mount, target);
    rewrite_locations(&mut rparts.headers, ctx.mount, target);
    let recorded = recorded_headers(&rparts.headers);
    let relay = RelayBody {
        inner: match decode {
            Some(c) => Source::Decoded(Decoded::new(rbody, c), c),
            None => Source::Plain(rbody),
        },
        masker: client_plan.as_ref().map(|p| BodyMasker::new(p, kind)),
        audit: audit
            .as_ref()
            .map(|p| (BodyMasker::new(p, kind), Vec::new())),
        capture: Vec::new(),
        capture_limit: target.resource.capture_bytes,
        bytes: 0,
        sha: ring::digest::Context::new(&ring::digest::SHA256),
        finish: Some(Finish {
            session: session.clone(),
            n,
            status: rparts.status.as_u16(),
            headers: recorded,
            started,
            unmasked: passed_unmasked,
        }),
        done: false,
    };
    Ok(Response::from_parts(rparts, relay.boxed()))
}

fn upstream_error_label(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        "connect"
    } else {
        "request"
    }
}

/// How a response body is read for masking (`None`: binary, cannot be masked).
fn body_kind(content_type: &str) -> Option<BodyKind> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.is_empty() {
        return Some(BodyKind::Sniff);
    }
    if essence == "application/json" || essence.ends_with("+json") {
        return Some(BodyKind::Sniff);
    }
    if essence.starts_with("text/")
        || matches!(
            essence,
            "application/xml"
                | "application/javascript"
                | "application/x-ndjson"
                | "application/x-www-form-urlencoded"
                | "application/graphql"
                | "application/yaml"
        )
        || essence.ends_with("+xml")
    {
        return Some(
            if essence == "application/x-ndjson" || essence == "text/event-stream" {
                BodyKind::Text
            } else {
                BodyKind::Sniff
            },
        );
    }
    None
}

pub(crate) fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Cookies the upstream sets stay its own. `Domain` goes (on http_listen it would share them
/// with the hosts of sibling resources); on https_listen, where every resource shares the
/// gateway's origin, `Path` is moved under `/r/<name>` and a cookie named like the gateway's
/// is dropped.
fn scope_set_cookies(headers: &mut HeaderMap, mount: Mount, target: &Target) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let base = target
        .resource
        .http
        .as_ref()
        .map_or("", |h| h.base_path.trim_end_matches('/'));
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in cookies {
        if let Some(v) = scope_set_cookie(&v, mount, &target.resource.name, base) {
            headers.append(header::SET_COOKIE, v);
        }
    }
}

/// A `Location` (or `Content-Location`) the upstream sends to itself, as the client reaches it
/// through the gateway: the upstream's origin (which clients are not shown) and base path cut,
/// and on https_listen the path put under `/r/<name>`. Other locations pass as they are.
fn rewrite_locations(headers: &mut HeaderMap, mount: Mount, target: &Target) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(v) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(v) =
            client_location(v, mount, target).and_then(|l| HeaderValue::from_str(&l).ok())
        {
            headers.insert(name, v);
        }
    }
}

fn client_location(v: &str, mount: Mount, target: &Target) -> Option<String> {
    let scheme = target.origin.split("://").next().unwrap_or("https");
    let own = [target.origin.clone(), format!("{scheme}://{}", target.host)];
    let path = match own.iter().find_map(|o| {
        v.get(..o.len())
            .filter(|p| p.eq_ignore_ascii_case(o))
            .map(|_| &v[o.len()..])
    }) {
        Some("") => "/",
        Some(rest) if rest.starts_with(['/', '?', '#']) => rest,
        Some(_) => return None,
        None if v.starts_with('/') && !v.starts_with("//") => v,
        None => return None,
    };
    let base = target
        .resource
        .http
        .as_ref()
        .map_or("", |h| h.base_path.trim_end_matches('/'));
    let path = match path.strip_prefix(base) {
        Some(rest)
            if !base.is_empty() && (rest.is_empty() || rest.starts_with(['/', '?', '#'])) =>
        {
            rest
        }
        _ => path,
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Some(match mount {
        Mount::Prefixed => format!("/r/{}{path}", target.resource.name),
        Mount::ByHost => path,
    })
}

/// One `Set-Cookie` as [`scope_set_cookies`] lets it through (`None`: dropped).
fn scope_set_cookie(
    v: &HeaderValue,
    mount: Mount,
    resource: &str,
    base_path: &str,
) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    let mut attrs = s.split(';');
    let pair = attrs.next()?.trim();
    let name = pair.split('=').next().unwrap_or("").trim();
    let prefixed = mount == Mount::Prefixed;
    if prefixed && is_gateway_cookie(name) {
        return None;
    }
    let mut out = vec![pair.to_string()];
    for attr in attrs.map(str::trim).filter(|a| !a.is_empty()) {
        let (key, value) = attr.split_once('=').unwrap_or((attr, ""));
        match key.trim().to_ascii_lowercase().as_str() {
            "domain" => {}
            "path" if prefixed => {
                // The upstream's path, as the gateway's client addresses it.
                let p = value.trim();
                let p = p
                    .strip_prefix(base_path)
                    .filter(|rest| {
                        !base_path.is_empty() && (rest.is_empty() || rest.starts_with('/'))
                    })
                    .unwrap_or(p);
                let p = if p.starts_with('/') { p } else { "/" };
                out.push(format!("Path=/r/{resource}{p}"));
            }
            _ => out.push(attr.to_string()),
        }
    }
    HeaderValue::from_str(&out.join("; ")).ok()
}

/// A Cookie header without the gateway's own cookies (`None` when nothing is left).
fn without_gateway_cookies(v: &HeaderValue) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    let kept: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !is_gateway_cookie(c.split('=').next().unwrap_or("")))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

/// What a relayed body is read from: the upstream's body, or its decoded form.
enum Source {
    Plain(Incoming),
    Decoded(Decoded, Coding),
}

impl Source {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        match self {
            Source::Plain(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(ReadError::Upstream))),
            Source::Decoded(d, _) => d.poll_next(cx).map(|f| f.map(|r| r.map(Frame::data))),
        }
    }
}

/// What `http.response` needs once the body has passed.
struct Finish {
    session: Arc<HttpSession>,
    n: u64,
    status: u16,
    headers: Vec<(String, String)>,
    started: Instant,
    unmasked: bool,
}

/// The upstream's body on its way to the client: masked as it passes (for the caller, and
/// separately for the audit capture when the caller may see it unmasked), counted, digested and
/// captured; `http.response` is recorded when it ends, fails or is dropped.
struct RelayBody {
    inner: Source,
    masker: Option<BodyMasker>,
    /// The audit capture's own masker and output when the caller sees something else.
    audit: Option<(BodyMasker, Vec<u8>)>,
    capture: Vec<u8>,
    capture_limit: usize,
    bytes: u64,
    sha: ring::digest::Context,
    finish: Option<Finish>,
    done: bool,
}

impl RelayBody {
    fn keep(&mut self, original: &[u8], shown: &[u8]) {
        self.bytes += original.len() as u64;
        self.sha.update(original);
        let room = self.capture_limit.saturating_sub(self.capture.len());
        if room == 0 {
            return;
        }
        match &mut self.audit {
            Some((m, out)) if self.masker.is_none() => {
                out.clear();
                let _ = m.feed(original, out);
                let take = out.len().min(room);
                self.capture.extend_from_slice(&out[..take]);
            }
            _ => {
                let take = shown.len().min(room);
                self.capture.extend_from_slice(&shown[..take]);
            }
        }
    }

    fn record(
        &mut self,
        outcome: &'static str,
        error: Option<String>,
        masked: Option<serde_json::Value>,
    ) {
        let Some(f) = self.finish.take() else { return };
        let sha = std::mem::replace(
            &mut self.sha,
            ring::digest::Context::new(&ring::digest::SHA256),
        );
        let truncated =
            self.bytes as usize > self.capture.len() && self.capture.len() >= self.capture_limit;
        let masked = match (masked, f.unmasked) {
            (m, false) => m,
            (_, true) => {
                Some(json!({"unmasked": "unmaskable response passed (unmaskable = \"pass\")"}))
            }
        };
        f.session.log.record(&HttpResponse {
            n: f.n,
            outcome,
            status: f.status,
            headers: f.headers,
            body: BodyRecord {
                bytes: self.bytes,
                sha256: (self.bytes > 0).then(|| hex::encode(sha.finish())),
                capture: (!self.capture.is_empty())
                    .then(|| String::from_utf8_lossy(&self.capture).into_owned()),
                truncated,
            },
            masked,
            duration_us: micros(f.started),
            error,
        });
    }
}

pub(crate) fn reasons_json(s: &tollgate_mask::BodySummary) -> serde_json::Value {
    json!({
        "values": s.masked_values,
        "by": s.reasons.iter().map(Reason::to_string).collect::<Vec<_>>(),
    })
}

impl Body for RelayBody {
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
            match this.inner.poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let out = match &mut this.masker {
                        None => {
                            this.keep(&frame, &frame);
                            frame
                        }
                        Some(m) => {
                            let mut out = Vec::with_capacity(frame.len());
                            if let Err(e) = m.feed(&frame, &mut out) {
                                this.done = true;
                                this.record("mask_error", Some(e.to_string()), None);
                                return Poll::Ready(Some(Err(io::Error::other(
                                    "the response could not be masked; it was cut off",
                                ))));
                            }
                            this.keep(&frame, &out);
                            Bytes::from(out)
                        }
                    };
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(ReadError::Undecodable(e)))) => {
                    this.done = true;
                    let coding = match &this.inner {
                        Source::Decoded(_, c) => c.name(),
                        Source::Plain(_) => "compressed",
                    };
                    this.record(
                        "decode_error",
                        Some(format!(
                            "the upstream's {coding} body could not be decoded ({:?})",
                            e.kind()
                        )),
                        None,
                    );
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the upstream's compressed response could not be decoded; it was cut off",
                    ))));
                }
                Poll::Ready(Some(Err(ReadError::Upstream(e)))) => {
                    this.done = true;
                    this.record(
                        "upstream_error",
                        Some(format!(
                            "upstream body failed: {}",
                            if e.is_timeout() {
                                "timeout"
                            } else {
                                "connection"
                            }
                        )),
                        None,
                    );
                    return Poll::Ready(Some(Err(io::Error::other(
                        "the upstream response was cut off",
                    ))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let mut out = Vec::new();
                    let summary = match &mut this.masker {
                        Some(m) => match m.finish(&mut out) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                this.record("mask_error", Some(e.to_string()), None);
                                return Poll::Ready(Some(Err(io::Error::other(
                                    "the response could not be masked; it was cut off",
                                ))));
                            }
                        },
                        None => match &mut this.audit {
                            Some((m, buf)) => {
                                buf.clear();
                                let s = m.finish(buf).ok();
                                let room = this.capture_limit.saturating_sub(this.capture.len());
                                let take = buf.len().min(room);
                                let tail = buf[..take].to_vec();
                                this.capture.extend_from_slice(&tail);
                                s
                            }
                            None => None,
                        },
                    };
                    if this.masker.is_some() && !out.is_empty() {
                        let room = this.capture_limit.saturating_sub(this.capture.len());
                        let take = out.len().min(room);
                        this.capture.extend_from_slice(&out[..take]);
                    }
                    let masked = summary
                        .as_ref()
                        .filter(|s| s.masked_values > 0)
                        .map(reasons_json);
                    this.record("ok", None, masked);
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

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Plain(b) if self.masker.is_none() => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // The client went away (or the connection failed) before the body ended.
        self.record("interrupted", None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_kinds() {
        assert_eq!(
            body_kind("application/json; charset=utf-8"),
            Some(BodyKind::Sniff)
        );
        assert_eq!(body_kind("application/problem+json"), Some(BodyKind::Sniff));
        assert_eq!(body_kind("text/plain"), Some(BodyKind::Sniff));
        assert_eq!(body_kind("text/event-stream"), Some(BodyKind::Text));
        assert_eq!(body_kind(""), Some(BodyKind::Sniff));
        assert_eq!(body_kind("image/png"), None);
        assert_eq!(body_kind("application/octet-stream"), None);
    }

    #[test]
    fn host_values() {
        for ok in [
            "a",
            "billing.localhost",
            "b-1.example:8443",
            "x_y:",
            "[::1]",
            "[::1]:443",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "", ":80", "a/b", "a\\b", "a,b", "a b", "a#x", "a:443/x", "a:x", "[::1", "[]", "[::1]x",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn upstream_cookies_are_scoped_to_their_resource() {
        let scoped = |v: &'static str, mount, base| {
            scope_set_cookie(&HeaderValue::from_static(v), mount, "billing", base)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let p = Mount::Prefixed;
        assert_eq!(
            scoped("sid=1; Path=/; Domain=.example.com; HttpOnly", p, "").as_deref(),
            Some("sid=1; Path=/r/billing/; HttpOnly")
        );
        assert_eq!(
            scoped("sid=1; path=/api/v1", p, "/api").as_deref(),
            Some("sid=1; Path=/r/billing/v1")
        );
        assert_eq!(
            scoped("sid=1; Path=/apix", p, "/api").as_deref(),
            Some("sid=1; Path=/r/billing/apix")
        );
        assert_eq!(
            scoped("sid=1; Path=x", p, "").as_deref(),
            Some("sid=1; Path=/r/billing/")
        );
        assert_eq!(scoped("sid=1", p, "").as_deref(), Some("sid=1"));
        assert_eq!(scoped("Tollgate_session=x; Path=/", p, ""), None);
        assert_eq!(
            scoped("__Host-tollgate_console=x; Path=/; Secure", p, ""),
            None
        );
        assert_eq!(
            scoped("sid=1; Path=/; DOMAIN=example.com", Mount::ByHost, "").as_deref(),
            Some("sid=1; Path=/")
        );
    }

    #[test]
    fn gateway_cookies_are_not_forwarded() {
        let v = HeaderValue::from_static("tollgate_session=abc; theme=dark; TOLLGATE_csrf=x");
        assert_eq!(without_gateway_cookies(&v).unwrap(), "theme=dark");
        let v = HeaderValue::from_static("tollgate_session=abc");
        assert!(without_gateway_cookies(&v).is_none());
        // The console's cookie carries a __Host- prefix; __Secure- is covered as well.
        let v = HeaderValue::from_static(
            "__Host-tollgate_console=0a1b; sid=1; __secure-TOLLGATE_x=y; __Host-other=z",
        );
        assert_eq!(
            without_gateway_cookies(&v).unwrap(),
            "sid=1; __Host-other=z"
        );
        assert!(!is_gateway_cookie("__Host-"));
        assert!(!is_gateway_cookie("my_tollgate"));
    }

    #[test]
    fn secrets_are_not_recorded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer x"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        let r = recorded_headers(&h);
        assert!(
            r.iter().all(|(k, v)| k == "accept" || v == "[redacted]"),
            "{r:?}"
        );
        assert!(r
            .iter()
            .any(|(k, v)| k == "accept" && v == "application/json"));
    }
}
