//! PostgreSQL data-path benchmark: pgbench **directly** against a TLS PostgreSQL versus
//! **through `tollgate serve`** (TLS on both legs, client certificate, audit recording on),
//! measured in the same run and printed as ratios against the direct baseline.
//!
//! This is a program, not a test: it asserts nothing and always exits 0 once it has measured
//! (non-zero only when it could not run). Run it with
//!
//! ```text
//! scripts/bench-pg                          # 3 rounds x 10 s per scenario and target
//! scripts/bench-pg --seconds 3 --rounds 1   # quick look while developing
//! scripts/bench-pg --json                   # the same results as one JSON object on stdout
//! scripts/bench-pg --pgbouncer              # also pgbouncer, as a reference proxy
//! ```
//!
//! or, after `cargo build --release -p tollgate --bins --examples`,
//! `target/release/examples/bench_pg [--rounds N] [--seconds S] [--scale K] [--json] [--pgbouncer]`.
//! It runs `tollgate` from next to itself (`target/release/tollgate`), or `--tollgate PATH`.
//!
//! Needs the PostgreSQL server binaries (as the integration tests do) and `pgbench`
//! (`which pgbench`; on Debian/Ubuntu `sudo apt-get install -y postgresql-client postgresql-contrib`,
//! on Debian 12 pgbench ships in `postgresql-client-15`).
//!
//! What it does:
//! 1. starts a throwaway TLS PostgreSQL (SCRAM) tuned for benchmarking and runs
//!    `pgbench -i -s 10` against it directly;
//! 2. makes a gateway PKI (CA, server certificate for localhost/127.0.0.1, client certificate
//!    `bench` in group `bench`), writes a config with one postgres resource (verify-full
//!    upstream, credentials from a password file, SQLite audit store) and starts
//!    `tollgate serve` with `RUST_LOG=warn`;
//! 3. for each round and scenario runs pgbench direct and through the gateway back to back
//!    (alternating which goes first), `-n -T S`;
//! 4. prints medians, ratios, added latency per query, the targets, the gateway's audit events,
//!    peak RSS and CPU time per 1000 queries (gateway, postgres, pgbench, from /proc).
//!
//! With `--recording-off` a second gateway with `server.record_commands = false` (session
//! open/close recorded, commands and results not) joins every round, and the report adds the
//! "recording on vs off" ratio: the cost of the audit trail itself. It makes the run 1.5x longer.
//!
//! With `--pgbouncer` an existing proxy measured on the same machine in the same run joins every
//! round as a reference: pgbouncer (`pgbouncer` in $PATH or /usr/sbin; Debian 12:
//! `sudo apt-get install -y pgbouncer`, 1.18) with its own config in a temporary directory and
//! a free port, set up like the gateway: TLS to the client with the gateway's server certificate
//! (pgbench verifies it), SCRAM from the client, verify-full to PostgreSQL as the cluster's user,
//! session pooling (one upstream per client, as tollgate; 1.18 has no `-M prepared` with
//! transaction pooling). Unlike the gateway it keeps its upstream connections between pgbench
//! runs. The report adds pgbouncer's tps, its ratio to direct, the tollgate/pgbouncer ratio and
//! its CPU per query. As root, pgbouncer (which refuses root) runs as PostgreSQL's OS user.
//!
//! With `--relay` a plain TCP relay joins every round: this program re-executed as a relay
//! (a thread per direction copying bytes, TCP_NODELAY, nothing else), with pgbench's TLS going
//! end to end through it to PostgreSQL. It terminates no TLS, parses nothing and records
//! nothing, so its ratio to direct is the floor that the two extra loopback hops alone set on
//! this machine: no proxy, however cheap, does better than that ratio.
//!
//! With `--idle N` a transaction-pooled gateway (`pool_size = 20`) is started after the rounds
//! and N TLS client sessions (client certificate; at most 200 handshakes at once) each run
//! `SELECT 1` and stay open; the report adds the gateway's RSS with all of them idle, per idle
//! client over the empty gateway's, and how many upstream connections served them.
//!
//! Everything (gateway, pgbench, cluster, temporary files) is cleaned up on return, on error
//! and on Ctrl-C/SIGTERM. On a small machine pgbench, postgres and the gateway share the
//! cores, so with 8 clients the ratio mostly reflects CPU per query; see the CPU columns.

#[path = "bench_support/mod.rs"]
mod support;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::*;
use tollgate_testsupport::{ClusterOptions, PgCluster};

#[derive(Parser, Debug)]
#[command(
    name = "bench_pg",
    about = "pgbench direct vs through tollgate, as ratios measured in the same run"
)]
struct Opts {
    /// Direct/gateway pairs per scenario; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Duration of each pgbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// pgbench scale factor for `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Seconds of unmeasured `-S` load against each target before the first round.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// The tollgate binary; default: `tollgate` next to this program's directory.
    #[arg(long, env = "TOLLGATE_BIN")]
    tollgate: Option<PathBuf>,
    /// Also measure a gateway with `record_commands = false` and report recording on vs off.
    #[arg(long)]
    recording_off: bool,
    /// Also measure a gateway with masking rules on the fetched column (a column rule and
    /// every content detector) and report masking on vs off.
    #[arg(long)]
    masking: bool,
    /// Also measure pgbouncer (TLS both legs, session pooling) as a reference proxy and report
    /// tollgate vs pgbouncer.
    #[arg(long)]
    pgbouncer: bool,
    /// Also measure a plain TCP relay (TLS end to end through it, no work): the floor that the
    /// extra loopback hops alone set, whatever the proxy.
    #[arg(long)]
    relay: bool,
    /// Give every gateway of the run guardrail rules (none of which refuses the benchmark's
    /// queries), so each query passes the policy engine: the guardrails' own cost.
    #[arg(long)]
    guardrails: bool,
    /// Another tollgate binary (e.g. a build of the previous commit) started with the same
    /// config and measured in the same rounds: an A/B of two builds in one run.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Also open this many TLS client sessions (client certificate, one query each, then idle)
    /// on a transaction-pooled copy of the resource with `pool_size` 20, and print the
    /// gateway's RSS and upstream connections (the issue's 10,000-idle-clients row).
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Also run the masking engine's own benchmark (`mask_bench`, next to this program: build
    /// it with `cargo build --release -p tollgate-pg --example mask_bench`) and report its
    /// realistic-mix row.
    #[arg(long)]
    mask_engine: bool,
    /// Every workload of issue 19's table in one invocation: `--pgbouncer --relay
    /// --mask-engine`, and `--idle 10000` unless `--idle` is given; ends with the table of
    /// targets, each with its same-run measurement.
    #[arg(long)]
    all: bool,
    /// Measure nothing: set up the database and the gateway, print how to reach both (pgbench
    /// connection strings, the gateway's pid for `perf record -p`), and wait for Ctrl-C.
    #[arg(long)]
    hold: bool,
}

/// The masking rules of `--masking`: pgbench -S fetches `abalance`, which a column rule
/// masks (to NULL: it is an integer), and every detector scans every column.
const MASKS: &str = r#"
[[resources.masks]]
columns = ["abalance"]
strategy = "redact"
[[resources.masks]]
detectors = ["credit_card", "email", "us_ssn", "iban", "phone", "ipv4", "ipv6", "jwt", "aws_key", "secret_token", "pem_private_key"]
strategy = "redact"
"#;

/// The rules of `--guardrails`: a deny, and a review for a group the benchmark client is not
/// in, so every query is classified and judged and none is refused.
const GUARDRAILS: &str = r#"
[[resources.rules]]
name = "no-drop"
statements = ["drop", "truncate"]
action = "deny"
[[resources.rules]]
name = "held-deletes"
statements = ["delete"]
groups = ["nobody-in-this-benchmark"]
action = "review"
"#;

const RESOURCE: &str = "benchdb";
const CLIENT: &str = "bench";
/// The name of the `--pgbouncer` target.
const PGBOUNCER: &str = "pgbouncer";
/// The name of the `--relay` target.
const RELAY: &str = "relay";
/// Set (to the upstream address) when this program runs as the `--relay` relay.
const RELAY_ENV: &str = "TOLLGATE_BENCH_RELAY_UPSTREAM";

struct Scenario {
    key: &'static str,
    label: &'static str,
    args: &'static [&'static str],
    /// Minimum gateway/direct throughput ratio from the issue.
    min_ratio: f64,
    /// Maximum added latency per query (µs) from the issue, for the one-client scenarios.
    max_added_us: Option<f64>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        key: "select_c8",
        label: "-S, 8 clients",
        args: &["-S", "-c", "8", "-j", "2"],
        min_ratio: 0.80,
        max_added_us: None,
    },
    Scenario {
        key: "select_prepared_c8",
        label: "-S -M prepared, 8 clients",
        args: &["-S", "-M", "prepared", "-c", "8", "-j", "2"],
        min_ratio: 0.75,
        max_added_us: None,
    },
    Scenario {
        key: "select_c1",
        label: "-S, 1 client",
        args: &["-S", "-c", "1", "-j", "1"],
        min_ratio: 0.80,
        max_added_us: Some(20.0),
    },
    Scenario {
        key: "select_prepared_c1",
        label: "-S -M prepared, 1 client",
        args: &["-S", "-M", "prepared", "-c", "1", "-j", "1"],
        min_ratio: 0.75,
        max_added_us: Some(20.0),
    },
    Scenario {
        key: "connect_per_transaction_c4",
        label: "-S -C (new connection per transaction), 4 clients",
        args: &["-S", "-C", "-c", "4", "-j", "2"],
        // Issue 19: reused upstream sessions make a new client connection cheaper than a direct one.
        min_ratio: 2.0,
        max_added_us: None,
    },
];

fn main() {
    catch_signals();
    if let Some(upstream) = std::env::var_os(RELAY_ENV) {
        // Re-executed by `Relay::start`: serve until killed.
        let upstream = upstream.to_string_lossy().into_owned();
        if let Err(e) = relay_serve(&upstream) {
            eprintln!("bench_pg relay: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    let mut opts = Opts::parse();
    if opts.all {
        opts.pgbouncer = true;
        opts.relay = true;
        opts.mask_engine = true;
        if opts.idle == 0 {
            opts.idle = ALL_IDLE_CLIENTS;
        }
    }
    // All cleanup lives in Drop impls of values owned by `run`, so it has happened by now.
    if let Err(e) = run(&opts) {
        eprintln!("bench_pg: {e:#}");
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
    let pgbench = which("pgbench").with_context(|| {
        "pgbench not found in $PATH; install it with: \
         sudo apt-get install -y postgresql-client postgresql-contrib"
    })?;
    let pgbouncer_bin = if opts.pgbouncer {
        let found = which("pgbouncer").or_else(|| {
            let sbin = PathBuf::from("/usr/sbin/pgbouncer");
            sbin.is_file().then_some(sbin)
        });
        Some(found.context(
            "--pgbouncer: pgbouncer not found in $PATH or /usr/sbin; install it with: \
             sudo apt-get install -y pgbouncer",
        )?)
    } else {
        None
    };
    let tollgate = tollgate_binary(opts.tollgate.as_deref())?;
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-bench-")
        .tempdir()?;
    let load_before = loadavg();

    // 1. The database, tuned for a read-only benchmark, and its pgbench tables.
    progress(format_args!("starting PostgreSQL ..."));
    let cluster = PgCluster::start(ClusterOptions {
        database: "bench".into(),
        user: "bench_owner".into(),
        extra_conf: BENCH_PG_CONF.map(String::from).to_vec(),
        ..ClusterOptions::default()
    })
    .context("start PostgreSQL")?;
    check_interrupted()?;
    let direct_conninfo = cluster.conninfo("verify-full");
    progress(format_args!("pgbench -i -s {} ...", opts.scale));
    let init = Pgbench::new(
        &pgbench,
        tmp.path(),
        &direct_conninfo,
        Some(&cluster.password),
    );
    init.run(&["-i", "-q", "-s", &opts.scale.to_string()])
        .context("pgbench -i")?;
    let pg_pid = cluster
        .postmaster_pid()
        .context("postmaster.pid is missing")?;

    // 2. The gateway PKI, config and process.
    let BenchPki { ca, server, client } = bench_pki(&tmp.path().join("pki"), CLIENT)?;
    let password_file = tmp.path().join("upstream.password");
    fs::write(&password_file, &cluster.password)?;
    let rules = if opts.guardrails { GUARDRAILS } else { "" };
    let gateway_config = |pg_listen: u16, admin_listen: u16, extra: &str, masks: &str| {
        format!(
            r#"[server]
postgres_listen = "127.0.0.1:{pg_listen}"
admin_listen = "127.0.0.1:{admin_listen}"
{extra}
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "required"
store = "sqlite://audit.db"

[[resources]]
name = "{RESOURCE}"
kind = "postgres"
upstream = "127.0.0.1:{up_port}"
database = "{db}"
allow_groups = ["{CLIENT}"]
# Authenticated upstream sessions are reused (what `-C` measures; pgbouncer pools too).
pool_mode = "session"
[resources.tls]
mode = "verify-full"
ca = "{up_ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "{password_file}"
{masks}
{rules}
"#,
            cert = server.cert.display(),
            key = server.key.display(),
            ca = ca.display(),
            up_port = cluster.port,
            db = cluster.database,
            up_ca = cluster.ca_cert.display(),
            user = cluster.user,
            password_file = password_file.display(),
        )
    };
    let gateway_conninfo = |pg_listen: u16| {
        format!(
            "host=localhost port={pg_listen} user={CLIENT} dbname={RESOURCE} sslmode=verify-full \
             sslrootcert={} sslcert={} sslkey={}",
            ca.display(),
            client.cert.display(),
            client.key.display()
        )
    };
    let pg_listen = tollgate_testsupport::free_port();
    let admin_listen = tollgate_testsupport::free_port();
    let config_path = tmp.path().join("tollgate.toml");
    fs::write(
        &config_path,
        gateway_config(pg_listen, admin_listen, "", ""),
    )?;
    progress(format_args!("starting {} serve ...", tollgate.display()));
    let gateway = Gateway::start(&tollgate, &config_path, tmp.path(), admin_listen, &[])?;
    let gateway_conninfo_on = gateway_conninfo(pg_listen);
    // The baseline without command recording, in its own directory (config, store, log).
    let norec = if opts.recording_off {
        let dir = tmp.path().join("norec");
        fs::create_dir_all(&dir)?;
        let (pg, admin) = (
            tollgate_testsupport::free_port(),
            tollgate_testsupport::free_port(),
        );
        let path = dir.join("tollgate.toml");
        fs::write(
            &path,
            gateway_config(pg, admin, "record_commands = false", ""),
        )?;
        progress(format_args!(
            "starting the gateway with record_commands = false ..."
        ));
        Some((
            Gateway::start(&tollgate, &path, &dir, admin, &[])?,
            gateway_conninfo(pg),
        ))
    } else {
        None
    };

    // The same config served by another build (`--baseline`), in its own directory.
    let baseline = match &opts.baseline {
        Some(bin) => {
            let dir = tmp.path().join("baseline");
            fs::create_dir_all(&dir)?;
            let (pg, admin) = (
                tollgate_testsupport::free_port(),
                tollgate_testsupport::free_port(),
            );
            let path = dir.join("tollgate.toml");
            fs::write(&path, gateway_config(pg, admin, "", ""))?;
            progress(format_args!(
                "starting the baseline {} serve ...",
                bin.display()
            ));
            Some((
                Gateway::start(bin, &path, &dir, admin, &[])?,
                gateway_conninfo(pg),
            ))
        }
        None => None,
    };

    // The same gateway with masking rules on the fetched column, in its own directory.
    let masked = if opts.masking {
        let dir = tmp.path().join("masked");
        fs::create_dir_all(&dir)?;
        let (pg, admin) = (
            tollgate_testsupport::free_port(),
            tollgate_testsupport::free_port(),
        );
        let path = dir.join("tollgate.toml");
        fs::write(&path, gateway_config(pg, admin, "", MASKS))?;
        progress(format_args!("starting the gateway with masking rules ..."));
        Some((
            Gateway::start(&tollgate, &path, &dir, admin, &[])?,
            gateway_conninfo(pg),
        ))
    } else {
        None
    };

    // The reference proxy, with the gateway's server certificate towards pgbench.
    let pgbouncer = match &pgbouncer_bin {
        Some(bin) => {
            progress(format_args!("starting {} ...", bin.display()));
            let pgb = Pgbouncer::start(bin, &cluster, &server.cert, &server.key)?;
            let conninfo = format!(
                "host=localhost port={} user={} dbname={} sslmode=verify-full sslrootcert={}",
                pgb.port,
                cluster.user,
                cluster.database,
                ca.display()
            );
            Some((pgb, conninfo))
        }
        None => None,
    };

    let relay = if opts.relay {
        progress(format_args!("starting the TCP relay ..."));
        let relay = Relay::start(&format!("127.0.0.1:{}", cluster.port))?;
        // The cluster's certificate names 127.0.0.1: pgbench verifies it through the relay.
        let conninfo = direct_conninfo.replacen(
            &format!("port={}", cluster.port),
            &format!("port={}", relay.port),
            1,
        );
        Some((relay, conninfo))
    } else {
        None
    };

    if opts.hold {
        let env = format!("PGPASSWORD={}", cluster.password);
        println!("direct:  {env} pgbench -n -S -T 10 -c 8 \"{direct_conninfo}\"");
        println!("gateway: pgbench -n -S -T 10 -c 8 \"{gateway_conninfo_on}\"");
        println!(
            "gateway pid {} (perf record -g -p {}); Ctrl-C ends",
            gateway.pid(),
            gateway.pid()
        );
        if let Some((pgb, conninfo)) = &pgbouncer {
            println!(
                "pgbouncer (pid {}): {env} pgbench -n -S -T 10 -c 8 \"{conninfo}\"",
                pgb.pid()
            );
        }
        if let Some((r, conninfo)) = &relay {
            println!(
                "relay (pid {}): {env} pgbench -n -S -T 10 -c 8 \"{conninfo}\"",
                r.pid()
            );
        }
        loop {
            std::thread::sleep(Duration::from_millis(200));
            check_interrupted()?;
        }
    }

    let mut targets = vec![
        Target {
            name: "direct",
            bench: Pgbench::new(
                &pgbench,
                tmp.path(),
                &direct_conninfo,
                Some(&cluster.password),
            ),
            probe: CpuProbe {
                proxy: gateway.pid(),
                postmaster: pg_pid,
            },
        },
        Target {
            name: "gateway",
            bench: Pgbench::new(&pgbench, tmp.path(), &gateway_conninfo_on, None),
            probe: CpuProbe {
                proxy: gateway.pid(),
                postmaster: pg_pid,
            },
        },
    ];
    // The optional targets: (name, proxy pid, conninfo, password for a target that is no gateway).
    let optional = [
        norec
            .as_ref()
            .map(|(gw, c)| ("gw-norec", gw.pid(), c, None)),
        masked
            .as_ref()
            .map(|(gw, c)| ("gw-masked", gw.pid(), c, None)),
        baseline
            .as_ref()
            .map(|(gw, c)| ("baseline", gw.pid(), c, None)),
        pgbouncer
            .as_ref()
            .map(|(p, c)| (PGBOUNCER, p.pid(), c, Some(cluster.password.as_str()))),
        relay
            .as_ref()
            .map(|(r, c)| (RELAY, r.pid(), c, Some(cluster.password.as_str()))),
    ];
    for (name, proxy, conninfo, password) in optional.into_iter().flatten() {
        targets.push(Target {
            name,
            bench: Pgbench::new(&pgbench, tmp.path(), conninfo, password),
            probe: CpuProbe {
                proxy,
                postmaster: pg_pid,
            },
        });
    }
    let index_of = |name: &str| targets.iter().position(|t| t.name == name);
    let baseline_at = index_of("baseline");
    let (norec_at, masked_at, pgbouncer_at, relay_at) = (
        index_of("gw-norec"),
        index_of("gw-masked"),
        index_of(PGBOUNCER),
        index_of(RELAY),
    );

    // 3. Warm-up (caches, first connections), then the interleaved rounds.
    let mut gateway_queries: u64 = 0;
    if opts.warmup > 0 {
        for t in &targets {
            progress(format_args!("warm-up: {} for {} s", t.name, opts.warmup));
            let s = t
                .bench
                .measure(&["-S", "-c", "2", "-j", "2"], opts.warmup, &t.probe)?;
            if t.name == "gateway" {
                gateway_queries += s.transactions;
            }
        }
    }
    // samples[scenario][target] = one Sample per round
    let mut samples: Vec<Vec<Vec<Sample>>> = SCENARIOS
        .iter()
        .map(|_| targets.iter().map(|_| vec![]).collect())
        .collect();
    for round in 0..opts.rounds {
        for (i, sc) in SCENARIOS.iter().enumerate() {
            // Alternate the order so no target always runs on the warmer/cooler side.
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for ti in order {
                let t = &targets[ti];
                let s = t
                    .bench
                    .measure(sc.args, opts.seconds, &t.probe)
                    .with_context(|| format!("pgbench {} {}", sc.label, t.name))?;
                let proxy = match t.name {
                    PGBOUNCER => "pgb",
                    RELAY => "relay",
                    _ => "gw",
                };
                progress(format_args!(
                    "round {}/{} {:<26} {:<7} tps {:>9.1}  latency {:>7.3} ms  cpu/1k q: {proxy} {:>6.1} ms, pg {:>6.1} ms, pgbench {:>6.1} ms",
                    round + 1,
                    opts.rounds,
                    sc.label,
                    t.name,
                    s.tps,
                    s.latency_ms,
                    s.per_1k(s.proxy_cpu),
                    s.per_1k(s.postgres_cpu),
                    s.per_1k(s.pgbench_cpu),
                ));
                if ti == 1 {
                    gateway_queries += s.transactions;
                }
                samples[i][ti].push(s);
            }
        }
    }

    // 4. Gateway-side numbers, then the report.
    std::thread::sleep(Duration::from_millis(500)); // let the recorder flush its last batch
    if let Some((gw, _)) = &masked {
        // Proof that the masked runs masked: values masked by the column rule.
        let m = gw.metrics().unwrap_or_default();
        let series =
            format!("tollgate_masked_values_total{{resource=\"{RESOURCE}\",by=\"column\"}}");
        progress(format_args!(
            "masked gateway: {} values masked by the column rule",
            opt_num(metric(&m, &series))
        ));
    }
    let metrics = gateway.metrics().unwrap_or_default();
    let audit_written = metric(&metrics, "tollgate_audit_events_written_total");
    let audit_failed = metric(&metrics, "tollgate_audit_write_failures_total");
    let audit_queued = metric(&metrics, "tollgate_audit_queue_depth");
    let peak_rss_kib = proc_status_kib(gateway.pid(), "VmHWM");
    let gateway_cpu_total = process_cpu_seconds(gateway.pid());
    let gateway_threads = cpu_by_thread_name(gateway.pid());
    let gateway_log_tail = gateway.log_tail(10);
    let pgbouncer_summary = pgbouncer.as_ref().map(|(pgb, _)| PgbouncerSummary {
        version: pgb.version.clone(),
        peak_rss_kib: proc_status_kib(pgb.pid(), "VmHWM"),
        cpu_total: process_cpu_seconds(pgb.pid()),
        log_problems: pgb.log_problems(),
    });

    let report = Report {
        opts,
        scenarios: SCENARIOS
            .iter()
            .zip(&samples)
            .map(|(sc, s)| {
                let mut row = Row::new(sc, &s[0], &s[1], norec_at.map(|i| s[i].as_slice()));
                row.masked = masked_at.map(|i| Side::new(&s[i]));
                row.pgbouncer = pgbouncer_at.map(|i| Side::new(&s[i]));
                row.relay = relay_at.map(|i| Side::new(&s[i]));
                row.baseline = baseline_at.map(|i| Side::new(&s[i]));
                row
            })
            .collect(),
        audit_written,
        audit_failed,
        audit_queued,
        gateway_queries,
        peak_rss_kib,
        gateway_cpu_total,
        gateway_threads,
        load_before,
        load_after: loadavg(),
        pg_version: cluster
            .psql("SHOW server_version")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        gateway_log_tail,
        pgbouncer: pgbouncer_summary,
    };
    let idle = if opts.idle > 0 {
        let dir = tmp.path().join("idle");
        fs::create_dir_all(&dir)?;
        let (pg, admin) = (
            tollgate_testsupport::free_port(),
            tollgate_testsupport::free_port(),
        );
        let path = dir.join("tollgate.toml");
        let config = gateway_config(pg, admin, "handshake_timeout = \"300s\"", "").replace(
            "pool_mode = \"session\"",
            &format!(
                "pool_mode = \"transaction\"\npool_size = {IDLE_POOL_SIZE}\npool_timeout = \"300s\""
            ),
        );
        fs::write(&path, config)?;
        progress(format_args!(
            "starting a transaction-pooled gateway for {} idle clients ...",
            opts.idle
        ));
        let gw = Gateway::start(&tollgate, &path, &dir, admin, &[])?;
        let tls = IdleTls {
            ca: ca.clone(),
            cert: client.cert.clone(),
            key: client.key.clone(),
        };
        Some(idle_clients(opts.idle, pg, &tls, &gw, &cluster)?)
    } else {
        None
    };
    let mask_engine = if opts.mask_engine {
        progress(format_args!(
            "running mask_bench (the masking engine alone) ..."
        ));
        Some(mask_engine_mbps()?)
    } else {
        None
    };
    let goals = report.goals(idle.as_ref().map(|i| (opts.idle, i)), mask_engine);
    if opts.json {
        let mut json = report.to_json();
        json["idle"] = idle.as_ref().map_or(Value::Null, |i| i.json(opts.idle));
        json["mask_engine_mb_per_s"] = json!(mask_engine);
        json["targets"] = Value::Array(goals.iter().map(Goal::json).collect());
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        report.print_table();
        if let Some(idle) = &idle {
            println!("\n{}", idle.line(opts.idle));
        }
        if let Some(mbps) = mask_engine {
            println!("\nmasking engine (mask_bench, realistic mix, all detectors, 1 thread): {mbps:.0} MB/s per core");
        }
        print_goals(&goals);
    }
    // Explicit order: proxies first (they hold upstream connections), then the cluster, then files.
    drop(targets);
    drop(relay);
    drop(pgbouncer);
    drop(masked);
    drop(baseline);
    drop(norec);
    drop(gateway);
    drop(cluster);
    drop(tmp);
    Ok(())
}

/// Idle client sessions of `--all` (the issue's row).
const ALL_IDLE_CLIENTS: usize = 10_000;

/// `pool_size` of the `--idle` gateway (the issue's target: at most 20 upstream connections).
const IDLE_POOL_SIZE: usize = 20;

struct IdleTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// What `--idle` measured.
struct IdleReport {
    rss_before_kib: u64,
    rss_idle_kib: u64,
    /// The gateway's pooled upstream connections (its metrics), and the cluster's count of
    /// new connections while the clients were open.
    backends: usize,
    upstream_delta: usize,
    connect_secs: f64,
}

impl IdleReport {
    fn json(&self, n: usize) -> Value {
        json!({
            "clients": n,
            "pool_size": IDLE_POOL_SIZE,
            "rss_kib": self.rss_idle_kib,
            "rss_empty_kib": self.rss_before_kib,
            "upstream_connections": self.backends,
            "new_server_connections": self.upstream_delta,
            "connect_seconds": self.connect_secs,
        })
    }

    fn line(&self, n: usize) -> String {
        let per_client = (self.rss_idle_kib.saturating_sub(self.rss_before_kib)) as f64 / n as f64;
        format!(
            "{n} idle TLS client sessions, pool_mode = \"transaction\", pool_size = {IDLE_POOL_SIZE}: \
             gateway RSS {:.1} MiB (empty gateway {:.1} MiB; {:.1} KiB per idle client), \
             {} upstream connections ({} more on the server), all connected and queried in {:.1} s",
            self.rss_idle_kib as f64 / 1024.0,
            self.rss_before_kib as f64 / 1024.0,
            per_client,
            self.backends,
            self.upstream_delta,
            self.connect_secs
        )
    }
}

/// Opens `n` TLS client sessions to the gateway on `port` (at most 200 handshakes at once),
/// runs one query on each, lets them sit idle, and reads the gateway's RSS and the cluster's
/// count of its connections while they are all open.
fn idle_clients(
    n: usize,
    port: u16,
    tls: &IdleTls,
    gw: &Gateway,
    cluster: &PgCluster,
) -> Result<IdleReport> {
    use futures_util::{stream, StreamExt, TryStreamExt};
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in tollgate_tls::load_certs(&tls.ca)? {
        roots.add(c)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(tollgate_tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tollgate_tls::load_certs(&tls.cert)?,
            rustls_pki_types::PrivateKeyDer::from_pem_file(&tls.key)?,
        )?;
    let conninfo =
        format!("host=localhost port={port} user={CLIENT} dbname={RESOURCE} sslmode=require");
    let rss_before_kib = proc_status_kib(gw.pid(), "VmRSS").unwrap_or(0);
    let backends_before = cluster_backends(cluster)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let clients: Vec<tokio_postgres::Client> = rt.block_on(
        stream::iter(0..n)
            .map(|i| {
                let (conninfo, config) = (conninfo.clone(), config.clone());
                async move {
                    let (client, conn) = tokio_postgres::connect(
                        &conninfo,
                        tokio_postgres_rustls::MakeRustlsConnect::new(config),
                    )
                    .await
                    .with_context(|| format!("idle client {i}: connect"))?;
                    tokio::spawn(conn);
                    client
                        .simple_query("SELECT 1")
                        .await
                        .with_context(|| format!("idle client {i}: SELECT 1"))?;
                    anyhow::Ok(client)
                }
            })
            .buffer_unordered(200)
            .try_collect(),
    )?;
    let connect_secs = started.elapsed().as_secs_f64();
    progress(format_args!(
        "{} clients connected in {connect_secs:.1} s; letting them idle ...",
        clients.len()
    ));
    std::thread::sleep(Duration::from_secs(3));
    let rss_idle_kib = proc_status_kib(gw.pid(), "VmRSS").unwrap_or(0);
    // The run's other gateways keep their own pooled connections: count this one's only.
    let metrics = gw.metrics().unwrap_or_default();
    let pooled = |state: &str| {
        metric(
            &metrics,
            &format!("tollgate_pool_connections{{resource=\"{RESOURCE}\",state=\"{state}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let backends = (pooled("idle") + pooled("active")) as usize;
    let upstream_delta = cluster_backends(cluster)?.saturating_sub(backends_before);
    drop(clients);
    drop(rt);
    Ok(IdleReport {
        rss_before_kib,
        rss_idle_kib,
        backends,
        upstream_delta,
        connect_secs,
    })
}

/// Client connections of the cluster's user (the gateways' upstream connections).
fn cluster_backends(cluster: &PgCluster) -> Result<usize> {
    Ok(cluster
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND backend_type = 'client backend'",
            cluster.user
        ))?
        .trim()
        .parse()?)
}

/// The masking engine's own benchmark: `mask_bench` (next to this program) with a 16 MB set
/// and 7 iterations; its realistic-mix, all-detectors median in MB/s per core.
fn mask_engine_mbps() -> Result<f64> {
    let bin = std::env::current_exe()?.with_file_name("mask_bench");
    if !bin.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p tollgate-pg --example mask_bench`",
            bin.display()
        );
    }
    let out = std::process::Command::new(&bin)
        .args(["16", "7"])
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("realistic mix, all detectors")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no 'realistic mix, all detectors' line in:\n{text}"))
}

/// One row of issue 19's table: what was measured in this run against its target.
struct Goal {
    workload: String,
    measured: String,
    target: String,
    /// `None` when the run lacks what the row needs (say, no `--pgbouncer`).
    met: Option<bool>,
}

impl Goal {
    fn json(&self) -> Value {
        json!({
            "workload": self.workload,
            "measured": self.measured,
            "target": self.target,
            "met": self.met,
        })
    }
}

fn print_goals(goals: &[Goal]) {
    println!();
    println!("issue 19 targets, each against what this run measured (medians, same-run ratios):");
    println!(
        "{:<52} {:<52} {:<30} {}",
        "workload", "measured", "target", ""
    );
    for t in goals {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        println!(
            "{:<52} {:<52} {:<30} {verdict}",
            t.workload, t.measured, t.target
        );
    }
}

impl Report<'_> {
    fn row(&self, key: &str) -> Option<&Row> {
        self.scenarios.iter().find(|r| r.sc.key == key)
    }

    /// Issue 19's table, row by row.
    fn goals(&self, idle: Option<(usize, &IdleReport)>, mask_mbps: Option<f64>) -> Vec<Goal> {
        let missing = |workload: &str, target: &str, why: &str| Goal {
            workload: workload.into(),
            measured: why.into(),
            target: target.into(),
            met: None,
        };
        let mut out = Vec::new();
        for (key, workload) in [
            ("select_c8", "pgbench -S, 8 clients, audit on"),
            (
                "select_prepared_c8",
                "pgbench -S -M prepared, 8 clients, audit on",
            ),
        ] {
            let target = ">= 1.00x PgBouncer";
            match self.row(key).and_then(|r| Some((r, r.pgbouncer.as_ref()?))) {
                Some((r, pgb)) => {
                    let x = r.gateway.tps / pgb.tps;
                    out.push(Goal {
                        workload: workload.into(),
                        measured: format!(
                            "{x:.2}x PgBouncer ({:.0} vs {:.0} tps)",
                            r.gateway.tps, pgb.tps
                        ),
                        target: target.into(),
                        met: Some(x >= 1.0),
                    });
                }
                None => out.push(missing(workload, target, "needs --pgbouncer")),
            }
            if key == "select_c8" {
                let target = ">= 0.90x the TCP relay";
                match self.row(key).and_then(|r| Some((r, r.relay.as_ref()?))) {
                    Some((r, relay)) => {
                        let x = r.gateway.tps / relay.tps;
                        out.push(Goal {
                            workload: workload.into(),
                            measured: format!("{x:.2}x the relay ({:.0} tps)", relay.tps),
                            target: target.into(),
                            met: Some(x >= 0.90),
                        });
                    }
                    None => out.push(missing(workload, target, "needs --relay")),
                }
            }
        }
        for (key, workload) in [
            ("select_c1", "1 client (-S), added latency"),
            (
                "select_prepared_c1",
                "1 client (-S -M prepared), added latency",
            ),
        ] {
            let target = "<= PgBouncer's";
            match self
                .row(key)
                .and_then(|r| Some((r, r.vs_reference(r.pgbouncer.as_ref())?)))
            {
                Some((r, (_, _, pgb_added))) => out.push(Goal {
                    workload: workload.into(),
                    measured: format!("+{:.0} µs (PgBouncer +{pgb_added:.0} µs)", r.added_us),
                    target: target.into(),
                    met: Some(r.added_us <= pgb_added),
                }),
                None => out.push(missing(workload, target, "needs --pgbouncer")),
            }
        }
        let workload = "gateway CPU per query, audit on (-S, 8 clients)";
        let target = "<= PgBouncer's";
        match self
            .row("select_c8")
            .and_then(|r| Some((r, r.pgbouncer.as_ref()?)))
        {
            Some((r, pgb)) => out.push(Goal {
                workload: workload.into(),
                measured: format!(
                    "{:.0} µs (PgBouncer {:.0} µs)",
                    r.gateway.proxy_cpu_1k, pgb.proxy_cpu_1k
                ),
                target: target.into(),
                met: Some(r.gateway.proxy_cpu_1k <= pgb.proxy_cpu_1k),
            }),
            None => out.push(missing(workload, target, "needs --pgbouncer")),
        }
        if let Some(r) = self.row("connect_per_transaction_c4") {
            let pgb = r
                .pgbouncer
                .as_ref()
                .map(|p| format!(" (PgBouncer {:.2}x)", p.tps / r.direct.tps))
                .unwrap_or_default();
            out.push(Goal {
                workload: "new connection per transaction (-S -C, 4 clients)".into(),
                measured: format!("{:.2}x direct{pgb}", r.ratio),
                target: ">= 2x direct".into(),
                met: Some(r.ratio >= 2.0),
            });
        }
        let workload = "10,000 idle TLS client connections";
        let target = "< 1 GiB gateway RSS, <= 20 backends";
        match idle {
            Some((n, i)) => out.push(Goal {
                workload: workload.into(),
                measured: format!(
                    "{n} clients: {:.0} MiB RSS, {} backends",
                    i.rss_idle_kib as f64 / 1024.0,
                    i.backends
                ),
                target: target.into(),
                met: Some(
                    n >= ALL_IDLE_CLIENTS
                        && i.rss_idle_kib < 1 << 20
                        && i.backends <= IDLE_POOL_SIZE,
                ),
            }),
            None => out.push(missing(workload, target, "needs --idle 10000")),
        }
        let workload = "masking engine, realistic mix, all detectors";
        let target = ">= 500 MB/s per core";
        match mask_mbps {
            Some(v) => out.push(Goal {
                workload: workload.into(),
                measured: format!("{v:.0} MB/s per core"),
                target: target.into(),
                met: Some(v >= 500.0),
            }),
            None => out.push(missing(workload, target, "needs --mask-engine")),
        }
        out
    }
}

fn progress(msg: std::fmt::Arguments) {
    eprintln!("bench_pg: {msg}");
}

struct Target<'a> {
    name: &'static str,
    bench: Pgbench<'a>,
    /// CPU readings around each run (the proxy is the one this target goes through).
    probe: CpuProbe,
}

/// What one pgbench run measured.
#[derive(Clone, Debug)]
struct Sample {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    /// CPU seconds spent during the run by each party.
    proxy_cpu: f64,
    postgres_cpu: f64,
    pgbench_cpu: f64,
    /// Context switches of all proxy threads during the run.
    proxy_switches: f64,
}

impl Sample {
    /// CPU milliseconds per 1000 transactions (= µs per query for the one-statement -S script).
    fn per_1k(&self, cpu_seconds: f64) -> f64 {
        if self.transactions == 0 {
            return f64::NAN;
        }
        cpu_seconds * 1e6 / self.transactions as f64
    }
}

impl Pgbench<'_> {
    /// A timed, read-only run (`-n`: no vacuum of the pgbench tables before it).
    fn measure(&self, args: &[&str], seconds: u64, probe: &CpuProbe) -> Result<Sample> {
        let secs = seconds.to_string();
        let mut all = vec!["-n", "-T", &secs];
        all.extend_from_slice(args);
        let before = probe.read();
        let stdout = self.run(&all)?;
        // Backends exit just after pgbench does; give the postmaster a moment to reap them
        // so their CPU time lands in its cutime.
        std::thread::sleep(Duration::from_millis(150));
        let after = probe.read();
        let tps = parse_after(&stdout, "tps = ").context("no `tps = ` in pgbench output")?;
        let latency_ms = parse_after(&stdout, "latency average = ")
            .context("no `latency average = ` in pgbench output")?;
        let transactions = parse_after(&stdout, "number of transactions actually processed: ")
            .context("no transaction count in pgbench output")? as u64;
        let failed = parse_after(&stdout, "number of failed transactions: ").unwrap_or(0.0);
        if failed > 0.0 {
            bail!("{failed} transactions failed:\n{stdout}");
        }
        Ok(Sample {
            tps,
            latency_ms,
            transactions,
            proxy_cpu: after.proxy - before.proxy,
            postgres_cpu: after.postgres - before.postgres,
            pgbench_cpu: after.children - before.children,
            proxy_switches: after.proxy_switches - before.proxy_switches,
        })
    }
}

/// CPU time of the proxy (the gateway or pgbouncer; for the direct target the idle gateway),
/// of PostgreSQL (postmaster, its live children and the reaped ones), and of our own reaped
/// children (pgbench).
struct CpuProbe {
    proxy: u32,
    postmaster: i32,
}

struct CpuReading {
    proxy: f64,
    proxy_switches: f64,
    postgres: f64,
    children: f64,
}

impl CpuProbe {
    fn read(&self) -> CpuReading {
        CpuReading {
            proxy: process_cpu_seconds(self.proxy).unwrap_or(0.0),
            proxy_switches: context_switches(self.proxy),
            postgres: postgres_cpu_seconds(self.postmaster as u32),
            children: own_children_cpu(),
        }
    }
}

/// Voluntary plus involuntary context switches, summed over the live threads of `pid`.
fn context_switches(pid: u32) -> f64 {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    tasks
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|l| {
                    let v = l
                        .strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))?;
                    v.trim().parse::<f64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// CPU seconds of the live threads of `pid`, summed by thread name, largest first.
fn cpu_by_thread_name(pid: u32) -> Vec<(String, usize, f64)> {
    let mut by_name: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
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
            .map(|(n, _)| n.to_owned())
            .unwrap_or_default();
        if let Some(stat) = parse_stat(&text) {
            let e = by_name.entry(name).or_default();
            e.0 += 1;
            e.1 += stat.utime + stat.stime;
        }
    }
    let mut v: Vec<_> = by_name.into_iter().map(|(n, (c, s))| (n, c, s)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

fn own_children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The `--pgbouncer` reference proxy, in the foreground with its own config; killed on drop.
struct Pgbouncer {
    child: Child,
    port: u16,
    /// Its stderr, where a foreground pgbouncer logs.
    log_path: PathBuf,
    /// The first line of `pgbouncer --version`, e.g. "PgBouncer 1.18.0".
    version: String,
    /// Config, user list and certificate copies; removed once the process is gone.
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    /// Starts `bin` on a free port for `cluster.database`: `cert`/`key` to clients (TLS
    /// required, SCRAM with the cluster user's password), verify-full against the cluster's CA
    /// to `localhost` (the name in the cluster's certificate), one upstream per client.
    fn start(bin: &Path, cluster: &PgCluster, cert: &Path, key: &Path) -> Result<Pgbouncer> {
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| format!("run {} --version", bin.display()))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("pgbouncer")
            .to_owned();
        // pgbouncer refuses to run as root: then it runs as PostgreSQL's OS user (the owner of
        // the data directory), from a directory under /tmp that it owns (root's $TMPDIR may be
        // private). Not through runuser: the pid we probe and kill must be pgbouncer's own.
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            let meta =
                fs::metadata(cluster.data_dir()).context("stat the PostgreSQL data directory")?;
            Some((meta.uid(), meta.gid()))
        } else {
            None
        };
        let base = match run_as {
            Some(_) => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("tollgate-bench-pgbouncer-")
            .tempdir_in(&base)?;
        let give = |path: &Path| -> Result<()> {
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", path.display()))?;
            }
            Ok(())
        };
        give(dir.path())?;
        let write = |name: &str, contents: &[u8]| -> Result<PathBuf> {
            let path = dir.path().join(name);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(contents))
                .with_context(|| format!("write {}", path.display()))?;
            give(&path)?;
            Ok(path)
        };
        let cert = write("server.crt", &fs::read(cert)?)?;
        let key = write("server.key", &fs::read(key)?)?;
        let upstream_ca = write("upstream-ca.crt", &fs::read(&cluster.ca_cert)?)?;
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let userlist = write(
            "userlist.txt",
            format!("{} {}\n", quote(&cluster.user), quote(&cluster.password)).as_bytes(),
        )?;
        let port = tollgate_testsupport::free_port();
        let config = format!(
            r#"[databases]
{db} = host=localhost port={up_port} dbname={db} user={user}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {userlist}
pool_mode = session
max_client_conn = 100
default_pool_size = 20
client_tls_sslmode = require
client_tls_cert_file = {cert}
client_tls_key_file = {key}
server_tls_sslmode = verify-full
server_tls_ca_file = {upstream_ca}
log_connections = 0
log_disconnections = 0
"#,
            db = cluster.database,
            up_port = cluster.port,
            user = cluster.user,
            userlist = userlist.display(),
            cert = cert.display(),
            key = key.display(),
            upstream_ca = upstream_ca.display(),
        );
        let config = write("pgbouncer.ini", config.as_bytes())?;
        let log_path = dir.path().join("pgbouncer.log");
        let mut cmd = Command::new(bin);
        cmd.arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path)?);
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        // die_with_parent's prctl runs after the uid change, which would otherwise clear it.
        let child = die_with_parent(&mut cmd)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut pgb = Pgbouncer {
            child,
            port,
            log_path,
            version,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            check_interrupted()?;
            if let Some(status) = pgb.child.try_wait()? {
                bail!(
                    "pgbouncer exited early ({status}):\n{}",
                    file_tail(&pgb.log_path, 40, |_| true)
                );
            }
            let addr = (Ipv4Addr::LOCALHOST, port).into();
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return Ok(pgb);
            }
            if Instant::now() > deadline {
                bail!(
                    "pgbouncer did not listen on port {port}:\n{}",
                    file_tail(&pgb.log_path, 40, |_| true)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its last warnings and errors (it logs every start-up step and stats at LOG level).
    fn log_problems(&self) -> Vec<String> {
        let problem = |l: &str| {
            [" WARNING ", " ERROR ", " FATAL "]
                .iter()
                .any(|w| l.contains(w))
        };
        let tail = file_tail(&self.log_path, 10, problem);
        tail.lines().map(str::to_owned).collect()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `--relay` floor: this program re-executed with `RELAY_ENV` set, relaying bytes between
/// pgbench and PostgreSQL; killed on drop.
struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(upstream: &str) -> Result<Relay> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(RELAY_ENV, upstream)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = die_with_parent(&mut cmd)
            .spawn()
            .context("spawn the relay")?;
        // Its first line is the port it listens on.
        let mut line = String::new();
        let mut out = child.stdout.take().context("the relay's stdout")?;
        let mut byte = [0u8; 1];
        while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let mut relay = Relay { child, port: 0 };
        relay.port = line
            .trim()
            .parse()
            .with_context(|| format!("the relay did not report its port (got {line:?})"))?;
        Ok(relay)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay process: listens on a free loopback port (printed on stdout), and for each client
/// connects to `upstream` and copies bytes both ways, one blocking thread per direction: per
/// message one read and one write, the least a user-space relay can do.
fn relay_serve(upstream: &str) -> Result<()> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    for client in listener.incoming() {
        let client = client?;
        let server = match TcpStream::connect(upstream) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bench_pg relay: connect {upstream}: {e}");
                continue;
            }
        };
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        for (mut from, mut to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    }
    Ok(())
}

struct Side {
    tps: f64,
    latency_ms: f64,
    tps_all: Vec<f64>,
    latency_all: Vec<f64>,
    /// Median CPU ms per 1000 queries.
    proxy_cpu_1k: f64,
    postgres_cpu_1k: f64,
    pgbench_cpu_1k: f64,
    /// Median proxy context switches per query.
    proxy_switches_per_query: f64,
}

impl Side {
    fn new(samples: &[Sample]) -> Side {
        let col = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        Side {
            tps: col(&|s| s.tps),
            latency_ms: col(&|s| s.latency_ms),
            tps_all: samples.iter().map(|s| s.tps).collect(),
            latency_all: samples.iter().map(|s| s.latency_ms).collect(),
            proxy_cpu_1k: col(&|s| s.per_1k(s.proxy_cpu)),
            postgres_cpu_1k: col(&|s| s.per_1k(s.postgres_cpu)),
            pgbench_cpu_1k: col(&|s| s.per_1k(s.pgbench_cpu)),
            proxy_switches_per_query: col(&|s| s.proxy_switches / s.transactions.max(1) as f64),
        }
    }

    /// `proxy` names the proxy's keys: "gateway" or "pgbouncer".
    fn json(&self, proxy: &str) -> Value {
        json!({
            "tps_median": self.tps,
            "latency_ms_median": self.latency_ms,
            "tps_rounds": self.tps_all,
            "latency_ms_rounds": self.latency_all,
            "cpu_ms_per_1000_queries": {
                proxy: self.proxy_cpu_1k,
                "postgres": self.postgres_cpu_1k,
                "pgbench": self.pgbench_cpu_1k,
            },
            format!("{proxy}_context_switches_per_query"): self.proxy_switches_per_query,
        })
    }
}

struct Row {
    sc: &'static Scenario,
    direct: Side,
    gateway: Side,
    ratio: f64,
    added_us: f64,
    /// The gateway with `record_commands = false` (`--recording-off`).
    norec: Option<Side>,
    /// The gateway with masking rules on the fetched column (`--masking`).
    masked: Option<Side>,
    /// pgbouncer, the reference proxy (`--pgbouncer`).
    pgbouncer: Option<Side>,
    /// The plain TCP relay (`--relay`): the floor of any proxy.
    relay: Option<Side>,
    /// Another build of tollgate with the same config (`--baseline`).
    baseline: Option<Side>,
}

impl Row {
    fn new(
        sc: &'static Scenario,
        direct: &[Sample],
        gateway: &[Sample],
        norec: Option<&[Sample]>,
    ) -> Row {
        let direct = Side::new(direct);
        let gateway = Side::new(gateway);
        Row {
            sc,
            ratio: gateway.tps / direct.tps,
            added_us: (gateway.latency_ms - direct.latency_ms) * 1000.0,
            direct,
            gateway,
            norec: norec.map(Side::new),
            masked: None,
            pgbouncer: None,
            relay: None,
            baseline: None,
        }
    }

    /// A reference proxy's (pgbouncer's, the relay's) throughput / direct, tollgate's / the
    /// reference's, and the latency the reference adds per query (µs).
    fn vs_reference(&self, reference: Option<&Side>) -> Option<(f64, f64, f64)> {
        let other = reference?;
        Some((
            other.tps / self.direct.tps,
            self.gateway.tps / other.tps,
            (other.latency_ms - self.direct.latency_ms) * 1000.0,
        ))
    }

    /// [`Row::vs_reference`] as JSON, with the reference's own numbers (`name`: its keys).
    fn reference_json(&self, reference: Option<&Side>, name: &str) -> Value {
        let Some(side) = reference else {
            return Value::Null;
        };
        let mut v = side.json(name);
        if let Some((vs_direct, gw_vs_ref, added)) = self.vs_reference(reference) {
            v["tps_ratio_vs_direct"] = json!(vs_direct);
            v[format!("tps_ratio_tollgate_vs_{name}")] = json!(gw_vs_ref);
            v["added_latency_us"] = json!(added);
        }
        v
    }

    /// Throughput with masking on / off (target >= 0.90), and the latency masking adds (µs).
    fn masking_cost(&self) -> Option<(f64, f64)> {
        let on = self.masked.as_ref()?;
        Some((
            on.tps / self.gateway.tps,
            (on.latency_ms - self.gateway.latency_ms) * 1000.0,
        ))
    }

    /// Throughput with recording on / off, and the latency recording adds per query (µs).
    fn recording_cost(&self) -> Option<(f64, f64)> {
        let off = self.norec.as_ref()?;
        Some((
            self.gateway.tps / off.tps,
            (self.gateway.latency_ms - off.latency_ms) * 1000.0,
        ))
    }

    fn ratio_ok(&self) -> bool {
        self.ratio >= self.sc.min_ratio
    }

    fn latency_ok(&self) -> Option<bool> {
        self.sc.max_added_us.map(|max| self.added_us <= max)
    }
}

struct Report<'a> {
    opts: &'a Opts,
    scenarios: Vec<Row>,
    audit_written: Option<f64>,
    audit_failed: Option<f64>,
    audit_queued: Option<f64>,
    gateway_queries: u64,
    peak_rss_kib: Option<u64>,
    gateway_cpu_total: Option<f64>,
    /// (thread name, live threads, CPU seconds)
    gateway_threads: Vec<(String, usize, f64)>,
    load_before: String,
    load_after: String,
    pg_version: String,
    gateway_log_tail: String,
    pgbouncer: Option<PgbouncerSummary>,
}

/// Process-wide numbers of the `--pgbouncer` reference proxy.
struct PgbouncerSummary {
    version: String,
    peak_rss_kib: Option<u64>,
    cpu_total: Option<f64>,
    /// Its WARNING/ERROR/FATAL log lines, the last few.
    log_problems: Vec<String>,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISS"
    }
}

fn opt_num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into())
}

impl Report<'_> {
    fn print_table(&self) {
        let o = self.opts;
        println!();
        println!(
            "tollgate PostgreSQL data path: pgbench direct (TLS) vs through tollgate (TLS both legs, client cert, audit on)"
        );
        println!(
            "PostgreSQL {}, pgbench scale {}, {} round(s) x {} s per target, medians; {} CPUs; loadavg before {} / after {}",
            self.pg_version,
            o.scale,
            o.rounds,
            o.seconds,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.load_before,
            self.load_after
        );
        println!();
        println!(
            "{:<26} {:>10} {:>10} {:>7} {:>13} {:>9} {:>9} {:>10} {:>12}",
            "scenario",
            "tps direct",
            "tps gw",
            "ratio",
            "target",
            "lat dir",
            "lat gw",
            "added",
            "target"
        );
        println!(
            "{:<26} {:>10} {:>10} {:>7} {:>13} {:>9} {:>9} {:>10} {:>12}",
            "", "", "", "gw/dir", "", "ms", "ms", "µs/query", ""
        );
        for r in &self.scenarios {
            let lat_target = match (r.sc.max_added_us, r.latency_ok()) {
                (Some(max), Some(ok)) => format!("<= {max:.0} {}", verdict(ok)),
                _ => "-".into(),
            };
            println!(
                "{:<26} {:>10.1} {:>10.1} {:>7.3} {:>13} {:>9.3} {:>9.3} {:>10.1} {:>12}",
                r.sc.label,
                r.direct.tps,
                r.gateway.tps,
                r.ratio,
                format!(">= {:.2} {}", r.sc.min_ratio, verdict(r.ratio_ok())),
                r.direct.latency_ms,
                r.gateway.latency_ms,
                r.added_us,
                lat_target,
            );
        }
        if let Some(pgb) = &self.pgbouncer {
            println!();
            println!(
                "reference: {} in the same run (TLS both legs with the gateway's certificate, SCRAM, verify-full upstream, session pooling)",
                pgb.version
            );
            self.print_reference("pgb", |r| r.pgbouncer.as_ref());
            println!(
                "pgbouncer: peak RSS (VmHWM) {}; CPU {:.2} s total",
                pgb.peak_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "n/a".into()),
                pgb.cpu_total.unwrap_or(f64::NAN),
            );
            if !pgb.log_problems.is_empty() {
                println!(
                    "pgbouncer log (warnings and errors, last lines):\n{}",
                    pgb.log_problems.join("\n")
                );
            }
        }
        if self.scenarios.iter().any(|r| r.baseline.is_some()) {
            println!();
            println!(
                "A/B: this build (gw) vs --baseline {} (base), same config{}, same rounds; gw/base is the throughput ratio",
                self.opts.baseline.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                if self.opts.guardrails { " with --guardrails" } else { "" }
            );
            self.print_reference("base", |r| r.baseline.as_ref());
        }
        if self.scenarios.iter().any(|r| r.relay.is_some()) {
            println!();
            println!(
                "floor: a plain TCP relay in the same run (pgbench's TLS end to end through it; no TLS termination, no parsing, no audit)"
            );
            self.print_reference("relay", |r| r.relay.as_ref());
            println!("A ratio target above relay/dir, or an added-latency target below the relay's, is out of reach for any proxy on this machine.");
        }
        if self.scenarios.iter().any(|r| r.norec.is_some()) {
            println!();
            println!("recording on vs off: the same gateway with server.record_commands = true (default) vs false");
            println!(
                "{:<26} {:>10} {:>10} {:>7} {:>9} {:>9} {:>10} {:>9} {:>9}",
                "scenario",
                "tps on",
                "tps off",
                "on/off",
                "lat on",
                "lat off",
                "added",
                "gw cpu on",
                "gw cpu off"
            );
            println!(
                "{:<26} {:>10} {:>10} {:>7} {:>9} {:>9} {:>10} {:>9} {:>9}",
                "", "", "", "", "ms", "ms", "µs/query", "ms/1k q", "ms/1k q"
            );
            for r in &self.scenarios {
                let (Some(off), Some((ratio, added))) = (&r.norec, r.recording_cost()) else {
                    continue;
                };
                println!(
                    "{:<26} {:>10.1} {:>10.1} {:>7.3} {:>9.3} {:>9.3} {:>10.1} {:>9.1} {:>9.1}",
                    r.sc.label,
                    r.gateway.tps,
                    off.tps,
                    ratio,
                    r.gateway.latency_ms,
                    off.latency_ms,
                    added,
                    r.gateway.proxy_cpu_1k,
                    off.proxy_cpu_1k,
                );
            }
        }
        if self.scenarios.iter().any(|r| r.masked.is_some()) {
            println!();
            println!("masking on vs off: the same gateway with a column rule on the fetched column and every detector, vs no rules (target on/off >= 0.90)");
            println!(
                "{:<26} {:>10} {:>10} {:>12} {:>10} {:>9} {:>9}",
                "scenario", "tps on", "tps off", "on/off", "added", "gw cpu on", "gw cpu off"
            );
            for r in &self.scenarios {
                let (Some(on), Some((ratio, added))) = (&r.masked, r.masking_cost()) else {
                    continue;
                };
                println!(
                    "{:<26} {:>10.1} {:>10.1} {:>12} {:>10.1} {:>9.1} {:>9.1}",
                    r.sc.label,
                    on.tps,
                    r.gateway.tps,
                    format!("{ratio:.3} {}", verdict(ratio >= 0.90)),
                    added,
                    on.proxy_cpu_1k,
                    r.gateway.proxy_cpu_1k,
                );
            }
        }
        println!();
        println!("CPU ms per 1000 queries (medians; = µs of CPU per query):");
        // The pgbouncer columns follow the gateway's, only with --pgbouncer.
        let pgb_header = if self.pgbouncer.is_some() {
            format!(
                " {:>9} {:>9} {:>9} {:>10}",
                "pg pgb", "bench pgb", "pgbouncer", "total pgb"
            )
        } else {
            String::new()
        };
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10}{pgb_header}",
            "scenario",
            "pg dir",
            "pg gw",
            "bench dir",
            "bench gw",
            "gateway",
            "total dir",
            "total gw",
            "gw csw/q"
        );
        for r in &self.scenarios {
            let (d, g) = (&r.direct, &r.gateway);
            let pgb_cols = r
                .pgbouncer
                .as_ref()
                .map(|p| {
                    format!(
                        " {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
                        p.postgres_cpu_1k,
                        p.pgbench_cpu_1k,
                        p.proxy_cpu_1k,
                        p.postgres_cpu_1k + p.pgbench_cpu_1k + p.proxy_cpu_1k
                    )
                })
                .unwrap_or_default();
            println!(
                "{:<26} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.1} {:>10.2}{pgb_cols}",
                r.sc.label,
                d.postgres_cpu_1k,
                g.postgres_cpu_1k,
                d.pgbench_cpu_1k,
                g.pgbench_cpu_1k,
                g.proxy_cpu_1k,
                d.postgres_cpu_1k + d.pgbench_cpu_1k + d.proxy_cpu_1k,
                g.postgres_cpu_1k + g.pgbench_cpu_1k + g.proxy_cpu_1k,
                g.proxy_switches_per_query,
            );
        }
        println!();
        println!(
            "gateway: audit events written {} (write failures {}, queue {}) for {} queries through it (incl. warm-up); peak RSS (VmHWM) {}; CPU {:.2} s total",
            opt_num(self.audit_written),
            opt_num(self.audit_failed),
            opt_num(self.audit_queued),
            self.gateway_queries,
            self.peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "n/a".into()),
            self.gateway_cpu_total.unwrap_or(f64::NAN),
        );
        let threads: Vec<String> = self
            .gateway_threads
            .iter()
            .map(|(name, n, cpu)| format!("{name} x{n}: {cpu:.2} s"))
            .collect();
        println!("gateway CPU by live thread name: {}", threads.join(", "));
        if !self.gateway_log_tail.trim().is_empty() {
            println!(
                "gateway log (last lines, RUST_LOG=warn):\n{}",
                self.gateway_log_tail
            );
        }
    }

    /// The table comparing the gateway with a reference proxy (`short` heads its columns).
    fn print_reference(&self, short: &str, side: impl Fn(&Row) -> Option<&Side>) {
        let heads = [
            format!("tps {short}"),
            format!("{short}/dir"),
            format!("gw/{short}"),
            format!("lat {short}"),
            format!("added {short}"),
            format!("{short} cpu"),
        ];
        println!(
            "{:<26} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>11} {:>9} {:>9}",
            "scenario",
            "tps direct",
            "tps gw",
            heads[0],
            "gw/dir",
            heads[1],
            heads[2],
            heads[3],
            heads[4],
            heads[5],
            "gw cpu"
        );
        println!(
            "{:<26} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>11} {:>9} {:>9}",
            "", "", "", "", "", "", "", "ms", "µs/query", "ms/1k q", "ms/1k q"
        );
        for r in &self.scenarios {
            let (Some(p), Some((vs_direct, gw_vs_ref, added))) = (side(r), r.vs_reference(side(r)))
            else {
                continue;
            };
            println!(
                "{:<26} {:>10.1} {:>10.1} {:>10.1} {:>7.3} {:>9.3} {:>9.3} {:>9.3} {:>11.1} {:>9.1} {:>9.1}",
                r.sc.label,
                r.direct.tps,
                r.gateway.tps,
                p.tps,
                r.ratio,
                vs_direct,
                gw_vs_ref,
                p.latency_ms,
                added,
                p.proxy_cpu_1k,
                r.gateway.proxy_cpu_1k,
            );
        }
    }

    fn to_json(&self) -> Value {
        let o = self.opts;
        json!({
            "rounds": o.rounds,
            "seconds": o.seconds,
            "scale": o.scale,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
            "postgres_version": self.pg_version,
            "scenarios": self.scenarios.iter().map(|r| json!({
                "key": r.sc.key,
                "label": r.sc.label,
                "pgbench_args": r.sc.args,
                "direct": r.direct.json("gateway"),
                "gateway": r.gateway.json("gateway"),
                "tps_ratio": r.ratio,
                "tps_ratio_target": r.sc.min_ratio,
                "tps_ratio_ok": r.ratio_ok(),
                "added_latency_us": r.added_us,
                "added_latency_us_target": r.sc.max_added_us,
                "added_latency_ok": r.latency_ok(),
                "masking_on": r.masked.as_ref().map(|on| json!({
                    "gateway": on.json("gateway"),
                    "tps_ratio_on_off": r.masking_cost().map(|c| c.0),
                    "added_latency_us_by_masking": r.masking_cost().map(|c| c.1),
                })),
                "pgbouncer": r.reference_json(r.pgbouncer.as_ref(), "pgbouncer"),
                "relay": r.reference_json(r.relay.as_ref(), "relay"),
                "baseline": r.reference_json(r.baseline.as_ref(), "baseline"),
                "recording_off": r.norec.as_ref().map(|off| json!({
                    "gateway": off.json("gateway"),
                    "tps_ratio_on_off": r.recording_cost().map(|c| c.0),
                    "added_latency_us_by_recording": r.recording_cost().map(|c| c.1),
                })),
            })).collect::<Vec<_>>(),
            "gateway": {
                "audit_events_written": self.audit_written,
                "audit_write_failures": self.audit_failed,
                "audit_queue_depth": self.audit_queued,
                "queries_through_gateway": self.gateway_queries,
                "peak_rss_kib": self.peak_rss_kib,
                "cpu_seconds_total": self.gateway_cpu_total,
                "cpu_seconds_by_thread_name": self.gateway_threads.iter()
                    .map(|(name, n, cpu)| json!({"name": name, "threads": n, "cpu_seconds": cpu}))
                    .collect::<Vec<_>>(),
                "log_tail": self.gateway_log_tail,
            },
            "pgbouncer": self.pgbouncer.as_ref().map(|p| json!({
                "version": p.version,
                "peak_rss_kib": p.peak_rss_kib,
                "cpu_seconds_total": p.cpu_total,
                "log_problems": p.log_problems,
            })),
        })
    }
}
