//! Inline masking through real clients: psql (simple protocol, COPY, error details,
//! notifications) and tokio-postgres (extended protocol, binary results, prepared statements),
//! per-group exceptions, and what the audit record keeps (which fields were masked, the
//! captured rows as the client saw them — never an original value).

mod common;
use common::*;
use tollgate_testsupport::ClusterOptions;
use tollgate_tls::pki::IssuedFiles;

const CARD: &str = "4242 4242 4242 4242";
const SSN: &str = "123-45-6789";

/// `customers` with emails, cards in free text and SSNs; alice (sre) is exempt from the
/// column rules and the e-mail detector, bob (ci) is not; the card detector applies to everyone.
fn masked_env() -> (Env, IssuedFiles) {
    masked_env_with("")
}

/// `server_extra` may add `https_listen` and `[roles]` (it comes last in `[server]`).
fn masked_env_with(server_extra: &str) -> (Env, IssuedFiles) {
    let init = vec![
        "CREATE TABLE customers (id int PRIMARY KEY, email text UNIQUE, ssn text, notes text, profile jsonb)".to_string(),
        format!("INSERT INTO customers VALUES (1, 'alice@example.com', '{SSN}', 'card {CARD} on file', '{{\"tier\": \"gold\", \"tax\": {{\"ssn\": \"{SSN}\"}}}}'), (2, 'bob@example.org', '078-05-1120', 'no card', NULL)"),
    ];
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            init_sql: init,
            ..Default::default()
        },
        server_extra: server_extra.into(),
        resource_extra: r#"capture_results = true
capture_bytes = 4096
[[resources.masks]]
columns = ["email", "customers.ssn"]
strategy = "redact"
except_groups = ["sre"]
[[resources.masks]]
detectors = ["credit_card"]
strategy = "partial"
[[resources.masks]]
detectors = ["email"]
strategy = "redact"
except_groups = ["sre"]
[[resources.masks]]
columns = ["profile"]
json_paths = ["$..ssn"]
strategy = "redact"
except_groups = ["sre"]
"#
        .into(),
        ..Default::default()
    });
    let bob = env.pki.client("bob", &["ci"]);
    (env, bob)
}

fn result_events(events: &[serde_json::Value], subject: &str) -> Vec<serde_json::Value> {
    let sessions: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "session.open" && e["payload"]["subject"] == subject)
        .map(|e| e["session_id"].clone())
        .collect();
    events
        .iter()
        .filter(|e| e["kind"] == "result" && sessions.contains(&e["session_id"]))
        .map(|e| e["payload"].clone())
        .collect()
}

#[test]
fn psql_rows_copy_errors_and_notifications_are_masked_for_the_viewer() {
    let (env, bob) = masked_env();

    // bob: column rules apply — email and ssn are withheld whole, the card in notes partially.
    let out = env.psql(
        &env.conninfo_as(&bob, "app"),
        &[
            "-c",
            "SELECT id, email, ssn, notes FROM customers ORDER BY id",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for original in [
        "alice@example.com",
        "bob@example.org",
        SSN,
        "078-05-1120",
        CARD,
    ] {
        assert!(!text.contains(original), "{original} leaked to bob: {text}");
    }
    let first: Vec<&str> = text.lines().next().unwrap().split('|').collect();
    assert_eq!(first[0], "1");
    assert!(
        first[3].starts_with("card ") && first[3].ends_with("4242 on file"),
        "{text}"
    );

    // A JSON path masks inside a jsonb column, also when it is cast to text; the rest stays.
    for sql in [
        "SELECT profile FROM customers WHERE id = 1",
        "SELECT profile::text AS profile FROM customers WHERE id = 1",
    ] {
        let out = env.psql(&env.conninfo_as(&bob, "app"), &["-c", sql]);
        let text = stdout(&out);
        let v: serde_json::Value = serde_json::from_str(text.trim()).expect(&text);
        assert_eq!(v["tier"], "gold", "{text}");
        assert!(
            v["tax"]["ssn"].is_string() && !text.contains(SSN),
            "{sql}: {text}"
        );
    }

    // An alias does not hide a column from a content detector.
    let out = env.psql(
        &env.conninfo_as(&bob, "app"),
        &["-c", "SELECT email AS contact FROM customers WHERE id = 1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("alice@example.com"),
        "{}",
        stdout(&out)
    );

    // alice (sre) is exempt from the column rules but not from the detectors.
    let out = env.psql(
        &env.conninfo("app"),
        &["-c", "SELECT id, ssn, notes FROM customers ORDER BY id"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(SSN), "alice should see the ssn: {text}");
    assert!(!text.contains(CARD), "card leaked to alice: {text}");

    // COPY TO is masked column by column for bob: the gateway learns its columns before it
    // runs (a table, a column list, a query; text, CSV and binary formats).
    for copy in [
        "\\copy customers TO STDOUT",
        "\\copy customers TO STDOUT WITH (FORMAT csv)",
        "\\copy customers (id, email, ssn) TO STDOUT",
        "\\copy (SELECT id, email, ssn FROM customers ORDER BY id) TO STDOUT",
        "\\copy customers TO STDOUT WITH (FORMAT binary)",
    ] {
        let out = env.psql(&env.conninfo_as(&bob, "app"), &["-c", copy]);
        assert!(out.status.success(), "{copy}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(
            !text.contains("alice@example.com"),
            "{copy}: email leaked: {text}"
        );
        assert!(!text.contains(SSN), "{copy}: ssn leaked: {text}");
        assert!(!text.contains(CARD), "{copy}: card leaked: {text}");
        assert!(
            text.contains("****") || copy.contains("binary"),
            "{copy}: {text}"
        );
    }
    // Within a transaction, and after an error aborted one, the COPY behaves as without the
    // gateway (the learned columns do not change what the client sees).
    let out = env.psql(
        &env.conninfo_as(&bob, "app"),
        &[
            "-c",
            "BEGIN",
            "-c",
            "COPY customers (id, ssn) TO STDOUT",
            "-c",
            "COMMIT",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(SSN), "{}", stdout(&out));
    assert!(stdout(&out).contains("****"), "{}", stdout(&out));
    let out = env.psql(
        &env.conninfo_as(&bob, "app"),
        &[
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "BEGIN",
            "-c",
            "SELECT 1/0",
            "-c",
            "COPY customers (id, ssn) TO STDOUT",
            "-c",
            "ROLLBACK",
            "-c",
            "SELECT 'still here'",
        ],
    );
    assert!(
        stderr(&out).contains("current transaction is aborted"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("still here"), "{}", stdout(&out));
    assert!(!stdout(&out).contains(SSN), "{}", stdout(&out));
    // ... while alice's COPY (text and CSV) is masked by content.
    for copy in [
        "\\copy customers TO STDOUT",
        "\\copy customers TO STDOUT WITH (FORMAT csv)",
    ] {
        let out = env.psql(&env.conninfo("app"), &["-c", copy]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(SSN), "{text}");
        assert!(!text.contains(CARD), "card leaked in COPY: {text}");
    }

    // A unique violation's detail echoes the value: withheld for bob.
    let out = env.psql(
        &env.conninfo_as(&bob, "app"),
        &[
            "-c",
            "INSERT INTO customers (id, email) VALUES (9, 'alice@example.com')",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("duplicate key"), "{err}");
    assert!(err.contains("Key (email)=("), "{err}");
    assert!(!err.contains("alice@example.com"), "{err}");

    // A notification payload is masked by content.
    let out = env.psql(
        &env.conninfo_as(&bob, "app"),
        &[
            "-c",
            "LISTEN signups",
            "-c",
            "NOTIFY signups, 'new customer carol@example.net'",
            "-c",
            "SELECT 1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("Asynchronous notification"), "{all}");
    assert!(!all.contains("carol@example.net"), "{all}");

    // The record: masked fields are named, captured rows are what bob saw, no original anywhere.
    let events = env.events_after_closes(8);
    let bobs = result_events(&events, "bob");
    let first = &bobs[0];
    let masked = first["masked"].as_array().expect("masked fields recorded");
    let columns: Vec<&str> = masked.iter().filter_map(|m| m["column"].as_str()).collect();
    assert!(
        columns.contains(&"email") && columns.contains(&"ssn"),
        "{first}"
    );
    assert_eq!(
        first["capture"]["columns"],
        serde_json::json!(["id", "email", "ssn", "notes"])
    );
    assert_eq!(first["capture"]["rows"].as_array().unwrap().len(), 2);
    // His COPYs were masked by column, not refused; their results name the masked columns.
    let refused: Vec<_> = bobs.iter().filter(|r| r["sqlstate"] == "42501").collect();
    assert!(refused.is_empty(), "{bobs:#?}");
    assert!(
        bobs.iter().any(|r| r["tag"] == "COPY"
            && r["masked"]
                .as_array()
                .is_some_and(|m| m.iter().any(|f| f["column"] == "ssn"))),
        "{bobs:#?}"
    );
    let bob_record = serde_json::to_string(&bobs).unwrap();
    for original in [
        "alice@example.com",
        "bob@example.org",
        SSN,
        CARD,
        "carol@example.net",
    ] {
        assert!(!bob_record.contains(original), "{original} in bob's record");
    }
    // alice saw emails and SSNs, but the stored copy of her results is masked for everyone,
    // and statement literals are recorded with the detectors applied.
    let alices = result_events(&events, "alice");
    assert!(alices.iter().any(|r| r["capture"]["rows"]
        .as_array()
        .is_some_and(|r| !r.is_empty())));
    let alice_record = serde_json::to_string(&alices).unwrap();
    for original in [SSN, "078-05-1120", CARD] {
        assert!(
            !alice_record.contains(original),
            "{original} in alice's record"
        );
    }
    let commands: Vec<_> = events.iter().filter(|e| e["kind"] == "command").collect();
    let insert = commands
        .iter()
        .find(|e| {
            e["payload"]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("INSERT"))
        })
        .expect("the INSERT is recorded");
    assert!(
        !insert.to_string().contains("alice@example.com"),
        "{insert}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_binary_and_prepared_results_are_masked() {
    let (env, bob) = tokio::task::spawn_blocking(masked_env).await.unwrap();
    let mut c = env.client_as(&bob, "app").await;
    // Extended protocol, binary results; the statement is prepared once and executed twice
    // (the second execution is not described again).
    let stmt = c
        .prepare("SELECT id, email, ssn, notes FROM customers WHERE id = $1")
        .await
        .unwrap();
    for _ in 0..2 {
        let row = c.query_one(&stmt, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
        let email: String = row.get(1);
        let ssn: String = row.get(2);
        let notes: String = row.get(3);
        assert!(!email.contains("alice"), "{email}");
        assert_ne!(ssn, SSN);
        assert!(!notes.contains(CARD) && notes.contains("4242"), "{notes}");
    }
    // jsonb in binary format: the path is masked, the document stays valid.
    let row = c
        .query_one("SELECT profile FROM customers WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    let profile: serde_json::Value = row.get(0);
    assert_eq!(profile["tier"], "gold");
    assert_ne!(profile["tax"]["ssn"], SSN);
    assert!(profile["tax"]["ssn"].is_string(), "{profile}");

    // A portal with a row limit streams masked rows in pieces.
    let tx = c.transaction().await.unwrap();
    let portal = tx
        .bind("SELECT email FROM customers ORDER BY id", &[])
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 1).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    tx.commit().await.unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|e| !e.contains("@example.")), "{seen:?}");

    // alice (exempt from the column rules) reads the same statement in binary unmasked.
    let a = env.client().await;
    let row = a
        .query_one("SELECT email, ssn FROM customers WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alice@example.com");
    assert_eq!(row.get::<_, String>(1), SSN);
}

#[test]
fn an_approved_unmask_review_lifts_masking_for_its_requester_only() {
    let https = tollgate_testsupport::free_port();
    let (env, bob) = masked_env_with(&format!(
        "https_listen = \"127.0.0.1:{https}\"\n\n[roles]\nadmin_groups = [\"sre\"]\n"
    ));
    let cli = |who: &IssuedFiles, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("TOLLGATE_GATEWAY", format!("https://localhost:{https}"))
            .env("TOLLGATE_CA", &env.pki.ca)
            .arg("--cert")
            .arg(&who.cert)
            .arg("--key")
            .arg(&who.key)
            .output()
            .unwrap()
    };
    let select = "SELECT email, ssn FROM customers WHERE id = 1";
    let masked = stdout(&env.psql(&env.conninfo_as(&bob, "app"), &["-c", select]));
    assert!(!masked.contains("alice@example.com"), "{masked}");

    let out = cli(
        &bob,
        &[
            "access",
            "request",
            "app",
            "--unmask",
            "--for",
            "10m",
            "--reason",
            "fraud case 7",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = review["id"].as_str().unwrap();
    assert_eq!(review["kind"], "unmask");
    // Pending: still masked.
    let still = stdout(&env.psql(&env.conninfo_as(&bob, "app"), &["-c", select]));
    assert!(!still.contains("alice@example.com"), "{still}");
    let out = cli(&env.alice, &["reviews", "approve", id, "--reason", "ok"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = env.psql(&env.conninfo_as(&bob, "app"), &["-c", select]);
    assert_eq!(
        stdout(&out).trim(),
        format!("alice@example.com|{SSN}"),
        "{}",
        stderr(&out)
    );
    // Someone else in bob's group is still masked.
    let carol = env.pki.client("carol", &["ci"]);
    let other = stdout(&env.psql(&env.conninfo_as(&carol, "app"), &["-c", select]));
    assert!(!other.contains("alice@example.com"), "{other}");

    // The session records the grant; its captured rows stay masked.
    let events = env.events_after_closes(4);
    let open = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "session.open" && e["payload"]["unmask_grant"].is_object())
        .expect("the unmasked session records its grant");
    assert_eq!(open["payload"]["unmask_grant"]["review"], id);
    let record = serde_json::to_string(&result_events(&events, "bob")).unwrap();
    assert!(
        !record.contains("alice@example.com") && !record.contains(SSN),
        "{record}"
    );
}
