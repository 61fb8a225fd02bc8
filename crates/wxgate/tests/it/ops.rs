//! Running it in production: metrics on their own address, health and readiness, the
//! status command, a graceful stop on SIGTERM, and a store outage that is refused (503),
//! logged once and recovered from by itself.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use wxgate::sim::delivery::{Rules, deliver};
use wxgate::sim::{Http, Mode, compose};

use crate::helpers::{APP_ID, GH, Server, account_toml, wechat};

const ECHO: &str =
    "[[accounts.rules]]\nwhen = { msg_type = \"text\" }\nreply = { text = \"{content}\" }\n";
const USER: &str = "oOpsTestUser0000000000000001";

/// Waits for a log line containing `needle` and returns it.
fn wait_log(server: &Server, needle: &str, lines: &mut Vec<String>) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        if Instant::now() > deadline {
            return None;
        }
        match server.log.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => lines.push(l),
            Err(_) => continue,
        }
    }
}

#[tokio::test]
async fn metrics_health_readiness_and_status() {
    let server =
        Server::start(&format!("metrics_listen = \"127.0.0.1:0\"\n{}", account_toml("/wx", ECHO)));
    let mut lines = server.startup.clone();
    let line = wait_log(&server, "metrics on http://", &mut lines).expect("metrics address logged");
    let metrics_url = line.split("metrics on ").nth(1).unwrap().trim().to_owned();

    let http = Http::new(Duration::from_secs(5));
    for i in 0..3 {
        let push = compose::text(GH, USER, 1_733_303_000 + i, "m", 500 + i);
        deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    }
    let retry = compose::text(GH, USER, 1_733_303_000, "m", 500);
    deliver(&wechat(), &server.url("/wx"), &retry, Mode::Safe, Rules::default()).await;
    http.send("POST", &server.url("/wx?signature=x&timestamp=1&nonce=2"), Some("<xml/>"))
        .await
        .unwrap();

    let text = http.send("GET", &metrics_url, None).await.unwrap().body;
    assert!(
        text.contains(
            "wxgate_pushes_total{account=\"test\",kind=\"text_message\",outcome=\"handled\"} 3"
        ),
        "{text}"
    );
    assert!(text.contains("outcome=\"duplicate\"} 1"), "{text}");
    assert!(
        text.contains("wxgate_rejected_total{account=\"test\",reason=\"bad_signature\"} 1"),
        "{text}"
    );
    assert!(text.contains("wxgate_reply_seconds_count{account=\"test\"} 4"), "{text}");
    assert!(text.contains("wxgate_store_healthy 1"));
    // Metrics are not served on the public address.
    assert_eq!(http.send("GET", &server.url("/metrics"), None).await.unwrap().status, 404);

    assert_eq!(http.send("GET", &server.url("/healthz"), None).await.unwrap().status, 200);
    let ready = http.send("GET", &server.url("/readyz"), None).await.unwrap();
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    // `status` reads the metrics address from the config: give it the real port.
    let addr = metrics_url.trim_start_matches("http://").trim_end_matches("/metrics");
    let config = std::fs::read_to_string(&server.config).unwrap().replace("127.0.0.1:0", addr);
    let status_config = server.dir.path().join("status.toml");
    std::fs::write(&status_config, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["status", "--config"])
        .arg(&status_config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("text_message")
            && text.contains("bad_signature")
            && text.contains("store_healthy"),
        "{text}"
    );
}

#[test]
fn sigterm_answers_what_is_in_flight_commits_and_exits_cleanly() {
    let server = Server::start(&account_toml("/wx", ECHO));
    let push = compose::text(GH, USER, 1_733_304_000, "last words", 9);
    let d = wechat().deliver(&push, Mode::Plain);
    let r = crate::helpers::post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
    assert_eq!(r.status, 200);

    let pid = server.pid();
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let mut lines = Vec::new();
    let stopped = wait_log(&server, "stopped", &mut lines).expect("a stop line");
    assert!(stopped.contains("flushed=true"), "{stopped}");
    assert_eq!(server.records().len(), 1);
}

#[tokio::test]
async fn a_store_outage_is_refused_logged_once_and_recovered_from() {
    let server = Server::start(&account_toml("/wx", ECHO));
    let db = server.dir.path().join("data/wxgate.db");
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();

    // While the store cannot write, pushes are refused so that WeChat delivers them again.
    let push = compose::text(GH, USER, 1_733_305_000, "during outage", 77);
    let one =
        Rules { deadline: Duration::from_secs(10), attempts: 1, retry_interval: Duration::ZERO };
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, one).await;
    assert!(matches!(report.attempts[0].result, Ok((503, _))), "{:?}", report.attempts[0].result);
    let second = compose::text(GH, USER, 1_733_305_001, "also during outage", 78);
    let report = deliver(&wechat(), &server.url("/wx"), &second, Mode::Safe, one).await;
    assert!(matches!(report.attempts[0].result, Ok((503, _))));
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);

    // WeChat's next delivery is taken and answered.
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, one).await;
    assert_eq!(report.seen.text(), Some("during outage"));
    assert_eq!(server.records().len(), 1);

    let mut lines = Vec::new();
    assert!(wait_log(&server, "store recovered", &mut lines).is_some(), "{lines:?}");
    let outages = lines.iter().filter(|l| l.contains("store cannot write")).count();
    assert_eq!(outages, 1, "one error line per outage: {lines:#?}");
}

#[tokio::test]
async fn records_past_their_retention_are_purged_per_kind() {
    // 0.00001 days is under a second.
    let cfg = format!(
        "[retention]\npurge_interval_secs = 0.05\nkinds = {{ location_report_event = 0.00001 }}\n{}",
        account_toml("/wx", ECHO)
    );
    let server = Server::start(&cfg);
    let report = compose::event(
        GH,
        USER,
        1_733_306_000,
        "LOCATION",
        &[("Latitude", "1"), ("Longitude", "2"), ("Precision", "3")],
    );
    let text = compose::text(GH, USER, 1_733_306_001, "keep me", 606);
    for push in [&report, &text] {
        deliver(&wechat(), &server.url("/wx"), push, Mode::Plain, Rules::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.records().len() != 1 {
        assert!(Instant::now() < deadline, "the location report was not purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.records()[0]["Content"], "keep me");
}

#[tokio::test]
async fn a_follower_is_forgotten_on_revoke_and_on_request() {
    let server = Server::start(&account_toml("/wx", ECHO));
    let other = "oOtherFollower00000000000002";
    for (i, who) in [USER, other].into_iter().enumerate() {
        let push = compose::text(GH, who, 1_733_307_000 + i as u64, "mine", 700 + i as u64);
        deliver(&wechat(), &server.url("/wx"), &push, Mode::Plain, Rules::default()).await;
    }
    let revoke = compose::event(
        GH,
        USER,
        1_733_307_010,
        "user_authorization_revoke",
        &[("OpenID", USER), ("AppID", APP_ID), ("RevokeInfo", "301")],
    );
    deliver(&wechat(), &server.url("/wx"), &revoke, Mode::Plain, Rules::default()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.records().iter().any(|r| r["FromUserName"] == USER && r["kind"] == "text_message")
    {
        assert!(Instant::now() < deadline, "the follower's records were not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kinds: Vec<Value> = server.records().iter().map(|r| r["kind"].clone()).collect();
    assert_eq!(
        kinds,
        ["text_message", "user_authorization_event"],
        "the other follower and the revoke itself stay"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["forget", "--account", "test", "--openid", other, "--config"])
        .arg(&server.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("1 record of {other} deleted"));
    assert_eq!(server.records().len(), 1);
}
