//! A complete walk of a pg_query parse tree.
//!
//! pg_query's own `nodes()` visits only some node types (it skips, for example, LIMIT, VALUES
//! lists and function arguments), and a guardrail must not miss a `pg_terminate_backend(...)`
//! hidden in one of them. The generated protobuf types all implement `serde::Serialize`, so
//! serializing a tree into this [`Walker`] visits every field of every node, without
//! allocating a copy of the tree.

use serde::ser::{self, Serialize};
use std::fmt;

/// What the walk found under one statement.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    /// The first enum variant met: the statement's node type (`"SelectStmt"`, `"DropStmt"`, ...).
    pub top: Option<&'static str>,
    /// Relations as written: `schema.table` or `table`.
    pub tables: Vec<String>,
    /// Called functions as written: `schema.func` or `func`.
    pub functions: Vec<String>,
    /// Data-modifying statements anywhere in the tree (including the top one).
    pub dml: Vec<Dml>,
    /// An UPDATE or DELETE without WHERE somewhere in the tree.
    pub where_missing: bool,
    /// Parameters named by `set_config(...)` calls (None: not a plain string literal).
    pub set_config: Vec<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dml {
    Insert,
    Update,
    Delete,
    Merge,
}

impl Dml {
    pub fn as_str(self) -> &'static str {
        match self {
            Dml::Insert => "insert",
            Dml::Update => "update",
            Dml::Delete => "delete",
            Dml::Merge => "merge",
        }
    }
}

pub(crate) fn walk<T: Serialize + ?Sized>(node: &T) -> Facts {
    let mut w = Walker::default();
    // The walker itself never fails; an error could only come from a foreign Serialize impl.
    let _ = node.serialize(&mut w);
    let mut f = w.facts;
    f.tables.sort();
    f.tables.dedup();
    f.functions.sort();
    f.functions.dedup();
    f.dml.sort();
    f.dml.dedup();
    f
}

#[derive(Default)]
struct Walker {
    facts: Facts,
    /// Names of the structs being serialized, innermost last.
    stack: Vec<&'static str>,
    /// Strings are collected only while this is set (a function name, a relation name part).
    capture: Option<Vec<String>>,
    /// Set just before serializing an optional WHERE clause: the next none/some answers it.
    probe: Probe,
    /// Parts of the RangeVar being serialized: catalog, schema, relation.
    range_var: [String; 3],
}

#[derive(Default, PartialEq)]
enum Probe {
    #[default]
    Off,
    Waiting,
    Missing,
    Present,
}

#[derive(Debug)]
pub(crate) struct WalkError(String);

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for WalkError {}
impl ser::Error for WalkError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

type R = Result<(), WalkError>;

impl Walker {
    fn captured<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<Vec<String>, WalkError> {
        let outer = self.capture.replace(Vec::new());
        let r = value.serialize(&mut *self);
        let got = std::mem::replace(&mut self.capture, outer).unwrap_or_default();
        r.map(|_| got)
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> R {
        match (self.stack.last().copied(), key) {
            (Some("FuncCall"), "funcname") => {
                let parts = self.captured(value)?;
                if !parts.is_empty() {
                    self.facts.functions.push(parts.join("."));
                }
                Ok(())
            }
            (Some("FuncCall"), "args") if self.last_call_is_set_config() => {
                // Rare enough to afford a JSON copy of the arguments to read the first one.
                let args = serde_json::to_value(value).unwrap_or_default();
                let name = args[0]["node"]["AConst"]["val"]["Sval"]["sval"].as_str();
                self.facts
                    .set_config
                    .push(name.map(str::to_ascii_lowercase));
                value.serialize(&mut *self)
            }
            (Some("MergeWhenClause"), "command_type") => {
                // Rare enough to afford a JSON copy of one integer.
                let action = serde_json::to_value(value)
                    .ok()
                    .and_then(|v| v.as_i64())
                    .and_then(|v| pg_query::protobuf::CmdType::try_from(v as i32).ok());
                use pg_query::protobuf::CmdType;
                match action {
                    Some(CmdType::CmdInsert) => self.facts.dml.push(Dml::Insert),
                    Some(CmdType::CmdUpdate) => self.facts.dml.push(Dml::Update),
                    Some(CmdType::CmdDelete) => self.facts.dml.push(Dml::Delete),
                    Some(CmdType::CmdNothing) => {}
                    // Anything newer may do any of them.
                    _ => self
                        .facts
                        .dml
                        .extend([Dml::Insert, Dml::Update, Dml::Delete]),
                }
                Ok(())
            }
            (Some("RangeVar"), "catalogname" | "schemaname" | "relname") => {
                let i = match key {
                    "catalogname" => 0,
                    "schemaname" => 1,
                    _ => 2,
                };
                self.range_var[i] = self.captured(value)?.concat();
                Ok(())
            }
            (Some("UpdateStmt" | "DeleteStmt"), "where_clause") => {
                self.probe = Probe::Waiting;
                value.serialize(&mut *self)?;
                if self.probe == Probe::Missing {
                    self.facts.where_missing = true;
                }
                self.probe = Probe::Off;
                Ok(())
            }
            _ => value.serialize(&mut *self),
        }
    }

    /// A FuncCall's name is serialized before its arguments, so the name just recorded is its own.
    fn last_call_is_set_config(&self) -> bool {
        self.facts.functions.last().is_some_and(|f| {
            f.rsplit('.')
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case("set_config"))
        })
    }

    fn enter(&mut self, name: &'static str) {
        match name {
            "InsertStmt" => self.facts.dml.push(Dml::Insert),
            "UpdateStmt" => self.facts.dml.push(Dml::Update),
            "DeleteStmt" => self.facts.dml.push(Dml::Delete),
            "MergeStmt" => self.facts.dml.push(Dml::Merge),
            "RangeVar" => self.range_var = Default::default(),
            _ => {}
        }
        self.stack.push(name);
    }

    fn leave(&mut self) {
        if self.stack.pop() == Some("RangeVar") {
            let [catalog, schema, rel] = std::mem::take(&mut self.range_var);
            if !rel.is_empty() {
                let name = [catalog, schema, rel]
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    .join(".");
                self.facts.tables.push(name);
            }
        }
    }
}

impl ser::Serializer for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, _: bool) -> R {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> R {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> R {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> R {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> R {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> R {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> R {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> R {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> R {
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> R {
        Ok(())
    }
    fn serialize_f64(self, _: f64) -> R {
        Ok(())
    }
    fn serialize_char(self, _: char) -> R {
        Ok(())
    }
    fn serialize_str(self, v: &str) -> R {
        if let Some(c) = self.capture.as_mut() {
            c.push(v.to_string());
        }
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        Ok(())
    }
    fn serialize_none(self) -> R {
        if self.probe == Probe::Waiting {
            self.probe = Probe::Missing;
        }
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> R {
        if self.probe == Probe::Waiting {
            self.probe = Probe::Present;
        }
        value.serialize(self)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> R {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> R {
        if self.facts.top.is_none() {
            self.facts.top = Some(variant);
        }
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Self, WalkError> {
        self.enter(name);
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self, WalkError> {
        self.enter(variant);
        Ok(self)
    }
}

impl ser::SerializeSeq for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}
impl ser::SerializeTuple for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}
impl ser::SerializeTupleStruct for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}
impl ser::SerializeTupleVariant for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}
impl ser::SerializeMap for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> R {
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}
impl ser::SerializeStruct for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> R {
        self.field(key, value)
    }
    fn end(self) -> R {
        self.leave();
        Ok(())
    }
}
impl ser::SerializeStructVariant for &mut Walker {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> R {
        self.field(key, value)
    }
    fn end(self) -> R {
        self.leave();
        Ok(())
    }
}
