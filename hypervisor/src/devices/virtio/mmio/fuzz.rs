//! Fuzzing entry points (built for `cargo fuzz` and unit tests only) for the
//! virtio-mmio transport, which every register access of a guest driver
//! reaches.
//!
//! - [`fuzz_registers`]: arbitrary accesses (after an optional driver
//!   prologue with fuzzed values) to a checking device, which asserts what
//!   the transport promises a device: only valid queues, only accepted
//!   features, never two activations without a reset.
//! - [`fuzz_lifecycle`]: driver-shaped operations (reset, status steps,
//!   feature pages, queue select, size, addresses, ready, notify, config,
//!   whole bring-ups) against the real vsock device behind the transport,
//!   checking after every step that the device runs exactly when the status
//!   says DRIVER_OK without DEVICE_NEEDS_RESET, that a reset really resets
//!   (status, interrupt, every queue's registers, the device stopped), that
//!   the device only ever sees valid queues and accepted features, and, at
//!   the end, that a driver can still bring the device up from scratch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::bus::BusDevice;
use crate::devices::virtio::test_utils::{hi32, lo32};
use crate::devices::virtio::vsock::Vsock;

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0xffu8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Asserts what a device may rely on when the transport starts it.
fn check_activation(ctx: &ActivateContext, offered: u64, max_sizes: &[u16]) {
    assert_eq!(ctx.acked_features & !offered, 0, "unoffered features acked");
    assert_ne!(
        ctx.acked_features & VIRTIO_F_VERSION_1,
        0,
        "VERSION_1 not acked"
    );
    assert!(
        ctx.queues.len() <= max_sizes.len(),
        "more queues than the device has"
    );
    for (q, &max) in ctx.queues.iter().zip(max_sizes) {
        let size = q.queue.size();
        assert!(size.is_power_of_two() && size <= max, "queue size {size}");
        assert!(q.queue.ready(), "a queue the driver did not make ready");
        assert!(q.queue.is_valid(&ctx.mem), "a queue outside guest memory");
    }
}

// ---------------------------------------------------------------------------
// fuzz_registers

const CHECKER_FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b11;
const CHECKER_QUEUES: [u16; 3] = [8, 4, 2];

struct Checker {
    active: bool,
}

impl VirtioDevice for Checker {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &CHECKER_QUEUES
    }
    fn avail_features(&self) -> u64 {
        CHECKER_FEATURES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn is_active(&self) -> bool {
        self.active
    }
    /// Not the default: a second activation without a reset is a bug of
    /// the transport, not something to refuse.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        self.start(ctx)
    }
    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        check_activation(&ctx, CHECKER_FEATURES, &CHECKER_QUEUES);
        if ctx.queues.len() == 3 {
            self.active = true;
            Ok(())
        } else {
            Err(ActivateError::QueueCount {
                want: 3,
                got: ctx.queues.len(),
            })
        }
    }
    fn reset(&mut self) {
        self.active = false;
    }
}

/// Bytes of the driver prologue: mode, features (8), per queue size and
/// three ring addresses (1 + 3 * 2 bytes).
pub const PROLOGUE: usize = 1 + 8 + 3 * 7;

/// Brings the device up the way a driver would, with fuzzer-chosen features,
/// queue sizes and ring addresses, so that activation is reached every time.
fn prologue(t: &mut MmioTransport, p: &[u8; PROLOGUE]) {
    let mode = p[0];
    let features = u64::from_le_bytes([p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]]);
    w(t, 0x70, 1);
    w(t, 0x70, 3);
    w(t, 0x24, 0);
    w(t, 0x20, lo32(features));
    w(t, 0x24, 1);
    w(t, 0x20, hi32(features));
    w(t, 0x70, 0xb);
    for (i, q) in (0u32..).zip(p[9..].chunks_exact(7)) {
        // Mostly valid sizes (powers of two), sometimes raw values.
        let size = if q[0] & 0x80 != 0 {
            u32::from(q[0] & 0x7f)
        } else {
            1 << (q[0] % 4)
        };
        let addr = |lo: u8, hi: u8, align: u16| {
            let a = u16::from_le_bytes([lo, hi]);
            // Aligned unless the mode says otherwise.
            u32::from(if mode & 2 != 0 { a } else { a & !(align - 1) })
        };
        w(t, 0x30, i);
        w(t, 0x38, size);
        w(t, 0x80, addr(q[1], q[2], 16));
        w(t, 0x84, 0);
        w(t, 0x90, addr(q[3], q[4], 2));
        w(t, 0x94, 0);
        w(t, 0xa0, addr(q[5], q[6], 4));
        w(t, 0xa4, u32::from(mode >> 7));
        if mode & (4 << i) == 0 {
            w(t, 0x44, 1);
        }
    }
    w(t, 0x70, 0xf);
}

/// Runs one input of [`fuzz_registers`]: if the first byte is odd, the
/// first [`PROLOGUE`] bytes drive a bring-up; then accesses of 7 bytes each:
/// op (bit 0: write; bits 1-3: width 4, 4, 4, 4, 1, 2, 8, 0), offset (2
/// bytes, mod 0x180), value (4 bytes).
pub fn fuzz_registers(data: &[u8]) {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
    let mut t =
        MmioTransport::new(mem, Box::new(Checker { active: false }), irq).expect("transport");
    let ops = match data.split_first_chunk::<PROLOGUE>() {
        Some((p, rest)) if p[0] & 1 != 0 => {
            prologue(&mut t, p);
            rest
        }
        _ => data,
    };
    for op in ops.chunks_exact(7) {
        let width = [4usize, 4, 4, 4, 1, 2, 8, 0][usize::from((op[0] >> 1) & 7)];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x180;
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[3..7]);
        if op[0] & 1 != 0 {
            t.write(offset, &value[..width]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        }
    }
    t.shutdown();
}

/// Starting points for [`fuzz_registers`]: a clean bring-up with valid
/// queues, one with a gap and raw sizes, plain accesses.
pub fn register_seeds() -> Vec<Vec<u8>> {
    let mut valid = vec![1u8];
    valid.extend(CHECKER_FEATURES.to_le_bytes());
    for (i, size) in [3u8, 2, 1].into_iter().enumerate() {
        let base = u8::try_from(i).expect("queue index") * 0x10;
        valid.extend([size, 0, base, 0, base + 4, 0, base + 8]);
    }
    let mut gap = valid.clone();
    gap[0] = 1 | 8 | 2;
    gap[9] = 0x85;
    let mut after = valid.clone();
    // Then: a reset, a read of the status, a write to a queue register.
    after.extend([
        1, 0x70, 0, 0, 0, 0, 0, 0, 0x70, 0, 0, 0, 0, 0, 1, 0x38, 0, 4, 0, 0, 0,
    ]);
    let plain = vec![0, 0, 0, 0, 0, 0, 0, 9, 0x10, 1, 1, 2, 3, 4];
    vec![valid, gap, after, plain]
}

// ---------------------------------------------------------------------------
// fuzz_lifecycle

/// The real vsock device, with the checks of what reaches it.
struct Watched {
    inner: Vsock,
    activations: Arc<AtomicUsize>,
}

impl VirtioDevice for Watched {
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.inner.queue_max_sizes()
    }
    fn avail_features(&self) -> u64 {
        self.inner.avail_features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data);
    }
    fn is_active(&self) -> bool {
        self.inner.is_active()
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        assert!(!self.inner.is_active(), "activated twice without a reset");
        check_activation(&ctx, self.avail_features(), self.queue_max_sizes());
        let queues = ctx.queues.len();
        let res = self.inner.activate(ctx);
        // Valid queues, all three of them: nothing else can stop vsock.
        assert_eq!(res.is_ok(), queues == 3, "{res:?} with {queues} queues");
        assert_eq!(self.inner.is_active(), res.is_ok());
        if res.is_ok() {
            self.activations.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.inner.start(ctx)
    }
    fn reset(&mut self) {
        self.inner.reset();
        assert!(!self.inner.is_active(), "still running after a reset");
    }
}

/// Guest memory of the lifecycle harness (zeroed: the rings are empty).
const LIFECYCLE_MEM: usize = 0x1_0000;
const VSOCK_QUEUES: u32 = 3;
const VSOCK_QUEUE_MAX: u32 = 256;

/// A fresh socket path per device (each input creates one).
fn socket_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-mmio-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz socket dir");
        dir
    });
    dir.join(format!("v{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// The driver's steps through the status register, in order.
const STEPS: [u32; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
];

/// What one input did (lets the unit tests check the seeds do what they claim).
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Times the device was started (the final bring-up included).
    pub activations: usize,
    /// Activations the transport refused (DEVICE_NEEDS_RESET seen).
    pub refused: usize,
}

struct Rig {
    t: MmioTransport,
    irq: Arc<Interrupt>,
    activations: Arc<AtomicUsize>,
    refused: usize,
}

impl Rig {
    fn status(&mut self) -> u32 {
        r(&mut self.t, reg::STATUS)
    }

    /// The device runs exactly when the status says it was started and
    /// nothing went wrong since.
    fn check(&mut self, after: &str) {
        let status = self.status();
        let running = status & STATUS_DRIVER_OK != 0 && status & STATUS_DEVICE_NEEDS_RESET == 0;
        assert_eq!(
            self.t.device.is_active(),
            running,
            "status {status:#x} after {after}"
        );
        if status & STATUS_DEVICE_NEEDS_RESET != 0 {
            assert_ne!(
                status & STATUS_DRIVER_OK,
                0,
                "NEEDS_RESET only from DRIVER_OK"
            );
        }
    }

    fn reset(&mut self) {
        w(&mut self.t, reg::STATUS, 0);
        assert_eq!(self.status(), 0, "status after a reset");
        assert!(!self.t.device.is_active(), "device running after a reset");
        assert_eq!(r(&mut self.t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(self.irq.status(), 0);
        for q in 0..=VSOCK_QUEUES {
            w(&mut self.t, reg::QUEUE_SEL, q);
            let max = if q < VSOCK_QUEUES { VSOCK_QUEUE_MAX } else { 0 };
            assert_eq!(r(&mut self.t, reg::QUEUE_NUM_MAX), max, "queue {q}");
            assert_eq!(
                r(&mut self.t, reg::QUEUE_READY),
                0,
                "queue {q} ready after a reset"
            );
        }
        w(&mut self.t, reg::QUEUE_SEL, 0);
    }

    /// A well-behaved driver from reset to DRIVER_OK; `layout` picks the
    /// queue sizes. Must always start the device.
    fn bring_up(&mut self, layout: u32) {
        self.reset();
        for step in &STEPS[..2] {
            w(&mut self.t, reg::STATUS, *step);
        }
        let features = self.t.device.avail_features();
        for sel in [0u32, 1] {
            w(&mut self.t, reg::DRIVER_FEATURES_SEL, sel);
            w(
                &mut self.t,
                reg::DRIVER_FEATURES,
                lo32(features >> (32 * sel)),
            );
        }
        w(&mut self.t, reg::STATUS, STEPS[2]);
        assert_eq!(self.status(), STEPS[2], "features refused");
        for q in 0..VSOCK_QUEUES {
            // Up to 256 entries: 4 KiB of descriptors, rings after them,
            // each queue in its own 16 KiB.
            let size = 1u32 << ((layout >> (4 * q)) % 9);
            let base = u64::from(q) * 0x4000;
            w(&mut self.t, reg::QUEUE_SEL, q);
            w(&mut self.t, reg::QUEUE_NUM, size);
            for (reg_low, addr) in [
                (reg::QUEUE_DESC_LOW, base),
                (reg::QUEUE_DRIVER_LOW, base + 0x1000),
                (reg::QUEUE_DEVICE_LOW, base + 0x2000),
            ] {
                w(&mut self.t, reg_low, lo32(addr));
                w(&mut self.t, reg_low + 4, hi32(addr));
            }
            w(&mut self.t, reg::QUEUE_READY, 1);
        }
        let before = self.activations.load(Ordering::Relaxed);
        w(&mut self.t, reg::STATUS, STEPS[3]);
        assert_eq!(self.status(), STEPS[3], "a valid bring-up failed");
        assert!(self.t.device.is_active());
        assert_eq!(self.activations.load(Ordering::Relaxed), before + 1);
    }

    /// One operation of 6 bytes: code, argument, value (u32).
    fn op(&mut self, code: u8, arg: u8, value: u32) {
        let raw = arg & 0x80 != 0;
        match code % 16 {
            0 => self.reset(),
            1 => w(&mut self.t, reg::STATUS, value),
            // The next step of a driver's handshake, from wherever it is.
            2 => {
                let status = self.status();
                let next = STEPS
                    .iter()
                    .find(|s| *s & status == status && **s != status);
                if let Some(&next) = next {
                    w(&mut self.t, reg::STATUS, next);
                }
            }
            3 => {
                let sel = u32::from(arg & 1);
                let v = if arg & 2 != 0 {
                    lo32(self.t.device.avail_features() >> (32 * sel))
                } else {
                    value
                };
                w(&mut self.t, reg::DRIVER_FEATURES_SEL, sel);
                w(&mut self.t, reg::DRIVER_FEATURES, v);
            }
            4 => w(
                &mut self.t,
                reg::QUEUE_SEL,
                if raw { value } else { u32::from(arg % 4) },
            ),
            5 => {
                let size = if raw { value } else { 1 << (value % 10) };
                w(&mut self.t, reg::QUEUE_NUM, size);
            }
            6 => {
                let which = u64::from(arg % 6);
                let v = match (raw, which % 2) {
                    (true, _) => value,
                    // Aligned, inside guest memory.
                    (false, 0) => (value % 0x1_0000) & !0xf,
                    (false, _) => 0,
                };
                // desc, driver, device ring: low, then high half.
                let offset = reg::QUEUE_DESC_LOW + 0x10 * (which / 2) + 4 * (which % 2);
                w(&mut self.t, offset, v);
            }
            7 => w(
                &mut self.t,
                reg::QUEUE_READY,
                if raw { value } else { value & 1 },
            ),
            8 => w(
                &mut self.t,
                reg::QUEUE_NOTIFY,
                if raw { value } else { value % 4 },
            ),
            9 => w(&mut self.t, reg::INTERRUPT_ACK, value),
            10 | 11 => {
                let width = [1usize, 2, 4, 8][usize::from(arg & 3)];
                let offset = reg::CONFIG + u64::from(arg >> 2);
                let mut buf = [0u8; 8];
                if code % 16 == 10 {
                    self.t.read(offset, &mut buf[..width]);
                } else {
                    buf[..4].copy_from_slice(&value.to_le_bytes());
                    self.t.write(offset, &buf[..width]);
                }
            }
            12 => {
                let offset = u64::from(arg) * 4 % reg::CONFIG;
                let v = r(&mut self.t, offset);
                let fixed = match offset {
                    reg::MAGIC_VALUE => Some(MAGIC_VALUE),
                    reg::VERSION => Some(MMIO_VERSION),
                    reg::DEVICE_ID => Some(crate::devices::virtio::vsock::VIRTIO_ID_VSOCK),
                    reg::VENDOR_ID => Some(VENDOR_ID),
                    _ => None,
                };
                if let Some(fixed) = fixed {
                    assert_eq!(v, fixed, "register {offset:#x}");
                }
            }
            13 => self.bring_up(value),
            14 => w(&mut self.t, reg::DEVICE_FEATURES_SEL, value),
            _ => w(&mut self.t, u64::from(arg) * 4 % reg::CONFIG, value),
        }
        if self.status() & STATUS_DEVICE_NEEDS_RESET != 0 {
            self.refused += 1;
        }
    }
}

/// Bytes of one [`fuzz_lifecycle`] operation.
pub const LIFECYCLE_OP: usize = 6;

/// Runs one input of operations of [`LIFECYCLE_OP`] bytes: code (mod 16:
/// reset, raw status, next handshake step, a feature page, queue select,
/// queue size, a ring address register, queue ready, notify, interrupt
/// ack, config read, config write, register read, whole bring-up, device
/// features select, raw register write), argument (bit 7: raw value
/// instead of a mostly valid one), value (u32, little endian).
pub fn fuzz_lifecycle(data: &[u8]) -> Lifecycle {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LIFECYCLE_MEM)])
        .expect("guest memory");
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irqfd")));
    let activations = Arc::new(AtomicUsize::new(0));
    let dev = Watched {
        inner: Vsock::new(3, socket_path()).expect("vsock device"),
        activations: activations.clone(),
    };
    let t = MmioTransport::new(mem, Box::new(dev), irq.clone()).expect("transport");
    let mut rig = Rig {
        t,
        irq,
        activations,
        refused: 0,
    };
    rig.check("creation");
    // At most 64 operations: each may start or stop a worker thread.
    for (i, op) in data.chunks_exact(LIFECYCLE_OP).take(64).enumerate() {
        let value = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        rig.op(op[0], op[1], value);

        rig.check(&format!("operation {i} ({:?})", &op[..2]));
    }
    // Whatever the guest did, a driver can start the device again.
    rig.bring_up(0x0088_8888);
    rig.check("the final bring-up");
    rig.t.shutdown();
    assert!(!rig.t.device.is_active(), "running after shutdown");
    Lifecycle {
        activations: rig.activations.load(Ordering::Relaxed),
        refused: rig.refused,
    }
}

/// Starting points for [`fuzz_lifecycle`]: a driver's steps one by one with
/// valid queues; a bring-up, then a reset and a second one; queue registers
/// written while ready and after DRIVER_OK; a missing queue, a bad size, a
/// misaligned ring; a failed activation followed by a status write.
pub fn lifecycle_seeds() -> Vec<Vec<u8>> {
    let op = |code: u8, arg: u8, value: u32| {
        let mut o = vec![code, arg];
        o.extend(value.to_le_bytes());
        o
    };
    let queue = |q: u8, size_log2: u32, base: u32| {
        let mut ops = op(4, q, 0);
        ops.extend(op(5, 0, size_log2));
        ops.extend(op(6, 0, base));
        ops.extend(op(6, 2, base + 0x1000));
        ops.extend(op(6, 4, base + 0x2000));
        ops.extend(op(6, 1, 0));
        ops.extend(op(7, 0, 1));
        ops
    };
    let mut steps = op(2, 0, 0);
    steps.extend(op(2, 0, 0));
    steps.extend(op(3, 2, 0));
    steps.extend(op(3, 3, 0));
    steps.extend(op(2, 0, 0));
    for q in 0..3u8 {
        steps.extend(queue(q, 4, u32::from(q) * 0x4000));
    }
    steps.extend(op(2, 0, 0));
    steps.extend(op(8, 0, 1));
    steps.extend(op(10, 0x02, 0));

    let mut twice = op(13, 0, 0x0012_3456);
    twice.extend(op(9, 0, u32::MAX));
    twice.extend(op(0, 0, 0));
    twice.extend(op(13, 0, 0x0088_8888));
    twice.extend(op(5, 0, 3));
    twice.extend(op(7, 0, 0));

    let mut missing = steps[..5 * LIFECYCLE_OP].to_vec();
    for q in 0..2u8 {
        missing.extend(queue(q, 3, u32::from(q) * 0x4000));
    }
    missing.extend(op(2, 0, 0));
    missing.extend(op(1, 0, 0x4f));

    let mut bad = steps[..5 * LIFECYCLE_OP].to_vec();
    bad.extend(queue(0, 3, 0));
    bad.extend(op(5, 0x80, 3));
    // Queue 1's descriptor table misaligned (a raw address: 0x84 % 6 = 0).
    let mut misaligned = queue(1, 3, 0x4000);
    misaligned[2 * LIFECYCLE_OP..3 * LIFECYCLE_OP].copy_from_slice(&op(6, 0x84, 0x4008));
    bad.extend(misaligned);
    bad.extend(queue(2, 3, 0x8000));
    bad.extend(op(4, 0x80, 7));
    bad.extend(op(7, 0, 1));
    bad.extend(op(2, 0, 0));
    bad.extend(op(12, 2, 0));

    vec![steps, twice, missing, bad]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::run_corpus;

    #[test]
    fn register_seeds_corpus_and_random_inputs_hold() {
        run_corpus(
            "mmio_registers",
            &register_seeds(),
            2000,
            200,
            fuzz_registers,
        );
    }

    #[test]
    fn lifecycle_seeds_do_what_they_claim_and_corpus_and_random_inputs_hold() {
        let seeds = lifecycle_seeds();
        let o: Vec<Lifecycle> = seeds.iter().map(|s| fuzz_lifecycle(s)).collect();
        // The driver's own bring-up, then the harness's final one.
        assert_eq!((o[0].activations, o[0].refused), (2, 0), "{:?}", o[0]);
        assert_eq!(o[1].activations, 3, "{:?}", o[1]);
        assert_eq!(
            (o[2].activations, o[2].refused > 0),
            (1, true),
            "{:?}",
            o[2]
        );
        assert_eq!(
            (o[3].activations, o[3].refused > 0),
            (1, true),
            "{:?}",
            o[3]
        );
        run_corpus("mmio_lifecycle", &seeds, 300, 120, |input| {
            fuzz_lifecycle(input);
        });
    }
}
