//! The `llm` engine: a local model (plus a LoRA adapter from `medcoder train`) prompted exactly
//! as in training, decoding greedily under [`ConstrainedCodes`], so that every code it writes
//! is in the allowed set. Every generated code is assigned. Codes are ranked in the order the
//! model wrote them, not by confidence (the order is the model's own ranking; a code written
//! later may be likelier than one before it). A code's confidence is the probability the model
//! gave to writing it where it did: `exp` of the summed log-probabilities of the tokens that
//! spell it and of the separator before it (which chose another code over ending the answer),
//! under the constrained decoder's mask at temperature 1 (see `llm_confidence.rs`). It is the
//! model's own probability, in (0, 1], not calibrated against gold codes.
//!
//! A note whose prompt would pass `max_prompt_tokens` is coded in chunks cut at sentence ends
//! (paragraphs and lines end sentences too), each prompted alone; the answers are merged in
//! chunk order, each code ranked where it first appeared, with the highest confidence any
//! chunk gave it. Nothing of the note is dropped.

use std::sync::Arc;
use std::time::Instant;

use medcoder_infer::{
    GenerateRequest, Generation, LogitsProcessor, SamplingParams, StopConditions,
};
use medcoder_models::LoadedModel;
use medcoder_train::{coding_prompt_text, PromptTemplate};

use crate::constrained::{AnswerGrammar, CodeTrie, ConstrainedCodes};
use crate::evidence::{best_sentence, NoteSentences};
use crate::llm_confidence::{scored_codes, ScoredCode};
use crate::prediction::{CodeDescriber, CodeKind, CodedItem, NotePrediction};
use crate::text::{sentences, words, Analyzer};
use crate::CodingError;

/// The fewest note tokens a chunk's prompt must leave room for.
const MIN_CHUNK_TOKENS: usize = 16;

/// The codes generated for one chunk, in the order written.
pub(crate) type ChunkCodes = Vec<ScoredCode>;

/// A piece of a note coded on its own: its text and where it starts in the note (characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteChunk {
    pub start: usize,
    pub text: String,
}

#[derive(Debug)]
pub struct LlmEngine {
    model: LoadedModel,
    template: PromptTemplate,
    grammar: AnswerGrammar,
    token_texts: Arc<Vec<Option<Vec<char>>>>,
    /// Prompt tokens at most: longer notes are coded in chunks.
    max_prompt_tokens: usize,
    max_new_tokens: usize,
    /// What the model is, for the predictions' `model` field.
    name: String,
}

impl LlmEngine {
    pub fn new(
        model: LoadedModel,
        template: PromptTemplate,
        allowed: &[(String, CodeKind)],
        max_prompt_tokens: usize,
        name: String,
    ) -> Result<Self, CodingError> {
        if allowed.is_empty() {
            return Err(CodingError::Invalid(
                "the llm engine needs a non-empty set of allowed codes".into(),
            ));
        }
        let trie = Arc::new(CodeTrie::new(allowed.iter().map(|(c, k)| (c.as_str(), *k))));
        let grammar = AnswerGrammar::new(&template.completion, &template.separator, trie);
        let vocab = model.tokenizer.vocab_size();
        let token_texts: Vec<Option<Vec<char>>> = (0..vocab as u32)
            .map(|id| {
                let text = model.tokenizer.decode(&[id]).ok()?;
                (!text.is_empty() && !text.contains('\u{FFFD}')).then(|| text.chars().collect())
            })
            .collect();
        Ok(Self {
            model,
            template,
            grammar,
            token_texts: Arc::new(token_texts),
            max_prompt_tokens,
            max_new_tokens: 256,
            name,
        })
    }

    /// The loaded model the engine generates with.
    pub(crate) fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// What the model is: id, adapter and the allowed code set.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn predict(
        &self,
        id: &str,
        text: &str,
        describe: &CodeDescriber<'_>,
    ) -> Result<NotePrediction, CodingError> {
        self.predict_unless_cancelled(id, text, describe, &|| false)
    }

    /// [`Self::predict`], stopping generation as soon as `cancelled` says so (checked after
    /// every token): [`CodingError::Cancelled`] then.
    pub fn predict_unless_cancelled(
        &self,
        id: &str,
        text: &str,
        describe: &CodeDescriber<'_>,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<NotePrediction, CodingError> {
        let started = Instant::now();
        let chunks = self.chunks(id, text)?;
        let mut per_chunk = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            per_chunk.push(self.generate_codes(id, &chunk.text, cancelled)?);
        }
        Ok(self.prediction(id, text, per_chunk, describe, started))
    }

    /// The codes of each chunk merged in chunk order, each ranked where it first appeared, with
    /// the highest confidence a chunk gave it and, as evidence, the note's sentence that shares
    /// the most words with the code's description (the model writes codes only).
    pub(crate) fn prediction(
        &self,
        id: &str,
        text: &str,
        per_chunk: Vec<ChunkCodes>,
        describe: &CodeDescriber<'_>,
        started: Instant,
    ) -> NotePrediction {
        if per_chunk.len() > 1 {
            tracing::info!(
                note = id,
                chunks = per_chunk.len(),
                max_prompt_tokens = self.max_prompt_tokens,
                "note over the prompt limit: coded in chunks"
            );
        }
        let mut prediction = NotePrediction {
            id: id.to_string(),
            diagnoses: Vec::new(),
            procedures: Vec::new(),
            warnings: Vec::new(),
            engine: "llm".into(),
            model: self.name.clone(),
            elapsed_ms: 0.0,
            code_sets: None,
        };
        let analyzer = Analyzer::default();
        let words = analyzer.stemmed_words(text);
        let sentences = NoteSentences::new(text, &words);
        for scored in per_chunk.into_iter().flatten() {
            let ScoredCode {
                code,
                kind,
                confidence,
            } = scored;
            let list = match kind {
                CodeKind::Diagnosis => &mut prediction.diagnoses,
                CodeKind::Procedure => &mut prediction.procedures,
            };
            if let Some(seen) = list.iter_mut().find(|c| c.code == code) {
                seen.confidence = seen.confidence.max(confidence);
                continue;
            }
            let described = describe(&code, kind);
            let found = described.as_ref().and_then(|(description, _)| {
                best_sentence(&analyzer, description, &sentences, |_| 1.0)
            });
            let (evidence, assertion) = match found {
                Some((span, assertion)) => (vec![span], Some(assertion)),
                None => (Vec::new(), None),
            };
            list.push(CodedItem {
                rank: list.len() + 1,
                confidence,
                assigned: true,
                description: described.as_ref().map(|(d, _)| d.clone()),
                billable: described.map(|(_, b)| b),
                evidence,
                assertion,
                code,
            });
        }
        prediction.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        prediction
    }

    fn prompt_ids(&self, id: &str, note: &str) -> Result<Vec<u32>, CodingError> {
        let model_err = |e: &dyn std::fmt::Display| CodingError::Invalid(format!("note {id}: {e}"));
        let prompt = coding_prompt_text(&self.model.tokenizer, &self.template, note)
            .map_err(|e| model_err(&e))?;
        self.model
            .tokenizer
            .encode(&prompt)
            .map_err(|e| model_err(&e))
    }

    /// The note cut where its prompts fit `max_prompt_tokens`: whole sentences while they fit,
    /// a sentence longer than a chunk at word boundaries. One chunk when the note fits.
    pub fn chunks(&self, id: &str, text: &str) -> Result<Vec<NoteChunk>, CodingError> {
        if self.prompt_ids(id, text)?.len() <= self.max_prompt_tokens {
            return Ok(vec![NoteChunk {
                start: 0,
                text: text.to_string(),
            }]);
        }
        let overhead = self.prompt_ids(id, "")?.len();
        // Two tokens of slack: a piece may tokenize a little differently inside the prompt.
        let budget = self.max_prompt_tokens.saturating_sub(overhead + 2);
        if budget < MIN_CHUNK_TOKENS {
            return Err(CodingError::Invalid(format!(
                "max_prompt_tokens {} leaves no room for a note: the prompt around it takes {overhead} tokens",
                self.max_prompt_tokens
            )));
        }
        let chars: Vec<char> = text.chars().collect();
        let slice = |start: usize, end: usize| chars[start..end].iter().collect::<String>();
        let cost = |start: usize, end: usize| -> Result<usize, CodingError> {
            let ids = self.model.tokenizer.encode(&slice(start, end));
            Ok(ids
                .map_err(|e| CodingError::Invalid(format!("note {id}: {e}")))?
                .len())
        };
        // The units chunks are made of, each with its token count.
        let mut units: Vec<(usize, usize, usize)> = Vec::new();
        for sentence in sentences(text) {
            let tokens = cost(sentence.start, sentence.end)?;
            if tokens <= budget {
                units.push((sentence.start, sentence.end, tokens));
                continue;
            }
            for (start, end) in word_pieces(&chars, sentence.start, sentence.end) {
                let tokens = cost(start, end)?;
                if tokens <= budget {
                    units.push((start, end, tokens));
                } else {
                    // One "word" longer than a chunk (a pasted blob): cut by characters.
                    let step = (budget / 4).max(1);
                    for at in (start..end).step_by(step) {
                        let to = (at + step).min(end);
                        units.push((at, to, cost(at, to)?));
                    }
                }
            }
        }
        let mut chunks = Vec::new();
        let mut i = 0;
        while i < units.len() {
            let (start, _, first) = units[i];
            let (mut last, mut estimate) = (i, first);
            while last + 1 < units.len() && estimate + units[last + 1].2 < budget {
                last += 1;
                estimate += units[last].2 + 1;
            }
            // Joined pieces may tokenize longer than their sum: check the real prompt.
            while last > i
                && self.prompt_ids(id, &slice(start, units[last].1))?.len() > self.max_prompt_tokens
            {
                last -= 1;
            }
            chunks.push(NoteChunk {
                start,
                text: slice(start, units[last].1),
            });
            i = last + 1;
        }
        Ok(chunks)
    }

    /// A chunk's generation request (greedy, the model's stop tokens) and its constrained
    /// decoding.
    pub(crate) fn request(
        &self,
        id: &str,
        note: &str,
    ) -> Result<(GenerateRequest, Box<dyn LogitsProcessor>), CodingError> {
        let mut prompt_ids = self.prompt_ids(id, note)?;
        if prompt_ids.len() > self.max_prompt_tokens {
            // Only a single piece that tokenizes past its estimate gets here.
            tracing::warn!(
                note = id,
                prompt_tokens = prompt_ids.len(),
                kept = self.max_prompt_tokens,
                "chunk prompt over the limit: its head and tail are kept"
            );
            let head = self.max_prompt_tokens / 2;
            let tail = self.max_prompt_tokens - head;
            let cut = prompt_ids.len() - tail;
            prompt_ids.drain(head..cut);
        }
        let mut stop = StopConditions::new(self.max_new_tokens);
        for &token in &self.model.stop_token_ids {
            stop = stop.with_stop_token(token);
        }
        let processor: Box<dyn LogitsProcessor> = Box::new(ConstrainedCodes::new(
            self.grammar.clone(),
            self.token_texts.clone(),
            self.model.stop_token_ids.clone(),
        ));
        let request = GenerateRequest {
            prompt_ids,
            sampling: SamplingParams::greedy(),
            stop,
        };
        Ok((request, processor))
    }

    /// The codes of a generation with their confidences, read from its tokens' texts as the
    /// constrained decoder read them; one cut by the token limit may end inside a code: the
    /// whole ones are kept.
    pub(crate) fn scored(&self, generation: &Generation) -> ChunkCodes {
        scored_codes(
            &self.grammar,
            &self.token_texts,
            &self.model.stop_token_ids,
            generation,
        )
    }

    /// The codes the model writes for one prompt's worth of note, in order.
    fn generate_codes(
        &self,
        id: &str,
        note: &str,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<ChunkCodes, CodingError> {
        if cancelled() {
            return Err(CodingError::Cancelled(id.to_string()));
        }
        let (request, processor) = self.request(id, note)?;
        let generation =
            medcoder_infer::generate(&self.model, request, vec![processor], |_| !cancelled())
                .map_err(|e| CodingError::Invalid(format!("note {id}: {e}")))?;
        if cancelled() {
            return Err(CodingError::Cancelled(id.to_string()));
        }
        Ok(self.scored(&generation))
    }
}

/// `[start, end)` of `chars` cut before each word after the first: pieces that end at a word.
fn word_pieces(chars: &[char], start: usize, end: usize) -> Vec<(usize, usize)> {
    let text: String = chars[start..end].iter().collect();
    let mut pieces = Vec::new();
    let mut from = start;
    for word in words(&text) {
        let word_end = start + word.end;
        if word_end > from {
            pieces.push((from, word_end));
            from = word_end;
        }
    }
    if from < end {
        pieces.push((from, end));
    }
    pieces
}

#[cfg(test)]
#[path = "../../train/tests/support/tiny_model.rs"]
mod tiny_model;
#[cfg(test)]
#[path = "../../train/tests/support/tokenizer.rs"]
mod tokenizer_fixture;

#[cfg(test)]
mod tests {
    use super::*;
    use medcoder_assets::ResolvedModel;

    const CODES: [(&str, CodeKind); 4] = [
        ("E11.9", CodeKind::Diagnosis),
        ("I10", CodeKind::Diagnosis),
        ("J18.9", CodeKind::Diagnosis),
        ("0SR9019", CodeKind::Procedure),
    ];

    /// A note of many sentences and paragraphs, far longer than the tiny prompt limit.
    fn long_note() -> String {
        let sentences = [
            "The patient has type 2 diabetes mellitus with polyuria.",
            "Blood pressure was high on every visit.",
            "A chest radiograph showed consolidation of the right lower lobe.",
            "She had a right hip replacement after a fall.",
        ];
        let mut note = String::new();
        for paragraph in 0..4 {
            for (i, sentence) in sentences.iter().enumerate() {
                note += sentence;
                note += if i % 2 == 0 { " " } else { "\n" };
            }
            note += if paragraph % 2 == 0 { "\n\n" } else { "" };
        }
        note
    }

    fn engine(dir: &std::path::Path, max_prompt_tokens: usize) -> LlmEngine {
        let codes: Vec<String> = CODES.iter().map(|(c, _)| c.to_string()).collect();
        let corpus = vec![
            "Predict the medical codes for the following text: ".to_string(),
            long_note(),
            codes.join(", "),
        ];
        tokenizer_fixture::write_chatml_tokenizer(dir, &corpus);
        let tokenizer = medcoder_models::ModelTokenizer::from_dir(dir).unwrap();
        tiny_model::write_tiny_llama(dir, tokenizer.vocab_size(), 11);
        let resolved = ResolvedModel {
            dir: dir.to_path_buf(),
            file: None,
        };
        let loaded =
            medcoder_models::load_model(&resolved, &candle_core::Device::Cpu, None).unwrap();
        let allowed: Vec<(String, CodeKind)> =
            CODES.iter().map(|(c, k)| (c.to_string(), *k)).collect();
        LlmEngine::new(
            loaded,
            PromptTemplate::default(),
            &allowed,
            max_prompt_tokens,
            "tiny".into(),
        )
        .unwrap()
    }

    /// The same codes, ranks, evidence; confidences within rounding (a batch's shape may
    /// change the order of the matmuls' sums).
    fn assert_same_codes(batched: &NotePrediction, one: &NotePrediction) {
        let same = |a: &[CodedItem], b: &[CodedItem]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    let close = (x.confidence - y.confidence).abs() < 1e-4;
                    close
                        && CodedItem {
                            confidence: 0.0,
                            ..x.clone()
                        } == CodedItem {
                            confidence: 0.0,
                            ..y.clone()
                        }
                })
        };
        assert_eq!(batched.id, one.id);
        assert!(
            same(&batched.diagnoses, &one.diagnoses),
            "note {}: {batched:?} vs {one:?}",
            one.id
        );
        assert!(
            same(&batched.procedures, &one.procedures),
            "note {}: {batched:?} vs {one:?}",
            one.id
        );
    }

    /// Notes joining a continuous batch at different steps (one of them in several chunks)
    /// get the codes they get alone; a cancelled note stops and says so.
    #[test]
    fn notes_joining_a_running_batch_get_the_codes_they_get_alone() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), 64);
        let no_description = |_: &str, _: CodeKind| None;
        let long = long_note();
        let notes: Vec<(&str, &str)> = vec![
            ("long", long.as_str()),
            ("a", "Fever and cough."),
            ("c", "Type 2 diabetes."),
            ("d", "Fracture of the femur after a fall."),
        ];
        assert!(engine.chunks("long", &long).unwrap().len() > 1);
        let alone: Vec<NotePrediction> = notes
            .iter()
            .map(|(id, text)| engine.predict(id, text, &no_description).unwrap())
            .collect();
        let mut batch = engine.continuous::<usize>(3);
        let mut answers: Vec<Option<NotePrediction>> = vec![None; notes.len()];
        let mut admitted = 0;
        let mut most_in_flight = 0;
        for step in 0..10_000 {
            // One more note every other step.
            if step % 2 == 0 && admitted < notes.len() && batch.has_room() {
                let (id, text) = notes[admitted];
                batch.admit(id, text, admitted).unwrap();
                admitted += 1;
            }
            most_in_flight = most_in_flight.max(batch.notes());
            for (i, result) in batch.step(&no_description, |_| false) {
                answers[i] = Some(result.unwrap());
            }
            if admitted == notes.len() && batch.is_idle() {
                break;
            }
        }
        for (one, answer) in alone.iter().zip(&answers) {
            assert_same_codes(answer.as_ref().expect("every note answered"), one);
        }
        assert!(most_in_flight > 1, "no note joined a running batch");
        let mut batch = engine.continuous::<&str>(3);
        batch.admit("a", notes[1].1, "a").unwrap();
        batch.admit("c", notes[2].1, "c").unwrap();
        let mut cancelled = Vec::new();
        while !batch.is_idle() {
            for (tag, result) in batch.step(&no_description, |tag| *tag == "c") {
                cancelled.push((tag, matches!(result, Err(CodingError::Cancelled(_)))));
            }
        }
        cancelled.sort();
        assert_eq!(cancelled, vec![("a", false), ("c", true)]);
    }

    #[test]
    fn written_codes_get_the_sentence_matching_their_description_as_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), 64);
        // Every code is described as the femur fracture: its evidence is that sentence,
        // quoted exactly at its offsets, wherever the tiny model's codes came from.
        let describe =
            |_: &str, _: CodeKind| Some(("Fracture of shaft of femur".to_string(), true));
        let note = "Fever and cough since Monday. No fracture of the femur was seen.";
        let p = engine.predict("n", note, &describe).unwrap();
        let items: Vec<&CodedItem> = p.diagnoses.iter().chain(&p.procedures).collect();
        assert!(
            !items.is_empty(),
            "the tiny model wrote no code: nothing checked"
        );
        for item in items {
            let evidence = &item.evidence[0];
            let quoted: String = note
                .chars()
                .skip(evidence.start)
                .take(evidence.end - evidence.start)
                .collect();
            assert_eq!(quoted, evidence.text);
            assert_eq!(quoted, "No fracture of the femur was seen.");
            assert_eq!(item.assertion, Some(crate::assertion::Assertion::Negated));
        }
    }

    #[test]
    fn a_cancelled_note_stops_with_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), 64);
        let no_description = |_: &str, _: CodeKind| None;
        let checks = std::sync::atomic::AtomicUsize::new(0);
        // Cancelled after the first token: generation stops there.
        let cancelled = || checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1;
        let result =
            engine.predict_unless_cancelled("n", &long_note(), &no_description, &cancelled);
        assert!(
            matches!(result, Err(CodingError::Cancelled(ref id)) if id == "n"),
            "{result:?}"
        );
        assert!(checks.load(std::sync::atomic::Ordering::Relaxed) <= 4);
        engine
            .predict("n", "Fever and cough.", &no_description)
            .expect("not cancelled");
    }

    #[test]
    fn a_long_note_is_coded_in_chunks_that_fit_and_cover_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), 64);
        let note = long_note();
        let chunks = engine.chunks("n", &note).unwrap();
        assert!(chunks.len() >= 2, "{} chunk(s)", chunks.len());
        let chars: Vec<char> = note.chars().collect();
        let mut covered = 0;
        for chunk in &chunks {
            assert!(engine.prompt_ids("n", &chunk.text).unwrap().len() <= 64);
            // Each chunk is the note's text where it says, cut at a sentence end.
            let len = chunk.text.chars().count();
            let at: String = chars[chunk.start..chunk.start + len].iter().collect();
            assert_eq!(at, chunk.text);
            assert!(chunk.text.ends_with('.'), "{:?}", chunk.text);
            assert!(chunk.start >= covered, "chunks in order, not overlapping");
            let gap: String = chars[covered..chunk.start].iter().collect();
            assert!(
                gap.trim().is_empty(),
                "nothing of the note skipped: {gap:?}"
            );
            covered = chunk.start + len;
        }
        assert!(chars[covered..].iter().all(|c| c.is_whitespace()));
        // Coded whole: the chunks' codes merged, each once, ranked in order of appearance.
        let p = engine.predict("n", &note, &|_, _| None).unwrap();
        for (i, item) in p.diagnoses.iter().enumerate() {
            assert_eq!(item.rank, i + 1);
            assert!(CODES.iter().any(|(c, _)| *c == item.code), "{}", item.code);
        }
        let mut expected: Vec<String> = Vec::new();
        let mut best = std::collections::HashMap::new();
        for chunk in &chunks {
            for scored in engine.generate_codes("n", &chunk.text, &|| false).unwrap() {
                let confidence = best.entry(scored.code.clone()).or_insert(0.0f32);
                *confidence = confidence.max(scored.confidence);
                if !expected.contains(&scored.code) {
                    expected.push(scored.code);
                }
            }
        }
        // Each code with the highest confidence any chunk gave it.
        for item in p.diagnoses.iter().chain(&p.procedures) {
            assert_eq!(item.confidence, best[&item.code], "{}", item.code);
        }
        let coded: Vec<String> = p
            .diagnoses
            .iter()
            .chain(&p.procedures)
            .map(|c| c.code.clone())
            .collect();
        let mut in_kind_order = expected.clone();
        in_kind_order.sort_by_key(|c| CODES.iter().find(|(x, _)| x == c).map(|(_, k)| *k));
        assert_eq!(coded, in_kind_order, "the chunks' codes: {expected:?}");
        // A note that fits is one chunk; a limit that leaves no room for a note is refused.
        assert_eq!(engine.chunks("n", "Type 2 diabetes.").unwrap().len(), 1);
        let tight = super::LlmEngine {
            max_prompt_tokens: 20,
            ..engine
        };
        let error = tight.chunks("n", &note).unwrap_err().to_string();
        assert!(error.contains("no room"), "{error}");
    }

    /// The codes of an answer's text, as the engine read them before it read them from tokens.
    fn parse_text(grammar: &AnswerGrammar, text: &str) -> Vec<(String, CodeKind)> {
        grammar
            .parse(text)
            .unwrap_or_else(|| grammar.parse_prefix(text))
    }

    /// On a real model the codes get the probability it gave them: in (0, 1], not all 1 (the
    /// placeholder this replaced), and the codes read from the tokens are those of the text.
    /// Needs the asset (`medcoder assets fetch smollm2-135m-instruct`); says so when it skips.
    #[test]
    fn codes_of_a_real_model_get_its_probabilities() {
        let alias = "smollm2-135m-instruct";
        let home = medcoder_assets::MedcoderHome::from_env().unwrap();
        let reference: medcoder_assets::ModelRef = alias.parse().unwrap();
        let resolved = match reference.resolve(&home) {
            Ok(resolved) => resolved,
            Err(e) => {
                eprintln!(
                    "skipping: {alias} is not installed ({e}); run `medcoder assets fetch {alias}`"
                );
                return;
            }
        };
        let loaded =
            medcoder_models::load_model(&resolved, &candle_core::Device::Cpu, None).unwrap();
        let allowed: Vec<(String, CodeKind)> = [
            "E11.9", "E11.65", "I10", "I21.9", "J18.9", "J44.1", "N39.0", "R50.9", "R05.9",
            "S72.001A", "0SR9019",
        ]
        .iter()
        .map(|c| {
            (
                c.to_string(),
                if c.len() == 7 && !c.contains('.') {
                    CodeKind::Procedure
                } else {
                    CodeKind::Diagnosis
                },
            )
        })
        .collect();
        let engine = LlmEngine::new(
            loaded,
            PromptTemplate::default(),
            &allowed,
            512,
            alias.into(),
        )
        .unwrap();
        // The untrained model loops on one code: a few codes' worth of tokens say enough.
        let engine = LlmEngine {
            max_new_tokens: 40,
            ..engine
        };
        let notes = [
            "Patient with type 2 diabetes mellitus and essential hypertension.",
            "Fever and productive cough; chest x-ray shows right lower lobe pneumonia.",
        ];
        let mut confidences = Vec::new();
        for note in notes {
            let (request, processor) = engine.request("n", note).unwrap();
            let generation =
                medcoder_infer::generate(&engine.model, request, vec![processor], |_| true)
                    .unwrap();
            let scored = engine.scored(&generation);
            let mut from_text: Vec<String> = Vec::new();
            for (code, _) in parse_text(&engine.grammar, &generation.text) {
                if !from_text.contains(&code) {
                    from_text.push(code);
                }
            }
            let from_tokens: Vec<String> = scored.iter().map(|s| s.code.clone()).collect();
            assert_eq!(from_tokens, from_text, "{note}: {:?}", generation.text);
            for s in &scored {
                assert!(s.confidence > 0.0 && s.confidence <= 1.0, "{s:?}");
                confidences.push(s.confidence);
            }
            eprintln!("{note:?} → {:?}: {scored:?}", generation.text);
        }
        let p = engine.predict("n", notes[0], &|_, _| None).unwrap();
        assert!(p
            .diagnoses
            .iter()
            .chain(&p.procedures)
            .all(|item| item.confidence > 0.0 && item.confidence <= 1.0));
        assert!(!confidences.is_empty(), "the model wrote no code");
        assert!(confidences.iter().any(|c| *c < 1.0), "{confidences:?}");
    }

    #[test]
    fn a_sentence_longer_than_a_chunk_is_cut_between_words() {
        let chars: Vec<char> = "one two, three".chars().collect();
        assert_eq!(
            word_pieces(&chars, 0, chars.len()),
            [(0, 3), (3, 7), (7, 14)]
        );
        assert_eq!(word_pieces(&chars, 4, chars.len()), [(4, 7), (7, 14)]);
    }
}
