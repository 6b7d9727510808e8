//! Cancel keys: each client gets tollgate's own BackendKeyData; a CancelRequest (which arrives
//! on a new connection, with no identity) is matched by key and forwarded to the right upstream backend.
//! With several replicas the key's process id carries the issuing replica's tag in its top bits
//! ([`replica_tag_of`]), so that another replica can pass the request on to it.

use crate::upstream::UpstreamTarget;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

struct Entry {
    secret: Vec<u8>,
    /// Wakes the session when it holds a command for review, so that a cancel withdraws it.
    held: Arc<tokio::sync::Notify>,
    target: Arc<UpstreamTarget>,
    backend: Arc<BackendKey>,
}

/// The key of the upstream backend a session runs on now: fixed for a connection of its own,
/// changing with every lease under transaction pooling (`None` between transactions).
#[derive(Default)]
pub struct BackendKey(Mutex<Option<(i32, Vec<u8>)>>);

impl BackendKey {
    pub fn new(pid: i32, secret: Vec<u8>) -> Self {
        BackendKey(Mutex::new(Some((pid, secret))))
    }

    pub fn set(&self, key: Option<(i32, Vec<u8>)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = key;
    }

    pub fn get(&self) -> Option<(i32, Vec<u8>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<i32, Entry>>,
    /// This replica's tag (1..=[`MAX_REPLICA_TAG`]) in every key it issues; 0 when alone.
    tag: std::sync::atomic::AtomicI32,
}

/// Bits of a key's process id below the replica tag.
const TAG_SHIFT: u32 = 21;
/// The largest replica tag: tags fill the 10 bits above [`TAG_SHIFT`] of a positive i32.
pub const MAX_REPLICA_TAG: i32 = (1 << (31 - TAG_SHIFT)) - 1;

/// The replica tag a key's process id carries (0: issued by a gateway without one).
pub fn replica_tag_of(pid: i32) -> i32 {
    pid >> TAG_SHIFT
}

/// What a matched CancelRequest resolves to.
pub struct CancelTarget {
    pub target: Arc<UpstreamTarget>,
    pub held: Arc<tokio::sync::Notify>,
    /// The backend running the session's command now (`None`: nothing runs upstream).
    pub backend: Option<(i32, Vec<u8>)>,
}

impl CancelRegistry {
    /// Put `tag` (1..=[`MAX_REPLICA_TAG`]) in the keys issued from now on.
    pub fn set_replica_tag(&self, tag: i32) {
        debug_assert!((1..=MAX_REPLICA_TAG).contains(&tag));
        self.tag.store(tag, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn replica_tag(&self) -> i32 {
        self.tag.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Allocate a fresh client-facing key (`secret_len` 4 for protocol 3.0, 32 for 3.2) for an upstream backend.
    pub fn register(
        &self,
        secret_len: usize,
        target: Arc<UpstreamTarget>,
        backend: Arc<BackendKey>,
        held: Arc<tokio::sync::Notify>,
    ) -> (i32, Vec<u8>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut raw = vec![0u8; 4 + secret_len];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                .expect("system RNG");
            let mut pid = i32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]);
            let tag = self.replica_tag();
            if tag != 0 {
                pid = (tag << TAG_SHIFT) | (pid & ((1 << TAG_SHIFT) - 1));
            }
            if pid == 0 || entries.contains_key(&pid) {
                continue;
            }
            let secret = raw[4..].to_vec();
            entries.insert(
                pid,
                Entry {
                    secret: secret.clone(),
                    held,
                    target,
                    backend,
                },
            );
            return (pid, secret);
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// The upstream backend for a client key, if the secret matches (compared in constant time).
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.get(&pid)?;
        let equal = e.secret.len() == secret.len()
            && e.secret
                .iter()
                .zip(secret)
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        equal.then(|| CancelTarget {
            target: e.target.clone(),
            held: e.held.clone(),
            backend: e.backend.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_replica_tag_and_stay_positive() {
        for tag in [1, 2, 517, MAX_REPLICA_TAG] {
            let pid = (tag << TAG_SHIFT) | ((1 << TAG_SHIFT) - 1);
            assert!(pid > 0);
            assert_eq!(replica_tag_of(pid), tag);
            assert_eq!(replica_tag_of(tag << TAG_SHIFT), tag);
        }
        assert_eq!(replica_tag_of(0x001f_ffff), 0);
    }
}
