//! Turns the OCI spec containerd wrote for the host into the one the guest
//! runs: paths that only exist on the host are replaced by their shared
//! copies, and settings that name host objects are dropped.
//!
//! - `root.path` becomes the container's rootfs in the virtio-fs share.
//! - Bind mounts of host paths are shared too (see rootfs.rs) and point at
//!   the guest path of their copy; other mounts (proc, tmpfs, ...) are made
//!   in the guest as they are.
//! - Namespaces given by path (`/var/run/netns/...`, `/proc/<pid>/ns/...`)
//!   are host objects. A pod is one VM: the network, IPC and UTS namespaces
//!   of the VM itself are the pod's, so those entries are dropped. A pod's
//!   shared PID namespace (`shareProcessNamespace`: CRI names the sandbox's
//!   `/proc/<pid>/ns/pid`, with the pid this shim reported, which is the
//!   sandbox container's pid in the guest) keeps its path, which names the
//!   same namespace in the guest; any other namespace keeps its type and
//!   loses its path.
//! - Hooks run host binaries, AppArmor/SELinux labels name host policy,
//!   `cgroupsPath` is a host cgroup: dropped (the agent places containers in
//!   the guest's cgroup tree).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where the virtio-fs share appears in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/husk/shared";

/// Errors reading or rewriting a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("bundle {bundle} has no config.json: {source}")]
    Missing {
        bundle: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid OCI spec {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("invalid OCI process spec: {0}")]
    InvalidProcess(String),
}

/// A host path the guest needs, shared as `<share>/<container>/mounts/<index>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    pub index: usize,
    pub host_source: PathBuf,
    pub read_only: bool,
}

/// The guest's spec (JSON) and the host paths to share for it.
#[derive(Debug)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    pub binds: Vec<SharedBind>,
    pub terminal: bool,
}

/// CRI annotations on a pod's sandbox (and containers).
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
const SANDBOX_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";
const SANDBOX_CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// What the VM needs to know from the spec of the task that boots it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// This task is a CRI pod sandbox (the pause container).
    pub is_sandbox: bool,
    /// The pod's network namespace (CNI has set it up).
    pub netns: Option<PathBuf>,
    pub hostname: Option<String>,
    /// The pod's memory limit (all containers), bytes.
    pub memory_limit: Option<u64>,
    /// The pod's CPU limit, in whole CPUs rounded up.
    pub cpus: Option<u8>,
    /// The host cgroup containerd gave this task (`linux.cgroupsPath`):
    /// the VM runs in it when this task boots the VM.
    pub cgroups_path: Option<String>,
}

fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?.get(key)?.as_str()
}

/// Reads [`PodInfo`] from a spec.
pub fn pod_info(spec: &Value) -> PodInfo {
    let netns = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .and_then(|nss| {
            nss.iter()
                .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))
        })
        .and_then(|ns| ns.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let number = |key| annotation(spec, key).and_then(|v| v.trim().parse::<i64>().ok());
    let cpus = match (
        number(SANDBOX_CPU_QUOTA_ANNOTATION),
        number(SANDBOX_CPU_PERIOD_ANNOTATION),
    ) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => {
            Some(u8::try_from((quota + period - 1) / period).unwrap_or(u8::MAX))
        }
        _ => None,
    };
    PodInfo {
        is_sandbox: annotation(spec, CONTAINER_TYPE_ANNOTATION) == Some("sandbox"),
        netns,
        hostname: spec
            .get("hostname")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_string),
        cgroups_path: spec
            .pointer("/linux/cgroupsPath")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(str::to_string),
        memory_limit: number(SANDBOX_MEMORY_ANNOTATION)
            .and_then(|m| u64::try_from(m).ok())
            .filter(|m| *m > 0),
        cpus,
    }
}

/// Guest path of a container's rootfs.
pub fn guest_rootfs(container_id: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/rootfs")
}

fn guest_bind_path(container_id: &str, index: usize) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/mounts/{index}")
}

/// Reads `<bundle>/config.json`, validated by oci-spec, as JSON to rewrite.
pub fn load(bundle: &Path) -> Result<Value, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| SpecError::Missing {
        bundle: bundle.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| SpecError::Invalid {
        path: path.clone(),
        message,
    };
    serde_json::from_slice::<oci_spec::runtime::Spec>(&text).map_err(|e| invalid(e.to_string()))?;
    let spec: Value = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if spec.get("process").is_none() {
        return Err(invalid("no process to run".into()));
    }
    Ok(spec)
}

fn is_bind(mount: &Value) -> bool {
    mount.get("type").and_then(Value::as_str) == Some("bind")
        || mount
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn strip_host_security(process: &mut Value) {
    if let Some(p) = process.as_object_mut() {
        p.remove("apparmorProfile");
        p.remove("selinuxLabel");
    }
}

/// Rewrites `spec` for container `container_id` in the guest.
/// `pod_sandbox`: the task is a pod's sandbox container, whose network, IPC
/// and UTS namespaces are the VM's own (every container of the pod then
/// shares them by using the VM's). `sandbox_pid`: the guest pid of the
/// pod's sandbox container, when this is another container of its pod (a
/// PID namespace path naming it is kept).
pub fn for_guest(
    mut spec: Value,
    container_id: &str,
    pod_sandbox: bool,
    sandbox_pid: Option<u32>,
) -> Result<GuestSpec, SpecError> {
    let pod_pid_namespace = sandbox_pid.map(|pid| format!("/proc/{pid}/ns/pid"));
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| SpecError::InvalidProcess("spec is not an object".into()))?;
    obj.insert(
        "root".into(),
        serde_json::json!({
            "path": guest_rootfs(container_id),
            "readonly": obj.get("root").and_then(|r| r.get("readonly")).cloned().unwrap_or(Value::Bool(false)),
        }),
    );
    if let Some(hooks) = obj.remove("hooks") {
        if !hooks.is_null() {
            tracing::warn!(
                container_id,
                "dropping OCI hooks: they would run host binaries"
            );
        }
    }
    let terminal = obj
        .get("process")
        .and_then(|p| p.get("terminal"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(process) = obj.get_mut("process") {
        strip_host_security(process);
    }

    let mut binds = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for mount in mounts.iter_mut().filter(|m| is_bind(m)) {
            let Some(source) = mount.get("source").and_then(Value::as_str) else {
                continue;
            };
            let read_only = mount
                .get("options")
                .and_then(Value::as_array)
                .is_some_and(|o| o.iter().any(|x| x == "ro"));
            let index = binds.len();
            binds.push(SharedBind {
                index,
                host_source: PathBuf::from(source),
                read_only,
            });
            mount["source"] = Value::String(guest_bind_path(container_id, index));
        }
    }

    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("cgroupsPath");
        linux.remove("mountLabel");
        if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            namespaces.retain(|ns| {
                let kind = ns.get("type").and_then(Value::as_str).unwrap_or_default();
                let has_path = ns.get("path").is_some_and(|p| p.as_str() != Some(""));
                // The VM's own network namespace is the pod's network.
                kind != "network" && !((has_path || pod_sandbox) && matches!(kind, "ipc" | "uts"))
            });
            for ns in namespaces.iter_mut() {
                let Some(ns) = ns.as_object_mut() else {
                    continue;
                };
                let is_pid = ns.get("type").and_then(Value::as_str) == Some("pid");
                let path = ns.get("path").and_then(Value::as_str);
                if is_pid && path.is_some() && path == pod_pid_namespace.as_deref() {
                    continue;
                }
                if let Some(path) = ns.remove("path").filter(|p| p.as_str() != Some("")) {
                    if is_pid {
                        tracing::warn!(
                            container_id,
                            "PID namespace {path} is not this pod's sandbox: the container gets its own"
                        );
                    }
                }
            }
        }
    }

    // A hostname needs a UTS namespace of the container's own; without one
    // the container uses the VM's, whose hostname the sandbox sets.
    let has_uts = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|nss| {
            nss.iter()
                .any(|ns| ns.get("type").and_then(Value::as_str) == Some("uts"))
        });
    if !has_uts {
        if let Some(obj) = spec.as_object_mut() {
            obj.remove("hostname");
        }
    }

    let json = serde_json::to_vec(&spec).map_err(|e| SpecError::InvalidProcess(e.to_string()))?;
    Ok(GuestSpec {
        json,
        binds,
        terminal,
    })
}

/// Validates and cleans an exec process spec (JSON from containerd).
pub fn exec_process_for_guest(json: &[u8]) -> Result<Vec<u8>, SpecError> {
    serde_json::from_slice::<oci_spec::runtime::Process>(json)
        .map_err(|e| SpecError::InvalidProcess(e.to_string()))?;
    let mut process: Value =
        serde_json::from_slice(json).map_err(|e| SpecError::InvalidProcess(e.to_string()))?;
    strip_host_security(&mut process);
    serde_json::to_vec(&process).map_err(|e| SpecError::InvalidProcess(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cri_like_spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": true, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/",
                        "apparmorProfile": "cri-containerd.apparmor.d"},
            "root": {"path": "rootfs", "readonly": true},
            "hooks": {"createRuntime": [{"path": "/usr/local/bin/nerdctl"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/cri/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"]}
            ],
            "linux": {
                "cgroupsPath": "/k8s/pod1/c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts"},
                    {"type": "mount"}
                ]
            }
        })
    }

    #[test]
    fn rewrites_host_paths_for_the_guest() {
        let guest = for_guest(cri_like_spec(), "c1", false, None).unwrap();
        let spec: Value = serde_json::from_slice(&guest.json).unwrap();
        assert_eq!(
            spec["root"],
            json!({"path": "/run/husk/shared/c1/rootfs", "readonly": true})
        );
        assert!(spec.get("hooks").is_none());
        assert!(spec["process"].get("apparmorProfile").is_none());
        assert!(spec["linux"].get("cgroupsPath").is_none());
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/husk/shared/c1/mounts/0");
        assert_eq!(spec["mounts"][2]["source"], "/run/husk/shared/c1/mounts/1");
        assert_eq!(
            guest.binds,
            vec![
                SharedBind {
                    index: 0,
                    host_source: "/var/lib/cri/hosts".into(),
                    read_only: true
                },
                SharedBind {
                    index: 1,
                    host_source: "/srv/data".into(),
                    read_only: false
                },
            ]
        );
        let kinds: Vec<_> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["pid", "uts", "mount"]);
        assert!(guest.terminal);
    }

    /// `shareProcessNamespace`: CRI names the sandbox's PID namespace by the
    /// pid the shim reported for it, a guest pid, so the path is kept; any
    /// other PID namespace path names a host process and is dropped.
    #[test]
    fn only_the_pods_pid_namespace_is_joined_by_path() {
        let pid_namespace = |spec: &Value| -> Value {
            spec["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["type"] == "pid")
                .unwrap()
                .clone()
        };
        let mut spec = cri_like_spec();
        spec["linux"]["namespaces"][0] = json!({"type": "pid", "path": "/proc/7/ns/pid"});
        let shared: Value =
            serde_json::from_slice(&for_guest(spec.clone(), "c1", false, Some(7)).unwrap().json)
                .unwrap();
        assert_eq!(
            pid_namespace(&shared),
            json!({"type": "pid", "path": "/proc/7/ns/pid"})
        );
        for sandbox_pid in [Some(8), None] {
            let own: Value = serde_json::from_slice(
                &for_guest(spec.clone(), "c1", false, sandbox_pid)
                    .unwrap()
                    .json,
            )
            .unwrap();
            assert_eq!(
                pid_namespace(&own),
                json!({"type": "pid"}),
                "{sandbox_pid:?}"
            );
        }
        spec["linux"]["namespaces"][0] =
            json!({"type": "pid", "path": "/proc/7/ns/pid/../../1/ns/pid"});
        let sneaky: Value =
            serde_json::from_slice(&for_guest(spec, "c1", false, Some(7)).unwrap().json).unwrap();
        assert_eq!(pid_namespace(&sneaky), json!({"type": "pid"}));
    }

    #[test]
    fn pod_sandbox_uses_the_vms_namespaces_and_sizes_the_vm() {
        let mut spec = cri_like_spec();
        spec["hostname"] = json!("pod-a");
        spec["annotations"] = json!({
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-memory": "268435456",
            "io.kubernetes.cri.sandbox-cpu-quota": "150000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000"
        });
        let info = pod_info(&spec);
        assert_eq!(
            info,
            PodInfo {
                is_sandbox: true,
                netns: Some("/var/run/netns/cni-1".into()),
                hostname: Some("pod-a".into()),
                memory_limit: Some(256 << 20),
                cpus: Some(2),
                cgroups_path: Some("/k8s/pod1/c1".into()),
            }
        );
        let guest: Value =
            serde_json::from_slice(&for_guest(spec, "pod", true, None).unwrap().json).unwrap();
        let kinds: Vec<_> = guest["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["pid", "mount"]);
        assert!(
            guest.get("hostname").is_none(),
            "no UTS namespace of its own: no hostname"
        );
        // Without annotations nothing is sized.
        assert_eq!(pod_info(&cri_like_spec()).memory_limit, None);
    }

    #[test]
    fn missing_and_malformed_bundles_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains(&dir.path().display().to_string()),
            "{e}"
        );
        std::fs::write(dir.path().join("config.json"), b"{\"process\": 7}").unwrap();
        assert!(matches!(load(dir.path()), Err(SpecError::Invalid { .. })));
        std::fs::write(dir.path().join("config.json"), b"not json").unwrap();
        assert!(matches!(load(dir.path()), Err(SpecError::Invalid { .. })));
    }

    #[test]
    fn exec_specs_are_validated() {
        let ok =
            br#"{"args": ["ls"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "selinuxLabel": "x"}"#;
        let cleaned: Value = serde_json::from_slice(&exec_process_for_guest(ok).unwrap()).unwrap();
        assert!(cleaned.get("selinuxLabel").is_none());
        assert!(exec_process_for_guest(b"{\"args\": 3}").is_err());
    }
}
