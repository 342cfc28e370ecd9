//! The admin API, drain and maintenance semantics, metrics, and hot reload.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{eventually, jar, pin_to, Clientele, Proxy, Upstream};
use serde_json::Value;

fn write_config(path: &PathBuf, upstreams: &[&Upstream], extra: &str) {
    let mut text = common::config(upstreams, &format!("[health]\ninterval = \"1h\"\n{extra}"));
    text.push_str("\n[admin]\naddress = \"127.0.0.1:0\"\n");
    std::fs::write(path, text).unwrap();
}

fn temp_config(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stickylb-admin-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("config.toml")
}

async fn admin(proxy: &Proxy, method: &str, path: &str) -> (u16, String) {
    let r = Clientele::new(proxy.admin.unwrap())
        .send(method, path, None, "")
        .await;
    (r.status.as_u16(), r.body)
}

async fn status(proxy: &Proxy) -> Value {
    let (code, body) = admin(proxy, "GET", "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn backend<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap()
}

#[tokio::test]
async fn status_lists_every_backend_with_its_state_and_counters() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let path = temp_config("status");
    write_config(&path, &[&a, &b], "");
    let proxy = Proxy::start_file(&path).await;
    Clientele::new(proxy.addr).get("/", None).await;
    let s = status(&proxy).await;
    for id in ["a", "b"] {
        let b = backend(&s, id);
        assert_eq!(b["state"], "up");
        assert_eq!(b["weight"], 1);
        for key in [
            "address",
            "active_connections",
            "requests",
            "pinned_requests_last_minute",
            "heartbeat",
            "transitions",
        ] {
            assert!(b.get(key).is_some(), "{key} missing in {b}");
        }
    }
    let total: u64 = ["a", "b"]
        .iter()
        .map(|id| backend(&s, id)["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1);
    let (code, _) = admin(&proxy, "GET", "/nope").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn drain_keeps_pinned_clients_and_takes_no_new_sessions() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let path = temp_config("drain");
    write_config(&path, &[&a, &b], "");
    let proxy = Proxy::start_file(&path).await;
    let client = Clientele::new(proxy.addr);
    let pin_a = pin_to(&client, "a").await;
    let (code, body) = admin(&proxy, "POST", "/backends/a/drain").await;
    assert_eq!(code, 200, "{body}");
    for _ in 0..10 {
        let r = client.get("/", Some(&jar(&pin_a))).await;
        assert_eq!(
            (r.served_by(), r.pin()),
            ("a", None),
            "a pinned client stays while draining"
        );
        assert_eq!(
            client.get("/", None).await.served_by(),
            "b",
            "no new session on a draining backend"
        );
    }
    let s = status(&proxy).await;
    assert_eq!(backend(&s, "a")["state"], "draining");
    assert!(
        backend(&s, "a")["pinned_requests_last_minute"]
            .as_u64()
            .unwrap()
            >= 10
    );
    assert_eq!(
        backend(&s, "a")["transitions"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["reason"],
        "operator: drain"
    );
    admin(&proxy, "POST", "/backends/a/enable").await;
    assert_eq!(backend(&status(&proxy).await, "a")["state"], "up");
}

#[tokio::test]
async fn maintenance_fails_pinned_clients_over_and_counts_it() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let path = temp_config("maintenance");
    write_config(&path, &[&a, &b], "");
    let proxy = Proxy::start_file(&path).await;
    let client = Clientele::new(proxy.addr);
    let pin_a = pin_to(&client, "a").await;
    let hits_a = a.hits();
    assert_eq!(
        admin(&proxy, "POST", "/backends/a/maintenance").await.0,
        200
    );
    let r = client.get("/cart", Some(&jar(&pin_a))).await;
    assert_eq!((r.status.as_u16(), r.served_by()), (200, "b"));
    assert!(r.pin().is_some(), "re-pinned");
    assert_eq!(b.seen().pop().unwrap().headers["x-stickylb-failover"], "a");
    assert_eq!(a.hits(), hits_a, "no traffic to a backend in maintenance");
    assert_eq!(backend(&status(&proxy).await, "a")["state"], "maintenance");

    let (code, text) = admin(&proxy, "GET", "/metrics").await;
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, label: (&str, &str)| {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1));
        match sample.map(|s| &s.value) {
            Some(
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v),
            ) => *v,
            other => panic!("{name}{label:?}: {other:?}"),
        }
    };
    assert_eq!(
        value("stickylb_failovers_total", ("reason", "maintenance")),
        1.0
    );
    assert_eq!(
        value("stickylb_affinity_total", ("outcome", "failover")),
        1.0
    );
    assert_eq!(value("stickylb_backend_up", ("backend", "b")), 1.0);
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric.starts_with("stickylb_upstream_latency_seconds")));
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "stickylb_requests_total" && s.labels.get("class") == Some("2xx")));
}

#[tokio::test]
async fn a_token_guards_every_endpoint_but_the_page() {
    let a = Upstream::start("a").await;
    let path = temp_config("token");
    write_config(&path, &[&a], "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[admin]\n", "[admin]\ntoken = \"s3cret-token\"\n");
    std::fs::write(&path, text).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let api = Clientele::new(proxy.admin.unwrap());
    assert_eq!(api.get("/status", None).await.status, 401);
    assert_eq!(
        api.send_with("GET", "/status", &[("authorization", "Bearer wrong")], "")
            .await
            .status,
        401
    );
    assert_eq!(
        api.send_with(
            "POST",
            "/backends/a/drain",
            &[("authorization", "Bearer wrong")],
            ""
        )
        .await
        .status,
        401
    );
    assert_eq!(
        api.send_with(
            "GET",
            "/status",
            &[("authorization", "Bearer s3cret-token")],
            ""
        )
        .await
        .status,
        200
    );
    let page = api.get("/", None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<table") && !page.body.contains("src=\"http"),
        "self-contained page"
    );
}

/// A reload that shortens `backend_response` holds on a connection pooled under the old one:
/// the timer its last exchange left, later than the new deadline, is brought forward.
#[tokio::test]
async fn a_shorter_response_timeout_after_a_reload_holds_on_a_pooled_connection() {
    let a = Upstream::start("a").await;
    let path = temp_config("shorter-timeout");
    write_config(&path, &[&a], "[timeouts]\nbackend_response = \"30s\"\n");
    let proxy = Proxy::start_file(&path).await;
    let client = Clientele::new(proxy.addr);
    assert_eq!(client.get("/", None).await.status, 200);
    write_config(&path, &[&a], "[timeouts]\nbackend_response = \"200ms\"\n");
    let (code, body) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    let started = std::time::Instant::now();
    let r = client.get("/never", None).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        took >= Duration::from_millis(195) && took < Duration::from_secs(3),
        "504 after {took:?}"
    );
}

#[tokio::test]
async fn reload_adds_and_removes_backends_and_keeps_state() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let path = temp_config("reload");
    write_config(&path, &[&a, &b], "");
    let proxy = Proxy::start_file(&path).await;
    let client = Clientele::new(proxy.addr);
    let pin_b = pin_to(&client, "b").await;
    admin(&proxy, "POST", "/backends/a/drain").await;

    write_config(&path, &[&a, &c], "");
    let (code, body) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    let s = status(&proxy).await;
    let ids: Vec<&str> = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a", "c"]);
    assert_eq!(
        backend(&s, "a")["state"],
        "draining",
        "kept backends keep their operator state"
    );

    let r = client.get("/", Some(&jar(&pin_b))).await;
    assert_eq!(
        (r.status.as_u16(), r.served_by()),
        (200, "c"),
        "a removed backend's clients fail over"
    );
    assert_eq!(c.seen().pop().unwrap().headers["x-stickylb-failover"], "b");
    assert!(r.pin().is_some());

    std::fs::write(&path, "[listener]\naddress = \"nope\"\n").unwrap();
    let (code, body) = admin(&proxy, "POST", "/reload").await;
    assert_eq!(code, 422);
    assert!(body.contains("listener.address"), "{body}");
    assert_eq!(
        client.get("/", None).await.status,
        200,
        "an invalid file keeps the running config"
    );
    assert_eq!(
        status(&proxy).await["backends"].as_array().unwrap().len(),
        2
    );
}

#[tokio::test]
async fn the_config_file_is_watched() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let path = temp_config("watch");
    write_config(&path, &[&a], "");
    let proxy = Proxy::start_file(&path).await;
    write_config(&path, &[&a, &b], "");
    eventually(Duration::from_secs(10), "file change picked up", || {
        proxy.lb.backend("b").is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_concurrent_traffic_fail_no_request() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let path = temp_config("churn");
    write_config(&path, &[&a, &b], "");
    let proxy = std::sync::Arc::new(Proxy::start_file(&path).await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (proxy, stop) = (std::sync::Arc::clone(&proxy), std::sync::Arc::clone(&stop));
        load.spawn(async move {
            let client = Clientele::new(proxy.addr);
            let (mut ok, mut failed, mut pin) = (0, 0, None::<String>);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client
                    .send(
                        "POST",
                        "/order",
                        pin.as_ref().map(|p| jar(p)).as_deref(),
                        "x=1",
                    )
                    .await;
                if r.status == 200 {
                    ok += 1
                } else {
                    failed += 1
                }
                pin = r.pin().or(pin);
            }
            (ok, failed)
        });
    }
    for round in 0..20 {
        let set: &[&Upstream] = if round % 2 == 0 {
            &[&a, &b, &c]
        } else {
            &[&a, &b]
        };
        write_config(&path, set, "");
        let (code, body) = admin(&proxy, "POST", "/reload").await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await; // let traffic run between reloads (pacing, not synchronisation)
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = load.join_next().await {
        let (o, f) = r.unwrap();
        ok += o;
        failed += f;
    }
    println!("FIGURE reload churn: 20 reloads, {ok} requests succeeded, {failed} failed");
    assert!(ok > 100, "traffic actually ran: {ok}");
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn heartbeats_keep_running_across_a_reload() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let path = temp_config("probes");
    let fast = "[health]\ninterval = \"20ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n";
    let write = |ups: &[&Upstream]| {
        let mut text = common::config(ups, fast);
        text.push_str("\n[admin]\naddress = \"127.0.0.1:0\"\n");
        std::fs::write(&path, text).unwrap();
    };
    write(&[&a]);
    let proxy = Proxy::start_file(&path).await;
    write(&[&a, &b]);
    assert_eq!(admin(&proxy, "POST", "/reload").await.0, 200);
    a.set_health(500);
    b.set_health(500);
    eventually(
        Duration::from_secs(10),
        "kept backend a probed after the reload",
        || !proxy.is_up("a"),
    )
    .await;
    eventually(Duration::from_secs(10), "added backend b probed", || {
        !proxy.is_up("b")
    })
    .await;
}
