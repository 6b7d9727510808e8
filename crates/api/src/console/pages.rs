//! The console's HTML, rendered with maud (every interpolated value is escaped). Pure: values
//! in, markup out.

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;
use tollgate_identity::Identity;
use tollgate_review::Review;

use crate::params::encode;
use crate::view::{Event, Session};

/// Who the page is for: shown in the header, with the sign-out form's CSRF token.
pub(crate) struct Viewer<'a> {
    pub who: &'a Identity,
    pub csrf: &'a str,
}

pub(crate) fn layout(
    title: &str,
    viewer: Option<&Viewer>,
    refresh_secs: Option<u32>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(s) = refresh_secs {
                    meta http-equiv="refresh" content=(s);
                }
                title { (title) " · tollgate" }
                link rel="stylesheet" href="/console/console.css";
                script src="/console/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/reviews" { "tollgate" }
                    @if let Some(v) = viewer {
                        nav {
                            a href="/reviews" { "Reviews" }
                            a href="/sessions" { "Sessions" }
                            a href="/access" { "Access" }
                            a href="/resources" { "Resources" }
                            a href="/audit" { "Audit" }
                        }
                        div.who {
                            span title=(v.who.principal.as_str()) { (v.who.subject) }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(v.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub(crate) fn message(
    title: &str,
    viewer: Option<&Viewer>,
    text: &str,
    hint: Option<&str>,
) -> Markup {
    layout(
        title,
        viewer,
        None,
        html! {
            h1 { (title) }
            p.error { (text) }
            @if let Some(h) = hint { p.hint { (h) } }
            p { a href="/reviews" { "Back to reviews" } }
        },
    )
}

pub(crate) fn login(
    csrf: &str,
    next: &str,
    issuers: &[String],
    saml: bool,
    error: Option<&str>,
) -> Markup {
    layout(
        "Sign in",
        None,
        None,
        html! {
            section.card.narrow {
                h1 { "Sign in to tollgate" }
                @if let Some(e) = error { p.error #login-error { (e) } }
                @for issuer in issuers {
                    p {
                        a.button.oidc-sign-in
                            href={ "/auth/oidc/start?issuer=" (encode(issuer)) "&next=" (encode(next)) }
                        { "Sign in with " (issuer_name(issuer)) }
                    }
                }
                @if saml {
                    p {
                        a.button.saml-sign-in #saml-sign-in
                            href={ "/saml/login?next=" (encode(next)) }
                        { "Sign in with SAML" }
                    }
                }
                p.hint {
                    "A client certificate issued by the gateway's CA signs you in directly. "
                    "Otherwise paste a service token (or an OIDC token of a configured issuer); it is checked once and not stored in the browser."
                }
                form method="post" action="/login" autocomplete="off" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Token" }
                    input #token type="password" name="token" required autofocus;
                    button #sign-in type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// An issuer as people know it: its host (and path, if any).
fn issuer_name(issuer: &str) -> &str {
    issuer
        .strip_prefix("https://")
        .unwrap_or(issuer)
        .trim_end_matches('/')
}

/// A console sign-in that did not complete: what happened and how to start again.
pub(crate) fn sign_in_failed(text: &str, hint: &str) -> Markup {
    layout(
        "Sign-in failed",
        None,
        None,
        html! {
            section.card.narrow {
                h1 { "Sign-in failed" }
                p.error #sign-in-error { (text) }
                p.hint { (hint) }
                p { a.button href="/login" { "Sign in again" } }
            }
        },
    )
}

fn time(rfc3339: &str) -> Markup {
    html! { time datetime=(rfc3339) { (rfc3339) } }
}

fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A statement as the reviewer must read it: characters that change what is displayed without
/// being seen (bidi overrides and isolates, zero-width characters, control characters other
/// than newline and tab) are shown escaped, so text cannot hide or reorder part of itself.
fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let hidden = (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2028}' | '\u{2029}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
        if hidden {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn review_card(r: &Review) -> Markup {
    html! {
        li.card.review data-status=(r.status) {
            a.title href={ "/reviews/" (encode(&r.id)) } {
                span.badge.(r.status) { (r.status) }
                " " (r.kind) " on " strong { (r.resource) } " by " (r.requester)
            }
            @if let Some(s) = &r.statement { pre.snippet { (clip(&visible(s), 200)) } }
            @else if let Some(reason) = &r.reason { p.snippet { (clip(reason, 200)) } }
            p.meta {
                "created " (time(&r.created_at))
                @if r.status == "pending" { " · expires " (time(&r.expires_at)) }
                @if let Some(by) = &r.decided_by { " · by " (by) }
                " · " code { (r.id) }
            }
        }
    }
}

/// `/reviews`: what the viewer may decide first, then the rest pending, then recent decisions.
pub(crate) fn reviews(
    viewer: &Viewer,
    to_decide: &[Review],
    other_pending: &[Review],
    decided: &[Review],
) -> Markup {
    let section = |title: &str, id: &str, list: &[Review], empty: &str| {
        html! {
            section id=(id) {
                h2 { (title) " " span.count { (list.len()) } }
                @if list.is_empty() { p.empty { (empty) } }
                @else { ul.cards { @for r in list { (review_card(r)) } } }
            }
        }
    };
    layout(
        "Reviews",
        Some(viewer),
        Some(5),
        html! {
            h1 { "Reviews" }
            p.hint { "This page updates every few seconds." }
            (section("Waiting for your decision", "to-decide", to_decide, "Nothing is waiting for you."))
            (section("Other pending reviews", "pending", other_pending, "No other pending reviews you can see."))
            (section("Recently decided", "decided", decided, "No decisions yet."))
        },
    )
}

/// Why the viewer has no decision forms on a pending review.
pub(crate) enum NoForms {
    Requester,
    AlreadyVoted,
    NotAnApprover,
}

/// One of a requester's recent commands, shown beside their review.
pub(crate) struct RecentCommand {
    pub at: String,
    pub at_unix_ms: i64,
    pub action: Option<String>,
    pub text: String,
    pub session: String,
}

/// `/reviews/<id>`.
pub(crate) fn review(
    viewer: &Viewer,
    r: &Review,
    may_decide: Result<(), NoForms>,
    recent: &[RecentCommand],
) -> Markup {
    let id = encode(&r.id);
    layout(
        &format!("Review {}", r.id),
        Some(viewer),
        None,
        html! {
            p { a href="/reviews" { "← All reviews" } }
            h1 { "Review " code { (r.id) } " " span.badge.(r.status) #status { (r.status) } }
            section.card {
                dl.fields {
                    dt { "Kind" } dd { (r.kind) }
                    dt { "Resource" } dd #resource { (r.resource) }
                    dt { "Requested by" } dd #requester {
                        (r.requester)
                        @if !r.requester_groups.is_empty() { " (" (r.requester_groups.join(", ")) ")" }
                    }
                    @if let Some(rule) = &r.rule { dt { "Rule" } dd #rule { code { (rule) } } }
                    @if let Some(reason) = &r.reason { dt { "Reason given" } dd { (reason) } }
                    @if let Some(ms) = r.access_for_ms { dt { "For" } dd { (format_ms(ms)) } }
                    @if let Some(s) = &r.session_id {
                        dt { "Session" } dd { a href={ "/sessions/" (encode(s)) } { code { (s) } } }
                    }
                    dt { "Approvers" } dd { (r.approvers.join(", ")) " (" (r.approvals) " of " (r.min_approvals) " approvals)" }
                    dt { "Created" } dd { (time(&r.created_at)) }
                    dt { "Expires" } dd { (time(&r.expires_at)) }
                    @if let Some(g) = &r.grant_until { dt { "Granted until" } dd { (time(g)) } }
                }
                @if let Some(s) = &r.statement {
                    h2 { "Statement, as recorded (with its parameters)" }
                    pre #statement { (visible(s)) }
                    @if let Some(d) = &r.statement_sha256 { p.meta { "SHA-256 " code { (d) } } }
                }
            }
            @if r.decided_by.is_some() || r.status != "pending" {
                section.card.decision #decision {
                    h2 { "Decision" }
                    p {
                        span.badge.(r.status) { (r.status) }
                        @if let Some(by) = &r.decided_by { " by " strong #decided-by { (by) } }
                        @if let Some(at) = &r.decided_at { " at " (time(at)) }
                    }
                    @if let Some(why) = &r.decision_reason { blockquote #decision-reason { (why) } }
                }
            }
            @if !r.votes.is_empty() {
                section.card {
                    h2 { "Votes" }
                    table.votes {
                        thead { tr { th { "Reviewer" } th { "Vote" } th { "Reason" } th { "At" } } }
                        tbody {
                            @for v in &r.votes {
                                tr {
                                    td { (v.reviewer) }
                                    td { @if v.approve { "approve" } @else { "deny" } }
                                    td { (v.reason.as_deref().unwrap_or("")) }
                                    td { (time(&v.at)) }
                                }
                            }
                        }
                    }
                }
            }
            @if r.status == "pending" {
                @match may_decide {
                    Ok(()) => {
                        section.card.decide #decide {
                            h2 { "Your decision" }
                            form #approve-form method="post" action={ "/reviews/" (id) "/approve" } {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                label for="approve-reason" { "Reason (optional)" }
                                textarea #approve-reason name="reason" rows="2" maxlength="2000" {}
                                button #approve.approve type="submit" { "Approve" }
                            }
                            form #deny-form method="post" action={ "/reviews/" (id) "/deny" } {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                label for="deny-reason" { "Reason (required to deny)" }
                                textarea #deny-reason name="reason" rows="2" maxlength="2000" required {}
                                button #deny.deny type="submit" { "Deny" }
                            }
                        }
                    }
                    Err(why) => {
                        p.hint #no-decision { (match why {
                            NoForms::Requester => "You requested this review: someone else must decide it.".to_string(),
                            NoForms::AlreadyVoted => "You have voted; the review needs another approver.".to_string(),
                            NoForms::NotAnApprover => format!("Only members of {} (or an admin) may decide this review.", r.approvers.join(", ")),
                        }) }
                    }
                }
            }
            @if !recent.is_empty() {
                section.card #recent {
                    h2 { "Recent commands by " (r.requester) " on " (r.resource) }
                    ol.recent {
                        @for c in recent {
                            li {
                                p.meta {
                                    (time(&c.at))
                                    @if let Some(a) = &c.action { " " span.badge.(a) { (a) } }
                                    " · " a href={ "/sessions/" (encode(&c.session)) } { "session" }
                                }
                                pre { (clip(&c.text, 600)) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `/access`: ask for access or unmasking; grants in force (`true`: the viewer may revoke it).
pub(crate) fn access(viewer: &Viewer, grants: &[(tollgate_review::GrantView, bool)]) -> Markup {
    layout(
        "Access",
        Some(viewer),
        None,
        html! {
            h1 { "Access" }
            section.card {
                h2 { "Ask for access" }
                p.hint { "Just-in-time access to a resource, or its data without masking, for a while: the resource's approvers decide." }
                form #access-form method="post" action="/access" {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    label for="access-resource" { "Resource" }
                    input #access-resource name="resource" required;
                    label for="access-for" { "For" }
                    input #access-for name="for" value="1h" required;
                    label for="access-reason" { "Reason" }
                    textarea #access-reason name="reason" rows="2" maxlength="2000" required {}
                    label.inline { input #access-unmask type="checkbox" name="unmask" value="1"; " without masking (an unmask request)" }
                    button #access-request type="submit" { "Ask" }
                }
            }
            h2 { "Grants in force" }
            @if grants.is_empty() { p.empty #no-grants { "No grants in force that you can see." } }
            @else {
                ul.cards #grants {
                    @for (g, may_revoke) in grants {
                        li.card.grant {
                            p {
                                span.badge.approved { (g.kind) } " "
                                strong { (g.subject) } " on " strong { (g.resource) }
                                " until " (time(&g.until))
                            }
                            p.meta {
                                @if let Some(by) = &g.granted_by { "granted by " (by) " · " }
                                @if let Some(r) = &g.reason { "reason: " (r) " · " }
                                a href={ "/reviews/" (encode(&g.id)) } { code { (g.id) } }
                            }
                            @if *may_revoke {
                                form.revoke method="post" action={ "/grants/" (encode(&g.id)) "/revoke" } {
                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                    input name="reason" placeholder="why it ends now" required;
                                    button.deny type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `/audit`: what `tollgate audit verify` reports, now.
pub(crate) fn audit(viewer: &Viewer, r: &tollgate_store::VerifyReport) -> Markup {
    layout(
        "Audit trail",
        Some(viewer),
        None,
        html! {
            h1 { "Audit trail" }
            section.card {
                @match &r.first_break {
                    None => p #verify { span.badge.ok { "intact" } " every chain verifies from its first event to its last" },
                    Some(b) => {
                        p #verify { span.badge.error { "broken" } " chain " code { (b.chain_id) } " stops verifying at " (b.chain_seq) ": " (b.reason) }
                        @if !b.session_id.is_empty() {
                            p { "nearest event: " (b.event_id) " in session " a href={ "/sessions/" (encode(&b.session_id)) } { code { (b.session_id) } } }
                        }
                    }
                }
                dl.fields {
                    dt { "Chains" } dd { (r.chains) }
                    dt { "Events" } dd { (r.events) }
                    dt { "Checkpoints checked" } dd { (r.checkpoints) }
                }
            }
        },
    )
}

/// Certificates expiring sooner than this are shown in red on `/resources`.
const EXPIRY_WARN_SECS: i64 = 14 * 24 * 3600;

fn secret_source(s: &tollgate_config::SecretSource) -> String {
    match s {
        tollgate_config::SecretSource::Env(var) => format!("environment variable {var}"),
        tollgate_config::SecretSource::File(p) => format!("file {}", p.display()),
        tollgate_config::SecretSource::None => "none".into(),
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "—".into()
    } else {
        v.join(", ")
    }
}

fn pairs(v: &[(String, String)]) -> String {
    v.iter()
        .map(|(k, g)| format!("{k}={g}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a rule matches, one condition a line (every condition that is set must hold).
fn rule_matches(r: &tollgate_config::Rule) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |label: &str, v: &[String]| {
        if !v.is_empty() {
            out.push(format!("{label}: {}", v.join(", ")));
        }
    };
    add("statements", &r.statements);
    add("tables", &r.tables);
    add("functions", &r.functions);
    add("methods", &r.methods);
    add("paths", &r.paths);
    add("tools", &r.tools);
    add("resources", &r.resources);
    add("prompts", &r.prompts);
    add("groups", &r.groups);
    add("identities", &r.identities);
    if !r.query.is_empty() {
        out.push(format!("query: {}", pairs(&r.query)));
    }
    if !r.headers.is_empty() {
        out.push(format!("headers: {}", pairs(&r.headers)));
    }
    if !r.arguments.is_empty() {
        out.push(format!("arguments: {}", pairs(&r.arguments)));
    }
    if r.where_missing {
        out.push("UPDATE or DELETE without WHERE".into());
    }
    if let Some(h) = r.hours {
        out.push(format!(
            "hours: {:02}:{:02}-{:02}:{:02} UTC",
            h.start_minute / 60,
            h.start_minute % 60,
            h.end_minute / 60,
            h.end_minute % 60
        ));
    }
    if !r.days.is_empty() {
        let days: Vec<String> = r
            .days
            .iter()
            .map(|d| format!("{d:?}").to_lowercase())
            .collect();
        out.push(format!("days: {}", days.join(", ")));
    }
    if out.is_empty() {
        out.push("everything".into());
    }
    out
}

fn action_name(a: tollgate_config::RuleAction) -> &'static str {
    match a {
        tollgate_config::RuleAction::Allow => "allow",
        tollgate_config::RuleAction::Deny => "deny",
        tollgate_config::RuleAction::Review => "review",
    }
}

/// Where a resource's upstream is: `host:port` (and database), or the URL of an HTTP or MCP one.
fn upstream(r: &tollgate_config::Resource) -> String {
    match &r.http {
        Some(h) => format!(
            "{}://{}{}",
            if h.tls { "https" } else { "http" },
            r.upstream,
            h.base_path
        ),
        None => match &r.database {
            Some(db) => format!("{} (database {db})", r.upstream),
            None => r.upstream.clone(),
        },
    }
}

/// `/resources`: each configured resource, read-only; secrets only by where they are read from.
pub(crate) fn resources(
    viewer: &Viewer,
    config: &tollgate_config::Config,
    scan: Option<&crate::ScanSnapshot>,
) -> Markup {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let general: Vec<&Value> = scan
        .map(|s| {
            s.findings
                .iter()
                .filter(|f| f.get("resource").and_then(Value::as_str).is_none())
                .collect()
        })
        .unwrap_or_default();
    layout(
        "Resources",
        Some(viewer),
        None,
        html! {
            h1 { "Resources" }
            p.hint {
                "The configuration in force (" code { (config.path.display()) } "), read-only. "
                @match scan {
                    Some(s) => { "Latest upstream scan: " (time(&crate::params::format_time(s.at_unix_ms))) "." }
                    None => { "No periodic scan has run yet (server.scan_interval): run " code { "tollgate scan" } " for TLS status, certificate expiry and findings." }
                }
            }
            @if !general.is_empty() {
                section.card #scan-general {
                    h2 { "Gateway-wide scan findings" }
                    (findings_list(&general))
                }
            }
            @if config.resources.is_empty() { p.empty { "No resources are configured." } }
            @for r in &config.resources {
                @let findings: Vec<&Value> = scan.map(|s| s.findings.iter().filter(|f| f.get("resource").and_then(Value::as_str) == Some(r.name.as_str())).collect()).unwrap_or_default();
                @let expiry = scan.and_then(|s| s.cert_expiry.get(&r.name).copied());
                section.card.resource id={ "resource-" (r.name) } data-resource=(r.name) {
                    h2 { (r.name) " " span.badge { (r.kind.to_string()) }
                        @if r.read_only { " " span.badge { "read-only" } }
                        @if r.dry_run { " " span.badge.review { "dry run" } }
                    }
                    dl.fields {
                        dt { "Upstream" } dd.upstream { code { (upstream(r)) } }
                        dt { "TLS" } dd.tls {
                            @if r.tls.mode == tollgate_config::TlsMode::VerifyFull {
                                span.badge.ok { (r.tls.mode.as_str()) }
                            } @else {
                                span.badge.denied.tls-weak { (r.tls.mode.as_str()) }
                            }
                            " name " code { (r.tls.server_name) }
                            @if let Some(ca) = &r.tls.ca { " · CA " code { (ca.display()) } }
                            @else if r.tls.mode != tollgate_config::TlsMode::Disable { " · CA: system roots" }
                            @if let Some(c) = &r.tls.cert { " · client certificate " code { (c.display()) } }
                        }
                        dt { "Certificate expiry" } dd.expiry {
                            @match expiry {
                                Some(t) => {
                                    @let at = crate::params::format_time(t * 1000);
                                    @if t - now < EXPIRY_WARN_SECS { span.error { (time(&at)) " (" ((t - now) / 86400) " days)" } }
                                    @else { (time(&at)) " (" ((t - now) / 86400) " days)" }
                                }
                                None => { span.meta { "not known: run " code { "tollgate scan" } } }
                            }
                        }
                        @if let Some(c) = &r.credentials {
                            dt { "Upstream login" } dd { (c.user) ", password from " (secret_source(&c.password)) }
                        }
                        @if let Some((header, src)) = r.http.as_ref().and_then(|h| h.inject.as_ref()) {
                            dt { "Injected header" } dd { code { (header) } " from " (secret_source(src)) }
                        }
                        dt { "May connect" } dd.allow { (list(&r.allow_groups)) }
                        dt { "Access approvers" } dd { (list(&r.access_approvers)) }
                        dt { "Unmask approvers" } dd { (list(&r.unmask_approvers)) }
                        dt { "Longest access" } dd { (tollgate_review::format_duration(r.max_access)) }
                        dt { "Review timeout" } dd { (tollgate_review::format_duration(r.review_timeout)) }
                    }
                    h3 { "Rules" }
                    @if r.rules.is_empty() { p.empty { "No rules: what the groups above may run is allowed." } }
                    @else {
                        div.scroll {
                            table.rules {
                                thead { tr { th { "Rule" } th { "Matches" } th { "Action" } th { "Approvers" } th { "Dry run" } } }
                                tbody {
                                    @for rule in &r.rules {
                                        tr data-rule=(rule.name) {
                                            td { code { (rule.name) } }
                                            td { @for m in rule_matches(rule) { div { (m) } } }
                                            td { span.badge.(action_name(rule.action)) { (action_name(rule.action)) } }
                                            td {
                                                @if rule.action == tollgate_config::RuleAction::Review {
                                                    (list(&rule.approvers))
                                                    @if rule.min_approvals > 1 { " (" (rule.min_approvals) " approvals)" }
                                                }
                                            }
                                            td { @if rule.dry_run || r.dry_run { "yes" } @else { "no" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    h3 { "Masks" }
                    @if r.masks.is_empty() { p.empty { "No masks." } }
                    @else {
                        div.scroll {
                            table.masks {
                                thead { tr { th { "Masks" } th { "Strategy" } th { "Except groups" } th { "Only groups" } } }
                                tbody {
                                    @for m in &r.masks {
                                        tr {
                                            td {
                                                @if !m.columns.is_empty() { div { "columns: " (m.columns.join(", ")) } }
                                                @if !m.types.is_empty() { div { "types: " (m.types.join(", ")) } }
                                                @if !m.json_paths.is_empty() { div { "JSON paths: " (m.json_paths.join(", ")) } }
                                                @if !m.detectors.is_empty() { div { "detectors: " (m.detectors.join(", ")) } }
                                            }
                                            td {
                                                (m.strategy)
                                                @if let Some(k) = m.keep_last { " (keeps last " (k) ")" }
                                            }
                                            td { (list(&m.except_groups)) }
                                            td { @if m.only_groups.is_empty() { "everyone" } @else { (m.only_groups.join(", ")) } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if scan.is_some() {
                        h3 { "Latest scan findings" }
                        @if findings.is_empty() { p.empty.findings { "None." } }
                        @else { (findings_list(&findings)) }
                    }
                }
            }
        },
    )
}

fn findings_list(findings: &[&Value]) -> Markup {
    html! {
        ul.findings {
            @for f in findings {
                li {
                    @let sev = text(f, "severity").unwrap_or_default();
                    span.badge.(if sev == "high" || sev == "critical" { "denied" } else { "review" }) { (sev) }
                    " " (text(f, "message").unwrap_or_default())
                    @if let Some(fix) = text(f, "fix") { div.meta { "fix: " (fix) } }
                }
            }
        }
    }
}

fn format_ms(ms: i64) -> String {
    tollgate_review::format_duration(std::time::Duration::from_millis(ms.max(0) as u64))
}

/// The filters of `/sessions`, as given.
#[derive(Default)]
pub(crate) struct SessionFilterForm {
    pub subject: String,
    pub resource: String,
    pub outcome: String,
    pub since: String,
    pub until: String,
}

pub(crate) fn sessions(
    viewer: &Viewer,
    f: &SessionFilterForm,
    rows: &[Session],
    next: Option<String>,
) -> Markup {
    layout(
        "Sessions",
        Some(viewer),
        None,
        html! {
            h1 { "Sessions" }
            form.filters method="get" action="/sessions" {
                label { "Subject" input name="subject" value=(f.subject); }
                label { "Resource" input name="resource" value=(f.resource); }
                label { "Outcome" input name="outcome" placeholder="ok" value=(f.outcome); }
                label { "Since" input name="since" placeholder="2026-11-25T10:00:00Z" value=(f.since); }
                label { "Until" input name="until" value=(f.until); }
                button type="submit" { "Filter" }
            }
            @if rows.is_empty() { p.empty { "No sessions match." } }
            @else {
                div.scroll {
                    table.sessions {
                        thead { tr { th { "Started" } th { "Subject" } th { "Resource" } th { "Outcome" } th { "Commands" } th { "Events" } } }
                        tbody {
                            @for s in rows {
                                tr {
                                    td { a href={ "/sessions/" (encode(&s.id)) } { (time(&s.started_at)) } }
                                    td { (s.subject.as_deref().unwrap_or("")) }
                                    td { (s.resource.as_deref().unwrap_or("")) }
                                    td { span.badge.(s.outcome.as_deref().unwrap_or("open")) { (s.outcome.as_deref().unwrap_or("open")) } }
                                    td { (s.commands.map(|c| c.to_string()).unwrap_or_default()) }
                                    td { (s.event_count) }
                                }
                            }
                        }
                    }
                }
                @if let Some(n) = next { p { a href=(n) { "Older sessions →" } } }
            }
        },
    )
}

pub(crate) fn session(viewer: &Viewer, s: &Session, events: &[Event]) -> Markup {
    let id = encode(&s.id);
    layout(
        &format!("Session {}", s.id),
        Some(viewer),
        None,
        html! {
            p { a href="/sessions" { "← All sessions" } }
            h1 { "Session " code { (s.id) } }
            section.card {
                dl.fields {
                    dt { "Subject" } dd { (s.subject.as_deref().unwrap_or("")) }
                    dt { "Resource" } dd { (s.resource.as_deref().unwrap_or("")) }
                    dt { "From" } dd { (s.client_addr.as_deref().unwrap_or("")) " via " (s.listener.as_deref().unwrap_or("")) }
                    dt { "Started" } dd { (time(&s.started_at)) }
                    dt { "Ended" } dd { @if let Some(e) = &s.ended_at { (time(e)) } @else { "still open" } }
                    dt { "Outcome" } dd { (s.outcome.as_deref().unwrap_or("open")) }
                }
                p { a #download href={ "/sessions/" (id) "/events.jsonl" } download { "Download the events (JSON Lines)" } }
            }
            h2 { "Timeline" }
            // Replay (console.js): the entries again, at the pace they were recorded.
            div.replay #replay-controls hidden {
                button #replay type="button" { "Replay" }
                label { "speed "
                    select #replay-speed {
                        option value="1" { "1×" }
                        option value="4" { "4×" }
                        option value="16" { "16×" }
                    }
                }
                span #replay-clock.meta {}
            }
            ol.timeline #timeline {
                @for e in events { (timeline_entry(e, s.started_at_unix_ms)) }
            }
        },
    )
}

fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// One event: its kind, what a reader looks for first (the statement, the request line, the
/// status), a masked capture as a table, and the whole payload as recorded.
fn timeline_entry(e: &Event, start_ms: i64) -> Markup {
    let p = &e.payload;
    let offset = (e.at_unix_ms - start_ms) as f64 / 1000.0;
    let headline = match e.kind.as_str() {
        "command" => text(p, "text"),
        "result" => Some(format!(
            "{} · {} rows · {}",
            text(p, "tag").unwrap_or_default(),
            text(p, "rows").unwrap_or_default(),
            text(p, "outcome").unwrap_or_default()
        )),
        "http.request" => Some(format!(
            "{} {}{}",
            text(p, "method").unwrap_or_default(),
            text(p, "path").unwrap_or_default(),
            text(p, "query")
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        )),
        "http.response" => Some(format!(
            "{} · {}",
            text(p, "status").unwrap_or_default(),
            text(p, "outcome").unwrap_or_default()
        )),
        "session.open" => Some(format!(
            "{} on {}",
            text(p, "subject").unwrap_or_default(),
            text(p, "resource").unwrap_or_default()
        )),
        "session.close" => Some(format!(
            "{}{}",
            text(p, "outcome").unwrap_or_default(),
            text(p, "reason")
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        _ => text(p, "text")
            .or_else(|| text(p, "method"))
            .or_else(|| text(p, "outcome")),
    };
    let decision = p
        .get("decision")
        .and_then(|d| d.get("action"))
        .and_then(Value::as_str);
    let body_capture = p
        .get("body")
        .and_then(|b| b.get("capture"))
        .and_then(Value::as_str);
    html! {
        li.event data-kind=(e.kind) data-offset-ms=(e.at_unix_ms - start_ms) {
            div.meta {
                span.offset { "+" (format!("{offset:.3}")) "s" }
                " " span.kind { (e.kind) }
                @if let Some(a) = decision { " " span.badge.(a) { (a) } }
                " " (time(&e.at))
            }
            @if let Some(h) = headline { pre.text { (h) } }
            @if let Some(cap) = p.get("capture") { (capture_table(cap)) }
            @if let Some(b) = body_capture { pre.capture { (clip(b, 4000)) } }
            details {
                summary { "Recorded payload" }
                pre { (serde_json::to_string_pretty(p).unwrap_or_default()) }
            }
        }
    }
}

/// A result capture (`columns`, `rows` of masked values) as a table.
fn capture_table(cap: &Value) -> Markup {
    let columns: Vec<String> = cap
        .get("columns")
        .and_then(Value::as_array)
        .map(|c| c.iter().map(cell).collect())
        .unwrap_or_default();
    let rows = cap.get("rows").and_then(Value::as_array);
    html! {
        div.scroll {
            table.capture {
                thead { tr { @for c in &columns { th { (c) } } } }
                tbody {
                    @for r in rows.into_iter().flatten() {
                        tr { @for v in r.as_array().into_iter().flatten() { td { (cell(v)) } } }
                    }
                }
            }
            @if cap.get("truncated").and_then(Value::as_bool) == Some(true) { p.meta { "(capture truncated)" } }
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "NULL".into(),
        other => other.to_string(),
    }
}

pub(crate) const CSS: &str = include_str!("console.css");
pub(crate) const JS: &str = include_str!("console.js");

#[cfg(test)]
mod tests {
    #[test]
    fn statements_cannot_hide_or_reorder_part_of_themselves() {
        assert_eq!(
            super::visible("DELETE FROM t;\u{202E}--\u{200B}x\x1b[2K\nok\t."),
            "DELETE FROM t;\\u{202e}--\\u{200b}x\\u{1b}[2K\nok\t."
        );
    }

    use super::*;

    fn config(text: &str) -> tollgate_config::Config {
        tollgate_config::parse(text, std::path::Path::new("/etc/tollgate/t.toml")).unwrap()
    }

    #[test]
    fn resources_flag_weak_tls_and_show_secrets_only_by_source() {
        let c = config(
            r#"[server]
tls_cert = "gw.crt"
tls_key = "gw.key"

[[resources]]
name = "orders"
kind = "postgres"
upstream = "db.internal:5432"
allow_groups = ["sre", "agents"]
[resources.tls]
mode = "insecure-skip-verify"
[resources.credentials]
user = "app"
password_env = "ORDERS_DB_PASSWORD"
[[resources.rules]]
name = "no-drops"
statements = ["drop"]
action = "deny"
dry_run = true
[[resources.masks]]
json_paths = ["$.email"]
strategy = "partial"
keep_last = 2
only_groups = ["agents"]
"#,
        );
        let who = tollgate_identity::Identity {
            subject: "otto".into(),
            principal: tollgate_identity::Principal::token("otto"),
            groups: vec!["audit".into()],
            method: tollgate_identity::AuthMethod::Token,
            cert_fingerprint: None,
            cert_not_after: None,
            expires_at: None,
        };
        let viewer = Viewer {
            who: &who,
            csrf: "x",
        };
        let soon = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 3 * 86400;
        let scan = crate::ScanSnapshot {
            at_unix_ms: 1_700_000_000_000,
            findings: vec![
                serde_json::json!({"kind": "tls-unverified", "severity": "high",
                "resource": "orders", "key": "resources.tls.mode",
                "message": "the upstream's certificate is not verified", "fix": "use verify-full"}),
            ],
            cert_expiry: [("orders".to_string(), soon)].into(),
        };
        let page = resources(&viewer, &c, Some(&scan)).into_string();
        assert!(
            page.contains(r#"class="badge denied tls-weak">insecure-skip-verify"#),
            "{page}"
        );
        assert!(page.contains("environment variable ORDERS_DB_PASSWORD"));
        assert!(page.contains("db.internal:5432"));
        assert!(page.contains("no-drops") && page.contains("statements: drop"));
        assert!(page.contains("JSON paths: $.email") && page.contains("keeps last 2"));
        assert!(
            page.contains("the upstream&#39;s certificate is not verified")
                || page.contains("the upstream's certificate is not verified")
        );
        assert!(
            page.contains(r#"<span class="error"><time"#),
            "expiry in 3 days in red: {page}"
        );
        let none = resources(&viewer, &c, None).into_string();
        assert!(none.contains("tollgate scan"));
    }
}
