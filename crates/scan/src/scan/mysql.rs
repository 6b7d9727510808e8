//! The MySQL side of `tollgate scan`: the SSL request before a TLS probe, a plaintext login
//! that never sends a password, and the sessions on the resource's database from
//! `information_schema.PROCESSLIST`.

use super::{tcp, GatewaySource, ResourceReport, ScanOptions, SessionRow};
use crate::{Finding, Severity};
use std::time::Duration;
use tokio::net::TcpStream;
use tollgate_config::Resource;
use tollgate_gate::upstreams::UpstreamConn;
use tollgate_mysql::io::{read_packet, write_packet};
use tollgate_mysql::proto::{caps, ErrPacket, Greeting, HandshakeResponse, SslRequest};
use tollgate_mysql::upstream::{query_rows, Target};

/// MySQL's and MariaDB's "insecure transport" refusals.
const SECURE_TRANSPORT_REQUIRED: [u16; 2] = [3159, 4151];

const SESSIONS_SQL: &str = "SELECT ID, HOST, USER FROM information_schema.PROCESSLIST \
     WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Binlog Dump')";

/// The server's greeting, and the sequence number of the client's next packet.
async fn greeting(s: &mut TcpStream, timeout: Duration) -> Result<(Greeting, u8), String> {
    let (seq, p) = tokio::time::timeout(timeout, read_packet(s, 64 * 1024))
        .await
        .map_err(|_| "no greeting".to_string())?
        .map_err(|e| e.to_string())?;
    if p.first() == Some(&0xff) {
        let e = ErrPacket::parse(&p).map_err(|_| "malformed error".to_string())?;
        return Err(format!("the server refused the connection: {}", e.message));
    }
    let g = Greeting::parse(&p).map_err(|e| format!("malformed greeting: {}", e.0))?;
    Ok((g, seq.wrapping_add(1)))
}

fn head(c: u32) -> SslRequest {
    SslRequest {
        caps: c,
        max_packet: 1 << 24,
        charset: tollgate_mysql::proto::UTF8MB4_GENERAL_CI,
        ext_caps: 0,
    }
}

/// After the greeting, the SSL request: the connection is ready for a ClientHello (`None`:
/// the server does not offer TLS).
pub(super) async fn ssl_request(
    mut s: TcpStream,
    timeout: Duration,
) -> Result<Option<TcpStream>, String> {
    let (g, mut seq) = greeting(&mut s, timeout).await?;
    if g.caps & caps::SSL == 0 {
        return Ok(None);
    }
    let req = head(caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH | caps::SSL);
    write_packet(&mut s, &mut seq, &req.encode())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(s))
}

/// A login without TLS, naming a plugin no server has, then an empty password (never the
/// real one): refused for its transport, or let in, settles it. Servers that check the
/// transport only after the password (MariaDB) answer "access denied" either way: then the
/// server's own settings, read over the gateway's verified TLS login, decide
/// (`require_secure_transport`, or `REQUIRE SSL` on the account).
pub(super) async fn plaintext(r: &Resource, timeout: Duration, rep: &mut ResourceReport) {
    let Some(creds) = &r.credentials else {
        return;
    };
    let database = r.database.clone().unwrap_or_else(|| r.name.clone());
    let outcome = async {
        let mut s = tcp(r, timeout).await?;
        let (g, mut seq) = greeting(&mut s, timeout).await?;
        let hello = HandshakeResponse {
            head: head(
                caps::PROTOCOL_41
                    | caps::SECURE_CONNECTION
                    | caps::PLUGIN_AUTH
                    | caps::PLUGIN_AUTH_LENENC
                    | caps::CONNECT_WITH_DB,
            ),
            user: creds.user.clone(),
            auth: Vec::new(),
            database: Some(database),
            plugin: Some("tollgate_scan_probe".into()),
            attrs: Vec::new(),
        };
        write_packet(&mut s, &mut seq, &hello.encode())
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = tokio::time::timeout(timeout, read_packet(&mut s, 64 * 1024))
            .await
            .map_err(|_| "no answer".to_string())?;
        // Asked for the account's own plugin: answer with an empty password (never the
        // real one), to see whether the server refuses the transport or checks credentials.
        if let Ok((sq, p)) = &reply {
            if p.first() == Some(&0xfe) {
                let mut seq = sq.wrapping_add(1);
                write_packet(&mut s, &mut seq, &[])
                    .await
                    .map_err(|e| e.to_string())?;
                reply = tokio::time::timeout(timeout, read_packet(&mut s, 64 * 1024))
                    .await
                    .map_err(|_| "no answer".to_string())?;
            }
        }
        Ok::<_, String>(match reply {
            Err(e) => (false, format!("connection closed: {e}")),
            Ok((_, p)) => match p.first() {
                Some(0xff) => {
                    let e = ErrPacket::parse(&p).map_err(|_| "malformed error".to_string())?;
                    if SECURE_TRANSPORT_REQUIRED.contains(&e.code)
                        || e.message.contains("insecure transport")
                    {
                        (false, format!("it answered {} {}", e.code, e.message))
                    } else {
                        requires_tls(r)
                            .await
                            .map(|(required, why)| (!required, why))?
                    }
                }
                Some(0x00) => (
                    true,
                    "the server let the session in without any authentication".into(),
                ),
                _ if g.caps & caps::SSL == 0 => {
                    (true, "the server does not offer TLS at all".into())
                }
                _ => (true, "the server went on to authentication".into()),
            },
        })
    }
    .await;
    match outcome {
        Ok((true, detail)) => {
            rep.plaintext_accepted = Some(true);
            rep.findings.push(Finding::new(
                "plaintext_accepted",
                Severity::Critical,
                Some(&r.name),
                "resources.upstream",
                format!("resource {:?}: {} accepts unencrypted connections ({detail}): a downgrade path around the gateway", r.name, r.upstream),
                "allow only TLS on the upstream (require_secure_transport = ON, or REQUIRE SSL for every account)",
            ));
        }
        Ok((false, detail)) => {
            rep.plaintext_accepted = Some(false);
            tracing::debug!(resource = %r.name, %detail, "plaintext login refused");
        }
        Err(e) => tracing::debug!(resource = %r.name, error = %e, "plaintext probe inconclusive"),
    }
}

/// Whether the server refuses this account's sessions without TLS, by its settings.
async fn requires_tls(r: &Resource) -> Result<(bool, String), String> {
    let target = Target::new(r.clone())?;
    let max = 1 << 24;
    let mut up = target
        .connect(caps::PROTOCOL_41, 0, max)
        .await
        .map_err(|e| format!("cannot log in to read the server's settings: {e}"))?;
    let global = query_rows(
        &mut up.stream,
        up.caps,
        "SELECT @@GLOBAL.require_secure_transport",
        max,
    )
    .await
    .map_err(|e| format!("require_secure_transport: {e}"))?;
    let on = |v: &Option<String>| matches!(v.as_deref(), Some("1" | "ON" | "on"));
    if global.first().and_then(|row| row.first()).is_some_and(on) {
        return Ok((true, "require_secure_transport is ON".into()));
    }
    let grants = query_rows(
        &mut up.stream,
        up.caps,
        "SHOW GRANTS FOR CURRENT_USER()",
        max,
    )
    .await
    .map_err(|e| format!("SHOW GRANTS: {e}"))?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut up.stream).await;
    let required = grants.iter().flatten().flatten().any(|g| {
        let g = g.to_ascii_uppercase();
        [
            "REQUIRE SSL",
            "REQUIRE X509",
            "REQUIRE ISSUER",
            "REQUIRE SUBJECT",
            "REQUIRE CIPHER",
        ]
        .iter()
        .any(|r| g.contains(r))
    });
    Ok(if required {
        (true, "the account requires TLS (REQUIRE SSL)".into())
    } else {
        (
            false,
            "require_secure_transport is OFF and the account does not REQUIRE SSL".into(),
        )
    })
}

/// Sessions on the resource's database other than the scanner's own, as the resource's user
/// sees them (its own connections, or all with the PROCESS privilege).
pub(super) async fn list_sessions(
    r: &Resource,
    opts: &ScanOptions,
) -> Result<Vec<SessionRow>, String> {
    let target = Target::new(r.clone())?;
    let mut up = target
        .connect(caps::PROTOCOL_41, 0, opts.max_message)
        .await
        .map_err(|e| e.to_string())?;
    // Inside the gateway, the scanner's own session is one of the gateway's connections.
    let _entry = match (&opts.gateway, up.local_addr) {
        (GatewaySource::Local(reg), Some(local_addr)) => Some(reg.register(UpstreamConn {
            resource: r.name.clone(),
            upstream: r.upstream.clone(),
            local_addr,
            backend_pid: i32::try_from(up.thread_id).ok(),
        })),
        _ => None,
    };
    let rows = tokio::time::timeout(
        r.connect_timeout,
        query_rows(&mut up.stream, up.caps, SESSIONS_SQL, opts.max_message),
    )
    .await
    .map_err(|_| "the session query timed out".to_string())?
    .map_err(|e| format!("querying information_schema.PROCESSLIST failed: {e}"))?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut up.stream).await;
    rows.iter().map(|row| session_row(row)).collect()
}

fn session_row(row: &[Option<String>]) -> Result<SessionRow, String> {
    let [id, host, user] = row else {
        return Err(format!(
            "expected 3 columns from the process list, got {}",
            row.len()
        ));
    };
    let pid = id
        .as_deref()
        .and_then(|i| i.parse().ok())
        .ok_or("process list row without an id")?;
    // "10.0.0.5:51234"; "localhost" over a socket.
    let (client_addr, client_port) = match host.as_deref().and_then(|h| h.rsplit_once(':')) {
        Some((addr, port)) => (
            Some(addr.trim_matches(|c| c == '[' || c == ']').to_string()),
            port.parse().ok(),
        ),
        None if host.as_deref() == Some("localhost") => (None, Some(-1)),
        None => (host.clone(), None),
    };
    Ok(SessionRow {
        pid,
        client_addr,
        client_port,
        usename: user.clone(),
        application_name: None,
        backend_start: None,
    })
}

#[cfg(test)]
mod tests {
    use super::session_row;

    #[test]
    fn process_list_hosts_are_split() {
        let s =
            |h: &str| session_row(&[Some("7".into()), Some(h.into()), Some("app".into())]).unwrap();
        let r = s("10.0.0.5:51234");
        assert_eq!(r.pid, 7);
        assert_eq!(r.client_addr.as_deref(), Some("10.0.0.5"));
        assert_eq!(r.client_port, Some(51234));
        let r = s("::1:40000");
        assert_eq!(r.client_addr.as_deref(), Some("::1"));
        assert_eq!(r.client_port, Some(40000));
        let r = s("localhost");
        assert_eq!((r.client_addr, r.client_port), (None, Some(-1)));
        assert!(session_row(&[None, None]).is_err());
    }
}
