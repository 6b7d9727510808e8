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
