//! Command line. Hand-parsed: three options do not justify clap's size in
//! an initramfs binary.

use std::ffi::OsString;
use std::str::FromStr;

use tracing::level_filters::LevelFilter;

pub const USAGE: &str = "\
usage: husk-agent [--listen ADDRESS [--io-listen ADDRESS] [--isolated]] [--log-level LEVEL]

As PID 1 of a husk microVM (no --listen): mounts the pseudo filesystems,
reaps orphans, serves the agent protocol on vsock port 1024, process stdio
streams on vsock port 1026, and streams its log to host vsock port 1025.
Shutdown powers the VM off.

  --listen ADDRESS   serve on ADDRESS instead, with no PID-1 duties (host
                     testing): unix:///path/to/sock or vsock://CID:PORT.
                     Shutdown then just exits.
  --io-listen ADDRESS  with --listen: where stdio streams are served;
                     default: the --listen path with `.io` appended, or vsock
                     port 1026 for a vsock --listen.
  --isolated         with --listen: the agent runs as PID 1 of mount, pid,
                     UTS and network namespaces of its own (e.g. under
                     `unshare --mount --pid --fork --mount-proc --uts --net`),
                     so it may run containers: it makes every mount private,
                     mounts a tmpfs at /run/husk and, where /sys/fs/cgroup
                     is not cgroup2, a cgroup2 there. Refused if not PID 1.
  --log-level LEVEL  error, warn, info (default), debug, trace or off; the
                     environment variable HUSK_AGENT_LOG does the same (as
                     PID 1, put HUSK_AGENT_LOG=debug on the kernel command line).
  --version          print the version
";

#[derive(Debug, Default, PartialEq)]
pub struct Args {
    pub listen: Option<String>,
    pub io_listen: Option<String>,
    pub isolated: bool,
    pub log_level: Option<LevelFilter>,
    pub version: bool,
    pub help: bool,
    /// Arguments not understood. As PID 1 these are kernel command-line
    /// words meant for someone else; elsewhere they are an error.
    pub unknown: Vec<String>,
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut out = Args::default();
    let mut args = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--listen" => out.listen = Some(listen_address(value("--listen")?)?),
            "--io-listen" => out.io_listen = Some(listen_address(value("--io-listen")?)?),
            "--isolated" => out.isolated = true,
            "--log-level" => out.log_level = Some(level(&value("--log-level")?)?),
            "--version" | "-V" => out.version = true,
            "--help" | "-h" => out.help = true,
            _ => out.unknown.push(arg),
        }
    }
    if out.listen.is_none() && (out.io_listen.is_some() || out.isolated) {
        return Err("--io-listen and --isolated need --listen".into());
    }
    Ok(out)
}

/// Where stdio streams are served: `--io-listen`, else derived from
/// `--listen` (see [`USAGE`]).
pub fn io_address(listen: &str, io_listen: Option<&str>) -> String {
    if let Some(io) = io_listen {
        return io.to_owned();
    }
    match listen.strip_prefix("unix://") {
        Some(path) => format!("unix://{path}.io"),
        None => format!("vsock://-1:{}", husk_protocol::AGENT_IO_VSOCK_PORT),
    }
}

fn listen_address(addr: String) -> Result<String, String> {
    let ok = match (addr.strip_prefix("unix://"), addr.strip_prefix("vsock://")) {
        (Some(path), _) => !path.is_empty(),
        (_, Some(rest)) => rest.split_once(':').is_some(),
        _ => false,
    };
    if ok {
        Ok(addr)
    } else {
        Err(format!(
            "--listen {addr:?}: expected unix:///path or vsock://CID:PORT"
        ))
    }
}

pub fn level(text: &str) -> Result<LevelFilter, String> {
    LevelFilter::from_str(text.trim()).map_err(|_| format!("unknown log level {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_options_in_both_spellings() {
        let a = p(&["--listen", "unix:///tmp/a.sock", "--log-level=debug"]).unwrap();
        assert_eq!(a.listen.as_deref(), Some("unix:///tmp/a.sock"));
        assert_eq!(a.log_level, Some(LevelFilter::DEBUG));
        let a = p(&["--listen=vsock://-1:1024", "--log-level", "off"]).unwrap();
        assert_eq!(a.listen.as_deref(), Some("vsock://-1:1024"));
        assert_eq!(a.log_level, Some(LevelFilter::OFF));
        assert_eq!(p(&[]).unwrap(), Args::default());
        assert!(p(&["--version"]).unwrap().version);
        let a = p(&["--listen", "unix:///a.sock", "--isolated"]).unwrap();
        assert!(a.isolated);
        assert_eq!(io_address("unix:///a.sock", None), "unix:///a.sock.io");
        assert_eq!(io_address("vsock://-1:1024", None), "vsock://-1:1026");
        assert_eq!(io_address("unix:///a", Some("unix:///b")), "unix:///b");
    }

    #[test]
    fn rejects_bad_values_and_keeps_unknown_words() {
        assert!(p(&["--listen"]).is_err());
        assert!(p(&["--listen", "/tmp/a.sock"]).is_err());
        assert!(p(&["--listen", "unix://"]).is_err());
        assert!(p(&["--listen", "vsock://1024"]).is_err());
        assert!(p(&["--log-level", "loud"]).is_err());
        assert!(p(&["--isolated"]).is_err());
        assert!(p(&["--io-listen", "unix:///x"]).is_err());
        // Kernel command-line words reach PID 1 as arguments.
        let a = p(&["quiet", "husk_debug"]).unwrap();
        assert_eq!(a.unknown, ["quiet", "husk_debug"]);
    }
}
