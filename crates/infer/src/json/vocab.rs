//! The vocabulary as a byte trie, built once per model, and the walk that finds every token a
//! [`JsonState`] accepts. Tokens that share a prefix share its steps, a refused byte prunes
//! every token under it, and inside a string a subtree of plain bytes is taken whole without
//! stepping: a step costs far less than trying the 49k tokens one by one.

use medcoder_models::ModelTokenizer;

use super::grammar::{is_plain_string_byte, JsonState};
use super::schema::JsonSchema;

#[derive(Debug, Clone)]
struct TrieNode {
    byte: u8,
    /// Every byte below this node is a plain string byte.
    plain_below: bool,
    /// Children: `nodes[children.0..children.1]`.
    children: (u32, u32),
    /// Tokens at or below this node: `order[tokens.0..tokens.1]`; those ending here first.
    tokens: (u32, u32),
    ends_here: u32,
}

/// The tokens' texts as bytes, in a trie.
#[derive(Debug, Clone)]
pub struct TokenTrie {
    nodes: Vec<TrieNode>,
    /// Token ids sorted by their bytes: the trie's depth-first order.
    order: Vec<u32>,
    texts: Vec<Option<Vec<u8>>>,
    longest: usize,
}

impl TokenTrie {
    /// `texts[id]`: the bytes token `id` adds to the output; `None` (special tokens, pieces of
    /// a character) or empty: never allowed by a grammar.
    pub fn new(texts: Vec<Option<Vec<u8>>>) -> Self {
        let mut order: Vec<u32> = (0..texts.len() as u32)
            .filter(|&id| texts[id as usize].as_ref().is_some_and(|t| !t.is_empty()))
            .collect();
        let text = |id: u32| texts[id as usize].as_deref().unwrap_or_default();
        order.sort_by(|&a, &b| text(a).cmp(text(b)).then(a.cmp(&b)));
        let longest = order.iter().map(|&id| text(id).len()).max().unwrap_or(0);
        let mut trie = Self {
            nodes: vec![TrieNode {
                byte: 0,
                plain_below: false,
                children: (0, 0),
                tokens: (0, order.len() as u32),
                ends_here: 0,
            }],
            order,
            texts,
            longest,
        };
        trie.build(0, 0);
        trie
    }

    /// The texts of a model's tokens: each decoded after itself, so that a SentencePiece
    /// token keeps the leading space it has within a text. Special tokens and tokens that are
    /// part of a character (U+FFFD) are left out.
    pub fn texts_of(tokenizer: &ModelTokenizer) -> Vec<Option<Vec<u8>>> {
        let special = tokenizer.special_token_ids();
        (0..tokenizer.vocab_size() as u32)
            .map(|id| {
                if special.contains(&id) {
                    return None;
                }
                let alone = tokenizer.decode(&[id]).ok()?;
                let twice = tokenizer.decode(&[id, id]).ok()?;
                let text = twice.strip_prefix(alone.as_str()).unwrap_or(&alone);
                (!text.is_empty() && !text.contains('\u{FFFD}')).then(|| text.as_bytes().to_vec())
            })
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn text(&self, id: u32) -> Option<&[u8]> {
        self.texts.get(id as usize)?.as_deref()
    }

    /// Makes the children of `node` (whose tokens share `depth` bytes), then theirs.
    fn build(&mut self, node: usize, depth: usize) {
        let (lo, hi) = self.nodes[node].tokens;
        let byte_at = |trie: &Self, i: u32| {
            trie.texts[trie.order[i as usize] as usize]
                .as_deref()
                .and_then(|t| t.get(depth).copied())
        };
        let mut start = lo;
        while start < hi && byte_at(self, start).is_none() {
            start += 1;
        }
        self.nodes[node].ends_here = start - lo;
        let mut groups = Vec::new();
        while start < hi {
            let byte = byte_at(self, start).unwrap_or_default();
            let mut end = start + 1;
            while end < hi && byte_at(self, end) == Some(byte) {
                end += 1;
            }
            groups.push((byte, start, end));
            start = end;
        }
        let first = self.nodes.len() as u32;
        for &(byte, start, end) in &groups {
            self.nodes.push(TrieNode {
                byte,
                plain_below: true,
                children: (0, 0),
                tokens: (start, end),
                ends_here: 0,
            });
        }
        self.nodes[node].children = (first, first + groups.len() as u32);
        for child in first..first + groups.len() as u32 {
            self.build(child as usize, depth + 1);
        }
        let plain = (first..first + groups.len() as u32).all(|c| {
            let c = &self.nodes[c as usize];
            is_plain_string_byte(c.byte) && c.plain_below
        });
        self.nodes[node].plain_below = plain;
    }

    /// Sets `allowed[id]` for every token whose bytes `state` accepts (the others are left as
    /// they are). `scratch` keeps its allocations between calls.
    pub fn allowed_tokens(
        &self,
        schema: &JsonSchema,
        state: &JsonState,
        scratch: &mut Vec<JsonState>,
        allowed: &mut [bool],
    ) {
        scratch.resize_with(self.longest + 2, JsonState::new);
        scratch[0].copy_from(state);
        self.visit(0, 0, 0, schema, scratch, allowed);
    }

    fn visit(
        &self,
        node: usize,
        depth: usize,
        slot: usize,
        schema: &JsonSchema,
        states: &mut [JsonState],
        allowed: &mut [bool],
    ) {
        let here = &self.nodes[node];
        let in_string = states[slot].in_string_chars();
        let (lo, hi) = here.tokens;
        let taken_whole = in_string && here.plain_below;
        let end = if taken_whole { hi } else { lo + here.ends_here };
        for &id in &self.order[lo as usize..end as usize] {
            if let Some(a) = allowed.get_mut(id as usize) {
                *a = true;
            }
        }
        if taken_whole {
            return;
        }
        for child in here.children.0..here.children.1 {
            let byte = self.nodes[child as usize].byte;
            if in_string && is_plain_string_byte(byte) {
                self.visit(child as usize, depth + 1, slot, schema, states, allowed);
                continue;
            }
            let (below, above) = states.split_at_mut(depth + 1);
            let next = &mut above[0];
            next.copy_from(&below[slot]);
            if next.push(schema, byte) {
                self.visit(
                    child as usize,
                    depth + 1,
                    depth + 1,
                    schema,
                    states,
                    allowed,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn trie(tokens: &[&str]) -> TokenTrie {
        TokenTrie::new(tokens.iter().map(|t| Some(t.as_bytes().to_vec())).collect())
    }

    /// The tokens allowed after `prefix`, by the trie and by trying each token alone.
    fn allowed_both_ways(trie: &TokenTrie, schema: &JsonSchema, prefix: &str) -> Vec<u32> {
        let mut state = JsonState::new();
        assert!(state.advance(schema, prefix.as_bytes()), "{prefix}");
        let mut allowed = vec![false; trie.vocab_size()];
        trie.allowed_tokens(schema, &state, &mut Vec::new(), &mut allowed);
        let by_trie: Vec<u32> = (0..allowed.len() as u32)
            .filter(|&i| allowed[i as usize])
            .collect();
        let one_by_one: Vec<u32> = (0..trie.vocab_size() as u32)
            .filter(|&id| {
                let mut s = state.clone();
                trie.text(id)
                    .is_some_and(|t| !t.is_empty() && s.advance(schema, t))
            })
            .collect();
        assert_eq!(by_trie, one_by_one, "after {prefix:?}");
        by_trie
    }

    #[test]
    fn the_trie_allows_exactly_the_tokens_the_state_takes() {
        let tokens = [
            "{", "}", "{\"", "\"", "\":", "\",", "code", "co", "c", "de", " ", "\n", "[", "]",
            "],", "1", "12", "-", ".", "e", "true", "null", "\\", "\\n", "ab\"}", "x y", "é", "\t",
        ];
        let trie = trie(&tokens);
        let schema = JsonSchema::compile(&json!({"type": "object", "additionalProperties": false,
            "properties": {"code": {"type": "string"}, "n": {"type": "array", "items": {"type": "number"}}},
            "required": ["code"]}))
        .unwrap();
        let name = |ids: Vec<u32>| ids.iter().map(|&i| tokens[i as usize]).collect::<Vec<_>>();
        assert_eq!(
            name(allowed_both_ways(&trie, &schema, "")),
            ["{", "{\"", " ", "\n", "\t"]
        );
        assert_eq!(
            name(allowed_both_ways(&trie, &schema, "{\"")),
            ["code", "co", "c"]
        );
        let in_string = name(allowed_both_ways(&trie, &schema, "{\"code\": \"x"));
        assert!(
            in_string.contains(&"ab\"}") && in_string.contains(&"é"),
            "{in_string:?}"
        );
        assert!(
            !in_string.contains(&"\n") && !in_string.contains(&"\t"),
            "{in_string:?}"
        );
        allowed_both_ways(&trie, &schema, "{\"code\": \"x\", \"n\": [1");
        allowed_both_ways(&trie, &schema, "{\"code\": \"x\\");
    }
}
