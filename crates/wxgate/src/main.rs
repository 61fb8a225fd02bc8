//! The `wxgate` command: serve accounts, check a config, print recorded pushes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wxgate::Config;

#[derive(Parser)]
#[command(name = "wxgate", version, about = "WeChat Official Account push server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every account of the config file.
    Serve {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
        /// Overrides the file's `listen`; `127.0.0.1:0` picks a free port.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Check a config file and name the first field that is wrong.
    CheckConfig {
        #[arg(long, default_value = "wxgate.toml")]
        config: PathBuf,
    },
    /// Play WeChat's side: pushes, retries, strict reply checks, scenarios, load, and a
    /// mock of the WeChat HTTP API.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim { command } => {
            return wxgate::sim::cli::run(command).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            });
        }
        Command::Serve { config, listen } => serve(config, listen),
        Command::CheckConfig { config } => Config::load(&config).map(|c| {
            println!("{}: ok ({} account{})", config.display(), c.accounts.len(), if c.accounts.len() == 1 { "" } else { "s" });
        }).map_err(anyhow::Error::from),
        Command::Events { config, account } => events(config, account),
        Command::Status { config } => status(config),
        Command::Forget { config, account, openid } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| wxgate::forget(&c, &account, &openid))
            .map(|n| println!("{n} record{} of {openid} deleted", if n == 1 { "" } else { "s" })),
        Command::Outbox { command } => wxgate::outbox::run(command, &mut std::io::stdout().lock()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: PathBuf, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::load(&config)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let app = wxgate::build(&config)?;
        if let Some(addr) = config.metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!("metrics on http://{}/metrics", metrics.local_addr()?);
            let router = app.metrics_router();
            tokio::spawn(async move { axum::serve(metrics, router).await });
        }
        let listener = tokio::net::TcpListener::bind(listen.unwrap_or(config.listen)).await?;
        wxgate::serve(listener, app.router, shutdown_signal()).await?;
        // Requests in flight have been answered; let the store commit what is queued.
        let flushed = tokio::task::spawn_blocking(move || app.store.close(std::time::Duration::from_secs(10))).await?;
        tracing::info!(flushed, "stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn status(config: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config)?;
    let text = tokio::runtime::Runtime::new()?.block_on(wxgate::status::report(&config))?;
    print!("{text}");
    Ok(())
}

fn events(config: PathBuf, account: Option<String>) -> anyhow::Result<()> {
    let config = Config::load(&config)?;
    if let Some(name) = &account {
        anyhow::ensure!(config.account(name).is_some(), "no account named {name:?} in the config");
    }
    let rows = wxgate::store::read_all(&config.data_dir, account.as_deref())?;
    let mut out = std::io::stdout().lock();
    for row in &rows {
        writeln!(out, "{}", wxgate::events::to_json(row))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
