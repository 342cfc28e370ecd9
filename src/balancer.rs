//! Selection policies. A policy only ranks eligible backends for a request without a usable pin;
//! `routing` puts the pinned backend first, and `proxy` walks the list with bounded attempts.

use std::sync::atomic::{AtomicUsize, Ordering};

/// What a policy may look at: the backends of one routing snapshot, by index.
pub trait Loads {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// In-flight requests and configured weight of backend `i`.
    fn load(&self, i: usize) -> (usize, u32);
}

/// One extension point: rank backends for a new session.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Appends to `out`, best first, indices of `members` accepted by `eligible` and not already
    /// in `out`, until `out` holds `limit` entries.
    fn rank(
        &self,
        loads: &dyn Loads,
        eligible: &dyn Fn(usize) -> bool,
        out: &mut Vec<usize>,
        limit: usize,
    );
}

/// Weighted round robin over a precomputed, smoothly interleaved wheel: `a a a b` becomes
/// `a a b a`, and a lock-free cursor walks it.
#[derive(Debug)]
pub struct RoundRobin {
    wheel: Vec<usize>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        Self {
            wheel: smooth_wheel(weights),
            cursor: AtomicUsize::new(0),
        }
    }
}

/// nginx's smooth weighted round robin, run once for a whole cycle.
fn smooth_wheel(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut wheel = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let Some(best) = (0..current.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
        else {
            break;
        };
        current[best] -= total;
        wheel.push(best);
    }
    wheel
}

impl Policy for RoundRobin {
    fn rank(
        &self,
        _: &dyn Loads,
        eligible: &dyn Fn(usize) -> bool,
        out: &mut Vec<usize>,
        limit: usize,
    ) {
        let len = self.wheel.len();
        if len == 0 {
            return;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for k in 0..len {
            if out.len() >= limit {
                return;
            }
            let i = self.wheel[(start + k) % len];
            if eligible(i) && !out.contains(&i) {
                out.push(i);
            }
        }
    }
}

/// Fewest in-flight requests per unit of weight; ties follow the weighted round-robin order, so
/// an idle cluster still spreads new sessions by weight.
#[derive(Debug)]
pub struct LeastConnections {
    ties: RoundRobin,
}

impl LeastConnections {
    pub fn new(weights: &[u32]) -> Self {
        Self {
            ties: RoundRobin::new(weights),
        }
    }
}

impl Policy for LeastConnections {
    fn rank(
        &self,
        loads: &dyn Loads,
        eligible: &dyn Fn(usize) -> bool,
        out: &mut Vec<usize>,
        limit: usize,
    ) {
        let fixed = out.len();
        self.ties.rank(loads, eligible, out, loads.len() + fixed);
        // Compare active/weight as cross products to stay in integers; the sort is stable.
        out[fixed..].sort_by(|&a, &b| {
            let ((la, wa), (lb, wb)) = (loads.load(a), loads.load(b));
            (la as u128 * u128::from(wb)).cmp(&(lb as u128 * u128::from(wa)))
        });
        out.truncate(limit.max(fixed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct M(u32, usize);
    impl Loads for Vec<M> {
        fn len(&self) -> usize {
            Vec::len(self)
        }
        fn load(&self, i: usize) -> (usize, u32) {
            (self[i].1, self[i].0)
        }
    }

    fn picks(policy: &dyn Policy, members: &Vec<M>, rounds: usize) -> Vec<usize> {
        let mut counts = vec![0; members.len()];
        for _ in 0..rounds {
            let mut out = Vec::new();
            policy.rank(members, &|_| true, &mut out, 1);
            counts[out[0]] += 1;
        }
        counts
    }

    #[test]
    fn wheel_interleaves_by_weight() {
        assert_eq!(smooth_wheel(&[1, 1]), vec![0, 1]);
        assert_eq!(smooth_wheel(&[3, 1]), vec![0, 0, 1, 0]);
        assert_eq!(smooth_wheel(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_honours_weight() {
        let members = vec![M(1, 0), M(3, 0)];
        assert_eq!(
            picks(&RoundRobin::new(&[1, 3]), &members, 400),
            vec![100, 300]
        );
    }

    #[test]
    fn rank_skips_ineligible_and_already_chosen() {
        let members = vec![M(1, 0), M(1, 0), M(1, 0)];
        let rr = RoundRobin::new(&[1, 1, 1]);
        let mut out = vec![2];
        rr.rank(&members, &|i| i != 0, &mut out, 3);
        assert_eq!(out, vec![2, 1]);
        let mut none = Vec::new();
        rr.rank(&members, &|_| false, &mut none, 3);
        assert!(none.is_empty());
    }

    #[test]
    fn least_connections_prefers_lowest_load_per_weight() {
        let members = vec![M(1, 4), M(2, 4), M(1, 1)];
        let mut out = Vec::new();
        LeastConnections::new(&[1, 2, 1]).rank(&members, &|_| true, &mut out, 3);
        assert_eq!(out, vec![2, 1, 0]);
    }

    #[test]
    fn least_connections_keeps_the_pinned_entry_first() {
        let members = vec![M(1, 9), M(1, 0)];
        let mut out = vec![0];
        LeastConnections::new(&[1, 1]).rank(&members, &|_| true, &mut out, 2);
        assert_eq!(out, vec![0, 1]);
    }

    #[test]
    fn idle_least_connections_spreads_by_weight() {
        let members = vec![M(1, 0), M(3, 0)];
        assert_eq!(
            picks(&LeastConnections::new(&[1, 3]), &members, 400),
            vec![100, 300]
        );
    }
}
