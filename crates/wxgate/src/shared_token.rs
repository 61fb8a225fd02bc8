//! The WeChat access token shared by every node through Redis (`redis = "redis://…"`).
//!
//! Each account's token lives at `wxgate:token:{app_id}` with a TTL that ends before the
//! token expires. One node at a time refreshes it, holding `wxgate:token:{app_id}:lock`
//! (`SET … NX PX`, released by an atomic compare-and-delete); the others wait for the
//! new value. A token WeChat refused is removed only if it is still the shared one, again
//! by compare-and-delete, so that no node throws away a token another node just fetched.
//!
//! Redis is a help, never a condition: every call here is bounded in time, and when Redis
//! does not answer, [`crate::wechat_api`] falls back to the node's own cache and the
//! stable-token endpoint. The outage is logged once, and so is the recovery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tracing::{info, warn};

use crate::config::Secret;

/// Longest wait for one Redis call.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed call, Redis is left alone this long, so that a dead Redis costs the
/// token path nothing.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How long a refresher may hold the lock; longer than two calls to the token endpoint.
pub const LOCK_TTL: Duration = Duration::from_secs(30);

/// Deletes KEYS[1] only if it holds ARGV[1]: releases a lock we own, or drops a token that
/// is still the one WeChat refused.
const COMPARE_AND_DELETE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Redis did not answer (the cause is logged once per outage).
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

/// A token read from Redis, with the time it has left there.
#[derive(Debug, Clone)]
pub struct Shared {
    pub value: String,
    pub ttl: Duration,
}

/// A held refresh lock.
pub struct Lock {
    key: String,
    owner: String,
}

/// The connection to Redis, shared by every account.
pub struct SharedTokens {
    conn: Option<ConnectionManager>,
    shown: String,
    /// An outage has been logged and its end has not.
    down: AtomicBool,
    /// While set and in the future, calls fail at once.
    paused_until: Mutex<Option<Instant>>,
    compare_and_delete: redis::Script,
}

impl SharedTokens {
    /// Connects lazily: Redis need not be up now. Call inside a Tokio runtime.
    pub fn new(url: &Secret) -> Arc<SharedTokens> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT / 2))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let shown = crate::config::redacted_url(url.expose());
        let conn = redis::Client::open(url.expose())
            .and_then(|client| client.get_connection_manager_lazy(config));
        let conn = match conn {
            Ok(conn) => Some(conn),
            Err(e) => {
                warn!(url = %shown, error = %e, "cannot use the Redis address; each node keeps its own access token");
                None
            }
        };
        Arc::new(SharedTokens {
            conn,
            shown,
            down: AtomicBool::new(false),
            paused_until: Mutex::new(None),
            compare_and_delete: redis::Script::new(COMPARE_AND_DELETE),
        })
    }

    fn key(app_id: &str) -> String {
        format!("wxgate:token:{app_id}")
    }

    /// The shared token, if there is one.
    pub async fn get(&self, app_id: &str) -> Result<Option<Shared>, Unavailable> {
        let key = Self::key(app_id);
        let (value, pttl): (Option<String>, i64) = self
            .call(|mut c| async move {
                redis::pipe().atomic().get(&key).pttl(&key).query_async(&mut c).await
            })
            .await?;
        // PTTL is -1 for a key without expiry (not ours): trust it for a minute.
        let ttl = match pttl {
            -1 => Duration::from_secs(60),
            ms => Duration::from_millis(ms.max(0) as u64),
        };
        // Only what could be a token: anything else (garbage written by someone) would
        // break every request it went into, so it counts as no token.
        let plausible = |v: &String| {
            !v.is_empty()
                && v.len() <= 1024
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~*".contains(&b))
        };
        Ok(value.filter(|v| plausible(v) && !ttl.is_zero()).map(|value| Shared { value, ttl }))
    }

    /// Shares a token for `ttl`.
    pub async fn put(&self, app_id: &str, value: &str, ttl: Duration) -> Result<(), Unavailable> {
        let ms = ttl.as_millis() as u64;
        if ms == 0 {
            return Ok(());
        }
        let (key, value) = (Self::key(app_id), value.to_owned());
        self.call(|mut c| async move {
            redis::cmd("SET").arg(&key).arg(&value).arg("PX").arg(ms).query_async(&mut c).await
        })
        .await
    }

    /// Removes the shared token if it is still `refused`; answers whether it was.
    pub async fn discard(&self, app_id: &str, refused: &str) -> Result<bool, Unavailable> {
        let n: i64 = self.compare_and_delete(Self::key(app_id), refused.to_owned()).await?;
        Ok(n == 1)
    }

    /// Takes the refresh lock, if nobody holds it.
    pub async fn lock(&self, app_id: &str) -> Result<Option<Lock>, Unavailable> {
        let key = format!("{}:lock", Self::key(app_id));
        let owner = owner_id();
        let (k, o) = (key.clone(), owner.clone());
        let ms = LOCK_TTL.as_millis() as u64;
        let set: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(&o)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.map(|_| Lock { key, owner }))
    }

    /// Releases a lock if it is still ours (it may have expired and been taken since).
    pub async fn unlock(&self, lock: Lock) {
        let _ = self.compare_and_delete(lock.key, lock.owner).await;
    }

    async fn compare_and_delete(&self, key: String, value: String) -> Result<i64, Unavailable> {
        let script = self.compare_and_delete.clone();
        self.call(|mut c| async move { script.key(&key).arg(&value).invoke_async(&mut c).await })
            .await
    }

    /// Runs one Redis call, bounded in time; notes the outage or the recovery.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn.clone().ok_or(Unavailable)?;
        let paused = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_some_and(|until| Instant::now() < until) {
            return Err(Unavailable);
        }

        let result = match tokio::time::timeout(CALL_TIMEOUT, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        match result {
            Ok(v) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    info!(url = %self.shown, "Redis reachable again; the access token is shared again");
                }
                Ok(v)
            }
            Err(e) => {
                *self.paused_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + PAUSE_AFTER_FAILURE);
                if !self.down.swap(true, Ordering::SeqCst) {
                    warn!(url = %self.shown, error = %e, "Redis unreachable; each node takes the access token from its own cache and the stable_token endpoint until it is back");
                }
                Err(Unavailable)
            }
        }
    }
}

/// A value no other lock holder has: random, with the process id for reading.
fn owner_id() -> String {
    let mut r = [0u8; 12];
    let _ = getrandom::fill(&mut r);
    format!("{}-{}", std::process::id(), hex::encode(r))
}
