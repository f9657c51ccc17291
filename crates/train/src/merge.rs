//! `medcoder merge`: fold a LoRA adapter into its base and write a full model in HF's layout
//! (model.safetensors in 16 bits, config.json, tokenizer files), which transformers, vLLM and
//! our own loader read like any checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use medcoder_models::hf_config::hf_config_json;
use medcoder_models::lora::{apply_peft_adapter, merge_adapters};
use medcoder_models::LoadedModel;
use serde::Serialize;

use crate::TrainError;

/// Tokenizer and generation files copied from an HF base folder.
const BASE_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub out: PathBuf,
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub modules_merged: usize,
    pub tensors: usize,
    pub dtype: String,
    pub bytes: u64,
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Merge `adapter` into `model` and write the result into `out` (replaced as a whole: the
/// folder is written beside it and renamed into place).
pub fn merge_to_hf(
    mut model: LoadedModel,
    adapter: &Path,
    out: &Path,
    dtype: DType,
) -> Result<MergeReport, TrainError> {
    model.lm.dequantize()?;
    apply_peft_adapter(&mut model.lm, adapter)?;
    let modules_merged = merge_adapters(&mut model.lm)?;
    let offset = model.lm.spec().hf_norm_offset;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    model.lm.visit_parameters_mut(|name, tensor| {
        if tensors.contains_key(name) {
            return Ok(());
        }
        let saved = if offset != 0.0 && name.ends_with("norm.weight") {
            tensor.to_dtype(DType::F32)?.affine(1.0, -offset)?
        } else {
            tensor.clone()
        };
        tensors.insert(name.to_string(), saved.to_dtype(dtype)?);
        Ok(())
    })?;
    let parent = out.parent().unwrap_or(Path::new("."));
    fs_err::create_dir_all(parent)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    let temp = parent.join(format!(".{name}.partial"));
    if temp.exists() {
        fs_err::remove_dir_all(&temp)?;
    }
    fs_err::create_dir_all(&temp)?;
    crate::atomic::write_safetensors(&temp.join("model.safetensors"), &tensors)?;
    let base_dir = if model.source.is_dir() {
        Some(model.source.clone())
    } else {
        None
    };
    match &base_dir {
        Some(dir) => {
            let text = fs_err::read_to_string(dir.join("config.json"))?;
            let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                TrainError::Data(format!("{}: {e}", dir.join("config.json").display()))
            })?;
            if let Some(map) = config.as_object_mut() {
                map.insert("torch_dtype".into(), dtype_name(dtype).into());
                map.remove("quantization_config");
            }
            write_json(&temp.join("config.json"), &config)?;
            for file in BASE_FILES {
                let from = dir.join(file);
                if from.is_file() {
                    fs_err::copy(&from, temp.join(file))?;
                }
            }
        }
        None => {
            let tokenizer = &model.tokenizer;
            let bos = tokenizer
                .bos_token
                .as_deref()
                .and_then(|t| tokenizer.token_to_id(t));
            let config = hf_config_json(
                model.family,
                model.lm.spec(),
                bos,
                &model.stop_token_ids,
                dtype_name(dtype),
            );
            write_json(&temp.join("config.json"), &config)?;
            let content = medcoder_models::loader::read_gguf(&model.source)?;
            medcoder_models::hf_tokenizer_export::write_hf_tokenizer(
                &content.metadata,
                &model.source,
                &temp,
            )?;
        }
    }
    let record = serde_json::json!({
        "base": model.source,
        "adapter": adapter,
        "dtype": dtype_name(dtype),
        "modules_merged": modules_merged,
        "adapter_config": serde_json::from_str::<serde_json::Value>(
            &fs_err::read_to_string(adapter.join("adapter_config.json"))?
        ).unwrap_or_default(),
    });
    write_json(&temp.join("merge_config.json"), &record)?;
    if out.exists() {
        let old = parent.join(format!(".{name}.old"));
        if old.exists() {
            fs_err::remove_dir_all(&old)?;
        }
        fs_err::rename(out, &old)?;
        fs_err::rename(&temp, out)?;
        fs_err::remove_dir_all(&old)?;
    } else {
        fs_err::rename(&temp, out)?;
    }
    crate::atomic::sync_dir(parent);
    let bytes = fs_err::metadata(out.join("model.safetensors"))?.len();
    Ok(MergeReport {
        out: out.to_path_buf(),
        base: model.source,
        adapter: adapter.to_path_buf(),
        modules_merged,
        tensors: tensors.len(),
        dtype: dtype_name(dtype).into(),
        bytes,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    crate::atomic::write_file(path, text.as_bytes())
}
