//! Instructional notes of the tabular list and the code references inside them.

use serde::{Deserialize, Serialize};

/// The kinds of notes the ICD-10-CM tabular list attaches to chapters, blocks and codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NoteKind {
    Includes,
    InclusionTerm,
    Excludes1,
    Excludes2,
    CodeFirst,
    UseAdditionalCode,
    CodeAlso,
    Note,
    SevenChrNote,
}

impl NoteKind {
    /// The XML element name of the kind.
    pub fn from_tag(tag: &str) -> Option<Self> {
        Some(match tag {
            "includes" => Self::Includes,
            "inclusionTerm" => Self::InclusionTerm,
            "excludes1" => Self::Excludes1,
            "excludes2" => Self::Excludes2,
            "codeFirst" => Self::CodeFirst,
            "useAdditionalCode" => Self::UseAdditionalCode,
            "codeAlso" => Self::CodeAlso,
            "notes" => Self::Note,
            "sevenChrNote" => Self::SevenChrNote,
            _ => return None,
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Includes => "Includes",
            Self::InclusionTerm => "Inclusion term",
            Self::Excludes1 => "Excludes1",
            Self::Excludes2 => "Excludes2",
            Self::CodeFirst => "Code first",
            Self::UseAdditionalCode => "Use additional code",
            Self::CodeAlso => "Code also",
            Self::Note => "Note",
            Self::SevenChrNote => "7th character note",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub kind: NoteKind,
    pub text: String,
}

/// A code or range of codes named in a note: `E11.-` (a prefix), `R73.9` (a code and what is
/// below it), `P35-P39` (a range of categories), `F10.1-F10.9` (a range of subcategories).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRange {
    /// Compact (no dot) first code.
    pub start: String,
    /// Compact last code of a range; `None` for a single code or prefix.
    pub end: Option<String>,
}

impl CodeRange {
    /// Whether a compact CM code falls under this reference.
    pub fn covers(&self, compact: &str) -> bool {
        match &self.end {
            None => compact.starts_with(&self.start),
            Some(end) => {
                let width = self.start.len().max(end.len());
                let head = &compact[..compact.len().min(width)];
                let start_head = &self.start[..self.start.len().min(head.len())];
                let end_head = &end[..end.len().min(head.len())];
                head.len() >= self.start.len().min(end.len())
                    && head >= start_head
                    && head <= end_head
            }
        }
    }
}

/// Find the code references in a note text such as
/// `traumatic amputation of hip and thigh (S78.-)` or `infections (A00-B99)`.
pub fn code_references(text: &str) -> Vec<CodeRange> {
    let bytes = text.as_bytes();
    let mut refs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if at_word_start {
            if let Some((start, after)) = scan_code(bytes, i) {
                // A range continues with `-` and a second code; a prefix ends with `-` or `.-`.
                if after < bytes.len() && bytes[after] == b'-' {
                    if let Some((end, after_end)) = scan_code(bytes, after + 1) {
                        refs.push(CodeRange {
                            start,
                            end: Some(end),
                        });
                        i = after_end;
                        continue;
                    }
                }
                refs.push(CodeRange { start, end: None });
                i = after;
                continue;
            }
        }
        i += 1;
    }
    refs
}

/// A CM code at `pos`: letter, digit, alphanumeric, then optionally `.` and up to 4 more.
/// Returns its compact form and the position after it (a trailing `.` of `E11.-` consumed).
fn scan_code(bytes: &[u8], pos: usize) -> Option<(String, usize)> {
    let get = |k: usize| bytes.get(pos + k).copied();
    let (a, b, c) = (get(0)?, get(1)?, get(2)?);
    if !(a.is_ascii_uppercase() && b.is_ascii_digit() && c.is_ascii_alphanumeric()) {
        return None;
    }
    let mut compact = String::from_utf8(vec![a, b, c]).ok()?;
    let mut end = pos + 3;
    if bytes.get(end) == Some(&b'.') {
        let mut k = end + 1;
        while k < bytes.len() && bytes[k].is_ascii_alphanumeric() && k - end <= 4 {
            compact.push(bytes[k] as char);
            k += 1;
        }
        // `E11.-`: the dot is consumed here, the dash is looked at by the caller.
        end = k;
    }
    if end < bytes.len() && bytes[end].is_ascii_alphanumeric() {
        return None;
    }
    Some((compact, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(text: &str) -> Vec<(String, Option<String>)> {
        code_references(text)
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    #[test]
    fn finds_prefixes_codes_and_ranges() {
        assert_eq!(
            refs("traumatic amputation of hip and thigh (S78.-)"),
            vec![("S78".into(), None)]
        );
        assert_eq!(
            refs("hyperglycemia NOS (R73.9)"),
            vec![("R739".into(), None)]
        );
        assert_eq!(
            refs("infectious diseases specific to the perinatal period (P35-P39)"),
            vec![("P35".into(), Some("P39".into()))]
        );
        assert_eq!(
            refs("gestational diabetes (O24.4-)"),
            vec![("O244".into(), None)]
        );
        assert_eq!(
            refs("alcohol use (F10.1-F10.9) and (Z16.-)"),
            vec![("F101".into(), Some("F109".into())), ("Z16".into(), None)]
        );
        assert!(refs("certain localized infections - see body system chapters").is_empty());
    }

    #[test]
    fn ranges_cover_codes_between_their_ends() {
        let range = CodeRange {
            start: "P35".into(),
            end: Some("P39".into()),
        };
        assert!(range.covers("P36"));
        assert!(range.covers("P391"));
        assert!(!range.covers("P40"));
        assert!(!range.covers("P34"));
        let prefix = CodeRange {
            start: "E11".into(),
            end: None,
        };
        assert!(prefix.covers("E1140"));
        assert!(!prefix.covers("E10"));
    }
}
