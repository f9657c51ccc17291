//! Prompt templates: how a note and its codes become a prompt and a completion. Loaded from
//! YAML, saved beside every tokenization so a result says how it was made.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Which gold codes the completion lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodeList {
    /// Diagnoses, then procedures.
    All,
    Diagnoses,
    Procedures,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTemplate {
    /// An optional system message (used when the model has a chat template).
    #[serde(default)]
    pub system: Option<String>,
    /// The user turn; `{note}` stands for the document text.
    pub user: String,
    /// The answer; `{codes}` stands for the gold codes joined by `separator`.
    #[serde(default = "default_completion")]
    pub completion: String,
    #[serde(default = "default_separator")]
    pub separator: String,
    #[serde(default = "default_codes")]
    pub codes: CodeList,
}

fn default_completion() -> String {
    "{codes}".into()
}
fn default_separator() -> String {
    ", ".into()
}
fn default_codes() -> CodeList {
    CodeList::All
}

impl Default for PromptTemplate {
    /// The classic prompt of the LLM coding papers.
    fn default() -> Self {
        Self {
            system: None,
            user: "Predict the medical codes for the following text: {note}".into(),
            completion: default_completion(),
            separator: default_separator(),
            codes: default_codes(),
        }
    }
}

impl PromptTemplate {
    pub fn from_yaml_file(path: &Path) -> Result<Self, TrainError> {
        let text = fs_err::read_to_string(path)?;
        let template: Self = serde_yaml::from_str(&text).map_err(|e| TrainError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if !template.user.contains("{note}") {
            return Err(TrainError::Config {
                path: path.display().to_string(),
                message: "`user` must contain {note}".into(),
            });
        }
        Ok(template)
    }

    pub fn user_text(&self, note: &str) -> String {
        self.user.replace("{note}", note)
    }

    pub fn completion_text(&self, diagnoses: &[String], procedures: &[String]) -> String {
        let codes: Vec<&str> = match self.codes {
            CodeList::All => diagnoses
                .iter()
                .chain(procedures)
                .map(String::as_str)
                .collect(),
            CodeList::Diagnoses => diagnoses.iter().map(String::as_str).collect(),
            CodeList::Procedures => procedures.iter().map(String::as_str).collect(),
        };
        self.completion
            .replace("{codes}", &codes.join(&self.separator))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_template_fills_note_and_codes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(
            &path,
            "user: \"Note: {note}\\nCodes?\"\ncodes: diagnoses\nseparator: \"; \"\n",
        )
        .unwrap();
        let t = PromptTemplate::from_yaml_file(&path).unwrap();
        assert_eq!(t.user_text("cough"), "Note: cough\nCodes?");
        assert_eq!(
            t.completion_text(&["J18.9".into(), "I10".into()], &["0DTJ4ZZ".into()]),
            "J18.9; I10"
        );
        std::fs::write(&path, "user: no placeholder\n").unwrap();
        assert!(PromptTemplate::from_yaml_file(&path)
            .unwrap_err()
            .to_string()
            .contains("{note}"));
        std::fs::write(&path, "user: \"{note}\"\ntypo: 1\n").unwrap();
        assert!(PromptTemplate::from_yaml_file(&path).is_err());
    }

    #[test]
    fn default_is_the_classic_prompt() {
        let t = PromptTemplate::default();
        assert_eq!(
            t.user_text("x"),
            "Predict the medical codes for the following text: x"
        );
        assert_eq!(t.completion_text(&["A".into()], &["B".into()]), "A, B");
    }
}
