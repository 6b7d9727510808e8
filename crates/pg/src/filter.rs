//! The response filter of one session: it knows the columns of every result (RowDescription,
//! tracked per prepared statement and per portal), masks what the resource's masking policy
//! selects for this viewer — DataRow (text and binary), COPY TO data, ErrorResponse and
//! NoticeResponse fields, NotificationResponse payloads and function-call results — and keeps,
//! per command, which fields were masked and (when the resource captures results) the rows the
//! client received, after masking.
//!
//! The masking itself is `tollgate-mask`'s; this module only tells it what each byte is. It is
//! driven by the relay, which knows which request each response answers; it does no I/O.

use crate::proto::backend::{self, RowField};
use crate::refusal::CommandRefusal;
use crate::rows::{column_info, CopyFormat, Format, RowMasking, RowOutcome};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use tollgate_gate::event::{MaskedCount, RowCapture};
use tollgate_mask::{ColumnInfo, Policy, Reason, RowPlan, REDACTED};

/// What to do with one backend message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Forward,
    /// Send these bytes (one or more complete messages) instead.
    Replace(Vec<u8>),
    /// Send nothing for it.
    Drop,
}

/// The columns of a result as the server described them.
pub(crate) struct Shape {
    fields: Vec<RowField>,
    /// The plan when every column is in text format, the common case, computed once.
    text_plan: OnceLock<Arc<RowPlan>>,
    /// The same for the captured copy (rules without group exceptions).
    audit_text_plan: OnceLock<Arc<RowPlan>>,
}

#[derive(Clone)]
pub(crate) enum Described {
    /// Never described since it was (re)defined.
    Unknown,
    NoData,
    Rows(Arc<Shape>),
}

struct Portal {
    described: Described,
    formats: Vec<i16>,
    plan: Option<Arc<RowPlan>>,
}

/// The plan for the rows streaming now.
#[derive(Clone)]
enum Current {
    /// The viewer's plan, the shape, and the plan for the captured copy when it differs.
    Plan(Arc<RowPlan>, Arc<Shape>, Option<Arc<RowPlan>>),
    /// Rows of an unknown shape while column rules apply: every field becomes NULL.
    NullAll,
    Undescribed,
}

enum Copy {
    Masking(CopyFormat),
    /// Masked column by column, with the columns the gateway learned before the COPY ran.
    Columns(CopyFormat, Arc<RowPlan>, Arc<Shape>),
    /// Refused: everything up to and including its CommandComplete is dropped.
    Refused,
}

/// Per command: what was masked (column, why, how many values) and the captured rows.
#[derive(Default)]
struct Acc {
    masked: Vec<(String, String, u64)>,
    capture: Option<Capture>,
    /// Later result sets of a multi-statement query that were not captured.
    more_sets: bool,
}

struct Capture {
    columns: Vec<String>,
    /// Columns sent in binary format, recorded by size only.
    binary: Vec<bool>,
    rows: Vec<Value>,
    bytes: usize,
    truncated: bool,
}

/// What a command's `result` event adds when the session filters responses.
#[derive(Default)]
pub(crate) struct ResultExtra {
    pub masked: Vec<MaskedCount>,
    pub capture: Option<RowCapture>,
}

pub(crate) struct Filter {
    policy: Arc<Policy>,
    groups: Vec<String>,
    /// A column or type rule applies to this viewer: data whose columns are unknown cannot be
    /// masked by column, so it is withheld instead.
    column_rules: bool,
    masking: bool,
    undescribed: Arc<RowPlan>,
    text: RowPlan,
    capture_budget: Option<usize>,
    /// Rules without group exceptions, for the captured copy of rows the viewer saw unmasked.
    audit: Option<Arc<Policy>>,
    statements: HashMap<String, Described>,
    portals: HashMap<String, Portal>,
    /// Shapes by their RowDescription bytes: a statement described again (every execution,
    /// for most drivers) reuses its shape and plans instead of parsing and planning again.
    shapes: HashMap<Box<[u8]>, Arc<Shape>>,
    current: Option<Current>,
    copy: Option<Copy>,
    /// The columns of the next COPY TO output, learned by the gateway's own Describe.
    copy_shape: Option<Arc<Shape>>,
    acc: Acc,
    resource: String,
    scratch: Vec<u8>,
}

impl Filter {
    /// `None` when nothing would ever be masked or captured for this viewer: the relay then
    /// forwards responses untouched and does not track result shapes at all.
    pub fn new(
        policy: Option<Arc<Policy>>,
        audit: Option<Arc<Policy>>,
        groups: &[String],
        capture_budget: Option<usize>,
        resource: &str,
    ) -> Option<Filter> {
        let policy = policy.unwrap_or_default();
        let applicable: Vec<_> = policy
            .rules()
            .iter()
            .filter(|r| r.applies_to(groups))
            .collect();
        let masking = !applicable.is_empty();
        if !masking && capture_budget.is_none() {
            return None;
        }
        let column_rules = applicable
            .iter()
            .any(|r| !r.columns.is_empty() || !r.types.is_empty());
        // Exempt from some rule (or unmasked by an approved review: no policy at all).
        let exempt = policy.is_empty() || policy.rules().iter().any(|r| !r.applies_to(groups));
        let audit = audit.filter(|_| exempt && capture_budget.is_some());
        let groups = groups.to_vec();
        Some(Filter {
            audit,
            undescribed: Arc::new(policy.plan_undescribed(&groups)),
            text: policy.text_plan(&groups),
            policy,
            groups,
            column_rules,
            masking,
            capture_budget,
            statements: HashMap::new(),
            portals: HashMap::new(),
            shapes: HashMap::new(),
            current: None,
            copy: None,
            copy_shape: None,
            acc: Acc::default(),
            resource: resource.to_string(),
            scratch: Vec::new(),
        })
    }

    /// ParseComplete for statement `name`: its shape is unknown until described.
    pub fn parsed(&mut self, name: &str) {
        self.statements.insert(name.to_string(), Described::Unknown);
    }

    /// BindComplete: portal `portal` runs `statement` with these result formats.
    pub fn bound(&mut self, portal: &str, statement: &str, formats: Vec<i16>) {
        let described = self
            .statements
            .get(statement)
            .cloned()
            .unwrap_or(Described::Unknown);
        self.portals.insert(
            portal.to_string(),
            Portal {
                described,
                formats,
                plan: None,
            },
        );
    }

    /// The shape a RowDescription describes (cached by its bytes).
    fn shape_of(&mut self, body: &[u8]) -> Result<Arc<Shape>, String> {
        if let Some(shape) = self.shapes.get(body) {
            return Ok(shape.clone());
        }
        let fields = backend::parse_row_description(body)
            .map_err(|_| "malformed RowDescription from upstream".to_string())?;
        let shape = Arc::new(Shape::new(fields));
        if self.shapes.len() >= MAX_SHAPES {
            self.shapes.clear();
        }
        self.shapes.insert(body.into(), shape.clone());
        Ok(shape)
    }

    /// The answer to a Describe: a RowDescription body, or `None` for NoData.
    pub fn described(&mut self, kind: u8, name: &str, body: Option<&[u8]>) -> Result<(), String> {
        let d = match body {
            None => Described::NoData,
            Some(b) => Described::Rows(self.shape_of(b)?),
        };
        if kind == b'S' {
            self.statements.insert(name.to_string(), d);
        } else if let Some(p) = self.portals.get_mut(name) {
            // The portal's own description carries its real formats.
            if let Described::Rows(shape) = &d {
                p.formats = shape.fields.iter().map(|f| f.format).collect();
            }
            p.described = d;
            p.plan = None;
        }
        Ok(())
    }

    /// Column or type masking rules apply to this viewer.
    pub fn masks_columns(&self) -> bool {
        self.masking && self.column_rules
    }

    /// The answer to the gateway's own Describe of a COPY's source: its columns (`None`: the
    /// Describe failed or returned no data, and the COPY will be refused).
    pub fn copy_columns(&mut self, row_description: Option<&[u8]>) -> Result<(), String> {
        self.copy_shape = match row_description {
            Some(b) => Some(self.shape_of(b)?),
            None => None,
        };
        Ok(())
    }

    /// A simple query may have prepared, deallocated or discarded named statements: no shape
    /// learned for a statement name is trusted any more (portals already bound keep theirs).
    pub fn forget_statement_shapes(&mut self) {
        self.statements.clear();
    }

    /// CloseComplete.
    pub fn closed(&mut self, kind: u8, name: &str) {
        if kind == b'S' {
            self.statements.remove(name);
        } else {
            self.portals.remove(name);
        }
    }

    /// A RowDescription that starts a result set of a simple query.
    pub fn row_description(&mut self, body: &[u8]) -> Result<(), String> {
        let shape = self.shape_of(body)?;
        let plan = self.plan_for(&shape, &[]);
        self.start_capture(&shape, &[]);
        let audit = self.audit_plan(&shape, &[]);
        self.current = Some(Current::Plan(plan, shape, audit));
        Ok(())
    }

    /// Rows of an Execute on `portal` are about to stream (called before its first DataRow).
    pub fn execute_rows(&mut self, portal: &str) {
        if self.current.is_some() {
            return;
        }
        let current = match self.portals.get(portal).map(|p| (p.described.clone(), p)) {
            Some((Described::Rows(shape), p)) => {
                let formats = p.formats.clone();
                let plan = match &p.plan {
                    Some(plan) => plan.clone(),
                    None => {
                        let plan = self.plan_for(&shape, &formats);
                        if let Some(p) = self.portals.get_mut(portal) {
                            p.plan = Some(plan.clone());
                        }
                        plan
                    }
                };
                self.start_capture(&shape, &formats);
                let audit = self.audit_plan(&shape, &formats);
                Current::Plan(plan, shape, audit)
            }
            _ => self.unknown_shape(),
        };
        self.current = Some(current);
    }

    fn unknown_shape(&self) -> Current {
        if self.column_rules {
            tracing::warn!(resource = %self.resource, "rows of an undescribed result: every field is withheld because column masking rules apply");
            Current::NullAll
        } else {
            Current::Undescribed
        }
    }

    /// Whether the rows streaming now have their plan.
    pub fn has_current(&self) -> bool {
        self.current.is_some()
    }

    /// The end of a result set (CommandComplete, EmptyQuery, PortalSuspended, ErrorResponse,
    /// ReadyForQuery).
    pub fn result_done(&mut self) {
        self.current = None;
    }

    fn plan_for(&self, shape: &Shape, formats: &[i16]) -> Arc<RowPlan> {
        let all_text = formats.iter().all(|f| *f == 0);
        if all_text {
            if let Some(p) = shape.text_plan.get() {
                return p.clone();
            }
        }
        let columns = columns_of(shape, formats);
        let plan = Arc::new(self.policy.plan(&columns, &self.groups));
        if all_text {
            let _ = shape.text_plan.set(plan.clone());
        }
        plan
    }

    /// The plan the captured copy is masked with, when the viewer was exempt from some rule.
    fn audit_plan(&self, shape: &Shape, formats: &[i16]) -> Option<Arc<RowPlan>> {
        let audit = self.audit.as_ref()?;
        let all_text = formats.iter().all(|f| *f == 0);
        if all_text {
            if let Some(p) = shape.audit_text_plan.get() {
                return Some(p.clone());
            }
        }
        let columns = columns_of(shape, formats);
        let plan = Arc::new(audit.plan(&columns, &[]));
        if all_text {
            let _ = shape.audit_text_plan.set(plan.clone());
        }
        Some(plan)
    }

    fn start_capture(&mut self, shape: &Shape, formats: &[i16]) {
        if self.capture_budget.is_none() {
            return;
        }
        if self.acc.capture.is_some() {
            self.acc.more_sets = true;
            return;
        }
        self.acc.capture = Some(Capture {
            columns: shape.fields.iter().map(|f| f.name.clone()).collect(),
            binary: (0..shape.fields.len())
                .map(|i| format_code(formats, i) == 1)
                .collect(),
            rows: Vec::new(),
            bytes: 0,
            truncated: false,
        });
    }

    /// A DataRow of the current result.
    pub fn data_row(&mut self, body: &[u8]) -> Result<Verdict, String> {
        // The plan is taken out while the row is masked (the counts need `&mut self`) and put
        // back after, so a row costs no reference counting.
        let current = match self.current.take() {
            Some(c) => c,
            None => self.unknown_shape(),
        };
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        let verdict = self.mask_row(&current, body, &mut out);
        self.scratch = out;
        self.current = Some(current);
        verdict
    }

    fn mask_row(
        &mut self,
        current: &Current,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Verdict, String> {
        let verdict = match current {
            Current::Plan(plan, shape, _) => {
                if !plan.is_active() {
                    Verdict::Forward
                } else {
                    out.extend_from_slice(&[b'D', 0, 0, 0, 0]);
                    match plan.mask_data_row(body, out) {
                        Ok(RowOutcome::Unchanged) => Verdict::Forward,
                        Ok(RowOutcome::Rewritten(fields)) => {
                            for f in &fields {
                                let name =
                                    shape.fields.get(f.column).map_or("?", |c| c.name.as_str());
                                self.count(name, f.reason);
                            }
                            Verdict::Replace(finish_message(out.clone()))
                        }
                        Err(e) => return Err(format!("DataRow from upstream: {e}")),
                    }
                }
            }
            Current::Undescribed => {
                out.extend_from_slice(&[b'D', 0, 0, 0, 0]);
                match self.undescribed.mask_data_row(body, out) {
                    Ok(RowOutcome::Unchanged) => Verdict::Forward,
                    Ok(RowOutcome::Rewritten(fields)) => {
                        for f in &fields {
                            self.count("?", f.reason);
                        }
                        Verdict::Replace(finish_message(out.clone()))
                    }
                    Err(e) => return Err(format!("DataRow from upstream: {e}")),
                }
            }
            Current::NullAll => {
                let n = backend::parse_data_row(body)
                    .map_err(|_| "malformed DataRow from upstream".to_string())?
                    .len();
                out.extend_from_slice(&[b'D', 0, 0, 0, 0]);
                out.extend_from_slice(&(n as i16).to_be_bytes());
                for _ in 0..n {
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                }
                self.count_str("?", "undescribed", n as u64);
                Verdict::Replace(finish_message(out.clone()))
            }
        };
        if self.capture_budget.is_some() {
            let seen = match &verdict {
                Verdict::Replace(m) => &m[5..],
                _ => body,
            };
            // What the viewer saw, masked again for everyone when they were exempt.
            let mut stored = Vec::new();
            let undescribed;
            let audit = match current {
                Current::Plan(_, _, audit) => audit.as_deref(),
                _ => {
                    undescribed = self.audit.as_ref().map(|a| a.plan_undescribed(&[]));
                    undescribed.as_ref()
                }
            };
            match audit.map(|a| a.mask_data_row(seen, &mut stored)) {
                Some(Ok(RowOutcome::Rewritten(_))) => self.capture_row(&stored),
                _ => self.capture_row(seen),
            }
        }
        Ok(verdict)
    }

    fn capture_row(&mut self, body: &[u8]) {
        let budget = self.capture_budget.unwrap_or(0);
        let Some(cap) = self.acc.capture.as_mut() else {
            return;
        };
        if cap.truncated {
            return;
        }
        let Ok(fields) = backend::parse_data_row(body) else {
            return;
        };
        let size: usize = fields.iter().map(|f| f.map_or(4, |v| v.len() + 2)).sum();
        if cap.bytes + size > budget {
            cap.truncated = true;
            return;
        }
        cap.bytes += size;
        let row: Vec<Value> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| match f {
                None => Value::Null,
                Some(v)
                    if cap.binary.get(i).copied().unwrap_or(false)
                        || std::str::from_utf8(v).is_err() =>
                {
                    Value::String(format!("<binary {} bytes>", v.len()))
                }
                Some(v) => Value::String(String::from_utf8_lossy(v).into_owned()),
            })
            .collect();
        cap.rows.push(Value::Array(row));
    }

    /// CopyOutResponse. `hint` is the format the COPY statement asked for (text or CSV, with
    /// delimiter and quote), which the response itself does not say.
    pub fn copy_out(&mut self, body: &[u8], hint: Option<CopyFormat>) -> Result<Verdict, String> {
        let (overall, columns) = backend::parse_copy_response(body)
            .map_err(|_| "malformed CopyOutResponse from upstream".to_string())?;
        let learned = self.copy_shape.take();
        if !self.masking {
            return Ok(Verdict::Forward);
        }
        let format = if overall == 1 {
            CopyFormat::Binary
        } else {
            hint.unwrap_or(CopyFormat::TEXT)
        };
        if let Some(shape) =
            learned.filter(|s| self.column_rules && s.fields.len() == columns.len())
        {
            let formats = vec![if overall == 1 { 1 } else { 0 }; shape.fields.len()];
            let plan = self.plan_for(&shape, &formats);
            self.copy = Some(Copy::Columns(format, plan, shape));
            return Ok(Verdict::Forward);
        }
        if self.column_rules {
            self.copy = Some(Copy::Refused);
            self.count_str("*", "copy refused", 1);
            return Ok(Verdict::Replace(
                CommandRefusal::CopyUnderColumnRules {
                    resource: self.resource.clone(),
                }
                .error(),
            ));
        }
        self.copy = Some(Copy::Masking(format));
        Ok(Verdict::Forward)
    }

    /// CopyData while a COPY TO runs.
    pub fn copy_data(&mut self, body: &[u8]) -> Result<Verdict, String> {
        let (format, plan, shape) = match &self.copy {
            None => return Ok(Verdict::Forward),
            Some(Copy::Refused) => return Ok(Verdict::Drop),
            Some(Copy::Masking(f)) => (*f, self.undescribed.clone(), None),
            Some(Copy::Columns(f, plan, shape)) => (*f, plan.clone(), Some(shape.clone())),
        };
        let mut out = vec![b'd', 0, 0, 0, 0];
        match plan.mask_copy_data(format, body, &mut out) {
            Ok(RowOutcome::Unchanged) => Ok(Verdict::Forward),
            Ok(RowOutcome::Rewritten(fields)) => {
                for f in &fields {
                    let name = shape
                        .as_ref()
                        .and_then(|s| s.fields.get(f.column))
                        .map_or("?", |c| c.name.as_str());
                    let name = name.to_string();
                    self.count(&name, f.reason);
                }
                Ok(Verdict::Replace(finish_message(out)))
            }
            Err(e) => Err(format!("COPY data from upstream: {e}")),
        }
    }

    /// CopyDone: whether to drop it (the COPY was refused).
    pub fn copy_done(&mut self) -> Verdict {
        match self.copy {
            Some(Copy::Refused) => Verdict::Drop,
            _ => Verdict::Forward,
        }
    }

    /// CommandComplete: `true` when it ends a refused COPY and must be dropped (the client
    /// already has its error).
    pub fn command_complete(&mut self) -> bool {
        self.current = None;
        matches!(self.copy.take(), Some(Copy::Refused))
    }

    /// ErrorResponse or NoticeResponse: values echoed in the message, detail, hint, context and
    /// internal query are masked like free text; with column rules, the values of a
    /// `Key (col)=(value)` detail whose column is masked, and a `Failing row contains (...)`
    /// detail, are withheld.
    pub fn error_or_notice(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, String> {
        if !self.masking {
            return Ok(Verdict::Forward);
        }
        let fields = backend::parse_fields(body)
            .map_err(|_| "malformed ErrorResponse from upstream".to_string())?;
        let mut changed = false;
        let mut owned: Vec<(u8, Vec<u8>)> = Vec::with_capacity(fields.len());
        for (t, v) in fields {
            let mut value = v.to_vec();
            if matches!(t, b'M' | b'D' | b'H' | b'W' | b'q' | b'P') {
                if t == b'D' && self.column_rules {
                    if let Some(redacted) = self.withhold_key_values(&value) {
                        value = redacted;
                        changed = true;
                        self.count_str("error detail", "column", 1);
                    }
                }
                if let Some(masked) = self.mask_free_text(&value, "error") {
                    value = masked;
                    changed = true;
                }
            }
            owned.push((t, value));
        }
        if !changed {
            return Ok(Verdict::Forward);
        }
        let refs: Vec<(u8, &[u8])> = owned.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        Ok(Verdict::Replace(backend::build_fields(tag, &refs)))
    }

    fn withhold_key_values(&self, detail: &[u8]) -> Option<Vec<u8>> {
        let text = String::from_utf8_lossy(detail);
        if let Some(rest) = text.strip_prefix("Failing row contains (") {
            let _ = rest;
            return Some([&b"Failing row contains ("[..], REDACTED, b")."].concat());
        }
        let rest = text.strip_prefix("Key (")?;
        let (cols, _) = rest.split_once(")=(")?;
        let masked_column = self.policy.rules().iter().any(|r| {
            r.applies_to(&self.groups)
                && (!r.types.is_empty()
                    || cols.split(',').any(|c| {
                        let c = c.trim().trim_matches('"');
                        r.columns.iter().any(|g| g.matches_column(None, c))
                    }))
        });
        if !masked_column {
            return None;
        }
        let values_start = 5 + cols.len() + 3;
        let values_end = text.rfind(')')?;
        if values_end < values_start {
            return None;
        }
        Some(
            [
                text[..values_start].as_bytes(),
                REDACTED,
                text[values_end..].as_bytes(),
            ]
            .concat(),
        )
    }

    fn mask_free_text(&mut self, value: &[u8], what: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match self.text.mask_value(0, value, &mut out) {
            tollgate_mask::Outcome::Unchanged => None,
            tollgate_mask::Outcome::Masked(reason) => {
                self.count(what, reason);
                Some(out)
            }
            tollgate_mask::Outcome::Null(reason) => {
                self.count(what, reason);
                Some(REDACTED.to_vec())
            }
        }
    }

    /// NotificationResponse: the payload is masked like free text.
    pub fn notification(&mut self, body: &[u8]) -> Result<Verdict, String> {
        if !self.masking {
            return Ok(Verdict::Forward);
        }
        let (pid, channel, payload) = backend::parse_notification(body)
            .map_err(|_| "malformed NotificationResponse from upstream".to_string())?;
        Ok(match self.mask_free_text(payload, "notification") {
            None => Verdict::Forward,
            Some(masked) => Verdict::Replace(backend::notification(pid, channel, &masked)),
        })
    }

    /// FunctionCallResponse: the result value has no described column; with column rules it is
    /// withheld, otherwise masked by content.
    pub fn function_result(&mut self, body: &[u8]) -> Result<Verdict, String> {
        if !self.masking || body.len() < 4 {
            return Ok(Verdict::Forward);
        }
        let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if len < 0 {
            return Ok(Verdict::Forward);
        }
        let value = body
            .get(4..4 + len as usize)
            .ok_or("malformed FunctionCallResponse")?;
        let null = || backend::message(b'V', &(-1i32).to_be_bytes());
        if self.column_rules {
            self.count_str("function result", "undescribed", 1);
            return Ok(Verdict::Replace(null()));
        }
        let mut out = Vec::new();
        Ok(match self.undescribed.mask_value(0, value, &mut out) {
            tollgate_mask::Outcome::Unchanged => Verdict::Forward,
            tollgate_mask::Outcome::Masked(reason) => {
                self.count("function result", reason);
                let mut b = (out.len() as i32).to_be_bytes().to_vec();
                b.extend_from_slice(&out);
                Verdict::Replace(backend::message(b'V', &b))
            }
            tollgate_mask::Outcome::Null(reason) => {
                self.count("function result", reason);
                Verdict::Replace(null())
            }
        })
    }

    fn count(&mut self, column: &str, reason: Reason) {
        self.count_str(column, &reason.to_string(), 1);
    }

    fn count_str(&mut self, column: &str, why: &str, n: u64) {
        match self
            .acc
            .masked
            .iter_mut()
            .find(|(c, w, _)| c == column && w == why)
        {
            Some(e) => e.2 += n,
            None => self.acc.masked.push((column.into(), why.into(), n)),
        }
    }

    /// What this command's `result` event adds: `masked` (column, by, values) and `capture`.
    /// Resets the accumulator for the next command.
    pub fn take_result_extra(&mut self) -> Option<ResultExtra> {
        let acc = std::mem::take(&mut self.acc);
        if acc.masked.is_empty() && acc.capture.is_none() {
            return None;
        }
        let mut extra = ResultExtra::default();
        if !acc.masked.is_empty() {
            let registry = tollgate_metrics::registry();
            let mut list = Vec::with_capacity(acc.masked.len());
            for (column, by, values) in acc.masked {
                let kind = if by.starts_with("mask rule") {
                    "column"
                } else {
                    by.as_str()
                };
                registry
                    .counter(
                        "tollgate_masked_values_total",
                        "Values masked in responses, by resource and detector (or column rule).",
                        &[("resource", &self.resource), ("by", kind)],
                    )
                    .add(values as i64);
                list.push(MaskedCount { column, by, values });
            }
            extra.masked = list;
        }
        extra.capture = acc.capture.map(|cap| RowCapture {
            columns: cap.columns,
            rows: cap.rows,
            truncated: cap.truncated || acc.more_sets,
        });
        Some(extra)
    }
}

impl Shape {
    fn new(fields: Vec<RowField>) -> Shape {
        Shape {
            fields,
            text_plan: OnceLock::new(),
            audit_text_plan: OnceLock::new(),
        }
    }
}

/// Distinct result shapes a session keeps (a session with more starts over).
const MAX_SHAPES: usize = 256;

/// The columns of a result, in the formats Bind asked for, as the masking engine sees them.
fn columns_of(shape: &Shape, formats: &[i16]) -> Vec<ColumnInfo> {
    shape
        .fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let format = Format::from_code(format_code(formats, i));
            column_info(&f.name, None, f.type_oid, format)
        })
        .collect()
}

/// The format code of column `i` under Bind's result-format rules (none: text; one: all).
fn format_code(formats: &[i16], i: usize) -> i16 {
    match formats.len() {
        0 => 0,
        1 => formats[0],
        _ => formats.get(i).copied().unwrap_or(0),
    }
}

/// Writes the length of a message built in place (`tag`, 4 placeholder bytes, body).
fn finish_message(mut msg: Vec<u8>) -> Vec<u8> {
    let len = (msg.len() - 1) as i32;
    msg[1..5].copy_from_slice(&len.to_be_bytes());
    msg
}

/// The format a `COPY ... TO STDOUT` statement asks for, from its options (`FORMAT csv`, `CSV`,
/// `DELIMITER 'x'`, `QUOTE 'x'`, `ESCAPE 'x'`). Binary COPY is told by the CopyOutResponse.
pub(crate) fn copy_format_of(sql: &str) -> Option<CopyFormat> {
    let lower = sql.to_ascii_lowercase();
    let trimmed = lower.trim_start();
    if !trimmed.starts_with("copy") {
        return None;
    }
    let csv = lower.contains("csv");
    let option = |name: &str| -> Option<u8> {
        let at = lower.find(name)? + name.len();
        let rest = sql[at..].trim_start();
        let rest = rest.strip_prefix("as").map(str::trim_start).unwrap_or(rest);
        let rest = rest.strip_prefix('E').unwrap_or(rest);
        let mut chars = rest.strip_prefix('\'')?.chars();
        let c = chars.next()?;
        if c == '\\' && rest.as_bytes().get(2) == Some(&b't') {
            return Some(b'\t');
        }
        u8::try_from(c as u32).ok()
    };
    if csv {
        let quote = option("quote").unwrap_or(b'"');
        Some(CopyFormat::Csv {
            delimiter: option("delimiter").unwrap_or(b','),
            quote,
            escape: option("escape").unwrap_or(quote),
        })
    } else {
        Some(CopyFormat::Text {
            delimiter: option("delimiter").unwrap_or(b'\t'),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tollgate_mask::MaskSpec;

    fn policy(specs: &[MaskSpec]) -> Arc<Policy> {
        Arc::new(Policy::from_specs(specs, None).unwrap())
    }

    fn row_description(cols: &[(&str, u32)]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (name, oid) in cols {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&0i32.to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes());
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&(-1i16).to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes());
        }
        b
    }

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
            }
        }
        b
    }

    fn fields_of(msg: &[u8]) -> Vec<Option<String>> {
        backend::parse_data_row(&msg[5..])
            .unwrap()
            .into_iter()
            .map(|f| f.map(|v| String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    fn spec(columns: &[&str], detectors: &[&str], strategy: &str) -> MaskSpec {
        MaskSpec {
            columns: columns.iter().map(|s| s.to_string()).collect(),
            detectors: detectors.iter().map(|s| s.to_string()).collect(),
            strategy: strategy.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_to_do_without_rules_or_capture() {
        assert!(Filter::new(None, None, &[], None, "r").is_none());
        let p = policy(&[MaskSpec {
            except_groups: vec!["sre".into()],
            ..spec(&["email"], &[], "redact")
        }]);
        assert!(Filter::new(Some(p.clone()), None, &["sre".into()], None, "r").is_none());
        assert!(Filter::new(Some(p), None, &["agents".into()], None, "r").is_some());
    }

    #[test]
    fn simple_query_rows_are_masked_by_column_and_content() {
        let p = policy(&[spec(&["email"], &["credit_card"], "redact")]);
        let mut f = Filter::new(Some(p), None, &[], Some(1 << 16), "r").unwrap();
        f.row_description(&row_description(&[
            ("id", 23),
            ("email", 25),
            ("notes", 25),
        ]))
        .unwrap();
        let v = f
            .data_row(&data_row(&[
                Some("1"),
                Some("alice@example.com"),
                Some("card 4242 4242 4242 4242 ok"),
            ]))
            .unwrap();
        let Verdict::Replace(msg) = v else {
            panic!("row was not rewritten")
        };
        let got = fields_of(&msg);
        assert_eq!(got[0].as_deref(), Some("1"));
        assert!(!got[1].as_deref().unwrap().contains("alice"));
        assert!(!got[2].as_deref().unwrap().contains("4242 4242 4242"));
        assert!(got[2].as_deref().unwrap().starts_with("card "));
        // A clean row is forwarded as is.
        assert_eq!(
            f.data_row(&data_row(&[Some("2"), None, Some("nothing here")]))
                .unwrap(),
            Verdict::Forward
        );
        let extra = f.take_result_extra().unwrap();
        let extra = json!({"masked": extra.masked, "capture": extra.capture});
        let text = extra.to_string();
        assert!(!text.contains("alice"), "{text}");
        assert_eq!(extra["capture"]["columns"], json!(["id", "email", "notes"]));
        assert_eq!(extra["capture"]["rows"].as_array().unwrap().len(), 2);
        assert!(text.contains("mask rule 1"), "{text}");
        assert!(text.contains("credit_card"), "{text}");
    }

    #[test]
    fn extended_portals_use_the_statement_shape_and_bind_formats() {
        let p = policy(&[spec(&["email"], &[], "redact")]);
        let mut f = Filter::new(Some(p), None, &[], None, "r").unwrap();
        f.parsed("s1");
        f.described(b'S', "s1", Some(&row_description(&[("email", 25)])))
            .unwrap();
        f.bound("", "s1", vec![]);
        f.execute_rows("");
        let Verdict::Replace(msg) = f.data_row(&data_row(&[Some("bob@example.com")])).unwrap()
        else {
            panic!("not masked")
        };
        assert!(!fields_of(&msg)[0].as_deref().unwrap().contains("bob"));
        f.result_done();
        // A portal of a never-described statement: withheld, because a column rule applies.
        f.parsed("s2");
        f.bound("p2", "s2", vec![]);
        f.execute_rows("p2");
        let Verdict::Replace(msg) = f.data_row(&data_row(&[Some("bob@example.com")])).unwrap()
        else {
            panic!("not withheld")
        };
        assert_eq!(fields_of(&msg), vec![None]);
    }

    #[test]
    fn copy_is_refused_under_column_rules_and_masked_by_content_otherwise() {
        let copy_out = [0u8, 0, 1, 0, 0];
        let p = policy(&[spec(&["email"], &[], "redact")]);
        let mut f = Filter::new(Some(p), None, &[], None, "orders").unwrap();
        let Verdict::Replace(err) = f.copy_out(&copy_out, None).unwrap() else {
            panic!("COPY not refused")
        };
        assert_eq!(err[0], b'E');
        assert!(String::from_utf8_lossy(&err).contains("42501"));
        assert_eq!(
            f.copy_data(b"1\talice@example.com\n").unwrap(),
            Verdict::Drop
        );
        assert_eq!(f.copy_done(), Verdict::Drop);
        assert!(f.command_complete());

        let p = policy(&[spec(&[], &["email"], "redact")]);
        let mut f = Filter::new(Some(p), None, &[], None, "orders").unwrap();
        assert_eq!(
            f.copy_out(&copy_out, copy_format_of("COPY t TO STDOUT"))
                .unwrap(),
            Verdict::Forward
        );
        let Verdict::Replace(m) = f.copy_data(b"1\talice@example.com\n").unwrap() else {
            panic!("COPY data not masked")
        };
        assert!(!String::from_utf8_lossy(&m).contains("alice"));
        assert!(!f.command_complete());
    }

    #[test]
    fn error_details_do_not_echo_masked_values() {
        let p = policy(&[spec(&["email"], &["email"], "redact")]);
        let mut f = Filter::new(Some(p), None, &[], None, "r").unwrap();
        let body = [
            &b"SERROR\0C23505\0Mduplicate key value violates unique constraint \"u\"\0"[..],
            b"DKey (email)=(alice@example.com) already exists.\0\0",
        ]
        .concat();
        let Verdict::Replace(m) = f.error_or_notice(b'E', &body).unwrap() else {
            panic!("detail not masked")
        };
        let text = String::from_utf8_lossy(&m);
        assert!(!text.contains("alice"), "{text}");
        assert!(text.contains("Key (email)=("), "{text}");
        assert!(text.contains(") already exists."), "{text}");
        let body = b"SERROR\0C23502\0Mnull value\0DFailing row contains (1, 123-45-6789).\0\0";
        let Verdict::Replace(m) = f.error_or_notice(b'E', body).unwrap() else {
            panic!("failing row not withheld")
        };
        assert!(!String::from_utf8_lossy(&m).contains("6789"));
    }

    #[test]
    fn notification_payloads_are_masked() {
        let p = policy(&[spec(&[], &["email"], "redact")]);
        let mut f = Filter::new(Some(p), None, &[], None, "r").unwrap();
        let body = [
            &7i32.to_be_bytes()[..],
            b"ch\0user carol@example.com signed up\0",
        ]
        .concat();
        let Verdict::Replace(m) = f.notification(&body).unwrap() else {
            panic!("payload not masked")
        };
        let (pid, ch, payload) = backend::parse_notification(&m[5..]).unwrap();
        assert_eq!((pid, ch), (7, &b"ch"[..]));
        assert!(!String::from_utf8_lossy(payload).contains("carol"));
    }

    #[test]
    fn copy_options_are_read_from_the_statement() {
        assert_eq!(copy_format_of("select 1"), None);
        assert_eq!(copy_format_of("COPY t TO STDOUT"), Some(CopyFormat::TEXT));
        assert_eq!(
            copy_format_of("copy t to stdout with (format csv, delimiter ';')"),
            Some(CopyFormat::Csv {
                delimiter: b';',
                quote: b'"',
                escape: b'"'
            })
        );
        assert_eq!(
            copy_format_of("COPY t TO STDOUT CSV"),
            Some(CopyFormat::CSV)
        );
    }
}
