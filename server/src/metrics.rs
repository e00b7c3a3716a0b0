//! Prometheus metrics (api.md, "Metrics"), served as OpenMetrics text on
//! the control socket and on `--metrics-listen`: requests by route, method
//! and status; bytes read, written and zeroed through NBD; transfers in
//! flight; tickets by state; NBD request latency and errors; restarts of
//! owned NBD servers. Labels hold route patterns, never a path: ticket ids
//! are credentials. One registry per process, updated where things happen.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route pattern, such as `/images/{ticket}`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: String,
}

/// Labels of the ticket gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Bytes read from NBD exports.
    pub read_bytes: Counter,
    /// Bytes written to NBD exports.
    pub written_bytes: Counter,
    /// Bytes zeroed on NBD exports (WRITE_ZEROES).
    pub zeroed_bytes: Counter,
    /// Requests holding a ticket's reader or writer slot.
    pub transfers: Gauge,
    tickets: Family<StateLabels, Gauge>,
    nbd_latency: Histogram,
    /// NBD commands that failed or timed out.
    pub nbd_errors: Counter,
    /// Owned NBD servers started again after dying.
    pub nbd_restarts: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("blockgate"),
            requests: Family::default(),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            zeroed_bytes: Counter::default(),
            transfers: Gauge::default(),
            tickets: Family::default(),
            // 50 µs to about 13 s.
            nbd_latency: Histogram::new(exponential_buckets(0.000_05, 4.0, 10)),
            nbd_errors: Counter::default(),
            nbd_restarts: Counter::default(),
        };
        // The registry holds handles to the same values as the fields.
        let registry = &mut metrics.registry;
        registry.register("http_requests", "HTTP requests by route pattern, method and status", metrics.requests.clone());
        registry.register("read_bytes", "Bytes read from NBD exports", metrics.read_bytes.clone());
        registry.register("written_bytes", "Bytes written to NBD exports", metrics.written_bytes.clone());
        registry.register("zeroed_bytes", "Bytes zeroed on NBD exports without sending data", metrics.zeroed_bytes.clone());
        registry.register("transfers_in_flight", "Requests holding a ticket's reader or writer slot", metrics.transfers.clone());
        registry.register("tickets", "Tickets by state (active: a request runs on it)", metrics.tickets.clone());
        registry.register("nbd_request_duration_seconds", "NBD command latency", metrics.nbd_latency.clone());
        registry.register("nbd_errors", "NBD commands that failed or timed out", metrics.nbd_errors.clone());
        registry.register("nbd_server_restarts", "Owned NBD servers started again after dying", metrics.nbd_restarts.clone());
        metrics
    }

    /// Counts a request that got its response. Methods outside HTTP's
    /// usual few count as `other`: a client must not be able to grow the
    /// series without end by inventing methods.
    pub fn count_request(&self, route: &str, method: &str, status: u16) {
        const KNOWN: [&str; 7] = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"];
        let method = if KNOWN.contains(&method) { method } else { "other" };
        let labels = RequestLabels { route: route.to_string(), method: method.to_string(), status: status.to_string() };
        self.requests.get_or_create(&labels).inc();
    }

    /// Records one NBD command's latency, and whether it failed.
    pub fn observe_nbd(&self, took: Duration, failed: bool) {
        self.nbd_latency.observe(took.as_secs_f64());
        if failed {
            self.nbd_errors.inc();
        }
    }
}

/// The metrics as OpenMetrics text, with the ticket gauge set to
/// `active` and `idle` first.
pub fn render(active: i64, idle: i64) -> String {
    let metrics = metrics();
    metrics.tickets.get_or_create(&StateLabels { state: "active" }).set(active);
    metrics.tickets.get_or_create(&StateLabels { state: "idle" }).set(idle);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_series() {
        for method in ["BREW", "PROPFIND", "X-1", "X-2"] {
            metrics().count_request("/info/", method, 405);
        }
        metrics().count_request("/info/", "GET", 200);
        let text = render(0, 0);
        assert!(text.contains(r#"blockgate_http_requests_total{route="/info/",method="other",status="405"} 4"#), "{text}");
        assert!(!text.contains("BREW") && !text.contains("X-1"), "{text}");
    }
}
