//! Attempts to make MySQL run something other than what the gateway judged, sent on the raw
//! protocol (TLS, client certificate) to the real `tollgate serve` in front of a throwaway
//! TLS MariaDB: multi-statement strings, version comments, comment and quoting tricks under
//! the server's own `sql_mode`, character sets, other databases, opaque code, prepared
//! statement ids the server never confirmed (execute, bulk execute, long data, fetch),
//! `COM_CHANGE_USER` and `COM_RESET_CONNECTION`. The upstream user may do all of it: only the
//! gateway stands in the way, and every test checks the table is untouched.

mod common;

use common::mysql::{closed, execute_packet, Answer, Login, MyEnv, MyOptions, Raw};
use common::TOKEN;

const RULES: &str = r#"[[resources.rules]]
name = "no-drop"
statements = ["drop", "truncate"]
action = "deny"
[[resources.rules]]
name = "no-delete"
statements = ["delete"]
action = "deny"
[[resources.masks]]
columns = ["email"]
strategy = "redact"
"#;

fn start(extra_conf: &[&str]) -> MyEnv {
    MyEnv::start_with(MyOptions {
        init_sql: vec![
            "CREATE TABLE victim (id INT PRIMARY KEY, note VARCHAR(50))".into(),
            "INSERT INTO victim VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'), (5, 'e')".into(),
            "CREATE PROCEDURE wipe() DELETE FROM victim".into(),
            // Another database the upstream user may use: only the gateway keeps it out.
            "CREATE DATABASE other".into(),
            "CREATE TABLE other.secrets (s VARCHAR(20))".into(),
            "INSERT INTO other.secrets VALUES ('top secret')".into(),
            "GRANT ALL ON other.* TO tollgate_app@'%'".into(),
        ],
        extra_conf: extra_conf.iter().map(|s| s.to_string()).collect(),
        resource_extra: RULES.into(),
        ..Default::default()
    })
}

fn victim_rows(env: &MyEnv) -> String {
    env.db
        .sql("SELECT COUNT(*) FROM victim")
        .expect("victim exists")
        .trim()
        .to_string()
}

fn assert_refused(a: &Answer, sql: &str, code: u16) {
    assert_eq!(a.code(), Some(code), "{sql}: {a:?}");
}

#[test]
fn statements_smuggled_past_the_judgement_are_refused() {
    let env = start(&[]);
    let mut s = env.raw();
    let attacks = [
        // Several statements in one string, each judged.
        "SELECT 1; DROP TABLE victim",
        "SELECT 1;DELETE FROM victim",
        // A refused statement in the middle: nothing of the string runs, not even the first.
        "INSERT INTO victim VALUES (9, 'x'); DROP TABLE victim; SELECT 1",
        // Version comments are SQL to the server (MariaDB's /*M! too).
        "SELECT 1 /*! ; DROP TABLE victim */",
        "SELECT 1 /*M!100000 ; DROP TABLE victim */",
        "/*!50000 DROP */ TABLE victim",
        // `--` without a space is two minus signs, not a comment.
        "SELECT 1--1; DROP TABLE victim",
        "SELECT 1 # a comment ends at the line's end\n; DROP TABLE victim",
        // Settings that change how the rest of the text is read.
        "SET NAMES gbk",
        "SET character_set_client = 'sjis'",
        "SET NAMES utf8mb4; SELECT 1",
        "SET sql_mode = 'NO_BACKSLASH_ESCAPES'",
        "SET SESSION sql_mode = 'ANSI_QUOTES'",
        "SET @@session.sql_mode = concat(@@sql_mode, ',NO_BACKSLASH_ESCAPES')",
        "SET sql_mode = @m",
        // Files on either side.
        "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE victim",
        "SELECT * FROM victim INTO OUTFILE '/tmp/tollgate-victim'",
        "SELECT * FROM victim INTO DUMPFILE '/tmp/tollgate-victim'",
        // Other databases, however named.
        "SELECT * FROM other.secrets",
        "SELECT * FROM `other`.`secrets`",
        "SELECT * FROM victim v JOIN other.secrets o ON 1 = 1",
        "SHOW TABLES FROM other",
        "SHOW CREATE TABLE other.secrets",
        "ALTER TABLE victim RENAME TO other.victim",
        "RENAME TABLE victim TO other.victim",
        "CREATE TABLE copy LIKE other.secrets",
        "USE other",
        // Code the gateway cannot see into is judged as any write (the rules deny drops).
        "CALL wipe()",
        "EXECUTE IMMEDIATE 'DROP TABLE victim'",
        "EXECUTE IMMEDIATE @q",
        "DELETE FROM victim",
        // What cannot be read is refused (unparsable = deny).
        "SELEC * FROM victim",
    ];
    for sql in attacks {
        let a = s.query(sql);
        assert_refused(&a, sql, 1227);
    }
    // Preparing runs nothing; executing the name runs what it holds, judged then: a text
    // known only when it runs is opaque code.
    for prepare in [
        "SET @q = 'DROP TABLE victim'; PREPARE s FROM @q",
        "PREPARE s FROM 'DROP TABLE victim'",
        "PREPARE s FROM 'SELECT 1'; PREPARE s FROM 'DELETE FROM victim'",
    ] {
        assert!(matches!(s.query(prepare), Answer::Ok), "{prepare}");
        assert_refused(&s.query("EXECUTE s"), prepare, 1227);
    }
    // COM_INIT_DB to another database: 1044.
    let mut init_db = vec![0x02];
    init_db.extend_from_slice(b"other");
    let a = s.command(&init_db);
    assert_refused(&a, "COM_INIT_DB other", 1044);
    // The session still works, in its own database; comments stay comments.
    let a = s.query("SELECT COUNT(*) FROM victim -- ; DROP TABLE victim");
    assert_eq!(a.text_rows(), [["5"]]);
    let a = s.query("SELECT '/*! DROP TABLE victim */', 'it''s', \"a\\\"b\"");
    assert_eq!(
        a.text_rows(),
        [["/*! DROP TABLE victim */", "it's", "a\"b"]]
    );
    assert_eq!(victim_rows(&env), "5");
    assert_eq!(
        env.db
            .sql("SELECT COUNT(*) FROM other.secrets")
            .unwrap()
            .trim(),
        "1"
    );

    // Every refusal is recorded with the rule that refused it.
    let evs = env.events();
    let refused = evs
        .iter()
        .filter(|e| e["kind"] == "result" && e["payload"]["outcome"] == "refused")
        .count();
    assert!(refused >= attacks.len(), "{refused} refusals recorded");
    let smuggled = evs
        .iter()
        .find(|e| e["kind"] == "command" && e["payload"]["text"] == "SELECT 1; DROP TABLE victim")
        .expect("recorded");
    assert_eq!(smuggled["payload"]["decision"]["action"], "deny");
    assert_eq!(smuggled["payload"]["decision"]["rule"], "no-drop");
}

/// The server's own `sql_mode` decides how text splits into statements: the gateway reads it
/// at connect and after anything that may change it.
#[test]
fn text_is_judged_in_the_servers_sql_mode() {
    let env = start(&["sql_mode = NO_BACKSLASH_ESCAPES,ANSI_QUOTES"]);
    let mut s = env.raw();
    // Under NO_BACKSLASH_ESCAPES the string ends at the second quote and a DROP follows.
    let sql = r"SELECT '\'; DROP TABLE victim; -- '";
    assert_refused(&s.query(sql), sql, 1227);
    // ANSI_QUOTES: "..." names a database.
    let sql = r#"SELECT * FROM "other"."secrets""#;
    assert_refused(&s.query(sql), sql, 1227);
    let a = s.query(r"SELECT 'a\b'");
    assert_eq!(a.text_rows(), [[r"a\b"]]);
    // An allowed change of mode is followed: backslashes escape again.
    assert!(matches!(s.query("SET sql_mode = ''"), Answer::Ok));
    let a = s.query(r"SELECT 'it\'s; DROP TABLE victim'");
    assert_eq!(a.text_rows(), [["it's; DROP TABLE victim"]]);
    // DEFAULT brings back the server's mode: so does the gateway's reading.
    assert!(matches!(s.query("SET sql_mode = DEFAULT"), Answer::Ok));
    let sql = r"SELECT '\'; DROP TABLE victim; -- '";
    assert_refused(&s.query(sql), sql, 1227);
    // COM_RESET_CONNECTION too.
    assert!(matches!(s.query("SET sql_mode = ''"), Answer::Ok));
    assert!(matches!(s.command(&[0x1f]), Answer::Ok));
    assert_refused(&s.query(sql), sql, 1227);
    assert_eq!(victim_rows(&env), "5");
}

#[test]
fn prepared_statements_run_only_what_the_server_confirmed() {
    let env = start(&[]);
    let mut s = env.raw();
    // A refused statement gets no id: MariaDB's "last prepared" id runs nothing, in an
    // execution or a bulk execution, and long data for it is not sent.
    let a = s.prepare("DELETE FROM victim").unwrap_err();
    assert_refused(&a, "prepare DELETE", 1227);
    for command in [0x17, 0xfa] {
        let a = s.command(&execute_packet(command, 0xffff_ffff, 0, &[]));
        assert_refused(&a, "execute the last prepared", 1243);
    }
    let mut long = vec![0x18];
    long.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
    long.extend_from_slice(&0u16.to_le_bytes());
    long.extend_from_slice(b"DROP TABLE victim");
    s.send(0, &long);
    // Ids the server never gave.
    let st = s
        .prepare("SELECT id, email FROM customers WHERE id = ?")
        .expect("prepared");
    for id in [st.id + 1, st.id + 1000] {
        let a = s.command(&execute_packet(0xfa, id, 0, &[]));
        assert_refused(&a, "bulk execute of an unknown id", 1243);
        let a = s.execute(id, 0, &[]);
        assert_refused(&a, "execute of an unknown id", 1243);
        let mut fetch = vec![0x1c];
        fetch.extend_from_slice(&id.to_le_bytes());
        fetch.extend_from_slice(&10u32.to_le_bytes());
        assert_refused(&s.command(&fetch), "fetch of an unknown id", 1243);
    }
    // The confirmed one runs, its binary rows masked.
    let Answer::Rows(rows) = s.execute(st.id, 0, &["1"]) else {
        panic!("no rows")
    };
    assert_eq!(rows.len(), 1);
    let row = String::from_utf8_lossy(&rows[0]).into_owned();
    assert!(!row.contains("ada@example.com"), "{row:?}");
    assert!(row.contains("****"), "{row:?}");
    // Through a read-only cursor: the rows come with COM_STMT_FETCH, masked too.
    let all = s
        .prepare("SELECT id, email FROM customers ORDER BY id")
        .expect("prepared");
    let a = s.execute(all.id, 1, &[]);
    assert!(matches!(&a, Answer::Rows(r) if r.is_empty()), "{a:?}");
    let mut fetch = vec![0x1c];
    fetch.extend_from_slice(&all.id.to_le_bytes());
    fetch.extend_from_slice(&10u32.to_le_bytes());
    s.send(0, &fetch);
    let mut fetched = Vec::new();
    loop {
        let p = s.read();
        if p[0] == 0xfe && p.len() < 9 {
            break;
        }
        assert_ne!(p[0], 0xff, "{}", String::from_utf8_lossy(&p));
        fetched.push(String::from_utf8_lossy(&p).into_owned());
    }
    assert_eq!(fetched.len(), 2);
    assert!(
        fetched.iter().all(|r| !r.contains("@example")),
        "{fetched:?}"
    );
    // Closed: gone.
    let mut close = vec![0x19];
    close.extend_from_slice(&st.id.to_le_bytes());
    s.send(0, &close);
    assert_refused(&s.execute(st.id, 0, &["1"]), "execute after close", 1243);
    // SQL PREPARE: an execution is judged by what the name holds now.
    assert!(matches!(
        s.query("PREPARE q FROM 'SELECT COUNT(*) FROM victim'"),
        Answer::Ok
    ));
    assert_eq!(s.query("EXECUTE q").text_rows(), [["5"]]);
    assert!(matches!(
        s.query("PREPARE q FROM 'DELETE FROM victim'"),
        Answer::Ok
    ));
    assert_refused(&s.query("EXECUTE q"), "execute after re-prepare", 1227);
    assert_eq!(victim_rows(&env), "5");
    let evs = env.events();
    assert!(evs.iter().any(|e| e["kind"] == "command"
        && e["payload"]["protocol"] == "execute"
        && e["payload"]["text"] == "SELECT id, email FROM customers WHERE id = ?"));
}

/// The commands that carry a confirmed statement's parameters apart from COM_STMT_EXECUTE run
/// through the gateway as the server defines them: long data (`COM_STMT_SEND_LONG_DATA`,
/// sent in pieces and joined by the server) and MariaDB's `COM_STMT_BULK_EXECUTE` (one
/// packet, many rows), each recorded as the statement it runs.
#[test]
fn long_data_and_bulk_execution_run_the_confirmed_statement() {
    let env = start(&[]);
    let mut s = env.raw();
    let st = s
        .prepare("INSERT INTO victim VALUES (?, ?)")
        .expect("prepared");
    assert_eq!(st.params, 2);
    for piece in ["long-", "data"] {
        let mut long = vec![0x18];
        long.extend_from_slice(&st.id.to_le_bytes());
        long.extend_from_slice(&1u16.to_le_bytes());
        long.extend_from_slice(piece.as_bytes());
        s.send(0, &long);
    }
    // The second parameter came as long data: its value is not in the execution.
    let mut execute = vec![0x17];
    execute.extend_from_slice(&st.id.to_le_bytes());
    execute.push(0);
    execute.extend_from_slice(&1u32.to_le_bytes());
    execute.extend_from_slice(&[0, 1, 0xfd, 0, 0xfd, 0, 1, b'6']);
    let a = s.command(&execute);
    assert!(matches!(a, Answer::Ok), "{a:?}");
    // Two rows in one bulk execution: flags SEND_TYPES, the types, then per row and
    // parameter an indicator (0: a value follows) and the value.
    let mut bulk = vec![0xfa];
    bulk.extend_from_slice(&st.id.to_le_bytes());
    bulk.extend_from_slice(&128u16.to_le_bytes());
    bulk.extend_from_slice(&[0xfd, 0, 0xfd, 0]);
    for (id, note) in [("7", "g"), ("8", "h")] {
        for v in [id, note] {
            bulk.extend_from_slice(&[0, v.len() as u8]);
            bulk.extend_from_slice(v.as_bytes());
        }
    }
    let a = s.command(&bulk);
    assert!(matches!(a, Answer::Ok), "{a:?}");
    let rows = env
        .db
        .sql("SELECT GROUP_CONCAT(id, '=', note ORDER BY id) FROM victim WHERE id > 5")
        .unwrap();
    assert_eq!(rows.trim(), "6=long-data,7=g,8=h");
    let evs = env.events();
    for protocol in ["execute", "bulk_execute"] {
        assert!(
            evs.iter().any(|e| e["kind"] == "command"
                && e["payload"]["protocol"] == protocol
                && e["payload"]["text"] == "INSERT INTO victim VALUES (?, ?)"),
            "no {protocol} recorded"
        );
    }
}

fn change_user(s: &mut Raw, database: &str, plugin: &str, auth: &[u8]) -> Vec<u8> {
    let mut p = vec![0x11];
    p.extend_from_slice(b"whoever\0");
    p.push(auth.len() as u8);
    p.extend_from_slice(auth);
    p.extend_from_slice(database.as_bytes());
    p.push(0);
    p.extend_from_slice(&45u16.to_le_bytes());
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    s.send(0, &p);
    s.read()
}

/// Pools reset connections with COM_CHANGE_USER to the same user: allowed as a reset of the
/// same identity on the same resource, the session's state forgotten; anything else ends the
/// connection.
#[test]
fn change_user_is_only_a_reset_of_the_same_identity() {
    let env = start(&[]);
    let mut s = env.raw();
    assert!(matches!(s.query("SET @v = 7"), Answer::Ok));
    let st = s.prepare("SELECT 1").expect("prepared");
    let ok = change_user(&mut s, "app", "caching_sha2_password", &[]);
    assert_eq!(ok[0], 0, "{ok:?}");
    assert_eq!(s.query("SELECT @v").text_rows(), [["NULL"]]);
    assert_refused(
        &s.execute(st.id, 0, &[]),
        "a statement of before the reset",
        1243,
    );
    assert_eq!(s.query("SELECT COUNT(*) FROM victim").text_rows(), [["5"]]);

    // Another resource (or database): refused, and the connection ends.
    let answer = change_user(&mut s, "other", "caching_sha2_password", &[]);
    assert_eq!(answer[0], 0xff);
    assert_eq!(u16::from_le_bytes([answer[1], answer[2]]), 1045);
    let msg = String::from_utf8_lossy(&answer[9..]).into_owned();
    assert!(msg.contains("COM_CHANGE_USER only resets"), "{msg}");
    assert!(closed(&mut s.s));

    // A token session authenticates again with its token (in clear inside TLS, or asked
    // for by caching_sha2_password's full authentication).
    let mut t = Raw::connect(&env, Login::Token(TOKEN), "app").expect("token session");
    assert!(matches!(t.query("SET @v = 1"), Answer::Ok));
    let mut clear = TOKEN.as_bytes().to_vec();
    clear.push(0);
    let ok = change_user(&mut t, "app", "mysql_clear_password", &clear);
    assert_eq!(ok[0], 0, "{ok:?}");
    assert_eq!(t.query("SELECT @v").text_rows(), [["NULL"]]);
    let more = change_user(&mut t, "app", "caching_sha2_password", &[1; 32]);
    assert_eq!(more, [0x01, 0x04], "full authentication asked for");
    t.send(2, &clear);
    assert_eq!(t.read()[0], 0);
    assert_eq!(t.query("SELECT 2").text_rows(), [["2"]]);
    // Another token (or none): refused.
    let answer = change_user(&mut t, "app", "mysql_clear_password", b"not-the-token\0");
    assert_eq!(answer[0], 0xff);
    assert!(closed(&mut t.s));

    // COM_RESET_CONNECTION: allowed, state forgotten.
    let mut r = env.raw();
    assert!(matches!(r.query("SET @v = 3"), Answer::Ok));
    let st = r.prepare("SELECT 1").expect("prepared");
    assert!(matches!(r.command(&[0x1f]), Answer::Ok));
    assert_eq!(r.query("SELECT @v").text_rows(), [["NULL"]]);
    assert_refused(&r.execute(st.id, 0, &[]), "after reset", 1243);

    let evs = env.events();
    let changes: Vec<_> = evs
        .iter()
        .filter(|e| e["kind"] == "command" && e["payload"]["protocol"] == "change_user")
        .collect();
    assert_eq!(changes.len(), 5, "{changes:?}");
    assert_eq!(
        changes
            .iter()
            .filter(|e| e["payload"]["decision"]["action"] == "deny")
            .count(),
        2
    );
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains(TOKEN));
}
