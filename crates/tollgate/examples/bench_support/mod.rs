//! What the benchmark programs share: interruption, child processes that die with the bench,
//! CPU and memory readings from /proc, the `tollgate serve` process, Prometheus text and medians.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tollgate_tls::pki::{self, ClientCertSpec, IssuedFiles, ServerCertSpec};

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set [`INTERRUPTED`]; the benchmark cleans up and exits.
pub fn catch_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A child process killed (SIGKILL) when this program dies, even without running destructors.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

pub struct ProcStat {
    pub ppid: u32,
    pub utime: f64,
    pub stime: f64,
    pub cutime: f64,
    pub cstime: f64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A /proc/…/stat line, of a process or of one of its threads.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    // Fields after the parenthesized command name, starting at field 3 (state).
    let rest: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |n: usize| -> Option<f64> { rest.get(n - 3)?.parse::<f64>().ok() };
    Some(ProcStat {
        ppid: field(4)? as u32,
        utime: field(14)? / hz,
        stime: field(15)? / hz,
        cutime: field(16)? / hz,
        cstime: field(17)? / hz,
    })
}

pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    proc_stat(pid).map(|s| s.utime + s.stime)
}

pub fn children_of(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|s| s.ppid == parent))
        .collect()
}

/// A `Key:   123 kB` line of /proc/PID/status.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The `tollgate serve` process; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub admin_port: u16,
    pub log_path: PathBuf,
}

impl Gateway {
    /// Start `bin serve --config config` in `dir` with `envs`, and wait until `/readyz` on
    /// `admin_port` answers 200.
    pub fn start(
        bin: &Path,
        config: &Path,
        dir: &Path,
        admin_port: u16,
        envs: &[(&str, &str)],
    ) -> Result<Gateway> {
        let log_path = dir.join("gateway.log");
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path)?);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = die_with_parent(&mut cmd)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut gw = Gateway {
            child,
            admin_port,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            check_interrupted()?;
            if let Some(status) = gw.child.try_wait()? {
                bail!("tollgate exited early ({status}):\n{}", gw.log_tail(40));
            }
            if matches!(gw.http_get("/readyz"), Some((200, _))) {
                return Ok(gw);
            }
            if Instant::now() > deadline {
                bail!("tollgate did not become ready:\n{}", gw.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path, lines, |_| true)
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, self.admin_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    }

    pub fn metrics(&self) -> Option<String> {
        self.http_get("/metrics").map(|(_, body)| body)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of the file at `path` that `keep` accepts.
pub fn file_tail(path: &Path, lines: usize, keep: impl Fn(&str) -> bool) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The value of an unlabelled series in Prometheus text format.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !rest.starts_with(' ') {
            return None;
        }
        rest.trim().parse().ok()
    })
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Waits for `child`, killing it when we are interrupted or it outlives `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("timed out after {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pgbench against one conninfo; connection settings come from the conninfo only.
pub struct Pgbench<'a> {
    program: &'a Path,
    dir: &'a Path,
    conninfo: &'a str,
    password: Option<&'a str>,
}

impl<'a> Pgbench<'a> {
    pub fn new(
        program: &'a Path,
        dir: &'a Path,
        conninfo: &'a str,
        password: Option<&'a str>,
    ) -> Self {
        Pgbench {
            program,
            dir,
            conninfo,
            password,
        }
    }

    /// Runs pgbench with `args` and returns its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out_path = self.dir.join("pgbench.out");
        let err_path = self.dir.join("pgbench.err");
        let mut cmd = Command::new(self.program);
        cmd.args(args)
            .arg(self.conninfo)
            .stdin(Stdio::null())
            // Files rather than pipes: we poll the child, and a full pipe would stall it.
            .stdout(fs::File::create(&out_path)?)
            .stderr(fs::File::create(&err_path)?)
            .current_dir(self.dir);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(p) = self.password {
            cmd.env("PGPASSWORD", p);
        }
        let mut child = die_with_parent(&mut cmd)
            .spawn()
            .with_context(|| format!("spawn {}", self.program.display()))?;
        let status = wait_child(&mut child, Duration::from_secs(3600))?;
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        if !status.success() {
            bail!(
                "pgbench failed ({status}):\n{}\n{}",
                stdout.trim(),
                stderr.trim()
            );
        }
        Ok(stdout)
    }
}

/// The number that follows `prefix` on the first line containing it.
pub fn parse_after(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = &line[line.find(prefix)? + prefix.len()..];
        let num: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse().ok()
    })
}

/// The gateway PKI of a benchmark: a CA, a server certificate for localhost/127.0.0.1 and a
/// client certificate `client` in group `client`.
pub struct BenchPki {
    pub ca: PathBuf,
    pub server: IssuedFiles,
    pub client: IssuedFiles,
}

pub fn bench_pki(dir: &Path, client: &str) -> Result<BenchPki> {
    let ca = pki::init_ca(dir, "tollgate bench CA")?.cert;
    let server = pki::issue_server(
        dir,
        &ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ttl: Duration::from_secs(86400),
            not_before: None,
        },
        &dir.join("gateway"),
    )?;
    let client = pki::issue_client(
        dir,
        &ClientCertSpec {
            name: client.into(),
            spiffe: None,
            groups: vec![client.into()],
            ttl: Duration::from_secs(86400),
            not_before: None,
        },
        &dir.join(client),
    )?;
    Ok(BenchPki { ca, server, client })
}

/// CPU seconds of a PostgreSQL cluster: the postmaster, its live children and the reaped ones.
pub fn postgres_cpu_seconds(postmaster: u32) -> f64 {
    let live_children: f64 = children_of(postmaster)
        .into_iter()
        .filter_map(|pid| proc_stat(pid).map(|s| s.utime + s.stime))
        .sum();
    let own = proc_stat(postmaster)
        .map(|s| s.utime + s.stime + s.cutime + s.cstime)
        .unwrap_or(0.0);
    own + live_children
}

/// postgresql.conf lines of a throwaway PostgreSQL tuned for benchmarking (no fsync).
pub const BENCH_PG_CONF: [&str; 7] = [
    "max_connections = 100",
    "shared_buffers = 128MB",
    "fsync = off",
    "synchronous_commit = off",
    "autovacuum = off",
    "jit = off",
    "log_min_messages = warning",
];

/// `--tollgate PATH`, else `tollgate` in the directory above this program's (`target/release`).
pub fn tollgate_binary(given: Option<&Path>) -> Result<PathBuf> {
    let tollgate = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("tollgate"))
            .context("cannot locate the tollgate binary; pass --tollgate PATH")?,
    };
    // Absolute, because the gateway runs with its temporary directory as working directory.
    let tollgate = fs::canonicalize(&tollgate).unwrap_or(tollgate);
    if !tollgate.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p tollgate --bins --examples` \
             or pass --tollgate PATH",
            tollgate.display()
        );
    }
    Ok(tollgate)
}
