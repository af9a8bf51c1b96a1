//! ttrpc statuses for the task API. containerd maps the codes to its error
//! kinds (NOT_FOUND -> ErrNotFound, ...), which `ctr` and CRI act on.

use ttrpc::{get_status, Code, Error};

pub fn status(code: Code, message: impl Into<String>) -> Error {
    Error::RpcStatus(get_status(code, message.into()))
}

pub fn not_found(message: impl Into<String>) -> Error {
    status(Code::NOT_FOUND, message)
}

pub fn already_exists(message: impl Into<String>) -> Error {
    status(Code::ALREADY_EXISTS, message)
}

pub fn invalid(message: impl Into<String>) -> Error {
    status(Code::INVALID_ARGUMENT, message)
}

pub fn precondition(message: impl Into<String>) -> Error {
    status(Code::FAILED_PRECONDITION, message)
}

pub fn internal(message: impl Into<String>) -> Error {
    status(Code::INTERNAL, message)
}

/// An agent error, passed on with its own status code and message.
pub fn from_agent(rpc: &str, e: ttrpc::Error) -> Error {
    match e {
        Error::RpcStatus(mut s) => {
            s.message = format!("guest agent {rpc}: {}", s.message);
            Error::RpcStatus(s)
        }
        other => internal(format!("guest agent {rpc}: {other}")),
    }
}
