//! Counters and histograms in the Prometheus text format, served on their own address
//! (`metrics_listen`), away from the public account paths.
//!
//! - `wxgate_pushes_total{account,kind,outcome}`: handled, retry_joined, duplicate,
//!   dead_letter;
//! - `wxgate_rejected_total{account,reason}`: refused requests by reason;
//! - `wxgate_reply_seconds{account}`: from arrival to answer, a histogram whose top
//!   buckets sit at the reply budget and WeChat's 5 s deadline;
//! - `wxgate_store_*`: commits, failures, records, largest batch, mean commit time, queue;
//! - `wxgate_dedup_memory_entries`: keys held in memory;
//! - `wxgate_nats_publishes_total{account,via,outcome}`: publishes to NATS by the outbox
//!   (`background`) or before the reply, and what came of them: published, duplicate
//!   (JetStream had it already), not_connected, timed_out, failed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::Store;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 4.0, 5.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

#[derive(Default)]
struct Inner {
    pushes: BTreeMap<(String, &'static str, &'static str), u64>,
    rejected: BTreeMap<(String, &'static str), u64>,
    latency: BTreeMap<String, Histogram>,
    publishes: BTreeMap<(String, &'static str, &'static str), u64>,
}

/// The server's metrics; shared by every account.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// Counts an answered push and its latency.
    pub fn push(
        &self,
        account: &str,
        kind: &'static str,
        outcome: &'static str,
        latency: Duration,
    ) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.pushes.entry((account.to_owned(), kind, outcome)).or_default() += 1;
        m.latency.entry(account.to_owned()).or_default().observe(latency.as_secs_f64());
    }

    /// Counts a refused request.
    pub fn rejected(&self, account: &str, reason: &'static str) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.rejected.entry((account.to_owned(), reason)).or_default() += 1;
    }

    /// Counts a publish to NATS and its outcome.
    pub fn published(&self, account: &str, via: &'static str, outcome: &'static str) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.publishes.entry((account.to_owned(), via, outcome)).or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, store: &Store, dedup_entries: usize) -> String {
        // Read the store before taking the lock that every push needs.
        let (pending, dead, oldest_ms) =
            crate::store::outbox_depth(store.location(), crate::http::unix_ms())
                .unwrap_or_default();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP wxgate_pushes_total Authentic pushes answered, by kind and dedup outcome."
        );
        let _ = writeln!(out, "# TYPE wxgate_pushes_total counter");
        for ((account, kind, outcome), n) in &m.pushes {
            let _ = writeln!(
                out,
                "wxgate_pushes_total{{account=\"{account}\",kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP wxgate_rejected_total Requests refused, by reason.");
        let _ = writeln!(out, "# TYPE wxgate_rejected_total counter");
        for ((account, reason), n) in &m.rejected {
            let _ = writeln!(
                out,
                "wxgate_rejected_total{{account=\"{account}\",reason=\"{reason}\"}} {n}"
            );
        }
        let _ =
            writeln!(out, "# HELP wxgate_reply_seconds Time from a push's arrival to its answer.");
        let _ = writeln!(out, "# TYPE wxgate_reply_seconds histogram");
        for (account, h) in &m.latency {
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "wxgate_reply_seconds_bucket{{account=\"{account}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "wxgate_reply_seconds_bucket{{account=\"{account}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "wxgate_reply_seconds_sum{{account=\"{account}\"}} {}", h.sum);
            let _ =
                writeln!(out, "wxgate_reply_seconds_count{{account=\"{account}\"}} {}", h.count);
        }
        if !m.publishes.is_empty() {
            let _ = writeln!(
                out,
                "# HELP wxgate_nats_publishes_total Publishes to NATS JetStream, by who published and outcome."
            );
            let _ = writeln!(out, "# TYPE wxgate_nats_publishes_total counter");
        }
        for ((account, via, outcome), n) in &m.publishes {
            let _ = writeln!(
                out,
                "wxgate_nats_publishes_total{{account=\"{account}\",via=\"{via}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let s = store.stats();
        let mean = if s.commits == 0 {
            0.0
        } else {
            s.total_commit_micros as f64 / s.commits as f64 / 1e6
        };
        for (name, kind, help, value) in [
            (
                "wxgate_store_commits_total",
                "counter",
                "Store transactions committed.",
                s.commits as f64,
            ),
            (
                "wxgate_store_commit_failures_total",
                "counter",
                "Store transactions that failed.",
                s.failures as f64,
            ),
            (
                "wxgate_store_records_total",
                "counter",
                "Pushes recorded, all batches together.",
                s.records as f64,
            ),
            (
                "wxgate_store_largest_batch",
                "gauge",
                "Most pushes recorded in one transaction.",
                s.largest_batch as f64,
            ),
            (
                "wxgate_store_mean_commit_seconds",
                "gauge",
                "Mean time of one commit, fsync included.",
                mean,
            ),
            (
                "wxgate_store_queued",
                "gauge",
                "Requests waiting for the store writer.",
                store.queued() as f64,
            ),
            (
                "wxgate_store_healthy",
                "gauge",
                "1 when the last commit succeeded.",
                if store.healthy() { 1.0 } else { 0.0 },
            ),
            (
                "wxgate_dedup_memory_entries",
                "gauge",
                "Push keys held in memory for recognising retries.",
                dedup_entries as f64,
            ),
            ("wxgate_outbox_pending", "gauge", "Background deliveries waiting.", pending as f64),
            (
                "wxgate_outbox_dead",
                "gauge",
                "Background deliveries parked after too many failures.",
                dead as f64,
            ),
            (
                "wxgate_outbox_oldest_seconds",
                "gauge",
                "Age of the oldest waiting background delivery.",
                oldest_ms as f64 / 1000.0,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

/// A sample's labels, as name/value pairs.
pub type Labels<'a> = Vec<(&'a str, &'a str)>;

/// One sample line of a Prometheus exposition: name, labels, value.
pub fn parse_sample(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => {
            let labels = rest
                .trim_end_matches('}')
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k, v.trim_end_matches('"')))
                .collect();
            (name, labels)
        }
        None => (series, Vec::new()),
    };
    Some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_what_it_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = Metrics::default();
        m.push("demo", "text_message", "handled", Duration::from_millis(3));
        m.push("demo", "text_message", "handled", Duration::from_millis(30));
        m.rejected("demo", "bad_signature");
        m.published("demo", "background", "published");
        m.published("demo", "background", "duplicate");
        let text = m.render(&store, 2);
        let samples: Vec<_> = text.lines().filter_map(parse_sample).collect();
        let find = |name: &str, label: Option<(&str, &str)>| {
            samples
                .iter()
                .find(|(n, l, _)| *n == name && label.is_none_or(|kv| l.contains(&kv)))
                .map(|s| s.2)
        };
        assert_eq!(find("wxgate_pushes_total", Some(("outcome", "handled"))), Some(2.0));
        assert_eq!(find("wxgate_rejected_total", Some(("reason", "bad_signature"))), Some(1.0));
        assert_eq!(find("wxgate_reply_seconds_bucket", Some(("le", "0.005"))), Some(1.0));
        assert_eq!(find("wxgate_reply_seconds_count", None), Some(2.0));
        assert_eq!(find("wxgate_dedup_memory_entries", None), Some(2.0));
        assert_eq!(find("wxgate_store_healthy", None), Some(1.0));
        assert_eq!(find("wxgate_nats_publishes_total", Some(("outcome", "duplicate"))), Some(1.0));
    }
}
