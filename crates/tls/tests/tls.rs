//! Listener reload, real loopback handshakes and upstream verification modes,
//! all with certificates from the built-in CA.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tollgate_tls::pki::{self, ClientCertSpec, IssuedFiles, ServerCertSpec};
use tollgate_tls::*;

struct Pki {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ca: IssuedFiles,
}

impl Pki {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let ca = pki::init_ca(&root.join("ca"), "test CA").unwrap();
        pki::init_ca(&root.join("other"), "other CA").unwrap();
        Pki {
            _tmp: tmp,
            root,
            ca,
        }
    }

    fn server(
        &self,
        ca: &str,
        name: &str,
        dns: &[&str],
        not_before: Option<SystemTime>,
        ttl: Duration,
    ) -> IssuedFiles {
        let spec = ServerCertSpec {
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            ttl,
            not_before,
        };
        pki::issue_server(&self.root.join(ca), &spec, &self.root.join(name)).unwrap()
    }

    fn client(
        &self,
        ca: &str,
        name: &str,
        not_before: Option<SystemTime>,
        ttl: Duration,
    ) -> IssuedFiles {
        let spec = ClientCertSpec {
            name: name.into(),
            spiffe: None,
            groups: vec!["sre".into()],
            ttl,
            not_before,
        };
        pki::issue_client(&self.root.join(ca), &spec, &self.root.join(name)).unwrap()
    }

    fn listener(&self, files: &IssuedFiles, auth: ClientAuth) -> ReloadableServerTls {
        ReloadableServerTls::load(ListenerTlsSpec {
            cert: files.cert.clone(),
            key: files.key.clone(),
            client_ca: Some(self.ca.cert.clone()),
            client_auth: auth,
            alpn: vec![b"postgresql".to_vec()],
            client_crls: vec![],
        })
        .unwrap()
    }
}

fn an_hour_ago_for(secs: u64) -> (Option<SystemTime>, Duration) {
    (
        Some(SystemTime::now() - Duration::from_secs(3600)),
        Duration::from_secs(secs),
    )
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[test]
fn reload_keeps_old_material_until_new_material_is_valid() {
    let pki = Pki::new();
    let gw = pki.server("ca", "gw", &["localhost"], None, pki::DEFAULT_SERVER_TTL);
    let other = pki.server(
        "ca",
        "other-server",
        &["localhost"],
        None,
        pki::DEFAULT_SERVER_TTL,
    );
    let (nb, ttl) = an_hour_ago_for(60);
    let expired = pki.server("ca", "expired", &["localhost"], nb, ttl);
    let tls = pki.listener(&gw, ClientAuth::Required);
    let good_cert = std::fs::read(&gw.cert).unwrap();
    let good_key = std::fs::read(&gw.key).unwrap();

    let c0 = tls.config();
    assert_eq!(c0.alpn_protocols, vec![b"postgresql".to_vec()]);
    assert!(tls.client_ca_not_after().is_some());
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadStatus::Unchanged);
    assert!(Arc::ptr_eq(&tls.config(), &c0));

    // Garbage, then a half-written file.
    std::fs::write(&gw.cert, b"not a certificate").unwrap();
    let err = tls.reload_if_changed().unwrap_err();
    assert!(err.to_string().contains("gw.crt"), "{err}");
    assert!(Arc::ptr_eq(&tls.config(), &c0));
    std::fs::write(&gw.cert, &good_cert[..good_cert.len() / 2]).unwrap();
    assert!(tls.reload_if_changed().is_err());
    assert!(Arc::ptr_eq(&tls.config(), &c0));

    // The key of another certificate.
    std::fs::write(&gw.cert, &good_cert).unwrap();
    copy(&other.key, &gw.key);
    let err = tls.reload_if_changed().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("does not match certificate"),
        "{err}"
    );
    assert!(Arc::ptr_eq(&tls.config(), &c0));
    assert!(tls.reload().is_err(), "forced reload must validate too");
    assert!(Arc::ptr_eq(&tls.config(), &c0));

    // An expired pair.
    copy(&expired.cert, &gw.cert);
    copy(&expired.key, &gw.key);
    let err = tls.reload_if_changed().unwrap_err();
    assert!(matches!(err, TlsError::Expired { .. }), "{err}");
    assert!(Arc::ptr_eq(&tls.config(), &c0));

    // Restoring the same bytes is not a change.
    std::fs::write(&gw.cert, &good_cert).unwrap();
    std::fs::write(&gw.key, &good_key).unwrap();
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadStatus::Unchanged);
    assert!(Arc::ptr_eq(&tls.config(), &c0));

    // A new valid pair is swapped in.
    let before = tls.cert_not_after();
    std::thread::sleep(Duration::from_millis(1100));
    pki.server("ca", "gw", &["localhost"], None, pki::DEFAULT_SERVER_TTL);
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadStatus::Reloaded);
    let c1 = tls.config();
    assert!(!Arc::ptr_eq(&c1, &c0));
    assert!(tls.cert_not_after() > before);
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadStatus::Unchanged);
    tls.reload().unwrap();
    assert!(!Arc::ptr_eq(&tls.config(), &c1));
}

#[test]
fn load_rejects_invalid_material_with_paths() {
    let pki = Pki::new();
    let gw = pki.server("ca", "gw", &["localhost"], None, pki::DEFAULT_SERVER_TTL);
    let other = pki.server("ca", "x", &["localhost"], None, pki::DEFAULT_SERVER_TTL);
    let spec = |key: &Path, ca: Option<PathBuf>, auth| ListenerTlsSpec {
        cert: gw.cert.clone(),
        key: key.to_path_buf(),
        client_ca: ca,
        client_auth: auth,
        alpn: vec![],
        client_crls: vec![],
    };
    let err = ReloadableServerTls::load(spec(&other.key, None, ClientAuth::None)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("x.key") && msg.contains("gw.crt"), "{msg}");

    let garbage = pki.root.join("garbage.pem");
    std::fs::write(&garbage, "nothing here").unwrap();
    let err =
        ReloadableServerTls::load(spec(&gw.key, Some(garbage), ClientAuth::Required)).unwrap_err();
    assert!(matches!(err, TlsError::ClientCa { .. }), "{err}");
    let err = ReloadableServerTls::load(spec(&gw.key, None, ClientAuth::Required)).unwrap_err();
    assert!(err.to_string().contains("client_ca"), "{err}");
    let ok = ReloadableServerTls::load(spec(&gw.key, None, ClientAuth::None)).unwrap();
    assert!(ok.client_ca_not_after().is_none());
}

fn client_config(ca: &Path, client: Option<&IssuedFiles>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        // Built by hand so that an expired certificate can still be presented.
        Some(f) => builder
            .with_client_auth_cert(
                load_certs(&f.cert).unwrap(),
                PrivateKeyDer::from_pem_file(&f.key).unwrap(),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    Arc::new(cfg)
}

type Accepted = io::Result<TlsSessionInfo>;

/// Accept one connection on loopback; returns the address and the server-side outcome.
async fn serve_once(config: Arc<ServerConfig>) -> (SocketAddr, tokio::task::JoinHandle<Accepted>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(config).accept(tcp).await?;
        let info = session_info(tls.get_ref().1);
        tls.write_all(b"ok").await?;
        tls.flush().await?;
        Ok(info)
    });
    (addr, task)
}

/// Full handshake; returns (server outcome, client outcome).
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (Accepted, io::Result<TlsSessionInfo>) {
    let (addr, task) = serve_once(server).await;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await?;
        Ok(session_info(tls.get_ref().1))
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .unwrap();
    let server_result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    (server_result, client_result)
}

/// Send raw bytes; returns the server-side outcome.
async fn send_raw(server: Arc<ServerConfig>, bytes: &[u8]) -> Accepted {
    let (addr, task) = serve_once(server).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    drop(tcp);
    result
}

fn failure(result: Accepted) -> HandshakeFailure {
    match result {
        Ok(_) => panic!("handshake unexpectedly succeeded"),
        Err(e) => classify_handshake_error(&e),
    }
}

/// A ClientHello whose highest version is TLS 1.1 (0x0302).
fn tls11_client_hello(with_sig_algs: bool) -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend([0x01, 0x00]); // null compression
    if with_sig_algs {
        // extensions: signature_algorithms = [ecdsa_secp256r1_sha256]
        body.extend([0x00, 0x08, 0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    }
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x02, (hs.len() >> 8) as u8, hs.len() as u8];
    record.extend(hs);
    record
}

#[tokio::test]
async fn handshakes_succeed_and_failures_are_classified() {
    let pki = Pki::new();
    let gw = pki.server("ca", "gw", &["localhost"], None, pki::DEFAULT_SERVER_TTL);
    let required = pki.listener(&gw, ClientAuth::Required).config();

    // A good client certificate.
    let alice = pki.client("ca", "alice", None, pki::DEFAULT_CLIENT_TTL);
    let (server, client) = handshake(
        required.clone(),
        client_config(&pki.ca.cert, Some(&alice)),
        "localhost",
    )
    .await;
    let server = server.unwrap();
    client.unwrap();
    assert_eq!(server.version, "TLSv1.3");
    assert!(server.cipher.starts_with("TLS13_"), "{}", server.cipher);
    assert_eq!(server.alpn.as_deref(), Some("postgresql"));
    let alice_der = &load_certs(&alice.cert).unwrap()[0];
    assert_eq!(
        server.peer_cert_fingerprint,
        Some(cert_fingerprint_sha256(alice_der))
    );
    assert_eq!(server.peer_cert_not_after, cert_not_after(alice_der));

    // A client certificate from another CA.
    let mallory = pki.client("other", "mallory", None, pki::DEFAULT_CLIENT_TTL);
    let (server, _) = handshake(
        required.clone(),
        client_config(&pki.ca.cert, Some(&mallory)),
        "localhost",
    )
    .await;
    assert_eq!(failure(server), HandshakeFailure::UnknownCa);

    // No client certificate at all.
    let (server, client) = handshake(
        required.clone(),
        client_config(&pki.ca.cert, None),
        "localhost",
    )
    .await;
    assert_eq!(failure(server), HandshakeFailure::NoClientCert);
    assert!(client.is_err());

    // An expired client certificate.
    let (nb, ttl) = an_hour_ago_for(60);
    let old = pki.client("ca", "old", nb, ttl);
    let (server, _) = handshake(
        required.clone(),
        client_config(&pki.ca.cert, Some(&old)),
        "localhost",
    )
    .await;
    assert_eq!(failure(server), HandshakeFailure::Expired);

    // Optional client auth lets a certificate-less client through.
    let optional = pki.listener(&gw, ClientAuth::Optional).config();
    let (server, _) = handshake(optional, client_config(&pki.ca.cert, None), "localhost").await;
    assert_eq!(server.unwrap().peer_cert_fingerprint, None);

    // Not TLS at all: a PostgreSQL SSLRequest-sized plaintext and an HTTP request.
    let pg_startup = b"\0\0\0\x08\x04\xd2\x16\x2f";
    assert_eq!(
        failure(send_raw(required.clone(), pg_startup).await),
        HandshakeFailure::NotTls
    );
    let http = b"GET / HTTP/1.1\r\n\r\n";
    assert_eq!(
        failure(send_raw(required.clone(), http).await),
        HandshakeFailure::NotTls
    );

    // TLS 1.1 clients, with and without the TLS 1.2 signature_algorithms extension.
    for sig_algs in [false, true] {
        let result = send_raw(required.clone(), &tls11_client_hello(sig_algs)).await;
        assert_eq!(
            failure(result),
            HandshakeFailure::ProtocolVersion,
            "sig_algs={sig_algs}"
        );
    }
}

#[tokio::test]
async fn upstream_modes_verify_what_they_promise() {
    let pki = Pki::new();
    let db = pki.server("ca", "db", &["db.internal"], None, pki::DEFAULT_SERVER_TTL);
    let rogue = pki.server(
        "other",
        "rogue",
        &["db.internal"],
        None,
        pki::DEFAULT_SERVER_TTL,
    );
    let listener = |f: &IssuedFiles| pki.listener(f, ClientAuth::None).config();
    let ca = Some(pki.ca.cert.as_path());
    let alpn = || vec![b"postgresql".to_vec()];

    let full = upstream_client_config(UpstreamVerify::Full, ca, None, alpn()).unwrap();
    let (_, client) = handshake(listener(&db), full.clone(), "db.internal").await;
    let info = client.unwrap();
    assert_eq!(info.alpn.as_deref(), Some("postgresql"));
    assert!(info.peer_cert_fingerprint.is_some());

    let (_, client) = handshake(listener(&db), full.clone(), "wrong.example").await;
    let err = client.unwrap_err();
    assert_eq!(
        classify_handshake_error(&err),
        HandshakeFailure::BadCertificate,
        "{err}"
    );

    let (_, client) = handshake(listener(&rogue), full, "db.internal").await;
    assert_eq!(
        classify_handshake_error(&client.unwrap_err()),
        HandshakeFailure::UnknownCa
    );

    let verify_ca = upstream_client_config(UpstreamVerify::Ca, ca, None, alpn()).unwrap();
    let (_, client) = handshake(listener(&db), verify_ca.clone(), "wrong.example").await;
    client.unwrap();
    let (_, client) = handshake(listener(&rogue), verify_ca, "db.internal").await;
    assert_eq!(
        classify_handshake_error(&client.unwrap_err()),
        HandshakeFailure::UnknownCa
    );

    let insecure =
        upstream_client_config(UpstreamVerify::InsecureSkipVerify, None, None, alpn()).unwrap();
    let (_, client) = handshake(listener(&rogue), insecure, "anything.example").await;
    client.unwrap();

    for mode in [UpstreamVerify::Full, UpstreamVerify::Ca] {
        let err = upstream_client_config(mode, None, None, vec![]).unwrap_err();
        assert!(err.to_string().contains("tls.ca"), "{err}");
    }

    // mTLS to an upstream that requires client certificates.
    let gw_client = pki.client("ca", "gateway", None, pki::DEFAULT_CLIENT_TTL);
    let mtls = upstream_client_config(
        UpstreamVerify::Full,
        ca,
        Some((&gw_client.cert, &gw_client.key)),
        alpn(),
    )
    .unwrap();
    let (server, client) = handshake(
        pki.listener(&db, ClientAuth::Required).config(),
        mtls,
        "db.internal",
    )
    .await;
    client.unwrap();
    assert!(server.unwrap().peer_cert_fingerprint.is_some());
    let mismatched = upstream_client_config(
        UpstreamVerify::Full,
        ca,
        Some((&gw_client.cert, &db.key)),
        alpn(),
    );
    assert!(matches!(mismatched, Err(TlsError::KeyMismatch { .. })));
}

#[test]
fn client_crls_are_validated_reloaded_and_answer_is_revoked() {
    let pki = Pki::new();
    let gw = pki.server("ca", "gw", &["localhost"], None, pki::DEFAULT_SERVER_TTL);
    let alice = pki.client("ca", "alice", None, pki::DEFAULT_CLIENT_TTL);
    let bob = pki.client("ca", "bob", None, pki::DEFAULT_CLIENT_TTL);
    let crl = pki.root.join("ca.crl");
    let day = Duration::from_secs(86_400);
    pki::issue_crl(&pki.root.join("ca"), &[], day, &crl).unwrap();
    let tls = ReloadableServerTls::load(ListenerTlsSpec {
        cert: gw.cert.clone(),
        key: gw.key.clone(),
        client_ca: Some(pki.ca.cert.clone()),
        client_auth: ClientAuth::Optional,
        alpn: vec![],
        client_crls: vec![crl.clone()],
    })
    .unwrap();
    let der = |f: &IssuedFiles| load_certs(&f.cert).unwrap().remove(0);
    assert!(!tls.is_revoked(&der(&alice)));
    assert_eq!(tls.revoked_count(), 0);

    // The CA revokes bob: picked up by the next reload, and only bob.
    pki::issue_crl(&pki.root.join("ca"), &[&bob.cert], day, &crl).unwrap();
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadStatus::Reloaded);
    assert!(tls.is_revoked(&der(&bob)));
    assert!(!tls.is_revoked(&der(&alice)));

    // A CRL that is not from the client CA, or not a CRL, is refused and the old one stays.
    let good = std::fs::read(&crl).unwrap();
    pki::issue_crl(&pki.root.join("other"), &[], day, &crl).unwrap();
    let err = tls.reload_if_changed().unwrap_err();
    assert!(
        err.to_string().contains("not a CA in server.client_ca"),
        "{err}"
    );
    std::fs::write(&crl, b"garbage").unwrap();
    assert!(tls.reload().is_err());
    assert!(tls.is_revoked(&der(&bob)));
    // DER works as well as PEM.
    let (_, pem) = x509_parser::pem::parse_x509_pem(&good).unwrap();
    std::fs::write(&crl, &pem.contents).unwrap();
    assert_eq!(tls.reload_if_changed().unwrap(), ReloadStatus::Reloaded);
    assert!(tls.is_revoked(&der(&bob)));
}
