//! A process's stdio on the agent's side: the pipes (or pty) it is created
//! with, and the copying between them and the host's streams (see
//! "Stdio streams" in agent.proto and [`crate::io_server`]).
//!
//! Output is copied with 1 MiB reads from pipes enlarged to 1 MiB: at
//! ~0.7 ms per syscall in a nested-KVM guest, bytes per syscall is what
//! throughput is made of. A host stream that goes away does not stall the
//! process: its output is then read and dropped.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use husk_protocol::stdio::StdioKind;
use husk_util::sync::lock;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};

const COPY_BUF: usize = 1 << 20;
const PIPE_SIZE: i32 = 1 << 20;
/// The terminal's end-of-file character (^D): what CloseStdin sends a pty.
const VEOF: u8 = 0x04;

/// A connected host stream, after its header.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}
pub type IoStream = Box<dyn AsyncStream>;

/// Which streams the host will attach (the proto's `Stdio`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

/// What the process is given; moved into libcontainer's builder.
pub enum ChildStdio {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// libcontainer's console socket: the process sends its pty master here.
    Console { socket: PathBuf },
}

/// The agent's ends, before the process exists.
pub struct PendingIo {
    requested: Requested,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    console: Option<Console>,
}

struct Console {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Pipes for the requested streams and /dev/null for the others, or with
/// `terminal` a console socket at `console_socket` (a short path: Unix
/// socket paths are limited to 108 bytes).
pub fn prepare(requested: Requested, console_socket: &Path) -> io::Result<(ChildStdio, PendingIo)> {
    let mut pending = PendingIo {
        requested,
        stdin: None,
        stdout: None,
        stderr: None,
        console: None,
    };
    if requested.terminal {
        let _ = std::fs::remove_file(console_socket);
        let listener = UnixListener::bind(console_socket)?;
        pending.console = Some(Console {
            listener,
            path: console_socket.to_path_buf(),
        });
        let child = ChildStdio::Console {
            socket: console_socket.to_path_buf(),
        };
        return Ok((child, pending));
    }
    let null = || -> io::Result<OwnedFd> {
        Ok(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into())
    };
    let stdin = if requested.stdin {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        pending.stdin = Some(write);
        read
    } else {
        null()?
    };
    let output = |wanted: bool, slot: &mut Option<OwnedFd>| -> io::Result<OwnedFd> {
        if !wanted {
            return null();
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // Best effort: above /proc/sys/fs/pipe-max-size it fails for non-root.
        let _ = fcntl(&read, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        *slot = Some(read);
        Ok(write)
    };
    let stdout = output(requested.stdout, &mut pending.stdout)?;
    let stderr = output(requested.stderr, &mut pending.stderr)?;
    Ok((
        ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        },
        pending,
    ))
}

impl PendingIo {
    /// Once libcontainer created the process: takes the pty master it sent
    /// (blocking; it was sent before the process reported ready).
    pub fn finish(mut self) -> io::Result<ProcessIo> {
        let pty = match self.console.take() {
            None => None,
            Some(console) => Some(Pty {
                master: Arc::new(receive_pty_master(&console.listener)?),
                attached: AtomicBool::new(false),
                close_input: Arc::new(Notify::new()),
            }),
        };
        let r = self.requested;
        let expected = if r.terminal {
            1
        } else {
            usize::from(r.stdout) + usize::from(r.stderr)
        };
        Ok(ProcessIo {
            stdin: Mutex::new(match self.stdin.take() {
                Some(fd) => Input::Pending(fd),
                None => Input::Closed,
            }),
            stdout: Mutex::new(self.stdout.take()),
            stderr: Mutex::new(self.stderr.take()),
            pty,
            expected,
            done: watch::channel(0).0,
        })
    }
}

fn receive_pty_master(listener: &UnixListener) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    // libcontainer connected while creating the process.
    listener.set_nonblocking(true)?;
    let (conn, _) = listener.accept().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the container process never connected to its console socket: {e}"),
        )
    })?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut name = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut fds = fds.into_iter();
            if let Some(fd) = fds.next() {
                // SAFETY: SCM_RIGHTS just installed these descriptors in
                // this process; nothing else owns them.
                let master = unsafe { OwnedFd::from_raw_fd(fd) };
                for extra in fds {
                    // SAFETY: as above; unexpected extras are closed.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                return Ok(master);
            }
        }
    }
    Err(io::Error::other(
        "console socket message carried no pty master",
    ))
}

enum Input {
    Pending(OwnedFd),
    /// Copying; notify to close after what already arrived.
    Attached(Arc<Notify>),
    Closed,
}

struct Pty {
    master: Arc<OwnedFd>,
    attached: AtomicBool,
    close_input: Arc<Notify>,
}

/// A live process's stdio on the agent's side.
pub struct ProcessIo {
    stdin: Mutex<Input>,
    stdout: Mutex<Option<OwnedFd>>,
    stderr: Mutex<Option<OwnedFd>>,
    pty: Option<Pty>,
    /// Output streams that must reach EOF before the exit is reported.
    expected: usize,
    done: watch::Sender<usize>,
}

impl ProcessIo {
    /// Starts copying between `stream` and the process's `kind` stream.
    /// Fails if the process was not created with that stream, or it is
    /// already attached.
    pub fn attach(self: &Arc<Self>, kind: StdioKind, stream: IoStream) -> Result<(), String> {
        match kind {
            StdioKind::Stdout | StdioKind::Stderr => {
                let slot = if kind == StdioKind::Stdout {
                    &self.stdout
                } else {
                    &self.stderr
                };
                let fd = lock(slot)
                    .take()
                    .ok_or_else(|| format!("{kind} was not requested or is already attached"))?;
                let fd = async_fd(fd).map_err(|e| format!("{kind}: {e}"))?;
                let io = self.clone();
                tokio::spawn(async move {
                    copy_out(&fd, stream).await;
                    io.output_done();
                });
            }
            StdioKind::Stdin => {
                let mut input = lock(&self.stdin);
                let Input::Pending(_) = &*input else {
                    return Err("stdin was not requested, is already attached or closed".into());
                };
                let close = Arc::new(Notify::new());
                let Input::Pending(fd) =
                    std::mem::replace(&mut *input, Input::Attached(close.clone()))
                else {
                    unreachable!("checked above")
                };
                let fd = async_fd(fd).map_err(|e| format!("stdin: {e}"))?;
                tokio::spawn(copy_in(stream, fd, close, None));
            }
            StdioKind::Terminal => {
                let pty = self.pty.as_ref().ok_or("the process has no terminal")?;
                if pty.attached.swap(true, Ordering::SeqCst) {
                    return Err("terminal is already attached".into());
                }
                // Two descriptors: each gets its own epoll registration.
                let out = nix::unistd::dup(pty.master.as_fd())
                    .map_err(io::Error::from)
                    .and_then(async_fd)
                    .map_err(|e| format!("terminal: {e}"))?;
                let input = nix::unistd::dup(pty.master.as_fd())
                    .map_err(io::Error::from)
                    .and_then(async_fd)
                    .map_err(|e| format!("terminal: {e}"))?;
                let (reader, writer) = tokio::io::split(stream);
                let input =
                    tokio::spawn(copy_in(reader, input, pty.close_input.clone(), Some(VEOF)));
                let io = self.clone();
                tokio::spawn(async move {
                    copy_out(&out, writer).await;
                    // The process and everything holding its pty are gone.
                    input.abort();
                    io.output_done();
                });
            }
        }
        Ok(())
    }

    fn output_done(&self) {
        self.done.send_modify(|n| *n = n.saturating_add(1));
    }

    /// Every requested output stream was attached, reached EOF and was shut
    /// down (or the process was abandoned).
    pub async fn outputs_finished(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|n| *n >= self.expected).await;
    }

    /// CloseStdin: the pipe closes once what already arrived on the stdin
    /// stream is forwarded (at once if none is attached); a terminal gets
    /// its end-of-file character instead.
    pub fn close_stdin(&self) {
        if let Some(pty) = &self.pty {
            pty.close_input.notify_one();
            return;
        }
        let mut input = lock(&self.stdin);
        if let Input::Attached(close) = &*input {
            close.notify_one();
        }
        *input = Input::Closed;
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let pty = self.pty.as_ref().ok_or("the process has no terminal")?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // points at a live local; the fd is the pty master we own.
        let r = unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if r != 0 {
            return Err(format!("TIOCSWINSZ: {}", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The process is being removed: nobody will attach any more. Drops the
    /// unattached ends and stops holding back the exit report.
    pub fn abandon(&self) {
        lock(&self.stdout).take();
        lock(&self.stderr).take();
        self.close_stdin();
        self.done.send_modify(|n| *n = usize::MAX);
    }
}

fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: the OwnedFd owns its descriptor and lives inside the
    // AsyncFd, which never swaps it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| nix::unistd::read(inner.get_ref(), buf).map_err(io::Error::from))
        {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), buf).map_err(io::Error::from))
        {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Pipe or pty → host, until EOF (EIO on a pty whose other side is all
/// closed), then shuts the stream down.
async fn copy_out(fd: &AsyncFd<OwnedFd>, mut stream: impl AsyncWrite + Unpin) {
    let mut buf = vec![0u8; COPY_BUF];
    let mut host_gone = false;
    loop {
        let n = match read_fd(fd, &mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                tracing::warn!("reading process output: {e}");
                break;
            }
        };
        if !host_gone {
            if let Err(e) = stream.write_all(&buf[..n]).await {
                tracing::debug!("host output stream closed ({e}); discarding the rest");
                host_gone = true;
            }
        }
    }
    if !host_gone {
        let _ = stream.shutdown().await;
    }
}

/// Host → pipe or pty, until the stream's EOF or `close` (then what is
/// already readable is still forwarded, and `eof_char` written if given).
/// Dropping `fd` at the end closes the process's stdin.
async fn copy_in(
    mut stream: impl AsyncRead + Unpin,
    fd: AsyncFd<OwnedFd>,
    close: Arc<Notify>,
    eof_char: Option<u8>,
) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = tokio::select! {
            // A read error ends the stream like EOF does.
            read = stream.read(&mut buf) => read.unwrap_or(0),
            () = close.notified() => {
                // Forward what is already here, without waiting for more.
                while let Some(Ok(n)) = stream.read(&mut buf).now_or_never() {
                    if n == 0 || write_all_fd(&fd, &buf[..n]).await.is_err() {
                        break;
                    }
                }
                if let Some(c) = eof_char {
                    let _ = write_all_fd(&fd, &[c]).await;
                }
                return;
            }
        };
        if n == 0 || write_all_fd(&fd, &buf[..n]).await.is_err() {
            return;
        }
    }
}
