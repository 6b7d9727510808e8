//! WebSocket upgrades of HTTP resources (RFC 6455 over HTTP/1.1).
//!
//! The upgrade request has already been identified, authorized, judged and recorded by the
//! relay like any GET. Here it is forwarded with the same header hygiene plus the upgrade's own
//! headers (`Sec-WebSocket-Extensions` dropped when the resource has masks, so that
//! permessage-deflate is never negotiated then); an upstream `101` is answered `101` and the
//! two upgraded streams are relayed frame by frame ([`frame`] parses them). Every message
//! becomes a `ws.message` event (text captured masked, binary only sized and digested) and the
//! end a `ws.close`. Upstream text messages are masked for a caller whose masks apply; binary
//! ones then follow the resource's `unmaskable` (refuse: close 1008). Client frames are
//! forwarded as received.

mod frame;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tollgate_config::Unmaskable;
use tollgate_gate::event::{BodyRecord, HttpResponse, WsClose, WsMessage};
use tollgate_gate::{Access, Identity};
use tollgate_mask::{BodyKind, BodyMasker, BodyPlan};

use crate::error::Refusal;
use crate::relay::{
    capture, forwarded_headers, reasons_json, recorded_headers, relay_response, responded,
    upstream_failed,
};
use crate::serve::ConnCtx;
use crate::upstream::UpstreamBody;
use crate::{micros, HttpSession, Target};
use frame::{Assembler, FrameError, OpCode};

/// Largest message (its fragments together) relayed; a larger one closes with 1009.
pub const MAX_MESSAGE: u64 = 16 << 20;
/// How long the other direction may go on once one has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const SEC_KEY: &str = "sec-websocket-key";
const SEC_ACCEPT: &str = "sec-websocket-accept";
const SEC_PROTOCOL: &str = "sec-websocket-protocol";
const SEC_EXTENSIONS: &str = "sec-websocket-extensions";

fn has_token<B>(req: &Request<B>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a request asks to become a WebSocket: an HTTP/1.1 GET with `Connection: Upgrade`
/// and `Upgrade: websocket`.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(req, header::CONNECTION, "upgrade")
        && has_token(req, header::UPGRADE, "websocket")
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub(crate) fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

fn bad_gateway(
    session: &HttpSession,
    n: u64,
    started: Instant,
    target: &Target,
    why: &str,
) -> Refusal {
    tracing::warn!(session = %session.log.id, resource = %target.resource.name, "websocket upgrade refused: {why}");
    let mut r = Refusal::new(
        StatusCode::BAD_GATEWAY,
        "upstream_bad_upgrade",
        format!(
            "resource \"{}\" did not accept the WebSocket upgrade correctly",
            target.resource.name
        ),
    );
    r.session = Some(session.log.id.clone());
    responded(session, n, started, r)
}

/// Forwards a judged upgrade request; on `101` answers the client `101` and relays the
/// WebSocket in a task of its own. Any other answer is relayed as a response.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    ctx: &Arc<ConnCtx>,
    target: &Arc<Target>,
    session: &Arc<HttpSession>,
    n: u64,
    started: Instant,
    who: &Identity,
    access: &Access,
    mut parts: hyper::http::request::Parts,
    path: String,
    query: Option<String>,
    grant_ended: Option<GrantEnded>,
) -> Result<Response<UpstreamBody>, Refusal> {
    let http = target.resource.http.as_ref().expect("http resource");
    let plan = match (&target.mask, &access.unmask) {
        (Some(p), None) => Some(p.body_plan(&who.groups)),
        _ => None,
    }
    .filter(BodyPlan::is_active);
    let audit_plan = target.audit_plan();
    let masking = plan.is_some() || audit_plan.is_some();
    let has_masks = target.mask.is_some();

    let Some(key) = parts.headers.get(SEC_KEY).cloned() else {
        return Err(responded(
            session,
            n,
            started,
            Refusal::bad_request("a WebSocket upgrade needs a Sec-WebSocket-Key header"),
        ));
    };
    let Some(client_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
        return Err(responded(
            session,
            n,
            started,
            Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "upgrade_unsupported",
                "this connection cannot be upgraded",
            ),
        ));
    };

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
        .method(Method::GET)
        .uri(uri)
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .map_err(|_| {
            responded(
                session,
                n,
                started,
                Refusal::bad_request("the request cannot be forwarded as written"),
            )
        })?;
    let h = up.headers_mut();
    forwarded_headers(ctx, target, &parts, masking, (who, &session.log.id), h)?;
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if has_masks {
        // Compressed frames cannot be read, so masks could not apply to them.
        h.remove(SEC_EXTENSIONS);
    }
    *up.version_mut() = Version::HTTP_11;

    let mut resp = match target.client.request(up).await {
        Ok(r) => r,
        Err(e) => return Err(upstream_failed(target, session, n, started, &e)),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return relay_response(
            ctx, target, session, n, started, false, plan, audit_plan, resp,
        );
    }
    let rh = resp.headers();
    let accept = rh.get(SEC_ACCEPT).cloned();
    if accept.as_ref().map(HeaderValue::as_bytes) != Some(accept_key(key.as_bytes()).as_bytes()) {
        return Err(bad_gateway(
            session,
            n,
            started,
            target,
            "wrong or missing Sec-WebSocket-Accept",
        ));
    }
    let extensions = rh.get(SEC_EXTENSIONS).cloned();
    if has_masks && extensions.is_some() {
        return Err(bad_gateway(
            session,
            n,
            started,
            target,
            "an extension was negotiated that was not offered",
        ));
    }
    let protocol = rh.get(SEC_PROTOCOL).cloned();
    let upstream_upgrade = hyper::upgrade::on(&mut resp);

    let mut answer = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let ah = answer.headers_mut();
    ah.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    ah.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    ah.insert(SEC_ACCEPT, accept.expect("checked"));
    if let Some(p) = protocol {
        ah.insert(SEC_PROTOCOL, p);
    }
    if let Some(e) = &extensions {
        ah.insert(SEC_EXTENSIONS, e.clone());
    }
    session.log.record(&HttpResponse {
        n,
        outcome: "ok",
        status: 101,
        headers: recorded_headers(ah),
        body: BodyRecord::default(),
        masked: None,
        duration_us: micros(started),
        error: None,
    });

    let relay = Relay {
        session: session.clone(),
        n,
        rewrite: plan.clone(),
        audit: audit_plan,
        // Binary messages are never captured: only what the caller sees needs masking.
        refuse_binary: plan.is_some() && http.unmaskable == Unmaskable::Refuse,
        pass_binary_unmasked: plan.is_some() && http.unmaskable == Unmaskable::Pass,
        capture_limit: target.resource.capture_bytes,
        // Any negotiated extension may use the reserved bits.
        rsv_allowed: if extensions.is_some() { 0b111 } else { 0 },
        stats: Mutex::new(Stats::default()),
        started: Instant::now(),
    };
    tokio::spawn(async move {
        match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok((client, upstream)) => relay.run(client, upstream, grant_ended).await,
            Err(e) => {
                tracing::warn!(session = %relay.session.log.id, error = %e, "websocket upgrade did not complete");
                relay.record_close("error", None, Some("the upgrade did not complete".into()));
            }
        }
    });
    Ok(answer)
}

/// Which side sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

#[derive(Default)]
struct Stats {
    client_code: Option<u16>,
    upstream_code: Option<u16>,
    client_messages: u64,
    client_bytes: u64,
    upstream_messages: u64,
    upstream_bytes: u64,
}

/// Resolves when the just-in-time grant a WebSocket rests on ends.
pub(crate) type GrantEnded = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// One relayed WebSocket: what both directions share.
struct Relay {
    session: Arc<HttpSession>,
    n: u64,
    /// The caller's plan: upstream text messages are masked with it.
    rewrite: Option<BodyPlan>,
    /// The resource's plan for captures.
    audit: Option<BodyPlan>,
    refuse_binary: bool,
    pass_binary_unmasked: bool,
    capture_limit: usize,
    rsv_allowed: u8,
    stats: Mutex<Stats>,
    started: Instant,
}

type Reader = ReadHalf<TokioIo<Upgraded>>;
type Writer = WriteHalf<TokioIo<Upgraded>>;

/// How one direction ended.
#[derive(Debug)]
enum End {
    /// Its sender closed the connection.
    Eof,
    /// Reading or writing failed.
    Io,
    /// The gateway closes the WebSocket with this code.
    Close(u16, String),
}

/// A message being received: counted, digested, and its text kept for masking and capture.
struct Message {
    opcode: OpCode,
    frames: u32,
    bytes: u64,
    sha: ring::digest::Context,
    text: Vec<u8>,
    compressed: bool,
}

impl Relay {
    async fn run(&self, client: Upgraded, upstream: Upgraded, grant_ended: Option<GrantEnded>) {
        let (mut client_r, mut client_w) = tokio::io::split(TokioIo::new(client));
        let (mut upstream_r, mut upstream_w) = tokio::io::split(TokioIo::new(upstream));
        let end = {
            let to_upstream = self.pump(Side::Client, &mut client_r, &mut upstream_w);
            let to_client = self.pump(Side::Upstream, &mut upstream_r, &mut client_w);
            tokio::pin!(to_upstream, to_client);
            // A caller who reached the resource through a just-in-time grant is closed out
            // when the grant ends (1008, policy violation), as a PostgreSQL session is.
            let grant_end = async {
                match grant_ended {
                    Some(ended) => ended.await,
                    None => std::future::pending().await,
                }
            };
            let (first, from) = tokio::select! {
                e = &mut to_upstream => (e, Side::Client),
                e = &mut to_client => (e, Side::Upstream),
                _ = grant_end => (End::Close(1008, "the access grant ended".into()), Side::Client),
            };
            match first {
                End::Close(code, reason) => End::Close(code, reason),
                // One side is gone: let the other finish its close handshake, briefly.
                ended => {
                    let rest = if from == Side::Client {
                        tokio::time::timeout(CLOSE_GRACE, &mut to_client).await
                    } else {
                        tokio::time::timeout(CLOSE_GRACE, &mut to_upstream).await
                    };
                    match rest {
                        Ok(End::Close(code, reason)) => End::Close(code, reason),
                        _ => ended,
                    }
                }
            }
        };
        match end {
            End::Close(code, reason) => {
                let payload = frame::close_payload(code, &reason);
                let to_client = frame::encode(true, OpCode::Close, &payload, None);
                let to_upstream = frame::encode(true, OpCode::Close, &payload, Some(mask_key()));
                for (w, bytes) in [(&mut client_w, to_client), (&mut upstream_w, to_upstream)] {
                    let _ = w.write_all(&bytes).await;
                    let _ = w.shutdown().await;
                }
                self.record_close("gateway", Some(code), Some(reason));
                // Read what both sides still send (their close replies, the rest of a refused
                // message) so that neither connection is reset before it has read the close.
                let both = async { tokio::join!(drain(&mut client_r), drain(&mut upstream_r)) };
                let _ = tokio::time::timeout(CLOSE_GRACE, both).await;
            }
            End::Eof | End::Io => {
                let _ = client_w.shutdown().await;
                let _ = upstream_w.shutdown().await;
                let closed = {
                    let s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                    s.client_code.is_some() || s.upstream_code.is_some()
                };
                let outcome = match (closed, matches!(end, End::Io)) {
                    (true, _) => "closed",
                    (false, false) => "ended",
                    (false, true) => "error",
                };
                self.record_close(outcome, None, None);
            }
        }
    }

    /// Relays the frames `from` sends until it ends, records its messages.
    async fn pump(&self, from: Side, reader: &mut Reader, to: &mut Writer) -> End {
        let mut buf = BytesMut::with_capacity(8 << 10);
        let mut assembler = Assembler::default();
        let mut message: Option<Message> = None;
        let mut seq = 0u64;
        loop {
            let room = assembler.room(MAX_MESSAGE);
            let head = match frame::check(&buf, from == Side::Client, self.rsv_allowed, room) {
                Ok(h) => h,
                Err(FrameError::Incomplete) => match reader.read_buf(&mut buf).await {
                    Ok(0) => return End::Eof,
                    Ok(_) => continue,
                    Err(_) => return End::Io,
                },
                Err(e) => return self.refuse(from, e),
            };
            // The head's length was checked against the limit: now the frame may be buffered.
            let need = head.frame_len();
            if buf.len() < need {
                buf.reserve(need - buf.len());
            }
            while buf.len() < need {
                match reader.read_buf(&mut buf).await {
                    Ok(0) => return End::Eof,
                    Ok(_) => {}
                    Err(_) => return End::Io,
                }
            }
            let raw = buf.split_to(need).freeze();
            let mut payload = raw[head.head_len..].to_vec();
            if let Some(key) = head.mask {
                frame::apply_mask(&mut payload, key);
            }
            if head.opcode.is_control() {
                if head.opcode == OpCode::Close {
                    let code = frame::close_code(&payload).unwrap_or(1005);
                    let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                    match from {
                        Side::Client => s.client_code = Some(code),
                        Side::Upstream => s.upstream_code = Some(code),
                    }
                }
                if !write(to, &raw).await {
                    return End::Io;
                }
                continue;
            }
            let fragment = match assembler.push(&head) {
                Ok(f) => f,
                Err(e) => return self.refuse(from, e),
            };
            let m = message.get_or_insert_with(|| Message {
                opcode: fragment.message,
                frames: 0,
                bytes: 0,
                sha: ring::digest::Context::new(&ring::digest::SHA256),
                text: Vec::new(),
                compressed: head.rsv & 0b100 != 0,
            });
            m.frames += 1;
            m.bytes += payload.len() as u64;
            m.sha.update(&payload);
            let binary = m.opcode == OpCode::Binary || m.compressed;
            let rewriting = from == Side::Upstream && self.rewrite.is_some() && !binary;
            if from == Side::Upstream && binary && self.refuse_binary {
                seq += 1;
                let m = message.take().expect("a message");
                self.record_message(from, seq, m, "refused", None);
                return End::Close(
                    1008,
                    "binary messages cannot be masked, so the gateway does not relay them".into(),
                );
            }
            if !binary {
                // Masking needs the whole text; a plain capture only its first bytes.
                let keep = if rewriting || self.audit.is_some() {
                    payload.len()
                } else {
                    payload
                        .len()
                        .min(self.capture_limit.saturating_sub(m.text.len()))
                };
                m.text.extend_from_slice(&payload[..keep]);
            }
            if !rewriting && !write(to, &raw).await {
                return End::Io;
            }
            if !fragment.last {
                continue;
            }
            let m = message.take().expect("a message");
            seq += 1;
            if rewriting {
                let plan = self.rewrite.as_ref().expect("rewriting");
                let (masked, summary) = mask_text(plan, &m.text);
                let out = frame::encode(true, OpCode::Text, masked.as_bytes(), None);
                if !write(to, &out).await {
                    return End::Io;
                }
                let summary = summary
                    .filter(|s| s.masked_values > 0)
                    .map(|s| reasons_json(&s));
                self.record_message(from, seq, m, "masked", summary);
            } else {
                let outcome = if binary && from == Side::Upstream && self.pass_binary_unmasked {
                    "passed_unmasked"
                } else {
                    "relayed"
                };
                self.record_message(from, seq, m, outcome, None);
            }
        }
    }

    fn refuse(&self, from: Side, e: FrameError) -> End {
        tracing::info!(session = %self.session.log.id, side = from.as_str(), error = %e, "websocket closed by the gateway");
        End::Close(e.close_code(), format!("{} sent {e}", from.as_str()))
    }

    fn record_message(
        &self,
        from: Side,
        seq: u64,
        m: Message,
        outcome: &'static str,
        masked: Option<serde_json::Value>,
    ) {
        {
            let s = &mut *self.stats.lock().unwrap_or_else(|p| p.into_inner());
            let (count, bytes) = match from {
                Side::Client => (&mut s.client_messages, &mut s.client_bytes),
                Side::Upstream => (&mut s.upstream_messages, &mut s.upstream_bytes),
            };
            *count += 1;
            *bytes += m.bytes;
        }
        let sha = hex::encode(m.sha.finish());
        let body = if m.opcode == OpCode::Text && !m.compressed && self.capture_limit > 0 {
            let mut b = capture(&m.text, sha, self.capture_limit, self.audit.as_ref());
            // Without masks only the captured prefix was kept.
            b.truncated |= m.bytes > m.text.len() as u64;
            b.bytes = m.bytes;
            b
        } else {
            BodyRecord {
                bytes: m.bytes,
                sha256: (m.bytes > 0).then_some(sha),
                capture: None,
                truncated: false,
            }
        };
        self.session.log.record(&WsMessage {
            n: self.n,
            direction: from.as_str(),
            seq,
            opcode: if m.opcode == OpCode::Text {
                "text"
            } else {
                "binary"
            },
            frames: m.frames,
            body,
            compressed: m.compressed,
            outcome,
            masked,
        });
    }

    fn record_close(
        &self,
        outcome: &'static str,
        gateway_code: Option<u16>,
        reason: Option<String>,
    ) {
        let s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        self.session.log.record(&WsClose {
            n: self.n,
            outcome,
            client_code: s.client_code,
            upstream_code: s.upstream_code,
            gateway_code,
            reason,
            client_messages: s.client_messages,
            client_bytes: s.client_bytes,
            upstream_messages: s.upstream_messages,
            upstream_bytes: s.upstream_bytes,
            duration_ms: self.started.elapsed().as_millis() as u64,
        });
    }
}

/// Reads and discards until the sender closes.
async fn drain(r: &mut Reader) {
    let mut sink = vec![0u8; 16 << 10];
    while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn write(to: &mut Writer, bytes: &[u8]) -> bool {
    to.write_all(bytes).await.is_ok() && to.flush().await.is_ok()
}

/// A text message as the caller may see it: JSON masked by paths and detectors, anything else
/// by detectors. The result is text (a replaced value is ASCII; a broken sequence is replaced).
fn mask_text(plan: &BodyPlan, text: &[u8]) -> (String, Option<tollgate_mask::BodySummary>) {
    let mut out = Vec::with_capacity(text.len());
    let mut m = BodyMasker::new(plan, BodyKind::Sniff);
    let mut summary = m
        .feed(text, &mut out)
        .and_then(|()| m.finish(&mut out))
        .ok();
    if summary.is_none() {
        // Not the JSON it looked like: mask what the detectors find.
        out.clear();
        let mut t = BodyMasker::new(plan, BodyKind::Text);
        let _ = t.feed(text, &mut out);
        summary = t.finish(&mut out).ok();
    }
    let text = match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    (text, summary)
}

/// A fresh masking key for a frame the gateway sends upstream as the client.
fn mask_key() -> [u8; 4] {
    use ring::rand::SecureRandom;
    let mut k = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spec: &str) -> BodyPlan {
        let spec: tollgate_mask::MaskSpec = serde_json::from_str(spec).unwrap();
        tollgate_mask::Policy::from_specs(&[spec], None)
            .unwrap()
            .body_plan(&[])
    }

    #[test]
    fn text_messages_are_masked_as_json_or_as_text() {
        let p = plan(r#"{"detectors": ["email"], "json_paths": ["$.card"]}"#);
        let (out, s) = mask_text(&p, br#"{"card": "4111", "to": "ada@example.com"}"#);
        assert_eq!(out, r#"{"card": "****", "to": "****"}"#);
        assert_eq!(s.unwrap().masked_values, 2);
        // Looks like JSON but is not: the detectors still apply.
        let (out, _) = mask_text(&p, b"{ada@example.com");
        assert_eq!(out, "{****");
        let (out, s) = mask_text(&p, "héllo".as_bytes());
        assert_eq!((out.as_str(), s.unwrap().masked_values), ("héllo", 0));
    }

    #[test]
    fn accept_key_of_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
