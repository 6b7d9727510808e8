//! The MySQL client matrix: real clients — the `mariadb` command-line client, PyMySQL,
//! mysql-connector-python, node `mysql2` and MariaDB Connector/J — against a throwaway TLS
//! MariaDB, directly (which proves the harness and the clients) and through the gateway with a
//! client certificate and with a token as the password. Every client runs the same scenarios:
//! types (ints to BIGINT UNSIGNED, decimals, dates, JSON, blobs, NULL, utf8mb4) over the text
//! and the binary protocol, parameters, transactions, errors with their codes and SQLSTATEs,
//! values over 16 MB (several packets each way), many connections at once, and cancelling a
//! running query with `KILL QUERY` on the thread id of the client's handshake.
//!
//! The drivers are scripts in tests/mysql/ that print what they saw as JSON in canonical text
//! forms; this file compares that with what the table holds. PyMySQL and
//! mysql-connector-python are installed with pip into a venv under target/tmp, mysql2 with npm
//! there, and Matrix.java is compiled there against the Debian `libmariadb-java` jar
//! (scripts/test installs the Debian packages).

mod common;

use common::drivers::{javac, json_output, must, node_modules, python_venv};
use common::{Gateway, Pki, TOKEN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tollgate_testsupport::{free_port, mariadb_install_hint, MariaDb, MariaDbOptions};
use tollgate_tls::pki::IssuedFiles;

/// Over the 16 MB (2^24 - 1) payload limit of one MySQL packet.
const LARGE_BYTES: usize = 17 * 1024 * 1024 + 5;
const MANY: usize = 20;
/// Long enough that only a cancel ends it while a test runs.
const CANCEL_SLEEP_SECS: u32 = 300;
const CONNECTOR_J: &str = "/usr/share/java/mariadb-java-client.jar";

/// Column name and the canonical form its values take in the drivers' output.
const COLUMNS: [(&str, &str); 14] = [
    ("id", "int"),
    ("ti", "int"),
    ("si", "int"),
    ("i", "int"),
    ("bi", "int"),
    ("ubi", "int"),
    ("dec1", "decimal"),
    ("f", "double"),
    ("d", "date"),
    ("dt", "datetime"),
    ("tm", "time"),
    ("j", "json"),
    ("b", "blob"),
    ("t", "text"),
];

const SCHEMA: &str = "CREATE TABLE types (id INT PRIMARY KEY, ti TINYINT, si SMALLINT, i INT, \
     bi BIGINT, ubi BIGINT UNSIGNED, dec1 DECIMAL(30,10), f DOUBLE, d DATE, dt DATETIME(6), \
     tm TIME, j JSON, b BLOB, t VARCHAR(100) CHARACTER SET utf8mb4)";

/// The rows of `types`, canonical: ints and decimals in digits, dates ISO, blobs in hex.
fn rows() -> Vec<Vec<Option<String>>> {
    let text = |s: &str| Some(s.to_owned());
    let hex = |b: &[u8]| Some(b.iter().map(|x| format!("{x:02x}")).collect::<String>());
    let mut blob = vec![0x00, 0x01, 0x7f, 0x80, 0xff];
    blob.extend_from_slice(b"tollgate");
    vec![
        vec![
            text("1"),
            text("-128"),
            text("-32768"),
            text("-2147483648"),
            text("-9223372036854775808"),
            text("18446744073709551615"),
            text("12345678901234567890.0123456789"),
            text("0.5"),
            text("2024-02-29"),
            text("2024-02-29 13:45:56.123456"),
            text("13:45:56"),
            text(r#"{"a": "é😀", "b": [1, 2.5, null]}"#),
            hex(&blob),
            text("Grüße 😀 漢字 it's"),
        ],
        std::iter::once(text("2"))
            .chain(std::iter::repeat_n(None, COLUMNS.len() - 1))
            .collect(),
        vec![
            text("3"),
            text("127"),
            text("32767"),
            text("2147483647"),
            text("9223372036854775807"),
            text("0"),
            text("-0.0000000001"),
            text("-1.25"),
            text("1000-01-01"),
            text("9999-12-31 23:59:59.999999"),
            text("00:00:00"),
            text("[]"),
            hex(&[]),
            text(""),
        ],
    ]
}

/// `INSERT INTO table VALUES ...` with the rows as SQL literals.
fn insert_sql(table: &str) -> String {
    let values: Vec<String> = rows()
        .iter()
        .map(|row| {
            let literals: Vec<String> = row
                .iter()
                .zip(COLUMNS)
                .map(|(v, (_, kind))| match (v, kind) {
                    (None, _) => "NULL".to_owned(),
                    (Some(v), "blob") => format!("X'{v}'"),
                    (Some(v), _) => tollgate_testsupport::mariadb_quote_literal(v),
                })
                .collect();
            format!("({})", literals.join(", "))
        })
        .collect();
    format!("INSERT INTO {table} VALUES {};", values.join(", "))
}

fn start_mariadb() -> MariaDb {
    MariaDb::start(MariaDbOptions {
        init_sql: vec![format!("{SCHEMA};\n{}", insert_sql("types"))],
        ..MariaDbOptions::default()
    })
    .unwrap_or_else(|e| panic!("start MariaDB ({}): {e}", mariadb_install_hint()))
}

/// Where a client connects and as whom.
struct Target {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
    ca: PathBuf,
    client_cert: Option<IssuedFiles>,
    /// The same client certificate as PKCS#12, for Java (password `changeit`).
    client_p12: Option<PathBuf>,
    /// What `CURRENT_USER()` says upstream.
    upstream_user: String,
    /// Through tollgate: a statement it cannot parse is refused (rule `unparsable`, 1227)
    /// before the server could answer 1064.
    via_gateway: bool,
}

impl Target {
    /// The error code and SQLSTATE of `SELEC 1`.
    fn syntax_error(&self) -> (u64, &'static str) {
        if self.via_gateway {
            (1227, "42000")
        } else {
            (1064, "42000")
        }
    }
}

impl Target {
    fn direct(db: &MariaDb) -> Target {
        Target {
            host: "localhost".into(),
            port: db.port,
            user: db.user.clone(),
            password: Some(db.password.clone()),
            database: db.database.clone(),
            ca: db.ca_cert.clone(),
            client_cert: None,
            client_p12: None,
            upstream_user: format!("{}@%", db.user),
            via_gateway: false,
        }
    }

    fn matrix_config(&self, marker: &str) -> Value {
        json!({
            "conn": {
                "host": self.host,
                "port": self.port,
                "user": self.user,
                "password": self.password,
                "database": self.database,
                "ca": self.ca,
                "cert": self.client_cert.as_ref().map(|c| &c.cert),
                "key": self.client_cert.as_ref().map(|c| &c.key),
                "p12": self.client_p12,
                "p12_password": "changeit",
            },
            "columns": COLUMNS,
            "rows": rows(),
            "large_bytes": LARGE_BYTES,
            "many": MANY,
            "cancel_sleep": CANCEL_SLEEP_SECS,
            "cancel_marker": marker,
        })
    }
}

fn marker() -> String {
    format!("cancel-me-{}", free_port())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mysql")
        .join(name)
}

/// A venv with PyMySQL and mysql-connector-python, made once per target directory.
fn python() -> PathBuf {
    python_venv(
        "mysql-py",
        &["PyMySQL", "mysql-connector-python"],
        "pymysql, mysql.connector",
    )
}

fn matrix_output(cmd: Command, cfg: &Value, what: &str) -> Value {
    json_output(cmd, "TG_MYSQL_MATRIX", cfg, what)
}

fn run_python(driver: &str, target: &Target) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(script("matrix.py")).arg(driver);
    matrix_output(cmd, &target.matrix_config(&marker()), driver)
}

fn run_node(target: &Target) -> Value {
    let mut cmd = Command::new("node");
    cmd.arg(script("matrix.cjs")).env(
        "NODE_PATH",
        node_modules("mysql-node", &["mysql2@3"], "mysql2"),
    );
    matrix_output(cmd, &target.matrix_config(&marker()), "node mysql2")
}

fn run_java(target: &Target) -> Value {
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!(
            "{CONNECTOR_J}:{}",
            javac("mysql-java", CONNECTOR_J, &script("Matrix.java")).display()
        ))
        .arg("Matrix");
    matrix_output(cmd, &target.matrix_config(&marker()), "Connector/J")
}

/// The rows as the drivers print them: strings or null, JSON columns compared as JSON.
fn assert_rows(client: &str, scenario: &str, got: &Value) {
    let got_rows = got
        .as_array()
        .unwrap_or_else(|| panic!("{client} {scenario}: {got}"));
    let want = rows();
    assert_eq!(got_rows.len(), want.len(), "{client} {scenario}: {got}");
    for (got_row, want_row) in got_rows.iter().zip(&want) {
        for (i, (name, kind)) in COLUMNS.iter().enumerate() {
            let g = &got_row[i];
            let w = &want_row[i];
            let same = match (g.as_str(), w, *kind) {
                (Some(g), Some(w), "json") => {
                    serde_json::from_str::<Value>(g).ok() == serde_json::from_str::<Value>(w).ok()
                }
                (Some(g), Some(w), _) => g == w,
                (None, None, _) => g.is_null(),
                _ => false,
            };
            assert!(
                same,
                "{client} {scenario}: column {name} of row {}: got {g}, want {w:?}",
                want_row[0].as_deref().unwrap_or("?")
            );
        }
    }
}

fn scenario<'a>(out: &'a Value, client: &str, name: &str) -> &'a Value {
    let v = &out[name];
    assert!(
        !v.is_null() && v.get("exception").is_none(),
        "{client} {name}: {v}"
    );
    v
}

/// What every client must have seen; `binary`: it also ran the binary protocol.
fn check_matrix(client: &str, out: &Value, target: &Target, binary: bool) {
    let session = scenario(out, client, "session");
    assert_eq!(session["user"], target.upstream_user.as_str(), "{client}");
    assert_eq!(session["database"], "app", "{client}");
    assert_eq!(session["charset"], "utf8mb4", "{client}");
    assert!(
        session["tls"]
            .as_str()
            .is_some_and(|t| t.starts_with("TLSv1.")),
        "{client}: upstream session without TLS: {session}"
    );

    assert_rows(client, "types_text", scenario(out, client, "types_text"));
    if binary {
        assert_rows(
            client,
            "types_binary",
            scenario(out, client, "types_binary"),
        );
    }
    assert_rows(client, "params", scenario(out, client, "params"));
    assert_eq!(
        scenario(out, client, "transactions"),
        &json!([0, 2]),
        "{client}: rolled back insert visible, or committed one lost"
    );

    let errors = scenario(out, client, "errors").as_array().unwrap();
    let want = [target.syntax_error(), (1062, "23000"), (1146, "42S02")];
    assert_eq!(errors.len(), 4, "{client}: {errors:?}");
    for (err, (code, state)) in errors.iter().zip(want) {
        assert_eq!(err["code"], code, "{client}: {err}");
        // PyMySQL does not expose the SQLSTATE.
        if !err["sqlstate"].is_null() || client != "pymysql" {
            assert_eq!(err["sqlstate"], state, "{client}: {err}");
        }
    }
    assert!(
        errors[2]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no_such_table")),
        "{client}: {}",
        errors[2]
    );
    assert_eq!(errors[3], "still usable", "{client}");

    let large = scenario(out, client, "large");
    assert_eq!(large["server_length"], LARGE_BYTES, "{client}: {large}");
    assert_eq!(large["received_length"], LARGE_BYTES, "{client}: {large}");
    assert_eq!(large["repeat_length"], LARGE_BYTES, "{client}: {large}");
    assert_eq!(large["server_sha256"], large["sent_sha256"], "{client}");
    assert_eq!(large["received_sha256"], large["sent_sha256"], "{client}");

    let many = scenario(out, client, "many");
    assert_eq!(
        many,
        &json!({"connections": MANY, "distinct_thread_ids": MANY}),
        "{client}"
    );

    // MariaDB ends an interrupted SLEEP with ER_QUERY_INTERRUPTED; the connection lives on.
    let cancel = scenario(out, client, "cancel");
    assert_eq!(cancel["error"]["code"], 1317, "{client}: {cancel}");
    if client != "pymysql" {
        assert_eq!(cancel["error"]["sqlstate"], "70100", "{client}: {cancel}");
    }
    assert_eq!(cancel["after"], "after cancel", "{client}: {cancel}");
}

// ---- the mariadb command-line client ----

impl Target {
    fn cli(&self) -> Command {
        let mut cmd = Command::new("mariadb");
        cmd.args([
            "--no-defaults",
            "--batch",
            "--skip-column-names",
            "--protocol=tcp",
            "--binary-as-hex",
            "--max-allowed-packet=64M",
            "--default-character-set=utf8mb4",
            "--connect-timeout=30",
        ])
        .arg(format!("--host={}", self.host))
        .arg(format!("--port={}", self.port))
        .arg(format!("--user={}", self.user))
        .arg(format!("--ssl-ca={}", self.ca.display()))
        .arg("--ssl-verify-server-cert")
        .env_remove("MYSQL_PWD");
        if let Some(password) = &self.password {
            cmd.arg(format!("--password={password}"));
        }
        if let Some(c) = &self.client_cert {
            cmd.arg(format!("--ssl-cert={}", c.cert.display()))
                .arg(format!("--ssl-key={}", c.key.display()));
        }
        cmd.arg(&self.database);
        cmd
    }

    /// Runs `sql` (fed on stdin) and returns the output.
    fn cli_run(&self, extra: &[&str], sql: &str) -> Output {
        let mut child = self
            .cli()
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the mariadb client (scripts/test installs mariadb-client)");
        let mut stdin = child.stdin.take().unwrap();
        let sql = sql.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(sql.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    fn cli_ok(&self, sql: &str) -> String {
        let out = must(self.cli_run(&[], sql), "mariadb");
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Batch output of [`cli_select`] as canonical rows: NULL is null, `--binary-as-hex` blobs
/// lose their `0x`.
fn cli_rows(text: &str) -> Value {
    let rows: Vec<Value> = text
        .lines()
        .map(|line| {
            let cells: Vec<&str> = line.split('\t').collect();
            let blob_is_null = cells.last() == Some(&"1");
            let cells: Vec<Value> = cells
                .iter()
                .zip(COLUMNS)
                .map(|(cell, (_, kind))| match (*cell, kind) {
                    ("NULL", _) => Value::Null,
                    (_, "blob") if blob_is_null => Value::Null,
                    (c, "blob") => Value::from(c.trim_start_matches("0x").to_lowercase()),
                    (c, _) => Value::from(c.replace("\\\\", "\\")),
                })
                .collect();
            Value::Array(cells)
        })
        .collect();
    Value::Array(rows)
}

/// The columns of `table` for the CLI, and whether the blob is NULL: `--binary-as-hex`
/// prints a NULL blob as `0x`, like an empty one.
fn cli_select(table: &str) -> String {
    let columns = COLUMNS.map(|(name, _)| name).join(", ");
    format!("SELECT {columns}, b IS NULL FROM {table} ORDER BY id;")
}

fn check_cli(target: &Target) {
    let session = target.cli_ok(
        "SELECT CURRENT_USER(), DATABASE(), @@character_set_client, \
         (SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS \
          WHERE VARIABLE_NAME = 'SSL_VERSION');",
    );
    let fields: Vec<&str> = session.trim().split('\t').collect();
    assert_eq!(
        fields[..3],
        [target.upstream_user.as_str(), "app", "utf8mb4"],
        "{session}"
    );
    assert!(fields[3].starts_with("TLSv1."), "{session}");

    let types = target.cli_ok(&cli_select("types"));
    assert_rows("mariadb", "types", &cli_rows(&types));

    // The same values sent as literals in a multi-statement script.
    let params = target.cli_ok(&format!(
        "CREATE TEMPORARY TABLE p LIKE types;\n{}\n{}",
        insert_sql("p"),
        cli_select("p")
    ));
    assert_rows("mariadb", "params", &cli_rows(&params));

    let tx = target.cli_ok(
        "CREATE TEMPORARY TABLE tx (n INT) ENGINE=InnoDB;\n\
         START TRANSACTION; INSERT INTO tx VALUES (1); ROLLBACK;\n\
         SELECT COUNT(*) FROM tx;\n\
         START TRANSACTION; INSERT INTO tx VALUES (2); COMMIT;\n\
         SELECT COALESCE(SUM(n), 0) FROM tx;",
    );
    assert_eq!(tx.trim(), "0\n2");

    let errors = target.cli_run(
        &["--force"],
        "CREATE TEMPORARY TABLE uq (k INT PRIMARY KEY); INSERT INTO uq VALUES (1);\n\
         SELEC 1;\nINSERT INTO uq VALUES (1);\nSELECT * FROM no_such_table;\n\
         SELECT 'still usable';",
    );
    let stderr = String::from_utf8_lossy(&errors.stderr);
    let codes: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ERROR "))
        .map(|l| l.split(" at line").next().unwrap())
        .collect();
    let (code, state) = target.syntax_error();
    assert_eq!(
        codes,
        [
            format!("{code} ({state})").as_str(),
            "1062 (23000)",
            "1146 (42S02)"
        ],
        "{stderr}"
    );
    assert!(stderr.contains("no_such_table"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&errors.stdout).trim(),
        "still usable"
    );

    check_cli_large(target);
    check_cli_many(target);
    check_cli_cancel(target);
}

fn check_cli_large(target: &Target) {
    let blob: Vec<u8> = (0..LARGE_BYTES).map(|i| (i % 251) as u8).collect();
    let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
    let sent_sha = sha256_bytes(&blob);
    // The INSERT alone is a 34 MB statement: three packets from the client.
    let out = target.cli_ok(&format!(
        "CREATE TEMPORARY TABLE big (b LONGBLOB);\nINSERT INTO big VALUES (X'{hex}');\n\
         SELECT LENGTH(b), SHA2(b, 256) FROM big;\nSELECT b FROM big;\n\
         SELECT REPEAT('x', {LARGE_BYTES});"
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "unexpected output shape");
    assert_eq!(lines[0], format!("{LARGE_BYTES}\t{sent_sha}"));
    let back = lines[1].trim_start_matches("0x").to_lowercase();
    assert_eq!(back.len(), 2 * LARGE_BYTES);
    assert!(back == hex, "the blob came back different");
    assert_eq!(lines[2].len(), LARGE_BYTES);
}

fn sha256_bytes(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn check_cli_many(target: &Target) {
    let children: Vec<_> = (0..MANY)
        .map(|_| {
            target
                .cli()
                .args(["-e", "SELECT 1 + 1;\nstatus"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for child in children {
        let out = must(child.wait_with_output().unwrap(), "mariadb");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.starts_with("2\n"), "{text}");
        ids.insert(connection_id(&text).expect("status prints the connection id"));
    }
    assert_eq!(ids.len(), MANY);
}

/// The thread id from the handshake, as the client's `status` command prints it.
fn connection_id(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Connection id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn check_cli_cancel(target: &Target) {
    let marker = marker();
    // A script on stdin: with -e the client stops at the interrupted query despite --force.
    let mut victim = target
        .cli()
        .args(["--unbuffered", "--force"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    victim
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!(
                "status\nSELECT 'ready';\nSELECT SLEEP({CANCEL_SLEEP_SECS}), '{marker}';\n\
                 SELECT 'after cancel';\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut stdout = BufReader::new(victim.stdout.take().unwrap());
    let mut status = String::new();
    // `status` output is flushed with the next query's result (`--unbuffered`).
    let id = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the client ended before printing its connection id: {status}"
        );
        status.push_str(&line);
        if let Some(id) = connection_id(&line) {
            break id;
        }
    };
    // The query is running once the server lists it.
    let running = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
         WHERE INFO LIKE '%{marker}%' AND INFO NOT LIKE '%PROCESSLIST%';"
    );
    while target.cli_ok(&running).trim() == "0" {
        assert!(
            victim.try_wait().unwrap().is_none(),
            "the client ended before its query ran"
        );
    }
    target.cli_ok(&format!("KILL QUERY {id};"));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut victim.stderr.take().unwrap(), &mut stderr).unwrap();
    victim.wait().unwrap();
    assert!(
        stderr.contains("ERROR 1317 (70100)") && stderr.contains("interrupted"),
        "{stderr}"
    );
    let tail: Vec<&str> = rest.lines().rev().take(2).collect();
    assert_eq!(tail, ["after cancel", "ready"], "{stderr}");
}

// ---- directly against the TLS MariaDB: the harness and the clients ----

#[test]
fn mariadb_cli_direct() {
    let db = start_mariadb();
    check_cli(&Target::direct(&db));
}

#[test]
fn pymysql_direct() {
    let db = start_mariadb();
    let target = Target::direct(&db);
    check_matrix("pymysql", &run_python("pymysql", &target), &target, false);
}

#[test]
fn mysql_connector_python_direct() {
    let db = start_mariadb();
    let target = Target::direct(&db);
    check_matrix(
        "mysql-connector-python",
        &run_python("connector", &target),
        &target,
        true,
    );
}

#[test]
fn node_mysql2_direct() {
    let db = start_mariadb();
    let target = Target::direct(&db);
    check_matrix("mysql2", &run_node(&target), &target, true);
}

#[test]
fn connector_j_direct() {
    let db = start_mariadb();
    let target = Target::direct(&db);
    check_matrix("Connector/J", &run_java(&target), &target, true);
}

// ---- through the gateway ----

/// MariaDB behind the real gateway: resource "app" (kind mysql) reachable by groups `sre`
/// (alice, client certificate) and `ci` (ci-bot, token as password); the gateway injects the
/// `ed25519` user when `ed25519` is set, else the native-password user.
struct GatewayEnv {
    gw: Gateway,
    db: MariaDb,
    pki: Pki,
    mysql_port: u16,
    alice: IssuedFiles,
    alice_p12: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for GatewayEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("gateway log:\n{}", self.gw.logs());
        }
    }
}

impl GatewayEnv {
    fn start(ed25519: bool) -> GatewayEnv {
        let db = start_mariadb();
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-mysql-")
            .tempdir()
            .unwrap();
        let pki = Pki::new(&tmp.path().join("pki"));
        let alice = pki.client("alice", &["sre"]);
        let alice_p12 = tmp.path().join("alice.p12");
        must(
            Command::new("openssl")
                .args(["pkcs12", "-export", "-passout", "pass:changeit", "-in"])
                .arg(&alice.cert)
                .arg("-inkey")
                .arg(&alice.key)
                .arg("-out")
                .arg(&alice_p12)
                .output()
                .expect("openssl"),
            "openssl pkcs12 -export",
        );
        let (gw, mysql_port) = common::mysql::mysql_gateway(tmp.path(), &pki, &db, ed25519, "");
        GatewayEnv {
            gw,
            db,
            pki,
            mysql_port,
            alice,
            alice_p12,
            _tmp: tmp,
        }
    }

    fn upstream_user(&self, ed25519: bool) -> String {
        let user = if ed25519 {
            &self.db.ed25519_user
        } else {
            &self.db.user
        };
        format!("{user}@%")
    }

    fn with_cert(&self, ed25519: bool) -> Target {
        Target {
            host: "localhost".into(),
            port: self.mysql_port,
            user: "alice".into(),
            password: None,
            database: "app".into(),
            ca: self.pki.ca.clone(),
            client_cert: Some(self.alice.clone()),
            client_p12: Some(self.alice_p12.clone()),
            upstream_user: self.upstream_user(ed25519),
            via_gateway: true,
        }
    }

    fn with_token(&self, ed25519: bool) -> Target {
        Target {
            host: "localhost".into(),
            port: self.mysql_port,
            user: "ci-bot".into(),
            password: Some(TOKEN.into()),
            database: "app".into(),
            ca: self.pki.ca.clone(),
            client_cert: None,
            client_p12: None,
            upstream_user: self.upstream_user(ed25519),
            via_gateway: true,
        }
    }
}

#[test]
fn mariadb_cli_through_gateway() {
    let env = GatewayEnv::start(true);
    check_cli(&env.with_cert(true));
    check_cli(&env.with_token(true));
}

#[test]
fn pymysql_through_gateway() {
    let env = GatewayEnv::start(false);
    for target in [env.with_cert(false), env.with_token(false)] {
        check_matrix("pymysql", &run_python("pymysql", &target), &target, false);
    }
}

#[test]
fn mysql_connector_python_through_gateway() {
    let env = GatewayEnv::start(true);
    for target in [env.with_cert(true), env.with_token(true)] {
        let out = run_python("connector", &target);
        check_matrix("mysql-connector-python", &out, &target, true);
    }
}

#[test]
fn node_mysql2_through_gateway() {
    let env = GatewayEnv::start(false);
    for target in [env.with_cert(false), env.with_token(false)] {
        check_matrix("mysql2", &run_node(&target), &target, true);
    }
}

#[test]
fn connector_j_through_gateway() {
    let env = GatewayEnv::start(true);
    for target in [env.with_cert(true), env.with_token(true)] {
        check_matrix("Connector/J", &run_java(&target), &target, true);
    }
}
