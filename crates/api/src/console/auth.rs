//! Who is using the console: console sessions (the `__Host-tollgate_console` cookie, bound to
//! the credential that signed in), their CSRF tokens, and the same-origin check of every POST.
//!
//! A console session lives in the store (shared by the replicas, so any of them serves a
//! signed-in browser) under the SHA-256 of its cookie: whoever reads the store cannot present
//! a cookie they do not have. A token sign-in keeps its token sealed (ChaCha20-Poly1305) with a
//! key derived from the cookie (HKDF-SHA256), so only the browser holding the cookie unlocks it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::header::{HeaderMap, COOKIE, HOST, ORIGIN};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use tollgate_identity::Identity;
use tollgate_store::{unix_ms, Store};

/// The console session cookie. `__Host-`: Secure, Path=/, no Domain, so no sibling host and no
/// resource under `/r/` (whose cookie filter strips `__Host-tollgate*`) can set or read it.
pub(crate) const COOKIE_NAME: &str = "__Host-tollgate_console";
/// Double-submit cookie of the sign-in form (there is no console session yet to bind it to).
pub(crate) const LOGIN_COOKIE: &str = "__Host-tollgate_login";
/// A console session lasts this long from sign-in, and never past its credential.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(3600);
pub(crate) const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Console sessions this process opens within [`SESSION_TTL`]; past it sign-ins are refused
/// until that hour moves on.
const MAX_SESSIONS: usize = 10_000;
/// Console sessions of one principal opened through this process; a new one ends its oldest.
const MAX_PER_PRINCIPAL: usize = 16;
/// What a sign-in is told when no session could be opened.
pub(crate) const NO_SESSION: &str = "The gateway cannot open a console session right now: too many were opened in the last hour, or its store is unavailable.";
/// The store's kind for console sessions (keyed by the cookie's SHA-256).
const KIND_SESSION: &str = "console.session";

/// What signed a console session in.
#[derive(Clone)]
pub(crate) enum Credential {
    /// The connection's verified client certificate (checked again on every request).
    Certificate,
    /// A service or OIDC token, stored sealed under the cookie and verified again on every
    /// request, so a token removed by a reload (or an expired OIDC token) ends the session too.
    Token(String),
    /// A SAML sign-in (the identity from the verified assertion; nothing to check again).
    Saml(Identity),
}

#[derive(Clone)]
pub(crate) struct Entry {
    pub credential: Credential,
    /// The principal that signed in; a request whose credential resolves elsewhere is refused.
    pub principal: String,
    pub csrf: String,
    pub expires: SystemTime,
}

/// [`Entry`] as the store keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    principal: String,
    csrf: String,
    expires_ms: i64,
    credential: StoredCredential,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredCredential {
    Certificate,
    /// Hex of nonce ‖ ciphertext ‖ tag (see [`seal`]).
    Token(String),
    Saml {
        identity: Identity,
        expires_ms: Option<i64>,
    },
}

/// Sign-ins this process started within a window: the cap on what it adds to the store.
#[derive(Default)]
pub(crate) struct Admissions {
    started: Mutex<VecDeque<Instant>>,
}

impl Admissions {
    /// Room for one more within `window` (false past `max`).
    pub(crate) fn admit(&self, window: Duration, max: usize) -> bool {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while started
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            started.pop_front();
        }
        if started.len() >= max {
            return false;
        }
        started.push_back(now);
        true
    }
}

/// The console sessions, in the store; what this process remembers of those it opened.
#[derive(Default)]
pub struct ConsoleSessions {
    opened: Admissions,
    /// A certificate principal's shared session on this replica: (cookie, entry).
    certificates: Mutex<HashMap<String, (String, Entry)>>,
    /// Sessions this process opened per principal: (cookie digest, expiry).
    by_principal: Mutex<HashMap<String, Vec<(String, SystemTime)>>>,
    /// OIDC sign-ins sent to the provider and not back yet.
    pub(crate) sign_ins: Admissions,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn from_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl ConsoleSessions {
    /// A session for `who`: its cookie value (`None` when this process opened too many, or the
    /// store failed). A certificate's session is shared by its principal's requests (the
    /// cookie alone grants nothing: the certificate is checked on every request), so clients
    /// without a cookie jar add none.
    pub(crate) async fn create(
        &self,
        store: &Arc<dyn Store>,
        who: &Identity,
        credential: Credential,
    ) -> Option<(String, Entry)> {
        let principal = who.principal.as_str().to_string();
        if matches!(credential, Credential::Certificate) {
            if let Some(shared) = self.shared_certificate(store, &principal).await {
                return Some(shared);
            }
        }
        if !self.opened.admit(SESSION_TTL, MAX_SESSIONS) {
            return None;
        }
        let now = SystemTime::now();
        let ttl = who
            .expires_at
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
            .map_or(SESSION_TTL, |t| t.min(SESSION_TTL));
        let entry = Entry {
            credential,
            principal,
            csrf: random_hex(),
            expires: now + ttl,
        };
        let id = random_hex();
        let key = super::saml::digest(&id);
        let value = serde_json::to_string(&stored(&entry, &id, &key)).ok()?;
        let (s, k, expires) = (store.clone(), key.clone(), unix_ms(entry.expires));
        let put = move || s.once_put(KIND_SESSION, &k, &value, expires, unix_ms(now));
        match super::saml::blocking(put).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "console: the session could not be stored");
                return None;
            }
        }
        self.end_oldest(store, &entry, key).await;
        if matches!(entry.credential, Credential::Certificate) {
            lock(&self.certificates).insert(entry.principal.clone(), (id.clone(), entry.clone()));
        }
        Some((id, entry))
    }

    /// The live certificate session of `principal` this replica opened, if the store still
    /// has it (a sign-out on another replica deletes it there).
    async fn shared_certificate(
        &self,
        store: &Arc<dyn Store>,
        principal: &str,
    ) -> Option<(String, Entry)> {
        let (id, entry) = lock(&self.certificates).get(principal).cloned()?;
        if entry.expires > SystemTime::now() && self.get(store, &id).await.is_some() {
            return Some((id, entry));
        }
        lock(&self.certificates).remove(principal);
        None
    }

    /// Records the session under `key`; past [`MAX_PER_PRINCIPAL`] the principal's oldest ends.
    async fn end_oldest(&self, store: &Arc<dyn Store>, entry: &Entry, key: String) {
        let oldest = {
            let mut map = lock(&self.by_principal);
            let mine = map.entry(entry.principal.clone()).or_default();
            let now = SystemTime::now();
            mine.retain(|(_, exp)| *exp > now);
            mine.push((key, entry.expires));
            (mine.len() > MAX_PER_PRINCIPAL).then(|| {
                let i = (0..mine.len()).min_by_key(|i| mine[*i].1).unwrap_or(0);
                mine.remove(i).0
            })
        };
        if let Some(key) = oldest {
            take(store, key).await;
        }
    }

    /// The live session of cookie `id`.
    pub(crate) async fn get(&self, store: &Arc<dyn Store>, id: &str) -> Option<Entry> {
        let (s, key) = (store.clone(), super::saml::digest(id));
        let k = key.clone();
        let now = unix_ms(SystemTime::now());
        let value = match super::saml::blocking(move || s.once_get(KIND_SESSION, &k, now)).await {
            Ok(v) => v?,
            Err(e) => {
                tracing::warn!(error = %e, "console: the session could not be read");
                return None;
            }
        };
        let stored: Stored = serde_json::from_str(&value).ok()?;
        let credential = match stored.credential {
            StoredCredential::Certificate => Credential::Certificate,
            StoredCredential::Token(sealed) => Credential::Token(open(id, &key, &sealed)?),
            StoredCredential::Saml {
                mut identity,
                expires_ms,
            } => {
                identity.expires_at = expires_ms.map(from_ms);
                Credential::Saml(identity)
            }
        };
        Some(Entry {
            credential,
            principal: stored.principal,
            csrf: stored.csrf,
            expires: from_ms(stored.expires_ms),
        })
    }

    /// Ends the session of cookie `id` on every replica.
    pub(crate) async fn remove(&self, store: &Arc<dyn Store>, id: &str) {
        lock(&self.certificates).retain(|_, (c, _)| c != id);
        take(store, super::saml::digest(id)).await;
    }
}

async fn take(store: &Arc<dyn Store>, key: String) {
    let s = store.clone();
    let now = unix_ms(SystemTime::now());
    if let Err(e) = super::saml::blocking(move || s.once_take(KIND_SESSION, &key, now)).await {
        tracing::warn!(error = %e, "console: the session could not be deleted");
    }
}

/// What the store keeps of `entry`, opened by cookie `id` under `key`.
fn stored(entry: &Entry, id: &str, key: &str) -> Stored {
    Stored {
        principal: entry.principal.clone(),
        csrf: entry.csrf.clone(),
        expires_ms: unix_ms(entry.expires),
        credential: match &entry.credential {
            Credential::Certificate => StoredCredential::Certificate,
            Credential::Token(t) => StoredCredential::Token(seal(id, key, t)),
            Credential::Saml(who) => StoredCredential::Saml {
                identity: who.clone(),
                expires_ms: who.expires_at.map(unix_ms),
            },
        },
    }
}

/// The key sealing a session's token: HKDF-SHA256 of the cookie value.
fn cookie_key(cookie: &str) -> LessSafeKey {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"tollgate console session");
    let prk = salt.extract(cookie.as_bytes());
    let info: &[&[u8]] = &[b"token"];
    let okm = prk
        .expand(info, &CHACHA20_POLY1305)
        .expect("a 32-byte key is within HKDF-SHA256's output");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// `token` sealed under cookie `id`'s key, bound to the row `key`: hex(nonce ‖ sealed).
fn seal(id: &str, key: &str, token: &str) -> String {
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .expect("the system random source works");
    let mut data = token.as_bytes().to_vec();
    cookie_key(id)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key.as_bytes()),
            &mut data,
        )
        .expect("a token is within ChaCha20-Poly1305's limits");
    hex::encode([nonce.as_slice(), &data].concat())
}

/// The token [`seal`] sealed, if cookie `id` unlocks it.
fn open(id: &str, key: &str, sealed: &str) -> Option<String> {
    let bytes = hex::decode(sealed).ok()?;
    let (nonce, data) = bytes.split_at_checked(NONCE_LEN)?;
    let mut data = data.to_vec();
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let plain = cookie_key(id)
        .open_in_place(nonce, Aad::from(key.as_bytes()), &mut data)
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

/// 32 random bytes, hex.
pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random source works");
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal contents, in time independent of where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name` in the request's Cookie headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// A `Set-Cookie` value for `name`: `Max-Age` 0 clears it.
pub(crate) fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age={}",
        max_age.as_secs()
    )
}

/// Why a POST is not accepted as the console's own.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CrossSite {
    /// `Sec-Fetch-Site` says another site (or a user-typed navigation) sent it.
    FetchSite(String),
    /// `Origin` is missing or is not this gateway's.
    Origin(Option<String>),
}

impl std::fmt::Display for CrossSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrossSite::FetchSite(s) => write!(f, "the form was sent from another site (Sec-Fetch-Site: {s})"),
            CrossSite::Origin(None) => write!(f, "the request has no Origin header; the console accepts forms only from its own pages"),
            CrossSite::Origin(Some(o)) => write!(f, "the form was sent from {o}, not from this console"),
        }
    }
}

/// Same origin only. `Sec-Fetch-Site`, which pages cannot set, decides when a browser sends it
/// (it must be `same-origin`); `Origin`, when it names one, must then be this gateway's too
/// (the console's `Referrer-Policy: no-referrer` makes browsers send `Origin: null` on its own
/// forms). Without `Sec-Fetch-Site`, `Origin` must be `https://` + this request's authority
/// (HTTP/2's `:authority`, else the Host header).
pub(crate) fn same_origin(authority: Option<&str>, headers: &HeaderMap) -> Result<(), CrossSite> {
    let origin = headers
        .get(ORIGIN)
        .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
    let host = authority.or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()));
    let ours = |o: &str| host.is_some_and(|h| o.eq_ignore_ascii_case(&format!("https://{h}")));
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = String::from_utf8_lossy(site.as_bytes()).into_owned();
        if site != "same-origin" {
            return Err(CrossSite::FetchSite(site));
        }
        return match &origin {
            Some(o) if o != "null" && !ours(o) => Err(CrossSite::Origin(origin)),
            _ => Ok(()),
        };
    }
    match &origin {
        Some(o) if ours(o) => Ok(()),
        _ => Err(CrossSite::Origin(origin)),
    }
}

/// Where to go after signing in: a path on this console only (never `//host` or a URL).
pub(crate) fn local_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.starts_with("/r/")
                && !n.starts_with("/api/")
                && !n.chars().any(|c| c.is_control()) =>
        {
            n.to_string()
        }
        _ => "/reviews".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_same_origin_posts_pass() {
        let ok = headers(&[
            ("host", "gw.example:8443"),
            ("origin", "https://gw.example:8443"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(same_origin(None, &ok), Ok(()));
        let no_fetch_meta = headers(&[
            ("host", "gw.example:8443"),
            ("origin", "https://gw.example:8443"),
        ]);
        assert_eq!(same_origin(None, &no_fetch_meta), Ok(()));
        // A browser's own form under Referrer-Policy: no-referrer.
        let null_origin = headers(&[
            ("host", "gw.example:8443"),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(same_origin(None, &null_origin), Ok(()));
        let null_without_fetch_meta = headers(&[("host", "gw.example:8443"), ("origin", "null")]);
        assert!(same_origin(None, &null_without_fetch_meta).is_err());
        let mismatch = headers(&[
            ("host", "gw.example:8443"),
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(same_origin(None, &mismatch).is_err());
        // HTTP/2: the authority comes from the request line, not a Host header.
        let h2 = headers(&[("origin", "https://gw.example:8443")]);
        assert_eq!(same_origin(Some("gw.example:8443"), &h2), Ok(()));
        assert!(same_origin(Some("other.example"), &h2).is_err());
        let cross = headers(&[
            ("host", "gw.example:8443"),
            ("origin", "https://gw.example:8443"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(matches!(
            same_origin(None, &cross),
            Err(CrossSite::FetchSite(_))
        ));
        for bad in [
            "https://evil.example",
            "http://gw.example:8443",
            "https://gw.example:8444",
            "null",
        ] {
            let mut h = headers(&[("host", "gw.example:8443")]);
            h.insert("origin", HeaderValue::from_static(bad));
            assert!(same_origin(None, &h).is_err(), "{bad}");
        }
        assert_eq!(
            same_origin(None, &headers(&[("host", "gw.example:8443")])),
            Err(CrossSite::Origin(None))
        );
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = headers(&[
            ("cookie", "a=1; __Host-tollgate_console=abc"),
            ("cookie", "__Host-tollgate_console_x=no"),
        ]);
        assert_eq!(cookie(&h, COOKIE_NAME).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "b"), None);
        assert_eq!(
            set_cookie(COOKIE_NAME, "ff", SESSION_TTL),
            "__Host-tollgate_console=ff; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age=3600"
        );
    }

    #[test]
    fn next_stays_on_the_console() {
        assert_eq!(local_next(Some("/reviews/rv_1")), "/reviews/rv_1");
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "/r/app/",
            "/api/v1/reviews",
            "reviews",
        ] {
            assert_eq!(local_next(Some(bad)), "/reviews", "{bad}");
        }
        assert_eq!(local_next(None), "/reviews");
    }

    fn identity(subject: &str, method: tollgate_identity::AuthMethod) -> Identity {
        Identity {
            subject: subject.into(),
            principal: match method {
                tollgate_identity::AuthMethod::Cert => {
                    tollgate_identity::Principal::certificate(subject)
                }
                _ => tollgate_identity::Principal::token(subject),
            },
            groups: vec!["sre".into()],
            method,
            cert_fingerprint: None,
            cert_not_after: None,
            expires_at: None,
        }
    }

    fn store() -> Arc<dyn Store> {
        Arc::new(tollgate_store::SqliteStore::open_in_memory().unwrap())
    }

    /// The store's row of cookie `id`, as a store reader sees it.
    fn row(store: &Arc<dyn Store>, id: &str) -> Option<String> {
        let now = unix_ms(SystemTime::now());
        let key = crate::console::saml::digest(id);
        store.once_get(KIND_SESSION, &key, now).unwrap()
    }

    #[tokio::test]
    async fn sessions_are_bounded_per_principal_and_shared_by_a_certificate() {
        use tollgate_identity::AuthMethod;
        let (sessions, store) = (ConsoleSessions::default(), store());
        let alice = identity("alice", AuthMethod::Cert);
        let (a1, e1) = sessions
            .create(&store, &alice, Credential::Certificate)
            .await
            .unwrap();
        let (a2, e2) = sessions
            .create(&store, &alice, Credential::Certificate)
            .await
            .unwrap();
        assert_eq!(a1, a2, "one certificate session per principal");
        assert_eq!(e1.csrf, e2.csrf);
        assert_eq!(a1.len(), 64);

        let bot = identity("bot", AuthMethod::Token);
        let mut ids = Vec::new();
        for _ in 0..MAX_PER_PRINCIPAL + 3 {
            let c = Credential::Token("t".into());
            ids.push(sessions.create(&store, &bot, c).await.unwrap().0);
        }
        let mut live = 0;
        for id in &ids {
            live += usize::from(sessions.get(&store, id).await.is_some());
        }
        assert_eq!(live, MAX_PER_PRINCIPAL);
        assert!(sessions.get(&store, ids.last().unwrap()).await.is_some());
        assert!(
            sessions.get(&store, &a1).await.is_some(),
            "others are untouched"
        );
        sessions.remove(&store, &a1).await;
        assert!(sessions.get(&store, &a1).await.is_none());
        let (a3, _) = sessions
            .create(&store, &alice, Credential::Certificate)
            .await
            .unwrap();
        assert_ne!(
            a3, a1,
            "a signed-out certificate session is not handed out again"
        );
        // A credential that ends sooner ends the session sooner.
        let mut short = identity("carol", AuthMethod::Token);
        short.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
        let (c, _) = sessions
            .create(&store, &short, Credential::Token("t".into()))
            .await
            .unwrap();
        assert!(sessions.get(&store, &c).await.is_none());
    }

    #[tokio::test]
    async fn the_store_holds_neither_the_cookie_nor_the_token() {
        use tollgate_identity::AuthMethod;
        let (store, token) = (store(), "tg_secret_service_token_value");
        let bot = identity("bot", AuthMethod::Token);
        let (sessions, other_replica) = (ConsoleSessions::default(), ConsoleSessions::default());
        let (id, _) = sessions
            .create(&store, &bot, Credential::Token(token.into()))
            .await
            .unwrap();
        let value = row(&store, &id).expect("the session is in the store");
        assert!(!value.contains(token) && !value.contains(&id), "{value}");
        let entry = other_replica.get(&store, &id).await.unwrap();
        assert!(matches!(entry.credential, Credential::Token(t) if t == token));
        // A store reader who moves a sealed token onto a row of their own learns nothing.
        let (mine, _) = sessions
            .create(&store, &bot, Credential::Token("other".into()))
            .await
            .unwrap();
        let sealed: Stored = serde_json::from_str(&value).unwrap();
        let StoredCredential::Token(sealed) = sealed.credential else {
            panic!("a token session");
        };
        assert_eq!(open(&mine, &saml_key(&mine), &sealed), None);
        assert_eq!(
            open(&id, &saml_key(&mine), &sealed),
            None,
            "bound to its row"
        );
        assert_eq!(open(&id, &saml_key(&id), &sealed).as_deref(), Some(token));

        let mut person = identity("dana", AuthMethod::Saml);
        person.expires_at = Some(SystemTime::now() + Duration::from_secs(60));
        let (s, _) = sessions
            .create(&store, &person, Credential::Saml(person.clone()))
            .await
            .unwrap();
        let entry = other_replica.get(&store, &s).await.unwrap();
        let Credential::Saml(back) = entry.credential else {
            panic!("a SAML session");
        };
        assert_eq!(
            (back.subject.as_str(), back.method),
            ("dana", AuthMethod::Saml)
        );
        assert_eq!(
            (back.principal, back.groups),
            (person.principal, person.groups)
        );
        assert!(entry.expires <= SystemTime::now() + Duration::from_secs(60));
        other_replica.remove(&store, &s).await;
        assert!(
            sessions.get(&store, &s).await.is_none(),
            "signed out everywhere"
        );
    }

    fn saml_key(id: &str) -> String {
        crate::console::saml::digest(id)
    }

    #[test]
    fn csrf_comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
        assert!(!same("", "a"));
    }
}
