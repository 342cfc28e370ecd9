//! stickylb: an HTTP load balancer whose job is sticky sessions with failover that keeps the
//! session.
//!
//! Architecture, one job per module:
//! - [`config`]: `config.toml` -> validated [`config::Config`]; errors name file, line and key.
//! - [`affinity`]: the opaque HMAC pin cookie: derive, read and strip it, build `Set-Cookie`.
//! - [`balancer`]: selection policies (one trait) ranking backends for new sessions.
//! - [`routing`]: the immutable snapshot a request routes with, behind one `ArcSwap`.
//! - [`backend`]: per-backend runtime state (health, in-flight, counters) shared across reloads.
//! - [`health`]: the pure rise/fall state machine.
//! - [`heartbeat`]: probe tasks that feed the health machine.
//! - [`proxy`]: the forwarding loop: candidates in order, bounded attempts, re-pin on failover.
//! - [`transport`]: how an attempt reaches a backend (one trait): hyper's client, or the wire.
//! - [`upstream`]: connections to backends: a keep-alive pool per backend, idle ones closed.
//! - [`wire`]: the lane's requests sent and answered without hyper's client (httparse, RFC 9112).
//! - [`headers`]: hop-by-hop removal and the forwarding headers (trusted proxies, `Forwarded`).
//! - [`framing`]: follows HTTP/1 framing on the raw stream to spot heads hyper normalises.
//! - [`validate`]: refuses ambiguous or hostile requests before anything is forwarded.
//! - [`body`]: streaming request/response bodies, replayable until first read.
//! - [`error`]: the one mapping from failures to 502/503/504.
//! - [`lane`]: HTTP/1.1 requests without a body, read and answered without hyper's server.
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2 (h2c, or TLS with ALPN), idle connections,
//!   graceful shutdown.
//! - [`activity`]: idle clocks: when work last ended, and how much is under way.
//! - [`link`]: an upstream connection's one timer: idling out, and a response head that is late.
//! - [`woken`]: polling a future only when it was woken (a connection's timer and stop signal).
//! - [`coalesce`]: small vectored writes sent as one buffer (`send`, not `writev`).
//! - [`uring`]: a single worker's requests to backends, sent together through io_uring.
//! - [`park`]: lending a socket to hyper and taking it back, so quiet connections hold no buffers.
//! - [`tls`]: loading the certificate and key into a rustls configuration.
//! - [`allocator`]: when a quiet worker lets the allocator give freed memory back to the OS.
//! - [`tunnel`]: relaying upgraded connections (WebSocket) with an idle timeout.
//! - [`admin`]: the admin listener: status, drain/maintenance/enable, reload, metrics, dashboard.
//! - [`metrics`]: Prometheus metrics.
//! - [`reload`]: hot reload (file watch, API; SIGHUP in `main`), swapping the snapshot whole.
//! - [`demo`]: `stickylb demo`, the proxy plus demo backend processes in one command.

pub mod activity;
pub mod admin;
pub mod affinity;
pub mod allocator;
pub mod backend;
pub mod balancer;
pub mod body;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod error;
pub mod framing;
pub mod headers;
pub mod health;
pub mod heartbeat;
pub mod lane;
pub mod link;
pub mod metrics;
pub mod park;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod tls;
pub mod transport;
pub mod tunnel;
pub mod upstream;
pub mod uring;
pub mod validate;
pub mod wire;
pub mod woken;

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::backend::Backend;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::Reloader;
use crate::routing::Routing;

/// A configured proxy, ready to serve on listeners the caller bound (tests bind port 0).
#[derive(Clone)]
pub struct Stickylb {
    config: Config,
    routing: Arc<ArcSwap<Routing>>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
}

impl Stickylb {
    pub fn new(config: Config) -> Self {
        let routing = Arc::new(ArcSwap::from_pointee(Routing::build(&config, None)));
        let metrics = Arc::new(Metrics::default());
        let reloader = Arc::new(Reloader::new(
            config.clone(),
            Arc::clone(&routing),
            Arc::clone(&metrics),
        ));
        Self {
            config,
            routing,
            metrics,
            reloader,
        }
    }

    /// The configuration it started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runtime state of a backend, by id: for operators' tools and tests.
    pub fn backend(&self, id: &str) -> Option<Arc<Backend>> {
        self.routing.load().find(id).cloned()
    }

    /// Idle HTTP/1 client connections parked right now (see `park`): for tools and tests.
    pub fn parked_connections(&self) -> i64 {
        self.metrics.parked().get()
    }

    /// Re-reads the config file and swaps the routing state; on error nothing changes.
    pub async fn reload(&self, trigger: &'static str) -> Result<(), ConfigError> {
        self.reloader.reload(trigger).await
    }

    /// Serves traffic (and the admin API on `admin`, if given) until `shutdown` resolves, then
    /// drains in-flight requests within the grace period. The config file is watched for changes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) {
        self.reloader.start_heartbeats().await;
        let watcher = tokio::spawn(Arc::clone(&self.reloader).watch_file());
        let admin = admin.map(|l| {
            let api = admin::Admin {
                routing: Arc::clone(&self.routing),
                reloader: Arc::clone(&self.reloader),
                metrics: Arc::clone(&self.metrics),
            };
            tokio::spawn(admin::serve(l, Arc::new(api)))
        });
        let timeouts = &self.config.timeouts;
        let client = upstream::Upstream {
            connect_timeout: timeouts.backend_connect,
            idle_timeout: timeouts.backend_idle,
        };
        let proxy = Arc::new(Proxy::new(
            Arc::clone(&self.routing),
            client,
            Arc::clone(&self.metrics),
        ));
        server::serve(listener, proxy, self.server_settings(), shutdown).await;
        watcher.abort();
        if let Some(task) = admin {
            task.abort();
        }
        self.reloader.stop_heartbeats().await;
    }

    fn server_settings(&self) -> server::ServerSettings {
        let (timeouts, limits) = (&self.config.timeouts, &self.config.limits);
        server::ServerSettings {
            client_header_timeout: timeouts.client_header,
            park_after: timeouts.client_park,
            parked: self.metrics.parked(),
            shutdown_grace: timeouts.shutdown_grace,
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
            tls: self
                .config
                .listener
                .tls
                .as_ref()
                .map(|t| Arc::clone(&t.server)),
        }
    }
}
