//! `husk-bench start`: end-to-end `ctr run --rm` latency of husk against
//! runc (same image, same containerd, interleaved), and the host memory
//! (PSS) of a husk shim with its VMM serving one idle container, next to
//! runc's shim.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::containerd::{shim_pid, Containerd, HUSK_RUNTIME, TEST_IMAGE};
use serde_json::json;

use crate::{median, summary};

const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

fn ctr_run(c: &Containerd, runtime: &str, id: &str) -> Result<f64, String> {
    let started = Instant::now();
    let out = c.ctr(&["run", "--rm", "--runtime", runtime, TEST_IMAGE, id, "true"]);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        return Err(format!(
            "{runtime}: ctr run failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.diagnostics()
        ));
    }
    Ok(ms)
}

/// PSS of a process, and the part of it in mappings at least `big` bytes
/// large (a VM's guest RAM), from /proc/<pid>/smaps.
fn pss(pid: u32, big: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut in_big) = (0u64, 0u64);
    let mut is_big = false;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Pss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
            total += kib;
            if is_big {
                in_big += kib;
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    is_big = b - a >= big;
                }
            }
        }
    }
    Some((total * 1024, in_big * 1024))
}

fn idle_container_memory(
    c: &Containerd,
    runtime: &str,
    binary: &str,
    id: &str,
) -> Result<(u64, u64), String> {
    c.ctr(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        TEST_IMAGE,
        id,
        "sleep",
        "3600",
    ]);
    let deadline = Instant::now() + Duration::from_secs(600);
    let result = loop {
        let running = c.ctr(&["tasks", "ls"]);
        if String::from_utf8_lossy(&running.stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            // Let the guest settle after boot before measuring.
            std::thread::sleep(Duration::from_secs(5));
            break shim_pid(binary, id)
                .and_then(|pid| pss(pid, 64 << 20))
                .ok_or_else(|| format!("cannot find or read the {binary} serving {id}"));
        }
        if Instant::now() > deadline {
            break Err(format!("{id} did not start\n{}", c.diagnostics()));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    std::thread::sleep(Duration::from_secs(1));
    let _ = c.ctr(&["tasks", "rm", "-f", id]);
    let _ = c.ctr(&["containers", "rm", id]);
    result
}

pub fn bench_start(runs: usize, out: &Path) -> Result<(), String> {
    let c = Containerd::start("");
    c.import_test_image("default");
    let (mut husk, mut runc) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let order = if run % 2 == 0 {
            [HUSK_RUNTIME, RUNC_RUNTIME]
        } else {
            [RUNC_RUNTIME, HUSK_RUNTIME]
        };
        for runtime in order {
            let ms = ctr_run(&c, runtime, &format!("bench-{run}"))?;
            eprintln!("run {run}: {runtime}: {ms:.0} ms");
            if runtime == HUSK_RUNTIME {
                husk.push(ms)
            } else {
                runc.push(ms)
            }
        }
    }
    let (husk_pss, husk_guest) =
        idle_container_memory(&c, HUSK_RUNTIME, "containerd-shim-husk-v2", "idle-husk")?;
    let (runc_pss, _) =
        idle_container_memory(&c, RUNC_RUNTIME, "containerd-shim-runc-v2", "idle-runc")?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let result = json!({
        "benchmark": "ctr run --rm <image> true",
        "image": TEST_IMAGE,
        "runs": runs,
        "husk_ms": summary(husk.clone()),
        "runc_ms": summary(runc.clone()),
        "ratio": median(husk) / median(runc),
        "idle_container_memory": {
            "husk_shim_pss_mib": mib(husk_pss),
            "husk_shim_pss_excluding_guest_ram_mib": mib(husk_pss - husk_guest),
            "husk_guest_ram_resident_mib": mib(husk_guest),
            "runc_shim_pss_mib": mib(runc_pss),
            "note": "runc's container processes are not in its shim's PSS; husk's guest (kernel, agent, container) is, as guest RAM",
        },
        "goals": {"ratio_on_bare_metal_at_most": 1.5, "husk_shim_pss_excluding_guest_ram_mib_at_most": 8.0},
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(out, format!("{result:#}\n")).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{result:#}");
    Ok(())
}
