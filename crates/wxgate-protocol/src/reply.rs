//! Passive replies (被动回复, protocol.md §8): the body of the HTTP answer to a push.
//!
//! A reply swaps the push's addresses (`ToUserName` = the follower, `FromUserName` = the
//! account), carries `CreateTime` in seconds, strings in CDATA and numbers bare, like the
//! official samples. Every string goes through the CDATA writer, so a `]]>` or a control
//! character in user text can never make the reply malformed.

use crate::xml::{push_cdata_element, push_number_element};

/// The body that means "no reply, do not retry".
pub const SUCCESS: &str = "success";

/// Most articles a news reply may carry when it answers anything but a user's message.
pub const MAX_ARTICLES: usize = 8;
/// Most articles when it answers a user's message (the rule since 2018-10).
pub const MAX_ARTICLES_FOR_MESSAGES: usize = 1;

/// One article of a news reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Article {
    pub title: String,
    pub description: String,
    pub url: String,
    pub pic_url: String,
}

/// What the account answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No reply: the body `success`.
    None,
    Text(String),
    Image {
        media_id: String,
    },
    Voice {
        media_id: String,
    },
    Video {
        media_id: String,
        title: String,
        description: String,
    },
    Music {
        title: String,
        description: String,
        music_url: String,
        hq_music_url: String,
        thumb_media_id: String,
    },
    News(Vec<Article>),
    /// Hand the conversation to customer service, optionally to one agent (`prefix@account`).
    TransferCustomerService {
        kf_account: Option<String>,
    },
}

impl Reply {
    /// The `MsgType` of the reply, `None` for no reply.
    pub fn msg_type(&self) -> Option<&'static str> {
        Some(match self {
            Reply::None => return None,
            Reply::Text(_) => "text",
            Reply::Image { .. } => "image",
            Reply::Voice { .. } => "voice",
            Reply::Video { .. } => "video",
            Reply::Music { .. } => "music",
            Reply::News(_) => "news",
            Reply::TransferCustomerService { .. } => "transfer_customer_service",
        })
    }

    /// Renders the reply XML. `to` is the follower (the push's FromUserName), `from` the
    /// account (the push's ToUserName). News beyond `max_articles` is dropped so that
    /// `ArticleCount` always equals the items sent; see [`Reply::dropped_articles`].
    /// Returns `None` for [`Reply::None`].
    pub fn to_xml(
        &self,
        to: &str,
        from: &str,
        create_time: u64,
        max_articles: usize,
    ) -> Option<String> {
        let msg_type = self.msg_type()?;
        let mut x = String::with_capacity(256);
        x.push_str("<xml>");
        push_cdata_element(&mut x, "ToUserName", to);
        push_cdata_element(&mut x, "FromUserName", from);
        push_number_element(&mut x, "CreateTime", create_time);
        push_cdata_element(&mut x, "MsgType", msg_type);
        match self {
            Reply::None => {}
            Reply::Text(content) => push_cdata_element(&mut x, "Content", content),
            Reply::Image { media_id } => media(&mut x, "Image", media_id),
            Reply::Voice { media_id } => media(&mut x, "Voice", media_id),
            Reply::Video { media_id, title, description } => {
                x.push_str("<Video>");
                push_cdata_element(&mut x, "MediaId", media_id);
                push_cdata_element(&mut x, "Title", title);
                push_cdata_element(&mut x, "Description", description);
                x.push_str("</Video>");
            }
            Reply::Music { title, description, music_url, hq_music_url, thumb_media_id } => {
                // The doc's table says MusicURL; its sample and every SDK send MusicUrl.
                x.push_str("<Music>");
                push_cdata_element(&mut x, "Title", title);
                push_cdata_element(&mut x, "Description", description);
                push_cdata_element(&mut x, "MusicUrl", music_url);
                push_cdata_element(&mut x, "HQMusicUrl", hq_music_url);
                push_cdata_element(&mut x, "ThumbMediaId", thumb_media_id);
                x.push_str("</Music>");
            }
            Reply::News(articles) => {
                let articles = &articles[..articles.len().min(max_articles.max(1))];
                push_number_element(&mut x, "ArticleCount", articles.len());
                x.push_str("<Articles>");
                for a in articles {
                    x.push_str("<item>");
                    push_cdata_element(&mut x, "Title", &a.title);
                    push_cdata_element(&mut x, "Description", &a.description);
                    push_cdata_element(&mut x, "PicUrl", &a.pic_url);
                    push_cdata_element(&mut x, "Url", &a.url);
                    x.push_str("</item>");
                }
                x.push_str("</Articles>");
            }
            Reply::TransferCustomerService { kf_account } => {
                if let Some(kf) = kf_account.as_deref().filter(|k| !k.is_empty()) {
                    x.push_str("<TransInfo>");
                    push_cdata_element(&mut x, "KfAccount", kf);
                    x.push_str("</TransInfo>");
                }
            }
        }
        x.push_str("</xml>");
        Some(x)
    }

    /// How many articles [`Reply::to_xml`] drops at this limit (to log it).
    pub fn dropped_articles(&self, max_articles: usize) -> usize {
        match self {
            Reply::News(a) => a.len().saturating_sub(max_articles.max(1)),
            _ => 0,
        }
    }
}

/// The most articles a news reply to this push may carry: one when a follower sent a
/// message, eight otherwise (WeChat drops the rest, or shows nothing).
pub fn max_articles(push: &crate::Push) -> usize {
    if push.is_user_message() { MAX_ARTICLES_FOR_MESSAGES } else { MAX_ARTICLES }
}

fn media(x: &mut String, element: &str, media_id: &str) {
    x.push('<');
    x.push_str(element);
    x.push('>');
    push_cdata_element(x, "MediaId", media_id);
    x.push_str("</");
    x.push_str(element);
    x.push('>');
}

/// The encrypted envelope of a reply (protocol.md §4.5): `Encrypt`, its `MsgSignature`,
/// `TimeStamp` in seconds and `Nonce`.
pub fn envelope(encrypt: &str, msg_signature: &str, timestamp: u64, nonce: &str) -> String {
    // Tencent's sample layout: one element per line.
    let mut x = String::with_capacity(encrypt.len() + 160);
    x.push_str("<xml>\n");
    push_cdata_element(&mut x, "Encrypt", encrypt);
    x.push('\n');
    push_cdata_element(&mut x, "MsgSignature", msg_signature);
    x.push('\n');
    push_number_element(&mut x, "TimeStamp", timestamp);
    x.push('\n');
    push_cdata_element(&mut x, "Nonce", nonce);
    x.push_str("\n</xml>");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::parse;

    #[test]
    fn text_reply_swaps_addresses_and_survives_hostile_text() {
        let xml =
            Reply::Text("a]]>b\u{2}c".into()).to_xml("oUser", "gh_acct", 1700000000, 8).unwrap();
        let el = parse(&xml).unwrap();
        assert_eq!(el.text_of("ToUserName"), Some("oUser"));
        assert_eq!(el.text_of("FromUserName"), Some("gh_acct"));
        assert_eq!(el.text_of("CreateTime"), Some("1700000000"));
        assert_eq!(el.text_of("Content"), Some("a]]>bc"));
    }

    #[test]
    fn news_is_cut_to_the_limit_and_counts_what_it_sends() {
        let news = Reply::News(vec![Article { title: "t".into(), ..Article::default() }; 9]);
        assert_eq!(news.dropped_articles(8), 1);
        let el = parse(&news.to_xml("o", "g", 1, 8).unwrap()).unwrap();
        assert_eq!(el.text_of("ArticleCount"), Some("8"));
        assert_eq!(el.child("Articles").unwrap().children.len(), 8);
    }

    #[test]
    fn transfer_with_and_without_agent() {
        let plain =
            Reply::TransferCustomerService { kf_account: None }.to_xml("o", "g", 1, 8).unwrap();
        assert!(!plain.contains("TransInfo"));
        let agent = Reply::TransferCustomerService { kf_account: Some("a@b".into()) }
            .to_xml("o", "g", 1, 8)
            .unwrap();
        assert_eq!(parse(&agent).unwrap().text_at("TransInfo/KfAccount"), Some("a@b"));
    }

    #[test]
    fn no_reply_renders_nothing() {
        assert_eq!(Reply::None.to_xml("o", "g", 1, 8), None);
    }
}
