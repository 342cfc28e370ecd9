//! Noticing that this node was cut off, so it never serves a copy that went stale while clients
//! were served elsewhere. Two signals: stickylb's heartbeats stopped for longer than the window
//! (the node hung, or the network split), or a heartbeat says stickylb holds this node down
//! (`x-stickylb-backend-state: down`, sent while it routes this node's clients elsewhere).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Heartbeats carry this user agent prefix; other callers of `/healthz` do not count.
pub const PROXY_AGENT: &str = "stickylb-health";
pub const STATE_HEADER: &str = "x-stickylb-backend-state";

#[derive(Debug)]
pub struct Rejoin {
    window: Duration,
    /// Last heartbeat from the proxy; None until the first (nothing to be cut off from yet).
    last: Mutex<Option<Instant>>,
}

/// Why the cache must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutOff {
    Silence(Duration),
    HeldDown,
}

impl Rejoin {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: Mutex::new(None),
        }
    }

    /// Called for every proxy heartbeat; `state` is the proxy's view of this node.
    pub fn heartbeat(&self, state: Option<&str>) -> Option<CutOff> {
        let now = Instant::now();
        let gap = self.swap(Some(now)).map(|last| now - last);
        if state == Some("down") {
            return Some(CutOff::HeldDown);
        }
        gap.filter(|g| *g > self.window).map(CutOff::Silence)
    }

    /// Called before serving a request: a silence longer than the window (for example the process
    /// was stopped) means the cache may be stale. Re-arms, so one silence invalidates once.
    pub fn before_request(&self) -> Option<CutOff> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let gap = now - (*last)?;
        if gap <= self.window {
            return None;
        }
        *last = Some(now);
        Some(CutOff::Silence(gap))
    }

    fn swap(&self, value: Option<Instant>) -> Option<Instant> {
        std::mem::replace(
            &mut *self.last.lock().unwrap_or_else(PoisonError::into_inner),
            value,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_longer_than_the_window_cuts_off_once() {
        let r = Rejoin::new(Duration::from_secs(3));
        assert_eq!(
            r.before_request(),
            None,
            "no heartbeat yet: nothing to be cut off from"
        );
        assert_eq!(r.heartbeat(Some("up")), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(r.heartbeat(Some("up")), None);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            r.before_request(),
            Some(CutOff::Silence(Duration::from_secs(4)))
        );
        assert_eq!(r.before_request(), None, "re-armed");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            r.heartbeat(None),
            Some(CutOff::Silence(Duration::from_secs(5)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_saying_down_cuts_off() {
        let r = Rejoin::new(Duration::from_secs(3));
        assert_eq!(r.heartbeat(Some("down")), Some(CutOff::HeldDown));
        assert_eq!(r.heartbeat(Some("up")), None);
    }
}
