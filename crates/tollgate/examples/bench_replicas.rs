//! Replicas benchmark: pgbench through HAProxy (TCP mode, `balance leastconn`) in front of one,
//! two and three `tollgate serve` replicas sharing one PostgreSQL store, and directly against
//! the resource PostgreSQL, measured in the same run; with the importer's lag sampled during
//! every run, so the cost of the shared store is visible.
//!
//! This is a program, not a test: it asserts nothing and exits 0 once it has measured. Run it with
//!
//! ```text
//! scripts/bench-replicas                          # 2 rounds x 10 s per workload and target
//! scripts/bench-replicas --seconds 3 --rounds 1   # quick look
//! scripts/bench-replicas --audit-durability store # forward only once the event is in the store
//!                                                 # (also `fsync`; default `written`)
//! ```
//!
//! What it does:
//! 1. starts a throwaway TLS PostgreSQL for the resource (tuned as in `bench_pg`) with the
//!    pgbench tables, and another one for the shared store (default durability settings:
//!    what the store costs is what is measured), TLS verify-full, password from a file;
//! 2. starts three replicas on that store, each in its own directory (config, journal, log),
//!    and three HAProxy processes in TCP mode: the first in front of replica A, the second of
//!    A and B, the third of A, B and C (health check `GET /readyz` on the admin listener);
//! 3. per round, workload and target (the order rotates between rounds) runs pgbench
//!    `-n -T S -c C -j 2` with TLS end to end (verify-full, client certificate), while a thread
//!    reads every replica's `/metrics` every 100 ms: the sum of `tollgate_audit_queue_depth`
//!    (events a replica journaled, so acknowledged, but not yet imported into the shared store)
//!    is the importer's lag in events;
//! 4. after each run, the time until that sum is back to 0 (the drain), the events the store
//!    gained (`SELECT count(*) FROM events`), and CPU of the replicas and of the store's
//!    PostgreSQL per 1000 transactions;
//! 5. prints medians per workload and target, the ratio against one replica and against direct.
//!
//! Workloads: `-S` (one point SELECT per transaction) and `-N` (pgbench's simple update: BEGIN,
//! UPDATE, SELECT, INSERT, END per transaction). The replicas record every command, so
//! each statement is an event for the store. On a small machine pgbench, HAProxy, the replicas
//! and both PostgreSQL clusters share the cores: more replicas cannot add throughput there, the
//! ratios show what the extra processes and the shared store cost; on a machine with cores to
//! spare the same run shows how far they scale.

#[path = "bench_support/mod.rs"]
mod support;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;
use tollgate_testsupport::{free_port, ClusterOptions, PgCluster};

#[derive(Parser, Debug)]
#[command(
    name = "bench_replicas",
    about = "pgbench through HAProxy in front of 1, 2 and 3 tollgate replicas on one store"
)]
struct Opts {
    /// Runs per workload and target; the table shows medians.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Duration of each pgbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// pgbench clients (connections) per run.
    #[arg(long, default_value_t = 6)]
    clients: u32,
    /// pgbench scale factor for `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Seconds of unmeasured `-S` load against each target before the first round.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// `server.audit_durability` of every replica: `written` (default), `fsync` or `store`.
    #[arg(long, default_value = "written")]
    audit_durability: String,
    /// The tollgate binary; default: `tollgate` next to this program's directory.
    #[arg(long, env = "TOLLGATE_BIN")]
    tollgate: Option<PathBuf>,
}

const RESOURCE: &str = "benchdb";
const CLIENT: &str = "bench";
const REPLICAS: usize = 3;
const REPLICA_NAMES: [&str; REPLICAS] = ["A", "B", "C"];
/// How often the lag sampler reads the replicas' metrics.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

struct Workload {
    label: &'static str,
    args: &'static [&'static str],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        label: "-S (one point SELECT per transaction)",
        args: &["-S"],
    },
    Workload {
        label: "-N (simple update: BEGIN, UPDATE, SELECT, INSERT, END per transaction)",
        args: &["-N"],
    },
];

fn main() {
    catch_signals();
    let opts = Opts::parse();
    // All cleanup lives in Drop impls of values owned by `run`.
    if let Err(e) = run(&opts) {
        eprintln!("bench_replicas: {e:#}");
        std::process::exit(if INTERRUPTED.load(Ordering::SeqCst) {
            130
        } else {
            2
        });
    }
}

fn progress(msg: std::fmt::Arguments) {
    eprintln!("bench_replicas: {msg}");
}

/// One thing pgbench connects to.
struct Target {
    name: String,
    conninfo: String,
    password: Option<String>,
}

/// What one pgbench run measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    /// Sum over the replicas of events journaled but not yet in the store: max and median
    /// of the samples taken during the run.
    lag_max: f64,
    lag_median: f64,
    /// From pgbench's end until every replica's queue was empty.
    drain_ms: f64,
    /// Events the store gained during the run (and its drain).
    stored: f64,
    replicas_cpu: f64,
    store_cpu: f64,
}

fn run(opts: &Opts) -> Result<()> {
    if opts.rounds == 0 || opts.seconds == 0 || opts.clients == 0 {
        bail!("--rounds, --seconds and --clients must be at least 1");
    }
    if !matches!(
        opts.audit_durability.as_str(),
        "written" | "fsync" | "store"
    ) {
        bail!("--audit-durability is `written`, `fsync` or `store`");
    }
    let pgbench = which("pgbench").context(
        "pgbench not found in $PATH; install it with: \
         sudo apt-get install -y postgresql-client postgresql-contrib",
    )?;
    let haproxy = which("haproxy")
        .or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()))
        .context("haproxy not found; install it with: sudo apt-get install -y haproxy")?;
    let tollgate = tollgate_binary(opts.tollgate.as_deref())?;
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-bench-replicas-")
        .tempdir()?;
    let load_before = loadavg();

    progress(format_args!("starting the resource PostgreSQL ..."));
    let resource = PgCluster::start(ClusterOptions {
        database: "bench".into(),
        user: "bench_owner".into(),
        extra_conf: BENCH_PG_CONF.map(String::from).to_vec(),
        ..ClusterOptions::default()
    })
    .context("start the resource PostgreSQL")?;
    check_interrupted()?;
    let direct = Target {
        name: "direct to PostgreSQL".into(),
        conninfo: resource.conninfo("verify-full"),
        password: Some(resource.password.clone()),
    };
    progress(format_args!("pgbench -i -s {} ...", opts.scale));
    pgbench_in(&pgbench, tmp.path(), &direct).run(&["-i", "-q", "-s", &opts.scale.to_string()])?;

    progress(format_args!("starting the store PostgreSQL ..."));
    let store = PgCluster::start(ClusterOptions {
        user: "tollgate_store".into(),
        database: "tollgate".into(),
        extra_conf: vec!["log_min_messages = warning".into()],
        ..ClusterOptions::default()
    })
    .context("start the store PostgreSQL")?;
    let store_pid = store.postmaster_pid().context("store postmaster.pid")? as u32;

    let pki = bench_pki(&tmp.path().join("pki"), CLIENT)?;
    let config = replica_config(tmp.path(), &resource, &store, &pki, &opts.audit_durability)?;
    let mut replicas = Vec::new();
    for name in REPLICA_NAMES {
        progress(format_args!("starting replica {name} ..."));
        replicas.push(Replica::start(&tollgate, tmp.path(), name, &config)?);
    }
    let gateway_conninfo = |port: u16| {
        format!(
            "host=localhost port={port} user={CLIENT} dbname={RESOURCE} sslmode=verify-full \
             sslrootcert={} sslcert={} sslkey={}",
            pki.ca.display(),
            pki.client.cert.display(),
            pki.client.key.display()
        )
    };
    let mut balancers = Vec::new();
    let mut targets = vec![direct];
    for n in 1..=REPLICAS {
        let lb = Haproxy::start(&haproxy, tmp.path(), &replicas[..n])?;
        targets.push(Target {
            name: format!("HAProxy -> {n} replica{}", if n == 1 { "" } else { "s" }),
            conninfo: gateway_conninfo(lb.port),
            password: None,
        });
        balancers.push(lb);
    }

    if opts.warmup > 0 {
        progress(format_args!(
            "warming up ({} s per target) ...",
            opts.warmup
        ));
        for t in &targets {
            let secs = opts.warmup.to_string();
            pgbench_in(&pgbench, tmp.path(), t).run(&["-n", "-S", "-T", &secs, "-c", "2"])?;
        }
    }

    let bench = Bench {
        pgbench: &pgbench,
        dir: tmp.path(),
        replicas: &replicas,
        store: &store,
        store_pid,
        seconds: opts.seconds,
        clients: opts.clients,
    };
    // samples[workload][target]
    let mut samples = vec![vec![Vec::<Sample>::new(); targets.len()]; WORKLOADS.len()];
    for round in 0..opts.rounds {
        for (w, workload) in WORKLOADS.iter().enumerate() {
            for k in 0..targets.len() {
                let t = (k + round) % targets.len();
                check_interrupted()?;
                progress(format_args!(
                    "round {}/{}: {} via {} ...",
                    round + 1,
                    opts.rounds,
                    workload.args[0],
                    targets[t].name
                ));
                samples[w][t].push(bench.measure(&targets[t], workload)?);
            }
        }
    }
    let replica_logs: Vec<String> = replicas
        .iter()
        .map(|r| r.gateway.log_tail(3))
        .filter(|l| !l.trim().is_empty())
        .collect();
    drop(balancers);
    drop(replicas);

    print_report(opts, &targets, &samples, &load_before);
    if !replica_logs.is_empty() {
        println!("\nlast lines of the replicas' logs (RUST_LOG=warn):");
        for l in replica_logs {
            println!("{l}");
        }
    }
    Ok(())
}

fn pgbench_in<'a>(program: &'a Path, dir: &'a Path, t: &'a Target) -> Pgbench<'a> {
    Pgbench::new(program, dir, &t.conninfo, t.password.as_deref())
}

/// The replicas' shared configuration; `{pg_port}` and `{admin_port}` differ per replica.
fn replica_config(
    dir: &Path,
    resource: &PgCluster,
    store: &PgCluster,
    pki: &BenchPki,
    durability: &str,
) -> Result<String> {
    let resource_pw = dir.join("resource.password");
    fs::write(&resource_pw, &resource.password)?;
    let store_pw = dir.join("store.password");
    fs::write(&store_pw, &store.password)?;
    Ok(format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "required"
store = "postgres://{store_user}@localhost:{store_port}/{store_db}?sslrootcert={store_ca}&password_file={store_pw}"
audit_durability = "{durability}"

[[resources]]
name = "{RESOURCE}"
kind = "postgres"
upstream = "127.0.0.1:{up_port}"
database = "{db}"
allow_groups = ["{CLIENT}"]
pool_mode = "session"
[resources.tls]
mode = "verify-full"
ca = "{up_ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "{resource_pw}"
"#,
        cert = pki.server.cert.display(),
        key = pki.server.key.display(),
        ca = pki.ca.display(),
        store_user = store.user,
        store_port = store.port,
        store_db = store.database,
        store_ca = store.ca_cert.display(),
        store_pw = store_pw.display(),
        up_port = resource.port,
        db = resource.database,
        up_ca = resource.ca_cert.display(),
        user = resource.user,
        resource_pw = resource_pw.display(),
    ))
}

/// One `tollgate serve` on the shared store, in its own directory (its journal is
/// `tollgate.toml.events.log` there).
struct Replica {
    gateway: Gateway,
    pg_port: u16,
}

impl Replica {
    fn start(bin: &Path, tmp: &Path, name: &str, config: &str) -> Result<Replica> {
        let dir = tmp.join(format!("replica-{name}"));
        fs::create_dir_all(&dir)?;
        let (pg_port, admin_port) = (free_port(), free_port());
        let path = dir.join("tollgate.toml");
        fs::write(
            &path,
            config
                .replace("{pg_port}", &pg_port.to_string())
                .replace("{admin_port}", &admin_port.to_string()),
        )?;
        let gateway = Gateway::start(bin, &path, &dir, admin_port, &[])?;
        Ok(Replica { gateway, pg_port })
    }

    fn metrics(&self) -> Option<String> {
        self.gateway.metrics()
    }
}

/// HAProxy in TCP mode in front of `replicas`, in the foreground; killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Haproxy {
    fn start(bin: &Path, tmp: &Path, replicas: &[Replica]) -> Result<Haproxy> {
        let port = free_port();
        let servers: String = replicas
            .iter()
            .zip(REPLICA_NAMES)
            .map(|(r, name)| {
                format!(
                    "    server {name} 127.0.0.1:{} check port {} inter 1s\n",
                    r.pg_port, r.gateway.admin_port
                )
            })
            .collect();
        let config = format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
             frontend pg\n    bind 127.0.0.1:{port}\n    default_backend tollgate_pg\n\
             backend tollgate_pg\n    balance leastconn\n    option httpchk GET /readyz\n{servers}"
        );
        let path = tmp.join(format!("haproxy-{}.cfg", replicas.len()));
        fs::write(&path, config)?;
        let log = fs::File::create(path.with_extension("log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = die_with_parent(&mut cmd)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut lb = Haproxy { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            check_interrupted()?;
            if let Some(status) = lb.child.try_wait()? {
                let log = fs::read_to_string(path.with_extension("log")).unwrap_or_default();
                bail!("haproxy exited ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                bail!("haproxy did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(lb)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench<'a> {
    pgbench: &'a Path,
    dir: &'a Path,
    replicas: &'a [Replica],
    store: &'a PgCluster,
    store_pid: u32,
    seconds: u64,
    clients: u32,
}

impl Bench<'_> {
    /// Events journaled by the replicas and not yet in the store, summed.
    fn lag(&self) -> Option<f64> {
        self.replicas
            .iter()
            .map(|r| metric(&r.metrics()?, "tollgate_audit_queue_depth"))
            .sum()
    }

    fn stored_events(&self) -> Result<f64> {
        let out = self.store.psql("SELECT count(*) FROM events")?;
        out.trim()
            .parse()
            .with_context(|| format!("count of the store's events: {out:?}"))
    }

    fn replicas_cpu(&self) -> f64 {
        self.replicas
            .iter()
            .filter_map(|r| process_cpu_seconds(r.gateway.pid()))
            .sum()
    }

    fn measure(&self, target: &Target, workload: &Workload) -> Result<Sample> {
        let stored_before = self.stored_events()?;
        let (cpu_before, store_cpu_before) =
            (self.replicas_cpu(), postgres_cpu_seconds(self.store_pid));
        let secs = self.seconds.to_string();
        let clients = self.clients.to_string();
        let mut args = vec!["-n", "-T", &secs, "-c", &clients, "-j", "2"];
        args.extend_from_slice(workload.args);
        let done = AtomicBool::new(false);
        let (stdout, lags) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut lags = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    lags.extend(self.lag());
                    std::thread::sleep(SAMPLE_EVERY);
                }
                lags
            });
            let out = pgbench_in(self.pgbench, self.dir, target).run(&args);
            done.store(true, Ordering::SeqCst);
            (out, sampler.join().unwrap_or_default())
        });
        let stdout = stdout?;
        let drain = Instant::now();
        while self.lag().is_some_and(|l| l > 0.0) && drain.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let drain_ms = drain.elapsed().as_secs_f64() * 1e3;
        let failed = parse_after(&stdout, "number of failed transactions: ").unwrap_or(0.0);
        if failed > 0.0 {
            bail!(
                "{failed} transactions failed via {}:\n{stdout}",
                target.name
            );
        }
        Ok(Sample {
            tps: parse_after(&stdout, "tps = ").context("no `tps = ` in pgbench output")?,
            latency_ms: parse_after(&stdout, "latency average = ").unwrap_or(f64::NAN),
            transactions: parse_after(&stdout, "number of transactions actually processed: ")
                .context("no transaction count in pgbench output")?
                as u64,
            lag_max: lags.iter().copied().fold(0.0, f64::max),
            lag_median: median(lags),
            drain_ms,
            stored: self.stored_events()? - stored_before,
            replicas_cpu: self.replicas_cpu() - cpu_before,
            store_cpu: postgres_cpu_seconds(self.store_pid) - store_cpu_before,
        })
    }
}

/// Medians of one workload and target.
struct Row {
    tps: f64,
    latency_ms: f64,
    lag_max: f64,
    lag_median: f64,
    drain_ms: f64,
    events_per_tx: f64,
    replicas_cpu_us: f64,
    store_cpu_us: f64,
}

impl Row {
    fn of(samples: &[Sample]) -> Row {
        let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let per_tx_us = |cpu: f64, s: &Sample| cpu * 1e6 / (s.transactions.max(1) as f64);
        Row {
            tps: m(&|s| s.tps),
            latency_ms: m(&|s| s.latency_ms),
            lag_max: samples.iter().map(|s| s.lag_max).fold(0.0, f64::max),
            lag_median: m(&|s| s.lag_median),
            drain_ms: m(&|s| s.drain_ms),
            events_per_tx: m(&|s| s.stored / s.transactions.max(1) as f64),
            replicas_cpu_us: m(&|s| per_tx_us(s.replicas_cpu, s)),
            store_cpu_us: m(&|s| per_tx_us(s.store_cpu, s)),
        }
    }
}

fn print_report(opts: &Opts, targets: &[Target], samples: &[Vec<Vec<Sample>>], load_before: &str) {
    println!(
        "tollgate replicas benchmark: pgbench -c {} -j 2 -T {} (TLS end to end, verify-full, client \
         certificate), {} round(s), medians; audit_durability = \"{}\"",
        opts.clients, opts.seconds, opts.rounds, opts.audit_durability
    );
    println!(
        "HAProxy {} (mode tcp, leastconn) in front of replicas on one PostgreSQL store; load average \
         before {load_before}, after {}",
        haproxy_version(),
        loadavg()
    );
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let rows: Vec<Row> = samples[w].iter().map(|s| Row::of(s)).collect();
        let direct = rows[0].tps;
        let one = rows[1].tps;
        println!("\n{}", workload.label);
        println!(
            "{:<24} {:>9} {:>8} {:>9} {:>8} {:>16} {:>9} {:>7} {:>14} {:>14}",
            "target",
            "tps",
            "vs 1",
            "vs direct",
            "lat ms",
            "lag ev med/max",
            "drain ms",
            "ev/tx",
            "replicas µs/tx",
            "store µs/tx"
        );
        for (t, row) in targets.iter().zip(&rows) {
            let is_direct = std::ptr::eq(t, &targets[0]);
            let dash = |v: String| if is_direct { "-".to_owned() } else { v };
            println!(
                "{:<24} {:>9.0} {:>8} {:>9.2} {:>8.2} {:>16} {:>9} {:>7} {:>14} {:>14}",
                t.name,
                row.tps,
                dash(format!("{:.2}", row.tps / one)),
                row.tps / direct,
                row.latency_ms,
                dash(format!("{:.0}/{:.0}", row.lag_median, row.lag_max)),
                dash(format!("{:.0}", row.drain_ms)),
                dash(format!("{:.1}", row.events_per_tx)),
                dash(format!("{:.0}", row.replicas_cpu_us)),
                dash(format!("{:.0}", row.store_cpu_us)),
            );
        }
    }
    println!(
        "\nlag ev: events the replicas had journaled (acknowledged) but not yet imported into the \
         shared store, summed over the replicas, sampled every {} ms during the runs (median of the \
         runs' medians / highest seen); drain: from pgbench's end until it was 0 again; ev/tx: \
         events the store gained per transaction; µs/tx: CPU of all replicas / of the store's \
         PostgreSQL per transaction.",
        SAMPLE_EVERY.as_millis()
    );
}

fn haproxy_version() -> String {
    let bin = which("haproxy").unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_owned)
        })
        .unwrap_or_default()
}
