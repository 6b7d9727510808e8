//! Starts and stops real PostgreSQL servers from the installed binaries, for tests and for
//! `tollgate demo`; never a mock.
//!
//! A [`PgCluster`] is a fresh `initdb` in its own directory, listening on 127.0.0.1 and a
//! unix socket in that directory, with TLS from tollgate's own PKI, one password-protected
//! login user owning one database, and a trusted superuser on the socket for setup. It is
//! stopped (`pg_ctl stop -m immediate`) when dropped. As root, every server-side command
//! runs as the `postgres` OS user through `runuser`, because `initdb` refuses root.
//!
//! [`MariaDb`] does the same for MariaDB (see the `mariadb` module).
//!
//! This crate is linked into the `tollgate` binary: no test-only code, no heavy dependencies.

mod mariadb;
pub use mariadb::{
    mariadb_binaries, mariadb_install_hint, quote_literal as mariadb_quote_literal, MariaDb,
    MariaDbBinaries, MariaDbOptions,
};

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tollgate_tls::pki::{self, PkiError, ServerCertSpec};

const START_ATTEMPTS: u32 = 3;
const LOG_TAIL_LINES: usize = 40;
/// `sun_path` is 108 bytes on Linux; leave room for the terminating NUL.
const MAX_SOCKET_PATH: usize = 100;
const SERVER_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const SUPERUSER: &str = "postgres";

/// Directory holding `initdb` and `pg_ctl`: `$TOLLGATE_PG_BIN` if set, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else the first `$PATH` entry that has both
/// (resolving symlinks such as `/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb`).
pub fn pg_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("TOLLGATE_PG_BIN") {
        let dir = PathBuf::from(dir);
        return has_tools(&dir).then_some(dir);
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, bin)) = versioned.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        if !has_tools(&dir) {
            return None;
        }
        let real = fs::canonicalize(dir.join("initdb")).ok()?;
        match real.parent() {
            Some(parent) if has_tools(parent) => Some(parent.to_path_buf()),
            _ => Some(dir),
        }
    })
}

/// What to tell a user whose machine has no PostgreSQL server binaries.
pub fn install_hint() -> &'static str {
    "install PostgreSQL server binaries: sudo apt-get install -y postgresql (Debian/Ubuntu), \
     or point TOLLGATE_PG_BIN at the directory holding initdb and pg_ctl"
}

static HANDED_OUT_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed
/// out before (so parallel tests in one process never get the same port).
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("cannot bind an ephemeral port on 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("bound socket has an address")
            .port();
        if HANDED_OUT_PORTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// How the login user authenticates over TCP; also decides `password_encryption`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMethod {
    #[default]
    ScramSha256,
    Md5,
    /// Cleartext password (`password` in pg_hba.conf).
    Password,
    Trust,
}

impl AuthMethod {
    fn hba_method(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Password => "password",
            AuthMethod::Trust => "trust",
        }
    }

    /// md5 in pg_hba.conf only does the md5 exchange when the stored verifier is md5.
    fn password_encryption(self) -> &'static str {
        match self {
            AuthMethod::Md5 => "md5",
            _ => "scram-sha-256",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `ssl = on` with a server certificate from tollgate's PKI, and only `hostssl` lines in
    /// pg_hba.conf, so plaintext TCP connections are refused.
    pub tls: bool,
    /// With `tls`: also accept plaintext (`host ...` lines), e.g. for `tollgate scan` tests.
    pub also_allow_plaintext: bool,
    /// DNS SANs of the server certificate; 127.0.0.1 is always added as an IP SAN.
    pub server_dns: Vec<String>,
    pub auth: AuthMethod,
    /// The password-protected login user that owns `database`.
    pub user: String,
    pub password: String,
    pub database: String,
    /// Run as superuser in `database` after start (e.g. a sample schema); tables and
    /// sequences it creates in `public` are granted to `user`.
    pub init_sql: Vec<String>,
    /// Appended to postgresql.conf, e.g. `log_statement = 'all'`.
    pub extra_conf: Vec<String>,
    /// Sign the server certificate with this existing CA (`ca.crt` + `ca.key`) instead of
    /// one created in `DIR/pki`.
    pub ca_dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            tls: true,
            also_allow_plaintext: false,
            server_dns: vec!["localhost".to_owned()],
            auth: AuthMethod::default(),
            user: "tollgate_app".to_owned(),
            password: random_password(),
            database: "app".to_owned(),
            init_sql: Vec::new(),
            extra_conf: Vec::new(),
            ca_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found in $TOLLGATE_PG_BIN, /usr/lib/postgresql/*/bin or $PATH; {}", install_hint())]
    NotInstalled,
    #[error(
        "running as root, but there is no `postgres` OS user to run the server as; {}",
        install_hint()
    )]
    NoPostgresUser,
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("certificate setup failed: {0}")]
    Pki(#[from] PkiError),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "MariaDB server binaries (mariadbd, mariadb-install-db, mariadb) not found; {}",
        mariadb_install_hint()
    )]
    MariaDbNotInstalled,
    #[error(
        "running as root, but there is no `mysql` OS user to run the server as; {}",
        mariadb_install_hint()
    )]
    NoMysqlUser,
    #[error("MariaDB did not start after {attempts} attempt(s); last lines of {}:\n{log_tail}", log.display())]
    MariaDbStart {
        attempts: u32,
        log: PathBuf,
        log_tail: String,
    },
    #[error("PostgreSQL did not start after {attempts} attempt(s); last lines of {}:\n{log_tail}", log.display())]
    Start {
        attempts: u32,
        log: PathBuf,
        log_tail: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HarnessError {
    let path = path.to_path_buf();
    move |source| HarnessError::Io {
        action,
        path,
        source,
    }
}

/// Runs PostgreSQL programs, as the `postgres` OS user when we are root.
#[derive(Clone, Debug)]
struct Runner {
    bin: PathBuf,
    /// uid and gid of `postgres` when running as root.
    as_postgres: Option<(u32, u32)>,
    cwd: PathBuf,
}

impl Runner {
    fn new(cwd: &Path) -> Result<Runner, HarnessError> {
        let bin = pg_bin_dir().ok_or(HarnessError::NotInstalled)?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user(SUPERUSER).ok_or(HarnessError::NoPostgresUser)?)
        } else {
            None
        };
        Ok(Runner {
            bin,
            as_postgres,
            cwd: cwd.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let path = if path.is_file() {
            path
        } else {
            PathBuf::from(program)
        };
        let mut cmd = match self.as_postgres {
            Some(_) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", SUPERUSER, "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        };
        // Connection settings come from arguments only, never from the caller's PG* env.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        // A cwd the postgres user can enter, and messages we can search in the log.
        cmd.current_dir(&self.cwd).env("LC_ALL", "C");
        cmd
    }

    /// Makes `path` belong to the server user (no-op when not root).
    fn give(&self, path: &Path) -> Result<(), HarnessError> {
        if let Some((uid, gid)) = self.as_postgres {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_err("cannot chown", path))?;
        }
        Ok(())
    }

    /// Whether the server user can reach `dir` (always true when not root).
    fn can_enter(&self, dir: &Path) -> bool {
        self.as_postgres.is_none()
            || Command::new("runuser")
                .args(["-u", SUPERUSER, "--", "test", "-x"])
                .arg(dir)
                .current_dir("/")
                .status()
                .is_ok_and(|s| s.success())
    }
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; getpwnam_r is thread-safe.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

fn run(mut cmd: Command, stdin: Option<&str>) -> Result<Output, HarnessError> {
    let described = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| HarnessError::Command {
        command: described.clone(),
        status: "could not spawn".to_owned(),
        stderr: source.to_string(),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A failed write shows up as the program's own error below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| HarnessError::Command {
            command: described.clone(),
            status: "could not wait".to_owned(),
            stderr: source.to_string(),
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(HarnessError::Command {
            command: described,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn random_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .expect("cannot read /dev/urandom");
    // 256 % 57 != 0 gives a slight bias; irrelevant for a throwaway test password.
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The CA that signs a test server's certificate (`ca_dir`, or one made in `dir/pki`) and a
/// server certificate from it in `dir/server.crt`/`.key` for `dns` and 127.0.0.1.
fn server_certificate(
    dir: &Path,
    ca_dir: Option<&Path>,
    ca_name: &str,
    dns: &[String],
) -> Result<(PathBuf, pki::IssuedFiles), HarnessError> {
    let ca_dir = match ca_dir {
        Some(ca_dir) => ca_dir.to_path_buf(),
        None => {
            let ca_dir = dir.join("pki");
            if !ca_dir.join("ca.key").exists() {
                pki::init_ca(&ca_dir, ca_name)?;
            }
            // Clients running as other users may need ca.crt; ca.key stays 0600.
            fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o755))
                .map_err(io_err("cannot chmod", &ca_dir))?;
            ca_dir
        }
    };
    let issued = pki::issue_server(
        &ca_dir,
        &ServerCertSpec {
            dns: dns.to_vec(),
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ttl: SERVER_CERT_TTL,
            not_before: None,
        },
        &dir.join("server"),
    )?;
    Ok((ca_dir, issued))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), HarnessError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err("cannot create directory", path))?;
    // DirBuilder's mode is filtered by the umask and skips existing directories.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot chmod", path))
}

fn copy_private(from: &Path, to: &Path, mode: u32) -> Result<(), HarnessError> {
    let bytes = fs::read(from).map_err(io_err("cannot read", from))?;
    let _ = fs::remove_file(to);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(io_err("cannot write", to))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A running throwaway PostgreSQL server; stopped when dropped.
#[derive(Debug)]
pub struct PgCluster {
    /// Holds `pki/` (unless `ca_dir` was given), the server certificate, and normally
    /// `data/`, the socket and the log.
    pub dir: PathBuf,
    pub port: u16,
    /// "127.0.0.1"
    pub host: String,
    pub user: String,
    pub password: String,
    pub database: String,
    /// The CA that signed the server certificate.
    pub ca_dir: PathBuf,
    /// `ca_dir/ca.crt`: the `sslrootcert` for clients.
    pub ca_cert: PathBuf,
    /// The server certificate (leaf only), e.g. to compute channel-binding data.
    pub server_cert: PathBuf,
    pub tls: bool,
    runner: Runner,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    // Dropped after `Drop::drop` has stopped the server.
    _socket_temp: Option<TempDir>,
    _run_temp: Option<TempDir>,
    _temp: Option<TempDir>,
}

impl PgCluster {
    /// Starts a cluster in a new temporary directory, removed again on drop. Blocking.
    pub fn start(opts: ClusterOptions) -> Result<PgCluster, HarnessError> {
        let temp = new_temp_dir("tollgate-pg-")?;
        let dir = temp.path().to_path_buf();
        Self::start_impl(dir, Some(temp), opts)
    }

    /// Starts a cluster in `dir` (created if missing; a previous `dir/data` is replaced),
    /// which is left in place for the user to inspect. The server is still stopped on drop.
    pub fn start_in(dir: &Path, opts: ClusterOptions) -> Result<PgCluster, HarnessError> {
        make_dir(dir, 0o755)?;
        let dir = fs::canonicalize(dir).map_err(io_err("cannot resolve", dir))?;
        Self::start_impl(dir, None, opts)
    }

    fn start_impl(
        dir: PathBuf,
        temp: Option<TempDir>,
        opts: ClusterOptions,
    ) -> Result<PgCluster, HarnessError> {
        let runner = Runner::new(&dir)?;

        // As root, the server user must reach its data dir; a user dir under /root often
        // is not reachable, so the server's own files then live under /tmp instead.
        let (run_dir, run_temp) = if runner.can_enter(&dir) {
            (dir.clone(), None)
        } else {
            let t = new_temp_dir("tollgate-pg-run-")?;
            (t.path().to_path_buf(), Some(t))
        };
        let runner = Runner {
            cwd: run_dir.clone(),
            ..runner
        };

        let (ca_dir, issued) = server_certificate(
            &dir,
            opts.ca_dir.as_deref(),
            "tollgate test PostgreSQL CA",
            &opts.server_dns,
        )?;

        let data_dir = run_dir.join("data");
        if data_dir.exists() {
            fs::remove_dir_all(&data_dir).map_err(io_err("cannot remove", &data_dir))?;
        }
        make_dir(&data_dir, 0o700)?;
        runner.give(&data_dir)?;

        let wanted_socket_dir = run_dir.join("sock");
        let socket_path_len = wanted_socket_dir.as_os_str().len() + "/.s.PGSQL.65535".len();
        let (socket_dir, socket_temp) = if socket_path_len <= MAX_SOCKET_PATH {
            make_dir(&wanted_socket_dir, 0o755)?;
            (wanted_socket_dir, None)
        } else {
            let t = new_temp_dir("tgpg-")?;
            (t.path().to_path_buf(), Some(t))
        };
        runner.give(&socket_dir)?;

        let log_path = run_dir.join("postgres.log");
        fs::write(&log_path, b"").map_err(io_err("cannot create", &log_path))?;
        runner.give(&log_path)?;

        let mut cluster = PgCluster {
            dir,
            port: 0,
            host: "127.0.0.1".to_owned(),
            user: opts.user.clone(),
            password: opts.password.clone(),
            database: opts.database.clone(),
            ca_cert: ca_dir.join("ca.crt"),
            ca_dir,
            server_cert: issued.cert.clone(),
            tls: opts.tls,
            runner,
            data_dir,
            socket_dir,
            log_path,
            _socket_temp: socket_temp,
            _run_temp: run_temp,
            _temp: temp,
        };
        cluster.init(&opts, &issued)?;
        cluster.start_server()?;
        cluster.create_user_and_database(&opts)?;
        Ok(cluster)
    }

    fn init(&self, opts: &ClusterOptions, issued: &pki::IssuedFiles) -> Result<(), HarnessError> {
        let mut initdb = self.runner.command("initdb");
        initdb.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, None)?;

        for (from, name, mode) in [
            (&issued.cert, "server.crt", 0o644),
            (&issued.key, "server.key", 0o600),
        ] {
            let to = self.data_dir.join(name);
            copy_private(from, &to, mode)?;
            self.runner.give(&to)?;
        }

        let mut conf = vec![
            "# added by tollgate-testsupport".to_owned(),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!(
                "unix_socket_directories = {}",
                quote_literal(&self.socket_dir.to_string_lossy())
            ),
            "fsync = off".to_owned(),
            "synchronous_commit = off".to_owned(),
            "full_page_writes = off".to_owned(),
            "shared_buffers = 32MB".to_owned(),
            "max_connections = 200".to_owned(),
            format!(
                "password_encryption = '{}'",
                opts.auth.password_encryption()
            ),
            format!("ssl = {}", if opts.tls { "on" } else { "off" }),
            "ssl_cert_file = 'server.crt'".to_owned(),
            "ssl_key_file = 'server.key'".to_owned(),
        ];
        conf.extend(opts.extra_conf.iter().cloned());
        append_file(&self.data_dir.join("postgresql.conf"), &conf.join("\n"))?;

        let method = opts.auth.hba_method();
        let mut hba = vec![
            "# written by tollgate-testsupport".to_owned(),
            "local all all trust".to_owned(),
        ];
        if opts.tls {
            hba.push(format!("hostssl all all 127.0.0.1/32 {method}"));
        }
        if !opts.tls || opts.also_allow_plaintext {
            hba.push(format!("host all all 127.0.0.1/32 {method}"));
        }
        let hba_path = self.data_dir.join("pg_hba.conf");
        fs::write(&hba_path, hba.join("\n") + "\n").map_err(io_err("cannot write", &hba_path))
    }

    fn start_server(&mut self) -> Result<(), HarnessError> {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            let log_start = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
            let mut pg_ctl = self.runner.command("pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_path)
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start");
            let result = run(pg_ctl, None);
            if result.is_ok() {
                return Ok(());
            }
            // pg_ctl may have given up while a postmaster is still coming up.
            self.stop();
            let log = fs::read(&self.log_path).unwrap_or_default();
            let this_attempt = String::from_utf8_lossy(&log[(log_start as usize).min(log.len())..]);
            let port_taken = this_attempt.contains("could not bind")
                || this_attempt.contains("Address already in use");
            if !port_taken || attempt == START_ATTEMPTS {
                let mut tail = log_tail(&self.log_path);
                if let Err(e) = result {
                    tail = format!("{tail}\n{e}");
                }
                return Err(HarnessError::Start {
                    attempts: attempt,
                    log: self.log_path.clone(),
                    log_tail: tail,
                });
            }
        }
        unreachable!("the last attempt returns")
    }

    fn create_user_and_database(&self, opts: &ClusterOptions) -> Result<(), HarnessError> {
        let user = quote_ident(&opts.user);
        let mut setup = format!(
            "SET password_encryption = '{}';\nCREATE ROLE {user} LOGIN PASSWORD {};\n",
            opts.auth.password_encryption(),
            quote_literal(&opts.password),
        );
        if opts.database != "postgres" {
            setup.push_str(&format!(
                "CREATE DATABASE {} OWNER {user};\n",
                quote_ident(&opts.database)
            ));
        }
        self.psql_in("postgres", &setup)?;
        // Tables and sequences the superuser creates in init_sql are the login user's to use.
        self.psql(&format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO {user};\n\
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO {user};\n"
        ))?;
        for sql in &opts.init_sql {
            self.psql(sql)?;
        }
        Ok(())
    }

    /// Runs `sql` as the superuser in `database` over the unix socket
    /// (`psql -X -A -t -v ON_ERROR_STOP=1`) and returns its stdout.
    pub fn psql(&self, sql: &str) -> Result<String, HarnessError> {
        self.psql_in(&self.database, sql)
    }

    /// Like [`PgCluster::psql`], in another database.
    pub fn psql_in(&self, database: &str, sql: &str) -> Result<String, HarnessError> {
        let mut psql = self.runner.command("psql");
        psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-f",
                "-",
            ]);
        let output = run(psql, Some(sql))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A libpq connection string for the login user over TCP, e.g.
    /// `conninfo("verify-full")`; add the password with `PGPASSWORD`.
    pub fn conninfo(&self, sslmode: &str) -> String {
        format!(
            "host={} port={} user={} dbname={} sslmode={} sslrootcert={}",
            self.host,
            self.port,
            self.user,
            self.database,
            sslmode,
            self.ca_cert.display()
        )
    }

    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// The postmaster's pid, while it runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// `pg_ctl stop -m immediate`, then makes sure the postmaster is gone. Idempotent.
    pub fn stop(&mut self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let mut pg_ctl = self.runner.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        let stopped = run(pg_ctl, None).is_ok();
        if !wait_for_exit(pid, Duration::from_secs(if stopped { 10 } else { 0 })) {
            // SAFETY: plain signal to a pid we read from this cluster's postmaster.pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_for_exit(pid, Duration::from_secs(10));
        }
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `pid` is gone (or a zombie nobody reaps yet) within `timeout`.
fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !process_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        // SAFETY: signal 0 only checks for existence.
        Err(_) => {
            let rc = unsafe { libc::kill(pid, 0) };
            rc == 0
        }
    }
}

fn append_file(path: &Path, text: &str) -> Result<(), HarnessError> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "\n{text}"))
        .map_err(io_err("cannot append to", path))
}

/// A temporary directory the server user can enter: under /tmp when root (the caller's
/// `$TMPDIR` may be private), mode 0755.
fn new_temp_dir(prefix: &str) -> Result<TempDir, HarnessError> {
    // SAFETY: geteuid has no preconditions.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let temp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .map_err(io_err("cannot create a temporary directory in", &base))?;
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755))
        .map_err(io_err("cannot chmod", temp.path()))?;
    Ok(temp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_never_repeats_within_a_process() {
        let ports: BTreeSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn random_passwords_are_long_and_distinct() {
        let a = random_password();
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, random_password());
    }
}
