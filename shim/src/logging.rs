//! The shim's logs go to containerd's log: containerd reads the `log` FIFO in
//! the bundle directory (the shim's working directory) and writes what comes
//! out of it into its own log under the task's id.

use std::fs::OpenOptions;
use std::io;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Sets the global tracing subscriber. `debug` is containerd's `-debug` flag.
pub fn init(debug: bool, level: &str) {
    let level = if debug { "debug" } else { level };
    // Our own crates at `level`; chatty dependencies at warn.
    let filter = EnvFilter::try_from_env("HUSK_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,husk_shim={level},husk_hypervisor={level},husk_vsock={level},husk={level}"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(true);
    // containerd created the FIFO and holds its read end open.
    match OpenOptions::new().write(true).open("log") {
        Ok(fifo) => builder.with_writer(Mutex::new(fifo)).init(),
        Err(_) => builder.with_writer(io::stderr).init(),
    }
}
