//! The two streamed bodies: the application's request body with a size limit, and the
//! upstream's answer with a bounded copy for the observer, handed over once the answer has
//! been passed on whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// The application's body, cut off with an error past `limit` bytes. `over_limit` tells the
/// forwarding code afterwards that the upstream request failed because of the limit (413),
/// not because of the upstream (502).
pub(crate) struct LimitedBody {
    /// In a mutex only to be `Sync`, as reqwest asks of a request body; it is never contended
    /// (`poll_frame` has `&mut self`).
    inner: Mutex<axum::body::Body>,
    remaining: u64,
    over_limit: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body is over the proxy's limit")]
pub(crate) struct BodyTooLarge;

impl LimitedBody {
    pub(crate) fn new(inner: axum::body::Body, limit: u64, over_limit: Arc<AtomicBool>) -> Self {
        LimitedBody {
            inner: Mutex::new(inner),
            remaining: limit,
            over_limit,
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, axum::body::Body> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let inner = this
            .inner
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let frame = match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > this.remaining {
                this.over_limit.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
            this.remaining -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner().is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner().size_hint()
    }
}

/// Called once per answer body, when it ends or is dropped. `copy` is the whole body when a
/// copy was asked for, the body fitted, and it arrived complete.
pub(crate) type OnFinish = Box<dyn FnOnce(Option<Bytes>) + Send>;

/// The upstream's answer, passed through frame by frame. With `copy_limit`, it keeps a copy
/// of the data up to that many bytes (a larger body drops the copy).
pub(crate) struct TeeBody {
    inner: reqwest::Body,
    copy: Option<BytesMut>,
    copy_limit: usize,
    ended: bool,
    on_finish: Option<OnFinish>,
}

impl TeeBody {
    pub(crate) fn new(
        inner: reqwest::Body,
        copy_limit: Option<usize>,
        on_finish: OnFinish,
    ) -> Self {
        TeeBody {
            inner,
            copy: copy_limit.map(|_| BytesMut::new()),
            copy_limit: copy_limit.unwrap_or(0),
            ended: false,
            on_finish: Some(on_finish),
        }
    }

    fn finish(&mut self) {
        if let Some(on_finish) = self.on_finish.take() {
            let complete = self.ended || self.inner.is_end_stream();
            let copy = self.copy.take().filter(|_| complete).map(BytesMut::freeze);
            on_finish(copy);
        }
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(copy), Some(data)) = (this.copy.as_mut(), frame.data_ref()) {
                    if copy.len() + data.len() <= this.copy_limit {
                        copy.extend_from_slice(data);
                    } else {
                        this.copy = None;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                this.copy = None;
                this.finish();
                Poll::Ready(Some(Err(error)))
            }
            None => {
                this.ended = true;
                this.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    /// The server drops a body it has sent whole without asking for its end (the length was
    /// known), and drops it early when the application goes away: both end here.
    fn drop(&mut self) {
        self.finish();
    }
}
