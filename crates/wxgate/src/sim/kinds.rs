//! Every push WeChat sends, as a command-line kind for `wxgate sim push`, written the way
//! WeChat writes it (strings in CDATA, numbers bare, nested menu payloads).

use clap::Subcommand;
use wxgate_protocol::xml::{push_cdata_element, push_number_element};

use super::compose::header;

/// A push to compose.
#[derive(Debug, Clone, Subcommand)]
pub enum Kind {
    /// A text message.
    Text {
        #[arg(long)]
        content: String,
    },
    /// A picture message.
    Image {
        #[arg(long, default_value = "http://mmbiz.qpic.cn/sim/0")]
        pic_url: String,
        #[arg(long, default_value = "SIM_MEDIA_ID")]
        media_id: String,
    },
    /// A voice message.
    Voice {
        #[arg(long, default_value = "SIM_MEDIA_ID")]
        media_id: String,
        #[arg(long, default_value = "amr")]
        format: String,
        #[arg(long)]
        recognition: Option<String>,
    },
    /// A video message.
    Video {
        #[arg(long, default_value = "SIM_MEDIA_ID")]
        media_id: String,
        #[arg(long, default_value = "SIM_THUMB_ID")]
        thumb_media_id: String,
    },
    /// A short video message.
    Shortvideo {
        #[arg(long, default_value = "SIM_MEDIA_ID")]
        media_id: String,
        #[arg(long, default_value = "SIM_THUMB_ID")]
        thumb_media_id: String,
    },
    /// A location message (the follower sends a place).
    Location {
        #[arg(long, allow_hyphen_values = true)]
        lat: String,
        #[arg(long, allow_hyphen_values = true)]
        lng: String,
        #[arg(long, default_value = "15")]
        scale: String,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// A link message.
    Link {
        #[arg(long)]
        title: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        url: String,
    },
    /// Follow, through a parametric QR code when --scene is given.
    Subscribe {
        #[arg(long)]
        scene: Option<String>,
    },
    /// Unfollow.
    Unsubscribe,
    /// A follower scans a parametric QR code.
    Scan {
        #[arg(long)]
        scene: String,
    },
    /// The automatic location report.
    LocationReport {
        #[arg(long, allow_hyphen_values = true)]
        lat: String,
        #[arg(long, allow_hyphen_values = true)]
        lng: String,
        #[arg(long, default_value = "65.000000")]
        precision: String,
    },
    /// A menu click.
    Click {
        #[arg(long)]
        key: String,
    },
    /// A menu link opened.
    View {
        #[arg(long)]
        url: String,
        #[arg(long)]
        menu_id: Option<String>,
    },
    /// Menu: scan a code, the client shows the result.
    ScancodePush {
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "qrcode")]
        scan_type: String,
        #[arg(long)]
        scan_result: String,
    },
    /// Menu: scan a code and wait for the account's message.
    ScancodeWaitmsg {
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "qrcode")]
        scan_type: String,
        #[arg(long)]
        scan_result: String,
    },
    /// Menu: take a photo.
    PicSysphoto {
        #[arg(long)]
        key: String,
        /// MD5 of each picture (repeat the flag).
        #[arg(long = "md5")]
        md5s: Vec<String>,
    },
    /// Menu: photo or album.
    PicPhotoOrAlbum {
        #[arg(long)]
        key: String,
        #[arg(long = "md5")]
        md5s: Vec<String>,
    },
    /// Menu: WeChat album.
    PicWeixin {
        #[arg(long)]
        key: String,
        #[arg(long = "md5")]
        md5s: Vec<String>,
    },
    /// Menu: choose a location.
    LocationSelect {
        #[arg(long)]
        key: String,
        #[arg(long, allow_hyphen_values = true)]
        lat: String,
        #[arg(long, allow_hyphen_values = true)]
        lng: String,
        #[arg(long, default_value = "15")]
        scale: String,
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long, default_value = "")]
        poiname: String,
    },
    /// Menu: open a mini program page.
    ViewMiniprogram {
        #[arg(long)]
        path: String,
        #[arg(long)]
        menu_id: Option<String>,
    },
    /// A mass send finished.
    MassSendJobFinish {
        #[arg(long)]
        msg_id: String,
        #[arg(long, default_value = "send success")]
        status: String,
        #[arg(long, default_value = "1")]
        total: String,
    },
    /// A template message was delivered (or not).
    TemplateSendJobFinish {
        #[arg(long)]
        msg_id: String,
        #[arg(long, default_value = "success")]
        status: String,
    },
    /// A publication finished.
    PublishJobFinish {
        #[arg(long)]
        publish_id: String,
        #[arg(long, default_value = "0")]
        status: String,
        #[arg(long)]
        article_url: Option<String>,
    },
}

impl Kind {
    /// Whether this kind is an ordinary message (it carries a MsgId).
    pub fn is_message(&self) -> bool {
        matches!(
            self,
            Kind::Text { .. }
                | Kind::Image { .. }
                | Kind::Voice { .. }
                | Kind::Video { .. }
                | Kind::Shortvideo { .. }
                | Kind::Location { .. }
                | Kind::Link { .. }
        )
    }

    /// The push document.
    pub fn to_xml(&self, to: &str, from: &str, create_time: u64, msg_id: u64) -> String {
        let mut x;
        let cd = |x: &mut String, n: &str, v: &str| push_cdata_element(x, n, v);
        match self {
            Kind::Text { content } => {
                x = header(to, from, create_time, "text");
                cd(&mut x, "Content", content);
            }
            Kind::Image { pic_url, media_id } => {
                x = header(to, from, create_time, "image");
                cd(&mut x, "PicUrl", pic_url);
                cd(&mut x, "MediaId", media_id);
            }
            Kind::Voice { media_id, format, recognition } => {
                x = header(to, from, create_time, "voice");
                cd(&mut x, "MediaId", media_id);
                cd(&mut x, "Format", format);
                if let Some(r) = recognition {
                    cd(&mut x, "Recognition", r);
                }
            }
            Kind::Video { media_id, thumb_media_id }
            | Kind::Shortvideo { media_id, thumb_media_id } => {
                let t = if matches!(self, Kind::Video { .. }) { "video" } else { "shortvideo" };
                x = header(to, from, create_time, t);
                cd(&mut x, "MediaId", media_id);
                cd(&mut x, "ThumbMediaId", thumb_media_id);
            }
            Kind::Location { lat, lng, scale, label } => {
                x = header(to, from, create_time, "location");
                push_number_element(&mut x, "Location_X", lat);
                push_number_element(&mut x, "Location_Y", lng);
                push_number_element(&mut x, "Scale", scale);
                cd(&mut x, "Label", label);
            }
            Kind::Link { title, description, url } => {
                x = header(to, from, create_time, "link");
                cd(&mut x, "Title", title);
                cd(&mut x, "Description", description);
                cd(&mut x, "Url", url);
            }
            _ => {
                x = header(to, from, create_time, "event");
                self.event_body(&mut x);
            }
        }
        if self.is_message() {
            push_number_element(&mut x, "MsgId", msg_id);
        }
        x.push_str("</xml>");
        x
    }

    fn event_body(&self, x: &mut String) {
        let cd = |x: &mut String, n: &str, v: &str| push_cdata_element(x, n, v);
        let num = |x: &mut String, n: &str, v: &str| push_number_element(x, n, v);
        match self {
            Kind::Subscribe { scene } => {
                cd(x, "Event", "subscribe");
                match scene {
                    Some(s) => {
                        cd(x, "EventKey", &format!("qrscene_{s}"));
                        cd(x, "Ticket", "gQSimTicket0000000000000");
                    }
                    None => cd(x, "EventKey", ""),
                }
            }
            Kind::Unsubscribe => {
                cd(x, "Event", "unsubscribe");
                cd(x, "EventKey", "");
            }
            Kind::Scan { scene } => {
                cd(x, "Event", "SCAN");
                cd(x, "EventKey", scene);
                cd(x, "Ticket", "gQSimTicket0000000000000");
            }
            Kind::LocationReport { lat, lng, precision } => {
                cd(x, "Event", "LOCATION");
                num(x, "Latitude", lat);
                num(x, "Longitude", lng);
                num(x, "Precision", precision);
            }
            Kind::Click { key } => {
                cd(x, "Event", "CLICK");
                cd(x, "EventKey", key);
            }
            Kind::View { url, menu_id } => {
                cd(x, "Event", "VIEW");
                cd(x, "EventKey", url);
                if let Some(m) = menu_id {
                    num(x, "MenuId", m);
                }
            }
            Kind::ScancodePush { key, scan_type, scan_result }
            | Kind::ScancodeWaitmsg { key, scan_type, scan_result } => {
                let name = if matches!(self, Kind::ScancodePush { .. }) {
                    "scancode_push"
                } else {
                    "scancode_waitmsg"
                };
                cd(x, "Event", name);
                cd(x, "EventKey", key);
                x.push_str("<ScanCodeInfo>");
                cd(x, "ScanType", scan_type);
                cd(x, "ScanResult", scan_result);
                x.push_str("</ScanCodeInfo>");
            }
            Kind::PicSysphoto { key, md5s }
            | Kind::PicPhotoOrAlbum { key, md5s }
            | Kind::PicWeixin { key, md5s } => {
                let name = match self {
                    Kind::PicSysphoto { .. } => "pic_sysphoto",
                    Kind::PicPhotoOrAlbum { .. } => "pic_photo_or_album",
                    _ => "pic_weixin",
                };
                cd(x, "Event", name);
                cd(x, "EventKey", key);
                x.push_str("<SendPicsInfo>");
                num(x, "Count", &md5s.len().to_string());
                x.push_str("<PicList>");
                for m in md5s {
                    x.push_str("<item>");
                    cd(x, "PicMd5Sum", m);
                    x.push_str("</item>");
                }
                x.push_str("</PicList></SendPicsInfo>");
            }
            Kind::LocationSelect { key, lat, lng, scale, label, poiname } => {
                cd(x, "Event", "location_select");
                cd(x, "EventKey", key);
                x.push_str("<SendLocationInfo>");
                cd(x, "Location_X", lat);
                cd(x, "Location_Y", lng);
                cd(x, "Scale", scale);
                cd(x, "Label", label);
                cd(x, "Poiname", poiname);
                x.push_str("</SendLocationInfo>");
            }
            Kind::ViewMiniprogram { path, menu_id } => {
                cd(x, "Event", "view_miniprogram");
                cd(x, "EventKey", path);
                if let Some(m) = menu_id {
                    num(x, "MenuId", m);
                }
            }
            Kind::MassSendJobFinish { msg_id, status, total } => {
                cd(x, "Event", "MASSSENDJOBFINISH");
                num(x, "MsgID", msg_id);
                cd(x, "Status", status);
                num(x, "TotalCount", total);
                num(x, "FilterCount", total);
                num(x, "SentCount", total);
                num(x, "ErrorCount", "0");
            }
            Kind::TemplateSendJobFinish { msg_id, status } => {
                cd(x, "Event", "TEMPLATESENDJOBFINISH");
                num(x, "MsgID", msg_id);
                cd(x, "Status", status);
            }
            Kind::PublishJobFinish { publish_id, status, article_url } => {
                cd(x, "Event", "PUBLISHJOBFINISH");
                x.push_str("<PublishEventInfo>");
                num(x, "publish_id", publish_id);
                num(x, "publish_status", status);
                if let Some(url) = article_url {
                    x.push_str("<article_detail>");
                    num(x, "count", "1");
                    x.push_str("<item>");
                    num(x, "idx", "1");
                    cd(x, "article_url", url);
                    x.push_str("</item></article_detail>");
                }
                x.push_str("</PublishEventInfo>");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wxgate_protocol::{Kind as Typed, Push};

    #[test]
    fn every_kind_types_as_itself() {
        let kinds = [
            (Kind::Text { content: "hi".into() }, "text_message"),
            (
                Kind::Location {
                    lat: "-33.8".into(),
                    lng: "151.2".into(),
                    scale: "15".into(),
                    label: "x".into(),
                },
                "location_message",
            ),
            (Kind::Subscribe { scene: Some("qrscene_a".into()) }, "subscribe_event"),
            (Kind::Scan { scene: "42".into() }, "scan_event"),
            (
                Kind::LocationReport { lat: "1".into(), lng: "2".into(), precision: "3".into() },
                "location_report_event",
            ),
            (
                Kind::PicWeixin { key: "k".into(), md5s: vec!["a".into(), "b".into()] },
                "pictures_event",
            ),
            (
                Kind::PublishJobFinish {
                    publish_id: "1".into(),
                    status: "0".into(),
                    article_url: Some("u".into()),
                },
                "publish_job_finish_event",
            ),
        ];
        for (kind, name) in kinds {
            let push = Push::parse(&kind.to_xml("gh", "o", 1, 7)).unwrap();
            assert_eq!(push.kind_name(), name);
            assert_eq!(push.msg_id.is_some(), kind.is_message());
        }
        let push = Push::parse(
            &Kind::Subscribe { scene: Some("qrscene_a".into()) }.to_xml("gh", "o", 1, 7),
        )
        .unwrap();
        assert_eq!(push.scene(), Some("qrscene_a"), "the prefix is stripped once");
        let push = Push::parse(
            &Kind::PicWeixin { key: "k".into(), md5s: vec!["a".into(), "b".into()] }
                .to_xml("gh", "o", 1, 7),
        )
        .unwrap();
        assert!(
            matches!(push.kind, Typed::Event(wxgate_protocol::Event::Pictures { ref pics, .. }) if pics.len() == 2)
        );
    }
}
