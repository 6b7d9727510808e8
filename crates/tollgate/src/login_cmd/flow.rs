//! The interactive sign-ins of `tollgate login`: which issuer (the gateway's public list, or
//! `--issuer`/`--client-id`), then either the browser (authorization code + PKCE S256, the
//! provider redirecting to a listener on 127.0.0.1 and a random port, `state` checked there and
//! `nonce` in the ID token) or the device authorization grant (RFC 8628: a URL and a code to
//! enter elsewhere, polling at the provider's interval, slower on `slow_down`, stopping when the
//! code expires or the person refuses). The ID token they end with is what the gateway
//! validates and exchanges for a certificate. Messages go to stderr: stdout stays `--print-env`'s.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_api::client::{ApiClient, ClientOptions};
use tollgate_identity::oidc_login::{
    issuer_tls, unverified_claims, AuthorizationRequest, DevicePoll, Provider, SLOW_DOWN_SECS,
};

use super::LoginArgs;

/// How long the browser sign-in may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest request head the loopback listener reads, and how long it waits for one.
const MAX_CALLBACK_HEAD: usize = 16 * 1024;
const CALLBACK_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Sign a person in; the ID token.
pub(super) fn sign_in(args: &LoginArgs) -> anyhow::Result<String> {
    let (issuer, client_id) = which_issuer(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tls = issuer_tls(args.idp_ca.as_deref())
            .map_err(|e| anyhow!("{e} (pass --idp-ca FILE for a private identity provider)"))?;
        let provider = Provider::discover(&issuer, tls)
            .await
            .with_context(|| format!("finding the sign-in endpoints of {issuer}"))?;
        let token = if args.device {
            device(&provider, &client_id, &args.scope).await?
        } else {
            browser(&provider, &client_id, args).await?
        };
        Ok(token)
    })
}

/// `--saml`: the browser signs in at the gateway's SAML IdP; the one-time code the gateway
/// hands the loopback listener (bound to the key of `csr_pem`).
pub(super) fn saml_sign_in(args: &LoginArgs, csr_pem: &str) -> anyhow::Result<String> {
    let key = tollgate_tls::pki::csr_key_sha256(csr_pem).context("hashing the new public key")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("listening on 127.0.0.1 for the browser's return")?;
        let port = listener.local_addr()?.port();
        let state = tollgate_identity::oidc_login::random_token();
        let url = format!(
            "{}/saml/login?{}",
            args.gateway.trim_end_matches('/'),
            tollgate_identity::oidc_login::form(&[
                ("cli_port", &port.to_string()),
                ("cli_state", &state),
                ("cli_key", &key),
            ])
        );
        eprintln!("Sign in with the gateway's SAML identity provider in your browser:\n  {url}");
        if !args.no_browser {
            open_browser(&url);
        }
        eprintln!("Waiting for the browser to return to http://127.0.0.1:{port}/callback ...");
        tokio::time::timeout(BROWSER_TIMEOUT, callback(&listener, &state))
            .await
            .map_err(|_| {
                anyhow!(
                    "no sign-in came back within {} minutes: run tollgate login --saml again",
                    BROWSER_TIMEOUT.as_secs() / 60
                )
            })?
    })
}

/// `--issuer` and `--client-id` when both are given, else the gateway's sign-in issuers.
fn which_issuer(args: &LoginArgs) -> anyhow::Result<(String, String)> {
    if let (Some(i), Some(c)) = (&args.issuer, &args.client_id) {
        return Ok((i.clone(), c.clone()));
    }
    let client = ApiClient::new(&ClientOptions {
        gateway: args.gateway.clone(),
        ca: args.ca.clone(),
        ..Default::default()
    })?;
    let answer: Value = client.get_json("/api/v1/certificates/issuers")?;
    let listed: Vec<(String, String)> = answer["issuers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["issuer"].as_str()?.into(),
                i["client_id"].as_str()?.into(),
            ))
        })
        .collect();
    let (issuer, client_id) = match (&args.issuer, listed.as_slice()) {
        (Some(want), _) => listed
            .iter()
            .find(|(i, _)| i == want)
            .cloned()
            .ok_or_else(|| anyhow!("the gateway has no sign-in issuer {want:?} (it has: {}); pass --client-id too to use one it does not list", names(&listed)))?,
        (None, [one]) => one.clone(),
        (None, []) => bail!("the gateway lists no [[identity.oidc]] issuer with a client_id, so people cannot sign in through it: ask its operator to set identity.oidc.client_id, or pass --id-token-file/--id-token-env"),
        (None, _) => bail!("the gateway has several sign-in issuers ({}): pass --issuer URL", names(&listed)),
    };
    Ok((issuer, args.client_id.clone().unwrap_or(client_id)))
}

fn names(listed: &[(String, String)]) -> String {
    listed
        .iter()
        .map(|(i, _)| i.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The authorization code flow with PKCE and a loopback redirect (RFC 8252).
async fn browser(provider: &Provider, client_id: &str, args: &LoginArgs) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("listening on 127.0.0.1 for the browser's return")?;
    let port = listener.local_addr()?.port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let req = AuthorizationRequest::new(client_id, &redirect_uri, &args.scope);
    let url = provider.authorization_url(&req);
    eprintln!("Sign in with {} in your browser:\n  {url}", provider.issuer);
    if !args.no_browser {
        open_browser(&url);
    }
    eprintln!("Waiting for the browser to return to {redirect_uri} ...");
    let code = tokio::time::timeout(BROWSER_TIMEOUT, callback(&listener, &req.state))
        .await
        .map_err(|_| {
            anyhow!(
                "no sign-in came back within {} minutes: run tollgate login again",
                BROWSER_TIMEOUT.as_secs() / 60
            )
        })??;
    let token = provider
        .redeem_code(client_id, &code, &redirect_uri, &req.pkce.verifier, None)
        .await
        .context("redeeming the authorization code at the identity provider")?;
    check_id_token(&token, &provider.issuer, client_id, Some(&req.nonce))?;
    Ok(token)
}

/// Serve the loopback listener until the provider's redirect arrives: its `code` when its
/// `state` is ours. A redirect carrying another state (not from this login) ends the login.
async fn callback(listener: &tokio::net::TcpListener, state: &str) -> anyhow::Result<String> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let Ok(Ok(head)) =
            tokio::time::timeout(CALLBACK_READ_TIMEOUT, read_head(&mut stream)).await
        else {
            continue;
        };
        let target = head.split_whitespace().nth(1).unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if !head.starts_with("GET ") || path != "/callback" {
            reply(&mut stream, 404, "Not found.").await;
            continue;
        }
        let params = tollgate_api::params::parse_query(query).unwrap_or_default();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if !get("state").is_some_and(|s| tollgate_identity::ct_eq(s.as_bytes(), state.as_bytes())) {
            reply(
                &mut stream,
                400,
                "This answer is not for the tollgate login waiting here. Run tollgate login again.",
            )
            .await;
            bail!("the answer that reached the loopback listener carries another state (not from this login, or forged): run tollgate login again");
        }
        if let Some(error) = get("error") {
            let why = match get("error_description") {
                Some(d) => format!("{error}: {}", d.chars().take(200).collect::<String>()),
                None => error.to_string(),
            };
            reply(
                &mut stream,
                400,
                &format!("Sign-in failed ({why}). You can close this tab."),
            )
            .await;
            bail!("the identity provider did not sign you in ({why})");
        }
        let Some(code) = get("code").filter(|c| !c.is_empty()) else {
            reply(
                &mut stream,
                400,
                "The answer has no code. Run tollgate login again.",
            )
            .await;
            bail!("the identity provider's answer has no authorization code");
        };
        reply(
            &mut stream,
            200,
            "Signed in. You can close this tab and return to the terminal.",
        )
        .await;
        return Ok(code.to_string());
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_CALLBACK_HEAD {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A plain-text page for the browser (text, so nothing the provider sent can become markup).
async fn reply(stream: &mut tokio::net::TcpStream, status: u16, text: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// `$BROWSER` (a `:`-separated list, as xdg-utils reads it), else `xdg-open`, else `open`;
/// the URL is printed either way.
fn open_browser(url: &str) {
    let listed = std::env::var("BROWSER").unwrap_or_default();
    let candidates = listed
        .split(':')
        .filter(|c| !c.is_empty())
        .chain(["xdg-open", "open"]);
    for program in candidates {
        let started = std::process::Command::new(program)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if started.is_ok() {
            return;
        }
    }
    eprintln!("(no browser could be started here: open the URL above on any device that can reach 127.0.0.1 of this machine, or use --device)");
}

/// The device authorization grant (RFC 8628).
async fn device(provider: &Provider, client_id: &str, scope: &str) -> anyhow::Result<String> {
    let auth = provider
        .device_authorization(client_id, scope)
        .await
        .context("starting the device sign-in")?;
    eprintln!(
        "To sign in, open {} and enter the code {}",
        auth.verification_uri, auth.user_code
    );
    if let Some(complete) = &auth.verification_uri_complete {
        eprintln!("  (or open {complete})");
    }
    eprintln!(
        "Waiting for the sign-in (the code expires in {} minutes) ...",
        auth.expires_in.div_ceil(60)
    );
    let expired = || {
        anyhow!(
            "the code expired before the sign-in was completed: run tollgate login --device again"
        )
    };
    let deadline = Instant::now() + Duration::from_secs(auth.expires_in);
    let mut interval = auth.interval;
    loop {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        if Instant::now() >= deadline {
            return Err(expired());
        }
        match provider
            .poll_device(client_id, &auth.device_code)
            .await
            .context("waiting for the device sign-in")?
        {
            DevicePoll::Pending => {}
            DevicePoll::SlowDown => interval += SLOW_DOWN_SECS,
            DevicePoll::Expired => return Err(expired()),
            DevicePoll::Denied(why) => bail!(
                "the sign-in was refused at the identity provider{}: run tollgate login --device again to retry",
                why.map(|w| format!(" ({w})")).unwrap_or_default()
            ),
            DevicePoll::Done(token) => {
                check_id_token(&token, &provider.issuer, client_id, None)?;
                return Ok(token);
            }
        }
    }
}

/// The ID token came straight from the token endpoint over verified TLS; before it goes to the
/// gateway (which validates it fully) it must be this sign-in's: issuer, audience, nonce.
fn check_id_token(
    token: &str,
    issuer: &str,
    client_id: &str,
    nonce: Option<&str>,
) -> anyhow::Result<()> {
    let claims = unverified_claims(token)
        .ok_or_else(|| anyhow!("the identity provider's ID token is not a readable JWT"))?;
    if claims["iss"].as_str() != Some(issuer) {
        bail!(
            "the ID token names issuer {:?}, not {issuer:?}",
            claims["iss"]
        );
    }
    let for_us = match &claims["aud"] {
        Value::String(a) => a == client_id,
        Value::Array(v) => v.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    if !for_us {
        bail!("the ID token is not for client {client_id:?}");
    }
    if let Some(nonce) = nonce {
        let sent = claims["nonce"].as_str().unwrap_or_default();
        if !tollgate_identity::ct_eq(sent.as_bytes(), nonce.as_bytes()) {
            bail!("the ID token's nonce is not this sign-in's: run tollgate login again");
        }
    }
    Ok(())
}
