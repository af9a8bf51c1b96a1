//! The host side of a host-initiated connection before it reaches the guest:
//! a client connected to the device's Unix socket and must send
//! `CONNECT <port>\n` within a deadline.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Longest accepted line, newline included ("CONNECT 4294967295\n" is 19 bytes).
pub const MAX_LINE: usize = 32;

/// Why a handshake ended without a port.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed the stream before a full line.
    #[error("host client closed the stream before sending a CONNECT line")]
    Eof,
    /// The line is longer than [`MAX_LINE`].
    #[error("CONNECT line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>`.
    #[error("malformed CONNECT line {0:?}")]
    Malformed(String),
    /// Reading the stream failed.
    #[error("reading the CONNECT line: {0}")]
    Io(#[from] io::Error),
}

/// A host client that has not finished its `CONNECT` line.
pub struct Handshake {
    pub stream: UnixStream,
    pub deadline: Instant,
    line: Vec<u8>,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            deadline,
            line: Vec::with_capacity(MAX_LINE),
        }
    }

    /// Reads what the client sent so far. `Ok(Some(port))` once the line is
    /// complete, `Ok(None)` if more is needed.
    ///
    /// Reads one byte at a time so that nothing after the newline is consumed:
    /// those bytes are the start of the stream's payload for the guest.
    pub fn advance(&mut self) -> Result<Option<u32>, HandshakeError> {
        loop {
            let mut byte = [0u8; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            if byte[0] == b'\n' {
                return parse_connect(&self.line).map(Some);
            }
            self.line.push(byte[0]);
            if self.line.len() >= MAX_LINE {
                return Err(HandshakeError::TooLong);
            }
        }
    }
}

/// Parses `CONNECT <port>` (newline already stripped) the way Firecracker and
/// Kata clients write it: one space, a decimal u32, nothing else.
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let digits = line.strip_prefix(b"CONNECT ").ok_or_else(malformed)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn parses_only_well_formed_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT +5",
            b"CONNECT -5",
            b"CONNECT ",
            b"CONNECT 5 ",
            b"CONNECT  5",
            b"connect 5",
            b"CONNECT 5\r",
            b"",
            b"\xff\xfe",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn pair() -> (UnixStream, Handshake) {
        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        (client, Handshake::new(server, deadline))
    }

    #[test]
    fn line_may_arrive_in_pieces_and_payload_after_it_is_left_unread() {
        let (mut client, mut hs) = pair();
        assert!(hs.advance().unwrap().is_none());
        client.write_all(b"CONN").unwrap();
        assert!(hs.advance().unwrap().is_none());
        client.write_all(b"ECT 1024\npayload").unwrap();
        assert_eq!(hs.advance().unwrap(), Some(1024));
        let mut rest = [0u8; 7];
        hs.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn overlong_garbage_and_eof_end_the_handshake() {
        let (mut client, mut hs) = pair();
        client.write_all(&[b'A'; 100]).unwrap();
        assert!(matches!(hs.advance(), Err(HandshakeError::TooLong)));

        let (mut client, mut hs) = pair();
        client.write_all(b"HELLO\n").unwrap();
        assert!(matches!(hs.advance(), Err(HandshakeError::Malformed(_))));

        let (client, mut hs) = pair();
        drop(client);
        assert!(matches!(hs.advance(), Err(HandshakeError::Eof)));
    }
}
