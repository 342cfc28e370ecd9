//! Prometheus metrics, encoded by `prometheus-client`. Counters are updated on the request path;
//! gauges that mirror backend state are refreshed at scrape time.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::Backend;
use crate::routing::Routing;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const OUTCOMES: [&str; 3] = ["new", "hit", "failover"];

/// One backend's request counters (by status class) and latency histogram: handles sharing the
/// families' values, so the request path neither formats labels nor hashes them.
#[derive(Debug)]
pub struct BackendMeters {
    requests: [Counter; 5],
    latency: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub backend: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

type Histograms = Family<BackendLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16)) // 250us .. ~8s
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    affinity: Family<OutcomeLabels, Counter>,
    failovers: Family<ReasonLabels, Counter>,
    backend_up: Family<BackendLabels, Gauge>,
    active: Family<BackendLabels, Gauge>,
    heartbeat_latency: Histograms,
    upstream_latency: Histograms,
    parked: Gauge,
    /// `affinity` handles for [`OUTCOMES`], in that order.
    outcomes: [Counter; 3],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("stickylb"),
            requests: Family::default(),
            affinity: Family::default(),
            failovers: Family::default(),
            backend_up: Family::default(),
            active: Family::default(),
            heartbeat_latency: Family::new_with_constructor(latency_histogram),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            parked: Gauge::default(),
            outcomes: Default::default(),
        };
        m.outcomes =
            OUTCOMES.map(|outcome| m.affinity.get_or_create(&OutcomeLabels { outcome }).clone());
        m.register();
        m
    }
}

impl Metrics {
    /// Names and describes every family in the registry that `/metrics` renders.
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "requests",
            "Proxied requests by backend and status class",
            self.requests.clone(),
        );
        r.register(
            "affinity",
            "Affinity outcomes: new, hit, failover",
            self.affinity.clone(),
        );
        r.register("failovers", "Broken pins by reason", self.failovers.clone());
        r.register(
            "backend_up",
            "1 when the backend takes traffic by health",
            self.backend_up.clone(),
        );
        r.register(
            "active_requests",
            "In-flight requests per backend",
            self.active.clone(),
        );
        r.register(
            "parked_connections",
            "Idle HTTP/1 client connections parked: socket kept, no buffers held",
            self.parked.clone(),
        );
        let hb = self.heartbeat_latency.clone();
        r.register("heartbeat_latency_seconds", "Heartbeat round trip", hb);
        let up = self.upstream_latency.clone();
        r.register(
            "upstream_latency_seconds",
            "Time to the upstream response head",
            up,
        );
    }
}

fn observe(family: &Histograms, backend: &str, took: Duration) {
    let labels = BackendLabels {
        backend: backend.to_string(),
    };
    family.get_or_create(&labels).observe(took.as_secs_f64());
}

/// Index of the status class in [`CLASSES`].
fn class(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5) - 1)
}

impl Metrics {
    /// Counts a request by the backend that answered it (`None`: none did), its status and how
    /// the affinity cookie was honoured (one of [`OUTCOMES`]).
    pub fn request(&self, backend: Option<&Backend>, status: u16, affinity: &'static str) {
        crate::allocator::worked();
        match backend {
            Some(b) => self.meters(b).requests[class(status)].inc(),
            None => {
                let labels = RequestLabels {
                    backend: "-".to_string(),
                    class: CLASSES[class(status)],
                };
                self.requests.get_or_create(&labels).inc()
            }
        };
        match OUTCOMES.iter().position(|o| *o == affinity) {
            Some(i) => self.outcomes[i].inc(),
            None => self
                .affinity
                .get_or_create(&OutcomeLabels { outcome: affinity })
                .inc(),
        };
    }

    pub fn upstream_latency(&self, backend: &Backend, took: Duration) {
        self.meters(backend).latency.observe(took.as_secs_f64());
    }

    fn meters<'b>(&self, backend: &'b Backend) -> &'b BackendMeters {
        backend.meters.get_or_init(|| BackendMeters {
            requests: CLASSES.map(|class| {
                let labels = RequestLabels {
                    backend: backend.id.clone(),
                    class,
                };
                self.requests.get_or_create(&labels).clone()
            }),
            latency: {
                let labels = BackendLabels {
                    backend: backend.id.clone(),
                };
                self.upstream_latency.get_or_create(&labels).clone()
            },
        })
    }

    pub fn heartbeat_latency(&self, backend: &str, took: Duration) {
        observe(&self.heartbeat_latency, backend, took);
    }

    /// The gauge of parked connections, for the server to move.
    pub fn parked(&self) -> Gauge {
        self.parked.clone()
    }

    pub fn failover(&self, reason: &'static str) {
        self.failovers.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The text exposition, with backend gauges taken from the current snapshot.
    pub fn encode(&self, routing: &Routing) -> String {
        self.backend_up.clear();
        self.active.clear();
        for m in &routing.members {
            let labels = BackendLabels {
                backend: m.backend.id.clone(),
            };
            self.backend_up
                .get_or_create(&labels)
                .set(i64::from(m.backend.is_up()));
            let active = i64::try_from(m.backend.active()).unwrap_or(i64::MAX);
            self.active.get_or_create(&labels).set(active);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
