//! Token ids to streamed text, one token at a time.
//!
//! Decoding each token alone is wrong twice over: a character outside ASCII may be split over
//! several byte-fallback tokens (`<0xC3>` `<0xA9>` is "é"), and SentencePiece decoders drop the
//! leading space of the text they decode, so " world" alone comes out as "world". The standard
//! fix (HF text-generation-inference, vLLM) decodes a short window twice, with and without the
//! new token, and emits the difference once it does not end in U+FFFD, the replacement
//! character that an incomplete UTF-8 sequence decodes to.

use crate::error::Result;

/// Turns token ids into text, as a tokenizer's `decode` does.
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

impl Decode for medcoder_models::ModelTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(medcoder_models::ModelTokenizer::decode(self, ids)?)
    }
}

impl<F> Decode for F
where
    F: Fn(&[u32]) -> Result<String>,
{
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self(ids)
    }
}

/// Emits the text of a growing sequence of tokens, only ever complete characters.
///
/// It keeps the ids from `prefix_offset` on: those before `read_offset` have been emitted and
/// are decoded again only as context for the ones after.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts after `context` (say the last few prompt tokens), which is never emitted but
    /// decoded with the first tokens so that their leading space is kept.
    pub fn with_context(context: &[u32]) -> Self {
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one token and returns the new complete text, empty while a character is
    /// incomplete.
    pub fn push<D: Decode + ?Sized>(&mut self, decoder: &D, token_id: u32) -> Result<String> {
        self.ids.push(token_id);
        let prefix = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decoder.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        // Not a character boundary: the window decodes differently with the new token; wait.
        let Some(new_text) = full.get(prefix.len()..) else {
            return Ok(String::new());
        };
        let new_text = new_text.to_string();
        // The emitted tokens become the next window's context; older ones are not needed.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(new_text)
    }

    /// The text not emitted yet, at the end of generation: an incomplete character comes out
    /// as U+FFFD, as a plain decode of the whole output would give it.
    pub fn finish<D: Decode + ?Sized>(&mut self, decoder: &D) -> Result<String> {
        let prefix = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decoder.decode(&self.ids[self.prefix_offset..])?;
        // Round down to a character boundary rather than lose text.
        let mut from = prefix.len().min(full.len());
        while !full.is_char_boundary(from) {
            from -= 1;
        }
        let rest = full[from..].to_string();
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::error::InferError;

    /// Word tokens after the 256 byte-fallback tokens; "▁" is SentencePiece's space.
    const WORDS: [&str; 4] = ["▁Hello", "▁world", "!", "▁é"];
    const HELLO: u32 = 256;
    const WORLD: u32 = 257;
    const BANG: u32 = 258;

    /// A SentencePiece-like decoder: ids below 256 are bytes, the rest [`WORDS`]; invalid
    /// UTF-8 becomes U+FFFD and one leading space is dropped.
    fn fake_decode(ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                _ => {
                    let word = WORDS.get(id as usize - 256);
                    let word = word.ok_or_else(|| InferError::Decode(format!("no token {id}")))?;
                    bytes.extend_from_slice(word.replace('▁', " ").as_bytes());
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        Ok(text.strip_prefix(' ').unwrap_or(&text).to_string())
    }

    fn byte_ids(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn push_all(decoder: &mut IncrementalDecoder, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| decoder.push(&fake_decode, id).unwrap())
            .collect()
    }

    #[test]
    fn a_character_split_over_byte_tokens_comes_out_whole() {
        let mut decoder = IncrementalDecoder::new();
        let ids = byte_ids("é😀a");
        let pieces = push_all(&mut decoder, &ids);
        assert_eq!(pieces, vec!["", "é", "", "", "", "😀", "a"]);
        assert_eq!(decoder.finish(&fake_decode).unwrap(), "");
    }

    #[test]
    fn leading_spaces_survive_between_words() {
        let mut decoder = IncrementalDecoder::new();
        let pieces = push_all(&mut decoder, &[HELLO, WORLD, BANG, WORLD]);
        assert_eq!(pieces, vec!["Hello", " world", "!", " world"]);
    }

    #[test]
    fn context_keeps_the_first_leading_space_and_is_not_emitted() {
        let mut decoder = IncrementalDecoder::with_context(&[HELLO]);
        assert_eq!(push_all(&mut decoder, &[WORLD]), vec![" world"]);
    }

    #[test]
    fn finish_emits_an_incomplete_character_as_a_replacement() {
        let mut decoder = IncrementalDecoder::new();
        assert_eq!(push_all(&mut decoder, &[HELLO, 0xC3]), vec!["Hello", ""]);
        assert_eq!(decoder.finish(&fake_decode).unwrap(), "\u{FFFD}");
        assert_eq!(decoder.finish(&fake_decode).unwrap(), "");
    }

    #[test]
    fn decode_errors_are_returned() {
        let mut decoder = IncrementalDecoder::new();
        let result = decoder.push(&fake_decode, 999);
        assert!(matches!(result, Err(InferError::Decode(_))), "{result:?}");
    }

    /// Text as byte tokens with some word tokens between.
    fn token_ids() -> impl Strategy<Value = Vec<u32>> {
        let chunk = prop_oneof![
            "[a é€😀\n]{1,3}".prop_map(|s: String| byte_ids(&s)),
            (256u32..260).prop_map(|id| vec![id]),
        ];
        prop::collection::vec(chunk, 0..20).prop_map(|chunks| chunks.concat())
    }

    proptest! {
        #[test]
        fn pieces_add_up_to_the_whole_decode(context in token_ids(), ids in token_ids()) {
            let mut decoder = IncrementalDecoder::with_context(&context);
            let mut text = fake_decode(&context).unwrap();
            for &id in &ids {
                let piece = decoder.push(&fake_decode, id).unwrap();
                prop_assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
                text.push_str(&piece);
            }
            text.push_str(&decoder.finish(&fake_decode).unwrap());
            let ids = [context, ids].concat();
            prop_assert_eq!(text, fake_decode(&ids).unwrap());
        }
    }
}
