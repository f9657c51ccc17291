//! The generation loop: prefill the prompt, then sample, decode and check for stops one token at
//! a time, streaming text as it becomes final. Several prompts of different lengths run as one
//! left-padded batch.

use std::time::Instant;

use candle_core::{DType, Tensor};
use medcoder_models::{ForwardOptions, KvCache, LoadedModel};
use serde::Serialize;

use crate::detokenize::IncrementalDecoder;
use crate::error::Result;
use crate::params::SamplingParams;
use crate::processors::LogitsProcessor;
use crate::sampling::Sampler;
use crate::stop::{FinishReason, StopChecker, StopConditions};

/// Prompt tokens decoded again with the first output tokens so that their leading space and
/// multi-byte characters come out right.
const DECODE_CONTEXT: usize = 4;

/// One prompt to continue.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
}

/// What one request produced.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The output text, without a stop string.
    pub text: String,
    /// Generated ids, the stop token included.
    pub token_ids: Vec<u32>,
    /// Each generated token's log-probability under the distribution it was picked from,
    /// one per `token_ids` entry: the log-softmax of the logits after penalties and logits
    /// processors (a constrained decoder's mask included), at the sampling temperature, or at
    /// temperature 1 for greedy decoding (see [`Sampler::sample_with_log_prob`]).
    pub token_logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// The sampling seed (drawn when the request had none), to repeat the run.
    pub seed: u64,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Tokens after the first (which the prefill produced) per second of decoding.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.token_ids.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Per-sequence state shared by the single and batched loops.
pub(crate) struct Sequence {
    sampler: Sampler,
    pub(crate) checker: StopChecker,
    decoder: IncrementalDecoder,
    history: Vec<u32>,
    generated: Vec<u32>,
    log_probs: Vec<f32>,
    prompt_tokens: usize,
}

impl Sequence {
    pub(crate) fn new(
        request: GenerateRequest,
        processors: Vec<Box<dyn LogitsProcessor>>,
    ) -> Result<Self> {
        let prompt_tokens = request.prompt_ids.len();
        let mut sampler = Sampler::new(request.sampling, prompt_tokens)?;
        for processor in processors {
            sampler.processors_mut().push_boxed(processor);
        }
        let context = &request.prompt_ids[prompt_tokens.saturating_sub(DECODE_CONTEXT)..];
        Ok(Self {
            sampler,
            checker: StopChecker::new(request.stop)?,
            decoder: IncrementalDecoder::with_context(context),
            history: request.prompt_ids,
            generated: Vec::new(),
            log_probs: Vec::new(),
            prompt_tokens,
        })
    }

    /// Sample from the logits: the new token, the text it releases for streaming, and whether
    /// generation ended with it.
    pub(crate) fn step(
        &mut self,
        model: &LoadedModel,
        logits: &mut [f32],
    ) -> Result<(u32, String, bool)> {
        let (id, log_prob) = self.sampler.sample_with_log_prob(logits, &self.history)?;
        self.history.push(id);
        self.generated.push(id);
        self.log_probs.push(log_prob);
        let piece = if self.checker.is_stop_token(id) {
            String::new()
        } else {
            self.decoder.push(&model.tokenizer, id)?
        };
        let step = self.checker.push(id, &piece);
        Ok((id, step.text, step.finish.is_some()))
    }

    pub(crate) fn finish(self, prefill_seconds: f64, decode_seconds: f64) -> Generation {
        let seed = self.sampler.seed();
        let finish_reason = self.checker.finish_reason().unwrap_or(FinishReason::Length);
        Generation {
            text: self.checker.into_text(),
            token_ids: self.generated,
            token_logprobs: self.log_probs,
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            prefill_seconds,
            decode_seconds,
            seed,
        }
    }
}

/// Continue one prompt. `on_text` receives the text as it becomes final and returns `false` to
/// stop early (a client went away); `processors` constrain the tokens (e.g. valid ICD codes).
pub fn generate(
    model: &LoadedModel,
    request: GenerateRequest,
    processors: Vec<Box<dyn LogitsProcessor>>,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    let max_positions = model.lm.spec().max_position_embeddings;
    let prompt = request.prompt_ids.clone();
    let mut sequence = Sequence::new(request, processors)?;
    let mut cache = model.lm.new_cache();
    let started = Instant::now();
    let mut logits = prefill(model, &prompt, &mut cache)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let decoding = Instant::now();
    loop {
        let (id, text, finished) = sequence.step(model, &mut logits)?;
        if !text.is_empty() && !on_text(&text) {
            sequence.checker.cancel();
            break;
        }
        if finished {
            break;
        }
        if cache.len() + 1 >= max_positions {
            let rest = sequence.checker.cancel();
            on_text(&rest.text);
            break;
        }
        logits = last_logits(model, &[id], &mut cache)?;
    }
    Ok(sequence.finish(prefill_seconds, decoding.elapsed().as_secs_f64()))
}

/// An `on_text` for [`generate`] that streams text into a channel (to an HTTP response, a
/// terminal…); generation stops when the receiving side is dropped.
pub fn stream_into(sender: std::sync::mpsc::Sender<String>) -> impl FnMut(&str) -> bool {
    move |text| sender.send(text.to_string()).is_ok()
}

fn last_logits(model: &LoadedModel, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    Ok(model.lm.next_token_logits(ids, cache)?.to_vec1::<f32>()?)
}

/// Prompt tokens prefilled in one forward pass. A prompt goes in pieces of this many tokens:
/// in a continuous batch one piece per decode step of the running rows (so that a long prompt
/// joining does not stall their decoding for its whole prefill), and alone the same pieces in a
/// row, so that a sequence gets the same numbers either way.
pub const PREFILL_CHUNK: usize = 256;

/// The `n`-th piece of a prompt's prefill in pieces of `chunk` tokens (the last one shorter).
pub(crate) fn prefill_piece(prompt: &[u32], n: usize, chunk: usize) -> &[u32] {
    let start = n.saturating_mul(chunk).min(prompt.len());
    &prompt[start..start.saturating_add(chunk).min(prompt.len())]
}

/// Runs the `n`-th piece of `prompt` (pieces of `chunk` tokens) into the cache: the logits of
/// the position after the prompt once it is the last piece, `None` before (no logits are
/// computed for a piece before the last).
pub(crate) fn prefill_next_piece(
    model: &LoadedModel,
    prompt: &[u32],
    n: usize,
    chunk: usize,
    cache: &mut KvCache,
) -> Result<Option<Vec<f32>>> {
    let ids = prefill_piece(prompt, n, chunk);
    if (n + 1).saturating_mul(chunk) >= prompt.len() {
        return last_logits(model, ids, cache).map(Some);
    }
    let input = Tensor::new(ids, model.lm.device())?.unsqueeze(0)?;
    let options = ForwardOptions {
        last_only: true,
        hidden_only: true,
        ..ForwardOptions::default()
    };
    model.lm.forward(&input, Some(cache), &options)?;
    Ok(None)
}

/// Prefills a whole prompt, piece by piece (as [`generate`] does): the logits of the
/// position after it.
pub fn prefill(model: &LoadedModel, prompt: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let mut n = 0;
    loop {
        if let Some(logits) = prefill_next_piece(model, prompt, n, PREFILL_CHUNK, cache)? {
            return Ok(logits);
        }
        n += 1;
    }
}

/// Continue several prompts at once: left-padded to one length, prefilled together, then one
/// forward pass per step for all of them. Results are in the order of `requests`.
pub fn generate_batch(
    model: &LoadedModel,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<Generation>> {
    let processors = requests.iter().map(|_| Vec::new()).collect();
    generate_batch_with(model, requests, processors, || true)
}

/// [`generate_batch`] with each request's own logit processors (e.g. constrained decoding),
/// stopping every sequence early when `keep_going` says no (checked after each step).
pub fn generate_batch_with(
    model: &LoadedModel,
    requests: Vec<GenerateRequest>,
    processors: Vec<Vec<Box<dyn LogitsProcessor>>>,
    mut keep_going: impl FnMut() -> bool,
) -> Result<Vec<Generation>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let device = model.lm.device().clone();
    let longest = requests
        .iter()
        .map(|r| r.prompt_ids.len())
        .max()
        .unwrap_or(0);
    let padding: Vec<usize> = requests
        .iter()
        .map(|r| longest - r.prompt_ids.len())
        .collect();
    let pad_id = model.stop_token_ids.first().copied().unwrap_or(0);
    let mut rows = Vec::with_capacity(requests.len() * longest);
    for (request, pad) in requests.iter().zip(&padding) {
        rows.extend(std::iter::repeat_n(pad_id, *pad));
        rows.extend(&request.prompt_ids);
    }
    let batch = requests.len();
    let mut sequences = requests
        .into_iter()
        .zip(
            processors
                .into_iter()
                .chain(std::iter::repeat_with(Vec::new)),
        )
        .map(|(r, p)| Sequence::new(r, p))
        .collect::<Result<Vec<_>>>()?;
    let mut cache = model.lm.new_cache();
    let options = ForwardOptions {
        left_padding: Some(&padding),
        last_only: true,
        ..ForwardOptions::default()
    };
    let started = Instant::now();
    let input = Tensor::from_vec(rows, (batch, longest), &device)?;
    let mut logits = model.lm.forward(&input, Some(&mut cache), &options)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let decoding = Instant::now();
    let mut finished = vec![false; batch];
    let max_positions = model.lm.spec().max_position_embeddings;
    while finished.iter().any(|f| !f) {
        // (b, 1, vocab) → one row per sequence
        let table: Vec<Vec<f32>> = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(batch);
        for (i, (sequence, mut row)) in sequences.iter_mut().zip(table).enumerate() {
            if finished[i] {
                next.push(pad_id);
                continue;
            }
            let (id, _text, done) = sequence.step(model, &mut row)?;
            finished[i] = done;
            next.push(id);
        }
        if finished.iter().all(|f| *f) {
            break;
        }
        if !keep_going() {
            for sequence in sequences.iter_mut() {
                sequence.checker.cancel();
            }
            break;
        }
        if cache.len() + 1 >= max_positions {
            for sequence in sequences.iter_mut() {
                sequence.checker.cancel();
            }
            break;
        }
        let input = Tensor::from_vec(next, (batch, 1), &device)?;
        logits = model.lm.forward(&input, Some(&mut cache), &options)?;
    }
    let decode_seconds = decoding.elapsed().as_secs_f64();
    Ok(sequences
        .into_iter()
        .map(|s| s.finish(prefill_seconds, decode_seconds))
        .collect())
}
