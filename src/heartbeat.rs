//! Heartbeats: one task per backend probes `GET {path}` every interval and feeds the result to
//! the backend's health machine. Tasks follow the routing snapshot: `sync` starts probes for new
//! backends and stops those of removed ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, USER_AGENT};
use http::{HeaderValue, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use crate::backend::Backend;
use crate::body::UpstreamBody;
use crate::config::HealthConfig;
use crate::error::chain;
use crate::metrics::Metrics;
use crate::routing::Routing;

const AGENT: &str = concat!("stickylb-health/", env!("CARGO_PKG_VERSION"));
/// Tells the backend how this proxy sees it. A backend that learns it is held down knows its
/// clients are being served elsewhere, so its cached sessions will be stale when it is back.
pub const BACKEND_STATE: &str = "x-stickylb-backend-state";

/// Owns the probe tasks; dropping it stops them.
#[derive(Debug, Default)]
pub struct Heartbeats {
    tasks: HashMap<String, (Arc<Backend>, JoinHandle<()>)>,
    /// The settings the running probes use.
    cfg: Option<HealthConfig>,
}

impl Heartbeats {
    /// Makes the running probes match `routing`: one per backend, with `cfg`'s settings. Probes
    /// of backends kept by a reload go on undisturbed unless the health settings changed.
    pub fn sync(&mut self, routing: &Routing, cfg: &HealthConfig, metrics: &Arc<Metrics>) {
        if self.cfg.as_ref() != Some(cfg) {
            self.stop_all();
            self.cfg = Some(cfg.clone());
        }
        let wanted: Vec<&Arc<Backend>> = routing.members.iter().map(|m| &m.backend).collect();
        self.tasks.retain(|id, (backend, task)| {
            let keep = wanted.iter().any(|b| Arc::ptr_eq(b, backend));
            if !keep {
                tracing::debug!(backend = %id, "heartbeat stopped");
                task.abort();
            }
            keep
        });
        for backend in wanted {
            if self.tasks.contains_key(&backend.id) {
                continue;
            }
            let task = tokio::spawn(run(Arc::clone(backend), cfg.clone(), Arc::clone(metrics)));
            self.tasks
                .insert(backend.id.clone(), (Arc::clone(backend), task));
        }
    }

    fn stop_all(&mut self) {
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn run(backend: Arc<Backend>, cfg: HealthConfig, metrics: Arc<Metrics>) {
    // A fresh connection per probe, as a new client would make: a pooled one could hide a dead
    // listener.
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.timeout));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Probes overlap: a hung backend must not slow the schedule down, or detecting it would
    // take `fall x timeout` instead of `fall x interval + timeout`. At most
    // `timeout / interval + 1` are outstanding, since each one ends within `timeout`.
    let mut probes = JoinSet::new();
    let mut last_recorded = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (client, backend, cfg) = (client.clone(), Arc::clone(&backend), cfg.clone());
                probes.spawn(async move {
                    let at = tokio::time::Instant::now();
                    (at, probe(&client, &backend, &cfg).await)
                });
            }
            Some(Ok((at, result))) = probes.join_next() => {
                if counts(at, &result, last_recorded) {
                    last_recorded = tokio::time::Instant::now();
                    record(&backend, &metrics, result, at.elapsed());
                }
            }
        }
    }
}

/// Fail fast, recover slowly. Every failure counts, so `fall` overlapping probes of a hung
/// backend take it down within `fall x interval + timeout`. A success counts only if its probe
/// started after the last result was recorded: a resumed process answers its queued probes all
/// at once, and those must not add up to `rise` in one instant; each success has to vouch for
/// a new interval.
fn counts(
    started: tokio::time::Instant,
    result: &Result<(), String>,
    last_recorded: tokio::time::Instant,
) -> bool {
    result.is_err() || started >= last_recorded
}

fn record(backend: &Backend, metrics: &Metrics, result: Result<(), String>, took: Duration) {
    metrics.heartbeat_latency(&backend.id, took);
    if let Err(reason) = &result {
        tracing::debug!(backend = %backend.id, reason, "heartbeat failed");
    }
    backend.record_heartbeat(result, took);
}

async fn probe(
    client: &Client<HttpConnector, UpstreamBody>,
    backend: &Backend,
    cfg: &HealthConfig,
) -> Result<(), String> {
    let uri = format!("http://{}{}", backend.address, cfg.path);
    let req = Request::get(uri)
        .header(USER_AGENT, AGENT)
        .header(BACKEND_STATE, if backend.is_up() { "up" } else { "down" })
        .header(
            HOST,
            HeaderValue::from_str(backend.address.as_str()).map_err(|e| e.to_string())?,
        )
        .body(UpstreamBody::empty())
        .map_err(|e| e.to_string())?;
    let resp = match tokio::time::timeout(cfg.timeout, client.request(req)).await {
        Err(_) => {
            return Err(format!(
                "heartbeat timed out after {}",
                humantime::format_duration(cfg.timeout)
            ))
        }
        Ok(Err(e)) => return Err(format!("heartbeat failed: {}", chain(&e))),
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("heartbeat answered {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_always_count_successes_only_when_fresh() {
        let now = tokio::time::Instant::now();
        let (before, after) = (
            now - Duration::from_millis(10),
            now + Duration::from_millis(10),
        );
        let (ok, failed) = (Ok(()), Err("timed out".to_string()));
        let table = [
            (after, &ok, true),
            (now, &ok, true),
            (before, &ok, false),
            (before, &failed, true),
            (after, &failed, true),
        ];
        for (started, result, expected) in table {
            assert_eq!(
                counts(started, result, now),
                expected,
                "{started:?} {result:?}"
            );
        }
    }
}
