//! The WeChat HTTP API, as far as wxgate calls it: the access token and customer-service
//! messages (客服消息), used to deliver a reply that missed WeChat's 5-second window.
//!
//! The token comes from the stable-token endpoint (`/cgi-bin/stable_token`), which hands
//! every caller the same token until it expires, so that several wxgate nodes never
//! invalidate each other's token. It is cached, refreshed before it expires, and only one
//! refresh runs at a time. A call refused with 40001/42001 (token invalid or expired)
//! gets a fresh token and is tried once more.
//!
//! With `redis` configured the token is shared by every node ([`crate::shared_token`]):
//! read from Redis, refreshed by one node at a time across all of them, and dropped
//! there after a refusal only if it is still the token that was refused. When Redis does
//! not answer, each node uses its own cache and the endpoint as above.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};
use wxgate_protocol::Reply;

use crate::client::Client;
use crate::config::Secret;
use crate::shared_token::{Shared, SharedTokens};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node waits for another node's refresh before it asks the endpoint itself.
const WAIT_FOR_REFRESH: Duration = Duration::from_secs(12);
/// How long a node uses its own token after another held the refresh lock too long.
const STUCK_LOCK_PAUSE: Duration = Duration::from_secs(300);
/// How often a waiting node looks for the other node's new token.
const REFRESH_POLL: Duration = Duration::from_millis(50);

/// A failed API call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Transport(String),
    #[error("quota or 48-hour window: errcode {code} {message}")]
    Quota { code: i64, message: String },
    #[error("errcode {code} {message}")]
    Api { code: i64, message: String },
    #[error("a {0} reply cannot be sent as a customer-service message")]
    Unsendable(&'static str),
}

struct Cached {
    value: String,
    refresh_at: Instant,
}

impl Cached {
    fn fresh(&self) -> bool {
        Instant::now() < self.refresh_at
    }
}

/// One account's API client.
pub struct WechatApi {
    client: Client,
    base: String,
    app_id: String,
    secret: Secret,
    /// This node's token; its lock also makes one refresh at a time on this node.
    token: Mutex<Option<Cached>>,
    shared: Option<Arc<SharedTokens>>,
    /// Until when this node stops waiting for other nodes' refreshes: set when one
    /// held the refresh lock past [`WAIT_FOR_REFRESH`] (a lock left behind, or a node
    /// stuck), so that every later call does not wait that long again.
    lock_stuck_until: std::sync::Mutex<Option<Instant>>,
}

impl WechatApi {
    pub fn new(client: Client, base: &str, app_id: &str, secret: Secret) -> WechatApi {
        WechatApi {
            client,
            base: base.trim_end_matches('/').to_owned(),
            app_id: app_id.to_owned(),
            secret,
            token: Mutex::new(None),
            shared: None,
            lock_stuck_until: std::sync::Mutex::new(None),
        }
    }

    /// Shares the token with other nodes through Redis, when given.
    pub fn shared_through(mut self, shared: Option<Arc<SharedTokens>>) -> WechatApi {
        self.shared = shared;
        self
    }

    /// A valid access token: the shared one, else this node's while it is fresh. Holding
    /// the lock across the refresh makes concurrent callers wait for one refresh instead
    /// of starting their own.
    pub async fn token(&self) -> Result<String, ApiError> {
        if let Some(shared) = &self.shared
            && let Ok(found) = shared.get(&self.app_id).await
        {
            return match found {
                Some(t) => {
                    self.keep(&t);
                    Ok(t.value)
                }
                None => self.refresh_shared(shared, None).await,
            };
        }
        self.own_token(self.token.lock().await, None).await
    }

    /// Drops a token WeChat refused and gets another; forces a new one if the endpoint
    /// hands back the refused token.
    async fn replace_token(&self, refused: &str) -> Result<String, ApiError> {
        if let Some(shared) = &self.shared
            && shared.discard(&self.app_id, refused).await.is_ok()
        {
            return self.refresh_shared(shared, Some(refused)).await;
        }
        self.own_token(self.token.lock().await, Some(refused)).await
    }

    /// A new token for every node: the one another node just shared, or one this node
    /// fetches while it holds the refresh lock. `refused` is never taken for new.
    async fn refresh_shared(
        &self,
        shared: &SharedTokens,
        refused: Option<&str>,
    ) -> Result<String, ApiError> {
        let mut cached = self.token.lock().await;
        let stuck = *self.lock_stuck_until.lock().unwrap_or_else(|p| p.into_inner());
        if stuck.is_some_and(|until| Instant::now() < until) {
            return self.own_token(cached, refused).await;
        }
        let give_up_at = Instant::now() + WAIT_FOR_REFRESH;
        loop {
            match shared.get(&self.app_id).await {
                Ok(Some(t)) if Some(t.value.as_str()) != refused => {
                    *cached = Some(cached_for(&t));
                    return Ok(t.value);
                }
                Ok(_) => {}
                Err(_) => return self.own_token(cached, refused).await,
            }
            match shared.lock(&self.app_id).await {
                Ok(Some(lock)) => {
                    let fresh = self.refresh_locked(shared, refused).await;
                    shared.unlock(lock).await;
                    let fresh = fresh?;
                    let value = fresh.value.clone();
                    *cached = Some(fresh);
                    return Ok(value);
                }
                // Another node is refreshing: wait for its token, within bounds.
                Ok(None) if Instant::now() < give_up_at => {
                    tokio::time::sleep(REFRESH_POLL).await;
                }
                // It takes too long: fetch without sharing (the stable-token endpoint
                // does not invalidate the other node's token), and for a while do not
                // wait for that lock again.
                Ok(None) => {
                    self.note_stuck_lock();
                    return self.own_token(cached, refused).await;
                }
                Err(_) => return self.own_token(cached, refused).await,
            }
        }
    }

    /// Another node held the refresh lock too long: stop waiting for it for a while.
    fn note_stuck_lock(&self) {
        let mut stuck = self.lock_stuck_until.lock().unwrap_or_else(|p| p.into_inner());
        if stuck.is_none_or(|until| Instant::now() >= until) {
            tracing::warn!(app_id = %self.app_id, "the shared token's refresh lock was held past {WAIT_FOR_REFRESH:?}; this node uses a token of its own for the next {STUCK_LOCK_PAUSE:?}");
        }
        *stuck = Some(Instant::now() + STUCK_LOCK_PAUSE);
    }

    /// Under the refresh lock: the token another node shared just before we took the
    /// lock, or a new one from the endpoint, shared until shortly before it expires.
    async fn refresh_locked(
        &self,
        shared: &SharedTokens,
        refused: Option<&str>,
    ) -> Result<Cached, ApiError> {
        if let Ok(Some(t)) = shared.get(&self.app_id).await
            && Some(t.value.as_str()) != refused
        {
            return Ok(cached_for(&t));
        }
        let fresh = self.fetch_avoiding(refused).await?;
        let ttl = fresh.refresh_at.saturating_duration_since(Instant::now());
        let _ = shared.put(&self.app_id, &fresh.value, ttl).await;
        Ok(fresh)
    }

    /// This node's token while it is fresh (and not the refused one: another caller
    /// already replaced that), else a new one from the endpoint for this node alone.
    async fn own_token(
        &self,
        mut cached: MutexGuard<'_, Option<Cached>>,
        refused: Option<&str>,
    ) -> Result<String, ApiError> {
        if let Some(c) = cached.as_ref().filter(|c| c.fresh() && Some(c.value.as_str()) != refused)
        {
            return Ok(c.value.clone());
        }
        let fresh = self.fetch_avoiding(refused).await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// A token from the endpoint; forced anew if it hands back the refused one.
    async fn fetch_avoiding(&self, refused: Option<&str>) -> Result<Cached, ApiError> {
        let fresh = self.fetch_token(false).await?;
        if refused.is_some_and(|r| r == fresh.value) {
            return self.fetch_token(true).await;
        }
        Ok(fresh)
    }

    /// Keeps a shared token in this node's cache too, for when Redis goes away; skipped
    /// while a refresh holds the cache.
    fn keep(&self, t: &Shared) {
        if let Ok(mut cached) = self.token.try_lock() {
            *cached = Some(cached_for(t));
        }
    }

    async fn fetch_token(&self, force: bool) -> Result<Cached, ApiError> {
        let body = json!({
            "grant_type": "client_credential",
            "appid": self.app_id,
            "secret": self.secret.expose(),
            "force_refresh": force,
        });
        let v = self.post("/cgi-bin/stable_token", body).await?;
        let value = v["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| api_error(&v))?
            .to_owned();
        let ttl = v["expires_in"].as_u64().unwrap_or(7200);
        // Refresh a little before expiry (a fifth of the lifetime, at most five minutes).
        let refresh_at = Instant::now() + Duration::from_secs(ttl - (ttl / 5).min(300));
        Ok(Cached { value, refresh_at })
    }

    /// Sends `reply` to `openid` as a customer-service message.
    pub async fn send_custom(&self, openid: &str, reply: &Reply) -> Result<(), ApiError> {
        let Some(message) = custom_message(openid, reply)? else { return Ok(()) };
        let mut token = self.token().await?;
        for attempt in 0..2 {
            let path = format!("/cgi-bin/message/custom/send?access_token={token}");
            let v = self.post(&path, message.clone()).await?;
            match v["errcode"].as_i64().unwrap_or(0) {
                0 => return Ok(()),
                40001 | 40014 | 42001 if attempt == 0 => token = self.replace_token(&token).await?,
                code @ (45015 | 45047) => {
                    return Err(ApiError::Quota {
                        code,
                        message: v["errmsg"].as_str().unwrap_or_default().to_owned(),
                    });
                }
                _ => return Err(api_error(&v)),
            }
        }
        Err(ApiError::Api { code: 40001, message: "token refused twice".into() })
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let answer = self
            .client
            .send(
                "POST",
                &url,
                &[("content-type", "application/json")],
                Bytes::from(body.to_string()),
                CALL_TIMEOUT,
            )
            .await
            .map_err(|e| ApiError::Transport(scrub_token(&e)))?;
        if answer.status != 200 {
            return Err(ApiError::Transport(format!(
                "HTTP {} from {}",
                answer.status,
                path.split('?').next().unwrap_or(path)
            )));
        }
        serde_json::from_slice(&answer.body)
            .map_err(|e| ApiError::Transport(format!("answer is not JSON: {e}")))
    }
}

/// `access_token=…` values hidden, for errors that quote a request's URL.
fn scrub_token(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("access_token=") {
        let (head, tail) = rest.split_at(at + "access_token=".len());
        out.push_str(head);
        out.push_str("***");
        let end =
            tail.find(|c: char| c == '&' || c == '"' || c.is_whitespace()).unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A shared token in this node's cache, fresh as long as it lives in Redis.
fn cached_for(t: &Shared) -> Cached {
    Cached { value: t.value.clone(), refresh_at: Instant::now() + t.ttl }
}

fn api_error(v: &Value) -> ApiError {
    ApiError::Api {
        code: v["errcode"].as_i64().unwrap_or(-1),
        message: v["errmsg"].as_str().unwrap_or("no token in the answer").to_owned(),
    }
}

/// The customer-service form of a passive reply; `None` for no reply.
pub fn custom_message(openid: &str, reply: &Reply) -> Result<Option<Value>, ApiError> {
    let (kind, body) = match reply {
        Reply::None => return Ok(None),
        Reply::Text(content) => ("text", json!({ "content": content })),
        Reply::Image { media_id } => ("image", json!({ "media_id": media_id })),
        Reply::Voice { media_id } => ("voice", json!({ "media_id": media_id })),
        Reply::Video { media_id, title, description } => {
            ("video", json!({ "media_id": media_id, "title": title, "description": description }))
        }
        Reply::Music { title, description, music_url, hq_music_url, thumb_media_id } => (
            "music",
            json!({ "title": title, "description": description, "musicurl": music_url, "hqmusicurl": hq_music_url, "thumb_media_id": thumb_media_id }),
        ),
        // Customer-service news carries one article.
        Reply::News(articles) => {
            let items: Vec<Value> = articles
                .iter()
                .take(1)
                .map(|a| json!({ "title": a.title, "description": a.description, "url": a.url, "picurl": a.pic_url }))
                .collect();
            ("news", json!({ "articles": items }))
        }
        Reply::TransferCustomerService { .. } => {
            return Err(ApiError::Unsendable("transfer_customer_service"));
        }
    };
    Ok(Some(json!({ "touser": openid, "msgtype": kind, kind: body })))
}

#[cfg(test)]
mod scrub_tests {
    #[test]
    fn access_tokens_are_hidden_in_errors() {
        assert_eq!(
            super::scrub_token(
                "invalid uri http://h/cgi?access_token=ABC&x=1 and access_token=DEF"
            ),
            "invalid uri http://h/cgi?access_token=***&x=1 and access_token=***"
        );
        assert_eq!(super::scrub_token("no token here"), "no token here");
    }
}
