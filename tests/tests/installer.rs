//! The Kubernetes node installer (configs/kubernetes/husk-install.sh), its
//! image (scripts/build-installer-image.sh), and the manifests and containerd
//! snippets it ships. Fast: no VM.
//!
//! The script runs under busybox's shell, as in its image, against a temp
//! HOST_ROOT, with busybox's applets as its tools and stand-ins for what it
//! reaches outside: nsenter (which runs the command "on the host", i.e. with
//! HOST_ROOT in front of absolute paths), containerd, systemctl, kubectl and
//! the payload's `husk`. The stand-ins log their calls. Where root, containerd
//! and runc are available, containerd 1.6 also loads the configs the script
//! writes, and the image is imported and runs the script with runc.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_tests::image::BUSYBOX;
use husk_tests::workspace_root;
use sha2::{Digest, Sha256};

const SHIM: &str = "containerd-shim-husk-v2";
const CRI_1X: &str = "io.containerd.grpc.v1.cri";
const CRI_2X: &str = "io.containerd.cri.v1.runtime";
const CONTAINERD_1_6: &str = "1.6.20~ds1";
const CONTAINERD_2_0: &str = "v2.0.4";

fn script() -> PathBuf {
    workspace_root().join("configs/kubernetes/husk-install.sh")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn write_exec(path: &Path, text: &str) {
    // create_new: never write through an applet symlink onto busybox itself.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Stand-ins, all logging `<name> <args>` to $STUB_LOG.
const STUB_NSENTER: &str = r#"#!/bin/busybox sh
# nsenter -t 1 ... -- CMD ARGS, "on the host": the host is $HOST_ROOT.
echo "nsenter $*" >>"$STUB_LOG"
while [ $# -gt 0 ] && [ "$1" != -- ]; do shift; done
[ "${1:-}" = -- ] || { echo "stub nsenter: no --" >&2; exit 2; }
shift
cmd="$1"
shift
case "$cmd" in /*) cmd="$HOST_ROOT$cmd" ;; esac
n=$#
for a in "$@"; do
    case "$a" in /*) a="$HOST_ROOT$a" ;; esac
    set -- "$@" "$a"
done
shift "$n"
exec "$cmd" "$@"
"#;

const STUB_CONTAINERD: &str = r#"#!/bin/busybox sh
echo "containerd $*" >>"$STUB_LOG"
case "$1" in
    --version)
        echo "containerd github.com/containerd/containerd $STUB_CONTAINERD_VERSION 0123456789abcdef"
        ;;
    --config)
        [ -s "$2" ] || { echo "stub containerd: $2 is missing or empty" >&2; exit 1; }
        if [ -n "${STUB_CONTAINERD_REJECT:-}" ]; then
            echo "containerd: failed to load TOML: $2: (9, 1): duplicated tables" >&2
            exit 1
        fi
        # The real one, if any, parses the file as containerd would.
        if [ -n "${STUB_REAL_CONTAINERD:-}" ]; then exec "$STUB_REAL_CONTAINERD" "$@"; fi
        ;;
    *) echo "stub containerd: unexpected $*" >&2; exit 2 ;;
esac
"#;

const STUB_SYSTEMCTL: &str = r#"#!/bin/busybox sh
echo "systemctl $*" >>"$STUB_LOG"
# STUB_SYSTEMCTL_FAILURES: how many calls fail, counted in a file.
count="$STUB_LOG.systemctl-failures"
[ -f "$count" ] || echo "${STUB_SYSTEMCTL_FAILURES:-0}" >"$count"
left="$(cat "$count")"
if [ "$left" -gt 0 ]; then
    echo $((left - 1)) >"$count"
    echo "Job for containerd.service failed" >&2
    exit 1
fi
"#;

const STUB_KUBECTL: &str = r#"#!/bin/busybox sh
echo "kubectl $*" >>"$STUB_LOG"
"#;

/// The payload's `husk`: `husk check` passes unless FAKE_HUSK_CHECK_FAILS.
const FAKE_HUSK: &str = r#"#!/bin/busybox sh
echo "husk $* HUSK_CONFIG=$HUSK_CONFIG" >>"$STUB_LOG"
if [ -n "${FAKE_HUSK_CHECK_FAILS:-}" ]; then
    echo "FAIL  /dev/kvm: cannot open: No such file or directory"
    exit 1
fi
echo "PASS  /dev/kvm: opened read/write, KVM API version 12"
"#;

/// Writes a `make install DESTDIR=<root> PREFIX=/opt/husk` look-alike.
fn fake_payload(root: &Path) {
    let prefix = root.join("opt/husk");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("share/husk")).unwrap();
    write_exec(
        &prefix.join(format!("bin/{SHIM}")),
        "#!/bin/sh\necho shim v1\n",
    );
    write_exec(&prefix.join("bin/husk-vmm"), "#!/bin/sh\necho vmm\n");
    write_exec(&prefix.join("bin/husk"), FAKE_HUSK);
    for (name, text) in [
        ("vmlinux", "fake kernel"),
        ("initrd.cpio", "fake initramfs"),
        ("husk.toml", "[hypervisor]\nvcpus = 1\n"),
    ] {
        let path = prefix.join("share/husk").join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// A node: HOST_ROOT, the tools the script finds on PATH, the payload.
struct Node {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Node {
    fn new() -> Node {
        Self::with_kubectl(true)
    }

    fn with_kubectl(kubectl: bool) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("husk-install")
            .tempdir()
            .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(dir.path().join("host")).unwrap();
        write_exec(&bin.join("nsenter-stub"), STUB_NSENTER);
        write_exec(&bin.join("containerd"), STUB_CONTAINERD);
        write_exec(&bin.join("systemctl"), STUB_SYSTEMCTL);
        if kubectl {
            write_exec(&bin.join("kubectl"), STUB_KUBECTL);
        }
        // The image's tools: busybox applets, nothing from the host.
        let list = Command::new(BUSYBOX)
            .arg("--list")
            .output()
            .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (install Debian's busybox-static)"));
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let link = bin.join(applet);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(BUSYBOX, link).unwrap();
            }
        }
        fake_payload(&dir.path().join("payload"));
        let d = dir.path();
        let mut env = vec![
            ("PATH".into(), bin.display().to_string()),
            ("HOST_ROOT".into(), d.join("host").display().to_string()),
            (
                "HUSK_PAYLOAD".into(),
                d.join("payload/opt/husk").display().to_string(),
            ),
            (
                "HUSK_NSENTER".into(),
                bin.join("nsenter-stub").display().to_string(),
            ),
            (
                "HUSK_READY_FILE".into(),
                d.join("ready").display().to_string(),
            ),
            ("STUB_LOG".into(), d.join("log").display().to_string()),
            ("STUB_CONTAINERD_VERSION".into(), CONTAINERD_1_6.into()),
            ("NODE_NAME".into(), "node-1".into()),
        ];
        if Path::new("/usr/bin/containerd").is_file() {
            env.push(("STUB_REAL_CONTAINERD".into(), "/usr/bin/containerd".into()));
        }
        Node { dir, env }
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A host path as the script sees it.
    fn host(&self, path: &str) -> PathBuf {
        self.path("host").join(path.trim_start_matches('/'))
    }

    fn config_path(&self) -> PathBuf {
        self.host("/etc/containerd/config.toml")
    }

    fn write_config(&self, text: &str, mode: u32) {
        let path = self.config_path();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.config_path()).unwrap()
    }

    fn backups(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.host("/etc/containerd"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        found.retain(|p| p.to_string_lossy().contains(".husk-backup-"));
        found.sort();
        found
    }

    /// The stand-ins' calls since the last `take_log`.
    fn take_log(&self) -> Vec<String> {
        let path = self.path("log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(self.path("log.systemctl-failures"));
        text.lines().map(str::to_string).collect()
    }

    fn command(&self, shell: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(shell);
        if shell == BUSYBOX {
            cmd.arg("sh");
        }
        cmd.arg(script())
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    fn run_with(&self, shell: &str, args: &[&str]) -> Run {
        let out: Output = self.command(shell, args).output().unwrap();
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with(BUSYBOX, args)
    }

    /// Runs `install` and insists that it succeeds.
    fn install(&self) -> Run {
        let run = self.run(&["install"]);
        assert!(
            run.ok,
            "install failed\nstdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
        run
    }
}

fn restarts(log: &[String]) -> usize {
    log.iter()
        .filter(|l| *l == "systemctl restart containerd")
        .count()
}

fn parse_toml(text: &str) -> toml::Value {
    toml::Value::Table(
        toml::from_str::<toml::Table>(text)
            .unwrap_or_else(|e| panic!("not valid TOML: {e}\n{text}")),
    )
}

fn at<'a>(value: &'a toml::Value, path: &[&str]) -> &'a toml::Value {
    path.iter().fold(value, |v, key| {
        v.get(key)
            .unwrap_or_else(|| panic!("no {} in\n{value}", path.join(" -> ")))
    })
}

fn runtime<'a>(config: &'a toml::Value, plugin: &str, name: &str) -> &'a toml::Value {
    at(config, &["plugins", plugin, "containerd", "runtimes", name])
}

/// The husk runtime as the installer registers it (prefix /opt/husk).
fn assert_husk_runtime(config: &toml::Value, plugin: &str) {
    let husk = runtime(config, plugin, "husk");
    assert_eq!(
        at(husk, &["runtime_type"]).as_str(),
        Some("io.containerd.husk.v2")
    );
    assert_eq!(
        at(husk, &["runtime_path"]).as_str(),
        Some("/opt/husk/bin/containerd-shim-husk-v2")
    );
    assert_eq!(
        at(husk, &["privileged_without_host_devices"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        at(husk, &["options", "ConfigPath"]).as_str(),
        Some("/opt/husk/share/husk/husk.toml")
    );
}

fn runtime_names(config: &toml::Value, plugin: &str) -> Vec<String> {
    let runtimes = at(config, &["plugins", plugin, "containerd", "runtimes"]);
    let mut names: Vec<String> = runtimes.as_table().unwrap().keys().cloned().collect();
    names.sort();
    names
}

const V2_WITH_RUNC: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true


"#;

/// A CRI section, and the runtimes parent table of `containerd config
/// default`, but no runtime.
const V2_NO_RUNTIMES: &str = r#"version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
"#;

const V3_WITH_RUNC: &str = r#"version = 3
root = '/var/lib/containerd'

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = 'registry.k8s.io/pause:3.10'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'

  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    SystemdCgroup = true
"#;

#[test]
fn fresh_node_gets_files_links_config_check_and_label() {
    let node = Node::new();
    let run = node.install();
    let log = node.take_log();

    let payload = node.path("payload/opt/husk");
    for (rel, want) in [
        (format!("bin/{SHIM}"), 0o755),
        ("bin/husk".into(), 0o755),
        ("bin/husk-vmm".into(), 0o755),
        ("share/husk/vmlinux".into(), 0o644),
        ("share/husk/initrd.cpio".into(), 0o644),
        ("share/husk/husk.toml".into(), 0o644),
    ] {
        let installed = node.host("/opt/husk").join(&rel);
        assert_eq!(mode(&installed), want, "{rel}");
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(payload.join(&rel)).unwrap(),
            "{rel}"
        );
    }
    for name in [SHIM, "husk"] {
        let link = node.host("/usr/local/bin").join(name);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/opt/husk/bin").join(name)
        );
    }

    let text = node.config();
    assert_eq!(mode(&node.config_path()), 0o644);
    let config = parse_toml(&text);
    assert_eq!(at(&config, &["version"]).as_integer(), Some(2));
    assert_husk_runtime(&config, CRI_1X);
    // Declaring husk alone would drop containerd's default runc.
    assert_eq!(runtime_names(&config, CRI_1X), ["husk", "runc"]);
    assert_eq!(
        at(runtime(&config, CRI_1X, "runc"), &["runtime_type"]).as_str(),
        Some("io.containerd.runc.v2")
    );
    assert!(node.backups().is_empty(), "nothing to back up");
    assert!(!node.host("/etc/containerd/config.toml.husk-new").exists());

    assert!(
        log.contains(&"nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd".into()),
        "{log:#?}"
    );
    assert_eq!(restarts(&log), 1, "{log:#?}");
    assert!(
        log.contains(&"husk check HUSK_CONFIG=/opt/husk/share/husk/husk.toml".into()),
        "husk check must use the handler's config: {log:#?}"
    );
    assert!(
        log.contains(&"kubectl label node node-1 husk.io/runtime=true --overwrite".into()),
        "{log:#?}"
    );
    assert!(run.stdout.contains("PASS  /dev/kvm"), "{}", run.stdout);
    assert!(node.path("ready").exists());
}

#[test]
fn fresh_node_with_containerd_2_gets_a_version_3_config() {
    let mut node = Node::new();
    node.set("STUB_CONTAINERD_VERSION", CONTAINERD_2_0);
    node.install();
    let config = parse_toml(&node.config());
    assert_eq!(at(&config, &["version"]).as_integer(), Some(3));
    assert_husk_runtime(&config, CRI_2X);
    assert_eq!(runtime_names(&config, CRI_2X), ["husk", "runc"]);
    assert!(config["plugins"].get(CRI_1X).is_none());
}

#[test]
fn version_2_config_keeps_its_runc_and_gains_husk() {
    let node = Node::new();
    node.write_config(V2_WITH_RUNC, 0o600);
    node.install();
    let log = node.take_log();
    let text = node.config();
    assert!(
        text.starts_with(V2_WITH_RUNC.trim_end()),
        "the admin's settings come first, unchanged:\n{text}"
    );
    let config = parse_toml(&text);
    assert_husk_runtime(&config, CRI_1X);
    assert_eq!(runtime_names(&config, CRI_1X), ["husk", "runc"]);
    assert_eq!(
        at(
            runtime(&config, CRI_1X, "runc"),
            &["options", "SystemdCgroup"]
        )
        .as_bool(),
        Some(true)
    );
    assert_eq!(
        mode(&node.config_path()),
        0o600,
        "the config's mode is kept"
    );
    let backups = node.backups();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(std::fs::read_to_string(&backups[0]).unwrap(), V2_WITH_RUNC);
    assert_eq!(restarts(&log), 1);
}

#[test]
fn version_2_config_without_runtimes_gains_runc_too() {
    let node = Node::new();
    node.write_config(V2_NO_RUNTIMES, 0o644);
    node.install();
    let config = parse_toml(&node.config());
    assert_husk_runtime(&config, CRI_1X);
    assert_eq!(runtime_names(&config, CRI_1X), ["husk", "runc"]);
    assert_eq!(
        at(&config, &["plugins", CRI_1X, "sandbox_image"]).as_str(),
        Some("registry.k8s.io/pause:3.9")
    );
}

#[test]
fn version_3_config_gets_the_containerd_2_tables() {
    let mut node = Node::new();
    node.set("STUB_CONTAINERD_VERSION", CONTAINERD_2_0);
    node.write_config(V3_WITH_RUNC, 0o644);
    node.install();
    let text = node.config();
    assert!(text.starts_with(V3_WITH_RUNC.trim_end()), "{text}");
    let config = parse_toml(&text);
    assert_husk_runtime(&config, CRI_2X);
    // runc is declared with single quotes: still found, not declared twice.
    assert_eq!(runtime_names(&config, CRI_2X), ["husk", "runc"]);
    assert!(config["plugins"].get(CRI_1X).is_none());
}

#[test]
fn a_version_2_config_on_containerd_2_keeps_the_1x_tables() {
    let mut node = Node::new();
    node.set("STUB_CONTAINERD_VERSION", CONTAINERD_2_0);
    node.write_config(V2_WITH_RUNC, 0o644);
    node.install();
    let config = parse_toml(&node.config());
    assert_husk_runtime(&config, CRI_1X);
    assert!(config["plugins"].get(CRI_2X).is_none());
}

#[test]
fn a_second_run_changes_nothing() {
    for (version, initial) in [
        (CONTAINERD_1_6, None),
        (CONTAINERD_1_6, Some(V2_WITH_RUNC)),
        (CONTAINERD_1_6, Some(V2_NO_RUNTIMES)),
        (CONTAINERD_2_0, Some(V3_WITH_RUNC)),
    ] {
        let mut node = Node::new();
        node.set("STUB_CONTAINERD_VERSION", version);
        if let Some(text) = initial {
            node.write_config(text, 0o644);
        }
        node.install();
        node.take_log();
        let config = node.config();
        let backups = node.backups();
        let shim = node.host("/opt/husk/bin").join(SHIM);
        let inode = std::fs::metadata(&shim).unwrap().ino();

        let again = node.install();
        let log = node.take_log();
        assert_eq!(
            node.config(),
            config,
            "config changed on re-run ({initial:?})"
        );
        assert_eq!(node.backups(), backups, "a re-run must not back up");
        assert_eq!(restarts(&log), 0, "a re-run must not restart: {log:#?}");
        assert!(
            !again.stdout.contains("installed /"),
            "unchanged files are not copied again:\n{}",
            again.stdout
        );
        assert_eq!(std::fs::metadata(&shim).unwrap().ino(), inode);
        assert!(again.stdout.contains("containerd not restarted"));
        assert_eq!(config.matches("# BEGIN husk").count(), 1);
    }
}

#[test]
fn a_new_payload_replaces_the_files_atomically_without_restart() {
    let node = Node::new();
    node.install();
    node.take_log();
    let shim = node.host("/opt/husk/bin").join(SHIM);
    let inode = std::fs::metadata(&shim).unwrap().ino();
    let new = node.path("payload/opt/husk/bin").join(SHIM);
    std::fs::write(&new, "#!/bin/sh\necho shim v2\n").unwrap();

    let run = node.install();
    assert_eq!(
        std::fs::read_to_string(&shim).unwrap(),
        "#!/bin/sh\necho shim v2\n"
    );
    assert_eq!(mode(&shim), 0o755);
    // A rename, not an overwrite: running shims keep their file.
    assert_ne!(std::fs::metadata(&shim).unwrap().ino(), inode);
    assert!(run
        .stdout
        .contains(&format!("installed /opt/husk/bin/{SHIM}")));
    assert_eq!(restarts(&node.take_log()), 0);
    assert!(!node
        .host("/opt/husk/bin/containerd-shim-husk-v2.husk-new")
        .exists());
}

#[test]
fn a_husk_runtime_declared_by_hand_is_left_alone() {
    let node = Node::new();
    let text = format!(
        "{V2_WITH_RUNC}[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n  runtime_type = \"io.containerd.husk.v2\"\n"
    );
    node.write_config(&text, 0o644);
    let run = node.install();
    assert_eq!(node.config(), text);
    assert!(node.backups().is_empty());
    assert_eq!(restarts(&node.take_log()), 0);
    assert!(
        run.stdout.contains("outside the installer's block"),
        "{}",
        run.stdout
    );
}

#[test]
fn unsupported_configs_are_refused_untouched() {
    for (version, text, expect) in [
        (
            CONTAINERD_1_6,
            "[plugins.cri.containerd]\n  snapshotter = \"overlayfs\"\n",
            "version 1",
        ),
        (CONTAINERD_1_6, V3_WITH_RUNC, "cannot read"),
        (CONTAINERD_2_0, "version = 4\n", "version = 4"),
    ] {
        let mut node = Node::new();
        node.set("STUB_CONTAINERD_VERSION", version);
        node.write_config(text, 0o644);
        let run = node.run(&["install"]);
        assert!(!run.ok, "{text} must be refused");
        assert!(run.stderr.contains(expect), "{}", run.stderr);
        assert_eq!(node.config(), text);
        assert_eq!(restarts(&node.take_log()), 0);
        assert!(!node.path("ready").exists());
        assert!(
            !node.host("/opt/husk").exists(),
            "refused before anything on the node changed"
        );
    }
}

#[test]
fn a_config_containerd_rejects_is_not_put_in_place() {
    let mut node = Node::new();
    node.set("STUB_CONTAINERD_REJECT", "1");
    node.write_config(V2_WITH_RUNC, 0o644);
    let run = node.run(&["install"]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("containerd rejects") && run.stderr.contains("duplicated tables"),
        "{}",
        run.stderr
    );
    assert_eq!(node.config(), V2_WITH_RUNC);
    assert!(node.backups().is_empty());
    assert_eq!(restarts(&node.take_log()), 0);
    assert!(!node.host("/opt/husk").exists());
    let leftovers: Vec<_> = std::fs::read_dir(node.host("/etc/containerd"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, ["config.toml"]);
}

#[test]
fn a_failed_restart_puts_the_previous_config_back() {
    let mut node = Node::new();
    node.set("STUB_SYSTEMCTL_FAILURES", "1");
    node.write_config(V2_WITH_RUNC, 0o644);
    let run = node.run(&["install"]);
    assert!(!run.ok);
    assert!(run.stderr.contains("did not restart"), "{}", run.stderr);
    assert_eq!(node.config(), V2_WITH_RUNC);
    assert_eq!(
        restarts(&node.take_log()),
        2,
        "restarted again on the old config"
    );
    assert!(!node.path("ready").exists());
}

#[test]
fn a_failed_check_unlabels_the_node_and_keeps_it_unready() {
    let mut node = Node::new();
    node.set("FAKE_HUSK_CHECK_FAILS", "1");
    let run = node.install();
    let log = node.take_log();
    assert!(run.stdout.contains("FAIL  /dev/kvm"), "{}", run.stdout);
    assert!(
        log.contains(&"kubectl label node node-1 husk.io/runtime- --overwrite".into()),
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("husk.io/runtime=true")));
    assert!(!node.path("ready").exists());
}

#[test]
fn without_kubectl_the_admin_is_told_how_to_label() {
    let node = Node::with_kubectl(false);
    let run = node.install();
    assert!(
        run.stdout
            .contains("kubectl label node node-1 husk.io/runtime=true --overwrite` yourself"),
        "{}",
        run.stdout
    );
    assert!(node.path("ready").exists());
}

#[test]
fn a_file_in_the_way_of_the_link_is_an_error() {
    let node = Node::new();
    std::fs::create_dir_all(node.host("/usr/local/bin")).unwrap();
    std::fs::write(node.host("/usr/local/bin").join(SHIM), "hand-installed").unwrap();
    let run = node.run(&["install"]);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains("is a file, not the installer's symlink"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(node.host("/usr/local/bin").join(SHIM)).unwrap(),
        "hand-installed"
    );
}

#[test]
fn uninstall_removes_what_install_added() {
    for initial in [None, Some(V2_WITH_RUNC), Some(V2_NO_RUNTIMES)] {
        let node = Node::new();
        std::fs::create_dir_all(node.host("/usr/local/bin")).unwrap();
        std::fs::write(node.host("/usr/local/bin/other-tool"), "keep me").unwrap();
        if let Some(text) = initial {
            node.write_config(text, 0o644);
        }
        node.install();
        node.take_log();

        let run = node.run(&["uninstall"]);
        assert!(run.ok, "{}{}", run.stdout, run.stderr);
        let log = node.take_log();
        match initial {
            // The installer created the file: it is gone again.
            None => assert!(!node.config_path().exists()),
            Some(text) => assert_eq!(node.config(), text.trim_end().to_string() + "\n"),
        }
        assert_eq!(restarts(&log), 1, "{log:#?}");
        assert!(
            log.contains(&"kubectl label node node-1 husk.io/runtime- --overwrite".into()),
            "{log:#?}"
        );
        assert!(
            !node.host("/opt/husk").exists(),
            "the install dir is emptied"
        );
        for name in [SHIM, "husk"] {
            assert!(std::fs::symlink_metadata(node.host("/usr/local/bin").join(name)).is_err());
        }
        assert!(node.host("/usr/local/bin/other-tool").exists());
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let mut status = None;
    wait_for("the installer to exit", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits pid_t")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn run_waits_and_uninstalls_on_sigterm_only_if_asked() {
    for uninstall in ["0", "1"] {
        let mut node = Node::new();
        node.set("HUSK_UNINSTALL", uninstall);
        let mut child = node
            .command(BUSYBOX, &["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("the node to be ready", || node.path("ready").exists());
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "run must keep running");
        sigterm(&child);
        let status = wait_exit(&mut child);
        assert!(status.success(), "{status}");
        let installed = node.host("/opt/husk/bin").join(SHIM).exists();
        assert_eq!(installed, uninstall == "0", "HUSK_UNINSTALL={uninstall}");
        assert_eq!(node.config_path().exists(), uninstall == "0");
    }
}

#[test]
fn bash_writes_the_same_as_busybox() {
    for initial in [None, Some(V2_WITH_RUNC), Some(V3_WITH_RUNC)] {
        let mut configs = Vec::new();
        for shell in [BUSYBOX, "/bin/bash"] {
            let mut node = Node::new();
            if initial == Some(V3_WITH_RUNC) {
                node.set("STUB_CONTAINERD_VERSION", CONTAINERD_2_0);
            }
            if let Some(text) = initial {
                node.write_config(text, 0o644);
            }
            let run = node.run_with(shell, &["install"]);
            assert!(run.ok, "{shell}: {}{}", run.stdout, run.stderr);
            configs.push(node.config());
        }
        assert_eq!(configs[0], configs[1]);
    }
}

// --- the containerd snippets and the manifests ------------------------------

fn read(rel: &str) -> String {
    let path = workspace_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_snippets_declare_husk_for_a_hand_install_in_usr_local() {
    for (file, plugin) in [
        ("configs/containerd/husk-1.x.toml", CRI_1X),
        ("configs/containerd/husk-2.x.toml", CRI_2X),
    ] {
        let config = parse_toml(&read(file));
        // Merged into a file that has its version and maybe its runc already:
        // declaring either here would duplicate them.
        assert!(config.get("version").is_none(), "{file}");
        assert_eq!(runtime_names(&config, plugin), ["husk"], "{file}");
        let husk = runtime(&config, plugin, "husk");
        assert_eq!(
            at(husk, &["runtime_type"]).as_str(),
            Some("io.containerd.husk.v2")
        );
        // `make install PREFIX=/usr/local` puts the files there.
        assert_eq!(
            at(husk, &["runtime_path"]).as_str(),
            Some("/usr/local/bin/containerd-shim-husk-v2")
        );
        assert_eq!(
            at(husk, &["options", "ConfigPath"]).as_str(),
            Some("/usr/local/share/husk/husk.toml")
        );
        assert_eq!(config["plugins"].as_table().unwrap().len(), 1, "{file}");
    }
}

/// The documents of a multi-document YAML file.
fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    let text = read(rel);
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            if current
                .lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            {
                docs.push(
                    serde_yaml::from_str(&current)
                        .unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}")),
                );
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

fn y<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a serde_yaml::Value {
    path.iter().fold(v, |v, key| {
        v.get(key)
            .unwrap_or_else(|| panic!("no {} in {v:?}", path.join(".")))
    })
}

fn ystr<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a str {
    y(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

/// A default of the script: `NAME="${NAME:-value}"`.
fn script_default(name: &str) -> String {
    let text = std::fs::read_to_string(script()).unwrap();
    let prefix = format!("{name}=\"${{{name}:-");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no default for {name} in the script"));
    line[prefix.len()..].trim_end_matches("}\"").to_string()
}

fn workspace_version() -> String {
    let cargo = parse_toml(&read("Cargo.toml"));
    at(&cargo, &["workspace", "package", "version"])
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn every_manifest_parses() {
    let dir = workspace_root().join("configs/kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    for expected in [
        "example-pod.yaml",
        "husk-installer.yaml",
        "runtimeclass.yaml",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected} is missing");
    }
    for file in files {
        let rel = format!("configs/kubernetes/{file}");
        let docs = yaml_docs(&rel);
        assert!(!docs.is_empty(), "{rel}");
        for doc in &docs {
            for field in ["apiVersion", "kind"] {
                ystr(doc, &[field]);
            }
            ystr(doc, &["metadata", "name"]);
        }
    }
}

#[test]
fn the_runtime_class_selects_the_nodes_the_installer_labels() {
    let docs = yaml_docs("configs/kubernetes/runtimeclass.yaml");
    let rc = &docs[0];
    assert_eq!(ystr(rc, &["kind"]), "RuntimeClass");
    assert_eq!(ystr(rc, &["apiVersion"]), "node.k8s.io/v1");
    assert_eq!(ystr(rc, &["metadata", "name"]), "husk");
    assert_eq!(ystr(rc, &["handler"]), "husk");
    assert_eq!(ystr(rc, &["overhead", "podFixed", "memory"]), "64Mi");
    assert_eq!(ystr(rc, &["overhead", "podFixed", "cpu"]), "250m");
    let label = script_default("HUSK_NODE_LABEL");
    assert_eq!(
        ystr(rc, &["scheduling", "nodeSelector", label.as_str()]),
        "true"
    );

    let pod = &yaml_docs("configs/kubernetes/example-pod.yaml")[0];
    assert_eq!(ystr(pod, &["spec", "runtimeClassName"]), "husk");
}

#[test]
fn the_daemonset_mounts_what_the_script_writes() {
    let docs = yaml_docs("configs/kubernetes/husk-installer.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| ystr(d, &["kind"])).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]
    );
    let ds = docs.last().unwrap();
    let namespace = ystr(&docs[0], &["metadata", "name"]);
    assert_eq!(ystr(ds, &["metadata", "namespace"]), namespace);
    let spec = y(ds, &["spec", "template", "spec"]);
    assert_eq!(y(spec, &["hostPID"]).as_bool(), Some(true));
    assert_eq!(
        ystr(spec, &["serviceAccountName"]),
        ystr(&docs[1], &["metadata", "name"])
    );
    let subject = &y(&docs[3], &["subjects"])[0];
    assert_eq!(
        ystr(subject, &["name"]),
        ystr(&docs[1], &["metadata", "name"])
    );
    assert_eq!(ystr(subject, &["namespace"]), namespace);
    let rule = &y(&docs[2], &["rules"])[0];
    assert_eq!(y(rule, &["resources"])[0].as_str(), Some("nodes"));

    let container = &y(spec, &["containers"])[0];
    assert_eq!(
        y(container, &["securityContext", "privileged"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        ystr(container, &["image"]),
        format!("husk-installer:{}", workspace_version()),
        "the image tag follows the workspace version (make installer-image)"
    );
    let probe = y(container, &["readinessProbe", "exec", "command"]);
    assert_eq!(
        probe
            .as_sequence()
            .unwrap()
            .last()
            .unwrap()
            .as_str()
            .unwrap(),
        script_default("HUSK_READY_FILE")
    );

    let env: Vec<(String, Option<String>)> = y(container, &["env"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                ystr(e, &["name"]).to_string(),
                e.get("value").and_then(|v| v.as_str()).map(str::to_string),
            )
        })
        .collect();
    let value = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
            .unwrap_or_else(|| script_default(name))
    };
    assert!(env.iter().any(|(n, _)| n == "NODE_NAME"));
    assert_eq!(
        value("HUSK_UNINSTALL"),
        "0",
        "a rolling update must not uninstall"
    );
    let host_root = value("HOST_ROOT");
    let config_dir = Path::new(&value("CONTAINERD_CONFIG"))
        .parent()
        .unwrap()
        .display()
        .to_string();

    // Each directory the script writes is a hostPath mounted at HOST_ROOT + path.
    let volumes = y(spec, &["volumes"]).as_sequence().unwrap();
    let mut mounted = Vec::new();
    for mount in y(container, &["volumeMounts"]).as_sequence().unwrap() {
        let name = ystr(mount, &["name"]);
        let volume = volumes
            .iter()
            .find(|v| ystr(v, &["name"]) == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let host_path = ystr(volume, &["hostPath", "path"]);
        assert_eq!(
            ystr(mount, &["mountPath"]),
            format!("{host_root}{host_path}")
        );
        mounted.push(host_path.to_string());
    }
    mounted.sort();
    let mut wanted = vec![value("HUSK_INSTALL_DIR"), value("HUSK_BIN_DIR"), config_dir];
    wanted.sort();
    assert_eq!(mounted, wanted);
}

// --- the image ---------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const TEST_IMAGE: &str = "docker.io/library/husk-installer:test";

/// Builds the installer image from a fake payload; returns the archive.
fn build_image(dir: &Path, out: &str) -> PathBuf {
    let payload = dir.join("payload");
    if !payload.exists() {
        fake_payload(&payload);
    }
    let archive = dir.join(out);
    run_ok(
        Command::new(workspace_root().join("scripts/build-installer-image.sh"))
            .arg("--payload")
            .arg(&payload)
            .arg("--out")
            .arg(&archive)
            .args(["--name", TEST_IMAGE, "--kubectl", "none"]),
    );
    archive
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads a blob by descriptor, checking its digest and size.
fn blob(layout: &Path, descriptor: &serde_json::Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&bytes), hex, "blob {digest} is corrupt");
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "size of {digest}"
    );
    bytes
}

#[test]
fn the_image_is_a_valid_reproducible_oci_layout() {
    let dir = tempfile::Builder::new()
        .prefix("husk-installer-image")
        .tempdir()
        .unwrap();
    let first = build_image(dir.path(), "a.tar");
    let second = build_image(dir.path(), "b.tar");
    assert_eq!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap(),
        "the same inputs must give the same archive"
    );

    let layout = dir.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&first)
            .arg("-C")
            .arg(&layout),
    );
    assert_eq!(
        json(&layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json(&layout.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    let entry = &manifests[0];
    assert_eq!(entry["annotations"]["io.containerd.image.name"], TEST_IMAGE);
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );
    assert_eq!(entry["platform"]["os"], "linux");
    assert_eq!(entry["platform"]["architecture"], "amd64");
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );

    let manifest: serde_json::Value = serde_json::from_slice(&blob(&layout, entry)).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&layout, &manifest["config"])).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    let layer = blob(&layout, &layers[0]);
    // Uncompressed: the diff ID is the layer's own digest.
    assert_eq!(config["rootfs"]["diff_ids"][0], layers[0]["digest"]);
    assert_eq!(
        config["config"]["Entrypoint"][0],
        "/husk-installer/configs/kubernetes/husk-install.sh"
    );
    assert_eq!(config["config"]["Cmd"][0], "run");

    let layer_path = dir.path().join("layer.tar");
    std::fs::write(&layer_path, &layer).unwrap();
    let listing = run_ok(
        Command::new("tar")
            .arg("-tvf")
            .arg(&layer_path)
            .arg("--numeric-owner"),
    );
    let entry_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(5) == Some(path))
            .unwrap_or_else(|| panic!("{path} is not in the image:\n{listing}"))
            .to_string()
    };
    for (path, perms) in [
        ("./bin/busybox", "-rwxr-xr-x"),
        ("./bin/sh", "lrwxrwxrwx"),
        ("./opt/husk/bin/containerd-shim-husk-v2", "-rwxr-xr-x"),
        ("./opt/husk/bin/husk", "-rwxr-xr-x"),
        ("./opt/husk/share/husk/vmlinux", "-rw-r--r--"),
        (
            "./husk-installer/configs/kubernetes/husk-install.sh",
            "-rwxr-xr-x",
        ),
        (
            "./husk-installer/configs/containerd/husk-1.x.toml",
            "-rw-r--r--",
        ),
        (
            "./husk-installer/configs/containerd/husk-2.x.toml",
            "-rw-r--r--",
        ),
        ("./tmp/", "drwxrwxrwt"),
        ("./host/", "drwxr-xr-x"),
    ] {
        let line = entry_of(path);
        assert!(line.starts_with(perms), "{line}");
        assert!(line.contains(" 0/0 "), "owned by root: {line}");
    }
    assert!(entry_of("./bin/sh").ends_with("-> busybox"));
    assert!(!listing.contains("usr/local/bin/kubectl"), "--kubectl none");
}

/// A containerd of our own: root, state and sockets in a temp dir.
struct PrivateContainerd {
    dir: tempfile::TempDir,
    child: Child,
}

impl PrivateContainerd {
    /// None (and why) where this machine cannot run one.
    fn start(extra_config: &str) -> Result<PrivateContainerd, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root".into());
        }
        for tool in ["containerd", "ctr"] {
            if !Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return Err(format!("{tool} is not installed"));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("husk-install-ctrd")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n{extra_config}\n",
                d.join("root"),
                d.join("state"),
                d.join("c.sock"),
                d.join("c.ttrpc.sock"),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start containerd: {e}"))?;
        let ctrd = PrivateContainerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctrd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                ctrd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(ctrd)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("c.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status column of `ctr plugins ls` for the CRI plugin.
    fn cri_status(&self) -> String {
        let plugins = self.ctr_ok(&["plugins", "ls"]);
        plugins
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .take(2)
                    .eq(["io.containerd.grpc.v1", "cri"])
            })
            .and_then(|l| l.split_whitespace().nth(3))
            .unwrap_or_else(|| panic!("no CRI plugin in:\n{plugins}"))
            .to_string()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
        let root = self.dir.path().display().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(Path::new(m), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// What the installer wrote, minus its `version` line, to follow the
/// private containerd's own settings.
fn without_version(config: &str) -> String {
    config
        .lines()
        .filter(|l| !l.starts_with("version"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn containerd_loads_the_cri_plugin_with_what_the_installer_writes() {
    // The control: husk's tables alone drop runc and the CRI plugin fails.
    let bare = read("configs/containerd/husk-1.x.toml");
    let ctrd = match PrivateContainerd::start(&bare) {
        Ok(c) => c,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test: {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
    };
    assert_eq!(ctrd.cri_status(), "error", "{}", ctrd.log());
    drop(ctrd);

    for initial in [None, Some(V2_NO_RUNTIMES), Some(V2_WITH_RUNC)] {
        let node = Node::new();
        if let Some(text) = initial {
            node.write_config(&text.replace("root = \"/var/lib/containerd\"\n", ""), 0o644);
        }
        node.install();
        let ctrd = PrivateContainerd::start(&without_version(&node.config())).unwrap();
        assert_eq!(ctrd.cri_status(), "ok", "{initial:?}:\n{}", ctrd.log());
    }
}

#[test]
fn the_image_imports_into_containerd_and_runs_the_installer() {
    if !Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: runc is not installed");
        return;
    }
    let ctrd = match PrivateContainerd::start(&format!("disabled_plugins = [\"{CRI_1X}\"]")) {
        Ok(c) => c,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test: {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = ctrd.dir.path().join("image");
    std::fs::create_dir_all(&dir).unwrap();
    let archive = build_image(&dir, "husk-installer.tar");
    ctrd.ctr_ok(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        archive.to_str().unwrap(),
    ]);
    let images = ctrd.ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == TEST_IMAGE), "{images}");

    // The script, with the image's busybox, against a host dir bind-mounted
    // at /host; stand-ins for the host's commands in /stubs.
    let host = dir.join("host");
    let stubs = dir.join("stubs");
    let logs = dir.join("logs");
    for d in [&host, &stubs, &logs] {
        std::fs::create_dir_all(d).unwrap();
    }
    write_exec(&stubs.join("nsenter-stub"), STUB_NSENTER);
    write_exec(&stubs.join("containerd"), STUB_CONTAINERD);
    write_exec(&stubs.join("systemctl"), STUB_SYSTEMCTL);
    write_exec(&stubs.join("kubectl"), STUB_KUBECTL);
    let bind = |src: &Path, dst: &str| {
        format!("type=bind,src={},dst={dst},options=rbind:rw", src.display())
    };
    let out = ctrd.ctr_ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--mount",
        &bind(&host, "/host"),
        "--mount",
        &bind(&stubs, "/stubs"),
        "--mount",
        &bind(&logs, "/logs"),
        "--env",
        "PATH=/stubs:/usr/local/bin:/usr/bin:/bin",
        "--env",
        "HUSK_NSENTER=/stubs/nsenter-stub",
        "--env",
        "HOST_ROOT=/host",
        "--env",
        "STUB_LOG=/logs/log",
        "--env",
        &format!("STUB_CONTAINERD_VERSION={CONTAINERD_1_6}"),
        "--env",
        "NODE_NAME=node-1",
        TEST_IMAGE,
        "husk-installer-test",
        "/husk-installer/configs/kubernetes/husk-install.sh",
        "install",
    ]);
    assert!(
        out.contains("node ready for runtimeClassName: husk"),
        "{out}"
    );
    let config = std::fs::read_to_string(host.join("etc/containerd/config.toml")).unwrap();
    assert_husk_runtime(&parse_toml(&config), CRI_1X);
    assert_eq!(
        mode(&host.join("opt/husk/bin").join(SHIM)),
        0o755,
        "installed from the image"
    );
    let log = std::fs::read_to_string(logs.join("log")).unwrap();
    assert!(log.contains("systemctl restart containerd"), "{log}");
    assert!(
        log.contains("kubectl label node node-1 husk.io/runtime=true"),
        "{log}"
    );
}
