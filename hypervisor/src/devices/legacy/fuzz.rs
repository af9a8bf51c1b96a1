//! Fuzzing entry point (built for `cargo fuzz` and unit tests only): a
//! guest's port accesses to COM1, checked against a model of what the guest
//! can make the host do with them.
//!
//! What it asserts, for any sequence of reads and writes:
//! - no panic, and a read fills only its first byte (the rest reads 0);
//! - the console gets exactly the bytes the guest wrote to the transmit
//!   register (offset 0, DLAB clear, not in loopback), cut into lines of at
//!   most [`MAX_LINE`] bytes, each line either kept or dropped by the rate
//!   limit, and every run of dropped lines announced, with its exact count,
//!   before the next line that is kept;
//! - no more lines kept than the token bucket allows for the time the input
//!   took, and every line (kept or not) counted as a sign of life, the
//!   activity tail bounded and free of control characters;
//! - in loopback mode, what the guest reads back from the receive register
//!   is what it wrote (at most the 64-byte FIFO), and 0 when that is empty.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::serial::{ConsoleSink, SerialDevice, CONSOLE_BURST, CONSOLE_LINES_PER_SEC, MAX_LINE};
use crate::activity::{GuestActivity, MAX_TAIL_LINE, TAIL_LINES};
use crate::bus::BusDevice;

/// 16550 register offsets and bits the model follows.
const DATA: u8 = 0;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
const FIFO_SIZE: usize = 64;

/// Bytes of one operation in the input.
pub const OP_LEN: usize = 3;

/// What the console sink wrote, shared with the harness.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::bus::lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one input did (lets the unit tests check the seeds do what they claim).
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes the guest transmitted (what the console should see).
    pub transmitted: usize,
    /// Console lines they make.
    pub lines: usize,
    /// Of those, dropped by the rate limit.
    pub dropped: usize,
    /// Bytes read back in loopback mode.
    pub looped_back: usize,
}

/// Runs one input: operations of [`OP_LEN`] bytes each:
/// - byte 0: bit 0 write (else read); bits 1-2 access width (1, 1, 2, 0
///   bytes); bits 3-7 `r`: the access is repeated `1 + 4 r²` times (so that
///   short inputs can print long lines and many of them);
/// - byte 1: the port offset, mod 16 (COM1 has 8 ports: beyond is ignored);
/// - byte 2: the value written.
pub fn fuzz_serial(data: &[u8]) -> Outcome {
    let captured = Captured::default();
    let activity = Arc::new(GuestActivity::default());
    let sink = ConsoleSink::to_writer(Box::new(captured.clone()), activity.clone());
    let irq = EventFd::new(EFD_NONBLOCK).expect("irq eventfd");
    let mut dev = SerialDevice::new(irq, sink);
    let started = Instant::now();

    let mut model = Model::default();
    for op in data.chunks_exact(OP_LEN) {
        let write = op[0] & 1 != 0;
        let width = [1usize, 1, 2, 0][usize::from((op[0] >> 1) & 3)];
        let r = usize::from(op[0] >> 3);
        let offset = op[1] % 16;
        for _ in 0..1 + 4 * r * r {
            if write {
                let buf = [op[2], 0xaa];
                dev.write(u64::from(offset), &buf[..width]);
                if width > 0 {
                    model.write(offset, op[2]);
                }
            } else {
                let mut buf = [0xffu8; 2];
                dev.read(u64::from(offset), &mut buf[..width]);
                if width > 1 {
                    assert_eq!(buf[1], 0, "read of width {width} at {offset}");
                }
                if width > 0 {
                    if let Some(expected) = model.read(offset) {
                        assert_eq!(buf[0], expected, "loopback byte read back");
                    }
                }
            }
        }
    }
    // Dropping the device flushes the last, unfinished line.
    drop(dev);
    let elapsed = started.elapsed().as_secs_f64();
    let out = crate::bus::lock(&captured.0).clone();

    let lines = split_lines(&model.transmitted);
    assert_eq!(
        activity.events(),
        u64::try_from(lines.len()).expect("line count"),
        "every console line is a sign of life"
    );
    let tail = activity.tail();
    assert!(tail.len() <= TAIL_LINES);
    for line in &tail {
        assert!(line.len() <= MAX_TAIL_LINE + 3, "{} bytes", line.len());
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }
    let dropped = check_output(&lines, &out);
    let kept = lines.len() - dropped;
    let allowed = CONSOLE_BURST + CONSOLE_LINES_PER_SEC * elapsed + 1.0;
    assert!(
        f64::from(u32::try_from(kept).unwrap_or(u32::MAX)) <= allowed,
        "{kept} lines kept in {elapsed} s"
    );
    Outcome {
        transmitted: model.transmitted.len(),
        lines: lines.len(),
        dropped,
        looped_back: model.looped_back,
    }
}

/// The registers that decide where a byte goes, and the loopback FIFO.
#[derive(Default)]
struct Model {
    lcr: u8,
    mcr: u8,
    fifo: VecDeque<u8>,
    transmitted: Vec<u8>,
    looped_back: usize,
}

impl Model {
    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn write(&mut self, offset: u8, value: u8) {
        match offset {
            DATA if self.dlab() => {}
            DATA if self.mcr & MCR_LOOP == 0 => self.transmitted.push(value),
            // Loopback: into the receive FIFO while it has room, else lost.
            DATA if self.fifo.len() < FIFO_SIZE => self.fifo.push_back(value),
            LCR => self.lcr = value,
            MCR => self.mcr = value,
            _ => {}
        }
    }

    /// The byte a read must return, where the model knows it.
    fn read(&mut self, offset: u8) -> Option<u8> {
        if offset != DATA || self.dlab() {
            return None;
        }
        let byte = self.fifo.pop_front();
        self.looped_back += usize::from(byte.is_some());
        Some(byte.unwrap_or(0))
    }
}

/// The console's lines: cut after each newline and at [`MAX_LINE`] bytes;
/// the last one may be unfinished.
fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' || i + 1 - start == MAX_LINE {
            lines.push(&bytes[start..=i]);
            start = i + 1;
        }
    }
    if start < bytes.len() {
        lines.push(&bytes[start..]);
    }
    lines
}

fn note(dropped: usize) -> Vec<u8> {
    format!("husk: {dropped} console lines dropped (over {CONSOLE_LINES_PER_SEC}/s)\n").into_bytes()
}

/// Checks that `out` is `lines` with some dropped, each run of dropped lines
/// announced before the next kept line. Returns how many were dropped.
///
/// A guest line that itself looks like an announcement would make the
/// check ambiguous: with one of those, only the count bounds are checked.
fn check_output(lines: &[&[u8]], out: &[u8]) -> usize {
    let total: usize = lines.iter().map(|l| l.len()).sum();
    if lines.iter().any(|l| l.starts_with(b"husk: ")) {
        assert!(out.len() <= total + lines.len() * note(usize::MAX).len());
        return 0;
    }
    let mut pos = 0;
    let mut pending = 0;
    let mut dropped = 0;
    for line in lines {
        let rest = &out[pos..];
        if pending == 0 && rest.starts_with(line) {
            pos += line.len();
            continue;
        }
        if pending > 0 {
            let note = note(pending);
            if rest.starts_with(&note) && rest[note.len()..].starts_with(line) {
                pos += note.len() + line.len();
                pending = 0;
                continue;
            }
        }
        pending += 1;
        dropped += 1;
    }
    assert_eq!(
        pos,
        out.len(),
        "console output is not the guest's lines (some dropped, drops announced): \
         {} bytes unexplained",
        out.len() - pos
    );
    dropped
}

/// Hand-made starting points: a boot banner, loopback and DLAB games, a
/// line longer than [`MAX_LINE`], a flood past the burst.
pub fn seeds() -> Vec<Vec<u8>> {
    let w = |offset: u8, value: u8| [1u8, offset, value];
    let text = |s: &str| s.bytes().flat_map(|b| w(DATA, b)).collect::<Vec<u8>>();
    let mut banner = text("Linux version 6.1\r\n");
    banner.extend(text("husk-agent: ready\n"));
    banner.extend([0, 5, 0, 0, 2, 0]); // LSR, IIR reads
    let mut loopback = Vec::new();
    loopback.extend(w(MCR, MCR_LOOP));
    loopback.extend(text("echo"));
    loopback.extend([0, DATA, 0, 0, DATA, 0, 0, DATA, 0, 0, DATA, 0, 0, DATA, 0]);
    loopback.extend(w(MCR, 0));
    loopback.extend(text("out\n"));
    let mut dlab = w(LCR, LCR_DLAB).to_vec();
    dlab.extend(w(DATA, 0x0c));
    dlab.extend(w(1, 0));
    dlab.extend([0, DATA, 0, 0, 1, 0]);
    dlab.extend(w(LCR, 0x03));
    dlab.extend(text("8n1\n"));
    // 2 * (1 + 4 * 23²) = 4234 'x': past MAX_LINE, then a newline.
    let mut long = vec![1 | (23 << 3), DATA, b'x', 1 | (23 << 3), DATA, b'x'];
    long.extend(text("\n"));
    // 1 + 4 * 13² = 677 newlines: over the burst of 500.
    let mut flood = text("start\n");
    flood.extend([1 | (13 << 3), DATA, b'\n']);
    flood.extend(text("after\n"));
    let mut odd = vec![3, 7, 1, 5, 2, 9, 7, 15, 0xff, 6, 15, 0];
    odd.extend(text("\x1b[2J\x07bell"));
    vec![banner, loopback, dlab, long, flood, odd]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_do_what_they_claim_and_corpus_and_random_inputs_hold() {
        let seeds = seeds();
        let o: Vec<Outcome> = seeds.iter().map(|s| fuzz_serial(s)).collect();
        assert_eq!((o[0].lines, o[0].dropped), (2, 0), "{:?}", o[0]);
        assert_eq!((o[1].looped_back, o[1].lines), (4, 1), "{:?}", o[1]);
        assert_eq!(o[2].transmitted, 4, "{:?}", o[2]);
        assert_eq!(o[3].lines, 2, "{:?}", o[3]);
        assert!(o[4].dropped >= 100, "{:?}", o[4]);
        crate::devices::virtio::test_utils::run_corpus("serial", &seeds, 3000, 96, |input| {
            fuzz_serial(input);
        });
    }
}
