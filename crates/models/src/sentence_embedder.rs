//! Sentence embeddings from a sentence-transformers BERT checkpoint (the `minilm-l6` asset:
//! all-MiniLM-L6-v2): WordPiece ids wrapped in `[CLS] … [SEP]`, the encoder's token states
//! mean-pooled over the real tokens, L2-normalised, so that a dot product is a cosine.
//! Texts longer than the checkpoint's `max_seq_length` are embedded in windows whose
//! embeddings are averaged by token count (nothing is cut off silently).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::bert::{mean_pool, BertModel, Config};
use crate::error::{CandleContext, ModelError};

/// Sequences encoded together; sorted by length first, so little of a batch is padding.
const BATCH: usize = 32;

impl std::fmt::Debug for SentenceEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEmbedder")
            .field("source", &self.source)
            .field("dimension", &self.dimension())
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

pub struct SentenceEmbedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    cls: u32,
    sep: u32,
    /// Tokens per window, `[CLS]` and `[SEP]` included.
    max_tokens: usize,
    source: PathBuf,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl SentenceEmbedder {
    /// A sentence-transformers folder: `config.json`, `model.safetensors`, `tokenizer.json`
    /// (and `sentence_bert_config.json` for the window length, 256 tokens without it).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let file_error = |path: &Path, message: String| ModelError::File {
            path: path.to_path_buf(),
            message,
        };
        let config_path = dir.join("config.json");
        let config: Config = serde_json::from_str(&fs_err::read_to_string(&config_path)?)
            .map_err(|e| file_error(&config_path, format!("not a BERT config.json: {e}")))?;
        if let Some(reason) = config.unsupported_reason() {
            return Err(file_error(&config_path, reason));
        }
        let window_path = dir.join("sentence_bert_config.json");
        let max_seq = if window_path.is_file() {
            serde_json::from_str::<SentenceBertConfig>(&fs_err::read_to_string(&window_path)?)
                .map_err(|e| file_error(&window_path, format!("invalid JSON: {e}")))?
                .max_seq_length
        } else {
            None
        };
        let max_tokens = max_seq
            .unwrap_or(256)
            .min(config.max_position_embeddings)
            .max(3);
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(file_error(&weights, "not found".into()));
        }
        let tensors = candle_core::safetensors::load(&weights, device)
            .ctx(|| format!("reading {}", weights.display()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model =
            BertModel::new(&config, vb).ctx(|| format!("building BERT from {}", dir.display()))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| file_error(&tokenizer_path, format!("not a tokenizer: {e}")))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let special = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| file_error(&tokenizer_path, format!("has no `{name}` token")))
        };
        Ok(Self {
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            model,
            tokenizer,
            max_tokens,
            source: dir.to_path_buf(),
        })
    }

    /// Embedding width (384 for MiniLM-L6).
    pub fn dimension(&self) -> usize {
        self.model.config.hidden_size
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// One L2-normalised embedding per text, in order (an empty text gets `[CLS] [SEP]`'s).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        // Windows: (text index, ids with [CLS]/[SEP]).
        let body = self.max_tokens - 2;
        let mut windows: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, encoding) in encodings.iter().enumerate() {
            let ids = encoding.get_ids();
            let mut start = 0;
            loop {
                let end = (start + body).min(ids.len());
                let mut window = Vec::with_capacity(end - start + 2);
                window.push(self.cls);
                window.extend_from_slice(&ids[start..end]);
                window.push(self.sep);
                windows.push((i, window));
                if end >= ids.len() {
                    break;
                }
                start = end;
            }
        }
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&w| windows[w].1.len());
        let dim = self.dimension();
        let mut sums = vec![vec![0f32; dim]; texts.len()];
        for batch in order.chunks(BATCH) {
            let pooled = self.encode(batch.iter().map(|&w| windows[w].1.as_slice()))?;
            for (row, &w) in pooled.iter().zip(batch) {
                let (text, ids) = &windows[w];
                let weight = ids.len() as f32;
                for (s, v) in sums[*text].iter_mut().zip(row) {
                    *s += weight * v;
                }
            }
        }
        for v in &mut sums {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Ok(sums)
    }

    /// Mean-pooled (not normalised) embeddings of a batch of id sequences.
    fn encode<'a>(
        &self,
        sequences: impl Iterator<Item = &'a [u32]>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let sequences: Vec<&[u32]> = sequences.collect();
        let longest = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * longest);
        let mut mask = Vec::with_capacity(sequences.len() * longest);
        for s in &sequences {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(0u32, longest - s.len()));
            mask.extend(std::iter::repeat_n(1u32, s.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - s.len()));
        }
        let device = self.model.device();
        let shape = (sequences.len(), longest);
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::from_vec(ids, shape, device)?;
            let mask = Tensor::from_vec(mask, shape, device)?;
            let states = self.model.forward(&ids, &mask)?;
            mean_pool(&states, &mask)?.to_vec2::<f32>()
        };
        run().ctx(|| format!("embedding with {}", self.source.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The installed `minilm-l6` asset, when `medcoder assets fetch` has run.
    fn minilm() -> Option<SentenceEmbedder> {
        let dir = medcoder_assets::MedcoderHome::from_env()
            .ok()?
            .asset_dir("minilm-l6");
        if !dir.join("model.safetensors").is_file() {
            eprintln!(
                "skipped: the minilm-l6 asset is not installed (run `medcoder assets fetch`)"
            );
            return None;
        }
        Some(SentenceEmbedder::load(&dir, &Device::Cpu).unwrap())
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn paraphrases_are_closer_than_unrelated_sentences() {
        let Some(embedder) = minilm() else { return };
        let texts = [
            "The patient has type 2 diabetes mellitus.",
            "Diabetes mellitus type II was diagnosed in this man.",
            "A fracture of the left femur was seen on the radiograph.",
            "The radiograph showed a broken left thigh bone.",
            "",
        ];
        let e = embedder.embed(&texts).unwrap();
        assert_eq!(e.len(), texts.len());
        assert!(e.iter().all(|v| v.len() == 384));
        for v in &e {
            let norm = cosine(v, v);
            assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        }
        let (same_dm, same_fx) = (cosine(&e[0], &e[1]), cosine(&e[2], &e[3]));
        let cross = [(0, 2), (0, 3), (1, 2), (1, 3)].map(|(i, j)| cosine(&e[i], &e[j]));
        for c in cross {
            assert!(
                same_dm > c + 0.2 && same_fx > c + 0.2,
                "{same_dm} {same_fx} {cross:?}"
            );
        }
        // A text alone embeds as it does in a batch.
        let alone = embedder.embed(&texts[2..3]).unwrap();
        assert!(cosine(&alone[0], &e[2]) > 0.9999);
    }

    #[test]
    fn long_texts_are_embedded_in_windows_not_cut() {
        let Some(embedder) = minilm() else { return };
        let head = "Chest pain radiating to the left arm. ".repeat(40);
        let tail = "The skin rash on both legs was itchy. ".repeat(40);
        let both = format!("{head}{tail}");
        let e = embedder.embed(&[&both, &head, &tail]).unwrap();
        // The tail is past the first window, yet it moves the embedding towards itself.
        assert!(cosine(&e[0], &e[2]) > 0.5, "{}", cosine(&e[0], &e[2]));
        assert!(cosine(&e[0], &e[1]) > 0.5, "{}", cosine(&e[0], &e[1]));
    }
}
