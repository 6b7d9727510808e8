//! `tollgate audit prune` (the retention prune the gateway runs periodically, by hand),
//! `tollgate audit import` (a replica's journal into the store) and `tollgate store migrate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit 0 when the prune ran (or had nothing to do), 2 when it could not run.
pub fn prune(config: &Path, dry_run: bool, json: bool) -> ExitCode {
    let run = || -> anyhow::Result<tollgate_store::PruneReport> {
        let c = tollgate_config::load(config)?;
        let Some(retention) = c.server.retention else {
            anyhow::bail!(
                "{}: server.retention is not set, so sessions are kept forever; set e.g. retention = \"90d\" to prune",
                c.path.display()
            );
        };
        let store = tollgate_store::open_store(&c.server.store)?;
        Ok(tollgate_server::audit_task::prune_now(
            &*store, retention, dry_run,
        )?)
    };
    match run() {
        Err(e) => could_not_run(e),
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                let cutoff = tollgate_api::params::format_time(r.cutoff_unix_ms);
                let verb = if r.dry_run { "would prune" } else { "pruned" };
                println!(
                    "{verb} {} session(s) and {} event(s) that ended before {cutoff}",
                    r.sessions, r.events
                );
                for a in &r.anchors {
                    println!(
                        "  chain {} now starts after seq {} ({})",
                        a.chain_id, a.seq, a.hash
                    );
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Exit 0 when every event of the journal is in the store, 2 when the import could not run.
pub fn import(config: &Path, journal: &Path, json: bool) -> ExitCode {
    let run = || -> anyhow::Result<tollgate_store::JournalImport> {
        let c = tollgate_config::load(config)?;
        let store = tollgate_store::open_store(&c.server.store)?;
        let report = tollgate_store::import_journal(&*store, journal)?;
        // Every chain's head in the store is at least where the journal ends.
        let heads = store.chain_heads()?;
        for want in &report.chains {
            let head = heads.iter().find(|h| h.chain_id == want.chain_id);
            if head.is_none_or(|h| h.seq < want.seq) {
                anyhow::bail!(
                    "chain {} ends at seq {} in the journal but at {} in the store after the import",
                    want.chain_id,
                    want.seq,
                    head.map_or(0, |h| h.seq)
                );
            }
        }
        Ok(report)
    };
    match run() {
        Err(e) => could_not_run(e),
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "imported {} event(s) from {} file(s) (events already in the store are skipped)",
                    r.events,
                    r.files.len()
                );
                for c in &r.chains {
                    println!("  chain {} up to seq {} ({})", c.chain_id, c.seq, c.hash);
                }
            }
            ExitCode::SUCCESS
        }
    }
}

#[derive(clap::Subcommand)]
pub enum StoreCmd {
    /// Copy a SQLite store (events with their chains and prune anchors, sessions, reviews,
    /// votes, grants) into an empty PostgreSQL store; both are verified, before and after.
    Migrate {
        /// sqlite://PATH
        #[arg(long)]
        from: String,
        /// postgres://USER@HOST:PORT/DBNAME?sslrootcert=CA&password_file=PATH
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// List the gateway replicas registered in the shared store of --config, with their
    /// address, version and last heartbeat.
    Replicas {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Exit 0 when the registry could be read, 2 when it could not.
fn replicas(config: &Path, json: bool) -> ExitCode {
    let run = || -> anyhow::Result<Vec<tollgate_store::ReplicaRecord>> {
        let c = tollgate_config::load(config)?;
        let store = tollgate_store::open_store(&c.server.store)?;
        Ok(store.replicas()?)
    };
    let list = match run() {
        Ok(l) => l,
        Err(e) => return could_not_run(e),
    };
    let now = tollgate_store::unix_ms(std::time::SystemTime::now());
    let interval = tollgate_server::replica_task::HEARTBEAT_INTERVAL.as_millis() as i64;
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["alive"] = r.alive(now, interval).into();
                v
            })
            .collect();
        let doc = serde_json::json!({ "replicas": rows });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for r in &list {
            println!(
                "{}  {}  admin {}  v{}  heartbeat {} ms ago{}",
                r.id,
                r.address,
                r.admin_address.as_deref().unwrap_or("-"),
                r.version,
                now - r.heartbeat_at_unix_ms,
                if r.alive(now, interval) {
                    ""
                } else {
                    "  (gone?)"
                }
            );
        }
    }
    ExitCode::SUCCESS
}

/// Exit 0 when the copy verifies, 1 when the source or the copy does not, 2 when it could not run.
pub fn store(cmd: StoreCmd) -> ExitCode {
    let (from, to, json) = match cmd {
        StoreCmd::Migrate { from, to, json } => (from, to, json),
        StoreCmd::Replicas { config, json } => return replicas(&config, json),
    };
    let run = || -> anyhow::Result<ExitCode> {
        let Some(path) = from
            .strip_prefix("sqlite://")
            .filter(|p| !p.starts_with(':'))
        else {
            anyhow::bail!("--from must be a SQLite store file: sqlite://PATH");
        };
        if !tollgate_store::PgStoreUrl::is_postgres(&to) {
            anyhow::bail!("--to must be a PostgreSQL store: postgres://USER@HOST:PORT/DBNAME?sslrootcert=CA_FILE");
        }
        let before = tollgate_store::open_store(&from)?.verify()?;
        if let Some(b) = &before.first_break {
            eprintln!(
                "the source does not verify (chain {} at seq {}: {}); nothing was copied",
                b.chain_id, b.chain_seq, b.reason
            );
            return Ok(ExitCode::from(1));
        }
        let target = tollgate_store::PgStore::open(&to)?;
        let copied = tollgate_store::migrate::sqlite_to_postgres(Path::new(path), &target)?;
        let after = tollgate_store::Store::verify(&target)?;
        let same = after.first_break.is_none()
            && (after.chains, after.events, after.checkpoints)
                == (before.chains, before.events, before.checkpoints);
        if json {
            let doc = serde_json::json!({"copied": copied.tables, "before": before, "after": after, "ok": same});
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        } else {
            let rows: Vec<String> = copied
                .tables
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            println!("copied {} into {}", rows.join(", "), target.target());
            println!(
                "audit verify before: {} events in {} chain(s), {} checkpoint(s); after: {} events in {} chain(s), {} checkpoint(s){}",
                before.events,
                before.chains,
                before.checkpoints,
                after.events,
                after.chains,
                after.checkpoints,
                match &after.first_break {
                    None => String::new(),
                    Some(b) => format!(" BROKEN at chain {} seq {}: {}", b.chain_id, b.chain_seq, b.reason),
                }
            );
        }
        Ok(if same {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    };
    run().unwrap_or_else(could_not_run)
}

/// Exit 2: the command could not run (what stopped it on stderr).
fn could_not_run(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(2)
}
