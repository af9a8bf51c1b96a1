//! vCPU threads: run the guest, dispatch MMIO and port I/O exits to the
//! buses, and end the VM on poweroff, reset or failure.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Installs the kick handler once per process (without SA_RESTART, so the
/// ioctl is interrupted rather than restarted).
pub fn install_kick_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // The handler is async-signal-safe: it does nothing.
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Counters the VMM keeps about its own work (not the guest's).
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Exits handled in user space.
    pub exits: AtomicU64,
    /// Thread CPU time spent handling those exits, in nanoseconds.
    pub exit_cpu_ns: AtomicU64,
    /// When any vCPU first entered KVM_RUN.
    pub first_run: OnceLock<Instant>,
}

/// Where a vCPU was when the host looked: to say what a stuck guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSample {
    pub id: u8,
    pub rip: u64,
    pub user_mode: bool,
    pub interrupts_enabled: bool,
    /// Stack pointer (for [`crate::profile`]).
    pub rsp: u64,
}

impl std::fmt::Display for VcpuSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU {} in {} mode at rip {:#x} (interrupts {})",
            self.id,
            if self.user_mode { "user" } else { "kernel" },
            self.rip,
            if self.interrupts_enabled { "on" } else { "off" }
        )
    }
}

/// Samples the host asked for: each vCPU answers after its next exit (a
/// kick makes one). Only vCPU threads may read their registers while the
/// vCPU runs, hence the round trip.
#[derive(Debug, Default)]
pub struct VcpuSampler {
    /// Bit N: vCPU N should take a sample.
    requested: AtomicU64,
    samples: std::sync::Mutex<Vec<VcpuSample>>,
}

impl VcpuSampler {
    /// Asks vCPUs `0..count` for a sample, dropping older ones.
    pub fn request(&self, count: u8) {
        crate::bus::lock(&self.samples).clear();
        let all = if count >= 64 {
            u64::MAX
        } else {
            (1u64 << count) - 1
        };
        self.requested.fetch_or(all, Ordering::SeqCst);
    }

    fn take_request(&self, id: u8) -> bool {
        let bit = 1u64 << (id % 64);
        self.requested.fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    /// The samples taken since the last [`request`](Self::request).
    pub fn samples(&self) -> Vec<VcpuSample> {
        crate::bus::lock(&self.samples).clone()
    }
}

/// Stops vCPU threads at a point where their state is whole, for a
/// snapshot: each thread completes the I/O it was in (a KVM_RUN that
/// returns at once), leaves its fd here and ends.
#[derive(Default)]
pub struct VcpuParking {
    requested: AtomicBool,
    parked: std::sync::Mutex<Vec<(u8, VcpuFd)>>,
}

impl VcpuParking {
    /// Asks every vCPU to park after its current KVM_RUN (kick them).
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The parked vCPUs' fds, by id.
    pub fn take(&self) -> Vec<(u8, VcpuFd)> {
        let mut parked = std::mem::take(&mut *crate::bus::lock(&self.parked));
        parked.sort_by_key(|(id, _)| *id);
        parked
    }
}

/// One vCPU and what it needs to handle its exits.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub id: u8,
    pub mmio: Bus,
    pub pio: Bus,
    pub exit: Arc<ExitSignal>,
    pub stop: Arc<AtomicBool>,
    pub stats: Arc<VcpuStats>,
    pub sampler: Arc<VcpuSampler>,
    pub parking: Arc<VcpuParking>,
    /// The vCPU filter ([`crate::seccomp::ThreadKind::Vcpu`]), installed by
    /// the thread before its first KVM_RUN; `None` runs unconfined.
    pub seccomp: Option<Arc<crate::seccomp::ThreadFilter>>,
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, a valid timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    match (u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec)) {
        (Ok(secs), Ok(nanos)) => Duration::new(secs, nanos),
        _ => Duration::ZERO,
    }
}

/// What the loop does after one KVM_RUN.
enum Step {
    Continue,
    Exit(ExitReason),
}

impl Vcpu {
    /// Starts the vCPU's thread (named `husk-vcpu<N>`).
    pub fn spawn(self) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("husk-vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        // A vCPU needs no capability: it runs the guest on fds it has.
        if let Err(e) = crate::confine::keep_only_capabilities(&[]) {
            self.exit
                .request(ExitReason::Crashed(format!("vCPU {}: {e}", self.id)));
            return;
        }
        if let Some(filter) = &self.seccomp {
            if let Err(e) = filter.install() {
                self.exit
                    .request(ExitReason::Crashed(format!("vCPU {}: {e}", self.id)));
                return;
            }
        }
        let mut first = true;
        while !self.stop.load(Ordering::SeqCst) && !self.exit.is_requested() {
            if self.parking.is_requested() {
                self.park();
                return;
            }
            if first {
                let _ = self.stats.first_run.set(Instant::now());
                first = false;
            }
            match self.run_once() {
                Step::Continue => {}
                Step::Exit(reason) => {
                    tracing::info!(vcpu = self.id, "VM exit: {reason}");
                    self.exit.request(reason);
                }
            }
            if self.sampler.take_request(self.id) {
                self.take_sample();
            }
        }
    }

    /// Completes a pending MMIO or port I/O exit without running the guest
    /// further (KVM's documented way: KVM_RUN with immediate_exit set),
    /// then hands the fd over for the snapshot.
    fn park(mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => tracing::warn!(
                vcpu = self.id,
                "completing I/O before a snapshot: {other:?}"
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
        crate::bus::lock(&self.parking.parked).push((self.id, self.fd));
    }

    fn take_sample(&self) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return;
        };
        const RFLAGS_IF: u64 = 1 << 9;
        crate::bus::lock(&self.sampler.samples).push(VcpuSample {
            id: self.id,
            rip: regs.rip,
            user_mode: sregs.cs.dpl == 3,
            interrupts_enabled: regs.rflags & RFLAGS_IF != 0,
            rsp: regs.rsp,
        });
    }

    fn run_once(&mut self) -> Step {
        let result = self.fd.run();
        let handling_started = thread_cpu_time();
        let step = match result {
            Ok(exit) => handle_exit(exit, &self.mmio, &self.pio, self.id),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Step::Continue;
            }
            Err(e) => Step::Exit(ExitReason::Crashed(format!("KVM_RUN failed: {e}"))),
        };
        if let Step::Exit(ExitReason::Crashed(_)) = &step {
            self.log_registers();
        }
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        let spent = thread_cpu_time().saturating_sub(handling_started);
        self.stats.exit_cpu_ns.fetch_add(
            u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        step
    }

    fn log_registers(&self) {
        if let Ok(regs) = self.fd.get_regs() {
            tracing::error!(
                vcpu = self.id,
                "guest state: rip={:#x} rsp={:#x} rflags={:#x}",
                regs.rip,
                regs.rsp,
                regs.rflags
            );
        }
    }
}

fn handle_exit(exit: VcpuExit, mmio: &Bus, pio: &Bus, id: u8) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                // Nothing there: the floating bus reads all ones.
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
        }
        VcpuExit::Intr => {}
        VcpuExit::Hlt => {
            return Step::Exit(ExitReason::Crashed(format!(
                "vCPU {id} halted with interrupts off"
            )));
        }
        VcpuExit::Shutdown => {
            return Step::Exit(ExitReason::Crashed(
                "triple fault (KVM_EXIT_SHUTDOWN)".into(),
            ));
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Step::Exit(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Crashed("guest reported a crash".into()),
                other => ExitReason::Crashed(format!("unknown system event {other}")),
            });
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Step::Exit(ExitReason::Crashed(format!(
                "VM entry failed (hardware reason {reason:#x} on cpu {cpu})"
            )));
        }
        VcpuExit::InternalError => {
            return Step::Exit(ExitReason::Crashed(
                "KVM internal error (instruction emulation failed)".into(),
            ));
        }
        other => {
            return Step::Exit(ExitReason::Crashed(format!(
                "unexpected vCPU exit {other:?}"
            )));
        }
    }
    Step::Continue
}

/// Kicks a vCPU thread out of KVM_RUN.
pub fn kick(handle: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the pthread_t comes from a JoinHandle that is not joined yet,
    // so it names a live (or zombie, still joinable) thread; the signal has a
    // handler installed by install_kick_handler.
    unsafe {
        libc::pthread_kill(handle.as_pthread_t(), kick_signal());
    }
}
