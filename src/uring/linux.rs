use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::HashMapExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Sends handed to io_uring by this process: tests check that requests took this path.
static SENDS: AtomicU64 = AtomicU64::new(0);

/// How many sends went through io_uring so far.
pub fn sends() -> u64 {
    SENDS.load(Ordering::Relaxed)
}

thread_local! {
    /// The way to this thread's sender; None on a thread not running [`Runtime`].
    static JOBS: RefCell<Option<mpsc::UnboundedSender<Job>>> = const { RefCell::new(None) };
}

/// What one send returns: the count sent, and the buffer back.
pub type Sent = (io::Result<usize>, Vec<u8>);

enum Job {
    Open(u64, OwnedFd),
    Send(u64, Vec<u8>, oneshot::Sender<Sent>),
    Close(u64),
}

/// A backend connection's handle to the sender, which sends on a second descriptor of it.
#[derive(Debug)]
pub struct Sender {
    id: u64,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Sender {
    /// A sender for `io` on a [`Runtime`] worker; None elsewhere, or when the descriptor cannot
    /// be duplicated (the connection then sends as every other does).
    pub fn for_stream(io: &TcpStream) -> Option<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let jobs = JOBS.with_borrow(Clone::clone)?;
        let fd = match io.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "cannot duplicate a backend connection for io_uring");
                return None;
            }
        };
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        jobs.send(Job::Open(id, fd)).ok()?;
        Some(Self { id, jobs })
    }

    /// Sends what one operation takes of `buf`, waiting for room in the socket's buffer as a
    /// blocking send would (io_uring arms a poll instead of failing with `WouldBlock`).
    pub async fn send(&self, buf: Vec<u8>) -> Sent {
        let (reply, sent) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job::Send(self.id, buf, reply)) {
            let Job::Send(_, buf, _) = job else {
                unreachable!("the job sent was a send")
            };
            return (Err(stopped()), buf);
        }
        sent.await.unwrap_or_else(|_| (Err(stopped()), Vec::new()))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if self.jobs.send(Job::Close(self.id)).is_err() {
            // The sender has stopped, and its descriptors were closed with it.
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("the io_uring sender has stopped")
}

/// tokio-uring's runtime (a current-thread tokio runtime that also drives an io_uring, and
/// submits what was queued in it whenever the thread is about to sleep), with the sender
/// running beside the future it runs.
pub struct Runtime(tokio_uring::Runtime);

impl Runtime {
    /// Fails where the kernel refuses io_uring (too old, `kernel.io_uring_disabled`, or a
    /// seccomp profile such as Docker's default).
    pub fn new() -> io::Result<Self> {
        tokio_uring::Runtime::new(&tokio_uring::builder()).map(Self)
    }

    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.0.block_on(async {
            let (jobs, queue) = mpsc::unbounded_channel();
            JOBS.set(Some(jobs));
            let sender = tokio::task::spawn_local(run_sender(queue));
            let out = future.await;
            JOBS.set(None);
            sender.abort();
            out
        })
    }
}

/// Owns each connection's second descriptor and runs every send as a task of its own, so sends
/// on different connections are in flight together.
async fn run_sender(mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut streams = foldhash::HashMap::new();
    while let Some(job) = queue.recv().await {
        match job {
            Job::Open(id, fd) => {
                let stream = tokio_uring::net::TcpStream::from_std(fd.into());
                streams.insert(id, Rc::new(stream));
            }
            Job::Close(id) => close(streams.remove(&id)),
            Job::Send(id, buf, reply) => {
                let Some(stream) = streams.get(&id).map(Rc::clone) else {
                    answer(reply, (Err(stopped()), buf));
                    continue;
                };
                SENDS.fetch_add(1, Ordering::Relaxed);
                tokio::task::spawn_local(async move {
                    let sent = stream.write(buf).submit().await;
                    answer(reply, sent);
                });
            }
        }
    }
}

/// Closes a connection's second descriptor. io_uring waits for room in a full socket buffer
/// (it does not honour `O_NONBLOCK` on sockets), so a send can still be in flight when its
/// request is dropped (the response head was late, or the client left): the descriptor would
/// then stay open, and the backend never see the connection close, until the backend read.
/// Shutting the socket down ends that send at once.
fn close(stream: Option<Rc<tokio_uring::net::TcpStream>>) {
    let Some(stream) = stream else { return };
    if Rc::strong_count(&stream) > 1 {
        if let Err(e) = stream.shutdown(std::net::Shutdown::Both) {
            tracing::debug!(error = %e, "cannot shut down a backend connection");
        }
    }
}

fn answer(reply: oneshot::Sender<Sent>, sent: Sent) {
    if reply.send(sent).is_err() {
        // The request went away (its client left, or it timed out): nobody waits.
    }
}
