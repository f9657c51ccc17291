//! Logits processors: where constrained decoding (a trie of valid ICD codes) plugs into
//! sampling. They run after the penalties and before temperature and the filters.

use std::fmt;

/// Changes the logits of the next token before it is picked.
///
/// A processor may lower logits (to -inf to forbid a token) or set them to finite values; it
/// must not write NaN or +inf, which the sampler rejects. When every logit is -inf after all
/// processors, [`crate::Sampler::sample`] fails with [`crate::InferError::NoTokenAllowed`]; to
/// end the output instead, put [`FallbackToEos`] last.
pub trait LogitsProcessor: Send {
    /// `generated` is what this sequence has generated so far, prompt excluded.
    fn process(&mut self, generated: &[u32], logits: &mut [f32]);

    /// For `Debug` output and logs.
    fn name(&self) -> &'static str {
        std::any::type_name::<Self>()
    }
}

impl<F> LogitsProcessor for F
where
    F: FnMut(&[u32], &mut [f32]) + Send,
{
    fn process(&mut self, generated: &[u32], logits: &mut [f32]) {
        self(generated, logits)
    }
}

/// Processors run one after another, in the order they were pushed.
#[derive(Default)]
pub struct LogitsProcessorList {
    processors: Vec<Box<dyn LogitsProcessor>>,
}

impl LogitsProcessorList {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, processor: impl LogitsProcessor + 'static) {
        self.processors.push(Box::new(processor));
    }

    pub fn push_boxed(&mut self, processor: Box<dyn LogitsProcessor>) {
        self.processors.push(processor);
    }

    pub fn len(&self) -> usize {
        self.processors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processors.is_empty()
    }
}

impl fmt::Debug for LogitsProcessorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.processors.iter().map(|p| p.name()))
            .finish()
    }
}

impl LogitsProcessor for LogitsProcessorList {
    fn process(&mut self, generated: &[u32], logits: &mut [f32]) {
        for processor in &mut self.processors {
            processor.process(generated, logits);
        }
    }
}

/// Forbids a fixed set of tokens (ids past the vocabulary are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanTokens {
    token_ids: Vec<u32>,
}

impl BanTokens {
    pub fn new(token_ids: impl IntoIterator<Item = u32>) -> Self {
        let mut token_ids: Vec<u32> = token_ids.into_iter().collect();
        token_ids.sort_unstable();
        token_ids.dedup();
        Self { token_ids }
    }

    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }
}

impl LogitsProcessor for BanTokens {
    fn process(&mut self, _generated: &[u32], logits: &mut [f32]) {
        for &id in &self.token_ids {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

/// When the processors before it leave no token allowed (every logit -inf), allows only
/// `eos_token_id`, so that a constrained decoder with nothing left to say ends the output
/// instead of failing. Put it last; it changes nothing while some token is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackToEos {
    pub eos_token_id: u32,
}

impl LogitsProcessor for FallbackToEos {
    fn process(&mut self, _generated: &[u32], logits: &mut [f32]) {
        if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
            if let Some(logit) = logits.get_mut(self.eos_token_id as usize) {
                *logit = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG_INF: f32 = f32::NEG_INFINITY;

    #[test]
    fn ban_tokens_sets_minus_infinity_and_ignores_ids_past_the_vocabulary() {
        let mut ban = BanTokens::new([3, 1, 3, 99]);
        assert_eq!(ban.token_ids(), &[1, 3, 99]);
        let mut logits = vec![0.5; 4];
        ban.process(&[], &mut logits);
        assert_eq!(logits, vec![0.5, NEG_INF, 0.5, NEG_INF]);
    }

    #[test]
    fn list_runs_processors_in_order_and_passes_generated_tokens() {
        let mut list = LogitsProcessorList::new();
        assert!(list.is_empty());
        list.push(|generated: &[u32], logits: &mut [f32]| logits[0] = generated.len() as f32);
        list.push(|_: &[u32], logits: &mut [f32]| logits[0] *= 10.0);
        assert_eq!(list.len(), 2);
        let mut logits = vec![0.0; 2];
        list.process(&[7, 8, 9], &mut logits);
        assert_eq!(logits, vec![30.0, 0.0]);
    }

    #[test]
    fn list_debug_names_its_processors() {
        let mut list = LogitsProcessorList::new();
        list.push(BanTokens::new([1]));
        list.push(FallbackToEos { eos_token_id: 2 });
        let debug = format!("{list:?}");
        assert!(
            debug.contains("BanTokens") && debug.contains("FallbackToEos"),
            "{debug}"
        );
    }

    #[test]
    fn fallback_to_eos_only_acts_when_nothing_is_allowed() {
        let mut fallback = FallbackToEos { eos_token_id: 2 };
        let mut some_allowed = vec![NEG_INF, 1.0, NEG_INF];
        fallback.process(&[], &mut some_allowed);
        assert_eq!(some_allowed, vec![NEG_INF, 1.0, NEG_INF]);
        let mut none_allowed = vec![NEG_INF; 3];
        fallback.process(&[], &mut none_allowed);
        assert_eq!(none_allowed, vec![NEG_INF, NEG_INF, 0.0]);
    }
}
