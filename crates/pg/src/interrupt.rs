//! Ending a running session from outside the relay: the upstream stream is wrapped so that,
//! when the session must end (certificate expired or revoked, grant ended, token removed), the
//! relay reads one more message as if the server had sent it (a FATAL ErrorResponse saying
//! why), placed between two whole backend messages, and nothing the client sends afterwards
//! reaches the server. The relay forwards that FATAL to the client like any other.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Where a backend byte stream stands: inside a message or between two.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    header: [u8; 5],
    /// Header bytes seen of the current message (0 between messages).
    have: usize,
    /// Body bytes of the current message still to come.
    body_left: usize,
}

impl Framing {
    /// Account for `bytes` read from the stream.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.body_left = len.saturating_sub(4);
                self.have = 0;
            }
        }
    }

    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }

    /// Bytes that may be read without crossing the next message boundary (at least 1).
    pub fn to_boundary(&self) -> usize {
        if self.body_left > 0 {
            self.body_left
        } else {
            (5 - self.have).max(1)
        }
    }
}

/// The request to end a session, shared by the session task and its upstream stream.
#[derive(Default)]
pub struct Interrupt {
    requested: AtomicBool,
    message: Mutex<Vec<u8>>,
    waker: Mutex<Option<Waker>>,
    /// Notified once the relay has read the whole message.
    pub delivered: Notify,
}

impl Interrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Deliver `message` (whole backend messages) to the relay at the next message boundary.
    pub fn fire(&self, message: Vec<u8>) {
        *self.message.lock().unwrap_or_else(|p| p.into_inner()) = message;
        self.requested.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// An upstream stream that can be interrupted (see the module doc).
pub struct Interruptible<S> {
    inner: S,
    interrupt: Arc<Interrupt>,
    framing: Framing,
    /// Bytes of the injected message already handed to the reader (`None`: not started).
    injected: Option<usize>,
}

impl<S> Interruptible<S> {
    /// `already_read`: backend bytes read from `inner` before wrapping (whole or partial messages).
    pub fn new(inner: S, interrupt: Arc<Interrupt>, already_read: &[u8]) -> Self {
        let mut framing = Framing::default();
        framing.advance(already_read);
        Interruptible {
            inner,
            interrupt,
            framing,
            injected: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Interruptible<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.interrupt.is_requested() {
            if let Some(done) = this.injected.or(this.framing.at_boundary().then_some(0)) {
                let msg = this
                    .interrupt
                    .message
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if done >= msg.len() {
                    // Delivered: the relay hears nothing more from upstream; the session task
                    // ends it.
                    return Poll::Pending;
                }
                let n = (msg.len() - done).min(buf.remaining());
                buf.put_slice(&msg[done..done + n]);
                this.injected = Some(done + n);
                if done + n >= msg.len() {
                    this.interrupt.delivered.notify_one();
                }
                return Poll::Ready(Ok(()));
            }
            // Mid-message: read only up to its end, so the injected message follows a whole one.
            let limit = this.framing.to_boundary().min(buf.remaining());
            let mut sub = buf.take(limit);
            let res = Pin::new(&mut this.inner).poll_read(cx, &mut sub);
            let n = sub.filled().len();
            if let Poll::Ready(Ok(())) = res {
                let start = buf.filled().len();
                // SAFETY: `sub` initialised and filled these `n` bytes of `buf`'s unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.framing.advance(&buf.filled()[start..]);
            }
            return res;
        }
        let start = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.framing.advance(&buf.filled()[start..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let mut waker = this
                    .interrupt
                    .waker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                drop(waker);
                // Fired between the check above and storing the waker: poll again.
                if this.interrupt.is_requested() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Interruptible<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.interrupt.is_requested() {
            // The session is ending: nothing more runs upstream.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.interrupt.is_requested() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.interrupt.is_requested() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn framing_tracks_boundaries_across_splits() {
        let stream = [
            msg(b'D', b"abcdef"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        for split in 0..stream.len() {
            let mut f = Framing::default();
            f.advance(&stream[..split]);
            f.advance(&stream[split..]);
            assert!(f.at_boundary(), "split at {split}");
        }
        let mut f = Framing::default();
        f.advance(&stream[..3]);
        assert!(!f.at_boundary());
        assert_eq!(f.to_boundary(), 2);
        f.advance(&stream[3..7]);
        assert_eq!(f.to_boundary(), 4);
    }

    #[tokio::test]
    async fn the_injected_message_follows_a_whole_message_and_writes_stop() {
        let (mut server, client) = tokio::io::duplex(1024);
        let interrupt = Interrupt::new();
        let mut s = Interruptible::new(client, interrupt.clone(), &[]);
        let row = msg(b'D', &[7u8; 40]);
        // Half a row is on the wire when the session is told to end.
        server.write_all(&row[..20]).await.unwrap();
        let mut got = vec![0u8; 10];
        s.read_exact(&mut got).await.unwrap();
        let fatal = msg(b'E', b"SFATAL\0\0");
        interrupt.fire(fatal.clone());
        server.write_all(&row[20..]).await.unwrap();
        server.write_all(&msg(b'D', b"next")).await.unwrap();
        let mut rest = vec![0u8; row.len() - 10 + fatal.len()];
        s.read_exact(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, [row.clone(), fatal].concat());
        // Nothing more is read, and writes no longer reach the server.
        let more = tokio::time::timeout(std::time::Duration::from_millis(50), s.read_u8()).await;
        assert!(more.is_err());
        s.write_all(b"Q\0\0\0\x0cDROP\0").await.unwrap();
        drop(s);
        let mut seen = Vec::new();
        server.read_to_end(&mut seen).await.unwrap();
        assert!(seen.is_empty(), "{seen:?}");
    }
}
