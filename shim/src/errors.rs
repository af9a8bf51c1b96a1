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

/// `e`'s message followed by each cause it does not already show, so a
/// status keeps the whole story ("a: b: c").
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

impl From<crate::spec::SpecError> for Error {
    fn from(e: crate::spec::SpecError) -> Self {
        invalid(with_causes(&e))
    }
}

impl From<crate::rootfs::RootfsError> for Error {
    fn from(e: crate::rootfs::RootfsError) -> Self {
        internal(with_causes(&e))
    }
}

/// A config that does not parse is a bad argument; one that cannot be
/// found or read, a host not set up.
pub fn from_config(e: &husk_config::ConfigError) -> Error {
    use husk_config::ConfigError as C;
    let code = match e {
        C::Parse { .. } | C::Invalid { .. } => Code::INVALID_ARGUMENT,
        _ => Code::FAILED_PRECONDITION,
    };
    status(code, with_causes(e))
}

impl From<crate::sandbox::SandboxError> for Error {
    fn from(e: crate::sandbox::SandboxError) -> Self {
        use crate::sandbox::SandboxError as S;
        match e {
            S::Config(e) => from_config(&e),
            S::BadConfig { .. } => invalid(with_causes(&e)),
            // The agent's own status, already mapped.
            S::Rpc(e) => e,
            e => internal(with_causes(&e)),
        }
    }
}

impl From<crate::options::OptionsError> for Error {
    fn from(e: crate::options::OptionsError) -> Self {
        invalid(e.to_string())
    }
}

/// Most bytes of guest text an error carries.
pub const MAX_GUEST_TEXT: usize = 1024;

/// Text from the guest made fit for host logs and error messages: control
/// characters escaped, cut to [`MAX_GUEST_TEXT`] bytes.
pub fn guest_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_GUEST_TEXT));
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > MAX_GUEST_TEXT {
            out.push_str("...");
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// An agent error, passed on with its own status code and its message
/// (guest text: sanitized and capped).
pub fn from_agent(rpc: &str, e: ttrpc::Error) -> Error {
    match e {
        Error::RpcStatus(mut s) => {
            s.message = format!("guest agent {rpc}: {}", guest_text(&s.message));
            Error::RpcStatus(s)
        }
        other => internal(format!(
            "guest agent {rpc}: {}",
            guest_text(&other.to_string())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_causes_and_codes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("the cause"));
        assert_eq!(with_causes(&e), "outer: the cause");
        let shown = crate::rootfs::RootfsError::Io {
            path: "/x".into(),
            source: std::io::Error::other("denied"),
        };
        assert_eq!(
            with_causes(&shown),
            "cannot prepare /x: denied",
            "not twice"
        );
        let Error::RpcStatus(s) = Error::from(crate::spec::SpecError::InvalidProcess("x".into()))
        else {
            panic!("not a status")
        };
        assert_eq!(s.code(), Code::INVALID_ARGUMENT);
        let missing = husk_config::ConfigError::NotFound { tried: "a".into() };
        let Error::RpcStatus(s) = Error::from(crate::sandbox::SandboxError::Config(missing)) else {
            panic!("not a status")
        };
        assert_eq!(s.code(), Code::FAILED_PRECONDITION);
        let agent = status(Code::NOT_FOUND, "guest agent X: gone");
        let Error::RpcStatus(s) = Error::from(crate::sandbox::SandboxError::Rpc(agent)) else {
            panic!("not a status")
        };
        assert_eq!(s.code(), Code::NOT_FOUND, "the agent's code is kept");
    }

    #[test]
    fn guest_text_is_escaped_and_capped() {
        assert_eq!(guest_text("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
        let long = guest_text(&"é".repeat(4 * MAX_GUEST_TEXT));
        assert!(long.len() <= MAX_GUEST_TEXT + 3 && long.ends_with("..."));
        let e = from_agent(
            "CreateContainer",
            status(Code::NOT_FOUND, format!("forged\n{}", "x".repeat(5000))),
        );
        let Error::RpcStatus(s) = e else {
            panic!("not a status")
        };
        assert_eq!(s.code(), Code::NOT_FOUND);
        assert!(s
            .message
            .starts_with("guest agent CreateContainer: forged\\n"));
        assert!(s.message.len() < MAX_GUEST_TEXT + 64);
    }
}
