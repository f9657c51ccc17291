use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use medcoder_assets::MedcoderHome;
use medcoder_icd::{cm::CmKind, CodeInfo, CodeSystem, IcdKnowledge, SearchFilter};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum IcdCommand {
    /// Description, billable flag, hierarchy, notes of a code (CM or PCS, full or partial).
    Show {
        /// e.g. E11.9, e119, S72.001A, 0DTJ4ZZ, BT41, or a block such as E08-E13.
        code: String,
        #[arg(long)]
        json: bool,
    },
    /// Codes ranked for a term: titles and inclusion terms, stemmed, abbreviations expanded.
    Search {
        query: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Only diagnoses (cm) or procedures (pcs).
        #[arg(long, value_enum)]
        system: Option<SystemArg>,
        /// Only codes that may be reported.
        #[arg(long)]
        billable: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check codes, one per line (FILE or - for stdin): prints the normalized code or why not.
    ///
    /// Exits 1 when any code is invalid. Blank lines and lines starting with # are skipped.
    Validate {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Report pairs of codes that an Excludes1 note forbids reporting together.
    Conflicts {
        #[arg(required = true, num_args = 2..)]
        codes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Use the official CMS ICD-10-PCS tables XML (icd10pcs_tables_<year>.xml) for PCS:
    /// that fiscal year's codes and the names of every axis value, all sections.
    ///
    /// No registry package ships this file; download it from CMS with the yearly ICD-10-PCS
    /// files. It is checked, then copied into $MEDCODER_HOME/sources.
    ImportPcsTables { file: PathBuf },
    /// Code counts of the loaded code sets and the load time.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SystemArg {
    Cm,
    Pcs,
}

pub fn run(command: IcdCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    if let IcdCommand::ImportPcsTables { file } = &command {
        return import_pcs_tables(file, home);
    }
    let started = Instant::now();
    let kb = IcdKnowledge::load(home).context("loading the ICD knowledge base")?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(load_ms, "ICD knowledge base ready");
    match command {
        IcdCommand::Show { code, json } => {
            let info = kb.lookup(&code)?;
            if json {
                super::print_json(&info)?;
            } else {
                print_info(&info)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        IcdCommand::Search {
            query,
            limit,
            system,
            billable,
            json,
        } => {
            let filter = SearchFilter {
                system: system.map(|s| match s {
                    SystemArg::Cm => CodeSystem::Cm,
                    SystemArg::Pcs => CodeSystem::Pcs,
                }),
                billable_only: billable,
            };
            let started = Instant::now();
            let hits = kb.search(&query, limit, filter);
            tracing::info!(
                search_ms = started.elapsed().as_secs_f64() * 1e3,
                "search done"
            );
            if json {
                super::print_json(&hits)?;
            } else if hits.is_empty() {
                outln!("no code matches `{query}`");
            } else {
                for hit in &hits {
                    let mark = if hit.billable { ' ' } else { '*' };
                    outln!(
                        "{:<9}{mark} {:>6.2}  {}",
                        hit.code,
                        hit.score,
                        hit.description
                    );
                }
                if hits.iter().any(|h| !h.billable) {
                    outln!("(* header code: not billable)");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        IcdCommand::Validate { file, json } => validate(&kb, &file, json),
        IcdCommand::Conflicts { codes, json } => {
            #[derive(Serialize)]
            struct Pair<'a> {
                a: &'a str,
                b: &'a str,
                note_at: String,
                note: String,
            }
            let mut pairs = Vec::new();
            for (i, a) in codes.iter().enumerate() {
                for b in &codes[i + 1..] {
                    if let Some(conflict) = kb.excludes1_conflict(a, b)? {
                        pairs.push(Pair {
                            a,
                            b,
                            note_at: conflict.note_at,
                            note: conflict.note,
                        });
                    }
                }
            }
            if json {
                super::print_json(&pairs)?;
            } else if pairs.is_empty() {
                outln!("no Excludes1 conflict");
            } else {
                for p in &pairs {
                    outln!("{} + {}: Excludes1 at {}: {}", p.a, p.b, p.note_at, p.note);
                }
            }
            Ok(if pairs.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        IcdCommand::ImportPcsTables { .. } => unreachable!("handled before loading"),
        IcdCommand::Stats { json } => {
            let stats = serde_json::json!({
                "cm_version": kb.cm.version,
                "pcs_version": kb.pcs.version,
                "cm_chapters": kb.cm.count_of(CmKind::Chapter),
                "cm_blocks": kb.cm.count_of(CmKind::Block),
                "cm_categories": kb.cm.count_of(CmKind::Category),
                "cm_subcategories": kb.cm.count_of(CmKind::Subcategory),
                "cm_seventh_character_codes": kb.cm.count_of(CmKind::Extended),
                "cm_billable": kb.cm.billable_count(),
                "pcs_codes": kb.pcs.codes.len(),
                "search_documents": kb.search_doc_count(),
                "load_ms": (load_ms * 10.0).round() / 10.0,
            });
            if json {
                super::print_json(&stats)?;
            } else if let Some(map) = stats.as_object() {
                for (key, value) in map {
                    outln!("{key:<28} {value}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_info(info: &CodeInfo) -> anyhow::Result<()> {
    let billable = if info.billable {
        "billable"
    } else {
        "not billable"
    };
    outln!("{}  {}", info.code, info.description);
    outln!("  {} · {} · {}", info.version, info.kind, billable);
    if !info.parents.is_empty() {
        outln!("  within:");
        for p in &info.parents {
            outln!("    {:<10} {}", p.code, p.description);
        }
    }
    if !info.axes.is_empty() {
        outln!("  axes:");
        for a in &info.axes {
            let label = a
                .label
                .as_deref()
                .unwrap_or("(value not named by the loaded sources)");
            outln!("    {} {:<32} {}  {label}", a.position, a.axis, a.value);
        }
    }
    if !info.seventh_characters.is_empty() {
        outln!("  7th characters:");
        for s in &info.seventh_characters {
            outln!("    {}  {}", s.character, s.meaning);
        }
    }
    if !info.children.is_empty() {
        outln!("  codes below ({}):", info.children.len());
        for c in info.children.iter().take(40) {
            let mark = if c.billable { ' ' } else { '*' };
            outln!("    {:<10}{mark} {}", c.code, c.description);
        }
        if info.children.len() > 40 {
            outln!("    … {} more", info.children.len() - 40);
        }
    }
    if !info.notes.is_empty() {
        outln!("  notes:");
        for n in &info.notes {
            let at = if n.from == info.code {
                String::new()
            } else {
                format!(" (at {})", n.from)
            };
            outln!("    {}{at}: {}", n.kind.label(), n.text);
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct ValidationRow {
    line: usize,
    input: String,
    valid: bool,
    code: Option<String>,
    system: Option<CodeSystem>,
    description: Option<String>,
    error: Option<String>,
}

fn validate(kb: &IcdKnowledge, file: &PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = fs_open(file)?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", file.display(), i + 1))?;
        let input = line.trim();
        if input.is_empty() || input.starts_with('#') {
            continue;
        }
        let row = match kb.validate(input) {
            Ok(valid) => ValidationRow {
                line: i + 1,
                input: input.to_string(),
                valid: true,
                code: Some(valid.code.to_string()),
                system: Some(valid.code.system()),
                description: Some(valid.description),
                error: None,
            },
            Err(error) => ValidationRow {
                line: i + 1,
                input: input.to_string(),
                valid: false,
                code: None,
                system: None,
                description: None,
                error: Some(error.to_string()),
            },
        };
        rows.push(row);
    }
    let invalid = rows.iter().filter(|r| !r.valid).count();
    if json {
        super::print_json(&rows)?;
    } else {
        let mut out = std::io::stdout().lock();
        for r in &rows {
            match (&r.code, &r.error) {
                (Some(code), _) => writeln!(
                    out,
                    "{code}\t{}",
                    r.description.as_deref().unwrap_or_default()
                )?,
                (None, Some(error)) => {
                    writeln!(out, "{}\tINVALID (line {}): {error}", r.input, r.line)?
                }
                _ => {}
            }
        }
        writeln!(out, "{} valid, {invalid} invalid", rows.len() - invalid)?;
    }
    Ok(if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn fs_open(path: &PathBuf) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn import_pcs_tables(file: &PathBuf, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let tables = medcoder_icd::parse_pcs_tables(file)?;
    anyhow::ensure!(
        !tables.codes.is_empty(),
        "{}: no ICD-10-PCS table found (expected <pcsTable> elements)",
        file.display()
    );
    let target = medcoder_icd::pcs_tables_path(home);
    let dir = target.parent().context("sources folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::copy(file, tmp.path()).with_context(|| format!("copying {}", file.display()))?;
    tmp.persist(&target)?;
    outln!(
        "imported ICD-10-PCS FY{} tables: {} codes -> {}",
        tables.year,
        tables.codes.len(),
        target.display()
    );
    Ok(ExitCode::SUCCESS)
}
