//! `tollgate login`: an OIDC sign-in becomes a short-lived client certificate. The token comes
//! from a person signing in in a browser (authorization code + PKCE, redirected to a loopback
//! listener on 127.0.0.1), from the device authorization grant (`--device`, for a terminal
//! without a browser), or from a workload (`--id-token-file`/`--id-token-env`: CI, Kubernetes).
//! The key is generated here and never leaves the machine; the gateway signs a CSR for it
//! (`POST /api/v1/certificates`) with the subject and groups of the token, for at most the
//! token's own remaining validity.
//!
//! `--saml` signs in with the gateway's SAML IdP instead: the key is generated first, the
//! browser goes to the gateway's `/saml/login` with this login's loopback port, a random state
//! and the SHA-256 of the public key; after the IdP's answer the gateway sends the browser back
//! to the loopback listener with a one-time code bound to that key, which is redeemed with the
//! CSR (`{"csr", "saml_code"}`) for a certificate of at most `[identity.saml] max_cert_ttl`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use tollgate_api::client::{ApiClient, ClientError, ClientOptions};

mod flow;

#[derive(Args)]
pub struct LoginArgs {
    /// The gateway's HTTPS API, e.g. https://gateway.example:8443.
    #[arg(long, env = "TOLLGATE_GATEWAY")]
    gateway: String,
    /// CA certificate the gateway's certificate must chain to.
    #[arg(long, env = "TOLLGATE_CA")]
    ca: Option<PathBuf>,
    /// File holding the OIDC token (ID or access token; e.g. a Kubernetes projected token).
    #[arg(long, conflicts_with_all = ["id_token_env", "device"])]
    id_token_file: Option<PathBuf>,
    /// Environment variable holding the OIDC token (e.g. one a CI job fetched).
    #[arg(long, conflicts_with = "device")]
    id_token_env: Option<String>,
    /// Sign in with the device authorization grant: prints a URL and a code to enter on any
    /// device with a browser, and waits (for terminals without a browser: SSH, agents).
    #[arg(long)]
    device: bool,
    /// Sign in with the gateway's SAML identity provider ([identity.saml]) in a browser.
    #[arg(long, conflicts_with_all = ["id_token_file", "id_token_env", "device", "issuer", "client_id"])]
    saml: bool,
    /// The issuer to sign in with (default: the gateway's only one; see its
    /// GET /api/v1/certificates/issuers).
    #[arg(long)]
    issuer: Option<String>,
    /// The OAuth client to sign in as (default: the issuer's client_id in the gateway's config).
    #[arg(long)]
    client_id: Option<String>,
    /// CA certificate the identity provider's TLS certificate must chain to (default: the
    /// system's roots).
    #[arg(long, env = "TOLLGATE_IDP_CA")]
    idp_ca: Option<PathBuf>,
    /// Scopes to ask the identity provider for.
    #[arg(long, default_value = tollgate_identity::oidc_login::DEFAULT_SCOPE)]
    scope: String,
    /// Print the sign-in URL only; do not try to open a browser.
    #[arg(long)]
    no_browser: bool,
    /// Certificate lifetime to ask for, e.g. 1h (capped by the issuer's max_cert_ttl and the
    /// token's expiry).
    #[arg(long)]
    ttl: Option<String>,
    /// Where the key and certificate go (default ~/.tollgate).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Print only `export` lines (PGSSLCERT, PGSSLKEY, TOLLGATE_CERT, TOLLGATE_KEY), for eval.
    #[arg(long)]
    print_env: bool,
}

struct Issued {
    certificate: String,
    chain: String,
    not_after: String,
    subject: String,
    groups: Vec<String>,
}

impl Issued {
    fn from_json(v: &serde_json::Value) -> anyhow::Result<Issued> {
        let s = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("the gateway's answer has no {k:?}"))
        };
        Ok(Issued {
            certificate: s("certificate")?,
            chain: s("chain")?,
            not_after: s("not_after")?,
            subject: s("subject")?,
            groups: v["groups"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|g| g.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

pub fn run(args: LoginArgs) -> anyhow::Result<()> {
    let (key_pem, csr_pem) =
        tollgate_tls::pki::key_and_csr("tollgate login").context("generating a key")?;
    let mut body = serde_json::json!({ "csr": csr_pem });
    let token = if args.saml {
        body["saml_code"] = flow::saml_sign_in(&args, &csr_pem)?.into();
        None
    } else {
        let token = match (&args.id_token_file, &args.id_token_env) {
            (Some(f), _) => std::fs::read_to_string(f)
                .with_context(|| format!("reading --id-token-file {}", f.display()))?,
            (None, Some(var)) => std::env::var(var)
                .with_context(|| format!("--id-token-env {var}: the variable is not set"))?,
            (None, None) => flow::sign_in(&args)?,
        };
        let token = token.trim().to_string();
        if token.is_empty() {
            bail!("the token is empty");
        }
        Some(token)
    };
    let dir = match &args.out_dir {
        Some(d) => d.clone(),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set: pass --out-dir")?)
            .join(".tollgate"),
    };
    let client = ApiClient::new(&ClientOptions {
        gateway: args.gateway.clone(),
        ca: args.ca.clone(),
        token,
        ..Default::default()
    })?;
    if let Some(ttl) = &args.ttl {
        body["ttl"] = ttl.clone().into();
    }
    let answer: serde_json::Value =
        client
            .post_json("/api/v1/certificates", &body)
            .map_err(|e| match e {
                ClientError::Status { status, body } => anyhow::anyhow!(
                    "the gateway refused to issue a certificate ({status}): {}{}",
                    body.error,
                    body.hint
                        .map(|h| format!("\nhint: {h}"))
                        .unwrap_or_default()
                ),
                e => e.into(),
            })?;
    let issued = Issued::from_json(&answer)?;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let name = file_name(&issued.subject);
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write_file(&key, key_pem.as_bytes(), 0o600)?;
    let mut chain = issued.certificate.clone();
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(&issued.chain);
    write_file(&crt, chain.as_bytes(), 0o644)?;

    let (crt_s, key_s) = (quote(&crt), quote(&key));
    if args.print_env {
        println!("export PGSSLCERT={crt_s}");
        println!("export PGSSLKEY={key_s}");
        println!("export TOLLGATE_CERT={crt_s}");
        println!("export TOLLGATE_KEY={key_s}");
        return Ok(());
    }
    let host = gateway_host(&args.gateway);
    let groups = if issued.groups.is_empty() {
        "no groups".to_string()
    } else {
        format!("groups: {}", issued.groups.join(", "))
    };
    println!(
        "certificate for {} ({groups}), valid until {}",
        issued.subject, issued.not_after
    );
    println!("  {}\n  {} (0600)\n", crt.display(), key.display());
    println!("PostgreSQL resources (psql or any libpq client):");
    // The CA that verified the API usually signs the PostgreSQL listener's certificate too.
    let root = args
        .ca
        .as_ref()
        .map_or("GATEWAY-CA.crt".to_string(), |c| c.display().to_string());
    println!("  PGSSLCERT={crt_s} PGSSLKEY={key_s} PGSSLROOTCERT={} psql \"host={host} port=5432 dbname=RESOURCE user=$USER sslmode=verify-full\"", quote(Path::new(&root)));
    println!("  psql \"host={host} port=5432 dbname=RESOURCE user=$USER sslmode=verify-full sslrootcert={root} sslcert={} sslkey={}\"", crt.display(), key.display());
    println!("  (port: the gateway's server.postgres_listen; dbname: the resource's name)");
    println!("tollgate CLI and HTTPS (curl --cert/--key):");
    println!("  export TOLLGATE_CERT={crt_s}");
    println!("  export TOLLGATE_KEY={key_s}");
    Ok(())
}

/// A file name from a subject: letters, digits, `.`, `-`, `_`, `@`; anything else becomes `_`.
fn file_name(subject: &str) -> String {
    let s: String = subject
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "tollgate".into()
    } else {
        s
    }
}

fn gateway_host(url: &str) -> String {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .to_string()
}

/// Single-quoted for a POSIX shell when needed.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-@+:".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Written to a temporary name with `mode` from the first byte, then renamed into place.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hosts() {
        assert_eq!(
            file_name("repo:acme/app:ref:refs/heads/main"),
            "repo_acme_app_ref_refs_heads_main"
        );
        assert_eq!(file_name("../x"), "_x");
        assert_eq!(file_name(""), "tollgate");
        assert_eq!(gateway_host("https://gw.example:8443"), "gw.example");
        assert_eq!(gateway_host("https://[::1]:8443/x"), "::1");
        assert_eq!(quote(Path::new("/a b/c")), "'/a b/c'");
    }
}
