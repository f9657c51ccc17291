//! `IcdCode`: a syntactically valid ICD-10-CM or ICD-10-PCS code, normalized once.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CodeError;

/// Which classification a code belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CodeSystem {
    /// ICD-10-CM: diagnoses (`E11.9`).
    Cm,
    /// ICD-10-PCS: inpatient procedures (`0DTJ4ZZ`), or a prefix of one (`BT41`).
    Pcs,
}

impl CodeSystem {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cm => "CM",
            Self::Pcs => "PCS",
        }
    }
}

/// A normalized ICD-10 code: upper case, CM with its dot after the category (`E11.9`), PCS
/// without (`0DTJ4ZZ`). Parsing checks the shape only; whether the code exists in the code
/// set is the knowledge base's question ([`crate::IcdKnowledge::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IcdCode {
    system: CodeSystem,
    /// Without the dot: `E119`, `0DTJ4ZZ`.
    compact: String,
}

/// PCS uses the digits and the letters except I and O.
fn is_pcs_char(c: char) -> bool {
    c.is_ascii_digit() || (c.is_ascii_uppercase() && c != 'I' && c != 'O')
}

impl IcdCode {
    /// Parse as a code of a given system (when the caller knows which: a PCS column, say).
    pub fn parse_as(system: CodeSystem, input: &str) -> Result<Self, CodeError> {
        let compact = compact_form(input)?;
        let malformed = |why: &str| CodeError::Malformed {
            input: input.trim().to_string(),
            why: why.to_string(),
        };
        match system {
            CodeSystem::Cm => {
                if input.contains('.') && input.trim().find('.') != Some(3) {
                    return Err(malformed(
                        "the dot of an ICD-10-CM code comes after its 3rd character",
                    ));
                }
                let chars: Vec<char> = compact.chars().collect();
                if !(3..=7).contains(&chars.len()) {
                    return Err(malformed("an ICD-10-CM code has 3 to 7 characters"));
                }
                if !chars[0].is_ascii_uppercase() || !chars[1].is_ascii_digit() {
                    return Err(malformed(
                        "an ICD-10-CM code starts with a letter and a digit (e.g. E11.9)",
                    ));
                }
                if !chars.iter().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(malformed("an ICD-10-CM code has only letters and digits"));
                }
            }
            CodeSystem::Pcs => {
                if input.contains('.') {
                    return Err(malformed("ICD-10-PCS codes have no dot"));
                }
                if compact.len() > 7 {
                    return Err(malformed("an ICD-10-PCS code has 7 characters"));
                }
                if let Some(bad) = compact.chars().find(|c| !is_pcs_char(*c)) {
                    return Err(malformed(&format!(
                        "`{bad}` is not an ICD-10-PCS character (digits and letters except I and O)"
                    )));
                }
            }
        }
        Ok(Self { system, compact })
    }

    pub fn system(&self) -> CodeSystem {
        self.system
    }

    /// Without the dot: `E119`.
    pub fn compact(&self) -> &str {
        &self.compact
    }

    /// The 3-character category of a CM code (`E11`), the section+body system+operation
    /// table of a PCS code (`0DT`).
    pub fn category(&self) -> &str {
        &self.compact[..self.compact.len().min(3)]
    }

    /// True for a full 7-character PCS code.
    pub fn is_complete_pcs(&self) -> bool {
        self.system == CodeSystem::Pcs && self.compact.len() == 7
    }
}

fn compact_form(input: &str) -> Result<String, CodeError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(CodeError::Empty);
    }
    let compact: String = trimmed
        .chars()
        .filter(|c| *c != '.')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if compact.is_empty() {
        return Err(CodeError::Empty);
    }
    if let Some(bad) = compact.chars().find(|c| !c.is_ascii_alphanumeric()) {
        return Err(CodeError::Malformed {
            input: trimmed.to_string(),
            why: format!("unexpected character `{bad}`"),
        });
    }
    Ok(compact)
}

/// Which system a bare string most likely belongs to. CM codes are a letter then a digit; PCS
/// codes start with a section character and, when it is a letter, continue with a letter or
/// are 7 characters long. Strings that fit both (`X2C0361`) are read as CM first; the
/// knowledge base retries PCS when the CM code does not exist.
pub(crate) fn guess_system(compact: &str) -> CodeSystem {
    let mut chars = compact.chars();
    let first = chars.next().unwrap_or('0');
    let second = chars.next().unwrap_or('0');
    if first.is_ascii_digit() || second.is_ascii_alphabetic() {
        CodeSystem::Pcs
    } else {
        CodeSystem::Cm
    }
}

impl FromStr for IcdCode {
    type Err = CodeError;

    /// `e119`, `E119`, `E11.9` → `E11.9`; `0dtj4zz` → `0DTJ4ZZ`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let compact = compact_form(s)?;
        let system = if s.contains('.') {
            CodeSystem::Cm
        } else {
            guess_system(&compact)
        };
        Self::parse_as(system, s)
    }
}

impl fmt::Display for IcdCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.system {
            CodeSystem::Cm if self.compact.len() > 3 => {
                write!(f, "{}.{}", &self.compact[..3], &self.compact[3..])
            }
            _ => f.write_str(&self.compact),
        }
    }
}

/// Dotted display form of a compact CM code.
pub(crate) fn dotted(compact: &str) -> String {
    if compact.len() > 3 {
        format!("{}.{}", &compact[..3], &compact[3..])
    } else {
        compact.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalizes_case_and_dot() {
        for input in ["e119", "E119", "E11.9", " e11.9 "] {
            let code: IcdCode = input.parse().unwrap();
            assert_eq!(code.to_string(), "E11.9");
            assert_eq!(code.system(), CodeSystem::Cm);
        }
        let code: IcdCode = "s72001a".parse().unwrap();
        assert_eq!(code.to_string(), "S72.001A");
        assert_eq!(code.category(), "S72");
    }

    #[test]
    fn tells_pcs_from_cm() {
        let code: IcdCode = "0dtj4zz".parse().unwrap();
        assert_eq!(code.system(), CodeSystem::Pcs);
        assert_eq!(code.to_string(), "0DTJ4ZZ");
        assert!(code.is_complete_pcs());
        let partial: IcdCode = "BT41".parse().unwrap();
        assert_eq!(partial.system(), CodeSystem::Pcs);
        assert!(!partial.is_complete_pcs());
        assert_eq!("B20".parse::<IcdCode>().unwrap().system(), CodeSystem::Cm);
    }

    #[test]
    fn rejects_malformed_codes_saying_why() {
        assert_eq!("".parse::<IcdCode>(), Err(CodeError::Empty));
        let err = "E1".parse::<IcdCode>().unwrap_err().to_string();
        assert!(err.contains("3 to 7 characters"), "{err}");
        let err = "E11.90000".parse::<IcdCode>().unwrap_err().to_string();
        assert!(err.contains("3 to 7"), "{err}");
        let err = "E1.19".parse::<IcdCode>().unwrap_err().to_string();
        assert!(err.contains("after its 3rd character"), "{err}");
        let err = "E11-9".parse::<IcdCode>().unwrap_err().to_string();
        assert!(err.contains("unexpected character"), "{err}");
        let err = IcdCode::parse_as(CodeSystem::Pcs, "0DTI4ZZ")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an ICD-10-PCS character"), "{err}");
    }

    proptest! {
        #[test]
        fn cm_normalization_is_idempotent_and_case_insensitive(
            letter in "[A-Z]", digit in "[0-9]", rest in "[0-9A-Z]{1,5}"
        ) {
            let raw = format!("{letter}{digit}{rest}");
            let code: IcdCode = raw.to_lowercase().parse().unwrap();
            let again: IcdCode = code.to_string().parse().unwrap();
            prop_assert_eq!(&code, &again);
            prop_assert_eq!(code.compact(), raw.as_str());
            let dot = if raw.len() > 3 { Some(3) } else { None };
            prop_assert_eq!(code.to_string().find('.'), dot);
        }

        #[test]
        fn pcs_codes_round_trip(code in "[0-9][0-9A-HJ-NP-Z]{6}") {
            let parsed: IcdCode = code.parse().unwrap();
            prop_assert_eq!(parsed.system(), CodeSystem::Pcs);
            prop_assert_eq!(parsed.to_string(), code);
        }

        #[test]
        fn parsing_never_panics(input in "\\PC{0,12}") {
            let _ = input.parse::<IcdCode>();
        }
    }
}
