//! The MySQL client/server protocol as bytes: packet payloads built and parsed over slices,
//! no sockets (framing lives in [`crate::io`]). Every length read from the wire is checked
//! against what is left of the buffer before anything is sliced or allocated.

use tollgate_mask::{Encoding, FieldType};

/// Capability flags (the subset the gateway speaks).
pub mod caps {
    pub const LONG_PASSWORD: u32 = 1;
    pub const FOUND_ROWS: u32 = 1 << 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const IGNORE_SPACE: u32 = 1 << 8;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const INTERACTIVE: u32 = 1 << 10;
    pub const SSL: u32 = 1 << 11;
    pub const TRANSACTIONS: u32 = 1 << 13;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const MULTI_RESULTS: u32 = 1 << 17;
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC: u32 = 1 << 21;
    pub const DEPRECATE_EOF: u32 = 1 << 24;

    /// What the gateway offers clients. Never LOCAL_FILES (the server would make the client
    /// read a file), IGNORE_SPACE (it changes how SQL is read), compression, query attributes,
    /// session tracking or optional metadata.
    pub const OFFERED: u32 = LONG_PASSWORD
        | FOUND_ROWS
        | LONG_FLAG
        | CONNECT_WITH_DB
        | PROTOCOL_41
        | INTERACTIVE
        | SSL
        | TRANSACTIONS
        | SECURE_CONNECTION
        | MULTI_STATEMENTS
        | MULTI_RESULTS
        | PS_MULTI_RESULTS
        | PLUGIN_AUTH
        | CONNECT_ATTRS
        | PLUGIN_AUTH_LENENC
        | DEPRECATE_EOF;

    /// Bits whose meaning changes the shape of what the server sends: the upstream must
    /// support each one the client chose.
    pub const SHAPE: u32 = PROTOCOL_41 | DEPRECATE_EOF | MULTI_RESULTS | PS_MULTI_RESULTS;
}

/// Command bytes.
/// MariaDB's extended capabilities: in the greeting's and the handshake's reserved bytes,
/// when `LONG_PASSWORD` (MySQL's `CLIENT_MYSQL`) is clear.
pub mod ext_caps {
    /// `COM_STMT_BULK_EXECUTE`, answered with OK or ERR.
    pub const STMT_BULK_OPERATIONS: u32 = 1 << 2;
    /// What the gateway relays (the others change the shape of what the server sends).
    pub const OFFERED: u32 = STMT_BULK_OPERATIONS;
}

/// Where MariaDB's extended capabilities are, if `caps` says they are sent at all.
fn has_ext_caps(caps: u32) -> bool {
    caps & caps::LONG_PASSWORD == 0
}

pub mod com {
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    pub const RESET_CONNECTION: u8 = 0x1f;
    pub const STMT_BULK_EXECUTE: u8 = 0xfa;
}

/// Status flag: another result set follows.
pub const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
pub const SERVER_STATUS_AUTOCOMMIT: u16 = 0x0002;
/// MariaDB's statement id meaning "the statement this connection prepared last".
pub const LAST_PREPARED: u32 = 0xffff_ffff;
/// utf8mb4_general_ci: the character set the gateway pins on both legs.
pub const UTF8MB4_GENERAL_CI: u8 = 45;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed MySQL packet: {0}")]
pub struct Malformed(pub &'static str);

/// A cursor over a payload.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let r = &self.buf[self.pos..];
        self.pos = self.buf.len();
        r
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.remaining() < n {
            return Err(Malformed("truncated"));
        }
        let r = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(r)
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string (the NUL is consumed); without a NUL, the rest.
    pub fn nul_str(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        match rest.iter().position(|&b| b == 0) {
            Some(i) => {
                self.pos += i + 1;
                &rest[..i]
            }
            None => self.rest(),
        }
    }

    /// A length-encoded integer; `None` for the NULL marker 0xfb.
    pub fn lenenc(&mut self) -> Result<Option<u64>, Malformed> {
        let first = self.u8()?;
        Ok(Some(match first {
            0xfb => return Ok(None),
            0xfc => u64::from(self.u16()?),
            0xfd => {
                let b = self.bytes(3)?;
                u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16
            }
            0xfe => {
                let b = self.bytes(8)?;
                u64::from_le_bytes(b.try_into().expect("8 bytes"))
            }
            0xff => return Err(Malformed("bad length-encoded integer")),
            n => u64::from(n),
        }))
    }

    pub fn lenenc_int(&mut self) -> Result<u64, Malformed> {
        self.lenenc()?.ok_or(Malformed("unexpected NULL"))
    }

    /// A length-encoded string; `None` for NULL.
    pub fn lenenc_str(&mut self) -> Result<Option<&'a [u8]>, Malformed> {
        match self.lenenc()? {
            None => Ok(None),
            Some(n) => {
                let n = usize::try_from(n).map_err(|_| Malformed("length too large"))?;
                self.bytes(n).map(Some)
            }
        }
    }
}

pub fn put_lenenc(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=250 => out.push(n as u8),
        251..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

pub fn put_lenenc_str(out: &mut Vec<u8>, s: &[u8]) {
    put_lenenc(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// The server's first packet (Protocol::HandshakeV10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: String,
    pub thread_id: u32,
    pub scramble: Vec<u8>,
    pub caps: u32,
    /// MariaDB's extended capabilities (0 when `caps` has `LONG_PASSWORD`).
    pub ext_caps: u32,
    pub charset: u8,
    pub status: u16,
    pub plugin: String,
}

impl Greeting {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(10);
        out.extend_from_slice(self.server_version.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.thread_id.to_le_bytes());
        out.extend_from_slice(&self.scramble[..8]);
        out.push(0);
        out.extend_from_slice(&(self.caps as u16).to_le_bytes());
        out.push(self.charset);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&((self.caps >> 16) as u16).to_le_bytes());
        out.push(self.scramble.len() as u8 + 1);
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&self.ext_caps.to_le_bytes());
        out.extend_from_slice(&self.scramble[8..]);
        out.push(0);
        out.extend_from_slice(self.plugin.as_bytes());
        out.push(0);
        out
    }

    pub fn parse(p: &[u8]) -> Result<Greeting, Malformed> {
        let mut r = Reader::new(p);
        if r.u8()? != 10 {
            return Err(Malformed("not a protocol 10 greeting"));
        }
        let server_version = String::from_utf8_lossy(r.nul_str()).into_owned();
        let thread_id = r.u32()?;
        let mut scramble = r.bytes(8)?.to_vec();
        r.u8()?;
        let mut caps = u32::from(r.u16()?);
        let charset = r.u8()?;
        let status = r.u16()?;
        caps |= u32::from(r.u16()?) << 16;
        let auth_len = r.u8()?;
        let reserved = r.bytes(10)?;
        let ext_caps = match has_ext_caps(caps) {
            true => u32::from_le_bytes(reserved[6..].try_into().expect("4 bytes")),
            false => 0,
        };
        if caps & caps::SECURE_CONNECTION != 0 {
            let n = (usize::from(auth_len).saturating_sub(8)).max(13);
            let part = r.bytes(n.min(r.remaining()))?;
            // The second part ends with a NUL that is not part of the scramble.
            let part = part.strip_suffix(&[0]).unwrap_or(part);
            scramble.extend_from_slice(part);
        }
        let plugin = if caps & caps::PLUGIN_AUTH != 0 {
            String::from_utf8_lossy(r.nul_str()).into_owned()
        } else {
            String::new()
        };
        Ok(Greeting {
            server_version,
            thread_id,
            scramble,
            caps,
            ext_caps,
            charset,
            status,
            plugin,
        })
    }
}

/// The first 32 bytes a client sends when it asks for TLS (or of its handshake response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslRequest {
    pub caps: u32,
    pub max_packet: u32,
    pub charset: u8,
    /// MariaDB's extended capabilities (0 when `caps` has `LONG_PASSWORD`).
    pub ext_caps: u32,
}

impl SslRequest {
    pub const LEN: usize = 32;

    pub fn parse(p: &[u8]) -> Result<SslRequest, Malformed> {
        let mut r = Reader::new(p);
        let caps = r.u32()?;
        if caps & caps::PROTOCOL_41 == 0 {
            return Err(Malformed("pre-4.1 clients are not supported"));
        }
        let max_packet = r.u32()?;
        let charset = r.u8()?;
        let reserved = r.bytes(23)?;
        let ext_caps = match has_ext_caps(caps) {
            true => u32::from_le_bytes(reserved[19..].try_into().expect("4 bytes")),
            false => 0,
        };
        Ok(SslRequest {
            caps,
            max_packet,
            charset,
            ext_caps,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.caps.to_le_bytes());
        out.extend_from_slice(&self.max_packet.to_le_bytes());
        out.push(self.charset);
        out.extend_from_slice(&[0; 19]);
        out.extend_from_slice(&self.ext_caps.to_le_bytes());
        out
    }
}

/// Protocol::HandshakeResponse41.
#[derive(Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub head: SslRequest,
    pub user: String,
    pub auth: Vec<u8>,
    pub database: Option<String>,
    pub plugin: Option<String>,
    pub attrs: Vec<(String, String)>,
}

impl std::fmt::Debug for HandshakeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The auth response may be a token sent in clear: never printed.
        f.debug_struct("HandshakeResponse")
            .field("head", &self.head)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("plugin", &self.plugin)
            .finish_non_exhaustive()
    }
}

impl HandshakeResponse {
    pub fn parse(p: &[u8]) -> Result<HandshakeResponse, Malformed> {
        let head = SslRequest::parse(p)?;
        let c = head.caps;
        let mut r = Reader::new(&p[SslRequest::LEN..]);
        let user = String::from_utf8_lossy(r.nul_str()).into_owned();
        let auth = if c & caps::PLUGIN_AUTH_LENENC != 0 {
            r.lenenc_str()?.unwrap_or_default().to_vec()
        } else if c & caps::SECURE_CONNECTION != 0 {
            let n = r.u8()?;
            r.bytes(usize::from(n))?.to_vec()
        } else {
            r.nul_str().to_vec()
        };
        let database = if c & caps::CONNECT_WITH_DB != 0 && r.remaining() > 0 {
            Some(String::from_utf8_lossy(r.nul_str()).into_owned()).filter(|d| !d.is_empty())
        } else {
            None
        };
        let plugin = if c & caps::PLUGIN_AUTH != 0 && r.remaining() > 0 {
            Some(String::from_utf8_lossy(r.nul_str()).into_owned())
        } else {
            None
        };
        let mut attrs = Vec::new();
        if c & caps::CONNECT_ATTRS != 0 && r.remaining() > 0 {
            let total = usize::try_from(r.lenenc_int()?).map_err(|_| Malformed("attrs"))?;
            let mut a = Reader::new(r.bytes(total)?);
            while a.remaining() > 0 && attrs.len() < 64 {
                let k = a.lenenc_str()?.unwrap_or_default();
                let v = a.lenenc_str()?.unwrap_or_default();
                attrs.push((
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ));
            }
        }
        Ok(HandshakeResponse {
            head,
            user,
            auth,
            database,
            plugin,
            attrs,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.head.encode();
        out.extend_from_slice(self.user.as_bytes());
        out.push(0);
        put_lenenc_str(&mut out, &self.auth);
        if let Some(db) = &self.database {
            out.extend_from_slice(db.as_bytes());
            out.push(0);
        }
        if let Some(p) = &self.plugin {
            out.extend_from_slice(p.as_bytes());
            out.push(0);
        }
        if self.head.caps & caps::CONNECT_ATTRS != 0 {
            let mut a = Vec::new();
            for (k, v) in &self.attrs {
                put_lenenc_str(&mut a, k.as_bytes());
                put_lenenc_str(&mut a, v.as_bytes());
            }
            put_lenenc_str(&mut out, &a);
        }
        out
    }
}

/// COM_CHANGE_USER: a new authentication on the same connection (`caps` are the session's).
#[derive(Clone, PartialEq, Eq)]
pub struct ChangeUser {
    pub user: String,
    pub auth: Vec<u8>,
    pub database: String,
    pub plugin: Option<String>,
}

impl std::fmt::Debug for ChangeUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The auth response may be a token sent in clear: never printed.
        f.debug_struct("ChangeUser")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("plugin", &self.plugin)
            .finish_non_exhaustive()
    }
}

impl ChangeUser {
    pub fn parse(p: &[u8], session_caps: u32) -> Result<ChangeUser, Malformed> {
        let mut r = Reader::new(p);
        if r.u8()? != 0x11 {
            return Err(Malformed("not COM_CHANGE_USER"));
        }
        let user = String::from_utf8_lossy(r.nul_str()).into_owned();
        let auth = if session_caps & caps::SECURE_CONNECTION != 0 {
            let n = r.u8()?;
            r.bytes(usize::from(n))?.to_vec()
        } else {
            r.nul_str().to_vec()
        };
        let database = String::from_utf8_lossy(r.nul_str()).into_owned();
        let mut plugin = None;
        if r.remaining() >= 2 {
            r.u16()?; // character set
            if session_caps & caps::PLUGIN_AUTH != 0 && r.remaining() > 0 {
                plugin = Some(String::from_utf8_lossy(r.nul_str()).into_owned());
            }
        }
        Ok(ChangeUser {
            user,
            auth,
            database,
            plugin,
        })
    }
}

/// An OK packet (header 0x00, or 0xfe when it ends a result set under DEPRECATE_EOF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: u16,
    pub warnings: u16,
}

impl OkPacket {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0];
        put_lenenc(&mut out, self.affected_rows);
        put_lenenc(&mut out, self.last_insert_id);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.warnings.to_le_bytes());
        out
    }

    pub fn parse(p: &[u8]) -> Result<OkPacket, Malformed> {
        let mut r = Reader::new(p);
        let h = r.u8()?;
        if h != 0 && h != 0xfe {
            return Err(Malformed("not an OK packet"));
        }
        Ok(OkPacket {
            affected_rows: r.lenenc_int()?,
            last_insert_id: r.lenenc_int()?,
            status: r.u16()?,
            warnings: r.u16().unwrap_or(0),
        })
    }
}

/// The status flags of an OK or EOF packet that ends a result (0 when it has none).
pub fn end_status(p: &[u8]) -> u16 {
    if p.first() == Some(&0xfe) && p.len() < 9 {
        // Old-style EOF: 0xfe, warnings (2), status (2).
        return p.get(3..5).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]));
    }
    OkPacket::parse(p).map_or(0, |o| o.status)
}

/// Whether a payload read where a row may come is the end of the rows: an EOF or an OK with
/// the 0xfe header (a row starting with 0xfe is a string of 2^24 bytes or more).
pub fn is_end_of_rows(p: &[u8]) -> bool {
    p.first() == Some(&0xfe) && p.len() < 0xff_ffff
}

/// An ERR packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    pub sqlstate: [u8; 5],
    pub message: String,
}

impl ErrPacket {
    pub fn new(code: u16, sqlstate: &str, message: impl Into<String>) -> ErrPacket {
        let mut s = [b'H', b'Y', b'0', b'0', b'0'];
        s.copy_from_slice(&sqlstate.as_bytes()[..5]);
        ErrPacket {
            code,
            sqlstate: s,
            message: message.into(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0xff];
        out.extend_from_slice(&self.code.to_le_bytes());
        out.push(b'#');
        out.extend_from_slice(&self.sqlstate);
        out.extend_from_slice(self.message.as_bytes());
        out
    }

    pub fn parse(p: &[u8]) -> Result<ErrPacket, Malformed> {
        let mut r = Reader::new(p);
        if r.u8()? != 0xff {
            return Err(Malformed("not an ERR packet"));
        }
        let code = r.u16()?;
        let mut sqlstate = *b"HY000";
        if r.remaining() >= 6 && p[3] == b'#' {
            r.u8()?;
            sqlstate.copy_from_slice(r.bytes(5)?);
        }
        Ok(ErrPacket {
            code,
            sqlstate,
            message: String::from_utf8_lossy(r.rest()).into_owned(),
        })
    }

    pub fn sqlstate(&self) -> &str {
        std::str::from_utf8(&self.sqlstate).unwrap_or("HY000")
    }
}

/// AuthSwitchRequest: 0xfe, the plugin, its data.
pub fn auth_switch(plugin: &str, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0xfe];
    out.extend_from_slice(plugin.as_bytes());
    out.push(0);
    out.extend_from_slice(data);
    out
}

/// caching_sha2_password's "send the password" request (AuthMoreData 0x04).
pub const PERFORM_FULL_AUTH: [u8; 2] = [0x01, 0x04];
pub const FAST_AUTH_OK: [u8; 2] = [0x01, 0x03];

/// A column definition (Protocol::ColumnDefinition41), the parts masking needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub schema: String,
    pub table: String,
    pub org_table: String,
    pub name: String,
    pub org_name: String,
    pub charset: u16,
    pub column_type: u8,
    pub flags: u16,
}

/// Column flag: an integer column is unsigned.
pub const UNSIGNED_FLAG: u16 = 32;

/// Column types (enum_field_types).
pub mod types {
    pub const DECIMAL: u8 = 0;
    pub const TINY: u8 = 1;
    pub const SHORT: u8 = 2;
    pub const LONG: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const DOUBLE: u8 = 5;
    pub const NULL: u8 = 6;
    pub const TIMESTAMP: u8 = 7;
    pub const LONGLONG: u8 = 8;
    pub const INT24: u8 = 9;
    pub const DATE: u8 = 10;
    pub const TIME: u8 = 11;
    pub const DATETIME: u8 = 12;
    pub const YEAR: u8 = 13;
    pub const JSON: u8 = 245;
}

/// The binary character set: a string column of this charset holds bytes.
pub const BINARY_CHARSET: u16 = 63;

impl Column {
    pub fn parse(p: &[u8]) -> Result<Column, Malformed> {
        let mut r = Reader::new(p);
        let mut s = || -> Result<String, Malformed> {
            Ok(String::from_utf8_lossy(r.lenenc_str()?.unwrap_or_default()).into_owned())
        };
        let _catalog = s()?;
        let schema = s()?;
        let table = s()?;
        let org_table = s()?;
        let name = s()?;
        let org_name = s()?;
        let _fixed = r.lenenc_int()?;
        let charset = r.u16()?;
        let _length = r.u32()?;
        let column_type = r.u8()?;
        let flags = r.u16().unwrap_or(0);
        Ok(Column {
            schema,
            table,
            org_table,
            name,
            org_name,
            charset,
            column_type,
            flags,
        })
    }

    /// How a value of this column is laid out in a binary-protocol row.
    pub fn binary_layout(&self) -> Layout {
        match self.column_type {
            types::NULL => Layout::Fixed(0),
            types::TINY => Layout::Int(1),
            types::SHORT | types::YEAR => Layout::Int(2),
            types::LONG | types::INT24 => Layout::Int(4),
            types::LONGLONG => Layout::Int(8),
            types::FLOAT => Layout::Fixed(4),
            types::DOUBLE => Layout::Fixed(8),
            types::DATE | types::DATETIME | types::TIMESTAMP | types::TIME => Layout::Counted,
            _ => Layout::String,
        }
    }

    /// The type masking rules know this column as (`types = ["int8"]` selects MySQL's integers).
    pub fn mask_type(&self) -> FieldType {
        match self.column_type {
            types::TINY | types::SHORT | types::LONG | types::LONGLONG | types::INT24 => {
                FieldType::Int8
            }
            types::YEAR => FieldType::Int2,
            types::DECIMAL | 246 => FieldType::Numeric,
            types::FLOAT | types::DOUBLE => FieldType::Float8,
            types::DATE => FieldType::Date,
            types::TIME => FieldType::Time,
            types::DATETIME | types::TIMESTAMP => FieldType::Timestamp,
            types::JSON => FieldType::Json,
            _ if self.charset == BINARY_CHARSET => FieldType::Bytea,
            _ => FieldType::Text,
        }
    }

    /// How masking reads the value as relayed (as text; binary-protocol integers are rendered
    /// in decimal first): text, bytes, JSON, a number (masked whole, to NULL) or a date (never
    /// scanned).
    pub fn mask_encoding(&self) -> Encoding {
        match self.mask_type() {
            FieldType::Int8 | FieldType::Int2 | FieldType::Numeric | FieldType::Float8 => {
                Encoding::TypedText
            }
            FieldType::Date | FieldType::Time | FieldType::Timestamp => Encoding::Fixed,
            FieldType::Json => Encoding::Json,
            _ => Encoding::Text,
        }
    }

    /// The name masks match: the column's own name when it has one (an alias cannot hide it).
    pub fn mask_name(&self) -> &str {
        if self.org_name.is_empty() {
            &self.name
        } else {
            &self.org_name
        }
    }
}

/// A value's shape in a binary row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Fixed(usize),
    /// Little-endian integer of this many bytes.
    Int(usize),
    /// A length byte, then that many bytes (dates and times).
    Counted,
    /// A length-encoded string.
    String,
}

/// COM_STMT_PREPARE_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareOk {
    pub statement_id: u32,
    pub columns: u16,
    pub params: u16,
}

impl PrepareOk {
    pub fn parse(p: &[u8]) -> Result<PrepareOk, Malformed> {
        let mut r = Reader::new(p);
        if r.u8()? != 0 {
            return Err(Malformed("not a PREPARE_OK"));
        }
        Ok(PrepareOk {
            statement_id: r.u32()?,
            columns: r.u16()?,
            params: r.u16()?,
        })
    }
}

/// The statement id a COM_STMT_* command names (after its command byte).
pub fn statement_id(p: &[u8]) -> Result<u32, Malformed> {
    Reader::new(p.get(1..).unwrap_or_default()).u32()
}

/// Replace the statement id of a COM_STMT_* command.
pub fn set_statement_id(p: &mut [u8], id: u32) {
    if p.len() >= 5 {
        p[1..5].copy_from_slice(&id.to_le_bytes());
    }
}

/// mysql_native_password: SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))).
pub fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    use ring::digest::{digest, Context, SHA1_FOR_LEGACY_USE_ONLY as SHA1};
    let h1 = digest(&SHA1, password);
    let h2 = digest(&SHA1, h1.as_ref());
    let mut c = Context::new(&SHA1);
    c.update(&scramble[..scramble.len().min(20)]);
    c.update(h2.as_ref());
    let h3 = c.finish();
    h1.as_ref()
        .iter()
        .zip(h3.as_ref())
        .map(|(a, b)| a ^ b)
        .collect()
}

/// caching_sha2_password's scramble: SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce).
pub fn caching_sha2_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    use ring::digest::{digest, Context, SHA256};
    let h1 = digest(&SHA256, password);
    let h2 = digest(&SHA256, h1.as_ref());
    let mut c = Context::new(&SHA256);
    c.update(h2.as_ref());
    c.update(&scramble[..scramble.len().min(20)]);
    let h3 = c.finish();
    h1.as_ref()
        .iter()
        .zip(h3.as_ref())
        .map(|(a, b)| a ^ b)
        .collect()
}

/// MariaDB's client_ed25519: an Ed25519 signature of the server's nonce with the key whose
/// seed is SHA-512 of the password (the password, not 32 random bytes, is the secret).
pub fn client_ed25519(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    use curve25519_dalek::{EdwardsPoint, Scalar};
    use ring::digest::{digest, Context, SHA512};
    let az = digest(&SHA512, password);
    let az = az.as_ref();
    let mut a_bytes: [u8; 32] = az[..32].try_into().expect("32 bytes");
    a_bytes[0] &= 248;
    a_bytes[31] &= 127;
    a_bytes[31] |= 64;
    let a = Scalar::from_bytes_mod_order(a_bytes);
    let public = EdwardsPoint::mul_base_clamped(a_bytes).compress();
    let mut c = Context::new(&SHA512);
    c.update(&az[32..]);
    c.update(nonce);
    let r = Scalar::from_bytes_mod_order_wide(&c.finish().as_ref().try_into().expect("64"));
    let big_r = EdwardsPoint::mul_base(&r).compress();
    let mut c = Context::new(&SHA512);
    c.update(big_r.as_bytes());
    c.update(public.as_bytes());
    c.update(nonce);
    let k = Scalar::from_bytes_mod_order_wide(&c.finish().as_ref().try_into().expect("64"));
    let s = r + k * a;
    let mut sig = big_r.as_bytes().to_vec();
    sig.extend_from_slice(s.as_bytes());
    sig
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trips() {
        let g = Greeting {
            server_version: "8.0.40-tollgate".into(),
            thread_id: 7,
            scramble: (1..=20).collect(),
            caps: caps::OFFERED & !caps::LONG_PASSWORD,
            ext_caps: ext_caps::OFFERED,
            charset: UTF8MB4_GENERAL_CI,
            status: SERVER_STATUS_AUTOCOMMIT,
            plugin: "caching_sha2_password".into(),
        };
        assert_eq!(Greeting::parse(&g.encode()).unwrap(), g);
    }

    #[test]
    fn handshake_response_round_trips() {
        let h = HandshakeResponse {
            head: SslRequest {
                caps: caps::OFFERED & !caps::LONG_PASSWORD,
                max_packet: 1 << 24,
                charset: UTF8MB4_GENERAL_CI,
                ext_caps: ext_caps::OFFERED,
            },
            user: "alice".into(),
            auth: vec![1, 2, 3],
            database: Some("crm".into()),
            plugin: Some("caching_sha2_password".into()),
            attrs: vec![("_client_name".into(), "libmariadb".into())],
        };
        assert_eq!(HandshakeResponse::parse(&h.encode()).unwrap(), h);
        assert!(!format!("{h:?}").contains("[1, 2, 3]"));
    }

    #[test]
    fn ed25519_signature_verifies_with_the_password_key() {
        // The signature must verify under the public key MariaDB stores for the password.
        use curve25519_dalek::{edwards::CompressedEdwardsY, EdwardsPoint, Scalar};
        let pw = b"s3cret";
        let nonce = [7u8; 32];
        let sig = client_ed25519(pw, &nonce);
        let az = ring::digest::digest(&ring::digest::SHA512, pw);
        let mut a: [u8; 32] = az.as_ref()[..32].try_into().unwrap();
        a[0] &= 248;
        a[31] &= 127;
        a[31] |= 64;
        let public = EdwardsPoint::mul_base_clamped(a);
        let big_r = CompressedEdwardsY(sig[..32].try_into().unwrap())
            .decompress()
            .unwrap();
        let s = Scalar::from_canonical_bytes(sig[32..].try_into().unwrap()).unwrap();
        let mut c = ring::digest::Context::new(&ring::digest::SHA512);
        c.update(&sig[..32]);
        c.update(public.compress().as_bytes());
        c.update(&nonce);
        let k = Scalar::from_bytes_mod_order_wide(&c.finish().as_ref().try_into().unwrap());
        assert_eq!(EdwardsPoint::mul_base(&s), big_r + k * public);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Greeting::parse(&bytes);
            let _ = HandshakeResponse::parse(&bytes);
            let _ = Column::parse(&bytes);
            let _ = OkPacket::parse(&bytes);
            let _ = ErrPacket::parse(&bytes);
            let _ = PrepareOk::parse(&bytes);
        }

        #[test]
        fn lenenc_round_trips(n in any::<u64>()) {
            let mut out = Vec::new();
            put_lenenc(&mut out, n);
            prop_assert_eq!(Reader::new(&out).lenenc().unwrap(), Some(n));
        }
    }
}
