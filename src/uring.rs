//! Requests to backends sent through io_uring, a turn's worth in one kernel entry.
//!
//! A backend that shares the proxy's core is woken by each request sent to it; sent with one
//! `send` each, every send is a point where the kernel hands the core to the woken backend, which
//! answers that one request and sleeps again. Queued in io_uring and submitted together when the
//! worker has nothing left to run, the sends all go out before the backend runs, and it then
//! answers all of them in one run: on the kernel-bound machines of issue 6, 0.03 backend wake-ups
//! per request instead of 0.26, and 3 to 5 us less of the proxy's kernel time per request, of
//! which the backend spends 1 to 2 more answering in batches (README, "io_uring").
//!
//! Only a single worker runs this way (`workers = 1`, on [`Runtime`]: tokio-uring's, one
//! thread); everything else, reads and writes to clients included, stays on tokio's readiness.
//! The proxy's tasks must stay `Send` for the multi-threaded runtime, and io_uring's operations
//! are not, so one local task (the sender) owns a second descriptor of each backend connection
//! and runs every send; a connection holds a [`Sender`], a handle to it.

#[cfg(target_os = "linux")]
mod linux;

#[cfg(target_os = "linux")]
pub use linux::{sends, Runtime, Sender};

#[cfg(not(target_os = "linux"))]
pub use elsewhere::{sends, Runtime, Sender};

/// Where there is no io_uring: no runtime, and connections send as they do on tokio's.
#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::future::Future;
    use std::io;

    pub type Sent = (io::Result<usize>, Vec<u8>);

    #[derive(Debug)]
    pub enum Sender {}

    impl Sender {
        pub fn for_stream(_io: &tokio::net::TcpStream) -> Option<Self> {
            None
        }

        pub async fn send(&self, _buf: Vec<u8>) -> Sent {
            match *self {}
        }
    }

    pub enum Runtime {}

    pub fn sends() -> u64 {
        0
    }

    impl Runtime {
        pub fn new() -> io::Result<Self> {
            Err(io::ErrorKind::Unsupported.into())
        }

        pub fn block_on<F: Future>(&self, _future: F) -> F::Output {
            match *self {}
        }
    }
}
