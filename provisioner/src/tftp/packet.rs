//! TFTP packets (RFC 1350) with options (RFC 2347): parsing what clients send, writing what
//! the server sends. Pure; never panics on any input.

/// Error codes (RFC 1350 §5, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined, see message.
    Undefined = 0,
    /// File not found.
    FileNotFound = 1,
    /// Access violation.
    AccessViolation = 2,
    /// Illegal TFTP operation.
    IllegalOperation = 4,
    /// Unknown transfer ID.
    UnknownTransferId = 5,
    /// Option negotiation refused (RFC 2347).
    OptionRefused = 8,
}

/// A packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket {
    /// Read request: file name, mode, and options (names lower-cased) in order.
    Read {
        /// The requested file.
        filename: String,
        /// `octet` or `netascii` (lower-cased).
        mode: String,
        /// Requested options.
        options: Vec<(String, String)>,
    },
    /// Write request (refused: the server is read-only).
    Write {
        /// The file.
        filename: String,
    },
    /// Acknowledgement of a block.
    Ack(u16),
    /// The client gives up.
    Error {
        /// Its code.
        code: u16,
        /// Its message.
        message: String,
    },
}

/// Why a datagram is not a packet the server accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than its opcode.
    #[error("truncated packet")]
    Truncated,
    /// An opcode a client may not send.
    #[error("unexpected opcode {0}")]
    Opcode(u16),
    /// A string field without its NUL terminator, or not UTF-8.
    #[error("malformed string field")]
    BadString,
    /// An option without a value.
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
}

/// Parses one datagram from a client.
pub fn parse(buf: &[u8]) -> Result<ClientPacket, PacketError> {
    let (op, rest) = match buf {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
        _ => return Err(PacketError::Truncated),
    };
    match op {
        1 | 2 => {
            let mut fields = cstrings(rest)?;
            let filename = fields.next().ok_or(PacketError::BadString)?;
            let mode = fields.next().ok_or(PacketError::BadString)?.to_ascii_lowercase();
            if op == 2 {
                return Ok(ClientPacket::Write { filename });
            }
            let mut options = Vec::new();
            while let Some(name) = fields.next() {
                let value = fields.next().ok_or_else(|| PacketError::OptionWithoutValue(name.clone()))?;
                options.push((name.to_ascii_lowercase(), value));
            }
            Ok(ClientPacket::Read { filename, mode, options })
        }
        4 => match rest {
            [a, b, ..] => Ok(ClientPacket::Ack(u16::from_be_bytes([*a, *b]))),
            _ => Err(PacketError::Truncated),
        },
        5 => match rest {
            [a, b, msg @ ..] => {
                let message = String::from_utf8_lossy(msg.split(|&c| c == 0).next().unwrap_or_default()).into_owned();
                Ok(ClientPacket::Error { code: u16::from_be_bytes([*a, *b]), message })
            }
            _ => Err(PacketError::Truncated),
        },
        other => Err(PacketError::Opcode(other)),
    }
}

/// NUL-terminated UTF-8 strings; a trailing fragment without NUL is an error.
fn cstrings(buf: &[u8]) -> Result<impl Iterator<Item = String> + '_, PacketError> {
    if buf.last().is_some_and(|&b| b != 0) {
        return Err(PacketError::BadString);
    }
    let parts: Vec<&[u8]> = buf.split(|&b| b == 0).collect();
    // split yields an empty tail after the last NUL.
    let parts = &parts[..parts.len().saturating_sub(1)];
    let strings: Result<Vec<String>, _> =
        parts.iter().map(|p| std::str::from_utf8(p).map(str::to_owned).map_err(|_| PacketError::BadString)).collect();
    Ok(strings?.into_iter())
}

/// Writes a DATA packet header for `block` into `out` (the caller appends the data).
pub fn data_header(out: &mut Vec<u8>, block: u16) {
    out.clear();
    out.extend_from_slice(&3u16.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

/// An ERROR packet.
pub fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.extend_from_slice(&5u16.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.push(0);
    out
}

/// An OACK packet acknowledging `options`.
pub fn oack(options: &[(&str, String)]) -> Vec<u8> {
    let mut out = vec![0, 6];
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_requests_with_options() {
        let p = parse(b"\x00\x01undionly.kpxe\x00OCTET\x00BLKSIZE\x001428\x00tsize\x000\x00").expect("rrq");
        assert_eq!(
            p,
            ClientPacket::Read {
                filename: "undionly.kpxe".into(),
                mode: "octet".into(),
                options: vec![("blksize".into(), "1428".into()), ("tsize".into(), "0".into())],
            }
        );
        assert_eq!(parse(b"\x00\x04\x01\x02").expect("ack"), ClientPacket::Ack(0x0102));
        assert_eq!(
            parse(b"\x00\x05\x00\x08no\x00").expect("err"),
            ClientPacket::Error { code: 8, message: "no".into() }
        );
        assert_eq!(parse(b"\x00\x02f\x00octet\x00").expect("wrq"), ClientPacket::Write { filename: "f".into() });
    }

    #[test]
    fn malformed_packets_are_refused() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x00",
            b"\x00\x01",
            b"\x00\x01file",
            b"\x00\x01file\x00",
            b"\x00\x01file\x00octet\x00blksize\x00",
            b"\x00\x01\xff\xfe\x00octet\x00",
            b"\x00\x03\x00\x01data",
            b"\x00\x06",
            b"\x00\x04\x01",
            b"\x00\x09",
        ];
        for c in cases {
            assert!(parse(c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn server_packets_are_well_formed() {
        assert_eq!(error(ErrorCode::FileNotFound, "nope"), b"\x00\x05\x00\x01nope\x00");
        assert_eq!(oack(&[("blksize", "1428".into())]), b"\x00\x06blksize\x001428\x00");
        let mut d = Vec::new();
        data_header(&mut d, 258);
        assert_eq!(d, b"\x00\x03\x01\x02");
    }
}
