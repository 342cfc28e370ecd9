//! The dashboard in a real headless Chromium, driven over the DevTools protocol: both backends
//! show, and a click on "drain" changes the backend's state.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{Proxy, Upstream};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|dir| PathBuf::from(dir).join(name))
                .find(|p| p.exists())
        });
    if found.is_none() {
        assert!(
            std::env::var("STICKYLB_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "Chromium required (STICKYLB_REQUIRE_CHROMIUM=1) but not found"
        );
        println!("SKIPPED dashboard test: no chromium on PATH (apt-get install chromium)");
    }
    found
}

struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Starts headless Chromium on `url`; returns it and its DevTools port.
fn launch(bin: &PathBuf, url: &str) -> (Browser, u16) {
    let profile = std::env::temp_dir().join(format!("stickylb-chromium-{}", std::process::id()));
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--remote-debugging-port=0", url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                tx.send(
                    rest.split('/')
                        .next()
                        .unwrap_or_default()
                        .parse::<u16>()
                        .ok(),
                )
                .ok();
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .expect("DevTools port");
    (Browser(child), port)
}

/// The DevTools WebSocket of the page showing `url`.
async fn page_socket(port: u16, url: &str) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let list = format!("http://127.0.0.1:{port}/json/list")
        .parse()
        .unwrap();
    let body = client
        .get(list)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let targets: Value = serde_json::from_slice(&body).unwrap();
    let page = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page" && t["url"].as_str().unwrap_or("").starts_with(url));
    page.unwrap_or_else(|| panic!("no page for {url} in {targets}"))["webSocketDebuggerUrl"]
        .as_str()
        .unwrap()
        .to_string()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Evaluates a JavaScript expression in the page and returns its value.
async fn eval(ws: &mut Socket, id: &mut u64, expression: &str) -> Value {
    *id += 1;
    let msg = json!({"id": *id, "method": "Runtime.evaluate", "params": {"expression": expression, "returnByValue": true}});
    ws.send(Message::text(msg.to_string())).await.unwrap();
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame.unwrap() else {
            continue;
        };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        if v["id"] == *id {
            return v["result"]["result"]["value"].clone();
        }
    }
    panic!("DevTools connection closed");
}

async fn eval_until(ws: &mut Socket, id: &mut u64, expression: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = eval(ws, id, expression).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "page never showed {want:?}; last {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const STATES: &str = "(() => { const s = id => document.querySelector('#backend-' + id + ' .state'); \
                       return s('a') && s('b') ? s('a').textContent + ',' + s('b').textContent : ''; })()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_both_backends_and_drain_works() {
    let Some(bin) = chromium() else { return };
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let path = std::env::temp_dir().join(format!("stickylb-dashboard-{}.toml", std::process::id()));
    let mut text = common::config(&[&a, &b], "[health]\ninterval = \"1h\"\n");
    text.push_str("\n[admin]\naddress = \"127.0.0.1:0\"\n");
    std::fs::write(&path, text).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let url = format!("http://{}/", proxy.admin.unwrap());

    let (_browser, port) = launch(&bin, &url);
    let (mut ws, _) = tokio_tungstenite::connect_async(page_socket(port, &url).await)
        .await
        .unwrap();
    let mut id = 0;
    eval_until(&mut ws, &mut id, STATES, "up,up").await;
    let clicked = eval(
        &mut ws,
        &mut id,
        "document.querySelector('#backend-a button[data-action=drain]').click(); true",
    )
    .await;
    assert_eq!(clicked, true);
    eval_until(&mut ws, &mut id, STATES, "draining,up").await;
    assert_eq!(
        proxy.lb.backend("a").unwrap().mode(),
        stickylb::backend::Mode::Draining
    );
}
