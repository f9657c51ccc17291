//! The text layer of a PDF note (pure Rust, via `lopdf`): pages in order, a line break where
//! the text moves to a new line, a space where it jumps along one, a blank line between pages.
//! A PDF without text (a scan) or one that needs a password is refused with a reason, never
//! read as an empty note. Text in form XObjects and annotations is not read.

use std::collections::BTreeMap;

use lopdf::content::Content;
use lopdf::{Document, Encoding, Object};

use crate::CodingError;

/// The most a page's content or a font's ToUnicode map may inflate to: a small crafted file
/// must not take the server's memory.
const MAX_DECOMPRESSED: usize = 64 << 20;

/// The text of a PDF. Errors say why there is none: not a PDF, encrypted, no text layer.
pub fn pdf_text(bytes: &[u8]) -> Result<String, CodingError> {
    let unreadable = |why: String| CodingError::Input {
        what: "PDF".into(),
        why,
    };
    let declares_encryption = || bytes.windows(8).any(|w| w == b"/Encrypt");
    let document = Document::load_mem(bytes).map_err(|error| {
        if declares_encryption() {
            unreadable(format!(
                "encrypted, and it could not be opened ({error}): remove the password first"
            ))
        } else {
            unreadable(format!("not a readable PDF: {error}"))
        }
    })?;
    // lopdf opens a document whose password is empty (an owner password only restricts
    // printing or copying) and leaves it closed otherwise.
    if document.trailer.get(b"Encrypt").is_ok() && !document.was_encrypted() {
        return Err(unreadable(
            "encrypted with a password: remove the password (or print it to a new PDF) first"
                .into(),
        ));
    }
    let pages = document.get_pages();
    if pages.is_empty() {
        return Err(unreadable("no pages".into()));
    }
    let mut text = String::new();
    for (number, page) in pages {
        let page_text = page_text(&document, page)
            .map_err(|error| unreadable(format!("page {number}: {error}")))?;
        let page_text = page_text.trim();
        if !page_text.is_empty() {
            if !text.is_empty() {
                text.push_str("\n\n");
            }
            text.push_str(page_text);
        }
    }
    if !text.chars().any(char::is_alphanumeric) {
        return Err(unreadable(
            "no text layer (a scanned image?): run OCR on it first, or give the note as text"
                .into(),
        ));
    }
    Ok(text)
}

/// Where the text stands, as far as line and word breaks need it.
#[derive(Debug, Default)]
struct Cursor {
    /// The current line's vertical position in text space.
    y: f32,
    /// Where the last shown text was.
    shown_at: Option<f32>,
    /// The position moved since text was last shown.
    moved: bool,
    /// A new line was asked for (`T*`, `'`, `"`).
    newline: bool,
}

impl Cursor {
    /// The separator the next shown text needs after `text`.
    fn separate(&mut self, text: &mut String) {
        let new_line = self.newline || self.shown_at.is_some_and(|y| (y - self.y).abs() > 0.5);
        if new_line && !text.is_empty() {
            trim_end_spaces(text);
            text.push('\n');
        } else if self.moved && !text.is_empty() && !text.ends_with(char::is_whitespace) {
            text.push(' ');
        }
        self.shown_at = Some(self.y);
        self.moved = false;
        self.newline = false;
    }
}

fn page_text(document: &Document, page: lopdf::ObjectId) -> lopdf::Result<String> {
    let fonts = document.get_page_fonts(page)?;
    let encodings: BTreeMap<Vec<u8>, Encoding> = fonts
        .into_iter()
        .filter_map(|(name, font)| {
            // A font whose encoding cannot be read shows nothing; the others still do.
            let encoding = font.get_font_encoding_with_limit(document, MAX_DECOMPRESSED);
            encoding.ok().map(|e| (name, e))
        })
        .collect();
    let content = Content::decode(&document.get_page_content_with_limit(page, MAX_DECOMPRESSED)?)?;
    let number = |operands: &[Object], i: usize| {
        operands
            .get(i)
            .and_then(|o| o.as_float().ok())
            .unwrap_or(0.0)
    };
    let mut text = String::new();
    let mut cursor = Cursor::default();
    let mut encoding: Option<&Encoding> = None;
    for operation in &content.operations {
        let operands = &operation.operands;
        match operation.operator.as_str() {
            "BT" => {
                cursor.y = 0.0;
                cursor.moved = true;
            }
            "Tf" => {
                encoding = operands
                    .first()
                    .and_then(|o| o.as_name().ok())
                    .and_then(|name| encodings.get(name));
            }
            "Td" | "TD" => {
                cursor.y += number(operands, 1);
                cursor.moved = true;
            }
            "Tm" => {
                cursor.y = number(operands, 5);
                cursor.moved = true;
            }
            "T*" => cursor.newline = true,
            "Tj" | "TJ" | "'" | "\"" => {
                if operation.operator == "'" || operation.operator == "\"" {
                    cursor.newline = true;
                }
                let Some(encoding) = encoding else { continue };
                let shown = match operation.operator.as_str() {
                    "\"" => &operands[operands.len().min(2)..],
                    _ => &operands[..],
                };
                let mut piece = String::new();
                show(encoding, shown, &mut piece);
                if !piece.is_empty() {
                    cursor.separate(&mut text);
                    text.push_str(&piece);
                }
            }
            _ => {}
        }
    }
    Ok(text)
}

/// The text of `Tj`/`TJ` operands; a `TJ` gap wider than a fifth of an em is a space.
fn show(encoding: &Encoding, operands: &[Object], out: &mut String) {
    for operand in operands {
        match operand {
            Object::String(bytes, _) => {
                if let Ok(decoded) = encoding.bytes_to_string(bytes) {
                    out.push_str(&decoded);
                }
            }
            Object::Array(items) => show(encoding, items, out),
            Object::Integer(_) | Object::Real(_) => {
                let gap = operand.as_float().unwrap_or(0.0);
                if gap < -200.0 && !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            _ => {}
        }
    }
}

fn trim_end_spaces(text: &mut String) {
    let kept = text.trim_end_matches([' ', '\t']).len();
    text.truncate(kept);
}

#[cfg(test)]
#[path = "../tests/support/pdf_fixture.rs"]
mod pdf_fixture;

#[cfg(test)]
mod tests {
    use super::pdf_fixture::{pdf, Protection};
    use super::*;

    #[test]
    fn text_comes_out_in_lines_and_pages() {
        let page1 = "BT /F1 12 Tf 72 720 Td (Type 2 diabetes mellitus.) Tj 0 -14 Td (Denies ) Tj \
                     [(chest)-250(pain.)] TJ ET \
                     BT /F1 12 Tf 1 0 0 1 72 690 Tm (\\311mile, 64) Tj 1 0 0 1 200 690 Tm (years) Tj ET";
        let page2 = "BT /F1 12 Tf 72 720 Td (Hip replacement.) Tj T* (Discharged.) Tj ET";
        let text = pdf_text(&pdf(&[page1, page2], Protection::None)).unwrap();
        assert_eq!(
            text,
            "Type 2 diabetes mellitus.\nDenies chest pain.\nÉmile, 64 years\n\nHip replacement.\nDischarged."
        );
    }

    #[test]
    fn scans_and_password_protected_files_are_refused_with_the_reason() {
        let scan = pdf(&["0 0 612 792 re f"], Protection::None);
        let error = pdf_text(&scan).unwrap_err().to_string();
        assert!(error.contains("no text layer"), "{error}");
        let locked = pdf(
            &["BT /F1 12 Tf 72 720 Td (Secret) Tj ET"],
            Protection::Password,
        );
        let error = pdf_text(&locked).unwrap_err().to_string();
        assert!(error.contains("encrypted"), "{error}");
        let error = pdf_text(b"%PDF-1.7 garbage").unwrap_err().to_string();
        assert!(error.contains("not a readable PDF"), "{error}");
    }
}
