//! Findings to a webhook: a JSON POST over HTTPS (plain HTTP only to a loopback receiver),
//! from a background task with a bounded queue, retries and backoff, so alerting can never
//! block or slow the gateway.

use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tollgate_webhook::Target;
pub use tollgate_webhook::WebhookUrl;

const QUEUE: usize = 32;
const ATTEMPTS: u32 = 4;

/// Sends JSON documents to the webhook in the background.
#[derive(Clone)]
pub struct Webhook {
    tx: mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Start the sender task (needs a tokio runtime).
    pub fn start(url: &str, ca: Option<&Path>) -> Result<Webhook, String> {
        let target = Target::new(url, ca, "alert webhook CA")?;
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(QUEUE);
        tokio::spawn(async move {
            while let Some(doc) = rx.recv().await {
                let body = doc.to_string();
                let _ = target
                    .deliver(
                        "application/json",
                        body.as_bytes(),
                        ATTEMPTS,
                        Duration::from_millis(500),
                        "alert webhook",
                    )
                    .await;
            }
        });
        Ok(Webhook { tx })
    }

    /// Queue a document; when the queue is full (receiver down for long) it is dropped and logged.
    pub fn send(&self, doc: serde_json::Value) {
        if self.tx.try_send(doc).is_err() {
            tracing::warn!("alert webhook queue is full; dropping an alert");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A receiver that answers 503 once, then 204: the sender retries and the second POST lands.
    #[tokio::test]
    async fn posts_json_and_retries() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let receiver = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for status in ["503 Service Unavailable", "204 No Content"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len {
                            assert!(head.starts_with("POST /hook HTTP/1.1\r\n"), "{head}");
                            bodies.push(body.to_string());
                            break;
                        }
                    }
                    assert!(n > 0, "request cut short");
                }
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            bodies
        });
        let hook = Webhook::start(&format!("http://127.0.0.1:{port}/hook"), None).unwrap();
        hook.send(serde_json::json!({"kind": "scan.findings", "n": 1}));
        let bodies = tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bodies.len(), 2);
        let doc: serde_json::Value = serde_json::from_str(&bodies[1]).unwrap();
        assert_eq!(doc["kind"], "scan.findings");
    }
}
