//! The JSON form of a push's fields, as stored and as printed by `wxgate events`: element
//! names and text exactly as WeChat sent them (`MsgType`, `Event`, `EventKey`, …), nested
//! elements as objects and lists as arrays, plus a few derived values a reader would
//! otherwise recompute: `kind`, `scene`, `is_qr_scene` and `SendPicsInfo.PicMd5Sums`.
//!
//! List rules: an element whose children are all `<item>` becomes an array of them, and
//! so do the known containers (`PicList`, `ResultList`, `Articles`) even when empty;
//! `item`, `List` and `fail_idx` are always arrays; any other element that repeats
//! becomes an array, except that repeated list containers are joined into one list
//! (pictures were seen as several `<PicList>` of one item each).

use serde_json::{Map, Value};
use wxgate_protocol::Push;
use wxgate_protocol::push::{Event, Kind};
use wxgate_protocol::xml::Element;

const LIST_CONTAINERS: &[&str] = &["PicList", "ResultList", "Articles"];
const ALWAYS_LISTS: &[&str] = &["item", "List", "fail_idx"];

/// The fields of a typed push with the derived values added.
pub fn of_push(push: &Push) -> Map<String, Value> {
    let mut map = object(&push.fields);
    map.insert("kind".into(), push.kind_name().into());
    if let Kind::Event(event) = &push.kind {
        let (qr, scene) = match event {
            Event::Subscribe { scene, .. } => (scene.is_some(), scene.as_deref()),
            Event::Scan { scene, .. } => (true, scene.as_deref()),
            _ => (false, None),
        };
        if matches!(event, Event::Subscribe { .. } | Event::Scan { .. }) {
            map.insert("is_qr_scene".into(), qr.into());
            map.insert("scene".into(), scene.map_or(Value::Null, Value::from));
        }
        if let Event::Pictures { pics, .. } = event
            && let Some(Value::Object(info)) = map.get_mut("SendPicsInfo")
        {
            let sums = pics.iter().map(|p| Value::from(p.md5.as_str())).collect();
            info.insert("PicMd5Sums".into(), Value::Array(sums));
        }
    }
    map
}

/// The fields of any element tree (also of pushes that could not be typed).
pub fn object(el: &Element) -> Map<String, Value> {
    let mut map = Map::new();
    for child in &el.children {
        let value = value(child);
        let list_like = LIST_CONTAINERS.contains(&child.name.as_str()) || all_items(child);
        match map.get_mut(&child.name) {
            None if ALWAYS_LISTS.contains(&child.name.as_str()) => {
                map.insert(child.name.clone(), Value::Array(vec![value]));
            }
            None => {
                map.insert(child.name.clone(), value);
            }
            Some(Value::Array(existing))
                if list_like || ALWAYS_LISTS.contains(&child.name.as_str()) =>
            {
                match value {
                    Value::Array(more) if list_like => existing.extend(more),
                    v => existing.push(v),
                }
            }
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        }
    }
    map
}

fn all_items(el: &Element) -> bool {
    !el.children.is_empty() && el.children.iter().all(|c| c.name == "item")
}

fn value(el: &Element) -> Value {
    if LIST_CONTAINERS.contains(&el.name.as_str()) || all_items(el) {
        return Value::Array(el.children.iter().filter(|c| c.name == "item").map(value).collect());
    }
    if el.is_leaf() {
        return Value::String(el.text.clone());
    }
    Value::Object(object(el))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_arrays_and_scalars_stay_text() {
        let push = Push::parse(
            "<xml><ToUserName>gh</ToUserName><FromUserName>o</FromUserName><CreateTime>1</CreateTime>\
             <MsgType>event</MsgType><Event>pic_weixin</Event><EventKey>K</EventKey>\
             <SendPicsInfo><PicList><item><PicMd5Sum>a</PicMd5Sum></item></PicList>\
             <PicList><item><PicMd5Sum>b</PicMd5Sum></item></PicList><Count>2</Count></SendPicsInfo></xml>",
        )
        .unwrap();
        let v = Value::Object(of_push(&push));
        assert_eq!(v["Event"], "pic_weixin");
        assert_eq!(v["SendPicsInfo"]["Count"], "2");
        assert_eq!(
            v["SendPicsInfo"]["PicList"],
            serde_json::json!([{"PicMd5Sum": "a"}, {"PicMd5Sum": "b"}])
        );
        assert_eq!(v["SendPicsInfo"]["PicMd5Sums"], serde_json::json!(["a", "b"]));
        assert_eq!(v["kind"], "pictures_event");
    }

    #[test]
    fn empty_containers_and_single_lists() {
        let el = wxgate_protocol::xml::parse(
            "<xml><SendPicsInfo><Count>0</Count><PicList></PicList></SendPicsInfo>\
             <E><List><TemplateId>t</TemplateId></List></E><fail_idx>1</fail_idx><fail_idx>3</fail_idx></xml>",
        )
        .unwrap();
        let v = Value::Object(object(&el));
        assert_eq!(v["SendPicsInfo"]["PicList"], serde_json::json!([]));
        assert_eq!(v["E"]["List"], serde_json::json!([{"TemplateId": "t"}]));
        assert_eq!(v["fail_idx"], serde_json::json!(["1", "3"]));
    }
}
