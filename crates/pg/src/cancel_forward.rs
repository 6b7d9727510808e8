//! CancelRequests between replicas. A request whose key another replica issued (its tag) is
//! passed on to that replica over TLS: the owner's server certificate is verified against the
//! cluster's CA and host name, and the forwarder presents a short-lived certificate the
//! cluster's issuing CA made for it, naming it as a replica. The owner accepts a forwarded
//! request ([`FORWARDED_CANCEL`]) only from such a certificate; the key's secret still decides.

use crate::cancel::CancelTarget;
use crate::proto::startup::{self, FORWARDED_CANCEL};
use crate::PgGateway;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_metrics::registry;
use tollgate_store::{ReplicaRecord, Store};
use tollgate_tls::pki::IssuingCa;

/// What a replica needs to pass CancelRequests on to the others and to accept theirs.
pub struct CancelPeers {
    /// The shared store's replica registry, where a key's tag finds its replica.
    pub store: Arc<dyn Store>,
    /// This replica's id, named in the certificate it presents to the others.
    pub replica_id: String,
    /// Makes this replica's certificate and recognises the others' (`None`: cancel requests
    /// are neither forwarded nor accepted from other replicas; `tollgate check` says so).
    pub issuing: Option<Arc<IssuingCa>>,
    /// The CA the replicas' server certificates chain to (`server.replica_ca`, else `client_ca`).
    pub server_ca: Option<PathBuf>,
}

/// A replica counts as alive for forwarding if heard of within this long.
const CANCEL_PEER_ALIVE_MS: i64 = 15_000;
/// How long a forward may take, connection, TLS and the owner's own cancel included.
const FORWARD_LIMIT: Duration = Duration::from_secs(2);
/// Validity of the certificate made for one forward.
const FORWARD_CERT_TTL: Duration = Duration::from_secs(300);

pub(crate) fn count_cancel(matched: &'static str) {
    registry()
        .counter(
            "tollgate_cancel_requests_total",
            "CancelRequests by outcome: matched a session here (yes), passed on to the replica that issued the key (forwarded), matched nothing (no), a forward not from an authenticated replica (refused).",
            &[("matched", matched)],
        )
        .inc();
}

impl CancelPeers {
    /// The live replica whose cancel-key tag is `tag`.
    async fn owner(&self, tag: i32) -> Option<ReplicaRecord> {
        let store = self.store.clone();
        let now = tollgate_store::unix_ms(SystemTime::now());
        match tokio::task::spawn_blocking(move || store.replicas()).await {
            Ok(Ok(list)) => list
                .into_iter()
                .find(|r| r.cancel_tag == Some(tag) && r.alive(now, CANCEL_PEER_ALIVE_MS / 3)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the replica registry to forward a cancel request");
                None
            }
            Err(_) => None,
        }
    }

    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let (Some(ca), Some(issuing)) = (&self.server_ca, &self.issuing) else {
            return Err("this replica has no certificate for its peers: set server.issuing_ca_cert/key (and server.client_ca)".into());
        };
        let (cert, key) = issuing
            .issue_replica(&self.replica_id, FORWARD_CERT_TTL)
            .map_err(|e| format!("cannot make this replica's certificate: {e}"))?;
        tollgate_tls::replica_client_config(ca, &cert, &key).map_err(|e| e.to_string())
    }

    /// SSLRequest, TLS (both sides authenticated), the forwarded request; then waits for the
    /// owner to hang up, which it does once it has acted on the request.
    async fn send(&self, address: &str, pid: i32, secret: &[u8]) -> Result<(), String> {
        let config = self.client_config()?;
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|e| format!("replica address {address}: {e}"))?;
        let io = |e: std::io::Error| e.to_string();
        let mut tcp = tokio::net::TcpStream::connect(address).await.map_err(io)?;
        tcp.write_all(&startup::encode_ssl_request())
            .await
            .map_err(io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io)?;
        if answer[0] != b'S' {
            return Err("the replica declined TLS".into());
        }
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with the replica: {e}"))?;
        tls.write_all(&startup::encode_forwarded_cancel(pid, secret))
            .await
            .map_err(io)?;
        tls.flush().await.map_err(io)?;
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
        Ok(())
    }
}

impl PgGateway {
    /// Passes a CancelRequest on to the live replica whose tag its key carries; true if it was
    /// delivered. The owner never forwards a key of its own tag, nor a forwarded request, so a
    /// request travels at most once.
    pub(crate) async fn forward_cancel(&self, tag: i32, pid: i32, secret: &[u8]) -> bool {
        let Some(peers) = &self.cancel_peers else {
            return false;
        };
        let Some(owner) = peers.owner(tag).await else {
            return false;
        };
        match tokio::time::timeout(FORWARD_LIMIT, peers.send(&owner.address, pid, secret)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(replica = %owner.id, error = %e, "forwarding a cancel request to its replica failed");
                false
            }
            Err(_) => {
                tracing::warn!(replica = %owner.id, "forwarding a cancel request to its replica timed out");
                false
            }
        }
    }

    /// A [`FORWARDED_CANCEL`] from another replica: acted on only if `peer_cert` (the TLS
    /// client certificate, already verified against `client_ca`) is a replica certificate of
    /// this cluster's issuing CA; never forwarded again.
    pub(crate) async fn serve_forwarded_cancel(
        &self,
        pid: i32,
        secret: &[u8],
        peer_cert: Option<&[u8]>,
    ) {
        let issuing = self.cancel_peers.as_ref().and_then(|p| p.issuing.as_ref());
        let Some(from) = issuing.zip(peer_cert).and_then(|(ca, c)| ca.replica_of(c)) else {
            count_cancel("refused");
            tracing::warn!(
                code = FORWARDED_CANCEL,
                "refused a forwarded cancel request: the sender did not authenticate as a replica of this cluster"
            );
            return;
        };
        let matched = self.cancels.lookup(pid, secret);
        count_cancel(if matched.is_some() { "yes" } else { "no" });
        tracing::debug!(replica = %from, matched = matched.is_some(), "cancel request forwarded by a replica");
        if let Some(c) = matched {
            self.cancel_matched(c).await;
        }
    }

    /// Withdraw the matched session's held command and cancel what runs upstream.
    pub(crate) async fn cancel_matched(&self, c: CancelTarget) {
        c.held.notify_waiters();
        let Some((pid, secret)) = c.backend else {
            // Pooled, between transactions: nothing of this session runs upstream.
            return;
        };
        if let Err(e) = c.target.cancel(pid, &secret).await {
            tracing::warn!(resource = %c.target.resource.name, error = %e, "forwarding a cancel request failed");
        }
    }
}
