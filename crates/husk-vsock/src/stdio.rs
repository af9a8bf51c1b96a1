//! Attaching to a process's stdio in the guest: one stream per stdio kind
//! on guest vsock port [`husk_protocol::AGENT_IO_VSOCK_PORT`], opened with a
//! [`StreamHeader`] line (see "Stdio streams" in agent.proto).
//!
//! After the header the stream is raw bytes: read stdout/stderr to EOF (the
//! agent shuts the stream down once the process's pipe reached EOF), write
//! stdin and shut down the write half for EOF; `terminal` is both ways.

use std::path::Path;
use std::time::Duration;

use husk_protocol::stdio::{HeaderError, StreamHeader};
pub use husk_protocol::stdio::{StdioKind, INIT_PROCESS};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::connect::{connect_async, Error};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Connect(#[from] Error),
    #[error("cannot attach {kind} of {container_id}/{exec}: {source}", exec = exec_id.as_deref().unwrap_or(INIT_PROCESS))]
    Header {
        container_id: String,
        exec_id: Option<String>,
        kind: StdioKind,
        #[source]
        source: HeaderError,
    },
    #[error("writing the stdio header: {0}")]
    Io(#[from] std::io::Error),
}

/// Connects to the agent's stdio port through the VMM's hybrid-vsock socket
/// `uds` (retrying until `timeout`, like [`connect_async`]) and asks for
/// stream `kind` of process `exec_id` (`None`: the init process) of
/// `container_id`. The agent closes the stream if there is no such process
/// or stream, or it is already attached.
pub async fn attach_stdio(
    uds: &Path,
    container_id: &str,
    exec_id: Option<&str>,
    kind: StdioKind,
    timeout: Duration,
) -> Result<tokio::net::UnixStream, AttachError> {
    let line = header_line(container_id, exec_id, kind)?;
    let mut stream = connect_async(uds, husk_protocol::AGENT_IO_VSOCK_PORT, timeout).await?;
    stream.write_all(line.as_bytes()).await?;
    Ok(stream)
}

/// Writes the header on an already connected stream (e.g. the Unix socket
/// of an agent running on the host with `--io-listen`).
pub async fn send_stdio_header<S: AsyncWrite + Unpin>(
    stream: &mut S,
    container_id: &str,
    exec_id: Option<&str>,
    kind: StdioKind,
) -> Result<(), AttachError> {
    let line = header_line(container_id, exec_id, kind)?;
    stream.write_all(line.as_bytes()).await?;
    Ok(())
}

fn header_line(
    container_id: &str,
    exec_id: Option<&str>,
    kind: StdioKind,
) -> Result<String, AttachError> {
    let header = StreamHeader {
        container_id: container_id.to_owned(),
        exec_id: exec_id.map(str::to_owned),
        kind,
    };
    header.encode().map_err(|source| AttachError::Header {
        container_id: container_id.to_owned(),
        exec_id: exec_id.map(str::to_owned),
        kind,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// A fake VMM that accepts `CONNECT 1026`, answers OK, and hands back
    /// everything the host then wrote.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_connect_then_header_then_data() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock");
        let vmm = tokio::net::UnixListener::bind(&uds).unwrap();
        let guest = tokio::spawn(async move {
            let (conn, _) = vmm.accept().await.unwrap();
            let mut conn = BufReader::new(conn);
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1026\n");
            conn.get_mut().write_all(b"OK 7\n").await.unwrap();
            let mut rest = String::new();
            conn.read_to_string(&mut rest).await.unwrap();
            rest
        });
        let mut stream = attach_stdio(
            &uds,
            "c1",
            Some("e1"),
            StdioKind::Stdin,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(guest.await.unwrap(), "c1 e1 stdin\nhello");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bad_ids_fail_before_connecting() {
        let err = attach_stdio(
            Path::new("/nonexistent/vsock"),
            "../etc",
            None,
            StdioKind::Stdout,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AttachError::Header { .. }), "{err}");
        assert!(err.to_string().contains("../etc"), "{err}");
    }
}
