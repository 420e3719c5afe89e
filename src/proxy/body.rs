//! The client's request body on its way to the backend: streamed frame by frame, with a limit on
//! how long the client may pause, and a record of whether it was the client that broke it, so a
//! truncated or malformed client body answers 400 (or 408) instead of counting as a backend
//! failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// How a client body failed, as recorded by [`ClientBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// The client sent bytes that are not a valid body (a broken chunk, a short body).
    Broken,
    /// The client stopped sending for longer than the body timeout.
    Stalled,
}

/// Shared between the body (which writes it) and the forwarder (which reads it after an error).
#[derive(Debug, Default)]
pub struct FaultCell(AtomicU8);

impl FaultCell {
    fn set(&self, fault: BodyFault) {
        let code = match fault {
            BodyFault::Broken => 1,
            BodyFault::Stalled => 2,
        };
        self.0.store(code, Ordering::Relaxed);
    }

    /// The recorded fault, if the body failed.
    pub fn get(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(BodyFault::Broken),
            2 => Some(BodyFault::Stalled),
            _ => None,
        }
    }
}

/// The error the backend connection sees when the client body fails.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// See [`BodyFault::Broken`].
    #[error("the client's request body is malformed or cut short: {0}")]
    Broken(hyper::Error),
    /// See [`BodyFault::Stalled`].
    #[error("the client paused its request body for longer than {0:?}")]
    Stalled(Duration),
}

/// A request body as forwarded: none at all (most requests), or the client's, watched.
pub enum ClientBody {
    /// No body: nothing is polled or allocated.
    Empty,
    /// The client's body with its pause limit.
    Streaming {
        /// What the client sends.
        inner: Incoming,
        /// Longest pause between frames.
        timeout: Duration,
        /// Restarted on every frame.
        timer: Pin<Box<tokio::time::Sleep>>,
        /// Where a failure is recorded.
        fault: Arc<FaultCell>,
    },
}

impl ClientBody {
    /// Wraps `inner` unless it is already known to be empty; returns the body and, for a real
    /// one, the cell that will say whether the client broke it.
    pub fn new(inner: Incoming, timeout: Duration) -> (ClientBody, Option<Arc<FaultCell>>) {
        if inner.is_end_stream() {
            return (ClientBody::Empty, None);
        }
        let fault = Arc::new(FaultCell::default());
        let body = ClientBody::Streaming {
            inner,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            fault: fault.clone(),
        };
        (body, Some(fault))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let ClientBody::Streaming {
            inner,
            timeout,
            timer,
            fault,
        } = self.get_mut()
        else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + *timeout;
                timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                fault.set(BodyFault::Broken);
                Poll::Ready(Some(Err(ClientBodyError::Broken(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    fault.set(BodyFault::Stalled);
                    Poll::Ready(Some(Err(ClientBodyError::Stalled(*timeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Streaming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Streaming { inner, .. } => inner.size_hint(),
        }
    }
}
