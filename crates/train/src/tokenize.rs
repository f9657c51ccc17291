//! `medcoder prepare tokens`: examples of a dataset into token ids for one model, prompt and
//! completion tokenized apart so the loss can cover the completion only. Notes longer than the
//! limit follow an explicit strategy, never a silent cut, and the report says how many did.

use medcoder_models::{ChatMessage, ModelTokenizer};
use medcoder_store::{CodingExample, DatasetKind, Store, TokenRow};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{PromptTemplate, TrainError};

/// What to do with an example longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// Leave the example out.
    Drop,
    /// Keep the beginning of the note.
    Head,
    /// Keep the beginning and the end of the note (where discharge diagnoses are listed).
    HeadTail,
    /// Cut the note into consecutive chunks, each with the whole code list.
    Chunk,
}

impl Truncation {
    fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Head => "head",
            Self::HeadTail => "head-tail",
            Self::Chunk => "chunk",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizeOptions {
    pub dataset: String,
    /// The model reference the tokens are for (as the user named it).
    pub model: String,
    pub max_len: usize,
    pub truncation: Truncation,
    pub template: PromptTemplate,
    /// Tokenize ICD-9-coded documents too (kept apart by default).
    pub include_icd9: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LengthStats {
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
    pub mean: f64,
}

impl LengthStats {
    fn of(mut lengths: Vec<usize>) -> Self {
        if lengths.is_empty() {
            return Self::default();
        }
        lengths.sort_unstable();
        let at = |q: f64| lengths[((lengths.len() - 1) as f64 * q).round() as usize];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: *lengths.last().unwrap_or(&0),
            mean: lengths.iter().sum::<usize>() as f64 / lengths.len() as f64,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TokenizeReport {
    pub dataset: String,
    pub model: String,
    pub chat_template: bool,
    pub examples: u64,
    pub rows_written: u64,
    /// Examples longer than `max_len` before truncation.
    pub over_limit: u64,
    pub truncation: String,
    pub dropped: u64,
    /// Prompt + completion tokens of each example before truncation.
    pub lengths: LengthStats,
}

struct Outcome {
    rows: Vec<TokenRow>,
    full_len: usize,
    over_limit: bool,
}

/// The prompt through the model's chat template (ending where the answer begins), or the
/// bare user text on a line of its own when the model has none.
fn prompt_text(tokenizer: &ModelTokenizer, messages: &[ChatMessage]) -> Result<String, TrainError> {
    match &tokenizer.chat_template {
        Some(template) => Ok(template.render(
            messages,
            true,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?),
        None => {
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            Ok(format!("{}\n", text.join("\n\n")))
        }
    }
}

fn coding_messages(template: &PromptTemplate, note: &str) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if let Some(system) = &template.system {
        messages.push(ChatMessage::new("system", system.clone()));
    }
    messages.push(ChatMessage::new("user", template.user_text(note)));
    messages
}

/// The text a coding model is prompted with for `note`, exactly as training builds it.
pub fn coding_prompt_text(
    tokenizer: &ModelTokenizer,
    template: &PromptTemplate,
    note: &str,
) -> Result<String, TrainError> {
    prompt_text(tokenizer, &coding_messages(template, note))
}

struct Encoder<'a> {
    tokenizer: &'a ModelTokenizer,
    options: &'a TokenizeOptions,
}

impl Encoder<'_> {
    fn prompt_text(&self, messages: &[ChatMessage]) -> Result<String, TrainError> {
        prompt_text(self.tokenizer, messages)
    }

    fn completion_ids(&self, answer: &str) -> Result<Vec<u32>, TrainError> {
        let mut text = answer.to_string();
        if let Some(eos) = &self.tokenizer.eos_token {
            text.push_str(eos);
        }
        Ok(self.tokenizer.encode(&text)?)
    }

    fn coding_messages(&self, note: &str) -> Vec<ChatMessage> {
        coding_messages(&self.options.template, note)
    }

    fn row(
        &self,
        ex: &CodingExample,
        chunk: u32,
        prompt: Vec<u32>,
        completion: &[u32],
        truncation: Option<Truncation>,
    ) -> TokenRow {
        let prompt_len = prompt.len() as u32;
        let mut ids = prompt;
        ids.extend_from_slice(completion);
        TokenRow {
            doc_id: ex.doc_id.clone(),
            chunk,
            split: ex.split.clone(),
            ids,
            prompt_len,
            truncation: truncation.map(|t| t.name().to_string()),
        }
    }

    fn encode_coding(&self, ex: &CodingExample) -> Result<Outcome, TrainError> {
        let max_len = self.options.max_len;
        let answer = self
            .options
            .template
            .completion_text(&ex.diagnoses, &ex.procedures);
        let completion = self.completion_ids(&answer)?;
        let prompt = self
            .tokenizer
            .encode(&self.prompt_text(&self.coding_messages(&ex.text))?)?;
        let full_len = prompt.len() + completion.len();
        if full_len <= max_len {
            return Ok(Outcome {
                rows: vec![self.row(ex, 0, prompt, &completion, None)],
                full_len,
                over_limit: false,
            });
        }
        let strategy = self.options.truncation;
        if strategy == Truncation::Drop {
            return Ok(Outcome {
                rows: Vec::new(),
                full_len,
                over_limit: true,
            });
        }
        let note_ids = self.tokenizer.encode(&ex.text)?;
        let overhead = prompt.len().saturating_sub(note_ids.len());
        let example_error = |message: String| TrainError::Example {
            doc_id: ex.doc_id.clone(),
            message,
        };
        let mut budget = max_len
            .checked_sub(overhead + completion.len() + 4)
            .filter(|b| *b > 0)
            .ok_or_else(|| example_error(format!(
                "the prompt template and the {} completion tokens leave no room for the note in {max_len} tokens",
                completion.len()
            )))?;
        // Token boundaries may shift when the cut text is tokenized again: shrink until it fits.
        for _ in 0..4 {
            let pieces: Vec<String> = match strategy {
                Truncation::Head => vec![self
                    .tokenizer
                    .decode(&note_ids[..budget.min(note_ids.len())])?],
                Truncation::HeadTail => {
                    let head = budget / 2;
                    let tail = budget - head;
                    let start = note_ids.len().saturating_sub(tail).max(head);
                    vec![format!(
                        "{}\n…\n{}",
                        self.tokenizer
                            .decode(&note_ids[..head.min(note_ids.len())])?,
                        self.tokenizer.decode(&note_ids[start..])?
                    )]
                }
                Truncation::Chunk => note_ids
                    .chunks(budget)
                    .map(|c| self.tokenizer.decode(c))
                    .collect::<Result<_, _>>()?,
                Truncation::Drop => unreachable!("handled above"),
            };
            let prompts = pieces
                .iter()
                .map(|piece| {
                    Ok(self
                        .tokenizer
                        .encode(&self.prompt_text(&self.coding_messages(piece))?)?)
                })
                .collect::<Result<Vec<Vec<u32>>, TrainError>>()?;
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + completion.len();
            if longest <= max_len {
                let rows = prompts
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| self.row(ex, i as u32, p, &completion, Some(strategy)))
                    .collect();
                return Ok(Outcome {
                    rows,
                    full_len,
                    over_limit: true,
                });
            }
            budget = budget.saturating_sub(longest - max_len + 2).max(1);
        }
        Err(example_error(format!(
            "could not fit the note into {max_len} tokens"
        )))
    }

    fn encode_conversation(
        &self,
        example_id: &str,
        split: Option<String>,
        messages_json: &str,
    ) -> Result<Outcome, TrainError> {
        let example_error = |message: String| TrainError::Example {
            doc_id: example_id.to_string(),
            message,
        };
        let messages: Vec<ChatMessage> = serde_json::from_str(messages_json)
            .map_err(|e| example_error(format!("stored conversation: {e}")))?;
        let (answer, context) = messages
            .split_last()
            .ok_or_else(|| example_error("empty conversation".into()))?;
        let completion = self.completion_ids(&answer.content)?;
        let mut prompt = self.tokenizer.encode(&self.prompt_text(context)?)?;
        let full_len = prompt.len() + completion.len();
        let over_limit = full_len > self.options.max_len;
        let mut truncation = None;
        if over_limit {
            // A conversation has no note to cut: keep its beginning, or leave it out.
            if self.options.truncation == Truncation::Drop
                || completion.len() >= self.options.max_len
            {
                return Ok(Outcome {
                    rows: Vec::new(),
                    full_len,
                    over_limit,
                });
            }
            prompt.truncate(self.options.max_len - completion.len());
            truncation = Some(Truncation::Head.name().to_string());
        }
        let prompt_len = prompt.len() as u32;
        prompt.extend_from_slice(&completion);
        Ok(Outcome {
            rows: vec![TokenRow {
                doc_id: example_id.to_string(),
                chunk: 0,
                split,
                ids: prompt,
                prompt_len,
                truncation,
            }],
            full_len,
            over_limit,
        })
    }
}

/// Tokenize every example of a dataset for one model and store the ids (replacing earlier ones
/// for the same dataset and model) with the options recorded beside them.
pub fn tokenize_dataset(
    store: &Store,
    tokenizer: &ModelTokenizer,
    options: &TokenizeOptions,
) -> Result<TokenizeReport, TrainError> {
    let dataset = store.dataset(&options.dataset)?;
    let encoder = Encoder { tokenizer, options };
    let config = serde_json::to_string(options).map_err(|e| TrainError::Config {
        path: "options".into(),
        message: e.to_string(),
    })?;
    let mut report = TokenizeReport {
        dataset: options.dataset.clone(),
        model: options.model.clone(),
        chat_template: tokenizer.chat_template.is_some(),
        truncation: options.truncation.name().to_string(),
        ..TokenizeReport::default()
    };
    let mut lengths = Vec::new();
    let mut failure: Option<TrainError> = None;
    let written = store.replace_tokens(&options.dataset, &options.model, &config, |sink| {
        let mut consume =
            |outcomes: Vec<Result<Outcome, TrainError>>| -> Result<(), medcoder_store::StoreError> {
                for outcome in outcomes {
                    let outcome = match outcome {
                        Ok(o) => o,
                        Err(e) => {
                            let message = e.to_string();
                            failure = Some(e);
                            return Err(medcoder_store::StoreError::Invalid(message));
                        }
                    };
                    report.examples += 1;
                    report.over_limit += u64::from(outcome.over_limit);
                    report.dropped += u64::from(outcome.rows.is_empty());
                    lengths.push(outcome.full_len);
                    for row in &outcome.rows {
                        sink(row)?;
                    }
                }
                Ok(())
            };
        if dataset.kind == DatasetKind::Instructions {
            let examples = store.conversation_examples(&options.dataset)?;
            let outcomes = examples
                .par_iter()
                .map(|e| {
                    encoder.encode_conversation(&e.example_id, e.split.clone(), &e.messages_json)
                })
                .collect();
            consume(outcomes)
        } else {
            store.for_each_coding_batch(&options.dataset, options.include_icd9, 1024, |batch| {
                consume(
                    batch
                        .par_iter()
                        .map(|ex| encoder.encode_coding(ex))
                        .collect(),
                )
            })
        }
    });
    if let Some(error) = failure {
        return Err(error);
    }
    report.rows_written = written?;
    report.lengths = LengthStats::of(lengths);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_percentiles() {
        let stats = LengthStats::of((1..=100).collect());
        assert_eq!((stats.p50, stats.p90, stats.max), (51, 90, 100));
        assert_eq!(LengthStats::of(Vec::new()).max, 0);
    }
}
