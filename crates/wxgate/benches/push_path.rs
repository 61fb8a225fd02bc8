//! The per-push work of the server without I/O: verify, decrypt, parse, match the rules,
//! render the reply, encrypt it, and build the record's field JSON. Run with
//! `cargo bench -p wxgate --bench push_path`; figures go to bench/RESULTS.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use wxgate::Config;
use wxgate::sim::{self, Mode, compose};
use wxgate_protocol::reply::{envelope, max_articles};
use wxgate_protocol::{EncodingAesKey, Push, signature, xml};

const CONFIG: &str = include_str!("../../../wxgate.toml");

fn per_push(c: &mut Criterion) {
    let config = Config::parse(CONFIG).unwrap();
    let account = &config.accounts[0];
    let token = account.tokens[0].expose().to_owned();
    let key = EncodingAesKey::parse("Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ").unwrap();
    let wechat = sim::Account {
        token: token.clone(),
        app_id: account.app_id.clone(),
        aes_key: Some(key.clone()),
        original_id: "gh_3a9f1c2b7d10".into(),
    };

    let text = compose::text(
        "gh_3a9f1c2b7d10",
        "oQAheld0utUserA0000000000001",
        1733300000,
        "hello 你好",
        24601000000000001,
    );
    let plain = wechat.deliver_at(&text, Mode::Plain, "1733300000", "1134486126");
    let subscribe = compose::event(
        "gh_3a9f1c2b7d10",
        "oQAheld0utUserA0000000000001",
        1733300000,
        "subscribe",
        &[("EventKey", "qrscene_spring_poster"), ("Ticket", "T")],
    );
    let safe = wechat.deliver_at(&subscribe, Mode::Safe, "1733300000", "1134486126");
    let safe_sig = safe.query.split("msg_signature=").nth(1).unwrap().to_owned();

    let mut g = c.benchmark_group("per_push");
    g.bench_function("plaintext_text_to_text_reply", |b| {
        b.iter(|| {
            assert!(!signature::verify("0", &[&token, "1733300000", "1134486126"]));
            let push = Push::parse(black_box(&plain.body)).unwrap();
            let _key = push.dedup_key();
            let wxgate::rules::Action::Reply(reply) = wxgate::rules::answer(&account.rules, &push)
            else {
                unreachable!()
            };
            let out = reply.to_xml(&push.from, &push.to, 1733300001, max_articles(&push)).unwrap();
            let fields = serde_json::Value::Object(wxgate::fields::of_push(&push)).to_string();
            black_box((out, fields))
        })
    });
    g.bench_function("safe_subscribe_to_encrypted_reply", |b| {
        b.iter(|| {
            let outer = xml::parse(black_box(&safe.body)).unwrap();
            let encrypt = outer.text_of("Encrypt").unwrap();
            assert!(signature::verify(&safe_sig, &[&token, "1733300000", "1134486126", encrypt]));
            let inner = key.open(encrypt, &account.app_id).unwrap();
            let push = Push::parse(&inner).unwrap();
            let _key = push.dedup_key();
            let wxgate::rules::Action::Reply(reply) = wxgate::rules::answer(&account.rules, &push)
            else {
                unreachable!()
            };
            let out = reply.to_xml(&push.from, &push.to, 1733300001, max_articles(&push)).unwrap();
            let sealed = key.seal(&out, &account.app_id);
            let sig = signature::msg_signature(&token, "1733300001", "42", &sealed);
            let fields = serde_json::Value::Object(wxgate::fields::of_push(&push)).to_string();
            black_box((envelope(&sealed, &sig, 1733300001, "42"), fields))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pieces");
    g.bench_function("url_signature_verify", |b| {
        b.iter(|| {
            signature::verify(
                black_box("16120ec1b8dbb870f510d87ce6bc2463eae6ca1a"),
                &["spamtest", "1409735669", "1320562132"],
            )
        })
    });
    g.bench_function("parse_text_push", |b| b.iter(|| Push::parse(black_box(&text)).unwrap()));
    let sealed = key.seal(&text, &account.app_id);
    g.bench_function("decrypt_text_push", |b| {
        b.iter(|| key.open(black_box(&sealed), &account.app_id).unwrap())
    });
    g.bench_function("encrypt_text_reply", |b| {
        b.iter(|| key.seal(black_box(&text), &account.app_id))
    });
    g.finish();
}

criterion_group!(benches, per_push);
criterion_main!(benches);
