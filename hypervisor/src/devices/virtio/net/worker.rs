//! The virtio-net worker: one thread, one epoll loop ([`EventLoop`]) over
//! the rx and tx queue eventfds and the tap.
//!
//! tx: each chain is one frame (virtio-net header + Ethernet frame); it is
//! gathered into a buffer and written to the tap as one packet.
//! rx: a frame is read from the tap only when the guest has buffers; if they
//! turn out too few, the frame waits (one at most) and the tap is not polled
//! until the guest adds buffers.
//!
//! [`EventLoop`]: crate::devices::virtio::worker::EventLoop

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};
use virtio_bindings::bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::virtio::worker::EventHandler;
use crate::devices::virtio::{ActiveQueue, Interrupt};

const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_TAP: u64 = 3;

const ETH_HLEN: usize = 14;
/// Longest tx chain accepted: header + the largest GSO frame (64 KiB IP
/// packet + Ethernet header), as Firecracker bounds it.
pub const MAX_TX_FRAME: usize = 65562;
/// Read buffer for the tap: larger than anything the tap hands out with the
/// 64 KiB GSO limit, so a read that fills it means a frame was cut.
const RX_BUF_LEN: usize = 128 * 1024;
/// Frames moved per queue per loop iteration, so the kill eventfd and the
/// other direction get a turn.
const BATCH: usize = 256;

// Offsets in the virtio-net header.
const HDR_FLAGS: usize = 0;
const HDR_GSO_TYPE: usize = 1;
const HDR_NUM_BUFFERS: usize = 10;

/// Negotiated features the data path depends on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    pub mrg_rxbuf: bool,
    pub guest_csum: bool,
    pub guest_tso4: bool,
    pub guest_tso6: bool,
    pub host_csum: bool,
    pub host_tso4: bool,
    pub host_tso6: bool,
}

impl Features {
    pub fn from_acked(acked: u64) -> Self {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let guest_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let host_csum = has(VIRTIO_NET_F_CSUM);
        Self {
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum,
            // TSO without checksum offload is not a valid combination (virtio
            // 1.2 §5.1.3.1); a driver acking it gets neither.
            guest_tso4: guest_csum && has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: guest_csum && has(VIRTIO_NET_F_GUEST_TSO6),
            host_csum,
            host_tso4: host_csum && has(VIRTIO_NET_F_HOST_TSO4),
            host_tso6: host_csum && has(VIRTIO_NET_F_HOST_TSO6),
        }
    }

    /// What the tap may hand us (TUNSETOFFLOAD): only what the guest accepts.
    pub fn tap_offload(&self) -> libc::c_uint {
        let mut flags = 0;
        if self.guest_csum {
            flags |= libc::TUN_F_CSUM;
        }
        if self.guest_tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.guest_tso6 {
            flags |= libc::TUN_F_TSO6;
        }
        flags
    }

    /// Whether a frame with this header may go to (`to_guest`) or come from
    /// the guest, given what was negotiated.
    fn allows(&self, hdr: &[u8], to_guest: bool) -> bool {
        let (csum, tso4, tso6) = if to_guest {
            (self.guest_csum, self.guest_tso4, self.guest_tso6)
        } else {
            (self.host_csum, self.host_tso4, self.host_tso6)
        };
        let needs_csum = u32::from(hdr[HDR_FLAGS]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        let gso_ok = match u32::from(hdr[HDR_GSO_TYPE]) {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => tso4,
            VIRTIO_NET_HDR_GSO_TCPV6 => tso6,
            // UDP fragmentation offload, ECN and anything else: never offered.
            _ => false,
        };
        (!needs_csum || csum) && gso_ok
    }
}

/// Logs at most one warning per second per kind, so a misbehaving guest
/// cannot flood the shim's log.
#[derive(Default)]
pub struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn warn(&mut self, what: &str, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        warn!(suppressed = self.suppressed, "{what}: {detail}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Counters (the tests read them; they are also what a metrics endpoint would show).
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: std::sync::atomic::AtomicU64,
    pub tx_dropped: std::sync::atomic::AtomicU64,
    pub rx_frames: std::sync::atomic::AtomicU64,
    pub rx_dropped: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

enum Delivery {
    Delivered,
    /// Not enough buffers yet; the frame stays pending.
    NoRoom,
    Dropped,
}

pub struct Worker {
    mem: GuestMemoryMmap,
    rxq: ActiveQueue,
    txq: ActiveQueue,
    interrupt: Arc<Interrupt>,
    epoll: Epoll,
    tap: Arc<Tap>,
    features: Features,
    stats: Arc<NetStats>,
    tx_buf: Box<[u8]>,
    rx_buf: Box<[u8]>,
    /// Length of the frame in rx_buf still owed to the guest (0: none).
    rx_pending: usize,
    /// Whether epoll watches the tap for readability.
    tap_armed: bool,
    /// Reading the tap failed for good; it is never watched again.
    tap_gone: bool,
    /// The tap may still hold frames (it was readable and not drained).
    tap_ready: bool,
    /// The tx queue may hold chains not yet processed.
    tx_pending: bool,
    /// The guest added rx buffers since we last looked.
    rx_kicked: bool,
    tx_log: LogLimiter,
    rx_log: LogLimiter,
}

impl Worker {
    pub fn new(
        mem: GuestMemoryMmap,
        [rxq, txq]: [ActiveQueue; 2],
        interrupt: Arc<Interrupt>,
        tap: Arc<Tap>,
        features: Features,
        stats: Arc<NetStats>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (rxq.notify.as_raw_fd(), TOKEN_RXQ),
            (txq.notify.as_raw_fd(), TOKEN_TXQ),
            (tap.as_raw_fd(), TOKEN_TAP),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self {
            mem,
            rxq,
            txq,
            interrupt,
            epoll,
            tap,
            features,
            stats,
            tx_buf: vec![0u8; MAX_TX_FRAME].into_boxed_slice(),
            rx_buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            rx_pending: 0,
            tap_armed: true,
            tap_gone: false,
            tap_ready: true,
            // The driver may have queued buffers before the worker existed.
            tx_pending: true,
            rx_kicked: true,
            tx_log: LogLimiter::default(),
            rx_log: LogLimiter::default(),
        })
    }

    fn signal(&self, queue: &str) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            warn!("virtio-net: cannot interrupt the guest for the {queue} queue: {e}");
        }
    }

    /// Sends up to a batch of the guest's frames to the tap.
    pub fn process_tx(&mut self) {
        self.tx_pending = false;
        let mut used = 0;
        while used < BATCH {
            let Some(chain) = self.txq.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            match gather(&self.mem, chain, &mut self.tx_buf) {
                Ok(_) if !self.features.allows(&self.tx_buf[..VNET_HDR_LEN], false) => {
                    bump(&self.stats.tx_dropped);
                    self.tx_log.warn(
                        "virtio-net: dropping a tx frame using offloads that were not negotiated",
                        &format_args!("header {:?}", &self.tx_buf[..VNET_HDR_LEN]),
                    );
                }
                Ok(len) => match self.tap.write(&self.tx_buf[..len]) {
                    Ok(_) => bump(&self.stats.tx_frames),
                    Err(e) => {
                        // The tap refuses frames it cannot parse (bad GSO
                        // fields, runts); the guest learns nothing either way.
                        bump(&self.stats.tx_dropped);
                        self.tx_log.warn("virtio-net: tap refused a tx frame", &e);
                    }
                },
                Err(e) => {
                    bump(&self.stats.tx_dropped);
                    self.tx_log.warn(
                        "virtio-net: dropping a malformed tx chain",
                        &format_args!("head {head}: {e}"),
                    );
                }
            }
            if let Err(e) = self.txq.queue.add_used(&self.mem, head, 0) {
                self.tx_log.warn(
                    "virtio-net: cannot return a tx chain",
                    &format_args!("head {head}: {e}"),
                );
            }
            used += 1;
        }
        if used == BATCH {
            self.tx_pending = true;
        }
        if used > 0 {
            self.signal("tx");
        }
    }

    /// Starts or stops watching the tap. Stopping removes it from epoll
    /// altogether: a tap whose interface was deleted reports EPOLLERR, which
    /// epoll reports whatever events were asked for.
    fn set_tap_armed(&mut self, armed: bool) {
        if self.tap_armed == armed || (armed && self.tap_gone) {
            return;
        }
        let op = if armed {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        match self.epoll.ctl(
            op,
            self.tap.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TAP),
        ) {
            Ok(()) => self.tap_armed = armed,
            Err(e) => error!("virtio-net: cannot (un)watch the tap: {e}"),
        }
    }

    fn has_rx_buffers(&self) -> bool {
        let q = &self.rxq.queue;
        match q.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }

    /// Moves frames from the tap into rx buffers while both last.
    pub fn process_rx(&mut self) {
        self.rx_kicked = false;
        let mut used = false;
        for _ in 0..BATCH {
            if self.rx_pending == 0 {
                if self.tap_gone {
                    break;
                }
                if !self.has_rx_buffers() {
                    // Nothing to put frames in: leave them in the tap (its
                    // queue applies back pressure) until the guest adds buffers.
                    self.set_tap_armed(false);
                    break;
                }
                match self.tap.read(&mut self.rx_buf) {
                    Ok(n) if !(VNET_HDR_LEN + ETH_HLEN..RX_BUF_LEN).contains(&n) => {
                        bump(&self.stats.rx_dropped);
                        self.rx_log.warn(
                            "virtio-net: dropping a frame from the tap",
                            &format_args!("{n} bytes"),
                        );
                        continue;
                    }
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tap_ready = false;
                        self.set_tap_armed(true);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EBADFD: the interface was deleted (by the shim, or
                        // with the pod's network namespace). Nothing will come
                        // any more; polling would spin on EPOLLERR.
                        error!(
                            tap = self.tap.name(),
                            "virtio-net: the tap failed, no more frames for the guest: {e}"
                        );
                        self.tap_gone = true;
                        self.tap_ready = false;
                        self.set_tap_armed(false);
                        break;
                    }
                }
            }
            match self.deliver() {
                Delivery::Delivered => {
                    used = true;
                    self.rx_pending = 0;
                    bump(&self.stats.rx_frames);
                }
                Delivery::Dropped => {
                    used = true;
                    self.rx_pending = 0;
                    bump(&self.stats.rx_dropped);
                }
                Delivery::NoRoom => {
                    self.set_tap_armed(false);
                    break;
                }
            }
        }
        if used {
            self.signal("rx");
        }
        // A full batch: come back without waiting (the tap is still armed
        // and readable, so the next epoll_wait returns at once).
    }

    /// Puts the pending frame into rx buffers.
    fn deliver(&mut self) -> Delivery {
        let len = self.rx_pending;
        let features = self.features;
        let frame = &mut self.rx_buf[..len];
        if !features.allows(&frame[..VNET_HDR_LEN], true) {
            // The tap only hands out what TUNSETOFFLOAD allowed; this is a
            // frame from before the guest (re)negotiated.
            self.rx_log.warn(
                "virtio-net: dropping a tap frame with offloads the guest did not negotiate",
                &format_args!("header {:?}", &frame[..VNET_HDR_LEN]),
            );
            return Delivery::Dropped;
        }
        if !features.guest_csum {
            // No flags without GUEST_CSUM (virtio 1.2 §5.1.6.4.1), not even DATA_VALID.
            frame[HDR_FLAGS] = 0;
        }
        let mem = &self.mem;
        let queue = &mut self.rxq.queue;
        let start = queue.next_avail();
        let size = queue.size();
        let available = match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0.wrapping_sub(start),
            Err(_) => 0,
        };
        // Chains that cannot take any data: returned empty, before the frame.
        let mut junk: Vec<u16> = Vec::new();
        let mut picked: Vec<(u16, virtio_queue::Writer<'_, ()>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            if !features.mrg_rxbuf && !picked.is_empty() {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match chain.writer::<()>(mem) {
                Ok(w) if w.available_bytes() > 0 => {
                    room += w.available_bytes();
                    picked.push((head, w));
                }
                Ok(_) | Err(_) => junk.push(head),
            }
        }
        if room < len {
            let popped = queue.next_avail().wrapping_sub(start);
            if !features.mrg_rxbuf && !picked.is_empty() {
                // One buffer per frame and this one is too small: drop the
                // frame, keep the buffer for the next (smaller) one.
                queue.set_next_avail(start.wrapping_add(popped - 1));
                publish(queue, mem, junk.iter().map(|&h| (h, 0)));
                self.rx_log.warn(
                    "virtio-net: rx buffer too small, dropping a frame",
                    &format_args!("{len} bytes"),
                );
                return Delivery::Dropped;
            }
            if available >= size && popped >= available {
                // Every buffer the ring can hold is there and it is not
                // enough: waiting would wait forever.
                queue.set_next_avail(start);
                self.rx_log.warn(
                    "virtio-net: the guest's rx buffers cannot hold a frame",
                    &format_args!("{len} bytes"),
                );
                return Delivery::Dropped;
            }
            queue.set_next_avail(start);
            return Delivery::NoRoom;
        }
        // One buffer per descriptor chain: at most the queue size (a u16).
        let count = u16::try_from(picked.len()).unwrap_or(u16::MAX);
        frame[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
        let mut rest: &[u8] = frame;
        let mut used = Vec::with_capacity(junk.len() + picked.len());
        used.extend(junk.iter().map(|&h| (h, 0)));
        for (head, mut w) in picked {
            let n = rest.len().min(w.available_bytes());
            let written = match io::Write::write_all(&mut w, &rest[..n]) {
                Ok(()) => n,
                Err(_) => w.bytes_written(),
            };
            rest = &rest[n..];
            // At most the chain's bytes, which a u32 counts.
            used.push((head, u32::try_from(written).unwrap_or(u32::MAX)));
        }
        publish(queue, mem, used.into_iter());
        Delivery::Delivered
    }

    /// Hands the worker a frame as if the tap had produced it (fuzzing: the
    /// rx buffer handling without a second party on the tap).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn inject_rx(&mut self, frame: &[u8]) {
        let n = frame.len().min(RX_BUF_LEN - 1);
        self.rx_buf[..n].copy_from_slice(&frame[..n]);
        self.rx_pending = n;
    }
}

impl EventHandler for Worker {
    const NAME: &'static str = "virtio-net";
    const MAX_EVENTS: usize = 8;
    const FILTER: crate::seccomp::ThreadKind = crate::seccomp::ThreadKind::Net;

    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn has_pending_work(&self) -> bool {
        self.tx_pending || self.rx_kicked || (self.tap_ready && self.tap_armed)
    }

    fn handle_event(&mut self, token: u64, _events: EventSet, _now: Instant) {
        match token {
            TOKEN_RXQ => {
                let _ = self.rxq.notify.read();
                self.rx_kicked = true;
            }
            TOKEN_TXQ => {
                let _ = self.txq.notify.read();
                self.tx_pending = true;
            }
            TOKEN_TAP => self.tap_ready = true,
            token => warn!(token, "virtio-net: event for an unknown token"),
        }
    }

    fn process(&mut self, _now: Instant) {
        if self.tx_pending {
            self.process_tx();
        }
        if self.rx_kicked || self.tap_ready || self.rx_pending > 0 {
            self.process_rx();
        }
    }
}

/// Copies a tx chain into `buf`; returns the frame length (header included).
fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err("write-only descriptor in a tx chain".into());
        }
        let n = desc.len() as usize;
        let end = len
            .checked_add(n)
            .filter(|&e| e <= buf.len())
            .ok_or_else(|| format!("frame longer than {} bytes", buf.len()))?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|e| format!("descriptor at {:#x}: {e}", desc.addr().raw_value()))?;
        len = end;
    }
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(format!(
            "{len} bytes: shorter than a header and an Ethernet header"
        ));
    }
    Ok(len)
}

/// Adds `used` to the used ring and publishes them with one index update:
/// the chains of one merged frame must become visible together, or a driver
/// polling the ring could see the first buffer before the rest.
fn publish(queue: &mut Queue, mem: &GuestMemoryMmap, used: impl Iterator<Item = (u16, u32)>) {
    let size = queue.size();
    let ring = vm_memory::GuestAddress(queue.used_ring());
    let mut next = queue.next_used();
    for (head, len) in used {
        if head >= size {
            // Not a chain the driver could have made: consumed, never returned.
            continue;
        }
        let at = ring.unchecked_add(4 + 8 * u64::from(next % size));
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        if mem.write_slice(&elem, at).is_err() {
            // The transport checked the ring lies in guest memory at activation.
            error!("virtio-net: used ring outside guest memory");
            return;
        }
        next = next.wrapping_add(1);
    }
    if let Err(e) = mem.store(next.to_le(), ring.unchecked_add(2), Ordering::Release) {
        error!("virtio-net: cannot update the used index: {e}");
        return;
    }
    queue.set_next_used(next);
}
