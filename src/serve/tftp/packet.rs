//! TFTP packets on the wire: parsing and encoding of RRQ, WRQ, DATA, ACK, ERROR and OACK (RFC 1350, RFC 2347),
//! error codes and option lists. Pure functions on bytes; nothing here touches a socket.

/// TFTP error codes (RFC 1350 section 5, RFC 2347 for 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionRefused,
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> Self {
        match code {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Other(other) => other,
        }
    }
}

/// Transfer mode of a request. `Netascii` is served as octet bytes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// A read or write request: file name, mode and RFC 2347 options in the order the client sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a str,
    pub mode: Mode,
    pub options: Vec<(&'a str, &'a str)>,
}

/// One TFTP packet, borrowing from the datagram it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Read(Request<'a>),
    Write(Request<'a>),
    Data {
        block: u16,
        data: &'a [u8],
    },
    Ack {
        block: u16,
    },
    /// The message is cut at its first invalid UTF-8 byte rather than refused: an error ends a transfer either way.
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    Oack {
        options: Vec<(&'a str, &'a str)>,
    },
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {0} bytes is too short")]
    TooShort(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("the {0} is not terminated by a NUL byte")]
    Unterminated(&'static str),
    #[error("the {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown transfer mode {0:?}")]
    UnknownMode(String),
}

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// Splits a NUL-terminated UTF-8 string off the front of `bytes`.
fn take_str<'a>(bytes: &'a [u8], field: &'static str) -> Result<(&'a str, &'a [u8]), PacketError> {
    let end = bytes.iter().position(|&b| b == 0).ok_or(PacketError::Unterminated(field))?;
    let text = std::str::from_utf8(&bytes[..end]).map_err(|_| PacketError::NotUtf8(field))?;
    Ok((text, &bytes[end + 1..]))
}

/// Option pairs up to the end of the packet. Lenient, as firmware is: parsing stops quietly at NUL padding, at an
/// unterminated or non-UTF-8 string, or at a name without a value.
fn parse_options(mut rest: &[u8]) -> Vec<(&str, &str)> {
    let mut options = Vec::new();
    while rest.first().is_some_and(|&b| b != 0) {
        let Ok((name, after_name)) = take_str(rest, "option name") else { break };
        let Ok((value, after_value)) = take_str(after_name, "option value") else { break };
        options.push((name, value));
        rest = after_value;
    }
    options
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, PacketError> {
    let (filename, rest) = take_str(body, "file name")?;
    let (mode, rest) = take_str(rest, "mode")?;
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        "mail" => Mode::Mail,
        _ => return Err(PacketError::UnknownMode(mode.to_string())),
    };
    Ok(Request { filename, mode, options: parse_options(rest) })
}

fn push_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

impl<'a> Packet<'a> {
    /// Parses one datagram. Never panics, whatever the bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        if bytes.len() < 2 {
            return Err(PacketError::TooShort(bytes.len()));
        }
        let opcode = u16::from_be_bytes([bytes[0], bytes[1]]);
        let body = &bytes[2..];
        let block = || match body {
            [hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(PacketError::TooShort(bytes.len())),
        };
        match opcode {
            OP_RRQ => Ok(Packet::Read(parse_request(body)?)),
            OP_WRQ => Ok(Packet::Write(parse_request(body)?)),
            OP_DATA => Ok(Packet::Data { block: block()?, data: &body[2..] }),
            // Some clients pad ACKs; the bytes after the block number mean nothing.
            OP_ACK => Ok(Packet::Ack { block: block()? }),
            OP_ERROR => {
                let code = ErrorCode::from(block()?);
                let text = &body[2..];
                let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
                let message = match std::str::from_utf8(text) {
                    Ok(message) => message,
                    Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or_default(),
                };
                Ok(Packet::Error { code, message })
            }
            OP_OACK => Ok(Packet::Oack { options: parse_options(body) }),
            other => Err(PacketError::UnknownOpcode(other)),
        }
    }

    /// Appends the packet's wire form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Read(request) | Packet::Write(request) => {
                let opcode = if matches!(self, Packet::Read(_)) { OP_RRQ } else { OP_WRQ };
                out.extend_from_slice(&opcode.to_be_bytes());
                push_str(out, request.filename);
                push_str(out, request.mode.name());
                for (name, value) in &request.options {
                    push_str(out, name);
                    push_str(out, value);
                }
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&data_header(*block));
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&OP_ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&OP_ERROR.to_be_bytes());
                out.extend_from_slice(&u16::from(*code).to_be_bytes());
                // A NUL inside the message would end it early on the client; drop it.
                out.extend(message.bytes().filter(|&b| b != 0));
                out.push(0);
            }
            Packet::Oack { options } => {
                out.extend_from_slice(&OP_OACK.to_be_bytes());
                for (name, value) in options {
                    push_str(out, name);
                    push_str(out, value);
                }
            }
        }
    }

    /// The packet's wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// The four bytes in front of a DATA block's payload.
pub(super) fn data_header(block: u16) -> [u8; 4] {
    let [hi, lo] = block.to_be_bytes();
    [0, OP_DATA as u8, hi, lo]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::tftp::READ_ONLY_MESSAGE;

    pub(crate) fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
        Packet::Read(Request { filename: name, mode: Mode::Octet, options: options.to_vec() }).encode()
    }

    #[test]
    fn parses_a_read_request_with_options() {
        let bytes = b"\x00\x01snponly.efi\x00OCTET\x00blksize\x001468\x00tsize\x000\x00";
        let packet = Packet::parse(bytes).unwrap();
        assert_eq!(
            packet,
            Packet::Read(Request {
                filename: "snponly.efi",
                mode: Mode::Octet,
                options: vec![("blksize", "1468"), ("tsize", "0")],
            })
        );
    }

    #[test]
    fn request_round_trips() {
        let bytes = rrq("a/b.efi", &[("windowsize", "16")]);
        assert_eq!(bytes, b"\x00\x01a/b.efi\x00octet\x00windowsize\x0016\x00");
        let Packet::Read(request) = Packet::parse(&bytes).unwrap() else { panic!("not a read request") };
        assert_eq!(request.options, vec![("windowsize", "16")]);
    }

    #[test]
    fn tolerates_padding_and_incomplete_options() {
        let padded = b"\x00\x01f\x00netascii\x00tsize\x000\x00\x00\x00\x00";
        let Packet::Read(request) = Packet::parse(padded).unwrap() else { panic!() };
        assert_eq!(request.mode, Mode::Netascii);
        assert_eq!(request.options, vec![("tsize", "0")]);
        let dangling = b"\x00\x01f\x00octet\x00blksize\x00";
        let Packet::Read(request) = Packet::parse(dangling).unwrap() else { panic!() };
        assert!(request.options.is_empty());
    }

    #[test]
    fn write_request_and_other_packets() {
        assert!(matches!(Packet::parse(b"\x00\x02up\x00octet\x00"), Ok(Packet::Write(_))));
        assert_eq!(Packet::parse(b"\x00\x04\x12\x34"), Ok(Packet::Ack { block: 0x1234 }));
        assert_eq!(Packet::parse(b"\x00\x04\x00\x07pad"), Ok(Packet::Ack { block: 7 }));
        assert_eq!(Packet::parse(b"\x00\x03\x00\x01abc"), Ok(Packet::Data { block: 1, data: b"abc" }));
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x08refused\x00"),
            Ok(Packet::Error { code: ErrorCode::OptionRefused, message: "refused" })
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x00bad\xffbytes"),
            Ok(Packet::Error { code: ErrorCode::NotDefined, message: "bad" })
        );
        assert_eq!(
            Packet::parse(b"\x00\x06blksize\x00512\x00"),
            Ok(Packet::Oack { options: vec![("blksize", "512")] })
        );
    }

    #[test]
    fn encodes_exact_bytes() {
        assert_eq!(Packet::Ack { block: 65535 }.encode(), b"\x00\x04\xff\xff");
        assert_eq!(Packet::Data { block: 2, data: b"xy" }.encode(), b"\x00\x03\x00\x02xy");
        assert_eq!(
            Packet::Error { code: ErrorCode::AccessViolation, message: READ_ONLY_MESSAGE }.encode(),
            b"\x00\x05\x00\x02kiln's TFTP server is read-only\x00"
        );
        assert_eq!(Packet::Error { code: ErrorCode::Other(99), message: "a\0b" }.encode(), b"\x00\x05\x00\x63ab\x00");
        assert_eq!(
            Packet::Oack { options: vec![("tsize", "123"), ("blksize", "1468")] }.encode(),
            b"\x00\x06tsize\x00123\x00blksize\x001468\x00"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Packet::parse(b""), Err(PacketError::TooShort(0)));
        assert_eq!(Packet::parse(b"\x01"), Err(PacketError::TooShort(1)));
        assert_eq!(Packet::parse(b"\x00\x04\x01"), Err(PacketError::TooShort(3)));
        assert_eq!(Packet::parse(b"\x00\x03"), Err(PacketError::TooShort(2)));
        assert_eq!(Packet::parse(b"\x00\x09xx"), Err(PacketError::UnknownOpcode(9)));
        assert_eq!(Packet::parse(b"\x00\x01name"), Err(PacketError::Unterminated("file name")));
        assert_eq!(Packet::parse(b"\x00\x01name\x00octet"), Err(PacketError::Unterminated("mode")));
        assert_eq!(Packet::parse(b"\x00\x01\xff\x00octet\x00"), Err(PacketError::NotUtf8("file name")));
        assert_eq!(Packet::parse(b"\x00\x01f\x00binary\x00"), Err(PacketError::UnknownMode("binary".into())));
        // Every prefix of a valid request, and a spread of byte patterns, parse or fail cleanly.
        let valid = rrq("snponly.efi", &[("blksize", "1468"), ("tsize", "0")]);
        for end in 0..valid.len() {
            let _ = Packet::parse(&valid[..end]);
        }
        let mut seed: u32 = 1;
        for _ in 0..5000 {
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                    (seed >> 16) as u8 % 8
                })
                .collect();
            let _ = Packet::parse(&bytes);
        }
    }
}
