//! The simulator's own correctness: it signs and encrypts like the vectors, its strict
//! checks fail on each kind of broken reply, its delivery rules retry like WeChat (with
//! millisecond deadlines), and scenarios, replay and load run against a real server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use serde_json::Value;
use wxgate::sim::delivery::{Rules, deliver};
use wxgate::sim::scenario::Scenario;
use wxgate::sim::{self, Mode, Seen, compose, load};
use wxgate_protocol::reply::envelope;
use wxgate_protocol::{EncodingAesKey, signature};

use crate::helpers::{AES_KEY, APP_ID, GH, Server, TOKEN, account_toml, wechat};

const USER: &str = "oSimTestUser0000000000000001";

fn vectors() -> Value {
    serde_json::from_str(include_str!("../../../wxgate-protocol/tests/fixtures/vectors.json"))
        .unwrap()
}

fn fast(attempts: u32) -> Rules {
    Rules { deadline: Duration::from_millis(300), attempts, retry_interval: Duration::ZERO }
}

#[test]
fn signs_like_the_vectors() {
    for v in vectors()["url_signature_vectors"].as_array().unwrap() {
        let account = sim::Account { token: v["token"].as_str().unwrap().into(), ..wechat() };
        let d = account.deliver_at(
            "<xml/>",
            Mode::Plain,
            v["timestamp"].as_str().unwrap(),
            v["nonce"].as_str().unwrap(),
        );
        assert!(
            d.query
                .starts_with(&format!("signature={}&", v["expected_signature"].as_str().unwrap()))
        );
    }
}

#[test]
fn encrypted_deliveries_open_with_the_protocol_code_and_carry_a_valid_msg_signature() {
    let push = compose::text(GH, USER, 1, "你好 🌏 ]]>", 1);
    for mode in [Mode::Compatible, Mode::Safe] {
        let d = wechat().deliver_at(&push, mode, "1700000000", "99");
        let q: std::collections::HashMap<String, String> =
            form_urlencoded::parse(d.query.as_bytes()).into_owned().collect();
        let outer = wxgate_protocol::xml::parse(&d.body).unwrap();
        let encrypt = outer.text_of("Encrypt").unwrap();
        assert!(signature::verify(&q["msg_signature"], &[TOKEN, "1700000000", "99", encrypt]));
        assert_eq!(wechat().aes_key.unwrap().open(encrypt, APP_ID).unwrap(), push);
        assert_eq!(outer.text_of("MsgType").is_some(), mode == Mode::Compatible);
    }
}

#[test]
fn opens_the_vector_reply() {
    let all = vectors();
    let v = &all["full_exchange_vectors"][0];
    let account = sim::Account {
        token: v["config"]["token"].as_str().unwrap().into(),
        app_id: v["config"]["appid"].as_str().unwrap().into(),
        aes_key: Some(
            EncodingAesKey::parse(v["config"]["encoding_aes_key"].as_str().unwrap()).unwrap(),
        ),
        original_id: "gh_0a1b2c3d4e5f".into(),
    };
    let body = v["reply"]["expected_body"].as_str().unwrap();
    let doc = wxgate_protocol::xml::parse(body).unwrap();
    assert_eq!(account.open_envelope(&doc).unwrap(), v["reply"]["plaintext"].as_str().unwrap());
    let seen = account.judge(v["expected_decrypted_xml"].as_str().unwrap(), Mode::Safe, 200, body);
    assert_eq!(seen.text(), Some("Welcome! scene=campaign42"));
}

/// A correct text reply to `push` from the account, for breaking in the tests below.
fn good_reply(content: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{USER}]]></ToUserName><FromUserName><![CDATA[{GH}]]></FromUserName>\
         <CreateTime>1733300001</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{content}]]></Content></xml>"
    )
}

fn seal(account: &sim::Account, inner: &str, ts: &str) -> String {
    let encrypt = account.aes_key.as_ref().unwrap().seal(inner, &account.app_id);
    let sig = signature::msg_signature(&account.token, ts, "7", &encrypt);
    envelope(&encrypt, &sig, ts.parse().unwrap(), "7")
}

fn assert_error(seen: Seen, why: &str) {
    match seen {
        Seen::ServiceError(reason) => {
            assert!(reason.contains(why), "reason {reason:?} should mention {why:?}")
        }
        other => panic!("expected the service error ({why}), got {other:?}"),
    }
}

#[test]
fn strict_checks_fail_on_broken_replies() {
    let w = wechat();
    let push = compose::text(GH, USER, 1733300000, "hi", 1);
    let event = compose::event(GH, USER, 1733300000, "CLICK", &[("EventKey", "K")]);

    assert_eq!(w.judge(&push, Mode::Plain, 200, &good_reply("ok")).text(), Some("ok"));
    assert_eq!(
        w.judge(&push, Mode::Safe, 200, &seal(&w, &good_reply("ok"), "1733300001")).text(),
        Some("ok")
    );
    assert_eq!(w.judge(&push, Mode::Safe, 200, "success"), Seen::Nothing);
    assert_eq!(w.judge(&push, Mode::Safe, 200, ""), Seen::Nothing);

    let swapped = good_reply("ok").replace(USER, "TMP").replace(GH, USER).replace("TMP", GH);
    assert_error(w.judge(&push, Mode::Plain, 200, &swapped), "ToUserName");
    assert_error(
        w.judge(&push, Mode::Plain, 200, &good_reply("a]]>b").replace("]]]]><![CDATA[>", "]]>")),
        "well-formed",
    );
    assert_error(w.judge(&push, Mode::Plain, 200, &good_reply("a\u{1}b")), "well-formed");
    assert_error(w.judge(&push, Mode::Plain, 200, "{\"text\":\"json\"}"), "well-formed");
    assert_error(
        w.judge(&push, Mode::Plain, 200, &good_reply("x").replace("text", "hologram")),
        "unknown reply MsgType",
    );
    assert_error(w.judge(&push, Mode::Plain, 500, "oops"), "HTTP status 500");

    // News limits: one article for a message, eight otherwise; the count must match.
    let news = |n: usize, count: usize| {
        let items: String = (0..n).map(|i| format!("<item><Title><![CDATA[t{i}]]></Title><Description><![CDATA[d]]></Description><PicUrl><![CDATA[p]]></PicUrl><Url><![CDATA[u]]></Url></item>")).collect();
        format!(
            "<xml><ToUserName><![CDATA[{USER}]]></ToUserName><FromUserName><![CDATA[{GH}]]></FromUserName><CreateTime>1733300001</CreateTime><MsgType><![CDATA[news]]></MsgType><ArticleCount>{count}</ArticleCount><Articles>{items}</Articles></xml>"
        )
    };
    assert!(matches!(w.judge(&push, Mode::Plain, 200, &news(1, 1)), Seen::Reply { .. }));
    assert_error(w.judge(&push, Mode::Plain, 200, &news(2, 2)), "articles");
    assert!(matches!(w.judge(&event, Mode::Plain, 200, &news(8, 8)), Seen::Reply { .. }));
    assert_error(w.judge(&event, Mode::Plain, 200, &news(9, 9)), "articles");
    assert_error(w.judge(&event, Mode::Plain, 200, &news(3, 2)), "ArticleCount");

    // The envelope: plaintext to a safe-mode push, ms TimeStamp, wrong AppID, bad pad,
    // a wrong MsgSignature, an extra element.
    assert_error(
        w.judge(&push, Mode::Safe, 200, &good_reply("ok")),
        "plaintext reply to a safe-mode push",
    );
    assert!(matches!(w.judge(&push, Mode::Compatible, 200, &good_reply("ok")), Seen::Reply { .. }));
    assert_error(
        w.judge(&push, Mode::Safe, 200, &seal(&w, &good_reply("ok"), "1733300001000")),
        "Unix seconds",
    );
    let other_app = sim::Account { app_id: "wx0000000000000000".into(), ..wechat() };
    assert_error(
        w.judge(&push, Mode::Safe, 200, &seal(&other_app, &good_reply("ok"), "1733300001")),
        "app id",
    );
    let bad_pad = {
        // Encrypt a buffer whose last byte is 0 (no valid PKCS#7 pad) with the right key.
        let key = w.aes_key.as_ref().unwrap();
        let mut body = vec![0u8; 16];
        body.extend_from_slice(&(3u32).to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(APP_ID.as_bytes());
        body.resize(64, 0);
        let encrypt = raw_cbc(key, &body);
        let sig = signature::msg_signature(TOKEN, "1733300001", "7", &encrypt);
        envelope(&encrypt, &sig, 1733300001, "7")
    };
    assert_error(w.judge(&push, Mode::Safe, 200, &bad_pad), "padding");
    let forged = seal(&w, &good_reply("ok"), "1733300001")
        .replace("<Nonce><![CDATA[7]]>", "<Nonce><![CDATA[8]]>");
    assert_error(w.judge(&push, Mode::Safe, 200, &forged), "MsgSignature");
    let extra =
        seal(&w, &good_reply("ok"), "1733300001").replace("</xml>", "<Extra>1</Extra></xml>");
    assert_error(w.judge(&push, Mode::Safe, 200, &extra), "exactly");
}

/// AES-256-CBC of whole blocks with WeChat's key and IV, no padding added.
fn raw_cbc(key: &EncodingAesKey, data: &[u8]) -> String {
    use aes::cipher::{Array, BlockModeEncrypt, KeyIvInit};
    use base64::Engine;
    let mut buf = data.to_vec();
    let iv: [u8; 16] = key.as_bytes()[..16].try_into().unwrap();
    let mut c = cbc::Encryptor::<aes::Aes256>::new(&Array::from(*key.as_bytes()), &Array::from(iv));
    let (blocks, _) = Array::slice_as_chunks_mut(&mut buf);
    c.encrypt_blocks(blocks);
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// A stand-in server that misbehaves (slow, or 502) on the first `bad_first` requests.
async fn flaky_server(behaviour: &'static str, bad_first: u32) -> (String, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/wx",
        post(move || {
            let h = h.clone();
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                if n < bad_first {
                    if behaviour != "slow" {
                        return (axum::http::StatusCode::BAD_GATEWAY, "busy");
                    }
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                (axum::http::StatusCode::OK, "success")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/wx", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

#[tokio::test]
async fn a_slow_first_attempt_is_delivered_again_and_the_second_answer_counts() {
    let (url, hits) = flaky_server("slow", 1).await;
    let push = compose::text(GH, USER, 1, "x", 1);
    let report = deliver(&wechat(), &url, &push, Mode::Safe, fast(3)).await;
    assert_eq!(report.attempts.len(), 2);
    assert!(report.attempts[0].result.as_ref().unwrap_err().contains("no answer"));
    assert_eq!(report.seen, Seen::Nothing);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn non_200_answers_are_retried_up_to_the_attempt_count() {
    let (url, hits) = flaky_server("502", 10).await;
    let push = compose::text(GH, USER, 1, "x", 1);
    let report = deliver(&wechat(), &url, &push, Mode::Plain, fast(4)).await;
    assert_eq!(report.attempts.len(), 4, "WeChat's attempt count is a parameter");
    assert_error(report.seen, "HTTP 502 on all 4 deliveries");
    assert_eq!(hits.load(Ordering::SeqCst), 4);

    let (url, _) = flaky_server("502", 2).await;
    let report = deliver(&wechat(), &url, &push, Mode::Plain, fast(3)).await;
    assert_eq!((report.attempts.len(), report.seen), (3, Seen::Nothing));
}

#[tokio::test]
async fn refused_connections_are_failed_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let report =
        deliver(&wechat(), &format!("http://127.0.0.1:{port}/wx"), "<xml/>", Mode::Plain, fast(3))
            .await;
    assert_eq!(report.attempts.len(), 3);
    assert!(matches!(report.seen, Seen::ServiceError(_)));
}

#[tokio::test]
async fn a_retry_during_a_slow_store_joins_the_first_delivery() {
    let server = Server::start(&account_toml(
        "/wx",
        "[[accounts.rules]]\nwhen = { msg_type = \"text\" }\nreply = { text = \"{content}\" }\n",
    ));
    let db = server.dir.path().join("data/wxgate.db");
    // Hold the database's write lock so that the first delivery cannot commit for a while.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        lock.execute_batch("COMMIT").unwrap();
    });

    let push = compose::text(GH, USER, 1_733_301_000, "slow store", 31337);
    let rules = Rules {
        deadline: Duration::from_millis(250),
        attempts: 10,
        retry_interval: Duration::ZERO,
    };
    let report = deliver(&wechat(), &server.url("/wx"), &push, Mode::Safe, rules).await;
    release.join().unwrap();

    assert!(report.attempts.len() >= 2, "the first delivery must have timed out");
    assert_eq!(report.seen.text(), Some("slow store"));
    let records = server.records();
    assert_eq!(records.len(), 1, "the push is recorded once");
}

#[tokio::test]
async fn journey_and_scenarios_run_against_the_server() {
    let server = Server::start(
        include_str!("../../../../wxgate.toml")
            .split("[[accounts]]")
            .nth(1)
            .map(|a| format!("[[accounts]]{a}"))
            .unwrap()
            .as_str(),
    );
    let results = Scenario::journey()
        .run(&wechat(), &server.url("/wechat"), Mode::Safe, fast(3), |_, _| {})
        .await;
    assert!(results.iter().all(|r| r.failure.is_none()));
    assert_eq!(
        results[0].report.seen.text(),
        Some("Welcome, you came from the spring_poster poster")
    );
    assert_eq!(server.records().len(), results.len());

    let scenario = Scenario::parse(
        "[[steps]]\nfollower = \"bob\"\npush = \"click --key MENU_A\"\nexpect_text = \"clicked MENU_A\"\n\
         [[steps]]\nfollower = \"bob\"\npush = \"click --key MENU_A\"\nexpect_text = \"wrong on purpose\"\n",
    )
    .unwrap();
    let results =
        scenario.run(&wechat(), &server.url("/wechat"), Mode::Plain, fast(3), |_, _| {}).await;
    assert!(results[0].failure.is_none());
    assert!(results[1].failure.as_deref().unwrap().contains("wrong on purpose"));
}

#[tokio::test]
async fn load_sends_distinct_pushes_and_retries_get_the_same_answer() {
    let server = Server::start(&account_toml(
        "/wx",
        "[[accounts.rules]]\nwhen = { msg_type = \"text\" }\nreply = { text = \"{content}\" }\n",
    ));
    let opts = load::Options {
        followers: 7,
        rate: 150.0,
        duration: Duration::from_millis(800),
        concurrency: 16,
        retry_ratio: 0.25,
        rules: fast(3),
    };
    let summary = load::run(&wechat(), &server.url("/wx"), Mode::Safe, &opts, |_, _| {}).await;
    assert!(summary.pushes >= 60, "{summary:?}");
    assert_eq!(summary.errors, 0, "{summary:?}");
    assert_eq!(summary.retry_mismatches, 0, "{summary:?}");
    assert!(summary.retried > 0);
    assert_eq!(server.records().len() as u64, summary.pushes, "every push recorded once");
}

#[tokio::test]
async fn replay_sends_recorded_pushes_to_another_server() {
    let first = Server::start(&account_toml("/wx", ""));
    for i in 0..3 {
        let push = compose::event(GH, USER, 1_733_302_000 + i, "CLICK", &[("EventKey", "R")]);
        deliver(&wechat(), &first.url("/wx"), &push, Mode::Safe, fast(1)).await;
    }
    let lines: String = first.records().iter().map(|r| format!("{r}\n")).collect();
    let file = first.dir.path().join("events.jsonl");
    std::fs::write(&file, lines).unwrap();

    let second = Server::start(&account_toml("/wx", ""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args([
            "sim",
            "replay",
            "--url",
            &second.url("/wx"),
            "--token",
            TOKEN,
            "--aes-key",
            AES_KEY,
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let a: Vec<Value> = first.records().iter().map(|r| r["dedup_key"].clone()).collect();
    let b: Vec<Value> = second.records().iter().map(|r| r["dedup_key"].clone()).collect();
    assert_eq!(a, b);
}

#[test]
fn the_journey_command_reports_every_step() {
    let server = Server::start(
        include_str!("../../../../wxgate.toml")
            .split("[[accounts]]")
            .nth(1)
            .map(|a| format!("[[accounts]]{a}"))
            .unwrap()
            .as_str(),
    );
    for mode in [vec!["--mode", "plain"], vec!["--aes-key", AES_KEY, "--mode", "safe"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .args(["sim", "journey", "--url", &server.url("/wechat"), "--token", TOKEN])
            .args(&mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("Welcome, you came from the spring_poster poster"), "{text}");
        assert!(text.contains("clicked MENU_A"));
        assert!(text.contains("11 of 11 steps as expected"));
    }
}
