//! WeChat's side of the protocol, for tests and for `wxgate sim`: compose pushes, sign
//! and encrypt them exactly as WeChat does, deliver them over HTTP with WeChat's deadline
//! and retries, and judge the answer as strictly as WeChat may, ending in what the
//! follower would see. Also a mock of the WeChat HTTP API, scenarios, replay and load.

pub mod api;
pub mod cli;
pub mod delivery;
pub mod kinds;
pub mod load;
pub mod scenario;

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wxgate_protocol::xml::{self, Element, push_cdata_element, push_number_element};
use wxgate_protocol::{EncodingAesKey, signature};

/// How WeChat delivers to the account (消息加解密方式).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    /// Plain fields and `<Encrypt>` in one body; either reply is accepted.
    Compatible,
    /// Only `<ToUserName>` and `<Encrypt>`; the reply must be encrypted.
    Safe,
}

/// The account as WeChat knows it.
#[derive(Debug, Clone)]
pub struct Account {
    pub token: String,
    pub app_id: String,
    pub aes_key: Option<EncodingAesKey>,
    /// The original id (`gh_…`), ToUserName of every push.
    pub original_id: String,
}

/// One signed delivery: the query string and the body, ready to POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub query: String,
    pub body: String,
}

/// What the follower sees after a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// `success` or an empty body: nothing.
    Nothing,
    /// A reply: its MsgType and the plain reply document.
    Reply { msg_type: String, xml: String, doc: Element },
    /// "该公众号暂时无法提供服务，请稍后再试", with the reason.
    ServiceError(String),
}

impl Seen {
    /// The `Content` of a text reply.
    pub fn text(&self) -> Option<&str> {
        match self {
            Seen::Reply { msg_type, doc, .. } if msg_type == "text" => {
                doc.child("Content").map(|c| c.text.as_str())
            }
            _ => None,
        }
    }
}

impl Account {
    /// Signs (and in encrypted modes encrypts) `inner` with the current time and a
    /// random nonce, as WeChat does for each delivery.
    pub fn deliver(&self, inner: &str, mode: Mode) -> Delivery {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut n = [0u8; 4];
        let _ = getrandom::fill(&mut n);
        self.deliver_at(inner, mode, &now.to_string(), &u32::from_le_bytes(n).to_string())
    }

    /// Signs with a given timestamp and nonce.
    pub fn deliver_at(&self, inner: &str, mode: Mode, timestamp: &str, nonce: &str) -> Delivery {
        let sig = signature::url_signature(&self.token, timestamp, nonce);
        let openid =
            xml::parse(inner).ok().and_then(|d| d.text_of("FromUserName").map(str::to_owned));
        let mut query = format!("signature={sig}&timestamp={timestamp}&nonce={nonce}");
        if let Some(o) = openid {
            let o: String = form_urlencoded::byte_serialize(o.as_bytes()).collect();
            let _ = write!(query, "&openid={o}");
        }
        if mode == Mode::Plain {
            return Delivery { query, body: inner.to_owned() };
        }
        let key = self.aes_key.as_ref().expect("encrypted modes need the account's EncodingAESKey");
        let encrypt = key.seal(inner, &self.app_id);
        let msg_sig = signature::msg_signature(&self.token, timestamp, nonce, &encrypt);
        let _ = write!(query, "&encrypt_type=aes&msg_signature={msg_sig}");
        let body = match mode {
            Mode::Safe => {
                let mut b = String::from("<xml>\n");
                push_cdata_element(&mut b, "ToUserName", &self.original_id);
                b.push('\n');
                push_cdata_element(&mut b, "Encrypt", &encrypt);
                b.push_str("\n</xml>");
                b
            }
            _ => {
                let mut b = inner.trim_end().strip_suffix("</xml>").unwrap_or(inner).to_owned();
                push_cdata_element(&mut b, "Encrypt", &encrypt);
                b.push_str("</xml>");
                b
            }
        };
        Delivery { query, body }
    }

    /// A safe-mode delivery of an exact `Encrypt` value (a captured or hostile one),
    /// signed as WeChat signs it.
    pub fn deliver_encrypt(&self, encrypt: &str, timestamp: &str, nonce: &str) -> Delivery {
        let sig = signature::url_signature(&self.token, timestamp, nonce);
        let msg_sig = signature::msg_signature(&self.token, timestamp, nonce, encrypt);
        let mut body = String::from("<xml>\n");
        push_cdata_element(&mut body, "ToUserName", &self.original_id);
        body.push('\n');
        push_cdata_element(&mut body, "Encrypt", encrypt);
        body.push_str("\n</xml>");
        Delivery {
            query: format!(
                "signature={sig}&timestamp={timestamp}&nonce={nonce}&encrypt_type=aes&msg_signature={msg_sig}"
            ),
            body,
        }
    }

    /// The URL-verification query WeChat sends when the server URL is saved.
    pub fn verification(&self, echostr: &str) -> String {
        let now =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()).to_string();
        let sig = signature::url_signature(&self.token, &now, "1234567");
        format!("signature={sig}&timestamp={now}&nonce=1234567&echostr={echostr}")
    }

    /// Judges an answer to the push `inner` sent in `mode`, as strictly as WeChat may.
    pub fn judge(&self, inner: &str, mode: Mode, status: u16, body: &str) -> Seen {
        match self.check(inner, mode, status, body) {
            Ok(seen) => seen,
            Err(reason) => Seen::ServiceError(reason),
        }
    }

    fn check(&self, inner: &str, mode: Mode, status: u16, body: &str) -> Result<Seen, String> {
        if status != 200 {
            return Err(format!("HTTP status {status}"));
        }
        if body.is_empty() || body == "success" {
            return Ok(Seen::Nothing);
        }
        let doc =
            xml::parse_strict(body).map_err(|e| format!("reply is not well-formed XML: {e}"))?;
        if doc.name != "xml" {
            return Err(format!("reply root is <{}>", doc.name));
        }
        let (plain, doc) = if doc.child("Encrypt").is_some() {
            if mode == Mode::Plain {
                return Err("encrypted reply to a plaintext push".into());
            }
            let plain = self.open_envelope(&doc)?;
            let inner_doc = xml::parse_strict(&plain)
                .map_err(|e| format!("decrypted reply is not well-formed XML: {e}"))?;
            (plain, inner_doc)
        } else {
            if mode == Mode::Safe {
                return Err("plaintext reply to a safe-mode push".into());
            }
            (body.to_owned(), doc)
        };
        let push = xml::parse(inner).map_err(|e| format!("the push itself is not XML: {e}"))?;
        check_reply(&push, &doc)?;
        let msg_type = doc.text_of("MsgType").unwrap_or_default().to_owned();
        Ok(Seen::Reply { msg_type, xml: plain, doc })
    }

    /// Verifies and opens an encrypted reply envelope.
    pub fn open_envelope(&self, doc: &Element) -> Result<String, String> {
        let names: Vec<&str> = doc.children.iter().map(|c| c.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        if sorted != ["Encrypt", "MsgSignature", "Nonce", "TimeStamp"] {
            return Err(format!(
                "envelope must hold exactly Encrypt, MsgSignature, TimeStamp, Nonce; has {names:?}"
            ));
        }
        let encrypt = doc.text_of("Encrypt").ok_or("empty Encrypt")?;
        let ts = doc.text_of("TimeStamp").ok_or("empty TimeStamp")?;
        let nonce = doc.text_of("Nonce").ok_or("empty Nonce")?;
        let sig = doc.text_of("MsgSignature").ok_or("empty MsgSignature")?;
        if ts.len() != 10 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("TimeStamp {ts:?} is not Unix seconds"));
        }
        if !signature::verify(sig, &[&self.token, ts, nonce, encrypt]) {
            return Err("MsgSignature does not match".into());
        }
        let key = self.aes_key.as_ref().ok_or("no EncodingAESKey to open the reply")?;
        key.open(encrypt, &self.app_id).map_err(|e| format!("reply envelope: {e}"))
    }
}

/// Checks a plain reply against the push it answers: addresses swapped, a known MsgType
/// with its required elements, news within WeChat's limits.
pub fn check_reply(push: &Element, reply: &Element) -> Result<(), String> {
    let want_to = push.text_of("FromUserName").unwrap_or_default();
    let want_from = push.text_of("ToUserName").unwrap_or_default();
    if reply.text_of("ToUserName") != Some(want_to) {
        return Err(format!(
            "reply ToUserName {:?} is not the follower {want_to:?}",
            reply.text_of("ToUserName")
        ));
    }
    if reply.text_of("FromUserName") != Some(want_from) {
        return Err(format!(
            "reply FromUserName {:?} is not the account {want_from:?}",
            reply.text_of("FromUserName")
        ));
    }
    let ct = reply.text_of("CreateTime").unwrap_or_default();
    if ct.len() != 10 || !ct.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("reply CreateTime {ct:?} is not Unix seconds"));
    }
    let msg_type = reply.text_of("MsgType").unwrap_or_default();
    let need = |path: &str| {
        reply.text_at(path).map(|_| ()).ok_or(format!("{msg_type} reply lacks {path}"))
    };
    match msg_type {
        "text" => reply.child("Content").map(|_| ()).ok_or("text reply lacks Content".to_owned()),
        "image" => need("Image/MediaId"),
        "voice" => need("Voice/MediaId"),
        "video" => need("Video/MediaId"),
        "music" => need("Music/ThumbMediaId"),
        "transfer_customer_service" => Ok(()),
        "news" => {
            let items = reply.child("Articles").map_or(0, |a| a.children_named("item").count());
            let count: usize =
                reply.text_of("ArticleCount").and_then(|c| c.parse().ok()).unwrap_or(usize::MAX);
            if count != items {
                return Err(format!("ArticleCount {count} but {items} items"));
            }
            let user_message =
                !push.text_of("MsgType").is_some_and(|t| t.eq_ignore_ascii_case("event"));
            let limit = if user_message { 1 } else { 8 };
            if items == 0 || items > limit {
                return Err(format!("{items} articles; WeChat allows 1..={limit} here"));
            }
            Ok(())
        }
        other => Err(format!("unknown reply MsgType {other:?}")),
    }
}

/// Composes push documents the way WeChat writes them.
pub mod compose {
    use super::*;

    /// The common header and `MsgType`.
    pub fn header(to: &str, from: &str, create_time: u64, msg_type: &str) -> String {
        let mut x = String::from("<xml>");
        push_cdata_element(&mut x, "ToUserName", to);
        push_cdata_element(&mut x, "FromUserName", from);
        push_number_element(&mut x, "CreateTime", create_time);
        push_cdata_element(&mut x, "MsgType", msg_type);
        x
    }

    /// A text message.
    pub fn text(to: &str, from: &str, create_time: u64, content: &str, msg_id: u64) -> String {
        let mut x = header(to, from, create_time, "text");
        push_cdata_element(&mut x, "Content", content);
        push_number_element(&mut x, "MsgId", msg_id);
        x.push_str("</xml>");
        x
    }

    /// An event with string fields in CDATA and numbers bare, as WeChat writes them.
    pub fn event(
        to: &str,
        from: &str,
        create_time: u64,
        event: &str,
        fields: &[(&str, &str)],
    ) -> String {
        let mut x = header(to, from, create_time, "event");
        push_cdata_element(&mut x, "Event", event);
        for (name, value) in fields {
            if !value.is_empty()
                && value.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
            {
                push_number_element(&mut x, name, value);
            } else {
                push_cdata_element(&mut x, name, value);
            }
        }
        x.push_str("</xml>");
        x
    }
}

/// A small HTTP client for deliveries.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Http {
    /// A client that gives up on an attempt after `timeout` (WeChat: 5 s).
    pub fn new(timeout: Duration) -> Http {
        Http { client: Client::builder(TokioExecutor::new()).build_http(), timeout }
    }

    /// Sends one request; an error means no HTTP answer (refused, reset, timed out).
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        body: Option<&str>,
    ) -> Result<Answer, String> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "text/xml")
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    // The cause is in the chain: "tcp connect error: Connection refused (os error 111)".
                    format!(
                        "cannot connect: {}",
                        error_chain(
                            std::error::Error::source(&e)
                                .unwrap_or(&e as &(dyn std::error::Error + 'static))
                        )
                    )
                } else {
                    format!("request failed: {}", error_chain(&e))
                }
            })?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading answer: {}", error_chain(&e)))?
                .to_bytes();
            Ok(Answer { status, body: String::from_utf8_lossy(&bytes).into_owned() })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }

    /// POSTs a delivery to `url` (the account's URL; a query of its own is kept).
    pub async fn post(&self, url: &str, d: &Delivery) -> Result<Answer, String> {
        let join = if url.contains('?') { '&' } else { '?' };
        self.send("POST", &format!("{url}{join}{}", d.query), Some(&d.body)).await
    }
}

/// An error and every `source()` below it, as one line: `a: b: c`. A message already
/// contained in the one above it is left out.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !msg.is_empty() && !last.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        last = msg;
        cur = c.source();
    }
    out
}
