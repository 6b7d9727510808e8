//! `tollgate reviews ...` and `tollgate access request`: the approval workflow from a terminal,
//! through the gateway's HTTPS API.
//!
//! `access request` (access to a resource, or with `--unmask` its data without masking) prints
//! the new review's id and link and returns at once; with `--wait` it polls until the review is
//! decided and exits 0 only when the grant was approved.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use serde_json::json;
use tollgate_api::params::encode;
use tollgate_api::view::ReviewList;
use tollgate_review::{format_duration, Review};

use crate::sessions_cmd::{client, explain, ApiArgs};

/// How often `access request --wait` asks whether the review was decided.
const WAIT_POLL: Duration = Duration::from_secs(2);

#[derive(Subcommand)]
pub enum ReviewsCmd {
    /// Reviews you may see (requested by you, or that you may decide), newest first.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// pending (the default), approved, denied, expired, withdrawn, or all.
        #[arg(long, default_value = "pending")]
        status: String,
        /// Only reviews of this kind: command, access, unmask or pin (an MCP tool's changed
        /// definition).
        #[arg(long)]
        kind: Option<String>,
        /// JSON (the API's `{"reviews": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One review: what is asked, by whom, the votes so far.
    Show {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        /// JSON (the review as the API returns it) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Approve a review (you must be in one of its approver groups, or an admin, and not its requester).
    Approve {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
        /// JSON (the review as the API returns it) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Deny a review; the reason is shown to the requester.
    Deny {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: String,
        /// JSON (the review as the API returns it) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// End the grant of an approved access or unmask review now; sessions that depend on it
    /// end too (its approvers, admins or its requester may).
    Revoke {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: String,
        /// JSON (the review as the API returns it) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AccessCmd {
    /// Ask for just-in-time access to a resource, or with --unmask to see its data without
    /// masking, for a while; prints the review id.
    ///
    /// Access is approved by the resource's access_approvers; an unmasked view by its
    /// unmask_approvers (default: the access_approvers). Admins may approve either, you may not
    /// approve your own. An unmasked view does not grant access: you must also be allowed to
    /// reach the resource (allow_groups, or an approved access request). Every request, vote and
    /// decision is recorded in the audit trail.
    Request {
        /// The resource's name (its `[[resources]] name`).
        resource: String,
        #[command(flatten)]
        api: ApiArgs,
        /// How long, e.g. 30m or 1h (at most the resource's max_access).
        #[arg(long = "for")]
        duration: String,
        /// Ask to see the resource's data without masking (a review of kind unmask) instead of
        /// for access to it.
        #[arg(long)]
        unmask: bool,
        /// Why (shown to the approvers and recorded).
        #[arg(long)]
        reason: String,
        /// Wait until the review is decided (exit 0 when granted, 1 when denied or expired).
        #[arg(long)]
        wait: bool,
        /// JSON (the review as the API returns it) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Access and unmask grants in force (admins and auditors see everyone's, others their own).
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only grants held by this subject.
        #[arg(long)]
        subject: Option<String>,
        /// Only grants on this resource.
        #[arg(long)]
        resource: Option<String>,
        /// Only grants of this kind: access or unmask.
        #[arg(long)]
        kind: Option<String>,
        /// Also grants that have ended (run out or revoked).
        #[arg(long)]
        all: bool,
        /// JSON (the API's `{"grants": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End a grant now (ID: the review that granted it); sessions that depend on it end too.
    /// Its approvers, admins or its holder may.
    Revoke {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
        /// Why (recorded in the audit trail).
        #[arg(long)]
        reason: String,
        /// JSON (the review as the API returns it) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn path(id: &str) -> String {
    format!("/api/v1/reviews/{}", encode(id))
}

pub fn run(cmd: ReviewsCmd) -> anyhow::Result<()> {
    match cmd {
        ReviewsCmd::List {
            api,
            status,
            kind,
            json,
        } => {
            let mut params = Vec::new();
            if status != "all" {
                params.push(format!("status={}", encode(&status)));
            }
            if let Some(k) = &kind {
                params.push(format!("kind={}", encode(k)));
            }
            let q = if params.is_empty() {
                String::new()
            } else {
                format!("?{}", params.join("&"))
            };
            let list: ReviewList = client(&api)?
                .get_json(&format!("/api/v1/reviews{q}"))
                .map_err(|e| explain(e, &api))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", table(&list.reviews));
            }
        }
        ReviewsCmd::Show { id, api, json } => {
            let r: Review = client(&api)?
                .get_json(&path(&id))
                .map_err(|e| explain(e, &api))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", show(&r));
            }
        }
        ReviewsCmd::Approve {
            id,
            api,
            reason,
            json,
        } => {
            let r: Review = client(&api)?
                .post_json(
                    &format!("{}/approve", path(&id)),
                    &json!({ "reason": reason }),
                )
                .map_err(|e| explain(e, &api))?;
            print_decision(&r, json)?;
        }
        ReviewsCmd::Deny {
            id,
            api,
            reason,
            json,
        } => {
            let r: Review = client(&api)?
                .post_json(&format!("{}/deny", path(&id)), &json!({ "reason": reason }))
                .map_err(|e| explain(e, &api))?;
            print_decision(&r, json)?;
        }
        ReviewsCmd::Revoke {
            id,
            api,
            reason,
            json,
        } => {
            let r: Review = client(&api)?
                .post_json(
                    &format!("{}/revoke", path(&id)),
                    &json!({ "reason": reason }),
                )
                .map_err(|e| explain(e, &api))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{}: grant revoked", r.id);
            }
        }
    }
    Ok(())
}

pub fn run_access(cmd: AccessCmd) -> anyhow::Result<()> {
    let (resource, api, duration, unmask, reason, wait, json) = match cmd {
        AccessCmd::Request {
            resource,
            api,
            duration,
            unmask,
            reason,
            wait,
            json,
        } => (resource, api, duration, unmask, reason, wait, json),
        AccessCmd::List {
            api,
            subject,
            resource,
            kind,
            all,
            json,
        } => {
            return crate::access_cmd::list(
                &api,
                subject.as_deref(),
                resource.as_deref(),
                kind.as_deref(),
                all,
                json,
            )
        }
        AccessCmd::Revoke {
            id,
            api,
            reason,
            json,
        } => return crate::access_cmd::revoke(&api, &id, &reason, json),
    };
    let api_client = client(&api)?;
    let r: Review = api_client
        .post_json(
            "/api/v1/access",
            &json!({"resource": resource, "for": duration, "reason": reason, "unmask": unmask}),
        )
        .map_err(|e| explain(e, &api))?;
    if json && !wait {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if !json {
        println!("{}", r.id);
        eprintln!(
            "{} review {} requested: {} -> {}{} for {}; approvers: {}; expires {}",
            r.kind,
            r.id,
            r.requester,
            r.resource,
            if r.kind == "unmask" {
                " without masking"
            } else {
                ""
            },
            r.access_for_ms
                .map_or("?".into(), |ms| format_duration(Duration::from_millis(
                    ms as u64
                ))),
            approvers(&r),
            r.expires_at
        );
        if let Some(u) = &r.url {
            eprintln!("review: {u}");
        }
    }
    if !wait {
        return Ok(());
    }
    let deadline = Instant::now()
        + Duration::from_millis((r.expires_at_unix_ms - r.created_at_unix_ms).max(0) as u64)
        + WAIT_POLL * 2;
    let mut current = r;
    while current.status == "pending" && Instant::now() < deadline {
        std::thread::sleep(WAIT_POLL);
        current = api_client
            .get_json(&path(&current.id))
            .map_err(|e| explain(e, &api))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&current)?);
    }
    match current.status.as_str() {
        "approved" => {
            if !json {
                eprintln!(
                    "{} granted by {} until {}",
                    if current.kind == "unmask" {
                        "unmasked view"
                    } else {
                        "access"
                    },
                    current.decided_by.as_deref().unwrap_or("?"),
                    current.grant_until.as_deref().unwrap_or("?")
                );
            }
            Ok(())
        }
        "denied" => bail!(
            "denied by {}: {}",
            current.decided_by.as_deref().unwrap_or("?"),
            current
                .decision_reason
                .as_deref()
                .unwrap_or("no reason given")
        ),
        other => bail!("the {} review is {other}", current.kind),
    }
}

fn approvers(r: &Review) -> String {
    if r.approvers.is_empty() {
        "admins".into()
    } else {
        r.approvers.join(", ")
    }
}

fn print_decision(r: &Review, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    match r.status.as_str() {
        "pending" => println!(
            "{}: vote recorded; {} of {} approvals, still pending",
            r.id, r.approvals, r.min_approvals
        ),
        "approved" if r.kind == "access" => println!(
            "{}: approved; {} may reach {} until {}",
            r.id,
            r.requester,
            r.resource,
            r.grant_until.as_deref().unwrap_or("?")
        ),
        "approved" if r.kind == "unmask" => println!(
            "{}: approved; {} may see {} without masking until {}",
            r.id,
            r.requester,
            r.resource,
            r.grant_until.as_deref().unwrap_or("?")
        ),
        status => println!("{}: {status}", r.id),
    }
    Ok(())
}

/// What is asked, in one line.
fn what(r: &Review) -> String {
    let text = match r.kind.as_str() {
        kind @ ("access" | "unmask") => format!(
            "{kind} for {}{}",
            r.access_for_ms
                .map_or("?".into(), |ms| format_duration(Duration::from_millis(
                    ms.max(0) as u64
                ))),
            r.reason
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        ),
        _ => r.statement.clone().unwrap_or_default().replace('\n', " "),
    };
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(59).collect::<String>())
    } else {
        text
    }
}

fn table(reviews: &[Review]) -> String {
    if reviews.is_empty() {
        return "no reviews match\n".into();
    }
    let header = [
        "ID",
        "KIND",
        "STATUS",
        "RESOURCE",
        "REQUESTER",
        "APPROVALS",
        "CREATED",
        "WHAT",
    ];
    let rows: Vec<[String; 8]> = reviews
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.kind.clone(),
                r.status.clone(),
                r.resource.clone(),
                r.requester.clone(),
                format!("{}/{}", r.approvals, r.min_approvals),
                format!("{} {}Z", &r.created_at[..10], &r.created_at[11..19]),
                what(r),
            ]
        })
        .collect();
    crate::sessions_cmd::aligned(&header, &rows)
}

fn show(r: &Review) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: String| {
        let v = crate::sessions_cmd::terminal_safe(&v, false).replace('\n', "\n           ");
        out.push_str(&format!("{k:<10} {v}\n"))
    };
    field("review", r.id.clone());
    field("kind", r.kind.clone());
    field("status", r.status.clone());
    field("resource", r.resource.clone());
    field(
        "requester",
        format!("{} (groups {})", r.requester, r.requester_groups.join(", ")),
    );
    if let Some(rule) = &r.rule {
        field("rule", rule.clone());
    }
    if let Some(s) = &r.statement {
        field("statement", s.clone());
    }
    if r.kind == "access" || r.kind == "unmask" {
        field("asks", what(r));
    }
    field(
        "approvers",
        format!(
            "{} ({} of {} approvals)",
            approvers(r),
            r.approvals,
            r.min_approvals
        ),
    );
    field("created", r.created_at.clone());
    field("expires", r.expires_at.clone());
    if let Some(at) = &r.decided_at {
        field(
            "decided",
            format!(
                "{at} by {}{}",
                r.decided_by.as_deref().unwrap_or("-"),
                r.decision_reason
                    .as_deref()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default()
            ),
        );
    }
    if let Some(g) = &r.grant_until {
        field("granted", format!("until {g}"));
    }
    if let Some(u) = &r.url {
        field("url", u.clone());
    }
    for v in &r.votes {
        field(
            "vote",
            format!(
                "{} {} at {}{}",
                v.reviewer,
                if v.approve { "approved" } else { "denied" },
                v.at,
                v.reason
                    .as_deref()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default()
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn wire_text_cannot_drive_the_reviewers_terminal() {
        let sneaky = "DELETE FROM users;\x1b[2K\r-- SELECT 1\u{202E}x\nnext\tline";
        let shown = crate::sessions_cmd::terminal_safe(sneaky, false);
        assert_eq!(
            shown,
            "DELETE FROM users;\\u{1b}[2K\\r-- SELECT 1\\u{202e}x\nnext\tline"
        );
        let one = crate::sessions_cmd::terminal_safe(sneaky, true);
        assert!(!one.contains('\n') && !one.contains('\x1b'), "{one}");
    }
}
