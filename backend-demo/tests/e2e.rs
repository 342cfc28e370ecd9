//! End to end, with real processes: stickylb in front of two `backend-demo` processes sharing a
//! real store (SQLite, and Redis), clients with cookie jars, and real SIGKILL / SIGSTOP.
#![allow(clippy::unwrap_used)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use cluster::{index, kill_trials, nodes, proxy_config, session, store, wait_up, Browser, Node};
use common::Proxy;

/// A browser whose session lives on node `id`.
async fn browser_on(proxy: &Proxy, id: &str) -> Browser {
    for _ in 0..20 {
        let mut b = Browser::new(proxy);
        if session(&b.send("POST", "/visit").await).node == id {
            return b;
        }
    }
    panic!("no session landed on {id}");
}

async fn walkthrough(kind: &str) {
    let Some((args, _redis)) = store(kind, &format!("walkthrough-{kind}")).await else {
        return;
    };
    let mut nodes = nodes(&args, &[]);
    let proxy = Proxy::start(&proxy_config(&[&nodes[0], &nodes[1]])).await;
    let mut browser = Browser::new(&proxy);
    let mut seen = Vec::new();
    for expected in 1..=3 {
        let s = session(&browser.send("POST", "/visit").await);
        assert_eq!(s.visits, expected);
        seen.push(s);
    }
    assert!(
        seen.iter()
            .all(|s| s.node == seen[0].node && s.id == seen[0].id),
        "{seen:?}"
    );
    let (owner, pin) = (
        index(&nodes, &seen[0].node),
        browser.jar.get("stickylb").unwrap().to_string(),
    );

    nodes[owner].kill9();
    let r = browser.send("POST", "/visit").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let after = session(&r);
    assert_eq!(
        (after.visits, &after.id),
        (4, &seen[0].id),
        "the session continued on the other node"
    );
    assert_ne!(after.node, seen[0].node);
    assert_ne!(
        browser.jar.get("stickylb").unwrap(),
        pin,
        "the affinity cookie was re-pinned"
    );

    nodes[owner].restart().await;
    wait_up(&proxy, &nodes[owner].id).await;
    let back = session(&browser.send("POST", "/visit").await);
    assert_eq!(
        (back.node.as_str(), back.visits),
        (after.node.as_str(), 5),
        "a rejoining node takes nothing back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_with_sqlite() {
    walkthrough("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_with_redis() {
    walkthrough("redis").await;
}

async fn sync_loses_nothing(kind: &str) {
    let started = Instant::now();
    let Some((trials, lost)) = kill_trials(kind, "sync", 200).await else {
        return;
    };
    println!(
        "FIGURE sync/{kind}: {lost} of {trials} acknowledged writes lost ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "sync mode lost acknowledged writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_loses_no_acknowledged_write_over_200_kills_sqlite() {
    sync_loses_nothing("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_loses_no_acknowledged_write_over_200_kills_redis() {
    sync_loses_nothing("redis").await;
}

/// Async mode acknowledges before storing, so a SIGKILL can lose the last write: measured and
/// reported, not asserted.
async fn async_reports_losses(kind: &str) {
    let Some((trials, lost)) = kill_trials(kind, "async", 100).await else {
        return;
    };
    println!(
        "FIGURE async/{kind}: {lost} of {trials} acknowledged writes lost ({:.0}%)",
        lost as f64 * 100.0 / trials as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_measures_lost_writes_sqlite() {
    async_reports_losses("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_measures_lost_writes_redis() {
    async_reports_losses("redis").await;
}

/// A client that kept its old pin reaches node a again after the session moved on elsewhere:
/// a must read the newest state (`newest` visits), not its cache, and write on top of it.
async fn stale_client_gets_fresh_state(proxy: &Proxy, stale_jar: cluster::Jar, newest: u64) {
    let mut old = Browser {
        client: common::Clientele::new(proxy.addr),
        jar: stale_jar,
    };
    let read = session(&old.send("GET", "/session").await);
    assert_eq!(
        (read.node.as_str(), read.visits),
        ("a", newest),
        "a served a stale copy"
    );
    let s = session(&old.send("POST", "/visit").await);
    assert_eq!(
        (s.node.as_str(), s.visits),
        ("a", newest + 1),
        "a wrote over newer state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_held_down_never_serves_its_stale_copy() {
    let (args, _) = store("sqlite", "held-down").await.unwrap();
    let nodes = nodes(&args, &[]);
    let proxy = Proxy::start(&proxy_config(&[&nodes[0], &nodes[1]])).await;
    let mut browser = browser_on(&proxy, "a").await;
    assert_eq!(session(&browser.send("POST", "/visit").await).visits, 2);
    let stale_jar = browser.jar.clone();

    let admin = common::Clientele::new(nodes[0].addr);
    assert_eq!(
        admin
            .send("POST", "/admin/health?ok=false", None, "")
            .await
            .status,
        200
    );
    support::eventually(Duration::from_secs(10), "a down", || async {
        !proxy.is_up("a")
    })
    .await;
    for expected in [3, 4] {
        let s = session(&browser.send("POST", "/visit").await);
        assert_eq!((s.node.as_str(), s.visits), ("b", expected));
    }
    assert_eq!(
        admin
            .send("POST", "/admin/health?ok=true", None, "")
            .await
            .status,
        200
    );
    wait_up(&proxy, "a").await;

    stale_client_gets_fresh_state(&proxy, stale_jar, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_resuming_never_serves_its_stale_copy() {
    let (args, _) = store("sqlite", "hung").await.unwrap();
    let nodes = nodes(&args, &["--rejoin-window", "300ms"]);
    let proxy = Proxy::start(&proxy_config(&[&nodes[0], &nodes[1]])).await;
    let mut browser = browser_on(&proxy, "a").await;
    let stale_jar = browser.jar.clone();

    nodes[0].signal("STOP");
    support::eventually(Duration::from_secs(10), "a down", || async {
        !proxy.is_up("a")
    })
    .await;
    for expected in [2, 3] {
        let s = session(&browser.send("POST", "/visit").await);
        assert_eq!((s.node.as_str(), s.visits), ("b", expected));
    }
    nodes[0].signal("CONT");
    wait_up(&proxy, "a").await;
    stale_client_gets_fresh_state(&proxy, stale_jar, 3).await;
}

async fn concurrent_writers(kind: &str) {
    let Some((args, _redis)) = store(kind, &format!("concurrent-{kind}")).await else {
        return;
    };
    let nodes = nodes(&args, &[]);
    let proxy = Proxy::start(&proxy_config(&[&nodes[0], &nodes[1]])).await;
    let mut on_a = browser_on(&proxy, "a").await;
    let mut on_b = Browser {
        client: common::Clientele::new(proxy.addr),
        jar: on_a.jar.clone(),
    };
    on_b.jar.set(
        "stickylb",
        &stickylb::affinity::token(b"e2e-secret-0123456789", "b"),
    );
    let per_writer = 50;
    let run = |mut browser: Browser, node: &'static str| async move {
        for _ in 0..per_writer {
            let r = browser.send("POST", "/visit").await;
            assert_eq!(
                (r.status.as_u16(), session(&r).node.as_str()),
                (200, node),
                "{}",
                r.body
            );
        }
        browser
    };
    let (a_done, b_done) = tokio::join!(tokio::spawn(run(on_a, "a")), tokio::spawn(run(on_b, "b")));
    on_a = a_done.unwrap();
    drop(b_done.unwrap());
    let total = session(&on_a.send("POST", "/visit").await).visits;
    assert_eq!(total, 1 + 2 * per_writer + 1, "an increment was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_on_one_session_lose_no_increment_sqlite() {
    concurrent_writers("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_on_one_session_lose_no_increment_redis() {
    concurrent_writers("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_answers_503_when_the_store_cannot_take_the_write() {
    let Some((args, Some(mut redis))) = store("redis", "store-down").await else {
        return;
    };
    if std::env::var("REDIS_URL").is_ok() {
        println!("SKIPPED store-down: cannot stop a shared REDIS_URL server");
        return;
    }
    let nodes = nodes(&args, &[]);
    let proxy = Proxy::start(&proxy_config(&[&nodes[0], &nodes[1]])).await;
    let mut browser = Browser::new(&proxy);
    assert_eq!(session(&browser.send("POST", "/visit").await).visits, 1);
    redis.stop();
    let r = browser.send("POST", "/visit").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        !r.body.contains("visits"),
        "an unstored write must not be acknowledged"
    );
    // Alive, and saying the store is down (its store check runs in the background).
    let node = common::Clientele::new(nodes[0].addr);
    support::eventually(
        Duration::from_secs(5),
        "healthz reports the store down",
        || async {
            let health: serde_json::Value =
                serde_json::from_str(&node.get("/healthz", None).await.body).unwrap();
            (health["status"].as_str(), health["store"].as_str()) == (Some("ok"), Some("down"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_session_id_is_never_adopted() {
    let node = Node::start("a", &["--store", "memory"]);
    let client = common::Clientele::new(node.addr);
    let planted = backend_demo::session::new_id();
    let r = client
        .send("POST", "/visit", Some(&format!("sid={planted}")), "")
        .await;
    let s = session(&r);
    assert_eq!(s.visits, 1);
    assert_ne!(s.id.as_deref(), Some(planted.as_str()));
    assert!(r
        .set_cookies()
        .iter()
        .any(|c| c.starts_with("sid=") && c.contains("HttpOnly") && c.contains("SameSite=Lax")));
    assert_eq!(
        client
            .get("/session", Some(&format!("sid={planted}")))
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_flushes_queued_writes_on_graceful_shutdown() {
    use backend_demo::store::{SessionStore, Store};
    let path = support::sqlite_path("flush");
    let mut node = Node::start(
        "a",
        &[
            "--store",
            &format!("sqlite:{path}"),
            "--replication",
            "async",
        ],
    );
    let client = std::sync::Arc::new(common::Clientele::new(node.addr));
    let mut writes = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = std::sync::Arc::clone(&client);
        writes.spawn(async move { session(&client.send("POST", "/visit", None, "").await) });
    }
    let acked: Vec<_> = writes.join_all().await;
    let health: serde_json::Value =
        serde_json::from_str(&client.get("/healthz", None).await.body).unwrap();
    println!(
        "FIGURE flush: {} sessions queued at SIGTERM",
        health["pending_replication"]
    );
    node.signal("TERM");
    assert!(node.wait(), "graceful exit");
    let store = Store::open(&format!("sqlite:{path}"), "").await.unwrap();
    for s in &acked {
        let stored = store.load(s.id.as_deref().unwrap()).await.unwrap();
        assert_eq!(
            stored.map(|l| l.record.visits),
            Some(1),
            "an acknowledged write was not flushed"
        );
    }
}
