//! virtio-vsock (device ID 19) with a hybrid Unix-socket backend, the
//! Firecracker design:
//!
//! - Host-initiated: a host process connects to the device's Unix socket and
//!   writes `CONNECT <port>\n`; once the guest accepts, it reads `OK <host port>\n`
//!   and the stream carries the connection.
//! - Guest-initiated: a guest connection to CID 2, port P, is connected to the
//!   Unix socket `<uds_path>_<P>`, which a host service must be listening on.
//!
//! The listener is bound when the device is created, so host clients can
//! connect before the guest driver is up; they wait in the backlog until the
//! driver activates the device.

mod connection;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
mod handshake;
mod muxer;
mod packet;
mod uds;
mod worker;

use std::io;
use std::os::linux::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, warn};

use super::{
    read_config_bytes, take_queues, ActivateContext, ActivateError, DeviceWorker, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use muxer::Muxer;
use worker::Worker;

pub use muxer::port_path;

/// Virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [256; 3];

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved (hypervisor, local, host) and u32::MAX is VMADDR_CID_ANY.
    #[error("guest CID {0} is reserved or out of range (valid: 3..=4294967294)")]
    InvalidCid(u64),
    /// Something already exists at the socket path.
    #[error("vsock socket path {} already exists", .0.display())]
    PathExists(PathBuf),
    /// Binding the Unix listener failed.
    #[error("binding vsock socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The vsock device. Dropping it stops the worker and removes the socket.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    /// (device, inode) of the socket we bound, so Drop unlinks only our own.
    socket_id: Option<(u64, u64)>,
    worker: Option<DeviceWorker>,
    /// Post a transport reset when the device starts (a restored guest).
    announce_reset: bool,
}

impl Vsock {
    /// Creates the device and binds its Unix listener at `uds_path`, which must not exist.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(uds_path));
        }
        let listener = UnixListener::bind(&uds_path).map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => VsockError::PathExists(uds_path.clone()),
            _ => VsockError::Bind {
                path: uds_path.clone(),
                source,
            },
        })?;
        let socket_id = uds_path.metadata().ok().map(|m| (m.st_dev(), m.st_ino()));
        // Accepting must never block the worker.
        if let Err(source) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(&uds_path);
            return Err(VsockError::Bind {
                path: uds_path,
                source,
            });
        }
        debug!(path = %uds_path.display(), guest_cid, "vsock: listening");
        Ok(Vsock {
            guest_cid,
            uds_path,
            listener: Arc::new(listener),
            socket_id,
            worker: None,
            announce_reset: false,
        })
    }

    /// The next start tells the guest its connections are gone (for a
    /// guest restored from a snapshot).
    pub fn announce_transport_reset(&mut self) {
        self.announce_reset = true;
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The worker thread's kernel thread id, once it has started (tests check it is gone).
    #[cfg(test)]
    fn worker_tid(&self) -> Option<i32> {
        self.worker.as_ref().map(DeviceWorker::tid)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = take_queues::<3>(ctx.queues)?;
        let muxer = Muxer::new(self.guest_cid, self.uds_path.clone(), self.listener.clone())
            .map_err(ActivateError::Worker)?;
        let mut worker =
            Worker::new(ctx.mem, queues, ctx.interrupt, muxer).map_err(ActivateError::Worker)?;
        if std::mem::take(&mut self.announce_reset) {
            worker.post_transport_reset();
        }
        self.worker = Some(DeviceWorker::start(
            "husk-vsock",
            worker,
            crate::confine::confine_device_worker,
            ctx.seccomp,
        )?);
        debug!(guest_cid = self.guest_cid, "vsock: activated");
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
            debug!(guest_cid = self.guest_cid, "vsock: reset");
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let ours = self
            .uds_path
            .metadata()
            .ok()
            .map(|m| (m.st_dev(), m.st_ino()));
        if ours.is_some() && ours == self.socket_id {
            if let Err(e) = std::fs::remove_file(&self.uds_path) {
                warn!(path = %self.uds_path.display(), "vsock: cannot remove socket: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
