//! Transport tests: a fake device records what it is started with; the
//! test plays the driver through the registers.

use super::*;
use crate::devices::virtio::test_utils as tu;
use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;
use std::sync::Mutex;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes};

/// A queue as the device got it: (size, desc, avail, used).
type QueueSeen = (u16, u64, u64, u64);

/// What the fake device saw: per activation, the acked features and its queues.
#[derive(Default)]
struct Seen {
    activations: Vec<(u64, Vec<QueueSeen>)>,
    /// Per activation, where each queue starts in its rings.
    next: Vec<Vec<(u16, u16)>>,
    resets: usize,
}

struct FakeDevice {
    seen: Arc<Mutex<Seen>>,
    fail: bool,
}

const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b101;

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = tu::low_byte(offset)
                .wrapping_add(tu::low_byte(u64::try_from(i).unwrap()))
                .wrapping_add(0x10);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Never: the fake takes every activation, and the tests count them.
    fn is_active(&self) -> bool {
        false
    }
    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail {
            return Err(ActivateError::AlreadyActive);
        }
        let queues = ctx
            .queues
            .iter()
            .map(|q| {
                let q = &q.queue;
                (q.size(), q.desc_table(), q.avail_ring(), q.used_ring())
            })
            .collect();
        let next = ctx
            .queues
            .iter()
            .map(|q| (q.queue.next_avail(), q.queue.next_used()))
            .collect();
        let mut seen = self.seen.lock().unwrap();
        seen.activations.push((ctx.acked_features, queues));
        seen.next.push(next);
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
    }
}

struct Rig {
    t: MmioTransport,
    seen: Arc<Mutex<Seen>>,
    irq: Arc<Interrupt>,
    mem: GuestMemoryMmap,
}

fn rig(fail: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let dev = FakeDevice {
        seen: seen.clone(),
        fail,
    };
    let t = MmioTransport::new(mem.clone(), Box::new(dev), irq.clone()).unwrap();
    Rig { t, seen, irq, mem }
}

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0xffu8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w(t, reg::STATUS, STATUS_ACKNOWLEDGE);
    w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, tu::lo32(features));
    w(
        t,
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    r(t, reg::STATUS)
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
    w(t, reg::QUEUE_SEL, index);
    w(t, reg::QUEUE_NUM, size);
    for (low, v) in [
        (reg::QUEUE_DESC_LOW, desc),
        (reg::QUEUE_DRIVER_LOW, avail),
        (reg::QUEUE_DEVICE_LOW, used),
    ] {
        w(t, low, tu::lo32(v));
        w(t, low + 4, (v >> 32) as u32);
    }
    w(t, reg::QUEUE_READY, 1);
}

const FEAT_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

#[test]
fn identifies_itself_and_reads_undefined_registers_as_zero() {
    let Rig { mut t, .. } = rig(false);
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
    assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
    for undefined in [0x018, 0x040, 0x0c0, 0x0f8] {
        assert_eq!(r(&mut t, undefined), 0, "offset {undefined:#x}");
    }
    // Write-only registers read as zero too.
    assert_eq!(r(&mut t, reg::QUEUE_NOTIFY), 0);
    assert_eq!(
        r(&mut t, reg::SHM_LEN_LOW),
        u32::MAX,
        "no shared memory regions"
    );
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
    w(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "missing queue");
    // Registers are 32-bit: other widths and misaligned offsets read as zero.
    let mut two = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    assert_eq!(r(&mut t, reg::MAGIC_VALUE + 1), 0);
    let mut eight = [0xffu8; 8];
    t.read(reg::MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    // The config space takes any width and goes to the device.
    let mut cfg = [0u8; 3];
    t.read(reg::CONFIG + 2, &mut cfg);
    assert_eq!(cfg, [0x12, 0x13, 0x14]);
}

#[test]
fn feature_negotiation_refuses_unknown_or_legacy_drivers() {
    let Rig { mut t, seen, .. } = rig(false);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0b101);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);

    // A feature the device does not offer: FEATURES_OK stays clear.
    let st = negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
    assert_eq!(st, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut t, reg::STATUS, 0);
    // A legacy driver (no VERSION_1) is refused as well.
    let st = negotiate(&mut t, 0b1);
    assert_eq!(st, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut t, reg::STATUS, 0);

    assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100), FEAT_OK);
    // Too late to change features now.
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, 0b1);
    setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.activations.len(), 1);
    assert_eq!(seen.activations[0].0, VIRTIO_F_VERSION_1 | 0b100);
}

#[test]
fn driver_ok_activates_the_device_with_the_configured_queues() {
    let Rig {
        mut t, seen, mem, ..
    } = rig(false);
    assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1), FEAT_OK);
    // Lay the rings out the way a driver would, with the mock driver's layout.
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 4);
    setup_queue(
        &mut t,
        0,
        16,
        q0.desc_table_addr().0,
        q0.avail_addr().0,
        q0.used_addr().0,
    );
    setup_queue(
        &mut t,
        1,
        4,
        q1.desc_table_addr().0,
        q1.avail_addr().0,
        q1.used_addr().0,
    );
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    assert_eq!(r(&mut t, reg::STATUS), FEAT_OK | STATUS_DRIVER_OK);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.activations.len(), 1);
        let queues = &seen.activations[0].1;
        assert_eq!(
            queues,
            &vec![
                (
                    16,
                    q0.desc_table_addr().0,
                    q0.avail_addr().0,
                    q0.used_addr().0
                ),
                (
                    4,
                    q1.desc_table_addr().0,
                    q1.avail_addr().0,
                    q1.used_addr().0
                ),
            ]
        );
    }
    // Queue setup is over: later writes are ignored.
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    // Rewriting the same status does not activate twice.
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    assert_eq!(seen.lock().unwrap().activations.len(), 1);

    // A QueueNotify that reaches user space kicks that queue's eventfd.
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    assert!(
        t.queue_events()[0].read().is_err(),
        "queue 0 was not kicked"
    );
    w(&mut t, reg::QUEUE_NOTIFY, 9);
    assert!(t.queue_events()[0].read().is_err());
    assert!(t.queue_events()[1].read().is_err());
}

#[test]
fn high_address_halves_are_assembled_and_checked_against_memory() {
    let Rig { mut t, irq, .. } = rig(false);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    // The high half puts the descriptor table at 4 GiB + 0x1000: outside guest memory.
    setup_queue(&mut t, 0, 16, (1 << 32) | 0x1000, 0x2000, 0x3000);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    let st = r(&mut t, reg::STATUS);
    assert_ne!(st & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_ne!(irq.status() & super::super::VIRTIO_MMIO_INT_CONFIG, 0);
    assert_eq!(irq.irqfd().read().unwrap(), 1);
}

fn assert_activation_fails(configure: impl FnOnce(&mut MmioTransport)) {
    let Rig {
        mut t, seen, irq, ..
    } = rig(false);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    configure(&mut t);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    assert_ne!(r(&mut t, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
    assert!(seen.lock().unwrap().activations.is_empty());
    // The driver acknowledges and resets; the device is usable again.
    w(&mut t, reg::INTERRUPT_ACK, 2);
    assert_eq!(irq.status(), 0);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn invalid_queues_fail_activation_with_needs_reset() {
    // Not a power of two.
    assert_activation_fails(|t| setup_queue(t, 0, 3, 0x1000, 0x2000, 0x3000));
    // Above the maximum.
    assert_activation_fails(|t| setup_queue(t, 1, 16, 0x1000, 0x2000, 0x3000));
    // Zero.
    assert_activation_fails(|t| setup_queue(t, 0, 0, 0x1000, 0x2000, 0x3000));
    // Misaligned descriptor table (16-byte alignment) and used ring (4).
    assert_activation_fails(|t| setup_queue(t, 0, 16, 0x1008, 0x2000, 0x3000));
    assert_activation_fails(|t| setup_queue(t, 0, 16, 0x1000, 0x2000, 0x3002));
    // Used ring runs past the end of memory.
    assert_activation_fails(|t| setup_queue(t, 0, 16, 0x1000, 0x2000, 0xf_fff0));
    // Queue 1 ready, queue 0 not: cannot be expressed to the device.
    assert_activation_fails(|t| setup_queue(t, 1, 8, 0x1000, 0x2000, 0x3000));
}

#[test]
fn a_device_that_fails_to_start_sets_needs_reset() {
    let Rig { mut t, irq, .. } = rig(true);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    assert_ne!(r(&mut t, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(irq.irqfd().read().unwrap(), 1);
}

#[test]
fn status_zero_resets_device_and_transport() {
    let Rig {
        mut t, seen, irq, ..
    } = rig(false);
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
    setup_queue(&mut t, 0, 8, 0x1000, 0x2000, 0x3000);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    irq.signal_used_queue().unwrap();
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);

    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert!(t.queue_events()[0].read().is_err(), "stale kick dropped");
    assert_eq!(seen.lock().unwrap().resets, 1);

    // A fresh negotiation and activation work, with fresh values.
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x4000, 0x5000, 0x6000);
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.activations.len(), 2);
    assert_eq!(seen.activations[1].0, VIRTIO_F_VERSION_1);
    assert_eq!(seen.activations[1].1, vec![(16, 0x4000, 0x5000, 0x6000)]);
}

#[test]
fn out_of_order_status_and_misplaced_writes_are_ignored() {
    let Rig { mut t, seen, .. } = rig(false);
    // DRIVER before ACKNOWLEDGE; DRIVER_OK before FEATURES_OK.
    w(&mut t, reg::STATUS, STATUS_DRIVER);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
    w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Queue registers before FEATURES_OK are ignored.
    setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    w(
        &mut t,
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(r(&mut t, reg::STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Clearing bits without a reset is refused.
    w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
    assert_eq!(r(&mut t, reg::STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Narrow and misaligned register writes are ignored.
    t.write(
        reg::STATUS,
        &[u8::try_from(STATUS_FEATURES_OK | 3).unwrap()],
    );
    t.write(reg::STATUS, &u64::from(FEAT_OK).to_le_bytes());
    t.write(reg::STATUS + 2, &FEAT_OK.to_le_bytes());
    assert_eq!(r(&mut t, reg::STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // FAILED is always accepted; nothing was activated.
    w(&mut t, reg::STATUS, STATUS_FAILED);
    assert_ne!(r(&mut t, reg::STATUS) & STATUS_FAILED, 0);
    assert!(seen.lock().unwrap().activations.is_empty());
}

#[test]
fn arbitrary_accesses_never_panic() {
    let Rig { mut t, .. } = rig(false);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = (x >> 8) % 0x140;
        let len = [0usize, 1, 2, 3, 4, 8][(x % 6) as usize];
        let bytes = x.to_le_bytes();
        if x & 0x100 != 0 {
            t.write(offset, &bytes[..len]);
        } else {
            let mut buf = vec![0u8; len];
            t.read(offset, &mut buf);
        }
    }
    t.shutdown();
}

#[test]
fn a_saved_transport_restores_onto_a_new_one_where_its_rings_stood() {
    let Rig {
        mut t,
        seen,
        mem,
        irq,
    } = rig(false);
    assert_eq!(negotiate(&mut t, FAKE_FEATURES), FEAT_OK);
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 8);
    for (index, q, size) in [(0, &q0, 16), (1, &q1, 8)] {
        setup_queue(
            &mut t,
            index,
            size,
            q.desc_table_addr().0,
            q.avail_addr().0,
            q.used_addr().0,
        );
    }
    w(&mut t, reg::STATUS, FEAT_OK | STATUS_DRIVER_OK);
    // The device used 5 chains of queue 0 and 2 of queue 1 (wrapping is
    // the ring's business, not the transport's).
    mem.write_obj(5u16.to_le(), q0.used_addr().unchecked_add(2))
        .unwrap();
    mem.write_obj(2u16.to_le(), q1.used_addr().unchecked_add(2))
        .unwrap();
    irq.signal_used_queue().unwrap();
    let state = t.save();
    assert_eq!(seen.lock().unwrap().resets, 1, "the device was stopped");
    assert_eq!(state.device_type, 42);
    assert_eq!(state.driver_features, FAKE_FEATURES);
    assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
    let next: Vec<u16> = state.queues.iter().map(|q| q.next_index).collect();
    assert_eq!(next, vec![5, 2]);

    let restored = rig(false);
    let mut t2 = restored.t;
    t2.restore(&state).unwrap();
    assert_eq!(r(&mut t2, reg::STATUS), FEAT_OK | STATUS_DRIVER_OK);
    assert_eq!(r(&mut t2, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    let seen2 = restored.seen.lock().unwrap();
    assert_eq!(seen2.activations.len(), 1, "the device was started again");
    assert_eq!(seen2.activations[0].0, FAKE_FEATURES);
    assert_eq!(
        seen2.activations[0].1,
        seen.lock().unwrap().activations[0].1
    );
    assert_eq!(seen2.next[0], vec![(5, 5), (2, 2)]);
}

#[test]
fn a_saved_state_that_does_not_fit_the_device_is_refused_untouched() {
    let Rig { mut t, .. } = rig(false);
    assert_eq!(negotiate(&mut t, FAKE_FEATURES), FEAT_OK);
    let good = t.save();
    let mut wrong_type = good.clone();
    wrong_type.device_type = 19;
    let mut extra_queue = good.clone();
    extra_queue.queues.push(extra_queue.queues[0]);
    let mut unknown_features = good.clone();
    unknown_features.driver_features |= 1 << 40;
    let mut oversized = good.clone();
    oversized.queues[1].size = 64;
    for (state, says) in [
        (wrong_type, "device type"),
        (extra_queue, "queues"),
        (unknown_features, "features"),
        (oversized, "queue 1"),
    ] {
        let Rig {
            t: mut fresh, seen, ..
        } = rig(false);
        let e = fresh.restore(&state).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert_eq!(r(&mut fresh, reg::STATUS), 0, "nothing changed");
        assert!(seen.lock().unwrap().activations.is_empty());
    }
    // Saved before DRIVER_OK: restored, not started.
    let Rig {
        t: mut fresh, seen, ..
    } = rig(false);
    fresh.restore(&good).unwrap();
    assert_eq!(r(&mut fresh, reg::STATUS), FEAT_OK);
    assert!(seen.lock().unwrap().activations.is_empty());
}
