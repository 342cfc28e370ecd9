//! backend-demo: the web app that shows what stickylb is for. Nodes keep sessions in memory,
//! replicate them to a shared store, and pull the latest state from it when stickylb fails a
//! client over, so the user keeps the session.
//!
//! Architecture, one job per module:
//! - [`session`]: the replicated record and session ids.
//! - [`store`]: the shared store trait (compare-and-set on version) and its memory, SQLite and
//!   Redis implementations.
//! - [`sessions`]: local cache + replication (sync write-through, async write-behind).
//! - [`rejoin`]: noticing this node was cut off, so stale copies are dropped.
//! - [`app`]: the HTTP endpoints.

pub mod app;
pub mod rejoin;
pub mod session;
pub mod sessions;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::App;
use crate::rejoin::Rejoin;
use crate::sessions::{Replication, Sessions};
use crate::store::{SessionStore, Store};

/// Everything a node needs besides its listener.
pub struct NodeOptions {
    pub id: String,
    pub store: Store,
    pub replication: Replication,
    pub session_ttl: Duration,
    pub rejoin_window: Duration,
    pub queue_limit: usize,
    pub flush_timeout: Duration,
}

/// How often expired sessions are swept from the store and the local cache.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Serves until `shutdown`, then flushes queued writes (bounded by `flush_timeout`).
pub async fn serve(
    opts: NodeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sessions = Arc::new(Sessions::new(
        opts.store,
        opts.replication,
        opts.session_ttl,
        opts.queue_limit,
    ));
    // A starting node has nothing cached: whatever it serves comes from the store.
    tracing::info!(node = %opts.id, store = sessions.store().kind(), replication = ?opts.replication, "node starting with an empty session cache");
    let app = App::new(
        opts.id.clone(),
        Arc::clone(&sessions),
        Rejoin::new(opts.rejoin_window),
    );
    let (stop_writer, stop) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn({
        let sessions = Arc::clone(&sessions);
        async move { sessions.write_behind(stop).await }
    });
    let sweeper = tokio::spawn(sweep(Arc::clone(&sessions)));
    let store_watch = tokio::spawn(Arc::clone(&app).watch_store());
    let served = axum::serve(listener, app::router(app))
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    store_watch.abort();
    stop_writer.send_replace(true);
    if let Err(e) = writer.await {
        tracing::error!(node = %opts.id, error = %e, "write-behind task failed");
    }
    store_queued(&sessions, &opts.id, opts.flush_timeout).await;
    served
}

/// At shutdown, the writes still queued (async replication) go to the store, within the flush
/// timeout; the log says whether every one did.
async fn store_queued(sessions: &Sessions, node: &str, flush_timeout: Duration) {
    let left = sessions.drain(flush_timeout).await;
    if left > 0 {
        tracing::warn!(
            node = %node,
            sessions = left,
            "shutdown: writes still queued were not stored"
        );
    } else {
        tracing::info!(node = %node, "shutdown: all writes stored");
    }
}

async fn sweep(sessions: Arc<Sessions>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let local = sessions.expire_local();
        match sessions.store().sweep().await {
            Ok(stored) => tracing::debug!(local, stored, "expired sessions swept"),
            Err(e) => tracing::warn!(error = %e, "store sweep failed"),
        }
    }
}
