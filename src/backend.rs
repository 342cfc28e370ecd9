//! Runtime state of one backend: health, operator mode, in-flight requests, counters and recent
//! history. It outlives routing snapshots, so a reload that keeps a backend's id and address
//! keeps all of it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::uri::Authority;
use serde::Serialize;

use crate::config::{BackendConfig, HealthConfig};
use crate::health::{HealthMachine, Transition};

/// How many state transitions each backend remembers for "why is it down".
const HISTORY: usize = 32;
/// Width of the drain-progress window, in one-second buckets.
const WINDOW_SECS: usize = 60;

/// What an operator asked of a backend, independent of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Normal,
    /// No new sessions; clients already pinned keep going.
    Draining,
    /// No traffic; pinned clients fail over.
    Maintenance,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransitionRecord {
    pub at_unix_ms: u64,
    pub state: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatRecord {
    pub at_unix_ms: u64,
    pub ok: bool,
    pub latency_ms: f64,
    pub detail: String,
}

#[derive(Debug)]
pub struct Backend {
    pub id: String,
    pub address: Authority,
    up: AtomicBool,
    mode: AtomicU8,
    machine: Mutex<HealthMachine>,
    active: AtomicUsize,
    requests: AtomicU64,
    history: Mutex<VecDeque<TransitionRecord>>,
    last_heartbeat: Mutex<Option<HeartbeatRecord>>,
    pinned: PinnedWindow,
    /// This backend's metric handles, looked up once instead of per request.
    pub(crate) meters: std::sync::OnceLock<crate::metrics::BackendMeters>,
    /// Idle keep-alive connections to this backend's address.
    pub(crate) pool: Arc<crate::upstream::Pool>,
    /// Idle connections for the lane's requests, which go without hyper's client.
    pub(crate) wire: Arc<crate::wire::Pool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Guarded data are plain records; a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Backend {
    pub fn new(cfg: &BackendConfig, health: &HealthConfig) -> Arc<Self> {
        Arc::new(Self {
            id: cfg.id.clone(),
            address: cfg.address.clone(),
            up: AtomicBool::new(true),
            mode: AtomicU8::new(Mode::Normal as u8),
            machine: Mutex::new(HealthMachine::new(health.rise, health.fall)),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            last_heartbeat: Mutex::new(None),
            pinned: PinnedWindow::default(),
            meters: std::sync::OnceLock::new(),
            pool: Arc::default(),
            wire: Arc::default(),
        })
    }

    /// Healthy by heartbeats (operator mode aside).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Acquire) {
            1 => Mode::Draining,
            2 => Mode::Maintenance,
            _ => Mode::Normal,
        }
    }

    /// May receive new sessions.
    pub fn takes_new(&self) -> bool {
        self.is_up() && self.mode() == Mode::Normal
    }

    /// May serve the clients pinned to it.
    pub fn takes_pinned(&self) -> bool {
        self.is_up() && self.mode() != Mode::Maintenance
    }

    /// The state operators see: maintenance and draining win over health.
    pub fn state(&self) -> &'static str {
        match (self.mode(), self.is_up()) {
            (Mode::Maintenance, _) => "maintenance",
            (Mode::Draining, _) => "draining",
            (Mode::Normal, true) => "up",
            (Mode::Normal, false) => "down",
        }
    }

    pub fn set_mode(&self, mode: Mode, reason: &str) {
        if self.mode.swap(mode as u8, Ordering::AcqRel) != mode as u8 {
            self.remember(reason);
        }
    }

    /// In-flight requests, including responses still streaming to the client.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Feeds a heartbeat result; `Err` explains a failure in the transition log.
    pub fn record_heartbeat(&self, result: Result<(), String>, latency: Duration) {
        let ok = result.is_ok();
        let detail = result.err().unwrap_or_else(|| "heartbeat passed".into());
        *lock(&self.last_heartbeat) = Some(HeartbeatRecord {
            at_unix_ms: unix_ms(),
            ok,
            latency_ms: latency.as_secs_f64() * 1000.0,
            detail: detail.clone(),
        });
        self.transition(|m| m.record(ok), &detail);
    }

    /// A refused or failed connect: down at once, back only through heartbeats.
    pub fn mark_down(&self, reason: &str) {
        self.transition(HealthMachine::force_down, reason);
    }

    pub fn set_thresholds(&self, health: &HealthConfig) {
        lock(&self.machine).set_thresholds(health.rise, health.fall);
    }

    fn transition(
        &self,
        step: impl FnOnce(&mut HealthMachine) -> Option<Transition>,
        reason: &str,
    ) {
        let mut machine = lock(&self.machine);
        let Some(t) = step(&mut machine) else { return };
        // Published under the lock, so concurrent results cannot store states out of order.
        self.up.store(t == Transition::Up, Ordering::Release);
        drop(machine);
        self.remember(reason);
    }

    fn remember(&self, reason: &str) {
        let state = self.state();
        tracing::info!(backend = %self.id, state, reason, "backend state changed");
        let mut history = lock(&self.history);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(TransitionRecord {
            at_unix_ms: unix_ms(),
            state,
            reason: reason.to_string(),
        });
    }

    pub fn history(&self) -> Vec<TransitionRecord> {
        lock(&self.history).iter().cloned().collect()
    }

    pub fn last_heartbeat(&self) -> Option<HeartbeatRecord> {
        lock(&self.last_heartbeat).clone()
    }

    /// Requests served to clients pinned here in the last minute: a draining backend is safe to
    /// stop once this reaches zero.
    pub fn pinned_last_minute(&self) -> u64 {
        self.pinned.total()
    }

    /// Counts a request as in flight until the returned guard is dropped. `pinned_at` (Unix
    /// seconds, from the clock read the request already made) counts it as a pinned client's.
    pub fn start_request(self: &Arc<Self>, pinned_at: Option<u64>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(now) = pinned_at {
            self.pinned.record(now);
        }
        InFlight(Arc::clone(self))
    }
}

/// Keeps a request counted in [`Backend::active`] for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn backend_id(&self) -> &str {
        &self.0.id
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A lock-free count of events in the last minute, in one-second buckets.
#[derive(Debug)]
struct PinnedWindow {
    counts: [AtomicU64; WINDOW_SECS],
    seconds: [AtomicU64; WINDOW_SECS],
}

impl Default for PinnedWindow {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            seconds: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl PinnedWindow {
    fn record(&self, now: u64) {
        let i = (now % WINDOW_SECS as u64) as usize;
        if self.seconds[i].swap(now, Ordering::AcqRel) != now {
            self.counts[i].store(0, Ordering::Release);
        }
        self.counts[i].fetch_add(1, Ordering::AcqRel);
    }

    fn total(&self) -> u64 {
        let now = unix_ms() / 1000;
        (0..WINDOW_SECS)
            .filter(|&i| {
                now.saturating_sub(self.seconds[i].load(Ordering::Acquire)) < WINDOW_SECS as u64
            })
            .map(|i| self.counts[i].load(Ordering::Acquire))
            .sum()
    }
}
