//! The review (approval) routes:
//!
//! - `GET /api/v1/reviews?status=&kind=&resource=&limit=` → [`ReviewList`] of the reviews the
//!   caller may see (admins and auditors: all; others: those they requested or may approve);
//! - `GET /api/v1/reviews/{id}` → one review;
//! - `POST /api/v1/reviews/{id}/approve` / `.../deny` with `{"reason": "..."}` (required to deny);
//! - `POST /api/v1/reviews/{id}/revoke` with `{"reason": "..."}`: ends the grant of an approved
//!   access or unmask review now (and the sessions that depend on it);
//! - `GET /api/v1/grants?subject=&resource=&kind=access|unmask&active=true|false` → [`GrantList`]:
//!   access and unmask grants (default: those in force now), all for admins and auditors, their
//!   own for others;
//! - `POST /api/v1/grants/{id}/revoke` with `{"reason": "..."}`: the review revoke route under
//!   the grant's name (the id is the review's); 404 for no such grant, 409 once it has ended;
//! - `POST /api/v1/access` with `{"resource", "for": "1h", "reason"}` → 201 and the new access
//!   review; with `"unmask": true`, an unmask review instead (the resource without masking, for
//!   the requester, for a while; approvers: the resource's `unmask_approvers`).
//!
//! Every request ends in one audit event: `api.read` for a GET, `api.write` for a POST (the
//! review workflow records its own `review.*` events).

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tollgate_identity::Identity;
use tollgate_review::{GrantFilter, Review, ReviewError, ReviewFilter, ReviewKind};
use tollgate_store::EventInput;

use crate::params;
use crate::routes::{
    authenticate, json_response, refusal, refused, store_failed, ApiBody, Refusal,
};
use crate::view::{GrantList, ReviewList};
use crate::{ApiState, Conn, KIND_API_READ, KIND_API_WRITE};

/// Largest request body accepted (a reason, a resource name).
const MAX_BODY: usize = 64 * 1024;
const LIST_LIMIT_MAX: usize = 1000;
const HINT: &str = "routes: GET /api/v1/reviews, GET /api/v1/reviews/{id}, POST /api/v1/reviews/{id}/approve, POST /api/v1/reviews/{id}/deny, POST /api/v1/reviews/{id}/revoke, POST /api/v1/access, GET /api/v1/grants, POST /api/v1/grants/{id}/revoke";

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReviewRoute {
    List,
    Get(String),
    Decide {
        id: String,
        approve: bool,
    },
    Revoke(String),
    Access,
    Grants,
    /// [`ReviewRoute::Revoke`] addressed as a grant.
    GrantRevoke(String),
}

impl ReviewRoute {
    fn parse(path: &str) -> Option<ReviewRoute> {
        let rest = path.strip_prefix("/api/v1/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| params::decode(s).ok().filter(|s| !s.is_empty());
        Some(match parts.as_slice() {
            ["reviews"] => ReviewRoute::List,
            ["reviews", i] => ReviewRoute::Get(id(i)?),
            ["reviews", i, "approve"] => ReviewRoute::Decide {
                id: id(i)?,
                approve: true,
            },
            ["reviews", i, "deny"] => ReviewRoute::Decide {
                id: id(i)?,
                approve: false,
            },
            ["reviews", i, "revoke"] => ReviewRoute::Revoke(id(i)?),
            ["access"] => ReviewRoute::Access,
            ["grants"] => ReviewRoute::Grants,
            ["grants", i, "revoke"] => ReviewRoute::GrantRevoke(id(i)?),
            _ => return None,
        })
    }

    fn method(&self) -> Method {
        match self {
            ReviewRoute::List | ReviewRoute::Get(_) | ReviewRoute::Grants => Method::GET,
            ReviewRoute::Decide { .. }
            | ReviewRoute::Revoke(_)
            | ReviewRoute::GrantRevoke(_)
            | ReviewRoute::Access => Method::POST,
        }
    }

    fn pattern(&self) -> &'static str {
        match self {
            ReviewRoute::List => "/api/v1/reviews",
            ReviewRoute::Get(_) => "/api/v1/reviews/{id}",
            ReviewRoute::Decide { approve: true, .. } => "/api/v1/reviews/{id}/approve",
            ReviewRoute::Decide { approve: false, .. } => "/api/v1/reviews/{id}/deny",
            ReviewRoute::Revoke(_) => "/api/v1/reviews/{id}/revoke",
            ReviewRoute::Access => "/api/v1/access",
            ReviewRoute::Grants => "/api/v1/grants",
            ReviewRoute::GrantRevoke(_) => "/api/v1/grants/{id}/revoke",
        }
    }

    fn review_id(&self) -> Option<&str> {
        match self {
            ReviewRoute::Get(id)
            | ReviewRoute::Decide { id, .. }
            | ReviewRoute::Revoke(id)
            | ReviewRoute::GrantRevoke(id) => Some(id),
            _ => None,
        }
    }
}

/// Paths this module serves (anything under them that does not parse is a 404 here).
pub(crate) fn is_review_path(path: &str) -> bool {
    path == "/api/v1/reviews"
        || path.starts_with("/api/v1/reviews/")
        || path == "/api/v1/access"
        || path == "/api/v1/grants"
        || path.starts_with("/api/v1/grants/")
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessBody {
    resource: String,
    #[serde(rename = "for")]
    for_: String,
    reason: String,
    /// Ask to see the resource without masking rather than to reach it.
    #[serde(default)]
    unmask: bool,
}

pub(crate) async fn handle(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let route = ReviewRoute::parse(&path);
    let who = authenticate(state, conn, &req).await;
    let result = async {
        let route = route.clone().ok_or_else(|| {
            refusal(
                StatusCode::NOT_FOUND,
                format!("no route {path}"),
                Some(HINT),
            )
        })?;
        if method != route.method() {
            return Err(refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not supported on {}", route.pattern()),
                Some(&format!("use {}", route.method())),
            ));
        }
        let who = who.as_ref().map_err(|r| Refusal {
            status: r.status,
            body: r.body.clone(),
            challenge: r.challenge,
        })?;
        let body = if method == Method::POST {
            read_body(req).await?
        } else {
            Bytes::new()
        };
        respond(state, who, &route, &query, &body).await
    }
    .await;

    let status = match &result {
        Ok(r) => r.status(),
        Err(r) => r.status,
    };
    let event = access_event(
        state,
        conn,
        who.as_ref().ok(),
        route.as_ref(),
        &method,
        &path,
        &query,
        status,
    );
    match result {
        Ok(resp) if method == Method::GET => {
            crate::routes::after_recording(state, event, resp).await
        }
        Ok(resp) => {
            state.recorder.record(event);
            resp
        }
        Err(r) => {
            state.record_refused(conn, r.status, event);
            refused(&r)
        }
    }
}

pub(crate) async fn read_body(req: Request<hyper::body::Incoming>) -> Result<Bytes, Refusal> {
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {MAX_BODY} bytes"),
                None,
            ))
        }
        Err(e) => Err(refusal(
            StatusCode::BAD_REQUEST,
            format!("the request body could not be read: {e}"),
            None,
        )),
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8], shape: &str) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        refusal(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON of the form {shape}: {e}"),
            None,
        )
    })
}

fn sees_all(state: &ApiState, who: &Identity) -> bool {
    who.in_any(&state.roles.admin_groups) || who.in_any(&state.roles.auditor_groups)
}

pub(crate) fn may_see(state: &ApiState, who: &Identity, r: &Review) -> bool {
    sees_all(state, who) || state.reviews.is_requester(r, who) || who.in_any(&r.approvers)
}

fn not_found(id: &str) -> Refusal {
    refusal(
        StatusCode::NOT_FOUND,
        format!("no review {id:?}"),
        Some("list reviews with GET /api/v1/reviews (tollgate reviews list)"),
    )
}

/// What the caller sees of a workflow error: status, message and what to do.
pub(crate) fn review_refusal(e: ReviewError, id: Option<&str>) -> Refusal {
    match e {
        ReviewError::NotFound(id) => not_found(&id),
        ReviewError::NotPending(status) => refusal(
            StatusCode::CONFLICT,
            format!("review {} is already {status}", id.unwrap_or("")),
            Some("only a pending review can be approved or denied"),
        ),
        ReviewError::SelfApproval => refusal(
            StatusCode::FORBIDDEN,
            "you requested this review, and a requester may not approve or deny their own review",
            Some("ask someone in an approver group to decide it"),
        ),
        e @ ReviewError::NotAnApprover { .. } => refusal(
            StatusCode::FORBIDDEN,
            e.to_string(),
            Some("approvers are set per rule (approvers) or per resource (access_approvers, unmask_approvers); admins (roles.admin_groups) may decide any review"),
        ),
        e @ ReviewError::AlreadyVotedBy(_) => refusal(
            StatusCode::CONFLICT,
            e.to_string(),
            Some("this review needs another reviewer"),
        ),
        e @ ReviewError::UnknownResource(_) => refusal(StatusCode::NOT_FOUND, e.to_string(), None),
        e @ ReviewError::NotAGrant(_) => refusal(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            Some("list grants with GET /api/v1/grants (tollgate access list)"),
        ),
        e @ ReviewError::GrantEnded { .. } => refusal(
            StatusCode::CONFLICT,
            e.to_string(),
            Some("nothing to revoke: sessions that depended on it have ended"),
        ),
        e @ (ReviewError::TooLong { .. } | ReviewError::Invalid(_)) => {
            refusal(StatusCode::BAD_REQUEST, e.to_string(), None)
        }
        ReviewError::Audit(e) => {
            tracing::error!(error = %e, "a review could not be recorded");
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit store is unavailable; reviews are refused until they can be recorded",
                Some("retry once the gateway's /readyz is ready"),
            )
        }
        ReviewError::Store(e) => store_failed(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReviewError> + Send + 'static,
    id: Option<&str>,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(review_refusal(e, id)),
        Err(e) => Err(store_failed(e)),
    }
}

async fn respond(
    state: &ApiState,
    who: &Identity,
    route: &ReviewRoute,
    query: &str,
    body: &[u8],
) -> Result<Response<ApiBody>, Refusal> {
    let reviews = state.reviews.clone();
    match route {
        ReviewRoute::List => {
            let mut filter = ReviewFilter {
                limit: Some(100),
                ..Default::default()
            };
            for (k, v) in params::parse_query(query)? {
                match k.as_str() {
                    "status" => filter.status = Some(v),
                    "kind" => filter.kind = Some(v),
                    "resource" => filter.resource = Some(v),
                    "requester" => filter.requester = Some(v),
                    "limit" => {
                        let n: usize = v
                            .parse()
                            .ok()
                            .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
                            .ok_or_else(|| {
                                refusal(
                                    StatusCode::BAD_REQUEST,
                                    format!(
                                        "limit {v:?}: write a number from 1 to {LIST_LIMIT_MAX}"
                                    ),
                                    None,
                                )
                            })?;
                        filter.limit = Some(n);
                    }
                    other => {
                        return Err(refusal(
                            StatusCode::BAD_REQUEST,
                            format!("unknown query parameter {other:?}"),
                            Some("parameters: status, kind, resource, requester, limit"),
                        ))
                    }
                }
            }
            if let Some(s) = &filter.status {
                if !["pending", "approved", "denied", "expired", "withdrawn"].contains(&s.as_str())
                {
                    return Err(refusal(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "status {s:?}: use pending, approved, denied, expired or withdrawn"
                        ),
                        None,
                    ));
                }
            }
            if let Some(k) = &filter.kind {
                if !["command", "access", "unmask", "pin"].contains(&k.as_str()) {
                    return Err(refusal(
                        StatusCode::BAD_REQUEST,
                        format!("kind {k:?}: use command, access, unmask or pin"),
                        None,
                    ));
                }
            }
            let list = blocking(move || reviews.list(&filter), None).await?;
            let visible = list
                .into_iter()
                .filter(|r| may_see(state, who, r))
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &ReviewList { reviews: visible },
            ))
        }
        ReviewRoute::Get(id) => {
            params::no_query(query)?;
            let key = id.clone();
            let review = blocking(move || reviews.get(&key), Some(id))
                .await?
                .filter(|r| may_see(state, who, r))
                .ok_or_else(|| not_found(id))?;
            Ok(json_response(StatusCode::OK, &review))
        }
        ReviewRoute::Decide { id, approve } => {
            params::no_query(query)?;
            let b: DecideBody = if body.iter().all(u8::is_ascii_whitespace) {
                DecideBody::default()
            } else {
                parse_body(body, r#"{"reason": "..."}"#)?
            };
            let (key, me, approve) = (id.clone(), who.clone(), *approve);
            let review = blocking(
                move || reviews.decide(&key, &me, approve, b.reason),
                Some(id),
            )
            .await?;
            Ok(json_response(StatusCode::OK, &review))
        }
        ReviewRoute::Revoke(id) | ReviewRoute::GrantRevoke(id) => {
            params::no_query(query)?;
            let b: DecideBody = parse_body(body, r#"{"reason": "..."}"#)?;
            let (key, me) = (id.clone(), who.clone());
            let as_grant = matches!(route, ReviewRoute::GrantRevoke(_));
            let revoked = blocking(
                move || {
                    reviews
                        .revoke_grant(&key, &me, b.reason)
                        .map_err(|e| match e {
                            // Addressed as a grant, a review that granted nothing is no grant.
                            ReviewError::NotAGrant(_) if as_grant => ReviewError::NotFound(key),
                            e => e,
                        })
                },
                Some(id),
            )
            .await
            .map_err(|r| match r.status {
                StatusCode::NOT_FOUND if as_grant => grant_not_found(id),
                _ => r,
            })?;
            Ok(json_response(StatusCode::OK, &revoked))
        }
        ReviewRoute::Grants => {
            let filter = grants_query(query)?;
            let list = blocking(move || reviews.grants(&filter), None).await?;
            let grants = list
                .into_iter()
                .filter(|g| sees_all(state, who) || state.reviews.is_holder(g, who))
                .collect();
            Ok(json_response(StatusCode::OK, &GrantList { grants }))
        }
        ReviewRoute::Access => {
            params::no_query(query)?;
            let b: AccessBody = parse_body(
                body,
                r#"{"resource": "...", "for": "1h", "reason": "...", "unmask": false}"#,
            )?;
            let duration = tollgate_config::parse_duration(&b.for_)
                .map_err(|e| refusal(StatusCode::BAD_REQUEST, format!("\"for\": {e}"), None))?;
            let me = who.clone();
            let review = blocking(
                move || {
                    if b.unmask {
                        reviews.request_unmask(&me, &b.resource, duration, &b.reason)
                    } else {
                        reviews.request_access(&me, &b.resource, duration, &b.reason)
                    }
                },
                None,
            )
            .await?;
            Ok(json_response(StatusCode::CREATED, &review))
        }
    }
}

fn grant_not_found(id: &str) -> Refusal {
    refusal(
        StatusCode::NOT_FOUND,
        format!("no grant {id:?}"),
        Some("list grants with GET /api/v1/grants (tollgate access list --all)"),
    )
}

/// The parameters of `GET /api/v1/grants`; `active` defaults to true.
fn grants_query(query: &str) -> Result<GrantFilter, params::BadParam> {
    let mut f = GrantFilter {
        active: Some(true),
        ..Default::default()
    };
    for (k, v) in params::parse_query(query)? {
        let bad = |what: &str| params::BadParam(format!("{k}={v:?}: {what}"));
        match k.as_str() {
            "subject" | "resource" if v.is_empty() => {
                return Err(bad("give a value or leave it out"))
            }
            "subject" => f.subject = Some(v),
            "resource" => f.resource = Some(v),
            "kind" => {
                f.kind = Some(match v.as_str() {
                    "access" => ReviewKind::Access,
                    "unmask" => ReviewKind::Unmask,
                    _ => return Err(bad("write access or unmask")),
                })
            }
            "active" => {
                f.active = match v.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    "all" => None,
                    _ => return Err(bad("write true, false or all")),
                }
            }
            _ => {
                return Err(params::BadParam(format!(
                "unknown parameter {k:?}: accepted parameters are subject, resource, kind, active"
            )))
            }
        }
    }
    Ok(f)
}

#[allow(clippy::too_many_arguments)]
fn access_event(
    state: &ApiState,
    conn: &Conn,
    who: Option<&Identity>,
    route: Option<&ReviewRoute>,
    method: &Method,
    path: &str,
    query: &str,
    status: StatusCode,
) -> EventInput {
    let kind = if method == Method::GET {
        KIND_API_READ
    } else {
        KIND_API_WRITE
    };
    crate::routes::api_event(
        state,
        conn,
        who,
        kind,
        path,
        (
            query,
            &[
                "status",
                "kind",
                "resource",
                "requester",
                "limit",
                "subject",
                "active",
            ],
        ),
        status,
        json!({
            "method": method.as_str(),
            "route": route.map_or("unknown", ReviewRoute::pattern),
            "review": route.and_then(ReviewRoute::review_id),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_routes_parse() {
        assert_eq!(
            ReviewRoute::parse("/api/v1/reviews"),
            Some(ReviewRoute::List)
        );
        assert_eq!(
            ReviewRoute::parse("/api/v1/reviews/rv_a"),
            Some(ReviewRoute::Get("rv_a".into()))
        );
        assert_eq!(
            ReviewRoute::parse("/api/v1/reviews/rv_a/approve"),
            Some(ReviewRoute::Decide {
                id: "rv_a".into(),
                approve: true
            })
        );
        assert_eq!(
            ReviewRoute::parse("/api/v1/reviews/rv_a/deny"),
            Some(ReviewRoute::Decide {
                id: "rv_a".into(),
                approve: false
            })
        );
        assert_eq!(
            ReviewRoute::parse("/api/v1/access"),
            Some(ReviewRoute::Access)
        );
        for bad in [
            "/api/v1/reviews/",
            "/api/v1/reviews/a/b",
            "/api/v1/reviews/a/approve/x",
        ] {
            assert_eq!(ReviewRoute::parse(bad), None, "{bad}");
            assert!(is_review_path(bad), "{bad}");
        }
        assert!(!is_review_path("/api/v1/sessions"));
        assert_eq!(
            ReviewRoute::parse("/api/v1/grants"),
            Some(ReviewRoute::Grants)
        );
        assert_eq!(
            ReviewRoute::parse("/api/v1/grants/rv_a/revoke"),
            Some(ReviewRoute::GrantRevoke("rv_a".into()))
        );
        assert_eq!(ReviewRoute::parse("/api/v1/grants/rv_a"), None);
        assert!(is_review_path("/api/v1/grants/rv_a"));
    }

    #[test]
    fn grants_query_defaults_to_active_and_names_a_bad_parameter() {
        let f = grants_query("").unwrap();
        assert_eq!(f.active, Some(true));
        let f = grants_query("subject=carol&resource=app&kind=unmask&active=false").unwrap();
        assert_eq!(f.subject.as_deref(), Some("carol"));
        assert_eq!(f.resource.as_deref(), Some("app"));
        assert_eq!(f.kind, Some(ReviewKind::Unmask));
        assert_eq!(f.active, Some(false));
        assert_eq!(grants_query("active=all").unwrap().active, None);
        let err = |q: &str| grants_query(q).unwrap_err().0;
        assert!(
            err("active=yes").starts_with("active="),
            "{}",
            err("active=yes")
        );
        assert!(
            err("kind=command").starts_with("kind="),
            "{}",
            err("kind=command")
        );
        assert!(err("subject=").starts_with("subject="));
        assert!(err("user=x").contains("\"user\""), "{}", err("user=x"));
    }

    #[test]
    fn workflow_errors_map_to_statuses() {
        let status = |e| review_refusal(e, Some("rv_a")).status;
        assert_eq!(
            status(ReviewError::NotFound("rv_a".into())),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(ReviewError::NotPending("approved".into())),
            StatusCode::CONFLICT
        );
        assert_eq!(status(ReviewError::SelfApproval), StatusCode::FORBIDDEN);
        assert_eq!(
            status(ReviewError::NotAnApprover {
                groups: vec!["sre".into()]
            }),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(ReviewError::AlreadyVotedBy("bob".into())),
            StatusCode::CONFLICT
        );
        assert_eq!(
            status(ReviewError::Invalid("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(ReviewError::GrantEnded {
                id: "rv_a".into(),
                revoked: true
            }),
            StatusCode::CONFLICT
        );
        let r = review_refusal(ReviewError::NotPending("denied".into()), Some("rv_a"));
        assert_eq!(r.body.error, "review rv_a is already denied");
    }
}
