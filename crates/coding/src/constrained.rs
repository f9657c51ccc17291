//! Constrained decoding for the `llm` engine: a logits processor that lets a model write only
//! answers of the training completion's shape (`prefix`, then codes joined by `separator`,
//! then `suffix`) whose codes are all in an allowed code set, kept as a character trie. At each
//! step every vocabulary token whose text would leave the grammar is forbidden, so the
//! invalid-code rate is zero by construction.

use std::sync::Arc;

use medcoder_infer::LogitsProcessor;

use crate::prediction::CodeKind;

/// A trie node: (character, child) sorted by character, and the kind of the code ending here.
type TrieNode = (Vec<(char, u32)>, Option<CodeKind>);

/// The allowed codes as a character trie.
#[derive(Debug, Clone, Default)]
pub struct CodeTrie {
    nodes: Vec<TrieNode>,
}

impl CodeTrie {
    pub fn new<S: AsRef<str>>(codes: impl IntoIterator<Item = (S, CodeKind)>) -> Self {
        let mut trie = Self {
            nodes: vec![(Vec::new(), None)],
        };
        for (code, kind) in codes {
            let mut node = 0u32;
            for c in code.as_ref().chars() {
                node = match trie.child(node, c) {
                    Some(next) => next,
                    None => {
                        let next = trie.nodes.len() as u32;
                        trie.nodes.push((Vec::new(), None));
                        let children = &mut trie.nodes[node as usize].0;
                        let at = children.partition_point(|(d, _)| *d < c);
                        children.insert(at, (c, next));
                        next
                    }
                };
            }
            trie.nodes[node as usize].1 = Some(kind);
        }
        trie
    }

    fn child(&self, node: u32, c: char) -> Option<u32> {
        let children = &self.nodes[node as usize].0;
        children
            .binary_search_by(|(d, _)| d.cmp(&c))
            .ok()
            .map(|i| children[i].1)
    }

    /// The kind of the code spelled exactly by `text`, if it is one.
    pub fn kind_of(&self, text: &str) -> Option<CodeKind> {
        let mut node = 0;
        for c in text.chars() {
            node = self.child(node, c)?;
        }
        self.nodes[node as usize].1
    }
}

/// Where in the answer the text written so far stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Prefix(usize),
    /// Inside a code (a trie node); `first`: no code written yet.
    Code {
        node: u32,
        first: bool,
    },
    Separator(usize),
    Suffix(usize),
    End,
}

/// The answer's shape: `prefix code (separator code)* suffix`, or `prefix suffix` (no code).
#[derive(Debug, Clone)]
pub struct AnswerGrammar {
    prefix: Vec<char>,
    separator: Vec<char>,
    suffix: Vec<char>,
    trie: Arc<CodeTrie>,
}

impl AnswerGrammar {
    /// From a completion template with `{codes}` (as `PromptTemplate::completion`).
    pub fn new(completion: &str, separator: &str, trie: Arc<CodeTrie>) -> Self {
        let (prefix, suffix) = completion.split_once("{codes}").unwrap_or((completion, ""));
        Self {
            prefix: prefix.chars().collect(),
            separator: separator.chars().collect(),
            suffix: suffix.chars().collect(),
            trie,
        }
    }

    fn start(&self) -> Vec<State> {
        self.after_prefix(0)
    }

    /// The states at prefix position `i` (past the prefix: a first code or the suffix).
    fn after_prefix(&self, i: usize) -> Vec<State> {
        if i < self.prefix.len() {
            vec![State::Prefix(i)]
        } else {
            let mut states = vec![State::Code {
                node: 0,
                first: true,
            }];
            states.extend(self.after_suffix_position(0));
            states
        }
    }

    fn after_suffix_position(&self, i: usize) -> Option<State> {
        Some(if i < self.suffix.len() {
            State::Suffix(i)
        } else {
            State::End
        })
    }

    /// The states `state` can be in after reading `c`.
    fn step(&self, state: State, c: char, out: &mut Vec<State>) {
        match state {
            State::Prefix(i) if self.prefix[i] == c => out.extend(self.after_prefix(i + 1)),
            State::Code { node, first } => {
                if let Some(next) = self.trie.child(node, c) {
                    out.push(State::Code { node: next, first });
                }
                let complete = self.trie.nodes[node as usize].1.is_some();
                if complete {
                    // The code ends here: a separator or the suffix may follow.
                    if self.separator.first() == Some(&c) {
                        out.push(if self.separator.len() == 1 {
                            State::Code {
                                node: 0,
                                first: false,
                            }
                        } else {
                            State::Separator(1)
                        });
                    }
                    if self.suffix.first() == Some(&c) {
                        out.extend(self.after_suffix_position(1));
                    }
                }
            }
            State::Separator(i) if self.separator[i] == c => {
                out.push(if i + 1 == self.separator.len() {
                    State::Code {
                        node: 0,
                        first: false,
                    }
                } else {
                    State::Separator(i + 1)
                })
            }
            State::Suffix(i) if self.suffix[i] == c => {
                out.extend(self.after_suffix_position(i + 1))
            }
            _ => {}
        }
    }

    fn advance(&self, states: &[State], text: &[char]) -> Vec<State> {
        let mut current = states.to_vec();
        let mut next = Vec::new();
        for &c in text {
            next.clear();
            for &s in &current {
                self.step(s, c, &mut next);
            }
            current.clear();
            for &s in &next {
                if !current.contains(&s) {
                    current.push(s);
                }
            }
            if current.is_empty() {
                break;
            }
        }
        current
    }

    /// Whether `text` can follow from `states` (what [`Self::advance`] answers, without its
    /// allocations: this runs once per vocabulary token per generated token).
    fn admits(&self, states: &[State], text: &[char]) -> bool {
        const MAX: usize = 8;
        let mut current = [State::End; MAX];
        let mut len = states.len();
        if len > MAX {
            return !self.advance(states, text).is_empty();
        }
        current[..len].copy_from_slice(states);
        let mut out = Vec::new();
        for &c in text {
            let mut next = [State::End; MAX];
            let mut next_len = 0;
            for &s in &current[..len] {
                out.clear();
                self.step(s, c, &mut out);
                for &n in &out {
                    if !next[..next_len].contains(&n) {
                        if next_len == MAX {
                            return !self.advance(states, text).is_empty();
                        }
                        next[next_len] = n;
                        next_len += 1;
                    }
                }
            }
            if next_len == 0 {
                return false;
            }
            current = next;
            len = next_len;
        }
        true
    }

    /// Whether the answer may end here.
    fn accepts(&self, states: &[State]) -> bool {
        states.iter().any(|s| match *s {
            State::End => true,
            State::Code { node, .. } => {
                self.suffix.is_empty() && self.trie.nodes[node as usize].1.is_some()
            }
            _ => false,
        })
    }

    /// The codes of a complete answer, in order, each with its kind; `None` if `text` is not
    /// an answer of this grammar.
    pub fn parse(&self, text: &str) -> Option<Vec<(String, CodeKind)>> {
        let chars: Vec<char> = text.chars().collect();
        let end = self.advance(&self.start(), &chars);
        if !self.accepts(&end) {
            return None;
        }
        let body: String = chars
            .get(self.prefix.len()..chars.len().checked_sub(self.suffix.len())?)?
            .iter()
            .collect();
        if body.is_empty() {
            return Some(Vec::new());
        }
        let separator: String = self.separator.iter().collect();
        body.split(separator.as_str())
            .map(|code| self.trie.kind_of(code).map(|k| (code.to_string(), k)))
            .collect()
    }
}

/// A code of an answer and where it was written, in characters of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeSpan {
    pub code: String,
    pub kind: CodeKind,
    /// Where the text that led to the code starts: the end of the code before it (so the
    /// separator, which chose another code over ending the answer, is counted with this one),
    /// or the end of the prefix for the first code.
    pub lead: usize,
    pub start: usize,
    pub end: usize,
}

impl AnswerGrammar {
    /// The codes of an answer (complete, or cut short by a token limit: its whole codes) with
    /// their places, in the order written.
    pub fn code_spans(&self, text: &str) -> Vec<CodeSpan> {
        let codes = self.parse(text).unwrap_or_else(|| self.parse_prefix(text));
        let chars: Vec<char> = text.chars().collect();
        let mut cursor = self.prefix.len();
        let mut spans = Vec::with_capacity(codes.len());
        for (code, kind) in codes {
            let needle: Vec<char> = code.chars().collect();
            // The codes follow each other, a separator between: the first match after the
            // code before is this one (a code holds no separator).
            let found = (cursor..=chars.len().saturating_sub(needle.len()))
                .find(|&at| chars[at..].starts_with(&needle));
            if let Some(start) = found {
                let end = start + needle.len();
                spans.push(CodeSpan {
                    code,
                    kind,
                    lead: cursor,
                    start,
                    end,
                });
                cursor = end;
            }
        }
        spans
    }

    /// The whole codes of an answer cut short (by a token limit), in order.
    pub fn parse_prefix(&self, text: &str) -> Vec<(String, CodeKind)> {
        let body: String = text.chars().skip(self.prefix.len()).collect();
        let separator: String = self.separator.iter().collect();
        let suffix: String = self.suffix.iter().collect();
        body.split(separator.as_str())
            .filter_map(|part| {
                let code = part.strip_suffix(suffix.as_str()).unwrap_or(part);
                self.trie.kind_of(code).map(|k| (code.to_string(), k))
            })
            .collect()
    }
}

/// The processor: forbids every token that would leave the grammar, and the end-of-sequence
/// tokens until the answer may end.
pub struct ConstrainedCodes {
    grammar: AnswerGrammar,
    /// Each vocabulary token's text; `None` for tokens that never fit (special, partial bytes).
    token_texts: Arc<Vec<Option<Vec<char>>>>,
    eos_ids: Vec<u32>,
    states: Vec<State>,
    seen: usize,
}

impl std::fmt::Debug for ConstrainedCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstrainedCodes")
            .field("vocabulary", &self.token_texts.len())
            .field("states", &self.states)
            .finish_non_exhaustive()
    }
}

impl ConstrainedCodes {
    pub fn new(
        grammar: AnswerGrammar,
        token_texts: Arc<Vec<Option<Vec<char>>>>,
        eos_ids: Vec<u32>,
    ) -> Self {
        let states = grammar.start();
        Self {
            grammar,
            token_texts,
            eos_ids,
            states,
            seen: 0,
        }
    }
}

impl LogitsProcessor for ConstrainedCodes {
    fn process(&mut self, generated: &[u32], logits: &mut [f32]) {
        for &id in &generated[self.seen.min(generated.len())..] {
            let text = self.token_texts.get(id as usize).and_then(|t| t.as_deref());
            self.states = match text {
                Some(text) => self.grammar.advance(&self.states, text),
                None => Vec::new(),
            };
        }
        self.seen = generated.len();
        let accepts = self.grammar.accepts(&self.states);
        for (id, logit) in logits.iter_mut().enumerate() {
            if *logit == f32::NEG_INFINITY {
                continue;
            }
            let allowed = if self.eos_ids.contains(&(id as u32)) {
                accepts
            } else {
                match self.token_texts.get(id).and_then(|t| t.as_deref()) {
                    Some(text) if !text.is_empty() => self.grammar.admits(&self.states, text),
                    _ => false,
                }
            };
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
    }

    fn name(&self) -> &'static str {
        "constrained-icd-codes"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trie() -> Arc<CodeTrie> {
        Arc::new(CodeTrie::new([
            ("E11.9", CodeKind::Diagnosis),
            ("E11.65", CodeKind::Diagnosis),
            ("I10", CodeKind::Diagnosis),
            ("R51", CodeKind::Diagnosis),
            ("R51.9", CodeKind::Diagnosis),
            ("0DTJ4ZZ", CodeKind::Procedure),
        ]))
    }

    const VOCAB: &[&str] = &[
        "E", "11", ".", "9", "E11", ".6", "5", "I10", ", ", ",", " ", "R51", ".9", "0DTJ4ZZ", "X",
        "hello", "Codes:", " E11.9", "\n", "E12",
    ];
    const EOS: u32 = VOCAB.len() as u32;

    fn processor(completion: &str) -> ConstrainedCodes {
        let texts: Vec<Option<Vec<char>>> = VOCAB
            .iter()
            .map(|t| Some(t.chars().collect()))
            .chain([None])
            .collect();
        ConstrainedCodes::new(
            AnswerGrammar::new(completion, ", ", trie()),
            Arc::new(texts),
            vec![EOS],
        )
    }

    /// Random walks through the allowed tokens always spell valid answers.
    #[test]
    fn every_sampled_answer_parses_into_allowed_codes() {
        for completion in ["{codes}", "Codes: {codes}\n"] {
            let mut state = 7u64;
            let mut answers = 0;
            for _ in 0..300 {
                let mut p = processor(completion);
                let mut generated: Vec<u32> = Vec::new();
                for _ in 0..40 {
                    let mut logits = vec![0f32; VOCAB.len() + 1];
                    p.process(&generated, &mut logits);
                    let allowed: Vec<u32> = (0..logits.len() as u32)
                        .filter(|&i| logits[i as usize].is_finite())
                        .collect();
                    assert!(
                        !allowed.is_empty(),
                        "{completion}: stuck after {generated:?}"
                    );
                    let pick = allowed[(next_random(&mut state) % allowed.len() as u64) as usize];
                    generated.push(pick);
                    if pick == EOS {
                        break;
                    }
                }
                if generated.last() != Some(&EOS) {
                    continue;
                }
                let text: String = generated[..generated.len() - 1]
                    .iter()
                    .map(|&i| VOCAB[i as usize])
                    .collect();
                let codes = p.grammar.parse(&text).unwrap_or_else(|| panic!("{text:?}"));
                assert!(codes.iter().all(|(c, _)| trie().kind_of(c).is_some()));
                answers += 1;
            }
            assert!(
                answers > 100,
                "{completion}: only {answers} complete answers"
            );
        }
    }

    #[test]
    fn tokens_that_leave_the_grammar_are_forbidden() {
        let mut p = processor("{codes}");
        let mut logits = vec![0f32; VOCAB.len() + 1];
        p.process(&[], &mut logits);
        let ok = |t: &str| logits[VOCAB.iter().position(|v| *v == t).unwrap()].is_finite();
        assert!(ok("E") && ok("E11") && ok("I10") && ok("R51") && ok("0DTJ4ZZ"));
        assert!(!ok("X") && !ok("hello") && !ok("E12") && !ok(", ") && !ok("."));
        // After "R51": a complete code that also starts R51.9.
        let r51 = VOCAB.iter().position(|v| *v == "R51").unwrap() as u32;
        let mut logits = vec![0f32; VOCAB.len() + 1];
        p.process(&[r51], &mut logits);
        assert!(ok_at(&logits, ".9") && ok_at(&logits, ", ") && logits[EOS as usize].is_finite());
        assert!(!ok_at(&logits, ".6") && !ok_at(&logits, "9"));
        let grammar = AnswerGrammar::new("{codes}", ", ", trie());
        assert_eq!(
            grammar.parse("R51, 0DTJ4ZZ").unwrap(),
            [
                ("R51".to_string(), CodeKind::Diagnosis),
                ("0DTJ4ZZ".to_string(), CodeKind::Procedure)
            ]
        );
        assert!(grammar.parse("R5").is_none() && grammar.parse("R51, ").is_none());
        assert_eq!(
            grammar.parse_prefix("I10, R51, E11.")[..2],
            [
                ("I10".to_string(), CodeKind::Diagnosis),
                ("R51".to_string(), CodeKind::Diagnosis)
            ]
        );
        assert_eq!(grammar.parse_prefix("I10, R51, E11.").len(), 2);
    }

    #[test]
    fn code_spans_place_each_code_after_its_separator() {
        let span = |code: &str, lead, start, end| CodeSpan {
            code: code.into(),
            kind: trie().kind_of(code).unwrap(),
            lead,
            start,
            end,
        };
        let grammar = AnswerGrammar::new("Codes: {codes}\n", ", ", trie());
        assert_eq!(
            grammar.code_spans("Codes: R51, R51.9, 0DTJ4ZZ\n"),
            [
                span("R51", 7, 7, 10),
                span("R51.9", 10, 12, 17),
                span("0DTJ4ZZ", 17, 19, 26)
            ]
        );
        // Cut short inside a code: the whole ones.
        let bare = AnswerGrammar::new("{codes}", ", ", trie());
        assert_eq!(bare.code_spans("I10, E11.6"), [span("I10", 0, 0, 3)]);
        assert!(bare.code_spans("").is_empty());
    }

    fn next_random(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *state >> 33
    }

    fn ok_at(logits: &[f32], t: &str) -> bool {
        logits[VOCAB.iter().position(|v| *v == t).unwrap()].is_finite()
    }
}
