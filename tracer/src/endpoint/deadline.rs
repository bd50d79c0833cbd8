//! The write deadline of an exchange: hyper bounds how long a client may take
//! to send its request headers, not how long it may take to read the response,
//! so the connection's IO fails writes that stay blocked past the deadline.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// The instant by which the current exchange's response must be written.
/// The service sets it when a request's headers have been read; the
/// connection's IO enforces it.
#[derive(Clone, Default)]
pub(super) struct WriteDeadline(Arc<Mutex<Option<Instant>>>);

impl WriteDeadline {
    pub(super) fn set(&self, deadline: Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(deadline);
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The socket, under TLS if any, failing writes that stay blocked past the
/// exchange's [`WriteDeadline`]: a client that stops reading (its receive
/// window closes) or reads a trickle gets disconnected, as with Go's
/// `WriteTimeout`. Only a write that would block is checked, so the deadline
/// of an exchange long finished does no harm: a later write that goes through
/// at once (closing an idle connection) is not failed.
pub(super) struct DeadlineIo<T> {
    inner: T,
    deadline: WriteDeadline,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> DeadlineIo<T> {
    pub(super) fn new(inner: T, deadline: WriteDeadline) -> Self {
        DeadlineIo {
            inner,
            deadline,
            timer: None,
        }
    }

    /// The inner write is blocked: wait for the deadline, if any.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(deadline) = self.deadline.get() else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response within the request timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }
}
