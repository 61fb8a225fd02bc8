//! Regressions from attacking the server: each test is one kind of fault, exercised in
//! every mode and field where it applies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use wxgate::sim::{Mode, Seen, compose};

use crate::helpers::{APP_ID, Body, GH, Server, account_toml, post, request, wechat};

const RULES: &str = "[[accounts.rules]]\nwhen = { event = \"SCAN\" }\nreply = { text = \"scene {scene} from {from}\" }\n\
                     [[accounts.rules]]\nwhen = { msg_type = \"text\" }\nreply = { text = \"{content}\" }\n";

fn send(server: &Server, push: &str, mode: Mode) -> Seen {
    let d = wechat().deliver(push, mode);
    let r = post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
    wechat().judge(push, mode, r.status, &r.body)
}

#[test]
fn a_control_character_inside_a_cdata_end_never_breaks_a_reply() {
    let server = Server::start(&account_toml("/wx", RULES));
    let mut n = 0;
    for hostile in ["a]]\u{1}>b", "]]\u{1d}>", "x]\u{2}]>y", "]]\u{0}>"] {
        for mode in [Mode::Plain, Mode::Compatible, Mode::Safe] {
            n += 1;
            // In the echoed content, in a templated scene, and in the follower's id.
            let text = compose::text(GH, "oHostile", 1_733_330_000 + n, hostile, 900 + n);
            let scan =
                compose::event(GH, "oHostile", 1_733_330_000 + n, "SCAN", &[("EventKey", hostile)]);
            let from = compose::text(GH, &format!("o{hostile}"), 1_733_330_000 + n, "hi", 950 + n);
            for push in [&text, &scan, &from] {
                let seen = send(&server, push, mode);
                assert!(matches!(seen, Seen::Reply { .. }), "{mode:?} {push:?}: {seen:?}");
            }
        }
    }
    // The stored replies are well-formed too.
    for r in server.records() {
        wxgate_protocol::xml::parse_strict(r["reply"].as_str().unwrap()).unwrap();
    }
}

#[test]
fn request_text_never_reaches_the_log_and_cannot_forge_lines() {
    let server = Server::start(&account_toml("/wx", RULES));
    let secret = compose::text(GH, "oLog", 1_733_331_000, "x", 1)
        .replace("<![CDATA[x]]>", "&card 4111-1111 password hunter2;");
    let forged = compose::text(GH, "oLog", 1_733_331_001, "x", 2).replace(
        "<![CDATA[x]]>",
        "&a\n2026-01-01T00:00:00Z  INFO wxgate::http: push account=demo fake=1;",
    );
    for (push, mode) in [(&secret, Mode::Safe), (&secret, Mode::Plain), (&forged, Mode::Plain)] {
        let d = wechat().deliver(push, mode);
        let r = post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
        assert_eq!(r.status, 400);
        assert!(
            !r.body.contains("hunter2") && !r.body.contains('\n') || r.body.lines().count() == 1,
            "{:?}",
            r.body
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let logs = server.logs().join("\n");
    assert!(!logs.contains("hunter2") && !logs.contains("4111"), "{logs}");
    assert!(!logs.contains("fake=1"), "a forged line: {logs}");
}

#[test]
fn query_values_that_are_not_utf8_are_refused_not_replaced() {
    let server = Server::start(&account_toml("/wx", RULES));
    let push = compose::text(GH, "oQuery", 1, "x", 1);
    let d = wechat().deliver_at(&push, Mode::Plain, "1733300000", "%FF");
    let r = post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(server.records().is_empty());
}

#[test]
fn an_authentic_envelope_around_bytes_that_are_not_text_is_a_dead_letter() {
    let server = Server::start(&account_toml("/wx", RULES));
    let key = wechat().aes_key.unwrap();
    // Seal the bytes by hand: the simulator only seals text.
    let mut bytes = vec![0u8; 16];
    let msg = b"<xml>\xff\xfe</xml>";
    bytes.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    bytes.extend_from_slice(msg);
    bytes.extend_from_slice(APP_ID.as_bytes());
    let pad = 32 - bytes.len() % 32;
    bytes.extend(std::iter::repeat_n(pad as u8, pad));
    let encrypt = {
        use aes::cipher::{Array, BlockModeEncrypt, KeyIvInit};
        use base64::Engine;
        let iv: [u8; 16] = key.as_bytes()[..16].try_into().unwrap();
        let mut c =
            cbc::Encryptor::<aes::Aes256>::new(&Array::from(*key.as_bytes()), &Array::from(iv));
        let (blocks, _) = Array::slice_as_chunks_mut(&mut bytes);
        c.encrypt_blocks(blocks);
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    };
    let d = wechat().deliver_encrypt(&encrypt, "1733300000", "5");
    let r = post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
    assert_eq!((r.status, r.body.as_str()), (200, "success"));
    let records = server.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["dead_letter"], true);
    assert!(records[0]["error"].as_str().unwrap().contains("utf-8"));
}

fn limits() -> String {
    format!("[http]\nheader_timeout_ms = 300\ndrain_ms = 500\n{}", account_toml("/wx", RULES))
}

#[test]
fn a_connection_that_never_finishes_its_headers_is_closed() {
    let server = Server::start(&limits());
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    slow.write_all(b"POST /wx HTTP/1.1\r\nHost: x\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after the header timeout, not left open"
    );

    // An idle keep-alive connection is closed the same way.
    let mut idle = TcpStream::connect(server.addr()).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut all = Vec::new();
    let _ = idle.read_to_end(&mut all);
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Meanwhile a real push is served.
    let r = request(&server.addr(), "GET", "/healthz", &[], Body::None).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn sigterm_is_not_held_off_by_a_half_sent_request() {
    let server =
        Server::start(&limits().replace("header_timeout_ms = 300", "header_timeout_ms = 60000"));
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    slow.write_all(b"POST /wx HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(100))
            && line.contains("stopped")
        {
            break;
        }
        assert!(Instant::now() < deadline, "still running 10 s after SIGTERM");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "stopped within the drain time");
    drop(slow);
}

#[test]
fn allow_from_closes_connections_from_elsewhere() {
    let closed =
        Server::start(&format!("allow_from = [\"10.0.0.0/8\"]\n{}", account_toml("/wx", RULES)));
    assert!(
        request(&closed.addr(), "GET", "/healthz", &[], Body::None).is_err(),
        "127.0.0.1 is not in 10.0.0.0/8"
    );
    let open = Server::start(&format!(
        "allow_from = [\"10.0.0.0/8\", \"127.0.0.0/8\"]\n{}",
        account_toml("/wx", RULES)
    ));
    assert_eq!(request(&open.addr(), "GET", "/healthz", &[], Body::None).unwrap().status, 200);
}
