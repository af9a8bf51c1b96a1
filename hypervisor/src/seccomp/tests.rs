//! Each filter on a real thread: a listed syscall works, an unlisted one
//! kills the process (tested in a forked child) or fails with EPERM.

use super::*;

/// What happened to a forked child.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exited(i32),
    Signalled(i32),
}

/// Runs `body` in a forked child with `install` run first; the child's
/// exit code is what `body` returns. The child only makes raw syscalls (no
/// allocation: another test thread may hold malloc's lock at the fork).
fn in_child(install: impl FnOnce() -> bool, body: impl FnOnce() -> i32) -> Outcome {
    // SAFETY: the child runs only async-signal-safe code (raw syscalls,
    // seccomp installation of an already built program, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = if install() { body() } else { 100 };
        // SAFETY: _exit ends the child without running the parent's atexit
        // handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid int.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    if libc::WIFSIGNALED(status) {
        Outcome::Signalled(libc::WTERMSIG(status))
    } else {
        Outcome::Exited(libc::WEXITSTATUS(status))
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn eventfd() -> i32 {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    fd
}

fn write_eventfd(fd: i32) -> bool {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) == 8 }
}

fn open_root() -> i32 {
    // SAFETY: a NUL-terminated constant path.
    unsafe {
        libc::openat(
            libc::AT_FDCWD,
            c"/".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    }
}

fn inet_socket() -> i32 {
    // SAFETY: socket takes no pointers.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }
}

fn unix_socket() -> i32 {
    // SAFETY: socket takes no pointers.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }
}

/// The listed call must succeed (else exit 1); the unlisted one must not
/// return (else exit 2).
fn allowed_then_killed(kind: ThreadKind, allowed: impl FnOnce() -> bool, forbidden: impl FnOnce()) {
    let filter = kind.filter().unwrap();
    let outcome = in_child(
        || filter.install().is_ok(),
        || {
            if !allowed() {
                return 1;
            }
            forbidden();
            2
        },
    );
    assert_eq!(
        outcome,
        Outcome::Signalled(libc::SIGSYS),
        "{} filter",
        kind.name()
    );
}

#[test]
fn vcpu_filter_allows_eventfds_and_kills_on_socket() {
    let fd = eventfd();
    allowed_then_killed(
        ThreadKind::Vcpu,
        // SAFETY: F_DUPFD_CLOEXEC takes no pointers.
        || write_eventfd(fd) && unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) } >= 0,
        || {
            unix_socket();
        },
    );
}

#[test]
fn threads_that_open_nothing_get_eacces_from_openat() {
    for kind in ThreadKind::ALL {
        let filter = kind.filter().unwrap();
        let outcome = in_child(
            || filter.install().is_ok(),
            || {
                let fd = open_root();
                match kind {
                    ThreadKind::Fs => i32::from(fd < 0),
                    _ => i32::from(fd != -1 || errno() != libc::EACCES),
                }
            },
        );
        assert_eq!(outcome, Outcome::Exited(0), "{} filter", kind.name());
    }
}

#[test]
fn vcpu_filter_allows_only_its_kvm_ioctls() {
    let fd = eventfd();
    allowed_then_killed(
        ThreadKind::Vcpu,
        // SAFETY: KVM_RUN on an eventfd fails with ENOTTY: the filter let it through.
        || unsafe { libc::ioctl(fd, KVM_RUN(), 0) } == -1 && errno() == libc::ENOTTY,
        || {
            let mut on: libc::c_int = 1;
            // SAFETY: FIONBIO reads one int.
            unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) };
        },
    );
}

#[test]
fn no_filter_allows_executable_memory() {
    for kind in ThreadKind::ALL {
        if kind.mismatch_action() != SeccompAction::KillProcess {
            continue;
        }
        allowed_then_killed(
            kind,
            || {
                // SAFETY: an anonymous private mapping of one page, unmapped again.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                // SAFETY: `p` is the mapping just made.
                p != libc::MAP_FAILED && unsafe { libc::munmap(p, 4096) } == 0
            },
            || {
                // SAFETY: as above, but executable: the filter must refuse it.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            },
        );
    }
}

#[test]
fn fs_filter_allows_file_calls_and_kills_on_socket() {
    allowed_then_killed(
        ThreadKind::Fs,
        || {
            let fd = open_root();
            // SAFETY: statx is plain data; all zeroes is a valid value.
            let mut st: libc::statx = unsafe { std::mem::zeroed() };
            // SAFETY: statx writes into `st`; the path is a NUL-terminated constant.
            let rc = unsafe {
                libc::statx(
                    fd,
                    c"".as_ptr(),
                    libc::AT_EMPTY_PATH,
                    libc::STATX_BASIC_STATS,
                    &mut st,
                )
            };
            // SAFETY: umask takes no pointers.
            unsafe { libc::umask(0o022) };
            // SAFETY: setresuid to "unchanged" changes nothing.
            let creds = unsafe { libc::syscall(libc::SYS_setresuid, -1, -1, -1) } == 0;
            fd >= 0 && rc == 0 && creds
        },
        || {
            unix_socket();
        },
    );
}

#[test]
fn net_filter_allows_tap_io_and_kills_on_socket() {
    let fd = eventfd();
    allowed_then_killed(
        ThreadKind::Net,
        || {
            let written = write_eventfd(fd);
            let mut value = 0u64;
            // SAFETY: reads 8 bytes into a live u64.
            let n = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
            written && n == 8
        },
        || {
            unix_socket();
        },
    );
}

#[test]
fn vsock_filter_allows_unix_sockets_only() {
    allowed_then_killed(
        ThreadKind::Vsock,
        || unix_socket() >= 0,
        || {
            inet_socket();
        },
    );
}

#[test]
fn guest_log_filter_returns_eperm_on_a_real_thread() {
    assert_eq!(
        ThreadKind::GuestLog.mismatch_action(),
        SeccompAction::Errno(1)
    );
    let thread = std::thread::spawn(|| {
        ThreadKind::GuestLog.install().unwrap();
        // SAFETY: poll with no descriptors and no timeout.
        let polled = unsafe { libc::poll(std::ptr::null_mut(), 0, 0) };
        let opened = open_root();
        let open_errno = errno();
        let socket = unix_socket();
        (polled, opened, open_errno, socket, errno())
    });
    let (polled, opened, err, socket, socket_errno) = thread.join().unwrap();
    assert_eq!(polled, 0);
    assert_eq!((socket, socket_errno), (-1, libc::EPERM));
    // openat gets EACCES on every thread but the file server's.
    assert_eq!((opened, err), (-1, libc::EACCES));
    // The filter was the spawned thread's own: this one still opens files.
    let fd = open_root();
    assert!(fd >= 0);
    // SAFETY: fd was just opened.
    unsafe { libc::close(fd) };
}

#[test]
fn process_deny_list_refuses_ptrace_and_keeps_mounts_and_files() {
    let program = process_deny_program().unwrap();
    let outcome = in_child(
        || seccompiler::apply_filter(&program).is_ok(),
        || {
            // SAFETY: PTRACE_TRACEME takes no pointers; the filter refuses it.
            let traced = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            if traced != -1 || errno() != libc::EPERM {
                return 1;
            }
            // SAFETY: bpf with a null attribute: refused before the kernel looks.
            let bpf = unsafe { libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0) };
            if bpf != -1 || errno() != libc::EPERM {
                return 2;
            }
            let fd = open_root();
            if fd < 0 || unix_socket() < 0 {
                return 3;
            }
            // SAFETY: a NUL-terminated constant path that does not exist.
            let rc = unsafe { libc::umount2(c"/nonexistent-husk-seccomp".as_ptr(), 0) };
            // SAFETY: geteuid takes nothing.
            if rc != -1 || (unsafe { libc::geteuid() } == 0 && errno() == libc::EPERM) {
                return 4;
            }
            0
        },
    );
    assert_eq!(outcome, Outcome::Exited(0));
    for nr in [
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
    ] {
        assert!(
            !PROCESS_DENY.contains(&nr),
            "syscall {nr} must stay allowed"
        );
    }
}

#[test]
fn every_filter_compiles_and_lists_its_syscalls() {
    for kind in ThreadKind::ALL {
        let n = kind.allowed_syscalls().unwrap();
        assert!(n > COMMON.len(), "{}: {n}", kind.name());
        assert!(!kind.filter().unwrap().programs.is_empty());
    }
    assert!(process_denied_syscalls() > 10);
}

#[test]
fn kvm_ioctl_numbers() {
    assert_eq!(KVM_RUN(), 0xae80);
    assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
    assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
}

#[test]
fn this_kernel_has_seccomp() {
    available().unwrap();
}
