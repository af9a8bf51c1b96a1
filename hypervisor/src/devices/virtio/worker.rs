//! A device's worker: one thread running one epoll loop.
//!
//! Every device worker waits the same way: on one epoll set holding the
//! device's eventfds and sockets plus a kill eventfd; it retries after EINTR,
//! stops when the kill eventfd fires, and does not wait at all while work is
//! left over (a batch was cut short so the kill eventfd and the other queues
//! get a turn). [`EventLoop`] is that loop; a device only says what its events
//! mean ([`EventHandler`]). [`DeviceWorker`] is the thread running it; it
//! installs the seccomp filter the handler names ([`EventHandler::FILTER`])
//! after the device's setup and before the loop serves the guest.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use tracing::error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ActivateError;
use crate::seccomp::ThreadKind;

/// Epoll token of the kill eventfd; devices use any other token.
pub const TOKEN_KILL: u64 = u64::MAX;

/// What a device's worker does with the events of its epoll set.
pub trait EventHandler {
    /// Prefix of the loop's log lines ("virtio-fs").
    const NAME: &'static str;
    /// Most events one wait returns.
    const MAX_EVENTS: usize;
    /// The seccomp filter the worker thread runs under.
    const FILTER: ThreadKind;

    /// The epoll set the loop waits on. The handler registers its own file
    /// descriptors (with tokens other than [`TOKEN_KILL`]); the loop adds the
    /// kill eventfd.
    fn epoll(&self) -> &Epoll;

    /// Work is left over (kicked queues not yet processed, a batch cut
    /// short): the loop polls without waiting.
    fn has_pending_work(&self) -> bool;

    /// How long to wait for events when no work is pending, in milliseconds
    /// (-1: until an event comes).
    fn idle_timeout_ms(&self) -> i32 {
        -1
    }

    /// One event of the handler's own descriptors; `now` is when the wait returned.
    fn handle_event(&mut self, token: u64, events: EventSet, now: Instant);

    /// Runs after every wait, once its events are handled: moves data.
    fn process(&mut self, now: Instant);

    /// Runs once the loop has stopped, before the handler is dropped.
    fn stopped(&mut self) {}
}

/// The epoll loop of one device worker.
pub struct EventLoop<H> {
    handler: H,
    kill: EventFd,
    events: Vec<EpollEvent>,
}

impl<H: EventHandler> EventLoop<H> {
    /// The loop over `handler`'s epoll set, stopped by `kill`.
    pub fn new(handler: H, kill: EventFd) -> io::Result<Self> {
        handler.epoll().ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KILL),
        )?;
        Ok(Self {
            handler,
            kill,
            events: vec![EpollEvent::default(); H::MAX_EVENTS],
        })
    }

    /// Runs until the kill eventfd fires (or epoll fails).
    pub fn run(mut self) {
        while self.step(self.timeout()) {}
        self.handler.stopped();
    }

    /// 0 while work is pending, else the handler's idle timeout.
    fn timeout(&self) -> i32 {
        if self.handler.has_pending_work() {
            0
        } else {
            self.handler.idle_timeout_ms()
        }
    }

    /// Waits up to `timeout` ms for events, handles them and lets the
    /// handler process. Returns false once the worker must stop.
    fn step(&mut self, timeout: i32) -> bool {
        let n = match self.handler.epoll().wait(timeout, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                error!("{}: epoll_wait failed, stopping the device: {e}", H::NAME);
                return false;
            }
        };
        let now = Instant::now();
        for ev in &self.events[..n] {
            match ev.data() {
                TOKEN_KILL => {
                    let _ = self.kill.read();
                    return false;
                }
                token => self.handler.handle_event(token, ev.event_set(), now),
            }
        }
        self.handler.process(now);
        true
    }

    /// One step that never waits (tests and fuzz harnesses play the guest in
    /// between). Returns false once the worker would stop.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn step_nowait(&mut self) -> bool {
        self.step(0)
    }

    /// Nothing ready and nothing left over: the loop would sleep until a new
    /// event. A worker that never gets here without new input would spin.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn quiescent(&self) -> bool {
        let mut ev = [EpollEvent::default(); 1];
        !self.handler.has_pending_work() && self.handler.epoll().wait(0, &mut ev).ok() == Some(0)
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn handler(&self) -> &H {
        &self.handler
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }
}

/// A device's worker thread and the eventfd that tells it to stop.
#[derive(Debug)]
pub struct DeviceWorker {
    name: String,
    kill: EventFd,
    thread: std::thread::JoinHandle<()>,
    tid: i32,
}

impl DeviceWorker {
    /// Starts thread `name` running `handler`'s event loop: the thread runs
    /// `setup` first, then (if `seccomp`) installs the handler's filter (a
    /// failure of either fails the start, and the loop never runs), then
    /// the loop until [`DeviceWorker::stop`].
    pub fn start<H: EventHandler + Send + 'static>(
        name: &str,
        handler: H,
        setup: impl FnOnce() -> io::Result<()> + Send + 'static,
        seccomp: bool,
    ) -> Result<Self, ActivateError> {
        let filter = seccomp.then(|| H::FILTER.filter()).transpose()?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_kill = kill.try_clone().map_err(ActivateError::Worker)?;
        let event_loop = EventLoop::new(handler, worker_kill).map_err(ActivateError::Worker)?;
        let setup = move || {
            setup().map_err(ActivateError::Worker)?;
            if let Some(filter) = &filter {
                filter.install()?;
            }
            Ok(())
        };
        Self::spawn(name, kill, setup, move || event_loop.run())
    }

    /// Starts thread `name`: it runs `setup` first (a failure fails the
    /// start, and `run` never runs), then `run` until the worker sees `kill`.
    fn spawn(
        name: &str,
        kill: EventFd,
        setup: impl FnOnce() -> Result<(), ActivateError> + Send + 'static,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<Self, ActivateError> {
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let started = setup().map(|()| {
                    // SAFETY: gettid() has no preconditions.
                    unsafe { libc::gettid() }
                });
                let ok = started.is_ok();
                let _ = started_tx.send(started);
                if ok {
                    run();
                }
            })
            .map_err(ActivateError::Worker)?;
        let tid = match started_rx.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ActivateError::Worker(io::Error::other(format!(
                    "{name} exited before starting"
                ))));
            }
        };
        Ok(Self {
            name: name.into(),
            kill,
            thread,
            tid,
        })
    }

    /// The worker thread's id (for /proc/self/task/<tid>).
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Tells the worker to stop and waits for it. If the eventfd cannot be
    /// written the thread is left behind rather than hanging the VMM.
    pub fn stop(self) {
        if let Err(e) = self.kill.write(1) {
            tracing::error!("{}: cannot stop the worker: {e}", self.name);
            return;
        }
        if self.thread.join().is_err() {
            tracing::error!("{}: worker panicked", self.name);
        }
    }
}
