//! The periodic live scan (`server.scan_interval`): the same checks as `tollgate scan`, with
//! the gateway's own connection registry, turned into metrics, audit events and webhook alerts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};
use tollgate_config::Config;
use tollgate_metrics::registry;
use tollgate_pg::UpstreamRegistry;
use tollgate_scan::alert::Webhook;
use tollgate_scan::{Finding, GatewaySource, ScanOptions};
use tollgate_store::{EventInput, Recorder};

const MIN_DAYS: u64 = 14;

pub(crate) async fn run(
    config: Config,
    every: Duration,
    upstreams: UpstreamRegistry,
    recorder: Recorder,
    webhook: Option<Webhook>,
    latest: Option<std::sync::Arc<arc_swap::ArcSwapOption<tollgate_api::ScanSnapshot>>>,
    leader: crate::replica_task::Leadership,
    cluster: Option<(std::sync::Arc<dyn tollgate_store::Store>, String)>,
) {
    let mut opts = ScanOptions {
        min_days: MIN_DAYS,
        gateway: GatewaySource::Local(upstreams.clone()),
        max_message: config.server.max_message_bytes,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (resource, kind) pairs published last time, so vanished ones go back to 0.
    let mut published: BTreeSet<(String, &'static str)> = BTreeSet::new();
    // Findings alerted last time, so a webhook fires on what is new, not on every scan.
    let mut alerted: BTreeSet<String> = BTreeSet::new();
    loop {
        tick.tick().await;
        if !leader.leads() {
            continue;
        }
        if let Some((store, me)) = &cluster {
            opts.gateway = match crate::replica_task::peer_admins(store.clone(), me).await {
                Ok(peers) => GatewaySource::Cluster {
                    local: upstreams.clone(),
                    peers,
                },
                Err(why) => GatewaySource::Unavailable(why),
            };
        }
        let at = SystemTime::now();
        let reports = tollgate_scan::scan(&config, &opts).await;
        let findings: Vec<&Finding> = reports.iter().flat_map(|r| &r.findings).collect();

        let mut counts: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for f in &findings {
            *counts
                .entry((f.resource.clone().unwrap_or_default(), f.kind))
                .or_default() += 1;
        }
        for key in published.iter().filter(|k| !counts.contains_key(*k)) {
            findings_gauge(&key.0, key.1).set(0);
        }
        for ((resource, kind), n) in &counts {
            findings_gauge(resource, kind).set(*n);
        }
        published = counts.keys().cloned().collect();
        for r in &reports {
            if let Some(t) = r.cert_not_after_unix() {
                registry()
                    .gauge(
                        "tollgate_upstream_cert_expiry_timestamp_seconds",
                        "Expiry (unix seconds) of the certificate each upstream presented last.",
                        &[("resource", &r.resource)],
                    )
                    .set(t);
            }
        }
        if let Some(latest) = &latest {
            latest.store(Some(std::sync::Arc::new(tollgate_api::ScanSnapshot {
                at_unix_ms: at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
                findings: findings
                    .iter()
                    .filter_map(|f| serde_json::to_value(f).ok())
                    .collect(),
                cert_expiry: reports
                    .iter()
                    .filter_map(|r| Some((r.resource.clone(), r.cert_not_after_unix()?)))
                    .collect(),
            })));
        }
        registry()
            .counter(
                "tollgate_scans_total",
                "Periodic upstream scans completed.",
                &[],
            )
            .inc();

        let session_id = format!(
            "scan-{}",
            at.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        for f in &findings {
            recorder.record(EventInput {
                session_id: session_id.clone(),
                kind: "scan.finding".into(),
                at,
                payload: serde_json::to_value(f).unwrap_or_default(),
            });
        }
        if !findings.is_empty() {
            tracing::warn!(findings = findings.len(), "upstream scan found weaknesses");
            for f in &findings {
                tracing::warn!("{f}");
            }
        }

        let now: BTreeSet<String> = findings
            .iter()
            .map(|f| {
                format!(
                    "{}|{}|{}",
                    f.kind,
                    f.resource.as_deref().unwrap_or(""),
                    f.message
                )
            })
            .collect();
        let new: Vec<&&Finding> = findings
            .iter()
            .filter(|f| {
                !alerted.contains(&format!(
                    "{}|{}|{}",
                    f.kind,
                    f.resource.as_deref().unwrap_or(""),
                    f.message
                ))
            })
            .collect();
        if let (Some(hook), false) = (&webhook, new.is_empty()) {
            hook.send(serde_json::json!({
                "source": "tollgate",
                "kind": "scan.findings",
                "scan": session_id,
                "at": at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "new_findings": new,
                "total_findings": findings.len(),
            }));
        }
        alerted = now;
    }
}

fn findings_gauge(resource: &str, kind: &str) -> std::sync::Arc<tollgate_metrics::Cell> {
    registry().gauge(
        "tollgate_scan_findings",
        "Findings of the latest periodic upstream scan, by resource and kind.",
        &[("resource", resource), ("kind", kind)],
    )
}
