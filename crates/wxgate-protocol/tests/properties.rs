//! Properties over whole input spaces: any text survives the reply writer as well-formed
//! XML, any message survives the envelope, and no byte string panics the readers.

use proptest::prelude::*;
use wxgate_protocol::xml::{is_xml_char, parse, parse_strict, push_cdata};
use wxgate_protocol::{EncodingAesKey, Push, Reply};

fn key() -> EncodingAesKey {
    EncodingAesKey::parse("Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ").unwrap()
}

proptest! {
    #[test]
    fn any_text_is_written_as_well_formed_cdata(s in "(\\PC|[\\x00-\\x1f]|\\]\\]>|\\]|>)*") {
        let mut out = String::new();
        push_cdata(&mut out, &s);
        let back = parse_strict(&format!("<x>{out}</x>")).unwrap();
        let kept: String = s.chars().filter(|&c| is_xml_char(c)).collect();
        prop_assert_eq!(back.text, kept.replace("\r\n", "\n").replace('\r', "\n"));
    }

    #[test]
    fn any_reply_text_makes_a_well_formed_reply(s in "\\PC*", to in "[ -~]{0,40}") {
        let xml = Reply::Text(s).to_xml(&to, "gh_acct", 1_700_000_000, 8).unwrap();
        prop_assert!(parse_strict(&xml).is_ok());
    }

    #[test]
    fn seal_then_open_is_the_identity(msg in "\\PC{0,600}", app in "wx[0-9a-f]{16}") {
        let sealed = key().seal(&msg, &app);
        prop_assert_eq!(key().open(&sealed, &app).unwrap(), msg);
    }

    #[test]
    fn no_input_panics_the_readers(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse(&text);
        let _ = Push::parse(&text);
        let b64: String = bytes.iter().map(|b| (b'A' + b % 26) as char).collect();
        let _ = key().open(&b64, "wx1234567890abcdef");
    }
}

#[test]
fn dedup_keys_cannot_be_spelled_alike_by_different_pushes() {
    let text = |from: &str, id: &str| {
        Push::parse(&format!(
            "<xml><ToUserName>gh</ToUserName><FromUserName>{from}</FromUserName><CreateTime>1</CreateTime>\
             <MsgType>text</MsgType><Content>x</Content><MsgId>{id}</MsgId></xml>"
        ))
        .unwrap()
        .dedup_key()
    };
    assert_ne!(text("oColon:1", "4618712"), text("oColon", "1:4618712"));
    assert_ne!(text("o%3A", "1"), text("o:", "1"));
    assert_eq!(text("oPlain", "42"), "msg:oPlain:42");
}

#[test]
fn dedup_keys_stay_short_enough_to_index_and_distinct() {
    let click = |key: &str| {
        Push::parse(&format!(
            "<xml><ToUserName>gh</ToUserName><FromUserName>o1</FromUserName><CreateTime>1</CreateTime>\
             <MsgType>event</MsgType><Event>CLICK</Event><EventKey>{key}</EventKey></xml>"
        ))
        .unwrap()
        .dedup_key()
    };
    let long = "长".repeat(3000);
    let a = click(&long);
    let b = click(&format!("{long}x"));
    assert!(a.len() <= wxgate_protocol::push::MAX_DEDUP_KEY, "{}", a.len());
    assert_ne!(a, b, "keys differing only past the cut stay distinct");
    assert_eq!(a, click(&long), "the same push gives the same key");
    let short = click("MENU_A");
    assert!(short.contains("MENU_A") && !short.contains('~'), "{short}");
}
