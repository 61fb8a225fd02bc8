//! Publishing pushes to NATS JetStream, so that any number of consumers downstream (and
//! any number of wxgate nodes upstream) share one stream of pushes.
//!
//! Each push goes to `{prefix}.{account}.{kind}` with the JSON of [`crate::forward::payload`]
//! and the header `Nats-Msg-Id: {account}:{dedup_key}`. The key is the same on every
//! node and for every delivery WeChat makes of a push, so JetStream's duplicate window
//! keeps one message per push even when several nodes, WeChat's retries and the outbox
//! all publish it.
//!
//! The client connects in the background and reconnects by itself: NATS being down never
//! stops pushes from being accepted. Background publishes wait in the outbox meanwhile;
//! a publish before the reply fails at once, so that WeChat delivers again. The outage
//! is logged once, and so is the recovery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::config::NatsConfig;
use crate::metrics::Metrics;

/// How long a background publish waits for JetStream's ack.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up waits for a first connection before it says NATS is unreachable.
const STARTUP_WAIT: Duration = Duration::from_secs(2);
/// Most time the stream lookup or creation may take.
const ENSURE_TIMEOUT: Duration = Duration::from_secs(5);
/// What an outbox entry's `url` starts with when the entry is a publish.
pub const SCHEME: &str = "nats:";

/// Why a publish did not land in the stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to NATS")]
    NotConnected,
    #[error("no ack from JetStream within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Failed(String),
    /// Larger than the server takes (its `max_payload`): no retry can help.
    #[error("the message is {0} bytes; NATS takes at most {1}")]
    TooLarge(usize, usize),
}

/// Bytes of a message's header block besides the Msg-Id itself, with margin.
const HEADER_OVERHEAD: usize = 64;

/// Who publishes: the outbox (background) or the push's own delivery (before reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Outbox,
    BeforeReply,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Outbox => "background",
            Via::BeforeReply => "before_reply",
        }
    }
}

/// The subject of a push: `{prefix}.{account}.{kind}`. Account names are checked by
/// the config; anything in `kind` that a subject token may not hold becomes `_`.
pub fn subject(prefix: &str, account: &str, kind: &str) -> String {
    let token = |s: &str| -> String {
        let t: String = s
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
            .collect();
        if t.is_empty() { "_".into() } else { t }
    };
    format!("{prefix}.{}.{}", token(account), token(kind))
}

/// The `Nats-Msg-Id` of a push: `{account}:{dedup_key}`. A header value is one line of
/// text, so bytes outside printable ASCII are written `%XX`; dedup keys write their own
/// `%` as `%25`, so two keys never share an id.
pub fn msg_id(account: &str, dedup_key: &str) -> String {
    let mut id = format!("{account}:");
    for b in dedup_key.bytes() {
        if b.is_ascii_graphic() || b == b' ' {
            id.push(b as char);
        } else {
            id.push_str(&format!("%{b:02X}"));
        }
    }
    id
}

/// JetStream's answer to a publish.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub sequence: u64,
    /// JetStream already had a message with this id (within its duplicate window).
    pub duplicate: bool,
}

/// The connection to NATS, shared by every account and the outbox.
pub struct Publisher {
    cfg: NatsConfig,
    js: OnceCell<jetstream::Context>,
    /// The stream was found or created since the last connection.
    stream_ready: AtomicBool,
    /// The stream has been looked for at least once (so start-up need not).
    looked: AtomicBool,
    ensuring: tokio::sync::Mutex<()>,
    /// An outage has been logged and its end has not.
    down: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Starts connecting in the background; a publish before the connection is up fails
    /// with [`PublishError::NotConnected`].
    pub fn start(cfg: &NatsConfig, metrics: Arc<Metrics>) -> Arc<Publisher> {
        let publisher = Arc::new(Publisher {
            cfg: cfg.clone(),
            js: OnceCell::new(),
            stream_ready: AtomicBool::new(false),
            looked: AtomicBool::new(false),
            ensuring: tokio::sync::Mutex::new(()),
            down: AtomicBool::new(false),
            metrics,
        });
        tokio::spawn(publisher.clone().connect());
        publisher
    }

    /// The server's address without credentials, for logs.
    fn shown_url(&self) -> String {
        crate::config::redacted_url(self.cfg.url.expose())
    }

    async fn connect(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let options = async_nats::ConnectOptions::new()
            .name("wxgate")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let publisher = weak.upgrade();
                async move {
                    if let Some(p) = publisher {
                        p.on_event(event).await;
                    }
                }
            });
        let client = match options.connect(self.cfg.url.expose()).await {
            Ok(client) => client,
            Err(e) => {
                // Only an address that cannot be used at all ends here; the config
                // checked its syntax.
                warn!(url = %self.shown_url(), error = %e, "cannot use the NATS address; pushes are not published");
                return;
            }
        };
        let js = jetstream::new(client.clone());
        let _ = self.js.set(js);

        // One clear line if NATS is not there at start-up; the connection keeps trying.
        let connected = tokio::time::timeout(STARTUP_WAIT, async {
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok();
        if !connected && !self.down.swap(true, Ordering::SeqCst) {
            warn!(
                url = %self.shown_url(),
                "NATS is not reachable; pushes are still accepted: background publishes wait in the outbox, deliveries that publish before the reply get 503, until it is back"
            );
        }
        // Normally the connection event has looked for the stream already.
        if connected && !self.looked.load(Ordering::SeqCst) {
            let _ = self.ensure_stream(true).await;
        }
    }

    async fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                if self.down.swap(false, Ordering::SeqCst) {
                    info!(url = %self.shown_url(), "NATS reachable again; publishing");
                }
                // A restarted server may have lost the stream: look again.
                self.stream_ready.store(false, Ordering::SeqCst);
                if self.js.get().is_some() {
                    let _ = self.ensure_stream(true).await;
                }
            }
            async_nats::Event::Disconnected if !self.down.swap(true, Ordering::SeqCst) => {
                warn!(url = %self.shown_url(), "NATS connection lost; background publishes wait in the outbox, deliveries that publish before the reply get 503, until it is back");
            }
            _ => {}
        }
    }

    /// Finds the stream, or creates it with the configured settings. An existing stream
    /// is used as it is.
    async fn ensure_stream(&self, log: bool) -> Result<(), PublishError> {
        let js = self.js.get().ok_or(PublishError::NotConnected)?;
        let _one = self.ensuring.lock().await;
        if self.stream_ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.looked.store(true, Ordering::SeqCst);
        let found = tokio::time::timeout(ENSURE_TIMEOUT, async {
            use jetstream::context::GetStreamErrorKind;
            let missing = |kind: &GetStreamErrorKind| {
                matches!(kind, GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
            };
            match js.get_stream(&self.cfg.stream).await {
                Ok(s) => Ok((s.cached_info().config.clone(), false)),
                Err(e) if missing(&e.kind()) => {
                    // Another node may create it at the same time; then this creation
                    // fails and the stream is simply there.
                    match js.create_stream(self.stream_config()).await {
                        Ok(s) => Ok((s.cached_info().config.clone(), true)),
                        Err(create) => match js.get_stream(&self.cfg.stream).await {
                            Ok(s) => Ok((s.cached_info().config.clone(), false)),
                            Err(_) => Err(PublishError::Failed(format!(
                                "cannot create stream {}: {create}",
                                self.cfg.stream
                            ))),
                        },
                    }
                }
                Err(e) => Err(PublishError::Failed(format!(
                    "cannot look up stream {}: {e}",
                    self.cfg.stream
                ))),
            }
        })
        .await
        .unwrap_or(Err(PublishError::TimedOut(ENSURE_TIMEOUT)));

        match found {
            Ok((c, created)) => {
                self.stream_ready.store(true, Ordering::SeqCst);
                if created {
                    info!(stream = %c.name, subjects = ?c.subjects, max_age_s = c.max_age.as_secs(), duplicate_window_s = c.duplicate_window.as_secs(), "NATS stream created");
                } else if log {
                    info!(stream = %c.name, subjects = ?c.subjects, storage = ?c.storage, retention = ?c.retention, max_age_s = c.max_age.as_secs(), duplicate_window_s = c.duplicate_window.as_secs(), "NATS stream found; used as it is");
                }
                let sample = subject(&self.cfg.subject_prefix, "account", "kind");
                if c.no_ack {
                    warn!(stream = %c.name, "the NATS stream acknowledges nothing (no_ack); every publish will time out waiting for its ack");
                }
                if !c.subjects.iter().any(|p| subject_matches(p, &sample)) {
                    warn!(stream = %c.name, subjects = ?c.subjects, prefix = %self.cfg.subject_prefix, "the NATS stream does not take this server's subjects; publishes fail unless another stream does");
                }
                Ok(())
            }
            Err(e) => {
                if log {
                    warn!(stream = %self.cfg.stream, error = %e, "NATS stream not ready; will look again before publishing");
                }
                Err(e)
            }
        }
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![format!("{}.>", self.cfg.subject_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: self.cfg.max_age,
            duplicate_window: self.cfg.duplicate_window,
            description: Some("WeChat pushes received by wxgate".into()),
            ..Default::default()
        }
    }

    /// The subject of one of this server's pushes.
    pub fn subject(&self, account: &str, kind: &str) -> String {
        subject(&self.cfg.subject_prefix, account, kind)
    }

    /// Publishes one push and waits for JetStream's ack, at most `timeout`; counts the
    /// outcome.
    pub async fn publish(
        &self,
        account: &str,
        via: Via,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Ack, PublishError> {
        let result =
            tokio::time::timeout(timeout, self.publish_inner(subject, msg_id, payload, timeout))
                .await
                .unwrap_or(Err(PublishError::TimedOut(timeout)));
        let outcome = match &result {
            Ok(Ack { duplicate: false, .. }) => "published",
            Ok(Ack { duplicate: true, .. }) => "duplicate",
            Err(PublishError::NotConnected) => "not_connected",
            Err(PublishError::TimedOut(_)) => "timed_out",
            Err(PublishError::Failed(_)) => "failed",
            Err(PublishError::TooLarge(..)) => "too_large",
        };
        self.metrics.published(account, via.as_str(), outcome);
        result
    }

    async fn publish_inner(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Ack, PublishError> {
        let js = self.js.get().ok_or(PublishError::NotConnected)?;
        // Fail at once rather than queue in the client while it is disconnected.
        if js.client().connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::NotConnected);
        }
        // The server counts the header block (`NATS/1.0`, `Nats-Msg-Id: …`) too.
        let limit = js.client().server_info().max_payload;
        let size = payload.len() + msg_id.len() + HEADER_OVERHEAD;
        if limit > 0 && size > limit {
            return Err(PublishError::TooLarge(size, limit));
        }
        if !self.stream_ready.load(Ordering::SeqCst) {
            self.ensure_stream(false).await?;
        }
        let message =
            jetstream::message::PublishMessage::build().payload(payload).message_id(msg_id);
        let ack = js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(|e| PublishError::Failed(e.to_string()))?;
        match ack.await {
            Ok(ack) => Ok(Ack { sequence: ack.sequence, duplicate: ack.duplicate }),
            Err(e) => {
                use jetstream::context::PublishErrorKind as K;
                match e.kind() {
                    // The stream went away (deleted, or a server restarted without it).
                    K::StreamNotFound => {
                        self.stream_ready.store(false, Ordering::SeqCst);
                        Err(PublishError::Failed(e.to_string()))
                    }
                    K::TimedOut => Err(PublishError::TimedOut(timeout)),
                    _ => Err(PublishError::Failed(e.to_string())),
                }
            }
        }
    }
}

/// Whether a subject pattern (`*` one token, `>` the rest) matches a subject.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_made_of_valid_tokens() {
        assert_eq!(subject("wxgate", "demo", "text_message"), "wxgate.demo.text_message");
        assert_eq!(subject("a.b", "demo", "odd kind.*>"), "a.b.demo.odd_kind___");
        assert_eq!(subject("wxgate", "demo", ""), "wxgate.demo._");
    }

    #[test]
    fn message_ids_are_one_printable_line_and_keep_keys_apart() {
        assert_eq!(msg_id("demo", "msg:oUser:123"), "demo:msg:oUser:123");
        assert_eq!(msg_id("demo", "evt:o:1:CLICK:a\r\nb:ff"), "demo:evt:o:1:CLICK:a%0D%0Ab:ff");
        assert_eq!(msg_id("demo", "evt:o:1:CLICK:é:ff"), "demo:evt:o:1:CLICK:%C3%A9:ff");
        // A key's own '%' is already written %25, so these two stay different.
        assert_ne!(msg_id("demo", "evt:%250A"), msg_id("demo", "evt:\n"));
    }

    #[test]
    fn patterns_match_like_nats() {
        assert!(subject_matches("wxgate.>", "wxgate.demo.text_message"));
        assert!(subject_matches(">", "wxgate.demo.text_message"));
        assert!(subject_matches("wxgate.*.*", "wxgate.demo.text_message"));
        assert!(!subject_matches("wxgate.*", "wxgate.demo.text_message"));
        assert!(!subject_matches("other.>", "wxgate.demo.text_message"));
        assert!(!subject_matches("wxgate.demo.text_message.>", "wxgate.demo.text_message"));
    }
}
