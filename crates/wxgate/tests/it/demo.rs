//! The shipped demo config (`wxgate.toml`), driven through the simulator: the six events
//! of the original protocol document plus a text message, in plaintext, compatible and
//! safe mode, each reply judged as WeChat would and each record read back.

use std::time::Duration;

use serde_json::Value;
use wxgate::sim::{Http, Mode, Seen, compose};

use crate::helpers::{GH, Server, wechat};

const USER: &str = "oDemoUser0000000000000000001";

fn demo_server() -> Server {
    let shipped = include_str!("../../../../wxgate.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wxgate.toml");
    std::fs::write(&path, shipped).unwrap();
    Server::start_at(dir, path)
}

/// (push, expected text reply or None for no reply, expected kind)
fn journey(t: u64) -> Vec<(String, Option<&'static str>, &'static str)> {
    vec![
        (
            compose::event(
                GH,
                USER,
                t,
                "subscribe",
                &[("EventKey", "qrscene_spring_poster"), ("Ticket", "TICKET1")],
            ),
            Some("Welcome, you came from the spring_poster poster"),
            "subscribe_event",
        ),
        (
            compose::event(
                GH,
                USER,
                t + 1,
                "SCAN",
                &[("EventKey", "spring_poster"), ("Ticket", "TICKET1")],
            ),
            Some("Welcome back (scene spring_poster)"),
            "scan_event",
        ),
        (
            compose::event(
                GH,
                USER,
                t + 2,
                "LOCATION",
                &[
                    ("Latitude", "23.137466"),
                    ("Longitude", "113.352425"),
                    ("Precision", "119.385040"),
                ],
            ),
            None,
            "location_report_event",
        ),
        (
            compose::event(GH, USER, t + 3, "CLICK", &[("EventKey", "MENU_A")]),
            Some("clicked MENU_A"),
            "click_event",
        ),
        (
            compose::event(
                GH,
                USER,
                t + 4,
                "VIEW",
                &[("EventKey", "https://example.com/menu"), ("MenuId", "123")],
            ),
            None,
            "view_event",
        ),
        (
            compose::text(GH, USER, t + 5, "hello 你好 🌏", t * 10),
            Some("hello 你好 🌏"),
            "text_message",
        ),
        (
            compose::event(GH, USER, t + 6, "unsubscribe", &[("EventKey", "")]),
            None,
            "unsubscribe_event",
        ),
    ]
}

async fn run(mode: Mode) {
    let server = demo_server();
    let wechat = wechat();
    let http = Http::new(Duration::from_secs(5));
    let url = server.url("/wechat");
    let base = 1_733_400_000 + mode as u64 * 100;

    let steps = journey(base);
    for (push, want, _) in &steps {
        let d = wechat.deliver(push, mode);
        let answer = http.post(&url, &d).await.unwrap();
        let seen = wechat.judge(push, mode, answer.status, &answer.body);
        match want {
            Some(text) => assert_eq!(seen.text(), Some(*text), "{mode:?}: {push}\n{seen:?}"),
            None => assert_eq!(seen, Seen::Nothing, "{mode:?}: {push}"),
        }
        if mode == Mode::Safe && want.is_some() {
            assert!(answer.body.contains("<Encrypt>"), "safe mode replies are encrypted");
        }
    }

    let records = server.records();
    assert_eq!(records.len(), steps.len(), "{mode:?}: one record per push");
    for (record, (_, want, kind)) in records.iter().zip(&steps) {
        assert_eq!(record["kind"], *kind);
        assert_eq!(record["FromUserName"], USER);
        assert_eq!(record["encrypted"], mode != Mode::Plain);
        assert_eq!(record["reply"].is_null(), want.is_none());
    }
    assert_eq!(records[0]["scene"], "spring_poster");
    assert_eq!(records[0]["is_qr_scene"], true);
    assert_eq!(records[0]["EventKey"], "qrscene_spring_poster");
    assert_eq!(records[1]["scene"], "spring_poster");
    assert_eq!(records[2]["Precision"], "119.385040");
    assert_eq!(records[5]["Content"], "hello 你好 🌏");
    assert_eq!(records[5]["MsgId"], (base * 10).to_string());

    // Every delivery again, as WeChat's retries: same replies, nothing recorded twice.
    for (push, want, _) in &steps {
        let answer = http.post(&url, &wechat.deliver(push, mode)).await.unwrap();
        let seen = wechat.judge(push, mode, answer.status, &answer.body);
        assert_eq!(seen.text(), *want, "retry of {push}");
    }
    // Delivery counts are written behind the answer; give them a moment.
    let mut again = server.records();
    for _ in 0..100 {
        if again.iter().all(|r| r["deliveries"] == 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        again = server.records();
    }
    assert_eq!(again.len(), steps.len());
    assert!(again.iter().all(|r| r["deliveries"] == 2), "each push counted two deliveries");
}

#[tokio::test]
async fn demo_journey_in_plaintext_mode() {
    run(Mode::Plain).await;
}

#[tokio::test]
async fn demo_journey_in_compatible_mode() {
    run(Mode::Compatible).await;
}

#[tokio::test]
async fn demo_journey_in_safe_mode() {
    run(Mode::Safe).await;
}

#[tokio::test]
async fn url_verification_echoes_only_when_signed() {
    let server = demo_server();
    let http = Http::new(Duration::from_secs(5));
    let q = wechat().verification("4375120948345356249");
    let ok = http.send("GET", &format!("{}?{q}", server.url("/wechat")), None).await.unwrap();
    assert_eq!((ok.status, ok.body.as_str()), (200, "4375120948345356249"));
    let forged = q.replace("signature=", "signature=0");
    let bad = http.send("GET", &format!("{}?{forged}", server.url("/wechat")), None).await.unwrap();
    assert_eq!(bad.status, 403);
    assert!(!bad.body.contains("4375120948345356249"));
}

#[tokio::test]
async fn events_command_prints_wechat_field_names() {
    let server = demo_server();
    let wechat = wechat();
    let http = Http::new(Duration::from_secs(5));
    let push = compose::event(
        GH,
        USER,
        1_733_400_999,
        "subscribe",
        &[("EventKey", "qrscene_spring_poster")],
    );
    http.post(&server.url("/wechat"), &wechat.deliver(&push, Mode::Safe)).await.unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["events", "--config"])
        .arg(&server.config)
        .args(["--account", "demo"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert_eq!(line["MsgType"], "event");
    assert_eq!(line["Event"], "subscribe");
    assert_eq!(line["EventKey"], "qrscene_spring_poster");
    assert_eq!(line["account"], "demo");
    assert_eq!(line["dead_letter"], false);
    assert!(line["reply"].as_str().unwrap().contains("spring_poster"));

    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["events", "--config"])
        .arg(&server.config)
        .args(["--account", "nope"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
}
