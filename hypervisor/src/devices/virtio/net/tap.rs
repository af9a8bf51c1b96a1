//! Tap devices: opening one (inside a pod's network namespace) and the few
//! ioctls the device needs.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Length of the virtio-net header (`virtio_net_hdr_v1`, with num_buffers)
/// the tap puts in front of every frame: what a VERSION_1 driver uses.
pub const VNET_HDR_LEN: usize = 12;
// ifreq's flags are a C short; these interface flags (IFF_TAP 0x2,
// IFF_NO_PI 0x1000, IFF_VNET_HDR 0x4000, IFF_UP 0x1) fit it.
#[allow(clippy::cast_possible_truncation)]
const IFF_TAP_MODE: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
#[allow(clippy::cast_possible_truncation)]
const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;

/// An open tap queue with a 12-byte virtio-net header, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes
            .iter()
            .any(|&b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        // The name's bytes, as C chars.
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(ifr)
}

fn ifr_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

impl Tap {
    /// Takes over an open tap queue (e.g. one the shim opened itself). It
    /// must be a tap (not tun) opened with IFF_NO_PI and IFF_VNET_HDR; the
    /// header size is set to 12 and the descriptor made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tap> {
        let file = File::from(fd);
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq into `ifr`, which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        check(rc, "not a tun/tap device (TUNGETIFF)")?;
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags });
        if flags & (libc::IFF_TUN | libc::IFF_TAP) != libc::IFF_TAP
            || flags & libc::IFF_NO_PI == 0
            || flags & libc::IFF_VNET_HDR == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a tap with IFF_NO_PI and IFF_VNET_HDR (flags {flags:#x})",
                    ifr_name(&ifr)
                ),
            ));
        }
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN)
            .map_err(|_| io::Error::other("virtio-net header length does not fit an int"))?;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        check(rc, "TUNSETVNETHDRSZ")?;
        // SAFETY: fcntl on a descriptor we own, no pointers.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        check(fl, "F_GETFL")?;
        // SAFETY: as above.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        check(rc, "F_SETFL O_NONBLOCK")?;
        Ok(Tap {
            name: ifr_name(&ifr),
            file,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TUNSETOFFLOAD: which offloads (TUN_F_*) the tap may hand us frames with.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        let arg = libc::c_ulong::from(flags);
        // SAFETY: TUNSETOFFLOAD takes its argument by value, no pointers.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, arg) };
        check(rc, "TUNSETOFFLOAD")
    }

    /// Reads one frame (with its virtio-net header).
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        // Negative (-1) exactly when the call failed.
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (with its virtio-net header).
    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the kernel reads at most buf.len() bytes from buf.
        let n = unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        // Negative (-1) exactly when the call failed.
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Opens the tap `name` (creating it if it does not exist) in the network
/// namespace at `netns` (a path like `/var/run/netns/<name>` or
/// `/proc/<pid>/ns/net`), or in the caller's when `None`, and brings its link
/// up. The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a
/// 12-byte header; a tap this call creates disappears when the returned
/// descriptor (the device holding it) is closed.
///
/// The namespace switch happens on a short-lived thread of its own, so the
/// calling thread's namespace never changes.
pub fn open_tap(name: &str, netns: Option<&Path>) -> io::Result<Tap> {
    ifreq(name)?;
    let Some(netns) = netns else {
        return create_tap(name);
    };
    let ns = File::open(netns).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening network namespace {}: {e}", netns.display()),
        )
    })?;
    let name = name.to_owned();
    std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || {
            // SAFETY: setns on a namespace descriptor we own; CLONE_NEWNET
            // only switches this thread, which exits right after.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            check(rc, "setns into the network namespace")?;
            create_tap(&name)
        })?
        .join()
        .map_err(|_| io::Error::other("tap opening thread panicked"))?
}

fn create_tap(name: &str) -> io::Result<Tap> {
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_flags = IFF_TAP_MODE;
    // SAFETY: a NUL-terminated constant path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    check(fd, "opening /dev/net/tun")?;
    // SAFETY: fd was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: TUNSETIFF reads (and updates) one ifreq that outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    check(rc, &format!("creating tap {name} (TUNSETIFF)"))?;
    set_link_up(&ifr)?;
    Tap::from_fd(fd)
}

/// Sets IFF_UP on the interface `ifr` names, in the calling thread's namespace.
fn set_link_up(ifr: &libc::ifreq) -> io::Result<()> {
    // SAFETY: socket() takes no pointers.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(sock, "socket for SIOCSIFFLAGS")?;
    // SAFETY: sock was just created and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = *ifr;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check(rc, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= IFF_UP };
    // SAFETY: SIOCSIFFLAGS reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check(rc, "SIOCSIFFLAGS (link up)")
}
