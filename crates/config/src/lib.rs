//! tollgate's configuration: the TOML schema of DESIGN.md as typed structs, and its validation.
//!
//! Owns parsing and checking a config file into values the rest of the gateway can trust
//! (addresses parsed, paths resolved against the config's directory, names unique).
//! It must not open sockets, read certificates or secrets: it only names them.

use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A config error that names the file, the key and, where known, the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// The whole configuration, with every relative path resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub roles: Roles,
    pub identity: Identity,
    pub resources: Vec<Resource>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub postgres_listen: Option<SocketAddr>,
    pub https_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Whether PostgreSQL clients must present a certificate, or may instead send a token as password.
    pub client_cert: ClientCertPolicy,
    pub store: String,
    /// How often certificate files are checked for changes (SIGHUP reloads at once).
    pub reload_interval: Duration,
    /// Largest single protocol message accepted from a client or upstream.
    pub max_message_bytes: usize,
    /// What happens to a command when its audit event cannot be written.
    pub audit_failure: AuditFailure,
    /// How long a command waits for its audit event to be written before `audit_failure` applies.
    pub audit_timeout: Duration,
    /// Run the live encryption/bypass scan (`tollgate scan`) this often inside the gateway.
    pub scan_interval: Option<Duration>,
    /// Where scan findings are POSTed as JSON (`https://...`; `http://` only to a loopback address).
    pub alert_webhook: Option<String>,
    /// CA bundle trusted for an https `alert_webhook` (default: the system bundle).
    pub alert_webhook_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFailure {
    /// A command is forwarded only after its event is written; if the store cannot write, the
    /// command is refused (the default).
    Closed,
    /// Commands are forwarded without waiting for their events (still queued and written);
    /// a store outage or a gateway crash can lose the latest events. `tollgate check` flags it.
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCertPolicy {
    /// A certificate is verified when presented; without one, a token is asked for.
    Optional,
    /// Every client must present a certificate that chains to `client_ca`.
    Required,
}

#[derive(Debug, Clone, Default)]
pub struct Roles {
    pub admin_groups: Vec<String>,
    pub auditor_groups: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub oidc: Option<Oidc>,
    pub tokens: Vec<StaticToken>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oidc {
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
}

fn default_groups_claim() -> String {
    "groups".into()
}

/// A service-account token; only its SHA-256 (hex) is kept in config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    pub subject: String,
    pub sha256: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Postgres,
    Mysql,
    Http,
    Mcp,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Postgres => "postgres",
            ResourceKind::Mysql => "mysql",
            ResourceKind::Http => "http",
            ResourceKind::Mcp => "mcp",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub kind: ResourceKind,
    /// `host:port` of the upstream.
    pub upstream: String,
    pub upstream_host: String,
    pub upstream_port: u16,
    pub database: Option<String>,
    pub allow_groups: Vec<String>,
    pub connect_timeout: Duration,
    pub tls: UpstreamTls,
    pub credentials: Option<Credentials>,
    pub rules: Vec<Rule>,
    pub masks: Vec<Mask>,
    /// Line of the `[[resources]]` entry, for error messages about it.
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    VerifyFull,
    VerifyCa,
    InsecureSkipVerify,
    Disable,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::VerifyFull => "verify-full",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::InsecureSkipVerify => "insecure-skip-verify",
            TlsMode::Disable => "disable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub mode: TlsMode,
    pub ca: Option<PathBuf>,
    /// Name checked against the upstream certificate; defaults to the upstream host.
    pub server_name: String,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: SecretSource,
}

/// Where an injected secret is read from; the value itself never lives in config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
    None,
}

impl SecretSource {
    /// Read the secret now (environment or file; a trailing newline in a file is dropped).
    pub fn read(&self) -> Result<Option<String>, String> {
        match self {
            SecretSource::None => Ok(None),
            SecretSource::Env(var) => std::env::var(var)
                .map(Some)
                .map_err(|_| format!("environment variable {var} is not set")),
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("cannot read password file {}: {e}", path.display())),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub statements: Vec<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub action: RuleAction,
    #[serde(default)]
    pub approvers: Vec<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
    Review,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mask {
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub detectors: Vec<String>,
    #[serde(default = "default_strategy")]
    pub strategy: String,
}

fn default_strategy() -> String {
    "redact".into()
}

// ---- raw (as written) shapes ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    roles: RawRoles,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    resources: Vec<Spanned<RawResource>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    postgres_listen: Option<Spanned<String>>,
    https_listen: Option<Spanned<String>>,
    admin_listen: Option<Spanned<String>>,
    tls_cert: String,
    tls_key: String,
    client_ca: Option<String>,
    #[serde(default = "default_client_cert")]
    client_cert: ClientCertPolicy,
    #[serde(default = "default_store")]
    store: String,
    reload_interval: Option<Spanned<String>>,
    max_message_bytes: Option<usize>,
    audit_failure: Option<AuditFailure>,
    audit_timeout: Option<Spanned<String>>,
    scan_interval: Option<Spanned<String>>,
    alert_webhook: Option<Spanned<String>>,
    alert_webhook_ca: Option<String>,
}

fn default_client_cert() -> ClientCertPolicy {
    ClientCertPolicy::Optional
}

fn default_store() -> String {
    "sqlite://tollgate.db".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRoles {
    #[serde(default)]
    admin_groups: Vec<String>,
    #[serde(default)]
    auditor_groups: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    oidc: Option<Oidc>,
    #[serde(default)]
    tokens: Vec<StaticToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: Spanned<String>,
    kind: ResourceKind,
    upstream: Spanned<String>,
    database: Option<String>,
    #[serde(default)]
    allow_groups: Vec<String>,
    connect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    tls: RawUpstreamTls,
    credentials: Option<RawCredentials>,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    masks: Vec<Mask>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    mode: Option<TlsMode>,
    ca: Option<String>,
    server_name: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    user: String,
    password_env: Option<String>,
    password_file: Option<String>,
}

/// Default largest protocol message (PostgreSQL's own limit for most messages is 1 GB; 64 MiB
/// keeps a hostile client from making the gateway allocate without bound).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parse and validate config text; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let ctx = Ctx { text, path, base };
    ctx.build(raw)
}

struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
    base: PathBuf,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    fn invalid(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line_of(offset),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn addr(
        &self,
        key: &str,
        v: Option<Spanned<String>>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        v.map(|s| {
            s.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.invalid(
                    s.span().start,
                    key,
                    format!(
                        "{:?} is not a socket address; write IP:PORT, e.g. \"127.0.0.1:6432\"",
                        s.get_ref()
                    ),
                )
            })
        })
        .transpose()
    }

    fn duration(
        &self,
        key: &str,
        v: Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                parse_duration(s.get_ref()).map_err(|m| self.invalid(s.span().start, key, m))
            }
        }
    }

    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let s = raw.server;
        let server = Server {
            postgres_listen: self.addr("server.postgres_listen", s.postgres_listen)?,
            https_listen: self.addr("server.https_listen", s.https_listen)?,
            admin_listen: self.addr("server.admin_listen", s.admin_listen)?,
            tls_cert: self.resolve(&s.tls_cert),
            tls_key: self.resolve(&s.tls_key),
            client_ca: s.client_ca.as_deref().map(|p| self.resolve(p)),
            client_cert: s.client_cert,
            store: resolve_store_url(&s.store, &self.base),
            reload_interval: self.duration(
                "server.reload_interval",
                s.reload_interval,
                Duration::from_secs(2),
            )?,
            max_message_bytes: s.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            audit_failure: s.audit_failure.unwrap_or(AuditFailure::Closed),
            audit_timeout: self.duration(
                "server.audit_timeout",
                s.audit_timeout,
                Duration::from_secs(5),
            )?,
            scan_interval: match s.scan_interval {
                None => None,
                Some(v) => {
                    let at = v.span().start;
                    let d = self.duration("server.scan_interval", Some(v), Duration::ZERO)?;
                    if d < Duration::from_millis(100) {
                        return Err(self.invalid(
                            at,
                            "server.scan_interval",
                            "must be at least 100ms (e.g. \"5m\"); remove the key to turn the periodic scan off",
                        ));
                    }
                    Some(d)
                }
            },
            alert_webhook: match s.alert_webhook {
                None => None,
                Some(v) => {
                    let url = v.get_ref();
                    let loopback_http = url
                        .strip_prefix("http://")
                        .and_then(|rest| split_host_port(rest.split('/').next().unwrap_or("")))
                        .is_some_and(|(host, _)| {
                            host == "localhost"
                                || host
                                    .parse::<std::net::IpAddr>()
                                    .is_ok_and(|ip| ip.is_loopback())
                        });
                    if !(url.starts_with("https://") || loopback_http) {
                        return Err(self.invalid(
                            v.span().start,
                            "server.alert_webhook",
                            format!("{url:?} must be an https:// URL (plain http:// only to a loopback HOST:PORT, for local relays and tests)"),
                        ));
                    }
                    Some(v.into_inner())
                }
            },
            alert_webhook_ca: s.alert_webhook_ca.as_deref().map(|p| self.resolve(p)),
        };
        if server.client_cert == ClientCertPolicy::Required && server.client_ca.is_none() {
            return Err(self.invalid(
                0,
                "server.client_cert",
                "\"required\" needs server.client_ca (the CA client certificates must chain to)",
            ));
        }
        for t in &raw.identity.tokens {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.invalid(
                    self.text.find(&t.sha256).unwrap_or(0),
                    "identity.tokens.sha256",
                    format!("token for {:?} must be the 64-hex-digit SHA-256 of the token (e.g. `printf %s TOKEN | sha256sum`)", t.subject),
                ));
            }
        }

        let mut names = HashSet::new();
        let mut resources = Vec::with_capacity(raw.resources.len());
        for spanned in raw.resources {
            let line = self.line_of(spanned.span().start);
            let r = spanned.into_inner();
            let name_at = r.name.span().start;
            let name = r.name.into_inner();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                return Err(self.invalid(
                    name_at,
                    "resources.name",
                    format!("{name:?}: use letters, digits, '_', '-' or '.'"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(self.invalid(
                    name_at,
                    "resources.name",
                    format!("duplicate resource name {name:?}; every resource needs its own name"),
                ));
            }
            let up_at = r.upstream.span().start;
            let upstream = r.upstream.into_inner();
            let (host, port) = split_host_port(&upstream).ok_or_else(|| {
                self.invalid(
                    up_at,
                    "resources.upstream",
                    format!("{upstream:?} must be HOST:PORT, e.g. \"db.internal:5432\""),
                )
            })?;
            let mode = r.tls.mode.unwrap_or(TlsMode::VerifyFull);
            let ca = r.tls.ca.as_deref().map(|p| self.resolve(p));
            if matches!(mode, TlsMode::VerifyFull | TlsMode::VerifyCa) && ca.is_none() {
                return Err(self.invalid(up_at, "resources.tls.ca", format!("resource {name:?}: tls mode {} needs `ca`, the CA that signed the upstream's certificate", mode.as_str())));
            }
            if r.tls.cert.is_some() != r.tls.key.is_some() {
                return Err(self.invalid(up_at, "resources.tls", format!("resource {name:?}: set both `cert` and `key` for an upstream client certificate, or neither")));
            }
            let credentials = match r.credentials {
                None => None,
                Some(c) => {
                    let password = match (c.password_env, c.password_file) {
                        (Some(_), Some(_)) => {
                            return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: set one of password_env or password_file, not both")))
                        }
                        (Some(v), None) => SecretSource::Env(v),
                        (None, Some(p)) => SecretSource::File(self.resolve(&p)),
                        (None, None) => SecretSource::None,
                    };
                    Some(Credentials {
                        user: c.user,
                        password,
                    })
                }
            };
            if r.kind == ResourceKind::Postgres && credentials.is_none() {
                return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: a postgres resource needs [resources.credentials] with the upstream user")));
            }
            let connect_timeout = self.duration(
                "resources.connect_timeout",
                r.connect_timeout,
                Duration::from_secs(10),
            )?;
            resources.push(Resource {
                tls: UpstreamTls {
                    mode,
                    ca,
                    server_name: r.tls.server_name.unwrap_or_else(|| host.clone()),
                    cert: r.tls.cert.as_deref().map(|p| self.resolve(p)),
                    key: r.tls.key.as_deref().map(|p| self.resolve(p)),
                },
                name,
                kind: r.kind,
                upstream_host: host,
                upstream_port: port,
                upstream,
                database: r.database,
                allow_groups: r.allow_groups,
                connect_timeout,
                credentials,
                rules: r.rules,
                masks: r.masks,
                line,
            });
        }

        Ok(Config {
            path: self.path.to_path_buf(),
            server,
            roles: Roles {
                admin_groups: raw.roles.admin_groups,
                auditor_groups: raw.roles.auditor_groups,
            },
            identity: Identity {
                oidc: raw.identity.oidc,
                tokens: raw.identity.tokens,
            },
            resources,
        })
    }
}

impl Config {
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }
}

/// `sqlite://relative.db` is relative to the config file, like every other path in it.
fn resolve_store_url(url: &str, base: &Path) -> String {
    match url.strip_prefix("sqlite://") {
        Some(p) if !p.starts_with('/') && !p.starts_with(':') => {
            format!("sqlite://{}", base.join(p).display())
        }
        _ => url.to_string(),
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok().filter(|p| *p != 0)?))
}

/// Parse "250ms", "5s", "2m", "1h", "7d".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a duration; write e.g. \"500ms\", \"5s\", \"2m\", \"1h\"")
    })?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
postgres_listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9090"
tls_cert = "pki/gateway.crt"
tls_key = "pki/gateway.key"
client_ca = "pki/ca.crt"
store = "sqlite://tollgate.db"

[roles]
admin_groups = ["sre"]

[[identity.tokens]]
subject = "ci-bot"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
groups = ["ci"]

[[resources]]
name = "orders"
kind = "postgres"
upstream = "db.internal:5432"
database = "orders"
allow_groups = ["sre", "agents"]
[resources.tls]
ca = "pki/db-ca.crt"
[resources.credentials]
user = "tollgate_orders"
password_env = "ORDERS_DB_PASSWORD"
"#;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/tollgate/tollgate.toml"))
    }

    #[test]
    fn good_config_parses_and_resolves_paths() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.server.postgres_listen.unwrap().port(), 6432);
        assert_eq!(
            c.server.tls_cert,
            PathBuf::from("/etc/tollgate/pki/gateway.crt")
        );
        assert_eq!(c.server.store, "sqlite:///etc/tollgate/tollgate.db");
        let r = c.resource("orders").unwrap();
        assert_eq!(r.tls.mode, TlsMode::VerifyFull);
        assert_eq!(r.tls.server_name, "db.internal");
        assert_eq!(r.upstream_port, 5432);
        assert_eq!(
            r.credentials.as_ref().unwrap().password,
            SecretSource::Env("ORDERS_DB_PASSWORD".into())
        );
        assert_eq!(r.line, 18);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("database = \"orders\"", "databse = \"orders\"");
        let e = p(&text).unwrap_err().to_string();
        assert!(e.contains("databse"), "{e}");
        assert!(e.contains("line 22"), "{e}");
    }

    #[test]
    fn bad_address_names_key_and_line() {
        let text = GOOD.replace("127.0.0.1:6432", "localhost6432");
        let e = p(&text).unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/tollgate/tollgate.toml:3: server.postgres_listen: \"localhost6432\" is not a socket address; write IP:PORT, e.g. \"127.0.0.1:6432\""
        );
    }

    #[test]
    fn duplicate_resource_is_refused() {
        let second = &GOOD[GOOD.find("[[resources]]").unwrap()..];
        let text = format!("{GOOD}\n{second}");
        let e = p(&text).unwrap_err().to_string();
        assert!(e.contains("duplicate resource name \"orders\""), "{e}");
        assert!(e.contains(":31:"), "{e}");
    }

    #[test]
    fn missing_file_is_clear() {
        let e = load(Path::new("/nonexistent/tollgate.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/tollgate.toml"),
            "{e}"
        );
    }

    #[test]
    fn verify_full_needs_ca() {
        let text = GOOD.replace("ca = \"pki/db-ca.crt\"", "");
        let e = p(&text).unwrap_err().to_string();
        assert!(e.contains("resources.tls.ca"), "{e}");
    }

    #[test]
    fn bad_token_hash_is_refused() {
        let text = GOOD.replace(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "secret",
        );
        let e = p(&text).unwrap_err().to_string();
        assert!(e.contains("identity.tokens.sha256"), "{e}");
        assert!(e.contains(":15:"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn scan_and_webhook_keys() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.server.scan_interval, None);
        assert_eq!(c.server.alert_webhook, None);
        let text = GOOD.replace(
            "store = \"sqlite://tollgate.db\"",
            "store = \"sqlite://tollgate.db\"\nscan_interval = \"5m\"\nalert_webhook = \"https://hooks.example/x\"",
        );
        let c = p(&text).unwrap();
        assert_eq!(c.server.scan_interval, Some(Duration::from_secs(300)));
        assert_eq!(
            c.server.alert_webhook.as_deref(),
            Some("https://hooks.example/x")
        );
        let local = text.replace("https://hooks.example/x", "http://127.0.0.1:9999/hook");
        assert!(p(&local).is_ok());
        let plain = text.replace("https://hooks.example/x", "http://hooks.example/x");
        let e = p(&plain).unwrap_err().to_string();
        assert!(e.contains(":10: server.alert_webhook"), "{e}");
        let zero = text.replace("\"5m\"", "\"0s\"");
        let e = p(&zero).unwrap_err().to_string();
        assert!(e.contains("server.scan_interval"), "{e}");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("[::1]:5432"), Some(("::1".into(), 5432)));
        assert_eq!(split_host_port("db:0"), None);
        assert_eq!(split_host_port("db"), None);
    }
}
