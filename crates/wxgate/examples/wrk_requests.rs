//! Writes distinct, signed (and in safe mode encrypted) pushes for the wrk load
//! benchmark: one request per line, `PATH?QUERY<TAB>BODY`, bodies on one line.
//!
//! `cargo run --release --example wrk_requests -- plain|safe COUNT [FIRST] > requests.tsv`
//! (FIRST numbers the pushes from there, so that two files hold different pushes).

use wxgate::sim::{Account, Mode, compose};
use wxgate_protocol::EncodingAesKey;

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = match args.next().as_deref() {
        Some("safe") => Mode::Safe,
        _ => Mode::Plain,
    };
    let count: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let first: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let wechat = Account {
        token: "qaHeldoutTok2024".into(),
        app_id: "wx7c1f0e2a9b3d4e5f".into(),
        aes_key: Some(
            EncodingAesKey::parse("Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ").unwrap(),
        ),
        original_id: "gh_3a9f1c2b7d10".into(),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for n in first..first + count {
        let follower = format!("oBenchFollower{:014}", n % 50_000);
        // Plaintext: a text message answered by a text reply. Safe: a QR-scene subscribe
        // answered by an encrypted text reply. Every push distinct.
        let push = match mode {
            Mode::Plain => compose::text(
                "gh_3a9f1c2b7d10",
                &follower,
                1_733_300_000 + n / 50_000,
                &format!("bench message {n}"),
                10_000_000_000 + n,
            ),
            _ => compose::event(
                "gh_3a9f1c2b7d10",
                &follower,
                1_733_300_000 + n / 50_000,
                "subscribe",
                &[("EventKey", "qrscene_spring_poster"), ("Ticket", "T")],
            ),
        };
        let d = wechat.deliver_at(&push, mode, "1733300000", &n.to_string());
        use std::io::Write;
        let _ = writeln!(out, "/wechat?{}\t{}", d.query, d.body.replace('\n', ""));
    }
}
