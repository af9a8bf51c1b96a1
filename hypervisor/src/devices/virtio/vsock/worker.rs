//! The vsock device's worker: one thread, one epoll loop over the queue
//! eventfds, the kill eventfd, the Unix listener and every connection's stream.
//! It moves packets between the virtqueues and the muxer.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tracing::{error, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{Header, MAX_PKT_DATA};
use crate::devices::virtio::{ActiveQueue, Interrupt};

const TOKEN_KILL: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_EVQ: u64 = 3;
const MAX_EVENTS: usize = 64;

pub struct Worker {
    mem: GuestMemoryMmap,
    rxq: ActiveQueue,
    txq: ActiveQueue,
    /// Only drained: the device never posts events (those are for live migration).
    evq: ActiveQueue,
    interrupt: Arc<Interrupt>,
    kill: EventFd,
    muxer: Muxer,
    /// The tx queue may hold chains not yet processed (kicked, or a batch was cut short).
    tx_pending: bool,
    /// tx processing stopped because replies could not be queued.
    tx_blocked: bool,
    /// An rx batch was cut short: run again without waiting.
    rx_again: bool,
}

impl Worker {
    pub fn new(
        mem: GuestMemoryMmap,
        [rxq, txq, evq]: [ActiveQueue; 3],
        interrupt: Arc<Interrupt>,
        kill: EventFd,
        muxer: Muxer,
    ) -> io::Result<Self> {
        let epoll = muxer.epoll();
        for (fd, token) in [
            (&kill, TOKEN_KILL),
            (&rxq.notify, TOKEN_RXQ),
            (&txq.notify, TOKEN_TXQ),
            (&evq.notify, TOKEN_EVQ),
        ] {
            use std::os::fd::AsRawFd;
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self {
            mem,
            rxq,
            txq,
            evq,
            interrupt,
            kill,
            muxer,
            // The driver may have queued buffers before the worker existed.
            tx_pending: true,
            tx_blocked: false,
            rx_again: true,
        })
    }

    /// Runs until the kill eventfd fires.
    pub fn run(mut self) {
        while self.step() {}
    }

    /// Waits for events (not at all if work is left over), handles them and
    /// moves packets. Returns false once the worker must stop.
    pub fn step(&mut self) -> bool {
        let now = Instant::now();
        let timeout = if self.tx_pending || self.rx_again {
            0
        } else {
            self.muxer.timeout_ms(now)
        };
        self.step_with_timeout(timeout)
    }

    /// One step that never waits (the fuzz harness plays the guest in between).
    #[cfg(any(test, fuzzing))]
    pub fn step_nowait(&mut self) -> bool {
        self.step_with_timeout(0)
    }

    fn step_with_timeout(&mut self, timeout: i32) -> bool {
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let n = match self.muxer.epoll().wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                error!("vsock: epoll_wait failed, stopping the device: {e}");
                return false;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => {
                    let _ = self.kill.read();
                    return false;
                }
                TOKEN_RXQ => {
                    let _ = self.rxq.notify.read();
                }
                TOKEN_TXQ => {
                    let _ = self.txq.notify.read();
                    self.tx_pending = true;
                }
                TOKEN_EVQ => {
                    let _ = self.evq.notify.read();
                }
                token => self.muxer.handle_event(token, ev.event_set(), now),
            }
        }
        self.muxer.process_timeouts(now);
        self.pump();
        true
    }

    fn pump(&mut self) {
        // tx first: guest packets may owe replies that the rx pass delivers.
        if self.tx_pending {
            self.process_tx();
        }
        let rx_used = self.process_rx();
        if self.tx_blocked && rx_used {
            // Delivering replies made room: go back to the packets waiting behind them.
            self.process_tx();
            self.process_rx();
        }
    }

    fn signal(&self, queue: &str) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            warn!("vsock: cannot interrupt the guest for the {queue} queue: {e}");
        }
    }

    /// Handles up to one queue's worth of guest packets.
    pub fn process_tx(&mut self) {
        let budget = self.txq.queue.size();
        let mut used = 0;
        self.tx_pending = false;
        self.tx_blocked = false;
        loop {
            if self.muxer.tx_blocked() {
                self.tx_blocked = true;
                break;
            }
            if used >= budget {
                // Let other events in; come back without waiting.
                self.tx_pending = true;
                break;
            }
            let Some(mut chain) = self.txq.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.guest_packet(&Header::of(&pkt), pkt.data_slice()),
                Err(e) => warn!(head, "vsock: dropping a malformed tx chain: {e}"),
            }
            if let Err(e) = self.txq.queue.add_used(&self.mem, head, 0) {
                warn!(head, "vsock: cannot return a tx chain: {e}");
            }
            used += 1;
        }
        if used > 0 {
            self.signal("tx");
        }
    }

    /// Fills rx buffers with packets owed to the guest. Returns whether any
    /// buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let budget = self.rxq.queue.size();
        let mut used = 0;
        self.rx_again = false;
        while self.muxer.has_pending_rx() {
            if used >= budget {
                self.rx_again = true;
                break;
            }
            let Some(mut chain) = self.rxq.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt) {
                    Some(len) => len,
                    None => {
                        // Nothing to say after all: keep the buffer for later.
                        self.rxq.queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    warn!(head, "vsock: returning a malformed rx chain unused: {e}");
                    0
                }
            };
            if let Err(e) = self.rxq.queue.add_used(&self.mem, head, len) {
                warn!(head, "vsock: cannot return an rx chain: {e}");
            }
            used += 1;
        }
        if used > 0 {
            self.signal("rx");
        }
        used > 0
    }

    #[cfg(any(test, fuzzing))]
    pub fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// Nothing ready and nothing left over: the loop would sleep until a new
    /// event. A worker that never gets here without new input would spin.
    #[cfg(any(test, fuzzing))]
    pub fn quiescent(&self) -> bool {
        let mut ev = [EpollEvent::default(); 1];
        !self.tx_pending && !self.rx_again && self.muxer.epoll().wait(0, &mut ev).ok() == Some(0)
    }
}
