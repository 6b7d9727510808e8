//! The running gateway: binds the listeners named in config, wires the protocol adapters to the
//! store and TLS material, reloads certificates without dropping connections, and serves
//! `/healthz`, `/readyz` and `/metrics` on the admin listener.
//!
//! It owns process-level concerns (sockets, signals, lifecycle); it must not parse a wire
//! protocol or decide policy itself.

mod admin;
pub mod audit_task;
pub mod replica_task;
mod scan_task;

use anyhow::{bail, Context};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tollgate_config::{ClientCertPolicy, Config, ResourceKind};
use tollgate_metrics::registry;
use tollgate_pg::PgGateway;
use tollgate_store::{Recorder, RecorderOptions, Store};
use tollgate_tls::{ClientAuth, ListenerTlsSpec, ReloadStatus, ReloadableServerTls};

/// Addresses the gateway actually bound (useful when config asked for port 0).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub postgres: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub mysql: Option<SocketAddr>,
}

/// Refuse configurations this build cannot enforce: a guardrail or mask that silently does
/// nothing is worse than an error.
/// The issuing CA of `POST /api/v1/certificates` (`server.issuing_ca_cert`/`_key`), checked at
/// start-up: it must be `server.client_ca` or signed by it, or the gateway would refuse the
/// certificates it issues.
fn issuing_ca(config: &Config) -> anyhow::Result<Option<Arc<tollgate_tls::pki::IssuingCa>>> {
    let (Some(cert), Some(key)) = (
        &config.server.issuing_ca_cert,
        &config.server.issuing_ca_key,
    ) else {
        return Ok(None);
    };
    let ca = tollgate_tls::pki::IssuingCa::load(cert, key)
        .context("loading server.issuing_ca_cert/issuing_ca_key")?;
    let client_ca = config
        .server
        .client_ca
        .as_ref()
        .context("server.issuing_ca_cert needs server.client_ca")?;
    ca.check_chains_to(client_ca)
        .map_err(|e| anyhow::anyhow!("server.issuing_ca_cert: {e}; use the client CA (tollgate pki init) or an intermediate it signed"))?;
    Ok(Some(Arc::new(ca)))
}

pub fn ensure_supported(config: &Config) -> anyhow::Result<()> {
    for r in &config.resources {
        if !matches!(
            r.kind,
            ResourceKind::Postgres | ResourceKind::Http | ResourceKind::Mcp | ResourceKind::Mysql
        ) {
            bail!("{}:{}: resource {:?}: kind \"{}\" is not supported by this build yet; \"postgres\", \"mysql\", \"http\" and \"mcp\" resources can be served", config.path.display(), r.line, r.name, r.kind);
        }
        if r.kind == ResourceKind::Mysql && config.server.mysql_listen.is_none() {
            bail!("{}:{}: resource {:?}: mysql resources are served on server.mysql_listen; set it (e.g. \"127.0.0.1:3307\")", config.path.display(), r.line, r.name);
        }
        if matches!(r.kind, ResourceKind::Http | ResourceKind::Mcp)
            && config.server.https_listen.is_none()
            && config.server.http_listen.is_none()
        {
            bail!("{}:{}: resource {:?}: {} resources are served on server.https_listen (under /r/{}/) or server.http_listen; set one of them", config.path.display(), r.line, r.name, r.kind, r.name);
        }
    }
    if config.server.postgres_listen.is_none() {
        bail!(
            "{}: server.postgres_listen is required (PostgreSQL clients connect there)",
            config.path.display()
        );
    }
    Ok(())
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Run the gateway until `shutdown` resolves. `on_bound` is called once every listener is up.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    ensure_supported(&config)?;
    let store: Arc<dyn Store> = tollgate_store::open_store(&config.server.store)
        .with_context(|| format!("opening store {}", config.server.store))?;
    let chain_id = format!("gw-{}", random_hex(8));
    let journal = journal_path(&config, &chain_id);
    let recorder = Recorder::start(
        store.clone(),
        chain_id.clone(),
        RecorderOptions {
            journal: journal.clone(),
            stall_limit: config.server.audit_timeout,
            durability: match config.server.audit_durability {
                tollgate_config::AuditDurability::Written => tollgate_store::Durability::Written,
                tollgate_config::AuditDurability::Fsync => tollgate_store::Durability::Fsync,
                tollgate_config::AuditDurability::Store => tollgate_store::Durability::Store,
            },
        },
    )
    .with_context(|| format!("opening the audit journal {}", journal.display()))?;
    tracing::info!(store = %config.server.store, journal = %journal.display(), chain = %chain_id, durability = config.server.audit_durability.as_str(), "audit store open");
    if !config.server.record_commands {
        tracing::warn!("server.record_commands = false: COMMANDS AND RESULTS ARE NOT RECORDED in the audit trail (only session open/close); this is a benchmark baseline, not a deployment; `tollgate check` fails this config");
    }
    // Checkpoints, retention and the periodic scan: once per cluster on a shared store.
    let leader = replica_task::Leadership::of(&*store);
    let mut audit_tasks = vec![tokio::spawn(audit_task::checkpoint_loop(
        store.clone(),
        recorder.clone(),
        chain_id.clone(),
        config.server.checkpoint_interval,
        leader.clone(),
    ))];
    if let Some(retention) = config.server.retention {
        audit_tasks.push(tokio::spawn(audit_task::prune_loop(
            store.clone(),
            retention,
            leader.clone(),
        )));
    }

    // The review (approval) workflow, shared by the HTTPS API and the protocol adapters.
    let reviews = Arc::new(
        tollgate_review::Reviews::from_config(&config, store.clone(), recorder.clone())
            .map_err(anyhow::Error::msg)
            .context("review notifications")?,
    );
    reviews.follow_store_changes();

    let client_auth = match (&config.server.client_ca, config.server.client_cert) {
        (None, _) => ClientAuth::None,
        (Some(_), ClientCertPolicy::Optional) => ClientAuth::Optional,
        (Some(_), ClientCertPolicy::Required) => ClientAuth::Required,
    };
    let pg_tls = Arc::new(
        ReloadableServerTls::load(ListenerTlsSpec {
            cert: config.server.tls_cert.clone(),
            key: config.server.tls_key.clone(),
            client_ca: config.server.client_ca.clone(),
            client_auth,
            alpn: vec![b"postgresql".to_vec()],
            client_crls: config.server.client_crl.clone(),
        })
        .context("loading the gateway's TLS material")?,
    );

    let targets = tollgate_pg::compile_targets(&config)?;

    // OIDC issuers, shared by every listener; their keys are fetched in the background so an
    // IdP that is down does not hold up start-up (its tokens are refused until it answers).
    let oidc = Arc::new(
        tollgate_identity::oidc::OidcVerifiers::new(&config.identity.oidc)
            .map_err(anyhow::Error::msg)?,
    );
    oidc.warm_up();
    // The SAML IdP's metadata is read (or fetched) now: without its signing certificate no
    // assertion could be verified, so a bad one stops start-up with the reason.
    let saml = match &config.identity.saml {
        Some(c) => Some(Arc::new(
            tollgate_identity::saml::SamlSp::load(c)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("{}:{}: identity.saml: {e}", config.path.display(), c.line)
                })?,
        )),
        None => None,
    };

    let refusals = Arc::new(tollgate_store::refused::Refusals::new(
        "postgres",
        format!("{chain_id}-refused"),
    ));
    audit_tasks.push(tokio::spawn(
        refusals
            .clone()
            .summary_loop(recorder.clone(), REFUSED_SUMMARY_INTERVAL),
    ));
    let issuing = issuing_ca(&config)?;
    // Several replicas: this one's cancel keys carry a tag the others can route by.
    let cancel_tag = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || replica_task::pick_cancel_tag(&*s)).await?
    };
    let gw = Arc::new(PgGateway {
        tls: pg_tls.clone(),
        targets: arc_swap::ArcSwap::from_pointee(targets),
        tokens: arc_swap::ArcSwap::from_pointee(tollgate_pg::TokenSet::new(
            &config.identity.tokens,
        )),
        oidc: oidc.clone(),
        standing: tokio::sync::watch::Sender::new(0),
        grant_recheck: GRANT_RECHECK_INTERVAL,
        limits: tollgate_pg::limits::ConnectionLimits::new(
            config.server.max_connections,
            config.server.max_connections_per_source,
            config.server.max_connections_per_identity,
        ),
        refusals,
        recorder: recorder.clone(),
        cancels: Default::default(),
        cancel_peers: cancel_tag.map(|_| tollgate_pg::CancelPeers {
            store: store.clone(),
            replica_id: chain_id.clone(),
            issuing: issuing.clone(),
            server_ca: config
                .server
                .replica_ca
                .clone()
                .or_else(|| config.server.client_ca.clone()),
        }),
        max_message: config.server.max_message_bytes,
        handshake_timeout: config.server.handshake_timeout,
        audit_fail_closed: config.server.audit_failure == tollgate_config::AuditFailure::Closed,
        audit_timeout: config.server.audit_timeout,
        record_commands: config.server.record_commands,
        upstreams: Default::default(),
        pools: Default::default(),
        reviews: Some(reviews.clone()),
        review_rerun_window: config.server.review_rerun_window,
    });
    if let Some(tag) = cancel_tag {
        gw.cancels.set_replica_tag(tag);
    }
    if !gw.audit_fail_closed {
        tracing::warn!("server.audit_failure = \"open\": commands are forwarded without waiting for their audit events; `tollgate check` fails this config");
    }

    let mut bound = Bound::default();
    let pg_addr = config
        .server
        .postgres_listen
        .expect("checked by ensure_supported");
    let pg_listener = TcpListener::bind(pg_addr)
        .await
        .with_context(|| format!("binding server.postgres_listen {pg_addr}"))?;
    bound.postgres = Some(pg_listener.local_addr()?);

    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = Arc::new(admin::AdminState {
        store: store.clone(),
        recorder: recorder.clone(),
        ready: ready.clone(),
        tls: pg_tls.clone(),
        upstreams: gw.upstreams.clone(),
    });
    let admin_task = match config.server.admin_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding server.admin_listen {addr}"))?;
            bound.admin = Some(l.local_addr()?);
            Some(tokio::spawn(admin::serve(l, admin_state)))
        }
        None => None,
    };

    // HTTP resources: under /r/<name>/ on https_listen, and by host name on http_listen.
    let http_gw = tollgate_http::HttpGateway::new(
        &config,
        reviews.clone(),
        recorder.clone(),
        tollgate_pg::load_mask_key(&config.server.mask_key).map_err(anyhow::Error::msg)?,
        oidc.clone(),
    )?;
    let mut http_tasks = Vec::new();
    if let Some(addr) = config.server.http_listen {
        let gw = &http_gw;
        let http_tls =
            Arc::new(https_tls(&config).context("loading the TLS material of server.http_listen")?);
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding server.http_listen {addr}"))?;
        bound.http = Some(l.local_addr()?);
        http_tasks.push(tokio::spawn(tollgate_http::serve(
            l,
            http_tls.clone(),
            gw.clone(),
            listener_limits(&config),
        )));
        http_tasks.push(tokio::spawn(reload_loop(
            http_tls,
            config.server.reload_interval,
            "http",
            None,
        )));
    }

    // The HTTPS API: client certificates are optional there (a token is the alternative).
    let mut api_tasks = Vec::new();
    let mut api_state = None;
    if let Some(addr) = config.server.https_listen {
        let api_tls = Arc::new(
            https_tls(&config).context("loading the TLS material of server.https_listen")?,
        );
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding server.https_listen {addr}"))?;
        bound.https = Some(l.local_addr()?);
        let state = tollgate_api::ApiState::new(
            &config,
            store.clone(),
            recorder.clone(),
            api_tls.clone(),
            reviews.clone(),
        );
        let mut state = state;
        let api_refusals = Arc::new(tollgate_store::refused::Refusals::new(
            "https",
            format!("{chain_id}-refused-https"),
        ));
        api_tasks.push(tokio::spawn(
            api_refusals
                .clone()
                .summary_loop(recorder.clone(), REFUSED_SUMMARY_INTERVAL),
        ));
        state.refusals = Some(api_refusals);
        state.http = Some(http_gw.clone());
        state.limits = listener_limits(&config);
        state.oidc = oidc.clone();
        state.saml = arc_swap::ArcSwapOption::new(saml.clone());
        state.issuing = issuing.clone();
        let state = Arc::new(state);
        api_state = Some(state.clone());
        api_tasks.push(tokio::spawn(tollgate_api::serve(l, state)));
        api_tasks.push(tokio::spawn(reload_loop(
            api_tls,
            config.server.reload_interval,
            "https",
            None,
        )));
    }

    publish_cert_gauges(&pg_tls);
    let reload_task = tokio::spawn(reload_loop(
        pg_tls.clone(),
        config.server.reload_interval,
        "postgres",
        Some(gw.clone()),
    ));
    // The console's /resources shows what the periodic scan found last.
    let latest_scan = api_state.as_ref().map(|s| s.latest_scan.clone());
    // MySQL resources: compiled and bound now, so that config reloads include them.
    let (mysql_gw, mysql_listener) = match config.server.mysql_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding server.mysql_listen {addr}"))?;
            bound.mysql = Some(l.local_addr()?);
            let mysql_refusals = Arc::new(tollgate_store::refused::Refusals::new(
                "mysql",
                format!("{chain_id}-refused-mysql"),
            ));
            audit_tasks.push(tokio::spawn(
                mysql_refusals
                    .clone()
                    .summary_loop(recorder.clone(), REFUSED_SUMMARY_INTERVAL),
            ));
            let mysql_gw = Arc::new(tollgate_mysql::MysqlGateway {
                tls: pg_tls.clone(),
                targets: arc_swap::ArcSwap::from_pointee(tollgate_mysql::compile_targets(&config)?),
                tokens: arc_swap::ArcSwap::from_pointee(tollgate_identity::TokenVerifier::new(
                    &config.identity.tokens,
                )),
                oidc: oidc.clone(),
                // The PostgreSQL listener's reloads (tokens, revocation lists) tell MySQL
                // sessions too: it shares the certificate.
                standing: gw.standing.subscribe(),
                grant_recheck: GRANT_RECHECK_INTERVAL,
                limits: gw.limits.clone(),
                refusals: mysql_refusals,
                recorder: recorder.clone(),
                reviews: Some(reviews.clone()),
                review_rerun_window: config.server.review_rerun_window,
                max_message: config.server.max_message_bytes,
                handshake_timeout: config.server.handshake_timeout,
                audit_fail_closed: gw.audit_fail_closed,
                audit_timeout: config.server.audit_timeout,
                record_commands: config.server.record_commands,
                upstreams: gw.upstreams.clone(),
                threads: Default::default(),
                announced: Default::default(),
            });
            (Some(mysql_gw), Some(l))
        }
        None => (None, None),
    };

    let config_reload_task = tokio::spawn(config_reload_loop(
        // OIDC issuers first: PostgreSQL's apply makes running sessions re-check their
        // standing, which includes their token's issuer still being configured.
        // MySQL before PostgreSQL, whose apply tells MySQL sessions too.
        [("oidc", oidc.clone() as Arc<dyn ConfigReload>)]
            .into_iter()
            .chain(
                mysql_gw
                    .clone()
                    .map(|m| ("mysql", m as Arc<dyn ConfigReload>)),
            )
            .chain([
                ("postgres", gw.clone() as Arc<dyn ConfigReload>),
                ("http", http_gw.clone() as Arc<dyn ConfigReload>),
            ])
            .collect(),
        reviews.clone(),
        api_state,
        recorder.clone(),
        config.clone(),
    ));

    // The periodic live scan (tollgate scan) with this gateway's own connection registry.
    let scan_task = match config.server.scan_interval {
        Some(every) => {
            let webhook = match &config.server.alert_webhook {
                Some(url) => Some(
                    tollgate_scan::alert::Webhook::start(
                        url,
                        config.server.alert_webhook_ca.as_deref(),
                    )
                    .map_err(anyhow::Error::msg)
                    .context("server.alert_webhook")?,
                ),
                None => None,
            };
            Some(tokio::spawn(scan_task::run(
                config.clone(),
                every,
                gw.upstreams.clone(),
                recorder.clone(),
                webhook,
                latest_scan,
                leader.clone(),
                Some((store.clone(), chain_id.clone())),
            )))
        }
        None => None,
    };

    let mysql_task = match (mysql_gw, mysql_listener) {
        (Some(m), Some(l)) => Some(tokio::spawn(m.serve(l))),
        _ => None,
    };

    let accept_gw = gw.clone();
    let accept_task = tokio::spawn(async move {
        loop {
            match pg_listener.accept().await {
                Ok((tcp, peer)) => {
                    tokio::spawn(accept_gw.clone().handle(tcp, peer));
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed on the postgres listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    // The replica registry (a shared store): this replica's id is its chain's.
    audit_tasks.push(tokio::spawn(replica_task::heartbeat_loop(
        store.clone(),
        replica_task::record(
            &chain_id,
            bound.postgres.expect("bound above"),
            bound.admin,
            cancel_tag,
        ),
    )));

    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        postgres = ?bound.postgres,
        admin = ?bound.admin,
        https = ?bound.https,
        mysql = ?bound.mysql,
        "tollgate is serving"
    );
    on_bound(&bound);

    shutdown.await;
    tracing::info!("shutting down: no new connections; flushing the audit trail");
    ready.store(false, Ordering::SeqCst);
    accept_task.abort();
    if let Some(t) = &mysql_task {
        t.abort();
    }
    reload_task.abort();
    config_reload_task.abort();
    if let Some(t) = &scan_task {
        t.abort();
    }
    for t in api_tasks.iter().chain(&audit_tasks).chain(&http_tasks) {
        t.abort();
    }
    if let Some(t) = admin_task {
        t.abort();
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(10), recorder.flush())
        .await
        .unwrap_or(Err(tollgate_store::StoreError::Unavailable(
            "timed out".into(),
        )))
    {
        tracing::error!(error = %e, "audit events are not all in the store yet; they stay in the journal and are imported at the next start");
    }
    tokio::task::block_in_place(|| {
        replica_task::deregister(&*store, &chain_id);
        recorder.shutdown()
    });
    Ok(())
}

/// The audit journal sits next to an SQLite store (`<db>.events.log`).
/// The TLS material of an HTTPS listener (HTTP/2 and HTTP/1.1; client certificates optional:
/// a token is the alternative).
fn https_tls(config: &Config) -> Result<ReloadableServerTls, tollgate_tls::TlsError> {
    ReloadableServerTls::load(ListenerTlsSpec {
        cert: config.server.tls_cert.clone(),
        key: config.server.tls_key.clone(),
        client_ca: config.server.client_ca.clone(),
        client_auth: match config.server.client_ca {
            Some(_) => ClientAuth::Optional,
            None => ClientAuth::None,
        },
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        client_crls: config.server.client_crl.clone(),
    })
}

/// `server.max_connections` and `max_connections_per_source` for an HTTPS listener (its own
/// count; identities are per request there, so the per-identity cap is PostgreSQL's).
fn listener_limits(config: &Config) -> Arc<tollgate_gate::limits::ConnectionLimits> {
    tollgate_gate::limits::ConnectionLimits::new(
        config.server.max_connections,
        config.server.max_connections_per_source,
        0,
    )
}

fn journal_path(config: &Config, chain_id: &str) -> std::path::PathBuf {
    let store_url = config.server.store.as_str();
    match store_url.strip_prefix("sqlite://") {
        Some(p) if !p.starts_with(':') => std::path::PathBuf::from(format!("{p}.events.log")),
        // A shared store: the replica's journal lives beside its config, so that a restart
        // imports what a crash left (one replica per config directory: the journal is locked).
        _ if tollgate_store::PgStoreUrl::is_postgres(store_url)
            && config.path.parent().is_some() =>
        {
            config.path.with_extension("events.log")
        }
        _ => std::env::temp_dir().join(format!("tollgate-{chain_id}.events.log")),
    }
}

fn publish_cert_gauges(tls: &ReloadableServerTls) {
    let help = "Expiry (unix seconds) of the gateway's own certificates.";
    registry()
        .gauge(
            "tollgate_cert_expiry_timestamp_seconds",
            help,
            &[("cert", "gateway")],
        )
        .set(unix_secs(tls.cert_not_after()));
    if let Some(ca) = tls.client_ca_not_after() {
        registry()
            .gauge(
                "tollgate_cert_expiry_timestamp_seconds",
                help,
                &[("cert", "client_ca")],
            )
            .set(unix_secs(ca));
    }
}

/// How often the aggregate of refused connections is recorded (one event per reason seen).
const REFUSED_SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// How often a session that depends on a grant re-reads it from the store.
const GRANT_RECHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A protocol adapter whose per-resource policy follows the config file. `prepare` compiles
/// the adapter's part of a new config completely and swaps nothing; the returned closure swaps
/// it in and describes what changed (resource names, never values). The reload loop prepares
/// every adapter before it applies any, so a config one adapter rejects changes none.
pub trait ConfigReload: Send + Sync {
    fn prepare<'a>(&'a self, config: &Config) -> Result<ApplyReload<'a>, String>;
}

/// Swaps a prepared config into one adapter; returns what changed there.
pub type ApplyReload<'a> = Box<dyn FnOnce() -> serde_json::Value + Send + 'a>;

impl ConfigReload for tollgate_http::HttpGateway {
    fn prepare<'a>(&'a self, config: &Config) -> Result<ApplyReload<'a>, String> {
        let prepared = self.prepare_reload(config).map_err(|e| e.to_string())?;
        Ok(Box::new(
            move || serde_json::json!({"resources": prepared.apply()}),
        ))
    }
}

/// OIDC issuers: a CA file that cannot be read rejects the reload; an issuer whose settings
/// did not change keeps its cached keys; a new one fetches its keys in the background.
impl ConfigReload for tollgate_identity::oidc::OidcVerifiers {
    fn prepare<'a>(&'a self, config: &Config) -> Result<ApplyReload<'a>, String> {
        let prepared = self.prepare(&config.identity.oidc)?;
        let issuers: Vec<String> = config
            .identity
            .oidc
            .iter()
            .map(|o| o.issuer.clone())
            .collect();
        Ok(Box::new(move || {
            self.apply(prepared);
            self.warm_up();
            serde_json::json!({ "issuers": issuers })
        }))
    }
}

impl ConfigReload for tollgate_mysql::MysqlGateway {
    fn prepare<'a>(&'a self, config: &Config) -> Result<ApplyReload<'a>, String> {
        let prepared = self.prepare_reload(config).map_err(|e| e.to_string())?;
        Ok(Box::new(move || prepared.apply()))
    }
}

impl ConfigReload for PgGateway {
    fn prepare<'a>(&'a self, config: &Config) -> Result<ApplyReload<'a>, String> {
        let prepared = self.prepare_reload(config).map_err(|e| e.to_string())?;
        Ok(Box::new(move || prepared.apply().to_json()))
    }
}

/// Event kind of a config reload attempt (in the review workflow's gateway-level audit session).
pub const KIND_CONFIG_RELOAD: &str = "config.reload";

/// Settings read only at start-up: a reload that changes them says a restart is needed.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    [
        (
            "server.postgres_listen",
            o.postgres_listen != n.postgres_listen,
        ),
        ("server.https_listen", o.https_listen != n.https_listen),
        ("server.http_listen", o.http_listen != n.http_listen),
        ("server.mysql_listen", o.mysql_listen != n.mysql_listen),
        ("server.admin_listen", o.admin_listen != n.admin_listen),
        ("server.tls_cert", o.tls_cert != n.tls_cert),
        ("server.tls_key", o.tls_key != n.tls_key),
        ("server.client_ca", o.client_ca != n.client_ca),
        ("server.store", o.store != n.store),
        (
            "server.issuing_ca_cert",
            o.issuing_ca_cert != n.issuing_ca_cert,
        ),
        (
            "server.issuing_ca_key",
            o.issuing_ca_key != n.issuing_ca_key,
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| name)
    .collect()
}

/// Resources added, removed and changed between two configs, by name (any kind).
fn resource_changes(old: &Config, new: &Config) -> serde_json::Value {
    // Compared by their settings, not by where they sit in the file; never shown.
    let settings = |c: &Config| -> HashMap<String, String> {
        c.resources
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.line = 0;
                (r.name.clone(), format!("{r:?}"))
            })
            .collect()
    };
    let (o, n) = (settings(old), settings(new));
    let names = |f: &dyn Fn(&String) -> bool, from: &HashMap<String, String>| {
        let mut v: Vec<&String> = from.keys().filter(|k| f(k)).collect();
        v.sort();
        serde_json::json!(v)
    };
    serde_json::json!({
        "added": names(&|k| !o.contains_key(k), &n),
        "removed": names(&|k| !n.contains_key(k), &o),
        "changed": names(&|k| o.get(k).is_some_and(|v| *v != n[k]), &n),
    })
}

/// A config error for the audit trail: its location and message, without the quoted source
/// lines a TOML parse error carries (they could hold a value that must not be recorded).
fn error_for_audit(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.split_once('|').is_some_and(|(n, _)| {
                    let n = n.trim();
                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                })
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Re-read the config file on change or SIGHUP. The whole file must validate (parse, and every
/// adapter compiles each resource's rules and masks as start-up does) before anything is
/// swapped; then each adapter's resources (rules, masks, read-only, limits), the review settings
/// and the service tokens are swapped at once. New connections use the new config; a running
/// session keeps its resource's policy as it was when it opened (it re-checks its token).
/// Listener addresses, TLS paths and the store are read at start-up only: changing them logs a
/// warning that a restart is needed, and the rest still applies. A bad file is logged with its
/// location and the previous config stays in force. Every attempt is a `config.reload` event
/// with the file's SHA-256 and what changed, and counts in `tollgate_config_reloads_total`.
async fn config_reload_loop(
    adapters: Vec<(&'static str, Arc<dyn ConfigReload>)>,
    reviews: Arc<tollgate_review::Reviews>,
    api: Option<Arc<tollgate_api::ApiState>>,
    recorder: Recorder,
    mut running: Config,
) {
    let path = running.path.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(running.server.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_text = std::fs::read(&path).ok();
    let mut last_error: Option<String> = None;
    let record = |payload: serde_json::Value| {
        recorder.record(tollgate_store::EventInput {
            session_id: reviews.audit_session().to_string(),
            kind: KIND_CONFIG_RELOAD.into(),
            at: SystemTime::now(),
            payload,
        })
    };
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending::<()>().await } } => true,
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", path.display());
                if forced || last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "config reload rejected; the previous config stays in force");
                    record(
                        serde_json::json!({"outcome": "failure", "path": path.display().to_string(), "forced": forced, "error": msg}),
                    );
                    count_reload("failure");
                    last_error = Some(msg);
                }
                continue;
            }
        };
        if !forced && last_text.as_deref() == Some(text.as_slice()) {
            continue;
        }
        let sha256 = hex_digest(&text);
        let loaded = std::str::from_utf8(&text)
            .map_err(|_| format!("{}: the file is not UTF-8", path.display()))
            .and_then(|t| tollgate_config::parse(t, &path).map_err(|e| e.to_string()))
            .and_then(|c| ensure_supported(&c).map(|()| c).map_err(|e| e.to_string()));
        // Every adapter compiles its part before any swaps.
        let prepared = loaded.and_then(|c| {
            let applies = adapters
                .iter()
                .map(|(name, a)| a.prepare(&c).map(|apply| (*name, apply)))
                .collect::<Result<Vec<_>, String>>()?;
            Ok((c, applies))
        });
        let (c, applies) = match prepared {
            Ok(p) => p,
            Err(msg) => {
                // A file caught mid-write is retried at the next poll before it is reported.
                let repeated = last_error.as_deref() == Some(msg.as_str());
                if !forced && !repeated {
                    last_error = Some(msg);
                    continue;
                }
                tracing::error!(error = %msg, sha256 = %sha256, "config reload rejected; the previous config stays in force");
                record(
                    serde_json::json!({"outcome": "failure", "path": path.display().to_string(),
                    "sha256": sha256, "forced": forced, "error": error_for_audit(&msg)}),
                );
                count_reload("failure");
                last_text = Some(text);
                continue;
            }
        };
        let mut adapters_changed = serde_json::Map::new();
        for (name, apply) in applies {
            adapters_changed.insert(name.to_string(), apply());
        }
        reviews.reload_resources(&c);
        if let Some(api) = &api {
            api.tokens
                .store(Arc::new(tollgate_identity::TokenVerifier::new(
                    &c.identity.tokens,
                )));
            api.config.store(Arc::new(c.clone()));
        }
        let restart = restart_required(&running, &c);
        if !restart.is_empty() {
            tracing::warn!(settings = ?restart, "config reloaded, but these settings are read at start-up only: restart tollgate to apply them");
        }
        let resources = resource_changes(&running, &c);
        tracing::info!(forced, sha256 = %sha256, resources = %resources, "config reloaded: new connections use the new resources, rules and masks; running sessions keep theirs");
        record(
            serde_json::json!({"outcome": "success", "path": path.display().to_string(),
            "sha256": sha256, "forced": forced, "resources": resources,
            "adapters": adapters_changed, "restart_required": restart,
            "tokens": c.identity.tokens.len()}),
        );
        count_reload("success");
        running = c;
        last_text = Some(text);
        last_error = None;
    }
}

fn count_reload(outcome: &'static str) {
    registry()
        .counter(
            "tollgate_config_reloads_total",
            "Config file reloads by outcome.",
            &[("outcome", outcome)],
        )
        .inc();
}

fn hex_digest(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Poll the certificate files and reload on change or SIGHUP. A bad file is logged and counted;
/// the previous material keeps serving.
/// `sessions`: the gateway whose running sessions re-check their certificates after a reload
/// (a new revocation list can revoke one).
async fn reload_loop(
    tls: Arc<ReloadableServerTls>,
    every: Duration,
    listener: &'static str,
    sessions: Option<Arc<PgGateway>>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last error reported, and one seen once but not yet reported: certificate and key are
    // usually replaced by two renames, and a poll between them must not raise a false alarm.
    let mut last_error: Option<String> = None;
    let mut unconfirmed: Option<String> = None;
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending::<()>().await } } => true,
        };
        let result = if forced {
            tls.reload().map(|_| ReloadStatus::Reloaded)
        } else {
            tls.reload_if_changed()
        };
        let outcome = match &result {
            Ok(ReloadStatus::Unchanged) => {
                unconfirmed = None;
                None
            }
            Ok(ReloadStatus::Reloaded) => {
                tracing::info!(forced, "gateway TLS material reloaded");
                last_error = None;
                unconfirmed = None;
                publish_cert_gauges(&tls);
                if let Some(gw) = &sessions {
                    gw.standing_changed();
                }
                Some("success")
            }
            Err(e) => {
                let msg = e.to_string();
                // A broken file is reported once per distinct error, not every poll, and only
                // once it persists across two polls (or on SIGHUP, which is deliberate).
                let confirmed = forced || unconfirmed.as_deref() == Some(msg.as_str());
                if !confirmed {
                    unconfirmed = Some(msg);
                    None
                } else if forced || last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "TLS reload rejected; still serving the previous certificate");
                    last_error = Some(msg);
                    Some("failure")
                } else {
                    None
                }
            }
        };
        if let Some(o) = outcome {
            registry()
                .counter(
                    "tollgate_tls_reloads_total",
                    "Certificate reloads by outcome.",
                    &[("listener", listener), ("outcome", o)],
                )
                .inc();
        }
    }
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
