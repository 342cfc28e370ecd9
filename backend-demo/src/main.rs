//! The `backend-demo` command line.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use backend_demo::sessions::Replication;
use backend_demo::store::Store;
use backend_demo::NodeOptions;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "Demo web app for stickylb with replicated sessions")]
struct Args {
    /// Node id, shown in every response (letters, digits, '-', '_', '.').
    #[arg(long, value_parser = node_id)]
    id: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Session store: memory, sqlite:PATH or redis://HOST:PORT[/DB].
    #[arg(long, default_value = "sqlite:stickylb-sessions.db")]
    store: String,
    /// Key prefix in Redis, so several demos can share one server.
    #[arg(long, default_value = "stickylb:")]
    redis_prefix: String,
    /// sync: stored before the response; async: stored right after it.
    #[arg(long, value_enum, default_value_t = Replication::Sync)]
    replication: Replication,
    /// Idle time after which a session expires (since its last write).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    session_ttl: Duration,
    /// Without a heartbeat from stickylb for this long, the node assumes it was cut off and
    /// drops its cached sessions.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    rejoin_window: Duration,
    /// Async mode: most sessions with queued writes; beyond it, writes go through synchronously.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    async_queue: u64,
    /// How long shutdown may spend storing queued writes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    flush_timeout: Duration,
}

fn node_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then(|| s.to_string())
        .ok_or_else(|| "use 1 to 64 letters, digits, '-', '_' or '.'".to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let store = match Store::open(&args.store, &args.redis_prefix).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: --store: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let address = listener.local_addr().map_or(args.listen, |a| a);
    tracing::info!(node = %args.id, address = %address, "listening");
    // The one line on stdout: scripts and tests started with port 0 learn the real address here.
    println!("backend-demo {} listening on {address}", args.id);
    let opts = NodeOptions {
        id: args.id,
        store,
        replication: args.replication,
        session_ttl: args.session_ttl,
        rejoin_window: args.rejoin_window,
        queue_limit: usize::try_from(args.async_queue).unwrap_or(usize::MAX),
        flush_timeout: args.flush_timeout,
    };
    match backend_demo::serve(opts, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the node");
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
