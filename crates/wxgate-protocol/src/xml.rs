//! The XML wire format: a hardened reader that turns a push into an [`Element`] tree and
//! the writing helpers used by replies. This is the only module that knows about CDATA,
//! entities and character rules; everything above it sees element names and text.
//!
//! Reading rules (protocol.md §5.2, §5.3):
//! - any `<!DOCTYPE` is refused, so no entity can be declared, expanded or fetched; only
//!   the five predefined entities and character references are resolved;
//! - a leaf's text is its text and CDATA joined; when CDATA is present, whitespace-only
//!   text around it is dropped and the CDATA is kept verbatim, otherwise the text is
//!   trimmed (a leading space inside CDATA is data);
//! - CRLF is normalised to LF, as XML requires, also inside CDATA;
//! - characters that XML 1.0 forbids (WeChat forwards some raw inside CDATA) are kept on
//!   input and never written out.

use quick_xml::events::Event as XmlEvent;
use quick_xml::reader::Reader;

/// How deep a push may nest; real pushes reach 5 (job-finish results).
const MAX_DEPTH: usize = 32;
/// How many elements one document may hold; real pushes have a few dozen.
const MAX_ELEMENTS: usize = 20_000;

/// Why a document was refused by the reader.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    #[error("document type declarations are not accepted (no entities are ever expanded)")]
    Doctype,
    /// The name is not kept: it is request data, and errors reach logs.
    #[error(
        "undeclared entity reference (only &amp; &lt; &gt; &quot; &apos; and character references exist)"
    )]
    UnknownEntity,
    #[error("not well-formed xml: {0}")]
    Malformed(String),
    #[error("no root element")]
    Empty,
    #[error("xml nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("xml has more than {MAX_ELEMENTS} elements")]
    TooManyElements,
}

/// One element: its name, its text (see the module rules) and its child elements in
/// document order. Attributes are not used by WeChat and are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// The first child with this exact name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child with this exact name, in order.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child with this name, `None` when it is missing or empty
    /// (WeChat sends both for "no value", protocol.md §5.2).
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str()).filter(|t| !t.is_empty())
    }

    /// The element at a `/`-separated path of child names, e.g. `ScanCodeInfo/ScanType`.
    pub fn at(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |el, name| el.child(name))
    }

    /// The non-empty text at a path.
    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|c| c.text.as_str()).filter(|t| !t.is_empty())
    }

    /// Whether this element has no child elements.
    pub fn is_leaf(&self) -> bool {
        self.children.is_empty()
    }
}

/// Parses a whole document into its root element, leniently as to characters: WeChat
/// forwards control characters inside CDATA, and they are kept.
pub fn parse(doc: &str) -> Result<Element, XmlError> {
    parse_with(doc, false)
}

/// Parses a document we expect to be strictly well-formed XML 1.0 (a reply, as WeChat
/// would judge it): characters XML 1.0 forbids and a bare `]]>` in text are refused too.
pub fn parse_strict(doc: &str) -> Result<Element, XmlError> {
    if let Some(c) = doc.chars().find(|&c| !is_xml_char(c)) {
        return Err(XmlError::Malformed(format!(
            "character U+{:04X} is not allowed in XML 1.0",
            c as u32
        )));
    }
    parse_with(doc, true)
}

fn parse_with(doc: &str, strict: bool) -> Result<Element, XmlError> {
    let doc = doc.strip_prefix('\u{feff}').unwrap_or(doc);
    let mut reader = Reader::from_str(doc);
    reader.config_mut().check_end_names = true;

    let mut stack: Vec<Builder> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let event = reader.read_event().map_err(|e| XmlError::Malformed(e.to_string()))?;
        match event {
            XmlEvent::Start(start) | XmlEvent::Empty(start) if root.is_some() => {
                let _ = start;
                return Err(XmlError::Malformed("more than one root element".into()));
            }
            XmlEvent::Start(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooManyElements);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                stack.push(Builder::new(name_of(start.name().as_ref())?));
            }
            XmlEvent::Empty(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooManyElements);
                }
                let el = Builder::new(name_of(start.name().as_ref())?).finish();
                attach(&mut stack, &mut root, el);
            }
            XmlEvent::End(_) => {
                let el = stack.pop().ok_or(XmlError::Malformed("unmatched end tag".into()))?;
                attach(&mut stack, &mut root, el.finish());
            }
            XmlEvent::Text(text) => {
                let text = text.xml10_content();
                if strict && text.contains("]]>") {
                    return Err(XmlError::Malformed(
                        "']]>' in text (an unsplit CDATA end?)".into(),
                    ));
                }
                match stack.last_mut() {
                    Some(b) => b.text(&text),
                    None if is_xml_space(&text) => {}
                    None => {
                        return Err(XmlError::Malformed("text outside the root element".into()));
                    }
                }
            }
            XmlEvent::GeneralRef(r) => {
                let ch = match r.resolve_char_ref() {
                    Ok(Some(ch)) => ch.to_string(),
                    Ok(None) => {
                        let name = r.xml10_content();
                        predefined(&name).ok_or(XmlError::UnknownEntity)?.to_owned()
                    }
                    Err(e) => return Err(XmlError::Malformed(e.to_string())),
                };
                match stack.last_mut() {
                    Some(b) => b.text(&ch),
                    None => {
                        return Err(XmlError::Malformed("text outside the root element".into()));
                    }
                }
            }
            XmlEvent::CData(cdata) => match stack.last_mut() {
                Some(b) => b.cdata(&cdata.xml10_content()),
                None => return Err(XmlError::Malformed("cdata outside the root element".into())),
            },
            XmlEvent::DocType(_) => return Err(XmlError::Doctype),
            XmlEvent::Decl(_) | XmlEvent::PI(_) | XmlEvent::Comment(_) => {}
            XmlEvent::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Malformed("document ends inside an element".into()));
    }
    root.ok_or(XmlError::Empty)
}

fn name_of(raw: &str) -> Result<String, XmlError> {
    Ok(raw.to_owned())
}

fn predefined(name: &str) -> Option<&'static str> {
    Some(match name {
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" => "'",
        _ => return None,
    })
}

fn attach(stack: &mut [Builder], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

/// An element being read: text pieces are kept apart from CDATA pieces until the end
/// tag, when the text rule of the module doc can be applied.
struct Builder {
    name: String,
    pieces: Vec<(bool, String)>,
    has_cdata: bool,
    children: Vec<Element>,
}

impl Builder {
    fn new(name: String) -> Self {
        Builder { name, pieces: Vec::new(), has_cdata: false, children: Vec::new() }
    }

    fn text(&mut self, s: &str) {
        match self.pieces.last_mut() {
            Some((false, last)) => last.push_str(s),
            _ => self.pieces.push((false, s.to_owned())),
        }
    }

    fn cdata(&mut self, s: &str) {
        self.has_cdata = true;
        self.pieces.push((true, s.to_owned()));
    }

    fn finish(self) -> Element {
        let text = if self.has_cdata {
            let mut out = String::new();
            for (is_cdata, piece) in &self.pieces {
                if *is_cdata || !is_xml_space(piece) {
                    out.push_str(piece);
                }
            }
            out
        } else {
            let joined: String = self.pieces.iter().map(|(_, p)| p.as_str()).collect();
            match joined.trim_matches(XML_SPACE) {
                t if t.len() == joined.len() => joined,
                t => t.to_owned(),
            }
        };
        Element { name: self.name, text, children: self.children }
    }
}

/// XML's whitespace: the only characters trimmed around text (a U+3000 ideographic
/// space or a no-break space is data).
const XML_SPACE: &[char] = &[' ', '\t', '\n', '\r'];

fn is_xml_space(s: &str) -> bool {
    s.chars().all(|c| XML_SPACE.contains(&c))
}

/// Whether XML 1.0 allows this character in a document.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Appends `s` as one or more CDATA sections (protocol.md §8.3). Characters XML 1.0
/// forbids are dropped first, so that none can hide a `]]>` (as in `]]\u{1}>`); then
/// each `]]>` is split as `]]]]><![CDATA[>`.
pub fn push_cdata(out: &mut String, s: &str) {
    let clean: std::borrow::Cow<'_, str> = if s.chars().all(is_xml_char) {
        s.into()
    } else {
        s.chars().filter(|&c| is_xml_char(c)).collect::<String>().into()
    };
    out.push_str("<![CDATA[");
    let mut rest = &*clean;
    while let Some(at) = rest.find("]]>") {
        out.push_str(&rest[..at + 2]);
        out.push_str("]]><![CDATA[");
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    out.push_str("]]>");
}

/// Appends `s` escaped as element text, dropping characters XML 1.0 forbids.
pub fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c if is_xml_char(c) => out.push(c),
            _ => {}
        }
    }
}

/// Appends `<name><![CDATA[value]]></name>`.
pub fn push_cdata_element(out: &mut String, name: &str, value: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    push_cdata(out, value);
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// Appends `<name>value</name>` for a bare number.
pub fn push_number_element(out: &mut String, name: &str, value: impl std::fmt::Display) {
    use std::fmt::Write;
    let _ = write!(out, "<{name}>{value}</{name}>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdata_and_text_follow_the_leaf_rules() {
        let el =
            parse("<xml>\r\n<A> <![CDATA[ x\r\ny ]]> </A><B>  7 </B><C/><D><![CDATA[]]></D></xml>")
                .unwrap();
        assert_eq!(el.child("A").unwrap().text, " x\ny ");
        assert_eq!(el.child("B").unwrap().text, "7");
        assert_eq!(el.text_of("C"), None);
        assert_eq!(el.text_of("D"), None);
    }

    #[test]
    fn split_cdata_is_joined_and_entities_inside_cdata_are_literal() {
        let el =
            parse("<xml><C><![CDATA[x]]]]><![CDATA[>y &amp;]]></C><T>a &amp; &#x4e2d;</T></xml>")
                .unwrap();
        assert_eq!(el.child("C").unwrap().text, "x]]>y &amp;");
        assert_eq!(el.child("T").unwrap().text, "a & 中");
    }

    #[test]
    fn doctype_and_unknown_entities_are_refused() {
        let bomb =
            r#"<!DOCTYPE xml [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><xml><C>&b;</C></xml>"#;
        assert_eq!(parse(bomb), Err(XmlError::Doctype));
        assert!(matches!(parse("<xml><C>&xxe;</C></xml>"), Err(XmlError::UnknownEntity)));
    }

    #[test]
    fn doctype_like_text_inside_cdata_is_data() {
        let el = parse("<xml><C><![CDATA[<!DOCTYPE html>]]></C></xml>").unwrap();
        assert_eq!(el.child("C").unwrap().text, "<!DOCTYPE html>");
    }

    #[test]
    fn malformed_documents_are_refused() {
        for doc in
            ["", "hello", "<xml><a></xml>", "<xml>", "<xml></xml><xml></xml>", "<xml></xml>tail"]
        {
            assert!(parse(doc).is_err(), "{doc:?} should be refused");
        }
    }

    #[test]
    fn strict_parsing_refuses_what_xml_forbids() {
        assert!(parse_strict("<x><![CDATA[a\u{1}]]></x>").is_err());
        assert!(parse_strict("<x><![CDATA[a]]>b]]></x>").is_err());
        assert!(parse_strict("<x><![CDATA[a]]]]><![CDATA[>b]]></x>").is_ok());
        assert!(parse("<x><![CDATA[a\u{1}]]></x>").is_ok());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let doc = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert_eq!(parse(&doc), Err(XmlError::TooDeep));
    }

    #[test]
    fn cdata_writer_splits_terminators_and_drops_forbidden_characters() {
        let mut out = String::new();
        push_cdata(&mut out, "a]]>b\u{1d}c]]>");
        assert_eq!(out, "<![CDATA[a]]]]><![CDATA[>bc]]]]><![CDATA[>]]>");
        let back = parse(&format!("<x>{out}</x>")).unwrap();
        assert_eq!(back.text, "a]]>bc]]>");
    }

    #[test]
    fn a_forbidden_character_cannot_hide_a_cdata_end() {
        for hostile in ["a]]\u{1}>b", "]]\u{1d}>", "x]\u{2}]>y", "]\u{0}]\u{0}>"] {
            let mut out = String::new();
            push_cdata(&mut out, hostile);
            let back = parse_strict(&format!("<x>{out}</x>"))
                .unwrap_or_else(|e| panic!("{hostile:?} -> {out}: {e}"));
            assert_eq!(back.text, hostile.chars().filter(|&c| is_xml_char(c)).collect::<String>());
        }
    }

    #[test]
    fn only_xml_whitespace_is_trimmed() {
        let el = parse("<xml><C>\u{3000}hi\u{a0}</C><D> \t\r\nx\n</D></xml>").unwrap();
        assert_eq!(el.child("C").unwrap().text, "\u{3000}hi\u{a0}");
        assert_eq!(el.child("D").unwrap().text, "x");
    }
}
