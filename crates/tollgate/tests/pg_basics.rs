//! The PostgreSQL data path with real clients: psql and tokio-postgres through the gateway,
//! client certificate and token identities, and what the audit trail records about it.

mod common;
use common::*;

#[test]
fn psql_with_client_certificate_and_with_token() {
    let env = Env::start();
    let out = env.psql(&env.conninfo("app"), &["-c", "SELECT current_user, ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE pid = pg_backend_pid()"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The upstream user is the resource's, and the upstream leg is TLS.
    assert_eq!(stdout(&out), format!("{}|t", env.pg.user));

    let out = psql_env(
        &env.conninfo_token("app"),
        &["-c", "SELECT 40 + 2"],
        &[("PGPASSWORD", TOKEN)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42");

    let events = env.events_after_closes(2);
    let opens: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "session.open")
        .map(|e| &e["payload"])
        .collect();
    assert_eq!(opens.len(), 2, "{events:#?}");
    assert_eq!(opens[0]["subject"], "alice");
    assert_eq!(opens[0]["auth_method"], "cert");
    assert_eq!(opens[0]["resource"], "app");
    assert_eq!(opens[0]["client_tls"]["version"], "TLSv1.3");
    assert_eq!(opens[0]["upstream_tls"]["version"], "TLSv1.3");
    assert!(opens[0]["client_cert_fingerprint"]
        .as_str()
        .is_some_and(|f| f.len() == 64));
    assert_eq!(opens[1]["subject"], "ci-bot");
    assert_eq!(opens[1]["auth_method"], "token");
    let texts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "command")
        .map(|e| {
            e["payload"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(texts.iter().any(|t| t == "SELECT 40 + 2"), "{texts:?}");
    // The token itself never reaches the audit trail.
    assert!(!serde_json::to_string(&events).unwrap().contains(TOKEN));
    // Every event of a session carries a monotonic timestamp that never goes back.
    let session = &events.iter().find(|e| e["kind"] == "session.open").unwrap()["session_id"];
    let t: Vec<u64> = events
        .iter()
        .filter(|e| &e["session_id"] == session)
        .map(|e| e["payload"]["t_us"].as_u64().expect("t_us on every event"))
        .collect();
    assert!(t.len() >= 4, "{t:?}");
    assert!(t.windows(2).all(|w| w[0] <= w[1]), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_text_and_binary() {
    let env = tokio::task::spawn_blocking(Env::start).await.unwrap();
    let c = env.client().await;
    // Text (simple protocol).
    let rows = c
        .simple_query("SELECT 'a'::text AS x, 2::int AS y")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(row.get("x"), Some("a"));
    assert_eq!(row.get("y"), Some("2"));
    // Binary results and parameters (extended protocol).
    let row = c
        .query_one(
            "SELECT $1::int8 * 2, $2::text || '!', now() > '2000-01-01'::timestamptz, $3::bytea",
            &[&21i64, &"hi", &vec![0u8, 1, 2]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, Vec<u8>>(3), vec![0u8, 1, 2]);
    drop(c);
    let events = tokio::task::spawn_blocking(move || env.events_after_closes(1))
        .await
        .unwrap();
    let cmd = events
        .iter()
        .find(|e| {
            e["kind"] == "command"
                && e["payload"]["protocol"] == "extended"
                && e["payload"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("$1::int8")
        })
        .expect("extended command event");
    assert_eq!(
        cmd["payload"]["params"],
        serde_json::json!(["<binary 8 bytes>", "<binary 2 bytes>", "<binary 3 bytes>"])
    );
    let result = events
        .iter()
        .find(|e| {
            e["kind"] == "result"
                && e["payload"]["n"] == cmd["payload"]["n"]
                && e["session_id"] == cmd["session_id"]
        })
        .expect("result event");
    assert_eq!(result["payload"]["outcome"], "ok");
    assert_eq!(result["payload"]["rows"], 1);
}

/// Drive `psql` through a pseudo-terminal, as a person would: prompts, `\d`, a query, `\q`.
fn interactive_psql(conninfo: &str, lines: &[&str]) -> String {
    // Each line is typed only once psql shows its prompt again, so a slow machine cannot race it.
    const DRIVER: &str = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("psql", ["psql", "-X", "-P", "pager=off", sys.argv[1]])
out = b""
def read_until(prompts, seconds):
    global out
    end = time.time() + seconds
    while out.count(b"=> ") < prompts and time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            out += data
lines = sys.argv[2:]
for i, line in enumerate(lines):
    read_until(i + 1, 30)
    os.write(fd, (line + "\n").encode())
read_until(len(lines) + 1, 5)
for _ in range(100):
    if os.waitpid(pid, os.WNOHANG) != (0, 0):
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(DRIVER)
        .arg(conninfo)
        .args(lines)
        .env_remove("PGPASSWORD")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn psql_describe_commands_and_an_interactive_session() {
    let env = Env::start();
    let out = env.psql(
        &env.conninfo("app"),
        &[
            "-c",
            "CREATE TABLE widgets (id int PRIMARY KEY, name text NOT NULL)",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // \d runs psql's catalog queries through the gateway.
    let out = env.psql(&env.conninfo("app"), &["-c", "\\d widgets"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let described = stdout(&out);
    assert!(described.contains("id|integer||not null|"), "{described}");
    assert!(described.contains("name|text||not null|"), "{described}");

    let screen = interactive_psql(
        &env.conninfo("app"),
        &["\\dt", "\\d widgets", "SELECT 6 * 7 AS answer;", "\\q"],
    );
    assert!(
        screen.contains("app=>"),
        "the interactive prompt is shown:\n{screen}"
    );
    assert!(
        screen.contains("SSL connection (protocol: TLSv1.3"),
        "psql reports the TLS session:\n{screen}"
    );
    assert!(
        screen.contains("widgets"),
        "\\dt lists the table:\n{screen}"
    );
    assert!(
        screen.contains("\"widgets_pkey\" PRIMARY KEY, btree (id)"),
        "\\d shows the index:\n{screen}"
    );
    assert!(
        screen.contains("answer") && screen.contains("42"),
        "{screen}"
    );
    let events = env.events_after_closes(3);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "command" && e["payload"]["text"] == "SELECT 6 * 7 AS answer;"),
        "the interactive statement is recorded"
    );
}
