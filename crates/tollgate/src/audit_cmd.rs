//! `tollgate audit prune`: the retention prune the gateway runs periodically, by hand.

use std::path::Path;
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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
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
}

/// Exit 0 when the copy verifies, 1 when the source or the copy does not, 2 when it could not run.
pub fn store(cmd: StoreCmd) -> ExitCode {
    let StoreCmd::Migrate { from, to, json } = cmd;
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
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
