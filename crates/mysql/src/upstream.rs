//! The gateway → MySQL/MariaDB leg: a fresh TCP + TLS connection per client session, verified
//! against the resource's CA and server name, authenticated with the resource's credentials
//! (mysql_native_password, caching_sha2_password fast and full, MariaDB client_ed25519, as the
//! server asks, auth switches included). The client never sees them.

use crate::io::{read_packet, write_packet, IoError};
use crate::proto::{self, caps, ErrPacket, Greeting, HandshakeResponse, SslRequest};
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tollgate_config::Resource;
use tollgate_tls::TlsSessionInfo;

/// Everything needed to open a resource's upstream, compiled once per config.
pub struct Target {
    pub resource: Resource,
    /// `None` only for `tls.mode = "disable"`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub mask: Option<Arc<tollgate_mask::Policy>>,
    pub audit_mask: Option<Arc<tollgate_mask::Policy>>,
    /// The resource's rules (always present: MySQL's own checks need the engine's session).
    pub policy: tollgate_policy::ResourcePolicy,
}

/// The scramble of an auth switch request. mysql_native_password and caching_sha2 send 20
/// bytes and a NUL; MariaDB's ed25519 sends a 32-byte random nonce whose last byte may itself
/// be 0 (stripping it failed one login in 256).
fn switch_scramble(plugin: &str, data: &[u8]) -> Vec<u8> {
    if plugin == "client_ed25519" {
        data.to_vec()
    } else {
        data.strip_suffix(&[0]).unwrap_or(data).to_vec()
    }
}

/// Functions that act on the server or read its files, beside the engine's built-in list.
pub const MYSQL_WRITING_FUNCTIONS: &[&str] = &[
    "load_file",
    "sys_exec",
    "sys_eval",
    "get_lock",
    "release_lock",
    "release_all_locks",
    "master_pos_wait",
    "source_pos_wait",
    "sleep",
    "benchmark",
];

/// MySQL/MariaDB built-in functions that only compute a value: a call to one is not opaque
/// code (added to the resource's `trusted_functions`).
pub const MYSQL_PURE_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "group_concat",
    "json_arrayagg",
    "json_objectagg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "std",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "truncate",
    "mod",
    "pow",
    "power",
    "sqrt",
    "exp",
    "ln",
    "log",
    "log2",
    "log10",
    "sign",
    "rand",
    "pi",
    "greatest",
    "least",
    "coalesce",
    "ifnull",
    "nullif",
    "if",
    "isnull",
    "concat",
    "concat_ws",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "lower",
    "upper",
    "lcase",
    "ucase",
    "substring",
    "substr",
    "substring_index",
    "left",
    "right",
    "trim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "replace",
    "reverse",
    "repeat",
    "space",
    "instr",
    "locate",
    "position",
    "field",
    "find_in_set",
    "format",
    "hex",
    "unhex",
    "md5",
    "sha1",
    "sha2",
    "crc32",
    "to_base64",
    "from_base64",
    "ascii",
    "char",
    "ord",
    "bin",
    "oct",
    "conv",
    "quote",
    "regexp_like",
    "regexp_replace",
    "regexp_substr",
    "regexp_instr",
    "strcmp",
    "soundex",
    "now",
    "curdate",
    "curtime",
    "current_date",
    "current_time",
    "current_timestamp",
    "sysdate",
    "utc_date",
    "utc_time",
    "utc_timestamp",
    "localtime",
    "localtimestamp",
    "date",
    "time",
    "year",
    "month",
    "day",
    "dayofmonth",
    "dayofweek",
    "dayofyear",
    "hour",
    "minute",
    "second",
    "microsecond",
    "week",
    "weekday",
    "weekofyear",
    "yearweek",
    "quarter",
    "monthname",
    "dayname",
    "date_add",
    "date_sub",
    "adddate",
    "subdate",
    "addtime",
    "subtime",
    "datediff",
    "timediff",
    "timestampdiff",
    "timestampadd",
    "date_format",
    "time_format",
    "str_to_date",
    "from_unixtime",
    "unix_timestamp",
    "last_day",
    "makedate",
    "maketime",
    "extract",
    "convert_tz",
    "to_days",
    "from_days",
    "to_seconds",
    "sec_to_time",
    "time_to_sec",
    "period_add",
    "period_diff",
    "cast",
    "convert",
    "binary",
    "json_extract",
    "json_unquote",
    "json_object",
    "json_array",
    "json_contains",
    "json_contains_path",
    "json_keys",
    "json_length",
    "json_type",
    "json_valid",
    "json_set",
    "json_insert",
    "json_replace",
    "json_remove",
    "json_merge",
    "json_merge_patch",
    "json_merge_preserve",
    "json_search",
    "json_quote",
    "json_depth",
    "json_pretty",
    "json_value",
    "json_table",
    "uuid",
    "uuid_short",
    "database",
    "schema",
    "user",
    "current_user",
    "session_user",
    "system_user",
    "version",
    "connection_id",
    "last_insert_id",
    "row_count",
    "found_rows",
    "charset",
    "collation",
    "coercibility",
    "inet_aton",
    "inet_ntoa",
    "inet6_aton",
    "inet6_ntoa",
    "is_ipv4",
    "is_ipv6",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "elt",
    "export_set",
    "make_set",
    "weight_string",
];

impl Target {
    pub fn new(resource: Resource) -> Result<Self, String> {
        let tls = tollgate_tls::resource_client_config(&resource.name, &resource.tls, Vec::new())
            .map_err(|e| format!("upstream TLS: {e}"))?;
        let mut judged = resource.clone();
        judged
            .writing_functions
            .extend(MYSQL_WRITING_FUNCTIONS.iter().map(|s| s.to_string()));
        judged
            .trusted_functions
            .extend(MYSQL_PURE_FUNCTIONS.iter().map(|s| s.to_string()));
        let policy =
            tollgate_policy::ResourcePolicy::from_config(&judged).map_err(|e| e.to_string())?;
        Ok(Target {
            resource,
            tls,
            mask: None,
            audit_mask: None,
            policy,
        })
    }

    /// The database on the upstream (`database`, else the resource's name).
    pub fn database(&self) -> &str {
        self.resource
            .database
            .as_deref()
            .unwrap_or(&self.resource.name)
    }

    /// The server's version from its greeting (sent before TLS; nothing is authenticated).
    pub async fn server_version(&self) -> Result<String, ConnectError> {
        let r = &self.resource;
        let tcp = tokio::time::timeout(
            r.connect_timeout,
            TcpStream::connect((r.upstream_host.as_str(), r.upstream_port)),
        )
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Connect)?;
        let mut stream = UpStream::Plain(tcp);
        let (_, greeting) =
            tokio::time::timeout(r.connect_timeout, read_packet(&mut stream, 64 * 1024))
                .await
                .map_err(|_| ConnectError::Timeout)??;
        if greeting.first() == Some(&0xff) {
            let e = ErrPacket::parse(&greeting).map_err(|_| ConnectError::Protocol("greeting"))?;
            return Err(ConnectError::Refused(e.message));
        }
        Ok(Greeting::parse(&greeting)
            .map_err(|_| ConnectError::Protocol("greeting"))?
            .server_version)
    }

    /// Connect, negotiate TLS, authenticate. `client_caps` (and MariaDB's `client_ext`) are the
    /// capabilities the client chose with the gateway: the upstream session gets the same shape.
    pub async fn connect(
        &self,
        client_caps: u32,
        client_ext: u32,
        max: usize,
    ) -> Result<Upstream, ConnectError> {
        let r = &self.resource;
        let tcp = tokio::time::timeout(
            r.connect_timeout,
            TcpStream::connect((r.upstream_host.as_str(), r.upstream_port)),
        )
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let local_addr = tcp.local_addr().ok();
        let mut stream = UpStream::Plain(tcp);
        let (mut seq, greeting) = read_packet(&mut stream, max).await?;
        if greeting.first() == Some(&0xff) {
            let e = ErrPacket::parse(&greeting).map_err(|_| ConnectError::Protocol("greeting"))?;
            return Err(ConnectError::Refused(e.message));
        }
        let greeting =
            Greeting::parse(&greeting).map_err(|_| ConnectError::Protocol("greeting"))?;
        let wanted = client_caps & caps::OFFERED & !caps::SSL
            | caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | caps::PLUGIN_AUTH_LENENC
            | caps::CONNECT_WITH_DB
            | caps::CONNECT_ATTRS;
        let missing = wanted & caps::SHAPE & !greeting.caps;
        if missing != 0 {
            return Err(ConnectError::Unsupported(format!(
                "the server lacks capabilities {missing:#x}"
            )));
        }
        let mut our_caps = wanted & greeting.caps;
        let ext = client_ext & proto::ext_caps::OFFERED & greeting.ext_caps;
        let head = |c: u32| SslRequest {
            caps: c,
            max_packet: 1 << 24,
            charset: proto::UTF8MB4_GENERAL_CI,
            ext_caps: ext,
        };
        let mut tls_info = None;
        if let Some(config) = &self.tls {
            if greeting.caps & caps::SSL == 0 {
                return Err(ConnectError::NoTls);
            }
            our_caps |= caps::SSL;
            seq = seq.wrapping_add(1);
            write_packet(&mut stream, &mut seq, &head(our_caps).encode()).await?;
            let UpStream::Plain(tcp) = stream else {
                unreachable!("plain before TLS")
            };
            let name = ServerName::try_from(r.tls.server_name.clone())
                .map_err(|_| ConnectError::Protocol("server_name"))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(ConnectError::Tls)?;
            tls_info = Some(tollgate_tls::session_info(tls.get_ref().1));
            stream = UpStream::Tls(Box::new(tls));
        } else {
            seq = seq.wrapping_add(1);
        }
        let creds = r.credentials.as_ref().ok_or(ConnectError::NoCredentials)?;
        let password = creds
            .password
            .read()
            .map_err(|_| ConnectError::NoCredentials)?
            .unwrap_or_default();
        let password = password.as_bytes();
        let mut plugin = greeting.plugin.clone();
        let mut scramble = greeting.scramble.clone();
        let response = HandshakeResponse {
            head: head(our_caps),
            user: creds.user.clone(),
            auth: auth_response(&plugin, password, &scramble, self.tls.is_some())?,
            database: Some(self.database().to_string()),
            plugin: Some(plugin.clone()),
            attrs: vec![("program_name".into(), "tollgate".into())],
        };
        write_packet(&mut stream, &mut seq, &response.encode()).await?;
        loop {
            let (s, p) = read_packet(&mut stream, max).await?;
            seq = s.wrapping_add(1);
            match p.first() {
                Some(0x00) => break,
                Some(0xff) => {
                    let e = ErrPacket::parse(&p).unwrap_or(ErrPacket::new(1045, "28000", ""));
                    return Err(ConnectError::Refused(e.message));
                }
                Some(0xfe) => {
                    // Auth switch: another plugin and a fresh scramble.
                    let mut rd = proto::Reader::new(&p[1..]);
                    plugin = String::from_utf8_lossy(rd.nul_str()).into_owned();
                    scramble = switch_scramble(&plugin, rd.rest());
                    let a = auth_response(&plugin, password, &scramble, self.tls.is_some())?;
                    write_packet(&mut stream, &mut seq, &a).await?;
                }
                Some(0x01) if plugin == "caching_sha2_password" => match p.get(1) {
                    Some(0x03) => {}
                    Some(0x04) if self.tls.is_some() => {
                        let mut clear = password.to_vec();
                        clear.push(0);
                        write_packet(&mut stream, &mut seq, &clear).await?;
                    }
                    _ => {
                        return Err(ConnectError::Unsupported(
                            "caching_sha2_password full authentication without TLS".into(),
                        ))
                    }
                },
                _ => return Err(ConnectError::Protocol("authentication")),
            }
        }
        Ok(Upstream {
            stream,
            thread_id: greeting.thread_id,
            server_version: greeting.server_version,
            caps: our_caps,
            tls_info,
            local_addr,
        })
    }
}

impl Target {
    /// Stops an upstream connection of this resource from a connection of its own (`KILL
    /// CONNECTION`), for a session the gateway ends while a statement runs there.
    pub async fn kill(&self, thread: u32, max: usize) -> Result<(), ConnectError> {
        let mut u = self.connect(caps::PROTOCOL_41, 0, max).await?;
        let mut q = vec![proto::com::QUERY];
        q.extend_from_slice(format!("KILL CONNECTION {thread}").as_bytes());
        let mut seq = 0;
        write_packet(&mut u.stream, &mut seq, &q).await?;
        // OK, or 1094 when it is already gone.
        let _ = read_packet(&mut u.stream, max).await?;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut u.stream).await;
        Ok(())
    }
}

/// Why a query the gateway runs itself failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the server refused it: {} {}", .0.code, .0.message)]
    Server(ErrPacket),
    #[error("{0}")]
    Io(#[from] IoError),
    #[error("{0}")]
    Write(#[from] io::Error),
    #[error("the server's answer is malformed")]
    Malformed,
}

/// Runs `sql` (text protocol) on an idle connection whose capabilities are `session_caps`,
/// and returns its rows (an OK without a result set: none).
pub async fn query_rows<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    session_caps: u32,
    sql: &str,
    max: usize,
) -> Result<Vec<Vec<Option<String>>>, QueryError> {
    let server_error = |p: &[u8]| {
        QueryError::Server(ErrPacket::parse(p).unwrap_or(ErrPacket::new(0, "HY000", "")))
    };
    let mut q = vec![proto::com::QUERY];
    q.extend_from_slice(sql.as_bytes());
    write_packet(s, &mut 0, &q).await?;
    let (_, first) = read_packet(s, max).await?;
    match first.first() {
        Some(0xff) => return Err(server_error(&first)),
        Some(0x00) => return Ok(Vec::new()),
        _ => {}
    }
    let count = proto::Reader::new(&first)
        .lenenc_int()
        .map_err(|_| QueryError::Malformed)?;
    for _ in 0..count {
        read_packet(s, max).await?;
    }
    if session_caps & caps::DEPRECATE_EOF == 0 {
        read_packet(s, max).await?;
    }
    let mut rows = Vec::new();
    loop {
        let (_, p) = read_packet(s, max).await?;
        if proto::is_end_of_rows(&p) {
            return Ok(rows);
        }
        if p.first() == Some(&0xff) {
            return Err(server_error(&p));
        }
        let mut r = proto::Reader::new(&p);
        let mut row = Vec::new();
        while r.remaining() > 0 {
            let v = r.lenenc_str().map_err(|_| QueryError::Malformed)?;
            row.push(v.map(|b| String::from_utf8_lossy(b).into_owned()));
        }
        rows.push(row);
    }
}

/// What `plugin` sends for `password`.
fn auth_response(
    plugin: &str,
    password: &[u8],
    scramble: &[u8],
    tls: bool,
) -> Result<Vec<u8>, ConnectError> {
    match plugin {
        "mysql_native_password" => Ok(proto::native_password(password, scramble)),
        "caching_sha2_password" => Ok(proto::caching_sha2_password(password, scramble)),
        "client_ed25519" => Ok(proto::client_ed25519(password, scramble)),
        "mysql_clear_password" if tls => {
            let mut p = password.to_vec();
            p.push(0);
            Ok(p)
        }
        other => Err(ConnectError::Unsupported(format!(
            "authentication plugin {other:?}"
        ))),
    }
}

pub struct Upstream {
    pub stream: UpStream,
    /// The upstream's connection id (what `KILL` names there).
    pub thread_id: u32,
    pub server_version: String,
    pub caps: u32,
    pub tls_info: Option<TlsSessionInfo>,
    pub local_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("timed out connecting")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("the server does not offer TLS")]
    NoTls,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("no credentials configured, or the password cannot be read")]
    NoCredentials,
    #[error("the server refused the gateway: {0}")]
    Refused(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("protocol error in {0}")]
    Protocol(&'static str),
    #[error("{0}")]
    Io(#[from] IoError),
    #[error("{0}")]
    Write(#[from] io::Error),
}

impl ConnectError {
    /// A metrics label (bounded).
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Timeout => "timeout",
            ConnectError::Connect(_) => "connect",
            ConnectError::NoTls => "no_tls",
            ConnectError::Tls(_) => "tls",
            ConnectError::NoCredentials => "credentials",
            ConnectError::Refused(_) => "refused",
            ConnectError::Unsupported(_) => "unsupported",
            ConnectError::Protocol(_) | ConnectError::Io(_) | ConnectError::Write(_) => "protocol",
        }
    }
}

/// The upstream stream: TLS, or plain TCP only when the resource opted out.
pub enum UpStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::switch_scramble;

    #[test]
    fn an_ed25519_nonce_ending_in_zero_is_kept_whole() {
        let mut nonce = [7u8; 32];
        nonce[31] = 0;
        assert_eq!(switch_scramble("client_ed25519", &nonce), nonce.to_vec());
        let mut native = vec![9u8; 20];
        native.push(0);
        assert_eq!(
            switch_scramble("mysql_native_password", &native),
            vec![9u8; 20]
        );
    }
}
