//! `tollgate store migrate --from sqlite://… --to postgres://…`: copies an embedded store into
//! an empty PostgreSQL store row for row (events keep their ids, hashes and exact payload text,
//! chains their heads and prune anchors), in one PostgreSQL transaction, so the chains verify
//! the same before and after.

use std::path::Path;

use tokio_postgres::types::ToSql;

use crate::postgres::PgStore;
use crate::{SqliteStore, StoreError};

#[derive(Clone, Copy)]
enum Col {
    Text,
    Int,
    Bool,
}

/// Tables in insertion order (reviews before the votes and grants that reference them), with
/// their columns as both schemas name them.
const TABLES: &[(&str, &[(&str, Col)])] = &[
    (
        "chains",
        &[
            ("chain_id", Col::Text),
            ("last_seq", Col::Int),
            ("last_hash", Col::Text),
            ("created_at_unix_ms", Col::Int),
            ("updated_at_unix_ms", Col::Int),
            ("anchor_seq", Col::Int),
            ("anchor_hash", Col::Text),
        ],
    ),
    (
        "events",
        &[
            ("id", Col::Int),
            ("chain_id", Col::Text),
            ("chain_seq", Col::Int),
            ("session_id", Col::Text),
            ("session_seq", Col::Int),
            ("at_unix_ms", Col::Int),
            ("kind", Col::Text),
            ("payload", Col::Text),
            ("prev_hash", Col::Text),
            ("hash", Col::Text),
        ],
    ),
    (
        "sessions",
        &[
            ("id", Col::Text),
            ("started_at_unix_ms", Col::Int),
            ("ended_at_unix_ms", Col::Int),
            ("listener", Col::Text),
            ("client_addr", Col::Text),
            ("resource", Col::Text),
            ("subject", Col::Text),
            ("auth_method", Col::Text),
            ("outcome", Col::Text),
            ("event_count", Col::Int),
            ("open_payload", Col::Text),
            ("close_payload", Col::Text),
        ],
    ),
    (
        "reviews",
        &[
            ("id", Col::Text),
            ("kind", Col::Text),
            ("session_id", Col::Text),
            ("resource", Col::Text),
            ("requester", Col::Text),
            ("requester_principal", Col::Text),
            ("status", Col::Text),
            ("rule", Col::Text),
            ("statement", Col::Text),
            ("statement_sha256", Col::Text),
            ("min_approvals", Col::Int),
            ("access_ms", Col::Int),
            ("created_at", Col::Int),
            ("expires_at", Col::Int),
            ("decided_at", Col::Int),
            ("decided_by", Col::Text),
            ("reason", Col::Text),
            ("used_at", Col::Int),
            ("payload", Col::Text),
        ],
    ),
    (
        "review_votes",
        &[
            ("review_id", Col::Text),
            ("reviewer", Col::Text),
            ("principal", Col::Text),
            ("groups", Col::Text),
            ("approve", Col::Bool),
            ("reason", Col::Text),
            ("at", Col::Int),
        ],
    ),
    (
        "access_grants",
        &[
            ("review_id", Col::Text),
            ("subject", Col::Text),
            ("resource", Col::Text),
            ("granted_at", Col::Int),
            ("until", Col::Int),
        ],
    ),
];

/// Rows copied, per table, in [`TABLES`] order.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MigrateReport {
    pub tables: Vec<(String, u64)>,
}

type SqlValue = Box<dyn ToSql + Sync + Send>;

fn read_value(row: &rusqlite::Row<'_>, i: usize, col: Col) -> rusqlite::Result<SqlValue> {
    Ok(match col {
        Col::Text => Box::new(row.get::<_, Option<String>>(i)?),
        Col::Int => Box::new(row.get::<_, Option<i64>>(i)?),
        Col::Bool => Box::new(row.get::<_, Option<bool>>(i)?),
    })
}

/// Copies the SQLite store at `from` (migrated to this build's schema first) into `to`,
/// which must hold no events and no reviews yet.
pub fn sqlite_to_postgres(from: &Path, to: &PgStore) -> Result<MigrateReport, StoreError> {
    drop(SqliteStore::open(from)?); // brings an older file up to the current schema
    let src = rusqlite::Connection::open_with_flags(
        from,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // One read snapshot of the whole file.
    src.execute_batch("BEGIN")?;
    to.run(async |c| {
        let tx = c.transaction().await?;
        for table in ["events", "reviews", "chains"] {
            let n: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
            if n > 0 {
                return Err(StoreError::Unsupported(format!(
                    "the target store already holds {n} row(s) in {table}; migrate into an empty store"
                )));
            }
        }
        let mut report = MigrateReport::default();
        for (table, cols) in TABLES {
            let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
            let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            let insert = tx
                .prepare(&format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    names.join(", "),
                    placeholders.join(", ")
                ))
                .await?;
            let order = if *table == "events" { " ORDER BY id" } else { "" };
            let mut stmt = src.prepare(&format!("SELECT {} FROM {table}{order}", names.join(", ")))?;
            let mut rows = stmt.query([])?;
            let mut copied = 0u64;
            while let Some(row) = rows.next()? {
                let values: Vec<SqlValue> = cols
                    .iter()
                    .enumerate()
                    .map(|(i, (_, col))| read_value(row, i, *col))
                    .collect::<Result<_, _>>()?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect();
                tx.execute(&insert, &params).await?;
                copied += 1;
            }
            report.tables.push((table.to_string(), copied));
        }
        // New events continue after the copied ids.
        tx.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'id'), GREATEST((SELECT MAX(id) FROM events), 1))",
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(report)
    })
}
