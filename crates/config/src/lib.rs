//! tollgate's configuration: the TOML schema of DESIGN.md as typed structs, and its validation.
//!
//! Owns parsing and checking a config file into values the rest of the gateway can trust
//! (addresses parsed, paths resolved against the config's directory, names unique).
//! It must not open sockets, read certificates or secrets: it only names them.

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
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
    /// MySQL and MariaDB clients (TLS required; `kind = "mysql"` resources).
    pub mysql_listen: Option<SocketAddr>,
    pub https_listen: Option<SocketAddr>,
    /// HTTP resources on their own listener, chosen by host name (`<resource>.<anything>`);
    /// without it they are served on `https_listen` under `/r/<name>/`.
    pub http_listen: Option<SocketAddr>,
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
    /// Where review (approval) requests are POSTed (resources without their own `review_webhook`).
    pub review_webhook: Option<String>,
    /// CA bundle trusted for https review webhooks (default: the system bundle).
    pub review_webhook_ca: Option<PathBuf>,
    pub review_webhook_format: WebhookFormat,
    /// Base URL of the gateway's web console (`https://gateway:8443`), for review links.
    pub console_url: Option<String>,
    /// Ed25519 private key (PKCS#8 PEM) that signs the caller-identity tokens HTTP resources
    /// with `identity_header` receive; its public key is served at `/.well-known/jwks.json`.
    pub identity_key: Option<PathBuf>,
    /// The CA (certificate and key, PEM) that signs the client certificates
    /// `POST /api/v1/certificates` (`tollgate login`) issues: `client_ca` itself or an
    /// intermediate signed by it. Both or neither.
    pub issuing_ca_cert: Option<PathBuf>,
    pub issuing_ca_key: Option<PathBuf>,
    /// The CA the replicas' server certificates (`tls_cert`) chain to, verified when one replica
    /// passes a cancel request on to another (default: `client_ca`).
    pub replica_ca: Option<PathBuf>,
    /// How long after its approval a held statement may be rerun without a new review (the
    /// client lost its connection, e.g. across a gateway restart).
    pub review_rerun_window: Duration,
    /// Where scan findings are POSTed as JSON (`https://...`; `http://` only to a loopback address).
    pub alert_webhook: Option<String>,
    /// CA bundle trusted for an https `alert_webhook` (default: the system bundle).
    pub alert_webhook_ca: Option<PathBuf>,
    /// Key for the `hash` masking strategy (at least 32 bytes), from `mask_key_env` or
    /// `mask_key_file`; never logged.
    pub mask_key: SecretSource,
    /// Sessions that ended longer ago than this are pruned with their events (`None`: kept forever).
    pub retention: Option<Duration>,
    /// How often the gateway records and logs an `audit.checkpoint` of every chain head.
    pub checkpoint_interval: Duration,
    /// When `Recorder::append` returns: once the journal is written, or once it is fsynced.
    pub audit_durability: AuditDurability,
    /// Record command and result events (`false` only as a benchmark baseline; `check` fails it).
    pub record_commands: bool,
    /// Certificate revocation lists (PEM or DER) client certificates are checked against,
    /// re-read with the certificates (empty: none).
    pub client_crl: Vec<PathBuf>,
    /// Client connections open at once on the PostgreSQL listener (0: unlimited).
    pub max_connections: usize,
    /// Client connections open at once from one source IP address (0: unlimited).
    pub max_connections_per_source: usize,
    /// Sessions open at once for one identity (subject) (0: unlimited).
    pub max_connections_per_identity: usize,
    /// From TCP accept to an authenticated client (TLS, start-up, authentication); longer
    /// and the connection is closed.
    pub handshake_timeout: Duration,
}

/// Default `server.max_connections`, `max_connections_per_source` and
/// `max_connections_per_identity`: high enough for a busy agent host behind a pooler.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default `server.handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditDurability {
    /// A command is forwarded once its event is in the journal (the kernel's page cache);
    /// the journal is fsynced in the background every few milliseconds (the default).
    Written,
    /// A command is forwarded only once its event is fsynced (group commit).
    Fsync,
    /// A command is forwarded only once its event is committed to the store (for a shared
    /// store: nothing acknowledged is lost with the replica's disk); refused after
    /// `audit_timeout` when the store does not answer.
    Store,
}

impl AuditDurability {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDurability::Written => "written",
            AuditDurability::Fsync => "fsync",
            AuditDurability::Store => "store",
        }
    }
}

/// Body of a review webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `{"event", "text", "review": {...}, "url", "approve_url", "deny_url"}`.
    Json,
    /// A Slack incoming-webhook message: `text` plus `blocks` with approve/deny link buttons.
    Slack,
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
    pub oidc: Vec<Oidc>,
    pub saml: Option<Saml>,
    pub tokens: Vec<StaticToken>,
    pub principals: Vec<PrincipalMapping>,
}

/// `[[identity.principals]]`: the credentials of one person (or service), which reviews then
/// count as one reviewer and never let approve each other's requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalMapping {
    /// The principal's name (no `:`), shown as the requester and reviewer.
    pub name: String,
    /// Client certificates: `spiffe://…` URIs and `cn:<common name>` (for certificates without
    /// a SPIFFE URI).
    #[serde(default)]
    pub certificates: Vec<String>,
    /// Subjects of `[[identity.tokens]]`.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// OIDC identities as `<issuer>#<subject>` (the issuer exactly as in `[[identity.oidc]]`).
    #[serde(default)]
    pub oidc: Vec<String>,
}

/// `[[identity.oidc]]`: one OpenID Connect issuer whose tokens are credentials (validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oidc {
    /// `https://…`, compared exactly with a token's `iss` and the discovery document's `issuer`.
    pub issuer: String,
    /// CA bundle for the issuer's TLS (default: the system bundle).
    pub ca: Option<PathBuf>,
    /// For `tollgate login` (not used to validate bearer tokens).
    pub client_id: Option<String>,
    /// The console's client secret, for providers whose web clients are confidential
    /// (`client_secret_env` or `client_secret_file`; never written in the config itself). Only
    /// the gateway's console sign-in sends it; `tollgate login` is a public client.
    pub client_secret: SecretSource,
    /// A token's `aud` must name at least one of these.
    pub audiences: Vec<String>,
    /// Dotted path of the groups claim (`realm_access.roles`); an absent claim means no groups.
    pub groups_claim: String,
    /// IdP group ids → tollgate groups; unmapped ids are kept as they are.
    pub group_map: std::collections::BTreeMap<String, String>,
    /// Groups every identity of this issuer gets.
    pub static_groups: Vec<String>,
    pub subject_claim: String,
    /// JWS algorithms accepted (asymmetric only: never `none`, never HS*).
    pub algorithms: Vec<String>,
    /// Longest client certificate `tollgate login` hands out.
    pub max_cert_ttl: Option<Duration>,
    /// Line of the `[[identity.oidc]]` table in the config file.
    pub line: usize,
}

/// `[identity.saml]`: one SAML 2.0 identity provider people sign in with (console and
/// `tollgate login --saml`); the gateway is the service provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saml {
    /// The IdP's metadata: a file, or an `https://` URL fetched at start-up and on reload.
    pub idp_metadata: SamlMetadataSource,
    /// CA bundle for fetching `idp_metadata_url` (default: the system bundle).
    pub ca: Option<PathBuf>,
    /// Our (the service provider's) entity id: the audience every assertion must name.
    pub entity_id: String,
    /// Where the IdP posts its answer: `<console_url>/saml/acs` unless set; every assertion's
    /// Recipient and the response's Destination must be exactly this.
    pub acs_url: String,
    /// The attribute whose values are the person's groups; absent attribute → no groups.
    pub groups_attribute: String,
    /// The attribute that names the person (default: the assertion's NameID).
    pub subject_attribute: Option<String>,
    /// IdP group names → tollgate groups; unmapped names are kept as they are.
    pub group_map: std::collections::BTreeMap<String, String>,
    /// Groups every person signed in through this IdP gets.
    pub static_groups: Vec<String>,
    /// Longest client certificate `tollgate login --saml` hands out (default 12h).
    pub max_cert_ttl: Option<Duration>,
    /// Line of the `[identity.saml]` table.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SamlMetadataSource {
    File(PathBuf),
    Url(String),
}

/// The path the gateway serves the SAML assertion consumer service at.
pub const SAML_ACS_PATH: &str = "/saml/acs";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSaml {
    idp_metadata: Option<String>,
    idp_metadata_url: Option<String>,
    ca: Option<String>,
    entity_id: Option<String>,
    acs_url: Option<String>,
    groups_attribute: Option<String>,
    subject_attribute: Option<String>,
    #[serde(default)]
    group_map: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    static_groups: Vec<String>,
    max_cert_ttl: Option<String>,
}

/// JWS algorithms an `[[identity.oidc]]` issuer may use.
pub const OIDC_ALGORITHMS: [&str; 6] = ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"];
/// Default `identity.oidc.algorithms`.
pub const DEFAULT_OIDC_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    ca: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    client_secret_file: Option<String>,
    audiences: Option<Vec<String>>,
    groups_claim: Option<String>,
    #[serde(default)]
    group_map: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    static_groups: Vec<String>,
    subject_claim: Option<String>,
    algorithms: Option<Vec<String>>,
    max_cert_ttl: Option<String>,
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
    /// MySQL: other databases on the upstream that statements may name (`db.table`, `USE db`).
    pub databases: Vec<String>,
    pub allow_groups: Vec<String>,
    pub connect_timeout: Duration,
    pub tls: UpstreamTls,
    pub credentials: Option<Credentials>,
    /// HTTP resources: the upstream's scheme, base path and injected header.
    pub http: Option<HttpUpstream>,
    /// Where review requests for this resource are POSTed (instead of `server.review_webhook`).
    pub review_webhook: Option<String>,
    /// Groups that may approve just-in-time access requests (default: `roles.admin_groups`).
    pub access_approvers: Vec<String>,
    /// Groups that may approve unmask requests, which switch masking off for the requester
    /// for a while (default: `access_approvers`).
    pub unmask_approvers: Vec<String>,
    /// Longest just-in-time access (or unmasked view) that may be requested (default 8h).
    pub max_access: Duration,
    pub rules: Vec<Rule>,
    /// `read_only = true`: every write is denied, whatever the rules say (default false).
    pub read_only: bool,
    /// What happens to SQL the parser rejects (default deny).
    pub unparsable: RuleAction,
    /// How long a held command waits for its approvals (default 5m).
    pub review_timeout: Duration,
    /// Functions treated as writes besides the built-in list (names or globs).
    pub writing_functions: Vec<String>,
    /// How code the gateway cannot see into (`DO`, `CALL`, functions not known safe) is judged.
    pub opaque_code: OpaqueCode,
    /// Functions trusted not to write (globs, e.g. `"app.format_*"`): called, they are not opaque.
    pub trusted_functions: Vec<String>,
    /// `dry_run = true`: every rule of the resource only records what it would have done.
    pub dry_run: bool,
    /// Most prepared statements (protocol-level and SQL `PREPARE`) one session may hold.
    pub max_prepared_statements: usize,
    /// Most open portals one session may hold.
    pub max_portals: usize,
    pub masks: Vec<Mask>,
    /// Record the (masked) rows of each result in its audit event, for replay.
    pub capture_results: bool,
    /// Most bytes of row data captured per result (the rest is marked truncated).
    pub capture_bytes: usize,
    /// MCP: what a tool definition that changed since it was first listed does (default off).
    pub pinning: PinMode,
    /// MCP: groups whose members may approve a changed tool definition (a `pin` review);
    /// admins always may. `[resources.pinning] approvers`.
    pub pin_approvers: Vec<String>,
    /// MCP: `aud` values an OIDC token may carry for this resource besides its URL on the
    /// gateway (RFC 8707; e.g. its public URL behind a load balancer).
    pub audiences: Vec<String>,
    /// MCP: how long a held tool call keeps its client waiting; past it the client gets an
    /// error naming the review, which stays open, and the identical call runs when repeated
    /// once approved (default 50s: MCP clients commonly give up after 60s).
    pub hold_wait: Duration,
    /// MCP: `command = [...]`, a stdio server the gateway starts per session (instead of an
    /// `upstream` URL).
    pub stdio: Option<StdioServer>,
    /// PostgreSQL: reuse of authenticated upstream sessions (`pool_mode` and its limits).
    pub pool: Pooling,
    /// Line of the `[[resources]]` entry, for error messages about it.
    pub line: usize,
}

/// `resources.pool_mode`: how a PostgreSQL resource's upstream connections are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A fresh upstream connection per client session, closed with it (the default).
    #[default]
    None,
    /// A client session has one upstream connection to itself; when it ends cleanly the
    /// connection is reset (`DISCARD ALL`) and kept for the next client of the resource.
    Session,
    /// Client sessions share `pool_size` upstream connections between transactions.
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::None => "none",
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// A PostgreSQL resource's pool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolMode,
    /// `transaction`: most upstream connections at once (default 20).
    pub size: usize,
    /// Most idle upstream connections kept per startup-parameter set (default `pool_size`).
    pub max_idle: usize,
    /// An idle upstream connection unused this long is closed (default 10m).
    pub idle_timeout: Duration,
    /// `transaction`: how long a client waits for a free upstream connection before its
    /// statement fails (default 30s).
    pub queue_timeout: Duration,
    /// Most client sessions of this resource at once (default: no cap besides the server's).
    pub max_client_conn: Option<usize>,
    /// `transaction`: extra upstream connections beyond `size` for clients that waited
    /// `reserve_timeout` (PgBouncer's `reserve_pool`; default 0, none).
    pub reserve_size: usize,
    /// How long a client waits for one of the `size` connections before it may use a reserve
    /// one (default 5s).
    pub reserve_timeout: Duration,
}

/// Default `resources.pool_size`.
pub const DEFAULT_POOL_SIZE: usize = 20;

impl Default for Pooling {
    fn default() -> Self {
        Pooling {
            mode: PoolMode::None,
            size: DEFAULT_POOL_SIZE,
            max_idle: DEFAULT_POOL_SIZE,
            idle_timeout: Duration::from_secs(600),
            queue_timeout: Duration::from_secs(30),
            max_client_conn: None,
            reserve_size: 0,
            reserve_timeout: Duration::from_secs(5),
        }
    }
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

/// What an HTTP resource's `upstream = "https://host:port/base"` and its HTTP-only keys say.
#[derive(Debug, Clone)]
pub struct HttpUpstream {
    /// `false` only for an `http://` upstream (`tls.mode = "disable"`, which `check` fails).
    pub tls: bool,
    /// Path prefix every forwarded path is appended to (`""` or `/base`, no trailing `/`).
    pub base_path: String,
    /// `[resources.credentials] header` and its value: set on every forwarded request (the
    /// client's own copy of that header, and its `Authorization`, are never forwarded).
    pub inject: Option<(String, SecretSource)>,
    /// What happens to a response body masks cannot be applied to (binary, unknown encoding).
    pub unmaskable: Unmaskable,
    /// Header the caller's identity is passed upstream in (a short-lived JWT signed by the
    /// gateway); client-supplied copies are always stripped.
    pub identity_header: Option<String>,
    /// Largest request body the gateway reads (it holds a body to digest it for reviews).
    pub max_request_body: usize,
    /// How long the upstream may take to answer a forwarded request (its status and headers;
    /// a body may stream for longer).
    pub response_timeout: Duration,
}

/// A stdio MCP server (`command`): started by the gateway, one process per MCP session, with
/// nothing of the gateway's environment but what is listed here.
#[derive(Debug, Clone)]
pub struct StdioServer {
    /// Program and arguments (no shell).
    pub command: Vec<String>,
    /// `env = { NAME = "value" }`: variables set as written (not secrets).
    pub env: Vec<(String, String)>,
    /// `env_inherit`: variables copied from the gateway's environment when set there (default
    /// [`DEFAULT_ENV_INHERIT`]).
    pub env_inherit: Vec<String>,
    /// `[resources.credentials] env` and `value_env`/`value_file`: a secret set in the
    /// process's environment under that name.
    pub credential: Option<(String, SecretSource)>,
    /// Working directory (default: the gateway's).
    pub cwd: Option<PathBuf>,
    /// Most processes of this resource alive at once (default 16).
    pub max_processes: usize,
    /// A process whose session sees no request for this long is stopped (default 15m).
    pub idle_timeout: Duration,
}

/// Variables a stdio server inherits from the gateway unless `env_inherit` says otherwise:
/// what finding programs and writing files needs, no credentials.
pub const DEFAULT_ENV_INHERIT: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR"];

/// Default `resources.response_timeout` of HTTP resources.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// `[resources.pinning] mode` of MCP resources: each tool's definition (name, title,
/// description, annotations, input and output schema) is fingerprinted when first listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinMode {
    /// Definitions are not fingerprinted.
    #[default]
    Off,
    /// A changed definition is recorded (`mcp.pin_changed`) and counted; the tool stays usable.
    Warn,
    /// A changed definition is recorded, and the tool is left out of listings and its calls
    /// refused.
    Enforce,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPinning {
    mode: PinMode,
    #[serde(default)]
    approvers: Vec<String>,
}

/// `resources.unmaskable`: a response body masks apply to but cannot be masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmaskable {
    /// Refuse it (502 with a JSON error): the default when masks apply.
    Refuse,
    /// Pass it unmasked (recorded as such).
    Pass,
}

/// Default `resources.max_request_body` of HTTP resources.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

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
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display())),
        }
    }
}

/// A guardrail of a resource: which commands it matches, and what happens to them.
///
/// Rules are tried in order; the first that matches decides. Every condition that is set must
/// hold (an empty list means "any").
#[derive(Debug, Clone)]
pub struct Rule {
    /// `name = "..."`, or "rule N" (N its 1-based position in the resource); named in denials.
    pub name: String,
    /// Statement kinds (see [`STATEMENT_KINDS`]).
    pub statements: Vec<String>,
    /// Table globs; a pattern without a dot matches the table in any schema.
    pub tables: Vec<String>,
    /// The caller is in one of these groups.
    pub groups: Vec<String>,
    /// The caller's subject matches one of these globs.
    pub identities: Vec<String>,
    /// A called function matches one of these globs.
    pub functions: Vec<String>,
    /// HTTP: the request method (upper case) is one of these.
    pub methods: Vec<String>,
    /// HTTP: the normalised request path matches one of these globs (`*` one segment, `**` any).
    pub paths: Vec<String>,
    /// HTTP: each named query parameter is present with a value matching the glob.
    pub query: Vec<(String, String)>,
    /// HTTP: each named header (case-insensitive) is present with a value matching the glob.
    pub headers: Vec<(String, String)>,
    /// MCP: a `tools/call` whose tool name matches one of these globs.
    pub tools: Vec<String>,
    /// MCP: a `resources/read` whose URI matches one of these globs.
    pub resources: Vec<String>,
    /// MCP: a `prompts/get` whose prompt name matches one of these globs.
    pub prompts: Vec<String>,
    /// MCP: each JSON path (`$.project`) selects a value of the call's arguments that, as a
    /// string, matches the glob.
    pub arguments: Vec<(String, String)>,
    /// `true`: matches only statements holding an UPDATE or DELETE without WHERE.
    pub where_missing: bool,
    /// Matches only inside this daily window (UTC).
    pub hours: Option<HourWindow>,
    /// Matches only on these days (UTC); empty means every day.
    pub days: Vec<Weekday>,
    pub action: RuleAction,
    pub approvers: Vec<String>,
    /// Approvals a review needs (default 1).
    pub min_approvals: u32,
    pub message: Option<String>,
    /// `dry_run = true`: the rule only records what it would have done (`decision.dry_run` in
    /// the command event); the next rules decide.
    pub dry_run: bool,
    /// Line of the `[[resources.rules]]` entry.
    pub line: usize,
}

/// Statement kinds a rule's `statements` may name. `ddl` covers create, alter, drop, truncate
/// and comment; `write` any statement that can change data, schema, privileges or settings that
/// protect them; `copy_from`/`copy_to`/`copy_program` narrow `copy`; `transaction` covers
/// begin, commit, rollback and savepoint.
#[rustfmt::skip]
pub const STATEMENT_KINDS: &[&str] = &[
    "select", "insert", "update", "delete", "merge", "ddl", "create", "alter", "drop",
    "truncate", "comment", "grant", "revoke", "copy", "copy_from", "copy_to", "copy_program",
    "call", "do", "set", "reset", "show", "transaction", "begin", "commit", "rollback",
    "savepoint", "prepare", "execute", "deallocate", "explain", "listen", "notify", "unlisten",
    "lock", "vacuum", "analyze", "refresh", "cursor", "discard", "other", "write",
];

/// A daily time window `HH:MM-HH:MM` in UTC, in minutes since midnight; `start > end` wraps
/// past midnight (`22:00-06:00`). The end is exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourWindow {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl HourWindow {
    pub fn contains(&self, minute_of_day: u16) -> bool {
        if self.start_minute <= self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start_minute || minute_of_day < self.end_minute
        }
    }

    fn parse(s: &str) -> Option<HourWindow> {
        fn hm(s: &str) -> Option<u16> {
            let (h, m) = s.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        }
        let (a, b) = s.split_once('-')?;
        let (start_minute, end_minute) = (hm(a)?, hm(b)?);
        (start_minute != end_minute).then_some(HourWindow {
            start_minute,
            end_minute,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// Monday is 0.
    pub fn from_monday0(n: u8) -> Weekday {
        [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
            Weekday::Sat,
            Weekday::Sun,
        ][usize::from(n % 7)]
    }

    /// `mon` ... `sun`, or the full English name, in any case.
    fn parse(s: &str) -> Option<Weekday> {
        const NAMES: [&str; 7] = [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ];
        let s = s.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .position(|full| s == *full || (s.len() == 3 && full.starts_with(&s)))
            .map(|i| Weekday::from_monday0(i as u8))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
    Review,
}

/// `resources.opaque_code`: how `DO`, `CALL` and calls of functions that are not known safe are
/// judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpaqueCode {
    /// As possibly any write: the strictest decision any write kind would get (the default).
    Strict,
    /// By their own kind only (`do`, `call`, or the statement around the call): the behaviour
    /// before opaque code was judged strictly; `tollgate check` flags it.
    Kind,
}

/// Default `resources.max_prepared_statements`.
pub const DEFAULT_MAX_PREPARED_STATEMENTS: usize = 10_000;
/// Default `resources.max_portals`.
pub const DEFAULT_MAX_PORTALS: usize = 10_000;

/// Default `resources.hold_wait` of MCP resources.
pub const DEFAULT_HOLD_WAIT: Duration = Duration::from_secs(50);

/// Default `resources.review_timeout`: how long a held command waits for its approvals.
pub const DEFAULT_REVIEW_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    #[serde(default)]
    statements: Vec<Spanned<String>>,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    query: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    tools: Vec<Spanned<String>>,
    #[serde(default)]
    resources: Vec<Spanned<String>>,
    #[serde(default)]
    prompts: Vec<Spanned<String>>,
    #[serde(default)]
    arguments: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    where_missing: bool,
    hours: Option<Spanned<String>>,
    #[serde(default)]
    days: Vec<Spanned<String>>,
    action: RuleAction,
    #[serde(default)]
    approvers: Vec<String>,
    min_approvals: Option<Spanned<i64>>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

impl Ctx<'_> {
    /// Validate a resource's rules: known statement kinds, time windows, approval counts.
    fn rules(
        &self,
        raw: Vec<Spanned<RawRule>>,
        kind: ResourceKind,
    ) -> Result<Vec<Rule>, ConfigError> {
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, spanned) in raw.into_iter().enumerate() {
            let at = spanned.span().start;
            let r = spanned.into_inner();
            let key = |k: &str| format!("resources.rules[{i}].{k}");
            let name = match r.name {
                None => format!("rule {}", i + 1),
                Some(n) => {
                    let n_at = n.span().start;
                    let n = n.into_inner();
                    if n.trim().is_empty() {
                        return Err(self.invalid(n_at, &key("name"), "must not be empty"));
                    }
                    n
                }
            };
            if !names.insert(name.clone()) {
                return Err(self.invalid(
                    at,
                    &key("name"),
                    format!("duplicate rule name {name:?} in this resource"),
                ));
            }
            let sql_only = !r.statements.is_empty()
                || !r.tables.is_empty()
                || !r.functions.is_empty()
                || r.where_missing;
            let http_only = !r.methods.is_empty()
                || !r.paths.is_empty()
                || !r.query.is_empty()
                || !r.headers.is_empty();
            let mcp_only = !r.tools.is_empty()
                || !r.resources.is_empty()
                || !r.prompts.is_empty()
                || !r.arguments.is_empty();
            let matches_what = match kind {
                ResourceKind::Http => {
                    "an http resource's rules match methods, paths, query and headers"
                }
                ResourceKind::Mcp => {
                    "an mcp resource's rules match tools, resources, prompts and arguments"
                }
                _ => "a database resource's rules match statements, tables and functions",
            };
            let is_sql = matches!(kind, ResourceKind::Postgres | ResourceKind::Mysql);
            if sql_only && !is_sql {
                return Err(self.invalid(
                    at,
                    &key("statements"),
                    format!(
                        "statements, tables, functions and where_missing match SQL; {matches_what}"
                    ),
                ));
            }
            if http_only && kind != ResourceKind::Http {
                return Err(self.invalid(
                    at,
                    &key("methods"),
                    format!(
                        "methods, paths, query and headers match HTTP requests; {matches_what}"
                    ),
                ));
            }
            if mcp_only && kind != ResourceKind::Mcp {
                return Err(self.invalid(at, &key("tools"), format!("tools, resources, prompts and arguments match MCP requests; {matches_what}")));
            }
            let mcp_names = |list: Vec<Spanned<String>>, what: &str| {
                let mut out = Vec::with_capacity(list.len());
                for g in list {
                    if g.get_ref().trim().is_empty() {
                        return Err(self.invalid(
                            g.span().start,
                            &key(what),
                            "must not be empty (globs: `*` any characters, `?` one)",
                        ));
                    }
                    out.push(g.into_inner());
                }
                Ok(out)
            };
            let tools = mcp_names(r.tools, "tools")?;
            let mcp_resources = mcp_names(r.resources, "resources")?;
            let prompts = mcp_names(r.prompts, "prompts")?;
            for path in r.arguments.keys() {
                if !(path.starts_with("$.") || path.starts_with("$[")) || path.len() < 3 {
                    return Err(self.invalid(at, &key("arguments"), format!("{path:?} is not a JSON path into the call's arguments; write e.g. \"$.project\" or \"$.items[*].id\"")));
                }
            }
            let mut methods = Vec::with_capacity(r.methods.len());
            for m in r.methods {
                let upper = m.get_ref().trim().to_ascii_uppercase();
                if upper.is_empty()
                    || !upper
                        .bytes()
                        .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'*')
                {
                    return Err(self.invalid(m.span().start, &key("methods"), format!("{:?} is not an HTTP method (e.g. \"GET\", \"DELETE\", or \"*\" for any)", m.get_ref())));
                }
                methods.push(upper);
            }
            let mut paths = Vec::with_capacity(r.paths.len());
            for p in r.paths {
                if !p.get_ref().starts_with('/') {
                    return Err(self.invalid(p.span().start, &key("paths"), format!("{:?} must start with '/' (globs: `*` one path segment, `**` any number of segments)", p.get_ref())));
                }
                paths.push(p.into_inner());
            }
            let mut statements = Vec::with_capacity(r.statements.len());
            for s in r.statements {
                let kind = s.get_ref().trim().to_ascii_lowercase();
                if !STATEMENT_KINDS.contains(&kind.as_str()) {
                    return Err(self.invalid(
                        s.span().start,
                        &key("statements"),
                        format!(
                            "unknown statement kind {:?}; use one of: {}",
                            s.get_ref(),
                            STATEMENT_KINDS.join(", ")
                        ),
                    ));
                }
                statements.push(kind);
            }
            let hours = match r.hours {
                None => None,
                Some(h) => Some(HourWindow::parse(h.get_ref()).ok_or_else(|| {
                    self.invalid(
                        h.span().start,
                        &key("hours"),
                        format!(
                            "{:?} is not a time window; write \"HH:MM-HH:MM\" in UTC, e.g. \"09:00-17:00\" (\"22:00-06:00\" wraps past midnight)",
                            h.get_ref()
                        ),
                    )
                })?),
            };
            let mut days = Vec::with_capacity(r.days.len());
            for d in r.days {
                days.push(Weekday::parse(d.get_ref()).ok_or_else(|| {
                    self.invalid(
                        d.span().start,
                        &key("days"),
                        format!(
                            "{:?} is not a day; use mon, tue, wed, thu, fri, sat or sun",
                            d.get_ref()
                        ),
                    )
                })?);
            }
            let min_approvals = match r.min_approvals {
                None => 1,
                Some(m) => u32::try_from(*m.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        self.invalid(
                            m.span().start,
                            &key("min_approvals"),
                            format!("{} must be a whole number, at least 1", m.get_ref()),
                        )
                    })?,
            };
            if min_approvals > 1 && r.action != RuleAction::Review {
                return Err(self.invalid(
                    at,
                    &key("min_approvals"),
                    "only applies to action = \"review\"",
                ));
            }
            out.push(Rule {
                name,
                statements,
                tables: r.tables,
                groups: r.groups,
                identities: r.identities,
                functions: r.functions,
                methods,
                paths,
                query: r.query.into_iter().collect(),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
                tools,
                resources: mcp_resources,
                prompts,
                arguments: r.arguments.into_iter().collect(),
                where_missing: r.where_missing,
                hours,
                days,
                action: r.action,
                approvers: r.approvers,
                min_approvals,
                message: r.message,
                dry_run: r.dry_run,
                line: self.line_of(at),
            });
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mask {
    /// Column name globs (`email`, `*ssn*`, `customers.card_*`): the whole value is masked.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Column type names (`text`, `jsonb`, `inet`, ...; see `tollgate_mask::FieldType`): the
    /// whole value of such columns is masked.
    #[serde(default)]
    pub types: Vec<String>,
    /// Content detectors: matches inside any column's value are masked.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Paths inside json/jsonb values (`$.email`, `$.cards[*].number`, `$..ssn`).
    #[serde(default)]
    pub json_paths: Vec<String>,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// For `partial`: how many trailing characters stay visible (default 4).
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Viewers in any of these groups see the original values.
    #[serde(default)]
    pub except_groups: Vec<String>,
    /// When set, the rule applies only to viewers in one of these groups.
    #[serde(default)]
    pub only_groups: Vec<String>,
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
    mysql_listen: Option<Spanned<String>>,
    https_listen: Option<Spanned<String>>,
    http_listen: Option<Spanned<String>>,
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
    review_webhook: Option<Spanned<String>>,
    review_webhook_ca: Option<String>,
    review_webhook_format: Option<WebhookFormat>,
    console_url: Option<Spanned<String>>,
    identity_key: Option<String>,
    issuing_ca_cert: Option<Spanned<String>>,
    issuing_ca_key: Option<Spanned<String>>,
    replica_ca: Option<String>,
    review_rerun_window: Option<Spanned<String>>,
    alert_webhook: Option<Spanned<String>>,
    alert_webhook_ca: Option<String>,
    mask_key_env: Option<String>,
    mask_key_file: Option<String>,
    retention: Option<Spanned<String>>,
    checkpoint_interval: Option<Spanned<String>>,
    audit_durability: Option<Spanned<String>>,
    record_commands: Option<bool>,
    client_crl: Option<Vec<String>>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    max_connections_per_identity: Option<usize>,
    handshake_timeout: Option<Spanned<String>>,
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
    /// `[[identity.oidc]]`, checked by hand so a single `[identity.oidc]` table gets a clear error.
    oidc: Option<Spanned<toml::Value>>,
    /// `[identity.saml]`, checked by hand so errors name its line.
    saml: Option<Spanned<toml::Value>>,
    #[serde(default)]
    tokens: Vec<StaticToken>,
    #[serde(default)]
    principals: Vec<PrincipalMapping>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: Spanned<String>,
    kind: ResourceKind,
    upstream: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    env: Option<std::collections::BTreeMap<String, String>>,
    env_inherit: Option<Vec<String>>,
    cwd: Option<String>,
    max_processes: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    database: Option<String>,
    #[serde(default)]
    databases: Vec<String>,
    #[serde(default)]
    allow_groups: Vec<String>,
    connect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    tls: RawUpstreamTls,
    credentials: Option<RawCredentials>,
    review_webhook: Option<Spanned<String>>,
    access_approvers: Option<Vec<String>>,
    unmask_approvers: Option<Vec<String>>,
    max_access: Option<Spanned<String>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    read_only: bool,
    unparsable: Option<RuleAction>,
    review_timeout: Option<Spanned<String>>,
    #[serde(default)]
    writing_functions: Vec<String>,
    opaque_code: Option<OpaqueCode>,
    #[serde(default)]
    trusted_functions: Vec<String>,
    #[serde(default)]
    dry_run: bool,
    max_prepared_statements: Option<Spanned<i64>>,
    max_portals: Option<Spanned<i64>>,
    pool_mode: Option<Spanned<PoolMode>>,
    pool_size: Option<Spanned<i64>>,
    pool_max_idle: Option<Spanned<i64>>,
    pool_idle_timeout: Option<Spanned<String>>,
    pool_timeout: Option<Spanned<String>>,
    max_client_conn: Option<Spanned<i64>>,
    reserve_pool: Option<Spanned<i64>>,
    reserve_pool_timeout: Option<Spanned<String>>,
    #[serde(default)]
    masks: Vec<Mask>,
    capture_results: Option<bool>,
    capture_bytes: Option<Spanned<i64>>,
    pinning: Option<RawPinning>,
    audiences: Option<Vec<String>>,
    hold_wait: Option<Spanned<String>>,
    unmaskable: Option<Unmaskable>,
    identity_header: Option<String>,
    max_request_body: Option<Spanned<i64>>,
    response_timeout: Option<Spanned<String>>,
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
    user: Option<String>,
    password_env: Option<String>,
    password_file: Option<String>,
    /// HTTP: the header injected upstream, and its value.
    header: Option<String>,
    /// stdio MCP: the environment variable the value is set in.
    env: Option<String>,
    value_env: Option<String>,
    value_file: Option<String>,
}

/// Default largest protocol message (PostgreSQL's own limit for most messages is 1 GB; 64 MiB
/// keeps a hostile client from making the gateway allocate without bound).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Default `server.checkpoint_interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);
/// Default and largest `resources.capture_bytes`.
pub const DEFAULT_CAPTURE_BYTES: usize = 64 * 1024;
pub const MAX_CAPTURE_BYTES: usize = 16 * 1024 * 1024;

/// Default `server.review_rerun_window`.
pub const DEFAULT_REVIEW_RERUN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Default `resources.max_access`.
pub const DEFAULT_MAX_ACCESS: Duration = Duration::from_secs(8 * 3600);

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

    /// Names are distinct and hold no `:` (which credential principals such as `cert:cn:alice`
    /// do), and a credential belongs to one principal at most.
    fn check_principals(&self, principals: &[PrincipalMapping]) -> Result<(), ConfigError> {
        let at = |needle: &str| self.text.find(needle).unwrap_or(0);
        let mut names = HashSet::new();
        let mut owner: HashMap<String, &str> = HashMap::new();
        for p in principals {
            if p.name.trim().is_empty() || p.name.contains(':') {
                return Err(self.invalid(
                    at(&p.name),
                    "identity.principals.name",
                    format!(
                        "{:?} is not a principal name: it must be non-empty and hold no ':'",
                        p.name
                    ),
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(self.invalid(
                    at(&p.name),
                    "identity.principals.name",
                    format!("principal {:?} is defined twice", p.name),
                ));
            }
            for c in &p.certificates {
                let cn = c.strip_prefix("cn:").filter(|cn| !cn.is_empty());
                if cn.is_none() && !c.starts_with("spiffe://") {
                    return Err(self.invalid(at(c), "identity.principals.certificates", format!("{c:?}: certificates are named by SPIFFE URI (spiffe://...) or by common name (cn:NAME)")));
                }
            }
            for o in &p.oidc {
                if !o
                    .split_once('#')
                    .is_some_and(|(i, s)| i.starts_with("https://") && !s.is_empty())
                {
                    return Err(self.invalid(at(o), "identity.principals.oidc", format!("{o:?}: OIDC identities are named <issuer>#<subject>, e.g. \"https://idp.example.com#alice@example.com\"")));
                }
            }
            let credentials = p.certificates.iter().map(|c| format!("certificate {c}"));
            let credentials = credentials.chain(p.oidc.iter().map(|o| format!("oidc {o}")));
            for credential in credentials.chain(p.tokens.iter().map(|t| format!("token {t}"))) {
                if let Some(other) = owner.insert(credential.clone(), &p.name) {
                    if other != p.name {
                        return Err(self.invalid(
                            at(&p.name),
                            "identity.principals",
                            format!("{credential} belongs to both {other:?} and {:?}", p.name),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// `[[identity.oidc]]`: each issuer validated, errors at the line of its table.
    fn oidc(&self, v: Option<Spanned<toml::Value>>) -> Result<Vec<Oidc>, ConfigError> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let at = v.span().start;
        let items = match v.into_inner() {
            toml::Value::Array(items) => items,
            _ => {
                return Err(self.invalid(at, "identity.oidc", "OpenID Connect issuers are an array of tables, one per issuer: write [[identity.oidc]] (double brackets), not [identity.oidc]"));
            }
        };
        // Each table starts at its own `[[identity.oidc]]` header (or the inline array).
        let headers: Vec<usize> = self
            .text
            .match_indices("[[identity.oidc]]")
            .map(|(i, _)| i)
            .collect();
        let mut out: Vec<Oidc> = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let at = headers.get(i).copied().unwrap_or(at);
            let raw: RawOidc = item
                .try_into()
                .map_err(|e: toml::de::Error| self.invalid(at, "identity.oidc", e.message()))?;
            let bad =
                |key: &str, msg: String| self.invalid(at, &format!("identity.oidc.{key}"), msg);
            let issuer = raw.issuer;
            let rest = issuer.strip_prefix("https://").ok_or_else(|| {
                bad("issuer", format!("{issuer:?}: the issuer must be an https:// URL (tokens and keys are fetched from it)"))
            })?;
            let host = rest.split('/').next().unwrap_or("");
            if host.is_empty() || host.contains('@') || issuer.contains(['?', '#']) {
                return Err(bad(
                    "issuer",
                    format!("{issuer:?}: the issuer must be an https:// URL with a host and no credentials, query or fragment"),
                ));
            }
            if out.iter().any(|o| o.issuer == issuer) {
                return Err(bad(
                    "issuer",
                    format!("issuer {issuer:?} is configured twice"),
                ));
            }
            let audiences = raw.audiences.unwrap_or_default();
            if audiences.is_empty() || audiences.iter().any(|a| a.trim().is_empty()) {
                return Err(bad("audiences", format!("issuer {issuer:?}: audiences must list the accepted `aud` values (e.g. [\"tollgate\"]); a token for another service must not be accepted here")));
            }
            let claim = |key: &str,
                         v: Option<String>,
                         default: &str|
             -> Result<String, ConfigError> {
                let v = v.unwrap_or_else(|| default.to_string());
                if v.is_empty() || v.split('.').any(str::is_empty) {
                    return Err(bad(key, format!("{v:?} is not a claim name or dotted path (e.g. \"groups\" or \"realm_access.roles\")")));
                }
                Ok(v)
            };
            let groups_claim = claim("groups_claim", raw.groups_claim, "groups")?;
            let subject_claim = claim("subject_claim", raw.subject_claim, "sub")?;
            let algorithms = raw
                .algorithms
                .unwrap_or_else(|| DEFAULT_OIDC_ALGORITHMS.map(String::from).to_vec());
            if algorithms.is_empty() {
                return Err(bad("algorithms", "at least one algorithm is needed".into()));
            }
            for a in &algorithms {
                if a.eq_ignore_ascii_case("none") {
                    return Err(bad(
                        "algorithms",
                        "\"none\" is never accepted: an unsigned token proves nothing".into(),
                    ));
                }
                if a.to_ascii_uppercase().starts_with("HS") {
                    return Err(bad("algorithms", format!("{a:?} is never accepted: HMAC algorithms use a shared secret, and with an issuer's public key anyone could forge tokens; use {}", OIDC_ALGORITHMS.join(", "))));
                }
                if !OIDC_ALGORITHMS.contains(&a.as_str()) {
                    return Err(bad(
                        "algorithms",
                        format!("{a:?} is not supported; use {}", OIDC_ALGORITHMS.join(", ")),
                    ));
                }
            }
            let max_cert_ttl = raw
                .max_cert_ttl
                .map(|s| parse_duration(&s).map_err(|m| bad("max_cert_ttl", m)))
                .transpose()?;
            let client_secret = match (raw.client_secret_env, raw.client_secret_file) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "client_secret_env",
                        "set one of client_secret_env or client_secret_file, not both".into(),
                    ))
                }
                (Some(v), None) => SecretSource::Env(v),
                (None, Some(p)) => SecretSource::File(self.resolve(&p)),
                (None, None) => SecretSource::None,
            };
            if client_secret != SecretSource::None && raw.client_id.is_none() {
                return Err(bad(
                    "client_secret_env",
                    "a client secret belongs to a client: set client_id too".into(),
                ));
            }
            out.push(Oidc {
                issuer,
                ca: raw.ca.map(|p| self.resolve(&p)),
                client_id: raw.client_id,
                client_secret,
                audiences,
                groups_claim,
                group_map: raw.group_map,
                static_groups: raw.static_groups,
                subject_claim,
                algorithms,
                max_cert_ttl,
                line: self.line_of(at),
            });
        }
        Ok(out)
    }

    /// `[identity.saml]`: one IdP; `console_url` gives the default ACS URL.
    fn saml(
        &self,
        v: Option<Spanned<toml::Value>>,
        console_url: Option<&str>,
    ) -> Result<Option<Saml>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let at = v.span().start;
        let at = self.text.find("[identity.saml]").unwrap_or(at);
        let bad = |key: &str, msg: String| self.invalid(at, &format!("identity.saml.{key}"), msg);
        let raw: RawSaml = match v.into_inner() {
            t @ toml::Value::Table(_) => t
                .try_into()
                .map_err(|e: toml::de::Error| self.invalid(at, "identity.saml", e.message()))?,
            _ => return Err(self.invalid(
                at,
                "identity.saml",
                "the SAML identity provider is one table: write [identity.saml] (single brackets)",
            )),
        };
        let idp_metadata = match (raw.idp_metadata, raw.idp_metadata_url) {
            (Some(f), None) => SamlMetadataSource::File(self.resolve(&f)),
            (None, Some(u)) => {
                let host = u.strip_prefix("https://").map(|r| r.split('/').next().unwrap_or(""));
                if host.is_none_or(|h| h.is_empty() || h.contains('@')) {
                    return Err(bad("idp_metadata_url", format!("{u:?} must be an https:// URL with a host and no credentials: the IdP's signing keys come from it")));
                }
                SamlMetadataSource::Url(u)
            }
            (Some(_), Some(_)) => return Err(bad("idp_metadata", "set idp_metadata (a file) or idp_metadata_url, not both".into())),
            (None, None) => return Err(bad("idp_metadata", "the IdP's metadata is needed (its entity id, sign-in URL and signing certificate): set idp_metadata = \"FILE\" or idp_metadata_url = \"https://…\"".into())),
        };
        let entity_id = raw.entity_id.filter(|e| !e.trim().is_empty()).ok_or_else(|| {
            bad("entity_id", "the gateway's SAML entity id is needed (e.g. \"https://gw.example/saml\"): every assertion must name it as its audience".into())
        })?;
        let acs_url = match (raw.acs_url, console_url) {
            (Some(a), _) => a,
            (None, Some(c)) => format!("{}{SAML_ACS_PATH}", c.trim_end_matches('/')),
            (None, None) => return Err(bad("acs_url", format!("set identity.saml.acs_url (e.g. \"https://gw.example:8443{SAML_ACS_PATH}\") or server.console_url: the IdP posts its answer there, and every assertion must name it"))),
        };
        let scheme_ok = acs_url.starts_with("https://") || acs_url.starts_with("http://");
        if !scheme_ok || !acs_url.ends_with(SAML_ACS_PATH) || acs_url.contains(['?', '#']) {
            return Err(bad("acs_url", format!("{acs_url:?} must be the gateway's URL ending in {SAML_ACS_PATH} (e.g. \"https://gw.example:8443{SAML_ACS_PATH}\")")));
        }
        let attribute = |key: &str, v: Option<String>| -> Result<Option<String>, ConfigError> {
            match v {
                Some(a) if a.trim().is_empty() => {
                    Err(bad(key, "an attribute name must not be empty".into()))
                }
                v => Ok(v),
            }
        };
        let groups_attribute =
            attribute("groups_attribute", raw.groups_attribute)?.unwrap_or_else(|| "groups".into());
        let subject_attribute = attribute("subject_attribute", raw.subject_attribute)?;
        let max_cert_ttl = raw
            .max_cert_ttl
            .map(|s| parse_duration(&s).map_err(|m| bad("max_cert_ttl", m)))
            .transpose()?;
        Ok(Some(Saml {
            idp_metadata,
            ca: raw.ca.map(|p| self.resolve(&p)),
            entity_id,
            acs_url,
            groups_attribute,
            subject_attribute,
            group_map: raw.group_map,
            static_groups: raw.static_groups,
            max_cert_ttl,
            line: self.line_of(at),
        }))
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

    /// `pool_mode` and its limits: PostgreSQL resources only.
    fn pooling(&self, r: &RawResource, name: &str) -> Result<Pooling, ConfigError> {
        if r.kind != ResourceKind::Postgres {
            let set = [
                ("pool_mode", r.pool_mode.as_ref().map(|v| v.span().start)),
                ("pool_size", r.pool_size.as_ref().map(|v| v.span().start)),
                (
                    "pool_max_idle",
                    r.pool_max_idle.as_ref().map(|v| v.span().start),
                ),
                (
                    "pool_idle_timeout",
                    r.pool_idle_timeout.as_ref().map(|v| v.span().start),
                ),
                (
                    "pool_timeout",
                    r.pool_timeout.as_ref().map(|v| v.span().start),
                ),
                (
                    "max_client_conn",
                    r.max_client_conn.as_ref().map(|v| v.span().start),
                ),
                (
                    "reserve_pool",
                    r.reserve_pool.as_ref().map(|v| v.span().start),
                ),
                (
                    "reserve_pool_timeout",
                    r.reserve_pool_timeout.as_ref().map(|v| v.span().start),
                ),
            ];
            if let Some((key, Some(at))) = set.into_iter().find(|(_, at)| at.is_some()) {
                return Err(self.invalid(
                    at,
                    &format!("resources.{key}"),
                    format!("resource {name:?}: connection pooling applies to postgres resources, not {}", r.kind),
                ));
            }
        }
        let d = Pooling::default();
        let size = self.count("resources.pool_size", r.pool_size.clone(), d.size)?;
        Ok(Pooling {
            mode: r.pool_mode.as_ref().map_or(d.mode, |m| *m.get_ref()),
            size,
            max_idle: self.count("resources.pool_max_idle", r.pool_max_idle.clone(), size)?,
            idle_timeout: self.duration(
                "resources.pool_idle_timeout",
                r.pool_idle_timeout.clone(),
                d.idle_timeout,
            )?,
            queue_timeout: self.duration(
                "resources.pool_timeout",
                r.pool_timeout.clone(),
                d.queue_timeout,
            )?,
            max_client_conn: match &r.max_client_conn {
                None => None,
                Some(_) => {
                    Some(self.count("resources.max_client_conn", r.max_client_conn.clone(), 1)?)
                }
            },
            reserve_size: self.count_from(
                "resources.reserve_pool",
                r.reserve_pool.clone(),
                d.reserve_size,
                0,
            )?,
            reserve_timeout: self.duration(
                "resources.reserve_pool_timeout",
                r.reserve_pool_timeout.clone(),
                d.reserve_timeout,
            )?,
        })
    }

    /// A positive whole number, or `default` when absent.
    fn count(
        &self,
        key: &str,
        v: Option<Spanned<i64>>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        self.count_from(key, v, default, 1)
    }

    /// A whole number of at least `min`, or `default` when absent.
    fn count_from(
        &self,
        key: &str,
        v: Option<Spanned<i64>>,
        default: usize,
        min: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) => usize::try_from(*n.get_ref())
                .ok()
                .filter(|n| *n >= min)
                .ok_or_else(|| {
                    self.invalid(
                        n.span().start,
                        key,
                        format!("{} must be a whole number, at least {min}", n.get_ref()),
                    )
                }),
        }
    }

    /// An optional duration that must be at least `min`.
    fn min_duration(
        &self,
        key: &str,
        v: Option<Spanned<String>>,
        min: Duration,
        example: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let at = v.span().start;
        let d = self.duration(key, Some(v), Duration::ZERO)?;
        if d < min {
            return Err(self.invalid(
                at,
                key,
                format!("must be at least {}ms ({example})", min.as_millis()),
            ));
        }
        Ok(Some(d))
    }

    /// An `https://` URL (plain `http://` only to a loopback HOST:PORT, for local relays and tests).
    fn webhook_url(
        &self,
        key: &str,
        v: Option<Spanned<String>>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
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
                key,
                format!("{url:?} must be an https:// URL (plain http:// only to a loopback HOST:PORT, for local relays and tests)"),
            ));
        }
        Ok(Some(v.into_inner()))
    }

    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let s = raw.server;
        let interval_at =
            (s.checkpoint_interval.as_ref().or(s.retention.as_ref())).map_or(0, |v| v.span().start);
        let server = Server {
            postgres_listen: self.addr("server.postgres_listen", s.postgres_listen)?,
            mysql_listen: self.addr("server.mysql_listen", s.mysql_listen)?,
            https_listen: self.addr("server.https_listen", s.https_listen)?,
            http_listen: self.addr("server.http_listen", s.http_listen)?,
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
            alert_webhook: self.webhook_url("server.alert_webhook", s.alert_webhook)?,
            alert_webhook_ca: s.alert_webhook_ca.as_deref().map(|p| self.resolve(p)),
            review_webhook: self.webhook_url("server.review_webhook", s.review_webhook)?,
            review_webhook_ca: s.review_webhook_ca.as_deref().map(|p| self.resolve(p)),
            review_webhook_format: s.review_webhook_format.unwrap_or(WebhookFormat::Json),
            identity_key: s.identity_key.as_deref().map(|p| self.resolve(p)),
            issuing_ca_cert: s.issuing_ca_cert.as_ref().map(|p| self.resolve(p.get_ref())),
            issuing_ca_key: s.issuing_ca_key.as_ref().map(|p| self.resolve(p.get_ref())),
            replica_ca: s.replica_ca.as_deref().map(|p| self.resolve(p)),
            console_url: self
                .webhook_url("server.console_url", s.console_url)?
                .map(|u| u.trim_end_matches('/').to_string()),
            review_rerun_window: self.duration(
                "server.review_rerun_window",
                s.review_rerun_window,
                DEFAULT_REVIEW_RERUN_WINDOW,
            )?,
            mask_key: match (s.mask_key_env, s.mask_key_file) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(
                        self.text.find("mask_key_file").unwrap_or(0),
                        "server.mask_key_file",
                        "set one of mask_key_env or mask_key_file, not both",
                    ))
                }
                (Some(v), None) => SecretSource::Env(v),
                (None, Some(p)) => SecretSource::File(self.resolve(&p)),
                (None, None) => SecretSource::None,
            },
            retention: self.min_duration(
                "server.retention",
                s.retention,
                Duration::from_secs(1),
                "e.g. \"90d\"; remove the key to keep sessions forever",
            )?,
            checkpoint_interval: self
                .min_duration(
                    "server.checkpoint_interval",
                    s.checkpoint_interval,
                    Duration::from_millis(100),
                    "e.g. \"5m\"",
                )?
                .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL),
            audit_durability: match s.audit_durability {
                None => AuditDurability::Written,
                Some(v) => match v.get_ref().as_str() {
                    "written" => AuditDurability::Written,
                    "fsync" => AuditDurability::Fsync,
                    "store" => AuditDurability::Store,
                    other => {
                        return Err(self.invalid(
                            v.span().start,
                            "server.audit_durability",
                            format!("{other:?}: use \"written\" (journal written before a command is forwarded, fsynced in the background), \"fsync\" (fsynced before a command is forwarded) or \"store\" (committed to the store before a command is forwarded)"),
                        ))
                    }
                },
            },
            record_commands: s.record_commands.unwrap_or(true),
            client_crl: s
                .client_crl
                .unwrap_or_default()
                .iter()
                .map(|p| self.resolve(p))
                .collect(),
            max_connections: s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_connections_per_source: s
                .max_connections_per_source
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_connections_per_identity: s
                .max_connections_per_identity
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            handshake_timeout: self
                .min_duration(
                    "server.handshake_timeout",
                    s.handshake_timeout,
                    Duration::from_millis(100),
                    "e.g. \"10s\"",
                )?
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        };
        if !server.client_crl.is_empty() && server.client_ca.is_none() {
            return Err(self.invalid(
                self.text.find("client_crl").unwrap_or(0),
                "server.client_crl",
                "revocation lists need server.client_ca (the CA whose certificates they revoke)",
            ));
        }
        if let Some(retention) = server.retention {
            // Pruning treats a chain that has been silent for the whole retention period as the
            // chain of a gateway that is gone; a live gateway checkpoints more often than that.
            if server.checkpoint_interval >= retention {
                return Err(self.invalid(
                    interval_at,
                    "server.checkpoint_interval",
                    format!("must be shorter than server.retention ({}s): a running gateway's checkpoints are what keeps its open sessions from being pruned", retention.as_secs()),
                ));
            }
        }
        match (&s.issuing_ca_cert, &s.issuing_ca_key) {
            (Some(v), None) => {
                return Err(self.invalid(
                    v.span().start,
                    "server.issuing_ca_cert",
                    "needs server.issuing_ca_key too (the issuing CA's certificate and key go together)",
                ))
            }
            (None, Some(v)) => {
                return Err(self.invalid(
                    v.span().start,
                    "server.issuing_ca_key",
                    "needs server.issuing_ca_cert too (the issuing CA's certificate and key go together)",
                ))
            }
            (Some(v), Some(_)) if server.client_ca.is_none() => {
                return Err(self.invalid(
                    v.span().start,
                    "server.issuing_ca_cert",
                    "needs server.client_ca: the certificates it issues must chain to the CA the gateway accepts client certificates from",
                ))
            }
            _ => {}
        }
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
        self.check_principals(&raw.identity.principals)?;
        let oidc = self.oidc(raw.identity.oidc)?;
        let saml = self.saml(raw.identity.saml, server.console_url.as_deref())?;
        for o in raw.identity.principals.iter().flat_map(|p| &p.oidc) {
            let issuer = o.split_once('#').map_or("", |(i, _)| i);
            if !oidc.iter().any(|c| c.issuer == issuer) {
                return Err(self.invalid(
                    self.text.find(o.as_str()).unwrap_or(0),
                    "identity.principals.oidc",
                    format!("{o:?} names issuer {issuer:?}, which no [[identity.oidc]] table configures"),
                ));
            }
        }

        let identity_key_missing = server.identity_key.is_none();
        let mut names = HashSet::new();
        let mut resources = Vec::with_capacity(raw.resources.len());
        for spanned in raw.resources {
            let line = self.line_of(spanned.span().start);
            let r = spanned.into_inner();
            let name_at = r.name.span().start;
            let pool = self.pooling(&r, r.name.get_ref())?;
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
            let command_at = r.command.as_ref().map(|c| c.span().start);
            let (up_at, mut upstream) = match (r.upstream, command_at) {
                (Some(u), None) => (u.span().start, u.into_inner()),
                (None, Some(at)) if r.kind == ResourceKind::Mcp => (at, String::new()),
                (None, Some(at)) => return Err(self.invalid(at, "resources.command", format!("resource {name:?}: command starts a stdio MCP server; a {} resource takes upstream", r.kind))),
                (Some(u), Some(_)) => return Err(self.invalid(u.span().start, "resources.upstream", format!("resource {name:?}: set upstream (a streamable-HTTP MCP server) or command (a stdio one the gateway starts), not both"))),
                (None, None) => return Err(self.invalid(name_at, "resources.upstream", format!("resource {name:?}: set upstream, the address of the server it fronts"))),
            };
            let mut http_url = None;
            let over_http = matches!(r.kind, ResourceKind::Http | ResourceKind::Mcp);
            let is_stdio = command_at.is_some();
            if is_stdio {
                if r.tls.mode.is_some()
                    || r.tls.ca.is_some()
                    || r.tls.server_name.is_some()
                    || r.tls.cert.is_some()
                    || r.tls.key.is_some()
                {
                    return Err(self.invalid(up_at, "resources.tls", format!("resource {name:?}: a stdio server has no network leg; remove [resources.tls]")));
                }
                http_url = Some((true, String::new()));
                upstream = "stdio:0".to_string();
            } else if over_http {
                let (tls, host_port, base) = split_http_url(&upstream).ok_or_else(|| {
                    self.invalid(up_at, "resources.upstream", format!("{upstream:?} must be an https:// URL, e.g. \"https://billing.internal\" or \"https://api.internal:8443/v2\""))
                })?;
                if !tls && r.tls.mode != Some(TlsMode::Disable) {
                    return Err(self.invalid(up_at, "resources.upstream", format!("resource {name:?}: {upstream:?} is plaintext HTTP; use https://, or set [resources.tls] mode = \"disable\" to accept an unencrypted upstream (`tollgate check` fails it)")));
                }
                if tls && r.tls.mode == Some(TlsMode::Disable) {
                    return Err(self.invalid(
                        up_at,
                        "resources.tls.mode",
                        format!(
                            "resource {name:?}: mode \"disable\" contradicts the https:// upstream"
                        ),
                    ));
                }
                http_url = Some((tls, base));
                upstream = host_port;
            }
            let (host, port) = if is_stdio {
                ("stdio".to_string(), 0)
            } else {
                split_host_port(&upstream).ok_or_else(|| {
                    self.invalid(
                        up_at,
                        "resources.upstream",
                        format!("{upstream:?} must be HOST:PORT, e.g. \"db.internal:5432\""),
                    )
                })?
            };
            let mode = r.tls.mode.unwrap_or(TlsMode::VerifyFull);
            let ca = r.tls.ca.as_deref().map(|p| self.resolve(p));
            if matches!(mode, TlsMode::VerifyFull | TlsMode::VerifyCa) && ca.is_none() && !is_stdio
            {
                return Err(self.invalid(up_at, "resources.tls.ca", format!("resource {name:?}: tls mode {} needs `ca`, the CA that signed the upstream's certificate", mode.as_str())));
            }
            if r.tls.cert.is_some() != r.tls.key.is_some() {
                return Err(self.invalid(up_at, "resources.tls", format!("resource {name:?}: set both `cert` and `key` for an upstream client certificate, or neither")));
            }
            let mut inject = None;
            let mut stdio_credential = None;
            let credentials = match r.credentials {
                None => None,
                Some(c) if is_stdio => {
                    if c.user.is_some()
                        || c.password_env.is_some()
                        || c.password_file.is_some()
                        || c.header.is_some()
                    {
                        return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: a stdio server gets its credential in its environment: set `env` (the variable's name) and `value_env` or `value_file`")));
                    }
                    let var = c.env.filter(|v| is_env_name(v)).ok_or_else(|| {
                        self.invalid(up_at, "resources.credentials.env", format!("resource {name:?}: `env` must name the variable the server reads its credential from, e.g. \"GITHUB_TOKEN\""))
                    })?;
                    let value = match (c.value_env, c.value_file) {
                        (Some(v), None) => SecretSource::Env(v),
                        (None, Some(p)) => SecretSource::File(self.resolve(&p)),
                        _ => return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: set one of value_env or value_file for the credential"))),
                    };
                    stdio_credential = Some((var, value));
                    None
                }
                Some(c) if c.env.is_some() => {
                    return Err(self.invalid(up_at, "resources.credentials.env", format!("resource {name:?}: `env` sets a stdio MCP server's credential; this resource has no `command`")));
                }
                Some(c) if over_http => {
                    if c.user.is_some() || c.password_env.is_some() || c.password_file.is_some() {
                        return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: an {} resource injects a header: set `header` and `value_env` or `value_file` (user and password are for databases)", r.kind)));
                    }
                    let header = c.header.filter(|h| is_header_name(h)).ok_or_else(|| {
                        self.invalid(up_at, "resources.credentials.header", format!("resource {name:?}: `header` must name the header to inject, e.g. \"Authorization\""))
                    })?;
                    let value = match (c.value_env, c.value_file) {
                        (Some(v), None) => SecretSource::Env(v),
                        (None, Some(p)) => SecretSource::File(self.resolve(&p)),
                        _ => return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: set one of value_env or value_file for the injected header"))),
                    };
                    inject = Some((header.to_ascii_lowercase(), value));
                    None
                }
                Some(c) => {
                    if c.header.is_some() || c.value_env.is_some() || c.value_file.is_some() {
                        return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: header, value_env and value_file are for http and mcp resources; a {} resource takes user and password_env or password_file", r.kind)));
                    }
                    let Some(user) = c.user else {
                        return Err(self.invalid(up_at, "resources.credentials.user", format!("resource {name:?}: set `user`, the upstream user the gateway logs in as")));
                    };
                    let password = match (c.password_env, c.password_file) {
                        (Some(_), Some(_)) => {
                            return Err(self.invalid(up_at, "resources.credentials", format!("resource {name:?}: set one of password_env or password_file, not both")))
                        }
                        (Some(v), None) => SecretSource::Env(v),
                        (None, Some(p)) => SecretSource::File(self.resolve(&p)),
                        (None, None) => SecretSource::None,
                    };
                    Some(Credentials { user, password })
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
            let capture_bytes = match r.capture_bytes {
                None => DEFAULT_CAPTURE_BYTES,
                Some(v) => match usize::try_from(*v.get_ref()) {
                    Ok(n) if (1..=MAX_CAPTURE_BYTES).contains(&n) => n,
                    _ => {
                        return Err(self.invalid(
                            v.span().start,
                            "resources.capture_bytes",
                            format!("resource {name:?}: {} must be between 1 and {MAX_CAPTURE_BYTES} (bytes of row data kept per result)", v.get_ref()),
                        ))
                    }
                },
            };
            let max_access_at = r.max_access.as_ref().map_or(0, |v| v.span().start);
            let max_access =
                self.duration("resources.max_access", r.max_access, DEFAULT_MAX_ACCESS)?;
            if max_access < Duration::from_secs(60) {
                return Err(self.invalid(
                    max_access_at,
                    "resources.max_access",
                    format!("resource {name:?}: must be at least 1m (e.g. \"8h\")"),
                ));
            }
            let review_webhook = self.webhook_url("resources.review_webhook", r.review_webhook)?;
            let http = match http_url {
                None => {
                    if r.unmaskable.is_some()
                        || r.response_timeout.is_some()
                        || r.identity_header.is_some()
                        || r.max_request_body.is_some()
                    {
                        return Err(self.invalid(up_at, "resources.unmaskable", format!("resource {name:?}: unmaskable, identity_header, max_request_body and response_timeout apply to http and mcp resources only")));
                    }
                    None
                }
                Some((tls, base_path)) => {
                    if let Some(h) = &r.identity_header {
                        if !is_header_name(h) {
                            return Err(self.invalid(
                                up_at,
                                "resources.identity_header",
                                format!("resource {name:?}: {h:?} is not a header name"),
                            ));
                        }
                        if identity_key_missing {
                            return Err(self.invalid(up_at, "resources.identity_header", format!("resource {name:?}: identity_header needs server.identity_key, the Ed25519 key that signs the identity tokens (create one with `openssl genpkey -algorithm ed25519 -out identity.key`)")));
                        }
                    }
                    Some(HttpUpstream {
                        tls,
                        base_path,
                        inject: inject.take(),
                        unmaskable: r.unmaskable.unwrap_or(Unmaskable::Refuse),
                        identity_header: r.identity_header.map(|h| h.to_ascii_lowercase()),
                        max_request_body: self.count(
                            "resources.max_request_body",
                            r.max_request_body,
                            DEFAULT_MAX_REQUEST_BODY,
                        )?,
                        response_timeout: self.duration(
                            "resources.response_timeout",
                            r.response_timeout,
                            DEFAULT_RESPONSE_TIMEOUT,
                        )?,
                    })
                }
            };
            let access_approvers = r
                .access_approvers
                .unwrap_or_else(|| raw.roles.admin_groups.clone());
            let unmask_approvers = r
                .unmask_approvers
                .unwrap_or_else(|| access_approvers.clone());
            if r.kind != ResourceKind::Mcp {
                if let Some(h) = &r.hold_wait {
                    return Err(self.invalid(
                        h.span().start,
                        "resources.hold_wait",
                        format!("resource {name:?}: hold_wait applies to mcp resources (a held SQL statement or HTTP request waits for its review_timeout)"),
                    ));
                }
            }
            let hold_wait = self.duration("resources.hold_wait", r.hold_wait, DEFAULT_HOLD_WAIT)?;
            let (pinning, pin_approvers) = match (r.pinning, r.kind) {
                (None, _) => (PinMode::Off, Vec::new()),
                (Some(p), ResourceKind::Mcp) => (p.mode, p.approvers),
                (Some(_), kind) => {
                    return Err(self.invalid(
                        up_at,
                        "resources.pinning",
                        format!("resource {name:?}: pinning fingerprints MCP tool definitions; a {kind} resource has none"),
                    ))
                }
            };
            let audiences = match (r.audiences, r.kind) {
                (None, _) => Vec::new(),
                (Some(a), ResourceKind::Mcp) => {
                    if let Some(bad) = a.iter().find(|a| a.trim().is_empty() || a.trim() != a.as_str()) {
                        return Err(self.invalid(
                            up_at,
                            "resources.audiences",
                            format!("resource {name:?}: audience {bad:?} is empty or has surrounding spaces"),
                        ));
                    }
                    a
                }
                (Some(_), kind) => {
                    return Err(self.invalid(
                        up_at,
                        "resources.audiences",
                        format!("resource {name:?}: audiences name what OIDC tokens for an MCP resource are issued for (RFC 8707); a {kind} resource takes the issuer's audiences"),
                    ))
                }
            };
            let stdio = match r.command {
                None => {
                    if r.env.is_some()
                        || r.env_inherit.is_some()
                        || r.cwd.is_some()
                        || r.max_processes.is_some()
                        || r.idle_timeout.is_some()
                    {
                        return Err(self.invalid(up_at, "resources.env", format!("resource {name:?}: env, env_inherit, cwd, max_processes and idle_timeout are for stdio MCP servers (`command`)")));
                    }
                    None
                }
                Some(c) => {
                    let at = c.span().start;
                    let command = c.into_inner();
                    if command.first().is_none_or(|p| p.is_empty()) {
                        return Err(self.invalid(at, "resources.command", format!("resource {name:?}: command is the program and its arguments, e.g. [\"npx\", \"-y\", \"@modelcontextprotocol/server-everything\"]")));
                    }
                    let env: Vec<(String, String)> =
                        r.env.unwrap_or_default().into_iter().collect();
                    let env_inherit = r.env_inherit.unwrap_or_else(|| {
                        DEFAULT_ENV_INHERIT.iter().map(|v| v.to_string()).collect()
                    });
                    for v in env.iter().map(|(k, _)| k).chain(&env_inherit) {
                        if !is_env_name(v) {
                            return Err(self.invalid(
                                at,
                                "resources.env",
                                format!(
                                    "resource {name:?}: {v:?} is not an environment variable name"
                                ),
                            ));
                        }
                    }
                    let max_processes =
                        self.count("resources.max_processes", r.max_processes, 16)?;
                    upstream = format!("stdio: {}", command.join(" "));
                    Some(StdioServer {
                        command,
                        env,
                        env_inherit,
                        credential: stdio_credential,
                        cwd: r.cwd.as_deref().map(|p| self.resolve(p)),
                        max_processes,
                        idle_timeout: self.duration(
                            "resources.idle_timeout",
                            r.idle_timeout,
                            Duration::from_secs(15 * 60),
                        )?,
                    })
                }
            };
            resources.push(Resource {
                stdio,
                capture_results: r.capture_results.unwrap_or(false),
                capture_bytes,
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
                databases: r.databases,
                allow_groups: r.allow_groups,
                connect_timeout,
                credentials,
                http,
                review_webhook,
                access_approvers,
                unmask_approvers,
                max_access,
                rules: self.rules(r.rules, r.kind)?,
                read_only: r.read_only,
                unparsable: r.unparsable.unwrap_or(RuleAction::Deny),
                review_timeout: self.duration(
                    "resources.review_timeout",
                    r.review_timeout,
                    DEFAULT_REVIEW_TIMEOUT,
                )?,
                writing_functions: r.writing_functions,
                opaque_code: r.opaque_code.unwrap_or(OpaqueCode::Strict),
                trusted_functions: r.trusted_functions,
                dry_run: r.dry_run,
                max_prepared_statements: self.count(
                    "resources.max_prepared_statements",
                    r.max_prepared_statements,
                    DEFAULT_MAX_PREPARED_STATEMENTS,
                )?,
                max_portals: self.count(
                    "resources.max_portals",
                    r.max_portals,
                    DEFAULT_MAX_PORTALS,
                )?,
                masks: r.masks,
                pinning,
                pin_approvers,
                audiences,
                hold_wait,
                pool,
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
                oidc,
                saml,
                tokens: raw.identity.tokens,
                principals: raw.identity.principals,
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

/// `sqlite://relative.db`, and a PostgreSQL store's `sslrootcert=` and `password_file=`, are
/// relative to the config file, like every other path in it.
fn resolve_store_url(url: &str, base: &Path) -> String {
    if let Some(p) = url.strip_prefix("sqlite://") {
        if !p.starts_with('/') && !p.starts_with(':') {
            return format!("sqlite://{}", base.join(p).display());
        }
    }
    let is_pg = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((head, query)) = url.split_once('?').filter(|_| is_pg) else {
        return url.to_string();
    };
    let base = percent_encode_path(&base.to_string_lossy());
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key @ ("sslrootcert" | "password_file"), value))
                if !value.is_empty()
                    && !value.starts_with('/')
                    && !value.to_ascii_lowercase().starts_with("%2f") =>
            {
                format!("{key}={base}/{value}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

/// A path as a URL query value: `/` and unreserved characters stay, the rest is %XX.
fn percent_encode_path(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `https://host[:port][/base]` → (tls, `host:port`, base path without a trailing `/`).
fn split_http_url(url: &str) -> Option<(bool, String, String)> {
    let (tls, rest) = match url.split_once("://")? {
        (s, rest) if s.eq_ignore_ascii_case("https") => (true, rest),
        (s, rest) if s.eq_ignore_ascii_case("http") => (false, rest),
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(['?', '#']) {
        return None;
    }
    let host_port = if split_host_port(authority).is_some() {
        authority.to_string()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    split_host_port(&host_port)?;
    Some((tls, host_port, path.trim_end_matches('/').to_string()))
}

/// An HTTP header name (RFC 9110 token).
fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
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
    fn pool_settings_default_off_and_are_checked() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.resources[0].pool, Pooling::default());
        assert_eq!(c.resources[0].pool.mode, PoolMode::None);
        let with = |extra: &str| {
            GOOD.replace(
                "allow_groups = [\"sre\", \"agents\"]",
                &format!("allow_groups = [\"sre\", \"agents\"]\n{extra}"),
            )
        };
        let c = p(&with(
            "pool_mode = \"transaction\"\npool_size = 10\npool_timeout = \"5s\"\nmax_client_conn = 3000\nreserve_pool = 3\nreserve_pool_timeout = \"2s\"",
        ))
        .unwrap();
        let pool = &c.resources[0].pool;
        assert_eq!(
            (pool.reserve_size, pool.reserve_timeout),
            (3, Duration::from_secs(2))
        );
        assert_eq!(pool.mode, PoolMode::Transaction);
        assert_eq!((pool.size, pool.max_idle), (10, 10));
        assert_eq!(pool.queue_timeout, Duration::from_secs(5));
        assert_eq!(pool.max_client_conn, Some(3000));
        let err = |extra: &str| p(&with(extra)).unwrap_err().to_string();
        let e = err("reserve_pool = -1");
        assert!(
            e.contains("resources.reserve_pool: -1 must be a whole number, at least 0"),
            "{e}"
        );
        let e = err("pool_size = 0");
        assert!(
            e.contains("resources.pool_size: 0 must be a whole number, at least 1"),
            "{e}"
        );
        let e = err("pool_mode = \"statement\"");
        assert!(e.contains("statement"), "{e}");
        let http = GOOD
            .replace("kind = \"postgres\"", "kind = \"http\"\npool_mode = \"session\"")
            .replace("upstream = \"db.internal:5432\"", "upstream = \"https://api.internal\"")
            .replace("[resources.credentials]\nuser = \"tollgate_orders\"\npassword_env = \"ORDERS_DB_PASSWORD\"\n", "");
        let e = p(&http).unwrap_err().to_string();
        assert!(
            e.contains("resources.pool_mode: resource \"orders\": connection pooling applies to postgres resources, not http"),
            "{e}"
        );
    }

    #[test]
    fn issuing_ca_both_or_neither_and_needs_client_ca() {
        let text = GOOD.replace(
            "store = \"sqlite://tollgate.db\"",
            "store = \"sqlite://tollgate.db\"\nissuing_ca_cert = \"pki/issuing.crt\"\nissuing_ca_key = \"pki/issuing.key\"",
        );
        let c = p(&text).unwrap();
        assert_eq!(
            c.server.issuing_ca_cert,
            Some(PathBuf::from("/etc/tollgate/pki/issuing.crt"))
        );
        assert_eq!(
            c.server.issuing_ca_key,
            Some(PathBuf::from("/etc/tollgate/pki/issuing.key"))
        );
        let e = p(&text.replace("issuing_ca_key = \"pki/issuing.key\"", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.issuing_ca_cert") && e.contains("issuing_ca_key") && e.contains(":"),
            "{e}"
        );
        let e = p(&text.replace("issuing_ca_cert = \"pki/issuing.crt\"", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.issuing_ca_key"), "{e}");
        let e = p(&text.replace("client_ca = \"pki/ca.crt\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.issuing_ca_cert") && e.contains("client_ca"),
            "{e}"
        );
    }

    #[test]
    fn stdio_mcp_servers() {
        let stdio = |body: &str| {
            p(&format!(
                "{GOOD}\n[[resources]]\nname = \"local\"\nkind = \"mcp\"\nallow_groups = [\"agents\"]\n{body}"
            ))
        };
        let c = stdio("command = [\"npx\", \"-y\", \"@scope/server\"]\nenv = { LOG = \"1\" }\nmax_processes = 3\n[resources.credentials]\nenv = \"GH_TOKEN\"\nvalue_env = \"LOCAL_TOKEN\"\n").unwrap();
        let r = c.resource("local").unwrap();
        let s = r.stdio.as_ref().unwrap();
        assert_eq!(s.command, ["npx", "-y", "@scope/server"]);
        assert_eq!(s.env, [("LOG".to_string(), "1".to_string())]);
        assert_eq!(s.env_inherit, DEFAULT_ENV_INHERIT);
        assert_eq!(
            s.credential,
            Some(("GH_TOKEN".into(), SecretSource::Env("LOCAL_TOKEN".into())))
        );
        assert_eq!(s.max_processes, 3);
        assert_eq!(s.idle_timeout, Duration::from_secs(900));
        assert_eq!(r.upstream, "stdio: npx -y @scope/server");
        assert!(r.http.as_ref().unwrap().inject.is_none());
        let err = |body: &str| stdio(body).unwrap_err().to_string();
        assert!(err("command = []\n").contains("command is the program and its arguments"));
        assert!(err("command = [\"x\"]\nupstream = \"https://a/mcp\"\n")
            .contains("set upstream (a streamable-HTTP MCP server) or command"));
        assert!(
            err("command = [\"x\"]\n[resources.tls]\nmode = \"disable\"\n")
                .contains("a stdio server has no network leg")
        );
        assert!(err(
            "command = [\"x\"]\n[resources.credentials]\nheader = \"A\"\nvalue_env = \"T\"\n"
        )
        .contains("set `env` (the variable's name)"));
        assert!(err("command = [\"x\"]\nenv = { \"A=B\" = \"1\" }\n")
            .contains("is not an environment variable name"));
        assert!(err("").contains("set upstream"));
    }

    #[test]
    fn mcp_resources_and_their_rules() {
        let mcp = |rules: &str| {
            format!(
                "{GOOD}\n[[resources]]\nname = \"tickets\"\nkind = \"mcp\"\nupstream = \"https://mcp.internal/mcp\"\nallow_groups = [\"agents\"]\n[resources.tls]\nca = \"pki/ca.crt\"\n[resources.credentials]\nheader = \"Authorization\"\nvalue_env = \"T\"\n{rules}"
            )
        };
        let c = p(&mcp("[[resources.rules]]\ntools = [\"delete_*\"]\narguments = { \"$.project\" = \"prod-*\" }\naction = \"review\"\napprovers = [\"sre\"]\n")).unwrap();
        let r = c.resource("tickets").unwrap();
        assert_eq!(r.kind, ResourceKind::Mcp);
        let http = r.http.as_ref().unwrap();
        assert_eq!(http.base_path, "/mcp");
        assert_eq!(http.inject.as_ref().unwrap().0, "authorization");
        assert_eq!(r.rules[0].tools, vec!["delete_*"]);
        assert_eq!(
            r.rules[0].arguments,
            vec![("$.project".to_string(), "prod-*".to_string())]
        );
        let e = p(&mcp(
            "[[resources.rules]]\nmethods = [\"POST\"]\naction = \"deny\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":40: resources.rules[0].methods: methods, paths, query and headers match HTTP requests; an mcp resource's rules match tools"),
            "{e}"
        );
        let e = p(&mcp(
            "[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resources.rules[0].statements: statements"),
            "{e}"
        );
        let e = p(&mcp("[[resources.rules]]\ntools = [\"x\"]\narguments = { \"project\" = \"p\" }\naction = \"deny\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":40: resources.rules[0].arguments: \"project\" is not a JSON path"),
            "{e}"
        );
        let c = p(&mcp("[resources.pinning]\nmode = \"enforce\"\n")).unwrap();
        assert_eq!(c.resource("tickets").unwrap().pinning, PinMode::Enforce);
        assert!(c.resource("tickets").unwrap().pin_approvers.is_empty());
        let c = p(&mcp(
            "[resources.pinning]\nmode = \"warn\"\napprovers = [\"sre\"]\n",
        ))
        .unwrap();
        assert_eq!(c.resource("tickets").unwrap().pin_approvers, ["sre"]);
        let aud = |a: &str| {
            mcp("").replace(
                "allow_groups = [\"agents\"]\n[resources.tls]\nca = \"pki/ca.crt\"\n[resources.credentials]\nheader",
                &format!("allow_groups = [\"agents\"]\naudiences = {a}\n[resources.tls]\nca = \"pki/ca.crt\"\n[resources.credentials]\nheader"),
            )
        };
        let c = p(&aud("[\"https://mcp.example/tickets\"]")).unwrap();
        assert_eq!(
            c.resource("tickets").unwrap().audiences,
            ["https://mcp.example/tickets"]
        );
        assert!(c.resource("orders").unwrap().audiences.is_empty());
        let e = p(&aud("[\" \"]")).unwrap_err().to_string();
        assert!(
            e.contains("resources.audiences: resource \"tickets\": audience \" \" is empty"),
            "{e}"
        );
        let e = p(&GOOD.replace(
            "database = \"orders\"\n",
            "database = \"orders\"\naudiences = [\"x\"]\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resources.audiences: resource \"orders\": audiences name what OIDC tokens"),
            "{e}"
        );
        assert_eq!(
            c.resource("tickets").unwrap().hold_wait,
            Duration::from_secs(50)
        );
        assert_eq!(c.resource("orders").unwrap().pinning, PinMode::Off);
        let e = p(&GOOD.replace(
            "password_env = \"ORDERS_DB_PASSWORD\"",
            "password_env = \"ORDERS_DB_PASSWORD\"\n[resources.pinning]\nmode = \"warn\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "resources.pinning: resource \"orders\": pinning fingerprints MCP tool definitions"
            ),
            "{e}"
        );
        let e = p(&GOOD.replace(
            "password_env = \"ORDERS_DB_PASSWORD\"",
            "password_env = \"ORDERS_DB_PASSWORD\"\n[[resources.rules]]\ntools = [\"x\"]\naction = \"deny\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resources.rules[0].tools: tools, resources, prompts and arguments match MCP requests; a database resource's rules"),
            "{e}"
        );
    }

    #[test]
    fn a_postgres_store_url_resolves_its_files_beside_the_config() {
        let base = Path::new("/etc/tolls gate");
        assert_eq!(
            resolve_store_url(
                "postgres://gw@db:5432/audit?sslrootcert=pki/store-ca.crt&password_file=store.pw&sslmode=verify-full",
                base
            ),
            "postgres://gw@db:5432/audit?sslrootcert=/etc/tolls%20gate/pki/store-ca.crt&password_file=/etc/tolls%20gate/store.pw&sslmode=verify-full"
        );
        let absolute =
            "postgresql://gw@db/audit?sslrootcert=/ca.crt&password_file=%2Fpw&password_env=X";
        assert_eq!(resolve_store_url(absolute, base), absolute);
        assert_eq!(
            resolve_store_url("postgres://gw@db/audit", base),
            "postgres://gw@db/audit"
        );
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
    fn connection_limits_crls_and_handshake_timeout() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.server.max_connections_per_source, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            c.server.max_connections_per_identity,
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(c.server.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert!(c.server.client_crl.is_empty());
        let text = GOOD.replace(
            "store = \"sqlite://tollgate.db\"",
            "store = \"sqlite://tollgate.db\"\nmax_connections = 0\nmax_connections_per_source = 20\nmax_connections_per_identity = 5\nhandshake_timeout = \"3s\"\nclient_crl = [\"pki/ca.crl\", \"/srv/other.crl\"]",
        );
        let c = p(&text).unwrap();
        assert_eq!(c.server.max_connections, 0);
        assert_eq!(c.server.max_connections_per_source, 20);
        assert_eq!(c.server.max_connections_per_identity, 5);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(3));
        assert_eq!(
            c.server.client_crl,
            [
                PathBuf::from("/etc/tollgate/pki/ca.crl"),
                PathBuf::from("/srv/other.crl")
            ]
        );
        let e = p(&text.replace("\"3s\"", "\"0s\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.handshake_timeout"), "{e}");
        let e = p(&text.replace("client_ca = \"pki/ca.crt\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.client_crl") && e.contains("client_ca"),
            "{e}"
        );
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
    fn principals_map_credentials_to_one_name() {
        let with = |principals: &str| {
            let at = GOOD.find("[[resources]]").unwrap();
            p(&format!("{}{principals}\n{}", &GOOD[..at], &GOOD[at..]))
        };
        let c = with("[[identity.principals]]\nname = \"alice\"\ncertificates = [\"spiffe://corp/alice\", \"cn:alice\"]\ntokens = [\"alice-bot\"]\n").unwrap();
        let alice = &c.identity.principals[0];
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.certificates, ["spiffe://corp/alice", "cn:alice"]);
        assert_eq!(alice.tokens, ["alice-bot"]);
        assert!(p(GOOD).unwrap().identity.principals.is_empty());
        for (bad, says) in [
            ("name = \"cert:cn:alice\"", "hold no ':'"),
            ("name = \"alice\"\ncertificates = [\"alice\"]", "cn:NAME"),
            ("name = \"alice\"\n[[identity.principals]]\nname = \"alice\"", "defined twice"),
            ("name = \"a\"\ntokens = [\"t\"]\n[[identity.principals]]\nname = \"b\"\ntokens = [\"t\"]", "token t belongs to both \"a\" and \"b\""),
        ] {
            let e = with(&format!("[[identity.principals]]\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("identity.principals"), "{e}");
        }
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
    fn audit_settings_default_and_validate() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.server.retention, None);
        assert_eq!(c.server.checkpoint_interval, Duration::from_secs(300));
        assert_eq!(c.server.audit_durability, AuditDurability::Written);
        assert!(c.server.record_commands);
        assert!(!c.resources[0].capture_results);
        assert_eq!(c.resources[0].capture_bytes, 65536);
        let with = |server: &str, resource: &str| {
            GOOD.replace(
                "store = \"sqlite://tollgate.db\"",
                &format!("store = \"sqlite://tollgate.db\"\n{server}"),
            )
            .replace(
                "allow_groups = [\"sre\", \"agents\"]",
                &format!("allow_groups = [\"sre\", \"agents\"]\n{resource}"),
            )
        };
        let c = p(&with(
            "retention = \"90d\"\ncheckpoint_interval = \"1m\"\naudit_durability = \"fsync\"\nrecord_commands = false",
            "capture_results = true\ncapture_bytes = 1024",
        ))
        .unwrap();
        assert_eq!(c.server.retention, Some(Duration::from_secs(90 * 86400)));
        assert_eq!(c.server.checkpoint_interval, Duration::from_secs(60));
        assert_eq!(c.server.audit_durability, AuditDurability::Fsync);
        assert_eq!(
            p(&with("audit_durability = \"store\"", ""))
                .unwrap()
                .server
                .audit_durability,
            AuditDurability::Store
        );
        assert!(!c.server.record_commands);
        assert!(c.resources[0].capture_results);
        assert_eq!(c.resources[0].capture_bytes, 1024);
        let err =
            |server: &str, resource: &str| p(&with(server, resource)).unwrap_err().to_string();
        assert_eq!(
            err("audit_durability = \"sync\"", ""),
            "/etc/tollgate/tollgate.toml:9: server.audit_durability: \"sync\": use \"written\" (journal written before a command is forwarded, fsynced in the background), \"fsync\" (fsynced before a command is forwarded) or \"store\" (committed to the store before a command is forwarded)"
        );
        let e = err("retention = \"90\"", "");
        assert!(
            e.starts_with("/etc/tollgate/tollgate.toml:9: server.retention: "),
            "{e}"
        );
        let e = err("retention = \"0s\"", "");
        assert!(
            e.contains(":9: server.retention: must be at least 1000ms"),
            "{e}"
        );
        let e = err("retention = \"10m\"\ncheckpoint_interval = \"1h\"", "");
        assert!(
            e.contains(":10: server.checkpoint_interval: must be shorter than server.retention"),
            "{e}"
        );
        let e = err("checkpoint_interval = \"1ms\"", "");
        assert!(
            e.contains(":9: server.checkpoint_interval: must be at least 100ms"),
            "{e}"
        );
        let e = err("", "capture_bytes = 0");
        assert!(
            e.contains(
                ":25: resources.capture_bytes: resource \"orders\": 0 must be between 1 and"
            ),
            "{e}"
        );
        let e = err("", "capture_bytes = -5");
        assert!(e.contains("resources.capture_bytes"), "{e}");
        let e = err("record_commands = \"no\"", "");
        assert!(e.contains("record_commands"), "{e}");
    }

    #[test]
    fn review_keys_defaults_and_validation() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.server.review_webhook, None);
        assert_eq!(c.server.review_webhook_format, WebhookFormat::Json);
        assert_eq!(c.server.console_url, None);
        assert_eq!(c.server.review_rerun_window, Duration::from_secs(900));
        let r = c.resource("orders").unwrap();
        assert_eq!(
            r.access_approvers,
            ["sre"],
            "defaults to roles.admin_groups"
        );
        assert_eq!(r.unmask_approvers, ["sre"], "defaults to access_approvers");
        assert_eq!(r.max_access, Duration::from_secs(8 * 3600));
        assert_eq!(r.review_webhook, None);
        let text = GOOD
            .replace(
                "store = \"sqlite://tollgate.db\"",
                "store = \"sqlite://tollgate.db\"\nreview_webhook = \"https://hooks.example/r\"\nreview_webhook_format = \"slack\"\nreview_webhook_ca = \"pki/hooks-ca.crt\"\nconsole_url = \"https://gw.example:8443/\"\nreview_rerun_window = \"5m\"",
            )
            .replace(
                "allow_groups = [\"sre\", \"agents\"]",
                "allow_groups = [\"sre\", \"agents\"]\naccess_approvers = [\"dba\"]\nmax_access = \"2h\"\nreview_webhook = \"http://127.0.0.1:9/orders\"",
            );
        let c = p(&text).unwrap();
        assert_eq!(
            c.server.review_webhook.as_deref(),
            Some("https://hooks.example/r")
        );
        assert_eq!(c.server.review_webhook_format, WebhookFormat::Slack);
        assert_eq!(
            c.server.review_webhook_ca,
            Some(PathBuf::from("/etc/tollgate/pki/hooks-ca.crt"))
        );
        assert_eq!(
            c.server.console_url.as_deref(),
            Some("https://gw.example:8443")
        );
        assert_eq!(c.server.review_rerun_window, Duration::from_secs(300));
        let r = c.resource("orders").unwrap();
        assert_eq!(r.access_approvers, ["dba"]);
        assert_eq!(r.unmask_approvers, ["dba"], "defaults to access_approvers");
        assert_eq!(r.max_access, Duration::from_secs(7200));
        let own = p(&text.replace(
            "access_approvers = [\"dba\"]",
            "access_approvers = [\"dba\"]\nunmask_approvers = [\"privacy\"]",
        ))
        .unwrap();
        let r2 = own.resource("orders").unwrap();
        assert_eq!(
            (
                r2.access_approvers.as_slice(),
                r2.unmask_approvers.as_slice()
            ),
            (&["dba".to_string()][..], &["privacy".to_string()][..])
        );
        assert_eq!(
            r.review_webhook.as_deref(),
            Some("http://127.0.0.1:9/orders")
        );

        let e = p(&text.replace("\"2h\"", "\"30s\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("resources.max_access: resource \"orders\": must be at least 1m"),
            "{e}"
        );
        let e = p(&text.replace("https://gw.example:8443/", "http://gw.example"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/tollgate/tollgate.toml:12: server.console_url:"),
            "{e}"
        );
        let e = p(&text.replace("http://127.0.0.1:9/orders", "http://hooks.example/o"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                ": resources.review_webhook: \"http://hooks.example/o\" must be an https:// URL"
            ),
            "{e}"
        );
        let e = p(&text.replace("\"slack\"", "\"teams\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("teams"), "{e}");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("[::1]:5432"), Some(("::1".into(), 5432)));
        assert_eq!(split_host_port("db:0"), None);
        assert_eq!(split_host_port("db"), None);
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;

    const BASE: &str = r#"[server]
tls_cert = "gw.crt"
tls_key = "gw.key"

[[resources]]
name = "orders"
kind = "postgres"
upstream = "db.internal:5432"
allow_groups = ["sre", "agents"]
[resources.tls]
ca = "ca.crt"
[resources.credentials]
user = "u"
"#;

    fn with(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("{BASE}{extra}"), Path::new("/etc/tollgate/t.toml"))
    }

    /// Keys of the `[[resources]]` table itself go before its sub-tables (line 10 on).
    fn with_resource_keys(keys: &str) -> Result<Config, ConfigError> {
        let text = BASE.replace("[resources.tls]", &format!("{keys}[resources.tls]"));
        parse(&text, Path::new("/etc/tollgate/t.toml"))
    }

    #[test]
    fn resource_policy_defaults() {
        let c = with("").unwrap();
        let r = &c.resources[0];
        assert!(!r.read_only);
        assert_eq!(r.unparsable, RuleAction::Deny);
        assert_eq!(r.review_timeout, Duration::from_secs(300));
        assert!(r.writing_functions.is_empty());
    }

    #[test]
    fn resource_policy_keys() {
        let c = with_resource_keys("read_only = true\nunparsable = \"review\"\nreview_timeout = \"90s\"\nwriting_functions = [\"audit.log_*\"]\n").unwrap();
        let r = &c.resources[0];
        assert!(r.read_only);
        assert_eq!(r.unparsable, RuleAction::Review);
        assert_eq!(r.review_timeout, Duration::from_secs(90));
        assert_eq!(r.writing_functions, vec!["audit.log_*".to_string()]);
        let e = with_resource_keys("unparsable = \"ignore\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unparsable"), "{e}");
        let e = with_resource_keys("review_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":10: resources.review_timeout"), "{e}");
    }

    #[test]
    fn rule_keys_and_defaults() {
        let c = with(
            r#"
[[resources.rules]]
statements = ["DROP", "truncate"]
action = "deny"

[[resources.rules]]
name = "agents delete"
statements = ["delete", "update"]
identities = ["spiffe://prod/agent/*"]
groups = ["agents"]
functions = ["pg_*"]
where_missing = true
hours = "22:00-06:00"
days = ["Mon", "friday"]
action = "review"
approvers = ["sre"]
min_approvals = 2
message = "ask sre"
"#,
        )
        .unwrap();
        let rules = &c.resources[0].rules;
        assert_eq!(rules[0].name, "rule 1");
        assert_eq!(rules[0].statements, vec!["drop", "truncate"]);
        assert_eq!(rules[0].min_approvals, 1);
        assert!(!rules[0].where_missing);
        assert_eq!(rules[0].hours, None);
        assert_eq!(rules[0].line, 15);
        let r = &rules[1];
        assert_eq!(r.name, "agents delete");
        assert_eq!(r.identities, vec!["spiffe://prod/agent/*"]);
        assert_eq!(r.functions, vec!["pg_*"]);
        assert!(r.where_missing);
        let h = r.hours.unwrap();
        assert_eq!((h.start_minute, h.end_minute), (22 * 60, 6 * 60));
        assert!(
            h.contains(23 * 60) && h.contains(0) && !h.contains(6 * 60) && !h.contains(12 * 60)
        );
        assert_eq!(r.days, vec![Weekday::Mon, Weekday::Fri]);
        assert_eq!(r.min_approvals, 2);
        assert_eq!(r.message.as_deref(), Some("ask sre"));
    }

    #[test]
    fn rule_errors_name_file_line_and_key() {
        let e =
            with("\n[[resources.rules]]\nstatements = [\"select\", \"dorp\"]\naction = \"deny\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.starts_with("/etc/tollgate/t.toml:16: resources.rules[0].statements: unknown statement kind \"dorp\"; use one of: select, insert,"),
            "{e}"
        );
        let e = with("\n[[resources.rules]]\naction = \"deny\"\n[[resources.rules]]\nhours = \"9-17\"\naction = \"deny\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "/etc/tollgate/t.toml:18: resources.rules[1].hours: \"9-17\" is not a time window"
            ),
            "{e}"
        );
        let e = with("\n[[resources.rules]]\ndays = [\"someday\"]\naction = \"deny\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":16: resources.rules[0].days: \"someday\" is not a day"),
            "{e}"
        );
        let e = with("\n[[resources.rules]]\nmin_approvals = 0\naction = \"review\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":16: resources.rules[0].min_approvals: 0 must be"),
            "{e}"
        );
        let e = with("\n[[resources.rules]]\nname = \"x\"\naction = \"deny\"\n[[resources.rules]]\nname = \"x\"\naction = \"allow\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("resources.rules[1].name: duplicate rule name \"x\""),
            "{e}"
        );
        let e = with("\n[[resources.rules]]\nactoin = \"deny\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("actoin"), "{e}");
    }

    #[test]
    fn hour_windows() {
        assert_eq!(
            HourWindow::parse("09:00-17:30"),
            Some(HourWindow {
                start_minute: 540,
                end_minute: 1050
            })
        );
        assert_eq!(HourWindow::parse("00:00-24:00").unwrap().end_minute, 1440);
        assert!(HourWindow::parse("09:00-09:00").is_none());
        assert!(HourWindow::parse("25:00-26:00").is_none());
        assert!(HourWindow::parse("09:60-10:00").is_none());
        let day = HourWindow::parse("09:00-17:00").unwrap();
        assert!(
            day.contains(540) && day.contains(1019) && !day.contains(1020) && !day.contains(539)
        );
    }

    #[test]
    fn oidc_issuers() {
        let c = with(&format!("\n[[identity.oidc]]\nissuer = \"https://idp.example.com\"\nca = \"pki/idp-ca.crt\"\naudiences = [\"tollgate\"]\ngroups_claim = \"realm_access.roles\"\ngroup_map = {{ \"6f1c\" = \"sre\" }}\nmax_cert_ttl = \"12h\"\n\n[[identity.oidc]]\nissuer = \"https://token.actions.githubusercontent.com\"\naudiences = [\"tollgate\", \"other\"]\nstatic_groups = [\"ci\"]\nsubject_claim = \"repository\"\nalgorithms = [\"RS256\"]\n")).unwrap();
        let [a, b] = &c.identity.oidc[..] else {
            panic!("{:?}", c.identity.oidc)
        };
        assert_eq!(a.ca, Some(PathBuf::from("/etc/tollgate/pki/idp-ca.crt")));
        assert_eq!(a.groups_claim, "realm_access.roles");
        assert_eq!(a.group_map["6f1c"], "sre");
        assert_eq!((a.subject_claim.as_str(), a.algorithms.len()), ("sub", 3));
        assert_eq!(a.max_cert_ttl, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(a.line, 15);
        assert_eq!(b.groups_claim, "groups");
        assert_eq!(b.static_groups, ["ci"]);
        assert_eq!(b.algorithms, ["RS256"]);
        assert!(with("").unwrap().identity.oidc.is_empty());
    }

    #[test]
    fn saml_identity_provider() {
        let c = with("\n[identity.saml]\nidp_metadata = \"saml/idp.xml\"\nentity_id = \"https://gw.example/saml\"\nacs_url = \"https://gw.example:8443/saml/acs\"\ngroups_attribute = \"memberOf\"\nsubject_attribute = \"mail\"\ngroup_map = { \"cn=dba\" = \"dbas\" }\nstatic_groups = [\"people\"]\nmax_cert_ttl = \"8h\"\n").unwrap();
        let s = c.identity.saml.unwrap();
        assert_eq!(
            s.idp_metadata,
            SamlMetadataSource::File(PathBuf::from("/etc/tollgate/saml/idp.xml"))
        );
        assert_eq!(s.acs_url, "https://gw.example:8443/saml/acs");
        assert_eq!(s.groups_attribute, "memberOf");
        assert_eq!(s.subject_attribute.as_deref(), Some("mail"));
        assert_eq!(s.group_map["cn=dba"], "dbas");
        assert_eq!(s.max_cert_ttl, Some(Duration::from_secs(8 * 3600)));
        assert!(with("").unwrap().identity.saml.is_none());
        // Defaults: the ACS from console_url, groups from "groups", the subject from NameID.
        let text = format!("{BASE}\n[identity.saml]\nidp_metadata_url = \"https://idp.example/md\"\nentity_id = \"urn:gw\"\n")
            .replace("[server]\n", "[server]\nconsole_url = \"https://gw.example:8443/\"\n");
        let s = parse(&text, Path::new("/etc/tollgate/t.toml"))
            .unwrap()
            .identity
            .saml
            .unwrap();
        assert_eq!(s.acs_url, "https://gw.example:8443/saml/acs");
        assert_eq!(
            s.idp_metadata,
            SamlMetadataSource::Url("https://idp.example/md".into())
        );
        assert_eq!(
            (s.groups_attribute.as_str(), s.subject_attribute),
            ("groups", None)
        );
        for (body, says) in [
            ("entity_id = \"e\"\nacs_url = \"https://g/saml/acs\"", "identity.saml.idp_metadata: the IdP's metadata is needed"),
            ("idp_metadata = \"m\"\nidp_metadata_url = \"https://i\"\nentity_id = \"e\"\nacs_url = \"https://g/saml/acs\"", "not both"),
            ("idp_metadata_url = \"http://i/md\"\nentity_id = \"e\"\nacs_url = \"https://g/saml/acs\"", "identity.saml.idp_metadata_url"),
            ("idp_metadata = \"m\"\nacs_url = \"https://g/saml/acs\"", "identity.saml.entity_id"),
            ("idp_metadata = \"m\"\nentity_id = \"e\"", "identity.saml.acs_url: set identity.saml.acs_url"),
            ("idp_metadata = \"m\"\nentity_id = \"e\"\nacs_url = \"https://g/acs\"", "ending in /saml/acs"),
            ("idp_metadata = \"m\"\nentity_id = \"e\"\nacs_url = \"https://g/saml/acs\"\ngroups_attribute = \" \"", "identity.saml.groups_attribute"),
            ("idp_metadata = \"m\"\nentity_id = \"e\"\nacs_url = \"https://g/saml/acs\"\nmax_cert_ttl = \"soon\"", "identity.saml.max_cert_ttl"),
            ("idp_metadata = \"m\"\nentity_id = \"e\"\nacs_url = \"https://g/saml/acs\"\nissuer = \"x\"", "unknown field"),
        ] {
            let e = with(&format!("\n[identity.saml]\n{body}\n")).unwrap_err().to_string();
            assert!(e.contains("t.toml:") && e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn bad_oidc_issuers_are_refused_with_their_line() {
        let e = with("[identity.oidc]\nissuer = \"https://idp\"\naudiences = [\"t\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml:14: identity.oidc:") && e.contains("[[identity.oidc]]"),
            "{e}"
        );
        for (body, says) in [
            ("issuer = \"http://idp\"\naudiences = [\"t\"]", "identity.oidc.issuer: \"http://idp\": the issuer must be an https:// URL"),
            ("issuer = \"https://u@idp\"\naudiences = [\"t\"]", "no credentials"),
            ("issuer = \"https://idp\"", "identity.oidc.audiences"),
            ("issuer = \"https://idp\"\naudiences = []", "identity.oidc.audiences"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\nalgorithms = [\"none\"]", "\"none\" is never accepted"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\nalgorithms = [\"RS256\", \"HS256\"]", "\"HS256\" is never accepted: HMAC"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\nalgorithms = [\"PS256\"]", "not supported"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\ngroups_claim = \"a..b\"", "identity.oidc.groups_claim"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\nmax_cert_ttl = \"soon\"", "identity.oidc.max_cert_ttl"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\nclient_secret_env = \"S\"", "identity.oidc.client_secret_env"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\nclient_id = \"c\"\nclient_secret_env = \"S\"\nclient_secret_file = \"s\"", "identity.oidc.client_secret_env"),
            ("issuer = \"https://idp\"\naudiences = [\"t\"]\naudience = \"t\"", "unknown field `audience`"),
        ] {
            let e = with(&format!("[[identity.oidc]]\nissuer = \"https://ok\"\naudiences = [\"t\"]\n\n[[identity.oidc]]\n{body}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("t.toml:18: identity.oidc") && e.contains(says), "{says}: {e}");
        }
        let idp = "[[identity.oidc]]\nissuer = \"https://idp\"\naudiences = [\"t\"]\n";
        let c = with(&format!("{idp}[[identity.principals]]\nname = \"alice\"\ncertificates = [\"cn:alice\"]\noidc = [\"https://idp#00u1\"]\n")).unwrap();
        assert_eq!(c.identity.principals[0].oidc, ["https://idp#00u1"]);
        for (oidc, says) in [
            ("alice", "named <issuer>#<subject>"),
            ("https://idp#", "named <issuer>#<subject>"),
            (
                "https://other#00u1",
                "names issuer \"https://other\", which no [[identity.oidc]] table configures",
            ),
        ] {
            let e = with(&format!(
                "{idp}[[identity.principals]]\nname = \"alice\"\noidc = [\"{oidc}\"]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("identity.principals.oidc") && e.contains(says),
                "{e}"
            );
        }
        let e = with("[[identity.oidc]]\nissuer = \"https://idp\"\naudiences = [\"t\"]\n[[identity.oidc]]\nissuer = \"https://idp\"\naudiences = [\"t\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("configured twice"), "{e}");
    }
}
