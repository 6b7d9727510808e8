//! Starts real MariaDB servers and checks them with the real `mariadb` client.

use std::net::TcpStream;
use std::process::{Command, Output};

use tollgate_testsupport::{
    mariadb_binaries, mariadb_install_hint, process_alive, MariaDb, MariaDbOptions,
};

fn require_mariadb() {
    assert!(
        mariadb_binaries().is_some(),
        "these tests start real MariaDB servers; {}",
        mariadb_install_hint()
    );
}

/// The `mariadb` client over TCP as `user`, verifying the server certificate against the
/// server's CA unless `tls` is false (then `--skip-ssl`).
fn client(server: &MariaDb, user: &str, password: &str, tls: bool, sql: &str) -> Output {
    let mut cmd = Command::new(server.client_program());
    cmd.args([
        "--no-defaults",
        "--batch",
        "--skip-column-names",
        "--connect-timeout=10",
    ])
    .arg(format!("--host={}", server.host))
    .arg(format!("--port={}", server.port))
    .arg(format!("--user={user}"))
    .arg(format!("--password={password}"));
    if tls {
        cmd.arg(format!("--ssl-ca={}", server.ca_cert.display()))
            .arg("--ssl-verify-server-cert");
    } else {
        cmd.arg("--skip-ssl");
    }
    cmd.arg(&server.database)
        .args(["-e", sql])
        .output()
        .expect("the mariadb client is installed")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

#[test]
fn tls_server_serves_both_users_over_verified_tls_and_refuses_plaintext() {
    require_mariadb();
    let server = MariaDb::start(MariaDbOptions {
        init_sql: vec!["CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2);".into()],
        ..MariaDbOptions::default()
    })
    .unwrap();
    assert!(server.version.contains("MariaDB"), "{}", server.version);

    let native = client(
        &server,
        &server.user,
        &server.password,
        true,
        "SELECT CURRENT_USER(), (SELECT count(*) FROM items), \
         (SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS \
          WHERE VARIABLE_NAME = 'SSL_VERSION')",
    );
    assert!(native.status.success(), "{}", stderr(&native));
    let row = stdout(&native);
    let fields: Vec<&str> = row.split('\t').collect();
    assert_eq!(fields[..2], [format!("{}@%", server.user).as_str(), "2"]);
    assert!(fields[2].starts_with("TLSv1."), "{row}");

    let ed = client(
        &server,
        &server.ed25519_user,
        &server.ed25519_password,
        true,
        "SELECT CURRENT_USER()",
    );
    assert!(ed.status.success(), "{}", stderr(&ed));
    assert_eq!(stdout(&ed), format!("{}@%", server.ed25519_user));

    // Each user authenticates with the plugin the gateway has to speak.
    let plugins = server
        .sql_in(
            "mysql",
            &format!(
                "SELECT User, plugin FROM mysql.user WHERE User IN ('{}', '{}') ORDER BY User",
                server.user, server.ed25519_user
            ),
        )
        .unwrap();
    let mut expected = [
        (server.user.as_str(), "mysql_native_password"),
        (server.ed25519_user.as_str(), "ed25519"),
    ];
    expected.sort();
    let expected: Vec<String> = expected.iter().map(|(u, p)| format!("{u}\t{p}")).collect();
    assert_eq!(plugins.trim(), expected.join("\n"));

    let wrong = client(&server, &server.user, "not-the-password", true, "SELECT 1");
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("1045"), "{}", stderr(&wrong));

    let plain = client(&server, &server.user, &server.password, false, "SELECT 1");
    assert!(!plain.status.success(), "plaintext login was accepted");

    // No passwordless root over TCP: only root@localhost on the socket stays.
    let root_tcp = client(&server, "root", "", true, "SELECT 1");
    assert!(!root_tcp.status.success(), "root logged in over TCP");

    let pid = server.pid().unwrap();
    let port = server.port;
    let dir = server.dir.clone();
    drop(server);
    assert!(!process_alive(pid), "mariadbd {pid} still runs after drop");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn without_require_secure_transport_plaintext_logins_work() {
    require_mariadb();
    let server = MariaDb::start(MariaDbOptions {
        require_secure_transport: false,
        ..MariaDbOptions::default()
    })
    .unwrap();
    let plain = client(
        &server,
        &server.user,
        &server.password,
        false,
        "SELECT COUNT(*) FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME = 'SSL_VERSION' AND VARIABLE_VALUE <> ''",
    );
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(stdout(&plain), "0");
    let tls = client(&server, &server.user, &server.password, true, "SELECT 1");
    assert!(tls.status.success(), "{}", stderr(&tls));
}

#[test]
fn a_certificate_for_another_name_fails_verification() {
    require_mariadb();
    let server = MariaDb::start(MariaDbOptions {
        server_dns: vec!["db.example.test".into()],
        ..MariaDbOptions::default()
    })
    .unwrap();
    // 127.0.0.1 is always an IP SAN; "localhost" is not in this certificate.
    let out = Command::new(server.client_program())
        .args(["--no-defaults", "--protocol=tcp", "--host=localhost"])
        .arg(format!("--port={}", server.port))
        .arg(format!("--user={}", server.user))
        .arg(format!("--password={}", server.password))
        .arg(format!("--ssl-ca={}", server.ca_cert.display()))
        .args(["--ssl-verify-server-cert", "-e", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "hostname mismatch was accepted");
    assert!(
        stderr(&out).contains("ERROR 2026") && stderr(&out).contains("certificate"),
        "{}",
        stderr(&out)
    );
}
