//! Training examples from the token table, and the batches of an epoch: a pure function of
//! (seed, epoch), so that a resumed run sees exactly the batches an uninterrupted one would.

use medcoder_models::lora::splitmix64;
use medcoder_store::TokenRow;

use crate::config::{LossOn, Overlong};
use crate::TrainError;

/// One sequence and the positions whose next token is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub doc_id: String,
    pub ids: Vec<u32>,
    /// Tokens before the first scored target.
    pub prompt_len: usize,
}

impl Example {
    /// Positions `t` whose next token `ids[t + 1]` is a target.
    pub fn target_positions(&self, loss_on: LossOn) -> std::ops::Range<usize> {
        let last = self.ids.len().saturating_sub(1);
        match loss_on {
            LossOn::All => 0..last,
            LossOn::Completion => self.prompt_len.saturating_sub(1).min(last)..last,
        }
    }

    pub fn target_count(&self, loss_on: LossOn) -> usize {
        self.target_positions(loss_on).len()
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DataReport {
    pub rows: usize,
    pub dropped_overlong: usize,
    pub truncated_overlong: usize,
    pub without_targets: usize,
}

/// The examples of one split, checked against `max_len`.
pub fn examples_of_split(
    rows: &[TokenRow],
    split: &str,
    max_len: usize,
    overlong: Overlong,
    loss_on: LossOn,
) -> Result<(Vec<Example>, DataReport), TrainError> {
    let mut report = DataReport::default();
    let mut examples = Vec::new();
    for row in rows.iter().filter(|r| r.split.as_deref() == Some(split)) {
        report.rows += 1;
        let mut example = Example {
            doc_id: row.doc_id.clone(),
            ids: row.ids.clone(),
            prompt_len: row.prompt_len as usize,
        };
        if example.ids.len() > max_len {
            match overlong {
                Overlong::Error => {
                    return Err(TrainError::Data(format!(
                        "example {} (chunk {}) of split {split} has {} tokens, over max_len {max_len}: \
                         raise max_len, re-run `prepare tokens` with a smaller --max-len, or set \
                         overlong: drop | truncate-prompt",
                        row.doc_id,
                        row.chunk,
                        example.ids.len()
                    )))
                }
                Overlong::Drop => {
                    report.dropped_overlong += 1;
                    continue;
                }
                Overlong::TruncatePrompt => {
                    let completion = example.ids.len() - example.prompt_len.min(example.ids.len());
                    if completion + 1 > max_len {
                        report.dropped_overlong += 1;
                        continue;
                    }
                    let keep_prompt = max_len - completion;
                    let mut ids = example.ids[..keep_prompt].to_vec();
                    ids.extend_from_slice(&example.ids[example.prompt_len..]);
                    example.ids = ids;
                    example.prompt_len = keep_prompt;
                    report.truncated_overlong += 1;
                }
            }
        }
        if example.target_count(loss_on) == 0 {
            report.without_targets += 1;
            continue;
        }
        examples.push(example);
    }
    Ok((examples, report))
}

/// The rows of one batch, each the indices of the examples laid end to end in it: one example
/// per row, unless packed.
pub type BatchRows = Vec<Vec<usize>>;

/// How an epoch's examples are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    /// Rows per batch.
    pub batch_size: usize,
    /// Batches of similar lengths (not packed).
    pub bucket_by_length: bool,
    /// Several examples per row, up to this many tokens (`None`: one per row).
    pub pack_to: Option<usize>,
}

/// The batches of one epoch.
pub fn epoch_batches(
    examples: &[Example],
    plan: &BatchPlan,
    seed: u64,
    epoch: usize,
) -> Vec<BatchRows> {
    let mut state = seed ^ (epoch as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut order, &mut state);
    let batch_size = plan.batch_size;
    if let Some(capacity) = plan.pack_to {
        let rows = pack_first_fit(examples, &order, capacity);
        let mut batches: Vec<BatchRows> = rows.chunks(batch_size).map(<[_]>::to_vec).collect();
        shuffle(&mut batches, &mut state);
        return batches;
    }
    let bucket_by_length = plan.bucket_by_length;
    if bucket_by_length {
        // Sort within windows of 32 batches, so batches hold similar lengths while the epoch
        // still mixes long and short ones.
        for window in order.chunks_mut(batch_size * 32) {
            window.sort_by_key(|&i| examples[i].ids.len());
        }
    }
    let mut batches: Vec<BatchRows> = order
        .chunks(batch_size)
        .map(|chunk| chunk.iter().map(|&i| vec![i]).collect())
        .collect();
    if bucket_by_length {
        shuffle(&mut batches, &mut state);
    }
    batches
}

/// Rows still open to examples while packing: first fit looks at no more than these, so that
/// packing an epoch stays linear in its examples.
const OPEN_ROWS: usize = 64;

/// Examples (in `order`) into rows of at most `capacity` tokens: each goes into the first open
/// row with room for it, else starts a new one. A row closes when no example could fit in it
/// any more, or when it is the oldest of more than [`OPEN_ROWS`] open ones.
fn pack_first_fit(examples: &[Example], order: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let shortest = examples.iter().map(|e| e.ids.len()).min().unwrap_or(1);
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (row, room left) of the open rows, oldest first.
    let mut open: std::collections::VecDeque<(usize, usize)> = Default::default();
    for &i in order {
        let len = examples[i].ids.len();
        match open.iter().position(|&(_, room)| room >= len) {
            Some(at) => {
                let (row, room) = &mut open[at];
                rows[*row].push(i);
                *room -= len;
                if *room < shortest {
                    open.remove(at);
                }
            }
            None => {
                rows.push(vec![i]);
                let room = capacity.saturating_sub(len);
                if room >= shortest {
                    open.push_back((rows.len() - 1, room));
                    if open.len() > OPEN_ROWS {
                        open.pop_front();
                    }
                }
            }
        }
    }
    rows
}

fn shuffle<T>(items: &mut [T], state: &mut u64) {
    for i in (1..items.len()).rev() {
        let j = (splitmix64(state) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// A right-padded batch: the ids (b × len, row-major), and for each scored position its flat
/// index and its target token.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
    /// Packed rows: for every token (b × len) the column where its document starts in its row
    /// (the padding after the last document counts as one more), so that attention stays
    /// within a document and rotary positions restart at each. `None`: one example per row.
    pub doc_starts: Option<Vec<u32>>,
}

impl PaddedBatch {
    /// Padding tokens (ids that are no example's).
    pub fn padding(&self, examples: &[&Example]) -> usize {
        self.rows * self.len - examples.iter().map(|e| e.ids.len()).sum::<usize>()
    }
}

/// Right padding needs no attention mask: under the causal mask no real token sees the
/// padding after it, and padded positions are never scored.
pub fn pad_batch(examples: &[&Example], pad_id: u32, loss_on: LossOn) -> PaddedBatch {
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut batch = PaddedBatch {
        rows: examples.len(),
        len,
        ids: Vec::with_capacity(examples.len() * len),
        positions: Vec::new(),
        targets: Vec::new(),
        doc_starts: None,
    };
    for (row, example) in examples.iter().enumerate() {
        batch.ids.extend_from_slice(&example.ids);
        batch.ids.resize((row + 1) * len, pad_id);
        for t in example.target_positions(loss_on) {
            batch.positions.push((row * len + t) as u32);
            batch.targets.push(example.ids[t + 1]);
        }
    }
    batch
}

/// Rows of several examples each, laid end to end and right-padded: every example keeps its
/// own scored positions (completion-only masks per document), and `doc_starts` says where each
/// begins.
pub fn pack_batch(rows: &[Vec<&Example>], pad_id: u32, loss_on: LossOn) -> PaddedBatch {
    let row_len = |row: &Vec<&Example>| row.iter().map(|e| e.ids.len()).sum::<usize>();
    let len = rows.iter().map(row_len).max().unwrap_or(0);
    let mut batch = PaddedBatch {
        rows: rows.len(),
        len,
        ids: Vec::with_capacity(rows.len() * len),
        positions: Vec::new(),
        targets: Vec::new(),
        doc_starts: Some(Vec::with_capacity(rows.len() * len)),
    };
    let mut starts = Vec::with_capacity(rows.len() * len);
    for (r, row) in rows.iter().enumerate() {
        let mut start = 0;
        for example in row {
            batch.ids.extend_from_slice(&example.ids);
            starts.resize(starts.len() + example.ids.len(), start as u32);
            for t in example.target_positions(loss_on) {
                batch.positions.push((r * len + start + t) as u32);
                batch.targets.push(example.ids[t + 1]);
            }
            start += example.ids.len();
        }
        batch.ids.resize((r + 1) * len, pad_id);
        starts.resize((r + 1) * len, start as u32);
    }
    batch.doc_starts = Some(starts);
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(doc_id: impl Into<String>, ids: Vec<u32>, prompt_len: usize) -> Example {
        Example {
            doc_id: doc_id.into(),
            ids,
            prompt_len,
        }
    }

    fn row(id: &str, split: &str, len: usize, prompt: u32) -> TokenRow {
        TokenRow {
            doc_id: id.into(),
            chunk: 0,
            split: Some(split.into()),
            ids: (0..len as u32).collect(),
            prompt_len: prompt,
            truncation: None,
        }
    }

    #[test]
    fn targets_are_the_completion_and_padding_is_never_scored() {
        let a = example("a", vec![5, 6, 7, 8], 2);
        let b = example("b", vec![1, 2, 3], 2);
        let batch = pad_batch(&[&a, &b], 0, LossOn::Completion);
        assert_eq!(batch.ids, vec![5, 6, 7, 8, 1, 2, 3, 0]);
        // a: positions 1, 2 predict 7, 8; b: position 1 predicts 3
        assert_eq!(batch.positions, vec![1, 2, 5]);
        assert_eq!(batch.targets, vec![7, 8, 3]);
        let all = pad_batch(&[&b], 0, LossOn::All);
        assert_eq!(all.targets, vec![2, 3]);
    }

    #[test]
    fn overlong_examples_follow_the_chosen_strategy() {
        let rows = vec![
            row("a", "train", 10, 6),
            row("b", "train", 4, 2),
            row("c", "dev", 20, 2),
        ];
        let err = examples_of_split(&rows, "train", 8, Overlong::Error, LossOn::Completion)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("example a") && err.contains("max_len 8"),
            "{err}"
        );
        let (kept, report) =
            examples_of_split(&rows, "train", 8, Overlong::Drop, LossOn::Completion).unwrap();
        assert_eq!((kept.len(), report.dropped_overlong), (1, 1));
        let (kept, report) = examples_of_split(
            &rows,
            "train",
            8,
            Overlong::TruncatePrompt,
            LossOn::Completion,
        )
        .unwrap();
        assert_eq!(report.truncated_overlong, 1);
        assert_eq!(kept[0].ids, vec![0, 1, 2, 3, 6, 7, 8, 9]);
        assert_eq!(kept[0].prompt_len, 4);
    }

    #[test]
    fn epochs_are_reproducible_permutations() {
        let examples: Vec<Example> = (0..23)
            .map(|i| example(i.to_string(), vec![0; 3 + i % 7], 1))
            .collect();
        let plan = BatchPlan {
            batch_size: 4,
            bucket_by_length: true,
            pack_to: None,
        };
        let a = epoch_batches(&examples, &plan, 7, 0);
        assert_eq!(a, epoch_batches(&examples, &plan, 7, 0));
        assert_ne!(a, epoch_batches(&examples, &plan, 7, 1));
        let mut seen: Vec<usize> = a.concat().concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
        assert_eq!(a.iter().filter(|b| b.len() < 4).count(), 1);
        assert!(a.iter().flatten().all(|row| row.len() == 1));
    }

    #[test]
    fn packing_fills_rows_with_fewer_rows_and_less_padding_and_keeps_documents_apart() {
        let examples: Vec<Example> = (0..40)
            .map(|i| {
                example(
                    i.to_string(),
                    (0..(4 + i * 7 % 29) as u32).map(|t| 100 + t).collect(),
                    3,
                )
            })
            .collect();
        let plan = BatchPlan {
            batch_size: 4,
            bucket_by_length: true,
            pack_to: None,
        };
        let packed_plan = BatchPlan {
            pack_to: Some(64),
            ..plan
        };
        let rows_and_padding = |plan: &BatchPlan| -> (usize, usize) {
            let batches = epoch_batches(&examples, plan, 3, 0);
            let mut count = (0, 0);
            for batch in &batches {
                let rows: Vec<Vec<&Example>> = batch
                    .iter()
                    .map(|row| row.iter().map(|&i| &examples[i]).collect())
                    .collect();
                let all: Vec<&Example> = rows.concat();
                let padded = match plan.pack_to {
                    Some(_) => pack_batch(&rows, 0, LossOn::Completion),
                    None => pad_batch(&all, 0, LossOn::Completion),
                };
                count.0 += padded.rows;
                count.1 += padded.padding(&all);
            }
            count
        };
        let plain = rows_and_padding(&plan);
        let packed = rows_and_padding(&packed_plan);
        assert!(packed.0 * 2 < plain.0, "rows: {packed:?} vs {plain:?}");
        assert!(packed.1 < plain.1, "padding: {packed:?} vs {plain:?}");
        let batches = epoch_batches(&examples, &packed_plan, 3, 0);
        assert_eq!(batches, epoch_batches(&examples, &packed_plan, 3, 0));
        let mut seen: Vec<usize> = batches.concat().concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        for row in batches.iter().flatten() {
            let len: usize = row.iter().map(|&i| examples[i].ids.len()).sum();
            assert!(len <= 64, "a row of {len} tokens");
        }
    }

    #[test]
    fn a_packed_row_scores_each_document_as_alone() {
        let a = example("a", vec![5, 6, 7, 8], 2);
        let b = example("b", vec![1, 2, 3], 2);
        let c = example("c", vec![9, 10], 1);
        let batch = pack_batch(&[vec![&a, &b], vec![&c]], 0, LossOn::Completion);
        assert_eq!((batch.rows, batch.len), (2, 7));
        assert_eq!(batch.ids, vec![5, 6, 7, 8, 1, 2, 3, 9, 10, 0, 0, 0, 0, 0]);
        // a: columns 1, 2 predict 7, 8; b (from column 4): column 5 predicts 3; c: 0 → 10
        assert_eq!(batch.positions, vec![1, 2, 5, 7]);
        assert_eq!(batch.targets, vec![7, 8, 3, 10]);
        assert_eq!(
            batch.doc_starts,
            Some(vec![0, 0, 0, 0, 4, 4, 4, 0, 0, 2, 2, 2, 2, 2])
        );
        // The last target of a document is its own last token, never the next document's first.
        let unpacked = pad_batch(&[&a, &b, &c], 0, LossOn::Completion);
        assert_eq!(unpacked.targets, batch.targets);
        assert_eq!(batch.padding(&[&a, &b, &c]), 5);
    }
}
