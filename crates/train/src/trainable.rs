//! What a run trains: LoRA adapters on the chosen layers (on a dense or a quantized base), or
//! every weight. The trainable tensors are candle `Var`s named as they are saved: PEFT's
//! adapter tensor names, or HF's weight names for full fine-tuning.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor, Var};
use medcoder_models::layers::Linear;
use medcoder_models::lora::{
    lora_scale, peft_tensor_name, LoraDropout, LoraLinear, PeftAdapterConfig,
};
use medcoder_models::nf4::Nf4Tensor;
use medcoder_models::CausalLm;

use crate::config::{BaseQuant, LoraSettings, Method, TrainConfig};
use crate::TrainError;

/// The linear layers of a block, as PEFT's `all-linear` expands them.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The trainable tensors of a run and how they are saved.
#[derive(Debug)]
pub struct Trainable {
    pub method: Method,
    /// (name, variable) in a fixed order.
    pub vars: Vec<(String, Var)>,
    /// LoRA: the adapter config written beside the weights.
    pub adapter: Option<PeftAdapterConfig>,
    pub dropout: Option<Arc<LoraDropout>>,
    /// Layers adapted (LoRA) or tensors trained (full).
    pub modules: usize,
    pub trainable_parameters: usize,
    /// Subtracted from RMSNorm weights when saving full weights in HF's convention (Gemma).
    pub hf_norm_offset: f64,
}

/// Expand `all-linear` and check every name is a layer the model has.
pub fn resolve_targets(settings: &LoraSettings) -> Result<BTreeSet<String>, String> {
    let mut targets = BTreeSet::new();
    for name in &settings.target_modules {
        if name == "all-linear" {
            targets.extend(ALL_LINEAR.iter().map(|s| s.to_string()));
        } else if ALL_LINEAR.contains(&name.as_str()) || name == "lm_head" {
            targets.insert(name.clone());
        } else {
            return Err(format!(
                "lora.target_modules: `{name}` is not a linear layer of these models ({}, lm_head or all-linear)",
                ALL_LINEAR.join(", ")
            ));
        }
    }
    Ok(targets)
}

/// Prepare `lm` for `config.method` and create its trainable variables. `quantized_base`
/// says whether the loaded weights are quantized (a GGUF file).
pub fn make_trainable(
    lm: &mut CausalLm,
    config: &TrainConfig,
    quantized_base: bool,
) -> Result<Trainable, TrainError> {
    match config.method {
        Method::Full => {
            lm.dequantize()?;
            full_parameters(lm)
        }
        Method::Lora => {
            if quantized_base {
                // LoRA proper trains on the dequantized weights; QLoRA keeps the blocks.
                lm.dequantize()?;
            }
            attach_lora(lm, config)
        }
        Method::Qlora => {
            if !quantized_base {
                quantize_linears(lm, config.qlora_quant)?;
            }
            attach_lora(lm, config)
        }
    }
}

fn full_parameters(lm: &mut CausalLm) -> Result<Trainable, TrainError> {
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut by_name: HashMap<String, Var> = HashMap::new();
    lm.visit_parameters_mut(|name, tensor| {
        let var = match by_name.get(name) {
            Some(var) => var.clone(),
            None => {
                let var = Var::from_tensor(tensor)?;
                by_name.insert(name.to_string(), var.clone());
                vars.push((name.to_string(), var.clone()));
                var
            }
        };
        *tensor = var.as_tensor().clone();
        Ok(())
    })?;
    let trainable_parameters = vars.iter().map(|(_, v)| v.elem_count()).sum();
    Ok(Trainable {
        method: Method::Full,
        modules: vars.len(),
        vars,
        adapter: None,
        dropout: None,
        trainable_parameters,
        hf_norm_offset: lm.spec().hf_norm_offset,
    })
}

fn quantize_linears(lm: &mut CausalLm, quant: BaseQuant) -> Result<(), TrainError> {
    let dtype = match quant {
        BaseQuant::Q8_0 => GgmlDType::Q8_0,
        BaseQuant::Q4_0 => GgmlDType::Q4_0,
        BaseQuant::Q4K => GgmlDType::Q4K,
        BaseQuant::Nf4 => return quantize_linears_nf4(lm),
    };
    let device = lm.device().clone();
    lm.visit_linears_mut(|name, linear| {
        if name == "lm_head" {
            return Ok(false);
        }
        let Linear::Dense { weight, bias } = linear else {
            return Ok(false);
        };
        let (_, cols) = weight.dims2()?;
        if !cols.is_multiple_of(dtype.block_size()) {
            // Kept dense: the row length is not a whole number of blocks.
            return Ok(false);
        }
        let q = QTensor::quantize(
            &weight
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?,
            dtype,
        )?;
        let q = if device.is_cpu() {
            q
        } else {
            let data = q.data()?;
            let storage = candle_core::quantized::QStorage::from_data(data, &device, dtype)?;
            QTensor::new(storage, q.shape().clone())?
        };
        *linear = Linear::quantized(Arc::new(q), bias.clone())?;
        Ok(true)
    })?;
    Ok(())
}

/// Every dense linear layer but the LM head into NF4 (any row length: its blocks of 64 run
/// over the flattened weight, as bitsandbytes').
fn quantize_linears_nf4(lm: &mut CausalLm) -> Result<(), TrainError> {
    lm.visit_linears_mut(|name, linear| {
        if name == "lm_head" {
            return Ok(false);
        }
        let Linear::Dense { weight, bias } = linear else {
            return Ok(false);
        };
        *linear = Linear::Nf4 {
            weight: Arc::new(Nf4Tensor::quantize(weight)?),
            bias: bias.clone(),
        };
        Ok(true)
    })?;
    Ok(())
}

/// PEFT's initialisation: A uniform in ±1/√in (Kaiming with a = √5), B zero, so the adapted
/// model starts as the base. Seeded, so that two runs with one seed start alike.
fn lora_a_init(
    rank: usize,
    in_dim: usize,
    seed: u64,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (in_dim as f32).sqrt();
    let mut state = seed;
    let values: Vec<f32> = (0..rank * in_dim)
        .map(|_| {
            let u =
                (medcoder_models::lora::splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * bound
        })
        .collect();
    Tensor::from_vec(values, (rank, in_dim), device)
}

fn attach_lora(lm: &mut CausalLm, config: &TrainConfig) -> Result<Trainable, TrainError> {
    let settings = &config.lora;
    let targets = resolve_targets(settings).map_err(|message| TrainError::Config {
        path: "config".into(),
        message,
    })?;
    let dropout = (settings.dropout > 0.0).then(|| LoraDropout::new(settings.dropout));
    let device = lm.device().clone();
    let scale = lora_scale(settings.alpha, settings.r, settings.rslora);
    let mut vars = Vec::new();
    let mut index = 0u64;
    lm.visit_linears_mut(|name, linear| {
        let short = name.rsplit('.').next().unwrap_or(name);
        if !targets.contains(short) {
            return Ok(false);
        }
        let (out_dim, in_dim) = linear.shape()?;
        index += 1;
        let seed = config.seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let a = Var::from_tensor(&lora_a_init(settings.r, in_dim, seed, &device)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out_dim, settings.r), DType::F32, &device)?)?;
        vars.push((peft_tensor_name(name, 'A'), a.clone()));
        vars.push((peft_tensor_name(name, 'B'), b.clone()));
        *linear = Linear::Lora(Arc::new(LoraLinear {
            base: linear.clone(),
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale,
            dropout: dropout.clone(),
        }));
        Ok(true)
    })?;
    if vars.is_empty() {
        return Err(TrainError::Config {
            path: "config".into(),
            message: "lora.target_modules matched no layer of the model".into(),
        });
    }
    let adapter = PeftAdapterConfig::lora(
        Some(
            config
                .base_model_name
                .clone()
                .unwrap_or_else(|| config.model.clone()),
        ),
        settings.r,
        settings.alpha,
        f64::from(settings.dropout),
        targets.into_iter().collect(),
        settings.rslora,
    );
    let trainable_parameters = vars
        .iter()
        .map(|(_, v): &(String, Var)| v.elem_count())
        .sum();
    Ok(Trainable {
        method: config.method,
        modules: vars.len() / 2,
        vars,
        adapter: Some(adapter),
        dropout,
        trainable_parameters,
        hf_norm_offset: 0.0,
    })
}

impl Trainable {
    /// The trainable tensors by name, as saved (HF's norm convention).
    pub fn tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(name, var)| {
                let tensor = var.as_tensor();
                let saved = if self.is_offset_norm(name) {
                    tensor.affine(1.0, -self.hf_norm_offset)?
                } else {
                    tensor.clone()
                };
                Ok((name.clone(), saved))
            })
            .collect()
    }

    fn is_offset_norm(&self, name: &str) -> bool {
        self.hf_norm_offset != 0.0 && name.ends_with("norm.weight")
    }

    /// Write the weights into `dir`: a PEFT adapter (`adapter_config.json`,
    /// `adapter_model.safetensors`) or, for full fine-tuning, `model.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let tensors = self.tensors()?;
        match &self.adapter {
            Some(adapter) => {
                crate::atomic::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
                let json = serde_json::to_string_pretty(adapter).map_err(std::io::Error::other)?;
                crate::atomic::write_file(&dir.join("adapter_config.json"), json.as_bytes())?;
            }
            None => crate::atomic::write_safetensors(&dir.join("model.safetensors"), &tensors)?,
        }
        Ok(())
    }

    /// Load weights saved by [`Self::save`] into the variables (resume).
    pub fn load(&self, dir: &Path) -> Result<(), TrainError> {
        let file = match self.adapter {
            Some(_) => dir.join("adapter_model.safetensors"),
            None => dir.join("model.safetensors"),
        };
        let device = self
            .vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let saved =
            candle_core::safetensors::load(&file, &device).map_err(|e| TrainError::Checkpoint {
                path: file.display().to_string(),
                message: e.to_string(),
            })?;
        for (name, var) in &self.vars {
            let tensor = saved.get(name).ok_or_else(|| TrainError::Checkpoint {
                path: file.display().to_string(),
                message: format!("`{name}` is missing: a checkpoint of another configuration?"),
            })?;
            if tensor.dims() != var.dims() {
                return Err(TrainError::Checkpoint {
                    path: file.display().to_string(),
                    message: format!(
                        "`{name}` has shape {:?}, the model's is {:?}",
                        tensor.dims(),
                        var.dims()
                    ),
                });
            }
            let tensor = if self.is_offset_norm(name) {
                tensor.affine(1.0, self.hf_norm_offset)?
            } else {
                tensor.clone()
            };
            var.set(&tensor.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}
