//! RFC 6455 frames, parsed apart from any socket: [`check`] reads a frame's head from the
//! front of a buffer (or says how much more is needed) and checks its length against the limit
//! before anything is buffered for it; [`Assembler`] follows fragmented messages; [`encode`]
//! writes a frame.

/// What a frame carries (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(b: u8) -> Option<OpCode> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A frame's head: everything before its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    /// RSV1..3 as the low three bits (RSV1 is permessage-deflate's "compressed").
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes of the head (2 to 14).
    pub head_len: usize,
}

impl Head {
    /// The whole frame's size, head and payload.
    pub fn frame_len(&self) -> usize {
        self.head_len + self.payload_len as usize
    }
}

/// Why a frame cannot be relayed; each maps to the close code the gateway sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("more bytes are needed")]
    Incomplete,
    #[error("a message larger than the gateway relays")]
    TooBig,
    #[error("a frame uses a reserved opcode ({0:#x})")]
    ReservedOpcode(u8),
    #[error("a frame sets reserved bits no extension was negotiated for")]
    ReservedBits,
    #[error("a control frame is fragmented or longer than 125 bytes")]
    BadControl,
    #[error("a frame's length is not valid")]
    BadLength,
    #[error("a client frame is not masked, or a server frame is")]
    Masking,
    #[error("a continuation frame has no message to continue, or a message began inside another")]
    Fragmentation,
}

impl FrameError {
    /// The close code for this error (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooBig => 1009,
            _ => 1002,
        }
    }
}

/// Longest payload of a control frame.
pub const MAX_CONTROL: u64 = 125;

/// Reads the head of the frame at the front of `buf`. `masked`: whether the sender must mask
/// (clients do, servers do not); `rsv_allowed`: the RSV bits a negotiated extension may set;
/// `room`: how many more payload bytes the current message may grow by.
pub fn check(buf: &[u8], masked: bool, rsv_allowed: u8, room: u64) -> Result<Head, FrameError> {
    if buf.len() < 2 {
        return Err(FrameError::Incomplete);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::ReservedOpcode(b0 & 0x0F))?;
    if rsv & !rsv_allowed != 0 || (opcode.is_control() && rsv != 0) {
        return Err(FrameError::ReservedBits);
    }
    if (b1 & 0x80 != 0) != masked {
        return Err(FrameError::Masking);
    }
    let short = u64::from(b1 & 0x7F);
    if opcode.is_control() && (!fin || short > MAX_CONTROL) {
        return Err(FrameError::BadControl);
    }
    let (payload_len, mut at) = match short {
        126 => {
            let b = buf.get(2..4).ok_or(FrameError::Incomplete)?;
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let b = buf.get(2..10).ok_or(FrameError::Incomplete)?;
            let n = u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            (n, 10)
        }
        n => (n, 2),
    };
    if !opcode.is_control() && payload_len > room {
        return Err(FrameError::TooBig);
    }
    let mask = if masked {
        let b = buf.get(at..at + 4).ok_or(FrameError::Incomplete)?;
        at += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Head {
        fin,
        rsv,
        opcode,
        mask,
        payload_len,
        head_len: at,
    })
}

/// XORs `payload` with `key` (masking and unmasking are the same operation).
pub fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// One whole frame: head, then `payload` (masked with `mask` when given).
pub fn encode(fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode.bits());
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
    }
    out
}

/// A close frame's payload: its code and reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    let reason = &reason.as_bytes()[..reason.len().min(MAX_CONTROL as usize - 2)];
    p.extend_from_slice(reason);
    p
}

/// The code of a close frame's (unmasked) payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Follows one direction's data frames through fragmented messages.
#[derive(Debug, Default)]
pub struct Assembler {
    /// The opcode and size so far of the message being received.
    open: Option<(OpCode, u64)>,
}

/// What a data frame means for its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// `Text` or `Binary`: the message's opcode, whatever the frame's.
    pub message: OpCode,
    pub first: bool,
    pub last: bool,
}

impl Assembler {
    /// How many more payload bytes the current (or next) message may have within `limit`.
    pub fn room(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.open.map_or(0, |(_, n)| n))
    }

    /// Takes a data frame's head in order; control frames are not given to it.
    pub fn push(&mut self, head: &Head) -> Result<Fragment, FrameError> {
        let (message, first, size) = match (head.opcode, self.open) {
            (OpCode::Continuation, Some((op, n))) => (op, false, n),
            (OpCode::Text | OpCode::Binary, None) => (head.opcode, true, 0),
            _ => return Err(FrameError::Fragmentation),
        };
        self.open = if head.fin {
            None
        } else {
            Some((message, size + head.payload_len))
        };
        Ok(Fragment {
            message,
            first,
            last: head.fin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ANY: u64 = 16 << 20;

    #[test]
    fn rfc_examples() {
        // RFC 6455 §5.7: a single-frame unmasked text message "Hello".
        let unmasked = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let h = check(&unmasked, false, 0, ANY).unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.head_len),
            (true, OpCode::Text, 5, 2)
        );
        // The same, masked.
        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = check(&masked, true, 0, ANY).unwrap();
        let mut p = masked[h.head_len..].to_vec();
        apply_mask(&mut p, h.mask.unwrap());
        assert_eq!(p, b"Hello");
        assert_eq!(encode(true, OpCode::Text, b"Hello", h.mask), masked);
        assert_eq!(encode(true, OpCode::Text, b"Hello", None), unmasked);
        // A 256-byte binary message uses the 16-bit length.
        let h = check(&[0x82, 0x7E, 0x01, 0x00], false, 0, ANY).unwrap();
        assert_eq!((h.payload_len, h.head_len), (256, 4));
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        let f = encode(true, OpCode::Binary, &[7u8; 70_000], Some([1, 2, 3, 4]));
        for cut in 0..14 {
            assert_eq!(
                check(&f[..cut], true, 0, ANY),
                Err(FrameError::Incomplete),
                "{cut}"
            );
        }
        assert_eq!(check(&f, true, 0, ANY).unwrap().frame_len(), f.len());
    }

    #[test]
    fn lengths_are_checked_before_the_payload_arrives() {
        // A head claiming 2^40 bytes is refused from its 10 bytes alone.
        let mut head = vec![0x82, 0x7F];
        head.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let e = check(&head, false, 0, ANY).unwrap_err();
        assert_eq!(e.close_code(), 1009);
        // The top bit of a 64-bit length is not allowed.
        let mut head = vec![0x82, 0x7F];
        head.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(check(&head, false, 0, ANY), Err(FrameError::BadLength));
    }

    #[test]
    fn protocol_errors() {
        assert_eq!(
            check(&[0x83, 0x00], false, 0, ANY),
            Err(FrameError::ReservedOpcode(3))
        );
        assert_eq!(
            check(&[0xC1, 0x00], false, 0, ANY),
            Err(FrameError::ReservedBits)
        );
        assert!(
            check(&[0xC1, 0x00], false, 0b100, ANY).is_ok(),
            "RSV1 with deflate"
        );
        assert_eq!(
            check(&[0x09, 0x00], false, 0, ANY),
            Err(FrameError::BadControl)
        );
        assert_eq!(
            check(&[0x89, 0x7E, 0, 200], false, 0, ANY),
            Err(FrameError::BadControl)
        );
        assert_eq!(check(&[0x81, 0x00], true, 0, ANY), Err(FrameError::Masking));
        assert_eq!(
            check(&[0x81, 0x80, 0, 0, 0, 0], false, 0, ANY),
            Err(FrameError::Masking)
        );
    }

    #[test]
    fn fragments_make_one_message_within_the_limit() {
        let head = |b: &[u8]| check(b, false, 0, ANY).unwrap();
        let mut a = Assembler::default();
        let f = a.push(&head(&[0x01, 100])).unwrap();
        assert_eq!((f.message, f.first, f.last), (OpCode::Text, true, false));
        assert_eq!(a.room(1000), 900);
        assert_eq!(a.push(&head(&[0x02, 0])), Err(FrameError::Fragmentation));
        let f = a.push(&head(&[0x80, 5])).unwrap();
        assert_eq!((f.message, f.first, f.last), (OpCode::Text, false, true));
        assert_eq!(a.room(1000), 1000);
        assert_eq!(a.push(&head(&[0x80, 5])), Err(FrameError::Fragmentation));
    }

    proptest! {
        #[test]
        fn encode_then_check_round_trips(
            payload in proptest::collection::vec(any::<u8>(), 0..70_000),
            fin: bool,
            binary: bool,
            key: Option<[u8; 4]>,
        ) {
            let op = if binary { OpCode::Binary } else { OpCode::Text };
            let f = encode(fin, op, &payload, key);
            let h = check(&f, key.is_some(), 0, ANY).unwrap();
            prop_assert_eq!((h.fin, h.opcode, h.mask), (fin, op, key));
            prop_assert_eq!(h.frame_len(), f.len());
            let mut p = f[h.head_len..].to_vec();
            if let Some(k) = h.mask { apply_mask(&mut p, k); }
            prop_assert_eq!(p, payload);
        }

        #[test]
        fn check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20), masked: bool) {
            if let Ok(h) = check(&bytes, masked, 0b100, 1 << 20) {
                prop_assert!(h.head_len <= bytes.len());
                prop_assert!(h.opcode.is_control() || h.payload_len <= 1 << 20);
            }
        }
    }
}
