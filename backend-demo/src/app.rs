//! The HTTP surface (a contract): `/healthz`, `/visit`, `/session`, `/`, `/admin/health`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, COOKIE, RETRY_AFTER, SET_COOKIE, USER_AGENT};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::rejoin::{CutOff, Rejoin, PROXY_AGENT, STATE_HEADER};
use crate::sessions::{SessionError, Sessions, View};
use crate::store::SessionStore;

/// Sent by stickylb on a request whose client was pinned to another node.
pub const FAILOVER_HEADER: &str = "x-stickylb-failover";
pub const SESSION_COOKIE: &str = "sid";
/// How often the store is pinged for `/healthz`, which reports the last result: a liveness
/// answer must never wait on the store, or a store outage would look like a dead node.
const STORE_CHECK_EVERY: Duration = Duration::from_millis(250);
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub struct App {
    pub node: String,
    pub sessions: Arc<Sessions>,
    pub rejoin: Rejoin,
    healthy: AtomicBool,
    store_ok: AtomicBool,
}

impl App {
    pub fn new(node: String, sessions: Arc<Sessions>, rejoin: Rejoin) -> Arc<Self> {
        Arc::new(Self {
            node,
            sessions,
            rejoin,
            healthy: AtomicBool::new(true),
            store_ok: AtomicBool::new(true),
        })
    }

    /// Keeps the store's reachability current for `/healthz`; runs until aborted.
    pub async fn watch_store(self: Arc<Self>) {
        let mut tick = tokio::time::interval(STORE_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ping = tokio::time::timeout(STORE_CHECK_TIMEOUT, self.sessions.store().ping());
            let ok = matches!(ping.await, Ok(Ok(())));
            if self.store_ok.swap(ok, Ordering::SeqCst) != ok {
                tracing::info!(node = %self.node, store_ok = ok, "store reachability changed");
            }
        }
    }

    fn cut_off(&self, why: Option<CutOff>) {
        let Some(why) = why else { return };
        let invalidated = self.sessions.invalidate();
        let reason = match why {
            CutOff::Silence(gap) => format!("no heartbeat for {}", humantime::format_duration(gap)),
            CutOff::HeldDown => "stickylb holds this node down".to_string(),
        };
        if invalidated > 0 {
            tracing::info!(node = %self.node, invalidated, reason, "cut off: dropped cached sessions");
        }
    }

    /// Per-request context: the session cookie, and whether the store must be consulted.
    fn request(&self, headers: &HeaderMap) -> (Option<String>, bool) {
        self.cut_off(self.rejoin.before_request());
        (
            session_cookie(headers),
            headers.contains_key(FAILOVER_HEADER),
        )
    }

    fn view(&self, v: &View) -> Response {
        let body = json!({
            "node": self.node,
            "session": v.id,
            "visits": v.record.visits,
            "version": v.record.version,
        });
        let mut resp = Json(body).into_response();
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if v.created {
            let cookie = format!("{SESSION_COOKIE}={}; HttpOnly; SameSite=Lax; Path=/", v.id);
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(SET_COOKIE, value);
            }
        }
        resp
    }

    fn error(&self, e: &SessionError) -> Response {
        tracing::warn!(node = %self.node, error = %e, source = ?std::error::Error::source(e), "session operation failed");
        let body = Json(json!({"node": self.node, "error": e.to_string()}));
        let mut resp = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        resp
    }
}

/// Reads `sid` from the request's cookies with the `cookie` crate; the first one wins.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == SESSION_COOKIE)
        .map(|c| c.value().to_string())
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/visit", post(visit))
        .route("/session", get(show).delete(end))
        .route("/", get(page))
        .route("/admin/health", post(admin_health))
        .route("/slow", get(slow))
        .with_state(app)
}

async fn healthz(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let from_proxy = headers
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with(PROXY_AGENT));
    if from_proxy {
        let state = headers.get(STATE_HEADER).and_then(|v| v.to_str().ok());
        app.cut_off(app.rejoin.heartbeat(state));
    }
    let store_ok = app.store_ok.load(Ordering::SeqCst);
    let healthy = app.healthy.load(Ordering::SeqCst);
    let body = json!({
        "node": app.node,
        "status": if healthy { "ok" } else { "failing" },
        "store": if store_ok { "ok" } else { "down" },
        "pending_replication": app.sessions.pending(),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn visit(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let (sid, failover) = app.request(&headers);
    match app.sessions.visit(sid.as_deref(), failover).await {
        Ok(v) => app.view(&v),
        Err(e) => app.error(&e),
    }
}

async fn show(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let (sid, failover) = app.request(&headers);
    match app.sessions.get(sid.as_deref(), failover).await {
        Ok(Some(v)) => app.view(&v),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"node": app.node, "session": null})),
        )
            .into_response(),
        Err(e) => app.error(&e),
    }
}

async fn end(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let (sid, _) = app.request(&headers);
    if let Some(id) = sid.filter(|s| crate::session::is_well_formed(s)) {
        if let Err(e) = app.sessions.end(&id).await {
            return app.error(&e);
        }
    }
    let clear = HeaderValue::from_static("sid=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0");
    (
        [(SET_COOKIE, clear)],
        Json(json!({"node": app.node, "session": null, "ended": true})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct HealthToggle {
    ok: bool,
}

async fn admin_health(State(app): State<Arc<App>>, Query(q): Query<HealthToggle>) -> Response {
    app.healthy.store(q.ok, Ordering::SeqCst);
    tracing::info!(node = %app.node, healthy = q.ok, "health toggled by operator");
    Json(json!({"node": app.node, "status": if q.ok { "ok" } else { "failing" }})).into_response()
}

/// The longest `/slow` waits, in ms: enough to watch a proxy timeout, short enough to be harmless.
const SLOW_CAP_MS: u64 = 10_000;

#[derive(Deserialize)]
struct Slowness {
    ms: u64,
}

/// A page that takes `ms` milliseconds: for watching backend timeouts and graceful shutdown.
async fn slow(State(app): State<Arc<App>>, Query(q): Query<Slowness>) -> Response {
    let ms = q.ms.min(SLOW_CAP_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Json(json!({"node": app.node, "slept_ms": ms})).into_response()
}

async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let (sid, failover) = app.request(&headers);
    let view = match app.sessions.get(sid.as_deref(), failover).await {
        Ok(v) => v,
        Err(e) => return app.error(&e),
    };
    let (session, visits) = view.map_or(("none yet".to_string(), 0), |v| (v.id, v.record.visits));
    let html = PAGE
        .replace("{node}", &app.node)
        .replace("{session}", &session)
        .replace("{visits}", &visits.to_string());
    ([(CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

/// Node ids are validated to `[A-Za-z0-9._-]` and session ids are hex, so the page needs no
/// escaping beyond what the template does itself.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>stickylb demo: node {node}</title>
<style>body{font-family:system-ui,sans-serif;max-width:36em;margin:3em auto}
dt{font-weight:bold}button{font-size:1.2em;padding:.4em 1em}</style></head>
<body><h1>stickylb demo</h1>
<dl><dt>Node</dt><dd id="node">{node}</dd><dt>Session</dt><dd id="session">{session}</dd>
<dt>Visits</dt><dd id="visits">{visits}</dd></dl>
<button id="visit">Visit</button>
<script>
document.getElementById('visit').onclick = async () => {
  const r = await fetch('/visit', {method: 'POST', credentials: 'same-origin'});
  const s = await r.json();
  if (!r.ok) { alert(s.error || r.status); return; }
  for (const k of ['node', 'session', 'visits']) document.getElementById(k).textContent = s[k];
};
</script></body></html>
"#;
