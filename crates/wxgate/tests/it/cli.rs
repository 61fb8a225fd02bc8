//! The `wxgate` command line as a user meets it: exit codes, refused flags and URLs,
//! messages that name what is wrong, pipes that close early, and repeated runs that are
//! new pushes rather than retries.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{AES_KEY, Server, TOKEN};

/// Runs the binary to completion.
fn wxgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run wxgate")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server with the accounts of the shipped demo config (at `/wechat`).
fn demo_server() -> Server {
    let shipped = include_str!("../../../../wxgate.toml");
    Server::start(
        &shipped
            .split("[[accounts]]")
            .skip(1)
            .map(|a| format!("[[accounts]]{a}"))
            .collect::<String>(),
    )
}

/// A local port nobody listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn exit_codes_tell_bad_input_service_errors_and_failed_expectations_apart() {
    let server = demo_server();
    let url = server.url("/wechat");
    let dir = server.dir.path();

    // 1: bad input, named.
    let out = wxgate(&[
        "sim",
        "push",
        "--url",
        &url,
        "--token",
        TOKEN,
        "--mode",
        "safe",
        "text",
        "--content",
        "hi",
    ]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("--aes-key"), "{}", stderr(&out));
    let bad_kind =
        write(dir, "bad_kind.toml", "[[steps]]\nfollower = \"a\"\npush = \"fly --to moon\"\n");
    let out = wxgate(&["sim", "scenario", &bad_kind, "--url", &url, "--token", TOKEN]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with(&format!("error: {bad_kind}: steps[0].push: ")), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(!err.contains("Usage"), "{err}");
    let contradiction = write(
        dir,
        "contradiction.toml",
        "[[steps]]\nfollower = \"a\"\npush = \"click --key K\"\nexpect_nothing = true\nexpect_text = \"x\"\n",
    );
    let out = wxgate(&["sim", "scenario", &contradiction, "--url", &url, "--token", TOKEN]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("steps[0]: expect_nothing"), "{}", stderr(&out));
    let toml_error = write(
        dir,
        "typo.toml",
        "[[steps]]\nfollower = \"a\"\npush = \"click --key K\"\nexpect_txt = \"x\"\n",
    );
    let out = wxgate(&["sim", "scenario", &toml_error, "--url", &url, "--token", TOKEN]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).starts_with(&format!(
            "error: {toml_error}: line 4, column 1: unknown field `expect_txt`"
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim_end().lines().count(), 1);
    assert!(server.records().is_empty(), "nothing is sent on bad input");

    // 2: a usage error, from the argument parser.
    let out = wxgate(&["sim", "push", "--url", &url, "--token", TOKEN, "fly"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));

    // 3: the follower would see the service error; the refusal's body is shown.
    let out = wxgate(&[
        "sim",
        "push",
        "--url",
        &url,
        "--token",
        "not-the-token",
        "text",
        "--content",
        "hi",
    ]);
    assert_eq!(code(&out), 3, "{}", stdout(&out));
    assert!(stdout(&out).contains("delivery 1: HTTP 403 \""), "{}", stdout(&out));
    assert!(stdout(&out).contains("该公众号暂时无法提供服务"), "{}", stdout(&out));

    // 4: a scenario step not as expected, saying what came instead.
    let scenario = write(
        dir,
        "expect.toml",
        "[[followers]]\nname = \"alice\"\n[[followers]]\nname = \"bob\"\n\
         [[steps]]\nfollower = \"alice\"\npush = \"text --content hi\"\nexpect_text = \"hi\"\n\
         [[steps]]\nfollower = \"bob\"\npush = \"text --content hi\"\nexpect_text = \"bye\"\n",
    );
    let out = wxgate(&["sim", "scenario", &scenario, "--url", &url, "--token", TOKEN]);
    assert_eq!(code(&out), 4, "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("expected the text \"bye\", got \"hi\""), "{text}");
    assert!(
        text.contains("alice: text --content hi") && text.contains("bob: text --content hi"),
        "steps name their follower: {text}"
    );
    assert!(text.contains("1 of 2 steps as expected"), "{text}");

    // 0, and check-config names the file on error.
    let out = wxgate(&["sim", "push", "--url", &url, "--token", TOKEN, "click", "--key", "MENU_A"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let bad_config = write(
        dir,
        "bad_config.toml",
        &crate::helpers::account_toml("/x", "").replace(AES_KEY, "short"),
    );
    let out = wxgate(&["check-config", "--config", &bad_config]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).starts_with(&format!("error: {bad_config}: accounts[0].encoding_aes_key")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn urls_must_be_plain_http_and_connection_errors_show_their_cause() {
    let out =
        wxgate(&["sim", "push", "--url", "127.0.0.1:8080/wechat", "--token", TOKEN, "unsubscribe"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("--url") && stderr(&out).contains("http://"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "nothing sent: {}", stdout(&out));

    let out =
        wxgate(&["sim", "journey", "--url", "https://wx.example.com/wechat", "--token", TOKEN]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains("--url")
            && err.contains("not supported")
            && err.contains("http://127.0.0.1:8080/wechat"),
        "{err}"
    );

    let url = format!("http://127.0.0.1:{}/wechat", closed_port());
    let out =
        wxgate(&["sim", "push", "--url", &url, "--token", TOKEN, "--attempts", "2", "unsubscribe"]);
    assert_eq!(code(&out), 3);
    let text = stdout(&out).to_lowercase();
    assert!(text.contains("connection refused"), "{text}");
    assert!(!text.contains("client error (connect)"), "{text}");
}

#[test]
fn load_refuses_bad_flags_and_sends_rate_times_duration() {
    let server = Server::start(&crate::helpers::account_toml("/wx", ""));
    let url = server.url("/wx");
    for (flags, named) in [
        (&["--rate", "0"][..], "--rate"),
        (&["--rate", "-5"], "--rate"),
        (&["--duration", "0"], "--duration"),
        (&["--duration=-1"], "--duration"),
        (&["--retry-ratio", "1.5"], "--retry-ratio"),
        (&["--retry-ratio=-0.1"], "--retry-ratio"),
        (&["--followers", "0"], "--followers"),
        (&["--concurrency", "0"], "--concurrency"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .args(["sim", "load", "--url", &url, "--token", TOKEN])
            .args(flags)
            .output()
            .unwrap();
        assert_eq!(code(&out), 1, "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{flags:?}: {}", stderr(&out));
    }
    assert!(server.records().is_empty());

    let out = wxgate(&[
        "sim",
        "load",
        "--url",
        &url,
        "--token",
        TOKEN,
        "--aes-key",
        AES_KEY,
        "--rate",
        "40",
        "--duration",
        "1.5",
        "--followers",
        "7",
    ]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("pushes sent:     60\n"), "{}", stdout(&out));
    assert_eq!(server.records().len(), 60);
    assert!(!stderr(&out).contains('\r'), "no progress bar when stderr is not a terminal");
}

#[test]
fn events_piped_into_a_reader_that_stops_early_ends_cleanly() {
    let server = Server::start(&crate::helpers::account_toml("/wx", ""));
    // Enough records that their JSON overflows a pipe's buffer.
    let out = wxgate(&[
        "sim",
        "load",
        "--url",
        &server.url("/wx"),
        "--token",
        TOKEN,
        "--rate",
        "400",
        "--duration",
        "1",
    ]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(server.records().iter().map(|r| r.to_string().len() + 1).sum::<usize>() > 128 * 1024);

    let config = server.config.to_string_lossy().into_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["events", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader is dropped here, like `head -1` exiting.
    let line: Value = serde_json::from_str(&first).unwrap();
    assert!(line["dedup_key"].is_string());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}: {}", out.status, stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn two_journeys_in_a_row_are_both_handled_and_replay_is_answered_from_the_record() {
    let server = demo_server();
    let url = server.url("/wechat");
    for _ in 0..2 {
        let out =
            wxgate(&["sim", "journey", "--url", &url, "--token", TOKEN, "--aes-key", AES_KEY]);
        assert_eq!(code(&out), 0, "{}", stdout(&out));
        assert!(stdout(&out).contains("11 of 11 steps as expected"), "{}", stdout(&out));
    }
    let records = server.records();
    assert_eq!(records.len(), 22, "two runs are 22 pushes, not 11 retried");
    assert!(records.iter().all(|r| r["deliveries"] == 1));
    let mut followers: Vec<&str> =
        records.iter().map(|r| r["FromUserName"].as_str().unwrap()).collect();
    followers.dedup();
    assert_eq!(followers.len(), 2, "{followers:?}");
    for f in &followers {
        assert_eq!(f.len(), 28);
        assert!(f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{f}");
    }

    // Sent again to the server that recorded them, they are retries: answered, not recorded twice.
    let file = server.dir.path().join("events.jsonl");
    std::fs::write(&file, records.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let out = wxgate(&[
        "sim",
        "replay",
        &file.to_string_lossy(),
        "--url",
        &url,
        "--token",
        TOKEN,
        "--aes-key",
        AES_KEY,
    ]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("[  1] subscribe_event qrscene_spring_poster -> text: \"Welcome, you came from the spring_poster poster\" (1 delivery, "), "{text}");
    assert!(text.trim_end().ends_with("22 of 22 pushes answered"), "{text}");
    assert_eq!(server.records().len(), 22);
}

#[test]
fn serve_names_the_address_it_cannot_listen_on_and_takes_host_names() {
    let server = demo_server();
    let config = server.config.to_string_lossy().into_owned();
    let taken = server.addr();
    let out = wxgate(&["serve", "--config", &config, "--listen", &taken]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains(&format!("cannot listen on {taken}: ")), "{}", stderr(&out));

    let out = wxgate(&["serve", "--config", &config, "--listen", "localhost"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));

    let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["serve", "--config", &config, "--listen", "localhost:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let started = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("listening on http://") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "localhost:0 did not start: {seen:?}");
}
