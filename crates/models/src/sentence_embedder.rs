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
use crate::word_token_cache::WordTokenCache;

/// Sequences encoded together; sorted by length first, so little of a batch is padding.
const BATCH: usize = 32;

impl std::fmt::Debug for SentenceEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEmbedder")
            .field("source", &self.source)
            .field("dimension", &self.dimension())
            .field("max_tokens", &self.max_tokens)
            .field("static", &self.is_static())
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
    /// When distilled ([`Self::distilled`]): one vector per vocabulary id, `dimension` wide,
    /// and texts are embedded as the normalised sum of their tokens' vectors.
    token_vectors: Option<Vec<f32>>,
    /// With the token vectors, where the tokenizer allows it: token ids per word.
    word_ids: Option<WordTokenCache>,
}

/// Tensor name of the distilled token vectors in their cache file.
const TOKEN_VECTORS: &str = "token_vectors";
/// Single-token sequences encoded together when distilling.
const DISTILL_BATCH: usize = 512;
const STATIC_ZIPF_POWER: f32 = 2.0;

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl SentenceEmbedder {
    /// How [`Self::distilled`] makes its token vectors; part of their cache key.
    pub const STATIC_RECIPE: &'static str = "single-token mean pool, centred, zipf^2 weights";

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
            token_vectors: None,
            word_ids: None,
        })
    }

    /// The same embedder made static: every vocabulary token is embedded alone
    /// (`[CLS] token [SEP]`, mean-pooled, normalised), the vectors' common direction (their
    /// mean) is taken out, and special and punctuation tokens get none; a text is then the
    /// normalised sum of its tokens' vectors, a few microseconds instead of a pass of the
    /// encoder over every token. The vectors are computed once and kept in `cache` (a
    /// safetensors file, written atomically).
    pub fn distilled(mut self, cache: &Path) -> Result<Self, ModelError> {
        let dim = self.dimension();
        let vocab = self.tokenizer.get_vocab_size(true);
        let cached = cache
            .is_file()
            .then(|| candle_core::safetensors::load(cache, &Device::Cpu).ok())
            .flatten()
            .and_then(|mut t| t.remove(TOKEN_VECTORS))
            .filter(|t| t.dims() == [vocab, dim]);
        let vectors = match cached {
            Some(t) => t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .ctx(|| format!("reading {}", cache.display()))?,
            None => {
                let vectors = self.distill(vocab)?;
                let parent = cache.parent().unwrap_or(Path::new("."));
                fs_err::create_dir_all(parent)?;
                // Unique per writer: two processes distilling at once do not mix their bytes.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let partial =
                    cache.with_extension(format!("partial.{}.{nanos}", std::process::id()));
                Tensor::from_slice(&vectors, (vocab, dim), &Device::Cpu)
                    .and_then(|t| {
                        candle_core::safetensors::save(
                            &std::collections::HashMap::from([(TOKEN_VECTORS, t)]),
                            &partial,
                        )
                    })
                    .ctx(|| format!("writing {}", partial.display()))?;
                fs_err::rename(&partial, cache)?;
                vectors
            }
        };
        self.token_vectors = Some(vectors);
        self.word_ids = WordTokenCache::for_tokenizer(&self.tokenizer);
        Ok(self)
    }

    /// Whether texts are embedded from distilled token vectors.
    pub fn is_static(&self) -> bool {
        self.token_vectors.is_some()
    }

    fn distill(&self, vocab: usize) -> Result<Vec<f32>, ModelError> {
        let dim = self.dimension();
        let ids: Vec<u32> = (0..vocab as u32).collect();
        let mut vectors = vec![0f32; vocab * dim];
        for chunk in ids.chunks(DISTILL_BATCH) {
            let sequences: Vec<[u32; 3]> =
                chunk.iter().map(|&id| [self.cls, id, self.sep]).collect();
            let pooled = self.encode(sequences.iter().map(|s| &s[..]))?;
            for (&id, mut row) in chunk.iter().zip(pooled) {
                normalize(&mut row);
                vectors[id as usize * dim..(id as usize + 1) * dim].copy_from_slice(&row);
            }
        }
        let kept: Vec<bool> = ids
            .iter()
            .map(|&id| {
                self.tokenizer.id_to_token(id).is_some_and(|token| {
                    let word = token.trim_start_matches("##");
                    !(token.starts_with('[') && token.ends_with(']'))
                        && word.chars().any(char::is_alphanumeric)
                })
            })
            .collect();
        let count = kept.iter().filter(|k| **k).count().max(1) as f32;
        let mut mean = vec![0f32; dim];
        for (row, _) in vectors.chunks(dim).zip(&kept).filter(|(_, k)| **k) {
            mean.iter_mut().zip(row).for_each(|(m, x)| *m += x / count);
        }
        // BERT vocabularies list their whole words by falling frequency after the single
        // characters (`the` first): a token weighs the log of its rank there (Zipf), so that
        // frequent words count for little in a text's sum.
        let first_word = self.tokenizer.token_to_id("the").unwrap_or(0) as f32;
        for (id, (row, keep)) in vectors.chunks_mut(dim).zip(&kept).enumerate() {
            if *keep {
                let weight = (1.0 + (id as f32 - first_word).max(1.0))
                    .ln()
                    .powf(STATIC_ZIPF_POWER);
                row.iter_mut()
                    .zip(&mean)
                    .for_each(|(x, m)| *x = (*x - m) * weight);
            } else {
                row.fill(0.0);
            }
        }
        Ok(vectors)
    }

    fn embed_static(&self, vectors: &[f32], texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let dim = self.dimension();
        // One text after another: a note's sentences are short, and the callers already code
        // notes in parallel (a batch would spread each note over the thread pool again).
        let tokenizer_error = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
        let mut ids = Vec::new();
        texts
            .iter()
            .map(|text| {
                ids.clear();
                match &self.word_ids {
                    Some(cache) => cache
                        .ids(&self.tokenizer, text, &mut ids)
                        .map_err(tokenizer_error)?,
                    None => ids.extend_from_slice(
                        self.tokenizer
                            .encode(*text, false)
                            .map_err(tokenizer_error)?
                            .get_ids(),
                    ),
                }
                let mut sum = vec![0f32; dim];
                for &id in &ids {
                    if let Some(row) = vectors.get(id as usize * dim..(id as usize + 1) * dim) {
                        sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                    }
                }
                normalize(&mut sum);
                Ok(sum)
            })
            .collect()
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
        if let Some(vectors) = &self.token_vectors {
            return self.embed_static(vectors, texts);
        }
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
        sums.iter_mut().for_each(|v| normalize(v));
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

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::word_token_cache::WordTokenCache;

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

    /// Two pairs of paraphrases, and an empty text.
    const PARAPHRASES: [&str; 5] = [
        "The patient has type 2 diabetes mellitus.",
        "Diabetes mellitus type II was diagnosed in this man.",
        "A fracture of the left femur was seen on the radiograph.",
        "The radiograph showed a broken left thigh bone.",
        "",
    ];

    /// Each paraphrase pair of [`PARAPHRASES`] is closer than any cross pair by `margin`.
    fn assert_paraphrases_closer(e: &[Vec<f32>], margin: f32) {
        let (same_dm, same_fx) = (cosine(&e[0], &e[1]), cosine(&e[2], &e[3]));
        let cross = [(0, 2), (0, 3), (1, 2), (1, 3)].map(|(i, j)| cosine(&e[i], &e[j]));
        for c in cross {
            assert!(
                same_dm > c + margin && same_fx > c + margin,
                "{same_dm} {same_fx} {cross:?}"
            );
        }
    }

    #[test]
    fn paraphrases_are_closer_than_unrelated_sentences() {
        let Some(embedder) = minilm() else { return };
        let texts = PARAPHRASES;
        let e = embedder.embed(&texts).unwrap();
        assert_eq!(e.len(), texts.len());
        assert!(e.iter().all(|v| v.len() == 384));
        for v in &e {
            let norm = cosine(v, v);
            assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        }
        assert_paraphrases_closer(&e, 0.2);
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

    #[test]
    fn distilled_token_vectors_embed_by_meaning_and_are_cached() {
        let Some(embedder) = minilm() else { return };
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("static/minilm.safetensors");
        let distilled = embedder.distilled(&cache).unwrap();
        assert!(distilled.is_static() && cache.is_file());
        let texts = PARAPHRASES;
        let e = distilled.embed(&texts).unwrap();
        assert_eq!(e.len(), texts.len());
        for v in &e[..4] {
            assert!((cosine(v, v) - 1.0).abs() < 1e-4);
        }
        assert!(e[4].iter().all(|x| *x == 0.0), "no token, no direction");
        assert_paraphrases_closer(&e, 0.1);
        // Punctuation and special tokens carry nothing; a text is the sum of its tokens.
        let punctuated = distilled.embed(&["diabetes mellitus ; , ."]).unwrap();
        let plain = distilled.embed(&["diabetes mellitus"]).unwrap();
        assert!(cosine(&punctuated[0], &plain[0]) > 0.9999);
        // Read back from the cache: the same vectors.
        let again = minilm().unwrap().distilled(&cache).unwrap();
        assert_eq!(again.embed(&texts).unwrap(), e);
        assert!(std::fs::read_dir(cache.parent().unwrap())
            .unwrap()
            .all(|f| !f.unwrap().file_name().to_string_lossy().contains("partial")));
    }

    #[test]
    fn word_cache_gives_the_tokenizers_own_ids() {
        let Some(embedder) = minilm() else { return };
        let cache = WordTokenCache::for_tokenizer(&embedder.tokenizer)
            .expect("MiniLM's tokenizer is BERT WordPiece: ids go word by word");
        let long_word = "supercalifragilisticexpialidocious".repeat(5);
        let texts = [
            "Pt. c/o chest pain (3/10), radiating to L arm; BP 140/90 mmHg.",
            "Café-au-lait spots\tand Ångström\nunits, naïve   reäction",
            "肺炎 pneumonia, 2nd episode [SEP] not a separator[CLS]x",
            "zero\u{200b}width and \u{7}bell, \u{a0}no-break space, non\u{AD}hyphen",
            long_word.as_str(),
            "",
            "   ",
        ];
        for text in texts {
            let mut ids = Vec::new();
            // Twice: the second time from the remembered words.
            for _ in 0..2 {
                ids.clear();
                cache.ids(&embedder.tokenizer, text, &mut ids).unwrap();
                let want = embedder.tokenizer.encode(text, false).unwrap();
                assert_eq!(ids, want.get_ids(), "{text:?}");
            }
        }
    }
}
