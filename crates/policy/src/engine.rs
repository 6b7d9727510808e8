//! The rule engine: a resource's rules, read-only mode and per-session prepared statements.

use crate::cache::ClassifyCache;
use crate::classify::{Classification, Kind, Statement};
use crate::glob::{glob, name_matches};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tollgate_config::{OpaqueCode, Resource, Rule, RuleAction};

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

pub use tollgate_gate::rules::{Caller, Decision};

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
    trusted_functions: Vec<String>,
    opaque_code: OpaqueCode,
    /// Every rule only records (`resources.dry_run`).
    dry_run: bool,
    max_statements: usize,
    max_portals: usize,
    cache: ClassifyCache,
    catalog: RwLock<Option<Arc<FunctionCatalog>>>,
    /// Bumped when a session may have defined functions: the catalog is then reloaded.
    catalog_generation: AtomicU64,
}

/// The upstream's built-in functions, learned from its catalog (see [`CATALOG_QUERY`]). An
/// unqualified call resolves to a built-in when its name is in `builtin` and no other schema
/// defines a function of that name (which could win by search path or a closer overload).
#[derive(Debug)]
pub struct FunctionCatalog {
    builtin: HashSet<String>,
    shadowed: HashSet<String>,
    loaded: Instant,
    generation: u64,
}

/// Reads what [`FunctionCatalog`] needs from the upstream: one row, two JSON arrays of
/// function names (those in `pg_catalog`, those elsewhere).
pub const CATALOG_QUERY: &str = "SELECT coalesce(json_agg(DISTINCT proname) FILTER (WHERE pronamespace = 'pg_catalog'::regnamespace), '[]')::text, coalesce(json_agg(DISTINCT proname) FILTER (WHERE pronamespace <> 'pg_catalog'::regnamespace), '[]')::text FROM pg_catalog.pg_proc";

/// How long a learned catalog is trusted before new sessions reload it.
const CATALOG_TTL: Duration = Duration::from_secs(60);

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
                trusted_functions: r.trusted_functions.clone(),
                opaque_code: r.opaque_code,
                dry_run: r.dry_run,
                max_statements: r.max_prepared_statements,
                max_portals: r.max_portals,
                // At most 2 × 2048 texts of ≤ 4 KiB: 16 MiB of text per resource at worst.
                cache: ClassifyCache::new(2048),
                catalog: RwLock::new(None),
                catalog_generation: AtomicU64::new(0),
            }),
        })
    }

    /// The policy state of one client session (its prepared statements and portals).
    pub fn session(&self) -> SessionPolicy {
        let catalog = self
            .inner
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let tainted = catalog
            .as_ref()
            .is_some_and(|c| c.generation != self.inner.catalog_generation.load(Ordering::Relaxed));
        SessionPolicy {
            policy: self.clone(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            ops: HashMap::new(),
            seq: 0,
            segment: 0,
            catalog,
            tainted,
            last_portal: None,
        }
    }

    /// Whether sessions need the upstream's function catalog ([`CATALOG_QUERY`]) loaded
    /// before they start: opaque code is judged strictly and the catalog is missing or old.
    pub fn needs_catalog(&self) -> bool {
        if self.inner.opaque_code != OpaqueCode::Strict {
            return false;
        }
        let current = self.inner.catalog_generation.load(Ordering::Relaxed);
        match &*self.inner.catalog.read().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(c) => c.generation != current || c.loaded.elapsed() > CATALOG_TTL,
        }
    }

    /// Installs the function names [`CATALOG_QUERY`] returned.
    pub fn set_catalog<I, J>(&self, builtin: I, elsewhere: J)
    where
        I: IntoIterator<Item = String>,
        J: IntoIterator<Item = String>,
    {
        let builtin: HashSet<String> = builtin.into_iter().collect();
        let shadowed = elsewhere
            .into_iter()
            .filter(|n| builtin.contains(n))
            .collect();
        let catalog = FunctionCatalog {
            builtin,
            shadowed,
            loaded: Instant::now(),
            generation: self.inner.catalog_generation.load(Ordering::Relaxed),
        };
        *self
            .inner
            .catalog
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(catalog));
    }

    /// Something may have defined functions: sessions that start from now on reload the catalog.
    pub fn invalidate_catalog(&self) {
        self.inner
            .catalog_generation
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `resources.opaque_code`.
    pub fn opaque_code(&self) -> OpaqueCode {
        self.inner.opaque_code
    }

    /// Classify through this policy's bounded cache of recent statement texts.
    pub fn classify(&self, sql: &str) -> Arc<crate::classify::Classified> {
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
    /// One of the things opaque code may do: it may touch any table and call any function,
    /// so conditions on them cannot rule a restrictive rule out (nor prove an allow rule).
    opaque: bool,
    /// With `opaque`: the write kind this view stands for (named in a refusal).
    possible: Option<&'static str>,
    /// The first called function that is not known safe, if any.
    opaque_call: Option<&'a str>,
}

impl Inner {
    /// `f` is on the built-in list of writing functions or in `writing_functions`.
    fn writing_function_name(&self, f: &str) -> bool {
        self.writing_functions
            .iter()
            .any(|p| name_matches(p, f, false))
    }

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

    /// The decision for one view, and what a dry-run rule matched before it would have done.
    fn decide_view(
        &self,
        v: &View,
        who: &Caller,
        now: OffsetDateTime,
    ) -> (Decision, Option<Decision>) {
        if v.st.changes_sql_reading {
            return (self.deny(
                "sql_safety",
                "changing standard_conforming_strings or client_encoding is not allowed through the gateway (rule \"sql_safety\")".into(),
            ), None);
        }
        if self.read_only && v.write {
            let what = match (self.writing_function(v.st), v.opaque_call) {
                (Some(f), _) if !v.st.writes_by_itself() => format!("calling {f}()"),
                (_, Some(f)) if !v.st.writes_by_itself() => {
                    format!("calling {f}(), which tollgate cannot check for writes,")
                }
                _ => v.st.kind.name().to_ascii_uppercase(),
            };
            return (
                self.deny(
                    "read_only",
                    format!(
                        "resource {:?} is read-only: {what} is not allowed (rule \"read_only\")",
                        self.resource
                    ),
                ),
                None,
            );
        }
        let mut dry: Option<Decision> = None;
        for rule in &self.rules {
            if !self.rule_matches(rule, v, who, now) {
                continue;
            }
            let d = self.rule_decision(rule, v);
            if rule.dry_run || self.dry_run {
                // Recorded, not enforced: the next rules decide.
                if dry.is_none() {
                    dry = Some(d);
                }
                continue;
            }
            return (d, dry);
        }
        (Decision::Allow { rule: None }, dry)
    }

    fn rule_decision(&self, rule: &Rule, v: &View) -> Decision {
        match rule.action {
            RuleAction::Allow => Decision::Allow {
                rule: Some(rule.name.clone()),
            },
            RuleAction::Deny => {
                let what = v.st.kind.name().to_ascii_uppercase();
                let message = match (&rule.message, v.possible) {
                    (Some(m), _) => format!("{m} (rule {:?})", rule.name),
                    (None, Some(possible)) => format!(
                        "{what}{} runs code tollgate cannot inspect, so it is judged as a possible {}: denied on resource {:?} by rule {:?} (opaque_code = \"strict\"; list trusted functions in trusted_functions)",
                        v.opaque_call
                            .filter(|_| !matches!(v.st.kind, Kind::Do | Kind::Call))
                            .map(|f| format!(" calling {f}()"))
                            .unwrap_or_default(),
                        possible.to_ascii_uppercase(),
                        self.resource,
                        rule.name
                    ),
                    (None, None) => format!(
                        "{what} denied on resource {:?} by rule {:?}",
                        self.resource, rule.name
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
        }
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
        // Opaque code may touch any table, call any function and miss any WHERE: such
        // conditions hold for a restrictive rule and cannot be proven for an allow rule.
        let unknown = v.opaque;
        if !rule.tables.is_empty()
            && !(if unknown {
                !strict
            } else {
                some_or_all(&v.st.tables, &rule.tables)
            })
        {
            return false;
        }
        if !rule.functions.is_empty()
            && !(if unknown {
                !strict
            } else {
                some_or_all(&v.st.functions, &rule.functions)
            })
        {
            return false;
        }
        if rule.where_missing && !(v.st.where_missing || (unknown && !strict)) {
            return false;
        }
        if !rule.groups.is_empty() && !who.groups.iter().any(|g| rule.groups.contains(g)) {
            return false;
        }
        if !rule.identities.is_empty() && !rule.identities.iter().any(|p| glob(p, who.subject)) {
            return false;
        }
        tollgate_gate::rules::in_window(rule.hours, &rule.days, now)
    }
}

/// What a session's guardrails say about one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// What happens to it.
    pub decision: Decision,
    /// What `dry_run` rules (or a dry-run resource) would have decided, when that is stricter
    /// than the decision: recorded, not enforced.
    pub dry_run: Option<Decision>,
    /// Running it may change a session setting that the classifier depends on (opaque code,
    /// `SET`/`RESET`, a settings write): the adapter reads nothing more from the client until
    /// the server's answer to it has been checked.
    pub may_change_settings: bool,
    /// It runs code the gateway cannot see into (`DO`, `CALL`, a function not known safe).
    pub opaque: bool,
    /// Prepared-statement changes it makes (SQL `PREPARE`, `DEALLOCATE`, `DISCARD ALL`): pass
    /// each to [`SessionPolicy::confirm`] once the command's outcome is known.
    pub effects: Vec<u64>,
}

impl Judgement {
    fn of(decision: Decision) -> Self {
        Judgement {
            decision,
            dry_run: None,
            may_change_settings: false,
            opaque: false,
            effects: Vec::new(),
        }
    }

    /// Several statements or candidates: the strictest decision, and every flag.
    fn merge(&mut self, other: Judgement) {
        let decision = std::mem::replace(&mut self.decision, Decision::Allow { rule: None });
        self.decision = decision.stricter(other.decision);
        self.dry_run = match (self.dry_run.take(), other.dry_run) {
            (Some(a), Some(b)) => Some(a.stricter(b)),
            (a, b) => a.or(b),
        };
        self.may_change_settings |= other.may_change_settings;
        self.opaque |= other.opaque;
        self.effects.extend(other.effects);
    }

    /// Keep the dry-run decision only when it would have changed something.
    fn settle(mut self) -> Self {
        if let Some(d) = &self.dry_run {
            if d.severity() <= self.decision.severity() {
                self.dry_run = None;
            }
        }
        self
    }
}

/// How a prepared-statement or portal change the gateway saw ended at the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// It took effect (ParseComplete, BindComplete, CloseComplete, a completed command).
    Done,
    /// The server refused it (an ErrorResponse answered it).
    Failed,
    /// The server skipped it (an earlier error in its pipeline).
    Skipped,
}

/// A per-session limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this session holds too many {what} (limit {limit}); close the ones it no longer uses")]
pub struct LimitError {
    pub what: &'static str,
    pub limit: usize,
}

/// Unconfirmed changes one name may have in flight (a client pipelining more than this on one
/// name without reading answers is refused).
const MAX_PENDING_PER_NAME: usize = 64;

/// What a name (a prepared statement or a portal) holds as far as the server is concerned:
/// its content when last confirmed, then the changes the client asked for since, oldest first
/// (`None`: a Close, or a Parse whose text yields nothing to judge).
struct Track<T> {
    confirmed: Option<T>,
    pending: Vec<Change<T>>,
}

struct Change<T> {
    seq: u64,
    /// The pipeline segment (messages up to a Sync) the change was sent in; `None` for a SQL
    /// `PREPARE`, whose failure does not make the server skip what follows.
    segment: Option<u64>,
    content: Option<T>,
}

impl<T> Default for Track<T> {
    fn default() -> Self {
        Track {
            confirmed: None,
            pending: Vec::new(),
        }
    }
}

impl<T: Clone> Track<T> {
    /// Everything the name may hold when a message of `segment` uses it. A change earlier in
    /// the same segment is certain: had it failed, the server would skip the message using it.
    fn candidates(&self, segment: u64) -> Vec<T> {
        match self.pending.last() {
            Some(c) if c.segment == Some(segment) => c.content.iter().cloned().collect(),
            _ => self
                .pending
                .iter()
                .filter_map(|c| c.content.clone())
                .chain(self.confirmed.clone())
                .collect(),
        }
    }

    /// [`candidates`](Self::candidates) when there is exactly one answer (`Some(None)`: the
    /// name certainly holds nothing), without allocating: the common case.
    fn single(&self, segment: u64) -> Option<Option<&T>> {
        match self.pending.last() {
            Some(c) if c.segment == Some(segment) => Some(c.content.as_ref()),
            None => Some(self.confirmed.as_ref()),
            _ => None,
        }
    }

    fn push(&mut self, seq: u64, segment: Option<u64>, content: Option<T>) -> bool {
        if self.pending.len() >= MAX_PENDING_PER_NAME {
            return false;
        }
        self.pending.push(Change {
            seq,
            segment,
            content,
        });
        true
    }

    /// Change `seq` took effect: the name holds its content (earlier changes are settled).
    fn done(&mut self, seq: u64) {
        if let Some(i) = self.pending.iter().position(|c| c.seq == seq) {
            self.confirmed = self.pending[i].content.clone();
            self.pending.drain(..=i);
        }
    }

    fn undone(&mut self, seq: u64) {
        self.pending.retain(|c| c.seq != seq);
    }

    fn is_empty(&self) -> bool {
        self.confirmed.is_none() && self.pending.is_empty()
    }
}

/// A change in flight, by its sequence number.
enum Op {
    Parse(String),
    CloseStatement(String),
    Bind(String),
    ClosePortal(String),
    SqlPrepare(String),
    /// `None`: every statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    SqlDeallocate(Option<String>),
}

type Portal = Arc<[Arc<Statement>]>;

/// The policy state of one client session: which statement each prepared statement and each
/// portal may run, so that `EXECUTE x` and a protocol-level Execute are judged by what the
/// server will run.
///
/// SQL `PREPARE` and protocol-level Parse share one namespace, as in PostgreSQL. A portal is
/// fixed when it is bound: an Execute is judged by what the portal's statement held at Bind,
/// whatever the statement's name holds since. Names change only as the server confirms
/// (ParseComplete, CloseComplete, errors: see [`confirm`](Self::confirm)); until then every
/// content a name may hold is judged, and the strictest decision wins.
pub struct SessionPolicy {
    policy: ResourcePolicy,
    statements: HashMap<String, Track<Arc<Statement>>>,
    portals: HashMap<String, Track<Portal>>,
    ops: HashMap<u64, Op>,
    seq: u64,
    segment: u64,
    /// The upstream's functions as known when the session started.
    catalog: Option<Arc<FunctionCatalog>>,
    /// This session ran something that may define functions: names it calls may no longer
    /// resolve to the built-ins the catalog lists.
    tainted: bool,
    /// The portal content of the last single-statement Bind, reused by the next Bind of the
    /// same statement.
    last_portal: Option<Portal>,
}

impl SessionPolicy {
    /// A simple-protocol Query (one or more statements): the most restrictive decision over
    /// its statements wins. Its `PREPARE`/`DEALLOCATE` effects are in `effects`.
    pub fn judge_query(&mut self, sql: &str, who: &Caller, now: OffsetDateTime) -> Judgement {
        self.judge_query_classified(sql, who, now).0
    }

    /// [`judge_query`](Self::judge_query), and the classification it judged (for the audit
    /// record, without classifying the text again).
    pub fn judge_query_classified(
        &mut self,
        sql: &str,
        who: &Caller,
        now: OffsetDateTime,
    ) -> (Judgement, Arc<crate::classify::Classified>) {
        let c = self.policy.classify(sql);
        let j = self.judge_classified(&c, who, now);
        (j, c)
    }

    /// A query classified by another SQL grammar (the MySQL adapter's), judged exactly as
    /// [`judge_query`](Self::judge_query) judges PostgreSQL's.
    pub fn judge_classification(
        &mut self,
        c: &crate::classify::Classified,
        who: &Caller,
        now: OffsetDateTime,
    ) -> Judgement {
        self.judge_classified(c, who, now)
    }

    fn judge_classified(
        &mut self,
        c: &crate::classify::Classified,
        who: &Caller,
        now: OffsetDateTime,
    ) -> Judgement {
        let statements = match &**c {
            Classification::Unparsable { .. } => {
                let mut j = Judgement::of(self.policy.inner.unparsable("statement not understood"));
                j.may_change_settings = true;
                return j;
            }
            Classification::Statements(s) => s,
        };
        let mut prepared_here: Vec<(String, Arc<Statement>)> = Vec::new();
        let mut all: Option<Judgement> = None;
        for st in statements {
            if let Kind::Prepare { name, statement } = &st.kind {
                prepared_here.push((name.clone(), Arc::new((**statement).clone())));
            }
            let one = self.judge_statement(st, &prepared_here, who, now, 0);
            combine(&mut all, one);
        }
        // An empty (or comment-only) query runs nothing.
        let mut j = all.unwrap_or_else(|| Judgement::of(Decision::Allow { rule: None }));
        if !j.decision.is_deny() {
            if let Err(e) = self.record_effects(statements.iter(), &mut j.effects) {
                return Judgement::of(self.policy.inner.deny("limits", e.to_string()));
            }
        }
        j.settle()
    }

    /// [`judge_query`](Self::judge_query)'s decision alone.
    pub fn decide_query(&mut self, sql: &str, who: &Caller, now: OffsetDateTime) -> Decision {
        self.judge_query(sql, who, now).decision
    }

    /// Protocol-level Parse of `sql` as `name` ("" is the unnamed statement): returns the
    /// change's sequence number, for [`confirm`](Self::confirm). It is judged when a portal
    /// bound to it is executed.
    pub fn parse(&mut self, name: &str, sql: &str) -> Result<u64, LimitError> {
        let c = self.policy.classify(sql);
        let content = match c.statements() {
            [] if matches!(**c, Classification::Statements(_)) => None,
            [one] => Some(Arc::new(one.clone())),
            // Unparsable, or several statements (which the server refuses in a Parse).
            _ => Some(Arc::new(unparsable_marker())),
        };
        let seq = self.next_seq();
        let limit = self.policy.inner.max_statements;
        if !self.statements.contains_key(name) && self.statements.len() >= limit {
            return Err(LimitError {
                what: "prepared statements",
                limit,
            });
        }
        let segment = Some(self.segment);
        let track = self.statements.entry(name.to_string()).or_default();
        if !track.push(seq, segment, content) {
            return Err(LimitError {
                what: "unconfirmed changes of one prepared statement",
                limit: MAX_PENDING_PER_NAME,
            });
        }
        self.ops.insert(seq, Op::Parse(name.to_string()));
        Ok(seq)
    }

    /// Protocol-level Bind of `statement` to `portal`: the portal runs what the statement
    /// holds now.
    pub fn bind(&mut self, portal: &str, statement: &str) -> Result<u64, LimitError> {
        let content: Portal = match self.statements.get(statement) {
            None => Arc::from(Vec::new()),
            Some(t) => match t.single(self.segment) {
                Some(Some(st)) => {
                    // Binding the same statement again (every execution of a prepared one)
                    // reuses its one-element portal.
                    match &self.last_portal {
                        Some(p) if Arc::ptr_eq(&p[0], st) => p.clone(),
                        _ => {
                            let p: Portal = Arc::from(vec![st.clone()]);
                            self.last_portal = Some(p.clone());
                            p
                        }
                    }
                }
                Some(None) => Arc::from(Vec::new()),
                None => t.candidates(self.segment).into(),
            },
        };
        let seq = self.next_seq();
        let limit = self.policy.inner.max_portals;
        if !self.portals.contains_key(portal) {
            if self.portals.len() >= limit {
                return Err(LimitError {
                    what: "portals",
                    limit,
                });
            }
            self.portals.insert(portal.to_string(), Track::default());
        }
        let segment = Some(self.segment);
        let track = self.portals.get_mut(portal).expect("inserted above");
        if !track.push(seq, segment, Some(content)) {
            return Err(LimitError {
                what: "unconfirmed changes of one portal",
                limit: MAX_PENDING_PER_NAME,
            });
        }
        self.ops.insert(seq, Op::Bind(portal.to_string()));
        Ok(seq)
    }

    /// Protocol-level Close of a statement (`portal = false`) or a portal.
    pub fn close(&mut self, portal: bool, name: &str) -> Result<u64, LimitError> {
        let seq = self.next_seq();
        let segment = Some(self.segment);
        let pushed = if portal {
            self.portals
                .get_mut(name)
                .is_none_or(|t| t.push(seq, segment, None))
        } else {
            self.statements
                .get_mut(name)
                .is_none_or(|t| t.push(seq, segment, None))
        };
        if !pushed {
            return Err(LimitError {
                what: "unconfirmed changes of one name",
                limit: MAX_PENDING_PER_NAME,
            });
        }
        let op = if portal {
            Op::ClosePortal(name.to_string())
        } else {
            Op::CloseStatement(name.to_string())
        };
        self.ops.insert(seq, op);
        Ok(seq)
    }

    /// A Sync: the pipeline segment ends. Segments are numbered from 0 by the Syncs before
    /// them, as the adapter numbers them for [`idle`](Self::idle).
    pub fn sync(&mut self) {
        self.segment += 1;
    }

    /// The server reported it is outside a transaction after the Sync that closed `segment`:
    /// every portal bound up to then is gone.
    pub fn idle(&mut self, segment: u64) {
        self.portals.retain(|_, t| {
            t.confirmed = None;
            t.pending.retain(|c| c.segment.is_none_or(|s| s > segment));
            !t.is_empty()
        });
    }

    /// Execute of `portal`: judged by what the portal was bound to.
    pub fn judge_execute(&mut self, portal: &str, who: &Caller, now: OffsetDateTime) -> Judgement {
        let track = self.portals.get(portal);
        let candidates: Portal = match track.map(|t| t.single(self.segment)) {
            // The common case: one portal content, used as it is.
            Some(Some(Some(p))) => p.clone(),
            Some(Some(None)) | None => Arc::from(Vec::new()),
            Some(None) => track
                .map(|t| t.candidates(self.segment))
                .unwrap_or_default()
                .iter()
                .flat_map(|p| p.iter().cloned())
                .collect::<Vec<_>>()
                .into(),
        };
        if candidates.is_empty() {
            let mut j = Judgement::of(
                self.policy
                    .inner
                    .unparsable("a portal the gateway did not see bound to a statement"),
            );
            j.may_change_settings = true;
            return j;
        }
        let mut all: Option<Judgement> = None;
        for st in candidates.iter() {
            if is_unparsable_marker(st) {
                let mut u = Judgement::of(self.policy.inner.unparsable("statement not understood"));
                u.may_change_settings = true;
                combine(&mut all, u);
                continue;
            }
            let one = self.judge_statement(st, &[], who, now, 0);
            combine(&mut all, one);
        }
        let mut j = all.expect("at least one candidate");
        if !j.decision.is_deny() {
            if let Err(e) = self.record_effects(candidates.iter().map(|s| &**s), &mut j.effects) {
                return Judgement::of(self.policy.inner.deny("limits", e.to_string()));
            }
        }
        j.settle()
    }

    /// Classify through the resource's cache.
    pub fn classify(&self, sql: &str) -> Arc<crate::classify::Classified> {
        self.policy.classify(sql)
    }

    /// The statements a portal may run (for the audit record and reviewers).
    pub fn portal_statements(&self, portal: &str) -> Vec<Arc<Statement>> {
        self.portals
            .get(portal)
            .map(|t| t.candidates(self.segment))
            .unwrap_or_default()
            .iter()
            .flat_map(|p| p.iter().cloned())
            .collect()
    }

    /// What a SQL-prepared or protocol-prepared name may run (`EXECUTE name` for reviewers).
    pub fn prepared(&self, name: &str) -> Vec<Arc<Statement>> {
        self.statements
            .get(name)
            .map(|t| t.candidates(u64::MAX))
            .unwrap_or_default()
    }

    /// The server's answer to change `seq`.
    pub fn confirm(&mut self, seq: u64, how: Confirmation) {
        let Some(op) = self.ops.remove(&seq) else {
            return;
        };
        let done = how == Confirmation::Done;
        match op {
            Op::Parse(name) => {
                let unnamed_failed = name.is_empty() && how == Confirmation::Failed;
                self.settle_statement(&name, |t| {
                    if done {
                        t.done(seq)
                    } else {
                        t.undone(seq);
                        // A failed Parse of the unnamed statement has already dropped the old one.
                        if unnamed_failed {
                            t.confirmed = None;
                        }
                    }
                });
            }
            Op::CloseStatement(name) => {
                self.settle_statement(&name, |t| if done { t.done(seq) } else { t.undone(seq) })
            }
            Op::Bind(name) | Op::ClosePortal(name) => {
                if let Some(t) = self.portals.get_mut(&name) {
                    if done {
                        t.done(seq)
                    } else {
                        t.undone(seq)
                    }
                    if t.is_empty() {
                        self.portals.remove(&name);
                    }
                }
            }
            // A statement that may have run before a later one of its query failed stays a
            // candidate: only success settles it.
            Op::SqlPrepare(name) if done => self.settle_statement(&name, |t| t.done(seq)),
            Op::SqlPrepare(_) => {}
            Op::SqlDeallocate(Some(name)) if done => {
                self.statements.remove(&name);
            }
            Op::SqlDeallocate(None) if done => self.statements.clear(),
            Op::SqlDeallocate(_) => {}
        }
    }

    fn settle_statement(&mut self, name: &str, f: impl FnOnce(&mut Track<Arc<Statement>>)) {
        if let Some(t) = self.statements.get_mut(name) {
            f(t);
            if t.is_empty() {
                self.statements.remove(name);
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Registers the prepared-statement changes that `statements` make when they run.
    fn record_effects<'s>(
        &mut self,
        statements: impl IntoIterator<Item = &'s Statement>,
        effects: &mut Vec<u64>,
    ) -> Result<(), LimitError> {
        for st in statements {
            let op = match &st.kind {
                Kind::Prepare { name, statement } => {
                    let limit = self.policy.inner.max_statements;
                    if !self.statements.contains_key(name) && self.statements.len() >= limit {
                        return Err(LimitError {
                            what: "prepared statements",
                            limit,
                        });
                    }
                    let seq = self.next_seq();
                    let content = Arc::new((**statement).clone());
                    if !self.statements.entry(name.clone()).or_default().push(
                        seq,
                        None,
                        Some(content),
                    ) {
                        return Err(LimitError {
                            what: "unconfirmed changes of one prepared statement",
                            limit: MAX_PENDING_PER_NAME,
                        });
                    }
                    (seq, Op::SqlPrepare(name.clone()))
                }
                Kind::Deallocate { name } => (self.next_seq(), Op::SqlDeallocate(name.clone())),
                Kind::Utility {
                    tag: "discard",
                    write: true,
                } => (self.next_seq(), Op::SqlDeallocate(None)),
                _ => continue,
            };
            self.ops.insert(op.0, op.1);
            effects.push(op.0);
        }
        Ok(())
    }

    /// One statement; `prepared_here` are the statements an earlier part of the same query
    /// prepares.
    fn judge_statement(
        &mut self,
        st: &Statement,
        prepared_here: &[(String, Arc<Statement>)],
        who: &Caller,
        now: OffsetDateTime,
        depth: u8,
    ) -> Judgement {
        let inner = self.policy.inner.clone();
        // A prepared "EXECUTE x" runs x: follow the chain, but not around a cycle.
        if depth > 8 {
            return Judgement::of(
                inner.unparsable("prepared statements refer to each other too deeply"),
            );
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
            return self.judge_view(st, Vec::new(), who, now);
        };
        let candidates: Vec<Arc<Statement>> = prepared_here
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .chain(
                self.statements
                    .get(name.as_str())
                    .map(|t| t.candidates(u64::MAX))
                    .unwrap_or_default(),
            )
            .collect();
        if candidates.is_empty() {
            return Judgement::of(inner.unparsable("unknown prepared statement"));
        }
        let mut all: Option<Judgement> = None;
        for c in candidates {
            if is_unparsable_marker(&c) {
                let mut u = Judgement::of(inner.unparsable("statement not understood"));
                u.may_change_settings = true;
                combine(&mut all, u);
                continue;
            }
            if runs_prepared(&c) {
                let one = self.judge_statement(&c, prepared_here, who, now, depth + 1);
                combine(&mut all, one);
                continue;
            }
            if self.policy.writes(&c) {
                for o in &mut outer {
                    if !o.contains(&"write") {
                        o.push("write");
                    }
                }
            }
            let one = self.judge_view(&c, outer.clone(), who, now);
            combine(&mut all, one);
        }
        all.expect("at least one candidate")
    }

    /// A statement as the rules see it, with `outer` facets (EXPLAIN, EXECUTE) around it.
    fn judge_view(
        &mut self,
        st: &Statement,
        outer: Vec<Vec<&'static str>>,
        who: &Caller,
        now: OffsetDateTime,
    ) -> Judgement {
        let inner = self.policy.inner.clone();
        let opaque_call = self.opaque_call(st);
        let opaque = matches!(st.kind, Kind::Do | Kind::Call) || opaque_call.is_some();
        let strict = opaque && inner.opaque_code == OpaqueCode::Strict;
        let write = self.policy.writes(st) || strict;
        let mut f = facets(st, write);
        f.extend(outer);
        let view = View {
            st,
            facets: f,
            write,
            opaque: false,
            possible: None,
            opaque_call: opaque_call.as_deref(),
        };
        let (mut decision, mut dry) = inner.decide_view(&view, who, now);
        if strict {
            // Code the gateway cannot see into may do anything a write can: it takes the
            // strictest decision any write kind would get here.
            for kind in OPAQUE_WRITES {
                let mut facets = view.facets.clone();
                let mut names = kind.to_vec();
                names.push("write");
                facets.push(names);
                let possible = View {
                    st,
                    facets,
                    write: true,
                    opaque: true,
                    possible: Some(kind[kind.len() - 1]),
                    opaque_call: opaque_call.as_deref(),
                };
                let (d, w) = inner.decide_view(&possible, who, now);
                decision = decision.stricter(d);
                dry = match (dry, w) {
                    (Some(a), Some(b)) => Some(a.stricter(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let may_run = !decision.is_deny();
        if may_run && (opaque || defines_functions(st)) {
            // It may have defined functions that shadow built-ins: for the rest of this
            // session, unqualified calls resolve to nothing the gateway knows.
            self.tainted = true;
        }
        if may_run && (defines_functions(st) || matches!(st.kind, Kind::Do | Kind::Call)) {
            // Sessions that start from now on reload the catalog first.
            self.policy.invalidate_catalog();
        }
        let may_change_settings = opaque
            || st.sets_settings
            || matches!(
                &st.kind,
                Kind::Set { name, .. } if affects_sql_reading(Some(name))
            )
            || matches!(&st.kind, Kind::Reset { name, .. } if affects_sql_reading(name.as_deref()))
            || matches!(
                st.kind,
                Kind::Utility {
                    tag: "discard",
                    write: true
                }
            );
        Judgement {
            decision,
            dry_run: dry,
            may_change_settings,
            opaque,
            effects: Vec::new(),
        }
    }

    /// The first function `st` calls that is not known safe: not a built-in of the upstream
    /// (resolved through the catalog learned from it), not in `trusted_functions`, and not a
    /// known writer (those are judged as writes by name).
    fn opaque_call(&self, st: &Statement) -> Option<String> {
        let inner = &self.policy.inner;
        st.functions
            .iter()
            .find(|f| {
                if inner.writing_function_name(f) {
                    return false;
                }
                if inner
                    .trusted_functions
                    .iter()
                    .any(|p| name_matches(p, f, false))
                {
                    return false;
                }
                let Some(catalog) = self.catalog.as_ref() else {
                    return true;
                };
                match f.split_once('.') {
                    Some((schema, name)) => {
                        !(schema == "pg_catalog" && catalog.builtin.contains(name))
                    }
                    None => {
                        self.tainted
                            || !catalog.builtin.contains(f.as_str())
                            || catalog.shadowed.contains(f.as_str())
                    }
                }
            })
            .cloned()
    }
}

/// Adds one statement's (or candidate's) judgement to the ones before it.
fn combine(all: &mut Option<Judgement>, one: Judgement) {
    match all {
        None => *all = Some(one),
        Some(j) => j.merge(one),
    }
}

/// Settings whose change would make the gateway's parser and the server's disagree.
fn affects_sql_reading(name: Option<&str>) -> bool {
    name.is_none_or(|n| {
        matches!(
            n,
            "standard_conforming_strings" | "client_encoding" | "names" | "all"
        )
    })
}

/// DDL that creates or changes functions (and so what a call by name resolves to).
fn defines_functions(st: &Statement) -> bool {
    match &st.kind {
        Kind::Ddl { object, .. } => matches!(
            object.as_str(),
            "function"
                | "procedure"
                | "aggregate"
                | "routine"
                | "extension"
                | "schema"
                | "operator"
                | "cast"
                | "language"
                | "transform"
        ),
        _ => false,
    }
}

/// What code the gateway cannot see into may do: one facet per write kind (the last name is
/// the one named in a refusal).
const OPAQUE_WRITES: &[&[&str]] = &[
    &["insert"],
    &["update"],
    &["delete"],
    &["merge"],
    &["ddl", "create"],
    &["ddl", "alter"],
    &["ddl", "drop"],
    &["ddl", "truncate"],
    &["ddl", "comment"],
    &["grant"],
    &["revoke"],
    &["copy", "copy_from"],
    &["copy", "copy_to", "copy_program"],
    &["set"],
    &["reset"],
    &["notify"],
    &["lock"],
    &["vacuum"],
    &["analyze"],
    &["refresh"],
    &["other"],
];

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
    if st.sets_settings && !out.iter().any(|f| f.contains(&"set")) {
        out.push(vec!["set"]);
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
        sets_settings: false,
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
