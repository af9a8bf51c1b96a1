//! The husk agent protocol: messages and the async ttrpc client/server for
//! `husk.agent.v1.AgentService`, generated at build time from
//! `protos/agent.proto` by ttrpc-codegen (pure Rust, no protoc).
//!
//! - [`agent`]: the protobuf messages (`CheckRequest`, `CheckResponse`, ...).
//! - [`agent_ttrpc`]: `AgentServiceClient` (host side), the `AgentService`
//!   trait and `create_agent_service` (guest side).
//! - [`empty`]: `Empty`, protobuf's well-known type, as the generated code
//!   expects to find it (`super::empty::Empty`).
//! - [`logline`]: the text format of the guest's log stream on
//!   [`LOG_VSOCK_PORT`] (not protobuf: one line per event).
//! - [`stdio`]: the header that opens a process's stdio stream on
//!   [`AGENT_IO_VSOCK_PORT`].
//! - [`forward`]: the header that opens a port-forward stream on
//!   [`AGENT_IO_VSOCK_PORT`].
//! - [`ids`]: what a sandbox, container or exec id may be.

pub mod forward;
pub mod ids;
pub mod logline;
pub mod stdio;

/// Guest vsock port the agent serves the ttrpc protocol on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Host vsock port the agent streams its log lines to (guest-initiated).
pub const LOG_VSOCK_PORT: u32 = 1025;
/// Guest vsock port of process stdio: one connection per stream, opened by
/// the host with a [`stdio::StreamHeader`] line (see agent.proto).
pub const AGENT_IO_VSOCK_PORT: u32 = 1026;
/// The line the agent writes to the guest console once it serves requests:
/// how hosts without vsock (and benchmarks) see that the guest is ready.
pub const AGENT_READY_CONSOLE_LINE: &str = "husk-agent: ready";
/// Fully qualified ttrpc service name, as routed by the server.
pub const AGENT_SERVICE_NAME: &str = "husk.agent.v1.AgentService";

/// Protobuf messages of `husk.agent.v1`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_qualifications,
    unused_results,
    unused_mut,
    dead_code
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Async ttrpc client and server glue for `husk.agent.v1.AgentService`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unused_results,
    dead_code
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// `google.protobuf.Empty`. The generated code refers to it as
/// `super::empty::Empty`; protobuf ships it, so it is not generated again.
pub mod empty {
    pub use protobuf::well_known_types::empty::Empty;
}

pub use agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
/// The exact versions the generated code was built against.
pub use {protobuf, ttrpc};

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn check_response_round_trips() {
        let mut resp = agent::CheckResponse::new();
        resp.kernel_release = "6.1.0-husk".into();
        resp.agent_version = "0.1.0".into();
        let bytes = resp.write_to_bytes().unwrap();
        let back = agent::CheckResponse::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn service_registers_every_rpc() {
        struct Nop;
        impl AgentService for Nop {}
        let services = create_agent_service(std::sync::Arc::new(Nop));
        let svc = services.get(AGENT_SERVICE_NAME).unwrap();
        for method in [
            "Check",
            "Shutdown",
            "CreateSandbox",
            "DestroySandbox",
            "GetGuestDetails",
            "CreateContainer",
            "StartContainer",
            "ExecProcess",
            "SignalProcess",
            "WaitProcess",
            "CloseStdin",
            "TtyWinResize",
            "PauseContainer",
            "ResumeContainer",
            "UpdateContainer",
            "StatsContainer",
            "ListProcesses",
            "GetOomEvent",
            "RemoveContainer",
            "UpdateInterface",
            "UpdateRoutes",
            "ListInterfaces",
            "ListRoutes",
        ] {
            assert!(svc.methods.contains_key(method), "{method} not registered");
        }
    }
}
