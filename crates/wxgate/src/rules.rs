//! Reply rules: what an account answers, written in the config file instead of code.
//!
//! Rules are tried in order and the first whose matchers all hold gives the reply; no
//! match means no reply (`success`). Reply strings are templates: `{content}`, `{from}`,
//! `{to}`, `{event}`, `{event_key}` and `{scene}` are filled from the push (empty when the
//! push has no such field) and `{{` / `}}` stand for literal braces. Templates are parsed
//! when the config is loaded, so a typo is a start-up error, not a runtime surprise.

use regex::Regex;
use serde::Deserialize;
use wxgate_protocol::{Article, Push, Reply};

use crate::config::ConfigError;

/// A rule as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleFile {
    #[serde(default)]
    when: WhenFile,
    reply: ReplyFile,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenFile {
    msg_type: Option<String>,
    event: Option<String>,
    event_key: Option<String>,
    event_key_prefix: Option<String>,
    scene: Option<String>,
    content: Option<String>,
    content_regex: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplyFile {
    text: Option<String>,
    forward: Option<ForwardFile>,
    news: Option<Vec<ArticleFile>>,
    image: Option<MediaFile>,
    voice: Option<MediaFile>,
    video: Option<VideoFile>,
    music: Option<MusicFile>,
    transfer_customer_service: Option<TransferFile>,
    none: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArticleFile {
    title: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    pic_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaFile {
    media_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VideoFile {
    media_id: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MusicFile {
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    music_url: String,
    #[serde(default)]
    hq_music_url: String,
    thumb_media_id: String,
}

/// `forward = "URL"` or `forward = { url = "URL", background = true }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ForwardFile {
    Url(String),
    Table {
        url: String,
        #[serde(default)]
        background: bool,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferFile {
    kf_account: Option<String>,
}

/// What a matching rule asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer with this reply (or none).
    Reply(Reply),
    /// Hand the push to the owner's service at `url`; `background` sends it through the
    /// outbox and answers `success` at once.
    Forward { url: String, background: bool },
}

/// A checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    when: When,
    reply: ReplyTemplate,
}

/// The matchers as written, with the regex compiled.
#[derive(Debug, Clone)]
struct When {
    file: WhenFile,
    content_regex: Option<Regex>,
}

#[derive(Debug, Clone)]
enum ReplyTemplate {
    Forward { url: String, background: bool },
    None,
    Text(Template),
    Image(Template),
    Voice(Template),
    Video([Template; 3]),
    Music([Template; 5]),
    News(Vec<[Template; 4]>),
    Transfer(Option<Template>),
}

impl Rule {
    pub(crate) fn check(r: RuleFile, at: &str) -> Result<Rule, ConfigError> {
        let content_regex = match &r.when.content_regex {
            Some(re) => {
                Some(Regex::new(re).map_err(|e| err(format!("{at}.when.content_regex"), e))?)
            }
            None => None,
        };
        let when = When { file: r.when, content_regex };
        Ok(Rule { when, reply: ReplyTemplate::check(r.reply, &format!("{at}.reply"))? })
    }

    /// Whether this rule hands pushes to the owner's service.
    pub fn forwards(&self) -> bool {
        matches!(self.reply, ReplyTemplate::Forward { .. })
    }

    /// Whether every matcher of this rule holds for the push.
    pub fn matches(&self, push: &Push) -> bool {
        let w = &self.when.file;
        let eq = |want: &Option<String>, got: Option<&str>| {
            want.as_ref().is_none_or(|w| got == Some(w.as_str()))
        };
        w.msg_type.as_ref().is_none_or(|t| push.msg_type.eq_ignore_ascii_case(t))
            && w.event
                .as_ref()
                .is_none_or(|e| push.event_name().is_some_and(|n| n.eq_ignore_ascii_case(e)))
            && eq(&w.event_key, push.event_key())
            && w.event_key_prefix
                .as_ref()
                .is_none_or(|p| push.event_key().is_some_and(|k| k.starts_with(p.as_str())))
            && eq(&w.scene, push.scene())
            && eq(&w.content, push.content())
            && self
                .when
                .content_regex
                .as_ref()
                .is_none_or(|re| push.content().is_some_and(|c| re.is_match(c)))
    }

    /// What this rule does with the push.
    pub fn action(&self, push: &Push) -> Action {
        match &self.reply {
            ReplyTemplate::Forward { url, background } => {
                Action::Forward { url: url.clone(), background: *background }
            }
            other => Action::Reply(other.render(push)),
        }
    }
}

impl ReplyTemplate {
    fn render(&self, push: &Push) -> Reply {
        self.build(|t| t.render(push))
    }

    /// The reply, each string made by `r` (filled from a push, or taken literally).
    fn build(&self, r: impl Fn(&Template) -> String) -> Reply {
        match self {
            ReplyTemplate::Forward { .. } | ReplyTemplate::None => Reply::None,
            ReplyTemplate::Text(t) => Reply::Text(r(t)),
            ReplyTemplate::Image(t) => Reply::Image { media_id: r(t) },
            ReplyTemplate::Voice(t) => Reply::Voice { media_id: r(t) },
            ReplyTemplate::Video([m, t, d]) => {
                Reply::Video { media_id: r(m), title: r(t), description: r(d) }
            }
            ReplyTemplate::Music([t, d, u, hq, thumb]) => Reply::Music {
                title: r(t),
                description: r(d),
                music_url: r(u),
                hq_music_url: r(hq),
                thumb_media_id: r(thumb),
            },
            ReplyTemplate::News(items) => Reply::News(
                items
                    .iter()
                    .map(|[t, d, u, p]| Article {
                        title: r(t),
                        description: r(d),
                        url: r(u),
                        pic_url: r(p),
                    })
                    .collect(),
            ),
            ReplyTemplate::Transfer(kf) => {
                Reply::TransferCustomerService { kf_account: kf.as_ref().map(r) }
            }
        }
    }
}

/// What the first matching rule asks for; no match means no reply.
pub fn answer(rules: &[Rule], push: &Push) -> Action {
    rules.iter().find(|r| r.matches(push)).map_or(Action::Reply(Reply::None), |r| r.action(push))
}

/// A reply given as JSON by the owner's service (the same shape as a rule's `reply`,
/// taken literally: no placeholders). An empty object means no reply.
pub fn literal_reply(json: &[u8]) -> Result<Reply, String> {
    let trimmed = std::str::from_utf8(json).map_err(|_| "answer is not utf-8".to_owned())?.trim();
    if trimmed.is_empty() || trimmed == "{}" {
        return Ok(Reply::None);
    }
    let file: ReplyFile =
        serde_json::from_str(trimmed).map_err(|e| format!("answer is not a reply: {e}"))?;
    if file.forward.is_some() {
        return Err("an answer cannot forward again".into());
    }
    let template =
        ReplyTemplate::check_with(file, "answer", Template::literal).map_err(|e| e.to_string())?;
    Ok(template.build(Template::literal_text))
}

impl ReplyTemplate {
    fn check(r: ReplyFile, at: &str) -> Result<ReplyTemplate, ConfigError> {
        Self::check_with(r, at, Template::parse)
    }

    fn check_with(
        r: ReplyFile,
        at: &str,
        parse: fn(&str) -> Result<Template, String>,
    ) -> Result<ReplyTemplate, ConfigError> {
        let given = [
            r.forward.is_some(),
            r.text.is_some(),
            r.news.is_some(),
            r.image.is_some(),
            r.voice.is_some(),
            r.video.is_some(),
            r.music.is_some(),
            r.transfer_customer_service.is_some(),
            r.none.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(err(
                at,
                "give exactly one of text, news, image, voice, video, music, transfer_customer_service, forward, none",
            ));
        }
        let t = |field: &str, s: &str| parse(s).map_err(|e| err(format!("{at}.{field}"), e));
        Ok(if let Some(forward) = r.forward {
            let (url, background) = match forward {
                ForwardFile::Url(url) => (url, false),
                ForwardFile::Table { url, background } => (url, background),
            };
            check_forward_url(&url).map_err(|e| err(format!("{at}.forward"), e))?;
            ReplyTemplate::Forward { url, background }
        } else if let Some(text) = r.text {
            ReplyTemplate::Text(t("text", &text)?)
        } else if let Some(news) = r.news {
            if news.is_empty() {
                return Err(err(format!("{at}.news"), "needs at least one article"));
            }
            let mut items = Vec::new();
            for (i, a) in news.iter().enumerate() {
                let f = |name: &str| format!("news[{i}].{name}");
                items.push([
                    t(&f("title"), &a.title)?,
                    t(&f("description"), &a.description)?,
                    t(&f("url"), &a.url)?,
                    t(&f("pic_url"), &a.pic_url)?,
                ]);
            }
            ReplyTemplate::News(items)
        } else if let Some(m) = r.image {
            ReplyTemplate::Image(t("image.media_id", &m.media_id)?)
        } else if let Some(m) = r.voice {
            ReplyTemplate::Voice(t("voice.media_id", &m.media_id)?)
        } else if let Some(v) = r.video {
            ReplyTemplate::Video([
                t("video.media_id", &v.media_id)?,
                t("video.title", &v.title)?,
                t("video.description", &v.description)?,
            ])
        } else if let Some(m) = r.music {
            ReplyTemplate::Music([
                t("music.title", &m.title)?,
                t("music.description", &m.description)?,
                t("music.music_url", &m.music_url)?,
                t("music.hq_music_url", &m.hq_music_url)?,
                t("music.thumb_media_id", &m.thumb_media_id)?,
            ])
        } else if let Some(tr) = r.transfer_customer_service {
            ReplyTemplate::Transfer(match tr.kf_account {
                Some(kf) => Some(t("transfer_customer_service.kf_account", &kf)?),
                None => None,
            })
        } else if r.none == Some(true) {
            ReplyTemplate::None
        } else {
            return Err(err(format!("{at}.none"), "only `none = true` means anything"));
        })
    }
}

/// A forward target must be a plain http(s) URL with a host, a valid port and no
/// credentials (they would end up in logs; sign requests with `forward_secret`).
fn check_forward_url(url: &str) -> Result<(), String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("not a URL ({e}): {url:?}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("must be an http:// or https:// URL, got {url:?}"));
    }
    let authority = uri.authority().ok_or_else(|| format!("has no host: {url:?}"))?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry credentials (user:password@); forwards are signed with forward_secret"
                .into(),
        );
    }
    let port_ok = match authority.as_str().rsplit_once(':') {
        // An IPv6 host's own colons sit inside brackets.
        Some((_, port)) if !port.ends_with(']') => port.parse::<u16>().is_ok_and(|p| p != 0),
        _ => true,
    };
    if authority.host().is_empty() || !port_ok {
        return Err(format!("has no valid host and port: {url:?}"));
    }
    Ok(())
}

fn err(path: impl Into<String>, message: impl std::fmt::Display) -> ConfigError {
    ConfigError { path: path.into(), message: message.to_string() }
}

/// A reply string with `{placeholders}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Piece>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Content,
    From,
    To,
    Event,
    EventKey,
    Scene,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(Var),
}

impl Template {
    fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let var = match name.as_str() {
                        "content" => Var::Content,
                        "from" => Var::From,
                        "to" => Var::To,
                        "event" => Var::Event,
                        "event_key" => Var::EventKey,
                        "scene" => Var::Scene,
                        _ => {
                            return Err(format!(
                                "unknown placeholder {{{name}}}; use {{content}}, {{from}}, {{to}}, {{event}}, {{event_key}} or {{scene}} (write {{{{ for a brace)"
                            ));
                        }
                    };
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Var(var));
                }
                '}' => return Err("lone '}' (write }} for a brace)".to_owned()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template(pieces))
    }

    /// A template that is only text: braces mean themselves.
    fn literal(s: &str) -> Result<Template, String> {
        Ok(Template(vec![Piece::Lit(s.to_owned())]))
    }

    fn literal_text(&self) -> String {
        self.0.iter().map(|p| if let Piece::Lit(s) = p { s.as_str() } else { "" }).collect()
    }

    fn render(&self, push: &Push) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(v) => out.push_str(match v {
                    Var::Content => push.content().unwrap_or_default(),
                    Var::From => &push.from,
                    Var::To => &push.to,
                    Var::Event => push.event_name().unwrap_or_default(),
                    Var::EventKey => push.event_key().unwrap_or_default(),
                    Var::Scene => push.scene().unwrap_or_default(),
                }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_rules: &str) -> Vec<Rule> {
        #[derive(Deserialize)]
        struct F {
            rules: Vec<RuleFile>,
        }
        let f: F = toml::from_str(toml_rules).unwrap();
        f.rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::check(r, &format!("rules[{i}]")).unwrap())
            .collect()
    }

    fn push(body: &str) -> Push {
        Push::parse(&format!(
            "<xml><ToUserName>gh_a</ToUserName><FromUserName>oU</FromUserName><CreateTime>1</CreateTime>{body}</xml>"
        ))
        .unwrap()
    }

    const DEMO: &str = r#"
[[rules]]
when = { event = "subscribe", scene = "spring_poster" }
reply = { text = "Welcome, you came from the {scene} poster" }
[[rules]]
when = { event = "CLICK", event_key = "MENU_A" }
reply = { text = "clicked {event_key}" }
[[rules]]
when = { msg_type = "text", content_regex = "^news" }
reply = { news = [{ title = "t1", description = "d1", url = "https://example.com/1", pic_url = "https://example.com/1.png" }] }
[[rules]]
when = { msg_type = "text" }
reply = { text = "{content} {{ok}}" }
"#;

    #[test]
    fn first_matching_rule_wins() {
        let r = rules(DEMO);
        let answer = |r: &[Rule], p: &Push| match super::answer(r, p) {
            Action::Reply(reply) => reply,
            other => panic!("unexpected {other:?}"),
        };
        let sub = push(
            "<MsgType>event</MsgType><Event>subscribe</Event><EventKey>qrscene_spring_poster</EventKey>",
        );
        assert_eq!(
            answer(&r, &sub),
            Reply::Text("Welcome, you came from the spring_poster poster".into())
        );
        let click = push("<MsgType>event</MsgType><Event>click</Event><EventKey>MENU_A</EventKey>");
        assert_eq!(answer(&r, &click), Reply::Text("clicked MENU_A".into()));
        let news = push("<MsgType>text</MsgType><Content>news please</Content><MsgId>1</MsgId>");
        assert!(matches!(answer(&r, &news), Reply::News(a) if a.len() == 1));
        let echo = push("<MsgType>text</MsgType><Content>hi</Content><MsgId>2</MsgId>");
        assert_eq!(answer(&r, &echo), Reply::Text("hi {ok}".into()));
        let plain_sub = push("<MsgType>event</MsgType><Event>subscribe</Event>");
        assert_eq!(answer(&r, &plain_sub), Reply::None);
    }

    #[test]
    fn forwards_and_literal_answers() {
        let r = rules(
            "[[rules]]\nwhen = { msg_type = \"text\" }\nreply = { forward = \"http://127.0.0.1:9/hook\" }\n\
                       [[rules]]\nreply = { forward = { url = \"https://x/y\", background = true } }\n",
        );
        let text = push("<MsgType>text</MsgType><Content>hi</Content><MsgId>1</MsgId>");
        assert_eq!(
            answer(&r, &text),
            Action::Forward { url: "http://127.0.0.1:9/hook".into(), background: false }
        );
        let other = push("<MsgType>event</MsgType><Event>VIEW</Event>");
        assert_eq!(
            answer(&r, &other),
            Action::Forward { url: "https://x/y".into(), background: true }
        );

        assert_eq!(
            literal_reply(b"{\"text\": \"{content} ok\"}").unwrap(),
            Reply::Text("{content} ok".into())
        );
        assert_eq!(literal_reply(b"").unwrap(), Reply::None);
        assert_eq!(literal_reply(b"{}").unwrap(), Reply::None);
        assert!(
            matches!(literal_reply(b"{\"news\": [{\"title\": \"t\"}]}").unwrap(), Reply::News(a) if a.len() == 1)
        );
        assert!(literal_reply(b"{\"text\": 1}").is_err());
        assert!(literal_reply(b"{\"forward\": \"http://a\"}").is_err());
        assert!(literal_reply(b"not json").is_err());
        for bad in
            ["ftp://x/y", "http://127.0.0.1:99999/x", "http://user:pw@host/x", "http:///x", "hook"]
        {
            assert!(check_forward_url(bad).is_err(), "{bad}");
        }
        assert!(check_forward_url("https://hooks.example.com:8443/wx?k=1").is_ok());
    }

    #[test]
    fn bad_templates_and_reply_shapes_are_refused() {
        assert!(Template::parse("{nope}").unwrap_err().contains("unknown placeholder {nope}"));
        assert!(Template::parse("a } b").is_err());
        let two = RuleFile {
            when: WhenFile::default(),
            reply: ReplyFile { text: Some("a".into()), none: Some(true), ..ReplyFile::default() },
        };
        assert!(
            Rule::check(two, "r").unwrap_err().to_string().starts_with("r.reply: give exactly one")
        );
    }
}
