//! Forwarding to the owner's service, through the simulator and its mock WeChat API: an
//! answer in time is the passive reply; a late one goes out as a customer-service
//! message (with a token refresh on 40001) or to a held retry; retries never run a
//! forward twice; background forwards go through the outbox, in order, retried, parked
//! as dead letters, re-driven, and kept across a restart. Budgets are in milliseconds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use wxgate::sim::api::{Fault, MockApi, Options};
use wxgate::sim::delivery::{Rules, deliver};
use wxgate::sim::{Http, Mode, Seen, compose};

use crate::helpers::{AES_KEY, APP_ID, GH, Server, TOKEN, eventually, wechat};

const SECRET: &str = "hook-secret-for-tests";
const USER: &str = "oForwardUser0000000000000001";

/// The owner's service: answers `{"text": "hook: <Content>"}` after `delay`, failing
/// (HTTP 500) the first `fail_first` calls; records every call.
#[derive(Clone)]
struct Hook {
    url: String,
    calls: Arc<Mutex<Vec<Value>>>,
    failures_left: Arc<AtomicU32>,
}

impl Hook {
    async fn start(delay: Duration, fail_first: u32) -> Hook {
        let calls: Arc<Mutex<Vec<Value>>> = Arc::default();
        let failures_left = Arc::new(AtomicU32::new(fail_first));
        let (c, f) = (calls.clone(), failures_left.clone());
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let (calls, failures) = (c.clone(), f.clone());
                async move {
                    let ts = headers["x-wxgate-timestamp"].to_str().unwrap().to_owned();
                    let sig = headers["x-wxgate-signature"].to_str().unwrap().to_owned();
                    assert_eq!(
                        sig,
                        wxgate::forward::sign(SECRET, &ts, &body),
                        "forwards are signed"
                    );
                    let payload: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(
                        headers["x-wxgate-dedup-key"].to_str().unwrap(),
                        payload["dedup_key"].as_str().unwrap()
                    );
                    calls.lock().unwrap().push(payload.clone());
                    tokio::time::sleep(delay).await;
                    if failures.load(Ordering::SeqCst) > 0 {
                        failures.fetch_sub(1, Ordering::SeqCst);
                        return (StatusCode::INTERNAL_SERVER_ERROR, "hook down".to_owned());
                    }
                    let content = payload["fields"]["Content"].as_str().unwrap_or("event");
                    (StatusCode::OK, json!({"text": format!("hook: {content}")}).to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hook { url, calls, failures_left }
    }

    fn calls(&self) -> Vec<Value> {
        self.calls.lock().unwrap().clone()
    }
}

async fn mock_api() -> (MockApi, String) {
    let api = MockApi::new(Options::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = api.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (api, base)
}

/// An account that forwards text messages (in time) and location reports (background).
fn config(hook: &Hook, budget_ms: u64, extra: &str) -> String {
    format!(
        "[outbox]\npoll_ms = 20\nbackoff_ms = 40\nbackoff_max_ms = 200\nmax_attempts = 3\n\
         [[accounts]]\nname = \"fw\"\npath = \"/wx\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
         encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\nforward_secret = \"{SECRET}\"\n\
         reply_budget_ms = {budget_ms}\n{extra}\n\
         [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ forward = \"{url}\" }}\n\
         [[accounts.rules]]\nwhen = {{ event = \"LOCATION\" }}\nreply = {{ forward = \"{url}\" }}\n",
        url = hook.url
    )
}

#[tokio::test]
async fn a_forward_answering_in_time_is_the_passive_reply() {
    let hook = Hook::start(Duration::ZERO, 0).await;
    let server = Server::start(&config(&hook, 2000, ""));
    let push = compose::text(GH, USER, 1_733_310_000, "hello hook", 1);
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert_eq!(report.seen.text(), Some("hook: hello hook"));

    let calls = hook.calls();
    assert_eq!(calls.len(), 1);
    let p = &calls[0];
    assert_eq!(
        (p["account"].as_str(), p["kind"].as_str(), p["from"].as_str()),
        (Some("fw"), Some("text_message"), Some(USER))
    );
    assert_eq!(p["fields"]["MsgType"], "text");
    assert!(p["xml"].as_str().unwrap().contains("hello hook"));
    assert!(p["reply_deadline_unix_ms"].as_i64().unwrap() > 0);
    let records = server.records();
    assert_eq!(records.len(), 1);
    assert!(records[0]["reply"].as_str().unwrap().contains("hook: hello hook"));
}

#[tokio::test]
async fn a_late_forward_is_answered_success_then_sent_once_as_a_customer_service_message() {
    let hook = Hook::start(Duration::from_millis(600), 0).await;
    let (api, base) = mock_api().await;
    api.interaction(USER);
    // The first send is refused as if the token had been replaced elsewhere.
    api.inject(Fault {
        path: "/cgi-bin/message/custom/send".into(),
        errcode: Some(40001),
        times: 1,
        ..Fault::default()
    });
    let extra = format!(
        "app_secret = \"simsecret0000000000000000000000\"\napi_base = \"{base}\"\nlate_reply = \"customer_service\""
    );
    let server = Server::start(&config(&hook, 200, &extra));

    let push = compose::text(GH, USER, 1_733_311_000, "slow question", 2);
    let started = Instant::now();
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert_eq!(report.seen, Seen::Nothing, "answered success within the budget");
    assert_eq!(report.attempts.len(), 1);
    assert!(started.elapsed() < Duration::from_millis(590), "did not wait for the slow service");

    let sent = || {
        api.calls()
            .into_iter()
            .filter(|c| c.path == "/cgi-bin/message/custom/send")
            .collect::<Vec<_>>()
    };
    eventually("the late reply is sent", || sent().iter().any(|c| c.response["errcode"] == 0))
        .await;
    let sends = sent();
    assert_eq!(sends.len(), 2, "refused once with 40001, then sent with a fresh token");
    assert_eq!(sends[1].body["touser"], USER);
    assert_eq!(sends[1].body["text"]["content"], "hook: slow question");
    assert_ne!(sends[0].query, sends[1].query, "the retry used another token");
    eventually("the record says so", || {
        server.records()[0]["late_result"] == "sent as a customer-service message"
    })
    .await;
    assert_eq!(server.records()[0]["status"], "late");
    assert_eq!(hook.calls().len(), 1);
}

#[tokio::test]
async fn hold_for_retry_answers_the_retry_when_the_reply_is_ready() {
    let hook = Hook::start(Duration::from_millis(800), 0).await;
    let server = Server::start(&config(&hook, 300, "late_reply = \"hold_for_retry\""));
    let push = compose::text(GH, USER, 1_733_312_000, "hold on", 3);
    let rules = Rules {
        deadline: Duration::from_millis(1500),
        attempts: 3,
        retry_interval: Duration::ZERO,
    };
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, rules).await;
    assert_eq!(report.seen.text(), Some("hook: hold on"), "{:?}", report.attempts);
    assert!(report.attempts.len() >= 2, "the first delivery was left for a retry");
    assert!(matches!(report.attempts[0].result, Ok((503, _))));
    assert_eq!(hook.calls().len(), 1, "the retries joined the forward in flight");
}

#[tokio::test]
async fn hold_for_retry_answers_the_last_delivery_success() {
    let hook = Hook::start(Duration::from_millis(2500), 0).await;
    let server =
        Server::start(&config(&hook, 200, "late_reply = \"hold_for_retry\"\nwechat_attempts = 2"));
    let push = compose::text(GH, USER, 1_733_312_500, "too slow", 4);
    let rules = Rules {
        deadline: Duration::from_millis(1000),
        attempts: 2,
        retry_interval: Duration::ZERO,
    };
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, rules).await;
    assert_eq!(report.seen, Seen::Nothing, "{:?}", report.attempts);
    assert_eq!(report.attempts.len(), 2);
    eventually("the late reply is recorded as dropped", || {
        server.records()[0]["reply"].as_str().is_some_and(|r| r.contains("too slow"))
    })
    .await;
}

#[tokio::test]
async fn retries_during_a_slow_forward_run_it_once_and_all_get_its_reply() {
    let hook = Hook::start(Duration::from_millis(400), 0).await;
    let server = Server::start(&config(&hook, 3000, ""));
    let push = compose::text(GH, USER, 1_733_313_000, "once only", 5);
    let url = server.url("/wx");
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let (push, url) = (push.clone(), url.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50 * i)).await;
                let d = wechat().deliver(&push, Mode::Plain);
                Http::new(Duration::from_secs(5)).post(&url, &d).await.unwrap()
            })
        })
        .collect();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(
            wechat().judge(&push, Mode::Plain, a.status, &a.body).text(),
            Some("hook: once only")
        );
    }
    assert_eq!(hook.calls().len(), 1);
    assert_eq!(server.records().len(), 1);
}

#[tokio::test]
async fn a_failed_forward_is_released_and_the_retry_forwards_again() {
    let hook = Hook::start(Duration::ZERO, 1).await;
    let server = Server::start(&config(&hook, 1000, ""));
    let push = compose::text(GH, USER, 1_733_314_000, "second time lucky", 6);
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert!(matches!(report.attempts[0].result, Ok((503, _))), "{:?}", report.attempts);
    assert_eq!(report.seen.text(), Some("hook: second time lucky"));
    assert_eq!(hook.calls().len(), 2);
    assert_eq!(server.records().len(), 1);
}

#[tokio::test]
async fn background_forwards_go_through_the_outbox_in_order_and_survive_failures() {
    let hook = Hook::start(Duration::ZERO, 2).await;
    let server = Server::start(&config(&hook, 1000, ""));
    for i in 0..3u64 {
        let push = compose::event(
            GH,
            USER,
            1_733_315_000 + i,
            "LOCATION",
            &[("Latitude", "23.1"), ("Longitude", "113.2"), ("Precision", &i.to_string())],
        );
        let report =
            deliver(&wechat(), &server.url("/wx"), &push, Mode::Plain, Rules::default()).await;
        assert_eq!(report.seen, Seen::Nothing, "answered at once");
    }
    // Two failures, then everything arrives, in the follower's order.
    eventually("three deliveries", || {
        hook.calls().iter().filter(|c| c["kind"] == "location_report_event").count() >= 5
    })
    .await;
    let data = server.dir.path().join("data");
    eventually("all delivered", || {
        wxgate::store::outbox_list(&(&data).into(), Some("delivered")).unwrap().len() == 3
    })
    .await;
    let order: Vec<String> = hook
        .calls()
        .iter()
        .map(|c| c["fields"]["Precision"].as_str().unwrap().to_owned())
        .collect();
    let mut delivered = order.clone();
    delivered.dedup();
    assert_eq!(delivered, ["0", "1", "2"], "in order, each retried until it went: {order:?}");
}

#[tokio::test]
async fn what_keeps_failing_is_parked_then_redriven() {
    let hook = Hook::start(Duration::ZERO, 3).await;
    let server = Server::start(&config(&hook, 1000, ""));
    let push = compose::event(
        GH,
        USER,
        1_733_316_000,
        "LOCATION",
        &[("Latitude", "1"), ("Longitude", "2"), ("Precision", "3")],
    );
    deliver(&wechat(), &server.url("/wx"), &push, Mode::Plain, Rules::default()).await;
    let data = server.dir.path().join("data");
    eventually("parked as dead after 3 attempts", || {
        wxgate::store::outbox_list(&(&data).into(), Some("dead")).unwrap().len() == 1
    })
    .await;
    let dead = &wxgate::store::outbox_list(&(&data).into(), Some("dead")).unwrap()[0];
    assert_eq!(dead.attempts, 3);
    assert!(dead.last_error.as_deref().unwrap().contains("500"));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["outbox", "redrive", "--all", "--config"])
        .arg(&server.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("delivered after the redrive", || {
        wxgate::store::outbox_list(&(&data).into(), Some("delivered")).unwrap().len() == 1
    })
    .await;
}

#[tokio::test]
async fn the_outbox_survives_a_restart() {
    // The service is down while the push arrives and the server is killed.
    let hook = Hook::start(Duration::ZERO, 1000).await;
    let server = Server::start(&config(&hook, 1000, ""));
    let push = compose::event(
        GH,
        USER,
        1_733_317_000,
        "LOCATION",
        &[("Latitude", "1"), ("Longitude", "2"), ("Precision", "9")],
    );
    let r = deliver(&wechat(), &server.url("/wx"), &push, Mode::Plain, Rules::default()).await;
    assert_eq!(r.seen, Seen::Nothing);
    let (dir, cfg) = server.kill();

    hook.failures_left.store(0, Ordering::SeqCst);
    let server = Server::start_at(dir, cfg);
    let data = server.dir.path().join("data");
    eventually("delivered after the restart", || {
        wxgate::store::outbox_list(&(&data).into(), Some("delivered")).unwrap().len() == 1
    })
    .await;
    assert_eq!(hook.calls().last().unwrap()["fields"]["Precision"], "9");
    // And the server forwards in time as before.
    let push = compose::text(GH, USER, 1_733_317_001, "after", 7);
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Plain, Rules::default()).await;
    assert_eq!(report.seen.text(), Some("hook: after"));
}

#[tokio::test]
async fn a_forward_failing_after_success_was_answered_still_reaches_the_service() {
    // Slow and then failing: WeChat got `success` at the budget, so no retry will come.
    let hook = Hook::start(Duration::from_millis(500), 1).await;
    let server = Server::start(&config(&hook, 150, "late_reply = \"drop\""));
    let push = compose::text(GH, USER, 1_733_318_000, "do not lose me", 8);
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert_eq!(report.seen, Seen::Nothing);

    let data = server.dir.path().join("data");
    eventually("handed on through the outbox", || {
        wxgate::store::outbox_list(&(&data).into(), Some("delivered")).unwrap().len() == 1
    })
    .await;
    let calls = hook.calls();
    assert_eq!(calls.len(), 2, "the failed forward, then the outbox's delivery");
    assert_eq!(calls[0]["dedup_key"], calls[1]["dedup_key"]);
    let record = &server.records()[0];
    assert_eq!(record["status"], "late");
    assert!(record["late_result"].as_str().unwrap().contains("queued for background delivery"));
}

#[tokio::test]
async fn a_forward_cut_short_by_a_crash_after_success_still_reaches_the_service() {
    let hook = Hook::start(Duration::from_millis(1500), 0).await;
    let server = Server::start(&config(&hook, 150, "late_reply = \"drop\""));
    let push = compose::text(GH, USER, 1_733_319_000, "survive the crash", 9);
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert_eq!(report.seen, Seen::Nothing, "WeChat was answered success; no retry will come");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (dir, cfg) = server.kill();

    let server = tokio::task::spawn_blocking(move || Server::start_at(dir, cfg)).await.unwrap();
    let data = server.dir.path().join("data");
    eventually("delivered through the outbox after the restart", || {
        wxgate::store::outbox_list(&(&data).into(), Some("delivered")).unwrap().len() == 1
    })
    .await;
    let background = hook.calls().last().unwrap().clone();
    assert_eq!(background["fields"]["Content"], "survive the crash");
    assert!(background["reply_deadline_unix_ms"].is_null());
    let record = &server.records()[0];
    assert_eq!(record["status"], "late");
    assert!(record["late_result"].as_str().unwrap().contains("interrupted by a restart"));
}

#[tokio::test]
async fn a_hanging_endpoint_holds_up_only_its_own_follower() {
    let slow = Hook::start(Duration::from_secs(6), 0).await;
    let fast = Hook::start(Duration::ZERO, 0).await;
    let cfg = config(&fast, 1000, "").replace(
        "[[accounts.rules]]\nwhen = { msg_type = \"text\" }",
        &format!(
            "[[accounts.rules]]\nwhen = {{ event = \"CLICK\" }}\nreply = {{ forward = {{ url = \"{}\", background = true }} }}\n\
             [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}",
            slow.url
        ),
    );
    let server = Server::start(&cfg);
    let click = compose::event(
        GH,
        "oSlowFollower000000000000001",
        1_733_319_500,
        "CLICK",
        &[("EventKey", "K")],
    );
    deliver(&wechat(), &server.url("/wx"), &click, Mode::Plain, Rules::default()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let report = compose::event(
        GH,
        USER,
        1_733_319_501,
        "LOCATION",
        &[("Latitude", "1"), ("Longitude", "2"), ("Precision", "3")],
    );
    deliver(&wechat(), &server.url("/wx"), &report, Mode::Plain, Rules::default()).await;
    eventually("the other follower's push arrives", || !fast.calls().is_empty()).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not held up by the hanging endpoint: {:?}",
        started.elapsed()
    );
    assert_eq!(slow.calls().len(), 1);
}

#[tokio::test]
async fn a_late_reply_refused_as_system_busy_is_sent_again() {
    let hook = Hook::start(Duration::from_millis(300), 0).await;
    let (api, base) = mock_api().await;
    api.interaction(USER);
    api.inject(Fault {
        path: "/cgi-bin/message/custom/send".into(),
        errcode: Some(-1),
        times: 1,
        ..Fault::default()
    });
    let extra = format!(
        "app_secret = \"simsecret0000000000000000000000\"\napi_base = \"{base}\"\nlate_reply = \"customer_service\""
    );
    let server = Server::start(&config(&hook, 100, &extra));
    let push = compose::text(GH, USER, 1_733_319_700, "busy?", 11);
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert_eq!(report.seen, Seen::Nothing);
    let sent = || {
        api.calls()
            .into_iter()
            .filter(|c| c.path == "/cgi-bin/message/custom/send")
            .collect::<Vec<_>>()
    };
    eventually("sent after the busy answer", || sent().iter().any(|c| c.response["errcode"] == 0))
        .await;
    assert_eq!(sent().len(), 2);
}
