//! Errors of the agent's RPCs: each variant is a ttrpc status code, and the
//! message names the offending id, path or field.

use husk_protocol::ids;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown container or exec id.
    #[error("{0}")]
    NotFound(String),
    /// Duplicate id (or a second sandbox).
    #[error("{0}")]
    AlreadyExists(String),
    /// Malformed id, spec, process or resources, or a bad path in them.
    #[error("{0}")]
    InvalidArgument(String),
    /// The container is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The guest failed to do something valid.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }

    /// `Internal` with `what` and the whole error chain of `err`.
    pub fn internal(what: impl std::fmt::Display, err: &dyn std::error::Error) -> Error {
        Error::Internal(format!("{what}: {}", chain(err)))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// `err: source: source...`: libcontainer puts the useful part of its
/// errors in their sources.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// `kind` is "container", "exec" or "sandbox", for the message.
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    ids::validate(id).map_err(|e| Error::InvalidArgument(format!("{kind} id: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_code_and_message() {
        let e: ttrpc::Error = Error::NotFound("container c1 not found".into()).into();
        let ttrpc::Error::RpcStatus(status) = e else {
            panic!("not a status: {e:?}")
        };
        assert_eq!(status.code(), ttrpc::Code::NOT_FOUND);
        assert_eq!(status.message(), "container c1 not found");
        assert!(
            matches!(check_id("exec", "../x"), Err(Error::InvalidArgument(m)) if m.contains("exec id"))
        );
    }

    #[test]
    fn chain_joins_sources_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
