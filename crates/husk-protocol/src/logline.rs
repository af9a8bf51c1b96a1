//! The guest log stream: what the agent writes to host vsock port
//! [`LOG_VSOCK_PORT`](crate::LOG_VSOCK_PORT), one event per line.
//!
//! ```text
//! LEVEL SP target ": " message LF
//! ```
//!
//! - `LEVEL` is one of `TRACE`, `DEBUG`, `INFO`, `WARN`, `ERROR`.
//! - `target` is the `tracing` target of the event (a Rust module path).
//! - `message` is the event's message followed by its fields as ` key=value`.
//!   Backslash, CR and LF are escaped as `\\`, `\r`, `\n`, so an event is
//!   always exactly one line.
//!
//! Example: `INFO husk_agent::init: mounted /proc fstype=proc`
//!
//! The reader treats the stream as untrusted: [`parse`] accepts any text and
//! never fails; a line without a known level is kept whole as an `INFO`
//! message with an empty target.

use std::fmt;

/// Severity of a guest log line; the same five levels as `tracing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warn,
        LogLevel::Error,
    ];

    /// The token written at the start of a line.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        }
    }

    /// Parses a level token, case-insensitively (also accepts `WARNING`).
    pub fn from_token(token: &str) -> Option<Self> {
        let level = match token.to_ascii_uppercase().as_str() {
            "TRACE" => LogLevel::Trace,
            "DEBUG" => LogLevel::Debug,
            "INFO" => LogLevel::Info,
            "WARN" | "WARNING" => LogLevel::Warn,
            "ERROR" => LogLevel::Error,
            _ => return None,
        };
        Some(level)
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub target: String,
    pub message: String,
}

/// Appends `text` to `out` with `\`, CR and LF escaped.
pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Reverses [`escape_into`]; unknown escapes are kept as written.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Writes the line prefix `LEVEL target: ` into `out`. The caller appends
/// the message with [`escape_into`] and a final `\n`.
pub fn write_prefix(out: &mut String, level: LogLevel, target: &str) {
    out.push_str(level.as_str());
    out.push(' ');
    escape_into(out, target);
    out.push_str(": ");
}

/// Formats a complete line, trailing `\n` included.
pub fn format(level: LogLevel, target: &str, message: &str) -> String {
    let mut out = String::with_capacity(level.as_str().len() + target.len() + message.len() + 4);
    write_prefix(&mut out, level, target);
    escape_into(&mut out, message);
    out.push('\n');
    out
}

/// Parses one line (without its `\n`; a trailing `\r` is ignored).
pub fn parse(line: &str) -> LogLine {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let parsed = line.split_once(' ').and_then(|(token, rest)| {
        let level = LogLevel::from_token(token)?;
        let (target, message) = rest.split_once(": ").unwrap_or(("", rest));
        Some(LogLine {
            level,
            target: unescape(target),
            message: unescape(message),
        })
    });
    parsed.unwrap_or_else(|| LogLine {
        level: LogLevel::Info,
        target: String::new(),
        message: unescape(line),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_round_trips() {
        for level in LogLevel::ALL {
            let line = format(level, "husk_agent::init", "mounted /proc fstype=proc");
            assert_eq!(
                line,
                format!("{level} husk_agent::init: mounted /proc fstype=proc\n")
            );
            let back = parse(line.trim_end_matches('\n'));
            assert_eq!(back.level, level);
            assert_eq!(back.target, "husk_agent::init");
            assert_eq!(back.message, "mounted /proc fstype=proc");
        }
    }

    #[test]
    fn control_characters_stay_on_one_line_and_round_trip() {
        let message = "first\nsecond\r\nback\\slash \\n literal: colon";
        let line = format(LogLevel::Error, "t", message);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        assert_eq!(parse(line.trim_end_matches('\n')).message, message);
    }

    #[test]
    fn garbage_is_kept_as_an_info_message() {
        for raw in ["", "no level here", "NOTALEVEL x: y", "INFO"] {
            let back = parse(raw);
            assert_eq!(back.level, LogLevel::Info, "{raw:?}");
            assert_eq!(back.target, "");
            assert_eq!(back.message, raw);
        }
        let back = parse("warn no separator");
        assert_eq!(back.level, LogLevel::Warn);
        assert_eq!(back.target, "");
        assert_eq!(back.message, "no separator");
        assert_eq!(unescape("trailing \\"), "trailing \\");
        assert_eq!(unescape("\\x"), "\\x");
    }
}
