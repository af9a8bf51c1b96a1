//! Receives the agent's log stream (guest → host port 1025) and re-emits it
//! through `tracing` on the host.
//!
//! The guest is untrusted: lines are bounded ([`MAX_LINE_LEN`]; longer ones
//! are split and the pieces keep the first piece's level and target), bytes
//! that are not UTF-8 are replaced, and control characters are shown
//! escaped so a guest cannot forge or garble host log lines. Memory use is
//! one line buffer, whatever the guest sends.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use husk_protocol::logline::{self, LogLevel};
use husk_protocol::LOG_VSOCK_PORT;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::Level;

use crate::connect::host_port_path;

/// Longest line re-emitted as one event, in bytes; longer lines are split.
pub const MAX_LINE_LEN: usize = 8 * 1024;
const READ_CHUNK: usize = 4096;

/// One line of the guest's log, as re-emitted on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLogLine {
    pub level: Level,
    /// The guest-side `tracing` target (e.g. `husk_agent::init`).
    pub target: String,
    /// The message, with control characters escaped.
    pub message: String,
}

pub(crate) type Sink = Box<dyn FnMut(&GuestLogLine) + Send>;

/// Serves `<uds>_1025` on a background thread while alive; dropping it stops
/// the thread and removes the socket.
pub struct GuestLogReceiver {
    path: PathBuf,
    /// Closing our end wakes the thread's `poll` to make it exit.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl GuestLogReceiver {
    /// Binds `<uds>_1025` and re-emits every guest line through `tracing`
    /// (target `husk::guest`, the guest's level, field `guest_target`).
    ///
    /// The subscriber and span current at this call are used on the
    /// receiver's thread, so lines land where the caller's own logs go.
    pub fn bind(uds: &Path) -> io::Result<Self> {
        Self::bind_with_sink(uds, |_| {})
    }

    /// Like [`bind`](Self::bind), and also hands every line to `sink` (on the
    /// receiver's thread, after it went to `tracing`).
    pub fn bind_with_sink(
        uds: &Path,
        sink: impl FnMut(&GuestLogLine) + Send + 'static,
    ) -> io::Result<Self> {
        Self::bind_confined(uds, sink, || Ok(()))
    }

    /// Like [`bind_with_sink`](Self::bind_with_sink); the receiver's thread
    /// first runs `confine` (the VMM's seccomp filter for it) and serves
    /// nothing, logging why, if that fails.
    pub fn bind_confined(
        uds: &Path,
        sink: impl FnMut(&GuestLogLine) + Send + 'static,
        confine: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<Self> {
        let path = host_port_path(uds, LOG_VSOCK_PORT);
        let listener = bind_replacing_stale(&path)?;
        listener.set_nonblocking(true)?;
        let (stop, stop_rx) = UnixStream::pair()?;
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let span = tracing::Span::current();
        let sink: Sink = Box::new(sink);
        let thread = std::thread::Builder::new()
            .name("husk-guest-log".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let _entered = span.enter();
                    if let Err(e) = confine() {
                        tracing::error!("guest log receiver not serving: {e}");
                        return;
                    }
                    serve(&listener, &stop_rx, sink);
                })
            });
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(GuestLogReceiver {
            path,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The socket the guest's connections arrive on (`<uds>_1025`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for GuestLogReceiver {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path`, replacing a socket file nobody listens on any more (left by
/// a crashed run); a live listener is an error.
fn bind_replacing_stale(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => match UnixStream::connect(path) {
            Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
                UnixListener::bind(path)
            }
            _ => Err(e),
        },
        other => other,
    }
}

enum Wake {
    Ready,
    Stop,
}

/// Waits until `fd` is readable (or hung up) or the stop socket closes.
fn wait(stop: &UnixStream, fd: impl AsFd) -> Wake {
    let mut fds = [
        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        PollFd::new(fd.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, PollTimeout::NONE) {
        // Any event on `stop` (data, hang-up, error) means stop.
        Ok(_) if fds[0].any().unwrap_or(true) => Wake::Stop,
        Ok(_) => Wake::Ready,
        Err(nix::errno::Errno::EINTR) => Wake::Ready,
        Err(e) => {
            tracing::error!("guest log receiver: poll failed: {e}");
            Wake::Stop
        }
    }
}

/// One guest connection at a time; later ones wait in the backlog.
fn serve(listener: &UnixListener, stop: &UnixStream, mut sink: Sink) {
    loop {
        if let Wake::Stop = wait(stop, listener) {
            return;
        }
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // e.g. EMFILE: do not spin on a listener that stays readable.
                tracing::warn!("guest log receiver: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let stopped = read_lines(&conn, stop, &mut sink);
        if stopped {
            return;
        }
    }
}

/// Reads `conn` to its end; true if asked to stop meanwhile.
pub(crate) fn read_lines(mut conn: &UnixStream, stop: &UnixStream, sink: &mut Sink) -> bool {
    if conn.set_nonblocking(true).is_err() {
        return false;
    }
    let mut splitter = LineSplitter::default();
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        if let Wake::Stop = wait(stop, conn) {
            splitter.finish(&mut |line| emit(line, sink));
            return true;
        }
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => splitter.push(&chunk[..n], &mut |line| emit(line, sink)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    splitter.finish(&mut |line| emit(line, sink));
    false
}

pub(crate) fn emit(line: GuestLogLine, sink: &mut Sink) {
    macro_rules! event {
        ($level:expr) => {
            tracing::event!(target: "husk::guest", $level, guest_target = %line.target, "{}", line.message)
        };
    }
    match line.level {
        Level::ERROR => event!(Level::ERROR),
        Level::WARN => event!(Level::WARN),
        Level::INFO => event!(Level::INFO),
        Level::DEBUG => event!(Level::DEBUG),
        _ => event!(Level::TRACE),
    }
    sink(&line);
}

/// Cuts the byte stream into lines of at most [`MAX_LINE_LEN`] bytes.
#[derive(Default)]
pub(crate) struct LineSplitter {
    pub(crate) buf: Vec<u8>,
    /// Level and target of a line whose first piece was already emitted.
    continued: Option<(Level, String)>,
}

impl LineSplitter {
    pub(crate) fn push(&mut self, mut data: &[u8], out: &mut impl FnMut(GuestLogLine)) {
        while !data.is_empty() {
            let room = MAX_LINE_LEN - self.buf.len();
            let window = &data[..data.len().min(room)];
            if let Some(nl) = window.iter().position(|&b| b == b'\n') {
                self.buf.extend_from_slice(&window[..nl]);
                data = &data[nl + 1..];
                self.flush(true, out);
                continue;
            }
            self.buf.extend_from_slice(window);
            data = &data[window.len()..];
            if self.buf.len() == MAX_LINE_LEN {
                self.flush(false, out);
            }
        }
    }

    /// Emits what is left at end of stream (a line cut off mid-way).
    pub(crate) fn finish(&mut self, out: &mut impl FnMut(GuestLogLine)) {
        if !self.buf.is_empty() {
            self.flush(true, out);
        }
        self.continued = None;
    }

    fn flush(&mut self, complete: bool, out: &mut impl FnMut(GuestLogLine)) {
        // A line that ended exactly where it was split (MAX_LINE_LEN bytes,
        // then its newline) was emitted whole: nothing follows it.
        if complete && self.buf.is_empty() && self.continued.take().is_some() {
            return;
        }
        // A split must not cut a UTF-8 sequence in two: carry its head over.
        let cut = if complete {
            self.buf.len()
        } else {
            utf8_cut(&self.buf)
        };
        let text = String::from_utf8_lossy(&self.buf[..cut]);
        let line = match self.continued.take() {
            Some((level, target)) => GuestLogLine {
                level,
                target,
                message: sanitize(&text),
            },
            None => {
                let parsed = logline::parse(&text);
                GuestLogLine {
                    level: to_tracing(parsed.level),
                    target: sanitize(&parsed.target),
                    message: sanitize(&parsed.message),
                }
            }
        };
        if !complete {
            self.continued = Some((line.level, line.target.clone()));
        }
        self.buf.drain(..cut);
        out(line);
    }
}

/// Length of `buf` without a trailing incomplete UTF-8 sequence.
fn utf8_cut(buf: &[u8]) -> usize {
    let len = buf.len();
    // A sequence is at most 4 bytes: look at the last 3 for its lead byte.
    for back in 1..=3.min(len) {
        let b = buf[len - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { len - back } else { len };
    }
    len
}

/// Control characters (ESC, CR, LF, ...) shown escaped, tab kept.
pub(crate) fn sanitize(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The host level of a guest line: the guest's own, but never above warn (a
/// guest must not raise errors in the host's log).
fn to_tracing(level: LogLevel) -> Level {
    match level {
        LogLevel::Trace => Level::TRACE,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Info => Level::INFO,
        LogLevel::Warn | LogLevel::Error => Level::WARN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::{channel, Receiver};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    struct Harness {
        _dir: tempfile::TempDir,
        receiver: GuestLogReceiver,
        lines: Receiver<GuestLogLine>,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let (tx, lines) = channel();
            let receiver = GuestLogReceiver::bind_with_sink(&dir.path().join("vsock.sock"), {
                let tx = Mutex::new(tx);
                move |line| {
                    let _ = tx.lock().unwrap().send(line.clone());
                }
            })
            .unwrap();
            Harness {
                _dir: dir,
                receiver,
                lines,
            }
        }

        /// Connects as the guest would (through the VMM).
        fn guest(&self) -> UnixStream {
            UnixStream::connect(self.receiver.path()).unwrap()
        }

        fn next(&self) -> GuestLogLine {
            self.lines.recv_timeout(Duration::from_secs(5)).unwrap()
        }
    }

    fn line(level: Level, target: &str, message: &str) -> GuestLogLine {
        GuestLogLine {
            level,
            target: target.into(),
            message: message.into(),
        }
    }

    #[test]
    fn binds_beside_the_vsock_socket() {
        let h = Harness::new();
        assert!(h.receiver.path().ends_with("vsock.sock_1025"));
    }

    #[test]
    fn every_level_arrives_at_its_level() {
        let h = Harness::new();
        let mut guest = h.guest();
        let mut wire = String::new();
        for level in LogLevel::ALL {
            wire.push_str(&logline::format(
                level,
                "husk_agent::x",
                &format!("hello {level}"),
            ));
        }
        guest.write_all(wire.as_bytes()).unwrap();
        for (level, name) in [
            (Level::TRACE, "TRACE"),
            (Level::DEBUG, "DEBUG"),
            (Level::INFO, "INFO"),
            (Level::WARN, "WARN"),
            // Capped: the guest cannot raise errors on the host.
            (Level::WARN, "ERROR"),
        ] {
            assert_eq!(
                h.next(),
                line(level, "husk_agent::x", &format!("hello {name}"))
            );
        }
    }

    #[test]
    fn lines_split_across_writes_are_joined() {
        let h = Harness::new();
        let mut guest = h.guest();
        for piece in ["WA", "RN a::b: one ", "two\nINFO c: three\n"] {
            guest.write_all(piece.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(h.next(), line(Level::WARN, "a::b", "one two"));
        assert_eq!(h.next(), line(Level::INFO, "c", "three"));
    }

    #[test]
    fn overlong_line_is_split_and_keeps_its_level() {
        let h = Harness::new();
        let mut guest = h.guest();
        let body = "x".repeat(20_000);
        guest
            .write_all(format!("ERROR big: {body}\nINFO after: done\n").as_bytes())
            .unwrap();
        let mut total = 0;
        let mut pieces = 0;
        loop {
            let got = h.next();
            if got.target == "after" {
                assert_eq!(got, line(Level::INFO, "after", "done"));
                break;
            }
            assert_eq!(got.level, Level::WARN, "ERROR capped at warn");
            assert_eq!(got.target, "big");
            assert!(got.message.len() <= MAX_LINE_LEN);
            assert!(got.message.chars().all(|c| c == 'x'));
            total += got.message.len();
            pieces += 1;
        }
        assert_eq!(total, body.len());
        assert_eq!(pieces, 3);
    }

    #[test]
    fn split_does_not_cut_a_utf8_character() {
        let h = Harness::new();
        let mut guest = h.guest();
        // "INFO t: " is 8 bytes; one more 'a' puts every 'é' (2 bytes)
        // across the 8 KiB boundary.
        let body = format!("a{}", "é".repeat(6000));
        guest
            .write_all(format!("INFO t: {body}\n").as_bytes())
            .unwrap();
        let mut joined = String::new();
        while joined.len() < body.len() {
            let got = h.next();
            assert!(!got.message.contains('\u{FFFD}'), "a character was cut");
            joined.push_str(&got.message);
        }
        assert_eq!(joined, body);
    }

    #[test]
    fn invalid_utf8_and_control_characters_are_neutralised() {
        let h = Harness::new();
        let mut guest = h.guest();
        guest.write_all(b"WARN t: bad \xff\xfe bytes\n").unwrap();
        guest
            .write_all(b"INFO t: \x1b[31mred\rforged\\nline\n")
            .unwrap();
        guest.write_all(b"\xff\xff\n").unwrap();
        assert_eq!(
            h.next(),
            line(Level::WARN, "t", "bad \u{FFFD}\u{FFFD} bytes")
        );
        let got = h.next();
        assert_eq!(got.message, "\\u{1b}[31mred\\rforged\\nline");
        assert_eq!(h.next(), line(Level::INFO, "", "\u{FFFD}\u{FFFD}"));
    }

    #[test]
    fn peer_disconnecting_mid_line_flushes_and_next_peer_is_served() {
        let h = Harness::new();
        let mut guest = h.guest();
        guest
            .write_all(b"INFO t: complete\nERROR t: cut off mid")
            .unwrap();
        drop(guest);
        assert_eq!(h.next(), line(Level::INFO, "t", "complete"));
        assert_eq!(h.next(), line(Level::WARN, "t", "cut off mid"));

        let mut again = h.guest();
        again.write_all(b"DEBUG t: reconnected\n").unwrap();
        assert_eq!(h.next(), line(Level::DEBUG, "t", "reconnected"));
    }

    #[test]
    fn drop_stops_the_thread_and_removes_the_socket() {
        let h = Harness::new();
        let path = h.receiver.path().to_owned();
        // An idle guest holding its connection open must not block Drop.
        let _guest = h.guest();
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        drop(h.receiver);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!path.exists());
        // The sink was dropped with the thread: the channel is closed.
        assert!(h.lines.recv_timeout(Duration::from_secs(1)).is_err());
    }

    #[test]
    fn stale_socket_is_replaced_but_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let stale = host_port_path(&uds, LOG_VSOCK_PORT);
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let first = GuestLogReceiver::bind(&uds).unwrap();
        let err = GuestLogReceiver::bind(&uds).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(first);
    }

    /// Records (target, level, message, guest_target) of every event.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Captured>>>);

    /// (target, level, message, guest_target)
    type Captured = (String, Level, String, String);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            #[derive(Default)]
            struct Fields {
                message: String,
                guest_target: String,
            }
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    match f.name() {
                        "message" => self.message = format!("{v:?}"),
                        "guest_target" => self.guest_target = format!("{v:?}"),
                        _ => {}
                    }
                }
            }
            let mut fields = Fields::default();
            event.record(&mut fields);
            let meta = event.metadata();
            self.0.lock().unwrap().push((
                meta.target().to_owned(),
                *meta.level(),
                fields.message,
                fields.guest_target,
            ));
        }
    }

    #[test]
    fn lines_are_reemitted_through_tracing_as_husk_guest() {
        use tracing_subscriber::layer::SubscriberExt;
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = channel();
        let receiver = tracing::subscriber::with_default(subscriber, || {
            GuestLogReceiver::bind_with_sink(&dir.path().join("v.sock"), move |_| {
                let _ = tx.send(());
            })
        })
        .unwrap();
        let mut guest = UnixStream::connect(receiver.path()).unwrap();
        guest
            .write_all(b"WARN husk_agent::init: no cgroup2\n")
            .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let events = capture.0.lock().unwrap().clone();
        assert_eq!(
            events,
            vec![(
                "husk::guest".to_owned(),
                Level::WARN,
                "no cgroup2".to_owned(),
                "husk_agent::init".to_owned()
            )]
        );
    }

    #[test]
    fn a_line_of_exactly_max_line_len_is_one_event() {
        // Found by the guest_log fuzz harness's invariants (its seed
        // fuzz/corpus/guest_log/husk-vsock-5):
        // the newline right after a full buffer made a second, empty event.
        let mut wire = b"INFO t: ".to_vec();
        wire.resize(MAX_LINE_LEN, b'y');
        wire.extend_from_slice(b"\nWARN t: next\n");
        let mut got = Vec::new();
        let mut splitter = LineSplitter::default();
        splitter.push(&wire, &mut |l| got.push(l));
        splitter.finish(&mut |l| got.push(l));
        assert_eq!(
            got.len(),
            2,
            "{:?}",
            got.iter().map(|l| &l.message).collect::<Vec<_>>()
        );
        assert_eq!(got[0].message.len(), MAX_LINE_LEN - 8);
        assert_eq!(got[1], line(Level::WARN, "t", "next"));
        // One byte more is two pieces, as before.
        let mut longer = b"INFO t: ".to_vec();
        longer.resize(MAX_LINE_LEN + 1, b'y');
        longer.push(b'\n');
        let mut pieces = Vec::new();
        splitter.push(&longer, &mut |l| pieces.push(l));
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[1].message, "y");
    }

    #[test]
    fn utf8_cut_keeps_complete_sequences() {
        assert_eq!(utf8_cut(b"abc"), 3);
        assert_eq!(utf8_cut("aé".as_bytes()), 3);
        assert_eq!(utf8_cut(&"aé".as_bytes()[..2]), 1);
        assert_eq!(utf8_cut(&"a€".as_bytes()[..3]), 1);
        assert_eq!(utf8_cut(&"a😀".as_bytes()[..4]), 1);
        assert_eq!(utf8_cut("a😀".as_bytes()), 5);
        assert_eq!(utf8_cut(b"\xff\xff"), 2);
    }
}
