//! Builds a small OCI image archive locally (no registry is reachable from
//! test machines): one uncompressed layer with Debian's busybox-static and
//! its applets, importable with `ctr image import`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hostile-workload probe (`make guest-test` builds it, static), put
/// into test images at /bin/husk-probe.
pub fn guest_probe() -> PathBuf {
    let path = std::env::var_os("HUSK_GUEST_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::workspace_root().join("target/x86_64-unknown-linux-gnu/agent/husk-probe")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `make guest-test` (or set HUSK_GUEST_PROBE)",
        path.display()
    );
    path
}

/// A busybox root filesystem at `root` (also used directly by agent tests).
pub fn busybox_rootfs(root: &Path) {
    for dir in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "run", "var",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (install Debian's busybox-static)"));
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// Writes an OCI image archive named `name` (e.g.
/// `docker.io/library/husk-busybox:test`) to `<dir>/image.tar`.
pub fn build_busybox_image(dir: &Path, name: &str) -> PathBuf {
    build_busybox_image_with_cmd(dir, name, &["sh"])
}

/// Like [`build_busybox_image`], with `cmd` as the image's default command
/// (a CRI sandbox image, for instance, must run until it is killed).
pub fn build_busybox_image_with_cmd(dir: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs);
    std::fs::copy(guest_probe(), rootfs.join("bin/husk-probe")).unwrap();
    let layer_tar = dir.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
        ])
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer_tar)
        .arg("."));

    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let digest = sha256_hex(bytes);
        std::fs::write(blobs.join(&digest), bytes).unwrap();
        (format!("sha256:{digest}"), bytes.len())
    };
    let layer = std::fs::read(&layer_tar).unwrap();
    let (layer_digest, layer_size) = put(&layer);
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}]
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "test"}
        }]
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    archive
}
