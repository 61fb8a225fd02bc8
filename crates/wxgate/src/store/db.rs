//! The two databases behind the store, SQLite (embedded) and PostgreSQL (shared by
//! several nodes), seen through one small interface: statements with positional
//! parameters, rows of plain values, explicit transactions. Every query of the store is
//! written once; where the dialects differ a [`Sql`] carries both texts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use super::{NewRecord, StoreError};

const SQLITE_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_pushes.sql"),
    include_str!("../../migrations/sqlite/0002_forwarding.sql"),
    include_str!("../../migrations/sqlite/0003_leases.sql"),
];

const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_pushes.sql"),
    include_str!("../../migrations/postgres/0002_forwarding.sql"),
    include_str!("../../migrations/postgres/0003_leases.sql"),
    include_str!("../../migrations/postgres/0004_long_openids.sql"),
];

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `DIR/wxgate.db`, the embedded default.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user@host:port/db`), shared by every node.
    Postgres(String),
}

impl Location {
    /// Whether other nodes may write to the same store.
    pub fn shared(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }

    /// For people and logs: the file, or the URL without its password.
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(dir) => dir.join("wxgate.db").display().to_string(),
            Location::Postgres(url) => crate::config::redacted_url(url),
        }
    }
}

impl From<&Location> for Location {
    fn from(at: &Location) -> Location {
        at.clone()
    }
}

impl From<&Path> for Location {
    fn from(dir: &Path) -> Location {
        Location::Sqlite(dir.to_owned())
    }
}

impl From<&PathBuf> for Location {
    fn from(dir: &PathBuf) -> Location {
        Location::Sqlite(dir.clone())
    }
}

/// A statement; `?1`, `?2`… mark its parameters in both texts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sql {
    pub(crate) sqlite: &'static str,
    pub(crate) postgres: &'static str,
}

impl Sql {
    /// The same text for both databases.
    pub(crate) const fn both(text: &'static str) -> Sql {
        Sql { sqlite: text, postgres: text }
    }
}

/// A parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum V<'a> {
    Null,
    I(i64),
    T(&'a str),
    B(bool),
}

impl<'a> From<&'a str> for V<'a> {
    fn from(s: &'a str) -> V<'a> {
        V::T(s)
    }
}

impl<'a> From<&'a String> for V<'a> {
    fn from(s: &'a String) -> V<'a> {
        V::T(s)
    }
}

impl<'a> From<&'a Option<String>> for V<'a> {
    fn from(s: &'a Option<String>) -> V<'a> {
        s.as_deref().map_or(V::Null, V::T)
    }
}

impl<'a> From<Option<&'a str>> for V<'a> {
    fn from(s: Option<&'a str>) -> V<'a> {
        s.map_or(V::Null, V::T)
    }
}

impl From<i64> for V<'_> {
    fn from(n: i64) -> Self {
        V::I(n)
    }
}

impl From<Option<i64>> for V<'_> {
    fn from(n: Option<i64>) -> Self {
        n.map_or(V::Null, V::I)
    }
}

impl From<bool> for V<'_> {
    fn from(b: bool) -> Self {
        V::B(b)
    }
}

/// A value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    I(i64),
    T(String),
    B(bool),
}

impl Val {
    pub(crate) fn i64(&self) -> i64 {
        match self {
            Val::I(n) => *n,
            Val::B(b) => i64::from(*b),
            Val::T(t) => t.parse().unwrap_or(0),
            Val::Null => 0,
        }
    }

    pub(crate) fn bool(&self) -> bool {
        self.i64() != 0
    }

    pub(crate) fn opt_text(&self) -> Option<String> {
        match self {
            Val::T(t) => Some(t.clone()),
            Val::I(n) => Some(n.to_string()),
            Val::B(b) => Some(b.to_string()),
            Val::Null => None,
        }
    }

    pub(crate) fn text(&self) -> String {
        self.opt_text().unwrap_or_default()
    }
}

/// A connection to either database.
pub(crate) trait Db: Send {
    fn begin(&mut self) -> Result<(), String>;
    fn commit(&mut self) -> Result<(), String>;
    /// Abandons the open transaction, if any.
    fn rollback(&mut self);
    /// Whether `error`, from a batch, may be one record the database refuses (worth
    /// trying the batch's ops one by one) rather than the database being unable to
    /// write at all (gone, locked, timed out: trying again op by op only waits longer).
    fn refused_a_record(&self, _error: &str) -> bool {
        false
    }
    /// Runs a statement; answers how many rows it changed.
    fn exec(&mut self, sql: Sql, params: &[V<'_>]) -> Result<usize, String>;
    /// Runs a query; answers its rows.
    fn query(&mut self, sql: Sql, params: &[V<'_>]) -> Result<Vec<Vec<Val>>, String>;

    /// Inserts pushes in one statement where the database can (skipping keys already
    /// there, as the one-by-one insert does): for each, whether this statement inserted
    /// it. `None`: insert them one by one.
    fn insert_pushes(&mut self, _records: &[&NewRecord]) -> Option<Result<Vec<bool>, String>> {
        None
    }
}

/// Opens the writer's connection, creating and migrating the schema.
pub(crate) fn open_writer(at: &Location) -> Result<Box<dyn Db>, StoreError> {
    let fail =
        |e: &dyn std::fmt::Display| StoreError::Open { path: at.display(), message: e.to_string() };
    match at {
        Location::Sqlite(dir) => {
            let path = dir.join("wxgate.db");
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
            let mut conn = Connection::open(&path).map_err(|e| fail(&e))?;
            conn.busy_timeout(Duration::from_secs(2)).map_err(|e| fail(&e))?;
            conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| fail(&e))?;
            conn.pragma_update(None, "synchronous", "FULL").map_err(|e| fail(&e))?;
            migrate_sqlite(&mut conn).map_err(|e| fail(&e))?;
            Ok(Box::new(Sqlite { conn, in_tx: false }))
        }
        Location::Postgres(url) => {
            let mut db = Postgres::connect(url).map_err(|e| fail(&e))?;
            db.migrate().map_err(|e| fail(&e))?;
            Ok(Box::new(db))
        }
    }
}

/// Opens a connection for reading, or `None` when an embedded store was never created.
pub(crate) fn open_reader(at: &Location) -> Result<Option<Box<dyn Db>>, StoreError> {
    let fail =
        |e: &dyn std::fmt::Display| StoreError::Open { path: at.display(), message: e.to_string() };
    match at {
        Location::Sqlite(dir) => {
            let path = dir.join("wxgate.db");
            if !path.exists() {
                return Ok(None);
            }
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| fail(&e))?;
            conn.busy_timeout(Duration::from_secs(5)).map_err(|e| fail(&e))?;
            Ok(Some(Box::new(Sqlite { conn, in_tx: false })))
        }
        // Reading before any node migrated finds no tables: an error that says so.
        Location::Postgres(url) => {
            Ok(Some(Box::new(Postgres::connect(url).map_err(|e| fail(&e))?)))
        }
    }
}

fn migrate_sqlite(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in SQLITE_MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

struct Sqlite {
    conn: Connection,
    in_tx: bool,
}

/// SQLite binds the parameters where they are, without copying text.
impl rusqlite::ToSql for V<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value};
        Ok(match self {
            V::Null => ToSqlOutput::Owned(Value::Null),
            V::I(n) => ToSqlOutput::Owned(Value::Integer(*n)),
            V::T(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            V::B(b) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
        })
    }
}

impl Db for Sqlite {
    fn begin(&mut self) -> Result<(), String> {
        self.conn.execute_batch("BEGIN").map_err(|e| e.to_string())?;
        self.in_tx = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        self.in_tx = false;
        self.conn.execute_batch("COMMIT").map_err(|e| e.to_string())
    }

    fn rollback(&mut self) {
        if std::mem::take(&mut self.in_tx) {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn exec(&mut self, sql: Sql, params: &[V<'_>]) -> Result<usize, String> {
        let mut stmt = self.conn.prepare_cached(sql.sqlite).map_err(|e| e.to_string())?;
        stmt.execute(rusqlite::params_from_iter(params)).map_err(|e| e.to_string())
    }

    fn query(&mut self, sql: Sql, params: &[V<'_>]) -> Result<Vec<Vec<Val>>, String> {
        let mut stmt = self.conn.prepare_cached(sql.sqlite).map_err(|e| e.to_string())?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params)).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let mut values = Vec::with_capacity(width);
            for i in 0..width {
                values.push(match row.get_ref(i).map_err(|e| e.to_string())? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(n) => Val::I(n),
                    ValueRef::Real(f) => Val::I(f as i64),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Val::T(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            out.push(values);
        }
        Ok(out)
    }
}

/// The PostgreSQL driver: one connection, statements prepared once per connection, and
/// a reconnect at the next transaction after the server went away.
struct Postgres {
    url: String,
    client: Option<postgres::Client>,
    prepared: HashMap<&'static str, postgres::Statement>,
    /// Set by a reconnect: the database may have been recreated since, so the next
    /// transaction makes sure the schema is there.
    check_schema: bool,
    /// Whether a transaction is open (so that ROLLBACK is only sent into one).
    in_tx: bool,
}

impl Postgres {
    fn connect(url: &str) -> Result<Postgres, String> {
        let mut db = Postgres {
            url: url.to_owned(),
            client: None,
            prepared: HashMap::new(),
            check_schema: false,
            in_tx: false,
        };
        db.client()?;
        db.check_schema = false;
        Ok(db)
    }

    fn client(&mut self) -> Result<&mut postgres::Client, String> {
        if self.client.as_ref().is_none_or(postgres::Client::is_closed) {
            self.prepared.clear();
            let mut config: postgres::Config = self.url.parse().map_err(|e| describe(&e))?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(Duration::from_secs(2));
            }
            // A server that stops answering (a network that drops packets) must not hold
            // the writer for good: unacknowledged data times out, an idle link is probed,
            // and no statement runs longer than 10 s (a lock behind a long purge).
            config
                .tcp_user_timeout(Duration::from_secs(5))
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(5));
            if config.get_options().is_none() {
                config.options("-c statement_timeout=10000 -c lock_timeout=5000");
            }
            config.application_name("wxgate");
            self.client = Some(config.connect(postgres::NoTls).map_err(|e| describe(&e))?);
            self.check_schema = true;
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Runs the migrations not yet applied, one node at a time (an advisory lock).
    fn migrate(&mut self) -> Result<(), String> {
        self.client()?;
        let client = self.client.as_mut().expect("connected above");
        let migrated = (|| {
            let mut tx = client.transaction()?;
            tx.batch_execute(
                "SET LOCAL client_min_messages = warning;
                 SELECT pg_advisory_xact_lock(7873203477);
                 CREATE TABLE IF NOT EXISTS wxgate_schema (version BIGINT NOT NULL)",
            )?;
            let version: i64 =
                tx.query_opt("SELECT version FROM wxgate_schema", &[])?.map_or(0, |r| r.get(0));
            for sql in POSTGRES_MIGRATIONS.iter().skip(version.max(0) as usize) {
                tx.batch_execute(sql)?;
            }
            let latest = POSTGRES_MIGRATIONS.len() as i64;
            if version < latest {
                tx.execute("DELETE FROM wxgate_schema", &[])?;
                tx.execute("INSERT INTO wxgate_schema (version) VALUES ($1)", &[&latest])?;
            }
            tx.commit()
        })();
        migrated.map_err(|e| format!("migrating the schema: {}", self.failed(&e)))
    }

    fn statement(&mut self, sql: Sql) -> Result<postgres::Statement, String> {
        if let Some(s) = self.prepared.get(sql.postgres) {
            return Ok(s.clone());
        }
        let text = numbered(sql.postgres);
        let stmt = self.client()?.prepare(&text).map_err(|e| describe(&e))?;
        self.prepared.insert(sql.postgres, stmt.clone());
        Ok(stmt)
    }

    fn run<T>(
        &mut self,
        sql: Sql,
        params: &[V<'_>],
        f: impl FnOnce(
            &mut postgres::Client,
            &postgres::Statement,
            &[&(dyn postgres::types::ToSql + Sync)],
        ) -> Result<T, postgres::Error>,
    ) -> Result<T, String> {
        let stmt = self.statement(sql)?;
        let owned: Vec<PgParam> =
            params.iter().zip(stmt.params()).map(|(p, ty)| PgParam::of(p, ty)).collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            owned.iter().map(|p| p as &(dyn postgres::types::ToSql + Sync)).collect();
        let client = self.client()?;
        let result = f(client, &stmt, &refs);
        result.map_err(|e| self.failed(&e))
    }

    /// Describes a failure; a connection whose session cannot write (a read-only
    /// default, as on a standby after a failover) is dropped, so that the next
    /// transaction connects afresh and finds the database as it is now.
    fn failed(&mut self, e: &postgres::Error) -> String {
        if e.code() == Some(&postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
            self.client = None;
            self.prepared.clear();
        }
        describe(e)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The driver's connection owns a Tokio runtime, which may not be dropped inside
        // another runtime's task: let it go on a thread of its own.
        if let Some(client) = self.client.take() {
            let _ = std::thread::Builder::new()
                .name("wxgate-pg-close".into())
                .spawn(move || drop(client));
        }
    }
}

impl Postgres {
    fn insert_many(&mut self, records: &[&NewRecord]) -> Result<Vec<bool>, String> {
        // In key order, so that two nodes inserting the same keys lock them in the same
        // order and never deadlock (the sort is stable: a key's first push stays first).
        let mut sorted: Vec<&NewRecord> = records.to_vec();
        sorted.sort_by(|a, b| (&a.account, &a.dedup_key).cmp(&(&b.account, &b.dedup_key)));
        let text = |f: fn(&NewRecord) -> &str| {
            sorted.iter().map(|r| pg_text(f(r))).collect::<Vec<std::borrow::Cow<'_, str>>>()
        };
        let opt = |f: fn(&NewRecord) -> Option<&str>| {
            sorted
                .iter()
                .map(|r| f(r).map(pg_text))
                .collect::<Vec<Option<std::borrow::Cow<'_, str>>>>()
        };
        let (account, key, kind) =
            (text(|r| &r.account), text(|r| &r.dedup_key), text(|r| &r.kind));
        let msg_type = opt(|r| r.msg_type.as_deref());
        let event = opt(|r| r.event.as_deref());
        let from = opt(|r| r.from_user.as_deref());
        let to = opt(|r| r.to_user.as_deref());
        let create_time = opt(|r| r.create_time.as_deref());
        let encrypted: Vec<bool> = sorted.iter().map(|r| r.encrypted).collect();
        let (xml, fields) = (text(|r| &r.xml), text(|r| &r.fields));
        let reply = opt(|r| r.reply.as_deref());
        let dead_letter: Vec<bool> = sorted.iter().map(|r| r.dead_letter).collect();
        let error = opt(|r| r.error.as_deref());
        let received: Vec<i64> = sorted.iter().map(|r| r.received_at_ms).collect();
        let status = text(|r| r.status.as_str());
        let stmt = if let Some(s) = self.prepared.get(INSERT_MANY) {
            s.clone()
        } else {
            let s = self.client()?.prepare(INSERT_MANY).map_err(|e| describe(&e))?;
            self.prepared.insert(INSERT_MANY, s.clone());
            s
        };
        let rows = self
            .client()?
            .query(
                &stmt,
                &[
                    &account,
                    &key,
                    &kind,
                    &msg_type,
                    &event,
                    &from,
                    &to,
                    &create_time,
                    &encrypted,
                    &xml,
                    &fields,
                    &reply,
                    &dead_letter,
                    &error,
                    &received,
                    &status,
                ],
            )
            .map_err(|e| self.failed(&e))?;
        let mut inserted: std::collections::HashSet<(String, String)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        // A key twice in one batch: its first push is the one inserted.
        Ok(records
            .iter()
            .map(|r| {
                let stored = (pg_text(&r.account).into_owned(), pg_text(&r.dedup_key).into_owned());
                inserted.remove(&stored)
            })
            .collect())
    }
}

/// PostgreSQL's text cannot hold NUL (U+0000), which SQLite keeps and a push may carry
/// inside CDATA: it is stored as U+FFFD, so that the push is kept rather than refused.
fn pg_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') { s.replace('\0', "\u{FFFD}").into() } else { s.into() }
}

/// `?N` → `$N`, PostgreSQL's parameter marks.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// An error with its causes: the driver's own message is short ("db error"), what went
/// wrong ("database \"x\" does not exist", "Connection refused") is in its sources.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

/// A parameter converted to the type PostgreSQL inferred for its place.
#[derive(Debug)]
enum PgParam {
    Null,
    I8(i64),
    I4(i32),
    T(String),
    B(bool),
}

impl PgParam {
    fn of(v: &V<'_>, ty: &postgres::types::Type) -> PgParam {
        use postgres::types::Type;
        match *v {
            V::Null => PgParam::Null,
            V::I(n) if *ty == Type::INT4 => PgParam::I4(n as i32),
            V::I(n) if *ty == Type::BOOL => PgParam::B(n != 0),
            V::I(n) if *ty == Type::TEXT || *ty == Type::VARCHAR => PgParam::T(n.to_string()),
            V::I(n) => PgParam::I8(n),
            V::B(b) if *ty == Type::INT8 => PgParam::I8(i64::from(b)),
            V::B(b) => PgParam::B(b),
            V::T(t) => PgParam::T(pg_text(t).into_owned()),
        }
    }
}

impl postgres::types::ToSql for PgParam {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            PgParam::Null => Ok(postgres::types::IsNull::Yes),
            PgParam::I8(n) => n.to_sql(ty, out),
            PgParam::I4(n) => n.to_sql(ty, out),
            PgParam::T(t) => t.to_sql(ty, out),
            PgParam::B(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// Every push of a batch in one statement: one round trip instead of one per push.
const INSERT_MANY: &str =
    "INSERT INTO pushes (account, dedup_key, kind, msg_type, event, from_user, to_user,
        create_time, encrypted, xml, fields, reply, dead_letter, error, received_at, status)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::text[], $8::text[], $9::bool[], $10::text[], $11::text[], $12::text[], $13::bool[],
        $14::text[], $15::int8[], $16::text[])
    ON CONFLICT (account, dedup_key) DO NOTHING
    RETURNING account, dedup_key";

impl Db for Postgres {
    fn refused_a_record(&self, error: &str) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed()) && !error.contains("timeout")
    }

    fn insert_pushes(&mut self, records: &[&NewRecord]) -> Option<Result<Vec<bool>, String>> {
        Some(self.insert_many(records))
    }

    fn begin(&mut self) -> Result<(), String> {
        self.client()?;
        if std::mem::take(&mut self.check_schema)
            && let Err(e) = self.migrate()
        {
            self.check_schema = true;
            return Err(e);
        }
        let begun = self.client()?.batch_execute("BEGIN");
        self.in_tx = begun.is_ok();
        begun.map_err(|e| self.failed(&e))
    }

    fn commit(&mut self) -> Result<(), String> {
        self.in_tx = false;
        let committed = self.client()?.batch_execute("COMMIT");
        committed.map_err(|e| self.failed(&e))
    }

    fn rollback(&mut self) {
        if std::mem::take(&mut self.in_tx)
            && let Some(c) = self.client.as_mut().filter(|c| !c.is_closed())
        {
            let _ = c.batch_execute("ROLLBACK");
        }
    }

    fn exec(&mut self, sql: Sql, params: &[V<'_>]) -> Result<usize, String> {
        self.run(sql, params, |c, s, p| c.execute(s, p)).map(|n| n as usize)
    }

    fn query(&mut self, sql: Sql, params: &[V<'_>]) -> Result<Vec<Vec<Val>>, String> {
        use postgres::types::Type;
        let rows = self.run(sql, params, |c, s, p| c.query(s, p))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = Vec::with_capacity(row.len());
            for (i, col) in row.columns().iter().enumerate() {
                let ty = col.type_();
                let v = if *ty == Type::INT8 {
                    row.try_get::<_, Option<i64>>(i).map(|v| v.map_or(Val::Null, Val::I))
                } else if *ty == Type::INT4 {
                    row.try_get::<_, Option<i32>>(i)
                        .map(|v| v.map_or(Val::Null, |n| Val::I(n.into())))
                } else if *ty == Type::INT2 {
                    row.try_get::<_, Option<i16>>(i)
                        .map(|v| v.map_or(Val::Null, |n| Val::I(n.into())))
                } else if *ty == Type::BOOL {
                    row.try_get::<_, Option<bool>>(i).map(|v| v.map_or(Val::Null, Val::B))
                } else {
                    row.try_get::<_, Option<String>>(i).map(|v| v.map_or(Val::Null, Val::T))
                };
                values.push(v.map_err(|e| format!("column {}: {}", col.name(), describe(&e)))?);
            }
            out.push(values);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered_for_postgres() {
        assert_eq!(numbered("a = ?1 AND b = ?12 OR c = '?'"), "a = $1 AND b = $12 OR c = '?'");
    }

    #[test]
    fn passwords_never_show() {
        let at = Location::Postgres("postgres://u:S3cr/et@h:5432/db".into());
        assert_eq!(at.display(), "postgres://h:5432/db");
    }
}
