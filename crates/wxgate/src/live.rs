//! The accounts a running server serves, changed without a restart.
//!
//! Requests find their account by path in a map that a reload swaps whole: a request in
//! flight keeps the account it started with, the next one sees the new map. A reload
//! reads the config file again (on SIGHUP, and when the file changes); an account whose
//! table is unchanged keeps its state (token cache, forwards in flight), a changed one
//! starts afresh, a removed one stops being served, a new one is served at once. A file
//! that does not check out changes nothing: the error is logged and the old accounts
//! stay. Nodes of a cluster read the same file (from configuration management) and so
//! converge within one check interval.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use crate::client::Client;
use crate::config::{Account, Config};
use crate::dedup::Dedup;
use crate::http::AccountState;
use crate::metrics::Metrics;
use crate::outbox::Secrets;
use crate::store::Store;
use crate::wechat_api;

/// How long a changed config file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(200);

/// What every account's state shares.
#[derive(Clone)]
pub struct Parts {
    pub store: Store,
    pub dedup: Arc<Dedup>,
    pub metrics: Arc<Metrics>,
    pub client: Client,
    pub secrets: Arc<Secrets>,
    /// The NATS publisher, when `[nats]` is configured.
    pub publisher: Option<Arc<crate::nats::Publisher>>,
    /// The access tokens shared through Redis, when `redis` is configured.
    pub shared_tokens: Option<Arc<crate::shared_token::SharedTokens>>,
}

/// The served accounts and the config they came from.
pub struct Live {
    by_path: RwLock<Arc<HashMap<String, Arc<AccountState>>>>,
    config: RwLock<Arc<Config>>,
    /// The config the server started with: server-wide settings keep its values.
    started: Arc<Config>,
    /// Each account's table as written, to tell which ones a reload changed.
    tables: Mutex<BTreeMap<String, toml::Value>>,
    parts: Parts,
}

/// What a reload changed, by account name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Settings outside `[[accounts]]` that differ: they take a restart.
    pub need_restart: Vec<String>,
}

impl Live {
    pub fn new(config: &Config, text: Option<&str>, parts: Parts) -> Live {
        let by_path = config.accounts.iter().map(|a| (a.path.clone(), state(a, &parts))).collect();
        Live {
            by_path: RwLock::new(Arc::new(by_path)),
            config: RwLock::new(Arc::new(config.clone())),
            started: Arc::new(config.clone()),
            tables: Mutex::new(text.map(account_tables).unwrap_or_default()),
            parts,
        }
    }

    /// Remembers the account tables of the file the config came from, so that the first
    /// reload recreates only the accounts it changes.
    pub fn seed(&self, text: &str) {
        *self.tables.lock().unwrap_or_else(|p| p.into_inner()) = account_tables(text);
    }

    /// The account served at `path`.
    pub fn account_at(&self, path: &str) -> Option<Arc<AccountState>> {
        read(&self.by_path).get(path).cloned()
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        read(&self.config).clone()
    }

    /// Reads `path` again and serves its accounts.
    pub fn reload(&self, path: &Path) -> anyhow::Result<Changes> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        let config = Config::from_text(&text, path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(self.apply(&config, &text))
    }

    /// Serves `config`'s accounts (`text` is the file it came from).
    pub fn apply(&self, config: &Config, text: &str) -> Changes {
        let new_tables = account_tables(text);
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.config();
        let mut changes = Changes::default();
        let mut by_path = HashMap::new();
        for account in &config.accounts {
            let before = old.accounts.iter().find(|a| a.name == account.name);
            let same_table = tables.get(&account.name) == new_tables.get(&account.name);
            let kept = before
                .filter(|b| same_table && b.path == account.path)
                .and_then(|b| self.account_at(&b.path));
            let state = match kept {
                Some(state) => state,
                None => {
                    if before.is_some() {
                        changes.changed.push(account.name.clone());
                    } else {
                        changes.added.push(account.name.clone());
                    }
                    state(account, &self.parts)
                }
            };
            by_path.insert(account.path.clone(), state);
        }
        changes.removed = old
            .accounts
            .iter()
            .filter(|a| config.account(&a.name).is_none())
            .map(|a| a.name.clone())
            .collect();
        changes.need_restart = restart_settings(&self.started, config);

        self.parts.secrets.replace(config);
        *write(&self.by_path) = Arc::new(by_path);
        *write(&self.config) = Arc::new(config.clone());
        *tables = new_tables;
        changes
    }
}

/// One account's state, built from its config and the shared parts.
pub fn state(account: &Account, parts: &Parts) -> Arc<AccountState> {
    Arc::new(AccountState {
        account: account.clone(),
        store: parts.store.clone(),
        dedup: parts.dedup.clone(),
        metrics: parts.metrics.clone(),
        client: parts.client.clone(),
        api: account.app_secret.clone().map(|secret| {
            let api = wechat_api::WechatApi::new(
                parts.client.clone(),
                &account.api_base,
                &account.app_id,
                secret,
            );
            Arc::new(api.shared_through(parts.shared_tokens.clone()))
        }),
        nats: parts.publisher.clone().filter(|_| account.publish != crate::config::Publish::Off),
        fates: Default::default(),
    })
}

/// Each `[[accounts]]` table of the file by name.
fn account_tables(text: &str) -> BTreeMap<String, toml::Value> {
    let Ok(root) = toml::from_str::<toml::Table>(text) else { return BTreeMap::new() };
    let Some(toml::Value::Array(accounts)) = root.get("accounts") else { return BTreeMap::new() };
    accounts.iter().filter_map(|a| Some((a.get("name")?.as_str()?.to_owned(), a.clone()))).collect()
}

/// The server-wide settings of `new` that differ from what the server runs with.
fn restart_settings(old: &Config, new: &Config) -> Vec<String> {
    let mut differ = Vec::new();
    let mut check = |name: &str, same: bool| {
        if !same {
            differ.push(name.to_owned());
        }
    };
    check("listen", old.listen == new.listen);
    check("metrics_listen", old.metrics_listen == new.metrics_listen);
    // The store: `database`, or `data_dir` when there is no database.
    check(
        if old.database.is_some() || new.database.is_some() { "database" } else { "data_dir" },
        old.store_location() == new.store_location(),
    );
    let nats = |c: &Config| {
        c.nats.as_ref().map(|n| {
            format!(
                "{} {} {} {:?} {:?}",
                n.url.expose(),
                n.stream,
                n.subject_prefix,
                n.max_age,
                n.duplicate_window
            )
        })
    };
    check("nats", nats(old) == nats(new));
    let redis = |c: &Config| c.redis.as_ref().map(|r| r.expose().to_owned());
    check("redis", redis(old) == redis(new));
    check("dedup_window_secs", old.dedup_window_secs == new.dedup_window_secs);
    check("dedup_memory_entries", old.dedup_memory_entries == new.dedup_memory_entries);
    check("outbox", format!("{:?}", old.outbox) == format!("{:?}", new.outbox));
    check("retention", format!("{:?}", old.retention) == format!("{:?}", new.retention));
    check("http", format!("{:?}", old.http) == format!("{:?}", new.http));
    check("allow_from", format!("{:?}", old.allow_from) == format!("{:?}", new.allow_from));
    differ
}

/// SIGHUP, caught from the moment this is made (the default action ends the process).
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts catching SIGHUP; call it inside the runtime, before anything slow.
    pub fn listen() -> Hangups {
        Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }
}

/// Reloads `path` on SIGHUP and whenever its modification time changes (looked at every
/// `every`; zero: on SIGHUP only). Runs until the runtime stops.
pub async fn watch(live: Arc<Live>, path: PathBuf, every: Duration, hangups: Hangups) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    #[cfg(unix)]
    let mut hup = hangups.signal;
    #[cfg(not(unix))]
    let _ = hangups;
    loop {
        let tick = async {
            if every.is_zero() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(every).await;
        };
        #[cfg(unix)]
        let signalled = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let by_signal = tokio::select! {
            () = tick => false,
            () = signalled => true,
        };
        let before = modified(&path);
        if !by_signal && before == seen {
            continue;
        }
        // A file being written now is read once it has stopped changing, so that a
        // valid prefix of it is never served.
        tokio::time::sleep(SETTLE).await;
        let after = modified(&path);
        if !by_signal && after != before {
            continue;
        }
        seen = after;
        let (l, p) = (live.clone(), path.clone());
        match tokio::task::spawn_blocking(move || l.reload(&p)).await {
            Ok(Ok(c)) => {
                info!(
                    added = ?c.added,
                    changed = ?c.changed,
                    removed = ?c.removed,
                    "config reloaded"
                );
                if !c.need_restart.is_empty() {
                    warn!(settings = ?c.need_restart, "these settings changed but take effect only after a restart");
                }
            }
            Ok(Err(e)) => error!("config not reloaded, the accounts stay as they were: {e}"),
            Err(e) => error!("config not reloaded: {e}"),
        }
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "[[accounts]]\nname = \"a\"\npath = \"/a\"\n[[accounts.rules]]\nreply = { text = \"one\" }\n";

    #[test]
    fn a_changed_rule_changes_the_account_table() {
        let before = account_tables(ONE);
        assert_eq!(before.len(), 1);
        assert_eq!(before, account_tables(ONE));
        assert_ne!(before, account_tables(&ONE.replace("one", "two")));
        assert!(account_tables("not toml [").is_empty());
    }

    #[test]
    fn server_wide_changes_are_named_against_what_runs() {
        const ACCOUNT: &str =
            "[[accounts]]\nname = \"a\"\npath = \"/a\"\napp_id = \"wx1\"\ntoken = \"t\"\n";
        let config =
            |top: &str, tables: &str| Config::parse(&format!("{top}\n{ACCOUNT}{tables}")).unwrap();
        let running = config("data_dir = \"d\"", "");
        assert!(restart_settings(&running, &running).is_empty());
        let nats = config("data_dir = \"d\"", "[nats]\nurl = \"nats://127.0.0.1:4222\"\n");
        assert_eq!(restart_settings(&running, &nats), ["nats"]);
        let redis = config("data_dir = \"d\"\nredis = \"redis://127.0.0.1/\"", "");
        assert_eq!(restart_settings(&running, &redis), ["redis"]);
        assert_eq!(restart_settings(&running, &config("data_dir = \"e\"", "")), ["data_dir"]);
        let pg = config("database = \"postgres://u@h/db\"\ndata_dir = \"d\"", "");
        assert_eq!(restart_settings(&running, &pg), ["database"]);
        // With a database, data_dir is not used: changing it needs nothing.
        let pg_e = config("database = \"postgres://u@h/db\"\ndata_dir = \"e\"", "");
        assert!(restart_settings(&pg, &pg_e).is_empty());
    }
}
