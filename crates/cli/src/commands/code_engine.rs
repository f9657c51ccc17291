//! The coding engines behind `medcoder code` and `medcoder bench code`, built from the
//! command line: `retrieval` (fitted on a prepared dataset, cached beside it) and `llm` (a
//! local model + adapter under constrained decoding).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_coding::lexical::Lexicon;
use medcoder_coding::llm::LlmEngine;
use medcoder_coding::prediction::CodeDescriber;
use medcoder_coding::retrieval::{LabelledNote, RetrievalIndex};
use medcoder_coding::{CodeKind, NotePrediction};
use medcoder_icd::cm::CmKind;
use medcoder_icd::IcdKnowledge;
use medcoder_models::DeviceSpec;
use medcoder_store::{Split, Store};
use medcoder_train::PromptTemplate;

#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// The coding engine: `retrieval` (no GPU, no fine-tune) or `llm` (a local model under
    /// constrained decoding). `openai` is not built yet.
    #[arg(long, default_value = "retrieval")]
    pub engine: String,
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
    #[arg(long, value_enum, default_value = "dataset")]
    pub allowed: AllowedCodes,
    /// llm: prompt tokens at most (longer notes keep their head and tail, with a warning).
    #[arg(long, default_value_t = 2048)]
    pub max_prompt_tokens: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllowedCodes {
    Dataset,
    Us,
    UsBillable,
}

pub enum Engine<'a> {
    Retrieval {
        index: Box<RetrievalIndex>,
        lexicon: Option<&'a dyn Lexicon>,
    },
    Llm(Box<LlmEngine>),
}

impl<'a> Engine<'a> {
    pub fn build(
        args: &EngineArgs,
        kb: Option<&'a IcdKnowledge>,
        home: &MedcoderHome,
    ) -> anyhow::Result<Self> {
        match args.engine.as_str() {
            "retrieval" => {
                let lexicon = kb.map(|kb| kb as &dyn Lexicon);
                let index = retrieval_index(&args.db, &args.dataset, &args.fit_splits, lexicon)?;
                Ok(Self::Retrieval {
                    index: Box::new(index),
                    lexicon,
                })
            }
            "llm" => Ok(Self::Llm(Box::new(llm_engine(args, kb, home)?))),
            other => bail!(
                "unknown or unavailable engine `{other}`: this build has `retrieval` and `llm` (`openai` is not built yet)"
            ),
        }
    }

    pub fn predict(
        &self,
        id: &str,
        text: &str,
        describe: &CodeDescriber<'_>,
    ) -> anyhow::Result<NotePrediction> {
        Ok(match self {
            Self::Retrieval { index, lexicon } => index.predict(id, text, describe, *lexicon),
            Self::Llm(engine) => engine.predict(id, text, describe)?,
        })
    }

    /// Whether notes may be coded in parallel (the llm engine uses every core for one).
    pub fn parallel(&self) -> bool {
        matches!(self, Self::Retrieval { .. })
    }
}

fn llm_engine(
    args: &EngineArgs,
    kb: Option<&IcdKnowledge>,
    home: &MedcoderHome,
) -> anyhow::Result<LlmEngine> {
    let Some(model) = &args.model else {
        bail!("the llm engine needs --model (an asset id, HF folder or GGUF file)")
    };
    let resolved = model.parse::<ModelRef>()?.resolve(home)?;
    let device = args.device.device()?;
    let mut loaded = medcoder_models::load_model(&resolved, &device, None)?;
    let mut name = format!("llm {model}");
    if let Some(dir) = &args.adapter {
        medcoder_models::lora::apply_peft_adapter(&mut loaded.lm, dir)
            .with_context(|| format!("applying the adapter {}", dir.display()))?;
        name += &format!(" + adapter {}", dir.display());
    }
    let template = match &args.prompt_template {
        Some(file) => PromptTemplate::from_yaml_file(file)?,
        None => PromptTemplate::default(),
    };
    let (mut allowed, source) = match args.allowed {
        AllowedCodes::Dataset => {
            let (notes, names) = fit_notes(&args.db, &args.dataset, &args.fit_splits)?;
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
            (codes, format!("{} {}", args.dataset, names.join("+")))
        }
        AllowedCodes::Us | AllowedCodes::UsBillable => {
            let Some(kb) = kb else {
                bail!("--allowed us needs the ICD code sets: run `medcoder assets fetch`")
            };
            let billable_only = args.allowed == AllowedCodes::UsBillable;
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
    Ok(LlmEngine::new(
        loaded,
        template,
        &allowed,
        args.max_prompt_tokens,
        name,
    )?)
}

/// The ICD code sets, or `None` with a warning saying what coding loses without them.
pub fn load_code_sets(home: &MedcoderHome) -> Option<IcdKnowledge> {
    match IcdKnowledge::load(home) {
        Ok(kb) => Some(kb),
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
    move |code, _kind| {
        let info = kb?.lookup(code).ok()?;
        Some((info.description, info.billable))
    }
}

/// The notes with text of `split`, sorted by id; an error when there are none.
pub fn split_notes(db: &Path, dataset: &str, split: &str) -> anyhow::Result<Vec<LabelledNote>> {
    let (notes, names) = fit_notes(db, dataset, &[split.to_string()])?;
    if notes.is_empty() {
        bail!(
            "{dataset} in {} has no notes with text in split {}",
            db.display(),
            names.join("+")
        );
    }
    Ok(notes)
}

/// The labelled notes of `fit_splits`, sorted by id, and the splits' names.
fn fit_notes(
    db: &Path,
    dataset: &str,
    fit_splits: &[String],
) -> anyhow::Result<(Vec<LabelledNote>, Vec<&'static str>)> {
    let splits: Vec<Split> = fit_splits
        .iter()
        .map(|s| s.parse::<Split>())
        .collect::<Result<_, _>>()?;
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
pub(crate) fn retrieval_index(
    db: &Path,
    dataset: &str,
    fit_splits: &[String],
    lexicon: Option<&dyn Lexicon>,
) -> anyhow::Result<RetrievalIndex> {
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
    let index = RetrievalIndex::fit(&notes, fitted_on, lexicon).with_context(|| {
        format!(
            "fitting the retrieval engine on {} of {}",
            names.join("+"),
            db.display()
        )
    })?;
    tracing::info!(calibration = ?index.calibration, "retrieval index fitted");
    medcoder_train::atomic::write_file(&cache, index.to_json()?.as_bytes())?;
    Ok(index)
}
