//! Runtime options containerd passes with CreateTask: the only kind husk
//! takes is `runtimeoptions.v1.Options` (what `ctr --runtime-config-path` and
//! a CRI runtime handler's `ConfigPath` option send), naming a config file.

use protobuf::well_known_types::any::Any;
use protobuf::CodedInputStream;

pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Errors decoding runtime options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("unsupported runtime options type {0:?}: husk accepts only {RUNTIME_OPTIONS_TYPE} (ConfigPath)")]
    UnknownType(String),
    #[error("malformed {RUNTIME_OPTIONS_TYPE}: {0}")]
    Malformed(String),
    #[error(
        "unsupported runtime option {0} in {RUNTIME_OPTIONS_TYPE}: husk accepts only ConfigPath"
    )]
    UnknownField(String),
}

/// The config file the options name, if any.
pub fn config_path(options: Option<&Any>) -> Result<Option<String>, OptionsError> {
    let Some(any) = options else { return Ok(None) };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    // The type URL may or may not carry a "types.googleapis.com/" style prefix.
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    if type_name != RUNTIME_OPTIONS_TYPE {
        return Err(OptionsError::UnknownType(any.type_url.clone()));
    }
    decode(&any.value)
}

/// Decodes `message Options { string type_url = 1; string config_path = 2;
/// string config_body = 3; }` by hand: the message is not in our protos.
fn decode(bytes: &[u8]) -> Result<Option<String>, OptionsError> {
    let malformed = |e: protobuf::Error| OptionsError::Malformed(e.to_string());
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while !input.eof().map_err(malformed)? {
        let tag = input.read_raw_varint32().map_err(malformed)?;
        let (field, wire_type) = (tag >> 3, tag & 7);
        const LENGTH_DELIMITED: u32 = 2;
        if wire_type != LENGTH_DELIMITED {
            return Err(OptionsError::Malformed(format!(
                "field {field} has wire type {wire_type}"
            )));
        }
        let value = input.read_string().map_err(malformed)?;
        match field {
            // The type of ConfigBody; meaningless without a body.
            1 => {}
            2 => path = Some(value).filter(|p| !p.is_empty()),
            3 if value.is_empty() => {}
            3 => return Err(OptionsError::UnknownField("ConfigBody".into())),
            other => return Err(OptionsError::UnknownField(format!("field {other}"))),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fields: &[(u32, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (field, value) in fields {
            out.push(u8::try_from((field << 3) | 2).unwrap());
            out.push(u8::try_from(value.len()).unwrap());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    #[test]
    fn no_options_means_default_config() {
        assert_eq!(config_path(None), Ok(None));
        assert_eq!(config_path(Some(&Any::new())), Ok(None));
    }

    #[test]
    fn config_path_is_read() {
        let opts = any(RUNTIME_OPTIONS_TYPE, encode(&[(2, "/etc/husk/pods.toml")]));
        assert_eq!(
            config_path(Some(&opts)),
            Ok(Some("/etc/husk/pods.toml".into()))
        );
    }

    #[test]
    fn other_option_types_and_fields_are_rejected_by_name() {
        let runc = any("containerd.runc.v1.Options", vec![]);
        let e = config_path(Some(&runc)).unwrap_err().to_string();
        assert!(e.contains("containerd.runc.v1.Options"), "{e}");
        let body = any(RUNTIME_OPTIONS_TYPE, encode(&[(3, "[hypervisor]")]));
        assert!(config_path(Some(&body))
            .unwrap_err()
            .to_string()
            .contains("ConfigBody"));
        let garbage = any(RUNTIME_OPTIONS_TYPE, vec![0x12, 0x7f, b'x']);
        assert!(matches!(
            config_path(Some(&garbage)),
            Err(OptionsError::Malformed(_))
        ));
    }
}
