//! What a container's process runs after libcontainer set it up: its
//! default executor (exec of `process.args`), after undoing what the agent's
//! own runtime changed in the inherited signal state.
//!
//! Rust's runtime sets SIGPIPE to "ignore" in the agent, and an ignored
//! signal stays ignored across exec: without this, `yes | head -1` in a
//! container would never end with SIGPIPE.
//!
//! For a process exec'd into a container with a seccomp filter, it also
//! loads that filter and drops to the process's capabilities
//! ([`crate::exec_seccomp`]).

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{signal, SigHandler, Signal};

use crate::exec_seccomp::ExecSeccomp;

#[derive(Clone, Default)]
pub struct HuskExecutor {
    /// Set for an exec'd process of a container with a seccomp filter.
    pub exec_seccomp: Option<ExecSeccomp>,
}

impl Executor for HuskExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // SAFETY: SIG_DFL installs no handler code; this runs in the
        // single-threaded container process right before exec.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }
            .map_err(|e| ExecutorError::Other(format!("reset SIGPIPE: {e}")))?;
        if let Some(exec_seccomp) = &self.exec_seccomp {
            exec_seccomp.apply().map_err(ExecutorError::Other)?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
