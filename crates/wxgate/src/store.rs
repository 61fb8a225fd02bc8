//! The embedded store: every authentic push, written to SQLite before it is answered.
//!
//! One writer thread owns the connection and commits whatever requests are waiting as one
//! transaction (group commit), so durability costs one fsync per batch, not per push. The
//! database runs in WAL mode with `synchronous = FULL`: a push acknowledged to WeChat has
//! reached the disk. A push is unique per account and dedup key; inserting one that
//! exists changes nothing and returns the reply stored with it, which is how a retry is
//! recognised after a restart or after it left the in-memory window.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;
/// Requests that may wait for the writer before callers wait too.
const QUEUE: usize = 8192;

const MIGRATIONS: &[&str] = &[include_str!("../migrations/sqlite/0001_pushes.sql")];

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
}

/// What an insert found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Recorded now.
    New,
    /// Recorded before (a retry); its reply as stored.
    Existing { reply: Option<String> },
}

enum Op {
    Insert(Box<NewRecord>, oneshot::Sender<Result<Inserted, StoreError>>),
    Retry { account: String, dedup_key: String },
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
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
        let fail = |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let mut conn = Connection::open(&path).map_err(|e| fail(&e))?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(|e| fail(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| fail(&e))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| fail(&e))?;
        migrate(&mut conn).map_err(|e| fail(&e))?;

        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("wxgate-store".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| fail(&e))?;
        Ok(Store { tx, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a push durably; resolves once its transaction has committed.
    pub async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Op::Insert(Box::new(record), done)).await.map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Counts one more delivery of a recorded push; best effort, nobody waits for it.
    pub fn note_retry(&self, account: &str, dedup_key: &str) {
        let _ = self.tx.try_send(Op::Retry { account: account.to_owned(), dedup_key: dedup_key.to_owned() });
    }

    /// The keys recorded since `since_ms`, newest first, at most `limit`.
    pub fn recent_keys(&self, since_ms: i64, limit: usize) -> Result<Vec<RecentKey>, StoreError> {
        let conn = open_read(&self.path)?;
        let mut stmt = conn
            .prepare("SELECT account, dedup_key, reply FROM pushes WHERE received_at >= ?1 ORDER BY id DESC LIMIT ?2")
            .map_err(read_err)?;
        let rows = stmt
            .query_map(params![since_ms, limit as i64], |r| {
                Ok(RecentKey { account: r.get(0)?, dedup_key: r.get(1)?, reply: r.get(2)? })
            })
            .map_err(read_err)?;
        rows.collect::<Result<_, _>>().map_err(read_err)
    }
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
fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // One result per op, in order (None for delivery counts, which nobody awaits).
        let mut results = Vec::with_capacity(batch.len());
        let outcome = commit(&mut conn, &batch, &mut results);
        let mut results = results.into_iter();
        for op in batch.drain(..) {
            let result = results.next().flatten();
            if let Op::Insert(_, done) = op {
                let answer = match (&outcome, result) {
                    (Ok(()), Some(r)) => Ok(r),
                    (Err(e), _) => Err(e.clone()),
                    (Ok(()), None) => Err(StoreError::Write("insert produced no result".into())),
                };
                let _ = done.send(answer);
            }
        }
    }
}

fn commit(conn: &mut Connection, batch: &[Op], results: &mut Vec<Option<Inserted>>) -> Result<(), StoreError> {
    let werr = |e: rusqlite::Error| StoreError::Write(e.to_string());
    let tx = conn.transaction().map_err(werr)?;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO pushes (account, dedup_key, kind, msg_type, event, from_user, to_user, create_time,
                    encrypted, xml, fields, reply, dead_letter, error, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (account, dedup_key) DO NOTHING",
            )
            .map_err(werr)?;
        let mut existing =
            tx.prepare_cached("SELECT reply FROM pushes WHERE account = ?1 AND dedup_key = ?2").map_err(werr)?;
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
                        ])
                        .map_err(werr)?;
                    results.push(Some(if changed == 1 {
                        Inserted::New
                    } else {
                        let reply = existing
                            .query_row(params![r.account, r.dedup_key], |row| row.get(0))
                            .optional()
                            .map_err(werr)?
                            .flatten();
                        retry.execute(params![r.account, r.dedup_key]).map_err(werr)?;
                        Inserted::Existing { reply }
                    }));
                }
                Op::Retry { account, dedup_key } => {
                    retry.execute(params![account, dedup_key]).map_err(werr)?;
                    results.push(None);
                }
            }
        }
    }
    tx.commit().map_err(werr)
}

fn open_read(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
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
}

/// Every recorded push of the store in `dir`, oldest first, optionally of one account.
pub fn read_all(dir: &Path, account: Option<&str>) -> Result<Vec<Row>, StoreError> {
    let path = dir.join("wxgate.db");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = open_read(&path)?;
    let mut stmt = conn
        .prepare(
            "SELECT id, account, dedup_key, kind, encrypted, xml, fields, reply, dead_letter, error, received_at, deliveries
             FROM pushes WHERE ?1 IS NULL OR account = ?1 ORDER BY id",
        )
        .map_err(read_err)?;
    let rows = stmt
        .query_map(params![account], |r| {
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
            })
        })
        .map_err(read_err)?;
    rows.collect::<Result<_, _>>().map_err(read_err)
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
            Inserted::Existing { reply: Some("<xml>r</xml>".into()) }
        );
        drop(store);

        // Reopened, as after a restart.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.insert(record("k", None)).await.unwrap(), Inserted::Existing { reply: Some("<xml>r</xml>".into()) });
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
                    tokio::spawn(async move { s.insert(record(&format!("r{round}-{i}"), None)).await })
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
                tokio::spawn(async move { s.insert(record(&format!("k{}", i % 100), None)).await.unwrap() })
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
