//! The WeChat HTTP API, as far as wxgate calls it: the access token and customer-service
//! messages (客服消息), used to deliver a reply that missed WeChat's 5-second window.
//!
//! The token comes from the stable-token endpoint (`/cgi-bin/stable_token`), which hands
//! every caller the same token until it expires, so that several wxgate nodes never
//! invalidate each other's token. It is cached, refreshed before it expires, and only one
//! refresh runs at a time. A call refused with 40001/42001 (token invalid or expired)
//! gets a fresh token and is tried once more.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use wxgate_protocol::Reply;

use crate::client::Client;
use crate::config::Secret;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// One account's API client.
pub struct WechatApi {
    client: Client,
    base: String,
    app_id: String,
    secret: Secret,
    token: Mutex<Option<Cached>>,
}

impl WechatApi {
    pub fn new(client: Client, base: &str, app_id: &str, secret: Secret) -> WechatApi {
        WechatApi {
            client,
            base: base.trim_end_matches('/').to_owned(),
            app_id: app_id.to_owned(),
            secret,
            token: Mutex::new(None),
        }
    }

    /// A valid access token, from the cache when it is fresh. Holding the lock across the
    /// refresh makes concurrent callers wait for one refresh instead of starting their own.
    pub async fn token(&self) -> Result<String, ApiError> {
        let mut cached = self.token.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.value.clone());
        }
        let fresh = self.fetch_token(false).await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Drops a token WeChat refused and gets another; forces a new one if the endpoint
    /// hands back the refused token.
    async fn replace_token(&self, refused: &str) -> Result<String, ApiError> {
        let mut cached = self.token.lock().await;
        if let Some(c) =
            cached.as_ref().filter(|c| c.value != refused && Instant::now() < c.refresh_at)
        {
            // Another caller already replaced it.
            return Ok(c.value.clone());
        }
        let mut fresh = self.fetch_token(false).await?;
        if fresh.value == refused {
            fresh = self.fetch_token(true).await?;
        }
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
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
            .map_err(ApiError::Transport)?;
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
