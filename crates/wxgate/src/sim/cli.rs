//! `wxgate sim …`: the simulator's commands. The binary only parses and dispatches.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use wxgate_protocol::{EncodingAesKey, Push};

use super::delivery::{Report, Rules, deliver};
use super::kinds::Kind;
use super::scenario::{Scenario, describe, fresh_openid, random_msg_id};
use super::{Account, Mode, Seen, api, load};

/// Exit code when a follower would see "该公众号暂时无法提供服务" (push, journey, replay,
/// load with errors or retry mismatches).
pub const EXIT_SERVICE_ERROR: u8 = 3;
/// Exit code when a scenario step is not as it expects.
pub const EXIT_EXPECTATION: u8 = 4;

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
    /// Run a scenario file: followers and what they do over time, with expectations.
    ///
    /// The file is TOML. Optional `[[followers]]` tables give each a `name` and, if you
    /// like, a fixed `openid` (else a fresh one each run). `[[steps]]` run in order, each
    /// with `follower`, `push` (the words of `wxgate sim push`: one string, or a list to
    /// keep spaces in values), `after_ms` (wait first) and optional expectations:
    /// `expect_text`, `expect_msg_type`, `expect_nothing`, `expect_error`.
    ///
    /// See "A scenario file" in README.md for an example. Exits with 4 when a step is not
    /// as expected.
    Scenario {
        /// The scenario file (TOML).
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
        /// Distinct followers (fresh OpenIDs each run) the pushes come from.
        #[arg(long, default_value_t = 100)]
        followers: usize,
        /// Pushes per second; rate × duration pushes in all.
        #[arg(long, default_value_t = 200.0, allow_negative_numbers = true)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
        duration: f64,
        /// Most deliveries in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Share of pushes delivered a second time, as WeChat's retries (0 to 1).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        retry_ratio: f64,
    },
    /// Serve a mock of the WeChat HTTP API (tokens, customer-service messages, QR codes,
    /// menu, user info) with recorded calls and fault injection.
    Api {
        /// HOST:PORT to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: String,
        /// The AppID `/cgi-bin/token` accepts.
        #[arg(long, default_value = "wx7c1f0e2a9b3d4e5f")]
        app_id: String,
        /// The AppSecret `/cgi-bin/token` accepts.
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
    /// The account's URL on wxgate itself, plain HTTP: e.g. http://127.0.0.1:8080/wechat
    #[arg(long)]
    pub url: String,
    /// The account's Token (the config's `token`, WeChat console's 令牌), used to sign.
    #[arg(long)]
    pub token: String,
    /// The account's AppID, sealed into encrypted pushes.
    #[arg(long, default_value = "wx7c1f0e2a9b3d4e5f")]
    pub app_id: String,
    /// The EncodingAESKey; needed for compatible and safe mode.
    #[arg(long)]
    pub aes_key: Option<String>,
    /// Defaults to safe when --aes-key is given, else plain.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// The follower's OpenID for push and journey; default: a fresh one each run.
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
        check_url(&self.url)?;
        let aes_key = match &self.aes_key {
            Some(k) => {
                Some(EncodingAesKey::parse(k).map_err(|e| anyhow::anyhow!("--aes-key: {e}"))?)
            }
            None => None,
        };
        let mode = match (self.mode, &aes_key) {
            (Some(ModeArg::Plain), _) | (None, None) => Mode::Plain,
            (Some(ModeArg::Compatible), Some(_)) => Mode::Compatible,
            (Some(ModeArg::Safe), Some(_)) | (None, Some(_)) => Mode::Safe,
            (Some(_), None) => bail!("--mode compatible and safe need --aes-key"),
        };
        let account = Account {
            token: self.token.clone(),
            app_id: self.app_id.clone(),
            aes_key,
            original_id: self.to.clone(),
        };
        let rules = Rules {
            deadline: Duration::from_millis(self.deadline_ms),
            attempts: self.attempts.max(1),
            retry_interval: Duration::from_millis(self.retry_interval_ms),
        };
        Ok((account, mode, rules))
    }

    /// `--from`, or a fresh OpenID so that no two runs look like one push retried.
    fn follower(&self, name: &str) -> String {
        self.from.clone().unwrap_or_else(|| fresh_openid(name))
    }
}

/// Refuses a `--url` the simulator cannot deliver to, before anything is sent.
fn check_url(url: &str) -> anyhow::Result<()> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        let path = url
            .parse::<hyper::Uri>()
            .map(|u| u.path().to_owned())
            .unwrap_or_else(|_| "/wechat".into());
        bail!(
            "--url {url}: https:// is not supported by the simulator yet; give the plain-HTTP address wxgate \
             listens on (behind your TLS proxy), e.g. http://127.0.0.1:8080{path}"
        );
    }
    if !lower.starts_with("http://") {
        bail!("--url {url:?}: must start with http://, e.g. http://127.0.0.1:8080/wechat");
    }
    let uri: hyper::Uri = url.parse().map_err(|e| anyhow!("--url {url:?}: not a URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        bail!("--url {url:?}: has no host, e.g. http://127.0.0.1:8080/wechat");
    }
    Ok(())
}

/// `HOST:PORT` to socket addresses (an IP, or a host name that resolves), for a listen
/// flag; errors name the flag.
pub fn resolve(flag: &str, addr: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let has_port = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        bail!("{flag} {addr:?}: give HOST:PORT, e.g. 127.0.0.1:8080 or localhost:8081");
    }
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| anyhow!("{flag} {addr:?}: cannot resolve the host: {e}"))?
        .collect();
    if addrs.is_empty() {
        bail!("{flag} {addr:?}: the host name resolves to no address");
    }
    Ok(addrs)
}

/// Runs a sim command. Exit codes: 0 all well; 3 a follower would see the service error
/// ([`EXIT_SERVICE_ERROR`]); 4 a scenario step was not as expected ([`EXIT_EXPECTATION`]).
/// An `Err` is bad input or an operational error (the binary exits with 1).
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
                (Some(path), None) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, Some(kind)) => {
                    kind.to_xml(&target.to, &target.follower("cli"), now, random_msg_id())
                }
                (None, None) => bail!("give a push kind (e.g. `text --content hi`) or --xml FILE"),
            };
            let from = wxgate_protocol::xml::parse(&inner)
                .ok()
                .and_then(|d| d.text_of("FromUserName").map(str::to_owned));
            writeln!(
                out,
                "{} from {} to {} ({mode:?} mode)",
                push_label(&inner),
                from.as_deref().unwrap_or("?"),
                target.url
            )?;
            let report = deliver(&account, &target.url, &inner, mode, rules).await;
            print_report(&mut out, &report)?;
            if let Seen::Reply { xml, .. } = &report.seen {
                writeln!(out, "reply XML: {xml}")?;
            }
            Ok(exit(&report.seen))
        }
        SimCommand::Journey { target } => {
            let mut scenario = Scenario::journey();
            for f in &mut scenario.followers {
                f.openid = Some(target.follower(&f.name));
            }
            run_scenario(&mut out, &target, scenario, EXIT_SERVICE_ERROR).await
        }
        SimCommand::Scenario { file, target } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let scenario =
                Scenario::parse(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            run_scenario(&mut out, &target, scenario, EXIT_EXPECTATION).await
        }
        SimCommand::Replay { files, target } => {
            let (account, mode, rules) = target.account()?;
            let docs = read_recorded(&files)?;
            writeln!(
                out,
                "{} push{} to {} ({mode:?} mode)",
                docs.len(),
                if docs.len() == 1 { "" } else { "es" },
                target.url
            )?;
            let mut answered = 0;
            for (i, inner) in docs.iter().enumerate() {
                let report = deliver(&account, &target.url, inner, mode, rules).await;
                writeln!(
                    out,
                    "[{:>3}] {} -> {} ({})",
                    i + 1,
                    push_label(inner),
                    describe(&report.seen),
                    deliveries(&report)
                )?;
                if !matches!(report.seen, Seen::ServiceError(_)) {
                    answered += 1;
                }
            }
            writeln!(out, "{answered} of {} pushes answered", docs.len())?;
            Ok(if answered < docs.len() {
                ExitCode::from(EXIT_SERVICE_ERROR)
            } else {
                ExitCode::SUCCESS
            })
        }
        SimCommand::Load { target, followers, rate, duration, concurrency, retry_ratio } => {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate must be more than 0 pushes per second, got {rate}");
            }
            if !(duration.is_finite() && duration > 0.0) {
                bail!("--duration must be more than 0 seconds, got {duration}");
            }
            let duration = Duration::try_from_secs_f64(duration)
                .map_err(|_| anyhow!("--duration {duration}: too long"))?;
            if !(0.0..=1.0).contains(&retry_ratio) {
                bail!("--retry-ratio must be between 0 and 1, got {retry_ratio}");
            }
            if followers == 0 {
                bail!("--followers must be at least 1");
            }
            if concurrency == 0 {
                bail!("--concurrency must be at least 1");
            }
            let (account, mode, rules) = target.account()?;
            let opts = load::Options { followers, rate, duration, concurrency, retry_ratio, rules };
            let expected = opts.total();
            // A redrawn bar on a terminal; otherwise (a log, a pipe) a line every 5 s.
            let tty = std::io::stderr().is_terminal();
            let mut last_line = Instant::now();
            let summary = load::run(&account, &target.url, mode, &opts, |p, elapsed| {
                let done = p.pushes.load(std::sync::atomic::Ordering::Relaxed);
                let errors = p.errors.load(std::sync::atomic::Ordering::Relaxed);
                let speed = done as f64 / elapsed.as_secs_f64().max(1e-3);
                if tty {
                    let filled = ((done as f64 / expected as f64) * 30.0).min(30.0) as usize;
                    eprint!(
                        "\r[{}{}] {done}/{expected} pushes, {errors} errors, {speed:.0}/s   ",
                        "=".repeat(filled),
                        " ".repeat(30 - filled)
                    );
                } else if last_line.elapsed() >= Duration::from_secs(5) {
                    eprintln!("{done}/{expected} pushes, {errors} errors, {speed:.0}/s");
                    last_line = Instant::now();
                }
            })
            .await;
            if tty {
                eprintln!();
            }
            writeln!(out, "pushes sent:     {}", summary.pushes)?;
            writeln!(out, "replies shown:   {}", summary.replies)?;
            writeln!(out, "nothing shown:   {}", summary.nothing)?;
            writeln!(out, "service errors:  {}", summary.errors)?;
            for (reason, n) in &summary.error_samples {
                writeln!(out, "  {n:>6} x {reason}")?;
            }
            let listed: u64 = summary.error_samples.iter().map(|(_, n)| n).sum();
            if listed < summary.errors {
                writeln!(out, "  {:>6} x other reasons", summary.errors - listed)?;
            }
            writeln!(
                out,
                "redelivered:     {} (pushes that needed more than one delivery)",
                summary.redelivered
            )?;
            writeln!(
                out,
                "retries sent:    {} ({} answered differently from the first delivery)",
                summary.retried, summary.retry_mismatches
            )?;
            writeln!(
                out,
                "latency:         p50 {:?}, p99 {:?}, max {:?}",
                summary.p50, summary.p99, summary.max
            )?;
            writeln!(
                out,
                "throughput:      {:.0} pushes/s over {:.1?}",
                summary.throughput(),
                summary.elapsed
            )?;
            Ok(if summary.errors > 0 || summary.retry_mismatches > 0 {
                ExitCode::from(EXIT_SERVICE_ERROR)
            } else {
                ExitCode::SUCCESS
            })
        }
        SimCommand::Api { listen, app_id, secret, token_ttl, grace } => {
            let mock = api::MockApi::new(api::Options {
                app_id,
                secret,
                token_ttl: Duration::from_secs(token_ttl),
                grace: Duration::from_secs(grace),
                ..api::Options::default()
            });
            let addrs = resolve("--listen", &listen)?;
            let listener = tokio::net::TcpListener::bind(&addrs[..])
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!("mock WeChat API listening on http://{}", listener.local_addr()?);
            axum::serve(listener, mock.router()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the steps, one line each; `failure_code` is the exit code when a step fails.
async fn run_scenario(
    out: &mut impl Write,
    target: &Target,
    scenario: Scenario,
    failure_code: u8,
) -> anyhow::Result<ExitCode> {
    let (account, mode, rules) = target.account()?;
    let several = scenario.follower_count() > 1;
    let who = match scenario.followers.as_slice() {
        [only] if !several => {
            only.openid.as_deref().map(|o| format!(" as {o}")).unwrap_or_default()
        }
        _ if several => format!(" by {} followers", scenario.follower_count()),
        _ => String::new(),
    };
    writeln!(out, "{} steps to {} ({mode:?} mode){who}", scenario.steps.len(), target.url)?;
    let results = scenario
        .run(&account, &target.url, mode, rules, |i, r| {
            let mark = if r.failure.is_some() { "FAIL" } else { "ok" };
            let label =
                if several { format!("{}: {}", r.follower, r.label) } else { r.label.clone() };
            // A closed stdout (`| head`) must not stop the run; its end is reported below.
            let _ = writeln!(
                out,
                "[{:>2}] {:<4} {:<60} -> {} ({})",
                i + 1,
                mark,
                label,
                describe(&r.report.seen),
                deliveries(&r.report)
            );
            if let Some(f) = &r.failure {
                let _ = writeln!(out, "          {f}");
            }
        })
        .await;
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    writeln!(out, "{} of {} steps as expected", results.len() - failed, results.len())?;
    Ok(if failed > 0 { ExitCode::from(failure_code) } else { ExitCode::SUCCESS })
}

/// `1 delivery, 4 ms`: how many deliveries a push took and their time in all.
fn deliveries(report: &Report) -> String {
    let tries = report.attempts.len();
    let ms = report.attempts.iter().map(|a| a.elapsed).sum::<Duration>().as_millis();
    format!("{tries} deliver{}, {ms} ms", if tries == 1 { "y" } else { "ies" })
}

/// What a push is, for a report line: its kind as `wxgate events` names it, and the
/// event key if it has one (`click_event MENU_A`).
fn push_label(inner: &str) -> String {
    match Push::parse(inner) {
        Ok(push) => match push.event_key().filter(|k| !k.is_empty()) {
            Some(key) => format!("{} {}", push.kind_name(), shorten(key, 40)),
            None => push.kind_name().to_owned(),
        },
        Err(_) => "unreadable push".into(),
    }
}

/// At most `max` characters of `s`, with `…` when cut.
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

fn print_report(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    for (i, a) in report.attempts.iter().enumerate() {
        let what = match &a.result {
            Ok((200, body)) => format!("HTTP 200, {} bytes", body.len()),
            // Why the server refused: its answer's body, as far as it is readable.
            Ok((status, body)) if !body.trim().is_empty() => {
                format!("HTTP {status} {:?}", shorten(body.trim(), 200))
            }
            Ok((status, _)) => format!("HTTP {status}, empty body"),
            Err(e) => e.clone(),
        };
        writeln!(out, "delivery {}: {what} in {:?}", i + 1, a.elapsed)?;
    }
    writeln!(out, "follower sees: {}", describe(&report.seen))
}

fn exit(seen: &Seen) -> ExitCode {
    if matches!(seen, Seen::ServiceError(_)) {
        ExitCode::from(EXIT_SERVICE_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Push documents from `wxgate events` output (one JSON object per line, its `xml`) or
/// from raw XML files.
fn read_recorded(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut docs = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        if text.trim_start().starts_with('{') {
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not JSON", file.display(), n + 1))?;
                let xml = v["xml"]
                    .as_str()
                    .with_context(|| format!("{}:{}: no \"xml\" field", file.display(), n + 1))?;
                docs.push(xml.to_owned());
            }
        } else {
            docs.push(text);
        }
    }
    Ok(docs)
}
