//! `tollgate demo`: a dev PKI, a throwaway TLS PostgreSQL with a sample schema, a small HTTPS
//! API, and the gateway in front of both, with copy-paste client commands. Ctrl-C stops
//! everything. alice's certificate is also written as a PKCS#12 bundle (`pki/alice.p12`, with
//! `openssl`) for signing in to the web console from a browser.

use anyhow::Context;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tollgate_testsupport::{ClusterOptions, MariaDb, MariaDbOptions, PgCluster};
use tollgate_tls::pki;

const SAMPLE_SCHEMA: &str = "
CREATE TABLE customers (
    id          serial PRIMARY KEY,
    full_name   text NOT NULL,
    email       text NOT NULL,
    card_number text,
    ssn         text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (full_name, email, card_number, ssn) VALUES
    ('Ada Lovelace',    'ada@example.com',     '4242 4242 4242 4242', '078-05-1120'),
    ('Grace Hopper',    'grace@example.com',   '5555 5555 5555 4444', '219-09-9999'),
    ('Alan Turing',     'alan@example.org',    '4000 0566 5566 5556', '457-55-5462'),
    ('Katherine Johnson','kj@example.net',     '3782 822463 10005',   '323-45-6789');
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers(id),
    total_cents int NOT NULL,
    status      text NOT NULL DEFAULT 'new'
);
INSERT INTO orders (customer_id, total_cents, status) VALUES (1, 1999, 'paid'), (2, 4250, 'shipped'), (3, 999, 'new'), (1, 12000, 'refunded');
";

fn free_or(preferred: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        preferred
    } else {
        tollgate_testsupport::free_port()
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Write `pki/alice.p12` (alice's certificate, key and the demo CA) with `openssl pkcs12 -export`
/// under a fresh password, which is returned (and kept in `pki/alice.p12.password`); why not, if
/// openssl is missing or fails.
fn pkcs12_bundle(pki_dir: &Path, alice: &pki::IssuedFiles) -> Result<String, String> {
    let out = pki_dir.join("alice.p12");
    let password = tollgate_server::random_hex(8);
    // Never leave the bundle of an earlier run's certificate behind.
    let _ = fs::remove_file(&out);
    // The password reaches openssl through its environment, not its command line.
    let made = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-name", "alice (tollgate demo)"])
        .arg("-in")
        .arg(&alice.cert)
        .arg("-inkey")
        .arg(&alice.key)
        .arg("-certfile")
        .arg(pki_dir.join("ca.crt"))
        .arg("-out")
        .arg(&out)
        .args(["-passout", "env:TOLLGATE_DEMO_P12_PASSWORD"])
        .env("TOLLGATE_DEMO_P12_PASSWORD", &password)
        .stdin(std::process::Stdio::null())
        .output();
    match made {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("openssl is not installed".into())
        }
        Err(e) => Err(format!("openssl did not run: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "openssl pkcs12 failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => {
            let _ = fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o600));
            write_private(
                &pki_dir.join("alice.p12.password"),
                &format!("{password}\n"),
            )
            .map_err(|e| e.to_string())?;
            Ok(password)
        }
    }
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = fs::canonicalize(dir)?;
    let pki_dir = dir.join("pki");
    if !pki_dir.join("ca.key").exists() {
        pki::init_ca(&pki_dir, "tollgate demo CA")?;
    }
    pki::issue_server(
        &pki_dir,
        &pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?],
            ttl: pki::DEFAULT_SERVER_TTL,
            not_before: None,
        },
        &pki_dir.join("gateway"),
    )?;
    let alice = pki::issue_client(
        &pki_dir,
        &pki::ClientCertSpec {
            name: "alice".into(),
            spiffe: None,
            groups: vec!["sre".into()],
            ttl: pki::DEFAULT_CLIENT_TTL,
            not_before: None,
        },
        &pki_dir.join("alice"),
    )?;
    let agent = pki::issue_client(
        &pki_dir,
        &pki::ClientCertSpec {
            name: "agent-7".into(),
            spiffe: Some("spiffe://demo.tollgate/agent/7".into()),
            groups: vec!["agents".into()],
            ttl: pki::DEFAULT_CLIENT_TTL,
            not_before: None,
        },
        &pki_dir.join("agent-7"),
    )?;
    // The CA's revocation list (kept across runs: `tollgate pki revoke --dir PKI CERT` adds
    // to it, and the gateway re-reads it on change).
    pki::revoke(
        &pki_dir,
        &[],
        std::time::Duration::from_secs(30 * 24 * 3600),
        &pki_dir.join("ca.crl"),
    )?;
    // alice's certificate and key as a PKCS#12 bundle, to import into a browser and sign in to
    // the console with the certificate.
    let alice_p12 = pkcs12_bundle(&pki_dir, &alice);
    let token = tollgate_server::random_hex(24);
    let token_sha = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let token_sha: String = token_sha
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    // A reviewer's token (group sre) to sign in to the web console with.
    let reviewer_token = tollgate_server::random_hex(24);
    let reviewer_sha: String =
        ring::digest::digest(&ring::digest::SHA256, reviewer_token.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();

    let cluster = match tollgate_testsupport::pg_bin_dir() {
        Some(_) => {
            println!(
                "starting a throwaway PostgreSQL with TLS (data in {}) ...",
                dir.join("postgres").display()
            );
            let opts = ClusterOptions {
                user: "shop_app".into(),
                database: "shop".into(),
                ca_dir: Some(pki_dir.clone()),
                init_sql: vec![SAMPLE_SCHEMA.into()],
                ..ClusterOptions::default()
            };
            Some(
                PgCluster::start_in(&dir.join("postgres"), opts)
                    .context("starting the demo PostgreSQL")?,
            )
        }
        None => {
            println!("PostgreSQL server binaries are not installed, so the demo runs the gateway without a database.");
            println!(
                "To get the full demo: {}",
                tollgate_testsupport::install_hint()
            );
            None
        }
    };

    let mariadb = start_mariadb(&dir, &pki_dir)?;

    let pg_port = free_or(6432);
    let mysql_port = free_or(3307);
    let admin_port = free_or(9090);
    let https_port = free_or(8443);
    let api_port = tollgate_testsupport::free_port();
    let api_cert = pki::issue_server(
        &pki_dir,
        &pki::ServerCertSpec {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?],
            ttl: pki::DEFAULT_SERVER_TTL,
            not_before: None,
        },
        &pki_dir.join("demo-api"),
    )?;
    let secrets = dir.join("secrets");
    fs::create_dir_all(&secrets)?;
    let api_credential = format!("Bearer demo-api-{}", tollgate_server::random_hex(16));
    write_private(&secrets.join("billing.token"), &api_credential)?;
    let mut resources = format!(
        r#"
[[resources]]
name = "billing"                     # https://localhost:{https_port}/r/billing/...
kind = "http"
upstream = "https://localhost:{api_port}"
allow_groups = ["sre", "agents", "ci"]
review_timeout = "10m"

[[resources.rules]]                  # guardrail: refused before it reaches the API
name = "no-deletes"
methods = ["DELETE"]
action = "deny"
message = "deleting through the demo gateway is not allowed"
[[resources.rules]]                  # agents' refunds wait for an sre's approval
name = "agent-refunds"
methods = ["POST"]
paths = ["/v1/invoices/*/refund"]
groups = ["agents"]
action = "review"
approvers = ["sre"]

[[resources.masks]]                  # e-mails in the JSON, except for the sre group
json_paths = ["$..email"]
strategy = "partial"
except_groups = ["sre"]
[[resources.masks]]                  # card numbers anywhere, for everyone
detectors = ["credit_card"]
strategy = "partial"

[resources.tls]
ca = "pki/ca.crt"
server_name = "localhost"
[resources.credentials]              # injected upstream; clients never hold it
header = "Authorization"
value_file = "secrets/billing.token"
"#
    );
    resources += &format!(
        r#"
[[resources]]
name = "billing-mcp"                 # an MCP server: https://localhost:{https_port}/r/billing-mcp
kind = "mcp"
upstream = "https://localhost:{api_port}/mcp"
allow_groups = ["sre", "agents", "ci"]
review_timeout = "10m"

[[resources.rules]]                  # guardrail: the tool is not even listed
name = "no-deletes"
tools = ["delete_*"]
action = "deny"
[[resources.rules]]                  # refunds of 100.00 or more wait for an sre's approval
name = "large-refunds"
tools = ["refund_invoice"]
arguments = {{ "$.amount_cents" = "?????*" }}
action = "review"
approvers = ["sre"]

[[resources.masks]]                  # in tool results: e-mails and card numbers, except for sre
detectors = ["email", "credit_card"]
strategy = "partial"
except_groups = ["sre"]

[resources.pinning]                  # a tool whose definition changes is blocked
mode = "enforce"

[resources.tls]
ca = "pki/ca.crt"
server_name = "localhost"
[resources.credentials]
header = "Authorization"
value_file = "secrets/billing.token"
"#
    );
    if let Some(c) = &cluster {
        write_private(&secrets.join("shop.password"), &c.password)?;
        resources += &format!(
            r#"
[[resources]]
name = "shop"
kind = "postgres"
upstream = "127.0.0.1:{port}"
database = "shop"
allow_groups = ["sre", "agents", "ci"]
capture_results = true               # replays show the (masked) rows each client saw

[[resources.rules]]                  # guardrail: refused before it reaches the database
name = "no-drop"
statements = ["drop", "truncate", "do"]
action = "deny"
message = "dropping tables is not allowed through the demo gateway"
[[resources.rules]]                  # agents' writes wait on the wire for an sre's approval
name = "agent-writes"
statements = ["delete", "update"]
groups = ["agents"]
action = "review"
approvers = ["sre"]

[[resources.masks]]                  # whole columns, except for the sre group
columns = ["email", "card_number", "ssn"]
strategy = "partial"
except_groups = ["sre"]
[[resources.masks]]                  # card numbers anywhere, for everyone
detectors = ["credit_card"]
strategy = "partial"

[resources.tls]
mode = "verify-full"
ca = "{ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "secrets/shop.password"
"#,
            port = c.port,
            ca = c.ca_cert.display(),
            user = c.user,
        );
    }
    let demo_oidc = DemoOidc::from_env()?;
    if let Some(m) = &mariadb {
        write_private(&secrets.join("crm.password"), &m.password)?;
        resources += &mariadb_resource(m);
    }
    let mysql_listen = match &mariadb {
        Some(_) => format!("mysql_listen = \"127.0.0.1:{mysql_port}\"\n"),
        None => String::new(),
    };
    let config_text = format!(
        r#"# Written by `tollgate demo`. Paths are relative to this file.
[server]
postgres_listen = "127.0.0.1:{pg_port}"
{mysql_listen}admin_listen = "127.0.0.1:{admin_port}"
https_listen = "127.0.0.1:{https_port}"
console_url = "https://localhost:{https_port}"
tls_cert = "pki/gateway.crt"
tls_key = "pki/gateway.key"
client_ca = "pki/ca.crt"
client_crl = ["pki/ca.crl"]
client_cert = "optional"
store = "sqlite://audit.db"
{issuing}
[roles]
admin_groups = ["sre"]
auditor_groups = ["sre"]

[[identity.tokens]]
subject = "ci-bot"
sha256 = "{token_sha}"
groups = ["ci"]

[[identity.tokens]]
subject = "reviewer"
sha256 = "{reviewer_sha}"
groups = ["sre"]
{oidc_table}{resources}"#,
        issuing = demo_oidc.as_ref().map_or("", |_| {
            "issuing_ca_cert = \"pki/ca.crt\"\nissuing_ca_key = \"pki/ca.key\"\n"
        }),
        oidc_table = demo_oidc.as_ref().map(DemoOidc::table).unwrap_or_default(),
    );
    let config_path = dir.join("tollgate.toml");
    fs::write(&config_path, config_text)?;
    let config = tollgate_config::load(&config_path)?;

    let rel = |p: &Path| {
        p.strip_prefix(std::env::current_dir().unwrap_or_default())
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let ca = rel(&pki_dir.join("ca.crt"));
    let (alice_crt, alice_key, agent_crt, agent_key) = (
        rel(&alice.cert),
        rel(&alice.key),
        rel(&agent.cert),
        rel(&agent.key),
    );
    let have_db = cluster.is_some();
    let config_shown = rel(&config_path);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::demo_api::serve(
        api_port,
        &api_cert.cert,
        &api_cert.key,
        api_credential,
    ))
    .context("starting the demo HTTPS API")?;
    let result = rt.block_on(tollgate_server::run(config, crate::shutdown_signal(), |bound| {
        let pg = bound.postgres.map(|a| a.port()).unwrap_or(pg_port);
        let admin = bound.admin.map(|a| a.port()).unwrap_or(admin_port);
        println!();
        println!("tollgate demo is ready. The gateway listens on localhost:{pg} (PostgreSQL, TLS only) and 127.0.0.1:{admin} (health, metrics).");
        println!("Config: {}", config_shown.display());
        if have_db {
            println!();
            println!("# as alice (group sre), with a client certificate; verify-full checks the gateway's certificate:");
            println!("psql \"host=localhost port={pg} dbname=shop user=alice sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\" -c 'SELECT full_name, email, card_number FROM customers'", ca.display(), alice_crt.display(), alice_key.display());
            println!();
            println!("# as an AI agent with a SPIFFE identity (group agents): the same rows, masked");
            println!("psql \"host=localhost port={pg} dbname=shop user=agent sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\" -c 'SELECT full_name, email, card_number FROM customers'", ca.display(), agent_crt.display(), agent_key.display());
            println!();
            println!("# the agent's DELETE is held on the wire until alice approves it (run the next command in another terminal):");
            println!("psql \"host=localhost port={pg} dbname=shop user=agent sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\" -c \"DELETE FROM orders WHERE status = 'refunded'\"", ca.display(), agent_crt.display(), agent_key.display());
            println!("tollgate reviews list --gateway https://localhost:{https_port} --ca {} --cert {} --key {}", ca.display(), alice_crt.display(), alice_key.display());
            println!("tollgate reviews approve REVIEW_ID --gateway https://localhost:{https_port} --ca {} --cert {} --key {}", ca.display(), alice_crt.display(), alice_key.display());
            println!();
            println!("# a guardrail refuses this one outright:");
            println!("psql \"host=localhost port={pg} dbname=shop user=agent sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\" -c 'DROP TABLE orders'", ca.display(), agent_crt.display(), agent_key.display());
            println!();
            println!("# as the ci-bot service account, with a token as the password (sent only inside TLS):");
            println!("PGPASSWORD={token} psql \"host=localhost port={pg} dbname=shop user=ci-bot sslmode=verify-full sslrootcert={}\" -c 'SELECT count(*) FROM orders'", ca.display());
            println!();
            println!("# plaintext is refused with an explanation:");
            println!("psql \"host=localhost port={pg} dbname=shop user=alice sslmode=disable\"");
            println!();
            println!("# pgbench through the gateway:");
            println!("PGPASSWORD={token} pgbench -n -S -T 5 \"host=localhost port={pg} dbname=shop user=ci-bot sslmode=verify-full sslrootcert={}\"   # after: pgbench -i against the database directly", ca.display());
        }
        if let (Some(m), Some(port)) = (&mariadb, bound.mysql.map(|a| a.port())) {
            print_mariadb_commands(m, port, &ca, &alice_crt, &alice_key, &token);
        }
        println!();
        println!("# the demo HTTPS API behind the gateway (it only answers with the credential the gateway injects):");
        let curl_agent = format!("curl --cacert {} --cert {} --key {}", ca.display(), agent_crt.display(), agent_key.display());
        let api = format!("https://localhost:{https_port}/r/billing");
        println!("{curl_agent} {api}/v1/customers          # the agent sees e-mails and card numbers masked");
        println!("curl --cacert {} --cert {} --key {} {api}/v1/customers   # alice (sre) sees e-mails", ca.display(), alice_crt.display(), alice_key.display());
        println!("{curl_agent} -X POST -d '{{\"amount_cents\": 500}}' {api}/v1/invoices/7/refund   # held until approved:");
        println!("tollgate reviews approve REVIEW_ID --gateway https://localhost:{https_port} --ca {} --cert {} --key {}", ca.display(), alice_crt.display(), alice_key.display());
        println!("{curl_agent} -X DELETE {api}/v1/customers/1          # refused by a guardrail (403)");
        println!("curl --cacert {} {api}/v1/customers          # no credential: 401", ca.display());
        println!();
        println!("# the demo MCP server behind the gateway (tools judged, held, masked and recorded):");
        let mcp = format!("https://localhost:{https_port}/r/billing-mcp");
        let rpc = |body: &str| format!("{curl_agent} -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' -d '{body}' {mcp}");
        println!("{}   # tools/list: delete_customer is not listed", rpc(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#));
        println!("{}   # the tool's answer, masked", rpc(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"lookup_customer","arguments":{"id":"1"}}}"#));
        println!("{}   # held until approved", rpc(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"refund_invoice","arguments":{"invoice":"7","amount_cents":25000}}}"#));
        println!("# an MCP client (streamable HTTP) connects to {mcp} with a client certificate, or a token:");
        println!("#  {{\"mcpServers\": {{\"billing\": {{\"type\": \"http\", \"url\": \"{mcp}\", \"headers\": {{\"Authorization\": \"Bearer {token}\"}}}}}}}}");
        println!("#  (Node-based clients trust the demo CA with NODE_EXTRA_CA_CERTS={})", ca.display());
        println!();
        println!("# the web console (reviews to approve or deny, sessions and their timelines); the link in a");
        println!("# held statement's NOTICE opens its review. Sign in with the reviewer token (group sre):");
        println!("#   https://localhost:{https_port}/reviews   token: {reviewer_token}");
        println!("# (the browser does not know the demo CA: import {} or accept the warning once)", ca.display());
        let p12 = rel(&pki_dir.join("alice.p12"));
        match &alice_p12 {
            Ok(password) => {
                println!("# or sign in with alice's client certificate (group sre), no token: import the PKCS#12 bundle");
                println!("#   {}   password: {password}", p12.display());
                println!("#   Chrome: Settings > Privacy and security > Security > Manage certificates > Your certificates > Import");
                println!("#     (Chrome on Linux, from a shell: pk12util -d sql:$HOME/.pki/nssdb -i {} -W {password})", p12.display());
                println!("#   Firefox: Settings > Privacy & Security > Certificates > View Certificates > Your Certificates > Import");
                println!("#   then open https://localhost:{https_port}/reviews and choose alice's certificate when the browser asks.");
            }
            Err(why) => {
                println!("# to sign in with alice's client certificate instead, make a PKCS#12 bundle ({why}) and import it into the browser:");
                println!("#   openssl pkcs12 -export -in {} -inkey {} -certfile {} -name alice -out {}", alice_crt.display(), alice_key.display(), ca.display(), p12.display());
            }
        }
        println!();
        match &demo_oidc {
            Some(o) => {
                println!("# people sign in with {} (the console's /login has a \"Sign in with\" button;", o.issuer);
                println!("# register https://localhost:{https_port}/auth/oidc/callback and http://127.0.0.1/callback, any port, for client {}):", o.client_id);
                println!("tollgate login --gateway https://localhost:{https_port} --ca {}{}          # browser sign-in, then a 12h-at-most certificate", ca.display(), o.idp_ca_arg());
                println!("tollgate login --gateway https://localhost:{https_port} --ca {}{} --device # from a terminal without a browser", ca.display(), o.idp_ca_arg());
            }
            None => {
                println!("# people can sign in with your OpenID provider (console button, tollgate login): start the demo with");
                println!("#   TOLLGATE_DEMO_OIDC_ISSUER=https://idp.example TOLLGATE_DEMO_OIDC_CLIENT_ID=tollgate [TOLLGATE_DEMO_OIDC_CA=idp-ca.crt] tollgate demo");
            }
        }
        println!();
        println!("# health, readiness and metrics:");
        println!("curl -s http://127.0.0.1:{admin}/readyz; curl -s http://127.0.0.1:{admin}/metrics | grep tollgate_");
        println!();
        println!("# the audit trail's hash chain (every session and statement is recorded):");
        println!("tollgate audit verify --config {}      # or: cargo run -q -- audit verify --config ...", config_shown.display());
        {
            println!();
            println!("# the recorded sessions, and a replay of one with the (masked) rows or bodies its client saw:");
            println!("tollgate sessions list --gateway https://localhost:{https_port} --ca {} --cert {} --key {}", ca.display(), alice_crt.display(), alice_key.display());
            println!("tollgate sessions replay SESSION_ID --gateway https://localhost:{https_port} --ca {} --cert {} --key {}", ca.display(), alice_crt.display(), alice_key.display());
        }
        println!();
        println!("Press Ctrl-C to stop the gateway and the database.");
    }));
    drop(cluster);
    drop(mariadb);
    println!("demo stopped; files are kept in {}", rel(&dir).display());
    result
}

/// An OpenID provider for the demo's people (`TOLLGATE_DEMO_OIDC_ISSUER`, `..._CLIENT_ID`,
/// optional `..._CA` and `..._GROUPS_CLAIM`): the console's sign-in button and `tollgate login`.
struct DemoOidc {
    issuer: String,
    client_id: String,
    ca: Option<PathBuf>,
    groups_claim: Option<String>,
}

impl DemoOidc {
    fn from_env() -> anyhow::Result<Option<DemoOidc>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let Some(issuer) = var("TOLLGATE_DEMO_OIDC_ISSUER") else {
            return Ok(None);
        };
        let client_id = var("TOLLGATE_DEMO_OIDC_CLIENT_ID").context(
            "TOLLGATE_DEMO_OIDC_ISSUER is set: set TOLLGATE_DEMO_OIDC_CLIENT_ID to the public client registered for tollgate too",
        )?;
        let ca = var("TOLLGATE_DEMO_OIDC_CA")
            .map(|p| {
                std::fs::canonicalize(&p).with_context(|| format!("TOLLGATE_DEMO_OIDC_CA {p}"))
            })
            .transpose()?;
        Ok(Some(DemoOidc {
            issuer,
            client_id,
            ca,
            groups_claim: var("TOLLGATE_DEMO_OIDC_GROUPS_CLAIM"),
        }))
    }

    fn table(&self) -> String {
        // A JSON string is a TOML basic string (same escapes).
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut t = format!(
            "\n[[identity.oidc]]                    # people sign in here (console, tollgate login)\nissuer = {}\nclient_id = {}\naudiences = [{}]\n",
            q(&self.issuer),
            q(&self.client_id),
            q(&self.client_id)
        );
        if let Some(ca) = &self.ca {
            t.push_str(&format!("ca = {}\n", q(&ca.display().to_string())));
        }
        if let Some(g) = &self.groups_claim {
            t.push_str(&format!("groups_claim = {}\n", q(g)));
        }
        t
    }

    fn idp_ca_arg(&self) -> String {
        self.ca
            .as_ref()
            .map(|c| format!(" --idp-ca {}", c.display()))
            .unwrap_or_default()
    }
}

const MARIADB_SAMPLE: &str = "
CREATE TABLE contacts (
    id        INT AUTO_INCREMENT PRIMARY KEY,
    full_name VARCHAR(100) NOT NULL,
    email     VARCHAR(200) NOT NULL,
    phone     VARCHAR(40)
);
INSERT INTO contacts (full_name, email, phone) VALUES
    ('Ada Lovelace', 'ada@example.com', '+44 20 7946 0958'),
    ('Grace Hopper', 'grace@example.com', '+1 202 555 0143');
";

/// A throwaway TLS MariaDB ("crm") when its server binaries are installed.
fn start_mariadb(dir: &Path, pki_dir: &Path) -> anyhow::Result<Option<MariaDb>> {
    if tollgate_testsupport::mariadb_binaries().is_none() {
        println!(
            "MariaDB is not installed, so the demo has no MySQL resource ({}).",
            tollgate_testsupport::mariadb_install_hint()
        );
        return Ok(None);
    }
    println!(
        "starting a throwaway MariaDB with TLS (data in {}) ...",
        dir.join("mariadb").display()
    );
    let opts = MariaDbOptions {
        user: "crm_app".into(),
        database: "crm".into(),
        ca_dir: Some(pki_dir.to_path_buf()),
        init_sql: vec![MARIADB_SAMPLE.into()],
        ..MariaDbOptions::default()
    };
    MariaDb::start_in(&dir.join("mariadb"), opts)
        .map(Some)
        .context("starting the demo MariaDB")
}

fn mariadb_resource(m: &MariaDb) -> String {
    format!(
        r#"
[[resources]]
name = "crm"
kind = "mysql"
upstream = "127.0.0.1:{port}"
database = "crm"
allow_groups = ["sre", "agents", "ci"]

[[resources.rules]]
name = "no-drop"
statements = ["drop", "truncate"]
action = "deny"
message = "dropping tables is not allowed through the demo gateway"

[[resources.masks]]
columns = ["email", "phone"]
strategy = "partial"
except_groups = ["sre"]

[resources.tls]
mode = "verify-full"
ca = "{ca}"
server_name = "localhost"
[resources.credentials]
user = "{user}"
password_file = "secrets/crm.password"
"#,
        port = m.port,
        ca = m.ca_cert.display(),
        user = m.user,
    )
}

fn print_mariadb_commands(m: &MariaDb, port: u16, ca: &Path, crt: &Path, key: &Path, token: &str) {
    let client = format!(
        "mariadb --host=localhost --protocol=tcp --port={port} --ssl-ca={} --ssl-verify-server-cert",
        ca.display()
    );
    println!();
    println!(
        "# MariaDB {} behind the gateway (database crm), as alice with a client certificate:",
        m.version
    );
    println!("{client} --ssl-cert={} --ssl-key={} --user=alice crm -e 'SELECT full_name, email FROM contacts'", crt.display(), key.display());
    println!("# as ci-bot with a token as the password (e-mails masked), and a guardrail:");
    println!("{client} --user=ci-bot --password={token} crm -e 'SELECT full_name, email, phone FROM contacts'");
    println!("{client} --user=ci-bot --password={token} crm -e 'DROP TABLE contacts'");
}
