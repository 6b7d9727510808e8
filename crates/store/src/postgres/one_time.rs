//! One-time values in PostgreSQL (see [`crate::Store::once_put`]): the same rules as
//! `sqlite/one_time.rs`, each a single statement, so two replicas never both claim a key.

use tokio_postgres::Client;

use crate::StoreError;

pub(super) const MIGRATION: &str = r#"
CREATE TABLE one_time (
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    expires_at BIGINT NOT NULL,   -- unix ms
    PRIMARY KEY (kind, key)
);
CREATE INDEX one_time_by_expiry ON one_time (expires_at);
"#;

pub(super) async fn put(
    c: &mut Client,
    kind: &str,
    key: &str,
    value: &str,
    expires_unix_ms: i64,
    now_unix_ms: i64,
) -> Result<bool, StoreError> {
    c.execute(
        "DELETE FROM one_time WHERE expires_at <= $1",
        &[&now_unix_ms],
    )
    .await?;
    // An expired entry (another replica's, not yet deleted) is taken over; a live one wins.
    let rows = c
        .query(
            "INSERT INTO one_time (kind, key, value, expires_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
             WHERE one_time.expires_at <= $5
             RETURNING 1",
            &[&kind, &key, &value, &expires_unix_ms, &now_unix_ms],
        )
        .await?;
    Ok(rows.len() == 1)
}

pub(super) async fn get(
    c: &mut Client,
    kind: &str,
    key: &str,
    now_unix_ms: i64,
) -> Result<Option<String>, StoreError> {
    let row = c
        .query_opt(
            "SELECT value FROM one_time WHERE kind = $1 AND key = $2 AND expires_at > $3",
            &[&kind, &key, &now_unix_ms],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

pub(super) async fn take(
    c: &mut Client,
    kind: &str,
    key: &str,
    now_unix_ms: i64,
) -> Result<Option<String>, StoreError> {
    let row = c
        .query_opt(
            "DELETE FROM one_time WHERE kind = $1 AND key = $2 RETURNING value, expires_at",
            &[&kind, &key],
        )
        .await?;
    Ok(row
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .filter(|(_, exp)| *exp > now_unix_ms)
        .map(|(v, _)| v))
}
