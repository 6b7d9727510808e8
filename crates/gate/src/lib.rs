//! The protocol-neutral core every adapter (PostgreSQL, HTTP, later MCP and MySQL) stands on:
//! who is calling ([`authn`]), whether they may reach a resource, with just-in-time access and
//! unmask grants ([`access`]), the rules over a neutral [`rules::Command`] that give a
//! [`rules::Decision`], the review hold ([`hold`]), and a session's audit log with typed events
//! ([`session`], [`event`]), the connection caps every listener applies ([`limits`]), the watch
//! that ends a session whose certificate, token or grant ended ([`standing`]), and the registry
//! of the gateway's own upstream connections that `tollgate scan` reads ([`upstreams`]).
//!
//! It must not parse a wire protocol or write to a socket: an adapter translates its protocol
//! into these types and turns the answers back into its own errors (SQLSTATE, HTTP status).

pub mod access;
pub mod authn;
pub mod event;
pub mod hold;
pub mod limits;
pub mod masks;
pub mod rules;
pub mod session;
pub mod standing;
pub mod upstreams;

pub use access::{authorize, Access, Forbidden};
pub use authn::{identify, verify_token, AuthError};
pub use event::Event;
pub use hold::{hold, HoldOutcome};
pub use rules::{Command, Decision, RuleSet};
pub use session::SessionLog;
pub use tollgate_identity::{AuthMethod, Identity, Principal};
