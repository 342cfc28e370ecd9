//! When something (a client connection, an upstream connection) last finished a piece of work,
//! and how many are under way: what idle timeouts, and the time a client has for its
//! next request head, are measured from (hyper's own timers are not used for either).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Last start or end of work, and the work under way.
pub struct Activity {
    since: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

/// One piece of work under way; ending it (dropping) restarts the idle clock.
pub struct Busy(Arc<Activity>);

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Self {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    /// No clock is read here: the idle clock only counts once nothing is under way, and the end
    /// of the work (see `Busy`'s drop) sets it (two clock reads per request fewer).
    pub fn begin(this: &Arc<Self>) -> Busy {
        this.busy.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(this))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last piece of work ended, or None while one is under way.
    pub fn idle_since(&self) -> Option<Instant> {
        // Acquire pairs with the end's Release: no work under way means its end time is seen.
        (self.busy.load(Ordering::Acquire) == 0)
            .then(|| self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once no work has been under way for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let now = Instant::now();
            let wake = match self.idle_since() {
                None => now + limit,
                Some(since) if since + limit <= now => return,
                Some(since) => since + limit,
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The time first: whoever sees nothing under way must not read an older end.
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_runs_from_the_end_of_the_last_work_not_its_start() {
        let t0 = Instant::now();
        let activity = Arc::new(Activity::new());
        assert_eq!(activity.idle_since(), Some(t0));
        let first = Activity::begin(&activity);
        tokio::time::advance(Duration::from_secs(3)).await;
        let second = Activity::begin(&activity);
        assert_eq!(activity.idle_since(), None, "work under way");
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(first);
        assert_eq!(activity.idle_since(), None, "one piece still under way");
        tokio::time::advance(Duration::from_secs(4)).await;
        drop(second);
        let ended = Instant::now();
        assert_eq!(activity.idle_since(), Some(ended));
        let limit = Duration::from_secs(10);
        activity.idle_for(limit).await;
        assert_eq!(Instant::now(), ended + limit);
    }
}
