//! A minimal Redis client (RESP2 over TCP, or over TLS for `rediss://`)
//! for the commands rotation and validation need: AUTH, PING, ACL, and
//! the few that find a deployment's nodes (ROLE, SENTINEL, CLUSTER).
//!
//! A command is encoded into one buffer, sized up front so it never
//! reallocates, that zeroes itself on drop: it holds passwords. Redis echoes
//! arguments in some error replies (`unknown command '...', with args
//! beginning with: '...'`, `Error in ACL SETUSER modifier '...'`), so an
//! error reply is cut at its first quote and scrubbed of every argument
//! before anyone sees it. Replies are bounded (line length, bulk size, array
//! length and depth) so a hostile or broken server cannot make the caller
//! allocate without limit, and every call has a timeout. After a timeout or
//! a broken reply the connection is not used again: the next reply could
//! belong to the previous command.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::error::{Error, Service, redact};
use crate::tls::Tls;

mod stream;
mod url;

use stream::Stream;
pub use url::{RedisUrl, host_of, parse_url};

/// Connect and per-call timeout of [`Conn::connect`] and [`check`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest status, error or length line accepted.
const MAX_LINE: usize = 64 * 1024;
/// Largest bulk string accepted: rotation reads ACL entries, not data.
const MAX_BULK: usize = 16 << 20;
const MAX_ITEMS: usize = 1 << 16;
const MAX_DEPTH: usize = 8;
/// Arguments shorter than this are not scrubbed from error replies (they
/// would garble the message); the cut at the first quote covers them.
const MIN_SCRUB: usize = 4;

/// One connection to a Redis server.
pub struct Conn {
    io: BufReader<Stream>,
    addr: String,
    /// How the connection was secured, for the words of a later failure
    /// (a server may refuse a client certificate after the handshake).
    tls: Option<Tls>,
    timeout: Duration,
    /// Set once a call timed out or a reply was malformed.
    broken: bool,
}

/// A reply: a status or bulk string, an integer, nil, an array, or an
/// error message from the server (already scrubbed of the arguments sent).
#[derive(PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
    Error(String),
}

/// Bulk strings are shown by length only: they may hold data (ACL GETUSER
/// lists password hashes).
impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Status(s) => write!(f, "Status({s:?})"),
            Reply::Int(n) => write!(f, "Int({n})"),
            Reply::Bulk(b) => write!(f, "Bulk(<{} bytes>)", b.len()),
            Reply::Nil => f.write_str("Nil"),
            Reply::Array(items) => f.debug_tuple("Array").field(items).finish(),
            Reply::Error(e) => write!(f, "Error({e:?})"),
        }
    }
}

/// Authenticates when a password is given (`AUTH [user] password`), then
/// expects `PONG` to `PING`: the check a new Redis credential must pass.
///
/// # Errors
/// [`Error::Refused`] with step `AUTH` (or `PING`, when the server wants a
/// password none was given for), or the connection's errors.
pub async fn check(
    addr: &str,
    tls: Option<&Tls>,
    user: Option<&str>,
    password: Option<&str>,
) -> Result<(), Error> {
    let mut c = Conn::connect(addr, tls).await?;
    if let Some(p) = password
        && let Err(reason) = c.auth(user, p).await?
    {
        return Err(c.refused("AUTH", reason));
    }
    match c.call(&["PING"]).await? {
        Reply::Status(s) if s == "PONG" => Ok(()),
        Reply::Error(reason) => Err(c.refused("PING", reason)),
        other => Err(Error::Unexpected {
            service: Service::Redis,
            target: c.addr.clone(),
            step: "PING".into(),
            answer: format!("{other:?}"),
        }),
    }
}

/// A plain connection the server dropped: most likely a port that takes
/// only TLS.
const PLAIN_TO_TLS: &str =
    "the server closed the connection (a port that takes only TLS? use rediss://)";

/// Why reading a reply failed, before the step is known.
enum Broken {
    Io(std::io::Error),
    Closed,
    Malformed(&'static str),
}

type ReadFut<'a> = Pin<Box<dyn Future<Output = Result<Reply, Broken>> + Send + 'a>>;

impl Conn {
    /// Connects within [`DEFAULT_TIMEOUT`], over TLS when `tls` is given;
    /// calls get the same timeout.
    ///
    /// # Errors
    /// [`Error::Connect`], [`Error::Tls`] or [`Error::Timeout`].
    pub async fn connect(addr: &str, tls: Option<&Tls>) -> Result<Conn, Error> {
        Self::connect_timeout(addr, tls, DEFAULT_TIMEOUT).await
    }

    /// Connects (and shakes hands) within `timeout`, which then bounds
    /// every call.
    ///
    /// # Errors
    /// [`Error::Connect`], [`Error::Tls`] or [`Error::Timeout`].
    pub async fn connect_timeout(
        addr: &str,
        tls: Option<&Tls>,
        timeout: Duration,
    ) -> Result<Conn, Error> {
        let open = async {
            let s = TcpStream::connect(addr).await.map_err(|e| Error::Connect {
                service: Service::Redis,
                target: addr.to_string(),
                reason: e.to_string(),
            })?;
            // Small commands, one at a time: do not wait to fill a segment.
            let _ = s.set_nodelay(true);
            Ok(match tls {
                None => Stream::Plain(s),
                Some(t) => Stream::Tls(Box::new(t.handshake(s, host_of(addr), addr).await?)),
            })
        };
        let stream = match tokio::time::timeout(timeout, open).await {
            Err(_) => {
                return Err(Error::Timeout {
                    service: Service::Redis,
                    target: addr.to_string(),
                    step: "connect".into(),
                    after: timeout,
                });
            }
            Ok(r) => r?,
        };
        Ok(Conn {
            io: BufReader::new(stream),
            addr: addr.to_string(),
            tls: tls.cloned(),
            timeout,
            broken: false,
        })
    }

    /// The `host:port` connected to.
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one command and reads its reply. A server error is
    /// `Ok(Reply::Error(..))`, scrubbed of `args`.
    ///
    /// # Errors
    /// [`Error::Timeout`], or [`Error::Failed`] when the connection broke
    /// or the reply was not RESP2 (the connection is then unusable).
    pub async fn call(&mut self, args: &[&str]) -> Result<Reply, Error> {
        let step = step_name(args);
        if self.broken {
            return Err(self.failed(step, "the connection broke on an earlier command".into()));
        }
        let cmd = encode(args);
        let timeout = self.timeout;
        let sent = async {
            let io = self.io.get_mut();
            io.write_all(&cmd).await.map_err(Broken::Io)?;
            io.flush().await.map_err(Broken::Io)?;
            self.read(0).await
        };
        let reply = match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(r)) => r,
            Ok(Err(b)) => {
                self.broken = true;
                let reason = match (b, &self.tls) {
                    (Broken::Io(e), Some(tls)) => tls.io_reason(&e, host_of(&self.addr)),
                    // What a TLS port does with a command in plain text.
                    (Broken::Closed, None) => PLAIN_TO_TLS.into(),
                    (Broken::Io(e), None)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::UnexpectedEof
                                | std::io::ErrorKind::BrokenPipe
                        ) =>
                    {
                        PLAIN_TO_TLS.into()
                    }
                    (Broken::Io(e), None) => e.to_string(),
                    (Broken::Closed, Some(_)) => "the server closed the connection".into(),
                    (Broken::Malformed(why), _) => why.into(),
                };
                return Err(self.failed(step, reason));
            }
            Err(_) => {
                self.broken = true;
                return Err(Error::Timeout {
                    service: Service::Redis,
                    target: self.addr.clone(),
                    step,
                    after: timeout,
                });
            }
        };
        Ok(scrub(reply, args))
    }

    /// AUTH with an optional username. The outer `Err` is a broken
    /// connection; the inner one is the server's refusal (scrubbed).
    ///
    /// # Errors
    /// As [`Conn::call`].
    pub async fn auth(
        &mut self,
        user: Option<&str>,
        pass: &str,
    ) -> Result<Result<(), String>, Error> {
        let r = match user {
            Some(u) => self.call(&["AUTH", u, pass]).await?,
            None => self.call(&["AUTH", pass]).await?,
        };
        Ok(match r {
            Reply::Status(_) => Ok(()),
            Reply::Error(e) => Err(e),
            other => Err(format!("unexpected reply {other:?}")),
        })
    }

    fn failed(&self, step: String, reason: String) -> Error {
        Error::Failed {
            service: Service::Redis,
            target: self.addr.clone(),
            step,
            reason,
        }
    }

    fn refused(&self, step: &str, reason: String) -> Error {
        Error::Refused {
            service: Service::Redis,
            target: self.addr.clone(),
            step: step.into(),
            reason,
        }
    }

    /// One line without its CRLF, at most [`MAX_LINE`] bytes.
    async fn line(&mut self) -> Result<Zeroizing<Vec<u8>>, Broken> {
        let mut line = Zeroizing::new(Vec::new());
        loop {
            let buf = self.io.fill_buf().await.map_err(Broken::Io)?;
            if buf.is_empty() {
                return Err(Broken::Closed);
            }
            if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                line.extend_from_slice(&buf[..i]);
                self.io.consume(i + 1);
                break;
            }
            let n = buf.len();
            line.extend_from_slice(buf);
            self.io.consume(n);
            if line.len() > MAX_LINE {
                return Err(Broken::Malformed("a reply line is too long"));
            }
        }
        if line.pop() != Some(b'\r') || line.len() > MAX_LINE {
            return Err(Broken::Malformed("not a RESP reply"));
        }
        Ok(line)
    }

    /// Reads one reply; boxed because arrays nest.
    fn read(&mut self, depth: usize) -> ReadFut<'_> {
        Box::pin(async move {
            let line = self.line().await?;
            let (kind, rest) = line
                .split_first()
                .ok_or(Broken::Malformed("an empty line"))?;
            let text = String::from_utf8_lossy(rest).into_owned();
            let bad = || Broken::Malformed("not a RESP reply");
            Ok(match kind {
                b'+' => Reply::Status(text),
                b'-' => Reply::Error(text),
                b':' => Reply::Int(text.parse().map_err(|_| bad())?),
                b'$' => {
                    let n: i64 = text.parse().map_err(|_| bad())?;
                    match usize::try_from(n) {
                        Err(_) => Reply::Nil,
                        Ok(n) if n > MAX_BULK => {
                            return Err(Broken::Malformed("a bulk reply is too large"));
                        }
                        Ok(n) => {
                            let mut buf = vec![0u8; n + 2];
                            self.io.read_exact(&mut buf).await.map_err(Broken::Io)?;
                            if !buf.ends_with(b"\r\n") {
                                return Err(bad());
                            }
                            buf.truncate(n);
                            Reply::Bulk(buf)
                        }
                    }
                }
                b'*' => {
                    let n: i64 = text.parse().map_err(|_| bad())?;
                    match usize::try_from(n) {
                        Err(_) => Reply::Nil,
                        Ok(n) if n > MAX_ITEMS || depth >= MAX_DEPTH => {
                            return Err(Broken::Malformed("an array reply is too large"));
                        }
                        Ok(n) => {
                            let mut items = Vec::with_capacity(n);
                            for _ in 0..n {
                                items.push(self.read(depth + 1).await?);
                            }
                            Reply::Array(items)
                        }
                    }
                }
                _ => return Err(bad()),
            })
        })
    }
}

/// How many leading arguments name the command (`PING`, `ACL SETUSER`)
/// rather than carry data.
fn command_words(args: &[&str]) -> usize {
    let word = |s: &str| s.len() <= 16 && s.bytes().all(|b| b.is_ascii_alphabetic());
    match args {
        [cmd, sub, ..] if cmd.eq_ignore_ascii_case("ACL") && word(sub) => 2,
        [cmd, ..] if word(cmd) => 1,
        _ => 0,
    }
}

/// The command's name for messages: `PING`, `ACL SETUSER`; never an
/// argument that could be a value.
fn step_name(args: &[&str]) -> String {
    match command_words(args) {
        0 => "a command".into(),
        n => args[..n].join(" ").to_ascii_uppercase(),
    }
}

/// A RESP2 array of bulk strings in one buffer of exactly its size, zeroed
/// on drop.
fn encode(args: &[&str]) -> Zeroizing<Vec<u8>> {
    let digits = |n: usize| n.to_string().len();
    let size = 3
        + digits(args.len())
        + args
            .iter()
            .map(|a| 5 + digits(a.len()) + a.len())
            .sum::<usize>();
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    debug_assert_eq!(out.len(), size, "sized up front: no copy left behind");
    out
}

/// Server error text as it may be passed on: up to the first quote (Redis
/// quotes what it echoes), without any argument of the command (the
/// command's own name may stay).
fn scrub_error(msg: &str, args: &[&str]) -> String {
    let cut = msg.find(['\'', '"']).map_or(msg, |i| &msg[..i]);
    let cut = cut.trim_end_matches([' ', ',', ':']);
    let data = args.get(command_words(args)..).unwrap_or_default();
    // ACL SETUSER's `>pw`, `<pw`, `#hash`, `!hash`: the password without
    // its operator too.
    let bare = data
        .iter()
        .filter_map(|a| a.strip_prefix(['>', '<', '#', '!']));
    let all: Vec<&str> = data.iter().copied().chain(bare).collect();
    redact(cut, &all, MIN_SCRUB)
}

fn scrub(reply: Reply, args: &[&str]) -> Reply {
    match reply {
        Reply::Error(e) => Reply::Error(scrub_error(&e, args)),
        Reply::Array(items) => Reply::Array(items.into_iter().map(|r| scrub(r, args)).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const REDIS: &str = "127.0.0.1:6379";

    fn unique(prefix: &str) -> String {
        let b = rekey_keyring::random_bytes(4).unwrap();
        let n = u32::from_le_bytes(b.expose().try_into().unwrap());
        format!("{prefix}-{}-{n:08x}", std::process::id())
    }

    #[test]
    fn commands_are_exactly_sized_and_named_without_values() {
        let c = encode(&["AUTH", "app", "pässword"]);
        assert_eq!(
            c.as_slice(),
            "*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$9\r\npässword\r\n".as_bytes()
        );
        assert_eq!(c.capacity(), c.len(), "no reallocation left a copy");
        assert_eq!(step_name(&["acl", "setuser", "u", ">pw"]), "ACL SETUSER");
        assert_eq!(step_name(&["AUTH", "u", "pw"]), "AUTH");
        assert_eq!(step_name(&["s3cr3t-as-command"]), "a command");
        assert_eq!(step_name(&[]), "a command");
    }

    #[test]
    fn error_replies_lose_what_they_echo() {
        let args = ["ACL", "SETUSER", "app", "%R~hunter2-password"];
        let e = scrub_error(
            "ERR Error in ACL SETUSER modifier '%R~hunter2-password': Syntax error",
            &args,
        );
        assert_eq!(e, "ERR Error in ACL SETUSER modifier");
        let set = ["ACL", "SETUSER", "app", ">hunter2-password"];
        let e = scrub_error("ERR bad hunter2-password here", &set);
        assert_eq!(e, "ERR bad [redacted] here");
        assert_eq!(scrub_error("ERR app SETUSER", &set), "ERR app SETUSER");
        let e = scrub_error(
            "WRONGPASS invalid username-password pair or user is disabled.",
            &args,
        );
        assert!(e.starts_with("WRONGPASS invalid"), "{e}");
        let nested = scrub(
            Reply::Array(vec![Reply::Error("ERR 'hunter2-password'".into())]),
            &args,
        );
        assert_eq!(nested, Reply::Array(vec![Reply::Error("ERR".into())]));
        assert_eq!(
            format!("{:?}", Reply::Bulk(b"hash-of-secret".to_vec())),
            "Bulk(<14 bytes>)"
        );
    }

    #[tokio::test]
    async fn check_against_the_real_server() {
        // The machine's Redis has the default user without a password:
        // PING works, a wrong AUTH is refused.
        check(REDIS, None, None, None)
            .await
            .expect("Redis on 127.0.0.1:6379 (scripts/test starts it)");
        let e = check(REDIS, None, Some("nobody"), Some("wrong-pass-123"))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("redis: AUTH refused by 127.0.0.1:6379: WRONGPASS"),
            "{msg}"
        );
        assert!(!msg.contains("wrong-pass-123"), "{msg}");
        let e = check("127.0.0.1:1", None, None, None).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("redis: cannot connect to 127.0.0.1:1"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn acl_users_as_the_backend_rotates_them() {
        let user = unique("rekey-probe");
        let mut c = Conn::connect(REDIS, None).await.unwrap();
        assert_eq!(c.addr(), REDIS);
        assert_eq!(
            c.call(&["ACL", "GETUSER", &user]).await.unwrap(),
            Reply::Nil
        );
        let created = c
            .call(&["ACL", "SETUSER", &user, "on", ">first-pass-1", "+ping"])
            .await
            .unwrap();
        assert_eq!(created, Reply::Status("OK".into()));
        assert!(matches!(
            c.call(&["ACL", "GETUSER", &user]).await.unwrap(),
            Reply::Array(_)
        ));
        c.call(&["ACL", "SETUSER", &user, ">second-pass-2"])
            .await
            .unwrap();
        // Both passwords work during the window, then the old one goes.
        check(REDIS, None, Some(&user), Some("first-pass-1"))
            .await
            .unwrap();
        check(REDIS, None, Some(&user), Some("second-pass-2"))
            .await
            .unwrap();
        c.call(&["ACL", "SETUSER", &user, "<first-pass-1"])
            .await
            .unwrap();
        let e = check(REDIS, None, Some(&user), Some("first-pass-1"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("AUTH refused"), "{e}");
        assert_eq!(c.auth(Some(&user), "second-pass-2").await.unwrap(), Ok(()));

        // Errors that echo an argument reach nobody with it.
        let mut admin = Conn::connect(REDIS, None).await.unwrap();
        let r = admin
            .call(&["ACL", "SETUSER", &user, "%Q~leaky-secret-77"])
            .await
            .unwrap();
        let Reply::Error(e) = &r else {
            panic!("expected an error, got {r:?}")
        };
        assert!(e.starts_with("ERR"), "{e}");
        assert!(!e.contains("leaky-secret-77"), "{e}");
        let r = admin
            .call(&["NOSUCHCOMMAND", "leaky-secret-77"])
            .await
            .unwrap();
        assert!(!format!("{r:?}").contains("leaky-secret-77"), "{r:?}");
        admin.call(&["ACL", "DELUSER", &user]).await.unwrap();
    }

    /// A server that answers every command with `answer`.
    async fn fake(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
            // Keep the connection open until the client gives up.
            let _ = s.read(&mut buf).await;
        });
        addr
    }

    #[tokio::test]
    async fn hostile_replies_are_bounded_and_break_the_connection() {
        for (answer, needle) in [
            (&b"$999999999999\r\n"[..], "too large"),
            (b"*99999999\r\n", "too large"),
            (b"?what\r\n", "not a RESP reply"),
            (b"+OK\n", "not a RESP reply"),
        ] {
            let addr = fake(answer).await;
            let mut c = Conn::connect(&addr, None).await.unwrap();
            let e = c.call(&["PING"]).await.unwrap_err();
            assert!(
                matches!(&e, Error::Failed { step, .. } if step == "PING"),
                "{e:?}"
            );
            assert!(e.to_string().contains(needle), "{e}");
            let again = c.call(&["PING"]).await.unwrap_err();
            assert!(again.to_string().contains("broke"), "{again}");
        }
        let mut deep = Vec::new();
        for _ in 0..=MAX_DEPTH {
            deep.extend_from_slice(b"*1\r\n");
        }
        let addr = fake(deep.leak()).await;
        let e = Conn::connect(&addr, None)
            .await
            .unwrap()
            .call(&["PING"])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let addr = fake(b"").await;
        let mut c = Conn::connect_timeout(&addr, None, Duration::from_millis(200))
            .await
            .unwrap();
        let e = c.call(&["AUTH", "u", "silent-secret"]).await.unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("redis: no answer from {addr} within 200ms (AUTH)")
        );
    }
}
