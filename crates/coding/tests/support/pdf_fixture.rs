//! Minimal PDFs written by hand for tests: one Helvetica (WinAnsi) page per content stream,
//! with a correct cross-reference table; optionally locked with a user password. Used by the
//! coding crate's unit tests and the CLI's end-to-end tests (`#[path]`).
#![allow(dead_code)] // each user takes a subset

/// Whether the PDF is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    None,
    /// A standard security handler (RC4, revision 2) whose user password is not empty.
    Password,
}

/// A PDF with one page per content stream (PDF operators, e.g. `BT /F1 12 Tf … ET`).
pub fn pdf(pages: &[&str], protection: Protection) -> Vec<u8> {
    let n = pages.len();
    // Objects: 1 catalog, 2 page tree, 3 font, then a page and its content per page, then the
    // encryption dictionary.
    let page_ids: Vec<usize> = (0..n).map(|i| 4 + 2 * i).collect();
    let mut objects: Vec<String> = vec![
        "<< /Type /Catalog /Pages 2 0 R >>".into(),
        format!(
            "<< /Type /Pages /Kids [{}] /Count {n} >>",
            page_ids
                .iter()
                .map(|id| format!("{id} 0 R"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".into(),
    ];
    for (i, content) in pages.iter().enumerate() {
        objects.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
             /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            page_ids[i] + 1
        ));
        objects.push(format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ));
    }
    let mut trailer_extra = String::new();
    if protection == Protection::Password {
        let hex32 = |b: u8| format!("{b:02X}").repeat(32);
        objects.push(format!(
            "<< /Filter /Standard /V 1 /R 2 /Length 40 /P -4 /O <{}> /U <{}> >>",
            hex32(0x5A),
            hex32(0xA5)
        ));
        trailer_extra = format!(
            " /Encrypt {} 0 R /ID [<{}> <{}>]",
            objects.len(),
            "0123456789ABCDEF".repeat(2),
            "0123456789ABCDEF".repeat(2)
        );
    }
    let mut out = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{body}\nendobj\n", i + 1).bytes());
    }
    let xref_at = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).bytes());
    for offset in offsets {
        out.extend(format!("{offset:010} 00000 n \n").bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R{trailer_extra} >>\nstartxref\n{xref_at}\n%%EOF\n",
            objects.len() + 1
        )
        .bytes(),
    );
    out
}
