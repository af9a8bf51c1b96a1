//! One vsock stream connection between a guest port and a host Unix stream:
//! its state machine, credit accounting (virtio 1.2 §5.10.6.3) and half-close.
//!
//! Host-bound bytes go straight to the Unix stream; what it cannot take now is
//! buffered, bounded by the `buf_alloc` we advertise. Guest-bound bytes are
//! read from the stream directly into the guest's rx buffer, and only as many
//! as the guest has credit for.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use super::uds;

mod rx;

/// The receive buffer we advertise per connection (`buf_alloc`): the most
/// host-bound bytes we ever hold for a host that is not reading.
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once its view of our free space
/// drops below this (it may be about to stall).
const CREDIT_UPDATE_THRESHOLD: u32 = MAX_PKT_DATA;
/// How long buffered host-bound data may wait for a host that is not reading
/// after the guest closed the connection.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket accepted; RESPONSE not yet delivered.
    PeerInit,
    Established,
    /// The stream is closed; an RST may still be queued for the guest.
    Reset,
}

/// A guest packet that breaks the protocol; the connection gets reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The op makes no sense in the connection's state.
    #[error("unexpected {op} (op {code}) in state {state:?}")]
    UnexpectedOp {
        op: &'static str,
        code: u16,
        state: State,
    },
    /// The guest sent more than the credit we gave it.
    #[error("guest sent {len} bytes with {buffered} buffered, over the {TX_BUF_SIZE}-byte credit")]
    CreditExceeded { len: usize, buffered: usize },
    /// The guest sent data after announcing it would not.
    #[error("guest sent {len} bytes after SHUTDOWN(SEND)")]
    DataAfterShutdown { len: usize },
}

/// Packets owed to the guest (coalesced: one of each at most).
#[derive(Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    /// The host stream may have bytes for the guest.
    rw: bool,
    shutdown: bool,
    credit_update: bool,
    rst: bool,
}

pub struct Connection {
    key: ConnKey,
    state: State,
    stream: Option<UnixStream>,
    token: u64,
    registered: EventSet,
    pending: Pending,
    /// In the muxer's rx list.
    pub queued: bool,
    deadline: Option<Instant>,

    /// Host-bound bytes the stream did not take yet.
    tx_buf: VecDeque<u8>,
    /// Host-bound bytes received from the guest / written to the host.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,

    /// Guest-bound bytes sent, and the guest's buffer as it last told us.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,

    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags we sent.
    shut_sent: u32,
    /// The host will send no more (EOF read).
    host_eof: bool,
    /// The host will receive no more (EPIPE, or it hung up).
    host_gone: bool,
    host_write_shut: bool,
    host_read_shut: bool,
}

impl Connection {
    fn new(key: ConnKey, state: State, stream: UnixStream, token: u64) -> Self {
        Self {
            key,
            state,
            stream: Some(stream),
            token,
            registered: EventSet::empty(),
            pending: Pending::default(),
            queued: false,
            deadline: None,
            tx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            guest_shut: 0,
            shut_sent: 0,
            host_eof: false,
            host_gone: false,
            host_write_shut: false,
            host_read_shut: false,
        }
    }

    /// A host client asked for guest port `key.peer_port`; a REQUEST goes to the
    /// guest, which must answer by `deadline`. `registered` is the stream's
    /// current epoll interest under `token`.
    pub fn new_local(
        key: ConnKey,
        stream: UnixStream,
        token: u64,
        registered: EventSet,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(key, State::LocalInit, stream, token);
        c.registered = registered;
        c.pending.request = true;
        c.deadline = Some(deadline);
        c
    }

    /// The guest's REQUEST `hdr` reached a host listener through `stream`.
    pub fn new_peer(key: ConnKey, stream: UnixStream, token: u64, hdr: &Header) -> Self {
        let mut c = Self::new(key, State::PeerInit, stream, token);
        c.update_peer_credit(hdr);
        c.pending.response = true;
        c
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Nothing left to do: the muxer forgets the connection.
    pub fn is_done(&self) -> bool {
        self.state == State::Reset && !self.pending.rst
    }

    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.request || p.response || p.rw || p.shutdown || p.credit_update || p.rst
    }

    /// How many more bytes the guest can take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub((self.tx_cnt - self.peer_fwd_cnt).0)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Closes the stream and owes the guest an RST.
    pub fn reset(&mut self) {
        self.drop_stream();
        self.tx_buf = VecDeque::new();
        self.state = State::Reset;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        self.deadline = None;
    }

    fn drop_stream(&mut self) {
        // Closing the only fd of the socket also removes it from the epoll set.
        self.stream = None;
        self.registered = EventSet::empty();
    }

    /// The guest reset the connection. Host-bound bytes still buffered are
    /// handed back with the stream so they can be delivered before it closes.
    pub fn guest_rst(&mut self) -> Option<(UnixStream, VecDeque<u8>)> {
        self.state = State::Reset;
        self.pending = Pending::default();
        self.deadline = None;
        self.registered = EventSet::empty();
        let stream = self.stream.take()?;
        if self.tx_buf.is_empty() || self.host_gone {
            return None;
        }
        Some((stream, std::mem::take(&mut self.tx_buf)))
    }

    /// The connection's deadline passed.
    pub fn expire(&mut self) {
        match self.state {
            State::LocalInit => debug!(
                port = self.key.peer_port,
                "vsock: guest did not answer a host connection request in time"
            ),
            _ => warn!(
                port = self.key.local_port,
                buffered = self.tx_buf.len(),
                "vsock: host did not read the data of a closed connection in time; dropping it"
            ),
        }
        self.reset();
    }

    /// A guest packet (other than RST) for this connection.
    pub fn guest_packet(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, ()>>,
    ) -> Result<(), ConnError> {
        if self.state == State::Reset {
            return Ok(());
        }
        self.update_peer_credit(hdr);
        let unexpected = || ConnError::UnexpectedOp {
            op: op_name(hdr.op),
            code: hdr.op,
            state: self.state,
        };
        match (self.state, hdr.op) {
            (State::LocalInit, OP_RESPONSE) => self.established_by_guest(),
            (State::LocalInit, _) => return Err(unexpected()),
            (_, OP_CREDIT_UPDATE) => {}
            (_, OP_CREDIT_REQUEST) => self.pending.credit_update = true,
            (State::Established, OP_RW) => return self.guest_data(data),
            (State::Established, OP_SHUTDOWN) => {
                self.guest_shut |= hdr.flags & SHUTDOWN_BOTH;
                if self.guest_shut & SHUTDOWN_SEND != 0 {
                    // It sends no more: credit is of no use to it any longer.
                    self.pending.credit_update = false;
                }
                if self.guest_shut == SHUTDOWN_BOTH && !self.tx_buf.is_empty() {
                    self.deadline = Some(Instant::now() + LINGER_TIMEOUT);
                }
            }
            _ => return Err(unexpected()),
        }
        Ok(())
    }

    /// The guest accepted a host-initiated connection: tell the host client
    /// which port it got, the way Firecracker does ("OK <port>\n").
    fn established_by_guest(&mut self) {
        let Some(stream) = &self.stream else { return };
        let line = format!("OK {}\n", self.key.local_port);
        // A fresh socket's send buffer always has room for one short line; if
        // the write fails or is short, the client is gone.
        match uds::send_bytes(stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                debug!(
                    local = self.key.local_port,
                    peer = self.key.peer_port,
                    "vsock: host-initiated connection established"
                );
                self.state = State::Established;
                self.deadline = None;
            }
            res => {
                debug!(
                    port = self.key.peer_port,
                    "vsock: host client left before the guest answered: {res:?}"
                );
                self.reset();
            }
        }
    }

    fn guest_data(&mut self, data: Option<&VolatileSlice<'_, ()>>) -> Result<(), ConnError> {
        let Some(data) = data else { return Ok(()) };
        let len = data.len();
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            return Err(ConnError::DataAfterShutdown { len });
        }
        if self.tx_buf.len() + len > TX_BUF_SIZE as usize {
            return Err(ConnError::CreditExceeded {
                len,
                buffered: self.tx_buf.len(),
            });
        }
        self.rx_cnt += counter_bytes(len);
        if self.host_gone {
            // Nobody will read it; count it as consumed so the guest is not
            // left waiting for credit before it sees our SHUTDOWN(RCV).
            self.fwd_cnt += counter_bytes(len);
            return Ok(());
        }
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        let mut sent = 0;
        if self.tx_buf.is_empty() {
            match uds::send_volatile(stream, data) {
                Ok(n) => sent = n,
                Err(e) if uds::would_block(&e) => {}
                Err(e) => {
                    self.host_lost(&e);
                    return Ok(());
                }
            }
        }
        self.fwd_cnt += counter_bytes(sent);
        if sent < len {
            let mut rest = vec![0u8; len - sent];
            if let Ok(tail) = data.offset(sent) {
                tail.copy_to(&mut rest[..]);
            }
            self.tx_buf.extend(rest);
        }
        self.want_credit_update();
        Ok(())
    }

    /// The host stream can take no more bytes.
    fn host_lost(&mut self, e: &io::Error) {
        debug!(
            port = self.key.local_port,
            "vsock: host end stopped receiving: {e}"
        );
        self.host_gone = true;
        self.tx_buf = VecDeque::new();
    }

    fn want_credit_update(&mut self) {
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            return;
        }
        let unacked = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = TX_BUF_SIZE.saturating_sub(unacked);
        if guest_view_free < CREDIT_UPDATE_THRESHOLD && self.fwd_cnt != self.last_fwd_cnt_sent {
            self.pending.credit_update = true;
        }
    }

    /// Readiness of the host stream, as epoll reported it.
    pub fn host_event(&mut self, events: EventSet) {
        if self.stream.is_none() {
            return;
        }
        if self.registered.contains(EventSet::IN)
            && events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.pending.rw = true;
        }
        if events.contains(EventSet::HANG_UP) && !self.host_write_shut && !self.host_gone {
            // Both directions are shut and we did not shut ours: the host cannot receive.
            self.host_lost(&io::Error::from(io::ErrorKind::BrokenPipe));
        }
        if events.intersects(EventSet::OUT | EventSet::ERROR) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let Some(stream) = &self.stream else { return };
        match uds::flush(stream, &mut self.tx_buf) {
            Ok(n) => {
                self.fwd_cnt += counter_bytes(n);
                if n > 0 {
                    self.want_credit_update();
                }
            }
            Err(e) => self.host_lost(&e),
        }
    }

    /// Applies half-close consequences after any change: passes the guest's
    /// shutdowns on to the host once buffered data is out, tells the guest
    /// about the host's, and resets once neither direction can carry data.
    pub fn settle(&mut self) {
        if self.state != State::Established {
            return;
        }
        let Some(stream) = &self.stream else { return };
        let flushed = self.tx_buf.is_empty();
        if self.guest_shut & SHUTDOWN_SEND != 0 && flushed && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = stream.shutdown(Shutdown::Write);
        }
        if self.guest_shut & SHUTDOWN_RCV != 0 && !self.host_read_shut {
            self.host_read_shut = true;
            let _ = stream.shutdown(Shutdown::Read);
        }
        let to_guest_done = self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0;
        let to_host_done = self.host_gone || (self.guest_shut & SHUTDOWN_SEND != 0 && flushed);
        if to_guest_done && to_host_done {
            debug!(
                local = self.key.local_port,
                peer = self.key.peer_port,
                "vsock: connection closed both ways"
            );
            self.reset();
            return;
        }
        let flags = if self.host_eof { SHUTDOWN_SEND } else { 0 }
            | if self.host_gone { SHUTDOWN_RCV } else { 0 };
        if flags & !self.shut_sent != 0 {
            self.pending.shutdown = true;
        }
    }

    /// The epoll interest the connection needs now.
    fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.stream.is_none() {
            return set;
        }
        let wants_read = self.state == State::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
            && !self.pending.rw
            && self.peer_credit() > 0;
        if wants_read {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Brings the stream's epoll registration in line with [`Self::interest`].
    /// Unwatched streams are removed from the set entirely: epoll reports
    /// hang-ups whatever the interest, and a level-triggered hang-up we are
    /// not ready to act on would spin the worker.
    pub fn sync_interest(&mut self, epoll: &Epoll) -> io::Result<()> {
        let want = self.interest();
        if want == self.registered {
            return Ok(());
        }
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        let fd = stream.as_raw_fd();
        let op = if want.is_empty() {
            ControlOperation::Delete
        } else if self.registered.is_empty() {
            ControlOperation::Add
        } else {
            ControlOperation::Modify
        };
        epoll.ctl(op, fd, EpollEvent::new(want, self.token))?;
        self.registered = want;
        Ok(())
    }
}
