//! Hot reload: read, validate and build the whole new routing snapshot, then swap it in one
//! store. An invalid file changes nothing. Triggers: SIGHUP (in `main`), `POST /reload`, and the
//! config file changing on disk (polled, debounced).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::config::{Config, ConfigError, SECRET_ENV};
use crate::heartbeat::Heartbeats;
use crate::metrics::Metrics;
use crate::routing::Routing;

/// How often the config file is checked; a change must hold for one more check (debounce).
const WATCH_EVERY: Duration = Duration::from_millis(500);

pub struct Reloader {
    routing: Arc<ArcSwap<Routing>>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

struct State {
    config: Config,
    heartbeats: Heartbeats,
    /// The config file as last read, so the watcher reacts to changes only.
    seen: Option<(SystemTime, u64)>,
}

impl Reloader {
    pub fn new(config: Config, routing: Arc<ArcSwap<Routing>>, metrics: Arc<Metrics>) -> Self {
        let seen = stamp(&config.file);
        let state = Mutex::new(State {
            config,
            heartbeats: Heartbeats::default(),
            seen,
        });
        Self {
            routing,
            metrics,
            state,
        }
    }

    /// The configuration in force.
    pub async fn config(&self) -> Config {
        self.state.lock().await.config.clone()
    }

    /// Starts (or restarts) one heartbeat task per backend of the current snapshot.
    pub async fn start_heartbeats(&self) {
        let mut st = self.state.lock().await;
        let State {
            config, heartbeats, ..
        } = &mut *st;
        heartbeats.sync(&self.routing.load(), &config.health, &self.metrics);
    }

    pub async fn stop_heartbeats(&self) {
        self.state.lock().await.heartbeats = Heartbeats::default();
    }

    /// Re-reads the config file and swaps in the new snapshot; on error nothing changes.
    pub async fn reload(&self, trigger: &'static str) -> Result<(), ConfigError> {
        let mut st = self.state.lock().await;
        st.seen = stamp(&st.config.file);
        let next = match Config::load(&st.config.file, std::env::var(SECRET_ENV).ok()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(trigger, error = %e, "reload rejected; the running configuration stays");
                return Err(e);
            }
        };
        warn_restart_needed(&st.config, &next);
        let old = self.routing.load_full();
        self.routing
            .store(Arc::new(Routing::build(&next, Some(&old))));
        let State {
            config, heartbeats, ..
        } = &mut *st;
        heartbeats.sync(&self.routing.load(), &next.health, &self.metrics);
        let ids: Vec<&str> = next.backends.iter().map(|b| b.id.as_str()).collect();
        tracing::info!(trigger, backends = ?ids, "configuration reloaded");
        *config = next;
        Ok(())
    }

    /// Reloads when the file's modification time or size differs from the last read and then
    /// holds still for one more check.
    pub async fn watch_file(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (path, seen) = {
                let st = self.state.lock().await;
                (st.config.file.clone(), st.seen)
            };
            let now = stamp(&path);
            if now == seen {
                continue;
            }
            tick.tick().await;
            if stamp(&path) != now {
                continue; // still being written: look again next time
            }
            // A rejected file is logged by `reload` and its stamp kept: the next change retries.
            if self.reload("file change").await.is_err() {
                continue;
            }
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Settings bound at start: changing them takes a restart, which the log says.
fn warn_restart_needed(old: &Config, new: &Config) {
    let changed = [
        (
            "listener.address",
            old.listener.address != new.listener.address,
        ),
        (
            "listener.tls",
            old.listener.tls.as_ref().map(|t| (&t.cert, &t.key))
                != new.listener.tls.as_ref().map(|t| (&t.cert, &t.key)),
        ),
        (
            "admin",
            old.admin.as_ref().map(|a| a.address) != new.admin.as_ref().map(|a| a.address),
        ),
        (
            "timeouts.backend_connect",
            old.timeouts.backend_connect != new.timeouts.backend_connect,
        ),
        (
            "timeouts.backend_idle",
            old.timeouts.backend_idle != new.timeouts.backend_idle,
        ),
        (
            "timeouts.client_header",
            old.timeouts.client_header != new.timeouts.client_header,
        ),
        (
            "timeouts.client_park",
            old.timeouts.client_park != new.timeouts.client_park,
        ),
        (
            "timeouts.shutdown_grace",
            old.timeouts.shutdown_grace != new.timeouts.shutdown_grace,
        ),
    ];
    for (key, _) in changed.iter().filter(|(_, c)| *c) {
        tracing::warn!(key, "this change takes effect only after a restart");
    }
}
