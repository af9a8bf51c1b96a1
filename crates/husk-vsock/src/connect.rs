//! The host side of the hybrid-vsock `CONNECT` handshake, blocking and async.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest reply accepted: `OK 4294967295\n` is 14 bytes; anything much
/// longer is not a hybrid-vsock VMM talking.
pub(crate) const MAX_REPLY_LEN: usize = 32;
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The deadline passed without a successful handshake.
    #[error(
        "no connection to guest vsock port {port} through {} within {timeout:?}; last attempt: {last}",
        uds.display()
    )]
    Timeout {
        uds: PathBuf,
        port: u32,
        timeout: Duration,
        last: String,
    },
    /// The VMM answered something that is not `OK <n>\n`: not worth retrying.
    #[error("bad hybrid-vsock reply for port {port} through {}: {reply:?}", uds.display())]
    BadReply {
        uds: PathBuf,
        port: u32,
        reply: String,
    },
    /// An error retrying cannot fix (e.g. permission denied on the socket).
    #[error("cannot connect to guest vsock port {port} through {}: {source}", uds.display())]
    Io {
        uds: PathBuf,
        port: u32,
        #[source]
        source: io::Error,
    },
}

/// Where the VMM delivers guest-initiated connections to host port `port`:
/// `<uds>_<port>`.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Connects to guest vsock port `port` through the VMM's hybrid-vsock socket
/// `uds`, retrying with backoff until `timeout` has passed. Blocks.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + timeout;
    let mut backoff = BACKOFF_START;
    loop {
        let last = match attempt_blocking(uds, port, deadline) {
            Ok(stream) => return Ok(stream),
            Err(Failure::Fatal(kind)) => return Err(kind.into_error(uds, port)),
            Err(Failure::Retry(why)) => why,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(timeout_error(uds, port, timeout, last));
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Async twin of [`connect`].
pub async fn connect_async(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<tokio::net::UnixStream, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = BACKOFF_START;
    loop {
        let last = match tokio::time::timeout_at(deadline, attempt_async(uds, port)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(Failure::Fatal(kind))) => return Err(kind.into_error(uds, port)),
            Ok(Err(Failure::Retry(why))) => why,
            Err(_) => "no reply before the deadline".to_string(),
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(timeout_error(uds, port, timeout, last));
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn timeout_error(uds: &Path, port: u32, timeout: Duration, last: String) -> Error {
    Error::Timeout {
        uds: uds.to_owned(),
        port,
        timeout,
        last,
    }
}

/// Why one attempt failed.
pub(crate) enum Failure {
    /// Transient (VMM not up yet, guest not listening yet): try again.
    Retry(String),
    Fatal(FatalKind),
}

pub(crate) enum FatalKind {
    BadReply(String),
    Io(io::Error),
}

impl FatalKind {
    fn into_error(self, uds: &Path, port: u32) -> Error {
        let uds = uds.to_owned();
        match self {
            FatalKind::BadReply(reply) => Error::BadReply { uds, port, reply },
            FatalKind::Io(source) => Error::Io { uds, port, source },
        }
    }
}

fn connect_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput => {
            Failure::Fatal(FatalKind::Io(e))
        }
        // NotFound / ConnectionRefused: the VMM has not bound its socket yet.
        _ => Failure::Retry(format!("connect: {e}")),
    }
}

/// Accumulates the reply line byte by byte: reading more than the line
/// would swallow the first bytes of the guest's stream.
#[derive(Default)]
pub(crate) struct Reply {
    buf: Vec<u8>,
}

pub(crate) enum Step {
    More,
    Done(Result<(), Failure>),
}

impl Reply {
    /// Feeds the result of a one-byte read (`None` = EOF).
    pub(crate) fn feed(&mut self, byte: Option<u8>) -> Step {
        let Some(byte) = byte else {
            let why = if self.buf.is_empty() {
                "VMM closed the stream without a reply (guest port not listening yet?)".to_string()
            } else {
                format!("VMM closed the stream mid-reply after {:?}", self.lossy())
            };
            return Step::Done(Err(Failure::Retry(why)));
        };
        if byte != b'\n' {
            self.buf.push(byte);
            if self.buf.len() >= MAX_REPLY_LEN {
                return Step::Done(Err(Failure::Fatal(FatalKind::BadReply(format!(
                    "{}... (no newline within {MAX_REPLY_LEN} bytes)",
                    self.lossy()
                )))));
            }
            return Step::More;
        }
        if parse_ok_line(&self.buf).is_some() {
            Step::Done(Ok(()))
        } else {
            Step::Done(Err(Failure::Fatal(FatalKind::BadReply(self.lossy()))))
        }
    }

    fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// `OK <u32>` (the newline already stripped) → the host-side port number.
fn parse_ok_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"OK ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn attempt_blocking(uds: &Path, port: u32, deadline: Instant) -> Result<UnixStream, Failure> {
    let mut stream = UnixStream::connect(uds).map_err(connect_failure)?;
    // A VMM that accepts and then says nothing must not hold us past the
    // deadline; zero is not a valid socket timeout, hence the floor.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let set_timeouts = |s: &UnixStream, t: Option<Duration>| {
        s.set_read_timeout(t)?;
        s.set_write_timeout(t)
    };
    set_timeouts(&stream, Some(left)).map_err(|e| Failure::Retry(format!("setsockopt: {e}")))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| Failure::Retry(format!("write CONNECT: {e}")))?;
    let mut reply = Reply::default();
    loop {
        let mut byte = [0u8; 1];
        let got = match stream.read(&mut byte) {
            Ok(0) => None,
            Ok(_) => Some(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Retry(format!("read reply: {e}"))),
        };
        match reply.feed(got) {
            Step::More => {}
            Step::Done(result) => {
                result?;
                break;
            }
        }
    }
    set_timeouts(&stream, None).map_err(|e| Failure::Retry(format!("setsockopt: {e}")))?;
    Ok(stream)
}

async fn attempt_async(uds: &Path, port: u32) -> Result<tokio::net::UnixStream, Failure> {
    let mut stream = tokio::net::UnixStream::connect(uds)
        .await
        .map_err(connect_failure)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| Failure::Retry(format!("write CONNECT: {e}")))?;
    let mut reply = Reply::default();
    loop {
        let mut byte = [0u8; 1];
        let got = match stream.read(&mut byte).await {
            Ok(0) => None,
            Ok(_) => Some(byte[0]),
            Err(e) => return Err(Failure::Retry(format!("read reply: {e}"))),
        };
        match reply.feed(got) {
            Step::More => {}
            Step::Done(result) => return result.map(|()| stream),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// What the fake VMM does with the n-th connection.
    #[derive(Clone)]
    enum Answer {
        /// Close without replying (guest not listening).
        Close,
        /// Reply with these raw bytes, then echo the guest side.
        Reply(&'static [u8]),
    }

    /// A fake VMM hybrid-vsock socket. Checks the CONNECT line it receives,
    /// answers per `script` (the last entry repeats), and then behaves like
    /// the guest port: sends `GUEST-HELLO` and echoes what it reads.
    struct FakeVmm {
        dir: tempfile::TempDir,
        accepted: Arc<AtomicUsize>,
    }

    impl FakeVmm {
        fn start(expect_port: u32, script: Vec<Answer>) -> FakeVmm {
            let dir = tempfile::tempdir().unwrap();
            let listener = UnixListener::bind(dir.path().join("vsock.sock")).unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let count = accepted.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let answer = script[n.min(script.len() - 1)].clone();
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while conn.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    assert_eq!(line, format!("CONNECT {expect_port}").into_bytes());
                    match answer {
                        Answer::Close => drop(conn),
                        Answer::Reply(bytes) => {
                            // The greeting goes out in the same write as the
                            // reply: the client must not swallow it.
                            let mut out = bytes.to_vec();
                            out.extend_from_slice(b"GUEST-HELLO\n");
                            if conn.write_all(&out).is_err() {
                                continue;
                            }
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 256];
                                while let Ok(n @ 1..) = conn.read(&mut buf) {
                                    if conn.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                    }
                }
            });
            FakeVmm { dir, accepted }
        }

        fn uds(&self) -> PathBuf {
            self.dir.path().join("vsock.sock")
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    fn assert_guest_stream(stream: &mut UnixStream) {
        let mut hello = [0u8; 12];
        stream.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"GUEST-HELLO\n");
        stream.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping");
    }

    #[test]
    fn connects_on_ok() {
        let vmm = FakeVmm::start(1024, vec![Answer::Reply(b"OK 1073741824\n")]);
        let mut stream = connect(&vmm.uds(), 1024, Duration::from_secs(5)).unwrap();
        assert_guest_stream(&mut stream);
        assert_eq!(vmm.accepted(), 1);
        // The handshake's timeouts must not leak into the caller's stream.
        assert_eq!(stream.read_timeout().unwrap(), None);
    }

    #[test]
    fn retries_until_the_guest_listens() {
        let script = vec![
            Answer::Close,
            Answer::Close,
            Answer::Close,
            Answer::Reply(b"OK 7\n"),
        ];
        let vmm = FakeVmm::start(1024, script);
        let mut stream = connect(&vmm.uds(), 1024, Duration::from_secs(5)).unwrap();
        assert_guest_stream(&mut stream);
        assert_eq!(vmm.accepted(), 4);
    }

    #[test]
    fn waits_for_the_vmm_socket_to_appear() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("late.sock");
        let bind_at = uds.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let listener = UnixListener::bind(bind_at).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            conn.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1024\n");
            conn.write_all(b"OK 1\n").unwrap();
            conn
        });
        let started = Instant::now();
        connect(&uds, 1024, Duration::from_secs(5)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        drop(server.join().unwrap());
    }

    #[test]
    fn deadline_error_names_uds_port_and_last_failure() {
        let vmm = FakeVmm::start(1025, vec![Answer::Close]);
        let started = Instant::now();
        let err = connect(&vmm.uds(), 1025, Duration::from_millis(300)).unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert!(matches!(err, Error::Timeout { port: 1025, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("1025"), "{msg}");
        assert!(msg.contains(&vmm.uds().display().to_string()), "{msg}");
        assert!(msg.contains("without a reply"), "{msg}");
        assert!(vmm.accepted() >= 2, "retried only {} times", vmm.accepted());
    }

    #[test]
    fn deadline_error_when_socket_never_appears() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("absent.sock");
        let err = connect(&uds, 1024, Duration::from_millis(100)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("absent.sock") && msg.contains("connect:"),
            "{msg}"
        );
    }

    #[test]
    fn silent_vmm_is_bounded_by_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        // Accepts (backlog) but never answers.
        let started = Instant::now();
        let err = connect(&uds, 1024, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        drop(listener);
    }

    #[test]
    fn malformed_replies_fail_fast() {
        let cases: [&'static [u8]; 7] = [
            b"ERR no such port\n",
            b"OK\n",
            b"OK \n",
            b"OK 12a\n",
            b"OK 99999999999\n",
            b"ok 5\n",
            b"OK \xff\n",
        ];
        for reply in cases {
            let vmm = FakeVmm::start(1024, vec![Answer::Reply(reply)]);
            let err = connect(&vmm.uds(), 1024, Duration::from_secs(5)).unwrap_err();
            assert!(matches!(err, Error::BadReply { .. }), "{reply:?}: {err:?}");
            assert_eq!(
                vmm.accepted(),
                1,
                "{reply:?}: a bad reply must not be retried"
            );
        }
    }

    #[test]
    fn overlong_reply_is_cut_off() {
        let vmm = FakeVmm::start(1024, vec![Answer::Reply(&[b'O'; 4096])]);
        let err = connect(&vmm.uds(), 1024, Duration::from_secs(5)).unwrap_err();
        match err {
            Error::BadReply { reply, .. } => assert!(reply.len() < 100, "{reply}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_port_path_appends_the_port() {
        assert_eq!(
            host_port_path(Path::new("/run/husk/vm1/vsock.sock"), 1025),
            PathBuf::from("/run/husk/vm1/vsock.sock_1025")
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn async_connect_retries_then_streams() {
        let vmm = FakeVmm::start(1024, vec![Answer::Close, Answer::Reply(b"OK 3\n")]);
        let mut stream = connect_async(&vmm.uds(), 1024, Duration::from_secs(5))
            .await
            .unwrap();
        let mut hello = [0u8; 12];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"GUEST-HELLO\n");
        assert_eq!(vmm.accepted(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn async_connect_deadline_and_bad_reply() {
        let vmm = FakeVmm::start(1024, vec![Answer::Close]);
        let err = connect_async(&vmm.uds(), 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { port: 1024, .. }), "{err:?}");

        let vmm = FakeVmm::start(1024, vec![Answer::Reply(b"NOPE\n")]);
        let err = connect_async(&vmm.uds(), 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BadReply { .. }), "{err:?}");

        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&uds).unwrap();
        let err = connect_async(&uds, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        match err {
            Error::Timeout { last, .. } => assert!(last.contains("deadline"), "{last}"),
            other => panic!("{other:?}"),
        }
    }
}
