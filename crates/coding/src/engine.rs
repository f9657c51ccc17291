//! One coder for every front end (`medcoder code`, `bench code`, `serve`): an engine built from
//! an [`EngineConfig`] (command-line flags or `serve.yaml`), plus the code sets that describe,
//! validate and check its answers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use medcoder_assets::MedcoderHome;
use medcoder_icd::cm::CmKind;
use medcoder_icd::IcdKnowledge;
use medcoder_models::{DeviceSpec, SentenceEmbedder};
use medcoder_store::{Split, Store};
use medcoder_train::PromptTemplate;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guidelines::guideline_warnings;
use crate::lexical::Lexicon;
use crate::llm::LlmEngine;
use crate::llm_continuous::{Answered, ContinuousCoding, Refused};
use crate::model_answer::AllowedSet;
use crate::openai::{OpenaiConfig, OpenaiEngine};
use crate::prediction::{CodeDescriber, DescriptionCache};
use crate::retrieval::{FitAids, GoldMention, LabelledNote, RetrievalIndex};
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
    /// Any OpenAI-compatible chat endpoint; its answers checked against the allowed codes.
    Openai,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retrieval => "retrieval",
            Self::Llm => "llm",
            Self::Openai => "openai",
        }
    }
}

impl FromStr for EngineKind {
    type Err = CodingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "retrieval" => Ok(Self::Retrieval),
            "llm" => Ok(Self::Llm),
            "openai" => Ok(Self::Openai),
            other => Err(CodingError::Invalid(format!(
                "unknown engine `{other}`: this build has `retrieval`, `llm` and `openai`"
            ))),
        }
    }
}

/// The codes the llm and openai engines may write.
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
    /// llm: the model (an asset id, HF folder or GGUF file), or a registered `name@version`.
    pub model: Option<String>,
    /// llm: a LoRA adapter in PEFT's format (a `medcoder train` run folder), or a registered
    /// model (`name@production`, `name@VERSION`) whose adapter and base model are used.
    pub adapter: Option<PathBuf>,
    /// llm, openai: the prompt template of `prepare tokens` (YAML); its default otherwise.
    pub prompt_template: Option<PathBuf>,
    pub allowed: AllowedCodes,
    /// llm: prompt tokens at most; a longer note is coded in chunks cut at sentence ends.
    pub max_prompt_tokens: usize,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    /// retrieval: the embedder of its semantic signals: `auto` (static token vectors distilled
    /// from the `minilm-l6` asset when installed, else none, saying so), `none`, an asset id
    /// or a sentence-transformers folder (its encoder run over every token), either with a
    /// `:static` suffix to distill it.
    pub embedder: String,
    /// openai: the endpoint, model, API key variable, timeout and retries.
    pub openai: OpenaiConfig,
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
            embedder: "auto".into(),
            openai: OpenaiConfig::default(),
        }
    }
}

impl EngineConfig {
    /// Whether this engine reads a prepared dataset (to fit on, or for its allowed codes).
    pub fn needs_dataset(&self) -> bool {
        self.engine == EngineKind::Retrieval || self.allowed == AllowedCodes::Dataset
    }

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
    Retrieval(Box<RetrievalIndex>, Option<Box<SentenceEmbedder>>),
    Llm(Box<LlmEngine>),
    Openai(Box<OpenaiEngine>),
}

/// The llm engine's continuous batch behind a [`Coder`]: empty notes are refused, answers get
/// the code sets' guideline warnings as [`Coder::code`]'s do.
#[derive(Debug)]
pub struct ContinuousNotes<'c, T> {
    coder: &'c Coder,
    coding: ContinuousCoding<'c, T>,
}

impl<T> ContinuousNotes<'_, T> {
    pub fn is_idle(&self) -> bool {
        self.coding.is_idle()
    }

    pub fn has_room(&self) -> bool {
        self.coding.has_room()
    }

    /// Takes a note in; one that cannot be coded (empty, or its prompt cannot be built) is
    /// answered at once.
    pub fn admit(&mut self, id: &str, text: &str, tag: T) -> Result<(), Refused<T>> {
        if text.trim().is_empty() {
            return Err(Box::new((
                tag,
                CodingError::Input {
                    what: format!("note {id}"),
                    why: "empty text".into(),
                },
            )));
        }
        self.coding.admit(id, text, tag)
    }

    /// One step of the batch (see [`ContinuousCoding::step`]): the notes answered since.
    pub fn step(&mut self, cancelled: impl Fn(&T) -> bool) -> Vec<Answered<T>> {
        let describe = self.coder.describer();
        let mut answered = self.coding.step(&describe, cancelled);
        for (_, result) in &mut answered {
            if let Ok(prediction) = result {
                self.coder.annotate(prediction);
            }
        }
        answered
    }
}

/// An engine plus the code sets: a note in, a described, guideline-checked prediction out.
pub struct Coder {
    engine: Engine,
    kb: Option<Arc<IcdKnowledge>>,
    descriptions: DescriptionCache,
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
                let embedder = sentence_embedder(&config.embedder, home)?;
                let describe = describer(kb.as_deref());
                let aids = FitAids {
                    lexicon,
                    embedder: embedder
                        .as_ref()
                        .map(|e| (e, &describe as &CodeDescriber<'_>)),
                };
                let index = retrieval_index(db, dataset, &config.fit_splits, aids)?;
                let description = format!("retrieval fitted on {}", index.fitted_on);
                (
                    Engine::Retrieval(Box::new(index), embedder.map(Box::new)),
                    description,
                )
            }
            EngineKind::Llm => {
                let engine = llm_engine(config, kb.as_deref(), home)?;
                let description = engine.name().to_string();
                (Engine::Llm(Box::new(engine)), description)
            }
            EngineKind::Openai => {
                let (codes, source) = allowed_codes(config, kb.as_deref())?;
                let engine = OpenaiEngine::new(
                    &config.openai,
                    prompt_template(config)?,
                    AllowedSet::new(&codes, source),
                    kb.clone(),
                )?;
                let description = engine.name().to_string();
                (Engine::Openai(Box::new(engine)), description)
            }
        };
        Ok(Self {
            engine,
            kb,
            descriptions: DescriptionCache::default(),
            description,
            kind: config.engine,
        })
    }

    /// Codes one note. Empty text is refused; the text itself never reaches a log.
    pub fn code(&self, id: &str, text: &str) -> Result<NotePrediction, CodingError> {
        self.code_unless_cancelled(id, text, &|| false)
    }

    /// [`Self::code`] for a caller that may go away: the llm engine stops generating as soon
    /// as `cancelled` says so ([`CodingError::Cancelled`]); the others are quick enough to
    /// finish.
    pub fn code_unless_cancelled(
        &self,
        id: &str,
        text: &str,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<NotePrediction, CodingError> {
        if text.trim().is_empty() {
            return Err(CodingError::Input {
                what: format!("note {id}"),
                why: "empty text".into(),
            });
        }
        let describe = self.describer();
        let mut prediction = match &self.engine {
            Engine::Retrieval(index, embedder) => {
                let lexicon = self.kb.as_deref().map(|kb| kb as &dyn Lexicon);
                index.predict(id, text, &describe, lexicon, embedder.as_deref())?
            }
            Engine::Llm(engine) => {
                engine.predict_unless_cancelled(id, text, &describe, cancelled)?
            }
            Engine::Openai(engine) => engine.predict(id, text, &describe)?,
        };
        self.annotate(&mut prediction);
        Ok(prediction)
    }

    /// With the llm engine: an empty continuous batch coding notes as they arrive (at most
    /// `max_rows` chunks generated together); `None` with the other engines.
    pub fn continuous<T>(&self, max_rows: usize) -> Option<ContinuousNotes<'_, T>> {
        match &self.engine {
            Engine::Llm(engine) => Some(ContinuousNotes {
                coder: self,
                coding: engine.continuous(max_rows),
            }),
            _ => None,
        }
    }

    /// The code sets' descriptions, each code looked up once.
    fn describer(&self) -> impl Fn(&str, CodeKind) -> Option<(String, bool)> + Sync + '_ {
        move |code, _kind| self.descriptions.describe(self.kb.as_deref()?, code)
    }

    /// What the code sets add to an engine's prediction: guideline warnings and their
    /// editions.
    fn annotate(&self, prediction: &mut NotePrediction) {
        if let Some(kb) = &self.kb {
            let warnings = guideline_warnings(kb, prediction);
            prediction.warnings.extend(warnings);
            prediction.code_sets = Some(format!("{}; {}", kb.cm.version, kb.pcs.version));
        }
    }

    /// Whether notes are best coded together ([`Self::continuous`]): the llm engine.
    pub fn batches(&self) -> bool {
        matches!(self.engine, Engine::Llm(_))
    }

    /// Whether notes may be coded in parallel (the llm engine uses every core for one; the
    /// openai engine waits on the network).
    pub fn parallel(&self) -> bool {
        matches!(self.engine, Engine::Retrieval(..) | Engine::Openai(_))
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
                    mentions: Vec::new(),
                }),
        );
        Ok(())
    })?;
    notes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((notes, names))
}

/// The dataset's evidence spans of the notes' gold codes, placed in the notes' texts: exact
/// when annotated on that text, by relative position when annotated on another language's
/// (CodiEsp: the Spanish original of an English note); spans whose source text length is
/// unknown (a database imported before it was recorded) cannot be placed and are left out.
fn add_gold_mentions(
    store: &Store,
    dataset: &str,
    notes: &mut [LabelledNote],
) -> Result<(), CodingError> {
    let at: HashMap<String, usize> = notes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.clone(), i))
        .collect();
    let mut unplaced = 0usize;
    for found in store.dataset_evidence(dataset)? {
        let Some(&i) = at.get(&found.doc_id) else {
            continue;
        };
        let note = &mut notes[i];
        let e = found.evidence;
        let kind = if e.kind == "procedure" {
            CodeKind::Procedure
        } else {
            CodeKind::Diagnosis
        };
        let gold = match kind {
            CodeKind::Diagnosis => &note.diagnoses,
            CodeKind::Procedure => &note.procedures,
        };
        if !gold.contains(&e.code) {
            continue;
        }
        let target = note.text.chars().count();
        let source = if found.lang.as_deref() == Some(e.spans_lang.as_str()) {
            Some(target as u64)
        } else {
            e.spans_text_chars
        };
        let first = e.spans.iter().map(|s| s.0).min();
        let last = e.spans.iter().map(|s| s.1).max();
        let placed = match (source, first, last) {
            (Some(source), Some(first), Some(last)) => {
                GoldMention::placed(kind, e.code, (first, last), source, target)
            }
            _ => None,
        };
        match placed {
            Some(mention) => note.mentions.push(mention),
            None => unplaced += 1,
        }
    }
    if unplaced > 0 {
        tracing::warn!(
            dataset,
            unplaced,
            "evidence spans that cannot be placed in the notes' text (unknown source length or out of range): not used; re-import the dataset to use them"
        );
    }
    Ok(())
}

/// The fitted index, from its cache beside the database when that was fitted on the same notes.
fn retrieval_index(
    db: &Path,
    dataset: &str,
    fit_splits: &[String],
    aids: FitAids<'_>,
) -> Result<RetrievalIndex, CodingError> {
    let (mut notes, names) = fit_notes(db, dataset, fit_splits)?;
    add_gold_mentions(&Store::open(db)?, dataset, &mut notes)?;
    // With and without sentence embeddings, an index is fitted differently: kept apart.
    let cache = db.with_file_name(format!(
        "{}.retrieval.{dataset}.{}{}.json",
        db.file_stem().and_then(|s| s.to_str()).unwrap_or("db"),
        names.join("+"),
        match aids.embedder {
            Some((embedder, _)) if embedder.is_static() => ".static-embedded",
            Some(_) => ".embedded",
            None => "",
        }
    ));
    let fingerprint = RetrievalIndex::fingerprint_of(&notes, &aids);
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
    let index = RetrievalIndex::fit(&notes, fitted_on, aids).map_err(|e| {
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

/// The retrieval engine's sentence embedder as `choice` names it (see
/// [`EngineConfig::embedder`]).
fn sentence_embedder(
    choice: &str,
    home: &MedcoderHome,
) -> Result<Option<SentenceEmbedder>, CodingError> {
    const DEFAULT: &str = "minilm-l6";
    let (choice, distilled) = match choice.strip_suffix(":static") {
        Some(name) => (name, true),
        None => (choice, false),
    };
    let dir = match choice {
        "none" => return Ok(None),
        "auto" if distilled => {
            return Err(CodingError::Invalid(
                "embedder `auto:static`: `auto` is already static; name the asset instead (`minilm-l6:static`)".into(),
            ))
        }
        "auto" => {
            let dir = home.asset_dir(DEFAULT);
            if !dir.join("model.safetensors").is_file() {
                tracing::warn!(
                    "the {DEFAULT} asset is not installed: the retrieval engine goes without sentence \
                     embeddings (run `medcoder assets fetch`)"
                );
                return Ok(None);
            }
            // The fast default: the asset's encoder distilled into static token vectors.
            return sentence_embedder(&format!("{DEFAULT}:static"), home);
        }
        other if medcoder_assets::asset_spec(other).is_some() => home.asset_dir(other),
        path => PathBuf::from(path),
    };
    if !dir.join("model.safetensors").is_file() {
        return Err(CodingError::Invalid(format!(
            "embedder `{choice}`: {} has no model.safetensors (an asset id needs `medcoder assets fetch`; \
             a folder must hold a sentence-transformers checkpoint)",
            dir.display()
        )));
    }
    let embedder_error =
        |e: medcoder_models::ModelError| CodingError::Invalid(format!("embedder `{choice}`: {e}"));
    let embedder =
        SentenceEmbedder::load(&dir, &candle_core::Device::Cpu).map_err(embedder_error)?;
    if !distilled {
        return Ok(Some(embedder));
    }
    // Distilled once per checkpoint (its folder, size and time) and recipe, kept in
    // medcoder's cache.
    let weights = fs_err::metadata(dir.join("model.safetensors"))?;
    let modified = weights
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let key = hex::encode(Sha256::digest(
        format!(
            "{}\n{}\n{modified}\n{}",
            dir.display(),
            weights.len(),
            SentenceEmbedder::STATIC_RECIPE
        )
        .as_bytes(),
    ));
    let cache = home
        .cache_dir()
        .join("static-embeddings")
        .join(format!("{}.safetensors", &key[..16]));
    tracing::info!(cache = %cache.display(), "static token vectors of {}", dir.display());
    embedder.distilled(&cache).map(Some).map_err(embedder_error)
}

fn llm_engine(
    config: &EngineConfig,
    kb: Option<&IcdKnowledge>,
    home: &MedcoderHome,
) -> Result<LlmEngine, CodingError> {
    let invalid = |e: &dyn std::fmt::Display| CodingError::Invalid(e.to_string());
    let choice = crate::registry::resolve_model_choice(
        config.model.as_deref(),
        config.adapter.as_deref(),
        home,
    )?;
    let resolved = choice.resolve_model(home).map_err(|e| invalid(&e))?;
    let (model, adapter, registered) = (choice.model, choice.adapter, choice.entry);
    let device = config
        .device
        .parse::<DeviceSpec>()
        .map_err(|e| invalid(&e))?
        .device()
        .map_err(|e| invalid(&e))?;
    let mut loaded =
        medcoder_models::load_model(&resolved, &device, None).map_err(|e| invalid(&e))?;
    let mut name = format!("llm {model}");
    if let Some(dir) = &adapter {
        medcoder_models::lora::apply_peft_adapter(&mut loaded.lm, dir).map_err(|e| {
            CodingError::Invalid(format!("applying the adapter {}: {e}", dir.display()))
        })?;
        match &registered {
            Some(entry) => name += &format!(" + adapter {} ({})", entry.id(), dir.display()),
            None => name += &format!(" + adapter {}", dir.display()),
        }
    }
    let template = prompt_template(config)?;
    let (allowed, source) = allowed_codes(config, kb)?;
    name += &format!(", constrained to the {} codes of {source}", allowed.len());
    LlmEngine::new(loaded, template, &allowed, config.max_prompt_tokens, name)
}

fn prompt_template(config: &EngineConfig) -> Result<PromptTemplate, CodingError> {
    match &config.prompt_template {
        Some(file) => {
            PromptTemplate::from_yaml_file(file).map_err(|e| CodingError::Invalid(e.to_string()))
        }
        None => Ok(PromptTemplate::default()),
    }
}

/// The codes an engine may write (sorted, unique) and where they come from.
fn allowed_codes(
    config: &EngineConfig,
    kb: Option<&IcdKnowledge>,
) -> Result<(Vec<(String, CodeKind)>, String), CodingError> {
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
    Ok((allowed, source))
}
