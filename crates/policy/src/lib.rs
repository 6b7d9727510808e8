//! The policy engine for SQL resources: what a statement is, and whether it may run.
//!
//! It owns statement classification with PostgreSQL's own grammar ([`classify`]: libpg_query
//! through the `pg_query` crate, so comments, casing, quoting, CTEs and multi-statement
//! strings are read as the server reads them), and the rule engine ([`ResourcePolicy`],
//! [`SessionPolicy`]) that turns a resource's `[[resources.rules]]`, `read_only` and
//! `unparsable` settings into a [`Decision`] per command, remembering prepared statements per
//! session so that `EXECUTE` and protocol-level Bind are judged by what they run.
//!
//! It must not do I/O, parse a wire protocol or hold connections: a protocol adapter passes
//! SQL text, statement names and the caller in, and acts on the decision. Deny messages are
//! written for the client and carry no parser or internal detail.

mod bounds;
mod cache;
mod classify;
mod engine;
mod glob;
mod literals;
mod pooling;
mod walk;

pub use bounds::{bounded, nesting_depth, BoundError, INLINE_DEPTH, MAX_DEPTH};
pub use cache::{ClassifyCache, MAX_CACHED_TEXT};
pub use classify::{classify, Classification, Classified, DdlVerb, Kind, Statement, TxOp};
pub use engine::{
    Caller, Confirmation, Decision, FunctionCatalog, Judgement, LimitError, PolicyError,
    ResourcePolicy, SessionPolicy, CATALOG_QUERY, WRITING_FUNCTIONS,
};
pub use literals::{copy_to_stdout_source, value_spans};
pub use pooling::{
    reset_statement, resets, session_state, setting_change, SessionState, SettingChange,
};
pub use walk::Dml;
