//! What an upstream connection's exchanges share with the task that drives it: the idle clock,
//! and when the response head it waits for is due. The driver task closes the connection when
//! it idles out or the head is late; [`Link::settle`] tells the exchange which came first, so a
//! late head is answered 504 (and not retried) even if it came as the connection closed.
//!
//! One timer per connection does both, armed again only when it fires or the deadline moves
//! earlier than it: a timeout made and cancelled around every exchange cost about 1,000
//! instructions per request (PERFORMANCE.md).
//!
//! Since the deadline is kept by the driver, an exchange must not outlive it:
//! [`Link::unless_ended`] gives up on a request that is still in hyper's request channel when
//! the driver has ended. (A request handed to the channel as the connection closes can be queued
//! after the channel was emptied, and then nothing ever answers it.)

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::time::Instant;

use crate::activity::{Activity, Busy};
use crate::woken::Woken;

/// Why a connection's driver task closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Idle,
    /// The response head did not come by its deadline.
    Late,
}

/// What the driver's timer decides when it fires.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    End(Ending),
    WakeAt(Instant),
}

/// The rule, apart from the timer: `due` is the awaited head's deadline, `idle_since` when the
/// last exchange ended (None while one is under way).
fn step(now: Instant, due: Option<Instant>, idle_since: Option<Instant>, idle: Duration) -> Step {
    match (due, idle_since) {
        (Some(due), _) if now >= due => Step::End(Ending::Late),
        // Busy, but looked at again within `idle`: the head may come and the connection idle
        // long before a distant deadline.
        (Some(due), _) => Step::WakeAt(due.min(now + idle)),
        (None, Some(since)) if now >= since + idle => Step::End(Ending::Idle),
        (None, Some(since)) => Step::WakeAt(since + idle),
        // A response body is still being read.
        (None, None) => Step::WakeAt(now + idle),
    }
}

pub struct Link {
    activity: Arc<Activity>,
    origin: Instant,
    /// [`NONE`], [`LATE`], or one plus the milliseconds after `origin` by which the awaited head
    /// is due. The exchange (head arrived) and the driver (head late) each try to end the wait;
    /// one atomic operation decides which came first, so a head that made it is never cut off
    /// and a late one is never relayed.
    due_ms: AtomicU64,
    /// Set by the driver task once it has dropped the connection.
    ended: AtomicBool,
    /// The exchange waiting on this connection, woken when the driver ends.
    waiting: AtomicWaker,
}

const NONE: u64 = 0;
const LATE: u64 = u64::MAX;

impl Link {
    pub fn new() -> Self {
        Self {
            activity: Arc::new(Activity::new()),
            origin: Instant::now(),
            due_ms: AtomicU64::new(NONE),
            ended: AtomicBool::new(false),
            waiting: AtomicWaker::new(),
        }
    }

    /// Called by the driver task after it dropped the connection: every request hyper had taken
    /// has been answered (if only with an error) by then.
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.waiting.wake();
    }

    /// `sending`'s outcome, or None if the driver ended first: the request was then never taken
    /// from hyper's channel, so never written, and may be sent again elsewhere.
    /// Lent pinned, not moved in: the exchange's future is a few hundred bytes, and a moved-in
    /// argument is copied once more on the first poll.
    pub async fn unless_ended<F: Future>(&self, mut sending: Pin<&mut F>) -> Option<F::Output> {
        let outcome = poll_fn(|cx| {
            if let Poll::Ready(out) = sending.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            self.waiting.register(cx.waker());
            if !self.ended.load(Ordering::Acquire) {
                return Poll::Pending;
            }
            // An answer given as the connection was dropped is there now.
            Poll::Ready(match sending.as_mut().poll(cx) {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await;
        // Not kept past the exchange: a stored waker holds the client's task in memory.
        drop(self.waiting.take());
        outcome
    }

    /// An exchange starts: the connection is busy until the returned guard is dropped.
    pub fn begin(&self) -> Busy {
        Activity::begin(&self.activity)
    }

    /// A request went out (or is about to): its response head is due by `deadline`.
    pub fn expect_by(&self, deadline: Instant) {
        let d = deadline.saturating_duration_since(self.origin);
        // Rounded up, so the deadline is never brought forward.
        let ms = d.as_secs() * 1000 + u64::from(d.subsec_nanos().div_ceil(1_000_000));
        self.due_ms
            .store(ms.saturating_add(1).min(LATE - 1), Ordering::Release);
    }

    /// The exchange is over (a head came, or it failed): true if the driver had not already
    /// found the head late and closed the connection.
    pub fn settle(&self) -> bool {
        self.due_ms.swap(NONE, Ordering::AcqRel) != LATE
    }

    fn due(raw: u64, origin: Instant) -> Option<Instant> {
        match raw {
            NONE | LATE => None,
            ms => Some(origin + Duration::from_millis(ms - 1)),
        }
    }

    /// Resolves when the connection should be closed. Polled on every wake of the driver task
    /// (each request wakes it to be written), which is when a new, earlier deadline is seen.
    /// The timer itself is polled only when it fired or was reset (`Woken`): polling it on each
    /// of those wakes cost about 300 instructions per request.
    pub async fn watch(&self, idle: Duration) -> Ending {
        let timer = tokio::time::sleep(idle);
        tokio::pin!(timer);
        let mut fired = Woken::new();
        poll_fn(|cx| loop {
            let raw = self.due_ms.load(Ordering::Acquire);
            let due = Self::due(raw, self.origin);
            if let Some(due) = due.filter(|due| *due < timer.deadline()) {
                timer.as_mut().reset(due);
                fired.arm();
            }
            if fired.poll(timer.as_mut(), cx).is_pending() {
                return Poll::Pending;
            }
            match step(Instant::now(), due, self.activity.idle_since(), idle) {
                // Lost to the head arriving (or a new request) since `raw` was read: look again.
                // The timer has fired and stays so: armed, it is polled again, not waited on.
                Step::End(Ending::Late) if !self.mark_late(raw) => fired.arm(),
                Step::End(ending) => return Poll::Ready(ending),
                Step::WakeAt(at) => {
                    timer.as_mut().reset(at);
                    fired.arm();
                }
            }
        })
        .await
    }

    fn mark_late(&self, raw: u64) -> bool {
        let marked = self
            .due_ms
            .compare_exchange(raw, LATE, Ordering::AcqRel, Ordering::Acquire);
        marked.is_ok()
    }
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_timer_ends_a_late_head_or_an_idle_connection_or_says_when_to_look_again() {
        let t0 = Instant::now();
        let idle = 4000 * MS;
        let at = |ms: u32| t0 + ms * MS;
        let table = [
            (
                "head awaited, not yet due",
                at(500),
                Some(at(900)),
                None,
                Step::WakeAt(at(900)),
            ),
            (
                "head due after the idle period",
                at(500),
                Some(at(30_500)),
                None,
                Step::WakeAt(at(4500)),
            ),
            (
                "head due now: late",
                at(900),
                Some(at(900)),
                None,
                Step::End(Ending::Late),
            ),
            (
                "head past due: late",
                at(950),
                Some(at(900)),
                None,
                Step::End(Ending::Late),
            ),
            (
                "body being read",
                at(500),
                None,
                None,
                Step::WakeAt(at(4500)),
            ),
            (
                "idle, not yet long",
                at(500),
                None,
                Some(at(100)),
                Step::WakeAt(at(4100)),
            ),
            (
                "idle long enough",
                at(4100),
                None,
                Some(at(100)),
                Step::End(Ending::Idle),
            ),
        ];
        for (what, now, due, idle_since, expected) in table {
            assert_eq!(step(now, due, idle_since, idle), expected, "{what}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_earlier_than_the_armed_timer_is_kept_to_the_millisecond() {
        let link = Arc::new(Link::new());
        let poke = Arc::new(tokio::sync::Notify::new());
        // A driver task: besides the watch, a request to write wakes it (here, `poke`).
        let driver = tokio::spawn({
            let (link, poke) = (Arc::clone(&link), Arc::clone(&poke));
            async move {
                let watch = link.watch(Duration::from_secs(4));
                tokio::pin!(watch);
                loop {
                    tokio::select! {
                        ending = &mut watch => return (ending, Instant::now()),
                        () = poke.notified() => {}
                    }
                }
            }
        });
        tokio::task::yield_now().await;
        let _busy = link.begin();
        let deadline = Instant::now() + Duration::from_millis(1000);
        link.expect_by(deadline);
        poke.notify_one();
        let (ending, at) = driver.await.expect("the driver runs");
        assert_eq!(ending, Ending::Late);
        assert!(
            at >= deadline && at < deadline + 2 * MS,
            "{:?}",
            at - deadline
        );
        assert!(!link.settle(), "the exchange learns its head was late");
    }

    #[test]
    fn a_head_and_its_deadline_are_decided_once() {
        let link = Link::new();
        link.expect_by(Instant::now());
        let seen = link.due_ms.load(Ordering::Acquire);
        assert!(link.settle(), "the head came first");
        assert!(!link.mark_late(seen), "so the driver cannot call it late");
        link.expect_by(Instant::now());
        let seen = link.due_ms.load(Ordering::Acquire);
        assert!(link.mark_late(seen), "the deadline came first");
        assert!(!link.settle(), "so the exchange learns it was late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idles_out_on_time_after_a_head_awaited_past_its_timer() {
        let link = Arc::new(Link::new());
        let busy = link.begin();
        link.expect_by(Instant::now() + Duration::from_secs(30));
        let idle = Duration::from_millis(100);
        let driver = tokio::spawn({
            let link = Arc::clone(&link);
            async move { (link.watch(idle).await, Instant::now()) }
        });
        // The timer fires once while the head is awaited, then the exchange ends.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(link.settle());
        drop(busy);
        let released = Instant::now();
        let (ending, at) = driver.await.expect("the driver runs");
        assert_eq!(ending, Ending::Idle);
        assert!(
            at - released >= idle && at - released < 3 * idle,
            "{:?}",
            at - released
        );
    }

    #[tokio::test]
    async fn a_request_still_queued_when_the_driver_ends_is_given_up() {
        let link = Arc::new(Link::new());
        let exchange = tokio::spawn({
            let link = Arc::clone(&link);
            // hyper's answer that never comes: the request sits in a dropped connection's queue.
            async move {
                link.unless_ended(std::pin::pin!(std::future::pending::<()>()))
                    .await
            }
        });
        // One thread: the exchange runs (and waits) before the driver ends.
        tokio::task::yield_now().await;
        link.end();
        let given_up = tokio::time::timeout(Duration::from_secs(5), exchange).await;
        assert_eq!(
            given_up.expect("woken when the driver ended").ok(),
            Some(None)
        );
    }

    #[tokio::test]
    async fn an_answer_given_before_the_driver_ended_is_kept() {
        let link = Arc::new(Link::new());
        let (answer, answered) = tokio::sync::oneshot::channel();
        let exchange = tokio::spawn({
            let link = Arc::clone(&link);
            async move { link.unless_ended(std::pin::pin!(answered)).await }
        });
        tokio::task::yield_now().await;
        answer.send(200).expect("the exchange waits");
        link.end();
        let outcome = exchange.await.expect("the exchange runs");
        assert_eq!(outcome, Some(Ok(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_came_leaves_only_the_idle_close() {
        let link = Link::new();
        let busy = link.begin();
        link.expect_by(Instant::now() + Duration::from_millis(100));
        assert!(link.settle());
        drop(busy);
        let idle_from = Instant::now();
        assert_eq!(link.watch(Duration::from_secs(4)).await, Ending::Idle);
        assert!(Instant::now() - idle_from >= Duration::from_secs(4));
    }
}
