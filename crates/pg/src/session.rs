//! One client connection, from its first byte to its last: TLS negotiation, identity,
//! authorization, the upstream connection, then the relay.

use crate::cancel::{BackendKey, CancelRegistry};
use crate::cancel_forward::count_cancel;
use crate::interrupt::{Interrupt, Interruptible};
use crate::limits::{Cap, IdentitySlot, SourceSlot};
use crate::pool::PoolError;
use crate::proto::backend::{self, Severity};
use crate::proto::frontend;
use crate::proto::startup::{self, Startup, StartupPacket};
use crate::refusal::{Refusal, StandingLost};
use crate::relay::{self, RelayEnd};
use crate::standing::{Ended, Standing};
use crate::upstream::UpStream;
use crate::{io::read_frame, io::FrameBuf, PgGateway};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_gate::event::{
    self, CommandResult, Detail, Event, PgClientLeg, PgIdentity, PgSessionClose, PgSessionOpen,
    PgStartup, PgTls, PgUpstreamLeg, RelayTotals, SessionTerminated,
};
use tollgate_identity::Identity;
use tollgate_metrics::{registry, GaugeGuard};
use tollgate_store::{CanonicalEvent, EventInput};

const LISTENER: &str = "postgres";

/// A session's audit context: its id and the facts gathered so far for `session.open`.
pub(crate) struct SessionLog {
    pub id: String,
    pub started: Instant,
    pub open: PgSessionOpen,
    gw: Arc<PgGateway>,
    peer: SocketAddr,
}

/// An event with the time it was made, recorded later (a command's, with the batch it came in).
pub(crate) struct Stamped<E> {
    pub event: E,
    at: SystemTime,
    t_us: u64,
}

impl SessionLog {
    fn new(gw: Arc<PgGateway>, peer: SocketAddr) -> Self {
        SessionLog {
            id: tollgate_gate::session::new_session_id(),
            started: Instant::now(),
            open: PgSessionOpen {
                listener: LISTENER,
                client_addr: peer.to_string(),
                client: None,
                startup: None,
                identity: None,
                grants: serde_json::Map::new(),
                resource: None,
                upstream: None,
            },
            gw,
            peer,
        }
    }

    /// An event of this session: wall-clock time in `at`, and `t_us`, microseconds since the
    /// connection was accepted on a monotonic clock, so the order and pacing of a session's
    /// events hold even when the wall clock steps.
    pub fn input(&self, event: &impl Event) -> EventInput {
        event::to_input(&self.id, event, SystemTime::now(), self.t_us())
    }

    /// `event`, stamped now, for [`SessionLog::stamped_input`] later.
    pub fn stamp<E: Event>(&self, event: E) -> Stamped<E> {
        Stamped {
            event,
            at: SystemTime::now(),
            t_us: self.t_us(),
        }
    }

    /// [`SessionLog::input`] of an event stamped earlier, with its stamp.
    pub fn stamped_input(&self, s: &Stamped<impl Event>) -> EventInput {
        event::to_input(&self.id, &s.event, s.at, s.t_us)
    }

    /// Microseconds since the connection was accepted: the `t_us` of an event made now.
    pub fn t_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Command results, journaled in one append: their payloads are canonical JSON written
    /// directly (the relay's hot path), `t_us` when they are journaled.
    pub fn record_results(&self, results: impl Iterator<Item = CommandResult>) {
        let events = results
            .map(|r| {
                let payload = r.canonical_payload(self.t_us());
                CanonicalEvent {
                    session_id: self.id.clone(),
                    kind: r.kind().into(),
                    at: SystemTime::now(),
                    payload,
                }
            })
            .collect::<Vec<_>>();
        if !events.is_empty() {
            self.gw.recorder.record_canonical(events);
        }
    }

    /// Record an event that gates nothing.
    pub fn record(&self, event: &impl Event) {
        self.gw.recorder.record(self.input(event));
    }

    /// False when `server.record_commands = false`: command and result events are skipped.
    pub fn records_commands(&self) -> bool {
        self.gw.record_commands
    }

    /// End a connection that never reached a command: tell the client why, then record it.
    async fn refuse<S: AsyncWrite + Unpin>(self, s: &mut S, refusal: Refusal, detail: Detail) {
        refuse(s, &refusal).await;
        self.rejected(refusal.reason(), detail);
    }

    /// End a connection refused before it was identified (or over a cap): tell the client why,
    /// and count it in the aggregate instead of recording a session.
    async fn refuse_unidentified<S: AsyncWrite + Unpin>(self, s: &mut S, refusal: Refusal) {
        refuse(s, &refusal).await;
        self.dropped_unidentified(refusal.reason());
    }

    /// A connection that ended before it was identified, counted in the aggregate.
    fn dropped_unidentified(self, reason: &'static str) {
        self.gw.refused(reason, self.peer.ip());
    }

    /// Record a connection that ends before any command ran (refused, failed, cancel request).
    fn rejected(self, reason: &str, detail: Detail) {
        self.record(&self.open);
        self.record(&PgSessionClose {
            outcome: "rejected",
            reason: Some(reason.into()),
            detail: Some(detail),
            duration_ms: self.started.elapsed().as_millis() as u64,
            totals: None,
        });
    }
}

fn handshake_counter(outcome: &str, reason: &str) {
    registry()
        .counter(
            "tollgate_handshakes_total",
            "Client connection handshakes by listener, outcome and failure reason.",
            &[
                ("listener", LISTENER),
                ("outcome", outcome),
                ("reason", reason),
            ],
        )
        .inc();
}

impl PgGateway {
    /// A connection refused before it was identified (or over a cap): counted, and tallied for
    /// the aggregate `connection.refused` event.
    fn refused(&self, reason: &'static str, source: std::net::IpAddr) {
        registry()
            .counter(
                "tollgate_connections_refused_total",
                "Client connections (or API requests) refused before authentication completed, or over a connection cap, by listener and reason.",
                &[("listener", LISTENER), ("reason", reason)],
            )
            .inc();
        self.refusals.record(reason, source);
    }
}

fn auth_failure(reason: &str) {
    registry()
        .counter(
            "tollgate_auth_failures_total",
            "Client authentication or authorization failures by reason.",
            &[("listener", LISTENER), ("reason", reason)],
        )
        .inc();
}

/// Write a FATAL error and close: how every refusal ends, never a silent drop.
/// Tell the client why its connection ends (FATAL), then close it.
async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, refusal: &Refusal) {
    let hint = refusal.hint();
    let _ = s
        .write_all(&backend::error(
            Severity::Fatal,
            refusal.sqlstate(),
            &refusal.message(),
            hint.as_deref(),
        ))
        .await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

async fn read_startup<S: AsyncRead + Unpin>(s: &mut S) -> Result<StartupPacket, String> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let len = startup::packet_len(&head)
        .map_err(|e| e.to_string())?
        .ok_or("short packet")?;
    let mut packet = vec![0u8; len];
    packet[..4].copy_from_slice(&head);
    s.read_exact(&mut packet[4..])
        .await
        .map_err(|e| format!("read: {e}"))?;
    startup::parse(&packet).map_err(|e| e.to_string())
}

impl PgGateway {
    /// Serve one accepted TCP connection until it ends.
    pub async fn handle(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        // One deadline from accept to an authenticated client: TLS, start-up and authentication.
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        // Over a cap, a bounded number of connections are still answered with 53300 after the
        // start-up packet (what PostgreSQL does too); the rest are closed at once.
        let (slot, over_cap, _refusing) = match self.limits.admit(peer.ip()) {
            Ok(slot) => (Some(slot), None, None),
            Err(cap) => match self.limits.refusing() {
                Some(permit) => (None, Some(cap), Some(permit)),
                None => {
                    self.refused(cap.as_label(), peer.ip());
                    return;
                }
            },
        };
        let _active = GaugeGuard::new(registry().gauge(
            "tollgate_connections_active",
            "Open client connections by listener.",
            &[("listener", LISTENER)],
        ));
        registry()
            .counter(
                "tollgate_connections_total",
                "Accepted client connections by listener.",
                &[("listener", LISTENER)],
            )
            .inc();
        let mut log = SessionLog::new(self.clone(), peer);

        // Before TLS: GSSENCRequest is declined, SSLRequest accepted, a 0x16 byte is PostgreSQL 17 direct TLS,
        // a CancelRequest is served, and a plaintext StartupMessage is refused with an explanation.
        let pre = tokio::time::timeout_at(deadline, async {
            loop {
                let mut first = [0u8; 1];
                match tcp.peek(&mut first).await {
                    Ok(0) | Err(_) => return PreTls::Invalid("closed before start-up".into()),
                    Ok(_) => {}
                }
                if first[0] == startup::TLS_HANDSHAKE_BYTE {
                    return PreTls::Tls { direct: true };
                }
                let packet = match read_startup(&mut tcp).await {
                    Ok(p) => p,
                    Err(e) => return PreTls::Invalid(e),
                };
                match packet {
                    StartupPacket::GssEncRequest => {
                        if tcp.write_all(b"N").await.is_err() {
                            return PreTls::Invalid("closed".into());
                        }
                    }
                    StartupPacket::SslRequest => {
                        if tcp.write_all(b"S").await.is_err() {
                            return PreTls::Invalid("closed".into());
                        }
                        return PreTls::Tls { direct: false };
                    }
                    StartupPacket::Cancel { pid, secret } => return PreTls::Cancel { pid, secret },
                    // Between replicas only inside TLS, authenticated: refused in plaintext.
                    StartupPacket::ForwardedCancel { .. } => return PreTls::ForwardedCancel,
                    StartupPacket::Startup(_) => return PreTls::Plaintext,
                }
            }
        })
        .await
        .unwrap_or(PreTls::Timeout);
        let direct = match pre {
            PreTls::Tls { direct } => direct,
            PreTls::Cancel { pid, secret } => {
                self.serve_cancel(pid, &secret).await;
                return;
            }
            PreTls::ForwardedCancel => {
                self.serve_forwarded_cancel(0, &[], None).await;
                return;
            }
            PreTls::Plaintext if over_cap.is_some() => {
                refuse_over_cap(log, &mut tcp, over_cap.unwrap()).await;
                return;
            }
            PreTls::Plaintext => {
                handshake_counter("failed", "plaintext");
                tracing::debug!(%peer, "refused plaintext PostgreSQL start-up");
                log.refuse_unidentified(&mut tcp, Refusal::Plaintext).await;
                return;
            }
            PreTls::Invalid(e) => {
                handshake_counter("failed", "protocol");
                log.refuse_unidentified(&mut tcp, Refusal::BadStartup(e))
                    .await;
                return;
            }
            PreTls::Timeout => {
                handshake_counter("failed", "timeout");
                log.dropped_unidentified("handshake_timeout");
                return;
            }
        };

        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.config());
        let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = tollgate_tls::classify_handshake_error(&e);
                handshake_counter("failed", reason.as_label());
                tracing::debug!(%peer, reason = reason.as_label(), error = %e, "client TLS handshake failed");
                log.dropped_unidentified(if reason == tollgate_tls::HandshakeFailure::Revoked {
                    "tls_revoked"
                } else {
                    "tls_handshake"
                });
                return;
            }
            Err(_) => {
                handshake_counter("failed", "timeout");
                log.dropped_unidentified("handshake_timeout");
                return;
            }
        };
        let info = tollgate_tls::session_info(tls.get_ref().1);
        if direct && info.alpn.as_deref() != Some("postgresql") {
            handshake_counter("failed", "alpn");
            log.refuse_unidentified(&mut tls, Refusal::DirectTlsWithoutAlpn)
                .await;
            return;
        }
        handshake_counter("ok", "none");
        log.open.client = Some(PgClientLeg {
            direct_tls: direct,
            client_tls: PgTls {
                version: info.version.clone(),
                cipher: info.cipher.clone(),
                alpn: Some(info.alpn.clone()),
            },
        });
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());

        let startup = match tokio::time::timeout_at(deadline, read_startup(&mut tls)).await {
            Ok(Ok(StartupPacket::Startup(s))) => s,
            Ok(Ok(StartupPacket::Cancel { pid, secret })) => {
                self.serve_cancel(pid, &secret).await;
                return;
            }
            Ok(Ok(StartupPacket::ForwardedCancel { pid, secret })) => {
                self.serve_forwarded_cancel(pid, &secret, peer_cert.as_deref())
                    .await;
                return;
            }
            Ok(Ok(_)) => {
                log.refuse_unidentified(&mut tls, Refusal::EncryptionInsideTls)
                    .await;
                return;
            }
            Ok(Err(e)) => {
                log.refuse_unidentified(&mut tls, Refusal::BadStartup(e))
                    .await;
                return;
            }
            Err(_) => {
                log.dropped_unidentified("handshake_timeout");
                return;
            }
        };
        if let Some(cap) = over_cap {
            refuse_over_cap(log, &mut tls, cap).await;
            return;
        }
        self.authenticated_session(tls, startup, peer_cert, log, deadline, slot)
            .await;
    }

    async fn authenticated_session(
        self: Arc<Self>,
        mut tls: tokio_rustls::server::TlsStream<TcpStream>,
        startup: Startup,
        peer_cert: Option<Vec<u8>>,
        mut log: SessionLog,
        deadline: tokio::time::Instant,
        _slot: Option<SourceSlot>,
    ) {
        let client_user = startup.param("user").unwrap_or("").to_string();
        let database = startup
            .param("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(&client_user)
            .to_string();
        let application_name = startup.param("application_name").map(str::to_string);

        // Protocol 3.2 (longer cancel keys) is offered to clients that ask; the upstream leg speaks 3.0.
        let minor = startup.minor.min(startup::LATEST_MINOR);
        let unknown: Vec<&str> = startup
            .params
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("_pq_."))
            .collect();
        let mut out = Vec::with_capacity(512);
        if startup.minor > startup::LATEST_MINOR || !unknown.is_empty() {
            out.extend_from_slice(&backend::negotiate_protocol_version(minor, &unknown));
        }
        log.open.startup = Some(PgStartup {
            client_user: client_user.clone(),
            database: database.clone(),
            application_name,
            protocol: format!("3.{minor}"),
        });

        // Identity: the verified client certificate, else a token sent as the password (inside TLS).
        let Some((mut log, identity, token_sha256, _identity_slot)) = self
            .identify(
                &mut tls,
                log,
                peer_cert.as_deref(),
                &client_user,
                &mut out,
                deadline,
            )
            .await
        else {
            return;
        };
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        log.open.identity = Some(PgIdentity {
            subject: identity.subject.clone(),
            groups: identity.groups.clone(),
            auth_method: identity.method.as_str(),
            client_cert_fingerprint: identity.cert_fingerprint.clone(),
            token_expires_unix: identity.expires_at.map(unix),
            client_cert_not_after_unix: identity.cert_not_after.map(unix),
        });

        // Authorization: the database name picks the resource. Unknown and forbidden look the same,
        // so the answer does not reveal which resources exist.
        // Just-in-time access: an approved access review reaches a resource until the grant ends.
        let targets = self.targets.load_full();
        let found = targets.get(&database);
        let access = match tollgate_gate::authorize(
            &identity,
            found.map(|t| (t.resource.name.as_str(), t.resource.allow_groups.as_slice())),
            self.reviews.as_deref(),
            found.is_some_and(|t| t.mask.is_some()),
            &database,
        ) {
            Ok(access) => access,
            Err(forbidden) => {
                auth_failure("forbidden");
                log.refuse(&mut tls, Refusal::Forbidden(forbidden), Detail::Empty {})
                    .await;
                return;
            }
        };
        // The session keeps this target (its policy as configured now) until it ends.
        let target = found.expect("authorized").clone();
        drop(targets);
        access.audit_fields(&mut log.open.grants);
        log.open.resource = Some(target.resource.name.clone());
        // An approved unmask review lets this identity see the resource unmasked for a while
        // (its audit captures stay masked).
        let (grant, unmask) = (access.grant, access.unmask);

        let pooled = target.resource.pool.mode != tollgate_config::PoolMode::None;
        let _client_slot = match self
            .pools
            .admit(&target.resource.name, target.resource.pool.max_client_conn)
        {
            Some(slot) => slot,
            None => {
                let refusal = Refusal::ResourceFull {
                    resource: target.resource.name.clone(),
                };
                log.refuse(&mut tls, refusal, Detail::Empty {}).await;
                return;
            }
        };
        let connected = if pooled {
            self.pools
                .connect(&target, &startup.params, &self.upstreams, self.max_message)
                .await
                .map(|p| (p.connected, p.key))
        } else {
            target
                .connect(&startup.params, self.max_message)
                .await
                .map(|c| {
                    let key = Arc::new(BackendKey::new(c.pid, c.secret.clone()));
                    (c, key)
                })
                .map_err(PoolError::from)
        };
        let (upstream, backend_key) = match connected {
            Ok(c) => c,
            Err(e) => {
                registry()
                    .counter(
                        "tollgate_upstream_connect_failures_total",
                        "Failed upstream connections by resource and reason.",
                        &[("resource", &target.resource.name), ("reason", e.label())],
                    )
                    .inc();
                tracing::error!(session = %log.id, resource = %target.resource.name, upstream = %target.resource.upstream, error = %e, "upstream connection failed");
                let refusal = Refusal::UpstreamUnavailable {
                    resource: target.resource.name.clone(),
                    session: log.id.clone(),
                };
                log.refuse(&mut tls, refusal, Detail::Failure { failure: e.label() })
                    .await;
                return;
            }
        };
        // Tag this connection as the gateway's own for as long as the session lasts.
        let _upstream_entry = upstream.stream.local_addr().ok().map(|local_addr| {
            self.upstreams.register(crate::UpstreamConn {
                resource: target.resource.name.clone(),
                upstream: target.resource.upstream.clone(),
                local_addr,
                backend_pid: Some(upstream.pid),
            })
        });
        log.open.upstream = Some(PgUpstreamLeg {
            upstream_tls: upstream.tls_info.as_ref().map(|up| PgTls {
                version: up.version.clone(),
                cipher: up.cipher.clone(),
                alpn: None,
            }),
            upstream_cert_fingerprint: upstream
                .tls_info
                .as_ref()
                .map(|up| up.peer_cert_fingerprint.clone()),
        });
        if let Some(up) = &upstream.tls_info {
            if let Some(t) = up.peer_cert_not_after {
                registry()
                    .gauge(
                        "tollgate_upstream_cert_expiry_timestamp_seconds",
                        "Expiry (unix seconds) of the certificate each upstream presented last.",
                        &[("resource", &target.resource.name)],
                    )
                    .set(
                        t.duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0),
                    );
            }
        }

        let standing = Standing {
            identity: identity.clone(),
            resource: target.resource.name.clone(),
            cert: peer_cert.map(|der| (der, identity.cert_not_after)),
            token_sha256,
            access: grant.clone(),
            unmask: unmask.clone(),
        };

        let secret_len = if minor >= 2 { 32 } else { 4 };
        let held = Arc::new(tokio::sync::Notify::new());
        let (pid, secret) = self.cancels.register(
            secret_len,
            target.clone(),
            backend_key.clone(),
            held.clone(),
        );
        let _unregister = Unregister(&self.cancels, pid);

        out.extend_from_slice(&backend::auth_ok());
        for (k, v) in &upstream.params {
            out.extend_from_slice(&backend::parameter_status(k, v));
        }
        out.extend_from_slice(&backend::backend_key_data(pid, &secret));
        out.extend_from_slice(&backend::ready_for_query(upstream.status));
        if tls.write_all(&out).await.is_err() || tls.flush().await.is_err() {
            log.rejected("client_gone", Detail::Empty {});
            return;
        }

        log.record(&log.open);
        let resource = target.resource.name.clone();
        let _sessions = GaugeGuard::new(registry().gauge(
            "tollgate_sessions_active",
            "Open proxied sessions by resource.",
            &[("resource", &resource)],
        ));
        tracing::debug!(session = %log.id, subject = %identity.subject, %resource, "session open");

        let (end, ended) = self
            .relay_while_standing(
                &log,
                &target,
                tls,
                upstream,
                relay::Client {
                    identity: &identity,
                    held: &held,
                    unmasked: unmask.is_some(),
                },
                standing,
                &backend_key,
            )
            .await;
        let outcome = match (&ended, &end) {
            (None, Some(end)) => end.outcome.as_str(),
            _ => "terminated",
        };
        registry()
            .counter(
                "tollgate_sessions_total",
                "Proxied sessions by resource and outcome.",
                &[("resource", &resource), ("outcome", outcome)],
            )
            .inc();
        if let (
            false,
            Some(RelayEnd {
                outcome: relay::Outcome::ClientGone,
                pending: true,
                upstream_pid,
                upstream_secret,
                ..
            }),
        ) = (pooled, &end)
        {
            // The client vanished mid-command: stop the upstream backend's work (a pooled
            // connection does so itself when its lease ends with requests in flight).
            if let Err(e) = target.cancel(*upstream_pid, upstream_secret).await {
                tracing::warn!(session = %log.id, error = %e, "could not cancel the upstream backend after the client disconnected");
            }
        }
        log.record(&PgSessionClose {
            outcome,
            reason: ended.as_ref().map(|e| e.label().to_string()),
            detail: None,
            duration_ms: log.started.elapsed().as_millis() as u64,
            // A relay stopped after its session was terminated leaves no totals.
            totals: end.as_ref().map(|end| RelayTotals {
                error: end.error.clone(),
                commands: end.commands,
                bytes_from_client: end.bytes_from_client,
                bytes_to_client: end.bytes_to_client,
            }),
        });
    }

    /// Who the client is: its verified certificate, or a service token sent as the password
    /// (with the token's SHA-256, so the session can tell when it is removed), and its place
    /// under the per-identity cap. `None` when it was refused (answered and counted).
    async fn identify(
        &self,
        tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
        log: SessionLog,
        peer_cert: Option<&[u8]>,
        client_user: &str,
        out: &mut Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Option<(SessionLog, Identity, Option<String>, IdentitySlot)> {
        let mut token_sha256 = None;
        let identity: Identity = match peer_cert {
            Some(der) => match tollgate_identity::from_certificate(der) {
                Ok(id) => id,
                Err(e) => {
                    auth_failure("bad_certificate");
                    log.refuse_unidentified(tls, Refusal::BadCertificate(e.to_string()))
                        .await;
                    return None;
                }
            },
            None => {
                out.extend_from_slice(&backend::auth_cleartext());
                if tls.write_all(out).await.is_err() || tls.flush().await.is_err() {
                    log.dropped_unidentified("client_gone");
                    return None;
                }
                out.clear();
                let mut fb = FrameBuf::new();
                let token =
                    match tokio::time::timeout_at(deadline, read_frame(tls, &mut fb, 16 * 1024))
                        .await
                    {
                        Ok(Ok((b'p', body))) => frontend::parse_password(&body).ok(),
                        _ => None,
                    };
                let tokens = self.tokens.load_full();
                let verified = match token.as_deref() {
                    Some(t) => tokio::time::timeout_at(
                        deadline,
                        tollgate_gate::verify_token(t, &tokens.verifier, &self.oidc),
                    )
                    .await
                    .ok()
                    .flatten(),
                    None => None,
                };
                match verified {
                    Some(id) => {
                        // A static token's digest lets the session notice its removal; an
                        // OIDC token ends at its `exp` instead.
                        if id.method == tollgate_identity::AuthMethod::Token {
                            token_sha256 = token.as_deref().map(|t| {
                                hex::encode(ring::digest::digest(
                                    &ring::digest::SHA256,
                                    t.as_bytes(),
                                ))
                            });
                        }
                        id
                    }
                    None => {
                        auth_failure(if token.is_some() {
                            "unknown_token"
                        } else {
                            "no_credentials"
                        });
                        log.refuse_unidentified(
                            tls,
                            Refusal::AuthenticationFailed {
                                user: client_user.to_string(),
                            },
                        )
                        .await;
                        return None;
                    }
                }
            }
        };
        // rustls compares notAfter in whole seconds; the session watch ends a session at it.
        if identity
            .cert_not_after
            .is_some_and(|t| SystemTime::now() >= t)
        {
            auth_failure("expired_certificate");
            log.refuse_unidentified(tls, Refusal::CertificateExpired)
                .await;
            return None;
        }
        // An OIDC token accepted within the clock-skew leeway past its `exp` has no session left.
        if identity.expires_at.is_some_and(|t| SystemTime::now() >= t) {
            auth_failure("expired_token");
            log.refuse_unidentified(tls, Refusal::TokenExpired).await;
            return None;
        }
        match self.limits.admit_identity(&identity.subject) {
            Ok(slot) => Some((log, identity, token_sha256, slot)),
            Err(cap) => {
                refuse_over_cap(log, tls, cap).await;
                None
            }
        }
    }

    /// Relay the session until it ends by itself or its standing is lost. The relay reads the
    /// upstream through an interruptible wrapper, so that a session whose standing ends is told
    /// why (a FATAL between two whole messages) before it is stopped. Returns the relay's end
    /// (`None`: it had to be stopped) and why the session was terminated, if it was.
    #[allow(clippy::too_many_arguments)]
    async fn relay_while_standing(
        &self,
        log: &SessionLog,
        target: &crate::UpstreamTarget,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        mut upstream: crate::upstream::Connected,
        client: relay::Client<'_>,
        standing: Standing,
        running: &BackendKey,
    ) -> (Option<RelayEnd>, Option<Ended>) {
        let interrupt = Interrupt::new();
        let stream = upstream.stream;
        upstream.stream = UpStream::Interruptible(Box::new(Interruptible::new(
            stream,
            interrupt.clone(),
            &upstream.leftover,
        )));
        let held = client.held;
        let relay = relay::run(self, log, target, tls, upstream, client);
        tokio::pin!(relay);
        let lost = standing.lost(self);
        tokio::pin!(lost);
        let why = tokio::select! {
            end = &mut relay => return (Some(end), None),
            why = &mut lost => why,
        };
        self.terminate(log, target, &interrupt, held, &why, running.get())
            .await;
        // The relay forwards the FATAL; then it is stopped (the client may not hang up).
        let delivered = async {
            interrupt.delivered.notified().await;
            tokio::time::sleep(TERMINATE_GRACE).await;
        };
        let end = tokio::select! {
            end = &mut relay => Some(end),
            _ = tokio::time::timeout(TERMINATE_LIMIT, delivered) => None,
        };
        (end, Some(why))
    }

    /// End a running session whose standing is gone: record why, hand the relay the FATAL to
    /// forward, withdraw a held command and cancel whatever runs upstream.
    #[allow(clippy::too_many_arguments)]
    async fn terminate(
        &self,
        log: &SessionLog,
        target: &crate::UpstreamTarget,
        interrupt: &Interrupt,
        held: &tokio::sync::Notify,
        why: &Ended,
        running: Option<(i32, Vec<u8>)>,
    ) {
        let resource = &target.resource.name;
        tracing::info!(session = %log.id, %resource, reason = why.label(), "ending a session whose standing is gone");
        registry()
            .counter(
                "tollgate_sessions_terminated_total",
                "Sessions ended by the gateway because a certificate, token or grant they depended on ended.",
                &[("reason", why.label())],
            )
            .inc();
        let (code, msg, fatal) = StandingLost {
            ended: why,
            resource,
        }
        .fatal();
        log.record(&SessionTerminated {
            reason: why.label(),
            detail: why.detail(),
            sqlstate: Some(code),
            message: Some(msg),
        });
        interrupt.fire(fatal);
        held.notify_waiters();
        let Some((pid, secret)) = running else { return };
        if let Err(e) = target.cancel(pid, &secret).await {
            tracing::warn!(session = %log.id, error = %e, "could not cancel the upstream backend of a terminated session");
        }
    }

    /// A CancelRequest: forward it to the matching upstream backend, or to the replica that
    /// issued its key, or ignore it (as PostgreSQL does).
    async fn serve_cancel(&self, pid: i32, secret: &[u8]) {
        let matched = self.cancels.lookup(pid, secret);
        let tag = crate::replica_tag_of(pid);
        let forwarded = matched.is_none()
            && tag != 0
            && tag != self.cancels.replica_tag()
            && self.forward_cancel(tag, pid, secret).await;
        count_cancel(match (&matched, forwarded) {
            (Some(_), _) => "yes",
            (None, true) => "forwarded",
            (None, false) => "no",
        });
        if let Some(c) = matched {
            // A command held for review is not upstream yet: the cancel withdraws it.
            self.cancel_matched(c).await;
        }
    }
}

/// How long a terminated session's relay is given once it has read the FATAL (to write it to
/// the client), and at most in all.
const TERMINATE_GRACE: Duration = Duration::from_millis(300);
const TERMINATE_LIMIT: Duration = Duration::from_secs(5);

/// Answer a connection over a cap with PostgreSQL's "too many connections" and count it.
async fn refuse_over_cap<S: AsyncWrite + Unpin>(log: SessionLog, s: &mut S, cap: Cap) {
    log.refuse_unidentified(s, Refusal::OverCap(cap)).await;
}

struct Unregister<'a>(&'a CancelRegistry, i32);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.unregister(self.1);
    }
}

/// How the unencrypted opening of a connection ended.
enum PreTls {
    Tls { direct: bool },
    Cancel { pid: i32, secret: Vec<u8> },
    ForwardedCancel,
    Plaintext,
    Invalid(String),
    Timeout,
}
