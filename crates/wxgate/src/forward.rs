//! Handing pushes to the account owner's own service: only wxgate speaks XML and crypto;
//! the owner's service receives JSON and answers JSON, in any language.
//!
//! The request is a `POST` of [`payload`] with
//! - `Content-Type: application/json`,
//! - `X-Wxgate-Timestamp`: Unix seconds,
//! - `X-Wxgate-Signature: sha256=HEX`, the HMAC-SHA256 of `TIMESTAMP.BODY` under the
//!   account's `forward_secret`, so the service can tell wxgate from anyone else,
//! - `X-Wxgate-Dedup-Key`: the push's key; the same push may arrive more than once
//!   (at-least-once delivery), and the key is how the service recognises it.
//!
//! The answer (status 200 or 204) is a reply in the shape of a rule's `reply`, taken
//! literally: `{"text": "hi"}`, `{"news": [{"title": …}]}`, `{"image": {"media_id": …}}`,
//! `{"transfer_customer_service": {}}`, `{"none": true}`; an empty body or `{}` means no
//! reply. Any other status is a failure.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use wxgate_protocol::{Push, Reply};

use crate::client::Client;
use crate::config::Secret;
use crate::{fields, rules};

/// Why a forward gave no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Transport(String),
    /// The body is kept for debugging only: a service may echo the push in it.
    #[error("the service answered HTTP {status}")]
    Status { status: u16, body: String },
    #[error("the service's answer is not a reply: {0}")]
    Answer(String),
}

/// The JSON form of a push, as the owner's service receives it.
pub fn payload(
    account: &str,
    dedup_key: &str,
    push: &Push,
    doc: &str,
    deadline_unix_ms: Option<i64>,
) -> String {
    json!({
        "account": account,
        "dedup_key": dedup_key,
        "kind": push.kind_name(),
        "msg_type": push.msg_type,
        "event": push.event_name(),
        "from": push.from,
        "to": push.to,
        "create_time": push.create_time.raw(),
        "fields": fields::of_push(push),
        "xml": doc,
        // When the passive reply must be ready; null for background deliveries.
        "reply_deadline_unix_ms": deadline_unix_ms,
    })
    .to_string()
}

/// The signature header value of a body sent at `timestamp`.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts a payload and reads the reply the service answers.
pub async fn call(
    client: &Client,
    url: &str,
    secret: &Secret,
    dedup_key: &str,
    payload: &str,
    timeout: Duration,
) -> Result<Reply, ForwardError> {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()).to_string();
    let signature = sign(secret.expose(), &ts, payload.as_bytes());
    let headers = [
        ("content-type", "application/json"),
        ("x-wxgate-timestamp", ts.as_str()),
        ("x-wxgate-signature", signature.as_str()),
        ("x-wxgate-dedup-key", dedup_key),
    ];
    let answer = client
        .send("POST", url, &headers, Bytes::from(payload.to_owned()), timeout)
        .await
        .map_err(ForwardError::Transport)?;
    match answer.status {
        200 | 204 => rules::literal_reply(&answer.body).map_err(ForwardError::Answer),
        status => Err(ForwardError::Status {
            status,
            body: String::from_utf8_lossy(&answer.body).chars().take(200).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently with Python's hmac module.
        assert_eq!(
            sign("secret", "1700000000", b"{}"),
            "sha256=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(sign("secret", "1700000001", b"{}"), sign("secret", "1700000000", b"{}"));
    }
}
