//! A resource's masks, compiled for every adapter: the viewer's policy (group exceptions
//! apply) and the audit policy (the same rules for everyone, so that no original value reaches
//! the audit trail even when the viewer was exempt), and the key of the `hash` strategy.

use tollgate_config::{Resource, SecretSource};
use tollgate_mask::{MaskKey, MaskSpec, Policy, PolicyError};

/// The masking key for `hash` from `server.mask_key_env`/`mask_key_file`: 64+ hex digits, or
/// at least 32 raw bytes. `Ok(None)` when none is configured. The error never shows the key.
pub fn load_mask_key(source: &SecretSource) -> Result<Option<MaskKey>, String> {
    let Some(secret) = source.read()? else {
        return Ok(None);
    };
    let secret = secret.trim();
    let hex = secret.len() % 2 == 0 && secret.bytes().all(|b| b.is_ascii_hexdigit());
    let key = if hex {
        MaskKey::from_hex(secret)
    } else {
        MaskKey::new(secret.as_bytes())
    };
    key.map(Some).map_err(|e| format!("server.mask_key: {e}"))
}

/// A resource's `[[resources.masks]]`, compiled; `Ok(None)` when it has none.
pub fn masking_policy(
    resource: &Resource,
    key: Option<MaskKey>,
) -> Result<Option<Policy>, PolicyError> {
    compile(resource, key, false)
}

/// The same rules for everyone (no group exceptions, no group restrictions): what audit
/// captures are masked with.
pub fn audit_masking_policy(
    resource: &Resource,
    key: Option<MaskKey>,
) -> Result<Option<Policy>, PolicyError> {
    compile(resource, key, true)
}

fn compile(
    resource: &Resource,
    key: Option<MaskKey>,
    for_everyone: bool,
) -> Result<Option<Policy>, PolicyError> {
    if resource.masks.is_empty() {
        return Ok(None);
    }
    let groups = |g: &Vec<String>| if for_everyone { vec![] } else { g.clone() };
    let specs: Vec<MaskSpec> = resource
        .masks
        .iter()
        .map(|m| MaskSpec {
            columns: m.columns.clone(),
            types: m.types.clone(),
            detectors: m.detectors.clone(),
            json_paths: m.json_paths.clone(),
            strategy: m.strategy.clone(),
            keep_last: m.keep_last,
            except_groups: groups(&m.except_groups),
            only_groups: groups(&m.only_groups),
        })
        .collect();
    Policy::from_specs(&specs, key).map(Some)
}
