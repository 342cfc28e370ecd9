//! Fault drills: stickylb in front of two real `backend-demo` processes sharing a real Redis,
//! under concurrent load (many sessions, reads and writes), while something breaks. Each drill
//! prints `DRILL` lines with its figures and asserts its targets.
//!
//! Run: `cargo test -p backend-demo --test drills -- --nocapture`. The drills run one at a time
//! (they measure timing on a small machine); the whole target takes about two minutes.
#![allow(clippy::unwrap_used)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "support/lbproc.rs"]
mod lbproc;
#[path = "support/load.rs"]
mod load;
mod support;

use std::time::{Duration, Instant};

use backend_demo::store::{SessionStore, Store};
use cluster::{index, kill_trials, nodes, store, wait_up, Node};
use common::{Clientele, Proxy};
use load::{Load, Report};
use stickylb::backend::unix_ms;
use support::TestRedis;

/// Drills measure time; running two at once on a two-core machine would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Health settings of the drills, in milliseconds and counts.
struct Health {
    interval_ms: u64,
    timeout_ms: u64,
    rise: u32,
    fall: u32,
    backend_response_ms: u64,
}

const HEALTH: Health = Health {
    interval_ms: 50,
    timeout_ms: 200,
    rise: 3,
    fall: 2,
    backend_response_ms: 1000,
};

fn config(nodes: &[&Node], extra: &str) -> String {
    let h = &HEALTH;
    let mut s = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[affinity]\nsecret = \"drill-secret-0123456789\"\n\
         [health]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {}\nfall = {}\n\
         [timeouts]\nbackend_response = \"{}ms\"\n{extra}",
        h.interval_ms, h.timeout_ms, h.rise, h.fall, h.backend_response_ms
    );
    for n in nodes {
        s.push_str(&format!(
            "\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n",
            n.id, n.addr
        ));
    }
    s
}

/// Two nodes on a shared Redis, in `replication` mode, behind an in-process stickylb.
async fn cluster(test: &str, redis: &TestRedis, replication: &str) -> ([Node; 2], Proxy) {
    let args = redis.node_args();
    let nodes = nodes(&args, &["--replication", replication]);
    let proxy = Proxy::start(&config(&[&nodes[0], &nodes[1]], "")).await;
    for n in &nodes {
        wait_up(&proxy, &n.id).await;
    }
    println!(
        "DRILL {test}: two nodes, {replication} replication, Redis at {}",
        redis.url
    );
    (nodes, proxy)
}

fn other(node: &str) -> &'static str {
    if node == "a" {
        "b"
    } else {
        "a"
    }
}

/// Each health transition of `id` after `since_ms`, as (unix ms, state).
fn transitions(proxy: &Proxy, id: &str, since_ms: u64) -> Vec<(u64, &'static str)> {
    let backend = proxy.lb.backend(id).unwrap();
    let history = backend.history();
    history
        .into_iter()
        .filter(|t| t.at_unix_ms >= since_ms)
        .map(|t| (t.at_unix_ms, t.state))
        .collect()
}

fn print_failures(test: &str, report: &Report) {
    println!(
        "DRILL {test}: {} requests; failed reads {:?}; failed writes {:?}",
        report.total(),
        report.failures(false),
        report.failures(true)
    );
}

const SESSIONS: usize = 40;
const RPS: f64 = 200.0;

/// Drill 1: `kill -9` of the node that owns the most sessions, at about 200 requests/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_1_kill_9_of_the_busiest_node_under_load() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "kill-9";
    let Some(redis) = support::redis(test).await else {
        return;
    };
    let (mut nodes, proxy) = cluster(test, &redis, "sync").await;
    let started = Instant::now();
    let load = Load::start(proxy.addr, SESSIONS, RPS);
    load.warm_up(SESSIONS, 200).await;
    let victim = load.busiest();
    let moved = load.sessions_on(&victim);
    let killed_ms = unix_ms();
    nodes[index(&nodes, &victim)].kill9();
    load.run_for(Duration::from_secs(2)).await;
    let report = load.stop().await;
    let rate = report.total() as f64 / started.elapsed().as_secs_f64();
    print_failures(test, &report);

    let lost = report.sessions_that_lost_state();
    let first_after = first_answers_after(&report, killed_ms, other(&victim));
    let worst = first_after.iter().max().copied().unwrap_or_default();
    println!(
        "DRILL {test}: killed {victim} holding {moved}/{SESSIONS} sessions at ~{rate:.0} req/s; \
         {} sessions continued on {} with their state; {} lost state; slowest first answer after \
         the kill {worst:?}",
        first_after.len(),
        other(&victim),
        lost.len()
    );
    assert_eq!(report.failed(false), 0, "a safely retryable read failed");
    assert!(
        report.failures(true).iter().all(|(s, _)| *s == Some(502)),
        "writes may only fail as 502 (sent, then the node died)"
    );
    assert!(lost.is_empty(), "sessions lost state: {lost:?}");
    assert_eq!(first_after.len(), moved, "every moved session was served");
    final_reads_hold_acknowledged_state(report).await;
}

/// For each session that had been on the dead node, how long its first successful request after
/// the kill took, provided `survivor` answered it (which proves the session continued there).
/// A write already on its way to the dying node may fail first with 502 (sent, outcome unknown);
/// the caller checks those separately, so here it is passed over, not counted as "not served".
fn first_answers_after(report: &Report, killed_ms: u64, survivor: &str) -> Vec<Duration> {
    let mut out = Vec::new();
    for (_, outcomes) in report.by_session() {
        let was_on_victim = outcomes
            .iter()
            .rev()
            .find(|o| o.done_ms < killed_ms && o.ok())
            .is_some_and(|o| o.node != survivor);
        let first = outcomes.iter().find(|o| o.sent_ms > killed_ms && o.ok());
        if let (true, Some(o)) = (was_on_victim, first) {
            if o.node == survivor {
                out.push(o.took);
            }
        }
    }
    out
}

/// After the drill, every browser reads its session once more: at least what was acknowledged.
async fn final_reads_hold_acknowledged_state(report: Report) {
    let acked = report.acknowledged();
    let mut browsers = report.browsers;
    for (n, sid, visits) in acked {
        let browser = &mut browsers[n];
        let r = browser.send("GET", "/session").await;
        let s = cluster::session(&r);
        assert_eq!(s.id.as_deref(), Some(sid.as_str()), "{}", r.body);
        assert!(
            s.visits >= visits,
            "{sid}: {} < acknowledged {visits}",
            s.visits
        );
    }
}

/// Drill 2: `kill -STOP` of a node: it hangs, nothing resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_2_a_hung_node_is_routed_around_and_rejoins_after_rise() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "sigstop";
    let Some(redis) = support::redis(test).await else {
        return;
    };
    let (nodes, proxy) = cluster(test, &redis, "sync").await;
    let load = Load::start(proxy.addr, SESSIONS, RPS);
    load.warm_up(SESSIONS, 200).await;
    let victim = load.busiest();
    let node = &nodes[index(&nodes, &victim)];
    let stopped_ms = unix_ms();
    node.signal("STOP");
    load.run_for(Duration::from_millis(1500)).await;
    let continued_ms = unix_ms();
    node.signal("CONT");
    wait_up(&proxy, &victim).await;
    load.run_for(Duration::from_millis(1000)).await;
    let report = load.stop().await;
    print_failures(test, &report);

    let log = transitions(&proxy, &victim, stopped_ms);
    let states: Vec<&str> = log.iter().map(|(_, s)| *s).collect();
    assert_eq!(states, ["down", "up"], "one transition each way");
    let (down_ms, up_ms) = (log[0].0, log[1].0);
    let h = &HEALTH;
    let bound = u64::from(h.fall) * h.interval_ms + h.timeout_ms;
    // The first success may be a probe sent while the node was stopped and answered as it
    // resumes; each later one must come from a probe sent after the previous was recorded
    // (`heartbeat::counts`), the next tick at the earliest. So `rise` successes need at least
    // `rise - 2` whole intervals after SIGCONT, plus the phase of that next tick.
    let min_rejoin = u64::from(h.rise - 2) * h.interval_ms;
    let timeouts: Vec<Duration> = report
        .outcomes
        .iter()
        .filter(|o| o.status == Some(504))
        .map(|o| o.took)
        .collect();
    let slowest = timeouts.iter().max().copied().unwrap_or_default();
    let used_while_down = report.served_by_within(&victim, down_ms + 1, up_ms.saturating_sub(1));
    println!(
        "DRILL {test}: {} requests answered 504, slowest after {slowest:?} (backend_response {} ms); \
         marked down {} ms after SIGSTOP (bound fall x interval + timeout = {bound} ms); \
         {used_while_down} requests reached it while down; up again {} ms after SIGCONT \
         (rise {} x interval {} ms); {} sessions lost state",
        timeouts.len(),
        h.backend_response_ms,
        down_ms - stopped_ms,
        up_ms - continued_ms,
        h.rise,
        h.interval_ms,
        report.sessions_that_lost_state().len()
    );
    let limit = Duration::from_millis(h.backend_response_ms + 250);
    assert!(slowest <= limit, "a 504 took {slowest:?}");
    assert!(
        report
            .outcomes
            .iter()
            .all(|o| o.ok() || o.status == Some(504)),
        "a hung node only costs 504s for requests already sent to it"
    );
    // Slack for the `kill` command and timer wake-ups; sequential probes would need 450 ms.
    assert!(
        down_ms - stopped_ms <= bound + 100,
        "detection exceeded its bound"
    );
    assert_eq!(used_while_down, 0);
    assert!(
        up_ms - continued_ms >= min_rejoin,
        "rejoined before rise heartbeats"
    );
    assert!(report.sessions_that_lost_state().is_empty());
}

/// Drill 3: a node whose health flaps faster than the thresholds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_3_a_flapping_node_is_damped_and_sessions_do_not_bounce() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "flapping";
    let Some(redis) = support::redis(test).await else {
        return;
    };
    let (nodes, proxy) = cluster(test, &redis, "sync").await;
    let load = Load::start(proxy.addr, SESSIONS, RPS);
    load.warm_up(SESSIONS, 200).await;
    let flapper = Clientele::new(nodes[0].addr);
    let (since_ms, toggles) = (unix_ms(), 24);
    for i in 0..toggles {
        let ok = i % 2 == 1;
        let path = format!("/admin/health?ok={ok}");
        assert_eq!(flapper.send("POST", &path, None, "").await.status, 200);
        load.run_for(Duration::from_millis(120)).await;
    }
    wait_up(&proxy, "a").await;
    load.run_for(Duration::from_millis(500)).await;
    let report = load.stop().await;
    print_failures(test, &report);

    let log = transitions(&proxy, "a", since_ms);
    let gaps: Vec<u64> = log.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let min_gap = gaps.iter().min().copied().unwrap_or(u64::MAX);
    let mut used_while_down = 0;
    for w in log.windows(2).filter(|w| w[0].1 == "down") {
        used_while_down += report.served_by_within("a", w[0].0 + 1, w[1].0.saturating_sub(1));
    }
    let bounced = sessions_that_bounced(&report);
    println!(
        "DRILL {test}: {toggles} health flips every 120 ms -> {} transitions (shortest gap \
         {min_gap} ms; rise {}, fall {}, interval {} ms); {used_while_down} requests reached it \
         while down; {bounced} sessions bounced back",
        log.len(),
        HEALTH.rise,
        HEALTH.fall,
        HEALTH.interval_ms
    );
    assert!(log.len() <= toggles, "more transitions than flips");
    let floor = u64::from(HEALTH.rise.min(HEALTH.fall) - 1) * HEALTH.interval_ms;
    assert!(
        min_gap + 10 >= floor,
        "a transition came faster than the thresholds allow"
    );
    assert_eq!(used_while_down, 0);
    assert_eq!(bounced, 0);
    assert_eq!(report.failed(false) + report.failed(true), 0);
    assert!(report.sessions_that_lost_state().is_empty());
}

/// Sessions that went back to a node they had been moved away from.
fn sessions_that_bounced(report: &Report) -> usize {
    let mut bounced = 0;
    for (_, outcomes) in report.by_session() {
        let nodes: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.ok())
            .map(|o| o.node.as_str())
            .collect();
        let mut left: Vec<&str> = Vec::new();
        for w in nodes.windows(2) {
            if left.contains(&w[1]) {
                bounced += 1;
                break;
            }
            if w[0] != w[1] {
                left.push(w[0]);
            }
        }
    }
    bounced
}

/// GET /healthz straight from a node: its replication backlog, or None when it cannot answer.
async fn backlog(node: &Node) -> Option<u64> {
    let r = Clientele::new(node.addr)
        .try_send_with("GET", "/healthz", &[], "")
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    v["pending_replication"].as_u64()
}

/// Every write the drill saw acknowledged is in the store, at least at that count.
async fn store_holds_acknowledged(redis: &TestRedis, report: &Report) -> usize {
    let store = Store::open(&redis.url, &redis.prefix).await.unwrap();
    let acked = report.acknowledged();
    for (_, sid, visits) in &acked {
        let stored = store.load(sid).await.unwrap().map(|l| l.record.visits);
        assert!(
            stored >= Some(*visits),
            "{sid}: acknowledged {visits}, stored {stored:?}"
        );
    }
    acked.len()
}

/// 200s for writes sent after `from_ms` and answered before `until_ms`.
fn writes_acknowledged_within(report: &Report, from_ms: u64, until_ms: u64) -> usize {
    let within = |o: &&load::Outcome| o.sent_ms > from_ms && o.done_ms < until_ms;
    report
        .outcomes
        .iter()
        .filter(within)
        .filter(|o| o.post && o.ok())
        .count()
}

/// Answers that served another session than the client's, or none at all: an empty session.
fn empty_sessions(report: &Report) -> usize {
    let mut empty = 0;
    for (_, outcomes) in report.by_session() {
        let first = outcomes.iter().find(|o| o.ok()).and_then(|o| o.sid.clone());
        let wrong = |o: &&&load::Outcome| o.status == Some(404) || (o.ok() && o.sid != first);
        empty += usize::from(outcomes.iter().any(|o| wrong(&o)));
    }
    empty
}

/// Drill 4a: the store goes away (SIGKILL of redis-server) and comes back, in sync mode, with a
/// node killed during the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_4a_store_outage_in_sync_mode_acknowledges_nothing_unstored() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "store-outage-sync";
    let Some(mut redis) = support::private_redis(test, true).await else {
        return;
    };
    let (mut nodes, proxy) = cluster(test, &redis, "sync").await;
    let load = Load::start(proxy.addr, SESSIONS, RPS);
    load.warm_up(SESSIONS, 200).await;
    redis.stop();
    let down_ms = unix_ms();
    load.run_for(Duration::from_millis(500)).await;
    let victim = load.busiest();
    nodes[index(&nodes, &victim)].kill9();
    load.run_for(Duration::from_millis(1000)).await;
    let up_ms = unix_ms();
    redis.start().await;
    load.run_for(Duration::from_millis(1500)).await;
    let report = load.stop().await;
    print_failures(test, &report);

    let acked_unstored = writes_acknowledged_within(&report, down_ms, up_ms);
    let recovered = first_write_after(&report, up_ms);
    let lost = report.sessions_that_lost_state();
    let checked = store_holds_acknowledged(&redis, &report).await;
    println!(
        "DRILL {test}: 1.5 s outage, {victim} killed during it; {acked_unstored} writes \
         acknowledged during the outage; {} empty sessions served; {} sessions lost state; \
         first write acknowledged {recovered:?} ms after Redis restarted; {checked} sessions' \
         acknowledged writes all found in the store",
        empty_sessions(&report),
        lost.len()
    );
    assert_eq!(
        acked_unstored, 0,
        "sync mode acknowledged a write it could not store"
    );
    assert_eq!(empty_sessions(&report), 0);
    assert!(lost.is_empty(), "{lost:?}");
    assert!(recovered.is_some(), "writes resumed after the outage");
}

/// Milliseconds from `from_ms` until the first write sent after it was acknowledged.
fn first_write_after(report: &Report, from_ms: u64) -> Option<u64> {
    let after = report.outcomes.iter().filter(|o| o.sent_ms > from_ms);
    let first = after.filter(|o| o.post && o.ok()).map(|o| o.done_ms).min();
    first.map(|ms| ms - from_ms)
}

/// Drill 4b: the same outage in async mode, with a failover (a node held down) during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_4b_store_outage_in_async_mode_keeps_serving_and_drains() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "store-outage-async";
    let Some(mut redis) = support::private_redis(test, true).await else {
        return;
    };
    let (nodes, proxy) = cluster(test, &redis, "async").await;
    let load = Load::start(proxy.addr, SESSIONS, RPS);
    load.warm_up(SESSIONS, 200).await;
    redis.stop();
    let down_ms = unix_ms();
    let mut most = 0;
    for step in 0..15 {
        if step == 5 {
            let path = "/admin/health?ok=false";
            let held = Clientele::new(nodes[0].addr)
                .send("POST", path, None, "")
                .await;
            assert_eq!(held.status, 200);
        }
        for n in &nodes {
            most = most.max(backlog(n).await.unwrap_or(0));
        }
        load.run_for(Duration::from_millis(100)).await;
    }
    let up_ms = unix_ms();
    redis.start().await;
    let drained = Instant::now();
    support::eventually(Duration::from_secs(20), "backlog drained", || async {
        backlog(&nodes[0]).await == Some(0) && backlog(&nodes[1]).await == Some(0)
    })
    .await;
    let drained = drained.elapsed();
    load.run_for(Duration::from_millis(500)).await;
    let report = load.stop().await;
    print_failures(test, &report);

    let served = writes_acknowledged_within(&report, down_ms, up_ms);
    let checked = store_holds_acknowledged(&redis, &report).await;
    println!(
        "DRILL {test}: 1.5 s outage, a held down during it; {served} writes acknowledged during \
         the outage; backlog peaked at {most} sessions (limit 10000), drained {drained:?} after \
         Redis restarted; {} empty sessions served; {} sessions read older state after moving; \
         {checked} sessions' acknowledged writes all found in the store",
        empty_sessions(&report),
        report.sessions_that_lost_state().len()
    );
    assert!(served > 0, "async mode kept acknowledging writes");
    assert!(most > 0 && most <= 10_000);
    assert_eq!(empty_sessions(&report), 0);
}

/// Drill 5: write -> 200 -> `kill -9` of that node -> read via the other, 1000 times per mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_5_sync_and_async_over_1000_kills_each() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "1000-kills";
    if support::redis(test).await.is_none() {
        return;
    }
    let window = staleness_window(1000).await;
    for mode in ["sync", "async"] {
        let started = Instant::now();
        let (trials, lost) = kill_trials("redis", mode, 1000).await.unwrap();
        println!(
            "DRILL {test}: {mode}: {lost} of {trials} acknowledged writes lost ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
        if mode == "sync" {
            assert_eq!(lost, 0, "sync mode lost an acknowledged write");
        }
    }
    println!(
        "DRILL {test}: async staleness window (response sent -> write in Redis) over 1000 \
         writes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        window[0], window[1], window[2]
    );
}

/// How long an async write lives only in the node's memory: from the response to the moment the
/// store has it, as [p50, p99, max] in ms.
async fn staleness_window(writes: usize) -> [f64; 3] {
    let (args, redis) = store("redis", "staleness").await.unwrap();
    let redis = redis.unwrap();
    let nodes = nodes(&args, &["--replication", "async"]);
    let proxy = Proxy::start(&config(&[&nodes[0], &nodes[1]], "")).await;
    let store = Store::open(&redis.url, &redis.prefix).await.unwrap();
    let mut browser = cluster::Browser::new(&proxy);
    let mut window = Vec::new();
    for _ in 0..writes {
        let s = cluster::session(&browser.send("POST", "/visit").await);
        let at = Instant::now();
        let sid = s.id.unwrap();
        loop {
            let stored = store.load(&sid).await.unwrap().map(|l| l.record.visits);
            if stored >= Some(s.visits) {
                break;
            }
            assert!(at.elapsed() < Duration::from_secs(10), "never stored");
        }
        window.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    window.sort_by(f64::total_cmp);
    let pick = |q: f64| window[((window.len() - 1) as f64 * q) as usize];
    [pick(0.5), pick(0.99), pick(1.0)]
}

/// The admin `/status` of a real stickylb: how many requests are in flight, and whether every
/// backend is up.
async fn lb_status(admin: std::net::SocketAddr) -> (u64, bool) {
    let r = Clientele::new(admin).get("/status", None).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let backends = v["backends"].as_array().unwrap();
    let active = backends
        .iter()
        .map(|b| b["active_connections"].as_u64().unwrap())
        .sum();
    let up = backends.iter().all(|b| b["state"] == "up");
    (active, up)
}

/// Drill 6: 20 reloads by SIGHUP and then SIGTERM of a real stickylb process, under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_6_reloads_then_sigterm_under_load_fail_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "reload-sigterm";
    let Some(redis) = support::redis(test).await else {
        return;
    };
    let args = redis.node_args();
    let nodes = nodes(&args, &[]);
    let text = config(
        &[&nodes[0], &nodes[1]],
        "[admin]\naddress = \"127.0.0.1:0\"\n",
    );
    let mut lb = lbproc::LbProcess::start(&text);
    support::eventually(Duration::from_secs(10), "both up", || async {
        lb_status(lb.admin).await.1
    })
    .await;
    let load = Load::start(lb.addr, SESSIONS, RPS);
    load.warm_up(SESSIONS, 200).await;
    for i in 1..=20 {
        let weighted = text.replace(
            "id = \"b\"\n",
            &format!("id = \"b\"\nweight = {}\n", 1 + i % 3),
        );
        std::fs::write(&lb.config, weighted).unwrap();
        lb.signal("HUP");
        support::eventually(Duration::from_secs(10), "reload applied", || async {
            lb.log_count("trigger=\"SIGHUP\"") >= i
        })
        .await;
        load.run_for(Duration::from_millis(50)).await;
    }
    let reloads = lb.log_count("configuration reloaded");
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let client = Clientele::new(lb.addr);
            tokio::spawn(async move { client.try_send_with("GET", "/slow?ms=600", &[], "").await })
        })
        .collect();
    support::eventually(
        Duration::from_secs(10),
        "slow requests in flight",
        || async { lb_status(lb.admin).await.0 >= 8 },
    )
    .await;
    let (term_ms, term) = (unix_ms(), Instant::now());
    lb.signal("TERM");
    let exit = lb.exit_within(Duration::from_secs(15)).await;
    let exited_after = term.elapsed();
    let mut slow_ok = 0;
    for s in slow {
        slow_ok += usize::from(s.await.unwrap().is_ok_and(|r| r.status == 200));
    }
    let report = load.stop().await;
    print_failures(test, &report);

    let before = report.outcomes.iter().filter(|o| o.done_ms < term_ms);
    let failed_before = before.filter(|o| !o.ok()).count();
    let spanning: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.sent_ms < term_ms && o.done_ms >= term_ms)
        .collect();
    let spanning_ok = spanning.iter().filter(|o| o.ok()).count();
    println!(
        "DRILL {test}: {reloads} reloads logged (20 sent by SIGHUP) under load: \
         {failed_before} of {} requests failed; at SIGTERM {slow_ok}/8 slow requests (600 ms) \
         and {spanning_ok}/{} load requests in flight completed; exited {exit:?} after \
         {exited_after:?}",
        report
            .outcomes
            .iter()
            .filter(|o| o.done_ms < term_ms)
            .count(),
        spanning.len()
    );
    assert_eq!(failed_before, 0, "a request failed during reloads");
    assert_eq!(slow_ok, 8, "an in-flight request did not complete");
    assert_eq!(spanning_ok, spanning.len());
    assert!(exit.is_some_and(|s| s.success()), "clean exit: {exit:?}");
}
