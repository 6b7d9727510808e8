//! PostgreSQL drivers through a transaction-pooled resource: psycopg 3 (server-side prepared
//! statements), asyncpg (its statement cache, the default, and its own pool with its reset
//! query), the PostgreSQL JDBC driver (server-prepared from the first execution) and node-pg
//! (named queries). pgjdbc connects with its default URL, so it sends its settings as
//! session-level SETs once connected, which the gateway carries from connection to connection
//! (asserted every round). Six clients of each driver at once on two upstream connections run
//! parameterised queries, committed and rolled-back transactions, errors inside and outside a
//! transaction and the query after; the drivers' statements are prepared again on whichever
//! connection serves them. The drivers are scripts in tests/pg_pool/, installed under
//! target/tmp (pip, npm; the JDBC jar from Debian's `libpostgresql-jdbc-java`).

mod common;

use common::drivers::{javac, json_output, must, node_modules, python_venv, tmp_dir};
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const CLIENTS: usize = 6;
const ROUNDS: i64 = 5;
const POOL_SIZE: usize = 2;
const PG_JDBC: &str = "/usr/share/java/postgresql.jar";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/pg_pool")
        .join(name)
}

/// A transaction-pooled "app" with a table `hits` for the drivers' rows.
fn pooled_env() -> Env {
    let env = Env::start_with(EnvOptions {
        resource_extra: format!(
            "pool_mode = \"transaction\"\npool_size = {POOL_SIZE}\npool_timeout = \"60s\""
        ),
        ..Default::default()
    });
    env.pg
        .psql(&format!(
            "CREATE TABLE hits (client int, round int); GRANT ALL ON hits TO \"{}\"",
            env.pg.user
        ))
        .expect("create table hits");
    env
}

fn config(env: &Env) -> Value {
    json!({
        "conn": {
            "host": "localhost",
            "port": env.gw.pg_port,
            "dbname": "app",
            "user": "alice",
            "ca": env.pki.ca,
            "cert": env.alice.cert,
            "key": env.alice.key,
        },
        "table": "hits",
        "clients": CLIENTS,
        "rounds": ROUNDS,
    })
}

fn output(cmd: Command, env: &Env, what: &str) -> Value {
    json_output(cmd, "TG_PG_POOL", &config(env), what)
}

/// What every client of `driver` must have seen, and what the server holds after them.
fn check(driver: &str, env: &Env, out: &Value) {
    let clients = out["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), CLIENTS, "{driver}: {out}");
    let mut pids = HashSet::new();
    for (i, c) in clients.iter().enumerate() {
        let i = i as i64;
        let values: Vec<i64> = (0..ROUNDS).map(|r| (i * 100 + r) * 2).collect();
        let after: Vec<i64> = (0..ROUNDS).map(|r| r * 2).collect();
        let n = ROUNDS as usize;
        assert_eq!(c["values"], json!(values), "{driver} client {i}: {c}");
        assert_eq!(c["after_error"], json!(after), "{driver} client {i}: {c}");
        assert_eq!(
            c["errors"],
            json!(vec!["22012"; 2 * n]),
            "{driver} client {i}: division by zero in and out of a transaction"
        );
        assert_eq!(
            c["count"],
            json!(2 * ROUNDS),
            "{driver} client {i}: committed rows lost or rolled-back rows kept"
        );
        pids.extend(c["pids"].as_array().unwrap().iter().map(|p| p.to_string()));
    }
    assert!(
        pids.len() <= POOL_SIZE,
        "{driver}: served by {pids:?}, more than pool_size connections"
    );
    assert!(env.gateway_backends() <= POOL_SIZE, "{driver}");
    let held = env
        .pg
        .psql("SELECT count(*) FILTER (WHERE round = -1), count(*) FROM hits")
        .unwrap();
    assert_eq!(
        held.trim(),
        format!("0|{}", CLIENTS as i64 * 2 * ROUNDS),
        "{driver}: rows the server holds (rolled back | all)"
    );
    env.wait_pool_idle();
    eprintln!(
        "{driver}: {CLIENTS} clients served by {} upstream connections",
        pids.len()
    );
}

fn python_driver(driver: &str) {
    let python = python_venv(
        "pg-pool-py",
        &["psycopg[binary]", "asyncpg"],
        "psycopg, asyncpg",
    );
    let env = pooled_env();
    let mut cmd = Command::new(python);
    cmd.arg(script("clients.py")).arg(driver);
    let out = output(cmd, &env, driver);
    check(driver, &env, &out);
}

#[test]
fn psycopg_through_a_transaction_pool() {
    python_driver("psycopg");
}

#[test]
fn asyncpg_with_its_statement_cache_through_a_transaction_pool() {
    python_driver("asyncpg");
}

#[test]
fn node_pg_through_a_transaction_pool() {
    let modules = node_modules("pg-pool-node", &["pg@8"], "pg");
    let env = pooled_env();
    let mut cmd = Command::new("node");
    cmd.arg(script("clients.cjs")).env("NODE_PATH", modules);
    let out = output(cmd, &env, "node-pg");
    check("node-pg", &env, &out);
}

#[test]
fn jdbc_through_a_transaction_pool() {
    let classes = javac("pg-pool-java", PG_JDBC, &script("Clients.java"));
    let env = pooled_env();
    // pgjdbc reads a client key as PKCS#8 DER.
    let pk8 = tmp_dir().join(format!("alice-{}.pk8", env.gw.pg_port));
    must(
        Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&env.alice.key)
            .arg("-out")
            .arg(&pk8)
            .output()
            .expect("openssl"),
        "openssl pkcs8",
    );
    let java = || {
        let mut cmd = Command::new("java");
        for (k, v) in config(&env)["conn"].as_object().unwrap() {
            let v = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            cmd.arg(format!("-Dtg.{k}={v}"));
        }
        cmd.arg(format!("-Dtg.pk8={}", pk8.display()))
            .arg(format!("-Dtg.clients={CLIENTS}"))
            .arg(format!("-Dtg.rounds={ROUNDS}"))
            .arg("-Dtg.table=hits")
            .arg("-cp")
            .arg(format!("{PG_JDBC}:{}", classes.display()))
            .arg("Clients");
        output(cmd, &env, "JDBC")
    };
    let out = java();
    check("JDBC", &env, &out);
    // The settings pgjdbc SETs once connected hold on every connection its transactions ran on.
    for c in out["clients"].as_array().unwrap() {
        assert_eq!(
            c["settings"],
            json!(vec!["3|PostgreSQL JDBC Driver"; ROUNDS as usize]),
            "{c}"
        );
    }
    let _ = std::fs::remove_file(&pk8);
}
