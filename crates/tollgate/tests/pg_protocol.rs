//! PostgreSQL protocol coverage through the gateway, with real clients (tokio-postgres, psql,
//! pgbench) against a real TLS PostgreSQL: simple and extended query, pipelining, formats,
//! portals, transactions, COPY, LISTEN/NOTIFY, notices, parameter status, large results,
//! termination and cancellation.

mod common;
use common::*;

use futures_util::{SinkExt, StreamExt};
use std::io::Cursor;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

/// Run blocking work (process spawning, polling the audit store) from a multi-thread test runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn start() -> Env {
    blocking(Env::start)
}

/// Rows and completions of a simple-query response, in order: `row:a,b` and `complete:n`.
fn simple_summary(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(format!(
                "row:{}",
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            SimpleQueryMessage::CommandComplete(n) => Some(format!("complete:{n}")),
            _ => None,
        })
        .collect()
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// `SELECT count(*) ...` as superuser, straight on the cluster (not through the gateway).
fn superuser_count(env: &Env, sql: &str) -> i64 {
    env.pg
        .psql(sql)
        .expect("superuser psql")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {sql}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Simple query protocol
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_multi_statement_empty_and_error() {
    let env = start();
    let c = env.client().await;

    let msgs = c.simple_query("SELECT 1; SELECT 2").await.unwrap();
    assert_eq!(
        simple_summary(&msgs),
        ["row:1", "complete:1", "row:2", "complete:1"]
    );

    let msgs = c
        .simple_query("SELECT 'a' AS x, NULL::int AS y UNION ALL SELECT 'b', 7; CREATE TEMP TABLE t1 (i int); INSERT INTO t1 SELECT generate_series(1, 5)")
        .await
        .unwrap();
    assert_eq!(
        simple_summary(&msgs),
        [
            "row:a,NULL",
            "row:b,7",
            "complete:2",
            "complete:0",
            "complete:5"
        ]
    );

    // An empty query string answers EmptyQueryResponse (+ ReadyForQuery), not an error.
    let msgs = c.simple_query("").await.unwrap();
    assert_eq!(simple_summary(&msgs), ["complete:0"]);
    let msgs = c.simple_query(";").await.unwrap();
    assert_eq!(simple_summary(&msgs), ["complete:0"]);
    // ... and through the extended protocol.
    assert_eq!(c.execute("", &[]).await.unwrap(), 0);
    assert!(c.query("", &[]).await.unwrap().is_empty());

    // An error in the middle of a multi-statement string stops it there; the session survives.
    let e = c
        .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22012", "{e}");
    let msgs = c.simple_query("SELECT count(*) FROM t1").await.unwrap();
    assert_eq!(simple_summary(&msgs), ["row:5", "complete:1"]);

    // The same through psql: the last result of a multi-statement -c is printed.
    let out = blocking(|| env.psql(&env.conninfo("app"), &["-c", "SELECT 1; SELECT 2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n2", "psql 15+ prints every result");

    // The audit trail records the multi-statement query as one command with both rows.
    drop(c);
    let events = blocking(|| env.events_after_closes(2));
    let cmd = events
        .iter()
        .find(|e| e["kind"] == "command" && e["payload"]["text"] == "SELECT 1; SELECT 2")
        .expect("command event");
    let res = events
        .iter()
        .find(|e| {
            e["kind"] == "result"
                && e["session_id"] == cmd["session_id"]
                && e["payload"]["n"] == cmd["payload"]["n"]
        })
        .expect("result event");
    assert_eq!(res["payload"]["outcome"], "ok");
    assert_eq!(res["payload"]["rows"], 2);
    let failed = events
        .iter()
        .find(|e| {
            e["kind"] == "command" && e["payload"]["text"] == "SELECT 1; SELECT 1/0; SELECT 3"
        })
        .expect("failed command event");
    let res = events
        .iter()
        .find(|e| {
            e["kind"] == "result"
                && e["session_id"] == failed["session_id"]
                && e["payload"]["n"] == failed["payload"]["n"]
        })
        .expect("result event");
    assert_eq!(res["payload"]["outcome"], "error");
    assert_eq!(res["payload"]["sqlstate"], "22012");
}

// ---------------------------------------------------------------------------------------------
// 2. Extended protocol: pipelining and prepared statements
// ---------------------------------------------------------------------------------------------

async fn pipelining_and_prepared_statements(env: &Env) {
    let c = env.client().await;

    // ~50 queries in flight at once on one connection (tokio-postgres pipelines them), one of
    // which fails: only that one fails and every other answer lands on the right query.
    let results = futures_util::future::join_all((0..50i32).map(|i| {
        let c = &c;
        async move {
            if i == 25 {
                return c
                    .query("SELECT 1 / $1::int4", &[&0i32])
                    .await
                    .map(|_| (0, String::new()));
            }
            let s = format!("q{i}");
            let rows = c
                .query(
                    "SELECT $1::int4 * 2, $2::text || '!' FROM generate_series(1, $1::int4 % 3 + 1)",
                    &[&i, &s],
                )
                .await?;
            assert_eq!(rows.len() as i32, i % 3 + 1, "rows of query {i}");
            Ok((rows[0].get::<_, i32>(0), rows[0].get::<_, String>(1)))
        }
    }))
    .await;
    for (i, r) in results.into_iter().enumerate() {
        if i == 25 {
            assert_eq!(code(&r.unwrap_err()), "22012");
        } else {
            assert_eq!(r.unwrap(), (i as i32 * 2, format!("q{i}!")), "query {i}");
        }
    }

    // One prepared statement, executed many times (concurrently: Bind/Execute pipelined).
    let stmt = c.prepare("SELECT $1::int8 + 1, $2::text").await.unwrap();
    assert_eq!(stmt.params().len(), 2);
    assert_eq!(stmt.columns().len(), 2);
    let results = futures_util::future::join_all((0..100i64).map(|i| {
        let (c, stmt) = (&c, &stmt);
        async move {
            let t = i.to_string();
            c.query_one(stmt, &[&i, &t]).await
        }
    }))
    .await;
    for (i, r) in results.into_iter().enumerate() {
        let row = r.unwrap();
        assert_eq!(row.get::<_, i64>(0), i as i64 + 1);
        assert_eq!(row.get::<_, String>(1), i.to_string());
    }

    // Dropping statements sends Close: the server-side prepared statements go away.
    let prepared_count = |msgs: Vec<SimpleQueryMessage>| -> String {
        simple_summary(&msgs)[0]
            .trim_start_matches("row:")
            .to_string()
    };
    let other = c.prepare("SELECT 2").await.unwrap();
    let n = prepared_count(
        c.simple_query("SELECT count(*) FROM pg_prepared_statements")
            .await
            .unwrap(),
    );
    assert_eq!(
        n, "2",
        "the two live statements (the ad-hoc ones were closed)"
    );
    drop(stmt);
    drop(other);
    let n = prepared_count(
        c.simple_query("SELECT count(*) FROM pg_prepared_statements")
            .await
            .unwrap(),
    );
    assert_eq!(n, "0", "Close reached the server");
    // And the connection is still in step.
    assert_eq!(
        c.query_one("SELECT 41 + 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
}

/// Extended protocol: ~50 pipelined queries, prepared statements reused and closed, portals
/// fetched in batches with a row limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_pipelining_prepared_statements_and_portals() {
    let env = start();
    pipelining_and_prepared_statements(&env).await;
    portals_with_row_limits(&env, 1).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Binary and text formats
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_text_formats_nulls_and_arrays() {
    let env = start();
    let c = env.client().await;

    // Binary parameters in, binary results out; the server computes on them so a value that
    // arrived wrong cannot come back right by accident.
    let ts = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let blob: Vec<u8> = (0..=255u8).collect();
    let arr: Vec<i32> = vec![3, -1, i32::MAX];
    let row = c
        .query_one(
            "SELECT $1::int2 - 1::int2, $2::int4, $3::int8, $4::float4 * 2::float4, $5::float8, NOT $6::bool,
                    $7::text || '!', $8::bytea || '\\xff'::bytea, $9::timestamptz + interval '1 second',
                    ($9::timestamptz AT TIME ZONE 'UTC')::text, $10::int4[] || 7, $11::int4 IS NULL, $11::int4",
            &[
                &-7i16,
                &i32::MIN,
                &i64::MAX,
                &1.25f32,
                &std::f64::consts::PI,
                &false,
                &"héllo ✓",
                &blob,
                &ts,
                &arr,
                &None::<i32>,
            ],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i16>(0), -8);
    assert_eq!(row.get::<_, i32>(1), i32::MIN);
    assert_eq!(row.get::<_, i64>(2), i64::MAX);
    assert_eq!(row.get::<_, f32>(3), 2.5);
    assert_eq!(row.get::<_, f64>(4), std::f64::consts::PI);
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, String>(6), "héllo ✓!");
    let mut expected_blob = blob.clone();
    expected_blob.push(0xff);
    assert_eq!(row.get::<_, Vec<u8>>(7), expected_blob);
    assert_eq!(row.get::<_, SystemTime>(8), ts + Duration::from_secs(1));
    assert_eq!(row.get::<_, String>(9), "2023-11-14 22:13:20.123456");
    assert_eq!(row.get::<_, Vec<i32>>(10), vec![3, -1, i32::MAX, 7]);
    assert!(row.get::<_, bool>(11));
    assert_eq!(row.get::<_, Option<i32>>(12), None);

    // NULLs of every type, arrays with NULL elements, special floats, empty values.
    let row = c
        .query_one(
            "SELECT NULL::int8, NULL::text, NULL::bytea, NULL::bool, NULL::timestamptz,
                    ARRAY[1, NULL, 3]::int4[], '{}'::int4[], ''::text, ''::bytea,
                    'Infinity'::float4, 'NaN'::float8, ARRAY['a', NULL, 'c d']::text[]",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), None);
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(2), None);
    assert_eq!(row.get::<_, Option<bool>>(3), None);
    assert_eq!(row.get::<_, Option<SystemTime>>(4), None);
    assert_eq!(
        row.get::<_, Vec<Option<i32>>>(5),
        vec![Some(1), None, Some(3)]
    );
    assert_eq!(row.get::<_, Vec<i32>>(6), Vec::<i32>::new());
    assert_eq!(row.get::<_, Option<String>>(7), Some(String::new()));
    assert_eq!(row.get::<_, Option<Vec<u8>>>(8), Some(vec![]));
    assert_eq!(row.get::<_, f32>(9), f32::INFINITY);
    assert!(row.get::<_, f64>(10).is_nan());
    assert_eq!(
        row.get::<_, Vec<Option<String>>>(11),
        vec![Some("a".into()), None, Some("c d".into())]
    );

    // A 3 MB binary value each way: many TLS records and socket reads for one message.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let row = c
        .query_one("SELECT $1::bytea, length($1::bytea)", &[&big])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(1), big.len() as i32);
    assert!(row.get::<_, Vec<u8>>(0) == big, "3 MB bytea round trip");

    // Text format (simple protocol): the server's own renderings, numeric exact.
    let msgs = c
        .simple_query(
            "SELECT 12345678901234567890.0123456789::numeric, 1.50::numeric(5,2), (-7)::int2, true, false,
                    '\\x00ff10'::bytea, ARRAY[1, NULL, 3], 'NaN'::float8, 0.1::float8,
                    '2024-01-02 03:04:05+00'::timestamptz AT TIME ZONE 'UTC', NULL::text, 'tab\there'",
        )
        .await
        .unwrap();
    assert_eq!(
        simple_summary(&msgs),
        [
            "row:12345678901234567890.0123456789,1.50,-7,t,f,\\x00ff10,{1,NULL,3},NaN,0.1,2024-01-02 03:04:05,NULL,tab\there",
            "complete:1"
        ]
    );
    // Extended protocol with text results for numeric: tokio-postgres has no numeric type, so
    // ask for its text rendering.
    let row = c
        .query_one(
            "SELECT ($1::text::numeric * 2)::text",
            &[&"0.000000000000000000001"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "0.000000000000000000002");
}

// ---------------------------------------------------------------------------------------------
// 4. Portals with row limits
// ---------------------------------------------------------------------------------------------

async fn portals_with_row_limits(env: &Env, closes_before: usize) {
    let mut c = env.client().await;
    let tx = c.transaction().await.unwrap();
    let portal = tx
        .bind("SELECT g FROM generate_series(1, $1::int4) g", &[&95i32])
        .await
        .unwrap();
    // A second portal open at the same time, fetched interleaved with the first.
    let other = tx
        .bind("SELECT -g FROM generate_series(1, 25) g", &[])
        .await
        .unwrap();
    let mut sizes = vec![];
    let mut seen = vec![];
    let mut other_seen = vec![];
    loop {
        let rows = tx.query_portal(&portal, 10).await.unwrap();
        sizes.push(rows.len());
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        let o = tx.query_portal(&other, 7).await.unwrap();
        other_seen.extend(o.iter().map(|r| r.get::<_, i32>(0)));
        if rows.is_empty() || sizes.len() > 20 {
            break;
        }
    }
    assert_eq!(sizes, [10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 0]);
    assert_eq!(seen, (1..=95).collect::<Vec<i32>>());
    assert_eq!(other_seen, (1..=25).map(|g| -g).collect::<Vec<i32>>());
    // A portal bound with a row limit larger than the result returns all of it.
    let p = tx.bind("SELECT 1 UNION ALL SELECT 2", &[]).await.unwrap();
    assert_eq!(tx.query_portal(&p, 100).await.unwrap().len(), 2);
    tx.commit().await.unwrap();

    // The audit trail has each Execute with its row limit and suspended results.
    drop(c);
    let events = blocking(|| env.events_after_closes(closes_before + 1));
    let limited: Vec<_> = events
        .iter()
        .filter(|e| {
            e["kind"] == "command"
                && e["payload"]["max_rows"] == 10
                && e["payload"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("generate_series(1, $1::int4)")
        })
        .collect();
    assert_eq!(limited.len(), 11, "{events:#?}");
    let suspended = events
        .iter()
        .filter(|e| e["kind"] == "result" && e["payload"]["tag"] == "SUSPENDED")
        .count();
    // 9 suspensions of the first portal, 3 of the second (7+7+7, then 4 rows complete).
    assert_eq!(suspended, 9 + 3, "{events:#?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Transactions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_errors_and_savepoints() {
    let env = start();
    let mut c = env.client().await;
    c.batch_execute("CREATE TABLE acct (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    async fn ids(c: &tokio_postgres::Client) -> Vec<i32> {
        c.query("SELECT id FROM acct ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect()
    }

    // Commit, explicit rollback, implicit rollback (dropped transaction).
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO acct VALUES (1, 'a')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO acct VALUES (2, 'b')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO acct VALUES (3, 'c')", &[])
        .await
        .unwrap();
    drop(tx);
    assert_eq!(ids(&c).await, [1]);

    // An error aborts the transaction: the next statement gets 25P02; ROLLBACK recovers.
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO acct VALUES (4, 'd')", &[])
        .await
        .unwrap();
    let e = tx.query_one("SELECT 1 / 0", &[]).await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO), "{e}");
    assert_eq!(code(&e), "22012");
    let e = tx.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "25P02", "{e}");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("current transaction is aborted"),
        "{e}"
    );
    let e = tx.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02", "simple protocol too: {e}");
    tx.rollback().await.unwrap();
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
    assert_eq!(ids(&c).await, [1]);

    // COMMIT of an aborted transaction reports ROLLBACK (the server's answer passes through).
    let msgs = c
        .simple_query("BEGIN; INSERT INTO acct VALUES (5, 'e')")
        .await
        .unwrap();
    assert_eq!(simple_summary(&msgs), ["complete:0", "complete:1"]);
    assert!(c.simple_query("SELECT 1/0").await.is_err());
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(ids(&c).await, [1]);

    // Savepoints: roll back to one, release another, recover from an error inside a third.
    let mut tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO acct VALUES (10, 'outer')", &[])
        .await
        .unwrap();
    {
        let sp = tx.savepoint("sp1").await.unwrap();
        sp.execute("INSERT INTO acct VALUES (11, 'rolled back')", &[])
            .await
            .unwrap();
        sp.rollback().await.unwrap();
    }
    {
        let sp = tx.savepoint("sp2").await.unwrap();
        sp.execute("INSERT INTO acct VALUES (12, 'released')", &[])
            .await
            .unwrap();
        sp.commit().await.unwrap();
    }
    {
        let sp = tx.savepoint("sp3").await.unwrap();
        let e = sp
            .execute("INSERT INTO acct VALUES (10, 'duplicate')", &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION), "{e}");
        sp.rollback().await.unwrap();
    }
    tx.execute("INSERT INTO acct VALUES (13, 'after recovery')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids(&c).await, [1, 10, 12, 13]);

    // The same with psql (simple protocol, one session): a failed statement inside a
    // transaction, ROLLBACK TO SAVEPOINT, then COMMIT.
    let out = blocking(|| {
        env.psql(
            &env.conninfo("app"),
            &[
                "-q",
                "-v",
                "ON_ERROR_STOP=0",
                "-c",
                "BEGIN",
                "-c",
                "INSERT INTO acct VALUES (20, 'psql')",
                "-c",
                "SAVEPOINT a",
                "-c",
                "INSERT INTO acct VALUES (1, 'dup')",
                "-c",
                "ROLLBACK TO SAVEPOINT a",
                "-c",
                "INSERT INTO acct VALUES (21, 'psql')",
                "-c",
                "COMMIT",
                "-c",
                "SELECT string_agg(id::text, ',' ORDER BY id) FROM acct",
            ],
        )
    });
    assert!(
        stderr(&out).contains("duplicate key value violates unique constraint"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "1,10,12,13,20,21", "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// 6. COPY
// ---------------------------------------------------------------------------------------------

const COPY_ROWS: i64 = 100_000;
const PAYLOAD: usize = 190;

/// The COPY text lines `first..first+n` of the bulk table: `id \t payload \n`, ~200 bytes each.
fn copy_chunk(first: i64, n: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n as usize * (PAYLOAD + 10));
    for id in first..first + n {
        out.extend_from_slice(id.to_string().as_bytes());
        out.push(b'\t');
        out.extend(std::iter::repeat_n(b'a' + (id % 26) as u8, PAYLOAD));
        out.push(b'\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_with_tokio_postgres_and_psql() {
    let env = start();
    let c = env.client().await;
    c.batch_execute("CREATE TABLE bulk (id int8, payload text)")
        .await
        .unwrap();

    // COPY FROM STDIN: ~20 MB streamed through a Sink in 1000-row chunks.
    let per_chunk = 1000;
    let sink = c
        .copy_in::<_, Cursor<Vec<u8>>>("COPY bulk FROM STDIN")
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    let mut chunks = futures_util::stream::iter((0..COPY_ROWS / per_chunk).map(|k| {
        Ok::<_, tokio_postgres::Error>(Cursor::new(copy_chunk(k * per_chunk + 1, per_chunk)))
    }));
    sink.send_all(&mut chunks).await.unwrap();
    let n = sink.as_mut().finish().await.unwrap();
    assert_eq!(n, COPY_ROWS as u64);
    let row = c
        .query_one(
            "SELECT count(*), sum(id)::int8, sum(length(payload))::int8, count(DISTINCT payload) FROM bulk",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), COPY_ROWS);
    assert_eq!(row.get::<_, i64>(1), COPY_ROWS * (COPY_ROWS + 1) / 2);
    assert_eq!(row.get::<_, i64>(2), COPY_ROWS * PAYLOAD as i64);
    assert_eq!(row.get::<_, i64>(3), 26);

    // A COPY the client abandons (CopyFail) leaves nothing behind, and the session continues.
    {
        let sink = c
            .copy_in::<_, Cursor<Vec<u8>>>("COPY bulk FROM STDIN")
            .await
            .unwrap();
        let mut sink = Box::pin(sink);
        sink.send(Cursor::new(copy_chunk(1_000_001, 500)))
            .await
            .unwrap();
        drop(sink);
    }
    // Bad data: the server's error (22P02) reaches the client at finish.
    let sink = c
        .copy_in::<_, Cursor<Vec<u8>>>("COPY bulk FROM STDIN")
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    let _ = sink
        .send(Cursor::new(b"1\tok\nnot-a-number\tbad\n".to_vec()))
        .await;
    let e = sink.as_mut().finish().await.unwrap_err();
    assert_eq!(code(&e), "22P02", "{e}");
    let count: i64 = c
        .query_one("SELECT count(*) FROM bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, COPY_ROWS, "failed COPYs must not add rows");

    // COPY TO STDOUT: ~20 MB streamed back, every byte accounted for.
    let stream = c
        .copy_out("COPY (SELECT id, payload FROM bulk ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let (mut bytes, mut lines, mut chunks_seen) = (0usize, 0usize, 0usize);
    let mut head = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if head.len() < 400 {
            head.extend_from_slice(&chunk[..chunk.len().min(400)]);
        }
        bytes += chunk.len();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
        chunks_seen += 1;
    }
    let expected: usize = (1..=COPY_ROWS)
        .map(|id| id.to_string().len() + 1 + PAYLOAD + 1)
        .sum();
    assert!(expected > 19_000_000);
    assert_eq!(bytes, expected);
    assert_eq!(lines, COPY_ROWS as usize);
    assert!(chunks_seen >= COPY_ROWS as usize, "one CopyData per row");
    assert!(head.starts_with(&copy_chunk(1, 2)));

    // psql \copy both directions with files.
    let dir = env.tmp.path();
    let csv_in = dir.join("in.csv");
    let csv_out = dir.join("out.csv");
    let mut text = String::new();
    for i in 1..=2000 {
        text.push_str(&format!("{i},\"name, {i}\"\n"));
    }
    std::fs::write(&csv_in, &text).unwrap();
    c.batch_execute("CREATE TABLE people (id int, name text)")
        .await
        .unwrap();
    let out = blocking(|| {
        env.psql(
            &env.conninfo("app"),
            &[
                "-c",
                &format!(
                    "\\copy people FROM '{}' WITH (FORMAT csv)",
                    csv_in.display()
                ),
                "-c",
                &format!(
                    "\\copy (SELECT id, name FROM people ORDER BY id) TO '{}' WITH (FORMAT csv)",
                    csv_out.display()
                ),
                "-c",
                "SELECT count(*), max(name) FROM people",
            ],
        )
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "COPY 2000\nCOPY 2000\n2000|name, 999");
    assert_eq!(std::fs::read_to_string(&csv_out).unwrap(), text);

    // Large objects: libpq implements \lo_import / \lo_export with FunctionCall messages.
    let blob_in = dir.join("blob.in");
    let blob_out = dir.join("blob.out");
    let blob: Vec<u8> = (0..700_000u32).map(|i| (i * 31 % 256) as u8).collect();
    std::fs::write(&blob_in, &blob).unwrap();
    let out = blocking(|| {
        env.psql(
            &env.conninfo("app"),
            &[
                "-c",
                &format!("\\lo_import '{}'", blob_in.display()),
                "-c",
                &format!("\\lo_export :LASTOID '{}'", blob_out.display()),
                "-c",
                "SELECT count(*) FROM pg_largeobject_metadata",
            ],
        )
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("\n1"), "{}", stdout(&out));
    assert!(
        std::fs::read(&blob_out).unwrap() == blob,
        "large object round trip"
    );
    let events = blocking(|| {
        env.events_until("function calls", |evs| {
            evs.iter()
                .any(|e| e["kind"] == "command" && e["payload"]["protocol"] == "function_call")
        })
    });
    let calls = events
        .iter()
        .filter(|e| e["kind"] == "command" && e["payload"]["protocol"] == "function_call")
        .count();
    assert!(calls >= 4, "lo_open/lowrite/lo_close/...: {calls}");
}

// ---------------------------------------------------------------------------------------------
// 7. LISTEN / NOTIFY
// ---------------------------------------------------------------------------------------------

async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
    within: Duration,
) -> Option<tokio_postgres::Notification> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => return Some(n),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn listen_notify_between_two_sessions(env: &Env) {
    let (a, mut rx) = env.client_with_messages(&env.alice, "app").await;
    a.batch_execute("LISTEN ch; LISTEN \"Other Channel\"")
        .await
        .unwrap();
    let mut b = env.client().await;
    let b_pid: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // A is idle: the notification is delivered asynchronously, not as a reply to a command.
    b.batch_execute("NOTIFY ch, 'payload one'").await.unwrap();
    let n = next_notification(&mut rx, Duration::from_secs(5))
        .await
        .expect("notification on ch");
    assert_eq!(n.channel(), "ch");
    assert_eq!(n.payload(), "payload one");
    assert_eq!(n.process_id(), b_pid, "the notifying backend's pid");

    b.query("SELECT pg_notify($1, $2)", &[&"Other Channel", &"two ✓"])
        .await
        .unwrap();
    let n = next_notification(&mut rx, Duration::from_secs(5))
        .await
        .expect("notification on Other Channel");
    assert_eq!((n.channel(), n.payload()), ("Other Channel", "two ✓"));

    // Inside a transaction, the notification is sent at COMMIT, not before.
    let tx = b.transaction().await.unwrap();
    tx.batch_execute("NOTIFY ch, 'at commit'").await.unwrap();
    assert!(
        next_notification(&mut rx, Duration::from_millis(500))
            .await
            .is_none(),
        "delivered before commit"
    );
    tx.commit().await.unwrap();
    let n = next_notification(&mut rx, Duration::from_secs(5))
        .await
        .expect("notification after commit");
    assert_eq!(n.payload(), "at commit");

    // Not for channels A does not listen to; and after UNLISTEN, nothing.
    b.batch_execute("NOTIFY elsewhere, 'x'").await.unwrap();
    a.batch_execute("UNLISTEN ch").await.unwrap();
    b.batch_execute("NOTIFY ch, 'after unlisten'")
        .await
        .unwrap();
    assert!(next_notification(&mut rx, Duration::from_millis(500))
        .await
        .is_none());
    // A notification arriving while A runs a query is still delivered.
    let (r, _) = tokio::join!(a.simple_query("SELECT pg_sleep(0.5)"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.batch_execute("NOTIFY \"Other Channel\", 'during query'")
            .await
            .unwrap();
    });
    r.unwrap();
    let n = next_notification(&mut rx, Duration::from_secs(5))
        .await
        .expect("notification during a query");
    assert_eq!(n.payload(), "during query");
}

// ---------------------------------------------------------------------------------------------
// 8. NoticeResponse
// ---------------------------------------------------------------------------------------------

async fn notices_reach_psql_and_tokio_postgres(env: &Env) {
    let out = blocking(|| {
        env.psql(
            &env.conninfo("app"),
            &["-c", "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$"],
        )
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NOTICE:  hello 42"),
        "stderr: {}",
        stderr(&out)
    );

    let (c, mut rx) = env.client_with_messages(&env.alice, "app").await;
    c.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
        .await
        .unwrap();
    // Extended protocol, with rows, and a WARNING carrying DETAIL and HINT.
    c.batch_execute(
        "CREATE FUNCTION noisy(i int) RETURNS int LANGUAGE plpgsql AS $$
         BEGIN RAISE WARNING 'row %', i USING DETAIL = 'detail ' || i, HINT = 'hint ' || i; RETURN i; END $$",
    )
    .await
    .unwrap();
    let rows = c
        .query("SELECT noisy(g) FROM generate_series(1, 3) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);

    let mut notices = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while notices.len() < 4 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => notices.push(n),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(notices.len(), 4, "{notices:?}");
    assert_eq!(notices[0].severity(), "NOTICE");
    assert_eq!(notices[0].message(), "hello 42");
    assert_eq!(notices[0].code(), &SqlState::SUCCESSFUL_COMPLETION);
    for (i, n) in notices[1..].iter().enumerate() {
        let i = i + 1;
        assert_eq!(n.severity(), "WARNING");
        assert_eq!(n.message(), format!("row {i}"));
        assert_eq!(n.detail(), Some(format!("detail {i}").as_str()));
        assert_eq!(n.hint(), Some(format!("hint {i}").as_str()));
    }
}

/// Asynchronous messages: NotificationResponse between two sessions and NoticeResponse to
/// psql and tokio-postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_notices() {
    let env = start();
    listen_notify_between_two_sessions(&env).await;
    notices_reach_psql_and_tokio_postgres(&env).await;
}

// ---------------------------------------------------------------------------------------------
// 9. ParameterStatus and start-up parameters
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_status_and_startup_parameters() {
    let env = start();
    blocking(|| {
        // SET changes reach the client (psql's \encoding reads the ParameterStatus it got).
        let out = env.psql(
            &env.conninfo("app"),
            &[
                "-q",
                "-c",
                "SET application_name = 'x'",
                "-c",
                "SHOW application_name",
                "-c",
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                "-c",
                "SET TimeZone = 'Asia/Tokyo'",
                "-c",
                "SHOW TimeZone",
                "-c",
                "SELECT '2024-01-01 00:00:00+00'::timestamptz",
                "-c",
                "SET client_encoding = 'LATIN1'",
                "-c",
                "\\encoding",
                "-c",
                "SHOW server_version",
                "-c",
                "\\echo :SERVER_VERSION_NAME",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(lines.len(), 7, "{lines:?}");
        assert_eq!(
            lines[..5],
            ["x", "x", "Asia/Tokyo", "2024-01-01 09:00:00+09", "LATIN1"],
            "{lines:?}"
        );
        // server_version from the start-up ParameterStatus matches the server's own.
        assert!(lines[5].starts_with(char::is_numeric), "{lines:?}");
        assert_eq!(
            lines[5], lines[6],
            "SERVER_VERSION_NAME vs SHOW server_version"
        );

        // Start-up parameters pass through: application_name, options (-c GUCs), client_encoding.
        let conninfo = format!(
            "{} application_name=probe client_encoding=LATIN1 options='-c search_path=myschema -c DateStyle=German'",
            env.conninfo("app")
        );
        let out = env.psql(
            &conninfo,
            &[
                "-c",
                "SHOW search_path",
                "-c",
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                "-c",
                "SHOW client_encoding",
                "-c",
                "SHOW DateStyle",
                "-c",
                "SELECT DATE '2024-03-05'",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            stdout(&out),
            "myschema\nprobe\nLATIN1\nGerman, DMY\n05.03.2024"
        );

        // Environment-provided start-up parameters (libpq sends PGDATESTYLE / PGTZ / PGAPPNAME).
        let out = psql_env(
            &env.conninfo("app"),
            &[
                "-c",
                "SHOW DateStyle",
                "-c",
                "SHOW TimeZone",
                "-c",
                "SELECT current_setting('application_name'), now()::date = (now() AT TIME ZONE 'Pacific/Auckland')::date",
            ],
            &[
                ("PGDATESTYLE", "SQL, MDY"),
                ("PGTZ", "Pacific/Auckland"),
                ("PGAPPNAME", "env-probe"),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "SQL, MDY\nPacific/Auckland\nenv-probe|t");

        // The session record carries the client's application_name.
        let events = env.events_after_closes(3);
        let apps: Vec<_> = events
            .iter()
            .filter(|e| e["kind"] == "session.open")
            .map(|e| e["payload"]["application_name"].clone())
            .collect();
        assert!(apps.contains(&serde_json::json!("probe")), "{apps:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// 10. Large results: streamed with back-pressure
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_streams_with_flat_gateway_memory() {
    const ROWS: u64 = 300_000;
    const LIMIT_KIB: u64 = 200 * 1024;
    let env = start();
    let c = env.client().await;
    let pid = env.gw.pid();
    let baseline = rss_kib(pid).expect("gateway RSS");
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let started = Instant::now();
    let stream = c
        .query_raw(
            "SELECT repeat('x', 1000) FROM generate_series(1, 300000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut peak_while_slow = 0;
    while let Some(row) = stream.next().await {
        let row = row.unwrap();
        let v: &str = row.get(0);
        assert_eq!(v.len(), 1000);
        if rows % 10_000 == 0 {
            assert!(v.bytes().all(|b| b == b'x'));
        }
        rows += 1;
        bytes += v.len() as u64;
        // A slow consumer first: ~1.5 s during which the upstream could push the whole
        // 300 MB at the gateway if nothing held it back.
        if rows <= 30 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if rows == 30 {
                peak_while_slow = peak.load(Ordering::Relaxed);
            }
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert_eq!(rows, ROWS);
    assert_eq!(bytes, ROWS * 1000);
    assert_eq!(stream.rows_affected(), Some(ROWS));
    eprintln!(
        "large result: {rows} rows in {elapsed:?}; gateway RSS baseline {baseline} KiB, \
         peak while slow {peak_while_slow} KiB, peak {peak} KiB"
    );
    assert!(
        peak < LIMIT_KIB,
        "gateway RSS peaked at {peak} KiB (baseline {baseline} KiB) for a ~300 MB result"
    );
    assert!(
        peak_while_slow < baseline + 64 * 1024,
        "gateway buffered while the client was slow: {peak_while_slow} KiB (baseline {baseline} KiB)"
    );
    // The session is still usable afterwards.
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Terminate (and its absence)
// ---------------------------------------------------------------------------------------------

fn closes(events: &[serde_json::Value]) -> Vec<serde_json::Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "session.close")
        .map(|e| e["payload"].clone())
        .collect()
}

/// psql as a child process against `conninfo`, stdout and stderr piped.
fn spawn_psql(conninfo: &str, sql: &str) -> std::process::Child {
    Command::new("psql")
        .args(["-X", "-A", "-t"])
        .arg(conninfo)
        .args(["-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql")
}

fn active_count(env: &Env, query: &str) -> i64 {
    superuser_count(
        env,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{query}'"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_and_client_disconnect() {
    let env = start();
    let c = env.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    let events = blocking(|| env.events_after_closes(1));
    let close = &closes(&events)[0];
    assert_eq!(close["outcome"], "closed", "{close}");
    assert_eq!(close["commands"], 1, "{close}");

    blocking(|| {
        let out = env.psql(&env.conninfo("app"), &["-c", "SELECT 1", "-c", "\\q"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let events = env.events_after_closes(2);
        assert_eq!(closes(&events)[1]["outcome"], "closed");

        // A client that vanishes mid-query (no Terminate): recorded as such, and the upstream
        // backend's work is cancelled rather than left running.
        let mut child = spawn_psql(&env.conninfo("app"), "SELECT pg_sleep(30)");
        wait_for(Duration::from_secs(10), "the query to run upstream", || {
            active_count(&env, "SELECT pg_sleep(30)") == 1
        });
        child.kill().unwrap();
        child.wait().unwrap();
        wait_for(
            Duration::from_secs(5),
            "the upstream query to be cancelled after the client vanished",
            || active_count(&env, "SELECT pg_sleep(30)") == 0,
        );
        let events = env.events_after_closes(3);
        let close = &closes(&events)[2];
        assert_eq!(close["outcome"], "client_disconnected", "{close}");
    });
}

// ---------------------------------------------------------------------------------------------
// 12. Cancel
// ---------------------------------------------------------------------------------------------

const CANCEL_CODE: [u8; 4] = 80877102i32.to_be_bytes();

/// A plaintext CancelRequest to the gateway; returns once the gateway closed the connection.
fn raw_cancel(port: u16, pid: i32, secret: i32) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(&16i32.to_be_bytes());
    msg.extend_from_slice(&CANCEL_CODE);
    msg.extend_from_slice(&pid.to_be_bytes());
    msg.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&msg).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a CancelRequest gets no reply: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_from_tokio_postgres_and_psql() {
    let env = start();
    let yes = r#"tollgate_cancel_requests_total{matched="yes"}"#;
    let no = r#"tollgate_cancel_requests_total{matched="no"}"#;
    let c = env.client().await;
    let upstream_pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // tokio-postgres: CancelRequest over TLS (sslmode=require) while pg_sleep(30) runs.
    let token = c.cancel_token();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(&env.pki.ca, None));
    let t0 = Instant::now();
    let (r, cancelled_at) = tokio::join!(c.simple_query("SELECT pg_sleep(30)"), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tls).await.unwrap();
        Instant::now()
    });
    let e = r.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    assert_eq!(code(&e), "57014");
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "canceling statement due to user request"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "cancel took {:?} ({:?} after the request)",
        t0.elapsed(),
        cancelled_at.elapsed()
    );
    assert_eq!(env.gw.metric(yes), Some(1));
    assert_eq!(
        c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );

    // The key the client holds is the gateway's own, not the upstream backend's.
    let (pid, secret) = cancel_key(&token, &env.pki).await;
    assert_ne!(
        pid, upstream_pid,
        "the upstream backend key must not leak to the client"
    );

    // Wrong keys do nothing: right pid with a wrong secret, and an unknown pid.
    let port = env.gw.pg_port;
    let t0 = Instant::now();
    let (r, _) = tokio::join!(
        c.query_one("SELECT pg_sleep(1.5)::text || 'done'", &[]),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            blocking(|| {
                raw_cancel(port, pid, secret ^ 1);
                raw_cancel(port, pid ^ 0x5a5a, secret);
            });
        }
    );
    assert_eq!(
        r.expect("query survives wrong-key cancels")
            .get::<_, String>(0),
        "done"
    );
    assert!(t0.elapsed() >= Duration::from_millis(1500));
    assert_eq!(env.gw.metric(no), Some(2));
    assert_eq!(env.gw.metric(yes), Some(1));
    // The right key, sent by hand in plaintext (as libpq's PQcancel does), does cancel.
    let (r, _) = tokio::join!(c.simple_query("SELECT pg_sleep(30)"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        blocking(|| raw_cancel(port, pid, secret));
    });
    assert_eq!(code(&r.unwrap_err()), "57014");
    assert_eq!(env.gw.metric(yes), Some(2));

    // psql: SIGINT while a query runs sends a CancelRequest.
    blocking(|| {
        let mut child = spawn_psql(&env.conninfo("app"), "SELECT pg_sleep(29)");
        wait_for(
            Duration::from_secs(10),
            "psql's query to run upstream",
            || active_count(&env, "SELECT pg_sleep(29)") == 1,
        );
        let t0 = Instant::now();
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        wait_for(Duration::from_secs(3), "psql to exit after SIGINT", || {
            child.try_wait().unwrap().is_some()
        });
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("canceling statement due to user request"),
            "{}",
            stderr(&out)
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(env.gw.metric(yes), Some(3));
    });
}

// ---------------------------------------------------------------------------------------------
// 13. pgbench
// ---------------------------------------------------------------------------------------------

#[test]
fn pgbench_through_the_gateway_in_every_query_mode() {
    let env = Env::start();
    env.pgbench_init();

    let mut runs = vec![];
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let mut cmd = Command::new("pgbench");
            cmd.args(["-n", "-T", "2", "-c", "2", "-M", mode]);
            if select_only {
                cmd.arg("-S");
            }
            let child = cmd
                .arg(env.conninfo("app"))
                .env_remove("PGPASSWORD")
                .env_remove("PGSSLMODE")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("pgbench");
            runs.push((mode, select_only, child));
        }
    }
    for (mode, select_only, child) in runs {
        let out = child.wait_with_output().unwrap();
        let text = stdout(&out);
        let what = format!("pgbench -M {mode}{}", if select_only { " -S" } else { "" });
        assert!(out.status.success(), "{what}: {text}\n{}", stderr(&out));
        assert!(
            text.contains(&format!("query mode: {mode}")),
            "{what}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0 "),
            "{what}: {text}"
        );
        let processed: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what}: {text}"));
        assert!(processed > 0, "{what}: {text}");
        let tps: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{what}: {text}"));
        assert!(tps > 0.0, "{what}: {text}");
    }
    // The TPC-B-like runs really wrote through the gateway.
    let out = env.psql(
        &env.conninfo("app"),
        &["-c", "SELECT count(*) > 0 FROM pgbench_history"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "t");
}
