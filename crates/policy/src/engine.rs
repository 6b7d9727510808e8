//! The rule engine: a resource's rules, read-only mode and per-session prepared statements.

use crate::cache::ClassifyCache;
use crate::classify::{Classification, Kind, Statement};
use crate::glob::{glob, name_matches};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tollgate_config::{Resource, Rule, RuleAction, Weekday};

/// Functions that write or act on the server even when called from a SELECT. Matched on the
/// last part of the name, case-insensitively (see `resources.writing_functions` for more).
pub const WRITING_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile*",
    "pg_signal_backend",
    "pg_log_backend_memory_contexts",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_create_*_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_*_replication_slot",
    "pg_replication_slot_advance",
    "pg_replication_origin_*",
    "pg_logical_emit_message",
    "pg_logical_slot_get_*",
    "pg_stat_reset*",
    "pg_import_system_collations",
    "pg_notify",
    "set_config",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_*",
    "pg_write_*",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_create",
    "lo_creat",
    "lo_put",
    "lo_from_bytea",
    "lo_truncate*",
    "lowrite",
    "dblink*",
    "query_to_xml*",
    "nextval",
    "setval",
    "pg_advisory*",
    "pg_try_advisory*",
];

/// Why a [`ResourcePolicy`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("resource {resource:?}: {rule}: unknown statement kind {kind:?}")]
    UnknownKind {
        resource: String,
        rule: String,
        kind: String,
    },
}

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
    fn severity(&self) -> u8 {
        match self {
            Decision::Allow { .. } => 0,
            Decision::Review { .. } => 1,
            Decision::Deny { .. } => 2,
        }
    }

    /// The more restrictive of two decisions (deny > review > allow; the first on a tie).
    fn stricter(self, other: Decision) -> Decision {
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
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The rules of one resource, compiled from its configuration. Cheap to clone and share
/// across sessions; build a new one on config reload.
#[derive(Clone)]
pub struct ResourcePolicy {
    inner: Arc<Inner>,
}

struct Inner {
    resource: String,
    rules: Vec<Rule>,
    read_only: bool,
    unparsable: RuleAction,
    review_timeout: Duration,
    writing_functions: Vec<String>,
    cache: ClassifyCache,
}

impl ResourcePolicy {
    pub fn from_config(r: &Resource) -> Result<Self, PolicyError> {
        for rule in &r.rules {
            for kind in &rule.statements {
                if !tollgate_config::STATEMENT_KINDS.contains(&kind.as_str()) {
                    return Err(PolicyError::UnknownKind {
                        resource: r.name.clone(),
                        rule: rule.name.clone(),
                        kind: kind.clone(),
                    });
                }
            }
        }
        let mut writing_functions: Vec<String> =
            WRITING_FUNCTIONS.iter().map(|s| s.to_string()).collect();
        writing_functions.extend(r.writing_functions.iter().cloned());
        Ok(ResourcePolicy {
            inner: Arc::new(Inner {
                resource: r.name.clone(),
                rules: r.rules.clone(),
                read_only: r.read_only,
                unparsable: r.unparsable,
                review_timeout: r.review_timeout,
                writing_functions,
                // At most 2 × 2048 texts of ≤ 4 KiB: 16 MiB of text per resource at worst.
                cache: ClassifyCache::new(2048),
            }),
        })
    }

    /// The policy state of one client session (its prepared statements).
    pub fn session(&self) -> SessionPolicy {
        SessionPolicy {
            policy: self.clone(),
            prepared: HashMap::new(),
        }
    }

    /// Classify through this policy's bounded cache of recent statement texts.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        self.inner.cache.classify(sql)
    }

    /// Whether `st` writes, counting the functions it calls (built-in and configured).
    pub fn writes(&self, st: &Statement) -> bool {
        st.writes_by_itself() || self.calls_writing_function(st)
    }

    fn calls_writing_function(&self, st: &Statement) -> bool {
        self.inner.writing_function(st).is_some()
    }
}

/// One statement as the rules see it: what it is, plus, for EXECUTE, what it runs.
struct View<'a> {
    st: &'a Statement,
    /// Each facet is one part of what runs (the statement itself, a data-modifying CTE, the
    /// statement EXECUTE runs ...), as the kind names a rule may use for it.
    facets: Vec<Vec<&'static str>>,
    write: bool,
}

impl Inner {
    /// The first function `st` calls that writes (built-in list or `writing_functions`).
    fn writing_function<'s>(&self, st: &'s Statement) -> Option<&'s str> {
        st.functions
            .iter()
            .find(|f| {
                self.writing_functions
                    .iter()
                    .any(|p| name_matches(p, f, false))
            })
            .map(String::as_str)
    }

    fn deny(&self, rule: &str, message: String) -> Decision {
        Decision::Deny {
            rule: rule.to_string(),
            message,
        }
    }

    fn unparsable(&self, what: &str) -> Decision {
        // A statement the gateway cannot read cannot be shown not to write.
        let action = if self.read_only {
            RuleAction::Deny
        } else {
            self.unparsable
        };
        match action {
            RuleAction::Allow => Decision::Allow {
                rule: Some("unparsable".into()),
            },
            RuleAction::Deny => self.deny(
                "unparsable",
                format!(
                    "{what}: resource {:?} accepts only statements the gateway can check (rule \"unparsable\")",
                    self.resource
                ),
            ),
            RuleAction::Review => Decision::Review {
                rule: "unparsable".into(),
                approvers: Vec::new(),
                min_approvals: 1,
                timeout: self.review_timeout,
            },
        }
    }

    fn decide_view(&self, v: &View, who: &Caller, now: OffsetDateTime) -> Decision {
        if v.st.changes_sql_reading {
            return self.deny(
                "sql_safety",
                "changing standard_conforming_strings or client_encoding is not allowed through the gateway (rule \"sql_safety\")".into(),
            );
        }
        if self.read_only && v.write {
            let what = match self.writing_function(v.st) {
                Some(f) if !v.st.writes_by_itself() => format!("calling {f}()"),
                _ => v.st.kind.name().to_ascii_uppercase(),
            };
            return self.deny(
                "read_only",
                format!(
                    "resource {:?} is read-only: {what} is not allowed (rule \"read_only\")",
                    self.resource
                ),
            );
        }
        for rule in &self.rules {
            if self.rule_matches(rule, v, who, now) {
                return match rule.action {
                    RuleAction::Allow => Decision::Allow {
                        rule: Some(rule.name.clone()),
                    },
                    RuleAction::Deny => {
                        let message = match &rule.message {
                            Some(m) => format!("{m} (rule {:?})", rule.name),
                            None => format!(
                                "{} denied on resource {:?} by rule {:?}",
                                v.st.kind.name().to_ascii_uppercase(),
                                self.resource,
                                rule.name
                            ),
                        };
                        self.deny(&rule.name, message)
                    }
                    RuleAction::Review => Decision::Review {
                        rule: rule.name.clone(),
                        approvers: rule.approvers.clone(),
                        min_approvals: rule.min_approvals,
                        timeout: self.review_timeout,
                    },
                };
            }
        }
        Decision::Allow { rule: None }
    }

    /// Every set condition must hold. A restrictive rule matches when any facet, table or
    /// function fits; an allow rule only when all of them do, so that it cannot wave through
    /// a DELETE riding in a SELECT's CTE, or a second table.
    fn rule_matches(&self, rule: &Rule, v: &View, who: &Caller, now: OffsetDateTime) -> bool {
        let strict = rule.action == RuleAction::Allow;
        let listed = |names: &Vec<&'static str>| {
            names.iter().any(|n| rule.statements.iter().any(|s| s == n))
        };
        if !rule.statements.is_empty() {
            let ok = if strict {
                v.facets.iter().all(listed)
            } else {
                v.facets.iter().any(listed)
            };
            if !ok {
                return false;
            }
        }
        let some_or_all = |names: &[String], patterns: &[String]| {
            let fits = |n: &String| patterns.iter().any(|p| name_matches(p, n, strict));
            if strict {
                !names.is_empty() && names.iter().all(fits)
            } else {
                names.iter().any(fits)
            }
        };
        if !rule.tables.is_empty() && !some_or_all(&v.st.tables, &rule.tables) {
            return false;
        }
        if !rule.functions.is_empty() && !some_or_all(&v.st.functions, &rule.functions) {
            return false;
        }
        if rule.where_missing && !v.st.where_missing {
            return false;
        }
        if !rule.groups.is_empty() && !who.groups.iter().any(|g| rule.groups.contains(g)) {
            return false;
        }
        if !rule.identities.is_empty() && !rule.identities.iter().any(|p| glob(p, who.subject)) {
            return false;
        }
        let now = now.to_offset(time::UtcOffset::UTC);
        if let Some(h) = rule.hours {
            let minute = u16::from(now.hour()) * 60 + u16::from(now.minute());
            if !h.contains(minute) {
                return false;
            }
        }
        if !rule.days.is_empty()
            && !rule.days.contains(&Weekday::from_monday0(
                now.weekday().number_days_from_monday(),
            ))
        {
            return false;
        }
        true
    }
}

/// The policy state of one client session: the statements it has prepared, by name, so
/// that `EXECUTE x` and a protocol-level Bind/Execute are judged by what they run.
///
/// SQL `PREPARE` and protocol-level Parse share one namespace, as in PostgreSQL. A name that
/// is prepared again keeps its earlier statements too (the upstream refuses a duplicate name,
/// and the gateway does not see that answer), so an EXECUTE is judged by the strictest.
pub struct SessionPolicy {
    policy: ResourcePolicy,
    prepared: HashMap<String, Vec<Arc<Statement>>>,
}

impl SessionPolicy {
    /// A simple-protocol Query (one or more statements). The most restrictive decision over
    /// its statements wins. Statements it prepares are remembered unless it is denied.
    pub fn decide_query(&mut self, sql: &str, who: &Caller, now: OffsetDateTime) -> Decision {
        let c = self.policy.classify(sql);
        let statements = match &*c {
            Classification::Unparsable { .. } => {
                return self.policy.inner.unparsable("statement not understood")
            }
            Classification::Statements(s) => s,
        };
        let mut pending: Vec<(String, Arc<Statement>)> = Vec::new();
        let mut decision: Option<Decision> = None;
        for st in statements {
            if let Kind::Prepare { name, statement } = &st.kind {
                pending.push((name.clone(), Arc::new((**statement).clone())));
            }
            let d = self.decide_statement(st, &pending, who, now, 0);
            decision = Some(match decision {
                None => d,
                Some(prev) => prev.stricter(d),
            });
        }
        // An empty (or comment-only) query runs nothing.
        let decision = decision.unwrap_or(Decision::Allow { rule: None });
        if !decision.is_deny() {
            for (name, st) in pending {
                self.remember(name, st);
            }
        }
        decision
    }

    /// Protocol-level Parse: classify `sql` and remember it under `name` ("" is the unnamed
    /// statement, which each Parse replaces). It is judged when executed: see
    /// [`decide_execute`](Self::decide_execute). An unparsable text is remembered as such.
    pub fn parse(&mut self, name: &str, sql: &str) {
        let c = self.policy.classify(sql);
        let statements: Vec<Arc<Statement>> = match &*c {
            // The extended protocol allows one statement; several are refused upstream.
            Classification::Statements(s) => s.iter().cloned().map(Arc::new).collect(),
            Classification::Unparsable { .. } => vec![Arc::new(unparsable_marker())],
        };
        // A Parse of "PREPARE q AS ..." prepares q when executed; remember it now, to be safe.
        for st in &statements {
            if let Kind::Prepare { name, statement } = &st.kind {
                self.remember(name.clone(), Arc::new((**statement).clone()));
            }
        }
        if name.is_empty() {
            self.prepared.insert(String::new(), statements);
        } else {
            for st in statements {
                self.remember(name.to_string(), st);
            }
        }
    }

    /// Bind/Execute of a protocol-level (or SQL-prepared) statement.
    pub fn decide_execute(
        &mut self,
        statement_name: &str,
        who: &Caller,
        now: OffsetDateTime,
    ) -> Decision {
        let exec = Statement {
            kind: Kind::Execute {
                name: statement_name.to_string(),
            },
            tables: Vec::new(),
            functions: Vec::new(),
            where_missing: false,
            dml: Vec::new(),
            changes_sql_reading: false,
        };
        self.decide_statement(&exec, &[], who, now, 0)
    }

    /// Forget a statement: call it once the upstream confirmed the Close (CloseComplete), or a
    /// `DEALLOCATE name` (`None`: `DEALLOCATE ALL` / `DISCARD ALL`) completed. SQL DEALLOCATE
    /// is deliberately not applied when decided, since it may not run (an aborted transaction).
    pub fn close(&mut self, name: &str) {
        self.prepared.remove(name);
    }

    /// See [`close`](Self::close).
    pub fn deallocated(&mut self, name: Option<&str>) {
        match name {
            Some(n) => {
                self.prepared.remove(n);
            }
            None => self.prepared.clear(),
        }
    }

    /// What a prepared name would run (for the audit event of an Execute).
    pub fn prepared(&self, name: &str) -> Option<&[Arc<Statement>]> {
        self.prepared.get(name).map(Vec::as_slice)
    }

    fn remember(&mut self, name: String, st: Arc<Statement>) {
        let list = self.prepared.entry(name).or_default();
        if !list.iter().any(|s| **s == *st) {
            list.push(st);
        }
    }

    fn decide_statement(
        &self,
        st: &Statement,
        pending: &[(String, Arc<Statement>)],
        who: &Caller,
        now: OffsetDateTime,
        depth: u8,
    ) -> Decision {
        let inner = &self.policy.inner;
        // A prepared "EXECUTE x" runs x: follow the chain, but not around a cycle.
        if depth > 8 {
            return inner.unparsable("prepared statements refer to each other too deeply");
        }
        // What EXECUTE (bare, or under EXPLAIN ANALYZE) runs.
        let (exec_name, mut outer) = match &st.kind {
            Kind::Execute { name } => (Some(name), vec![vec!["execute"]]),
            Kind::Explain {
                analyze: true,
                statement,
            } => match &statement.kind {
                Kind::Execute { name } => (Some(name), vec![vec!["explain"], vec!["execute"]]),
                _ => (None, Vec::new()),
            },
            _ => (None, Vec::new()),
        };
        let Some(name) = exec_name else {
            let write = self.policy.writes(st);
            let view = View {
                st,
                facets: facets(st, write),
                write,
            };
            return inner.decide_view(&view, who, now);
        };
        let candidates: Vec<&Arc<Statement>> = pending
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, s)| s)
            .chain(self.prepared.get(name.as_str()).into_iter().flatten())
            .collect();
        if candidates.is_empty() {
            return inner.unparsable("unknown prepared statement");
        }
        let mut decision: Option<Decision> = None;
        let mut stricter = |d: Decision| {
            decision = Some(match decision.take() {
                None => d,
                Some(prev) => prev.stricter(d),
            })
        };
        for c in candidates {
            if is_unparsable_marker(c) {
                stricter(inner.unparsable("statement not understood"));
                continue;
            }
            if runs_prepared(c) {
                stricter(self.decide_statement(c, pending, who, now, depth + 1));
                continue;
            }
            let write = self.policy.writes(c);
            let mut f = facets(c, write);
            if write {
                for o in &mut outer {
                    if !o.contains(&"write") {
                        o.push("write");
                    }
                }
            }
            f.extend(outer.iter().cloned());
            let view = View {
                st: c,
                facets: f,
                write,
            };
            stricter(inner.decide_view(&view, who, now));
        }
        decision.unwrap_or(Decision::Allow { rule: None })
    }
}

/// `EXECUTE x`, or `EXPLAIN ANALYZE EXECUTE x`.
fn runs_prepared(st: &Statement) -> bool {
    match &st.kind {
        Kind::Execute { .. } => true,
        Kind::Explain {
            analyze: true,
            statement,
        } => matches!(statement.kind, Kind::Execute { .. }),
        _ => false,
    }
}

/// The kind names of each part of what runs; "write" joins every part of a writing statement.
fn facets(st: &Statement, write: bool) -> Vec<Vec<&'static str>> {
    let mut out: Vec<Vec<&'static str>> = Vec::new();
    match &st.kind {
        Kind::Explain {
            analyze: true,
            statement,
        } => {
            out.push(vec!["explain"]);
            out.extend(facets(statement, false));
        }
        k => out.push(k.names()),
    }
    for d in &st.dml {
        if !out.iter().any(|f| f.contains(&d.as_str())) {
            out.push(vec![d.as_str()]);
        }
    }
    if write {
        for f in &mut out {
            if !f.contains(&"write") {
                f.push("write");
            }
        }
    }
    out
}

/// A Parse whose text the parser rejected: judged by `resources.unparsable` when executed.
fn unparsable_marker() -> Statement {
    Statement {
        kind: Kind::Utility {
            tag: "unparsable",
            write: true,
        },
        tables: Vec::new(),
        functions: Vec::new(),
        where_missing: false,
        dml: Vec::new(),
        changes_sql_reading: false,
    }
}

fn is_unparsable_marker(st: &Statement) -> bool {
    matches!(
        st.kind,
        Kind::Utility {
            tag: "unparsable",
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use time::macros::datetime;

    fn policy(resource_keys: &str, rules: &str) -> ResourcePolicy {
        let text = format!(
            "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\n[[resources]]\nname = \"orders\"\nkind = \"postgres\"\nupstream = \"db:5432\"\n{resource_keys}[resources.tls]\nca = \"ca\"\n[resources.credentials]\nuser = \"u\"\n{rules}"
        );
        let c = tollgate_config::parse(&text, Path::new("/t.toml")).unwrap();
        ResourcePolicy::from_config(&c.resources[0]).unwrap()
    }

    fn decide(
        p: &ResourcePolicy,
        sql: &str,
        subject: &str,
        groups: &[&str],
        now: OffsetDateTime,
    ) -> Decision {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        p.session().decide_query(
            sql,
            &Caller {
                subject,
                groups: &groups,
            },
            now,
        )
    }

    // 2026-11-25 is a Wednesday.
    const WED_NOON: OffsetDateTime = datetime!(2026-11-25 12:00 UTC);

    #[test]
    fn every_configurable_kind_is_produced_by_the_classifier() {
        let produced = [
            "SELECT 1",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
            "CREATE TABLE t (a int)",
            "ALTER TABLE t ADD b int",
            "DROP TABLE t",
            "TRUNCATE t",
            "COMMENT ON TABLE t IS 'x'",
            "GRANT SELECT ON t TO x",
            "REVOKE SELECT ON t FROM x",
            "COPY t FROM PROGRAM 'x'",
            "COPY t TO STDOUT",
            "CALL p()",
            "DO 'begin end'",
            "SET a.b = 1",
            "RESET a.b",
            "SHOW x",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "SAVEPOINT s",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "DEALLOCATE p",
            "EXPLAIN SELECT 1",
            "LISTEN c",
            "NOTIFY c",
            "UNLISTEN c",
            "LOCK t",
            "VACUUM t",
            "ANALYZE t",
            "REFRESH MATERIALIZED VIEW m",
            "DECLARE c CURSOR FOR SELECT 1",
            "DISCARD ALL",
            "CHECKPOINT",
        ];
        let p = policy("", "");
        let mut seen: Vec<&str> = vec!["write"];
        for sql in produced {
            let c = crate::classify(sql);
            for st in c.statements() {
                seen.extend(facets(st, p.writes(st)).into_iter().flatten());
            }
        }
        for k in tollgate_config::STATEMENT_KINDS {
            assert!(
                seen.contains(k),
                "config accepts {k:?} but no statement is classified so"
            );
        }
        for k in &seen {
            assert!(
                tollgate_config::STATEMENT_KINDS.contains(k),
                "classifier produces {k:?}, which config rejects"
            );
        }
    }

    #[test]
    fn policies_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ResourcePolicy>();
        send_sync::<SessionPolicy>();
        send_sync::<Decision>();
    }

    #[test]
    fn first_match_wins_and_default_is_allow() {
        let p = policy(
            "",
            "[[resources.rules]]\nname = \"sre may\"\nstatements = [\"drop\"]\ngroups = [\"sre\"]\naction = \"allow\"\n[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n",
        );
        assert_eq!(
            decide(&p, "DROP TABLE t", "alice", &["sre"], WED_NOON),
            Decision::Allow {
                rule: Some("sre may".into())
            }
        );
        match decide(&p, "DROP TABLE t", "bob", &["dev"], WED_NOON) {
            Decision::Deny { rule, message } => {
                assert_eq!(rule, "rule 2");
                assert_eq!(
                    message,
                    "DROP denied on resource \"orders\" by rule \"rule 2\""
                );
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(
            decide(&p, "SELECT 1", "bob", &[], WED_NOON),
            Decision::Allow { rule: None }
        );
    }

    #[test]
    fn allow_rules_must_cover_everything_that_runs() {
        let p = policy(
            "",
            "[[resources.rules]]\nname = \"reads\"\nstatements = [\"select\"]\ntables = [\"public.*\"]\naction = \"allow\"\n[[resources.rules]]\nname = \"rest\"\naction = \"deny\"\n",
        );
        let d = |sql| decide(&p, sql, "a", &[], WED_NOON);
        assert!(d("SELECT * FROM public.a JOIN public.b USING (id)").is_allow());
        // A data-modifying CTE, a second table outside the pattern, an unqualified name.
        assert!(d("WITH x AS (DELETE FROM public.a RETURNING *) SELECT * FROM public.b").is_deny());
        assert!(d("SELECT * FROM public.a, secret.b").is_deny());
        assert!(d("SELECT * FROM a").is_deny());
    }

    #[test]
    fn time_windows_are_utc() {
        let p = policy(
            "",
            "[[resources.rules]]\nname = \"office\"\nstatements = [\"delete\"]\nhours = \"09:00-17:00\"\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]\naction = \"allow\"\n[[resources.rules]]\nname = \"after hours\"\nstatements = [\"delete\"]\naction = \"review\"\napprovers = [\"sre\"]\n",
        );
        let sql = "DELETE FROM t WHERE id = 1";
        assert!(decide(&p, sql, "a", &[], WED_NOON).is_allow());
        // 12:00 at UTC+05:00 is 07:00 UTC: outside the window.
        let early = datetime!(2026-11-25 12:00 +05:00);
        assert!(matches!(
            decide(&p, sql, "a", &[], early),
            Decision::Review { .. }
        ));
        assert!(!decide(&p, sql, "a", &[], datetime!(2026-11-25 17:00 UTC)).is_allow());
        assert!(decide(&p, sql, "a", &[], datetime!(2026-11-25 16:59 UTC)).is_allow());
        // Saturday noon.
        assert!(!decide(&p, sql, "a", &[], datetime!(2026-11-28 12:00 UTC)).is_allow());
    }

    #[test]
    fn identities_groups_where_missing_and_review_details() {
        let p = policy(
            "review_timeout = \"2m\"\n",
            "[[resources.rules]]\nname = \"bots\"\nidentities = [\"spiffe://prod/agent/*\"]\nwhere_missing = true\naction = \"deny\"\nmessage = \"agents may not touch every row\"\n[[resources.rules]]\nname = \"agents\"\ngroups = [\"agents\"]\nstatements = [\"write\"]\naction = \"review\"\napprovers = [\"sre\", \"dba\"]\nmin_approvals = 2\n",
        );
        let agent = "spiffe://prod/agent/42";
        assert_eq!(
            decide(&p, "UPDATE t SET a = 1", agent, &[], WED_NOON),
            Decision::Deny {
                rule: "bots".into(),
                message: "agents may not touch every row (rule \"bots\")".into()
            }
        );
        assert!(decide(
            &p,
            "UPDATE t SET a = 1",
            "spiffe://staging/agent/1",
            &[],
            WED_NOON
        )
        .is_allow());
        let d = decide(
            &p,
            "UPDATE t SET a = 1 WHERE id = 3",
            agent,
            &["agents"],
            WED_NOON,
        );
        assert_eq!(
            d,
            Decision::Review {
                rule: "agents".into(),
                approvers: vec!["sre".into(), "dba".into()],
                min_approvals: 2,
                timeout: Duration::from_secs(120),
            }
        );
        assert_eq!(
            d.summary(),
            serde_json::json!({"action": "review", "rule": "agents", "approvers": ["sre", "dba"], "min_approvals": 2, "timeout_ms": 120000})
        );
        assert!(decide(&p, "SELECT 1", agent, &["agents"], WED_NOON).is_allow());
    }

    #[test]
    fn most_restrictive_statement_wins() {
        let p = policy(
            "",
            "[[resources.rules]]\nstatements = [\"insert\"]\naction = \"review\"\n[[resources.rules]]\nstatements = [\"drop\"]\naction = \"deny\"\n",
        );
        let d = |sql| decide(&p, sql, "a", &[], WED_NOON);
        assert!(matches!(
            d("SELECT 1; INSERT INTO t VALUES (1)"),
            Decision::Review { .. }
        ));
        assert!(d("INSERT INTO t VALUES (1); DROP TABLE t; SELECT 1").is_deny());
    }
}
