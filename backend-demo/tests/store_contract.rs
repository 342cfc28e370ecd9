//! One contract, three stores: memory, SQLite and Redis behave the same.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use backend_demo::session::{new_id, Record};
use backend_demo::store::{Saved, SessionStore, Store};
use support::eventually;

const TTL: Duration = Duration::from_secs(60);

fn rec(visits: u64, version: u64) -> Record {
    Record { visits, version }
}

async fn compare_and_set(store: &Store) {
    let id = new_id();
    assert!(store.load(&id).await.unwrap().is_none());
    assert_eq!(
        store.save(&id, &rec(1, 1), 7, 1, TTL).await.unwrap(),
        Saved::Conflict,
        "absent is version 0"
    );
    assert_eq!(
        store.save(&id, &rec(1, 1), 7, 0, TTL).await.unwrap(),
        Saved::Written
    );
    assert_eq!(
        store.save(&id, &rec(9, 1), 7, 0, TTL).await.unwrap(),
        Saved::Conflict,
        "create twice"
    );
    let loaded = store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (loaded.record, loaded.tag),
        (rec(1, 1), 7),
        "the writer's tag is stored"
    );
    assert!(loaded.ttl_left > Duration::from_secs(50) && loaded.ttl_left <= TTL);
    assert_eq!(
        store.save(&id, &rec(2, 2), 7, 0, TTL).await.unwrap(),
        Saved::Conflict
    );
    assert_eq!(
        store.save(&id, &rec(2, 2), 7, 1, TTL).await.unwrap(),
        Saved::Written
    );
    assert_eq!(store.load(&id).await.unwrap().unwrap().record, rec(2, 2));
    store.delete(&id).await.unwrap();
    assert!(store.load(&id).await.unwrap().is_none());
    assert_eq!(
        store.save(&id, &rec(1, 1), 7, 2, TTL).await.unwrap(),
        Saved::Conflict,
        "deleted is absent"
    );
    store.ping().await.unwrap();
}

/// Many writers doing load -> CAS -> retry on conflict: every increment lands exactly once.
async fn concurrent_writers_lose_nothing(store: &Store) {
    let id = Arc::new(new_id());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, id) = (store.clone(), Arc::clone(&id));
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let cur = store
                        .load(&id)
                        .await
                        .unwrap()
                        .map(|l| l.record)
                        .unwrap_or_default();
                    let next = rec(cur.visits + 1, cur.version + 1);
                    if store.save(&id, &next, 7, cur.version, TTL).await.unwrap() == Saved::Written
                    {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().record,
        rec(200, 200)
    );
}

async fn idle_sessions_expire(store: &Store) {
    let id = new_id();
    assert_eq!(
        store
            .save(&id, &rec(1, 1), 7, 0, Duration::from_millis(150))
            .await
            .unwrap(),
        Saved::Written
    );
    assert!(store.load(&id).await.unwrap().is_some());
    eventually(Duration::from_secs(5), "session expired", || async {
        store.load(&id).await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        store.save(&id, &rec(5, 5), 7, 1, TTL).await.unwrap(),
        Saved::Conflict,
        "expired is absent"
    );
    store.sweep().await.unwrap();
    assert_eq!(
        store.save(&id, &rec(1, 1), 7, 0, TTL).await.unwrap(),
        Saved::Written
    );
}

async fn contract(store: Store) {
    compare_and_set(&store).await;
    concurrent_writers_lose_nothing(&store).await;
    idle_sessions_expire(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_meets_the_contract() {
    contract(Store::open("memory", "").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_meets_the_contract() {
    let path = support::sqlite_path("contract");
    contract(Store::open(&format!("sqlite:{path}"), "").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_is_shared_between_processes_worth_of_connections() {
    let path = support::sqlite_path("shared");
    let spec = format!("sqlite:{path}");
    let (one, two) = (
        Store::open(&spec, "").await.unwrap(),
        Store::open(&spec, "").await.unwrap(),
    );
    let id = new_id();
    assert_eq!(
        one.save(&id, &rec(1, 1), 7, 0, TTL).await.unwrap(),
        Saved::Written
    );
    assert_eq!(two.load(&id).await.unwrap().unwrap().record, rec(1, 1));
    assert_eq!(
        two.save(&id, &rec(1, 1), 7, 0, TTL).await.unwrap(),
        Saved::Conflict
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_meets_the_contract() {
    let Some(redis) = support::redis("redis_store_meets_the_contract").await else {
        return;
    };
    contract(Store::open(&redis.url, &redis.prefix).await.unwrap()).await;
}

#[tokio::test]
async fn bad_store_specs_are_clear_errors() {
    for (spec, needle) in [
        (
            "postgres://x",
            "expected memory, sqlite:PATH or redis://HOST:PORT[/DB]",
        ),
        ("sqlite:", "needs a file path"),
        (
            "sqlite:/nonexistent-dir/x.db",
            "cannot open /nonexistent-dir/x.db",
        ),
        ("redis://127.0.0.1:1", "cannot use redis://127.0.0.1:1"),
    ] {
        let err = Store::open(spec, "")
            .await
            .err()
            .unwrap_or_else(|| panic!("{spec} must fail"));
        assert!(err.contains(needle), "{spec}: {err}");
    }
}
