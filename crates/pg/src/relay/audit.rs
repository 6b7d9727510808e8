//! The relay's audit glue: command events as recorded (texts clipped, values masked,
//! parameters redacted, digests, the guardrails' judgement), and forwarding a batch upstream
//! once the events of its commands are journaled.

use super::*;

/// Longest statement text or parameter value kept in an audit event.
pub(super) const MAX_TEXT: usize = 16 * 1024;

pub(super) const MAX_PARAM: usize = 256;

/// Sends `buf[..pos]` (as spliced) upstream once the events of its commands are in the audit
/// journal (one write per round trip); fail closed refuses them when that is impossible.
pub(super) async fn forward<W: AsyncWrite + Unpin>(
    gw: &PgGateway,
    tracker: &Tracker<'_>,
    wr: &mut W,
    buf: &mut BytesMut,
    splice: &mut Splice,
    pos: usize,
    events: &mut Vec<Stamped<event::Command>>,
) -> Result<(), Stop> {
    // Answers already relayed are recorded before the commands that follow them.
    tracker.flush_results();
    if !events.is_empty() && !tracker.log.records_commands() {
        // server.record_commands = false (a benchmark baseline): nothing is written.
        events.clear();
    }
    if !events.is_empty() {
        let inputs: Vec<EventInput> = events
            .iter()
            .map(|e| tracker.log.stamped_input(e))
            .collect();
        if let Err(e) = gw.recorder.append_async(&inputs).await {
            if gw.audit_fail_closed {
                tracing::error!(session = %tracker.log.id, error = %e, "audit event could not be written");
                // Keep the evidence of what was refused, and do not await answers to it.
                for (ev, input) in events.drain(..).zip(inputs) {
                    tracker.forget(ev.event.n);
                    gw.recorder
                        .record(event::refused(input, "audit_unavailable"));
                }
                return Err(Stop::Outcome(Outcome::AuditUnavailable));
            }
            tracing::error!(session = %tracker.log.id, error = %e, "audit event could not be written; forwarding anyway (audit_failure = open)");
        }
        events.clear();
    }
    if pos > 0 {
        let written = match splice.finish(buf, pos) {
            None => wr.write_all(&buf[..pos]).await,
            Some(out) => wr.write_all(&out).await,
        };
        let _ = buf.split_to(pos);
        if written.is_err() || wr.flush().await.is_err() {
            return Err(Stop::Outcome(Outcome::UpstreamLost));
        }
    }
    Ok(())
}

/// Applies the content detectors to a SQL text's values only (literals and comments, found by
/// PostgreSQL's scanner), so a mask can never hide keywords or a statement behind it.
pub(super) fn redact_sql(text: &str, plan: &RowPlan) -> String {
    let mut out = Vec::new();
    let mask = |s: &str, out: &mut Vec<u8>| -> Option<String> {
        out.clear();
        match plan.mask_value(0, s.as_bytes(), out) {
            tollgate_mask::Outcome::Unchanged => None,
            tollgate_mask::Outcome::Masked(_) => Some(String::from_utf8_lossy(out).into_owned()),
            tollgate_mask::Outcome::Null(_) => Some("[REDACTED]".into()),
        }
    };
    // Nearly every text has nothing to mask: one pass over the whole of it tells.
    let Some(whole) = mask(text, &mut out) else {
        return text.to_string();
    };
    let Some(spans) = tollgate_policy::value_spans(text) else {
        // The scanner rejects it (an unterminated quote): it runs nothing the server can parse.
        return whole;
    };
    let mut shown = String::with_capacity(text.len());
    let mut at = 0;
    for span in spans {
        shown.push_str(&text[at..span.start]);
        let value = &text[span.clone()];
        match mask(value, &mut out) {
            Some(masked) => shown.push_str(&masked),
            None => shown.push_str(value),
        }
        at = span.end;
    }
    shown.push_str(&text[at..]);
    shown
}

/// Applies the resource's content detectors to a command event's text (its values only) and
/// parameters.
pub(super) fn redact_command(ev: &mut event::Command, plan: &RowPlan) {
    let mut out = Vec::new();
    let mut mask = |v: &mut Value| {
        if let Some(s) = v.as_str() {
            out.clear();
            match plan.mask_value(0, s.as_bytes(), &mut out) {
                tollgate_mask::Outcome::Unchanged => {}
                tollgate_mask::Outcome::Masked(_) => {
                    *v = Value::String(String::from_utf8_lossy(&out).into_owned());
                }
                tollgate_mask::Outcome::Null(_) => *v = Value::from(REDACTED),
            }
        }
    };
    if let Some(text) = ev.text.as_mut() {
        let shown = redact_sql(text, plan);
        if shown != *text {
            *text = shown;
        }
    }
    if let Some(params) = ev.params.as_mut() {
        params.iter_mut().for_each(&mut mask);
    }
}

/// SHA-256 of a simple query's full text: what a review approves and what every command
/// event records, whatever its size (see [`bound_digest`] for a portal).
pub(super) fn digest(text: &str) -> String {
    digest_text(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// A portal's digest: over the full text's digest and the Bind's parameter section.
pub(super) fn bound_digest(full: Option<&[u8; 32]>, values: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(full.map_or(&[0u8; 32][..], |f| &f[..]));
    ctx.update(&[0]);
    ctx.update(values);
    digest_text(ctx.finish().as_ref())
}

/// "sha256:" and the hex of a SHA-256 digest, in one allocation.
pub(super) fn digest_text(d: &[u8]) -> String {
    let mut hexed = [0u8; 64];
    hex::encode_to_slice(d, &mut hexed).expect("a SHA-256 digest is 32 bytes");
    let mut s = String::with_capacity(7 + hexed.len());
    s.push_str("sha256:");
    s.push_str(std::str::from_utf8(&hexed).expect("hex is ASCII"));
    s
}

/// A Bind body after its portal and statement names.
pub(super) fn bind_values(body: &[u8]) -> &[u8] {
    let mut at = 0;
    for _ in 0..2 {
        match body[at..].iter().position(|b| *b == 0) {
            Some(i) => at += i + 1,
            None => return &[],
        }
    }
    &body[at..]
}

/// Adds the judgement to a command event (decision, what dry-run rules would have done, and
/// the classification of what runs) and hands a refusal or hold back to the relay.
pub(super) fn decided(
    ev: &mut event::Command,
    j: Judgement,
    policy: &ResourcePolicy,
    text: &str,
    classified: Option<Arc<str>>,
    out: &mut Judged,
) {
    let mut decision = j.decision.summary();
    if let Some(dry) = &j.dry_run {
        decision["dry_run"] = dry.summary();
        registry()
            .counter(
                "tollgate_policy_dry_run_total",
                "Commands a dry-run rule would have refused or held, by action.",
                &[("action", if dry.is_deny() { "deny" } else { "review" })],
            )
            .inc();
    }
    if j.opaque {
        decision["opaque"] = Value::Bool(true);
    }
    ev.decision = Some(decision);
    // Every command: what it is, in one line; refused or held ones: the full classification.
    if ev.digest.is_none() && !j.decision.is_allow() {
        // A refused or held simple query: reviews and reruns go by its digest.
        ev.digest = Some(digest(text));
    }
    let line = classified.unwrap_or_else(|| policy.classify(text).line());
    ev.classified = Some(line.to_string());
    out.may_change_settings = j.may_change_settings;
    if !j.decision.is_allow() {
        ev.classification = Some(policy.classify(text).summary().clone());
        registry()
            .counter(
                "tollgate_policy_decisions_total",
                "Commands refused or held by a rule, by action.",
                &[(
                    "action",
                    if j.decision.is_deny() {
                        "deny"
                    } else {
                        "review"
                    },
                )],
            )
            .inc();
        out.decision = Some(j.decision);
    }
}

pub(super) fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes]", &s[..end], s.len())
}

/// Parameters as recorded: values bound to a statement that handles credentials, and values that
/// look like secrets, are replaced by a marker; binary values are recorded by size only.
pub(super) fn redact_params(statement: &str, params: &[ParamValue]) -> Vec<Value> {
    if params.is_empty() {
        return Vec::new();
    }
    let lower = statement.to_ascii_lowercase();
    let sensitive_statement = [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
        "private_key",
    ]
    .iter()
    .any(|w| lower.contains(w));
    params
        .iter()
        .map(|p| match p {
            ParamValue::Null => Value::Null,
            ParamValue::Binary(n) => Value::String(format!("<binary {n} bytes>")),
            ParamValue::Text(_) if sensitive_statement => Value::from(REDACTED),
            ParamValue::Text(t) if looks_secret(t) => Value::from(REDACTED),
            ParamValue::Text(t) => Value::String(clip(t, MAX_PARAM)),
        })
        .collect()
}

/// What a recorded value that may not be shown becomes.
pub(super) const REDACTED: &str = "[REDACTED]";

/// Tokens and keys that must not land in an audit trail even when bound to an innocent statement.
pub(super) fn looks_secret(v: &str) -> bool {
    let jwt = v.starts_with("eyJ") && v.matches('.').count() == 2;
    let aws = v.len() == 20
        && (v.starts_with("AKIA") || v.starts_with("ASIA"))
        && v.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    let pem = v.contains("-----BEGIN") && v.contains("PRIVATE KEY");
    let bearer = v.starts_with("Bearer ")
        || v.starts_with("ghp_")
        || v.starts_with("xox")
        || v.starts_with("sk_live_");
    jwt || aws || pem || bearer
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn digests_bind_the_text_and_every_parameter_byte() {
        let full = [7u8; 32];
        let bind = |v: &[u8]| {
            let mut body = b"portal\0stmt\0".to_vec();
            body.extend_from_slice(v);
            bound_digest(Some(&full), bind_values(&body))
        };
        let nine = bind(b"\0\0\0\x01\0\0\0\x019");
        assert_eq!(nine, bind(b"\0\0\0\x01\0\0\0\x019"));
        assert_ne!(nine, bind(b"\0\0\0\x01\0\0\0\x018"));
        assert_ne!(
            nine,
            bound_digest(Some(&[8u8; 32]), b"\0\0\0\x01\0\0\0\x019")
        );
        assert!(nine.starts_with("sha256:") && nine.len() == 7 + 64);
        assert_eq!(bind_values(b"no terminator"), b"");
        assert_ne!(
            digest("DELETE FROM t WHERE id = 1"),
            digest("DELETE FROM t WHERE id = 2")
        );
    }

    #[test]
    fn values_are_masked_inside_literals_only() {
        let policy = tollgate_mask::Policy::from_specs(
            &[tollgate_mask::MaskSpec {
                detectors: vec!["pem_private_key".into(), "email".into()],
                strategy: "redact".into(),
                ..Default::default()
            }],
            None,
        )
        .unwrap();
        let plan = policy.text_plan(&[]);
        let sql = "SELECT '-----BEGIN RSA PRIVATE KEY-----' AS k; DELETE FROM t WHERE email = 'a@b.example'";
        let shown = redact_sql(sql, &plan);
        assert!(shown.contains("; DELETE FROM t WHERE email = "), "{shown}");
        assert!(!shown.contains("a@b.example"), "{shown}");
        assert!(!shown.contains("BEGIN RSA PRIVATE KEY"), "{shown}");
        assert_eq!(redact_sql("SELECT 1", &plan), "SELECT 1");
    }

    #[test]
    fn redaction() {
        let p = vec![
            ParamValue::Text("alice".into()),
            ParamValue::Text("hunter2".into()),
        ];
        assert_eq!(
            Value::Array(redact_params(
                "UPDATE users SET password = $2 WHERE name = $1",
                &p
            )),
            json!(["[REDACTED]", "[REDACTED]"])
        );
        assert_eq!(
            Value::Array(redact_params("SELECT * FROM t WHERE a = $1 AND b = $2", &p)),
            json!(["alice", "hunter2"])
        );
        let s = vec![
            ParamValue::Text("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc".into()),
            ParamValue::Text("AKIAIOSFODNN7EXAMPLE".into()),
            ParamValue::Binary(8),
            ParamValue::Null,
        ];
        assert_eq!(
            Value::Array(redact_params("SELECT $1, $2, $3, $4", &s)),
            json!(["[REDACTED]", "[REDACTED]", "<binary 8 bytes>", null])
        );
    }

    #[test]
    fn clipping_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h…[6 bytes]");
        assert_eq!(clip("abc", 5), "abc");
    }
}
