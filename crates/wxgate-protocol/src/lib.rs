//! The WeChat Official Account push protocol (公众号消息推送), with no I/O: URL and message
//! signatures, the AES envelope of compatible and safe mode, typed pushes and passive
//! replies. The server, the simulator and any other program build on these pieces.
//!
//! ```
//! use wxgate_protocol::{Push, Reply, Kind, Message};
//!
//! let push = Push::parse(
//!     "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[oUser]]></FromUserName>\
//!      <CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>\
//!      <Content><![CDATA[hi]]></Content><MsgId>6054768590064713728</MsgId></xml>",
//! )
//! .unwrap();
//! assert!(matches!(&push.kind, Kind::Message(Message::Text { content, .. }) if content == "hi"));
//! assert_eq!(push.msg_id.as_deref(), Some("6054768590064713728"));
//!
//! let reply = Reply::Text("hello".into()).to_xml(&push.from, &push.to, 1700000001, 1).unwrap();
//! assert!(reply.starts_with("<xml><ToUserName><![CDATA[oUser]]></ToUserName>"));
//! ```

pub mod crypto;
pub mod push;
pub mod reply;
pub mod signature;
pub mod xml;

pub use crypto::{CryptoError, EncodingAesKey, KeyError};
pub use push::{Event, Kind, Message, Number, Push, PushError};
pub use reply::{Article, Reply};
