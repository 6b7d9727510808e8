//! A gateway in front of a test MariaDB: one `mysql` resource "app" reached with the upstream's
//! native or ed25519 user, client certificates from `pki`, the token `TOKEN` as `ci-bot`.

use super::{sha256_hex, Gateway, Pki, TOKEN};
use std::path::Path;
use tollgate_testsupport::MariaDb;

/// Start the gateway in `dir`; `resource_extra` is TOML appended to the resource's table
/// (rules, masks). Returns the gateway and its `mysql_listen` port.
pub fn mysql_gateway(
    dir: &Path,
    pki: &Pki,
    db: &MariaDb,
    ed25519: bool,
    resource_extra: &str,
) -> (Gateway, u16) {
    let gw_cert = pki.server("gateway");
    let (user, password) = if ed25519 {
        (&db.ed25519_user, &db.ed25519_password)
    } else {
        (&db.user, &db.password)
    };
    std::fs::write(dir.join("app.password"), password).unwrap();
    let mysql_port = tollgate_testsupport::free_port();
    let config = format!(
        r#"[server]
postgres_listen = "127.0.0.1:{{pg_port}}"
mysql_listen = "127.0.0.1:{mysql_port}"
admin_listen = "127.0.0.1:{{admin_port}}"
tls_cert = "{cert}"
tls_key = "{key}"
client_ca = "{ca}"
client_cert = "optional"
store = "sqlite://audit.db"

[[identity.tokens]]
subject = "ci-bot"
sha256 = "{token_sha}"
groups = ["ci"]

[[resources]]
name = "app"
kind = "mysql"
upstream = "127.0.0.1:{up_port}"
database = "{database}"
allow_groups = ["sre", "ci"]
{resource_extra}
[resources.tls]
mode = "verify-full"
ca = "{db_ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "app.password"
"#,
        cert = gw_cert.cert.display(),
        key = gw_cert.key.display(),
        ca = pki.ca.display(),
        token_sha = sha256_hex(TOKEN),
        up_port = db.port,
        database = db.database,
        db_ca = db.ca_cert.display(),
    );
    (Gateway::start(dir, &config, &[]), mysql_port)
}
