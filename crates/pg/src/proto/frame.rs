//! Typed-message framing: `tag: u8, len: i32 (includes itself), body`.

/// Why a buffer does not hold a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message {tag:?} declares length {len}, below the minimum of 4")]
    BadLength { tag: char, len: i32 },
    #[error("message {tag:?} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { tag: char, len: usize, limit: usize },
}

/// A complete message at the front of a buffer: its tag and total size (tag + length + body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub total_len: usize,
}

impl Frame {
    /// What this frame is, from a client.
    #[inline]
    pub fn client(&self) -> super::ClientMsg {
        super::ClientMsg::of(self.tag)
    }

    /// What this frame is, from a server.
    #[inline]
    pub fn server(&self) -> super::ServerMsg {
        super::ServerMsg::of(self.tag)
    }

    /// The body of this frame within `buf` (which starts with the frame).
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[5..self.total_len]
    }
}

/// Look at the front of `buf`: `Ok(None)` when more bytes are needed, `Err` when the declared
/// length is impossible or over `limit`. Never allocates.
pub fn next_frame(buf: &[u8], limit: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let total_len = len as usize + 1;
    if total_len > limit {
        return Err(FrameError::TooLarge {
            tag: tag as char,
            len: total_len,
            limit,
        });
    }
    if buf.len() < total_len {
        return Ok(None);
    }
    Ok(Some(Frame { tag, total_len }))
}

/// A cursor over a message body, for the few fields the gateway reads.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A body that ended early or held a malformed field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed protocol message")]
pub struct Malformed;

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        let b = *self.buf.get(self.pos).ok_or(Malformed)?;
        self.pos += 1;
        Ok(b)
    }
    pub fn i16(&mut self) -> Result<i16, Malformed> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    pub fn i32(&mut self) -> Result<i32, Malformed> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.pos.checked_add(n).ok_or(Malformed)?;
        let b = self.buf.get(self.pos..end).ok_or(Malformed)?;
        self.pos = end;
        Ok(b)
    }
    /// A NUL-terminated string (bytes, without the NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], Malformed> {
        let rest = &self.buf[self.pos..];
        let nul = rest.iter().position(|b| *b == 0).ok_or(Malformed)?;
        self.pos += nul + 1;
        Ok(&rest[..nul])
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let r = &self.buf[self.pos..];
        self.pos = self.buf.len();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames() {
        assert_eq!(next_frame(b"Q\0\0", 100), Ok(None));
        assert_eq!(next_frame(b"Q\0\0\0\x09SEL", 100), Ok(None));
        let f = next_frame(b"Q\0\0\0\x09SELECT", 100).unwrap().unwrap();
        assert_eq!(
            f,
            Frame {
                tag: b'Q',
                total_len: 10
            }
        );
        assert_eq!(f.body(b"Q\0\0\0\x09SELECTxx"), b"SELEC");
        assert!(matches!(
            next_frame(b"Q\0\0\0\x03", 100),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            next_frame(b"Q\xff\xff\xff\xff", 100),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            next_frame(b"D\0\x10\0\0", 1024),
            Err(FrameError::TooLarge { len: 1_048_577, .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics_and_respects_limit(buf in proptest::collection::vec(any::<u8>(), 0..64), limit in 5usize..100) {
            if let Ok(Some(f)) = next_frame(&buf, limit) {
                prop_assert!(f.total_len <= limit && f.total_len <= buf.len() && f.total_len >= 5);
            }
            let mut r = Reader::new(&buf);
            while r.cstr().is_ok() {}
        }
    }
}
