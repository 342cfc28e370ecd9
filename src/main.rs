//! The `stickylb` command line: run the proxy, or check a configuration.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use stickylb::allocator::{self, Quietness};
use stickylb::config::{
    AffinityConfig, Algorithm, Config, ForwardingConfig, SecretSource, SECRET_ENV,
};
use stickylb::Stickylb;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "HTTP load balancer with sticky sessions and failover that keeps the session"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Worker threads, overriding `[runtime] workers` (default: one per core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print a summary; exits non-zero on error.
    Check,
    /// Run the proxy plus one backend-demo process per configured backend (sharing a SQLite
    /// session store), and print a curl walkthrough. Ctrl-C stops everything.
    Demo {
        /// How the demo nodes replicate sessions.
        #[arg(long, value_parser = ["sync", "async"], default_value = "sync")]
        replication: String,
    },
}

/// mimalloc: measured faster than the system allocator on the request path, and it returns
/// freed memory to the OS. Its v3 line (the crate without its `v2` feature): with 9,000 idle
/// connections it held 24 to 25 MiB where v2 held anywhere from 21 to 68, at the same speed (see
/// PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

thread_local! {
    /// Each worker's own: mimalloc keeps a heap per thread (module `allocator`).
    static QUIETNESS: RefCell<Quietness> = RefCell::default();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, std::env::var(SECRET_ENV).ok()) {
        Ok(c) => Config {
            workers: cli.workers.map(usize::from).or(c.workers),
            ..c
        },
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            print!("{}", summary(&config));
            ExitCode::SUCCESS
        }
        Some(Command::Demo { replication }) => demo(config, &replication),
        None => run(config),
    }
}

fn demo(config: Config, replication: &str) -> ExitCode {
    let started = stickylb::demo::backend_binary()
        .and_then(|bin| stickylb::demo::start_nodes(&bin, &config, replication));
    let mut nodes = match started {
        Ok(nodes) => nodes,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!(
        "{}",
        stickylb::demo::walkthrough(&config, &nodes, replication)
    );
    let code = run(config);
    stickylb::demo::stop(&mut nodes);
    code
}

fn run(config: Config) -> ExitCode {
    init_tracing();
    no_huge_pages();
    if config.workers == Some(1) && config.io_uring {
        match stickylb::uring::Runtime::new() {
            Ok(runtime) => {
                tracing::info!("requests to backends go through io_uring");
                return runtime.block_on(serve_quietly(config));
            }
            Err(e) => tracing::info!(error = %e, "io_uring unavailable: one system call per send"),
        }
    }
    // One worker runs everything on one thread, without cross-thread wake-ups.
    let mut builder = match config.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder
        .enable_all()
        // A busy runtime looks for new events every 61 tasks by default, which cut a turn's
        // burst of writes (wire::Conn::exchange) in two; every 200 served 1.02x the
        // requests/s with the same p99 (PERFORMANCE.md).
        .event_interval(200)
        .on_thread_park(|| {
            if QUIETNESS.with_borrow_mut(|q| q.parking(Instant::now())) {
                allocator::collect();
            }
        })
        .on_thread_unpark(|| QUIETNESS.with_borrow_mut(|q| q.woke(Instant::now())))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

/// With transparent huge pages set to `always` (a common default), every 2 MiB of the
/// allocator's memory that is touched becomes resident whole: 9,000 idle clients measured 10 MiB
/// more that way, for no measured throughput gain (PERFORMANCE.md), so the proxy opts out.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(error = %e, "cannot opt out of transparent huge pages");
    }
}

/// [`serve`] on a runtime without park hooks (tokio-uring's): a timer stands in for them to
/// give memory back once the proxy has gone quiet (module `allocator`).
async fn serve_quietly(config: Config) -> ExitCode {
    let quiet = tokio::spawn(allocator::collect_when_quiet());
    let code = serve(config).await;
    quiet.abort();
    code
}

async fn serve(config: Config) -> ExitCode {
    if config.affinity.secret_source == SecretSource::Generated {
        tracing::warn!(
            "no affinity secret configured: using a random one, so pins will not survive a restart \
             and other instances will not honour them; set [affinity] secret or {SECRET_ENV}"
        );
    }
    let address = config.listener.address;
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %address, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let admin = match &config.admin {
        None => None,
        Some(a) => match tokio::net::TcpListener::bind(a.address).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(address = %a.address, error = %e, "cannot listen for admin");
                return ExitCode::FAILURE;
            }
        },
    };
    // The bound addresses, not the configured ones: with port 0 the OS picked the port.
    let address = listener.local_addr().unwrap_or(address);
    let admin_address = admin.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(address = %address, admin = ?admin_address, backends = config.backends.len(), "listening");
    let lb = Stickylb::new(config);
    let hup = tokio::spawn(reload_on_sighup(lb.clone()));
    lb.serve(listener, admin, shutdown_signal()).await;
    hup.abort();
    ExitCode::SUCCESS
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// SIGHUP reloads the configuration, as `POST /reload` does.
async fn reload_on_sighup(lb: Stickylb) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGHUP; reload with POST /reload instead");
            return;
        }
    };
    while hup.recv().await.is_some() {
        // A rejected file is logged by the reloader, and the running configuration stays.
        if lb.reload("SIGHUP").await.is_err() {
            continue;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C will stop the proxy");
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot watch Ctrl-C either");
            }
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}

fn summary(c: &Config) -> String {
    let algorithm = match c.balancer.algorithm {
        Algorithm::RoundRobin => "round_robin",
        Algorithm::LeastConnections => "least_connections",
    };
    let l = &c.listener;
    let transport = l.tls.as_ref().map_or("HTTP/1.1 and h2c".to_string(), |t| {
        format!("TLS with {}, ALPN h2 and http/1.1", t.cert.display())
    });
    let h = &c.health;
    let mut lines = vec![
        format!("{}: OK", c.file.display()),
        format!("listener  {} ({transport})", l.address),
        forwarding_line(&l.forwarding),
        cookie_line(&c.affinity),
        format!("balancer  {algorithm}, {} retries", c.balancer.retries),
        format!(
            "health    GET {} every {} (timeout {}), up after {} passes, down after {} failures",
            h.path,
            humantime::format_duration(h.interval),
            humantime::format_duration(h.timeout),
            h.rise,
            h.fall
        ),
        format!("backends  {}", c.backends.len()),
    ];
    for b in &c.backends {
        lines.push(format!(
            "  {:<12} {:<24} weight {}",
            b.id,
            b.address.as_str(),
            b.weight
        ));
    }
    lines.join("\n") + "\n"
}

fn forwarding_line(fwd: &ForwardingConfig) -> String {
    let trusted = match fwd.trusted_proxies.len() {
        0 => "replaced from every peer".to_string(),
        _ => {
            let nets: Vec<String> = fwd.trusted_proxies.iter().map(|n| n.to_string()).collect();
            format!("extended from {}, replaced from others", nets.join(", "))
        }
    };
    let forwarded = if fwd.forwarded { " (+ Forwarded)" } else { "" };
    format!("forwarding headers {trusted}{forwarded}")
}

fn cookie_line(a: &AffinityConfig) -> String {
    let secret = match a.secret_source {
        SecretSource::File => "from the file".to_string(),
        SecretSource::Env => format!("from {SECRET_ENV}"),
        SecretSource::Generated => {
            "NOT SET: a random one per start (pins will not survive restarts)".to_string()
        }
    };
    let lifetime = a.max_age.map_or("session cookie".to_string(), |age| {
        format!(
            "pins expire after {}, checked by the proxy",
            humantime::format_duration(age)
        )
    });
    let rotation = match a.previous_secrets.len() {
        0 => String::new(),
        n => format!(", {n} previous secret(s) accepted and re-issued"),
    };
    format!(
        "cookie    {} (HttpOnly={}, Secure={}, SameSite={:?}, {lifetime}); secret {secret}{rotation}",
        a.cookie, a.http_only, a.secure, a.same_site
    )
}
