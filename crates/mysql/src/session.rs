//! One client connection: the greeting, TLS, identity, the resource, the upstream, then the
//! relay.

use crate::io::{read_packet, write_packet};
use crate::proto::{self, caps, ErrPacket, Greeting, HandshakeResponse, OkPacket, SslRequest};
use crate::{relay, MysqlGateway, ThreadEntry};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_gate::event::{SessionClose, SessionOpen, TlsLeg};
use tollgate_gate::standing::Standing;
use tollgate_gate::SessionLog;
use tollgate_identity::Identity;
use tollgate_metrics::registry;

const LISTENER: &str = "mysql";
/// What the greeting announces. Clients read MySQL 8 features from it; the upstream's own
/// version is in `session.open`.
const CACHING_SHA2: &str = "caching_sha2_password";
const CLEAR: &str = "mysql_clear_password";

/// Error codes the gateway answers with.
pub mod codes {
    pub const ACCESS_DENIED: u16 = 1045;
    pub const DB_ACCESS_DENIED: u16 = 1044;
    pub const NO_DB: u16 = 1046;
    pub const CON_COUNT: u16 = 1040;
    pub const SECURE_TRANSPORT_REQUIRED: u16 = 3159;
    pub const UNKNOWN: u16 = 1105;
    pub const HANDSHAKE: u16 = 1043;
}

pub(crate) fn err(code: u16, sqlstate: &str, msg: impl Into<String>) -> Vec<u8> {
    ErrPacket::new(code, sqlstate, msg).encode()
}

fn auth_failure(reason: &str) {
    registry()
        .counter(
            "tollgate_auth_failures_total",
            "Client authentication failures by listener and reason.",
            &[("listener", LISTENER), ("reason", reason)],
        )
        .inc();
}

/// A scramble of printable bytes (some clients stop at a NUL).
fn scramble() -> Vec<u8> {
    let mut r = [0u8; 20];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    r.iter().map(|b| 0x21 + b % 0x5e).collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MysqlGateway {
    pub(crate) async fn handle(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        registry()
            .counter(
                "tollgate_connections_total",
                "Accepted client connections by listener.",
                &[("listener", LISTENER)],
            )
            .inc();
        let _slot = match self.limits.admit(peer.ip()) {
            Ok(s) => s,
            Err(cap) => {
                let _ = write_packet(
                    &mut tcp,
                    &mut 0,
                    &err(
                        codes::CON_COUNT,
                        "08004",
                        "Too many connections to tollgate",
                    ),
                )
                .await;
                self.refusals.record(cap.as_label(), peer.ip());
                return;
            }
        };
        let thread_id = self.threads.allocate();
        let greeting = Greeting {
            server_version: self.announced.get(),
            thread_id,
            scramble: scramble(),
            // As MariaDB greets: without CLIENT_MYSQL, so that its clients send their
            // extended capabilities (bulk execution).
            caps: caps::OFFERED & !caps::LONG_PASSWORD,
            ext_caps: proto::ext_caps::OFFERED,
            charset: proto::UTF8MB4_GENERAL_CI,
            status: proto::SERVER_STATUS_AUTOCOMMIT,
            plugin: CACHING_SHA2.into(),
        };
        if write_packet(&mut tcp, &mut 0, &greeting.encode())
            .await
            .is_err()
        {
            return;
        }
        let first = tokio::time::timeout_at(deadline, read_packet(&mut tcp, 64 * 1024)).await;
        let (seq, first) = match first {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => {
                self.refusals.record("protocol", peer.ip());
                return;
            }
            Err(_) => {
                self.refusals.record("handshake_timeout", peer.ip());
                return;
            }
        };
        let asks_tls = first.len() == SslRequest::LEN
            && SslRequest::parse(&first).is_ok_and(|r| r.caps & caps::SSL != 0);
        if !asks_tls {
            auth_failure("plaintext");
            let _ = write_packet(&mut tcp, &mut seq.wrapping_add(1), &err(
                codes::SECURE_TRANSPORT_REQUIRED,
                "HY000",
                "Connections using insecure transport are prohibited: tollgate requires TLS. Connect with TLS (mariadb --ssl --ssl-verify-server-cert, mysql --ssl-mode=VERIFY_IDENTITY, or ssl-mode=REQUIRED in your driver) and trust the gateway's CA",
            ))
            .await;
            self.refusals.record("plaintext", peer.ip());
            return;
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.config());
        let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = tollgate_tls::classify_handshake_error(&e);
                tracing::debug!(%peer, reason = reason.as_label(), error = %e, "client TLS handshake failed");
                self.refusals.record(
                    if reason == tollgate_tls::HandshakeFailure::Revoked {
                        "tls_revoked"
                    } else {
                        "tls_handshake"
                    },
                    peer.ip(),
                );
                return;
            }
            Err(_) => {
                self.refusals.record("handshake_timeout", peer.ip());
                return;
            }
        };
        let info = tollgate_tls::session_info(tls.get_ref().1);
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let hello = tokio::time::timeout_at(deadline, read_packet(&mut tls, 64 * 1024)).await;
        let (seq, hello) = match hello {
            Ok(Ok((s, p))) => (s, p),
            _ => {
                self.refusals.record("protocol", peer.ip());
                return;
            }
        };
        let mut seq = seq.wrapping_add(1);
        let hello = match HandshakeResponse::parse(&hello) {
            Ok(h) => h,
            Err(e) => {
                let _ = write_packet(
                    &mut tls,
                    &mut seq,
                    &err(
                        codes::HANDSHAKE,
                        "08S01",
                        format!("tollgate could not read the handshake: {e}"),
                    ),
                )
                .await;
                self.refusals.record("protocol", peer.ip());
                return;
            }
        };
        let (identity, token_sha256) = match tokio::time::timeout_at(
            deadline,
            self.identify(&mut tls, &mut seq, &hello, peer_cert.as_deref()),
        )
        .await
        {
            Ok(Ok(id)) => id,
            Ok(Err(reason)) => {
                auth_failure(reason);
                let _ = write_packet(&mut tls, &mut seq, &err(
                    codes::ACCESS_DENIED,
                    "28000",
                    format!("Access denied for user '{}': tollgate needs a client certificate, or a tollgate or OIDC token as the password", hello.user),
                ))
                .await;
                self.refusals.record(reason, peer.ip());
                return;
            }
            Err(_) => {
                self.refusals.record("handshake_timeout", peer.ip());
                return;
            }
        };
        let _identity_slot = match self.limits.admit_identity(&identity.subject) {
            Ok(s) => s,
            Err(cap) => {
                let _ = write_packet(
                    &mut tls,
                    &mut seq,
                    &err(
                        codes::CON_COUNT,
                        "08004",
                        "Too many connections for this identity",
                    ),
                )
                .await;
                self.refusals.record(cap.as_label(), peer.ip());
                return;
            }
        };

        let log = SessionLog::new(self.recorder.clone());
        let database = hello.database.clone().unwrap_or_default();
        let mut extra = Map::new();
        extra.insert("client_user".into(), json!(hello.user));
        extra.insert("database".into(), json!(database));
        extra.insert("thread_id".into(), json!(thread_id));
        if let Some((_, v)) = hello.attrs.iter().find(|(k, _)| k == "program_name") {
            extra.insert("application_name".into(), json!(v));
        }
        if let Some(t) = identity.expires_at {
            extra.insert("token_expires_unix".into(), json!(unix(t)));
        }
        let mut open = SessionOpen {
            listener: LISTENER,
            client_addr: peer.to_string(),
            subject: identity.subject.clone(),
            groups: identity.groups.clone(),
            auth_method: identity.method.as_str(),
            principal: identity.principal.to_string(),
            client_cert_fingerprint: identity.cert_fingerprint.clone(),
            resource: database.clone(),
            resource_kind: "mysql",
            client_tls: TlsLeg {
                version: Some(info.version.clone()),
                cipher: Some(info.cipher.clone()),
                alpn: None,
            },
            extra,
        };
        let started = Instant::now();
        let rejected = |open: &SessionOpen, reason: &str| {
            log.record(open);
            log.record(&SessionClose {
                outcome: "rejected",
                reason: Some(reason.to_string()),
                duration_ms: started.elapsed().as_millis() as u64,
                commands: 0,
            });
        };
        if database.is_empty() {
            let _ = write_packet(&mut tls, &mut seq, &err(codes::NO_DB, "3D000", "No database selected: name the tollgate resource as the database (mariadb -D <resource>, or database=<resource> in your driver)")).await;
            rejected(&open, "no_database");
            return;
        }
        let targets = self.targets.load_full();
        let found = targets.get(&database);
        let access = match tollgate_gate::authorize(
            &identity,
            found.map(|t| (t.resource.name.as_str(), t.resource.allow_groups.as_slice())),
            self.reviews.as_deref(),
            found.is_some_and(|t| t.mask.is_some()),
            &database,
        ) {
            Ok(a) => a,
            Err(forbidden) => {
                auth_failure("forbidden");
                let _ = write_packet(
                    &mut tls,
                    &mut seq,
                    &err(codes::DB_ACCESS_DENIED, "42000", forbidden.to_string()),
                )
                .await;
                rejected(&open, "forbidden");
                return;
            }
        };
        let target = found.expect("authorized").clone();
        drop(targets);
        access.audit_fields(&mut open.extra);

        let mut upstream = match target
            .connect(hello.head.caps, hello.head.ext_caps, self.max_message)
            .await
        {
            Ok(u) => u,
            Err(e) => {
                registry()
                    .counter(
                        "tollgate_upstream_connect_failures_total",
                        "Failed upstream connections by resource and reason.",
                        &[("resource", &target.resource.name), ("reason", e.label())],
                    )
                    .inc();
                tracing::error!(session = %log.id, resource = %target.resource.name, error = %e, "upstream connection failed");
                let _ = write_packet(&mut tls, &mut seq, &err(codes::UNKNOWN, "HY000", format!("resource \"{}\" is unavailable right now (tollgate session {}); try again later or ask an admin to check the gateway's log", target.resource.name, log.id))).await;
                open.extra.insert("failure".into(), json!(e.label()));
                rejected(&open, "upstream_unavailable");
                return;
            }
        };
        open.extra
            .insert("upstream_thread_id".into(), json!(upstream.thread_id));
        let _registered = upstream.local_addr.map(|local_addr| {
            self.upstreams
                .register(tollgate_gate::upstreams::UpstreamConn {
                    resource: target.resource.name.clone(),
                    upstream: target.resource.upstream.clone(),
                    local_addr,
                    backend_pid: i32::try_from(upstream.thread_id).ok(),
                })
        });
        self.announced.learn(&upstream.server_version);
        open.extra
            .insert("upstream_version".into(), json!(upstream.server_version));
        open.extra.insert(
            "upstream_tls".into(),
            match &upstream.tls_info {
                Some(up) => json!({"version": up.version, "cipher": up.cipher}),
                None => Value::Null,
            },
        );
        // The client's session: the shape both legs agreed on.
        let ok = OkPacket {
            status: proto::SERVER_STATUS_AUTOCOMMIT,
            ..Default::default()
        };
        if write_packet(&mut tls, &mut seq, &ok.encode())
            .await
            .is_err()
        {
            rejected(&open, "client_gone");
            return;
        }
        log.record(&open);
        let cancelled = Arc::new(crate::Kill::default());
        self.threads.register(
            thread_id,
            ThreadEntry {
                subject: identity.subject.clone(),
                resource: target.resource.name.clone(),
                upstream_thread: upstream.thread_id,
                cancelled: cancelled.clone(),
            },
        );
        tracing::debug!(session = %log.id, subject = %identity.subject, resource = %target.resource.name, "mysql session open");
        let standing = Standing {
            identity: identity.clone(),
            resource: target.resource.name.clone(),
            cert: peer_cert.map(|der| (der, identity.cert_not_after)),
            token_sha256,
            access: access.grant.clone(),
            unmask: access.unmask.clone(),
        };
        let end = relay::Relay::new(
            &self,
            &target,
            &log,
            &identity,
            access.unmask.is_some(),
            hello.head.caps & caps::OFFERED,
        )
        .upstream_thread(upstream.thread_id)
        .cancelled_by(cancelled)
        .run(tls, &mut upstream.stream, standing)
        .await;
        self.threads.remove(thread_id);
        let _ = upstream.stream.shutdown().await;
        registry()
            .counter(
                "tollgate_sessions_total",
                "Proxied sessions by resource and outcome.",
                &[
                    ("resource", &target.resource.name),
                    ("outcome", end.outcome),
                ],
            )
            .inc();
        log.record(&SessionClose {
            outcome: end.outcome,
            reason: end.reason,
            duration_ms: started.elapsed().as_millis() as u64,
            commands: end.commands,
        });
    }

    /// The verified client certificate, else a token the client sends as its password: asked
    /// for with caching_sha2_password's full authentication (inside TLS), or read from
    /// mysql_clear_password. `Err` is a bounded reason.
    async fn identify<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        seq: &mut u8,
        hello: &HandshakeResponse,
        peer_cert: Option<&[u8]>,
    ) -> Result<(Identity, Option<String>), &'static str> {
        if let Some(der) = peer_cert {
            let id = tollgate_identity::from_certificate(der).map_err(|_| "bad_certificate")?;
            if id.cert_not_after.is_some_and(|t| SystemTime::now() >= t) {
                return Err("expired_certificate");
            }
            return Ok((id, None));
        }
        self.password_identity(s, seq, hello.plugin.as_deref(), &hello.auth)
            .await
    }

    /// A token the client sends as its password: read from mysql_clear_password's answer, or
    /// asked for with caching_sha2_password's full authentication (switching to it from any
    /// other plugin). `auth` is the client's first answer for `plugin`. With the identity, the
    /// SHA-256 of a service token (a running session checks it is still configured).
    pub(crate) async fn password_identity<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        seq: &mut u8,
        plugin: Option<&str>,
        auth: &[u8],
    ) -> Result<(Identity, Option<String>), &'static str> {
        let plugin = plugin.unwrap_or("");
        let password = if plugin == CLEAR {
            auth.to_vec()
        } else {
            if plugin != CACHING_SHA2 {
                // Other plugins never send the password itself: switch to one that will.
                write_packet(
                    s,
                    seq,
                    &proto::auth_switch(CACHING_SHA2, &{
                        let mut d = scramble();
                        d.push(0);
                        d
                    }),
                )
                .await
                .map_err(|_| "client_gone")?;
                let (sq, _) = read_packet(s, 64 * 1024).await.map_err(|_| "protocol")?;
                *seq = sq.wrapping_add(1);
            }
            write_packet(s, seq, &proto::PERFORM_FULL_AUTH)
                .await
                .map_err(|_| "client_gone")?;
            let (sq, p) = read_packet(s, 64 * 1024).await.map_err(|_| "protocol")?;
            *seq = sq.wrapping_add(1);
            p
        };
        let token =
            String::from_utf8_lossy(password.strip_suffix(&[0]).unwrap_or(&password)).into_owned();
        if token.is_empty() {
            return Err("no_credentials");
        }
        let tokens = self.tokens.load_full();
        let id = tollgate_gate::verify_token(&token, &tokens, &self.oidc)
            .await
            .ok_or("unknown_token")?;
        if id.expires_at.is_some_and(|t| SystemTime::now() >= t) {
            return Err("expired_token");
        }
        let sha = (id.method == tollgate_identity::AuthMethod::Token).then(|| {
            hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                token.as_bytes(),
            ))
        });
        Ok((id, sha))
    }
}
