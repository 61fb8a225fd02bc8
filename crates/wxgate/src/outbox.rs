//! The outbox: pushes handed to the owner's service, or published to NATS, in the
//! background, at least once.
//!
//! Entries are written in the same transaction as their push, so a push that was
//! acknowledged is also queued, and a restart loses nothing. One worker delivers them:
//! for each follower only the oldest pending entry is due, so a follower's pushes
//! arrive in order; a failure is tried again after an exponential backoff, and after
//! `max_attempts` the entry is parked as dead, listed and re-driven from the CLI
//! (`wxgate outbox`). The service may see a push more than once (after a crash between
//! its answer and our commit) and recognises it by `X-Wxgate-Dedup-Key`.
//!
//! An entry whose `url` is `nats:{subject}` is a publish to JetStream instead (see
//! [`crate::nats`]): delivered when JetStream acks it; JetStream itself drops a second
//! copy by its `Nats-Msg-Id`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::client::Client;
use crate::config::{Config, OutboxConfig, Secret};
use crate::forward;
use crate::http::unix_ms;
use crate::nats::{self, PublishError, Publisher};
use crate::store::{Attempted, Due, Store};

/// How long one background delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claimed entry is kept from other nodes: longer than any delivery (a
/// delivery times out after 10 s). After a crash, its entries are due again then.
const CLAIM: Duration = Duration::from_secs(12);
/// Most entries attempted at once (and read per look): with the default 200 ms between
/// looks, the outbox hands on up to about 2,500 entries a second.
const BATCH: usize = 512;
/// Longest wait between two tries of a publish while NATS is not connected, so that the
/// outbox catches up soon after it is back.
const NOT_CONNECTED_RETRY_MAX: Duration = Duration::from_secs(10);

/// Starts the worker; it runs until the runtime stops.
pub fn spawn(
    config: &Config,
    store: Store,
    client: Client,
    secrets: Arc<Secrets>,
    nats: Option<Arc<Publisher>>,
) -> tokio::task::JoinHandle<()> {
    let targets = Arc::new(Targets { client, secrets, nats });
    let worker = Worker { store, targets, cfg: config.outbox };
    tokio::spawn(worker.run())
}

/// Each account's forward secret, replaced when the config is reloaded.
#[derive(Default)]
pub struct Secrets(std::sync::RwLock<Arc<HashMap<String, Secret>>>);

impl Secrets {
    pub fn of(config: &Config) -> Secrets {
        let s = Secrets::default();
        s.replace(config);
        s
    }

    pub fn replace(&self, config: &Config) {
        let map = config
            .accounts
            .iter()
            .filter_map(|a| a.forward_secret.clone().map(|s| (a.name.clone(), s)))
            .collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    fn current(&self) -> Arc<HashMap<String, Secret>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Worker {
    store: Store,
    targets: Arc<Targets>,
    cfg: OutboxConfig,
}

/// Where entries go: the owner's service (signed with the account's secret) or NATS.
struct Targets {
    client: Client,
    secrets: Arc<Secrets>,
    nats: Option<Arc<Publisher>>,
}

impl Worker {
    /// Polls for due entries and starts each in a task of its own, so that a slow or
    /// hanging endpoint holds up only its own follower's queue.
    async fn run(self) {
        let in_flight: Arc<std::sync::Mutex<HashSet<i64>>> = Arc::default();
        let mut lease = Lease::default();
        let mut unreadable = false;
        loop {
            if self.store.shared() && !lease.hold(&self.store, self.cfg.lease).await {
                tokio::time::sleep(self.cfg.poll).await;
                continue;
            }
            let store = self.store.clone();
            let due = tokio::task::spawn_blocking(move || store.due(unix_ms(), BATCH)).await;
            let due = match due {
                Ok(Ok(due)) => {
                    if std::mem::take(&mut unreadable) {
                        info!(target: "wxgate::outbox", "the outbox can be read again");
                    }
                    due
                }
                Ok(Err(e)) => {
                    // Once per outage: the store logs the outage itself too.
                    if !std::mem::replace(&mut unreadable, true) {
                        warn!(target: "wxgate::outbox", error = %e, "cannot read the outbox");
                    }
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            // Claimed before they go: with several nodes, a lease that moves on while an
            // entry is on its way must not hand the same entry to another node.
            let due: Vec<Due> = {
                let busy = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                let room = BATCH.saturating_sub(busy.len());
                due.into_iter().filter(|e| !busy.contains(&e.id)).take(room).collect()
            };
            let ids: Vec<i64> = due.iter().map(|e| e.id).collect();
            let claimed = if !self.store.shared() || ids.is_empty() {
                // One node: its own in-flight set is enough, and a restart finds every
                // entry due at once.
                ids
            } else {
                let until = unix_ms() + CLAIM.as_millis() as i64;
                self.store.claim(ids, until).await.unwrap_or_default()
            };
            for entry in due.into_iter().filter(|e| claimed.contains(&e.id)) {
                // The oldest pending entry of a follower stays its head while it is being
                // delivered; one delivery per follower at a time keeps their order.
                {
                    let mut busy = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    if busy.len() >= BATCH || !busy.insert(entry.id) {
                        continue;
                    }
                }
                let (targets, store, cfg, busy) =
                    (self.targets.clone(), self.store.clone(), self.cfg, in_flight.clone());
                tokio::spawn(async move {
                    let id = entry.id;
                    deliver(&targets, &store, cfg, entry).await;
                    busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                });
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
    }
}

/// With a shared store, one node at a time runs the outbox, so that every follower's
/// entries still go out one at a time and in order. Its lease is renewed at half-time;
/// when the node dies, another takes over once the lease ran out.
#[derive(Default)]
struct Lease {
    /// Unix ms until which this node holds the lease; 0 when it does not.
    until: i64,
    /// Unix ms before which a node without the lease does not ask again.
    next_try: i64,
}

impl Lease {
    async fn hold(&mut self, store: &Store, length: Duration) -> bool {
        let now = unix_ms();
        let length = length.as_millis() as i64;
        if self.until - now > length / 2 {
            return true;
        }
        // Without the lease, ask a few times per lease rather than at every poll.
        if self.until == 0 && now < self.next_try {
            return false;
        }
        self.next_try = now + length / 4;
        let held = store.lease("outbox", crate::node_id(), now + length).await;
        match held {
            Ok(true) => {
                if self.until == 0 {
                    info!(target: "wxgate::outbox", node = crate::node_id(), "this node now delivers the outbox");
                }
                self.until = now + length;
            }
            Ok(false) => self.until = 0,
            Err(e) => {
                if self.until != 0 {
                    warn!(target: "wxgate::outbox", error = %e, "cannot renew the outbox lease");
                }
                self.until = 0;
            }
        }
        self.until != 0
    }
}

async fn deliver(targets: &Targets, store: &Store, cfg: OutboxConfig, entry: Due) {
    // While NATS is away, publishes wait: never parked as dead for it, tried again
    // soon, and logged once by the publisher rather than once per entry.
    let mut hopeless = false;
    let (result, waiting) = match entry.url.strip_prefix(nats::SCHEME) {
        Some(subject) => match publish(targets, &entry, subject).await {
            // Not connected, or connected to a server that does not answer (hung): the
            // entry waits for it, as for an outage.
            Err(e @ (PublishError::NotConnected | PublishError::TimedOut(_))) => {
                (Err(e.to_string()), true)
            }
            Err(e @ PublishError::TooLarge(..)) => {
                hopeless = true;
                (Err(e.to_string()), false)
            }
            other => (other.map_err(|e| e.to_string()), false),
        },
        // An account missing from the config (a reload removed it, perhaps for a
        // moment): its entries wait for it rather than fail.
        None if !targets.secrets.current().contains_key(&entry.account) => (
            Err(format!(
                "account {:?} is not in the config (or has no forward_secret); waiting for it",
                entry.account
            )),
            true,
        ),
        None => (send(targets, &entry).await, false),
    };
    let attempted = match result {
        Ok(()) => {
            debug!(target: "wxgate::outbox", account = %entry.account, id = entry.id, "delivered");
            Attempted::Delivered
        }
        // Not an attempt: the entry waits for NATS or for its account, and counts no
        // failure.
        Err(reason) if waiting => {
            let retry = cfg.backoff.min(NOT_CONNECTED_RETRY_MAX);
            debug!(target: "wxgate::outbox", account = %entry.account, id = entry.id, error = %reason, "entry waits");
            Attempted::Deferred { reason, next_at_ms: unix_ms() + retry.as_millis() as i64 }
        }
        Err(error) => {
            let attempts = entry.attempts as u32 + 1;
            // Too large for NATS: parked at once, so that it holds up no later entry.
            let dead = attempts >= cfg.max_attempts || hopeless;
            let backoff =
                cfg.backoff.saturating_mul(1 << (attempts - 1).min(20)).min(cfg.backoff_max);
            warn!(target: "wxgate::outbox", account = %entry.account, id = entry.id, attempts, dead, error = %error, "background delivery failed");
            Attempted::Failed { error, next_at_ms: unix_ms() + backoff.as_millis() as i64, dead }
        }
    };
    if let Err(e) = store.attempted(entry.id, attempted).await {
        warn!(target: "wxgate::outbox", error = %e, "outbox result not recorded; the entry will be tried again");
    }
}

/// Posts an entry to the owner's service.
async fn send(targets: &Targets, entry: &Due) -> Result<(), String> {
    let Some(secret) = targets.secrets.current().get(&entry.account).cloned() else {
        return Err(format!("account {:?} has no forward_secret any more", entry.account));
    };
    forward::call(
        &targets.client,
        &entry.url,
        &secret,
        &entry.dedup_key,
        &entry.payload,
        DELIVERY_TIMEOUT,
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Publishes an entry to JetStream; delivered once it is acked (also as a duplicate).
async fn publish(targets: &Targets, entry: &Due, subject: &str) -> Result<(), PublishError> {
    let Some(nats) = &targets.nats else {
        return Err(PublishError::Failed("[nats] is not configured any more".into()));
    };
    let id = nats::msg_id(&entry.account, &entry.dedup_key);
    let payload = bytes::Bytes::from(entry.payload.clone());
    nats.publish(&entry.account, nats::Via::Outbox, subject, &id, payload, nats::PUBLISH_TIMEOUT)
        .await
        .map(drop)
}

/// `wxgate outbox …`: list the background deliveries, and re-drive parked ones.
#[derive(Debug, clap::Subcommand)]
pub enum OutboxCommand {
    /// List entries as JSON lines, oldest first.
    List {
        #[arg(long, default_value = "wxgate.toml")]
        config: std::path::PathBuf,
        /// Only entries in this state: pending, delivered or dead.
        #[arg(long)]
        state: Option<String>,
    },
    /// Make parked (dead) entries pending again, so the running server delivers them.
    Redrive {
        #[arg(long, default_value = "wxgate.toml")]
        config: std::path::PathBuf,
        /// The entry to re-drive.
        #[arg(long, conflicts_with = "all")]
        id: Option<i64>,
        /// Every dead entry.
        #[arg(long)]
        all: bool,
    },
}

/// Runs an outbox command, printing to `out`.
pub fn run(cmd: OutboxCommand, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    match cmd {
        OutboxCommand::List { config, state } => {
            let config = Config::load(&config)?;
            if let Some(s) = state.as_deref() {
                anyhow::ensure!(
                    ["pending", "delivered", "dead"].contains(&s),
                    "--state: use pending, delivered or dead, not {s:?}"
                );
            }
            for row in crate::store::outbox_list(&config.store_location(), state.as_deref())? {
                writeln!(out, "{}", serde_json::to_string(&row)?)?;
            }
            Ok(())
        }
        OutboxCommand::Redrive { config, id, all } => {
            anyhow::ensure!(id.is_some() || all, "give --id N or --all");
            let config = Config::load(&config)?;
            let store = Store::open(config.store_location())?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let n = rt.block_on(store.redrive(id))?;
            store.close(Duration::from_secs(10));
            writeln!(out, "{n} entr{} pending again", if n == 1 { "y is" } else { "ies are" })?;
            Ok(())
        }
    }
}
