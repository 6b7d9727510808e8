//! `tollgate scan`: the live check of every upstream. Each PostgreSQL resource gets, in order:
//! the session listing (first, so the scan's own probes are not in it), a TLS handshake (after
//! the SSLRequest) whose chain is verified separately (so a bad chain is described, not just
//! refused), TLS 1.2/1.3 probes, raw TLS 1.0/1.1 ClientHellos, and a plaintext start-up that
//! never sends a password. An HTTP resource gets the same TLS checks on a direct handshake
//! (ALPN `http/1.1`, as the gateway connects) and a plaintext `HEAD /` on the same port; an
//! `http://` upstream is a finding of its own and is not TLS-probed. A MySQL resource gets the
//! PostgreSQL checks through MySQL's handshake: sessions from `information_schema.PROCESSLIST`,
//! TLS after the SSL request, and a plaintext login that never sends a password.

use crate::probe::{classify_reply, legacy_client_hello, HelloReply, Legacy};
use crate::{days_until, rfc3339, Finding, Severity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_config::{Config, Resource, ResourceKind};
use tollgate_pg::io::{read_frame, FrameBuf};
use tollgate_pg::proto::{backend, frontend, startup};
use tollgate_pg::{UpstreamConn, UpstreamRegistry, UpstreamTarget};

/// The application_name of the scanner's own upstream sessions.
pub const SCAN_APPLICATION_NAME: &str = "tollgate-scan";

const SESSIONS_SQL: &str =
    "SELECT pid, client_addr, client_port, usename, application_name, backend_start \
     FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' \
     AND pid <> pg_backend_pid()";

/// Where the scan learns which upstream connections are the gateway's own.
#[derive(Clone)]
pub enum GatewaySource {
    /// Inside the gateway: its live registry.
    Local(UpstreamRegistry),
    /// The running gateway's admin listener (`GET /upstreams`).
    Admin(SocketAddr),
    /// Inside one replica of several on a shared store: its live registry and the admin
    /// listeners of the other replicas (`GET /upstreams`); the connections of them all.
    Cluster {
        local: UpstreamRegistry,
        peers: Vec<SocketAddr>,
    },
    /// Not known; every other session is reported as unverified, with this reason.
    Unavailable(String),
}

impl GatewaySource {
    async fn fetch(&self) -> Result<Vec<UpstreamConn>, String> {
        match self {
            GatewaySource::Local(r) => Ok(r.snapshot()),
            GatewaySource::Unavailable(why) => Err(why.clone()),
            GatewaySource::Admin(addr) => fetch_peer(*addr).await,
            GatewaySource::Cluster { local, peers } => {
                let mut all = local.snapshot();
                for peer in peers {
                    all.extend(fetch_peer(*peer).await?);
                }
                Ok(all)
            }
        }
    }
}

/// A gateway's upstream connections from its admin listener, within 5 s.
async fn fetch_peer(addr: SocketAddr) -> Result<Vec<UpstreamConn>, String> {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
    } else {
        addr
    };
    tokio::time::timeout(Duration::from_secs(5), fetch_admin(addr))
        .await
        .map_err(|_| format!("the gateway's admin listener {addr} did not answer within 5s"))?
        .map_err(|e| format!("the gateway's admin listener {addr} is not reachable: {e}"))
}

async fn fetch_admin(addr: SocketAddr) -> Result<Vec<UpstreamConn>, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET /upstreams HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "GET /upstreams answered {:?} (is it an older gateway?)",
            head.lines().next().unwrap_or("")
        ));
    }
    parse_upstreams(body)
}

/// Parse the admin listener's `/upstreams` JSON.
pub(crate) fn parse_upstreams(body: &str) -> Result<Vec<UpstreamConn>, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let arr = v.as_array().ok_or("expected a JSON array")?;
    arr.iter()
        .map(|e| {
            Ok(UpstreamConn {
                resource: e["resource"].as_str().unwrap_or_default().to_string(),
                upstream: e["upstream"].as_str().unwrap_or_default().to_string(),
                local_addr: e["local_addr"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or("entry without a valid local_addr")?,
                backend_pid: e["backend_pid"].as_i64().map(|p| p as i32),
            })
        })
        .collect()
}

/// How the live scan runs.
#[derive(Clone)]
pub struct ScanOptions {
    pub min_days: u64,
    pub gateway: GatewaySource,
    pub max_message: usize,
}

/// What the scan learnt about one resource, and its findings.
#[derive(Clone, Debug, Serialize)]
pub struct ResourceReport {
    pub resource: String,
    pub upstream: String,
    pub server_name: String,
    pub tls_mode: &'static str,
    pub tls: Option<TlsFacts>,
    pub versions: Vec<VersionFact>,
    /// Whether the upstream serves unencrypted clients: PostgreSQL, a plaintext start-up was
    /// answered with an authentication request; HTTP, a plaintext `HEAD /` got an HTTP answer.
    pub plaintext_accepted: Option<bool>,
    pub sessions: Option<SessionFacts>,
    pub findings: Vec<Finding>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TlsFacts {
    pub version: String,
    pub cipher: String,
    /// The application protocol the upstream chose (ALPN), if any.
    pub alpn: Option<String>,
    pub chain: Vec<CertFact>,
    /// Chains to `tls.ca` (None when the resource has no CA configured).
    pub chain_trusted: Option<bool>,
    pub hostname_matches: bool,
    pub leaf_not_after_unix: i64,
    pub leaf_days_left: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CertFact {
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    pub not_after: String,
    pub days_left: i64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VersionFact {
    pub version: &'static str,
    /// None when the probe could not tell.
    pub accepted: Option<bool>,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionFacts {
    /// Other client sessions on the resource's database (the scanner's own excluded).
    pub total: usize,
    pub through_gateway: usize,
    /// Whether the gateway's list of its own connections was available.
    pub gateway_known: bool,
    /// Sessions not matched to a gateway connection.
    pub other: Vec<SessionRow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionRow {
    pub pid: i32,
    pub client_addr: Option<String>,
    pub client_port: Option<i32>,
    pub usename: Option<String>,
    pub application_name: Option<String>,
    pub backend_start: Option<String>,
}

impl ResourceReport {
    /// Unix seconds at which the upstream's leaf certificate expires, if the handshake got that far.
    pub fn cert_not_after_unix(&self) -> Option<i64> {
        self.tls.as_ref().map(|t| t.leaf_not_after_unix)
    }
}

/// Scan every resource of `config`, one after another.
pub async fn scan(config: &Config, opts: &ScanOptions) -> Vec<ResourceReport> {
    let mut out = Vec::new();
    for r in &config.resources {
        out.push(scan_resource(r, opts).await);
    }
    out
}

/// Scan one resource; never fails, problems are findings.
pub async fn scan_resource(r: &Resource, opts: &ScanOptions) -> ResourceReport {
    let mut rep = ResourceReport {
        resource: r.name.clone(),
        upstream: r.upstream.clone(),
        server_name: r.tls.server_name.clone(),
        tls_mode: r.tls.mode.as_str(),
        tls: None,
        versions: Vec::new(),
        plaintext_accepted: None,
        sessions: None,
        findings: Vec::new(),
    };
    // A stdio MCP server is a local process: no network leg to scan.
    if r.stdio.is_some() {
        return rep;
    }
    let name = Some(r.name.as_str());
    let http = match (r.kind, &r.http) {
        (ResourceKind::Postgres | ResourceKind::Mysql, _) => None,
        (ResourceKind::Http | ResourceKind::Mcp, Some(h)) => Some(h),
        _ => None,
    };
    if !matches!(r.kind, ResourceKind::Postgres | ResourceKind::Mysql) && http.is_none() {
        rep.findings.push(Finding::new(
            "not_scanned",
            Severity::Low,
            name,
            "resources.kind",
            format!(
                "resource {:?}: kind \"{}\" is not scanned by this build",
                r.name, r.kind
            ),
            "scan it with a tool for that protocol until tollgate supports it",
        ));
        return rep;
    }
    let timeout = r.connect_timeout.min(Duration::from_secs(10));
    let plain_http = http.filter(|h| !h.tls);
    if let Some(h) = plain_http {
        rep.findings.push(Finding::new(
            "plaintext_upstream",
            Severity::Critical,
            name,
            "resources.upstream",
            format!("resource {:?}: the upstream is http://{}{}: requests, the injected credential and responses cross the network unencrypted", r.name, r.upstream, h.base_path),
            "serve the upstream over TLS and name it https://, with tls.mode = \"verify-full\", tls.ca and tls.server_name",
        ));
    }

    if let Err(e) = tcp(r, timeout).await {
        rep.findings.push(Finding::new(
            "upstream_unreachable",
            Severity::Critical,
            name,
            "resources.upstream",
            format!("resource {:?}: cannot reach {}: {e}", r.name, r.upstream),
            "start the upstream, or correct resources.upstream",
        ));
        rep.findings.sort_by_key(|f| f.severity);
        return rep;
    }

    match http {
        None => {
            sessions(r, opts, &mut rep).await;
            tls_handshake(r, opts, timeout, &mut rep).await;
            versions(r, timeout, &mut rep).await;
            if r.kind == ResourceKind::Mysql {
                mysql::plaintext(r, timeout, &mut rep).await;
            } else {
                plaintext(r, timeout, &mut rep).await;
            }
        }
        // An http:// upstream is not TLS-probed; whether it answers is a fact, the finding is
        // plaintext_upstream above.
        Some(_) if plain_http.is_some() => {
            rep.plaintext_accepted = plaintext_http(r, timeout).await.ok().map(|(a, _)| a);
        }
        Some(_) => {
            tls_handshake(r, opts, timeout, &mut rep).await;
            versions(r, timeout, &mut rep).await;
            match plaintext_http(r, timeout).await {
                Ok((true, detail)) => {
                    rep.plaintext_accepted = Some(true);
                    rep.findings.push(Finding::new(
                        "plaintext_accepted",
                        Severity::Critical,
                        name,
                        "resources.upstream",
                        format!("resource {:?}: {} also serves unencrypted HTTP on the same port ({detail}): a downgrade path around the gateway", r.name, r.upstream),
                        "serve only TLS on the upstream's port (no plaintext listener or protocol sniffing there)",
                    ));
                }
                Ok((false, _)) => rep.plaintext_accepted = Some(false),
                Err(e) => {
                    tracing::debug!(resource = %r.name, error = %e, "plaintext HTTP probe inconclusive")
                }
            }
        }
    }
    rep.findings.sort_by_key(|f| f.severity);
    rep
}

fn is_http(r: &Resource) -> bool {
    matches!(r.kind, ResourceKind::Http | ResourceKind::Mcp)
}

async fn tcp(r: &Resource, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(
        timeout,
        TcpStream::connect((r.upstream_host.as_str(), r.upstream_port)),
    )
    .await
    {
        Err(_) => Err(format!("timed out after {timeout:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(s)) => Ok(s),
    }
}

/// A TCP connection ready for a ClientHello: PostgreSQL after its SSLRequest (Ok(None) when the
/// server answered `N`, no TLS), HTTP straight away.
async fn ssl_tcp(r: &Resource, timeout: Duration) -> Result<Option<TcpStream>, String> {
    let mut s = tcp(r, timeout).await?;
    if is_http(r) {
        return Ok(Some(s));
    }
    if r.kind == ResourceKind::Mysql {
        return mysql::ssl_request(s, timeout).await;
    }
    s.write_all(&startup::encode_ssl_request())
        .await
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tokio::time::timeout(timeout, s.read_exact(&mut b))
        .await
        .map_err(|_| "no answer to the SSLRequest".to_string())?
        .map_err(|e| e.to_string())?;
    match b[0] {
        b'S' => Ok(Some(s)),
        b'N' => Ok(None),
        other => Err(format!("unexpected answer {other:#x} to the SSLRequest")),
    }
}

async fn handshake(
    r: &Resource,
    timeout: Duration,
    config: Arc<ClientConfig>,
) -> Result<Option<tokio_rustls::client::TlsStream<TcpStream>>, String> {
    let Some(tcp) = ssl_tcp(r, timeout).await? else {
        return Ok(None);
    };
    let name = ServerName::try_from(r.tls.server_name.clone())
        .map_err(|_| format!("invalid tls.server_name {:?}", r.tls.server_name))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => Err("TLS handshake timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(s)) => Ok(Some(s)),
    }
}

/// A client config that accepts any certificate (signatures still checked), for probes whose
/// certificate is judged separately; nothing but the handshake is ever sent on it.
fn probe_config(
    r: &Resource,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>, String> {
    let provider = tollgate_tls::provider();
    let b = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)));
    let mut c = match (&r.tls.cert, &r.tls.key) {
        (Some(cert), Some(key)) => {
            use rustls_pki_types::pem::PemObject;
            let certs = tollgate_tls::load_certs(cert).map_err(|e| e.to_string())?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("{}: {e}", key.display()))?;
            b.with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())?
        }
        _ => b.with_no_client_auth(),
    };
    // What the gateway offers: hyper speaks HTTP/1.1 upstream; MySQL offers none.
    c.alpn_protocols = match r.kind {
        _ if is_http(r) => vec![b"http/1.1".to_vec()],
        ResourceKind::Mysql => Vec::new(),
        _ => vec![b"postgresql".to_vec()],
    };
    Ok(Arc::new(c))
}

#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn tls_handshake(
    r: &Resource,
    opts: &ScanOptions,
    timeout: Duration,
    rep: &mut ResourceReport,
) {
    let name = Some(r.name.as_str());
    let config = match probe_config(r, rustls::DEFAULT_VERSIONS) {
        Ok(c) => c,
        Err(e) => {
            rep.findings.push(Finding::new(
                "scan_failed",
                Severity::Medium,
                name,
                "resources.tls",
                format!("resource {:?}: cannot prepare the TLS probe: {e}", r.name),
                "fix the upstream client certificate files",
            ));
            return;
        }
    };
    let stream = match handshake(r, timeout, config).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            rep.findings.push(Finding::new(
                "tls_refused",
                Severity::Critical,
                name,
                "resources.upstream",
                if r.kind == ResourceKind::Mysql {
                    format!("resource {:?}: {}'s greeting does not offer TLS at all", r.name, r.upstream)
                } else {
                    format!("resource {:?}: {} answered the SSLRequest with N: it does not offer TLS at all", r.name, r.upstream)
                },
                "turn on TLS on the upstream (PostgreSQL: ssl = on with a certificate; MySQL/MariaDB: ssl_cert and ssl_key) and keep tls.mode = \"verify-full\"",
            ));
            return;
        }
        Err(e) => {
            rep.findings.push(Finding::new(
                "tls_handshake_failed",
                Severity::Critical,
                name,
                "resources.upstream",
                format!(
                    "resource {:?}: TLS handshake with {} failed: {e}",
                    r.name, r.upstream
                ),
                "check the upstream's TLS settings (versions, ciphers, client certificate)",
            ));
            return;
        }
    };
    let conn = stream.get_ref().1;
    let info = tollgate_tls::session_info(conn);
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    drop(stream);
    if chain.is_empty() {
        rep.findings.push(Finding::new(
            "untrusted_chain",
            Severity::Critical,
            name,
            "resources.tls.ca",
            format!(
                "resource {:?}: the upstream presented no certificate",
                r.name
            ),
            "configure a server certificate on the upstream",
        ));
        return;
    }
    let now = SystemTime::now();
    let mut facts = TlsFacts {
        version: info.version,
        cipher: info.cipher,
        alpn,
        chain: Vec::new(),
        chain_trusted: None,
        hostname_matches: false,
        leaf_not_after_unix: 0,
        leaf_days_left: 0,
    };
    for (i, der) in chain.iter().enumerate() {
        let Ok(s) = tollgate_tls::pki::summarize(der) else {
            continue;
        };
        let days = days_until(s.not_after, now);
        let which = if i == 0 {
            "certificate"
        } else {
            "intermediate certificate"
        };
        if s.not_after <= now {
            rep.findings.push(Finding::new(
                "cert_expired",
                Severity::Critical,
                name,
                "resources.upstream",
                format!(
                    "resource {:?}: the upstream's {which} ({}) expired on {}",
                    r.name,
                    s.subject,
                    rfc3339(s.not_after)
                ),
                "renew the upstream's certificate",
            ));
        } else if days < opts.min_days as i64 {
            rep.findings.push(Finding::new(
                "cert_expiring",
                Severity::Medium,
                name,
                "resources.upstream",
                format!(
                    "resource {:?}: the upstream's {which} ({}) expires in {days} days ({})",
                    r.name,
                    s.subject,
                    rfc3339(s.not_after)
                ),
                "renew the upstream's certificate before it expires",
            ));
        }
        if i == 0 {
            facts.hostname_matches = name_matches(&s, &r.tls.server_name);
            facts.leaf_days_left = days;
            facts.leaf_not_after_unix = s
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
        }
        facts.chain.push(CertFact {
            subject: s.subject,
            issuer: s.issuer,
            dns_names: s.dns_names,
            ip_addresses: s.ip_addresses,
            not_after: rfc3339(s.not_after),
            days_left: days,
            sha256: s.fingerprint_sha256,
        });
    }
    if !facts.hostname_matches {
        let names: Vec<String> = facts
            .chain
            .first()
            .map(|c| c.dns_names.iter().chain(&c.ip_addresses).cloned().collect())
            .unwrap_or_default();
        rep.findings.push(Finding::new(
            "hostname_mismatch",
            Severity::High,
            name,
            "resources.tls.server_name",
            format!("resource {:?}: the upstream's certificate is for [{}], not {:?}", r.name, names.join(", "), r.tls.server_name),
            "issue the upstream a certificate that names the host the gateway connects to, or set tls.server_name to a name in it",
        ));
    }
    if let Some(ca) = &r.tls.ca {
        match verify_chain(ca, &chain, &r.tls.server_name) {
            Ok(()) => facts.chain_trusted = Some(true),
            Err(e) => {
                let name_only = matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName
                            | CertificateError::NotValidForNameContext { .. }
                    )
                );
                let expired = matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        CertificateError::Expired | CertificateError::ExpiredContext { .. }
                    )
                );
                // Both are reported above already; anything else is a chain problem.
                facts.chain_trusted = Some(name_only || expired);
                if !(name_only || expired) {
                    rep.findings.push(Finding::new(
                        "untrusted_chain",
                        Severity::Critical,
                        name,
                        "resources.tls.ca",
                        format!("resource {:?}: the upstream's certificate does not chain to {}: {e}", r.name, ca.display()),
                        "point tls.ca at the CA that issued the upstream's certificate, or reissue the certificate from that CA",
                    ));
                }
            }
        }
    }
    rep.tls = Some(facts);
}

fn verify_chain(
    ca: &std::path::Path,
    chain: &[CertificateDer<'static>],
    server_name: &str,
) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in tollgate_tls::load_certs(ca).map_err(|e| rustls::Error::General(e.to_string()))? {
        roots.add(c)?;
    }
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), tollgate_tls::provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| rustls::Error::General(format!("invalid server name {server_name:?}")))?;
    v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

/// RFC 6125 matching, as webpki does it: an IP against IP SANs, a name against DNS SANs with a
/// single leftmost `*` label.
fn name_matches(s: &tollgate_tls::pki::CertSummary, server_name: &str) -> bool {
    if let Ok(ip) = server_name.parse::<IpAddr>() {
        return s
            .ip_addresses
            .iter()
            .any(|a| a.parse::<IpAddr>().is_ok_and(|a| a == ip));
    }
    let want = server_name.trim_end_matches('.').to_ascii_lowercase();
    s.dns_names.iter().any(|d| {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        match d.strip_prefix("*.") {
            Some(suffix) => want
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
            None => d == want,
        }
    })
}

async fn versions(r: &Resource, timeout: Duration, rep: &mut ResourceReport) {
    for (label, v) in [
        ("TLSv1.3", &rustls::version::TLS13),
        ("TLSv1.2", &rustls::version::TLS12),
    ] {
        let fact = match probe_config(r, &[v]) {
            Err(e) => VersionFact {
                version: label,
                accepted: None,
                detail: e,
            },
            Ok(c) => match handshake(r, timeout, c).await {
                Ok(Some(_)) => VersionFact {
                    version: label,
                    accepted: Some(true),
                    detail: "handshake completed".into(),
                },
                Ok(None) => VersionFact {
                    version: label,
                    accepted: Some(false),
                    detail: "no TLS offered".into(),
                },
                Err(e) => VersionFact {
                    version: label,
                    accepted: Some(false),
                    detail: e,
                },
            },
        };
        rep.versions.push(fact);
    }
    for v in [Legacy::Tls11, Legacy::Tls10] {
        let fact = legacy_probe(r, timeout, v).await;
        if fact.accepted == Some(true) {
            rep.findings.push(Finding::new(
                "tls_legacy_accepted",
                Severity::High,
                Some(&r.name),
                "resources.upstream",
                format!("resource {:?}: the upstream accepts {} ({})", r.name, v.name(), fact.detail),
                if is_http(r) {
                    "set the upstream's minimum TLS version to 1.2 (nginx: ssl_protocols TLSv1.2 TLSv1.3; Apache: SSLProtocol -all +TLSv1.2 +TLSv1.3)"
                } else if r.kind == ResourceKind::Mysql {
                    "set the upstream's minimum TLS version to 1.2 (MySQL and MariaDB: tls_version = TLSv1.2,TLSv1.3)"
                } else {
                    "set the upstream's minimum TLS version to 1.2 (PostgreSQL: ssl_min_protocol_version = 'TLSv1.2')"
                },
            ));
        }
        rep.versions.push(fact);
    }
}

async fn legacy_probe(r: &Resource, timeout: Duration, v: Legacy) -> VersionFact {
    let fact = |accepted, detail: String| VersionFact {
        version: v.name(),
        accepted,
        detail,
    };
    let mut s = match ssl_tcp(r, timeout).await {
        Ok(Some(s)) => s,
        Ok(None) => return fact(Some(false), "no TLS offered".into()),
        Err(e) => return fact(None, e),
    };
    if let Err(e) = s
        .write_all(&legacy_client_hello(v, Some(&r.tls.server_name)))
        .await
    {
        return fact(None, e.to_string());
    }
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify_reply(&buf) {
            HelloReply::ServerHello(ver) if ver == v.wire() => {
                return fact(Some(true), "the server answered with a ServerHello".into())
            }
            HelloReply::ServerHello(ver) => {
                return fact(
                    Some(false),
                    format!("the server chose version {:02x}{:02x}", ver[0], ver[1]),
                )
            }
            HelloReply::Alert(d) => {
                return fact(Some(false), format!("refused with TLS alert {d}"))
            }
            HelloReply::Other => {
                return fact(
                    Some(false),
                    "the server did not answer with a ServerHello".into(),
                )
            }
            HelloReply::Incomplete => {}
        }
        let mut chunk = [0u8; 512];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return fact(Some(false), "the server closed the connection".into())
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return fact(None, "no answer".into()),
        }
    }
}

/// A start-up without SSLRequest: an authentication request back means plaintext sessions are
/// possible around the gateway. The probe hangs up at that point; no password is ever sent.
async fn plaintext(r: &Resource, timeout: Duration, rep: &mut ResourceReport) {
    let Some(creds) = &r.credentials else {
        return;
    };
    let database = r.database.clone().unwrap_or_else(|| r.name.clone());
    let outcome = async {
        let mut s = tcp(r, timeout).await?;
        let packet = startup::encode_startup(
            0,
            &[
                ("user", creds.user.as_str()),
                ("database", database.as_str()),
                ("application_name", SCAN_APPLICATION_NAME),
            ],
        );
        s.write_all(&packet).await.map_err(|e| e.to_string())?;
        let mut fb = FrameBuf::new();
        let frame = tokio::time::timeout(timeout, read_frame(&mut s, &mut fb, 64 * 1024))
            .await
            .map_err(|_| "no answer".to_string())?;
        let _ = s.write_all(&frontend::terminate()).await;
        match frame {
            Ok((b'R', body)) => Ok((
                true,
                match backend::parse_auth(&body) {
                    Ok(backend::AuthRequest::Ok) => {
                        "the server let the session in without any authentication".to_string()
                    }
                    _ => "the server asked for authentication".to_string(),
                },
            )),
            Ok((b'E', body)) => Ok((
                false,
                backend::parse_error(&body)
                    .map(|e| e.message)
                    .unwrap_or_default(),
            )),
            Ok((tag, _)) => Err(format!("unexpected reply {:?}", tag as char)),
            Err(e) => Ok((false, format!("connection closed: {e}"))),
        }
    }
    .await;
    match outcome {
        Ok((true, detail)) => {
            rep.plaintext_accepted = Some(true);
            rep.findings.push(Finding::new(
                "plaintext_accepted",
                Severity::Critical,
                Some(&r.name),
                "resources.upstream",
                format!("resource {:?}: {} accepts unencrypted connections ({detail}): a downgrade path around the gateway", r.name, r.upstream),
                "allow only TLS on the upstream (PostgreSQL: only hostssl lines in pg_hba.conf, and a host ... reject line before them)",
            ));
        }
        Ok((false, _)) => rep.plaintext_accepted = Some(false),
        Err(e) => tracing::debug!(resource = %r.name, error = %e, "plaintext probe inconclusive"),
    }
}

/// A plaintext `HEAD /` on the upstream's port: Ok((accepted, what the server did)). Only the
/// request line and `Host` are sent, never the injected credential.
async fn plaintext_http(r: &Resource, timeout: Duration) -> Result<(bool, String), String> {
    let mut s = tcp(r, timeout).await?;
    let tls = r.http.as_ref().is_some_and(|h| h.tls);
    let default_port = if tls { 443 } else { 80 };
    // The Host the gateway sends.
    let host = if r.upstream_port == default_port {
        r.upstream_host.as_str()
    } else {
        r.upstream.as_str()
    };
    let req = format!(
        "HEAD / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {SCAN_APPLICATION_NAME}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(512);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= 8192 {
            break;
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) if buf.is_empty() => return Err("no answer".into()),
            Err(_) => break,
        }
    }
    Ok(classify_http_reply(&buf))
}

/// Whether the first bytes a server sent back to a plaintext `HEAD /` mean it serves plaintext
/// HTTP. TLS ports of common servers answer plain HTTP with `400` (nginx, Go), `426`, or a
/// redirect to `https://`: those refuse it.
pub(crate) fn classify_http_reply(buf: &[u8]) -> (bool, String) {
    if buf.is_empty() {
        return (false, "the server closed the connection".into());
    }
    if buf[0] == 0x15 {
        return (false, "the server answered with a TLS alert".into());
    }
    if !buf.starts_with(b"HTTP/") {
        return (false, "the server did not answer in HTTP".into());
    }
    let text = String::from_utf8_lossy(buf);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("").trim();
    // Quoted in messages: keep it short.
    let status_line = match status_line.char_indices().nth(80) {
        Some((i, _)) => &status_line[..i],
        None => status_line,
    };
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    let location = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("location")
            .then(|| v.trim().to_string())
    });
    match status {
        Some(400) => (
            false,
            format!("it answered {status_line:?}, as TLS ports answer plain HTTP"),
        ),
        Some(426) => (false, format!("it answered {status_line:?}")),
        Some(300..=399)
            if location.as_deref().is_some_and(|l| {
                l.get(..8)
                    .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
            }) =>
        {
            (
                false,
                format!(
                    "it redirects to {}",
                    location.as_deref().unwrap_or_default()
                ),
            )
        }
        _ => (
            true,
            format!("a plaintext HEAD / was answered {status_line:?}"),
        ),
    }
}

async fn sessions(r: &Resource, opts: &ScanOptions, rep: &mut ResourceReport) {
    let name = Some(r.name.as_str());
    let before = opts.gateway.fetch().await;
    let listed = if r.kind == ResourceKind::Mysql {
        mysql::list_sessions(r, opts).await
    } else {
        list_sessions(r, opts).await
    };
    let rows = match listed {
        Ok(rows) => rows,
        Err(e) => {
            rep.findings.push(Finding::new(
                "sessions_unchecked",
                Severity::Medium,
                name,
                "resources.credentials",
                format!("resource {:?}: could not list the upstream's sessions as the resource's user: {e}", r.name),
                "make sure the gateway itself can connect (tollgate check, then the gateway log)",
            ));
            return;
        }
    };
    // A second look catches gateway sessions that were still starting during the first.
    let after = if rows.is_empty() {
        Err(String::new())
    } else {
        opts.gateway.fetch().await
    };
    let known: Option<Vec<UpstreamConn>> = match (before, after) {
        (Err(e), Err(_)) if !rows.is_empty() => {
            rep.findings.push(Finding::new(
                "gateway_unreachable",
                Severity::Medium,
                name,
                "server.admin_listen",
                format!("resource {:?}: the gateway's list of its own connections is not available ({e}); {} other session(s) cannot be told apart", r.name, rows.len()),
                "run the scan where the gateway's admin_listen is reachable (or let the gateway scan itself with server.scan_interval)",
            ));
            None
        }
        (Err(_), Err(_)) => None,
        (a, b) => Some(a.into_iter().chain(b).flatten().collect()),
    };
    let mut facts = SessionFacts {
        total: rows.len(),
        through_gateway: 0,
        gateway_known: known.is_some(),
        other: Vec::new(),
    };
    for row in rows {
        let ours = known
            .as_ref()
            .is_some_and(|k| is_gateway_session(&row, r, k));
        if ours {
            facts.through_gateway += 1;
            continue;
        }
        let from = match (&row.client_addr, row.client_port) {
            (Some(a), Some(p)) => format!("from {a}:{p}"),
            (None, Some(-1)) => "over a local unix socket".to_string(),
            _ if r.kind == ResourceKind::Mysql => "from an unknown address".to_string(),
            _ => "from an address hidden from the resource's user (grant it pg_read_all_stats to see it)".to_string(),
        };
        let who = format!(
            "session pid {} (user {}, {from}, application {:?}, since {})",
            row.pid,
            row.usename.as_deref().unwrap_or("?"),
            row.application_name.as_deref().unwrap_or(""),
            row.backend_start.as_deref().unwrap_or("?"),
        );
        let database = r.database.as_deref().unwrap_or(&r.name);
        rep.findings.push(if known.is_some() {
            Finding::new(
                "bypass_session",
                Severity::Critical,
                name,
                "resources.upstream",
                format!("resource {:?}: {who} is connected to database {database:?} directly, not through the gateway", r.name),
                if r.kind == ResourceKind::Mysql {
                    "let only the gateway reach the upstream (the user's host part / firewall by the gateway's address) and rotate credentials that may have leaked"
                } else {
                    "let only the gateway reach the upstream (pg_hba.conf / firewall by the gateway's address) and rotate credentials that may have leaked"
                },
            )
        } else {
            Finding::new(
                "unverified_session",
                Severity::High,
                name,
                "resources.upstream",
                format!("resource {:?}: {who} on database {database:?} may not come through the gateway (the gateway was not reachable to confirm)", r.name),
                "scan again with the gateway's admin listener reachable",
            )
        });
        facts.other.push(row);
    }
    rep.sessions = Some(facts);
}

mod mysql;

fn is_gateway_session(row: &SessionRow, r: &Resource, known: &[UpstreamConn]) -> bool {
    let addr = row.client_addr.as_deref().and_then(|a| {
        // inet renders a host address with no mask; keep working if a /32 appears.
        a.split('/').next()?.parse::<IpAddr>().ok()
    });
    known
        .iter()
        .filter(|k| k.resource == r.name || k.upstream == r.upstream)
        .any(|k| {
            k.backend_pid == Some(row.pid)
                || (addr.is_some_and(|a| a.to_canonical() == k.local_addr.ip().to_canonical())
                    && row.client_port == Some(k.local_addr.port() as i32))
        })
}

async fn list_sessions(r: &Resource, opts: &ScanOptions) -> Result<Vec<SessionRow>, String> {
    let target = UpstreamTarget::new(r.clone()).map_err(|e| e.to_string())?;
    let params = [(
        "application_name".to_string(),
        SCAN_APPLICATION_NAME.to_string(),
    )];
    let mut up = target
        .connect(&params, opts.max_message)
        .await
        .map_err(|e| e.to_string())?;
    // Inside the gateway, the scanner's own session is one of the gateway's connections.
    let _entry = match (&opts.gateway, up.stream.local_addr()) {
        (GatewaySource::Local(reg) | GatewaySource::Cluster { local: reg, .. }, Ok(local_addr)) => {
            Some(reg.register(UpstreamConn {
                resource: r.name.clone(),
                upstream: r.upstream.clone(),
                local_addr,
                backend_pid: Some(up.pid),
            }))
        }
        _ => None,
    };
    if !up.leftover.is_empty() {
        return Err("the upstream sent data before the first query".into());
    }
    up.stream
        .write_all(&frontend::query(SESSIONS_SQL))
        .await
        .map_err(|e| e.to_string())?;
    let mut fb = FrameBuf::new();
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (tag, body) = tokio::time::timeout(
            r.connect_timeout,
            read_frame(&mut up.stream, &mut fb, opts.max_message),
        )
        .await
        .map_err(|_| "the session query timed out".to_string())?
        .map_err(|e| e.to_string())?;
        match tag {
            b'D' => rows.push(parse_session_row(&body)?),
            b'E' => {
                error = Some(
                    backend::parse_error(&body)
                        .map(|e| format!("{} {}", e.code, e.message))
                        .unwrap_or_default(),
                )
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = up.stream.write_all(&frontend::terminate()).await;
    let _ = up.stream.shutdown().await;
    match error {
        Some(e) => Err(format!("querying pg_stat_activity failed: {e}")),
        None => Ok(rows),
    }
}

fn parse_session_row(body: &[u8]) -> Result<SessionRow, String> {
    let f = backend::parse_data_row(body).map_err(|e| e.to_string())?;
    if f.len() != 6 {
        return Err(format!(
            "expected 6 columns from pg_stat_activity, got {}",
            f.len()
        ));
    }
    let text = |i: usize| f[i].map(|b| String::from_utf8_lossy(b).into_owned());
    Ok(SessionRow {
        pid: text(0)
            .and_then(|p| p.parse().ok())
            .ok_or("pg_stat_activity row without a pid")?,
        client_addr: text(1),
        client_port: text(2).and_then(|p| p.parse().ok()),
        usename: text(3),
        application_name: text(4),
        backend_start: text(5),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: i32, addr: Option<&str>, port: Option<i32>) -> SessionRow {
        SessionRow {
            pid,
            client_addr: addr.map(str::to_string),
            client_port: port,
            usename: Some("app".into()),
            application_name: None,
            backend_start: None,
        }
    }

    #[test]
    fn gateway_sessions_match_by_address_or_pid() {
        let cfg = tollgate_config::parse(
            "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\n[[resources]]\nname = \"app\"\nkind = \"postgres\"\nupstream = \"db:5432\"\nallow_groups = [\"a\"]\n[resources.tls]\nmode = \"disable\"\n[resources.credentials]\nuser = \"u\"\n",
            std::path::Path::new("/t/tollgate.toml"),
        )
        .unwrap();
        let r = &cfg.resources[0];
        let known = parse_upstreams(
            r#"[{"resource":"app","upstream":"db:5432","local_addr":"10.0.0.5:40000","backend_pid":77},
                {"resource":"other","upstream":"elsewhere:5432","local_addr":"10.0.0.5:40001","backend_pid":78}]"#,
        )
        .unwrap();
        assert!(is_gateway_session(
            &row(1, Some("10.0.0.5"), Some(40000)),
            r,
            &known
        ));
        assert!(is_gateway_session(&row(77, None, None), r, &known));
        assert!(!is_gateway_session(
            &row(2, Some("10.0.0.5"), Some(40002)),
            r,
            &known
        ));
        // Another upstream's connection does not vouch for this one.
        assert!(!is_gateway_session(
            &row(78, Some("10.0.0.5"), Some(40001)),
            r,
            &known
        ));
        assert!(!is_gateway_session(&row(3, None, Some(-1)), r, &known));
    }

    #[test]
    fn session_rows_parse_with_nulls() {
        let mut body = 6i16.to_be_bytes().to_vec();
        for v in [Some("42"), None, None, Some("app"), None, None] {
            match v {
                Some(s) => {
                    body.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    body.extend_from_slice(s.as_bytes());
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let r = parse_session_row(&body).unwrap();
        assert_eq!(r.pid, 42);
        assert_eq!(r.usename.as_deref(), Some("app"));
        assert_eq!(r.client_addr, None);
    }

    #[test]
    fn plaintext_http_replies() {
        let c = |b: &[u8]| classify_http_reply(b).0;
        assert!(c(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"));
        assert!(c(b"HTTP/1.0 404 Not Found\r\n\r\n"));
        assert!(c(b"HTTP/1.1 401 Unauthorized\r\n\r\n"));
        // A redirect elsewhere still serves plaintext; one to https:// does not.
        assert!(c(b"HTTP/1.1 302 Found\r\nLocation: /login\r\n\r\n"));
        assert!(!c(
            b"HTTP/1.1 301 Moved Permanently\r\nlocation: HTTPS://api.internal/\r\n\r\n"
        ));
        // nginx and Go on a TLS port, and Upgrade Required.
        assert!(!c(b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\n\r\n"));
        assert!(!c(
            b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
        ));
        assert!(!c(b"HTTP/1.1 426 Upgrade Required\r\n\r\n"));
        assert!(!c(b""));
        assert!(!c(&[0x15, 3, 3, 0, 2, 2, 80]));
        assert!(!c(b"SSH-2.0-OpenSSH_9.6\r\n"));
        // Odd bytes never panic.
        assert!(c(
            "HTTP/1.1 302 Found\r\nLocation: hé://x\r\n\r\n".as_bytes()
        ));
        assert!(c(b"HTTP/1.1 200 \xff\xfe\r\nLocation: \xff\r\n\r\n"));
        let long = format!("HTTP/1.1 200 {}\r\n\r\n", "é".repeat(500));
        assert!(classify_http_reply(long.as_bytes()).1.len() < 400);
        let (_, detail) = classify_http_reply(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(detail.contains("\"HTTP/1.1 200 OK\""), "{detail}");
    }

    /// How the in-test upstream answers a connection.
    #[derive(Clone, Copy, PartialEq)]
    enum Serve {
        /// TLS only (a rustls server with ALPN http/1.1).
        Tls,
        /// TLS, and plain HTTP for connections that do not start with a TLS record.
        TlsAndPlain,
        /// Plain HTTP only.
        Plain,
    }

    struct Upstream {
        dir: tempfile::TempDir,
        port: u16,
    }

    /// A CA in `dir/ca`, a server certificate for localhost/127.0.0.1, and a server on a free port.
    async fn upstream(serve: Serve) -> Upstream {
        use rustls_pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        tollgate_tls::pki::init_ca(&dir.path().join("ca"), "upstream CA").unwrap();
        tollgate_tls::pki::init_ca(&dir.path().join("other"), "other CA").unwrap();
        let files = tollgate_tls::pki::issue_server(
            &dir.path().join("ca"),
            &tollgate_tls::pki::ServerCertSpec {
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                ttl: Duration::from_secs(30 * 86_400),
                not_before: None,
            },
            &dir.path().join("server"),
        )
        .unwrap();
        let certs = tollgate_tls::load_certs(&files.cert).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(tollgate_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let tls = matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == 0x16);
                    let reply =
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                    if tls && serve != Serve::Plain {
                        if let Ok(mut s) = acceptor.accept(tcp).await {
                            let mut buf = [0u8; 1024];
                            if let Ok(n) = s.read(&mut buf).await {
                                if n > 0 {
                                    let _ = s.write_all(reply).await;
                                }
                            }
                            let _ = s.shutdown().await;
                        }
                    } else if !tls && serve != Serve::Tls {
                        let mut buf = [0u8; 1024];
                        let _ = tcp.read(&mut buf).await;
                        let _ = tcp.write_all(reply).await;
                    } else if serve == Serve::Tls {
                        // rustls refuses what is not TLS with an alert.
                        let _ = acceptor.accept(tcp).await;
                    }
                });
            }
        });
        Upstream { dir, port }
    }

    fn http_resource(up: &Upstream, scheme: &str, ca: &str, server_name: &str) -> Resource {
        let tls = if scheme == "http" {
            "mode = \"disable\"\n".to_string()
        } else {
            format!("ca = \"{ca}/ca.crt\"\nserver_name = \"{server_name}\"\n")
        };
        let text = format!(
            "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\n[[resources]]\nname = \"api\"\nkind = \"http\"\nupstream = \"{scheme}://127.0.0.1:{}/v1\"\nallow_groups = [\"a\"]\nconnect_timeout = \"2s\"\n[resources.tls]\n{tls}",
            up.port
        );
        tollgate_config::parse(&text, &up.dir.path().join("tollgate.toml"))
            .unwrap()
            .resources
            .remove(0)
    }

    fn opts() -> ScanOptions {
        ScanOptions {
            min_days: 14,
            gateway: GatewaySource::Unavailable("test".into()),
            max_message: 1 << 20,
        }
    }

    fn kinds(rep: &ResourceReport) -> Vec<&'static str> {
        rep.findings.iter().map(|f| f.kind).collect()
    }

    #[tokio::test]
    async fn https_upstream_scans_clean_when_trusted() {
        let up = upstream(Serve::Tls).await;
        let rep = scan_resource(&http_resource(&up, "https", "ca", "localhost"), &opts()).await;
        assert_eq!(kinds(&rep), Vec::<&str>::new(), "{rep:#?}");
        let tls = rep.tls.as_ref().unwrap();
        assert_eq!(tls.chain_trusted, Some(true));
        assert!(tls.hostname_matches);
        assert_eq!(tls.alpn.as_deref(), Some("http/1.1"));
        assert!(tls.leaf_days_left >= 29, "{tls:?}");
        assert_eq!(rep.plaintext_accepted, Some(false));
        assert!(rep.sessions.is_none());
        let accepted = |v: &str| {
            rep.versions
                .iter()
                .find(|x| x.version == v)
                .unwrap()
                .accepted
        };
        assert_eq!(accepted("TLSv1.3"), Some(true), "{:?}", rep.versions);
        assert_eq!(accepted("TLSv1.2"), Some(true), "{:?}", rep.versions);
        assert_eq!(accepted("TLSv1.1"), Some(false), "{:?}", rep.versions);
        assert_eq!(accepted("TLSv1.0"), Some(false), "{:?}", rep.versions);
        assert!(rep.cert_not_after_unix().is_some());
    }

    #[tokio::test]
    async fn https_upstream_with_wrong_ca_name_or_expiry_window_has_findings() {
        let up = upstream(Serve::Tls).await;
        let rep = scan_resource(&http_resource(&up, "https", "other", "localhost"), &opts()).await;
        assert_eq!(kinds(&rep), ["untrusted_chain"], "{rep:#?}");
        assert_eq!(rep.findings[0].severity, Severity::Critical);
        assert_eq!(rep.tls.as_ref().unwrap().chain_trusted, Some(false));

        let rep = scan_resource(&http_resource(&up, "https", "ca", "api.internal"), &opts()).await;
        assert_eq!(kinds(&rep), ["hostname_mismatch"], "{rep:#?}");

        let mut o = opts();
        o.min_days = 60;
        let rep = scan_resource(&http_resource(&up, "https", "ca", "localhost"), &o).await;
        assert_eq!(kinds(&rep), ["cert_expiring"], "{rep:#?}");
    }

    #[tokio::test]
    async fn https_upstream_that_also_serves_plain_http_is_critical() {
        let up = upstream(Serve::TlsAndPlain).await;
        let rep = scan_resource(&http_resource(&up, "https", "ca", "localhost"), &opts()).await;
        assert_eq!(kinds(&rep), ["plaintext_accepted"], "{rep:#?}");
        assert_eq!(rep.findings[0].severity, Severity::Critical);
        assert!(
            rep.findings[0].message.contains("unencrypted HTTP"),
            "{}",
            rep.findings[0].message
        );
        assert_eq!(rep.plaintext_accepted, Some(true));
        assert_eq!(rep.tls.as_ref().unwrap().chain_trusted, Some(true));
    }

    #[tokio::test]
    async fn http_upstream_is_critical_and_not_tls_probed() {
        let up = upstream(Serve::Plain).await;
        let rep = scan_resource(&http_resource(&up, "http", "", ""), &opts()).await;
        assert_eq!(kinds(&rep), ["plaintext_upstream"], "{rep:#?}");
        assert_eq!(rep.findings[0].severity, Severity::Critical);
        assert!(rep.findings[0].message.contains("http://127.0.0.1:"));
        assert!(rep.findings[0].message.contains("/v1"));
        assert!(rep.tls.is_none() && rep.versions.is_empty());
        assert_eq!(rep.plaintext_accepted, Some(true));
        assert_eq!(rep.tls_mode, "disable");
    }

    #[tokio::test]
    async fn unreachable_http_upstream() {
        let up = upstream(Serve::Tls).await;
        let mut r = http_resource(&up, "https", "ca", "localhost");
        r.upstream_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let rep = scan_resource(&r, &opts()).await;
        assert_eq!(kinds(&rep), ["upstream_unreachable"], "{rep:#?}");
    }

    #[tokio::test]
    async fn mcp_without_an_http_upstream_is_not_scanned() {
        let up = upstream(Serve::Tls).await;
        let mut r = http_resource(&up, "https", "ca", "localhost");
        r.kind = ResourceKind::Mcp;
        r.http = None;
        let rep = scan_resource(&r, &opts()).await;
        assert_eq!(kinds(&rep), ["not_scanned"], "{rep:#?}");
    }

    #[test]
    fn names() {
        let mut s = tollgate_tls::pki::CertSummary {
            subject: String::new(),
            issuer: String::new(),
            common_name: None,
            groups: vec![],
            dns_names: vec!["*.db.internal".into(), "localhost".into()],
            ip_addresses: vec!["127.0.0.1".into()],
            uris: vec![],
            not_before: SystemTime::now(),
            not_after: SystemTime::now(),
            fingerprint_sha256: String::new(),
            is_ca: false,
            serial: String::new(),
        };
        assert!(name_matches(&s, "orders.db.internal"));
        assert!(!name_matches(&s, "a.b.db.internal"));
        assert!(name_matches(&s, "LOCALHOST"));
        assert!(name_matches(&s, "127.0.0.1"));
        assert!(!name_matches(&s, "127.0.0.2"));
        s.dns_names.clear();
        assert!(!name_matches(&s, "localhost"));
    }
}
