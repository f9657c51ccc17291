//! The knowledge base against the real code sets fetched by `medcoder assets fetch`.
//!
//! Skipped (passing, with a line on stderr saying why) when the assets are not installed in
//! `$MEDCODER_HOME` (default `~/.cache/medcoder`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use medcoder_assets::MedcoderHome;
use medcoder_icd::cm::CmKind;
use medcoder_icd::{CodeError, CodeSystem, IcdKnowledge, IcdSources, SearchFilter};

struct Fixture {
    sources: IcdSources,
    kb: IcdKnowledge,
}

/// The knowledge base of the home folder, built (or read from its cache) once per test binary;
/// `Err` says why the tests that need it are skipped.
fn fixture() -> Result<&'static Fixture, &'static str> {
    static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
    let loaded = FIXTURE.get_or_init(|| {
        let home = MedcoderHome::from_env().map_err(|e| e.to_string())?;
        let sources =
            IcdSources::from_home(&home).map_err(|e| format!("ICD assets not installed: {e}"))?;
        // Installed but unusable sources are a failure, not a reason to skip.
        let kb = IcdKnowledge::load(&home).expect("load the ICD knowledge base of the home");
        Ok(Fixture { sources, kb })
    });
    loaded.as_ref().map_err(String::as_str)
}

/// The fixture, or return from the test after saying why it is skipped.
macro_rules! fixture_or_skip {
    () => {
        match fixture() {
            Ok(fixture) => fixture,
            Err(why) => {
                eprintln!("skipping: {why}");
                return;
            }
        }
    };
}

/// The package's own code list: chapters (`1`..`22`), blocks (`A00-A09`, or a single-category
/// section listed a second time as its category, e.g. `B20`) and codes, one per line.
struct CodeList {
    chapters: usize,
    dash_blocks: usize,
    /// Compact code → how many times the list has it.
    codes: HashMap<String, usize>,
}

fn read_code_list(path: &Path) -> CodeList {
    let text = std::fs::read_to_string(path).expect("read the code list");
    assert!(text.contains("\r\n"), "the code list has CRLF line endings");
    let mut list = CodeList {
        chapters: 0,
        dash_blocks: 0,
        codes: HashMap::new(),
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.chars().all(|c| c.is_ascii_digit()) {
            list.chapters += 1;
        } else if line.contains('-') {
            list.dash_blocks += 1;
        } else if line.len() >= 3 {
            *list.codes.entry(line.to_string()).or_default() += 1;
        }
    }
    list
}

#[test]
fn every_code_of_the_official_list_exists_and_counts_match() {
    let f = fixture_or_skip!();
    let path = f.sources.cm_code_list.as_deref().expect("code list source");
    let list = read_code_list(path);

    let mut missing: Vec<&str> = list
        .codes
        .keys()
        .map(String::as_str)
        .filter(|code| f.kb.cm.get(code).is_none())
        .collect();
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "{} listed codes missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(list.codes.len(), f.kb.cm.code_count());

    assert_eq!(list.chapters, 22);
    assert_eq!(f.kb.cm.count_of(CmKind::Chapter), 22);
    assert_eq!(f.kb.cm.chapters.len(), 22);
    let single_category_blocks = list.codes.values().filter(|n| **n > 1).count();
    assert_eq!(list.dash_blocks + single_category_blocks, 297);
    assert_eq!(f.kb.cm.count_of(CmKind::Block), 297);
    assert!(f.kb.cm.block("E08-E13").is_some());
    assert!(f.kb.cm.block("B20").is_some(), "single-category section");
}

#[test]
fn billable_codes_are_the_leaves_of_the_official_list() {
    let f = fixture_or_skip!();
    let path = f.sources.cm_code_list.as_deref().expect("code list source");
    let mut sorted: Vec<String> = read_code_list(path).codes.into_keys().collect();
    sorted.sort_unstable();
    // Sorted, the codes below a code follow it directly.
    let leaves: BTreeSet<String> = sorted
        .iter()
        .zip(sorted.iter().skip(1).map(Some).chain([None]))
        .filter(|(code, next)| next.is_none_or(|next| !next.starts_with(code.as_str())))
        .map(|(code, _)| code.clone())
        .collect();
    let billable = f.kb.cm.entries.iter().filter(|e| e.billable);
    let billable: BTreeSet<String> = billable.map(|e| e.code.replace('.', "")).collect();
    let only_leaf: Vec<_> = leaves.difference(&billable).take(10).collect();
    let only_billable: Vec<_> = billable.difference(&leaves).take(10).collect();
    assert!(
        only_leaf.is_empty() && only_billable.is_empty(),
        "leaves not billable: {only_leaf:?}; billable but not leaves: {only_billable:?}"
    );
    // The official CMS count of billable ICD-10-CM codes for April 2026.
    assert_eq!(f.kb.cm.billable_count(), 74_719);
    assert_eq!(leaves.len(), 74_719);
}

#[test]
fn cm_version_names_the_april_2026_update() {
    let f = fixture_or_skip!();
    assert!(f.kb.cm.version.contains("FY2026"), "{}", f.kb.cm.version);
    // The fetched tabular is the April 1, 2026 update (see the assets manifest).
    assert!(
        f.kb.cm.version.contains("April 1, 2026"),
        "{}",
        f.kb.cm.version
    );
}

#[test]
fn known_codes_have_their_official_descriptions() {
    let f = fixture_or_skip!();
    for (code, description) in [
        ("E11.9", "Type 2 diabetes mellitus without complications"),
        ("I10", "Essential (primary) hypertension"),
        ("J18.9", "Pneumonia, unspecified organism"),
        ("N17.9", "Acute kidney failure, unspecified"),
    ] {
        let valid = f.kb.validate(code).expect(code);
        assert_eq!(valid.code.to_string(), code);
        assert_eq!(valid.code.system(), CodeSystem::Cm);
        assert_eq!(valid.description, description);
    }
    let valid = f.kb.validate("0DTJ4ZZ").expect("0DTJ4ZZ");
    assert_eq!(valid.code.system(), CodeSystem::Pcs);
    assert_eq!(valid.code.to_string(), "0DTJ4ZZ");
    assert_eq!(
        valid.description,
        "Resection of Appendix, Percutaneous Endoscopic Approach"
    );
}

#[test]
fn seventh_characters_are_expanded() {
    let f = fixture_or_skip!();
    let extended = f.kb.cm.get("S72001A").expect("S72.001A exists");
    assert_eq!(extended.code, "S72.001A");
    assert_eq!(extended.kind, CmKind::Extended);
    assert!(extended.billable);
    assert!(
        extended
            .description
            .ends_with("initial encounter for closed fracture"),
        "{}",
        extended.description
    );
    let parent = extended.parent.map(|p| f.kb.cm.entry(p).code.as_str());
    assert_eq!(parent, Some("S72.001"));

    let leaf = f.kb.cm.get("S72001").expect("S72.001 exists");
    assert!(!leaf.billable);
    match f.kb.validate("S72.001") {
        Err(CodeError::MissingSeventhCharacter { code, options }) => {
            assert_eq!(code, "S72.001");
            assert!(
                options.contains("A (initial encounter for closed fracture)"),
                "{options}"
            );
        }
        other => panic!("S72.001: expected a missing 7th character, got {other:?}"),
    }

    for code in ["W19.XXXA", "T36.0X1A"] {
        let valid = f.kb.validate(code).expect(code);
        assert_eq!(valid.code.to_string(), code);
    }
    match f.kb.validate("W19A") {
        Err(CodeError::MissingPlaceholder { input, suggestion }) => {
            assert_eq!(input, "W19A");
            assert_eq!(suggestion, "W19.XXXA");
        }
        other => panic!("W19A: expected a missing placeholder, got {other:?}"),
    }
}

#[test]
fn missing_seventh_character_options_keep_meanings_with_commas() {
    let f = fixture_or_skip!();
    let Err(CodeError::MissingSeventhCharacter { options, .. }) = f.kb.validate("S72.001") else {
        panic!("S72.001 needs a 7th character");
    };
    // Was "C (or IIIC)": the meaning was cut at the description's last comma.
    assert!(
        options.contains("C (initial encounter for open fracture type IIIA, IIIB, or IIIC)"),
        "{options}"
    );
    assert!(options.contains("S (sequela)"), "{options}");
}

#[test]
fn validation_says_why_a_code_is_not_reportable() {
    let f = fixture_or_skip!();
    match f.kb.validate("E11") {
        Err(CodeError::NotBillable { code, children, .. }) => {
            assert_eq!(code, "E11");
            assert!(children > 0);
        }
        other => panic!("E11: expected a header, got {other:?}"),
    }
    match f.kb.validate("Z99.99") {
        Err(CodeError::Unknown { code, system, hint }) => {
            assert_eq!(code, "Z99.99");
            assert_eq!(system, "CM");
            assert!(hint.contains("Z99"), "{hint}");
        }
        other => panic!("Z99.99: expected unknown, got {other:?}"),
    }
    let valid = f.kb.validate("e119").expect("e119");
    assert_eq!(valid.code.to_string(), "E11.9");
    match f.kb.validate("BT41") {
        Err(CodeError::NotBillable { code, children, .. }) => {
            assert!(code.starts_with("BT41"), "{code}");
            assert!(children > 0);
        }
        other => panic!("BT41: expected a partial PCS code, got {other:?}"),
    }
}

#[test]
fn lookup_walks_the_hierarchy_from_the_chapter_down() {
    let f = fixture_or_skip!();
    let info = f.kb.lookup("E11.40").expect("E11.40");
    let parents: Vec<&str> = info.parents.iter().map(|p| p.code.as_str()).collect();
    assert_eq!(parents, ["4", "E08-E13", "E11", "E11.4"]);
    assert!(info.billable);
    let block = f.kb.lookup("E08-E13").expect("block E08-E13");
    assert!(block.children.iter().any(|c| c.code == "E11"));
}

#[test]
fn describe_says_what_lookup_says() {
    let f = fixture_or_skip!();
    let codes = [
        "E11.9",
        "e11.9 ",
        "E11",
        "E11.4",
        "E08-E13",
        "S72.001A",
        "W19",
        "W19A",
        "0DTJ4ZZ",
        "0DTJ",
        "BW03ZZZ",
        "BW03",
        "B",
        "Z99.99",
        "not a code",
        "",
    ];
    for code in codes {
        let looked_up =
            f.kb.lookup(code)
                .map(|info| (info.description, info.billable));
        match (f.kb.describe(code), looked_up) {
            (Ok(described), Ok(looked_up)) => assert_eq!(described, looked_up, "{code:?}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{code:?}"),
            (a, b) => panic!("{code:?}: describe {a:?}, lookup {b:?}"),
        }
    }
}

#[test]
fn excludes1_forbids_type_1_with_type_2_diabetes() {
    let f = fixture_or_skip!();
    for (a, b) in [("E10.9", "E11.9"), ("E11.9", "E10.9")] {
        let conflict =
            f.kb.excludes1_conflict(a, b)
                .expect("valid codes")
                .unwrap_or_else(|| panic!("{a} + {b}: expected an Excludes1 conflict"));
        assert!(
            ["E10", "E11"].contains(&conflict.note_at.as_str()),
            "{}",
            conflict.note_at
        );
        assert!(!conflict.note.is_empty());
    }
    let none =
        f.kb.excludes1_conflict("E11.9", "I10")
            .expect("valid codes");
    assert!(none.is_none(), "{none:?}");
}

fn top_codes(f: &Fixture, query: &str, filter: SearchFilter) -> Vec<String> {
    f.kb.search(query, 5, filter)
        .into_iter()
        .map(|h| h.code)
        .collect()
}

#[test]
fn search_finds_diabetic_neuropathy() {
    let f = fixture_or_skip!();
    let top = top_codes(f, "diabetic neuropathy", SearchFilter::default());
    assert!(
        top.first().is_some_and(|c| c.starts_with("E11.4")),
        "{top:?}"
    );
}

#[test]
fn search_finds_hip_fracture_in_femur_codes() {
    let f = fixture_or_skip!();
    // "Fracture of hip NOS" is an inclusion term of S72.00.
    let top = top_codes(f, "hip fracture", SearchFilter::default());
    assert!(top.iter().any(|c| c.starts_with("S72")), "{top:?}");
}

#[test]
fn search_finds_appendectomy_procedures() {
    let f = fixture_or_skip!();
    // Lay procedure names ("appendectomy") are not in the PCS titles ("Resection of Appendix");
    // this needs the search work in progress in search.rs.
    let filter = SearchFilter {
        system: Some(CodeSystem::Pcs),
        billable_only: false,
    };
    let top = top_codes(f, "appendectomy", filter);
    assert!(
        top.iter()
            .any(|c| c.starts_with("0DT") || c.starts_with("0DB")),
        "{top:?}"
    );
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the cache dir")
        .map(|e| e.expect("cache dir entry").path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("icd-kb-") && name.ends_with(".bin")
        })
        .collect();
    files.sort();
    files
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("cache file mtime")
}

fn counts(kb: &IcdKnowledge) -> (usize, usize, usize) {
    (
        kb.cm.code_count(),
        kb.cm.billable_count(),
        kb.pcs.codes.len(),
    )
}

#[test]
fn cache_is_reused_and_rebuilt_when_a_source_changes() {
    let f = fixture_or_skip!();
    let tmp = tempfile::tempdir().expect("tempdir");
    let copies = tmp.path().join("sources");
    std::fs::create_dir_all(&copies).expect("sources dir");
    let copy = |source: &Path| {
        let target = copies.join(source.file_name().expect("source file name"));
        std::fs::copy(source, &target).expect("copy a source");
        target
    };
    let code_list = copy(f.sources.cm_code_list.as_deref().expect("code list"));
    let sources = IcdSources {
        cm_tabular_xml: copy(&f.sources.cm_tabular_xml),
        cm_code_list: Some(code_list.clone()),
        pcs_codes_csv: copy(&f.sources.pcs_codes_csv),
        // The others (the 54 MB axes database, say) are read where they are, never touched.
        ..f.sources.clone()
    };
    let cache_dir = tmp.path().join("cache");

    let built = IcdKnowledge::load_cached(&sources, &cache_dir).expect("build");
    let first = cache_files(&cache_dir);
    assert_eq!(first.len(), 1, "{first:?}");
    let written_at = mtime(&first[0]);

    let cached = IcdKnowledge::load_cached(&sources, &cache_dir).expect("load from cache");
    assert_eq!(counts(&cached), counts(&built));
    assert_eq!(counts(&built), counts(&f.kb));
    assert_eq!(cache_files(&cache_dir), first);
    let read_at = mtime(&first[0]);
    assert_eq!(read_at, written_at, "the second load read the cache");

    let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    std::fs::File::options()
        .write(true)
        .open(&code_list)
        .and_then(|file| file.set_modified(past))
        .expect("touch the copied code list");

    let rebuilt = IcdKnowledge::load_cached(&sources, &cache_dir).expect("rebuild");
    assert_eq!(counts(&rebuilt), counts(&built));
    let second = cache_files(&cache_dir);
    assert_eq!(second.len(), 1, "the stale cache is removed: {second:?}");
    assert_ne!(second, first, "a changed source gives a new cache file");
}
