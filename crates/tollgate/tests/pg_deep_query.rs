//! One query must never take the gateway down: `select not not … true` 9,000 deep used to
//! overflow the stack of the task classifying it and abort the whole process, disconnecting
//! every client. Now it is refused as unparsable (42501) while another session, connected at
//! the same time, keeps working, and large but flat statements still run.

mod common;

use common::*;
use std::time::Duration;

const RULES: &str = r#"[[resources.rules]]
name = "no-drop"
statements = ["drop"]
action = "deny"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_query_is_refused_and_other_sessions_live_on() {
    let env = Env::start_with(EnvOptions {
        resource_extra: RULES.into(),
        ..Default::default()
    });
    let bystander = env.client().await;
    let attacker = env.client().await;
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // The bystander keeps querying while the deep statements go through the gateway.
    let busy = tokio::spawn(async move {
        for i in 0..50i32 {
            let row = bystander
                .query_one("SELECT $1::int + 1", &[&i])
                .await
                .expect("the other session keeps working");
            assert_eq!(row.get::<_, i32>(0), i + 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bystander
    });

    let deep_texts = [
        format!("SELECT {} true", "NOT ".repeat(9000)),
        format!("SELECT {}1{}", "(SELECT ".repeat(3000), ")".repeat(3000)),
        format!("SELECT 1, 2{}", " UNION SELECT 1, 2".repeat(5000)),
    ];
    for sql in &deep_texts {
        // Simple protocol (Query) and extended protocol (Parse) both.
        let e = attacker.simple_query(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(db.code().code(), "42501", "{e}");
        assert!(db.message().contains("statement not understood"), "{e}");
        // A Parse is judged when it is bound; PostgreSQL may refuse it first, itself too deep
        // for its own stack limit (54001). Either way it never runs and the gateway lives.
        let e = attacker.query(sql.as_str(), &[]).await.unwrap_err();
        let code = e.code().map(|c| c.code().to_string());
        assert!(matches!(code.as_deref(), Some("42501" | "54001")), "{e}");
    }

    let bystander = busy.await.expect("the bystander's queries all succeeded");
    // The refused session itself is still usable, and large flat statements still classify.
    let list = (0..5000)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let n: i64 = attacker
        .query_one(
            &format!("SELECT count(*) FROM generate_series(1, 10000) g WHERE g IN ({list})"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4999);
    let ors = (0..3000)
        .map(|i| format!("g = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let n: i64 = bystander
        .query_one(
            &format!("SELECT count(*) FROM generate_series(1, 10000) g WHERE {ors}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2999);

    // The same gateway process is serving: healthy, and a new session connects.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", env.gw.pid())).unwrap();
    let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
    assert!(
        matches!(state, Some("R" | "S" | "D")),
        "the gateway process is gone: {stat}"
    );
    assert_eq!(env.gw.http_get("/healthz").map(|(s, _)| s), Some(200));
    let fresh = env.client().await;
    let two: i32 = fresh.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(two, 2);
}
