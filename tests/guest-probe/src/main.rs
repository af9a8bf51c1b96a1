//! `husk-probe`: what the real-VM tests run inside a container, in the
//! guest, to act as a hostile workload. Static (built like the agent), so
//! it runs in any container image.
//!
//! ```text
//! husk-probe vsock-connect CID:PORT...
//! ```
//! Tries to open a vsock stream to each address and prints one line each:
//! `CID:PORT refused (<error>)` or `CID:PORT CONNECTED`. Exits 0 when every
//! attempt was refused, 1 when any connected, 2 on bad usage.

use std::process::ExitCode;

fn parse(addr: &str) -> Option<(u32, u32)> {
    let (cid, port) = addr.split_once(':')?;
    Some((cid.parse().ok()?, port.parse().ok()?))
}

// AF_VSOCK (40) and the size of sockaddr_vm (16) fit the C types the
// kernel wants them in; constants, so `as` cannot truncate here.
#[allow(clippy::cast_possible_truncation)]
const VSOCK_FAMILY: libc::sa_family_t = libc::AF_VSOCK as libc::sa_family_t;
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_VM_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Connects a vsock stream socket to `cid:port`; `Ok` if it connected.
fn vsock_connect(cid: u32, port: u32) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = VSOCK_FAMILY;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of the length passed; `fd` is
    // the socket just created.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), SOCKADDR_VM_LEN) };
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, addrs)) = args.split_first() else {
        eprintln!("usage: husk-probe vsock-connect CID:PORT...");
        return ExitCode::from(2);
    };
    if cmd != "vsock-connect" || addrs.is_empty() {
        eprintln!("usage: husk-probe vsock-connect CID:PORT...");
        return ExitCode::from(2);
    }
    let mut connected = false;
    for addr in addrs {
        let Some((cid, port)) = parse(addr) else {
            eprintln!("husk-probe: bad address {addr:?} (expected CID:PORT)");
            return ExitCode::from(2);
        };
        match vsock_connect(cid, port) {
            Ok(()) => {
                connected = true;
                println!("{addr} CONNECTED");
            }
            Err(e) => println!("{addr} refused ({e})"),
        }
    }
    if connected {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
