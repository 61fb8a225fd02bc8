//! `wxgate sim …`: the simulator's commands. The binary only parses and dispatches.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use wxgate_protocol::EncodingAesKey;

use super::delivery::{Report, Rules, deliver};
use super::kinds::Kind;
use super::scenario::{Scenario, describe, made_up_openid};
use super::{Account, Mode, Seen, api, load};

#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Send one push as WeChat would and show what the follower sees.
    Push {
        #[command(flatten)]
        target: Target,
        /// Send this XML file as the push instead of composing one.
        #[arg(long)]
        xml: Option<PathBuf>,
        #[command(subcommand)]
        kind: Option<Kind>,
    },
    /// Walk one follower through subscribe (QR scene), SCAN, LOCATION, CLICK, VIEW, a few
    /// messages and unsubscribe, showing every reply.
    Journey {
        #[command(flatten)]
        target: Target,
    },
    /// Run a scenario file (see the docs of `wxgate::sim::scenario`).
    Scenario {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Send recorded pushes again, signed and encrypted anew: JSON lines of
    /// `wxgate events` (their `xml`) or raw XML files.
    Replay {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Simulated followers at a target rate for a bounded time; every reply judged.
    Load {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 100)]
        followers: usize,
        /// Pushes per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Share of pushes delivered a second time, as WeChat's retries.
        #[arg(long, default_value_t = 0.0)]
        retry_ratio: f64,
    },
    /// Serve a mock of the WeChat HTTP API (tokens, customer-service messages, QR codes,
    /// menu, user info) with recorded calls and fault injection.
    Api {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        #[arg(long, default_value = "wx7c1f0e2a9b3d4e5f")]
        app_id: String,
        #[arg(long, default_value = "simsecret0000000000000000000000")]
        secret: String,
        /// Access-token lifetime in seconds.
        #[arg(long, default_value_t = 7200)]
        token_ttl: u64,
        /// Seconds an older token keeps working after a new one is issued.
        #[arg(long, default_value_t = 300)]
        grace: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Plain,
    Compatible,
    Safe,
}

/// Where and as whom to deliver, and WeChat's delivery rules.
#[derive(Debug, Args)]
pub struct Target {
    /// The account's URL, e.g. http://127.0.0.1:8080/wechat
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub token: String,
    #[arg(long, default_value = "wx7c1f0e2a9b3d4e5f")]
    pub app_id: String,
    /// The EncodingAESKey; needed for compatible and safe mode.
    #[arg(long)]
    pub aes_key: Option<String>,
    /// Defaults to safe when --aes-key is given, else plain.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// The follower's OpenID.
    #[arg(long)]
    pub from: Option<String>,
    /// The account's original id (gh_…).
    #[arg(long, default_value = "gh_3a9f1c2b7d10")]
    pub to: String,
    /// Deadline of one delivery, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub deadline_ms: u64,
    /// Deliveries in all when an attempt fails.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// Pause between a failed delivery and the next, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub retry_interval_ms: u64,
}

impl Target {
    fn account(&self) -> anyhow::Result<(Account, Mode, Rules)> {
        let aes_key = match &self.aes_key {
            Some(k) => Some(EncodingAesKey::parse(k).map_err(|e| anyhow::anyhow!("--aes-key: {e}"))?),
            None => None,
        };
        let mode = match (self.mode, &aes_key) {
            (Some(ModeArg::Plain), _) | (None, None) => Mode::Plain,
            (Some(ModeArg::Compatible), Some(_)) => Mode::Compatible,
            (Some(ModeArg::Safe), Some(_)) | (None, Some(_)) => Mode::Safe,
            (Some(_), None) => bail!("--mode compatible and safe need --aes-key"),
        };
        let account = Account { token: self.token.clone(), app_id: self.app_id.clone(), aes_key, original_id: self.to.clone() };
        let rules = Rules {
            deadline: Duration::from_millis(self.deadline_ms),
            attempts: self.attempts.max(1),
            retry_interval: Duration::from_millis(self.retry_interval_ms),
        };
        Ok((account, mode, rules))
    }

    fn follower(&self) -> String {
        self.from.clone().unwrap_or_else(|| made_up_openid("cli"))
    }
}

/// Runs a sim command; the exit code is 0 unless a follower would see the service error
/// (or a scenario expectation failed), which is 2.
pub fn run(cmd: SimCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: SimCommand) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout();
    match cmd {
        SimCommand::Push { target, xml, kind } => {
            let (account, mode, rules) = target.account()?;
            let now = unix_now();
            let inner = match (xml, kind) {
                (Some(_), Some(_)) => bail!("give either a push kind or --xml FILE, not both"),
                (Some(path), None) => std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
                (None, Some(kind)) => kind.to_xml(&target.to, &target.follower(), now, now * 1000 + u64::from(std::process::id() % 1000)),
                (None, None) => bail!("give a push kind (e.g. `text --content hi`) or --xml FILE"),
            };
            let report = deliver(&account, &target.url, &inner, mode, rules).await;
            print_report(&mut out, &report)?;
            if let Seen::Reply { xml, .. } = &report.seen {
                writeln!(out, "reply XML: {xml}")?;
            }
            Ok(exit(&report.seen))
        }
        SimCommand::Journey { target } => run_scenario(&mut out, &target, Scenario::journey()).await,
        SimCommand::Scenario { file, target } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let scenario = Scenario::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            run_scenario(&mut out, &target, scenario).await
        }
        SimCommand::Replay { files, target } => {
            let (account, mode, rules) = target.account()?;
            let mut worst = ExitCode::SUCCESS;
            for (i, inner) in read_recorded(&files)?.iter().enumerate() {
                let report = deliver(&account, &target.url, inner, mode, rules).await;
                write!(out, "[{:>3}] ", i + 1)?;
                print_report(&mut out, &report)?;
                if matches!(report.seen, Seen::ServiceError(_)) {
                    worst = ExitCode::from(2);
                }
            }
            Ok(worst)
        }
        SimCommand::Load { target, followers, rate, duration, concurrency, retry_ratio } => {
            let (account, mode, rules) = target.account()?;
            let opts = load::Options {
                followers,
                rate,
                duration: Duration::from_secs_f64(duration.max(0.0)),
                concurrency,
                retry_ratio: retry_ratio.clamp(0.0, 1.0),
                rules,
            };
            let expected = (rate * duration).max(1.0) as u64;
            let summary = load::run(&account, &target.url, mode, &opts, |p, elapsed| {
                let done = p.pushes.load(std::sync::atomic::Ordering::Relaxed);
                let errors = p.errors.load(std::sync::atomic::Ordering::Relaxed);
                let filled = ((done as f64 / expected as f64) * 30.0).min(30.0) as usize;
                eprint!(
                    "\r[{}{}] {done}/{expected} pushes, {errors} errors, {:.0}/s   ",
                    "=".repeat(filled),
                    " ".repeat(30 - filled),
                    done as f64 / elapsed.as_secs_f64().max(1e-3)
                );
            })
            .await;
            eprintln!();
            writeln!(out, "pushes sent:     {}", summary.pushes)?;
            writeln!(out, "replies shown:   {}", summary.replies)?;
            writeln!(out, "nothing shown:   {}", summary.nothing)?;
            writeln!(out, "service errors:  {}", summary.errors)?;
            for e in &summary.error_samples {
                writeln!(out, "  e.g. {e}")?;
            }
            writeln!(out, "redelivered:     {} (pushes that needed more than one delivery)", summary.redelivered)?;
            writeln!(out, "retries sent:    {} ({} answered differently from the first delivery)", summary.retried, summary.retry_mismatches)?;
            writeln!(out, "latency:         p50 {:?}, p99 {:?}, max {:?}", summary.p50, summary.p99, summary.max)?;
            writeln!(out, "throughput:      {:.0} pushes/s over {:.1?}", summary.throughput(), summary.elapsed)?;
            Ok(if summary.errors > 0 || summary.retry_mismatches > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        SimCommand::Api { listen, app_id, secret, token_ttl, grace } => {
            let mock = api::MockApi::new(api::Options {
                app_id,
                secret,
                token_ttl: Duration::from_secs(token_ttl),
                grace: Duration::from_secs(grace),
                ..api::Options::default()
            });
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("mock WeChat API listening on http://{}", listener.local_addr()?);
            axum::serve(listener, mock.router()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_scenario(out: &mut impl Write, target: &Target, scenario: Scenario) -> anyhow::Result<ExitCode> {
    let (account, mode, rules) = target.account()?;
    writeln!(out, "{} steps to {} ({mode:?} mode)", scenario.steps.len(), target.url)?;
    let mut failed = 0;
    let results = scenario
        .run(&account, &target.url, mode, rules, |i, r| {
            let tries = r.report.attempts.len();
            let ms = r.report.attempts.iter().map(|a| a.elapsed).sum::<Duration>().as_millis();
            let mark = if r.failure.is_some() { "FAIL" } else { "ok" };
            let _ = writeln!(out, "[{:>2}] {:<4} {:<60} -> {} ({tries} deliver{}, {ms} ms)", i + 1, mark, r.label, describe(&r.report.seen), if tries == 1 { "y" } else { "ies" });
            if let Some(f) = &r.failure {
                let _ = writeln!(out, "          {f}");
            }
        })
        .await;
    failed += results.iter().filter(|r| r.failure.is_some()).count();
    writeln!(out, "{} of {} steps as expected", results.len() - failed, results.len())?;
    Ok(if failed > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn print_report(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    for (i, a) in report.attempts.iter().enumerate() {
        let what = match &a.result {
            Ok((status, body)) => format!("HTTP {status}, {} bytes", body.len()),
            Err(e) => e.clone(),
        };
        writeln!(out, "delivery {}: {what} in {:?}", i + 1, a.elapsed)?;
    }
    writeln!(out, "follower sees: {}", describe(&report.seen))
}

fn exit(seen: &Seen) -> ExitCode {
    if matches!(seen, Seen::ServiceError(_)) { ExitCode::from(2) } else { ExitCode::SUCCESS }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Push documents from `wxgate events` output (one JSON object per line, its `xml`) or
/// from raw XML files.
fn read_recorded(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        if text.trim_start().starts_with('{') {
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", file.display(), n + 1))?;
                let xml = v["xml"].as_str().with_context(|| format!("{}:{}: no \"xml\" field", file.display(), n + 1))?;
                docs.push(xml.to_owned());
            }
        } else {
            docs.push(text);
        }
    }
    Ok(docs)
}
