//! Reading examples to tokenize and writing their token ids.

use duckdb::params;
use serde::Serialize;

use crate::error::DbContext;
use crate::{Store, StoreError};

/// A document with its gold codes, in order.
#[derive(Debug, Clone, Serialize)]
pub struct CodingExample {
    pub doc_id: String,
    pub split: Option<String>,
    pub text: String,
    pub diagnoses: Vec<String>,
    pub procedures: Vec<String>,
}

/// An instruction example: its conversation as JSON (`[{role, content}, …]`).
#[derive(Debug, Clone, Serialize)]
pub struct ConversationExample {
    pub example_id: String,
    pub split: Option<String>,
    pub messages_json: String,
}

/// One tokenized example (or one chunk of a long one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub doc_id: String,
    pub chunk: u32,
    pub split: Option<String>,
    /// Prompt then completion.
    pub ids: Vec<u32>,
    pub prompt_len: u32,
    /// The truncation strategy applied, if the example was over the limit.
    pub truncation: Option<String>,
}

fn split_codes(list: Option<String>) -> Vec<String> {
    list.map(|l| l.split('\u{1f}').map(str::to_string).collect())
        .unwrap_or_default()
}

impl Store {
    /// Documents with text of a coding dataset, ICD-10 only unless `include_icd9`, with their
    /// ordered gold codes, in `batch`-sized groups handed to `f`.
    pub fn for_each_coding_batch(
        &self,
        dataset: &str,
        include_icd9: bool,
        batch: usize,
        mut f: impl FnMut(Vec<CodingExample>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let version_filter = if include_icd9 {
            "true"
        } else {
            "coalesce(d.icd_version, 10) = 10"
        };
        // Codes are aggregated on their own and joined to the texts, so that no step holds
        // every note's text at once (a full MIMIC-IV release has gigabytes of it).
        let texts = self.document_texts_sql()?;
        let sql = format!(
            "WITH codes AS (
                 SELECT doc_id,
                        string_agg(code, chr(31) ORDER BY seq) FILTER (WHERE kind = 'diagnosis') AS dx,
                        string_agg(code, chr(31) ORDER BY seq) FILTER (WHERE kind = 'procedure') AS px
                 FROM document_codes WHERE dataset = $1 GROUP BY doc_id)
             SELECT t.doc_id, s.split, t.text, codes.dx, codes.px
             FROM {texts} t
             JOIN documents d ON d.dataset = t.dataset AND d.doc_id = t.doc_id
             LEFT JOIN splits s ON s.dataset = t.dataset AND s.doc_id = t.doc_id
             LEFT JOIN codes ON codes.doc_id = t.doc_id
             WHERE t.dataset = $1 AND t.text <> '' AND {version_filter}"
        );
        let ctx = || format!("reading examples of {dataset}");
        let mut stmt = self.conn().prepare(&sql).db(ctx)?;
        let mut rows = stmt.query(params![dataset]).db(ctx)?;
        let mut current = Vec::with_capacity(batch);
        while let Some(row) = rows.next().db(ctx)? {
            current.push(CodingExample {
                doc_id: row.get(0).db(ctx)?,
                split: row.get(1).db(ctx)?,
                text: row.get(2).db(ctx)?,
                diagnoses: split_codes(row.get(3).db(ctx)?),
                procedures: split_codes(row.get(4).db(ctx)?),
            });
            if current.len() == batch {
                f(std::mem::replace(&mut current, Vec::with_capacity(batch)))?;
            }
        }
        if !current.is_empty() {
            f(current)?;
        }
        Ok(())
    }

    pub fn conversation_examples(
        &self,
        dataset: &str,
    ) -> Result<Vec<ConversationExample>, StoreError> {
        let ctx = || format!("reading conversations of {dataset}");
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT c.example_id, s.split, c.messages FROM conversations c
                 LEFT JOIN splits s ON s.dataset = c.dataset AND s.doc_id = c.example_id
                 WHERE c.dataset = ? ORDER BY c.example_id",
            )
            .db(ctx)?;
        let rows = stmt
            .query_map(params![dataset], |r| {
                Ok(ConversationExample {
                    example_id: r.get(0)?,
                    split: r.get(1)?,
                    messages_json: r.get(2)?,
                })
            })
            .db(ctx)?;
        rows.collect::<Result<_, _>>().db(ctx)
    }

    /// Replace the tokens of (dataset, model) by the rows `produce` writes through the sink,
    /// in one transaction, and record `config` beside them.
    pub fn replace_tokens(
        &self,
        dataset: &str,
        model: &str,
        config: &str,
        produce: impl FnOnce(
            &mut dyn FnMut(&TokenRow) -> Result<(), StoreError>,
        ) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        // Examples are read on the store's connection while tokens are written on this one.
        let writer = self
            .conn()
            .try_clone()
            .db(|| "opening a writer connection".into())?;
        let ctx = || format!("writing tokens of {dataset} for {model}");
        writer.execute_batch("BEGIN TRANSACTION").db(ctx)?;
        let result = (|| {
            writer
                .execute(
                    "DELETE FROM tokens WHERE dataset = ? AND model = ?",
                    params![dataset, model],
                )
                .db(ctx)?;
            writer
                .execute(
                    "DELETE FROM token_runs WHERE dataset = ? AND model = ?",
                    params![dataset, model],
                )
                .db(ctx)?;
            writer
                .execute(
                    "INSERT INTO token_runs (dataset, model, config) VALUES (?, ?, ?)",
                    params![dataset, model, config],
                )
                .db(ctx)?;
            let mut appender = writer.appender("tokens").db(ctx)?;
            let mut written = 0u64;
            produce(&mut |row: &TokenRow| {
                let bytes: Vec<u8> = row.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
                appender
                    .append_row(params![
                        dataset,
                        model,
                        row.doc_id,
                        row.chunk,
                        row.split,
                        bytes,
                        row.prompt_len,
                        row.ids.len() as u32,
                        row.truncation
                    ])
                    .db(ctx)?;
                written += 1;
                Ok(())
            })?;
            appender.flush().db(ctx)?;
            Ok(written)
        })();
        match result {
            Ok(written) => {
                writer.execute_batch("COMMIT").db(ctx)?;
                Ok(written)
            }
            Err(error) => {
                let _ = writer.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// The token rows of (dataset, model), for training and for checks.
    pub fn token_rows(&self, dataset: &str, model: &str) -> Result<Vec<TokenRow>, StoreError> {
        let ctx = || format!("reading tokens of {dataset} for {model}");
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT doc_id, chunk, split, ids, prompt_len, truncation FROM tokens
                 WHERE dataset = ? AND model = ? ORDER BY doc_id, chunk",
            )
            .db(ctx)?;
        let rows = stmt
            .query_map(params![dataset, model], |r| {
                let bytes: Vec<u8> = r.get(3)?;
                Ok(TokenRow {
                    doc_id: r.get(0)?,
                    chunk: r.get(1)?,
                    split: r.get(2)?,
                    ids: bytes
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    prompt_len: r.get(4)?,
                    truncation: r.get(5)?,
                })
            })
            .db(ctx)?;
        rows.collect::<Result<_, _>>().db(ctx)
    }
}
