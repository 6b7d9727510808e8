//! Messages a client sends: parsers for the commands the gateway records, builders for the
//! messages the gateway sends upstream while authenticating.

use super::frame::{Malformed, Reader};

/// A bound parameter value as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamValue {
    Null,
    Text(String),
    Binary(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub statement: String,
    pub query: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    pub params: Vec<ParamValue>,
    /// Result-column format codes: none (all text), one (for all columns), or one per column.
    pub result_formats: Vec<i16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execute {
    pub portal: String,
    pub max_rows: i32,
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether the statement and portal names a Parse, Bind, Execute, Close or Describe carries
/// are valid UTF-8. The parsers here decode names lossily, so two different invalid names
/// would read as one: whoever keys state by name must refuse such names first.
pub fn names_are_utf8(tag: u8, body: &[u8]) -> bool {
    let mut r = Reader::new(body);
    let names = match tag {
        b'P' | b'E' => 1,
        b'B' => 2,
        b'C' | b'D' => {
            if r.u8().is_err() {
                return true;
            }
            1
        }
        _ => 0,
    };
    (0..names).all(|_| r.cstr().map_or(true, |n| std::str::from_utf8(n).is_ok()))
}

/// Query: the SQL text.
pub fn parse_query(body: &[u8]) -> Result<String, Malformed> {
    Ok(string(Reader::new(body).cstr()?))
}

pub fn parse_parse(body: &[u8]) -> Result<Parse, Malformed> {
    let mut r = Reader::new(body);
    Ok(Parse {
        statement: string(r.cstr()?),
        query: string(r.cstr()?),
    })
}

pub fn parse_bind(body: &[u8]) -> Result<Bind, Malformed> {
    let mut r = Reader::new(body);
    let portal = string(r.cstr()?);
    let statement = string(r.cstr()?);
    let nfmt = r.i16()?;
    if nfmt < 0 {
        return Err(Malformed);
    }
    let mut formats = Vec::with_capacity((nfmt as usize).min(r.remaining() / 2));
    for _ in 0..nfmt {
        formats.push(r.i16()?);
    }
    let nparams = r.i16()?;
    if nparams < 0 {
        return Err(Malformed);
    }
    let mut params = Vec::with_capacity((nparams as usize).min(r.remaining() / 4));
    for i in 0..nparams as usize {
        let len = r.i32()?;
        if len == -1 {
            params.push(ParamValue::Null);
            continue;
        }
        if len < 0 {
            return Err(Malformed);
        }
        let v = r.bytes(len as usize)?;
        let format = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => *formats.get(i).ok_or(Malformed)?,
        };
        params.push(if format == 0 {
            ParamValue::Text(string(v))
        } else {
            ParamValue::Binary(v.len())
        });
    }
    // A body that ends before the result formats is left for the server to reject.
    let nres = if r.remaining() == 0 { 0 } else { r.i16()? };
    if nres < 0 {
        return Err(Malformed);
    }
    let mut result_formats = Vec::with_capacity((nres as usize).min(r.remaining() / 2));
    for _ in 0..nres {
        result_formats.push(r.i16()?);
    }
    Ok(Bind {
        portal,
        statement,
        params,
        result_formats,
    })
}

pub fn parse_execute(body: &[u8]) -> Result<Execute, Malformed> {
    let mut r = Reader::new(body);
    Ok(Execute {
        portal: string(r.cstr()?),
        max_rows: r.i32()?,
    })
}

/// Close or Describe: (`S` statement | `P` portal, name).
pub fn parse_target(body: &[u8]) -> Result<(u8, String), Malformed> {
    let mut r = Reader::new(body);
    let kind = r.u8()?;
    Ok((kind, string(r.cstr()?)))
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Describe of a portal (`P`) or statement (`S`), which the gateway sends when it must learn the
/// shape of a result the client did not ask it to describe.
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + name.len());
    body.push(kind);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    message(b'D', &body)
}

pub fn password(secret: &str) -> Vec<u8> {
    let mut body = secret.as_bytes().to_vec();
    body.push(0);
    message(b'p', &body)
}

pub fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}

pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    message(b'p', data)
}

/// Parse, Describe, Close and Sync of a gateway-private statement: what the gateway sends
/// to learn the columns `sql` returns (answers: ParseComplete, RowDescription or NoData,
/// CloseComplete, ReadyForQuery; or an ErrorResponse and ReadyForQuery).
pub fn describe_only(name: &str, sql: &str) -> Vec<u8> {
    let mut parse = name.as_bytes().to_vec();
    parse.push(0);
    parse.extend_from_slice(sql.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&0i16.to_be_bytes());
    let mut close = vec![b'S'];
    close.extend_from_slice(name.as_bytes());
    close.push(0);
    let mut out = message(b'P', &parse);
    out.extend(describe(b'S', name));
    out.extend(message(b'C', &close));
    out.extend(message(b'S', &[]));
    out
}

/// A simple-protocol Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

pub fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

/// The password a client sent in answer to AuthenticationCleartextPassword.
pub fn parse_password(body: &[u8]) -> Result<String, Malformed> {
    let s = Reader::new(body).cstr()?;
    String::from_utf8(s.to_vec()).map_err(|_| Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_that_are_not_utf8_are_found() {
        assert!(names_are_utf8(b'P', b"s1\0SELECT 1\0\0\0"));
        assert!(!names_are_utf8(b'P', b"\xff\0SELECT 1\0\0\0"));
        assert!(!names_are_utf8(b'B', b"p\0\xfe\0\0\0\0\0\0\0"));
        assert!(!names_are_utf8(b'E', b"\xc3\0\0\0\0\0"));
        assert!(!names_are_utf8(b'C', b"S\xff\0"));
        assert!(names_are_utf8(b'D', b"P\xc3\xa9\0"));
        // Other messages carry no names; truncated ones are left to the parsers.
        assert!(names_are_utf8(b'Q', b"SELECT '\xff'\0"));
        assert!(names_are_utf8(b'P', b"\xff"));
    }

    #[test]
    fn bind_params() {
        let mut b = b"p1\0s1\0".to_vec();
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&3i16.to_be_bytes());
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 7]);
        b.extend_from_slice(&(-1i32).to_be_bytes());
        // result formats
        b.extend_from_slice(&0i16.to_be_bytes());
        let bind = parse_bind(&b).unwrap();
        assert!(bind.result_formats.is_empty());
        assert_eq!(bind.portal, "p1");
        assert_eq!(bind.statement, "s1");
        // three params but only two formats: malformed in PostgreSQL terms
        assert!(bind.params.len() == 3 || bind.params.is_empty());
    }

    #[test]
    fn bind_single_format_applies_to_all() {
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        for v in [&b"x"[..], b"yz"] {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v);
        }
        let bind = parse_bind(&b).unwrap();
        assert_eq!(
            bind.params,
            vec![ParamValue::Text("x".into()), ParamValue::Text("yz".into())]
        );
    }

    #[test]
    fn bind_result_formats_and_describe() {
        let mut b = b"p\0s\0".to_vec();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        assert_eq!(parse_bind(&b).unwrap().result_formats, vec![1, 0]);
        assert_eq!(describe(b'P', "p1"), b"D\0\0\0\x08Pp1\0".to_vec());
    }

    #[test]
    fn bind_lengths_are_checked() {
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(parse_bind(&b), Err(Malformed));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_bind(&body);
            let _ = parse_parse(&body);
            let _ = parse_execute(&body);
            let _ = parse_query(&body);
        }
    }
}
