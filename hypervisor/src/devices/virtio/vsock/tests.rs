//! Device tests: the test plays the guest driver (rings in guest memory built
//! with virtio-queue's mock driver) and the host processes (real Unix sockets),
//! with the real worker thread in between.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::desc::RawDescriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::TX_BUF_SIZE;
use super::packet::*;
use super::*;
use crate::bus::BusDevice;
use crate::devices::virtio::mmio::*;
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::test_utils::{
    activate, bring_up, kick, mem, raw, transport, TestQueue,
};

const CID: u64 = 42;
const QSIZE: u16 = 256;
const RX_BUF: u32 = 4096;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
const MEM_SIZE: usize = 0x200_0000;
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(300);

pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The device, either behind the MMIO transport or activated directly.
enum Dev {
    Mmio(MmioTransport),
    Direct(Vsock),
    Gone,
}

/// The simulated guest driver.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Dev,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    notify: Vec<EventFd>,
    rx_posted: u16,
    rx_seen: u16,
    tx_desc: u16,
    tx_avail: u16,
    /// Write-only rx buffers as two descriptors (header, data) instead of one.
    split_rx: bool,
}

impl<'a> Guest<'a> {
    /// Brings the device up through its MMIO registers, as the Linux driver does.
    fn via_mmio(mem: &'a GuestMemoryMmap, vsock: Vsock) -> Self {
        let mut t = transport(mem, Box::new(vsock));
        let [rx, tx, ev] = TestQueue::at_strides(mem, QSIZE);
        let notify = bring_up(&mut t, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
        Self::new(mem, Dev::Mmio(t), rx, tx, notify)
    }

    /// Resets the device through the status register and starts it again with
    /// fresh rings, as a rebooted guest would.
    fn restart(&mut self) {
        let Dev::Mmio(t) = &mut self.dev else {
            panic!("not behind the transport")
        };
        t.write(0x70, &0u32.to_le_bytes());
        let [rx, tx, ev] = TestQueue::at_strides(self.mem, QSIZE);
        let notify = bring_up(t, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
        *self = Self::new(
            self.mem,
            std::mem::replace(&mut self.dev, Dev::Gone),
            rx,
            tx,
            notify,
        );
    }

    /// Activates the device directly (to inspect it afterwards).
    fn direct(mem: &'a GuestMemoryMmap, mut vsock: Vsock) -> Self {
        let [rx, tx, ev] = TestQueue::at_strides(mem, QSIZE);
        let (notify, _irq) = activate(&mut vsock, mem, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
        Self::new(mem, Dev::Direct(vsock), rx, tx, notify)
    }

    fn new(
        mem: &'a GuestMemoryMmap,
        dev: Dev,
        rx: TestQueue<'a>,
        tx: TestQueue<'a>,
        notify: Vec<EventFd>,
    ) -> Self {
        Self {
            mem,
            dev,
            rx,
            tx,
            notify,
            rx_posted: 0,
            rx_seen: 0,
            tx_desc: 0,
            tx_avail: 0,
            split_rx: false,
        }
    }

    fn vsock(&mut self) -> &mut Vsock {
        match &mut self.dev {
            Dev::Direct(v) => v,
            _ => panic!("device is behind the transport"),
        }
    }

    fn kick(&self, queue: usize) {
        kick(&self.notify, queue);
    }

    /// Offers `n` rx buffers. Buffer slot i uses descriptors 2i and 2i+1 (the
    /// second only for split buffers), so returned slots can be reposted.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_posted % (QSIZE / 2);
            let addr = RX_BASE + u64::from(slot) * 0x2000;
            let d = slot * 2;
            let w = tu::DESC_F_WRITE;
            let table = self.rx.desc_table();
            if self.split_rx {
                table
                    .store(d, raw(addr, HDR_LEN, w | tu::DESC_F_NEXT, d + 1))
                    .unwrap();
                table.store(d + 1, raw(addr + 0x100, RX_BUF, w, 0)).unwrap();
            } else {
                table.store(d, raw(addr, HDR_LEN + RX_BUF, w, 0)).unwrap();
            }
            self.rx.push_avail(d);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.kick(0);
    }

    fn rx_used_idx(&self) -> u16 {
        self.rx.used_idx()
    }

    /// The next packet the device put in an rx buffer, if one comes within `timeout`.
    fn try_recv(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let end = Instant::now() + timeout;
        while self.rx_used_idx() == self.rx_seen {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, len) = self.rx.used_elem(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let desc = self.rx.descriptor(u16::try_from(id).unwrap());
        if len == 0 {
            return Some((Header::default(), Vec::new()));
        }
        assert!(len >= HDR_LEN, "used length {len} shorter than a header");
        let mut hb = [0u8; 44];
        self.mem.read_slice(&mut hb, desc.addr()).unwrap();
        let hdr = Header::from_bytes(&hb);
        assert_eq!(hdr.len, len - HDR_LEN, "header len vs used len");
        let data_addr = if self.split_rx {
            desc.addr().unchecked_add(0x100)
        } else {
            desc.addr().unchecked_add(u64::from(HDR_LEN))
        };
        let mut data = vec![0u8; hdr.len as usize];
        self.mem.read_slice(&mut data, data_addr).unwrap();
        assert_eq!(hdr.src_cid, HOST_CID);
        assert_eq!(hdr.dst_cid, CID);
        if hdr.op != OP_RST {
            // RSTs mirror the type of the packet they answer.
            assert_eq!(hdr.type_, TYPE_STREAM);
        }
        Some((hdr, data))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(WAIT).expect("no packet from the device")
    }

    fn expect_quiet(&mut self) {
        if let Some((h, _)) = self.try_recv(QUIET) {
            panic!("unexpected packet {} {:?}", op_name(h.op), h);
        }
    }

    /// Sends a packet (its len set to the data's) the way the Linux driver lays
    /// it out: header and data in separate descriptors (one, without data).
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = tu::small(data.len());
        let d = self.tx_desc;
        self.tx_desc = (self.tx_desc + 2) % QSIZE;
        let addr = TX_BASE + u64::from(d) * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        let table = self.tx.desc_table();
        if data.is_empty() {
            table.store(d, raw(addr, HDR_LEN, 0, 0)).unwrap();
        } else {
            self.mem
                .write_slice(data, GuestAddress(addr + 0x100))
                .unwrap();
            table
                .store(d, raw(addr, HDR_LEN, tu::DESC_F_NEXT, d + 1))
                .unwrap();
            table
                .store(d + 1, raw(addr + 0x100, tu::small(data.len()), 0, 0))
                .unwrap();
        }
        self.submit_tx(d);
    }

    fn submit_tx(&mut self, head: u16) {
        self.tx.push_avail(head);
        self.tx_avail = self.tx_avail.wrapping_add(1);
        self.kick(1);
    }

    /// Waits until the device returned every tx chain submitted so far.
    fn wait_tx(&self) {
        let end = Instant::now() + WAIT;
        while self.tx.used_idx() != self.tx_avail {
            assert!(Instant::now() < end, "tx chains not returned");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }

    /// Receives RW packets until `n` bytes arrived, reposting buffers.
    fn recv_data(&mut self, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let (h, data) = self.recv();
            assert_eq!(h.op, OP_RW, "expected data, got {}", op_name(h.op));
            assert!(!data.is_empty());
            got.extend(data);
            self.post_rx(1);
        }
        assert_eq!(got.len(), n, "more data than expected");
        got
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF before newline");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}

/// A host client through the CONNECT handshake; returns the stream and the host port.
fn host_connect(g: &mut Guest, uds: &PathBuf, port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.dst_port, port);
    assert!(req.src_port >= 1 << 30, "host port {}", req.src_port);
    assert_eq!(req.buf_alloc, TX_BUF_SIZE);
    let mut resp = g.hdr(OP_RESPONSE, port, req.src_port);
    resp.buf_alloc = 1 << 20;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    (s, req.src_port)
}

#[test]
fn config_space_holds_the_cid_and_bad_cids_or_paths_are_refused() {
    let dir = test_dir("config");
    let uds = dir.join("v.sock");
    let v = Vsock::new(CID, uds.clone()).unwrap();
    let mut cfg = [0xffu8; 12];
    v.read_config(0, &mut cfg);
    assert_eq!(cfg, [42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut b = [0u8; 2];
    v.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert!(matches!(
        Vsock::new(CID, uds.clone()),
        Err(VsockError::PathExists(_))
    ));
    std::fs::write(dir.join("file"), b"x").unwrap();
    let Err(err) = Vsock::new(CID, dir.join("file")) else {
        panic!("bound over a file")
    };
    assert!(err.to_string().contains("file"), "{err}");
    assert!(matches!(
        Vsock::new(2, dir.join("c")),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), dir.join("c")),
        Err(VsockError::InvalidCid(_))
    ));
    assert!(matches!(
        Vsock::new(CID, dir.join("missing/dir/v.sock")),
        Err(VsockError::Bind { .. })
    ));
    drop(v);
    assert!(!uds.exists());
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_half_closes() {
    let dir = test_dir("host-init");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(32);
    let (mut s, hp) = host_connect(&mut g, &uds, 1234);

    // Host to guest: more than one rx buffer's worth.
    let down = pattern(10_000, 1);
    s.write_all(&down).unwrap();
    assert_eq!(g.recv_data(down.len()), down);

    // Guest to host: two packets, one of them the maximum size.
    let up = pattern(64 * 1024 + 5000, 2);
    g.send(g.hdr(OP_RW, 1234, hp), &up[..64 * 1024]);
    g.send(g.hdr(OP_RW, 1234, hp), &up[64 * 1024..]);
    assert_eq!(read_exact_timeout(&mut s, up.len()), up);

    // The host stops sending: the guest gets the rest, then SHUTDOWN(SEND).
    s.write_all(b"last words").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(g.recv_data(10), b"last words");
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    assert_eq!((h.src_port, h.dst_port), (hp, 1234));
    g.post_rx(1);

    // The guest may still send; then it closes, and the device answers with RST.
    g.send(g.hdr(OP_RW, 1234, hp), b"tail");
    assert_eq!(read_exact_timeout(&mut s, 4), b"tail");
    let mut shut = g.hdr(OP_SHUTDOWN, 1234, hp);
    shut.flags = SHUTDOWN_BOTH;
    g.send(shut, &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST);
    assert_eof(&mut s);
    g.expect_quiet();
    g.wait_tx();
}

#[test]
fn guest_refusal_closes_the_host_client() {
    let dir = test_dir("refused");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(8);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    g.send(g.hdr(OP_RST, 99, req.src_port), &[]);
    assert_eof(&mut s);
    g.expect_quiet();
}

#[test]
fn bad_or_idle_host_clients_are_closed_without_blocking_others() {
    let dir = test_dir("bad-clients");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(8);
    let started = Instant::now();
    let mut idle = UnixStream::connect(&uds).unwrap();
    let mut garbage = UnixStream::connect(&uds).unwrap();
    garbage.write_all(b"HELLO WORLD\n").unwrap();
    let mut long = UnixStream::connect(&uds).unwrap();
    long.write_all(&[b'9'; 40]).unwrap();
    assert_eof(&mut garbage);
    assert_eof(&mut long);
    // The idle client does not hold up a good one.
    let (_s, _) = host_connect(&mut g, &uds, 7);
    assert!(started.elapsed() < Duration::from_secs(3));
    // It is dropped once the handshake deadline passes.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(idle.read(&mut b).unwrap(), 0);
    assert!(started.elapsed() >= super::muxer::HANDSHAKE_TIMEOUT);
    g.expect_quiet();
}

#[test]
fn host_clients_wait_in_the_backlog_until_the_driver_starts() {
    let dir = test_dir("backlog");
    let uds = dir.join("v.sock");
    let v = Vsock::new(CID, uds.clone()).unwrap();
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, v);
    g.post_rx(4);
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 5));
    g.send(g.hdr(OP_RESPONSE, 5, req.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
}

#[test]
fn guest_initiated_connections_reach_port_sockets_or_are_reset() {
    let dir = test_dir("guest-init");
    let uds = dir.join("v.sock");
    let service = UnixListener::bind(port_path(&uds, 5000)).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.split_rx = true;
    g.post_rx(16);

    // Nobody listens on port 5001.
    g.send(g.hdr(OP_REQUEST, 40001, 5001), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST);
    assert_eq!((h.src_port, h.dst_port), (5001, 40001));

    g.send(g.hdr(OP_REQUEST, 40000, 5000), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RESPONSE);
    assert_eq!((h.src_port, h.dst_port), (5000, 40000));
    let (mut s, _) = service.accept().unwrap();
    g.send(g.hdr(OP_RW, 40000, 5000), b"ping");
    assert_eq!(read_exact_timeout(&mut s, 4), b"ping");
    let reply = pattern(9000, 3);
    s.write_all(&reply).unwrap();
    assert_eq!(g.recv_data(reply.len()), reply);
    // The service closes: the guest is reset once the data is out.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST, "got {}", op_name(h.op));
    g.expect_quiet();
    assert!(port_path(&uds, 5000).exists(), "not ours to remove");
}

#[test]
fn reads_from_the_host_stay_within_the_guests_credit() {
    let dir = test_dir("credit");
    let uds = dir.join("v.sock");
    let service = UnixListener::bind(port_path(&uds, 6000)).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(32);
    let mut req = g.hdr(OP_REQUEST, 41000, 6000);
    req.buf_alloc = 1000;
    g.send(req, &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut s, _) = service.accept().unwrap();
    let data = pattern(5000, 4);
    s.write_all(&data).unwrap();

    let mut got = g.recv_data(1000);
    g.expect_quiet();

    // The guest consumed 1000 bytes: 1000 more may come.
    let mut upd = g.hdr(OP_CREDIT_UPDATE, 41000, 6000);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    g.send(upd, &[]);
    got.extend(g.recv_data(1000));
    g.expect_quiet();

    // A bigger buffer lets the rest through.
    upd.buf_alloc = 1 << 20;
    g.send(upd, &[]);
    got.extend(g.recv_data(3000));
    assert_eq!(got, data);

    // The guest asks for our credit: it gets our buffer size and what we forwarded.
    g.send(g.hdr(OP_RW, 41000, 6000), b"12345");
    g.send(g.hdr(OP_CREDIT_REQUEST, 41000, 6000), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_CREDIT_UPDATE);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (TX_BUF_SIZE, 5));
    assert_eq!(read_exact_timeout(&mut s, 5), b"12345");
}

#[test]
fn a_guest_ignoring_our_credit_is_reset() {
    let dir = test_dir("overrun");
    let uds = dir.join("v.sock");
    let service = UnixListener::bind(port_path(&uds, 6001)).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(8);
    g.send(g.hdr(OP_REQUEST, 41001, 6001), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut s, _) = service.accept().unwrap();
    // The host does not read; the guest sends 64 KiB packets regardless of credit.
    let chunk = pattern(64 * 1024, 5);
    let mut sent = 0;
    let rst = loop {
        assert!(sent < 64, "never reset");
        g.send(g.hdr(OP_RW, 41001, 6001), &chunk);
        sent += 1;
        g.wait_tx();
        match g.try_recv(Duration::from_millis(20)) {
            Some((h, _)) if h.op == OP_CREDIT_UPDATE => g.post_rx(1),
            Some((h, _)) => break h,
            None => {}
        }
    };
    assert_eq!(rst.op, OP_RST);
    // The buffer never grew past our credit: what reached the socket is a
    // byte-exact prefix, and the stream is closed.
    assert!(sent * chunk.len() > TX_BUF_SIZE as usize);
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(!all.is_empty() && all.len() < sent * chunk.len());
    for piece in all.chunks(chunk.len()) {
        assert_eq!(piece, &chunk[..piece.len()]);
    }
}

#[test]
fn buffered_data_reaches_the_host_after_guest_close_or_reset() {
    let dir = test_dir("linger");
    let uds = dir.join("v.sock");
    let service = UnixListener::bind(port_path(&uds, 6002)).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(16);
    let total = TX_BUF_SIZE as usize;
    let data = pattern(total, 6);
    for (port, op) in [(50000, OP_SHUTDOWN), (50001, OP_RST)] {
        g.send(g.hdr(OP_REQUEST, port, 6002), &[]);
        assert_eq!(g.recv().0.op, OP_RESPONSE);
        let (mut s, _) = service.accept().unwrap();
        // All our credit at once: more than the socket takes, so some is buffered.
        for piece in data.chunks(64 * 1024) {
            g.send(g.hdr(OP_RW, port, 6002), piece);
        }
        let mut close = g.hdr(op, port, 6002);
        close.flags = SHUTDOWN_BOTH;
        g.send(close, &[]);
        g.wait_tx();
        if op == OP_SHUTDOWN {
            // No RST until the data is out (credit updates sent earlier may come).
            while let Some((h, _)) = g.try_recv(QUIET) {
                assert_eq!(h.op, OP_CREDIT_UPDATE);
                g.post_rx(1);
            }
        }
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), total);
        assert!(all == data, "data corrupted");
        if op == OP_SHUTDOWN {
            let (h, _) = g.recv();
            assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6002, port));
        } else {
            while let Some((h, _)) = g.try_recv(QUIET) {
                assert_eq!(h.op, OP_CREDIT_UPDATE);
                g.post_rx(1);
            }
        }
        g.expect_quiet();
    }
}

/// Sends a probe that must be answered with an RST on `port`: proves the
/// device processed everything before it and is still alive.
fn probe(g: &mut Guest, port: u32) {
    g.send(g.hdr(OP_REQUEST, 60000, port), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port), (OP_RST, port), "probe {port}");
}

#[test]
fn malformed_tx_packets_are_dropped_or_reset_and_never_stall_the_device() {
    let dir = test_dir("malformed-tx");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(64);
    let base = TX_BASE + 200 * TX_SLOT;
    let write_hdr = |g: &mut Guest, h: Header| {
        g.mem
            .write_slice(&h.to_bytes(), GuestAddress(base))
            .unwrap();
    };
    let table = |g: &Guest, i: u16, d: RawDescriptor| g.tx.desc_table().store(i, d).unwrap();
    const NEXT: u16 = tu::DESC_F_NEXT;

    // A descriptor loop: header -> data -> header ...
    let mut h = g.hdr(OP_RST, 1, 2);
    h.len = 100;
    write_hdr(&mut g, h);
    table(&g, 200, raw(base, 44, NEXT, 201));
    table(&g, 201, raw(base, 200, NEXT, 200));
    g.submit_tx(200);
    g.wait_tx();
    probe(&mut g, 1);

    // A self-referencing indirect table, and one with a bad length.
    table(&g, 202, raw(base + 0x1000, 16, tu::DESC_F_INDIRECT, 0));
    g.mem
        .write_obj(
            raw(base + 0x1000, 16, tu::DESC_F_INDIRECT, 0),
            GuestAddress(base + 0x1000),
        )
        .unwrap();
    g.submit_tx(202);
    table(&g, 203, raw(base + 0x1000, 15, tu::DESC_F_INDIRECT, 0));
    g.submit_tx(203);
    g.wait_tx();
    probe(&mut g, 2);

    // Header outside guest memory; header straddling the end of memory.
    table(&g, 204, raw(0xffff_ffff_0000, 44, 0, 0));
    g.submit_tx(204);
    table(&g, 205, raw(MEM_SIZE as u64 - 20, 44, 0, 0));
    g.submit_tx(205);
    g.wait_tx();
    probe(&mut g, 3);

    // Payload length over the 64 KiB bound, and longer than its descriptor.
    let mut h = g.hdr(OP_RW, 1, 2);
    h.len = 1 << 20;
    write_hdr(&mut g, h);
    table(&g, 206, raw(base, 44, NEXT, 207));
    table(&g, 207, raw(base + 0x100, u32::MAX, 0, 0));
    g.submit_tx(206);
    g.wait_tx();
    h.len = 5000;
    write_hdr(&mut g, h);
    table(&g, 207, raw(base + 0x100, 100, 0, 0));
    g.submit_tx(206);
    g.wait_tx();
    probe(&mut g, 4);

    // The header split 20 + 24 across two descriptors.
    let h = g.hdr(OP_REQUEST, 60000, 5);
    write_hdr(&mut g, h);
    table(&g, 208, raw(base, 20, NEXT, 209));
    table(&g, 209, raw(base + 20, 24, 0, 0));
    g.submit_tx(208);
    g.wait_tx();
    // A write-only descriptor on the tx queue.
    table(&g, 210, raw(base, 44, tu::DESC_F_WRITE, 0));
    g.submit_tx(210);
    g.wait_tx();
    g.expect_quiet();
    probe(&mut g, 5);

    // A head index beyond the queue: consumed, never returned, nothing stalls.
    g.submit_tx(300);
    g.tx_avail = g.tx_avail.wrapping_sub(1);
    probe(&mut g, 6);

    // Protocol garbage: wrong source CID is dropped silently; the rest get RSTs.
    let mut h = g.hdr(OP_REQUEST, 60000, 70);
    h.src_cid = 77;
    g.send(h, &[]);
    g.wait_tx();
    probe(&mut g, 7);
    let mut seq = g.hdr(OP_REQUEST, 60001, 8);
    seq.type_ = 2; // SEQPACKET
    let mut other_cid = g.hdr(OP_REQUEST, 60002, 9);
    other_cid.dst_cid = 7;
    for (h, port) in [
        (seq, 8),
        (other_cid, 9),
        (g.hdr(99, 60003, 10), 10),
        (g.hdr(OP_RW, 60004, 11), 11),
        (g.hdr(OP_RESPONSE, 60005, 12), 12),
    ] {
        g.send(h, b"x");
        let (r, _) = g.recv();
        assert_eq!(
            (r.op, r.src_port, r.type_),
            (OP_RST, port, h.type_),
            "{h:?}"
        );
    }
    // An RST for an unknown connection is not answered.
    g.send(g.hdr(OP_RST, 60006, 13), &[]);
    g.wait_tx();
    probe(&mut g, 14);
    g.expect_quiet();
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_the_next_one_is_used() {
    let dir = test_dir("malformed-rx");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    let table = |g: &Guest, i: u16, d: RawDescriptor| g.rx.desc_table().store(i, d).unwrap();
    let w = tu::DESC_F_WRITE;
    let next = tu::DESC_F_NEXT;
    // Read-only; too short for a header; outside memory; a data descriptor
    // over the bound; a data descriptor that is read-only.
    table(&g, 200, raw(RX_BASE, 4096, 0, 0));
    table(&g, 201, raw(RX_BASE, 20, w, 0));
    table(&g, 202, raw(0xffff_ffff_0000, 4096, w, 0));
    table(&g, 203, raw(RX_BASE, 44, w | next, 204));
    table(&g, 204, raw(RX_BASE + 0x100, 1 << 20, w, 0));
    table(&g, 205, raw(RX_BASE, 44, w | next, 206));
    table(&g, 206, raw(RX_BASE + 0x100, 4096, 0, 0));
    // A loop: the data descriptor is the header descriptor again.
    table(&g, 207, raw(RX_BASE, 4096, w | next, 207));
    for head in [200, 201, 202, 203, 205] {
        g.rx.push_avail(head);
    }
    g.kick(0);
    // Something to say, so the device consumes buffers.
    g.send(g.hdr(OP_REQUEST, 60000, 1), &[]);
    for _ in 0..5 {
        let (h, data) = g.recv();
        assert_eq!(
            (h, data.len()),
            (Header::default(), 0),
            "malformed buffer used"
        );
    }
    g.expect_quiet();
    g.rx.push_avail(207);
    g.kick(0);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port), (OP_RST, 1));
    // Ordinary buffers still work afterwards.
    g.post_rx(4);
    probe(&mut g, 2);
}

#[test]
fn reset_stops_the_worker_and_closes_every_stream_and_drop_removes_the_socket() {
    let dir = test_dir("teardown");
    let uds = dir.join("v.sock");
    let service = UnixListener::bind(port_path(&uds, 7000)).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(8);
    let (mut host_side, _) = host_connect(&mut g, &uds, 1);
    g.send(g.hdr(OP_REQUEST, 40000, 7000), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut service_side, _) = service.accept().unwrap();
    let mut half_done = UnixStream::connect(&uds).unwrap();
    half_done.write_all(b"CONN").unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let end = Instant::now() + WAIT;
    let tid = loop {
        if let Some(tid) = g.vsock().worker_tid() {
            break tid;
        }
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(1));
    };
    let task = PathBuf::from(format!("/proc/self/task/{tid}"));
    assert_eq!(
        std::fs::read_to_string(task.join("comm")).unwrap().trim(),
        "husk-vsock"
    );
    g.vsock().reset();
    assert!(tu::thread_gone(tid), "worker thread still running");
    assert_eof(&mut host_side);
    assert_eof(&mut service_side);
    assert_eof(&mut half_done);
    // The listener survives a reset: clients queue up for the next activation.
    assert!(uds.exists());
    let _waiting = UnixStream::connect(&uds).unwrap();
    g.vsock().reset(); // idempotent

    drop(g);
    assert!(!uds.exists(), "socket left behind");
    assert!(
        port_path(&uds, 7000).exists(),
        "service sockets are not the device's"
    );
}

#[test]
fn driver_reset_through_the_transport_allows_a_fresh_start() {
    let dir = test_dir("restart");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, Vsock::new(CID, uds.clone()).unwrap());
    g.post_rx(4);
    let (mut s, _) = host_connect(&mut g, &uds, 3);
    // The driver resets and comes back with new rings; the socket stays.
    g.restart();
    assert_eof(&mut s);
    assert!(uds.exists());
    g.post_rx(4);
    let (mut s, hp) = host_connect(&mut g, &uds, 3);
    g.send(g.hdr(OP_RW, 3, hp), b"again");
    assert_eq!(read_exact_timeout(&mut s, 5), b"again");
    drop(g);
    assert!(!uds.exists());
}

#[test]
fn fuzz_entry_point_runs_its_seeds() {
    let seeds = super::fuzz::seeds();
    for (i, seed) in seeds.iter().enumerate() {
        let outcome = super::fuzz::fuzz_queues(seed);
        let o = &outcome;
        match i {
            // RESPONSE, the host's 256 bytes (one 1 KiB buffer; the header answers the
            // credit request too), SHUTDOWN(SEND).
            0 => assert!(
                (o.tx_used, o.host_received, o.rx_used, o.accepted) == (3, 5, 3, 1),
                "{o:?}"
            ),
            // RESPONSE, then the device's RST answering the guest's full shutdown.
            1 => assert!(
                (o.tx_used, o.host_received, o.rx_used) == (6, 5, 2),
                "{o:?}"
            ),
            // The guest's own RST ends it: only the RESPONSE.
            2 => assert!(
                (o.tx_used, o.host_received, o.rx_used) == (7, 5, 1),
                "{o:?}"
            ),
            // A refused connect: one RST.
            3 => assert!((o.tx_used, o.rx_used) == (1, 1), "{o:?}"),
            _ => assert!(o.tx_used > 0, "{o:?}"),
        }
    }
    // The repository's corpus (and $HUSK_FUZZ_SEED_DIR/vsock_queues/ gets the seeds).
    tu::run_corpus("vsock_queues", &seeds, 0, 0, |input| {
        super::fuzz::fuzz_queues(input);
    });
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for _ in 0..200 {
        let input: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                tu::low_byte(x)
            })
            .collect();
        super::fuzz::fuzz_queues(&input);
    }
}

#[test]
fn handshake_fuzz_seeds_corpus_and_random_inputs_hold() {
    use super::fuzz::{fuzz_handshake, handshake_seeds, Verdict};
    let seeds = handshake_seeds();
    let v: Vec<Verdict> = seeds.iter().map(|s| fuzz_handshake(s)).collect();
    assert_eq!(
        v[..5],
        [
            Verdict::Port(1024),
            Verdict::Port(1024),
            Verdict::Port(u32::MAX),
            Verdict::Malformed,
            Verdict::Port(52),
        ]
    );
    assert_eq!(
        v[5..],
        [
            Verdict::Malformed,
            Verdict::Malformed,
            Verdict::Eof,
            Verdict::TooLong,
            Verdict::Malformed,
        ]
    );
    tu::run_corpus("vsock_handshake", &seeds, 3000, 64, |input| {
        fuzz_handshake(input);
    });
}

/// CPU time (user + system, in clock ticks) a thread of this process used.
fn thread_cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the parenthesized name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn assert_worker_idle(g: &mut Guest) {
    let tid = g.vsock().worker_tid().unwrap();
    let before = thread_cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_cpu_ticks(tid) - before;
    assert!(used <= 10, "worker used {used} ticks in 500 ms while idle");
}

#[test]
fn a_worker_with_nothing_it_can_do_sleeps() {
    let dir = test_dir("idle");
    let uds = dir.join("v.sock");
    let service = UnixListener::bind(port_path(&uds, 8000)).unwrap();
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, Vsock::new(CID, uds.clone()).unwrap());
    // No rx buffers: an RST and a RESPONSE are owed but cannot be delivered.
    g.send(g.hdr(OP_REQUEST, 100, 8001), &[]);
    g.send(g.hdr(OP_REQUEST, 101, 8000), &[]);
    g.wait_tx();
    let (mut svc, _) = service.accept().unwrap();
    // The service talks and hangs up before the guest even knows the connection.
    svc.write_all(b"early").unwrap();
    drop(svc);
    // A host client that never finishes its handshake.
    let _idle = UnixStream::connect(&uds).unwrap();
    assert_worker_idle(&mut g);

    // A zero-sized data buffer cannot carry data but can carry the RST.
    let w = tu::DESC_F_WRITE;
    let table = g.rx.desc_table();
    table
        .store(250, raw(RX_BASE, 44, w | tu::DESC_F_NEXT, 251))
        .unwrap();
    table.store(251, raw(RX_BASE + 0x100, 0, w, 0)).unwrap();
    g.rx.push_avail(250);
    g.kick(0);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port), (OP_RST, 8001));
    assert_worker_idle(&mut g);
    g.split_rx = true;
    g.post_rx(8);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port), (OP_RESPONSE, 8000));
    assert_eq!(g.recv_data(5), b"early");
    assert_eq!(g.recv().0.op, OP_RST);

    // An established connection whose guest has no credit left, and whose
    // host end then hangs up with data still unread.
    let (mut s, hp) = host_connect(&mut g, &uds, 9);
    let mut upd = g.hdr(OP_CREDIT_UPDATE, 9, hp);
    upd.buf_alloc = 3;
    g.send(upd, &[]);
    s.write_all(b"abcdef").unwrap();
    assert_eq!(g.recv_data(3), b"abc");
    drop(s);
    std::thread::sleep(Duration::from_millis(50));
    assert_worker_idle(&mut g);
    upd.fwd_cnt = 3;
    g.send(upd, &[]);
    assert_eq!(g.recv_data(3), b"def");
    // The host can no longer receive; whether it has more to say can only be
    // learned by reading, which needs credit again.
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_RCV));
    g.expect_quiet();
    upd.fwd_cnt = 6;
    g.send(upd, &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    g.expect_quiet();
}

#[test]
fn host_data_waiting_for_rx_buffers_does_not_spin_the_worker() {
    let dir = test_dir("no-buffers");
    let uds = dir.join("v.sock");
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, Vsock::new(CID, uds.clone()).unwrap());
    // One buffer: it carries the REQUEST, then the guest has none left.
    g.post_rx(1);
    let (mut s, _) = host_connect(&mut g, &uds, 11);
    let data = pattern(20_000, 7);
    s.write_all(&data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_worker_idle(&mut g);
    g.post_rx(8);
    assert_eq!(g.recv_data(data.len()), data);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
}

/// A restored guest's vsock: the device posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
/// in the guest's event buffer at start, and host clients wait until the
/// guest handed the event buffer back (it has reset its old sockets by
/// then), so no new connection is caught in the reset.
#[test]
fn a_restored_device_resets_the_guests_connections_before_host_clients_get_in() {
    const EVENT_BUF: u64 = 0x80_0000;
    let dir = test_dir("transport-reset");
    let uds = dir.join("v.sock");
    let mut vsock = Vsock::new(CID, uds.clone()).unwrap();
    vsock.announce_transport_reset();
    let m = mem(MEM_SIZE);
    m.write_slice(&[0xaa; 8], GuestAddress(EVENT_BUF)).unwrap();
    let [rx, tx, ev] = TestQueue::at_strides(&m, QSIZE);
    // The guest's event buffer was posted before the snapshot.
    ev.desc_table()
        .store(0, raw(EVENT_BUF, 8, tu::DESC_F_WRITE, 0))
        .unwrap();
    ev.push_avail(0);
    let (notify, _irq) = activate(&mut vsock, &m, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
    assert_eq!(ev.used_idx(), 1, "the reset event was posted");
    assert_eq!(ev.used_elem(0), (0, 4));
    let mut event = [0u8; 4];
    m.read_slice(&mut event, GuestAddress(EVENT_BUF)).unwrap();
    assert_eq!(
        u32::from_le_bytes(event),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );

    let mut g = Guest::new(&m, Dev::Direct(vsock), rx, tx, notify);
    g.post_rx(4);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    g.expect_quiet();
    // The guest handled the event and refills its event queue.
    ev.desc_table()
        .store(1, raw(EVENT_BUF, 8, tu::DESC_F_WRITE, 0))
        .unwrap();
    ev.push_avail(1);
    g.kick(2);
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    g.send(g.hdr(OP_RESPONSE, 1024, req.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
}
