//! Prometheus metrics (api.md, "Metrics"), served as OpenMetrics text on
//! the control socket and on `--metrics-listen`: requests by route, method
//! and status; bytes read, written and zeroed through NBD; transfers in
//! flight; tickets by state; NBD request latency and errors; restarts of
//! owned NBD servers by image; failed TLS handshakes; the build; and the
//! process's CPU time, memory and open files (read from `/proc` at each
//! scrape). Labels hold route patterns, never a path of the data API:
//! ticket ids are credentials. One registry per process, updated where
//! things happen.

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

/// Labels of a restart counter: the image file its daemon serves.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabels {
    image: String,
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
    nbd_restarts: Family<ImageLabels, Counter>,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    cpu_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
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
            nbd_restarts: Family::default(),
            tls_handshake_failures: Counter::default(),
            cpu_seconds: Gauge::default(),
            resident_bytes: Gauge::default(),
            open_fds: Gauge::default(),
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
        registry.register("nbd_server_restarts", "Owned NBD servers started again after dying, by image", metrics.nbd_restarts.clone());
        registry.register("tls_handshake_failures", "TLS handshakes that failed or timed out", metrics.tls_handshake_failures.clone());
        let build = prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        registry.register("build", "The running build", build);
        registry.register("process_cpu_seconds", "CPU time of the process (user and system), in seconds", metrics.cpu_seconds.clone());
        registry.register("process_resident_memory_bytes", "Resident memory of the process", metrics.resident_bytes.clone());
        registry.register("process_open_fds", "Open file descriptors of the process", metrics.open_fds.clone());
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

    /// Counts a restart of the daemon that serves `image`.
    pub fn count_restart(&self, image: &str) {
        self.nbd_restarts.get_or_create(&ImageLabels { image: image.to_string() }).inc();
    }

    /// Reads the process's CPU time, memory and open files from `/proc`.
    fn sample_process(&self) {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command's closing parenthesis; utime and
            // stime are the 12th and 13th, rss (pages) the 22nd.
            let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
            let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
            let field = |index: usize| fields.get(index).and_then(|value| value.parse::<u64>().ok()).unwrap_or(0);
            self.cpu_seconds.set((field(11) + field(12)) as f64 / ticks);
            let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
            self.resident_bytes.set(i64::try_from(field(21).saturating_mul(page)).unwrap_or(i64::MAX));
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(i64::try_from(entries.count()).unwrap_or(i64::MAX));
        }
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
    metrics.sample_process();
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
