//! Guest-bound packets of a connection: what it owes the guest (data read
//! from the host stream within the guest's credit, control packets) written
//! into an rx buffer.

use std::io;
use std::os::unix::net::UnixStream;

use tracing::{debug, error};
use vm_memory::{ReadVolatile, VolatileMemoryError};

use super::{Connection, State, TX_BUF_SIZE};
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::uds;

impl Connection {
    /// Writes the next packet owed to the guest into `pkt`; returns the bytes
    /// used, or None if nothing was owed after all.
    pub fn fill_rx(
        &mut self,
        pkt: &mut virtio_vsock::packet::VsockPacket<'_, ()>,
        guest_cid: u64,
    ) -> Option<u32> {
        if self.pending.rw && self.state == State::Established {
            if let Some(n) = self.read_host(pkt) {
                return Some(self.write_header(pkt, guest_cid, OP_RW, 0, n));
            }
            // The read may have found EOF or an error: that can owe a SHUTDOWN or an RST.
            self.settle();
        }
        let p = &mut self.pending;
        let (op, flags) = if std::mem::take(&mut p.rst) {
            (OP_RST, 0)
        } else if std::mem::take(&mut p.request) {
            (OP_REQUEST, 0)
        } else if std::mem::take(&mut p.response) {
            self.state = State::Established;
            debug!(
                local = self.key.local_port,
                peer = self.key.peer_port,
                "vsock: guest-initiated connection established"
            );
            (OP_RESPONSE, 0)
        } else if std::mem::take(&mut p.shutdown) {
            let flags = if self.host_eof { SHUTDOWN_SEND } else { 0 }
                | if self.host_gone { SHUTDOWN_RCV } else { 0 };
            self.shut_sent = flags;
            (OP_SHUTDOWN, flags)
        } else if p.credit_update {
            (OP_CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        Some(self.write_header(pkt, guest_cid, op, flags, 0))
    }

    /// Reads guest-bound bytes into the packet's data buffer, within the guest's credit.
    fn read_host(&mut self, pkt: &virtio_vsock::packet::VsockPacket<'_, ()>) -> Option<u32> {
        let credit = self.peer_credit();
        if credit == 0 || self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0 {
            // Re-armed by a credit update from the guest.
            self.pending.rw = false;
            return None;
        }
        let buf = pkt.data_slice()?;
        let cap = buf.len().min(MAX_PKT_DATA as usize).min(credit as usize);
        let mut dst = buf.subslice(0, cap).ok()?;
        if dst.is_empty() {
            // A zero-sized rx buffer: keep the data for a better one.
            return None;
        }
        let mut stream: &UnixStream = self.stream.as_ref()?;
        let res = loop {
            match stream.read_volatile(&mut dst) {
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                res => break res,
            }
        };
        match res {
            Ok(0) => {
                debug!(
                    port = self.key.local_port,
                    "vsock: host end finished sending"
                );
                self.host_eof = true;
                self.pending.rw = false;
                None
            }
            Ok(n) => {
                self.tx_cnt += super::counter_bytes(n);
                // At most `cap`, which is at most MAX_PKT_DATA.
                Some(u32::try_from(n).unwrap_or(MAX_PKT_DATA))
            }
            Err(VolatileMemoryError::IOError(e)) if uds::would_block(&e) => {
                self.pending.rw = false;
                None
            }
            Err(e) => {
                self.host_eof = true;
                self.pending.rw = false;
                self.host_lost(&io::Error::other(format!("reading host end: {e}")));
                None
            }
        }
    }

    fn write_header(
        &mut self,
        pkt: &mut virtio_vsock::packet::VsockPacket<'_, ()>,
        guest_cid: u64,
        op: u16,
        flags: u32,
        len: u32,
    ) -> u32 {
        let hdr = Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        };
        if let Err(e) = pkt.set_header_from_raw(&hdr.to_bytes()) {
            // Cannot happen: the crate sized the header slice. Never claim bytes we did not write.
            error!("vsock: writing a packet header: {e}");
            return 0;
        }
        // Every packet carries fwd_cnt, so it doubles as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        HDR_LEN + len
    }
}
