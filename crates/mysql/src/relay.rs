//! The command loop of an authenticated session. MySQL is request/response: the relay reads
//! one client command, judges it, forwards it (or answers it itself), and relays the server's
//! whole answer, masking rows, before it reads the next command.

use crate::capture::{binary_value, Capture};
use crate::classify::{self, Scope, SqlMode};
use crate::errmask::ErrorMasker;
use crate::io::{frame, read_packet, write_packet, IoError};
use crate::proto::{self, com, Column, ErrPacket, Layout, OkPacket, Reader};
use crate::session::{codes, err};
use crate::upstream::{Target, UpStream};
use crate::MysqlGateway;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tollgate_gate::event::{
    Command, CommandResult, MaskedCount, ReviewEvent, ReviewRefused, SessionTerminated,
};
use tollgate_gate::hold::{self, HoldRequest, Opened};
use tollgate_gate::standing::{Ended, Standing};
use tollgate_gate::{Decision, SessionLog};
use tollgate_identity::Identity;
use tollgate_mask::{ColumnInfo, Outcome, RowPlan};
use tollgate_metrics::registry;
use tollgate_policy::{Classification, Classified, Confirmation, SessionPolicy};
use tollgate_review::Verdict;

type Client = tokio_rustls::server::TlsStream<TcpStream>;

/// Recorded SQL text is clipped to this many bytes (the digest covers the rest).
const MAX_TEXT: usize = 4096;
const ER_UNKNOWN_COM: u16 = 1047;
const ER_UNKNOWN_STMT_HANDLER: u16 = 1243;
const ER_NO_SUCH_THREAD: u16 = 1094;
const ER_SPECIFIC_ACCESS_DENIED: u16 = 1227;
const ER_NET_PACKET_TOO_LARGE: u16 = 1153;
const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
/// MariaDB's ER_CONNECTION_KILLED: what a session whose standing ended is told.
const ER_CONNECTION_KILLED: u16 = 1927;
const CONNECTION_KILLED_STATE: &str = "70100";
/// ER_QUERY_INTERRUPTED: what a held statement cancelled by `KILL QUERY` answers.
const ER_QUERY_INTERRUPTED: u16 = 1317;

pub(crate) struct End {
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub commands: u64,
}

struct Prepared {
    text: Arc<str>,
    classified: Arc<Classified>,
    refusal: Option<String>,
    /// The result's columns, from PREPARE_OK or the last execution that described them.
    columns: Vec<Column>,
}

/// What passed in one answer.
#[derive(Default)]
struct Summary {
    rows: u64,
    affected: u64,
    error: Option<ErrPacket>,
    /// Values masked: (column, rule or detector, values); an error message's are under `error`.
    masked: Vec<(String, String, u64)>,
    /// The captured copy of the rows (`resources.capture_results`).
    capture: Option<Capture>,
}

#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("client: {0}")]
    Client(std::io::Error),
    #[error("upstream: {0}")]
    Upstream(IoError),
    #[error("upstream sent a malformed packet")]
    Malformed,
    #[error("could not read the session's {0} from the server")]
    State(&'static str),
}

pub(crate) struct Relay<'a> {
    gw: &'a MysqlGateway,
    target: &'a Target,
    log: &'a SessionLog,
    who: &'a Identity,
    unmasked: bool,
    caps: u32,
    policy: SessionPolicy,
    stmts: HashMap<u32, Prepared>,
    last_prepared: Option<u32>,
    /// The statement whose execution is being relayed (its rows are binary).
    executing: Option<u32>,
    /// The upstream's connection id (stopped with `KILL` when the session is terminated).
    upstream_thread: Option<u32>,
    /// Woken by a `KILL [QUERY]` of this session from another connection: withdraws a held
    /// statement (nothing of it runs upstream yet).
    cancelled: Arc<crate::Kill>,
    /// The statement held for review right now, if any: withdrawn if the session ends.
    holding: Option<Holding>,
    /// Whether the last judged command was sent upstream.
    forwarded: bool,
    /// How the server reads this session's SQL text (read from it, re-read after changes).
    mode: SqlMode,
    /// Masks values echoed in server errors (`None`: nothing to mask for this viewer).
    errors: Option<ErrorMasker>,
    n: u64,
    /// Bytes for the client, and the sequence number of the next packet.
    out: Vec<u8>,
    cseq: u8,
    useq: u8,
}

/// A statement waiting for its review.
struct Holding {
    n: u64,
    review: String,
    rule: String,
    since: Instant,
}

enum Verdicts {
    Forward,
    /// Answered by the gateway (refused); the result is recorded.
    Answered,
}

impl<'a> Relay<'a> {
    pub(crate) fn new(
        gw: &'a MysqlGateway,
        target: &'a Target,
        log: &'a SessionLog,
        who: &'a Identity,
        unmasked: bool,
        caps: u32,
    ) -> Self {
        Relay {
            gw,
            target,
            log,
            who,
            unmasked,
            caps,
            policy: target.policy.session(),
            stmts: HashMap::new(),
            last_prepared: None,
            executing: None,
            upstream_thread: None,
            cancelled: Arc::default(),
            holding: None,
            forwarded: false,
            mode: SqlMode::default(),
            errors: match (&target.mask, unmasked) {
                (Some(policy), false) => ErrorMasker::new(policy, &who.groups),
                _ => None,
            },
            n: 0,
            out: Vec::with_capacity(16 * 1024),
            cseq: 1,
            useq: 1,
        }
    }

    /// The upstream's connection id, stopped if the session is terminated mid-command.
    pub(crate) fn upstream_thread(mut self, id: u32) -> Self {
        self.upstream_thread = Some(id);
        self
    }

    /// What another connection's `KILL` of this session wakes.
    pub(crate) fn cancelled_by(mut self, cancelled: Arc<crate::Kill>) -> Self {
        self.cancelled = cancelled;
        self
    }

    fn scope(&self) -> Scope<'a> {
        Scope {
            database: self.target.database(),
            databases: &self.target.resource.databases,
            mode: self.mode,
        }
    }

    /// Relays commands until the client quits, something breaks, or the session's standing
    /// is lost (its certificate or token, or the grant it rests on, ended): then the client is
    /// told why (an error in answer to its next command, or to the one running) and the
    /// session ends.
    pub(crate) async fn run(
        mut self,
        client: Client,
        up: &mut UpStream,
        standing: Standing,
    ) -> End {
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        if let Err(e) = self.read_reading(up).await {
            let _ = w.shutdown().await;
            return End {
                outcome: "error",
                reason: Some(e.to_string()),
                commands: 0,
            };
        }
        let gw = self.gw;
        let lost = standing.lost(gw);
        tokio::pin!(lost);
        let end = loop {
            let next = tokio::select! {
                why = &mut lost => Err(why),
                p = read_packet(&mut r, self.gw.max_message) => Ok(p),
            };
            let next = match next {
                Ok(p) => p,
                Err(why) => {
                    self.cseq = 1;
                    self.terminate(&why, up, false).await;
                    let _ = self.flush(&mut w).await;
                    break ("terminated", Some(why.label().to_string()));
                }
            };
            let (seq, p) = match next {
                Ok(x) => x,
                Err(IoError::Closed) => break ("ok", None),
                Err(IoError::TooLarge(max)) => {
                    self.cseq = 1;
                    self.answer_err(
                        ER_NET_PACKET_TOO_LARGE,
                        "08S01",
                        format!("Got a packet bigger than tollgate's limit of {max} bytes (server.max_message_bytes)"),
                    );
                    let _ = self.flush(&mut w).await;
                    break ("error", Some("packet_too_large".into()));
                }
                Err(e) => break ("error", Some(e.to_string())),
            };
            self.cseq = seq.wrapping_add(1);
            let reply_seq = self.cseq;
            let Some(&command) = p.first() else {
                break ("error", Some("empty packet".into()));
            };
            if command == com::QUIT {
                break ("ok", None);
            }
            if command == com::CHANGE_USER {
                let res = self.change_user(&p, &mut r, &mut w, up).await;
                let flushed = self.flush(&mut w).await;
                match res {
                    Ok(true) if flushed.is_ok() => continue,
                    Ok(true) => break ("error", flushed.err().map(|e| e.to_string())),
                    Ok(false) => break ("error", Some("change_user_refused".into())),
                    Err(e) => break ("error", Some(e.to_string())),
                }
            }
            let step = tokio::select! {
                res = self.command(command, p, &mut r, up) => Ok(res),
                why = &mut lost => Err(why),
            };
            let res = match step {
                Ok(res) => res,
                Err(why) => {
                    // Nothing of this command's answer was sent yet: the error answers it.
                    self.out.clear();
                    self.cseq = reply_seq;
                    self.terminate(&why, up, true).await;
                    let _ = self.flush(&mut w).await;
                    break ("terminated", Some(why.label().to_string()));
                }
            };
            if let Err(e) = self.flush(&mut w).await {
                break ("error", Some(Broken::Client(e).to_string()));
            }
            if let Err(e) = res {
                break ("error", Some(e.to_string()));
            }
            // `KILL CONNECTION` from another connection ended its upstream connection; the
            // client's connection ends too, as it would without the gateway.
            if self
                .cancelled
                .connection
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                break ("terminated", Some("kill_connection".into()));
            }
        };
        let _ = w.shutdown().await;
        End {
            outcome: end.0,
            reason: end.1,
            commands: self.n,
        }
    }

    /// Ends a session whose standing is gone: records why, stops what runs upstream
    /// (`running`: a command was being relayed), and queues the error for the client.
    async fn terminate(&mut self, why: &Ended, up: &mut UpStream, running: bool) {
        let target = self.target;
        let resource = &target.resource.name;
        tracing::info!(session = %self.log.id, %resource, reason = why.label(), "ending a session whose standing is gone");
        registry()
            .counter(
                "tollgate_sessions_terminated_total",
                "Sessions ended by the gateway because a certificate, token or grant they depended on ended.",
                &[("reason", why.label())],
            )
            .inc();
        let (msg, hint) = why.client_message(resource);
        self.log.record(&SessionTerminated {
            reason: why.label(),
            detail: why.detail(),
            sqlstate: Some(CONNECTION_KILLED_STATE),
            message: Some(msg.clone()),
        });
        let held = self.withdraw_held(&msg);
        let msg = match &held {
            Some(review) => format!("tollgate: {msg}; the statement held as review {review} was withdrawn and not run ({hint})"),
            None => format!("tollgate: {msg} ({hint})"),
        };
        self.answer_err(ER_CONNECTION_KILLED, CONNECTION_KILLED_STATE, msg);
        let _ = up.shutdown().await;
        // A statement still running upstream would outlive the closed connection (a held
        // one never reached it).
        if let (true, None, Some(thread)) = (running, held, self.upstream_thread) {
            if let Err(e) = target.kill(thread, self.gw.max_message).await {
                tracing::warn!(session = %self.log.id, error = %e, "could not stop the upstream connection of a terminated session");
            }
        }
    }

    /// Withdraws the review of the statement held when the session ended (the relay stopped
    /// waiting for it), recording why; its id, if one was held.
    fn withdraw_held(&mut self, ended: &str) -> Option<String> {
        let h = self.holding.take()?;
        if let Some(reviews) = &self.gw.reviews {
            reviews.withdraw_because(&h.review, &format!("the held session ended: {ended}"));
        }
        self.log.record(&ReviewRefused {
            n: h.n,
            review: h.review.clone(),
            outcome: "withdrawn",
            waited_ms: h.since.elapsed().as_millis() as u64,
        });
        tracing::info!(session = %self.log.id, review = %h.review, rule = %h.rule, "held statement withdrawn: its session ended");
        Some(h.review)
    }

    async fn flush(&mut self, w: &mut WriteHalf<Client>) -> std::io::Result<()> {
        if !self.out.is_empty() {
            w.write_all(&self.out).await?;
            self.out.clear();
        }
        w.flush().await
    }

    fn to_client(&mut self, payload: &[u8]) {
        frame(&mut self.out, &mut self.cseq, payload);
    }

    fn answer_err(&mut self, code: u16, sqlstate: &str, msg: impl Into<String>) {
        let p = err(code, sqlstate, msg);
        self.to_client(&p);
    }

    async fn up_send(&mut self, up: &mut UpStream, p: &[u8]) -> Result<(), Broken> {
        let mut seq = 0;
        write_packet(up, &mut seq, p)
            .await
            .map_err(|e| Broken::Upstream(e.into()))?;
        self.useq = seq;
        Ok(())
    }

    async fn up_read(&mut self, up: &mut UpStream) -> Result<Vec<u8>, Broken> {
        let (s, p) = read_packet(up, self.gw.max_message)
            .await
            .map_err(Broken::Upstream)?;
        self.useq = s.wrapping_add(1);
        Ok(p)
    }

    async fn command(
        &mut self,
        command: u8,
        mut p: Vec<u8>,
        r: &mut BufReader<ReadHalf<Client>>,
        up: &mut UpStream,
    ) -> Result<(), Broken> {
        match command {
            com::QUERY => {
                let Ok(text) = std::str::from_utf8(&p[1..]) else {
                    let c: Classified = Classification::Unparsable {
                        error: "not UTF-8".into(),
                    }
                    .into();
                    let text = String::from_utf8_lossy(&p[1..]).into_owned();
                    return self.judged(r, up, "query", &text, None, &c, None, &p).await;
                };
                let text = text.to_string();
                if let Some((query, id)) = classify::kill_target(&text) {
                    return self.kill(r, up, &text, query, id).await;
                }
                let a = classify::analyze(&text, self.scope());
                let c: Classified = a.classification.into();
                self.judged(r, up, "query", &text, None, &c, a.refusal.as_deref(), &p)
                    .await
            }
            com::STMT_PREPARE => {
                let text = String::from_utf8_lossy(&p[1..]).into_owned();
                let a = match std::str::from_utf8(&p[1..]) {
                    Ok(t) => classify::analyze(t, self.scope()),
                    Err(_) => classify::Analysis {
                        classification: Classification::Unparsable {
                            error: "not UTF-8".into(),
                        },
                        refusal: None,
                    },
                };
                let c = Arc::new(Classified::from(a.classification));
                self.prepare(up, text, c, a.refusal, &p).await
            }
            com::STMT_EXECUTE | com::STMT_BULK_EXECUTE => {
                let id = proto::statement_id(&p).map_err(|_| Broken::Malformed)?;
                let id = if id == proto::LAST_PREPARED {
                    self.last_prepared.unwrap_or(id)
                } else {
                    id
                };
                let Some(st) = self.stmts.get(&id) else {
                    self.n += 1;
                    self.answer_err(
                        ER_UNKNOWN_STMT_HANDLER,
                        "HY000",
                        format!("Unknown prepared statement handler ({id}) given to tollgate"),
                    );
                    return Ok(());
                };
                // The server runs exactly the statement the gateway judged.
                proto::set_statement_id(&mut p, id);
                let (text, c, refusal) =
                    (st.text.clone(), st.classified.clone(), st.refusal.clone());
                let protocol = if command == com::STMT_EXECUTE {
                    "execute"
                } else {
                    "bulk_execute"
                };
                self.judged(r, up, protocol, &text, Some(id), &c, refusal.as_deref(), &p)
                    .await
            }
            com::STMT_FETCH => {
                let id = proto::statement_id(&p).map_err(|_| Broken::Malformed)?;
                let Some(st) = self.stmts.get(&id) else {
                    self.answer_err(
                        ER_UNKNOWN_STMT_HANDLER,
                        "HY000",
                        format!("Unknown prepared statement handler ({id}) given to tollgate"),
                    );
                    return Ok(());
                };
                let columns = st.columns.clone();
                self.up_send(up, &p).await?;
                self.executing = Some(id);
                let mut s = Summary::default();
                let plan = self.plan(&columns);
                let res = self.rows(up, &columns, true, &plan, false, &mut s).await;
                self.executing = None;
                res.map(|_| ())
            }
            com::STMT_SEND_LONG_DATA => {
                // No answer either way; an id the server did not confirm gets nothing sent.
                let id = proto::statement_id(&p).map_err(|_| Broken::Malformed)?;
                let id = if id == proto::LAST_PREPARED {
                    self.last_prepared.unwrap_or(id)
                } else {
                    id
                };
                if self.stmts.contains_key(&id) {
                    proto::set_statement_id(&mut p, id);
                    self.up_send(up, &p).await?;
                }
                Ok(())
            }
            com::STMT_CLOSE => {
                let id = proto::statement_id(&p).map_err(|_| Broken::Malformed)?;
                if self.stmts.remove(&id).is_some() {
                    self.up_send(up, &p).await?;
                }
                if self.last_prepared == Some(id) {
                    self.last_prepared = None;
                }
                Ok(())
            }
            com::INIT_DB => {
                let name = String::from_utf8_lossy(&p[1..]).into_owned();
                let db = if name == self.target.resource.name {
                    self.target.database().to_string()
                } else {
                    name.clone()
                };
                let scope = self.scope();
                if !(db.eq_ignore_ascii_case(scope.database)
                    || scope.databases.iter().any(|d| d.eq_ignore_ascii_case(&db)))
                {
                    self.n += 1;
                    self.answer_err(codes::DB_ACCESS_DENIED, "42000", format!("database \"{name}\" is not part of resource \"{}\": connect to another resource with a new connection", self.target.resource.name));
                    return Ok(());
                }
                let mut q = vec![com::INIT_DB];
                q.extend_from_slice(db.as_bytes());
                self.up_send(up, &q).await?;
                self.simple(up).await
            }
            com::FIELD_LIST => {
                let table = String::from_utf8_lossy(Reader::new(&p[1..]).nul_str()).into_owned();
                let text = format!("SHOW COLUMNS FROM `{}`", table.replace('`', "``"));
                let a = classify::analyze(&text, self.scope());
                let c: Classified = a.classification.into();
                self.judged(
                    r,
                    up,
                    "field_list",
                    &text,
                    None,
                    &c,
                    a.refusal.as_deref(),
                    &p,
                )
                .await
            }
            com::PING | com::STATISTICS | com::SET_OPTION | com::STMT_RESET => {
                self.up_send(up, &p).await?;
                self.simple(up).await
            }
            com::RESET_CONNECTION => {
                self.up_send(up, &p).await?;
                self.simple(up).await?;
                // The server forgot its prepared statements and session state: so does the gateway.
                self.stmts.clear();
                self.last_prepared = None;
                self.policy = self.target.policy.session();
                self.read_reading(up).await
            }
            other => {
                self.answer_err(
                    ER_UNKNOWN_COM,
                    "08S01",
                    format!("command {other:#04x} is not supported through tollgate"),
                );
                Ok(())
            }
        }
    }

    /// COM_CHANGE_USER, as connection pools use it: a reset of the same session. The client
    /// authenticates again — the same certificate, or a token of the same identity — for the
    /// same resource; the upstream is reset with COM_RESET_CONNECTION and the session's state
    /// forgotten and re-read. Anything else is refused and the connection ends (`Ok(false)`).
    async fn change_user(
        &mut self,
        p: &[u8],
        r: &mut BufReader<ReadHalf<Client>>,
        w: &mut WriteHalf<Client>,
        up: &mut UpStream,
    ) -> Result<bool, Broken> {
        self.n += 1;
        let n = self.n;
        let started = Instant::now();
        let mut seq = self.cseq;
        let req = proto::ChangeUser::parse(p, self.caps);
        let database = req.as_ref().map(|c| c.database.clone()).unwrap_or_default();
        let same_resource = database == self.target.resource.name;
        let who: Result<Identity, &str> = match &req {
            Err(_) => Err("protocol"),
            Ok(_) if !same_resource => Err("other_resource"),
            // The TLS session's certificate cannot change: it is the identity again.
            Ok(_) if self.who.method == tollgate_identity::AuthMethod::Cert => {
                if self
                    .who
                    .cert_not_after
                    .is_some_and(|t| std::time::SystemTime::now() >= t)
                {
                    Err("expired_certificate")
                } else {
                    Ok(self.who.clone())
                }
            }
            Ok(c) => {
                let mut s = tokio::io::join(&mut *r, &mut *w);
                self.gw
                    .password_identity(&mut s, &mut seq, c.plugin.as_deref(), &c.auth)
                    .await
                    .map(|(id, _)| id)
            }
        };
        let who = who.and_then(|id| {
            if id.principal == self.who.principal && id.method == self.who.method {
                Ok(id)
            } else {
                Err("other_identity")
            }
        });
        let decision = match &who {
            Ok(_) => Decision::Allow { rule: None },
            Err(reason) => Decision::Deny {
                rule: "change_user".into(),
                message: format!("COM_CHANGE_USER refused ({reason})"),
            },
        };
        self.log.record(&Command {
            n,
            protocol: "change_user",
            text: Some(format!("COM_CHANGE_USER database={database}")),
            decision: Some(decision.summary()),
            ..Command::default()
        });
        self.cseq = seq;
        if let Err(reason) = who {
            self.refuse(
                n,
                codes::ACCESS_DENIED,
                "28000",
                format!(
                    "tollgate: COM_CHANGE_USER only resets this session: authenticate again as {} for resource \"{}\"; open a new connection for another identity or resource ({reason})",
                    self.who.subject, self.target.resource.name
                ),
                started,
            );
            return Ok(false);
        }
        // The server forgets the session's state (prepared statements, variables, temporary
        // tables, transaction): so does the gateway.
        self.up_send(up, &[com::RESET_CONNECTION]).await?;
        let reset = self.up_read(up).await?;
        if reset.first() != Some(&0x00) {
            return Err(Broken::State("reset"));
        }
        self.stmts.clear();
        self.last_prepared = None;
        self.policy = self.target.policy.session();
        self.read_reading(up).await?;
        let ok = OkPacket {
            status: proto::SERVER_STATUS_AUTOCOMMIT,
            ..Default::default()
        };
        self.to_client(&ok.encode());
        self.record_result(n, &mut Summary::default(), started);
        Ok(true)
    }

    /// Relays a one-packet answer (OK, ERR, EOF, a statistics string).
    async fn simple(&mut self, up: &mut UpStream) -> Result<(), Broken> {
        let a = self.up_read(up).await?;
        if a.first() == Some(&0xff) {
            self.server_error(&a, &mut Summary::default());
        } else {
            self.to_client(&a);
        }
        Ok(())
    }

    /// Relays a server's ERR packet with the values it echoes masked for this viewer, and notes
    /// it (masked) in `s` for the audit.
    fn server_error(&mut self, p: &[u8], s: &mut Summary) {
        let Ok(mut e) = ErrPacket::parse(p) else {
            self.to_client(p);
            return;
        };
        if let Some((text, reasons)) = self.errors.as_ref().and_then(|m| m.mask(&e.message)) {
            e.message = text;
            for r in reasons {
                note(s, "error", r);
            }
            self.to_client(&e.encode());
        } else {
            self.to_client(p);
        }
        s.error = Some(e);
    }

    /// Reads how the server reads this session's SQL (`sql_mode`) and its client character
    /// set; one the gateway cannot read SQL in is set back to utf8mb4.
    async fn read_reading(&mut self, up: &mut UpStream) -> Result<(), Broken> {
        let v = self
            .server_values(
                up,
                "SELECT @@SESSION.sql_mode, @@SESSION.character_set_client",
            )
            .await?;
        let (Some(Some(mode)), Some(charset)) = (v.first(), v.get(1)) else {
            return Err(Broken::State("sql_mode"));
        };
        self.mode = SqlMode::parse(mode);
        if !charset.as_deref().is_some_and(classify::safe_charset) {
            let mut q = vec![com::QUERY];
            q.extend_from_slice(b"SET NAMES utf8mb4");
            self.up_send(up, &q).await?;
            if self.up_read(up).await?.first() != Some(&0x00) {
                return Err(Broken::State("character set"));
            }
        }
        Ok(())
    }

    /// The values of the one row `sql` (a query the gateway runs itself) returns.
    async fn server_values(
        &mut self,
        up: &mut UpStream,
        sql: &str,
    ) -> Result<Vec<Option<String>>, Broken> {
        match crate::upstream::query_rows(up, self.caps, sql, self.gw.max_message).await {
            Ok(mut rows) => Ok(rows.pop().unwrap_or_default()),
            Err(crate::upstream::QueryError::Server(e)) => {
                tracing::warn!(session = %self.log.id, code = e.code, error = %e.message, "the server refused the gateway's own query");
                Err(Broken::State("settings"))
            }
            Err(crate::upstream::QueryError::Io(e)) => Err(Broken::Upstream(e)),
            Err(crate::upstream::QueryError::Write(e)) => Err(Broken::Upstream(e.into())),
            Err(crate::upstream::QueryError::Malformed) => Err(Broken::Malformed),
        }
    }

    fn decide(&mut self, c: &Classified, refusal: Option<&str>) -> tollgate_policy::Judgement {
        let caller = tollgate_policy::Caller {
            subject: &self.who.subject,
            groups: &self.who.groups,
        };
        let mut j = self
            .policy
            .judge_classification(c, &caller, time::OffsetDateTime::now_utc());
        if let Some(msg) = refusal {
            j.decision = Decision::Deny {
                rule: "mysql_safety".into(),
                message: format!("{msg} (rule \"mysql_safety\")"),
            };
        }
        j
    }

    /// Judge a command, record it, and forward it (or refuse it), then relay its answer.
    #[allow(clippy::too_many_arguments)]
    async fn judged(
        &mut self,
        r: &mut BufReader<ReadHalf<Client>>,
        up: &mut UpStream,
        protocol: &'static str,
        text: &str,
        statement_id: Option<u32>,
        c: &Classified,
        refusal: Option<&str>,
        wire: &[u8],
    ) -> Result<(), Broken> {
        self.n += 1;
        let n = self.n;
        let started = Instant::now();
        self.forwarded = false;
        let j = self.decide(c, refusal);
        let mut decision = j.decision.summary();
        if let Some(dry) = &j.dry_run {
            decision["dry_run"] = dry.summary();
        }
        let ev = Command {
            n,
            protocol,
            text: Some(clip(text)),
            digest: (text.len() > MAX_TEXT).then(|| sha256_hex(text.as_bytes())),
            statement_id,
            classified: Some(c.line().to_string()),
            decision: Some(decision),
            ..Command::default()
        };
        if let Verdicts::Answered = self.gate(r, &ev, &j.decision, text, started).await {
            for e in j.effects {
                self.policy.confirm(e, Confirmation::Failed);
            }
            return Ok(());
        }
        self.up_send(up, wire).await?;
        self.forwarded = true;
        self.executing = statement_id;
        let s = self.result(up, protocol == "field_list").await;
        self.executing = None;
        let mut s = s?;
        let how = if s.error.is_some() {
            Confirmation::Failed
        } else {
            Confirmation::Done
        };
        for e in j.effects {
            self.policy.confirm(e, how);
        }
        self.record_result(n, &mut s, started);
        if classify::may_change_reading(c) {
            self.read_reading(up).await?;
        }
        Ok(())
    }

    /// Records the command (fail closed) and applies its decision: hold it for review, refuse
    /// it, or let it through.
    async fn gate(
        &mut self,
        r: &mut BufReader<ReadHalf<Client>>,
        ev: &Command,
        decision: &Decision,
        text: &str,
        started: Instant,
    ) -> Verdicts {
        let n = ev.n;
        let written = if self.gw.record_commands || !decision.is_allow() {
            match tokio::time::timeout(self.gw.audit_timeout, self.log.append(ev)).await {
                Ok(Ok(())) => true,
                _ => false,
            }
        } else {
            true
        };
        if !written && self.gw.audit_fail_closed {
            self.log.record_refused(ev, "audit_unavailable");
            self.refuse(n, codes::UNKNOWN, "HY000", "tollgate cannot write the audit record of this statement, so it was not run; try again shortly".into(), started);
            return Verdicts::Answered;
        }
        match decision {
            Decision::Allow { .. } => Verdicts::Forward,
            Decision::Deny { message, .. } => {
                self.refuse(
                    n,
                    ER_SPECIFIC_ACCESS_DENIED,
                    "42000",
                    format!("tollgate: {message}"),
                    started,
                );
                Verdicts::Answered
            }
            Decision::Review {
                rule,
                approvers,
                min_approvals,
                timeout,
            } => {
                self.hold(
                    r,
                    n,
                    text,
                    rule,
                    approvers,
                    *min_approvals,
                    *timeout,
                    started,
                )
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn hold(
        &mut self,
        r: &mut BufReader<ReadHalf<Client>>,
        n: u64,
        text: &str,
        rule: &str,
        approvers: &[String],
        min_approvals: u32,
        timeout: std::time::Duration,
        started: Instant,
    ) -> Verdicts {
        let Some(reviews) = self.gw.reviews.clone() else {
            self.refuse(n, ER_SPECIFIC_ACCESS_DENIED, "42000", format!("tollgate: this statement needs approval (rule \"{rule}\") but reviews are not available on this gateway"), started);
            return Verdicts::Answered;
        };
        let mut d = ring::digest::Context::new(&ring::digest::SHA256);
        d.update(b"mysql\0");
        d.update(text.as_bytes());
        let req = HoldRequest {
            session_id: &self.log.id,
            resource: &self.target.resource.name,
            subject: &self.who.subject,
            groups: &self.who.groups,
            principal: &self.who.principal,
            rule,
            shown: clip(text),
            digest: hex::encode(d.finish()),
            approvers,
            min_approvals,
            timeout,
        };
        let review = match hold::open(&reviews, req, self.gw.review_rerun_window) {
            Ok(Opened::Rerun(rv)) => {
                self.log.record(&ReviewEvent {
                    kind: "review.rerun",
                    n,
                    review: rv.id,
                    reviewers: vec![],
                    waited_ms: None,
                });
                return Verdicts::Forward;
            }
            Ok(Opened::Pending(rv)) => rv,
            Err(e) => {
                tracing::error!(session = %self.log.id, error = %e, "could not open a review");
                self.refuse(
                    n,
                    codes::UNKNOWN,
                    "HY000",
                    "tollgate could not open a review for this statement, so it was not run".into(),
                    started,
                );
                return Verdicts::Answered;
            }
        };
        // MySQL has no notices: the review id goes to the log (and the notifications) now,
        // and into the error if the statement does not run.
        tracing::info!(session = %self.log.id, review = %review.id, url = ?review.url, resource = %self.target.resource.name, subject = %self.who.subject, "statement held for review; the client waits");
        self.log.record(&ReviewEvent {
            kind: "review.requested",
            n,
            review: review.id.clone(),
            reviewers: vec![],
            waited_ms: None,
        });
        let held = Instant::now();
        self.holding = Some(Holding {
            n,
            review: review.id.clone(),
            rule: rule.to_string(),
            since: held,
        });
        let cancelled = self.cancelled.clone();
        let mut killed = false;
        let withdrawn = async {
            tokio::select! {
                _ = cancelled.notify.notified() => {
                    killed = true;
                    if cancelled.connection.load(std::sync::atomic::Ordering::SeqCst) {
                        "the connection was killed (KILL CONNECTION) while the statement was held"
                    } else {
                        "the client cancelled the held statement (KILL QUERY)"
                    }
                    .to_string()
                }
                // The client closed its connection (data it sends waits its turn).
                _ = async {
                    if let Ok(b) = r.fill_buf().await {
                        if !b.is_empty() {
                            std::future::pending::<()>().await
                        }
                    }
                } => "the client disconnected while the statement was held".to_string(),
            }
        };
        let verdict = hold::hold(&reviews, &review.id, withdrawn).await;
        self.holding = None;
        let waited_ms = held.elapsed().as_millis() as u64;
        let (outcome, msg) = match verdict {
            Verdict::Approved { reviewers } => {
                self.log.record(&ReviewEvent {
                    kind: "review.approved",
                    n,
                    review: review.id.clone(),
                    reviewers,
                    waited_ms: Some(waited_ms),
                });
                return Verdicts::Forward;
            }
            Verdict::Denied { reviewer, reason } => (
                "denied",
                format!(
                    "review {} denied by {reviewer}: {}",
                    review.id,
                    reason.as_deref().unwrap_or("no reason given")
                ),
            ),
            Verdict::Expired => (
                "expired",
                format!(
                    "review {} expired after {} without a decision; the statement was not run",
                    review.id,
                    tollgate_review::format_duration(timeout)
                ),
            ),
            Verdict::Withdrawn => (
                "withdrawn",
                if killed
                    && self
                        .cancelled
                        .connection
                        .load(std::sync::atomic::Ordering::SeqCst)
                {
                    format!(
                        "review {} was withdrawn: the connection was killed (KILL CONNECTION) while the statement was held; it was not run",
                        review.id
                    )
                } else {
                    format!(
                        "review {} was withdrawn: the statement was cancelled while held and not run",
                        review.id
                    )
                },
            ),
            Verdict::Unavailable(_) => (
                "unavailable",
                format!(
                    "review {} cannot be read; the statement was not run",
                    review.id
                ),
            ),
        };
        self.log.record(&ReviewRefused {
            n,
            review: review.id.clone(),
            outcome,
            waited_ms,
        });
        let (code, state) = if killed {
            if self
                .cancelled
                .connection
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                (ER_CONNECTION_KILLED, CONNECTION_KILLED_STATE)
            } else {
                (ER_QUERY_INTERRUPTED, CONNECTION_KILLED_STATE)
            }
        } else {
            (ER_SPECIFIC_ACCESS_DENIED, "42000")
        };
        self.refuse(
            n,
            code,
            state,
            format!("tollgate: {msg} (rule \"{rule}\")"),
            started,
        );
        Verdicts::Answered
    }

    fn refuse(&mut self, n: u64, code: u16, sqlstate: &str, message: String, started: Instant) {
        self.answer_err(code, sqlstate, message.clone());
        self.log.record(&CommandResult {
            n,
            outcome: "refused",
            sqlstate: Some(sqlstate.into()),
            rows: 0,
            tag: None,
            duration_us: started.elapsed().as_micros() as u64,
            masked: Vec::new(),
            capture: None,
            error_code: Some(code),
            message: Some(message),
        });
    }

    fn record_result(&self, n: u64, s: &mut Summary, started: Instant) {
        for (_, by, values) in &s.masked {
            let kind = if by.starts_with("mask rule") {
                "column"
            } else {
                by.as_str()
            };
            registry()
                .counter(
                    "tollgate_masked_values_total",
                    "Values masked in responses, by resource and detector (or column rule).",
                    &[("resource", &self.target.resource.name), ("by", kind)],
                )
                .add(*values as i64);
        }
        if !self.gw.record_commands {
            return;
        }
        let masked = std::mem::take(&mut s.masked)
            .into_iter()
            .map(|(column, by, values)| MaskedCount { column, by, values })
            .collect();
        self.log.record(&CommandResult {
            n,
            outcome: if s.error.is_some() { "error" } else { "ok" },
            sqlstate: s.error.as_ref().map(|e| e.sqlstate().to_string()),
            rows: s.rows.max(s.affected),
            tag: s.error.is_none().then(|| {
                if s.rows > 0 {
                    format!("SELECT {}", s.rows)
                } else {
                    format!("OK {}", s.affected)
                }
            }),
            duration_us: started.elapsed().as_micros() as u64,
            masked,
            capture: s.capture.take().and_then(Capture::finish),
            error_code: s.error.as_ref().map(|e| e.code),
            message: s.error.as_ref().map(|e| e.message.clone()),
        });
    }

    /// `KILL [QUERY] <id>` names the gateway's connection id: mapped to the upstream's, for a
    /// session of the same identity on the same resource.
    async fn kill(
        &mut self,
        r: &mut BufReader<ReadHalf<Client>>,
        up: &mut UpStream,
        text: &str,
        query: bool,
        id: u64,
    ) -> Result<(), Broken> {
        let entry = u32::try_from(id)
            .ok()
            .and_then(|id| self.gw.threads.get(id));
        let Some(e) = entry
            .filter(|e| e.subject == self.who.subject && e.resource == self.target.resource.name)
        else {
            self.n += 1;
            self.answer_err(
                ER_NO_SUCH_THREAD,
                "HY000",
                format!("Unknown thread id: {id}"),
            );
            return Ok(());
        };
        let mapped = format!(
            "KILL {}{}",
            if query { "QUERY " } else { "CONNECTION " },
            e.upstream_thread
        );
        let mut wire = vec![com::QUERY];
        wire.extend_from_slice(mapped.as_bytes());
        let c: Classified = classify::analyze(&mapped, self.scope())
            .classification
            .into();
        self.judged(r, up, "query", text, None, &c, None, &wire)
            .await?;
        // A statement held for review is not upstream yet: the KILL withdraws it.
        if self.forwarded {
            if !query {
                e.cancelled
                    .connection
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            e.cancelled.notify.notify_waiters();
        }
        Ok(())
    }

    async fn prepare(
        &mut self,
        up: &mut UpStream,
        text: String,
        c: Arc<Classified>,
        refusal: Option<String>,
        wire: &[u8],
    ) -> Result<(), Broken> {
        self.n += 1;
        let n = self.n;
        let started = Instant::now();
        let j = self.decide(&c, refusal.as_deref());
        let ev = Command {
            n,
            protocol: "prepare",
            text: Some(clip(&text)),
            digest: (text.len() > MAX_TEXT).then(|| sha256_hex(text.as_bytes())),
            classified: Some(c.line().to_string()),
            decision: Some(j.decision.summary()),
            ..Command::default()
        };
        // Preparing runs nothing: a statement held for review waits when it is executed.
        if self.gw.record_commands || j.decision.is_deny() {
            self.log.record(&ev);
        }
        if let Decision::Deny { message, .. } = &j.decision {
            self.last_prepared = None;
            self.refuse(
                n,
                ER_SPECIFIC_ACCESS_DENIED,
                "42000",
                format!("tollgate: {message}"),
                started,
            );
            return Ok(());
        }
        self.up_send(up, wire).await?;
        let first = self.up_read(up).await?;
        if first.first() == Some(&0xff) {
            self.last_prepared = None;
            let mut s = Summary::default();
            self.server_error(&first, &mut s);
            self.record_result(n, &mut s, started);
            return Ok(());
        }
        self.to_client(&first);
        let ok = proto::PrepareOk::parse(&first).map_err(|_| Broken::Malformed)?;
        let eof = self.caps & proto::caps::DEPRECATE_EOF == 0;
        for _ in 0..ok.params {
            let p = self.up_read(up).await?;
            self.to_client(&p);
        }
        if ok.params > 0 && eof {
            let p = self.up_read(up).await?;
            self.to_client(&p);
        }
        let mut columns = Vec::with_capacity(usize::from(ok.columns));
        for _ in 0..ok.columns {
            let p = self.up_read(up).await?;
            columns.push(Column::parse(&p).map_err(|_| Broken::Malformed)?);
            self.to_client(&p);
        }
        if ok.columns > 0 && eof {
            let p = self.up_read(up).await?;
            self.to_client(&p);
        }
        self.stmts.insert(
            ok.statement_id,
            Prepared {
                text: Arc::from(text.as_str()),
                classified: c,
                refusal,
                columns,
            },
        );
        self.last_prepared = Some(ok.statement_id);
        self.record_result(n, &mut Summary::default(), started);
        Ok(())
    }

    fn plan(&self, columns: &[Column]) -> RowPlan {
        match (&self.target.mask, self.unmasked) {
            (Some(policy), false) => plan_for(policy, columns, &self.who.groups),
            _ => RowPlan::passthrough(),
        }
    }

    /// How captured rows are masked: every rule, whoever the viewer is.
    fn audit_plan(&self, columns: &[Column]) -> RowPlan {
        match &self.target.audit_mask {
            Some(policy) => plan_for(policy, columns, &[]),
            None => RowPlan::passthrough(),
        }
    }

    fn capturing(&self) -> Option<Capture> {
        let r = &self.target.resource;
        r.capture_results.then(|| Capture::new(r.capture_bytes))
    }

    /// Relays the answer to a query or an execution: OKs, errors and result sets (text or
    /// binary rows), as many as the server sends.
    async fn result(&mut self, up: &mut UpStream, field_list: bool) -> Result<Summary, Broken> {
        let mut s = Summary {
            capture: self.capturing(),
            ..Default::default()
        };
        let eof = self.caps & proto::caps::DEPRECATE_EOF == 0;
        if field_list {
            loop {
                let p = self.up_read(up).await?;
                match p.first() {
                    Some(0xff) => {
                        self.server_error(&p, &mut s);
                        return Ok(s);
                    }
                    Some(0xfe) => {
                        self.to_client(&p);
                        return Ok(s);
                    }
                    _ => self.to_client(&p),
                }
            }
        }
        loop {
            let p = self.up_read(up).await?;
            match p.first() {
                Some(0x00) => {
                    let ok = OkPacket::parse(&p).map_err(|_| Broken::Malformed)?;
                    s.affected += ok.affected_rows;
                    self.to_client(&p);
                    if ok.status & proto::SERVER_MORE_RESULTS_EXISTS == 0 {
                        return Ok(s);
                    }
                }
                Some(0xff) => {
                    self.server_error(&p, &mut s);
                    return Ok(s);
                }
                Some(0xfb) => {
                    // LOCAL INFILE request (never offered): answer with no data, then refuse.
                    let mut seq = self.useq;
                    write_packet(up, &mut seq, &[])
                        .await
                        .map_err(|e| Broken::Upstream(e.into()))?;
                    let _ = self.up_read(up).await?;
                    let e = ErrPacket::new(ER_SPECIFIC_ACCESS_DENIED, "42000", "tollgate: LOAD DATA LOCAL INFILE is refused (the server asked the client for a local file)");
                    self.to_client(&e.encode());
                    s.error = Some(e);
                    return Ok(s);
                }
                Some(_) => {
                    let count = Reader::new(&p)
                        .lenenc_int()
                        .map_err(|_| Broken::Malformed)?;
                    self.to_client(&p);
                    let mut columns = Vec::new();
                    for _ in 0..count {
                        let c = self.up_read(up).await?;
                        columns.push(Column::parse(&c).map_err(|_| Broken::Malformed)?);
                        self.to_client(&c);
                    }
                    if eof {
                        let e = self.up_read(up).await?;
                        self.to_client(&e);
                        let status = proto::end_status(&e);
                        if status & SERVER_STATUS_CURSOR_EXISTS != 0 {
                            // Rows come with COM_STMT_FETCH.
                            self.remember_columns(columns);
                            return Ok(s);
                        }
                    }
                    let binary = self.binary_pending();
                    let plan = self.plan(&columns);
                    let capture = s
                        .capture
                        .as_mut()
                        .is_some_and(|c| c.begin(&columns, || self.audit_plan(&columns)));
                    let status = self
                        .rows(up, &columns, binary, &plan, capture, &mut s)
                        .await?;
                    if binary {
                        self.remember_columns(columns);
                    }
                    if s.error.is_some() || status & proto::SERVER_MORE_RESULTS_EXISTS == 0 {
                        return Ok(s);
                    }
                }
                None => return Err(Broken::Malformed),
            }
        }
    }

    /// Whether the answer being relayed is to an execution (binary rows).
    fn binary_pending(&self) -> bool {
        self.executing.is_some()
    }

    fn remember_columns(&mut self, columns: Vec<Column>) {
        if let Some(id) = self.executing {
            if let Some(st) = self.stmts.get_mut(&id) {
                st.columns = columns;
            }
        }
    }

    /// Relays rows until their end (a copy to `s.capture` if `capture`); returns the end's
    /// status flags.
    async fn rows(
        &mut self,
        up: &mut UpStream,
        columns: &[Column],
        binary: bool,
        plan: &RowPlan,
        capture: bool,
        s: &mut Summary,
    ) -> Result<u16, Broken> {
        let mut masked = Vec::new();
        loop {
            let p = self.up_read(up).await?;
            if proto::is_end_of_rows(&p) {
                self.to_client(&p);
                return Ok(proto::end_status(&p));
            }
            if p.first() == Some(&0xff) {
                self.server_error(&p, s);
                return Ok(0);
            }
            s.rows += 1;
            if let Some(c) = s.capture.as_mut().filter(|_| capture) {
                c.row(columns, &p, binary).map_err(|_| Broken::Malformed)?;
            }
            if !plan.is_active() {
                self.to_client(&p);
                continue;
            }
            masked.clear();
            let changed = if binary {
                mask_binary_row(plan, columns, &p, &mut masked, s)
            } else {
                mask_text_row(plan, columns, &p, &mut masked, s)
            }
            .map_err(|_| Broken::Malformed)?;
            if changed {
                let m = std::mem::take(&mut masked);
                self.to_client(&m);
                masked = m;
            } else {
                self.to_client(&p);
            }
        }
    }
}

fn plan_for(policy: &tollgate_mask::Policy, columns: &[Column], groups: &[String]) -> RowPlan {
    let infos: Vec<ColumnInfo> = columns
        .iter()
        .map(|c| ColumnInfo {
            name: c.mask_name().to_string(),
            table: (!c.org_table.is_empty()).then(|| c.org_table.clone()),
            field_type: Some(c.mask_type()),
            encoding: c.mask_encoding(),
        })
        .collect();
    policy.plan(&infos, groups)
}

fn note(s: &mut Summary, column: &str, reason: tollgate_mask::Reason) {
    let by = reason.to_string();
    match s
        .masked
        .iter_mut()
        .find(|(c, b, _)| c == column && *b == by)
    {
        Some(e) => e.2 += 1,
        None => s.masked.push((column.to_string(), by, 1)),
    }
}

/// The name the client sees for column `i` (its alias), for the audit's `masked` counts.
fn column_name(columns: &[Column], i: usize) -> &str {
    columns.get(i).map_or("", |c| c.name.as_str())
}

/// A text-protocol row: each value a length-encoded string, or 0xfb for NULL.
fn mask_text_row(
    plan: &RowPlan,
    columns: &[Column],
    p: &[u8],
    out: &mut Vec<u8>,
    s: &mut Summary,
) -> Result<bool, proto::Malformed> {
    let mut r = Reader::new(p);
    let mut changed = false;
    let mut col = 0;
    let mut m = Vec::new();
    while r.remaining() > 0 {
        match r.lenenc_str()? {
            None => out.push(0xfb),
            Some(v) => {
                m.clear();
                match plan.mask_value(col, v, &mut m) {
                    Outcome::Unchanged => proto::put_lenenc_str(out, v),
                    Outcome::Masked(reason) => {
                        proto::put_lenenc_str(out, &m);
                        note(s, column_name(columns, col), reason);
                        changed = true;
                    }
                    Outcome::Null(reason) => {
                        out.push(0xfb);
                        note(s, column_name(columns, col), reason);
                        changed = true;
                    }
                }
            }
        }
        col += 1;
    }
    Ok(changed)
}

/// A binary-protocol row: 0x00, a NULL bitmap (offset 2), then the non-NULL values laid out
/// by type. A masked string is rewritten; any other masked value becomes NULL.
fn mask_binary_row(
    plan: &RowPlan,
    columns: &[Column],
    p: &[u8],
    out: &mut Vec<u8>,
    s: &mut Summary,
) -> Result<bool, proto::Malformed> {
    let n = columns.len();
    let bitmap_len = (n + 7 + 2) / 8;
    let mut r = Reader::new(p);
    if r.u8()? != 0 {
        return Err(proto::Malformed("binary row header"));
    }
    let mut bitmap = r.bytes(bitmap_len)?.to_vec();
    let mut values = Vec::with_capacity(p.len());
    let mut changed = false;
    let mut m = Vec::new();
    for (i, c) in columns.iter().enumerate() {
        let bit = i + 2;
        if bitmap[bit / 8] & (1 << (bit % 8)) != 0 {
            continue;
        }
        let start = r.pos();
        let value = binary_value(&mut r, c)?;
        let raw = &p[start..r.pos()];
        m.clear();
        match plan.mask_value(i, value.as_bytes(), &mut m) {
            Outcome::Unchanged => values.extend_from_slice(raw),
            Outcome::Masked(reason) if c.binary_layout() == Layout::String => {
                proto::put_lenenc_str(&mut values, &m);
                note(s, &c.name, reason);
                changed = true;
            }
            Outcome::Masked(reason) | Outcome::Null(reason) => {
                bitmap[bit / 8] |= 1 << (bit % 8);
                note(s, &c.name, reason);
                changed = true;
            }
        }
    }
    out.push(0);
    out.extend_from_slice(&bitmap);
    out.extend_from_slice(&values);
    Ok(changed)
}

fn clip(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}
