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
            .prepare(
                "SELECT kind, code, reference, spans, spans_lang FROM evidence
                 WHERE dataset = ? AND doc_id = ? ORDER BY rowid",
            )
            .db(ctx)?;
        let evidence = stmt
            .query_map(params![dataset, doc_id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, String>(3)?,
                    r.get(4)?,
                ))
            })
            .db(ctx)?
            .map(|row| {
                let (kind, code, reference, spans, spans_lang) = row.db(ctx)?;
                let spans = parse_spans(&spans).ok_or_else(|| {
                    StoreError::Invalid(format!("{dataset}/{doc_id}: bad evidence spans `{spans}`"))
                })?;
                Ok(Evidence {
                    kind,
                    code,
                    reference,
                    spans,
                    spans_lang,
                })
            })
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
                     INSERT INTO evidence VALUES ('d', 'a', 'diagnosis', 'E11.9', 'text', '5 9;0 1', 'es');",
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
