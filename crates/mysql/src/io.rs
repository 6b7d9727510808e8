//! Packet framing over a stream: a 3-byte length and a sequence number, payloads of 2^24-1
//! bytes continued in the next packet. The whole payload is checked against a limit before
//! it is read.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAX_CHUNK: usize = 0xff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("packet of more than {0} bytes")]
    TooLarge(usize),
}

/// Reads one logical payload; returns the sequence number of its last packet.
pub async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    max: usize,
) -> Result<(u8, Vec<u8>), IoError> {
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; 4];
        match s.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && payload.is_empty() => {
                return Err(IoError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
        let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
        if payload.len() + len > max {
            return Err(IoError::TooLarge(max));
        }
        let at = payload.len();
        payload.resize(at + len, 0);
        s.read_exact(&mut payload[at..]).await?;
        if len < MAX_CHUNK {
            return Ok((head[3], payload));
        }
    }
}

/// Appends `payload` as packets numbered from `*seq` (advanced past them) to `out`.
pub fn frame(out: &mut Vec<u8>, seq: &mut u8, payload: &[u8]) {
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_CHUNK);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        out.push(*seq);
        *seq = seq.wrapping_add(1);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if n < MAX_CHUNK {
            return;
        }
    }
}

/// Writes one payload and flushes.
pub async fn write_packet<S: AsyncWrite + Unpin>(
    s: &mut S,
    seq: &mut u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    frame(&mut out, seq, payload);
    s.write_all(&out).await?;
    s.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_payloads_are_split_and_joined() {
        let payload: Vec<u8> = (0..MAX_CHUNK * 2 + 5).map(|i| i as u8).collect();
        let mut out = Vec::new();
        let mut seq = 3;
        frame(&mut out, &mut seq, &payload);
        assert_eq!(seq, 6);
        let (last, back) = read_packet(&mut &out[..], usize::MAX).await.unwrap();
        assert_eq!(last, 5);
        assert_eq!(back, payload);
        assert!(matches!(
            read_packet(&mut &out[..], 1000).await,
            Err(IoError::TooLarge(1000))
        ));
        // A payload of exactly one full chunk is followed by an empty packet.
        let mut out = Vec::new();
        frame(&mut out, &mut 0, &vec![1; MAX_CHUNK]);
        assert_eq!(out.len(), MAX_CHUNK + 8);
    }
}
