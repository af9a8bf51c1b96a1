//! The header line that opens a port-forward stream on guest vsock port
//! [`crate::AGENT_IO_VSOCK_PORT`] (see "Port forwarding" in agent.proto):
//!
//! ```text
//! forward <tcp port>\n
//! ```
//!
//! Two words, so it can never be read as a three-word stdio header
//! ([`crate::stdio`]). The agent then connects to that port on the guest's
//! loopback (where the pod's containers listen: they share the VM's network
//! namespace) and the stream carries the TCP connection's bytes.

/// The first word of a port-forward header.
pub const FORWARD_WORD: &str = "forward";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForwardHeaderError {
    #[error("port-forward header {0:?}: expected `forward <port 1-65535>`")]
    Malformed(String),
}

/// The header line for forwarding to guest TCP port `port`.
pub fn encode(port: u16) -> String {
    format!("{FORWARD_WORD} {port}\n")
}

/// Whether `line` (newline included) is a port-forward header at all, as
/// opposed to a stdio header; [`parse`] then says whether it is valid.
pub fn is_forward(line: &[u8]) -> bool {
    line.starts_with(FORWARD_WORD.as_bytes()) && line.get(FORWARD_WORD.len()) == Some(&b' ')
}

/// The guest TCP port of a port-forward header line, newline included.
pub fn parse(line: &[u8]) -> Result<u16, ForwardHeaderError> {
    let text = String::from_utf8_lossy(line);
    let malformed = || ForwardHeaderError::Malformed(text.trim_end().to_owned());
    let body = line.strip_suffix(b"\n").ok_or_else(malformed)?;
    let port = body
        .strip_prefix(FORWARD_WORD.as_bytes())
        .and_then(|rest| rest.strip_prefix(b" "))
        .ok_or_else(malformed)?;
    // Digits only: no sign, no spaces, no leading zeros but for none.
    if port.is_empty() || port.len() > 5 || port[0] == b'0' || !port.iter().all(u8::is_ascii_digit)
    {
        return Err(malformed());
    }
    std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_told_apart_from_stdio() {
        for port in [1, 80, 8080, 65535] {
            let line = encode(port);
            assert!(is_forward(line.as_bytes()));
            assert_eq!(parse(line.as_bytes()), Ok(port));
        }
        // A container may be called "forward": its stdio header has three
        // words and is not a port-forward header.
        assert!(!is_forward(b"forwarder - stdout\n"));
        assert!(is_forward(b"forward - stdout\n"));
        assert!(parse(b"forward - stdout\n").is_err());
        assert!(crate::stdio::StreamHeader::parse(b"forward - stdout\n").is_ok());
    }

    #[test]
    fn rejects_bad_ports() {
        for bad in [
            "forward 0\n",
            "forward 65536\n",
            "forward 080\n",
            "forward -1\n",
            "forward +80\n",
            "forward 80 \n",
            "forward  80\n",
            "forward 80",
            "forward \n",
            "forward 999999\n",
            "forward 8o\n",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse(b"forward x\n"),
            Err(ForwardHeaderError::Malformed("forward x".into()))
        );
    }
}
