//! Server error messages can echo data (`Duplicate entry 'alice@example.com' for key
//! 'email'`, `Incorrect integer value: '123-45-6789' for column ...`). Before one reaches a
//! viewer whose results are masked, the values MySQL quotes in it are withheld when column or
//! type rules apply to the viewer (the message does not say which column a value came from
//! reliably: a key is named after an index), and the whole text is masked with the resource's
//! detectors. Pure: the masking itself is the mask crate's.

use tollgate_mask::{Outcome, Policy, Reason, RowPlan, REDACTED};

/// What precedes a value MySQL quotes in an error message, and what follows it.
const ECHOES: &[(&str, &[&str])] = &[
    ("Duplicate entry '", &["' for key"]),
    ("value: '", &["' for column", "' at row"]),
];

/// The masker for one session's error messages.
pub struct ErrorMasker {
    text: RowPlan,
    /// The first column or type rule that applies to the viewer.
    withhold: Option<usize>,
}

impl ErrorMasker {
    /// `None` when nothing would be masked for a viewer in `groups`.
    pub fn new(policy: &Policy, groups: &[String]) -> Option<ErrorMasker> {
        let withhold = policy
            .rules()
            .iter()
            .position(|r| r.applies_to(groups) && (!r.columns.is_empty() || !r.types.is_empty()));
        let text = policy.text_plan(groups);
        (withhold.is_some() || text.is_active()).then_some(ErrorMasker { text, withhold })
    }

    /// The message as the viewer may see it, and why it changed; `None` when unchanged.
    pub fn mask(&self, message: &str) -> Option<(String, Vec<Reason>)> {
        let mut reasons = Vec::new();
        let mut out = message.to_string();
        if let Some(rule) = self.withhold {
            if let Some(w) = withhold_echoed_values(&out) {
                out = w;
                reasons.push(Reason::Column { rule });
            }
        }
        let mut m = Vec::new();
        match self.text.mask_value(0, out.as_bytes(), &mut m) {
            Outcome::Unchanged => {}
            Outcome::Masked(r) => {
                out = String::from_utf8_lossy(&m).into_owned();
                reasons.push(r);
            }
            Outcome::Null(r) => {
                out = String::from_utf8_lossy(REDACTED).into_owned();
                reasons.push(r);
            }
        }
        (!reasons.is_empty()).then_some((out, reasons))
    }
}

/// Replaces each value quoted after a known prefix with `****`.
fn withhold_echoed_values(message: &str) -> Option<String> {
    let mut out = message.to_string();
    let mut changed = false;
    for (before, afters) in ECHOES {
        let Some(at) = out.find(before) else { continue };
        let start = at + before.len();
        let end = afters
            .iter()
            .filter_map(|a| out[start..].rfind(a).map(|p| start + p))
            .min()
            .or_else(|| out[start..].rfind('\'').map(|p| start + p));
        let Some(end) = end else { continue };
        out.replace_range(start..end, std::str::from_utf8(REDACTED).unwrap_or("****"));
        changed = true;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_mask::MaskSpec;

    fn masker(specs: &[MaskSpec]) -> ErrorMasker {
        let p = Policy::from_specs(specs, None).unwrap();
        ErrorMasker::new(&p, &["ci".to_string()]).expect("active")
    }

    #[test]
    fn echoed_values_are_withheld_under_column_rules() {
        let m = masker(&[MaskSpec {
            columns: vec!["ssn".into()],
            strategy: "redact".into(),
            ..Default::default()
        }]);
        let (text, _) = m
            .mask("Duplicate entry '123-45-6789' for key 'ssn'")
            .unwrap();
        assert_eq!(text, "Duplicate entry '****' for key 'ssn'");
        let (text, _) = m
            .mask("Incorrect integer value: 'it's 123-45-6789' for column `crm`.`t`.`n` at row 1")
            .unwrap();
        assert_eq!(
            text,
            "Incorrect integer value: '****' for column `crm`.`t`.`n` at row 1"
        );
        let (text, _) = m
            .mask("Truncated incorrect DOUBLE value: '123-45-6789'")
            .unwrap();
        assert_eq!(text, "Truncated incorrect DOUBLE value: '****'");
        assert!(m.mask("Table 'crm.nope' doesn't exist").is_none());
    }

    #[test]
    fn detectors_mask_the_whole_message() {
        let m = masker(&[MaskSpec {
            detectors: vec!["email".into()],
            strategy: "redact".into(),
            ..Default::default()
        }]);
        let (text, _) = m
            .mask("Duplicate entry 'alice@example.com' for key 'email'")
            .unwrap();
        assert!(!text.contains("alice@example.com"), "{text}");
        assert!(text.starts_with("Duplicate entry '"), "{text}");
        assert!(m.mask("Unknown column 'x' in 'field list'").is_none());
    }
}
