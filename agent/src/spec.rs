//! From the host's OCI JSON to what libcontainer is given: the container's
//! spec (root.path and linux.cgroupsPath set by the agent) and exec'd
//! processes, with HOME filled in from the container's own /etc/passwd.
//!
//! `process.oomScoreAdj` is taken out and applied by the agent to the new
//! pid instead: libcontainer writes it to the *calling* process's
//! /proc/self/oom_score_adj, i.e. the agent's, where every later container
//! would inherit it.

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{LinuxBuilder, LinuxNamespaceType, Process, Spec};

use crate::error::{Error, Result};
use crate::sysctl;

/// A spec ready for libcontainer, and what was taken out of it.
pub struct ContainerSpec {
    pub spec: Spec,
    pub oom_score_adj: Option<i32>,
    pub terminal: bool,
    /// Sysctls of namespaces the container shares with the VM, for the
    /// agent to set ([`crate::sysctl`]).
    pub vm_sysctls: Vec<(String, String)>,
}

/// A process ready for libcontainer's tenant builder.
pub struct ExecSpec {
    pub process: Process,
    pub oom_score_adj: Option<i32>,
    pub terminal: bool,
}

/// Parses the container's spec and points it at `rootfs` (an existing
/// directory) and the cgroup `cgroups_path` (e.g. `/husk/<id>`).
pub fn container_spec(
    id: &str,
    json: &[u8],
    rootfs: &Path,
    cgroups_path: &Path,
) -> Result<ContainerSpec> {
    let mut spec: Spec = serde_json::from_slice(json)
        .map_err(|e| Error::InvalidArgument(format!("container {id}: spec JSON: {e}")))?;
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));

    let mut linux = match spec.linux().clone() {
        Some(linux) => linux,
        None => LinuxBuilder::default()
            .build()
            .map_err(|e| Error::Internal(format!("empty linux section: {e}")))?,
    };
    // The host's cgroup path means nothing in the guest.
    linux.set_cgroups_path(Some(cgroups_path.to_path_buf()));
    let own_namespaces: Vec<LinuxNamespaceType> = linux
        .namespaces()
        .iter()
        .flatten()
        .map(|ns| ns.typ())
        .collect();
    let mut sysctls = linux.sysctl().clone().unwrap_or_default();
    let vm_sysctls = sysctl::take_vm_sysctls(&mut sysctls, &own_namespaces);
    linux.set_sysctl((!sysctls.is_empty()).then_some(sysctls));
    spec.set_linux(Some(linux));

    let Some(process) = spec.process().clone() else {
        return Err(Error::InvalidArgument(format!(
            "container {id}: spec has no process"
        )));
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "container {id}: process has no args"
        )));
    }
    let (process, oom_score_adj, terminal) = prepare_process(process, rootfs);
    spec.set_process(Some(process));
    Ok(ContainerSpec {
        spec,
        oom_score_adj,
        terminal,
        vm_sysctls,
    })
}

/// Parses an exec'd process of the container whose rootfs is `rootfs`.
pub fn exec_process(
    container_id: &str,
    exec_id: &str,
    json: &[u8],
    rootfs: &Path,
) -> Result<ExecSpec> {
    let process: Process = serde_json::from_slice(json).map_err(|e| {
        Error::InvalidArgument(format!(
            "exec {exec_id} in container {container_id}: process JSON: {e}"
        ))
    })?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "exec {exec_id} in container {container_id}: process has no args"
        )));
    }
    let (process, oom_score_adj, terminal) = prepare_process(process, rootfs);
    Ok(ExecSpec {
        process,
        oom_score_adj,
        terminal,
    })
}

fn prepare_process(mut process: Process, rootfs: &Path) -> (Process, Option<i32>, bool) {
    let oom_score_adj = process.oom_score_adj();
    process.set_oom_score_adj(None);
    // An explicit `false` means what an absent one does (runc reads a
    // bool), but libcontainer takes any present value to mean "load the
    // seccomp filter after dropping capabilities", where the load fails
    // without CAP_SYS_ADMIN.
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
    let terminal = process.terminal().unwrap_or(false);
    let mut env = process.env().clone().unwrap_or_default();
    let has_home = env
        .iter()
        .any(|v| v.strip_prefix("HOME=").is_some_and(|h| !h.is_empty()));
    if !has_home {
        // libcontainer would call getpwuid() otherwise: a name-service
        // lookup, from a static binary, inside the container's root.
        env.retain(|v| !v.starts_with("HOME="));
        let uid = process.user().uid();
        let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
        let home = home_from_passwd(&passwd, uid).unwrap_or_else(|| "/".to_owned());
        env.push(format!("HOME={home}"));
    }
    process.set_env(Some(env));
    (process, oom_score_adj, terminal)
}

/// The home directory of `uid` in passwd(5) text; `None` if it has no entry
/// (runc then uses `/` too).
pub fn home_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some(fields[5].to_owned()).filter(|h| !h.is_empty())
    })
}

/// `/` + `cgroup_parent` + `/` + `id`, the spec's linux.cgroupsPath.
pub fn cgroups_path(cgroup_parent: &str, id: &str) -> PathBuf {
    Path::new("/").join(cgroup_parent).join(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\nbad line\nnohome:x:7:7:::/bin/sh\n";

    #[test]
    fn home_comes_from_the_containers_passwd() {
        assert_eq!(home_from_passwd(PASSWD, 0).as_deref(), Some("/root"));
        assert_eq!(
            home_from_passwd(PASSWD, 1000).as_deref(),
            Some("/home/user")
        );
        assert_eq!(home_from_passwd(PASSWD, 7), None);
        assert_eq!(home_from_passwd(PASSWD, 4242), None);
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        dir
    }

    #[test]
    fn container_spec_sets_root_cgroup_home_and_takes_oom_score() {
        let rootfs = rootfs();
        let json = br#"{"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":true},
            "process":{"args":["sh"],"cwd":"/","user":{"uid":1000,"gid":1000},
                       "env":["PATH=/bin"],"oomScoreAdj":500,"terminal":true},
            "linux":{"cgroupsPath":"/host/path"}}"#;
        let cgroup = cgroups_path("husk", "c1");
        let s = container_spec("c1", json, rootfs.path(), &cgroup).unwrap();
        assert_eq!(s.oom_score_adj, Some(500));
        assert!(s.terminal);
        let root = s.spec.root().clone().unwrap();
        assert_eq!(root.path(), rootfs.path());
        assert_eq!(root.readonly(), Some(true));
        let linux = s.spec.linux().clone().unwrap();
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/husk/c1")));
        let process = s.spec.process().clone().unwrap();
        assert_eq!(process.oom_score_adj(), None);
        assert_eq!(
            process.env().clone().unwrap(),
            ["PATH=/bin", "HOME=/home/user"]
        );
    }

    #[test]
    fn no_new_privileges_false_is_as_if_absent() {
        let rootfs = rootfs();
        let process = |nnp: &str| {
            let json = format!(r#"{{"args":["id"],"cwd":"/","user":{{"uid":0,"gid":0}}{nnp}}}"#);
            exec_process("c1", "e1", json.as_bytes(), rootfs.path())
                .unwrap()
                .process
                .no_new_privileges()
        };
        assert_eq!(process(r#","noNewPrivileges":false"#), None);
        assert_eq!(process(""), None);
        assert_eq!(process(r#","noNewPrivileges":true"#), Some(true));
    }

    #[test]
    fn explicit_home_is_kept_and_bad_json_is_named() {
        let rootfs = rootfs();
        let json = br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0},"env":["HOME=/x"]}"#;
        let e = exec_process("c1", "e1", json, rootfs.path()).unwrap();
        assert_eq!(e.process.env().clone().unwrap(), ["HOME=/x"]);
        assert_eq!(e.process.no_new_privileges(), None);

        let err = exec_process("c1", "e1", b"{not json", rootfs.path())
            .err()
            .unwrap();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("exec e1 in container c1")),
            "{err}"
        );
        let err = exec_process(
            "c1",
            "e1",
            br#"{"cwd":"/","user":{"uid":0,"gid":0}}"#,
            rootfs.path(),
        )
        .err()
        .unwrap();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("no args")),
            "{err}"
        );
        let err = container_spec(
            "c9",
            b"{\"ociVersion\": ",
            rootfs.path(),
            Path::new("/husk/c9"),
        )
        .err()
        .unwrap();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("container c9: spec JSON")),
            "{err}"
        );
    }
}
