//! Bad and hostile input against a real server: each gets its status and costs nothing,
//! nothing of it is stored, and the server keeps serving. Authentic pushes we cannot
//! understand are kept as dead letters instead.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wxgate::sim::{self, Mode, Seen, compose};
use wxgate_protocol::EncodingAesKey;

use crate::helpers::{
    AES_KEY, APP_ID, Body, GH, Server, TOKEN, account_toml, post, request, wechat,
};

// Every signature below comes from the simulator; tests never sign by hand.

const USER: &str = "oBadInputUser000000000000001";
const ECHO: &str =
    "[[accounts.rules]]\nwhen = { msg_type = \"text\" }\nreply = { text = \"{content}\" }\n";

fn echo_server() -> Server {
    Server::start(&account_toml("/wx", ECHO))
}

fn signed(push: &str, mode: Mode) -> String {
    let d = wechat().deliver_at(push, mode, "1733300000", "42");
    format!("/wx?{}#{}", d.query, d.body)
}

fn send(server: &Server, push: &str, mode: Mode) -> crate::helpers::Response {
    let d = wechat().deliver_at(push, mode, "1733300000", &rand_nonce());
    post(&server.addr(), &format!("/wx?{}", d.query), &d.body)
}

fn rand_nonce() -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    u32::from_le_bytes(b).to_string()
}

fn still_serves(server: &Server) {
    let push = compose::text(GH, USER, 1_733_300_500, "still here", rand_nonce().parse().unwrap());
    let resp = send(server, &push, Mode::Safe);
    assert_eq!(
        wechat().judge(&push, Mode::Safe, resp.status, &resp.body).text(),
        Some("still here")
    );
}

/// A valid plaintext query (signature, timestamp, nonce) from the simulator.
fn plain_query() -> String {
    let q = wechat().deliver_at("<xml/>", Mode::Plain, "1733300000", "42").query;
    q.split("&openid").next().unwrap().to_owned()
}

#[test]
fn oversized_bodies_get_413_declared_or_chunked() {
    let server = echo_server();
    let big = vec![b'A'; 8 << 20];
    let target = format!("/wx?{}", plain_query());
    let r = request(&server.addr(), "POST", &target, &[], Body::Fixed(&big)).unwrap();
    assert_eq!(r.status, 413);
    let r = request(&server.addr(), "POST", &target, &[], Body::Chunked(&big)).unwrap();
    assert_eq!(r.status, 413);
    assert!(server.records().is_empty());
    still_serves(&server);
}

#[test]
fn a_bad_signature_is_refused_before_the_body_is_read() {
    let server = echo_server();
    // Declare a body and never send it: the answer must come anyway.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST /wx?signature=0000&timestamp=1&nonce=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"));
}

#[test]
fn missing_or_wrong_parameters_are_refused() {
    let server = echo_server();
    let push = compose::text(GH, USER, 1, "x", 1);
    let q = plain_query();
    let sig = q.strip_prefix("signature=").unwrap().split('&').next().unwrap().to_owned();
    for target in [
        "/wx".to_owned(),
        format!("/wx?signature={sig}&timestamp=1733300000"),
        format!("/wx?signature={sig}&nonce=42"),
        "/wx?timestamp=1733300000&nonce=42".to_string(),
        format!("/wx?signature={sig}&timestamp=1733300001&nonce=42"),
        // Encrypted without msg_signature.
        format!("/wx?{}&encrypt_type=aes", plain_query()),
    ] {
        let r = post(&server.addr(), &target, &push);
        assert_eq!(r.status, 403, "{target}");
    }
    let r = post(&server.addr(), &format!("/wx?{}&encrypt_type=rot13", plain_query()), &push);
    assert_eq!(r.status, 400);
    assert!(server.records().is_empty());
}

#[test]
fn non_xml_doctype_and_entities_get_400_and_nothing_is_stored() {
    let server = echo_server();
    let target = format!("/wx?{}", plain_query());
    let bodies = [
        "".to_owned(),
        "hello".to_owned(),
        "{\"MsgType\":\"text\"}".to_owned(),
        "<xml><ToUserName>a</ToUserName>".to_owned(),
        "<!DOCTYPE xml [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;\">]><xml><Content>&b;</Content></xml>".to_owned(),
        "<xml><Content>&undeclared;</Content></xml>".to_owned(),
        format!("<xml>{}</xml>", "<a>".repeat(200) + &"</a>".repeat(200)),
    ];
    for body in &bodies {
        let r =
            request(&server.addr(), "POST", &target, &[], Body::Fixed(body.as_bytes())).unwrap();
        assert_eq!(r.status, 400, "{body:.60}");
    }
    let r =
        request(&server.addr(), "POST", &target, &[], Body::Fixed(&[0xff, 0xfe, b'<'])).unwrap();
    assert_eq!(r.status, 400);
    assert!(server.records().is_empty());
    still_serves(&server);
}

#[test]
fn broken_envelopes_get_400_or_403() {
    let server = echo_server();
    let push = compose::text(GH, USER, 1_733_300_100, "secret", 77);
    let other_key = sim::Account {
        aes_key: Some(
            EncodingAesKey::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").unwrap(),
        ),
        ..wechat()
    };
    let d = other_key.deliver_at(&push, Mode::Safe, "1733300000", "1");
    assert_eq!(post(&server.addr(), &format!("/wx?{}", d.query), &d.body).status, 400);

    let wrong_app = sim::Account { app_id: "wx0000000000000000".into(), ..wechat() };
    let d = wrong_app.deliver_at(&push, Mode::Safe, "1733300000", "2");
    assert_eq!(post(&server.addr(), &format!("/wx?{}", d.query), &d.body).status, 400);

    // A valid query string with another body: msg_signature covers the envelope.
    let good = wechat().deliver_at(&push, Mode::Safe, "1733300000", "3");
    let other = wechat().deliver_at(
        &compose::text(GH, USER, 1, "forged", 78),
        Mode::Safe,
        "1733300000",
        "3",
    );
    assert_eq!(post(&server.addr(), &format!("/wx?{}", good.query), &other.body).status, 403);

    // No Encrypt element; Encrypt that is not base64.
    let r = post(
        &server.addr(),
        &format!("/wx?{}", good.query),
        "<xml><ToUserName>gh</ToUserName></xml>",
    );
    assert_eq!(r.status, 400);
    for garbage in
        ["not*base64", "AAAA", "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", &"A".repeat(100_000)]
    {
        let d = wechat().deliver_encrypt(garbage, "1733300000", "3");
        let r = post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
        assert_eq!(r.status, 400, "{garbage:.20}");
    }
    assert!(server.records().is_empty());
    still_serves(&server);
}

#[test]
fn authentic_pushes_we_cannot_understand_become_dead_letters() {
    let server = echo_server();
    // Decrypts fine, but the inner document is not a push.
    for inner in [
        "<xml><ToUserName>gh</ToUserName></xml>",
        "this is not xml at all",
        "<root><MsgType>text</MsgType></root>",
    ] {
        for _ in 0..2 {
            let r = send(&server, inner, Mode::Safe);
            assert_eq!((r.status, r.body.as_str()), (200, "success"), "{inner}");
        }
    }
    // Plaintext, well-formed but without MsgType.
    let r = send(&server, "<xml><FromUserName>o</FromUserName></xml>", Mode::Plain);
    assert_eq!((r.status, r.body.as_str()), (200, "success"));

    let records = server.records();
    assert_eq!(records.len(), 4, "retries of a dead letter are not stored twice");
    assert!(records.iter().all(|r| r["dead_letter"] == true && r["error"].is_string()));
    assert_eq!(records[1]["xml"], "this is not xml at all");
}

#[test]
fn unknown_types_are_kept_and_answered_success() {
    let server = echo_server();
    let msg = compose::header(GH, USER, 1_733_300_200, "hologram")
        + "<Beam><![CDATA[x]]></Beam><MsgId>9</MsgId></xml>";
    let evt = compose::event(GH, USER, 1_733_300_201, "teleport_finished", &[("Where", "Mars")]);
    for push in [&msg, &evt] {
        let r = send(&server, push, Mode::Plain);
        assert_eq!(r.body, "success");
    }
    let records = server.records();
    assert_eq!(records[0]["kind"], "unknown_message");
    assert_eq!(records[0]["Beam"], "x");
    assert_eq!(records[1]["kind"], "unknown_event");
    assert_eq!(records[1]["Where"], "Mars");
}

#[test]
fn collisions_that_are_not_retries_are_all_handled() {
    let server = echo_server();
    let t = 1_733_300_300;
    let pushes = [
        compose::text(GH, "oUserA", t, "a", 555),
        compose::text(GH, "oUserB", t, "b", 555),
        compose::event(
            GH,
            "oUserA",
            t,
            "LOCATION",
            &[("Latitude", "1.1"), ("Longitude", "2.2"), ("Precision", "3")],
        ),
        compose::event(
            GH,
            "oUserA",
            t,
            "LOCATION",
            &[("Latitude", "1.2"), ("Longitude", "2.2"), ("Precision", "3")],
        ),
        compose::event(GH, "oUserA", t, "CLICK", &[("EventKey", "A")]),
        compose::event(GH, "oUserA", t, "VIEW", &[("EventKey", "A")]),
    ];
    for p in &pushes {
        assert_eq!(send(&server, p, Mode::Plain).status, 200);
    }
    assert_eq!(server.records().len(), pushes.len());
}

#[test]
fn require_encryption_refuses_plaintext() {
    let server = Server::start(&account_toml("/wx", &format!("require_encryption = true\n{ECHO}")));
    let push = compose::text(GH, USER, 1_733_300_400, "hi", 1);
    assert_eq!(send(&server, &push, Mode::Plain).status, 403);
    assert_eq!(send(&server, &push, Mode::Compatible).status, 200);
    assert_eq!(server.records().len(), 1);
}

#[test]
fn the_timestamp_window_refuses_stale_requests() {
    let server = Server::start(
        &account_toml("/wx", ECHO)
            .replace("max_timestamp_skew_secs = 0", "max_timestamp_skew_secs = 300"),
    );
    let push = compose::text(GH, USER, 1_733_300_400, "hi", 1);
    assert_eq!(send(&server, &push, Mode::Safe).status, 403, "2024 timestamps are stale now");
    let d = wechat().deliver(&push, Mode::Safe);
    assert_eq!(post(&server.addr(), &format!("/wx?{}", d.query), &d.body).status, 200);
}

#[test]
fn previous_token_and_key_are_accepted_during_rotation() {
    let new_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
    let cfg = format!(
        "[[accounts]]\nname = \"r\"\npath = \"/wx\"\napp_id = \"{APP_ID}\"\ntoken = \"NewToken99\"\nprevious_token = \"{TOKEN}\"\n\
         encoding_aes_key = \"{new_key}\"\nprevious_encoding_aes_key = \"{AES_KEY}\"\nmax_timestamp_skew_secs = 0\n{ECHO}"
    );
    let server = Server::start(&cfg);
    let old = wechat();
    let new = sim::Account {
        token: "NewToken99".into(),
        aes_key: Some(EncodingAesKey::parse(new_key).unwrap()),
        ..wechat()
    };
    for (i, who) in [&old, &new].into_iter().enumerate() {
        let push = compose::text(GH, USER, 1_733_300_500, "rotate", 100 + i as u64);
        let d = who.deliver(&push, Mode::Safe);
        let r = post(&server.addr(), &format!("/wx?{}", d.query), &d.body);
        // The reply is sealed with the secrets that opened the push.
        assert_eq!(who.judge(&push, Mode::Safe, r.status, &r.body).text(), Some("rotate"));
    }
    let stranger = sim::Account { token: "Stranger1".into(), ..wechat() };
    let d = stranger.deliver(&compose::text(GH, USER, 1, "x", 1), Mode::Safe);
    assert_eq!(post(&server.addr(), &format!("/wx?{}", d.query), &d.body).status, 403);
}

#[test]
fn retries_are_recognised_after_a_restart() {
    let server = echo_server();
    let push = compose::text(GH, USER, 1_733_300_600, "before restart", 4242);
    let first = send(&server, &push, Mode::Safe);
    assert_eq!(
        wechat().judge(&push, Mode::Safe, first.status, &first.body).text(),
        Some("before restart")
    );
    let (dir, config) = server.kill();

    let server = Server::start_at(dir, config);
    let retry = send(&server, &push, Mode::Safe);
    assert_eq!(
        wechat().judge(&push, Mode::Safe, retry.status, &retry.body).text(),
        Some("before restart")
    );
    let records = server.records();
    assert_eq!(records.len(), 1);
}

#[test]
fn random_mutations_never_crash_the_server() {
    let mut server = echo_server();
    let base = compose::text(GH, USER, 1_733_300_700, "fuzz <&> ]]> 中", 1);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..300 {
        let mut bytes = base.clone().into_bytes();
        for _ in 0..(next() % 6 + 1) {
            let at = (next() as usize) % bytes.len();
            match next() % 3 {
                0 => bytes[at] = (next() % 256) as u8,
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, b"<>&]/![CDATA"[(next() % 12) as usize]),
            }
        }
        let mode = if i % 2 == 0 { Mode::Plain } else { Mode::Safe };
        let (query, body) = match (mode, String::from_utf8(bytes.clone())) {
            (Mode::Safe, Ok(text)) => {
                let d = wechat().deliver_at(&text, mode, "1733300000", &i.to_string());
                (d.query, d.body.into_bytes())
            }
            _ => (plain_query(), bytes),
        };
        let r = request(&server.addr(), "POST", &format!("/wx?{query}"), &[], Body::Fixed(&body))
            .unwrap();
        assert!(matches!(r.status, 200 | 400), "mutation {i} got {}: {}", r.status, r.body);
    }
    assert!(server.alive());
    still_serves(&server);
}

#[test]
fn signed_query_helper_matches_the_simulator() {
    // Keeps the helpers honest: the simulator's plaintext query verifies.
    let s = signed("<xml/>", Mode::Plain);
    assert!(s.contains(&plain_query()));
    assert!(matches!(wechat().judge("<xml/>", Mode::Plain, 200, "success"), Seen::Nothing));
}
