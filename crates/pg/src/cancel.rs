//! Cancel keys: each client gets tollgate's own BackendKeyData; a CancelRequest (which arrives
//! on a new connection, with no identity) is matched by key and forwarded to the right upstream backend.

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
}

/// What a matched CancelRequest resolves to.
pub struct CancelTarget {
    pub target: Arc<UpstreamTarget>,
    pub held: Arc<tokio::sync::Notify>,
    /// The backend running the session's command now (`None`: nothing runs upstream).
    pub backend: Option<(i32, Vec<u8>)>,
}

impl CancelRegistry {
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
            let pid = i32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]);
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
