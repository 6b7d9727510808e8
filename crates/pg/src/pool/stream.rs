//! The upstream as one pooled client session's relay sees it: a byte stream that leases a
//! connection from the pool when the client's next message needs the server, and (under
//! `transaction`) gives it back once the server has answered everything sent and reports
//! itself idle outside a transaction. The relay above it judges, records and masks exactly as
//! for a connection of its own; this layer only moves messages, follows the ReadyForQuery
//! boundaries, and carries protocol-level prepared statements across connections.

use super::carry::{Carry, ClientStatements};
use super::settings::{self, Settings, Tracker};
use super::{End, Lease, Pool, PoolError};
use crate::cancel::BackendKey;
use crate::proto::next_frame;
use bytes::{Buf, BytesMut};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Client bytes buffered before the writer waits for the backend to take them.
const HIGH_WATER: usize = 256 * 1024;

type Leasing = Pin<Box<dyn Future<Output = Result<Lease, PoolError>> + Send>>;

pub struct PoolStream {
    pool: Arc<Pool>,
    transaction: bool,
    lease: Option<Lease>,
    leasing: Option<Leasing>,
    carry: Carry,
    client: ClientStatements,
    /// `transaction`: the client's settings (its confirmed `SET`s), applied to each connection
    /// it leases, and its setting changes in flight. `unknown`: a `SET` ran inside a transaction
    /// block where the gateway cannot tell whether it stays; the session ends at its next lease.
    settings: Settings,
    changes: Tracker,
    unknown: bool,
    /// From the client: messages not yet sent (whole ones, then perhaps the start of one).
    pending: BytesMut,
    /// To the backend: bytes not yet written.
    out: Vec<u8>,
    out_pos: usize,
    /// From the backend: bytes read and not yet looked at; then bytes for the client.
    inbuf: BytesMut,
    ready: BytesMut,
    /// What is left of a message passed to the client without being looked at.
    passthrough: usize,
    /// ReadyForQuery messages the current backend owes (one per Query, Sync, FunctionCall)
    /// and has sent, its last transaction status, and whether extended-protocol messages
    /// were sent after the last Sync.
    sent: u64,
    answered: u64,
    status: u8,
    open_pipeline: bool,
    /// A setting the guardrails pin changed on this connection: it is not reused.
    tainted: bool,
    reader: Option<Waker>,
    key: Arc<BackendKey>,
    /// The ErrorResponse that ends the session when no backend could be had, then EOF.
    failed: Option<Vec<u8>>,
    eof: bool,
    limit: usize,
}

impl PoolStream {
    pub(crate) fn new(
        pool: Arc<Pool>,
        lease: Option<Lease>,
        transaction: bool,
        key: Arc<BackendKey>,
        limit: usize,
    ) -> PoolStream {
        let mut s = PoolStream {
            pool,
            transaction,
            lease: None,
            leasing: None,
            carry: Carry::default(),
            client: ClientStatements::default(),
            settings: Settings::new(),
            changes: Tracker::default(),
            unknown: false,
            pending: BytesMut::new(),
            out: Vec::new(),
            out_pos: 0,
            inbuf: BytesMut::new(),
            ready: BytesMut::new(),
            passthrough: 0,
            sent: 0,
            answered: 0,
            status: b'I',
            open_pipeline: false,
            tainted: false,
            reader: None,
            key,
            failed: None,
            eof: false,
            limit,
        };
        if let Some(l) = lease {
            s.attach(l);
        }
        s
    }

    fn attach(&mut self, lease: Lease) {
        let b = lease.backend();
        self.key.set(Some((b.pid, b.secret.clone())));
        self.lease = Some(lease);
        self.carry = Carry::default();
        self.changes.detach();
        self.sent = 0;
        self.answered = 0;
        self.status = b'I';
        self.open_pipeline = false;
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// Nothing in flight and outside a transaction: the connection may serve someone else.
    fn idle(&self) -> bool {
        self.sent == self.answered
            && self.status == b'I'
            && !self.open_pipeline
            && self.out_pos >= self.out.len()
            && self.passthrough == 0
            && self.carry.settled()
    }

    /// Give the current connection back (kept when it is idle and clean).
    fn release(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        self.key.set(None);
        let end = if self.idle() && !self.tainted && self.inbuf.is_empty() {
            End::Keep
        } else if self.sent > self.answered || self.open_pipeline {
            End::Cancel
        } else {
            End::Close
        };
        self.inbuf.clear();
        self.passthrough = 0;
        self.out.clear();
        self.out_pos = 0;
        self.tainted = false;
        lease.finish(end);
    }

    /// No connection could be had: the client is told why, and the stream ends.
    fn fail(&mut self, e: PoolError) {
        tracing::warn!(resource = %self.pool.resource(), error = %e, "a pooled session could not get an upstream connection");
        self.failed = Some(super::unavailable(&self.pool, &e));
        self.pending.clear();
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn lost(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.key.set(None);
            lease.finish(End::Close);
        }
        self.eof = true;
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// Turn the whole client messages buffered into bytes for the backend.
    fn encode(&mut self) -> io::Result<()> {
        while let Some(f) = next_frame(&self.pending, self.limit)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            let tag = f.tag;
            if tag == b'X' {
                // The session's end is the gateway's to handle: the connection stays open.
                self.pending.advance(f.total_len);
                continue;
            }
            let idle = self.status == b'I';
            match tag {
                b'Q' | b'S' | b'F' => {
                    self.sent += 1;
                    self.open_pipeline = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.open_pipeline = true,
                _ => {}
            }
            if self.transaction {
                let lease = self.lease.as_mut().expect("encode runs with a backend");
                let body = &self.pending[5..f.total_len];
                let replaced = self
                    .changes
                    .outgoing(tag, body, idle)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let body = replaced.as_deref().unwrap_or(body);
                self.carry
                    .outgoing(
                        &mut self.client,
                        &mut lease.backend_mut().statements,
                        tag,
                        body,
                        &mut self.out,
                    )
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            } else {
                self.out.extend_from_slice(&self.pending[..f.total_len]);
            }
            self.pending.advance(f.total_len);
        }
        Ok(())
    }

    /// Whether a message other than Terminate waits to be sent.
    fn needs_backend(&self) -> bool {
        let mut pos = 0;
        while let Ok(Some(f)) = next_frame(&self.pending[pos..], self.limit) {
            if f.tag != b'X' {
                return true;
            }
            pos += f.total_len;
        }
        // A malformed message is reported by `encode`, which needs no backend to fail.
        next_frame(&self.pending[pos..], self.limit).is_err()
    }

    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.out_pos < self.out.len() {
                let Some(lease) = self.lease.as_mut() else {
                    self.out.clear();
                    self.out_pos = 0;
                    continue;
                };
                match Pin::new(&mut lease.backend_mut().stream)
                    .poll_write(cx, &self.out[self.out_pos..])
                {
                    Poll::Ready(Ok(n)) if n > 0 => self.out_pos += n,
                    Poll::Ready(_) => {
                        self.lost();
                        return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            self.out.clear();
            self.out_pos = 0;
            if self.failed.is_some() || self.eof {
                self.pending.clear();
                return Poll::Ready(Ok(()));
            }
            if !self.needs_backend() {
                // Only Terminate (dropped) or the start of a message.
                self.encode()?;
                break;
            }
            if self.lease.is_none() {
                if self.unknown {
                    self.unknown = false;
                    self.failed = Some(crate::refusal::SessionEnd::PoolSettingsUnknown.fatal());
                    self.pending.clear();
                    if let Some(w) = self.reader.take() {
                        w.wake();
                    }
                    continue;
                }
                let pool = self.pool.clone();
                let wanted = &self.settings;
                let leasing = self
                    .leasing
                    .get_or_insert_with(|| -> Leasing { Box::pin(pool.lease_for(wanted.clone())) });
                match leasing.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => {
                        self.leasing = None;
                        match r {
                            Ok(lease) => self.attach(lease),
                            Err(e) => {
                                self.fail(e);
                                continue;
                            }
                        }
                    }
                }
            }
            self.encode()?;
        }
        if let Some(lease) = self.lease.as_mut() {
            match Pin::new(&mut lease.backend_mut().stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    self.lost();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Record what the server confirmed of the client's setting changes, for the client and
    /// for the connection they ran on.
    fn settle(&mut self, now: u8) {
        match self.changes.ready(now) {
            settings::Settled::Nothing => {}
            settings::Settled::Changes(done) => {
                let backend = self.lease.as_mut().map(|l| &mut l.backend_mut().settings);
                for change in &done {
                    settings::apply(&mut self.settings, change);
                }
                if let Some(backend) = backend {
                    for change in &done {
                        settings::apply(backend, change);
                    }
                }
            }
            settings::Settled::Unknown => {
                tracing::warn!(resource = %self.pool.resource(), "a session-level SET ran inside a transaction block under transaction pooling; the session ends at its next transaction");
                self.tainted = true;
                self.unknown = true;
            }
        }
    }

    /// Look at what the backend sent: the messages that matter here are read whole, the rest
    /// passed on as they come (into `ready`).
    fn scan(&mut self) -> io::Result<()> {
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(self.inbuf.len());
                if n == 0 {
                    return Ok(());
                }
                self.ready.extend_from_slice(&self.inbuf[..n]);
                self.inbuf.advance(n);
                self.passthrough -= n;
                continue;
            }
            if self.inbuf.len() < 5 {
                return Ok(());
            }
            let tag = self.inbuf[0];
            let len =
                i32::from_be_bytes([self.inbuf[1], self.inbuf[2], self.inbuf[3], self.inbuf[4]]);
            if len < 4 || len as usize + 1 > self.limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed message from upstream",
                ));
            }
            let total = len as usize + 1;
            let followed = match tag {
                b'1' | b'2' | b'3' | b'Z' | b'E' | b'S' => true,
                // Under transaction pooling the ends of commands settle carried SETs.
                b'C' | b'I' | b's' => self.transaction,
                _ => false,
            };
            if !followed {
                self.passthrough = total;
                continue;
            }
            let Some(_) = next_frame(&self.inbuf, self.limit).ok().flatten() else {
                return Ok(());
            };
            let frame = self.inbuf.split_to(total);
            let forward = match (&mut self.lease, self.transaction) {
                (Some(lease), true) => {
                    self.carry
                        .incoming(&mut self.client, &mut lease.backend_mut().statements, tag)
                }
                _ => true,
            };
            if tag == b'S' && self.pool.guarded() {
                if let Ok((name, value)) =
                    crate::proto::backend::parse_parameter_status(&frame[5..])
                {
                    self.tainted |= crate::relay::dialect_change(&name, &value).is_some();
                }
            }
            if forward {
                self.ready.extend_from_slice(&frame);
            }
            if self.transaction {
                match tag {
                    b'C' => self
                        .changes
                        .completed(Some(frame[5..].strip_suffix(&[0]).unwrap_or(&frame[5..]))),
                    b'I' | b's' => self.changes.completed(None),
                    b'E' => self.changes.error(),
                    b'Z' => {
                        let now = frame.get(5).copied().unwrap_or(b'I');
                        self.settle(now);
                    }
                    _ => {}
                }
            }
            if tag == b'Z' {
                self.answered += 1;
                self.status = frame.get(5).copied().unwrap_or(b'I');
                // A connection whose settings are unknown is closed as soon as it is idle.
                if self.transaction
                    && self.idle()
                    && (!self.tainted || self.unknown)
                    && !self.needs_backend()
                {
                    // Anything after it is asynchronous (a NOTICE, a ParameterStatus).
                    self.inbuf.clear();
                    self.release();
                    return Ok(());
                }
            }
        }
    }
}

impl AsyncRead for PoolStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(err) = this.failed.take() {
                this.ready.extend_from_slice(&err);
                this.eof = true;
                continue;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let Some(lease) = this.lease.as_mut() else {
                this.reader = Some(cx.waker().clone());
                return Poll::Pending;
            };
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut lease.backend_mut().stream).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    this.inbuf.extend_from_slice(rb.filled());
                    if let Err(e) = this.scan() {
                        this.lost();
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Ready(_) => this.lost(),
            }
        }
    }
}

impl AsyncWrite for PoolStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() >= HIGH_WATER {
            match this.drive(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().drive(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().release();
        Poll::Ready(Ok(()))
    }
}

impl Drop for PoolStream {
    fn drop(&mut self) {
        self.release();
    }
}
