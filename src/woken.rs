//! Polling a future only when it was woken. A `select!` polls every branch on every wake of its
//! task, so a client connection's timer and shutdown signal, which almost never fire, were polled
//! for each request's two or three wakes (re-registering the waker each time: about 2% of the
//! instructions per request, PERFORMANCE.md). [`Woken::guard`] gives such a future its own
//! waker and polls it only after that waker fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;
use tokio::time::{Instant, Sleep};

/// One future's own waker. Made once and reused for each future it guards in turn.
#[derive(Debug)]
pub struct Woken {
    flag: Arc<Flag>,
    waker: Waker,
}

#[derive(Debug)]
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Woken {
    pub fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        Self { flag, waker }
    }

    /// `fut`, polled first and then only after it woke. One guarded future at a time.
    pub fn guard<F: Future + Unpin>(&mut self, fut: F) -> Guarded<'_, F> {
        self.arm();
        self.again(fut)
    }

    /// `fut`, the future this waker guarded last and unchanged since, polled only if it woke
    /// (or was armed): a future kept across many waits is registered once, not once per wait.
    pub fn again<F: Future + Unpin>(&mut self, fut: F) -> Guarded<'_, F> {
        Guarded { woken: self, fut }
    }

    /// The next [`Woken::poll`] polls its future whether or not it woke: for a new future, or
    /// one changed since (a timer reset to another deadline must be polled to be registered).
    pub fn arm(&mut self) {
        self.flag.woken.store(true, Ordering::Release);
    }

    /// Polls `fut` with this waker if it woke (or was armed) since it was last polled; pending
    /// otherwise. Either way the task behind `cx` is woken when `fut` wakes.
    pub fn poll<F: Future + ?Sized>(
        &mut self,
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        // Registered before the flag is read: a wake in between is seen now or wakes the task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        fut.poll(&mut Context::from_waker(&self.waker))
    }
}

impl Default for Woken {
    fn default() -> Self {
        Self::new()
    }
}

/// A timer polled only when it fired or was reset. A reset timer must be polled again to be
/// registered, so [`Timer::reset`] arms it: the rule lives here, not at each reset.
#[derive(Debug)]
pub struct Timer {
    sleep: Pin<Box<Sleep>>,
    woken: Woken,
}

impl Timer {
    pub fn at(deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            woken: Woken::new(),
        }
    }

    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    pub fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        self.woken.arm();
    }

    /// Resolves when the timer fires; until then each poll costs no more than a flag's look.
    pub fn fired(&mut self) -> Guarded<'_, Pin<&mut Sleep>> {
        self.woken.again(self.sleep.as_mut())
    }
}

/// See [`Woken::guard`].
pub struct Guarded<'a, F> {
    woken: &'a mut Woken,
    fut: F,
}

impl<F: Future + Unpin> Future for Guarded<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.woken.poll(Pin::new(&mut this.fut), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, waking whoever polled it last when told to.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().expect("not poisoned") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wakes.
    struct Task(AtomicUsize);
    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_guarded_future_is_polled_first_and_then_only_after_its_own_wake() {
        let (polls, ready) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let inner_waker = Arc::new(std::sync::Mutex::new(None));
        let probe = Probe {
            polls: Arc::clone(&polls),
            ready: Arc::clone(&ready),
            waker: Arc::clone(&inner_waker),
        };
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let task_waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&task_waker);
        let mut woken = Woken::new();
        let mut guarded = woken.guard(probe);

        assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled the first time");
        for _ in 0..3 {
            assert!(Pin::new(&mut guarded).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "wakes meant for others");

        ready.store(true, Ordering::SeqCst);
        let inner = inner_waker.lock().expect("not poisoned").take();
        inner.expect("the probe kept a waker").wake();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "its wake reaches the task"
        );
        assert!(Pin::new(&mut guarded).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
