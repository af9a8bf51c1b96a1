//! kubectl port-forward into a husk pod.
//!
//! containerd's CRI plugin (1.6 and 2.x) serves PortForward for a pod by
//! dialing `localhost:<port>` from inside the pod's network namespace. In
//! husk nothing listens there: the pod's containers are in the guest, and
//! the namespace only mirrors frames to the VM's NIC. So the shim listens on
//! the namespace's loopback itself (an ephemeral port), has every TCP
//! connection to `127.0.0.1` in the namespace redirected there (an iptables
//! `nat OUTPUT -o lo … REDIRECT` rule, which dies with the namespace), reads
//! the port each one dialed (`SO_ORIGINAL_DST`) and carries the connection
//! to the agent (`forward <port>`, [`husk_protocol::forward`]), which
//! connects to that port on the guest's loopback.
//!
//! Nothing but containerd's port-forward dials the namespace's loopback: the
//! pod's own traffic arrives on its CNI interface and goes to the guest.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener as StdTcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Why port-forwarding could not be set up in a pod's namespace.
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("cannot enter network namespace {path}: {message}")]
    Netns { path: PathBuf, message: String },
    #[error("cannot listen on 127.0.0.1 in {path} (is its loopback up?): {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("iptables in {path}: {message}")]
    Redirect { path: PathBuf, message: String },
}

/// The forwarder of one pod: stops when dropped.
pub struct PortForwarder {
    accept: JoinHandle<()>,
    /// The shim's port on the namespace's loopback.
    pub listen_port: u16,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How the forwarder reaches the guest: the VMM's hybrid-vsock socket.
#[derive(Clone, Debug)]
pub struct GuestDialer {
    pub vsock_uds: PathBuf,
    pub timeout: Duration,
}

impl GuestDialer {
    async fn dial(&self, port: u16) -> Result<tokio::net::UnixStream, String> {
        let mut stream = husk_vsock::connect_async(
            &self.vsock_uds,
            husk_protocol::AGENT_IO_VSOCK_PORT,
            self.timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        stream
            .write_all(husk_protocol::forward::encode(port).as_bytes())
            .await
            .map_err(|e| format!("writing the port-forward header: {e}"))?;
        Ok(stream)
    }
}

/// Starts forwarding connections to the loopback of `netns` into the guest.
pub async fn start(netns: &Path, dialer: GuestDialer) -> Result<PortForwarder, PortForwardError> {
    let netns_file = File::open(netns).map_err(|e| PortForwardError::Netns {
        path: netns.to_path_buf(),
        message: e.to_string(),
    })?;
    let listener = listen_in(&netns_file, netns)?;
    let listen_port = listener
        .local_addr()
        .map_err(|source| PortForwardError::Listen {
            path: netns.to_path_buf(),
            source,
        })?
        .port();
    redirect_loopback(&netns_file, netns, listen_port).await?;
    let accept = tokio::spawn(accept_loop(listener, dialer));
    tracing::debug!(
        netns = %netns.display(),
        listen_port,
        "port-forward: the pod's loopback is carried to the guest"
    );
    Ok(PortForwarder {
        accept,
        listen_port,
    })
}

/// A listener on 127.0.0.1:0 whose socket lives in `netns`
/// ([`crate::network::on_thread_in`]).
fn listen_in(netns_file: &File, netns: &Path) -> Result<TcpListener, PortForwardError> {
    let listen_err = |source| PortForwardError::Listen {
        path: netns.to_path_buf(),
        source,
    };
    let std_listener = crate::network::on_thread_in(netns_file, || {
        StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
    })
    .map_err(|message| PortForwardError::Netns {
        path: netns.to_path_buf(),
        message,
    })?
    .map_err(listen_err)?;
    std_listener.set_nonblocking(true).map_err(listen_err)?;
    TcpListener::from_std(std_listener).map_err(listen_err)
}

/// The iptables arguments that send every TCP connection to 127.0.0.1 in
/// the namespace to `listen_port` instead.
fn redirect_args(listen_port: u16) -> Vec<String> {
    [
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1",
        "-j",
        "REDIRECT",
        "--to-ports",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([listen_port.to_string()])
    .collect()
}

async fn redirect_loopback(
    netns_file: &File,
    netns: &Path,
    listen_port: u16,
) -> Result<(), PortForwardError> {
    let fd = netns_file.as_raw_fd();
    let mut command = std::process::Command::new("iptables");
    command.args(redirect_args(listen_port));
    // SAFETY: runs in the forked child before exec; setns(2) is a plain
    // syscall (async-signal-safe), on a descriptor the parent keeps open
    // until the child has exited.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut command = tokio::process::Command::from(command);
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| PortForwardError::Redirect {
            path: netns.to_path_buf(),
            message: format!("cannot run iptables: {e}"),
        })?;
    if !output.status.success() {
        return Err(PortForwardError::Redirect {
            path: netns.to_path_buf(),
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, dialer: GuestDialer) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(forward_one(conn, dialer.clone()));
            }
            Err(e) => {
                // E.g. EMFILE: do not spin.
                tracing::warn!("port-forward: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The port a redirected connection was dialed to.
fn original_port(conn: &TcpStream) -> std::io::Result<u16> {
    let addr = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    Ok(u16::from_be(addr.sin_port))
}

async fn forward_one(mut conn: TcpStream, dialer: GuestDialer) {
    let port = match original_port(&conn) {
        Ok(port) => port,
        Err(e) => {
            tracing::warn!("port-forward: a connection without its dialed port: {e}");
            return;
        }
    };
    let mut guest = match dialer.dial(port).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!("port-forward to guest port {port}: {e}");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut conn, &mut guest).await {
        Ok((to_guest, to_host)) => tracing::debug!(
            "port-forward to guest port {port} ended: {to_guest} bytes in, {to_host} out"
        ),
        Err(e) => tracing::debug!("port-forward to guest port {port} ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// A network namespace of the test's own, removed when dropped.
    struct TestNetns(String);

    impl TestNetns {
        fn new() -> TestNetns {
            let name = format!("husk-pf-test-{}", std::process::id());
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
            for args in [
                vec!["netns", "add", &name],
                vec!["-n", &name, "link", "set", "lo", "up"],
            ] {
                let status = std::process::Command::new("ip")
                    .args(&args)
                    .status()
                    .unwrap();
                assert!(status.success(), "ip {args:?}");
            }
            TestNetns(name)
        }

        fn path(&self) -> PathBuf {
            Path::new("/run/netns").join(&self.0)
        }

        /// A TCP connection to `port` made from inside the namespace.
        fn dial(&self, port: u16) -> std::io::Result<std::net::TcpStream> {
            let file = File::open(self.path())?;
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                        std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                    })
                    .join()
                    .unwrap()
            })
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    /// A stand-in for the VMM's hybrid vsock and the agent behind it: it
    /// answers `CONNECT 1026`, then echoes the header line and every byte.
    fn fake_guest(uds: &Path) -> JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(uds).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    assert_eq!(line, "CONNECT 1026\n");
                    stream.get_mut().write_all(b"OK 1\n").await.unwrap();
                    let mut rest = Vec::new();
                    stream.read_to_end(&mut rest).await.unwrap();
                    stream.get_mut().write_all(&rest).await.unwrap();
                });
            }
        })
    }

    #[tokio::test]
    async fn connections_to_the_pods_loopback_reach_the_guest_port_they_dialed() {
        let netns = TestNetns::new();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock");
        let guest = fake_guest(&uds);
        let dialer = GuestDialer {
            vsock_uds: uds,
            timeout: Duration::from_secs(10),
        };
        let forwarder = start(&netns.path(), dialer).await.unwrap();
        for port in [80, 8080] {
            let conn = netns.dial(port).unwrap();
            conn.set_nonblocking(true).unwrap();
            let mut conn = TcpStream::from_std(conn).unwrap();
            conn.write_all(b"ping").await.unwrap();
            conn.shutdown().await.unwrap();
            let mut echoed = String::new();
            conn.read_to_string(&mut echoed).await.unwrap();
            assert_eq!(echoed, format!("forward {port}\nping"));
        }
        // Stopped: the namespace's loopback refuses again.
        drop(forwarder);
        tokio::task::yield_now().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while netns.dial(80).is_ok() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(netns.dial(80).is_err(), "still forwarding after the drop");
        guest.abort();
    }

    #[tokio::test]
    async fn a_namespace_that_is_not_there_is_named() {
        let dialer = GuestDialer {
            vsock_uds: "/nonexistent".into(),
            timeout: Duration::from_secs(1),
        };
        let err = start(Path::new("/run/netns/husk-no-such-ns"), dialer)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("husk-no-such-ns"), "{err}");
    }

    #[test]
    fn the_rule_redirects_tcp_to_the_loopback_address_only() {
        assert_eq!(
            redirect_args(40123).join(" "),
            "-w -t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1 -j REDIRECT --to-ports 40123"
        );
    }
}
