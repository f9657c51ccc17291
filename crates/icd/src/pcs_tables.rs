//! The official CMS ICD-10-PCS tables XML (`icd10pcs_tables_<year>.xml`): every valid code of a
//! fiscal year and the name of each value on each axis. Optional: medcoder reads it when a
//! user imports it (`medcoder icd import-pcs-tables`), since no registry package ships it.

use std::collections::HashMap;
use std::path::Path;

use crate::IcdError;

#[derive(Debug, Clone, Default)]
pub struct PcsTables {
    /// e.g. `2026`.
    pub year: String,
    /// Every valid 7-character code, sorted.
    pub codes: Vec<String>,
    /// Code prefix → the meaning of its last character.
    pub labels: HashMap<String, String>,
}

/// One axis of a table or row: its position (1-based) and its values with their labels.
struct Axis {
    position: usize,
    values: Vec<(char, String)>,
}

fn axis_of(node: roxmltree::Node) -> Option<Axis> {
    let position: usize = node.attribute("pos")?.parse().ok()?;
    let values = node
        .children()
        .filter(|n| n.has_tag_name("label"))
        .filter_map(|n| {
            let code = n.attribute("code")?.chars().next()?;
            Some((code, n.text().unwrap_or_default().trim().to_string()))
        })
        .collect();
    Some(Axis { position, values })
}

pub fn parse_pcs_tables(path: &Path) -> Result<PcsTables, IcdError> {
    let text = fs_err::read_to_string(path)?;
    let doc = roxmltree::Document::parse(&text).map_err(|e| IcdError::Xml {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let root = doc.root_element();
    let mut tables = PcsTables {
        year: root
            .children()
            .find(|n| n.has_tag_name("version"))
            .and_then(|n| n.text())
            .unwrap_or_default()
            .trim()
            .to_string(),
        ..PcsTables::default()
    };
    for table in root.children().filter(|n| n.has_tag_name("pcsTable")) {
        let head: Vec<Axis> = table
            .children()
            .filter(|n| n.has_tag_name("axis"))
            .filter_map(axis_of)
            .collect();
        let mut prefix = String::new();
        for axis in &head {
            let Some((value, label)) = axis.values.first() else {
                return Err(bad_table(path, table, "table axis without a value"));
            };
            prefix.push(*value);
            if axis.position != prefix.len() {
                return Err(bad_table(path, table, "table axes out of order"));
            }
            tables.labels.insert(prefix.clone(), label.clone());
        }
        for row in table.children().filter(|n| n.has_tag_name("pcsRow")) {
            let mut axes: Vec<Axis> = row
                .children()
                .filter(|n| n.has_tag_name("axis"))
                .filter_map(axis_of)
                .collect();
            axes.sort_by_key(|a| a.position);
            if prefix.len() + axes.len() != 7 || axes.iter().any(|a| a.values.is_empty()) {
                return Err(bad_table(path, row, "row does not complete 7 axes"));
            }
            let mut partial = vec![prefix.clone()];
            for axis in &axes {
                let mut next = Vec::with_capacity(partial.len() * axis.values.len());
                for stem in &partial {
                    for (value, label) in &axis.values {
                        let code = format!("{stem}{value}");
                        tables
                            .labels
                            .entry(code.clone())
                            .or_insert_with(|| label.clone());
                        next.push(code);
                    }
                }
                partial = next;
            }
            tables.codes.extend(partial);
        }
    }
    tables.codes.sort();
    tables.codes.dedup();
    Ok(tables)
}

fn bad_table(path: &Path, node: roxmltree::Node, what: &str) -> IcdError {
    let line = node.document().text_pos_at(node.range().start).row;
    IcdError::Source {
        path: path.to_path_buf(),
        line: u64::from(line),
        message: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<ICD10PCS.tabular>
  <version>2026</version>
  <pcsTable>
    <axis pos="1" values="1"><title>Section</title><label code="B">Imaging</label></axis>
    <axis pos="2" values="1"><title>Body System</title><label code="T">Urinary System</label></axis>
    <axis pos="3" values="1"><title>Type</title><label code="4">Ultrasonography</label></axis>
    <pcsRow codes="2">
      <axis pos="4" values="2"><title>Body Part</title><label code="0">Bilateral Kidneys</label><label code="1">Right Kidney</label></axis>
      <axis pos="5" values="1"><title>Contrast</title><label code="Z">None</label></axis>
      <axis pos="6" values="1"><title>Qualifier</title><label code="Z">None</label></axis>
      <axis pos="7" values="1"><title>Qualifier</title><label code="Z">None</label></axis>
    </pcsRow>
  </pcsTable>
</ICD10PCS.tabular>"#;

    #[test]
    fn rows_expand_into_codes_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tables.xml");
        std::fs::write(&path, SAMPLE).unwrap();
        let tables = parse_pcs_tables(&path).unwrap();
        assert_eq!(tables.year, "2026");
        assert_eq!(tables.codes, ["BT40ZZZ", "BT41ZZZ"]);
        assert_eq!(tables.labels["BT"], "Urinary System");
        assert_eq!(tables.labels["BT41"], "Right Kidney");
    }

    #[test]
    fn incomplete_row_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tables.xml");
        let broken = SAMPLE.replace(
            r#"<axis pos="7" values="1"><title>Qualifier</title><label code="Z">None</label></axis>"#,
            "",
        );
        std::fs::write(&path, broken).unwrap();
        let err = parse_pcs_tables(&path).unwrap_err().to_string();
        assert!(
            err.contains("tables.xml: line 8: row does not complete 7 axes"),
            "{err}"
        );
    }
}
