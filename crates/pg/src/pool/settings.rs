//! Session settings under transaction pooling (pure, no I/O): a client's `SET`, `RESET` and
//! `RESET ALL` are followed from the message that runs them to the server's answer, and what
//! the server confirmed outside a transaction block is recorded, for the client (applied again
//! on whichever connection serves it next) and for the connection it ran on.

use crate::proto::frame::Malformed;
use std::collections::{BTreeMap, HashMap, VecDeque};
use tollgate_policy::{setting_change, SettingChange};

/// Settings by lower-case name: the `SET` statement that gives each its value.
pub(crate) type Settings = BTreeMap<String, String>;

/// What the client is told in place of a `SET` that would run inside a transaction block (or
/// after other statements of its pipeline, which may have opened one): the server raises it,
/// so the transaction and the pipeline fail exactly as for any error.
pub(crate) const SET_IN_TRANSACTION: &str = "DO $tollgate$BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', MESSAGE = 'session-level SET inside a transaction block (or after other statements in one pipeline) is not supported on this resource: its connections are shared between transactions (pool_mode = \"transaction\")', HINT = 'use SET LOCAL inside the transaction, or send the SET on its own outside it'; END$tollgate$";

/// Apply one confirmed change to a map of settings.
pub(crate) fn apply(settings: &mut Settings, change: &SettingChange) {
    match change {
        SettingChange::Set { name, statement } => {
            settings.insert(name.clone(), statement.clone());
        }
        SettingChange::Reset { name } => {
            settings.remove(name);
        }
        SettingChange::ResetAll => settings.clear(),
    }
}

/// The one simple query that moves a connection from `has` to `wants`, or `None` when they are
/// the same (the common case: no round trip).
pub(crate) fn reapply(has: &Settings, wants: &Settings) -> Option<String> {
    if has == wants {
        return None;
    }
    let mut sql = Vec::new();
    for name in has.keys().filter(|n| !wants.contains_key(*n)) {
        sql.push(tollgate_policy::reset_statement(name));
    }
    for (name, statement) in wants {
        if has.get(name) != Some(statement) {
            sql.push(statement.clone());
        }
    }
    Some(sql.join("; "))
}

/// A request whose answer the tracker follows.
#[derive(Debug)]
enum Sent {
    /// An Execute: answered by CommandComplete, EmptyQueryResponse, PortalSuspended, or skipped
    /// after an error; with the change its portal runs.
    Execute(Option<SettingChange>),
    /// A Query or FunctionCall, answered by ReadyForQuery; a Query with its changes (one `SET`
    /// or `RESET`, or the resets among its statements), in the order they run.
    Query(VecDeque<SettingChange>),
    /// A Sync, answered by ReadyForQuery; whether an Execute was sent before it (since the
    /// Sync before).
    Sync { ran: bool },
}

/// What the server's ReadyForQuery settled about the changes it ran since the one before.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing to record (none ran, or they failed and were rolled back).
    Nothing,
    /// Confirmed outside any transaction block: recorded.
    Changes(Vec<SettingChange>),
    /// A change ran where a transaction block may undo or keep it: the connection's settings
    /// and the client's are unknown.
    Unknown,
}

/// One client's setting changes in flight on its current connection.
#[derive(Default)]
pub(crate) struct Tracker {
    /// The client's statements (by its own names) and portals whose text is a setting change.
    statements: HashMap<Vec<u8>, SettingChange>,
    portals: HashMap<Vec<u8>, SettingChange>,
    sent: VecDeque<Sent>,
    /// An Execute was sent since the last Sync.
    ran: bool,
    /// Changes the server confirmed since the last ReadyForQuery, and whether that stretch
    /// failed, or ran one inside a transaction block or transaction control after one.
    done: Vec<SettingChange>,
    failed: bool,
    doubtful: bool,
    /// Whether the statements now answered run inside a transaction block: from the last
    /// ReadyForQuery, then the transaction control the server confirms.
    in_block: bool,
}

fn split_name(body: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let end = body.iter().position(|&b| b == 0).ok_or(Malformed)?;
    Ok((&body[..end], &body[end + 1..]))
}

/// Transaction control, by the server's command tag: `Some(in a block after it)`.
fn transaction_control(tag: &[u8]) -> Option<bool> {
    match tag {
        b"BEGIN" | b"START TRANSACTION" | b"SAVEPOINT" | b"RELEASE" => Some(true),
        // ROLLBACK TO SAVEPOINT is tagged ROLLBACK too: a ReadyForQuery in a block tells.
        b"COMMIT"
        | b"ROLLBACK"
        | b"PREPARE TRANSACTION"
        | b"COMMIT PREPARED"
        | b"ROLLBACK PREPARED" => Some(false),
        _ => None,
    }
}

/// The command tags of setting changes.
fn is_change(tag: &[u8]) -> bool {
    matches!(tag, b"SET" | b"RESET" | b"DISCARD ALL")
}

impl Tracker {
    /// Forget what was in flight (the connection is given back or lost).
    pub fn detach(&mut self) {
        self.sent.clear();
        self.ran = false;
        self.done.clear();
        self.failed = false;
        self.doubtful = false;
        self.in_block = false;
    }

    /// Whether a change that starts now runs outside any transaction block: the connection was
    /// `idle` at its last ReadyForQuery, and nothing that runs statements is in flight or sent
    /// since the last Sync (only Syncs of Parse, Describe, Close).
    fn clean(&self, idle: bool) -> bool {
        idle && !self.ran
            && self
                .sent
                .iter()
                .all(|s| matches!(s, Sent::Sync { ran: false }))
    }

    /// One client message on its way: `Some(body)` to send in its place. `idle`: the
    /// connection's status at its last ReadyForQuery was idle.
    pub fn outgoing(
        &mut self,
        tag: u8,
        body: &[u8],
        idle: bool,
    ) -> Result<Option<Vec<u8>>, Malformed> {
        let clean = self.clean(idle);
        match tag {
            b'Q' => {
                // A simple query replaces the unnamed statement.
                self.statements.remove(&b""[..]);
                let (text, _) = split_name(body)?;
                let text = String::from_utf8_lossy(text);
                let changes = match setting_change(&text) {
                    Some(_) if !clean => {
                        self.sent.push_back(Sent::Query(VecDeque::new()));
                        let mut refused = SET_IN_TRANSACTION.as_bytes().to_vec();
                        refused.push(0);
                        return Ok(Some(refused));
                    }
                    Some(change) => VecDeque::from([change]),
                    // A driver's own reset among other statements (as its pool sends when a
                    // connection goes back to it, with a ROLLBACK first if need be).
                    None => tollgate_policy::resets(&text).into(),
                };
                self.sent.push_back(Sent::Query(changes));
            }
            b'P' => {
                let (name, rest) = split_name(body)?;
                let (text, types) = split_name(rest)?;
                match setting_change(&String::from_utf8_lossy(text)) {
                    Some(_) if !clean => {
                        self.statements.remove(name);
                        let mut refused = name.to_vec();
                        refused.push(0);
                        refused.extend_from_slice(SET_IN_TRANSACTION.as_bytes());
                        refused.push(0);
                        refused.extend_from_slice(types);
                        return Ok(Some(refused));
                    }
                    Some(change) => {
                        self.statements.insert(name.to_vec(), change);
                    }
                    None => {
                        self.statements.remove(name);
                    }
                }
            }
            b'B' => {
                let (portal, rest) = split_name(body)?;
                let (statement, _) = split_name(rest)?;
                match self.statements.get(statement) {
                    Some(change) => {
                        self.portals.insert(portal.to_vec(), change.clone());
                    }
                    None => {
                        self.portals.remove(portal);
                    }
                }
            }
            b'E' => {
                self.ran = true;
                let (portal, _) = split_name(body)?;
                self.sent
                    .push_back(Sent::Execute(self.portals.get(portal).cloned()));
            }
            b'C' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = split_name(rest)?;
                match kind {
                    b'S' => self.statements.remove(name),
                    _ => self.portals.remove(name),
                };
            }
            b'S' => {
                let ran = std::mem::take(&mut self.ran);
                self.sent.push_back(Sent::Sync { ran });
            }
            b'F' => self.sent.push_back(Sent::Query(VecDeque::new())),
            _ => {}
        }
        Ok(None)
    }

    /// CommandComplete (`tag`: its command tag), EmptyQueryResponse or PortalSuspended.
    pub fn completed(&mut self, tag: Option<&[u8]>) {
        let change = match self.sent.front_mut() {
            Some(Sent::Execute(_)) => match self.sent.pop_front() {
                Some(Sent::Execute(c)) => c,
                _ => None,
            },
            Some(Sent::Query(changes)) if tag.is_some_and(is_change) => changes.pop_front(),
            Some(_) | None => None,
        };
        let Some(tag) = tag else { return };
        if let Some(in_block) = transaction_control(tag) {
            self.doubtful |= !self.done.is_empty();
            self.in_block = in_block;
        }
        if let Some(c) = change {
            self.doubtful |= self.in_block;
            self.done.push(c);
        }
    }

    /// ErrorResponse: the server skips to the next Sync.
    pub fn error(&mut self) {
        self.failed = true;
        while matches!(self.sent.front(), Some(Sent::Execute(_))) {
            self.sent.pop_front();
        }
    }

    /// ReadyForQuery with the connection's status `now`.
    pub fn ready(&mut self, now: u8) -> Settled {
        self.in_block = now != b'I';
        while let Some(s) = self.sent.pop_front() {
            if !matches!(s, Sent::Execute(_)) {
                break;
            }
        }
        let done = std::mem::take(&mut self.done);
        let (failed, doubtful) = (
            std::mem::take(&mut self.failed),
            std::mem::take(&mut self.doubtful),
        );
        if done.is_empty() {
            Settled::Nothing
        } else if doubtful || now != b'I' {
            Settled::Unknown
        } else if failed {
            // Outside a block the stretch ran as one implicit transaction: rolled back.
            Settled::Nothing
        } else {
            Settled::Changes(done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        b
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = q(name);
        b.extend(q(sql));
        b.extend_from_slice(&[0, 0]);
        b
    }

    fn bind(portal: &str, stmt: &str) -> Vec<u8> {
        let mut b = q(portal);
        b.extend(q(stmt));
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        b
    }

    fn execute(portal: &str) -> Vec<u8> {
        let mut b = q(portal);
        b.extend_from_slice(&[0, 0, 0, 0]);
        b
    }

    fn set(name: &str, statement: &str) -> SettingChange {
        SettingChange::Set {
            name: name.into(),
            statement: statement.into(),
        }
    }

    #[test]
    fn a_simple_set_is_recorded_when_the_server_confirms_it() {
        let mut t = Tracker::default();
        assert_eq!(
            t.outgoing(b'Q', &q("SET DateStyle = 'SQL, DMY'"), true),
            Ok(None)
        );
        t.completed(Some(b"SET"));
        assert_eq!(
            t.ready(b'I'),
            Settled::Changes(vec![set("datestyle", "SET \"datestyle\" TO 'SQL, DMY'")])
        );
        // A failed one is not.
        t.outgoing(b'Q', &q("SET DateStyle = 'nonsense'"), true)
            .unwrap();
        t.error();
        assert_eq!(t.ready(b'I'), Settled::Nothing);
        // Other queries record nothing.
        t.outgoing(b'Q', &q("SELECT 1"), true).unwrap();
        t.completed(Some(b"SELECT 1"));
        assert_eq!(t.ready(b'I'), Settled::Nothing);
    }

    #[test]
    fn an_extended_set_is_followed_through_its_statement_and_portal() {
        let mut t = Tracker::default();
        t.outgoing(b'P', &parse("", "SET extra_float_digits = 3"), true)
            .unwrap();
        t.outgoing(b'B', &bind("", ""), false).unwrap();
        t.outgoing(b'E', &execute(""), false).unwrap();
        t.outgoing(b'P', &parse("s1", "SELECT 1"), false).unwrap();
        t.outgoing(b'B', &bind("p", "s1"), false).unwrap();
        t.outgoing(b'E', &execute("p"), false).unwrap();
        t.outgoing(b'S', &[], false).unwrap();
        t.completed(Some(b"SET"));
        t.completed(Some(b"SELECT 1"));
        assert_eq!(
            t.ready(b'I'),
            Settled::Changes(vec![set(
                "extra_float_digits",
                "SET \"extra_float_digits\" TO 3"
            )])
        );
        // The same pipeline failing after the SET: rolled back with it.
        t.outgoing(b'B', &bind("", ""), true).unwrap();
        t.outgoing(b'E', &execute(""), false).unwrap();
        t.outgoing(b'B', &bind("p", "s1"), false).unwrap();
        t.outgoing(b'E', &execute("p"), false).unwrap();
        t.outgoing(b'S', &[], false).unwrap();
        t.completed(Some(b"SET"));
        t.error();
        assert_eq!(t.ready(b'I'), Settled::Nothing);
        // A named one run inside a transaction block: unknown.
        t.outgoing(b'P', &parse("s2", "SET extra_float_digits = 3"), true)
            .unwrap();
        t.outgoing(b'S', &[], false).unwrap();
        assert_eq!(t.ready(b'I'), Settled::Nothing);
        t.outgoing(b'Q', &q("BEGIN"), true).unwrap();
        t.completed(Some(b"BEGIN"));
        assert_eq!(t.ready(b'T'), Settled::Nothing);
        t.outgoing(b'B', &bind("", "s2"), false).unwrap();
        t.outgoing(b'E', &execute(""), false).unwrap();
        t.outgoing(b'S', &[], false).unwrap();
        t.completed(Some(b"SET"));
        assert_eq!(t.ready(b'T'), Settled::Unknown);
        t.outgoing(b'Q', &q("COMMIT"), false).unwrap();
        t.completed(Some(b"COMMIT"));
        assert_eq!(t.ready(b'I'), Settled::Nothing);
        // Followed by a ROLLBACK in the same pipeline: unknown too.
        t.outgoing(b'B', &bind("", "s2"), true).unwrap();
        t.outgoing(b'E', &execute(""), false).unwrap();
        t.outgoing(b'S', &[], false).unwrap();
        t.completed(Some(b"SET"));
        t.completed(Some(b"ROLLBACK"));
        assert_eq!(t.ready(b'I'), Settled::Unknown);
    }

    #[test]
    fn a_drivers_reset_among_other_statements_is_recorded() {
        let reset = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;";
        let mut t = Tracker::default();
        t.outgoing(b'Q', &q(reset), true).unwrap();
        for tag in [&b"SELECT 1"[..], b"CLOSE CURSOR ALL", b"UNLISTEN", b"RESET"] {
            t.completed(Some(tag));
        }
        assert_eq!(
            t.ready(b'I'),
            Settled::Changes(vec![SettingChange::ResetAll])
        );
        // After a ROLLBACK of the transaction the client left open (asyncpg does so).
        t.outgoing(b'Q', &q("BEGIN"), true).unwrap();
        t.completed(Some(b"BEGIN"));
        assert_eq!(t.ready(b'T'), Settled::Nothing);
        let reset = format!("ROLLBACK;\n{reset}");
        assert_eq!(t.outgoing(b'Q', &q(&reset), false), Ok(None));
        for tag in [
            &b"ROLLBACK"[..],
            b"SELECT 1",
            b"CLOSE CURSOR ALL",
            b"UNLISTEN",
            b"RESET",
        ] {
            t.completed(Some(tag));
        }
        assert_eq!(
            t.ready(b'I'),
            Settled::Changes(vec![SettingChange::ResetAll])
        );
        // ROLLBACK TO SAVEPOINT is tagged ROLLBACK, but the block goes on: unknown.
        t.outgoing(b'Q', &q("BEGIN"), true).unwrap();
        t.completed(Some(b"BEGIN"));
        assert_eq!(t.ready(b'T'), Settled::Nothing);
        t.outgoing(b'Q', &q("ROLLBACK TO s; RESET ALL"), false)
            .unwrap();
        t.completed(Some(b"ROLLBACK"));
        t.completed(Some(b"RESET"));
        assert_eq!(t.ready(b'T'), Settled::Unknown);
    }

    #[test]
    fn a_set_that_would_run_in_a_transaction_block_is_replaced() {
        let mut t = Tracker::default();
        let sent = t.outgoing(b'Q', &q("SET work_mem = '1MB'"), false).unwrap();
        assert_eq!(sent, Some(q(SET_IN_TRANSACTION)));
        t.error();
        assert_eq!(t.ready(b'E'), Settled::Nothing);
        let sent = t
            .outgoing(b'P', &parse("", "RESET ALL"), false)
            .unwrap()
            .unwrap();
        assert_eq!(sent, parse("", SET_IN_TRANSACTION));
        // Its statement is not a setting change any more.
        t.outgoing(b'B', &bind("", ""), false).unwrap();
        t.outgoing(b'E', &execute(""), false).unwrap();
        t.outgoing(b'S', &[], false).unwrap();
        t.error();
        assert_eq!(t.ready(b'E'), Settled::Nothing);
        assert!(t.statements.is_empty() && t.portals.is_empty());
        // After a BEGIN not yet answered (simple or extended), or a statement earlier in the
        // pipeline, the status is unknown: replaced too.
        let set = q("SET work_mem = '1MB'");
        let mut t = Tracker::default();
        t.outgoing(b'Q', &q("BEGIN"), true).unwrap();
        assert!(t.outgoing(b'Q', &set, true).unwrap().is_some());
        let mut t = Tracker::default();
        t.outgoing(b'B', &bind("", "begin"), true).unwrap();
        t.outgoing(b'E', &execute(""), true).unwrap();
        t.outgoing(b'S', &[], true).unwrap();
        t.completed(Some(b"BEGIN"));
        assert!(t.outgoing(b'Q', &set, true).unwrap().is_some());
        let mut t = Tracker::default();
        t.outgoing(b'E', &execute(""), true).unwrap();
        let sent = t.outgoing(b'P', &parse("", "SET work_mem = '1MB'"), true);
        assert!(sent.unwrap().is_some());
        // A Close and Sync in flight change nothing: the SET runs.
        let mut t = Tracker::default();
        t.outgoing(b'C', b"Ss1\0", true).unwrap();
        t.outgoing(b'S', &[], true).unwrap();
        assert_eq!(t.outgoing(b'Q', &set, true), Ok(None));
    }

    #[test]
    fn settings_are_applied_again_with_one_query_only_when_they_differ() {
        let mut a = Settings::new();
        apply(&mut a, &set("datestyle", "SET \"datestyle\" TO 'SQL, DMY'"));
        apply(&mut a, &set("work_mem", "SET \"work_mem\" TO '8MB'"));
        let mut b = Settings::new();
        apply(&mut b, &set("timezone", "SET \"timezone\" TO 'UTC'"));
        apply(&mut b, &set("work_mem", "SET \"work_mem\" TO '8MB'"));
        assert_eq!(reapply(&a, &a.clone()), None);
        assert_eq!(
            reapply(&b, &a).as_deref(),
            Some("RESET \"timezone\"; SET \"datestyle\" TO 'SQL, DMY'")
        );
        apply(
            &mut a,
            &SettingChange::Reset {
                name: "work_mem".into(),
            },
        );
        apply(&mut b, &SettingChange::ResetAll);
        assert_eq!(reapply(&a, &b).as_deref(), Some("RESET \"datestyle\""));
    }
}
