//! `husk-bench start`: end-to-end `ctr run --rm` latency of runc, husk
//! restoring its template and husk booting (interleaved, one run), and the
//! host memory (PSS) of a husk shim with its VMM serving one idle
//! container, next to runc's shim. `husk-bench density`: PSS per idle pod
//! for N pods restored from one template.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::containerd::{Containerd, ContainerdOptions, HUSK_RUNTIME, TEST_IMAGE};
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
            break c
                .shim_serving(binary, id)
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

/// Two containerds side by side: husk restoring from templates (a fresh
/// template dir under `scratch`) and husk booting every guest.
fn containerds(scratch: &Path) -> (Containerd, Containerd) {
    let warm = Containerd::start_with_options(&ContainerdOptions {
        template_dir: Some(scratch.join("templates")),
        ..ContainerdOptions::new("")
    });
    warm.import_test_image("default");
    let cold = Containerd::start_with_options(&ContainerdOptions {
        husk_hypervisor: "template = \"off\"".into(),
        ..ContainerdOptions::new("")
    });
    cold.import_test_image("default");
    (warm, cold)
}

/// From a shim log: seconds from the start of each restore to its agent's
/// answer (the shim logs one line per restored sandbox).
fn restore_to_agent_ms(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("guest agent answered ")?;
            let (secs, tail) = rest.split_once(" s after ")?;
            tail.starts_with("the VM was restored")
                .then(|| secs.parse::<f64>().ok())
                .flatten()
        })
        .map(|s| s * 1000.0)
        .collect()
}

pub fn bench_start(runs: usize, out: &Path) -> Result<(), String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (warm, cold) = containerds(scratch.path());
    // The first restored run builds the shape's template: a boot, reported
    // apart.
    let template_build_ms = ctr_run(&warm, HUSK_RUNTIME, "bench-template")?;
    eprintln!("template built by the first run: {template_build_ms:.0} ms");
    let (mut restored, mut booted, mut runc) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let mut order: [(&Containerd, &str, &mut Vec<f64>, &str); 3] = [
            (&warm, RUNC_RUNTIME, &mut runc, "runc"),
            (&warm, HUSK_RUNTIME, &mut restored, "husk restored"),
            (&cold, HUSK_RUNTIME, &mut booted, "husk cold"),
        ];
        order.rotate_left(run % 3);
        for (c, runtime, samples, name) in order {
            let ms = ctr_run(c, runtime, &format!("bench-{run}"))?;
            eprintln!("run {run}: {name}: {ms:.0} ms");
            samples.push(ms);
        }
    }
    let restores = restore_to_agent_ms(&warm.log());
    let (restored_pss, restored_guest) =
        idle_container_memory(&warm, HUSK_RUNTIME, "containerd-shim-husk-v2", "idle-husk")?;
    let (booted_pss, booted_guest) =
        idle_container_memory(&cold, HUSK_RUNTIME, "containerd-shim-husk-v2", "idle-husk")?;
    let (runc_pss, _) =
        idle_container_memory(&warm, RUNC_RUNTIME, "containerd-shim-runc-v2", "idle-runc")?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let result = json!({
        "benchmark": "ctr run --rm <image> true",
        "image": TEST_IMAGE,
        "runs": runs,
        "husk_restored_ms": summary(restored.clone()),
        "husk_cold_ms": summary(booted.clone()),
        "runc_ms": summary(runc.clone()),
        "template_build_ms": template_build_ms,
        "restore_to_agent_answer_ms": summary(restores),
        "ratios": {
            "cold_over_restored": median(booted.clone()) / median(restored.clone()),
            "restored_over_runc": median(restored) / median(runc.clone()),
            "cold_over_runc": median(booted) / median(runc),
        },
        "idle_container_memory": {
            "husk_restored_shim_pss_mib": mib(restored_pss),
            "husk_restored_guest_ram_pss_mib": mib(restored_guest),
            "husk_cold_shim_pss_mib": mib(booted_pss),
            "husk_cold_guest_ram_pss_mib": mib(booted_guest),
            "husk_shim_pss_excluding_guest_ram_mib": mib(restored_pss - restored_guest),
            "runc_shim_pss_mib": mib(runc_pss),
            "note": "runc's container processes are not in its shim's PSS; husk's guest (kernel, agent, container) is, as guest RAM (a restored guest's unwritten pages are page cache shared with other restores)",
        },
        "goals": {
            "cold_over_restored_at_least": 20.0,
            "restored_over_runc_on_bare_metal_at_most": 1.5,
            "husk_shim_pss_excluding_guest_ram_mib_at_most": 8.0,
        },
    });
    write_result(out, &result)
}

fn write_result(out: &Path, result: &serde_json::Value) -> Result<(), String> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(out, format!("{result:#}\n")).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{result:#}");
    Ok(())
}

/// Host memory per idle pod: `n` busybox tasks (`sleep`) restored from
/// one template, the PSS of all their shims (VMM and guest RAM included)
/// summed and divided by `n`.
fn pods_pss(c: &Containerd, n: usize) -> Result<(f64, f64), String> {
    let ids: Vec<String> = (0..n).map(|i| format!("density-{n}-{i}")).collect();
    for id in &ids {
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            HUSK_RUNTIME,
            TEST_IMAGE,
            id,
            "sleep",
            "3600",
        ]);
        if !out.status.success() {
            return Err(format!(
                "ctr run -d {id}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                c.diagnostics()
            ));
        }
    }
    // Let every guest settle after its start before measuring.
    std::thread::sleep(Duration::from_secs(10));
    let mut total = (0u64, 0u64);
    let mut problem = None;
    for id in &ids {
        match c
            .shim_serving("containerd-shim-husk-v2", id)
            .and_then(|pid| pss(pid, 64 << 20))
        {
            Some((all, guest)) => total = (total.0 + all, total.1 + guest),
            None => problem = Some(format!("cannot read the shim of {id}")),
        }
    }
    for id in &ids {
        let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    }
    std::thread::sleep(Duration::from_secs(2));
    for id in &ids {
        let _ = c.ctr(&["tasks", "rm", "-f", id]);
        let _ = c.ctr(&["containers", "rm", id]);
    }
    if let Some(p) = problem {
        return Err(p);
    }
    let per = |b: u64| b as f64 / f64::from(1 << 20) / n as f64;
    Ok((per(total.0), per(total.1)))
}

pub fn bench_density(pods: &[usize], out: &Path) -> Result<(), String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (warm, cold) = containerds(scratch.path());
    drop(cold);
    ctr_run(&warm, HUSK_RUNTIME, "density-template")?;
    let mut rows = Vec::new();
    for &n in pods {
        let (per_pod, guest_per_pod) = pods_pss(&warm, n)?;
        eprintln!(
            "{n} idle pods: {per_pod:.1} MiB PSS each ({guest_per_pod:.1} MiB of it guest RAM)"
        );
        rows.push(json!({
            "pods": n,
            "pss_per_pod_mib": per_pod,
            "guest_ram_pss_per_pod_mib": guest_per_pod,
        }));
    }
    let result = json!({
        "benchmark": "idle busybox pods (ctr run -d ... sleep) restored from one template: PSS of shim + VMM + guest RAM, summed, per pod",
        "image": TEST_IMAGE,
        "results": rows,
        "goals": {"pss_per_pod_mib_at_10_pods_at_most": 20.0},
    });
    write_result(out, &result)
}
