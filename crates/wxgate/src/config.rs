//! The configuration file (`wxgate.toml`): server settings, accounts and their reply
//! rules, read once into typed values. Every problem is reported with the path of the
//! field that causes it, e.g. `accounts[0].encoding_aes_key: must be 43 characters, got 42`.
//!
//! Secrets need not sit in the file: any of `app_id`, `token`, `encoding_aes_key`,
//! `previous_token`, `previous_encoding_aes_key`, `app_secret`, `forward_secret`,
//! `nats.url` and `redis` may be written `"${VAR}"`, and is then read from the
//! environment variable `VAR` at start-up.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wxgate_protocol::EncodingAesKey;

use crate::rules::{Rule, RuleFile};

/// Default freshness window for the query `timestamp`, in seconds.
pub const DEFAULT_SKEW_SECS: u64 = 300;
/// Default largest accepted body, in bytes.
pub const DEFAULT_MAX_BODY: usize = 262_144;

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl fmt::Display) -> Self {
        ConfigError { path: path.into(), message: message.to_string() }
    }
}

/// The whole server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint; off when not set.
    pub metrics_listen: Option<SocketAddr>,
    /// Folder of the embedded store, relative to the config file. Default `wxgate-data`.
    pub data_dir: PathBuf,
    /// PostgreSQL URL of a store shared by several nodes (`postgres://user@host/db`, or
    /// `"${VAR}"`); when not set, the store is SQLite in `data_dir`.
    pub database: Option<String>,
    /// How often a running server looks for changes to its config file (0: only on
    /// SIGHUP). Default 5 s.
    pub reload_secs: u64,
    /// How long a push's key is remembered in memory to recognise WeChat's retries
    /// (they come within about 15 s). The store keeps keys for good. Default 600 s.
    pub dedup_window_secs: u64,
    /// Most recently answered pushes kept in memory. Default 200,000.
    pub dedup_memory_entries: usize,
    pub outbox: OutboxConfig,
    pub retention: Retention,
    pub http: HttpConfig,
    /// When not empty, only connections from these networks are served (WeChat's
    /// callback addresses, from its `getcallbackip` API); others are closed at once.
    pub allow_from: Vec<Network>,
    /// Where pushes are published (`[nats]`); off when not set.
    pub nats: Option<NatsConfig>,
    /// Redis URL through which every node shares each account's access token; each node
    /// keeps its own when not set.
    pub redis: Option<Secret>,
    pub accounts: Vec<Account>,
}

/// NATS JetStream, where every push is published for downstream consumers (`[nats]`).
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL, `nats://host:port`; it may carry credentials, so it is kept secret.
    pub url: Secret,
    /// The stream, created at start-up if absent. Default `WXGATE`.
    pub stream: String,
    /// First tokens of every subject, `{prefix}.{account}.{kind}`. Default `wxgate`.
    pub subject_prefix: String,
    /// How long the stream keeps a message, when it is created here; zero keeps them for
    /// good. Default 7 days.
    pub max_age: Duration,
    /// How long JetStream remembers a `Nats-Msg-Id` and drops a second message with it.
    /// Default 120 s.
    pub duplicate_window: Duration,
}

/// When an account's pushes are published to NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    Off,
    /// Through the outbox, written with the push; WeChat is answered at once.
    Background,
    /// Before WeChat is answered: the answer waits for JetStream's ack.
    BeforeReply,
}

/// Limits of the HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    /// A request's headers must arrive within this, also on an idle keep-alive
    /// connection. Default 10 s.
    pub header_timeout: Duration,
    /// How long a shutdown waits for requests in flight. Default 10 s.
    pub drain: Duration,
    /// Most connections at once. Default 4096.
    pub max_connections: usize,
}

/// An IPv4 or IPv6 network, `addr/prefix` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(s: &str) -> Result<Network, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: std::net::IpAddr =
            addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?,
            None => max,
        };
        // An IPv4-mapped IPv6 network (::ffff:a.b.c.d/n) is the IPv4 network it maps.
        if let std::net::IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Network { addr: v4.into(), prefix: prefix - 96 });
        }
        Ok(Network { addr, prefix })
    }

    /// Whether `ip` lies in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        // Compare the top `prefix` bits of the two addresses.
        let same = |a: u128, b: u128, width: u32| {
            let shift = width - u32::from(self.prefix);
            shift >= width || (a >> shift) == (b >> shift)
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same(u32::from(net).into(), u32::from(ip).into(), 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => same(net.into(), ip.into(), 128),
            _ => false,
        }
    }
}

/// How long records are kept.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// For kinds not named in `kinds`; `None` keeps them for good.
    pub default: Option<Duration>,
    /// Per kind (e.g. `location_report_event`, which arrives every 5 s per follower).
    pub kinds: Vec<(String, Duration)>,
    /// How often old records are purged.
    pub interval: Duration,
}

impl Retention {
    pub fn enabled(&self) -> bool {
        self.default.is_some() || !self.kinds.is_empty()
    }
}

/// A token, redacted from `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A server URL without the credentials it may carry, for logs and errors: the user
/// information (up to the last `@` before the query: a password may hold `/` or `@`) and
/// the values of query parameters named `password` or `pass`.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    // Everything up to the last `@` may be user information, whatever it holds (a
    // password may hold `/`, `?`, `#` or `@`): better too much hidden than a password.
    let rest = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    let (host_and_path, query) = rest.split_once('?').map_or((rest, None), |(b, q)| (b, Some(q)));
    let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    let query = query.map_or(String::new(), |q| {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") =>
                {
                    format!("{k}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        format!("?{}", pairs.join("&"))
    });
    format!("{scheme}{host_and_path}{query}")
}

/// One Official Account served on its own path.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub path: String,
    pub app_id: String,
    /// Current token first, then the previous one during a rotation.
    pub tokens: Vec<Secret>,
    /// Current EncodingAESKey first, then the previous one during a rotation.
    pub aes_keys: Vec<EncodingAesKey>,
    /// 0 turns the freshness check off.
    pub max_timestamp_skew_secs: u64,
    pub require_encryption: bool,
    pub max_body_bytes: usize,
    pub rules: Vec<Rule>,
    /// Time from a push's arrival within which its answer must be ready; WeChat's 5 s
    /// also cover its connect and send. Default 4000 ms.
    pub reply_budget: Duration,
    /// What happens to a forward's reply that misses the budget.
    pub late_reply: LateReply,
    /// AppSecret, for the WeChat API (customer-service messages).
    pub app_secret: Option<Secret>,
    /// Base URL of the WeChat API. Default `https://api.weixin.qq.com`.
    pub api_base: String,
    /// Key of the HMAC-SHA256 signature on forwards to the owner's service.
    pub forward_secret: Option<Secret>,
    /// Deliveries WeChat makes of one push (3); the last held one is answered `success`.
    pub wechat_attempts: u32,
    /// Publishing to NATS: `background` by default when `[nats]` is set, else off.
    pub publish: Publish,
}

/// The fate of a forward's reply that is not ready within the reply budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateReply {
    /// Answer WeChat `success` at once and send the reply, when it comes, as a
    /// customer-service message (needs `app_secret`; verified service accounts).
    CustomerService,
    /// Leave the delivery unanswered so that WeChat delivers again, and answer a retry
    /// as soon as the reply is ready; the last delivery gets `success`.
    HoldForRetry,
    /// Answer `success` and drop the reply.
    Drop,
}

/// The background outbox: retries with exponential backoff, parked as dead after
/// `max_attempts`.
#[derive(Debug, Clone, Copy)]
pub struct OutboxConfig {
    pub max_attempts: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// How often the outbox looks for due entries.
    pub poll: Duration,
    /// With a shared store: how long one node's turn at the cluster's chores (the
    /// outbox, the sweep of orphaned forwards) lasts unless renewed; when a node dies,
    /// another takes over within this time. Default 10 s.
    pub lease: Duration,
    /// With a shared store: a forward still running after this long lost its node, and
    /// the push goes to the outbox instead. Default 120 s, well past any forward.
    pub orphan_after: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    data_dir: Option<PathBuf>,
    database: Option<String>,
    reload_secs: Option<u64>,
    dedup_window_secs: Option<u64>,
    dedup_memory_entries: Option<usize>,
    #[serde(default)]
    outbox: FileOutbox,
    #[serde(default)]
    retention: FileRetention,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    allow_from: Vec<String>,
    nats: Option<FileNats>,
    redis: Option<String>,
    #[serde(default)]
    accounts: Vec<FileAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNats {
    url: String,
    stream: Option<String>,
    subject_prefix: Option<String>,
    max_age_days: Option<f64>,
    duplicate_window_secs: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    header_timeout_ms: Option<u64>,
    drain_ms: Option<u64>,
    max_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    default_days: Option<f64>,
    #[serde(default)]
    kinds: std::collections::BTreeMap<String, f64>,
    purge_interval_secs: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileOutbox {
    max_attempts: Option<u32>,
    backoff_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    poll_ms: Option<u64>,
    lease_ms: Option<u64>,
    orphan_after_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccount {
    name: String,
    path: String,
    app_id: String,
    token: String,
    encoding_aes_key: Option<String>,
    previous_token: Option<String>,
    previous_encoding_aes_key: Option<String>,
    max_timestamp_skew_secs: Option<u64>,
    require_encryption: Option<bool>,
    max_body_bytes: Option<usize>,
    reply_budget_ms: Option<u64>,
    late_reply: Option<String>,
    app_secret: Option<String>,
    api_base: Option<String>,
    forward_secret: Option<String>,
    wechat_attempts: Option<u32>,
    publish: Option<String>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

impl Config {
    /// Reads and checks a configuration file. Relative `data_dir`s are taken from the
    /// file's folder, so the server finds its data whatever the working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        Config::from_text(&text, path)
    }

    /// Parses and checks the text of the file at `path` (which places a relative
    /// `data_dir`).
    pub fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::parse(text)?;
        if config.data_dir.is_relative() {
            let base =
                path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            config.data_dir = base.join(&config.data_dir);
        }
        Ok(config)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let path = e.span().map(|s| location(text, s.start)).unwrap_or_else(|| "config".into());
            ConfigError::new(path, e.message())
        })?;
        let listen = match file.listen {
            Some(l) => l.parse().map_err(|e| ConfigError::new("listen", format!("{e}: {l:?}")))?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let metrics_listen = match file.metrics_listen {
            Some(l) => Some(
                l.parse().map_err(|e| ConfigError::new("metrics_listen", format!("{e}: {l:?}")))?,
            ),
            None => None,
        };
        if file.accounts.is_empty() {
            return Err(ConfigError::new("accounts", "at least one [[accounts]] is required"));
        }
        let nats = file.nats.map(NatsConfig::check).transpose()?;
        let redis = match file.redis {
            Some(url) => {
                let url = token(&url, "redis")?;
                redis::IntoConnectionInfo::into_connection_info(url.expose())
                    .map_err(|e| ConfigError::new("redis", e))?;
                Some(url)
            }
            None => None,
        };
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        let mut accounts = Vec::new();
        for (i, a) in file.accounts.into_iter().enumerate() {
            let account = Account::check(a, &format!("accounts[{i}]"), nats.is_some())?;
            if !names.insert(account.name.clone()) {
                return Err(ConfigError::new(
                    format!("accounts[{i}].name"),
                    "another account has this name",
                ));
            }
            if !paths.insert(account.path.clone()) {
                return Err(ConfigError::new(
                    format!("accounts[{i}].path"),
                    "another account serves this path",
                ));
            }
            accounts.push(account);
        }
        let dedup_memory_entries = file.dedup_memory_entries.unwrap_or(200_000);
        let database = match &file.database {
            None => None,
            Some(raw) => {
                let url = expand(raw, "database")?;
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(ConfigError::new(
                        "database",
                        "must be a PostgreSQL URL (postgres://user@host:port/db); the embedded SQLite store is set with data_dir",
                    ));
                }
                url.parse::<postgres::Config>().map_err(|e| {
                    ConfigError::new("database", format!("not a valid PostgreSQL URL: {e}"))
                })?;
                Some(url)
            }
        };
        if dedup_memory_entries == 0 {
            return Err(ConfigError::new("dedup_memory_entries", "must be at least 1"));
        }
        let o = file.outbox;
        let outbox = OutboxConfig {
            max_attempts: o.max_attempts.unwrap_or(10).max(1),
            backoff: Duration::from_millis(o.backoff_ms.unwrap_or(1000)),
            backoff_max: Duration::from_millis(o.backoff_max_ms.unwrap_or(300_000)),
            poll: Duration::from_millis(o.poll_ms.unwrap_or(200).max(1)),
            lease: Duration::from_millis(o.lease_ms.unwrap_or(10_000).max(10)),
            orphan_after: Duration::from_millis(o.orphan_after_ms.unwrap_or(120_000)),
        };
        let days = |path: String, d: f64| {
            if d.is_finite() && d > 0.0 {
                Ok(Duration::from_secs_f64(d * 86_400.0))
            } else {
                Err(ConfigError::new(path, "must be a positive number of days (fractions allowed)"))
            }
        };
        let r = file.retention;
        let retention = Retention {
            default: r
                .default_days
                .filter(|d| *d != 0.0)
                .map(|d| days("retention.default_days".into(), d))
                .transpose()?,
            kinds: r
                .kinds
                .into_iter()
                .map(|(kind, d)| Ok((kind.clone(), days(format!("retention.kinds.{kind}"), d)?)))
                .collect::<Result<_, ConfigError>>()?,
            interval: Duration::from_secs_f64(
                r.purge_interval_secs.unwrap_or(3600.0).clamp(0.01, 86_400.0),
            ),
        };
        let h = file.http;
        let http = HttpConfig {
            header_timeout: Duration::from_millis(h.header_timeout_ms.unwrap_or(10_000).max(1)),
            drain: Duration::from_millis(h.drain_ms.unwrap_or(10_000)),
            max_connections: h.max_connections.unwrap_or(4096).max(1),
        };
        let allow_from = file
            .allow_from
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Network::parse(n).map_err(|e| ConfigError::new(format!("allow_from[{i}]"), e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Config {
            listen,
            metrics_listen,
            outbox,
            retention,
            http,
            allow_from,
            nats,
            redis,
            data_dir: file.data_dir.unwrap_or_else(|| PathBuf::from("wxgate-data")),
            database,
            reload_secs: file.reload_secs.unwrap_or(5),
            dedup_window_secs: file.dedup_window_secs.unwrap_or(600),
            dedup_memory_entries,
            accounts,
        })
    }

    /// Where the store lives: PostgreSQL when `database` is set, else SQLite in
    /// `data_dir`.
    pub fn store_location(&self) -> crate::store::Location {
        match &self.database {
            Some(url) => crate::store::Location::Postgres(url.clone()),
            None => crate::store::Location::Sqlite(self.data_dir.clone()),
        }
    }

    /// The account of this name.
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name == name)
    }
}

impl NatsConfig {
    fn check(n: FileNats) -> Result<NatsConfig, ConfigError> {
        let url = token(&n.url, "nats.url")?;
        url.expose()
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| ConfigError::new("nats.url", e))?;

        // JetStream refuses '.', wildcards, whitespace and path separators in a name.
        let stream = n.stream.unwrap_or_else(|| "WXGATE".into());
        if stream.is_empty()
            || !stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                "nats.stream",
                format!("use letters, digits, '_' or '-' (not empty), not {stream:?}"),
            ));
        }
        let subject_prefix = n.subject_prefix.unwrap_or_else(|| "wxgate".into());
        let token_ok = |t: &str| {
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && !b"*>".contains(&b))
        };
        if !subject_prefix.split('.').all(token_ok) {
            return Err(ConfigError::new(
                "nats.subject_prefix",
                format!(
                    "must be subject tokens joined by '.', without spaces, '*' or '>', not {subject_prefix:?}"
                ),
            ));
        }

        let max_age = match n.max_age_days.unwrap_or(7.0) {
            0.0 => Duration::ZERO,
            d if d.is_finite() && d > 0.0 => Duration::from_secs_f64(d * 86_400.0),
            _ => {
                return Err(ConfigError::new(
                    "nats.max_age_days",
                    "must be a positive number of days (fractions allowed), or 0 for no limit",
                ));
            }
        };
        let duplicate_window = match n.duplicate_window_secs.unwrap_or(120.0) {
            s if s.is_finite() && s >= 1.0 => Duration::from_secs_f64(s),
            _ => {
                return Err(ConfigError::new(
                    "nats.duplicate_window_secs",
                    "must be at least 1 (WeChat retries within about 15 s)",
                ));
            }
        };
        if !max_age.is_zero() && duplicate_window > max_age {
            return Err(ConfigError::new(
                "nats.duplicate_window_secs",
                "must not be longer than max_age_days (JetStream refuses such a stream)",
            ));
        }
        Ok(NatsConfig { url, stream, subject_prefix, max_age, duplicate_window })
    }
}

impl Account {
    fn check(a: FileAccount, at: &str, nats: bool) -> Result<Account, ConfigError> {
        let field = |name: &str| format!("{at}.{name}");
        if a.name.is_empty()
            || !a.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::new(
                field("name"),
                "use letters, digits, '_' or '-' (not empty)",
            ));
        }
        if !a.path.starts_with('/') || a.path.contains(['?', '#', ' ']) {
            return Err(ConfigError::new(
                field("path"),
                format!("must be a URL path starting with '/', got {:?}", a.path),
            ));
        }
        let app_id = expand(&a.app_id, &field("app_id"))?;
        if app_id.is_empty() {
            return Err(ConfigError::new(field("app_id"), "must not be empty"));
        }

        let mut tokens = vec![token(&a.token, &field("token"))?];
        if let Some(prev) = &a.previous_token {
            tokens.push(token(prev, &field("previous_token"))?);
        }
        let mut aes_keys = Vec::new();
        for (name, value) in [
            ("encoding_aes_key", &a.encoding_aes_key),
            ("previous_encoding_aes_key", &a.previous_encoding_aes_key),
        ] {
            if let Some(v) = value {
                let v = expand(v, &field(name))?;
                aes_keys
                    .push(EncodingAesKey::parse(&v).map_err(|e| ConfigError::new(field(name), e))?);
            }
        }
        if a.previous_encoding_aes_key.is_some() && a.encoding_aes_key.is_none() {
            return Err(ConfigError::new(
                field("previous_encoding_aes_key"),
                "needs encoding_aes_key as well",
            ));
        }
        let require_encryption = a.require_encryption.unwrap_or(false);
        if require_encryption && aes_keys.is_empty() {
            return Err(ConfigError::new(field("require_encryption"), "needs encoding_aes_key"));
        }
        let max_body_bytes = a.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
        if !(1024..=16 << 20).contains(&max_body_bytes) {
            return Err(ConfigError::new(
                field("max_body_bytes"),
                "must be between 1024 and 16777216",
            ));
        }
        let rules: Vec<Rule> = a
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::check(r, &format!("{at}.rules[{i}]")))
            .collect::<Result<_, _>>()?;

        let reply_budget = Duration::from_millis(a.reply_budget_ms.unwrap_or(4000));
        if !(Duration::from_millis(50)..=Duration::from_millis(4900)).contains(&reply_budget) {
            return Err(ConfigError::new(
                field("reply_budget_ms"),
                "must be between 50 and 4900 (WeChat waits 5 s)",
            ));
        }
        let app_secret =
            a.app_secret.as_deref().map(|s| token(s, &field("app_secret"))).transpose()?;
        let forward_secret =
            a.forward_secret.as_deref().map(|s| token(s, &field("forward_secret"))).transpose()?;
        if forward_secret.is_none() && rules.iter().any(Rule::forwards) {
            return Err(ConfigError::new(
                field("forward_secret"),
                "needed to sign forwards: a rule forwards to the owner's service",
            ));
        }
        let late_reply = match a.late_reply.as_deref() {
            None if app_secret.is_some() => LateReply::CustomerService,
            None => LateReply::HoldForRetry,
            Some("customer_service") if app_secret.is_none() => {
                return Err(ConfigError::new(
                    field("late_reply"),
                    "customer_service needs app_secret",
                ));
            }
            Some("customer_service") => LateReply::CustomerService,
            Some("hold_for_retry") => LateReply::HoldForRetry,
            Some("drop") => LateReply::Drop,
            Some(other) => {
                return Err(ConfigError::new(
                    field("late_reply"),
                    format!("use customer_service, hold_for_retry or drop, not {other:?}"),
                ));
            }
        };
        let api_base = a
            .api_base
            .unwrap_or_else(|| "https://api.weixin.qq.com".into())
            .trim_end_matches('/')
            .to_owned();
        if !api_base.starts_with("http://") && !api_base.starts_with("https://") {
            return Err(ConfigError::new(field("api_base"), "must start with http:// or https://"));
        }
        let wechat_attempts = a.wechat_attempts.unwrap_or(3);
        if !(1..=10).contains(&wechat_attempts) {
            return Err(ConfigError::new(field("wechat_attempts"), "must be between 1 and 10"));
        }
        let publish = match a.publish.as_deref() {
            None if nats => Publish::Background,
            None => Publish::Off,
            Some(_) if !nats => {
                return Err(ConfigError::new(field("publish"), "needs a [nats] table"));
            }
            Some("off") => Publish::Off,
            Some("background") => Publish::Background,
            Some("before_reply") => Publish::BeforeReply,
            Some(other) => {
                return Err(ConfigError::new(
                    field("publish"),
                    format!("use off, background or before_reply, not {other:?}"),
                ));
            }
        };

        Ok(Account {
            name: a.name,
            path: a.path,
            app_id,
            tokens,
            aes_keys,
            max_timestamp_skew_secs: a.max_timestamp_skew_secs.unwrap_or(DEFAULT_SKEW_SECS),
            require_encryption,
            max_body_bytes,
            rules,
            reply_budget,
            late_reply,
            app_secret,
            api_base,
            forward_secret,
            wechat_attempts,
            publish,
        })
    }
}

fn token(value: &str, path: &str) -> Result<Secret, ConfigError> {
    let t = expand(value, path)?;
    if t.is_empty() {
        return Err(ConfigError::new(path, "must not be empty"));
    }
    Ok(Secret(t))
}

/// Resolves `"${VAR}"` from the environment; any other value is taken as written.
fn expand(value: &str, path: &str) -> Result<String, ConfigError> {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(var) => std::env::var(var)
            .map_err(|_| ConfigError::new(path, format!("environment variable {var} is not set"))),
        None => Ok(value.to_owned()),
    }
}

/// `line L, column C` of a byte offset, for TOML syntax errors.
fn location(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[accounts]]
name = "demo"
path = "/wechat"
app_id = "wx7c1f0e2a9b3d4e5f"
token = "qaHeldoutTok2024"
encoding_aes_key = "Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ"
"#;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        let a = &c.accounts[0];
        assert_eq!(a.max_timestamp_skew_secs, 300);
        assert_eq!(a.max_body_bytes, 262_144);
        assert!(!a.require_encryption);
        assert_eq!(format!("{:?}", a.tokens), "[<redacted>]");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err(&BASE.replace("Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ", "short")),
            "accounts[0].encoding_aes_key: must be 43 characters, got 5"
        );
        assert!(err(&BASE.replace("token =", "tokn =")).contains("unknown field `tokn`"));
        assert!(err(&format!("{BASE}\n[[accounts.rules]]\nwhen = {{ content_regex = \"(\" }}\nreply = {{ text = \"x\" }}"))
            .starts_with("accounts[0].rules[0].when.content_regex:"));
        assert_eq!(
            err(&format!("{BASE}{BASE}")),
            "accounts[1].name: another account has this name"
        );
        assert_eq!(err("listen = \"nope\""), "listen: invalid socket address syntax: \"nope\"");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for text in [
            include_str!("../../../wxgate.toml"),
            include_str!("../../../config/wxgate.example.toml"),
        ] {
            Config::parse(text).unwrap();
        }
    }

    #[test]
    fn networks_contain_what_they_should() {
        let n = Network::parse("101.226.62.0/24").unwrap();
        assert!(n.contains("101.226.62.77".parse().unwrap()));
        assert!(n.contains("::ffff:101.226.62.77".parse().unwrap()));
        assert!(!n.contains("101.226.63.1".parse().unwrap()));
        assert!(Network::parse("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(!Network::parse("::1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(Network::parse("fe80::/10").unwrap().contains("fe80::1".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("::ffff:127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert_eq!(
            err(&format!("allow_from = [\"nope\"]\n{BASE}")),
            "allow_from[0]: \"nope\" is not an IP address or network"
        );
    }

    #[test]
    fn nats_and_redis_settings_are_checked() {
        let c = Config::parse(BASE).unwrap();
        assert!(c.nats.is_none() && c.redis.is_none());
        assert_eq!(c.accounts[0].publish, Publish::Off);

        let with = |nats: &str, account: &str| {
            format!("redis = \"redis://127.0.0.1:6379/\"\n[nats]\n{nats}\n{BASE}{account}")
        };
        let c = Config::parse(&with("url = \"nats://127.0.0.1:4222\"", "")).unwrap();
        let n = c.nats.unwrap();
        assert_eq!((n.stream.as_str(), n.subject_prefix.as_str()), ("WXGATE", "wxgate"));
        assert_eq!(n.max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(n.duplicate_window, Duration::from_secs(120));
        assert_eq!(c.accounts[0].publish, Publish::Background, "the default with [nats]");
        assert_eq!(format!("{:?}", c.redis), "Some(<redacted>)");

        let before = with("url = \"nats://127.0.0.1:4222\"", "publish = \"before_reply\"");
        assert_eq!(Config::parse(&before).unwrap().accounts[0].publish, Publish::BeforeReply);
        assert_eq!(
            err(&format!("{BASE}publish = \"background\"")),
            "accounts[0].publish: needs a [nats] table"
        );
        assert!(
            err(&with("url = \"nats://x\"", "publish = \"sometimes\""))
                .starts_with("accounts[0].publish: use off, background or before_reply")
        );
        assert!(err(&with("url = \"nats://x\"\nstream = \"a.b\"", "")).starts_with("nats.stream:"));
        assert!(
            err(&with("url = \"nats://x\"\nsubject_prefix = \"a..b\"", ""))
                .starts_with("nats.subject_prefix:")
        );
        assert!(
            err(&with("url = \"nats://x\"\nmax_age_days = 0.001", ""))
                .starts_with("nats.duplicate_window_secs: must not be longer")
        );
        assert!(err(&with("stream = \"S\"", "")).contains("missing field `url`"));
        assert!(err(&format!("redis = \"http://x\"\n{BASE}")).starts_with("redis:"));
    }

    #[test]
    fn urls_in_logs_carry_no_credentials() {
        assert_eq!(redacted_url("redis://:hunter2@10.0.0.5:6379/0"), "redis://10.0.0.5:6379/0");
        assert_eq!(redacted_url("nats://u:p@127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redacted_url("u:p@127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(redacted_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        // An `@` after the host is taken for the end of a password: better too much hidden.
        assert_eq!(redacted_url("redis://h/a@b"), "redis://b");
        assert_eq!(redacted_url("postgres://u:S3cr/et@h:5432/db"), "postgres://h:5432/db");
        assert_eq!(redacted_url("postgres://u:a@b@h/db"), "postgres://h/db");
        assert_eq!(redacted_url("postgres://u:ZQX1?q@h:5432/db"), "postgres://h:5432/db");
        assert_eq!(redacted_url("postgres://u:p#x@h/db"), "postgres://h/db");
        assert_eq!(
            redacted_url("postgres://u@h/db?password=S3cret&x=1"),
            "postgres://h/db?password=***&x=1"
        );
        assert_eq!(
            redacted_url("redis+unix:///run/r.sock?pass=S3cret"),
            "redis+unix:///run/r.sock?pass=***"
        );
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let text = BASE.replace("\"qaHeldoutTok2024\"", "\"${WXGATE_TEST_TOKEN_UNSET}\"");
        assert_eq!(
            err(&text),
            "accounts[0].token: environment variable WXGATE_TEST_TOKEN_UNSET is not set"
        );
        let text = BASE.replace("\"qaHeldoutTok2024\"", "\"${PATH}\"");
        assert_eq!(
            Config::parse(&text).unwrap().accounts[0].tokens[0].expose(),
            std::env::var("PATH").unwrap()
        );
    }
}
