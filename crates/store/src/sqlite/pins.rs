//! MCP tool pins in SQLite (see `crate::pins`).

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};

use super::SqliteStore;
use crate::pins::{McpPinRecord, PinSeen};
use crate::StoreError;

pub(super) const MIGRATION: &str = r#"
CREATE TABLE mcp_pins (
    resource      TEXT NOT NULL,
    tool          TEXT NOT NULL,
    pinned_sha256 TEXT NOT NULL,
    pinned_at     INTEGER NOT NULL,   -- unix ms
    pinned_by     TEXT,
    seen_sha256   TEXT,
    seen_at       INTEGER,            -- unix ms
    PRIMARY KEY (resource, tool)
);
"#;

const COLUMNS: &str = "resource, tool, pinned_sha256, pinned_at, pinned_by, seen_sha256, seen_at";

fn read(r: &Row) -> rusqlite::Result<McpPinRecord> {
    Ok(McpPinRecord {
        resource: r.get(0)?,
        tool: r.get(1)?,
        pinned_sha256: r.get(2)?,
        pinned_at_unix_ms: r.get(3)?,
        pinned_by: r.get(4)?,
        seen_sha256: r.get(5)?,
        seen_at_unix_ms: r.get(6)?,
    })
}

impl SqliteStore {
    pub(super) fn sql_mcp_pin_see(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
        at_unix_ms: i64,
    ) -> Result<PinSeen, StoreError> {
        let mut w = self.writer();
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM mcp_pins WHERE resource = ?1 AND tool = ?2"),
                params![resource, tool],
                read,
            )
            .optional()?;
        let seen = match found {
            None => {
                tx.execute(
                    "INSERT INTO mcp_pins (resource, tool, pinned_sha256, pinned_at) VALUES (?1, ?2, ?3, ?4)",
                    params![resource, tool, sha256, at_unix_ms],
                )?;
                PinSeen::New(McpPinRecord {
                    resource: resource.into(),
                    tool: tool.into(),
                    pinned_sha256: sha256.into(),
                    pinned_at_unix_ms: at_unix_ms,
                    pinned_by: None,
                    seen_sha256: None,
                    seen_at_unix_ms: None,
                })
            }
            Some(mut p) if p.pinned_sha256 == sha256 => {
                if p.seen_sha256.is_some() {
                    tx.execute(
                        "UPDATE mcp_pins SET seen_sha256 = NULL, seen_at = NULL WHERE resource = ?1 AND tool = ?2",
                        params![resource, tool],
                    )?;
                    p.seen_sha256 = None;
                    p.seen_at_unix_ms = None;
                }
                PinSeen::Same(p)
            }
            Some(mut p) => {
                if p.seen_sha256.as_deref() != Some(sha256) {
                    tx.execute(
                        "UPDATE mcp_pins SET seen_sha256 = ?3, seen_at = ?4 WHERE resource = ?1 AND tool = ?2",
                        params![resource, tool, sha256, at_unix_ms],
                    )?;
                    p.seen_sha256 = Some(sha256.into());
                    p.seen_at_unix_ms = Some(at_unix_ms);
                }
                PinSeen::Changed(p)
            }
        };
        tx.commit()?;
        Ok(seen)
    }

    pub(super) fn sql_mcp_pins(
        &self,
        resource: Option<&str>,
    ) -> Result<Vec<McpPinRecord>, StoreError> {
        let r = self.reader();
        let mut st = r.prepare(&format!(
            "SELECT {COLUMNS} FROM mcp_pins WHERE ?1 IS NULL OR resource = ?1 ORDER BY resource, tool"
        ))?;
        let rows = st.query_map(params![resource], read)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn sql_mcp_pin_approve(
        &self,
        resource: &str,
        tool: &str,
        sha256: &str,
        at_unix_ms: i64,
        by: &str,
    ) -> Result<bool, StoreError> {
        let changed = self.writer().execute(
            "UPDATE mcp_pins SET pinned_sha256 = ?3, pinned_at = ?4, pinned_by = ?5, \
             seen_sha256 = NULL, seen_at = NULL \
             WHERE resource = ?1 AND tool = ?2 AND seen_sha256 = ?3",
            params![resource, tool, sha256, at_unix_ms, by],
        )?;
        Ok(changed == 1)
    }
}
