//! Bounds on what one caller can make the backend hold: request bodies
//! capped per method before anything is decoded or authenticated, and
//! Watch streams counted per identity and per client connection.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// Room for everything but the value in a request that carries one (kind
/// options, hook paths, a request token).
const ENVELOPE: usize = 16 << 10;
/// Requests that name secrets and versions and nothing more.
const SMALL: usize = 8 << 10;
/// A Watch names up to a few hundred secret ids of at most 256 bytes.
const WATCH: usize = 64 << 10;
/// A status report lists every secret a sidecar serves, with errors.
const REPORT: usize = 256 << 10;

/// The largest request body the `rekey.v1.Rekey` method at `path` may
/// send: a Rotate or Create carries at most one value, everything else far
/// less.
pub(crate) fn request_limit(path: &str, max_value_bytes: usize) -> usize {
    match path.rsplit('/').next().unwrap_or_default() {
        "CreateSecret" | "Rotate" => max_value_bytes.saturating_add(ENVELOPE),
        "Watch" => WATCH,
        "ReportStatus" => REPORT,
        _ => SMALL,
    }
}

/// A request body that fails once it carries more than `limit` bytes, or
/// as soon as its first message says it will, with a status the client can
/// act on.
pub(crate) struct Capped<B> {
    inner: B,
    left: usize,
    limit: usize,
    /// The first bytes of the first gRPC message: flag and length.
    header: Vec<u8>,
}

impl<B> Capped<B> {
    pub(crate) fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            left: limit,
            limit,
            header: Vec::with_capacity(5),
        }
    }

    fn too_large(&self) -> tonic::codegen::StdError {
        Box::new(Status::resource_exhausted(format!(
            "the request is larger than this method's limit of {} bytes",
            self.limit
        )))
    }

    /// Checks the length the first message declares.
    fn declared_fits(&mut self, data: &[u8]) -> bool {
        if self.header.len() < 5 {
            let take = (5 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..take]);
            if self.header.len() == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                return usize::try_from(len).is_ok_and(|l| l.saturating_add(5) <= self.limit);
            }
        }
        true
    }
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let fits = self.declared_fits(data);
                    if !fits || data.len() > self.left {
                        self.left = 0;
                        return Poll::Ready(Some(Err(self.too_large())));
                    }
                    self.left -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Open streams per key, each held by a [`Slot`].
struct Counter<K> {
    open: Mutex<HashMap<K, u32>>,
    max: u32,
}

impl<K: Eq + Hash + Clone> Counter<K> {
    fn take(self: &Arc<Self>, key: &K) -> Option<Slot<K>> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counter: self.clone(),
            key: key.clone(),
        })
    }
}

/// One open stream; gives its place back when dropped.
pub(crate) struct Slot<K: Eq + Hash> {
    counter: Arc<Counter<K>>,
    key: K,
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self
            .counter
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Watch streams per identity and per client connection.
pub(crate) struct StreamLimits {
    identities: Arc<Counter<String>>,
    connections: Arc<Counter<SocketAddr>>,
}

/// The places one Watch stream holds.
pub(crate) type StreamSlots = (Slot<String>, Option<Slot<SocketAddr>>);

impl StreamLimits {
    pub(crate) fn new(per_identity: u32, per_connection: u32) -> Self {
        Self {
            identities: Arc::new(Counter {
                open: Mutex::default(),
                max: per_identity,
            }),
            connections: Arc::new(Counter {
                open: Mutex::default(),
                max: per_connection,
            }),
        }
    }

    /// A place for one more stream of `identity` on the connection from
    /// `peer`, or why there is none.
    pub(crate) fn open(
        &self,
        identity: &str,
        peer: Option<SocketAddr>,
    ) -> Result<StreamSlots, Status> {
        let Some(by_identity) = self.identities.take(&identity.to_string()) else {
            return Err(Status::resource_exhausted(format!(
                "{identity} already holds {} Watch streams (limits.max_watch_streams_per_identity)",
                self.identities.max
            )));
        };
        let by_connection = match peer {
            Some(p) => Some(self.connections.take(&p).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "this connection already holds {} Watch streams (limits.max_watch_streams_per_connection)",
                    self.connections.max
                ))
            })?),
            None => None,
        };
        Ok((by_identity, by_connection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn limits_follow_what_a_method_carries() {
        assert_eq!(
            request_limit("/rekey.v1.Rekey/Rotate", 65_536),
            65_536 + ENVELOPE
        );
        assert_eq!(request_limit("/rekey.v1.Rekey/GetSecret", 65_536), SMALL);
        assert!(request_limit("/rekey.v1.Rekey/Rotate", 65_536) < 100 << 10);
    }

    #[tokio::test]
    async fn a_message_declaring_more_than_the_limit_is_refused_at_once() {
        // A 5-byte header declaring a million bytes, and nothing else yet.
        let mut head = vec![0u8];
        head.extend_from_slice(&1_000_000u32.to_be_bytes());
        let body = http_body_util::Full::new(Bytes::from(head));
        let e = Capped::new(body, 1000).collect().await.unwrap_err();
        assert_eq!(Status::from_error(e).code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn a_capped_body_fails_with_resource_exhausted() {
        let body = http_body_util::Full::new(Bytes::from(vec![0u8; 100]));
        let e = Capped::new(body, 99).collect().await.unwrap_err();
        let status = Status::from_error(e);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let body = http_body_util::Full::new(Bytes::from(vec![0u8; 100]));
        assert_eq!(
            Capped::new(body, 100)
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len(),
            100
        );
    }

    #[test]
    fn streams_are_counted_per_identity_and_connection_and_given_back() {
        let l = StreamLimits::new(2, 1);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let first = l.open("sidecar", Some(a)).unwrap();
        let e = l.open("sidecar", Some(a)).err().unwrap();
        assert!(
            e.message().contains("max_watch_streams_per_connection"),
            "{e:?}"
        );
        let _second = l.open("sidecar", Some(b)).unwrap();
        let e = l.open("sidecar", None).err().unwrap();
        assert!(
            e.message().contains("max_watch_streams_per_identity"),
            "{e:?}"
        );
        drop(first);
        l.open("sidecar", Some(a)).unwrap();
    }
}
