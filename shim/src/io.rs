//! A process's stdio: containerd's FIFOs on one side, the agent's vsock
//! streams (one per stdio kind) on the other, copied with fixed-size
//! buffers so the shim's memory does not grow with the output.
//!
//! Nothing is lost at exit: the agent shuts an output stream down only after
//! the process's pipe reached EOF, and the exit is published only after the
//! copies here reached EOF too (see process.rs).

use husk_vsock::StdioKind;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::{Agent, ProcessRef};

/// Copy buffer: large enough for throughput, fixed so memory stays flat.
const COPY_BUFFER: usize = 64 * 1024;

/// The FIFO paths containerd gave for a process ("" = not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Stdio {
    /// Which streams the host will attach, as the agent is told.
    pub fn to_agent(&self) -> husk_protocol::agent::Stdio {
        let mut s = husk_protocol::agent::Stdio::new();
        s.terminal = self.terminal;
        s.stdin = !self.stdin.is_empty();
        s.stdout = !self.stdout.is_empty();
        s.stderr = !self.stderr.is_empty() && !self.terminal;
        s
    }
}

/// Errors attaching stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open {path}: {source}")]
    Fifo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Attach(#[from] husk_vsock::AttachError),
}

/// The running copies of one process.
#[derive(Default)]
pub struct AttachedIo {
    /// Stops the stdin copy and half-closes the stream (CloseIO).
    close_stdin: Option<oneshot::Sender<()>>,
    outputs: Vec<JoinHandle<()>>,
}

impl AttachedIo {
    /// Stops forwarding stdin; the guest sees EOF.
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.close_stdin.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until every output stream reached EOF and was written out.
    pub async fn wait_outputs(&mut self) {
        for handle in self.outputs.drain(..) {
            let _ = handle.await;
        }
    }
}

fn open_output(path: &str) -> Result<pipe::Sender, IoError> {
    // Read-write, as containerd's own shims do: the FIFO stays valid when a
    // client detaches and reattaches, instead of failing with EPIPE.
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(|source| IoError::Fifo {
            path: path.to_string(),
            source,
        })
}

fn open_input(path: &str) -> Result<pipe::Receiver, IoError> {
    pipe::OpenOptions::new()
        .open_receiver(path)
        .map_err(|source| IoError::Fifo {
            path: path.to_string(),
            source,
        })
}

/// Connects the process's streams through `agent` and starts copying.
pub async fn attach(
    agent: &dyn Agent,
    process: ProcessRef<'_>,
    stdio: &Stdio,
) -> Result<AttachedIo, IoError> {
    let mut io = AttachedIo::default();
    let connect = |kind| agent.connect_stdio(process, kind);
    let (container_id, exec_id) = (process.container_id, process.exec());
    let label = format!("{container_id}/{}", exec_id.unwrap_or("init"));

    if stdio.terminal {
        let stream = connect(StdioKind::Terminal).await?;
        let (from_guest, to_guest) = stream.into_split();
        if !stdio.stdout.is_empty() {
            let out = open_output(&stdio.stdout)?;
            io.outputs
                .push(spawn_output(from_guest, out, label.clone()));
        }
        if !stdio.stdin.is_empty() {
            io.close_stdin = Some(spawn_input(open_input(&stdio.stdin)?, to_guest, label));
        }
        return Ok(io);
    }
    for (kind, path) in [
        (StdioKind::Stdout, &stdio.stdout),
        (StdioKind::Stderr, &stdio.stderr),
    ] {
        if !path.is_empty() {
            let out = open_output(path)?;
            let stream = connect(kind).await?;
            io.outputs.push(spawn_output(
                stream,
                out,
                format!("{label} {}", kind.as_str()),
            ));
        }
    }
    if !stdio.stdin.is_empty() {
        let input = open_input(&stdio.stdin)?;
        let stream = connect(StdioKind::Stdin).await?;
        io.close_stdin = Some(spawn_input(input, stream, label));
    }
    Ok(io)
}

fn spawn_output<R, W>(from_guest: R, mut to_fifo: W, label: String) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(COPY_BUFFER, from_guest);
        match tokio::io::copy_buf(&mut reader, &mut to_fifo).await {
            Ok(bytes) => tracing::debug!("{label}: {bytes} bytes of output copied"),
            Err(e) => tracing::warn!("{label}: output copy stopped: {e}"),
        }
        let _ = to_fifo.flush().await;
    })
}

fn spawn_input<R, W>(from_fifo: R, mut to_guest: W, label: String) -> oneshot::Sender<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (close_tx, close_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(COPY_BUFFER, from_fifo);
        tokio::select! {
            result = tokio::io::copy_buf(&mut reader, &mut to_guest) => {
                if let Err(e) = result {
                    tracing::warn!("{label}: stdin copy stopped: {e}");
                }
            }
            _ = close_rx => {}
        }
        // EOF for the process (for a terminal: the write half only).
        let _ = to_guest.shutdown().await;
    });
    close_tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_is_told_which_streams_come() {
        let s = Stdio {
            stdin: "".into(),
            stdout: "/run/out".into(),
            stderr: "/run/err".into(),
            terminal: false,
        };
        let a = s.to_agent();
        assert!(!a.stdin && a.stdout && a.stderr && !a.terminal);
        let t = Stdio {
            terminal: true,
            stdin: "/run/in".into(),
            ..s
        };
        let a = t.to_agent();
        assert!(a.stdin && a.stdout && !a.stderr && a.terminal);
    }

    /// 100 MiB through the output copy: byte-exact, and the copy's heap
    /// does not grow with the stream (fixed copy buffers). The copy runs
    /// alone on its own thread so its allocations can be counted exactly.
    #[test]
    fn hundred_mib_stream_in_bounded_memory() {
        const CHUNK: usize = 1 << 20;
        const CHUNKS: usize = 100;
        const TOTAL: usize = CHUNK * CHUNKS;
        let byte_at = |i: usize| u8::try_from(i * 7 % 251).unwrap();
        let peers = || {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            for s in [&a, &b] {
                s.set_nonblocking(true).unwrap();
            }
            (a, b)
        };
        let (guest_side, host_side) = peers();
        let (fifo_writer, fifo_reader) = peers();

        let copy = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let from_guest = tokio::net::UnixStream::from_std(host_side).unwrap();
                let to_fifo = tokio::net::UnixStream::from_std(fifo_writer).unwrap();
                let baseline = crate::alloc_probe::reset_peak();
                spawn_output(from_guest, to_fifo, "test".into())
                    .await
                    .unwrap();
                crate::alloc_probe::peak() - baseline
            })
        });

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let received = rt.block_on(async move {
            let mut guest_side = tokio::net::UnixStream::from_std(guest_side).unwrap();
            let mut fifo_reader = tokio::net::UnixStream::from_std(fifo_reader).unwrap();
            let writer = tokio::spawn(async move {
                let mut chunk = vec![0u8; CHUNK];
                for c in 0..CHUNKS {
                    for (j, b) in chunk.iter_mut().enumerate() {
                        *b = byte_at(c * CHUNK + j);
                    }
                    guest_side.write_all(&chunk).await.unwrap();
                }
                guest_side.shutdown().await.unwrap();
            });
            let (mut received, mut buf) = (0usize, vec![0u8; CHUNK]);
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut fifo_reader, &mut buf)
                    .await
                    .unwrap();
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    assert_eq!(b, byte_at(received), "byte {received}");
                    received += 1;
                }
            }
            writer.await.unwrap();
            received
        });
        let copy_heap_peak = copy.join().unwrap();
        assert_eq!(received, TOTAL);
        // The copy buffer plus task bookkeeping; nothing proportional to
        // the 100 MiB that went through.
        assert!(
            copy_heap_peak < 4 * isize::try_from(COPY_BUFFER).unwrap(),
            "the copy held {copy_heap_peak} bytes of heap while streaming 100 MiB"
        );
    }

    #[tokio::test]
    async fn output_copy_is_byte_exact_and_bounded() {
        let (mut guest_side, host_side) = tokio::net::UnixStream::pair().unwrap();
        let (fifo_writer, mut fifo_reader) = tokio::net::UnixStream::pair().unwrap();
        let handle = spawn_output(host_side, fifo_writer, "test".into());
        let data: Vec<u8> = (0..3 * COPY_BUFFER + 17)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            guest_side.write_all(&data).await.unwrap();
            guest_side.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut fifo_reader, &mut received)
            .await
            .unwrap();
        writer.await.unwrap();
        handle.await.unwrap();
        assert_eq!(received, expected);
    }
}
