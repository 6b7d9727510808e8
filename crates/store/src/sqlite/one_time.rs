//! One-time values in SQLite (see [`crate::Store::once_put`]).

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::StoreError;

pub(super) const MIGRATION: &str = r#"
CREATE TABLE one_time (
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,   -- unix ms
    PRIMARY KEY (kind, key)
);
CREATE INDEX one_time_by_expiry ON one_time (expires_at);
"#;

impl SqliteStore {
    pub(super) fn sql_once_put(
        &self,
        kind: &str,
        key: &str,
        value: &str,
        expires_unix_ms: i64,
        now_unix_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.writer();
        // Expired entries go first, so an expired key can be claimed again.
        conn.execute(
            "DELETE FROM one_time WHERE expires_at <= ?1",
            params![now_unix_ms],
        )?;
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO one_time (kind, key, value, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![kind, key, value, expires_unix_ms],
        )?;
        Ok(inserted == 1)
    }

    pub(super) fn sql_once_get(
        &self,
        kind: &str,
        key: &str,
        now_unix_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .writer()
            .query_row(
                "SELECT value FROM one_time WHERE kind = ?1 AND key = ?2 AND expires_at > ?3",
                params![kind, key, now_unix_ms],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub(super) fn sql_once_take(
        &self,
        kind: &str,
        key: &str,
        now_unix_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        let conn = self.writer();
        let value: Option<(String, i64)> = conn
            .query_row(
                "DELETE FROM one_time WHERE kind = ?1 AND key = ?2 RETURNING value, expires_at",
                params![kind, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(value.filter(|(_, exp)| *exp > now_unix_ms).map(|(v, _)| v))
    }
}
