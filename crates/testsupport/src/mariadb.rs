//! Throwaway MariaDB servers from the installed binaries (`mariadb-install-db`, `mariadbd`),
//! for the MySQL adapter's tests, `tollgate scan` tests, benchmarks and `tollgate demo`.
//!
//! A [`MariaDb`] is a fresh data directory in its own temporary directory, listening on
//! 127.0.0.1 (a free port) and a unix socket there, with TLS from tollgate's own PKI
//! (optionally `require_secure_transport`), one database, a `mysql_native_password` user and
//! an `ed25519` user owning it, and `root@localhost` on the socket only for setup. Every
//! option file the machine has (`/etc/mysql/...`) is ignored. As root, the server runs as the
//! `mysql` OS user (`--user=mysql`). The server is stopped when the value is dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    copy_private, free_port, io_err, log_tail, lookup_user, make_dir, new_temp_dir,
    random_password, run, server_certificate, wait_for_exit, HarnessError, START_ATTEMPTS,
};

const SERVER_USER: &str = "mysql";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(15);

/// The installed MariaDB programs.
#[derive(Clone, Debug)]
pub struct MariaDbBinaries {
    pub mariadbd: PathBuf,
    pub install_db: PathBuf,
    /// The `mariadb` command-line client (also used for setup over the socket).
    pub client: PathBuf,
}

/// `$TOLLGATE_MARIADB_BIN` (a directory holding all three programs) if set, else
/// `/usr/sbin/mariadbd` (Debian) or `mariadbd` on `$PATH`, with `mariadb-install-db` and
/// `mariadb` on `$PATH`.
pub fn mariadb_binaries() -> Option<MariaDbBinaries> {
    let in_dir = |dir: &Path| {
        let b = MariaDbBinaries {
            mariadbd: dir.join("mariadbd"),
            install_db: dir.join("mariadb-install-db"),
            client: dir.join("mariadb"),
        };
        (b.mariadbd.is_file() && b.install_db.is_file() && b.client.is_file()).then_some(b)
    };
    if let Some(dir) = std::env::var_os("TOLLGATE_MARIADB_BIN") {
        return in_dir(Path::new(&dir));
    }
    let on_path = |name: &str| -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    };
    let mariadbd = ["/usr/sbin/mariadbd", "/usr/libexec/mariadbd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| on_path("mariadbd"))?;
    Some(MariaDbBinaries {
        mariadbd,
        install_db: on_path("mariadb-install-db")?,
        client: on_path("mariadb")?,
    })
}

/// What to tell a user whose machine has no MariaDB server.
pub fn mariadb_install_hint() -> &'static str {
    "install MariaDB: sudo apt-get install -y mariadb-server mariadb-client (Debian/Ubuntu; \
     the packaged service need not run), or point TOLLGATE_MARIADB_BIN at a directory holding \
     mariadbd, mariadb-install-db and mariadb"
}

#[derive(Clone, Debug)]
pub struct MariaDbOptions {
    /// TLS with a server certificate from tollgate's PKI (DNS SANs `server_dns`, IP 127.0.0.1).
    pub tls: bool,
    /// With `tls`: `require_secure_transport = ON`, so plaintext logins are refused.
    pub require_secure_transport: bool,
    pub server_dns: Vec<String>,
    /// The `mysql_native_password` user owning `database`.
    pub user: String,
    pub password: String,
    /// The `ed25519` (MariaDB plugin) user owning `database`.
    pub ed25519_user: String,
    pub ed25519_password: String,
    pub database: String,
    /// Run as root in `database` after start (e.g. a sample schema).
    pub init_sql: Vec<String>,
    /// Appended to the `[mariadbd]` section, e.g. `general_log = ON`.
    pub extra_conf: Vec<String>,
    /// Sign the server certificate with this existing CA (`ca.crt` + `ca.key`) instead of
    /// one created in `DIR/pki`.
    pub ca_dir: Option<PathBuf>,
}

impl Default for MariaDbOptions {
    fn default() -> Self {
        MariaDbOptions {
            tls: true,
            require_secure_transport: true,
            server_dns: vec!["localhost".to_owned()],
            user: "tollgate_app".to_owned(),
            password: random_password(),
            ed25519_user: "tollgate_ed".to_owned(),
            ed25519_password: random_password(),
            database: "app".to_owned(),
            init_sql: Vec::new(),
            extra_conf: Vec::new(),
            ca_dir: None,
        }
    }
}

/// A running throwaway MariaDB server; stopped when dropped.
#[derive(Debug)]
pub struct MariaDb {
    /// Holds `pki/` (unless `ca_dir` was given), the server certificate, and normally
    /// `data/`, the socket, `my.cnf` and `mariadbd.log`.
    pub dir: PathBuf,
    pub port: u16,
    /// "127.0.0.1"
    pub host: String,
    pub user: String,
    pub password: String,
    pub ed25519_user: String,
    pub ed25519_password: String,
    pub database: String,
    /// The CA that signed the server certificate.
    pub ca_dir: PathBuf,
    /// `ca_dir/ca.crt`: the `--ssl-ca` for clients.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub tls: bool,
    /// The server version, e.g. `10.11.6-MariaDB-0+deb12u1`.
    pub version: String,
    bins: MariaDbBinaries,
    /// uid and gid of `mysql` when running as root.
    as_server_user: Option<(u32, u32)>,
    run_dir: PathBuf,
    data_dir: PathBuf,
    socket: PathBuf,
    conf_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    // Dropped after `Drop::drop` has stopped the server.
    _run_temp: Option<TempDir>,
    _temp: Option<TempDir>,
}

impl MariaDb {
    /// Starts a server in a new temporary directory, removed again on drop. Blocking.
    pub fn start(opts: MariaDbOptions) -> Result<MariaDb, HarnessError> {
        let temp = new_temp_dir("tollgate-mariadb-")?;
        let dir = temp.path().to_path_buf();
        Self::start_impl(dir, Some(temp), opts)
    }

    /// Starts a server in `dir` (created if missing; a previous `dir/data` is replaced), left
    /// in place for the user to inspect. The server is still stopped on drop.
    pub fn start_in(dir: &Path, opts: MariaDbOptions) -> Result<MariaDb, HarnessError> {
        make_dir(dir, 0o755)?;
        let dir = fs::canonicalize(dir).map_err(io_err("cannot resolve", dir))?;
        Self::start_impl(dir, None, opts)
    }

    fn start_impl(
        dir: PathBuf,
        temp: Option<TempDir>,
        opts: MariaDbOptions,
    ) -> Result<MariaDb, HarnessError> {
        let bins = mariadb_binaries().ok_or(HarnessError::MariaDbNotInstalled)?;
        // SAFETY: geteuid has no preconditions.
        let as_server_user = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user(SERVER_USER).ok_or(HarnessError::NoMysqlUser)?)
        } else {
            None
        };
        // As root, the server user must reach its files; a dir under /root often is not
        // reachable, so the server's own files then live under /tmp instead.
        let (run_dir, run_temp) = if can_enter(as_server_user.is_some(), &dir) {
            (dir.clone(), None)
        } else {
            let t = new_temp_dir("tollgate-mariadb-run-")?;
            (t.path().to_path_buf(), Some(t))
        };

        let (ca_dir, issued) = server_certificate(
            &dir,
            opts.ca_dir.as_deref(),
            "tollgate test MariaDB CA",
            &opts.server_dns,
        )?;

        let data_dir = run_dir.join("data");
        if data_dir.exists() {
            fs::remove_dir_all(&data_dir).map_err(io_err("cannot remove", &data_dir))?;
        }
        make_dir(&data_dir, 0o700)?;
        let tls_dir = run_dir.join("tls");
        make_dir(&tls_dir, 0o755)?;
        for (from, name, mode) in [
            (&issued.cert, "server.crt", 0o644),
            (&issued.key, "server.key", 0o600),
            (&ca_dir.join("ca.crt"), "ca.crt", 0o644),
        ] {
            copy_private(from, &tls_dir.join(name), mode)?;
        }
        // The server's own socket, pid file and temporary files: directories it owns (a
        // shared /tmp let concurrent bootstraps trip over each other's temporary tables).
        make_dir(&run_dir.join("run"), 0o755)?;
        make_dir(&run_dir.join("tmp"), 0o700)?;
        let log_path = run_dir.join("mariadbd.log");
        fs::write(&log_path, b"").map_err(io_err("cannot create", &log_path))?;

        let mut server = MariaDb {
            dir,
            port: 0,
            host: "127.0.0.1".to_owned(),
            user: opts.user.clone(),
            password: opts.password.clone(),
            ed25519_user: opts.ed25519_user.clone(),
            ed25519_password: opts.ed25519_password.clone(),
            database: opts.database.clone(),
            ca_cert: ca_dir.join("ca.crt"),
            ca_dir,
            server_cert: issued.cert.clone(),
            tls: opts.tls,
            version: String::new(),
            bins,
            as_server_user,
            socket: run_dir.join("run").join("mariadbd.sock"),
            conf_path: run_dir.join("my.cnf"),
            data_dir,
            run_dir,
            log_path,
            child: None,
            _run_temp: run_temp,
            _temp: temp,
        };
        for path in [
            &server.data_dir,
            &server.run_dir.join("run"),
            &server.run_dir.join("tmp"),
            &tls_dir.join("server.key"),
            &server.log_path,
        ] {
            server.give(path)?;
        }
        server.write_conf(&opts, &tls_dir, 0)?;
        server.install_db()?;
        server.start_server(&opts, &tls_dir)?;
        server.setup(&opts)?;
        Ok(server)
    }

    fn give(&self, path: &Path) -> Result<(), HarnessError> {
        if let Some((uid, gid)) = self.as_server_user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_err("cannot chown", path))?;
        }
        Ok(())
    }

    fn write_conf(
        &self,
        opts: &MariaDbOptions,
        tls_dir: &Path,
        port: u16,
    ) -> Result<(), HarnessError> {
        let mut conf = vec![
            "# written by tollgate-testsupport; no other option file is read".to_owned(),
            "[mariadbd]".to_owned(),
            format!("datadir = {}", self.data_dir.display()),
            format!("socket = {}", self.socket.display()),
            format!(
                "pid-file = {}",
                self.run_dir.join("run/mariadbd.pid").display()
            ),
            format!("tmpdir = {}", self.run_dir.join("tmp").display()),
            format!("port = {port}"),
            "bind-address = 127.0.0.1".to_owned(),
            "skip-name-resolve".to_owned(),
            "character-set-server = utf8mb4".to_owned(),
            "collation-server = utf8mb4_general_ci".to_owned(),
            "max_allowed_packet = 64M".to_owned(),
            "max_connections = 300".to_owned(),
            "innodb_buffer_pool_size = 32M".to_owned(),
            "innodb_log_file_size = 16M".to_owned(),
            "innodb_flush_log_at_trx_commit = 0".to_owned(),
            "innodb_use_native_aio = 0".to_owned(),
            "performance_schema = OFF".to_owned(),
            "plugin-load-add = auth_ed25519".to_owned(),
        ];
        if opts.tls {
            conf.extend([
                format!("ssl-ca = {}", tls_dir.join("ca.crt").display()),
                format!("ssl-cert = {}", tls_dir.join("server.crt").display()),
                format!("ssl-key = {}", tls_dir.join("server.key").display()),
                format!(
                    "require_secure_transport = {}",
                    if opts.require_secure_transport {
                        "ON"
                    } else {
                        "OFF"
                    }
                ),
            ]);
        }
        conf.extend(opts.extra_conf.iter().cloned());
        fs::write(&self.conf_path, conf.join("\n") + "\n")
            .map_err(io_err("cannot write", &self.conf_path))
    }

    fn defaults_file_arg(&self) -> String {
        format!("--defaults-file={}", self.conf_path.display())
    }

    fn install_db(&self) -> Result<(), HarnessError> {
        let mut cmd = Command::new(&self.bins.install_db);
        cmd.arg(self.defaults_file_arg()).args([
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
        ]);
        if self.as_server_user.is_some() {
            cmd.arg(format!("--user={SERVER_USER}"));
        }
        cmd.current_dir(&self.run_dir).env("LC_ALL", "C");
        run(cmd, None).map(|_| ())
    }

    fn start_server(&mut self, opts: &MariaDbOptions, tls_dir: &Path) -> Result<(), HarnessError> {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            self.write_conf(opts, tls_dir, self.port)?;
            let log_start = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
            let log = fs::OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .map_err(io_err("cannot open", &self.log_path))?;
            let log2 = log
                .try_clone()
                .map_err(io_err("cannot open", &self.log_path))?;
            let mut cmd = Command::new(&self.bins.mariadbd);
            cmd.arg(self.defaults_file_arg());
            if self.as_server_user.is_some() {
                cmd.arg(format!("--user={SERVER_USER}"));
            }
            let child = cmd
                .current_dir(&self.run_dir)
                .env("LC_ALL", "C")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .map_err(|source| HarnessError::Command {
                    command: self.bins.mariadbd.display().to_string(),
                    status: "could not spawn".to_owned(),
                    stderr: source.to_string(),
                })?;
            self.child = Some(child);
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                Err(reason) => {
                    self.stop();
                    let log = fs::read(&self.log_path).unwrap_or_default();
                    let this_attempt =
                        String::from_utf8_lossy(&log[(log_start as usize).min(log.len())..]);
                    let port_taken = this_attempt.contains("Bind on TCP/IP port");
                    if !port_taken || attempt == START_ATTEMPTS {
                        return Err(HarnessError::MariaDbStart {
                            attempts: attempt,
                            log: self.log_path.clone(),
                            log_tail: format!("{}\n{reason}", log_tail(&self.log_path)),
                        });
                    }
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Until the server answers on its socket, or it exits.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("mariadbd exited: {status}"));
                }
            }
            if self.socket.exists() {
                if let Ok(version) = self.sql_in("mysql", "SELECT VERSION()") {
                    self.version = version.trim().to_owned();
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn setup(&self, opts: &MariaDbOptions) -> Result<(), HarnessError> {
        let db = quote_ident(&opts.database);
        let mut sql = String::from(
            // Only root@localhost (socket) stays: no passwordless root over TCP.
            "DELETE FROM mysql.global_priv WHERE User = 'root' AND Host <> 'localhost';\n\
             DELETE FROM mysql.global_priv WHERE User = '';\n\
             FLUSH PRIVILEGES;\n",
        );
        sql.push_str(&format!(
            "CREATE DATABASE {db} CHARACTER SET utf8mb4;\n\
             CREATE USER {u}@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD({p});\n\
             CREATE USER {eu}@'%' IDENTIFIED VIA ed25519 USING PASSWORD({ep});\n\
             GRANT ALL ON {db}.* TO {u}@'%', {eu}@'%';\n",
            u = quote_literal(&opts.user),
            p = quote_literal(&opts.password),
            eu = quote_literal(&opts.ed25519_user),
            ep = quote_literal(&opts.ed25519_password),
        ));
        self.sql_in("mysql", &sql)?;
        for init in &opts.init_sql {
            self.sql(init)?;
        }
        Ok(())
    }

    /// Runs `sql` as root in `database` over the unix socket (`mariadb --batch
    /// --skip-column-names`) and returns its stdout (tab-separated rows).
    pub fn sql(&self, sql: &str) -> Result<String, HarnessError> {
        self.sql_in(&self.database, sql)
    }

    /// Like [`MariaDb::sql`], in another database.
    pub fn sql_in(&self, database: &str, sql: &str) -> Result<String, HarnessError> {
        let mut cmd = Command::new(&self.bins.client);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args([
                "--user=root",
                "--batch",
                "--skip-column-names",
                "--connect-timeout=5",
                "--max-allowed-packet=64M",
                "--default-character-set=utf8mb4",
                database,
            ])
            .env_remove("MYSQL_PWD")
            .env_remove("MYSQL_HOST")
            .env_remove("MYSQL_TCP_PORT")
            .current_dir(&self.run_dir);
        let output = run(cmd, Some(sql))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `mariadb` client arguments for the native-password user over TCP with verified TLS
    /// (`--ssl-verify-server-cert`); add `-e SQL` or feed stdin.
    pub fn client_args(&self) -> Vec<String> {
        vec![
            "--no-defaults".to_owned(),
            format!("--host={}", self.host),
            format!("--port={}", self.port),
            format!("--user={}", self.user),
            format!("--password={}", self.password),
            format!("--ssl-ca={}", self.ca_cert.display()),
            "--ssl-verify-server-cert".to_owned(),
            self.database.clone(),
        ]
    }

    /// The `mariadb` client program.
    pub fn client_program(&self) -> &Path {
        &self.bins.client
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGTERM (a clean shutdown), SIGKILL if it lingers, and reaps it. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        // SAFETY: plain signal to the server process this value spawned.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if !wait_for_exit_child(&mut child, STOP_GRACE) {
            let _ = child.kill();
        }
        let _ = child.wait();
        wait_for_exit(pid, Duration::from_secs(5));
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for_exit_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn can_enter(as_server_user: bool, dir: &Path) -> bool {
    !as_server_user
        || Command::new("runuser")
            .args(["-u", SERVER_USER, "--", "test", "-x"])
            .arg(dir)
            .current_dir("/")
            .status()
            .is_ok_and(|s| s.success())
}

/// A MariaDB identifier in backquotes.
pub fn quote_ident(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// A MariaDB string literal (backslashes escaped too, as the default `sql_mode` reads them).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(quote_literal("it's \\"), "'it''s \\\\'");
    }
}
