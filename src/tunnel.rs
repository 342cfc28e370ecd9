//! Upgraded connections (WebSocket and other HTTP/1.1 upgrades): once both sides switched
//! protocols, bytes are copied both ways until either side closes or nothing moves for the idle
//! timeout.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUFFER: usize = 16 * 1024;

/// Waits for both upgrades, then relays. Runs as its own task; the outcome goes to the log.
pub async fn relay(client: OnUpgrade, upstream: OnUpgrade, idle: Duration, backend: String) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(backend = %backend, error = %e, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    match copy_until_idle(&mut client, &mut upstream, idle).await {
        Ok(Ended::Closed) => tracing::debug!(backend = %backend, "tunnel closed"),
        Ok(Ended::Idle) => tracing::debug!(backend = %backend, "tunnel idle: closed"),
        Err(e) => tracing::debug!(backend = %backend, error = %e, "tunnel failed"),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Closed,
    Idle,
}

/// Copies both ways; any byte in either direction restarts the idle clock. A side that closes
/// its half is passed on (shutdown of the other side's write half), and the relay ends once both
/// directions are done.
pub async fn copy_until_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_a, mut from_b) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            n = a.read(&mut from_a), if a_open => {
                a_open = pass(&from_a, n?, b).await?;
            }
            n = b.read(&mut from_b), if b_open => {
                b_open = pass(&from_b, n?, a).await?;
            }
            () = tokio::time::sleep(idle) => return Ok(Ended::Idle),
        }
    }
    Ok(Ended::Closed)
}

/// Writes what was read to `to`; on end of stream shuts `to`'s write half. False once closed.
async fn pass<W: AsyncWrite + Unpin>(buf: &[u8], n: usize, to: &mut W) -> std::io::Result<bool> {
    if n == 0 {
        to.shutdown().await?;
        return Ok(false);
    }
    to.write_all(&buf[..n]).await?;
    to.flush().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bytes_flow_both_ways_and_idleness_ends_the_tunnel() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let relay =
            tokio::spawn(
                async move { copy_until_idle(&mut a, &mut b, Duration::from_secs(30)).await },
            );
        client
            .write_all(b"ping")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 4];
        server
            .read_exact(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf, b"ping");
        server
            .write_all(b"pong")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        client
            .read_exact(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf, b"pong");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!relay.is_finished(), "29 s of silence is not yet idle");
        let ended = relay.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ended.unwrap_or_else(|e| panic!("{e}")), Ended::Idle);
    }

    #[tokio::test]
    async fn a_close_on_both_sides_ends_the_tunnel() {
        let (client, mut a) = tokio::io::duplex(64);
        let (mut b, server) = tokio::io::duplex(64);
        drop((client, server));
        let ended = copy_until_idle(&mut a, &mut b, Duration::from_secs(30)).await;
        assert_eq!(ended.unwrap_or_else(|e| panic!("{e}")), Ended::Closed);
    }
}
