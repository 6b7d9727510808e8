//! JSON-RPC 2.0 as MCP carries it, parsed apart from any socket: a POST body is one message or
//! a batch (an array); each element is a request, a notification, or a response the client
//! sends to a request of the server's. Duplicate object keys are refused before parsing: a
//! server whose parser keeps the first value would otherwise run another call than the one
//! judged (serde_json keeps the last).

use serde_json::{Map, Value};
use std::collections::HashSet;

/// JSON-RPC error codes the gateway answers with.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const INVALID_PARAMS: i64 = -32602;
/// A rule denied the request (or another request in its batch).
pub const DENIED: i64 = -32001;
/// A review of the request was denied, expired or withdrawn.
pub const NOT_APPROVED: i64 = -32002;
/// The gateway could not judge, record or forward the request.
pub const UNAVAILABLE: i64 = -32003;
/// The 2026-07-28 revision's error for routing headers that disagree with the body.
pub const HEADER_MISMATCH: i64 = -32020;

/// The `_meta` key that carries a request's protocol version in the 2026-07-28 revision.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// What a client message is.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Request,
    Notification,
    /// An answer to a request of the server's (sampling, elicitation, roots).
    Response,
}

/// One message a client sent.
#[derive(Debug, Clone)]
pub struct ClientMessage {
    pub kind: Kind,
    pub id: Option<Value>,
    /// `""` for a response.
    pub method: String,
    /// The tool, resource URI or prompt the request names (`tools/call`, `resources/read`,
    /// `prompts/get`).
    pub name: Option<String>,
    /// `params.arguments` of `tools/call` and `prompts/get`.
    pub arguments: Option<Value>,
    /// `params._meta.progressToken` (a string or a number).
    pub progress_token: Option<Value>,
    /// `params._meta["io.modelcontextprotocol/protocolVersion"]` (2026-07-28).
    pub meta_version: Option<Value>,
    /// `params.taskId` of the `tasks/*` requests, when a string.
    pub task_id: Option<String>,
    /// `params.task` is an object: the client asks for a task (2025-11-25).
    pub task: bool,
    /// `params.task.ttl`, when a number of milliseconds.
    pub task_ttl: Option<u64>,
}

/// A POST body, parsed.
#[derive(Debug)]
pub struct Body {
    pub messages: Vec<ClientMessage>,
    pub batch: bool,
}

/// Why a body is refused: a JSON-RPC error code and a message for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub code: i64,
    pub message: String,
}

fn malformed(code: i64, message: impl Into<String>) -> Malformed {
    Malformed {
        code,
        message: message.into(),
    }
}

/// Parses a POST body; see the module documentation.
pub fn parse(raw: &[u8]) -> Result<Body, Malformed> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| {
        malformed(
            PARSE_ERROR,
            format!("the request body is not valid JSON ({e})"),
        )
    })?;
    if let Some(key) = duplicate_key(raw) {
        return Err(malformed(
            INVALID_REQUEST,
            format!("the request repeats the JSON key {key:?} in one object; send each key once"),
        ));
    }
    let (items, batch) = match value {
        Value::Array(a) if a.is_empty() => {
            return Err(malformed(INVALID_REQUEST, "the batch is empty"))
        }
        Value::Array(a) => (a, true),
        v @ Value::Object(_) => (vec![v], false),
        _ => {
            return Err(malformed(
                INVALID_REQUEST,
                "a JSON-RPC message is an object (or a batch: an array of objects)",
            ))
        }
    };
    let messages = items
        .into_iter()
        .map(message)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Body { messages, batch })
}

fn message(v: Value) -> Result<ClientMessage, Malformed> {
    let Value::Object(mut m) = v else {
        return Err(malformed(
            INVALID_REQUEST,
            "every element of a batch must be a JSON-RPC object",
        ));
    };
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(malformed(
            INVALID_REQUEST,
            "not a JSON-RPC 2.0 message (\"jsonrpc\": \"2.0\" is missing)",
        ));
    }
    let id = m.remove("id");
    if let Some(id) = &id {
        if !(id.is_string() || id.is_i64() || id.is_u64()) {
            return Err(malformed(
                INVALID_REQUEST,
                "a JSON-RPC id is a string or an integer",
            ));
        }
    }
    let method = match m.get("method") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(malformed(INVALID_REQUEST, "\"method\" must be a string")),
    };
    let Some(method) = method else {
        if id.is_some() && (m.contains_key("result") || m.contains_key("error")) {
            return Ok(ClientMessage {
                kind: Kind::Response,
                id,
                method: String::new(),
                name: None,
                arguments: None,
                progress_token: None,
                meta_version: None,
                task_id: None,
                task: false,
                task_ttl: None,
            });
        }
        return Err(malformed(
            INVALID_REQUEST,
            "a JSON-RPC message needs a \"method\" (or, answering the server, an \"id\" and a \"result\" or \"error\")",
        ));
    };
    let params = m.remove("params");
    if params
        .as_ref()
        .is_some_and(|p| !p.is_object() && !p.is_array())
    {
        return Err(malformed(
            INVALID_REQUEST,
            "\"params\" must be an object or an array",
        ));
    }
    let field = |key: &str| params.as_ref().and_then(|p| p.get(key));
    let named = match method.as_str() {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    let name = match named {
        None => None,
        Some(key) => Some(
            field(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    malformed(
                        INVALID_PARAMS,
                        format!("{method} needs params.{key}, a string"),
                    )
                })?,
        ),
    };
    let arguments = match field("arguments") {
        None | Some(Value::Null) => None,
        Some(a @ Value::Object(_)) if named.is_some() => Some(a.clone()),
        Some(_) if named.is_some() => {
            return Err(malformed(
                INVALID_PARAMS,
                format!("{method}: params.arguments must be an object"),
            ))
        }
        Some(_) => None,
    };
    Ok(ClientMessage {
        kind: if id.is_some() {
            Kind::Request
        } else {
            Kind::Notification
        },
        id,
        method,
        name,
        arguments,
        progress_token: params
            .as_ref()
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get("progressToken"))
            .filter(|t| t.is_string() || t.is_i64() || t.is_u64())
            .cloned(),
        meta_version: params
            .as_ref()
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get(META_PROTOCOL_VERSION))
            .cloned(),
        task_id: params
            .as_ref()
            .and_then(|p| p.get("taskId"))
            .and_then(Value::as_str)
            .map(str::to_string),
        task: params
            .as_ref()
            .is_some_and(|p| p.get("task").is_some_and(Value::is_object)),
        task_ttl: params
            .as_ref()
            .and_then(|p| p.get("task"))
            .and_then(|t| t.get("ttl"))
            .and_then(Value::as_u64),
    })
}

/// `Mcp-Name` as sent: the name itself, or `=?base64?<base64 of its UTF-8>?=` for a name
/// outside the header character set. `None`: not decodable.
pub fn decode_header_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    match text
        .strip_prefix("=?base64?")
        .and_then(|t| t.strip_suffix("?="))
    {
        Some(b64) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(text.to_string()),
    }
}

/// Why a request of the stateless 2026-07-28 revision is refused for its routing headers
/// (`Mcp-Method`, `Mcp-Name`) or its `_meta` protocol version disagreeing with its body, or
/// missing: an intermediary routes and authorizes on the headers, the server reads the body,
/// so both must say the same.
pub fn stateless_mismatch(
    msg: &ClientMessage,
    version: &str,
    method: Option<&[u8]>,
    name: Option<&[u8]>,
) -> Option<String> {
    if msg.kind == Kind::Response {
        return Some("the 2026-07-28 revision carries no answers from the client".into());
    }
    match method {
        None => {
            return Some("the Mcp-Method header is missing (required from 2026-07-28 on)".into())
        }
        Some(m) if m != msg.method.as_bytes() => {
            return Some("the Mcp-Method header does not match the message's method".into())
        }
        Some(_) => {}
    }
    match (&msg.name, name) {
        (Some(_), None) => {
            return Some(format!(
                "the Mcp-Name header is missing ({} names what it acts on in it)",
                msg.method
            ))
        }
        (Some(n), Some(h)) if decode_header_name(h).as_deref() != Some(n.as_str()) => {
            return Some("the Mcp-Name header does not match the message's name".into())
        }
        (None, Some(_)) => return Some(format!("{} takes no Mcp-Name header", msg.method)),
        _ => {}
    }
    match &msg.meta_version {
        Some(Value::String(v)) if v == version => None,
        Some(_) => Some(format!(
            "params._meta[\"{META_PROTOCOL_VERSION}\"] does not match the MCP-Protocol-Version header"
        )),
        None if msg.kind == Kind::Request => Some(format!(
            "params._meta[\"{META_PROTOCOL_VERSION}\"] is missing (required on every request from 2026-07-28 on)"
        )),
        None => None,
    }
}

/// The first key an object of `raw` holds twice (compared after unescaping), if any. `raw`
/// is valid JSON (checked before).
pub fn duplicate_key(raw: &[u8]) -> Option<String> {
    enum Frame {
        Object {
            keys: HashSet<String>,
            key_next: bool,
        },
        Array,
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'{' => stack.push(Frame::Object {
                keys: HashSet::new(),
                key_next: true,
            }),
            b'[' => stack.push(Frame::Array),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => {
                if let Some(Frame::Object { key_next, .. }) = stack.last_mut() {
                    *key_next = true;
                }
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < raw.len() && raw[i] != b'"' {
                    if raw[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if let Some(Frame::Object { keys, key_next }) = stack.last_mut() {
                    if *key_next {
                        *key_next = false;
                        let text = &raw[start..(i + 1).min(raw.len())];
                        let key = serde_json::from_slice::<String>(text)
                            .unwrap_or_else(|_| String::from_utf8_lossy(text).into_owned());
                        if !keys.insert(key.clone()) {
                            return Some(key);
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The canonical JSON text of a value: object keys sorted, no whitespace (what an approval's
/// digest is taken over, whatever order or spacing the client used).
pub fn canonical(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// A JSON-RPC error response.
pub fn error_response(id: Option<&Value>, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = Map::new();
    error.insert("code".into(), code.into());
    error.insert("message".into(), message.into());
    if let Some(d) = data {
        error.insert("data".into(), d);
    }
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": Value::Object(error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stateless_headers_must_say_what_the_body_says() {
        let v = "2026-07-28";
        let call = |name: &str, meta: &str| {
            parse(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{{}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"{meta}"}}}}}}"#).as_bytes())
                .unwrap()
                .messages
                .remove(0)
        };
        let m = call("echo", v);
        assert_eq!(
            stateless_mismatch(&m, v, Some(b"tools/call"), Some(b"echo")),
            None
        );
        assert_eq!(
            stateless_mismatch(&m, v, Some(b"tools/call"), Some(b"=?base64?ZWNobw==?=")),
            None
        );
        let e = |m: &ClientMessage, method: Option<&[u8]>, name: Option<&[u8]>| {
            stateless_mismatch(m, v, method, name).unwrap()
        };
        assert!(
            e(&m, Some(b"tools/list"), Some(b"echo")).contains("Mcp-Method header does not match")
        );
        assert!(e(&m, None, Some(b"echo")).contains("Mcp-Method header is missing"));
        assert!(
            e(&m, Some(b"tools/call"), Some(b"delete")).contains("Mcp-Name header does not match")
        );
        assert!(e(&m, Some(b"tools/call"), None).contains("Mcp-Name header is missing"));
        assert!(e(
            &call("echo", "2025-11-25"),
            Some(b"tools/call"),
            Some(b"echo")
        )
        .contains("does not match the MCP-Protocol-Version header"));
        let list = parse(br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#)
            .unwrap()
            .messages
            .remove(0);
        assert!(
            e(&list, Some(b"tools/list"), None).contains("is missing (required on every request")
        );
        assert!(e(&list, Some(b"tools/list"), Some(b"x")).contains("takes no Mcp-Name header"));
    }

    #[test]
    fn duplicate_keys_are_found_after_unescaping() {
        assert_eq!(duplicate_key(br#"{"a":1,"b":{"a":2}}"#), None);
        assert_eq!(
            duplicate_key(br#"{"a":1,"\u0061":2}"#).as_deref(),
            Some("a")
        );
        assert_eq!(
            duplicate_key(br#"[{"x":"a","y":{"n":"a","n":"b"}}]"#).as_deref(),
            Some("n")
        );
        assert_eq!(duplicate_key(br#"{"k":"\"k\"","v":["k","k"]}"#), None);
        let e = parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_ticket"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        assert!(e.message.contains("\"name\""), "{e:?}");
    }

    /// A JSON object of `keys` (nested one level under "n" when `nested`), each key written
    /// either plainly or with every character as a `\uXXXX` escape.
    fn object(keys: &[(String, bool)], nested: bool) -> String {
        let members: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, (k, escaped))| {
                let key = if *escaped {
                    let mut out = String::from("\"");
                    for u in k.encode_utf16() {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                    out.push('"');
                    out
                } else {
                    Value::String(k.clone()).to_string()
                };
                format!("{key}:[{i},{},{{}}]", Value::String(k.clone()))
            })
            .collect();
        let inner = format!("{{{}}}", members.join(","));
        if nested {
            format!("{{\"a\":1,\"n\":{inner},\"z\":[{inner}]}}")
        } else {
            inner
        }
    }

    proptest::proptest! {
        #[test]
        fn duplicate_keys_are_found_however_written(
            keys in proptest::collection::vec(("[a-c\u{e9}\"]{1,2}", proptest::bool::ANY), 0..6),
            nested in proptest::bool::ANY,
        ) {
            let raw = object(&keys, nested);
            proptest::prop_assert!(serde_json::from_str::<Value>(&raw).is_ok(), "{}", raw);
            let mut seen = HashSet::new();
            let dup = keys.iter().any(|(k, _)| !seen.insert(k.clone()));
            proptest::prop_assert_eq!(duplicate_key(raw.as_bytes()).is_some(), dup, "{}", raw);
        }
    }

    #[test]
    fn messages_are_classified() {
        let b = parse(br#"[{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x","arguments":{"p":1}}},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":3,"result":{}}]"#).unwrap();
        assert!(b.batch);
        assert_eq!(b.messages[0].kind, Kind::Request);
        assert_eq!(b.messages[0].name.as_deref(), Some("x"));
        assert_eq!(b.messages[0].arguments, Some(serde_json::json!({"p": 1})));
        assert_eq!(b.messages[1].kind, Kind::Notification);
        assert_eq!(b.messages[2].kind, Kind::Response);
        assert_eq!(parse(b"{").unwrap_err().code, PARSE_ERROR);
        assert_eq!(parse(b"[]").unwrap_err().code, INVALID_REQUEST);
        assert_eq!(
            parse(br#"{"id":1,"method":"ping"}"#).unwrap_err().code,
            INVALID_REQUEST
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#)
                .unwrap_err()
                .code,
            INVALID_PARAMS
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}"#)
                .unwrap_err()
                .code,
            INVALID_PARAMS
        );
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[1,"x"],"c":null}}"#).unwrap();
        assert_eq!(canonical(&a), r#"{"a":{"c":null,"d":[1,"x"]},"b":1}"#);
    }
}
