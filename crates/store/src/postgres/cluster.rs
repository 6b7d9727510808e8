//! The replicas of one PostgreSQL store: their registry (id, address, version, heartbeat) and
//! the leadership of cluster-wide housekeeping (checkpoints, retention, the periodic scan),
//! held as a session advisory lock on a dedicated connection: whoever holds it leads, and a
//! leader whose connection breaks loses it with the connection.

use std::time::Duration;

use tokio_postgres::Client;

use super::PgStore;
use crate::{ReplicaRecord, StoreError};

/// The advisory lock whose holder leads (see [`super::MIGRATION_LOCK`] for the namespace).
const LEADER_LOCK: i64 = 0x746f_6c6c_6761_0003;
/// How often a replica that does not lead tries for the lock, and a leader checks its connection.
const LEADER_POLL: Duration = Duration::from_secs(2);

pub(super) async fn heartbeat(c: &mut Client, r: &ReplicaRecord) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO replicas (id, address, admin_address, version, cancel_tag, started_at_unix_ms, heartbeat_at_unix_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
         address = excluded.address, admin_address = excluded.admin_address, \
         version = excluded.version, cancel_tag = excluded.cancel_tag, \
         heartbeat_at_unix_ms = excluded.heartbeat_at_unix_ms",
        &[
            &r.id,
            &r.address,
            &r.admin_address,
            &r.version,
            &r.cancel_tag,
            &r.started_at_unix_ms,
            &r.heartbeat_at_unix_ms,
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn list(c: &mut Client) -> Result<Vec<ReplicaRecord>, StoreError> {
    let rows = c
        .query(
            "SELECT id, address, admin_address, version, cancel_tag, started_at_unix_ms, \
             heartbeat_at_unix_ms FROM replicas ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(ReplicaRecord {
                id: r.try_get(0)?,
                address: r.try_get(1)?,
                admin_address: r.try_get(2)?,
                version: r.try_get(3)?,
                cancel_tag: r.try_get(4)?,
                started_at_unix_ms: r.try_get(5)?,
                heartbeat_at_unix_ms: r.try_get(6)?,
            })
        })
        .collect()
}

pub(super) async fn deregister(c: &mut Client, id: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM replicas WHERE id = $1", &[&id])
        .await?;
    Ok(())
}

impl PgStore {
    /// The leadership task: tries for [`LEADER_LOCK`] on its own connection (never pooled) and
    /// tells `leader` whether it holds it; reconnects when the connection breaks.
    pub(super) fn start_leading(&self, leader: tokio::sync::watch::Sender<bool>) {
        let Some(open) = self.dedicated("cluster leadership", None) else {
            return;
        };
        let rt = self.rt.as_ref().expect("runtime present until drop");
        rt.spawn(async move {
            loop {
                match open.open().await {
                    Ok((client, driver)) => {
                        hold_or_wait(&client, &leader).await;
                        driver.abort();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the cluster leadership connection")
                    }
                }
                if leader.send_replace(false) {
                    tracing::warn!("this replica no longer leads the cluster's housekeeping");
                }
                tokio::time::sleep(LEADER_POLL).await;
            }
        });
    }
}

/// Until `client`'s connection fails: tries for the lock while another replica holds it, then
/// keeps it (checking the connection) once held.
async fn hold_or_wait(client: &Client, leader: &tokio::sync::watch::Sender<bool>) {
    loop {
        let held = if *leader.borrow() {
            client.simple_query("SELECT 1").await.map(|_| true)
        } else {
            client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                .await
                .map(|r| r.get::<_, bool>(0))
        };
        match held {
            Ok(true) => {
                if !leader.send_replace(true) {
                    tracing::info!("this replica leads the cluster's housekeeping (checkpoints, retention, scans)");
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %super::describe(&e), "the cluster leadership connection failed");
                return;
            }
        }
        tokio::time::sleep(LEADER_POLL).await;
    }
}
