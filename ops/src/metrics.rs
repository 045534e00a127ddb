//! Metric storage that costs the hot path next to nothing, and its exposition through
//! `prometheus-client`.
//!
//! The request path only ever does relaxed atomic adds into fixed arrays: no lock, no
//! allocation, no label lookup. Labels, names and help texts exist only at scrape time, when
//! a [`Collector`] walks the arrays and writes them through [`Scrape`], which wraps the
//! official client crate's encoder (OpenMetrics text, which Prometheus and `promtool` read).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What `/metrics` answers with: the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency buckets, in nanoseconds: 50 µs to 2.5 s. A cache answers in
/// well under a millisecond; the upper buckets show failovers (`--worker-timeout`) and
/// stalls.
pub const LATENCY_BOUNDS_NS: [u64; 15] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// Buckets of a [`Latency`]: the bounds above and `+Inf`.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// A latency histogram as plain atomics: recording is one bucket add and one sum add.
#[derive(Debug)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Latency {
    /// Records one observation of `ns` nanoseconds.
    #[inline]
    pub fn record(&self, ns: u64) {
        // A handful of compares on a small sorted array: cheaper than anything cleverer.
        let i = LATENCY_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// The observations so far: sum in seconds, count, and per-bucket counts (not
    /// cumulative) with their upper bounds in seconds, `f64::MAX` for `+Inf`, as
    /// `prometheus-client` takes them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let n = b.load(Relaxed);
                count += n;
                let bound = LATENCY_BOUNDS_NS
                    .get(i)
                    .map_or(f64::MAX, |&ns| ns as f64 / 1e9);
                (bound, n)
            })
            .collect();
        (self.sum_ns.load(Relaxed) as f64 / 1e9, count, buckets)
    }

    /// Adds another histogram's counts to this one's snapshot (for sharded histograms).
    pub fn merge_into(&self, into: &mut (f64, u64, Vec<(f64, u64)>)) {
        let (sum, count, buckets) = self.snapshot();
        into.0 += sum;
        into.1 += count;
        if into.2.is_empty() {
            into.2 = buckets;
        } else {
            for (a, b) in into.2.iter_mut().zip(buckets) {
                a.1 += b.1;
            }
        }
    }
}

/// Labels as `(name, value)` pairs.
pub type Labels<'a> = Vec<(&'static str, std::borrow::Cow<'a, str>)>;

/// Writes metric families during a scrape. Each call writes one family (HELP, TYPE and its
/// samples); counter names are given without `_total`, which the encoder appends.
pub struct Scrape<'a, 'b> {
    enc: &'b mut DescriptorEncoder<'a>,
}

type NoExemplar = Exemplar<NoLabelSet, u64>;

impl<'a, 'b> Scrape<'a, 'b> {
    pub fn new(enc: &'b mut DescriptorEncoder<'a>) -> Self {
        Scrape { enc }
    }

    /// A counter family: one sample per label set.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&v, None::<&NoExemplar>)?;
        }
        Ok(())
    }

    /// One unlabelled counter.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        self.enc
            .encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, u64, u64>(&v, None::<&NoExemplar>)
    }

    /// A gauge family: one sample per label set.
    pub fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            m.encode_family(&labels)?.encode_gauge(&v)?;
        }
        Ok(())
    }

    /// One unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        self.enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&v)
    }

    /// A histogram family: one histogram per label set, from [`Latency::snapshot`].
    pub fn histograms<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, (f64, u64, Vec<(f64, u64)>))>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, (sum, count, buckets)) in samples {
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// The classic Prometheus text format (0.0.4), for clients that do not ask for
/// OpenMetrics (`curl`, `promtool check metrics`).
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics (Prometheus' scrapes do).
pub fn wants_open_metrics(accept: &str) -> bool {
    accept.contains("application/openmetrics-text")
}

/// Turns OpenMetrics text into the classic text format: the two differ, for what this
/// crate writes, only in the family name of counters (OpenMetrics names the family `x` and
/// its sample `x_total`; the classic format names both `x_total`), in `# UNIT` lines, and in
/// the closing `# EOF`.
pub fn to_classic_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len() + 1024);
    let mut counters = std::collections::HashSet::new();
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_string());
            }
        }
    }
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        if let Some(prefix) = meta {
            let rest = &line[prefix.len()..];
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Renders `collector` as the text `/metrics` answers with.
pub fn render(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail; a collector's own error would be a bug, and an
    // empty answer is better than a panic in a server.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_and_sum() {
        let h = Latency::default();
        h.record(10_000); // 10 µs: first bucket
        h.record(50_000); // on the bound: first bucket
        h.record(3_000_000); // 3 ms: the 5 ms bucket
        h.record(10_000_000_000); // 10 s: +Inf
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 10.00306).abs() < 1e-9);
        assert_eq!(buckets[0], (0.00005, 2));
        assert_eq!(buckets[6], (0.005, 1));
        assert_eq!(buckets[LATENCY_BUCKETS - 1], (f64::MAX, 1));
    }

    #[derive(Debug)]
    struct Sample;

    impl Collector for Sample {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            let mut s = Scrape::new(&mut enc);
            s.counter("demo_requests", "Requests.", 3)?;
            s.gauges(
                "demo_state",
                "State.",
                [(vec![("state", "up")], 1.0), (vec![("state", "down")], 0.0)],
            )?;
            let h = Latency::default();
            h.record(1_000);
            s.histograms(
                "demo_duration_seconds",
                "Latency.",
                [(vec![("cmd", "get")], h.snapshot())],
            )
        }
    }

    #[test]
    fn renders_open_metrics_text() {
        let text = render(Sample);
        assert!(text.contains("# TYPE demo_requests counter\n"), "{text}");
        assert!(text.contains("demo_requests_total 3\n"), "{text}");
        assert!(text.contains("demo_state{state=\"down\"} 0"), "{text}");
        assert!(
            text.contains("demo_duration_seconds_bucket{le=\"0.00005\",cmd=\"get\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let classic = to_classic_text(&text);
        assert!(
            classic.contains("# HELP demo_requests_total Requests.\n# TYPE demo_requests_total counter\ndemo_requests_total 3\n"),
            "{classic}"
        );
        assert!(classic.contains("# TYPE demo_state gauge\n"), "{classic}");
        assert!(!classic.contains("# EOF"), "{classic}");
    }
}
