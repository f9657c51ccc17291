//! A model written as a GGUF file the way llama.cpp's converter and `llama-quantize` lay it out:
//! its tensor names (`blk.N.attn_q.weight`, …), the `<arch>.*` metadata keys our loader and
//! llama.cpp read, llama's q/k rows permuted for the interleaved RoPE, Gemma's norms as `1 + w`
//! (the convention our model files already hold them in), and one of three weight types:
//! f16, q8_0, or llama.cpp's Q4_K_M mix.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::CandleContext;
use crate::layers::RopeScaling;
use crate::loader::Family;
use crate::transformer::Spec;
use crate::weights::{gguf_name, GgufLayout};
use crate::ModelError;

/// The weight types of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportQuant {
    F16,
    Q8_0,
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K where the model is most sensitive.
    Q4KM,
}

impl std::str::FromStr for ExportQuant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_k_m" => Ok(Self::Q4KM),
            other => Err(format!("quantization `{other}`: use f16, q8_0 or q4_k_m")),
        }
    }
}

impl ExportQuant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }
}

/// One tensor as written: its GGUF name, the type asked for and the type written (they differ
/// when the row length is not a multiple of the asked type's block).
#[derive(Debug, Clone, Serialize)]
pub struct TensorChoice {
    pub name: String,
    pub shape: Vec<usize>,
    pub wanted: String,
    pub written: String,
}

impl TensorChoice {
    pub fn fell_back(&self) -> bool {
        self.wanted != self.written
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one
/// between, get more bits in the `_M` mixes.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer index of `blk.N.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The type llama.cpp picks for a matrix of the Q4_K_M mix (`llama_tensor_get_type`, for the
/// dense architectures we export): the output head (or the embeddings when they are tied and so
/// serve as the head) in Q6_K; attn_v and ffn_down in Q6_K in the layers `use_more_bits` picks;
/// everything else Q4_K.
fn q4_k_m_type(name: &str, layers: usize, tied: bool) -> GgmlDType {
    if name == "output.weight" || (tied && name == "token_embd.weight") {
        return GgmlDType::Q6K;
    }
    let sensitive = name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight");
    match layer_of(name) {
        Some(i) if sensitive && use_more_bits(i, layers) => GgmlDType::Q6K,
        _ => GgmlDType::Q4K,
    }
}

/// llama.cpp's fallback when rows do not split into blocks of the type (Q4_K → Q5_0,
/// Q6_K → Q8_0), then f16 when even 32-wide blocks do not fit.
fn fitting_type(wanted: GgmlDType, row: usize) -> GgmlDType {
    let mut dtype = wanted;
    if !row.is_multiple_of(dtype.block_size()) {
        dtype = match dtype {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
    }
    if !row.is_multiple_of(dtype.block_size()) {
        dtype = GgmlDType::F16;
    }
    dtype
}

fn dtype_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_ascii_lowercase()
}

/// Named GGUF tensors, in the order they are written.
pub type GgufTensors = Vec<(String, QTensor)>;

/// llama.cpp's converter permutes llama's q/k rows for its interleaved RoPE.
fn permute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
}

/// The tensors of a model, by the HF names our model files use (as
/// `CausalLm::visit_parameters_mut` gives them: Gemma's norms already `1 + w`), as GGUF tensors
/// of `quant`; 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them.
pub fn gguf_tensors(
    family: Family,
    spec: &Spec,
    tensors: &HashMap<String, Tensor>,
    quant: ExportQuant,
) -> Result<(GgufTensors, Vec<TensorChoice>), ModelError> {
    let layout = GgufLayout {
        permuted_qk: None,
        sandwich_norms: family == Family::Gemma3,
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut written = Vec::with_capacity(names.len());
    let mut choices = Vec::with_capacity(names.len());
    for hf in names {
        let name = gguf_name(hf, &layout).ok_or_else(|| {
            ModelError::Unsupported(format!("export: no GGUF name for the tensor `{hf}`"))
        })?;
        let what = || format!("export: tensor `{hf}`");
        let mut t = tensors[hf].to_dtype(DType::F32).ctx(what)?;
        if family == Family::Llama && name.ends_with("attn_q.weight") {
            t = permute_rows(&t, spec.num_heads).ctx(what)?;
        }
        if family == Family::Llama && name.ends_with("attn_k.weight") {
            t = permute_rows(&t, spec.num_kv_heads).ctx(what)?;
        }
        let wanted = if t.rank() < 2 {
            GgmlDType::F32
        } else {
            match quant {
                ExportQuant::F16 => GgmlDType::F16,
                ExportQuant::Q8_0 => GgmlDType::Q8_0,
                ExportQuant::Q4KM => q4_k_m_type(&name, spec.num_layers, spec.tie_word_embeddings),
            }
        };
        let row = t.dims().last().copied().unwrap_or(0);
        let dtype = fitting_type(wanted, row);
        choices.push(TensorChoice {
            name: name.clone(),
            shape: t.dims().to_vec(),
            wanted: dtype_name(wanted),
            written: dtype_name(dtype),
        });
        written.push((name, QTensor::quantize(&t, dtype).ctx(what)?));
    }
    Ok((written, choices))
}

/// The `general.*` and `<arch>.*` keys of a model, as llama.cpp's converter writes them.
pub fn model_metadata(
    family: Family,
    spec: &Spec,
    name: &str,
    quant: ExportQuant,
) -> Result<Vec<(String, Value)>, ModelError> {
    let arch = family.as_str();
    let u32_of = |n: usize| Value::U32(n as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let mut arch_key = |key: &str, value: Value| meta.push((format!("{arch}.{key}"), value));
    arch_key("context_length", u32_of(spec.max_position_embeddings));
    arch_key("embedding_length", u32_of(spec.hidden_size));
    arch_key("block_count", u32_of(spec.num_layers));
    arch_key("feed_forward_length", u32_of(spec.intermediate_size));
    arch_key("attention.head_count", u32_of(spec.num_heads));
    arch_key("attention.head_count_kv", u32_of(spec.num_kv_heads));
    arch_key("attention.key_length", u32_of(spec.head_dim));
    arch_key("attention.value_length", u32_of(spec.head_dim));
    arch_key(
        "attention.layer_norm_rms_epsilon",
        Value::F32(spec.rms_norm_eps as f32),
    );
    arch_key("rope.freq_base", Value::F32(spec.rope_theta as f32));
    arch_key("vocab_size", u32_of(spec.vocab_size));
    if family == Family::Llama {
        arch_key("rope.dimension_count", u32_of(spec.head_dim));
    }
    match &spec.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            arch_key("rope.scaling.type", Value::String("linear".into()));
            arch_key("rope.scaling.factor", Value::F32(*factor as f32));
        }
        RopeScaling::Llama3 { .. } => {
            // llama.cpp stores Llama 3's scaling as a `rope_freqs` tensor, which neither this
            // export nor our GGUF loader handles yet.
            return Err(ModelError::Unsupported(
                "export: Llama 3 RoPE scaling (rope_freqs) is not supported yet".into(),
            ));
        }
    }
    if family == Family::Gemma3 {
        let window = spec.sliding_windows.iter().flatten().next().copied();
        let pattern = spec
            .sliding_windows
            .iter()
            .position(Option::is_none)
            .map_or(spec.num_layers, |i| i + 1);
        arch_key(
            "attention.sliding_window",
            u32_of(window.unwrap_or(spec.max_position_embeddings)),
        );
        arch_key("attention.sliding_window_pattern", u32_of(pattern));
        arch_key(
            "rope.local.freq_base",
            Value::F32(spec.rope_local_theta.unwrap_or(10_000.0) as f32),
        );
        if let Some(scale) = spec.attention_scale {
            arch_key("attention.scale", Value::F32(scale as f32));
        }
        if let Some(cap) = spec.final_logit_softcapping {
            arch_key("final_logit_softcapping", Value::F32(cap as f32));
        }
    }
    Ok(meta)
}

/// The GGUF version written: 3, as llama.cpp's converter writes.
pub const GGUF_VERSION: u32 = 3;

/// Write a GGUF file: `metadata` then `tensors`, each tensor's data aligned to 32 bytes (GGUF's
/// default `general.alignment`).
///
/// candle's writer lays the file out as GGUF v3 does (v3 differs from v2 only in allowing
/// big-endian files, and this one is little-endian) but stamps it version 2; the version field
/// is rewritten to 3 afterwards.
pub fn write_gguf(
    writer: &mut (impl std::io::Write + std::io::Seek),
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<(), ModelError> {
    use std::io::SeekFrom;
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let start = writer.stream_position()?;
    candle_core::quantized::gguf_file::write(writer, &meta, &tensors)
        .ctx(|| "writing the GGUF file".into())?;
    let end = writer.stream_position()?;
    writer.seek(SeekFrom::Start(start + 4))?;
    writer.write_all(&GGUF_VERSION.to_le_bytes())?;
    writer.seek(SeekFrom::Start(end))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        // 32 layers: 0..4, 28..32 and every third layer from 6.
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(q4_k_m_type("output.weight", 32, false), GgmlDType::Q6K);
        assert_eq!(q4_k_m_type("token_embd.weight", 32, false), GgmlDType::Q4K);
        assert_eq!(q4_k_m_type("token_embd.weight", 32, true), GgmlDType::Q6K);
        assert_eq!(
            q4_k_m_type("blk.6.ffn_down.weight", 32, false),
            GgmlDType::Q6K
        );
        assert_eq!(
            q4_k_m_type("blk.7.ffn_down.weight", 32, false),
            GgmlDType::Q4K
        );
        assert_eq!(
            q4_k_m_type("blk.0.attn_q.weight", 32, false),
            GgmlDType::Q4K
        );
    }

    #[test]
    fn files_are_gguf_v3_with_32_byte_aligned_tensor_data() {
        let device = candle_core::Device::Cpu;
        let odd = Tensor::arange(0f32, 7.0, &device).unwrap();
        let matrix = Tensor::ones((4, 32), DType::F32, &device).unwrap();
        let tensors = vec![
            (
                "a".to_string(),
                QTensor::quantize(&odd, GgmlDType::F32).unwrap(),
            ),
            (
                "b".to_string(),
                QTensor::quantize(&matrix, GgmlDType::Q8_0).unwrap(),
            ),
        ];
        let meta = vec![("general.name".to_string(), Value::String("x".into()))];
        let mut file = std::io::Cursor::new(Vec::new());
        write_gguf(&mut file, &meta, &tensors).unwrap();
        let bytes = file.into_inner();
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
                .unwrap();
        assert_eq!(content.tensor_data_offset % 32, 0);
        for info in content.tensor_infos.values() {
            assert_eq!(info.offset % 32, 0);
        }
        assert_eq!(content.tensor_infos["b"].ggml_dtype, GgmlDType::Q8_0);
    }

    #[test]
    fn rows_that_do_not_fit_a_block_fall_back_as_llama_cpp_does() {
        assert_eq!(fitting_type(GgmlDType::Q4K, 4096), GgmlDType::Q4K);
        assert_eq!(fitting_type(GgmlDType::Q4K, 64), GgmlDType::Q5_0);
        assert_eq!(fitting_type(GgmlDType::Q6K, 64), GgmlDType::Q8_0);
        assert_eq!(fitting_type(GgmlDType::Q8_0, 48), GgmlDType::F16);
    }
}
