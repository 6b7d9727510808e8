//! `tollgate check`: the offline lint. Reads the files a config names (certificates, key
//! modes, password files) and the environment, never the network.

use crate::{days_until, rfc3339, Finding, Severity};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;
use tollgate_config::{AuditFailure, Config, SecretSource, TlsMode};

/// Longer than this, a certificate from `tollgate login` outlives a working day.
const MAX_SENSIBLE_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What `check` measures against.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// A certificate that expires within this many days is a finding.
    pub min_days: u64,
    pub now: SystemTime,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            min_days: 14,
            now: SystemTime::now(),
        }
    }
}

/// Every weakness in `config`, most severe first. Empty means the config passes.
///
/// tollgate's own listeners speak TLS 1.2 and 1.3 only by construction, so there is no listener
/// version setting to lint; the versions an upstream accepts are measured by `scan`.
pub fn check(config: &Config, opts: &CheckOptions) -> Vec<Finding> {
    let mut l = Lint {
        out: Vec::new(),
        opts,
    };
    let s = &config.server;
    l.cert_file(&s.tls_cert, "server.tls_cert", None, "gateway certificate");
    l.key_file(&s.tls_key, "server.tls_key", None);
    if let Some(k) = &s.issuing_ca_key {
        l.key_file(k, "server.issuing_ca_key", None);
    }
    if let Some(k) = &s.identity_key {
        l.key_file(k, "server.identity_key", None);
    }
    if let Some(ca) = &s.client_ca {
        l.cert_file(ca, "server.client_ca", None, "client CA certificate");
    }
    if let Some(ca) = &s.alert_webhook_ca {
        l.cert_file(
            ca,
            "server.alert_webhook_ca",
            None,
            "webhook CA certificate",
        );
    }
    if let Some(db) = s.store.strip_prefix("sqlite://") {
        let dir = Path::new(db).parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|_| !db.starts_with(':')) {
            if !dir.is_dir() {
                l.push(Finding::new(
                    "missing_file",
                    Severity::High,
                    None,
                    "server.store",
                    format!(
                        "the audit store's directory {} does not exist",
                        dir.display()
                    ),
                    format!(
                        "create {} or point server.store at an existing directory",
                        dir.display()
                    ),
                ));
            }
        }
    }
    if tollgate_store::PgStoreUrl::is_postgres(&s.store) {
        l.postgres_store(&s.store);
        l.replica_peers(s);
    }
    if s.audit_failure == AuditFailure::Open {
        l.push(Finding::new(
            "audit_fail_open",
            Severity::High,
            None,
            "server.audit_failure",
            "audit_failure = \"open\": commands are forwarded without waiting for their audit events, so a store outage or crash loses the record of what ran",
            "remove the key or set audit_failure = \"closed\"",
        ));
    }
    if !s.record_commands {
        l.push(Finding::new(
            "commands_not_recorded",
            Severity::Critical,
            None,
            "server.record_commands",
            "record_commands = false: commands and their results are not recorded in the audit trail (a benchmark baseline setting)",
            "remove the key or set record_commands = true",
        ));
    }

    l.connection_limits(s);
    if s.client_ca.is_some() {
        if s.client_crl.is_empty() {
            l.push(Finding::new(
                "client_crl_missing",
                Severity::Low,
                None,
                "server.client_crl",
                "client certificates are accepted but no revocation list is configured: a stolen or withdrawn certificate stays usable until it expires",
                "list your client CA's CRL files in client_crl (PEM or DER; re-read on change), or keep client certificates short-lived",
            ));
        }
        for p in &s.client_crl {
            l.exists(p, "server.client_crl", None, "certificate revocation list");
        }
    }

    // Groups some identity source or role names; rules and approvers must use these.
    let mut known: BTreeSet<&str> = BTreeSet::new();
    known.extend(config.roles.admin_groups.iter().map(String::as_str));
    known.extend(config.roles.auditor_groups.iter().map(String::as_str));
    for t in &config.identity.tokens {
        known.extend(t.groups.iter().map(String::as_str));
    }
    // OIDC issuers: groups they always grant or map to (a token's own groups are not known here).
    for o in &config.identity.oidc {
        known.extend(o.static_groups.iter().map(String::as_str));
        known.extend(o.group_map.values().map(String::as_str));
        if let Some(ca) = &o.ca {
            l.cert_file(ca, "identity.oidc.ca", None, "OIDC issuer CA certificate");
        }
        if o.client_id.is_some() && s.issuing_ca_cert.is_none() {
            l.push(Finding::new(
                "oidc_login_without_issuing_ca",
                Severity::Low,
                None,
                "server.issuing_ca_cert",
                format!("{} has a client_id for people's sign-in, but the gateway has no issuing CA: the console sign-in works, `tollgate login` gets no certificate (503)", o.issuer),
                "set server.issuing_ca_cert and issuing_ca_key (an intermediate of your client CA will do), or remove client_id",
            ));
        }
        if o.max_cert_ttl.is_some_and(|t| t > MAX_SENSIBLE_CERT_TTL) {
            l.push(Finding::new(
                "oidc_long_cert_ttl",
                Severity::Medium,
                None,
                "identity.oidc.max_cert_ttl",
                format!("{}: certificates from `tollgate login` may live longer than a day; a lost laptop keeps access that long", o.issuer),
                "keep max_cert_ttl at a working day (12h) or less",
            ));
        }
    }
    if let Some(saml) = &config.identity.saml {
        known.extend(saml.static_groups.iter().map(String::as_str));
        known.extend(saml.group_map.values().map(String::as_str));
        l.saml(saml, s.issuing_ca_cert.is_some());
    }
    for r in &config.resources {
        known.extend(r.allow_groups.iter().map(String::as_str));
    }

    for r in &config.resources {
        let name = Some(r.name.as_str());
        match r.tls.mode {
            TlsMode::VerifyFull => {}
            mode => {
                let (severity, what) = match mode {
                    TlsMode::Disable => (Severity::Critical, "traffic to the upstream is plaintext"),
                    TlsMode::InsecureSkipVerify => (Severity::Critical, "any certificate is accepted, so the upstream leg can be intercepted"),
                    _ => (Severity::High, "the certificate's hostname is not checked, so any server with a certificate from that CA can impersonate the upstream"),
                };
                l.push(Finding::new(
                    "upstream_tls_not_verify_full",
                    severity,
                    name,
                    "resources.tls.mode",
                    format!("resource {:?}: upstream TLS mode is \"{}\": {what}", r.name, mode.as_str()),
                    "set mode = \"verify-full\" with tls.ca (the upstream's CA) and tls.server_name (a name in its certificate)",
                ));
            }
        }
        if let Some(ca) = &r.tls.ca {
            l.cert_file(ca, "resources.tls.ca", name, "upstream CA certificate");
        }
        if let Some(cert) = &r.tls.cert {
            l.cert_file(
                cert,
                "resources.tls.cert",
                name,
                "upstream client certificate",
            );
        }
        if let Some(key) = &r.tls.key {
            l.key_file(key, "resources.tls.key", name);
        }
        if let Some(c) = &r.credentials {
            l.secret(
                &c.password,
                "resources.credentials.password",
                name,
                "log in upstream",
                "password file",
            );
        }
        if let Some((_, value)) = r.stdio.as_ref().and_then(|s| s.credential.as_ref()) {
            l.secret(
                value,
                "resources.credentials.value",
                name,
                "start its stdio server",
                "credential file",
            );
        }
        if let Some((_, value)) = r.http.as_ref().and_then(|h| h.inject.as_ref()) {
            l.secret(
                value,
                "resources.credentials.value",
                name,
                "authenticate upstream",
                "credential file",
            );
        }
        if r.allow_groups.is_empty() {
            l.push(Finding::new(
                "unreachable_resource",
                Severity::Medium,
                name,
                "resources.allow_groups",
                format!(
                    "resource {:?}: allow_groups is empty, so no identity can reach it",
                    r.name
                ),
                "list the groups that may use it in allow_groups, or remove the resource",
            ));
        }
        l.masks(config, r);
        l.rules(r);
        for (i, rule) in r.rules.iter().enumerate() {
            for g in &rule.groups {
                if !r.allow_groups.contains(g) {
                    l.push(Finding::new(
                        "unknown_group",
                        Severity::Medium,
                        name,
                        format!("resources.rules[{i}].groups"),
                        format!("resource {:?}: rule {i} names group {g:?}, which is not in the resource's allow_groups, so the rule can never apply", r.name),
                        format!("fix the spelling, or add {g:?} to allow_groups"),
                    ));
                }
            }
            for g in &rule.approvers {
                if !known.contains(g.as_str()) {
                    l.push(Finding::new(
                        "unknown_group",
                        Severity::Medium,
                        name,
                        format!("resources.rules[{i}].approvers"),
                        format!("resource {:?}: rule {i} names approver group {g:?}, which no role, token or resource mentions, so its reviews may never be approved", r.name),
                        format!("fix the spelling, or add {g:?} to roles.admin_groups"),
                    ));
                }
            }
        }
        for (key, groups, what) in [
            ("resources.access_approvers", &r.access_approvers, "access"),
            ("resources.unmask_approvers", &r.unmask_approvers, "unmask"),
        ] {
            for g in groups.iter().filter(|g| !known.contains(g.as_str())) {
                l.push(Finding::new(
                    "unknown_group",
                    Severity::Medium,
                    name,
                    key,
                    format!("resource {:?}: {what} approver group {g:?} is not mentioned by any role, token or resource, so its {what} requests may never be approved", r.name),
                    format!("fix the spelling, or add {g:?} to roles.admin_groups"),
                ));
            }
        }
    }
    l.out.sort_by_key(|f| f.severity);
    l.out
}

struct Lint<'a> {
    out: Vec<Finding>,
    opts: &'a CheckOptions,
}

impl Lint<'_> {
    fn push(&mut self, f: Finding) {
        self.out.push(f);
    }

    /// `[identity.saml]`: https endpoints, IdP metadata with a signing certificate (a metadata
    /// file is read here; a URL is fetched by the gateway at start-up), certificate lifetimes.
    fn saml(&mut self, saml: &tollgate_config::Saml, issuing_ca: bool) {
        if !saml.acs_url.starts_with("https://") {
            self.push(Finding::new(
                "saml_acs_not_https",
                Severity::High,
                None,
                "identity.saml.acs_url",
                format!("{}: the IdP's answer (a bearer assertion) would cross the network in plaintext", saml.acs_url),
                "serve the ACS on the https listener: acs_url = \"https://<gateway>/saml/acs\" (or an https server.console_url)",
            ));
        }
        if saml.entity_id.starts_with("http://") {
            self.push(Finding::new(
                "saml_entity_id_not_https",
                Severity::Low,
                None,
                "identity.saml.entity_id",
                format!(
                    "{}: an http:// entity id suggests metadata served in plaintext",
                    saml.entity_id
                ),
                "use an https:// URL (or a URN) as the entity id",
            ));
        }
        if let Some(ca) = &saml.ca {
            self.cert_file(
                ca,
                "identity.saml.ca",
                None,
                "SAML IdP metadata CA certificate",
            );
        }
        if let tollgate_config::SamlMetadataSource::File(path) = &saml.idp_metadata {
            if self.exists(
                path,
                "identity.saml.idp_metadata",
                None,
                "SAML IdP metadata",
            ) {
                let parsed = std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|xml| tollgate_identity::saml::SamlSp::new(saml, &xml));
                match parsed {
                    Err(e) => self.push(Finding::new(
                        "saml_metadata_unusable",
                        Severity::High,
                        None,
                        "identity.saml.idp_metadata",
                        format!("{}: {e}", path.display()),
                        "use the IdP's SAML 2.0 metadata: an EntityDescriptor with an IDPSSODescriptor, a signing certificate and an HTTP-Redirect SingleSignOnService",
                    )),
                    Ok(sp) if !sp.facts().sso_url.starts_with("https://") => {
                        self.push(Finding::new(
                            "saml_idp_not_https",
                            Severity::Medium,
                            None,
                            "identity.saml.idp_metadata",
                            format!("the IdP's sign-in URL {} is not https: people's passwords and the AuthnRequest cross the network in plaintext", sp.facts().sso_url),
                            "use the IdP's https metadata",
                        ))
                    }
                    Ok(_) => {}
                }
            }
        }
        if !issuing_ca {
            self.push(Finding::new(
                "saml_login_without_issuing_ca",
                Severity::Low,
                None,
                "server.issuing_ca_cert",
                "[identity.saml] signs people in to the console, but the gateway has no issuing CA: `tollgate login --saml` gets no certificate (503)",
                "set server.issuing_ca_cert and issuing_ca_key (an intermediate of your client CA will do)",
            ));
        }
        if saml.max_cert_ttl.is_some_and(|t| t > MAX_SENSIBLE_CERT_TTL) {
            self.push(Finding::new(
                "saml_long_cert_ttl",
                Severity::Medium,
                None,
                "identity.saml.max_cert_ttl",
                "certificates from `tollgate login --saml` may live longer than a day; a lost laptop keeps access that long",
                "keep max_cert_ttl at a working day (12h) or less",
            ));
        }
    }

    /// A shared PostgreSQL store carries every replica's audit trail and reviews: its leg must
    /// be encrypted and verified like an upstream's.
    fn postgres_store(&mut self, url: &str) {
        use tollgate_store::postgres::PgSslMode;
        let parsed = match tollgate_store::PgStoreUrl::parse(url) {
            Ok(u) => u,
            Err(e) => {
                self.push(Finding::new(
                    "store_url_invalid",
                    Severity::High,
                    None,
                    "server.store",
                    e.to_string(),
                    "use postgres://USER@HOST:PORT/DBNAME?sslrootcert=CA_FILE&password_file=PATH",
                ));
                return;
            }
        };
        match parsed.sslmode {
            PgSslMode::Disable => self.push(Finding::new(
                "store_plaintext",
                Severity::Critical,
                None,
                "server.store",
                "the PostgreSQL store is reached in plaintext (sslmode=disable): audit events, reviews and the store password cross the network unencrypted",
                "remove sslmode=disable and give sslrootcert=CA_FILE (verify-full is the default)",
            )),
            PgSslMode::VerifyCa => self.push(Finding::new(
                "store_unverified",
                Severity::High,
                None,
                "server.store",
                "the PostgreSQL store's host name is not verified (sslmode=verify-ca): any server with a certificate from that CA can pose as the store",
                "remove sslmode=verify-ca (verify-full is the default) and connect by a name the store's certificate carries",
            )),
            PgSslMode::VerifyFull => {}
        }
        if let Some(ca) = &parsed.sslrootcert {
            self.cert_file(ca, "server.store", None, "store CA certificate");
        }
    }

    /// Several replicas pass cancel requests on to each other over mutual TLS: each needs the
    /// issuing CA (its certificate as a replica) and the CA of the others' server certificates.
    fn replica_peers(&mut self, s: &tollgate_config::Server) {
        if s.issuing_ca_cert.is_none() || s.client_ca.is_none() {
            self.push(Finding::new(
                "replica_cancel_unforwarded",
                Severity::Medium,
                None,
                "server.issuing_ca_cert",
                "with a shared store, a cancel request that reaches another replica than its session's is not passed on: replicas authenticate to each other with certificates from server.issuing_ca_cert/key, which are not set",
                "set server.client_ca and server.issuing_ca_cert/issuing_ca_key (the client CA or an intermediate it signed) on every replica",
            ));
        }
        if let Some(ca) = &s.replica_ca {
            self.cert_file(ca, "server.replica_ca", None, "replica CA certificate");
        }
        let (key, ca) = match (&s.replica_ca, &s.client_ca) {
            (Some(ca), _) => ("server.replica_ca", ca),
            (None, Some(ca)) => ("server.client_ca", ca),
            (None, None) => return,
        };
        if tollgate_tls::pki::chain_reaches_bundle(&s.tls_cert, ca) == Ok(false) {
            self.push(Finding::new(
                "replica_cert_unverifiable",
                Severity::Medium,
                None,
                key,
                format!(
                    "the gateway's certificate (server.tls_cert) does not chain to {key} ({}): the other replicas verify it against that CA when they pass a cancel request on, and would refuse it",
                    ca.display()
                ),
                "set server.replica_ca to the CA that issued the replicas' tls_cert",
            ));
        }
    }

    /// Connection caps turned off (0): one client or one leaked credential can exhaust the gateway.
    fn connection_limits(&mut self, s: &tollgate_config::Server) {
        for (key, value, severity, what) in [
            (
                "server.max_connections",
                s.max_connections,
                Severity::Medium,
                "the gateway accepts connections until it runs out of file descriptors or memory",
            ),
            (
                "server.max_connections_per_source",
                s.max_connections_per_source,
                Severity::Low,
                "one address can take every connection the gateway has",
            ),
            (
                "server.max_connections_per_identity",
                s.max_connections_per_identity,
                Severity::Low,
                "one identity (or a leaked token) can take every connection the gateway has",
            ),
        ] {
            if value == 0 {
                self.push(Finding::new(
                    "connection_limit_disabled",
                    severity,
                    None,
                    key,
                    format!("{key} = 0 turns the limit off: {what}"),
                    format!("remove the key (default {}) or set a limit above your busiest client's pool size", tollgate_config::DEFAULT_MAX_CONNECTIONS),
                ));
            }
        }
    }

    /// An injected secret (a database password, an HTTP credential) that will not load.
    fn secret(
        &mut self,
        source: &SecretSource,
        key: &str,
        resource: Option<&str>,
        purpose: &str,
        what: &str,
    ) {
        match source {
            SecretSource::Env(var) => match std::env::var_os(var) {
                Some(v) if !v.is_empty() => {}
                _ => self.push(Finding::new(
                    "unset_env",
                    Severity::High,
                    resource,
                    format!("{key}_env"),
                    format!("resource {:?}: environment variable {var} is not set (or empty), so the gateway cannot {purpose}", resource.unwrap_or("")),
                    format!("set {var} in the gateway's environment, or use {key}_file"),
                )),
            },
            SecretSource::File(p) => {
                let key = format!("{key}_file");
                if self.exists(p, &key, resource, what) {
                    self.private(p, &key, resource, what);
                }
            }
            SecretSource::None => {}
        }
    }

    /// Rules that only record (any kind); for SQL resources also guardrails that would not
    /// load, and statements the parser cannot read let through.
    fn rules(&mut self, r: &tollgate_config::Resource) {
        let name = Some(r.name.as_str());
        let dry_rules: Vec<&str> = r
            .rules
            .iter()
            .filter(|rule| rule.dry_run || r.dry_run)
            .map(|rule| rule.name.as_str())
            .collect();
        if !dry_rules.is_empty() {
            self.push(Finding::new(
                "rules_dry_run",
                Severity::Low,
                name,
                if r.dry_run { "resources.dry_run" } else { "resources.rules.dry_run" },
                format!("resource {:?}: rules {dry_rules:?} only record what they would do (dry_run); they enforce nothing", r.name),
                "once the audit trail's decision.dry_run shows what they would change, remove dry_run",
            ));
        }
        if r.kind == tollgate_config::ResourceKind::Mcp
            && r.pinning == tollgate_config::PinMode::Off
        {
            self.push(Finding::new(
                "mcp_pinning_off",
                Severity::Low,
                name,
                "resources.pinning.mode",
                format!("resource {:?}: MCP tool definitions are not pinned, so a server that changes what a tool says about itself (a \"rug pull\") goes unnoticed", r.name),
                "set [resources.pinning] mode = \"enforce\" (or \"warn\")",
            ));
        }
        if !matches!(
            r.kind,
            tollgate_config::ResourceKind::Postgres | tollgate_config::ResourceKind::Mysql
        ) {
            // HTTP and MCP rules are validated whole by the config loader; the SQL checks do
            // not apply.
            return;
        }
        if !r.rules.is_empty() || r.read_only {
            if let Err(e) = tollgate_policy::ResourcePolicy::from_config(r) {
                self.push(Finding::new(
                    "policy_rule",
                    Severity::High,
                    name,
                    "resources.rules",
                    format!("{e}; the gateway will not start with it"),
                    "fix the rule",
                ));
            }
        }
        if r.opaque_code == tollgate_config::OpaqueCode::Kind
            && (!r.rules.is_empty() || r.read_only)
        {
            self.push(Finding::new(
                "opaque_code_kind",
                Severity::Medium,
                name,
                "resources.opaque_code",
                format!("resource {:?}: opaque_code = \"kind\": DO blocks, CALL and functions tollgate cannot inspect are judged by their own kind only, so code inside them may run writes the rules deny or hold", r.name),
                "remove the key (the default, \"strict\", judges such code as any write); list functions you trust in trusted_functions, and grant the upstream role only the privileges its clients need",
            ));
        }
        if r.unparsable == tollgate_config::RuleAction::Allow && !r.rules.is_empty() {
            self.push(Finding::new(
                "unparsable_allowed",
                Severity::Medium,
                name,
                "resources.unparsable",
                format!("resource {:?}: unparsable = \"allow\": a statement the SQL parser cannot read is forwarded without its rules being applied", r.name),
                "remove the key (the default denies) or set unparsable = \"review\"",
            ));
        }
    }

    /// Masking rules that would not load, and a `hash` key that is missing or too short.
    fn masks(&mut self, config: &Config, r: &tollgate_config::Resource) {
        if r.masks.is_empty() {
            return;
        }
        let name = Some(r.name.as_str());
        let key = match tollgate_pg::load_mask_key(&config.server.mask_key) {
            Ok(k) => k,
            Err(e) => {
                self.push(Finding::new(
                    "mask_key",
                    Severity::High,
                    name,
                    "server.mask_key_env",
                    format!("resource {:?}: the masking key cannot be used: {e}", r.name),
                    "set server.mask_key_env (or mask_key_file) to at least 32 random bytes, e.g. `openssl rand -hex 32`",
                ));
                return;
            }
        };
        if let Err(e) = tollgate_pg::masking_policy(r, key) {
            self.push(Finding::new(
                "mask_rule",
                Severity::High,
                name,
                "resources.masks",
                format!("resource {:?}: {e}; the gateway will not start with it", r.name),
                "fix the rule (detectors, strategy, types), or set server.mask_key_env for strategy \"hash\"",
            ));
        }
    }

    fn exists(&mut self, path: &Path, key: &str, resource: Option<&str>, what: &str) -> bool {
        if path.exists() {
            return true;
        }
        self.push(Finding::new(
            "missing_file",
            Severity::High,
            resource,
            key,
            format!("{what} {} does not exist", path.display()),
            format!("create it, or correct {key}"),
        ));
        false
    }

    /// Secrets must not be readable (or writable) by group or others.
    fn private(&mut self, path: &Path, key: &str, resource: Option<&str>, what: &str) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            self.push(Finding::new(
                "key_permissions",
                Severity::High,
                resource,
                key,
                format!(
                    "{what} {} has mode {mode:04o}: group or others can read it",
                    path.display()
                ),
                format!("chmod 600 {}", path.display()),
            ));
        }
    }

    fn key_file(&mut self, path: &Path, key: &str, resource: Option<&str>) {
        if self.exists(path, key, resource, "private key") {
            self.private(path, key, resource, "private key");
        }
    }

    fn cert_file(&mut self, path: &Path, key: &str, resource: Option<&str>, what: &str) {
        if !self.exists(path, key, resource, what) {
            return;
        }
        let certs = match tollgate_tls::load_certs(path) {
            Ok(c) => c,
            Err(e) => {
                self.push(Finding::new(
                    "bad_certificate",
                    Severity::High,
                    resource,
                    key,
                    format!("{what}: {e}"),
                    format!("point {key} at a PEM certificate file"),
                ));
                return;
            }
        };
        for der in &certs {
            let Ok(s) = tollgate_tls::pki::summarize(der) else {
                continue;
            };
            let days = days_until(s.not_after, self.opts.now);
            let label = format!("{what} {} ({})", path.display(), s.subject);
            if s.not_after <= self.opts.now {
                self.push(Finding::new(
                    "cert_expired",
                    Severity::Critical,
                    resource,
                    key,
                    format!("{label} expired on {}", rfc3339(s.not_after)),
                    "issue a new certificate (tollgate pki issue) and replace the file",
                ));
            } else if days < self.opts.min_days as i64 {
                self.push(Finding::new(
                    "cert_expiring",
                    Severity::Medium,
                    resource,
                    key,
                    format!("{label} expires in {days} days ({}), within the {}-day minimum", rfc3339(s.not_after), self.opts.min_days),
                    "renew it now (tollgate pki issue) and replace the file; the gateway reloads it without a restart",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Duration;
    use tollgate_tls::pki;

    /// A CA, a gateway certificate and an upstream CA in a temp dir, and a clean config over them.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            pki::init_ca(&dir.path().join("pki"), "test CA").unwrap();
            pki::init_ca(&dir.path().join("db"), "db CA").unwrap();
            pki::issue_crl(
                &dir.path().join("pki"),
                &[],
                Duration::from_secs(86_400),
                &dir.path().join("pki/crl.pem"),
            )
            .unwrap();
            let f = Fixture { dir };
            f.server_cert("gateway", None, Duration::from_secs(90 * 86_400));
            std::fs::write(f.path("app.password"), "pw").unwrap();
            std::fs::set_permissions(f.path("app.password"), PermissionsExt::from_mode(0o600))
                .unwrap();
            std::fs::write(f.path("api.token"), "Bearer t").unwrap();
            std::fs::set_permissions(f.path("api.token"), PermissionsExt::from_mode(0o600))
                .unwrap();
            f
        }

        fn path(&self, p: &str) -> PathBuf {
            self.dir.path().join(p)
        }

        fn server_cert(&self, name: &str, not_before: Option<SystemTime>, ttl: Duration) {
            let spec = pki::ServerCertSpec {
                dns: vec!["localhost".into()],
                ips: vec![],
                ttl,
                not_before,
            };
            pki::issue_server(&self.path("pki"), &spec, &self.path(&format!("pki/{name}")))
                .unwrap();
        }

        /// A clean config whose replicas can authenticate to each other (an issuing CA).
        fn replica_config(&self) -> Config {
            let mut c = self.config("", "");
            c.server.issuing_ca_cert = Some(self.path("pki/ca.crt"));
            c.server.issuing_ca_key = Some(self.path("pki/ca.key"));
            c
        }

        fn config(&self, extra_server: &str, resource: &str) -> Config {
            self.config_of("postgres", extra_server, resource)
        }

        /// As [`Fixture::config`], the resource of `kind`.
        fn config_of(&self, kind: &str, extra_server: &str, resource: &str) -> Config {
            let text = format!(
                r#"[server]
postgres_listen = "127.0.0.1:6432"
tls_cert = "pki/gateway.crt"
tls_key = "pki/gateway.key"
client_ca = "pki/ca.crt"
client_crl = ["pki/crl.pem"]
store = "sqlite://tollgate.db"
{extra_server}

[roles]
admin_groups = ["sre"]

[[resources]]
name = "app"
kind = "{kind}"
upstream = "127.0.0.1:5432"
allow_groups = ["sre", "agents"]
{resource}
"#
            );
            let text = if text.contains("[resources.tls]") {
                text
            } else {
                format!("{text}[resources.tls]\nca = \"db/ca.crt\"\nserver_name = \"localhost\"\n[resources.credentials]\nuser = \"app\"\npassword_file = \"app.password\"\n")
            };
            let path = self.path("tollgate.toml");
            std::fs::write(&path, text).unwrap();
            tollgate_config::load(&path).unwrap()
        }

        /// The same server with one http resource "api" at `upstream`; without its own
        /// `[resources.tls]`, a verified https upstream injecting `api.token`.
        fn http_config(&self, upstream: &str, resource: &str) -> Config {
            let tail = if resource.contains("[resources.tls]") {
                resource.to_string()
            } else {
                format!("{resource}[resources.tls]\nca = \"db/ca.crt\"\nserver_name = \"localhost\"\n[resources.credentials]\nheader = \"Authorization\"\nvalue_file = \"api.token\"\n")
            };
            let text = format!(
                r#"[server]
postgres_listen = "127.0.0.1:6432"
https_listen = "127.0.0.1:8443"
tls_cert = "pki/gateway.crt"
tls_key = "pki/gateway.key"
client_ca = "pki/ca.crt"
client_crl = ["pki/crl.pem"]
store = "sqlite://tollgate.db"

[roles]
admin_groups = ["sre"]

[[resources]]
name = "api"
kind = "http"
upstream = "{upstream}"
allow_groups = ["sre", "agents"]
{tail}"#
            );
            let path = self.path("tollgate.toml");
            std::fs::write(&path, text).unwrap();
            tollgate_config::load(&path).unwrap()
        }

        fn check(&self, c: &Config) -> Vec<Finding> {
            check(c, &CheckOptions::default())
        }
    }

    fn kinds(f: &[Finding]) -> Vec<&'static str> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn clean_config_passes() {
        let f = Fixture::new();
        assert_eq!(f.check(&f.config("", "")), vec![]);
    }

    #[test]
    fn mcp_resources_without_pinning_are_flagged() {
        let f = Fixture::new();
        let c = f.http_config("https://127.0.0.1:8443/mcp", "");
        let text = std::fs::read_to_string(&c.path)
            .unwrap()
            .replace("kind = \"http\"", "kind = \"mcp\"");
        std::fs::write(&c.path, &text).unwrap();
        let c = tollgate_config::load(&c.path).unwrap();
        assert_eq!(kinds(&f.check(&c)), ["mcp_pinning_off"]);
        std::fs::write(
            &c.path,
            format!("{text}[resources.pinning]\nmode = \"enforce\"\n"),
        )
        .unwrap();
        let c = tollgate_config::load(&c.path).unwrap();
        assert_eq!(f.check(&c), vec![]);
    }

    #[test]
    fn clean_http_resource_passes() {
        let f = Fixture::new();
        let c = f.http_config("https://127.0.0.1:8443/v1", "");
        assert!(c.resources[0].http.is_some());
        assert_eq!(f.check(&c), vec![]);
        // HTTP rules and masks are not held to the SQL lints.
        let c = f.http_config(
            "https://localhost",
            "[[resources.rules]]\nmethods = [\"DELETE\"]\npaths = [\"/**\"]\naction = \"deny\"\n[[resources.masks]]\njson_paths = [\"$.email\"]\n",
        );
        assert_eq!(f.check(&c), vec![]);
        // A dry-run rule enforces nothing, whatever the kind.
        let c = f.http_config(
            "https://localhost",
            "[[resources.rules]]\nname = \"try\"\nmethods = [\"DELETE\"]\naction = \"deny\"\ndry_run = true\n",
        );
        assert_eq!(kinds(&f.check(&c)), ["rules_dry_run"]);
    }

    #[test]
    fn plaintext_http_upstream_is_critical() {
        let f = Fixture::new();
        let c = f.http_config(
            "http://127.0.0.1:8080",
            "[resources.tls]\nmode = \"disable\"\n[resources.credentials]\nheader = \"Authorization\"\nvalue_file = \"api.token\"\n",
        );
        assert_eq!(c.resources[0].http.as_ref().map(|h| h.tls), Some(false));
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["upstream_tls_not_verify_full"], "{found:?}");
        assert_eq!(found[0].severity, Severity::Critical);
        assert_eq!(found[0].resource.as_deref(), Some("api"));
        assert_eq!(found[0].key, "resources.tls.mode");
        assert!(
            found[0].message.contains("plaintext"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn injected_http_credential_must_load_and_stay_private() {
        let f = Fixture::new();
        let var = "TOLLGATE_SCAN_TEST_SURELY_UNSET_HTTP_VAR";
        let c = f.http_config(
            "https://localhost:9443",
            &format!("[resources.tls]\nca = \"db/ca.crt\"\n[resources.credentials]\nheader = \"X-Api-Key\"\nvalue_env = \"{var}\"\n"),
        );
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["unset_env"], "{found:?}");
        assert_eq!(found[0].key, "resources.credentials.value_env");
        assert_eq!(found[0].resource.as_deref(), Some("api"));
        assert!(found[0].message.contains(var), "{}", found[0].message);
        assert!(found[0].message.contains("authenticate upstream"));
        assert!(found[0].fix.contains("value_file"), "{}", found[0].fix);

        let c = f.http_config("https://localhost:9443", "");
        std::fs::set_permissions(f.path("api.token"), PermissionsExt::from_mode(0o640)).unwrap();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["key_permissions"], "{found:?}");
        assert_eq!(found[0].key, "resources.credentials.value_file");
        assert!(
            found[0].message.contains("mode 0640"),
            "{}",
            found[0].message
        );
        assert!(found[0].fix.starts_with("chmod 600 "), "{}", found[0].fix);

        std::fs::remove_file(f.path("api.token")).unwrap();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["missing_file"], "{found:?}");
        assert_eq!(found[0].key, "resources.credentials.value_file");
    }

    #[test]
    fn tls_opt_outs_fail() {
        let f = Fixture::new();
        for (mode, severity) in [
            ("disable", Severity::Critical),
            ("insecure-skip-verify", Severity::Critical),
            ("verify-ca", Severity::High),
        ] {
            let c = f.config("", &format!("[resources.tls]\nmode = \"{mode}\"\nca = \"db/ca.crt\"\n[resources.credentials]\nuser = \"app\"\npassword_file = \"app.password\"\n"));
            let found = f.check(&c);
            assert_eq!(kinds(&found), ["upstream_tls_not_verify_full"], "{mode}");
            assert_eq!(found[0].severity, severity);
            assert_eq!(found[0].resource.as_deref(), Some("app"));
            assert_eq!(found[0].key, "resources.tls.mode");
            assert!(found[0].message.contains(mode), "{}", found[0].message);
            assert!(found[0].fix.contains("verify-full"));
        }
    }

    #[test]
    fn expiring_and_expired_certificates_fail() {
        let f = Fixture::new();
        // Expires in about 5 days: inside the default 14-day window, outside a 3-day one.
        f.server_cert("gateway", None, Duration::from_secs(5 * 86_400 + 3600));
        let c = f.config("", "");
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["cert_expiring"]);
        assert_eq!(found[0].key, "server.tls_cert");
        assert!(
            found[0].message.contains("expires in 5 days"),
            "{}",
            found[0].message
        );
        let relaxed = check(
            &c,
            &CheckOptions {
                min_days: 3,
                ..Default::default()
            },
        );
        assert!(relaxed.is_empty(), "{relaxed:?}");

        // Valid from 10 days ago for 9 days: expired yesterday.
        let past = SystemTime::now() - Duration::from_secs(10 * 86_400);
        f.server_cert("gateway", Some(past), Duration::from_secs(9 * 86_400));
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["cert_expired"]);
        assert_eq!(found[0].severity, Severity::Critical);
        assert!(
            found[0].message.contains("expired on"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn expiring_ca_files_are_checked_too() {
        let f = Fixture::new();
        // An "upstream CA" file that is really a short-lived leaf: every certificate in it counts.
        let spec = pki::ServerCertSpec {
            dns: vec!["db".into()],
            ips: vec![],
            ttl: Duration::from_secs(86_400),
            not_before: None,
        };
        pki::issue_server(&f.path("pki"), &spec, &f.path("short")).unwrap();
        let c = f.config("", "[resources.tls]\nca = \"short.crt\"\n[resources.credentials]\nuser = \"app\"\npassword_file = \"app.password\"\n");
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["cert_expiring"]);
        assert_eq!(found[0].key, "resources.tls.ca");
        assert_eq!(found[0].resource.as_deref(), Some("app"));
    }

    #[test]
    fn readable_keys_and_password_files_fail() {
        let f = Fixture::new();
        let c = f.config("", "");
        std::fs::set_permissions(f.path("pki/gateway.key"), PermissionsExt::from_mode(0o644))
            .unwrap();
        std::fs::set_permissions(f.path("app.password"), PermissionsExt::from_mode(0o640)).unwrap();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["key_permissions", "key_permissions"]);
        assert_eq!(found[0].key, "server.tls_key");
        assert!(
            found[0].message.contains("mode 0644"),
            "{}",
            found[0].message
        );
        assert!(found[0].fix.starts_with("chmod 600 "));
        assert_eq!(found[1].key, "resources.credentials.password_file");
    }

    #[test]
    fn a_readable_issuing_ca_key_fails() {
        let f = Fixture::new();
        let c = f.config(
            "issuing_ca_cert = \"pki/ca.crt\"\nissuing_ca_key = \"pki/ca.key\"",
            "",
        );
        assert!(f.check(&c).is_empty(), "{:?}", kinds(&f.check(&c)));
        std::fs::set_permissions(f.path("pki/ca.key"), PermissionsExt::from_mode(0o644)).unwrap();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["key_permissions"]);
        assert_eq!(found[0].key, "server.issuing_ca_key");
    }

    #[test]
    fn oidc_sign_in_needs_an_issuing_ca_and_short_certificates() {
        let f = Fixture::new();
        let found = f.check(&f.config(
            "\n[[identity.oidc]]\nissuer = \"https://idp.example\"\nclient_id = \"tollgate\"\naudiences = [\"tollgate\"]\nmax_cert_ttl = \"7d\"\n",
            "",
        ));
        assert_eq!(
            kinds(&found),
            ["oidc_long_cert_ttl", "oidc_login_without_issuing_ca"]
        );
    }

    #[test]
    fn saml_needs_https_and_idp_metadata_with_a_signing_certificate() {
        let f = Fixture::new();
        let pem = std::fs::read_to_string(f.path("pki/ca.crt")).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let md = |sso: &str, cert: bool| {
            let key = if cert {
                format!(
                    r#"<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>{b64}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"#
                )
            } else {
                String::new()
            };
            format!(
                r#"<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" xmlns:ds="http://www.w3.org/2000/09/xmldsig#" entityID="https://idp.example/md"><md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">{key}<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" Location="{sso}"/></md:IDPSSODescriptor></md:EntityDescriptor>"#
            )
        };
        let saml = |acs: &str, issuing: bool| {
            let ca = if issuing {
                "issuing_ca_cert = \"pki/ca.crt\"\nissuing_ca_key = \"pki/ca.key\"\n"
            } else {
                ""
            };
            format!("{ca}\n[identity.saml]\nidp_metadata = \"idp.xml\"\nentity_id = \"https://gw.example/saml\"\nacs_url = \"{acs}\"\ngroup_map = {{ \"x\" = \"sre\" }}\nmax_cert_ttl = \"12h\"\n")
        };
        let https = "https://gw.example/saml/acs";
        std::fs::write(f.path("idp.xml"), md("https://idp.example/sso", true)).unwrap();
        let found = f.check(&f.config(&saml(https, true), ""));
        assert!(found.is_empty(), "{found:?}");
        let found = f.check(&f.config(&saml("http://gw.example/saml/acs", false), ""));
        assert_eq!(
            kinds(&found),
            ["saml_acs_not_https", "saml_login_without_issuing_ca"]
        );
        std::fs::write(f.path("idp.xml"), md("http://idp.example/sso", true)).unwrap();
        assert_eq!(
            kinds(&f.check(&f.config(&saml(https, true), ""))),
            ["saml_idp_not_https"]
        );
        std::fs::write(f.path("idp.xml"), md("https://idp.example/sso", false)).unwrap();
        let found = f.check(&f.config(&saml(https, true), ""));
        assert_eq!(kinds(&found), ["saml_metadata_unusable"]);
        assert!(
            found[0].message.contains("no signing certificate"),
            "{}",
            found[0].message
        );
        std::fs::remove_file(f.path("idp.xml")).unwrap();
        assert_eq!(
            kinds(&f.check(&f.config(&saml(https, true), ""))),
            ["missing_file"]
        );
    }

    #[test]
    fn oidc_issuers_name_groups_and_their_ca_is_checked() {
        let f = Fixture::new();
        let rule = "[[resources.rules]]\nstatements = [\"delete\"]\naction = \"review\"\napprovers = [\"dbas\", \"oncall\"]\n";
        let oidc = |ca: &str| {
            format!("\n[[identity.oidc]]\nissuer = \"https://idp.example\"\naudiences = [\"tollgate\"]\nstatic_groups = [\"dbas\"]\ngroup_map = {{ \"6f1c\" = \"oncall\" }}\nca = \"{ca}\"\n")
        };
        let found = f.check(&f.config(&oidc("pki/ca.crt"), rule));
        assert!(found.is_empty(), "{found:?}");
        let found = f.check(&f.config(&oidc("pki/idp-ca.crt"), rule));
        assert_eq!(kinds(&found), ["missing_file"]);
        assert_eq!(found[0].key, "identity.oidc.ca");
    }

    #[test]
    fn unreachable_resources_and_unknown_groups_fail() {
        let f = Fixture::new();
        let mut c = f.config("", "");
        c.resources[0].allow_groups.clear();
        assert_eq!(kinds(&f.check(&c)), ["unreachable_resource"]);

        let c = f.config(
            "",
            r#"[[resources.rules]]
statements = ["delete"]
groups = ["agnets"]
action = "review"
approvers = ["sre", "dbas"]
"#,
        );
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["unknown_group", "unknown_group"]);
        assert_eq!(found[0].key, "resources.rules[0].groups");
        assert!(found[0].message.contains("\"agnets\""));
        assert_eq!(found[1].key, "resources.rules[0].approvers");
        assert!(found[1].message.contains("\"dbas\""));
    }

    #[test]
    fn masking_key_problems_and_bad_mask_rules_fail() {
        let f = Fixture::new();
        let hash = "[[resources.masks]]\ncolumns = [\"email\"]\nstrategy = \"hash\"\n";
        // No key for strategy "hash".
        let found = f.check(&f.config("", hash));
        assert_eq!(kinds(&found), ["mask_rule"], "{found:?}");
        // A key that is too short.
        std::fs::write(f.path("mask.key"), "0123456789abcdef").unwrap();
        let found = f.check(&f.config("mask_key_file = \"mask.key\"", hash));
        assert_eq!(kinds(&found), ["mask_key"], "{found:?}");
        assert!(found[0].message.contains("at least 32 bytes"), "{found:?}");
        assert!(
            !found[0].message.contains("0123456789abcdef"),
            "the key leaked: {found:?}"
        );
        // A good key: clean.
        std::fs::write(f.path("mask.key"), "ab".repeat(32)).unwrap();
        let found = f.check(&f.config("mask_key_file = \"mask.key\"", hash));
        assert!(found.is_empty(), "{found:?}");
        // An unknown detector.
        let found = f.check(&f.config("", "[[resources.masks]]\ndetectors = [\"emial\"]\n"));
        assert_eq!(kinds(&found), ["mask_rule"], "{found:?}");
    }

    #[test]
    fn unknown_access_and_unmask_approvers_are_findings() {
        let f = Fixture::new();
        let found = f.check(&f.config(
            "",
            "access_approvers = [\"sre\"]\nunmask_approvers = [\"privacy-team\"]\n",
        ));
        assert_eq!(kinds(&found), ["unknown_group"], "{found:?}");
        assert_eq!(found[0].key, "resources.unmask_approvers");
        assert!(found[0].message.contains("privacy-team"), "{found:?}");
    }

    #[test]
    fn unparsable_statements_allowed_under_rules_is_a_finding() {
        let f = Fixture::new();
        let rule = "unparsable = \"allow\"\n[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n";
        let found = f.check(&f.config("", rule));
        assert_eq!(kinds(&found), ["unparsable_allowed"], "{found:?}");
    }

    #[test]
    fn mysql_resources_get_the_sql_and_tls_checks() {
        let f = Fixture::new();
        let listen = "mysql_listen = \"127.0.0.1:3307\"";
        assert_eq!(f.check(&f.config_of("mysql", listen, "")), vec![]);
        let rule = "unparsable = \"allow\"\n[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n";
        let found = f.check(&f.config_of("mysql", listen, rule));
        assert_eq!(kinds(&found), ["unparsable_allowed"], "{found:?}");
        let tls = "[resources.tls]\nmode = \"insecure-skip-verify\"\n[resources.credentials]\nuser = \"app\"\npassword_file = \"app.password\"\n";
        let found = f.check(&f.config_of("mysql", listen, tls));
        assert_eq!(kinds(&found), ["upstream_tls_not_verify_full"], "{found:?}");
        assert_eq!(found[0].severity, Severity::Critical);
    }

    #[test]
    fn opaque_code_by_kind_and_dry_run_rules_are_findings() {
        let f = Fixture::new();
        let rule = "opaque_code = \"kind\"\n[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n";
        let found = f.check(&f.config("", rule));
        assert_eq!(kinds(&found), ["opaque_code_kind"], "{found:?}");
        assert_eq!(found[0].severity, Severity::Medium);
        let rule = "[[resources.rules]]\nname = \"try\"\nstatements = [\"drop\"]\naction = \"deny\"\ndry_run = true\n";
        let found = f.check(&f.config("", rule));
        assert_eq!(kinds(&found), ["rules_dry_run"], "{found:?}");
        assert!(found[0].message.contains("try"), "{found:?}");
        // The default judges opaque code strictly: nothing to report.
        let rule = "[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n";
        assert_eq!(f.check(&f.config("", rule)), vec![]);
    }

    #[test]
    fn disabled_connection_limits_are_findings() {
        let f = Fixture::new();
        let found = f.check(&f.config(
            "max_connections = 0\nmax_connections_per_source = 0\nmax_connections_per_identity = 0",
            "",
        ));
        assert_eq!(kinds(&found), vec!["connection_limit_disabled"; 3]);
        assert_eq!(found[0].severity, Severity::Medium);
        assert_eq!(found[0].key, "server.max_connections");
        assert!(found.iter().skip(1).all(|f| f.severity == Severity::Low));
        // Explicit limits, however high, are fine.
        assert_eq!(f.check(&f.config("max_connections = 50000", "")), vec![]);
    }

    #[test]
    fn client_certificates_without_a_crl_are_a_low_finding() {
        let f = Fixture::new();
        let c = f.config("", "");
        let mut without = c.clone();
        without.server.client_crl.clear();
        let found = f.check(&without);
        assert_eq!(kinds(&found), vec!["client_crl_missing"]);
        assert_eq!(found[0].severity, Severity::Low);
        // A listed CRL that is missing is a finding of its own.
        let mut missing = c.clone();
        missing.server.client_crl = vec![f.path("pki/nope.pem")];
        assert_eq!(kinds(&f.check(&missing)), vec!["missing_file"]);
        // No client CA, no client certificates: nothing to revoke.
        let mut no_ca = c;
        no_ca.server.client_ca = None;
        no_ca.server.client_crl.clear();
        assert_eq!(f.check(&no_ca), vec![]);
    }

    #[test]
    fn replicas_without_certificates_for_each_other_are_flagged() {
        let f = Fixture::new();
        let url = format!(
            "postgres://tg@db/tollgate?sslrootcert={}",
            f.path("pki/ca.crt").display()
        );
        let mut c = f.config("", "");
        c.server.store = url.clone();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["replica_cancel_unforwarded"]);
        assert_eq!(
            (found[0].key.as_str(), found[0].severity),
            ("server.issuing_ca_cert", Severity::Medium)
        );
        let mut c = f.replica_config();
        c.server.store = url;
        assert_eq!(f.check(&c), vec![]);
        // The replicas' server certificates from another CA than the one they are checked against.
        c.server.replica_ca = Some(f.path("db/ca.crt"));
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["replica_cert_unverifiable"]);
        assert_eq!(found[0].key, "server.replica_ca");
        c.server.replica_ca = Some(f.path("pki/ca.crt"));
        assert_eq!(f.check(&c), vec![]);
        c.server.replica_ca = Some(f.path("pki/missing-ca.crt"));
        assert!(kinds(&f.check(&c)).contains(&"missing_file"));
        // Alone on SQLite, nothing is forwarded: no finding.
        assert_eq!(f.check(&f.config("", "")), vec![]);
    }

    #[test]
    fn a_plaintext_or_unverified_postgres_store_fails() {
        let f = Fixture::new();
        let store = |url: &str| {
            let mut c = f.replica_config();
            c.server.store = url.to_string();
            f.check(&c)
        };
        let found = store("postgres://tg@db:5432/tollgate?sslmode=disable");
        assert_eq!(kinds(&found), ["store_plaintext"]);
        assert_eq!(
            (found[0].key.as_str(), found[0].severity),
            ("server.store", Severity::Critical)
        );
        let ca = f.path("pki/ca.crt");
        let found = store(&format!(
            "postgres://tg@db/tollgate?sslmode=verify-ca&sslrootcert={}",
            ca.display()
        ));
        assert_eq!(kinds(&found), ["store_unverified"]);
        assert!(store(&format!(
            "postgres://tg@db/tollgate?sslrootcert={}",
            ca.display()
        ))
        .is_empty());
        let found = store("postgres://tg:hunter2@db/tollgate");
        assert_eq!(kinds(&found), ["store_url_invalid"]);
        assert!(!found[0].to_string().contains("hunter2"));
        let found = store("postgres://tg@db/tollgate?sslrootcert=/nonexistent/ca.crt");
        assert_eq!(kinds(&found), ["missing_file"]);
    }

    #[test]
    fn fail_open_audit_fails() {
        let f = Fixture::new();
        let found = f.check(&f.config("audit_failure = \"open\"", ""));
        assert_eq!(kinds(&found), ["audit_fail_open"]);
        assert_eq!(found[0].key, "server.audit_failure");
    }

    #[test]
    fn commands_not_recorded_fails() {
        let f = Fixture::new();
        let found = f.check(&f.config("record_commands = false", ""));
        assert_eq!(kinds(&found), ["commands_not_recorded"]);
        assert_eq!(found[0].key, "server.record_commands");
        assert_eq!(found[0].severity, Severity::Critical);
        assert!(f.check(&f.config("record_commands = true", "")).is_empty());
    }

    #[test]
    fn missing_files_and_unset_env_fail() {
        let f = Fixture::new();
        let c = f.config("", "");
        std::fs::remove_file(f.path("pki/gateway.key")).unwrap();
        std::fs::remove_file(f.path("app.password")).unwrap();
        std::fs::remove_file(f.path("db/ca.crt")).unwrap();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["missing_file"; 3]);
        let keys: Vec<&str> = found.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.tls_key",
                "resources.tls.ca",
                "resources.credentials.password_file"
            ]
        );

        let var = "TOLLGATE_SCAN_TEST_SURELY_UNSET_VAR";
        let c = f.config("", &format!("[resources.tls]\nca = \"pki/ca.crt\"\n[resources.credentials]\nuser = \"app\"\npassword_env = \"{var}\"\n"));
        std::fs::write(f.path("pki/gateway.key"), "k").unwrap();
        std::fs::set_permissions(f.path("pki/gateway.key"), PermissionsExt::from_mode(0o600))
            .unwrap();
        let found = f.check(&c);
        assert_eq!(kinds(&found), ["unset_env"]);
        assert!(found[0].message.contains(var));
    }
}
