//! The captured copy of a command's rows (`resources.capture_results`): the first result set,
//! whole rows up to `capture_bytes` (as sent by the server), masked with every rule of the resource (no group
//! exceptions and no unmask grant apply to the record), for `tollgate sessions show/replay`.

use crate::proto::{self, Column, Layout, Malformed, Reader};
use serde_json::Value;
use tollgate_gate::event::RowCapture;
use tollgate_mask::{FieldType, Outcome, RowPlan};

pub(crate) struct Capture {
    limit: usize,
    bytes: usize,
    /// The captured result set's columns and plan (`None` until the first result set).
    set: Option<(Vec<String>, RowPlan)>,
    rows: Vec<Value>,
    truncated: bool,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Capture {
        Capture {
            limit,
            bytes: 0,
            set: None,
            rows: Vec::new(),
            truncated: false,
        }
    }

    /// A result set begins: the first one is captured (with `plan`), later ones are not.
    /// Whether its rows are wanted.
    pub(crate) fn begin(&mut self, columns: &[Column], plan: impl FnOnce() -> RowPlan) -> bool {
        if self.set.is_some() {
            self.truncated = true;
            return false;
        }
        let names = columns.iter().map(|c| c.name.clone()).collect();
        self.set = Some((names, plan()));
        true
    }

    /// One row as the server sent it (text or binary protocol).
    pub(crate) fn row(
        &mut self,
        columns: &[Column],
        p: &[u8],
        binary: bool,
    ) -> Result<(), Malformed> {
        let Some((_, plan)) = &self.set else {
            return Ok(());
        };
        // Whole rows only, as on PostgreSQL: the first that does not fit ends the capture.
        if self.truncated || self.bytes + p.len() > self.limit {
            self.truncated = true;
            return Ok(());
        }
        self.bytes += p.len();
        let values = if binary {
            binary_values(columns, p)?
        } else {
            text_values(p)?
        };
        let mut row = Vec::with_capacity(values.len());
        let mut m = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            let Some(v) = v else {
                row.push(Value::Null);
                continue;
            };
            m.clear();
            let shown = match plan.mask_value(i, v.as_bytes(), &mut m) {
                Outcome::Unchanged => shown(columns.get(i), &v),
                Outcome::Masked(_) => Value::String(String::from_utf8_lossy(&m).into_owned()),
                Outcome::Null(_) => Value::Null,
            };
            row.push(shown);
        }
        self.rows.push(Value::Array(row));
        Ok(())
    }

    pub(crate) fn finish(self) -> Option<RowCapture> {
        let (columns, _) = self.set?;
        Some(RowCapture {
            columns,
            rows: self.rows,
            truncated: self.truncated,
        })
    }
}

/// A value as captured: text, or its size when it is bytes (a binary form, a binary string
/// column, not UTF-8).
fn shown(c: Option<&Column>, v: &Cell<'_>) -> Value {
    let text = match v {
        Cell::Binary(_) => None,
        // Bytes (BLOB, BINARY): the masking engine's bytea.
        _ if c.is_some_and(|c| c.mask_type() == FieldType::Bytea) => None,
        _ => std::str::from_utf8(v.as_bytes()).ok(),
    };
    match text {
        Some(t) => Value::String(t.to_string()),
        None => Value::String(format!("<binary {} bytes>", v.as_bytes().len())),
    }
}

/// A value of a row: its bytes, its text when the wire form is a binary number, or the
/// binary form of another fixed-size type (floats, dates, times).
pub(crate) enum Cell<'p> {
    Bytes(&'p [u8]),
    Text(String),
    Binary(&'p [u8]),
}

impl Cell<'_> {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Cell::Bytes(b) | Cell::Binary(b) => b,
            Cell::Text(t) => t.as_bytes(),
        }
    }
}

fn text_values(p: &[u8]) -> Result<Vec<Option<Cell<'_>>>, Malformed> {
    let mut r = Reader::new(p);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        out.push(r.lenenc_str()?.map(Cell::Bytes));
    }
    Ok(out)
}

fn binary_values<'p>(columns: &[Column], p: &'p [u8]) -> Result<Vec<Option<Cell<'p>>>, Malformed> {
    let mut r = Reader::new(p);
    if r.u8()? != 0 {
        return Err(Malformed("binary row header"));
    }
    let bitmap = r.bytes((columns.len() + 7 + 2) / 8)?;
    let mut out = Vec::with_capacity(columns.len());
    for (i, c) in columns.iter().enumerate() {
        let bit = i + 2;
        if bitmap[bit / 8] & (1 << (bit % 8)) != 0 {
            out.push(None);
            continue;
        }
        out.push(Some(binary_value(&mut r, c)?));
    }
    Ok(out)
}

/// One binary-protocol value of column `c`: integers as their decimal text (what the masking
/// rules read), other values as their bytes.
pub(crate) fn binary_value<'p>(r: &mut Reader<'p>, c: &Column) -> Result<Cell<'p>, Malformed> {
    Ok(match c.binary_layout() {
        Layout::Fixed(k) => Cell::Binary(r.bytes(k)?),
        Layout::Int(k) => {
            let b = r.bytes(k)?;
            let mut le = [0u8; 8];
            le[..k].copy_from_slice(b);
            Cell::Text(if c.flags & proto::UNSIGNED_FLAG != 0 {
                u64::from_le_bytes(le).to_string()
            } else {
                // Sign-extend.
                let shift = 64 - 8 * k as u32;
                ((i64::from_le_bytes(le) << shift) >> shift).to_string()
            })
        }
        Layout::Counted => {
            let len = r.u8()?;
            Cell::Binary(r.bytes(usize::from(len))?)
        }
        Layout::String => Cell::Bytes(r.lenenc_str()?.unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str) -> Column {
        Column {
            schema: String::new(),
            table: "t".into(),
            org_table: "t".into(),
            name: name.into(),
            org_name: name.into(),
            charset: 45,
            column_type: 253,
            flags: 0,
        }
    }

    fn text_row(values: &[&str]) -> Vec<u8> {
        let mut p = Vec::new();
        for v in values {
            proto::put_lenenc_str(&mut p, v.as_bytes());
        }
        p
    }

    #[test]
    fn whole_rows_up_to_the_limit_of_the_first_result_set() {
        let cols = [column("a"), column("b")];
        let mut c = Capture::new(12);
        assert!(c.begin(&cols, RowPlan::passthrough));
        c.row(&cols, &text_row(&["x", "yy"]), false).unwrap();
        c.row(&cols, &text_row(&["1234", "5678"]), false).unwrap();
        c.row(&cols, &text_row(&["z", "z"]), false).unwrap();
        assert!(!c.begin(&cols, RowPlan::passthrough), "a second set");
        let cap = c.finish().unwrap();
        assert_eq!(cap.columns, ["a", "b"]);
        assert_eq!(cap.rows, [serde_json::json!(["x", "yy"])]);
        assert!(cap.truncated);
    }
}
