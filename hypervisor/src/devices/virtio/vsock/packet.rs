//! Vsock wire constants and the header as plain values.
//!
//! The `virtio-vsock` crate parses descriptor chains into packets; this module
//! copies a guest packet's header out once (so later decisions cannot be raced
//! by the guest rewriting memory) and builds the headers the device sends.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet, either direction (Linux uses the same bound).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Size of the packet header in guest memory (44 bytes: fits).
#[allow(clippy::cast_possible_truncation)]
pub const HDR_LEN: u32 = PKT_HEADER_SIZE as u32;

/// `n` bytes as a vsock byte counter increment. The counters (rx_cnt,
/// fwd_cnt, tx_cnt) count modulo 2^32 by the virtio spec, so keeping the
/// low 32 bits is the arithmetic they want (and `n` is at most a packet or
/// a buffer of 256 KiB anyway).
#[allow(clippy::cast_possible_truncation)]
pub fn counter_bytes(n: usize) -> std::num::Wrapping<u32> {
    std::num::Wrapping(n as u32)
}

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A name for `op` in logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "REQUEST",
        OP_RESPONSE => "RESPONSE",
        OP_RST => "RST",
        OP_SHUTDOWN => "SHUTDOWN",
        OP_RW => "RW",
        OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown",
    }
}

/// A vsock packet header (virtio 1.2 §5.10.6), field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header of a packet the guest sent.
    pub fn of<B: vm_memory::bitmap::BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// The little-endian wire form.
    pub fn to_bytes(self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the wire form (tests play the guest with it).
    #[cfg(test)]
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_wire_form() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 1024,
            len: 77,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 1 << 18,
            fwd_cnt: 12345,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(op_name(OP_CREDIT_REQUEST), "CREDIT_REQUEST");
        assert_eq!(op_name(99), "unknown");
    }
}
