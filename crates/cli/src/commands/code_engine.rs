//! The command-line flags that choose and build a coding engine (`medcoder code`, `eval`'s
//! siblings and `bench code`); the engines themselves live in `medcoder_coding::engine`.

use std::path::PathBuf;

use medcoder_coding::engine::{AllowedCodes, EngineConfig, EngineKind};

#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// The coding engine: `retrieval` (no GPU, no fine-tune) or `llm` (a local model under
    /// constrained decoding).
    #[arg(long, default_value = "retrieval")]
    pub engine: EngineKind,
    /// The prepared database: the retrieval engine is fitted on it; the llm engine takes its
    /// allowed codes from it.
    #[arg(long)]
    pub db: PathBuf,
    /// The dataset in it.
    #[arg(long)]
    pub dataset: String,
    /// Splits whose labelled notes the engine is fitted on (llm: whose codes it may write).
    #[arg(long, value_delimiter = ',', default_value = "train")]
    pub fit_splits: Vec<String>,
    /// llm: the model (an asset id, HF folder or GGUF file).
    #[arg(long)]
    pub model: Option<String>,
    /// llm: a LoRA adapter in PEFT's format (a `medcoder train` run folder).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// llm: the prompt template of `prepare tokens` (YAML); its default otherwise.
    #[arg(long, value_name = "FILE")]
    pub prompt_template: Option<PathBuf>,
    /// llm: the codes it may write: those of the dataset's fit splits (`dataset`, right for
    /// CodiEsp's Spanish edition), the US ICD-10-CM/PCS code set (`us`: categories and
    /// subcategories too) or its reportable codes only (`us-billable`).
    #[arg(long, default_value = "dataset")]
    pub allowed: AllowedCodes,
    /// llm: prompt tokens at most.
    #[arg(long, default_value_t = 2048)]
    pub max_prompt_tokens: usize,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl EngineArgs {
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            engine: self.engine,
            db: Some(self.db.clone()),
            dataset: Some(self.dataset.clone()),
            fit_splits: self.fit_splits.clone(),
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            prompt_template: self.prompt_template.clone(),
            allowed: self.allowed,
            max_prompt_tokens: self.max_prompt_tokens,
            device: self.device.clone(),
        }
    }
}
