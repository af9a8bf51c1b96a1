//! Fuzzing entry points (built for `cargo fuzz` and unit tests only) for
//! what a hostile guest or VMM peer sends the host side of hybrid vsock:
//!
//! - [`fuzz_guest_log`]: the agent's log stream (host port 1025): its
//!   framing into lines and the parsing, escaping and level capping of
//!   each, through to the `tracing` events they become;
//! - [`fuzz_connect_reply`]: the `OK <port>\n` reply the host reads after
//!   its `CONNECT`, by byte and through the real [`connect`](crate::connect)
//!   and [`connect_async`](crate::connect_async) against a fake VMM.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use husk_protocol::logline::{self, LogLevel};
use husk_util::sync::lock;
use tracing::Level;

use crate::connect::{Failure, FatalKind, Reply, Step, MAX_REPLY_LEN};
use crate::guest_log::{emit, read_lines, sanitize, LineSplitter, Sink};
use crate::{GuestLogLine, MAX_LINE_LEN};

/// Cuts `bytes` into the pieces a peer sends: all at once when `seed` is
/// 0, else pieces of 1 to `seed % 32 + 1` bytes (a fixed sequence per seed;
/// the same as husk-hypervisor's vsock handshake harness).
pub fn pieces(seed: u8, bytes: &[u8]) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![bytes];
    }
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = 1 + usize::from(x.to_le_bytes()[0]) % (usize::from(seed % 32) + 1);
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

// ---------------------------------------------------------------------------
// fuzz_guest_log

/// What the `tracing` events of one input were: (target, level, message,
/// guest_target).
type Event = (String, Level, String, String);

/// A subscriber that records every event (the host's log, as the shim's
/// subscriber would see it).
#[derive(Default)]
struct Capture(Mutex<Vec<Event>>);

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
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
        lock(&self.0).push((
            meta.target().to_owned(),
            *meta.level(),
            fields.message,
            fields.guest_target,
        ));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn capture() -> &'static (Arc<Capture>, tracing::Dispatch) {
    static CAPTURE: OnceLock<(Arc<Capture>, tracing::Dispatch)> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Arc::new(Capture::default());
        let dispatch = tracing::Dispatch::from(capture.clone());
        (capture, dispatch)
    })
}

/// Feeds `pieces` to a splitter as the receiver does (`emit` and all), with
/// the splitter's buffer checked after each piece; the lines the sink got.
fn split(pieces: &[&[u8]]) -> Vec<GuestLogLine> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut sink: Sink = Box::new({
        let lines = lines.clone();
        move |line: &GuestLogLine| lock(&lines).push(line.clone())
    });
    let mut splitter = LineSplitter::default();
    for piece in pieces {
        splitter.push(piece, &mut |line| emit(line, &mut sink));
        assert!(
            splitter.buf.len() < MAX_LINE_LEN,
            "the receiver holds {} bytes of one line",
            splitter.buf.len()
        );
    }
    splitter.finish(&mut |line| emit(line, &mut sink));
    drop(sink);
    let lines = lock(&lines).clone();
    lines
}

/// The same stream through the receiver's real reading loop, over a real
/// Unix socket.
fn through_socket(bytes: &[u8]) -> Vec<GuestLogLine> {
    let (mut guest, conn) = UnixStream::pair().expect("socketpair");
    let (_stop, stop_rx) = UnixStream::pair().expect("socketpair");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut sink: Sink = Box::new({
        let lines = lines.clone();
        move |line: &GuestLogLine| lock(&lines).push(line.clone())
    });
    // Joined, not scoped: a scoped thread may still be running its
    // thread-local destructors when the scope ends, which LeakSanitizer
    // takes for a leak (as the first guest_log fuzz run did).
    let bytes = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = guest.write_all(&bytes);
    });
    let stopped = read_lines(&conn, &stop_rx, &mut sink);
    assert!(!stopped, "stopped without being asked to");
    writer.join().expect("guest writer");
    drop(sink);
    let lines = lock(&lines).clone();
    lines
}

/// The host level a guest level becomes: the guest's, at most warn.
fn capped(level: LogLevel) -> Level {
    match level {
        LogLevel::Trace => Level::TRACE,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Info => Level::INFO,
        LogLevel::Warn | LogLevel::Error => Level::WARN,
    }
}

/// Well-formed events from `data` (5 + n bytes each: level, target length,
/// message length (2 bytes), then the bytes), formatted as the agent does,
/// with the lines the host must show for them. A target never contains
/// ": " (the agent's are module paths); lines stay within [`MAX_LINE_LEN`].
fn events(mut data: &[u8]) -> (Vec<u8>, Vec<GuestLogLine>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    while let [level, tlen, m0, m1, rest @ ..] = data {
        let level = LogLevel::ALL[usize::from(*level) % LogLevel::ALL.len()];
        let tlen = usize::from(*tlen % 64).min(rest.len());
        let (target, rest) = rest.split_at(tlen);
        let mlen = usize::from(u16::from_le_bytes([*m0, *m1])).min(rest.len());
        let (message_bytes, rest) = rest.split_at(mlen);
        data = rest;
        let target = String::from_utf8_lossy(target).replace(": ", ":_");
        // As much of the message as fits in MAX_LINE_LEN bytes before the
        // newline (one event).
        let mut line = String::new();
        logline::write_prefix(&mut line, level, &target);
        let mut message = String::new();
        for c in String::from_utf8_lossy(message_bytes).chars() {
            let mut piece = String::new();
            logline::escape_into(&mut piece, c.encode_utf8(&mut [0u8; 4]));
            if line.len() + piece.len() > MAX_LINE_LEN {
                break;
            }
            line.push_str(&piece);
            message.push(c);
        }
        line.push('\n');
        wire.extend_from_slice(line.as_bytes());
        expected.push(GuestLogLine {
            level: capped(level),
            target: sanitize(&target),
            message: sanitize(&message),
        });
    }
    (wire, expected)
}

/// What one input did (lets the unit tests check the seeds do what they claim).
#[derive(Debug, Default)]
pub struct GuestLogOutcome {
    pub lines: usize,
    /// Lines at warn (what error lines become, too).
    pub warn: usize,
}

/// Runs one input: byte 0 picks how the stream is cut ([`pieces`]); byte 1:
/// bit 0: the rest is a sequence of well-formed events (see `events`), else
/// raw bytes; bit 1: also read it through the receiver's socket loop. Asserts:
/// - no panic; the receiver never holds a whole [`MAX_LINE_LEN`] of one line;
/// - the same lines whatever the cutting, and through the socket;
/// - every line: at most warn, no control characters but tab in its target
///   or message, bounded (what [`MAX_LINE_LEN`] bytes can become escaped),
///   and no more lines than newlines and splits allow;
/// - well-formed events come out as the agent sent them (escaped), one
///   event per line of at most [`MAX_LINE_LEN`] bytes;
/// - every line is one `tracing` event of target `husk::guest` at its level,
///   with its message and guest target.
pub fn fuzz_guest_log(data: &[u8]) -> GuestLogOutcome {
    let [seed, mode, body @ ..] = data else {
        return GuestLogOutcome::default();
    };
    let body = &body[..body.len().min(256 * 1024)];
    let (wire, expected) = if mode & 1 != 0 {
        let (wire, expected) = events(body);
        (wire, Some(expected))
    } else {
        (body.to_vec(), None)
    };

    let (capture, dispatch) = capture();
    lock(&capture.0).clear();
    let whole = tracing::dispatcher::with_default(dispatch, || split(&[&wire]));
    let events = std::mem::take(&mut *lock(&capture.0));

    let cut = split(&pieces(*seed, &wire));
    assert_eq!(cut, whole, "lines depend on how the stream was cut");
    if mode & 2 != 0 {
        assert_eq!(through_socket(&wire), whole, "the socket loop differs");
    }
    let newlines = wire.iter().filter(|&&b| b == b'\n').count();
    assert!(
        whole.len() <= newlines + wire.len() / (MAX_LINE_LEN - 3) + 1,
        "{} lines from {} bytes with {newlines} newlines",
        whole.len(),
        wire.len()
    );
    for line in &whole {
        assert!(line.level >= Level::WARN, "{line:?} above warn");
        for text in [&line.target, &line.message] {
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\t'),
                "control character in {text:?}"
            );
        }
        assert!(line.target.len() + line.message.len() <= 6 * MAX_LINE_LEN);
    }
    if let Some(expected) = expected {
        assert_eq!(whole, expected, "well-formed events changed on the way");
    }
    assert_eq!(events.len(), whole.len(), "one tracing event per line");
    for (event, line) in events.iter().zip(&whole) {
        let want = (
            "husk::guest".to_owned(),
            line.level,
            line.message.clone(),
            line.target.clone(),
        );
        assert_eq!(event, &want);
    }
    GuestLogOutcome {
        lines: whole.len(),
        warn: whole.iter().filter(|l| l.level == Level::WARN).count(),
    }
}

/// Starting points for [`fuzz_guest_log`]: a boot's worth of agent lines,
/// forged and escaped text, invalid UTF-8, an overlong line, a line of
/// exactly [`MAX_LINE_LEN`] bytes, well-formed events of every level.
pub fn guest_log_seeds() -> Vec<Vec<u8>> {
    let raw = |seed: u8, mode: u8, body: &[u8]| {
        let mut v = vec![seed, mode];
        v.extend_from_slice(body);
        v
    };
    let boot = b"INFO husk_agent::init: mounted /proc fstype=proc\n\
        DEBUG husk_agent::init: cgroup2 at /sys/fs/cgroup\n\
        WARN husk_agent::net: no eth0\nERROR husk_agent: oom\n";
    let forged = b"INFO t: \x1b[31mred\rforged\\nline\\\\ \\x\nwarning w: lower\n\
        NOTALEVEL x: y\nINFO\n\n\t\n";
    let utf8 = b"WARN t: bad \xff\xfe bytes \xe2\x82\n\xc3\n\xf0\x9f\x98\x80\n";
    let mut long = b"ERROR big: ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE_LEN));
    long.extend_from_slice("é€😀\nINFO after: done\n".as_bytes());
    let mut exact = b"INFO t: ".to_vec();
    exact.resize(MAX_LINE_LEN, b'y');
    exact.extend_from_slice(b"\nINFO next: line\n");
    let mut events = Vec::new();
    for level in 0..5u8 {
        let target = b"husk_agent::x";
        let message = format!("hello {level}\nsecond\r\\ \x07");
        events.extend([level, 13]);
        events.extend(u16::try_from(message.len()).unwrap_or(0).to_le_bytes());
        events.extend_from_slice(target);
        events.extend_from_slice(message.as_bytes());
    }
    vec![
        raw(0, 0, boot),
        raw(3, 2, boot),
        raw(1, 0, forged),
        raw(7, 2, utf8),
        raw(31, 0, &long),
        raw(0, 2, &exact),
        raw(5, 1, &events),
        raw(9, 3, &events),
    ]
}

// ---------------------------------------------------------------------------
// fuzz_connect_reply

/// What a VMM's reply to `CONNECT` must lead to.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyVerdict {
    /// `OK <u32>\n`: connected.
    Connected,
    /// Anything else ending in a newline, or too long: an error, no retry.
    BadReply,
    /// The stream ended first: retry.
    Retry,
}

/// The verdict on `reply` by the protocol, and the index of the byte that
/// decides it (None: only the end of the stream does).
fn reply_model(reply: &[u8]) -> (Option<usize>, ReplyVerdict) {
    for (i, &b) in reply.iter().enumerate() {
        if b == b'\n' {
            return (Some(i), ok_line_model(&reply[..i]));
        }
        if i + 1 >= MAX_REPLY_LEN {
            return (Some(i), ReplyVerdict::BadReply);
        }
    }
    (None, ReplyVerdict::Retry)
}

fn ok_line_model(line: &[u8]) -> ReplyVerdict {
    let Some(digits) = line.strip_prefix(b"OK ") else {
        return ReplyVerdict::BadReply;
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return ReplyVerdict::BadReply;
    }
    let significant = &digits[digits.iter().take_while(|&&d| d == b'0').count()..];
    let value = significant
        .iter()
        .take(11)
        .fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    if significant.len() <= 10 && u32::try_from(value).is_ok() {
        ReplyVerdict::Connected
    } else {
        ReplyVerdict::BadReply
    }
}

/// Bound on a bad reply's text in an error: what [`MAX_REPLY_LEN`] bytes can
/// become (invalid UTF-8 triples) and the note after them.
const MAX_REPLY_TEXT: usize = 3 * MAX_REPLY_LEN + 64;

/// A fresh socket path for a fake VMM.
fn socket_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-vsock-reply-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz socket dir");
        dir
    });
    dir.join(format!("v{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// A VMM that reads one `CONNECT 1024\n` and answers `reply` in `pieces`,
/// then closes.
fn fake_vmm(seed: u8, reply: &[u8]) -> (PathBuf, std::thread::JoinHandle<()>) {
    let path = socket_path();
    let listener = UnixListener::bind(&path).expect("fake VMM socket");
    let reply = reply.to_vec();
    let thread = std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut line = [0u8; 13];
        if conn.read_exact(&mut line).is_err() {
            return;
        }
        assert_eq!(&line, b"CONNECT 1024\n");
        for piece in pieces(seed, &reply) {
            if conn.write_all(piece).is_err() {
                return;
            }
        }
    });
    (path, thread)
}

/// The rest of `stream` after the handshake: the guest's bytes.
fn rest_of(mut stream: impl Read) -> Vec<u8> {
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("read after the handshake");
    rest
}

/// Runs one input (the `vsock_handshake` corpus: byte 0 picks the cutting,
/// the rest is the VMM's reply). The reply parser must decide exactly at the
/// deciding byte and reach the protocol's verdict, with bounded error text.
/// With byte 0 odd, the real blocking [`connect`](crate::connect) (and with
/// bit 1 also [`connect_async`](crate::connect_async)) runs against a fake
/// VMM sending the reply in pieces: a connection must come back exactly for
/// `OK <u32>\n`, and its stream must start right after that newline.
pub fn fuzz_connect_reply(data: &[u8]) -> ReplyVerdict {
    let Some((&seed, reply)) = data.split_first() else {
        return ReplyVerdict::Retry;
    };
    let reply = &reply[..reply.len().min(64 * 1024)];
    let (decided_at, expected) = reply_model(reply);

    let mut parser = Reply::default();
    let mut verdict = None;
    for (i, &b) in reply.iter().enumerate() {
        match parser.feed(Some(b)) {
            Step::More => assert!(decided_at.is_none_or(|at| at > i), "undecided at {i}"),
            Step::Done(result) => {
                assert_eq!(decided_at, Some(i), "decided at byte {i}");
                verdict = Some(result);
                break;
            }
        }
    }
    let verdict = match verdict.unwrap_or_else(|| match parser.feed(None) {
        Step::Done(result) => result,
        Step::More => panic!("more wanted after the end of the stream"),
    }) {
        Ok(()) => ReplyVerdict::Connected,
        Err(Failure::Fatal(FatalKind::BadReply(text))) => {
            assert!(
                text.len() <= MAX_REPLY_TEXT,
                "{} bytes of error",
                text.len()
            );
            ReplyVerdict::BadReply
        }
        Err(Failure::Fatal(FatalKind::Io(e))) => panic!("an I/O error from bytes: {e}"),
        Err(Failure::Retry(why)) => {
            // Debug-escaped: up to 6 bytes for each byte of the reply.
            assert!(why.len() <= 6 * MAX_REPLY_LEN + 64, "{why}");
            ReplyVerdict::Retry
        }
    };
    assert_eq!(verdict, expected, "on {:?}", String::from_utf8_lossy(reply));

    // The real clients, where they do not retry (that would only wait).
    if let (Some(at), true) = (decided_at, seed & 1 != 0) {
        let after = &reply[at + 1..];
        let (path, vmm) = fake_vmm(seed, reply);
        match crate::connect(&path, 1024, Duration::from_secs(10)) {
            Ok(stream) => {
                assert_eq!(verdict, ReplyVerdict::Connected);
                assert_eq!(rest_of(stream), after, "the guest's first bytes");
            }
            Err(crate::Error::BadReply { reply: text, .. }) => {
                assert_eq!(verdict, ReplyVerdict::BadReply);
                assert!(text.len() <= MAX_REPLY_TEXT);
            }
            Err(e) => panic!("connect: {e}"),
        }
        vmm.join().expect("fake VMM");
        let _ = std::fs::remove_file(&path);
        if seed & 2 != 0 {
            let (path, vmm) = fake_vmm(seed, reply);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let got = rt.block_on(async {
                let stream = crate::connect_async(&path, 1024, Duration::from_secs(10)).await?;
                Ok::<_, crate::Error>(stream.into_std().expect("std stream"))
            });
            match got {
                Ok(stream) => {
                    assert_eq!(verdict, ReplyVerdict::Connected);
                    stream.set_nonblocking(false).expect("blocking");
                    assert_eq!(rest_of(stream), after, "the guest's first bytes (async)");
                }
                Err(crate::Error::BadReply { .. }) => assert_eq!(verdict, ReplyVerdict::BadReply),
                Err(e) => panic!("connect_async: {e}"),
            }
            vmm.join().expect("fake VMM");
            let _ = std::fs::remove_file(&path);
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run` over `seeds`, every input of the repository's
    /// `fuzz/corpus/<target>/`, then `random` inputs of up to `max_len`
    /// bytes from a fixed seed.
    /// The seeds are also written to `$HUSK_FUZZ_SEED_DIR/<target>/`
    /// (`husk-vsock-<i>`) when that is set.
    fn run_corpus(target: &str, seeds: &[Vec<u8>], random: usize, max_len: u64, run: fn(&[u8])) {
        if let Some(dir) = std::env::var_os("HUSK_FUZZ_SEED_DIR") {
            let dir = std::path::Path::new(&dir).join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("husk-vsock-{i}")), seed).unwrap();
            }
        }
        for seed in seeds {
            run(seed);
        }
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&corpus)
            .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", corpus.display());
        for file in files {
            eprintln!("{target}: {}", file.display());
            run(&std::fs::read(&file).unwrap());
        }
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..random {
            let len = usize::try_from(next() % (max_len + 1)).unwrap();
            let input: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            run(&input);
        }
    }

    #[test]
    fn guest_log_seeds_corpus_and_random_inputs_hold() {
        let seeds = guest_log_seeds();
        let o: Vec<GuestLogOutcome> = seeds.iter().map(|s| fuzz_guest_log(s)).collect();
        assert_eq!((o[0].lines, o[0].warn), (4, 2), "{:?}", o[0]);
        assert_eq!(
            o[4].lines, 5,
            "three full pieces, the rest, the next line: {:?}",
            o[4]
        );
        assert_eq!(
            o[5].lines, 2,
            "a line of exactly MAX_LINE_LEN is one event: {:?}",
            o[5]
        );
        assert_eq!((o[6].lines, o[6].warn), (5, 2), "{:?}", o[6]);
        run_corpus("guest_log", &seeds, 3000, 300, |input| {
            fuzz_guest_log(input);
        });
    }

    #[test]
    fn connect_reply_corpus_and_random_inputs_hold() {
        let seeds: Vec<Vec<u8>> = [
            &b"\x01OK 1073741824\nGUEST-HELLO\n"[..],
            b"\x03OK 7\n",
            b"\x05OK 4294967296\n",
            b"\x07OK 0000000000000000000001\nx",
            b"\x01ERR no such port\n",
            b"\x00OK 5",
            b"\x01OOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOOO",
            b"\x03OK \xff\n",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect();
        let v: Vec<ReplyVerdict> = seeds.iter().map(|s| fuzz_connect_reply(s)).collect();
        use ReplyVerdict::*;
        assert_eq!(
            v,
            [Connected, Connected, BadReply, Connected, BadReply, Retry, BadReply, BadReply]
        );
        // The corpus is the vsock_handshake target's: the same bytes as a reply.
        run_corpus("vsock_handshake", &seeds, 3000, 48, |input| {
            fuzz_connect_reply(input);
        });
    }
}
