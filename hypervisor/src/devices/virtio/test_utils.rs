//! What the device tests and fuzz harnesses share: queues over guest memory
//! (for the harnesses, laid out by the fuzzed input itself), and, for the
//! tests, a driver's side of a queue ([`TestQueue`]) and of device start-up
//! ([`bring_up`], [`activate`]).
//!
//! Built for unit tests and with the `fuzzing` feature only.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, Interrupt};

// Descriptor flags as the u16 a descriptor holds (virtio_bindings has them
// as u32; all are below 8).
#[allow(clippy::cast_possible_truncation)]
pub const DESC_F_NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
pub const DESC_F_WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
#[allow(clippy::cast_possible_truncation)]
pub const DESC_F_INDIRECT: u16 =
    virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// The low 32 bits of `x`: how a driver writes a 64-bit address or feature
/// word into a pair of 32-bit registers.
#[allow(clippy::cast_possible_truncation)]
pub fn lo32(x: u64) -> u32 {
    x as u32
}

/// The high 32 bits of `x`.
pub fn hi32(x: u64) -> u32 {
    lo32(x >> 32)
}

/// The low byte of `x`: test patterns and seeds that cycle through 0-255.
pub fn low_byte(x: impl Into<u64>) -> u8 {
    x.into().to_le_bytes()[0]
}

/// A length, count or index the test or harness built small, as `T`.
pub fn small<T: TryFrom<usize>>(n: usize) -> T {
    T::try_from(n).unwrap_or_else(|_| panic!("{n} does not fit"))
}

/// Size of the fuzz harnesses' first memory region (at 0), which the input's
/// image fills.
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;
/// A small second region after a hole, so buffers can straddle or miss regions.
const FUZZ_MEM2_BASE: u64 = 0x2_0000;
const FUZZ_MEM2_SIZE: usize = 0x1000;

/// Guest memory for one fuzz input: `image` (cut to [`FUZZ_MEM_SIZE`])
/// at 0, the rest zero.
pub fn fuzz_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), FUZZ_MEM_SIZE),
        (GuestAddress(FUZZ_MEM2_BASE), FUZZ_MEM2_SIZE),
    ])
    .expect("guest memory");
    let image = &image[..image.len().min(FUZZ_MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0)).expect("image fits");
    mem
}

/// A ready queue of `size` (at most `max`) with its rings where the input put them.
pub fn queue(max: u16, size: u16, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(max).expect("valid max size");
    q.set_size(size);
    q.set_desc_table_address(Some(lo32(desc)), Some(0));
    q.set_avail_ring_address(Some(lo32(avail)), Some(0));
    q.set_used_ring_address(Some(lo32(used)), Some(0));
    q.set_ready(true);
    q
}

/// `q` with a fresh notify eventfd, as the transport hands it to a device.
pub fn active(q: Queue) -> ActiveQueue {
    ActiveQueue {
        queue: q,
        notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    }
}

/// An interrupt line nobody listens to.
pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")))
}

/// A split-queue descriptor as guest memory holds it.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// A fuzz input: `prefix`, then the memory image without its trailing zeros
/// (memory starts zeroed: they carry nothing).
pub fn fuzz_input(prefix: &[u8], image: &[u8]) -> Vec<u8> {
    let mut input = prefix.to_vec();
    input.extend_from_slice(image);
    while input.len() > prefix.len() && input.last() == Some(&0) {
        input.pop();
    }
    input
}

/// The smoke run of a fuzz target in `cargo test`: `run` over the
/// harness's own `seeds` (also written to `$HUSK_FUZZ_SEED_DIR/<target>/`
/// when that is set, see fuzz/README.md), over every file of the repository's
/// `fuzz/corpus/<target>/`, and over `random` inputs of up to `max_len`
/// bytes from a fixed-seed generator.
#[cfg(test)]
pub fn run_corpus(
    target: &str,
    seeds: &[Vec<u8>],
    random: usize,
    max_len: usize,
    mut run: impl FnMut(&[u8]),
) {
    if let Some(dir) = std::env::var_os("HUSK_FUZZ_SEED_DIR") {
        let dir = std::path::Path::new(&dir).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
    for seed in seeds {
        run(seed);
    }
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", corpus.display());
    for file in files {
        let input = std::fs::read(&file).unwrap();
        eprintln!("{target}: {}", file.display());
        run(&input);
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..random {
        let len = usize::try_from(next() % (u64::try_from(max_len).unwrap() + 1)).unwrap();
        let input: Vec<u8> = (0..len).map(|_| low_byte(next())).collect();
        run(&input);
    }
}

#[cfg(test)]
pub use driver::*;

/// The driver's side, for device tests.
#[cfg(test)]
mod driver {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
    use virtio_queue::QueueT;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::{hi32, lo32};
    use crate::bus::BusDevice;
    use crate::devices::virtio::mmio::*;
    use crate::devices::virtio::{
        ActivateContext, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    };

    /// Where a [`TestQueue`]'s used ring starts, from its base.
    pub const USED_OFFSET: u64 = 0x8000;
    /// Distance between the bases of consecutive test queues.
    pub const QUEUE_STRIDE: u64 = 0x1_0000;

    /// One memory region of `size` bytes at 0.
    pub fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// A split queue as the test's driver lays it out: the descriptor table
    /// and avail ring where MockSplitQueue puts them (from `base`), the used
    /// ring at `base + USED_OFFSET`, because MockSplitQueue (virtio-queue
    /// 0.17) places its own used ring over the second half of its avail ring.
    pub struct TestQueue<'a> {
        mock: MockSplitQueue<'a, GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
        used: GuestAddress,
        size: u16,
    }

    impl<'a> TestQueue<'a> {
        /// A queue of `size` entries at `base` (which needs [`QUEUE_STRIDE`]
        /// bytes), empty.
        pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
            let used = GuestAddress(base + USED_OFFSET);
            mem.write_slice(&[0u8; 4], used).unwrap();
            Self {
                mock: MockSplitQueue::create(mem, GuestAddress(base), size),
                mem,
                used,
                size,
            }
        }

        /// `n` queues of `size`, [`QUEUE_STRIDE`] apart from 0.
        pub fn at_strides<const N: usize>(mem: &'a GuestMemoryMmap, size: u16) -> [Self; N] {
            std::array::from_fn(|i| Self::new(mem, i as u64 * QUEUE_STRIDE, size))
        }

        pub fn desc_table(&self) -> &DescriptorTable<'a, GuestMemoryMmap> {
            self.mock.desc_table()
        }

        /// The descriptor at `i` of the table.
        pub fn descriptor(&self, i: u16) -> Descriptor {
            Descriptor::from(self.desc_table().load(i).unwrap())
        }

        /// (descriptor table, avail ring, used ring): what the driver tells
        /// the transport.
        pub fn addrs(&self) -> [GuestAddress; 3] {
            [
                self.mock.desc_table_addr(),
                self.mock.avail_addr(),
                self.used,
            ]
        }

        /// The queue as the transport would hand it to the device.
        pub fn create_queue(&self) -> virtio_queue::Queue {
            let mut queue: virtio_queue::Queue = self.mock.create_queue().unwrap();
            queue.set_used_ring_address(Some(lo32(self.used.0)), Some(hi32(self.used.0)));
            queue
        }

        /// Makes the chain at `head` available (the device sees it once kicked).
        pub fn push_avail(&self, head: u16) {
            let avail = self.mock.avail();
            let idx = avail.idx().load();
            avail
                .ring()
                .ref_at(usize::from(idx % self.size))
                .unwrap()
                .store(head);
            avail.idx().store(idx.wrapping_add(1));
        }

        /// The used ring's index: chains the device returned so far.
        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
        }

        /// (id, len) of used ring entry `i`.
        pub fn used_elem(&self, i: u16) -> (u32, u32) {
            let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
            (
                self.mem.read_obj(at).unwrap(),
                self.mem.read_obj(at.unchecked_add(4)).unwrap(),
            )
        }
    }

    /// Whether the thread `tid` of this process is gone within a second:
    /// a joined thread's /proc entry can outlive the join for a moment on a
    /// loaded host.
    pub fn thread_gone(tid: i32) -> bool {
        let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while task.exists() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Tells the device queue `q` has new buffers.
    pub fn kick(notify: &[EventFd], q: usize) {
        notify[q].write(1).unwrap();
    }

    /// Brings the device behind `t` up through its registers, as the Linux
    /// driver does: reset, ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK
    /// (checked), every queue, DRIVER_OK (checked). Returns the queues'
    /// notify eventfds (what QueueNotify writes).
    pub fn bring_up(t: &mut MmioTransport, features: u64, queues: &[&TestQueue]) -> Vec<EventFd> {
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let status = |t: &mut MmioTransport| {
            let mut st = [0u8; 4];
            t.read(0x70, &mut st);
            u32::from_le_bytes(st)
        };
        w(t, 0x70, 0);
        w(t, 0x70, STATUS_ACKNOWLEDGE);
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in [1u32, 0] {
            w(t, 0x24, sel);
            w(t, 0x20, lo32(features >> (32 * sel)));
        }
        let feat_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(t, 0x70, feat_ok);
        assert_eq!(status(t), feat_ok, "features refused");
        for (i, q) in (0u32..).zip(queues) {
            w(t, 0x30, i);
            w(t, 0x38, u32::from(q.size));
            for (reg, addr) in [0x80, 0x90, 0xa0].into_iter().zip(q.addrs()) {
                w(t, reg, lo32(addr.0));
                w(t, reg + 4, hi32(addr.0));
            }
            w(t, 0x44, 1);
        }
        w(t, 0x70, feat_ok | STATUS_DRIVER_OK);
        assert_eq!(status(t), feat_ok | STATUS_DRIVER_OK);
        t.queue_events()
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect()
    }

    /// A transport over `dev` with an interrupt line nobody listens to.
    pub fn transport(mem: &GuestMemoryMmap, dev: Box<dyn VirtioDevice>) -> MmioTransport {
        let irq = std::sync::Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        MmioTransport::new(mem.clone(), dev, irq).unwrap()
    }

    /// Activates `dev` without the transport with `queues`, as a driver
    /// acking `features` would have it. Returns the queues' notify eventfds
    /// and the device's interrupt eventfd.
    pub fn activate(
        dev: &mut dyn VirtioDevice,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[&TestQueue],
    ) -> (Vec<EventFd>, EventFd) {
        let notify: Vec<EventFd> = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let active = queues
            .iter()
            .zip(&notify)
            .map(|(q, e)| ActiveQueue {
                queue: q.create_queue(),
                notify: e.try_clone().unwrap(),
            })
            .collect();
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = std::sync::Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            acked_features: features,
            queues: active,
            interrupt: irq,
            // The device tests run every worker under its real filter.
            seccomp: true,
        })
        .unwrap();
        (notify, irqfd)
    }

    /// The features every modern driver acks, plus `bits`.
    pub fn features(bits: &[u32]) -> u64 {
        bits.iter().fold(VIRTIO_F_VERSION_1, |f, &b| f | 1 << b)
    }
}
