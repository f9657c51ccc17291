//! Every distinct gold code checked once against the ICD knowledge base: billable, header,
//! unknown… Gold codes stay as the source gives them; the catalog says what each one is.

use duckdb::params;
use medcoder_icd::{CodeError, IcdKnowledge};

use crate::error::DbContext;
use crate::{Store, StoreError};

/// Status of a gold code in the code set the knowledge base holds.
pub(crate) fn code_status(
    kb: &IcdKnowledge,
    icd_version: i32,
    code: &str,
) -> (&'static str, Option<String>) {
    if icd_version != 10 {
        return ("icd9", None);
    }
    match kb.validate(code) {
        Ok(valid) => ("billable", Some(valid.description)),
        Err(error) => {
            let description = kb.lookup(code).ok().map(|info| info.description);
            let status = match error {
                CodeError::NotBillable { code, .. } if code.contains("partial") => "partial",
                CodeError::NotBillable { .. } => "header",
                CodeError::MissingSeventhCharacter { .. } => "missing-7th-character",
                CodeError::MissingPlaceholder { .. } => "missing-placeholder",
                CodeError::Unknown { .. } => "unknown",
                CodeError::Empty | CodeError::Malformed { .. } => "malformed",
            };
            (status, description)
        }
    }
}

impl Store {
    /// Add the gold codes not yet in the catalog, checked against `kb`. Returns how many.
    pub fn check_codes(&self, kb: &IcdKnowledge) -> Result<u64, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT DISTINCT c.kind, c.icd_version, c.code FROM document_codes c
                 WHERE NOT EXISTS (SELECT 1 FROM code_catalog k
                   WHERE k.kind = c.kind AND k.icd_version = c.icd_version AND k.code = c.code)",
            )
            .db(|| "listing unchecked codes".into())?;
        let unchecked: Vec<(String, i32, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .db(|| "listing unchecked codes".into())?
            .collect::<Result<_, _>>()
            .db(|| "listing unchecked codes".into())?;
        self.in_transaction("checking gold codes", |conn| {
            let mut appender = conn
                .appender("code_catalog")
                .db(|| "writing the code catalog".into())?;
            for (kind, version, code) in &unchecked {
                let (status, description) = code_status(kb, *version, code);
                appender
                    .append_row(params![kind, version, code, status, description])
                    .db(|| "writing the code catalog".into())?;
            }
            appender.flush().db(|| "writing the code catalog".into())?;
            Ok(())
        })?;
        Ok(unchecked.len() as u64)
    }
}
