//! MySQL data-path benchmark: sysbench **directly** against a TLS MariaDB versus **through
//! `tollgate serve`** (TLS on both legs, client certificate, audit recording on), measured in
//! the same run, alternating which goes first, and printed as ratios against the direct run.
//!
//! This is a program, not a test: it asserts nothing and exits 0 once it has measured (2 when it
//! could not run). Run it with `scripts/bench-mysql [--rounds N] [--seconds S] [--threads T]
//! [--table-size K] [--tests oltp_point_select,oltp_read_only]`, or after
//! `cargo build --release -p tollgate --bins --examples`,
//! `target/release/examples/bench_mysql [...] [--tollgate PATH]`.
//!
//! Needs MariaDB server binaries (as the tests do) and sysbench (Debian: `apt-get install
//! sysbench`). sysbench 1.0 reads its TLS files from the working directory (`cacert.pem`,
//! `client-cert.pem`, `client-key.pem`), so MariaDB's server certificate and the gateway's
//! come from one bench CA, and the same client certificate goes to both: MariaDB ignores it
//! (the login is user and password), the gateway takes its identity from it. sysbench does not
//! verify the server's certificate; the gateway's upstream leg is verify-full as always.

#[path = "bench_support/mod.rs"]
mod support;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;
use tollgate_testsupport::{free_port, MariaDb, MariaDbOptions};
use tollgate_tls::pki;

struct Args {
    rounds: usize,
    seconds: u32,
    threads: u32,
    table_size: u32,
    tests: Vec<String>,
    tollgate: PathBuf,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe()?;
    let mut args = Args {
        rounds: 3,
        seconds: 10,
        threads: 8,
        table_size: 10_000,
        tests: vec!["oltp_point_select".into(), "oltp_read_only".into()],
        tollgate: exe
            .parent()
            .and_then(Path::parent)
            .context("no directory above the example")?
            .join("tollgate"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => args.rounds = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--table-size" => args.table_size = value()?.parse()?,
            "--tests" => args.tests = value()?.split(',').map(str::to_owned).collect(),
            "--tollgate" => args.tollgate = value()?.into(),
            other => bail!("unknown option {other}"),
        }
    }
    Ok(args)
}

/// One sysbench run: transactions and queries per second, average latency in ms.
#[derive(Clone, Copy, Debug)]
struct Run {
    tps: f64,
    qps: f64,
    latency_ms: f64,
}

fn per_sec(line: &str) -> Option<f64> {
    line.split('(')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn parse_run(out: &str) -> Option<Run> {
    let find = |key: &str| out.lines().find(|l| l.trim_start().starts_with(key));
    Some(Run {
        tps: per_sec(find("transactions:")?)?,
        qps: per_sec(find("queries:")?)?,
        latency_ms: find("avg:")?.split_whitespace().nth(1)?.parse().ok()?,
    })
}

struct Target {
    name: &'static str,
    port: u16,
    user: String,
    password: String,
}

fn sysbench(dir: &Path, target: &Target, db: &str, args: &[String]) -> Result<String> {
    let mut cmd = Command::new("sysbench");
    cmd.args(args)
        .arg("--db-driver=mysql")
        .arg("--mysql-host=127.0.0.1")
        .arg(format!("--mysql-port={}", target.port))
        .arg(format!("--mysql-user={}", target.user))
        .arg(format!("--mysql-password={}", target.password))
        .arg(format!("--mysql-db={db}"))
        .arg("--mysql-ssl=on")
        .current_dir(dir);
    let out = support::die_with_parent(&mut cmd)
        .output()
        .context("run sysbench (Debian: apt-get install sysbench)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "sysbench against {} failed:\n{text}\n{}",
            target.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn run() -> Result<()> {
    let args = parse_args()?;
    if support::which("sysbench").is_none() {
        bail!("sysbench not found: sudo apt-get install -y sysbench");
    }
    if !args.tollgate.is_file() {
        bail!(
            "{} not found: cargo build --release -p tollgate --bins --examples, or --tollgate PATH",
            args.tollgate.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-bench-mysql-")
        .tempdir()?;
    let dir = tmp.path();
    let pki_dir = dir.join("pki");
    let ca = pki::init_ca(&pki_dir, "tollgate bench CA")?;
    let gw_cert = pki::issue_server(
        &pki_dir,
        &pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?],
            ttl: Duration::from_secs(86400),
            not_before: None,
        },
        &pki_dir.join("gateway"),
    )?;
    let client = pki::issue_client(
        &pki_dir,
        &pki::ClientCertSpec {
            name: "bench".into(),
            spiffe: None,
            groups: vec!["bench".into()],
            ttl: Duration::from_secs(86400),
            not_before: None,
        },
        &pki_dir.join("bench"),
    )?;
    let client_dir = dir.join("client");
    std::fs::create_dir_all(&client_dir)?;
    for (from, to) in [
        (&ca.cert, "cacert.pem"),
        (&client.cert, "client-cert.pem"),
        (&client.key, "client-key.pem"),
    ] {
        std::fs::copy(from, client_dir.join(to))?;
    }

    eprintln!("starting MariaDB ...");
    let db = MariaDb::start(MariaDbOptions {
        ca_dir: Some(pki_dir.clone()),
        extra_conf: vec![
            "innodb_buffer_pool_size = 128M".into(),
            "max_connections = 500".into(),
        ],
        ..MariaDbOptions::default()
    })?;
    std::fs::write(dir.join("app.password"), &db.password)?;
    let mysql_port = free_port();
    let admin_port = free_port();
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{pg_port}"
mysql_listen = "127.0.0.1:{mysql_port}"
admin_listen = "127.0.0.1:{admin_port}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "sqlite://audit.db"

[[resources]]
name = "{db_name}"
kind = "mysql"
upstream = "127.0.0.1:{up_port}"
database = "{db_name}"
allow_groups = ["bench"]
[resources.tls]
mode = "verify-full"
ca = "{ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "app.password"
"#,
        pg_port = free_port(),
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = ca.cert.display(),
        db_name = db.database,
        up_port = db.port,
        user = db.user,
    );
    let config_path = dir.join("tollgate.toml");
    std::fs::write(&config_path, config)?;
    let gw = support::Gateway::start(&args.tollgate, &config_path, dir, admin_port, &[])?;

    let direct = Target {
        name: "direct",
        port: db.port,
        user: db.user.clone(),
        password: db.password.clone(),
    };
    let gateway = Target {
        name: "tollgate",
        port: mysql_port,
        user: "bench".into(),
        password: String::new(),
    };
    let common = |test: &str, phase: &str| -> Vec<String> {
        vec![
            test.to_owned(),
            "--tables=1".into(),
            format!("--table-size={}", args.table_size),
            format!("--threads={}", args.threads),
            format!("--time={}", args.seconds),
            "--report-interval=0".into(),
            phase.to_owned(),
        ]
    };
    eprintln!("sysbench prepare ({} rows) ...", args.table_size);
    sysbench(
        &client_dir,
        &direct,
        &db.database,
        &common("oltp_read_only", "prepare"),
    )?;

    println!(
        "sysbench {} threads, {} s x {} rounds; MariaDB {}; loadavg {}",
        args.threads,
        args.seconds,
        args.rounds,
        db.version,
        support::loadavg()
    );
    println!(
        "{:<20} {:>12} {:>12} {:>8} {:>14} {:>14}",
        "test", "direct tps", "tollgate tps", "ratio", "direct ms", "tollgate ms"
    );
    for test in &args.tests {
        let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for round in 0..args.rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                support::check_interrupted()?;
                let target = [&direct, &gateway][which];
                let out = sysbench(&client_dir, target, &db.database, &common(test, "run"))?;
                let run = parse_run(&out)
                    .with_context(|| format!("cannot read sysbench's report:\n{out}"))?;
                runs[which].push(run);
            }
        }
        let med = |v: &[Run], f: fn(&Run) -> f64| support::median(v.iter().map(f).collect());
        let (d_tps, g_tps) = (med(&runs[0], |r| r.tps), med(&runs[1], |r| r.tps));
        println!(
            "{:<20} {:>12.1} {:>12.1} {:>8.3} {:>14.3} {:>14.3}",
            test,
            d_tps,
            g_tps,
            g_tps / d_tps,
            med(&runs[0], |r| r.latency_ms),
            med(&runs[1], |r| r.latency_ms),
        );
        println!(
            "{:<20} queries/s direct {:.0}, tollgate {:.0}",
            "",
            med(&runs[0], |r| r.qps),
            med(&runs[1], |r| r.qps)
        );
    }
    drop(gw);
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            support::on_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            support::on_signal as *const () as libc::sighandler_t,
        );
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-mysql: {e:#}");
            ExitCode::from(2)
        }
    }
}
