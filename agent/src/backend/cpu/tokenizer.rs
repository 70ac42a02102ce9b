//! Tokenizers for the cpu backend: `tokenizer.json` beside the weights, or
//! one rebuilt from a GGUF file's `tokenizer.ggml.*` metadata (GPT-2 style
//! byte-level BPE, as SmolLM2, Llama 3 and Qwen ship).

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// Token types in `tokenizer.ggml.token_type` (llama.cpp's enum).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

fn strings(v: &Value) -> Option<Vec<String>> {
    v.to_vec()
        .ok()?
        .iter()
        .map(|s| s.to_string().ok().cloned())
        .collect()
}

/// Builds the tokenizer described by a GGUF file, or says why it cannot.
pub fn from_gguf(content: &Content) -> Result<Tokenizer, String> {
    let md = &content.metadata;
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or("the GGUF file has no tokenizer (tokenizer.ggml.model)")?;
    if model != "gpt2" {
        return Err(format!(
            "GGUF tokenizer model {model:?} is not supported (only byte-level BPE \"gpt2\"); send input_ids instead of text"
        ));
    }
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(strings)
        .ok_or("tokenizer.ggml.tokens is missing or not a string array")?;
    let merges = md
        .get("tokenizer.ggml.merges")
        .and_then(strings)
        .ok_or("tokenizer.ggml.merges is missing or not a string array")?;
    let types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let pre: Vec<PreTokenizerWrapper> = vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ];
    tok.with_pre_tokenizer(Some(Sequence::new(pre)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(
                types.get(*i),
                Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)
            )
        })
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}

/// Turns tokens into text pieces as they arrive, holding back incomplete
/// UTF-8 (byte-level BPE splits characters across tokens).
pub struct IncrementalDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        IncrementalDecoder {
            tok,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The new text that `id` completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)
            .unwrap_or_default();
        let full = self
            .tok
            .decode(&self.ids[self.prefix_offset..], true)
            .unwrap_or_default();
        if full.len() > prefix.len()
            && !full.ends_with('\u{fffd}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            piece
        } else {
            String::new()
        }
    }
}
