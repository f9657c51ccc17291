//! A JSON Schema compiled into the nodes the grammar walks: the subset that OpenAI-style clients
//! send (types, properties, required, additionalProperties, items, minItems/maxItems, enum,
//! const, local `$ref`s, and anyOf/oneOf whose alternatives start with different characters).
//! Assertion keywords outside it are refused, naming the keyword, rather than silently ignored.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{InferError, Result};

pub(crate) type NodeId = u32;

/// Properties per object at most: the keys an object has seen are one bit each.
pub(crate) const MAX_PROPERTIES: usize = 64;

/// Keywords that constrain a value and that this compiler cannot honour.
const UNSUPPORTED: &[&str] = &[
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "pattern",
    "patternProperties",
    "propertyNames",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "prefixItems",
    "additionalItems",
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
];

/// One schema node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// Declared keys only (any order), each at most once; `required` as a bit mask over
    /// `keys`. `keys` are sorted by their JSON text.
    Object {
        keys: Vec<ObjectKey>,
        required: u64,
    },
    /// Any keys (a free string) whose values follow `values`; `None`: only `{}`.
    Map {
        values: Option<NodeId>,
    },
    Array {
        items: NodeId,
        min_items: u32,
        max_items: u32,
    },
    String,
    Number {
        integer: bool,
    },
    /// One of these JSON texts exactly (enum, const, booleans, null), sorted.
    Literals(Vec<Vec<u8>>),
    /// One of these nodes, told apart by the first character of the value.
    Union(Vec<NodeId>),
    /// Not compiled yet: a `$ref` target while its own schema is being compiled.
    Pending,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ObjectKey {
    /// The key as JSON text without its opening quote: `code"`.
    pub text: Vec<u8>,
    /// Which bit of the seen-mask the key is (its order in `properties`).
    pub bit: u8,
    pub value: NodeId,
}

/// A compiled schema: node 0 is the root.
#[derive(Debug, Clone)]
pub struct JsonSchema {
    pub(crate) nodes: Vec<Node>,
}

impl JsonSchema {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn any_object() -> Self {
        let mut compiler = Compiler::new(&Value::Null);
        let any = compiler.any();
        compiler.nodes[0] = Node::Map { values: Some(any) };
        Self {
            nodes: compiler.nodes,
        }
    }

    /// Compiles `schema`; a keyword outside the supported subset fails naming it and where.
    pub fn compile(schema: &Value) -> Result<Self> {
        let mut compiler = Compiler::new(schema);
        compiler.compile_into(0, schema, "#")?;
        let schema = Self {
            nodes: compiler.nodes,
        };
        schema.check_unions()?;
        Ok(schema)
    }

    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// Which bytes may start a value of `id`, as a 128-bit set (values start with ASCII).
    pub(crate) fn first_bytes(&self, id: NodeId) -> u128 {
        self.first_bytes_within(id, 0)
    }

    fn first_bytes_within(&self, id: NodeId, depth: usize) -> u128 {
        let bits = |bytes: &[u8]| {
            bytes
                .iter()
                .fold(0u128, |set, &b| set | 1u128 << (b & 0x7f))
        };
        match self.node(id) {
            Node::Object { .. } | Node::Map { .. } => bits(b"{"),
            Node::Array { .. } => bits(b"["),
            Node::String => bits(b"\""),
            Node::Number { .. } => bits(b"-0123456789"),
            Node::Literals(literals) => literals
                .iter()
                .filter_map(|l| l.first())
                .fold(0, |set, &b| set | 1u128 << (b & 0x7f)),
            Node::Union(alternatives) if depth < 16 => alternatives
                .iter()
                .fold(0, |set, &a| set | self.first_bytes_within(a, depth + 1)),
            Node::Union(_) | Node::Pending => 0,
        }
    }

    /// The alternative of a union that a value starting with `byte` belongs to.
    pub(crate) fn alternative_for(&self, alternatives: &[NodeId], byte: u8) -> Option<NodeId> {
        if byte >= 0x80 {
            return None;
        }
        alternatives
            .iter()
            .copied()
            .find(|&a| self.first_bytes(a) & (1u128 << byte) != 0)
    }

    /// Unions must be decidable on the first character, and every node must admit a value.
    fn check_unions(&self) -> Result<()> {
        for id in 0..self.nodes.len() as NodeId {
            match self.node(id) {
                Node::Union(alternatives) => {
                    let mut seen = 0u128;
                    for &alternative in alternatives {
                        let first = self.first_bytes(alternative);
                        if first == 0 {
                            return Err(unsupported(
                                "anyOf",
                                "#",
                                "an alternative admits no value",
                            ));
                        }
                        if first & seen != 0 {
                            return Err(unsupported(
                                "anyOf",
                                "#",
                                "alternatives of the same type (two objects, two arrays, a string and a string enum…) are not supported: only alternatives that start differently, such as a type and null",
                            ));
                        }
                        seen |= first;
                    }
                }
                Node::Literals(literals) if literals.is_empty() => {
                    return Err(unsupported("enum", "#", "an empty enum admits no value"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn unsupported(keyword: &str, path: &str, why: &str) -> InferError {
    InferError::UnsupportedSchema {
        keyword: keyword.to_string(),
        message: format!("at {path}: {why}"),
    }
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    refs: HashMap<String, NodeId>,
}

impl<'a> Compiler<'a> {
    fn new(root: &'a Value) -> Self {
        Self {
            root,
            nodes: vec![Node::Pending],
            refs: HashMap::new(),
        }
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    /// Any JSON value: a union of every type, objects and arrays of anything.
    fn any(&mut self) -> NodeId {
        let union = self.push(Node::Pending);
        let map = self.push(Node::Map {
            values: Some(union),
        });
        let array = self.push(Node::Array {
            items: union,
            min_items: 0,
            max_items: u32::MAX,
        });
        let string = self.push(Node::String);
        let number = self.push(Node::Number { integer: false });
        let literals = self.push(literals(["false", "null", "true"]));
        self.nodes[union as usize] = Node::Union(vec![map, array, string, number, literals]);
        union
    }

    fn compile(&mut self, schema: &Value, path: &str) -> Result<NodeId> {
        let id = self.push(Node::Pending);
        self.compile_into(id, schema, path)?;
        Ok(id)
    }

    fn compile_into(&mut self, id: NodeId, schema: &Value, path: &str) -> Result<()> {
        let node = match schema {
            Value::Bool(true) => {
                let any = self.any();
                self.nodes[any as usize].clone()
            }
            Value::Object(object) => self.compile_object_schema(object, path)?,
            _ => {
                return Err(InferError::InvalidSchema(format!(
                    "at {path}: a schema is an object or true"
                )))
            }
        };
        self.nodes[id as usize] = node;
        Ok(())
    }

    fn compile_object_schema(
        &mut self,
        schema: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<Node> {
        if let Some(keyword) = UNSUPPORTED.iter().find(|k| schema.contains_key(**k)) {
            return Err(unsupported(
                keyword,
                path,
                "this keyword is not supported by constrained decoding",
            ));
        }
        if let Some(reference) = schema.get("$ref") {
            let target = self.reference(reference, path)?;
            return Ok(Node::Union(vec![target]));
        }
        if let Some(value) = schema.get("const") {
            return Ok(Node::Literals(vec![json_text(value)]));
        }
        if let Some(values) = schema.get("enum") {
            let Value::Array(values) = values else {
                return Err(invalid(path, "enum", "must be an array"));
            };
            let mut texts: Vec<Vec<u8>> = values.iter().map(json_text).collect();
            texts.sort();
            texts.dedup();
            return Ok(Node::Literals(texts));
        }
        for keyword in ["anyOf", "oneOf"] {
            if let Some(alternatives) = schema.get(keyword) {
                let Value::Array(alternatives) = alternatives else {
                    return Err(invalid(path, keyword, "must be an array"));
                };
                let ids = alternatives
                    .iter()
                    .enumerate()
                    .map(|(i, a)| self.compile(a, &format!("{path}/{keyword}/{i}")))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(Node::Union(ids));
            }
        }
        match schema.get("type") {
            Some(Value::String(kind)) => self.typed(kind, schema, path),
            Some(Value::Array(kinds)) => {
                let mut kinds: Vec<&str> = kinds.iter().filter_map(Value::as_str).collect();
                // A number may be an integer: "number" covers both.
                if kinds.contains(&"number") {
                    kinds.retain(|k| *k != "integer");
                }
                let mut ids = Vec::with_capacity(kinds.len());
                for kind in kinds {
                    let node = self.typed(kind, schema, path)?;
                    ids.push(self.push(node));
                }
                Ok(Node::Union(ids))
            }
            Some(_) => Err(invalid(
                path,
                "type",
                "must be a string or an array of strings",
            )),
            None if schema.contains_key("properties") => self.typed("object", schema, path),
            None if schema.contains_key("items") => self.typed("array", schema, path),
            None => {
                let any = self.any();
                Ok(self.nodes[any as usize].clone())
            }
        }
    }

    fn typed(
        &mut self,
        kind: &str,
        schema: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<Node> {
        Ok(match kind {
            "object" => self.object(schema, path)?,
            "array" => self.array(schema, path)?,
            "string" => Node::String,
            "number" => Node::Number { integer: false },
            "integer" => Node::Number { integer: true },
            "boolean" => literals(["false", "true"]),
            "null" => literals(["null"]),
            other => return Err(invalid(path, "type", &format!("unknown type `{other}`"))),
        })
    }

    fn object(&mut self, schema: &serde_json::Map<String, Value>, path: &str) -> Result<Node> {
        let properties = match schema.get("properties") {
            None => None,
            Some(Value::Object(properties)) => Some(properties),
            Some(_) => return Err(invalid(path, "properties", "must be an object")),
        };
        let Some(properties) = properties.filter(|p| !p.is_empty()) else {
            let values = match schema.get("additionalProperties") {
                Some(Value::Bool(false)) => None,
                None | Some(Value::Bool(true)) => Some(self.any()),
                Some(values) => {
                    Some(self.compile(values, &format!("{path}/additionalProperties"))?)
                }
            };
            if let Some(Value::Array(required)) = schema.get("required") {
                if !required.is_empty() {
                    return Err(unsupported(
                        "required",
                        path,
                        "required keys need `properties` that declare them",
                    ));
                }
            }
            return Ok(Node::Map { values });
        };
        if properties.len() > MAX_PROPERTIES {
            return Err(unsupported(
                "properties",
                path,
                &format!("at most {MAX_PROPERTIES} properties per object"),
            ));
        }
        let mut keys = Vec::with_capacity(properties.len());
        for (bit, (name, value)) in properties.iter().enumerate() {
            let value = self.compile(value, &format!("{path}/properties/{name}"))?;
            let text = json_text(&Value::String(name.clone()))[1..].to_vec();
            keys.push(ObjectKey {
                text,
                bit: bit as u8,
                value,
            });
        }
        let mut required = 0u64;
        match schema.get("required") {
            None => {}
            Some(Value::Array(names)) => {
                for name in names {
                    let bit = name
                        .as_str()
                        .and_then(|n| properties.keys().position(|k| k == n));
                    let Some(bit) = bit else {
                        return Err(unsupported(
                            "required",
                            path,
                            &format!("{name} is not among the properties"),
                        ));
                    };
                    required |= 1 << bit;
                }
            }
            Some(_) => return Err(invalid(path, "required", "must be an array of names")),
        }
        keys.sort_by(|a, b| a.text.cmp(&b.text));
        Ok(Node::Object { keys, required })
    }

    fn array(&mut self, schema: &serde_json::Map<String, Value>, path: &str) -> Result<Node> {
        let items = match schema.get("items") {
            None | Some(Value::Bool(true)) => self.any(),
            Some(items) => self.compile(items, &format!("{path}/items"))?,
        };
        let count = |keyword: &str, default: u32| -> Result<u32> {
            match schema.get(keyword) {
                None => Ok(default),
                Some(value) => value
                    .as_u64()
                    .map(|n| n.min(u32::MAX as u64) as u32)
                    .ok_or_else(|| invalid(path, keyword, "must be a whole number")),
            }
        };
        let (min_items, max_items) = (count("minItems", 0)?, count("maxItems", u32::MAX)?);
        if min_items > max_items {
            return Err(invalid(path, "minItems", "is over maxItems"));
        }
        Ok(Node::Array {
            items,
            min_items,
            max_items,
        })
    }

    /// A local reference (`#/$defs/Name`, `#/definitions/Name`, `#`), compiled once.
    fn reference(&mut self, reference: &Value, path: &str) -> Result<NodeId> {
        let Some(reference) = reference.as_str() else {
            return Err(invalid(path, "$ref", "must be a string"));
        };
        if let Some(&id) = self.refs.get(reference) {
            return Ok(id);
        }
        if reference == "#" {
            return Ok(0);
        }
        let Some(pointer) = reference.strip_prefix('#') else {
            return Err(unsupported(
                "$ref",
                path,
                &format!("`{reference}`: only references within the schema (#/...) are supported"),
            ));
        };
        let Some(target) = self.root.pointer(pointer) else {
            return Err(invalid(
                path,
                "$ref",
                &format!("`{reference}` points nowhere"),
            ));
        };
        let id = self.push(Node::Pending);
        self.refs.insert(reference.to_string(), id);
        self.compile_into(id, target, reference)?;
        Ok(id)
    }
}

fn literals<const N: usize>(texts: [&str; N]) -> Node {
    Node::Literals(texts.iter().map(|t| t.as_bytes().to_vec()).collect())
}

/// A value as compact JSON text.
fn json_text(value: &Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

fn invalid(path: &str, keyword: &str, why: &str) -> InferError {
    InferError::InvalidSchema(format!("at {path}: `{keyword}` {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(schema: Value) -> String {
        JsonSchema::compile(&schema).unwrap_err().to_string()
    }

    #[test]
    fn unsupported_keywords_are_named() {
        let e = error(json!({"type": "string", "pattern": "^a"}));
        assert!(e.contains("`pattern`"), "{e}");
        let e = error(
            json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}),
        );
        assert!(
            e.contains("`minimum`") && e.contains("#/properties/a"),
            "{e}"
        );
        let e = error(json!({"anyOf": [{"type": "object"}, {"type": "object"}]}));
        assert!(e.contains("`anyOf`"), "{e}");
        let e = error(json!({"type": "object", "properties": {"a": {}}, "required": ["b"]}));
        assert!(e.contains("`required`"), "{e}");
        let e = error(json!({"$ref": "https://example.com/s.json"}));
        assert!(e.contains("`$ref`"), "{e}");
    }

    #[test]
    fn references_resolve_and_may_recurse() {
        let schema = JsonSchema::compile(&json!({
            "$defs": {"Node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
            "$ref": "#/$defs/Node",
        }))
        .unwrap();
        assert_eq!(schema.first_bytes(0), 1u128 << b'{');
    }

    #[test]
    fn optional_values_are_unions_told_apart_by_their_first_byte() {
        let schema =
            JsonSchema::compile(&json!({"anyOf": [{"type": "string"}, {"type": "null"}]})).unwrap();
        let Node::Union(alternatives) = schema.node(0) else {
            panic!("{:?}", schema.node(0));
        };
        assert_eq!(
            schema.alternative_for(alternatives, b'"'),
            Some(alternatives[0])
        );
        assert_eq!(
            schema.alternative_for(alternatives, b'n'),
            Some(alternatives[1])
        );
        assert_eq!(schema.alternative_for(alternatives, b'1'), None);
        JsonSchema::compile(&json!({"type": ["integer", "number", "null"]})).unwrap();
    }

    #[test]
    fn object_keys_are_sorted_json_texts_with_required_bits() {
        let schema = JsonSchema::compile(&json!({"type": "object",
            "properties": {"b": {"type": "string"}, "a\"x": {"type": "integer"}},
            "required": ["b"]}))
        .unwrap();
        let Node::Object { keys, required } = schema.node(0) else {
            panic!()
        };
        assert_eq!(keys[0].text, b"a\\\"x\"".to_vec());
        assert_eq!(keys[1].text, b"b\"".to_vec());
        // serde_json's map orders the properties by name: `a"x` is bit 0.
        assert_eq!((keys[1].bit, *required), (1, 2));
    }
}
