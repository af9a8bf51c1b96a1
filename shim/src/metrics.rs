//! The agent's cgroup v2 numbers as containerd's `io.containerd.cgroups.v2.Metrics`
//! (what `ctr task metrics` prints and CRI turns into container stats).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use husk_protocol::agent::ContainerStats;

pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_metrics(stats: &ContainerStats) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        let mut c = CPUStat::new();
        c.usage_usec = cpu.usage_usec;
        c.user_usec = cpu.user_usec;
        c.system_usec = cpu.system_usec;
        c.nr_periods = cpu.nr_periods;
        c.nr_throttled = cpu.nr_throttled;
        c.throttled_usec = cpu.throttled_usec;
        m.cpu = Some(c).into();
    }
    if let Some(mem) = stats.memory.as_ref() {
        let mut s = MemoryStat::new();
        s.usage = mem.usage;
        s.usage_limit = mem.limit;
        s.max_usage = mem.max_usage;
        s.anon = mem.anon;
        s.file = mem.file;
        s.inactive_file = mem.inactive_file;
        m.memory = Some(s).into();
        let mut ev = MemoryEvents::new();
        ev.oom = mem.oom_events;
        ev.oom_kill = mem.oom_kill_events;
        m.memory_events = Some(ev).into();
    }
    if let Some(pids) = stats.pids.as_ref() {
        let mut p = PidsStat::new();
        p.current = pids.current;
        p.limit = pids.limit;
        m.pids = Some(p).into();
    }
    if !stats.io.is_empty() {
        let mut io = IOStat::new();
        for dev in &stats.io {
            let mut e = IOEntry::new();
            e.major = u64::from(dev.major);
            e.minor = u64::from(dev.minor);
            e.rbytes = dev.read_bytes;
            e.wbytes = dev.write_bytes;
            e.rios = dev.read_ops;
            e.wios = dev.write_ops;
            io.usage.push(e);
        }
        m.io = Some(io).into();
    }
    m
}

/// Packs metrics the way containerd expects them in StatsResponse.
pub fn to_any(metrics: &Metrics) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let mut any = Any::new();
    any.type_url = METRICS_TYPE_URL.into();
    any.value = metrics.write_to_bytes()?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::{CpuStats, MemoryStats};

    #[test]
    fn converts_and_round_trips() {
        let mut stats = ContainerStats::new();
        let mut cpu = CpuStats::new();
        cpu.usage_usec = 1234;
        stats.cpu = Some(cpu).into();
        let mut mem = MemoryStats::new();
        mem.usage = 10 << 20;
        mem.limit = 64 << 20;
        mem.inactive_file = 1 << 20;
        mem.oom_kill_events = 2;
        stats.memory = Some(mem).into();
        let any = to_any(&to_metrics(&stats)).unwrap();
        assert_eq!(any.type_url, METRICS_TYPE_URL);
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.cpu.usage_usec, 1234);
        assert_eq!(back.memory.usage, 10 << 20);
        assert_eq!(back.memory.usage_limit, 64 << 20);
        assert_eq!(back.memory_events.oom_kill, 2);
    }
}
