//! The stdio stream listener: guest vsock port 1026 (or a Unix socket in
//! host mode). Each connection starts with a header line naming a process
//! and one of its streams (`husk_protocol::stdio`); the connection then
//! carries that stream (see [`crate::stdio`]). A `forward <port>` header
//! instead asks for a TCP connection to that port on the guest's loopback
//! (kubectl port-forward; [`husk_protocol::forward`]), which the stream
//! then carries both ways. Only the host is served
//! ([`crate::vsock_peer`]). Anything wrong with a connection closes it and
//! is logged; the listener goes on.

use std::sync::Arc;
use std::time::Duration;

use husk_protocol::stdio::{StreamHeader, MAX_HEADER_LEN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_vsock::VsockListener;

use crate::container::Containers;
use crate::stdio::IoStream;

/// How long a connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

enum Listener {
    Vsock(VsockListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds `address` (`vsock://CID:PORT`, CID -1 for any, or `unix:///path`).
fn bind(address: &str) -> anyhow::Result<Listener> {
    if let Some(path) = address.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .map_err(|e| anyhow::anyhow!("bind {address}: {e}"))?;
        return Ok(Listener::Unix(listener, path.into()));
    }
    let addr = crate::vsock_peer::parse_address(address)?;
    let listener = VsockListener::bind(addr).map_err(|e| anyhow::anyhow!("bind {address}: {e}"))?;
    Ok(Listener::Vsock(listener))
}

/// Binds now (so a failure is reported at startup), serves forever after.
pub fn serve(
    address: &str,
    containers: Arc<Containers>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let listener = bind(address)?;
    tracing::info!(address, "stdio streams served");
    Ok(async move {
        loop {
            let accepted: std::io::Result<IoStream> = match &listener {
                Listener::Vsock(l) => crate::vsock_peer::accept_from_host(l)
                    .await
                    .map(|s| Box::new(s) as IoStream),
                Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Box::new(s) as IoStream),
            };
            match accepted {
                Ok(stream) => {
                    tokio::spawn(handle(stream, containers.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: do not spin.
                    tracing::warn!("accepting a stdio stream: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn handle(stream: IoStream, containers: Arc<Containers>) {
    // Buffered: the header arrives in one read, and stdin bytes that came
    // with it stay in the buffer for the copy.
    let mut stream = BufReader::new(stream);
    let mut line = Vec::with_capacity(128);
    let mut limited = (&mut stream).take(MAX_HEADER_LEN as u64);
    let read = limited.read_until(b'\n', &mut line);
    match tokio::time::timeout(HEADER_TIMEOUT, read).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!("stdio stream: reading the header: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("stdio stream: no header within {HEADER_TIMEOUT:?}; closing");
            return;
        }
    }
    if husk_protocol::forward::is_forward(&line) {
        match husk_protocol::forward::parse(&line) {
            Ok(port) => forward(stream, port).await,
            Err(e) => tracing::warn!("port-forward stream refused: {e}"),
        }
        return;
    }
    let header = match StreamHeader::parse(&line) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("stdio stream refused: {e}");
            return;
        }
    };
    let exec = header.exec_id.as_deref();
    let who = format!(
        "{} of {}/{}",
        header.kind,
        header.container_id,
        exec.unwrap_or(husk_protocol::stdio::INIT_PROCESS)
    );
    let process = match containers.process(&header.container_id, exec) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("stdio stream for {who} refused: {e}");
            return;
        }
    };
    match process.io.attach(header.kind, Box::new(stream)) {
        Ok(()) => tracing::debug!("stdio stream attached: {who}"),
        Err(e) => tracing::warn!("stdio stream for {who} refused: {e}"),
    }
}

/// Carries `stream` to and from TCP `port` on the guest's loopback (IPv4,
/// else IPv6), passing each direction's EOF on as a half-close.
async fn forward(mut stream: BufReader<IoStream>, port: u16) {
    let mut target = match connect_loopback(port).await {
        Ok(target) => target,
        Err(e) => {
            tracing::debug!("port-forward to guest port {port}: {e}");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut stream, &mut target).await {
        Ok((to_guest, to_host)) => tracing::debug!(
            "port-forward to guest port {port} ended: {to_guest} bytes in, {to_host} out"
        ),
        Err(e) => tracing::debug!("port-forward to guest port {port} ended: {e}"),
    }
}

async fn connect_loopback(port: u16) -> std::io::Result<tokio::net::TcpStream> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
        Ok(s) => Ok(s),
        Err(v4) => tokio::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port))
            .await
            .map_err(|_| v4),
    }
}
