//! Fuzzing entry point (built for `cargo fuzz` and unit tests only):
//! arbitrary bytes become guest memory holding the rx and tx queues' tables,
//! rings and buffers. The worker sends the tx chains to a real tap (in a
//! network namespace of the calling thread's own, with no addresses, so the
//! frames go nowhere) and delivers one synthetic tap frame into the rx
//! buffers. Call from one thread; needs CAP_NET_ADMIN.
//!
//! ```sh
//! HUSK_NET_FUZZ_SEED_DIR=$PWD/fuzz/corpus/virtio_net \
//!     cargo test -p husk-hypervisor --lib net::tests::fuzz_entry_point_runs_its_seeds
//! cd fuzz && cargo +nightly fuzz run virtio_net -- -jobs=1 -max_total_time=300
//! ```

use std::sync::{Arc, OnceLock};

use virtio_bindings::bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};

use super::tap::{open_tap, Tap, VNET_HDR_LEN};
use super::worker::{Features, NetStats, Worker};
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::test_utils::{
    active, desc, fuzz_input, fuzz_memory, interrupt, queue, FUZZ_MEM_SIZE as MEM_SIZE,
};

/// Fixed queue layout (max queue size 64).
pub const QMAX: u16 = 64;
pub const RX_DESC: u64 = 0x0000;
pub const RX_AVAIL: u64 = 0x0400;
pub const RX_USED: u64 = 0x0500;
pub const TX_DESC: u64 = 0x0800;
pub const TX_AVAIL: u64 = 0x0c00;
pub const TX_USED: u64 = 0x0d00;

/// Length of the control prefix before the memory image.
pub const PREFIX: usize = 4;

fn tap() -> &'static Arc<Tap> {
    static TAP: OnceLock<Arc<Tap>> = OnceLock::new();
    TAP.get_or_init(|| {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "fuzzing virtio-net needs CAP_NET_ADMIN (unshare)");
        // No IPv6 autoconfiguration chatter on the tap.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        Arc::new(open_tap("fuzz0", None).expect("fuzz tap"))
    })
}

/// What one input did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub rx_used: u16,
    pub tx_used: u16,
}

/// Runs one input. Prefix bytes:
/// 0: rx and tx queue sizes (1 << (bits 0-2 % 7), 1 << (bits 4-6 % 7));
/// 1: acked features: bit 0 MRG_RXBUF, 1 GUEST_CSUM, 2 GUEST_TSO4,
///    3 GUEST_TSO6, 4 CSUM, 5 HOST_TSO4, 6 HOST_TSO6;
/// 2: length of the frame the tap hands over, in 64-byte units (0: none);
/// 3: that frame's header: bits 0-1 flags, bits 4-7 gso_type.
///
/// The rest is the guest memory image.
pub fn fuzz_queues(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    if data.len() < PREFIX {
        return out;
    }
    let (prefix, image) = data.split_at(PREFIX);
    let tap = tap().clone();
    let mem = fuzz_memory(image);

    let rx_size = 1u16 << ((prefix[0] & 7) % 7);
    let tx_size = 1u16 << (((prefix[0] >> 4) & 7) % 7);
    let bits = [
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ];
    let acked = bits
        .iter()
        .enumerate()
        .filter(|(i, _)| prefix[1] & (1 << i) != 0)
        .fold(0u64, |f, (_, &b)| f | 1 << b);
    let stats = Arc::new(NetStats::default());
    let queues = [
        active(queue(QMAX, rx_size, RX_DESC, RX_AVAIL, RX_USED)),
        active(queue(QMAX, tx_size, TX_DESC, TX_AVAIL, TX_USED)),
    ];
    let mut worker = Worker::new(
        mem.clone(),
        queues,
        interrupt(),
        tap,
        Features::from_acked(acked),
        stats.clone(),
    )
    .expect("worker");

    worker.process_tx();
    let len = usize::from(prefix[2]) * 64;
    if len > 0 {
        let mut frame: Vec<u8> = (0..len).map(|i| i.to_le_bytes()[0]).collect();
        frame[..VNET_HDR_LEN].fill(0);
        if len >= VNET_HDR_LEN {
            frame[0] = prefix[3] & 3;
            frame[1] = prefix[3] >> 4;
        }
        worker.inject_rx(&frame);
        worker.process_rx();
    }
    use std::sync::atomic::Ordering::Relaxed;
    out.tx_frames = stats.tx_frames.load(Relaxed);
    out.tx_dropped = stats.tx_dropped.load(Relaxed);
    out.rx_frames = stats.rx_frames.load(Relaxed);
    out.rx_dropped = stats.rx_dropped.load(Relaxed);
    out.rx_used = mem.read_obj(GuestAddress(RX_USED + 2)).unwrap_or(0);
    out.tx_used = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap_or(0);
    out
}

/// Well-formed starting points: plain frames sent in one or several
/// descriptors; offloaded frames with the features acked; a frame received
/// into mergeable buffers and into one big buffer; malformed chains.
pub fn seeds() -> Vec<Vec<u8>> {
    let frame = |payload: usize, flags: u8, gso: u8| {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = flags;
        f[1] = gso;
        if flags & 1 != 0 {
            // csum_start 34 (after Ethernet + IPv4), csum_offset 6 (UDP).
            f[6..8].copy_from_slice(&34u16.to_le_bytes());
            f[8..10].copy_from_slice(&6u16.to_le_bytes());
        }
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend((0..payload).map(|i| i.to_le_bytes()[0]));
        f
    };
    let plain = [frame(100, 0, 0), frame(1000, 0, 0), frame(46, 0, 0)];
    let offloaded = [frame(200, 1, 0), frame(200, 1, 0)];
    vec![
        image([0x66, 0x00, 0, 0], &plain, &[], Layout::Single),
        image([0x66, 0x00, 0, 0], &plain, &[], Layout::Split),
        image([0x66, 0x10, 0, 0], &offloaded, &[], Layout::Single),
        // A 1536-byte tap frame into 512-byte mergeable buffers.
        image([0x66, 0x01, 24, 0], &[], &[512; 8], Layout::Single),
        // The same into one 2 KiB buffer, without MRG_RXBUF.
        image([0x66, 0x00, 24, 0], &[], &[2048; 2], Layout::Single),
        // Offloads the guest did not negotiate, both ways.
        image(
            [0x66, 0x00, 24, 0x11],
            &offloaded,
            &[2048; 2],
            Layout::Single,
        ),
        // Write-only tx descriptors; a runt.
        image(
            [0x66, 0x00, 0, 0],
            &[frame(60, 0, 0), vec![0; 20]],
            &[],
            Layout::WriteOnly,
        ),
    ]
}

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// One readable descriptor per frame.
    Single,
    /// Header, then the rest in 64-byte pieces.
    Split,
    /// One write-only descriptor per frame (malformed).
    WriteOnly,
}

fn image(prefix: [u8; PREFIX], tx: &[Vec<u8>], rx: &[u32], layout: Layout) -> Vec<u8> {
    let mut mem = vec![0u8; MEM_SIZE];
    let mut put = |at: u64, bytes: &[u8]| {
        let at = usize::try_from(at).expect("seed address");
        mem[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let mut buf = 0x1000u64;
    let mut d = 0u16;
    for (i, f) in tx.iter().enumerate() {
        put(buf, f);
        let head = d;
        let pieces: Vec<(u64, usize)> = match layout {
            Layout::Split => {
                let mut v = vec![(buf, VNET_HDR_LEN)];
                let mut at = VNET_HDR_LEN;
                while at < f.len() {
                    let n = (f.len() - at).min(64);
                    v.push((buf + at as u64, n));
                    at += n;
                }
                v
            }
            _ => vec![(buf, f.len())],
        };
        for (j, &(addr, len)) in pieces.iter().enumerate() {
            let last = j + 1 == pieces.len();
            let mut flags = if last { 0 } else { 1 };
            if layout == Layout::WriteOnly {
                flags |= 2;
            }
            put(
                TX_DESC + 16 * u64::from(d),
                &desc(addr, tu::small(len), flags, d + 1),
            );
            d += 1;
        }
        put(TX_AVAIL + 4 + 2 * i as u64, &head.to_le_bytes());
        buf += (f.len() as u64).next_multiple_of(64);
    }
    put(TX_AVAIL + 2, &tu::small::<u16>(tx.len()).to_le_bytes());
    for (i, &len) in rx.iter().enumerate() {
        put(RX_DESC + 16 * i as u64, &desc(buf, len, 2, 0));
        put(
            RX_AVAIL + 4 + 2 * i as u64,
            &tu::small::<u16>(i).to_le_bytes(),
        );
        buf += u64::from(len);
    }
    put(RX_AVAIL + 2, &tu::small::<u16>(rx.len()).to_le_bytes());
    fuzz_input(&prefix, &mem)
}
