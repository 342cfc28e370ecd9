//! Giving memory back when a worker goes quiet.
//!
//! mimalloc (the binary's allocator, its v3 line) returns freed memory to the OS only while the
//! thread's heap is active: it collects a heap once every 10,000 allocations through its generic
//! path (its `generic_collect` option; every block over 1 KiB takes that path), and a collection
//! returns what was freed at least `purge_delay` (1 s) earlier. A proxy that has just parked
//! thousands of connections and closed its idle upstream connections allocates next to nothing,
//! so what their requests used stays resident (PERFORMANCE.md).
//!
//! So a worker thread that wakes from a quiet spell (100 ms without anything to do), before it
//! parks again, makes 10,000 such allocations, each freed at once: one collection, about half a
//! millisecond, at most once a second. Whatever arrives meanwhile waits for it, so it only runs
//! when the proxy is nearly idle: traffic with gaps under 100 ms never sees it.

use std::time::{Duration, Instant};

/// A worker that slept this long is nearly idle.
const QUIET: Duration = Duration::from_millis(100);
/// At most one collection per worker this often.
const EVERY: Duration = Duration::from_secs(1);
/// mimalloc's `generic_collect` default.
const GENERIC_COLLECT: usize = 10_000;
/// Over mimalloc's small-block limit (1 KiB), so each allocation takes the generic path.
const GENERIC_BLOCK: usize = 2048;

/// When one worker thread should collect; fed from the runtime's park and unpark hooks.
#[derive(Debug, Default)]
pub struct Quietness {
    parked_at: Option<Instant>,
    woke_from_quiet: bool,
    last: Option<Instant>,
}

impl Quietness {
    /// The worker is about to park: true when it should [`collect`] first.
    pub fn parking(&mut self, now: Instant) -> bool {
        self.parked_at = Some(now);
        let due = self.woke_from_quiet && self.last.is_none_or(|t| now - t >= EVERY);
        if due {
            self.last = Some(now);
        }
        due
    }

    pub fn woke(&mut self, now: Instant) {
        self.woke_from_quiet = self.parked_at.is_some_and(|t| now - t >= QUIET);
    }
}

/// One collection of the calling thread's heap (see the module docs).
pub fn collect() {
    for _ in 0..GENERIC_COLLECT {
        std::hint::black_box(Vec::<u8>::with_capacity(GENERIC_BLOCK));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Steps of (sleep before waking, work before parking again) and whether that park collects.
    #[test]
    fn collects_after_a_quiet_sleep_at_most_once_a_second() {
        let cases: &[(&str, Duration, Duration, bool)] = &[
            ("first park, never slept", MS, MS, false),
            ("busy: short sleep", 99 * MS, MS, false),
            ("quiet sleep", 500 * MS, MS, true),
            ("quiet again, 501 ms after the last", 500 * MS, MS, false),
            ("quiet again, 1,002 ms after the last", 500 * MS, MS, true),
            ("busy again, 1 s of work", MS, 1000 * MS, false),
            (
                "quiet after busy, 1,102 ms after the last",
                100 * MS,
                MS,
                true,
            ),
        ];
        let mut q = Quietness::default();
        let mut now = Instant::now();
        let mut first = true;
        for &(what, sleep, work, collects) in cases {
            if !first {
                now += sleep;
                q.woke(now);
            }
            first = false;
            now += work;
            assert_eq!(q.parking(now), collects, "{what}");
        }
    }
}
