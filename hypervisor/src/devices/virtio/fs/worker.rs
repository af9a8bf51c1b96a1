//! The virtio-fs worker: one thread, one epoll loop ([`EventLoop`]) over the
//! two queues' eventfds. Every chain is one FUSE request, handed to
//! fuse-backend-rs's server; the reply goes into the chain's writable part.
//!
//! [`EventLoop`]: crate::devices::virtio::worker::EventLoop

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::server::{Server, MAX_BUFFER_SIZE};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::guard::GuardedFs;
use crate::devices::virtio::net::LogLimiter;
use crate::devices::virtio::worker::EventHandler;
use crate::devices::virtio::{ActiveQueue, Interrupt};

/// The file system the worker serves.
pub type SharedFs = GuardedFs<PassthroughFs<()>>;

/// Queue indexes: FORGETs go to hiprio, everything else to the request queue.
pub const HIPRIO: usize = 0;
pub const REQUEST: usize = 1;

/// Most bytes of a chain the server sees in either direction: the largest
/// request Linux sends (1 MiB of data, the max_write and max_pages the server
/// announces) plus a page for headers. Beyond this the guest is not a Linux
/// driver, and fuse-backend-rs sizes some allocations from what is readable.
pub const MAX_CHAIN_BYTES: usize = MAX_BUFFER_SIZE as usize + 4096;

pub struct Worker {
    mem: GuestMemoryMmap,
    queues: [ActiveQueue; 2],
    interrupt: Arc<Interrupt>,
    epoll: Epoll,
    fs: Arc<SharedFs>,
    server: Server<Arc<SharedFs>>,
    /// The queue may hold chains not yet processed (kicked, or a batch was cut short).
    pending: [bool; 2],
    log: LogLimiter,
}

impl Worker {
    pub fn new(
        mem: GuestMemoryMmap,
        queues: [ActiveQueue; 2],
        interrupt: Arc<Interrupt>,
        fs: SharedFs,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (queues[HIPRIO].notify.as_raw_fd(), HIPRIO as u64),
            (queues[REQUEST].notify.as_raw_fd(), REQUEST as u64),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let fs = Arc::new(fs);
        Ok(Self {
            mem,
            queues,
            interrupt,
            epoll,
            server: Server::new(fs.clone()),
            fs,
            // The driver may have queued requests before the worker existed.
            pending: [true; 2],
            log: LogLimiter::default(),
        })
    }

    /// Serves up to one queue's worth of requests from queue `q`, so the
    /// kill eventfd and the other queue are looked at in between.
    pub fn process_queue(&mut self, q: usize) {
        let budget = self.queues[q].queue.size();
        let mut used = 0u16;
        self.pending[q] = false;
        loop {
            if used >= budget {
                self.pending[q] = true;
                break;
            }
            let Some(chain) = self.queues[q].queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match handle_chain(&self.server, &self.mem, chain) {
                Ok(len) => len,
                Err(e) => {
                    self.log.warn("virtio-fs: dropping a malformed chain", &e);
                    0
                }
            };
            if let Err(e) = self.queues[q].queue.add_used(&self.mem, head, len) {
                self.log.warn(
                    "virtio-fs: cannot return a chain",
                    &format_args!("head {head}: {e}"),
                );
            }
            used += 1;
        }
        if used > 0 {
            if let Err(e) = self.interrupt.signal_used_queue() {
                warn!(queue = q, "virtio-fs: cannot interrupt the guest: {e}");
            }
        }
    }

    /// The file system behind the server (the fuzz harness initializes it directly).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn fs(&self) -> &SharedFs {
        &self.fs
    }
}

impl EventHandler for Worker {
    const NAME: &'static str = "virtio-fs";
    const MAX_EVENTS: usize = 8;
    const FILTER: crate::seccomp::ThreadKind = crate::seccomp::ThreadKind::Fs;

    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn has_pending_work(&self) -> bool {
        self.pending.iter().any(|&p| p)
    }

    fn handle_event(&mut self, token: u64, _events: EventSet, _now: Instant) {
        match token {
            0 | 1 => {
                let q = if token == 0 { HIPRIO } else { REQUEST };
                let _ = self.queues[q].notify.read();
                self.pending[q] = true;
            }
            token => warn!(token, "virtio-fs: event for an unknown token"),
        }
    }

    fn process(&mut self, _now: Instant) {
        // FORGETs first: they release host descriptors the requests may need.
        for q in [HIPRIO, REQUEST] {
            if self.pending[q] {
                self.process_queue(q);
            }
        }
    }

    fn stopped(&mut self) {
        debug!(
            fds = self.fs.fds_in_use(),
            "virtio-fs: worker stopped, closing the guest's host descriptors"
        );
    }
}

/// FUSE requests that get no reply.
fn expects_reply(opcode: u32) -> bool {
    ![
        Opcode::Forget as u32,
        Opcode::BatchForget as u32,
        Opcode::Interrupt as u32,
        Opcode::Destroy as u32,
    ]
    .contains(&opcode)
}

/// Serves one request; returns how many bytes of the chain were written,
/// or why the chain was dropped unanswered.
fn handle_chain(
    server: &Server<Arc<SharedFs>>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<u32, String> {
    let head = chain.head_index();
    let reader = Reader::from_descriptor_chain(mem, chain.clone());
    let writer = VirtioFsWriter::new(mem, chain);
    let (mut reader, mut writer) = match (reader, writer) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => return Err(format!("head {head}: {e}")),
    };
    // Bound what the server sees; the sizes come from the reader and writer
    // themselves, so a guest rewriting its descriptors meanwhile changes nothing.
    if reader.available_bytes() > MAX_CHAIN_BYTES {
        let _ = reader.split_at(MAX_CHAIN_BYTES);
    }
    if writer.available_bytes() > MAX_CHAIN_BYTES {
        let _ = writer.split_at(MAX_CHAIN_BYTES);
    }
    let header: Option<InHeader> = reader.clone().read_obj().ok();
    let Some(header) = header else {
        return Err(format!("head {head}: too short for a FUSE header"));
    };
    let spare = writer.clone();
    Ok(
        match server.handle_message(reader, Writer::VirtioFs(writer), None, None) {
            Ok(n) => u32::try_from(n).unwrap_or(0),
            Err(e) => {
                debug!(
                    head,
                    opcode = header.opcode,
                    unique = header.unique,
                    "virtio-fs: bad request: {e}"
                );
                if expects_reply(header.opcode) {
                    reply_error(spare, &header)
                } else {
                    0
                }
            }
        },
    )
}

/// The size of a FUSE reply header (16 bytes: fits).
#[allow(clippy::cast_possible_truncation)]
const OUT_HEADER_LEN: u32 = std::mem::size_of::<OutHeader>() as u32;

/// Answers a request the server could not with EINVAL, so the guest's
/// request completes instead of reading whatever the buffer held.
fn reply_error(mut w: VirtioFsWriter<'_>, header: &InHeader) -> u32 {
    let out = OutHeader {
        len: OUT_HEADER_LEN,
        error: -libc::EINVAL,
        unique: header.unique,
    };
    match io::Write::write_all(&mut w, out.as_slice()) {
        Ok(()) => out.len,
        Err(_) => 0,
    }
}
