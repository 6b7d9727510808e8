//! The buffer a connection reads into, and reading whole frames from a stream
//! (used during start-up; the relay has its own zero-copy loop).

use crate::proto::{next_frame, FrameError};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("connection closed")]
    Eof,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

pub struct FrameBuf {
    pub(crate) buf: BytesMut,
}

impl Default for FrameBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuf {
    pub fn new() -> Self {
        FrameBuf {
            buf: BytesMut::with_capacity(8192),
        }
    }
    /// Whatever was read beyond the last frame handed out.
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.buf.split().to_vec()
    }
}

/// Read one typed message; its length is checked against `limit` before the body is buffered.
pub async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    fb: &mut FrameBuf,
    limit: usize,
) -> Result<(u8, Vec<u8>), IoError> {
    loop {
        if let Some(f) = next_frame(&fb.buf, limit)? {
            let body = f.body(&fb.buf).to_vec();
            fb.buf.advance(f.total_len);
            return Ok((f.tag, body));
        }
        if s.read_buf(&mut fb.buf).await? == 0 {
            return Err(IoError::Eof);
        }
    }
}
