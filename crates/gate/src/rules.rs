//! Rules over a neutral [`Command`], giving a [`Decision`]: the first matching rule decides,
//! a `dry_run` rule only records what it would have done, and a command with several effects
//! takes the strictest of their decisions ([`Decision::stricter`]).
//!
//! SQL statements are classified by the PostgreSQL crates (pg_query) into the same
//! [`Decision`]; this module judges what needs no parser: HTTP requests (method, normalised
//! path, query, headers) and MCP requests (tool, resource URI or prompt, and the call's
//! arguments by JSON path).

use serde::Serialize;
use serde_json::Value;
use std::time::Duration;
use time::OffsetDateTime;
use tollgate_config::{HourWindow, Rule as RuleConfig, RuleAction, Weekday};
use tollgate_mask::{Glob, JsonPath, PathSeg};

/// The caller of a command.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub subject: &'a str,
    pub groups: &'a [String],
}

/// What happens to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Decision {
    /// Forward it; `rule` is the allow rule that matched (None: no rule matched).
    Allow { rule: Option<String> },
    /// Refuse it; `message` is for the client and names the rule.
    Deny { rule: String, message: String },
    /// Hold it until `min_approvals` people in `approvers` (or admins) approve, or `timeout`.
    Review {
        rule: String,
        approvers: Vec<String>,
        min_approvals: u32,
        #[serde(rename = "timeout_ms", serialize_with = "millis")]
        timeout: Duration,
    },
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
}

impl Decision {
    /// allow < review < deny.
    pub fn severity(&self) -> u8 {
        match self {
            Decision::Allow { .. } => 0,
            Decision::Review { .. } => 1,
            Decision::Deny { .. } => 2,
        }
    }

    /// The more restrictive of two decisions (deny > review > allow; the first on a tie).
    pub fn stricter(self, other: Decision) -> Decision {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    pub fn is_deny(&self) -> bool {
        matches!(self, Decision::Deny { .. })
    }

    /// For the audit event.
    pub fn summary(&self) -> serde_json::Value {
        if let Decision::Allow { rule: None } = self {
            // Nearly every command: built directly.
            return serde_json::json!({"action": "allow", "rule": null});
        }
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A command as the rules see it, whatever protocol carried it.
#[derive(Debug, Clone)]
pub struct Command<'a> {
    pub kind: CommandKind<'a>,
}

#[derive(Debug, Clone)]
pub enum CommandKind<'a> {
    /// An HTTP request, as the upstream will see it: the method after any override header,
    /// the normalised path (relative to the resource), the query pairs (decoded) and headers
    /// (names lower-case).
    Http {
        method: &'a str,
        path: &'a str,
        query: &'a [(String, String)],
        headers: &'a [(String, String)],
    },
    /// An MCP JSON-RPC request (or notification): its method; the tool (`tools/call`),
    /// resource URI (`resources/read`) or prompt (`prompts/get`) it names; and the call's
    /// arguments (`None` when it has none, or for a synthetic call judging a listing).
    Mcp {
        method: &'a str,
        name: Option<&'a str>,
        arguments: Option<&'a Value>,
    },
}

/// The judgement of a command: the decision, and the `dry_run` rules that would have decided
/// otherwise (recorded, not enforced).
#[derive(Debug, Clone)]
pub struct Judgement {
    pub decision: Decision,
    pub dry_run: Vec<Decision>,
}

/// A path glob: `*` one segment (any characters but `/`, within a segment `*` is a wildcard),
/// `**` any number of segments.
#[derive(Debug, Clone)]
struct PathGlob {
    segments: Vec<String>,
}

impl PathGlob {
    fn new(p: &str) -> PathGlob {
        PathGlob {
            segments: p
                .trim_start_matches('/')
                .split('/')
                .map(str::to_string)
                .collect(),
        }
    }

    fn matches(&self, path: &str) -> bool {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match_segments(&self.segments, &segs)
    }
}

fn match_segments(pat: &[String], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((p, rest)) if p == "**" => (0..=segs.len()).any(|i| match_segments(rest, &segs[i..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => Glob::new(p).matches(s) && match_segments(rest, srest),
            None => false,
        },
    }
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    methods: Vec<String>,
    paths: Vec<PathGlob>,
    query: Vec<(String, Glob)>,
    headers: Vec<(String, Glob)>,
    tools: Vec<Glob>,
    resources: Vec<Glob>,
    prompts: Vec<Glob>,
    /// `None`: a path that did not parse (see [`RuleSet::new`]).
    arguments: Vec<(Option<JsonPath>, Glob)>,
    groups: Vec<String>,
    identities: Vec<Glob>,
    hours: Option<HourWindow>,
    days: Vec<Weekday>,
    action: RuleAction,
    approvers: Vec<String>,
    min_approvals: u32,
    message: Option<String>,
    dry_run: bool,
}

/// The rules of one resource, compiled. Unmatched commands are allowed.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    review_timeout: Duration,
    /// `resources.dry_run`: every rule only records.
    dry_run: bool,
}

impl RuleSet {
    /// Compiles rules; an `arguments` path that does not parse is an error naming the rule's
    /// line (config checks only its shape).
    pub fn try_new(
        rules: &[RuleConfig],
        review_timeout: Duration,
        dry_run: bool,
    ) -> Result<RuleSet, String> {
        for r in rules {
            for (path, _) in &r.arguments {
                JsonPath::parse(path)
                    .map_err(|e| format!("line {}: rule {:?}: arguments: {e}", r.line, r.name))?;
            }
        }
        Ok(RuleSet::new(rules, review_timeout, dry_run))
    }

    /// Compiles rules already checked by [`RuleSet::try_new`] (or without `arguments`): an
    /// `arguments` path that does not parse makes its rule match every call that has
    /// arguments (stricter, never looser).
    pub fn new(rules: &[RuleConfig], review_timeout: Duration, dry_run: bool) -> RuleSet {
        let rules = rules
            .iter()
            .map(|r| Rule {
                tools: r.tools.iter().map(|g| Glob::new(g)).collect(),
                resources: r.resources.iter().map(|g| Glob::new(g)).collect(),
                prompts: r.prompts.iter().map(|g| Glob::new(g)).collect(),
                arguments: r
                    .arguments
                    .iter()
                    .map(|(p, g)| (JsonPath::parse(p).ok(), Glob::new(g)))
                    .collect(),
                name: r.name.clone(),
                methods: r.methods.clone(),
                paths: r.paths.iter().map(|p| PathGlob::new(p)).collect(),
                query: r
                    .query
                    .iter()
                    .map(|(k, v)| (k.clone(), Glob::new(v)))
                    .collect(),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), Glob::new(v)))
                    .collect(),
                groups: r.groups.clone(),
                identities: r.identities.iter().map(|i| Glob::new(i)).collect(),
                hours: r.hours,
                days: r.days.clone(),
                action: r.action,
                approvers: r.approvers.clone(),
                min_approvals: r.min_approvals,
                message: r.message.clone(),
                dry_run: r.dry_run || dry_run,
            })
            .collect();
        RuleSet {
            rules,
            review_timeout,
            dry_run,
        }
    }

    /// The header names some rule looks at: a review's approval binds to their values.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .flat_map(|r| r.headers.iter().map(|(k, _)| k.as_str()))
    }

    pub fn judge(&self, cmd: &Command<'_>, caller: Caller<'_>, now: OffsetDateTime) -> Judgement {
        let mut dry_run = Vec::new();
        for rule in &self.rules {
            if !rule.matches(cmd, caller, now) {
                continue;
            }
            let decision = self.decision_of(rule);
            if rule.dry_run {
                dry_run.push(decision);
                continue;
            }
            return Judgement { decision, dry_run };
        }
        let _ = self.dry_run;
        Judgement {
            decision: Decision::Allow { rule: None },
            dry_run,
        }
    }

    fn decision_of(&self, rule: &Rule) -> Decision {
        match rule.action {
            RuleAction::Allow => Decision::Allow {
                rule: Some(rule.name.clone()),
            },
            RuleAction::Deny => Decision::Deny {
                rule: rule.name.clone(),
                message: rule
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("denied by tollgate rule \"{}\"", rule.name)),
            },
            RuleAction::Review => Decision::Review {
                rule: rule.name.clone(),
                approvers: rule.approvers.clone(),
                min_approvals: rule.min_approvals,
                timeout: self.review_timeout,
            },
        }
    }
}

impl Rule {
    fn matches(&self, cmd: &Command<'_>, caller: Caller<'_>, now: OffsetDateTime) -> bool {
        if !self.groups.is_empty() && !caller.groups.iter().any(|g| self.groups.contains(g)) {
            return false;
        }
        if !self.identities.is_empty() && !self.identities.iter().any(|g| g.matches(caller.subject))
        {
            return false;
        }
        if !in_window(self.hours, &self.days, now) {
            return false;
        }
        match &cmd.kind {
            CommandKind::Http {
                method,
                path,
                query,
                headers,
            } => {
                // An allow rule must hold for every copy of a repeated parameter or header (the
                // upstream may read any of them); a restrictive rule for any one copy.
                let strict = self.action == RuleAction::Allow;
                (self.methods.is_empty() || self.methods.iter().any(|m| m == "*" || m == method))
                    && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
                    && self
                        .query
                        .iter()
                        .all(|(k, g)| values_match(query, k, g, strict))
                    && self
                        .headers
                        .iter()
                        .all(|(k, g)| values_match(headers, k, g, strict))
            }
            CommandKind::Mcp {
                method,
                name,
                arguments,
            } => self.matches_mcp(method, *name, *arguments),
        }
    }

    /// An MCP rule names what it applies to (tools, resource URIs, prompts; none: every
    /// request), and each `arguments` path must select a value matching its glob.
    fn matches_mcp(&self, method: &str, name: Option<&str>, arguments: Option<&Value>) -> bool {
        let targeted =
            !self.tools.is_empty() || !self.resources.is_empty() || !self.prompts.is_empty();
        if targeted {
            let globs = match method {
                "tools/call" => &self.tools,
                "resources/read" => &self.resources,
                "prompts/get" => &self.prompts,
                _ => return false,
            };
            let Some(name) = name else { return false };
            if !globs.iter().any(|g| g.matches(name)) {
                return false;
            }
        }
        if self.arguments.is_empty() {
            return true;
        }
        let Some(args) = arguments else { return false };
        // An allow rule must hold for every value a path selects (the server reads them all);
        // a restrictive rule for any one of them. Either way at least one must be there.
        let strict = self.action == RuleAction::Allow;
        self.arguments.iter().all(|(path, glob)| {
            let Some(path) = path else { return true };
            let (mut any, mut all) = (false, true);
            select(args, path, &mut Vec::new(), &mut |v| {
                let m = glob.matches(&argument_text(v));
                any |= m;
                all &= m;
            });
            if strict {
                any && all
            } else {
                any
            }
        })
    }
}

/// Calls `f` with every value under `v` (itself included) that `path` selects.
fn select<'v>(v: &'v Value, path: &JsonPath, at: &mut Vec<PathSeg<'v>>, f: &mut dyn FnMut(&Value)) {
    if !at.is_empty() && path.matches(at) {
        f(v);
    }
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(PathSeg::Key(k));
                select(child, path, at, f);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(PathSeg::Index(i));
                select(child, path, at, f);
                at.pop();
            }
        }
        _ => {}
    }
}

/// An argument value as a rule's glob sees it: a string as it is (unescaped), anything else
/// as its JSON text.
fn argument_text(v: &Value) -> std::borrow::Cow<'_, str> {
    match v {
        Value::String(s) => std::borrow::Cow::Borrowed(s),
        other => std::borrow::Cow::Owned(other.to_string()),
    }
}

/// Whether the values named `key` match `glob`: any of them, or with `strict` (allow rules)
/// all of them, and at least one must be there.
fn values_match(pairs: &[(String, String)], key: &str, glob: &Glob, strict: bool) -> bool {
    let mut values = pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v);
    if strict {
        let mut any = false;
        values.all(|v| {
            any = true;
            glob.matches(v)
        }) && any
    } else {
        values.any(|v| glob.matches(v))
    }
}

/// Whether `now` (any offset; compared in UTC) falls in a rule's `hours` and `days`.
pub fn in_window(hours: Option<HourWindow>, days: &[Weekday], now: OffsetDateTime) -> bool {
    let now = now.to_offset(time::UtcOffset::UTC);
    if let Some(h) = hours {
        if !h.contains(u16::from(now.hour()) * 60 + u16::from(now.minute())) {
            return false;
        }
    }
    days.is_empty()
        || days.contains(&Weekday::from_monday0(
            now.weekday().number_days_from_monday(),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcp_rule(tools: &[&str], arguments: &[(&str, &str)], action: RuleAction) -> RuleConfig {
        RuleConfig {
            name: "r".into(),
            statements: vec![],
            tables: vec![],
            groups: vec![],
            identities: vec![],
            functions: vec![],
            methods: vec![],
            paths: vec![],
            query: vec![],
            headers: vec![],
            tools: tools.iter().map(|s| s.to_string()).collect(),
            resources: vec![],
            prompts: vec![],
            arguments: arguments
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            where_missing: false,
            hours: None,
            days: vec![],
            action,
            approvers: vec![],
            min_approvals: 1,
            message: None,
            dry_run: false,
            line: 1,
        }
    }

    #[test]
    fn an_allow_rule_holds_for_every_copy_of_a_repeated_parameter_or_header() {
        let mut allow_dev = mcp_rule(&[], &[], RuleAction::Allow);
        allow_dev.name = "dev deletes".into();
        allow_dev.methods = vec!["DELETE".into()];
        allow_dev.headers = vec![("x-env".into(), "dev".into())];
        allow_dev.query = vec![("scope".into(), "dev-*".into())];
        let mut deny = mcp_rule(&[], &[], RuleAction::Deny);
        deny.name = "no deletes".into();
        deny.methods = vec!["DELETE".into()];
        let rules = RuleSet::new(&[allow_dev, deny], Duration::from_secs(1), false);
        let judge = |query: &[(&str, &str)], headers: &[(&str, &str)]| {
            let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
                p.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            };
            let (query, headers) = (pairs(query), pairs(headers));
            rules
                .judge(
                    &Command {
                        kind: CommandKind::Http {
                            method: "DELETE",
                            path: "/x",
                            query: &query,
                            headers: &headers,
                        },
                    },
                    Caller {
                        subject: "a",
                        groups: &[],
                    },
                    OffsetDateTime::now_utc(),
                )
                .decision
        };
        let dev = [("x-env", "dev")];
        assert!(judge(&[("scope", "dev-1")], &dev).is_allow());
        // A second copy the upstream may read instead: the allow rule does not hold.
        assert!(judge(&[("scope", "dev-1"), ("scope", "prod")], &dev).is_deny());
        assert!(judge(
            &[("scope", "dev-1")],
            &[("x-env", "dev"), ("x-env", "prod")]
        )
        .is_deny());
        assert!(
            judge(&[], &dev).is_deny(),
            "a missing parameter cannot satisfy an allow rule"
        );
        // A restrictive rule needs one copy.
        let mut deny_prod = mcp_rule(&[], &[], RuleAction::Deny);
        deny_prod.headers = vec![("x-session-token".into(), "admin*".into())];
        let rules = RuleSet::new(&[deny_prod], Duration::from_secs(1), false);
        let headers = vec![
            ("x-session-token".to_string(), "user".to_string()),
            ("x-session-token".to_string(), "admin-1".to_string()),
        ];
        let d = rules.judge(
            &Command {
                kind: CommandKind::Http {
                    method: "GET",
                    path: "/",
                    query: &[],
                    headers: &headers,
                },
            },
            Caller {
                subject: "a",
                groups: &[],
            },
            OffsetDateTime::now_utc(),
        );
        assert!(d.decision.is_deny());
    }

    #[test]
    fn mcp_rules_match_tools_and_arguments() {
        let rules = RuleSet::try_new(
            &[mcp_rule(
                &["delete_*"],
                &[("$.project", "prod-*")],
                RuleAction::Deny,
            )],
            Duration::from_secs(1),
            false,
        )
        .unwrap();
        let judge = |method: &str, name: Option<&str>, args: Option<Value>| {
            let groups = vec![];
            rules
                .judge(
                    &Command {
                        kind: CommandKind::Mcp {
                            method,
                            name,
                            arguments: args.as_ref(),
                        },
                    },
                    Caller {
                        subject: "a",
                        groups: &groups,
                    },
                    OffsetDateTime::now_utc(),
                )
                .decision
                .is_deny()
        };
        let call = |name, args: Value| judge("tools/call", Some(name), Some(args));
        assert!(call(
            "delete_ticket",
            serde_json::json!({"project": "prod-1"})
        ));
        assert!(call(
            "DELETE_ticket",
            serde_json::json!({"project": "prod-1"})
        ));
        assert!(!call(
            "delete_ticket",
            serde_json::json!({"project": "dev-1"})
        ));
        assert!(!call(
            "delete_ticket",
            serde_json::json!({"other": "prod-1"})
        ));
        assert!(!call("echo", serde_json::json!({"project": "prod-1"})));
        // A listing judges a call without arguments: a rule with argument conditions passes it.
        assert!(!judge("tools/call", Some("delete_ticket"), None));
        // Other methods are not tool calls.
        assert!(!judge("resources/read", Some("delete_ticket"), None));
        let any = RuleSet::try_new(
            &[mcp_rule(&[], &[("$.ids[*]", "4*")], RuleAction::Deny)],
            Duration::from_secs(1),
            false,
        )
        .unwrap();
        let d = any.judge(
            &Command {
                kind: CommandKind::Mcp {
                    method: "tools/call",
                    name: Some("x"),
                    arguments: Some(&serde_json::json!({"ids": [1, 42]})),
                },
            },
            Caller {
                subject: "a",
                groups: &[],
            },
            OffsetDateTime::now_utc(),
        );
        assert!(d.decision.is_deny(), "numbers compare as their JSON text");
        // An allow rule holds only when every selected value matches.
        let allow = RuleSet::try_new(
            &[
                mcp_rule(&[], &[("$.projects[*]", "dev-*")], RuleAction::Allow),
                mcp_rule(&[], &[], RuleAction::Deny),
            ],
            Duration::from_secs(1),
            false,
        )
        .unwrap();
        let allowed = |args: serde_json::Value| {
            !allow
                .judge(
                    &Command {
                        kind: CommandKind::Mcp {
                            method: "tools/call",
                            name: Some("x"),
                            arguments: Some(&args),
                        },
                    },
                    Caller {
                        subject: "a",
                        groups: &[],
                    },
                    OffsetDateTime::now_utc(),
                )
                .decision
                .is_deny()
        };
        assert!(allowed(serde_json::json!({"projects": ["dev-1", "dev-2"]})));
        assert!(!allowed(
            serde_json::json!({"projects": ["dev-1", "prod-1"]})
        ));
        assert!(!allowed(serde_json::json!({"projects": []})));
        assert!(RuleSet::try_new(
            &[mcp_rule(&[], &[("$.[", "x")], RuleAction::Deny)],
            Duration::from_secs(1),
            false
        )
        .is_err());
    }

    #[test]
    fn path_globs() {
        let g = PathGlob::new("/v1/invoices/*/refund");
        assert!(g.matches("/v1/invoices/42/refund"));
        assert!(!g.matches("/v1/invoices/42/43/refund"));
        assert!(!g.matches("/v1/invoices/refund"));
        let g = PathGlob::new("/admin/**");
        assert!(g.matches("/admin/"));
        assert!(g.matches("/admin/users/1"));
        assert!(!g.matches("/administrator"));
        assert!(!g.matches("/v1/admin/x"));
        let g = PathGlob::new("/**/secret");
        assert!(g.matches("/secret"));
        assert!(g.matches("/a/b/secret"));
        let g = PathGlob::new("/files/*.csv");
        assert!(g.matches("/files/a.csv"));
        assert!(!g.matches("/files/a/b.csv"));
    }
}
