//! Shared set-up for the integration tests: a PKI made at test time, a real TLS PostgreSQL
//! (from the installed binaries), and the real `tollgate` binary serving in front of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_testsupport::{ClusterOptions, PgCluster};
use tollgate_tls::pki::{self, IssuedFiles};

pub mod drivers;
pub mod http_env;
pub mod idp;
pub mod mysql;
pub mod upstream;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A CA directory with helpers to issue certificates from it.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let f = pki::init_ca(dir, "test CA").expect("init CA");
        Pki {
            dir: dir.to_path_buf(),
            ca: f.cert,
        }
    }

    pub fn server(&self, name: &str) -> IssuedFiles {
        let spec = pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            ttl: Duration::from_secs(86400),
            not_before: None,
        };
        pki::issue_server(&self.dir, &spec, &self.dir.join(name)).expect("issue server cert")
    }

    pub fn client(&self, name: &str, groups: &[&str]) -> IssuedFiles {
        let spec = pki::ClientCertSpec {
            name: name.into(),
            spiffe: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ttl: Duration::from_secs(3600),
            not_before: None,
        };
        pki::issue_client(&self.dir, &spec, &self.dir.join(name)).expect("issue client cert")
    }

    /// A client certificate that expires `valid_for` from now.
    pub fn client_until(&self, name: &str, groups: &[&str], valid_for: Duration) -> IssuedFiles {
        let skew = Duration::from_secs(2);
        let spec = pki::ClientCertSpec {
            name: name.into(),
            spiffe: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ttl: valid_for + skew,
            not_before: Some(std::time::SystemTime::now() - skew),
        };
        pki::issue_client(&self.dir, &spec, &self.dir.join(name)).expect("issue client cert")
    }

    /// Write (atomically replace) `pki/crl.pem`, revoking `revoked`.
    pub fn write_crl(&self, revoked: &[&IssuedFiles]) -> PathBuf {
        let paths: Vec<&Path> = revoked.iter().map(|f| f.cert.as_path()).collect();
        pki::issue_crl(
            &self.dir,
            &paths,
            Duration::from_secs(86400),
            &self.dir.join("crl.pem"),
        )
        .expect("issue CRL")
    }
}

/// The real `tollgate serve` process; killed on drop.
pub struct Gateway {
    child: Child,
    pub config_path: PathBuf,
    pub pg_port: u16,
    pub admin_port: u16,
    pub log_path: PathBuf,
}

impl Gateway {
    /// Write `config_text` (with `{pg_port}` and `{admin_port}` filled in) to `dir/tollgate.toml`,
    /// start the gateway and wait until `/readyz` answers 200.
    pub fn start(dir: &Path, config_text: &str, envs: &[(&str, &str)]) -> Gateway {
        let pg_port = tollgate_testsupport::free_port();
        let admin_port = tollgate_testsupport::free_port();
        let text = config_text
            .replace("{pg_port}", &pg_port.to_string())
            .replace("{admin_port}", &admin_port.to_string());
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, text).unwrap();
        let log_path = dir.join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tollgate");
        let mut gw = Gateway {
            child,
            config_path,
            pg_port,
            admin_port,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = gw.child.try_wait().unwrap() {
                panic!("tollgate exited early ({status}):\n{}", gw.logs());
            }
            if matches!(gw.http_get("/readyz"), Some((200, _))) {
                return gw;
            }
            if Instant::now() > deadline {
                panic!("tollgate did not become ready:\n{}", gw.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A plain HTTP/1.1 GET on the admin listener: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    pub fn metrics(&self) -> String {
        self.http_get("/metrics").expect("metrics").1
    }

    /// Value of the series whose line starts with `series` (name plus labels, exactly as rendered).
    pub fn metric(&self, series: &str) -> Option<i64> {
        self.metrics().lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }

    /// This gateway's config with its ports turned back into `{pg_port}`/`{admin_port}`, so
    /// [`Gateway::start`] can restart it on the same store and certificates.
    pub fn config_template(&self) -> String {
        std::fs::read_to_string(&self.config_path)
            .unwrap()
            .replace(
                &format!("127.0.0.1:{}", self.pg_port),
                "127.0.0.1:{pg_port}",
            )
            .replace(
                &format!("127.0.0.1:{}", self.admin_port),
                "127.0.0.1:{admin_port}",
            )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until `f` returns true, or panic after `timeout` with `what`.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tollgate reviews ARGS` against the gateway's HTTPS listener on `https`, as `who`.
pub fn reviews_cli(https: u16, ca: &Path, who: &IssuedFiles, args: &[&str]) -> Output {
    let mut all = vec!["reviews"];
    all.extend_from_slice(args);
    gateway_cli(https, ca, who, &all)
}

/// `tollgate ARGS` (a client of the gateway: reviews, access, sessions) against the HTTPS
/// listener on `https`, as `who`.
pub fn gateway_cli(https: u16, ca: &Path, who: &IssuedFiles, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("TOLLGATE_GATEWAY", format!("https://localhost:{https}"))
        .env("TOLLGATE_CA", ca)
        .arg("--cert")
        .arg(&who.cert)
        .arg("--key")
        .arg(&who.key)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tollgate")
}

/// The pending review whose statement starts with `statement_prefix`, as `viewer` lists it,
/// once a held session has opened it.
pub fn pending_review(
    https: u16,
    ca: &Path,
    viewer: &IssuedFiles,
    statement_prefix: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = reviews_cli(https, ca, viewer, &["list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(r) = list["reviews"].as_array().and_then(|l| {
            l.iter()
                .find(|r| {
                    r["statement"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(statement_prefix))
                })
                .cloned()
        }) {
            return r;
        }
        assert!(Instant::now() < deadline, "no pending review: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub const TOKEN: &str = "ci-bot-token-0123456789abcdef";

/// The `[[resources]]` table of PostgreSQL resource `app` on `pg` for group `sre`, with its
/// password written to `dir/app.password`, as the sign-in suites (OIDC, SAML, login) use it.
pub fn app_resource(dir: &Path, pg: &PgCluster) -> String {
    std::fs::write(dir.join("app.password"), &pg.password).unwrap();
    format!(
        r#"
[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:{port}"
database = "{db}"
allow_groups = ["sre"]
[resources.tls]
mode = "verify-full"
ca = "{ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "app.password"
"#,
        port = pg.port,
        db = pg.database,
        ca = pg.ca_cert.display(),
        user = pg.user,
    )
}

pub fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Options for [`Env::start_with`].
pub struct EnvOptions {
    pub cluster: ClusterOptions,
    /// Extra lines for `[server]`.
    pub server_extra: String,
    /// Extra TOML inside the `[[resources]]` table of "app" (before its sub-tables).
    pub resource_extra: String,
    /// Replaces the `[resources.tls]` table of "app".
    pub resource_tls: Option<String>,
    pub client_cert: &'static str,
    pub envs: Vec<(String, String)>,
    /// Runs once the PKI exists, before the gateway starts (e.g. to write a CRL it reads).
    pub prepare: Option<fn(&Pki)>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            cluster: ClusterOptions::default(),
            server_extra: String::new(),
            resource_extra: String::new(),
            resource_tls: None,
            client_cert: "optional",
            envs: vec![],
            prepare: None,
        }
    }
}

/// A TLS PostgreSQL ("app" database), a gateway PKI and the gateway with one resource "app"
/// reachable by groups `sre` and `ci`; alice (sre) has a client certificate, ci-bot a token.
pub struct Env {
    pub gw: Gateway,
    pub pg: PgCluster,
    pub pki: Pki,
    pub alice: IssuedFiles,
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(EnvOptions::default())
    }

    pub fn start_with(opts: EnvOptions) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-it-")
            .tempdir()
            .unwrap();
        let pg = PgCluster::start(opts.cluster).expect("start PostgreSQL (is it installed?)");
        let pki = Pki::new(&tmp.path().join("pki"));
        let gw_cert = pki.server("gateway");
        let alice = pki.client("alice", &["sre"]);
        if let Some(prepare) = opts.prepare {
            prepare(&pki);
        }
        std::fs::write(tmp.path().join("app.password"), &pg.password).unwrap();
        let tls = opts.resource_tls.unwrap_or_else(|| format!("[resources.tls]\nmode = \"verify-full\"\nca = \"{}\"\nserver_name = \"localhost\"\n", pg.ca_cert.display()));
        let config = format!(
            r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "{client_cert}"
store = "sqlite://audit.db"
reload_interval = "200ms"
{server_extra}

[[identity.tokens]]
subject = "ci-bot"
sha256 = "{token_sha}"
groups = ["ci"]

[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:{up_port}"
database = "{db}"
allow_groups = ["sre", "ci"]
{resource_extra}
{tls}
[resources.credentials]
user = "{user}"
password_file = "app.password"
"#,
            cert = gw_cert.cert.display(),
            key = gw_cert.key.display(),
            ca = pki.ca.display(),
            client_cert = opts.client_cert,
            server_extra = opts.server_extra,
            token_sha = sha256_hex(TOKEN),
            up_port = pg.port,
            db = pg.database,
            resource_extra = with_forced_capture(opts.resource_extra),
            user = pg.user,
        );
        let envs: Vec<(&str, &str)> = opts
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let gw = Gateway::start(tmp.path(), &config, &envs);
        Env {
            gw,
            pg,
            pki,
            alice,
            tmp,
        }
    }

    /// libpq conninfo for alice through the gateway with verify-full.
    pub fn conninfo(&self, db: &str) -> String {
        self.conninfo_as(&self.alice, db)
    }

    pub fn conninfo_as(&self, who: &IssuedFiles, db: &str) -> String {
        format!(
            "host=localhost port={} dbname={db} user=alice sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            self.gw.pg_port,
            self.pki.ca.display(),
            who.cert.display(),
            who.key.display()
        )
    }

    /// libpq conninfo for the ci-bot token (sent as the password by the caller via PGPASSWORD).
    pub fn conninfo_token(&self, db: &str) -> String {
        format!(
            "host=localhost port={} dbname={db} user=ci-bot sslmode=verify-full sslrootcert={}",
            self.gw.pg_port,
            self.pki.ca.display()
        )
    }

    /// Run psql with `args` against `conninfo`; `-X -A -t -v ON_ERROR_STOP=1` are added.
    pub fn psql(&self, conninfo: &str, args: &[&str]) -> Output {
        psql_env(conninfo, args, &[])
    }

    /// A tokio-postgres client through the gateway as alice (verify-full, client certificate).
    pub async fn client(&self) -> tokio_postgres::Client {
        self.client_as(&self.alice, "app").await
    }

    pub async fn client_as(&self, who: &IssuedFiles, db: &str) -> tokio_postgres::Client {
        let cfg = client_tls(&self.pki.ca, Some(who));
        let conninfo = format!(
            "host=localhost port={} dbname={db} user=alice sslmode=require",
            self.gw.pg_port
        );
        let (client, conn) = tokio_postgres::connect(
            &conninfo,
            tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
        )
        .await
        .expect("connect through tollgate");
        tokio::spawn(conn);
        client
    }

    /// Waits until no pooled connection of "app" is leased (every client between transactions).
    pub fn wait_pool_idle(&self) {
        wait_for(
            Duration::from_secs(5),
            "every connection back in the pool",
            || {
                self.gw
                    .metric("tollgate_pool_connections{resource=\"app\",state=\"active\"}")
                    == Some(0)
            },
        );
    }

    /// The gateway's connections to the test cluster, as the server counts them.
    pub fn gateway_backends(&self) -> usize {
        let out = self
            .pg
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND backend_type = 'client backend'",
                self.pg.user
            ))
            .unwrap();
        out.trim().parse().unwrap()
    }

    /// All events the gateway recorded, read straight from its SQLite store, as JSON rows.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["audit", "verify", "--json", "--config"])
            .arg(&self.gw.config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "audit verify failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        read_events(&self.tmp.path().join("audit.db"))
    }
}

impl Env {
    /// Poll the audit store until `done(events)` holds (events are written asynchronously in batches).
    pub fn events_until(
        &self,
        what: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let evs = read_events(&self.tmp.path().join("audit.db"));
            if done(&evs) {
                return evs;
            }
            if Instant::now() > deadline {
                panic!("audit store never showed {what}; events: {evs:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Events once `n` sessions have closed.
    pub fn events_after_closes(&self, n: usize) -> Vec<serde_json::Value> {
        self.events_until(&format!("{n} session.close events"), |evs| {
            evs.iter().filter(|e| e["kind"] == "session.close").count() >= n
        })
    }
}

/// With `TOLLGATE_IT_CAPTURE` set, every test resource captures results, which makes the relay
/// track every result's shape: `scripts/test` runs the protocol suite once more that way.
fn with_forced_capture(resource_extra: String) -> String {
    if std::env::var_os("TOLLGATE_IT_CAPTURE").is_none()
        || resource_extra.contains("capture_results")
    {
        return resource_extra;
    }
    format!("capture_results = true\n{resource_extra}")
}

/// Connections refused before authentication with `reason`, summed over the gateway's
/// aggregate `connection.refused` events (one per reason and interval).
pub fn refused_count(evs: &[serde_json::Value], reason: &str) -> u64 {
    evs.iter()
        .filter(|e| e["kind"] == "connection.refused" && e["payload"]["reason"] == reason)
        .map(|e| e["payload"]["count"].as_u64().unwrap_or(0))
        .sum()
}

/// Events from a SQLite audit store, oldest first: {session_id, kind, payload}.
/// Values a SQL `result` event says were masked (its `masked` list summed over columns).
#[allow(dead_code)]
pub fn masked_values(payload: &serde_json::Value) -> u64 {
    payload["masked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["values"].as_u64())
        .sum()
}

pub fn read_events(db: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,json,sys\nc=sqlite3.connect(sys.argv[1])\nprint(json.dumps([{'session_id':r[0],'kind':r[1],'payload':json.loads(r[2])} for r in c.execute('select session_id,kind,payload from events order by id')]))")
        .arg(db)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn psql_env(conninfo: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(conninfo)
        .args(args)
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("psql")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A rustls client config trusting `ca`, presenting `who` when given.
pub fn client_tls(ca: &Path, who: Option<&IssuedFiles>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in tollgate_tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(tollgate_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match who {
        Some(w) => {
            use rustls_pki_types::pem::PemObject;
            let certs = tollgate_tls::load_certs(&w.cert).unwrap();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&w.key).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
        None => b.with_no_client_auth(),
    }
}

pub fn client_tls_arc(ca: &Path, who: Option<&IssuedFiles>) -> Arc<rustls::ClientConfig> {
    Arc::new(client_tls(ca, who))
}

impl Env {
    /// Like [`Env::client_as`], but the connection's asynchronous messages (NOTICEs and
    /// LISTEN/NOTIFY notifications) are forwarded to the returned receiver instead of dropped.
    pub async fn client_with_messages(
        &self,
        who: &IssuedFiles,
        db: &str,
    ) -> (
        tokio_postgres::Client,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
    ) {
        let cfg = client_tls(&self.pki.ca, Some(who));
        let conninfo = format!(
            "host=localhost port={} dbname={db} user=alice sslmode=require",
            self.gw.pg_port
        );
        let (client, mut conn) = tokio_postgres::connect(
            &conninfo,
            tokio_postgres_rustls::MakeRustlsConnect::new(cfg),
        )
        .await
        .expect("connect through tollgate");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                match m {
                    Ok(m) => {
                        let _ = tx.send(m);
                    }
                    Err(_) => break,
                }
            }
        });
        (client, rx)
    }

    /// `pgbench -i -s 1` straight against the test cluster (bypassing the gateway).
    pub fn pgbench_init(&self) {
        let out = Command::new("pgbench")
            .args(["-i", "-s", "1", "-q"])
            .arg(self.direct_conninfo())
            .env("PGPASSWORD", &self.pg.password)
            .env_remove("PGSSLMODE")
            .output()
            .expect("pgbench");
        assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
    }

    /// libpq conninfo straight to the test cluster (bypassing the gateway) as its login user,
    /// with verify-full; pass `env.pg.password` as PGPASSWORD.
    pub fn direct_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={} sslmode=verify-full sslrootcert={}",
            self.pg.port,
            self.pg.user,
            self.pg.database,
            self.pg.ca_cert.display()
        )
    }
}

/// Resident set size of process `pid` in KiB (VmRSS from /proc), if it is still running.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Every tag (`tg-` followed by letters, digits and dashes) in `text`: the tests that compare
/// PostgreSQL's statement log with the audit trail mark each statement with a distinct one.
pub fn tags_in(text: &str, out: &mut BTreeSet<String>) {
    let mut rest = text;
    while let Some(at) = rest.find("tg-") {
        let tail = &rest[at..];
        let end = tail
            .char_indices()
            .skip(3)
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-'))
            .map(|(i, _)| i)
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
}

/// Tags of the statements PostgreSQL logged as executed: `LOG:  statement: ...` (simple
/// protocol) and `LOG:  execute <name>: ...` (extended protocol). `STATEMENT:` context lines of
/// errors and `DETAIL:` parameter lines are not executions and are ignored.
pub fn pg_logged_tags(log: &str) -> BTreeSet<String> {
    let mut tags = BTreeSet::new();
    for line in log.lines() {
        for marker in ["LOG:  statement: ", "LOG:  execute "] {
            if let Some(at) = line.find(marker) {
                tags_in(&line[at + marker.len()..], &mut tags);
            }
        }
    }
    tags
}

/// The (pid, secret) a CancelToken holds: let it send its CancelRequest to a stand-in server
/// (SSLRequest, TLS, then the 16-byte request) and read it there.
pub async fn cancel_key(token: &tokio_postgres::CancelToken, pki: &Pki) -> (i32, i32) {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_postgres::tls::MakeTlsConnect;
    let srv = pki.server("standin");
    let mut cfg = rustls::ServerConfig::builder_with_provider(tollgate_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            tollgate_tls::load_certs(&srv.cert).unwrap(),
            rustls_pki_types::PrivateKeyDer::from_pem_file(&srv.key).unwrap(),
        )
        .unwrap();
    // The client hangs up right after its request: nothing may be written after the handshake.
    cfg.send_tls13_tickets = 0;
    let (client_end, mut server_end) = tokio::io::duplex(4096);
    let server = async move {
        let mut ssl_request = [0u8; 8];
        server_end.read_exact(&mut ssl_request).await?;
        server_end.write_all(b"S").await?;
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
            .accept(server_end)
            .await?;
        let mut msg = [0u8; 16];
        tls.read_exact(&mut msg).await?;
        Ok::<_, std::io::Error>(msg)
    };
    let mut mk = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(&pki.ca, None));
    let connect =
        MakeTlsConnect::<tokio::io::DuplexStream>::make_tls_connect(&mut mk, "localhost").unwrap();
    let (msg, sent) = tokio::join!(server, token.cancel_query_raw(client_end, connect));
    let msg = msg.unwrap_or_else(|e| panic!("stand-in server: {e}; client: {sent:?}"));
    assert_eq!(msg[..4], 16i32.to_be_bytes());
    assert_eq!(msg[4..8], 80877102i32.to_be_bytes());
    (
        i32::from_be_bytes(msg[8..12].try_into().unwrap()),
        i32::from_be_bytes(msg[12..16].try_into().unwrap()),
    )
}

/// A two-thread tokio runtime for a test that is not `#[tokio::test]`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The output of `curl -s -i`: status, head, body.
pub fn curl_answer(out: &Output, what: &str) -> (u16, String, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("curl {what}: {text}"));
    (status, head.to_string(), body.to_string())
}

/// A console (`origin`, trusting `ca`) as curl sees it, one request at a time.
pub struct ConsoleCurl {
    pub ca: PathBuf,
    pub origin: String,
}

impl ConsoleCurl {
    /// `curl -i` against the console: (status, headers, body).
    pub fn curl(&self, args: &[&str]) -> (u16, String, String) {
        let out = Command::new("curl")
            .args(["-s", "-i", "--cacert"])
            .arg(&self.ca)
            .args(args)
            .output()
            .expect("curl");
        curl_answer(&out, &format!("{args:?}"))
    }

    /// Sign in with `token` through the form, as a browser would: the console session cookie.
    pub fn login(&self, token: &str) -> String {
        let (status, head, _) = self.curl(&[&format!("{}/login", self.origin)]);
        assert_eq!(status, 200);
        let login = set_cookie_value(&head, "__Host-tollgate_login").expect("login cookie");
        let (status, head, body) = self.curl(&[
            "-H",
            &format!("Origin: {}", self.origin),
            "-H",
            &format!("Cookie: __Host-tollgate_login={login}"),
            "--data-urlencode",
            &format!("token={token}"),
            "--data-urlencode",
            &format!("csrf={login}"),
            &format!("{}/login", self.origin),
        ]);
        assert_eq!(status, 303, "{head}\n{body}");
        let line = head
            .lines()
            .find(|l| {
                l.to_ascii_lowercase()
                    .starts_with("set-cookie: __host-tollgate_console=")
            })
            .expect("a console session cookie");
        let value = set_cookie_value(&head, "__Host-tollgate_console").unwrap();
        assert_eq!(value.len(), 64, "32 random bytes, hex: {line}");
        assert!(
            line.ends_with("; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age=3600"),
            "{line}"
        );
        value
    }

    /// A console POST with `cookie` and `form` fields: (status, headers, body).
    pub fn post(
        &self,
        path: &str,
        cookie: &str,
        origin: Option<&str>,
        form: &[(&str, &str)],
    ) -> (u16, String, String) {
        let mut args = vec![
            "-H".to_string(),
            format!("Cookie: __Host-tollgate_console={cookie}"),
        ];
        if let Some(o) = origin {
            args.extend(["-H".into(), format!("Origin: {o}")]);
        }
        for (k, v) in form {
            args.extend(["--data-urlencode".into(), format!("{k}={v}")]);
        }
        if form.is_empty() {
            args.extend(["-X".into(), "POST".into()]);
        }
        args.push(format!("{}{path}", self.origin));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.curl(&args)
    }

    /// A console page as `cookie`'s viewer: (status, body).
    pub fn page(&self, cookie: &str, path: &str) -> (u16, String) {
        let (status, _, body) = self.curl(&[
            "-H",
            &format!("Cookie: __Host-tollgate_console={cookie}"),
            &format!("{}{path}", self.origin),
        ]);
        (status, body)
    }
}

/// The value `name` is set to by a `Set-Cookie` header of `head`.
pub fn set_cookie_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if !k.eq_ignore_ascii_case("set-cookie") {
            return None;
        }
        let pair = v.trim().split(';').next()?;
        let (n, val) = pair.split_once('=')?;
        (n == name && !val.is_empty()).then(|| val.to_string())
    })
}

/// The hidden CSRF field of a console page.
pub fn csrf_of(page: &str) -> String {
    let at =
        page.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}
