//! Load mode: simulated followers sending distinct pushes at a target rate for a bounded
//! time, every reply judged, then a summary. For peak throughput use a lean tool (wrk,
//! see `bench/`); this is for realistic end-to-end runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, Semaphore};

use super::delivery::{Rules, deliver_with};
use super::kinds::Kind;
use super::scenario::{fresh_openid, random_msg_id};
use super::{Account, Http, Mode, Seen};

/// What to send.
#[derive(Debug, Clone)]
pub struct Options {
    pub followers: usize,
    /// Pushes per second.
    pub rate: f64,
    pub duration: Duration,
    /// Most deliveries in flight at once.
    pub concurrency: usize,
    /// Share of pushes delivered a second time, as WeChat's retries (0 = all distinct).
    pub retry_ratio: f64,
    pub rules: Rules,
}

/// Counters shown while the load runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub pushes: AtomicU64,
    pub replies: AtomicU64,
    pub nothing: AtomicU64,
    pub errors: AtomicU64,
    pub retried: AtomicU64,
    pub retry_mismatches: AtomicU64,
}

/// The result of a run.
#[derive(Debug)]
pub struct Summary {
    pub pushes: u64,
    pub replies: u64,
    pub nothing: u64,
    pub errors: u64,
    /// Pushes that needed more than one delivery (timeouts, failures).
    pub redelivered: u64,
    /// Pushes deliberately delivered again, and how many of those got another answer.
    pub retried: u64,
    pub retry_mismatches: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Each distinct error reason (the first few) and how many pushes ended in it.
    pub error_samples: Vec<(String, u64)>,
}

/// How many distinct error reasons are counted one by one; errors with any further
/// reason count only in the total.
const DISTINCT_REASONS: usize = 10;

impl Options {
    /// Pushes the run sends: rate × duration, rounded, at least one.
    pub fn total(&self) -> u64 {
        ((self.rate * self.duration.as_secs_f64()).round() as u64).max(1)
    }
}

impl Summary {
    pub fn throughput(&self) -> f64 {
        self.pushes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the load: push k leaves at k / rate seconds, [`Options::total`] pushes in all;
/// `tick` is called about twice a second with the counters.
pub async fn run(
    account: &Account,
    url: &str,
    mode: Mode,
    opts: &Options,
    mut tick: impl FnMut(&Progress, Duration),
) -> Summary {
    let http = Http::new(opts.rules.deadline);
    let progress = Arc::new(Progress::default());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let redelivered = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let base = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Fresh followers each run, so that two runs never look like retries of each other.
    let followers: Vec<String> =
        (0..opts.followers.max(1)).map(|i| fresh_openid(&format!("load{i}"))).collect();
    let total = opts.total();

    let started = Instant::now();
    let mut next_tick = started;
    let mut n: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while n < total {
        // Send what the target rate asks for by now: push k is due at k / rate.
        let due =
            ((started.elapsed().as_secs_f64() * opts.rate) as u64).saturating_add(1).min(total);
        while n < due {
            let permit = permits.clone().acquire_owned().await.expect("semaphore open");
            let follower = &followers[(n % followers.len() as u64) as usize];
            let round = n / followers.len() as u64;
            let kind = match n % 4 {
                0 | 1 => Kind::Text { content: format!("load message {n}") },
                2 => Kind::Click { key: format!("MENU_{}", n % 7) },
                _ => Kind::LocationReport {
                    lat: "23.137466".into(),
                    lng: "113.352425".into(),
                    precision: "65.0".into(),
                },
            };
            // One CreateTime per follower and round keeps every event distinct.
            let inner = kind.to_xml(&account.original_id, follower, base + round, random_msg_id());
            let retry = opts.retry_ratio > 0.0
                && ((n as f64 * opts.retry_ratio).fract() + opts.retry_ratio >= 1.0);
            let (http, account, url, rules) =
                (http.clone(), account.clone(), url.to_owned(), opts.rules);
            let (progress, latencies, redelivered, samples) =
                (progress.clone(), latencies.clone(), redelivered.clone(), samples.clone());
            tasks.spawn(async move {
                let t = Instant::now();
                let report = deliver_with(&http, &account, &url, &inner, mode, rules).await;
                latencies.lock().await.push(t.elapsed());
                if report.attempts.len() > 1 {
                    redelivered.fetch_add(1, Ordering::Relaxed);
                }
                count(&progress, &report.seen, &samples).await;
                if retry {
                    progress.retried.fetch_add(1, Ordering::Relaxed);
                    let again = deliver_with(&http, &account, &url, &inner, mode, rules).await;
                    if again.seen.text() != report.seen.text()
                        || matches!(again.seen, Seen::ServiceError(_))
                    {
                        progress.retry_mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
            n += 1;
        }
        while tasks.try_join_next().is_some() {}
        if Instant::now() >= next_tick {
            tick(&progress, started.elapsed());
            next_tick += Duration::from_millis(500);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    tick(&progress, elapsed);

    let mut lat = std::mem::take(&mut *latencies.lock().await);
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Summary {
        pushes: get(&progress.pushes),
        replies: get(&progress.replies),
        nothing: get(&progress.nothing),
        errors: get(&progress.errors),
        redelivered: get(&redelivered),
        retried: get(&progress.retried),
        retry_mismatches: get(&progress.retry_mismatches),
        elapsed,
        p50: pick(0.50),
        p99: pick(0.99),
        max: lat.last().copied().unwrap_or_default(),
        error_samples: std::mem::take(&mut *samples.lock().await),
    }
}

async fn count(p: &Progress, seen: &Seen, samples: &Mutex<Vec<(String, u64)>>) {
    p.pushes.fetch_add(1, Ordering::Relaxed);
    match seen {
        Seen::Reply { .. } => p.replies.fetch_add(1, Ordering::Relaxed),
        Seen::Nothing => p.nothing.fetch_add(1, Ordering::Relaxed),
        Seen::ServiceError(reason) => {
            let mut s = samples.lock().await;
            if let Some(i) = s.iter().position(|(r, _)| r == reason) {
                s[i].1 += 1;
            } else if s.len() < DISTINCT_REASONS {
                s.push((reason.clone(), 1));
            }
            p.errors.fetch_add(1, Ordering::Relaxed)
        }
    };
}
