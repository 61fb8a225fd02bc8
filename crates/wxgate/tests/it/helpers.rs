//! Shared test plumbing: a real `wxgate serve` process on a free loopback port with its
//! own config and data folder, a raw HTTP/1.1 client that sends requests byte for byte
//! (verbatim query strings, chosen headers, chunked bodies), and store access.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TOKEN: &str = "qaHeldoutTok2024";
pub const APP_ID: &str = "wx7c1f0e2a9b3d4e5f";
pub const AES_KEY: &str = "Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ";
pub const GH: &str = "gh_3a9f1c2b7d10";

/// WeChat's side of the shared test account.
pub fn wechat() -> wxgate::sim::Account {
    wxgate::sim::Account {
        token: TOKEN.into(),
        app_id: APP_ID.into(),
        aes_key: Some(wxgate_protocol::EncodingAesKey::parse(AES_KEY).unwrap()),
        original_id: GH.into(),
    }
}

/// A running `wxgate serve`, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: mpsc::Receiver<String>,
    /// Lines logged up to "listening on".
    pub startup: Vec<String>,
}

/// An account block with the shared test identity and the given extra lines.
pub fn account_toml(path: &str, extra: &str) -> String {
    format!(
        "[[accounts]]\nname = \"test\"\npath = \"{path}\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
         encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\n{extra}\n"
    )
}

impl Server {
    /// Starts the binary with this config text (its `data_dir` is forced into a temp dir).
    pub fn start(config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wxgate.toml");
        std::fs::write(&path, format!("data_dir = \"data\"\n{config}")).unwrap();
        Server::start_at(dir, path)
    }

    /// Starts the binary on an existing config file inside `dir`.
    pub fn start_at(dir: tempfile::TempDir, config: PathBuf) -> Server {
        Server::start_on(dir, config, 0)
    }

    /// The same on a given port (0 picks a free one).
    pub fn start_on(dir: tempfile::TempDir, config: PathBuf, port: u16) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wxgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut startup = Vec::new();
        let port = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("server did not start");
            startup.push(line.clone());
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.trim().rsplit(':').next().unwrap().parse().unwrap();
            }
        };
        Server { child, port, dir, config, log: rx, startup }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every record in the store, as `wxgate events` prints them.
    pub fn records(&self) -> Vec<Value> {
        let at = wxgate::Config::load(&self.config).unwrap().store_location();
        // PostgreSQL's blocking client may not run inside a test's runtime.
        let rows = std::thread::scope(|s| {
            s.spawn(|| wxgate::store::read_all(at, None).unwrap()).join().unwrap()
        });
        rows.iter().map(wxgate::events::to_json).collect()
    }

    /// Log lines printed so far (and not returned before).
    pub fn logs(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Waits for a log line containing `needle` (info lines are written out in batches,
    /// a few milliseconds apart) and returns every line printed so far.
    pub async fn logs_with(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        eventually(&format!("a log line with {needle:?}"), || {
            seen.extend(self.logs());
            seen.iter().any(|l| l.contains(needle))
        })
        .await;
        seen
    }

    /// Stops the process (SIGKILL) and returns its folder, e.g. to restart on it.
    pub fn kill(mut self) -> (tempfile::TempDir, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.config.clone())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer read off the socket.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// How to send a body.
pub enum Body<'a> {
    None,
    Fixed(&'a [u8]),
    /// Chunked transfer encoding, no Content-Length.
    Chunked(&'a [u8]),
}

/// Sends one request on a fresh connection and reads the whole answer.
pub fn request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Body::None => head.push_str("\r\n"),
        Body::Fixed(b) => head.push_str(&format!("Content-Length: {}\r\n\r\n", b.len())),
        Body::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n\r\n"),
    }
    s.write_all(head.as_bytes())?;
    // A server may answer (413, 403) before the body is sent; keep writing as a real
    // client would, but a refused write is not an error here: the answer is.
    let _ = match body {
        Body::None => Ok(()),
        Body::Fixed(b) => s.write_all(b),
        Body::Chunked(b) => (|| {
            for chunk in b.chunks(64 * 1024) {
                s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                s.write_all(chunk)?;
                s.write_all(b"\r\n")?;
            }
            s.write_all(b"0\r\n\r\n")
        })(),
    };
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let split =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not utf-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Ok(Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = b.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(std::str::from_utf8(&b[..pos]).unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if len == 0 {
            break;
        }
        out.extend_from_slice(&b[pos + 2..pos + 2 + len]);
        b = &b[pos + 4 + len..];
    }
    out
}

/// POSTs an XML body with `text/xml`.
pub fn post(addr: &str, target: &str, body: &str) -> Response {
    request(addr, "POST", target, &[("Content-Type", "text/xml")], Body::Fixed(body.as_bytes()))
        .unwrap()
}

/// The value at a dotted path such as `SendPicsInfo.PicMd5Sums`, `A.List.length` or
/// `A.List[0].Url`.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<Value> {
    let mut cur: &'a Value = v;
    for part in path.split('.') {
        if part == "length" {
            return cur.as_array().map(|a| Value::from(a.len()));
        }
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        cur = cur.get(name)?;
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur.clone())
}

/// Equality where a number on either side matches a string holding the same number.
pub fn same(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s)) => {
            s.trim().parse::<f64>().ok() == n.as_f64()
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        _ => got == want,
    }
}

/// Waits until `check` holds, looking every 20 ms; fails after 15 s (a bound that only
/// catches a hang).
/// Waits (up to 20 s) until `arrived` holds for every key; fails naming how many never did.
pub async fn every_forward_arrives(keys: &[&String], arrived: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let missing: Vec<_> = keys.iter().filter(|k| !arrived(k.as_str())).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} forwards never arrived, e.g. {:?}",
            missing.len(),
            missing[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
