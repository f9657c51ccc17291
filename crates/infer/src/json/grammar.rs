//! The state of a JSON value being written under a [`JsonSchema`], advanced one byte at a time:
//! a stack of frames (the object, array, string, number or literal being written). Every state
//! it accepts can still be completed, so a decoder that only takes accepted bytes never gets
//! stuck (given single-character tokens).

use super::schema::{JsonSchema, Node, NodeId};

/// Whitespace bytes in a row between tokens at most: enough for pretty-printed JSON, too few
/// for a model to loop on blanks.
const MAX_WHITESPACE: u8 = 20;

/// Nesting at most (for schemas that allow any value, or recursive ones).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ObjectPhase {
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,`: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or `}`.
    CommaOrEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArrayPhase {
    /// After `[`: an item or `]`.
    ItemOrEnd,
    /// After `,`: an item.
    Item,
    /// After an item: `,` or `]`.
    CommaOrEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StringPhase {
    Chars,
    /// After a backslash.
    Escape,
    /// Hex digits of `\uXXXX` still to come.
    Unicode(u8),
    /// After `\ud`: a digit 0-7 only, since surrogates (`\ud800`-`\udfff`), which common
    /// parsers refuse alone, are left out; such characters can be written as they are.
    UnicodeAfterD,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumberPhase {
    /// After `-`.
    Minus,
    /// A leading `0`: only a fraction or exponent may follow.
    Zero,
    /// Digits so far (at most [`MAX_INT_DIGITS`]).
    IntDigits(u8),
    /// After `.`.
    Dot,
    FracDigits,
    /// After `e`.
    Exp,
    /// After `e+`.
    ExpSign,
    /// Digits so far (at most 2: a larger exponent overflows a double).
    ExpDigits(u8),
}

/// Integer digits at most: more overflow 64-bit integers, and then doubles, in common parsers.
const MAX_INT_DIGITS: u8 = 16;

impl NumberPhase {
    fn complete(self) -> bool {
        matches!(
            self,
            Self::Zero | Self::IntDigits(_) | Self::FracDigits | Self::ExpDigits(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A value of the node, not started yet.
    Value(NodeId),
    Object {
        node: NodeId,
        phase: ObjectPhase,
        /// Keys written, one bit per property.
        seen: u64,
        /// The value node of the key just written.
        value: NodeId,
    },
    /// A declared key: the opening quote is written, `pos` bytes of the keys `lo..hi` match.
    Key {
        node: NodeId,
        lo: u32,
        hi: u32,
        pos: u32,
    },
    Array {
        node: NodeId,
        phase: ArrayPhase,
        count: u32,
    },
    String(StringPhase),
    Number {
        integer: bool,
        phase: NumberPhase,
    },
    /// `pos` bytes of the literals `lo..hi` of the node match.
    Literal {
        node: NodeId,
        lo: u32,
        hi: u32,
        pos: u32,
    },
}

/// Where a JSON value being written stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonState {
    pub(crate) stack: Vec<Frame>,
    whitespace: u8,
}

fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\n' | b'\r' | b'\t')
}

/// A byte that a string takes as itself, leaving the state as it is.
pub(crate) fn is_plain_string_byte(byte: u8) -> bool {
    byte >= 0x20 && byte != b'"' && byte != b'\\'
}

impl JsonState {
    pub fn new() -> Self {
        Self {
            stack: vec![Frame::Value(0)],
            whitespace: 0,
        }
    }

    /// Copies `other` into `self`, keeping `self`'s allocation.
    pub(crate) fn copy_from(&mut self, other: &Self) {
        self.stack.clear();
        self.stack.extend_from_slice(&other.stack);
        self.whitespace = other.whitespace;
    }

    /// Inside a string, where plain bytes change nothing.
    pub(crate) fn in_string_chars(&self) -> bool {
        self.stack.last() == Some(&Frame::String(StringPhase::Chars))
    }

    /// The value is complete: nothing may follow, end of sequence only.
    pub fn is_done(&self) -> bool {
        self.stack.is_empty()
    }

    /// The value may end here (complete, or a top-level number or literal that could also go
    /// on).
    pub fn can_end(&self, schema: &JsonSchema) -> bool {
        match self.stack.as_slice() {
            [] => true,
            [Frame::Number { phase, .. }] => phase.complete(),
            [Frame::Literal { node, lo, pos, .. }] => literals(schema, *node)
                .get(*lo as usize)
                .is_some_and(|l| l.len() == *pos as usize),
            _ => false,
        }
    }

    /// Takes `text` byte by byte; false (the state then undefined) if some byte is refused.
    pub fn advance(&mut self, schema: &JsonSchema, text: &[u8]) -> bool {
        text.iter().all(|&b| self.push(schema, b))
    }

    /// Takes one byte; false if the schema refuses it here (the state is then undefined).
    pub fn push(&mut self, schema: &JsonSchema, byte: u8) -> bool {
        let whitespace = is_whitespace(byte);
        loop {
            let Some(top) = self.stack.last().copied() else {
                return false;
            };
            let step = match top {
                Frame::Value(node) => {
                    if whitespace {
                        Step::Whitespace
                    } else {
                        self.start_value(schema, node, byte)
                    }
                }
                Frame::Object {
                    node,
                    phase,
                    seen,
                    value,
                } => self.object_byte(schema, node, phase, seen, value, byte),
                Frame::Key { node, lo, hi, pos } => self.key_byte(schema, node, lo, hi, pos, byte),
                Frame::Array { node, phase, count } => {
                    self.array_byte(schema, node, phase, count, byte)
                }
                Frame::String(phase) => self.string_byte(phase, byte),
                Frame::Number { integer, phase } => number_byte(self, integer, phase, byte),
                Frame::Literal { node, lo, hi, pos } => {
                    self.literal_byte(schema, node, lo, hi, pos, byte)
                }
            };
            match step {
                Step::Taken => {
                    self.whitespace = 0;
                    return self.stack.len() <= MAX_DEPTH;
                }
                Step::Whitespace => {
                    self.whitespace += 1;
                    return self.whitespace <= MAX_WHITESPACE;
                }
                Step::Refused => return false,
                // The frame ended before this byte: its parent takes it.
                Step::Again => {}
            }
        }
    }

    fn replace_top(&mut self, frame: Frame) {
        if let Some(top) = self.stack.last_mut() {
            *top = frame;
        }
    }

    /// The first byte of a value of `node`, replacing the `Value` frame on top.
    fn start_value(&mut self, schema: &JsonSchema, node: NodeId, byte: u8) -> Step {
        match schema.node(node) {
            Node::Object { .. } | Node::Map { .. } if byte == b'{' => {
                self.replace_top(Frame::Object {
                    node,
                    phase: ObjectPhase::KeyOrEnd,
                    seen: 0,
                    value: node,
                });
                Step::Taken
            }
            Node::Array { .. } if byte == b'[' => {
                self.replace_top(Frame::Array {
                    node,
                    phase: ArrayPhase::ItemOrEnd,
                    count: 0,
                });
                Step::Taken
            }
            Node::String if byte == b'"' => {
                self.replace_top(Frame::String(StringPhase::Chars));
                Step::Taken
            }
            Node::Number { integer } => {
                let phase = match byte {
                    b'-' => NumberPhase::Minus,
                    b'0' => NumberPhase::Zero,
                    b'1'..=b'9' => NumberPhase::IntDigits(1),
                    _ => return Step::Refused,
                };
                self.replace_top(Frame::Number {
                    integer: *integer,
                    phase,
                });
                Step::Taken
            }
            Node::Literals(all) => {
                self.replace_top(Frame::Literal {
                    node,
                    lo: 0,
                    hi: all.len() as u32,
                    pos: 0,
                });
                self.literal_byte(schema, node, 0, all.len() as u32, 0, byte)
            }
            Node::Union(alternatives) => match schema.alternative_for(alternatives, byte) {
                Some(alternative) => self.start_value(schema, alternative, byte),
                None => Step::Refused,
            },
            _ => Step::Refused,
        }
    }

    fn object_byte(
        &mut self,
        schema: &JsonSchema,
        node: NodeId,
        phase: ObjectPhase,
        seen: u64,
        value: NodeId,
        byte: u8,
    ) -> Step {
        if is_whitespace(byte) {
            return Step::Whitespace;
        }
        let with_phase = |phase| Frame::Object {
            node,
            phase,
            seen,
            value,
        };
        let (keys, required) = match schema.node(node) {
            Node::Object { keys, required } => (Some(keys), *required),
            _ => (None, 0),
        };
        let closable = seen & required == required;
        match (phase, byte) {
            (ObjectPhase::KeyOrEnd | ObjectPhase::CommaOrEnd, b'}') if closable => {
                self.stack.pop();
                Step::Taken
            }
            (ObjectPhase::KeyOrEnd | ObjectPhase::Key, b'"') => {
                self.replace_top(with_phase(ObjectPhase::Colon));
                match (keys, schema.node(node)) {
                    (Some(keys), _) => {
                        let unseen = keys.iter().any(|k| seen & (1 << k.bit) == 0);
                        if !unseen {
                            return Step::Refused;
                        }
                        self.stack.push(Frame::Key {
                            node,
                            lo: 0,
                            hi: keys.len() as u32,
                            pos: 0,
                        });
                    }
                    (None, Node::Map { values: Some(_) }) => {
                        self.stack.push(Frame::String(StringPhase::Chars));
                    }
                    // `{}` only.
                    _ => return Step::Refused,
                }
                Step::Taken
            }
            (ObjectPhase::Colon, b':') => {
                let child = match schema.node(node) {
                    Node::Map {
                        values: Some(values),
                    } => *values,
                    _ => value,
                };
                self.replace_top(with_phase(ObjectPhase::CommaOrEnd));
                self.stack.push(Frame::Value(child));
                Step::Taken
            }
            (ObjectPhase::CommaOrEnd, b',') => {
                let more = match keys {
                    Some(keys) => keys.iter().any(|k| seen & (1 << k.bit) == 0),
                    None => true,
                };
                if !more {
                    return Step::Refused;
                }
                self.replace_top(with_phase(ObjectPhase::Key));
                Step::Taken
            }
            _ => Step::Refused,
        }
    }

    /// A byte of a declared key: narrows the keys that still match; the closing quote ends it,
    /// marking the key seen in the object below.
    fn key_byte(
        &mut self,
        schema: &JsonSchema,
        node: NodeId,
        lo: u32,
        hi: u32,
        pos: u32,
        byte: u8,
    ) -> Step {
        let Node::Object { keys, .. } = schema.node(node) else {
            return Step::Refused;
        };
        let Some(Frame::Object { seen, .. }) = self.stack.iter().rev().nth(1).copied() else {
            return Step::Refused;
        };
        let texts = &keys[lo as usize..hi as usize];
        let (start, end) = narrow(texts, |k| &k.text, pos, byte);
        let matching = &texts[start..end];
        if !matching.iter().any(|k| seen & (1 << k.bit) == 0) {
            return Step::Refused;
        }
        let pos = pos + 1;
        if let [key] = matching {
            if key.text.len() == pos as usize {
                self.stack.pop();
                if let Some(Frame::Object { seen, value, .. }) = self.stack.last_mut() {
                    *seen |= 1 << key.bit;
                    *value = key.value;
                }
                return Step::Taken;
            }
        }
        self.replace_top(Frame::Key {
            node,
            lo: lo + start as u32,
            hi: lo + end as u32,
            pos,
        });
        Step::Taken
    }

    fn array_byte(
        &mut self,
        schema: &JsonSchema,
        node: NodeId,
        phase: ArrayPhase,
        count: u32,
        byte: u8,
    ) -> Step {
        if is_whitespace(byte) {
            return Step::Whitespace;
        }
        let Node::Array {
            items,
            min_items,
            max_items,
        } = *schema.node(node)
        else {
            return Step::Refused;
        };
        match (phase, byte) {
            (ArrayPhase::ItemOrEnd | ArrayPhase::CommaOrEnd, b']') if count >= min_items => {
                self.stack.pop();
                Step::Taken
            }
            (ArrayPhase::CommaOrEnd, b',') if count < max_items => {
                self.replace_top(Frame::Array {
                    node,
                    phase: ArrayPhase::Item,
                    count,
                });
                Step::Taken
            }
            (ArrayPhase::ItemOrEnd | ArrayPhase::Item, _) if count < max_items => {
                self.replace_top(Frame::Array {
                    node,
                    phase: ArrayPhase::CommaOrEnd,
                    count: count + 1,
                });
                self.stack.push(Frame::Value(items));
                Step::Again
            }
            _ => Step::Refused,
        }
    }

    fn string_byte(&mut self, phase: StringPhase, byte: u8) -> Step {
        let next = match phase {
            StringPhase::Chars => match byte {
                b'"' => {
                    self.stack.pop();
                    return Step::Taken;
                }
                b'\\' => StringPhase::Escape,
                _ if is_plain_string_byte(byte) => StringPhase::Chars,
                _ => return Step::Refused,
            },
            StringPhase::Escape => match byte {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => StringPhase::Chars,
                b'u' => StringPhase::Unicode(4),
                _ => return Step::Refused,
            },
            StringPhase::Unicode(4) if matches!(byte, b'd' | b'D') => StringPhase::UnicodeAfterD,
            StringPhase::Unicode(left) if byte.is_ascii_hexdigit() => match left {
                1 => StringPhase::Chars,
                _ => StringPhase::Unicode(left - 1),
            },
            StringPhase::UnicodeAfterD if (b'0'..=b'7').contains(&byte) => StringPhase::Unicode(2),
            StringPhase::Unicode(_) | StringPhase::UnicodeAfterD => return Step::Refused,
        };
        self.replace_top(Frame::String(next));
        Step::Taken
    }

    fn literal_byte(
        &mut self,
        schema: &JsonSchema,
        node: NodeId,
        lo: u32,
        hi: u32,
        pos: u32,
        byte: u8,
    ) -> Step {
        let all = literals(schema, node);
        let texts = &all[lo as usize..hi as usize];
        let (start, end) = narrow(texts, |t| t, pos, byte);
        if start == end {
            // A complete literal (a number) followed by what comes after it.
            return if texts.first().is_some_and(|l| l.len() == pos as usize) {
                self.stack.pop();
                Step::Again
            } else {
                Step::Refused
            };
        }
        let pos = pos + 1;
        let matching = &texts[start..end];
        if matching.len() == 1 && matching[0].len() == pos as usize {
            self.stack.pop();
        } else {
            self.replace_top(Frame::Literal {
                node,
                lo: lo + start as u32,
                hi: lo + end as u32,
                pos,
            });
        }
        Step::Taken
    }
}

impl Default for JsonState {
    fn default() -> Self {
        Self::new()
    }
}

enum Step {
    Taken,
    Whitespace,
    Refused,
    /// Not taken: the frame ended, the byte goes to the frame below.
    Again,
}

fn number_byte(state: &mut JsonState, integer: bool, phase: NumberPhase, byte: u8) -> Step {
    use NumberPhase::*;
    let digit = byte.is_ascii_digit();
    let next = match (phase, byte) {
        (Minus, b'0') => Zero,
        (Minus, _) if digit => IntDigits(1),
        (IntDigits(n), _) if digit && n < MAX_INT_DIGITS => IntDigits(n + 1),
        (Zero | IntDigits(_), b'.') if !integer => Dot,
        (Zero | IntDigits(_) | FracDigits, b'e' | b'E') if !integer => Exp,
        (Dot | FracDigits, _) if digit => FracDigits,
        (Exp, b'+' | b'-') => ExpSign,
        (Exp | ExpSign, _) if digit => ExpDigits(1),
        (ExpDigits(1), _) if digit => ExpDigits(2),
        // Too many digits.
        (IntDigits(_) | ExpDigits(_), _) if digit => return Step::Refused,
        // A digit after a leading zero is never allowed; anything else ends the number.
        (Zero, _) if digit => return Step::Refused,
        _ if phase.complete() => {
            state.stack.pop();
            return Step::Again;
        }
        _ => return Step::Refused,
    };
    state.replace_top(Frame::Number {
        integer,
        phase: next,
    });
    Step::Taken
}

fn literals(schema: &JsonSchema, node: NodeId) -> &[Vec<u8>] {
    match schema.node(node) {
        Node::Literals(all) => all,
        _ => &[],
    }
}

/// Of sorted items whose texts share their first `pos` bytes, the range whose byte at `pos` is
/// `byte` (texts that end at `pos` come first and are not in it): two binary searches, so that
/// an enum of thousands of codes costs little per byte.
fn narrow<X>(items: &[X], text: impl Fn(&X) -> &[u8], pos: u32, byte: u8) -> (usize, usize) {
    let pos = pos as usize;
    let key = |x: &X| text(x).get(pos).map_or(-1, |&b| i32::from(b));
    let byte = i32::from(byte);
    let start = items.partition_point(|x| key(x) < byte);
    let end = items.partition_point(|x| key(x) <= byte);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(schema: &serde_json::Value, text: &str) -> bool {
        let schema = JsonSchema::compile(schema).unwrap();
        let mut state = JsonState::new();
        state.advance(&schema, text.as_bytes()) && state.can_end(&schema)
    }

    #[test]
    fn objects_take_declared_keys_once_and_need_the_required_ones() {
        let schema = json!({"type": "object", "additionalProperties": false,
            "properties": {"code": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["code"]});
        assert!(accepts(&schema, r#"{"code": "E11.9", "n": -12}"#));
        assert!(accepts(
            &schema,
            "{\n  \"n\": 0,\n  \"code\": \"a\\\"\\u00e9\"\n}"
        ));
        assert!(!accepts(&schema, r#"{"n": 1}"#), "code is required");
        assert!(!accepts(&schema, r#"{"code": "a", "code": "b"}"#));
        assert!(!accepts(&schema, r#"{"code": "a", "other": 1}"#));
        assert!(!accepts(&schema, r#"{"code": "a", "n": 1.5}"#));
        assert!(!accepts(&schema, r#"{"code": "a", "n": 01}"#));
        assert!(!accepts(&schema, r#"{"code": "a",}"#));
        assert!(
            !accepts(&schema, r#"{"code": "a"} "#),
            "nothing after the value"
        );
    }

    #[test]
    fn arrays_count_their_items() {
        let schema =
            json!({"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2});
        assert!(accepts(&schema, "[true]"));
        assert!(accepts(&schema, "[true, false]"));
        assert!(!accepts(&schema, "[]"));
        assert!(!accepts(&schema, "[true,false,true]"));
        assert!(!accepts(&schema, "[tru]"));
    }

    #[test]
    fn numbers_and_enums_end_on_the_next_byte_or_at_the_end() {
        let schema = json!({"type": "number"});
        assert!(accepts(&schema, "-0.5e+10"));
        assert!(!accepts(&schema, "-"));
        assert!(!accepts(&schema, "1."));
        assert!(!accepts(&schema, "1e100"), "out of a double's range");
        assert!(!accepts(&schema, &"9".repeat(17)));
        let schema = json!({"type": "array", "items": {"enum": [1, 12, "a", null]}});
        assert!(accepts(&schema, r#"[1,12,"a",null,1]"#));
        assert!(!accepts(&schema, "[2]"));
        assert!(!accepts(&schema, "[123]"));
        assert!(accepts(&json!({"enum": [1, 12]}), "1"));
        assert!(accepts(&json!({"enum": [1, 12]}), "12"));
    }

    #[test]
    fn a_large_enum_is_matched_exactly() {
        let codes: Vec<String> = (0..20_000).map(|i| format!("C{i}")).collect();
        let schema = json!({"type": "array", "items": {"enum": codes}});
        assert!(accepts(&schema, r#"["C0","C19999","C1234","C1"]"#));
        assert!(!accepts(&schema, r#"["C20000"]"#));
        assert!(!accepts(&schema, r#"["C"]"#));
        assert!(!accepts(&schema, r#"["C01"]"#));
    }

    #[test]
    fn whitespace_runs_are_bounded() {
        let schema = json!({"type": "array"});
        assert!(accepts(&schema, &format!("[{}]", " ".repeat(20))));
        assert!(!accepts(&schema, &format!("[{}]", " ".repeat(21))));
    }

    #[test]
    fn free_objects_take_any_value_and_strings_refuse_control_bytes() {
        let schema = json!({"type": "object"});
        assert!(accepts(&schema, r#"{"a": [1, {"b": null}], "c": "x"}"#));
        assert!(!accepts(&schema, "{\"a\": \"x\ny\"}"));
        assert!(!accepts(&schema, r#"{"a": "\q"}"#));
        assert!(accepts(&schema, r#"{"a": "\u00e9\uD7ff"}"#));
        assert!(!accepts(&schema, r#"{"a": "\udc00"}"#), "a lone surrogate");
        assert!(!accepts(&schema, "[1]"));
        let empty = json!({"type": "object", "additionalProperties": false});
        assert!(accepts(&empty, "{}"));
        assert!(!accepts(&empty, r#"{"a": 1}"#));
    }
}
