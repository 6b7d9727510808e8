//! `tollgate scan` and `tollgate check` on HTTP resources, as an operator runs them: a real
//! HTTPS upstream with its own certificate, one whose CA is not the configured one, a plain
//! `http://` upstream, and the periodic scan inside the gateway publishing its findings.

mod common;

use common::upstream::Upstream;
use common::{stderr, stdout, wait_for, Gateway, Pki, BIN};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tollgate_tls::pki::{self, IssuedFiles};

fn tollgate(args: &[&str], config: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("TOLLGATE_CONFIG")
        .env("RUST_LOG", "error")
        .output()
        .expect("run tollgate")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

fn kinds(doc: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

/// An upstream server certificate for localhost/127.0.0.1 valid for 30 days (past the default
/// 14-day expiry window).
fn upstream_cert(pki: &Pki) -> IssuedFiles {
    pki::issue_server(
        &pki.dir,
        &pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            ttl: Duration::from_secs(30 * 86_400),
            not_before: None,
        },
        &pki.dir.join("upstream"),
    )
    .unwrap()
}

/// The `[server]` of a config whose own files exist (the scan never uses them).
fn server(gw: &IssuedFiles, ca: &Path, extra: &str) -> String {
    format!(
        "[server]\npostgres_listen = \"127.0.0.1:{{pg_port}}\"\nadmin_listen = \"127.0.0.1:{{admin_port}}\"\nhttps_listen = \"127.0.0.1:{https}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\nstore = \"sqlite://audit.db\"\n{extra}\n",
        gw.cert.display(),
        gw.key.display(),
        ca.display(),
        https = tollgate_testsupport::free_port(),
    )
}

fn https_resource(port: u16, ca: &Path, server_name: &str) -> String {
    format!(
        "[[resources]]\nname = \"api\"\nkind = \"http\"\nupstream = \"https://localhost:{port}/v1\"\nallow_groups = [\"sre\"]\n[resources.tls]\nca = \"{}\"\nserver_name = \"{server_name}\"\n",
        ca.display()
    )
}

/// Write a config for the CLI (nothing listens: the placeholders get fixed ports).
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let text = text
        .replace("{pg_port}", "6432")
        .replace("{admin_port}", "6433");
    std::fs::write(&p, text).unwrap();
    p
}

/// A plain-TCP HTTP server answering every request with 200; returns its port.
fn plain_http_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

#[test]
fn scan_of_http_resources_checks_the_upstream_tls_and_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(&d.join("pki"));
    let gw = pki.server("gateway");
    let up_cert = upstream_cert(&pki);
    let up = Upstream::start(&up_cert.cert, &up_cert.key);
    let srv = server(&gw, &pki.ca, "");

    // Trusted, right name, TLS only: clean.
    let config = write(
        d,
        "clean.toml",
        &format!("{srv}{}", https_resource(up.port, &pki.ca, "localhost")),
    );
    let out = tollgate(&["scan", "--json"], &config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let doc = json(&out);
    assert_eq!(doc["ok"], true, "{doc:#}");
    let api = &doc["resources"][0];
    assert_eq!(api["resource"], "api");
    assert_eq!(api["tls"]["chain_trusted"], true, "{api:#}");
    assert_eq!(api["tls"]["hostname_matches"], true, "{api:#}");
    assert_eq!(api["tls"]["alpn"], "http/1.1", "{api:#}");
    assert!(api["tls"]["leaf_days_left"].as_i64().unwrap() >= 29);
    assert_eq!(api["plaintext_accepted"], false, "{api:#}");
    assert!(api["sessions"].is_null(), "no session listing for http");
    let versions = api["versions"].as_array().unwrap();
    let accepted =
        |v: &str| versions.iter().find(|x| x["version"] == v).unwrap()["accepted"].clone();
    assert_eq!(accepted("TLSv1.3"), true, "{versions:?}");
    assert_eq!(accepted("TLSv1.2"), true, "{versions:?}");
    assert_eq!(accepted("TLSv1.1"), false, "{versions:?}");
    assert_eq!(accepted("TLSv1.0"), false, "{versions:?}");
    // The scan only handshakes and sends a plaintext HEAD: no request reached the API.
    assert_eq!(up.seen.count(), 0, "{:?}", up.seen.all());

    let out = tollgate(&["scan"], &config);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("plaintext: refused"), "{text}");
    assert!(text.contains("chain trusted, hostname matches"), "{text}");
    assert!(
        text.trim_end()
            .ends_with("ok: 1 resource(s) scanned, no findings"),
        "{text}"
    );
    // A wider expiry window than the certificate's 30 days.
    let out = tollgate(&["scan", "--json", "--min-days", "60"], &config);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(kinds(&json(&out)), ["cert_expiring"]);

    // A CA that did not issue the upstream's certificate: untrusted chain.
    let other = Pki::new(&d.join("other"));
    let config = write(
        d,
        "other-ca.toml",
        &format!("{srv}{}", https_resource(up.port, &other.ca, "localhost")),
    );
    let out = tollgate(&["scan", "--json"], &config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let doc = json(&out);
    assert_eq!(kinds(&doc), ["untrusted_chain"], "{doc:#}");
    let f = &doc["findings"][0];
    assert_eq!(f["severity"], "critical");
    assert_eq!(f["resource"], "api");
    assert_eq!(f["key"], "resources.tls.ca");
    assert_eq!(doc["resources"][0]["tls"]["chain_trusted"], false);

    // A plain http:// upstream: critical, and not TLS-probed.
    let plain_port = plain_http_server();
    let plain = format!(
        "{srv}[[resources]]\nname = \"legacy\"\nkind = \"http\"\nupstream = \"http://127.0.0.1:{plain_port}\"\nallow_groups = [\"sre\"]\n[resources.tls]\nmode = \"disable\"\n"
    );
    let config = write(d, "plain.toml", &plain);
    let out = tollgate(&["scan", "--json"], &config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let doc = json(&out);
    assert_eq!(kinds(&doc), ["plaintext_upstream"], "{doc:#}");
    let f = &doc["findings"][0];
    assert_eq!(f["severity"], "critical");
    assert_eq!(f["resource"], "legacy");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains(&format!("http://127.0.0.1:{plain_port}")),
        "{f}"
    );
    let legacy = &doc["resources"][0];
    assert!(legacy["tls"].is_null(), "{legacy:#}");
    assert_eq!(legacy["versions"].as_array().unwrap().len(), 0);
    assert_eq!(legacy["plaintext_accepted"], true);
    assert_eq!(legacy["tls_mode"], "disable");

    // check fails the same config offline (besides its short-lived gateway certificate).
    let out = tollgate(&["check", "--json"], &config);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let doc = json(&out);
    let legacy: Vec<&serde_json::Value> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["resource"] == "legacy")
        .collect();
    assert_eq!(legacy.len(), 1, "{doc:#}");
    assert_eq!(legacy[0]["kind"], "upstream_tls_not_verify_full");
    assert_eq!(legacy[0]["severity"], "critical");
    assert_eq!(legacy[0]["key"], "resources.tls.mode");
}

#[test]
fn periodic_scan_publishes_http_upstream_findings_and_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(&d.join("pki"));
    let gw_cert = pki.server("gateway");
    let up_cert = upstream_cert(&pki);
    let up = Upstream::start(&up_cert.cert, &up_cert.key);
    // The upstream's certificate does not name api.internal.
    let text = format!(
        "{}{}",
        server(&gw_cert, &pki.ca, "scan_interval = \"300ms\""),
        https_resource(up.port, &pki.ca, "api.internal")
    );
    let gw = Gateway::start(d, &text, &[]);
    let mismatch = "tollgate_scan_findings{resource=\"api\",kind=\"hostname_mismatch\"}";
    wait_for(
        Duration::from_secs(15),
        "the hostname_mismatch finding metric",
        || gw.metric(mismatch) == Some(1),
    );
    let expiry = gw
        .metric("tollgate_upstream_cert_expiry_timestamp_seconds{resource=\"api\"}")
        .expect("upstream certificate expiry gauge for the http resource");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(expiry > now + 29 * 86_400, "{expiry}");
    assert!(expiry < now + 31 * 86_400, "{expiry}");
    assert_eq!(
        gw.metric("tollgate_scan_findings{resource=\"api\",kind=\"plaintext_accepted\"}"),
        None,
        "{}",
        gw.metrics()
    );
    assert_eq!(up.seen.count(), 0, "{:?}", up.seen.all());
}
