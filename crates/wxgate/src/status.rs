//! `wxgate status`: the state of a server at a glance — what the store holds and, when
//! the server exposes metrics (`metrics_listen`), what it is doing now.

use std::fmt::Write;
use std::time::Duration;

use crate::Config;
use crate::events::rfc3339_ms;
use crate::metrics::parse_sample;
use crate::sim::Http;
use crate::store;

/// The report as text.
pub async fn report(config: &Config) -> anyhow::Result<String> {
    let mut out = String::new();
    let at = config.store_location();
    let _ = writeln!(out, "store: {}", at.display());
    let rows = store::summary(&at)?;
    if rows.is_empty() {
        let _ = writeln!(out, "  no pushes recorded yet");
    }
    let _ = writeln!(
        out,
        "  {:<12} {:<32} {:>9} {:>7} {:>11}  latest",
        "account", "kind", "records", "dead", "deliveries"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "  {:<12} {:<32} {:>9} {:>7} {:>11}  {}",
            r.account,
            r.kind,
            r.records,
            r.dead_letters,
            r.deliveries,
            rfc3339_ms(r.latest_ms)
        );
    }

    let (pending, dead, oldest_ms) = store::outbox_depth(&at, crate::http::unix_ms())?;
    let _ = writeln!(
        out,
        "outbox: {pending} pending (oldest {:.1} s), {dead} dead (see `wxgate outbox list --state dead`)",
        oldest_ms as f64 / 1000.0
    );

    let Some(addr) = config.metrics_listen else {
        let _ = writeln!(
            out,
            "live: set metrics_listen in the config to see the running server's counters"
        );
        return Ok(out);
    };
    let http = Http::new(Duration::from_secs(3));
    let body = match http.send("GET", &format!("http://{addr}/metrics"), None).await {
        Ok(a) if a.status == 200 => a.body,
        Ok(a) => return Ok(out + &format!("live: {addr} answered HTTP {}\n", a.status)),
        Err(e) => return Ok(out + &format!("live: server not reachable at {addr} ({e})\n")),
    };
    let _ = writeln!(out, "live (http://{addr}/metrics):");
    let samples: Vec<_> = body.lines().filter_map(parse_sample).collect();
    for (name, labels, value) in &samples {
        let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map_or("", |(_, v)| *v);
        match *name {
            "wxgate_pushes_total" => {
                let _ = writeln!(
                    out,
                    "  pushes   {:<12} {:<32} {:<13} {value}",
                    label("account"),
                    label("kind"),
                    label("outcome")
                );
            }
            "wxgate_rejected_total" => {
                let _ = writeln!(
                    out,
                    "  refused  {:<12} {:<32} {value}",
                    label("account"),
                    label("reason")
                );
            }
            "wxgate_reply_seconds_count" => {
                let account = label("account");
                let buckets: Vec<(f64, f64)> = samples
                    .iter()
                    .filter(|(n, l, _)| {
                        *n == "wxgate_reply_seconds_bucket" && l.contains(&("account", account))
                    })
                    .filter_map(|(_, l, v)| {
                        l.iter()
                            .find(|(k, _)| *k == "le")
                            .and_then(|(_, le)| le.parse().ok())
                            .map(|le| (le, *v))
                    })
                    .collect();
                let q = |q: f64| {
                    buckets
                        .iter()
                        .find(|(_, n)| *n >= value * q)
                        .map_or("> 5 s".to_owned(), |(le, _)| format!("<= {le} s"))
                };
                let _ = writeln!(
                    out,
                    "  latency  {account:<12} p50 {}, p99 {} over {value} pushes",
                    q(0.5),
                    q(0.99)
                );
            }
            "wxgate_nats_publishes_total" => {
                let _ = writeln!(
                    out,
                    "  nats     {:<12} {:<32} {:<13} {value}",
                    label("account"),
                    label("via"),
                    label("outcome")
                );
            }
            n if n.starts_with("wxgate_store_")
                || n.starts_with("wxgate_outbox_")
                || n == "wxgate_dedup_memory_entries" =>
            {
                let _ = writeln!(out, "  {:<40} {value}", n.trim_start_matches("wxgate_"));
            }
            _ => {}
        }
    }
    Ok(out)
}
