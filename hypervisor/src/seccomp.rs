//! Seccomp filters, one per kind of VMM thread, as Firecracker and
//! cloud-hypervisor confine theirs.
//!
//! Each thread that serves guest input installs its own allow-list once its
//! setup is done and before it looks at anything the guest wrote: the vCPU
//! threads ([`ThreadKind::Vcpu`]), the virtio device workers (fs, net,
//! vsock: [`crate::devices::virtio::worker::DeviceWorker`] installs the
//! filter its device names) and the guest log receiver
//! ([`ThreadKind::GuestLog`], installed through husk-vsock's thread hook by
//! whoever binds it). A filter is inherited by threads its thread creates,
//! so confined threads create none: device activation, which starts a
//! worker, runs on the VM's control thread (`devices::virtio::control`)
//! rather than on the vCPU that wrote DRIVER_OK.
//!
//! The rest of the process (the shim's tokio threads, husk-vmm's main
//! thread) gets the looser [`install_process_deny_list`]: syscalls the shim
//! never needs fail with EPERM; everything else, mounts included, stays.
//!
//! Every list holds what the thread's own code makes plus what std, glibc
//! and tracing make on any thread: memory (mmap, munmap, mremap, madvise,
//! mprotect, brk; never with PROT_EXEC), futex, sched_yield, signal return
//! and masks, clocks, getrandom (std's hash seeds), write (log lines),
//! close, exit, and tgkill/tkill of SIGABRT only, so a panic (the release
//! profile aborts) still dumps as an abort rather than a seccomp kill.
//! x86_64 only, like the rest of the VMM.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule could not be built (a bug in the lists below).
    #[error("seccomp filter {filter}: invalid rule: {source}")]
    Rule {
        filter: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    /// The filter could not be compiled to BPF.
    #[error("seccomp filter {filter}: cannot compile: {source}")]
    Compile {
        filter: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no CONFIG_SECCOMP_FILTER, or
    /// prctl(PR_SET_NO_NEW_PRIVS) failed).
    #[error("cannot install seccomp filter {filter}: {source}")]
    Install {
        filter: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// The kinds of VMM thread with a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// `husk-vcpu<N>`: KVM_RUN and the exits it hands to user space.
    Vcpu,
    /// `husk-fs`: the virtio-fs file server (fuse-backend-rs passthrough).
    Fs,
    /// `husk-net`: frames between the guest's queues and the tap.
    Net,
    /// `husk-vsock`: the hybrid vsock muxer over Unix sockets.
    Vsock,
    /// `husk-guest-log`: the agent's log stream, re-emitted on the host.
    GuestLog,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Fs,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::GuestLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Fs => "fs",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::GuestLog => "guest-log",
        }
    }

    /// What a syscall outside the list does.
    ///
    /// - vCPU, net, vsock, fs: kill the whole process
    ///   (`SECCOMP_RET_KILL_PROCESS`). These threads parse what the guest
    ///   writes; a syscall outside their list means the thread no longer
    ///   runs our code, and only a kill stops it from trying the next one
    ///   (an error return would let it go on probing with what is allowed).
    ///   The shim and its pod go with it: containerd sees the shim die and
    ///   reports every task exited, which is the right answer to a VM that
    ///   broke out. Their lists are small and fully exercised by the device
    ///   tests and real boots; the fs list is wide on purpose (every FUSE
    ///   operation fuse-backend-rs implements, also the rare ones).
    /// - guest log: EPERM. It only splits lines and hands them to tracing;
    ///   a gap in its list (a tracing layer writing somewhere new, say)
    ///   should cost the pod some log lines, not every container in it.
    ///   Its allow-list still keeps a taken-over thread to what is listed.
    pub fn mismatch_action(self) -> SeccompAction {
        match self {
            ThreadKind::GuestLog => SeccompAction::Errno(errno_u32(libc::EPERM)),
            ThreadKind::Vcpu | ThreadKind::Fs | ThreadKind::Net | ThreadKind::Vsock => {
                SeccompAction::KillProcess
            }
        }
    }

    /// The syscalls the thread may make, with argument rules where the
    /// syscall is only fine for some arguments.
    fn rules(self) -> Result<Rules, SeccompError> {
        let filter = self.name();
        let mut rules = common_rules(filter)?;
        let extra = match self {
            ThreadKind::Vcpu => VCPU.to_vec(),
            ThreadKind::Fs => [EVENT_LOOP, FS].concat(),
            ThreadKind::Net => [EVENT_LOOP, NET].concat(),
            ThreadKind::Vsock => [EVENT_LOOP, VSOCK].concat(),
            ThreadKind::GuestLog => GUEST_LOG.to_vec(),
        };
        for nr in extra {
            rules.insert(nr, Vec::new());
        }
        match self {
            ThreadKind::Vcpu => {
                let ioctls = [KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()];
                let rule = ioctls
                    .iter()
                    .map(|req| rule(filter, &[(1, SeccompCmpOp::Eq, *req)]))
                    .collect::<Result<Vec<_>, _>>()?;
                rules.insert(libc::SYS_ioctl, rule);
            }
            ThreadKind::Vsock => {
                // Connections to `<uds>_<port>` only: Unix stream sockets.
                let unix_only = rule(filter, &[(0, SeccompCmpOp::Eq, AF_UNIX)])?;
                rules.insert(libc::SYS_socket, vec![unix_only]);
                // std's set_nonblocking on accepted streams.
                let fionbio = rule(filter, &[(1, SeccompCmpOp::Eq, FIONBIO)])?;
                rules.insert(libc::SYS_ioctl, vec![fionbio]);
            }
            ThreadKind::GuestLog => {
                let fionbio = rule(filter, &[(1, SeccompCmpOp::Eq, FIONBIO)])?;
                rules.insert(libc::SYS_ioctl, vec![fionbio]);
            }
            ThreadKind::Fs | ThreadKind::Net => {}
        }
        Ok(rules)
    }

    /// How many syscalls the filter lets through (some only with certain
    /// arguments; not counting openat where it fails with EACCES).
    pub fn allowed_syscalls(self) -> Result<usize, SeccompError> {
        Ok(self.rules()?.len())
    }

    /// The compiled filter.
    pub fn filter(self) -> Result<ThreadFilter, SeccompError> {
        let name = self.name();
        let mut rules = self.rules()?;
        let mut programs = Vec::with_capacity(2);
        if self != ThreadKind::Fs {
            // glibc's malloc opens /proc/sys/vm/overcommit_memory the first
            // time it shrinks a thread arena's heap, on whatever thread that
            // is, and does without the answer if the open fails. So threads
            // that open nothing get openat answered with EACCES instead of
            // a kill: allowed here, refused by the second program (stacked
            // filters take the most restrictive answer).
            rules.insert(libc::SYS_openat, Vec::new());
            let refuse = [(libc::SYS_openat, Vec::new())].into_iter().collect();
            programs.push(compile(
                name,
                refuse,
                SeccompAction::Allow,
                SeccompAction::Errno(errno_u32(libc::EACCES)),
            )?);
        }
        // The allow-list goes last: it does not allow installing filters.
        programs.push(compile(
            name,
            rules,
            self.mismatch_action(),
            SeccompAction::Allow,
        )?);
        Ok(ThreadFilter { name, programs })
    }

    /// Installs the filter on the calling thread (for good: a filter can
    /// only ever be tightened).
    pub fn install(self) -> Result<(), SeccompError> {
        self.filter()?.install()
    }
}

/// A thread kind's compiled filter: one BPF program, or two where openat
/// is refused with an error (see [`ThreadKind::filter`]).
#[derive(Debug, Clone)]
pub struct ThreadFilter {
    name: &'static str,
    programs: Vec<BpfProgram>,
}

impl ThreadFilter {
    /// Installs the filter on the calling thread (and whatever threads it
    /// creates afterwards).
    pub fn install(&self) -> Result<(), SeccompError> {
        self.programs
            .iter()
            .try_for_each(|program| install_program(self.name, program))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What the guest log receiver's thread runs before serving (husk-vsock's
/// `GuestLogReceiver::bind_confined`): installs [`ThreadKind::GuestLog`]
/// if `enabled`. The filter is compiled here, on the caller.
pub fn guest_log_confinement(
    enabled: bool,
) -> Result<impl FnOnce() -> std::io::Result<()> + Send + 'static, SeccompError> {
    let filter = enabled.then(|| ThreadKind::GuestLog.filter()).transpose()?;
    Ok(move || match filter {
        Some(filter) => filter.install().map_err(std::io::Error::other),
        None => Ok(()),
    })
}

/// Installs `program` (named `filter` in errors) on the calling thread.
fn install_program(filter: &'static str, program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { filter, source })
}

fn errno_u32(errno: i32) -> u32 {
    // errno values are small positive numbers.
    u32::try_from(errno).unwrap_or(1)
}

const AF_UNIX: u64 = 1;
const FIONBIO: u64 = 0x5421;
const PROT_EXEC: u64 = 0x4;
const SIGABRT: u64 = 6;

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);

/// One rule: all of `conds` (argument index, comparison, value) hold. The
/// comparisons look at the low 32 bits of int-sized arguments.
fn rule(
    filter: &'static str,
    conds: &[(u8, SeccompCmpOp, u64)],
) -> Result<SeccompRule, SeccompError> {
    let conds = conds
        .iter()
        .map(|(arg, op, value)| {
            SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SeccompError::Rule { filter, source })?;
    SeccompRule::new(conds).map_err(|source| SeccompError::Rule { filter, source })
}

/// Syscalls std, glibc and tracing make on any thread.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // glibc's malloc sizes its arena count from the affinity mask the
    // first time a thread needs an arena of its own.
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The common list with its argument rules: mmap and mprotect never make
/// memory executable; fcntl only for descriptor flags; signals only as
/// abort() sends them.
fn common_rules(filter: &'static str) -> Result<Rules, SeccompError> {
    let mut rules: Rules = COMMON.iter().map(|nr| (*nr, Vec::new())).collect();
    let no_exec = || rule(filter, &[(2, SeccompCmpOp::MaskedEq(PROT_EXEC), 0)]);
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    // Descriptor flags (std's set_nonblocking, its debug checks that a
    // dropped descriptor was open) and close-on-exec duplicates.
    let fcntl = [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ]
    .iter()
    .map(|cmd| {
        let cmd = u64::try_from(*cmd).unwrap_or(u64::MAX);
        rule(filter, &[(1, SeccompCmpOp::Eq, cmd)])
    })
    .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_fcntl, fcntl);
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(filter, &[(2, SeccompCmpOp::Eq, SIGABRT)])?],
    );
    rules.insert(
        libc::SYS_tkill,
        vec![rule(filter, &[(1, SeccompCmpOp::Eq, SIGABRT)])?],
    );
    Ok(rules)
}

/// A vCPU: KVM_RUN and exit handling. Serial output is written here (the
/// console file, the log), eventfds are signalled (irqfd, exit) and read (a
/// reset clears left-over queue kicks), and activation clones the queue
/// eventfds (fcntl F_DUPFD_CLOEXEC, in the common list) before handing the
/// device to the control thread.
const VCPU: &[i64] = &[libc::SYS_read];

/// Every device worker's event loop: epoll, eventfds, interrupts.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
];

/// The file server: every FUSE operation fuse-backend-rs' passthrough file
/// system implements, plus the credential switch for creations (per-thread
/// setresuid/setresgid) and umask (FUSE_INIT). No ioctl (passthrough
/// answers FUSE_IOCTL with ENOSYS), no open_by_handle_at (inodes are O_PATH
/// descriptors), no mount, no exec.
const FS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_dup,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
];

/// The NIC: frames to and from the (non-blocking) tap, one read or write
/// each (already in the event loop's and the common list).
const NET: &[i64] = &[];

/// The vsock muxer: accepts host connections on its listener, connects to
/// `<uds>_<port>` for guest connections, and moves bytes.
const VSOCK: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
];

/// The guest log receiver: one listener, one connection at a time, poll.
const GUEST_LOG: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
];

/// What no thread of the shim (or husk-vmm) ever needs. Matched calls fail
/// with EPERM rather than killing the process: this filter covers the
/// tokio threads that serve containerd, and a library probing one of these
/// (bpf, perf_event_open, io_uring) must get an error, not take every
/// container of the pod down. The mount family (mount, umount2, open_tree,
/// move_mount, fsopen, fsmount, fsconfig, mount_setattr) stays: the shim
/// mounts rootfs and bind mounts into the share at container create. So do
/// unshare and setns (the fs worker's CLONE_FS, the tap in a pod's netns).
///
/// io_uring is on the list because its operations bypass seccomp: with it,
/// a thread's allow-list would mean nothing.
const PROCESS_DENY: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_open_by_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_lookup_dcookie,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    libc::SYS_uselib,
    libc::SYS_personality,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// Name of the process-wide deny list in errors.
pub const PROCESS_FILTER: &str = "process deny-list";

/// How many syscalls the process-wide deny list refuses.
pub fn process_denied_syscalls() -> usize {
    PROCESS_DENY.len()
}

/// The compiled process-wide deny list.
pub fn process_deny_program() -> Result<BpfProgram, SeccompError> {
    let rules = PROCESS_DENY.iter().map(|nr| (*nr, Vec::new())).collect();
    compile(
        PROCESS_FILTER,
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno_u32(libc::EPERM)),
    )
}

/// Installs the deny list on the calling thread; threads it creates
/// afterwards inherit it (call it first thing in `main`).
pub fn install_process_deny_list() -> Result<(), SeccompError> {
    install_program(PROCESS_FILTER, &process_deny_program()?)
}

fn compile(
    filter: &'static str,
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::x86_64;
    let built = SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(|source| SeccompError::Compile { filter, source })?;
    built
        .try_into()
        .map_err(|source| SeccompError::Compile { filter, source })
}

/// Whether this kernel can enforce the filters: seccomp filter mode with
/// the kill-process action (Linux 4.14 and later).
pub fn available() -> Result<(), String> {
    let action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 at the pointer, which
    // points at a live local.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "seccomp(SECCOMP_GET_ACTION_AVAIL, KILL_PROCESS) failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(test)]
mod tests;
