//! MCP tool pins in PostgreSQL: the rules of `sqlite/pins.rs`. A listing locks the pin row
//! (`FOR UPDATE`) so two replicas listing a new tool at once pin one definition.

use tokio_postgres::{Client, Row};

use crate::pins::{McpPinRecord, PinSeen};
use crate::StoreError;

pub(super) const MIGRATION: &str = r#"
CREATE TABLE mcp_pins (
    resource      TEXT NOT NULL,
    tool          TEXT NOT NULL,
    pinned_sha256 TEXT NOT NULL,
    pinned_at     BIGINT NOT NULL,   -- unix ms
    pinned_by     TEXT,
    seen_sha256   TEXT,
    seen_at       BIGINT,            -- unix ms
    PRIMARY KEY (resource, tool)
);
"#;

const COLUMNS: &str = "resource, tool, pinned_sha256, pinned_at, pinned_by, seen_sha256, seen_at";

fn read(r: &Row) -> Result<McpPinRecord, StoreError> {
    Ok(McpPinRecord {
        resource: r.try_get(0)?,
        tool: r.try_get(1)?,
        pinned_sha256: r.try_get(2)?,
        pinned_at_unix_ms: r.try_get(3)?,
        pinned_by: r.try_get(4)?,
        seen_sha256: r.try_get(5)?,
        seen_at_unix_ms: r.try_get(6)?,
    })
}

pub(super) async fn see(
    c: &mut Client,
    resource: &str,
    tool: &str,
    sha256: &str,
    at_unix_ms: i64,
) -> Result<PinSeen, StoreError> {
    let tx = c.transaction().await?;
    // The first listing anywhere pins; a concurrent one then finds that pin.
    let inserted = tx
        .execute(
            "INSERT INTO mcp_pins (resource, tool, pinned_sha256, pinned_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (resource, tool) DO NOTHING",
            &[&resource, &tool, &sha256, &at_unix_ms],
        )
        .await?;
    let row = tx
        .query_one(
            &format!("SELECT {COLUMNS} FROM mcp_pins WHERE resource = $1 AND tool = $2 FOR UPDATE"),
            &[&resource, &tool],
        )
        .await?;
    let mut p = read(&row)?;
    let seen = if inserted == 1 {
        PinSeen::New(p)
    } else if p.pinned_sha256 == sha256 {
        if p.seen_sha256.is_some() {
            tx.execute(
                "UPDATE mcp_pins SET seen_sha256 = NULL, seen_at = NULL WHERE resource = $1 AND tool = $2",
                &[&resource, &tool],
            )
            .await?;
            p.seen_sha256 = None;
            p.seen_at_unix_ms = None;
        }
        PinSeen::Same(p)
    } else {
        if p.seen_sha256.as_deref() != Some(sha256) {
            tx.execute(
                "UPDATE mcp_pins SET seen_sha256 = $3, seen_at = $4 WHERE resource = $1 AND tool = $2",
                &[&resource, &tool, &sha256, &at_unix_ms],
            )
            .await?;
            p.seen_sha256 = Some(sha256.into());
            p.seen_at_unix_ms = Some(at_unix_ms);
        }
        PinSeen::Changed(p)
    };
    tx.commit().await?;
    Ok(seen)
}

pub(super) async fn list(
    c: &mut Client,
    resource: Option<&str>,
) -> Result<Vec<McpPinRecord>, StoreError> {
    let rows = c
        .query(
            &format!(
                "SELECT {COLUMNS} FROM mcp_pins WHERE $1::TEXT IS NULL OR resource = $1 ORDER BY resource, tool"
            ),
            &[&resource],
        )
        .await?;
    rows.iter().map(read).collect()
}

pub(super) async fn approve(
    c: &mut Client,
    resource: &str,
    tool: &str,
    sha256: &str,
    at_unix_ms: i64,
    by: &str,
) -> Result<bool, StoreError> {
    let n = c
        .execute(
            "UPDATE mcp_pins SET pinned_sha256 = $3, pinned_at = $4, pinned_by = $5, \
             seen_sha256 = NULL, seen_at = NULL \
             WHERE resource = $1 AND tool = $2 AND seen_sha256 = $3",
            &[&resource, &tool, &sha256, &at_unix_ms, &by],
        )
        .await?;
    Ok(n == 1)
}
