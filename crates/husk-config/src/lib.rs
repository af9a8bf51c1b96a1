//! husk's runtime configuration (`husk.toml`): parsing, defaults, lookup and
//! validation. `configs/husk.toml` is the documented default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variable naming a config file to use instead of the defaults.
pub const CONFIG_ENV: &str = "HUSK_CONFIG";
/// The admin's config file.
pub const SYSTEM_CONFIG: &str = "/etc/husk/husk.toml";

/// Errors finding or reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("no husk config found: set ${CONFIG_ENV}, create {SYSTEM_CONFIG}, or run `make install` (tried {tried})")]
    NotFound { tried: String },
}

mod choices;
pub use choices::{CachePolicy, Console, HostProfile, TemplatePolicy};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cpuid_hide: Vec<String>,
    pub host_profile: HostProfile,
    pub kernel_args: String,
    pub console: Console,
    /// The guest kernel's console log level (`loglevel=`); 4 is `quiet`.
    pub guest_loglevel: u8,
    /// Each VMM thread (vCPUs, device workers, guest log) runs under its
    /// own seccomp filter, and the shim under a deny list. Off only to
    /// debug a filter.
    pub seccomp: bool,
    /// Sandboxes restore a snapshot of a booted guest instead of booting.
    pub template: TemplatePolicy,
    /// Where templates live; unset: `<state_dir>/templates`.
    pub template_dir: Option<PathBuf>,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            kernel: "vmlinux".into(),
            initrd: "initrd.cpio".into(),
            vcpus: 1,
            memory_mib: 256,
            cpuid_hide: Vec::new(),
            host_profile: HostProfile::Auto,
            kernel_args: String::new(),
            console: Console::Log,
            guest_loglevel: DEFAULT_GUEST_LOGLEVEL,
            seccomp: true,
            template: TemplatePolicy::Auto,
            template_dir: None,
        }
    }
}

/// The guest kernel's console log level unless configured: what `quiet`
/// gives (errors and worse). Every console byte is a port I/O exit.
pub const DEFAULT_GUEST_LOGLEVEL: u8 = 4;

/// Timeouts for the agent. Unset ones take the defaults of the host kind
/// (see [`AgentConfig::timeouts`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub boot_timeout_secs: Option<u64>,
    pub boot_max_secs: Option<u64>,
    pub request_timeout_secs: Option<u64>,
    pub kill_grace_secs: Option<u64>,
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            boot_timeout_secs: None,
            boot_max_secs: None,
            request_timeout_secs: None,
            kill_grace_secs: None,
            log_level: "info".into(),
        }
    }
}

/// The agent timeouts in force on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentTimeouts {
    /// A boot fails once the guest shows no progress for this long.
    pub boot_stall: Duration,
    /// A boot fails after this long whatever it shows.
    pub boot_max: Duration,
    /// One agent request (create, exec, ...).
    pub request: Duration,
    /// How long a SIGKILL to the last process of a VM may go unanswered
    /// before the VM is stopped and the exit reported anyway.
    pub kill_grace: Duration,
}

impl AgentTimeouts {
    /// Bare-metal KVM: a guest boots in ~0.1 s and a request takes
    /// milliseconds; the bounds only catch a broken guest, quickly.
    pub const NATIVE: AgentTimeouts = AgentTimeouts {
        boot_stall: Duration::from_secs(30),
        boot_max: Duration::from_secs(120),
        request: Duration::from_secs(60),
        kill_grace: Duration::from_secs(10),
    };
    /// Nested PVM: guest kernel code is emulated, and hosts of one kind
    /// differ 7x: a boot took 33 s on one and 247-300 s on another, a
    /// container's first create minutes. The stall bound is twice the
    /// slowest whole boot seen, the cap twelve times it.
    pub const NESTED: AgentTimeouts = AgentTimeouts {
        boot_stall: Duration::from_secs(600),
        boot_max: Duration::from_secs(3600),
        request: Duration::from_secs(1200),
        kill_grace: Duration::from_secs(120),
    };
}

impl AgentConfig {
    /// The timeouts for a host: configured values, else that host kind's
    /// defaults. The cap is never below the stall bound.
    pub fn timeouts(&self, nested_host: bool) -> AgentTimeouts {
        let defaults = if nested_host {
            AgentTimeouts::NESTED
        } else {
            AgentTimeouts::NATIVE
        };
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        let boot_stall = secs(self.boot_timeout_secs, defaults.boot_stall);
        AgentTimeouts {
            boot_stall,
            boot_max: secs(self.boot_max_secs, defaults.boot_max).max(boot_stall),
            request: secs(self.request_timeout_secs, defaults.request),
            kill_grace: secs(self.kill_grace_secs, defaults.kill_grace),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedFsConfig {
    pub cache: CachePolicy,
    pub xattr: bool,
}

impl Default for SharedFsConfig {
    fn default() -> Self {
        Self {
            cache: CachePolicy::Auto,
            xattr: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub log_level: String,
    pub state_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            state_dir: "/run/husk".into(),
        }
    }
}

/// The whole configuration. Paths are absolute after [`Config::load`].
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub agent: AgentConfig,
    pub shared_fs: SharedFsConfig,
    pub runtime: RuntimeConfig,
    /// The file this was read from.
    #[serde(skip)]
    pub source: PathBuf,
}

const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

fn one_of(
    path: &Path,
    field: &'static str,
    value: &str,
    allowed: &[&str],
) -> Result<(), ConfigError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message: format!("{value:?} is not one of {}", allowed.join(", ")),
        })
    }
}

impl Config {
    /// Parses `text` as read from `path`; relative paths in it are resolved
    /// against `path`'s directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.source = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("/"));
        let console = match &mut config.hypervisor.console {
            Console::File(p) => Some(p),
            Console::Log | Console::None => None,
        };
        for p in [
            Some(&mut config.hypervisor.kernel),
            Some(&mut config.hypervisor.initrd),
            Some(&mut config.runtime.state_dir),
            config.hypervisor.template_dir.as_mut(),
            console,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Where templates live (`[hypervisor] template_dir`, by default
    /// `<state_dir>/templates`).
    pub fn template_dir(&self) -> PathBuf {
        self.hypervisor
            .template_dir
            .clone()
            .unwrap_or_else(|| self.runtime.state_dir.join("templates"))
    }

    /// Reads and parses one file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The file to use: `$HUSK_CONFIG`, else [`SYSTEM_CONFIG`], else the
    /// installed default `<prefix>/share/husk/husk.toml` for a binary in
    /// `<prefix>/bin`.
    pub fn locate(env_value: Option<&str>, binary: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(path) = env_value.filter(|v| !v.is_empty()) {
            // Named explicitly: use it even if missing, so the error says so.
            return Ok(PathBuf::from(path));
        }
        let mut tried = vec![PathBuf::from(SYSTEM_CONFIG)];
        if let Some(prefix) = binary.and_then(Path::parent).and_then(Path::parent) {
            tried.push(prefix.join("share/husk/husk.toml"));
        }
        tried
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or_else(|| ConfigError::NotFound {
                tried: tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Finds and loads the configuration for this process.
    pub fn discover() -> Result<Self, ConfigError> {
        let env_value = std::env::var(CONFIG_ENV).ok();
        let binary = std::env::current_exe().ok();
        Self::load(&Self::locate(env_value.as_deref(), binary.as_deref())?)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let path = &self.source;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.clone(),
            field,
            message,
        };
        if !(1..=8).contains(&self.hypervisor.vcpus) {
            return Err(invalid("hypervisor.vcpus", "must be 1 to 8".into()));
        }
        if !(64..=1 << 20).contains(&self.hypervisor.memory_mib) {
            return Err(invalid(
                "hypervisor.memory_mib",
                "must be 64 MiB to 1 TiB".into(),
            ));
        }
        for (field, value) in [
            ("agent.boot_timeout_secs", self.agent.boot_timeout_secs),
            ("agent.boot_max_secs", self.agent.boot_max_secs),
            (
                "agent.request_timeout_secs",
                self.agent.request_timeout_secs,
            ),
        ] {
            if value == Some(0) {
                return Err(invalid(field, "must be positive".into()));
            }
        }
        if let (Some(stall), Some(max)) = (self.agent.boot_timeout_secs, self.agent.boot_max_secs) {
            if max < stall {
                return Err(invalid(
                    "agent.boot_max_secs",
                    format!("{max} is below agent.boot_timeout_secs ({stall})"),
                ));
            }
        }
        if self.hypervisor.guest_loglevel > 8 {
            return Err(invalid(
                "hypervisor.guest_loglevel",
                "must be 0 to 8 (kernel console log levels)".into(),
            ));
        }
        one_of(path, "agent.log_level", &self.agent.log_level, LOG_LEVELS)?;
        one_of(
            path,
            "runtime.log_level",
            &self.runtime.log_level,
            LOG_LEVELS,
        )?;
        Ok(())
    }

    /// Checks that the guest assets exist (done at VM start, not at parse
    /// time, so `husk check` can report them separately).
    pub fn check_guest_assets(&self) -> Result<(), ConfigError> {
        for (field, p) in [
            ("hypervisor.kernel", &self.hypervisor.kernel),
            ("hypervisor.initrd", &self.hypervisor.initrd),
        ] {
            if !p.is_file() {
                return Err(ConfigError::Invalid {
                    path: self.source.clone(),
                    field,
                    message: format!(
                        "{} does not exist (run `make guest` / `make install`)",
                        p.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../../configs/husk.toml");

    #[test]
    fn shipped_default_parses_to_the_built_in_defaults() {
        let config = Config::parse(DEFAULT, Path::new("/opt/husk/share/husk/husk.toml")).unwrap();
        let mut expected = Config {
            source: "/opt/husk/share/husk/husk.toml".into(),
            ..Default::default()
        };
        expected.hypervisor.kernel = "/opt/husk/share/husk/vmlinux".into();
        expected.hypervisor.initrd = "/opt/husk/share/husk/initrd.cpio".into();
        assert_eq!(config, expected);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let path = Path::new("/etc/husk/husk.toml");
        let e = Config::parse("[hypervisor]\nvcpu = 2\n", path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vcpu") && e.contains("/etc/husk/husk.toml"),
            "{e}"
        );
        let e = Config::parse("[hypervisor]\nvcpus = 0\n", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hypervisor.vcpus"), "{e}");
        let e = Config::parse("[shared_fs]\ncache = \"sometimes\"\n", path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shared_fs.cache") && e.contains("sometimes"),
            "{e}"
        );
        let e = Config::parse("[nonsense]\n", path).unwrap_err().to_string();
        assert!(e.contains("nonsense"), "{e}");
    }

    #[test]
    fn choices_parse_into_enums() {
        let path = Path::new("/etc/husk/husk.toml");
        let config = Config::parse(
            "[hypervisor]\nhost_profile = \"nested-pvm\"\nconsole = \"none\"\n\
             [shared_fs]\ncache = \"metadata\"\n",
            path,
        )
        .unwrap();
        assert_eq!(config.hypervisor.host_profile, HostProfile::NestedPvm);
        assert_eq!(config.hypervisor.console, Console::None);
        assert_eq!(config.shared_fs.cache, CachePolicy::Metadata);

        let config = Config::parse("[hypervisor]\nconsole = \"console.log\"\n", path).unwrap();
        assert_eq!(
            config.hypervisor.console,
            Console::File("/etc/husk/console.log".into()),
            "relative to the config's directory"
        );
        let config = Config::parse("[hypervisor]\nconsole = \"/var/log/c\"\n", path).unwrap();
        assert_eq!(
            config.hypervisor.console,
            Console::File("/var/log/c".into())
        );
        assert_eq!("native".parse(), Ok(HostProfile::Native));
        assert_eq!("log".parse(), Ok(Console::Log));
    }

    #[test]
    fn bad_choices_name_the_key_and_the_allowed_values() {
        let path = Path::new("/etc/husk/husk.toml");
        for (bad, key, allowed) in [
            (
                "[hypervisor]\nhost_profile = \"pvm\"\n",
                "hypervisor.host_profile",
                "auto, native, nested-pvm",
            ),
            (
                "[shared_fs]\ncache = \"sometimes\"\n",
                "shared_fs.cache",
                "never, metadata, auto, always",
            ),
            (
                "[hypervisor]\nconsole = \"\"\n",
                "hypervisor.console",
                "\"log\", \"none\" or a file path",
            ),
            ("[hypervisor]\nhost_profile = 1\n", "host_profile", "string"),
        ] {
            let e = Config::parse(bad, path).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains(allowed) && e.contains("/etc/husk/husk.toml"),
                "{bad:?}: {e}"
            );
        }
        let e = "pvm".parse::<HostProfile>().unwrap_err();
        assert!(
            e.contains("\"pvm\" is not one of auto, native, nested-pvm"),
            "{e}"
        );
    }

    #[test]
    fn timeouts_follow_the_host_unless_configured() {
        let path = Path::new("/etc/husk/husk.toml");
        let defaults = Config::parse("", path).unwrap().agent;
        assert_eq!(defaults.timeouts(false), AgentTimeouts::NATIVE);
        assert_eq!(defaults.timeouts(true), AgentTimeouts::NESTED);
        let set = Config::parse(
            "[agent]\nboot_timeout_secs = 900\nrequest_timeout_secs = 5\n",
            path,
        )
        .unwrap()
        .agent;
        let native = set.timeouts(false);
        assert_eq!(native.boot_stall, Duration::from_secs(900));
        assert_eq!(
            native.boot_max,
            Duration::from_secs(900),
            "cap never below stall"
        );
        assert_eq!(native.request, Duration::from_secs(5));
        assert_eq!(set.timeouts(true).boot_max, AgentTimeouts::NESTED.boot_max);
        for (bad, field) in [
            (
                "[agent]\nrequest_timeout_secs = 0\n",
                "agent.request_timeout_secs",
            ),
            (
                "[agent]\nboot_timeout_secs = 60\nboot_max_secs = 30\n",
                "agent.boot_max_secs",
            ),
            (
                "[hypervisor]\nguest_loglevel = 9\n",
                "hypervisor.guest_loglevel",
            ),
        ] {
            let e = Config::parse(bad, path).unwrap_err().to_string();
            assert!(e.contains(field), "{bad:?}: {e}");
        }
    }

    #[test]
    fn templates_are_auto_unless_turned_off() {
        let path = Path::new("/etc/husk/husk.toml");
        assert_eq!(
            Config::parse("", path).unwrap().hypervisor.template,
            TemplatePolicy::Auto
        );
        let off = Config::parse("[hypervisor]\ntemplate = \"off\"\n", path).unwrap();
        assert_eq!(off.hypervisor.template, TemplatePolicy::Off);
        let e = Config::parse("[hypervisor]\ntemplate = \"sometimes\"\n", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hypervisor.template"), "{e}");
    }

    #[test]
    fn seccomp_is_on_unless_turned_off() {
        let path = Path::new("/etc/husk/husk.toml");
        assert!(Config::parse("", path).unwrap().hypervisor.seccomp);
        let off = Config::parse("[hypervisor]\nseccomp = false\n", path).unwrap();
        assert!(!off.hypervisor.seccomp);
        let e = Config::parse("[hypervisor]\nseccomp = \"no\"\n", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("seccomp"), "{e}");
    }

    #[test]
    fn absolute_paths_are_kept() {
        let config = Config::parse(
            "[hypervisor]\nkernel = \"/boot/vmlinux\"\n",
            Path::new("/etc/husk/husk.toml"),
        )
        .unwrap();
        assert_eq!(config.hypervisor.kernel, Path::new("/boot/vmlinux"));
        assert_eq!(config.hypervisor.initrd, Path::new("/etc/husk/initrd.cpio"));
    }

    #[test]
    fn lookup_order() {
        assert_eq!(
            Config::locate(Some("/x/husk.toml"), None).unwrap(),
            Path::new("/x/husk.toml")
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("share/husk")).unwrap();
        let installed = dir.path().join("share/husk/husk.toml");
        std::fs::write(&installed, "").unwrap();
        let binary = dir.path().join("bin/containerd-shim-husk-v2");
        if !Path::new(SYSTEM_CONFIG).exists() {
            assert_eq!(Config::locate(None, Some(&binary)).unwrap(), installed);
            std::fs::remove_file(&installed).unwrap();
            let e = Config::locate(None, Some(&binary)).unwrap_err().to_string();
            assert!(
                e.contains(SYSTEM_CONFIG) && e.contains("share/husk/husk.toml"),
                "{e}"
            );
        }
    }

    #[test]
    fn missing_guest_assets_are_named() {
        let config = Config::parse("", Path::new("/nonexistent/husk.toml")).unwrap();
        let e = config.check_guest_assets().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
    }
}
