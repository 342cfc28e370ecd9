//! Load for the drills: many browsers, each with its own session, paced to a total request rate
//! and mixing reads (`GET /session`) with writes (`POST /visit`). Every outcome is recorded with
//! its wall-clock times, so a drill can line requests up against the proxy's transition log.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::cluster::{session, Browser};
use crate::common::{Clientele, Reply};

/// One request as the client saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub session: usize,
    pub post: bool,
    /// Unix milliseconds when the request was sent and when its answer (or error) was complete.
    pub sent_ms: u64,
    pub done_ms: u64,
    pub took: Duration,
    /// None: no HTTP answer at all (reset, refused, 10 s silence).
    pub status: Option<u16>,
    pub node: String,
    pub sid: Option<String>,
    pub visits: u64,
    pub failover: bool,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

/// Which path a request takes: every `WRITE_EVERY`th is a write.
const WRITE_EVERY: usize = 3;

pub struct Load {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    owners: Arc<Mutex<HashMap<usize, String>>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(usize, Browser)>,
}

impl Load {
    /// Starts `sessions` browsers against `proxy`, `rps` requests per second in total. Each
    /// browser opens its session with a first write before the pacing starts.
    pub fn start(proxy: SocketAddr, sessions: usize, rps: f64) -> Self {
        let (stop, stopped) = watch::channel(false);
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let owners = Arc::new(Mutex::new(HashMap::new()));
        let period = Duration::from_secs_f64(sessions as f64 / rps);
        let mut tasks = JoinSet::new();
        for n in 0..sessions {
            let offset = period.mul_f64(n as f64 / sessions as f64);
            let user = User {
                n,
                browser: Browser {
                    client: Clientele::new(proxy),
                    jar: Default::default(),
                },
                outcomes: Arc::clone(&outcomes),
                owners: Arc::clone(&owners),
            };
            tasks.spawn(user.run(period, offset, stopped.clone()));
        }
        Self {
            outcomes,
            owners,
            stop,
            tasks,
        }
    }

    /// The node most sessions were last served by.
    pub fn busiest(&self) -> String {
        let owners = self.owners.lock().unwrap();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for node in owners.values() {
            *counts.entry(node).or_default() += 1;
        }
        let busiest = counts.into_iter().max_by_key(|(_, c)| *c);
        busiest.map(|(n, _)| n.to_string()).unwrap_or_default()
    }

    /// Sessions whose last answer came from `node`.
    pub fn sessions_on(&self, node: &str) -> usize {
        let owners = self.owners.lock().unwrap();
        owners.values().filter(|n| *n == node).count()
    }

    pub fn count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Waits until every session has been opened and `extra` more requests were answered.
    pub async fn warm_up(&self, sessions: usize, extra: usize) {
        let started = Instant::now();
        while self.owners.lock().unwrap().len() < sessions || self.count() < sessions + extra {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "load never got going"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets the load run for `span` of wall time.
    pub async fn run_for(&self, span: Duration) {
        tokio::time::sleep(span).await;
    }

    /// Stops every browser after its request in flight; returns what happened and the browsers.
    pub async fn stop(mut self) -> Report {
        self.stop.send(true).unwrap();
        let mut browsers = Vec::new();
        while let Some(b) = self.tasks.join_next().await {
            browsers.push(b.unwrap());
        }
        browsers.sort_by_key(|(n, _)| *n);
        let outcomes = std::mem::take(&mut *self.outcomes.lock().unwrap());
        Report {
            outcomes,
            browsers: browsers.into_iter().map(|(_, b)| b).collect(),
        }
    }
}

struct User {
    n: usize,
    browser: Browser,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    owners: Arc<Mutex<HashMap<usize, String>>>,
}

impl User {
    async fn run(
        mut self,
        period: Duration,
        offset: Duration,
        mut stopped: watch::Receiver<bool>,
    ) -> (usize, Browser) {
        self.request(true).await;
        let mut tick = tokio::time::interval_at(Instant::now() + offset, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        for i in 1.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => break,
            }
            self.request(i % WRITE_EVERY == 0).await;
        }
        (self.n, self.browser)
    }

    async fn request(&mut self, post: bool) {
        let (method, path) = if post {
            ("POST", "/visit")
        } else {
            ("GET", "/session")
        };
        let (sent_ms, at) = (stickylb::backend::unix_ms(), Instant::now());
        let reply = self.browser.try_send(method, path).await;
        let outcome = self.outcome(post, sent_ms, at, reply);
        if outcome.ok() {
            let mut owners = self.owners.lock().unwrap();
            owners.insert(self.n, outcome.node.clone());
        }
        self.outcomes.lock().unwrap().push(outcome);
    }

    fn outcome(&self, post: bool, sent_ms: u64, at: Instant, r: Result<Reply, String>) -> Outcome {
        let mut o = Outcome {
            session: self.n,
            post,
            sent_ms,
            done_ms: stickylb::backend::unix_ms(),
            took: at.elapsed(),
            status: None,
            node: String::new(),
            sid: None,
            visits: 0,
            failover: false,
        };
        if let Ok(r) = r {
            o.status = Some(r.status.as_u16());
            o.failover = r.headers.contains_key("x-stickylb-failover");
            if r.status == 200 {
                let s = session(&r);
                (o.node, o.sid, o.visits) = (s.node, s.id, s.visits);
            }
        }
        o
    }
}

/// Everything a load run saw, with the checks the drills share.
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub browsers: Vec<Browser>,
}

impl Report {
    pub fn total(&self) -> usize {
        self.outcomes.len()
    }

    /// Requests of one kind (`post`) that got no 200, as (status, count).
    pub fn failures(&self, post: bool) -> Vec<(Option<u16>, usize)> {
        let mut by: HashMap<Option<u16>, usize> = HashMap::new();
        for o in self.outcomes.iter().filter(|o| o.post == post && !o.ok()) {
            *by.entry(o.status).or_default() += 1;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort();
        v
    }

    pub fn failed(&self, post: bool) -> usize {
        self.failures(post).iter().map(|(_, n)| n).sum()
    }

    /// Sessions whose state went backwards at some point: a read or write that answered 200
    /// with fewer visits than already acknowledged, another session id, or an unknown session.
    /// In sync mode this must be empty: state survives every failover.
    pub fn sessions_that_lost_state(&self) -> Vec<usize> {
        let mut lost = Vec::new();
        for (n, outcomes) in self.by_session() {
            let (mut acked, mut sid) = (0, None);
            for o in outcomes {
                let went_back = match o.status {
                    Some(200) => {
                        let wrong_id = sid.is_some() && o.sid != sid;
                        sid = o.sid.clone();
                        wrong_id || o.visits < acked + u64::from(o.post)
                    }
                    Some(404) => true,
                    _ => false,
                };
                if went_back {
                    lost.push(n);
                    break;
                }
                if o.post && o.ok() {
                    acked = o.visits;
                }
            }
        }
        lost
    }

    /// For each session with an acknowledged write: (session number, id, visits acknowledged
    /// last).
    pub fn acknowledged(&self) -> Vec<(usize, String, u64)> {
        let mut out = Vec::new();
        for (n, outcomes) in self.by_session() {
            let last = outcomes.iter().rev().find(|o| o.post && o.ok());
            if let Some(o) = last {
                out.push((n, o.sid.clone().unwrap(), o.visits));
            }
        }
        out
    }

    /// Each session's outcomes in order.
    pub fn by_session(&self) -> Vec<(usize, Vec<&Outcome>)> {
        let mut by: HashMap<usize, Vec<&Outcome>> = HashMap::new();
        for o in &self.outcomes {
            by.entry(o.session).or_default().push(o);
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by_key(|(n, _)| *n);
        v
    }

    /// Requests `node` answered although they arrived after `from_ms` and were answered before
    /// `until_ms` (both unix ms): proof that it was used in that span.
    pub fn served_by_within(&self, node: &str, from_ms: u64, until_ms: u64) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.ok() && o.node == node && o.sent_ms > from_ms && o.done_ms < until_ms)
            .count()
    }
}
