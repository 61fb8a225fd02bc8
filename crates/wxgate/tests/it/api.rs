//! The mock WeChat API: every endpoint with WeChat's shapes and error codes, recorded
//! calls, and each kind of injected fault.

use std::time::Duration;

use serde_json::{Value, json};
use wxgate::sim::Http;
use wxgate::sim::api::{Fault, MockApi, Options};

const APP: &str = "wx7c1f0e2a9b3d4e5f";
const SECRET: &str = "simsecret0000000000000000000000";
const OPENID: &str = "oApiTestUser0000000000000001";

struct Mock {
    api: MockApi,
    base: String,
    http: Http,
}

impl Mock {
    async fn start(opts: Options) -> Mock {
        let api = MockApi::new(opts);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = api.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Mock { api, base, http: Http::new(Duration::from_secs(2)) }
    }

    async fn get(&self, path: &str) -> Value {
        let a = self.http.send("GET", &format!("{}{path}", self.base), None).await.unwrap();
        assert_eq!(a.status, 200);
        serde_json::from_str(&a.body).unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let a = self
            .http
            .send("POST", &format!("{}{path}", self.base), Some(&body.to_string()))
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        serde_json::from_str(&a.body).unwrap()
    }

    async fn token(&self) -> String {
        let t = self
            .get(&format!(
                "/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={SECRET}"
            ))
            .await;
        t["access_token"].as_str().unwrap().to_owned()
    }
}

fn code(v: &Value) -> i64 {
    v["errcode"].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn access_tokens_expire_and_a_new_one_retires_the_old_after_a_grace_period() {
    let m = Mock::start(Options {
        token_ttl: Duration::from_millis(400),
        grace: Duration::from_millis(150),
        ..Options::default()
    })
    .await;
    assert_eq!(
        code(&m.get("/cgi-bin/token?grant_type=client_credential&appid=wxnope&secret=x").await),
        40013
    );
    assert_eq!(
        code(
            &m.get(&format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret=bad"))
                .await
        ),
        40125
    );
    assert_eq!(
        code(
            &m.get(&format!("/cgi-bin/token?grant_type=password&appid={APP}&secret={SECRET}"))
                .await
        ),
        40002
    );

    let first = m.token().await;
    let menu = |t: &str| format!("/cgi-bin/menu/get?access_token={t}");
    assert_eq!(code(&m.get(&menu(&first)).await), 46003, "valid token, no menu yet");
    let second = m.token().await;
    assert_ne!(first, second);
    assert_eq!(
        code(&m.get(&menu(&first)).await),
        46003,
        "the old token works during the grace period"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(code(&m.get(&menu(&first)).await), 40001, "then it is invalid");
    assert_eq!(code(&m.get(&menu(&second)).await), 46003);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(code(&m.get(&menu(&second)).await), 42001, "expired");
    assert_eq!(code(&m.get("/cgi-bin/menu/get").await), 41001, "missing");
}

#[tokio::test]
async fn the_stable_token_stays_the_same_until_forced() {
    let m = Mock::start(Options::default()).await;
    let body = |force: bool| json!({"grant_type": "client_credential", "appid": APP, "secret": SECRET, "force_refresh": force});
    let a = m.post("/cgi-bin/stable_token", body(false)).await;
    let b = m.post("/cgi-bin/stable_token", body(false)).await;
    assert_eq!(a["access_token"], b["access_token"]);
    assert!(b["expires_in"].as_u64().unwrap() <= 7200);
    let c = m.post("/cgi-bin/stable_token", body(true)).await;
    assert_ne!(a["access_token"], c["access_token"]);
    assert_eq!(m.api.current_token().as_deref(), c["access_token"].as_str());
    assert_eq!(
        code(
            &m.post(
                "/cgi-bin/stable_token",
                json!({"grant_type": "client_credential", "appid": APP, "secret": "x"})
            )
            .await
        ),
        40125
    );
}

#[tokio::test]
async fn customer_service_messages_need_the_48_hour_window_and_respect_the_quota() {
    let m = Mock::start(Options { quota: 2, ..Options::default() }).await;
    let t = m.token().await;
    let send = |body: Value| {
        let path = format!("/cgi-bin/message/custom/send?access_token={t}");
        let m = &m;
        async move { code(&m.post(&path, body).await) }
    };
    let text = json!({"touser": OPENID, "msgtype": "text", "text": {"content": "hi"}});
    assert_eq!(send(text.clone()).await, 45015, "no interaction yet");
    m.api.interaction(OPENID);
    assert_eq!(send(text.clone()).await, 0);
    let news = json!({"touser": OPENID, "msgtype": "news", "news": {"articles": [{"title": "t", "url": "u"}]}});
    assert_eq!(send(news).await, 0);
    assert_eq!(send(text.clone()).await, 45047, "quota used up");
    assert_eq!(send(json!({"touser": OPENID, "msgtype": "image", "image": {}})).await, 47001);
    assert_eq!(send(json!({"touser": OPENID, "msgtype": "telepathy"})).await, 47001);
    assert_eq!(send(json!({"msgtype": "text", "text": {"content": "x"}})).await, 40003);
    let bad = m.post("/cgi-bin/message/custom/send?access_token=nope", text).await;
    assert_eq!(code(&bad), 40001);
}

#[tokio::test]
async fn qr_codes_temporary_and_permanent_with_int_and_string_scenes() {
    let m = Mock::start(Options::default()).await;
    let t = m.token().await;
    let path = format!("/cgi-bin/qrcode/create?access_token={t}");
    let temp = m.post(&path, json!({"expire_seconds": 604800, "action_name": "QR_SCENE", "action_info": {"scene": {"scene_id": 123}}})).await;
    assert_eq!(temp["expire_seconds"], 604800);
    assert!(temp["url"].as_str().unwrap().starts_with("http://weixin.qq.com/q/"));
    let perm = m.post(&path, json!({"action_name": "QR_LIMIT_STR_SCENE", "action_info": {"scene": {"scene_str": "spring_poster"}}})).await;
    assert!(perm["ticket"].is_string());
    assert!(perm.get("expire_seconds").is_none());
    let shown =
        m.get(&format!("/cgi-bin/showqrcode?ticket={}", perm["ticket"].as_str().unwrap())).await;
    assert_eq!(shown["scene"]["scene_str"], "spring_poster");
    assert_eq!(code(&m.post(&path, json!({"action_name": "QR_LIMIT_SCENE", "action_info": {"scene": {"scene_id": 100001}}})).await), 40053);
    assert_eq!(
        code(
            &m.post(
                &path,
                json!({"action_name": "QR_STR_SCENE", "action_info": {"scene": {"scene_str": ""}}})
            )
            .await
        ),
        40053
    );
    assert_eq!(code(&m.get("/cgi-bin/showqrcode?ticket=unknown").await), 40007);
}

#[tokio::test]
async fn the_custom_menu_can_be_created_read_and_deleted() {
    let m = Mock::start(Options::default()).await;
    let t = m.token().await;
    let menu = json!({"button": [
        {"type": "click", "name": "Today", "key": "MENU_A"},
        {"name": "More", "sub_button": [{"type": "view", "name": "Site", "url": "https://example.com"}, {"type": "scancode_waitmsg", "name": "Scan", "key": "SCAN_1"}]}
    ]});
    assert_eq!(
        code(&m.post(&format!("/cgi-bin/menu/create?access_token={t}"), menu.clone()).await),
        0
    );
    assert_eq!(m.get(&format!("/cgi-bin/menu/get?access_token={t}")).await["menu"], menu);
    assert_eq!(code(&m.get(&format!("/cgi-bin/menu/delete?access_token={t}")).await), 0);
    assert_eq!(code(&m.get(&format!("/cgi-bin/menu/get?access_token={t}")).await), 46003);

    let create = |body: Value| {
        let path = format!("/cgi-bin/menu/create?access_token={t}");
        let m = &m;
        async move { code(&m.post(&path, body).await) }
    };
    assert_eq!(create(json!({"button": []})).await, 40016);
    assert_eq!(create(json!({"button": [{"type": "fly", "name": "x", "key": "k"}]})).await, 40017);
    assert_eq!(create(json!({"button": [{"type": "click", "name": "x"}]})).await, 40019);
    assert_eq!(create(json!({"button": [{"type": "view", "name": "x"}]})).await, 40054);
    let six: Vec<Value> =
        (0..6).map(|i| json!({"type": "click", "name": "s", "key": format!("K{i}")})).collect();
    assert_eq!(create(json!({"button": [{"name": "x", "sub_button": six}]})).await, 40023);
}

#[tokio::test]
async fn user_info_for_an_openid() {
    let m = Mock::start(Options::default()).await;
    let t = m.token().await;
    let info = m.get(&format!("/cgi-bin/user/info?access_token={t}&openid={OPENID}&lang=en")).await;
    assert_eq!(
        (info["subscribe"].clone(), info["openid"].clone(), info["language"].clone()),
        (json!(1), json!(OPENID), json!("en"))
    );
    assert_eq!(
        code(&m.get(&format!("/cgi-bin/user/info?access_token={t}&openid=short")).await),
        40003
    );
}

#[tokio::test]
async fn every_call_is_recorded_and_faults_are_injected() {
    let m = Mock::start(Options { hang: Duration::from_secs(5), ..Options::default() }).await;
    let t = m.token().await;
    let info = format!("/cgi-bin/user/info?access_token={t}&openid={OPENID}");

    m.api.inject(Fault {
        path: "/cgi-bin/user/info".into(),
        errcode: Some(-1),
        times: 1,
        ..Fault::default()
    });
    assert_eq!(code(&m.get(&info).await), -1, "system busy, once");
    assert_eq!(code(&m.get(&info).await), 0);

    m.api.inject(Fault {
        path: "/cgi-bin/user/info".into(),
        errcode: Some(40001),
        times: 2,
        ..Fault::default()
    });
    assert_eq!(code(&m.get(&info).await), 40001);
    assert_eq!(code(&m.get(&info).await), 40001);
    assert_eq!(code(&m.get(&info).await), 0);

    m.api.inject(Fault {
        path: "/cgi-bin/user/info".into(),
        latency_ms: 300,
        times: 1,
        ..Fault::default()
    });
    let started = std::time::Instant::now();
    assert_eq!(code(&m.get(&info).await), 0);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A hang: the caller's own timeout ends it. Injected through the control endpoint.
    let ok = m
        .post("/sim/faults", json!({"path": "/cgi-bin/user/info", "hang": true, "times": 1}))
        .await;
    assert_eq!(ok["ok"], true);
    let quick = Http::new(Duration::from_millis(200));
    let err = quick.send("GET", &format!("{}{info}", m.base), None).await.unwrap_err();
    assert!(err.contains("no answer"), "{err}");

    let calls = m.get("/sim/calls").await;
    let paths: Vec<&str> =
        calls.as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(paths[0], "/cgi-bin/token");
    // Six answered calls; the hung one is recorded when it ends.
    assert_eq!(paths.iter().filter(|p| **p == "/cgi-bin/user/info").count(), 6);
    assert_eq!(m.api.calls().len(), calls.as_array().unwrap().len());
    assert_eq!(calls[1]["response"]["errcode"], -1);

    m.post("/sim/reset", json!({})).await;
    assert!(m.api.calls().is_empty());
    assert!(m.api.current_token().is_none());
}
