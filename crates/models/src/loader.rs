//! Loading a model from an HF folder (config.json + safetensors) or a GGUF file, with its
//! tokenizer, chat template and stop tokens.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use medcoder_assets::ResolvedModel;
use serde::Deserialize;
use serde_json::Value;

use crate::error::CandleContext;
use crate::families::{gemma3, llama, qwen2, qwen3, GgufMeta, TokenIds};
use crate::transformer::{CausalLm, Spec};
use crate::weights::{safetensors_files, GgufLayout, Weights};
use crate::{ModelError, ModelTokenizer};

/// The model families medcoder has files for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Family {
    /// From config.json's `model_type` or GGUF's `general.architecture`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "gemma3" | "gemma3_text" => Some(Self::Gemma3),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// Where a model runs: `auto`, `cpu`, `cuda:N` (`cuda` = `cuda:0`) or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{other}`: use auto, cpu, cuda:N or metal")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// The candle device; `auto` takes CUDA, then Metal, when built in and present, else CPU.
    pub fn device(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n)
                .ctx(|| format!("opening cuda:{n} (is medcoder built with `--features cuda`?)")),
            Self::Metal => Device::new_metal(0)
                .ctx(|| "opening metal (is medcoder built with `--features metal`?)".into()),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(device) = Device::new_cuda(0) {
                        return Ok(device);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(device) = Device::new_metal(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The activations' dtype for a device: f32 on CPU, bf16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// A model ready to run: the network, its tokenizer and what generation needs to know.
#[derive(Debug)]
pub struct LoadedModel {
    pub lm: CausalLm,
    pub family: Family,
    pub tokenizer: ModelTokenizer,
    /// Tokens that end a generation (EOS, end-of-turn).
    pub stop_token_ids: Vec<u32>,
    /// The weights file or folder it came from.
    pub source: PathBuf,
    /// Whether the weights are kept quantized (GGUF).
    pub quantized: bool,
}

/// Load a model and its tokenizer onto `device`; `dtype` defaults to [`default_dtype`]
/// (quantized GGUF weights always run with f32 activations on CPU).
pub fn load_model(
    model: &ResolvedModel,
    device: &Device,
    dtype: Option<DType>,
) -> Result<LoadedModel, ModelError> {
    let dtype = dtype.unwrap_or_else(|| default_dtype(device));
    let (lm, family, mut stop_token_ids, source, quantized, tokenizer) = match &model.file {
        Some(file) if file.extension().is_some_and(|e| e == "gguf") => {
            // The GGUF's metadata is read once, for the model and (unless a tokenizer.json
            // lies beside it) the tokenizer.
            let content = read_gguf(file)?;
            let tokenizer = if model.dir.join("tokenizer.json").is_file() {
                ModelTokenizer::from_dir(&model.dir)?
            } else {
                ModelTokenizer::from_gguf_metadata(&content.metadata, file)?
            };
            let (lm, family, stops) = gguf_model(file, content, device, dtype)?;
            (lm, family, stops, file.clone(), true, tokenizer)
        }
        _ => {
            let tokenizer = ModelTokenizer::load(model)?;
            let (lm, family, stops) = load_hf_dir(&model.dir, device, dtype)?;
            (lm, family, stops, model.dir.clone(), false, tokenizer)
        }
    };
    for token in tokenizer.eos_token.iter() {
        if let Some(id) = tokenizer.token_to_id(token) {
            stop_token_ids.push(id);
        }
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    Ok(LoadedModel {
        lm,
        family,
        tokenizer,
        stop_token_ids,
        source,
        quantized,
    })
}

#[derive(Deserialize)]
struct ModelTypeOnly {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
}

/// An HF model folder: config.json, safetensors, generation_config.json.
pub fn load_hf_dir(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(CausalLm, Family, Vec<u32>), ModelError> {
    let config_path = dir.join("config.json");
    let text = fs_err::read_to_string(&config_path)?;
    let file_error = |message: String| ModelError::File {
        path: config_path.clone(),
        message,
    };
    let kind: ModelTypeOnly =
        serde_json::from_str(&text).map_err(|e| file_error(format!("invalid JSON: {e}")))?;
    let model_type = kind.model_type.unwrap_or_default();
    let family = Family::from_name(&model_type).ok_or_else(|| {
        file_error(format!(
            "model_type `{model_type}` ({}) is not supported: llama, qwen2, qwen3 and gemma3 are",
            kind.architectures.unwrap_or_default().join(", ")
        ))
    })?;
    fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
    let (spec, eos, norm_offset): (Result<Spec, String>, Option<TokenIds>, f64) = match family {
        Family::Llama => {
            let c: llama::Config = parse(&text).map_err(file_error)?;
            (c.spec(), c.eos_token_id, 0.0)
        }
        Family::Qwen2 => {
            let c: qwen2::Config = parse(&text).map_err(file_error)?;
            (c.spec(), c.eos_token_id, 0.0)
        }
        Family::Qwen3 => {
            let c: qwen3::Config = parse(&text).map_err(file_error)?;
            (c.spec(), c.eos_token_id, 0.0)
        }
        Family::Gemma3 => {
            if text.contains("\"text_config\"") {
                return Err(file_error(
                    "a multimodal Gemma 3 checkpoint: only the text model (Gemma3ForCausalLM) is supported".into(),
                ));
            }
            let c: gemma3::Config = parse(&text).map_err(file_error)?;
            (c.spec(), c.eos_token_id, 1.0)
        }
    };
    let spec = spec.map_err(file_error)?;
    let files = safetensors_files(dir).map_err(|message| ModelError::File {
        path: dir.to_path_buf(),
        message,
    })?;
    let weights = Weights::from_safetensors(&files, dtype, device)
        .ctx(|| format!("{}: reading safetensors", dir.display()))?
        .with_norm_offset(norm_offset);
    let lm =
        CausalLm::new(spec, &weights).ctx(|| format!("{}: building the model", dir.display()))?;
    let mut stops = eos.map(|e| e.to_vec()).unwrap_or_default();
    stops.extend(generation_config_eos(dir)?);
    Ok((lm, family, stops))
}

/// `eos_token_id` of generation_config.json, which may list more stop tokens than config.json.
fn generation_config_eos(dir: &Path) -> Result<Vec<u32>, ModelError> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let value: Value =
        serde_json::from_str(&fs_err::read_to_string(&path)?).map_err(|e| ModelError::File {
            path: path.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
    Ok(match value.get("eos_token_id") {
        Some(v) => serde_json::from_value::<TokenIds>(v.clone())
            .map(|ids| ids.to_vec())
            .unwrap_or_default(),
        None => Vec::new(),
    })
}

/// A GGUF file's metadata and tensor index, with the file named in errors.
pub fn read_gguf(path: &Path) -> Result<gguf_file::Content, ModelError> {
    let mut reader = std::io::BufReader::new(fs_err::File::open(path)?);
    gguf_file::Content::read(&mut reader).map_err(|e| ModelError::File {
        path: path.to_path_buf(),
        message: format!("not a readable GGUF file: {e}"),
    })
}

/// A GGUF file: metadata → config, tensors kept quantized.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(CausalLm, Family, Vec<u32>), ModelError> {
    gguf_model(path, read_gguf(path)?, device, dtype)
}

/// The model of a GGUF file whose metadata was read into `content`.
fn gguf_model(
    path: &Path,
    content: gguf_file::Content,
    device: &Device,
    dtype: DType,
) -> Result<(CausalLm, Family, Vec<u32>), ModelError> {
    let file_error = |message: String| ModelError::File {
        path: path.to_path_buf(),
        message,
    };
    let meta = GgufMeta::new(&content).map_err(file_error)?;
    let family = Family::from_name(&meta.arch).ok_or_else(|| {
        file_error(format!(
            "architecture `{}` is not supported: llama, qwen2, qwen3 and gemma3 are",
            meta.arch
        ))
    })?;
    let (spec, layout) = match family {
        Family::Llama => {
            let c = llama::Config::from_gguf(&meta).map_err(file_error)?;
            let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
            let layout = GgufLayout {
                permuted_qk: Some((c.num_attention_heads, kv)),
                sandwich_norms: false,
            };
            (c.spec(), layout)
        }
        Family::Qwen2 => (
            qwen2::Config::from_gguf(&meta).map_err(file_error)?.spec(),
            GgufLayout::default(),
        ),
        Family::Qwen3 => (
            qwen3::Config::from_gguf(&meta).map_err(file_error)?.spec(),
            GgufLayout::default(),
        ),
        Family::Gemma3 => (
            gemma3::Config::from_gguf(&meta).map_err(file_error)?.spec(),
            GgufLayout {
                permuted_qk: None,
                sandwich_norms: true,
            },
        ),
    };
    let mut spec = spec.map_err(file_error)?;
    spec.rope_scaling = match meta.rope_scaling().map_err(file_error)? {
        crate::layers::RopeScaling::None => spec.rope_scaling,
        scaling => scaling,
    };
    let stops: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|key| content.metadata.get(*key).and_then(|v| v.to_u32().ok()))
        .collect();
    // Quantized matmuls take f32 activations on CPU.
    let dtype = if device.is_cpu() { DType::F32 } else { dtype };
    let weights = Weights::from_gguf(path, content, layout, dtype, device);
    let lm =
        CausalLm::new(spec, &weights).ctx(|| format!("{}: building the model", path.display()))?;
    Ok((lm, family, stops))
}
