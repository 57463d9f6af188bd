//! Request metrics in the Prometheus text format, kept by hand: a counter of requests by
//! method, route template and status, and a latency histogram by method and route. The
//! number of objects per kind is read from the database at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 11] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The label for requests that matched no route, so that probing random paths cannot grow
/// the number of series without bound.
const UNMATCHED: &str = "unmatched";

#[derive(Debug, Default)]
struct Histogram {
    /// Counts per bucket of [`BUCKETS`] (not cumulative; summed when rendered).
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

#[derive(Debug, Default)]
struct Series {
    /// (method, route, status) → requests.
    requests: BTreeMap<(String, String, u16), u64>,
    /// (method, route) → latency.
    latency: BTreeMap<(String, String), Histogram>,
}

/// The request metrics of one server process.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<Series>,
    hub: Mutex<HubSeries>,
}

/// Counters of the WebSocket hub, by fixed reason labels.
#[derive(Debug, Default)]
struct HubSeries {
    sessions_started: u64,
    /// reason → sessions that ended for it.
    sessions_ended: BTreeMap<&'static str, u64>,
    frames_received: u64,
    /// reason → frames answered with an error frame.
    frames_rejected: BTreeMap<&'static str, u64>,
    /// code → `error` frames agents sent.
    agent_errors: BTreeMap<&'static str, u64>,
    updates_sent: u64,
}

impl Metrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        // A poisoned lock means a panic while counting; the counts are still usable.
        let mut series = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *series.requests.entry((method.to_owned(), route.to_owned(), status)).or_default() += 1;
        let histogram = series.latency.entry((method.to_owned(), route.to_owned())).or_default();
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            histogram.buckets[bucket] += 1;
        }
        histogram.count += 1;
        histogram.sum_seconds += seconds;
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, HubSeries> {
        self.hub.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn session_started(&self) {
        self.hub().sessions_started += 1;
    }

    pub fn session_ended(&self, reason: &'static str) {
        *self.hub().sessions_ended.entry(reason).or_default() += 1;
    }

    pub fn frame_received(&self) {
        self.hub().frames_received += 1;
    }

    /// A frame that was answered with an error frame, by a fixed reason.
    pub fn frame_rejected(&self, reason: &'static str) {
        *self.hub().frames_rejected.entry(reason).or_default() += 1;
    }

    /// An `error` frame an agent sent (a frame of ours it could not handle), by its code.
    pub fn agent_error(&self, code: &'static str) {
        *self.hub().agent_errors.entry(code).or_default() += 1;
    }

    pub fn update_sent(&self) {
        self.hub().updates_sent += 1;
    }

    /// The hub's metrics as Prometheus text, with the number of connected agents.
    pub fn render_hub(&self, connected_agents: usize) -> String {
        let hub = self.hub();
        let mut out = String::new();
        out.push_str("# HELP edgible_hub_connected_agents Agents with an open session.\n");
        out.push_str("# TYPE edgible_hub_connected_agents gauge\n");
        let _ = writeln!(out, "edgible_hub_connected_agents {connected_agents}");
        out.push_str("# HELP edgible_hub_sessions_started_total Agent sessions that passed hello.\n");
        out.push_str("# TYPE edgible_hub_sessions_started_total counter\n");
        let _ = writeln!(out, "edgible_hub_sessions_started_total {}", hub.sessions_started);
        out.push_str("# HELP edgible_hub_sessions_ended_total Agent sessions that ended, by reason.\n");
        out.push_str("# TYPE edgible_hub_sessions_ended_total counter\n");
        for (reason, count) in &hub.sessions_ended {
            let _ = writeln!(out, "edgible_hub_sessions_ended_total{{reason=\"{reason}\"}} {count}");
        }
        out.push_str("# HELP edgible_hub_frames_received_total Text frames received from agents.\n");
        out.push_str("# TYPE edgible_hub_frames_received_total counter\n");
        let _ = writeln!(out, "edgible_hub_frames_received_total {}", hub.frames_received);
        out.push_str("# HELP edgible_hub_frames_rejected_total Frames answered with an error frame, by reason.\n");
        out.push_str("# TYPE edgible_hub_frames_rejected_total counter\n");
        for (reason, count) in &hub.frames_rejected {
            let _ = writeln!(out, "edgible_hub_frames_rejected_total{{reason=\"{reason}\"}} {count}");
        }
        out.push_str("# HELP edgible_hub_agent_errors_total Error frames agents sent, by code.\n");
        out.push_str("# TYPE edgible_hub_agent_errors_total counter\n");
        for (code, count) in &hub.agent_errors {
            let _ = writeln!(out, "edgible_hub_agent_errors_total{{code=\"{code}\"}} {count}");
        }
        out.push_str("# HELP edgible_hub_updates_sent_total Desired-state updates sent to agents.\n");
        out.push_str("# TYPE edgible_hub_updates_sent_total counter\n");
        let _ = writeln!(out, "edgible_hub_updates_sent_total {}", hub.updates_sent);
        out
    }

    /// The edge hub's metrics as Prometheus text: the number of connected edges.
    pub fn render_edge_hub(&self, connected_edges: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP edgible_hub_connected_edges Edges with an open session.\n");
        out.push_str("# TYPE edgible_hub_connected_edges gauge\n");
        let _ = writeln!(out, "edgible_hub_connected_edges {connected_edges}");
        out
    }

    /// The metrics as Prometheus text, with the given object counts as gauges.
    pub fn render(&self, objects: &[(&'static str, u64)]) -> String {
        let series = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        out.push_str("# HELP edgible_http_requests_total HTTP requests handled, by method, route and status.\n");
        out.push_str("# TYPE edgible_http_requests_total counter\n");
        for ((method, route, status), count) in &series.requests {
            let _ = writeln!(
                out,
                "edgible_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {count}",
                escape(method),
                escape(route)
            );
        }
        out.push_str("# HELP edgible_http_request_duration_seconds Time to answer HTTP requests.\n");
        out.push_str("# TYPE edgible_http_request_duration_seconds histogram\n");
        for ((method, route), histogram) in &series.latency {
            let labels = format!("method=\"{}\",route=\"{}\"", escape(method), escape(route));
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(histogram.buckets) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "edgible_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "edgible_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(out, "edgible_http_request_duration_seconds_sum{{{labels}}} {}", histogram.sum_seconds);
            let _ = writeln!(out, "edgible_http_request_duration_seconds_count{{{labels}}} {}", histogram.count);
        }
        out.push_str("# HELP edgible_objects Objects stored, by kind.\n");
        out.push_str("# TYPE edgible_objects gauge\n");
        for (kind, count) in objects {
            let _ = writeln!(out, "edgible_objects{{kind=\"{kind}\"}} {count}");
        }
        out
    }
}

/// Escapes a label value per the text format.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Middleware that times every request and counts it under its route template.
pub async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or(UNMATCHED, MatchedPath::as_str).to_owned();
    let response = next.run(request).await;
    state.metrics.observe(&method, &route, response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let metrics = Metrics::default();
        metrics.observe("GET", "/v1/devices/{id}", 200, Duration::from_millis(3));
        metrics.observe("GET", "/v1/devices/{id}", 200, Duration::from_secs(10));
        metrics.observe("GET", "/v1/devices/{id}", 404, Duration::from_millis(1));
        let text = metrics.render(&[("devices", 2)]);
        assert!(
            text.contains("edgible_http_requests_total{method=\"GET\",route=\"/v1/devices/{id}\",status=\"200\"} 2")
        );
        assert!(
            text.contains("edgible_http_requests_total{method=\"GET\",route=\"/v1/devices/{id}\",status=\"404\"} 1")
        );
        assert!(text.contains("_bucket{method=\"GET\",route=\"/v1/devices/{id}\",le=\"0.005\"} 2"));
        assert!(text.contains("_bucket{method=\"GET\",route=\"/v1/devices/{id}\",le=\"+Inf\"} 3"));
        assert!(text.contains("edgible_objects{kind=\"devices\"} 2"));
    }

    #[test]
    fn hub_counters_render_by_reason() {
        let metrics = Metrics::default();
        metrics.frame_rejected("malformed");
        metrics.frame_rejected("malformed");
        metrics.session_ended("replaced");
        metrics.agent_error("malformed");
        let text = metrics.render_hub(3);
        assert!(text.contains("edgible_hub_connected_agents 3"));
        assert!(text.contains("edgible_hub_frames_rejected_total{reason=\"malformed\"} 2"));
        assert!(text.contains("edgible_hub_sessions_ended_total{reason=\"replaced\"} 1"));
        assert!(text.contains("edgible_hub_agent_errors_total{code=\"malformed\"} 1"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
