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
//! when the proxy is nearly idle: traffic with gaps under 100 ms never sees it. A single worker
//! on io_uring runs on tokio-uring's runtime, which has no park hooks; there a timer decides
//! ([`collect_when_quiet`]): with 9,000 idle clients, 24 MiB with it and 27 without.

use std::cell::Cell;
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

thread_local! {
    /// Work this thread has done that allocated or freed memory, for [`collect_when_quiet`].
    static WORKED: Cell<u64> = const { Cell::new(0) };
}

/// Counts a piece of work (a request answered, idle connections closed) on this thread.
pub fn worked() {
    WORKED.set(WORKED.get().wrapping_add(1));
}

/// Where no park hooks feed [`Quietness`] (tokio-uring's runtime has none): a collection in each
/// of the first two whole seconds without work that follow work (the second returns what was
/// freed too late for the first, inside mimalloc's `purge_delay`), so at most once a second and
/// never while requests keep coming. Runs on the thread it collects for.
pub async fn collect_when_quiet() {
    let mut ticks = QuietTicks::new(WORKED.get());
    loop {
        tokio::time::sleep(EVERY).await;
        if ticks.tick(WORKED.get()) {
            collect();
        }
    }
}

/// Quiet seconds after work that collect.
const QUIET_COLLECTIONS: u8 = 2;

/// [`collect_when_quiet`]'s decision, once a second, from the count of work done.
#[derive(Debug)]
pub struct QuietTicks {
    seen: u64,
    owed: u8,
}

impl QuietTicks {
    pub fn new(worked: u64) -> Self {
        Self {
            seen: worked,
            owed: 0,
        }
    }

    /// True when this second should collect.
    pub fn tick(&mut self, worked: u64) -> bool {
        if worked != self.seen {
            self.seen = worked;
            self.owed = QUIET_COLLECTIONS;
            return false;
        }
        let due = self.owed > 0;
        self.owed = self.owed.saturating_sub(1);
        due
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

    /// Requests served by each tick, and whether that tick collects.
    #[test]
    fn ticks_collect_once_after_a_quiet_second() {
        let cases: &[(&str, u64, bool)] = &[
            ("idle from the start", 0, false),
            ("requests", 5, false),
            ("more requests", 9, false),
            ("a quiet second after them", 9, true),
            ("a second quiet second", 9, true),
            ("still quiet: already given back", 9, false),
            ("one request", 10, false),
            ("quiet again", 10, true),
            ("a request before the second", 11, false),
            ("quiet", 11, true),
            ("quiet", 11, true),
            ("quiet", 11, false),
        ];
        let mut ticks = QuietTicks::new(0);
        for &(what, served, collects) in cases {
            assert_eq!(ticks.tick(served), collects, "{what}");
        }
    }

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
