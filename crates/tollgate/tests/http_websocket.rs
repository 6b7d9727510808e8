//! WebSocket upgrades on HTTP resources, end to end: a real WebSocket client (tungstenite over
//! rustls) through the real gateway to a real WebSocket echo behind HTTPS. The upgrade is
//! authenticated and judged like any request, messages are relayed both ways and recorded,
//! upstream text is masked for the caller, and permessage-deflate is not negotiated when
//! masks apply.

mod common;

use common::http_env::{HttpEnv, HttpEnvOptions, UPSTREAM_SECRET};
use common::{runtime, TOKEN};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

const TEMP_TOKEN: &str = "temp-bot-token-5d1e0c9b7a";
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// The temp-bot token's identity, outside billing's allow_groups.
const TEMP_BOT: &str = r#"
[[identity.tokens]]
subject = "temp-bot"
sha256 = "{temp_sha}"
groups = ["temp"]
"#;

/// The gateway in front of the test upstream, with `tables` (rules and masks) on "billing";
/// ci-bot (the service token) is an admin, temp-bot reaches billing only through a grant.
fn ws_env(tables: &str) -> HttpEnv {
    let identity_extra = TEMP_BOT.replace("{temp_sha}", &common::sha256_hex(TEMP_TOKEN));
    HttpEnv::start_opts(HttpEnvOptions {
        tables,
        admin_groups: r#"["sre", "ci"]"#,
        identity_extra: &identity_extra,
        ..Default::default()
    })
}

impl HttpEnv {
    /// Opens a WebSocket to `/r/billing{path}` over TLS (HTTP/1.1), with the service token
    /// unless `token` is `None`, and the extra request headers.
    async fn connect(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<
        (
            Ws,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        WsError,
    > {
        let tcp = TcpStream::connect(("127.0.0.1", self.https_port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(common::client_tls_arc(&self.pki.ca, None))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut req = format!("wss://localhost:{}/r/billing{path}", self.https_port)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        if let Some(t) = token {
            h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        for (k, v) in headers {
            h.insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        tokio_tungstenite::client_async(req, tls).await
    }

    /// What the upstream saw of upgrade requests to `path`.
    fn upgrades_seen(&self, path: &str) -> Vec<serde_json::Value> {
        self.up
            .seen
            .all()
            .into_iter()
            .filter(|r| r["path"] == path)
            .collect()
    }

    /// Texts the upstream received as WebSocket messages.
    fn texts_seen(&self) -> Vec<String> {
        self.up
            .seen
            .all()
            .iter()
            .filter_map(|r| r["text"].as_str().map(str::to_string))
            .collect()
    }
}

/// The next data or close message, skipping pings and pongs; `None` when the stream ended.
async fn next(ws: &mut Ws) -> Option<Message> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")?;
        match m {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => return Some(m),
            Err(_) => return None,
        }
    }
}

fn http_status(e: WsError) -> u16 {
    match e {
        WsError::Http(r) => r.status().as_u16(),
        e => panic!("expected an HTTP answer to the upgrade, got {e}"),
    }
}

fn of_kind<'a>(evs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    evs.iter().filter(|e| e["kind"] == kind).collect()
}

#[test]
fn websocket_text_is_relayed_masked_for_the_caller_and_recorded() {
    let env = ws_env(
        r#"[[resources.rules]]
name = "no ws admin"
paths = ["/ws-admin"]
action = "deny"
message = "the admin socket is not for agents"
[[resources.masks]]
detectors = ["email"]
"#,
    );
    let rt = runtime();
    rt.block_on(async {
        let (mut ws, resp) = env
            .connect(
                "/ws",
                Some(TOKEN),
                &[
                    ("sec-websocket-extensions", DEFLATE_OFFER),
                    ("sec-websocket-protocol", "chat"),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("upgrade failed: {e}\n{}", env.gw.logs()));
        assert_eq!(resp.status(), 101);
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some("chat")
        );
        assert!(
            resp.headers().get("sec-websocket-extensions").is_none(),
            "{resp:?}"
        );

        // Text both ways.
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(next(&mut ws).await, Some(Message::text("hello")));

        // The upstream receives what the client sent; its echo reaches the client masked.
        let secret = "write to ada@example.com today";
        ws.send(Message::text(secret)).await.unwrap();
        let Some(Message::Text(back)) = next(&mut ws).await else {
            panic!("no text back")
        };
        assert!(!back.contains("ada@example.com"), "{back}");
        assert_eq!(back.as_str(), "write to **** today");
        assert!(env.texts_seen().iter().any(|t| t == secret));

        // A fragmented text message is reassembled before it is masked.
        let long = format!("{} and {}", "x".repeat(100_000), "bob@example.org");
        ws.send(Message::text(long.clone())).await.unwrap();
        let Some(Message::Text(back)) = next(&mut ws).await else {
            panic!("no long text back")
        };
        assert_eq!(back.len(), long.len() - "bob@example.org".len() + 4);
        assert!(back.ends_with(" and ****"));

        // Binary from the upstream cannot be masked: the gateway closes with 1008.
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        match next(&mut ws).await {
            Some(Message::Close(Some(f))) => {
                assert_eq!(f.code, CloseCode::Policy, "{f:?}")
            }
            other => panic!("expected a close 1008, got {other:?}"),
        }

        // The permessage-deflate offer never reached the upstream; the upgrade did, with the
        // resource's credential instead of the client's.
        let seen = env.upgrades_seen("/ws");
        assert_eq!(seen.len(), 1, "{seen:#?}");
        let h = &seen[0]["headers"];
        assert!(h.get("sec-websocket-extensions").is_none(), "{h}");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-protocol"], "chat");
        assert_eq!(h["sec-websocket-version"], "13");
        assert!(h["sec-websocket-key"].is_string());
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["authorization"],
            format!("sha256:{}", common::sha256_hex(UPSTREAM_SECRET))
        );

        // A denied path is refused before anything goes upstream.
        let e = env
            .connect("/ws-admin", Some(TOKEN), &[])
            .await
            .unwrap_err();
        assert_eq!(http_status(e), 403);
        assert!(env.upgrades_seen("/ws-admin").is_empty());

        // Without credentials, no upgrade.
        let e = env.connect("/ws", None, &[]).await.unwrap_err();
        assert_eq!(http_status(e), 401);
        assert_eq!(env.upgrades_seen("/ws").len(), 1);
    });

    let evs = env.events_until("ws.close", |evs| !of_kind(evs, "ws.close").is_empty());
    let upgrade = of_kind(&evs, "http.request")
        .into_iter()
        .find(|e| e["payload"]["path"] == "/ws")
        .expect("the upgrade request is recorded");
    assert_eq!(upgrade["payload"]["method"], "GET");
    assert_eq!(upgrade["payload"]["decision"]["action"], "allow");
    let n = upgrade["payload"]["n"].clone();
    assert!(of_kind(&evs, "http.response")
        .iter()
        .any(|e| e["payload"]["n"] == n && e["payload"]["status"] == 101));
    let denied = of_kind(&evs, "http.request")
        .into_iter()
        .find(|e| e["payload"]["path"] == "/ws-admin")
        .expect("the denied upgrade is recorded");
    assert_eq!(denied["payload"]["decision"]["action"], "deny");

    let messages = of_kind(&evs, "ws.message");
    let find = |dir: &str, seq: u64| {
        messages
            .iter()
            .find(|e| e["payload"]["direction"] == dir && e["payload"]["seq"] == seq)
            .unwrap_or_else(|| panic!("no ws.message {dir} {seq}: {messages:#?}"))
    };
    let hello = &find("client", 1)["payload"];
    assert_eq!(hello["n"], n);
    assert_eq!(hello["opcode"], "text");
    assert_eq!(hello["body"]["capture"], "hello");
    assert_eq!(hello["body"]["bytes"], 5);
    let sent = &find("client", 2)["payload"];
    assert_eq!(sent["body"]["capture"], "write to **** today");
    let echoed = &find("upstream", 2)["payload"];
    assert_eq!(echoed["outcome"], "masked");
    assert_eq!(echoed["body"]["capture"], "write to **** today");
    assert_eq!(echoed["masked"]["values"], 1);
    assert!(find("client", 3)["payload"]["frames"].as_u64().unwrap() >= 1);
    let binary = &find("upstream", 4)["payload"];
    assert_eq!(binary["opcode"], "binary");
    assert_eq!(binary["outcome"], "refused");
    assert_eq!(binary["body"]["bytes"], 3);
    assert!(binary["body"].get("capture").is_none());
    let close = &of_kind(&evs, "ws.close")[0]["payload"];
    assert_eq!(close["gateway_code"], 1008);
    assert_eq!(close["client_messages"], 4);
    assert_eq!(close["upstream_messages"], 4);
    let all = serde_json::to_string(&evs).unwrap();
    assert!(
        !all.contains("ada@example.com"),
        "a raw e-mail was recorded"
    );
    assert!(
        !all.contains("bob@example.org"),
        "a raw e-mail was recorded"
    );
    assert!(!all.contains(TOKEN) && !all.contains("upstream-secret"));
}

#[test]
fn websocket_without_masks_passes_extensions_binary_and_closes_cleanly() {
    let env = ws_env("");
    let rt = runtime();
    rt.block_on(async {
        let (mut ws, _) = env
            .connect(
                "/v1/ws?room=7",
                Some(TOKEN),
                &[("sec-websocket-extensions", DEFLATE_OFFER)],
            )
            .await
            .unwrap_or_else(|e| panic!("upgrade failed: {e}\n{}", env.gw.logs()));
        ws.send(Message::text("mail ada@example.com"))
            .await
            .unwrap();
        assert_eq!(
            next(&mut ws).await,
            Some(Message::text("mail ada@example.com"))
        );
        ws.send(Message::binary(vec![9u8; 70_000])).await.unwrap();
        assert_eq!(
            next(&mut ws).await,
            Some(Message::binary(vec![9u8; 70_000]))
        );
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        while next(&mut ws).await.is_some() {}

        // With no masks the offer is the upstream's to answer (this one declines it).
        let seen = env.upgrades_seen("/v1/ws");
        assert_eq!(
            seen[0]["headers"]["sec-websocket-extensions"],
            DEFLATE_OFFER
        );
        assert_eq!(seen[0]["query"], "room=7");

        // An upstream that does not switch protocols: its answer is relayed as a response.
        let e = env
            .connect("/v1/plain", Some(TOKEN), &[])
            .await
            .unwrap_err();
        match e {
            WsError::Http(r) => {
                assert_eq!(r.status(), 200);
                let body: serde_json::Value =
                    serde_json::from_slice(r.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["path"], "/v1/plain");
            }
            e => panic!("expected the upstream's 200, got {e}"),
        }

        // A message over the limit is refused from its frame head: close 1009.
        let (mut ws, _) = env.connect("/v1/ws", Some(TOKEN), &[]).await.unwrap();
        let big = vec![0u8; (16 << 20) + 1];
        let _ = ws.send(Message::binary(big)).await;
        match next(&mut ws).await {
            Some(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Size, "{f:?}"),
            other => panic!("expected a close 1009, got {other:?}"),
        }
    });

    let evs = env.events_until("two ws.close", |evs| of_kind(evs, "ws.close").len() >= 2);
    let closes = of_kind(&evs, "ws.close");
    let clean = closes
        .iter()
        .find(|e| e["payload"]["outcome"] == "closed")
        .unwrap_or_else(|| panic!("{closes:#?}"));
    assert_eq!(clean["payload"]["client_code"], 1000);
    assert_eq!(clean["payload"]["upstream_messages"], 2);
    assert_eq!(clean["payload"]["upstream_bytes"], 20 + 70_000);
    assert!(closes.iter().any(|e| e["payload"]["gateway_code"] == 1009));
    let messages = of_kind(&evs, "ws.message");
    // Without masks the capture is the text as sent; binary is sized and digested only.
    assert!(messages
        .iter()
        .any(|e| e["payload"]["body"]["capture"] == "mail ada@example.com"));
    let bin = messages
        .iter()
        .find(|e| e["payload"]["opcode"] == "binary" && e["payload"]["direction"] == "upstream")
        .unwrap();
    assert_eq!(bin["payload"]["body"]["bytes"], 70_000);
    assert_eq!(
        bin["payload"]["body"]["sha256"],
        common::sha256_hex(&"\u{9}".repeat(70_000))
    );
}

/// A JSON POST to the gateway's API with a bearer token: (status, body).
fn api_post(
    port: u16,
    ca: &std::path::Path,
    token: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .args([
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ])
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn a_websocket_opened_under_a_grant_is_closed_when_the_grant_is_revoked() {
    let env = ws_env("");
    let rt = runtime();
    // temp-bot may not reach billing until ci-bot (an admin) approves its access request.
    let refused = rt.block_on(env.connect("/ws", Some(TEMP_TOKEN), &[]));
    assert_eq!(http_status(refused.err().expect("refused")), 403);
    let (code, review) = api_post(
        env.https_port,
        &env.pki.ca,
        TEMP_TOKEN,
        "/api/v1/access",
        r#"{"resource": "billing", "for": "1h", "reason": "debugging"}"#,
    );
    assert_eq!(code, 201, "{review}");
    let id = review["id"].as_str().unwrap().to_string();
    let (code, v) = api_post(
        env.https_port,
        &env.pki.ca,
        TOKEN,
        &format!("/api/v1/reviews/{id}/approve"),
        r#"{"reason": "ok"}"#,
    );
    assert_eq!(code, 200, "{v}");
    rt.block_on(async {
        let (mut ws, _) = env
            .connect("/ws", Some(TEMP_TOKEN), &[])
            .await
            .expect("granted");
        ws.send(Message::text("hello")).await.unwrap();
        match next(&mut ws).await {
            Some(Message::Text(t)) => assert_eq!(t.as_str(), "hello"),
            other => panic!("{other:?}"),
        }
        let (code, v) = api_post(
            env.https_port,
            &env.pki.ca,
            TOKEN,
            &format!("/api/v1/grants/{id}/revoke"),
            r#"{"reason": "done"}"#,
        );
        assert_eq!(code, 200, "{v}");
        match next(&mut ws).await {
            Some(Message::Close(Some(f))) => {
                assert_eq!(f.code, CloseCode::Policy, "{f:?}");
                assert!(f.reason.contains("grant"), "{f:?}");
            }
            other => panic!("expected a close for the ended grant, got {other:?}"),
        }
    });
}
