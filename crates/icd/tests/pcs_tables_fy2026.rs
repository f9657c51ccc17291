//! The CMS ICD-10-PCS FY2026 tables, where the development data beside the project has them
//! (`../shared/data/icd10pcs`); users import the same file with `medcoder icd import-pcs-tables`.

use std::path::PathBuf;

fn shared_tables() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/icd10pcs/icd10pcs_tables_2026.xml");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} not found (development data only)",
            path.display()
        );
        None
    }
}

#[test]
fn fy2026_tables_give_every_code_of_the_year_and_every_axis_label() {
    let Some(path) = shared_tables() else { return };
    let tables = medcoder_icd::parse_pcs_tables(&path).expect("parse the CMS tables");
    assert_eq!(tables.year, "2026");
    // The FY2026 code count that CMS publishes (and ../shared/data/SOURCES.md records).
    assert_eq!(tables.codes.len(), 79_115);
    assert!(tables.codes.iter().all(|c| c.len() == 7));
    assert!(tables.codes.binary_search(&"0DTJ4ZZ".to_string()).is_ok());
    assert_eq!(tables.labels["B"], "Imaging");
    assert_eq!(tables.labels["BT"], "Urinary System");
    assert_eq!(tables.labels["BT4"], "Ultrasonography");
    assert_eq!(tables.labels["BT41"], "Kidney, Right");
    assert_eq!(tables.labels["0DT"], "Resection");
}
