//! Starts real PostgreSQL servers and checks them with the real `psql` client.

use std::net::TcpStream;
use std::process::{Command, Output};

use tollgate_testsupport::{
    install_hint, pg_bin_dir, process_alive, AuthMethod, ClusterOptions, PgCluster,
};

fn require_postgres() {
    assert!(
        pg_bin_dir().is_some(),
        "these tests start real PostgreSQL servers; {}",
        install_hint()
    );
}

/// `psql` as a client over TCP, with the login user's password.
fn client_psql(cluster: &PgCluster, sslmode: &str, sql: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(cluster.conninfo(sslmode))
        .env("PGPASSWORD", &cluster.password)
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGSSLMODE")
        .output()
        .expect("psql is installed")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn tls_cluster_accepts_verified_tls_and_refuses_plaintext() {
    require_postgres();
    let cluster = PgCluster::start(ClusterOptions {
        init_sql: vec!["CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2);".into()],
        ..ClusterOptions::default()
    })
    .unwrap();

    let tls = client_psql(
        &cluster,
        "verify-full",
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(tls.status.success(), "{}", stderr(&tls));
    assert_eq!(stdout(&tls), "t");

    // init_sql ran in the app database, and the login user owns that database.
    let owner = client_psql(
        &cluster,
        "verify-full",
        "SELECT current_user, pg_get_userbyid(datdba), (SELECT count(*) FROM items) \
         FROM pg_database WHERE datname = current_database()",
    );
    assert!(owner.status.success(), "{}", stderr(&owner));
    assert_eq!(stdout(&owner), "tollgate_app|tollgate_app|2");

    // The stored verifier matches the configured method.
    let verifier = cluster
        .psql("SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = 'tollgate_app'")
        .unwrap();
    assert_eq!(verifier.trim(), "SCRAM-SHA-256$");

    let plain = client_psql(&cluster, "disable", "SELECT 1");
    assert!(!plain.status.success(), "plaintext was accepted");
    assert!(
        stderr(&plain).contains("no pg_hba.conf entry") && stderr(&plain).contains("no encryption"),
        "{}",
        stderr(&plain)
    );

    let wrong_password = Command::new("psql")
        .args(["-X", "-c", "SELECT 1"])
        .arg(cluster.conninfo("verify-full"))
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(stderr(&wrong_password).contains("password authentication failed"));
}

#[test]
fn plaintext_cluster_accepts_sslmode_disable() {
    require_postgres();
    let cluster = PgCluster::start(ClusterOptions {
        tls: false,
        ..ClusterOptions::default()
    })
    .unwrap();
    let plain = client_psql(
        &cluster,
        "disable",
        "SELECT count(*) FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND NOT ssl",
    );
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(stdout(&plain), "1");
}

#[test]
fn drop_stops_the_server() {
    require_postgres();
    let cluster = PgCluster::start(ClusterOptions::default()).unwrap();
    let pid = cluster.postmaster_pid().expect("postmaster.pid");
    let port = cluster.port;
    let dir = cluster.dir.clone();
    assert!(process_alive(pid));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());

    drop(cluster);

    assert!(!process_alive(pid), "postmaster {pid} survived drop");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn start_in_keeps_the_directory_and_supports_md5() {
    require_postgres();
    // tempfile makes the directory 0700: as root, the server user cannot enter it, which
    // exercises the fallback that keeps the server's own files under /tmp.
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("demo-pg");
    let cluster = PgCluster::start_in(
        &dir,
        ClusterOptions {
            auth: AuthMethod::Md5,
            user: "demo".into(),
            database: "demo".into(),
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    assert!(cluster.ca_cert.starts_with(&dir) && cluster.ca_cert.exists());

    let verifier = cluster
        .psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'demo'")
        .unwrap();
    assert_eq!(verifier.trim(), "md5");
    let login = client_psql(&cluster, "verify-full", "SELECT current_user");
    assert!(login.status.success(), "{}", stderr(&login));
    assert_eq!(stdout(&login), "demo");

    let pid = cluster.postmaster_pid().unwrap();
    drop(cluster);
    assert!(!process_alive(pid));
    assert!(
        dir.join("pki/ca.crt").exists(),
        "start_in must leave its files"
    );
}
