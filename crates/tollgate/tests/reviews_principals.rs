//! One principal per person, through the real gateway's HTTPS API: reviews compare canonical
//! principals (`cert:cn:alice`, `token:alice`, or a name from `[[identity.principals]]`), never
//! subject strings. A token mapped to the requester's principal cannot approve the request; an
//! unmapped token that merely shares the requester's CN is a different principal, recorded as
//! such, whose vote never passes for the certificate user's. No PostgreSQL is needed (reviews
//! are access requests; the resource's upstream is never dialled).

mod common;

use common::*;
use serde_json::{json, Value};
use tollgate_api::client::{ApiClient, ClientError, ClientOptions};
use tollgate_tls::pki::IssuedFiles;

struct Setup {
    _gw: Gateway,
    https: u16,
    ca: std::path::PathBuf,
    /// Certificate CN "alice" (agents): asks for access.
    alice: IssuedFiles,
    _dir: tempfile::TempDir,
}

/// Tokens "alice" and "bob" (both in `dba`, the access approvers); `principals` is the
/// `[[identity.principals]]` section.
fn start(principals: &str) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("tollgate-pr-")
        .tempdir()
        .unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let gw_cert = pki.server("gateway");
    let https = tollgate_testsupport::free_port();
    std::fs::write(dir.path().join("app.password"), "unused").unwrap();
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
admin_listen = "127.0.0.1:{{admin_port}}"
https_listen = "127.0.0.1:{https}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
store = "sqlite://audit.db"

[[identity.tokens]]
subject = "alice"
sha256 = "{alice_token}"
groups = ["dba"]

[[identity.tokens]]
subject = "bob"
sha256 = "{bob_token}"
groups = ["dba"]

{principals}

[[resources]]
name = "app"
kind = "postgres"
upstream = "127.0.0.1:1"
database = "app"
allow_groups = ["agents"]
access_approvers = ["dba"]
max_access = "2h"
[resources.tls]
ca = "{ca}"
server_name = "localhost"
[resources.credentials]
user = "app"
password_file = "app.password"
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
        alice_token = sha256_hex("alice-token"),
        bob_token = sha256_hex("bob-token"),
    );
    let gw = Gateway::start(dir.path(), &config, &[]);
    Setup {
        _gw: gw,
        https,
        ca: pki.ca.clone(),
        alice: pki.client("alice", &["agents"]),
        _dir: dir,
    }
}

impl Setup {
    fn api(&self, cert: Option<&IssuedFiles>, token: Option<&str>) -> ApiClient {
        ApiClient::new(&ClientOptions {
            gateway: format!("https://localhost:{}", self.https),
            ca: Some(self.ca.clone()),
            cert: cert.map(|c| c.cert.clone()),
            key: cert.map(|c| c.key.clone()),
            token: token.map(str::to_string),
        })
        .unwrap()
    }

    /// alice, by certificate, asks for access to "app".
    fn request_access(&self) -> Value {
        self.api(Some(&self.alice), None)
            .post_json::<Value>(
                "/api/v1/access",
                &json!({"resource": "app", "for": "1h", "reason": "INC-7"}),
            )
            .unwrap()
    }

    fn approve(&self, token: &str, id: &str) -> Result<Value, (u16, String)> {
        self.api(None, Some(token))
            .post_json::<Value>(&format!("/api/v1/reviews/{id}/approve"), &json!({}))
            .map_err(|e| match e {
                ClientError::Status { status, body } => (status, body.error),
                other => panic!("expected an HTTP status, got {other}"),
            })
    }
}

#[test]
fn a_token_mapped_to_the_requester_cannot_approve() {
    let s = start(
        "[[identity.principals]]\nname = \"alice\"\ncertificates = [\"cn:alice\"]\ntokens = [\"alice\"]\n",
    );
    let review = s.request_access();
    let id = review["id"].as_str().unwrap();
    // Readable subject, canonical principal.
    assert_eq!(review["requester"], "alice");
    assert_eq!(review["requester_principal"], "alice");
    let (status, error) = s.approve("alice-token", id).unwrap_err();
    assert_eq!(status, 403, "{error}");
    assert!(error.contains("you requested this review"), "{error}");
    let approved = s.approve("bob-token", id).unwrap();
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["votes"][0]["reviewer"], "bob");
    assert_eq!(approved["votes"][0]["principal"], "token:bob");
}

#[test]
fn an_unmapped_token_sharing_a_certificate_name_is_another_principal() {
    let s = start("");
    let review = s.request_access();
    let id = review["id"].as_str().unwrap();
    assert_eq!(review["requester"], "alice");
    assert_eq!(review["requester_principal"], "cert:cn:alice");
    // The token "alice" is not the certificate user alice: its vote is its own, recorded as such.
    let approved = s.approve("alice-token", id).unwrap();
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["votes"][0]["reviewer"], "alice");
    assert_eq!(approved["votes"][0]["principal"], "token:alice");
}
