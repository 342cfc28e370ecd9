//! When something (a client connection, an upstream connection) last started or finished a piece
//! of work, and how many are under way: what idle timeouts, and the time a client has for its
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

    pub fn begin(this: &Arc<Self>) -> Busy {
        this.busy.fetch_add(1, Ordering::Relaxed);
        this.touch();
        Busy(Arc::clone(this))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last piece of work ended, or None while one is under way.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.busy.load(Ordering::Relaxed) == 0)
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
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}
