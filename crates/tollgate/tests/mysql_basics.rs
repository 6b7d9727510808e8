//! The MySQL adapter end to end: the real `tollgate serve` in front of a throwaway TLS MariaDB,
//! driven by the `mariadb` command-line client (client certificate and token), and raw sockets
//! for what a well-behaved client never sends (plaintext handshakes).

mod common;

use common::mysql::{err, mariadb, out, read_packet, write_packet, MyEnv};
use common::TOKEN;
use std::net::TcpStream;

fn start(resource_extra: &str, ed25519: bool) -> MyEnv {
    MyEnv::start(resource_extra, ed25519)
}

#[test]
fn certificate_and_token_sessions_are_relayed_judged_and_recorded() {
    let env = start(
        r#"[[resources.rules]]
name = "no drops"
statements = ["drop", "truncate"]
action = "deny"
"#,
        false,
    );
    let o = env.as_alice("app", "SELECT name FROM customers ORDER BY id");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "Ada\nBob\n");

    let o = env.with_password(TOKEN, "SELECT COUNT(*) FROM customers");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "2\n");

    // A wrong token: 1045, and no session.
    let o = env.with_password("not-the-token", "SELECT 1");
    assert!(!o.status.success());
    assert!(err(&o).contains("ERROR 1045"), "{}", err(&o));

    // A rule: denied with the rule's name, nothing runs.
    let o = env.as_alice("app", "DROP TABLE customers");
    assert!(err(&o).contains("ERROR 1227"), "{}", err(&o));
    assert!(err(&o).contains("no drops"), "{}", err(&o));
    // A version comment is read as the SQL the server runs.
    let o = env.as_alice("app", "/*!50000 DROP TABLE customers */");
    assert!(err(&o).contains("no drops"), "{}", err(&o));
    assert_eq!(
        env.db.sql("SELECT COUNT(*) FROM customers").unwrap().trim(),
        "2"
    );

    // MySQL-specific refusals.
    for (sql, what) in [
        ("SELECT * FROM mysql.user", "database \"mysql\""),
        ("SET NAMES gbk", "gbk"),
        ("SET sql_mode = 'ANSI_QUOTES'", "ANSI_QUOTES"),
        ("SELECT 1 INTO OUTFILE '/tmp/tollgate-x'", "OUTFILE"),
    ] {
        let o = env.as_alice("app", sql);
        assert!(err(&o).contains("ERROR 1227"), "{sql}: {}", err(&o));
        assert!(err(&o).contains(what), "{sql}: {}", err(&o));
    }

    // Unknown and forbidden resources look the same: 1044.
    let o = env.as_alice("nope", "SELECT 1");
    assert!(err(&o).contains("ERROR 1044"), "{}", err(&o));

    let evs = env.events();
    let opens: Vec<_> = evs.iter().filter(|e| e["kind"] == "session.open").collect();
    assert!(opens.iter().any(|e| e["payload"]["listener"] == "mysql"
        && e["payload"]["subject"] == "alice"
        && e["payload"]["auth_method"] == "cert"));
    assert!(opens
        .iter()
        .any(|e| e["payload"]["subject"] == "ci-bot" && e["payload"]["auth_method"] == "token"));
    let denied = evs
        .iter()
        .find(|e| e["kind"] == "command" && e["payload"]["text"] == "DROP TABLE customers")
        .expect("the denied command is recorded");
    assert_eq!(denied["payload"]["decision"]["action"], "deny");
    assert!(evs
        .iter()
        .any(|e| e["kind"] == "result" && e["payload"]["outcome"] == "refused"));
    let allowed = evs
        .iter()
        .find(|e| {
            e["kind"] == "command"
                && e["payload"]["text"] == "SELECT name FROM customers ORDER BY id"
        })
        .expect("the select is recorded");
    assert_eq!(allowed["payload"]["decision"]["action"], "allow");
    // The token is never recorded.
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains(TOKEN));
    assert!(!all.contains(&env.db.password));
}

#[test]
fn masks_apply_to_query_rows_and_sql_prepared_statements() {
    let env = start(
        r#"[[resources.masks]]
columns = ["email"]
strategy = "redact"
"#,
        false,
    );
    let o = env.as_alice("app", "SELECT id, email FROM customers ORDER BY id");
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    assert!(!text.contains("ada@example.com"), "{text}");
    assert!(text.starts_with("1\t"), "{text}");
    // EXECUTE is judged by the statement its name holds (the client sends three queries).
    let o = env.as_alice(
        "app",
        "PREPARE s FROM 'SELECT email FROM customers WHERE id = ?'; SET @i = 1; EXECUTE s USING @i",
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(!out(&o).contains("ada@example.com"), "{}", out(&o));
    let evs = env.events();
    assert!(evs
        .iter()
        .any(|e| e["kind"] == "result" && common::masked_values(&e["payload"]) >= 1));
}

#[test]
fn ed25519_upstream_credentials_are_injected() {
    let env = start("", true);
    let o = env.as_alice("app", "SELECT CURRENT_USER()");
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).starts_with(&format!("{}@", env.db.ed25519_user)),
        "{}",
        out(&o)
    );
}

/// A handshake that does not ask for TLS gets 3159 with a hint, and is counted.
#[test]
fn plaintext_handshakes_are_refused_with_3159() {
    let env = start("", false);
    let mut s = TcpStream::connect(("127.0.0.1", env.mysql_port)).unwrap();
    let greeting = read_packet(&mut s);
    assert_eq!(greeting[0], 10, "protocol 10 greeting");
    // Capabilities: PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH | CONNECT_WITH_DB, no SSL.
    let caps: u32 = (1 << 9) | (1 << 15) | (1 << 19) | (1 << 3);
    let mut p = Vec::new();
    p.extend_from_slice(&caps.to_le_bytes());
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(b"alice\0");
    p.push(0);
    p.extend_from_slice(b"app\0");
    p.extend_from_slice(b"caching_sha2_password\0");
    write_packet(&mut s, 1, &p);
    let answer = read_packet(&mut s);
    assert_eq!(answer[0], 0xff);
    assert_eq!(u16::from_le_bytes([answer[1], answer[2]]), 3159);
    let msg = String::from_utf8_lossy(&answer[9..]).into_owned();
    assert!(msg.contains("TLS"), "{msg}");

    // The mariadb client without TLS sees the same.
    let o = mariadb(&[
        "-h".into(),
        "127.0.0.1".into(),
        "-P".into(),
        env.mysql_port.to_string(),
        "--skip-ssl".into(),
        "-u".into(),
        "alice".into(),
        "-D".into(),
        "app".into(),
        "-e".into(),
        "SELECT 1".into(),
    ]);
    assert!(err(&o).contains("3159"), "{}", err(&o));
}

/// The prepared-statement attack: a statement the gateway refused never gets an id, and
/// executing the id the server would have given it (or MariaDB's "last prepared" id after a
/// refusal) runs nothing.
#[test]
fn an_execute_runs_only_a_statement_the_server_confirmed() {
    let env = start(
        r#"[[resources.rules]]
name = "no deletes"
statements = ["delete"]
action = "deny"
"#,
        false,
    );
    let mut s = env.raw();
    // COM_STMT_PREPARE of an allowed statement: PREPARE_OK with its id.
    let allowed = s
        .prepare("SELECT name FROM customers WHERE id = 1")
        .expect("prepared")
        .id;
    // A refused statement: 1227, and no id.
    let refused = s.prepare("DELETE FROM customers").unwrap_err();
    assert_eq!(refused.code(), Some(1227));
    for id in [allowed + 1, 0xffff_ffff] {
        let answer = s.execute(id, 0, &[]);
        assert_eq!(answer.code(), Some(1243), "execute {id:#x}: {answer:?}");
    }
    assert_eq!(env.customers(), "2");
}
