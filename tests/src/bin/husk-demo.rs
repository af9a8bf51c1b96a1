//! `make demo`: starts a private containerd, imports a small locally built
//! busybox image and runs one container in a husk microVM with
//! `ctr run --rm --runtime io.containerd.husk.v2`, printing its output.

use std::time::Instant;

use husk_tests::containerd::{Containerd, HUSK_RUNTIME, TEST_IMAGE};

fn main() {
    let started = Instant::now();
    let containerd = Containerd::start("");
    containerd.import_test_image("default");
    println!("== containerd is up; image {TEST_IMAGE} imported");
    let script = "echo \"hello from a husk microVM\"; echo \"kernel: $(uname -r)\"; \
                  echo \"cpus: $(grep -c ^processor /proc/cpuinfo), memory: $(grep MemTotal /proc/meminfo)\"";
    let cmd = [
        "run",
        "--rm",
        "--runtime",
        HUSK_RUNTIME,
        TEST_IMAGE,
        "husk-demo",
        "sh",
        "-c",
        script,
    ];
    println!("== ctr {}", cmd.join(" "));
    println!(
        "== the first boot takes ~0.1 s on bare-metal KVM; on a nested PVM host 30-300 s \
         (`husk check` estimates it)"
    );
    let run_started = Instant::now();
    let out = containerd.ctr(&cmd);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eprintln!(
            "husk-demo: the container failed ({})\n{}",
            out.status,
            containerd.diagnostics()
        );
        // exit() skips destructors: stop the private containerd first.
        drop(containerd);
        std::process::exit(1);
    }
    println!(
        "== container ran and exited in {:.1} s ({:.1} s in total)",
        run_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
