//! stdio MCP servers (`command = [...]`): the gateway starts one process per MCP session (at the
//! client's `initialize`), speaks newline-delimited JSON-RPC over its stdin and stdout, and
//! serves it to clients as the streamable-HTTP transport, so the judging, holding, masking and
//! recording of [`super`] apply unchanged: this module only plays the part of the upstream.
//!
//! Clients of the stateless 2026-07-28 revision have no session: each principal gets one
//! process per resource, started at its first request and reused by its later ones. The
//! gateway initialises it itself (a session-based revision, no client capabilities), answers
//! `server/discover` from that, and gives each forwarded request an id of its own (clients
//! may reuse theirs), so only one principal's requests ever share a process.
//!
//! The process gets no shell and none of the gateway's environment but `env_inherit` (by
//! default PATH, HOME, LANG, TMPDIR), `env` and the credential of `[resources.credentials]`;
//! it runs in a process group of its own, which is stopped (SIGTERM, then SIGKILL) when the
//! session is deleted, idles past `idle_timeout`, or breaks the protocol. Its stderr goes to
//! the gateway's log, bounded; at most `max_processes` run per resource. A config reload that
//! removes the resource (or changes its command) stops its processes.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tollgate_config::StdioServer;
use tollgate_gate::event::McpProcess;
use tollgate_metrics::registry;

use super::{json_answer, jsonrpc, Exchange, MAX_MESSAGE, PROTOCOL_VERSIONS, STATELESS_VERSION};
use crate::upstream::UpstreamBody;
use crate::HttpSession;

/// Most bytes of one process's stderr written to the log; the rest is read and dropped.
const MAX_STDERR_LOGGED: usize = 64 * 1024;
/// Longest stderr line logged.
const MAX_STDERR_LINE: usize = 2048;
/// How long a stopped process has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Messages queued for one client stream before the server's stdout is no longer read.
const QUEUE: usize = 64;
/// How long a process started for stateless clients has to answer the gateway's `initialize`.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The revision the gateway initialises a stateless principal's process with.
const INIT_VERSION: &str = "2025-11-25";

/// The processes running, by resource and the `Mcp-Session-Id` the gateway gave their session.
#[derive(Default)]
pub(crate) struct StdioServers {
    procs: Arc<ProcMap>,
    reaper: AtomicBool,
}

type Sender = mpsc::Sender<Value>;

/// Processes by resource and session id.
type ProcMap = Mutex<HashMap<(String, String), Arc<Proc>>>;

/// Where the server's messages go: answers to the stream of the POST that asked, its own
/// requests and notifications to the newest open POST stream, else to the GET stream.
#[derive(Default)]
struct Routes {
    waiting: HashMap<String, Sender>,
    streams: Vec<(u64, Sender)>,
    get: Option<Sender>,
    next_stream: u64,
}

pub(crate) struct Proc {
    pid: u32,
    program: String,
    /// The command it was started with (a reload that changes it stops the process).
    command: Vec<String>,
    /// The result of the gateway's own `initialize` (processes of stateless clients).
    initialized: tokio::sync::OnceCell<Result<Value, String>>,
    /// Ids the gateway gives the requests it forwards for stateless clients.
    next_id: AtomicU64,
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    routes: Mutex<Routes>,
    last_used: Mutex<Instant>,
    idle_timeout: Duration,
    /// The process was reaped.
    exited: Arc<AtomicBool>,
    /// Why the gateway stopped it (shared with the task that reaps it).
    stopping: Arc<Mutex<Option<&'static str>>>,
}

impl Proc {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle(&self) -> bool {
        self.last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= self.idle_timeout
    }

    /// Stops the process group: SIGTERM now, SIGKILL after [`STOP_GRACE`] if still there.
    fn stop(&self, why: &'static str) {
        {
            let mut s = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            // pid 0 (unknown) would signal the gateway's own group.
            if s.is_some() || self.exited.load(Ordering::SeqCst) || self.pid == 0 {
                return;
            }
            *s = Some(why);
        }
        tracing::info!(pid = self.pid, program = %self.program, reason = why, "stopping stdio MCP server");
        let group = self.pid as libc::pid_t;
        // SAFETY: kill(2) on the process group the gateway created for this child.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let exited = self.exited.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(STOP_GRACE).await;
                if !exited.load(Ordering::SeqCst) {
                    // SAFETY: as above; the leader is not reaped yet, so the group id is still ours.
                    unsafe { libc::kill(-group, libc::SIGKILL) };
                }
            });
        }
    }

    fn route(&self, msg: Value) -> Option<Sender> {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let is_answer = msg.get("method").is_none() && msg.get("id").is_some();
        if is_answer {
            if let Some(tx) = msg
                .get("id")
                .and_then(|id| r.waiting.remove(&id.to_string()))
            {
                return Some(tx);
            }
        }
        r.streams.retain(|(_, tx)| !tx.is_closed());
        if let Some((_, tx)) = r.streams.last() {
            return Some(tx.clone());
        }
        r.get.as_ref().filter(|tx| !tx.is_closed()).cloned()
    }

    fn forget(&self, ids: &HashSet<String>, stream: Option<u64>) {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            r.waiting.remove(id);
        }
        if let Some(s) = stream {
            r.streams.retain(|(k, _)| *k != s);
        }
    }

    async fn write(&self, lines: &[u8]) -> io::Result<()> {
        let mut stdin = self.stdin.lock().await;
        let Some(w) = stdin.as_mut() else {
            return Err(io::Error::other("stdin closed"));
        };
        w.write_all(lines).await?;
        w.flush().await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop("session ended");
    }
}

impl StdioServers {
    fn get(&self, resource: &str, sid: &str) -> Option<Arc<Proc>> {
        let m = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(resource.to_string(), sid.to_string())).cloned()
    }

    fn remove(&self, resource: &str, sid: &str) -> Option<Arc<Proc>> {
        let mut m = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(resource.to_string(), sid.to_string()))
    }

    fn running(&self, resource: &str) -> usize {
        let m = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        m.keys().filter(|(r, _)| r == resource).count()
    }

    /// Stops, every little while, the processes whose sessions went idle.
    fn start_reaper(&self) {
        if self.reaper.swap(true, Ordering::SeqCst) {
            return;
        }
        let procs: Weak<ProcMap> = Arc::downgrade(&self.procs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(procs) = procs.upgrade() else { return };
                let idle: Vec<Arc<Proc>> = {
                    let mut m = procs.lock().unwrap_or_else(|p| p.into_inner());
                    let keys: Vec<_> = m
                        .iter()
                        .filter(|(_, p)| p.idle() || p.exited.load(Ordering::SeqCst))
                        .map(|(k, _)| k.clone())
                        .collect();
                    keys.iter().filter_map(|k| m.remove(k)).collect()
                };
                for p in idle {
                    p.stop("idle");
                }
            }
        });
    }

    /// Starts the server of a new session.
    fn spawn(
        &self,
        resource: &str,
        server: &StdioServer,
        sid: &str,
        session: &Arc<HttpSession>,
    ) -> Result<Arc<Proc>, String> {
        let proc = start(resource, server, session)?;
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((resource.to_string(), sid.to_string()), proc.clone());
        self.start_reaper();
        Ok(proc)
    }

    /// The process serving `principal`'s stateless requests to `resource`, started when it has
    /// none (one start at a time, so concurrent first requests share one process).
    fn for_principal(
        &self,
        resource: &str,
        server: &StdioServer,
        principal: &str,
        session: &Arc<HttpSession>,
    ) -> Result<Arc<Proc>, Refused> {
        let key = (resource.to_string(), principal_key(principal));
        let mut m = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = m.get(&key).filter(|p| !p.exited.load(Ordering::SeqCst)) {
            return Ok(p.clone());
        }
        if let Some(p) = m.remove(&key) {
            p.stop("exited");
        }
        if m.keys().filter(|(r, _)| r == resource).count() >= server.max_processes {
            return Err(Refused::Full);
        }
        let proc = start(resource, server, session).map_err(Refused::Failed)?;
        m.insert(key, proc.clone());
        drop(m);
        self.start_reaper();
        Ok(proc)
    }

    /// After a config reload: stops the processes of resources that are gone, are no longer
    /// stdio servers, or whose command changed (`command_of` says a resource's command now).
    pub(crate) fn stop_removed<'a>(&self, command_of: impl Fn(&str) -> Option<&'a [String]>) {
        let stale: Vec<Arc<Proc>> = {
            let mut m = self.procs.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = m
                .iter()
                .filter(|((r, _), p)| command_of(r) != Some(p.command.as_slice()))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        for p in stale {
            p.stop("resource removed");
        }
    }
}

/// Why no process serves a stateless request.
enum Refused {
    /// `max_processes` run already.
    Full,
    /// It could not be started (the client's message).
    Failed(String),
}

/// The process map's key for a principal's process (session ids are hex, so never collide).
fn principal_key(principal: &str) -> String {
    format!("principal:{principal}")
}

/// Starts a server process: no shell, only the configured environment, its own process group.
fn start(
    resource: &str,
    server: &StdioServer,
    session: &Arc<HttpSession>,
) -> Result<Arc<Proc>, String> {
    let mut cmd = tokio::process::Command::new(&server.command[0]);
    cmd.args(&server.command[1..]).env_clear();
    for var in &server.env_inherit {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    for (k, v) in &server.env {
        cmd.env(k, v);
    }
    if let Some((var, source)) = &server.credential {
        match source.read() {
            Ok(Some(v)) => {
                cmd.env(var, v);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(resource, error = %e, "stdio MCP server credential unavailable");
                return Err("the gateway cannot read this resource's credential".into());
            }
        }
    }
    if let Some(dir) = &server.cwd {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
            tracing::error!(resource, program = %server.command[0], error = %e, "stdio MCP server did not start");
            format!("the MCP server of resource \"{resource}\" could not be started")
        })?;
    let pid = child.id().unwrap_or(0);
    let program = server.command[0].clone();
    tracing::info!(resource, pid, program = %program, "stdio MCP server started");
    registry()
        .counter(
            "tollgate_mcp_processes_started_total",
            "stdio MCP server processes started, by resource.",
            &[("resource", resource)],
        )
        .inc();
    session.log.record(&McpProcess {
        kind: "mcp.process_started",
        pid,
        program: program.clone(),
        status: None,
        stopped: None,
    });
    let proc = Arc::new(Proc {
        pid,
        program: program.clone(),
        command: server.command.clone(),
        initialized: tokio::sync::OnceCell::new(),
        next_id: AtomicU64::new(1),
        stdin: tokio::sync::Mutex::new(child.stdin.take()),
        routes: Mutex::new(Routes::default()),
        last_used: Mutex::new(Instant::now()),
        idle_timeout: server.idle_timeout,
        exited: Arc::new(AtomicBool::new(false)),
        stopping: Arc::new(Mutex::new(None)),
    });
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_stderr(err, resource.to_string(), pid));
    }
    let weak = Arc::downgrade(&proc);
    let stdout = child.stdout.take();
    let res = resource.to_string();
    tokio::spawn(async move {
        if let Some(out) = stdout {
            read_stdout(out, weak.clone(), &res, pid).await;
        }
    });
    // Reaps the process; records how it ended; fails what still waits for an answer.
    let exited = proc.exited.clone();
    let stopping = proc.stopping.clone();
    let weak = Arc::downgrade(&proc);
    let session = session.clone();
    let res = resource.to_string();
    tokio::spawn(async move {
        let status = child.wait().await;
        exited.store(true, Ordering::SeqCst);
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        // Whoever waits on this process is told it ended.
        if let Some(p) = weak.upgrade() {
            let mut r = p.routes.lock().unwrap_or_else(|e| e.into_inner());
            r.waiting.clear();
            r.streams.clear();
            r.get = None;
        }
        let stopped = *stopping.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(resource = %res, pid, status = %status, "stdio MCP server exited");
        session.log.record(&McpProcess {
            kind: "mcp.process_exited",
            pid,
            program,
            status: Some(status),
            stopped,
        });
    });
    Ok(proc)
}

/// Copies the server's stderr to the log, line by line, up to [`MAX_STDERR_LOGGED`] bytes.
async fn log_stderr(mut err: impl AsyncRead + Unpin, resource: String, pid: u32) {
    let mut logged = 0usize;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match err.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b != b'\n' && line.len() < MAX_STDERR_LINE {
                line.push(b);
                continue;
            }
            if b != b'\n' {
                continue;
            }
            if logged < MAX_STDERR_LOGGED {
                logged += line.len();
                let text = String::from_utf8_lossy(&line);
                tracing::info!(resource = %resource, pid, "mcp server stderr: {}", text.trim_end());
                if logged >= MAX_STDERR_LOGGED {
                    tracing::warn!(resource = %resource, pid, "mcp server stderr: more than {MAX_STDERR_LOGGED} bytes; the rest is not logged");
                }
            }
            line.clear();
        }
    }
}

/// Reads the server's messages, one a line, and routes each.
async fn read_stdout(mut out: impl AsyncRead + Unpin, proc: Weak<Proc>, resource: &str, pid: u32) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match out.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let Some(p) = proc.upgrade() else { return };
            match serde_json::from_slice::<Value>(line) {
                Ok(msg) => {
                    if let Some(tx) = p.route(msg.clone()) {
                        drop(p);
                        let _ = tx.send(msg).await;
                    } else {
                        tracing::debug!(
                            resource,
                            pid,
                            "stdio MCP server message with no client stream to take it; dropped"
                        );
                    }
                }
                Err(_) => {
                    let mut shown = String::from_utf8_lossy(line).into_owned();
                    super::clip(&mut shown, 200);
                    tracing::warn!(resource, pid, line = %shown, "stdio MCP server wrote a line that is not JSON to stdout; ignored");
                }
            }
        }
        if buf.len() > MAX_MESSAGE {
            tracing::error!(
                resource,
                pid,
                "stdio MCP server wrote a message larger than {MAX_MESSAGE} bytes; stopping it"
            );
            if let Some(p) = proc.upgrade() {
                p.stop("protocol");
            }
            return;
        }
    }
}

fn new_session_id() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    hex::encode(b)
}

fn empty(status: StatusCode) -> Response<UpstreamBody> {
    let mut r = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn error(status: StatusCode, id: Option<&Value>, message: &str) -> Response<UpstreamBody> {
    json_answer(
        status,
        &jsonrpc::error_response(id, jsonrpc::UNAVAILABLE, message, None),
    )
}

/// The answer of the session's process to this exchange, as a streamable-HTTP server would
/// give it (the caller relays it like any upstream answer).
pub(super) async fn exchange(x: &Exchange, server: &StdioServer) -> Response<UpstreamBody> {
    let gw = &x.gw;
    let resource = x.target.resource.name.as_str();
    let sid = x
        .parts
        .headers
        .get("mcp-session-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let gone =
        "session not found: its MCP server process has ended; start a new session (initialize)";
    match x.parts.method {
        Method::DELETE => {
            let Some(sid) = sid else {
                return error(
                    StatusCode::BAD_REQUEST,
                    None,
                    "DELETE ends a session: send its Mcp-Session-Id",
                );
            };
            match gw.mcp_stdio.remove(resource, &sid) {
                Some(p) => {
                    p.stop("deleted");
                    empty(StatusCode::OK)
                }
                None => error(StatusCode::NOT_FOUND, None, gone),
            }
        }
        Method::GET => {
            let Some(p) = sid.and_then(|s| gw.mcp_stdio.get(resource, &s)) else {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    None,
                    "the server's stream (GET) belongs to a session: send its Mcp-Session-Id",
                );
            };
            p.touch();
            let (tx, rx) = mpsc::channel(QUEUE);
            p.routes.lock().unwrap_or_else(|e| e.into_inner()).get = Some(tx);
            answer(p, rx, HashSet::new(), None, true, false, HashMap::new())
        }
        _ if super::is_stateless(&x.parts.headers) => stateless(x, server).await,
        _ => post(x, server, sid).await,
    }
}

/// The answer to a client that may not start another process (`max_processes` run).
fn too_many(x: &Exchange, server: &StdioServer) -> Response<UpstreamBody> {
    let resource = x.target.resource.name.as_str();
    registry()
        .counter(
            "tollgate_mcp_processes_refused_total",
            "stdio MCP server processes not started because max_processes were running, by resource.",
            &[("resource", resource)],
        )
        .inc();
    let msg = format!(
        "resource \"{resource}\" runs its most MCP server processes ({}, max_processes); end a session you no longer use (DELETE) or try again later",
        server.max_processes
    );
    x.answered(
        StatusCode::SERVICE_UNAVAILABLE,
        "max_processes",
        &msg,
        &jsonrpc::error_response(None, jsonrpc::UNAVAILABLE, &msg, None),
    )
}

/// The POST's body as messages, and whether it was a batch.
fn body_items(x: &Exchange) -> Option<(Vec<Value>, bool)> {
    // Judged already and free of duplicate keys: what serde reads is what was judged.
    match serde_json::from_slice::<Value>(&x.body).ok()? {
        Value::Array(a) => Some((a, true)),
        v => Some((vec![v], false)),
    }
}

async fn post(x: &Exchange, server: &StdioServer, sid: Option<String>) -> Response<UpstreamBody> {
    let resource = x.target.resource.name.as_str();
    let Some((items, batch)) = body_items(x) else {
        return error(
            StatusCode::BAD_REQUEST,
            None,
            "the request body is not valid JSON",
        );
    };
    let initializing = items
        .iter()
        .any(|m| m.get("method").and_then(Value::as_str) == Some("initialize"));
    let (proc, new_sid) = match (sid, initializing) {
        (Some(s), _) => match x.gw.mcp_stdio.get(resource, &s) {
            Some(p) => (p, None),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    None,
                    "session not found: its MCP server process has ended; start a new session (initialize)",
                )
            }
        },
        (None, true) => {
            if x.gw.mcp_stdio.running(resource) >= server.max_processes {
                return too_many(x, server);
            }
            let sid = new_session_id();
            match x.gw.mcp_stdio.spawn(resource, server, &sid, &x.session) {
                Ok(p) => (p, Some(sid)),
                Err(msg) => return error(StatusCode::BAD_GATEWAY, None, &msg),
            }
        }
        (None, false) => {
            return error(
                StatusCode::BAD_REQUEST,
                None,
                "no Mcp-Session-Id: start a session with initialize first",
            )
        }
    };
    let key = new_sid.clone();
    let mut r = send(x, proc, items, batch, HashMap::new(), key.as_deref()).await;
    if let Some(s) = new_sid.filter(|_| r.status().is_success()) {
        if let Ok(v) = HeaderValue::from_str(&s) {
            r.headers_mut().insert("mcp-session-id", v);
        }
    }
    r
}

/// A request of the stateless revision, on its principal's process.
async fn stateless(x: &Exchange, server: &StdioServer) -> Response<UpstreamBody> {
    let resource = x.target.resource.name.as_str();
    let principal = x.who.principal.to_string();
    let proc = match x
        .gw
        .mcp_stdio
        .for_principal(resource, server, &principal, &x.session)
    {
        Ok(p) => p,
        Err(Refused::Full) => return too_many(x, server),
        Err(Refused::Failed(msg)) => return error(StatusCode::BAD_GATEWAY, None, &msg),
    };
    proc.touch();
    let key = principal_key(&principal);
    let init = proc.initialized.get_or_init(|| initialize(&proc)).await;
    let init = match init {
        Ok(v) => v.clone(),
        Err(msg) => {
            tracing::warn!(resource, pid = proc.pid, error = %msg, "stdio MCP server did not initialise");
            x.gw.mcp_stdio.remove(resource, &key);
            proc.stop("protocol");
            let msg = format!("the MCP server of resource \"{resource}\" did not start properly; try again, or ask the gateway's operator (its log says why)");
            return error(StatusCode::BAD_GATEWAY, None, &msg);
        }
    };
    let Some((mut items, false)) = body_items(x) else {
        return error(
            StatusCode::BAD_REQUEST,
            None,
            "the request body is not one JSON-RPC message",
        );
    };
    let msg = &mut items[0];
    if msg.get("method").and_then(Value::as_str) == Some("server/discover") {
        return json_answer(StatusCode::OK, &discover_answer(msg.get("id"), &init));
    }
    strip_protocol_meta(msg);
    let mut restore = HashMap::new();
    if let Some(id) = msg.get_mut("id") {
        let wire = Value::from(format!(
            "tollgate-{}",
            proc.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        restore.insert(wire.to_string(), std::mem::replace(id, wire));
    }
    send(x, proc, items, false, restore, Some(&key)).await
}

/// The gateway's own `initialize` of a process for stateless clients; its result.
async fn initialize(proc: &Arc<Proc>) -> Result<Value, String> {
    let id = Value::from("tollgate-initialize");
    let (tx, mut rx) = mpsc::channel(1);
    proc.routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .waiting
        .insert(id.to_string(), tx);
    let request = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": INIT_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")},
    }});
    proc.write(format!("{request}\n").as_bytes())
        .await
        .map_err(|e| format!("initialize not written: {e}"))?;
    let answer = tokio::time::timeout(INIT_TIMEOUT, rx.recv())
        .await
        .map_err(|_| {
            format!(
                "no answer to initialize within {} s",
                INIT_TIMEOUT.as_secs()
            )
        })?
        .ok_or("the process ended before it answered initialize")?;
    let result = answer.get("result").cloned().ok_or_else(|| {
        format!(
            "initialize failed: {}",
            answer.get("error").unwrap_or(&Value::Null)
        )
    })?;
    let version = result.get("protocolVersion").and_then(Value::as_str);
    if !version.is_some_and(|v| PROTOCOL_VERSIONS.contains(&v)) {
        return Err(format!(
            "the server chose protocol version {version:?}, which the gateway does not relay"
        ));
    }
    let done = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    proc.write(format!("{done}\n").as_bytes())
        .await
        .map_err(|e| format!("notifications/initialized not written: {e}"))?;
    Ok(result)
}

/// `server/discover`, answered from the process's `initialize` result. Change notifications
/// are not offered: the gateway does not serve `subscriptions/listen` for a stdio server.
fn discover_answer(id: Option<&Value>, init: &Value) -> Value {
    let mut caps = init
        .get("capabilities")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    if let Some(caps) = caps.as_object_mut() {
        for cap in caps.values_mut().filter_map(Value::as_object_mut) {
            cap.remove("listChanged");
            cap.remove("subscribe");
        }
    }
    let mut result = serde_json::json!({
        "supportedVersions": [STATELESS_VERSION],
        "capabilities": caps,
        "_meta": {"io.modelcontextprotocol/serverInfo": init.get("serverInfo")},
    });
    if let Some(i) = init.get("instructions") {
        result["instructions"] = i.clone();
    }
    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Removes the revision's per-request `_meta` fields (protocol version, client capabilities
/// and info): the process speaks the revision the gateway initialised it with.
fn strip_protocol_meta(msg: &mut Value) {
    let Some(params) = msg.get_mut("params").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut) {
        meta.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
        if meta.is_empty() {
            params.remove("_meta");
        }
    }
}

/// Writes `items` to the process and answers with what it writes back. `restore`: the ids
/// the gateway gave requests, and the client's own; `key`: the process's entry, dropped
/// when it no longer reads.
async fn send(
    x: &Exchange,
    proc: Arc<Proc>,
    items: Vec<Value>,
    batch: bool,
    restore: HashMap<String, Value>,
    key: Option<&str>,
) -> Response<UpstreamBody> {
    let resource = x.target.resource.name.as_str();
    proc.touch();
    let ids: HashSet<String> = items
        .iter()
        .filter(|m| m.get("method").is_some())
        .filter_map(|m| m.get("id"))
        .map(Value::to_string)
        .collect();
    let sse = super::accepts_event_stream(&x.parts.headers);
    let (tx, rx) = mpsc::channel(QUEUE);
    let stream = {
        let mut r = proc.routes.lock().unwrap_or_else(|e| e.into_inner());
        for id in &ids {
            r.waiting.insert(id.clone(), tx.clone());
        }
        if sse && !ids.is_empty() {
            r.next_stream += 1;
            let k = r.next_stream;
            r.streams.push((k, tx.clone()));
            Some(k)
        } else {
            None
        }
    };
    drop(tx);
    let mut lines = Vec::new();
    for m in &items {
        lines.extend_from_slice(m.to_string().as_bytes());
        lines.push(b'\n');
    }
    if let Err(e) = proc.write(&lines).await {
        proc.forget(&ids, stream);
        tracing::warn!(resource, pid = proc.pid, error = %e, "stdio MCP server does not read its input");
        if let Some(k) = key {
            x.gw.mcp_stdio.remove(resource, k);
        }
        proc.stop("protocol");
        return error(
            StatusCode::BAD_GATEWAY,
            None,
            "the MCP server process has ended; send the request again (a session-based client: start a new session with initialize)",
        );
    }
    if ids.is_empty() {
        return empty(StatusCode::ACCEPTED);
    }
    answer(proc, rx, ids, stream, sse, batch, restore)
}

fn answer(
    proc: Arc<Proc>,
    rx: mpsc::Receiver<Value>,
    outstanding: HashSet<String>,
    stream: Option<u64>,
    sse: bool,
    batch: bool,
    restore: HashMap<String, Value>,
) -> Response<UpstreamBody> {
    let body = Answer {
        proc,
        rx,
        outstanding,
        stream,
        sse,
        batch,
        restore,
        collected: Vec::new(),
        done: false,
        ends_when_answered: !sse || stream.is_some(),
    };
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if sse {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A POST's (or the GET stream's) answer, as the process writes it.
struct Answer {
    proc: Arc<Proc>,
    rx: mpsc::Receiver<Value>,
    /// Ids of the requests not answered yet (the body ends when none is left).
    outstanding: HashSet<String>,
    stream: Option<u64>,
    sse: bool,
    batch: bool,
    /// The client's ids of the requests the gateway gave ids of its own, by the gateway's.
    restore: HashMap<String, Value>,
    collected: Vec<Value>,
    done: bool,
    /// `false` for the GET stream, which lasts as long as the process.
    ends_when_answered: bool,
}

impl Answer {
    fn finish(&mut self) -> Option<Bytes> {
        self.done = true;
        // Requests the process will never answer (it ended): an error each.
        let mut ended: Vec<Value> = self
            .outstanding
            .drain()
            .map(|id| {
                let id: Value = self
                    .restore
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| serde_json::from_str(&id).unwrap_or(Value::Null));
                jsonrpc::error_response(
                    Some(&id),
                    jsonrpc::UNAVAILABLE,
                    "the MCP server process ended before it answered",
                    None,
                )
            })
            .collect();
        if self.sse {
            let out: String = ended
                .iter()
                .map(|m| format!("event: message\ndata: {m}\n\n"))
                .collect();
            return (!out.is_empty()).then(|| Bytes::from(out));
        }
        self.collected.append(&mut ended);
        if self.collected.is_empty() {
            return None;
        }
        let v = if self.batch || self.collected.len() > 1 {
            Value::Array(std::mem::take(&mut self.collected))
        } else {
            self.collected.remove(0)
        };
        Some(Bytes::from(v.to_string()))
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.ends_when_answered && this.outstanding.is_empty() {
                return Poll::Ready(this.finish().map(|b| Ok(Frame::data(b))));
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(this.finish().map(|b| Ok(Frame::data(b))));
                }
                Poll::Ready(Some(mut msg)) => {
                    this.proc.touch();
                    if msg.get("method").is_none() {
                        if let Some(id) = msg.get_mut("id") {
                            let wire = id.to_string();
                            this.outstanding.remove(&wire);
                            if let Some(own) = this.restore.get(&wire) {
                                *id = own.clone();
                            }
                        }
                    }
                    if this.sse {
                        let out = format!("event: message\ndata: {msg}\n\n");
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                    this.collected.push(msg);
                }
            }
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.proc.forget(&self.outstanding, self.stream);
    }
}
