//! The admin listener, separate from traffic: status, drain / maintenance / enable, reload,
//! Prometheus metrics and a self-contained dashboard. Every endpoint but the dashboard page
//! itself requires the bearer token when one is configured.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::backend::{Backend, Mode};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::routing::Routing;

pub struct Admin {
    pub routing: Arc<ArcSwap<Routing>>,
    pub reloader: Arc<Reloader>,
    pub metrics: Arc<Metrics>,
}

type Reply = Response<Full<Bytes>>;

/// Serves admin requests until the task is aborted.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (admin, builder) = (Arc::clone(&admin), Arc::clone(&builder));
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        if method == Method::GET && path == "/" {
            return reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD.into());
        }
        if !self.authorized(req.headers().get(AUTHORIZATION)).await {
            return json_reply(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "missing or wrong bearer token"}),
            );
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (Method::GET, ["status"]) => json_reply(StatusCode::OK, &self.status()),
            (Method::GET, ["metrics"]) => {
                let text = self.metrics.encode(&self.routing.load());
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            }
            (Method::POST, ["reload"]) => match self.reloader.reload("admin api").await {
                Ok(()) => json_reply(StatusCode::OK, &json!({"reloaded": true})),
                Err(e) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"reloaded": false, "error": e.to_string()}),
                ),
            },
            (Method::POST, ["backends", id, action]) => self.set_mode(id, action),
            _ => json_reply(
                StatusCode::NOT_FOUND,
                &json!({"error": "no such admin endpoint"}),
            ),
        }
    }

    /// Compares MACs of the presented and expected tokens, so the comparison is constant-time.
    async fn authorized(&self, presented: Option<&HeaderValue>) -> bool {
        let Some(expected) = self.reloader.config().await.admin.and_then(|a| a.token) else {
            return true;
        };
        let presented = presented
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented else {
            return false;
        };
        let key = rand::random::<[u8; 32]>();
        let mac = |t: &str| {
            let mut m =
                <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap_or_else(|_| unreachable!());
            m.update(t.as_bytes());
            m
        };
        mac(presented)
            .verify_slice(&mac(&expected).finalize().into_bytes())
            .is_ok()
    }

    fn set_mode(&self, id: &str, action: &str) -> Reply {
        let mode = match action {
            "drain" => Mode::Draining,
            "maintenance" => Mode::Maintenance,
            "enable" => Mode::Normal,
            _ => {
                return json_reply(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "actions are drain, maintenance, enable"}),
                )
            }
        };
        let routing = self.routing.load();
        let Some(backend) = routing.find(id) else {
            return json_reply(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no backend {id:?}")}),
            );
        };
        backend.set_mode(mode, &format!("operator: {action}"));
        let weight = routing
            .members
            .iter()
            .find(|m| m.backend.id == id)
            .map_or(0, |m| m.weight);
        json_reply(StatusCode::OK, &backend_status(backend, weight))
    }

    fn status(&self) -> Value {
        let routing = self.routing.load();
        let backends: Vec<Value> = routing
            .members
            .iter()
            .map(|m| backend_status(&m.backend, m.weight))
            .collect();
        json!({ "backends": backends })
    }
}

fn backend_status(b: &Backend, weight: u32) -> Value {
    json!({
        "id": b.id,
        "address": b.address.as_str(),
        "state": b.state(),
        "healthy": b.is_up(),
        "mode": b.mode(),
        "weight": weight,
        "active_connections": b.active(),
        "requests": b.requests(),
        "pinned_requests_last_minute": b.pinned_last_minute(),
        "heartbeat": b.last_heartbeat(),
        "transitions": b.history(),
    })
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    reply(status, "application/json", body.to_string())
}

/// The dashboard: one self-contained page, no external assets. It polls `/status` every second
/// and posts the drain / maintenance / enable actions; with a token configured it asks once and
/// keeps it in the tab's session storage.
const DASHBOARD: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>stickylb</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{padding:.4em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.up{color:#0a0;font-weight:bold}.down{color:#c00;font-weight:bold}.draining{color:#c80;font-weight:bold}.maintenance{color:#06c;font-weight:bold}
small{color:#666}button{margin-right:.3em}#err{color:#c00}
</style></head>
<body><h1>stickylb</h1><p id="err"></p>
<table><thead><tr><th>backend</th><th>state</th><th>weight</th><th>active</th><th>requests</th><th>pinned/min</th><th>heartbeat</th><th>recent transitions</th><th>actions</th></tr></thead>
<tbody id="rows"></tbody></table>
<script>
const auth = () => { const t = sessionStorage.getItem('token'); return t ? {'Authorization': 'Bearer ' + t} : {}; };
async function call(method, path) {
  const r = await fetch(path, {method, headers: auth()});
  if (r.status === 401) { sessionStorage.setItem('token', prompt('Admin token') || ''); return null; }
  return r.json();
}
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }
function row(b) {
  const hb = b.heartbeat ? (b.heartbeat.ok ? 'ok' : 'fail') + ' ' + b.heartbeat.latency_ms.toFixed(1) + ' ms<br><small>' + esc(b.heartbeat.detail) + '</small>' : '-';
  const tr = b.transitions.slice(-3).reverse().map(t => new Date(t.at_unix_ms).toLocaleTimeString() + ' ' + esc(t.state) + ': ' + esc(t.reason)).join('<br>');
  const btn = a => '<button data-id="' + esc(b.id) + '" data-action="' + a + '">' + a + '</button>';
  return '<tr id="backend-' + esc(b.id) + '"><td>' + esc(b.id) + '<br><small>' + esc(b.address) + '</small></td><td class="state ' + b.state + '">' + b.state +
    '</td><td>' + b.weight + '</td><td>' + b.active_connections + '</td><td>' + b.requests + '</td><td>' + b.pinned_requests_last_minute +
    '</td><td>' + hb + '</td><td><small>' + tr + '</small></td><td>' + btn('drain') + btn('maintenance') + btn('enable') + '</td></tr>';
}
async function refresh() {
  try {
    const s = await call('GET', '/status');
    if (s) { document.getElementById('rows').innerHTML = s.backends.map(row).join(''); document.getElementById('err').textContent = ''; }
  } catch (e) { document.getElementById('err').textContent = 'cannot reach stickylb: ' + e; }
}
document.addEventListener('click', async e => {
  const b = e.target.closest('button[data-action]');
  if (b) { await call('POST', '/backends/' + encodeURIComponent(b.dataset.id) + '/' + b.dataset.action); refresh(); }
});
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;
