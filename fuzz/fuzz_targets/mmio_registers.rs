//! Register accesses on the virtio-mmio transport: an optional driver
//! prologue with fuzzed values, then arbitrary accesses. The device checks
//! what the transport promises it: only valid queues, only accepted features,
//! never two activations without a reset.
#![no_main]

use std::sync::Arc;

use husk_hypervisor::bus::BusDevice;
use husk_hypervisor::devices::virtio::mmio::MmioTransport;
use husk_hypervisor::devices::virtio::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b11;

struct Checker {
    active: bool,
}

impl VirtioDevice for Checker {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8, 4, 2]
    }
    fn avail_features(&self) -> u64 {
        FEATURES
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
        assert_eq!(ctx.acked_features & !FEATURES, 0);
        assert_ne!(ctx.acked_features & VIRTIO_F_VERSION_1, 0);
        assert!(ctx.queues.len() <= 3);
        for (q, max) in ctx.queues.iter().zip([8u16, 4, 2]) {
            let size = q.queue.size();
            assert!(size.is_power_of_two() && size <= max);
            assert!(q.queue.is_valid(&ctx.mem));
        }
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

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Bytes of the driver prologue: mode, features (8), per queue size and
/// three ring addresses (1 + 3 * 2 bytes).
const PROLOGUE: usize = 1 + 8 + 3 * 7;

/// Brings the device up the way a driver would, with fuzzer-chosen features,
/// queue sizes and ring addresses, so that activation is reached every time.
fn prologue(t: &mut MmioTransport, p: &[u8]) {
    let mode = p[0];
    let features = u64::from_le_bytes(p[1..9].try_into().unwrap());
    w(t, 0x70, 1);
    w(t, 0x70, 3);
    w(t, 0x24, 0);
    w(t, 0x20, features as u32);
    w(t, 0x24, 1);
    w(t, 0x20, (features >> 32) as u32);
    w(t, 0x70, 0xb);
    for (i, q) in p[9..].chunks_exact(7).enumerate() {
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
        w(t, 0x30, i as u32);
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

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(mem, Box::new(Checker { active: false }), irq).unwrap();
    let ops = match data.split_first_chunk::<PROLOGUE>() {
        Some((p, rest)) if p[0] & 1 != 0 => {
            prologue(&mut t, p);
            rest
        }
        _ => data,
    };
    // Then arbitrary accesses, each: op (bit 0: write; bits 1-3: width),
    // offset (2 bytes), value (4 bytes).
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
});
