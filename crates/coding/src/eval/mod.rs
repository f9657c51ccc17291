//! Scoring predictions against gold codes, diagnoses and procedures apart: micro and macro
//! precision/recall/F1 on the assigned codes; MAP on the rankings (CodiEsp's definition, over
//! every gold note with a note without predictions scoring 0, and as the official script does,
//! over the notes with predictions only); P/R/F1 of the top k; the same at the 3-character
//! category level; per chapter; the most frequent errors; recall on codes unseen in training.
//! [`write_report`] writes it all as Markdown, HTML, JSON and PNG plots.

mod hierarchy;
mod plots;
pub mod provenance;
mod render;
pub mod validity;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::prediction::{CodeKind, NotePrediction};
use crate::CodingError;

pub use hierarchy::{hierarchy_credit, HierarchicalScores};
pub use plots::{Plot, PlotFile};
pub use provenance::Provenance;
pub use render::{definitions, html, markdown};
pub use validity::{CodeValidity, KindValidity, UsCodeSet, UsCodeStatus};

/// A note's gold codes.
#[derive(Debug, Clone)]
pub struct GoldNote {
    pub id: String,
    pub diagnoses: Vec<String>,
    pub procedures: Vec<String>,
}

impl GoldNote {
    pub fn codes(&self, kind: CodeKind) -> &[String] {
        match kind {
            CodeKind::Diagnosis => &self.diagnoses,
            CodeKind::Procedure => &self.procedures,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub tp: usize,
    pub fp: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Prf {
    fn from_counts(tp: usize, fp: usize, fn_: usize) -> Self {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (precision, recall) = (ratio(tp, tp + fp), ratio(tp, tp + fn_));
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Self {
            precision,
            recall,
            f1,
            tp,
            fp,
            fn_,
        }
    }
}

/// Scores at one granularity (full codes, or their 3-character categories).
#[derive(Debug, Clone, Serialize)]
pub struct LevelScores {
    pub micro: Prf,
    /// Mean over the codes in gold or predictions of each code's F1.
    pub macro_f1: f64,
    pub macro_precision: f64,
    pub macro_recall: f64,
    /// Over all gold notes (a note without predictions scores 0).
    pub map: f64,
    /// Over gold notes with at least one prediction (what the official CodiEsp script does).
    pub map_predicted_only: f64,
    /// (k, micro P/R/F1 of the top k of each ranking), for every k from 1 to [`MAX_K`].
    pub at_k: Vec<(usize, Prf)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChapterScores {
    pub chapter: String,
    pub gold: usize,
    pub scores: Prf,
}

#[derive(Debug, Clone, Serialize)]
pub struct KindReport {
    pub kind: CodeKind,
    /// Gold notes with at least one code of this kind.
    pub notes: usize,
    pub notes_with_predictions: usize,
    pub code: LevelScores,
    pub category: LevelScores,
    /// P/R/F1 of the assigned codes with partial credit for near misses in the hierarchy.
    pub hierarchical: HierarchicalScores,
    pub chapters: Vec<ChapterScores>,
    pub frequent_false_positives: Vec<(String, usize)>,
    pub frequent_false_negatives: Vec<(String, usize)>,
    /// Gold codes never seen in training, and the share of them recalled.
    pub unseen_in_training: Option<(usize, f64)>,
    /// Predicted and gold codes that are malformed, or (when the code sets are installed) not
    /// in the US code set or only a header there.
    pub code_validity: KindValidity,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub notes_gold: usize,
    pub notes_predicted: usize,
    /// Predicted notes without gold (ignored), and gold notes without a prediction (scored 0).
    pub predictions_without_gold: usize,
    pub gold_without_predictions: usize,
    pub kinds: Vec<KindReport>,
}

/// What [`evaluate`] may use besides predictions and gold.
#[derive(Default)]
pub struct EvalContext<'a> {
    /// Codes of the training notes, to measure recall on unseen ones.
    pub training_codes: Option<&'a HashSet<String>>,
    /// The US code set, to count codes it lacks or has only as a header; `None` when it is
    /// not installed (codes are then checked for their shape only).
    pub us_code_set: Option<&'a UsCodeSet<'a>>,
}

impl std::fmt::Debug for EvalContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalContext")
            .field("training_codes", &self.training_codes.map(HashSet::len))
            .field("us_code_set", &self.us_code_set)
            .finish()
    }
}

/// Top-k scores are computed for every k from 1 to this.
pub const MAX_K: usize = 50;
/// The k shown in the Markdown report's top-k table (the HTML and JSON have every k).
const SHOWN_K: [usize; 9] = [1, 3, 5, 10, 15, 20, 25, 30, 50];

pub fn evaluate(
    predictions: &[NotePrediction],
    gold: &[GoldNote],
    ctx: &EvalContext,
) -> EvalReport {
    let by_id: HashMap<&str, &NotePrediction> =
        predictions.iter().map(|p| (p.id.as_str(), p)).collect();
    let gold_ids: HashSet<&str> = gold.iter().map(|g| g.id.as_str()).collect();
    let kinds = CodeKind::BOTH
        .iter()
        .map(|&kind| kind_report(kind, &by_id, gold, ctx))
        .collect();
    EvalReport {
        notes_gold: gold.len(),
        notes_predicted: predictions.len(),
        predictions_without_gold: predictions
            .iter()
            .filter(|p| !gold_ids.contains(p.id.as_str()))
            .count(),
        gold_without_predictions: gold
            .iter()
            .filter(|g| !by_id.contains_key(g.id.as_str()))
            .count(),
        kinds,
    }
}

/// For each gold note of `kind`: (gold codes, ranked codes, assigned codes), mapped by `level`.
type Rows = Vec<(Vec<String>, Vec<String>, Vec<String>)>;

fn rows(
    kind: CodeKind,
    by_id: &HashMap<&str, &NotePrediction>,
    gold: &[GoldNote],
    level: fn(&str, CodeKind) -> String,
) -> Rows {
    let dedup = |codes: Vec<String>| {
        let mut seen = HashSet::new();
        codes
            .into_iter()
            .filter(|c| seen.insert(c.clone()))
            .collect::<Vec<_>>()
    };
    gold.iter()
        .filter(|g| !g.codes(kind).is_empty())
        .map(|g| {
            let gold_codes = dedup(g.codes(kind).iter().map(|c| level(c, kind)).collect());
            let (ranked, assigned) = match by_id.get(g.id.as_str()) {
                Some(p) => {
                    let ranking = p.ranking(kind);
                    (
                        dedup(ranking.iter().map(|c| level(&c.code, kind)).collect()),
                        dedup(
                            ranking
                                .iter()
                                .filter(|c| c.assigned)
                                .map(|c| level(&c.code, kind))
                                .collect(),
                        ),
                    )
                }
                None => (Vec::new(), Vec::new()),
            };
            (gold_codes, ranked, assigned)
        })
        .collect()
}

fn level_scores(rows: &Rows) -> LevelScores {
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    let mut per_code: HashMap<&str, (usize, usize, usize)> = HashMap::new();
    for (gold, _, assigned) in rows {
        for code in assigned {
            let hit = gold.contains(code);
            let entry = per_code.entry(code).or_default();
            if hit {
                tp += 1;
                entry.0 += 1;
            } else {
                fp += 1;
                entry.1 += 1;
            }
        }
        for code in gold.iter().filter(|c| !assigned.contains(c)) {
            fn_ += 1;
            per_code.entry(code).or_default().2 += 1;
        }
    }
    let n = per_code.len().max(1) as f64;
    let macro_of = |f: fn(&Prf) -> f64| {
        per_code
            .values()
            .map(|&(tp, fp, fn_)| f(&Prf::from_counts(tp, fp, fn_)))
            .sum::<f64>()
            / n
    };
    let (mut map_sum, mut predicted, mut predicted_sum) = (0.0, 0usize, 0.0);
    for (gold, ranked, _) in rows {
        let ap = average_precision(ranked, gold);
        map_sum += ap;
        if !ranked.is_empty() {
            predicted += 1;
            predicted_sum += ap;
        }
    }
    let at_k = (1..=MAX_K)
        .map(|k| {
            let (mut tp, mut fp, mut fn_) = (0, 0, 0);
            for (gold, ranked, _) in rows {
                let top = &ranked[..k.min(ranked.len())];
                let hits = top.iter().filter(|c| gold.contains(c)).count();
                tp += hits;
                fp += top.len() - hits;
                fn_ += gold.len() - hits;
            }
            (k, Prf::from_counts(tp, fp, fn_))
        })
        .collect();
    LevelScores {
        micro: Prf::from_counts(tp, fp, fn_),
        macro_f1: macro_of(|p| p.f1),
        macro_precision: macro_of(|p| p.precision),
        macro_recall: macro_of(|p| p.recall),
        map: map_sum / rows.len().max(1) as f64,
        map_predicted_only: if predicted == 0 {
            0.0
        } else {
            predicted_sum / predicted as f64
        },
        at_k,
    }
}

/// What `report.json` holds: where the inputs came from, the scores, the plots beside it, and
/// what each metric means.
#[derive(Serialize)]
struct ReportJson<'a> {
    provenance: &'a Provenance,
    #[serde(flatten)]
    report: &'a EvalReport,
    plots: &'a [PlotFile],
    definitions: BTreeMap<&'static str, &'static str>,
}

/// Writes `report.md`, `report.html`, `report.json` and the plots (PNG) into `dir`, created
/// when missing; each file is replaced atomically. Returns the paths written.
pub fn write_report(
    dir: &Path,
    report: &EvalReport,
    provenance: &Provenance,
) -> Result<Vec<PathBuf>, CodingError> {
    fs_err::create_dir_all(dir)?;
    let plots = plots::write_plots(dir, report)?;
    let json = ReportJson {
        provenance,
        report,
        plots: &plots,
        definitions: definitions().collect(),
    };
    let json = serde_json::to_string_pretty(&json)
        .map_err(|e| CodingError::Invalid(format!("serializing the report: {e}")))?;
    let documents = [
        ("report.md", markdown(report, provenance, &plots)),
        ("report.html", html(report, provenance, &plots)),
        ("report.json", json),
    ];
    let mut written = Vec::new();
    for (name, text) in documents {
        let path = dir.join(name);
        medcoder_train::atomic::write_file(&path, text.as_bytes())?;
        written.push(path);
    }
    written.extend(plots.iter().map(|p| dir.join(&p.file)));
    Ok(written)
}

/// CodiEsp's average precision: Σ over relevant ranks of precision at that rank, / |gold|.
pub fn average_precision<R: AsRef<str>, G: AsRef<str>>(
    ranked: impl IntoIterator<Item = R>,
    gold: &[G],
) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    let mut hits = 0;
    let mut sum = 0.0;
    for (i, code) in ranked.into_iter().enumerate() {
        if gold.iter().any(|g| g.as_ref() == code.as_ref()) {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    sum / gold.len() as f64
}

fn full_code(code: &str, _: CodeKind) -> String {
    code.to_string()
}

/// The 3-character category (CM `E11`, PCS section + body system + operation).
pub fn category(code: &str, _: CodeKind) -> String {
    code.chars().filter(|c| *c != '.').take(3).collect()
}

/// ICD-10-CM chapter by code range, or the PCS section.
pub fn chapter(code: &str, kind: CodeKind) -> String {
    if kind == CodeKind::Procedure {
        return match code.chars().next() {
            Some('0') => "0 Medical and Surgical",
            Some('1') => "1 Obstetrics",
            Some('2') => "2 Placement",
            Some('3') => "3 Administration",
            Some('4') => "4 Measurement and Monitoring",
            Some('5') => "5 Extracorporeal Assistance",
            Some('6') => "6 Extracorporeal Therapies",
            Some('7') => "7 Osteopathic",
            Some('8') => "8 Other Procedures",
            Some('9') => "9 Chiropractic",
            Some('B') => "B Imaging",
            Some('C') => "C Nuclear Medicine",
            Some('D') => "D Radiation Therapy",
            Some('F') => "F Physical Rehabilitation",
            Some('G') => "G Mental Health",
            Some('H') => "H Substance Abuse",
            Some('X') => "X New Technology",
            _ => "other",
        }
        .into();
    }
    const CHAPTERS: [(&str, &str, &str); 22] = [
        ("A00", "B99", "01 Infectious"),
        ("C00", "D49", "02 Neoplasms"),
        ("D50", "D89", "03 Blood"),
        ("E00", "E89", "04 Endocrine"),
        ("F01", "F99", "05 Mental"),
        ("G00", "G99", "06 Nervous"),
        ("H00", "H59", "07 Eye"),
        ("H60", "H95", "08 Ear"),
        ("I00", "I99", "09 Circulatory"),
        ("J00", "J99", "10 Respiratory"),
        ("K00", "K95", "11 Digestive"),
        ("L00", "L99", "12 Skin"),
        ("M00", "M99", "13 Musculoskeletal"),
        ("N00", "N99", "14 Genitourinary"),
        ("O00", "O9A", "15 Pregnancy"),
        ("P00", "P96", "16 Perinatal"),
        ("Q00", "Q99", "17 Congenital"),
        ("R00", "R99", "18 Symptoms"),
        ("S00", "T88", "19 Injury"),
        ("U00", "U85", "22 Special purposes"),
        ("V00", "Y99", "20 External causes"),
        ("Z00", "Z99", "21 Factors"),
    ];
    let cat = category(code, kind);
    CHAPTERS
        .iter()
        .find(|(lo, hi, _)| cat.as_str() >= *lo && cat.as_str() <= *hi)
        .map_or("other", |(_, _, name)| name)
        .to_string()
}

fn kind_report(
    kind: CodeKind,
    by_id: &HashMap<&str, &NotePrediction>,
    gold: &[GoldNote],
    ctx: &EvalContext,
) -> KindReport {
    let code_rows = rows(kind, by_id, gold, full_code);
    let category_rows = rows(kind, by_id, gold, category);
    let mut chapters: BTreeMap<String, (usize, usize, usize, usize)> = BTreeMap::new();
    let mut false_pos: HashMap<String, usize> = HashMap::new();
    let mut false_neg: HashMap<String, usize> = HashMap::new();
    let (mut unseen, mut unseen_hit) = (0usize, 0usize);
    for (gold, _, assigned) in &code_rows {
        for code in assigned {
            let entry = chapters.entry(chapter(code, kind)).or_default();
            if gold.contains(code) {
                entry.0 += 1;
            } else {
                entry.1 += 1;
                *false_pos.entry(code.clone()).or_default() += 1;
            }
        }
        for code in gold {
            let entry = chapters.entry(chapter(code, kind)).or_default();
            entry.3 += 1;
            let hit = assigned.contains(code);
            if !hit {
                entry.2 += 1;
                *false_neg.entry(code.clone()).or_default() += 1;
            }
            if ctx.training_codes.is_some_and(|t| !t.contains(code)) {
                unseen += 1;
                unseen_hit += usize::from(hit);
            }
        }
    }
    let top = |counts: HashMap<String, usize>| {
        let mut v: Vec<(String, usize)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(15);
        v
    };
    let ranked_codes = |assigned_only: bool| {
        by_id.values().map(move |p| {
            p.ranking(kind)
                .iter()
                .filter(move |c| c.assigned || !assigned_only)
                .map(|c| c.code.as_str())
        })
    };
    let code_validity = KindValidity {
        ranked: validity::code_validity(ranked_codes(false), kind, ctx.us_code_set),
        assigned: validity::code_validity(ranked_codes(true), kind, ctx.us_code_set),
        gold: validity::code_validity(
            gold.iter()
                .map(|g| g.codes(kind).iter().map(String::as_str)),
            kind,
            ctx.us_code_set,
        ),
    };
    KindReport {
        kind,
        notes: code_rows.len(),
        notes_with_predictions: code_rows.iter().filter(|r| !r.1.is_empty()).count(),
        code: level_scores(&code_rows),
        category: level_scores(&category_rows),
        hierarchical: hierarchy::hierarchical_scores(&code_rows),
        chapters: chapters
            .into_iter()
            .map(|(chapter, (tp, fp, fn_, gold))| ChapterScores {
                chapter,
                gold,
                scores: Prf::from_counts(tp, fp, fn_),
            })
            .collect(),
        frequent_false_positives: top(false_pos),
        frequent_false_negatives: top(false_neg),
        unseen_in_training: ctx.training_codes.map(|_| {
            (
                unseen,
                if unseen == 0 {
                    0.0
                } else {
                    unseen_hit as f64 / unseen as f64
                },
            )
        }),
        code_validity,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::prediction::CodedItem;

    fn item(code: &str, rank: usize, assigned: bool) -> CodedItem {
        CodedItem {
            code: code.into(),
            rank,
            confidence: 0.5,
            assigned,
            description: None,
            billable: None,
            evidence: Vec::new(),
            assertion: None,
        }
    }

    fn sample_gold() -> Vec<GoldNote> {
        vec![
            GoldNote {
                id: "a".into(),
                diagnoses: vec!["E11.9".into(), "I10".into()],
                procedures: vec![],
            },
            GoldNote {
                id: "b".into(),
                diagnoses: vec!["J18.9".into()],
                procedures: vec![],
            },
        ]
    }

    fn sample_prediction() -> NotePrediction {
        NotePrediction {
            id: "a".into(),
            diagnoses: vec![
                item("I10", 1, true),
                item("E11.8", 2, true),
                item("E11.9", 3, false),
            ],
            procedures: vec![],
            warnings: vec![],
            engine: "test".into(),
            model: "m".into(),
            elapsed_ms: 0.0,
            code_sets: None,
        }
    }

    pub(super) fn sample_provenance() -> Provenance {
        Provenance {
            predictions: provenance::PredictionSource {
                file: "preds.jsonl".into(),
                sha256: "00".repeat(32),
                notes: 1,
                engines: vec!["test".into()],
                models: vec!["m".into()],
            },
            gold: provenance::GoldSource {
                file: "c.duckdb".into(),
                dataset: Some("codiesp".into()),
                split: Some("validation".into()),
                training_split: Some("train".into()),
            },
            medcoder_version: "0.1.0".into(),
            evaluated_at: "2026-04-01T09:30:00Z".into(),
            code_sets: None,
        }
    }

    /// Two gold notes with diagnoses only; one predicted.
    pub(super) fn sample_report() -> EvalReport {
        evaluate(
            &[sample_prediction()],
            &sample_gold(),
            &EvalContext::default(),
        )
    }

    #[test]
    fn map_counts_missing_predictions_as_zero_and_f1_uses_assigned_codes() {
        let report = sample_report();
        let d = &report.kinds[0];
        // AP(a) = (1/1 + 2/3) / 2; AP(b) = 0 (no prediction)
        let ap_a = (1.0 + 2.0 / 3.0) / 2.0;
        assert!((d.code.map - ap_a / 2.0).abs() < 1e-12);
        assert!((d.code.map_predicted_only - ap_a).abs() < 1e-12);
        // assigned {I10, E11.8}: tp 1, fp 1, fn 2 (E11.9, J18.9)
        assert_eq!(
            (d.code.micro.tp, d.code.micro.fp, d.code.micro.fn_),
            (1, 1, 2)
        );
        // categories: assigned {I10, E11} vs gold {E11, I10} and {J18}
        assert_eq!((d.category.micro.tp, d.category.micro.fp), (2, 0));
        assert_eq!(report.gold_without_predictions, 1);
        assert_eq!(chapter("E11.9", CodeKind::Diagnosis), "04 Endocrine");
        assert_eq!(
            chapter("0DTJ4ZZ", CodeKind::Procedure),
            "0 Medical and Surgical"
        );
        // Hierarchical: E11.8 earns 3/4 against E11.9 (and E11.9 against it); I10 is exact.
        assert!((d.hierarchical.precision - 1.75 / 2.0).abs() < 1e-12);
        assert!((d.hierarchical.recall - 1.75 / 3.0).abs() < 1e-12);
        let top1 = d.code.at_k[0].1;
        assert_eq!((top1.tp, top1.fp, top1.fn_), (1, 0, 2));
        assert_eq!(d.code.at_k.len(), MAX_K);
        let top50 = d.code.at_k[MAX_K - 1];
        assert_eq!(top50.0, 50);
        assert_eq!((top50.1.tp, top50.1.fp, top50.1.fn_), (2, 1, 1));
    }

    #[test]
    fn predicted_and_gold_codes_are_checked_against_the_us_code_set() {
        let mut prediction = sample_prediction();
        prediction.diagnoses.push(item("R51", 4, true));
        prediction.diagnoses.push(item("E1.19", 5, false));
        let us = UsCodeSet::new("test", |code, _| match code {
            "R51" => UsCodeStatus::HeaderOnly,
            "E11.8" => UsCodeStatus::NotInCodeSet,
            _ => UsCodeStatus::Reportable,
        });
        let ctx = EvalContext {
            training_codes: None,
            us_code_set: Some(&us),
        };
        let report = evaluate(&[prediction], &sample_gold(), &ctx);
        let v = &report.kinds[0].code_validity;
        // Ranked: I10, E11.8, E11.9, R51, E1.19.
        assert_eq!((v.ranked.codes, v.ranked.malformed), (5, 1));
        let us_counts = v.ranked.us_code_set.as_ref().unwrap();
        assert_eq!(
            (us_counts.not_in_us_code_set, us_counts.us_header_only),
            (1, 1)
        );
        assert_eq!(us_counts.not_reportable_in_us, 3);
        // Assigned: I10, E11.8, R51.
        let assigned = v.assigned.us_code_set.as_ref().unwrap();
        assert_eq!((v.assigned.codes, assigned.not_reportable_in_us), (3, 2));
        assert_eq!((v.gold.codes, v.gold.malformed), (3, 0));
        // Without the code sets the US counts are absent, not 0.
        let report = evaluate(
            &[sample_prediction()],
            &sample_gold(),
            &EvalContext::default(),
        );
        assert!(report.kinds[0].code_validity.ranked.us_code_set.is_none());
    }

    #[test]
    fn write_report_writes_every_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report");
        let written = write_report(&out, &sample_report(), &sample_provenance()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "chapter_f1_diagnosis.png",
                "report.html",
                "report.json",
                "report.md",
                "top_k_diagnosis.png",
                "top_k_procedure.png"
            ]
        );
        assert_eq!(written.len(), names.len());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(
            json["kinds"][0]["code"]["at_k"].as_array().unwrap().len(),
            50
        );
        assert_eq!(json["plots"][0]["file"], "top_k_diagnosis.png");
        assert_eq!(json["provenance"]["predictions"]["engines"][0], "test");
        assert_eq!(json["provenance"]["gold"]["dataset"], "codiesp");
        assert!(json["definitions"]["MAP"]
            .as_str()
            .unwrap()
            .contains("CodiEsp"));
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert!(html.contains("<img src=\"top_k_diagnosis.png\""), "{html}");
    }
}
