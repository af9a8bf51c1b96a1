//! `husk-agent`: see [`husk_agent::args::USAGE`].

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use husk_agent::logging::{self, Destination};
use husk_agent::reaper::Reaper;
use husk_agent::{args, init, power, service, Mode};
use tracing::level_filters::LevelFilter;

fn main() -> ExitCode {
    let is_pid1 = nix::unistd::getpid().as_raw() == 1;
    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        // PID 1 must not exit (the kernel would panic): a bad argument on
        // the kernel command line is reported and ignored.
        Err(e) if is_pid1 => {
            let args = args::Args::default();
            return run_init(&args, Some(format!("ignoring bad arguments: {e}")));
        }
        Err(e) => {
            eprintln!("husk-agent: {e}\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let mode = Mode::detect(is_pid1, args.listen.as_deref());
    if mode != Some(Mode::Init) {
        if args.help {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        if args.version {
            println!("husk-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
    }
    match mode {
        Some(Mode::Init) => run_init(&args, None),
        Some(Mode::Host) => run_host(&args),
        None => {
            eprintln!(
                "husk-agent: not PID 1: refusing init duties; use --listen unix:///PATH to serve here\n{}",
                args::USAGE
            );
            ExitCode::from(2)
        }
    }
}

/// `--log-level`, else `HUSK_AGENT_LOG`, else info.
fn log_level(args: &args::Args) -> (LevelFilter, Option<String>) {
    if let Some(level) = args.log_level {
        return (level, None);
    }
    match std::env::var("HUSK_AGENT_LOG") {
        Ok(text) => match args::level(&text) {
            Ok(level) => (level, None),
            Err(e) => (LevelFilter::INFO, Some(format!("HUSK_AGENT_LOG: {e}"))),
        },
        Err(_) => (LevelFilter::INFO, None),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: every thread costs syscalls in the guest.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Serves until `stop` or a Shutdown RPC; reaping failing is fatal too.
fn run(config: service::Config, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let reaper = Reaper::new();
        tokio::select! {
            served = service::serve(config, reaper.clone(), stop) => served,
            reaped = reaper.run() => Err(anyhow::anyhow!("child reaper stopped: {reaped:?}")),
        }
    })
}

fn layout() -> husk_agent::container::Layout {
    husk_agent::container::Layout {
        run: husk_agent::RUN_DIR.into(),
    }
}

/// Never returns: PID 1 ends by powering off.
fn run_init(args: &args::Args, arg_problem: Option<String>) -> ExitCode {
    power::install_panic_hook();
    let (level, level_problem) = log_level(args);
    if let Err(e) = logging::init(Destination::HostVsock, level) {
        // Carry on blind rather than power off: the host can still talk to us.
        eprintln!("husk-agent: no logging: {e:#}");
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "husk-agent starting as PID 1"
    );
    for problem in arg_problem.iter().chain(&level_problem) {
        tracing::warn!("{problem}");
    }
    if !args.unknown.is_empty() {
        tracing::debug!("ignoring kernel command-line words {:?}", args.unknown);
    }
    init::setup();
    let config = service::Config {
        mode: Mode::Init,
        address: format!("vsock://-1:{}", husk_protocol::AGENT_VSOCK_PORT),
        io_address: format!("vsock://-1:{}", husk_protocol::AGENT_IO_VSOCK_PORT),
        layout: layout(),
    };
    if let Err(e) = run(config, std::future::pending()) {
        tracing::error!("fatal: {e:#}");
    }
    power::power_off()
}

fn run_host(args: &args::Args) -> ExitCode {
    if !args.unknown.is_empty() {
        eprintln!(
            "husk-agent: unexpected arguments {:?}\n{}",
            args.unknown,
            args::USAGE
        );
        return ExitCode::from(2);
    }
    let Some(address) = args.listen.as_deref() else {
        return ExitCode::from(2);
    };
    let (level, level_problem) = log_level(args);
    if let Err(e) = logging::init(Destination::Stderr, level) {
        eprintln!("husk-agent: logging: {e:#}");
        return ExitCode::FAILURE;
    }
    if let Some(problem) = level_problem {
        tracing::warn!("{problem}");
    }
    if args.isolated {
        if let Err(e) = init::isolate_host(std::path::Path::new(husk_agent::RUN_DIR)) {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    }
    // Container processes are our children; their orphans should be too.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("PR_SET_CHILD_SUBREAPER: {e}");
    }
    let config = service::Config {
        mode: Mode::Host,
        address: address.to_owned(),
        io_address: args::io_address(address, args.io_listen.as_deref()),
        layout: layout(),
    };
    let result = run(config, terminated());
    let code = match result {
        Ok(()) => {
            tracing::info!("exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(log) = logging::handle() {
        log.flush(Duration::from_secs(1));
    }
    code
}

/// SIGTERM or SIGINT (host mode only: PID 1 ignores them on purpose).
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("no SIGTERM/SIGINT handling: {e}");
            std::future::pending::<()>().await;
        }
    }
}
