//! WeChat's delivery rules: each attempt has a deadline (5 s); a timeout, a refused or
//! dropped connection or a non-200 answer is a failed attempt and the same push is sent
//! again — same inner XML and CreateTime, new timestamp, nonce, signatures and random
//! prefix — up to three deliveries in all (WeChat's documents leave open whether it is
//! three or four, so it is a parameter). A 200 answer ends it, whatever it says.

use std::time::{Duration, Instant};

use super::{Account, Http, Mode, Seen};

/// Deadline, attempts and spacing of deliveries. WeChat's by default.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub deadline: Duration,
    pub attempts: u32,
    /// Pause between a failed attempt and the next one (WeChat sends the next at once
    /// after the deadline, so the deadline itself spaces them).
    pub retry_interval: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { deadline: Duration::from_secs(5), attempts: 3, retry_interval: Duration::ZERO }
    }
}

/// One delivery attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub elapsed: Duration,
    /// The HTTP status and body, or why there was no answer.
    pub result: Result<(u16, String), String>,
}

impl Attempt {
    /// Whether WeChat would count this attempt as failed and deliver again.
    pub fn failed(&self) -> bool {
        !matches!(self.result, Ok((200, _)))
    }
}

/// All attempts of one push and what the follower saw in the end.
#[derive(Debug, Clone)]
pub struct Report {
    pub attempts: Vec<Attempt>,
    pub seen: Seen,
}

/// Delivers one push with WeChat's rules and judges the final answer.
pub async fn deliver(
    account: &Account,
    url: &str,
    inner: &str,
    mode: Mode,
    rules: Rules,
) -> Report {
    deliver_with(&Http::new(rules.deadline), account, url, inner, mode, rules).await
}

/// The same over a shared client (its timeout is the deadline).
pub async fn deliver_with(
    http: &Http,
    account: &Account,
    url: &str,
    inner: &str,
    mode: Mode,
    rules: Rules,
) -> Report {
    deliver_across(http, account, &[url], inner, mode, rules).await
}

/// Delivers one push to a cluster behind a load balancer: attempt `n` goes to
/// `urls[n % urls.len()]`, so that each retry lands on another node.
pub async fn deliver_across(
    http: &Http,
    account: &Account,
    urls: &[&str],
    inner: &str,
    mode: Mode,
    rules: Rules,
) -> Report {
    let mut attempts = Vec::new();
    for n in 0..rules.attempts.max(1) {
        if n > 0 && !rules.retry_interval.is_zero() {
            tokio::time::sleep(rules.retry_interval).await;
        }
        let d = account.deliver(inner, mode);
        let started = Instant::now();
        let url = urls.get(n as usize % urls.len().max(1)).copied().unwrap_or_default();
        let result = http.post(url, &d).await.map(|a| (a.status, a.body));
        let attempt = Attempt { elapsed: started.elapsed(), result };
        let failed = attempt.failed();
        attempts.push(attempt);
        if !failed {
            break;
        }
    }
    let all = match attempts.len() {
        1 => "on the only delivery".to_owned(),
        n => format!("on all {n} deliveries"),
    };
    let seen = match attempts.last().map(|a| &a.result) {
        Some(Ok((200, body))) => account.judge(inner, mode, 200, body),
        Some(Ok((status, _))) => Seen::ServiceError(format!("HTTP {status} {all}")),
        Some(Err(e)) => Seen::ServiceError(format!("{e} {all}")),
        None => Seen::ServiceError("not delivered".into()),
    };
    Report { attempts, seen }
}
