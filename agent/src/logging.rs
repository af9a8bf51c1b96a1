//! The agent's log pipeline: `tracing` events become one text line each (the
//! format of [`husk_protocol::logline`]), go through a bounded queue, and a
//! writer thread sends them to the host.
//!
//! Logging never blocks the agent: when the queue is full the line is
//! dropped and counted, and the writer reports the count with its next line.
//! Destinations: in the guest, host vsock CID 2 port 1025 (the VMM hands it
//! to the host's `GuestLogReceiver`); if that is not there, stderr (the
//! console), trying the host again with exponential backoff, never in a
//! loop. On the host (`--listen`), stderr.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use husk_protocol::logline::{self, LogLevel};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Lines queued before new ones are dropped.
const QUEUE_LINES: usize = 1024;
/// Lines coalesced into one write (syscalls are expensive in the guest).
const BATCH_BYTES: usize = 32 * 1024;
const HOST_CID: u32 = 2;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where the writer thread sends lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Host vsock port [`husk_protocol::LOG_VSOCK_PORT`], falling back to
    /// stderr (the console when running as PID 1).
    HostVsock,
    Stderr,
}

enum Msg {
    Line(String),
    /// Answered once every line queued before it has been written.
    Flush(Sender<()>),
}

/// Handle on the pipeline, for flushing before power-off.
#[derive(Clone)]
pub struct LogHandle {
    tx: Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

static HANDLE: OnceLock<LogHandle> = OnceLock::new();
/// The level [`init`] was given, for [`fork_safe_dispatch`].
static LEVEL: OnceLock<LevelFilter> = OnceLock::new();

/// Installs the global subscriber and starts the writer thread.
pub fn init(destination: Destination, level: LevelFilter) -> anyhow::Result<LogHandle> {
    let (handle, rx) = channel();
    let dropped = handle.dropped.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || Writer::new(destination, dropped, Box::new(io::stderr())).run(&rx))?;
    let subscriber = tracing_subscriber::registry()
        .with(level)
        .with(QueueLayer::new(&handle));
    tracing::subscriber::set_global_default(subscriber)?;
    // ttrpc logs through the `log` crate.
    tracing_log::LogTracer::init_with_filter(log_filter(level))?;
    let _ = HANDLE.set(handle.clone());
    let _ = LEVEL.set(level);
    Ok(handle)
}

/// A dispatcher for the thread that calls into libcontainer, whose
/// processes are `clone`s of that thread and log through whatever tracing
/// dispatcher the thread had. The global pipeline is not safe there (a
/// clone has no writer thread, and may inherit a lock the writer held), so
/// this one hands lines to the pipeline only in the agent's own process and
/// writes them straight to stderr (the console) in a clone. It keeps no
/// span state either. Use with [`tracing::dispatcher::with_default`].
pub fn fork_safe_dispatch() -> tracing::Dispatch {
    tracing::Dispatch::new(ForkSafe {
        level: LEVEL.get().copied().unwrap_or(LevelFilter::OFF),
        pid: std::process::id(),
    })
}

struct ForkSafe {
    level: LevelFilter,
    pid: u32,
}

impl Subscriber for ForkSafe {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= self.level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.level)
    }

    fn new_span(&self, _span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _span: &tracing::span::Id, _values: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _span: &tracing::span::Id, _follows: &tracing::span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let line = format_event(event);
        // One getpid per event that passed the level filter: cheap enough.
        if std::process::id() == self.pid {
            if let Some(handle) = handle() {
                handle.push(line);
            }
        } else {
            // One write(2), no locks: the clone is single-threaded.
            let _ = nix::unistd::write(std::io::stderr(), line.as_bytes());
        }
    }

    fn enter(&self, _span: &tracing::span::Id) {}

    fn exit(&self, _span: &tracing::span::Id) {}
}

/// The handle installed by [`init`], if any.
pub fn handle() -> Option<&'static LogHandle> {
    HANDLE.get()
}

fn channel() -> (LogHandle, Receiver<Msg>) {
    let (tx, rx) = bounded(QUEUE_LINES);
    let handle = LogHandle {
        tx,
        dropped: Arc::new(AtomicU64::new(0)),
    };
    (handle, rx)
}

fn log_filter(level: LevelFilter) -> tracing_log::log::LevelFilter {
    use tracing_log::log::LevelFilter as L;
    match level.into_level() {
        None => L::Off,
        Some(Level::ERROR) => L::Error,
        Some(Level::WARN) => L::Warn,
        Some(Level::INFO) => L::Info,
        Some(Level::DEBUG) => L::Debug,
        Some(_) => L::Trace,
    }
}

impl LogHandle {
    /// Waits up to `timeout` for every line queued so far to be written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (done_tx, done_rx) = bounded(1);
        if self
            .tx
            .send_deadline(Msg::Flush(done_tx), deadline)
            .is_err()
        {
            return false;
        }
        done_rx.recv_deadline(deadline).is_ok()
    }

    /// Lines dropped because the queue was full (and not yet reported).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn push(&self, line: String) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Formats each event into one line and queues it.
struct QueueLayer {
    handle: LogHandle,
}

impl QueueLayer {
    fn new(handle: &LogHandle) -> Self {
        QueueLayer {
            handle: handle.clone(),
        }
    }
}

impl<S: Subscriber> Layer<S> for QueueLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        self.handle.push(format_event(event));
    }
}

/// `LEVEL target: message key=value ...\n`
pub fn format_event(event: &Event<'_>) -> String {
    // Events forwarded from `log` carry their real target in fields.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    let mut fields = FieldWriter::default();
    event.record(&mut fields);
    let mut line = String::with_capacity(64 + fields.message.len() + fields.rest.len());
    logline::write_prefix(&mut line, to_log_level(*meta.level()), meta.target());
    logline::escape_into(&mut line, &fields.message);
    logline::escape_into(&mut line, &fields.rest);
    line.push('\n');
    line
}

fn to_log_level(level: Level) -> LogLevel {
    match level {
        Level::ERROR => LogLevel::Error,
        Level::WARN => LogLevel::Warn,
        Level::INFO => LogLevel::Info,
        Level::DEBUG => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}

#[derive(Default)]
struct FieldWriter {
    message: String,
    /// ` key=value` for every other field.
    rest: String,
}

impl Visit for FieldWriter {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if !field.name().starts_with("log.") {
            let _ = write!(self.rest, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if !field.name().starts_with("log.") {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        }
    }
}

/// The writer thread's state.
struct Writer {
    destination: Destination,
    dropped: Arc<AtomicU64>,
    /// stderr: the console when running as PID 1.
    console: Box<dyn Write + Send>,
    vsock: Option<File>,
    next_try: Instant,
    backoff: Duration,
}

impl Writer {
    fn new(
        destination: Destination,
        dropped: Arc<AtomicU64>,
        console: Box<dyn Write + Send>,
    ) -> Self {
        Writer {
            destination,
            dropped,
            console,
            vsock: None,
            next_try: Instant::now(),
            backoff: RETRY_FIRST,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        let mut batch = String::with_capacity(BATCH_BYTES);
        let mut flushes = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Line(line) => batch.push_str(&line),
                    Msg::Flush(done) => flushes.push(done),
                }
                if batch.len() < BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                batch.push_str(&logline::format(
                    LogLevel::Warn,
                    module_path!(),
                    &format!("dropped {dropped} log lines: queue full"),
                ));
            }
            self.write(batch.as_bytes());
            batch.clear();
            for done in flushes.drain(..) {
                let _ = done.try_send(());
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.destination == Destination::HostVsock {
            if self.vsock.is_none() && Instant::now() >= self.next_try {
                self.connect();
            }
            if let Some(vsock) = self.vsock.as_mut() {
                match vsock.write_all(bytes) {
                    Ok(()) => return,
                    Err(e) => {
                        self.vsock = None;
                        self.schedule_retry();
                        let note = logline::format(
                            LogLevel::Warn,
                            module_path!(),
                            &format!(
                                "log stream to the host broke ({e}): console until it is back"
                            ),
                        );
                        let _ = self.console.write_all(note.as_bytes());
                    }
                }
            }
        }
        // Nothing more to do if the console is gone too.
        let _ = self.console.write_all(bytes);
    }

    fn connect(&mut self) {
        match connect_vsock(HOST_CID, husk_protocol::LOG_VSOCK_PORT) {
            Ok(fd) => {
                self.vsock = Some(File::from(fd));
                self.backoff = RETRY_FIRST;
            }
            Err(e) => {
                let note = logline::format(
                    LogLevel::Warn,
                    module_path!(),
                    &format!(
                        "no host log listener on vsock {HOST_CID}:{} ({e}); logging to the console, next try in {:?}",
                        husk_protocol::LOG_VSOCK_PORT,
                        self.backoff
                    ),
                );
                let _ = self.console.write_all(note.as_bytes());
                self.schedule_retry();
            }
        }
    }

    fn schedule_retry(&mut self) {
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }
}

fn connect_vsock(cid: u32, port: u32) -> nix::Result<OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::registry;

    fn capture(level: LevelFilter, f: impl FnOnce()) -> (LogHandle, Receiver<Msg>) {
        let (handle, rx) = channel();
        let subscriber = registry().with(level).with(QueueLayer::new(&handle));
        tracing::subscriber::with_default(subscriber, f);
        (handle, rx)
    }

    fn lines(rx: &Receiver<Msg>) -> Vec<String> {
        rx.try_iter()
            .filter_map(|m| match m {
                Msg::Line(l) => Some(l),
                Msg::Flush(_) => None,
            })
            .collect()
    }

    #[test]
    fn events_round_trip_through_the_line_format() {
        let (_h, rx) = capture(LevelFilter::TRACE, || {
            tracing::error!(target: "husk_agent::init", path = "/proc", errno = 19, "mount failed");
            tracing::warn!("multi\nline");
            tracing::info!(target: "t", "plain");
            tracing::debug!(target: "t", flag = true, "with field");
            tracing::trace!(target: "t", "trace");
        });
        let got: Vec<_> = lines(&rx)
            .iter()
            .map(|l| {
                assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
                logline::parse(l.trim_end_matches('\n'))
            })
            .collect();
        let expect = [
            (
                LogLevel::Error,
                "husk_agent::init",
                "mount failed path=/proc errno=19",
            ),
            (LogLevel::Warn, module_path!(), "multi\nline"),
            (LogLevel::Info, "t", "plain"),
            (LogLevel::Debug, "t", "with field flag=true"),
            (LogLevel::Trace, "t", "trace"),
        ];
        assert_eq!(got.len(), expect.len());
        for (line, (level, target, message)) in got.iter().zip(expect) {
            assert_eq!(
                (line.level, line.target.as_str(), line.message.as_str()),
                (level, target, message)
            );
        }
    }

    #[test]
    fn level_filter_applies() {
        let (_h, rx) = capture(LevelFilter::WARN, || {
            tracing::info!("hidden");
            tracing::warn!("shown");
        });
        let got = lines(&rx);
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("WARN "), "{got:?}");
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let started = Instant::now();
        let (handle, rx) = capture(LevelFilter::INFO, || {
            for i in 0..QUEUE_LINES + 10 {
                tracing::info!("line {i}");
            }
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(handle.dropped(), 10);
        assert_eq!(lines(&rx).len(), QUEUE_LINES);
    }

    /// A console that tests can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writer_reports_dropped_lines_and_answers_flush() {
        let (handle, rx) = channel();
        handle.dropped.store(3, Ordering::Relaxed);
        handle.push(logline::format(LogLevel::Info, "t", "x"));
        let dropped = handle.dropped.clone();
        let console = Shared::default();
        let out = console.clone();
        let writer = std::thread::spawn(move || {
            Writer::new(Destination::Stderr, dropped, Box::new(out)).run(&rx)
        });
        assert!(handle.flush(Duration::from_secs(5)));
        assert_eq!(handle.dropped(), 0, "the writer took the count");
        let text = String::from_utf8(console.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "INFO t: x\nWARN {}: dropped 3 log lines: queue full\n",
                module_path!().trim_end_matches("::tests")
            )
        );
        drop(handle);
        writer.join().unwrap();
    }
}
