//! One HTTP/1.1 request to an `http://` URL, for reload hooks and
//! validation endpoints on the pod's own network: status code only.
//!
//! The request is built from the `http` crate's checked types (`Uri`,
//! `HeaderValue`) and written by hyper, never by formatting text: a URL or
//! bearer token holding CR, LF or another byte a header may not hold is
//! refused before any connection is opened, so it cannot add a header or
//! smuggle a second request. Errors show the target as scheme, host, port
//! and path (no user info, no query) and never the token.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use ::http::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, USER_AGENT};
use ::http::uri::{PathAndQuery, Scheme};
use ::http::{HeaderValue, Uri};
pub use ::http::{Method, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::error::{Error, Service};

/// How long a request may take, connect to status line, unless told.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a URL points, checked.
struct Target {
    /// Without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// `host[:port]` as written, for the `Host` header.
    authority: HeaderValue,
    path: PathAndQuery,
    /// `http://host[:port]/path`, for messages.
    shown: String,
}

fn bad_url(why: &'static str) -> Error {
    Error::Url {
        service: Service::Http,
        why,
    }
}

fn parse(url: &str) -> Result<Target, Error> {
    let uri = Uri::try_from(url).map_err(|_| bad_url("the URL is not a valid http:// URL"))?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err(bad_url("only http:// URLs are supported"));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| bad_url("the URL has no host"))?;
    if auth.as_str().contains('@') {
        return Err(bad_url("the URL must not hold a user or password"));
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad_url("the URL has no host"));
    }
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Ok(Target {
        host: host.to_string(),
        port: auth.port_u16().unwrap_or(80),
        authority: HeaderValue::from_str(auth.as_str())
            .map_err(|_| bad_url("the URL is not a valid http:// URL"))?,
        shown: format!("http://{}{}", auth.as_str(), uri.path()),
        path,
    })
}

/// How messages show `url`: scheme, host, port and path, without user info
/// or query (either may hold a secret); `an invalid URL` when it does not
/// parse.
#[must_use]
pub fn target(url: &str) -> String {
    parse(url).map_or_else(|_| "an invalid URL".into(), |t| t.shown)
}

/// `Bearer <token>` as a sensitive header value. Only visible ASCII is
/// accepted: `HeaderValue` alone would also take spaces, tabs and
/// non-ASCII bytes, which no bearer token holds.
fn bearer_header(token: &str) -> Result<HeaderValue, Error> {
    let refused = || Error::Header {
        service: Service::Http,
        what: "the bearer token",
    };
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refused());
    }
    let text = Zeroizing::new(format!("Bearer {token}"));
    let mut v = HeaderValue::from_str(&text).map_err(|_| refused())?;
    v.set_sensitive(true);
    Ok(v)
}

/// Sends one request and returns the response's status; the response body
/// is not read. `bearer` goes into `Authorization` (marked sensitive) and
/// is never logged or shown; `body` is sent as given and is not treated as
/// a secret.
///
/// # Errors
/// [`Error::Url`] or [`Error::Header`] before anything is sent;
/// [`Error::Connect`], [`Error::Failed`] (the connection broke, or the
/// answer was not HTTP), or [`Error::Timeout`] after `timeout`.
pub async fn request(
    method: &Method,
    url: &str,
    bearer: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<StatusCode, Error> {
    let t = parse(url)?;
    let mut req = ::http::Request::builder()
        .method(method.clone())
        .uri(Uri::from(t.path.clone()))
        .header(HOST, t.authority.clone())
        .header(USER_AGENT, HeaderValue::from_static("rekey"))
        .header(CONNECTION, HeaderValue::from_static("close"))
        .header(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(token) = bearer {
        req = req.header(AUTHORIZATION, bearer_header(token)?);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|_| bad_url("the URL is not a valid http:// URL"))?;
    let failed = |step: &str, reason: String| Error::Failed {
        service: Service::Http,
        target: t.shown.clone(),
        step: step.into(),
        reason,
    };
    let exchange = async {
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| Error::Connect {
                service: Service::Http,
                target: t.shown.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed("the handshake", e.to_string()))?;
        // The connection is driven here, not by a spawned task, so that it
        // ends with this call (a timeout drops it).
        let mut conn = pin!(conn);
        let mut sent = pin!(sender.send_request(req));
        poll_fn(|cx| {
            if let Poll::Ready(r) = sent.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if conn.as_mut().poll(cx).is_ready() {
                // Ended or broke: whatever it read is with the request now.
                return sent.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await
        .map(|resp| resp.status())
        .map_err(|e| failed(method.as_str(), e.to_string()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            service: Service::Http,
            target: t.shown.clone(),
            step: method.to_string(),
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that records every byte it receives and how many
    /// connections it accepted, and answers each connection `answer` once
    /// the request head has arrived.
    struct Recorder {
        addr: String,
        bytes: Arc<Mutex<Vec<u8>>>,
        connections: Arc<Mutex<usize>>,
    }

    impl Recorder {
        async fn start(answer: &'static [u8]) -> Self {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let bytes = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(Mutex::new(0));
            let (b, n) = (bytes.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    *n.lock().unwrap() += 1;
                    let b = b.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let mut answered = false;
                        // Read everything the client sends, also after the
                        // answer: a smuggled request would follow the first.
                        loop {
                            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf))
                                .await
                            {
                                Ok(Ok(n)) if n > 0 => {
                                    b.lock().unwrap().extend_from_slice(&buf[..n]);
                                }
                                Ok(_) => break,
                                Err(_) if answered => break,
                                Err(_) => {}
                            }
                            let head_done = b.lock().unwrap().windows(4).any(|w| w == b"\r\n\r\n");
                            if head_done && !answered && !answer.is_empty() {
                                answered = true;
                                let _ = s.write_all(answer).await;
                            }
                        }
                    });
                }
            });
            Recorder {
                addr,
                bytes,
                connections,
            }
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
        }

        fn connections(&self) -> usize {
            *self.connections.lock().unwrap()
        }
    }

    const NO_CONTENT: &[u8] =
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn one_request_with_a_bearer() {
        let r = Recorder::start(NO_CONTENT).await;
        let url = format!("http://{}/-/check?x=1", r.addr);
        let status = request(
            &Method::GET,
            &url,
            Some("good-token_1.~+/="),
            b"",
            DEFAULT_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let text = r.text();
        assert!(text.starts_with("GET /-/check?x=1 HTTP/1.1\r\n"), "{text}");
        assert!(
            text.contains("\r\nauthorization: Bearer good-token_1.~+/=\r\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("\r\nhost: {}\r\n", r.addr)),
            "{text}"
        );
        assert_eq!(text.matches("HTTP/1.1\r\n").count(), 1, "{text}");

        let posted = request(&Method::POST, &url, None, b"{}", DEFAULT_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(posted, StatusCode::NO_CONTENT);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let text = r.text();
        assert!(
            text.contains("POST /-/check?x=1 HTTP/1.1\r\n") && text.ends_with("\r\n\r\n{}"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_bearer_or_url_that_would_inject_is_refused_before_sending() {
        let r = Recorder::start(NO_CONTENT).await;
        let url = format!("http://{}/check", r.addr);
        for token in [
            "tok\r\nX-Injected: 1",
            "tok\r\n\r\nPOST /admin/delete-all HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "tok\nX-Injected: 1",
            "tok\rX-Injected: 1",
            "tok\0",
            "tok with space",
            "tok\twith-tab",
            "tök",
        ] {
            let e = request(&Method::GET, &url, Some(token), b"", DEFAULT_TIMEOUT)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Header {
                        what: "the bearer token",
                        ..
                    }
                ),
                "{token:?}: {e:?}"
            );
            let msg = e.to_string();
            assert_eq!(
                msg,
                "http: the bearer token holds bytes not allowed in a header; nothing was sent"
            );
        }
        for bad in [
            format!("http://{}/check\r\nX-Injected: 1", r.addr),
            format!(
                "http://{}/check HTTP/1.1\r\n\r\nPOST /admin/delete-all",
                r.addr
            ),
            format!("http://{}/check\nX-Injected: 1", r.addr),
        ] {
            let e = request(&Method::GET, &bad, Some("tok"), b"", DEFAULT_TIMEOUT)
                .await
                .unwrap_err();
            assert!(matches!(e, Error::Url { .. }), "{bad:?}: {e:?}");
            let msg = e.to_string();
            assert!(!msg.contains("Injected") && !msg.contains("admin"), "{msg}");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(r.connections(), 0, "nothing reached the server");
        let text = r.text();
        assert!(!text.contains("X-Injected") && !text.contains("delete-all"));
    }

    #[test]
    fn urls_are_checked_and_shown_without_secrets() {
        assert_eq!(
            target("http://user:pw@h:8080/p?token=q"),
            "an invalid URL",
            "user info is refused"
        );
        assert_eq!(target("http://h:8080/p/q?token=s"), "http://h:8080/p/q");
        assert_eq!(target("http://[::1]:9/x"), "http://[::1]:9/x");
        let t = parse("http://[::1]:9").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 9, "/"));
        assert_eq!(parse("http://h").unwrap().port, 80);
        for (url, why) in [
            ("https://h/", "only http:// URLs are supported"),
            ("ftp://h/x", "only http:// URLs are supported"),
            ("h:80/x", "the URL is not a valid http:// URL"),
            (
                "http://u:secret@h/",
                "the URL must not hold a user or password",
            ),
            ("http://h/a b", "the URL is not a valid http:// URL"),
        ] {
            let e = parse(url).err().unwrap();
            assert_eq!(e.to_string(), format!("http: {why}"), "{url}");
        }
    }

    #[tokio::test]
    async fn failures_name_the_target_and_step() {
        let silent = Recorder::start(b"").await;
        let url = format!("http://{}/slow?token=q-secret", silent.addr);
        let e = request(
            &Method::POST,
            &url,
            Some("slow-secret"),
            b"",
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "http: no answer from http://{}/slow within 200ms (POST)",
                silent.addr
            )
        );

        let junk = Recorder::start(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        let e = request(
            &Method::GET,
            &format!("http://{}/", junk.addr),
            None,
            b"",
            DEFAULT_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Failed { .. }), "{e:?}");

        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = request(
            &Method::GET,
            &format!("http://{closed}/"),
            None,
            b"",
            DEFAULT_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("http: cannot connect to http://{closed}/: ")),
            "{e}"
        );
    }
}
