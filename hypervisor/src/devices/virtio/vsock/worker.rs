//! The vsock device's worker: one thread, one epoll loop ([`EventLoop`])
//! over the queue eventfds, the Unix listener and every connection's stream.
//! It moves packets between the virtqueues and the muxer.
//!
//! [`EventLoop`]: crate::devices::virtio::worker::EventLoop

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::muxer::Muxer;
use super::packet::{Header, MAX_PKT_DATA};
use crate::devices::virtio::worker::EventHandler;
use crate::devices::virtio::{ActiveQueue, Interrupt};

const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_EVQ: u64 = 3;

pub struct Worker {
    mem: GuestMemoryMmap,
    rxq: ActiveQueue,
    txq: ActiveQueue,
    /// Only drained: the device never posts events (those are for live migration).
    evq: ActiveQueue,
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    /// The tx queue may hold chains not yet processed (kicked, or a batch was cut short).
    tx_pending: bool,
    /// tx processing stopped because replies could not be queued.
    tx_blocked: bool,
    /// An rx batch was cut short: run again without waiting.
    rx_again: bool,
    /// A transport reset was posted and the guest has not handed its event
    /// buffer back yet (it does once it reset its sockets): host clients
    /// wait meanwhile.
    awaiting_reset: bool,
}

/// How long host clients wait for a guest to handle a transport reset (it
/// takes microseconds on bare metal; a guest that never does only delays
/// its host clients).
const RESET_HANDLING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Worker {
    pub fn new(
        mem: GuestMemoryMmap,
        [rxq, txq, evq]: [ActiveQueue; 3],
        interrupt: Arc<Interrupt>,
        muxer: Muxer,
    ) -> io::Result<Self> {
        let epoll = muxer.epoll();
        for (fd, token) in [
            (&rxq.notify, TOKEN_RXQ),
            (&txq.notify, TOKEN_TXQ),
            (&evq.notify, TOKEN_EVQ),
        ] {
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
            muxer,
            // The driver may have queued buffers before the worker existed.
            tx_pending: true,
            tx_blocked: false,
            rx_again: true,
            awaiting_reset: false,
        })
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

    /// Tells the guest every connection it had is gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, virtio 1.2 §5.10.6.7): a
    /// restored guest's connections belonged to the VMM it was saved from.
    /// Listening sockets survive; the host reconnects.
    pub fn post_transport_reset(&mut self) {
        const EVENT_TRANSPORT_RESET: u32 = 0;
        let Some(chain) = self.evq.queue.pop_descriptor_chain(&self.mem) else {
            warn!(
                "vsock: no event buffer for the transport reset; the guest keeps stale connections"
            );
            return;
        };
        let head = chain.head_index();
        let written = chain.writer::<()>(&self.mem).is_ok_and(|mut w| {
            use std::io::Write;
            w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
        });
        if !written {
            warn!(
                head,
                "vsock: the guest's event buffer cannot take the transport reset"
            );
        }
        let len = if written { 4 } else { 0 };
        if let Err(e) = self.evq.queue.add_used(&self.mem, head, len) {
            warn!(head, "vsock: cannot return an event chain: {e}");
        }
        self.signal("event");
        self.awaiting_reset = true;
        self.muxer
            .hold_listener(Instant::now() + RESET_HANDLING_TIMEOUT);
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

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }
}

impl EventHandler for Worker {
    const NAME: &'static str = "vsock";
    const MAX_EVENTS: usize = 64;
    const FILTER: crate::seccomp::ThreadKind = crate::seccomp::ThreadKind::Vsock;

    fn epoll(&self) -> &Epoll {
        self.muxer.epoll()
    }

    fn has_pending_work(&self) -> bool {
        self.tx_pending || self.rx_again
    }

    fn idle_timeout_ms(&self) -> i32 {
        self.muxer.timeout_ms(Instant::now())
    }

    fn handle_event(&mut self, token: u64, events: EventSet, now: Instant) {
        match token {
            TOKEN_RXQ => {
                let _ = self.rxq.notify.read();
            }
            TOKEN_TXQ => {
                let _ = self.txq.notify.read();
                self.tx_pending = true;
            }
            TOKEN_EVQ => {
                let _ = self.evq.notify.read();
                // The guest refills its event queue after handling events.
                if std::mem::take(&mut self.awaiting_reset) {
                    self.muxer.release_listener(now);
                }
            }
            token => self.muxer.handle_event(token, events, now),
        }
    }

    fn process(&mut self, now: Instant) {
        self.muxer.process_timeouts(now);
        self.pump();
    }
}
