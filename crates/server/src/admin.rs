//! The admin listener: liveness, readiness and Prometheus metrics over plain HTTP/1.1.
//! It carries no secrets and no session data; bind it to a loopback or monitoring-only address.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tollgate_metrics::registry;
use tollgate_store::{Recorder, Store};
use tollgate_tls::ReloadableServerTls;

pub(crate) struct AdminState {
    pub store: Arc<dyn Store>,
    pub recorder: Recorder,
    pub ready: Arc<AtomicBool>,
    pub tls: Arc<ReloadableServerTls>,
    /// The gateway's live upstream connections, for `tollgate scan` (addresses only, no secrets).
    pub upstreams: tollgate_pg::UpstreamRegistry,
}

pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn route(state: &AdminState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let mut problems = Vec::new();
            if !state.ready.load(Ordering::SeqCst) {
                problems.push("listeners are not serving");
            }
            let store = state.store.clone();
            let ping = tokio::task::spawn_blocking(move || store.ping()).await;
            if !matches!(ping, Ok(Ok(()))) {
                problems.push("audit store is unreachable");
            }
            if !state.recorder.healthy() {
                problems.push("audit store writes are failing");
            }
            if problems.is_empty() {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", problems.join("; ")),
                    "text/plain",
                )
            }
        }
        "/upstreams" => {
            let list: Vec<serde_json::Value> = state
                .upstreams
                .snapshot()
                .into_iter()
                .map(|c| {
                    serde_json::json!({
                        "resource": c.resource,
                        "upstream": c.upstream,
                        "local_addr": c.local_addr.to_string(),
                        "backend_pid": c.backend_pid,
                    })
                })
                .collect();
            text(
                StatusCode::OK,
                serde_json::Value::Array(list).to_string(),
                "application/json",
            )
        }
        "/metrics" => {
            let stats = state.recorder.stats();
            let r = registry();
            r.counter(
                "tollgate_audit_events_written_total",
                "Audit events written to the store since start.",
                &[],
            )
            .set(stats.written as i64);
            r.counter(
                "tollgate_audit_write_failures_total",
                "Audit batches that failed to write since start.",
                &[],
            )
            .set(stats.failed as i64);
            r.gauge(
                "tollgate_audit_queue_depth",
                "Audit events waiting to be written.",
                &[],
            )
            .set(stats.queued as i64);
            r.counter(
                "tollgate_audit_fsyncs_total",
                "fsyncs of the audit journal since start (concurrent appends share one).",
                &[],
            )
            .set(stats.fsyncs as i64);
            r.counter(
                "tollgate_audit_fsync_microseconds_total",
                "Time spent in audit journal fsyncs since start; divided by tollgate_audit_fsyncs_total, the mean fsync latency.",
                &[],
            )
            .set(stats.fsync_micros as i64);
            let now = std::time::SystemTime::now();
            let left = state
                .tls
                .cert_not_after()
                .duration_since(now)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            r.gauge(
                "tollgate_cert_seconds_remaining",
                "Seconds until the gateway certificate expires.",
                &[("cert", "gateway")],
            )
            .set(left);
            text(StatusCode::OK, r.render(), "text/plain; version=0.0.4")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /upstreams\n".into(),
            "text/plain",
        ),
    }
}
