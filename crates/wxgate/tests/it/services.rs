//! The shared services the scale-out tests need: PostgreSQL, Redis and NATS JetStream on
//! loopback. A test asks with [`require`]; without the service it is skipped with a line
//! naming what is missing, except under `CI=true`, where a missing service fails it.
//! Addresses come from `WXGATE_TEST_POSTGRES`, `WXGATE_TEST_REDIS` and `WXGATE_TEST_NATS`
//! when set.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    Nats,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Postgres => "PostgreSQL",
            Service::Redis => "Redis",
            Service::Nats => "NATS",
        }
    }

    /// The URL the tests use for it.
    pub fn url(self) -> String {
        let (var, default) = match self {
            Service::Postgres => {
                ("WXGATE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
            }
            Service::Redis => ("WXGATE_TEST_REDIS", "redis://127.0.0.1:6379/"),
            Service::Nats => ("WXGATE_TEST_NATS", "nats://127.0.0.1:4222"),
        };
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    fn addr(self) -> Option<SocketAddr> {
        let url = self.url();
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let host = rest.split(['/', '?']).next()?;
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        host.to_socket_addrs().ok()?.next()
    }
}

/// Whether `service` answers on its port. Without it the test should return at once:
/// `if !services::require(Service::Redis) { return; }`.
pub fn require(service: Service) -> bool {
    let up = service
        .addr()
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok());
    if up {
        return true;
    }
    let message = format!("{} is not reachable at {}", service.name(), service.url());
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}; CI must start it (see .ci/run)");
    }
    eprintln!("skipped: {message}");
    false
}

/// Waits (up to 10 s) until a server this test started accepts connections on `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unique name for this test's private objects (database, stream, key prefix).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).unwrap();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        hex::encode(r)
    )
}

/// A new, empty PostgreSQL database, dropped when the guard goes.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        let name = unique("wxgate_t");
        admin(&format!("CREATE DATABASE {name}"));
        let base = Service::Postgres.url();
        let (server, _) = base.rsplit_once('/').expect("a database URL ends in /NAME");
        PgDatabase { url: format!("{server}/{name}"), name }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        admin(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// Runs SQL on the test server. PostgreSQL's blocking client runs a runtime of its own,
/// so it works on a thread of its own (tests call this from inside Tokio).
pub fn admin(sql: &str) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut client = postgres::Client::connect(&Service::Postgres.url(), postgres::NoTls)
                .expect("connect to PostgreSQL");
            client.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    });
}

/// A PostgreSQL server of the test's own, on a spare port, for tests that stop and start
/// the database; the shared one stays up. Stopped and deleted on drop.
pub struct PrivatePostgres {
    pub url: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Creates and starts one; `None` (with a line saying why) where PostgreSQL's
    /// programs are not installed, a failure under `CI=true`.
    pub fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|versions| {
            versions
                .filter_map(Result::ok)
                .map(|v| v.path().join("bin"))
                .find(|b| b.join("initdb").exists())
        });
        let Some(bin) = bin else {
            let message = "PostgreSQL's programs (initdb, pg_ctl) are not installed";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{message}");
            }
            eprintln!("skipped: {message}");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // PostgreSQL will not run as root: as root, its files and processes belong to
        // the `postgres` user.
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()));
        }
        run(as_owner(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        let pg = PrivatePostgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            port,
        };
        pg.up();
        Some(pg)
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        run(as_owner(&self.bin.join("pg_ctl"))
            .args(["-w", "-t", "30", "-o", &options, "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("start"));
    }

    /// Freezes (`STOP`) or thaws (`CONT`) every process of the server: a database that
    /// stops answering without closing its connections.
    pub fn signal_all(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_owned();
        let children = Command::new("pgrep").args(["-P", &pid]).output().unwrap();
        let mut pids = vec![pid];
        pids.extend(
            String::from_utf8_lossy(&children.stdout).split_whitespace().map(str::to_owned),
        );
        for p in pids {
            let _ = Command::new("kill").args([&format!("-{signal}"), &p]).status();
        }
    }

    /// Stops the server at once, as a crash would.
    pub fn down(&self) {
        run(as_owner(&self.bin.join("pg_ctl"))
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop"));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.signal_all("CONT");
        let _ = as_owner(&self.bin.join("pg_ctl"))
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn as_owner(program: &std::path::Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
