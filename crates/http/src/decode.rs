//! Compressed upstream bodies, decoded so that they can be masked. The gateway asks for
//! `Accept-Encoding: identity` when masks apply, but an upstream may compress anyway; a body
//! it sent with `Content-Encoding: gzip`, `deflate`, `br` or `zstd` is decoded as it streams
//! (at most [`FRAME`] decoded bytes at a time, so a small compressed body that expands a lot
//! is never held whole) and then masked. A coding it cannot decode is refused, never passed.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

/// Most decoded bytes handed on at once.
const FRAME: usize = 64 * 1024;

/// A `Content-Encoding` the gateway decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    /// HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2).
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// The coding's name in `Content-Encoding`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }

    /// The coding of a response: `Ok(None)` for none (or `identity`), `Err` with the header's
    /// value for one the gateway cannot decode (an unknown coding, or several stacked).
    pub(crate) fn of(headers: &HeaderMap) -> Result<Option<Coding>, String> {
        let mut codings = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity");
        let Some(first) = codings.next() else {
            return Ok(None);
        };
        let coding = match first.as_str() {
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Brotli,
            "zstd" => Coding::Zstd,
            _ => return Err(first),
        };
        match codings.next() {
            None => Ok(Some(coding)),
            Some(more) => Err(format!("{first}, {more}")),
        }
    }
}

/// Why a relayed body stopped early.
pub(crate) enum ReadError {
    /// The upstream's connection failed (or timed out) mid-body.
    Upstream(hyper::Error),
    /// The compressed bytes are not what their coding says, or end early.
    Undecodable(io::Error),
}

type Frames = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// An upstream body, decoded frame by frame.
pub(crate) struct Decoded {
    /// Behind a mutex only to be `Sync` (a response body must be): polling takes `&mut self`,
    /// so it is never locked.
    frames: Mutex<Frames>,
}

impl Decoded {
    pub(crate) fn new(body: Incoming, coding: Coding) -> Decoded {
        let reader = StreamReader::new(body.into_data_stream().map_err(io::Error::other));
        let reader: Pin<Box<dyn AsyncRead + Send>> = match coding {
            Coding::Gzip => {
                let mut d = GzipDecoder::new(reader);
                d.multiple_members(true);
                Box::pin(d)
            }
            Coding::Deflate => Box::pin(ZlibDecoder::new(reader)),
            Coding::Brotli => Box::pin(BrotliDecoder::new(reader)),
            Coding::Zstd => {
                let mut d = ZstdDecoder::new(reader);
                d.multiple_members(true);
                Box::pin(d)
            }
        };
        Decoded {
            frames: Mutex::new(Box::pin(ReaderStream::with_capacity(reader, FRAME))),
        }
    }

    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, ReadError>>> {
        let frames = self.frames.get_mut().unwrap_or_else(|p| p.into_inner());
        frames.as_mut().poll_next(cx).map(|next| {
            next.map(|r| {
                r.map_err(|e| {
                    // The upstream's own failure passes through the decoder unchanged.
                    if e.get_ref().is_some_and(|i| i.is::<hyper::Error>()) {
                        let inner = e.into_inner().expect("checked");
                        ReadError::Upstream(*inner.downcast::<hyper::Error>().expect("checked"))
                    } else {
                        ReadError::Undecodable(e)
                    }
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn coding(values: &[&'static str]) -> Result<Option<Coding>, String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CONTENT_ENCODING, HeaderValue::from_static(v));
        }
        Coding::of(&h)
    }

    #[test]
    fn codings_are_read_from_content_encoding() {
        assert_eq!(coding(&[]), Ok(None));
        assert_eq!(coding(&["identity"]), Ok(None));
        assert_eq!(coding(&["gzip"]), Ok(Some(Coding::Gzip)));
        assert_eq!(coding(&["X-GZIP"]), Ok(Some(Coding::Gzip)));
        assert_eq!(coding(&[" br "]), Ok(Some(Coding::Brotli)));
        assert_eq!(coding(&["zstd"]), Ok(Some(Coding::Zstd)));
        assert_eq!(coding(&["deflate"]), Ok(Some(Coding::Deflate)));
        assert_eq!(coding(&["identity, gzip"]), Ok(Some(Coding::Gzip)));
        assert_eq!(coding(&["compress"]), Err("compress".into()));
        assert_eq!(coding(&["gzip, br"]), Err("gzip, br".into()));
        assert_eq!(coding(&["gzip", "gzip"]), Err("gzip, gzip".into()));
    }
}
