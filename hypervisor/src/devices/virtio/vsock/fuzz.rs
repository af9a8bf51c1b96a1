//! Fuzzing entry point (built for `cargo fuzz` and unit tests only): arbitrary
//! bytes become guest memory holding the descriptor tables, rings and buffers
//! of the rx and tx queues, and the vsock worker processes them the way it
//! does for a running guest, against real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{port_path, Muxer};
use super::worker::Worker;
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::test_utils::{
    active, desc, fuzz_input, fuzz_memory, interrupt, queue, FUZZ_MEM_SIZE as MEM_SIZE,
};
use crate::devices::virtio::worker::EventLoop;

/// The guest CID the fuzzed guest has.
pub const GUEST_CID: u64 = 3;
/// A guest REQUEST to this port reaches a real host listener.
pub const LISTENING_PORT: u32 = 1024;

/// Fixed queue layout (max queue size 16): rx at 0x000, tx at 0x200.
pub const RX_DESC: u64 = 0x000;
pub const RX_AVAIL: u64 = 0x100;
pub const RX_USED: u64 = 0x140;
pub const TX_DESC: u64 = 0x200;
pub const TX_AVAIL: u64 = 0x300;
pub const TX_USED: u64 = 0x340;
const EV_DESC: u64 = 0x400;

/// Length of the control prefix before the memory image.
pub const PREFIX: usize = 4;

struct Sockets {
    _dir: PathBuf,
    uds_path: PathBuf,
    device_listener: Arc<UnixListener>,
    service: UnixListener,
}

/// One set of sockets per process: binding per input would dominate the run.
fn sockets() -> &'static Sockets {
    static SOCKETS: OnceLock<Sockets> = OnceLock::new();
    SOCKETS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-vsock-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz socket dir");
        let uds_path = dir.join("v.sock");
        let device_listener = UnixListener::bind(&uds_path).expect("fuzz device listener");
        device_listener.set_nonblocking(true).expect("nonblocking");
        let service =
            UnixListener::bind(port_path(&uds_path, LISTENING_PORT)).expect("fuzz service");
        service.set_nonblocking(true).expect("nonblocking");
        Sockets {
            _dir: dir,
            uds_path,
            device_listener: Arc::new(device_listener),
            service,
        }
    })
}

/// Runs one input. Prefix bytes:
/// 0: rx and tx queue sizes (1 << (bits 0-2 % 5), 1 << (bits 4-6 % 5));
/// 1: how many tx chains the first pass may see (the rest come after the
///    guest got its replies, so established connections see data);
/// 2: bytes the host service writes into each accepted connection;
/// 3: bit 0: the host then shuts down its write side, bit 1: closes entirely.
///
/// The rest is the guest memory image.
pub fn fuzz_queues(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    if data.len() < PREFIX {
        return out;
    }
    let (prefix, image) = data.split_at(PREFIX);
    let mem = fuzz_memory(image);

    let rx_size = 1u16 << ((prefix[0] & 7) % 5);
    let tx_size = 1u16 << (((prefix[0] >> 4) & 7) % 5);
    let s = sockets();
    let muxer =
        Muxer::new(GUEST_CID, s.uds_path.clone(), s.device_listener.clone()).expect("muxer");
    let queues = [
        active(queue(16, rx_size, RX_DESC, RX_AVAIL, RX_USED)),
        active(queue(16, tx_size, TX_DESC, TX_AVAIL, TX_USED)),
        active(queue(16, 1, EV_DESC, EV_DESC + 0x10, EV_DESC + 0x20)),
    ];
    let worker = Worker::new(mem.clone(), queues, interrupt(), muxer).expect("worker");
    let kill = EventFd::new(EFD_NONBLOCK).expect("kill eventfd");
    let mut worker = EventLoop::new(worker, kill).expect("event loop");

    // First pass: the guest shows only part of its tx ring.
    let avail_idx_addr = GuestAddress(TX_AVAIL + 2);
    let full_idx: u16 = mem.read_obj(avail_idx_addr).unwrap_or(0);
    let first = u16::from(prefix[1]).min(full_idx);
    let _ = mem.write_obj(first, avail_idx_addr);
    worker.step_nowait();
    let _ = mem.write_obj(full_idx, avail_idx_addr);
    worker.handler_mut().process_tx();

    // The host services answer.
    let mut accepted: Vec<UnixStream> = Vec::new();
    while let Ok((stream, _)) = s.service.accept() {
        accepted.push(stream);
    }
    let payload = vec![0xa5u8; usize::from(prefix[2]) * 64];
    for stream in &mut accepted {
        let _ = stream.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            out.host_received += n;
        }
        let _ = stream.write(&payload);
        if prefix[3] & 1 != 0 {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    }
    if prefix[3] & 2 != 0 {
        accepted.clear();
    }
    for _ in 0..4 {
        worker.step_nowait();
    }
    // Left alone, the worker must settle (every step here has work it can
    // finish, bounded by the queues' 16 buffers), or it would spin for ever.
    let mut steps = 0;
    while !worker.quiescent() {
        steps += 1;
        assert!(steps <= 64, "worker never settles");
        worker.step_nowait();
    }
    assert!(worker.handler_mut().muxer_mut().connection_count() <= super::muxer::MAX_CONNECTIONS);
    out.accepted = accepted.len();
    out.rx_used = mem.read_obj(GuestAddress(RX_USED + 2)).unwrap_or(0);
    out.tx_used = mem.read_obj(GuestAddress(TX_USED + 2)).unwrap_or(0);
    out
}

/// What one input did (lets the unit tests check the seeds do what they claim).
#[derive(Debug, Default)]
pub struct Outcome {
    pub tx_used: u16,
    pub rx_used: u16,
    /// Host connections the guest opened (still open at the end).
    pub accepted: usize,
    /// Bytes the host services received from the guest.
    pub host_received: usize,
}

/// Well-formed starting points for the fuzzer: a guest that connects to the
/// listening service, talks and closes; one that asks for a missing port; one
/// that sends every op with odd lengths and layouts.
pub fn seeds() -> Vec<Vec<u8>> {
    use super::packet::*;
    let hdr = |op: u16, src_port: u32, dst_port: u32, len: u32, flags: u32| Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    };
    let open = vec![
        (hdr(OP_REQUEST, 5555, LISTENING_PORT, 0, 0), &b""[..]),
        (hdr(OP_RW, 5555, LISTENING_PORT, 5, 0), b"hello"),
        (hdr(OP_CREDIT_REQUEST, 5555, LISTENING_PORT, 0, 0), b""),
    ];
    let mut close = open.clone();
    close.extend([
        (hdr(OP_CREDIT_UPDATE, 5555, LISTENING_PORT, 0, 0), &b""[..]),
        (
            hdr(OP_SHUTDOWN, 5555, LISTENING_PORT, 0, SHUTDOWN_SEND),
            b"",
        ),
        (
            hdr(OP_SHUTDOWN, 5555, LISTENING_PORT, 0, SHUTDOWN_BOTH),
            b"",
        ),
    ]);
    let mut abort = close.clone();
    abort.push((hdr(OP_RST, 5555, LISTENING_PORT, 0, 0), b""));
    let missing = vec![(hdr(OP_REQUEST, 5556, 7, 0, 0), &b""[..])];
    let odd = vec![
        (hdr(OP_REQUEST, 5557, LISTENING_PORT, 3, 0), &b"abc"[..]),
        (hdr(0, 1, 2, 0, 0), b""),
        (hdr(99, 1, 2, 0, 0), b""),
        (hdr(OP_RW, 5557, LISTENING_PORT, 4, 0), b"data"),
        (hdr(OP_RESPONSE, 5557, LISTENING_PORT, 0, 0), b""),
        (hdr(OP_REQUEST, 5557, LISTENING_PORT, 0, 0), b""),
    ];
    vec![
        // Stays open: the host answers 256 bytes, then shuts its write side.
        image([0x44, 1, 4, 1], &open, false),
        // The guest closes: the device flushes and answers with an RST.
        image([0x44, 1, 4, 0], &close, true),
        // The guest closes and resets at once.
        image([0x44, 1, 200, 3], &abort, false),
        image([0x44, 0, 0, 0], &missing, false),
        image([0x33, 2, 1, 2], &odd, true),
    ]
}

/// Lays out rx buffers and tx chains the way a driver would.
fn image(
    prefix: [u8; PREFIX],
    packets: &[(super::packet::Header, &[u8])],
    single_desc: bool,
) -> Vec<u8> {
    let mut mem = vec![0u8; MEM_SIZE];
    let mut put = |at: u64, bytes: &[u8]| {
        let at = usize::try_from(at).expect("seed address");
        mem[at..at + bytes.len()].copy_from_slice(bytes);
    };
    // 16 rx buffers of 0x400 bytes at 0x8000.
    for i in 0..16u16 {
        let addr = 0x8000 + u64::from(i) * 0x400;
        put(
            RX_DESC + u64::from(i) * 16,
            &desc(addr, 0x400, tu::DESC_F_WRITE, 0),
        );
        put(RX_AVAIL + 4 + u64::from(i) * 2, &i.to_le_bytes());
    }
    put(RX_AVAIL + 2, &16u16.to_le_bytes());
    // tx chains: header at 0x1000 + 0x100 i, data at 0x4000 + 0x100 i.
    let mut d = 0u16;
    for (i, (hdr, data)) in packets.iter().enumerate() {
        let hdr_at = 0x1000 + i as u64 * 0x100;
        put(hdr_at, &hdr.to_bytes());
        let head = d;
        if data.is_empty() {
            put(
                TX_DESC + u64::from(d) * 16,
                &desc(hdr_at, HDR_LEN_U32, 0, 0),
            );
            d += 1;
        } else if single_desc {
            put(hdr_at + u64::from(HDR_LEN_U32), data);
            let len = HDR_LEN_U32 + tu::small::<u32>(data.len());
            put(TX_DESC + u64::from(d) * 16, &desc(hdr_at, len, 0, 0));
            d += 1;
        } else {
            let data_at = 0x4000 + i as u64 * 0x100;
            put(data_at, data);
            let next = tu::DESC_F_NEXT;
            put(
                TX_DESC + u64::from(d) * 16,
                &desc(hdr_at, HDR_LEN_U32, next, d + 1),
            );
            put(
                TX_DESC + u64::from(d + 1) * 16,
                &desc(data_at, tu::small(data.len()), 0, 0),
            );
            d += 2;
        }
        put(TX_AVAIL + 4 + i as u64 * 2, &head.to_le_bytes());
    }
    put(TX_AVAIL + 2, &tu::small::<u16>(packets.len()).to_le_bytes());
    fuzz_input(&prefix, &mem)
}

const HDR_LEN_U32: u32 = super::packet::HDR_LEN;
