//! wxgate, the server side of a WeChat Official Account: it receives every push WeChat
//! sends to the account's URL, verifies, decrypts and types it, records it durably,
//! recognises WeChat's retries and answers with the account owner's rules.
//!
//! [`build`] turns a [`Config`] into an axum [`Router`] (plus its store), and [`serve`]
//! runs a router on an already bound listener until a shutdown future resolves, so that
//! tests can bind `127.0.0.1:0` and drive the real thing.

pub mod client;
pub mod config;
pub mod dedup;
pub mod events;
pub mod fields;
pub mod forward;
mod handle;
pub mod http;
pub mod live;
pub mod log_writer;
pub mod metrics;
pub mod nats;
pub mod outbox;
pub mod rules;
pub mod shared_token;
pub mod sim;
pub mod status;
pub mod store;
pub mod wechat_api;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::info;

pub use config::{Config, ConfigError};

use crate::dedup::{Answer, Dedup};
use crate::live::{Live, Parts};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// A running server's parts: its routes, its store and its metrics.
pub struct App {
    pub router: Router,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub dedup: Arc<Dedup>,
    /// The served accounts, which [`live::watch`] reloads.
    pub live: Arc<Live>,
}

impl App {
    /// The routes of the metrics listener: `GET /metrics`.
    pub fn metrics_router(&self) -> Router {
        let (metrics, store, dedup) =
            (self.metrics.clone(), self.store.clone(), self.dedup.clone());
        Router::new().route(
            "/metrics",
            get(move || {
                let (metrics, store, dedup) = (metrics.clone(), store.clone(), dedup.clone());
                async move {
                    // Rendering reads the store: off the async threads.
                    let body =
                        tokio::task::spawn_blocking(move || metrics.render(&store, dedup.len()))
                            .await
                            .unwrap_or_default();
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
                }
            }),
        )
    }
}

/// Opens the store, warms the retry window from it and builds the routes: one path per
/// account (GET verification, POST pushes), `/healthz` and `/readyz`. Called inside a
/// Tokio runtime, it also starts the outbox worker and, when configured, the connections
/// to NATS and Redis (in the background: neither has to be up for pushes to be taken).
pub fn build(config: &Config) -> Result<App, StoreError> {
    let store = Store::open(config.store_location())?;
    let window = Duration::from_secs(config.dedup_window_secs);
    let dedup = Dedup::new(window, config.dedup_memory_entries);
    let metrics = Arc::new(Metrics::default());

    // Retries that arrive just after a restart are recognised from memory.
    let since =
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(window);
    let recent = store.recent_keys(since.as_millis() as i64, config.dedup_memory_entries)?;
    for k in &recent {
        let key = format!("{}\u{0}{}", k.account, k.dedup_key);
        dedup.remember(&key, Answer { reply: k.reply.as_deref().map(Arc::from) });
    }

    let runtime = tokio::runtime::Handle::try_current().is_ok();
    let publisher = match &config.nats {
        Some(nats) if runtime => Some(nats::Publisher::start(nats, metrics.clone())),
        _ => None,
    };
    let shared_tokens = match &config.redis {
        Some(url) if runtime => Some(shared_token::SharedTokens::new(url)),
        _ => None,
    };

    // /healthz: the process serves. /readyz: the store commits, so pushes can be taken.
    let probe = store.clone();
    let client = client::Client::new();
    let mut router = Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/readyz",
        get(move || {
            let store = probe.clone();
            async move {
                match store.probe(Duration::from_secs(2)).await {
                    Ok(()) => (axum::http::StatusCode::OK, "ready\n".to_owned()),
                    Err(e) => {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n"))
                    }
                }
            }
        }),
    );
    let secrets = Arc::new(outbox::Secrets::of(config));
    let parts = Parts {
        store: store.clone(),
        dedup: dedup.clone(),
        metrics: metrics.clone(),
        client: client.clone(),
        secrets: secrets.clone(),
        publisher: publisher.clone(),
        shared_tokens,
    };
    let live = Arc::new(Live::new(config, None, parts));
    // Every account path: GET verifies the URL, POST is a push. The map of paths is
    // looked up per request, so that a reload changes it under a running server.
    let l = live.clone();
    router = router.fallback(move |req: axum::extract::Request| dispatch(l.clone(), req));
    if runtime {
        if store.shared() {
            // Other nodes may be forwarding right now: only forwards that outlived any
            // forward are orphans, swept by one node at a time.
            tokio::spawn(sweep_orphaned_forwards(live.clone(), store.clone()));
        } else {
            // This node is the only one: every forward in flight was cut short.
            let interrupted = store::interrupted_forwards(store.location(), i64::MAX)?;
            if !interrupted.is_empty() {
                tokio::spawn(requeue_interrupted(config.clone(), store.clone(), interrupted));
            }
        }
        outbox::spawn(config, store.clone(), client, secrets, publisher);
        if config.retention.enabled() {
            tokio::spawn(purge_old_records(store.clone(), config.retention.clone()));
        }
    }
    Ok(App { router, store, metrics, dedup, live })
}

/// Sends a request to the account at its path.
async fn dispatch(live: Arc<Live>, req: axum::extract::Request) -> axum::response::Response {
    use axum::http::{Method, StatusCode, header};
    use axum::response::IntoResponse;
    let Some(state) = live.account_at(req.uri().path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match *req.method() {
        Method::GET => http::verify_url(axum::extract::State(state), req).await,
        Method::POST => http::receive(axum::extract::State(state), req).await,
        _ => (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "GET,POST")]).into_response(),
    }
}

/// This node's name in the cluster's leases: unique per process.
pub fn node_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut r = [0u8; 4];
        let _ = getrandom::fill(&mut r);
        format!("{}-{}", std::process::id(), hex::encode(r))
    })
}

/// With a shared store: whichever node holds the `sweep` lease hands the pushes of
/// forwards whose node died (still `forwarding` after `orphan_after`) to the outbox.
async fn sweep_orphaned_forwards(live: Arc<Live>, store: Store) {
    let cfg = live.config().outbox;
    loop {
        let now = http::unix_ms();
        let until = now + cfg.lease.as_millis() as i64;
        if let Ok(true) = store.lease("sweep", node_id(), until).await {
            let (at, before) =
                (store.location().clone(), now - cfg.orphan_after.as_millis() as i64);
            let found =
                tokio::task::spawn_blocking(move || store::interrupted_forwards(&at, before)).await;
            match found {
                Ok(Ok(orphans)) if !orphans.is_empty() => {
                    requeue_interrupted((*live.config()).clone(), store.clone(), orphans).await;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot look for orphaned forwards"),
                _ => {}
            }
        }
        tokio::time::sleep(cfg.lease / 2).await;
    }
}

/// Forwards that were in flight when the server stopped: WeChat may already have been
/// answered `success` (a late reply), so no retry may come. The owner's service gets
/// each push through the outbox, and the record says so.
async fn requeue_interrupted(config: Config, store: Store, pushes: Vec<(String, String, String)>) {
    for (account_name, key, xml) in pushes {
        let (Some(account), Ok(push)) =
            (config.account(&account_name), wxgate_protocol::Push::parse(&xml))
        else {
            continue;
        };
        let rules::Action::Forward { url, .. } = rules::answer(&account.rules, &push) else {
            continue;
        };
        let payload = forward::payload(&account_name, &key, &push, &xml, None);
        let entry = store::OutboxEntry { url, payload };
        let result = match store.enqueue(&account_name, &key, &push.from, entry).await {
            Ok(()) => "forward interrupted by a restart; queued for background delivery".to_owned(),
            Err(e) => format!("forward interrupted by a restart; not queued: {e}"),
        };
        tracing::warn!(account = %account_name, result = %result, "interrupted forward");
        let update = store::Update {
            account: account_name,
            dedup_key: key,
            reply: None,
            status: store::Status::Late,
            late_result: Some(result),
        };
        let _ = store.update(update).await;
    }
}

/// Deletes every record of one follower (`wxgate forget`); answers how many.
pub fn forget(config: &Config, account: &str, openid: &str) -> anyhow::Result<usize> {
    anyhow::ensure!(
        config.account(account).is_some(),
        "no account named {account:?} in the config"
    );
    let store = Store::open(config.store_location())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = rt.block_on(store.forget(account, openid, None))?;
    store.close(Duration::from_secs(10));
    Ok(n)
}

/// Deletes records past their retention, every `interval`.
/// Most records one purge transaction deletes.
const PURGE_SLICE: usize = 2000;

async fn purge_old_records(store: Store, retention: config::Retention) {
    loop {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let cutoff = |keep: Duration| now.saturating_sub(keep).as_millis() as i64;
        let mut cutoffs: Vec<(Option<String>, i64)> =
            retention.kinds.iter().map(|(k, d)| (Some(k.clone()), cutoff(*d))).collect();
        // Without a default, the named kinds still count as "kinds with their own cutoff".
        cutoffs.push((None, retention.default.map_or(0, cutoff)));
        // With a shared store, one node purges (each node's clock gives the same cutoffs
        // anyway); a lease longer than any purge keeps the others out.
        let ours = !store.shared()
            || store
                .lease("purge", node_id(), http::unix_ms() + retention.interval.as_millis() as i64)
                .await
                .unwrap_or(false);
        if ours {
            // In slices, each its own short transaction: pushes keep being committed
            // between them instead of waiting behind one long delete.
            let mut purged = 0;
            loop {
                match store.purge(cutoffs.clone(), PURGE_SLICE).await {
                    Ok(n) => {
                        purged += n;
                        if n < PURGE_SLICE {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "purge failed; will try again");
                        break;
                    }
                }
                tokio::task::yield_now().await;
            }
            if purged > 0 {
                info!(records = purged, "purged records past their retention");
            }
        }
        tokio::time::sleep(retention.interval).await;
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting, lets
/// requests in flight finish (at most `limits.drain`) and returns. With `allow_from`
/// not empty, connections from other addresses are closed at once. A client must send a
/// request's headers within `limits.header_timeout`, also on an idle keep-alive
/// connection (no slowloris), and at most `limits.max_connections` are served at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: config::HttpConfig,
    allow_from: Vec<config::Network>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let addr = listener.local_addr()?;
    info!("listening on http://{addr}");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if allow_from.is_empty() || allow_from.iter().any(|n| n.contains(peer.ip())) => stream,
                Ok((_, peer)) => {
                    tracing::debug!(target: "wxgate::rejected", %peer, "connection from outside allow_from closed");
                    continue;
                }
                Err(e) => {
                    // Out of file descriptors or similar: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("connection refused: at the connection limit");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain) => tracing::warn!("closing connections still busy after {:?}", limits.drain),
    }
    Ok(())
}
