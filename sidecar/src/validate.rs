//! Proves a new value works before it is served: connect to Postgres or
//! Redis with it, or ask an HTTP endpoint with it as a bearer token. The
//! checks themselves are `rekey_probe`'s, shared with the backend's
//! rotation kinds; this module picks the parts of the value they need.
//! Errors say what failed, never with the value.

use std::time::Duration;

use rekey_keyring::{SecretString, SecretValue};
use rekey_probe::http::Method;

use crate::config::Validate;
use crate::error::Error;

fn field<'a>(v: &'a SecretValue, name: &str) -> Option<&'a str> {
    match v {
        SecretValue::Fields(m) => m.get(name).map(SecretString::expose),
        SecretValue::Raw(b) if name == "url" => std::str::from_utf8(b.expose()).ok(),
        SecretValue::Raw(_) => None,
    }
}

/// Checks `value` as `how` says, within `timeout`.
///
/// # Errors
/// The value lacks what the check needs, the check failed
/// ([`Error::Probe`], [`Error::HttpStatus`]), or it did not finish in
/// time ([`Error::ValidationTimeout`]).
pub async fn validate(how: &Validate, value: &SecretValue, timeout: Duration) -> Result<(), Error> {
    let fut = async {
        match how {
            Validate::None => Ok(()),
            Validate::Postgres => postgres(value).await,
            Validate::Redis(tls) => redis(value, tls).await,
            Validate::Http(url) => http(url, value).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::ValidationTimeout { after: timeout }),
    }
}

async fn postgres(v: &SecretValue) -> Result<(), Error> {
    use rekey_probe::postgres;
    let url = field(v, "url").ok_or(Error::NoUrl { check: "postgres" })?;
    // The caller's timeout bounds the check; the probe's own is the
    // backend's connect timeout.
    postgres::check(url, postgres::DEFAULT_PROBE, postgres::DEFAULT_TIMEOUT).await?;
    Ok(())
}

/// Where to check a Redis credential: the URL's address, TLS and
/// credentials, with `username` and `password` fields taking precedence.
fn redis_target(v: &SecretValue) -> Result<rekey_probe::redis::RedisUrl, Error> {
    let url = field(v, "url").ok_or(Error::NoUrl { check: "redis" })?;
    let mut target = rekey_probe::redis::parse_url(url).ok_or(Error::NotARedisUrl)?;
    if let Some(u) = field(v, "username") {
        target.user = Some(u.to_string());
    }
    if let Some(p) = field(v, "password") {
        target.password = Some(SecretString::new(p.to_string()));
    }
    Ok(target)
}

async fn redis(v: &SecretValue, files: &rekey_probe::tls::TlsFiles) -> Result<(), Error> {
    let target = redis_target(v)?;
    let tls = if target.tls {
        Some(rekey_probe::tls::Tls::new(
            rekey_probe::Service::Redis,
            files,
        )?)
    } else {
        None
    };
    rekey_probe::redis::check(
        &target.addr,
        tls.as_ref(),
        target.user.as_deref(),
        target.password.as_ref().map(SecretString::expose),
    )
    .await?;
    Ok(())
}

async fn http(url: &str, v: &SecretValue) -> Result<(), Error> {
    let token = match v {
        SecretValue::Raw(b) => std::str::from_utf8(b.expose()).map_err(|_| Error::NotText)?,
        SecretValue::Fields(_) => field(v, "password")
            .or(field(v, "token"))
            .ok_or(Error::NoToken)?,
    };
    let status = rekey_probe::http::request(
        &Method::GET,
        url,
        Some(token),
        b"",
        rekey_probe::http::DEFAULT_TIMEOUT,
    )
    .await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(Error::HttpStatus {
            target: rekey_probe::http::target(url),
            status: status.as_u16(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_keyring::SecretBytes;

    #[test]
    fn redis_urls() {
        let v = SecretValue::Fields(
            [
                (
                    "url".to_string(),
                    SecretString::new("redis://app:old@cache:6380/0".into()),
                ),
                ("password".to_string(), SecretString::new("new".into())),
            ]
            .into(),
        );
        let t = redis_target(&v).unwrap();
        assert_eq!(t.addr, "cache:6380");
        assert!(!t.tls);
        assert_eq!(t.user.as_deref(), Some("app"));
        assert_eq!(
            t.password.as_ref().map(SecretString::expose),
            Some("new"),
            "the password field wins"
        );
        let raw = SecretValue::Raw(SecretBytes::new(b"rediss://localhost".to_vec()));
        let t = redis_target(&raw).unwrap();
        assert_eq!(t.addr, "localhost:6379");
        assert!(t.tls && t.user.is_none() && t.password.is_none());
        let raw = SecretValue::Raw(SecretBytes::new(b"redis://:pw@localhost".to_vec()));
        let pass = redis_target(&raw).unwrap().password;
        assert_eq!(pass.as_ref().map(SecretString::expose), Some("pw"));
        let e = redis_target(&SecretValue::Raw(SecretBytes::new(b"http://x".to_vec())));
        assert_eq!(
            e.unwrap_err().to_string(),
            "redis validation supports redis:// and rediss:// URLs"
        );
    }

    #[tokio::test]
    async fn redis_validation_against_the_real_server() {
        // The machine's Redis on 127.0.0.1:6379 has the default user with
        // no password: PING must succeed, a wrong AUTH must fail.
        let ok = SecretValue::Raw(SecretBytes::new(b"redis://127.0.0.1:6379".to_vec()));
        redis(&ok, &Default::default())
            .await
            .expect("Redis on 127.0.0.1:6379 (scripts/test starts it)");
        let bad = SecretValue::Raw(SecretBytes::new(
            b"redis://nobody:wrong-pass-123@127.0.0.1:6379".to_vec(),
        ));
        let e = redis(&bad, &Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("redis: AUTH refused"), "{e}");
        assert!(!e.contains("wrong-pass-123"), "{e}");
    }

    #[tokio::test]
    async fn postgres_validation_against_the_real_server() {
        let url = |db: &str| {
            SecretValue::Fields(
                [(
                    "url".to_string(),
                    SecretString::new(format!("postgres://postgres:pw-1234@127.0.0.1:5432/{db}")),
                )]
                .into(),
            )
        };
        validate(
            &Validate::Postgres,
            &url("postgres"),
            Duration::from_secs(10),
        )
        .await
        .expect("Postgres on 127.0.0.1:5432 (scripts/test starts it)");
        let e = validate(
            &Validate::Postgres,
            &url("no_such_db_for_rekey"),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("postgres: cannot connect"), "{e}");
        assert!(!e.contains("pw-1234"), "{e}");
        let e = validate(
            &Validate::Postgres,
            &SecretValue::Raw(SecretBytes::new(b"x".to_vec())),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(e, "postgres: the URL is not a postgres:// URL");
        let e = validate(
            &Validate::Postgres,
            &SecretValue::Fields([].into()),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(e, "postgres validation needs a url field");
    }

    #[tokio::test]
    async fn a_slow_check_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let e = validate(
            &Validate::Http(url),
            &SecretValue::Raw(SecretBytes::new(b"tok".to_vec())),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "validation timed out after 200ms");
        drop(l);
    }

    #[tokio::test]
    async fn an_http_value_that_would_inject_is_refused() {
        // No listener is needed: nothing may be sent.
        let v = SecretValue::Raw(SecretBytes::new(
            b"tok\r\n\r\nPOST /admin/delete-all HTTP/1.1".to_vec(),
        ));
        let e = validate(
            &Validate::Http("http://127.0.0.1:9/check".into()),
            &v,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "http: the bearer token holds bytes not allowed in a header; nothing was sent"
        );
    }
}
