//! The server's counters in Prometheus' text exposition format (`GET /metrics`): requests by
//! route and status, latency histograms by route, queue depth, notes coded, tokens generated,
//! model load times.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Latency bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    pub queue_depth: AtomicI64,
    pub notes_coded: AtomicU64,
    pub tokens_generated: AtomicU64,
    load_seconds: Mutex<BTreeMap<&'static str, f64>>,
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut latency) = self.latency.lock() {
            let h = latency.entry(route.to_string()).or_default();
            // Cumulative buckets are summed at render time; each observation counts once.
            if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
                h.counts[i] += 1;
            }
            h.count += 1;
            h.sum += seconds;
        }
    }

    pub fn record_load(&self, what: &'static str, seconds: f64) {
        if let Ok(mut loads) = self.load_seconds.lock() {
            loads.insert(what, seconds);
        }
    }

    /// Prometheus text format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out += "# HELP medcoder_http_requests_total HTTP requests answered, by route and status.\n";
        out += "# TYPE medcoder_http_requests_total counter\n";
        if let Ok(requests) = self.requests.lock() {
            for ((route, status), n) in requests.iter() {
                let _ = writeln!(
                    out,
                    "medcoder_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                    escape(route)
                );
            }
        }
        out += "# HELP medcoder_http_request_duration_seconds Time to answer, by route.\n";
        out += "# TYPE medcoder_http_request_duration_seconds histogram\n";
        if let Ok(latency) = self.latency.lock() {
            for (route, h) in latency.iter() {
                let route = escape(route);
                let mut cumulative = 0;
                for (bound, n) in BUCKETS.iter().zip(h.counts) {
                    cumulative += n;
                    let _ = writeln!(
                        out,
                        "medcoder_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(
                    out,
                    "medcoder_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\nmedcoder_http_request_duration_seconds_sum{{route=\"{route}\"}} {}\nmedcoder_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    h.count, h.sum, h.count
                );
            }
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "medcoder_queue_depth",
            "gauge",
            "Requests waiting for an engine.",
            self.queue_depth.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "medcoder_notes_coded_total",
            "counter",
            "Notes the coding engine answered.",
            self.notes_coded.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "medcoder_tokens_generated_total",
            "counter",
            "Tokens generated for chat completions.",
            self.tokens_generated.load(Ordering::Relaxed).to_string(),
        );
        out += "# HELP medcoder_model_load_seconds Seconds taken to load each engine at start.\n";
        out += "# TYPE medcoder_model_load_seconds gauge\n";
        if let Ok(loads) = self.load_seconds.lock() {
            for (what, seconds) in loads.iter() {
                let _ = writeln!(
                    out,
                    "medcoder_model_load_seconds{{what=\"{what}\"}} {seconds}"
                );
            }
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counts_by_status() {
        let m = Metrics::default();
        m.record_request("/v1/code", 200, 0.004);
        m.record_request("/v1/code", 200, 0.2);
        m.record_request("/v1/code", 422, 0.0005);
        let text = m.render();
        assert!(text.contains("medcoder_http_requests_total{route=\"/v1/code\",status=\"200\"} 2"));
        assert!(text.contains("medcoder_http_requests_total{route=\"/v1/code\",status=\"422\"} 1"));
        assert!(text.contains("le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("le=\"0.25\"} 3\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 3\n"), "{text}");
    }
}
