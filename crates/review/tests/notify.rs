//! Review webhooks against real local receivers (a tiny hyper server, over TLS with a private CA
//! where it matters): the JSON and Slack bodies, per-resource routing, retry after a 500, and a
//! receiver that never accepts (counted, and the review is kept).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tollgate_review::*;
use tollgate_store::{Recorder, RecorderOptions, SqliteStore, Store};

/// One received POST.
#[derive(Debug)]
struct Hit {
    path: String,
    content_type: String,
    body: Value,
}

/// Serves HTTP/1.1 (over TLS when `tls` is set) on a loopback port; answers the i-th request
/// with `statuses[i]` (200 once they run out) and reports every request on the channel.
async fn receiver(
    tls: Option<Arc<rustls::ServerConfig>>,
    statuses: Vec<u16>,
) -> (u16, mpsc::UnboundedReceiver<Hit>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let statuses = Arc::new(Mutex::new(statuses.into_iter()));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (tx, statuses, tls) = (tx.clone(), statuses.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (tx, statuses) = (tx.clone(), statuses.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx.send(Hit {
                            path,
                            content_type,
                            body: serde_json::from_slice(&body).unwrap(),
                        });
                        let status = statuses.lock().unwrap().next().unwrap_or(200);
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(cfg) => {
                        let s = tokio_rustls::TlsAcceptor::from(cfg)
                            .accept(tcp)
                            .await
                            .unwrap();
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    }
                }
            });
        }
    });
    (port, rx)
}

struct Fx {
    _dir: tempfile::TempDir,
    reviews: Reviews,
}

fn reviews(notify: NotifierConfig, console: Option<&str>) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
    let recorder = Recorder::start(
        store.clone(),
        "gw-test".into(),
        RecorderOptions {
            journal: dir.path().join("t.events.log"),
            stall_limit: Duration::from_secs(5),
            durability: Default::default(),
        },
    )
    .unwrap();
    let reviews = Reviews::new(
        store,
        recorder,
        Notifier::new(&notify).unwrap(),
        console.map(str::to_string),
    );
    Fx { _dir: dir, reviews }
}

fn command() -> NewReview {
    NewReview {
        kind: ReviewKind::Command,
        session_id: Some("s-1".into()),
        resource: "orders".into(),
        requester: Reviewer {
            subject: "agent-7".into(),
            groups: vec!["agents".into()],
        },
        rule: Some("agent-writes".into()),
        statement: Some("delete from orders where note = '<b>&```'".into()),
        statement_sha256: Some("ab".repeat(32)),
        approvers: vec!["sre".into(), "dba".into()],
        min_approvals: 2,
        timeout: Duration::from_secs(600),
        reason: None,
        access_for: None,
    }
}

fn metric(result: &str) -> i64 {
    tollgate_metrics::registry()
        .counter(
            "tollgate_review_notifications_total",
            "",
            &[("result", result)],
        )
        .get()
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Hit>) -> Hit {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a webhook POST")
        .unwrap()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_over_https_with_a_private_ca_is_retried_after_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let ca = tollgate_tls::pki::init_ca(dir.path(), "hooks CA").unwrap();
    let srv = tollgate_tls::pki::issue_server(
        dir.path(),
        &tollgate_tls::pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec![],
            ttl: Duration::from_secs(3600),
            not_before: None,
        },
        &dir.path().join("hooks"),
    )
    .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(tollgate_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            tollgate_tls::load_certs(&srv.cert).unwrap(),
            rustls_pki_types::PrivateKeyDer::from_pem_file(&srv.key).unwrap(),
        )
        .unwrap();
    let (port, mut rx) = receiver(Some(Arc::new(tls)), vec![500]).await;
    let delivered = metric("delivered");
    let f = reviews(
        NotifierConfig {
            global: Some(format!("https://localhost:{port}/hook")),
            ca: Some(ca.cert.clone()),
            format: WebhookFormat::Json,
            attempts: 3,
            first_delay: Duration::from_millis(100),
            ..Default::default()
        },
        Some("https://gw.example:8443"),
    );
    let review = f.reviews.request(command()).unwrap();

    let first = next(&mut rx).await;
    let second = next(&mut rx).await;
    assert_eq!(first.body, second.body, "the retry sends the same document");
    assert_eq!(
        (second.path.as_str(), second.content_type.as_str()),
        ("/hook", "application/json")
    );
    let doc = second.body;
    assert_eq!(doc["event"], "review.requested");
    assert_eq!(
        doc["text"],
        "agent-7 wants to run a statement on orders (rule agent-writes)"
    );
    let r: Review = serde_json::from_value(doc["review"].clone()).unwrap();
    assert_eq!(r, review);
    assert_eq!(
        r.statement.as_deref(),
        Some("delete from orders where note = '<b>&```'")
    );
    assert_eq!((r.min_approvals, r.approvers.len()), (2, 2));
    let url = format!("https://gw.example:8443/reviews/{}", review.id);
    assert_eq!(doc["url"], url.as_str());
    assert_eq!(doc["approve_url"], format!("{url}?action=approve"));
    assert_eq!(doc["deny_url"], format!("{url}?action=deny"));
    eventually("the delivered counter", || metric("delivered") > delivered).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "no POST after a 2xx"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_body_goes_to_the_resource_webhook_with_approve_and_deny_buttons() {
    let (port, mut rx) = receiver(None, vec![]).await;
    let f = reviews(
        NotifierConfig {
            // The resource's own webhook wins over the global one (which nothing listens on).
            global: Some("http://127.0.0.1:1/never".into()),
            per_resource: [(
                "orders".to_string(),
                format!("http://127.0.0.1:{port}/slack"),
            )]
            .into(),
            format: WebhookFormat::Slack,
            attempts: 1,
            ..Default::default()
        },
        Some("https://gw.example:8443/"),
    );
    let review = f.reviews.request(command()).unwrap();
    let hit = next(&mut rx).await;
    assert_eq!(hit.path, "/slack");
    let doc = hit.body;
    let text = doc["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!(
            "Review {}: agent-7 wants to run a statement on orders",
            review.id
        )),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "<https://gw.example:8443/reviews/{}|open>",
            review.id
        )),
        "{text}"
    );
    let blocks = doc["blocks"].as_array().unwrap();
    let section = blocks[0]["text"]["text"].as_str().unwrap();
    assert_eq!(blocks[0]["type"], "section");
    assert!(
        section.ends_with("\n```delete from orders where note = '&lt;b&gt;&amp;''''```"),
        "statement escaped inside its code block: {section}"
    );
    let context = blocks[1]["elements"][0]["text"].as_str().unwrap();
    assert!(
        context.starts_with("needs 2 approval(s) from sre, dba"),
        "{context}"
    );
    let actions = blocks
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("an actions block");
    let buttons: Vec<(&str, &str, &str)> = actions["elements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["text"]["text"].as_str().unwrap(),
                b["style"].as_str().unwrap(),
                b["url"].as_str().unwrap(),
            )
        })
        .collect();
    let url = format!("https://gw.example:8443/reviews/{}", review.id);
    assert_eq!(
        buttons,
        [
            (
                "Approve",
                "primary",
                format!("{url}?action=approve").as_str()
            ),
            ("Deny", "danger", format!("{url}?action=deny").as_str()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_keeps_failing_is_counted_and_the_review_is_kept() {
    let (port, mut rx) = receiver(None, vec![500, 502, 503, 500]).await;
    let failed = metric("failed");
    let f = reviews(
        NotifierConfig {
            global: Some(format!("http://127.0.0.1:{port}/down")),
            attempts: 3,
            first_delay: Duration::from_millis(100),
            ..Default::default()
        },
        None,
    );
    let started = Instant::now();
    let review = f.reviews.request(command()).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "request does not wait for delivery"
    );
    for _ in 0..3 {
        let hit = next(&mut rx).await;
        assert_eq!(hit.body["review"]["id"], review.id.as_str());
        assert_eq!(
            hit.body["approve_url"],
            Value::Null,
            "no console_url, no links"
        );
    }
    eventually("the failed counter", || metric("failed") == failed + 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "backed off 100 ms then 200 ms"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(400), rx.recv())
            .await
            .is_err(),
        "gave up after 3 attempts"
    );
    let kept = f.reviews.get(&review.id).unwrap().unwrap();
    assert_eq!(kept.status, "pending");
}
