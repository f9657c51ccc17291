//! Reading a dataset back: its document ids and one document at a time, with its gold codes
//! in order and its split.

use duckdb::params;
use serde::Serialize;

use crate::error::DbContext;
use crate::splits::Split;
use crate::{Store, StoreError};

/// One document of a dataset as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    pub doc_id: String,
    pub patient_id: Option<String>,
    /// `None` when the source has no text for it (MIMIC without notes, CodiEsp TSVs only).
    pub text: Option<String>,
    pub lang: Option<String>,
    /// 9 or 10; `None` for an admission without any code.
    pub icd_version: Option<i32>,
    /// Gold diagnosis codes in their order (MIMIC seq_num, CodiEsp file order).
    pub diagnoses: Vec<String>,
    pub procedures: Vec<String>,
    pub split: Option<Split>,
    /// Text spans supporting gold codes (CodiEsp), in file order.
    pub evidence: Vec<Evidence>,
}

/// A text span supporting a gold code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// `diagnosis` or `procedure`.
    pub kind: String,
    pub code: String,
    pub reference: String,
    /// `(start, end)` character offsets, end exclusive, into the text in `spans_lang`.
    pub spans: Vec<(u64, u64)>,
    pub spans_lang: String,
    /// The length in characters of the text the spans point into, when known (it places
    /// them approximately in a translation).
    pub spans_text_chars: Option<u64>,
}

/// The evidence columns, in the order [`evidence_row`] reads them.
const EVIDENCE_COLUMNS: &str = "kind, code, reference, spans, spans_lang, spans_text_chars";

type EvidenceRow = (String, String, String, String, String, Option<i64>);

fn read_evidence_row(r: &duckdb::Row<'_>, first: usize) -> duckdb::Result<EvidenceRow> {
    Ok((
        r.get(first)?,
        r.get(first + 1)?,
        r.get(first + 2)?,
        r.get(first + 3)?,
        r.get(first + 4)?,
        r.get(first + 5)?,
    ))
}

/// The row as [`Evidence`]; an error naming the document for spans that do not parse.
fn evidence_row(row: EvidenceRow, dataset: &str, doc_id: &str) -> Result<Evidence, StoreError> {
    let (kind, code, reference, spans, spans_lang, chars) = row;
    let spans = parse_spans(&spans).ok_or_else(|| {
        StoreError::Invalid(format!("{dataset}/{doc_id}: bad evidence spans `{spans}`"))
    })?;
    Ok(Evidence {
        kind,
        code,
        reference,
        spans,
        spans_lang,
        spans_text_chars: chars.and_then(|c| u64::try_from(c).ok()),
    })
}

/// A document's evidence with the language of the document's own text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentEvidence {
    pub doc_id: String,
    pub lang: Option<String>,
    pub evidence: Evidence,
}

impl Store {
    /// The ids of a dataset's documents, sorted; only those of `split` when given.
    pub fn document_ids(
        &self,
        dataset: &str,
        split: Option<Split>,
    ) -> Result<Vec<String>, StoreError> {
        self.dataset(dataset)?;
        let ctx = || format!("listing documents of {dataset}");
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT d.doc_id FROM documents d
                 LEFT JOIN splits s ON s.dataset = d.dataset AND s.doc_id = d.doc_id
                 WHERE d.dataset = ? AND (CAST(? AS VARCHAR) IS NULL OR s.split = ?)
                 ORDER BY d.doc_id",
            )
            .db(ctx)?;
        let split = split.map(Split::as_str);
        let ids = stmt
            .query_map(params![dataset, split, split], |r| r.get(0))
            .db(ctx)?
            .collect::<Result<_, _>>()
            .db(ctx)?;
        Ok(ids)
    }

    /// One document with its ordered gold codes and split; `None` when the dataset has no
    /// document of that id.
    pub fn document(&self, dataset: &str, doc_id: &str) -> Result<Option<Document>, StoreError> {
        let ctx = || format!("reading document {doc_id} of {dataset}");
        let texts = self.document_texts_sql()?;
        let row = self.conn().query_row(
            &format!(
                "SELECT d.patient_id, t.text, d.lang, d.icd_version, s.split FROM documents d
                 LEFT JOIN {texts} t ON t.dataset = d.dataset AND t.doc_id = d.doc_id
                 LEFT JOIN splits s ON s.dataset = d.dataset AND s.doc_id = d.doc_id
                 WHERE d.dataset = ? AND d.doc_id = ?"
            ),
            params![dataset, doc_id],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i32>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            },
        );
        let (patient_id, text, lang, icd_version, split) = match row {
            Ok(row) => row,
            Err(duckdb::Error::QueryReturnedNoRows) => return Ok(None),
            Err(source) => return Err(source).db(ctx),
        };
        let split = split.map(|s| s.parse::<Split>()).transpose()?;
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT kind, code FROM document_codes WHERE dataset = ? AND doc_id = ?
                 ORDER BY kind, seq",
            )
            .db(ctx)?;
        let codes: Vec<(String, String)> = stmt
            .query_map(params![dataset, doc_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .db(ctx)?
            .collect::<Result<_, _>>()
            .db(ctx)?;
        let (diagnoses, procedures): (Vec<_>, Vec<_>) =
            codes.into_iter().partition(|(kind, _)| kind == "diagnosis");
        let mut stmt = self
            .conn()
            .prepare(&format!(
                "SELECT {EVIDENCE_COLUMNS} FROM evidence
                 WHERE dataset = ? AND doc_id = ? ORDER BY rowid"
            ))
            .db(ctx)?;
        let evidence = stmt
            .query_map(params![dataset, doc_id], |r| read_evidence_row(r, 0))
            .db(ctx)?
            .map(|row| evidence_row(row.db(ctx)?, dataset, doc_id))
            .collect::<Result<_, StoreError>>()?;
        Ok(Some(Document {
            doc_id: doc_id.to_string(),
            patient_id,
            text,
            lang,
            icd_version,
            diagnoses: diagnoses.into_iter().map(|(_, code)| code).collect(),
            procedures: procedures.into_iter().map(|(_, code)| code).collect(),
            split,
            evidence,
        }))
    }
}

impl Store {
    /// Every evidence span of a dataset, by document id then file order.
    pub fn dataset_evidence(&self, dataset: &str) -> Result<Vec<DocumentEvidence>, StoreError> {
        self.dataset(dataset)?;
        let ctx = || format!("reading the evidence of {dataset}");
        let mut stmt = self
            .conn()
            .prepare(&format!(
                "SELECT e.doc_id, d.lang, {} FROM evidence e
                 LEFT JOIN documents d ON d.dataset = e.dataset AND d.doc_id = e.doc_id
                 WHERE e.dataset = ? ORDER BY e.doc_id, e.rowid",
                EVIDENCE_COLUMNS
                    .split(", ")
                    .map(|c| format!("e.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .db(ctx)?;
        let rows = stmt
            .query_map(params![dataset], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    read_evidence_row(r, 2)?,
                ))
            })
            .db(ctx)?;
        rows.map(|row| {
            let (doc_id, lang, row) = row.db(ctx)?;
            let evidence = evidence_row(row, dataset, &doc_id)?;
            Ok(DocumentEvidence {
                doc_id,
                lang,
                evidence,
            })
        })
        .collect()
    }
}

/// `2163 2171;2180 2190` as the store writes it.
fn parse_spans(spans: &str) -> Option<Vec<(u64, u64)>> {
    spans
        .split(';')
        .map(|span| {
            let (start, end) = span.split_once(' ')?;
            Some((start.parse().ok()?, end.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DatasetKind;

    #[test]
    fn a_document_comes_back_with_its_codes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.duckdb")).unwrap();
        store
            .in_transaction("test", |conn| {
                Store::reset_dataset(conn, "d", DatasetKind::Codiesp, "src", "{}")?;
                conn.execute_batch(
                    "INSERT INTO documents VALUES ('d', 'a', 'p1', 'text a', 'en', 10),
                                                  ('d', 'b', NULL, NULL, 'en', NULL);
                     INSERT INTO document_codes VALUES ('d', 'a', 'diagnosis', 2, 'I10', 10),
                        ('d', 'a', 'diagnosis', 1, 'E11.9', 10), ('d', 'a', 'procedure', 1, '0DTJ4ZZ', 10);
                     INSERT INTO splits VALUES ('d', 'a', 'validation');
                     INSERT INTO evidence VALUES ('d', 'a', 'diagnosis', 'E11.9', 'text', '5 9;0 1', 'es', 30);",
                )
                .db(|| "test rows".into())
            })
            .unwrap();
        let a = store.document("d", "a").unwrap().unwrap();
        assert_eq!(a.diagnoses, ["E11.9", "I10"]);
        assert_eq!(a.procedures, ["0DTJ4ZZ"]);
        assert_eq!(a.split, Some(Split::Validation));
        assert_eq!(a.text.as_deref(), Some("text a"));
        assert_eq!(a.evidence.len(), 1);
        assert_eq!(a.evidence[0].spans, [(5, 9), (0, 1)]);
        assert_eq!(a.evidence[0].spans_text_chars, Some(30));
        let all = store.dataset_evidence("d").unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].doc_id.as_str(), all[0].lang.as_deref()),
            ("a", Some("en"))
        );
        assert_eq!(all[0].evidence, a.evidence[0]);
        let b = store.document("d", "b").unwrap().unwrap();
        assert_eq!((b.text, b.icd_version, b.split), (None, None, None));
        assert!(store.document("d", "c").unwrap().is_none());
        assert_eq!(store.document_ids("d", None).unwrap(), ["a", "b"]);
        assert_eq!(
            store.document_ids("d", Some(Split::Validation)).unwrap(),
            ["a"]
        );
        assert!(store
            .document_ids("d", Some(Split::Test))
            .unwrap()
            .is_empty());
        assert!(matches!(
            store.document_ids("x", None),
            Err(StoreError::UnknownDataset(_))
        ));
    }
}
