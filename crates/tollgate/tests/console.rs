//! The web console with a real browser: Debian's chromium driven over WebDriver (chromedriver,
//! `fantoccini`). A psql client's DELETE is held for review; the browser opens the link its
//! NOTICE prints, signs in with a token and approves it, and psql completes; a denial with its
//! reason reaches the next client; an auditor sees the review without decision forms and a
//! forged POST of theirs is refused; POSTs without the CSRF token or from another origin are
//! refused (curl); pages carry the security headers; views and decisions are audit events.
//! The auditor reads the resources page (rules, masks; approvers may not).
//! Screenshots of the main pages at 1280 and 390 px go to `target/console-screenshots/`.
//! With an OpenID provider (npm `oidc-provider`): a reviewer signs in through the provider's
//! own login and consent pages in the browser and approves; a declined consent, an answer
//! with another state and a callback without its pre-login cookie each get a page that says so.

mod common;

use common::idp::{Browsed, Consent, Idp};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tollgate_testsupport::ClusterOptions;
use tollgate_tls::pki::IssuedFiles;

/// rita (sre) may approve deletes; otto (audit) may read everything and decide nothing.
const RITA_TOKEN: &str = "rita-console-token-00112233445566";
const OTTO_TOKEN: &str = "otto-auditor-token-66554433221100";

const RULES: &str = r#"review_timeout = "90s"
access_approvers = ["sre"]
capture_results = true
[[resources.masks]]
columns = ["name"]
strategy = "redact"
[[resources.rules]]
name = "agent-deletes"
statements = ["delete"]
groups = ["ci"]
action = "review"
approvers = ["sre"]
"#;

struct Setup {
    env: Env,
    https: u16,
    /// ci: the agent whose deletes need review.
    bob: IssuedFiles,
}

fn start() -> Setup {
    start_with(tollgate_testsupport::free_port(), "")
}

/// [`start`] on `https`, with `extra` appended to the config (e.g. an `[[identity.oidc]]`).
fn start_with(https: u16, extra: &str) -> Setup {
    let env = Env::start_with(EnvOptions {
        cluster: ClusterOptions {
            init_sql: vec![
                "CREATE TABLE items (id int PRIMARY KEY, name text)".into(),
                "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g".into(),
            ],
            ..Default::default()
        },
        server_extra: format!(
            r#"https_listen = "127.0.0.1:{https}"
console_url = "https://localhost:{https}"

[roles]
admin_groups = []
auditor_groups = ["audit"]

[[identity.tokens]]
subject = "rita"
sha256 = "{rita}"
groups = ["sre"]

[[identity.tokens]]
subject = "otto"
sha256 = "{otto}"
groups = ["audit"]
{extra}"#,
            rita = sha256_hex(RITA_TOKEN),
            otto = sha256_hex(OTTO_TOKEN),
        ),
        resource_extra: RULES.into(),
        ..Default::default()
    });
    let bob = env.pki.client("bob", &["ci"]);
    Setup { env, https, bob }
}

/// A psql client whose statement is held: the console link its NOTICE printed, and the rest.
struct Held {
    child: Child,
    link: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Setup {
    fn origin(&self) -> String {
        format!("https://localhost:{}", self.https)
    }

    /// bob runs `sql` in psql; returns once the NOTICE with the review's console link arrived.
    fn hold(&self, sql: &str) -> Held {
        let mut child = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(self.env.conninfo_as(&self.bob, "app"))
            .args(["-c", sql])
            .env_remove("PGPASSWORD")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let prefix = format!("{}/reviews/", self.origin());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("psql printed no console link for {sql}");
            };
            if let Some(at) = line.find(&prefix) {
                let link: String = line[at..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '`')
                    .collect();
                return Held {
                    child,
                    link,
                    stderr,
                };
            }
        }
    }

    /// The console as curl sees it.
    fn browser(&self) -> ConsoleCurl {
        ConsoleCurl {
            ca: self.env.pki.ca.clone(),
            origin: self.origin(),
        }
    }

    fn curl(&self, args: &[&str]) -> (u16, String, String) {
        self.browser().curl(args)
    }

    fn curl_login(&self, token: &str) -> String {
        self.browser().login(token)
    }

    fn curl_post(
        &self,
        path: &str,
        cookie: &str,
        origin: Option<&str>,
        form: &[(&str, &str)],
    ) -> (u16, String) {
        let (status, _, body) = self.browser().post(path, cookie, origin, form);
        (status, body)
    }

    fn page(&self, cookie: &str, path: &str) -> (u16, String) {
        self.browser().page(cookie, path)
    }

    fn review_status(&self, cookie: &str, id: &str) -> String {
        let (status, _, body) = self.curl(&[
            "-H",
            &format!("Cookie: __Host-tollgate_console={cookie}"),
            &format!("{}/reviews/{id}", self.origin()),
        ]);
        assert_eq!(status, 200, "{body}");
        let at = body.find("id=\"status\">").expect("a status badge") + "id=\"status\">".len();
        body[at..].split('<').next().unwrap().to_string()
    }
}

/// The session id of a JSON Lines download.
fn session_of(jsonl: &str) -> String {
    let first: Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    first["session_id"].as_str().unwrap().to_string()
}

fn review_id(link: &str) -> String {
    link.rsplit('/').next().unwrap().to_string()
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser() -> (Driver, Client) {
    let port = tollgate_testsupport::free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian: chromium-driver; scripts/test installs it)");
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver {
        child,
        port,
        _profile: profile,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", driver.port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The test CA is made per test; rather than install it in a browser profile, this test
    // browser alone skips certificate checks. The gateway and its clients never do.
    let caps = json!({
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--ignore-certificate-errors", "--window-size=1280,900",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ]
        }
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session");
    (driver, client)
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The current page at 1280 and 390 px wide, as `<name>-1280.png` and `<name>-390.png`.
async fn screenshots(c: &Client, name: &str) {
    // Tall windows, so a screenshot (the viewport) holds the whole page.
    for (w, h) in [(1280u32, 1100u32), (390, 1400)] {
        c.set_window_size(w, h).await.unwrap();
        let inner = c.execute("return window.innerWidth", vec![]).await.unwrap();
        // Nothing wider than the window: no sideways scrolling on a phone.
        let wide = c
            .execute(
                "return document.documentElement.scrollWidth - window.innerWidth",
                vec![],
            )
            .await
            .unwrap();
        assert!(
            wide.as_i64().unwrap_or(1) <= 0,
            "{name} at {w} px is {wide} px too wide"
        );
        let png = c.screenshot().await.unwrap();
        let path = screenshot_dir().join(format!("{name}-{w}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot {} (innerWidth {inner})", path.display());
    }
    c.set_window_size(1280, 900).await.unwrap();
}

/// The text of `css` once the page shows it (retrying while a submitted form navigates).
async fn text_of(c: &Client, css: &str) -> String {
    text_when(c, css, |_| true).await
}

/// The text of `css` once `ok` holds for it, within 10 s; the page's source otherwise.
async fn text_when(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = Some(t);
            }
        }
        if Instant::now() > deadline {
            panic!(
                "{css} never showed what was expected (last: {last:?}) at {}:\n{}",
                c.current_url().await.unwrap(),
                c.source().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn expect_text(c: &Client, css: &str, want: &str) {
    text_when(c, css, |t| t == want).await;
}

async fn sign_in(c: &Client, token: &str) {
    let field = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#token"))
        .await
        .expect("the sign-in form");
    field.send_keys(token).await.unwrap();
    c.find(Locator::Css("#sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_approves_and_denies_held_statements_in_a_browser() {
    let s = start();
    let (_driver, c) = browser().await;

    // bob's DELETE is held; its NOTICE links to the review in the console.
    let held = s.hold("DELETE FROM items WHERE id <= 3");
    let id = review_id(&held.link);
    assert!(id.starts_with("rv_"), "{}", held.link);

    // The link asks for a sign-in first, then lands on the review.
    c.goto(&held.link).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert_eq!(url.path(), "/login", "{url}");
    screenshots(&c, "login").await;
    sign_in(&c, RITA_TOKEN).await;
    expect_text(&c, "#status", "pending").await;
    assert_eq!(
        c.current_url().await.unwrap().path(),
        format!("/reviews/{id}")
    );
    assert!(text_of(&c, "#statement")
        .await
        .contains("DELETE FROM items WHERE id <= 3"));
    expect_text(&c, "#rule", "agent-deletes").await;
    assert!(text_of(&c, "#requester").await.contains("bob"));
    screenshots(&c, "review-pending").await;
    c.goto(&format!("{}/reviews", s.origin())).await.unwrap();
    // rita may decide bob's review.
    text_when(&c, "#to-decide", |t| t.contains("bob")).await;
    screenshots(&c, "reviews").await;

    // Approve: psql gets its answer.
    c.goto(&held.link).await.unwrap();
    c.find(Locator::Css("#approve-reason"))
        .await
        .unwrap()
        .send_keys("cleanup ok")
        .await
        .unwrap();
    c.find(Locator::Css("#approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    expect_text(&c, "#status", "approved").await;
    expect_text(&c, "#decided-by", "rita").await;
    assert!(c.find(Locator::Css("#approve")).await.is_err());
    screenshots(&c, "review-approved").await;
    let out = held.child.wait_with_output().unwrap();
    let err = held.stderr.join().unwrap();
    assert!(out.status.success(), "{err}");
    assert!(stdout(&out).contains("DELETE 3"), "{}", stdout(&out));

    // Deny with a reason: the page shows who and why, the client gets the reason.
    let held = s.hold("DELETE FROM items WHERE id = 9");
    c.goto(&held.link).await.unwrap();
    // Beside it, what bob ran on the resource lately (the approved DELETE among it).
    text_when(&c, "#recent", |t| {
        t.contains("DELETE FROM items WHERE id <= 3")
    })
    .await;
    c.find(Locator::Css("#deny-reason"))
        .await
        .unwrap()
        .send_keys("not during the freeze")
        .await
        .unwrap();
    c.find(Locator::Css("#deny"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    expect_text(&c, "#status", "denied").await;
    expect_text(&c, "#decision-reason", "not during the freeze").await;
    let out = held.child.wait_with_output().unwrap();
    let err = held.stderr.join().unwrap();
    assert!(!out.status.success());
    assert!(
        err.contains("not during the freeze") && err.contains("rita"),
        "{err}"
    );

    // Security headers on every page.
    let rita = s.curl_login(RITA_TOKEN);
    let (status, head, _) = s.curl(&[
        "-H",
        &format!("Cookie: __Host-tollgate_console={rita}"),
        &format!("{}/reviews", s.origin()),
    ]);
    assert_eq!(status, 200);
    let head = head.to_ascii_lowercase();
    for h in [
        "content-security-policy: default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        "x-frame-options: deny",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "cache-control: no-store",
    ] {
        assert!(head.contains(h), "{h} missing:\n{head}");
    }

    // A third held DELETE: forged POSTs are refused and leave it pending.
    let held = s.hold("DELETE FROM items WHERE id = 10");
    let id = review_id(&held.link);
    let path = format!("/reviews/{id}/approve");
    let (_, _, page) = s.curl(&[
        "-H",
        &format!("Cookie: __Host-tollgate_console={rita}"),
        &held.link,
    ]);
    let csrf = csrf_of(&page);
    let origin = s.origin();
    let (status, body) = s.curl_post(&path, &rita, Some(&origin), &[("reason", "x")]);
    assert_eq!(status, 403, "no CSRF token: {body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = s.curl_post(
        &path,
        &rita,
        Some(&origin),
        &[("csrf", &"0".repeat(64)), ("reason", "x")],
    );
    assert_eq!(status, 403, "a wrong CSRF token");
    let (status, body) = s.curl_post(
        &path,
        &rita,
        Some("https://evil.example"),
        &[("csrf", &csrf)],
    );
    assert_eq!(status, 403, "another origin: {body}");
    let (status, _) = s.curl_post(&path, &rita, None, &[("csrf", &csrf)]);
    assert_eq!(status, 403, "no Origin");
    let (status, _) = s.curl_post(
        &path,
        "f".repeat(64).as_str(),
        Some(&origin),
        &[("csrf", &csrf)],
    );
    assert_eq!(status, 401, "no console session");
    assert_eq!(s.review_status(&rita, &id), "pending");

    // otto (auditor) sees the review in the browser, without decision forms ...
    c.find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The sign-out lands on /login; only then open the link (a navigation started before it
    // would race the sign-out's own redirect).
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.current_url().await.unwrap().path() != "/login" {
        assert!(
            Instant::now() < deadline,
            "the sign-out never reached /login"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.goto(&held.link).await.unwrap();
    sign_in(&c, OTTO_TOKEN).await;
    expect_text(&c, "#status", "pending").await;
    text_when(&c, "#no-decision", |t| t.contains("sre")).await;
    assert!(c.find(Locator::Css("#approve")).await.is_err());
    assert!(c.find(Locator::Css("#deny")).await.is_err());
    screenshots(&c, "review-auditor").await;
    // ... and a forged POST with otto's own valid session and token is refused by the workflow.
    let otto = s.curl_login(OTTO_TOKEN);
    let (_, _, page) = s.curl(&[
        "-H",
        &format!("Cookie: __Host-tollgate_console={otto}"),
        &held.link,
    ]);
    let (status, body) = s.curl_post(&path, &otto, Some(&origin), &[("csrf", &csrf_of(&page))]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("sre"), "{body}");
    assert_eq!(s.review_status(&rita, &id), "pending");

    // The auditor browses sessions: bob's, with its statements and the masked rows it saw
    // (captured), and the JSON Lines download.
    let out = s.env.psql(
        &s.env.conninfo_as(&s.bob, "app"),
        &["-c", "SELECT id, name FROM items WHERE id = 5"],
    );
    assert_eq!(stdout(&out).trim(), "5|****", "{}", stderr(&out));
    s.env.events_until("the SELECT's session closed", |evs| {
        evs.iter().any(|e| {
            e["kind"] == "session.close"
                && evs.iter().any(|o| {
                    o["session_id"] == e["session_id"]
                        && o["payload"]["text"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("SELECT id, name"))
                })
        })
    });
    c.goto(&format!("{}/sessions?subject=bob", s.origin()))
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("table.sessions tbody tr a"))
        .await
        .unwrap();
    screenshots(&c, "sessions").await;
    let mut closed = None;
    for row in c
        .find_all(Locator::Css("table.sessions tbody tr"))
        .await
        .unwrap()
    {
        if !row.text().await.unwrap().contains("open") {
            closed = Some(row.find(Locator::Css("a")).await.unwrap());
            break;
        }
    }
    closed
        .expect("a closed session of bob's")
        .click()
        .await
        .unwrap();
    text_when(&c, "ol.timeline", |t| {
        t.contains("SELECT id, name FROM items WHERE id = 5")
    })
    .await;
    let capture = text_of(&c, "table.capture").await;
    assert!(
        capture.contains("****") && !capture.contains("item 5"),
        "{capture}"
    );
    screenshots(&c, "session").await;
    // Replay: the entries disappear and come back at their recorded pace.
    c.find(Locator::Css("#replay"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let clock = text_when(&c, "#replay-clock", |t| t.ends_with("done")).await;
    let entries = c.find_all(Locator::Css("li.event")).await.unwrap().len();
    assert_eq!(clock, format!("{entries} / {entries} · done"));
    let hidden = c
        .execute(
            "return document.querySelectorAll('li.event.replaying').length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!(0));
    let download = c
        .find(Locator::Css("#download"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    let (status, head, body) = s.curl(&[
        "-H",
        &format!("Cookie: __Host-tollgate_console={otto}"),
        &format!("{}{download}", s.origin()),
    ]);
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("application/x-ndjson"));
    let kinds: Vec<String> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("session.open"),
        "{kinds:?}"
    );
    // rita (an approver, not an auditor) may not read sessions, nor check the audit trail.
    for path in [
        "/sessions".to_string(),
        format!("/sessions/{}", session_of(&body)),
        "/audit".to_string(),
        "/resources".to_string(),
    ] {
        let (status, _) = s.page(&rita, &path);
        assert_eq!(status, 403, "{path}");
    }
    // otto sees the hash chains verified.
    c.goto(&format!("{}/audit", s.origin())).await.unwrap();
    text_when(&c, "#verify", |t| t.contains("intact")).await;
    // ... and the resources, read-only: upstream, TLS, who may reach it, rules and masks,
    // with the upstream password only by where it is read from.
    c.find(Locator::Css("nav a[href='/resources']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let app = text_when(&c, "#resource-app", |t| t.contains("agent-deletes")).await;
    for want in [
        "postgres",
        &format!("127.0.0.1:{}", s.env.pg.port),
        "sre, ci",
        "statements: delete",
        "groups: ci",
        "review",
        "columns: name",
        "redact",
        "app.password",
    ] {
        assert!(app.contains(want), "{want} missing: {app}");
    }
    assert!(
        !app.contains(&s.env.pg.password),
        "a secret on the page: {app}"
    );
    let rule = text_of(&c, "#resource-app tr[data-rule='agent-deletes']").await;
    assert!(rule.contains("sre") && rule.contains("no"), "{rule}");
    let tls = text_of(&c, "#resource-app dd.tls").await;
    assert!(
        tls.contains("verify-full") && tls.contains("localhost"),
        "{tls}"
    );
    screenshots(&c, "resources").await;
    // A reloaded config file is what the page shows next.
    let mut text = std::fs::read_to_string(&s.env.gw.config_path).unwrap();
    text.push_str(
        "\n[[resources.rules]]\nname = \"no-truncate\"\nstatements = [\"truncate\"]\naction = \"deny\"\n",
    );
    std::fs::write(&s.env.gw.config_path, text).unwrap();
    let otto_cookie = s.curl_login(OTTO_TOKEN);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, page) = s.page(&otto_cookie, "/resources");
        assert_eq!(status, 200, "{page}");
        if page.contains("no-truncate") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reloaded rule never showed: {page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Not signed in: a page sends the browser to the sign-in form, and back afterwards.
    let (status, head, _) = s.curl(&[&held.link]);
    assert_eq!(status, 303);
    assert!(
        head.contains(&format!("location: /login?next=%2Freviews%2F{id}")),
        "{head}"
    );
    // A client certificate signs in without a form. bob, the requester, sees no forms, and
    // his own POST (certificate, session cookie, CSRF token, origin) is refused: no self-approval.
    let bob_cert = [
        "--cert",
        s.bob.cert.to_str().unwrap(),
        "--key",
        s.bob.key.to_str().unwrap(),
    ];
    let (status, head, page) = s.curl(&[&bob_cert[..], &[held.link.as_str()]].concat());
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("You requested this review"), "{page}");
    assert!(!page.contains("id=\"approve\""));
    let bob = set_cookie_value(&head, "__Host-tollgate_console").expect("a console session");
    let (status, _, body) = s.curl(
        &[
            &bob_cert[..],
            &[
                "-H",
                &format!("Cookie: __Host-tollgate_console={bob}"),
                "-H",
                &format!("Origin: {origin}"),
                "--data-urlencode",
                &format!("csrf={}", csrf_of(&page)),
                &format!("{}{path}", s.origin()),
            ],
        ]
        .concat(),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("requester"), "{body}");
    assert_eq!(s.review_status(&rita, &id), "pending");

    // rita approves the third from curl with her token and origin: the client completes.
    let (status, body) = s.curl_post(&path, &rita, Some(&origin), &[("csrf", &csrf)]);
    assert_eq!(status, 303, "{body}");
    let out = held.child.wait_with_output().unwrap();
    assert!(
        stdout(&out).contains("DELETE 1"),
        "{}",
        held.stderr.join().unwrap()
    );

    // Access from the console: otto asks for a while on app, rita approves, otto sees the
    // grant and gives it up.
    let (_, page) = s.page(&otto, "/access");
    let otto_csrf = csrf_of(&page);
    let (status, head, body) = s.browser().post(
        "/access",
        &otto,
        Some(&origin),
        &[
            ("csrf", &otto_csrf),
            ("resource", "app"),
            ("for", "1h"),
            ("reason", "incident 42"),
        ],
    );
    assert_eq!(status, 303, "{body}");
    let access_id = head
        .lines()
        .find_map(|l| l.strip_prefix("location: /reviews/"))
        .unwrap_or_else(|| panic!("{head}"))
        .trim()
        .to_string();
    let (_, page) = s.page(&rita, &format!("/reviews/{access_id}"));
    assert!(page.contains("incident 42"), "{page}");
    let (status, body) = s.curl_post(
        &format!("/reviews/{access_id}/approve"),
        &rita,
        Some(&origin),
        &[("csrf", &csrf)],
    );
    assert_eq!(status, 303, "{body}");
    c.goto(&format!("{}/access", s.origin())).await.unwrap();
    text_when(&c, "#grants", |t| t.contains("otto") && t.contains("app")).await;
    screenshots(&c, "access").await;
    let (status, body) = s.curl_post(
        &format!("/grants/{access_id}/revoke"),
        &otto,
        Some(&origin),
        &[("csrf", &otto_csrf)],
    );
    assert_eq!(status, 400, "a revocation needs a reason: {body}");
    let (status, body) = s.curl_post(
        &format!("/grants/{access_id}/revoke"),
        &otto,
        Some(&origin),
        &[("csrf", &otto_csrf), ("reason", "done")],
    );
    assert_eq!(status, 303, "{body}");
    let (_, page) = s.page(&otto, "/access");
    assert!(page.contains("id=\"no-grants\""), "{page}");
    c.close().await.unwrap();

    // Views and decisions are audit events, like the API's.
    let events = s.env.events_until("console audit events", |evs| {
        evs.iter().any(|e| {
            e["kind"] == "api.write"
                && e["payload"]["console"] == true
                && e["payload"]["review"] == id.as_str()
                && e["payload"]["status"] == 303
        })
    });
    let console: Vec<&Value> = events
        .iter()
        .filter(|e| e["payload"]["console"] == true)
        .collect();
    assert!(console.iter().any(|e| e["kind"] == "api.read"
        && e["payload"]["route"] == "/reviews/{id}"
        && e["payload"]["subject"] == "rita"
        && e["payload"]["status"] == 200));
    assert!(console.iter().any(|e| e["kind"] == "api.write"
        && e["payload"]["route"] == "/reviews/{id}/approve"
        && e["payload"]["subject"] == "otto"
        && e["payload"]["status"] == 403));
    assert!(console.iter().any(|e| e["kind"] == "api.read"
        && e["payload"]["route"] == "/sessions/{id}"
        && e["payload"]["subject"] == "otto"));
    for route in ["/access", "/grants/{id}/revoke"] {
        assert!(
            console.iter().any(|e| e["kind"] == "api.write"
                && e["payload"]["route"] == route
                && e["payload"]["subject"] == "otto"
                && e["payload"]["status"] == 303),
            "{route}"
        );
    }
    assert!(
        !events.iter().any(|e| e.to_string().contains(RITA_TOKEN)),
        "a token never reaches the audit trail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_signs_in_with_the_identity_provider_and_approves() {
    let https = tollgate_testsupport::free_port();
    let idp_dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::new(idp_dir.path(), tollgate_testsupport::free_port(), "keys");
    idp.redirect_uris = vec![format!("https://localhost:{https}/auth/oidc/callback")];
    idp.up();
    let s = start_with(
        https,
        &format!(
            "\n[[identity.oidc]]\nissuer = \"{}\"\nca = \"{}\"\nclient_id = \"tollgate-login\"\naudiences = [\"tollgate\"]\n",
            idp.issuer,
            idp.ca.display()
        ),
    );
    let (_driver, c) = browser().await;

    // bob's DELETE is held; the link leads to /login, which offers the provider.
    let held = s.hold("DELETE FROM items WHERE id = 4");
    let id = review_id(&held.link);
    c.goto(&held.link).await.unwrap();
    let button = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("a.oidc-sign-in"))
        .await
        .expect("a sign-in button for the provider");
    let label = button.text().await.unwrap();
    assert_eq!(label, format!("Sign in with localhost:{}", idp.port));
    screenshots(&c, "login-oidc").await;
    button.click().await.unwrap();

    // The provider's own login form: alice (group sre at the provider), then its consent page.
    let login = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("input[name=login]"))
        .await
        .expect("the provider's login form");
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .starts_with(&idp.issuer));
    login.send_keys("alice").await.unwrap();
    c.find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys("any")
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let consent = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::XPath(
            "//form[input[@name='prompt' and @value='consent']]//button",
        ))
        .await
        .expect("the provider's consent page");
    consent.click().await.unwrap();

    // Back on the review the link named, signed in as alice with the token's groups.
    expect_text(&c, "#status", "pending").await;
    assert_eq!(
        c.current_url().await.unwrap().path(),
        format!("/reviews/{id}")
    );
    assert!(text_of(&c, ".who").await.contains("alice"));
    c.find(Locator::Css("#approve-reason"))
        .await
        .unwrap()
        .send_keys("alice via the IdP")
        .await
        .unwrap();
    c.find(Locator::Css("#approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    expect_text(&c, "#status", "approved").await;
    expect_text(&c, "#decided-by", "alice").await;
    let out = held.child.wait_with_output().unwrap();
    let err = held.stderr.join().unwrap();
    assert!(out.status.success(), "{err}");
    assert!(stdout(&out).contains("DELETE 1"), "{}", stdout(&out));

    // The session cookie the callback set: Secure, HttpOnly, SameSite=Lax, host-only.
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|k| k.name() == "__Host-tollgate_console")
        .expect("a console session cookie");
    assert_eq!(session.secure(), Some(true));
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Lax)");
    assert!(
        cookies.iter().all(|k| k.name() != "__Host-tollgate_oidc"),
        "the pre-login cookie is cleared"
    );

    // Errors, with curl as the browser: a declined consent ...
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("cas.pem");
    std::fs::write(
        &bundle,
        [&idp.ca, &s.env.pki.ca]
            .map(|p| std::fs::read_to_string(p).unwrap())
            .concat(),
    )
    .unwrap();
    let start = format!("{}/auth/oidc/start?next=/reviews", s.origin());
    let jar = tmp.path().join("declined");
    let Browsed::Left(back) = idp.browse_trusting(&start, "alice", Consent::Decline, &jar, &bundle)
    else {
        panic!("the provider did not redirect back");
    };
    assert!(
        back.starts_with(&format!("{}/auth/oidc/callback?", s.origin())),
        "{back}"
    );
    let with_jar = |jar: &Path, url: &str| s.curl(&["-b", &jar.display().to_string(), url]);
    let (status, head, body) = with_jar(&jar, &back);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("The sign-in was declined at the identity provider"),
        "{body}"
    );
    assert!(body.contains("/login"), "{body}");
    assert!(!head.contains("__Host-tollgate_console="), "{head}");
    // ... an answer whose state is not this browser's sign-in's ...
    let jar = tmp.path().join("state");
    let Browsed::Left(back) = idp.browse_trusting(&start, "alice", Consent::Approve, &jar, &bundle)
    else {
        panic!("the provider did not redirect back");
    };
    let forged = back.replace("state=", "state=x");
    let (status, head, body) = with_jar(&jar, &forged);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("does not belong to the sign-in this browser started"),
        "{body}"
    );
    assert!(!head.contains("__Host-tollgate_console="), "{head}");
    // ... and the genuine answer after that: the pending sign-in was used up.
    let (status, _, body) = with_jar(&jar, &back);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("expired, was already used, or was started in another browser"),
        "{body}"
    );
    // A code replayed into another browser (no pre-login cookie) is refused the same way.
    let (status, _, body) = s.curl(&[&back]);
    assert_eq!(status, 400, "{body}");

    // The sign-ins are audit events, with who and the outcome (never the code or token).
    let is_callback = |e: &&Value| e["payload"]["route"] == "/auth/oidc/callback";
    let events = s.env.events_until("five sign-in callbacks", |evs| {
        evs.iter().filter(is_callback).count() >= 5
    });
    let callbacks: Vec<&Value> = events.iter().filter(is_callback).collect();
    let outcomes: Vec<&str> = callbacks
        .iter()
        .filter_map(|e| e["payload"]["outcome"].as_str())
        .collect();
    assert_eq!(
        outcomes,
        [
            "signed_in",
            "refused_by_provider",
            "state_mismatch",
            "no_pending_sign_in",
            "no_pending_sign_in"
        ],
        "{callbacks:#?}"
    );
    assert_eq!(callbacks[0]["payload"]["subject"], "alice");
    let code = query_of(&back, "code");
    assert!(!serde_json::to_string(&events).unwrap().contains(&code));
}

/// A provider whose web client is confidential (Google, Entra, Okta web apps): the console
/// redeems the code with `client_secret_file`'s secret (HTTP Basic), read at each sign-in, so a
/// wrong or rotated secret needs no restart; without the right secret nobody signs in.
#[test]
fn a_confidential_client_signs_in_with_its_secret() {
    let https = tollgate_testsupport::free_port();
    let tmp = tempfile::tempdir().unwrap();
    let mut idp = Idp::new(tmp.path(), tollgate_testsupport::free_port(), "keys");
    idp.redirect_uris = vec![format!("https://localhost:{https}/auth/oidc/callback")];
    idp.up();
    let secret = tmp.path().join("console.secret");
    std::fs::write(&secret, "wrong-secret\n").unwrap();
    let s = start_with(
        https,
        &format!(
            "\n[[identity.oidc]]\nissuer = \"{}\"\nca = \"{}\"\nclient_id = \"tollgate-console\"\nclient_secret_file = \"{}\"\naudiences = [\"tollgate\"]\n",
            idp.issuer,
            idp.ca.display(),
            secret.display()
        ),
    );
    let bundle = tmp.path().join("cas.pem");
    std::fs::write(
        &bundle,
        [&idp.ca, &s.env.pki.ca]
            .map(|p| std::fs::read_to_string(p).unwrap())
            .concat(),
    )
    .unwrap();
    let start = format!("{}/auth/oidc/start?next=/reviews", s.origin());
    let sign_in = |jar: &str| {
        let jar = tmp.path().join(jar);
        let Browsed::Left(back) =
            idp.browse_trusting(&start, "alice", Consent::Approve, &jar, &bundle)
        else {
            panic!("the provider did not redirect back");
        };
        s.curl(&["-b", &jar.display().to_string(), &back])
    };
    // The wrong secret: the provider refuses the code, and the person is told so.
    let (status, head, body) = sign_in("wrong");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("did not accept this sign-in's code"),
        "{body}"
    );
    assert!(!head.contains("__Host-tollgate_console="), "{head}");
    // The right one, read at the next sign-in: alice is in.
    std::fs::write(&secret, "console-secret-4d1f\n").unwrap();
    let (status, head, body) = sign_in("right");
    assert_eq!(status, 303, "{head}{body}");
    assert!(head.contains("__Host-tollgate_console="), "{head}");
    // The secret is in no log and no audit event.
    assert!(!s.env.gw.logs().contains("console-secret-4d1f"));
    let events = s.env.events();
    assert!(!serde_json::to_string(&events)
        .unwrap()
        .contains("console-secret-4d1f"));
}

fn query_of(url: &str, name: &str) -> String {
    url.split_once('?')
        .unwrap()
        .1
        .split('&')
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .unwrap()
        .to_string()
}
