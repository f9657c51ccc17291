//! The report as a document: one list of headings, paragraphs, tables and plots, rendered
//! as Markdown (`report.md`, and what `medcoder eval` prints) and as a self-contained HTML
//! page (`report.html`: inline CSS, the plots by relative path, every text escaped).

use super::validity::{self, CodeValidity};
use super::{hierarchy, EvalReport, KindReport, PlotFile, Prf, Provenance, SHOWN_K};

/// What each metric of the report means: printed in the report and saved in its JSON.
pub fn definitions() -> impl Iterator<Item = (&'static str, &'static str)> {
    METRICS.iter().chain(validity::DEFINITIONS).copied()
}

const METRICS: &[(&str, &str)] = &[
    (
        "assigned codes",
        "The codes of a ranking the engine marked `assigned` (above its decision threshold): \
         the codes handed to a coder. Precision, recall and F1 are computed on them; MAP and \
         top k on the whole ranking. Codes are counted once per note.",
    ),
    (
        "micro P / R / F1",
        "Over every (note, code) pair: P = TP / (TP + FP), R = TP / (TP + FN), F1 = 2PR / (P + R).",
    ),
    (
        "macro P / R / F1",
        "Each code's P, R and F1 over the notes, averaged over every code in the gold or the \
         assigned codes.",
    ),
    (
        "MAP",
        "Mean over the gold notes of the ranking's average precision (CodiEsp's definition: the \
         sum of the precision at the rank of each gold code found, divided by the note's number \
         of gold codes). A gold note without a prediction scores 0.",
    ),
    (
        "MAP (predicted only)",
        "The same mean over the gold notes with at least one predicted code of the kind, as \
         CodiEsp's official script (trectools) computes it.",
    ),
    (
        "top k",
        "Micro P / R / F1 when the first k codes of each ranking are taken as the answer, \
         whatever the threshold; k from 1 to 50.",
    ),
    (
        "category level",
        "Every code cut to its first 3 characters before scoring: the ICD-10-CM category \
         (E11), the ICD-10-PCS section, body system and root operation (0DT).",
    ),
    (
        "chapter",
        "The ICD-10-CM chapter of a code's category; for ICD-10-PCS, the section (first \
         character). A false positive counts in the chapter of the predicted code, a false \
         negative in that of the gold code.",
    ),
    ("hierarchical P / R / F1", hierarchy::DEFINITION),
    (
        "unseen in training",
        "Gold codes of the scored split that no note of the training split has, and the share \
         of them among the assigned codes.",
    ),
];

/// A table; `markdown: false` keeps it out of the Markdown (which stays short enough to read
/// in a terminal) and in the HTML only.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    markdown: bool,
}

enum Block {
    /// Level 1 to 3.
    Heading(usize, String),
    Text(String),
    Table(Table),
    Image {
        file: String,
        alt: String,
    },
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> Block {
    Block::Table(Table {
        header: header.iter().map(|h| h.to_string()).collect(),
        rows,
        markdown: true,
    })
}

fn f3(value: f64) -> String {
    format!("{value:.3}")
}

fn prf_cells(p: &Prf) -> [String; 3] {
    [f3(p.precision), f3(p.recall), f3(p.f1)]
}

/// The whole report as blocks.
fn document(report: &EvalReport, provenance: &Provenance, plots: &[PlotFile]) -> Vec<Block> {
    let mut doc = vec![Block::Heading(1, provenance.title())];
    provenance_section(&mut doc, provenance);
    doc.push(Block::Text(format!(
        "Gold notes: {} · predicted notes: {} · gold notes without a prediction (scored 0): {} · predictions without gold (ignored): {}",
        report.notes_gold, report.notes_predicted, report.gold_without_predictions, report.predictions_without_gold
    )));
    doc.push(Block::Heading(2, "Summary".into()));
    let mut rows = Vec::new();
    for k in &report.kinds {
        for (level, s) in [("code", &k.code), ("category", &k.category)] {
            let mut row = vec![
                k.kind.as_str().to_string(),
                level.to_string(),
                k.notes.to_string(),
                f3(s.map),
                f3(s.map_predicted_only),
            ];
            row.extend(prf_cells(&s.micro));
            row.extend([s.macro_precision, s.macro_recall, s.macro_f1].map(f3));
            row.extend([s.micro.tp, s.micro.fp, s.micro.fn_].map(|n| n.to_string()));
            rows.push(row);
        }
    }
    doc.push(table(
        &[
            "kind",
            "level",
            "notes",
            "MAP",
            "MAP (predicted only)",
            "micro P",
            "micro R",
            "micro F1",
            "macro P",
            "macro R",
            "macro F1",
            "TP",
            "FP",
            "FN",
        ],
        rows,
    ));
    doc.push(Block::Heading(3, "Hierarchical partial credit".into()));
    doc.push(Block::Text(
        "Near misses in the ICD hierarchy earn part of a hit (see Definitions).".into(),
    ));
    doc.push(table(
        &[
            "kind",
            "hierarchical P",
            "hierarchical R",
            "hierarchical F1",
            "exact F1",
            "assigned codes",
            "assigned credit",
            "gold codes",
            "gold credit",
        ],
        report
            .kinds
            .iter()
            .map(|k| {
                let h = &k.hierarchical;
                vec![
                    k.kind.as_str().to_string(),
                    f3(h.precision),
                    f3(h.recall),
                    f3(h.f1),
                    f3(k.code.micro.f1),
                    h.assigned.to_string(),
                    format!("{:.2}", h.assigned_credit),
                    h.gold.to_string(),
                    format!("{:.2}", h.gold_credit),
                ]
            })
            .collect(),
    ));
    validity_section(&mut doc, report, provenance);
    for k in &report.kinds {
        kind_section(&mut doc, k, plots);
    }
    doc.push(Block::Heading(2, "Definitions".into()));
    doc.push(table(
        &["metric", "definition"],
        definitions()
            .map(|(name, text)| vec![name.to_string(), text.to_string()])
            .collect(),
    ));
    doc
}

/// Where the predictions and the gold came from, and what scored them.
fn provenance_section(doc: &mut Vec<Block>, provenance: &Provenance) {
    doc.push(Block::Heading(2, "Where the predictions came from".into()));
    let (p, g) = (&provenance.predictions, &provenance.gold);
    let or_none = |value: &Option<String>| value.clone().unwrap_or_else(|| "—".into());
    let mut rows = vec![
        vec!["predictions file".into(), p.file.clone()],
        vec!["predictions sha256".into(), p.sha256.clone()],
        vec!["predicted notes".into(), p.notes.to_string()],
        vec!["engines".into(), p.engines.join(", ")],
        vec!["models".into(), p.models.join("; ")],
        vec!["gold".into(), g.file.clone()],
        vec!["dataset".into(), or_none(&g.dataset)],
        vec!["split".into(), or_none(&g.split)],
        vec!["training split".into(), or_none(&g.training_split)],
        vec!["medcoder".into(), provenance.medcoder_version.clone()],
        vec!["evaluated at".into(), provenance.evaluated_at.clone()],
    ];
    match &provenance.code_sets {
        Some(sets) => {
            rows.push(vec!["ICD-10-CM code set".into(), sets.icd10_cm.clone()]);
            rows.push(vec!["ICD-10-PCS code set".into(), sets.icd10_pcs.clone()]);
        }
        None => rows.push(vec![
            "ICD code sets".into(),
            "not installed (`medcoder assets fetch` installs them): codes were not checked \
             against the US code set"
                .into(),
        ]),
    }
    doc.push(table(&["", "value"], rows));
}

/// How many predicted and gold codes are malformed, not in the US code set, or a US header.
fn validity_section(doc: &mut Vec<Block>, report: &EvalReport, provenance: &Provenance) {
    doc.push(Block::Heading(3, "Code validity".into()));
    match &provenance.code_sets {
        Some(sets) => doc.push(Block::Text(format!(
            "Checked against the US code sets: {} / {} (see Definitions).",
            sets.icd10_cm, sets.icd10_pcs
        ))),
        None => doc.push(Block::Text(
            "The ICD code sets are not installed (`medcoder assets fetch` installs them): \
             codes were checked for their shape only. Codes not in the US code set and US \
             headers were not counted (not checked, not 0)."
                .into(),
        )),
    }
    let percent = |n: usize, rate: f64| format!("{n} ({:.1}%)", rate * 100.0);
    let not_checked = || "not checked".to_string();
    let row = |kind: &str, which: &str, v: &CodeValidity| {
        let mut row = vec![
            kind.to_string(),
            which.to_string(),
            v.codes.to_string(),
            percent(v.malformed, v.malformed_rate),
        ];
        match &v.us_code_set {
            Some(us) => row.extend([
                percent(us.not_in_us_code_set, us.not_in_us_code_set_rate),
                percent(us.us_header_only, us.us_header_only_rate),
                percent(us.not_reportable_in_us, us.not_reportable_in_us_rate),
            ]),
            None => row.extend([not_checked(), not_checked(), not_checked()]),
        }
        row
    };
    let mut rows = Vec::new();
    for k in &report.kinds {
        let v = &k.code_validity;
        let kind = k.kind.as_str();
        rows.push(row(kind, "predicted (ranked)", &v.ranked));
        rows.push(row(kind, "predicted (assigned)", &v.assigned));
        rows.push(row(kind, "gold", &v.gold));
    }
    doc.push(table(
        &[
            "kind",
            "which codes",
            "checked",
            "malformed",
            "not in the US code set",
            "US header only",
            "not reportable in the US",
        ],
        rows,
    ));
}

fn kind_section(doc: &mut Vec<Block>, k: &KindReport, plots: &[PlotFile]) {
    let kind = k.kind.as_str();
    doc.push(Block::Heading(2, kind.to_string()));
    doc.push(Block::Text(format!(
        "Gold notes with {kind} codes: {} · of them with a prediction: {}",
        k.notes, k.notes_with_predictions
    )));
    if let Some((n, recall)) = k.unseen_in_training {
        doc.push(Block::Text(format!(
            "Gold codes unseen in training: {n}, recalled: {:.1}%",
            recall * 100.0
        )));
    }
    let images = plots.iter().filter(|p| p.kind == k.kind);
    let image_of = |plot: super::Plot| {
        images
            .clone()
            .find(|p| p.plot == plot)
            .map(|p| Block::Image {
                file: p.file.clone(),
                alt: plot.title(k.kind),
            })
    };
    doc.push(Block::Heading(3, "Top k".into()));
    doc.extend(image_of(super::Plot::TopK));
    let top_k_rows = |shown: &dyn Fn(usize) -> bool| {
        k.code
            .at_k
            .iter()
            .zip(&k.category.at_k)
            .filter(|((kk, _), _)| shown(*kk))
            .map(|((kk, code), (_, category))| {
                let mut row = vec![kk.to_string()];
                row.extend(prf_cells(code));
                row.extend(prf_cells(category));
                row
            })
            .collect::<Vec<_>>()
    };
    let header = [
        "top k",
        "P",
        "R",
        "F1",
        "category P",
        "category R",
        "category F1",
    ];
    doc.push(table(&header, top_k_rows(&|kk| SHOWN_K.contains(&kk))));
    doc.push(Block::Table(Table {
        header: header.iter().map(|h| h.to_string()).collect(),
        rows: top_k_rows(&|_| true),
        markdown: false,
    }));
    doc.push(Block::Heading(3, "Chapters".into()));
    doc.extend(image_of(super::Plot::ChapterF1));
    doc.push(table(
        &["chapter", "gold", "P", "R", "F1", "TP", "FP", "FN"],
        k.chapters
            .iter()
            .map(|c| {
                let mut row = vec![c.chapter.clone(), c.gold.to_string()];
                row.extend(prf_cells(&c.scores));
                row.extend([c.scores.tp, c.scores.fp, c.scores.fn_].map(|n| n.to_string()));
                row
            })
            .collect(),
    ));
    let invalid = &k.code_validity.ranked.frequent_invalid;
    if !invalid.is_empty() {
        doc.push(Block::Heading(3, "Invalid predicted codes".into()));
        doc.push(table(
            &["code", "notes", "why"],
            invalid
                .iter()
                .map(|c| {
                    vec![
                        c.code.clone(),
                        c.notes.to_string(),
                        c.why.label().to_string(),
                    ]
                })
                .collect(),
        ));
    }
    doc.push(Block::Heading(3, "Most frequent errors".into()));
    let errors = k
        .frequent_false_positives
        .len()
        .max(k.frequent_false_negatives.len());
    let cell = |list: &[(String, usize)], i: usize| {
        list.get(i)
            .map_or([String::new(), String::new()], |(c, n)| {
                [c.clone(), n.to_string()]
            })
    };
    doc.push(table(
        &["false positive", "times", "false negative", "times"],
        (0..errors)
            .map(|i| {
                let mut row = cell(&k.frequent_false_positives, i).to_vec();
                row.extend(cell(&k.frequent_false_negatives, i));
                row
            })
            .collect(),
    ));
}

/// The report as Markdown.
pub fn markdown(report: &EvalReport, provenance: &Provenance, plots: &[PlotFile]) -> String {
    let mut md = String::new();
    for block in document(report, provenance, plots) {
        match block {
            Block::Heading(level, text) => {
                md += &format!("{} {}\n\n", "#".repeat(level), one_line(&text));
            }
            Block::Text(text) => md += &format!("{text}\n\n"),
            Block::Image { file, alt } => md += &format!("![{}]({file})\n\n", one_line(&alt)),
            Block::Table(t) if t.markdown => {
                let row = |cells: &[String]| {
                    let cells: Vec<String> = cells.iter().map(|c| markdown_cell(c)).collect();
                    format!("| {} |\n", cells.join(" | "))
                };
                md += &row(&t.header);
                md += &format!("|{}\n", "---|".repeat(t.header.len()));
                for r in &t.rows {
                    md += &row(r);
                }
                md += "\n";
            }
            Block::Table(_) => {}
        }
    }
    md
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// A table cell: one line, its pipes escaped.
fn markdown_cell(text: &str) -> String {
    one_line(text).replace('|', "\\|")
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:75rem;padding:0 1rem;color:#222}\
h1{font-size:1.6rem}h2{margin-top:2.5rem;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}\
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left;vertical-align:top}\
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}";

/// The report as a self-contained HTML page; the plots are referenced by their file names
/// (relative to the report folder).
pub fn html(report: &EvalReport, provenance: &Provenance, plots: &[PlotFile]) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
        escape(&provenance.title())
    );
    let blocks = document(report, provenance, plots);
    for (i, block) in blocks.iter().enumerate() {
        match block {
            Block::Heading(level, text) => {
                out += &format!("<h{level}>{}</h{level}>\n", escape(text));
            }
            Block::Text(text) => out += &format!("<p>{}</p>\n", escape(text)),
            Block::Image { file, alt } => {
                out += &format!(
                    "<figure><img src=\"{}\" alt=\"{}\"></figure>\n",
                    escape(file),
                    escape(alt)
                );
            }
            Block::Table(t) => {
                // A short table followed by its full, HTML-only version: the full one is shown.
                if t.markdown
                    && matches!(blocks.get(i + 1), Some(Block::Table(next)) if !next.markdown)
                {
                    continue;
                }
                out += "<table>\n<thead><tr>";
                for h in &t.header {
                    out += &format!("<th>{}</th>", escape(h));
                }
                out += "</tr></thead>\n<tbody>\n";
                for r in &t.rows {
                    out += "<tr>";
                    for cell in r {
                        let numeric = !cell.is_empty()
                            && cell.chars().all(|c| c.is_ascii_digit() || c == '.');
                        let class = if numeric { " class=\"n\"" } else { "" };
                        out += &format!("<td{class}>{}</td>", escape(cell));
                    }
                    out += "</tr>\n";
                }
                out += "</tbody>\n</table>\n";
            }
        }
    }
    out += "</body>\n</html>\n";
    out
}

/// Text as HTML text or attribute value.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{sample_provenance, sample_report};
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">Tom & 'Jerry'</a>"),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(markdown_cell("a|b\nc"), "a\\|b c");
    }

    #[test]
    fn html_escapes_every_text_and_has_every_k() {
        let report = sample_report();
        let mut provenance = sample_provenance();
        provenance.predictions.engines = vec!["<script>alert(1)</script>".into()];
        provenance.predictions.file = "preds & <gold>.jsonl".into();
        let page = html(&report, &provenance, &[]);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("<title>Evaluation of preds &amp; &lt;gold&gt;.jsonl against"));
        // The full top-k table (k = 1…50) replaces the short one in the HTML.
        assert!(page.contains("<tr><td class=\"n\">49</td>"), "{page}");
        let md = markdown(&report, &provenance, &[]);
        assert!(md.contains("| predictions sha256 | 0000"), "{md}");
        assert!(md.contains("| ICD code sets | not installed"), "{md}");
        assert!(
            md.contains("| diagnosis | predicted (ranked) | 3 | 0 (0.0%) | not checked |"),
            "{md}"
        );
        assert!(md.contains("| 50 |"), "{md}");
        assert!(!md.contains("| 49 |"), "{md}");
        assert!(md.contains("| diagnosis | code | 2 |"), "{md}");
    }
}
