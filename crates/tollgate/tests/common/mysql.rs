//! A gateway in front of a test MariaDB: one `mysql` resource "app" reached with the upstream's
//! native or ed25519 user, client certificates from `pki`, the token `TOKEN` as `ci-bot`; the
//! `mariadb` command-line client, and a raw MySQL protocol client for what well-behaved clients
//! never send.

use super::{read_events, sha256_hex, Gateway, Pki, TOKEN};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use tollgate_testsupport::{MariaDb, MariaDbOptions};
use tollgate_tls::pki::IssuedFiles;

/// Start the gateway in `dir`; `resource_extra` is TOML appended to the resource's table
/// (rules, masks). Returns the gateway and its `mysql_listen` port.
pub fn mysql_gateway(
    dir: &Path,
    pki: &Pki,
    db: &MariaDb,
    ed25519: bool,
    resource_extra: &str,
) -> (Gateway, u16) {
    mysql_gateway_with(dir, pki, db, ed25519, "", resource_extra)
}

/// As [`mysql_gateway`], with `server_extra` appended to `[server]` (it may open further
/// tables, such as `[roles]`).
pub fn mysql_gateway_with(
    dir: &Path,
    pki: &Pki,
    db: &MariaDb,
    ed25519: bool,
    server_extra: &str,
    resource_extra: &str,
) -> (Gateway, u16) {
    let gw_cert = pki.server("gateway");
    let (user, password) = if ed25519 {
        (&db.ed25519_user, &db.ed25519_password)
    } else {
        (&db.user, &db.password)
    };
    std::fs::write(dir.join("app.password"), password).unwrap();
    let mysql_port = tollgate_testsupport::free_port();
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
mysql_listen = "127.0.0.1:{mysql_port}"
admin_listen = "127.0.0.1:{{admin_port}}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "optional"
store = "sqlite://audit.db"
{server_extra}

[[identity.tokens]]
subject = "ci-bot"
sha256 = "{token_sha}"
groups = ["ci"]

[[resources]]
name = "app"
kind = "mysql"
upstream = "127.0.0.1:{up_port}"
database = "{database}"
allow_groups = ["sre", "ci"]
{resource_extra}
[resources.tls]
mode = "verify-full"
ca = "{db_ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "app.password"
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
        token_sha = sha256_hex(TOKEN),
        up_port = db.port,
        database = db.database,
        db_ca = db.ca_cert.display(),
    );
    (Gateway::start(dir, &config, &[]), mysql_port)
}

/// What a test environment starts with.
#[derive(Default)]
pub struct MyOptions {
    pub init_sql: Vec<String>,
    /// `[mariadbd]` settings, e.g. a global `sql_mode`.
    pub extra_conf: Vec<String>,
    pub ed25519: bool,
    /// The MariaDB also lets sessions in without TLS (`require_secure_transport = OFF`).
    pub plaintext: bool,
    pub server_extra: String,
    pub resource_extra: String,
}

/// A throwaway TLS MariaDB with `customers`, and the gateway in front of it.
pub struct MyEnv {
    pub gw: Gateway,
    pub db: MariaDb,
    pub pki: Pki,
    /// sre: the approver.
    pub alice: IssuedFiles,
    pub mysql_port: u16,
    pub tmp: tempfile::TempDir,
}

impl Drop for MyEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("gateway log:\n{}", self.gw.logs());
        }
    }
}

impl MyEnv {
    pub fn start(resource_extra: &str, ed25519: bool) -> MyEnv {
        MyEnv::start_with(MyOptions {
            resource_extra: resource_extra.into(),
            ed25519,
            ..Default::default()
        })
    }

    pub fn start_with(opts: MyOptions) -> MyEnv {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-my-")
            .tempdir()
            .unwrap();
        let mut init_sql = vec![
            "CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(50), email VARCHAR(100) UNIQUE)".into(),
            "INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.org')".into(),
        ];
        init_sql.extend(opts.init_sql);
        let db = MariaDb::start(MariaDbOptions {
            init_sql,
            extra_conf: opts.extra_conf,
            require_secure_transport: !opts.plaintext,
            ..Default::default()
        })
        .expect("start MariaDB (is mariadb-server installed?)");
        let pki = Pki::new(&tmp.path().join("pki"));
        let alice = pki.client("alice", &["sre"]);
        let (gw, mysql_port) = mysql_gateway_with(
            tmp.path(),
            &pki,
            &db,
            opts.ed25519,
            &opts.server_extra,
            &opts.resource_extra,
        );
        MyEnv {
            gw,
            db,
            pki,
            alice,
            mysql_port,
            tmp,
        }
    }

    pub fn tls_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-P".into(),
            self.mysql_port.to_string(),
            "--ssl".into(),
            format!("--ssl-ca={}", self.pki.ca.display()),
            "--ssl-verify-server-cert".into(),
            "--batch".into(),
            "--skip-column-names".into(),
        ]
    }

    /// `mariadb` arguments for `who` (client certificate) on `database`, running `sql`.
    pub fn args_as(&self, who: &IssuedFiles, database: &str, sql: &str) -> Vec<String> {
        let mut args = self.tls_args();
        args.extend([
            format!("--ssl-cert={}", who.cert.display()),
            format!("--ssl-key={}", who.key.display()),
            "-u".into(),
            "someone".into(),
            "-D".into(),
            database.into(),
            "-e".into(),
            sql.into(),
        ]);
        args
    }

    /// `mariadb` as alice (client certificate) on `database`.
    pub fn as_alice(&self, database: &str, sql: &str) -> Output {
        mariadb(&self.args_as(&self.alice, database, sql))
    }

    /// `mariadb` as `who` on "app", in the background.
    pub fn mariadb_bg(&self, who: &IssuedFiles, sql: &str) -> Child {
        Command::new("mariadb")
            .args(self.args_as(who, "app", sql))
            .env("HOME", "/nonexistent")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the mariadb client")
    }

    /// `mariadb` as ci-bot with `password` (the token) on "app".
    pub fn with_password(&self, password: &str, sql: &str) -> Output {
        let mut args = self.tls_args();
        args.extend([
            "-u".into(),
            "ci-bot".into(),
            format!("--password={password}"),
            "-D".into(),
            "app".into(),
            "-e".into(),
            sql.into(),
        ]);
        mariadb(&args)
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        read_events(&self.tmp.path().join("audit.db"))
    }

    /// Rows of `customers` (read directly, as root).
    pub fn customers(&self) -> String {
        self.db
            .sql("SELECT COUNT(*) FROM customers")
            .unwrap()
            .trim()
            .to_string()
    }

    /// A raw MySQL session over TLS as `who` (client certificate) on `database`.
    pub fn raw_as(&self, who: &IssuedFiles, database: &str) -> Raw {
        Raw::connect(self, Login::Cert(who), database).expect("authenticated")
    }

    pub fn raw(&self) -> Raw {
        self.raw_as(&self.alice, "app")
    }
}

pub fn mariadb(args: &[String]) -> Output {
    Command::new("mariadb")
        .args(args)
        .env("HOME", "/nonexistent")
        .output()
        .expect("run the mariadb client")
}

pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// node_modules with mysql2, installed once per target directory.
pub fn node_modules() -> PathBuf {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mysql-node");
    let modules = dir.join("node_modules");
    if !modules.join("mysql2/package.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg("mysql2@3")
            .output()
            .expect("npm (scripts/test installs node and npm)");
        assert!(
            o.status.success(),
            "npm install mysql2: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    modules
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// How a raw session authenticates.
pub enum Login<'a> {
    Cert(&'a IssuedFiles),
    /// caching_sha2_password full authentication: the token in clear inside TLS.
    Token(&'a str),
}

/// What one command got back.
#[derive(Debug)]
pub enum Answer {
    Ok,
    Err {
        code: u16,
        message: String,
    },
    /// Rows of every result set, each row's raw packet.
    Rows(Vec<Vec<u8>>),
}

impl Answer {
    pub fn code(&self) -> Option<u16> {
        match self {
            Answer::Err { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Answer::Err { message, .. } => message,
            _ => "",
        }
    }

    /// Text-protocol rows as strings (NULL as "NULL").
    pub fn text_rows(&self) -> Vec<Vec<String>> {
        let Answer::Rows(rows) = self else {
            panic!("no rows: {self:?}")
        };
        rows.iter()
            .map(|r| {
                let mut i = 0;
                let mut row = Vec::new();
                while i < r.len() {
                    if r[i] == 0xfb {
                        row.push("NULL".into());
                        i += 1;
                        continue;
                    }
                    let (n, at) = lenenc(&r[i..]);
                    i += at;
                    row.push(String::from_utf8_lossy(&r[i..i + n as usize]).into_owned());
                    i += n as usize;
                }
                row
            })
            .collect()
    }
}

fn lenenc(b: &[u8]) -> (u64, usize) {
    match b[0] {
        0xfc => (u64::from(u16::from_le_bytes([b[1], b[2]])), 3),
        0xfd => (u64::from_le_bytes([b[1], b[2], b[3], 0, 0, 0, 0, 0]), 4),
        0xfe => (u64::from_le_bytes(b[1..9].try_into().unwrap()), 9),
        n => (u64::from(n), 1),
    }
}

/// PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH | CONNECT_WITH_DB | SSL | MULTI_STATEMENTS |
/// MULTI_RESULTS | PS_MULTI_RESULTS (EOF packets, not DEPRECATE_EOF).
pub const RAW_CAPS: u32 =
    (1 << 9) | (1 << 15) | (1 << 19) | (1 << 3) | (1 << 11) | (1 << 16) | (1 << 17) | (1 << 18);

/// A raw MySQL client over TLS.
pub struct Raw {
    pub s: Box<dyn ReadWrite + Send>,
    /// The gateway's connection id (from its greeting).
    pub thread_id: u32,
}

/// A prepared statement: its id and how many columns and parameters it has.
#[derive(Debug, Clone, Copy)]
pub struct Stmt {
    pub id: u32,
    pub columns: u16,
    pub params: u16,
}

impl Raw {
    /// Connect, upgrade to TLS and authenticate; `Err` is the server's error packet.
    pub fn connect(env: &MyEnv, login: Login<'_>, database: &str) -> Result<Raw, Answer> {
        let mut tcp = TcpStream::connect(("127.0.0.1", env.mysql_port)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let greeting = read_packet(&mut tcp);
        assert_eq!(greeting[0], 10);
        let version_end = greeting[1..].iter().position(|&b| b == 0).unwrap() + 1;
        let thread_id = u32::from_le_bytes(
            greeting[version_end + 1..version_end + 5]
                .try_into()
                .unwrap(),
        );
        let mut head = Vec::new();
        head.extend_from_slice(&RAW_CAPS.to_le_bytes());
        head.extend_from_slice(&(1u32 << 24).to_le_bytes());
        head.push(45);
        // Reserved, then MariaDB's extended capabilities: bulk execution.
        head.extend_from_slice(&[0; 19]);
        head.extend_from_slice(&(1u32 << 2).to_le_bytes());
        write_packet(&mut tcp, 1, &head);
        let cert = match login {
            Login::Cert(who) => Some(who),
            Login::Token(_) => None,
        };
        let config = std::sync::Arc::new(super::client_tls(&env.pki.ca, cert));
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut hello = head;
        hello.extend_from_slice(b"someone\0");
        hello.push(0);
        hello.extend_from_slice(database.as_bytes());
        hello.push(0);
        hello.extend_from_slice(b"caching_sha2_password\0");
        write_packet(&mut s, 2, &hello);
        let mut answer = read_packet(&mut s);
        if let Login::Token(token) = login {
            if answer == [0x01, 0x04] {
                let mut p = token.as_bytes().to_vec();
                p.push(0);
                write_packet(&mut s, 4, &p);
                answer = read_packet(&mut s);
            }
        }
        match answer[0] {
            0x00 => Ok(Raw {
                s: Box::new(s),
                thread_id,
            }),
            _ => Err(err_answer(&answer)),
        }
    }

    pub fn send(&mut self, seq: u8, p: &[u8]) {
        write_packet(&mut self.s, seq, p);
    }

    pub fn read(&mut self) -> Vec<u8> {
        read_packet(&mut self.s)
    }

    /// COM_QUERY, and its whole answer.
    pub fn query(&mut self, sql: &str) -> Answer {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        self.command(&p)
    }

    /// Any command answered like a query (OK, ERR or result sets).
    pub fn command(&mut self, p: &[u8]) -> Answer {
        self.send(0, p);
        self.answer()
    }

    /// The answer to a command: every result set's rows, until one ends without "more".
    pub fn answer(&mut self) -> Answer {
        let mut rows = Vec::new();
        loop {
            let first = self.read();
            match first[0] {
                0x00 => {
                    let (_, a) = lenenc(&first[1..]);
                    let (_, b) = lenenc(&first[1 + a..]);
                    let at = 1 + a + b;
                    let status = u16::from_le_bytes([first[at], first[at + 1]]);
                    if status & 0x0008 == 0 {
                        return if rows.is_empty() {
                            Answer::Ok
                        } else {
                            Answer::Rows(rows)
                        };
                    }
                }
                0xff => return err_answer(&first),
                _ => {
                    let (count, _) = lenenc(&first);
                    for _ in 0..count {
                        self.read();
                    }
                    let eof = self.read();
                    assert_eq!(eof[0], 0xfe, "EOF after the columns");
                    let cursor = u16::from_le_bytes([eof[3], eof[4]]) & 0x0040 != 0;
                    if cursor {
                        return Answer::Rows(rows);
                    }
                    loop {
                        let p = self.read();
                        if p[0] == 0xfe && p.len() < 9 {
                            let status = u16::from_le_bytes([p[3], p[4]]);
                            if status & 0x0008 == 0 {
                                return Answer::Rows(rows);
                            }
                            break;
                        }
                        if p[0] == 0xff {
                            return err_answer(&p);
                        }
                        rows.push(p);
                    }
                }
            }
        }
    }

    /// COM_STMT_PREPARE: the statement, or the error.
    pub fn prepare(&mut self, sql: &str) -> Result<Stmt, Answer> {
        let mut p = vec![0x16];
        p.extend_from_slice(sql.as_bytes());
        self.send(0, &p);
        let first = self.read();
        if first[0] != 0 {
            return Err(err_answer(&first));
        }
        let st = Stmt {
            id: u32::from_le_bytes(first[1..5].try_into().unwrap()),
            columns: u16::from_le_bytes([first[5], first[6]]),
            params: u16::from_le_bytes([first[7], first[8]]),
        };
        // Definitions, then an EOF per non-empty list.
        let n = st.columns + st.params + u16::from(st.columns > 0) + u16::from(st.params > 0);
        for _ in 0..n {
            self.read();
        }
        Ok(st)
    }

    /// COM_STMT_EXECUTE of `id` with string parameters (`flags` 1 opens a read-only cursor).
    pub fn execute(&mut self, id: u32, flags: u8, params: &[&str]) -> Answer {
        self.send(0, &execute_packet(0x17, id, flags, params));
        self.answer()
    }
}

/// COM_STMT_EXECUTE (or MariaDB's bulk 0xfa, which has the same head) with string parameters.
pub fn execute_packet(command: u8, id: u32, flags: u8, params: &[&str]) -> Vec<u8> {
    let mut p = vec![command];
    p.extend_from_slice(&id.to_le_bytes());
    p.push(flags);
    p.extend_from_slice(&1u32.to_le_bytes());
    if !params.is_empty() {
        p.extend(std::iter::repeat_n(0u8, params.len().div_ceil(8)));
        p.push(1);
        for _ in params {
            p.extend_from_slice(&[0xfd, 0]);
        }
        for v in params {
            p.push(v.len() as u8);
            p.extend_from_slice(v.as_bytes());
        }
    }
    p
}

pub fn err_answer(p: &[u8]) -> Answer {
    assert_eq!(p[0], 0xff, "an error packet: {p:?}");
    Answer::Err {
        code: u16::from_le_bytes([p[1], p[2]]),
        message: String::from_utf8_lossy(&p[9..]).into_owned(),
    }
}

pub fn read_packet(s: &mut impl Read) -> Vec<u8> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    let mut p = vec![0; len];
    s.read_exact(&mut p).unwrap();
    p
}

/// Whether the peer closed the connection (after an error, or at once).
pub fn closed(s: &mut impl Read) -> bool {
    let mut b = [0u8; 1];
    !matches!(s.read(&mut b), Ok(n) if n > 0)
}

pub fn write_packet(s: &mut impl Write, seq: u8, p: &[u8]) {
    let mut out = (p.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(p);
    s.write_all(&out).unwrap();
    s.flush().unwrap();
}
