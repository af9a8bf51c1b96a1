//! A sampling profile of the guest: where its vCPUs spend their time. A
//! developer's tool, off unless asked for (the shim's `HUSK_GUEST_PROFILE`).
//!
//! Each sample kicks the vCPUs out of KVM_RUN ([`crate::vcpu::VcpuSampler`])
//! and keeps where each one was: its instruction pointer, whether it ran
//! user code, and for kernel code the words on its kernel stack that look
//! like kernel text addresses. That is a guessing unwinder (the guest kernel
//! is built without frame pointers): the callers are the return addresses
//! left on the stack, with the odd stale one. `scripts/guest-profile.py`
//! names them with the guest vmlinux's symbols.
//!
//! The stack is found through the kernel's direct map: husk's guest kernel
//! has neither vmapped stacks nor a randomised memory layout, so a stack
//! address minus `PAGE_OFFSET` is its guest-physical address. Everything
//! read is guest-controlled: reads go through vm-memory's bounds checks, the
//! values are only filtered and written out, never followed.

use std::io::Write;
use std::ops::Range;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Time between samples. Each one stops every vCPU briefly; this keeps a
/// guest running ~99 % of the time on a nested host.
pub const INTERVAL: Duration = Duration::from_millis(3);
/// How long a sample waits for the vCPUs to answer.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_millis(50);

/// x86-64's direct map of all physical memory (4-level paging, no KASLR).
const DIRECT_MAP: Range<u64> = 0xffff_8880_0000_0000..0xffff_c880_0000_0000;
/// Where the kernel image is mapped.
const KERNEL_TEXT: Range<u64> = 0xffff_ffff_8000_0000..0xffff_ffff_c000_0000;
/// Kernel (and IRQ) stacks are this large and aligned to it.
const STACK_SIZE: u64 = 16 << 10;
/// Frames kept per sample: enough to reach the syscall or interrupt entry.
const MAX_FRAMES: usize = 48;

/// Where one vCPU was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSample {
    pub rip: u64,
    pub user_mode: bool,
    /// Kernel text addresses on the kernel stack, innermost first.
    pub callers: Vec<u64>,
}

impl std::fmt::Display for ProfileSample {
    /// `<rip> <0|1 user> <caller>,<caller>,...` in hex: one line of a
    /// profile file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x} {}", self.rip, u8::from(self.user_mode))?;
        for (i, caller) in self.callers.iter().enumerate() {
            write!(f, "{}{caller:x}", if i == 0 { " " } else { "," })?;
        }
        Ok(())
    }
}

/// Writes what `sample` returns to `out`, one line per vCPU sample, every
/// [`INTERVAL`], until it returns `None` (the VM is gone or the caller is
/// done).
pub fn record(
    out: &mut impl Write,
    mut sample: impl FnMut() -> Option<Vec<ProfileSample>>,
) -> std::io::Result<()> {
    while let Some(samples) = sample() {
        for s in samples {
            writeln!(out, "{s}")?;
        }
        std::thread::sleep(INTERVAL);
    }
    out.flush()
}

/// The kernel text addresses on the stack from `rsp` to the stack's end.
pub fn kernel_callers(mem: &GuestMemoryMmap, rsp: u64) -> Vec<u64> {
    let mut callers = Vec::new();
    if !DIRECT_MAP.contains(&rsp) {
        return callers;
    }
    let start = (rsp - DIRECT_MAP.start) & !7;
    let end = (start | (STACK_SIZE - 1)) + 1;
    let mut at = start;
    while at < end && callers.len() < MAX_FRAMES {
        match mem.read_obj::<u64>(GuestAddress(at)) {
            Ok(word) if KERNEL_TEXT.contains(&word) => callers.push(word),
            Ok(_) => {}
            Err(_) => break,
        }
        at += 8;
    }
    callers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn callers_are_the_text_addresses_up_to_the_end_of_the_stack() {
        let mem = memory();
        // A stack page at guest-physical 0x4000; rsp points 16 bytes before
        // its end.
        mem.write_obj(0xffff_ffff_8123_4567u64, GuestAddress(0x7ff0))
            .unwrap();
        mem.write_obj(0x1234u64, GuestAddress(0x7ff8)).unwrap();
        // Past the stack's end: not read.
        mem.write_obj(0xffff_ffff_8100_0000u64, GuestAddress(0x8000))
            .unwrap();
        let callers = kernel_callers(&mem, DIRECT_MAP.start + 0x7ff0);
        assert_eq!(callers, vec![0xffff_ffff_8123_4567]);
    }

    #[test]
    fn a_stack_pointer_outside_the_direct_map_or_guest_memory_yields_nothing() {
        let mem = memory();
        assert!(kernel_callers(&mem, 0x7ff0).is_empty());
        assert!(kernel_callers(&mem, u64::MAX).is_empty());
        assert!(kernel_callers(&mem, DIRECT_MAP.start + 0x100_0000).is_empty());
    }

    #[test]
    fn recording_writes_each_sample_until_the_source_ends() {
        let mut rounds = 0;
        let mut out = Vec::new();
        record(&mut out, || {
            rounds += 1;
            (rounds <= 2).then(|| {
                vec![ProfileSample {
                    rip: rounds,
                    user_mode: true,
                    callers: vec![],
                }]
            })
        })
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "1 1\n2 1\n");
    }

    #[test]
    fn a_sample_is_one_line_of_hex() {
        let sample = ProfileSample {
            rip: 0xffff_ffff_8100_0010,
            user_mode: false,
            callers: vec![0xffff_ffff_8100_0020, 0xffff_ffff_8100_0030],
        };
        assert_eq!(
            sample.to_string(),
            "ffffffff81000010 0 ffffffff81000020,ffffffff81000030"
        );
        let user = ProfileSample {
            rip: 0x40_1000,
            user_mode: true,
            callers: vec![],
        };
        assert_eq!(user.to_string(), "401000 1");
    }
}
