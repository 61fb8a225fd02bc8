//! The embedded store: every authentic push, written to SQLite before it is answered.
//!
//! One writer thread owns the connection and commits whatever requests are waiting as one
//! transaction (group commit), so durability costs one fsync per batch, not per push. The
//! database runs in WAL mode with `synchronous = FULL`: a push acknowledged to WeChat has
//! reached the disk. A push is unique per account and dedup key; inserting one that
//! exists changes nothing and returns the reply stored with it, which is how a retry is
//! recognised after a restart or after it left the in-memory window.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;
/// Requests that may wait for the writer before callers wait too.
const QUEUE: usize = 8192;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_pushes.sql"),
    include_str!("../migrations/sqlite/0002_forwarding.sql"),
];

/// A store failure. The push is not acknowledged, so WeChat delivers it again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("store write failed: {0}")]
    Write(String),
    #[error("store writer has stopped")]
    Closed,
    #[error("store read failed: {0}")]
    Read(String),
}

/// A push to record.
#[derive(Debug, Clone, Default)]
pub struct NewRecord {
    pub account: String,
    pub dedup_key: String,
    pub kind: String,
    pub msg_type: Option<String>,
    pub event: Option<String>,
    pub from_user: Option<String>,
    pub to_user: Option<String>,
    pub create_time: Option<String>,
    pub encrypted: bool,
    /// The decrypted push document, verbatim.
    pub xml: String,
    /// JSON object of the fields (see [`crate::fields`]).
    pub fields: String,
    /// The plain reply XML sent, `None` for `success`.
    pub reply: Option<String>,
    pub dead_letter: bool,
    /// Why a dead letter could not be understood.
    pub error: Option<String>,
    pub received_at_ms: i64,
    /// The state of the answer (see [`Status`]).
    pub status: Status,
    /// Background deliveries of the push, queued in the same transaction.
    pub outbox: Vec<OutboxEntry>,
}

/// Where a push's answer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    /// `reply` is final.
    #[default]
    Answered,
    /// Waiting for the owner's service.
    Forwarding,
    /// WeChat got `success`; the reply went later through the customer-service API.
    Late,
    /// The forward failed; a retry may try again.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Answered => "answered",
            Status::Forwarding => "forwarding",
            Status::Late => "late",
            Status::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "forwarding" => Status::Forwarding,
            "late" => Status::Late,
            "failed" => Status::Failed,
            _ => Status::Answered,
        }
    }
}

/// A background delivery to queue with a push.
#[derive(Debug, Clone, Default)]
pub struct OutboxEntry {
    pub url: String,
    pub payload: String,
}

/// What an insert found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Recorded now.
    New,
    /// Recorded before (a retry); its reply and status as stored.
    Existing { reply: Option<String>, status: Status },
}

/// A change to a recorded push's answer.
#[derive(Debug, Clone)]
pub struct Update {
    pub account: String,
    pub dedup_key: String,
    pub reply: Option<String>,
    pub status: Status,
    pub late_result: Option<String>,
}

/// An outbox entry due for delivery.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: i64,
    pub account: String,
    pub dedup_key: String,
    pub follower: String,
    pub url: String,
    pub payload: String,
    pub attempts: i64,
}

/// The result of one outbox delivery attempt.
#[derive(Debug, Clone)]
pub enum Attempted {
    Delivered,
    /// Failed; try again at `next_at_ms`, or park it as dead when `dead`.
    Failed {
        error: String,
        next_at_ms: i64,
        dead: bool,
    },
}

enum Op {
    Insert(Box<NewRecord>, oneshot::Sender<Result<Inserted, StoreError>>),
    Update(Box<Update>, oneshot::Sender<Result<(), StoreError>>),
    Attempted {
        id: i64,
        result: Attempted,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Makes dead (or all failed-and-waiting) entries due again; answers how many.
    Redrive {
        id: Option<i64>,
        done: oneshot::Sender<Result<usize, StoreError>>,
    },
    Retry {
        account: String,
        dedup_key: String,
    },
    /// Answers once a transaction has committed: the store is writable.
    Probe(oneshot::Sender<Result<(), StoreError>>),
    /// Commit what is queued, then stop.
    Close,
    /// Deletes records older than their kind's cutoff; answers how many.
    Purge {
        cutoffs: Vec<(Option<String>, i64)>,
        done: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// Queues a background delivery of a recorded push.
    Enqueue {
        account: String,
        dedup_key: String,
        follower: String,
        entry: OutboxEntry,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Deletes every record of one follower; answers how many.
    Forget {
        account: String,
        openid: String,
        keep: Option<String>,
        done: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What the writer reports back to every handle.
struct Shared {
    /// False from a failed commit until the next successful one.
    healthy: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Mutex<CommitStats>,
}

/// Commit figures since start-up, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    pub commits: u64,
    pub failures: u64,
    pub records: u64,
    pub largest_batch: u64,
    pub total_commit_micros: u64,
}

/// A key recorded recently, for warming the in-memory dedup window at start-up.
pub struct RecentKey {
    pub account: String,
    pub dedup_key: String,
    pub reply: Option<String>,
}

impl Store {
    /// Opens (creating if needed) `DIR/wxgate.db`, migrates it and starts the writer.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("wxgate.db");
        let fail = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let mut conn = Connection::open(&path).map_err(|e| fail(&e))?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(|e| fail(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| fail(&e))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| fail(&e))?;
        migrate(&mut conn).map_err(|e| fail(&e))?;

        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            writer: Mutex::new(None),
            stats: Mutex::default(),
        });
        let for_writer = shared.clone();
        let handle = std::thread::Builder::new()
            .name("wxgate-store".into())
            .spawn(move || writer(conn, rx, &for_writer))
            .map_err(|e| fail(&e))?;
        *shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Store { tx, path, shared })
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Commit figures since start-up.
    pub fn stats(&self) -> CommitStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests waiting for the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Proves the store writable by committing a transaction, within `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Probe(done)).await.map_err(|_| StoreError::Closed)?;
        match tokio::time::timeout(timeout, wait).await {
            Ok(answer) => answer.map_err(|_| StoreError::Closed)?,
            Err(_) => Err(StoreError::Write(format!("no commit within {timeout:?}"))),
        }
    }

    /// Lets the writer commit what is queued, then waits (at most `timeout`) for it to
    /// stop. Later requests fail with [`StoreError::Closed`]. Blocks: call it from a
    /// blocking context.
    pub fn close(self, timeout: Duration) -> bool {
        let shared = self.shared.clone();
        if self.tx.try_send(Op::Close).is_err() {
            let _ = self.tx.blocking_send(Op::Close);
        }
        drop(self);
        let Some(handle) = shared.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.join().is_ok()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder of the database file.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Records a push durably; resolves once its transaction has committed.
    pub async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Insert(Box::new(record), done)).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Changes the answer of a recorded push; resolves once committed.
    pub async fn update(&self, update: Update) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Update(Box::new(update), done)).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a background delivery of an already recorded push (a forward whose answer
    /// came too late to matter, or never: the owner's service still gets the push).
    pub async fn enqueue(
        &self,
        account: &str,
        dedup_key: &str,
        follower: &str,
        entry: OutboxEntry,
    ) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        let op = Op::Enqueue {
            account: account.into(),
            dedup_key: dedup_key.into(),
            follower: follower.into(),
            entry,
            done,
        };
        self.tx.send(op).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Records the result of an outbox delivery attempt.
    pub async fn attempted(&self, id: i64, result: Attempted) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Attempted { id, result, done }).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Makes a dead outbox entry (or, with `None`, every dead one) pending again.
    pub async fn redrive(&self, id: Option<i64>) -> Result<usize, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Redrive { id, done }).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Deletes records received before a cutoff (Unix ms): each `(Some(kind), cutoff)`
    /// for that kind, `(None, cutoff)` for every kind not named. Delivered and dead
    /// outbox entries go with their pushes. Answers how many records went.
    pub async fn purge(&self, cutoffs: Vec<(Option<String>, i64)>) -> Result<usize, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Purge { cutoffs, done }).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Deletes every record and outbox entry of one follower of an account, except the
    /// outbox entry of the push `keep` (the revoke itself, which the owner's service
    /// needs to hear about).
    pub async fn forget(
        &self,
        account: &str,
        openid: &str,
        keep: Option<&str>,
    ) -> Result<usize, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Op::Forget {
                account: account.to_owned(),
                openid: openid.to_owned(),
                keep: keep.map(str::to_owned),
                done,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Outbox entries due now: for each follower only the oldest pending one, so that a
    /// follower's pushes are delivered in order.
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<Due>, StoreError> {
        let conn = open_read(&self.path)?;
        let sql = "SELECT o.id, o.account, o.dedup_key, o.follower, o.url, o.payload, o.attempts FROM outbox o
                 WHERE o.state = 'pending' AND o.next_at <= ?1
                   AND o.id = (SELECT MIN(p.id) FROM outbox p
                               WHERE p.account = o.account AND p.follower = o.follower AND p.state = 'pending')
                 ORDER BY o.next_at, o.id LIMIT ?2";
        select(&conn, sql, params![now_ms, limit as i64], |r| {
            Ok(Due {
                id: r.get(0)?,
                account: r.get(1)?,
                dedup_key: r.get(2)?,
                follower: r.get(3)?,
                url: r.get(4)?,
                payload: r.get(5)?,
                attempts: r.get(6)?,
            })
        })
    }

    /// Counts one more delivery of a recorded push; best effort, nobody waits for it.
    pub fn note_retry(&self, account: &str, dedup_key: &str) {
        let _ = self
            .tx
            .try_send(Op::Retry { account: account.to_owned(), dedup_key: dedup_key.to_owned() });
    }

    /// The keys answered since `since_ms`, newest first, at most `limit`.
    pub fn recent_keys(&self, since_ms: i64, limit: usize) -> Result<Vec<RecentKey>, StoreError> {
        let conn = open_read(&self.path)?;
        // Only final answers: a push whose forward was cut short must be forwarded again.
        // A late reply went as a customer-service message: WeChat's passive
        // answer to that push was `success`, and so is a retry's.
        let sql = "SELECT account, dedup_key, CASE WHEN status = 'late' THEN NULL ELSE reply END FROM pushes
                 WHERE received_at >= ?1 AND status IN ('answered', 'late') ORDER BY id DESC LIMIT ?2";
        select(&conn, sql, params![since_ms, limit as i64], |r| {
            Ok(RecentKey { account: r.get(0)?, dedup_key: r.get(1)?, reply: r.get(2)? })
        })
    }
}

/// Every row of a query, each made by `row`.
fn select<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(read_err)?;
    let rows = stmt.query_map(params, row).map_err(read_err)?;
    rows.collect::<Result<_, _>>().map_err(read_err)
}

fn read_err(e: rusqlite::Error) -> StoreError {
    StoreError::Read(e.to_string())
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The writer thread: take what is waiting, commit it as one transaction, answer each.
/// It stops when every handle is gone, after committing what was queued.
fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Op>, shared: &Shared) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    while !closing {
        let Some(first) = rx.blocking_recv() else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if batch.iter().any(|op| matches!(op, Op::Close)) {
            // Commit everything already queued, refuse anything later, then stop.
            closing = true;
            batch.retain(|op| !matches!(op, Op::Close));
            rx.close();
            while let Ok(op) = rx.try_recv() {
                if !matches!(op, Op::Close) {
                    batch.push(op);
                }
            }
        }
        // One result per op, in order (None for delivery counts, which nobody awaits).
        let mut results = Vec::with_capacity(batch.len());
        let started = Instant::now();
        let outcome = commit(&mut conn, &batch, &mut results);
        note_outcome(shared, &outcome, batch.len(), started.elapsed());
        let mut results = results.into_iter();
        for op in batch.drain(..) {
            let result = results.next().flatten();
            match op {
                Op::Insert(_, done) => {
                    let answer = match (&outcome, result) {
                        (Ok(()), Some(OpResult::Inserted(r))) => Ok(r),
                        (Err(e), _) => Err(e.clone()),
                        (Ok(()), _) => Err(StoreError::Write("insert produced no result".into())),
                    };
                    let _ = done.send(answer);
                }
                Op::Probe(done)
                | Op::Update(_, done)
                | Op::Attempted { done, .. }
                | Op::Enqueue { done, .. } => {
                    let _ = done.send(outcome.clone());
                }
                Op::Redrive { done, .. } | Op::Purge { done, .. } | Op::Forget { done, .. } => {
                    let n = if let Some(OpResult::Count(n)) = result { n } else { 0 };
                    let _ = done.send(outcome.clone().map(|()| n));
                }
                Op::Retry { .. } | Op::Close => {}
            }
        }
    }
}

/// Keeps the figures and logs an outage once: at its first failure and at recovery.
fn note_outcome(shared: &Shared, outcome: &Result<(), StoreError>, batch: usize, took: Duration) {
    {
        let mut s = shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                s.commits += 1;
                s.records += batch as u64;
                s.largest_batch = s.largest_batch.max(batch as u64);
                s.total_commit_micros += took.as_micros() as u64;
            }
            Err(_) => s.failures += 1,
        }
    }
    match outcome {
        Ok(()) if !shared.healthy.swap(true, Ordering::Relaxed) => {
            info!(target: "wxgate::store", "store recovered; pushes are acknowledged again");
        }
        Err(e) if shared.healthy.swap(false, Ordering::Relaxed) => {
            error!(target: "wxgate::store", error = %e, "store cannot write; pushes are refused (503) so that WeChat delivers them again");
        }
        _ => {}
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What one op produced inside a committed batch.
enum OpResult {
    Inserted(Inserted),
    Count(usize),
}

fn commit(
    conn: &mut Connection,
    batch: &[Op],
    results: &mut Vec<Option<OpResult>>,
) -> Result<(), StoreError> {
    let werr = |e: rusqlite::Error| StoreError::Write(e.to_string());
    let tx = conn.transaction().map_err(werr)?;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO pushes (account, dedup_key, kind, msg_type, event, from_user, to_user, create_time,
                    encrypted, xml, fields, reply, dead_letter, error, received_at, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (account, dedup_key) DO NOTHING",
            )
            .map_err(werr)?;
        let mut existing = tx
            .prepare_cached(
                "SELECT reply, status FROM pushes WHERE account = ?1 AND dedup_key = ?2",
            )
            .map_err(werr)?;
        let mut retry = tx
            .prepare_cached("UPDATE pushes SET deliveries = deliveries + 1 WHERE account = ?1 AND dedup_key = ?2")
            .map_err(werr)?;
        for op in batch {
            match op {
                Op::Insert(r, _) => {
                    let changed = insert
                        .execute(params![
                            r.account,
                            r.dedup_key,
                            r.kind,
                            r.msg_type,
                            r.event,
                            r.from_user,
                            r.to_user,
                            r.create_time,
                            r.encrypted,
                            r.xml,
                            r.fields,
                            r.reply,
                            r.dead_letter,
                            r.error,
                            r.received_at_ms,
                            r.status.as_str(),
                        ])
                        .map_err(werr)?;
                    let inserted = if changed == 1 {
                        for o in &r.outbox {
                            tx.prepare_cached(
                                "INSERT INTO outbox (account, dedup_key, follower, url, payload, next_at, created_at)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT DO NOTHING",
                            )
                            .and_then(|mut q| {
                                q.execute(params![r.account, r.dedup_key, r.from_user.as_deref().unwrap_or_default(), o.url, o.payload, r.received_at_ms])
                            })
                            .map_err(werr)?;
                        }
                        Inserted::New
                    } else {
                        let (reply, status): (Option<String>, String) = existing
                            .query_row(params![r.account, r.dedup_key], |row| {
                                Ok((row.get(0)?, row.get(1)?))
                            })
                            .optional()
                            .map_err(werr)?
                            .unwrap_or_default();
                        retry.execute(params![r.account, r.dedup_key]).map_err(werr)?;
                        Inserted::Existing { reply, status: Status::parse(&status) }
                    };
                    results.push(Some(OpResult::Inserted(inserted)));
                }
                Op::Update(u, _) => {
                    tx.prepare_cached(
                        "UPDATE pushes SET reply = ?3, status = ?4, late_result = COALESCE(?5, late_result)
                         WHERE account = ?1 AND dedup_key = ?2",
                    )
                    .and_then(|mut q| q.execute(params![u.account, u.dedup_key, u.reply, u.status.as_str(), u.late_result]))
                    .map_err(werr)?;
                    results.push(None);
                }
                Op::Attempted { id, result, .. } => {
                    match result {
                        Attempted::Delivered => tx
                            .prepare_cached("UPDATE outbox SET state = 'delivered', attempts = attempts + 1, last_error = NULL WHERE id = ?1")
                            .and_then(|mut q| q.execute(params![id])),
                        Attempted::Failed { error, next_at_ms, dead } => tx
                            .prepare_cached(
                                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_at = ?3,
                                    state = CASE WHEN ?4 THEN 'dead' ELSE 'pending' END WHERE id = ?1",
                            )
                            .and_then(|mut q| q.execute(params![id, error, next_at_ms, dead])),
                    }
                    .map_err(werr)?;
                    results.push(None);
                }
                Op::Redrive { id, .. } => {
                    let n = tx
                        .prepare_cached(
                            "UPDATE outbox SET state = 'pending', attempts = 0, next_at = 0
                             WHERE state = 'dead' AND (?1 IS NULL OR id = ?1)",
                        )
                        .and_then(|mut q| q.execute(params![id]))
                        .map_err(werr)?;
                    results.push(Some(OpResult::Count(n)));
                }
                Op::Purge { cutoffs, .. } => {
                    let named: Vec<&str> =
                        cutoffs.iter().filter_map(|(k, _)| k.as_deref()).collect();
                    let mut n = 0;
                    for (kind, cutoff) in cutoffs {
                        n += match kind {
                            Some(kind) => tx
                                .execute(
                                    "DELETE FROM pushes WHERE kind = ?1 AND received_at < ?2",
                                    params![kind, cutoff],
                                )
                                .map_err(werr)?,
                            None => {
                                // Every kind without a cutoff of its own.
                                let list =
                                    serde_json::to_string(&named).unwrap_or_else(|_| "[]".into());
                                tx.execute(
                                    "DELETE FROM pushes WHERE received_at < ?1 AND kind NOT IN (SELECT value FROM json_each(?2))",
                                    params![cutoff, list],
                                )
                                .map_err(werr)?
                            }
                        };
                    }
                    tx.execute(
                        "DELETE FROM outbox WHERE state != 'pending'
                           AND NOT EXISTS (SELECT 1 FROM pushes p WHERE p.account = outbox.account AND p.dedup_key = outbox.dedup_key)",
                        [],
                    )
                    .map_err(werr)?;
                    results.push(Some(OpResult::Count(n)));
                }
                Op::Enqueue { account, dedup_key, follower, entry, .. } => {
                    tx.prepare_cached(
                        "INSERT INTO outbox (account, dedup_key, follower, url, payload, next_at, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT DO NOTHING",
                    )
                    .and_then(|mut q| q.execute(params![account, dedup_key, follower, entry.url, entry.payload, now_ms()]))
                    .map_err(werr)?;
                    results.push(None);
                }
                Op::Forget { account, openid, keep, .. } => {
                    // The revoke event itself stays, as the record of the request.
                    let n = tx
                        .execute(
                            "DELETE FROM pushes WHERE account = ?1 AND from_user = ?2 AND kind != 'user_authorization_event'",
                            params![account, openid],
                        )
                        .map_err(werr)?;
                    tx.execute(
                        "DELETE FROM outbox WHERE account = ?1 AND follower = ?2 AND dedup_key IS NOT ?3",
                        params![account, openid, keep],
                    )
                    .map_err(werr)?;
                    results.push(Some(OpResult::Count(n)));
                }
                Op::Retry { account, dedup_key } => {
                    retry.execute(params![account, dedup_key]).map_err(werr)?;
                    results.push(None);
                }
                Op::Probe(_) | Op::Close => results.push(None),
            }
        }
    }
    tx.commit().map_err(werr)
}

/// A read connection to the store in `dir`, or `None` when nothing was recorded yet.
fn open_existing(dir: &Path) -> Result<Option<Connection>, StoreError> {
    let path = dir.join("wxgate.db");
    if !path.exists() {
        return Ok(None);
    }
    open_read(&path).map(Some)
}

fn open_read(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(read_err)?;
    Ok(conn)
}

/// One recorded push as read back.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub account: String,
    pub dedup_key: String,
    pub kind: String,
    pub encrypted: bool,
    pub xml: String,
    pub fields: String,
    pub reply: Option<String>,
    pub dead_letter: bool,
    pub error: Option<String>,
    pub received_at_ms: i64,
    pub deliveries: i64,
    /// `answered`, `forwarding`, `late` or `failed`.
    pub status: String,
    /// What became of a late reply.
    pub late_result: Option<String>,
}

/// One outbox entry as listed by the CLI.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub account: String,
    pub dedup_key: String,
    pub follower: String,
    pub url: String,
    pub attempts: i64,
    pub state: String,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub next_at_ms: i64,
}

/// Pushes whose forward was in flight when the server stopped: (account, dedup key,
/// decrypted XML).
pub fn interrupted_forwards(dir: &Path) -> Result<Vec<(String, String, String)>, StoreError> {
    let Some(conn) = open_existing(dir)? else { return Ok(Vec::new()) };
    select(
        &conn,
        "SELECT account, dedup_key, xml FROM pushes WHERE status = 'forwarding' ORDER BY id",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// Outbox entries, oldest first, optionally in one state.
pub fn outbox_list(dir: &Path, state: Option<&str>) -> Result<Vec<OutboxRow>, StoreError> {
    let Some(conn) = open_existing(dir)? else { return Ok(Vec::new()) };
    let sql = "SELECT id, account, dedup_key, follower, url, attempts, state, last_error, created_at, next_at
             FROM outbox WHERE ?1 IS NULL OR state = ?1 ORDER BY id";
    select(&conn, sql, params![state], |r| {
        Ok(OutboxRow {
            id: r.get(0)?,
            account: r.get(1)?,
            dedup_key: r.get(2)?,
            follower: r.get(3)?,
            url: r.get(4)?,
            attempts: r.get(5)?,
            state: r.get(6)?,
            last_error: r.get(7)?,
            created_at_ms: r.get(8)?,
            next_at_ms: r.get(9)?,
        })
    })
}

/// Outbox depth: (pending, dead, age in ms of the oldest pending entry).
pub fn outbox_depth(dir: &Path, now_ms: i64) -> Result<(i64, i64, i64), StoreError> {
    let Some(conn) = open_existing(dir)? else { return Ok((0, 0, 0)) };
    // Each part reads only the index range of its state: delivered entries, the bulk
    // of the table, are never scanned.
    conn.query_row(
        "SELECT (SELECT COUNT(*) FROM outbox WHERE state = 'pending'),
                (SELECT COUNT(*) FROM outbox WHERE state = 'dead'),
                COALESCE(?1 - (SELECT MIN(created_at) FROM outbox WHERE state = 'pending'), 0)",
        params![now_ms],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .map_err(read_err)
}

/// Recorded pushes of one account and kind.
#[derive(Debug, Clone)]
pub struct KindSummary {
    pub account: String,
    pub kind: String,
    pub records: i64,
    pub dead_letters: i64,
    pub deliveries: i64,
    /// Newest arrival, Unix ms.
    pub latest_ms: i64,
}

/// Recorded pushes per account and kind.
pub fn summary(dir: &Path) -> Result<Vec<KindSummary>, StoreError> {
    let Some(conn) = open_existing(dir)? else { return Ok(Vec::new()) };
    select(
        &conn,
        "SELECT account, kind, COUNT(*), SUM(dead_letter), SUM(deliveries), MAX(received_at)
             FROM pushes GROUP BY account, kind ORDER BY account, kind",
        [],
        |r| {
            Ok(KindSummary {
                account: r.get(0)?,
                kind: r.get(1)?,
                records: r.get(2)?,
                dead_letters: r.get(3)?,
                deliveries: r.get(4)?,
                latest_ms: r.get(5)?,
            })
        },
    )
}

/// Every recorded push of the store in `dir`, oldest first, optionally of one account.
pub fn read_all(dir: &Path, account: Option<&str>) -> Result<Vec<Row>, StoreError> {
    let Some(conn) = open_existing(dir)? else { return Ok(Vec::new()) };
    let sql = "SELECT id, account, dedup_key, kind, encrypted, xml, fields, reply, dead_letter, error, received_at, deliveries,
                    status, late_result
             FROM pushes WHERE ?1 IS NULL OR account = ?1 ORDER BY id";
    select(&conn, sql, params![account], |r| {
        Ok(Row {
            id: r.get(0)?,
            account: r.get(1)?,
            dedup_key: r.get(2)?,
            kind: r.get(3)?,
            encrypted: r.get(4)?,
            xml: r.get(5)?,
            fields: r.get(6)?,
            reply: r.get(7)?,
            dead_letter: r.get(8)?,
            error: r.get(9)?,
            received_at_ms: r.get(10)?,
            deliveries: r.get(11)?,
            status: r.get(12)?,
            late_result: r.get(13)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, reply: Option<&str>) -> NewRecord {
        NewRecord {
            account: "a".into(),
            dedup_key: key.into(),
            kind: "text_message".into(),
            xml: "<xml/>".into(),
            fields: "{}".into(),
            reply: reply.map(str::to_owned),
            ..NewRecord::default()
        }
    }

    #[tokio::test]
    async fn a_key_is_recorded_once_and_keeps_its_reply() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.insert(record("k", Some("<xml>r</xml>"))).await.unwrap(), Inserted::New);
        assert_eq!(
            store.insert(record("k", Some("other"))).await.unwrap(),
            Inserted::Existing { reply: Some("<xml>r</xml>".into()), status: Status::Answered }
        );
        drop(store);

        // Reopened, as after a restart.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.insert(record("k", None)).await.unwrap(),
            Inserted::Existing { reply: Some("<xml>r</xml>".into()), status: Status::Answered }
        );
        let rows = read_all(dir.path(), None).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].deliveries, 3);
        assert_eq!(store.recent_keys(0, 10).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn delivery_counts_in_a_batch_do_not_shift_insert_results() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert(record("seen", None)).await.unwrap();
        for round in 0..50 {
            let waits: Vec<_> = (0..8)
                .map(|i| {
                    store.note_retry("a", "seen");
                    let s = store.clone();
                    tokio::spawn(
                        async move { s.insert(record(&format!("r{round}-{i}"), None)).await },
                    )
                })
                .collect();
            for w in waits {
                assert_eq!(w.await.unwrap().unwrap(), Inserted::New);
            }
        }
    }

    #[tokio::test]
    async fn concurrent_inserts_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move {
                    s.insert(record(&format!("k{}", i % 100), None)).await.unwrap()
                })
            })
            .collect();
        let mut new = 0;
        for t in tasks {
            if t.await.unwrap() == Inserted::New {
                new += 1;
            }
        }
        assert_eq!(new, 100);
        assert_eq!(read_all(dir.path(), Some("a")).unwrap().len(), 100);
        assert!(read_all(dir.path(), Some("b")).unwrap().is_empty());
    }
}
