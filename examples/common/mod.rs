//! What the measuring examples share: the command line, the config, and one task per client
//! connection on one thread, so they differ only in how a connection is relayed.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use stickylb::config::Config;
use tokio::net::{TcpListener, TcpStream};

/// The address of the config's first backend: the one upstream of the floors.
#[allow(dead_code, reason = "raw_work routes to every backend instead")]
pub fn first_backend(config: &Config) -> Option<String> {
    config.backends.first().map(|b| b.address.to_string())
}

/// The config named by `-c` and what `state` made of it, or the exit code after saying why not.
pub fn load<S>(name: &str, state: fn(&Config) -> Option<S>) -> Result<(Config, S), ExitCode> {
    let path = match std::env::args().collect::<Vec<_>>().as_slice() {
        [_, flag, path] if flag == "-c" => PathBuf::from(path),
        _ => {
            eprintln!("usage: {name} -c CONFIG");
            return Err(ExitCode::from(2));
        }
    };
    let config = Config::load(&path, None).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    let Some(state) = state(&config) else {
        eprintln!("error: {}: no backend", path.display());
        return Err(ExitCode::from(2));
    };
    Ok((config, state))
}

#[allow(dead_code, reason = "uring_floor runs tokio-uring's runtime")]
/// Runs `relay` for each client connection, with what `state` made of the config (None: the
/// config has no backend).
pub fn main<S, F, Fut, E>(name: &str, state: fn(&Config) -> Option<S>, relay: F) -> ExitCode
where
    S: Clone,
    F: Fn(TcpStream, S) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    let state = match load(name, state) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let config = state.0;
    let state = state.1;
    let served = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| rt.block_on(serve(config.listener.address, state, relay)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<S, F, Fut, E>(
    listen: std::net::SocketAddr,
    state: S,
    relay: F,
) -> std::io::Result<()>
where
    S: Clone,
    F: Fn(TcpStream, S) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let relayed = relay(client, state.clone());
        tokio::spawn(async move {
            if let Err(e) = relayed.await {
                eprintln!("connection ended: {e}");
            }
        });
    }
}
