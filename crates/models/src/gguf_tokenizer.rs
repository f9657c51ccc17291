//! A tokenizer built from the `tokenizer.ggml.*` metadata of a GGUF file, for models that ship as
//! one .gguf file without tokenizer.json. llama.cpp is the reference: ids must match what it gives.
//!
//! Two vocab kinds are read:
//! - `gpt2`: byte-level BPE with merges; the text is first split by the regexes llama.cpp picks
//!   from `tokenizer.ggml.pre` (SmolLM2, Qwen2, Llama 3).
//! - `llama`: SentencePiece BPE (Gemma 3): merges come from the scores, spaces are written `▁`,
//!   characters outside the vocab fall back to `<0xNN>` byte tokens.
//!
//! Control and user-defined tokens become added tokens, found in the raw text before anything
//! else, as llama.cpp's special-token partition does; control tokens count as special (skipped
//! when special tokens are read as plain text), user-defined ones are always matched.

use std::collections::HashMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

use crate::ModelError;

pub const KEY_MODEL: &str = "tokenizer.ggml.model";
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
pub const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
pub const KEY_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The SentencePiece space.
const SPACE: &str = "\u{2581}";

/// Tokens that llama.cpp treats as control tokens whatever their declared type (end of
/// generation and fill-in-the-middle markers), so they are special here too.
#[rustfmt::skip]
const CONTROL_LOOKING: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>", "<|fim_suffix|>",
    "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>", "<|fim_middle|>", "<fim-middle>",
    "<fim_middle>", "<MID>", "▁<MID>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
];

/// A token's kind, numbered as in `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined = 0,
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl TokenType {
    pub fn from_gguf(value: i64) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// The tokenizer algorithm `tokenizer.ggml.model` names, with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufVocabModel {
    /// Byte-level BPE; `pre` is `tokenizer.ggml.pre`, which picks the pre-tokenizer regexes.
    Gpt2 {
        merges: Vec<(String, String)>,
        pre: Option<String>,
    },
    /// SentencePiece BPE with one score per token; `add_space_prefix` puts `▁` before the text
    /// and after every special token.
    Llama {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
}

/// Everything the tokenizer is built from, read out of GGUF metadata (or made by hand in tests).
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// The GGUF file, for error messages.
    pub source: PathBuf,
    pub model: GgufVocabModel,
    pub tokens: Vec<String>,
    /// One per token.
    pub token_types: Vec<TokenType>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Whether encoding with special tokens puts BOS first / EOS last.
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads the tokenizer keys of a GGUF file's metadata, with llama.cpp's defaults for the
    /// optional ones.
    pub fn from_metadata(
        metadata: &HashMap<String, Value>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        let meta = Metadata {
            map: metadata,
            path,
        };
        let kind = meta
            .string(KEY_MODEL)?
            .ok_or_else(|| meta.error(KEY_MODEL, "missing"))?;
        let mut tokens = meta
            .strings(KEY_TOKENS)?
            .ok_or_else(|| meta.error(KEY_TOKENS, "missing"))?;
        // llama.cpp renames empty tokens so that every token has a text of its own.
        for (id, token) in tokens.iter_mut().enumerate() {
            if token.is_empty() {
                *token = format!("[EMPTY_{id}]");
            }
        }
        let n_tokens = tokens.len();
        let token_types = match meta.integers(KEY_TOKEN_TYPE)? {
            None => vec![TokenType::Normal; n_tokens],
            Some(types) if types.len() < n_tokens => {
                return Err(meta.error(
                    KEY_TOKEN_TYPE,
                    format!("{} entries for {n_tokens} tokens", types.len()),
                ))
            }
            Some(types) => types[..n_tokens]
                .iter()
                .map(|&t| TokenType::from_gguf(t))
                .collect(),
        };
        // Default special ids and add_bos per vocab kind, as llama.cpp has them.
        let (model, default_bos, default_eos, default_unk, default_add_bos) = match kind {
            "gpt2" => {
                let merges = meta
                    .strings(KEY_MERGES)?
                    .ok_or_else(|| meta.error(KEY_MERGES, "missing (a gpt2 vocab needs merges)"))?;
                let merges = merges.iter().filter_map(|m| split_merge(m)).collect();
                let pre = meta.string(KEY_PRE)?.map(str::to_string);
                let add_bos = pre_tokenizer_spec(pre.as_deref()).add_bos;
                (
                    GgufVocabModel::Gpt2 { merges, pre },
                    Some(11),
                    Some(11),
                    None,
                    add_bos,
                )
            }
            "llama" => {
                let scores = match meta.floats(KEY_SCORES)? {
                    None => vec![0.0; n_tokens],
                    Some(scores) if scores.len() < n_tokens => {
                        return Err(meta.error(
                            KEY_SCORES,
                            format!("{} entries for {n_tokens} tokens", scores.len()),
                        ))
                    }
                    Some(mut scores) => {
                        scores.truncate(n_tokens);
                        scores
                    }
                };
                let add_space_prefix = meta.bool(KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
                let model = GgufVocabModel::Llama {
                    scores,
                    add_space_prefix,
                };
                (model, Some(1), Some(2), Some(0), true)
            }
            other => {
                return Err(meta.error(
                    KEY_MODEL,
                    format!("`{other}` is not supported (only `gpt2` and `llama` are)"),
                ))
            }
        };
        let in_vocab = |id: Option<u32>| id.filter(|&id| (id as usize) < n_tokens);
        Ok(Self {
            source: path.to_path_buf(),
            model,
            bos_id: meta
                .token_id(KEY_BOS_ID, n_tokens)?
                .or(in_vocab(default_bos)),
            eos_id: meta
                .token_id(KEY_EOS_ID, n_tokens)?
                .or(in_vocab(default_eos)),
            unk_id: meta
                .token_id(KEY_UNK_ID, n_tokens)?
                .or(in_vocab(default_unk)),
            pad_id: meta.token_id(KEY_PAD_ID, n_tokens)?,
            add_bos: meta.bool(KEY_ADD_BOS)?.unwrap_or(default_add_bos),
            add_eos: meta.bool(KEY_ADD_EOS)?.unwrap_or(false),
            chat_template: meta.string(KEY_CHAT_TEMPLATE)?.map(str::to_string),
            tokens,
            token_types,
        })
    }

    /// The text of a token, e.g. of `bos_id`.
    pub fn token_text(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|id| self.tokens.get(id as usize))
            .map(String::as_str)
    }

    /// The HF tokenizer that gives llama.cpp's ids.
    pub fn build(&self) -> Result<Tokenizer, ModelError> {
        if self.token_types.len() != self.tokens.len() {
            return Err(self.error(format!(
                "{} token types for {} tokens",
                self.token_types.len(),
                self.tokens.len()
            )));
        }
        let vocab: Vocab = self.tokens.iter().cloned().zip(0u32..).collect();
        if vocab.len() != self.tokens.len() {
            return Err(self.error(format!("`{KEY_TOKENS}` holds {}", self.duplicate_token())));
        }
        let mut tokenizer = match &self.model {
            GgufVocabModel::Gpt2 { merges, pre } => self.gpt2(vocab, merges, pre.as_deref())?,
            GgufVocabModel::Llama {
                scores,
                add_space_prefix,
            } => self.llama(vocab, scores, *add_space_prefix)?,
        };
        let (special, user_defined) = self.added_tokens();
        tokenizer.add_special_tokens(&special);
        tokenizer.add_tokens(&user_defined);
        if let Some(post_processor) = self.post_processor()? {
            tokenizer.with_post_processor(Some(post_processor));
        }
        Ok(tokenizer)
    }

    fn gpt2(
        &self,
        vocab: Vocab,
        merges: &[(String, String)],
        pre: Option<&str>,
    ) -> Result<Tokenizer, ModelError> {
        let spec = pre_tokenizer_spec(pre);
        // A merge naming a token outside the vocab can never apply; llama.cpp keeps it unused,
        // the HF builder would refuse the whole list.
        let known = |a: &str, b: &str| {
            vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        };
        let usable: Vec<(String, String)> = merges
            .iter()
            .filter(|(a, b)| known(a, b))
            .cloned()
            .collect();
        if usable.len() < merges.len() {
            tracing::warn!(
                "{}: {} of {} merges name tokens outside the vocab; they are ignored",
                self.source.display(),
                merges.len() - usable.len(),
                merges.len()
            );
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, usable)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|e| self.error(format!("BPE from `{KEY_MERGES}`: {e}")))?;
        let pre_tokenizer = gpt2_pre_tokenizer(&spec)
            .map_err(|e| self.error(format!("pre-tokenizer for `{KEY_PRE}` {pre:?}: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevel::new(false, true, false)));
        Ok(tokenizer)
    }

    fn llama(
        &self,
        vocab: Vocab,
        scores: &[f32],
        add_space_prefix: bool,
    ) -> Result<Tokenizer, ModelError> {
        if scores.len() != self.tokens.len() {
            return Err(self.error(format!(
                "{} scores for {} tokens",
                scores.len(),
                self.tokens.len()
            )));
        }
        let merges = merges_from_scores(&self.tokens, scores);
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = self.token_text(self.unk_id) {
            builder = builder.unk_token(unk.to_string());
        }
        let bpe = builder
            .build()
            .map_err(|e| self.error(format!("BPE from `{KEY_SCORES}`: {e}")))?;
        let mut normalizers = Vec::new();
        // Per piece of text between added tokens: llama.cpp puts the space before the text and
        // after every special token.
        if add_space_prefix {
            normalizers.push(NormalizerWrapper::Prepend(Prepend::new(SPACE.to_string())));
        }
        normalizers.push(NormalizerWrapper::Replace(self.replace(" ", SPACE)?));
        let mut decoders = vec![
            DecoderWrapper::Replace(self.replace(SPACE, " ")?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        if add_space_prefix {
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }

    fn replace(&self, pattern: &str, content: &str) -> Result<Replace, ModelError> {
        Replace::new(pattern, content).map_err(|e| self.error(format!("replace {pattern:?}: {e}")))
    }

    /// Control (and unknown) tokens as special added tokens, user-defined ones as plain added
    /// tokens; both matched against the raw text, not the normalized one.
    fn added_tokens(&self) -> (Vec<AddedToken>, Vec<AddedToken>) {
        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (text, &kind) in self.tokens.iter().zip(&self.token_types) {
            let kind = if CONTROL_LOOKING.contains(&text.as_str()) {
                TokenType::Control
            } else {
                kind
            };
            match kind {
                TokenType::Control | TokenType::Unknown => {
                    special.push(AddedToken::from(text.clone(), true).normalized(false));
                }
                TokenType::UserDefined => {
                    user_defined.push(AddedToken::from(text.clone(), false).normalized(false));
                }
                _ => {}
            }
        }
        (special, user_defined)
    }

    /// BOS / EOS around the text when encoding with special tokens.
    fn post_processor(&self) -> Result<Option<TemplateProcessing>, ModelError> {
        let bos = self.end_token(self.add_bos, self.bos_id, "bos", KEY_ADD_BOS, KEY_BOS_ID)?;
        let eos = self.end_token(self.add_eos, self.eos_id, "eos", KEY_ADD_EOS, KEY_EOS_ID)?;
        if bos.is_none() && eos.is_none() {
            return Ok(None);
        }
        let mut pair = Vec::new();
        for (sequence, type_id) in [("$A", 0), ("$B", 1)] {
            if bos.is_some() {
                pair.push(format!("bos:{type_id}"));
            }
            pair.push(format!("{sequence}:{type_id}"));
            if eos.is_some() {
                pair.push(format!("eos:{type_id}"));
            }
        }
        let single = pair[..pair.len() / 2].to_vec();
        let template_error = |e: String| self.error(format!("BOS/EOS template: {e}"));
        let template = TemplateProcessing::builder()
            .try_single(single)
            .map_err(template_error)?
            .try_pair(pair)
            .map_err(template_error)?
            .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
            .build()
            .map_err(|e| template_error(e.to_string()))?;
        Ok(Some(template))
    }

    fn end_token(
        &self,
        add: bool,
        id: Option<u32>,
        name: &str,
        add_key: &str,
        id_key: &str,
    ) -> Result<Option<SpecialToken>, ModelError> {
        if !add {
            return Ok(None);
        }
        let (id, text) = id
            .and_then(|id| Some((id, self.token_text(Some(id))?)))
            .ok_or_else(|| self.error(format!("`{add_key}` is true but `{id_key}` is not set")))?;
        SpecialToken::new(name.to_string(), vec![id], vec![text.to_string()])
            .map(Some)
            .map_err(|e| self.error(format!("{name} token: {e}")))
    }

    fn duplicate_token(&self) -> String {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if let Some(first) = seen.insert(token.as_str(), id) {
                return format!("{token:?} twice (ids {first} and {id})");
            }
        }
        "duplicate tokens".to_string()
    }

    fn error(&self, message: impl Display) -> ModelError {
        ModelError::File {
            path: self.source.clone(),
            message: format!("tokenizer from GGUF metadata: {message}"),
        }
    }
}

/// `"a b"` → `("a", "b")`, splitting at the first space after the first byte as llama.cpp does
/// (so a merge may start with a space).
fn split_merge(merge: &str) -> Option<(String, String)> {
    let (at, _) = merge.char_indices().find(|&(i, c)| i >= 1 && c == ' ')?;
    Some((merge[..at].to_string(), merge[at + 1..].to_string()))
}

/// SentencePiece BPE as merges: one for every token that splits into two tokens, ranked by the
/// merged token's score (higher first), then by token id, then by the ids of the two halves, as
/// transformers' SentencePieceExtractor orders them.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // (score, merged id, left id, right id, split byte)
    let mut merges: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (id, (token, &score)) in tokens.iter().zip(scores).enumerate() {
        // NaN ranks last; -0.0 and 0.0 are one score, as for llama.cpp's comparison.
        let score = if score.is_nan() {
            f32::NEG_INFINITY
        } else {
            score + 0.0
        };
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((score, id, l, r, at));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(_, id, _, _, at)| {
            let (left, right) = tokens[id].split_at(at);
            (left.to_string(), right.to_string())
        })
        .collect()
}

/// How llama.cpp pre-tokenizes a `gpt2` vocab for one `tokenizer.ggml.pre` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreTokenizerSpec {
    /// Applied in turn, each splitting the pieces the previous one left.
    pub regexes: &'static [&'static str],
    /// A piece that is a whole token is taken as is, without merges.
    pub ignore_merges: bool,
    /// The default of `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's table (src/llama-vocab.cpp) for the common values; an unknown value gets GPT-2's
/// regex with a warning (llama.cpp refuses the file).
pub fn pre_tokenizer_spec(pre: Option<&str>) -> PreTokenizerSpec {
    let spec = |regexes, ignore_merges, add_bos| PreTokenizerSpec {
        regexes,
        ignore_merges,
        add_bos,
    };
    match pre {
        None | Some("default") => spec(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        Some(
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
            | "lfm2" | "jina-v5-nano",
        ) => spec(&[LLAMA3_REGEX], true, true),
        Some("dbrx" | "smaug-bpe") => spec(&[LLAMA3_REGEX], false, false),
        Some(
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
            | "solar-open",
        ) => spec(&[QWEN2_REGEX], false, false),
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
            | "mellum2",
        ) => spec(&[r"\p{N}", GPT2_REGEX], false, false),
        Some("falcon") => spec(
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        Some(
            "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "mpt" | "olmo"
            | "jais" | "trillion" | "granite-docling" | "jina-v1-en" | "jina-v2-code"
            | "roberta-bpe",
        ) => spec(&[GPT2_REGEX], false, false),
        Some(other) => {
            tracing::warn!("{KEY_PRE} `{other}` is not known here; splitting text as GPT-2 does");
            spec(&[GPT2_REGEX], false, false)
        }
    }
}

/// The spec's regexes in turn, each keeping both what it matches and what lies between, then
/// ByteLevel only to map bytes to the GPT-2 alphabet (the regexes did the splitting).
fn gpt2_pre_tokenizer(spec: &PreTokenizerSpec) -> tokenizers::Result<PreTokenizerSequence> {
    let mut steps = Vec::new();
    for regex in spec.regexes {
        let pattern = SplitPattern::Regex((*regex).to_string());
        let split = Split::new(pattern, SplitDelimiterBehavior::Isolated, false)?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    )));
    Ok(PreTokenizerSequence::new(steps))
}

/// Typed reads of GGUF metadata whose errors name the file and the key.
struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    fn error(&self, key: &str, message: impl Display) -> ModelError {
        ModelError::File {
            path: self.path.to_path_buf(),
            message: format!("GGUF metadata `{key}`: {message}"),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ModelError {
        self.error(
            key,
            format!("expected {expected}, found {}", describe(found)),
        )
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "a bool", other)),
        }
    }

    fn array(&self, key: &str, expected: &str) -> Result<Option<&'a [Value]>, ModelError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(self.wrong_type(key, expected, other)),
        }
    }

    /// The elements of an array through `read`; the first that does not read is the error.
    fn elements<T>(
        &self,
        key: &str,
        expected: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, ModelError> {
        let Some(items) = self.array(key, expected)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                read(v).ok_or_else(|| {
                    self.error(
                        key,
                        format!("expected {expected}, element {i} is {}", describe(v)),
                    )
                })
            })
            .collect::<Result<Vec<T>, ModelError>>()
            .map(Some)
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ModelError> {
        self.elements(key, "an array of strings", |v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// llama.cpp takes scores as f32 or i32.
    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>, ModelError> {
        self.elements(key, "an array of f32", |v| match v {
            Value::F32(x) => Some(*x),
            Value::I32(x) => Some(*x as f32),
            _ => None,
        })
    }

    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        self.elements(key, "an array of integers", integer)
    }

    /// A token id; one outside the vocab is ignored with a warning, as llama.cpp does.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>, ModelError> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        let id = integer(value).ok_or_else(|| self.wrong_type(key, "an integer", value))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => {
                tracing::warn!(
                    "{}: GGUF metadata `{key}` = {id} is outside the vocab of {n_tokens} tokens; ignored",
                    self.path.display()
                );
                Ok(None)
            }
        }
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(x) => Some(i64::from(x)),
        Value::I8(x) => Some(i64::from(x)),
        Value::U16(x) => Some(i64::from(x)),
        Value::I16(x) => Some(i64::from(x)),
        Value::U32(x) => Some(i64::from(x)),
        Value::I32(x) => Some(i64::from(x)),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Array(items) => match items.first() {
            Some(first) => format!("an array of {}", describe(first)),
            None => "an empty array".to_string(),
        },
        other => format!("{:?}", other.value_type()).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let mut pretokenized = PreTokenizedString::from(text);
        let pre_tokenizer = gpt2_pre_tokenizer(&pre_tokenizer_spec(Some(pre))).unwrap();
        pre_tokenizer.pre_tokenize(&mut pretokenized).unwrap();
        pretokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.replace('\u{120}', " ").replace('\u{10a}', "\n"))
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_as_llama_cpp_regexes_do() {
        assert_eq!(pieces("smollm", "Hi 123!"), ["Hi", " ", "1", "2", "3", "!"]);
        assert_eq!(pieces("qwen2", "Hi 123!"), ["Hi", " ", "1", "2", "3", "!"]);
        assert_eq!(pieces("llama3", "Hi 1234!"), ["Hi", " ", "123", "4", "!"]);
        assert_eq!(
            pieces("gpt2", "don't  stop\n"),
            ["don", "'t", " ", " stop", "\n"]
        );
        assert_eq!(pieces("llama-bpe", "I'M\n\nok"), ["I", "'M", "\n\n", "ok"]);
    }

    #[test]
    fn merges_are_ranked_by_the_merged_tokens_score_then_by_ids() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .map(String::from)
            .to_vec();
        let merges = merges_from_scores(&tokens, &[0.0, 0.0, 0.0, -2.0, -1.0, -3.0]);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(merges, [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]);
    }

    #[test]
    fn merge_lines_split_at_the_first_space_after_the_first_byte() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge(" a b"), Some((" a".into(), "b".into())));
        assert_eq!(split_merge("ab"), None);
    }
}
