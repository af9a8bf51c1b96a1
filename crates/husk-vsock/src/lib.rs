//! Host side of the VMM's hybrid vsock (Firecracker's scheme): the guest's
//! vsock is exposed as a Unix socket.
//!
//! - Host → guest port P: connect to the socket, write `CONNECT P\n`, read
//!   `OK <host port>\n`; the stream is then the guest's port P. If nothing
//!   listens in the guest (yet), the VMM closes the stream instead: [`connect`]
//!   and [`connect_async`] retry with backoff until a deadline.
//! - Guest → host port P: the VMM connects to the Unix listener at
//!   `<uds>_P`. [`GuestLogReceiver`] serves the agent's log stream there.
//! - Booting: [`wait_for_agent`] connects while the guest shows progress.
//! - Process stdio: [`attach_stdio`] opens one stream of a guest process
//!   (guest port [`husk_protocol::AGENT_IO_VSOCK_PORT`]).

mod boot_wait;
mod client;
mod connect;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod guest_log;
mod stdio;

pub use boot_wait::{wait_for_agent, BootError, BootLimits, GuestWatch};
pub use client::agent_client;
pub use connect::{connect, connect_async, host_port_path, Error};
pub use guest_log::{GuestLogLine, GuestLogReceiver, MAX_LINE_LEN};
pub use stdio::{attach_stdio, send_stdio_header, AttachError, StdioKind, INIT_PROCESS};
