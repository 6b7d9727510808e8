//! A gateway in front of the test HTTPS upstream ([`super::upstream`]) with HTTP resources, for
//! the HTTP, WebSocket and attack tests: a test PKI (the gateway's certificate names
//! `localhost`, `billing.localhost` and `secret.localhost`), alice (sre) and bob (dev) with
//! client certificates, ci-bot with the service token, and resource "billing" reachable by sre
//! and ci with an injected credential. Test files add their own methods in `impl HttpEnv`.

use super::upstream::Upstream;
use super::{read_events, wait_for, Gateway, Pki, BIN, TOKEN};
use std::process::Command;
use std::time::Duration;
use tollgate_tls::pki::{self, IssuedFiles};

/// The credential the gateway injects upstream.
pub const UPSTREAM_SECRET: &str = "Bearer upstream-secret-4f9a";

pub struct HttpEnv {
    pub gw: Gateway,
    pub up: Upstream,
    pub pki: Pki,
    pub alice: IssuedFiles,
    pub bob: IssuedFiles,
    pub https_port: u16,
    pub http_port: u16,
    pub tmp: tempfile::TempDir,
}

/// What a test adds to the standard config.
pub struct HttpEnvOptions<'a> {
    /// Extra `[server]` lines.
    pub server_extra: &'a str,
    /// Keys of the "billing" resource (before its sub-tables).
    pub resource_keys: &'a str,
    /// Rules and masks of "billing".
    pub tables: &'a str,
    /// `roles.admin_groups`, as a TOML array.
    pub admin_groups: &'a str,
    /// More `[[identity.tokens]]` tables.
    pub identity_extra: &'a str,
    /// More `[[resources]]`; `{up_port}` and `{ca}` are filled in.
    pub resources_extra: &'a str,
}

impl Default for HttpEnvOptions<'_> {
    fn default() -> Self {
        HttpEnvOptions {
            server_extra: "",
            resource_keys: "",
            tables: "",
            admin_groups: r#"["sre"]"#,
            identity_extra: "",
            resources_extra: "",
        }
    }
}

impl HttpEnv {
    /// `resource_keys`: keys of the "billing" resource; `tables`: its rules and masks.
    pub fn start(resource_keys: &str, tables: &str) -> HttpEnv {
        HttpEnv::start_opts(HttpEnvOptions {
            resource_keys,
            tables,
            ..Default::default()
        })
    }

    pub fn start_opts(o: HttpEnvOptions<'_>) -> HttpEnv {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-http-")
            .tempdir()
            .unwrap();
        let pki = Pki::new(&tmp.path().join("pki"));
        let gw_cert = pki::issue_server(
            &pki.dir,
            &pki::ServerCertSpec {
                dns: vec![
                    "localhost".into(),
                    "billing.localhost".into(),
                    "secret.localhost".into(),
                ],
                ips: vec!["127.0.0.1".parse().unwrap()],
                ttl: Duration::from_secs(86400),
                not_before: None,
            },
            &pki.dir.join("gateway"),
        )
        .unwrap();
        let up_cert = pki.server("upstream");
        let up = Upstream::start(&up_cert.cert, &up_cert.key);
        let alice = pki.client("alice", &["sre"]);
        let bob = pki.client("bob", &["dev"]);
        let https_port = tollgate_testsupport::free_port();
        let http_port = tollgate_testsupport::free_port();
        let ca = pki.ca.display().to_string();
        let resources_extra = o
            .resources_extra
            .replace("{up_port}", &up.port.to_string())
            .replace("{ca}", &ca);
        let config = format!(
            r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{https_port}"
http_listen = "127.0.0.1:{http_port}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "sqlite://audit.db"
reload_interval = "200ms"
{server_extra}

[roles]
admin_groups = {admin_groups}

[[identity.tokens]]
subject = "ci-bot"
sha256 = "{token_sha}"
groups = ["ci"]
{identity_extra}

[[resources]]
name = "billing"
kind = "http"
upstream = "https://localhost:{up_port}"
allow_groups = ["sre", "ci"]
{resource_keys}
[resources.tls]
ca = "{ca}"
[resources.credentials]
header = "Authorization"
value_env = "BILLING_TOKEN"
{tables}
{resources_extra}
"#,
            cert = gw_cert.cert.display(),
            key = gw_cert.key.display(),
            server_extra = o.server_extra,
            admin_groups = o.admin_groups,
            token_sha = super::sha256_hex(TOKEN),
            identity_extra = o.identity_extra,
            up_port = up.port,
            resource_keys = o.resource_keys,
            tables = o.tables,
        );
        let gw = Gateway::start(tmp.path(), &config, &[("BILLING_TOKEN", UPSTREAM_SECRET)]);
        HttpEnv {
            gw,
            up,
            pki,
            alice,
            bob,
            https_port,
            http_port,
            tmp,
        }
    }

    /// `https://localhost:<https_port>/r/billing<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}/r/billing{path}", self.https_port)
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        read_events(&self.tmp.path().join("audit.db"))
    }

    /// Poll the audit store until `done(events)` holds.
    pub fn events_until(
        &self,
        what: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut evs = Vec::new();
        wait_for(Duration::from_secs(15), what, || {
            evs = self.events();
            done(&evs)
        });
        evs
    }

    /// The real `tollgate` CLI as `who`, against this gateway's API.
    pub fn cli(&self, who: &IssuedFiles, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env(
                "TOLLGATE_GATEWAY",
                format!("https://localhost:{}", self.https_port),
            )
            .env("TOLLGATE_CA", &self.pki.ca)
            .env("TOLLGATE_CERT", &who.cert)
            .env("TOLLGATE_KEY", &who.key)
            .output()
            .unwrap()
    }
}
