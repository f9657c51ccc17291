//! The logits processor that keeps the output within a JSON schema.

use std::sync::Arc;

use super::grammar::JsonState;
use super::schema::JsonSchema;
use super::vocab::TokenTrie;
use crate::processors::LogitsProcessor;

/// Forbids every token whose text the schema's grammar refuses after what is written so far,
/// and the end-of-sequence tokens until the value is complete; once it is, only those.
pub struct JsonSchemaProcessor {
    schema: Arc<JsonSchema>,
    trie: Arc<TokenTrie>,
    eos_ids: Vec<u32>,
    state: JsonState,
    /// A token the grammar refused was taken anyway (a processor after this one): end.
    broken: bool,
    seen: usize,
    scratch: Vec<JsonState>,
    allowed: Vec<bool>,
}

impl std::fmt::Debug for JsonSchemaProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonSchemaProcessor")
            .field("state", &self.state)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl JsonSchemaProcessor {
    pub fn new(schema: Arc<JsonSchema>, trie: Arc<TokenTrie>, eos_ids: Vec<u32>) -> Self {
        Self {
            schema,
            trie,
            eos_ids,
            state: JsonState::new(),
            broken: false,
            seen: 0,
            scratch: Vec::new(),
            allowed: Vec::new(),
        }
    }

    /// Whether the JSON value is complete.
    pub fn is_done(&self) -> bool {
        self.state.is_done()
    }

    fn take(&mut self, id: u32) {
        if self.eos_ids.contains(&id) || self.broken {
            return;
        }
        let accepted = match self.trie.text(id) {
            Some(text) => self.state.advance(&self.schema, text),
            None => false,
        };
        self.broken = !accepted;
    }
}

impl LogitsProcessor for JsonSchemaProcessor {
    fn process(&mut self, generated: &[u32], logits: &mut [f32]) {
        for &id in &generated[self.seen.min(generated.len())..] {
            self.take(id);
        }
        self.seen = generated.len();
        self.allowed.clear();
        self.allowed.resize(logits.len(), false);
        let can_end = self.broken || self.state.can_end(&self.schema);
        if !self.broken && !self.state.is_done() {
            self.trie.allowed_tokens(
                &self.schema,
                &self.state,
                &mut self.scratch,
                &mut self.allowed,
            );
        }
        for &eos in &self.eos_ids {
            if let Some(a) = self.allowed.get_mut(eos as usize) {
                *a = can_end;
            }
        }
        for (logit, &allowed) in logits.iter_mut().zip(&self.allowed) {
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
    }

    fn name(&self) -> &'static str {
        "JsonSchemaProcessor"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::{json, Value};

    const TOKENS: &[&str] = &[
        "{",
        "}",
        "{\"",
        "\"",
        "\":",
        "\": \"",
        "\",",
        "\", \"",
        "\"}",
        "\"}]",
        "\"},",
        "[",
        "]",
        "[]",
        "[{",
        "],",
        "]}",
        ",",
        ", ",
        ":",
        " ",
        "\n",
        "code",
        "co",
        "de",
        "evidence",
        "ev",
        "idence",
        "diagnoses",
        "diag",
        "noses",
        "procedures",
        "proc",
        "fever",
        " cough",
        "E11",
        ".9",
        "J18",
        "1",
        "0",
        "-",
        ".",
        "e",
        "+",
        "true",
        "false",
        "null",
        "n",
        "\\",
        "\\\"",
        "u00e9",
        "é",
        "ab",
        "\t",
        "a",
        "b",
        "c",
        "d",
        "f",
        "g",
        "i",
        "k",
        "l",
        "m",
        "o",
        "p",
        "r",
        "s",
        "t",
        "u",
        "v",
        "x",
        "y",
        "z",
        "<eos>",
    ];
    const EOS: u32 = TOKENS.len() as u32 - 1;

    fn trie() -> Arc<TokenTrie> {
        let texts = TOKENS
            .iter()
            .map(|t| (*t != "<eos>").then(|| t.as_bytes().to_vec()))
            .collect();
        Arc::new(TokenTrie::new(texts))
    }

    /// The schema the `openai` coding engine sends.
    fn codes_schema() -> Value {
        let items = json!({"type": "array", "items": {"type": "object",
            "properties": {"code": {"type": "string"}, "evidence": {"type": "string"}},
            "required": ["code", "evidence"], "additionalProperties": false}});
        json!({"type": "object", "properties": {"diagnoses": items, "procedures": items},
            "required": ["diagnoses", "procedures"], "additionalProperties": false})
    }

    /// Samples uniformly among the allowed tokens until the end-of-sequence token (or
    /// `max_tokens`); the text and whether it ended.
    fn random_walk(schema: &Value, seed: u64, max_tokens: usize) -> (String, bool) {
        let compiled = Arc::new(JsonSchema::compile(schema).unwrap());
        let mut processor = JsonSchemaProcessor::new(compiled, trie(), vec![EOS]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut generated = Vec::new();
        let mut text = String::new();
        for _ in 0..max_tokens {
            let mut logits = vec![0.0f32; TOKENS.len()];
            processor.process(&generated, &mut logits);
            let allowed: Vec<u32> = (0..TOKENS.len() as u32)
                .filter(|&i| logits[i as usize] == 0.0)
                .collect();
            assert!(!allowed.is_empty(), "stuck after {text:?}");
            // Lean towards closing, so that walks end.
            let id = if rng.random_bool(0.3) {
                *allowed.last().unwrap_or(&EOS)
            } else {
                allowed[rng.random_range(0..allowed.len())]
            };
            if id == EOS {
                return (text, true);
            }
            text.push_str(TOKENS[id as usize]);
            generated.push(id);
        }
        (text, false)
    }

    fn valid(schema: &Value, text: &str) -> bool {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return false;
        };
        jsonschema_lite(schema, &value)
    }

    /// Enough of a validator for the schemas in these tests.
    fn jsonschema_lite(schema: &Value, value: &Value) -> bool {
        if let Some(values) = schema.get("enum").and_then(Value::as_array) {
            return values.contains(value);
        }
        if let Some(alternatives) = schema.get("anyOf").and_then(Value::as_array) {
            return alternatives.iter().any(|a| jsonschema_lite(a, value));
        }
        match schema.get("type").and_then(Value::as_str) {
            Some("object") => {
                let Some(object) = value.as_object() else {
                    return false;
                };
                let properties = schema["properties"].as_object().unwrap();
                let required = schema["required"].as_array().cloned().unwrap_or_default();
                required
                    .iter()
                    .all(|r| object.contains_key(r.as_str().unwrap()))
                    && object
                        .iter()
                        .all(|(k, v)| properties.get(k).is_some_and(|p| jsonschema_lite(p, v)))
            }
            Some("array") => value.as_array().is_some_and(|items| {
                let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0);
                let max = schema
                    .get("maxItems")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                (min..=max).contains(&(items.len() as u64))
                    && items.iter().all(|i| jsonschema_lite(&schema["items"], i))
            }),
            Some("string") => value.is_string(),
            // `-0` is read as a float; it is the integer 0.
            Some("integer") => value.as_f64().is_some_and(|f| f.fract() == 0.0),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some("null") => value.is_null(),
            _ => true,
        }
    }

    #[test]
    fn random_walks_over_a_toy_vocabulary_give_schema_valid_json() {
        let schemas = [
            codes_schema(),
            json!({"type": "object", "properties": {
                "n": {"type": "integer"}, "x": {"type": "number"},
                "flag": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                "kind": {"enum": ["a", "b", "ab", 1, 10, null]},
                "list": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}},
                "required": ["n", "list"]}),
            json!({"type": "array", "items": {"type": "number"}}),
        ];
        for schema in &schemas {
            let mut ended = 0;
            for seed in 0..200 {
                let (text, done) = random_walk(schema, seed, 200);
                if done {
                    ended += 1;
                    assert!(
                        valid(schema, &text),
                        "{text:?} is not valid against {schema}"
                    );
                }
            }
            assert!(ended > 100, "only {ended} walks ended for {schema}");
        }
        // Any object.
        let any = Arc::new(JsonSchema::any_object());
        let mut processor = JsonSchemaProcessor::new(any, trie(), vec![EOS]);
        let mut logits = vec![0.0f32; TOKENS.len()];
        processor.process(&[], &mut logits);
        assert!(logits[EOS as usize].is_infinite() && logits[0] == 0.0);
    }

    #[test]
    fn forbidden_tokens_are_masked_and_the_end_is_forced_once_complete() {
        let compiled = Arc::new(JsonSchema::compile(&codes_schema()).unwrap());
        let mut processor = JsonSchemaProcessor::new(compiled, trie(), vec![EOS]);
        let id = |t: &str| TOKENS.iter().position(|x| *x == t).unwrap() as u32;
        let mut logits = vec![0.0f32; TOKENS.len()];
        processor.process(&[], &mut logits);
        let allowed: Vec<&str> = (0..TOKENS.len())
            .filter(|&i| logits[i] == 0.0)
            .map(|i| TOKENS[i])
            .collect();
        assert_eq!(allowed, ["{", "{\"", " ", "\n", "\t"]);
        let written = [
            "{\"",
            "diagnoses",
            "\":",
            "[]",
            ", ",
            "\"",
            "procedures",
            "\":",
            "[]",
            "}",
        ];
        let ids: Vec<u32> = written.iter().map(|t| id(t)).collect();
        for n in 0..ids.len() {
            let mut logits = vec![0.0f32; TOKENS.len()];
            processor.process(&ids[..n], &mut logits);
            assert_eq!(
                logits[ids[n] as usize],
                0.0,
                "{} refused after {:?}",
                written[n],
                &written[..n]
            );
            assert!(logits[EOS as usize].is_infinite());
            assert!(logits[id("true") as usize].is_infinite());
        }
        let mut logits = vec![0.0f32; TOKENS.len()];
        processor.process(&ids, &mut logits);
        assert!(processor.is_done());
        let allowed: Vec<u32> = (0..TOKENS.len() as u32)
            .filter(|&i| logits[i as usize] == 0.0)
            .collect();
        assert_eq!(allowed, [EOS]);
    }
}
