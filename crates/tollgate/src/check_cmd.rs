//! `tollgate check` (offline lint) and `tollgate scan` (live upstream scan): exit 0 clean,
//! 1 findings, 2 could not run.

use std::path::Path;
use std::process::ExitCode;
use tollgate_scan::{CheckOptions, Finding, GatewaySource, ResourceReport, ScanOptions};

fn could_not_run(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

pub fn check(config: &Path, min_days: u64, json: bool) -> ExitCode {
    let config = match tollgate_config::load(config) {
        Ok(c) => c,
        Err(e) => return could_not_run(e),
    };
    let findings = tollgate_scan::check(
        &config,
        &CheckOptions {
            min_days,
            ..Default::default()
        },
    );
    if json {
        let doc = serde_json::json!({
            "config": config.path.display().to_string(),
            "ok": findings.is_empty(),
            "findings": findings,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if findings.is_empty() {
        println!(
            "ok: {}: no findings ({} resource(s); certificates valid for at least {min_days} days)",
            config.path.display(),
            config.resources.len()
        );
    } else {
        for f in &findings {
            println!("{f}");
        }
        eprintln!("{}: {} finding(s)", config.path.display(), findings.len());
    }
    if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub fn scan(config: &Path, min_days: u64, json: bool) -> ExitCode {
    let config = match tollgate_config::load(config) {
        Ok(c) => c,
        Err(e) => return could_not_run(e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return could_not_run(e),
    };
    let gateway = if tollgate_store::PgStoreUrl::is_postgres(&config.server.store) {
        // Several replicas: the upstream connections of every live one in the registry.
        match tollgate_store::open_store(&config.server.store) {
            Ok(store) => match rt.block_on(tollgate_server::replica_task::peer_admins(store, "")) {
                Ok(peers) => GatewaySource::Cluster {
                    local: Default::default(),
                    peers,
                },
                Err(why) => GatewaySource::Unavailable(why),
            },
            Err(e) => GatewaySource::Unavailable(format!("the shared store cannot be read: {e}")),
        }
    } else {
        match config.server.admin_listen {
            Some(addr) => GatewaySource::Admin(addr),
            None => GatewaySource::Unavailable(
                "the config has no server.admin_listen to ask the gateway".into(),
            ),
        }
    };
    let opts = ScanOptions {
        min_days,
        gateway,
        max_message: config.server.max_message_bytes,
    };
    let reports = rt.block_on(tollgate_scan::scan(&config, &opts));
    let issuers = rt.block_on(tollgate_scan::scan_issuers(&config));
    let findings: Vec<&Finding> = reports
        .iter()
        .flat_map(|r| &r.findings)
        .chain(issuers.iter().flat_map(|i| &i.findings))
        .collect();
    if json {
        let doc = serde_json::json!({
            "config": config.path.display().to_string(),
            "ok": findings.is_empty(),
            "resources": reports,
            "issuers": issuers,
            "findings": findings,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for r in &reports {
            print_report(r);
        }
        for i in &issuers {
            print_issuer(i);
        }
        if findings.is_empty() {
            if issuers.is_empty() {
                println!("ok: {} resource(s) scanned, no findings", reports.len());
            } else {
                println!(
                    "ok: {} resource(s) and {} OIDC issuer(s) scanned, no findings",
                    reports.len(),
                    issuers.len()
                );
            }
        } else {
            eprintln!("{} finding(s)", findings.len());
        }
    }
    if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_issuer(i: &tollgate_scan::IssuerReport) {
    println!("issuer {}", i.issuer);
    if i.reachable {
        println!(
            "  keys:      {} usable, for {}; IdP signs ID tokens with {}; PKCE S256 {}, device flow {}",
            i.usable_keys,
            if i.algorithms_with_keys.is_empty() {
                "none of the configured algorithms".to_string()
            } else {
                i.algorithms_with_keys.join(", ")
            },
            if i.advertised_algorithms.is_empty() {
                "(not advertised)".to_string()
            } else {
                i.advertised_algorithms.join(", ")
            },
            if i.pkce_s256 { "yes" } else { "no" },
            if i.device_flow { "yes" } else { "no" },
        );
    }
    for f in &i.findings {
        println!("  {f}");
    }
}

fn print_report(r: &ResourceReport) {
    println!(
        "resource {} ({}, server name {}, {})",
        r.resource, r.upstream, r.server_name, r.tls_mode
    );
    if let Some(t) = &r.tls {
        let trust = match t.chain_trusted {
            Some(true) => "chain trusted",
            Some(false) => "chain NOT trusted",
            None => "no CA configured",
        };
        let host = if t.hostname_matches {
            "hostname matches"
        } else {
            "hostname MISMATCH"
        };
        println!(
            "  tls:       {} {}, {trust}, {host}, certificate expires in {} days",
            t.version, t.cipher, t.leaf_days_left
        );
    }
    if !r.versions.is_empty() {
        let v: Vec<String> = r
            .versions
            .iter()
            .map(|v| {
                let a = match v.accepted {
                    Some(true) => "accepted",
                    Some(false) => "refused",
                    None => "unknown",
                };
                format!("{} {a}", v.version)
            })
            .collect();
        println!("  versions:  {}", v.join(", "));
    }
    match r.plaintext_accepted {
        Some(true) => println!("  plaintext: ACCEPTED"),
        Some(false) => println!("  plaintext: refused"),
        None => {}
    }
    if let Some(s) = &r.sessions {
        println!(
            "  sessions:  {} other on the database, {} through the gateway{}",
            s.total,
            s.through_gateway,
            if s.gateway_known {
                ""
            } else {
                " (gateway not reachable to confirm)"
            }
        );
    }
    for f in &r.findings {
        println!("  {f}");
    }
}
