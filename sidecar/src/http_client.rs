//! A minimal HTTP/1.1 client for `http://` reload hooks and validation
//! endpoints on the pod's own network: one request per connection, status
//! code only.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one request and returns the status code. `bearer` goes into an
/// `Authorization` header and is never logged.
pub async fn request(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let fut = async {
        let mut s = TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("{url}: cannot connect: {e}"))?;
        let mut req = zeroize::Zeroizing::new(format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\nUser-Agent: rekey-sidecar\r\n",
            body.len()
        ));
        if let Some(t) = bearer {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        s.write_all(body).await.map_err(|e| format!("{url}: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut buf).await.map_err(|e| format!("{url}: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > 8192 {
                break;
            }
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{url}: not an HTTP response"))
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .map_err(|_| format!("{url}: no answer within 30s"))?
}
