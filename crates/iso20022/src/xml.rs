//! A bounded XML reader into an element tree, and a writer. Untrusted input is bounded before and
//! while it is parsed: total size, nesting depth, element count, text length; DTDs are refused,
//! so no entity can be declared, and only the five predefined entities and character references
//! are expanded.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub bytes_max: usize,
    pub depth_max: usize,
    pub elements_max: usize,
    pub text_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            bytes_max: 1024 * 1024,
            depth_max: 32,
            elements_max: 20_000,
            text_bytes_max: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct XmlError {
    /// Where: the element path (e.g. /Document/FIToFICstmrCdtTrf/GrpHdr/MsgId).
    pub path: String,
    pub reason: String,
}

/// An element: namespace URI, local name, attributes (local name, value; namespace declarations
/// left out), child elements in document order, and its text (concatenated, trimmed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    /// Shared between the elements of one namespace (one allocation per namespace, not per
    /// element).
    pub ns: std::sync::Arc<str>,
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn new(ns: &str, name: &str) -> Element {
        Element {
            ns: std::sync::Arc::from(ns),
            name: name.to_string(),
            ..Element::default()
        }
    }

    /// A child element with text, in the parent's namespace.
    pub fn leaf(mut self, name: &str, text: impl Into<String>) -> Element {
        let mut child = Element {
            ns: self.ns.clone(),
            name: name.to_string(),
            ..Element::default()
        };
        child.text = text.into();
        self.children.push(child);
        self
    }

    pub fn leaf_opt(self, name: &str, text: Option<&str>) -> Element {
        match text {
            Some(text) => self.leaf(name, text),
            None => self,
        }
    }

    pub fn with_text(mut self, text: &str) -> Element {
        self.text = text.to_string();
        self
    }

    pub fn child(mut self, child: Element) -> Element {
        self.children.push(child);
        self
    }

    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Element {
        self.attrs.push((name.to_string(), value.into()));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at a slash-separated path of local names below this one.
    pub fn at(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |e, name| e.get(name))
    }

    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|e| e.text.as_str())
    }

    pub fn attr_value(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first element named `name` in this subtree (depth first), e.g. the Document inside an
    /// envelope.
    pub fn find(&self, name: &str) -> Option<&Element> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

fn path_of(stack: &[Element]) -> String {
    let mut path = String::new();
    for e in stack {
        path.push('/');
        path.push_str(&e.name);
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// Parses a whole document into its root element.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Element, XmlError> {
    let fail = |stack: &[Element], reason: String| XmlError {
        path: path_of(stack),
        reason,
    };
    if bytes.len() > limits.bytes_max {
        return Err(fail(
            &[],
            format!(
                "document of {} bytes is over the limit of {}",
                bytes.len(),
                limits.bytes_max
            ),
        ));
    }
    let mut reader = NsReader::from_reader(bytes);
    reader.config_mut().trim_text(false);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    let mut namespaces: Vec<std::sync::Arc<str>> = Vec::new();
    let unbound: std::sync::Arc<str> = std::sync::Arc::from("");
    loop {
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(e) => return Err(fail(&stack, format!("malformed XML: {e}"))),
        };
        // Only elements need their namespace resolved (not text or end tags).
        let ns: std::sync::Arc<str> = match &event {
            Event::Start(start) | Event::Empty(start) => {
                match reader.resolve_element(start.name()).0 {
                    ResolveResult::Bound(ns) => {
                        let bytes = ns.as_ref();
                        match namespaces.iter().find(|known| known.as_bytes() == bytes) {
                            Some(known) => known.clone(),
                            None if namespaces.len() < 16 => {
                                let new: std::sync::Arc<str> =
                                    String::from_utf8_lossy(bytes).into();
                                namespaces.push(new.clone());
                                new
                            }
                            None => return Err(fail(&stack, "more than 16 namespaces".into())),
                        }
                    }
                    ResolveResult::Unbound => unbound.clone(),
                    ResolveResult::Unknown(prefix) => {
                        return Err(fail(
                            &stack,
                            format!(
                                "undeclared namespace prefix {:?}",
                                String::from_utf8_lossy(&prefix)
                            ),
                        ))
                    }
                }
            }
            _ => unbound.clone(),
        };
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(start) | Event::Empty(start) => {
                elements += 1;
                if elements > limits.elements_max {
                    return Err(fail(
                        &stack,
                        format!("more than {} elements", limits.elements_max),
                    ));
                }
                if stack.len() >= limits.depth_max {
                    return Err(fail(
                        &stack,
                        format!("nested deeper than {} elements", limits.depth_max),
                    ));
                }
                if root.is_some() {
                    return Err(fail(&stack, "content after the root element".into()));
                }
                let mut element = Element {
                    ns,
                    name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
                    ..Element::default()
                };
                for attr in start.attributes() {
                    let attr = attr.map_err(|e| fail(&stack, format!("attribute: {e}")))?;
                    let key = attr.key.as_ref();
                    if key == b"xmlns" || key.starts_with(b"xmlns:") {
                        continue;
                    }
                    let value = attr
                        .unescape_value()
                        .map_err(|e| fail(&stack, format!("attribute value: {e}")))?;
                    element.attrs.push((
                        String::from_utf8_lossy(attr.key.local_name().as_ref()).into_owned(),
                        value.into_owned(),
                    ));
                }
                stack.push(element);
                if empty {
                    close(&mut stack, &mut root);
                }
            }
            Event::End(_) => close(&mut stack, &mut root),
            Event::Text(text) => {
                // Indentation (whitespace only) carries nothing in ISO 20022: skipped unparsed.
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let text = text
                    .unescape()
                    .map_err(|e| fail(&stack, format!("text: {e}")))?;
                let Some(current) = stack.last_mut() else {
                    if text.trim().is_empty() {
                        continue;
                    }
                    return Err(fail(&stack, "text outside the root element".into()));
                };
                if !current.children.is_empty() {
                    // Indentation between child elements.
                    continue;
                }
                if current.text.len() + text.len() > limits.text_bytes_max {
                    return Err(fail(
                        &stack,
                        format!("text longer than {} bytes", limits.text_bytes_max),
                    ));
                }
                current.text.push_str(&text);
            }
            Event::CData(data) => {
                let Some(current) = stack.last_mut() else {
                    return Err(fail(&stack, "CDATA outside the root element".into()));
                };
                if current.text.len() + data.len() > limits.text_bytes_max {
                    return Err(fail(
                        &stack,
                        format!("text longer than {} bytes", limits.text_bytes_max),
                    ));
                }
                current.text.push_str(&String::from_utf8_lossy(&data));
            }
            Event::DocType(_) => {
                return Err(fail(
                    &stack,
                    "DTDs are refused (no entity declarations allowed)".into(),
                ))
            }
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(fail(&stack, "document ends inside an element".into()));
    }
    root.ok_or_else(|| fail(&[], "no root element".into()))
}

fn close(stack: &mut Vec<Element>, root: &mut Option<Element>) {
    let mut element = stack.pop().expect("an open element");
    // ISO 20022 has no mixed content: the text of an element with children is indentation. A
    // leaf keeps its text exactly.
    if !element.children.is_empty() {
        element.text.clear();
    }
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

fn escape_into(out: &mut String, text: &str, attribute: bool) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' if attribute => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

/// Writes a document: XML declaration, then the tree with a default-namespace declaration
/// wherever the namespace changes. Elements come out in tree order (builders put them in schema
/// order) and only those present.
pub fn emit(root: &Element) -> String {
    let mut out = String::with_capacity(2048);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    write_element(&mut out, root, "");
    out.push('\n');
    out
}

fn write_element(out: &mut String, e: &Element, parent_ns: &str) {
    out.push('<');
    out.push_str(&e.name);
    if &*e.ns != parent_ns {
        out.push_str(" xmlns=\"");
        escape_into(out, &e.ns, true);
        out.push('"');
    }
    for (name, value) in &e.attrs {
        out.push(' ');
        out.push_str(name);
        out.push_str("=\"");
        escape_into(out, value, true);
        out.push('"');
    }
    if e.children.is_empty() && e.text.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    escape_into(out, &e.text, false);
    for child in &e.children {
        write_element(out, child, &e.ns);
    }
    out.push_str("</");
    out.push_str(&e.name);
    out.push('>');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_parsing_refuses_what_it_must() {
        let limits = Limits::default();
        let ok = br#"<?xml version="1.0"?><a:R xmlns:a="urn:x"><a:B k="1 &amp; 2">x &lt; y</a:B><a:C/></a:R>"#;
        let root = parse(ok, &limits).unwrap();
        assert_eq!((&*root.ns, root.name.as_str()), ("urn:x", "R"));
        assert_eq!(root.text_at("B"), Some("x < y"));
        assert_eq!(root.get("B").unwrap().attr_value("k"), Some("1 & 2"));
        assert!(root.get("C").is_some());
        // Round trip through the writer.
        assert_eq!(parse(emit(&root).as_bytes(), &limits).unwrap(), root);

        let dtd = br#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "boom">]><r>&e;</r>"#;
        assert!(parse(dtd, &limits).unwrap_err().reason.contains("DTD"));
        let unknown_entity = br#"<r>&e;</r>"#;
        assert!(parse(unknown_entity, &limits).is_err());
        let deep = "<a>".repeat(40) + &"</a>".repeat(40);
        assert!(parse(deep.as_bytes(), &limits)
            .unwrap_err()
            .reason
            .contains("deeper"));
        let many = format!("<r>{}</r>", "<x/>".repeat(30_000));
        assert!(parse(many.as_bytes(), &limits)
            .unwrap_err()
            .reason
            .contains("elements"));
        let big = vec![b' '; limits.bytes_max + 1];
        assert!(parse(&big, &limits)
            .unwrap_err()
            .reason
            .contains("over the limit"));
        let mismatched = b"<r><a></b></r>";
        assert!(parse(mismatched, &limits).is_err());
        let unbound = b"<p:r/>";
        assert!(parse(unbound, &limits).is_err());
        let err = parse(b"<r><s><t>&bogus;</t></s></r>", &limits).unwrap_err();
        assert_eq!(err.path, "/r/s/t");
    }
}
