//! The host names this gateway serves: the DNS and IP subject alternative names of its own
//! certificate (`server.tls_cert`). A request naming another host is misdirected (421): on
//! `http_listen` the host picks the resource, and an upstream that builds links from
//! `X-Forwarded-Host` must only ever see a name the gateway really answers to.

use std::net::IpAddr;
use std::path::Path;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

#[derive(Debug, Default, Clone)]
pub struct ServedNames {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl ServedNames {
    /// The names in the first certificate of a PEM file.
    pub fn load(cert: &Path) -> anyhow::Result<ServedNames> {
        let pem = std::fs::read(cert)
            .map_err(|e| anyhow::anyhow!("server.tls_cert {}: {e}", cert.display()))?;
        let (_, pem) = parse_x509_pem(&pem)
            .map_err(|e| anyhow::anyhow!("server.tls_cert {}: {e}", cert.display()))?;
        let (_, x509) = X509Certificate::from_der(&pem.contents)
            .map_err(|e| anyhow::anyhow!("server.tls_cert {}: {e}", cert.display()))?;
        let mut names = ServedNames::default();
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => names.dns.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => names
                            .ips
                            .push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())),
                        16 => names
                            .ips
                            .push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap())),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    /// Whether `host` (no port; IPv6 without brackets) is a name of this gateway. A wildcard
    /// name covers exactly one label.
    pub fn covers(&self, host: &str) -> bool {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.ips.contains(&ip);
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.dns.iter().any(|d| match d.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *d == host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wildcards() {
        let n = ServedNames {
            dns: vec!["gw.example".into(), "*.apps.example".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
        };
        assert!(n.covers("gw.example"));
        assert!(n.covers("GW.Example."));
        assert!(n.covers("billing.apps.example"));
        assert!(!n.covers("apps.example"));
        assert!(!n.covers("a.b.apps.example"));
        assert!(!n.covers("billing.evil.example"));
        assert!(n.covers("127.0.0.1"));
        assert!(!n.covers("10.0.0.1"));
    }
}
