//! PostgreSQL's row formats through a masking plan: a DataRow body, and COPY TO data (text,
//! CSV, binary). The masking engine ([`tollgate_mask`]) masks values; this module describes
//! PostgreSQL's columns to it ([`column_info`]: type OID and format to a neutral type and
//! encoding), finds the values in PostgreSQL's encodings and writes them back.
//!
//! Every rewrite is lazy: nothing is written to `out` (and nothing is allocated) until a field
//! actually changes, so the common clean row costs one scan and returns
//! [`RowOutcome::Unchanged`], and the caller forwards the original bytes.

use std::borrow::Cow;
use tollgate_mask::{ColumnInfo, Encoding, FieldType, Outcome, Reason, RowPlan};

/// The format code of a column in RowDescription, Bind or CopyOutResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

impl Format {
    /// Format code 1 is binary; anything else is read as text.
    pub fn from_code(code: i16) -> Format {
        if code == 1 {
            Format::Binary
        } else {
            Format::Text
        }
    }
}

/// A PostgreSQL result column as the masking engine sees it.
pub fn column_info(name: &str, table: Option<&str>, type_oid: u32, format: Format) -> ColumnInfo {
    ColumnInfo {
        name: name.to_string(),
        table: table.map(str::to_string),
        field_type: field_type(type_oid),
        encoding: encoding(type_oid, format),
    }
}

/// The neutral type of a built-in PostgreSQL type OID (`None` for the others).
pub fn field_type(type_oid: u32) -> Option<FieldType> {
    Some(match type_oid {
        16 => FieldType::Bool,
        17 => FieldType::Bytea,
        19 => FieldType::Name,
        20 => FieldType::Int8,
        21 => FieldType::Int2,
        23 => FieldType::Int4,
        25 => FieldType::Text,
        26 => FieldType::Oid,
        114 => FieldType::Json,
        142 => FieldType::Xml,
        650 => FieldType::Cidr,
        700 => FieldType::Float4,
        701 => FieldType::Float8,
        790 => FieldType::Money,
        829 => FieldType::Macaddr,
        869 => FieldType::Inet,
        1042 => FieldType::Bpchar,
        1043 => FieldType::Varchar,
        1082 => FieldType::Date,
        1083 => FieldType::Time,
        1114 => FieldType::Timestamp,
        1184 => FieldType::Timestamptz,
        1186 => FieldType::Interval,
        1700 => FieldType::Numeric,
        2950 => FieldType::Uuid,
        3802 => FieldType::Jsonb,
        _ => return None,
    })
}

/// Types whose values are not free text (bool, integers, oid, network and money types, floats,
/// dates and times, numeric, uuid).
const NON_TEXT_TYPES: &[u32] = &[
    16, 20, 21, 23, 26, 650, 700, 701, 790, 829, 869, 1082, 1083, 1114, 1184, 1186, 1266, 1700,
    2950,
];
/// Of those, the ones whose text cannot carry anything to find (bool, dates and times, uuid).
const UNSCANNED_TEXT_TYPES: &[u32] = &[16, 1082, 1083, 1114, 1184, 1186, 1266, 2950];
/// Types whose binary form is their text (char, name, text, unknown, bpchar, varchar) or raw
/// bytes (bytea).
const TEXT_TYPES: &[u32] = &[18, 19, 25, 705, 1042, 1043, 17];

/// How values of a type arrive in a format.
pub fn encoding(type_oid: u32, format: Format) -> Encoding {
    match (format, type_oid) {
        (_, 114) => Encoding::Json,
        (Format::Text, 3802) => Encoding::Json,
        // Binary jsonb: a version byte, then JSON text.
        (Format::Binary, 3802) => Encoding::VersionedJson,
        // Dates, times, booleans and UUIDs cannot carry free text, and their digits would
        // look like phone numbers (`…05.532057-05`): nothing to scan, as in binary.
        (Format::Text, o) if UNSCANNED_TEXT_TYPES.contains(&o) => Encoding::Fixed,
        (Format::Text, o) if NON_TEXT_TYPES.contains(&o) => Encoding::TypedText,
        (Format::Text, _) => Encoding::Text,
        (Format::Binary, o) if TEXT_TYPES.contains(&o) => Encoding::Text,
        // Binary int8 is a big-endian i64.
        (Format::Binary, 20) => Encoding::BigEndianI64,
        (Format::Binary, o) if NON_TEXT_TYPES.contains(&o) => Encoding::Fixed,
        (Format::Binary, _) => Encoding::Opaque,
    }
}

/// The result of rewriting a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    /// Nothing changed and nothing was written: forward the original bytes.
    Unchanged,
    /// `out` holds the complete rewritten body; these fields were masked.
    Rewritten(Vec<MaskedField>),
}

impl RowOutcome {
    pub fn is_unchanged(&self) -> bool {
        matches!(self, RowOutcome::Unchanged)
    }
}

/// One masked field, for the audit record (column index and why; never the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskedField {
    pub column: usize,
    pub reason: Reason,
    /// The field became SQL NULL.
    pub nulled: bool,
}

/// The data does not have the shape its message type promises. The caller must not forward it
/// (masking cannot be guaranteed on bytes it cannot parse).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("row ends inside a field or header")]
    Truncated,
    #[error("negative field count {0}")]
    BadCount(i16),
    #[error("field {column} has invalid length {len}")]
    BadLength { column: usize, len: i32 },
    #[error("row has {found} fields but the row description has {expected}")]
    ColumnCount { expected: usize, found: usize },
    #[error("{0} bytes after the last field")]
    TrailingBytes(usize),
    #[error("CSV field {column} has an unterminated quote")]
    UnterminatedQuote { column: usize },
}

/// The format of COPY TO STDOUT data (from the COPY options and CopyOutResponse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    /// `FORMAT text`: delimiter (default tab), NULL as `\N`, backslash escapes.
    Text { delimiter: u8 },
    /// `FORMAT csv`: delimiter (default `,`), quote and escape (default `"`), NULL as an
    /// unquoted empty field.
    Csv {
        delimiter: u8,
        quote: u8,
        escape: u8,
    },
    /// `FORMAT binary`: the `PGCOPY` header (when present), tuples, and the `-1` trailer.
    Binary,
}

impl CopyFormat {
    pub const TEXT: CopyFormat = CopyFormat::Text { delimiter: b'\t' };
    pub const CSV: CopyFormat = CopyFormat::Csv {
        delimiter: b',',
        quote: b'"',
        escape: b'"',
    };
}

const PGCOPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Copies the untouched parts of `data` into `out` only once a change happens.
struct Rewriter<'a> {
    data: &'a [u8],
    start_len: usize,
    flushed: usize,
    fields: Vec<MaskedField>,
}

impl<'a> Rewriter<'a> {
    fn new(data: &'a [u8], out: &[u8]) -> Self {
        Rewriter {
            data,
            start_len: out.len(),
            flushed: 0,
            fields: Vec::new(),
        }
    }

    /// Replaces `data[from..to]` by the `produced` bytes currently at the end of `out`.
    /// `header` goes between the untouched bytes and the produced ones (a field's length).
    fn replace_tail(
        &mut self,
        out: &mut Vec<u8>,
        produced_at: usize,
        header: &[u8],
        from: usize,
        to: usize,
    ) {
        let gap = &self.data[self.flushed..from];
        insert_at(out, produced_at, gap, header);
        self.flushed = to;
    }

    fn replace(&mut self, out: &mut Vec<u8>, from: usize, to: usize, with: &[u8]) {
        out.extend_from_slice(&self.data[self.flushed..from]);
        out.extend_from_slice(with);
        self.flushed = to;
    }

    fn finish(self, out: &mut Vec<u8>) -> RowOutcome {
        if self.fields.is_empty() {
            return RowOutcome::Unchanged;
        }
        out.extend_from_slice(&self.data[self.flushed..]);
        RowOutcome::Rewritten(self.fields)
    }

    fn fail(self, out: &mut Vec<u8>, e: Malformed) -> Result<RowOutcome, Malformed> {
        out.truncate(self.start_len);
        Err(e)
    }
}

/// Inserts `a` then `b` at `at` in `out` (one move of the bytes after `at`, not a rotation).
fn insert_at(out: &mut Vec<u8>, at: usize, a: &[u8], b: &[u8]) {
    let old_len = out.len();
    let k = a.len() + b.len();
    out.resize(old_len + k, 0);
    out.copy_within(at..old_len, at + k);
    out[at..at + a.len()].copy_from_slice(a);
    out[at + a.len()..at + k].copy_from_slice(b);
}

fn read_i16(d: &[u8], pos: usize) -> Result<i16, Malformed> {
    d.get(pos..pos + 2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .ok_or(Malformed::Truncated)
}

fn read_i32(d: &[u8], pos: usize) -> Result<i32, Malformed> {
    d.get(pos..pos + 4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(Malformed::Truncated)
}

/// A masking plan applied to PostgreSQL rows.
pub trait RowMasking {
    /// Rewrites a DataRow message body (`i16` field count, then per field an `i32` length and
    /// the bytes, `-1` for NULL). On [`RowOutcome::Rewritten`], `out` holds the new body with
    /// correct lengths (the caller writes the message header); on `Unchanged` nothing was
    /// written. On error `out` is left as it was.
    fn mask_data_row(&self, body: &[u8], out: &mut Vec<u8>) -> Result<RowOutcome, Malformed>;

    /// Rewrites one CopyData payload of COPY TO STDOUT. Text and CSV: one row, with its
    /// newline (PostgreSQL sends one row per CopyData). Binary: the optional file header, any
    /// number of complete tuples, and the optional trailer.
    fn mask_copy_data(
        &self,
        format: CopyFormat,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RowOutcome, Malformed>;
}

impl RowMasking for RowPlan {
    fn mask_data_row(&self, body: &[u8], out: &mut Vec<u8>) -> Result<RowOutcome, Malformed> {
        Rows(self).data_row(body, out)
    }

    fn mask_copy_data(
        &self,
        format: CopyFormat,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RowOutcome, Malformed> {
        Rows(self).copy_data(format, data, out)
    }
}

/// The row walker over one plan.
struct Rows<'p>(&'p RowPlan);

impl Rows<'_> {
    /// Rewrites a DataRow message body (`i16` field count, then per field an `i32` length and
    /// the bytes, `-1` for NULL). On [`RowOutcome::Rewritten`], `out` holds the new body with
    /// correct lengths (the caller writes the message header); on `Unchanged` nothing was
    /// written. On error `out` is left as it was.
    fn data_row(&self, body: &[u8], out: &mut Vec<u8>) -> Result<RowOutcome, Malformed> {
        if !self.0.is_active() {
            return Ok(RowOutcome::Unchanged);
        }
        let mut rw = Rewriter::new(body, out);
        let count = match read_i16(body, 0) {
            Ok(c) if c < 0 => return rw.fail(out, Malformed::BadCount(c)),
            Ok(c) => c as usize,
            Err(e) => return rw.fail(out, e),
        };
        if let Err(e) = self.check_count(count) {
            return rw.fail(out, e);
        }
        let mut pos = 2;
        if let Err(e) = self.mask_tuple(&mut rw, out, &mut pos, count) {
            return rw.fail(out, e);
        }
        if pos != body.len() {
            return rw.fail(out, Malformed::TrailingBytes(body.len() - pos));
        }
        Ok(rw.finish(out))
    }

    fn mask_tuple(
        &self,
        rw: &mut Rewriter<'_>,
        out: &mut Vec<u8>,
        pos: &mut usize,
        count: usize,
    ) -> Result<(), Malformed> {
        let data = rw.data;
        for column in 0..count {
            let len = read_i32(data, *pos)?;
            let field_start = *pos;
            *pos += 4;
            if len == -1 {
                continue;
            }
            if len < -1 || len as usize > data.len() - *pos {
                return Err(if len < -1 {
                    Malformed::BadLength { column, len }
                } else {
                    Malformed::Truncated
                });
            }
            let value = &data[*pos..*pos + len as usize];
            *pos += len as usize;
            let produced_at = out.len();
            let outcome = self.0.mask_value(column, value, out);
            match outcome {
                Outcome::Unchanged => {}
                Outcome::Masked(reason) => {
                    let new_len = (out.len() - produced_at) as i32;
                    rw.replace_tail(out, produced_at, &new_len.to_be_bytes(), field_start, *pos);
                    rw.fields.push(MaskedField {
                        column,
                        reason,
                        nulled: false,
                    });
                }
                Outcome::Null(reason) => {
                    out.truncate(produced_at);
                    rw.replace(out, field_start, *pos, &(-1i32).to_be_bytes());
                    rw.fields.push(MaskedField {
                        column,
                        reason,
                        nulled: true,
                    });
                }
            }
        }
        Ok(())
    }

    /// Rewrites one CopyData payload of COPY TO STDOUT.
    fn copy_data(
        &self,
        format: CopyFormat,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RowOutcome, Malformed> {
        if !self.0.is_active() {
            return Ok(RowOutcome::Unchanged);
        }
        let mut rw = Rewriter::new(data, out);
        let result = match format {
            CopyFormat::Binary => self.copy_binary(&mut rw, out),
            CopyFormat::Text { delimiter } => self.copy_text(&mut rw, out, delimiter),
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
            } => self.copy_csv(&mut rw, out, delimiter, quote, escape),
        };
        match result {
            Ok(()) => Ok(rw.finish(out)),
            Err(e) => rw.fail(out, e),
        }
    }

    fn check_count(&self, found: usize) -> Result<(), Malformed> {
        match self.0.fixed_columns() {
            Some(expected) if expected != found => Err(Malformed::ColumnCount { expected, found }),
            _ => Ok(()),
        }
    }

    fn copy_binary(&self, rw: &mut Rewriter<'_>, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let data = rw.data;
        let mut pos = 0;
        if data.starts_with(PGCOPY_SIGNATURE) {
            let ext = read_i32(data, PGCOPY_SIGNATURE.len() + 4)?;
            if ext < 0 {
                return Err(Malformed::BadLength {
                    column: 0,
                    len: ext,
                });
            }
            pos = PGCOPY_SIGNATURE.len() + 8 + ext as usize;
            if pos > data.len() {
                return Err(Malformed::Truncated);
            }
        }
        while pos < data.len() {
            let count = read_i16(data, pos)?;
            pos += 2;
            if count == -1 {
                return match data.len() - pos {
                    0 => Ok(()),
                    n => Err(Malformed::TrailingBytes(n)),
                };
            }
            if count < 0 {
                return Err(Malformed::BadCount(count));
            }
            self.check_count(count as usize)?;
            self.mask_tuple(rw, out, &mut pos, count as usize)?;
        }
        Ok(())
    }

    fn copy_text(
        &self,
        rw: &mut Rewriter<'_>,
        out: &mut Vec<u8>,
        delimiter: u8,
    ) -> Result<(), Malformed> {
        let data = rw.data;
        let line = data.strip_suffix(b"\n").unwrap_or(data);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut column = 0;
        let mut start = 0;
        let mut spans = Vec::new();
        loop {
            let end = line[start..]
                .iter()
                .position(|&b| b == delimiter)
                .map_or(line.len(), |p| start + p);
            spans.push(start..end);
            if end == line.len() {
                break;
            }
            start = end + 1;
        }
        self.check_count(spans.len())?;
        for span in spans {
            let raw = &line[span.clone()];
            if raw != b"\\N" {
                let value = if raw.contains(&b'\\') {
                    Cow::Owned(copy_unescape(raw))
                } else {
                    Cow::Borrowed(raw)
                };
                let mut masked = Vec::new();
                match self.0.mask_value(column, &value, &mut masked) {
                    Outcome::Unchanged => {}
                    Outcome::Masked(reason) => {
                        rw.replace(out, span.start, span.end, &copy_escape(&masked, delimiter));
                        rw.fields.push(MaskedField {
                            column,
                            reason,
                            nulled: false,
                        });
                    }
                    Outcome::Null(reason) => {
                        rw.replace(out, span.start, span.end, b"\\N");
                        rw.fields.push(MaskedField {
                            column,
                            reason,
                            nulled: true,
                        });
                    }
                }
            }
            column += 1;
        }
        Ok(())
    }

    fn copy_csv(
        &self,
        rw: &mut Rewriter<'_>,
        out: &mut Vec<u8>,
        delim: u8,
        quote: u8,
        escape: u8,
    ) -> Result<(), Malformed> {
        let data = rw.data;
        let n = data.len();
        let mut pos = 0;
        let mut column = 0;
        let mut fields = Vec::new();
        loop {
            let start = pos;
            let (value, quoted): (Cow<'_, [u8]>, bool) = if pos < n && data[pos] == quote {
                let mut v = Vec::new();
                pos += 1;
                loop {
                    if pos >= n {
                        return Err(Malformed::UnterminatedQuote { column });
                    }
                    let c = data[pos];
                    if c == escape
                        && pos + 1 < n
                        && (data[pos + 1] == quote || (escape != quote && data[pos + 1] == escape))
                    {
                        v.push(data[pos + 1]);
                        pos += 2;
                    } else if c == quote {
                        pos += 1;
                        break;
                    } else {
                        v.push(c);
                        pos += 1;
                    }
                }
                (Cow::Owned(v), true)
            } else {
                while pos < n && !matches!(data[pos], b'\n' | b'\r') && data[pos] != delim {
                    pos += 1;
                }
                (Cow::Borrowed(&data[start..pos]), false)
            };
            fields.push((start..pos, value, quoted));
            column += 1;
            if pos < n && data[pos] == delim {
                pos += 1;
            } else {
                break;
            }
        }
        let rest = &data[pos..];
        if !(rest.is_empty() || rest == b"\n" || rest == b"\r\n") {
            return Err(Malformed::TrailingBytes(rest.len()));
        }
        self.check_count(fields.len())?;
        for (column, (span, value, quoted)) in fields.into_iter().enumerate() {
            if !quoted && value.is_empty() {
                continue; // NULL
            }
            let mut masked = Vec::new();
            match self.0.mask_value(column, &value, &mut masked) {
                Outcome::Unchanged => {}
                Outcome::Masked(reason) => {
                    rw.replace(
                        out,
                        span.start,
                        span.end,
                        &csv_quote(&masked, quote, escape),
                    );
                    rw.fields.push(MaskedField {
                        column,
                        reason,
                        nulled: false,
                    });
                }
                Outcome::Null(reason) => {
                    rw.replace(out, span.start, span.end, b"");
                    rw.fields.push(MaskedField {
                        column,
                        reason,
                        nulled: true,
                    });
                }
            }
        }
        Ok(())
    }
}

/// COPY text format escapes: `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, `\v`, octal `\NNN`, hex `\xHH`.
fn copy_unescape(raw: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c != b'\\' || i + 1 == raw.len() {
            v.push(c);
            i += 1;
            continue;
        }
        let e = raw[i + 1];
        i += 2;
        match e {
            b'n' => v.push(b'\n'),
            b'r' => v.push(b'\r'),
            b't' => v.push(b'\t'),
            b'b' => v.push(8),
            b'f' => v.push(12),
            b'v' => v.push(11),
            b'0'..=b'7' => {
                let mut val = u32::from(e - b'0');
                let mut k = 0;
                while k < 2 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    val = val * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    k += 1;
                }
                v.push(val as u8);
            }
            b'x' if i < raw.len() && raw[i].is_ascii_hexdigit() => {
                let mut val = 0u32;
                let mut k = 0;
                while k < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    val = val * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                v.push(val as u8);
            }
            other => v.push(other),
        }
    }
    v
}

fn copy_escape(v: &[u8], delimiter: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 2);
    for &c in v {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' if delimiter == b'\t' => out.extend_from_slice(b"\\t"),
            c if c == delimiter => {
                out.push(b'\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn csv_quote(v: &[u8], quote: u8, escape: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 2);
    out.push(quote);
    for &c in v {
        if c == quote || (c == escape && escape != quote) {
            out.push(escape);
        }
        out.push(c);
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configurable_type_has_its_postgresql_oid() {
        let oids: Vec<(u32, FieldType)> = (0..4000)
            .filter_map(|oid| field_type(oid).map(|t| (oid, t)))
            .collect();
        for (name, t) in FieldType::ALL {
            assert_eq!(
                oids.iter().filter(|(_, o)| o == t).count(),
                1,
                "{name} has one OID"
            );
        }
        assert_eq!(field_type(869), Some(FieldType::Inet));
        assert_eq!(field_type(0), None);
    }

    #[test]
    fn encodings_follow_type_and_format() {
        // A timestamp's digits would look like a phone number: its text is not scanned.
        assert_eq!(encoding(1184, Format::Text), Encoding::Fixed);
        assert_eq!(encoding(20, Format::Text), Encoding::TypedText);
        assert_eq!(encoding(20, Format::Binary), Encoding::BigEndianI64);
        assert_eq!(encoding(3802, Format::Text), Encoding::Json);
        assert_eq!(encoding(3802, Format::Binary), Encoding::VersionedJson);
        assert_eq!(encoding(114, Format::Binary), Encoding::Json);
        assert_eq!(encoding(1043, Format::Binary), Encoding::Text);
        assert_eq!(encoding(701, Format::Binary), Encoding::Fixed);
        assert_eq!(encoding(99999, Format::Binary), Encoding::Opaque);
        assert_eq!(encoding(99999, Format::Text), Encoding::Text);
    }

    #[test]
    fn copy_escapes_round_trip() {
        let raw = b"a\\tb\\\\c\\nd\\101\\x41";
        assert_eq!(copy_unescape(raw), b"a\tb\\c\nd\x41\x41");
        assert_eq!(copy_escape(b"a\tb\\c\nd", b'\t'), b"a\\tb\\\\c\\nd");
        assert_eq!(copy_escape(b"a|b", b'|'), b"a\\|b");
        assert_eq!(csv_quote(b"say \"x\"", b'"', b'"'), b"\"say \"\"x\"\"\"");
    }
}
