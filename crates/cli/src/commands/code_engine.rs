//! The command-line flags that choose and build a coding engine (`medcoder code`, `eval`'s
//! siblings and `bench code`); the engines themselves live in `medcoder_coding::engine`.

use std::path::PathBuf;

use medcoder_coding::engine::{AllowedCodes, EngineConfig, EngineKind};
use medcoder_coding::openai::OpenaiConfig;

#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// The coding engine: `retrieval` (no GPU, no fine-tune), `llm` (a local model under
    /// constrained decoding) or `openai` (an OpenAI-compatible endpoint: LiteLLM, vLLM,
    /// Ollama, a hosted API).
    #[arg(long, default_value = "retrieval")]
    pub engine: EngineKind,
    /// The prepared database: the retrieval engine is fitted on it; the llm and openai engines
    /// take their allowed codes from it (not needed with `--allowed us`).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// The dataset in it.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Splits whose labelled notes the engine is fitted on (llm: whose codes it may write).
    #[arg(long, value_delimiter = ',', default_value = "train")]
    pub fit_splits: Vec<String>,
    /// llm: the model (an asset id, HF folder or GGUF file), or a registered model
    /// (`name@production`, `name@VERSION`: its base model with its adapter).
    #[arg(long)]
    pub model: Option<String>,
    /// llm: a LoRA adapter in PEFT's format (a `medcoder train` run folder), or a registered
    /// model (`name@production`, `name@staging`, `name@VERSION`; `--model` defaults to its
    /// base model).
    #[arg(long, value_name = "DIR|NAME@VERSION")]
    pub adapter: Option<PathBuf>,
    /// llm, openai: the prompt template of `prepare tokens` (YAML); its default otherwise.
    #[arg(long, value_name = "FILE")]
    pub prompt_template: Option<PathBuf>,
    /// llm, openai: the codes it may write: those of the dataset's fit splits (`dataset`, right for
    /// CodiEsp's Spanish edition), the US ICD-10-CM/PCS code set (`us`: categories and
    /// subcategories too) or its reportable codes only (`us-billable`).
    #[arg(long, default_value = "dataset")]
    pub allowed: AllowedCodes,
    /// llm: prompt tokens at most; a longer note is coded in chunks cut at sentence ends.
    #[arg(long, default_value_t = 2048)]
    pub max_prompt_tokens: usize,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// retrieval: the embedder of its semantic signals: `auto` (static token vectors distilled
    /// from the `minilm-l6` asset when installed: fast), `none`, an asset id or a
    /// sentence-transformers folder (its encoder over every token: slower, a little more
    /// accurate), or either with `:static` (distilled)
    #[arg(long, default_value = "auto")]
    pub embedder: String,
    /// openai: the endpoint's base URL (e.g. http://localhost:4000/v1); $OPENAI_BASE_URL when
    /// not given.
    #[arg(long, value_name = "URL")]
    pub openai_base_url: Option<String>,
    /// openai: the model's name at the endpoint.
    #[arg(long, value_name = "NAME")]
    pub openai_model: Option<String>,
    /// openai: the environment variable holding the API key (the key is never printed).
    #[arg(long, value_name = "VAR", default_value = "OPENAI_API_KEY")]
    pub openai_api_key_env: String,
    /// openai: seconds one request may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub openai_timeout: f64,
    /// openai: retries after a connection error, HTTP 429 or 5xx (exponential backoff; a
    /// 429's Retry-After is honoured).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub openai_retries: u32,
}

impl EngineArgs {
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            engine: self.engine,
            db: self.db.clone(),
            dataset: self.dataset.clone(),
            fit_splits: self.fit_splits.clone(),
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            prompt_template: self.prompt_template.clone(),
            allowed: self.allowed,
            max_prompt_tokens: self.max_prompt_tokens,
            device: self.device.clone(),
            embedder: self.embedder.clone(),
            openai: OpenaiConfig {
                base_url: self.openai_base_url.clone(),
                model: self.openai_model.clone(),
                api_key_env: self.openai_api_key_env.clone(),
                timeout_s: self.openai_timeout,
                retries: self.openai_retries,
                ..OpenaiConfig::default()
            },
        }
    }
}
