//! Continuous batching: sequences join a running batch between two decode steps and leave it
//! as soon as they finish, instead of waiting for a whole batch to start and end together.
//!
//! The batch keeps one left-padded KV cache (rows × positions). A joining sequence is
//! prefilled alone, in pieces of [`PREFILL_CHUNK`] tokens, a piece's worth per step while other
//! rows are decoding (a long prompt does not stall them for its whole prefill; with no row
//! decoding it is prefilled at once), exactly as [`crate::generate`] prefills it. Then its
//! cache is padded to the batch's length, or the batch's to its length, and appended as a
//! row; a finished row is dropped and the padding every remaining row has is cut off.
//! Positions are per row (position minus padding) and the mask hides each row's padding, so
//! every sequence is decoded as it would be alone.

use std::collections::VecDeque;
use std::time::Instant;

use candle_core::{DType, Tensor};
use medcoder_models::{ForwardOptions, KvCache, LoadedModel};

use crate::error::Result;
use crate::generate::{prefill_next_piece, prefill_piece, GenerateRequest, Generation, Sequence};
use crate::processors::LogitsProcessor;
use crate::{InferError, PREFILL_CHUNK};

struct Row<T> {
    tag: T,
    sequence: Sequence,
    /// The token sampled last, the row's input to the next step.
    pending: u32,
    prefill_seconds: f64,
    decoding: Instant,
}

/// A sequence whose prompt is being prefilled, piece by piece, into its own cache.
struct Prefilling<T> {
    tag: T,
    sequence: Sequence,
    prompt: Vec<u32>,
    cache: KvCache,
    /// Pieces prefilled so far.
    pieces: usize,
    seconds: f64,
}

impl<T> std::fmt::Debug for ContinuousBatch<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContinuousBatch")
            .field("rows", &self.rows.len())
            .field("prefilling", &self.prefilling.len())
            .field("padding", &self.padding)
            .field("positions", &self.cache.len())
            .finish()
    }
}

/// Sequences that finished in a step, with their tags: their generation, or what failed
/// while prefilling them.
pub type Finished<T> = Vec<(T, Result<Generation>)>;

/// A decode step that failed: the error, and the tags of the rows it took down.
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
    /// Joined, not yet decoding: first come, first prefilled.
    prefilling: VecDeque<Prefilling<T>>,
    /// Prompt tokens per prefill piece, and per step while rows decode.
    prefill_chunk: usize,
}

impl<'m, T> ContinuousBatch<'m, T> {
    pub fn new(model: &'m LoadedModel) -> Self {
        Self {
            model,
            cache: model.lm.new_cache(),
            padding: Vec::new(),
            rows: Vec::new(),
            prefilling: VecDeque::new(),
            prefill_chunk: PREFILL_CHUNK,
        }
    }

    /// The same batch prefilling `tokens` per piece instead of [`PREFILL_CHUNK`]
    /// (`usize::MAX`: each prompt whole, in the step it joins; benchmarks compare the two).
    /// Sequences then get what [`crate::generate`] gives them only up to float rounding.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = tokens.max(1);
        self
    }

    /// Sequences in the batch: decoding, or being prefilled.
    pub fn len(&self) -> usize {
        self.rows.len() + self.prefilling.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.prefilling.is_empty()
    }

    /// Positions the batch's cache holds (the longest row's, padding included).
    pub fn positions(&self) -> usize {
        self.cache.len()
    }

    /// Takes `request` in: its prompt is prefilled over the next steps, then it is decoded
    /// with the others. A request that cannot be sampled as asked is given back at once.
    pub fn join(
        &mut self,
        request: GenerateRequest,
        processors: Vec<Box<dyn LogitsProcessor>>,
        tag: T,
    ) -> std::result::Result<(), Box<(T, InferError)>> {
        let prompt = request.prompt_ids.clone();
        match Sequence::new(request, processors) {
            Ok(sequence) => {
                self.prefilling.push_back(Prefilling {
                    tag,
                    sequence,
                    prompt,
                    cache: self.model.lm.new_cache(),
                    pieces: 0,
                    seconds: 0.0,
                });
                Ok(())
            }
            Err(error) => Err(Box::new((tag, error))),
        }
    }

    /// Prefill work for one step: with rows decoding, pieces of waiting prompts up to one
    /// piece's worth of tokens (one piece at least); without, the first waiting prompt whole.
    /// A prompt done gets its first token (`on_text` as in [`Self::step`], also asked before
    /// each piece whether the sequence is still wanted) and becomes a row, or is finished
    /// already.
    fn prefill(&mut self, on_text: &mut impl FnMut(&T, &str) -> bool, out: &mut Finished<T>) {
        let mut spent = 0;
        let chunk = self.prefill_chunk;
        while let Some(head) = self.prefilling.front_mut() {
            let piece = prefill_piece(&head.prompt, head.pieces, chunk).len();
            if !self.rows.is_empty() && spent > 0 && spent + piece > chunk {
                return;
            }
            if !on_text(&head.tag, "") {
                let Some(mut head) = self.prefilling.pop_front() else {
                    return;
                };
                head.sequence.checker.cancel();
                out.push((head.tag, Ok(head.sequence.finish(head.seconds, 0.0))));
                continue;
            }
            let started = Instant::now();
            let logits = prefill_next_piece(
                self.model,
                &head.prompt,
                head.pieces,
                chunk,
                &mut head.cache,
            );
            head.seconds += started.elapsed().as_secs_f64();
            head.pieces += 1;
            spent += piece;
            let logits = match logits {
                Ok(None) => continue,
                Ok(Some(logits)) => logits,
                Err(error) => {
                    if let Some(head) = self.prefilling.pop_front() {
                        out.push((head.tag, Err(error)));
                    }
                    continue;
                }
            };
            if let Some(head) = self.prefilling.pop_front() {
                if let Some(done) = self.first_token(head, logits, on_text) {
                    out.push(done);
                }
            }
        }
    }

    /// Samples a prefilled sequence's first token and adds it as a row; the sequence, if that
    /// finished it (a stop token, `max_tokens` 1, cancelled) or failed.
    fn first_token(
        &mut self,
        prefilled: Prefilling<T>,
        mut logits: Vec<f32>,
        on_text: &mut impl FnMut(&T, &str) -> bool,
    ) -> Option<(T, Result<Generation>)> {
        let Prefilling {
            tag,
            mut sequence,
            cache,
            seconds,
            ..
        } = prefilled;
        let decoding = Instant::now();
        let (id, text, finished) = match sequence.step(self.model, &mut logits) {
            Ok(step) => step,
            Err(error) => return Some((tag, Err(error))),
        };
        let keep = on_text(&tag, &text);
        if !keep {
            sequence.checker.cancel();
        }
        if finished || !keep {
            return Some((tag, Ok(sequence.finish(seconds, 0.0))));
        }
        if let Err(error) = self.add_row(cache) {
            return Some((tag, Err(error)));
        }
        self.rows.push(Row {
            tag,
            sequence,
            pending: id,
            prefill_seconds: seconds,
            decoding,
        });
        None
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

    /// One decode step for every row, then the step's prefill work: `on_text` gets each
    /// row's new text (often empty) and returns false to cancel the row. Sequences that
    /// finished leave the batch and are returned. On a decode error the rows are dropped and
    /// returned with it (sequences being prefilled stay).
    pub fn step(
        &mut self,
        mut on_text: impl FnMut(&T, &str) -> bool,
    ) -> std::result::Result<Finished<T>, Box<BatchFailure<T>>> {
        let mut finished = self.decode(&mut on_text)?;
        self.prefill(&mut on_text, &mut finished);
        Ok(finished)
    }

    fn decode(
        &mut self,
        on_text: &mut impl FnMut(&T, &str) -> bool,
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
    fn remove(&mut self, done: &[bool]) -> Result<Finished<T>> {
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
                finished.push((row.tag, Ok(generation)));
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

    /// Drops the decoding rows, giving back their tags (after a decode error).
    fn abandon(&mut self) -> Vec<T> {
        self.cache = self.model.lm.new_cache();
        self.padding.clear();
        std::mem::take(&mut self.rows)
            .into_iter()
            .map(|r| r.tag)
            .collect()
    }
}
