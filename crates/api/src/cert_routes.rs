//! `POST /api/v1/certificates`: a short-lived client certificate for the caller of an OIDC
//! token (what `tollgate login` calls). Body `{"csr": "<PEM PKCS#10>", "ttl": "1h"}` (ttl
//! optional); the CSR contributes its public key only: subject (CN) and groups (one OU each)
//! come from the token. The lifetime is the shortest of the requested TTL, the issuer's
//! `max_cert_ttl` (default 12h) and the token's remaining validity: a certificate never
//! outlives the token it was issued for. Service tokens and client certificates are refused
//! (403): certificates are issued for OIDC identities only. Every issue is a `cert.issued`
//! event (subject, groups, principal, serial, not_after, token issuer; never the token),
//! recorded before the certificate leaves, plus the route's `api.write` event.

use std::time::{Duration, SystemTime};

use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use tollgate_identity::AuthMethod;
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
    json_response(StatusCode::OK, &json!({ "issuers": issuers }))
}

pub(crate) async fn handle(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let method = req.method().clone();
    let who = authenticate(state, conn, &req).await;
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
        let who = who.as_ref().map_err(|r| Refusal {
            status: r.status,
            body: r.body.clone(),
            challenge: r.challenge,
        })?;
        let Some(ca) = state.issuing.as_ref() else {
            return Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "this gateway does not issue certificates: set server.issuing_ca_cert/key",
                None,
            ));
        };
        if who.method != AuthMethod::Oidc {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "certificates are issued for OIDC identities; {} authenticated with a {}",
                    who.subject,
                    match who.method {
                        AuthMethod::Cert => "client certificate",
                        _ => "service token",
                    }
                ),
                Some("send \"Authorization: Bearer <ID or access token>\" of an [[identity.oidc]] issuer (tollgate login --id-token-file/--id-token-env)"),
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
        let now = SystemTime::now();
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
        let requested = match &body.ttl {
            None => max,
            Some(t) => tollgate_tls::pki::parse_ttl(t)
                .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.to_string(), None))?,
        };
        let left = who
            .expires_at
            .map(|exp| exp.duration_since(now).unwrap_or_default())
            .unwrap_or(max);
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
                "serial": cert.serial_hex,
                "not_after": not_after,
                "ttl_seconds": ttl.as_secs(),
                "token_issuer": issuer,
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
        who.as_ref().ok(),
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
