//! What a sandbox, container or exec id may be. They become file and cgroup
//! names in the guest and words of the stdio header, so the agent checks
//! them before anything else.

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty id")]
    Empty,
    #[error("id {0:?} is longer than {MAX_ID_LEN} characters")]
    TooLong(String),
    #[error("id {0:?} must start with a letter or digit and contain only [A-Za-z0-9_.+-]")]
    BadCharacters(String),
}

/// 1-128 characters from `[A-Za-z0-9_.+-]`, the first a letter or digit
/// (so never `.`, `..` or the stdio header's `-`).
pub fn validate(id: &str) -> Result<(), IdError> {
    let Some(first) = id.chars().next() else {
        return Err(IdError::Empty);
    };
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(id.to_owned()));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-');
    if !first.is_ascii_alphanumeric() || !id.chars().all(allowed) {
        return Err(IdError::BadCharacters(id.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_containerd_style_ids() {
        for id in ["a", "c1", "pod.ctr_2", "exec-1+x", &"x".repeat(MAX_ID_LEN)] {
            assert_eq!(validate(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn rejects_paths_and_separators() {
        for id in [
            "-", ".", "..", "../x", "a/b", "a b", "a\n", "é", ".hidden", "_x",
        ] {
            assert!(validate(id).is_err(), "{id:?}");
        }
        assert_eq!(validate(""), Err(IdError::Empty));
        assert!(matches!(
            validate(&"x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong(_))
        ));
    }
}
