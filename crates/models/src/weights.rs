//! Where a model's weights come from: HF safetensors (dense) or a GGUF file (quantized tensors
//! kept quantized). Model files ask for tensors by their HF names (`model.layers.0.self_attn.
//! q_proj`); GGUF names and llama.cpp's layout changes are undone here, so one model file reads
//! both.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Embedding, Linear, RmsNorm};

/// How llama.cpp's converter changed tensors, to undo when reading a GGUF.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufLayout {
    /// llama-architecture GGUFs store q/k rows permuted for llama.cpp's interleaved RoPE:
    /// (query heads, key-value heads) to put them back in HF's order.
    pub permuted_qk: Option<(usize, usize)>,
    /// Gemma 3's GGUF norms live after the attention (`post_attention_norm`) and around the
    /// MLP (`ffn_norm`, `post_ffw_norm`), not where llama's are.
    pub sandwich_norms: bool,
}

enum Source {
    Safetensors(VarBuilder<'static>),
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        layout: GgufLayout,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Safetensors(_) => f.write_str("Safetensors"),
            Self::Gguf { path, layout, .. } => f
                .debug_struct("Gguf")
                .field("path", path)
                .field("layout", layout)
                .finish(),
        }
    }
}

/// A model's tensors, by HF name.
#[derive(Debug)]
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    /// Added to every RMSNorm weight on load: 1 for Gemma's HF checkpoints (which scale by
    /// `1 + w`), so that the model files apply one formula (llama.cpp's converter already adds it).
    norm_offset: f64,
}

impl Weights {
    /// Safetensors files (one, or the shards of an index), memory-mapped.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            source: Source::Safetensors(mmap_safetensors(files, dtype, device)?),
            dtype,
            device: device.clone(),
            norm_offset: 0.0,
        })
    }

    /// Tensors already in memory, by HF name (random-weight models of benchmarks and tests).
    pub fn from_tensors(
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            source: Source::Safetensors(VarBuilder::from_tensors(tensors, dtype, device)),
            dtype,
            device: device.clone(),
            norm_offset: 0.0,
        }
    }

    /// A GGUF file whose metadata was read into `content`.
    pub fn from_gguf(
        path: &Path,
        content: gguf_file::Content,
        layout: GgufLayout,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            source: Source::Gguf {
                path: path.to_path_buf(),
                content,
                layout,
            },
            dtype,
            device: device.clone(),
            norm_offset: 0.0,
        }
    }

    pub fn with_norm_offset(mut self, offset: f64) -> Self {
        self.norm_offset = offset;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    /// Whether a tensor of this HF name exists.
    pub fn contains(&self, hf_name: &str) -> bool {
        match &self.source {
            Source::Safetensors(vb) => vb.contains_tensor(hf_name),
            Source::Gguf {
                content, layout, ..
            } => gguf_name(hf_name, layout)
                .is_some_and(|name| content.tensor_infos.contains_key(&name)),
        }
    }

    /// A dense tensor in the model's dtype.
    pub fn tensor(&self, hf_name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.source {
            Source::Safetensors(vb) => vb.get(shape, hf_name),
            Source::Gguf { .. } => {
                let q = self.qtensor(hf_name, shape)?;
                q.dequantize(&self.device)?.to_dtype(self.dtype)
            }
        }
    }

    /// `prefix.weight` (out, in) and, with `bias`, `prefix.bias` (out).
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        let name = format!("{prefix}.weight");
        match &self.source {
            Source::Safetensors(_) => Ok(Linear::Dense {
                weight: self.tensor(&name, &[out_dim, in_dim])?,
                bias,
            }),
            Source::Gguf { .. } => {
                let q = Arc::new(self.qtensor(&name, &[out_dim, in_dim])?);
                if is_float(q.dtype()) {
                    return Ok(Linear::Dense {
                        weight: q.dequantize(&self.device)?.to_dtype(self.dtype)?,
                        bias,
                    });
                }
                Linear::quantized(q, bias)
            }
        }
    }

    pub fn rms_norm(&self, prefix: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[size])?;
        let weight = if self.norm_offset == 0.0 {
            weight
        } else {
            (weight.to_dtype(DType::F32)? + self.norm_offset)?.to_dtype(self.dtype)?
        };
        Ok(RmsNorm::new(weight, eps))
    }

    pub fn embedding(&self, prefix: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let name = format!("{prefix}.weight");
        match &self.source {
            Source::Safetensors(_) => Ok(Embedding::Dense(self.tensor(&name, &[vocab, hidden])?)),
            Source::Gguf { .. } => {
                let q = self.qtensor(&name, &[vocab, hidden])?;
                if is_float(q.dtype()) || !hidden.is_multiple_of(q.dtype().block_size()) {
                    return Ok(Embedding::Dense(
                        q.dequantize(&self.device)?.to_dtype(self.dtype)?,
                    ));
                }
                Ok(Embedding::Quantized(Arc::new(q)))
            }
        }
    }

    /// A GGUF tensor by HF name, in HF's layout, checked against the expected shape.
    fn qtensor(&self, hf_name: &str, shape: &[usize]) -> Result<QTensor> {
        let Source::Gguf {
            path,
            content,
            layout,
        } = &self.source
        else {
            bail!("{hf_name}: not a GGUF model")
        };
        let Some(name) = gguf_name(hf_name, layout) else {
            bail!(
                "{}: no GGUF tensor corresponds to {hf_name}",
                path.display()
            )
        };
        let mut reader = BufReader::new(
            File::open(path)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?,
        );
        let q = content
            .tensor(&mut reader, &name, &self.device)
            .map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor {name}: {e}", path.display()))
            })?;
        if q.shape().dims() != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, the config implies {shape:?}",
                path.display(),
                q.shape().dims()
            )
        }
        match (layout.permuted_qk, name.rsplit('.').nth(1)) {
            (Some((heads, _)), Some("attn_q")) => unpermute_rows(&q, heads, &self.device),
            (Some((_, kv_heads)), Some("attn_k")) => unpermute_rows(&q, kv_heads, &self.device),
            _ => Ok(q),
        }
    }
}

fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Undo llama.cpp's q/k permutation on the rows of a (possibly quantized) weight: within each
/// head, GGUF row `2i + j` is HF row `j * head_dim / 2 + i`. Rows are whole blocks, so the
/// quantized bytes move as they are.
fn unpermute_rows(q: &QTensor, heads: usize, device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        bail!("cannot unpermute {rows} rows into {heads} heads")
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if data.len() != rows * row_bytes {
        bail!(
            "unexpected tensor size {} for {rows}x{cols} {dtype:?}",
            data.len()
        )
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[gguf * row_bytes..(gguf + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, dtype)?;
    QTensor::new(storage, (rows, cols))
}

/// llama.cpp's name for an HF tensor name.
pub fn gguf_name(hf_name: &str, layout: &GgufLayout) -> Option<String> {
    let (stem, suffix) = hf_name.rsplit_once('.')?;
    let global = match stem {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(name) = global {
        return Some(format!("{name}.{suffix}"));
    }
    let rest = stem.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if layout.sandwich_norms => "post_attention_norm",
        "post_attention_layernorm" | "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.{suffix}"))
}

#[allow(unsafe_code)]
fn mmap_safetensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are weight files opened read-only; as with every mmap, another
    // process truncating them while we run would fault, which is the documented contract of
    // candle's and HF's loaders too.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
}

/// The safetensors files of an HF model folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| {
        format!(
            "{}: no model.safetensors nor a readable model.safetensors.index.json ({e})",
            dir.display()
        )
    })?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
    let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        let plain = GgufLayout::default();
        let gemma = GgufLayout {
            sandwich_norms: true,
            ..plain
        };
        let cases = [
            ("model.embed_tokens.weight", &plain, "token_embd.weight"),
            ("lm_head.weight", &plain, "output.weight"),
            (
                "model.layers.3.self_attn.q_proj.bias",
                &plain,
                "blk.3.attn_q.bias",
            ),
            (
                "model.layers.0.post_attention_layernorm.weight",
                &plain,
                "blk.0.ffn_norm.weight",
            ),
            (
                "model.layers.0.post_attention_layernorm.weight",
                &gemma,
                "blk.0.post_attention_norm.weight",
            ),
            (
                "model.layers.0.pre_feedforward_layernorm.weight",
                &gemma,
                "blk.0.ffn_norm.weight",
            ),
            (
                "model.layers.1.self_attn.k_norm.weight",
                &gemma,
                "blk.1.attn_k_norm.weight",
            ),
        ];
        for (hf, layout, gguf) in cases {
            assert_eq!(gguf_name(hf, layout).as_deref(), Some(gguf), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.0.unknown.weight", &plain), None);
    }

    #[test]
    fn sharded_checkpoints_list_each_shard_once() {
        let dir = tempfile::tempdir().unwrap();
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let files = safetensors_files(dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .filter_map(|f| f.file_name()?.to_str())
            .collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let empty = tempfile::tempdir().unwrap();
        let error = safetensors_files(empty.path()).unwrap_err();
        assert!(error.contains("no model.safetensors"), "{error}");
    }

    #[test]
    fn unpermuting_undoes_llama_cpp_permutation() -> Result<()> {
        let device = Device::Cpu;
        // 2 heads of dim 4, 3 columns; the converter's permute: reshape(h, 2, d/2, c).swap(1, 2)
        let (heads, d, cols) = (2usize, 4usize, 3usize);
        let hf: Vec<f32> = (0..heads * d * cols).map(|v| v as f32).collect();
        let hf = Tensor::from_vec(hf, (heads * d, cols), &device)?;
        let permuted = hf
            .reshape((heads, 2, d / 2, cols))?
            .transpose(1, 2)?
            .reshape((heads * d, cols))?;
        let q = QTensor::quantize(&permuted, GgmlDType::F32)?;
        let back = unpermute_rows(&q, heads, &device)?.dequantize(&device)?;
        let diff = (back - hf)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
