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

/// What a host client's `CONNECT` line must lead to, by the protocol
/// (Firecracker's: `CONNECT`, one space, a decimal u32, a newline).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Port(u32),
    TooLong,
    Malformed,
    /// The client closed before a full line.
    Eof,
}

/// The verdict on `bytes` and the index of the byte that decides it (None:
/// only the end of the stream does).
fn handshake_model(bytes: &[u8]) -> (Option<usize>, Verdict) {
    use super::handshake::MAX_LINE;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            return (Some(i), connect_model(&bytes[..i]));
        }
        if i + 1 >= MAX_LINE {
            return (Some(i), Verdict::TooLong);
        }
    }
    (None, Verdict::Eof)
}

fn connect_model(line: &[u8]) -> Verdict {
    let Some(digits) = line.strip_prefix(b"CONNECT ") else {
        return Verdict::Malformed;
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Verdict::Malformed;
    }
    let significant = &digits[digits.iter().take_while(|&&d| d == b'0').count()..];
    if significant.len() > 10 {
        return Verdict::Malformed;
    }
    let value = significant
        .iter()
        .fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    u32::try_from(value).map_or(Verdict::Malformed, Verdict::Port)
}

/// Cuts `bytes` into the pieces a client sends: all at once when `seed` is
/// 0, else pieces of 1 to `seed % 32 + 1` bytes (a fixed sequence per seed).
pub fn pieces(seed: u8, bytes: &[u8]) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![bytes];
    }
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = 1 + usize::from(tu::low_byte(x)) % (usize::from(seed % 32) + 1);
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

/// Runs one input against the VMM's side of the host handshake: byte 0
/// picks how the rest is cut into pieces ([`pieces`]); the rest is what a
/// host client writes on the device's socket before it closes its end. The
/// real [`Handshake`](super::handshake::Handshake) reads it over a real
/// Unix socket, and must:
/// - decide exactly when the deciding byte (the newline, or the byte that
///   makes the line too long) arrives, and only then;
/// - reach the protocol's verdict (a port only for `CONNECT <u32>`, errors
///   for the rest, EOF if the client stops before a line);
/// - leave everything after the newline unread: it is the guest's payload;
/// - keep its error messages bounded.
pub fn fuzz_handshake(data: &[u8]) -> Verdict {
    use super::handshake::{Handshake, HandshakeError, MAX_LINE};
    let Some((&seed, bytes)) = data.split_first() else {
        return Verdict::Eof;
    };
    // More than a socket buffer holds would block the writer.
    let bytes = &bytes[..bytes.len().min(64 * 1024)];
    let (decided_at, expected) = handshake_model(bytes);
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    server.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut hs = Handshake::new(server, deadline);

    let mut sent = 0;
    let mut result = None;
    for piece in pieces(seed, bytes) {
        client.write_all(piece).expect("client write");
        sent += piece.len();
        match hs.advance() {
            Ok(None) => assert!(
                decided_at.is_none_or(|at| at >= sent),
                "undecided {sent} bytes in, past the deciding byte {decided_at:?}"
            ),
            r => {
                assert!(
                    decided_at.is_some_and(|at| at < sent),
                    "decided ({r:?}) {sent} bytes in, before the deciding byte {decided_at:?}"
                );
                result = Some(r);
                break;
            }
        }
    }
    // The rest of the client's bytes, then its end of the stream.
    client.write_all(&bytes[sent..]).expect("client write");
    drop(client);
    let result = result.unwrap_or_else(|| hs.advance());
    let verdict = match result {
        Ok(Some(port)) => Verdict::Port(port),
        Ok(None) => panic!("undecided after the client closed"),
        Err(HandshakeError::TooLong) => Verdict::TooLong,
        Err(HandshakeError::Malformed(text)) => {
            assert!(text.len() <= 3 * MAX_LINE, "{} bytes of error", text.len());
            Verdict::Malformed
        }
        Err(HandshakeError::Eof) => Verdict::Eof,
        Err(HandshakeError::Io(e)) => panic!("reading a socketpair failed: {e}"),
    };
    assert_eq!(verdict, expected, "on {:?}", String::from_utf8_lossy(bytes));
    if let (Verdict::Port(_), Some(at)) = (&verdict, decided_at) {
        hs.stream.set_nonblocking(false).expect("blocking");
        let mut payload = Vec::new();
        hs.stream.read_to_end(&mut payload).expect("payload");
        assert_eq!(payload, &bytes[at + 1..], "payload after the line");
    }
    verdict
}

/// Starting points for [`fuzz_handshake`] (and husk-vsock's half of the
/// `vsock_handshake` target, which reads the same bytes as the VMM's reply).
pub fn handshake_seeds() -> Vec<Vec<u8>> {
    let seed = |cut: u8, s: &[u8]| {
        let mut v = vec![cut];
        v.extend_from_slice(s);
        v
    };
    vec![
        seed(0, b"CONNECT 1024\n"),
        seed(1, b"CONNECT 1024\nttrpc payload"),
        seed(7, b"CONNECT 4294967295\n"),
        seed(3, b"CONNECT 4294967296\n"),
        seed(0, b"CONNECT 000000000000000052\n"),
        seed(5, b"OK 1073741824\nGUEST-HELLO\n"),
        seed(0, b"CONNECT +5\n"),
        seed(2, b"CONNECT 5"),
        seed(31, &[b'A'; 40]),
        seed(0, b"\xff\xfe\n"),
    ]
}
