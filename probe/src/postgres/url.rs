//! Postgres URLs as libpq reads them, for every connection rekey makes
//! (its own store, the `postgres` kind, the sidecar's validation,
//! re-encryption): `sslmode` (`disable`, `allow`, `prefer`, `require`,
//! `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system`),
//! and `sslcert` / `sslkey` for a client certificate.
//!
//! sqlx does TLS itself; this module gives its URL libpq's meaning first:
//! - `require` with an `sslrootcert` file verifies the CA, as libpq's does;
//! - `sslrootcert=system` trusts the public CAs and means `verify-full`
//!   (PostgreSQL 16's rule; a weaker mode beside it is refused);
//! - `allow` tries TLS first, as `prefer` does (libpq tries without TLS
//!   first; either way the connection is made when the server takes it);
//! - a file named in the URL that cannot be read is named in the error,
//!   before anything connects.
//!
//! A failure then reads as one line that says which way it went wrong:
//! [`PgUrl::reason`].

use std::fmt;
use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use zeroize::Zeroizing;

use crate::error::{Error, Service};

/// libpq's `sslmode`, as the URL gave it (`None`: the default, prefer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The names libpq takes, weakest first.
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The name as libpq spells it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn sqlx(self) -> PgSslMode {
        match self {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| Error::Config {
                service: Service::Postgres,
                setting: "sslmode",
                reason: format!(
                    "{s:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            })
    }
}

/// The TLS settings of a URL, for the messages and for apps' URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// As written; `None` is libpq's default, `prefer`.
    pub mode: Option<SslMode>,
    /// `sslrootcert` as written (a path, or `system`).
    pub root_cert: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

impl TlsParams {
    /// The mode libpq applies: `prefer` when none is given; `verify-ca`
    /// for `require` with a CA file; `verify-full` for
    /// `sslrootcert=system` without a mode.
    #[must_use]
    pub fn effective(&self) -> SslMode {
        let system = self.root_cert.as_deref() == Some("system");
        match (self.mode, &self.root_cert) {
            (None, _) if system => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
            (Some(SslMode::Require), Some(_)) if !system => SslMode::VerifyCa,
            (Some(m), _) => m,
        }
    }

    /// The query parameters that carry these settings to an app, as
    /// `key=value` pairs (empty for the default).
    #[must_use]
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(m) = self.mode {
            q.push(("sslmode", m.as_str().to_string()));
        }
        for (k, v) in [
            ("sslrootcert", &self.root_cert),
            ("sslcert", &self.client_cert),
            ("sslkey", &self.client_key),
        ] {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        q
    }

    /// The CAs a verifying mode trusts, as messages name them.
    fn trust(&self) -> String {
        match self.root_cert.as_deref() {
            None | Some("system") => "the public CAs (webpki-roots)".into(),
            Some(path) => format!("the CA file {path}"),
        }
    }
}

/// A Postgres URL read as libpq reads it. Holds the URL (it may carry a
/// password): zeroed on drop, never shown.
pub struct PgUrl {
    original: Zeroizing<String>,
    /// The URL with libpq's meaning made explicit for sqlx.
    rewritten: Zeroizing<String>,
    tls: TlsParams,
    options: PgConnectOptions,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgUrl")
            .field("target", &self.target())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl PgUrl {
    /// Parses `url`, checks its TLS settings and the files they name.
    ///
    /// # Errors
    /// [`Error::Url`] when it is not a `postgres://` URL (the URL is not
    /// repeated); [`Error::Config`] for an unknown `sslmode`, a file that
    /// cannot be read, a client certificate without its key, or a weak
    /// mode beside `sslrootcert=system`.
    pub fn parse(url: &str) -> Result<PgUrl, Error> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(not_a_url());
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q.split('#').next().unwrap_or(q)),
            None => (url.split('#').next().unwrap_or(url), ""),
        };
        let mut tls = TlsParams::default();
        let mut kept: Vec<Zeroizing<String>> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = || super::percent_decode(v).as_str().to_string();
            match k {
                "sslmode" | "ssl-mode" => tls.mode = Some(value().parse()?),
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => tls.root_cert = Some(value()),
                "sslcert" | "ssl-cert" => tls.client_cert = Some(value()),
                "sslkey" | "ssl-key" => tls.client_key = Some(value()),
                _ => kept.push(Zeroizing::new(pair.to_string())),
            }
        }
        let effective = tls.effective();
        let system = tls.root_cert.as_deref() == Some("system");
        if system && effective != SslMode::VerifyFull {
            return Err(Error::Config {
                service: Service::Postgres,
                setting: "sslmode",
                reason: format!(
                    "{effective} may not be used with sslrootcert=system (use verify-full)"
                ),
            });
        }
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(Error::Config {
                service: Service::Postgres,
                setting: "sslcert",
                reason: "and sslkey are given together or not at all".into(),
            });
        }
        for (setting, path) in [
            ("sslrootcert", tls.root_cert.as_ref().filter(|_| !system)),
            ("sslcert", tls.client_cert.as_ref()),
            ("sslkey", tls.client_key.as_ref()),
        ] {
            if let Some(p) = path
                && let Err(e) = std::fs::File::open(p)
            {
                return Err(Error::Config {
                    service: Service::Postgres,
                    setting,
                    reason: format!("{p}: cannot read it: {e}"),
                });
            }
        }
        // What sqlx is told: the effective mode, and the files but for
        // `system` (sqlx's roots are the public CAs already).
        let mut pairs: Vec<Zeroizing<String>> = kept;
        if tls.mode.is_some() || system {
            pairs.push(Zeroizing::new(format!("sslmode={effective}")));
        }
        for (k, v) in [
            ("sslrootcert", tls.root_cert.as_ref().filter(|_| !system)),
            ("sslcert", tls.client_cert.as_ref()),
            ("sslkey", tls.client_key.as_ref()),
        ] {
            if let Some(v) = v {
                pairs.push(Zeroizing::new(format!("{k}={}", encode_value(v))));
            }
        }
        let mut rewritten = Zeroizing::new(base.to_string());
        for (i, p) in pairs.iter().enumerate() {
            rewritten.push(if i == 0 { '?' } else { '&' });
            rewritten.push_str(p);
        }
        let options = PgConnectOptions::from_str(&rewritten)
            .map_err(|_| not_a_url())?
            .ssl_mode(effective.sqlx())
            .disable_statement_logging();
        Ok(PgUrl {
            original: Zeroizing::new(url.to_string()),
            rewritten,
            tls,
            options,
        })
    }

    /// Connect options: libpq's TLS meaning, statement logging off.
    #[must_use]
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// The URL with libpq's meaning made explicit, for sqlx's `Any`
    /// driver (rekey's own store), which takes a URL, not options.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.rewritten
    }

    /// The TLS settings as written.
    #[must_use]
    pub fn tls(&self) -> &TlsParams {
        &self.tls
    }

    /// `user@host:port/database`: what a message may say about a
    /// connection, scrubbed like any message (a name could be the
    /// password).
    #[must_use]
    pub fn target(&self) -> String {
        let o = &self.options;
        let host = match o.get_socket() {
            Some(s) => s.display().to_string(),
            None => format!("{}:{}", o.get_host(), o.get_port()),
        };
        let shown = match o.get_database() {
            Some(db) => format!("{}@{host}/{db}", o.get_username()),
            None => format!("{}@{host}", o.get_username()),
        };
        self.scrub(&shown)
    }

    /// `msg` without the URL or its password.
    #[must_use]
    pub fn scrub(&self, msg: &str) -> String {
        super::scrub(msg, &self.original)
    }

    /// Why connecting failed, in one line: which way TLS went wrong
    /// (wrong CA, wrong host name, no TLS at the server, a server that
    /// takes only TLS, a refused client certificate), else the server's or
    /// the driver's own message. Scrubbed.
    #[must_use]
    pub fn reason(&self, e: &sqlx::Error) -> String {
        let host = self.options.get_host();
        let mode = self.tls.effective();
        let why = match e {
            sqlx::Error::Io(io) => crate::tls::io_reason(io, host, &self.tls.trust()),
            sqlx::Error::Tls(inner) => match inner.downcast_ref::<rustls::Error>() {
                Some(r) => crate::tls::reason(r, host, &self.tls.trust()),
                None if inner.to_string().contains("does not support TLS") => {
                    format!("the server does not offer TLS, and sslmode={mode} requires it")
                }
                None => inner.to_string(),
            },
            sqlx::Error::Database(d)
                if d.code().as_deref() == Some("28000")
                    && d.message().contains("no encryption") =>
            {
                format!(
                    "{}: the server takes this connection only over TLS, and sslmode={mode} does not use it (use sslmode=verify-full)",
                    d.message()
                )
            }
            other => super::pg_error(other),
        };
        self.scrub(&why)
    }
}

fn not_a_url() -> Error {
    Error::Url {
        service: Service::Postgres,
        why: "the URL is not a postgres:// URL",
    }
}

/// A query value as a URL carries it: `%`, `&`, `#`, `+`, `=` and spaces
/// escaped, the rest as it is (paths stay readable).
pub fn encode_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '%' | '&' | '#' | '+' | '=' | ' ' | '?' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        PgUrl::parse(url).unwrap().options().get_ssl_mode()
    }

    #[test]
    fn libpq_modes() {
        let base = "postgres://u:pw@db.internal:5432/app";
        assert!(matches!(mode(base), PgSslMode::Prefer), "libpq's default");
        assert!(matches!(
            mode(&format!("{base}?sslmode=disable")),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode(&format!("{base}?sslmode=allow")),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode(&format!("{base}?sslmode=require")),
            PgSslMode::Require
        ));
        let ca = std::env::temp_dir().join(format!("rekey-probe-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "not read here").unwrap();
        let with_ca = format!("{base}?sslmode=require&sslrootcert={}", ca.display());
        assert!(
            matches!(mode(&with_ca), PgSslMode::VerifyCa),
            "require with a CA file verifies the CA, as libpq does"
        );
        assert!(matches!(
            mode(&format!("{base}?sslrootcert=system")),
            PgSslMode::VerifyFull
        ));
        let u = PgUrl::parse(&format!("{base}?sslrootcert=system")).unwrap();
        assert!(!u.as_str().contains("system"), "{:?}", u);
        assert!(u.as_str().ends_with("?sslmode=verify-full"));
        let e = PgUrl::parse(&format!("{base}?sslmode=require&sslrootcert=system"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "postgres: sslmode require may not be used with sslrootcert=system (use verify-full)"
        );
        let e = PgUrl::parse(&format!("{base}?sslmode=strict"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("postgres: sslmode \"strict\" is not one of"),
            "{e}"
        );
        let e = PgUrl::parse(&format!(
            "{base}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("postgres: sslrootcert /nonexistent/ca.pem: cannot read it"),
            "{e}"
        );
        let e = PgUrl::parse(&format!("{base}?sslcert={}", ca.display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslkey are given together"), "{e}");
        std::fs::remove_file(&ca).unwrap();
    }

    #[test]
    fn other_parameters_stay_and_nothing_leaks() {
        let u = PgUrl::parse(
            "postgres://app:hunter22@h/db?application_name=api&sslmode=verify-full&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "postgres://app:hunter22@h/db?application_name=api&connect_timeout=5&sslmode=verify-full"
        );
        assert!(!format!("{u:?}").contains("hunter22"), "{u:?}");
        assert_eq!(u.target(), "app@h:5432/db");
        assert_eq!(
            u.tls().query(),
            vec![("sslmode", "verify-full".to_string())]
        );
        assert_eq!(encode_value("/a b/c&d%"), "/a%20b/c%26d%25");
    }
}
