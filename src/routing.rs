//! The routing snapshot: everything a request needs to choose backends, immutable once built and
//! published whole through one `ArcSwap` (reload builds a new one and swaps it).

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::HashMapExt;
use http::HeaderValue;

use crate::affinity;
use crate::backend::Backend;
use crate::balancer::{LeastConnections, Loads, Policy, RoundRobin};
use crate::config::{AffinityConfig, Algorithm, Config, ForwardingConfig, TimeoutConfig};

/// A backend as this snapshot routes to it.
#[derive(Debug)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// This backend's tag under the current secret: the pin value, or its first part when pins
    /// expire.
    tag: String,
    /// The complete `Set-Cookie` value that pins a client here, precomputed (non-expiring pins).
    pub set_cookie: HeaderValue,
}

/// Bound on remembered pins of removed backends.
const MAX_RETIRED: usize = 256;

/// What a request's affinity cookie points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    None,
    /// A valid pin to `members[index]`; `renew` when the cookie must be issued again (it was
    /// signed with a previous secret, or is past half its `max_age`).
    Member {
        index: usize,
        renew: bool,
    },
    /// A backend a reload removed: its clients fail over like those of a dead backend.
    Retired(String),
}

#[derive(Debug)]
pub struct Routing {
    pub members: Vec<Member>,
    /// Backend tag under each accepted key -> (index in `members`, key index; 0 is current).
    /// Looked up with every request's cookie value, so hashed with foldhash, not SipHash (about
    /// 130 instructions per request less): clients choose only what is looked up, never what
    /// is stored, so there is no table to flood.
    pins: Pins,
    /// The current secret, then the previous ones.
    keys: Vec<Vec<u8>>,
    /// Cookie attributes, for pins issued per response (with `max_age`).
    affinity: AffinityConfig,
    pub forwarding: ForwardingConfig,
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

type Pins = foldhash::HashMap<String, (usize, usize)>;

/// One member per configured backend, keeping `previous`'s `Backend` (its health and counters)
/// where the id and address are unchanged, and the pins table: each backend's tag under every
/// accepted key, the current key's first.
fn members_and_pins(
    cfg: &Config,
    previous: Option<&Routing>,
    keys: &[Vec<u8>],
) -> (Vec<Member>, Pins) {
    let mut members = Vec::with_capacity(cfg.backends.len());
    let mut pins = Pins::with_capacity(cfg.backends.len() * keys.len());
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
        let tag = affinity::token(&cfg.affinity.secret, &b.id);
        let set_cookie = affinity::set_cookie(&cfg.affinity, &tag);
        pins.insert(tag.clone(), (i, 0));
        for (k, key) in keys.iter().enumerate().skip(1) {
            pins.entry(affinity::token(key, &b.id)).or_insert((i, k));
        }
        members.push(Member {
            backend,
            weight: b.weight.get(),
            tag,
            set_cookie,
        });
    }
    (members, pins)
}

fn policy_for(algorithm: Algorithm, members: &[Member]) -> Box<dyn Policy> {
    let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new(&weights)),
        Algorithm::LeastConnections => Box::new(LeastConnections::new(&weights)),
    }
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
        let keys: Vec<Vec<u8>> = std::iter::once(&cfg.affinity.secret)
            .chain(&cfg.affinity.previous_secrets)
            .cloned()
            .collect();
        let (members, pins) = members_and_pins(cfg, previous, &keys);
        let policy = policy_for(cfg.balancer.algorithm, &members);
        let secs = cfg.health.interval.as_millis().div_ceil(1000).max(1);
        let retired = previous.map(|p| p.retired_after(cfg)).unwrap_or_default();
        Self {
            members,
            pins,
            keys,
            affinity: cfg.affinity.clone(),
            forwarding: cfg.listener.forwarding.clone(),
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
            .map(|(token, &(i, _))| (token, &self.members[i].backend.id));
        own.chain(self.retired.iter())
            .filter(|(_, id)| !kept(id))
            .take(MAX_RETIRED)
            .map(|(token, id)| (token.clone(), id.clone()))
            .collect()
    }

    /// The pin an affinity value names, if this proxy issued it and still honours it; values it
    /// did not issue (garbage, forged, signed with an unknown key) or that expired give none.
    /// `now` is unix seconds.
    pub fn pin(&self, value: &str, now: u64) -> Option<Pin> {
        let (tag, issued) = match self.affinity.max_age {
            None => (value, None),
            Some(_) => affinity::unstamp(value).map(|(t, at)| (t, Some(at)))?,
        };
        let Some(&(index, key)) = self.pins.get(tag) else {
            return self.retired.get(tag).map(|id| Pin::Retired(id.clone()));
        };
        let mut renew = key != 0;
        if let (Some(max_age), Some(issued)) = (self.affinity.max_age, issued) {
            if !affinity::stamp_is_valid(&self.keys[key], value) {
                return None;
            }
            let age = now.saturating_sub(issued);
            if age >= max_age.as_secs() {
                return None;
            }
            renew |= age.saturating_mul(2) >= max_age.as_secs();
        }
        Some(Pin::Member { index, renew })
    }

    /// The `Set-Cookie` value that pins a client to `members[index]`, issued at `now` (unix
    /// seconds) when pins expire, else precomputed.
    pub fn set_cookie(&self, index: usize, now: u64) -> HeaderValue {
        let member = &self.members[index];
        if self.affinity.max_age.is_none() {
            return member.set_cookie.clone();
        }
        let value = affinity::stamp(&self.keys[0], &member.tag, now);
        affinity::set_cookie(&self.affinity, &value)
    }

    /// Backends to try, best first: the pinned one if it may serve its clients, then the
    /// policy's order among backends taking new sessions, at most `attempts` in all. The policy
    /// is asked only past the pinned backend, so requests their pin serves leave the round-robin
    /// cursor alone: new sessions alone walk it.
    pub fn candidates(&self, pin: &Pin) -> Candidates<'_> {
        let pinned = match *pin {
            Pin::Member { index, .. } if self.members[index].backend.takes_pinned() => Some(index),
            _ => None,
        };
        Candidates {
            routing: self,
            pinned,
            ranked: None,
            next: 0,
        }
    }

    pub fn any_takes_new(&self) -> bool {
        self.members.iter().any(|m| m.backend.takes_new())
    }
}

/// See [`Routing::candidates`].
pub struct Candidates<'a> {
    routing: &'a Routing,
    pinned: Option<usize>,
    /// The pinned backend and the policy's order after it; None until asked past the pin.
    ranked: Option<Vec<usize>>,
    next: usize,
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.next == 0 && self.pinned.is_some() {
            self.next = 1;
            return self.pinned;
        }
        let (r, pinned) = (self.routing, self.pinned);
        let ranked = self.ranked.get_or_insert_with(|| {
            let mut out = Vec::with_capacity(r.attempts);
            out.extend(pinned);
            let eligible = |i: usize| r.members[i].backend.takes_new();
            r.policy.rank(&r.members, &eligible, &mut out, r.attempts);
            out
        });
        let found = ranked.get(self.next).copied();
        self.next += 1;
        found
    }
}
