//! Unix socket operations std lacks: a connect that cannot block (a blocking
//! connect to a listener with a full backlog would stall the whole device on a
//! guest's request), and sends that cannot raise SIGPIPE when the host end is gone.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vm_memory::VolatileSlice;

/// AF_UNIX (1) as sockaddr_un's family field: a constant that fits.
#[allow(clippy::cast_possible_truncation)]
const AF_UNIX_FAMILY: libc::sa_family_t = libc::AF_UNIX as libc::sa_family_t;

/// Connects to the Unix stream socket at `path` without blocking. A listener
/// whose backlog is full refuses (EAGAIN) instead of making us wait.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = AF_UNIX_FAMILY;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        // The path's bytes, as C chars.
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialized sockaddr_un that outlives the call, and
    // `len` (at most its size: the path check above) tells the kernel how much to read.
    let ret = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            libc::socklen_t::try_from(len)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"))?,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// One non-blocking send of `len` bytes at `ptr`, without SIGPIPE.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn send_raw(stream: &UnixStream, ptr: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees `ptr`/`len`; the fd is owned by `stream`.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                ptr.cast::<libc::c_void>(),
                len,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sends as much of `buf` as the socket takes now.
pub fn send_bytes(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice of `buf.len()` bytes.
    unsafe { send_raw(stream, buf.as_ptr(), buf.len()) }
}

/// Sends as much of a guest memory slice as the socket takes now.
pub fn send_volatile(stream: &UnixStream, buf: &VolatileSlice<'_, ()>) -> io::Result<usize> {
    let guard = buf.ptr_guard();
    // SAFETY: a VolatileSlice is valid for reads of its length while the guard lives;
    // the kernel copies the bytes, so concurrent guest writes only affect what is sent.
    unsafe { send_raw(stream, guard.as_ptr(), buf.len()) }
}

/// Writes out `buf` until it is empty or the socket would block; returns the bytes written.
pub fn flush(stream: &UnixStream, buf: &mut VecDeque<u8>) -> io::Result<usize> {
    let mut total = 0;
    while !buf.is_empty() {
        let (front, _) = buf.as_slices();
        match send_bytes(stream, front) {
            Ok(0) => break,
            Ok(n) => {
                buf.drain(..n);
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Whether an I/O error just means "not now".
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_without_blocking_and_refuses_missing_or_bad_paths() {
        let dir = std::env::temp_dir().join(format!("husk-uds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();

        let s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut q: VecDeque<u8> = b"hello".iter().copied().collect();
        assert_eq!(flush(&s, &mut q).unwrap(), 5);
        assert!(q.is_empty());
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        assert!(connect_nonblocking(&dir.join("missing.sock")).is_err());
        let long = dir.join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        drop(peer);
        // The peer is gone: send fails with EPIPE instead of killing us with SIGPIPE.
        let err = (0..10)
            .find_map(|_| send_bytes(&s, b"x").err())
            .expect("send to a closed peer must fail");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
