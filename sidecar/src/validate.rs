//! Proves a new value works before it is served: connect to Postgres or
//! Redis with it, or ask an HTTP endpoint. Errors say what failed, never
//! with the value.

use std::time::Duration;

use rekey_keyring::SecretValue;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::Validate;

fn field<'a>(v: &'a SecretValue, name: &str) -> Option<&'a str> {
    match v {
        SecretValue::Fields(m) => m.get(name).map(|s| s.expose()),
        SecretValue::Raw(b) if name == "url" => std::str::from_utf8(b.expose()).ok(),
        SecretValue::Raw(_) => None,
    }
}

/// Checks `value` as `how` says, within `timeout`.
pub async fn validate(
    how: &Validate,
    value: &SecretValue,
    timeout: Duration,
) -> Result<(), String> {
    let fut = async {
        match how {
            Validate::None => Ok(()),
            Validate::Postgres => postgres(value).await,
            Validate::Redis => redis(value).await,
            Validate::Http(url) => http(url, value).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("validation timed out after {timeout:?}")),
    }
}

async fn postgres(v: &SecretValue) -> Result<(), String> {
    use sqlx::Connection;
    let url = field(v, "url").ok_or("postgres validation needs a url field")?;
    let mut c = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("postgres: cannot connect: {}", scrub(&e.to_string(), v)))?;
    sqlx::query("SELECT 1")
        .execute(&mut c)
        .await
        .map_err(|e| format!("postgres: SELECT 1 failed: {}", scrub(&e.to_string(), v)))?;
    let _ = c.close().await;
    Ok(())
}

/// Removes any part of the value from a driver's message.
fn scrub(msg: &str, v: &SecretValue) -> String {
    let mut out = msg.to_string();
    if let SecretValue::Fields(m) = v {
        for s in m.values() {
            if s.expose().len() >= 4 {
                out = out.replace(s.expose(), "[redacted]");
            }
        }
    }
    out
}

/// `redis://[user[:password]@]host[:port]` split into its parts.
fn redis_target(v: &SecretValue) -> Result<(String, Option<String>, Option<String>), String> {
    let url = field(v, "url").ok_or("redis validation needs a url field")?;
    let rest = url
        .strip_prefix("redis://")
        .ok_or("redis validation supports redis:// URLs")?;
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let host = host.split('/').next().unwrap_or(host);
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:6379")
    };
    let (mut user, mut pass) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (
                Some(u.to_string()).filter(|u| !u.is_empty()),
                Some(p.to_string()),
            ),
            None => (None, Some(a.to_string())),
        },
        None => (None, None),
    };
    if let Some(u) = field(v, "username") {
        user = Some(u.to_string());
    }
    if let Some(p) = field(v, "password") {
        pass = Some(p.to_string());
    }
    Ok((addr, user, pass))
}

async fn redis(v: &SecretValue) -> Result<(), String> {
    let (addr, user, pass) = redis_target(v)?;
    let s = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("redis: cannot connect to {addr}: {e}"))?;
    let mut s = BufReader::new(s);
    let cmd = |args: &[&str]| {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        zeroize::Zeroizing::new(out)
    };
    if let Some(p) = &pass {
        let c = match &user {
            Some(u) => cmd(&["AUTH", u, p]),
            None => cmd(&["AUTH", p]),
        };
        s.get_mut()
            .write_all(c.as_bytes())
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let mut line = String::new();
        s.read_line(&mut line)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        if !line.starts_with("+OK") {
            return Err(format!("redis: AUTH refused: {}", line.trim()));
        }
    }
    s.get_mut()
        .write_all(cmd(&["PING"]).as_bytes())
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let mut line = String::new();
    s.read_line(&mut line)
        .await
        .map_err(|e| format!("redis: {e}"))?;
    if line.starts_with("+PONG") {
        Ok(())
    } else {
        Err(format!("redis: PING answered {}", line.trim()))
    }
}

async fn http(url: &str, v: &SecretValue) -> Result<(), String> {
    let token = match v {
        SecretValue::Raw(b) => {
            std::str::from_utf8(b.expose()).map_err(|_| "the value is not text")?
        }
        SecretValue::Fields(_) => field(v, "password")
            .or(field(v, "token"))
            .ok_or("http validation needs a single value, or a password or token field")?,
    };
    let status = crate::http_client::request("GET", url, Some(token), b"").await?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("http: {url} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_keyring::{SecretBytes, SecretString};

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
        let (addr, user, pass) = redis_target(&v).unwrap();
        assert_eq!(addr, "cache:6380");
        assert_eq!(user.as_deref(), Some("app"));
        assert_eq!(pass.as_deref(), Some("new"), "the password field wins");
        let raw = SecretValue::Raw(SecretBytes::new(b"redis://localhost".to_vec()));
        assert_eq!(redis_target(&raw).unwrap().0, "localhost:6379");
    }

    #[tokio::test]
    async fn redis_validation_against_the_real_server() {
        // The machine's Redis on 127.0.0.1:6379 has the default user with
        // no password: PING must succeed, a wrong AUTH must fail.
        let ok = SecretValue::Raw(SecretBytes::new(b"redis://127.0.0.1:6379".to_vec()));
        redis(&ok)
            .await
            .expect("Redis on 127.0.0.1:6379 (scripts/test starts it)");
        let bad = SecretValue::Raw(SecretBytes::new(
            b"redis://nobody:wrong-pass-123@127.0.0.1:6379".to_vec(),
        ));
        let e = redis(&bad).await.unwrap_err();
        assert!(e.contains("AUTH refused"), "{e}");
        assert!(!e.contains("wrong-pass-123"), "{e}");
    }

    #[tokio::test]
    async fn postgres_validation_against_the_real_server() {
        let url = |db: &str| {
            SecretValue::Fields(
                [(
                    "url".to_string(),
                    SecretString::new(format!("postgres://postgres@127.0.0.1:5432/{db}")),
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
        .unwrap_err();
        assert!(e.starts_with("postgres: cannot connect"), "{e}");
        let e = validate(
            &Validate::Postgres,
            &SecretValue::Raw(SecretBytes::new(b"x".to_vec())),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(e.contains("postgres"), "{e}");
    }

    #[test]
    fn scrub_removes_values() {
        let v = SecretValue::Fields(
            [("password".to_string(), SecretString::new("hunter22".into()))].into(),
        );
        assert_eq!(
            scrub("auth failed for hunter22", &v),
            "auth failed for [redacted]"
        );
    }
}
