//! A small YAML node tree in which every node remembers where it starts, built from
//! yaml-rust2's event parser. The decoder in `decode.rs` walks this tree by hand so that each
//! error can name the key path, the line and the column.
//!
//! What this layer decides: exactly one document per file; anchors and aliases are resolved
//! (an alias is a copy of its anchored node, within a node budget so that "billion laughs"
//! input cannot blow up memory); tags are refused except `!!str` on a scalar; nesting is bounded
//! (the tree is dropped recursively). Scalars keep their text and whether they were quoted;
//! typing (YAML 1.2 core schema) happens on demand in [`Scalar::typed`].

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::FlowErrorKind;

/// Deeper nesting than this is certainly not a flow file (a flow needs five levels).
const MAX_DEPTH: usize = 32;
/// Upper bound on nodes after alias expansion; real flow files have a few hundred.
const MAX_NODES: usize = 100_000;
const TOO_MANY_NODES: &str = "more than 100000 YAML nodes (counting expanded aliases)";

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// yaml-rust2 markers have 1-based lines and 0-based columns.
    fn of(mark: Marker) -> Self {
        Self {
            line: mark.line(),
            column: mark.col() + 1,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Node {
    pub at: Pos,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub(super) enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
pub(super) struct Scalar {
    pub text: String,
    /// Quoted, block (`|`, `>`) or tagged `!!str`: a string whatever it looks like.
    pub quoted: bool,
}

/// A scalar typed by the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Typed<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// Written as an integer but does not fit in 64 bits.
    BigInt,
    Float(f64),
    Str(&'a str),
}

impl Typed<'_> {
    /// "an integer", "a string": for "expected X, found Y" messages.
    pub(super) fn describe(self) -> &'static str {
        match self {
            Typed::Null => "nothing (null)",
            Typed::Bool(_) => "a boolean",
            Typed::Int(_) | Typed::BigInt => "an integer",
            Typed::Float(_) => "a number with a fraction",
            Typed::Str(_) => "a string",
        }
    }
}

impl Scalar {
    pub(super) fn typed(&self) -> Typed<'_> {
        if self.quoted {
            return Typed::Str(&self.text);
        }
        let t = self.text.as_str();
        match t {
            "" | "~" | "null" | "Null" | "NULL" => return Typed::Null,
            "true" | "True" | "TRUE" => return Typed::Bool(true),
            "false" | "False" | "FALSE" => return Typed::Bool(false),
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
                return Typed::Float(f64::INFINITY);
            }
            "-.inf" | "-.Inf" | "-.INF" => return Typed::Float(f64::NEG_INFINITY),
            ".nan" | ".NaN" | ".NAN" => return Typed::Float(f64::NAN),
            _ => {}
        }
        if let Some(int) = parse_int(t) {
            return int;
        }
        if is_float(t)
            && let Ok(f) = t.parse::<f64>()
        {
            return Typed::Float(f);
        }
        Typed::Str(t)
    }
}

/// `[-+]?[0-9]+`, `0o[0-7]+`, `0x[0-9a-fA-F]+` (YAML 1.2 core schema).
fn parse_int(t: &str) -> Option<Typed<'static>> {
    let (radix, digits, negative) = if let Some(d) = t.strip_prefix("0o") {
        (8, d, false)
    } else if let Some(d) = t.strip_prefix("0x") {
        (16, d, false)
    } else if let Some(d) = t.strip_prefix('-') {
        (10, d, true)
    } else {
        (10, t.strip_prefix('+').unwrap_or(t), false)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = i128::from_str_radix(digits, radix)
        .ok()
        .map(|v| if negative { -v } else { v })
        .and_then(|v| i64::try_from(v).ok());
    Some(value.map_or(Typed::BigInt, Typed::Int))
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?` (YAML 1.2 core schema).
fn is_float(t: &str) -> bool {
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match frac {
        None => !int.is_empty() && digits(int),
        Some(f) => digits(int) && digits(f) && !(int.is_empty() && f.is_empty()),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

impl Node {
    /// Nodes in this subtree, counted for the alias budget.
    fn size(&self) -> usize {
        match &self.value {
            Value::Scalar(_) => 1,
            Value::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Value::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.size() + v.size())
                    .sum::<usize>()
            }
        }
    }
}

/// A problem found while reading the YAML itself; always document-level (no key path).
#[derive(Debug)]
pub(super) struct LoadError {
    pub at: Pos,
    pub kind: FlowErrorKind,
}

fn fail<T>(at: Pos, kind: FlowErrorKind) -> Result<T, LoadError> {
    Err(LoadError { at, kind })
}

enum Frame {
    Seq {
        at: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        at: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Parses `text` into one node tree; `Ok(None)` for a stream without any document.
pub(super) fn load(text: &str) -> Result<Option<Node>, LoadError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut nodes = 0usize;
    let mut root: Option<Node> = None;
    let mut in_document = false;

    loop {
        let (event, mark) = match parser.next_token() {
            Ok(next) => next,
            Err(e) => {
                return fail(
                    Pos::of(*e.marker()),
                    FlowErrorKind::Syntax(e.info().to_owned()),
                );
            }
        };
        let at = Pos::of(mark);
        let done = match event {
            Event::StreamEnd => return Ok(root),
            Event::StreamStart | Event::Nothing => continue,
            Event::DocumentStart => {
                if root.is_some() {
                    return fail(at, FlowErrorKind::MultipleDocuments);
                }
                in_document = true;
                continue;
            }
            Event::DocumentEnd => {
                in_document = false;
                continue;
            }
            Event::Alias(id) => {
                let Some(target) = anchors.get(&id) else {
                    // The parser already rejects unknown anchors; kept for robustness.
                    return fail(at, FlowErrorKind::Unsupported("aliases to unknown anchors"));
                };
                nodes += target.size();
                if nodes > MAX_NODES {
                    return fail(at, FlowErrorKind::Unsupported(TOO_MANY_NODES));
                }
                // The copy starts at the alias; positions inside still point at the anchor.
                Node {
                    at,
                    value: target.value.clone(),
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = match tag {
                    None => false,
                    Some(tag) if is_str_tag(&tag) => true,
                    Some(_) => {
                        return fail(
                            at,
                            FlowErrorKind::Unsupported("YAML tags (other than `!!str`)"),
                        );
                    }
                };
                nodes += 1;
                let node = Node {
                    at,
                    value: Value::Scalar(Scalar {
                        text,
                        quoted: forced_string || style != TScalarStyle::Plain,
                    }),
                };
                if anchor != 0 {
                    anchors.insert(anchor, node.clone());
                }
                node
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if tag.is_some() {
                    return fail(
                        at,
                        FlowErrorKind::Unsupported("YAML tags (other than `!!str`)"),
                    );
                }
                if stack.len() >= MAX_DEPTH {
                    return fail(
                        at,
                        FlowErrorKind::Unsupported("nesting deeper than 32 levels"),
                    );
                }
                nodes += 1;
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        at,
                        anchor,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        at,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                    }
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match stack.pop() {
                    Some(Frame::Seq { at, anchor, items }) => (
                        Node {
                            at,
                            value: Value::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        at,
                        anchor,
                        entries,
                        ..
                    }) => {
                        // A block mapping's start marker lies after its first key; the first
                        // key is where a reader sees the mapping begin.
                        let at = entries.first().map_or(at, |(k, _)| at.min(k.at));
                        (
                            Node {
                                at,
                                value: Value::Map(entries),
                            },
                            anchor,
                        )
                    }
                    None => {
                        return fail(
                            at,
                            FlowErrorKind::Syntax("unbalanced collection end".into()),
                        );
                    }
                };
                if anchor != 0 {
                    anchors.insert(anchor, node.clone());
                }
                node
            }
        };
        if nodes > MAX_NODES {
            return fail(at, FlowErrorKind::Unsupported(TOO_MANY_NODES));
        }
        match stack.last_mut() {
            Some(Frame::Seq { items, .. }) => items.push(done),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                Some(k) => {
                    let mut value = done;
                    // An empty value is marked wherever the parser stopped (often the next
                    // line); its key is where a reader looks.
                    if matches!(&value.value, Value::Scalar(s) if s.text.is_empty() && !s.quoted) {
                        value.at = k.at;
                    }
                    entries.push((k, value));
                }
                None => *key = Some(done),
            },
            None if in_document => root = Some(done),
            None => {
                return fail(
                    at,
                    FlowErrorKind::Syntax("content outside a document".into()),
                );
            }
        }
    }
}

fn is_str_tag(tag: &Tag) -> bool {
    tag.handle == "tag:yaml.org,2002:" && tag.suffix == "str"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(text: &str) -> String {
        let s = Scalar {
            text: text.into(),
            quoted: false,
        };
        format!("{:?}", s.typed())
    }

    #[test]
    fn core_schema_typing() {
        assert_eq!(typed("12"), "Int(12)");
        assert_eq!(typed("-3"), "Int(-3)");
        assert_eq!(typed("0x1F"), "Int(31)");
        assert_eq!(typed("0o17"), "Int(15)");
        assert_eq!(typed("99999999999999999999"), "BigInt");
        assert_eq!(typed("1.5"), "Float(1.5)");
        assert_eq!(typed(".5"), "Float(0.5)");
        assert_eq!(typed("1e3"), "Float(1000.0)");
        assert_eq!(typed("true"), "Bool(true)");
        assert_eq!(typed("~"), "Null");
        assert_eq!(typed(""), "Null");
        // YAML 1.1 booleans are plain strings in 1.2: DROP's `filter: no` stays a string.
        assert_eq!(typed("no"), "Str(\"no\")");
        assert_eq!(typed("yes"), "Str(\"yes\")");
        assert_eq!(typed("pyex:0.1.0"), "Str(\"pyex:0.1.0\")");
        assert_eq!(typed("1.2.3"), "Str(\"1.2.3\")");
        assert_eq!(typed("."), "Str(\".\")");
        let quoted = Scalar {
            text: "12".into(),
            quoted: true,
        };
        assert_eq!(quoted.typed(), Typed::Str("12"));
    }

    #[test]
    fn block_mapping_position_is_its_first_key() {
        let root = load("a: 1\nlist:\n  - x: 1\n    y: 2\n").unwrap().unwrap();
        assert_eq!(root.at, Pos { line: 1, column: 1 });
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("not a seq")
        };
        assert_eq!(items[0].at, Pos { line: 3, column: 5 });
    }

    #[test]
    fn aliases_expand_within_budget() {
        let root = load("a: &x [1, 2]\nb: *x\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        assert!(matches!(&entries[1].1.value, Value::Seq(v) if v.len() == 2));

        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = load(&bomb).unwrap_err();
        assert!(matches!(err.kind, FlowErrorKind::Unsupported(_)));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let block: String = (0..40)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        let err = load(&format!("{block}{}x: 1\n", " ".repeat(40))).unwrap_err();
        assert!(matches!(err.kind, FlowErrorKind::Unsupported(_)), "{err:?}");
        // Flow style is bounded by the parser itself.
        let flow = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(load(&flow).is_err());
    }
}
