//! Scenarios: followers and what they do over time, in a readable TOML file, run step by
//! step with WeChat's delivery rules and checked against what each step expects.
//!
//! ```toml
//! [[followers]]
//! name = "alice"                       # a fresh OpenID each run unless `openid` is given
//!
//! [[steps]]
//! follower = "alice"
//! push = "subscribe --scene spring_poster"       # the words of `wxgate sim push`
//! expect_text = "Welcome, you came from the spring_poster poster"
//!
//! [[steps]]
//! follower = "alice"
//! after_ms = 1000                      # wait this long first
//! push = ["text", "--content", "hello there"]    # a list keeps spaces in values
//! expect_msg_type = "text"
//!
//! [[steps]]
//! follower = "alice"
//! push = "location-report --lat 23.1 --lng 113.2"
//! expect_nothing = true
//! ```
//!
//! Expectations (all optional): `expect_text` (the text reply), `expect_msg_type`,
//! `expect_nothing` (no reply), `expect_error` (the follower sees the service error).
//! `expect_nothing` goes with neither `expect_text` nor `expect_msg_type`, and
//! `expect_error` with no other expectation; such a step is refused when the file is read.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{FromArgMatches, Parser};
use serde::Deserialize;

use super::delivery::{Report, Rules, deliver};
use super::kinds::Kind;
use super::{Account, Mode, Seen};

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub followers: Vec<Follower>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Follower {
    pub name: String,
    pub openid: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub follower: String,
    #[serde(default)]
    pub after_ms: u64,
    pub push: Words,
    pub expect_text: Option<String>,
    pub expect_msg_type: Option<String>,
    #[serde(default)]
    pub expect_nothing: bool,
    #[serde(default)]
    pub expect_error: bool,
}

/// A push written as `sim push` words: one string split on spaces, or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Words {
    Line(String),
    List(Vec<String>),
}

#[derive(Parser)]
#[command(no_binary_name = true)]
struct KindOnly {
    #[command(subcommand)]
    kind: Kind,
}

impl Words {
    /// Parses the words as a push kind with its flags.
    pub fn kind(&self) -> Result<Kind, String> {
        let words: Vec<String> = match self {
            Words::Line(s) => s.split_whitespace().map(str::to_owned).collect(),
            Words::List(l) => l.clone(),
        };
        let matches = KindOnly::command_for_scenarios()
            .try_get_matches_from(&words)
            .map_err(|e| one_line(&e))?;
        KindOnly::from_arg_matches(&matches).map(|k| k.kind).map_err(|e| one_line(&e))
    }

    /// The words as one line, for reports.
    pub fn line(&self) -> String {
        match self {
            Words::Line(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
            Words::List(l) => l.join(" "),
        }
    }
}

/// A clap error as one line: its message and tip, without `error:`, usage or help lines.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    let mut out = String::new();
    for l in lines {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(l);
    }
    if out.is_empty() { "not a push".into() } else { out }
}

impl KindOnly {
    fn command_for_scenarios() -> clap::Command {
        <KindOnly as clap::CommandFactory>::command()
    }
}

/// One step's outcome.
#[derive(Debug)]
pub struct StepResult {
    /// The follower's name in the scenario.
    pub follower: String,
    /// The follower's OpenID in this run.
    pub openid: String,
    pub label: String,
    pub report: Report,
    /// Why the step did not meet its expectation, if it did not.
    pub failure: Option<String>,
}

impl Scenario {
    /// Reads and checks a scenario file's text. Errors are one line: `line L, column C:
    /// message` for TOML, or the field (`steps[2].push: ...`).
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            match e.span() {
                Some(span) => format!("{}: {message}", location(text, span.start)),
                None => message,
            }
        })?;
        for (i, step) in s.steps.iter().enumerate() {
            step.push.kind().map_err(|e| format!("steps[{i}].push: {e}"))?;
            if !s.followers.iter().any(|f| f.name == step.follower) && !s.followers.is_empty() {
                return Err(format!("steps[{i}].follower: no follower named {:?}", step.follower));
            }
            step.consistent().map_err(|e| format!("steps[{i}]: {e}"))?;
        }
        Ok(s)
    }

    /// How many different followers the steps name.
    pub fn follower_count(&self) -> usize {
        let mut names: Vec<&str> = self.steps.iter().map(|s| s.follower.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    /// The built-in journey: one follower through a QR subscribe with a scene, SCAN,
    /// location reports, menu CLICK and VIEW, a few messages, and unsubscribe.
    pub fn journey() -> Scenario {
        let step = |push: &str| Step {
            follower: "journey".into(),
            after_ms: 0,
            push: Words::Line(push.into()),
            expect_text: None,
            expect_msg_type: None,
            expect_nothing: false,
            expect_error: false,
        };
        Scenario {
            followers: vec![Follower { name: "journey".into(), openid: None }],
            steps: vec![
                step("subscribe --scene spring_poster"),
                step("scan --scene spring_poster"),
                step("location-report --lat 23.137466 --lng 113.352425 --precision 119.385040"),
                step("location-report --lat 23.137512 --lng 113.352401 --precision 65.000000"),
                step("click --key MENU_A"),
                step("view --url https://example.com/menu --menu-id 100"),
                step("text --content hello"),
                step("text --content news"),
                step("location --lat 31.230416 --lng 121.473701 --label Shanghai"),
                step("image"),
                step("unsubscribe"),
            ],
        }
    }

    /// Runs every step in order against `url` and reports each.
    pub async fn run(
        &self,
        account: &Account,
        url: &str,
        mode: Mode,
        rules: Rules,
        mut on_step: impl FnMut(usize, &StepResult),
    ) -> Vec<StepResult> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut openids: HashMap<String, String> = HashMap::new();
        let mut results = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            if step.after_ms > 0 {
                tokio::time::sleep(Duration::from_millis(step.after_ms)).await;
            }
            let openid = openids
                .entry(step.follower.clone())
                .or_insert_with(|| {
                    self.followers
                        .iter()
                        .find(|f| f.name == step.follower)
                        .and_then(|f| f.openid.clone())
                        .unwrap_or_else(|| fresh_openid(&step.follower))
                })
                .clone();
            let kind = step.push.kind().unwrap_or(Kind::Unsubscribe);
            // CreateTime moves on one second per step so that no two steps look alike;
            // each run's fresh OpenIDs and random MsgIds keep runs apart.
            let create_time = now + i as u64;
            let inner = kind.to_xml(&account.original_id, &openid, create_time, random_msg_id());
            let report = deliver(account, url, &inner, mode, rules).await;
            let failure = step.check(&report.seen);
            let result = StepResult {
                follower: step.follower.clone(),
                openid,
                label: step.push.line(),
                report,
                failure,
            };
            on_step(i, &result);
            results.push(result);
        }
        results
    }
}

impl Step {
    /// Refuses expectations that cannot all hold.
    fn consistent(&self) -> Result<(), String> {
        let mut others = Vec::new();
        if self.expect_text.is_some() {
            others.push("expect_text");
        }
        if self.expect_msg_type.is_some() {
            others.push("expect_msg_type");
        }
        if self.expect_error {
            if self.expect_nothing {
                others.push("expect_nothing");
            }
            if !others.is_empty() {
                return Err(format!(
                    "expect_error cannot go with {} (the follower sees only the service error)",
                    others.join(" or ")
                ));
            }
        }
        if self.expect_nothing && !others.is_empty() {
            return Err(format!(
                "expect_nothing cannot go with {} (no reply has no text or type)",
                others.join(" or ")
            ));
        }
        if let (Some(_), Some(ty)) = (&self.expect_text, &self.expect_msg_type)
            && ty != "text"
        {
            return Err(format!("expect_text needs a text reply, but expect_msg_type is {ty:?}"));
        }
        Ok(())
    }

    fn check(&self, seen: &Seen) -> Option<String> {
        if self.expect_error {
            return (!matches!(seen, Seen::ServiceError(_)))
                .then(|| "expected the service error".into());
        }
        if let Seen::ServiceError(reason) = seen {
            return Some(format!("the follower sees the service error: {reason}"));
        }
        if self.expect_nothing && *seen != Seen::Nothing {
            return Some(format!("expected no reply, got {}", got(seen)));
        }
        if let Some(t) = &self.expect_msg_type {
            match seen {
                Seen::Reply { msg_type, .. } if msg_type == t => {}
                _ => return Some(format!("expected a {t} reply, got {}", got(seen))),
            }
        }
        if let Some(t) = &self.expect_text
            && seen.text() != Some(t.as_str())
        {
            return Some(format!("expected the text {t:?}, got {}", got(seen)));
        }
        None
    }
}

/// What the follower got, for a failed expectation: `"hi"`, `no reply`, `a news reply`.
fn got(seen: &Seen) -> String {
    match seen {
        Seen::Nothing => "no reply".into(),
        Seen::Reply { .. } if seen.text().is_some() => {
            format!("{:?}", seen.text().unwrap_or_default())
        }
        Seen::Reply { msg_type, .. } => format!("a {msg_type} reply"),
        Seen::ServiceError(reason) => format!("the service error ({reason})"),
    }
}

/// A fresh OpenID-shaped id for a follower (28 characters of `[A-Za-z0-9_-]`): `oSim`,
/// up to 10 letters or digits of the name, `_`, then random characters. Each call gives
/// another id, so that two runs are two sets of followers and never look like retries.
pub fn fresh_openid(name: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    let clean: String = name.chars().filter(char::is_ascii_alphanumeric).take(10).collect();
    let mut id = format!("oSim{clean}_");
    let mut random = [0u8; 28];
    fill_random(&mut random);
    for b in &random[..28 - id.len()] {
        id.push(char::from(ALPHABET[usize::from(b & 63)]));
    }
    id
}

/// A random 19-digit MsgId, as distinct as WeChat's (below 9·10^18, so it also fits a
/// signed 64-bit integer).
pub fn random_msg_id() -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    1_000_000_000_000_000_000 + u64::from_le_bytes(b) % 8_000_000_000_000_000_000
}

/// Random bytes from the OS, or from the clock and a counter should it fail.
fn fill_random(buf: &mut [u8]) {
    if getrandom::fill(buf).is_err() {
        use std::hash::{BuildHasher, RandomState};
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let state = RandomState::new();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let h = state.hash_one((nanos, n, i));
            chunk.copy_from_slice(&h.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// `line L, column C` of a byte offset, for TOML errors.
fn location(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// A one-line description of what the follower saw.
pub fn describe(seen: &Seen) -> String {
    match seen {
        Seen::Nothing => "nothing shown (success)".into(),
        Seen::Reply { msg_type, doc, .. } => match msg_type.as_str() {
            "text" => format!(
                "text: {:?}",
                doc.child("Content").map(|c| c.text.as_str()).unwrap_or_default()
            ),
            "news" => {
                let titles: Vec<&str> = doc
                    .child("Articles")
                    .into_iter()
                    .flat_map(|a| a.children.iter())
                    .filter_map(|i| i.text_of("Title"))
                    .collect();
                format!("news: {titles:?}")
            }
            other => format!("{other} reply"),
        },
        Seen::ServiceError(reason) => {
            format!("\"该公众号暂时无法提供服务，请稍后再试\" ({reason})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_files_parse_and_name_bad_steps() {
        let s = Scenario::parse(
            "[[followers]]\nname = \"a\"\n[[steps]]\nfollower = \"a\"\npush = \"click --key K\"\nexpect_text = \"x\"\n\
             [[steps]]\nfollower = \"a\"\npush = [\"text\", \"--content\", \"two words\"]\n",
        )
        .unwrap();
        assert!(
            matches!(s.steps[1].push.kind().unwrap(), Kind::Text { content } if content == "two words")
        );
        let bad =
            Scenario::parse("[[steps]]\nfollower = \"a\"\npush = \"fly --to moon\"\n").unwrap_err();
        assert!(bad.starts_with("steps[0].push:"), "{bad}");
        assert!(!bad.contains("error:") && !bad.contains("Usage") && !bad.contains('\n'), "{bad}");
        assert!(Scenario::journey().steps.iter().all(|s| s.push.kind().is_ok()));
    }

    #[test]
    fn contradictory_expectations_and_toml_errors_are_refused_in_one_line() {
        let step = |extra: &str| {
            format!(
                "[[steps]]\nfollower = \"a\"\npush = \"click --key K\"\n[[steps]]\nfollower = \"a\"\npush = \"click --key K\"\n{extra}\n"
            )
        };
        for extra in [
            "expect_nothing = true\nexpect_text = \"x\"",
            "expect_nothing = true\nexpect_msg_type = \"text\"",
            "expect_error = true\nexpect_text = \"x\"",
            "expect_error = true\nexpect_nothing = true",
        ] {
            let e = Scenario::parse(&step(extra)).unwrap_err();
            assert!(e.starts_with("steps[1]: "), "{e}");
        }
        assert!(Scenario::parse(&step("expect_text = \"x\"\nexpect_msg_type = \"text\"")).is_ok());
        let e = Scenario::parse(
            "[[steps]]\nfollower = \"a\"\npush = \"click --key K\"\nexpect_txt = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("line 4, column 1: unknown field `expect_txt`"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn openids_are_fresh_and_msg_ids_random() {
        let (a, b) = (fresh_openid("journey"), fresh_openid("journey"));
        assert_ne!(a, b);
        for id in [a, b, fresh_openid("a very long name with spaces"), fresh_openid("")] {
            assert_eq!(id.len(), 28, "{id}");
            assert!(
                id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
                "{id}"
            );
        }
        let (m, n) = (random_msg_id(), random_msg_id());
        assert_ne!(m, n);
        assert_eq!(m.to_string().len(), 19);
        assert!(i64::try_from(m).is_ok());
    }

    #[test]
    fn failed_expectations_say_what_came() {
        let step = Step {
            follower: "a".into(),
            after_ms: 0,
            push: Words::Line("text --content hi".into()),
            expect_text: Some("bye".into()),
            expect_msg_type: None,
            expect_nothing: false,
            expect_error: false,
        };
        assert_eq!(step.check(&Seen::Nothing).unwrap(), "expected the text \"bye\", got no reply");
        let doc =
            wxgate_protocol::xml::parse("<xml><MsgType>text</MsgType><Content>hi</Content></xml>")
                .unwrap();
        let seen = Seen::Reply { msg_type: "text".into(), xml: String::new(), doc };
        assert_eq!(step.check(&seen).unwrap(), "expected the text \"bye\", got \"hi\"");
        let doc = wxgate_protocol::xml::parse("<xml><MsgType>news</MsgType></xml>").unwrap();
        let seen = Seen::Reply { msg_type: "news".into(), xml: String::new(), doc };
        assert_eq!(step.check(&seen).unwrap(), "expected the text \"bye\", got a news reply");
    }
}
