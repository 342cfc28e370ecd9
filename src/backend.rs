//! Runtime state of one backend: health, in-flight requests, counters. It outlives routing
//! snapshots, so a reload that keeps a backend's id and address keeps its state.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::uri::Authority;

use crate::config::{BackendConfig, HealthConfig};
use crate::health::{HealthMachine, Transition};

#[derive(Debug)]
pub struct Backend {
    pub id: String,
    pub address: Authority,
    up: AtomicBool,
    machine: Mutex<HealthMachine>,
    active: AtomicUsize,
    requests: AtomicU64,
}

impl Backend {
    pub fn new(cfg: &BackendConfig, health: &HealthConfig) -> Arc<Self> {
        Arc::new(Self {
            id: cfg.id.clone(),
            address: cfg.address.clone(),
            up: AtomicBool::new(true),
            machine: Mutex::new(HealthMachine::new(health.rise, health.fall)),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// In-flight requests, including responses still streaming to the client.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Feeds a heartbeat result; `reason` explains a failure in the transition log.
    pub fn record_heartbeat(&self, result: Result<(), String>) {
        let ok = result.is_ok();
        let reason = result.err().unwrap_or_else(|| "heartbeat passed".into());
        self.transition(|m| m.record(ok), &reason);
    }

    /// A refused or failed connect: down at once, back only through heartbeats.
    pub fn mark_down(&self, reason: &str) {
        self.transition(HealthMachine::force_down, reason);
    }

    pub fn set_thresholds(&self, health: &HealthConfig) {
        self.lock().set_thresholds(health.rise, health.fall);
    }

    fn transition(
        &self,
        step: impl FnOnce(&mut HealthMachine) -> Option<Transition>,
        reason: &str,
    ) {
        let mut machine = self.lock();
        let Some(t) = step(&mut machine) else { return };
        // Published under the lock, so concurrent results cannot store states out of order.
        self.up.store(t == Transition::Up, Ordering::Release);
        drop(machine);
        let state = if t == Transition::Up { "up" } else { "down" };
        tracing::info!(backend = %self.id, state, reason, "backend state changed");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthMachine> {
        // The machine holds plain counters; a panic elsewhere cannot leave it inconsistent.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// Keeps a request counted in [`Backend::active`] for as long as it lives.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
