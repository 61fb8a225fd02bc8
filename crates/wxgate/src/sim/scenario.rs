//! Scenarios: followers and what they do over time, in a readable TOML file, run step by
//! step with WeChat's delivery rules and checked against what each step expects.
//!
//! ```toml
//! [[followers]]
//! name = "alice"                       # openid is made up unless given
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
        let matches = KindOnly::command_for_scenarios().try_get_matches_from(&words).map_err(|e| e.to_string())?;
        KindOnly::from_arg_matches(&matches).map(|k| k.kind).map_err(|e| e.to_string())
    }
}

impl KindOnly {
    fn command_for_scenarios() -> clap::Command {
        <KindOnly as clap::CommandFactory>::command()
    }
}

/// One step's outcome.
#[derive(Debug)]
pub struct StepResult {
    pub label: String,
    pub report: Report,
    /// Why the step did not meet its expectation, if it did not.
    pub failure: Option<String>,
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        for (i, step) in s.steps.iter().enumerate() {
            step.push.kind().map_err(|e| format!("steps[{i}].push: {e}"))?;
            if !s.followers.iter().any(|f| f.name == step.follower) && !s.followers.is_empty() {
                return Err(format!("steps[{i}].follower: no follower named {:?}", step.follower));
            }
        }
        Ok(s)
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
    pub async fn run(&self, account: &Account, url: &str, mode: Mode, rules: Rules, mut on_step: impl FnMut(usize, &StepResult)) -> Vec<StepResult> {
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
                        .unwrap_or_else(|| made_up_openid(&step.follower))
                })
                .clone();
            let kind = step.push.kind().unwrap_or(Kind::Unsubscribe);
            // CreateTime moves on one second per step so that no two steps look alike.
            let create_time = now + i as u64;
            let inner = kind.to_xml(&account.original_id, &openid, create_time, create_time * 1000 + i as u64);
            let report = deliver(account, url, &inner, mode, rules).await;
            let failure = step.check(&report.seen);
            let label = match &step.push {
                Words::Line(s) => s.clone(),
                Words::List(l) => l.join(" "),
            };
            let result = StepResult { label, report, failure };
            on_step(i, &result);
            results.push(result);
        }
        results
    }
}

impl Step {
    fn check(&self, seen: &Seen) -> Option<String> {
        if self.expect_error {
            return (!matches!(seen, Seen::ServiceError(_))).then(|| "expected the service error".into());
        }
        if let Seen::ServiceError(reason) = seen {
            return Some(format!("the follower sees the service error: {reason}"));
        }
        if self.expect_nothing && *seen != Seen::Nothing {
            return Some("expected no reply".into());
        }
        if let Some(t) = &self.expect_msg_type {
            match seen {
                Seen::Reply { msg_type, .. } if msg_type == t => {}
                _ => return Some(format!("expected a {t} reply")),
            }
        }
        if let Some(t) = &self.expect_text {
            if seen.text() != Some(t.as_str()) {
                return Some(format!("expected the text {t:?}, got {:?}", seen.text()));
            }
        }
        None
    }
}

/// A stable, OpenID-shaped id for a follower name (28 characters).
pub fn made_up_openid(name: &str) -> String {
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).take(16).collect();
    format!("oSim{clean:_<24}")[..28].to_owned()
}

/// A one-line description of what the follower saw.
pub fn describe(seen: &Seen) -> String {
    match seen {
        Seen::Nothing => "nothing shown (success)".into(),
        Seen::Reply { msg_type, doc, .. } => match msg_type.as_str() {
            "text" => format!("text: {:?}", doc.child("Content").map(|c| c.text.as_str()).unwrap_or_default()),
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
        Seen::ServiceError(reason) => format!("\"该公众号暂时无法提供服务，请稍后再试\" ({reason})"),
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
        assert!(matches!(s.steps[1].push.kind().unwrap(), Kind::Text { content } if content == "two words"));
        let bad = Scenario::parse("[[steps]]\nfollower = \"a\"\npush = \"fly --to moon\"\n").unwrap_err();
        assert!(bad.starts_with("steps[0].push:"), "{bad}");
        assert!(Scenario::journey().steps.iter().all(|s| s.push.kind().is_ok()));
        assert_eq!(made_up_openid("journey").len(), 28);
    }
}
