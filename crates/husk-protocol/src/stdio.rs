//! The header line that opens a stdio stream on guest vsock port
//! [`crate::AGENT_IO_VSOCK_PORT`] (see "Stdio streams" in agent.proto):
//!
//! ```text
//! <container_id> <exec_id or -> <stdin|stdout|stderr|terminal>\n
//! ```
//!
//! Shared by the agent (which parses it) and the host (which writes it), so
//! the two cannot drift apart.

use std::fmt;

use crate::ids::{self, IdError};

/// Longest header accepted, newline included.
pub const MAX_HEADER_LEN: usize = 512;
/// Stands for the container's init process in the exec-id position.
pub const INIT_PROCESS: &str = "-";

/// Which of a process's streams a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StdioKind {
    Stdin,
    Stdout,
    Stderr,
    /// The pty master, both directions.
    Terminal,
}

impl StdioKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StdioKind::Stdin => "stdin",
            StdioKind::Stdout => "stdout",
            StdioKind::Stderr => "stderr",
            StdioKind::Terminal => "terminal",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "stdin" => StdioKind::Stdin,
            "stdout" => StdioKind::Stdout,
            "stderr" => StdioKind::Stderr,
            "terminal" => StdioKind::Terminal,
            _ => return None,
        })
    }
}

impl fmt::Display for StdioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed header. `exec_id` is `None` for the init process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    pub exec_id: Option<String>,
    pub kind: StdioKind,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("stdio header is longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("stdio header does not end with a newline")]
    Unterminated,
    #[error("stdio header is not UTF-8")]
    NotUtf8,
    #[error(
        "stdio header {0:?}: expected `<container_id> <exec_id|-> <stdin|stdout|stderr|terminal>`"
    )]
    Malformed(String),
    #[error("stdio header: unknown stream {0:?}")]
    UnknownKind(String),
    #[error("stdio header: {0}")]
    BadId(#[from] IdError),
}

impl StreamHeader {
    /// The header line, newline included; fails on ids the agent would reject.
    pub fn encode(&self) -> Result<String, HeaderError> {
        ids::validate(&self.container_id)?;
        if let Some(exec_id) = &self.exec_id {
            ids::validate(exec_id)?;
        }
        let exec = self.exec_id.as_deref().unwrap_or(INIT_PROCESS);
        let line = format!("{} {exec} {}\n", self.container_id, self.kind);
        if line.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
        Ok(line)
    }

    /// Parses a header line, newline included (nothing may follow it).
    pub fn parse(line: &[u8]) -> Result<StreamHeader, HeaderError> {
        if line.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
        let Some(body) = line.strip_suffix(b"\n") else {
            return Err(HeaderError::Unterminated);
        };
        let body = std::str::from_utf8(body).map_err(|_| HeaderError::NotUtf8)?;
        let words: Vec<&str> = body.split(' ').collect();
        let [container_id, exec_id, kind] = words[..] else {
            return Err(HeaderError::Malformed(body.to_owned()));
        };
        ids::validate(container_id)?;
        let exec_id = match exec_id {
            INIT_PROCESS => None,
            id => {
                ids::validate(id)?;
                Some(id.to_owned())
            }
        };
        let kind =
            StdioKind::parse(kind).ok_or_else(|| HeaderError::UnknownKind(kind.to_owned()))?;
        Ok(StreamHeader {
            container_id: container_id.to_owned(),
            exec_id,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(c: &str, e: Option<&str>, kind: StdioKind) -> StreamHeader {
        StreamHeader {
            container_id: c.into(),
            exec_id: e.map(Into::into),
            kind,
        }
    }

    #[test]
    fn round_trips() {
        for h in [
            header("c1", None, StdioKind::Stdout),
            header("pod.ctr_2", Some("exec-1"), StdioKind::Stdin),
            header("x", Some("y"), StdioKind::Terminal),
            header("x", Some("y"), StdioKind::Stderr),
        ] {
            let line = h.encode().unwrap();
            assert!(line.ends_with('\n'));
            assert_eq!(StreamHeader::parse(line.as_bytes()).unwrap(), h);
        }
        assert_eq!(
            header("c1", None, StdioKind::Stdout).encode().unwrap(),
            "c1 - stdout\n"
        );
    }

    #[test]
    fn rejects_bad_headers() {
        use HeaderError::*;
        let p = |s: &str| StreamHeader::parse(s.as_bytes());
        assert_eq!(p("c1 - stdout"), Err(Unterminated));
        assert!(matches!(p("c1 stdout\n"), Err(Malformed(_))));
        assert!(matches!(p("c1 - stdout extra\n"), Err(Malformed(_))));
        assert!(matches!(p("c1  - stdout\n"), Err(Malformed(_))));
        assert!(matches!(p("c1 - stdwhat\n"), Err(UnknownKind(_))));
        assert!(matches!(p("../x - stdout\n"), Err(BadId(_))));
        assert!(matches!(p("c1 .. stdout\n"), Err(BadId(_))));
        assert_eq!(
            StreamHeader::parse(&[b'a'; MAX_HEADER_LEN + 1]),
            Err(TooLong)
        );
        assert_eq!(StreamHeader::parse(b"c\xff - stdout\n"), Err(NotUtf8));
        assert!(header("a b", None, StdioKind::Stdin).encode().is_err());
    }
}
