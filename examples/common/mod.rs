//! What the floor examples share: the command line, the config, and one task per client
//! connection on one thread, so they differ only in how a connection is relayed.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use stickylb::config::Config;
use tokio::net::{TcpListener, TcpStream};

/// Runs `relay` for each client connection, with the address of the config's first backend.
pub fn main<F, Fut, E>(name: &str, relay: F) -> ExitCode
where
    F: Fn(TcpStream, String) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    let path = match std::env::args().collect::<Vec<_>>().as_slice() {
        [_, flag, path] if flag == "-c" => PathBuf::from(path),
        _ => {
            eprintln!("usage: {name} -c CONFIG");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(&path, None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(backend) = config.backends.first() else {
        eprintln!("error: {}: no backend", path.display());
        return ExitCode::from(2);
    };
    let upstream = backend.address.to_string();
    let served = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| rt.block_on(serve(config.listener.address, upstream, relay)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<F, Fut, E>(
    listen: std::net::SocketAddr,
    upstream: String,
    relay: F,
) -> std::io::Result<()>
where
    F: Fn(TcpStream, String) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let relayed = relay(client, upstream.clone());
        tokio::spawn(async move {
            if let Err(e) = relayed.await {
                eprintln!("connection ended: {e}");
            }
        });
    }
}
