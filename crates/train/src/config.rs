//! `TrainConfig`: everything a training run needs, loaded from YAML with `--set key=value`
//! overrides, unknown keys refused by name, saved resolved in the run folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Low-rank adapters on a frozen dense base.
    Lora,
    /// Low-rank adapters on a frozen quantized base (GGUF blocks kept, or quantized on load).
    Qlora,
    /// Every weight.
    Full,
}

/// Which tokens the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossOn {
    /// The completion only (supervised fine-tuning).
    Completion,
    /// Every token (continued pretraining).
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "d::rank")]
    pub r: usize,
    #[serde(default = "d::alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    /// HF module names (`q_proj`, `v_proj`, …) or `all-linear` (every linear layer of the
    /// blocks, not the LM head, as PEFT).
    #[serde(default = "d::targets")]
    pub target_modules: Vec<String>,
    /// Scale by alpha/√r instead of alpha/r.
    #[serde(default)]
    pub rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: d::rank(),
            alpha: d::alpha(),
            dropout: 0.0,
            target_modules: d::targets(),
            rslora: false,
        }
    }
}

/// How an HF base is quantized for QLoRA (a GGUF base keeps its own blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseQuant {
    Q8_0,
    Q4_0,
    Q4K,
    /// bitsandbytes' 4-bit NormalFloat in blocks of 64 (the QLoRA paper's format).
    Nf4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSettings {
    #[serde(default = "d::lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d::beta1")]
    pub beta1: f64,
    #[serde(default = "d::beta2")]
    pub beta2: f64,
    #[serde(default = "d::eps")]
    pub eps: f64,
    #[serde(default = "d::schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[serde(default = "d::clip")]
    pub max_grad_norm: f64,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        Self {
            learning_rate: d::lr(),
            weight_decay: 0.0,
            beta1: d::beta1(),
            beta2: d::beta2(),
            eps: d::eps(),
            schedule: d::schedule(),
            warmup_steps: 0,
            max_grad_norm: d::clip(),
        }
    }
}

/// What to do with an example longer than `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlong {
    /// Stop with an error naming the example (the default: choose a strategy knowingly).
    Error,
    /// Leave it out (counted in the log).
    Drop,
    /// Keep the prompt's start and the whole completion.
    TruncatePrompt,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The base model: alias, local path (HF folder or GGUF) or hub id.
    pub model: String,
    /// The DuckDB file holding the dataset and its tokens (`medcoder prepare tokens`).
    pub db: PathBuf,
    pub dataset: String,
    /// The model name the tokens were prepared under (`prepare tokens --model`); defaults to
    /// `model`.
    #[serde(default)]
    pub tokens_model: Option<String>,
    /// Where checkpoints, metrics and the adapter go.
    pub output_dir: PathBuf,
    #[serde(default = "d::method")]
    pub method: Method,
    #[serde(default = "d::loss_on")]
    pub loss_on: LossOn,
    #[serde(default)]
    pub lora: LoraSettings,
    /// QLoRA on an HF base: the block type it is quantized to.
    #[serde(default = "d::base_quant")]
    pub qlora_quant: BaseQuant,
    #[serde(default = "d::device")]
    pub device: String,
    /// Dtype of the frozen base: f32 (CPU default), bf16 or f16 (GPU default bf16).
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default = "d::train_split")]
    pub train_split: String,
    /// Evaluated every `eval_every` steps; none to train without evaluation.
    #[serde(default = "d::eval_split")]
    pub eval_split: Option<String>,
    #[serde(default = "d::max_len")]
    pub max_len: usize,
    #[serde(default = "d::overlong")]
    pub overlong: Overlong,
    #[serde(default = "d::batch")]
    pub batch_size: usize,
    #[serde(default = "d::one")]
    pub grad_accum: usize,
    #[serde(default = "d::one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (before the epochs are done).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Batches of similar lengths (less padding); the batch order is still shuffled.
    #[serde(default = "d::yes")]
    pub bucket_by_length: bool,
    /// Lay several examples end to end in each row of up to `max_len` tokens (less padding,
    /// fewer rows). Each keeps to itself: its tokens attend only to its own earlier tokens,
    /// its rotary positions start at 0, its loss mask is its own. `bucket_by_length` is then
    /// moot.
    #[serde(default)]
    pub packing: bool,
    /// Keep one layer's activations at a time and recompute the rest in the backward pass:
    /// far less memory for one more forward pass.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default)]
    pub optimizer: OptimizerSettings,
    #[serde(default = "d::seed")]
    pub seed: u64,
    #[serde(default = "d::every")]
    pub eval_every: usize,
    /// At most this many evaluation examples (the first ones, fixed), none for all.
    #[serde(default)]
    pub eval_examples: Option<usize>,
    /// Stop when the evaluation loss has not improved for this many evaluations.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    #[serde(default = "d::every")]
    pub save_every: usize,
    /// Checkpoints kept besides the best one.
    #[serde(default = "d::keep")]
    pub keep_last: usize,
    /// Base model id written into adapter_config.json (defaults to `model`).
    #[serde(default)]
    pub base_model_name: Option<String>,
}

mod d {
    use super::*;
    pub fn rank() -> usize {
        16
    }
    pub fn alpha() -> f64 {
        32.0
    }
    pub fn targets() -> Vec<String> {
        vec!["all-linear".into()]
    }
    pub fn lr() -> f64 {
        2e-4
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn eps() -> f64 {
        1e-8
    }
    pub fn schedule() -> Schedule {
        Schedule::Cosine
    }
    pub fn clip() -> f64 {
        1.0
    }
    pub fn method() -> Method {
        Method::Lora
    }
    pub fn loss_on() -> LossOn {
        LossOn::Completion
    }
    pub fn base_quant() -> BaseQuant {
        BaseQuant::Q8_0
    }
    pub fn device() -> String {
        "auto".into()
    }
    pub fn train_split() -> String {
        "train".into()
    }
    pub fn eval_split() -> Option<String> {
        Some("validation".into())
    }
    pub fn max_len() -> usize {
        1024
    }
    pub fn overlong() -> Overlong {
        Overlong::Error
    }
    pub fn batch() -> usize {
        4
    }
    pub fn one() -> usize {
        1
    }
    pub fn yes() -> bool {
        true
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn every() -> usize {
        50
    }
    pub fn keep() -> usize {
        2
    }
}

impl TrainConfig {
    /// A YAML file with `key=value` overrides (dotted keys reach nested sections:
    /// `lora.r=8`), checked: unknown keys and bad values are errors naming the key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = fs_err::read_to_string(path)?;
        Self::from_yaml(&text, overrides, &path.display().to_string())
    }

    pub fn from_yaml(text: &str, overrides: &[String], origin: &str) -> Result<Self, TrainError> {
        let config_error = |message: String| TrainError::Config {
            path: origin.to_string(),
            message,
        };
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| config_error(e.to_string()))?;
        if value.is_null() {
            value = serde_yaml::Value::Mapping(Default::default());
        }
        for item in overrides {
            let (key, raw) = item
                .split_once('=')
                .ok_or_else(|| config_error(format!("--set `{item}`: expected key=value")))?;
            let parsed: serde_yaml::Value = serde_yaml::from_str(raw)
                .unwrap_or_else(|_| serde_yaml::Value::String(raw.to_string()));
            set_path(&mut value, key.trim(), parsed).map_err(config_error)?;
        }
        let config: Self =
            serde_yaml::from_value(value).map_err(|e| config_error(e.to_string()))?;
        config.check().map_err(config_error)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("epochs", self.epochs),
            ("max_len", self.max_len),
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
            ("lora.r", self.lora.r),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(format!(
                "`lora.dropout` must be in [0, 1), not {}",
                self.lora.dropout
            ));
        }
        if !(self.optimizer.learning_rate > 0.0 && self.optimizer.learning_rate.is_finite()) {
            return Err("`optimizer.learning_rate` must be a positive number".into());
        }
        if self.lora.target_modules.is_empty() {
            return Err("`lora.target_modules` is empty".into());
        }
        if let Some(dtype) = &self.dtype {
            if !matches!(dtype.as_str(), "f32" | "bf16" | "f16") {
                return Err(format!("`dtype` must be f32, bf16 or f16, not `{dtype}`"));
            }
        }
        Ok(())
    }

    pub fn tokens_model(&self) -> &str {
        self.tokens_model.as_deref().unwrap_or(&self.model)
    }

    pub fn to_yaml(&self) -> Result<String, TrainError> {
        serde_yaml::to_string(self).map_err(|e| TrainError::Config {
            path: "config".into(),
            message: e.to_string(),
        })
    }
}

/// Set `a.b.c` in a YAML mapping, creating sections as needed.
fn set_path(
    root: &mut serde_yaml::Value,
    key: &str,
    value: serde_yaml::Value,
) -> Result<(), String> {
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(format!("--set: empty key part in `{key}`"));
        }
        let map = match node {
            serde_yaml::Value::Mapping(map) => map,
            _ => {
                return Err(format!(
                    "--set `{key}`: `{}` is not a section",
                    parts[..i].join(".")
                ))
            }
        };
        let k = serde_yaml::Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "model: m\ndb: d.duckdb\ndataset: codiesp\noutput_dir: runs/x\n";

    #[test]
    fn defaults_fill_what_the_file_leaves_out_and_overrides_reach_nested_keys() {
        let config = TrainConfig::from_yaml(
            BASE,
            &[
                "lora.r=8".into(),
                "optimizer.learning_rate=1e-3".into(),
                "eval_split=null".into(),
            ],
            "t.yaml",
        )
        .unwrap();
        assert_eq!(config.lora.r, 8);
        assert_eq!(config.lora.alpha, 32.0);
        assert_eq!(config.optimizer.learning_rate, 1e-3);
        assert_eq!(config.eval_split, None);
        assert_eq!(config.method, Method::Lora);
        assert_eq!(config.tokens_model(), "m");
        let again = TrainConfig::from_yaml(&config.to_yaml().unwrap(), &[], "saved").unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn typos_are_errors_naming_the_key() {
        let err = TrainConfig::from_yaml(&format!("{BASE}lerning_rate: 1\n"), &[], "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lerning_rate") && err.contains("t.yaml"),
            "{err}"
        );
        let err = TrainConfig::from_yaml(BASE, &["lora.rank=4".into()], "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank"), "{err}");
        let err = TrainConfig::from_yaml(BASE, &["batch_size=0".into()], "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_size"), "{err}");
        let err = TrainConfig::from_yaml(BASE, &["method=dora".into()], "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dora"), "{err}");
    }
}
