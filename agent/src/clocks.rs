//! The guest's clocks as the kernel chose them: the clocksource that keeps
//! time and the clockevent device that fires its timers. Reported in the
//! agent's Check answer so a host can tell what a slow or stalled guest
//! runs on (see README.md, "The guest's clocks").

use std::path::Path;

const CLOCKSOURCE_DIR: &str = "/sys/devices/system/clocksource/clocksource0";
const CLOCKEVENT: &str = "/sys/devices/system/clockevents/clockevent0/current_device";
const UPTIME: &str = "/proc/uptime";

/// What the guest kernel uses; empty strings where sysfs has nothing.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GuestClocks {
    pub clocksource: String,
    pub available_clocksources: String,
    pub clockevent: String,
    pub uptime_secs: f64,
}

fn first_line(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path)
        .map(|t| t.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

impl GuestClocks {
    pub fn read() -> Self {
        let dir = Path::new(CLOCKSOURCE_DIR);
        Self {
            clocksource: first_line(dir.join("current_clocksource")),
            available_clocksources: first_line(dir.join("available_clocksource")),
            clockevent: first_line(CLOCKEVENT),
            uptime_secs: parse_uptime(&first_line(UPTIME)).unwrap_or(0.0),
        }
    }
}

/// The first field of /proc/uptime.
fn parse_uptime(line: &str) -> Option<f64> {
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_clocks() {
        assert_eq!(parse_uptime("12.34 56.78"), Some(12.34));
        assert_eq!(parse_uptime(""), None);
        // Any Linux host has a clocksource and an uptime.
        let clocks = GuestClocks::read();
        assert!(!clocks.clocksource.is_empty(), "{clocks:?}");
        assert!(clocks.available_clocksources.contains(&clocks.clocksource));
        assert!(clocks.uptime_secs > 0.0);
    }
}
