//! containerd-shim-husk-v2 (runtime type `io.containerd.husk.v2`).

use husk_shim::shim::HuskShim;

/// The virtio-fs device holds one host descriptor per guest inode and open
/// file, out of this process's table: use all the hard limit allows.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() {
    raise_fd_limit();
    husk_shim::seccomp::confine_process();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("husk-shim")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: cannot start async runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = containerd_shim::Config {
        // Logging goes through tracing into containerd's log FIFO (logging.rs).
        no_setup_logger: true,
        // The shim spawns no processes: the VM runs in-process.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    runtime.block_on(containerd_shim::asynchronous::run::<HuskShim>(
        husk_shim::RUNTIME_ID,
        Some(config),
    ));
}
