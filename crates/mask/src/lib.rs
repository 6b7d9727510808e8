//! The masking engine: finds sensitive content and replaces it, inline, at wire speed.
//!
//! It owns the content detectors ([`Detector`]: e-mail, payment card, US SSN, IBAN, phone,
//! IPv4/IPv6, JWT, AWS key, secret token, PEM private key, each validated so that it does not
//! fire on noise), the masking rules ([`MaskSpec`] → [`Policy`], with column globs, types,
//! detectors and per-group exemptions), the strategies ([`Strategy`]: redact, partial, keyed
//! hash, null) and the rewriting of values: one field of a row ([`RowPlan::mask_value`]),
//! free text ([`mask_text`]) such as error details and notification payloads, and HTTP bodies
//! as they stream ([`BodyMasker`]: JSON with paths and detectors, or text).
//!
//! It must not do I/O, parse a wire protocol, hold session state, or decide access: a protocol
//! adapter describes the columns ([`ColumnInfo`]: a neutral [`FieldType`] and [`Encoding`]
//! it maps from its own column types), asks the policy for a [`RowPlan`] once per
//! result shape, and passes each value through it (PostgreSQL's DataRow and COPY formats are
//! walked by the PostgreSQL adapter). It never logs, stores or returns an original value;
//! [`Reason`]s for the audit record name the rule or detector, not the data, and the
//! [`MaskKey`] behind `hash` is never printed.

mod body;
mod detect;
mod glob;
mod json_path;
mod policy;
mod prefilter;
mod strategy;
mod value;

pub use body::{
    BodyError, BodyKind, BodyMasker, BodyPlan, BodySummary, MAX_DEPTH, MAX_KEY, MAX_SCALAR,
    TEXT_LINE_HOLD, TEXT_MAX_HOLD, TEXT_TAIL,
};
pub use detect::{find, matches, Detector, DetectorSet, Match, Matches, UnknownDetector};
pub use glob::Glob;
pub use json_path::{BadJsonPath, JsonPath, PathSeg};
pub use policy::{
    ColumnInfo, Encoding, FieldType, MaskSpec, Outcome, Policy, PolicyError, Reason, RowPlan, Rule,
};
pub use strategy::{
    KeyError, MaskKey, Strategy, UnknownStrategy, DEFAULT_KEEP_LAST, MIN_KEY_BYTES, REDACTED,
};
pub use value::mask_text;
