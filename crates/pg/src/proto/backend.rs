//! Messages a server sends: builders for the ones tollgate originates, parsers for the ones it reads.

use super::frame::{Malformed, Reader};

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

/// An ErrorResponse (or, with `Severity::Notice`, a NoticeResponse) that tollgate itself sends.
pub fn error(severity: Severity, code: &str, msg: &str, hint: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + msg.len());
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', msg),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    if let Some(h) = hint {
        body.push(b'H');
        body.extend_from_slice(h.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(
        if severity == Severity::Notice {
            b'N'
        } else {
            b'E'
        },
        &body,
    )
}

pub fn auth_ok() -> Vec<u8> {
    message(b'R', &0i32.to_be_bytes())
}

pub fn auth_cleartext() -> Vec<u8> {
    message(b'R', &3i32.to_be_bytes())
}

pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    message(b'S', &body)
}

pub fn backend_key_data(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend_from_slice(secret);
    message(b'K', &body)
}

pub fn ready_for_query(status: u8) -> Vec<u8> {
    message(b'Z', &[status])
}

/// NegotiateProtocolVersion: the newest minor version we support and the options we did not recognise.
pub fn negotiate_protocol_version(minor: u16, unrecognized: &[&str]) -> Vec<u8> {
    let mut body = ((3i32 << 16) | minor as i32).to_be_bytes().to_vec();
    body.extend_from_slice(&(unrecognized.len() as i32).to_be_bytes());
    for o in unrecognized {
        body.extend_from_slice(o.as_bytes());
        body.push(0);
    }
    message(b'v', &body)
}

/// The fields of an ErrorResponse/NoticeResponse that the gateway records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error(body: &[u8]) -> Result<ErrorFields, Malformed> {
    let mut r = Reader::new(body);
    let mut f = ErrorFields::default();
    loop {
        let t = r.u8()?;
        if t == 0 {
            return Ok(f);
        }
        let v = String::from_utf8_lossy(r.cstr()?).into_owned();
        match t {
            b'V' => f.severity = v,
            b'S' if f.severity.is_empty() => f.severity = v,
            b'C' => f.code = v,
            b'M' => f.message = v,
            _ => {}
        }
    }
}

/// Rows affected or returned, from a CommandComplete tag such as `SELECT 5`, `INSERT 0 3`, `COPY 10`.
pub fn command_rows(tag: &[u8]) -> Option<u64> {
    let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
    let last = tag.rsplit(|b| *b == b' ').next()?;
    std::str::from_utf8(last).ok()?.parse().ok()
}

/// The command word of a CommandComplete tag (`SELECT`, `INSERT`, `CREATE TABLE`, ...).
pub fn command_word(tag: &[u8]) -> String {
    let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
    let s = String::from_utf8_lossy(tag);
    s.trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ')
        .to_string()
}

/// An Authentication request from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5([u8; 4]),
    Sasl(Vec<String>),
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    Other(i32),
}

pub fn parse_auth(body: &[u8]) -> Result<AuthRequest, Malformed> {
    let mut r = Reader::new(body);
    Ok(match r.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let s = r.bytes(4)?;
            AuthRequest::Md5([s[0], s[1], s[2], s[3]])
        }
        10 => {
            let mut mechs = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechs.push(String::from_utf8_lossy(m).into_owned());
            }
            AuthRequest::Sasl(mechs)
        }
        11 => AuthRequest::SaslContinue(r.rest().to_vec()),
        12 => AuthRequest::SaslFinal(r.rest().to_vec()),
        n => AuthRequest::Other(n),
    })
}

pub fn parse_backend_key(body: &[u8]) -> Result<(i32, Vec<u8>), Malformed> {
    let mut r = Reader::new(body);
    let pid = r.i32()?;
    Ok((pid, r.rest().to_vec()))
}

pub fn parse_parameter_status(body: &[u8]) -> Result<(String, String), Malformed> {
    let mut r = Reader::new(body);
    let k = String::from_utf8_lossy(r.cstr()?).into_owned();
    let v = String::from_utf8_lossy(r.cstr()?).into_owned();
    Ok((k, v))
}

/// The fields of a DataRow, in column order; `None` is SQL NULL. Each length is checked against
/// what is left of the body before the field is sliced.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, Malformed> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    if n < 0 {
        return Err(Malformed);
    }
    let mut fields = Vec::with_capacity((n as usize).min(r.remaining() / 4));
    for _ in 0..n {
        let len = r.i32()?;
        fields.push(match len {
            -1 => None,
            l if l < 0 => return Err(Malformed),
            l => Some(r.bytes(l as usize)?),
        });
    }
    Ok(fields)
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowField {
    pub name: String,
    /// The source table's OID, 0 when the column is not a plain table column.
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    /// 0 text, 1 binary (always 0 in the answer to a statement Describe).
    pub format: i16,
}

pub fn parse_row_description(body: &[u8]) -> Result<Vec<RowField>, Malformed> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    if n < 0 {
        return Err(Malformed);
    }
    // Each field takes at least 19 bytes: no allocation beyond what the body can hold.
    let mut fields = Vec::with_capacity((n as usize).min(r.remaining() / 19));
    for _ in 0..n {
        let name = String::from_utf8_lossy(r.cstr()?).into_owned();
        let table_oid = r.i32()? as u32;
        let attnum = r.i16()?;
        let type_oid = r.i32()? as u32;
        let _typlen = r.i16()?;
        let _typmod = r.i32()?;
        let format = r.i16()?;
        fields.push(RowField {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    Ok(fields)
}

/// CopyOutResponse / CopyInResponse: the overall format (0 textual, 1 binary) and per-column formats.
pub fn parse_copy_response(body: &[u8]) -> Result<(u8, Vec<i16>), Malformed> {
    let mut r = Reader::new(body);
    let overall = r.u8()?;
    let n = r.i16()?;
    if n < 0 {
        return Err(Malformed);
    }
    let mut formats = Vec::with_capacity((n as usize).min(r.remaining() / 2));
    for _ in 0..n {
        formats.push(r.i16()?);
    }
    Ok((overall, formats))
}

/// Every field of an ErrorResponse or NoticeResponse, in order: (field type, value).
pub fn parse_fields(body: &[u8]) -> Result<Vec<(u8, &[u8])>, Malformed> {
    let mut r = Reader::new(body);
    let mut fields = Vec::new();
    loop {
        let t = r.u8()?;
        if t == 0 {
            return Ok(fields);
        }
        fields.push((t, r.cstr()?));
    }
}

/// An ErrorResponse (`E`) or NoticeResponse (`N`) from fields.
pub fn build_fields(tag: u8, fields: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::with_capacity(fields.iter().map(|(_, v)| v.len() + 2).sum::<usize>() + 1);
    for (t, v) in fields {
        body.push(*t);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    message(tag, &body)
}

/// NotificationResponse: (backend pid, channel, payload).
pub fn parse_notification(body: &[u8]) -> Result<(i32, &[u8], &[u8]), Malformed> {
    let mut r = Reader::new(body);
    Ok((r.i32()?, r.cstr()?, r.cstr()?))
}

pub fn notification(pid: i32, channel: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(6 + channel.len() + payload.len());
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(channel);
    body.push(0);
    body.extend_from_slice(payload);
    body.push(0);
    message(b'A', &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::next_frame;

    #[test]
    fn error_roundtrip() {
        let m = error(
            Severity::Fatal,
            "28000",
            "tls required",
            Some("use sslmode=require"),
        );
        let f = next_frame(&m, 1000).unwrap().unwrap();
        assert_eq!(f.tag, b'E');
        let e = parse_error(f.body(&m)).unwrap();
        assert_eq!(
            (e.severity.as_str(), e.code.as_str(), e.message.as_str()),
            ("FATAL", "28000", "tls required")
        );
        assert_eq!(error(Severity::Notice, "00000", "n", None)[0], b'N');
    }

    #[test]
    fn tags() {
        assert_eq!(command_rows(b"SELECT 5\0"), Some(5));
        assert_eq!(command_rows(b"INSERT 0 3\0"), Some(3));
        assert_eq!(command_rows(b"CREATE TABLE\0"), None);
        assert_eq!(command_word(b"INSERT 0 3\0"), "INSERT");
        assert_eq!(command_word(b"CREATE TABLE\0"), "CREATE TABLE");
    }

    #[test]
    fn data_row_fields() {
        let mut body = 3i16.to_be_bytes().to_vec();
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"42");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            parse_data_row(&body).unwrap(),
            vec![Some(&b"42"[..]), None, Some(&b""[..])]
        );
        // A length beyond the body, a negative count and a truncated length are all malformed.
        let mut long = 1i16.to_be_bytes().to_vec();
        long.extend_from_slice(&100i32.to_be_bytes());
        long.extend_from_slice(b"short");
        assert!(parse_data_row(&long).is_err());
        assert!(parse_data_row(&(-1i16).to_be_bytes()).is_err());
        assert!(parse_data_row(&[0, 1, 0, 0]).is_err());
    }

    #[test]
    fn auth() {
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            parse_auth(&body).unwrap(),
            AuthRequest::Sasl(vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()])
        );
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_auth(&md5).unwrap(), AuthRequest::Md5([1, 2, 3, 4]));
        assert!(parse_auth(&[0, 0]).is_err());
    }
}
