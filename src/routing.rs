//! The routing snapshot: everything a request needs to choose backends, immutable once built and
//! published whole through one `ArcSwap` (reload builds a new one and swaps it).

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;

use crate::affinity;
use crate::backend::Backend;
use crate::balancer::{LeastConnections, Loads, Policy, RoundRobin};
use crate::config::{Algorithm, Config, TimeoutConfig};

/// A backend as this snapshot routes to it.
#[derive(Debug)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// The complete `Set-Cookie` value that pins a client here, precomputed.
    pub set_cookie: HeaderValue,
}

/// Bound on remembered pins of removed backends.
const MAX_RETIRED: usize = 256;

/// What a request's affinity cookie points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    None,
    Member(usize),
    /// A backend a reload removed: its clients fail over like those of a dead backend.
    Retired(String),
}

#[derive(Debug)]
pub struct Routing {
    pub members: Vec<Member>,
    /// Affinity cookie value -> index in `members`.
    pins: HashMap<String, usize>,
    /// Affinity cookie value -> id, for backends removed by recent reloads.
    retired: HashMap<String, String>,
    /// Keys the short session tags in failover audit events.
    pub audit_key: Vec<u8>,
    pub cookie_name: String,
    policy: Box<dyn Policy>,
    pub attempts: usize,
    pub timeouts: TimeoutConfig,
    /// Largest request body accepted (413 beyond it); None: no limit.
    pub max_body: Option<u64>,
    /// `Retry-After` for 503s: one heartbeat interval, rounded up to whole seconds.
    pub retry_after: HeaderValue,
}

impl Loads for Vec<Member> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn load(&self, i: usize) -> (usize, u32) {
        (self[i].backend.active(), self[i].weight)
    }
}

impl Routing {
    /// Builds a snapshot, reusing `previous`'s runtime state for backends whose id and address
    /// are unchanged, so health and counters survive a reload.
    pub fn build(cfg: &Config, previous: Option<&Routing>) -> Self {
        let mut members = Vec::with_capacity(cfg.backends.len());
        let mut pins = HashMap::with_capacity(cfg.backends.len());
        for (i, b) in cfg.backends.iter().enumerate() {
            let kept = previous
                .and_then(|p| p.find(&b.id))
                .filter(|old| old.address == b.address);
            let backend = match kept {
                Some(old) => {
                    old.set_thresholds(&cfg.health);
                    Arc::clone(old)
                }
                None => Backend::new(b, &cfg.health),
            };
            let token = affinity::token(&cfg.affinity.secret, &b.id);
            let set_cookie = affinity::set_cookie(&cfg.affinity, &token);
            pins.insert(token, i);
            members.push(Member {
                backend,
                weight: b.weight.get(),
                set_cookie,
            });
        }
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        let policy: Box<dyn Policy> = match cfg.balancer.algorithm {
            Algorithm::RoundRobin => Box::new(RoundRobin::new(&weights)),
            Algorithm::LeastConnections => Box::new(LeastConnections::new(&weights)),
        };
        let secs = cfg.health.interval.as_millis().div_ceil(1000).max(1);
        let retired = previous.map(|p| p.retired_after(cfg)).unwrap_or_default();
        Self {
            members,
            pins,
            retired,
            audit_key: cfg.affinity.secret.clone(),
            cookie_name: cfg.affinity.cookie.clone(),
            policy,
            attempts: 1 + cfg.balancer.retries as usize,
            timeouts: cfg.timeouts.clone(),
            max_body: cfg.limits.max_body_bytes,
            retry_after: HeaderValue::from(secs as u64),
        }
    }

    pub fn find(&self, id: &str) -> Option<&Arc<Backend>> {
        self.members.iter().map(|m| &m.backend).find(|b| b.id == id)
    }

    /// Pins of backends that `next` no longer has: this snapshot's retired ones and its own.
    fn retired_after(&self, next: &Config) -> HashMap<String, String> {
        let kept = |id: &str| next.backends.iter().any(|b| b.id == id);
        let own = self
            .pins
            .iter()
            .map(|(token, &i)| (token, &self.members[i].backend.id));
        own.chain(self.retired.iter())
            .filter(|(_, id)| !kept(id))
            .take(MAX_RETIRED)
            .map(|(token, id)| (token.clone(), id.clone()))
            .collect()
    }

    /// The pin named by the first affinity value this proxy issued; values it did not issue
    /// (garbage, forged, signed with another key) are ignored.
    pub fn pin(&self, values: &[String]) -> Pin {
        for v in values {
            if let Some(&i) = self.pins.get(v) {
                return Pin::Member(i);
            }
            if let Some(id) = self.retired.get(v) {
                return Pin::Retired(id.clone());
            }
        }
        Pin::None
    }

    /// Backends to try, best first: the pinned one if it may serve its clients, then the
    /// policy's order among backends taking new sessions, at most `attempts` in all.
    pub fn candidates(&self, pin: &Pin) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.attempts);
        if let Pin::Member(p) = *pin {
            if self.members[p].backend.takes_pinned() {
                out.push(p);
            }
        }
        let eligible = |i: usize| self.members[i].backend.takes_new();
        self.policy
            .rank(&self.members, &eligible, &mut out, self.attempts);
        out
    }

    pub fn any_takes_new(&self) -> bool {
        self.members.iter().any(|m| m.backend.takes_new())
    }
}
