//! Review notifications: a webhook per resource (`[[resources]] review_webhook`) or a global one
//! (`[server] review_webhook`), as generic JSON or as a Slack-compatible message with approve and
//! deny link buttons. Sent from a background task, retried with exponential back-off; a failure
//! is logged and counted (`tollgate_review_notifications_total{result}`), and never affects the
//! review itself, which is already stored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_webhook::Target;

pub use tollgate_config::WebhookFormat;

use crate::Review;

/// Attempts per notification: back-off 4 s, 8 s, 16 s, 32 s (about a minute in all).
pub const DEFAULT_ATTEMPTS: u32 = 5;
pub const DEFAULT_FIRST_DELAY: Duration = Duration::from_secs(4);

#[derive(Clone, Debug)]
pub struct NotifierConfig {
    /// `[server] review_webhook`: used for resources without their own.
    pub global: Option<String>,
    /// `[[resources]] review_webhook`, by resource name.
    pub per_resource: HashMap<String, String>,
    /// `[server] review_webhook_ca`: CA bundle for https receivers (default: the system bundle).
    pub ca: Option<PathBuf>,
    pub format: WebhookFormat,
    pub attempts: u32,
    pub first_delay: Duration,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            global: None,
            per_resource: HashMap::new(),
            ca: None,
            format: WebhookFormat::Json,
            attempts: DEFAULT_ATTEMPTS,
            first_delay: DEFAULT_FIRST_DELAY,
        }
    }
}

impl NotifierConfig {
    pub fn from_config(c: &tollgate_config::Config) -> Self {
        NotifierConfig {
            global: c.server.review_webhook.clone(),
            per_resource: c
                .resources
                .iter()
                .filter_map(|r| Some((r.name.clone(), r.review_webhook.clone()?)))
                .collect(),
            ca: c.server.review_webhook_ca.clone(),
            format: c.server.review_webhook_format,
            ..NotifierConfig::default()
        }
    }
}

/// Where and how review notifications go.
pub struct Notifier {
    global: Option<Arc<Target>>,
    per_resource: HashMap<String, Arc<Target>>,
    format: WebhookFormat,
    attempts: u32,
    first_delay: Duration,
}

impl Notifier {
    /// Parses the URLs and loads the CA bundle (an error names the setting).
    pub fn new(c: &NotifierConfig) -> Result<Notifier, String> {
        let target = |url: &str, what: &str| {
            Target::new(url, c.ca.as_deref(), "server.review_webhook_ca")
                .map(Arc::new)
                .map_err(|e| format!("{what}: {e}"))
        };
        Ok(Notifier {
            global: c
                .global
                .as_deref()
                .map(|u| target(u, "server.review_webhook"))
                .transpose()?,
            per_resource: c
                .per_resource
                .iter()
                .map(|(r, u)| {
                    Ok((
                        r.clone(),
                        target(u, &format!("resource {r:?} review_webhook"))?,
                    ))
                })
                .collect::<Result<_, String>>()?,
            format: c.format,
            attempts: c.attempts.max(1),
            first_delay: c.first_delay,
        })
    }

    /// No webhooks.
    pub fn none() -> Notifier {
        Notifier {
            global: None,
            per_resource: HashMap::new(),
            format: WebhookFormat::Json,
            attempts: 1,
            first_delay: Duration::ZERO,
        }
    }

    fn target(&self, resource: &str) -> Option<Arc<Target>> {
        self.per_resource
            .get(resource)
            .or(self.global.as_ref())
            .cloned()
    }

    /// The document for `review` in the configured format.
    pub fn body(&self, review: &Review) -> Value {
        match self.format {
            WebhookFormat::Json => json_body(review),
            WebhookFormat::Slack => slack_body(review),
        }
    }

    /// Deliver in the background (on the current tokio runtime); never blocks the caller.
    pub(crate) fn spawn(&self, review: &Review) {
        let Some(target) = self.target(&review.resource) else {
            return;
        };
        let body = self.body(review).to_string();
        let (attempts, delay, id) = (self.attempts, self.first_delay, review.id.clone());
        let send = async move {
            let result = target
                .deliver(
                    "application/json",
                    body.as_bytes(),
                    attempts,
                    delay,
                    "review webhook",
                )
                .await;
            let label = match &result {
                Ok(_) => "delivered",
                Err(e) => {
                    tracing::error!(review = %id, host = %target.url.host, error = %e, "review notification not delivered after {attempts} attempts; the review is still pending and listed by `tollgate reviews list`");
                    "failed"
                }
            };
            counter(label).inc();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(send);
            }
            Err(_) => {
                tracing::error!(review = %review.id, "no async runtime to send the review notification from");
                counter("failed").inc();
            }
        }
    }
}

fn counter(result: &str) -> Arc<tollgate_metrics::Cell> {
    tollgate_metrics::registry().counter(
        "tollgate_review_notifications_total",
        "Review webhook notifications, by result after all retries (delivered, failed).",
        &[("result", result)],
    )
}

fn action_url(review: &Review, action: &str) -> Option<String> {
    review.url.as_ref().map(|u| format!("{u}?action={action}"))
}

/// One line a person reads: who wants what, where.
pub fn summary(r: &Review) -> String {
    // Access and unmask requests read alike: what is asked, for how long, and why.
    let grant = |asks: &str, how: &str| {
        format!(
            "{} {asks} {}{how} for {}{}",
            r.requester,
            r.resource,
            r.access_for_ms
                .map(|ms| crate::format_duration(Duration::from_millis(ms.max(0) as u64)))
                .unwrap_or_else(|| "?".into()),
            r.reason
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        )
    };
    match r.kind.as_str() {
        "access" => grant("asks for access to", ""),
        "unmask" => grant("asks to see", " without masking"),
        "pin" => format!(
            "an MCP tool of {} changed its definition; it stays blocked until approved: {}",
            r.resource,
            r.statement
                .as_deref()
                .and_then(|s| s.lines().next())
                .unwrap_or_default()
        ),
        _ => format!(
            "{} wants to run a statement on {}{}",
            r.requester,
            r.resource,
            r.rule
                .as_deref()
                .map(|x| format!(" (rule {x})"))
                .unwrap_or_default()
        ),
    }
}

fn json_body(r: &Review) -> Value {
    json!({
        "event": "review.requested",
        "text": summary(r),
        "review": r,
        "url": r.url,
        "approve_url": action_url(r, "approve"),
        "deny_url": action_url(r, "deny"),
    })
}

/// Slack's mrkdwn needs `&`, `<` and `>` escaped; a statement must not close its code block.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace("```", "'''")
}

fn slack_body(r: &Review) -> Value {
    let mut text = format!("Review {}: {}", r.id, slack_escape(&summary(r)));
    if let Some(u) = &r.url {
        text.push_str(&format!(" <{u}|open>"));
    }
    let mut detail = format!("*Review* `{}` — {}", r.id, slack_escape(&summary(r)));
    if let Some(s) = &r.statement {
        detail.push_str(&format!("\n```{}```", slack_escape(s)));
    }
    let approvers = if r.approvers.is_empty() {
        "admins".to_string()
    } else {
        r.approvers.join(", ")
    };
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": detail}}),
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
            "needs {} approval(s) from {} · expires {} · `tollgate reviews approve {}`",
            r.min_approvals, slack_escape(&approvers), r.expires_at, r.id)}]}),
    ];
    if let (Some(approve), Some(deny)) = (action_url(r, "approve"), action_url(r, "deny")) {
        blocks.push(json!({"type": "actions", "elements": [
            {"type": "button", "action_id": "approve", "style": "primary",
             "text": {"type": "plain_text", "text": "Approve"}, "url": approve},
            {"type": "button", "action_id": "deny", "style": "danger",
             "text": {"type": "plain_text", "text": "Deny"}, "url": deny},
        ]}));
    }
    json!({"text": text, "blocks": blocks})
}
