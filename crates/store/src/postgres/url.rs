//! The `postgres://` store URL: parsed here (pure), so that TLS and password rules are checked
//! before anything connects, and so that no secret can ever be part of the URL (it is logged).
//!
//! ```text
//! postgres://USER@HOST[:PORT]/DBNAME?sslrootcert=/etc/tollgate/store-ca.crt&password_env=TOLLGATE_STORE_PASSWORD
//! ```
//! - `sslmode`: `verify-full` (default; chain to `sslrootcert` and the host name must match),
//!   `verify-ca` (chain only) or `disable` (plaintext). `tollgate check` fails the last two.
//! - `sslrootcert`: the CA file; required unless `sslmode=disable` (no implicit system trust).
//! - `password_env=NAME` or `password_file=PATH`: where the password is. A password written
//!   in the URL itself is refused.
//! - `application_name`, `connect_timeout` (seconds, default 5).

use std::path::PathBuf;
use std::time::Duration;

use crate::StoreError;

/// TLS verification of the store connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgSslMode {
    VerifyFull,
    VerifyCa,
    Disable,
}

impl PgSslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PgSslMode::VerifyFull => "verify-full",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::Disable => "disable",
        }
    }
}

/// Where the store's password comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    None,
    Env(String),
    File(PathBuf),
}

/// A parsed `postgres://` store URL. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgStoreUrl {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub sslmode: PgSslMode,
    pub sslrootcert: Option<PathBuf>,
    pub password: PasswordSource,
    pub application_name: String,
    pub connect_timeout: Duration,
}

fn bad(msg: impl Into<String>) -> StoreError {
    StoreError::Unsupported(format!("invalid postgres store URL: {}", msg.into()))
}

fn percent_decode(s: &str) -> Result<String, StoreError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("a % escape is not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("an escaped part is not UTF-8"))
}

impl PgStoreUrl {
    /// True for `postgres://` and `postgresql://` URLs.
    pub fn is_postgres(url: &str) -> bool {
        url.starts_with("postgres://") || url.starts_with("postgresql://")
    }

    /// Parses a store URL. Errors never echo the URL (it could carry a password).
    pub fn parse(url: &str) -> Result<PgStoreUrl, StoreError> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("it must start with postgres://"))?;
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let user = match userinfo {
            Some(u) if u.contains(':') => {
                return Err(bad(
                    "it carries a password; remove it from the URL (URLs are logged) and name \
                     where it is with ?password_env=VARIABLE or ?password_file=PATH",
                ))
            }
            Some(u) => percent_decode(u)?,
            None => String::new(),
        };
        if user.is_empty() {
            return Err(bad(
                "it names no user; use postgres://USER@HOST:PORT/DBNAME",
            ));
        }
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (h, p) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("an IPv6 host is missing its closing ]"))?;
                (h.to_string(), p.strip_prefix(':').unwrap_or(p))
            }
            None => match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), ""),
            },
        };
        if host.is_empty() {
            return Err(bad(
                "it names no host; use postgres://USER@HOST:PORT/DBNAME",
            ));
        }
        let port = if port.is_empty() {
            5432
        } else {
            port.parse::<u16>()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?
        };
        let dbname = percent_decode(path)?;
        if dbname.is_empty() {
            return Err(bad(
                "it names no database; use postgres://USER@HOST:PORT/DBNAME",
            ));
        }
        let mut parsed = PgStoreUrl {
            user,
            host,
            port,
            dbname,
            sslmode: PgSslMode::VerifyFull,
            sslrootcert: None,
            password: PasswordSource::None,
            application_name: "tollgate".into(),
            connect_timeout: Duration::from_secs(5),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            match key {
                "sslmode" => {
                    parsed.sslmode = match value.as_str() {
                        "verify-full" => PgSslMode::VerifyFull,
                        "verify-ca" => PgSslMode::VerifyCa,
                        "disable" => PgSslMode::Disable,
                        other => {
                            return Err(bad(format!(
                                "sslmode={other} is not supported: use verify-full (the default), \
                                 verify-ca or disable"
                            )))
                        }
                    }
                }
                "sslrootcert" => parsed.sslrootcert = Some(PathBuf::from(value)),
                "password_env" => parsed.password = PasswordSource::Env(value),
                "password_file" => parsed.password = PasswordSource::File(PathBuf::from(value)),
                "application_name" => parsed.application_name = value,
                "connect_timeout" => {
                    let secs: u64 = value
                        .parse()
                        .map_err(|_| bad("connect_timeout is a number of seconds"))?;
                    parsed.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "password" => {
                    return Err(bad(
                        "it carries a password; name where it is with ?password_env=VARIABLE or \
                         ?password_file=PATH instead",
                    ))
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: sslmode, sslrootcert, password_env, \
                         password_file, application_name, connect_timeout)"
                    )))
                }
            }
        }
        if parsed.sslmode != PgSslMode::Disable && parsed.sslrootcert.is_none() {
            return Err(bad(format!(
                "sslmode={} needs sslrootcert=PATH, the CA that signed the store server's \
                 certificate (tollgate trusts no implicit CA)",
                parsed.sslmode.as_str()
            )));
        }
        Ok(parsed)
    }

    /// Reads the password from its source, now (so a rotated file is picked up on reconnect).
    pub fn password(&self) -> Result<Option<String>, StoreError> {
        match &self.password {
            PasswordSource::None => Ok(None),
            PasswordSource::Env(name) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Some(v)),
                _ => Err(StoreError::Unsupported(format!(
                    "the store password variable {name} is not set (password_env in the store URL)"
                ))),
            },
            PasswordSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) => Ok(Some(v.trim_end_matches(['\r', '\n']).to_string())),
                Err(e) => Err(StoreError::Unsupported(format!(
                    "cannot read the store password file {}: {e}",
                    path.display()
                ))),
            },
        }
    }

    /// `user@host:port/dbname`: how logs and errors name the store.
    pub fn display_target(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form_with_verify_full_by_default() {
        let u = PgStoreUrl::parse(
            "postgres://tollgate@db.internal:6543/audit?sslrootcert=/etc/ca.crt&password_env=PW",
        )
        .unwrap();
        assert_eq!(u.user, "tollgate");
        assert_eq!(u.host, "db.internal");
        assert_eq!(u.port, 6543);
        assert_eq!(u.dbname, "audit");
        assert_eq!(u.sslmode, PgSslMode::VerifyFull);
        assert_eq!(
            u.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca.crt"))
        );
        assert_eq!(u.password, PasswordSource::Env("PW".into()));
        let u = PgStoreUrl::parse("postgresql://a%40b@[::1]/d%20b?sslmode=disable").unwrap();
        assert_eq!(
            (u.user.as_str(), u.host.as_str(), u.port),
            ("a@b", "::1", 5432)
        );
        assert_eq!(u.dbname, "d b");
        assert_eq!(u.sslmode, PgSslMode::Disable);
    }

    #[test]
    fn refuses_passwords_in_the_url_without_echoing_them() {
        for url in [
            "postgres://u:hunter2@db/x?sslrootcert=/ca",
            "postgres://u@db/x?sslrootcert=/ca&password=hunter2",
        ] {
            let msg = PgStoreUrl::parse(url).unwrap_err().to_string();
            assert!(msg.contains("password_env"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn verification_needs_a_ca_and_weak_modes_are_named() {
        let msg = PgStoreUrl::parse("postgres://u@db/x")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sslrootcert=PATH"), "{msg}");
        let msg = PgStoreUrl::parse("postgres://u@db/x?sslmode=require&sslrootcert=/ca")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sslmode=require is not supported"), "{msg}");
        let msg = PgStoreUrl::parse("postgres://u@db/x?sslrootcert=/ca&tls=1")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown parameter \"tls\""), "{msg}");
        assert!(PgStoreUrl::parse("postgres://u@db:99999/x?sslmode=disable").is_err());
        assert!(PgStoreUrl::parse("postgres://db/x?sslmode=disable").is_err());
        assert!(PgStoreUrl::parse("postgres://u@db?sslmode=disable").is_err());
    }

    #[test]
    fn password_comes_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let url = format!(
            "postgres://u@db/x?sslmode=disable&password_file={}",
            file.display()
        );
        let u = PgStoreUrl::parse(&url).unwrap();
        assert_eq!(u.password().unwrap().as_deref(), Some("s3cret"));
        let u = PgStoreUrl::parse(
            "postgres://u@db/x?sslmode=disable&password_env=TOLLGATE_TEST_UNSET_VARIABLE",
        )
        .unwrap();
        let msg = u.password().unwrap_err().to_string();
        assert!(
            msg.contains("TOLLGATE_TEST_UNSET_VARIABLE is not set"),
            "{msg}"
        );
    }
}
