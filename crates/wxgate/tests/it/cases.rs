//! Replays every case of `shared/pushes/cases.json` (kept in `tests/fixtures/pushes/`)
//! against a real `wxgate serve`: a fresh process, config and store per case, requests
//! sent byte for byte, and every expectation checked — status, body, the reply judged
//! as WeChat would, the parsed fields and `handler_calls` through the store.
//!
//! `WXGATE_CASES=/path/to/cases.json` replays another file of the same format.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::Value;
use wxgate::sim::{self, Mode, Seen};
use wxgate_protocol::EncodingAesKey;

use crate::helpers::{Body, Server, lookup, request, same};

/// The reply rules a case's `handler` asks for.
fn rules_for(handler: &str) -> String {
    let h = handler.to_ascii_lowercase();
    let news = |n: usize| {
        let items: Vec<String> = (1..=n)
            .map(|i| format!("{{ title = \"t{i}\", description = \"d{i}\", url = \"https://example.com/{i}\", pic_url = \"https://example.com/{i}.png\" }}"))
            .collect();
        format!("[{}]", items.join(", "))
    };
    if h.starts_with("echo") {
        "[[accounts.rules]]\nwhen = { msg_type = \"text\" }\nreply = { text = \"{content}\" }\n"
            .into()
    } else if h.contains("clicked") {
        "[[accounts.rules]]\nwhen = { event = \"CLICK\" }\nreply = { text = \"clicked {event_key}\" }\n".into()
    } else if h.contains("news") {
        format!(
            "[[accounts.rules]]\nwhen = {{ msg_type = \"text\" }}\nreply = {{ news = {} }}\n\
             [[accounts.rules]]\nwhen = {{ event = \"CLICK\" }}\nreply = {{ news = {} }}\n",
            news(3),
            news(9)
        )
    } else {
        String::new()
    }
}

fn config_for(case: &Value) -> String {
    let c = &case["config"];
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    format!(
        "[[accounts]]\nname = \"case\"\npath = \"{}\"\napp_id = \"{}\"\ntoken = \"{}\"\nencoding_aes_key = \"{}\"\n\
         max_timestamp_skew_secs = 0\n{}",
        s("callback_path"),
        s("appid"),
        s("token"),
        s("encoding_aes_key"),
        rules_for(case["handler"].as_str().unwrap_or_default())
    )
}

fn cases() -> Vec<Value> {
    let text = match std::env::var("WXGATE_CASES") {
        Ok(path) => std::fs::read_to_string(path).unwrap(),
        Err(_) => include_str!("../fixtures/pushes/cases.json").to_owned(),
    };
    serde_json::from_str::<Value>(&text).unwrap().as_array().unwrap().clone()
}

#[test]
fn every_shared_push_case_passes_against_a_real_server() {
    let all = cases();
    assert!(all.len() >= 16);
    let mut failures = Vec::new();
    for case in &all {
        if let Err(e) = run_case(case) {
            failures.push(format!("{}: {e}", case["id"].as_str().unwrap_or("?")));
        }
    }
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

fn run_case(case: &Value) -> Result<(), String> {
    let server = Server::start(&config_for(case));
    let c = &case["config"];
    let account = sim::Account {
        token: c["token"].as_str().unwrap().into(),
        app_id: c["appid"].as_str().unwrap().into(),
        aes_key: Some(EncodingAesKey::parse(c["encoding_aes_key"].as_str().unwrap()).unwrap()),
        original_id: c["official_account_id"].as_str().unwrap_or_default().into(),
    };
    // An SSRF probe target: nothing may ever connect to it.
    let probe = TcpListener::bind("127.0.0.1:18080").ok();
    if let Some(p) = &probe {
        p.set_nonblocking(true).unwrap();
    }

    let mut replies: Vec<Option<String>> = Vec::new();
    for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        let label = step["label"].as_str().unwrap_or_default();
        let check = run_step(&server, &account, step, &replies);
        match check {
            Ok(reply) => replies.push(reply),
            Err(e) => return Err(format!("step {} ({label}): {e}", i + 1)),
        }
    }
    if let Some(p) = &probe
        && p.accept().is_ok()
    {
        return Err("the server opened a connection to the XXE probe".into());
    }
    Ok(())
}

/// Runs one step; returns the plain reply XML it got (for `same_as_step` checks).
fn run_step(
    server: &Server,
    account: &sim::Account,
    step: &Value,
    replies: &[Option<String>],
) -> Result<Option<String>, String> {
    let req = &step["request"];
    let expect = &step["expect"];
    let method = req["method"].as_str().unwrap();
    let path = req["path"].as_str().unwrap();
    let query = req["query_string"].as_str().unwrap_or_default();
    let target = if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") };
    let headers: Vec<(String, String)> = req["headers"]
        .as_object()
        .map(|h| {
            h.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect()
        })
        .unwrap_or_default();
    let header_refs: Vec<(&str, &str)> =
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let body: Option<Vec<u8>> =
        if let Some(recipe) = req.get("body_recipe").filter(|r| r.is_object()) {
            let fill = recipe["fill"]
                .as_str()
                .unwrap()
                .repeat(recipe["fill_bytes"].as_u64().unwrap() as usize);
            Some(recipe["template"].as_str().unwrap().replace("{FILL}", &fill).into_bytes())
        } else {
            req["body"].as_str().map(|b| b.as_bytes().to_vec())
        };
    let chunked = step["label"].as_str().unwrap_or_default().contains("chunked")
        || req["body_recipe"]["chunked"].as_bool().unwrap_or(false);
    let send = match (&body, chunked) {
        (None, _) => Body::None,
        (Some(b), true) => Body::Chunked(b),
        (Some(b), false) => Body::Fixed(b),
    };

    let before = server.records();
    let started = Instant::now();
    let resp = request(&server.addr(), method, &target, &header_refs, send)
        .map_err(|e| format!("no HTTP answer: {e}"))?;
    let latency = started.elapsed();
    let after = server.records();

    // Status.
    let ok_status = match &expect["status"] {
        Value::Array(codes) => codes.iter().any(|c| c.as_u64() == Some(resp.status as u64)),
        Value::Number(n) => n.as_u64() == Some(resp.status as u64),
        _ => true,
    };
    if !ok_status {
        return Err(format!(
            "status {} (body {:?}), expected {}",
            resp.status, resp.body, expect["status"]
        ));
    }
    if resp.status >= 500 {
        return Err(format!("server error {}", resp.status));
    }
    if let Some(max) = expect["max_latency_ms"].as_u64() {
        // Generous: catches a hang or a quadratic path, not a slow CI machine.
        if latency > Duration::from_millis(max * 5) {
            return Err(format!("took {latency:?}, expected about {max} ms"));
        }
    }
    if let Some(exact) = expect["body_exact"].as_str()
        && resp.body != exact
    {
        return Err(format!("body {:?}, expected exactly {exact:?}", resp.body));
    }
    if let Some(options) = expect["body_one_of"].as_array()
        && !options.iter().any(|o| o.as_str() == Some(resp.body.as_str()))
    {
        return Err(format!("body {:?}, expected one of {options:?}", resp.body));
    }

    // handler_calls: how many new records this request made.
    let new: Vec<&Value> =
        after.iter().filter(|r| !before.iter().any(|b| b["id"] == r["id"])).collect();
    if let Some(calls) = expect["handler_calls"].as_u64()
        && new.len() as u64 != calls
    {
        return Err(format!("handler ran {} times, expected {calls}", new.len()));
    }

    // The parsed fields, read back from the store.
    if let Some(parsed) = expect["parsed"].as_object() {
        let record = new.first().ok_or("nothing was recorded, so no parsed fields")?;
        for (path, want) in parsed {
            if let Some(p) = path.strip_suffix("_one_of") {
                let got = lookup(record, p).unwrap_or(Value::Null);
                if !want.as_array().unwrap().iter().any(|w| same(&got, w)) {
                    return Err(format!("parsed {p} = {got}, expected one of {want}"));
                }
                continue;
            }
            let got = lookup(record, path).unwrap_or(Value::Null);
            if !same(&got, want) {
                return Err(format!("parsed {path} = {got}, expected {want}"));
            }
        }
    }

    // The reply, judged as WeChat would.
    let inner = req["decrypted_xml"].as_str().or(req["body"].as_str()).unwrap_or_default();
    let encrypted_request = target.contains("encrypt_type=aes");
    let mode = if encrypted_request { Mode::Safe } else { Mode::Plain };
    let seen = if method == "POST" && resp.status == 200 {
        Some(account.judge(inner, mode, resp.status, &resp.body))
    } else {
        None
    };
    if let Some(Seen::ServiceError(reason)) = &seen {
        return Err(format!("the follower would see an error: {reason}"));
    }
    let plain_reply = match &seen {
        Some(Seen::Reply { xml, .. }) => Some(xml.clone()),
        _ => None,
    };

    if let Some(options) = expect["body_one_of_or_same_as_step"].as_array() {
        let nothing = resp.body.is_empty() || resp.body == "success";
        let same_as_first =
            plain_reply.is_some() && replies.first().cloned().flatten() == plain_reply;
        if !nothing && !same_as_first {
            return Err(format!("retry answered {:?}, expected one of {options:?}", resp.body));
        }
    }

    if let Some(want) = expect["reply"].as_object() {
        let Some(Seen::Reply { msg_type, doc, .. }) = &seen else {
            return Err(format!("expected a reply, got {:?}", resp.body));
        };
        let is_encrypted = resp.body.contains("<Encrypt>");
        match want.get("mode").and_then(Value::as_str) {
            Some("encrypted") if !is_encrypted => return Err("reply should be encrypted".into()),
            Some("plain") if is_encrypted => return Err("reply should be plain".into()),
            _ => {}
        }
        if let Some(t) = want.get("MsgType").and_then(Value::as_str)
            && msg_type != t
        {
            return Err(format!("reply MsgType {msg_type}, expected {t}"));
        }
        let content = doc.child("Content").map(|c| c.text.clone());
        if let Some(c) = want.get("Content").and_then(Value::as_str)
            && content.as_deref() != Some(c)
        {
            return Err(format!("reply Content {content:?}, expected {c:?}"));
        }
        if want.get("Content_equals_request_Content").and_then(Value::as_bool) == Some(true) {
            let sent = wxgate_protocol::xml::parse(inner)
                .ok()
                .and_then(|d| d.child("Content").map(|c| c.text.clone()));
            if content != sent {
                return Err(format!("reply Content {content:?}, expected the request's {sent:?}"));
            }
        }
        for check in want
            .get("checks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if let Some(n) = check
                .strip_prefix("ArticleCount == ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
            {
                let count = doc.child("Articles").map_or(0, |a| a.children.len());
                if count != n {
                    return Err(format!("{count} articles, expected {n}"));
                }
            }
            if check.contains("item has Title, Description, PicUrl, Url") {
                for item in doc.child("Articles").into_iter().flat_map(|a| a.children.iter()) {
                    for f in ["Title", "Description", "PicUrl", "Url"] {
                        if item.child(f).is_none() {
                            return Err(format!("article lacks {f}"));
                        }
                    }
                }
            }
        }
    }
    Ok(plain_reply)
}
