//! The HTTP/2 front of the `rekey.v1.Rekey` service, before tonic's
//! generated server: every request body is capped at its method's limit
//! ([`crate::limits::request_limit`]) before a byte is decoded or a token
//! checked, and Watch is served here, from frames the hub encoded once,
//! so every stream sends clones of the same bytes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use rekey_proto::v1 as pb;
use rekey_proto::v1::rekey_server::RekeyServer;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::limits::{Capped, request_limit};
use crate::service::{RekeyService, WatchAdmitted, WatchRefused};

const WATCH_PATH: &str = "/rekey.v1.Rekey/Watch";

#[derive(Clone)]
pub(crate) struct Front {
    grpc: RekeyServer<RekeyService>,
    service: Arc<RekeyService>,
    max_value_bytes: usize,
}

impl Front {
    pub(crate) fn new(service: Arc<RekeyService>, max_value_bytes: usize) -> Self {
        // The cap below is what bounds requests; tonic's own limit only
        // has to let the largest allowed one through.
        let grpc = RekeyServer::from_arc(service.clone())
            .max_decoding_message_size(request_limit("/Rotate", max_value_bytes));
        Self {
            grpc,
            service,
            max_value_bytes,
        }
    }
}

impl NamedService for Front {
    const NAME: &'static str = <RekeyServer<RekeyService> as NamedService>::NAME;
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower_service::Service<http::Request<Body>> for Front {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> BoxFuture {
        let limit = request_limit(req.uri().path(), self.max_value_bytes);
        let watch = req.uri().path() == WATCH_PATH;
        let req = req.map(|b| Body::new(Capped::new(b, limit)));
        if watch {
            let (parts, body) = req.into_parts();
            // The message is awaited before the pair is made, so the head
            // is kept once, not once more for the tuple.
            let read = Box::pin(async move {
                let msg = read_message(body).await;
                (parts, msg)
            });
            Box::pin(WatchCall::Reading(read, self.service.clone()))
        } else {
            let mut grpc = self.grpc.clone();
            Box::pin(async move { grpc.call(req).await })
        }
    }
}

/// Reads one unary request message from a gRPC body.
async fn read_message<M: Message + Default>(body: Body) -> Result<M, Status> {
    let mut bytes = body.collect().await?.to_bytes();
    if bytes.len() < 5 {
        return Err(Status::invalid_argument("the request carries no message"));
    }
    let compressed = bytes.get_u8();
    let len = usize::try_from(bytes.get_u32()).unwrap_or(usize::MAX);
    if compressed != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not accepted; send Watch uncompressed",
        ));
    }
    if len != bytes.len() {
        return Err(Status::invalid_argument(
            "the request holds one message and nothing else",
        ));
    }
    M::decode(bytes).map_err(|_| Status::invalid_argument("the request is not a WatchRequest"))
}

/// A Watch call in two stages, each boxed, so that an open stream's task
/// holds only the stage it is in: first the request's head and body while
/// the message is read, then only what opening the stream needs once the
/// request is checked (no headers, no body) while its snapshot and audit
/// event are made. With 50,000 streams opening at once, every byte of this
/// future is paid 50,000 times.
enum WatchCall {
    Reading(ReadingWatch, Arc<RekeyService>),
    Opening(Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>),
}

impl Future for WatchCall {
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match &mut *self {
                Self::Reading(read, service) => {
                    let Poll::Ready((parts, msg)) = read.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    let admitted = msg.map_err(WatchRefused::Invalid).and_then(|msg| {
                        service.admit_watch(tonic::Request::from_http(http::Request::from_parts(
                            parts, msg,
                        )))
                    });
                    *self = Self::Opening(Box::pin(open_watch(service.clone(), admitted)));
                }
                Self::Opening(open) => return open.as_mut().poll(cx).map(Ok),
            }
        }
    }
}

/// A Watch request's head, and its message once read.
type ReadingWatch =
    Pin<Box<dyn Future<Output = (http::request::Parts, Result<pb::WatchRequest, Status>)> + Send>>;

/// The response to an admitted (or refused) Watch request: the stream's
/// frames, then trailers saying the server is shutting down. An async
/// block rather than an async fn, whose arguments would be kept twice.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in every stream's future"
)]
fn open_watch(
    service: Arc<RekeyService>,
    admitted: Result<WatchAdmitted, WatchRefused>,
) -> impl Future<Output = http::Response<Body>> + Send {
    async move {
        let opened = match admitted {
            Ok(admitted) => service.open_watch(admitted).await,
            // Boxed: rare, and its audit write would otherwise size every
            // stream's future.
            Err(refused) => Err(Box::pin(service.refuse_watch(refused)).await),
        };
        respond(opened)
    }
}

fn respond(opened: Result<WatchFrames, Status>) -> http::Response<Body> {
    let frames = match opened {
        Ok(frames) => frames,
        Err(status) => return status.into_http(),
    };
    let data = frames.map(|b| Ok::<_, Status>(Frame::data(b)));
    // Made when the stream ends, not held by every open stream.
    let trailers = tokio_stream::iter(std::iter::once_with(|| {
        Ok(Frame::trailers(shutting_down()))
    }));
    let body = Body::new(StreamBody::new(data.chain(trailers)));
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The trailers of a Watch stream: it ends only at shutdown, and says so.
fn shutting_down() -> http::HeaderMap {
    let mut end = http::HeaderMap::new();
    end.insert("grpc-status", http::HeaderValue::from_static("14"));
    end.insert(
        "grpc-message",
        http::HeaderValue::from_static("shutting down"),
    );
    end
}

/// The frames of a Watch stream: shared, already encoded.
pub(crate) type WatchFrames = Pin<Box<dyn tokio_stream::Stream<Item = Bytes> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msg: &impl Message, compressed: u8) -> Body {
        let mut b = vec![compressed];
        let m = msg.encode_to_vec();
        b.extend_from_slice(&u32::try_from(m.len()).unwrap().to_be_bytes());
        b.extend_from_slice(&m);
        Body::new(http_body_util::Full::new(Bytes::from(b)))
    }

    #[tokio::test]
    async fn a_watch_request_is_one_uncompressed_message() {
        let req = pb::WatchRequest {
            secret_ids: vec!["a/b".into()],
        };
        let got: pb::WatchRequest = read_message(framed(&req, 0)).await.unwrap();
        assert_eq!(got.secret_ids, ["a/b"]);
        let e = read_message::<pb::WatchRequest>(framed(&req, 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let e = read_message::<pb::WatchRequest>(Body::new(http_body_util::Full::new(
            Bytes::from_static(b"\0\0"),
        )))
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
