//! What the VMM process costs, excluding the guest: CPU time of VMM threads
//! (vCPU threads count only their exit handling; time inside KVM_RUN is the
//! guest's) and resident memory outside guest RAM.

use std::fs;
use std::time::Duration;

/// Clock ticks per second for /proc stat times (USER_HZ is 100 on Linux).
const USER_HZ: u64 = 100;

/// CPU time (user + system) of every thread of this process whose name does
/// not start with `husk-vcpu`.
pub fn non_vcpu_thread_cpu() -> Duration {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((comm, utime, stime)) = parse_stat(&stat) {
            if !comm.starts_with("husk-vcpu") {
                ticks += utime + stime;
            }
        }
    }
    Duration::from_millis(ticks * 1000 / USER_HZ)
}

/// CPU time (user + system, all threads) of process `pid` so far.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, utime, stime) = parse_stat(&stat)?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// (comm, utime, stime) from a /proc/<pid>/stat line.
fn parse_stat(stat: &str) -> Option<(&str, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After ") ": state is field 3; utime and stime are fields 14 and 15.
    let mut rest = stat.get(close + 2..)?.split_whitespace();
    let utime = rest.nth(11)?.parse().ok()?;
    let stime = rest.next()?.parse().ok()?;
    Some((comm, utime, stime))
}

/// Resident bytes of this process outside the given host address ranges
/// (guest RAM), from /proc/self/smaps.
pub fn rss_excluding(ranges: &[(usize, usize)]) -> std::io::Result<u64> {
    Ok(rss_excluding_in(
        &fs::read_to_string("/proc/self/smaps")?,
        ranges,
    ))
}

fn rss_excluding_in(smaps: &str, ranges: &[(usize, usize)]) -> u64 {
    let mut total_kib = 0u64;
    let mut counted = true;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            if counted {
                let kib = kib.trim().trim_end_matches("kB").trim();
                total_kib += kib.parse::<u64>().unwrap_or(0);
            }
        } else if let Some((start, end)) = mapping_range(line) {
            counted = !ranges
                .iter()
                .any(|&(base, len)| start < base + len && base < end);
        }
    }
    total_kib * 1024
}

/// The address range of an smaps mapping header ("start-end perms ...").
fn mapping_range(line: &str) -> Option<(usize, usize)> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let stat = "42 (husk vcpu) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0";
        assert_eq!(parse_stat(stat), Some(("husk vcpu", 7, 3)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn excludes_guest_ranges() {
        let smaps = "\
1000-2000 rw-p 00000000 00:00 0
Size:                  4 kB
Rss:                   4 kB
10000-20000 rw-p 00000000 00:00 0
Rss:                  64 kB
30000-31000 r-xp 00000000 00:00 0 /bin/x
Rss:                   4 kB
";
        assert_eq!(rss_excluding_in(smaps, &[]), 72 * 1024);
        assert_eq!(rss_excluding_in(smaps, &[(0x10000, 0x10000)]), 8 * 1024);
    }

    #[test]
    fn measures_this_process() {
        assert!(rss_excluding(&[]).unwrap() > 0);
    }
}
