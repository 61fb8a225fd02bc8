//! The crash test: the simulator drives load with retries, the server is killed with
//! SIGKILL mid-run and started again on the same port. Afterwards every push that got a
//! 200 is stored exactly once, every forward reached the owner's service at least once
//! and was handled once by its dedup key, and nothing acknowledged is missing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use serde_json::{Value, json};
use wxgate::sim::delivery::{Rules, deliver};
use wxgate::sim::{self, Mode, compose};
use wxgate_protocol::{EncodingAesKey, Push};

use crate::helpers::{AES_KEY, APP_ID, GH, Server, TOKEN, every_forward_arrives};

const SECRET: &str = "crash-test-secret";

/// The owner's service: handles each dedup key once, counts every delivery.
#[derive(Default)]
struct Receiver {
    deliveries: Mutex<Vec<String>>,
    handled: Mutex<HashSet<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_acknowledged() {
    let receiver = Arc::new(Receiver::default());
    let r = receiver.clone();
    let app = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let r = r.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap();
                let key = v["dedup_key"].as_str().unwrap().to_owned();
                r.deliveries.lock().unwrap().push(key.clone());
                let first = r.handled.lock().unwrap().insert(key);
                json!({"text": if first { "handled" } else { "seen before" }}).to_string()
            }
        }),
    );
    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", hook_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(hook_listener, app).await });

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wxgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[outbox]\npoll_ms = 20\nbackoff_ms = 50\nbackoff_max_ms = 200\n\
             [[accounts]]\nname = \"crash\"\npath = \"/wx\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
             encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\nforward_secret = \"{SECRET}\"\n\
             [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ forward = \"{hook}\" }}\n\
             [[accounts.rules]]\nwhen = {{ event = \"LOCATION\" }}\nreply = {{ forward = \"{hook}\" }}\n\
             [[accounts.rules]]\nwhen = {{ event = \"CLICK\" }}\nreply = {{ text = \"clicked {{event_key}}\" }}\n"
        ),
    )
    .unwrap();
    let server = Arc::new(Mutex::new(Some(Server::start_on(dir, config.clone(), port))));

    let wechat = sim::Account {
        token: TOKEN.into(),
        app_id: APP_ID.into(),
        aes_key: Some(EncodingAesKey::parse(AES_KEY).unwrap()),
        original_id: GH.into(),
    };
    let url = format!("http://127.0.0.1:{port}/wx");
    // WeChat's rules, sped up: retries keep coming while the server is down.
    let rules = Rules {
        deadline: Duration::from_secs(3),
        attempts: 8,
        retry_interval: Duration::from_millis(250),
    };
    const PUSHES: usize = 240;
    let done = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<HashMap<String, bool>>> = Arc::default();

    let mut tasks = tokio::task::JoinSet::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(12));
    for n in 0..PUSHES as u64 {
        let follower = format!("oCrashFollower{:014}", n % 9);
        let push = match n % 3 {
            0 => compose::text(
                GH,
                &follower,
                1_733_320_000 + n,
                &format!("crash {n}"),
                5_000_000 + n,
            ),
            1 => compose::event(
                GH,
                &follower,
                1_733_320_000 + n,
                "LOCATION",
                &[("Latitude", "23.1"), ("Longitude", "113.2"), ("Precision", &n.to_string())],
            ),
            _ => compose::event(
                GH,
                &follower,
                1_733_320_000 + n,
                "CLICK",
                &[("EventKey", &format!("K{n}"))],
            ),
        };
        let (wechat, url, done, acked, permit) = (
            wechat.clone(),
            url.clone(),
            done.clone(),
            acked.clone(),
            limit.clone().acquire_owned().await.unwrap(),
        );
        tasks.spawn(async move {
            let report = deliver(&wechat, &url, &push, Mode::Safe, rules).await;
            let ok = report.attempts.iter().any(|a| matches!(a.result, Ok((200, _))));
            acked.lock().unwrap().insert(Push::parse(&push).unwrap().dedup_key(), ok);
            done.fetch_add(1, Ordering::SeqCst);
            drop(permit);
        });
        if n == PUSHES as u64 / 3 {
            // Mid-run: kill the server without warning, and start it again shortly.
            let s = server.lock().unwrap().take().unwrap();
            let (dir, cfg) = s.kill();
            let server = server.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let restarted =
                    tokio::task::spawn_blocking(move || Server::start_on(dir, cfg, port))
                        .await
                        .unwrap();
                *server.lock().unwrap() = Some(restarted);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    assert_eq!(done.load(Ordering::SeqCst), PUSHES);

    let server = server.lock().unwrap().take().expect("restarted");
    let acked = acked.lock().unwrap().clone();
    let acked_keys: Vec<&String> = acked.iter().filter(|(_, ok)| **ok).map(|(k, _)| k).collect();
    assert!(acked_keys.len() > PUSHES * 9 / 10, "most pushes got through: {}", acked_keys.len());

    // Every acknowledged push is stored, exactly once.
    let records = server.records();
    let mut stored: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *stored.entry(r["dedup_key"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    for key in &acked_keys {
        assert_eq!(stored.get(*key), Some(&1), "acknowledged push {key} stored once");
    }

    // Every acknowledged forward reached the service (background ones through the
    // outbox, possibly after the restart), and each was handled once.
    let forwarded: Vec<&String> =
        acked_keys.iter().copied().filter(|k| !k.contains(":CLICK:")).collect();
    every_forward_arrives(&forwarded, |k| receiver.handled.lock().unwrap().contains(k)).await;
    let deliveries = receiver.deliveries.lock().unwrap().len();
    let handled = receiver.handled.lock().unwrap().len();
    assert!(deliveries >= handled, "at least once");
    eprintln!(
        "crash test: {} pushes, {} acknowledged, {} records, {deliveries} forwards for {handled} keys",
        PUSHES,
        acked_keys.len(),
        records.len()
    );
}
