//! What the benchmark programs share: interruption, child processes that die with the bench,
//! CPU and memory readings from /proc, the `tollgate serve` process, Prometheus text and medians.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
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
