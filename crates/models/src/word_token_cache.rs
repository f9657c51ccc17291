//! Token ids remembered per word, for the static embedder: a text's ids are then found by
//! splitting it at whitespace and looking its words up, instead of running the tokenizer's
//! whole pipeline (added-token extraction, normalisation, pre-tokenisation, WordPiece) over
//! every sentence again. Notes repeat their words; the tokenizer took 8 % of coding a note.
//!
//! Exact only where a text's ids are its whitespace-separated words' ids one after another:
//! BERT's normaliser works character by character (whitespace stays whitespace), its
//! pre-tokeniser splits at whitespace first, WordPiece works within a word, and no added
//! token strips or spans whitespace. [`WordTokenCache::for_tokenizer`] checks exactly that
//! and gives no cache for any other tokenizer.

use std::collections::HashMap;
use std::sync::RwLock;

use tokenizers::{ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

/// Words remembered at most (~30 MB); words met after that are tokenised each time.
const MAX_WORDS: usize = 200_000;

#[derive(Debug, Default)]
pub(crate) struct WordTokenCache {
    words: RwLock<HashMap<Box<str>, Box<[u32]>>>,
}

impl WordTokenCache {
    /// A cache where the tokenizer's ids of a text are its words' ids in order (BERT-style
    /// WordPiece); `None` for any other tokenizer.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        let bert_normalizer = matches!(
            tokenizer.get_normalizer(),
            Some(NormalizerWrapper::BertNormalizer(_))
        );
        let bert_pre_tokenizer = matches!(
            tokenizer.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::BertPreTokenizer(_))
        );
        let word_piece = matches!(tokenizer.get_model(), ModelWrapper::WordPiece(_));
        let added_within_words = tokenizer
            .get_added_tokens_decoder()
            .values()
            .all(|t| !t.lstrip && !t.rstrip && !t.content.chars().any(char::is_whitespace));
        (bert_normalizer && bert_pre_tokenizer && word_piece && added_within_words)
            .then(Self::default)
    }

    /// Appends the ids of `text` (no special tokens added) to `ids`.
    pub fn ids(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        ids: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        let mut missing: Vec<(&str, Box<[u32]>)> = Vec::new();
        {
            let words = self.words.read().unwrap_or_else(|e| e.into_inner());
            for word in text.split_whitespace() {
                match words.get(word) {
                    Some(known) => ids.extend_from_slice(known),
                    None => {
                        let found: Box<[u32]> = tokenizer.encode(word, false)?.get_ids().into();
                        ids.extend_from_slice(&found);
                        missing.push((word, found));
                    }
                }
            }
        }
        if !missing.is_empty() {
            let mut words = self.words.write().unwrap_or_else(|e| e.into_inner());
            for (word, found) in missing {
                if words.len() >= MAX_WORDS {
                    break;
                }
                words.insert(word.into(), found);
            }
        }
        Ok(())
    }
}
