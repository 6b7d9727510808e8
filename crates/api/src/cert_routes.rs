//! `POST /api/v1/certificates`: a short-lived client certificate for the caller of an OIDC
//! token (what `tollgate login` calls). Body `{"csr": "<PEM PKCS#10>", "ttl": "1h"}` (ttl
//! optional); the CSR contributes its public key only: subject (CN) and groups (one OU each)
//! come from the token. The lifetime is the shortest of the requested TTL, the issuer's
//! `max_cert_ttl` (default 12h) and the token's remaining validity: a certificate never
//! outlives the token it was issued for. Service tokens and client certificates are refused
//! (403): certificates are issued for OIDC identities only. Every issue is a `cert.issued`
//! event (subject, groups, principal, serial, not_after, token issuer; never the token),
//! recorded before the certificate leaves, plus the route's `api.write` event.
//!
//! `tollgate login --saml` has no token: its body carries `"saml_code"`, the one-time code the
//! gateway's ACS handed its loopback listener. The code is taken from the store (once, within
//! two minutes) and is bound to the key the CLI announced before signing in: the CSR must be
//! for that key. Subject and groups come from the verified assertion; the lifetime is capped by
//! `[identity.saml] max_cert_ttl` (an interactive sign-in proves the person just now).

use std::time::{Duration, SystemTime};

use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use tollgate_identity::{AuthMethod, Identity};
use tollgate_store::EventInput;

use crate::routes::{authenticate, json_response, refusal, refused, ApiBody, Refusal};
use crate::{ApiState, Conn, KIND_API_WRITE};

pub(crate) const PATH: &str = "/api/v1/certificates";
/// Public: the issuers people can sign in with (`issuer`, `client_id`), so `tollgate login
/// --gateway URL` needs nothing else. Nothing secret: the console's sign-in page shows the same.
pub(crate) const ISSUERS_PATH: &str = "/api/v1/certificates/issuers";
/// Event kind of an issued client certificate.
pub const KIND_CERT_ISSUED: &str = "cert.issued";
/// Allowance for clients whose clock runs behind ours (the certificate starts this early).
const SKEW: Duration = Duration::from_secs(60);
/// Shortest certificate worth issuing.
const MIN_TTL: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertBody {
    csr: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    saml_code: Option<String>,
}

/// `GET /api/v1/certificates/issuers`: `{"issuers": [{"issuer", "client_id"}]}`.
pub(crate) fn issuers(state: &ApiState, req: &Request<hyper::body::Incoming>) -> Response<ApiBody> {
    if req.method() != Method::GET {
        return refused(&refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not supported on {ISSUERS_PATH}", req.method()),
            Some("use GET"),
        ));
    }
    let issuers: Vec<serde_json::Value> = state
        .oidc
        .sign_in_issuers()
        .iter()
        .map(|o| json!({"issuer": o.issuer, "client_id": o.client_id}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({ "issuers": issuers, "saml": state.saml.load().is_some() }),
    )
}

pub(crate) async fn handle(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let method = req.method().clone();
    let authenticated = authenticate(state, conn, &req).await;
    let mut acting: Option<Identity> = authenticated.as_ref().ok().cloned();
    let mut issued_event = None;
    let result = async {
        if method != Method::POST {
            return Err(refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not supported on {PATH}"),
                Some("use POST"),
            ));
        }
        // The body is read whatever the answer (a refusal sent before the request body is
        // consumed resets an HTTP/2 stream, which clients report as an error, not as the answer).
        let body = crate::review_routes::read_body(req).await?;
        let saml = serde_json::from_slice::<CertBody>(&body)
            .ok()
            .filter(|b| b.saml_code.is_some());
        let (who, body, token_issuer, max) = match saml {
            Some(b) => {
                let (who, idp) = redeem_saml_code(state, &b).await?;
                acting = Some(who.clone());
                let max = state
                    .config
                    .load()
                    .identity
                    .saml
                    .as_ref()
                    .and_then(|s| s.max_cert_ttl)
                    .unwrap_or(tollgate_tls::pki::DEFAULT_CLIENT_TTL);
                (who, b, idp, max)
            }
            None => {
                let who = authenticated.as_ref().map_err(|r| Refusal {
                    status: r.status,
                    body: r.body.clone(),
                    challenge: r.challenge,
                })?;
                if who.method != AuthMethod::Oidc {
                    return Err(refusal(
                        StatusCode::FORBIDDEN,
                        format!(
                            "certificates are issued for OIDC and SAML identities; {} authenticated with a {}",
                            who.subject,
                            match who.method {
                                AuthMethod::Cert => "client certificate",
                                _ => "service token",
                            }
                        ),
                        Some("send \"Authorization: Bearer <ID or access token>\" of an [[identity.oidc]] issuer (tollgate login --id-token-file/--id-token-env), or sign in with tollgate login --saml"),
                    ));
                }
                let body: CertBody = serde_json::from_slice(&body).map_err(|e| {
                    refusal(
                        StatusCode::BAD_REQUEST,
                        format!("the request body is not valid JSON of the form {{\"csr\": \"<PEM>\", \"ttl\": \"1h\"}}: {e}"),
                        None,
                    )
                })?;
                let issuer = who.principal.oidc_issuer().unwrap_or_default().to_string();
                // The config in force (reloads apply): the issuer's max_cert_ttl, 12h when unset.
                let max = state
                    .config
                    .load()
                    .identity
                    .oidc
                    .iter()
                    .find(|o| o.issuer == issuer)
                    .and_then(|o| o.max_cert_ttl)
                    .unwrap_or(tollgate_tls::pki::DEFAULT_CLIENT_TTL);
                (who.clone(), body, issuer, max)
            }
        };
        let Some(ca) = state.issuing.as_ref() else {
            return Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "this gateway does not issue certificates: set server.issuing_ca_cert/key",
                None,
            ));
        };
        let now = SystemTime::now();
        let requested = match &body.ttl {
            None => max,
            Some(t) => tollgate_tls::pki::parse_ttl(t)
                .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.to_string(), None))?,
        };
        // A token's remaining validity caps the certificate; a SAML sign-in happened just now.
        let left = match who.method {
            AuthMethod::Saml => max,
            _ => who
                .expires_at
                .map(|exp| exp.duration_since(now).unwrap_or_default())
                .unwrap_or(max),
        };
        let ca_left = ca.not_after().duration_since(now).unwrap_or_default();
        let ttl = requested.min(max).min(left).min(ca_left.saturating_sub(SKEW));
        if ttl < MIN_TTL {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "the token expires in less than a minute: a certificate never outlives its token",
                Some("get a fresh token and log in again"),
            ));
        }
        let spec = tollgate_tls::pki::ClientCertSpec {
            name: who.subject.clone(),
            spiffe: None,
            groups: who.groups.clone(),
            ttl: ttl + SKEW,
            not_before: Some(now - SKEW),
        };
        let cert = ca
            .issue_for_csr(&body.csr, &spec)
            .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.to_string(), None))?;
        let not_after = time::OffsetDateTime::from(cert.not_after)
            .format(&Rfc3339)
            .unwrap_or_default();
        issued_event = Some(EventInput {
            session_id: state.audit_session.clone(),
            kind: KIND_CERT_ISSUED.into(),
            at: now,
            payload: json!({
                "subject": who.subject,
                "groups": who.groups,
                "principal": who.principal,
                "method": who.method.as_str(),
                "serial": cert.serial_hex,
                "not_after": not_after,
                "ttl_seconds": ttl.as_secs(),
                "token_issuer": token_issuer,
                "client_addr": conn.peer.to_string(),
            }),
        });
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "certificate": cert.pem,
                "chain": ca.cert_pem(),
                "not_after": not_after,
                "subject": who.subject,
                "groups": who.groups,
                "serial": cert.serial_hex,
            }),
        ))
    }
    .await;

    let status = match &result {
        Ok(r) => r.status(),
        Err(r) => r.status,
    };
    let event = crate::routes::api_event(
        state,
        conn,
        acting.as_ref(),
        KIND_API_WRITE,
        PATH,
        ("", &[]),
        status,
        json!({"method": method.as_str(), "route": PATH}),
    );
    match result {
        Ok(resp) => {
            let issued = issued_event.expect("an issued certificate has its event");
            // The certificate leaves only once its issue is in the audit journal.
            let resp = crate::routes::after_recording(state, issued, resp).await;
            state.recorder.record(event);
            resp
        }
        Err(r) => {
            state.record_refused(conn, r.status, event);
            refused(&r)
        }
    }
}

/// The SAML sign-in behind a `tollgate login --saml` code, taken (once), and checked to be for
/// the CSR's key: the identity and the IdP's entity id.
async fn redeem_saml_code(
    state: &ApiState,
    body: &CertBody,
) -> Result<(Identity, String), Refusal> {
    let code = body.saml_code.clone().unwrap_or_default();
    let gone = || {
        refusal(
            StatusCode::UNAUTHORIZED,
            "the SAML sign-in code is unknown, expired or already used",
            Some("run tollgate login --saml again"),
        )
    };
    if code.is_empty() || code.len() > 128 {
        return Err(gone());
    }
    let store = state.store.clone();
    let now = tollgate_store::unix_ms(SystemTime::now());
    let key = crate::console::saml_digest(&code);
    let taken = tokio::task::spawn_blocking(move || {
        store.once_take(crate::console::SAML_CODE_KIND, &key, now)
    })
    .await
    .map_err(|e| crate::routes::store_failed(e))?
    .map_err(crate::routes::store_failed)?;
    let Some(signed_in) =
        taken.and_then(|v| serde_json::from_str::<crate::console::SamlSignedIn>(&v).ok())
    else {
        tracing::warn!("certificate refused: an unknown, expired or used SAML sign-in code");
        return Err(gone());
    };
    let csr_key = tollgate_tls::pki::csr_key_sha256(&body.csr)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.to_string(), None))?;
    if !signed_in
        .key
        .as_deref()
        .is_some_and(|k| tollgate_identity::ct_eq(k.as_bytes(), csr_key.as_bytes()))
    {
        tracing::warn!(subject = %signed_in.subject, "certificate refused: the CSR is not for the key the SAML sign-in was started with");
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "the CSR is not for the key this SAML sign-in was started with",
            Some("run tollgate login --saml again"),
        ));
    }
    Ok((signed_in.identity(), signed_in.idp))
}
