//! A mock of the WeChat HTTP API an Official Account server calls, with WeChat's paths,
//! JSON shapes and error codes: access tokens (`/cgi-bin/token`, `/cgi-bin/stable_token`),
//! customer-service messages, QR codes, the custom menu and user info. It records every
//! call and can inject faults (latency, `errcode`, no answer), so that tests can assert on
//! what a server did and how it copes.
//!
//! Control endpoints, under `/sim/`: `GET /sim/calls`, `POST /sim/faults`
//! (`{"path": "/cgi-bin/message/custom/send", "errcode": -1, "latency_ms": 0,
//! "hang": false, "times": 1}`), `POST /sim/interactions` (`{"openid": "..."}`: the
//! follower wrote to the account, opening the 48-hour window), `POST /sim/reset`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::Method;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How the mock behaves; WeChat's figures by default.
#[derive(Debug, Clone)]
pub struct Options {
    pub app_id: String,
    pub secret: String,
    /// Lifetime of an access token (WeChat: 7200 s).
    pub token_ttl: Duration,
    /// How long the previous token keeps working after a new one is issued (5 min).
    pub grace: Duration,
    /// How long after a follower's message the account may send them messages (48 h).
    pub window: Duration,
    /// Customer-service messages allowed per window and follower.
    pub quota: u32,
    /// How long an injected `hang` fault holds a request before closing it.
    pub hang: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            app_id: "wx7c1f0e2a9b3d4e5f".into(),
            secret: "simsecret0000000000000000000000".into(),
            token_ttl: Duration::from_secs(7200),
            grace: Duration::from_secs(300),
            window: Duration::from_secs(48 * 3600),
            quota: 5,
            hang: Duration::from_secs(30),
        }
    }
}

/// A recorded call.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub response: Value,
}

/// A fault to inject on calls whose path starts with `path`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Fault {
    pub path: String,
    /// Answer this errcode (with WeChat's errmsg) instead of the real answer.
    pub errcode: Option<i64>,
    /// Wait this long before answering.
    #[serde(default)]
    pub latency_ms: u64,
    /// Never answer (hold the request, then drop it).
    #[serde(default)]
    pub hang: bool,
    /// How many calls it affects; 0 means every call until reset.
    #[serde(default)]
    pub times: u32,
}

struct Token {
    value: String,
    expires: Instant,
    /// When a newer token was issued.
    superseded: Option<Instant>,
}

struct Qr {
    scene: Value,
    expires: Option<Instant>,
}

#[derive(Default)]
struct World {
    tokens: Vec<Token>,
    calls: Vec<Call>,
    faults: Vec<Fault>,
    menu: Option<Value>,
    qrcodes: HashMap<String, Qr>,
    /// Per follower: when they last wrote, and messages sent to them since.
    interactions: HashMap<String, (Instant, u32)>,
    counter: u64,
}

/// The mock; clone it to share.
#[derive(Clone)]
pub struct MockApi {
    opts: Arc<Options>,
    world: Arc<Mutex<World>>,
}

impl MockApi {
    pub fn new(opts: Options) -> MockApi {
        MockApi { opts: Arc::new(opts), world: Arc::default() }
    }

    /// The routes, WeChat's and the control ones.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/cgi-bin/token", get(token))
            .route("/cgi-bin/stable_token", post(stable_token))
            .route("/cgi-bin/message/custom/send", post(custom_send))
            .route("/cgi-bin/qrcode/create", post(qrcode_create))
            .route("/cgi-bin/showqrcode", get(showqrcode))
            .route("/cgi-bin/menu/create", post(menu_create))
            .route("/cgi-bin/menu/get", get(menu_get))
            .route("/cgi-bin/menu/delete", get(menu_delete))
            .route("/cgi-bin/user/info", get(user_info))
            .route("/sim/calls", get(|State(m): State<MockApi>| async move { Json(m.calls()) }))
            // Control bodies are JSON whatever their Content-Type says.
            .route(
                "/sim/faults",
                post(|State(m): State<MockApi>, body: Bytes| async move {
                    match serde_json::from_slice::<Fault>(&body) {
                        Ok(f) => {
                            m.inject(f);
                            Json(json!({"ok": true}))
                        }
                        Err(e) => Json(json!({"ok": false, "error": e.to_string()})),
                    }
                }),
            )
            .route(
                "/sim/interactions",
                post(|State(m): State<MockApi>, body: Bytes| async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                    match v["openid"].as_str() {
                        Some(openid) => {
                            m.interaction(openid);
                            Json(json!({"ok": true}))
                        }
                        None => Json(json!({"ok": false, "error": "give {\"openid\": \"...\"}"})),
                    }
                }),
            )
            .route(
                "/sim/reset",
                post(|State(m): State<MockApi>| async move {
                    *m.world.lock().unwrap_or_else(|p| p.into_inner()) = World::default();
                    Json(json!({"ok": true}))
                }),
            )
            .with_state(self.clone())
    }

    /// Every WeChat call so far, in order (control calls are not recorded).
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Injects a fault.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Records that a follower wrote to the account (opens the 48-hour window).
    pub fn interaction(&self, openid: &str) {
        self.lock().interactions.insert(openid.to_owned(), (Instant::now(), 0));
    }

    /// The access token currently valid, if any.
    pub fn current_token(&self) -> Option<String> {
        let now = Instant::now();
        self.lock()
            .tokens
            .iter()
            .rev()
            .find(|t| t.superseded.is_none() && t.expires > now)
            .map(|t| t.value.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies faults for this call: `Some` is the answer to give instead.
    async fn fault(&self, path: &str) -> Option<Value> {
        let fault = {
            let mut w = self.lock();
            let i = w.faults.iter().position(|f| path.starts_with(&f.path))?;
            let f = w.faults[i].clone();
            if f.times == 1 {
                w.faults.remove(i);
            } else if f.times > 1 {
                w.faults[i].times -= 1;
            }
            f
        };
        if fault.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(fault.latency_ms)).await;
        }
        if fault.hang {
            tokio::time::sleep(self.opts.hang).await;
            return Some(json!({"errcode": -1, "errmsg": "system error (mock hang ended)"}));
        }
        fault.errcode.map(error)
    }

    fn record(&self, method: &Method, path: &str, query: &str, body: Value, response: &Value) {
        self.lock().calls.push(Call {
            method: method.to_string(),
            path: path.to_owned(),
            query: query.to_owned(),
            body,
            response: response.clone(),
        });
    }

    fn new_id(&self, prefix: &str) -> String {
        let mut w = self.lock();
        w.counter += 1;
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        format!("{prefix}{}_{}", w.counter, hex::encode(r))
    }

    fn issue_token(&self) -> Value {
        let value = self.new_id("SIM_ACCESS_TOKEN_");
        let now = Instant::now();
        let mut w = self.lock();
        for t in w.tokens.iter_mut().filter(|t| t.superseded.is_none()) {
            t.superseded = Some(now);
        }
        w.tokens.push(Token {
            value: value.clone(),
            expires: now + self.opts.token_ttl,
            superseded: None,
        });
        json!({"access_token": value, "expires_in": self.opts.token_ttl.as_secs()})
    }

    /// Checks the `access_token` query parameter like WeChat.
    fn check_token(&self, query: &HashMap<String, String>) -> Result<(), Value> {
        let Some(given) = query.get("access_token").filter(|t| !t.is_empty()) else {
            return Err(error(41001));
        };
        let now = Instant::now();
        let w = self.lock();
        let t = w.tokens.iter().find(|t| &t.value == given).ok_or_else(|| error(40001))?;
        if t.expires <= now {
            return Err(error(42001));
        }
        if t.superseded.is_some_and(|at| now.duration_since(at) > self.opts.grace) {
            return Err(error(40001));
        }
        Ok(())
    }
}

/// WeChat's answer for an error code.
fn error(code: i64) -> Value {
    let msg = match code {
        -1 => "system error",
        0 => "ok",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40003 => "invalid openid",
        40013 => "invalid appid",
        40016 => "invalid button size",
        40017 => "invalid button type",
        40018 => "invalid button name size",
        40019 => "invalid button key size",
        40023 => "invalid sub button size",
        40054 => "invalid sub button url domain",
        40125 => "invalid appsecret",
        41001 => "access_token missing",
        42001 => "access_token expired",
        43004 => "require subscribe",
        44002 => "empty post data",
        45015 => "response out of time limit or subscription is canceled",
        45047 => "out of response count limit",
        46003 => "menu no exist",
        47001 => "data format error",
        40053 => "invalid action info, please check document",
        40007 => "invalid media_id",
        _ => "error",
    };
    json!({"errcode": code, "errmsg": msg})
}

fn parse_query(q: &Option<String>) -> HashMap<String, String> {
    form_urlencoded::parse(q.as_deref().unwrap_or_default().as_bytes()).into_owned().collect()
}

/// Runs one endpoint: faults, the handler, recording.
async fn call(
    m: &MockApi,
    method: Method,
    path: &str,
    query: Option<String>,
    body: &Bytes,
    handler: impl FnOnce(&HashMap<String, String>, &Value) -> Value,
) -> Response {
    let body_json: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or(Value::String(String::from_utf8_lossy(body).into_owned()))
    };
    let q = parse_query(&query);
    let response = match m.fault(path).await {
        Some(injected) => injected,
        None => handler(&q, &body_json),
    };
    m.record(&method, path, query.as_deref().unwrap_or_default(), body_json, &response);
    Json(response).into_response()
}

async fn token(State(m): State<MockApi>, RawQuery(q): RawQuery) -> Response {
    call(&m, Method::GET, "/cgi-bin/token", q, &Bytes::new(), |q, _| {
        if q.get("grant_type").map(String::as_str) != Some("client_credential") {
            return error(40002);
        }
        if q.get("appid") != Some(&m.opts.app_id) {
            return error(40013);
        }
        if q.get("secret") != Some(&m.opts.secret) {
            return error(40125);
        }
        m.issue_token()
    })
    .await
}

/// The stable token: the same token until it expires unless `force_refresh`, so that
/// several servers never invalidate each other's token.
async fn stable_token(State(m): State<MockApi>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    call(&m, Method::POST, "/cgi-bin/stable_token", q, &body, |_, b| {
        if b["grant_type"] != "client_credential" {
            return error(40002);
        }
        if b["appid"] != m.opts.app_id.as_str() {
            return error(40013);
        }
        if b["secret"] != m.opts.secret.as_str() {
            return error(40125);
        }
        let now = Instant::now();
        if b["force_refresh"] != true {
            let w = m.lock();
            if let Some(t) =
                w.tokens.iter().rev().find(|t| t.superseded.is_none() && t.expires > now)
            {
                let left = t.expires.duration_since(now).as_secs();
                return json!({"access_token": t.value, "expires_in": left});
            }
        }
        m.issue_token()
    })
    .await
}

const CS_TYPES: &[(&str, &str)] = &[
    ("text", "content"),
    ("image", "media_id"),
    ("voice", "media_id"),
    ("video", "media_id"),
    ("music", "thumb_media_id"),
    ("news", "articles"),
    ("mpnews", "media_id"),
    ("mpnewsarticle", "article_id"),
    ("msgmenu", "list"),
    ("wxcard", "card_id"),
    ("miniprogrampage", "pagepath"),
];

async fn custom_send(State(m): State<MockApi>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    call(&m, Method::POST, "/cgi-bin/message/custom/send", q, &body, |q, b| {
        if let Err(e) = m.check_token(q) {
            return e;
        }
        if b.is_null() {
            return error(44002);
        }
        let Some(to) = b["touser"].as_str().filter(|t| !t.is_empty()) else { return error(40003) };
        let msgtype = b["msgtype"].as_str().unwrap_or_default();
        let Some((_, field)) = CS_TYPES.iter().find(|(t, _)| *t == msgtype) else {
            return error(47001);
        };
        let payload = &b[msgtype];
        let ok = match msgtype {
            "news" => payload["articles"].as_array().is_some_and(|a| (1..=8).contains(&a.len())),
            _ => {
                payload[*field].as_str().is_some_and(|s| !s.is_empty())
                    || payload[*field].is_array()
            }
        };
        if !ok {
            return error(47001);
        }
        let mut w = m.lock();
        match w.interactions.get_mut(to) {
            Some((at, _)) if at.elapsed() > m.opts.window => error(45015),
            None => error(45015),
            Some((_, sent)) if *sent >= m.opts.quota => error(45047),
            Some((_, sent)) => {
                *sent += 1;
                error(0)
            }
        }
    })
    .await
}

async fn qrcode_create(State(m): State<MockApi>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    call(&m, Method::POST, "/cgi-bin/qrcode/create", q, &body, |q, b| {
        if let Err(e) = m.check_token(q) {
            return e;
        }
        let action = b["action_name"].as_str().unwrap_or_default();
        let scene = &b["action_info"]["scene"];
        let valid = match action {
            "QR_SCENE" => {
                scene["scene_id"].as_u64().is_some_and(|id| id > 0 && id <= u32::MAX as u64)
            }
            "QR_LIMIT_SCENE" => {
                scene["scene_id"].as_u64().is_some_and(|id| (1..=100_000).contains(&id))
            }
            "QR_STR_SCENE" | "QR_LIMIT_STR_SCENE" => {
                scene["scene_str"].as_str().is_some_and(|s| (1..=64).contains(&s.len()))
            }
            _ => false,
        };
        if !valid {
            return error(40053);
        }
        let temporary = !action.contains("LIMIT");
        let expire = b["expire_seconds"].as_u64().unwrap_or(60).clamp(60, 2_592_000);
        let ticket = m.new_id("gQSim");
        let expires = temporary.then(|| Instant::now() + Duration::from_secs(expire));
        m.lock().qrcodes.insert(ticket.clone(), Qr { scene: scene.clone(), expires });
        let mut answer =
            json!({"ticket": ticket, "url": format!("http://weixin.qq.com/q/{ticket}")});
        if temporary {
            answer["expire_seconds"] = expire.into();
        }
        answer
    })
    .await
}

/// Stands in for `mp.weixin.qq.com/cgi-bin/showqrcode`: the code's scene as JSON.
async fn showqrcode(State(m): State<MockApi>, RawQuery(q): RawQuery) -> Response {
    call(&m, Method::GET, "/cgi-bin/showqrcode", q, &Bytes::new(), |q, _| {
        let w = m.lock();
        match q.get("ticket").and_then(|t| w.qrcodes.get(t)) {
            Some(qr) if qr.expires.is_none_or(|e| e > Instant::now()) => json!({"scene": qr.scene}),
            _ => json!({"errcode": 40007, "errmsg": "invalid ticket or expired"}),
        }
    })
    .await
}

const BUTTON_TYPES: &[&str] = &[
    "click",
    "view",
    "scancode_push",
    "scancode_waitmsg",
    "pic_sysphoto",
    "pic_photo_or_album",
    "pic_weixin",
    "location_select",
    "media_id",
    "article_id",
    "article_view_limited",
    "view_limited",
    "miniprogram",
];

fn check_button(b: &Value, sub: bool) -> Result<(), i64> {
    let name = b["name"].as_str().unwrap_or_default();
    if name.is_empty() || name.len() > if sub { 60 } else { 16 } {
        return Err(40018);
    }
    if let Some(subs) = b["sub_button"].as_array().filter(|_| !sub) {
        if subs.len() > 5 {
            return Err(40023);
        }
        return subs.iter().try_for_each(|s| check_button(s, true));
    }
    let kind = b["type"].as_str().unwrap_or_default();
    if !BUTTON_TYPES.contains(&kind) {
        return Err(40017);
    }
    let need = |field: &str, code| {
        if b[field].as_str().is_some_and(|v| !v.is_empty()) { Ok(()) } else { Err(code) }
    };
    match kind {
        "view" => need("url", 40054),
        "miniprogram" => need("appid", 40017).and(need("pagepath", 40017)),
        "media_id" | "view_limited" => need("media_id", 40017),
        "article_id" | "article_view_limited" => need("article_id", 40017),
        _ => need("key", 40019).and(if b["key"].as_str().map_or(0, str::len) > 128 {
            Err(40019)
        } else {
            Ok(())
        }),
    }
}

async fn menu_create(State(m): State<MockApi>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    call(&m, Method::POST, "/cgi-bin/menu/create", q, &body, |q, b| {
        if let Err(e) = m.check_token(q) {
            return e;
        }
        let Some(buttons) = b["button"].as_array().filter(|a| (1..=3).contains(&a.len())) else {
            return error(40016);
        };
        if let Err(code) = buttons.iter().try_for_each(|button| check_button(button, false)) {
            return error(code);
        }
        m.lock().menu = Some(json!({"button": buttons}));
        error(0)
    })
    .await
}

async fn menu_get(State(m): State<MockApi>, RawQuery(q): RawQuery) -> Response {
    call(&m, Method::GET, "/cgi-bin/menu/get", q, &Bytes::new(), |q, _| {
        if let Err(e) = m.check_token(q) {
            return e;
        }
        match &m.lock().menu {
            Some(menu) => json!({"menu": menu}),
            None => error(46003),
        }
    })
    .await
}

async fn menu_delete(State(m): State<MockApi>, RawQuery(q): RawQuery) -> Response {
    call(&m, Method::GET, "/cgi-bin/menu/delete", q, &Bytes::new(), |q, _| {
        if let Err(e) = m.check_token(q) {
            return e;
        }
        m.lock().menu = None;
        error(0)
    })
    .await
}

async fn user_info(State(m): State<MockApi>, RawQuery(q): RawQuery) -> Response {
    call(&m, Method::GET, "/cgi-bin/user/info", q, &Bytes::new(), |q, _| {
        if let Err(e) = m.check_token(q) {
            return e;
        }
        let openid = q.get("openid").map(String::as_str).unwrap_or_default();
        // OpenIDs are 28 characters of [A-Za-z0-9_-].
        if openid.len() != 28
            || !openid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return error(40003);
        }
        json!({
            "subscribe": 1,
            "openid": openid,
            "language": q.get("lang").cloned().unwrap_or_else(|| "zh_CN".into()),
            "subscribe_time": 1733300000,
            "remark": "",
            "groupid": 0,
            "tagid_list": [],
            "subscribe_scene": "ADD_SCENE_QR_CODE",
            "qr_scene": 0,
            "qr_scene_str": ""
        })
    })
    .await
}
