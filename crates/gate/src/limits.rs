//! Connection caps: open connections in total and per source address (counted from TCP accept),
//! and open sessions per identity (counted from authentication). A slot is a guard: dropping it
//! gives the capacity back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Which cap refused a connection; its label is the metric's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    Total,
    Source,
    Identity,
}

impl Cap {
    pub fn as_label(self) -> &'static str {
        match self {
            Cap::Total => "max_connections",
            Cap::Source => "max_connections_per_source",
            Cap::Identity => "max_connections_per_identity",
        }
    }
}

/// The three caps (0 means unlimited) and what is open now.
pub struct ConnectionLimits {
    max_total: usize,
    max_per_source: usize,
    max_per_identity: usize,
    open: Mutex<Open>,
    /// Over-cap connections being answered with an error right now (bounded, so that a flood
    /// past the caps costs a few handshakes, not one per connect).
    refusing: AtomicUsize,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    per_identity: HashMap<String, usize>,
}

/// Most over-cap connections answered with a 53300 error at once; past it they are closed.
pub const MAX_REFUSING: usize = 64;

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_source: usize, max_per_identity: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_source,
            max_per_identity,
            open: Mutex::new(Open::default()),
            refusing: AtomicUsize::new(0),
        })
    }

    /// No caps at all (tests and embedders that count elsewhere).
    pub fn unlimited() -> Arc<Self> {
        Self::new(0, 0, 0)
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a connection slot for an accepted TCP connection from `ip`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourceSlot, Cap> {
        let key = source_key(ip);
        let mut open = self.open();
        if self.max_total != 0 && open.total >= self.max_total {
            return Err(Cap::Total);
        }
        let n = open.per_source.get(&key).copied().unwrap_or(0);
        if self.max_per_source != 0 && n >= self.max_per_source {
            return Err(Cap::Source);
        }
        open.total += 1;
        open.per_source.insert(key, n + 1);
        Ok(SourceSlot {
            limits: self.clone(),
            key,
        })
    }

    /// Take a session slot for an authenticated identity.
    pub fn admit_identity(self: &Arc<Self>, subject: &str) -> Result<IdentitySlot, Cap> {
        let mut open = self.open();
        let n = open.per_identity.get(subject).copied().unwrap_or(0);
        if self.max_per_identity != 0 && n >= self.max_per_identity {
            return Err(Cap::Identity);
        }
        open.per_identity.insert(subject.to_string(), n + 1);
        Ok(IdentitySlot {
            limits: self.clone(),
            subject: subject.to_string(),
        })
    }

    /// A permit to answer one over-cap connection with an error, if fewer than
    /// [`MAX_REFUSING`] are being answered now.
    pub fn refusing(self: &Arc<Self>) -> Option<RefusingPermit> {
        let prev = self.refusing.fetch_add(1, Ordering::AcqRel);
        if prev >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RefusingPermit(self.clone()))
    }

    /// Connections open now (for tests and gauges).
    pub fn open_total(&self) -> usize {
        self.open().total
    }
}

/// IPv6 sources are counted per /64 (what one host is usually given); IPv4-mapped addresses as IPv4.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// An open connection's share of the total and per-source caps.
pub struct SourceSlot {
    limits: Arc<ConnectionLimits>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.per_source.remove(&self.key);
            }
        }
    }
}

/// An open session's share of its identity's cap.
pub struct IdentitySlot {
    limits: Arc<ConnectionLimits>,
    subject: String,
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        if let Some(n) = open.per_identity.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                open.per_identity.remove(&self.subject);
            }
        }
    }
}

pub struct RefusingPermit(Arc<ConnectionLimits>);

impl Drop for RefusingPermit {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_counts_open_connections_and_frees_on_drop() {
        let l = ConnectionLimits::new(0, 2, 0);
        let a = l.admit(ip("10.0.0.1")).unwrap();
        let _b = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1")).err(), Some(Cap::Source));
        // Another source is not affected.
        let _c = l.admit(ip("10.0.0.2")).unwrap();
        drop(a);
        let _d = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(l.open_total(), 3);
    }

    #[test]
    fn total_cap_applies_across_sources() {
        let l = ConnectionLimits::new(2, 0, 0);
        let _a = l.admit(ip("10.0.0.1")).unwrap();
        let _b = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.3")).err(), Some(Cap::Total));
    }

    #[test]
    fn zero_means_unlimited() {
        let l = ConnectionLimits::unlimited();
        let slots: Vec<_> = (0..5000)
            .map(|_| l.admit(ip("10.0.0.1")).unwrap())
            .collect();
        let ids: Vec<_> = (0..5000)
            .map(|_| l.admit_identity("agent").unwrap())
            .collect();
        assert_eq!(slots.len() + ids.len(), 10_000);
    }

    #[test]
    fn identity_cap_is_per_subject() {
        let l = ConnectionLimits::new(0, 0, 1);
        let a = l.admit_identity("alice").unwrap();
        assert_eq!(l.admit_identity("alice").err(), Some(Cap::Identity));
        let _b = l.admit_identity("bob").unwrap();
        drop(a);
        let _c = l.admit_identity("alice").unwrap();
    }

    #[test]
    fn ipv6_sources_share_their_64_and_mapped_v4_is_v4() {
        let l = ConnectionLimits::new(0, 1, 0);
        let _a = l.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(l.admit(ip("2001:db8:1:2::ffff")).err(), Some(Cap::Source));
        let _b = l.admit(ip("2001:db8:1:3::1")).unwrap();
        let _c = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.admit(ip("::ffff:192.0.2.1")).err(), Some(Cap::Source));
    }

    #[test]
    fn refusing_permits_are_bounded() {
        let l = ConnectionLimits::unlimited();
        let permits: Vec<_> = (0..MAX_REFUSING).map(|_| l.refusing().unwrap()).collect();
        assert!(l.refusing().is_none());
        drop(permits);
        assert!(l.refusing().is_some());
    }
}
