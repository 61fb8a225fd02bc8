//! What WeChat pushes (接收普通消息 and 接收事件推送, protocol.md §5–§7): a [`Push`] with
//! its common header, a typed [`Kind`] and the whole element tree, so that no field is
//! ever lost, including those of message and event types WeChat adds later.
//!
//! Typing rules: `MsgType` and `Event` compare case-insensitively but keep their spelling;
//! ids stay strings (they pass 2^53 and WeCom's are not numeric); numbers keep their raw
//! text and parse on demand; missing and empty are the same for optional fields.

use sha1::{Digest, Sha1};

use crate::xml::{self, Element, XmlError};

/// Why an authentic document is not a push we can type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("root element is <{0}>, not <xml>")]
    Root(String),
    #[error("required field {0} is missing or empty")]
    Missing(&'static str),
    #[error("decrypted message is not utf-8")]
    NotUtf8,
}

/// A numeric field as WeChat sent it (with or without CDATA). Parsing never fails the
/// push: a bad number is kept as text and its parsed value is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Number(pub String);

impl Number {
    fn from_field(el: &Element, name: &str) -> Self {
        Number(el.text_of(name).unwrap_or_default().to_owned())
    }

    pub fn raw(&self) -> &str {
        &self.0
    }

    pub fn as_f64(&self) -> Option<f64> {
        self.0.trim().parse().ok().filter(|v: &f64| v.is_finite())
    }

    pub fn as_i64(&self) -> Option<i64> {
        self.0.trim().parse().ok()
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.0.trim().parse().ok()
    }
}

/// One pushed document: header fields, its classification and every element.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// `ToUserName`: the account's original id (`gh_…`).
    pub to: String,
    /// `FromUserName`: the follower's OpenID, or a system account for system events.
    pub from: String,
    /// `CreateTime` as sent (Unix seconds).
    pub create_time: Number,
    /// `MsgType` with WeChat's spelling.
    pub msg_type: String,
    /// `MsgId` of ordinary messages, kept as text.
    pub msg_id: Option<String>,
    pub kind: Kind,
    /// The whole document, for fields the typed view does not name.
    pub fields: Element,
}

/// The classification of a push.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Message(Message),
    Event(Event),
}

/// Ordinary messages a follower sends (接收普通消息).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Text {
        content: String,
        bizmsgmenuid: Option<String>,
    },
    Image {
        pic_url: String,
        media_id: String,
    },
    Voice {
        media_id: String,
        format: String,
        recognition: Option<String>,
        media_id_16k: Option<String>,
    },
    Video {
        media_id: String,
        thumb_media_id: String,
    },
    ShortVideo {
        media_id: String,
        thumb_media_id: String,
    },
    /// A location the follower chose to send (Location_X is latitude, Location_Y longitude).
    Location {
        latitude: Number,
        longitude: Number,
        scale: Number,
        label: String,
    },
    Link {
        title: String,
        description: String,
        url: String,
    },
    /// Undocumented but observed when a follower sends a file.
    File {
        title: String,
        description: String,
        file_key: String,
        file_md5: String,
        file_total_len: Number,
    },
    MiniProgramPage {
        app_id: String,
        title: String,
        page_path: String,
        thumb_url: String,
        thumb_media_id: String,
    },
    /// A `MsgType` this version does not know; every field is in [`Push::fields`].
    Unknown {
        msg_type: String,
    },
}

/// One picture of a `pic_*` menu event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PicItem {
    pub md5: String,
}

/// One entry of a subscribe-message event's `List`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeMsgItem {
    pub template_id: String,
    pub status: String,
    pub popup_scene: Option<String>,
    pub msg_id: Option<String>,
    pub error_code: Option<String>,
    pub error_status: Option<String>,
}

/// An article result of `PUBLISHJOBFINISH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedArticle {
    pub idx: String,
    pub url: String,
}

/// Event pushes (`MsgType = event`, 接收事件推送 and later additions).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A follow; through a parametric QR code `scene` holds the scene value with
    /// `qrscene_` stripped once from the start.
    Subscribe {
        event_key: Option<String>,
        ticket: Option<String>,
        scene: Option<String>,
    },
    Unsubscribe,
    /// An existing follower scanned a parametric QR code; the EventKey is the scene.
    Scan {
        scene: Option<String>,
        ticket: Option<String>,
    },
    /// The automatic location report (上报地理位置), distinct from a location message.
    LocationReport {
        latitude: Number,
        longitude: Number,
        precision: Number,
    },
    Click {
        key: String,
    },
    View {
        url: String,
        menu_id: Option<String>,
    },
    ScancodePush {
        key: String,
        scan_type: String,
        scan_result: String,
    },
    ScancodeWaitmsg {
        key: String,
        scan_type: String,
        scan_result: String,
    },
    /// `pic_sysphoto`, `pic_photo_or_album` or `pic_weixin`; the name is in `event`.
    Pictures {
        event: String,
        key: String,
        count: Number,
        pics: Vec<PicItem>,
    },
    LocationSelect {
        key: String,
        latitude: Number,
        longitude: Number,
        scale: Number,
        label: String,
        poiname: String,
    },
    ViewMiniprogram {
        path: String,
        menu_id: Option<String>,
    },
    MassSendJobFinish {
        msg_id: String,
        status: String,
        total: Number,
        filter: Number,
        sent: Number,
        errors: Number,
    },
    TemplateSendJobFinish {
        msg_id: String,
        status: String,
    },
    PublishJobFinish {
        publish_id: String,
        status: Number,
        article_id: Option<String>,
        articles: Vec<PublishedArticle>,
        fail_idx: Vec<String>,
    },
    SubscribeMsgPopup {
        items: Vec<SubscribeMsgItem>,
    },
    SubscribeMsgChange {
        items: Vec<SubscribeMsgItem>,
    },
    SubscribeMsgSent {
        items: Vec<SubscribeMsgItem>,
    },
    KfCreateSession {
        kf_account: String,
    },
    KfCloseSession {
        kf_account: String,
    },
    KfSwitchSession {
        from_kf_account: String,
        to_kf_account: String,
    },
    /// 微信认证 results; the name (e.g. `naming_verify_fail`) is in `event`.
    Verification {
        event: String,
        expired_time: Option<String>,
        fail_time: Option<String>,
        fail_reason: Option<String>,
    },
    /// `user_info_modified`, `user_authorization_revoke`, `user_authorization_cancellation`.
    UserAuthorization {
        event: String,
        open_id: String,
        app_id: String,
        revoke_info: Option<String>,
    },
    /// Card and member-card events (§7.5); every field stays in [`Push::fields`].
    Card {
        event: String,
        card_id: Option<String>,
        user_card_code: Option<String>,
    },
    /// An event this version does not type; every field is in [`Push::fields`].
    Unknown {
        event: String,
    },
}

impl Push {
    /// Parses and types a decrypted push document.
    pub fn parse(doc: &str) -> Result<Push, PushError> {
        Push::from_element(xml::parse(doc)?)
    }

    /// Types an already parsed document.
    pub fn from_element(root: Element) -> Result<Push, PushError> {
        if root.name != "xml" {
            return Err(PushError::Root(root.name));
        }
        let from =
            root.text_of("FromUserName").ok_or(PushError::Missing("FromUserName"))?.to_owned();
        let msg_type = root.text_of("MsgType").ok_or(PushError::Missing("MsgType"))?.to_owned();
        let to = root.text_of("ToUserName").unwrap_or_default().to_owned();
        let create_time = Number::from_field(&root, "CreateTime");
        let msg_id = root.text_of("MsgId").map(str::to_owned);

        let kind = if msg_type.eq_ignore_ascii_case("event") {
            let name = root.text_of("Event").ok_or(PushError::Missing("Event"))?;
            Kind::Event(Event::from_fields(name, &root))
        } else {
            Kind::Message(Message::from_fields(&msg_type, &root))
        };
        Ok(Push { to, from, create_time, msg_type, msg_id, kind, fields: root })
    }

    /// The `Event` name as sent, for event pushes.
    pub fn event_name(&self) -> Option<&str> {
        self.fields.text_of("Event").filter(|_| matches!(self.kind, Kind::Event(_)))
    }

    /// The `EventKey` as sent, when present and not empty.
    pub fn event_key(&self) -> Option<&str> {
        self.fields.text_of("EventKey")
    }

    /// The text of a message, for text messages.
    pub fn content(&self) -> Option<&str> {
        match &self.kind {
            Kind::Message(Message::Text { content, .. }) => Some(content),
            _ => None,
        }
    }

    /// The QR-code scene of a parametric subscribe or a SCAN.
    pub fn scene(&self) -> Option<&str> {
        match &self.kind {
            Kind::Event(Event::Subscribe { scene, .. } | Event::Scan { scene, .. }) => {
                scene.as_deref()
            }
            _ => None,
        }
    }

    /// Whether a follower sent this as an ordinary message (a passive news reply to such
    /// a push may carry one article only).
    pub fn is_user_message(&self) -> bool {
        matches!(self.kind, Kind::Message(_))
    }

    /// A stable snake_case name of the classification, e.g. `text_message`,
    /// `location_report_event`, `unknown_event`.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Message(m) => m.kind_name(),
            Kind::Event(e) => e.kind_name(),
        }
    }

    /// The key that recognises WeChat's redeliveries of this push (protocol.md §9). It
    /// is built from decrypted fields only, since a retry comes with a new nonce,
    /// signature and ciphertext.
    ///
    /// - Messages: `FromUserName` + `MsgId`. MsgIds were seen to collide between users,
    ///   hence the sender.
    /// - Events have no MsgId. `FromUserName` + `CreateTime` collides for different events
    ///   in the same second and for LOCATION bursts, so `Event`, `EventKey` and a digest
    ///   of every other field (coordinates, job ids, card codes …) are added. A retry
    ///   carries the same document, so the digest is the same.
    ///
    /// Parts are joined with `:` and escaped (`%` as `%25`, `:` as `%3A`), so that no two
    /// different pushes can spell the same key.
    pub fn dedup_key(&self) -> String {
        let e = escape_part;
        let key = match (&self.kind, &self.msg_id) {
            (Kind::Message(_), Some(id)) => format!("msg:{}:{}", e(&self.from), e(id)),
            _ => format!(
                "{}:{}:{}:{}:{}:{}",
                if matches!(self.kind, Kind::Event(_)) { "evt" } else { "doc" },
                e(&self.from),
                e(self.create_time.raw()),
                e(self.fields.text_of("Event").unwrap_or_default()),
                e(self.event_key().unwrap_or_default()),
                digest(&self.fields),
            ),
        };
        bounded(key)
    }
}

/// Longest dedup key kept as it is. Databases index keys, and index entries have a size
/// limit (PostgreSQL's B-tree takes about 2.7 KB): a longer key (a huge EventKey or
/// MsgId) keeps its start and ends in a digest of the whole.
pub const MAX_DEDUP_KEY: usize = 512;

fn bounded(key: String) -> String {
    if key.len() <= MAX_DEDUP_KEY {
        return key;
    }
    let mut cut = 256;
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    format!("{}~{}", &key[..cut], hex::encode(h.finalize()))
}

fn escape_part(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([':', '%']) { s.replace('%', "%25").replace(':', "%3A").into() } else { s.into() }
}

/// A short digest over every element name and text of a document, in order.
fn digest(root: &Element) -> String {
    fn feed(h: &mut Sha1, el: &Element) {
        h.update(el.name.as_bytes());
        h.update([0]);
        h.update(el.text.as_bytes());
        h.update([1]);
        for c in &el.children {
            feed(h, c);
        }
        h.update([2]);
    }
    let mut h = Sha1::new();
    feed(&mut h, root);
    hex::encode(&h.finalize()[..8])
}

fn text(el: &Element, name: &str) -> String {
    el.text_of(name).unwrap_or_default().to_owned()
}

fn opt(el: &Element, name: &str) -> Option<String> {
    el.text_of(name).map(str::to_owned)
}

impl Message {
    fn from_fields(msg_type: &str, f: &Element) -> Message {
        match msg_type.to_ascii_lowercase().as_str() {
            "text" => Message::Text {
                content: f.child("Content").map(|c| c.text.clone()).unwrap_or_default(),
                bizmsgmenuid: opt(f, "bizmsgmenuid"),
            },
            "image" => Message::Image { pic_url: text(f, "PicUrl"), media_id: text(f, "MediaId") },
            "voice" => Message::Voice {
                media_id: text(f, "MediaId"),
                format: text(f, "Format"),
                recognition: opt(f, "Recognition"),
                media_id_16k: opt(f, "MediaId16K"),
            },
            "video" => Message::Video {
                media_id: text(f, "MediaId"),
                thumb_media_id: text(f, "ThumbMediaId"),
            },
            "shortvideo" => Message::ShortVideo {
                media_id: text(f, "MediaId"),
                thumb_media_id: text(f, "ThumbMediaId"),
            },
            "location" => Message::Location {
                latitude: Number::from_field(f, "Location_X"),
                longitude: Number::from_field(f, "Location_Y"),
                scale: Number::from_field(f, "Scale"),
                label: f.child("Label").map(|c| c.text.clone()).unwrap_or_default(),
            },
            "link" => Message::Link {
                title: text(f, "Title"),
                description: text(f, "Description"),
                url: text(f, "Url"),
            },
            "file" => Message::File {
                title: text(f, "Title"),
                description: text(f, "Description"),
                file_key: text(f, "FileKey"),
                file_md5: text(f, "FileMd5"),
                file_total_len: Number::from_field(f, "FileTotalLen"),
            },
            "miniprogrampage" => Message::MiniProgramPage {
                app_id: text(f, "AppId"),
                title: text(f, "Title"),
                page_path: text(f, "PagePath"),
                thumb_url: text(f, "ThumbUrl"),
                thumb_media_id: text(f, "ThumbMediaId"),
            },
            _ => Message::Unknown { msg_type: msg_type.to_owned() },
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Text { .. } => "text_message",
            Message::Image { .. } => "image_message",
            Message::Voice { .. } => "voice_message",
            Message::Video { .. } => "video_message",
            Message::ShortVideo { .. } => "shortvideo_message",
            Message::Location { .. } => "location_message",
            Message::Link { .. } => "link_message",
            Message::File { .. } => "file_message",
            Message::MiniProgramPage { .. } => "miniprogrampage_message",
            Message::Unknown { .. } => "unknown_message",
        }
    }
}

const CARD_EVENTS: &[&str] = &[
    "card_pass_check",
    "card_not_pass_check",
    "user_get_card",
    "user_gifting_card",
    "user_del_card",
    "user_enter_session_from_card",
    "submit_membercard_user_info",
    "user_consume_card",
    "user_pay_from_pay_cell",
    "user_view_card",
    "update_member_card",
    "card_sku_remind",
    "card_pay_order",
];

impl Event {
    fn from_fields(name: &str, f: &Element) -> Event {
        let lower = name.to_ascii_lowercase();
        let key = || text(f, "EventKey");
        match lower.as_str() {
            "subscribe" => {
                let event_key = opt(f, "EventKey");
                // Strip the prefix once and only at the start: a scene may itself contain
                // "qrscene_" (wechatpy #430). Other prefixes (last_trade_no_, scanbarcode|)
                // are not scenes.
                let scene = event_key
                    .as_deref()
                    .and_then(|k| k.strip_prefix("qrscene_"))
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
                Event::Subscribe { event_key, ticket: opt(f, "Ticket"), scene }
            }
            "unsubscribe" => Event::Unsubscribe,
            "scan" => Event::Scan { scene: opt(f, "EventKey"), ticket: opt(f, "Ticket") },
            "location" => Event::LocationReport {
                latitude: Number::from_field(f, "Latitude"),
                longitude: Number::from_field(f, "Longitude"),
                precision: Number::from_field(f, "Precision"),
            },
            "click" => Event::Click { key: key() },
            "view" => Event::View { url: key(), menu_id: opt(f, "MenuId") },
            "scancode_push" | "scancode_waitmsg" => {
                let scan_type = f.text_at("ScanCodeInfo/ScanType").unwrap_or_default().to_owned();
                let scan_result =
                    f.at("ScanCodeInfo/ScanResult").map(|e| e.text.clone()).unwrap_or_default();
                if lower == "scancode_push" {
                    Event::ScancodePush { key: key(), scan_type, scan_result }
                } else {
                    Event::ScancodeWaitmsg { key: key(), scan_type, scan_result }
                }
            }
            "pic_sysphoto" | "pic_photo_or_album" | "pic_weixin" => {
                let info = f.child("SendPicsInfo");
                // Several <PicList> siblings of one item each were observed (WxJava #305):
                // collect items from all of them.
                let pics = info
                    .into_iter()
                    .flat_map(|i| i.children_named("PicList"))
                    .flat_map(|l| l.children_named("item"))
                    .map(|item| PicItem { md5: text(item, "PicMd5Sum") })
                    .collect();
                let count = info.map(|i| Number::from_field(i, "Count")).unwrap_or_default();
                Event::Pictures { event: name.to_owned(), key: key(), count, pics }
            }
            "location_select" => {
                let empty = Element::default();
                let info = f.child("SendLocationInfo").unwrap_or(&empty);
                Event::LocationSelect {
                    key: key(),
                    latitude: Number::from_field(info, "Location_X"),
                    longitude: Number::from_field(info, "Location_Y"),
                    scale: Number::from_field(info, "Scale"),
                    label: info.child("Label").map(|c| c.text.clone()).unwrap_or_default(),
                    poiname: info.child("Poiname").map(|c| c.text.clone()).unwrap_or_default(),
                }
            }
            "view_miniprogram" => Event::ViewMiniprogram { path: key(), menu_id: opt(f, "MenuId") },
            "masssendjobfinish" => Event::MassSendJobFinish {
                msg_id: job_msg_id(f),
                status: text(f, "Status"),
                total: Number::from_field(f, "TotalCount"),
                filter: Number::from_field(f, "FilterCount"),
                sent: Number::from_field(f, "SentCount"),
                errors: Number::from_field(f, "ErrorCount"),
            },
            "templatesendjobfinish" => {
                Event::TemplateSendJobFinish { msg_id: job_msg_id(f), status: text(f, "Status") }
            }
            "publishjobfinish" => {
                let empty = Element::default();
                let info = f.child("PublishEventInfo").unwrap_or(&empty);
                let articles = info
                    .children_named("article_detail")
                    .flat_map(|d| d.children_named("item"))
                    .map(|i| PublishedArticle { idx: text(i, "idx"), url: text(i, "article_url") })
                    .collect();
                Event::PublishJobFinish {
                    publish_id: text(info, "publish_id"),
                    status: Number::from_field(info, "publish_status"),
                    article_id: opt(info, "article_id"),
                    articles,
                    fail_idx: info.children_named("fail_idx").map(|e| e.text.clone()).collect(),
                }
            }
            "subscribe_msg_popup_event" => {
                Event::SubscribeMsgPopup { items: subscribe_items(f, "SubscribeMsgPopupEvent") }
            }
            "subscribe_msg_change_event" => {
                Event::SubscribeMsgChange { items: subscribe_items(f, "SubscribeMsgChangeEvent") }
            }
            "subscribe_msg_sent_event" => {
                Event::SubscribeMsgSent { items: subscribe_items(f, "SubscribeMsgSentEvent") }
            }
            "kf_create_session" => Event::KfCreateSession { kf_account: text(f, "KfAccount") },
            "kf_close_session" => Event::KfCloseSession { kf_account: text(f, "KfAccount") },
            "kf_switch_session" => Event::KfSwitchSession {
                from_kf_account: text(f, "FromKfAccount"),
                to_kf_account: text(f, "ToKfAccount"),
            },
            "qualification_verify_success"
            | "qualification_verify_fail"
            | "naming_verify_success"
            | "naming_verify_fail"
            | "annual_renew"
            | "verify_expired" => Event::Verification {
                event: name.to_owned(),
                expired_time: opt(f, "ExpiredTime"),
                fail_time: opt(f, "FailTime"),
                fail_reason: opt(f, "FailReason"),
            },
            "user_info_modified"
            | "user_authorization_revoke"
            | "user_authorization_cancellation" => Event::UserAuthorization {
                event: name.to_owned(),
                open_id: text(f, "OpenID"),
                app_id: text(f, "AppID"),
                revoke_info: opt(f, "RevokeInfo"),
            },
            other if CARD_EVENTS.contains(&other) => Event::Card {
                event: name.to_owned(),
                card_id: opt(f, "CardId"),
                user_card_code: opt(f, "UserCardCode"),
            },
            _ => Event::Unknown { event: name.to_owned() },
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::Subscribe { .. } => "subscribe_event",
            Event::Unsubscribe => "unsubscribe_event",
            Event::Scan { .. } => "scan_event",
            Event::LocationReport { .. } => "location_report_event",
            Event::Click { .. } => "click_event",
            Event::View { .. } => "view_event",
            Event::ScancodePush { .. } => "scancode_push_event",
            Event::ScancodeWaitmsg { .. } => "scancode_waitmsg_event",
            Event::Pictures { .. } => "pictures_event",
            Event::LocationSelect { .. } => "location_select_event",
            Event::ViewMiniprogram { .. } => "view_miniprogram_event",
            Event::MassSendJobFinish { .. } => "mass_send_job_finish_event",
            Event::TemplateSendJobFinish { .. } => "template_send_job_finish_event",
            Event::PublishJobFinish { .. } => "publish_job_finish_event",
            Event::SubscribeMsgPopup { .. } => "subscribe_msg_popup_event",
            Event::SubscribeMsgChange { .. } => "subscribe_msg_change_event",
            Event::SubscribeMsgSent { .. } => "subscribe_msg_sent_event",
            Event::KfCreateSession { .. } => "kf_create_session_event",
            Event::KfCloseSession { .. } => "kf_close_session_event",
            Event::KfSwitchSession { .. } => "kf_switch_session_event",
            Event::Verification { .. } => "verification_event",
            Event::UserAuthorization { .. } => "user_authorization_event",
            Event::Card { .. } => "card_event",
            Event::Unknown { .. } => "unknown_event",
        }
    }
}

/// Job results spell the id `MsgID`; look up `MsgId` too (wechatpy #116).
fn job_msg_id(f: &Element) -> String {
    f.text_of("MsgID").or_else(|| f.text_of("MsgId")).unwrap_or_default().to_owned()
}

/// `List` appears once per template, once or many times.
fn subscribe_items(f: &Element, container: &str) -> Vec<SubscribeMsgItem> {
    f.children_named(container)
        .flat_map(|c| c.children_named("List"))
        .map(|l| SubscribeMsgItem {
            template_id: text(l, "TemplateId"),
            status: text(l, "SubscribeStatusString"),
            popup_scene: opt(l, "PopupScene"),
            msg_id: opt(l, "MsgID").or_else(|| opt(l, "MsgId")),
            error_code: opt(l, "ErrorCode"),
            error_status: opt(l, "ErrorStatus"),
        })
        .collect()
}
