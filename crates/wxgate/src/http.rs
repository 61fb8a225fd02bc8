//! The account endpoint: GET URL verification and POST pushes, as WeChat sends them.
//!
//! A POST goes through, in order: the URL `signature` (before any byte of the body is
//! read), the timestamp window, the mode (`encrypt_type`), a capped body read, the outer
//! XML, `msg_signature` over the envelope and decryption (encrypted modes), typing, then
//! [`crate::handle`] (de-duplication, rules or forwards, the store), and the reply in the
//! request's mode. Every refusal is a [`Rejection`], mapped to its HTTP status in one
//! place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use tracing::{debug, error, info, warn};
use wxgate_protocol::Push;
use wxgate_protocol::crypto::CryptoError;
use wxgate_protocol::push::PushError;
use wxgate_protocol::reply::{self, SUCCESS};
use wxgate_protocol::signature;
use wxgate_protocol::xml::{self, XmlError};

use crate::client::Client;
use crate::config::Account;
use crate::dedup::{Answer, Dedup};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::wechat_api::WechatApi;

/// How much of an oversized or refused body is read and thrown away, so that the client
/// can finish sending and read our answer instead of seeing its connection reset.
const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);
/// A body that takes longer than this to arrive is refused.
const BODY_TIME: Duration = Duration::from_secs(10);

/// Everything one account's endpoint needs.
pub struct AccountState {
    pub account: Account,
    pub store: Store,
    pub dedup: Arc<Dedup>,
    pub metrics: Arc<Metrics>,
    /// Calls to the owner's service.
    pub client: Client,
    /// The WeChat API, when the account has an `app_secret`.
    pub api: Option<Arc<WechatApi>>,
    /// NATS, when the account publishes its pushes.
    pub nats: Option<Arc<crate::nats::Publisher>>,
    /// Forwards whose reply raced its deadline (see [`crate::handle`]).
    pub(crate) fates: Mutex<HashMap<String, crate::handle::Fate>>,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("missing query parameter {0}")]
    MissingParam(&'static str),
    #[error("query parameter {0} is not valid utf-8")]
    MalformedParam(&'static str),
    #[error("signature does not match")]
    BadSignature,
    #[error("timestamp outside the {0} s window")]
    StaleTimestamp(u64),
    #[error("plaintext push refused: this account requires encryption")]
    PlaintextRefused,
    #[error("unknown encrypt_type {0:?}")]
    UnknownEncryptType(String),
    #[error("encrypted push but no encoding_aes_key is configured")]
    NoAesKey,
    #[error("msg_signature does not match the envelope")]
    BadMsgSignature,
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body did not arrive in time")]
    SlowBody,
    #[error("body could not be read: {0}")]
    BodyRead(String),
    #[error("body is not utf-8")]
    NotUtf8,
    #[error("{0}")]
    Xml(#[from] XmlError),
    #[error("envelope has no Encrypt element")]
    MissingEncrypt,
    #[error("envelope does not decrypt: {0}")]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the first delivery of this push is still being answered")]
    StillInFlight,
    #[error("the owner's service did not answer; WeChat may deliver again")]
    ForwardFailed,
    #[error("the push is not in NATS yet; WeChat may deliver again")]
    PublishFailed,
}

impl Rejection {
    /// A short stable name, for metrics.
    pub fn code(&self) -> &'static str {
        use Rejection::*;
        match self {
            MissingParam(_) => "missing_param",
            MalformedParam(_) => "malformed_param",
            BadSignature => "bad_signature",
            StaleTimestamp(_) => "stale_timestamp",
            PlaintextRefused => "plaintext_refused",
            UnknownEncryptType(_) => "unknown_encrypt_type",
            NoAesKey => "no_aes_key",
            BadMsgSignature => "bad_msg_signature",
            TooLarge(_) => "too_large",
            SlowBody => "slow_body",
            BodyRead(_) => "body_read",
            NotUtf8 => "not_utf8",
            Xml(XmlError::Doctype | XmlError::UnknownEntity) => "doctype_or_entity",
            Xml(_) => "not_xml",
            MissingEncrypt => "missing_encrypt",
            Crypto(CryptoError::AppIdMismatch) => "app_id_mismatch",
            Crypto(_) => "decrypt_failed",
            Store(_) => "store_unavailable",
            StillInFlight => "still_in_flight",
            ForwardFailed => "forward_failed",
            PublishFailed => "publish_failed",
        }
    }

    fn status(&self) -> StatusCode {
        use Rejection::*;
        match self {
            MissingParam(_) | MalformedParam(_) | BadSignature | StaleTimestamp(_)
            | PlaintextRefused | BadMsgSignature => StatusCode::FORBIDDEN,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            SlowBody => StatusCode::REQUEST_TIMEOUT,
            UnknownEncryptType(_)
            | NoAesKey
            | BodyRead(_)
            | NotUtf8
            | Xml(_)
            | MissingEncrypt
            | Crypto(_) => StatusCode::BAD_REQUEST,
            Store(_) | StillInFlight | ForwardFailed | PublishFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

/// A reason fit for a log line or an answer: printable, one line, short. Parser messages
/// can quote pieces of the request.
fn printable(reason: &str) -> String {
    let mut out: String =
        reason.chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect();
    if reason.chars().count() > 200 {
        out.push('…');
    }
    out
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = printable(&self.to_string());
        body.push('\n');
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
    }
}

/// Logs and counts a refusal once, at the edge, and turns it into the response. Client
/// mistakes go to the `wxgate::rejected` target at warn.
fn refuse(state: &AccountState, method: &str, e: Rejection) -> Response {
    let account = state.account.name.as_str();
    state.metrics.rejected(account, e.code());
    let status = e.status().as_u16();
    if status >= 500 {
        // The outage itself is logged once by the store; each refused push quietly.
        debug!(target: "wxgate::store", account, method, status, reason = %printable(&e.to_string()), "push not acknowledged");
    } else {
        warn!(target: "wxgate::rejected", account, method, status, reason = %printable(&e.to_string()), "request refused");
    }
    e.into_response()
}

/// The query parameters WeChat signs, percent-decoded (a `+` stays a `+`). A value that
/// does not decode to UTF-8 is dropped (and named in `malformed`): signatures are
/// checked over exact values, never over replacement characters.
#[derive(Default)]
struct Query {
    malformed: Option<&'static str>,
    signature: Option<String>,
    timestamp: Option<String>,
    nonce: Option<String>,
    echostr: Option<String>,
    encrypt_type: Option<String>,
    msg_signature: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let mut q = Query::default();
        for pair in query.unwrap_or_default().split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (slot, name) = match name {
                "signature" => (&mut q.signature, "signature"),
                "timestamp" => (&mut q.timestamp, "timestamp"),
                "nonce" => (&mut q.nonce, "nonce"),
                "echostr" => (&mut q.echostr, "echostr"),
                "encrypt_type" => (&mut q.encrypt_type, "encrypt_type"),
                "msg_signature" => (&mut q.msg_signature, "msg_signature"),
                _ => continue,
            };
            if slot.is_none() {
                match percent_decode(value) {
                    Some(v) => *slot = Some(v),
                    None => {
                        q.malformed.get_or_insert(name);
                    }
                }
            }
        }
        q
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// GET: WeChat's URL verification (服务器配置验证). The `echostr` goes back verbatim, in
/// every mode (only WeCom encrypts it).
pub async fn verify_url(State(state): State<Arc<AccountState>>, req: Request) -> Response {
    let q = Query::parse(req.uri().query());
    match state.verify_url(&q) {
        Ok(echo) => {
            info!(account = %state.account.name, "url verified");
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], echo).into_response()
        }
        Err(e) => refuse(&state, "GET", e),
    }
}

/// POST: a push.
pub async fn receive(State(state): State<Arc<AccountState>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let q = Query::parse(parts.uri.query());

    // Authenticate the request before reading its body: a stranger's megabytes cost
    // nothing but the drain.
    let (token, encrypted) = match state.authenticate(&q) {
        Ok(c) => c,
        Err(e) => {
            drain(body);
            return refuse(&state, "POST", e);
        }
    };
    let body = match read_body(body, &parts.headers, state.account.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return refuse(&state, "POST", e),
    };

    // Handle the push in a task of its own: if WeChat drops the connection at its
    // deadline, the push is still recorded and its retry joins this answer.
    let task = {
        let state = state.clone();
        tokio::spawn(async move {
            match state.process(&q, token, encrypted, &body, started).await {
                Ok(response) => response,
                Err(e) => refuse(&state, "POST", e),
            }
        })
    };
    match task.await {
        Ok(response) => response,
        Err(e) => {
            error!(account = %state.account.name, error = %e, "push handler failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Which of the account's secrets authenticated a request (rotation keeps two).
struct Credentials {
    token: usize,
    key: Option<usize>,
}

/// How a push was handled, for the log line and metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Handled,
    RetryJoined,
    Duplicate,
    DeadLetter,
    /// Answered `success` because the reply was not ready in time.
    Late,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Handled => "handled",
            Outcome::RetryJoined => "retry_joined",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLetter => "dead_letter",
            Outcome::Late => "late",
        }
    }
}

impl AccountState {
    fn verify_url(&self, q: &Query) -> Result<String, Rejection> {
        self.check_signature(q)?;
        q.echostr.clone().ok_or(Rejection::MissingParam("echostr"))
    }

    /// Checks the URL signature and the timestamp window; returns the token that matched.
    fn check_signature(&self, q: &Query) -> Result<usize, Rejection> {
        if let Some(name) = q.malformed {
            return Err(Rejection::MalformedParam(name));
        }
        let sig = q.signature.as_deref().ok_or(Rejection::MissingParam("signature"))?;
        let ts = q.timestamp.as_deref().ok_or(Rejection::MissingParam("timestamp"))?;
        let nonce = q.nonce.as_deref().ok_or(Rejection::MissingParam("nonce"))?;
        let token = self
            .account
            .tokens
            .iter()
            .position(|t| signature::verify(sig, &[t.expose(), ts, nonce]))
            .ok_or(Rejection::BadSignature)?;
        let window = self.account.max_timestamp_skew_secs;
        if window > 0 {
            let fresh = ts.parse::<u64>().is_ok_and(|t| t.abs_diff(unix_now()) <= window);
            if !fresh {
                return Err(Rejection::StaleTimestamp(window));
            }
        }
        Ok(token)
    }

    /// Checks the query: signature, timestamp window, mode. Returns the token that
    /// matched and whether the push is encrypted.
    fn authenticate(&self, q: &Query) -> Result<(usize, bool), Rejection> {
        let token = self.check_signature(q)?;
        let encrypted = match q.encrypt_type.as_deref() {
            None | Some("") | Some("raw") => false,
            Some("aes") => true,
            Some(other) => return Err(Rejection::UnknownEncryptType(other.to_owned())),
        };
        if !encrypted && self.account.require_encryption {
            return Err(Rejection::PlaintextRefused);
        }
        if encrypted && self.account.aes_keys.is_empty() {
            return Err(Rejection::NoAesKey);
        }
        if encrypted && q.msg_signature.is_none() {
            return Err(Rejection::MissingParam("msg_signature"));
        }
        Ok((token, encrypted))
    }

    /// Everything after the body has arrived.
    async fn process(
        self: &Arc<Self>,
        q: &Query,
        token: usize,
        encrypted: bool,
        body: &[u8],
        started: Instant,
    ) -> Result<Response, Rejection> {
        let doc = std::str::from_utf8(body).map_err(|_| Rejection::NotUtf8)?;

        let outer = xml::parse(doc)?;
        let (inner, creds) = if encrypted {
            let encrypt = outer.text_of("Encrypt").ok_or(Rejection::MissingEncrypt)?;
            let (ts, nonce) = (
                q.timestamp.as_deref().unwrap_or_default(),
                q.nonce.as_deref().unwrap_or_default(),
            );
            let msg_sig = q.msg_signature.as_deref().unwrap_or_default();
            let tok = self.account.tokens[token].expose();
            if !signature::verify(msg_sig, &[tok, ts, nonce, encrypt]) {
                return Err(Rejection::BadMsgSignature);
            }
            let (inner, key) = self.decrypt(encrypt)?;
            (Some(inner), Credentials { token, key: Some(key) })
        } else {
            (None, Credentials { token, key: None })
        };
        // An authentic envelope around bytes that are not text: kept, as a dead letter.
        let (inner, not_utf8) = match inner {
            Some(bytes) => match String::from_utf8(bytes) {
                Ok(text) => (Some(text), false),
                Err(e) => (Some(String::from_utf8_lossy(e.as_bytes()).into_owned()), true),
            },
            None => (None, false),
        };

        // Type the push. Inside a verified envelope a document we cannot understand is
        // still authentic: it is kept as a dead letter and answered `success`. A DTD or
        // an undeclared entity is refused everywhere.
        let doc = inner.as_deref().unwrap_or(doc);
        let parsed = match &inner {
            Some(inner) => xml::parse(inner),
            None => Ok(outer),
        };
        let parsed = match parsed {
            _ if not_utf8 => Err(PushError::NotUtf8),
            Err(e @ (XmlError::Doctype | XmlError::UnknownEntity)) => return Err(e.into()),
            Err(e) => Err(PushError::Xml(e)),
            Ok(root) => Push::from_element(root),
        };
        let (outcome, answer, kind) = match parsed {
            Ok(push) => self.handle(&push, doc, encrypted, started).await?,
            Err(e) => Box::pin(self.dead_letter(doc, encrypted, &e, started)).await?,
        };

        let reply_kind = answer.reply.as_deref().and_then(reply_msg_type).unwrap_or("none");
        self.metrics.push(&self.account.name, kind, outcome.as_str(), started.elapsed());
        info!(
            account = %self.account.name,
            kind,
            dedup = outcome.as_str(),
            reply = reply_kind,
            encrypted,
            latency_us = started.elapsed().as_micros() as u64,
            "push"
        );
        Ok(self.respond(&answer, encrypted.then_some(&creds)))
    }

    /// Tries the current key, then the previous one during a rotation.
    fn decrypt(&self, encrypt: &str) -> Result<(Vec<u8>, usize), Rejection> {
        let mut first_err = None;
        for (i, key) in self.account.aes_keys.iter().enumerate() {
            match key.open_bytes(encrypt, &self.account.app_id) {
                Ok(inner) => return Ok((inner, i)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(Rejection::Crypto(first_err.unwrap_or(CryptoError::Padding)))
    }

    /// The HTTP answer: `success` for no reply, else the reply XML, sealed when the push
    /// came encrypted (with a fresh TimeStamp, Nonce and MsgSignature).
    fn respond(&self, answer: &Answer, encrypted: Option<&Credentials>) -> Response {
        let Some(xml) = answer.reply.as_deref() else {
            return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], SUCCESS)
                .into_response();
        };
        let body = match encrypted {
            None => xml.to_owned(),
            Some(creds) => {
                let key = &self.account.aes_keys[creds.key.unwrap_or(0)];
                let token = self.account.tokens[creds.token].expose();
                let encrypt = key.seal(xml, &self.account.app_id);
                let timestamp = unix_now();
                let nonce = fresh_nonce();
                let sig = signature::msg_signature(token, &timestamp.to_string(), &nonce, &encrypt);
                reply::envelope(&encrypt, &sig, timestamp, &nonce)
            }
        };
        ([(header::CONTENT_TYPE, "application/xml; charset=utf-8")], body).into_response()
    }
}

/// The MsgType of a rendered reply, for the log line.
fn reply_msg_type(xml: &str) -> Option<&'static str> {
    const KNOWN: &[&str] =
        &["text", "image", "voice", "video", "music", "news", "transfer_customer_service"];
    let start = xml.find("<MsgType><![CDATA[")? + "<MsgType><![CDATA[".len();
    let rest = &xml[start..];
    let t = &rest[..rest.find(']')?];
    KNOWN.iter().copied().find(|known| *known == t)
}

pub(crate) fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn fresh_nonce() -> String {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b).to_string()
}

/// Reads at most `max` bytes of body. A declared or actual excess is refused with 413
/// at once; the rest is drained in the background, never buffered.
async fn read_body(mut body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        drain(body);
        return Err(Rejection::TooLarge(max));
    }
    let read = async {
        let mut buf = Vec::with_capacity(declared.map_or(4096, |n| n as usize));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Rejection::BodyRead(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max {
                    return Err(Rejection::TooLarge(max));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    let result = tokio::time::timeout(BODY_TIME, read).await.unwrap_or(Err(Rejection::SlowBody));
    if matches!(result, Err(Rejection::TooLarge(_) | Rejection::SlowBody)) {
        drain(body);
    }
    result
}

/// Reads and discards what is left of a body, bounded in bytes and time.
fn drain(mut body: Body) {
    tokio::spawn(async move {
        let mut seen = 0usize;
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > DRAIN_LIMIT {
                    break;
                }
            }
        })
        .await;
    });
}
