//! Publishing pushes to NATS JetStream, through the simulator: every push lands in the
//! stream once (retries, a second node and the outbox notwithstanding), with its subject,
//! `Nats-Msg-Id` and the forward JSON; before the reply the answer waits for the ack, and
//! without NATS the delivery is refused and the publish queued; in the background NATS
//! may be away, and the outbox publishes once it is back.
//!
//! The shared server (`Service::Nats`) gets a stream and subject prefix of its own per
//! test, deleted at the end. The outage tests start a private `nats-server` on a spare
//! loopback port, and stop and restart it by its process id.

use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde_json::Value;
use wxgate::sim::delivery::{Rules, deliver};
use wxgate::sim::{Http, Mode, Seen, compose};

use crate::helpers::{AES_KEY, APP_ID, GH, Server, TOKEN, wechat};
use crate::services::{self, Service};

const ALICE: &str = "oNatsAlice000000000000000001";
const BOB: &str = "oNatsBob00000000000000000001";

/// A stream of this test's own on a NATS server, deleted when the test ends.
pub struct TestStream {
    url: String,
    pub name: String,
    pub prefix: String,
    js: Option<jetstream::Context>,
}

impl TestStream {
    pub async fn new(url: &str) -> TestStream {
        let mut stream = TestStream::new_offline(url);
        stream.connect().await;
        stream
    }

    /// Names for a server that is not running yet; [`TestStream::connect`] once it is.
    fn new_offline(url: &str) -> TestStream {
        TestStream {
            url: url.to_owned(),
            name: services::unique("WXT"),
            prefix: services::unique("wxt"),
            js: None,
        }
    }

    async fn connect(&mut self) {
        let client = async_nats::connect(self.url.as_str()).await.expect("connect to NATS");
        self.js = Some(jetstream::new(client));
    }

    fn js(&self) -> &jetstream::Context {
        self.js.as_ref().expect("connected")
    }

    /// Messages in the stream (0 while it does not exist).
    async fn count(&self) -> u64 {
        match self.js().get_stream(&self.name).await {
            Ok(s) => s.cached_info().state.messages,
            Err(_) => 0,
        }
    }

    async fn config(&self) -> stream::Config {
        self.js().get_stream(&self.name).await.unwrap().cached_info().config.clone()
    }

    /// Every message, read by a consumer from the start.
    pub async fn messages(&self) -> Vec<Published> {
        let stream = self.js().get_stream(&self.name).await.unwrap();
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = consumer.fetch().max_messages(1000).messages().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            out.push(Published {
                subject: m.subject.to_string(),
                msg_id: id,
                payload: serde_json::from_slice(&m.payload).unwrap(),
            });
        }
        out
    }

    /// A config that publishes to this stream: account `test` on `/wx`, text messages
    /// answered by a rule, a fast outbox that does not give up.
    fn config_text(&self, url: &str, account: &str, top: &str) -> String {
        format!(
            "{top}\n[outbox]\npoll_ms = 20\nbackoff_ms = 50\nbackoff_max_ms = 200\nmax_attempts = 1000\n\
             [nats]\nurl = \"{url}\"\nstream = \"{stream}\"\nsubject_prefix = \"{prefix}\"\n\
             max_age_days = 0.5\nduplicate_window_secs = 30\n\
             [[accounts]]\nname = \"test\"\npath = \"/wx\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
             encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\nreply_budget_ms = 1500\n{account}\n\
             [[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ text = \"you said {{content}}\" }}\n",
            stream = self.name,
            prefix = self.prefix,
        )
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        if self.js.is_none() {
            return;
        }
        // Drop cannot wait on the test's runtime: delete from a thread of its own.
        let (url, name) = (self.url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let connect = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(1))
                    .connect(url.as_str());
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), connect).await
                {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        jetstream::new(client).delete_stream(&name),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

/// A message as a consumer reads it.
#[derive(Debug)]
pub struct Published {
    pub subject: String,
    pub msg_id: String,
    pub payload: Value,
}

/// A `nats-server -js` of this test's own on a spare loopback port; stopped on drop.
struct PrivateNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Largest message the server takes, when not its default.
    max_payload: Option<usize>,
}

impl PrivateNats {
    /// A spare port and store folder; the server is not started yet. `None` (the test
    /// skips) without a `nats-server` binary, except under CI.
    fn prepare() -> Option<PrivateNats> {
        let found = Command::new("nats-server").arg("--version").output().is_ok();
        if !found {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "nats-server is not installed; CI must have it"
            );
            eprintln!("skipped: nats-server is not installed");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Some(PrivateNats {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            max_payload: None,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it takes connections.
    fn start(&mut self) {
        let mut command = Command::new("nats-server");
        if let Some(max) = self.max_payload {
            let file = self.dir.path().join("server.conf");
            std::fs::write(&file, format!("max_payload: {max}\n")).unwrap();
            command.arg("-c").arg(file);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        services::wait_for_port(self.port, "nats-server");
    }

    /// Stops the server (by its process id).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Log lines seen so far, kept across calls.
fn log_lines(server: &Server, seen: &mut Vec<String>) -> usize {
    seen.extend(server.logs());
    seen.len()
}

fn count_lines(seen: &[String], needle: &str) -> usize {
    seen.iter().filter(|l| l.contains(needle)).count()
}

fn outbox(dir: &Path, state: &str) -> Vec<wxgate::store::OutboxRow> {
    wxgate::store::outbox_list(&dir.join("data").as_path().into(), Some(state)).unwrap()
}

/// The JSON a forward would carry for a recorded push, as the stream must hold it.
fn forward_json(record: &Value) -> Value {
    let xml = record["xml"].as_str().unwrap();
    let push = wxgate_protocol::Push::parse(xml).unwrap();
    let key = record["dedup_key"].as_str().unwrap();
    serde_json::from_str(&wxgate::forward::payload("test", key, &push, xml, None)).unwrap()
}

fn pushes() -> Vec<String> {
    vec![
        compose::text(GH, ALICE, 1_733_400_000, "first", 7_100_000_000_000_000_001),
        compose::text(GH, ALICE, 1_733_400_001, "second", 7_100_000_000_000_000_002),
        compose::text(GH, BOB, 1_733_400_002, "hello", 7_100_000_000_000_000_003),
        compose::event(GH, BOB, 1_733_400_003, "subscribe", &[("EventKey", "qrscene_poster")]),
        compose::event(
            GH,
            ALICE,
            1_733_400_004,
            "LOCATION",
            &[("Latitude", "23.137466"), ("Longitude", "113.352425"), ("Precision", "119.385040")],
        ),
        compose::event(GH, BOB, 1_733_400_005, "CLICK", &[("EventKey", "MENU_A")]),
    ]
}

async fn answered(server: &Server, push: &str) {
    let report = deliver(&wechat(), &server.url("/wx"), push, Mode::Safe, Rules::default()).await;
    assert!(!matches!(report.seen, Seen::ServiceError(_)), "{:?}", report.attempts);
    assert_eq!(report.attempts.len(), 1, "answered on the first delivery");
}

/// One delivery of `push`; its HTTP status.
async fn status_of(server: &Server, push: &str) -> u16 {
    let d = wechat().deliver(push, Mode::Safe);
    Http::new(Duration::from_secs(5)).post(&server.url("/wx"), &d).await.unwrap().status
}

/// Checks that the stream holds exactly one message per record, as documented.
async fn assert_one_message_per_record(stream: &TestStream, records: &[Value]) {
    let messages = stream.messages().await;
    assert_eq!(messages.len(), records.len(), "{messages:#?}");
    for record in records {
        let key = record["dedup_key"].as_str().unwrap();
        let id = format!("test:{key}");
        let found: Vec<_> = messages.iter().filter(|m| m.msg_id == id).collect();
        assert_eq!(found.len(), 1, "one message with Nats-Msg-Id {id}");
        let m = found[0];
        assert_eq!(
            m.subject,
            format!("{}.test.{}", stream.prefix, record["kind"].as_str().unwrap())
        );
        assert_eq!(m.payload, forward_json(record), "the forward JSON, as documented");
        assert!(m.payload["reply_deadline_unix_ms"].is_null());
    }
}

#[tokio::test]
async fn background_publishes_put_every_push_in_the_stream_once() {
    if !services::require(Service::Nats) {
        return;
    }
    let url = Service::Nats.url();
    let stream = TestStream::new(&url).await;
    let server = Server::start(&stream.config_text(&url, "", ""));

    // Every push answered at once, every other one delivered again as WeChat does, and
    // one delivered three times at the same moment.
    let pushes = pushes();
    for (i, push) in pushes.iter().enumerate() {
        answered(&server, push).await;
        if i % 2 == 0 {
            answered(&server, push).await;
        }
    }
    let url_wx = server.url("/wx");
    let together: Vec<_> = (0..3)
        .map(|_| {
            let (push, url) = (pushes[1].clone(), url_wx.clone());
            tokio::spawn(async move {
                let d = wechat().deliver(&push, Mode::Safe);
                Http::new(Duration::from_secs(5)).post(&url, &d).await.unwrap().status
            })
        })
        .collect();
    for t in together {
        assert_eq!(t.await.unwrap(), 200);
    }

    until("every push in the stream", Duration::from_secs(10), || async {
        stream.count().await >= pushes.len() as u64
    })
    .await;
    until("every publish delivered", Duration::from_secs(10), || async {
        outbox(server.dir.path(), "delivered").len() == pushes.len()
    })
    .await;
    // Time for any second publish to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = server.records();
    assert_eq!(records.len(), pushes.len());
    assert_one_message_per_record(&stream, &records).await;
    for row in outbox(server.dir.path(), "delivered") {
        assert!(row.url.starts_with(&format!("nats:{}.test.", stream.prefix)), "{}", row.url);
    }

    // The stream as configured.
    let c = stream.config().await;
    assert_eq!(c.subjects, [format!("{}.>", stream.prefix)]);
    assert_eq!(c.storage, stream::StorageType::File);
    assert_eq!(c.retention, stream::RetentionPolicy::Limits);
    assert_eq!(c.max_age, Duration::from_secs(43_200));
    assert_eq!(c.duplicate_window, Duration::from_secs(30));
    let mut logs = server.startup.clone();
    log_lines(&server, &mut logs);
    assert_eq!(count_lines(&logs, "NATS stream created"), 1, "{logs:#?}");
    assert_eq!(count_lines(&logs, "not reachable"), 0);
}

#[tokio::test]
async fn a_push_published_by_two_nodes_and_again_before_the_reply_stays_once_in_the_stream() {
    if !services::require(Service::Nats) {
        return;
    }
    let url = Service::Nats.url();
    let stream = TestStream::new(&url).await;
    let a = Server::start(&stream.config_text(&url, "", ""));
    until("node A created the stream", Duration::from_secs(10), || async {
        stream.js().get_stream(&stream.name).await.is_ok()
    })
    .await;
    // Node B publishes before its replies, and shows its counters.
    let b = Server::start(&stream.config_text(
        &url,
        "publish = \"before_reply\"",
        "metrics_listen = \"127.0.0.1:0\"",
    ));

    // Three pushes reach A first, then B (as a load balancer might send WeChat's retries);
    // a fourth reaches B first.
    let pushes = pushes();
    for push in &pushes[..3] {
        answered(&a, push).await;
    }
    until("A published three", Duration::from_secs(10), || async {
        outbox(a.dir.path(), "delivered").len() == 3
    })
    .await;
    for push in &pushes[..4] {
        answered(&b, push).await;
    }
    answered(&a, &pushes[3]).await;
    until("A published four", Duration::from_secs(10), || async {
        outbox(a.dir.path(), "delivered").len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(stream.count().await, 4, "each push once, whichever node published it");
    assert_one_message_per_record(&stream, &b.records()).await;
    assert!(outbox(b.dir.path(), "pending").is_empty(), "before the reply, nothing is queued");

    let mut logs = b.startup.clone();
    log_lines(&b, &mut logs);
    assert_eq!(count_lines(&logs, "NATS stream found; used as it is"), 1, "{logs:#?}");
    assert_eq!(count_lines(&logs, "NATS stream created"), 0);
    let metrics = b
        .startup
        .iter()
        .find_map(|l| l.split("metrics on ").nth(1))
        .expect("metrics address logged")
        .trim()
        .to_owned();
    let body = Http::new(Duration::from_secs(2)).send("GET", &metrics, None).await.unwrap().body;
    let count = |outcome: &str| {
        body.lines()
            .filter_map(wxgate::metrics::parse_sample)
            .find(|(n, l, _)| {
                *n == "wxgate_nats_publishes_total"
                    && l.contains(&("via", "before_reply"))
                    && l.contains(&("outcome", outcome))
            })
            .map_or(0.0, |s| s.2)
    };
    assert_eq!((count("duplicate"), count("published")), (3.0, 1.0), "{body}");
}

#[tokio::test]
async fn before_the_reply_the_push_is_in_the_stream_and_without_nats_the_delivery_gets_503() {
    if !services::require(Service::Nats) {
        return;
    }
    let url = Service::Nats.url();
    let stream = TestStream::new(&url).await;
    let server = Server::start(&stream.config_text(&url, "publish = \"before_reply\"", ""));
    for (i, push) in pushes()[..3].iter().enumerate() {
        answered(&server, push).await;
        // The answer came after JetStream's ack: the message is there already.
        assert_eq!(stream.count().await, i as u64 + 1);
    }
    assert_one_message_per_record(&stream, &server.records()).await;
    assert!(outbox(server.dir.path(), "pending").is_empty());
    assert!(outbox(server.dir.path(), "delivered").is_empty());

    // NATS unreachable: refused with 503 at once, recorded, and the publish queued.
    let cfg = stream.config_text(
        &format!("nats://127.0.0.1:{}", closed_port()),
        "publish = \"before_reply\"",
        "",
    );
    let down = Server::start(&cfg);
    let push = compose::text(GH, ALICE, 1_733_400_100, "nobody home", 7_100_000_000_000_000_100);
    let started = Instant::now();
    assert_eq!(status_of(&down, &push).await, 503);
    assert!(started.elapsed() < Duration::from_millis(1500), "not held to the budget");
    let records = down.records();
    assert_eq!(records.len(), 1, "recorded before the refusal");
    assert_eq!(records[0]["kind"], "text_message");
    let queued = outbox(down.dir.path(), "pending");
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].url, format!("nats:{}.test.text_message", stream.prefix));
    assert_eq!(queued[0].dedup_key, records[0]["dedup_key"].as_str().unwrap());

    // WeChat delivers again: refused again, still one record and one queued publish.
    assert_eq!(status_of(&down, &push).await, 503);
    assert_eq!(down.records().len(), 1);
    assert_eq!(down.records()[0]["deliveries"], 2);
    assert_eq!(outbox(down.dir.path(), "pending").len(), 1);
    let mut logs = down.startup.clone();
    until("the start-up warning", Duration::from_secs(5), || {
        log_lines(&down, &mut logs);
        let n = count_lines(&logs, "NATS is not reachable");
        async move { n == 1 }
    })
    .await;
    // The outage is logged once (above), not once per refused delivery.
    assert_eq!(count_lines(&logs, "publish before the reply failed"), 0, "{logs:#?}");
    assert!(!logs.iter().any(|l| l.contains("nobody home")), "no message bodies in the log");
}

#[tokio::test]
async fn without_nats_pushes_are_answered_and_published_once_it_is_back() {
    let Some(mut nats) = PrivateNats::prepare() else { return };
    let mut stream = TestStream::new_offline(&nats.url());
    let server = Server::start(&stream.config_text(&nats.url(), "", ""));
    let mut logs = server.startup.clone();

    let pushes = pushes();
    for push in &pushes[..4] {
        answered(&server, push).await;
    }
    assert_eq!(server.records().len(), 4);
    until("the publishes wait in the outbox", Duration::from_secs(5), || {
        let waiting = outbox(server.dir.path(), "pending");
        // Each follower's oldest is tried; the others wait behind it, in order. Waiting
        // for NATS counts no attempt.
        async move {
            waiting.len() == 4
                && waiting.iter().filter(|e| e.last_error.is_some()).count() == 2
                && waiting.iter().all(|e| e.attempts == 0)
        }
    })
    .await;
    until("one warning", Duration::from_secs(5), || {
        log_lines(&server, &mut logs);
        let n = count_lines(&logs, "NATS is not reachable");
        async move { n == 1 }
    })
    .await;

    // NATS comes: the stream is created and the waiting publishes go out.
    nats.start();
    stream.connect().await;
    until("published after NATS came", Duration::from_secs(15), || async {
        stream.count().await == 4
    })
    .await;
    until("the outbox is done", Duration::from_secs(5), || async {
        outbox(server.dir.path(), "delivered").len() == 4
    })
    .await;

    // NATS goes away again, and comes back with its store.
    nats.stop();
    for push in &pushes[4..] {
        answered(&server, push).await;
    }
    nats.start();
    stream.connect().await;
    until("published after NATS came back", Duration::from_secs(15), || async {
        stream.count().await == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_one_message_per_record(&stream, &server.records()).await;

    log_lines(&server, &mut logs);
    assert_eq!(count_lines(&logs, "NATS is not reachable"), 1, "{logs:#?}");
    assert_eq!(count_lines(&logs, "NATS stream created"), 1);
    assert_eq!(count_lines(&logs, "NATS connection lost"), 1);
    assert_eq!(count_lines(&logs, "NATS reachable again"), 2);
    assert_eq!(count_lines(&logs, "background delivery failed"), 0, "waiting is not failing");
}

#[tokio::test]
async fn before_the_reply_a_retry_once_nats_is_back_publishes_once_and_gets_the_reply() {
    let Some(mut nats) = PrivateNats::prepare() else { return };
    let mut stream = TestStream::new_offline(&nats.url());
    let server = Server::start(&stream.config_text(&nats.url(), "publish = \"before_reply\"", ""));
    let push = compose::text(GH, BOB, 1_733_400_200, "later", 7_100_000_000_000_000_200);
    assert_eq!(status_of(&server, &push).await, 503);
    assert_eq!(outbox(server.dir.path(), "pending").len(), 1);

    nats.start();
    stream.connect().await;
    // WeChat's next delivery, once the server is connected again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let d = wechat().deliver(&push, Mode::Safe);
        let a = Http::new(Duration::from_secs(5)).post(&server.url("/wx"), &d).await.unwrap();
        if a.status == 200 {
            break a;
        }
        assert!(Instant::now() < deadline, "still refused: {}", a.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(wechat().judge(&push, Mode::Safe, 200, &answer.body).text(), Some("you said later"));
    until("the queued publish went too", Duration::from_secs(10), || async {
        outbox(server.dir.path(), "delivered").len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stream.count().await, 1, "published twice, in the stream once");
    assert_one_message_per_record(&stream, &server.records()).await;
}

#[tokio::test]
async fn a_push_too_large_for_nats_is_answered_parked_and_holds_up_nothing() {
    let Some(mut nats) = PrivateNats::prepare() else { return };
    nats.max_payload = Some(4096);
    nats.start();
    let stream = TestStream::new(&nats.url()).await;
    for mode in ["background", "before_reply"] {
        let server =
            Server::start(&stream.config_text(&nats.url(), &format!("publish = \"{mode}\""), ""));
        let n = if mode == "background" { 0 } else { 10 };
        let big = compose::text(GH, ALICE, 1_733_410_000 + n, &"x".repeat(6000), 7_200_000 + n);
        let small = compose::text(GH, ALICE, 1_733_410_001 + n, "small", 7_200_001 + n);
        // Answered: no retry could ever publish it.
        answered(&server, &big).await;
        answered(&server, &small).await;
        until("the big one parked, the small one published", Duration::from_secs(10), || {
            let dead = outbox(server.dir.path(), "dead");
            let delivered =
                outbox(server.dir.path(), "delivered").len() + usize::from(mode == "before_reply");
            async move { dead.len() == 1 && delivered >= 1 }
        })
        .await;
        let dead = &outbox(server.dir.path(), "dead")[0];
        assert!(
            dead.last_error.as_deref().unwrap_or_default().contains("NATS takes at most"),
            "{dead:?}"
        );
    }
    let subjects: Vec<String> = stream.messages().await.into_iter().map(|m| m.subject).collect();
    assert_eq!(subjects.len(), 2, "the two small pushes: {subjects:?}");
}
