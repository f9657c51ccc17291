//! LoRA: a frozen linear layer plus a trainable low-rank update `scale · B·A·x`, and adapters
//! in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), so that adapters we
//! train load in Python `peft` and vLLM, and adapters trained there load here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::Linear;
use crate::transformer::CausalLm;
use crate::ModelError;

/// A linear layer with a low-rank update: `base(x) + scale · B(A(dropout(x)))`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: Linear,
    /// (r, in), kept in f32 whatever the base's dtype.
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub scale: f64,
    pub dropout: Option<Arc<LoraDropout>>,
}

impl LoraLinear {
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// The base weight with the update folded in: `W + scale · B·A`, (out, in).
    pub fn merged_weight(&self, device: &Device) -> CandleResult<Tensor> {
        let base = self.base.dense_weight(device)?;
        let delta = (self.b.matmul(&self.a)? * self.scale)?;
        base.to_dtype(DType::F32)?
            .add(&delta.to_dtype(DType::F32)?)?
            .to_dtype(base.dtype())
    }
}

impl Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        let base = self.base.forward(xs)?;
        // (.., in) → (m, in) in the adapter's dtype
        let dims = xs.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("LoRA: a scalar input")
        };
        let m: usize = lead.iter().product();
        let mut x = xs.reshape((m, k))?.to_dtype(self.a.dtype())?;
        if let Some(dropout) = &self.dropout {
            x = dropout.apply(&x)?;
        }
        let (a, b) = (
            crate::autograd::maybe_detached(&self.a),
            crate::autograd::maybe_detached(&self.b),
        );
        // (m, in) · (in, r) · (r, out) → (m, out)
        let update = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?;
        let mut out = lead.to_vec();
        out.push(update.dim(1)?);
        let dtype = base.dtype();
        base + update.reshape(out)?.to_dtype(dtype)?
    }
}

/// LoRA dropout shared by every adapted layer of a model, deterministic for a given seed so
/// that a resumed run draws the same masks as an uninterrupted one.
#[derive(Debug)]
pub struct LoraDropout {
    p: f32,
    active: AtomicBool,
    seed: AtomicU64,
    calls: AtomicU64,
}

impl LoraDropout {
    pub fn new(p: f32) -> Arc<Self> {
        Arc::new(Self {
            p,
            active: AtomicBool::new(false),
            seed: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        })
    }

    /// Training passes drop; evaluation and generation do not.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }

    /// Start the masks of one micro-batch from `seed`.
    pub fn reseed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
    }

    fn apply(&self, xs: &Tensor) -> CandleResult<Tensor> {
        let Some(draw) = self.draw() else {
            return Ok(xs.clone());
        };
        let mask = Tensor::from_vec(draw.mask(xs.elem_count()), xs.shape(), xs.device())?
            .to_dtype(xs.dtype())?;
        xs * mask
    }

    /// Masks drawn since the last reseed: recomputation (gradient checkpointing) rewinds to
    /// it so that a recomputed layer draws the masks its first pass drew.
    pub(crate) fn position(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub(crate) fn rewind(&self, position: u64) {
        self.calls.store(position, Ordering::Relaxed);
    }

    /// The next layer's mask, as a seed that regenerates it; `None` when nothing is dropped.
    pub(crate) fn draw(&self) -> Option<DropoutDraw> {
        if self.p <= 0.0 || !self.active.load(Ordering::Relaxed) {
            return None;
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        Some(DropoutDraw {
            state: self.seed.load(Ordering::Relaxed) ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            keep: 1.0 - self.p,
        })
    }
}

/// One layer's dropout mask, kept as the seed that draws it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DropoutDraw {
    state: u64,
    keep: f32,
}

impl DropoutDraw {
    /// `n` multipliers: `1/keep` for kept elements, 0 for dropped ones.
    pub(crate) fn mask(self, n: usize) -> Vec<f32> {
        let mut state = self.state;
        (0..n)
            .map(|_| {
                let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                if u < self.keep {
                    1.0 / self.keep
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// A small, fast, seedable generator (Steele et al.'s SplitMix64).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `adapter_config.json` as PEFT writes it (the fields we read and write; PEFT's others are
/// accepted and kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeftAdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
    #[serde(default)]
    pub revision: Option<String>,
    /// The rest of PEFT's keys, written back as read.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}

/// `target_modules`: a list of module names, or a regex string (PEFT accepts both).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl PeftAdapterConfig {
    pub fn lora(
        base_model: Option<String>,
        r: usize,
        alpha: f64,
        dropout: f64,
        target_modules: Vec<String>,
        use_rslora: bool,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base_model,
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::List(target_modules),
            bias: bias_none(),
            use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            inference_mode: true,
            init_lora_weights: true,
            revision: None,
            other: BTreeMap::new(),
        }
    }

    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self, rank: usize, module: &str) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(pattern, _)| module.ends_with(pattern.as_str()))
            .map_or(self.lora_alpha, |(_, a)| *a);
        lora_scale(alpha, rank, self.use_rslora)
    }
}

pub fn lora_scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// PEFT's tensor name of an adapter matrix: `base_model.model.<module>.lora_A.weight`.
pub fn peft_tensor_name(module: &str, matrix: char) -> String {
    format!("base_model.model.{module}.lora_{matrix}.weight")
}

/// The module of a PEFT tensor name, and whether it is A or B (`None` for other tensors).
pub fn peft_module_of(name: &str) -> Option<(&str, char)> {
    let rest = name.strip_prefix("base_model.model.")?;
    // Older PEFT versions keep the adapter name: `lora_A.default.weight`.
    for (suffix, matrix) in [
        (".lora_A.weight", 'A'),
        (".lora_B.weight", 'B'),
        (".lora_A.default.weight", 'A'),
        (".lora_B.default.weight", 'B'),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module, matrix));
        }
    }
    None
}

/// What [`apply_peft_adapter`] did.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedAdapter {
    pub modules: usize,
    pub rank: usize,
    pub config: PeftAdapterConfig,
}

/// Read a PEFT adapter folder and wrap the matching layers of `lm` with it (for inference or
/// to continue training). Every adapter tensor must find its layer, with fitting shapes.
pub fn apply_peft_adapter(
    lm: &mut CausalLm,
    dir: &Path,
) -> std::result::Result<AppliedAdapter, ModelError> {
    let config_path = dir.join("adapter_config.json");
    let file_error = |path: &Path, message: String| ModelError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = fs_err::read_to_string(&config_path)?;
    let config: PeftAdapterConfig = serde_json::from_str(&text)
        .map_err(|e| file_error(&config_path, format!("not a PEFT adapter config: {e}")))?;
    if config.peft_type != "LORA" {
        return Err(file_error(
            &config_path,
            format!("peft_type `{}` is not supported: LORA is", config.peft_type),
        ));
    }
    if config.use_dora {
        return Err(file_error(
            &config_path,
            "DoRA adapters are not supported".into(),
        ));
    }
    if config.fan_in_fan_out {
        return Err(file_error(
            &config_path,
            "fan_in_fan_out adapters (GPT-2 Conv1D) are not supported".into(),
        ));
    }
    let weights_path = dir.join("adapter_model.safetensors");
    let device = lm.device().clone();
    let tensors = candle_core::safetensors::load(&weights_path, &device)
        .map_err(|e| file_error(&weights_path, format!("unreadable safetensors: {e}")))?;
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (name, tensor) in tensors {
        let Some((module, matrix)) = peft_module_of(&name) else {
            return Err(file_error(
                &weights_path,
                format!("tensor `{name}` is not a LoRA matrix (modules_to_save and biases are not supported)"),
            ));
        };
        let entry = pairs.entry(module.to_string()).or_default();
        let tensor = tensor
            .to_dtype(DType::F32)
            .map_err(|e| file_error(&weights_path, e.to_string()))?;
        match matrix {
            'A' => entry.0 = Some(tensor),
            _ => entry.1 = Some(tensor),
        }
    }
    let dropout = None;
    let mut applied = 0;
    let mut rank = 0;
    let mut problem: Option<String> = None;
    lm.visit_linears_mut(|module, linear| {
        let Some((a, b)) = pairs.remove(module) else {
            return Ok(false);
        };
        let (Some(a), Some(b)) = (a, b) else {
            problem.get_or_insert(format!("{module}: lora_A or lora_B is missing"));
            return Ok(false);
        };
        let (out_dim, in_dim) = linear.shape()?;
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if a_in != in_dim || b_out != out_dim || b_r != r {
            problem.get_or_insert(format!(
                "{module}: adapter shapes A {:?}, B {:?} do not fit the layer's ({out_dim}, {in_dim})",
                a.dims(),
                b.dims()
            ));
            return Ok(false);
        }
        rank = rank.max(r);
        let scale = config.scale(r, module);
        *linear = Linear::Lora(Arc::new(LoraLinear {
            base: linear.clone(),
            a,
            b,
            scale,
            dropout: dropout.clone(),
        }));
        applied += 1;
        Ok(true)
    })
    .map_err(|e| file_error(&weights_path, e.to_string()))?;
    if let Some(problem) = problem {
        return Err(file_error(&weights_path, problem));
    }
    if let Some(module) = pairs.keys().min() {
        return Err(file_error(
            &weights_path,
            format!("the adapter has weights for `{module}`, which this model does not have (an adapter for another base model?)"),
        ));
    }
    if applied == 0 {
        return Err(file_error(
            &weights_path,
            "the adapter holds no LoRA weights".into(),
        ));
    }
    Ok(AppliedAdapter {
        modules: applied,
        rank,
        config,
    })
}

/// Fold every LoRA update of `lm` into its base weights (dense), for export and merging.
pub fn merge_adapters(lm: &mut CausalLm) -> CandleResult<usize> {
    let device = lm.device().clone();
    let mut merged = 0;
    lm.visit_linears_mut(|_, linear| {
        let Linear::Lora(lora) = linear else {
            return Ok(false);
        };
        let weight = lora.merged_weight(&device)?;
        *linear = Linear::Dense {
            weight,
            bias: lora.base.bias().cloned(),
        };
        merged += 1;
        Ok(true)
    })?;
    Ok(merged)
}
