//! HTTP data-path benchmark: requests **directly** to an HTTPS upstream versus **through
//! `tollgate serve`** (an `http` resource: TLS on both legs, a bearer token, an injected upstream
//! credential, audit recording on) and, when nginx is installed, through **nginx** as a TLS
//! reverse proxy to the same upstream: all measured in the same run and printed as ratios against
//! the direct baseline.
//!
//! This is a program, not a test: it asserts nothing about speed and always exits 0 once it has
//! measured (non-zero only when it could not run, or when the sanity check below fails). Run it
//! with
//!
//! ```text
//! scripts/bench-http                          # 3 rounds x 5 s per scenario and target
//! scripts/bench-http --seconds 3 --rounds 1   # quick look while developing
//! scripts/bench-http --only small_c1          # one scenario (repeatable); scenarios: small_c1,
//!                                             # small_c16, large_masked_c1, large_masked_c4,
//!                                             # large_plain_c1
//! scripts/bench-http --json                   # the same results as one JSON object on stdout
//! scripts/bench-http --hold                   # set up, print curl commands and pids, wait
//! scripts/bench-http --compare OTHER/tollgate # A/B: a second tollgate build measured in the
//!                                             # same rounds as target `gw-b`
//! ```
//!
//! or, after `cargo build --release -p tollgate --bins --examples`,
//! `target/release/examples/bench_http [--rounds N] [--seconds S] [--json] [--no-nginx]`.
//! It runs `tollgate` from next to itself (`target/release/tollgate`), or `--tollgate PATH`.
//!
//! What it does:
//! 1. makes a PKI with `tollgate_tls::pki` (what `tollgate pki init/issue` do): a CA, a server
//!    certificate for the gateway and nginx, one for the upstream (both `localhost`/127.0.0.1);
//! 2. starts an HTTPS upstream inside this program (hyper HTTP/1.1 over rustls, its own tokio
//!    runtime, threads `bench-upstream`): `GET /small` answers a fixed ~200-byte JSON object,
//!    `GET /large` a ~1 MB JSON array of customer records with e-mails and card numbers;
//! 3. writes a gateway config (SQLite audit store in a temporary directory, recording on as by
//!    default, a service token in `[[identity.tokens]]`, two `http` resources on that upstream
//!    with verify-full TLS and an `Authorization` credential from the environment: `api` without
//!    masks and `api-masked` with `json_paths` and the `email`/`credit_card` detectors) and starts
//!    `tollgate serve` with `RUST_LOG=warn`, waiting for `/readyz` on `admin_listen`;
//! 4. unless `--no-nginx` or nginx is missing, starts nginx (`worker_processes auto`, as the
//!    current user; as root its workers run as `www-data`) from a generated `nginx.conf` in a
//!    temporary directory: TLS to the client with the gateway's certificate, `proxy_pass` to the
//!    upstream over TLS with `proxy_ssl_verify on` against the CA, HTTP/1.1 keep-alive upstream
//!    connections, the same credential header set, responses buffered in memory (no temp files);
//! 5. checks once that what is measured is what is claimed: the gateway's `/large` through
//!    `api-masked` is valid JSON with as many records as the direct one and no raw e-mail or card
//!    number in it, the direct one has them, and `/small` and the unmasked `/large` (through
//!    `api` for the gateway) are byte for byte what the upstream serves everywhere;
//! 6. for each round and scenario runs every target back to back (the order rotates per round,
//!    so no target always runs first): the in-process load generator (threads `bench-client`)
//!    opens C keep-alive HTTP/1.1 connections over rustls (trusting the test CA; `Authorization:
//!    Bearer TOKEN` to the gateway, nothing special elsewhere), and each connection sends
//!    sequential GETs for S seconds, recording every request's latency (request sent to last body
//!    byte read);
//! 7. prints medians over the rounds: requests/s, p50/p99 latency, MB/s for the large body, the
//!    ratios gateway/direct and nginx/direct (the median of the per-round ratios: each round's
//!    runs are back to back, so a ratio is taken from runs that shared the machine's state),
//!    the p50 latency each proxy adds (µs), CPU per request of each party (from /proc), and the
//!    gateway's audit and masking counters.
//!
//! Everything (gateway, nginx, upstream, temporary files) is cleaned up on return, on error and
//! on Ctrl-C/SIGTERM. On a small machine the load generator, the upstream and the proxy share the
//! cores, so with 16 connections the ratio mostly reflects CPU per request: see the CPU columns.
//! nginx does not mask: for the masked 1 MB scenarios its ratio is the cost of a plain TLS proxy
//! on that body, not of the same work; `large_plain_c1` (the same body through the gateway's
//! resource without masks) is the like-for-like comparison, and the two together tell the
//! masking's own cost.

#[path = "bench_support/mod.rs"]
mod support;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tollgate_tls::pki::{self, ServerCertSpec};

#[derive(Parser, Debug)]
#[command(
    name = "bench_http",
    about = "HTTP requests direct vs through tollgate (and nginx), as ratios measured in the same run"
)]
struct Opts {
    /// Rounds per scenario (every target once per round); the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Duration of each measured run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Seconds of unmeasured load against each target and body before the first round.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Only these scenarios (keys: small_c1, small_c16, large_masked_c1, large_masked_c4,
    /// large_plain_c1); repeatable; default all.
    #[arg(long)]
    only: Vec<String>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// The tollgate binary; default: `tollgate` next to this program's directory.
    #[arg(long, env = "TOLLGATE_BIN")]
    tollgate: Option<PathBuf>,
    /// The nginx binary for the reference proxy; default: `nginx` in $PATH or /usr/sbin.
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Do not measure nginx even when it is installed.
    #[arg(long)]
    no_nginx: bool,
    /// A second tollgate binary (say, a build of main) served with the same config and measured
    /// in the same rounds as target `gw-b`: a change's A/B in one run, on one machine state.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Measure nothing: set up the upstream, the gateway and nginx, check them, print curl
    /// commands for each and the gateway's pid (for `perf record -p`), and wait for Ctrl-C.
    #[arg(long)]
    hold: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Body {
    Small,
    /// `/large`, through the gateway's resource with masks.
    Large,
    /// `/large`, through the gateway's resource without masks.
    LargePlain,
}

struct Scenario {
    key: &'static str,
    label: &'static str,
    body: Body,
    conns: usize,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        key: "small_c1",
        label: "small JSON, 1 conn",
        body: Body::Small,
        conns: 1,
    },
    Scenario {
        key: "small_c16",
        label: "small JSON, 16 conns",
        body: Body::Small,
        conns: 16,
    },
    Scenario {
        key: "large_masked_c1",
        label: "1 MB JSON masked, 1 conn",
        body: Body::Large,
        conns: 1,
    },
    Scenario {
        key: "large_masked_c4",
        label: "1 MB JSON masked, 4 conns",
        body: Body::Large,
        conns: 4,
    },
    Scenario {
        key: "large_plain_c1",
        label: "1 MB JSON unmasked, 1 conn",
        body: Body::LargePlain,
        conns: 1,
    },
];

/// The service token the load generator presents to the gateway.
const TOKEN: &str = "tg-bench-token-6b1d2f0c9a8e4f17";
/// The credential the gateway (and nginx) inject towards the upstream.
const UPSTREAM_CREDENTIAL: &str = "Bearer bench-upstream-credential";
const UPSTREAM_CREDENTIAL_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_TOKEN";
const SMALL: &str = r#"{"id":42,"name":"Widget","status":"active","price":{"amount":1299,"currency":"EUR"},"tags":["a","b","c"],"updated_at":"2026-01-01T00:00:00Z","ok":true}"#;
/// Threads of this program, named so that /proc tells their CPU time apart (15 bytes at most).
const UPSTREAM_THREADS: &str = "bench-upstream";
const CLIENT_THREADS: &str = "bench-client";

/// The ~1 MB JSON array served on `/large`: e-mails and card numbers in named fields (for the
/// JSON paths) and e-mails in free text (for the detectors).
fn large_body() -> Bytes {
    let mut s = String::with_capacity(1_050_000);
    s.push('[');
    let mut i = 0u64;
    while s.len() < 1_000_000 {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            r#"{{"id":{i},"name":"Customer {i}","email":"user{i}@example.com","card_number":"4111 1111 1111 1111","status":"active","balance":{},"note":"call back at user{i}@example.org about order {}"}}"#,
            (i * 7919) % 100_000,
            i * 3 + 1000
        );
        i += 1;
    }
    s.push(']');
    Bytes::from(s)
}

fn main() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let opts = Opts::parse();
    // All cleanup lives in Drop impls of values owned by `run`, so it has happened by now.
    if let Err(e) = run(&opts) {
        eprintln!("bench_http: {e:#}");
        std::process::exit(if INTERRUPTED.load(Ordering::SeqCst) {
            130
        } else {
            2
        });
    }
}

fn run(opts: &Opts) -> Result<()> {
    if opts.rounds == 0 || opts.seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    let scenarios: Vec<&'static Scenario> = SCENARIOS
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.iter().any(|k| k == s.key))
        .collect();
    if scenarios.is_empty() {
        bail!(
            "--only matches no scenario; keys: {}",
            SCENARIOS
                .iter()
                .map(|s| s.key)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let tollgate = support::tollgate_binary(opts.tollgate.as_deref())?;
    // The reference proxy, or why there is none.
    let nginx_bin: Result<PathBuf, String> = if opts.no_nginx {
        Err("--no-nginx".into())
    } else {
        match &opts.nginx {
            Some(p) if p.is_file() => Ok(p.clone()),
            Some(p) => Err(format!("{} not found", p.display())),
            None => which("nginx")
                .or_else(|| {
                    let sbin = PathBuf::from("/usr/sbin/nginx");
                    sbin.is_file().then_some(sbin)
                })
                .ok_or_else(|| {
                    "nginx not installed (sudo apt-get install -y nginx-light)".to_string()
                }),
        }
    };
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-bench-http-")
        .tempdir()?;
    let load_before = loadavg();

    // 1. The PKI.
    let pki_dir = tmp.path().join("pki");
    let ca = pki::init_ca(&pki_dir, "tollgate bench CA")?.cert;
    let localhost = || ServerCertSpec {
        dns: vec!["localhost".into()],
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ttl: Duration::from_secs(86400),
        not_before: None,
    };
    let gw_cert = pki::issue_server(&pki_dir, &localhost(), &pki_dir.join("gateway"))?;
    let up_cert = pki::issue_server(&pki_dir, &localhost(), &pki_dir.join("upstream"))?;

    // 2. The upstream, in its own runtime.
    progress(format_args!("starting the HTTPS upstream ..."));
    let large = large_body();
    let upstream = Upstream::start(&up_cert.cert, &up_cert.key, large.clone())?;

    // 3. The gateway (and the one compared with it).
    let paths = GatewayPaths {
        cert: &gw_cert.cert,
        key: &gw_cert.key,
        ca: &ca,
        up_port: upstream.port,
    };
    let (gateway, https_port) = start_gateway(&tollgate, tmp.path(), &paths)?;
    let compare = match &opts.compare {
        Some(bin) => {
            let bin =
                fs::canonicalize(bin).with_context(|| format!("--compare {}", bin.display()))?;
            let dir = tmp.path().join("compare");
            fs::create_dir(&dir)?;
            Some(start_gateway(&bin, &dir, &paths)?)
        }
        None => None,
    };

    // 4. nginx, the reference proxy.
    let nginx = match &nginx_bin {
        Ok(bin) => {
            progress(format_args!("starting {} ...", bin.display()));
            Some(Nginx::start(
                bin,
                upstream.port,
                &gw_cert.cert,
                &gw_cert.key,
                &ca,
            )?)
        }
        Err(why) => {
            progress(format_args!("no reference proxy: {why}"));
            None
        }
    };

    // The load generator's runtime and TLS client.
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()?;
    let connector = tls_connector(&ca)?;
    let mut targets = vec![
        Target {
            name: "direct",
            port: upstream.port,
            plain_prefix: "",
            masked_prefix: "",
            authorization: None,
            proxy: None,
            masks: false,
        },
        Target {
            name: "gateway",
            port: https_port,
            plain_prefix: "/r/api",
            masked_prefix: "/r/api-masked",
            authorization: Some(format!("Bearer {TOKEN}")),
            proxy: Some(Proxy::Gateway(gateway.pid())),
            masks: true,
        },
    ];
    if let Some((b, port)) = &compare {
        targets.push(Target {
            name: "gw-b",
            port: *port,
            plain_prefix: "/r/api",
            masked_prefix: "/r/api-masked",
            authorization: Some(format!("Bearer {TOKEN}")),
            proxy: Some(Proxy::Gateway(b.pid())),
            masks: true,
        });
    }
    if let Some(n) = &nginx {
        targets.push(Target {
            name: "nginx",
            port: n.port,
            plain_prefix: "",
            masked_prefix: "",
            authorization: None,
            proxy: Some(Proxy::Nginx(n.pid())),
            masks: false,
        });
    }

    // 5. Sanity: the benchmark measures what it claims.
    let sanity = client_rt
        .block_on(sanity_check(&targets, &connector, &large))
        .map_err(|e| e.context(format!("sanity check\n{}", gateway.log_tail(20))))?;
    progress(format_args!("sanity: {sanity}"));

    if opts.hold {
        let ca_arg = ca.display();
        for t in &targets {
            let auth = t
                .authorization
                .as_ref()
                .map(|a| format!(" -H 'Authorization: {a}'"))
                .unwrap_or_default();
            let mut paths: Vec<String> = [Body::Small, Body::Large, Body::LargePlain]
                .map(|b| t.path(b))
                .to_vec();
            paths.dedup();
            for path in paths {
                println!(
                    "{:<8} curl -sS --cacert {ca_arg}{auth} https://localhost:{}{path}",
                    t.name, t.port,
                );
            }
        }
        println!(
            "gateway pid {} (perf record -g -p {}); config and audit store in {}",
            gateway.pid(),
            gateway.pid(),
            tmp.path().display()
        );
        if let Some(n) = &nginx {
            println!("nginx master pid {}", n.pid());
        }
        println!("Ctrl-C ends");
        loop {
            std::thread::sleep(Duration::from_millis(200));
            check_interrupted()?;
        }
    }

    // 6. Warm-up, then the rotating rounds.
    if opts.warmup > 0 {
        for t in &targets {
            progress(format_args!(
                "warm-up: {} for {} s per body",
                t.name, opts.warmup
            ));
            for (body, conns) in [(Body::Small, 4), (Body::Large, 2)] {
                client_rt
                    .block_on(measure(t, &connector, body, conns, opts.warmup))
                    .with_context(|| format!("warm-up {}", t.name))?;
            }
        }
    }
    // samples[scenario][target] = one Sample per round
    let mut samples: Vec<Vec<Vec<Sample>>> = scenarios
        .iter()
        .map(|_| targets.iter().map(|_| vec![]).collect())
        .collect();
    for round in 0..opts.rounds {
        for (i, sc) in scenarios.iter().enumerate() {
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.rotate_left(round % targets.len());
            for ti in order {
                let t = &targets[ti];
                let before = CpuReading::read(t.proxy.as_ref());
                let mut s = client_rt
                    .block_on(measure(t, &connector, sc.body, sc.conns, opts.seconds))
                    .with_context(|| format!("{} {}", sc.label, t.name))?;
                let after = CpuReading::read(t.proxy.as_ref());
                s.cpu = after.minus(&before);
                progress(format_args!(
                    "round {}/{} {:<26} {:<7} {:>9.1} req/s  p50 {:>8.0} µs  p99 {:>8.0} µs  {:>7.1} MB/s  cpu/req: proxy {:>6.1} µs, upstream {:>6.1} µs, client {:>6.1} µs",
                    round + 1,
                    opts.rounds,
                    sc.label,
                    t.name,
                    s.rps(),
                    s.p50_us,
                    s.p99_us,
                    s.mb_per_s(),
                    s.per_request(s.cpu.proxy),
                    s.per_request(s.cpu.upstream),
                    s.per_request(s.cpu.client),
                ));
                samples[i][ti].push(s);
            }
        }
    }

    // 7. Gateway-side numbers, then the report.
    std::thread::sleep(Duration::from_millis(500)); // let the recorder flush its last batch
    let metrics = gateway.metrics().unwrap_or_default();
    let report = Report {
        opts,
        rows: scenarios
            .iter()
            .zip(&samples)
            .map(|(sc, s)| Row::new(sc, &targets, s))
            .collect(),
        target_names: targets.iter().map(|t| t.name).collect(),
        nginx_version: nginx.as_ref().map(|n| n.version.clone()),
        nginx_skipped: nginx_bin.err(),
        nginx_log: nginx.as_ref().map(|n| n.log_tail(5)).unwrap_or_default(),
        large_bytes: large.len(),
        sanity,
        audit_written: metric(&metrics, "tollgate_audit_events_written_total"),
        audit_failed: metric(&metrics, "tollgate_audit_write_failures_total"),
        requests_api: metric_sum(&metrics, "tollgate_http_requests_total{resource=\"api\","),
        requests_api_masked: metric_sum(
            &metrics,
            "tollgate_http_requests_total{resource=\"api-masked\",",
        ),
        gateway_peak_rss_kib: proc_status_kib(gateway.pid(), "VmHWM"),
        gateway_log_tail: gateway.log_tail(10),
        load_before,
        load_after: loadavg(),
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        report.print_table();
    }
    drop(client_rt);
    drop(nginx);
    drop(compare);
    drop(gateway);
    drop(upstream);
    drop(tmp);
    Ok(())
}

/// Where a gateway's config points.
struct GatewayPaths<'a> {
    cert: &'a Path,
    key: &'a Path,
    ca: &'a Path,
    up_port: u16,
}

/// `bin serve` in `dir` with the benchmark's config (two `http` resources on the upstream, one
/// with masks); returns it and its `https_listen` port.
fn start_gateway(bin: &Path, dir: &Path, p: &GatewayPaths) -> Result<(Gateway, u16)> {
    let https_port = tollgate_testsupport::free_port();
    let admin_port = tollgate_testsupport::free_port();
    let pg_port = tollgate_testsupport::free_port();
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{pg_port}"
admin_listen = "127.0.0.1:{admin_port}"
https_listen = "127.0.0.1:{https_port}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "sqlite://audit.db"

[[identity.tokens]]
subject = "bench-bot"
sha256 = "{token_sha}"
groups = ["bench"]

[[resources]]
name = "api"
kind = "http"
upstream = "https://localhost:{up_port}"
allow_groups = ["bench"]
[resources.tls]
ca = "{ca}"
[resources.credentials]
header = "Authorization"
value_env = "{UPSTREAM_CREDENTIAL_ENV}"

[[resources]]
name = "api-masked"
kind = "http"
upstream = "https://localhost:{up_port}"
allow_groups = ["bench"]
[resources.tls]
ca = "{ca}"
[resources.credentials]
header = "Authorization"
value_env = "{UPSTREAM_CREDENTIAL_ENV}"
[[resources.masks]]
json_paths = ["$..email", "$..card_number"]
detectors = ["email", "credit_card"]
strategy = "redact"
"#,
        cert = p.cert.display(),
        key = p.key.display(),
        ca = p.ca.display(),
        token_sha = sha256_hex(TOKEN),
        up_port = p.up_port,
    );
    let config_path = dir.join("tollgate.toml");
    fs::write(&config_path, config)?;
    progress(format_args!("starting {} serve ...", bin.display()));
    let gateway = Gateway::start(
        bin,
        &config_path,
        dir,
        admin_port,
        &[(UPSTREAM_CREDENTIAL_ENV, UPSTREAM_CREDENTIAL)],
    )?;
    Ok((gateway, https_port))
}

fn progress(msg: std::fmt::Arguments) {
    eprintln!("bench_http: {msg}");
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", path.display()))
}

fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

// ---------------------------------------------------------------------------------------------
// The upstream

/// The HTTPS upstream, served by its own runtime (threads `bench-upstream`); stops on drop.
struct Upstream {
    port: u16,
    _rt: tokio::runtime::Runtime,
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Upstream {
    fn start(cert: &Path, key: &Path, large: Bytes) -> Result<Upstream> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(UPSTREAM_THREADS)
            .enable_all()
            .build()?;
        let certs = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).context("read the upstream key")?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let small = Bytes::from_static(SMALL.as_bytes());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, small, large) = (acceptor.clone(), small.clone(), large.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<_>| {
                        let resp = match req.uri().path() {
                            "/small" => json_response(small.clone()),
                            "/large" => json_response(large.clone()),
                            _ => Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()).boxed())
                                .unwrap(),
                        };
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Upstream { port, _rt: rt })
    }
}

fn json_response(body: Bytes) -> Response<UpBody> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(body).boxed())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The load generator

/// Whose CPU time a target's runs are charged with.
enum Proxy {
    Gateway(u32),
    /// The master; its workers are its children.
    Nginx(u32),
}

struct Target {
    name: &'static str,
    port: u16,
    /// Path prefix of the upstream without masks (the gateway's resource `api`).
    plain_prefix: &'static str,
    /// Path prefix of the upstream with masks (the gateway's resource `api-masked`).
    masked_prefix: &'static str,
    /// `Authorization` sent with every request.
    authorization: Option<String>,
    proxy: Option<Proxy>,
    /// A tollgate: its masked `/large` must come back masked.
    masks: bool,
}

impl Target {
    fn path(&self, body: Body) -> String {
        match body {
            Body::Small => format!("{}/small", self.plain_prefix),
            Body::Large => format!("{}/large", self.masked_prefix),
            Body::LargePlain => format!("{}/large", self.plain_prefix),
        }
    }

    fn request(&self, body: Body) -> Request<Empty<Bytes>> {
        let mut req = Request::get(self.path(body))
            .header(hyper::header::HOST, format!("localhost:{}", self.port))
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        req.body(Empty::new()).unwrap()
    }

    /// A keep-alive HTTP/1.1 connection over TLS, its driver spawned on the current runtime.
    async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .with_context(|| format!("connect to {} on port {}", self.name, self.port))?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
            .await
            .with_context(|| format!("TLS handshake with {}", self.name))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request on `sender`: status and body bytes (kept only when `keep`).
    async fn get(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        body: Body,
        keep: bool,
    ) -> Result<(u16, usize, Vec<u8>)> {
        sender.ready().await?;
        let resp = sender.send_request(self.request(body)).await?;
        let status = resp.status().as_u16();
        let mut incoming = resp.into_body();
        let (mut n, mut kept) = (0usize, Vec::new());
        while let Some(frame) = incoming.frame().await {
            if let Ok(data) = frame?.into_data() {
                n += data.len();
                if keep || status != 200 {
                    kept.extend_from_slice(&data);
                }
            }
        }
        Ok((status, n, kept))
    }
}

/// Each target's `/small` and `/large` once: a summary line, or why the benchmark would not
/// measure what it says.
async fn sanity_check(
    targets: &[Target],
    connector: &tokio_rustls::TlsConnector,
    large: &Bytes,
) -> Result<String> {
    let raw_markers = ["@example.com", "@example.org", "4111 1111 1111 1111"];
    let records = serde_json::from_slice::<Value>(large)?
        .as_array()
        .map_or(0, |a| a.len());
    let mut lines = vec![];
    for t in targets {
        let mut sender = t.connect(connector).await?;
        let (status, _, small) = t.get(&mut sender, Body::Small, true).await?;
        if status != 200 || small != SMALL.as_bytes() {
            bail!(
                "{} /small: status {status}, body {}",
                t.name,
                String::from_utf8_lossy(&small)
            );
        }
        let (status, _, plain) = t.get(&mut sender, Body::LargePlain, true).await?;
        if status != 200 || plain != large.as_ref() {
            bail!(
                "{} {}: status {status}, {} bytes that differ from what the upstream serves",
                t.name,
                t.path(Body::LargePlain),
                plain.len()
            );
        }
        let (status, n, body) = t.get(&mut sender, Body::Large, true).await?;
        let path = t.path(Body::Large);
        if status != 200 {
            bail!(
                "{} {path}: status {status}: {}",
                t.name,
                String::from_utf8_lossy(&body[..body.len().min(500)])
            );
        }
        let parsed: Value = serde_json::from_slice(&body)
            .with_context(|| format!("{} {path}: not valid JSON ({n} bytes)", t.name))?;
        let got = parsed.as_array().map_or(0, |a| a.len());
        if got != records {
            bail!("{} /large: {got} records, expected {records}", t.name);
        }
        let text = String::from_utf8_lossy(&body);
        let raw: usize = raw_markers.iter().map(|m| text.matches(m).count()).sum();
        if t.masks {
            if raw != 0 {
                bail!("{}'s /large through api-masked has {raw} raw e-mails or card numbers: masking is not what is measured", t.name);
            }
        } else if body != large.as_ref() {
            bail!("{} /large differs from what the upstream serves", t.name);
        }
        lines.push(format!(
            "{} {path} {n} bytes, {got} records, {raw} raw e-mails/cards",
            t.name
        ));
    }
    Ok(format!(
        "/small and unmasked /large identical everywhere; {}",
        lines.join("; ")
    ))
}

/// One measured run against one target.
#[derive(Clone, Debug, Default)]
struct Sample {
    requests: u64,
    bytes: u64,
    elapsed: f64,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    cpu: CpuUse,
}

impl Sample {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed
    }
    /// CPU µs per request.
    fn per_request(&self, cpu_seconds: f64) -> f64 {
        if self.requests == 0 {
            return f64::NAN;
        }
        cpu_seconds * 1e6 / self.requests as f64
    }
}

/// `conns` connections, opened before the clock starts, each sending sequential GETs of `body`
/// for `seconds`; latency is from sending a request to reading its last body byte.
async fn measure(
    t: &Target,
    connector: &tokio_rustls::TlsConnector,
    body: Body,
    conns: usize,
    seconds: u64,
) -> Result<Sample> {
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(t.connect(connector).await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let target = Arc::new((t.request(body), t.name, t.path(body)));
    let mut tasks = Vec::with_capacity(conns);
    for mut sender in senders {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let (template, name, path) = &*target;
            let mut lat_us: Vec<u32> = Vec::with_capacity(4096);
            let mut bytes = 0u64;
            while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
                let mut req = Request::get(template.uri().clone())
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                *req.headers_mut() = template.headers().clone();
                let t0 = Instant::now();
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let mut incoming = resp.into_body();
                let mut n = 0usize;
                let mut head = Vec::new();
                while let Some(frame) = incoming.frame().await {
                    if let Ok(data) = frame?.into_data() {
                        n += data.len();
                        if status != 200 && head.len() < 500 {
                            head.extend_from_slice(&data);
                        }
                    }
                }
                if status != 200 {
                    bail!(
                        "{name} {path}: status {status}: {}",
                        String::from_utf8_lossy(&head)
                    );
                }
                lat_us.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                bytes += n as u64;
            }
            Ok::<_, anyhow::Error>((lat_us, bytes))
        }));
    }
    let mut all: Vec<u32> = vec![];
    let mut bytes = 0u64;
    for task in tasks {
        let (lat, b) = task.await??;
        all.extend(lat);
        bytes += b;
    }
    let elapsed = start.elapsed().as_secs_f64();
    check_interrupted()?;
    if all.is_empty() {
        bail!("no request completed");
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize] as f64;
    Ok(Sample {
        requests: all.len() as u64,
        bytes,
        elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        mean_us: all.iter().map(|&v| v as f64).sum::<f64>() / all.len() as f64,
        cpu: CpuUse::default(),
    })
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc

/// CPU seconds spent during a run: by the target's proxy (none for direct), by this program's
/// upstream threads and by its load-generator threads.
#[derive(Clone, Debug, Default)]
struct CpuUse {
    proxy: f64,
    upstream: f64,
    client: f64,
}

struct CpuReading(CpuUse);

impl CpuReading {
    fn read(proxy: Option<&Proxy>) -> CpuReading {
        let proxy = match proxy {
            None => 0.0,
            Some(Proxy::Gateway(pid)) => process_cpu_seconds(*pid).unwrap_or(0.0),
            Some(Proxy::Nginx(master)) => {
                process_cpu_seconds(*master).unwrap_or(0.0)
                    + children_of(*master)
                        .into_iter()
                        .filter_map(process_cpu_seconds)
                        .sum::<f64>()
            }
        };
        let (mut upstream, mut client) = (0.0, 0.0);
        for task in fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let name = text
                .split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .map(|(n, _)| n)
                .unwrap_or_default();
            let Some(cpu) = parse_stat(&text).map(|s| s.utime + s.stime) else {
                continue;
            };
            if name.starts_with(UPSTREAM_THREADS) {
                upstream += cpu;
            } else if name.starts_with(CLIENT_THREADS) {
                client += cpu;
            }
        }
        CpuReading(CpuUse {
            proxy,
            upstream,
            client,
        })
    }

    fn minus(&self, before: &CpuReading) -> CpuUse {
        CpuUse {
            proxy: self.0.proxy - before.0.proxy,
            upstream: self.0.upstream - before.0.upstream,
            client: self.0.client - before.0.client,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The processes

/// nginx in the foreground (`daemon off`) with a generated config in its own temporary
/// directory; stopped on drop (SIGTERM to the master, which stops its workers).
struct Nginx {
    child: Child,
    port: u16,
    version: String,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(bin: &Path, up_port: u16, cert: &Path, key: &Path, ca: &Path) -> Result<Nginx> {
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .with_context(|| format!("run {} -v", bin.display()))?;
        // `nginx -v` prints "nginx version: nginx/1.22.1" on stderr.
        let version = String::from_utf8_lossy(&version.stderr)
            .lines()
            .next()
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("nginx")
            .to_owned();
        // A directory of its own: as root the workers run as www-data, which must reach the
        // temporary paths inside it (the master reads the certificates and key).
        let dir = tempfile::Builder::new()
            .prefix("tollgate-bench-nginx-")
            .tempdir()?;
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
            let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
            if passwd.lines().any(|l| l.starts_with("www-data:")) {
                "user www-data www-data;"
            } else {
                "user nobody nogroup;"
            }
        } else {
            ""
        };
        let port = tollgate_testsupport::free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"# Generated by bench_http: a TLS reverse proxy to the benchmark's upstream.
{user}
daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream bench_upstream {{
        server 127.0.0.1:{up_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 1000000;
        location / {{
            proxy_pass https://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost:{up_port};
            proxy_set_header Authorization "{UPSTREAM_CREDENTIAL}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            # Responses buffered in memory only (a 1 MB body fits), never in temporary files.
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"#,
            cert = cert.display(),
            key = key.display(),
            ca = ca.display(),
        );
        let conf_path = dir.path().join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let log = fs::File::create(dir.path().join("stderr.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = die_with_parent(&mut cmd)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut nginx = Nginx {
            child,
            port,
            version,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            check_interrupted()?;
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx exited early ({status}):\n{}\n{}",
                    file_tail(&nginx.dir.path().join("stderr.log"), 10, |_| true),
                    nginx.log_tail(10)
                );
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not start listening:\n{}", nginx.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.dir.path().join("error.log"), lines, |_| true)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: a fast shutdown, the master stops its workers before exiting.
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The report

/// The sum of every series whose line starts with `prefix` (e.g. a name and some labels).
fn metric_sum(text: &str, prefix: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Medians over the rounds of one target in one scenario.
struct Side {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    mb_per_s: f64,
    rps_rounds: Vec<f64>,
    /// CPU µs per request.
    proxy_cpu_us: f64,
    upstream_cpu_us: f64,
    client_cpu_us: f64,
}

impl Side {
    fn new(samples: &[Sample]) -> Side {
        let col = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        Side {
            rps: col(&|s| s.rps()),
            p50_us: col(&|s| s.p50_us),
            p99_us: col(&|s| s.p99_us),
            mean_us: col(&|s| s.mean_us),
            mb_per_s: col(&|s| s.mb_per_s()),
            rps_rounds: samples.iter().map(|s| s.rps()).collect(),
            proxy_cpu_us: col(&|s| s.per_request(s.cpu.proxy)),
            upstream_cpu_us: col(&|s| s.per_request(s.cpu.upstream)),
            client_cpu_us: col(&|s| s.per_request(s.cpu.client)),
        }
    }

    fn json(&self) -> Value {
        json!({
            "requests_per_s_median": self.rps,
            "requests_per_s_rounds": self.rps_rounds,
            "latency_p50_us_median": self.p50_us,
            "latency_p99_us_median": self.p99_us,
            "latency_mean_us_median": self.mean_us,
            "mb_per_s_median": self.mb_per_s,
            "cpu_us_per_request": {
                "proxy": self.proxy_cpu_us,
                "upstream": self.upstream_cpu_us,
                "client": self.client_cpu_us,
            },
        })
    }
}

/// A proxy against the direct baseline in one scenario.
struct Versus {
    side: Side,
    /// Median over the rounds of (proxy req/s ÷ direct req/s in that round).
    ratio: f64,
    ratio_rounds: Vec<f64>,
    /// Median p50 latency added over direct (µs): the median of the per-round differences.
    added_p50_us: f64,
}

impl Versus {
    fn new(direct: &[Sample], proxy: &[Sample]) -> Versus {
        let ratio_rounds: Vec<f64> = direct
            .iter()
            .zip(proxy)
            .map(|(d, p)| p.rps() / d.rps())
            .collect();
        Versus {
            side: Side::new(proxy),
            ratio: median(ratio_rounds.clone()),
            added_p50_us: median(
                direct
                    .iter()
                    .zip(proxy)
                    .map(|(d, p)| p.p50_us - d.p50_us)
                    .collect(),
            ),
            ratio_rounds,
        }
    }

    fn json(&self) -> Value {
        let mut v = self.side.json();
        v["ratio_vs_direct"] = json!(self.ratio);
        v["ratio_vs_direct_rounds"] = json!(self.ratio_rounds);
        v["added_latency_p50_us"] = json!(self.added_p50_us);
        v
    }
}

struct Row {
    sc: &'static Scenario,
    direct: Side,
    gateway: Versus,
    nginx: Option<Versus>,
    /// `--compare`: the second tollgate build.
    compare: Option<Versus>,
    /// Median over the rounds of (gateway req/s ÷ gw-b req/s in that round).
    gw_vs_compare: Option<f64>,
}

impl Row {
    fn new(sc: &'static Scenario, targets: &[Target], samples: &[Vec<Sample>]) -> Row {
        let at = |name: &str| targets.iter().position(|t| t.name == name);
        let direct = &samples[at("direct").unwrap()];
        Row {
            sc,
            direct: Side::new(direct),
            gateway: Versus::new(direct, &samples[at("gateway").unwrap()]),
            nginx: at("nginx").map(|i| Versus::new(direct, &samples[i])),
            compare: at("gw-b").map(|i| Versus::new(direct, &samples[i])),
            gw_vs_compare: at("gw-b").map(|i| {
                let gw = &samples[at("gateway").unwrap()];
                median(
                    gw.iter()
                        .zip(&samples[i])
                        .map(|(a, b)| a.rps() / b.rps())
                        .collect(),
                )
            }),
        }
    }

    /// The issue's goal: the gateway's ratio at least the reference proxy's.
    fn goal_met(&self) -> Option<bool> {
        self.nginx.as_ref().map(|n| self.gateway.ratio >= n.ratio)
    }
}

struct Report<'a> {
    opts: &'a Opts,
    rows: Vec<Row>,
    target_names: Vec<&'static str>,
    nginx_version: Option<String>,
    nginx_skipped: Option<String>,
    nginx_log: String,
    large_bytes: usize,
    sanity: String,
    audit_written: Option<f64>,
    audit_failed: Option<f64>,
    /// `tollgate_http_requests_total` of each resource (all decisions).
    requests_api: Option<f64>,
    requests_api_masked: Option<f64>,
    gateway_peak_rss_kib: Option<u64>,
    gateway_log_tail: String,
    load_before: String,
    load_after: String,
}

fn opt_num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into())
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".into(),
    }
}

impl Report<'_> {
    fn print_table(&self) {
        let o = self.opts;
        println!();
        println!(
            "tollgate HTTP data path: direct (HTTPS) vs through tollgate (TLS both legs, bearer token, injected credential, recording on){}",
            if self.nginx_version.is_some() { " vs nginx (TLS reverse proxy)" } else { "" }
        );
        println!(
            "{} round(s) x {} s per target, order rotating per round; medians (ratios: median of per-round ratios); {} CPUs; loadavg before {} / after {}",
            o.rounds,
            o.seconds,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.load_before,
            self.load_after
        );
        println!(
            "large body: {} bytes of JSON; \"masked\": the gateway masks it (json_paths $..email, $..card_number + detectors email, credit_card), nginx passes it as is; \"unmasked\": through a gateway resource without masks",
            self.large_bytes
        );
        match (&self.nginx_version, &self.nginx_skipped) {
            (Some(v), _) => println!("reference: {v} (worker_processes auto, keep-alive TLS upstream, proxy_ssl_verify on)"),
            (None, Some(why)) => println!("reference: nginx skipped: {why}"),
            _ => {}
        }
        println!();
        println!(
            "{:<26} {:>10} {:>10} {:>10} {:>8} {:>10} {:>8} {:>7}",
            "scenario", "req/s dir", "req/s gw", "req/s ngx", "gw/dir", "ngx/dir", "gw/ngx", "goal"
        );
        for r in &self.rows {
            let n = r.nginx.as_ref();
            println!(
                "{:<26} {:>10.1} {:>10.1} {:>10} {:>8.3} {:>10} {:>8} {:>7}",
                r.sc.label,
                r.direct.rps,
                r.gateway.side.rps,
                fmt_opt(n.map(|n| n.side.rps), 1),
                r.gateway.ratio,
                fmt_opt(n.map(|n| n.ratio), 3),
                fmt_opt(n.map(|n| r.gateway.side.rps / n.side.rps), 3),
                match r.goal_met() {
                    Some(true) => "ok",
                    Some(false) => "MISS",
                    None => "-",
                }
            );
        }
        println!("(goal: gw/dir >= ngx/dir, recording on)");
        println!();
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (µs)",
            "p50 dir",
            "p50 gw",
            "p50 ngx",
            "added gw",
            "added ngx",
            "p99 dir",
            "p99 gw",
            "p99 ngx"
        );
        for r in &self.rows {
            let n = r.nginx.as_ref();
            println!(
                "{:<26} {:>9.0} {:>9.0} {:>9} {:>9.0} {:>9} {:>9.0} {:>9.0} {:>9}",
                r.sc.label,
                r.direct.p50_us,
                r.gateway.side.p50_us,
                fmt_opt(n.map(|n| n.side.p50_us), 0),
                r.gateway.added_p50_us,
                fmt_opt(n.map(|n| n.added_p50_us), 0),
                r.direct.p99_us,
                r.gateway.side.p99_us,
                fmt_opt(n.map(|n| n.side.p99_us), 0),
            );
        }
        if self.rows.iter().any(|r| r.sc.body != Body::Small) {
            println!();
            println!(
                "{:<26} {:>9} {:>9} {:>9}",
                "throughput (MB/s)", "dir", "gw", "ngx"
            );
            for r in self.rows.iter().filter(|r| r.sc.body != Body::Small) {
                println!(
                    "{:<26} {:>9.1} {:>9.1} {:>9}",
                    r.sc.label,
                    r.direct.mb_per_s,
                    r.gateway.side.mb_per_s,
                    fmt_opt(r.nginx.as_ref().map(|n| n.side.mb_per_s), 1),
                );
            }
        }
        println!();
        println!("CPU µs per request (medians): the proxy, this program's upstream and load-generator threads");
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "scenario",
            "gateway",
            "nginx",
            "up dir",
            "up gw",
            "up ngx",
            "cli dir",
            "cli gw",
            "cli ngx"
        );
        for r in &self.rows {
            let n = r.nginx.as_ref();
            println!(
                "{:<26} {:>9.1} {:>9} {:>9.1} {:>9.1} {:>9} {:>9.1} {:>9.1} {:>9}",
                r.sc.label,
                r.gateway.side.proxy_cpu_us,
                fmt_opt(n.map(|n| n.side.proxy_cpu_us), 1),
                r.direct.upstream_cpu_us,
                r.gateway.side.upstream_cpu_us,
                fmt_opt(n.map(|n| n.side.upstream_cpu_us), 1),
                r.direct.client_cpu_us,
                r.gateway.side.client_cpu_us,
                fmt_opt(n.map(|n| n.side.client_cpu_us), 1),
            );
        }
        if self.rows.iter().any(|r| r.compare.is_some()) {
            println!();
            println!(
                "A/B (--compare {}): gateway = this build, gw-b = the other, same rounds",
                o.compare
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string())
            );
            println!(
                "{:<26} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
                "scenario",
                "req/s gw",
                "req/s gw-b",
                "gw/dir",
                "gw-b/dir",
                "gw/gw-b",
                "p50 gw",
                "p50 gw-b",
                "cpu gw",
                "cpu gw-b"
            );
            for r in &self.rows {
                let Some(b) = &r.compare else { continue };
                println!(
                    "{:<26} {:>10.1} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>9.0} {:>9.0} {:>9.1} {:>9.1}",
                    r.sc.label,
                    r.gateway.side.rps,
                    b.side.rps,
                    r.gateway.ratio,
                    b.ratio,
                    r.gw_vs_compare.unwrap_or(f64::NAN),
                    r.gateway.side.p50_us,
                    b.side.p50_us,
                    r.gateway.side.proxy_cpu_us,
                    b.side.proxy_cpu_us,
                );
            }
        }
        println!();
        println!("sanity (before measuring): {}", self.sanity);
        println!(
            "gateway: audit events written {} (write failures {}) for {} requests to api and {} to api-masked (incl. warm-up); peak RSS (VmHWM) {}",
            opt_num(self.audit_written),
            opt_num(self.audit_failed),
            opt_num(self.requests_api),
            opt_num(self.requests_api_masked),
            self.gateway_peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "n/a".into()),
        );
        if !self.gateway_log_tail.trim().is_empty() {
            println!(
                "gateway log (last lines, RUST_LOG=warn):\n{}",
                self.gateway_log_tail
            );
        }
        if !self.nginx_log.trim().is_empty() {
            println!("nginx error log (last lines):\n{}", self.nginx_log);
        }
    }

    fn to_json(&self) -> Value {
        let o = self.opts;
        json!({
            "rounds": o.rounds,
            "seconds": o.seconds,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
            "targets": self.target_names,
            "large_body_bytes": self.large_bytes,
            "nginx_version": self.nginx_version,
            "nginx_skipped": self.nginx_skipped,
            "sanity": self.sanity,
            "scenarios": self.rows.iter().map(|r| json!({
                "key": r.sc.key,
                "label": r.sc.label,
                "connections": r.sc.conns,
                "body": match r.sc.body {
                    Body::Small => "small",
                    Body::Large => "large_masked",
                    Body::LargePlain => "large_unmasked",
                },
                "direct": r.direct.json(),
                "gateway": r.gateway.json(),
                "nginx": r.nginx.as_ref().map(Versus::json),
                "gateway_b": r.compare.as_ref().map(Versus::json),
                "gateway_vs_gateway_b_rps": r.gw_vs_compare,
                "gateway_vs_nginx_rps": r.nginx.as_ref().map(|n| r.gateway.side.rps / n.side.rps),
                "goal_gateway_ratio_at_least_nginx_ratio": r.goal_met(),
            })).collect::<Vec<_>>(),
            "gateway": {
                "audit_events_written": self.audit_written,
                "audit_write_failures": self.audit_failed,
                "requests_api": self.requests_api,
                "requests_api_masked": self.requests_api_masked,
                "peak_rss_kib": self.gateway_peak_rss_kib,
                "log_tail": self.gateway_log_tail,
            },
            "nginx_error_log_tail": self.nginx_log,
        })
    }
}
