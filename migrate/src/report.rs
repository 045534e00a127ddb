//! Counting and telling: what a batch did ([`Tally`]), live progress while a run goes on
//! ([`Progress`]: an indicatif bar on a terminal, a plain line every few seconds otherwise, so
//! logs of unattended runs stay readable), and the summary at the end.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How many example keys a summary lists per run.
pub const EXAMPLES: usize = 10;
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// What happened to the keys of one batch, or of a whole run (tallies add up).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    /// Keys the scan returned.
    pub scanned: u64,
    /// Keys handled: copied, transformed, restored, or found equal by `verify`.
    pub done: u64,
    /// Value bytes moved or compared.
    pub bytes: u64,
    /// Keys left alone on purpose, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Keys that could not be handled (or differ, for `verify`), by reason.
    pub failed: BTreeMap<String, u64>,
    /// Other things worth counting (deleted from the source, copied in chunks, ...).
    #[serde(default)]
    pub notes: BTreeMap<String, u64>,
    /// The first keys that failed, with the reason in full.
    pub examples: Vec<(String, String)>,
}

impl Tally {
    pub fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }

    pub fn note(&mut self, what: &str, n: u64) {
        if n > 0 {
            *self.notes.entry(what.to_string()).or_default() += n;
        }
    }

    /// Counts a failure under `reason` and keeps the key as an example while there is room.
    pub fn fail(&mut self, reason: &str, key: &[u8], detail: impl Into<String>) {
        *self.failed.entry(reason.to_string()).or_default() += 1;
        if self.examples.len() < EXAMPLES {
            self.examples
                .push((crate::redis_io::show_key(key), detail.into()));
        }
    }

    pub fn add(&mut self, other: &Tally) {
        self.scanned += other.scanned;
        self.done += other.done;
        self.bytes += other.bytes;
        for (k, n) in &other.skipped {
            *self.skipped.entry(k.clone()).or_default() += n;
        }
        for (k, n) in &other.failed {
            *self.failed.entry(k.clone()).or_default() += n;
        }
        for (k, n) in &other.notes {
            *self.notes.entry(k.clone()).or_default() += n;
        }
        let room = EXAMPLES.saturating_sub(self.examples.len());
        self.examples
            .extend(other.examples.iter().take(room).cloned());
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    /// The summary printed at the end of a run; `done_as` names what `done` counts, and the
    /// rate is of the `run_keys` this run scanned in `elapsed` (a resumed run's tally also
    /// counts the runs before it).
    pub fn summary(&self, verb: &str, done_as: &str, elapsed: Duration, run_keys: u64) -> String {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let mut out = format!(
            "{verb} summary: {} keys scanned, {} {done_as}, {} skipped, {} failed in {:.1}s ({:.0} keys/s, {})\n",
            self.scanned,
            self.done,
            self.skipped_total(),
            self.failed_total(),
            secs,
            run_keys as f64 / secs,
            human_bytes(self.bytes),
        );
        for (reason, n) in &self.skipped {
            out += &format!("  skipped {n}: {reason}\n");
        }
        for (reason, n) in &self.failed {
            out += &format!("  failed {n}: {reason}\n");
        }
        for (what, n) in &self.notes {
            out += &format!("  {what}: {n}\n");
        }
        if !self.examples.is_empty() {
            out += "  first keys:\n";
            for (key, why) in &self.examples {
                out += &format!("    {key}: {why}\n");
            }
        }
        out
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Live counters of a run, shown while it goes on.
pub struct Progress {
    keys: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    total: Option<u64>,
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// A progress display for `verb`; `total` (a key count, from DBSIZE) gives the ETA.
    /// `quiet` shows nothing (tests, and verbs that finish in a moment).
    pub fn new(verb: &str, total: Option<u64>, quiet: bool) -> Arc<Progress> {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} keys, {msg}, ETA {eta}"
            } else {
                "{prefix} [{elapsed_precise}] {spinner} {pos} keys, {msg}"
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_prefix(verb.to_string());
            bar
        });
        Arc::new(Progress {
            keys: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            total,
            bar,
            quiet,
        })
    }

    /// Counts keys and bytes done; redraws the bar.
    pub fn advance(&self, keys: u64, bytes: u64) {
        let k = self.keys.fetch_add(keys, Relaxed) + keys;
        let b = self.bytes.fetch_add(bytes, Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            let rate = k as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            bar.set_position(k);
            bar.set_message(format!("{rate:.0} keys/s, {}", human_bytes(b)));
        }
    }

    /// Prints a plain progress line every few seconds when there is no terminal; returns when
    /// the run's task drops the returned handle (the caller aborts it).
    pub fn spawn_plain_lines(
        self: &Arc<Self>,
        verb: &'static str,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.quiet || self.bar.is_some() {
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PLAIN_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("{}", me.line(verb));
            }
        }))
    }

    fn line(&self, verb: &str) -> String {
        let keys = self.keys.load(Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = keys as f64 / secs;
        let eta = match self.total {
            Some(total) if rate > 0.0 && total > keys => {
                format!(", ETA {:.0}s", (total - keys) as f64 / rate)
            }
            _ => String::new(),
        };
        let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        format!(
            "{verb}: {keys}{of} keys, {rate:.0} keys/s, {}{eta}",
            human_bytes(self.bytes.load(Relaxed))
        )
    }

    /// Keys done by this run so far.
    pub fn keys(&self) -> u64 {
        self.keys.load(Relaxed)
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_and_keep_few_examples() {
        let mut a = Tally::default();
        for i in 0..15u8 {
            a.fail("value differs", &[b'k', b'0' + i], "x");
        }
        a.skip("exists in destination");
        let mut total = Tally::default();
        total.add(&a);
        total.add(&a);
        assert_eq!(total.failed["value differs"], 30);
        assert_eq!(total.skipped_total(), 2);
        assert_eq!(total.examples.len(), EXAMPLES);
        let text = total.summary("verify", "equal", Duration::from_secs(1), 30);
        assert!(text.contains("failed 30: value differs"), "{text}");
    }

    #[test]
    fn bytes_are_readable() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
