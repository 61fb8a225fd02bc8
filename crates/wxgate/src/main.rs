//! The `wxgate` command: serve accounts, check a config, print recorded pushes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wxgate::Config;

#[derive(Parser)]
#[command(name = "wxgate", version, about = "WeChat Official Account push server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; the size of the `sim` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve every account of the config file.
    Serve {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
        /// HOST:PORT (an IP or a host name such as localhost); overrides the file's
        /// `listen`; `127.0.0.1:0` picks a free port.
        #[arg(long)]
        listen: Option<String>,
        /// HOST:PORT of the metrics endpoint; overrides the file's `metrics_listen` (for
        /// several nodes on one machine sharing one config file).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Check a config file and name the first field that is wrong.
    CheckConfig {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
    },
    /// Play WeChat's side: pushes, retries, strict reply checks, scenarios, load, and a
    /// mock of the WeChat HTTP API.
    #[command(
        after_help = "Exit codes: 0 all well; 1 bad input or an operational error; 2 a usage error; \
                            3 a follower would see \"该公众号暂时无法提供服务\" (push, journey, replay, load); \
                            4 a scenario step was not as expected."
    )]
    Sim {
        #[command(subcommand)]
        command: wxgate::sim::cli::SimCommand,
    },
    /// Show what the store holds and, with metrics_listen set, the running server's counters.
    Status {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
    },
    /// Delete every record of one follower (their right to be forgotten).
    Forget {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
        #[arg(long)]
        account: String,
        /// The follower's OpenID.
        #[arg(long)]
        openid: String,
    },
    /// Background deliveries to the owner's service: list them, re-drive parked ones.
    Outbox {
        #[command(subcommand)]
        command: wxgate::outbox::OutboxCommand,
    },
    /// Print recorded pushes as JSON lines, oldest first.
    Events {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
        #[arg(long)]
        account: Option<String>,
    },
}

// glibc's allocator spent a fifth of the server's time under load (many small,
// short-lived allocations across threads); mimalloc handles that pattern far better.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's own code).
    let cli = Cli::parse();
    // Commands that print to stdout end quietly when its reader goes away.
    let prints = !matches!(cli.command, Command::Serve { .. });
    let result = match cli.command {
        Command::Sim { command } => wxgate::sim::cli::run(command),
        Command::Serve { config, listen, metrics_listen } => {
            serve(config, listen, metrics_listen).map(|()| ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => load_config(&config)
            .and_then(|c| {
                let n = c.accounts.len();
                writeln!(
                    std::io::stdout(),
                    "{}: ok ({n} account{})",
                    config.display(),
                    if n == 1 { "" } else { "s" }
                )?;
                Ok(())
            })
            .map(|()| ExitCode::SUCCESS),
        Command::Events { config, account } => events(config, account).map(|()| ExitCode::SUCCESS),
        Command::Status { config } => status(config).map(|()| ExitCode::SUCCESS),
        Command::Forget { config, account, openid } => {
            load_config(&config).and_then(|c| wxgate::forget(&c, &account, &openid)).and_then(|n| {
                writeln!(
                    std::io::stdout(),
                    "{n} record{} of {openid} deleted",
                    if n == 1 { "" } else { "s" }
                )?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Outbox { command } => {
            wxgate::outbox::run(command, &mut std::io::stdout().lock()).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        // The reader went away (`wxgate events | head -1`): a normal end.
        Err(e) if prints && broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether an error is a write to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Loads a config file; errors name the file (`wxgate.toml: accounts[0].token: ...`).
fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| {
        let file = path.display().to_string();
        // A file that cannot be read is already named.
        if e.path == file { anyhow!("{e}") } else { anyhow!("{file}: {e}") }
    })
}

fn serve(
    path: PathBuf,
    listen: Option<String>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    // First of all: a SIGHUP during start-up (a reload sent early) must not end the
    // process, so it is caught before the config is read or anything slow runs.
    let runtime = tokio::runtime::Runtime::new()?;
    let hangups = runtime.block_on(async { wxgate::live::Hangups::listen() });
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The NATS client logs every failed reconnect at info; wxgate logs an outage once.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("async_nats")) {
        filter = filter.add_directive("async_nats=warn".parse().expect("a valid directive"));
    }
    // PostgreSQL's driver logs each statement with its parameters (push bodies) at debug.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("tokio_postgres")) {
        filter = filter.add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    }
    // Info lines (one per push) are written out in batches; warnings at once.
    let (writer, _flush_on_return) = wxgate::log_writer::Buffered::install();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = load_config(&path)?;
    // The file's value stays in `config`, so that a reload compares like with like.
    let metrics_listen = metrics_listen.or(config.metrics_listen);
    let (addrs, shown) = match &listen {
        Some(l) => (wxgate::sim::cli::resolve("--listen", l)?, l.clone()),
        None => (vec![config.listen], config.listen.to_string()),
    };
    runtime.block_on(async {
        let app = wxgate::build(&config)?;
        tracing::info!(
            store = %app.store.location().display(),
            nats = config.nats.is_some(),
            shared_token = config.redis.is_some(),
            accounts = config.accounts.len(),
            "store open"
        );
        if let Ok(text) = std::fs::read_to_string(&path) {
            app.live.seed(&text);
        }
        tokio::spawn(wxgate::live::watch(
            app.live.clone(),
            path.clone(),
            std::time::Duration::from_secs(config.reload_secs),
            hangups,
        ));
        if let Some(addr) = metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?;
            tracing::info!("metrics on http://{}/metrics", metrics.local_addr()?);
            let router = app.metrics_router();
            tokio::spawn(async move { axum::serve(metrics, router).await });
        }
        let listener = tokio::net::TcpListener::bind(&addrs[..])
            .await
            .with_context(|| format!("cannot listen on {shown}"))?;
        wxgate::serve(
            listener,
            app.router,
            config.http,
            config.allow_from.clone(),
            shutdown_signal(),
        )
        .await?;
        // Requests in flight have been answered; let the store commit what is queued.
        // Another node may take the cluster's chores at once.
        app.store.release_leases(wxgate::node_id()).await;
        let flushed = tokio::task::spawn_blocking(move || {
            app.store.close(std::time::Duration::from_secs(10))
        })
        .await?;
        tracing::info!(flushed, "stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn status(config: PathBuf) -> anyhow::Result<()> {
    let config = load_config(&config)?;
    let text = tokio::runtime::Runtime::new()?.block_on(wxgate::status::report(&config))?;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn events(config: PathBuf, account: Option<String>) -> anyhow::Result<()> {
    let config = load_config(&config)?;
    if let Some(name) = &account {
        anyhow::ensure!(config.account(name).is_some(), "no account named {name:?} in the config");
    }
    let rows = wxgate::store::read_all(config.store_location(), account.as_deref())?;
    let mut out = std::io::stdout().lock();
    for row in &rows {
        writeln!(out, "{}", wxgate::events::to_json(row))?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
