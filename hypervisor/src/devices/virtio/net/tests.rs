//! Device tests: the test plays the guest driver (rings in guest memory)
//! and the pod network (a real tap in a network namespace the test creates,
//! with a packet socket on it), with the real worker thread in between.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_net::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::mmio::*;
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::test_utils::{
    activate, bring_up, features, kick, mem, raw, transport, TestQueue,
};

const QSIZE: u16 = 256;
const MEM_SIZE: usize = 0x200_0000;
const RX_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2_0000;
const TX_BASE: u64 = 0x120_0000;
const TX_SLOT: u64 = 0x1_0000;
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);
const NEXT: u16 = tu::DESC_F_NEXT;
const WRITE: u16 = tu::DESC_F_WRITE;
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x02];
/// IEEE 802 "local experimental" EtherType: nothing else on the tap uses it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace for one test, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(test: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "husk-net-{}-{}-{test}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        // No IPv6 autoconfiguration traffic on the tap.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args);
    }

    /// Waits (a little) for `name` to be gone: a tap goes away when its last
    /// descriptor closes, and a process another test thread is spawning
    /// holds copies of our descriptors until it execs.
    fn link_gone(&self, name: &str) -> bool {
        let end = Instant::now() + WAIT;
        while self.has_link(name) {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// open_tap, retried while an earlier tap of that name is still going away.
    fn open_tap(&self, name: &str) -> Tap {
        let end = Instant::now() + WAIT;
        loop {
            match open_tap(name, Some(&self.path())) {
                Ok(t) => return t,
                Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("open_tap {name}: {e}"),
            }
        }
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", name])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(path).unwrap();
            // SAFETY: setns on a namespace descriptor we own; only this thread moves.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            f()
        })
        .join()
        .unwrap()
    }

    /// A packet socket on `ifname` inside the namespace: it sees what the
    /// device writes to the tap and can send frames the device reads.
    fn packet_socket(&self, ifname: &str) -> PacketSocket {
        let ifname = std::ffi::CString::new(ifname).unwrap();
        self.run(move || {
            // SAFETY: a NUL-terminated interface name.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert!(ifindex > 0, "no such interface");
            let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
            // SAFETY: socket() takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: fd is new and owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain old data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
            sll.sll_protocol = proto;
            sll.sll_ifindex = i32::try_from(ifindex).unwrap();
            // SAFETY: sll is a valid sockaddr_ll of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    tu::small(std::mem::size_of::<libc::sockaddr_ll>()),
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 20_000,
            };
            // SAFETY: tv is a valid timeval of the given size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    tu::small(std::mem::size_of::<libc::timeval>()),
                )
            };
            PacketSocket { fd }
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            isize::try_from(frame.len()).unwrap(),
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame of ours (our EtherType) the device wrote into the tap.
    fn try_recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < end {
            // SAFETY: sockaddr_ll is plain old data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len: u32 = tu::small(std::mem::size_of::<libc::sockaddr_ll>());
            // SAFETY: buf and from are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..usize::try_from(n).unwrap()];
            if frame.len() >= 14 && frame[12..14] == ETHERTYPE {
                return Some(frame.to_vec());
            }
        }
        None
    }

    fn recv(&self) -> Vec<u8> {
        self.try_recv(WAIT).expect("no frame from the device")
    }
}

/// An Ethernet frame of our EtherType.
fn eth(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..payload_len).map(|i| i.to_le_bytes()[0].wrapping_mul(7).wrapping_add(seed)));
    f
}

/// What the guest got in its rx buffers for one frame.
#[derive(Debug)]
struct Rx {
    hdr: [u8; VNET_HDR_LEN],
    frame: Vec<u8>,
    buffers: usize,
}

impl Rx {
    fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

enum Dev {
    /// Only held: the transport owns the device and its worker.
    #[allow(dead_code)]
    Mmio(MmioTransport),
    Direct(Net),
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
    rx_buf_len: u32,
    tx_desc: u16,
    tx_avail: u16,
}

impl<'a> Guest<'a> {
    /// Brings the device up through its registers acking `acked`, as Linux does.
    fn via_mmio(mem: &'a GuestMemoryMmap, net: Net, acked: u64) -> Self {
        let mut t = transport(mem, Box::new(net));
        let [rx, tx] = TestQueue::at_strides(mem, QSIZE);
        let notify = bring_up(&mut t, acked, &[&rx, &tx]);
        Self::new(mem, Dev::Mmio(t), rx, tx, notify, acked)
    }

    /// Activates the device directly (to inspect it afterwards).
    fn direct(mem: &'a GuestMemoryMmap, mut net: Net, acked: u64) -> Self {
        let [rx, tx] = TestQueue::at_strides(mem, QSIZE);
        let (notify, _irq) = activate(&mut net, mem, acked, &[&rx, &tx]);
        Self::new(mem, Dev::Direct(net), rx, tx, notify, acked)
    }

    fn new(
        mem: &'a GuestMemoryMmap,
        dev: Dev,
        rx: TestQueue<'a>,
        tx: TestQueue<'a>,
        notify: Vec<EventFd>,
        acked: u64,
    ) -> Self {
        let mrg = acked & 1 << VIRTIO_NET_F_MRG_RXBUF != 0;
        Self {
            mem,
            dev,
            rx,
            tx,
            notify,
            rx_posted: 0,
            rx_seen: 0,
            // What Linux posts: pages with MRG_RXBUF, 64 KiB "big packets" without.
            rx_buf_len: if mrg { 4096 } else { 65562 },
            tx_desc: 0,
            tx_avail: 0,
        }
    }

    fn net(&mut self) -> &mut Net {
        match &mut self.dev {
            Dev::Direct(n) => n,
            Dev::Mmio(_) => panic!("device is behind the transport"),
        }
    }

    fn kick(&self, q: usize) {
        kick(&self.notify, q);
    }

    /// Posts `n` rx buffers of rx_buf_len bytes (one descriptor each).
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_posted % QSIZE;
            // 64 distinct buffers: tests never have more outstanding.
            let addr = RX_BASE + u64::from(slot % 64) * RX_SLOT;
            self.rx
                .desc_table()
                .store(slot, raw(addr, self.rx_buf_len, WRITE, 0))
                .unwrap();
            self.rx.push_avail(slot);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.kick(0);
    }

    fn rx_used(&self) -> u16 {
        self.rx.used_idx()
    }

    fn next_used(&mut self, timeout: Duration) -> Option<(u16, u32)> {
        let end = Instant::now() + timeout;
        while self.rx_used() == self.rx_seen {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, len) = self.rx.used_elem(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        Some((u16::try_from(id).unwrap(), len))
    }

    fn read_buf(&self, head: u16, len: u32) -> Vec<u8> {
        let d = self.rx.descriptor(head);
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, d.addr()).unwrap();
        data
    }

    /// The next frame the device put into rx buffers (following num_buffers).
    fn try_recv(&mut self, timeout: Duration) -> Option<Rx> {
        let (head, len) = self.next_used(timeout)?;
        assert!(len as usize >= VNET_HDR_LEN, "used length {len}");
        let first = self.read_buf(head, len);
        let hdr: [u8; VNET_HDR_LEN] = first[..VNET_HDR_LEN].try_into().unwrap();
        let mut rx = Rx {
            hdr,
            frame: first[VNET_HDR_LEN..].to_vec(),
            buffers: 1,
        };
        for _ in 1..rx.num_buffers() {
            let (head, len) = self.next_used(WAIT).expect("merged buffer missing");
            rx.frame.extend(self.read_buf(head, len));
            rx.buffers += 1;
        }
        Some(rx)
    }

    fn recv(&mut self) -> Rx {
        self.try_recv(WAIT).expect("no frame for the guest")
    }

    /// Queues a frame on tx, split into descriptors at `cuts` (offsets into
    /// header + frame).
    fn send_split(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8], cuts: &[usize]) {
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(frame);
        let base = TX_BASE + u64::from(self.tx_desc % 16) * TX_SLOT;
        self.mem.write_slice(&bytes, GuestAddress(base)).unwrap();
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(bytes.len());
        let n = bounds.len() - 1;
        let head = self.take_tx_descs(tu::small(n));
        for i in 0..n {
            let flags = if i + 1 < n { NEXT } else { 0 };
            let d = raw(
                base + bounds[i] as u64,
                tu::small(bounds[i + 1] - bounds[i]),
                flags,
                head + tu::small::<u16>(i) + 1,
            );
            self.tx
                .desc_table()
                .store(head + tu::small::<u16>(i), d)
                .unwrap();
        }
        self.submit_tx(head);
    }

    fn send(&mut self, frame: &[u8]) {
        self.send_split([0; VNET_HDR_LEN], frame, &[]);
    }

    fn take_tx_descs(&mut self, n: u16) -> u16 {
        if self.tx_desc + n > QSIZE {
            self.tx_desc = 0;
        }
        let d = self.tx_desc;
        self.tx_desc += n;
        d
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
}

/// A netns with a tap for the device and a packet socket watching it.
fn setup(test: &str, mtu: Option<u16>) -> (NetNs, Net, PacketSocket) {
    let ns = NetNs::new(test);
    let tap = open_tap("tap0", Some(&ns.path())).unwrap();
    assert_eq!(tap.name(), "tap0");
    let sock = ns.packet_socket("tap0");
    let net = Net::new(tap, GUEST_MAC, mtu).unwrap();
    (ns, net, sock)
}

fn all_offloads() -> u64 {
    features(&[
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ])
}

#[test]
fn config_space_and_features_and_bad_arguments() {
    let (_ns, net, _sock) = setup("config", Some(1450));
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let f = net.avail_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert!(f & 1 << bit != 0, "feature {bit} not offered");
    }
    assert!(f & VIRTIO_F_VERSION_1 != 0);
    assert_eq!(f & 1 << VIRTIO_NET_F_CTRL_VQ, 0, "no control queue");
    let mut cfg = [0xffu8; 14];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(
        u16::from_le_bytes([cfg[6], cfg[7]]),
        u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap()
    );
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1450);
    assert_eq!(&cfg[12..], &[0, 0]);
    let mut b = [0xffu8; 2];
    net.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);

    let ns = NetNs::new("config-args");
    let tap = || ns.open_tap("tap1");
    let no_mtu = Net::new(tap(), GUEST_MAC, None).unwrap();
    assert_eq!(no_mtu.avail_features() & 1 << VIRTIO_NET_F_MTU, 0);
    drop(no_mtu);
    let mut multicast = GUEST_MAC;
    multicast[0] |= 1;
    assert!(matches!(
        Net::new(tap(), multicast, None),
        Err(NetError::InvalidMac(_))
    ));
    assert!(matches!(
        Net::new(tap(), [0; 6], None),
        Err(NetError::InvalidMac(_))
    ));
    assert!(matches!(
        Net::new(tap(), GUEST_MAC, Some(67)),
        Err(NetError::InvalidMtu(67))
    ));
    assert!(Net::new(tap(), GUEST_MAC, Some(68)).is_ok());
}

#[test]
fn open_tap_works_in_the_namespace_and_leaves_the_callers_alone() {
    let ns = NetNs::new("open");
    let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let tap = open_tap("htap0", Some(&ns.path())).unwrap();
    assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own);
    assert!(ns.has_link("htap0"), "tap not in the namespace");
    assert!(
        !Path::new("/sys/class/net/htap0").exists(),
        "tap in the caller's namespace"
    );
    // Up, so frames flow as soon as the device runs.
    let link = Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "htap0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains(",UP"));
    // One queue per tap: a second open of the same name fails.
    assert!(open_tap("htap0", Some(&ns.path())).is_err());
    // Closing the tap removes it (it was not persistent).
    drop(tap);
    assert!(ns.link_gone("htap0"));

    let bad = |name: &str| open_tap(name, Some(&ns.path())).unwrap_err();
    assert_eq!(bad("").kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(
        bad("a-much-too-long-name").kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert_eq!(bad("a/b").kind(), std::io::ErrorKind::InvalidInput);
    let missing = open_tap("t", Some(Path::new("/var/run/netns/husk-no-such-ns"))).unwrap_err();
    assert!(missing.to_string().contains("husk-no-such-ns"), "{missing}");

    // Tap::from_fd refuses what is not a tap with a virtio-net header.
    let null = std::fs::File::open("/dev/null").unwrap();
    assert!(Tap::from_fd(null.into()).is_err());
    let plain = ns.run(|| {
        // SAFETY: a NUL-terminated constant path.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is new and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"novnet0") {
            *d = libc::c_char::from_ne_bytes([*s]);
        }
        ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
        // SAFETY: TUNSETIFF reads one ifreq.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        assert_eq!(rc, 0);
        fd
    });
    let err = Tap::from_fd(plain).unwrap_err();
    assert!(err.to_string().contains("IFF_VNET_HDR"), "{err}");
}

#[test]
fn frames_the_guest_sends_come_out_of_the_tap() {
    let (_ns, net, sock) = setup("tx", None);
    let stats = net.stats();
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, net, all_offloads());
    let small = eth([0xff; 6], GUEST_MAC, 100, 1);
    g.send(&small);
    assert_eq!(sock.recv(), small);
    // Header, Ethernet header and payload in separate descriptors; the
    // header itself split too.
    let big = eth(PEER_MAC, GUEST_MAC, 9000, 2);
    g.send_split([0; VNET_HDR_LEN], &big, &[5, 12, 26, 4000]);
    assert_eq!(sock.recv(), big);
    // The smallest frame: a bare Ethernet header.
    let runt = eth(PEER_MAC, GUEST_MAC, 0, 3);
    g.send(&runt);
    assert_eq!(sock.recv(), runt);
    g.wait_tx();
    assert_eq!(stats.tx_frames.load(Relaxed), 3);
    assert_eq!(stats.tx_dropped.load(Relaxed), 0);
}

#[test]
fn frames_from_the_tap_arrive_in_rx_buffers_merged_or_not() {
    for mrg in [true, false] {
        let (_ns, net, sock) = setup(if mrg { "rx-mrg" } else { "rx-big" }, None);
        let m = mem(MEM_SIZE);
        let acked = if mrg {
            all_offloads()
        } else {
            all_offloads() & !(1 << VIRTIO_NET_F_MRG_RXBUF)
        };
        let mut g = Guest::via_mmio(&m, net, acked);
        if mrg {
            // Small buffers: a 1500-byte frame needs several.
            g.rx_buf_len = 512;
        }
        g.post_rx(32);
        let frame = eth(GUEST_MAC, PEER_MAC, 1486, 4);
        sock.send(&frame);
        let rx = g.recv();
        assert_eq!(rx.frame, frame);
        assert_eq!(rx.hdr[1], 0, "gso_type");
        if mrg {
            assert_eq!(rx.buffers, (VNET_HDR_LEN + frame.len()).div_ceil(512));
        }
        assert_eq!(rx.num_buffers() as usize, rx.buffers);
        // Several frames in a row keep their order.
        let frames: Vec<Vec<u8>> = (0..5)
            .map(|i| eth(GUEST_MAC, PEER_MAC, 60 + i * 100, tu::small(i)))
            .collect();
        for f in &frames {
            sock.send(f);
        }
        for f in &frames {
            assert_eq!(&g.recv().frame, f);
        }
        assert!(g.try_recv(QUIET).is_none());
    }
}

#[test]
fn checksum_offload_follows_what_the_guest_negotiated() {
    for guest_csum in [true, false] {
        let (ns, net, _sock) = setup(if guest_csum { "csum-on" } else { "csum-off" }, None);
        ns.exec(&["ip", "addr", "add", "10.99.0.1/24", "dev", "tap0"]);
        let mac = "02:48:55:53:4b:01";
        ns.exec(&[
            "ip",
            "neigh",
            "add",
            "10.99.0.2",
            "lladdr",
            mac,
            "dev",
            "tap0",
            "nud",
            "permanent",
        ]);
        let m = mem(MEM_SIZE);
        let acked = if guest_csum {
            all_offloads()
        } else {
            features(&[VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MAC])
        };
        let mut g = Guest::via_mmio(&m, net, acked);
        g.post_rx(8);
        ns.run(|| {
            let s = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
            s.send_to(b"hello guest", "10.99.0.2:9").unwrap();
        });
        let rx = g.recv();
        assert_eq!(&rx.frame[12..14], &[0x08, 0x00], "not IPv4");
        let udp = &rx.frame[34..];
        assert_eq!(&udp[8..], b"hello guest");
        let flags = u32::from(rx.hdr[0]);
        if guest_csum {
            // The checksum is left to the guest: partial, with its position.
            assert_eq!(
                flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
                VIRTIO_NET_HDR_F_NEEDS_CSUM
            );
            assert_eq!(u16::from_le_bytes([rx.hdr[6], rx.hdr[7]]), 34, "csum_start");
            assert_eq!(u16::from_le_bytes([rx.hdr[8], rx.hdr[9]]), 6, "csum_offset");
        } else {
            assert_eq!(flags, 0, "flags without GUEST_CSUM");
            assert_ne!(&udp[6..8], &[0, 0], "UDP checksum not filled in");
        }
    }
}

#[test]
fn offload_flags_follow_the_acked_features() {
    use worker::Features;
    let f = Features::from_acked(all_offloads());
    assert_eq!(
        f.tap_offload(),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    assert!(f.mrg_rxbuf && f.host_tso4 && f.host_tso6);
    assert_eq!(Features::from_acked(VIRTIO_F_VERSION_1).tap_offload(), 0);
    // TSO without checksum offload is not valid: neither is used.
    let f = Features::from_acked(features(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4]));
    assert_eq!(f.tap_offload(), 0);
    assert!(!f.host_tso4);
}

/// CPU time (user + system, in clock ticks) a thread of this process used.
fn thread_cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn without_rx_buffers_frames_wait_in_the_tap_and_the_worker_sleeps() {
    let (_ns, net, sock) = setup("nobuf", None);
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, net, all_offloads());
    let frames: Vec<Vec<u8>> = (0..3).map(|i| eth(GUEST_MAC, PEER_MAC, 200, i)).collect();
    for f in &frames {
        sock.send(f);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.rx_used(), 0);
    let tid = g.net().worker_tid().unwrap();
    let before = thread_cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_cpu_ticks(tid) - before;
    assert!(
        used <= 10,
        "worker used {used} ticks in 500 ms with nothing to do"
    );
    // A single buffer too small for the frames (non-mergeable would drop;
    // mergeable waits for more).
    g.rx_buf_len = 100;
    g.post_rx(1);
    assert!(g.try_recv(QUIET).is_none());
    g.rx_buf_len = 4096;
    g.post_rx(8);
    for f in &frames {
        assert_eq!(&g.recv().frame, f);
    }
    // The worker stopped watching the tap while it had no buffers; now it
    // watches again.
    let late = eth(GUEST_MAC, PEER_MAC, 300, 9);
    sock.send(&late);
    assert_eq!(g.recv().frame, late);
}

#[test]
fn a_deleted_tap_neither_spins_the_worker_nor_stalls_tx() {
    let (ns, net, _sock) = setup("gone", None);
    let stats = net.stats();
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, net, all_offloads());
    g.post_rx(8);
    // The pod's interface goes away under the running device.
    ns.exec(&["ip", "link", "del", "tap0"]);
    std::thread::sleep(Duration::from_millis(200));
    let tid = g.net().worker_tid().unwrap();
    let before = thread_cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_cpu_ticks(tid) - before;
    assert!(
        used <= 10,
        "worker used {used} ticks in 500 ms on a dead tap"
    );
    // The guest's frames are still taken (and dropped), so its queue moves.
    g.send(&eth(PEER_MAC, GUEST_MAC, 64, 1));
    g.wait_tx();
    assert_eq!(stats.tx_dropped.load(Relaxed), 1);
    assert!(g.try_recv(QUIET).is_none());
}

#[test]
fn malformed_tx_chains_are_dropped_and_never_stall_the_device() {
    let (_ns, net, sock) = setup("bad-tx", None);
    let stats = net.stats();
    let m = mem(MEM_SIZE);
    // No CSUM/TSO acked: offloaded frames from the guest are refused.
    let mut g = Guest::via_mmio(&m, net, features(&[VIRTIO_NET_F_MRG_RXBUF]));
    let probe = |g: &mut Guest, sock: &PacketSocket, seed: u8| {
        let f = eth(PEER_MAC, GUEST_MAC, 64, seed);
        g.send(&f);
        assert_eq!(sock.recv(), f, "device stopped sending");
    };
    let base = TX_BASE + 15 * TX_SLOT;
    let good = eth(PEER_MAC, GUEST_MAC, 64, 0);
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(&good);
    m.write_slice(&bytes, GuestAddress(base)).unwrap();
    let len: u32 = tu::small(bytes.len());
    let submit = |g: &mut Guest, descs: &[RawDescriptor]| {
        let head = g.take_tx_descs(tu::small(descs.len()));
        for (i, d) in descs.iter().enumerate() {
            let d = Descriptor::from(*d);
            let next = if d.flags() & NEXT != 0 {
                head + tu::small::<u16>(i) + 1
            } else {
                0
            };
            g.tx.desc_table()
                .store(
                    head + tu::small::<u16>(i),
                    raw(d.addr().0, d.len(), d.flags(), next),
                )
                .unwrap();
        }
        g.submit_tx(head);
        g.wait_tx();
    };
    // A write-only descriptor.
    submit(&mut g, &[raw(base, len, WRITE, 0)]);
    // Shorter than header + Ethernet header.
    submit(&mut g, &[raw(base, 20, 0, 0)]);
    // Longer than 65562 bytes.
    submit(
        &mut g,
        &[raw(base, 40_000, NEXT, 0), raw(base, 40_000, 0, 0)],
    );
    // Outside guest memory; straddling its end.
    submit(&mut g, &[raw(0xffff_ffff_0000, len, 0, 0)]);
    submit(&mut g, &[raw(MEM_SIZE as u64 - 40, len, 0, 0)]);
    let mut dropped = 5;
    // Checksum offload that was not negotiated.
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = u8::try_from(VIRTIO_NET_HDR_F_NEEDS_CSUM).unwrap();
    hdr[6] = 14;
    hdr[8] = 2;
    g.send_split(hdr, &good, &[]);
    g.wait_tx();
    dropped += 1;
    // TSO that was not negotiated.
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[1] = u8::try_from(VIRTIO_NET_HDR_GSO_TCPV4).unwrap();
    hdr[4] = 0x5a;
    g.send_split(hdr, &good, &[]);
    g.wait_tx();
    dropped += 1;
    assert!(sock.try_recv(QUIET).is_none(), "a malformed frame got out");
    assert_eq!(stats.tx_dropped.load(Relaxed), dropped);
    probe(&mut g, &sock, 1);

    // A descriptor loop is cut at the queue size (and then too long).
    let head = g.take_tx_descs(2);
    g.tx.desc_table()
        .store(head, raw(base, 40_000, NEXT, head + 1))
        .unwrap();
    g.tx.desc_table()
        .store(head + 1, raw(base, 40_000, NEXT, head))
        .unwrap();
    g.submit_tx(head);
    g.wait_tx();
    // A head index beyond the queue: consumed, nothing stalls.
    g.submit_tx(QSIZE + 3);
    g.tx_avail = g.tx_avail.wrapping_sub(1);
    probe(&mut g, &sock, 2);
    g.wait_tx();
    assert_eq!(stats.tx_frames.load(Relaxed), 2);
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_good_ones_used() {
    let (ns, net, sock) = setup("bad-rx", None);
    // Room for a jumbo frame from the packet socket.
    ns.exec(&["ip", "link", "set", "tap0", "mtu", "9000"]);
    let m = mem(MEM_SIZE);
    let mut g = Guest::via_mmio(&m, net, all_offloads());
    let table = |g: &Guest, i: u16, d: RawDescriptor| g.rx.desc_table().store(i, d).unwrap();
    // Read-only; outside memory; zero length.
    table(&g, 200, raw(RX_BASE, 4096, 0, 0));
    table(&g, 201, raw(0xffff_ffff_0000, 4096, WRITE, 0));
    table(&g, 202, raw(RX_BASE, 0, WRITE, 0));
    table(&g, 203, raw(RX_BASE + RX_SLOT, 4096, WRITE, 0));
    for head in [200, 201, 202, 203] {
        g.rx.push_avail(head);
    }
    g.kick(0);
    let frame = eth(GUEST_MAC, PEER_MAC, 500, 5);
    sock.send(&frame);
    let mut empty = 0;
    let rx = loop {
        let (head, len) = g.next_used(WAIT).expect("no rx buffer returned");
        if len == 0 {
            assert!(
                [200, 201, 202].contains(&head),
                "good buffer returned empty"
            );
            empty += 1;
            continue;
        }
        assert_eq!(head, 203);
        break g.read_buf(head, len);
    };
    assert_eq!(empty, 3);
    assert_eq!(&rx[VNET_HDR_LEN..], &frame[..]);
    g.rx_seen = g.rx_used();
    // A frame too big for a non-mergeable buffer would be dropped; here
    // mergeable buffers take any size up to 64 KiB.
    g.post_rx(40);
    let jumbo = eth(GUEST_MAC, PEER_MAC, 9000, 6);
    sock.send(&jumbo);
    assert_eq!(g.recv().frame, jumbo);
}

#[test]
fn reset_stops_the_worker_and_drop_removes_the_tap() {
    let (ns, net, sock) = setup("reset", None);
    let m = mem(MEM_SIZE);
    let mut g = Guest::direct(&m, net, all_offloads());
    let f = eth([0xff; 6], GUEST_MAC, 80, 7);
    g.send(&f);
    assert_eq!(sock.recv(), f);
    let tid = g.net().worker_tid().unwrap();
    let task = PathBuf::from(format!("/proc/self/task/{tid}"));
    assert_eq!(
        std::fs::read_to_string(task.join("comm")).unwrap().trim(),
        "husk-net"
    );
    g.net().reset();
    assert!(tu::thread_gone(tid), "worker thread still running");
    g.net().reset(); // idempotent
                     // The tap outlives a reset (the next activation uses it)...
    assert!(ns.has_link("tap0"));
    // ...and goes away with the device.
    drop(g);
    assert!(ns.link_gone("tap0"));
}

#[test]
fn fuzz_entry_point_runs_its_seeds() {
    // The harness moves the thread it runs on into a network namespace of its own.
    let out = std::env::var_os("HUSK_NET_FUZZ_SEED_DIR").map(PathBuf::from);
    std::thread::spawn(move || {
        let seeds = super::fuzz::seeds();
        let outcomes: Vec<_> = seeds.iter().map(|s| super::fuzz::fuzz_queues(s)).collect();
        let o = &outcomes;
        assert_eq!((o[0].tx_frames, o[0].tx_used), (3, 3), "{:?}", o[0]);
        assert_eq!((o[1].tx_frames, o[1].tx_used), (3, 3), "{:?}", o[1]);
        assert_eq!((o[2].tx_frames, o[2].tx_dropped), (2, 0), "{:?}", o[2]);
        assert_eq!((o[3].rx_frames, o[3].rx_used), (1, 3), "{:?}", o[3]);
        assert_eq!((o[4].rx_frames, o[4].rx_used), (1, 1), "{:?}", o[4]);
        assert_eq!(
            (o[5].tx_dropped, o[5].rx_dropped, o[5].rx_used),
            (2, 1, 0),
            "{:?}",
            o[5]
        );
        assert_eq!((o[6].tx_dropped, o[6].tx_used), (2, 2), "{:?}", o[6]);
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).unwrap();
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
            }
        }
        tu::run_corpus("virtio_net", &seeds, 0, 0, |input| {
            super::fuzz::fuzz_queues(input);
        });
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..300 {
            let mut input = seeds[usize::try_from(x % seeds.len() as u64).unwrap()].clone();
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = usize::try_from(x % input.len() as u64).unwrap();
                input[at] = tu::low_byte(x >> 32);
            }
            super::fuzz::fuzz_queues(&input);
        }
    })
    .join()
    .unwrap();
}
