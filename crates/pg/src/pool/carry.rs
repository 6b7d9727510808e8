//! Protocol-level prepared statements under transaction pooling (pure, no I/O): a client's
//! statements are kept by name with the Parse that defined them, renamed on the backend by
//! their content (so clients preparing the same statement share it), and prepared again on
//! whichever backend serves a Bind or Describe that names them. The answers to the gateway's
//! own messages are followed and dropped, so the client sees exactly the answers it asked for.

use crate::proto::frame::Malformed;
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};

/// A client's prepared statements: name → the Parse body after the name (query, parameter
/// types), as the client sent it and the relay judged it.
#[derive(Default)]
pub(crate) struct ClientStatements {
    named: HashMap<String, Bytes>,
    unnamed: Option<Bytes>,
}

/// What one backend holds: the server-side names prepared on it (confirmed by ParseComplete),
/// and the unnamed statement it was last given.
#[derive(Default)]
pub(crate) struct BackendStatements {
    prepared: HashSet<String>,
    unnamed: Option<Bytes>,
}

impl BackendStatements {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.prepared.len()
    }
}

/// Most statements the gateway keeps prepared on one upstream connection.
pub(crate) const MAX_PER_CONNECTION: usize = 1000;

/// A request sent to the backend whose completion message the carrier follows.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// `server`: the name it prepares (None: the unnamed statement, or a Parse that must fail);
    /// `client`: the client's name for it, forgotten when the server does not confirm it.
    Parse {
        server: Option<String>,
        ours: bool,
        client: Option<String>,
    },
    Bind,
    Close {
        ours: bool,
    },
    /// A Sync, Query or FunctionCall: answered by ReadyForQuery.
    Boundary,
}

/// The requests in flight on one leased backend.
#[derive(Default)]
pub(crate) struct Carry {
    expect: VecDeque<Expect>,
}

/// The server-side name of a statement: a digest of what it is (query and parameter types).
pub(crate) fn server_name(definition: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, definition);
    format!("tollgate_{}", hex::encode(&d.as_ref()[..12]))
}

fn message(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(5 + len);
    out.push(tag);
    out.extend_from_slice(&((len + 4) as i32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// A NUL-terminated name at the front of `body`, and the rest.
fn split_name(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

impl Carry {
    /// Whether every request sent has been answered.
    pub fn settled(&self) -> bool {
        self.expect.is_empty()
    }

    /// Close and prepare `server` (its definition `def`) on the backend: the Close makes the
    /// Parse safe whatever the backend held under that name.
    fn prepare(
        &mut self,
        backend: &mut BackendStatements,
        server: &str,
        def: &[u8],
        ours: bool,
        out: &mut Vec<u8>,
    ) {
        // A connection serves many clients: the statements kept on it are bounded, the
        // surplus closed (a client that uses one again gets it prepared again).
        while backend.prepared.len() >= MAX_PER_CONNECTION {
            let Some(old) = backend.prepared.iter().next().cloned() else {
                break;
            };
            backend.prepared.remove(&old);
            out.extend(message(b'C', &[b"S", old.as_bytes(), b"\0"]));
            self.expect.push_back(Expect::Close { ours: true });
        }
        out.extend(message(b'C', &[b"S", server.as_bytes(), b"\0"]));
        self.expect.push_back(Expect::Close { ours: true });
        out.extend(message(b'P', &[server.as_bytes(), b"\0", def]));
        self.expect.push_back(Expect::Parse {
            server: Some(server.to_string()),
            ours,
            client: None,
        });
    }

    /// The server-side name for the client's statement `name`, prepared on this backend first
    /// when it is not there; `None` when the client never prepared it (sent as is: the server
    /// answers that it does not exist).
    fn ensure(
        &mut self,
        client: &ClientStatements,
        backend: &mut BackendStatements,
        name: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<String> {
        if name.is_empty() {
            if let Some(def) = &client.unnamed {
                if backend.unnamed.as_ref() != Some(def) {
                    out.extend(message(b'P', &[b"\0", def]));
                    self.expect.push_back(Expect::Parse {
                        server: None,
                        ours: true,
                        client: None,
                    });
                    backend.unnamed = Some(def.clone());
                }
            }
            return None;
        }
        let def = client.named.get(std::str::from_utf8(name).ok()?)?;
        let server = server_name(def);
        if !backend.prepared.contains(&server) {
            self.prepare(backend, &server, def, true, out);
        }
        Some(server)
    }

    /// One client message on its way to the backend: appended to `out` as the backend must
    /// see it (renamed, with the re-prepares it needs before it). `Err` for a malformed body.
    pub fn outgoing(
        &mut self,
        client: &mut ClientStatements,
        backend: &mut BackendStatements,
        tag: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Malformed> {
        match tag {
            b'P' => {
                let (name, def) = split_name(body).ok_or(Malformed)?;
                let def = Bytes::copy_from_slice(def);
                if name.is_empty() {
                    client.unnamed = Some(def.clone());
                    backend.unnamed = Some(def);
                    out.extend(message(b'P', &[body]));
                    self.expect.push_back(Expect::Parse {
                        server: None,
                        ours: false,
                        client: None,
                    });
                } else if let Some(existing) = self.ensure(client, backend, name, out) {
                    // The name is taken: the server answers so, as it would without the gateway
                    // (the Parse names the existing statement there), and nothing changes.
                    out.extend(message(b'P', &[existing.as_bytes(), b"\0", &def]));
                    self.expect.push_back(Expect::Parse {
                        server: None,
                        ours: false,
                        client: None,
                    });
                } else {
                    let name = String::from_utf8(name.to_vec()).map_err(|_| Malformed)?;
                    let server = server_name(&def);
                    backend.prepared.remove(&server);
                    self.prepare(backend, &server, &def, false, out);
                    if let Some(Expect::Parse { client: c, .. }) = self.expect.back_mut() {
                        *c = Some(name.clone());
                    }
                    client.named.insert(name, def);
                }
            }
            b'B' => {
                let (portal, rest) = split_name(body).ok_or(Malformed)?;
                let (stmt, rest) = split_name(rest).ok_or(Malformed)?;
                match self.ensure(client, backend, stmt, out) {
                    Some(server) => out.extend(message(
                        b'B',
                        &[portal, b"\0", server.as_bytes(), b"\0", rest],
                    )),
                    None => out.extend(message(b'B', &[body])),
                }
                self.expect.push_back(Expect::Bind);
            }
            b'D' | b'C' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = split_name(rest).ok_or(Malformed)?;
                let renamed = match (tag, kind) {
                    (b'D', b'S') => self.ensure(client, backend, name, out),
                    (b'C', b'S') if !name.is_empty() => {
                        let name = std::str::from_utf8(name).map_err(|_| Malformed)?;
                        client.named.remove(name).map(|def| {
                            let server = server_name(&def);
                            backend.prepared.remove(&server);
                            server
                        })
                    }
                    (b'C', b'S') => {
                        client.unnamed = None;
                        backend.unnamed = None;
                        None
                    }
                    _ => None,
                };
                match renamed {
                    Some(server) => out.extend(message(tag, &[&[kind], server.as_bytes(), b"\0"])),
                    None => out.extend(message(tag, &[body])),
                }
                if tag == b'C' {
                    self.expect.push_back(Expect::Close { ours: false });
                }
            }
            b'Q' => {
                // A simple query replaces the unnamed statement; one that may deallocate or
                // discard statements leaves this backend's list unknown (re-prepared on use).
                backend.unnamed = None;
                let lower = String::from_utf8_lossy(body).to_ascii_lowercase();
                if lower.contains("dealloc") || lower.contains("discard") {
                    backend.prepared.clear();
                }
                out.extend(message(tag, &[body]));
                self.expect.push_back(Expect::Boundary);
            }
            b'S' | b'F' => {
                out.extend(message(tag, &[body]));
                self.expect.push_back(Expect::Boundary);
            }
            _ => out.extend(message(tag, &[body])),
        }
        Ok(())
    }

    /// A backend message on its way to the client: whether to forward it (false for the
    /// answers to the gateway's own messages).
    pub fn incoming(
        &mut self,
        client: &mut ClientStatements,
        backend: &mut BackendStatements,
        tag: u8,
    ) -> bool {
        match tag {
            b'1' => match self.expect.pop_front() {
                Some(Expect::Parse { server, ours, .. }) => {
                    if let Some(s) = server {
                        backend.prepared.insert(s);
                    }
                    !ours
                }
                _ => true,
            },
            b'2' => {
                if self.expect.front() == Some(&Expect::Bind) {
                    self.expect.pop_front();
                }
                true
            }
            b'3' => match self.expect.pop_front() {
                Some(Expect::Close { ours }) => !ours,
                _ => true,
            },
            b'E' => {
                // The server skips everything up to the next Sync after an error.
                while self.expect.front().is_some_and(|e| *e != Expect::Boundary) {
                    match self.expect.pop_front() {
                        Some(Expect::Parse { server: None, .. }) => backend.unnamed = None,
                        // Not prepared (failed or skipped): the client's name is free again.
                        Some(Expect::Parse {
                            client: Some(name), ..
                        }) => {
                            client.named.remove(&name);
                        }
                        _ => {}
                    }
                }
                true
            }
            b'Z' => {
                while let Some(e) = self.expect.pop_front() {
                    if e == Expect::Boundary {
                        break;
                    }
                }
                true
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::next_frame;

    fn frames(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(f) = next_frame(&buf[pos..], 1 << 20).unwrap() {
            out.push((f.tag, f.body(&buf[pos..]).to_vec()));
            pos += f.total_len;
        }
        assert_eq!(pos, buf.len());
        out
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        b
    }

    fn bind(portal: &str, stmt: &str) -> Vec<u8> {
        let mut b = portal.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        b
    }

    /// One client and its carrier; `on` picks the backend its messages go to.
    #[derive(Default)]
    struct Client {
        carry: Carry,
        statements: ClientStatements,
    }

    impl Client {
        /// The messages the backend gets for these client messages.
        fn send(&mut self, on: &mut BackendStatements, msgs: &[(u8, &[u8])]) -> Vec<(u8, Vec<u8>)> {
            let mut out = Vec::new();
            for (tag, body) in msgs {
                self.carry
                    .outgoing(&mut self.statements, on, *tag, body, &mut out)
                    .unwrap();
            }
            frames(&out)
        }

        /// Which of these backend answers reach the client.
        fn answers(&mut self, on: &mut BackendStatements, tags: &[u8]) -> Vec<bool> {
            tags.iter()
                .map(|t| self.carry.incoming(&mut self.statements, on, *t))
                .collect()
        }
    }

    fn tags(sent: &[(u8, Vec<u8>)]) -> Vec<u8> {
        sent.iter().map(|f| f.0).collect()
    }

    #[test]
    fn a_statement_is_renamed_and_prepared_again_on_another_backend() {
        let mut c = Client::default();
        let (mut b1, mut b2) = (BackendStatements::default(), BackendStatements::default());
        let server = server_name(&parse("", "SELECT 1")[1..]);
        let sent = c.send(&mut b1, &[(b'P', &parse("s1", "SELECT 1")), (b'S', &[])]);
        assert_eq!(tags(&sent), b"CPS");
        assert_eq!(sent[1], (b'P', parse(&server, "SELECT 1")));
        // CloseComplete of the gateway's own Close is dropped, ParseComplete forwarded.
        assert_eq!(c.answers(&mut b1, b"31Z"), [false, true, true]);
        assert!(c.carry.settled());
        // On the same backend a Bind goes straight to the server-side name.
        assert_eq!(
            c.send(&mut b1, &[(b'B', &bind("", "s1"))]),
            [(b'B', bind("", &server))]
        );
        assert_eq!(c.answers(&mut b1, b"2"), [true]);
        // On another backend it is prepared first, and those answers are not forwarded.
        let mut c2 = Client {
            statements: c.statements,
            ..Default::default()
        };
        let sent = c2.send(&mut b2, &[(b'B', &bind("", "s1")), (b'S', &[])]);
        assert_eq!(tags(&sent), b"CPBS");
        assert_eq!(c2.answers(&mut b2, b"312Z"), [false, false, true, true]);
        assert_eq!(b2.len(), 1);
    }

    #[test]
    fn a_statement_the_server_did_not_confirm_is_not_carried() {
        let mut c = Client::default();
        let (mut b1, mut b2) = (BackendStatements::default(), BackendStatements::default());
        // The client's own Parse fails: the name is forgotten, a Bind of it goes as it is.
        c.send(&mut b1, &[(b'P', &parse("s1", "SELECT x")), (b'S', &[])]);
        assert_eq!(c.answers(&mut b1, b"3EZ"), [false, true, true]);
        assert!(c.carry.settled());
        assert_eq!(b1.len(), 0);
        assert_eq!(
            c.send(&mut b1, &[(b'B', &bind("", "s1"))]),
            [(b'B', bind("", "s1"))]
        );
        c.answers(&mut b1, b"E");
        // A confirmed statement whose re-prepare fails elsewhere stays the client's, and is
        // prepared again at its next use.
        c.send(&mut b1, &[(b'P', &parse("s2", "SELECT 1")), (b'S', &[])]);
        c.answers(&mut b1, b"31Z");
        c.send(&mut b2, &[(b'B', &bind("", "s2")), (b'S', &[])]);
        assert_eq!(c.answers(&mut b2, b"3EZ"), [false, true, true]);
        assert_eq!(b2.len(), 0);
        assert_eq!(tags(&c.send(&mut b2, &[(b'B', &bind("", "s2"))])), b"CPB");
    }

    #[test]
    fn a_name_in_use_is_refused_by_the_server_and_kept() {
        let mut c = Client::default();
        let mut b = BackendStatements::default();
        let server = server_name(&parse("", "SELECT 1")[1..]);
        c.send(&mut b, &[(b'P', &parse("s1", "SELECT 1"))]);
        c.answers(&mut b, b"31");
        let sent = c.send(&mut b, &[(b'P', &parse("s1", "SELECT 2"))]);
        assert_eq!(sent, [(b'P', parse(&server, "SELECT 2"))]);
        assert_eq!(c.answers(&mut b, b"E"), [true]);
        assert_eq!(
            c.send(&mut b, &[(b'B', &bind("", "s1"))]),
            [(b'B', bind("", &server))]
        );
    }

    #[test]
    fn a_connection_keeps_a_bounded_number_of_statements() {
        let mut c = Client::default();
        let mut b = BackendStatements::default();
        for i in 0..MAX_PER_CONNECTION {
            let sql = format!("SELECT {i}");
            c.send(&mut b, &[(b'P', &parse(&format!("s{i}"), &sql))]);
            let answers = c.answers(&mut b, b"31");
            assert_eq!(answers, [false, true]);
        }
        assert_eq!(b.len(), MAX_PER_CONNECTION);
        // The next one closes one of them first; that answer is the gateway's own.
        let sent = c.send(&mut b, &[(b'P', &parse("last", "SELECT 'last'"))]);
        assert_eq!(tags(&sent), b"CCP");
        assert_eq!(c.answers(&mut b, b"331"), [false, false, true]);
        assert_eq!(b.len(), MAX_PER_CONNECTION);
    }

    #[test]
    fn unknown_names_and_portals_pass_unchanged() {
        let mut c = Client::default();
        let mut b = BackendStatements::default();
        let sent = c.send(&mut b, &[(b'B', &bind("p", "nope")), (b'D', b"Pp\0")]);
        assert_eq!(sent, [(b'B', bind("p", "nope")), (b'D', b"Pp\0".to_vec())]);
        // A Close of a statement the client never made is forwarded (its answer is the client's).
        c.send(&mut b, &[(b'C', b"Sx\0")]);
        assert_eq!(c.answers(&mut b, b"23"), [true, true]);
    }

    #[test]
    fn the_unnamed_statement_follows_the_client() {
        let mut c = Client::default();
        let (mut b1, mut b2) = (BackendStatements::default(), BackendStatements::default());
        let sent = c.send(&mut b1, &[(b'P', &parse("", "SELECT 2"))]);
        assert_eq!(sent, [(b'P', parse("", "SELECT 2"))]);
        let sent = c.send(&mut b2, &[(b'B', &bind("", ""))]);
        assert_eq!(sent, [(b'P', parse("", "SELECT 2")), (b'B', bind("", ""))]);
        // A simple query on b2 replaces its unnamed statement.
        c.send(&mut b2, &[(b'Q', b"SELECT 3\0")]);
        assert_eq!(tags(&c.send(&mut b2, &[(b'B', &bind("", ""))])), b"PB");
    }
}
