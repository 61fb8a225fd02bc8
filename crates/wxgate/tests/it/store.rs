//! One test body for both stores: every behaviour of `wxgate::store` runs against SQLite
//! (a temp folder) and PostgreSQL (a fresh database per test; skipped on a machine
//! without it, a failure under `CI=true`).

use std::time::Duration;

use wxgate::store::{
    self, Attempted, Inserted, Location, NewRecord, OutboxEntry, Status, Store, Update,
};

use crate::services::{self, PgDatabase, Service};

/// A store of each kind; the guards keep their folder or database alive.
struct Backend {
    name: &'static str,
    at: Location,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDatabase>,
}

fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![Backend {
        name: "sqlite",
        at: Location::Sqlite(dir.path().to_owned()),
        _dir: Some(dir),
        _db: None,
    }];
    if services::require(Service::Postgres) {
        let db = PgDatabase::create();
        all.push(Backend {
            name: "postgres",
            at: Location::Postgres(db.url.clone()),
            _dir: None,
            _db: Some(db),
        });
    }
    all
}

fn record(account: &str, key: &str, from: &str, reply: Option<&str>) -> NewRecord {
    NewRecord {
        account: account.into(),
        dedup_key: key.into(),
        kind: "text_message".into(),
        msg_type: Some("text".into()),
        from_user: Some(from.into()),
        to_user: Some("gh_test".into()),
        xml: format!("<xml><Content><![CDATA[{key}]]></Content></xml>"),
        fields: "{}".into(),
        reply: reply.map(str::to_owned),
        received_at_ms: now_ms(),
        encrypted: true,
        ..NewRecord::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Reads in a blocking context, as the CLI does.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test]
async fn a_key_is_recorded_once_with_its_reply_and_deliveries() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        let first = store.insert(record("a", "k1", "o1", Some("<xml>r</xml>"))).await.unwrap();
        assert_eq!(first, Inserted::New, "{}", b.name);
        let again = store.insert(record("a", "k1", "o1", Some("other"))).await.unwrap();
        assert_eq!(
            again,
            Inserted::Existing { reply: Some("<xml>r</xml>".into()), status: Status::Answered },
            "{}",
            b.name
        );
        // The same key in another account is another push.
        assert_eq!(store.insert(record("b", "k1", "o1", None)).await.unwrap(), Inserted::New);
        store.close(Duration::from_secs(5));

        // Reopened, as after a restart (or on another node).
        let store = Store::open(&b.at).unwrap();
        assert!(matches!(
            store.insert(record("a", "k1", "o1", None)).await.unwrap(),
            Inserted::Existing { .. }
        ));
        let at = b.at.clone();
        let rows = blocking(move || store::read_all(at, Some("a")).unwrap()).await;
        assert_eq!(rows.len(), 1, "{}", b.name);
        let row = &rows[0];
        assert_eq!(
            (row.deliveries, row.encrypted, row.dead_letter),
            (3, true, false),
            "{}",
            b.name
        );
        assert_eq!(row.reply.as_deref(), Some("<xml>r</xml>"));
        assert_eq!(row.status, "answered");
        let s = store.clone();
        let recent = blocking(move || s.recent_keys(0, 10).unwrap()).await;
        assert_eq!(recent.len(), 2, "{}", b.name);
        let s = store.clone();
        let standing = blocking(move || s.answer_of("a", "k1").unwrap().unwrap()).await;
        assert_eq!((standing.status, standing.deliveries), (Status::Answered, 3), "{}", b.name);
        let at = b.at.clone();
        let summary = blocking(move || store::summary(&at).unwrap()).await;
        assert_eq!(summary.len(), 2, "{}", b.name);
        assert_eq!((summary[0].records, summary[0].deliveries, summary[0].dead_letters), (1, 3, 0));
    }
}

#[tokio::test]
async fn concurrent_inserts_commit_together_and_count_once() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move {
                    s.insert(record("a", &format!("k{}", i % 100), "o", None)).await.unwrap()
                })
            })
            .collect();
        let mut new = 0;
        for t in tasks {
            if t.await.unwrap() == Inserted::New {
                new += 1;
            }
        }
        assert_eq!(new, 100, "{}", b.name);
        let at = b.at.clone();
        assert_eq!(blocking(move || store::read_all(at, None).unwrap()).await.len(), 100);
        assert!(store.stats().largest_batch > 1, "{}: no group commit", b.name);
    }
}

#[tokio::test]
async fn two_handles_on_one_store_agree_on_every_key() {
    // Two nodes over one database: each key is new on exactly one of them.
    for b in backends().into_iter().filter(|b| b.at.shared()) {
        let (one, two) = (Store::open(&b.at).unwrap(), Store::open(&b.at).unwrap());
        let mut tasks = Vec::new();
        for i in 0..100 {
            for s in [&one, &two] {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    s.insert(record("a", &format!("k{i}"), "o", Some("<xml/>"))).await.unwrap()
                }));
            }
        }
        let mut new = 0;
        for t in tasks {
            if t.await.unwrap() == Inserted::New {
                new += 1;
            }
        }
        assert_eq!(new, 100);
    }
}

#[tokio::test]
async fn answers_change_and_forwards_in_flight_are_found() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        let mut r = record("a", "fwd", "o", None);
        r.status = Status::Forwarding;
        r.received_at_ms = 1_000;
        store.insert(r).await.unwrap();
        let at = b.at.clone();
        let found = blocking(move || store::interrupted_forwards(&at, 2_000).unwrap()).await;
        assert_eq!(found.len(), 1, "{}", b.name);
        assert_eq!((found[0].0.as_str(), found[0].1.as_str()), ("a", "fwd"));
        let at = b.at.clone();
        assert!(blocking(move || store::interrupted_forwards(&at, 500).unwrap()).await.is_empty());

        let update = Update {
            account: "a".into(),
            dedup_key: "fwd".into(),
            reply: Some("<xml>late</xml>".into()),
            status: Status::Late,
            late_result: Some("sent".into()),
        };
        store.update(update).await.unwrap();
        let s = store.clone();
        let standing = blocking(move || s.answer_of("a", "fwd").unwrap().unwrap()).await;
        assert_eq!(standing.status, Status::Late, "{}", b.name);
        let at = b.at.clone();
        let rows = blocking(move || store::read_all(at, None).unwrap()).await;
        assert_eq!(rows[0].late_result.as_deref(), Some("sent"), "{}", b.name);
        let s = store.clone();
        assert!(blocking(move || s.answer_of("a", "nothing").unwrap()).await.is_none());
    }
}

#[tokio::test]
async fn the_outbox_keeps_order_retries_parks_and_redrives() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        for (key, from) in [("1", "alice"), ("2", "alice"), ("3", "bob")] {
            let mut r = record("a", key, from, None);
            r.outbox =
                vec![OutboxEntry { url: "http://127.0.0.1:9/h".into(), payload: key.into() }];
            store.insert(r).await.unwrap();
        }
        let due = |s: &Store| {
            let s = s.clone();
            blocking(move || s.due(now_ms() + 1, 10).unwrap())
        };
        // One entry per follower at a time: alice's first, and bob's.
        let first = due(&store).await;
        let keys: Vec<_> = first.iter().map(|d| d.dedup_key.as_str()).collect();
        assert_eq!(keys.len(), 2, "{}: {keys:?}", b.name);
        assert!(keys.contains(&"1") && keys.contains(&"3"), "{}: {keys:?}", b.name);
        let alice = first.iter().find(|d| d.dedup_key == "1").unwrap().id;
        store
            .attempted(
                alice,
                Attempted::Failed {
                    error: "refused".into(),
                    next_at_ms: now_ms() + 60_000,
                    dead: false,
                },
            )
            .await
            .unwrap();
        // Alice's first is waiting: her second must wait too.
        let keys: Vec<_> = due(&store).await.into_iter().map(|d| d.dedup_key).collect();
        assert_eq!(keys, ["3"], "{}", b.name);
        store
            .attempted(
                alice,
                Attempted::Failed { error: "refused".into(), next_at_ms: 0, dead: true },
            )
            .await
            .unwrap();
        let at = b.at.clone();
        let dead = blocking(move || store::outbox_list(&at, Some("dead")).unwrap()).await;
        assert_eq!(dead.len(), 1, "{}", b.name);
        assert_eq!((dead[0].attempts, dead[0].last_error.as_deref()), (2, Some("refused")));
        let at = b.at.clone();
        let (pending, dead_n, _) =
            blocking(move || store::outbox_depth(&at, now_ms()).unwrap()).await;
        assert_eq!((pending, dead_n), (2, 1), "{}", b.name);
        assert_eq!(store.redrive(None).await.unwrap(), 1, "{}", b.name);
        store.attempted(alice, Attempted::Delivered).await.unwrap();
        let keys: Vec<_> = due(&store).await.into_iter().map(|d| d.dedup_key).collect();
        assert!(keys.contains(&"2".to_owned()), "{}: {keys:?}", b.name);
        // Waiting for a destination that is away is no attempt.
        let bob = due(&store).await.into_iter().find(|d| d.dedup_key == "3").unwrap();
        store
            .attempted(bob.id, Attempted::Deferred { reason: "away".into(), next_at_ms: 0 })
            .await
            .unwrap();
        let bob = due(&store).await.into_iter().find(|d| d.dedup_key == "3").unwrap();
        assert_eq!(bob.attempts, 0, "{}", b.name);
        // A queued delivery of a recorded push.
        store
            .enqueue(
                "a",
                "3",
                "bob",
                OutboxEntry { url: "http://127.0.0.1:9/other".into(), payload: "p".into() },
            )
            .await
            .unwrap();
        let at = b.at.clone();
        assert_eq!(blocking(move || store::outbox_list(&at, None).unwrap()).await.len(), 4);
        // Each destination has its own order: bob's entry for the other URL does not
        // wait for his first.
        let keys: Vec<_> = due(&store).await.into_iter().map(|d| (d.dedup_key, d.url)).collect();
        assert_eq!(keys.iter().filter(|(k, _)| k == "3").count(), 2, "{}: {keys:?}", b.name);
        // A claimed entry is no one else's until its claim ends (another node that took
        // the outbox lease meanwhile does not deliver it again).
        let other = Store::open(&b.at).unwrap();
        let now = now_ms();
        let ids: Vec<i64> = due(&store).await.into_iter().map(|d| d.id).collect();
        let mine = store.claim(ids.clone(), now + 60_000).await.unwrap();
        assert_eq!(mine, ids, "{}", b.name);
        assert!(other.claim(ids.clone(), now + 60_000).await.unwrap().is_empty(), "{}", b.name);
        assert!(due(&other).await.is_empty(), "{}: claimed entries are not due", b.name);
        for id in &ids {
            store
                .attempted(*id, Attempted::Deferred { reason: "test".into(), next_at_ms: 0 })
                .await
                .unwrap();
        }
        // Every NATS subject is one destination: one stream, read in order.
        for (key, subject) in [("c1", "nats:wx.a.text_message"), ("c2", "nats:wx.a.CLICK_event")] {
            let mut r = record("a", key, "carol", None);
            r.outbox = vec![OutboxEntry { url: subject.into(), payload: key.into() }];
            store.insert(r).await.unwrap();
        }
        let carol: Vec<_> = due(&store)
            .await
            .into_iter()
            .filter(|d| d.follower == "carol")
            .map(|d| d.dedup_key)
            .collect();
        assert_eq!(carol, ["c1"], "{}", b.name);
    }
}

#[tokio::test]
async fn purge_and_forget_delete_what_they_should() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        let mut old = record("a", "old", "alice", None);
        old.received_at_ms = 1_000;
        let mut old_location = record("a", "loc", "carol", None);
        old_location.kind = "LOCATION_event".into();
        old_location.received_at_ms = 1_000;
        for r in
            [old, old_location, record("a", "new", "alice", None), record("a", "bob1", "bob", None)]
        {
            store.insert(r).await.unwrap();
        }
        for i in 0..5 {
            let mut r = record("a", &format!("older{i}"), "dave", None);
            r.received_at_ms = 1_000;
            store.insert(r).await.unwrap();
        }
        // LOCATION has its own cutoff (not reached); the rest goes if older than 2000,
        // in slices of at most `limit` per call.
        let cutoffs = vec![(Some("LOCATION_event".to_owned()), 500), (None, 2_000)];
        let mut slices = Vec::new();
        loop {
            let n = store.purge(cutoffs.clone(), 2).await.unwrap();
            slices.push(n);
            if n < 2 {
                break;
            }
        }
        assert_eq!(slices, [2, 2, 2, 0], "{}", b.name);
        assert_eq!(store.forget("a", "alice", None).await.unwrap(), 1, "{}", b.name);
        let at = b.at.clone();
        let keys: Vec<_> = blocking(move || store::read_all(at, None).unwrap())
            .await
            .into_iter()
            .map(|r| r.dedup_key)
            .collect();
        assert_eq!(keys, ["loc", "bob1"], "{}", b.name);
    }
}

#[tokio::test]
async fn one_holder_of_a_lease_at_a_time() {
    for b in backends() {
        let (one, two) = (Store::open(&b.at).unwrap(), Store::open(&b.at).unwrap());
        let now = now_ms();
        assert!(one.lease("outbox", "n1", now + 60_000).await.unwrap(), "{}", b.name);
        assert!(!two.lease("outbox", "n2", now + 60_000).await.unwrap(), "{}", b.name);
        assert!(one.lease("outbox", "n1", now + 90_000).await.unwrap(), "{}: renew", b.name);
        assert!(two.lease("sweep", "n2", now + 60_000).await.unwrap(), "{}: another name", b.name);
        // An expired lease goes to whoever asks.
        assert!(one.lease("short", "n1", now - 1).await.unwrap());
        assert!(two.lease("short", "n2", now + 60_000).await.unwrap(), "{}", b.name);
        // A node that stops cleanly gives its leases up: the next node to ask has them.
        one.release_leases("n1").await;
        assert!(two.lease("outbox", "n2", now + 60_000).await.unwrap(), "{}: released", b.name);
        assert!(!one.lease("outbox", "n1", now + 60_000).await.unwrap(), "{}", b.name);
    }
}

#[tokio::test]
async fn a_postgres_store_that_goes_away_fails_writes_and_recovers() {
    // The server stays up; this node's connection is cut (as by a restart of the
    // server), so the next write fails, and the one after reconnects.
    if !services::require(Service::Postgres) {
        return;
    }
    let db = PgDatabase::create();
    let store = Store::open(Location::Postgres(db.url.clone())).unwrap();
    store.insert(record("a", "before", "o", None)).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    services::admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'wxgate' AND datname = '{name}'"
    ));
    let cut = store.insert(record("a", "during", "o", None)).await;
    assert!(cut.is_err(), "a write on a cut connection must fail, got {cut:?}");
    assert!(!store.healthy());
    assert_eq!(store.insert(record("a", "after", "o", None)).await.unwrap(), Inserted::New);
    assert!(store.healthy());
    let at = Location::Postgres(db.url.clone());
    let keys: Vec<_> = blocking(move || store::read_all(at, None).unwrap())
        .await
        .into_iter()
        .map(|r| r.dedup_key)
        .collect();
    assert_eq!(keys, ["before", "after"]);
}

#[tokio::test]
async fn a_record_the_database_refuses_fails_alone_and_nul_is_kept() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        // NUL inside CDATA is XML the reader keeps; PostgreSQL's text cannot hold it.
        let mut nul = record("a", "nul\0key", "o\0", Some("<xml>a\0b</xml>"));
        nul.xml = "<xml><Content><![CDATA[a\0b]]></Content></xml>".into();
        assert_eq!(store.insert(nul.clone()).await.unwrap(), Inserted::New, "{}", b.name);
        assert!(
            matches!(store.insert(nul).await.unwrap(), Inserted::Existing { .. }),
            "{}",
            b.name
        );

        // A key far beyond what an index entry holds (the protocol never makes one, but
        // the store must not let one record sink its batch): in one batch with others.
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let s = store.clone();
                // Random, so that PostgreSQL cannot compress it under its limit.
                let mut noise = [0u8; 5000];
                getrandom::fill(&mut noise).unwrap();
                let key = if i == 7 { hex::encode(noise) } else { format!("ok{i}") };
                tokio::spawn(async move { (i, s.insert(record("a", &key, "o", None)).await) })
            })
            .collect();
        for t in tasks {
            let (i, result) = t.await.unwrap();
            if i == 7 {
                // PostgreSQL's index refuses it; SQLite has no such limit.
                assert_eq!(result.is_err(), b.name == "postgres", "{}: {result:?}", b.name);
            } else {
                assert_eq!(
                    result.unwrap(),
                    Inserted::New,
                    "{}: push {i} failed with the poison",
                    b.name
                );
            }
        }
        assert!(store.healthy(), "{}", b.name);
        let at = b.at.clone();
        let rows = blocking(move || store::read_all(at, None).unwrap()).await;
        assert!(rows.len() >= 20, "{}: {}", b.name, rows.len());
        assert!(rows[0].xml.starts_with("<xml><Content><![CDATA[a"), "{}", b.name);
    }
}

#[tokio::test]
async fn a_read_only_postgres_is_not_ready() {
    if !services::require(Service::Postgres) {
        return;
    }
    let db = PgDatabase::create();
    let store = Store::open(Location::Postgres(db.url.clone())).unwrap();
    store.probe(Duration::from_secs(5)).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    // As after a failover onto a standby: the database takes reads, refuses writes.
    services::admin(&format!("ALTER DATABASE {name} SET default_transaction_read_only = on"));
    services::admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'wxgate' AND datname = '{name}'"
    ));
    let _ = store.probe(Duration::from_secs(5)).await; // meets the cut connection
    assert!(
        store.probe(Duration::from_secs(5)).await.is_err(),
        "a read-only database is not ready"
    );
    assert!(store.insert(record("a", "ro", "o", None)).await.is_err());
    // Writable again: the node finds out by itself (a refused write drops its session,
    // which kept the read-only default), without anyone cutting its connection.
    services::admin(&format!("ALTER DATABASE {name} SET default_transaction_read_only = off"));
    store.probe(Duration::from_secs(5)).await.unwrap();
    assert_eq!(store.insert(record("a", "rw", "o", None)).await.unwrap(), Inserted::New);
}

#[tokio::test]
async fn a_follower_with_a_huge_openid_is_stored_queued_and_forgotten() {
    for b in backends() {
        let store = Store::open(&b.at).unwrap();
        // Random, so that PostgreSQL cannot compress it under an index entry's limit.
        let mut noise = [0u8; 3000];
        getrandom::fill(&mut noise).unwrap();
        let openid = hex::encode(noise);
        for key in ["h1", "h2"] {
            let mut r = record("a", key, &openid, None);
            r.outbox =
                vec![OutboxEntry { url: "http://127.0.0.1:9/h".into(), payload: key.into() }];
            assert_eq!(store.insert(r).await.unwrap(), Inserted::New, "{}", b.name);
        }
        // Still one follower: one entry due at a time.
        let s = store.clone();
        let due = blocking(move || s.due(now_ms() + 1, 10).unwrap()).await;
        assert_eq!(
            due.iter().map(|d| d.dedup_key.as_str()).collect::<Vec<_>>(),
            ["h1"],
            "{}",
            b.name
        );
        assert_eq!(store.forget("a", &openid, None).await.unwrap(), 2, "{}", b.name);
        let at = b.at.clone();
        assert!(
            blocking(move || store::outbox_list(&at, None).unwrap()).await.is_empty(),
            "{}",
            b.name
        );
    }
}
