//! Prometheus metrics for the gateway: a small registry of labelled counters and gauges
//! rendered in the text exposition format.
//!
//! Every name starts with `tollgate_`. Label values must be bounded (listener names, resource
//! names, reason codes): never SQL text, tokens, subjects or addresses. The registry does not
//! enforce boundedness; callers pass only values from closed sets or from config.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

struct Family {
    help: &'static str,
    kind: Kind,
    series: BTreeMap<Labels, Arc<Cell>>,
}

/// One time series' value; counters only go up, gauges move both ways.
#[derive(Default)]
pub struct Cell {
    int: AtomicI64,
}

impl Cell {
    pub fn inc(&self) {
        self.int.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: i64) {
        self.int.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.int.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.int.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.int.load(Ordering::Relaxed)
    }
}

/// A set of metric families. Most code uses the process-wide [`registry()`].
#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Registry {
    fn cell(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &[(&'static str, &str)],
    ) -> Arc<Cell> {
        debug_assert!(name.starts_with("tollgate_"));
        let key: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
        let mut fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let fam = fams.entry(name).or_insert_with(|| Family {
            help,
            kind,
            series: BTreeMap::new(),
        });
        fam.series.entry(key).or_default().clone()
    }

    /// A counter series; keep the returned handle on hot paths instead of looking it up per event.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Cell> {
        self.cell(name, help, Kind::Counter, labels)
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<Cell> {
        self.cell(name, help, Kind::Gauge, labels)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(4096);
        for (name, fam) in fams.iter() {
            let kind = match fam.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, cell) in &fam.series {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", cell.get());
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The process-wide registry served on `/metrics`.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

/// Decrements a gauge when dropped: active-connection accounting that survives early returns.
pub struct GaugeGuard(Arc<Cell>);

impl GaugeGuard {
    pub fn new(cell: Arc<Cell>) -> Self {
        cell.add(1);
        GaugeGuard(cell)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_format() {
        let r = Registry::default();
        r.counter(
            "tollgate_handshakes_total",
            "TLS handshakes.",
            &[
                ("listener", "postgres"),
                ("outcome", "failed"),
                ("reason", "unknown_ca"),
            ],
        )
        .inc();
        let g = r.gauge(
            "tollgate_connections_active",
            "Open connections.",
            &[("listener", "postgres")],
        );
        {
            let _a = GaugeGuard::new(g.clone());
            let _b = GaugeGuard::new(g.clone());
            assert_eq!(g.get(), 2);
        }
        r.gauge(
            "tollgate_cert_expiry_timestamp_seconds",
            "Expiry.",
            &[("cert", "a\"b")],
        )
        .set(1700000000);
        let text = r.render();
        assert!(
            text.contains("# TYPE tollgate_handshakes_total counter\n"),
            "{text}"
        );
        assert!(text.contains("tollgate_handshakes_total{listener=\"postgres\",outcome=\"failed\",reason=\"unknown_ca\"} 1\n"), "{text}");
        assert!(
            text.contains("tollgate_connections_active{listener=\"postgres\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("cert=\"a\\\"b\"} 1700000000\n"), "{text}");
    }
}
