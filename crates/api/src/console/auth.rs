//! Who is using the console: console sessions (the `__Host-tollgate_console` cookie, bound in
//! memory to the credential that signed in), their CSRF tokens, and the same-origin check of
//! every POST. Pure over headers and a map; no sockets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::header::{HeaderMap, COOKIE, HOST, ORIGIN};
use tollgate_identity::Identity;

/// The console session cookie. `__Host-`: Secure, Path=/, no Domain, so no sibling host and no
/// resource under `/r/` (whose cookie filter strips `__Host-tollgate*`) can set or read it.
pub(crate) const COOKIE_NAME: &str = "__Host-tollgate_console";
/// Double-submit cookie of the sign-in form (there is no console session yet to bind it to).
pub(crate) const LOGIN_COOKIE: &str = "__Host-tollgate_login";
/// A console session lasts this long from sign-in, and never past its credential.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(3600);
pub(crate) const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Console sessions held at once; past it sign-ins are refused until some expire.
const MAX_SESSIONS: usize = 10_000;
/// Console sessions of one principal; a new one ends its oldest.
const MAX_PER_PRINCIPAL: usize = 16;

/// What signed a console session in.
#[derive(Clone)]
pub(crate) enum Credential {
    /// The connection's verified client certificate (checked again on every request).
    Certificate,
    /// A service or OIDC token, kept in memory only and verified again on every request, so a
    /// token removed by a reload (or an expired OIDC token) ends the console session too.
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
    pub expires: Instant,
}

/// The console sessions of this process.
#[derive(Default)]
pub struct ConsoleSessions {
    map: Mutex<HashMap<String, Entry>>,
    /// OIDC sign-ins sent to the provider and not back yet.
    pub(crate) sign_ins: super::oidc::PendingSignIns,
}

impl ConsoleSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session for `who`: its cookie value (`None` when the table is full). A certificate's
    /// session is shared by its principal's requests (the cookie alone grants nothing: the
    /// certificate is checked on every request), so clients without a cookie jar add none.
    pub(crate) fn create(&self, who: &Identity, credential: Credential) -> Option<(String, Entry)> {
        let now = Instant::now();
        let ttl = match who.expires_at {
            Some(t) => t
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(SESSION_TTL),
            None => SESSION_TTL,
        };
        let entry = Entry {
            credential,
            principal: who.principal.as_str().to_string(),
            csrf: random_hex(),
            expires: now + ttl,
        };
        let mut map = self.lock();
        if matches!(entry.credential, Credential::Certificate) {
            if let Some((id, e)) = map.iter().find(|(_, e)| {
                matches!(e.credential, Credential::Certificate)
                    && e.principal == entry.principal
                    && e.expires > now
            }) {
                return Some((id.clone(), e.clone()));
            }
        }
        let mine: Vec<(String, Instant)> = map
            .iter()
            .filter(|(_, e)| e.principal == entry.principal)
            .map(|(id, e)| (id.clone(), e.expires))
            .collect();
        if mine.len() >= MAX_PER_PRINCIPAL {
            if let Some((oldest, _)) = mine.iter().min_by_key(|(_, exp)| *exp) {
                map.remove(oldest);
            }
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, e| e.expires > now);
            if map.len() >= MAX_SESSIONS {
                return None;
            }
        }
        let id = random_hex();
        map.insert(id.clone(), entry.clone());
        Some((id, entry))
    }

    pub(crate) fn get(&self, id: &str) -> Option<Entry> {
        let mut map = self.lock();
        match map.get(id) {
            Some(e) if e.expires > Instant::now() => Some(e.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
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

    #[test]
    fn sessions_are_bounded_per_principal_and_shared_by_a_certificate() {
        use tollgate_identity::AuthMethod;
        let sessions = ConsoleSessions::default();
        let alice = identity("alice", AuthMethod::Cert);
        let (a1, e1) = sessions.create(&alice, Credential::Certificate).unwrap();
        let (a2, e2) = sessions.create(&alice, Credential::Certificate).unwrap();
        assert_eq!(a1, a2, "one certificate session per principal");
        assert_eq!(e1.csrf, e2.csrf);
        assert_eq!(a1.len(), 64);

        let bot = identity("bot", AuthMethod::Token);
        let ids: Vec<String> = (0..MAX_PER_PRINCIPAL + 3)
            .map(|_| {
                sessions
                    .create(&bot, Credential::Token("t".into()))
                    .unwrap()
                    .0
            })
            .collect();
        let live = ids.iter().filter(|id| sessions.get(id).is_some()).count();
        assert_eq!(live, MAX_PER_PRINCIPAL);
        assert!(sessions.get(ids.last().unwrap()).is_some());
        assert!(sessions.get(&a1).is_some(), "others are untouched");
        sessions.remove(&a1);
        assert!(sessions.get(&a1).is_none());
        // A credential that ends sooner ends the session sooner.
        let mut short = identity("carol", AuthMethod::Token);
        short.expires_at = Some(std::time::SystemTime::now() - Duration::from_secs(1));
        let (c, _) = sessions
            .create(&short, Credential::Token("t".into()))
            .unwrap();
        assert!(sessions.get(&c).is_none());
    }

    #[test]
    fn csrf_comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
        assert!(!same("", "a"));
    }
}
