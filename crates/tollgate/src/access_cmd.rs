//! `tollgate access list` and `tollgate access revoke`: the just-in-time access and unmask
//! grants in force (or ended), and ending one early, through the gateway's HTTPS API
//! (`GET /api/v1/grants`, `POST /api/v1/grants/{id}/revoke`).

use serde_json::json;
use tollgate_api::params::encode;
use tollgate_api::view::GrantList;
use tollgate_review::{GrantView, Review};

use crate::sessions_cmd::{client, explain, ApiArgs};

/// `access list`: grants you may see (admins and auditors: everyone's; others: their own).
pub fn list(
    api: &ApiArgs,
    subject: Option<&str>,
    resource: Option<&str>,
    kind: Option<&str>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut params = vec![format!("active={}", if all { "all" } else { "true" })];
    for (k, v) in [("subject", subject), ("resource", resource), ("kind", kind)] {
        if let Some(v) = v {
            params.push(format!("{k}={}", encode(v)));
        }
    }
    let list: GrantList = client(api)?
        .get_json(&format!("/api/v1/grants?{}", params.join("&")))
        .map_err(|e| explain(e, api))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", table(&list.grants));
    }
    Ok(())
}

/// `access revoke`: end a grant now; the sessions that depend on it end too.
pub fn revoke(api: &ApiArgs, id: &str, reason: &str, json: bool) -> anyhow::Result<()> {
    let r: Review = client(api)?
        .post_json(
            &format!("/api/v1/grants/{}/revoke", encode(id)),
            &json!({ "reason": reason }),
        )
        .map_err(|e| explain(e, api))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {} grant of {} to {} revoked; sessions that depended on it end now",
            r.id, r.kind, r.resource, r.requester
        );
    }
    Ok(())
}

/// `2026-12-04T10:00:00.123Z` → `2026-12-04 10:00:00Z`.
fn short(t: &str) -> String {
    match (t.get(..10), t.get(11..19)) {
        (Some(d), Some(h)) => format!("{d} {h}Z"),
        _ => t.to_string(),
    }
}

fn state(g: &GrantView) -> String {
    match &g.revoked {
        Some(r) => format!(
            "revoked by {}{}",
            r.by.as_deref().unwrap_or("?"),
            r.reason
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        ),
        None if g.active => "active".into(),
        None => "ended".into(),
    }
}

fn table(grants: &[GrantView]) -> String {
    if grants.is_empty() {
        return "no grants match\n".into();
    }
    let header = [
        "ID",
        "KIND",
        "SUBJECT",
        "RESOURCE",
        "GRANTED BY",
        "GRANTED",
        "UNTIL",
        "STATE",
    ];
    let rows: Vec<[String; 8]> = grants
        .iter()
        .map(|g| {
            [
                g.id.clone(),
                g.kind.clone(),
                g.subject.clone(),
                g.resource.clone(),
                g.granted_by.clone().unwrap_or_else(|| "-".into()),
                short(&g.granted_at),
                short(&g.until),
                state(g),
            ]
        })
        .collect();
    crate::sessions_cmd::aligned(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(active: bool, revoked: Option<tollgate_review::Revocation>) -> GrantView {
        GrantView {
            id: "rv_a".into(),
            kind: "access".into(),
            subject: "carol".into(),
            principal: Some("cert:cn:carol".into()),
            resource: "app".into(),
            reason: Some("INC-7".into()),
            granted_by: Some("alice".into()),
            granted_at: "2026-12-04T10:00:00.123Z".into(),
            granted_at_unix_ms: 0,
            until: "2026-12-04T11:00:00.000Z".into(),
            until_unix_ms: 0,
            active,
            revoked,
        }
    }

    #[test]
    fn the_table_shows_who_holds_what_until_when_and_its_state() {
        let t = table(&[grant(true, None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID"), "{t}");
        assert!(lines[1].contains("rv_a"), "{t}");
        assert!(lines[1].contains("carol"), "{t}");
        assert!(lines[1].contains("2026-12-04 11:00:00Z"), "{t}");
        assert!(lines[1].ends_with("active"), "{t}");
        let revoked = tollgate_review::Revocation {
            by: Some("alice".into()),
            at: String::new(),
            at_unix_ms: 0,
            reason: Some("done".into()),
        };
        assert!(table(&[grant(false, Some(revoked))]).contains("revoked by alice: done"));
        assert_eq!(table(&[]), "no grants match\n");
    }
}
