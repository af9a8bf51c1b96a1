//! The connection multiplexer: routes guest packets to connections, accepts
//! host clients on the device's Unix socket, connects guest requests to
//! `<uds_path>_<port>`, and decides which packet the guest receives next.
//!
//! Everything it holds is bounded: connections (with pending handshakes and
//! draining streams) by [`MAX_CONNECTIONS`], RSTs for unknown connections by
//! [`MAX_PENDING_RST`] (the worker stops reading the tx queue when full).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_vsock::packet::VsockPacket;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, Connection};
use super::handshake::Handshake;
use super::packet::*;
use super::uds;

/// Connections, pending host handshakes and draining streams, together. With
/// each connection's host-side buffer ([`super::connection::TX_BUF_SIZE`])
/// that bounds what a guest can make the VMM hold at 64 MiB, charged to the
/// pod's cgroup; a pod's stdio streams and agent calls need a few dozen.
pub const MAX_CONNECTIONS: usize = 256;
/// RSTs for packets that match no connection, waiting for rx buffers.
pub const MAX_PENDING_RST: usize = 1024;
/// A host client must send its `CONNECT` line this soon after it is accepted.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The guest must answer a host-initiated REQUEST this soon. Generous: a
/// guest kernel can be slow to schedule (nested virtualization).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After accept() fails hard (e.g. EMFILE) the listener is left alone this long
/// instead of being retried in a loop.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
const MAX_ACCEPTS_PER_WAKE: usize = 32;
/// Host ports for host-initiated connections, as Firecracker allocates them.
const HOST_PORT_FIRST: u32 = 1 << 30;
/// u32::MAX is VMADDR_PORT_ANY.
const HOST_PORT_LAST: u32 = u32::MAX - 1;

/// Epoll token of the listener; tokens below [`FIRST_STREAM_TOKEN`] belong
/// to the worker (and the event loop's kill eventfd has `TOKEN_KILL`, u64::MAX).
pub const TOKEN_LISTENER: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

/// Host-bound bytes still owed to a host client after the guest reset the connection.
struct Drain {
    stream: UnixStream,
    buf: VecDeque<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: Arc<UnixListener>,
    listener_paused_until: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    conn_tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    drains: HashMap<u64, Drain>,
    /// Connections owing the guest a packet, served round-robin.
    rx_ready: VecDeque<ConnKey>,
    /// RSTs for packets that matched no connection.
    rst_queue: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    next_deadline: Option<Instant>,
}

/// `<uds_path>_<port>`: where a host service for guest-initiated connections to `port` listens.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: Arc<UnixListener>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Self {
            guest_cid,
            uds_path,
            epoll,
            listener,
            listener_paused_until: None,
            conns: HashMap::new(),
            conn_tokens: HashMap::new(),
            handshakes: HashMap::new(),
            drains: HashMap::new(),
            rx_ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_host_port: HOST_PORT_FIRST,
            next_deadline: None,
        })
    }

    /// The epoll set the worker waits on; the muxer adds its streams to it.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn fds_in_use(&self) -> usize {
        self.conns.len() + self.handshakes.len() + self.drains.len()
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn note_deadline(&mut self, d: Instant) {
        self.next_deadline = Some(self.next_deadline.map_or(d, |n| n.min(d)));
    }

    /// Whether the tx queue must wait: an RST for another bad packet might not fit.
    pub fn tx_blocked(&self) -> bool {
        self.rst_queue.len() >= MAX_PENDING_RST
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// Milliseconds until the next deadline (rounded up), or -1 for none.
    pub fn timeout_ms(&self, now: Instant) -> i32 {
        match self.next_deadline {
            None => -1,
            Some(d) => {
                let us = d.saturating_duration_since(now).as_micros();
                i32::try_from(us.div_ceil(1000)).unwrap_or(i32::MAX)
            }
        }
    }

    /// Leaves host clients waiting in the listen backlog until
    /// [`release_listener`](Self::release_listener) or `until`: after a
    /// transport reset, a connection made before the guest handled the
    /// reset would be reset with the rest.
    pub fn hold_listener(&mut self, until: Instant) {
        if self.listener_paused_until.is_none() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.listener_paused_until = Some(until);
        self.note_deadline(until);
    }

    /// Accepts host clients again (at the next [`process_timeouts`](Self::process_timeouts)).
    pub fn release_listener(&mut self, now: Instant) {
        if self.listener_paused_until.is_some() {
            self.listener_paused_until = Some(now);
            self.note_deadline(now);
        }
    }

    /// A stream or the listener is ready.
    pub fn handle_event(&mut self, token: u64, events: EventSet, now: Instant) {
        if token == TOKEN_LISTENER {
            self.accept(now);
        } else if self.handshakes.contains_key(&token) {
            self.advance_handshake(token, now);
        } else if let Some(drain) = self.drains.get_mut(&token) {
            match uds::flush(&drain.stream, &mut drain.buf) {
                Ok(_) if !drain.buf.is_empty() => {}
                res => {
                    debug!("vsock: finished draining a reset connection: {res:?}");
                    self.drains.remove(&token);
                }
            }
        } else if let Some(&key) = self.conn_tokens.get(&token) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.host_event(events);
            }
            self.refresh(key);
        }
        // Otherwise the stream was closed earlier in this batch of events.
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..MAX_ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if uds::would_block(&e) => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    warn!(
                        path = %self.uds_path.display(),
                        "vsock: accept failed, pausing the listener: {e}"
                    );
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.listener_paused_until = Some(now + ACCEPT_BACKOFF);
                    self.note_deadline(now + ACCEPT_BACKOFF);
                    return;
                }
            };
            if self.fds_in_use() >= MAX_CONNECTIONS {
                // Closing at once tells the client to retry later.
                warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("vsock: cannot make a host client non-blocking: {e}");
                continue;
            }
            let token = self.token();
            let ev = EpollEvent::new(EventSet::IN, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                warn!("vsock: cannot watch a host client: {e}");
                continue;
            }
            let deadline = now + HANDSHAKE_TIMEOUT;
            self.handshakes
                .insert(token, Handshake::new(stream, deadline));
            self.note_deadline(deadline);
        }
    }

    fn advance_handshake(&mut self, token: u64, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = match hs.advance() {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(e) => {
                debug!("vsock: dropping host client: {e}");
                self.handshakes.remove(&token);
                return;
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let local_port = self.alloc_host_port(port);
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        debug!(
            local_port,
            port, "vsock: host client connecting to guest port"
        );
        let deadline = now + REQUEST_TIMEOUT;
        let conn = Connection::new_local(key, hs.stream, token, EventSet::IN, deadline);
        self.conns.insert(key, conn);
        self.conn_tokens.insert(token, key);
        self.refresh(key);
    }

    fn alloc_host_port(&mut self, peer_port: u32) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
        loop {
            let port = self.next_host_port;
            self.next_host_port = if port >= HOST_PORT_LAST {
                HOST_PORT_FIRST
            } else {
                port + 1
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    /// A packet the guest put on the tx queue. `data` is its payload, if any.
    pub fn guest_packet(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, ()>>) {
        if hdr.src_cid != self.guest_cid {
            warn!(
                src_cid = hdr.src_cid,
                guest_cid = self.guest_cid,
                op = op_name(hdr.op),
                "vsock: dropping a packet with a foreign source CID"
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_RST {
            if let Some(conn) = self.conns.get_mut(&key) {
                debug!(
                    local = key.local_port,
                    peer = key.peer_port,
                    "vsock: guest reset connection"
                );
                if let Some((stream, buf)) = conn.guest_rst() {
                    self.start_drain(stream, buf);
                }
                self.refresh(key);
            }
            return;
        }
        if hdr.type_ != TYPE_STREAM || hdr.dst_cid != HOST_CID {
            warn!(
                type_ = hdr.type_,
                dst_cid = hdr.dst_cid,
                op = op_name(hdr.op),
                "vsock: refusing a packet that is not stream traffic for the host"
            );
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.reset();
                self.refresh(key);
            } else {
                self.reply_rst(hdr);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == OP_REQUEST {
                self.guest_connect(key, hdr);
            } else {
                // Also normal: e.g. a credit update racing our RST.
                debug!(
                    local = key.local_port,
                    peer = key.peer_port,
                    op = op_name(hdr.op),
                    "vsock: packet for no connection"
                );
                self.reply_rst(hdr);
            }
            return;
        };
        if let Err(e) = conn.guest_packet(hdr, data) {
            warn!(
                local = key.local_port,
                peer = key.peer_port,
                "vsock: resetting connection: {e}"
            );
            conn.reset();
        }
        self.refresh(key);
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            // Unreachable while the worker honours tx_blocked(); never grow unbounded.
            warn!("vsock: RST queue full; dropping an RST");
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: hdr.type_,
            op: OP_RST,
            ..Header::default()
        });
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.fds_in_use() >= MAX_CONNECTIONS {
            warn!(
                port = key.local_port,
                "vsock: {MAX_CONNECTIONS} connections open; refusing guest connection"
            );
            self.reply_rst(hdr);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        match uds::connect_nonblocking(&path) {
            Ok(stream) => {
                debug!(path = %path.display(), peer = key.peer_port, "vsock: guest connected to host service");
                let token = self.token();
                self.conns
                    .insert(key, Connection::new_peer(key, stream, token, hdr));
                self.conn_tokens.insert(token, key);
                self.refresh(key);
            }
            Err(e) => {
                debug!(path = %path.display(), "vsock: guest connection refused: {e}");
                self.reply_rst(hdr);
            }
        }
    }

    fn start_drain(&mut self, stream: UnixStream, buf: VecDeque<u8>) {
        let fd = stream.as_raw_fd();
        // The stream may still be registered under its connection's token.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let token = self.token();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::OUT, token),
        ) {
            warn!(
                "vsock: cannot watch a draining stream, dropping {} bytes: {e}",
                buf.len()
            );
            return;
        }
        let deadline = Instant::now() + super::connection::LINGER_TIMEOUT;
        self.drains.insert(
            token,
            Drain {
                stream,
                buf,
                deadline,
            },
        );
        self.note_deadline(deadline);
    }

    /// Settles a connection after a change: removes it once done, fixes its
    /// epoll interest, and lines it up for the rx queue if it owes packets.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.settle();
        if conn.is_done() {
            self.remove(key);
            return;
        }
        if let Err(e) = conn.sync_interest(&self.epoll) {
            warn!(
                port = key.local_port,
                "vsock: cannot watch host stream: {e}"
            );
            conn.reset();
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
        if let Some(d) = conn.deadline() {
            self.note_deadline(d);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.conn_tokens.remove(&conn.token());
            if conn.queued {
                self.rx_ready.retain(|k| *k != key);
            }
        }
    }

    /// Writes the next packet owed to the guest into an rx buffer; returns
    /// the bytes used, or None (and the buffer stays unused) if nothing is owed.
    pub fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        if let Some(hdr) = self.rst_queue.pop_front() {
            return match pkt.set_header_from_raw(&hdr.to_bytes()) {
                Ok(()) => Some(HDR_LEN),
                Err(e) => {
                    warn!("vsock: writing an RST header: {e}");
                    Some(0)
                }
            };
        }
        // Each connection gets one try: one that cannot fill this buffer goes
        // back in line (refresh), so looping until empty could go forever.
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let used = conn.fill_rx(pkt, self.guest_cid);
            self.refresh(key);
            if used.is_some() {
                return used;
            }
        }
        None
    }

    /// Acts on every deadline that passed.
    pub fn process_timeouts(&mut self, now: Instant) {
        if self.next_deadline.is_none_or(|d| now < d) {
            return;
        }
        self.next_deadline = None;
        self.handshakes.retain(|_, hs| {
            let keep = hs.deadline > now;
            if !keep {
                debug!("vsock: host client sent no CONNECT line in time");
            }
            keep
        });
        self.drains.retain(|_, d| {
            let keep = d.deadline > now;
            if !keep {
                warn!(
                    bytes = d.buf.len(),
                    "vsock: host did not read a reset connection's data in time"
                );
            }
            keep
        });
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline().is_some_and(|d| d <= now))
            .map(|c| c.key())
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire();
            }
            self.refresh(key);
        }
        if self.listener_paused_until.is_some_and(|d| d <= now) {
            self.listener_paused_until = None;
            let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
            {
                warn!("vsock: cannot watch the listener again: {e}");
                self.listener_paused_until = Some(now + ACCEPT_BACKOFF);
            }
        }
        let deadlines = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.drains.values().map(|d| d.deadline))
            .chain(self.conns.values().filter_map(|c| c.deadline()))
            .chain(self.listener_paused_until)
            .min();
        if let Some(d) = deadlines {
            self.note_deadline(d);
        }
    }

    /// Connections currently tracked (for tests and the fuzz harness).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}
