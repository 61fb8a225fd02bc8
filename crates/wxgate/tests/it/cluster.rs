//! Several `wxgate serve` processes over one PostgreSQL database, as behind a load
//! balancer: each retry of a push lands on another node (the simulator's
//! `deliver_across`). Every push is handled once, every retry gets the original reply,
//! every push is in the NATS stream once, and a node killed mid-run loses nothing that
//! was acknowledged. Accounts change under running nodes, and a private PostgreSQL is
//! stopped and started under load.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use serde_json::{Value, json};
use wxgate::sim::delivery::{Report, Rules, deliver_across};
use wxgate::sim::{Http, Mode, Seen, compose};
use wxgate_protocol::Push;

use crate::helpers::{AES_KEY, APP_ID, GH, Server, TOKEN, every_forward_arrives, wechat};
use crate::nats::TestStream;
use crate::services::{self, PgDatabase, Service};

const SECRET: &str = "cluster-test-secret";

/// The owner's service: answers `handled KEY`, slowly for texts that say "slow".
#[derive(Default)]
struct Hook {
    deliveries: Mutex<HashMap<String, usize>>,
}

async fn start_hook() -> (Arc<Hook>, String) {
    let hook = Arc::new(Hook::default());
    let h = hook.clone();
    let app = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let h = h.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap();
                let key = v["dedup_key"].as_str().unwrap().to_owned();
                *h.deliveries.lock().unwrap().entry(key.clone()).or_default() += 1;
                if v["xml"].as_str().unwrap_or_default().contains("slow") {
                    tokio::time::sleep(Duration::from_millis(450)).await;
                }
                json!({ "text": format!("handled {key}") }).to_string()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hook, url)
}

/// A node's config: the shared database, short leases, forwards held for a retry; with a
/// stream, every push is published to it too.
fn node_config(database: &str, hook: &str, stream: Option<&TestStream>) -> String {
    // With the stream, the whole set: the token shared through Redis too.
    let (redis, nats) = stream.map_or((String::new(), String::new()), |s| {
        (
            format!("redis = \"{}\"\n", Service::Redis.url()),
            format!(
                "[nats]\nurl = \"{}\"\nstream = \"{}\"\nsubject_prefix = \"{}\"\n",
                Service::Nats.url(),
                s.name,
                s.prefix
            ),
        )
    });
    format!(
        "database = \"{database}\"\n{redis}{nats}\
         [outbox]\npoll_ms = 20\nbackoff_ms = 40\nbackoff_max_ms = 200\nlease_ms = 1000\norphan_after_ms = 1500\n\
         [[accounts]]\nname = \"cl\"\npath = \"/wx\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
         encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\nforward_secret = \"{SECRET}\"\n\
         reply_budget_ms = 250\nlate_reply = \"hold_for_retry\"\nwechat_attempts = 3\n\
         [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ forward = \"{hook}\" }}\n\
         [[accounts.rules]]\nwhen = {{ event = \"LOCATION\" }}\nreply = {{ forward = {{ url = \"{hook}\", background = true }} }}\n\
         [[accounts.rules]]\nwhen = {{ event = \"CLICK\" }}\nreply = {{ text = \"clicked {{event_key}}\" }}\n"
    )
}

fn start_nodes(n: usize, database: &str, hook: &str, stream: Option<&TestStream>) -> Vec<Server> {
    (0..n).map(|_| Server::start(&node_config(database, hook, stream))).collect()
}

/// Push `n`: a CLICK (rule reply), a text (forwarded in time, or slowly), a LOCATION
/// (forwarded in the background).
fn push(n: u64) -> String {
    let follower = format!("oClusterFollower{:012}", n % 7);
    let time = 1_733_330_000 + n;
    match n % 4 {
        0 => compose::event(GH, &follower, time, "CLICK", &[("EventKey", &format!("K{n}"))]),
        1 => compose::text(GH, &follower, time, &format!("fast {n}"), 7_000_000 + n),
        2 => compose::text(GH, &follower, time, &format!("slow {n}"), 7_000_000 + n),
        _ => compose::event(
            GH,
            &follower,
            time,
            "LOCATION",
            &[("Latitude", "23.1"), ("Longitude", "113.2"), ("Precision", &n.to_string())],
        ),
    }
}

/// Delivers pushes `range` to the nodes, the first attempt of push n to node n % 3.
async fn drive(
    urls: Arc<Vec<String>>,
    range: std::ops::Range<u64>,
    rules: Rules,
    mut on_push: impl FnMut(u64),
) -> Vec<(u64, String, String, Report)> {
    let http = Arc::new(Http::new(rules.deadline));
    let limit = Arc::new(tokio::sync::Semaphore::new(12));
    let mut tasks = tokio::task::JoinSet::new();
    for n in range {
        on_push(n);
        let (http, urls, permit) =
            (http.clone(), urls.clone(), limit.clone().acquire_owned().await.unwrap());
        tasks.spawn(async move {
            let inner = push(n);
            let k = urls.len();
            let order: Vec<&str> = (0..k).map(|i| urls[(n as usize + i) % k].as_str()).collect();
            let report = deliver_across(&http, &wechat(), &order, &inner, Mode::Safe, rules).await;
            drop(permit);
            (n, Push::parse(&inner).unwrap().dedup_key(), inner, report)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

fn reply_text(seen: &Seen) -> Option<String> {
    seen.text().map(str::to_owned)
}

const RULES: Rules = Rules {
    deadline: Duration::from_secs(2),
    attempts: 3,
    retry_interval: Duration::from_millis(20),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_three_nodes_join_the_first_and_run_once() {
    if !services::require(Service::Postgres) {
        return;
    }
    if !services::require(Service::Nats) || !services::require(Service::Redis) {
        return;
    }
    let db = PgDatabase::create();
    let stream = TestStream::new(&Service::Nats.url()).await;
    let (hook, hook_url) = start_hook().await;
    let nodes = start_nodes(3, &db.url, &hook_url, Some(&stream));
    let urls = Arc::new(nodes.iter().map(|s| s.url("/wx")).collect::<Vec<_>>());

    const PUSHES: u64 = 120;
    let results = drive(urls, 0..PUSHES, RULES, |_| {}).await;

    let mut retried_across = 0;
    for (n, key, inner, report) in &results {
        let last = report.attempts.last().unwrap();
        assert!(matches!(last.result, Ok((200, _))), "{key}: {:?}", report.attempts);
        let text = reply_text(&report.seen);
        if inner.contains("CLICK") {
            assert_eq!(text.as_deref(), Some(format!("clicked K{n}").as_str()), "{key}");
        } else if inner.contains("LOCATION") {
            assert!(matches!(report.seen, Seen::Nothing), "{key}: {:?}", report.seen);
        } else {
            // In time or through a retry that joined another node's forward: the
            // owner's reply, never a second forward.
            assert_eq!(
                text.as_deref(),
                Some(format!("handled {key}").as_str()),
                "{key}: {:?}",
                report
            );
            if report.attempts.len() > 1 {
                retried_across += 1;
            }
        }
    }
    assert!(retried_across >= 10, "slow forwards were retried on other nodes: {retried_across}");

    // Every forward ran once (background ones may take a moment).
    let expected: HashSet<String> = results
        .iter()
        .filter(|(_, _, inner, _)| !inner.contains("CLICK"))
        .map(|(_, k, _, _)| k.clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let d = hook.deliveries.lock().unwrap().clone();
        if expected.iter().all(|k| d.contains_key(k)) {
            for (k, n) in &d {
                assert_eq!(*n, 1, "{k} forwarded {n} times");
            }
            break;
        }
        assert!(Instant::now() < deadline, "background forwards missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One record per push, with every delivery counted, whichever node took it.
    let records = nodes[0].records();
    assert_eq!(records.len(), PUSHES as usize);
    let deliveries: u64 = records.iter().map(|r| r["deliveries"].as_u64().unwrap()).sum();
    let attempts: usize = results.iter().map(|(_, _, _, r)| r.attempts.len()).sum();
    assert_eq!(deliveries, attempts as u64, "every delivery counted once");

    // Every push is in the stream once, whichever nodes its deliveries reached.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let messages = stream.messages().await;
        if messages.len() >= PUSHES as usize {
            let ids: HashSet<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
            assert_eq!(ids.len(), messages.len(), "a push published twice");
            assert_eq!(messages.len(), PUSHES as usize);
            for (_, key, _, _) in &results {
                assert!(ids.contains(format!("cl:{key}").as_str()), "{key} not in the stream");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{} of {PUSHES} in the stream", messages.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_loses_nothing_acknowledged() {
    if !services::require(Service::Postgres) {
        return;
    }
    let db = PgDatabase::create();
    let (hook, hook_url) = start_hook().await;
    let nodes = start_nodes(3, &db.url, &hook_url, None);
    let urls = Arc::new(nodes.iter().map(|s| s.url("/wx")).collect::<Vec<_>>());
    let survivors = [nodes[0].config.clone(), nodes[1].config.clone()];
    let victim = Arc::new(Mutex::new(nodes.into_iter().collect::<Vec<_>>()));

    const PUSHES: u64 = 150;
    let v = victim.clone();
    let results = drive(urls, 0..PUSHES, RULES, move |n| {
        if n == PUSHES / 3 {
            // SIGKILL the third node: its sockets close, forwards in flight are cut.
            let node = v.lock().unwrap().pop().unwrap();
            node.kill();
        }
    })
    .await;
    let nodes = std::mem::take(&mut *victim.lock().unwrap());
    assert_eq!(nodes.len(), 2);
    assert!(survivors.contains(&nodes[0].config));

    let acked: Vec<&(u64, String, String, Report)> = results
        .iter()
        .filter(|(_, _, _, r)| r.attempts.iter().any(|a| matches!(a.result, Ok((200, _)))))
        .collect();
    assert!(acked.len() as u64 >= PUSHES * 9 / 10, "{} of {PUSHES} acknowledged", acked.len());

    // Every acknowledged push is stored exactly once.
    let records = nodes[0].records();
    let mut stored: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *stored.entry(r["dedup_key"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    for (_, key, _, _) in &acked {
        assert_eq!(stored.get(key), Some(&1), "acknowledged push {key} stored once");
    }
    // Every acknowledged forward reached the owner's service, including those whose
    // node died in the middle (swept to the outbox by a surviving node).
    let forwarded: Vec<&String> = acked
        .iter()
        .filter(|(_, _, inner, _)| !inner.contains("CLICK"))
        .map(|(_, k, _, _)| k)
        .collect();
    every_forward_arrives(&forwarded, |k| hook.deliveries.lock().unwrap().contains_key(k)).await;
    eprintln!(
        "cluster kill: {PUSHES} pushes, {} acknowledged, {} records, {} forwards",
        acked.len(),
        records.len(),
        hook.deliveries.lock().unwrap().values().sum::<usize>()
    );
}

/// A config with accounts `(name, path, reply)`: each echoes its reply to any text.
fn accounts_config(database: &str, accounts: &[(&str, &str, &str)]) -> String {
    let mut text = format!("database = \"{database}\"\nreload_secs = 1\n");
    for (name, path, reply) in accounts {
        text += &format!(
            "[[accounts]]\nname = \"{name}\"\npath = \"{path}\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
             encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\n\
             [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ text = \"{reply}\" }}\n"
        );
    }
    text
}

/// The text reply a node gives at `path`, or the HTTP status when it refuses.
async fn ask(server: &Server, path: &str, n: u64) -> Result<String, String> {
    ask_within(server, path, n, Duration::from_secs(2)).await
}

/// The same, waiting up to `deadline` for the answer.
async fn ask_within(
    server: &Server,
    path: &str,
    n: u64,
    deadline: Duration,
) -> Result<String, String> {
    let inner = compose::text(GH, "oReloadFollower", 1_733_340_000 + n, "hi", 8_000_000 + n);
    let rules = Rules { deadline, attempts: 1, retry_interval: Duration::ZERO };
    let report = deliver_across(
        &Http::new(rules.deadline),
        &wechat(),
        &[&server.url(path)],
        &inner,
        Mode::Safe,
        rules,
    )
    .await;
    match &report.attempts[0].result {
        Ok((200, _)) => {
            report.seen.text().map(str::to_owned).ok_or_else(|| format!("{:?}", report.seen))
        }
        Ok((status, _)) => Err(status.to_string()),
        Err(e) => Err(e.clone()),
    }
}

/// Waits (bounded) until `check` holds for the node's answer at `path`.
async fn until_answer(server: &Server, path: &str, want: Result<&str, &str>) {
    // Every question is a new push: a repeated one would get its recorded answer.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let got = ask(server, path, n).await;
        if got.as_deref().map_err(String::as_str) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}{path}: still {got:?}, want {want:?}; log: {:?}",
            server.port,
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_change_on_every_running_node_without_a_restart() {
    if !services::require(Service::Postgres) {
        return;
    }
    let db = PgDatabase::create();
    let first = accounts_config(&db.url, &[("a", "/a", "reply a1")]);
    let nodes: Vec<Server> = (0..3).map(|_| Server::start(&first)).collect();
    for node in &nodes {
        until_answer(node, "/a", Ok("reply a1")).await;
        until_answer(node, "/b", Err("404")).await;
    }
    // Configuration management writes the same file on every node: an account added,
    // one changed. Every node serves both within its check interval.
    let second = accounts_config(&db.url, &[("a", "/a", "reply a2"), ("b", "/b", "reply b1")]);
    for node in &nodes {
        std::fs::write(&node.config, format!("data_dir = \"data\"\n{second}")).unwrap();
    }
    for node in &nodes {
        until_answer(node, "/a", Ok("reply a2")).await;
        until_answer(node, "/b", Ok("reply b1")).await;
    }
    // A broken file changes nothing and says why.
    for node in &nodes {
        std::fs::write(
            &node.config,
            format!("data_dir = \"data\"\n{second}\n[[accounts]]\nname = 3\n"),
        )
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in &nodes {
        until_answer(node, "/b", Ok("reply b1")).await;
        let logs = node.logs();
        assert!(logs.iter().any(|l| l.contains("config not reloaded")), "{logs:?}");
    }
    // Removed: no longer served. SIGHUP reloads at once, whatever the interval.
    let third = accounts_config(&db.url, &[("b", "/b", "reply b1")])
        .replace("reload_secs = 1", "reload_secs = 0");
    for node in &nodes {
        std::fs::write(&node.config, format!("data_dir = \"data\"\n{third}")).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in &nodes {
        let _ = std::process::Command::new("kill").args(["-HUP", &node.pid().to_string()]).status();
    }
    for node in &nodes {
        until_answer(node, "/a", Err("404")).await;
        until_answer(node, "/b", Ok("reply b1")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopping_under_load_fails_deliveries_and_recovers_by_itself() {
    let Some(pg) = services::PrivatePostgres::start() else { return };
    let config = accounts_config(&pg.url, &[("a", "/a", "stored")]);
    let node = Server::start(&config);
    let rules =
        Rules { deadline: Duration::from_secs(3), attempts: 1, retry_interval: Duration::ZERO };
    let http = Http::new(rules.deadline);
    let mut acked = Vec::new();
    let mut refused = 0;
    let send = |n: u64| {
        let inner = compose::text(GH, "oOutageFollower", 1_733_350_000 + n, "hi", 9_000_000 + n);
        let key = Push::parse(&inner).unwrap().dedup_key();
        let (http, url) = (&http, node.url("/a"));
        async move {
            let r = deliver_across(http, &wechat(), &[&url], &inner, Mode::Safe, rules).await;
            (key, r.attempts[0].result.clone())
        }
    };
    let mut n = 0;
    // Up: answered. Down: refused with 503, so that WeChat delivers again. Up again:
    // answered, without a restart of wxgate.
    for phase in ["up", "down", "up again"] {
        match phase {
            "down" => pg.down(),
            "up again" => pg.up(),
            _ => {}
        }
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until {
            n += 1;
            let (key, result) = send(n).await;
            match (phase, result) {
                (_, Ok((200, _))) => {
                    assert_ne!(phase, "down", "acknowledged while the database was down");
                    acked.push(key);
                }
                ("down", Ok((503, _))) => refused += 1,
                // The first pushes after the restart may still meet the old connection.
                ("up again", Ok((503, _))) => {}
                (_, other) => panic!("{phase}: push {n}: {other:?}"),
            }
        }
    }
    assert!(refused > 0, "pushes during the outage were refused");
    assert!(acked.len() > 4, "{acked:?}");
    // Acknowledged means stored, also across the outage.
    let stored: HashSet<String> =
        node.records().iter().map(|r| r["dedup_key"].as_str().unwrap().to_owned()).collect();
    for key in &acked {
        assert!(stored.contains(key), "acknowledged {key} is not stored");
    }
    // One error line for the outage, one line for the recovery.
    let logs = node.logs_with("store recovered").await;
    let errors = logs.iter().filter(|l| l.contains("store cannot write")).count();
    let recoveries = logs.iter().filter(|l| l.contains("store recovered")).count();
    assert_eq!((errors, recoveries), (1, 1), "{logs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_gets_pushes_refused_in_time() {
    let Some(pg) = services::PrivatePostgres::start() else { return };
    let node = Server::start(&accounts_config(&pg.url, &[("a", "/a", "stored")]));
    until_answer(&node, "/a", Ok("stored")).await;
    // Frozen: connections stay open, nothing answers. WeChat waits 5 s at most; so
    // does wxgate, and then refuses the push rather than leave WeChat hanging.
    pg.signal_all("STOP");
    let started = Instant::now();
    let got = ask_within(&node, "/a", 1_000_000, Duration::from_secs(6)).await;
    let took = started.elapsed();
    pg.signal_all("CONT");
    assert_eq!(got, Err("503".to_owned()), "a push to a frozen database");
    assert!(took < Duration::from_millis(4900), "answered after {took:?}");
    until_answer(&node, "/a", Ok("stored")).await;
    let logs = node.logs_with("the store commits again").await;
    assert_eq!(logs.iter().filter(|l| l.contains("has not committed")).count(), 1, "{logs:#?}");
}
