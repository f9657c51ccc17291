//! Reading the codes out of a chat model's answer, whatever shape it took: the JSON the
//! engine asked for (bare, inside a code fence or after some prose), or free text (`E11.9 -
//! Type 2 diabetes…`, lower case, a missing dot, bullet or numbered lists, reasoning before a
//! final answer). Every code found is then checked against the allowed code set
//! ([`AllowedSet`]); what is not in it is dropped and said in a warning, never silently.

use std::collections::HashMap;

use serde_json::Value;

use crate::prediction::CodeKind;

/// One code as the model wrote it, with the evidence it quoted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerItem {
    /// As written (trimmed): validated later.
    pub code: String,
    /// Quotes from the note the model gave as evidence.
    pub evidence: Vec<String>,
}

/// The codes of an answer, in the order written.
pub fn parse_answer(text: &str) -> Vec<AnswerItem> {
    let text = without_reasoning(text);
    json_answer(text).unwrap_or_else(|| free_text_answer(text))
}

/// The text after a reasoning model's `<think>…</think>` block (all of it when there is none).
fn without_reasoning(text: &str) -> &str {
    match text.rfind("</think>") {
        Some(end) => &text[end + "</think>".len()..],
        None => text,
    }
}

/// The answer as JSON: the whole text, the last fenced block that parses, or the outermost
/// `{…}`; `None` when none of them holds codes in a shape we know.
fn json_answer(text: &str) -> Option<Vec<AnswerItem>> {
    let mut candidates = vec![text.trim()];
    candidates.extend(fenced_blocks(text).into_iter().rev());
    if let (Some(open), Some(close)) = (text.find('{'), text.rfind('}')) {
        if open < close {
            candidates.push(&text[open..=close]);
        }
    }
    candidates
        .into_iter()
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .find_map(|value| items_of_json(&value))
}

/// The contents of Markdown code fences (```json … ```).
fn fenced_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        // The info string (`json`) runs to the end of the fence's line.
        let body_start = after.find('\n').map_or(after.len(), |n| n + 1);
        let body = &after[body_start..];
        let Some(close) = body.find("```") else {
            break;
        };
        blocks.push(&body[..close]);
        rest = &body[close + 3..];
    }
    blocks
}

/// `{"diagnoses": [...], "procedures": [...]}` (or `codes`), or a bare list; each item a code
/// string or `{"code": …, "evidence": "…" | ["…"]}`.
fn items_of_json(value: &Value) -> Option<Vec<AnswerItem>> {
    let lists: Vec<&Value> = match value {
        Value::Array(_) => vec![value],
        Value::Object(map) => ["diagnoses", "procedures", "codes"]
            .iter()
            .filter_map(|key| map.get(*key))
            .collect(),
        _ => return None,
    };
    if lists.is_empty() || !lists.iter().all(|l| l.is_array()) {
        return None;
    }
    let mut items = Vec::new();
    for entry in lists.iter().filter_map(|l| l.as_array()).flatten() {
        let (code, evidence) = match entry {
            Value::String(code) => (code.as_str(), Vec::new()),
            Value::Object(map) => {
                let Some(code) = map.get("code").and_then(Value::as_str) else {
                    continue;
                };
                let evidence = ["evidence", "quote", "evidence_text"]
                    .iter()
                    .filter_map(|key| map.get(*key))
                    .flat_map(|e| match e {
                        Value::String(s) => vec![s.clone()],
                        Value::Array(quotes) => quotes
                            .iter()
                            .filter_map(|q| q.as_str().map(str::to_string))
                            .collect(),
                        _ => Vec::new(),
                    })
                    .collect();
                (code, evidence)
            }
            _ => continue,
        };
        // `"E11.9 - Type 2 diabetes"` in the code field: the code is its first token.
        let code = code_tokens(code)
            .first()
            .map_or_else(|| code.trim().to_string(), |t| t.text.clone());
        if !code.is_empty() {
            items.push(AnswerItem { code, evidence });
        }
    }
    Some(items)
}

/// A run of letters, digits and dots that has the shape of an ICD-10 code.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CodeToken {
    /// Upper case, without a trailing dot.
    text: String,
    /// Byte offsets in the line.
    start: usize,
    end: usize,
    /// A CM code with its dot, or a PCS code mixing letters and digits: written as a code,
    /// not a word that happens to look like one.
    strong: bool,
}

/// The code-shaped tokens of a line: `E11.9`, `e119`, `S72.009A`, `0SR9019`.
fn code_tokens(line: &str) -> Vec<CodeToken> {
    let mut tokens = Vec::new();
    let mut chars = line.char_indices().peekable();
    let mut previous: Option<char> = None;
    while let Some((start, c)) = chars.next() {
        let at_word_start = previous.is_none_or(|p| !p.is_alphanumeric());
        previous = Some(c);
        if !(c.is_ascii_alphanumeric() && at_word_start) {
            continue;
        }
        let mut end = start + c.len_utf8();
        while let Some(&(i, next)) = chars.peek() {
            if next.is_ascii_alphanumeric() || next == '.' {
                end = i + next.len_utf8();
                previous = Some(next);
                chars.next();
            } else {
                break;
            }
        }
        if chars
            .peek()
            .is_some_and(|&(_, next)| next.is_alphanumeric())
        {
            continue; // runs on into a non-ASCII letter: a word
        }
        let text = line[start..end].trim_end_matches('.').to_ascii_uppercase();
        if let Some(strong) = code_shape(&text) {
            let end = start + text.len();
            tokens.push(CodeToken {
                text,
                start,
                end,
                strong,
            });
        }
    }
    tokens
}

/// Whether `text` (upper case) is shaped like a CM or PCS code, and if so whether strongly.
fn code_shape(text: &str) -> Option<bool> {
    let b = text.as_bytes();
    let alnum = |s: &[u8]| s.iter().all(u8::is_ascii_alphanumeric);
    let cm = b.len() >= 3
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_digit()
        && b[2].is_ascii_alphanumeric();
    if cm {
        match text.split_once('.') {
            Some((head, tail)) if head.len() == 3 && (1..=4).contains(&tail.len()) => {
                return alnum(tail.as_bytes()).then_some(true)
            }
            Some(_) => return None,
            None if b.len() <= 7 && alnum(b) => return Some(false),
            None => {}
        }
    }
    // PCS: seven characters without I or O. The few all-letter codes (`GZFZZZZ`) are left to
    // JSON answers: in prose they cannot be told from a word in capitals.
    let pcs = b.len() == 7 && alnum(b) && !text.contains(['I', 'O']);
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    (pcs && digits > 0).then_some(digits < 7)
}

/// Free text: the part after the last `final answer` / `answer:` marker (the whole text
/// without one), read line by line.
fn free_text_answer(text: &str) -> Vec<AnswerItem> {
    let lower = text.to_lowercase();
    // Byte offsets of `lower` match `text` only where lower-casing kept lengths: else read all.
    let answer = if lower.len() == text.len() {
        ["final answer", "answer:"]
            .iter()
            .filter_map(|marker| lower.rfind(marker).map(|at| at + marker.len()))
            .max()
            .map_or(text, |at| &text[at..])
    } else {
        text
    };
    let mut items = Vec::new();
    for line in answer.lines() {
        items.extend(line_items(line));
    }
    items
}

/// The codes of one line. A line that is only codes (`E11.9, I10`) gives them all; a line
/// that starts with a code (after a bullet or number) gives that code, the rest being its
/// description and quoted evidence; in prose, only codes written as codes (with their dot,
/// or a PCS code) count.
fn line_items(line: &str) -> Vec<AnswerItem> {
    let tokens = code_tokens(line);
    if tokens.is_empty() {
        return Vec::new();
    }
    let item = |t: &CodeToken, evidence: Vec<String>| AnswerItem {
        code: t.text.clone(),
        evidence,
    };
    let mut rest = String::new();
    let mut last = 0;
    for t in &tokens {
        rest += &line[last..t.start];
        last = t.end;
    }
    rest += &line[last..];
    let only_codes = rest
        .split(|c: char| c.is_whitespace() || ",;|*`-•()[]".contains(c))
        .all(|w| w.is_empty() || w.eq_ignore_ascii_case("and"));
    if only_codes {
        return tokens.iter().map(|t| item(t, Vec::new())).collect();
    }
    let lead = strip_list_marker(line);
    let first = &tokens[0];
    if line.len() - lead.len() == first.start {
        return vec![item(first, quotes(&line[first.end..]))];
    }
    tokens
        .iter()
        .filter(|t| t.strong)
        .map(|t| item(t, Vec::new()))
        .collect()
}

/// The line without a leading bullet (`-`, `*`, `•`, `|`, `#`), number (`1.`, `2)`) or bold.
fn strip_list_marker(line: &str) -> &str {
    let mut rest = line.trim_start();
    loop {
        let before = rest.len();
        rest = rest
            .trim_start_matches(|c: char| "-*•|#>`_".contains(c))
            .trim_start();
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 && rest[digits..].starts_with(['.', ')', ':']) {
            let after = &rest[digits + 1..];
            // `1. E11.9`, not the `1` of a code-less number.
            if after.starts_with(char::is_whitespace) {
                rest = after.trim_start();
            }
        }
        if rest.len() == before {
            return rest;
        }
    }
}

/// Text in double quotes (`"…"` or `“…”`).
fn quotes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find(['"', '“']) {
        let open_len = rest[open..].chars().next().map_or(1, char::len_utf8);
        let body = &rest[open + open_len..];
        let Some(close) = body.find(['"', '”']) else {
            break;
        };
        let quote = body[..close].trim();
        if !quote.is_empty() {
            out.push(quote.to_string());
        }
        let close_len = body[close..].chars().next().map_or(1, char::len_utf8);
        rest = &body[close + close_len..];
    }
    out
}

/// The codes an engine may write, looked up by their compact form (no dot, upper case), so
/// that `e119` finds `E11.9`.
#[derive(Debug, Clone)]
pub struct AllowedSet {
    by_compact: HashMap<String, (String, CodeKind)>,
    /// Where the codes come from, for messages.
    pub source: String,
}

impl AllowedSet {
    pub fn new(codes: &[(String, CodeKind)], source: String) -> Self {
        let mut by_compact = HashMap::with_capacity(codes.len());
        for (code, kind) in codes {
            by_compact
                .entry(compact(code))
                .or_insert_with(|| (code.clone(), *kind));
        }
        Self { by_compact, source }
    }

    /// The allowed code (as the code set writes it) that `written` names, if any.
    pub fn resolve(&self, written: &str) -> Option<(&str, CodeKind)> {
        self.by_compact
            .get(&compact(written))
            .map(|(code, kind)| (code.as_str(), *kind))
    }

    pub fn len(&self) -> usize {
        self.by_compact.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_compact.is_empty()
    }
}

fn compact(code: &str) -> String {
    code.trim()
        .chars()
        .filter(|c| *c != '.')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(text: &str) -> Vec<String> {
        parse_answer(text).into_iter().map(|i| i.code).collect()
    }

    #[test]
    fn json_answers_bare_fenced_or_after_prose() {
        let json = r#"{"diagnoses":[{"code":"E11.9","evidence":"type 2 diabetes"}],"procedures":[{"code":"0SR9019","evidence":["hip replacement"]}]}"#;
        let items = parse_answer(json);
        assert_eq!(
            items,
            [
                AnswerItem {
                    code: "E11.9".into(),
                    evidence: vec!["type 2 diabetes".into()]
                },
                AnswerItem {
                    code: "0SR9019".into(),
                    evidence: vec!["hip replacement".into()]
                }
            ]
        );
        let fenced = format!("Here are the codes:\n```json\n{json}\n```\nLet me know.");
        assert_eq!(parse_answer(&fenced), items);
        let inline = format!("Sure! {json} Hope this helps.");
        assert_eq!(parse_answer(&inline), items);
        assert_eq!(
            codes(r#"{"codes": ["e11.9 - Type 2 diabetes", "I10"]}"#),
            ["E11.9", "I10"]
        );
        assert_eq!(codes(r#"["J18.9", "R50.9"]"#), ["J18.9", "R50.9"]);
        // JSON of another shape is read as text.
        assert_eq!(codes(r#"{"answer": "none"} E11.9"#), ["E11.9"]);
    }

    #[test]
    fn free_text_lists_in_every_common_shape() {
        let text = "Codes:\n\
                    1. E11.9 - Type 2 diabetes mellitus without complications (\"type 2 diabetes\")\n\
                    2) i10: Essential hypertension\n\
                    - **J18.9** Pneumonia, unspecified organism\n\
                    * e119\n\
                    • S72.009A — Fracture of unspecified part of neck of right femur\n\
                    | 0SR9019 | Replacement of right hip joint |";
        assert_eq!(
            codes(text),
            ["E11.9", "I10", "J18.9", "E119", "S72.009A", "0SR9019"]
        );
        assert_eq!(parse_answer(text)[0].evidence, ["type 2 diabetes"]);
        assert_eq!(
            codes("E11.9, I10; J18.9 and R50.9"),
            ["E11.9", "I10", "J18.9", "R50.9"]
        );
    }

    #[test]
    fn descriptions_and_prose_do_not_make_codes() {
        // `T12` in a description and `T2DM`, `B12` in prose are words, not codes.
        assert_eq!(
            codes("S22.080A - Wedge compression fracture of T11-T12 vertebra"),
            ["S22.080A"]
        );
        assert_eq!(
            codes("The patient has T2DM and low B12, so I would code E11.9 here."),
            ["E11.9"]
        );
        assert_eq!(
            codes("The patient is stable; no codes apply."),
            Vec::<String>::new()
        );
        assert!(codes("Patient treatment history").is_empty());
    }

    #[test]
    fn reasoning_before_the_answer_is_skipped() {
        let text = "<think>Maybe E10.9? No, she is on metformin: E11.9.</think>\nE11.9";
        assert_eq!(codes(text), ["E11.9"]);
        let text = "Diabetes could be E10.9 or E11.9; metformin suggests type 2.\n\nFinal answer: E11.9, I10";
        assert_eq!(codes(text), ["E11.9", "I10"]);
        let text = "Reasoning: the note says pneumonia (J18.9).\nAnswer:\n- J18.9\n- R50.9";
        assert_eq!(codes(text), ["J18.9", "R50.9"]);
    }

    #[test]
    fn allowed_set_finds_codes_without_their_dot_or_case() {
        let set = AllowedSet::new(
            &[
                ("E11.9".into(), CodeKind::Diagnosis),
                ("BW03ZZZ".into(), CodeKind::Procedure),
            ],
            "test".into(),
        );
        assert_eq!(set.resolve("e119"), Some(("E11.9", CodeKind::Diagnosis)));
        assert_eq!(set.resolve(" E11.9 "), Some(("E11.9", CodeKind::Diagnosis)));
        assert_eq!(
            set.resolve("bw03zzz"),
            Some(("BW03ZZZ", CodeKind::Procedure))
        );
        assert_eq!(set.resolve("E11.8"), None);
    }

    #[test]
    fn code_shapes() {
        assert_eq!(code_shape("E11.9"), Some(true));
        assert_eq!(code_shape("E119"), Some(false));
        assert_eq!(code_shape("S72.009A"), Some(true));
        assert_eq!(code_shape("0SR9019"), Some(true));
        assert_eq!(code_shape("0016070"), Some(false));
        assert_eq!(code_shape("SUMMARY"), None);
        assert_eq!(code_shape("PATIENT"), None); // holds an I
        assert_eq!(code_shape("E11.12345"), None);
        assert_eq!(code_shape("12.5"), None);
        assert_eq!(code_shape("A1"), None);
    }
}
