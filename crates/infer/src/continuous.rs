//! Continuous batching: sequences join a running batch between two decode steps and leave it
//! as soon as they finish, instead of waiting for a whole batch to start and end together.
//!
//! The batch keeps one left-padded KV cache (rows × positions). A joining sequence is
//! prefilled alone (exactly what it gets alone), then its cache is padded to the batch's
//! length, or the batch's to its length, and appended as a row; a finished row is dropped and
//! the padding every remaining row has is cut off. Positions are per row (position minus
//! padding) and the mask hides each row's padding, so every sequence is decoded as it would
//! be alone.

use std::time::Instant;

use candle_core::{DType, Tensor};
use medcoder_models::{ForwardOptions, KvCache, LoadedModel};

use crate::error::Result;
use crate::generate::{GenerateRequest, Generation, Sequence};
use crate::processors::LogitsProcessor;
use crate::InferError;

struct Row<T> {
    tag: T,
    sequence: Sequence,
    /// The token sampled last, the row's input to the next step.
    pending: u32,
    prefill_seconds: f64,
    decoding: Instant,
}

/// What became of a sequence that asked to join.
pub enum Joined<T> {
    /// In the batch: it goes on at the next [`ContinuousBatch::step`].
    Running,
    /// Done with its first token (a stop token, `max_tokens` 1, or cancelled).
    Finished(T, Generation),
    Failed(T, InferError),
}

impl<T> std::fmt::Debug for Joined<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Running => f.write_str("Running"),
            Self::Finished(_, generation) => f.debug_tuple("Finished").field(generation).finish(),
            Self::Failed(_, error) => f.debug_tuple("Failed").field(error).finish(),
        }
    }
}

impl<T> std::fmt::Debug for ContinuousBatch<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContinuousBatch")
            .field("rows", &self.rows.len())
            .field("padding", &self.padding)
            .field("positions", &self.cache.len())
            .finish()
    }
}

/// Sequences that finished in a step, with their tags.
pub type Finished<T> = Vec<(T, Generation)>;

/// A step that failed: the error, and the tags of the rows it took down.
#[derive(Debug)]
pub struct BatchFailure<T> {
    pub error: InferError,
    pub abandoned: Vec<T>,
}

/// A batch of sequences decoded together, each tagged with the caller's `T` (its reply
/// channel, say).
pub struct ContinuousBatch<'m, T> {
    model: &'m LoadedModel,
    cache: KvCache,
    /// Left padding of each row of the cache.
    padding: Vec<usize>,
    rows: Vec<Row<T>>,
}

impl<'m, T> ContinuousBatch<'m, T> {
    pub fn new(model: &'m LoadedModel) -> Self {
        Self {
            model,
            cache: model.lm.new_cache(),
            padding: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Positions the batch's cache holds (the longest row's, padding included).
    pub fn positions(&self) -> usize {
        self.cache.len()
    }

    /// Prefills `request` alone and samples its first token (`on_text` gets the text it
    /// releases and returns false to cancel), then adds it to the batch.
    pub fn join(
        &mut self,
        request: GenerateRequest,
        processors: Vec<Box<dyn LogitsProcessor>>,
        tag: T,
        mut on_text: impl FnMut(&T, &str) -> bool,
    ) -> Joined<T> {
        let started = Instant::now();
        let prompt = request.prompt_ids.clone();
        let mut sequence = match Sequence::new(request, processors) {
            Ok(sequence) => sequence,
            Err(error) => return Joined::Failed(tag, error),
        };
        let mut cache = self.model.lm.new_cache();
        let first = self
            .model
            .lm
            .next_token_logits(&prompt, &mut cache)
            .and_then(|logits| logits.to_vec1::<f32>())
            .map_err(InferError::from)
            .and_then(|mut logits| sequence.step(self.model, &mut logits));
        let prefill_seconds = started.elapsed().as_secs_f64();
        let decoding = Instant::now();
        let (id, text, finished) = match first {
            Ok(step) => step,
            Err(error) => return Joined::Failed(tag, error),
        };
        let keep = on_text(&tag, &text);
        if !keep {
            sequence.checker.cancel();
        }
        if finished || !keep {
            let generation = sequence.finish(prefill_seconds, 0.0);
            return Joined::Finished(tag, generation);
        }
        if let Err(error) = self.add_row(cache) {
            return Joined::Failed(tag, error);
        }
        self.rows.push(Row {
            tag,
            sequence,
            pending: id,
            prefill_seconds,
            decoding,
        });
        Joined::Running
    }

    /// Appends a sequence's own cache as a row, padding it or the batch to the same length.
    fn add_row(&mut self, cache: KvCache) -> Result<()> {
        let (batch_len, row_len) = (self.cache.len(), cache.len());
        if self.rows.is_empty() {
            self.cache = cache;
            self.padding = vec![0];
            return Ok(());
        }
        if row_len > batch_len {
            let grow = row_len - batch_len;
            self.cache = self.cache.pad_left(grow)?;
            for pad in &mut self.padding {
                *pad += grow;
            }
        }
        let pad = self.cache.len() - row_len;
        self.cache = self.cache.append_rows(&cache.pad_left(pad)?)?;
        self.padding.push(pad);
        Ok(())
    }

    /// One decode step for every row: `on_text` gets each row's new text (often empty) and
    /// returns false to cancel the row. Rows that finished leave the batch and are returned.
    /// On an error the batch is left empty and every row is returned with it.
    pub fn step(
        &mut self,
        mut on_text: impl FnMut(&T, &str) -> bool,
    ) -> std::result::Result<Finished<T>, Box<BatchFailure<T>>> {
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let logits = match self.forward() {
            Ok(logits) => logits,
            Err(error) => return Err(self.fail(error)),
        };
        let max_positions = self.model.lm.spec().max_position_embeddings;
        let mut done = vec![false; self.rows.len()];
        let mut failure = None;
        for (i, (row, mut logits)) in self.rows.iter_mut().zip(logits).enumerate() {
            let (id, text, finished) = match row.sequence.step(self.model, &mut logits) {
                Ok(step) => step,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            row.pending = id;
            let length = self.cache.len() - self.padding[i];
            let keep = on_text(&row.tag, &text);
            if !keep {
                row.sequence.checker.cancel();
            } else if !finished && length + 1 >= max_positions {
                let rest = row.sequence.checker.cancel();
                on_text(&row.tag, &rest.text);
            }
            done[i] = finished || !keep || length + 1 >= max_positions;
        }
        if let Some(error) = failure {
            return Err(self.fail(error));
        }
        match self.remove(&done) {
            Ok(finished) => Ok(finished),
            Err(error) => Err(self.fail(error)),
        }
    }

    /// (rows, vocab) logits of the next position of every row.
    fn forward(&mut self) -> Result<Vec<Vec<f32>>> {
        let device = self.model.lm.device().clone();
        let input: Vec<u32> = self.rows.iter().map(|r| r.pending).collect();
        let input = Tensor::from_vec(input, (self.rows.len(), 1), &device)?;
        let options = ForwardOptions {
            left_padding: Some(&self.padding),
            last_only: true,
            ..ForwardOptions::default()
        };
        let logits = self
            .model
            .lm
            .forward(&input, Some(&mut self.cache), &options)?;
        // (b, 1, vocab) → one row per sequence
        Ok(logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Takes the rows marked done out of the batch and cuts the padding all others share.
    fn remove(&mut self, done: &[bool]) -> Result<Vec<(T, Generation)>> {
        if !done.contains(&true) {
            return Ok(Vec::new());
        }
        let keep: Vec<usize> = (0..done.len()).filter(|&i| !done[i]).collect();
        let mut finished = Vec::new();
        let rows = std::mem::take(&mut self.rows);
        for (row, done) in rows.into_iter().zip(done) {
            if *done {
                let decode_seconds = row.decoding.elapsed().as_secs_f64();
                let generation = row.sequence.finish(row.prefill_seconds, decode_seconds);
                finished.push((row.tag, generation));
            } else {
                self.rows.push(row);
            }
        }
        if self.rows.is_empty() {
            self.cache = self.model.lm.new_cache();
            self.padding.clear();
            return Ok(finished);
        }
        self.padding = keep.iter().map(|&i| self.padding[i]).collect();
        self.cache = self.cache.select_rows(&keep)?;
        let shared = self.padding.iter().copied().min().unwrap_or(0);
        if shared > 0 {
            self.cache = self.cache.drop_front(shared)?;
            for pad in &mut self.padding {
                *pad -= shared;
            }
        }
        Ok(finished)
    }

    fn fail(&mut self, error: InferError) -> Box<BatchFailure<T>> {
        Box::new(BatchFailure {
            error,
            abandoned: self.abandon(),
        })
    }

    /// Empties the batch, giving back the rows' tags (after an error).
    pub fn abandon(&mut self) -> Vec<T> {
        self.cache = self.model.lm.new_cache();
        self.padding.clear();
        std::mem::take(&mut self.rows)
            .into_iter()
            .map(|r| r.tag)
            .collect()
    }
}
