//! The store: every authentic push, written before it is answered — to SQLite (the
//! embedded default) or to PostgreSQL (shared by several nodes); see [`Location`].
//!
//! One writer thread owns the connection and commits whatever requests are waiting as one
//! transaction (group commit), so durability costs one fsync per batch, not per push. The
//! database runs in WAL mode with `synchronous = FULL`: a push acknowledged to WeChat has
//! reached the disk. A push is unique per account and dedup key; inserting one that
//! exists changes nothing and returns the reply stored with it, which is how a retry is
//! recognised after a restart or after it left the in-memory window.

mod db;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use db::Location;
use db::{Db, Sql, V, Val};

/// The leases nodes take: the outbox, and the sweep of orphaned forwards.
pub const LEASES: [&str; 2] = ["outbox", "sweep"];

/// Longest wait for a push's commit: WeChat gives up after 5 s.
const INSERT_WAIT: Duration = Duration::from_millis(4500);

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;
/// Requests that may wait for the writer before callers wait too.
const QUEUE: usize = 8192;

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

/// Where a recorded push's answer stands (see [`Store::answer_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub reply: Option<String>,
    pub status: Status,
    /// Deliveries of the push that arrived, on every node.
    pub deliveries: i64,
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
    /// Not tried, because its destination is away (NATS disconnected): try again at
    /// `next_at_ms`, without counting an attempt.
    Deferred {
        reason: String,
        next_at_ms: i64,
    },
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Insert(Box<NewRecord>, Reply<Inserted>),
    Update(Box<Update>, Reply<()>),
    Attempted {
        id: i64,
        result: Attempted,
        done: Reply<()>,
    },
    /// Makes dead (or all failed-and-waiting) entries due again; answers how many.
    Redrive {
        id: Option<i64>,
        done: Reply<usize>,
    },
    Retry {
        account: String,
        dedup_key: String,
    },
    /// Answers once a transaction has committed: the store is writable.
    Probe(Reply<()>),
    /// Commit what is queued, then stop.
    Close,
    /// Deletes records older than their kind's cutoff; answers how many.
    Purge {
        cutoffs: Vec<(Option<String>, i64)>,
        limit: usize,
        done: Reply<usize>,
    },
    /// Queues a background delivery of a recorded push.
    Enqueue {
        account: String,
        dedup_key: String,
        follower: String,
        entry: OutboxEntry,
        done: Reply<()>,
    },
    /// Deletes every record of one follower; answers how many.
    Forget {
        account: String,
        openid: String,
        keep: Option<String>,
        done: Reply<usize>,
    },
    /// Claims due outbox entries for one delivery each, until `until_ms`: answers the
    /// ids that were still due (so that no other node delivers them meanwhile).
    Claim {
        ids: Vec<i64>,
        until_ms: i64,
        done: Reply<Vec<i64>>,
    },
    /// Takes or renews a lease; answers whether `holder` has it until `until_ms`.
    Lease {
        name: String,
        holder: String,
        until_ms: i64,
        done: Reply<bool>,
    },
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    at: Location,
    shared: Arc<Shared>,
}

/// What the writer reports back to every handle.
struct Shared {
    /// False from a failed commit until the next successful one.
    healthy: AtomicBool,
    /// True from a push that waited too long for its commit until the next commit.
    stalled: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Mutex<CommitStats>,
    /// A connection kept for the handle's own reads.
    reader: Mutex<Option<Box<dyn Db>>>,
}

/// Commit figures since start-up, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    pub commits: u64,
    pub failures: u64,
    /// Pushes recorded.
    pub records: u64,
    /// Most pushes recorded in one transaction.
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
    /// Opens (creating and migrating if needed) the store and starts the writer: for a
    /// folder, `DIR/wxgate.db`.
    pub fn open(at: impl Into<Location>) -> Result<Store, StoreError> {
        let at = at.into();
        let conn = off_runtime(&at, || db::open_writer(&at))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            stalled: AtomicBool::new(false),
            writer: Mutex::new(None),
            stats: Mutex::default(),
            reader: Mutex::new(None),
        });
        let for_writer = shared.clone();
        let handle = std::thread::Builder::new()
            .name("wxgate-store".into())
            .spawn(move || writer(conn, rx, &for_writer))
            .map_err(|e| StoreError::Open { path: at.display(), message: e.to_string() })?;
        *lock(&shared.writer) = Some(handle);
        Ok(Store { tx, at, shared })
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Commit figures since start-up.
    pub fn stats(&self) -> CommitStats {
        *lock(&self.shared.stats)
    }

    /// Requests waiting for the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Where the store lives.
    pub fn location(&self) -> &Location {
        &self.at
    }

    /// Whether other nodes write to the same store (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.at.shared()
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
        let Some(handle) = lock(&shared.writer).take() else {
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

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(op(done)).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a push durably; resolves once its transaction has committed, or fails
    /// when that takes longer than WeChat waits (a database that stopped answering).
    pub async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        let asked = self.ask(|done| Op::Insert(Box::new(record), done));
        match tokio::time::timeout(INSERT_WAIT, asked).await {
            Ok(answer) => answer,
            Err(_) => {
                if !self.shared.stalled.swap(true, Ordering::Relaxed) {
                    error!(target: "wxgate::store", "the store has not committed for {INSERT_WAIT:?}; pushes are refused (503) so that WeChat delivers them again");
                }
                Err(StoreError::Write(format!("no commit within {INSERT_WAIT:?}")))
            }
        }
    }

    /// Changes the answer of a recorded push; resolves once committed.
    pub async fn update(&self, update: Update) -> Result<(), StoreError> {
        self.ask(|done| Op::Update(Box::new(update), done)).await
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
        self.ask(|done| Op::Enqueue {
            account: account.into(),
            dedup_key: dedup_key.into(),
            follower: follower.into(),
            entry,
            done,
        })
        .await
    }

    /// Records the result of an outbox delivery attempt.
    pub async fn attempted(&self, id: i64, result: Attempted) -> Result<(), StoreError> {
        self.ask(|done| Op::Attempted { id, result, done }).await
    }

    /// Makes a dead outbox entry (or, with `None`, every dead one) pending again.
    pub async fn redrive(&self, id: Option<i64>) -> Result<usize, StoreError> {
        self.ask(|done| Op::Redrive { id, done }).await
    }

    /// Deletes records received before a cutoff (Unix ms): each `(Some(kind), cutoff)`
    /// for that kind, `(None, cutoff)` for every kind not named. Delivered and dead
    /// outbox entries go with their pushes. Answers how many records went.
    /// At most `limit` records go per kind and call: call again while it answers
    /// `limit` or more.
    pub async fn purge(
        &self,
        cutoffs: Vec<(Option<String>, i64)>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.ask(|done| Op::Purge { cutoffs, limit, done }).await
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
        self.ask(|done| Op::Forget {
            account: account.to_owned(),
            openid: openid.to_owned(),
            keep: keep.map(str::to_owned),
            done,
        })
        .await
    }

    /// Takes the lease `name` for `holder` until `until_ms` (Unix ms), or renews it;
    /// false while another holder's lease runs. One node at a time does the cluster's
    /// shared chores (the outbox, the sweep of orphaned forwards) this way.
    pub async fn lease(&self, name: &str, holder: &str, until_ms: i64) -> Result<bool, StoreError> {
        self.ask(|done| Op::Lease { name: name.into(), holder: holder.into(), until_ms, done })
            .await
    }

    /// Gives up every lease `holder` has (on a clean stop), so that another node takes
    /// them over at its next look rather than when they run out. Best effort.
    pub async fn release_leases(&self, holder: &str) {
        for name in LEASES {
            let _ = self.lease(name, holder, 0).await;
        }
    }

    /// Claims due outbox entries until `until_ms` (their next try moves there, so no
    /// other node takes them meanwhile; the attempt's result sets it again). Answers
    /// the ids claimed: those still pending and due.
    pub async fn claim(&self, ids: Vec<i64>, until_ms: i64) -> Result<Vec<i64>, StoreError> {
        self.ask(|done| Op::Claim { ids, until_ms, done }).await
    }

    /// Counts one more delivery of a recorded push; best effort, nobody waits for it.
    pub fn note_retry(&self, account: &str, dedup_key: &str) {
        let _ = self
            .tx
            .try_send(Op::Retry { account: account.to_owned(), dedup_key: dedup_key.to_owned() });
    }

    /// Runs a query on the handle's own connection (kept between calls); no rows when
    /// an embedded store was never created. Blocks.
    fn select(&self, sql: Sql, params: &[V<'_>]) -> Result<Vec<Vec<Val>>, StoreError> {
        let mut guard = lock(&self.shared.reader);
        let slot: &mut Option<Box<dyn Db>> = &mut guard;
        let at = &self.at;
        off_runtime(at, || {
            if slot.is_none() {
                *slot = db::open_reader(at)?;
            }
            let Some(conn) = slot.as_mut() else { return Ok(Vec::new()) };
            let result = conn.query(sql, params);
            if result.is_err() {
                // The server may have gone away: connect afresh next time.
                *slot = None;
            }
            result.map_err(StoreError::Read)
        })
    }

    /// Outbox entries due now: for each follower and destination (a URL, or NATS for
    /// every subject) only the oldest pending one, so that each destination gets a
    /// follower's pushes in order, and one that is away holds up no other. Blocks.
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<Due>, StoreError> {
        const DUE: Sql = Sql::both(
            "SELECT o.id, o.account, o.dedup_key, o.follower, o.url, o.payload, o.attempts FROM outbox o
             WHERE o.state = 'pending' AND o.next_at <= ?1
               AND o.id = (SELECT MIN(p.id) FROM outbox p
                           WHERE p.account = o.account AND p.follower = o.follower AND p.state = 'pending'
                             AND CASE WHEN p.url LIKE 'nats:%' THEN 'nats:' ELSE p.url END
                               = CASE WHEN o.url LIKE 'nats:%' THEN 'nats:' ELSE o.url END)
             ORDER BY o.next_at, o.id LIMIT ?2",
        );
        let rows = self.select(DUE, &[now_ms.into(), (limit as i64).into()])?;
        Ok(rows
            .into_iter()
            .map(|r| Due {
                id: r[0].i64(),
                account: r[1].text(),
                dedup_key: r[2].text(),
                follower: r[3].text(),
                url: r[4].text(),
                payload: r[5].text(),
                attempts: r[6].i64(),
            })
            .collect())
    }

    /// The keys answered since `since_ms`, newest first, at most `limit`. Blocks.
    pub fn recent_keys(&self, since_ms: i64, limit: usize) -> Result<Vec<RecentKey>, StoreError> {
        // Only final answers: a push whose forward was cut short must be forwarded again.
        // A late reply went as a customer-service message: WeChat's passive
        // answer to that push was `success`, and so is a retry's.
        const RECENT: Sql = Sql::both(
            "SELECT account, dedup_key, CASE WHEN status = 'late' THEN NULL ELSE reply END FROM pushes
             WHERE received_at >= ?1 AND status IN ('answered', 'late') ORDER BY id DESC LIMIT ?2",
        );
        let rows = self.select(RECENT, &[since_ms.into(), (limit as i64).into()])?;
        Ok(rows
            .into_iter()
            .map(|r| RecentKey {
                account: r[0].text(),
                dedup_key: r[1].text(),
                reply: r[2].opt_text(),
            })
            .collect())
    }

    /// A recorded push's answer as it stands. Blocks.
    pub fn answer_of(
        &self,
        account: &str,
        dedup_key: &str,
    ) -> Result<Option<Standing>, StoreError> {
        const STANDING: Sql = Sql::both(
            "SELECT reply, status, deliveries FROM pushes WHERE account = ?1 AND dedup_key = ?2",
        );
        let rows = self.select(STANDING, &[account.into(), dedup_key.into()])?;
        Ok(rows.first().map(|r| Standing {
            reply: r[0].opt_text(),
            status: Status::parse(&r[1].text()),
            deliveries: r[2].i64(),
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a blocking database call. PostgreSQL's driver runs a Tokio runtime of its own,
/// which must not start inside another: its calls go to a thread of their own.
fn off_runtime<T: Send>(at: &Location, f: impl FnOnce() -> T + Send) -> T {
    match at {
        Location::Sqlite(_) => f(),
        Location::Postgres(_) => std::thread::scope(|s| {
            s.spawn(f).join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
    }
}

/// A one-off query of the store at `at`; no rows when an embedded store was never
/// created.
fn select_once(at: &Location, sql: Sql, params: &[V<'_>]) -> Result<Vec<Vec<Val>>, StoreError> {
    off_runtime(at, || {
        let Some(mut conn) = db::open_reader(at)? else { return Ok(Vec::new()) };
        conn.query(sql, params).map_err(StoreError::Read)
    })
}

/// The writer thread: take what is waiting, commit it as one transaction, answer each.
/// It stops when every handle is gone, after committing what was queued.
fn writer(mut conn: Box<dyn Db>, mut rx: mpsc::Receiver<Op>, shared: &Shared) {
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
        let mut outcome = transaction(conn.as_mut(), &batch, &mut results);
        let mut outcomes = vec![outcome.clone(); batch.len()];
        let refused = match &outcome {
            Err(StoreError::Write(e)) => conn.refused_a_record(e),
            _ => false,
        };
        if refused && batch.len() > 1 {
            // The database is there but refused the batch: one record it cannot take
            // (or a deadlock with another node) must not fail the others. Each op alone.
            results.clear();
            for (op, each) in batch.iter().zip(outcomes.iter_mut()) {
                let mut one = Vec::with_capacity(1);
                *each = transaction(conn.as_mut(), std::slice::from_ref(op), &mut one);
                results.push(one.pop().flatten());
                if let Err(e) = each {
                    warn!(target: "wxgate::store", error = %e, "the store refused one request; the others of its batch are kept");
                }
            }
            if outcomes.iter().any(Result::is_ok) {
                outcome = Ok(());
            }
        }
        let pushes = batch
            .iter()
            .zip(&outcomes)
            .filter(|(op, o)| matches!(op, Op::Insert(..)) && o.is_ok())
            .count();
        note_outcome(shared, &outcome, pushes, started.elapsed());
        let mut results = results.into_iter();
        for (op, outcome) in batch.drain(..).zip(outcomes) {
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
                Op::Lease { done, .. } => {
                    let held = matches!(result, Some(OpResult::Count(1)));
                    let _ = done.send(outcome.clone().map(|()| held));
                }
                Op::Claim { done, .. } => {
                    let ids = if let Some(OpResult::Ids(ids)) = result { ids } else { Vec::new() };
                    let _ = done.send(outcome.clone().map(|()| ids));
                }
                Op::Retry { .. } | Op::Close => {}
            }
        }
    }
}

/// Runs ops as one transaction; rolled back when it fails.
fn transaction(
    conn: &mut dyn Db,
    ops: &[Op],
    results: &mut Vec<Option<OpResult>>,
) -> Result<(), StoreError> {
    let outcome = conn
        .begin()
        .and_then(|()| commit(conn, ops, results))
        .and_then(|()| conn.commit())
        .map_err(StoreError::Write);
    if outcome.is_err() {
        conn.rollback();
    }
    outcome
}

/// Keeps the figures (`pushes`: how many the batch recorded) and logs an outage once: at
/// its first failure and at recovery.
fn note_outcome(shared: &Shared, outcome: &Result<(), StoreError>, pushes: usize, took: Duration) {
    {
        let mut s = lock(&shared.stats);
        match outcome {
            Ok(()) => {
                s.commits += 1;
                s.records += pushes as u64;
                s.largest_batch = s.largest_batch.max(pushes as u64);
                s.total_commit_micros += took.as_micros() as u64;
            }
            Err(_) => s.failures += 1,
        }
    }
    if outcome.is_ok() && shared.stalled.swap(false, Ordering::Relaxed) {
        info!(target: "wxgate::store", "the store commits again");
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
    Ids(Vec<i64>),
}

const INSERT: Sql = Sql::both(
    "INSERT INTO pushes (account, dedup_key, kind, msg_type, event, from_user, to_user, create_time,
        encrypted, xml, fields, reply, dead_letter, error, received_at, status)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
     ON CONFLICT (account, dedup_key) DO NOTHING",
);
const EXISTING: Sql =
    Sql::both("SELECT reply, status FROM pushes WHERE account = ?1 AND dedup_key = ?2");
const COUNT_DELIVERY: Sql = Sql::both(
    "UPDATE pushes SET deliveries = deliveries + 1 WHERE account = ?1 AND dedup_key = ?2",
);
const ENQUEUE: Sql = Sql::both(
    "INSERT INTO outbox (account, dedup_key, follower, url, payload, next_at, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) ON CONFLICT DO NOTHING",
);

/// The follower an outbox entry is queued under: the OpenID itself, or for one too
/// long to index (no real OpenID is; an authentic push may still carry one) its start
/// and a digest of the whole, the same for every entry of that follower.
fn follower_key(openid: &str) -> std::borrow::Cow<'_, str> {
    const LONGEST: usize = 256;
    if openid.len() <= LONGEST {
        return openid.into();
    }
    let mut cut = LONGEST / 2;
    while !openid.is_char_boundary(cut) {
        cut -= 1;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(openid.as_bytes());
    format!("{}~{}", &openid[..cut], hex::encode(digest)).into()
}

/// Runs a batch's ops inside the open transaction.
fn commit(
    db: &mut dyn Db,
    batch: &[Op],
    results: &mut Vec<Option<OpResult>>,
) -> Result<(), String> {
    // Under load a batch is pushes (and delivery counts): where the database can, they
    // go in one statement. Other ops keep the batch in order, one statement each.
    let only_pushes =
        batch.iter().all(|op| matches!(op, Op::Insert(..) | Op::Retry { .. } | Op::Probe(_)));
    let mut inserted = None;
    if only_pushes {
        let records: Vec<&NewRecord> = batch
            .iter()
            .filter_map(|op| if let Op::Insert(r, _) = op { Some(&**r) } else { None })
            .collect();
        if records.len() > 1 {
            inserted = db.insert_pushes(&records).transpose()?.map(Vec::into_iter);
        }
    }
    for op in batch {
        let result = match op {
            Op::Insert(r, _) => {
                let changed = match inserted.as_mut() {
                    Some(each) => usize::from(each.next().unwrap_or(false)),
                    None => db.exec(
                        INSERT,
                        &[
                            (&r.account).into(),
                            (&r.dedup_key).into(),
                            (&r.kind).into(),
                            (&r.msg_type).into(),
                            (&r.event).into(),
                            (&r.from_user).into(),
                            (&r.to_user).into(),
                            (&r.create_time).into(),
                            r.encrypted.into(),
                            (&r.xml).into(),
                            (&r.fields).into(),
                            (&r.reply).into(),
                            r.dead_letter.into(),
                            (&r.error).into(),
                            r.received_at_ms.into(),
                            r.status.as_str().into(),
                        ],
                    )?,
                };
                let inserted = if changed == 1 {
                    let follower = follower_key(r.from_user.as_deref().unwrap_or_default());
                    let follower = follower.as_ref();
                    for o in &r.outbox {
                        db.exec(
                            ENQUEUE,
                            &[
                                (&r.account).into(),
                                (&r.dedup_key).into(),
                                follower.into(),
                                (&o.url).into(),
                                (&o.payload).into(),
                                r.received_at_ms.into(),
                            ],
                        )?;
                    }
                    Inserted::New
                } else {
                    let key: [V<'_>; 2] = [(&r.account).into(), (&r.dedup_key).into()];
                    let row = db.query(EXISTING, &key)?.into_iter().next();
                    let (reply, status) =
                        row.map_or((None, String::new()), |r| (r[0].opt_text(), r[1].text()));
                    db.exec(COUNT_DELIVERY, &key)?;
                    Inserted::Existing { reply, status: Status::parse(&status) }
                };
                Some(OpResult::Inserted(inserted))
            }
            Op::Update(u, _) => {
                db.exec(
                    Sql::both(
                        "UPDATE pushes SET reply = ?3, status = ?4, late_result = COALESCE(?5, late_result)
                         WHERE account = ?1 AND dedup_key = ?2",
                    ),
                    &[
                        (&u.account).into(),
                        (&u.dedup_key).into(),
                        (&u.reply).into(),
                        u.status.as_str().into(),
                        (&u.late_result).into(),
                    ],
                )?;
                None
            }
            Op::Attempted { id, result, .. } => {
                match result {
                    Attempted::Delivered => db.exec(
                        Sql::both("UPDATE outbox SET state = 'delivered', attempts = attempts + 1, last_error = NULL WHERE id = ?1"),
                        &[(*id).into()],
                    )?,
                    Attempted::Failed { error, next_at_ms, dead } => db.exec(
                        Sql::both(
                            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_at = ?3,
                                state = CASE WHEN ?4 THEN 'dead' ELSE 'pending' END WHERE id = ?1",
                        ),
                        &[(*id).into(), error.as_str().into(), (*next_at_ms).into(), (*dead).into()],
                    )?,
                    Attempted::Deferred { reason, next_at_ms } => db.exec(
                        Sql::both("UPDATE outbox SET last_error = ?2, next_at = ?3 WHERE id = ?1"),
                        &[(*id).into(), reason.as_str().into(), (*next_at_ms).into()],
                    )?,
                };
                None
            }
            Op::Redrive { id, .. } => {
                let n = db.exec(
                    Sql::both(
                        "UPDATE outbox SET state = 'pending', attempts = 0, next_at = 0
                         WHERE state = 'dead' AND (CAST(?1 AS BIGINT) IS NULL OR id = ?1)",
                    ),
                    &[(*id).into()],
                )?;
                Some(OpResult::Count(n))
            }
            Op::Purge { cutoffs, limit, .. } => {
                let named: Vec<&str> = cutoffs.iter().filter_map(|(k, _)| k.as_deref()).collect();
                let limit = *limit as i64;
                let mut n = 0;
                for (kind, cutoff) in cutoffs {
                    n += match kind {
                        Some(kind) => db.exec(
                            Sql::both(
                                "DELETE FROM pushes WHERE id IN (SELECT id FROM pushes
                                   WHERE kind = ?1 AND received_at < ?2 LIMIT ?3)",
                            ),
                            &[kind.as_str().into(), (*cutoff).into(), limit.into()],
                        )?,
                        None => {
                            // Every kind without a cutoff of its own.
                            let list =
                                serde_json::to_string(&named).unwrap_or_else(|_| "[]".into());
                            db.exec(
                                Sql {
                                    sqlite: "DELETE FROM pushes WHERE id IN (SELECT id FROM pushes
                                               WHERE received_at < ?1
                                               AND kind NOT IN (SELECT value FROM json_each(?2)) LIMIT ?3)",
                                    postgres: "DELETE FROM pushes WHERE id IN (SELECT id FROM pushes
                                               WHERE received_at < ?1
                                               AND kind NOT IN (SELECT json_array_elements_text(CAST(?2 AS json))) LIMIT ?3)",
                                },
                                &[(*cutoff).into(), list.as_str().into(), limit.into()],
                            )?
                        }
                    };
                }
                db.exec(
                    Sql::both(
                        "DELETE FROM outbox WHERE id IN (SELECT o.id FROM outbox o WHERE o.state != 'pending'
                           AND NOT EXISTS (SELECT 1 FROM pushes p WHERE p.account = o.account AND p.dedup_key = o.dedup_key)
                           LIMIT ?1)",
                    ),
                    &[limit.into()],
                )?;
                Some(OpResult::Count(n))
            }
            Op::Enqueue { account, dedup_key, follower, entry, .. } => {
                db.exec(
                    ENQUEUE,
                    &[
                        account.into(),
                        dedup_key.into(),
                        follower_key(follower).as_ref().into(),
                        (&entry.url).into(),
                        (&entry.payload).into(),
                        now_ms().into(),
                    ],
                )?;
                None
            }
            Op::Forget { account, openid, keep, .. } => {
                // The revoke event itself stays, as the record of the request.
                let n = db.exec(
                    Sql::both(
                        "DELETE FROM pushes WHERE account = ?1 AND from_user = ?2 AND kind != 'user_authorization_event'",
                    ),
                    &[account.into(), openid.into()],
                )?;
                db.exec(
                    Sql::both(
                        "DELETE FROM outbox WHERE account = ?1 AND follower = ?2 AND dedup_key IS DISTINCT FROM ?3",
                    ),
                    &[account.into(), follower_key(openid).as_ref().into(), keep.into()],
                )?;
                Some(OpResult::Count(n))
            }
            Op::Lease { name, holder, until_ms, .. } => {
                let n = db.exec(
                    Sql::both(
                        "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                         WHERE leases.holder = excluded.holder OR leases.expires_at < ?4",
                    ),
                    &[name.into(), holder.into(), (*until_ms).into(), now_ms().into()],
                )?;
                Some(OpResult::Count(n))
            }
            Op::Claim { ids, until_ms, .. } => {
                let now = now_ms();
                let mut claimed = Vec::with_capacity(ids.len());
                for id in ids {
                    let n = db.exec(
                        Sql::both(
                            "UPDATE outbox SET next_at = ?2 WHERE id = ?1 AND state = 'pending' AND next_at <= ?3",
                        ),
                        &[(*id).into(), (*until_ms).into(), now.into()],
                    )?;
                    if n == 1 {
                        claimed.push(*id);
                    }
                }
                Some(OpResult::Ids(claimed))
            }
            Op::Retry { account, dedup_key } => {
                db.exec(COUNT_DELIVERY, &[account.into(), dedup_key.into()])?;
                None
            }
            // Readiness means a write goes through (a read-only database commits empty
            // transactions just fine).
            Op::Probe(_) => {
                db.exec(
                    Sql::both(
                        "INSERT INTO leases (name, holder, expires_at) VALUES ('probe', ?1, ?2)
                         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                    ),
                    &[crate::node_id().into(), now_ms().into()],
                )?;
                None
            }
            Op::Close => None,
        };
        results.push(result);
    }
    Ok(())
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

/// Pushes whose forward was in flight when their server stopped, received before
/// `before_ms`: (account, dedup key, decrypted XML).
pub fn interrupted_forwards(
    at: &Location,
    before_ms: i64,
) -> Result<Vec<(String, String, String)>, StoreError> {
    let rows = select_once(
        at,
        Sql::both(
            "SELECT account, dedup_key, xml FROM pushes
                 WHERE status = 'forwarding' AND received_at < ?1 ORDER BY id",
        ),
        &[before_ms.into()],
    )?;
    Ok(rows.into_iter().map(|r| (r[0].text(), r[1].text(), r[2].text())).collect())
}

/// Outbox entries, oldest first, optionally in one state.
pub fn outbox_list(at: &Location, state: Option<&str>) -> Result<Vec<OutboxRow>, StoreError> {
    let rows = select_once(
        at,
        Sql::both(
            "SELECT id, account, dedup_key, follower, url, attempts, state, last_error, created_at, next_at
             FROM outbox WHERE CAST(?1 AS TEXT) IS NULL OR state = ?1 ORDER BY id",
        ),
        &[state.into()],
    )?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxRow {
            id: r[0].i64(),
            account: r[1].text(),
            dedup_key: r[2].text(),
            follower: r[3].text(),
            url: r[4].text(),
            attempts: r[5].i64(),
            state: r[6].text(),
            last_error: r[7].opt_text(),
            created_at_ms: r[8].i64(),
            next_at_ms: r[9].i64(),
        })
        .collect())
}

/// Outbox depth: (pending, dead, age in ms of the oldest pending entry).
pub fn outbox_depth(at: &Location, now_ms: i64) -> Result<(i64, i64, i64), StoreError> {
    // Each part reads only the index range of its state: delivered entries, the bulk
    // of the table, are never scanned.
    let rows = select_once(
        at,
        Sql::both(
            "SELECT (SELECT COUNT(*) FROM outbox WHERE state = 'pending'),
                    (SELECT COUNT(*) FROM outbox WHERE state = 'dead'),
                    COALESCE(CAST(?1 AS BIGINT) - (SELECT MIN(created_at) FROM outbox WHERE state = 'pending'), 0)",
        ),
        &[now_ms.into()],
    )?;
    Ok(rows.first().map_or((0, 0, 0), |r| (r[0].i64(), r[1].i64(), r[2].i64())))
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
pub fn summary(at: &Location) -> Result<Vec<KindSummary>, StoreError> {
    let rows = select_once(
        at,
        Sql::both(
            "SELECT account, kind, COUNT(*), CAST(SUM(CASE WHEN dead_letter THEN 1 ELSE 0 END) AS BIGINT),
                    CAST(SUM(deliveries) AS BIGINT), MAX(received_at)
             FROM pushes GROUP BY account, kind ORDER BY account, kind",
        ),
        &[],
    )?;
    Ok(rows
        .into_iter()
        .map(|r| KindSummary {
            account: r[0].text(),
            kind: r[1].text(),
            records: r[2].i64(),
            dead_letters: r[3].i64(),
            deliveries: r[4].i64(),
            latest_ms: r[5].i64(),
        })
        .collect())
}

/// Every recorded push of the store at `at`, oldest first, optionally of one account.
pub fn read_all(at: impl Into<Location>, account: Option<&str>) -> Result<Vec<Row>, StoreError> {
    let at = at.into();
    let rows = select_once(
        &at,
        Sql::both(
            "SELECT id, account, dedup_key, kind, encrypted, xml, fields, reply, dead_letter, error,
                    received_at, deliveries, status, late_result
             FROM pushes WHERE CAST(?1 AS TEXT) IS NULL OR account = ?1 ORDER BY id",
        ),
        &[account.into()],
    )?;
    Ok(rows.into_iter().map(row).collect())
}

fn row(r: Vec<Val>) -> Row {
    Row {
        id: r[0].i64(),
        account: r[1].text(),
        dedup_key: r[2].text(),
        kind: r[3].text(),
        encrypted: r[4].bool(),
        xml: r[5].text(),
        fields: r[6].text(),
        reply: r[7].opt_text(),
        dead_letter: r[8].bool(),
        error: r[9].opt_text(),
        received_at_ms: r[10].i64(),
        deliveries: r[11].i64(),
        status: r[12].text(),
        late_result: r[13].opt_text(),
    }
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
