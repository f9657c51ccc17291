//! The `llm` engine: a local model (plus a LoRA adapter from `medcoder train`) prompted exactly
//! as in training, decoding greedily under [`ConstrainedCodes`], so that every code it writes
//! is in the allowed set. Codes come in the order the model wrote them; the engine has no
//! calibrated confidence, so each generated code is assigned with confidence 1.

use std::sync::Arc;
use std::time::Instant;

use medcoder_infer::{GenerateRequest, LogitsProcessor, SamplingParams, StopConditions};
use medcoder_models::LoadedModel;
use medcoder_train::{coding_prompt_text, PromptTemplate};

use crate::constrained::{AnswerGrammar, CodeTrie, ConstrainedCodes};
use crate::prediction::{CodeDescriber, CodeKind, CodedItem, NotePrediction};
use crate::CodingError;

#[derive(Debug)]
pub struct LlmEngine {
    model: LoadedModel,
    template: PromptTemplate,
    grammar: AnswerGrammar,
    token_texts: Arc<Vec<Option<Vec<char>>>>,
    /// Prompt tokens at most: longer prompts keep their head and tail (said in a warning).
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
        let started = Instant::now();
        let model_err = |e: &dyn std::fmt::Display| CodingError::Invalid(format!("note {id}: {e}"));
        let prompt = coding_prompt_text(&self.model.tokenizer, &self.template, text)
            .map_err(|e| model_err(&e))?;
        let mut prompt_ids = self
            .model
            .tokenizer
            .encode(&prompt)
            .map_err(|e| model_err(&e))?;
        if prompt_ids.len() > self.max_prompt_tokens {
            tracing::warn!(
                note = id,
                prompt_tokens = prompt_ids.len(),
                kept = self.max_prompt_tokens,
                "prompt over the limit: its head and tail are kept"
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
        let generation = medcoder_infer::generate(&self.model, request, vec![processor], |_| true)
            .map_err(|e| model_err(&e))?;
        // A generation cut by the token limit may end inside a code: keep the whole ones.
        let codes = self
            .grammar
            .parse(&generation.text)
            .unwrap_or_else(|| self.grammar.parse_prefix(&generation.text));
        let mut prediction = NotePrediction {
            id: id.to_string(),
            diagnoses: Vec::new(),
            procedures: Vec::new(),
            warnings: Vec::new(),
            engine: "llm".into(),
            model: self.name.clone(),
            elapsed_ms: 0.0,
        };
        for (code, kind) in codes {
            let list = match kind {
                CodeKind::Diagnosis => &mut prediction.diagnoses,
                CodeKind::Procedure => &mut prediction.procedures,
            };
            if list.iter().any(|c: &CodedItem| c.code == code) {
                continue;
            }
            let described = describe(&code, kind);
            list.push(CodedItem {
                rank: list.len() + 1,
                confidence: 1.0,
                assigned: true,
                description: described.as_ref().map(|(d, _)| d.clone()),
                billable: described.map(|(_, b)| b),
                evidence: Vec::new(),
                assertion: None,
                code,
            });
        }
        prediction.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(prediction)
    }
}
