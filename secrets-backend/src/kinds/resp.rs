//! A minimal Redis client (RESP2 over TCP) for the commands rotation needs:
//! AUTH, PING, ACL. Commands are buffers that zero themselves, and replies
//! that echo a command are never passed on.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

pub struct Conn(BufReader<TcpStream>);

/// A reply: a status or bulk string, an integer, nil, an array, or an
/// error message from the server.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
    Error(String),
}

/// `redis://[user[:password]@]host[:port]` split into address and
/// credentials.
pub fn parse_url(url: &str) -> Option<(String, Option<String>, Option<Zeroizing<String>>)> {
    let rest = url.strip_prefix("redis://")?;
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let host = host.split('/').next().unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:6379")
    };
    let (user, pass) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (
                Some(u.to_string()).filter(|u| !u.is_empty()),
                Some(Zeroizing::new(p.to_string())),
            ),
            None => (None, Some(Zeroizing::new(a.to_string()))),
        },
        None => (None, None),
    };
    Some((addr, user, pass))
}

impl Conn {
    pub async fn connect(addr: &str) -> std::io::Result<Conn> {
        let s = tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10s")
            })??;
        Ok(Conn(BufReader::new(s)))
    }

    pub async fn call(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut out = Zeroizing::new(format!("*{}\r\n", args.len()));
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.0.get_mut().write_all(out.as_bytes()).await?;
        self.read().await
    }

    fn read(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Reply>> + Send + '_>>
    {
        Box::pin(async move {
            let mut line = String::new();
            if self.0.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let line = line.trim_end_matches("\r\n");
            let (kind, rest) = line.split_at(line.len().min(1));
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a RESP reply");
            Ok(match kind {
                "+" => Reply::Status(rest.to_string()),
                "-" => Reply::Error(rest.to_string()),
                ":" => Reply::Int(rest.parse().map_err(|_| bad())?),
                "$" => {
                    let n: i64 = rest.parse().map_err(|_| bad())?;
                    if n < 0 {
                        Reply::Nil
                    } else {
                        let mut buf = vec![0u8; n as usize + 2];
                        self.0.read_exact(&mut buf).await?;
                        buf.truncate(n as usize);
                        Reply::Bulk(buf)
                    }
                }
                "*" => {
                    let n: i64 = rest.parse().map_err(|_| bad())?;
                    if n < 0 {
                        Reply::Nil
                    } else {
                        let mut items = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            items.push(self.read().await?);
                        }
                        Reply::Array(items)
                    }
                }
                _ => return Err(bad()),
            })
        })
    }

    /// AUTH with optional username; `Err` carries the server's message.
    pub async fn auth(
        &mut self,
        user: Option<&str>,
        pass: &str,
    ) -> std::io::Result<Result<(), String>> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (addr, user, pass) = parse_url("redis://admin:pw@127.0.0.1:6380/0").unwrap();
        assert_eq!(addr, "127.0.0.1:6380");
        assert_eq!(user.as_deref(), Some("admin"));
        assert_eq!(pass.as_deref().map(|s| s.as_str()), Some("pw"));
        assert_eq!(parse_url("redis://cache").unwrap().0, "cache:6379");
        assert!(parse_url("http://x").is_none());
    }
}
