//! Only the host may talk to the agent. Every vsock connection to one of the
//! agent's ports whose peer is not the host (CID 2) is closed at accept: a
//! process in a container must not drive the agent (CreateContainer,
//! ExecProcess as guest root) or grab other containers' stdio. The guest
//! kernel has no vsock loopback transport either (configs/guest/
//! kernel.config); this check holds even if it had.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

/// The host's vsock context ID.
pub const HOST_CID: u32 = 2;

/// Refused connections are logged this often (the first always): a guest
/// process connecting in a loop must not flood the host's log.
const LOG_EVERY: u64 = 1000;

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Whether a peer is the host.
pub fn is_host(peer: &VsockAddr) -> bool {
    peer.cid() == HOST_CID
}

/// Parses `CID:PORT` (CID -1 for any) of a `vsock://CID:PORT` address.
pub fn parse_address(address: &str) -> anyhow::Result<VsockAddr> {
    let rest = address
        .strip_prefix("vsock://")
        .ok_or_else(|| anyhow::anyhow!("address {address:?}: expected vsock://CID:PORT"))?;
    let (cid, port) = rest
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("address {address:?}: expected vsock://CID:PORT"))?;
    let cid = match cid {
        "-1" => tokio_vsock::VMADDR_CID_ANY,
        n => n
            .parse()
            .map_err(|_| anyhow::anyhow!("address {address:?}: bad CID"))?,
    };
    let port = port
        .parse()
        .map_err(|_| anyhow::anyhow!("address {address:?}: bad port"))?;
    Ok(VsockAddr::new(cid, port))
}

/// Accepts the next connection that comes from the host; others are closed.
pub async fn accept_from_host(listener: &VsockListener) -> std::io::Result<VsockStream> {
    loop {
        let (stream, peer) = listener.accept().await?;
        if is_host(&peer) {
            return Ok(stream);
        }
        let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
        if refused % LOG_EVERY == 1 {
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            tracing::warn!(
                "refused a vsock connection to port {port} from CID {} (only the host, CID \
                 {HOST_CID}, is served; {refused} refused so far)",
                peer.cid()
            );
        }
        drop(stream);
    }
}

/// A ttrpc listener on `listener` that serves the host only.
pub fn host_only_ttrpc(listener: VsockListener) -> ttrpc::asynchronous::transport::Listener {
    let connections = futures_util::stream::unfold(listener, |listener| async move {
        let next = accept_from_host(&listener).await;
        Some((next, listener))
    });
    ttrpc::asynchronous::transport::Listener::new(connections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_cid_is_served() {
        assert!(is_host(&VsockAddr::new(2, 5000)));
        for cid in [0, 1, 3, 4, u32::MAX] {
            assert!(!is_host(&VsockAddr::new(cid, 5000)), "CID {cid}");
        }
    }

    #[test]
    fn parses_vsock_addresses() {
        let a = parse_address("vsock://-1:1024").unwrap();
        assert_eq!((a.cid(), a.port()), (tokio_vsock::VMADDR_CID_ANY, 1024));
        let a = parse_address("vsock://3:1026").unwrap();
        assert_eq!((a.cid(), a.port()), (3, 1026));
        for bad in ["unix:///x", "vsock://1024", "vsock://x:1", "vsock://1:y"] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }
}
