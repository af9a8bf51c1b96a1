//! COM1 (16550A via vm-superio) with its output going to a console sink.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::activity::GuestActivity;
use crate::bus::BusDevice;
use crate::rate_limit::TokenBucket;

/// Where the guest console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// Dropped.
    #[default]
    Discard,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Re-emitted line by line through `tracing` (target `husk::console`).
    Log,
}

/// Raises the serial interrupt through an irqfd.
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Longest line kept before it is emitted anyway: the guest decides what it
/// prints, so the buffer must not grow with it.
pub const MAX_LINE: usize = 4096;

/// Line-buffers console bytes. vm-superio flushes after every byte; writing
/// per line keeps host syscalls (and log records) per line instead. Every
/// line also goes to the VM's [`GuestActivity`], whatever the target.
///
/// The guest decides how much it prints: lines pass a token bucket
/// ([`CONSOLE_LINES_PER_SEC`], bursts of [`CONSOLE_BURST`]); what it drops
/// is counted and noted in the output once the guest is quiet again.
pub struct ConsoleSink {
    target: SinkTarget,
    line: Vec<u8>,
    activity: Arc<GuestActivity>,
    budget: TokenBucket,
}

/// Console lines per second a guest may put into the host's log or file.
pub const CONSOLE_LINES_PER_SEC: f64 = 50.0;
/// Lines a guest may print at once after a quiet spell (a boot's worth).
pub const CONSOLE_BURST: f64 = 500.0;

enum SinkTarget {
    Discard,
    /// A console file, or (fuzzing, tests) any writer.
    File(Box<dyn Write + Send>),
    Log,
}

impl ConsoleSink {
    pub fn open(output: &ConsoleOutput, activity: Arc<GuestActivity>) -> io::Result<Self> {
        let target = match output {
            ConsoleOutput::Discard => SinkTarget::Discard,
            ConsoleOutput::File(path) => SinkTarget::File(Box::new(
                File::options().create(true).append(true).open(path)?,
            )),
            ConsoleOutput::Log => SinkTarget::Log,
        };
        Ok(Self::with_target(target, activity))
    }

    /// A sink writing what a console file would get into `out` (the fuzz
    /// harness reads it back).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn to_writer(out: Box<dyn Write + Send>, activity: Arc<GuestActivity>) -> Self {
        Self::with_target(SinkTarget::File(out), activity)
    }

    fn with_target(target: SinkTarget, activity: Arc<GuestActivity>) -> Self {
        Self {
            target,
            line: Vec::new(),
            activity,
            budget: TokenBucket::new(CONSOLE_LINES_PER_SEC, CONSOLE_BURST),
        }
    }

    fn emit_line(&mut self) {
        self.activity
            .note_line("console", &String::from_utf8_lossy(&self.line));
        if !self.budget.take_at(std::time::Instant::now()) {
            self.line.clear();
            return;
        }
        let dropped = self.budget.take_dropped();
        if dropped > 0 {
            let note =
                format!("husk: {dropped} console lines dropped (over {CONSOLE_LINES_PER_SEC}/s)\n");
            let line = std::mem::replace(&mut self.line, note.into_bytes());
            self.write_target();
            self.line = line;
        }
        self.write_target();
    }

    fn write_target(&mut self) {
        match &mut self.target {
            SinkTarget::Discard => {}
            SinkTarget::File(f) => {
                if let Err(e) = f.write_all(&self.line) {
                    tracing::warn!("console file write failed: {e}");
                }
            }
            SinkTarget::Log => {
                let text = String::from_utf8_lossy(&self.line);
                let text = text.trim_end_matches(['\r', '\n']);
                if !text.is_empty() {
                    tracing::info!(target: "husk::console", "{text}");
                }
            }
        }
        self.line.clear();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit_line();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit_line();
        }
    }
}

/// COM1 on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqfdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialDevice {
    pub fn new(irqfd: EventFd, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(IrqfdTrigger(irqfd), sink),
        }
    }

    /// COM1 as a snapshot left it (registers and unread input).
    pub fn from_state(
        irqfd: EventFd,
        sink: ConsoleSink,
        state: &SerialRegisters,
    ) -> io::Result<Self> {
        let registers = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            // Nothing ever writes to the guest's console input.
            in_buffer: Vec::new(),
        };
        let trigger = IrqfdTrigger(irqfd);
        Serial::from_state(&registers, trigger, vm_superio::serial::NoEvents, sink)
            .map(|serial| Self { serial })
            .map_err(|e| io::Error::other(format!("cannot restore COM1: {e:?}")))
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> SerialRegisters {
        let s = self.serial.state();
        SerialRegisters {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
        }
    }
}

/// The 16550A's registers as a snapshot keeps them (vm-superio's
/// `SerialState` has no serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.serial.write(offset, value) {
                tracing::warn!("serial write failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_file_gets_whole_lines_and_bounded_ones() {
        let path = std::env::temp_dir().join(format!("husk-console-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let activity = Arc::new(GuestActivity::default());
            let sink =
                ConsoleSink::open(&ConsoleOutput::File(path.clone()), activity.clone()).unwrap();
            let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), sink);
            for b in b"hello\npartial" {
                dev.write(0, &[*b]);
            }
            assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
            for _ in 0..MAX_LINE + 10 {
                dev.write(0, b"x");
            }
            assert_eq!(std::fs::read(&path).unwrap().len(), 6 + MAX_LINE);
            assert_eq!(activity.events(), 2, "each line is a sign of life");
            assert_eq!(activity.tail()[0], "console: hello");
        }
        // Drop flushes the partial line.
        assert_eq!(std::fs::read(&path).unwrap().len(), 6 + MAX_LINE + 17);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_flooding_guest_gets_its_burst_then_the_rate() {
        let path = std::env::temp_dir().join(format!("husk-flood-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let sink =
                ConsoleSink::open(&ConsoleOutput::File(path.clone()), Arc::default()).unwrap();
            let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), sink);
            for _ in 0..5000 {
                for b in b"flood\n" {
                    dev.write(0, &[*b]);
                }
            }
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let kept = text.lines().filter(|l| *l == "flood").count();
        // The burst, and what the rate refilled while the loop ran.
        let kept = f64::from(u32::try_from(kept).unwrap());
        assert!(
            (CONSOLE_BURST..CONSOLE_BURST + 100.0).contains(&kept),
            "{kept} lines kept"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let sink = ConsoleSink::open(&ConsoleOutput::Discard, Arc::default()).unwrap();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), sink);
        dev.write(1000, &[1]);
        dev.write(0, &[]);
        let mut empty = [];
        dev.read(0, &mut empty);
        let mut wide = [0xffu8; 4];
        dev.read(5, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
    }
}
