//! `tollgate mcp pin RESOURCE` (pin an MCP resource's tool definitions before any client lists
//! them: the gateway's own MCP client asks the configured upstream) and `tollgate mcp pins
//! RESOURCE` (the pins the store holds). Both read the config and the store directly.

use crate::sessions_cmd::terminal_safe;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;
use tollgate_store::PinSeen;

#[derive(Subcommand)]
pub enum McpCmd {
    /// Connect to the resource's MCP server through its configured upstream (TLS and injected
    /// credential as the gateway uses them), list its tools and pin each tool that has no pin
    /// yet. A tool whose definition differs from its pin is reported, not re-pinned: the
    /// gateway opens a `pin` review for it at its next listing.
    Pin {
        resource: String,
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Only list the pins the store holds (as `tollgate mcp pins`).
        #[arg(long)]
        show: bool,
        #[arg(long)]
        json: bool,
    },
    /// The pins the store holds for the resource.
    Pins {
        resource: String,
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: McpCmd) -> anyhow::Result<()> {
    match cmd {
        McpCmd::Pin {
            resource,
            config,
            show: false,
            json,
        } => pin(&config, &resource, json),
        McpCmd::Pin {
            resource,
            config,
            json,
            ..
        }
        | McpCmd::Pins {
            resource,
            config,
            json,
        } => show(&config, &resource, json),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn pin(config: &Path, resource: &str, json: bool) -> anyhow::Result<()> {
    let c = tollgate_config::load(config)?;
    let store = tollgate_store::open_store(&c.server.store)?;
    let tools = crate::runtime()?.block_on(tollgate_http::upstream_tools(&c, resource))?;
    let mut out = Vec::new();
    for t in &tools {
        let seen = store.mcp_pin_see(resource, &t.name, &t.sha256, now_ms())?;
        let (state, pinned) = match &seen {
            PinSeen::New(r) => ("pinned", &r.pinned_sha256),
            PinSeen::Same(r) => ("unchanged", &r.pinned_sha256),
            PinSeen::Changed(r) => ("changed", &r.pinned_sha256),
        };
        if !json {
            let note = match seen {
                PinSeen::Changed(_) => format!(
                    " (pinned {}; not re-pinned: approve its `pin` review, `tollgate reviews list --kind pin`)",
                    &pinned[..16]
                ),
                _ => String::new(),
            };
            // Tool names come from the upstream server: no escape sequence reaches the terminal.
            let name = terminal_safe(&t.name, true);
            println!("{state:<9} {name} sha256 {}{note}", &t.sha256[..16]);
        }
        out.push(
            json!({"tool": t.name, "state": state, "sha256": t.sha256, "pinned_sha256": pinned}),
        );
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"resource": resource, "tools": out}))?
        );
    } else {
        println!("{} tools of resource {resource:?} listed", tools.len());
    }
    Ok(())
}

fn show(config: &Path, resource: &str, json: bool) -> anyhow::Result<()> {
    let c = tollgate_config::load(config)?;
    let store = tollgate_store::open_store(&c.server.store)?;
    let pins = store.mcp_pins(Some(resource))?;
    if json {
        let pins: Vec<_> = pins
            .iter()
            .map(|p| {
                json!({"tool": p.tool, "pinned_sha256": p.pinned_sha256,
                "pinned_at": tollgate_api::params::format_time(p.pinned_at_unix_ms),
                "pinned_by": p.pinned_by, "seen_sha256": p.seen_sha256})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"resource": resource, "pins": pins}))?
        );
        return Ok(());
    }
    if pins.is_empty() {
        println!("no pins for resource {resource:?}");
    }
    for p in &pins {
        let changed = p
            .seen_sha256
            .as_deref()
            .map(|s| format!("  CHANGED: listed now as {}", &s[..16.min(s.len())]))
            .unwrap_or_default();
        println!(
            "{} sha256 {} pinned {} by {}{changed}",
            terminal_safe(&p.tool, true),
            &p.pinned_sha256[..16.min(p.pinned_sha256.len())],
            tollgate_api::params::format_time(p.pinned_at_unix_ms),
            terminal_safe(p.pinned_by.as_deref().unwrap_or("first sight"), true),
        );
    }
    Ok(())
}
