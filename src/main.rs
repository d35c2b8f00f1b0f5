//! The `strait` binary: parse the command line, load the config, run.

use std::process::ExitCode;

use clap::Parser;
use strait::cli::Cli;

// mimalloc's thread-local free lists: a proxy allocates a dozen small objects per
// request (hyper's header maps, futures, channel nodes) and frees them on the same
// thread; glibc's malloc spent about 8 % of Strait's instructions on them. The v2
// line: v3's aligned-allocation path (which every Rust allocation takes) cost about
// 2 % more instructions per request here.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = &cli.command {
        return match command.print(&mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            // A closed pipe (`strait man | head`) is not worth a message.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strait: {e}");
                ExitCode::from(1)
            }
        };
    }
    let config = match cli.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("strait: {e}");
            return ExitCode::from(2);
        }
    };
    // Certificates are read now, so a bad one is a config error (exit 2), in --check too.
    for l in &config.listen {
        if let Some(tls) = &l.tls {
            match strait::server::tls::load_all(tls) {
                // A name two certificates cover is served by the first: worth a word,
                // not a refusal. A run logs the same when the listener starts.
                Ok(pairs) if cli.check => {
                    for warning in strait::server::tls::overlaps(tls, &pairs) {
                        eprintln!("strait: warning: listener {}: {warning}", l.addr);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("strait: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    if cli.check {
        match &cli.config {
            Some(path) => println!("{}: ok", path.display()),
            None => println!("configuration ok"),
        }
        return ExitCode::SUCCESS;
    }

    init_logging(cli.log.as_deref());
    raise_open_file_limit();
    // One worker: a current-thread runtime, which skips the work-stealing machinery
    // (queues, wake-ups across threads) that one thread has no use for.
    let mut runtime = if config.runtime.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all();
    if config.runtime.workers > 1 {
        runtime.worker_threads(config.runtime.workers);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strait: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // SIGHUP reads the file again, with the same flags applied.
    let reload: Option<strait::Reload> = cli
        .config
        .is_some()
        .then(|| Box::new(move || cli.to_config()) as strait::Reload);
    match runtime.block_on(strait::run_reloading(config, reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Every client connection, upstream connection and tunnel holds a descriptor, and
/// the soft limit is often 1024 where the hard limit allows far more: the soft limit
/// is raised to the hard one (capped at 2^20), as HAProxy does for its `maxconn`.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = lim.rlim_max.min(1 << 20);
        if lim.rlim_cur < want {
            lim.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("could not raise the open-file limit");
            }
        }
    }
}

/// Logs go to stderr. `--log LEVEL` sets the level; RUST_LOG, when set, wins.
fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(format!("strait={}", level.unwrap_or("info"))),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
