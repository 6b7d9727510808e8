//! Masking one MCP message with a resource's body plan: the tool result's text content
//! (detectors; JSON-looking text parsed and masked by paths too), `structuredContent`, resource
//! `contents[].text` and prompt messages by paths and detectors (paths are relative to each of
//! those values), then the whole message by detectors alone (error messages, notifications).

use serde_json::Value;
use tollgate_mask::{BodyError, BodyKind, BodyMasker, BodyPlan, BodySummary};

/// What masking did to a message (summed over its parts).
#[derive(Default)]
pub struct Masked {
    pub summary: BodySummary,
}

impl Masked {
    fn add(&mut self, s: BodySummary) {
        self.summary.masked_values += s.masked_values;
        for r in s.reasons {
            if !self.summary.reasons.contains(&r) {
                self.summary.reasons.push(r);
            }
        }
    }
}

/// Masks `msg` in place; an error means it cannot be masked and must not be relayed.
pub fn mask_message(msg: &mut Value, plan: &BodyPlan) -> Result<Masked, BodyError> {
    let mut done = Masked::default();
    if !plan.is_active() {
        return Ok(done);
    }
    if let Some(result) = msg.get_mut("result") {
        if let Some(items) = result.get_mut("content").and_then(Value::as_array_mut) {
            for item in items {
                content_item(item, plan, &mut done)?;
            }
        }
        if let Some(sc) = result.get_mut("structuredContent") {
            json_value(sc, plan, &mut done)?;
        }
        if let Some(items) = result.get_mut("contents").and_then(Value::as_array_mut) {
            for item in items {
                if let Some(t) = item.get_mut("text") {
                    text_value(t, plan, &mut done)?;
                }
            }
        }
        if let Some(msgs) = result.get_mut("messages").and_then(Value::as_array_mut) {
            for m in msgs {
                if let Some(c) = m.get_mut("content") {
                    content_item(c, plan, &mut done)?;
                }
            }
        }
    }
    json_value(msg, &plan.detectors_only(), &mut done)?;
    Ok(done)
}

fn content_item(item: &mut Value, plan: &BodyPlan, done: &mut Masked) -> Result<(), BodyError> {
    if let Some(t) = item.get_mut("text") {
        text_value(t, plan, done)?;
    }
    if let Some(t) = item.get_mut("resource").and_then(|r| r.get_mut("text")) {
        text_value(t, plan, done)?;
    }
    Ok(())
}

/// A string that may hold JSON: masked as JSON (paths from its root) when it parses, as text
/// otherwise.
fn text_value(v: &mut Value, plan: &BodyPlan, done: &mut Masked) -> Result<(), BodyError> {
    let Value::String(s) = v else { return Ok(()) };
    let mut out = Vec::with_capacity(s.len());
    let mut m = BodyMasker::new(plan, BodyKind::Sniff);
    let summary = match m
        .feed(s.as_bytes(), &mut out)
        .and_then(|()| m.finish(&mut out))
    {
        Ok(summary) => summary,
        Err(_) => {
            out.clear();
            let mut t = BodyMasker::new(plan, BodyKind::Text);
            t.feed(s.as_bytes(), &mut out)?;
            t.finish(&mut out)?
        }
    };
    if summary.masked_values > 0 {
        *s = String::from_utf8_lossy(&out).into_owned();
        done.add(summary);
    }
    Ok(())
}

/// A JSON value masked by paths (from its root) and detectors.
fn json_value(v: &mut Value, plan: &BodyPlan, done: &mut Masked) -> Result<(), BodyError> {
    if !plan.is_active() {
        return Ok(());
    }
    let text = serde_json::to_vec(v).unwrap_or_default();
    let mut out = Vec::with_capacity(text.len());
    let mut m = BodyMasker::new(plan, BodyKind::Json);
    m.feed(&text, &mut out)?;
    let summary = m.finish(&mut out)?;
    if summary.masked_values > 0 {
        *v = serde_json::from_slice(&out).map_err(|_| BodyError::InvalidJson { at: 0 })?;
        done.add(summary);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_mask::{MaskSpec, Policy};

    fn plan(paths: &[&str]) -> BodyPlan {
        Policy::from_specs(
            &[MaskSpec {
                columns: vec![],
                types: vec![],
                detectors: vec!["email".into(), "credit_card".into()],
                json_paths: paths.iter().map(|p| p.to_string()).collect(),
                strategy: "redact".into(),
                keep_last: None,
                except_groups: vec![],
                only_groups: vec![],
            }],
            None,
        )
        .unwrap()
        .body_plan(&[])
    }

    #[test]
    fn results_are_masked_by_part() {
        let mut msg = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {
            "content": [
                {"type": "text", "text": "Ada <ada@example.com>, card 4111 1111 1111 1111"},
                {"type": "text", "text": "{\"customer\":{\"name\":\"Ada\",\"tier\":\"gold\"}}"}
            ],
            "structuredContent": {"customer": {"name": "Ada", "tier": "gold"}},
        }});
        let done = mask_message(&mut msg, &plan(&["$.customer.tier"])).unwrap();
        let text = msg["result"]["content"][0]["text"].as_str().unwrap();
        assert!(
            !text.contains("ada@example.com") && !text.contains("4111"),
            "{text}"
        );
        assert!(text.starts_with("Ada <"), "{text}");
        let json: Value =
            serde_json::from_str(msg["result"]["content"][1]["text"].as_str().unwrap()).unwrap();
        assert_ne!(json["customer"]["tier"], "gold");
        assert_eq!(json["customer"]["name"], "Ada");
        assert_ne!(
            msg["result"]["structuredContent"]["customer"]["tier"],
            "gold"
        );
        assert_eq!(msg["id"], 1);
        assert!(done.summary.masked_values >= 4);
    }

    #[test]
    fn paths_do_not_apply_to_the_envelope() {
        // A tool whose input schema has a property named like a masked path stays listed whole.
        let mut msg = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
            {"name": "t", "inputSchema": {"type": "object", "properties": {"email": {"type": "string"}}}}
        ]}});
        let before = msg.clone();
        mask_message(&mut msg, &plan(&["$..email"])).unwrap();
        assert_eq!(msg, before);
        let mut note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "from bob@example.org"}});
        mask_message(&mut note, &plan(&[])).unwrap();
        assert!(!note.to_string().contains("bob@example.org"));
    }
}
