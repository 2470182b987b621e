//! Postgres connections for checks and for rotation's admin work.
//!
//! Connections never log statements (an `ALTER ROLE ... PASSWORD` must not
//! reach a log) and have a timeout. Errors never include the URL or its
//! password: the target is shown as `user@host:port/database`, and every
//! driver message is scrubbed of the URL, the password (as written and
//! percent-decoded) and a `password=` parameter before it is passed on.
//! URLs are read as libpq reads them, TLS settings included ([`url`]).

mod url;

pub use url::{PgUrl, SslMode, TlsParams, encode_value as encode_query_value};

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use zeroize::Zeroizing;

use crate::error::{Error, Service, redact};

/// Connect timeout of rotation's admin connections.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The statement [`check`] runs unless told otherwise.
pub const DEFAULT_PROBE: &str = "SELECT 1";
/// Secrets shorter than this are not scrubbed (a one-letter password would
/// garble the message; it is not a secret anyone should rely on).
const MIN_SCRUB: usize = 3;

/// Connects within `timeout`, without statement logging.
///
/// # Errors
/// [`Error::Url`], [`Error::Timeout`], or [`Error::Connect`] with the
/// server's reason (a wrong password, an unknown database), scrubbed.
pub async fn connect(url: &str, timeout: Duration) -> Result<PgConnection, Error> {
    let url = PgUrl::parse(url)?;
    let target = url.target();
    match tokio::time::timeout(timeout, open(url.options())).await {
        Err(_) => Err(Error::Timeout {
            service: Service::Postgres,
            target,
            step: "connect".into(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(Error::Connect {
            service: Service::Postgres,
            target,
            reason: url.reason(&e),
        }),
        Ok(Ok(c)) => Ok(c),
    }
}

/// Connects with `url` and runs `probe` (e.g. [`DEFAULT_PROBE`]), both
/// within `timeout`: the check a new Postgres credential must pass.
///
/// # Errors
/// As [`connect`]; [`Error::Failed`] or [`Error::Timeout`] with step `the
/// probe statement` when the statement fails or overruns what is left.
pub async fn check(url: &str, probe: &str, timeout: Duration) -> Result<(), Error> {
    let started = tokio::time::Instant::now();
    let mut c = connect(url, timeout).await?;
    let target = PgUrl::parse(url)?.target();
    let left = timeout.saturating_sub(started.elapsed());
    let r = tokio::time::timeout(left, execute(&mut c, probe)).await;
    // A failed close leaves nothing behind that matters to the check.
    let _ = c.close().await;
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Failed {
            service: Service::Postgres,
            target,
            step: "the probe statement".into(),
            reason: scrub(&pg_error(&e), url),
        }),
        Err(_) => Err(Error::Timeout {
            service: Service::Postgres,
            target,
            step: "the probe statement".into(),
            after: timeout,
        }),
    }
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// `opts.connect()`, boxed: sqlx's connect and executor futures are not
/// `Send` for every lifetime, so a caller's future that awaits them
/// directly cannot be spawned. A boxed future with one named lifetime can.
fn open(opts: PgConnectOptions) -> BoxFut<'static, Result<PgConnection, sqlx::Error>> {
    Box::pin(async move { opts.connect().await })
}

/// Runs `sql` (one or more statements, no parameters); boxed as [`open`].
fn execute<'a>(c: &'a mut PgConnection, sql: &'a str) -> BoxFut<'a, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::Executor::execute(&mut *c, sql).await.map(drop) })
}

/// The useful part of a driver error: the server's own message for a
/// database error, else the driver's. Not scrubbed: pass it through
/// [`scrub`] unless the statement held nothing secret.
#[must_use]
pub fn pg_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// `msg` without the URL, its password (as written and percent-decoded)
/// or the value of a `password=` parameter.
#[must_use]
pub fn scrub(msg: &str, url: &str) -> String {
    let mut secrets: Vec<Zeroizing<String>> = vec![Zeroizing::new(url.to_string())];
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, pass)) = userinfo.split_once(':')
    {
        secrets.push(Zeroizing::new(pass.to_string()));
        secrets.push(percent_decode(pass));
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some(("password", v)) = pair.split_once('=') {
                secrets.push(Zeroizing::new(v.to_string()));
                secrets.push(percent_decode(v));
            }
        }
    }
    // Longest first, so a password inside the URL does not break up the
    // URL's own replacement.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let refs: Vec<&str> = secrets.iter().map(|s| s.as_str()).collect();
    redact(msg, &refs, MIN_SCRUB)
}

/// `%XX` decoded; an invalid escape or non-UTF-8 result stays as written.
pub(crate) fn percent_decode(encoded: &str) -> Zeroizing<String> {
    let bytes = encoded.as_bytes();
    let hex = |c: Option<&u8>| c.and_then(|c| char::from(*c).to_digit(16));
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if let (b'%', Some(high), Some(low)) =
            (byte, hex(bytes.get(at + 1)), hex(bytes.get(at + 2)))
        {
            out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
            at += 3;
        } else {
            out.push(byte);
            at += 1;
        }
    }
    Zeroizing::new(std::str::from_utf8(&out).map_or_else(|_| encoded.to_string(), str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const PG: &str = "postgres://postgres@127.0.0.1:5432";

    #[test]
    fn urls_are_checked_and_never_repeated() {
        for bad in [
            "mysql://u:hunter22@h/db",
            "postgres://u:hunter22@h:notaport/db",
            "hunter22",
        ] {
            let e = PgUrl::parse(bad).unwrap_err().to_string();
            assert_eq!(e, "postgres: the URL is not a postgres:// URL");
        }
        let u = PgUrl::parse("postgresql://app_a:pw@db.internal:6432/appdb").unwrap();
        assert_eq!(u.target(), "app_a@db.internal:6432/appdb");
    }

    #[test]
    fn scrub_removes_the_url_and_every_form_of_the_password() {
        let url = "postgres://app:p%40ss%2Fw0rd@h/db?password=qs-secret";
        let msg = format!("failed for {url}; p@ss/w0rd; p%40ss%2Fw0rd; qs-secret; app");
        let s = scrub(&msg, url);
        for leak in ["p@ss/w0rd", "p%40ss%2Fw0rd", "qs-secret", "postgres://"] {
            assert!(!s.contains(leak), "{leak} in {s}");
        }
        assert!(s.ends_with("; app"), "the user is not a secret: {s}");
        assert_eq!(percent_decode("a%zz%4").as_str(), "a%zz%4");
    }

    #[tokio::test]
    async fn check_against_the_real_server() {
        check(&format!("{PG}/postgres"), DEFAULT_PROBE, DEFAULT_TIMEOUT)
            .await
            .expect("Postgres on 127.0.0.1:5432 (scripts/test starts it)");

        let e = check(
            &format!("{PG}/no_such_db_for_rekey"),
            DEFAULT_PROBE,
            DEFAULT_TIMEOUT,
        )
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "postgres: cannot connect to postgres@127.0.0.1:5432/no_such_db_for_rekey: "
            ),
            "{msg}"
        );
        assert!(msg.contains("does not exist"), "{msg}");

        // The server repeats the database name; here it is the password.
        let url = "postgres://postgres:db-named-secret@127.0.0.1:5432/db-named-secret";
        let msg = check(url, DEFAULT_PROBE, DEFAULT_TIMEOUT)
            .await
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("db-named-secret"), "{msg}");
        assert!(msg.contains("[redacted]"), "{msg}");

        let e = check(
            &format!("{PG}/postgres"),
            "SELECT 1 FROM no_such_table_for_rekey",
            DEFAULT_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Failed { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(
                "postgres: the probe statement failed at postgres@127.0.0.1:5432/postgres: "
            ),
            "{e}"
        );
    }

    /// The sidecar and the backend spawn tasks that await these.
    #[test]
    fn futures_can_be_spawned() {
        fn spawnable<F: Future + Send + 'static>(_: F) {}
        spawnable(async {
            let url = String::from(PG);
            check(&url, DEFAULT_PROBE, DEFAULT_TIMEOUT).await
        });
        spawnable(async {
            let url = String::from(PG);
            connect(&url, DEFAULT_TIMEOUT).await.map(drop)
        });
    }

    #[tokio::test]
    async fn an_admin_connection_runs_statements() {
        let mut c = connect(&format!("{PG}/postgres"), DEFAULT_TIMEOUT)
            .await
            .unwrap();
        let n: i32 = sqlx::query_scalar("SELECT 41 + 1")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 42);
        c.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let url = format!("postgres://app:silent-secret@127.0.0.1:{port}/db");
        let e = check(&url, DEFAULT_PROBE, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("postgres: no answer from app@127.0.0.1:{port}/db within 300ms (connect)")
        );
    }
}
