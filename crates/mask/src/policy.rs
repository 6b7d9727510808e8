//! Masking rules as configured, compiled into a [`Policy`], and planned per result shape.
//!
//! A rule selects what it masks in two independent ways:
//! - `columns` (globs) and `types` ([`FieldType`] names, onto which each protocol adapter maps
//!   its own column types): the *whole value* of every matching column is masked;
//! - `detectors`: matches in the *content* of every column of the result are masked (only the
//!   matched spans, so `notes` keeps its prose and loses the card number).
//!
//! A rule applies to a viewer unless one of their groups is in `except_groups` ("the SRE
//! on-call sees more"), and, when `only_groups` is set, only to members of those groups. When
//! several rules pick the same column or detector, the first one (in configuration order) wins.

use crate::detect::{Detector, DetectorSet};
use crate::glob::Glob;
use crate::strategy::{MaskKey, Strategy};
use serde::Deserialize;
use std::sync::Arc;

/// One `[[resources.masks]]` table, as written in configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MaskSpec {
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Paths inside json/jsonb values (`$.email`, `$.cards[*].number`, `$..ssn`): the selected
    /// values are masked, in the `columns` given or in every JSON column when none are.
    #[serde(default)]
    pub json_paths: Vec<String>,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// For `partial`: how many trailing characters stay visible (default 4).
    #[serde(default)]
    pub keep_last: Option<usize>,
    #[serde(default)]
    pub except_groups: Vec<String>,
    #[serde(default)]
    pub only_groups: Vec<String>,
}

fn default_strategy() -> String {
    "redact".into()
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub columns: Vec<Glob>,
    pub types: Vec<FieldType>,
    pub detectors: DetectorSet,
    pub json_paths: Vec<crate::json_path::JsonPath>,
    pub strategy: Strategy,
    pub except_groups: Vec<String>,
    pub only_groups: Vec<String>,
}

impl Rule {
    pub fn applies_to(&self, groups: &[String]) -> bool {
        if groups.iter().any(|g| self.except_groups.contains(g)) {
            return false;
        }
        self.only_groups.is_empty() || groups.iter().any(|g| self.only_groups.contains(g))
    }

    /// The whole value of `col` (a rule with JSON paths masks inside the value instead).
    fn selects_column(&self, col: &ColumnInfo) -> bool {
        self.json_paths.is_empty() && self.matches_column(col)
    }

    fn matches_column(&self, col: &ColumnInfo) -> bool {
        col.field_type.is_some_and(|t| self.types.contains(&t))
            || self
                .columns
                .iter()
                .any(|g| g.matches_column(col.table.as_deref(), &col.name))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("mask rule {rule}: {source}")]
    Detector {
        rule: usize,
        source: crate::detect::UnknownDetector,
    },
    #[error("mask rule {rule}: {source}")]
    Strategy {
        rule: usize,
        source: crate::strategy::UnknownStrategy,
    },
    #[error("mask rule {rule}: unknown column type {name:?} (known: {known})")]
    Type {
        rule: usize,
        name: String,
        known: String,
    },
    #[error("mask rule {rule}: strategy \"hash\" needs a masking key (at least 32 bytes), and none was configured")]
    HashWithoutKey { rule: usize },
    #[error("mask rule {rule}: keep_last only applies to strategy \"partial\"")]
    KeepLastWithoutPartial { rule: usize },
    #[error("mask rule {rule}: selects nothing (give columns, types, detectors or json_paths)")]
    Empty { rule: usize },
    #[error("mask rule {rule}: {source}")]
    JsonPath {
        rule: usize,
        source: crate::json_path::BadJsonPath,
    },
}

/// A column type as masking rules name it (`types = ["inet"]`). The names are the SQL ones
/// PostgreSQL spells; each protocol adapter maps its own column types onto them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    Bool,
    Bytea,
    Name,
    Int8,
    Int2,
    Int4,
    Text,
    Oid,
    Json,
    Xml,
    Cidr,
    Float4,
    Float8,
    Money,
    Macaddr,
    Inet,
    Bpchar,
    Varchar,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Interval,
    Numeric,
    Uuid,
    Jsonb,
}

impl FieldType {
    /// Every type `types` accepts, with its configuration name.
    pub const ALL: &'static [(&'static str, FieldType)] = &[
        ("bool", FieldType::Bool),
        ("bytea", FieldType::Bytea),
        ("name", FieldType::Name),
        ("int8", FieldType::Int8),
        ("int2", FieldType::Int2),
        ("int4", FieldType::Int4),
        ("text", FieldType::Text),
        ("oid", FieldType::Oid),
        ("json", FieldType::Json),
        ("xml", FieldType::Xml),
        ("cidr", FieldType::Cidr),
        ("float4", FieldType::Float4),
        ("float8", FieldType::Float8),
        ("money", FieldType::Money),
        ("macaddr", FieldType::Macaddr),
        ("inet", FieldType::Inet),
        ("bpchar", FieldType::Bpchar),
        ("varchar", FieldType::Varchar),
        ("date", FieldType::Date),
        ("time", FieldType::Time),
        ("timestamp", FieldType::Timestamp),
        ("timestamptz", FieldType::Timestamptz),
        ("interval", FieldType::Interval),
        ("numeric", FieldType::Numeric),
        ("uuid", FieldType::Uuid),
        ("jsonb", FieldType::Jsonb),
    ];

    /// The type a configuration name (any case) stands for.
    pub fn from_name(name: &str) -> Option<FieldType> {
        FieldType::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, t)| *t)
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        FieldType::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("", |(n, _)| n)
    }
}

impl std::fmt::Display for FieldType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The masking rules of one resource, and the key for `hash`.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    key: Option<Arc<MaskKey>>,
}

impl Policy {
    pub fn new(rules: Vec<Rule>, key: Option<MaskKey>) -> Result<Policy, PolicyError> {
        if key.is_none() {
            if let Some(rule) = rules.iter().position(|r| r.strategy == Strategy::Hash) {
                return Err(PolicyError::HashWithoutKey { rule });
            }
        }
        Ok(Policy {
            rules,
            key: key.map(Arc::new),
        })
    }

    /// Compiles configuration tables; errors name the rule by its index.
    pub fn from_specs(specs: &[MaskSpec], key: Option<MaskKey>) -> Result<Policy, PolicyError> {
        let mut rules = Vec::with_capacity(specs.len());
        for (rule, spec) in specs.iter().enumerate() {
            let mut strategy: Strategy = spec
                .strategy
                .parse()
                .map_err(|source| PolicyError::Strategy { rule, source })?;
            match (&mut strategy, spec.keep_last) {
                (Strategy::Partial { keep_last }, Some(k)) => *keep_last = k,
                (_, Some(_)) => return Err(PolicyError::KeepLastWithoutPartial { rule }),
                _ => {}
            }
            let detectors = spec
                .detectors
                .iter()
                .map(|d| d.parse::<Detector>())
                .collect::<Result<DetectorSet, _>>()
                .map_err(|source| PolicyError::Detector { rule, source })?;
            let types = spec
                .types
                .iter()
                .map(|name| {
                    FieldType::from_name(name).ok_or_else(|| PolicyError::Type {
                        rule,
                        name: name.clone(),
                        known: FieldType::ALL
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let json_paths = spec
                .json_paths
                .iter()
                .map(|p| crate::json_path::JsonPath::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| PolicyError::JsonPath { rule, source })?;
            if spec.columns.is_empty()
                && types.is_empty()
                && detectors.is_empty()
                && json_paths.is_empty()
            {
                return Err(PolicyError::Empty { rule });
            }
            rules.push(Rule {
                columns: spec.columns.iter().map(|c| Glob::new(c)).collect(),
                types,
                detectors,
                json_paths,
                strategy,
                except_groups: spec.except_groups.clone(),
                only_groups: spec.only_groups.clone(),
            });
        }
        Policy::new(rules, key)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub(crate) fn key(&self) -> Option<&Arc<MaskKey>> {
        self.key.as_ref()
    }

    /// The plan for one result shape (one RowDescription) as seen by a viewer in `groups`.
    pub fn plan(&self, columns: &[ColumnInfo], groups: &[String]) -> RowPlan {
        let applicable: Vec<(usize, &Rule)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.applies_to(groups))
            .collect();
        let cols = columns
            .iter()
            .map(|col| self.column_plan(col, &applicable))
            .collect::<Vec<_>>();
        let active = cols.iter().any(ColumnPlan::is_active);
        RowPlan {
            cols,
            extra: None,
            key: self.key.clone(),
            active,
        }
    }

    /// A plan for data whose columns are not described (COPY without a column list, free text):
    /// every field, however many, gets the content detectors as text; column and type rules
    /// cannot apply.
    pub fn plan_undescribed(&self, groups: &[String]) -> RowPlan {
        let applicable: Vec<(usize, &Rule)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.applies_to(groups))
            .collect();
        let anon = ColumnInfo {
            name: String::new(),
            table: None,
            field_type: None,
            encoding: Encoding::Text,
        };
        let mut plan = self.column_plan(&anon, &applicable);
        plan.whole = None;
        let active = plan.is_active();
        RowPlan {
            cols: Vec::new(),
            extra: Some(plan),
            key: self.key.clone(),
            active,
        }
    }

    /// Detectors and their strategies for free text (error details, notification payloads).
    pub fn text_plan(&self, groups: &[String]) -> RowPlan {
        self.plan_undescribed(groups)
    }

    fn column_plan(&self, col: &ColumnInfo, rules: &[(usize, &Rule)]) -> ColumnPlan {
        let mut plan = ColumnPlan {
            kind: col.encoding,
            whole: None,
            detectors: DetectorSet::EMPTY,
            strategies: [Strategy::Redact; 11],
            json_paths: Vec::new(),
        };
        let json = matches!(plan.kind, Encoding::Json | Encoding::VersionedJson);
        for &(idx, rule) in rules {
            if plan.whole.is_none() && rule.selects_column(col) {
                plan.whole = Some((rule.strategy, Reason::Column { rule: idx }));
            }
            let in_scope =
                rule.columns.is_empty() && rule.types.is_empty() || rule.matches_column(col);
            // A column the rule names is searched for its paths even as text (`profile::text`).
            let named_text = plan.kind == Encoding::Text && rule.matches_column(col);
            if (json && in_scope) || named_text {
                plan.json_paths.extend(
                    rule.json_paths
                        .iter()
                        .map(|p| (p.clone(), rule.strategy, idx)),
                );
            }
            for d in rule.detectors.iter() {
                if !plan.detectors.contains(d) {
                    plan.detectors.insert(d);
                    plan.strategies[d as usize] = rule.strategy;
                }
            }
        }
        if !plan.kind.scannable() {
            plan.detectors = DetectorSet::EMPTY;
        }
        plan
    }
}

/// What a protocol adapter knows about one result column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// The source table (`customers` or `public.customers`) when known.
    pub table: Option<String>,
    /// The type `types` rules match; `None` when the adapter has no name for it.
    pub field_type: Option<FieldType>,
    /// How the column's values are written, as the adapter receives them.
    pub encoding: Encoding,
}

/// Why a value was masked (for the audit record; never carries the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A content detector matched.
    Detector(Detector),
    /// A column or type rule (index into the configured rules) selected the column.
    Column { rule: usize },
}

/// How audit records name a reason: the detector, or `mask rule N` (1-based, as configured).
impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Detector(d) => write!(f, "{d}"),
            Reason::Column { rule } => write!(f, "mask rule {}", rule + 1),
        }
    }
}

/// The result of masking one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to mask; nothing was written, forward the original.
    Unchanged,
    /// The masked value was appended to `out`.
    Masked(Reason),
    /// The value must become SQL NULL (strategy `null`, or no type-correct mask exists).
    Null(Reason),
}

/// How a column's values are written, which decides how they can be masked. The adapter
/// derives it from its column type and wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Text, or bytes where any replacement is type-correct: masked in place.
    Text,
    /// JSON text: masked inside strings and numbers, kept valid JSON.
    Json,
    /// One version byte, then JSON text (PostgreSQL's binary jsonb).
    VersionedJson,
    /// The text rendering of a non-text type (a number, an address): a match makes it NULL.
    TypedText,
    /// A big-endian 64-bit signed integer: rendered in decimal for the digit detectors; a match
    /// makes it NULL.
    BigEndianI64,
    /// Bytes of an unknown layout: scanned raw; a match makes it NULL.
    Opaque,
    /// A value that cannot carry free text (a binary number, a date, a boolean, a UUID):
    /// nothing to scan.
    Fixed,
}

impl Encoding {
    fn scannable(self) -> bool {
        self != Encoding::Fixed
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ColumnPlan {
    pub(crate) kind: Encoding,
    pub(crate) whole: Option<(Strategy, Reason)>,
    pub(crate) detectors: DetectorSet,
    pub(crate) strategies: [Strategy; 11],
    /// For json/jsonb columns: paths to mask inside the value, with strategy and rule index.
    pub(crate) json_paths: Vec<(crate::json_path::JsonPath, Strategy, usize)>,
}

impl ColumnPlan {
    fn is_active(&self) -> bool {
        self.whole.is_some() || !self.detectors.is_empty() || !self.json_paths.is_empty()
    }
}

/// The masking plan for one result shape, computed once per RowDescription.
#[derive(Debug, Clone)]
pub struct RowPlan {
    pub(crate) cols: Vec<ColumnPlan>,
    /// For undescribed data: the plan of every field.
    pub(crate) extra: Option<ColumnPlan>,
    pub(crate) key: Option<Arc<MaskKey>>,
    pub(crate) active: bool,
}

impl RowPlan {
    /// A plan that masks nothing (for example after an approved bypass review, which the caller
    /// records).
    pub fn passthrough() -> RowPlan {
        RowPlan {
            cols: Vec::new(),
            extra: None,
            key: None,
            active: false,
        }
    }

    /// False when no value of this shape can ever be masked: the caller may skip the rows.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Number of described columns (0 for an undescribed plan).
    pub fn columns(&self) -> usize {
        self.cols.len()
    }

    /// The number of fields every row of this shape has: `None` for an undescribed plan,
    /// which masks any number of fields alike.
    pub fn fixed_columns(&self) -> Option<usize> {
        self.extra.is_none().then_some(self.cols.len())
    }

    pub(crate) fn column(&self, idx: usize) -> Option<&ColumnPlan> {
        self.cols.get(idx).or(self.extra.as_ref())
    }

    /// Masks one non-NULL value of column `col`. Appends the masked value to `out` only when the
    /// outcome is [`Outcome::Masked`]; columns beyond the plan are left unchanged.
    #[inline]
    pub fn mask_value(&self, col: usize, value: &[u8], out: &mut Vec<u8>) -> Outcome {
        match self.column(col) {
            Some(plan) if self.active => {
                crate::value::mask_value(plan, self.key.as_deref(), value, out)
            }
            _ => Outcome::Unchanged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values_are_not_scanned_by_the_digit_detectors() {
        let p = Policy::from_specs(
            &[MaskSpec {
                detectors: vec!["phone".into(), "credit_card".into()],
                strategy: "redact".into(),
                ..Default::default()
            }],
            None,
        )
        .unwrap();
        let cols = [
            ColumnInfo {
                name: "at".into(),
                table: None,
                field_type: Some(FieldType::Timestamptz),
                encoding: Encoding::Fixed,
            },
            ColumnInfo {
                name: "note".into(),
                table: None,
                field_type: Some(FieldType::Text),
                encoding: Encoding::Text,
            },
        ];
        let plan = p.plan(&cols, &[]);
        let mut out = Vec::new();
        assert_eq!(
            plan.mask_value(0, b"2024-08-08 08:50:05.532057-05", &mut out),
            Outcome::Unchanged
        );
        assert_ne!(
            plan.mask_value(1, b"call +1 415 555 0100", &mut out),
            Outcome::Unchanged
        );
    }

    fn col(name: &str, table: Option<&str>, field_type: FieldType) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            table: table.map(Into::into),
            field_type: Some(field_type),
            encoding: Encoding::Text,
        }
    }

    fn spec(columns: &[&str], detectors: &[&str], strategy: &str) -> MaskSpec {
        MaskSpec {
            columns: columns.iter().map(|s| s.to_string()).collect(),
            detectors: detectors.iter().map(|s| s.to_string()).collect(),
            strategy: strategy.into(),
            ..MaskSpec::default()
        }
    }

    #[test]
    fn config_errors_name_the_rule_and_the_fix() {
        let e = Policy::from_specs(
            &[spec(&["a"], &[], "redact"), spec(&[], &["ssn"], "redact")],
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("mask rule 1: unknown detector \"ssn\""),
            "{e}"
        );
        let e = Policy::from_specs(&[spec(&["a"], &[], "hash")], None).unwrap_err();
        assert_eq!(e, PolicyError::HashWithoutKey { rule: 0 });
        assert!(Policy::from_specs(&[spec(&["a"], &[], "scramble")], None)
            .unwrap_err()
            .to_string()
            .contains("redact, partial"));
        assert_eq!(
            Policy::from_specs(&[spec(&[], &[], "redact")], None).unwrap_err(),
            PolicyError::Empty { rule: 0 }
        );
        let mut s = spec(&["a"], &[], "redact");
        s.keep_last = Some(2);
        assert_eq!(
            Policy::from_specs(&[s], None).unwrap_err(),
            PolicyError::KeepLastWithoutPartial { rule: 0 }
        );
        let mut s = spec(&[], &[], "null");
        s.types = vec!["inet".into(), "geometry".into()];
        assert!(Policy::from_specs(&[s], None)
            .unwrap_err()
            .to_string()
            .contains("unknown column type \"geometry\""));
    }

    #[test]
    fn spec_deserializes_from_the_config_shape() {
        #[derive(Deserialize)]
        struct Wrapper {
            masks: Vec<MaskSpec>,
        }
        let w: Wrapper = serde_json::from_str(
            r#"{"masks":[{"columns":["email","*ssn*"],"detectors":["credit_card"],"strategy":"partial","except_groups":["sre"]}]}"#,
        )
        .unwrap();
        let p = Policy::from_specs(&w.masks, None).unwrap();
        assert_eq!(p.rules()[0].strategy, Strategy::Partial { keep_last: 4 });
        assert!(
            serde_json::from_str::<MaskSpec>(r#"{"colums":["x"]}"#).is_err(),
            "unknown keys are errors"
        );
    }

    #[test]
    fn first_rule_wins_and_groups_exempt() {
        let mut sre_sees = spec(&["email"], &[], "partial");
        sre_sees.except_groups = vec!["sre".into()];
        let p = Policy::from_specs(&[sre_sees, spec(&["e*"], &["iban"], "redact")], None).unwrap();
        let cols = [
            col("email", Some("users"), FieldType::Text),
            col("name", None, FieldType::Text),
        ];
        let agent = p.plan(&cols, &["agents".into()]);
        assert_eq!(
            agent.cols[0].whole,
            Some((
                Strategy::Partial { keep_last: 4 },
                Reason::Column { rule: 0 }
            ))
        );
        assert_eq!(agent.cols[1].whole, None);
        assert!(agent.cols[1].detectors.contains(Detector::Iban));
        let sre = p.plan(&cols, &["sre".into(), "agents".into()]);
        assert_eq!(
            sre.cols[0].whole,
            Some((Strategy::Redact, Reason::Column { rule: 1 }))
        );
    }

    #[test]
    fn only_groups_and_types() {
        let mut s = spec(&[], &[], "null");
        s.types = vec!["INET".into()];
        s.only_groups = vec!["contractors".into()];
        let p = Policy::from_specs(&[s], None).unwrap();
        let cols = [col("client_addr", None, FieldType::Inet)];
        assert!(p.plan(&cols, &["contractors".into()]).is_active());
        assert!(!p.plan(&cols, &["staff".into()]).is_active());
    }
}
