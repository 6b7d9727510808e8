//! `tollgate`: the one binary. Thin: parses the command line and calls into the library crates.

mod access_cmd;
mod audit_cmd;
mod check_cmd;
mod demo;
mod demo_api;
mod login_cmd;
mod mcp_cmd;
mod reviews_cmd;
mod sessions_cmd;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tollgate_tls::pki;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An access gateway for databases and APIs: TLS on every leg, identity, credential injection, audit."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// One-command tour: dev PKI, a throwaway TLS PostgreSQL (and MariaDB when installed), a demo HTTPS and MCP API, and the gateway (with its web console) in front of them.
    Demo {
        /// Where the demo keeps its PKI, config, database and audit store.
        #[arg(long, default_value = "tollgate-demo")]
        dir: PathBuf,
    },
    /// The built-in private CA.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Lint a config for encryption and policy weaknesses (offline; exit 1 on any finding).
    Check {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Certificates expiring within this many days are findings.
        #[arg(long, default_value_t = 14)]
        min_days: u64,
        #[arg(long)]
        json: bool,
    },
    /// Scan every upstream live: TLS, chain, hostname, expiry, versions, plaintext, bypass sessions.
    Scan {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Certificates expiring within this many days are findings.
        #[arg(long, default_value_t = 14)]
        min_days: u64,
        #[arg(long)]
        json: bool,
    },
    /// Audit trail integrity.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The store itself: move an embedded SQLite store to a shared PostgreSQL one.
    #[command(subcommand)]
    Store(audit_cmd::StoreCmd),
    /// Recorded sessions: list, show, replay, export (through the gateway's HTTPS API).
    #[command(subcommand)]
    Sessions(sessions_cmd::SessionsCmd),
    /// MCP resources: pin tool definitions before the first listing, show the pins.
    #[command(subcommand)]
    Mcp(mcp_cmd::McpCmd),
    /// The approval workflow: list, show, approve and deny reviews (through the HTTPS API).
    #[command(subcommand)]
    Reviews(reviews_cmd::ReviewsCmd),
    /// Just-in-time access: ask for access to a resource for a while, list and revoke grants.
    #[command(subcommand)]
    Access(reviews_cmd::AccessCmd),
    /// Get a short-lived client certificate: sign in with the gateway's OpenID provider, or
    /// swap a workload identity token (CI jobs, agents).
    ///
    /// Without --id-token-file/--id-token-env, a person signs in: in the browser
    /// (authorization code + PKCE, redirected to a listener on 127.0.0.1), or with --device
    /// (a URL and a code to enter on any device with a browser). Then it generates an ECDSA
    /// P-256 key locally (written 0600, never sent), sends a CSR with the ID token as
    /// `Authorization: Bearer` to POST /api/v1/certificates, and writes DIR/<subject>.crt
    /// (certificate and chain) and DIR/<subject>.key. The certificate carries the token's
    /// subject (CN) and groups (OU) and never outlives the token. Use it with psql
    /// (sslcert/sslkey, PGSSLCERT/PGSSLKEY) or the tollgate CLI (TOLLGATE_CERT/TOLLGATE_KEY).
    Login(login_cmd::LoginArgs),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256, key readable only by its owner).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "tollgate private CA")]
        name: String,
    },
    /// Issue a server or client certificate signed by the CA in DIR: writes PREFIX.crt and PREFIX.key.
    Issue(IssueArgs),
    /// Print subject, SANs, groups, validity and fingerprint of every certificate in a PEM file.
    Inspect { file: PathBuf },
    /// Revoke certificates issued by the CA in DIR: adds them to the CRL (default DIR/ca.crl,
    /// what server.client_crl reads; earlier revocations stay) and re-signs it. With no
    /// certificate, re-signs the CRL with a new validity.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        /// The CRL to update or create.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// How long the CRL is valid (its nextUpdate), e.g. 7d.
        #[arg(long, default_value = "7d")]
        valid_for: String,
        /// Certificates (PEM) to revoke.
        certs: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct IssueArgs {
    #[arg(long)]
    dir: PathBuf,
    /// A server certificate (needs --dns and/or --ip).
    #[arg(long, conflicts_with = "client", required_unless_present = "client")]
    server: bool,
    /// A short-lived client certificate (needs --name).
    #[arg(long)]
    client: bool,
    #[arg(long)]
    dns: Vec<String>,
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// Client subject (the certificate's CN).
    #[arg(long)]
    name: Option<String>,
    /// SPIFFE ID for the client (URI SAN), e.g. spiffe://example.org/agent/7.
    #[arg(long)]
    spiffe: Option<String>,
    /// Group membership, carried as an OU attribute (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Lifetime, e.g. 30m, 12h, 90d. Defaults: 12h for clients, 90d for servers.
    #[arg(long)]
    ttl: Option<String>,
    /// Output prefix: writes PREFIX.crt and PREFIX.key.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Walk the hash chains of the audit store and report the first broken or missing link.
    Verify {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Import a replica's audit journal into the store of --config (a crashed replica's, from
    /// another host); idempotent, the files are left as they are.
    Import {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// The journal: `<config file>.events.log` of a replica on a PostgreSQL store, or
        /// `<db>.events.log` beside a SQLite store; its sealed segments (`PATH.<seq>`) come along.
        #[arg(long)]
        journal: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete sessions that ended before now - server.retention, with their events, re-anchoring
    /// each hash chain and recording an audit.pruned event (the gateway also does this periodically).
    Prune {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Report what would be pruned without changing anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve { config } => serve(&config),
        Cmd::Demo { dir } => demo::run(&dir),
        Cmd::Pki(cmd) => pki_cmd(cmd),
        Cmd::Sessions(cmd) => sessions_cmd::run(cmd),
        Cmd::Reviews(cmd) => reviews_cmd::run(cmd),
        Cmd::Mcp(cmd) => mcp_cmd::run(cmd),
        Cmd::Access(cmd) => reviews_cmd::run_access(cmd),
        Cmd::Login(args) => login_cmd::run(args),
        Cmd::Audit(AuditCmd::Verify { config, json }) => return audit_verify(&config, json),
        Cmd::Store(cmd) => return audit_cmd::store(cmd),
        Cmd::Audit(AuditCmd::Import {
            config,
            journal,
            json,
        }) => return audit_cmd::import(&config, &journal, json),
        Cmd::Audit(AuditCmd::Prune {
            config,
            dry_run,
            json,
        }) => return audit_cmd::prune(&config, dry_run, json),
        Cmd::Check {
            config,
            min_days,
            json,
        } => return check_cmd::check(&config, min_days, json),
        Cmd::Scan {
            config,
            min_days,
            json,
        } => return check_cmd::scan(&config, min_days, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn serve(config: &Path) -> anyhow::Result<()> {
    let config = tollgate_config::load(config)?;
    runtime()?.block_on(tollgate_server::run(config, shutdown_signal(), |_| {}))
}

fn pki_cmd(cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init { dir, name } => {
            let f = pki::init_ca(&dir, &name)?;
            println!(
                "CA certificate: {}\nCA key:         {} (keep it private)",
                f.cert.display(),
                f.key.display()
            );
        }
        PkiCmd::Issue(a) => {
            let ttl = a.ttl.as_deref().map(pki::parse_ttl).transpose()?;
            let files = if a.server {
                if a.dns.is_empty() && a.ip.is_empty() {
                    bail!("a server certificate needs at least one --dns NAME or --ip ADDR");
                }
                pki::issue_server(
                    &a.dir,
                    &pki::ServerCertSpec {
                        dns: a.dns,
                        ips: a.ip,
                        ttl: ttl.unwrap_or(pki::DEFAULT_SERVER_TTL),
                        not_before: None,
                    },
                    &a.out,
                )?
            } else {
                let name = a
                    .name
                    .context("a client certificate needs --name SUBJECT")?;
                pki::issue_client(
                    &a.dir,
                    &pki::ClientCertSpec {
                        name,
                        spiffe: a.spiffe,
                        groups: a.groups,
                        ttl: ttl.unwrap_or(pki::DEFAULT_CLIENT_TTL),
                        not_before: None,
                    },
                    &a.out,
                )?
            };
            println!(
                "certificate: {}\nkey:         {}",
                files.cert.display(),
                files.key.display()
            );
            for s in pki::inspect(&files.cert)? {
                println!("{s}");
            }
        }
        PkiCmd::Inspect { file } => {
            for s in pki::inspect(&file)? {
                println!("{s}");
            }
        }
        PkiCmd::Revoke {
            dir,
            crl,
            valid_for,
            certs,
        } => {
            let crl = crl.unwrap_or_else(|| dir.join("ca.crl"));
            let certs: Vec<&Path> = certs.iter().map(PathBuf::as_path).collect();
            let n = pki::revoke(&dir, &certs, pki::parse_ttl(&valid_for)?, &crl)?;
            println!(
                "CRL: {} ({n} revoked certificate(s)); list it in server.client_crl, the gateway re-reads it",
                crl.display()
            );
        }
    }
    Ok(())
}

/// Exit 0 when every chain verifies, 1 when a link is broken, 2 when the check could not run.
fn audit_verify(config: &Path, json: bool) -> ExitCode {
    let report = tollgate_config::load(config)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(tollgate_store::open_store(&c.server.store)?))
        .and_then(|store| Ok(store.verify()?));
    match report {
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else if let Some(b) = &r.first_break {
                println!(
                    "BROKEN: chain {} at seq {} (event id {}, session {}): {}",
                    b.chain_id, b.chain_seq, b.event_id, b.session_id, b.reason
                );
            } else {
                println!(
                    "ok: {} events in {} chain(s) verified, {} checkpoint(s) match",
                    r.events, r.chains, r.checkpoints
                );
            }
            if r.first_break.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
