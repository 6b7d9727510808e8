//! Pure pieces of the protocol-version probe: rustls cannot speak TLS 1.0 or 1.1, so the scan
//! sends a hand-built ClientHello for those and classifies the first record that comes back.

/// A legacy TLS version the scan probes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Legacy {
    Tls10,
    Tls11,
}

impl Legacy {
    pub fn wire(self) -> [u8; 2] {
        match self {
            Legacy::Tls10 => [0x03, 0x01],
            Legacy::Tls11 => [0x03, 0x02],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Legacy::Tls10 => "TLSv1.0",
            Legacy::Tls11 => "TLSv1.1",
        }
    }
}

/// A ClientHello whose highest version is `version`, offering the CBC suites servers of that
/// era accept (ECDHE and RSA key exchange), with SNI, supported groups and point formats.
pub fn legacy_client_hello(version: Legacy, server_name: Option<&str>) -> Vec<u8> {
    let v = version.wire();
    let mut body = Vec::with_capacity(160);
    body.extend_from_slice(&v);
    // The random need not be random: the probe never completes a handshake.
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)));
    body.push(0); // no session id
    let suites: [u16; 8] = [
        0xc00a, 0xc009, 0xc014, 0xc013, // ECDHE-{ECDSA,RSA}-AES{256,128}-SHA
        0x0035, 0x002f, 0x000a, // RSA AES256-SHA, AES128-SHA, 3DES
        0x00ff, // renegotiation SCSV
    ];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null only

    let mut ext = Vec::new();
    if let Some(name) = server_name.filter(|n| n.parse::<std::net::IpAddr>().is_err()) {
        let n = name.as_bytes();
        let mut sni = Vec::with_capacity(n.len() + 5);
        sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
        sni.push(0); // host_name
        sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
        sni.extend_from_slice(n);
        push_ext(&mut ext, 0x0000, &sni);
    }
    // supported_groups: x25519, secp256r1, secp384r1
    push_ext(&mut ext, 0x000a, &[0, 6, 0, 0x1d, 0, 0x17, 0, 0x18]);
    // ec_point_formats: uncompressed
    push_ext(&mut ext, 0x000b, &[1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);

    let mut hs = Vec::with_capacity(body.len() + 4);
    hs.push(0x01); // ClientHello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = Vec::with_capacity(hs.len() + 5);
    record.push(0x16);
    record.extend_from_slice(&[0x03, 0x01]); // record version: TLS 1.0, as real clients send
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// What the server answered to a ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloReply {
    /// A ServerHello selecting this version: the server accepts it.
    ServerHello([u8; 2]),
    /// An alert (e.g. 70 protocol_version, 40 handshake_failure): refused.
    Alert(u8),
    /// Not enough bytes yet to tell.
    Incomplete,
    /// Anything else (not TLS, or a message we do not expect first).
    Other,
}

/// Classify the first bytes a server sent after a ClientHello.
pub fn classify_reply(buf: &[u8]) -> HelloReply {
    if buf.len() < 5 {
        return HelloReply::Incomplete;
    }
    match buf[0] {
        0x15 => match buf.get(6) {
            Some(desc) => HelloReply::Alert(*desc),
            None => HelloReply::Incomplete,
        },
        0x16 => {
            // handshake header (type, 3-byte length) then ServerHello's version.
            if buf.len() < 11 {
                return HelloReply::Incomplete;
            }
            if buf[5] == 0x02 {
                HelloReply::ServerHello([buf[9], buf[10]])
            } else {
                HelloReply::Other
            }
        }
        _ => HelloReply::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_lengths_are_consistent() {
        for v in [Legacy::Tls10, Legacy::Tls11] {
            let h = legacy_client_hello(v, Some("db.internal"));
            assert_eq!(h[0], 0x16);
            let rec_len = u16::from_be_bytes([h[3], h[4]]) as usize;
            assert_eq!(rec_len, h.len() - 5);
            assert_eq!(h[5], 0x01);
            let hs_len = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize;
            assert_eq!(hs_len, h.len() - 9);
            assert_eq!([h[9], h[10]], v.wire());
            // Extensions block length matches what follows it.
            let after_suites = 9 + 2 + 32 + 1;
            let suites_len = u16::from_be_bytes([h[after_suites], h[after_suites + 1]]) as usize;
            let ext_at = after_suites + 2 + suites_len + 2;
            let ext_len = u16::from_be_bytes([h[ext_at], h[ext_at + 1]]) as usize;
            assert_eq!(ext_at + 2 + ext_len, h.len());
            assert!(h.windows(11).any(|w| w == b"db.internal"));
        }
        // An IP address is never sent as SNI.
        let h = legacy_client_hello(Legacy::Tls10, Some("127.0.0.1"));
        assert!(!h.windows(9).any(|w| w == b"127.0.0.1"));
    }

    #[test]
    fn replies() {
        assert_eq!(
            classify_reply(&[0x15, 3, 3, 0, 2, 2, 70]),
            HelloReply::Alert(70)
        );
        let sh = [0x16, 3, 1, 0, 60, 0x02, 0, 0, 56, 3, 1, 9];
        assert_eq!(classify_reply(&sh), HelloReply::ServerHello([3, 1]));
        assert_eq!(classify_reply(&sh[..8]), HelloReply::Incomplete);
        assert_eq!(classify_reply(b"EFATAL..."), HelloReply::Other);
        assert_eq!(
            classify_reply(&[0x16, 3, 1, 0, 4, 0x0b, 0, 0, 0, 0, 0]),
            HelloReply::Other
        );
    }
}
