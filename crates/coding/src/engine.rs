//! One coder for every front end (`medcoder code`, `bench code`, `serve`): an engine built from
//! an [`EngineConfig`] (command-line flags or `serve.yaml`), plus the code sets that describe,
//! validate and check its answers.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_icd::cm::CmKind;
use medcoder_icd::IcdKnowledge;
use medcoder_models::DeviceSpec;
use medcoder_store::{Split, Store};
use medcoder_train::PromptTemplate;
use serde::{Deserialize, Serialize};

use crate::guidelines::guideline_warnings;
use crate::lexical::Lexicon;
use crate::llm::LlmEngine;
use crate::retrieval::{LabelledNote, RetrievalIndex};
use crate::{CodeKind, CodingError, NotePrediction};

/// Which engine codes the notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// kNN over labelled notes + ICD lexical matches, reranked and calibrated: no GPU, no fine-tune.
    #[default]
    Retrieval,
    /// A local model (+ LoRA adapter) under constrained decoding.
    Llm,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retrieval => "retrieval",
            Self::Llm => "llm",
        }
    }
}

impl FromStr for EngineKind {
    type Err = CodingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "retrieval" => Ok(Self::Retrieval),
            "llm" => Ok(Self::Llm),
            other => Err(CodingError::Invalid(format!(
                "unknown engine `{other}`: this build has `retrieval` and `llm`"
            ))),
        }
    }
}

/// The codes the llm engine may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllowedCodes {
    /// Those the dataset's fit splits were annotated with (right for CodiEsp's Spanish edition).
    #[default]
    Dataset,
    /// The US ICD-10-CM/PCS code set (categories and subcategories too).
    Us,
    /// The US code set's reportable codes only.
    UsBillable,
}

impl FromStr for AllowedCodes {
    type Err = CodingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dataset" => Ok(Self::Dataset),
            "us" => Ok(Self::Us),
            "us-billable" => Ok(Self::UsBillable),
            other => Err(CodingError::Invalid(format!(
                "unknown allowed code set `{other}`: dataset, us or us-billable"
            ))),
        }
    }
}

/// Everything an engine is built from; saved and printed as the server's resolved config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub engine: EngineKind,
    /// The prepared database: the retrieval engine is fitted on it; the llm engine takes its
    /// allowed codes from it.
    pub db: Option<PathBuf>,
    /// The dataset in it.
    pub dataset: Option<String>,
    /// Splits whose labelled notes the engine is fitted on (llm: whose codes it may write).
    pub fit_splits: Vec<String>,
    /// llm: the model (an asset id, HF folder or GGUF file).
    pub model: Option<String>,
    /// llm: a LoRA adapter in PEFT's format (a `medcoder train` run folder).
    pub adapter: Option<PathBuf>,
    /// llm: the prompt template of `prepare tokens` (YAML); its default otherwise.
    pub prompt_template: Option<PathBuf>,
    pub allowed: AllowedCodes,
    /// llm: prompt tokens at most.
    pub max_prompt_tokens: usize,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            engine: EngineKind::Retrieval,
            db: None,
            dataset: None,
            fit_splits: vec!["train".into()],
            model: None,
            adapter: None,
            prompt_template: None,
            allowed: AllowedCodes::Dataset,
            max_prompt_tokens: 2048,
            device: "auto".into(),
        }
    }
}

impl EngineConfig {
    /// The prepared database and dataset, or an error saying which is missing.
    pub fn dataset_source(&self) -> Result<(&Path, &str), CodingError> {
        match (&self.db, &self.dataset) {
            (Some(db), Some(dataset)) => Ok((db, dataset)),
            _ => Err(CodingError::Invalid(format!(
                "the {} engine needs a prepared dataset: give db and dataset (--db FILE --dataset NAME)",
                self.engine.as_str()
            ))),
        }
    }
}

enum Engine {
    Retrieval(Box<RetrievalIndex>),
    Llm(Box<LlmEngine>),
}

/// An engine plus the code sets: a note in, a described, guideline-checked prediction out.
pub struct Coder {
    engine: Engine,
    kb: Option<Arc<IcdKnowledge>>,
    /// What the engine is, for `/v1/model` and logs.
    pub description: String,
    pub kind: EngineKind,
}

impl std::fmt::Debug for Coder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coder")
            .field("kind", &self.kind)
            .field("description", &self.description)
            .field("code_sets", &self.kb.is_some())
            .finish()
    }
}

impl Coder {
    /// Builds the engine `config` names. `kb` is `None` where the code sets are not installed:
    /// coding then goes without descriptions, lexical matches and guideline checks.
    pub fn build(
        config: &EngineConfig,
        kb: Option<Arc<IcdKnowledge>>,
        home: &MedcoderHome,
    ) -> Result<Self, CodingError> {
        let (engine, description) = match config.engine {
            EngineKind::Retrieval => {
                if let Some(kb) = &kb {
                    kb.prepare_search();
                }
                let (db, dataset) = config.dataset_source()?;
                let lexicon = kb.as_deref().map(|kb| kb as &dyn Lexicon);
                let index = retrieval_index(db, dataset, &config.fit_splits, lexicon)?;
                let description = format!("retrieval fitted on {}", index.fitted_on);
                (Engine::Retrieval(Box::new(index)), description)
            }
            EngineKind::Llm => {
                let engine = llm_engine(config, kb.as_deref(), home)?;
                let description = engine.name().to_string();
                (Engine::Llm(Box::new(engine)), description)
            }
        };
        Ok(Self {
            engine,
            kb,
            description,
            kind: config.engine,
        })
    }

    /// Codes one note. Empty text is refused; the text itself never reaches a log.
    pub fn code(&self, id: &str, text: &str) -> Result<NotePrediction, CodingError> {
        if text.trim().is_empty() {
            return Err(CodingError::Input {
                what: format!("note {id}"),
                why: "empty text".into(),
            });
        }
        let describe = describer(self.kb.as_deref());
        let mut prediction = match &self.engine {
            Engine::Retrieval(index) => {
                let lexicon = self.kb.as_deref().map(|kb| kb as &dyn Lexicon);
                index.predict(id, text, &describe, lexicon)
            }
            Engine::Llm(engine) => engine.predict(id, text, &describe)?,
        };
        if let Some(kb) = &self.kb {
            prediction
                .warnings
                .extend(guideline_warnings(kb, &prediction));
        }
        Ok(prediction)
    }

    /// Whether notes may be coded in parallel (the llm engine uses every core for one).
    pub fn parallel(&self) -> bool {
        matches!(self.engine, Engine::Retrieval(_))
    }

    pub fn code_sets(&self) -> Option<&IcdKnowledge> {
        self.kb.as_deref()
    }
}

/// The ICD code sets, or `None` with a warning saying what coding loses without them.
pub fn load_code_sets(home: &MedcoderHome) -> Option<Arc<IcdKnowledge>> {
    match IcdKnowledge::load(home) {
        Ok(kb) => Some(Arc::new(kb)),
        Err(error) => {
            tracing::warn!(%error, "no ICD knowledge base (run `medcoder assets fetch`): no lexical matching, descriptions or evidence");
            None
        }
    }
}

/// A code's description and billable flag from the code sets, where they know it.
pub fn describer(
    kb: Option<&IcdKnowledge>,
) -> impl Fn(&str, CodeKind) -> Option<(String, bool)> + Sync + '_ {
    move |code, _kind| kb?.describe(code).ok()
}

/// The notes with text of `split`, sorted by id; an error when there are none.
pub fn split_notes(
    db: &Path,
    dataset: &str,
    split: &str,
) -> Result<Vec<LabelledNote>, CodingError> {
    let (notes, names) = fit_notes(db, dataset, &[split.to_string()])?;
    if notes.is_empty() {
        return Err(CodingError::Invalid(format!(
            "{dataset} in {} has no notes with text in split {}",
            db.display(),
            names.join("+")
        )));
    }
    Ok(notes)
}

/// The labelled notes of `fit_splits`, sorted by id, and the splits' names.
fn fit_notes(
    db: &Path,
    dataset: &str,
    fit_splits: &[String],
) -> Result<(Vec<LabelledNote>, Vec<&'static str>), CodingError> {
    let splits: Vec<Split> = fit_splits
        .iter()
        .map(|s| s.parse::<Split>())
        .collect::<Result<_, _>>()
        .map_err(|e| CodingError::Invalid(e.to_string()))?;
    let store = Store::open(db)?;
    let names: Vec<&'static str> = splits.iter().map(|s| s.as_str()).collect();
    let mut notes = Vec::new();
    store.for_each_coding_batch(dataset, false, 512, |batch| {
        notes.extend(
            batch
                .into_iter()
                .filter(|e| e.split.as_deref().is_some_and(|s| names.contains(&s)))
                .map(|e| LabelledNote {
                    id: e.doc_id,
                    text: e.text,
                    diagnoses: e.diagnoses,
                    procedures: e.procedures,
                }),
        );
        Ok(())
    })?;
    notes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((notes, names))
}

/// The fitted index, from its cache beside the database when that was fitted on the same notes.
fn retrieval_index(
    db: &Path,
    dataset: &str,
    fit_splits: &[String],
    lexicon: Option<&dyn Lexicon>,
) -> Result<RetrievalIndex, CodingError> {
    let (notes, names) = fit_notes(db, dataset, fit_splits)?;
    let cache = db.with_file_name(format!(
        "{}.retrieval.{dataset}.{}.json",
        db.file_stem().and_then(|s| s.to_str()).unwrap_or("db"),
        names.join("+")
    ));
    let fingerprint = RetrievalIndex::fingerprint_of(&notes, lexicon.is_some());
    if let Ok(text) = fs_err::read_to_string(&cache) {
        match RetrievalIndex::from_json(&text) {
            Ok(index) if index.fingerprint == fingerprint => {
                tracing::info!(cache = %cache.display(), "retrieval index from cache");
                return Ok(index);
            }
            _ => tracing::info!(cache = %cache.display(), "retrieval cache stale: refitting"),
        }
    }
    let fitted_on = format!("{dataset} {} ({} notes)", names.join("+"), notes.len());
    let index = RetrievalIndex::fit(&notes, fitted_on, lexicon).map_err(|e| {
        CodingError::Invalid(format!(
            "fitting the retrieval engine on {} of {}: {e}",
            names.join("+"),
            db.display()
        ))
    })?;
    tracing::info!(calibration = ?index.calibration, "retrieval index fitted");
    let json = index
        .to_json()
        .map_err(|e| CodingError::Invalid(format!("serializing the retrieval index: {e}")))?;
    medcoder_train::atomic::write_file(&cache, json.as_bytes())
        .map_err(|e| CodingError::Invalid(format!("{}: {e}", cache.display())))?;
    Ok(index)
}

fn llm_engine(
    config: &EngineConfig,
    kb: Option<&IcdKnowledge>,
    home: &MedcoderHome,
) -> Result<LlmEngine, CodingError> {
    let invalid = |e: &dyn std::fmt::Display| CodingError::Invalid(e.to_string());
    let Some(model) = &config.model else {
        return Err(CodingError::Invalid(
            "the llm engine needs a model (--model: an asset id, HF folder or GGUF file)".into(),
        ));
    };
    let resolved = model
        .parse::<ModelRef>()
        .and_then(|m| m.resolve(home))
        .map_err(|e| invalid(&e))?;
    let device = config
        .device
        .parse::<DeviceSpec>()
        .map_err(|e| invalid(&e))?
        .device()
        .map_err(|e| invalid(&e))?;
    let mut loaded =
        medcoder_models::load_model(&resolved, &device, None).map_err(|e| invalid(&e))?;
    let mut name = format!("llm {model}");
    if let Some(dir) = &config.adapter {
        medcoder_models::lora::apply_peft_adapter(&mut loaded.lm, dir).map_err(|e| {
            CodingError::Invalid(format!("applying the adapter {}: {e}", dir.display()))
        })?;
        name += &format!(" + adapter {}", dir.display());
    }
    let template = match &config.prompt_template {
        Some(file) => PromptTemplate::from_yaml_file(file).map_err(|e| invalid(&e))?,
        None => PromptTemplate::default(),
    };
    let (mut allowed, source) = match config.allowed {
        AllowedCodes::Dataset => {
            let (db, dataset) = config.dataset_source()?;
            let (notes, names) = fit_notes(db, dataset, &config.fit_splits)?;
            let codes: Vec<(String, CodeKind)> = notes
                .iter()
                .flat_map(|n| {
                    let d = n.diagnoses.iter().map(|c| (c.clone(), CodeKind::Diagnosis));
                    d.chain(
                        n.procedures
                            .iter()
                            .map(|c| (c.clone(), CodeKind::Procedure)),
                    )
                })
                .collect();
            (codes, format!("{dataset} {}", names.join("+")))
        }
        AllowedCodes::Us | AllowedCodes::UsBillable => {
            let Some(kb) = kb else {
                return Err(CodingError::Invalid(
                    "--allowed us needs the ICD code sets: run `medcoder assets fetch`".into(),
                ));
            };
            let billable_only = config.allowed == AllowedCodes::UsBillable;
            let cm = kb.cm.entries.iter().filter(|e| {
                matches!(
                    e.kind,
                    CmKind::Category | CmKind::Subcategory | CmKind::Extended
                ) && (e.billable || !billable_only)
            });
            let codes = cm
                .map(|e| (e.code.clone(), CodeKind::Diagnosis))
                .chain(
                    kb.pcs
                        .codes
                        .iter()
                        .map(|e| (e.code.clone(), CodeKind::Procedure)),
                )
                .collect();
            let which = if billable_only { "reportable " } else { "" };
            (
                codes,
                format!(
                    "the US {which}code set ({} / {})",
                    kb.cm.version, kb.pcs.version
                ),
            )
        }
    };
    allowed.sort();
    allowed.dedup();
    name += &format!(", constrained to the {} codes of {source}", allowed.len());
    LlmEngine::new(loaded, template, &allowed, config.max_prompt_tokens, name)
}
