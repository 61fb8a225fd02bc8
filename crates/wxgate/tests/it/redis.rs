//! The access token shared by every node through Redis: two `wxgate serve` processes
//! with one Redis and one mock WeChat API send late replies as customer-service messages.
//! Concurrent late replies on both nodes take one token from the endpoint; a token
//! refused on both nodes is replaced once, for both; without Redis the replies still go,
//! and a Redis that comes back is used again.
//!
//! Every test has an app id of its own, so its Redis keys never meet another test's;
//! they are deleted at the end.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use serde_json::{Value, json};
use wxgate::sim::api::{Call, Fault, MockApi, Options};
use wxgate::sim::delivery::{Rules, deliver};
use wxgate::sim::{Mode, Seen, compose};

use crate::helpers::{AES_KEY, GH, Server, TOKEN, eventually};
use crate::services::{self, Service};

const SECRET: &str = "simsecret0000000000000000000000";

/// One test's WeChat: an app id of its own, the mock API and a slow owner's service, so
/// that every text message's reply is late.
struct World {
    app_id: String,
    api: MockApi,
    api_base: String,
    hook: String,
}

impl World {
    async fn start() -> World {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let app_id = format!("wx{}", hex::encode(r));

        let api = MockApi::new(Options { app_id: app_id.clone(), ..Options::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_base = format!("http://{}", listener.local_addr().unwrap());
        let router = api.router();
        tokio::spawn(async move { axum::serve(listener, router).await });

        // The owner's service answers after 300 ms, well after the 100 ms budget.
        let service = Router::new().route(
            "/hook",
            post(|body: Bytes| async move {
                let push: Value = serde_json::from_slice(&body).unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                json!({"text": format!("late: {}", push["fields"]["Content"].as_str().unwrap_or(""))})
                    .to_string()
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, service).await });
        World { app_id, api, api_base, hook }
    }

    fn config(&self, redis: &str) -> String {
        format!(
            "redis = \"{redis}\"\n\
             [[accounts]]\nname = \"test\"\npath = \"/wx\"\napp_id = \"{app}\"\ntoken = \"{TOKEN}\"\n\
             encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\nforward_secret = \"hook-secret\"\n\
             reply_budget_ms = 100\napp_secret = \"{SECRET}\"\napi_base = \"{base}\"\nlate_reply = \"customer_service\"\n\
             [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ forward = \"{hook}\" }}\n",
            app = self.app_id,
            base = self.api_base,
            hook = self.hook,
        )
    }

    /// WeChat's side of this test's account.
    fn wechat(&self) -> wxgate::sim::Account {
        wxgate::sim::Account {
            token: TOKEN.into(),
            app_id: self.app_id.clone(),
            aes_key: Some(wxgate_protocol::EncodingAesKey::parse(AES_KEY).unwrap()),
            original_id: GH.into(),
        }
    }

    /// A follower who wrote to the account, so that messages may be sent to them.
    fn follower(&self, n: u32) -> String {
        let openid = format!("oRedisFollower{n:014}");
        self.api.interaction(&openid);
        openid
    }

    fn calls(&self, path: &str) -> Vec<Call> {
        self.api.calls().into_iter().filter(|c| c.path == path).collect()
    }

    fn token_calls(&self) -> Vec<Call> {
        self.calls("/cgi-bin/stable_token")
    }

    /// Customer-service messages WeChat accepted.
    fn sent(&self) -> Vec<Call> {
        self.calls("/cgi-bin/message/custom/send")
            .into_iter()
            .filter(|c| c.response["errcode"] == 0)
            .collect()
    }

    fn key(&self) -> String {
        format!("wxgate:token:{}", self.app_id)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let key = self.key();
        let lock = format!("{key}:lock");
        if let Ok(mut c) = redis::Client::open(Service::Redis.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&key).arg(&lock).query(&mut c);
        }
    }
}

/// Pushes a text message to a node; its reply is late, so WeChat sees nothing.
async fn late_reply(world: &World, server: &Server, from: &str, n: u64) {
    let push = compose::text(GH, from, 1_733_500_000 + n, &format!("q{n}"), 7_200_000_000 + n);
    let report =
        deliver(&world.wechat(), &server.url("/wx"), &push, Mode::Safe, Rules::default()).await;
    assert_eq!(report.seen, Seen::Nothing, "answered success at the budget: {:?}", report.attempts);
}

fn token_of(call: &Call) -> String {
    call.query.split('&').find_map(|kv| kv.strip_prefix("access_token=")).unwrap().to_owned()
}

async fn shared_token(world: &World) -> Option<(String, i64)> {
    let client = redis::Client::open(Service::Redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let (value, pttl): (Option<String>, i64) =
        redis::pipe().get(world.key()).pttl(world.key()).query_async(&mut c).await.unwrap();
    value.map(|v| (v, pttl))
}

fn count_lines(server: &Server, seen: &mut Vec<String>, needle: &str) -> usize {
    seen.extend(server.logs());
    seen.iter().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn concurrent_late_replies_on_two_nodes_take_one_token_from_wechat() {
    if !services::require(Service::Redis) {
        return;
    }
    let world = World::start().await;
    let a = Server::start(&world.config(&Service::Redis.url()));
    let b = Server::start(&world.config(&Service::Redis.url()));

    // Three late replies on each node, all at once.
    let followers: Vec<String> = (0..6).map(|n| world.follower(n)).collect();
    let (world_ref, a_ref, b_ref) = (&world, &a, &b);
    let deliveries = followers.iter().enumerate().map(|(n, from)| async move {
        let node = if n % 2 == 0 { a_ref } else { b_ref };
        late_reply(world_ref, node, from, n as u64).await;
    });
    futures_util::future::join_all(deliveries).await;
    eventually("six late replies sent", || world.sent().len() == 6).await;

    assert_eq!(world.token_calls().len(), 1, "one node fetched, the other waited for it");
    let sent = world.sent();
    let token = token_of(&sent[0]);
    assert!(sent.iter().all(|c| token_of(c) == token), "every send used the shared token");
    let (shared, pttl) = shared_token(&world).await.expect("the token is in Redis");
    assert_eq!(shared, token);
    // WeChat's 7200 s, less the five-minute margin before expiry.
    assert!(pttl > 0 && pttl <= 6_900_000, "{pttl}");
    let mut texts: Vec<String> =
        sent.iter().map(|c| c.body["text"]["content"].as_str().unwrap().to_owned()).collect();
    texts.sort();
    assert_eq!(texts, ["late: q0", "late: q1", "late: q2", "late: q3", "late: q4", "late: q5"]);
}

#[tokio::test]
async fn a_token_refused_on_both_nodes_is_replaced_once_for_both() {
    if !services::require(Service::Redis) {
        return;
    }
    let world = World::start().await;
    let a = Server::start(&world.config(&Service::Redis.url()));
    let b = Server::start(&world.config(&Service::Redis.url()));
    let (alice, bob, carol) = (world.follower(1), world.follower(2), world.follower(3));

    late_reply(&world, &a, &alice, 1).await;
    eventually("the first late reply", || world.sent().len() == 1).await;
    let first = token_of(&world.sent()[0]);

    // WeChat refuses the next two sends as if the token had been replaced elsewhere;
    // they are on different nodes at the same moment.
    world.api.inject(Fault {
        path: "/cgi-bin/message/custom/send".into(),
        errcode: Some(40001),
        latency_ms: 300,
        times: 2,
        hang: false,
    });
    futures_util::future::join(late_reply(&world, &a, &bob, 2), late_reply(&world, &b, &carol, 3))
        .await;
    eventually("both sent after the refusal", || world.sent().len() == 3).await;

    let calls = world.token_calls();
    let forced: Vec<_> = calls.iter().filter(|c| c.body["force_refresh"] == true).collect();
    assert_eq!(forced.len(), 1, "one refresh for both nodes: {calls:#?}");
    // The first fetch, then the refresher's: the same token back, so it forced a new one.
    assert_eq!(calls.len(), 3, "{calls:#?}");
    let new = world.api.current_token().unwrap();
    assert_ne!(new, first);
    let sent = world.sent();
    assert!(sent[1..].iter().all(|c| token_of(c) == new), "both nodes sent with the new token");
    assert_eq!(shared_token(&world).await.unwrap().0, new);

    // And later sends on either node keep using it, without another fetch.
    late_reply(&world, &b, &alice, 4).await;
    eventually("a fourth send", || world.sent().len() == 4).await;
    assert_eq!(token_of(&world.sent()[3]), new);
    assert_eq!(world.token_calls().len(), 3);
}

#[tokio::test]
async fn without_redis_late_replies_still_go_out() {
    let world = World::start().await;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}/");
    let a = Server::start(&world.config(&url));
    let b = Server::start(&world.config(&url));

    for n in 0..4u32 {
        let node = if n % 2 == 0 { &a } else { &b };
        late_reply(&world, node, &world.follower(n), u64::from(n)).await;
        eventually("the late reply is sent", || world.sent().len() == n as usize + 1).await;
    }
    // Each node fell back to its own cache: one fetch each.
    assert_eq!(world.token_calls().len(), 2);
    for node in [&a, &b] {
        let mut logs = node.startup.clone();
        assert_eq!(count_lines(node, &mut logs, "Redis unreachable"), 1, "{logs:#?}");
        assert!(!logs.iter().any(|l| l.contains("SIM_ACCESS_TOKEN")), "no tokens in the log");
    }
}

/// A `redis-server` of this test's own on a spare loopback port; stopped on drop.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        services::wait_for_port(self.port, "redis-server");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn a_redis_that_comes_back_is_used_again() {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "redis-server is not installed; CI must have it"
        );
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let world = World::start().await;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = PrivateRedis { port, child: None };
    let server = Server::start(&world.config(&format!("redis://127.0.0.1:{port}/")));
    let mut logs = server.startup.clone();

    late_reply(&world, &server, &world.follower(1), 1).await;
    eventually("sent without Redis", || world.sent().len() == 1).await;
    assert_eq!(count_lines(&server, &mut logs, "Redis unreachable"), 1);

    redis.start();
    // After a failure the node leaves Redis alone for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    late_reply(&world, &server, &world.follower(2), 2).await;
    eventually("sent with Redis back", || world.sent().len() == 2).await;
    eventually("the recovery line", || {
        count_lines(&server, &mut logs, "Redis reachable again") == 1
    })
    .await;

    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let shared: Option<String> =
        redis::cmd("GET").arg(world.key()).query_async(&mut c).await.unwrap();
    assert_eq!(shared.as_deref(), Some(token_of(&world.sent()[1]).as_str()), "shared again");
    assert_eq!(count_lines(&server, &mut logs, "Redis unreachable"), 1, "{logs:#?}");
}

#[tokio::test]
async fn a_refresh_lock_left_behind_delays_one_late_reply_not_every_one() {
    if !services::require(Service::Redis) {
        return;
    }
    let world = World::start().await;
    // Someone else's lock, with no expiry, and no token: no node will ever share one.
    let client = redis::Client::open(Service::Redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{}:lock", world.key()))
        .arg("someone-else")
        .query_async(&mut c)
        .await
        .unwrap();
    let node = Server::start(&world.config(&Service::Redis.url()));
    let followers: Vec<String> = (0..4).map(|n| world.follower(n)).collect();
    let started = Instant::now();
    let deliveries = followers.iter().enumerate().map(|(n, from)| {
        let (world, node) = (&world, &node);
        async move { late_reply(world, node, from, 100 + n as u64).await }
    });
    futures_util::future::join_all(deliveries).await;
    // The first waits out the lock (12 s); the others use the node's own token at once.
    let deadline = Instant::now() + Duration::from_secs(25);
    while world.sent().len() < 4 {
        assert!(Instant::now() < deadline, "{} of 4 sent", world.sent().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "four late replies took {took:?}");
    assert_eq!(world.token_calls().len(), 1, "one token of the node's own");
    let mut seen = Vec::new();
    assert_eq!(count_lines(&node, &mut seen, "refresh lock was held past"), 1, "{seen:#?}");
}
