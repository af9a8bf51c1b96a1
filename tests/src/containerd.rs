//! A private containerd for tests: its own root, state and socket under a
//! temp dir, husk registered as a runtime (the shim found on PATH), and
//! `ctr` bound to it.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{guest_initrd, guest_kernel, workspace_root};

/// The runtime name tests pass to `ctr --runtime`.
pub const HUSK_RUNTIME: &str = "io.containerd.husk.v2";
/// The test image, as imported.
pub const TEST_IMAGE: &str = "docker.io/library/husk-busybox:test";

pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// husk's state_dir for this containerd's shims.
    pub husk_state: PathBuf,
    /// Owns `husk_state` when it is outside `dir`.
    _husk_state_dir: Option<tempfile::TempDir>,
    launch: Launch,
    child: Child,
}

/// How this containerd is (re)started.
struct Launch {
    config: PathBuf,
    husk_config: PathBuf,
    path: String,
    netns: Option<PathBuf>,
    log: PathBuf,
}

impl Launch {
    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new("containerd");
        command
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("debug")
            .env("PATH", &self.path)
            .env("HUSK_CONFIG", &self.husk_config)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Kept open until containerd is spawned: its child enters it.
        let netns = self.netns.as_ref().map(|ns| {
            std::fs::File::open(ns)
                .unwrap_or_else(|e| panic!("cannot open network namespace {}: {e}", ns.display()))
        });
        if let Some(ns) = &netns {
            let fd = ns.as_raw_fd();
            // SAFETY: runs in the forked child before exec; setns(2) is
            // async-signal-safe and the closure allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command
            .spawn()
            .expect("cannot start containerd (install Debian's containerd)")
    }
}

/// Where the shim binary is (`make shim`, or $HUSK_SHIM_DIR).
pub fn shim_dir() -> PathBuf {
    let dir = std::env::var_os("HUSK_SHIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"));
    assert!(
        dir.join("containerd-shim-husk-v2").is_file(),
        "containerd-shim-husk-v2 is missing in {}: run `make shim` (or set HUSK_SHIM_DIR)",
        dir.display()
    );
    dir
}

/// How to start a private containerd (see [`Containerd::start_with_options`]).
#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    /// Appended to containerd's config (plugin sections, for instance).
    pub extra_config: String,
    /// The guest kernel husk boots.
    pub kernel: PathBuf,
    /// A network namespace file (e.g. `/var/run/netns/NAME`) containerd runs
    /// in, so that whatever it sets up for pods (CNI bridges, veths, its
    /// streaming server) stays inside a namespace the test owns. The mount
    /// namespace stays the host's, so the test still sees every mount.
    pub netns: Option<PathBuf>,
    /// Where to make husk's state dir (a new temp dir) instead of under
    /// containerd's temp dir. husk binds Unix sockets at
    /// `<state_dir>/<namespace>/<sandbox id>/vsock.sock_<port>`, and a CRI
    /// sandbox id has 64 characters: with the usual temp dir the path
    /// exceeds the 107 bytes a socket path may have, so CRI tests put it in
    /// a short directory such as /run.
    pub husk_state_parent: Option<PathBuf>,
    /// Lines added to husk's `[hypervisor]` section (e.g. `template = "off"`).
    pub husk_hypervisor: String,
    /// husk's template dir; None: the suite's ([`crate::template_dir`]).
    pub template_dir: Option<PathBuf>,
}

impl ContainerdOptions {
    pub fn new(extra_config: &str) -> ContainerdOptions {
        ContainerdOptions {
            extra_config: extra_config.to_string(),
            kernel: guest_kernel(),
            netns: None,
            husk_state_parent: None,
            husk_hypervisor: String::new(),
            template_dir: None,
        }
    }
}

impl Containerd {
    /// Starts containerd with `extra_config` appended to its config.
    pub fn start(extra_config: &str) -> Containerd {
        Self::start_with(extra_config, &guest_kernel())
    }

    /// Like [`Containerd::start`], with husk configured to boot `kernel`.
    pub fn start_with(extra_config: &str, kernel: &Path) -> Containerd {
        Self::start_with_options(&ContainerdOptions {
            kernel: kernel.to_path_buf(),
            ..ContainerdOptions::new(extra_config)
        })
    }

    /// Starts containerd as `options` say.
    pub fn start_with_options(options: &ContainerdOptions) -> Containerd {
        let kernel = &options.kernel;
        let extra_config = &options.extra_config;
        let dir = tempfile::Builder::new()
            .prefix("husk-ctrd")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let socket = root.join("containerd.sock");
        let husk_state_dir = options.husk_state_parent.as_ref().map(|parent| {
            tempfile::Builder::new()
                .prefix("hk")
                .tempdir_in(parent)
                .unwrap_or_else(|e| panic!("cannot make a dir in {}: {e}", parent.display()))
        });
        let husk_state = match &husk_state_dir {
            Some(d) => d.path().to_path_buf(),
            None => root.join("husk-state"),
        };
        let husk_config = root.join("husk.toml");
        std::fs::write(
            &husk_config,
            format!(
                "[hypervisor]\nkernel = {:?}\ninitrd = {:?}\nconsole = {:?}\ntemplate_dir = {:?}\n{}\n[runtime]\nstate_dir = {:?}\nlog_level = \"debug\"\n",
                kernel,
                guest_initrd(),
                root.join("console.log"),
                options
                    .template_dir
                    .clone()
                    .unwrap_or_else(crate::template_dir),
                options.husk_hypervisor,
                husk_state
            ),
        )
        .unwrap();
        let config = root.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n{extra_config}\n",
                root.join("root"),
                root.join("state"),
                socket,
                root.join("containerd.ttrpc.sock"),
            ),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let launch = Launch {
            config,
            husk_config,
            path,
            netns: options.netns.clone(),
            log: root.join("containerd.log"),
        };
        let child = launch.spawn();
        let ctrd = Containerd {
            dir,
            socket,
            husk_state,
            _husk_state_dir: husk_state_dir,
            launch,
            child,
        };
        ctrd.wait_ready();
        ctrd
    }

    /// Stops containerd (SIGTERM: its shims and their tasks live on) and
    /// starts it again on the same root, state and config.
    pub fn restart(&mut self) {
        self.stop();
        self.child = self.launch.spawn();
        self.wait_ready();
    }

    fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.socket.exists() && self.ctr(&["version"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd did not come up:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The guest console of the VMs this containerd's shims ran.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// A `ctr` command bound to this containerd.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("cannot run ctr")
    }

    /// Runs ctr and panics with everything useful if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// containerd's log tail and the guest console, for failure messages.
    pub fn diagnostics(&self) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let console = self.console();
        let console_tail: Vec<&str> = console.lines().rev().take(40).collect();
        format!(
            "--- containerd log (tail) ---\n{}\n--- guest console (tail) ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            console_tail
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Builds the busybox test image and imports it (into `namespace`).
    pub fn import_test_image(&self, namespace: &str) {
        let archive = crate::image::build_busybox_image(&self.dir.path().join("image"), TEST_IMAGE);
        self.ctr_ok(&[
            "-n",
            namespace,
            "images",
            "import",
            archive.to_str().unwrap(),
        ]);
    }

    /// Mount points containerd's shims left under husk's state dir.
    pub fn husk_mounts(&self) -> Vec<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.husk_state.display().to_string();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }
}

impl Containerd {
    /// Shim processes (any runtime) this containerd started and that still
    /// run: their command line names this containerd's socket.
    pub fn shim_processes(&self) -> Vec<u32> {
        let address = self.socket.display().to_string();
        crate::host_processes()
            .into_iter()
            .filter(|p| {
                let is_shim = p
                    .args
                    .first()
                    .is_some_and(|a| a.contains("containerd-shim"));
                let ours = p
                    .args
                    .windows(2)
                    .any(|w| w[0] == "-address" && w[1] == address);
                is_shim && ours
            })
            .map(|p| p.pid)
            .collect()
    }

    /// The shim process of this containerd serving task `id` (`binary` is
    /// e.g. `containerd-shim-husk-v2`): the server, not a `start`/`delete`
    /// run. Another containerd's shim for a task of the same name (one
    /// still stopping its VM, say) is not it.
    pub fn shim_serving(&self, binary: &str, id: &str) -> Option<u32> {
        let ours = self.shim_processes();
        shim_pids(binary, id)
            .into_iter()
            .find(|pid| ours.contains(pid))
    }

    /// Mount points anywhere under this containerd's temp dir (snapshots,
    /// CRI's netns and shm mounts) or husk's state dir.
    pub fn mounts(&self) -> Vec<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| self.owns_path(Path::new(m)))
            .map(str::to_string)
            .collect()
    }

    /// Whether `path` is under this containerd's temp dir or husk's state.
    pub fn owns_path(&self, path: &Path) -> bool {
        path.starts_with(self.dir.path()) || path.starts_with(&self.husk_state)
    }

    /// containerd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The shim process serving task `id` (`binary` is e.g.
/// `containerd-shim-husk-v2`): the server, not a `start`/`delete` run.
pub fn shim_pid(binary: &str, id: &str) -> Option<u32> {
    shim_pids(binary, id).into_iter().next()
}

/// Every process [`shim_pid`] could mean, of any containerd.
fn shim_pids(binary: &str, id: &str) -> Vec<u32> {
    crate::host_processes()
        .into_iter()
        .filter_map(|p| {
            let is_binary = p.args.first().is_some_and(|a| a.ends_with(binary));
            let serves = p.args.windows(2).any(|w| w[0] == "-id" && w[1] == id);
            let bootstrap = p.args.iter().any(|a| a == "start" || a == "delete");
            (is_binary && serves && !bootstrap).then_some(p.pid)
        })
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        // Snapshot mounts containerd (or husk's shares) may have left behind.
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            let _ = nix::mount::umount2(Path::new(m), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
