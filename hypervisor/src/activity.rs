//! Signs of life from a guest: a counter of events the VMM saw (exits it
//! handled, console lines, agent log lines) and the last lines the guest
//! printed. Whoever waits on a guest uses them to tell a slow but healthy
//! boot from a stuck one, and to say what the guest did last when it gives
//! up.
//!
//! The guest writes what these lines say: each is cut to
//! [`MAX_TAIL_LINE`] bytes with control characters escaped, and only the
//! last [`TAIL_LINES`] are kept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::bus::lock;

/// Lines kept for diagnostics.
pub const TAIL_LINES: usize = 12;
/// Bytes kept of each line.
pub const MAX_TAIL_LINE: usize = 240;

/// What a Linux guest's console line says when its kernel panics (the
/// stack trace after it would push it out of the tail).
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// Shared by the VM's devices, the guest log receiver and whoever waits.
#[derive(Debug, Default)]
pub struct GuestActivity {
    events: AtomicU64,
    tail: Mutex<VecDeque<String>>,
    /// The last kernel panic line, kept apart from the tail.
    panic: Mutex<Option<String>>,
}

impl GuestActivity {
    /// Records one sign of life.
    pub fn note(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a line the guest printed (`source` says where: console,
    /// agent), which is also a sign of life.
    pub fn note_line(&self, source: &str, line: &str) {
        self.note();
        let mut kept = format!("{source}: {}", escape(line));
        if kept.len() > MAX_TAIL_LINE {
            let mut cut = MAX_TAIL_LINE;
            while !kept.is_char_boundary(cut) {
                cut -= 1;
            }
            kept.truncate(cut);
            kept.push_str("...");
        }
        if line.contains(PANIC_MARKER) {
            *lock(&self.panic) = Some(kept.clone());
        }
        let mut tail = lock(&self.tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(kept);
    }

    /// The guest kernel's last panic message, if it panicked.
    pub fn panic_line(&self) -> Option<String> {
        lock(&self.panic).clone()
    }

    /// Signs of life so far (only ever grows).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// The last lines the guest printed, oldest first.
    pub fn tail(&self) -> Vec<String> {
        lock(&self.tail).iter().cloned().collect()
    }
}

/// Control characters shown escaped, so a guest cannot forge log lines.
fn escape(line: &str) -> String {
    line.trim_end_matches(['\r', '\n'])
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_bounded_escaped_tail_and_counts() {
        let a = GuestActivity::default();
        a.note();
        for i in 0..TAIL_LINES + 3 {
            a.note_line("console", &format!("line {i}\r\n"));
        }
        assert_eq!(a.events(), 1 + TAIL_LINES as u64 + 3);
        let tail = a.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "console: line 3");
        a.note_line("agent", "forged\nline\u{1b}[2J");
        assert_eq!(a.tail().last().unwrap(), "agent: forged\\nline\\u{1b}[2J");
        a.note_line("agent", &"é".repeat(MAX_TAIL_LINE));
        let long = a.tail().pop().unwrap();
        assert!(
            long.len() <= MAX_TAIL_LINE + 3 && long.ends_with("..."),
            "{long}"
        );
    }

    #[test]
    fn a_panic_line_outlives_the_tail() {
        let a = GuestActivity::default();
        assert_eq!(a.panic_line(), None);
        a.note_line(
            "console",
            "[ 1.0] Kernel panic - not syncing: sysrq triggered crash",
        );
        for i in 0..2 * TAIL_LINES {
            a.note_line("console", &format!(" trace line {i}"));
        }
        assert!(a
            .panic_line()
            .is_some_and(|l| l.ends_with("not syncing: sysrq triggered crash")));
    }
}
