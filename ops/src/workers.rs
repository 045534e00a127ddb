//! The metric families of a worker, read from its `stats` and `status` texts (the
//! `name:value` lines of `twincache_protocol::info`).
//!
//! A worker exposes them about itself, and the orchestrator about every worker it polls
//! (labelled by pair and worker), from the same texts through this one table, so both
//! `/metrics` carry the same names and meanings. Names follow redis_exporter where a Redis
//! metric means the same (keys, memory, hits, misses, evictions, expirations).

use twincache_protocol::info;

use crate::metrics::Scrape;

/// One worker's texts and the labels its samples carry.
pub struct WorkerSample<'a> {
    pub labels: Vec<(&'static str, String)>,
    /// Its `stats` answer, if it answered.
    pub stats: Option<&'a str>,
    /// Its `status` answer, if it answered.
    pub status: Option<&'a str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Text {
    Stats,
    Status,
}

use Kind::*;
use Text::*;

/// Name (counters without `_total`), help, type, which text, and the field in it.
const FAMILIES: &[(&str, &str, Kind, Text, &str)] = &[
    (
        "redis_db_keys",
        "Keys held (tombstones not counted).",
        Gauge,
        Stats,
        "keys",
    ),
    (
        "redis_memory_used_bytes",
        "Memory held by entries: allocations and table slots.",
        Gauge,
        Stats,
        "bytes",
    ),
    (
        "redis_memory_max_bytes",
        "The worker's --max-memory (0: no limit).",
        Gauge,
        Stats,
        "max_memory",
    ),
    (
        "twincache_logical_bytes",
        "Keys and values as clients gave them.",
        Gauge,
        Stats,
        "logical_bytes",
    ),
    (
        "twincache_stored_bytes",
        "Keys and values as stored (compressed, encrypted), without overhead.",
        Gauge,
        Stats,
        "stored_bytes",
    ),
    (
        "twincache_compression_ratio",
        "Logical bytes over stored bytes.",
        Gauge,
        Stats,
        "compression_ratio",
    ),
    (
        "redis_keyspace_hits",
        "Reads that found their key.",
        Counter,
        Stats,
        "hits",
    ),
    (
        "redis_keyspace_misses",
        "Reads that did not find their key.",
        Counter,
        Stats,
        "misses",
    ),
    ("twincache_sets", "Writes stored.", Counter, Stats, "sets"),
    (
        "twincache_stale_writes",
        "Writes ignored because the entry held a newer version.",
        Counter,
        Stats,
        "stale_writes",
    ),
    (
        "redis_expired_keys",
        "Keys removed because their time to live ran out.",
        Counter,
        Stats,
        "expired",
    ),
    (
        "redis_evicted_keys",
        "Keys evicted to stay within --max-memory.",
        Counter,
        Stats,
        "evicted",
    ),
    (
        "twincache_worker_connections",
        "Open connections to the worker (orchestrator links, refilling partners, direct clients).",
        Gauge,
        Stats,
        "connected_clients",
    ),
    (
        "twincache_adapter_writes",
        "Adapter mode: writes made to the destination Redis.",
        Counter,
        Stats,
        "adapter_writes",
    ),
    (
        "twincache_adapter_passthrough",
        "Adapter mode: commands passed through to the destination Redis.",
        Counter,
        Stats,
        "adapter_passthrough",
    ),
    (
        "twincache_adapter_deleted_from_source",
        "Adapter mode: keys deleted from the source Redis once copied.",
        Counter,
        Stats,
        "adapter_deleted_from_source",
    ),
    (
        "twincache_adapter_errors",
        "Adapter mode: Redis requests that failed.",
        Counter,
        Stats,
        "adapter_errors",
    ),
    (
        "twincache_synced",
        "1 if the worker holds its pair's data (refilled or adopted), else 0.",
        Gauge,
        Status,
        "synced",
    ),
    (
        "twincache_writes_taken_alone",
        "Writes this worker took that its partner did not get (since start).",
        Counter,
        Status,
        "solo",
    ),
    (
        "twincache_worker_resyncs_started",
        "Refills from the partner started on this worker.",
        Counter,
        Status,
        "resyncs_started",
    ),
    (
        "twincache_worker_resyncs_completed",
        "Refills from the partner completed on this worker.",
        Counter,
        Status,
        "resyncs_completed",
    ),
    (
        "twincache_worker_resyncs_failed",
        "Refills from the partner that failed on this worker.",
        Counter,
        Status,
        "resyncs_failed",
    ),
    (
        "twincache_resync_received_bytes",
        "Stored bytes received from the partner in refills.",
        Counter,
        Status,
        "resync_received_bytes",
    ),
    (
        "twincache_resync_sent_bytes",
        "Stored bytes sent to a refilling partner.",
        Counter,
        Status,
        "resync_sent_bytes",
    ),
    (
        "twincache_resync_entries_done",
        "Entries received so far by the running (or last) refill.",
        Gauge,
        Status,
        "resync_entries_done",
    ),
    (
        "twincache_resync_entries_expected",
        "Entries the partner announced for the running (or last) refill.",
        Gauge,
        Status,
        "resync_entries_expected",
    ),
];

/// The adapter's reads by the tier that answered them: stats field and `tier` label.
const ADAPTER_TIERS: &[(&str, &str)] = &[
    ("adapter_cache_hits", "cache"),
    ("adapter_destination_hits", "destination"),
    ("adapter_copied_from_source", "source"),
    ("adapter_not_found", "not_found"),
];

/// Writes every worker family for `workers`; a worker that did not answer, or a field it
/// does not report (adapter counters outside adapter mode), has no sample.
pub fn write_families(s: &mut Scrape, workers: &[WorkerSample]) -> std::fmt::Result {
    for &(name, help, kind, text, field) in FAMILIES {
        let values = workers.iter().filter_map(|w| {
            let text = match text {
                Stats => w.stats?,
                Status => w.status?,
            };
            let v: f64 = info::get(text, field)?.parse().ok()?;
            Some((w.labels.clone(), v))
        });
        match kind {
            Gauge => s.gauges(name, help, values)?,
            Counter => s.counters(name, help, values.map(|(l, v)| (l, v as u64)))?,
        }
    }
    let tiers = workers.iter().flat_map(|w| {
        ADAPTER_TIERS.iter().filter_map(|&(field, tier)| {
            let v: u64 = info::get(w.stats?, field)?.parse().ok()?;
            let mut labels = w.labels.clone();
            labels.push(("tier", tier.to_string()));
            Some((labels, v))
        })
    });
    s.counters(
        "twincache_adapter_reads",
        "Adapter mode: reads by the tier that answered them (cache, destination, source \
         copied to the destination, not found anywhere).",
        tiers,
    )?;
    let running = workers.iter().filter_map(|w| {
        let phase = info::get(w.status?, "resync")?;
        Some((w.labels.clone(), f64::from(u8::from(phase == "running"))))
    });
    s.gauges(
        "twincache_resync_running",
        "1 while the worker refills from its partner.",
        running,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::render;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::DescriptorEncoder;

    #[derive(Debug)]
    struct One;

    impl Collector for One {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            let w = WorkerSample {
                labels: vec![("pair", "0".into()), ("worker", "a:1".into())],
                stats: Some(
                    "keys:3\r\nhits:7\r\ncompression_ratio:2.50\r\nadapter_not_found:4\r\n",
                ),
                status: Some("synced:1\r\nresync:running\r\n"),
            };
            let down = WorkerSample {
                labels: vec![("pair", "0".into()), ("worker", "b:1".into())],
                stats: None,
                status: None,
            };
            write_families(&mut Scrape::new(&mut enc), &[w, down])
        }
    }

    #[test]
    fn families_from_info_texts() {
        let text = render(One);
        for line in [
            "redis_db_keys{pair=\"0\",worker=\"a:1\"} 3",
            "redis_keyspace_hits_total{pair=\"0\",worker=\"a:1\"} 7",
            "twincache_compression_ratio{pair=\"0\",worker=\"a:1\"} 2.5",
            "twincache_adapter_reads_total{pair=\"0\",worker=\"a:1\",tier=\"not_found\"} 4",
            "twincache_synced{pair=\"0\",worker=\"a:1\"} 1",
            "twincache_resync_running{pair=\"0\",worker=\"a:1\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("b:1"),
            "a worker that did not answer has no samples"
        );
    }
}
