//! `tokenize_dataset` on the small synthetic MIMIC-IV release and on an alpaca JSONL, with a
//! word-level fixture tokenizer written into a temp dir (no download).

mod support;

use std::collections::BTreeSet;

use medcoder_models::ModelTokenizer;
use medcoder_store::{import_instructions, InstructionOptions, SplitRatios, TokenRow};
use medcoder_train::{tokenize_dataset, PromptTemplate, TokenizeReport, TrainError, Truncation};
use support::tokenizer::{chatml_prompt, IM_END};
use support::{gold_answer, options, MimicFixture, DATASET};

const MODEL: &str = "fixture-chatml";
/// Longer than any example of the fixture.
const NO_LIMIT: usize = 100_000;

fn prompt_prefix() -> String {
    PromptTemplate::default().user_text("")
}

fn tokenize(
    fx: &MimicFixture,
    tok: &ModelTokenizer,
    max_len: usize,
    t: Truncation,
) -> TokenizeReport {
    tokenize_dataset(&fx.store, tok, &options(MODEL, max_len, t)).expect("tokenize the dataset")
}

fn rows(fx: &MimicFixture) -> Vec<TokenRow> {
    fx.store.token_rows(DATASET, MODEL).expect("token rows")
}

/// Prompt and completion of a row, decoded.
fn decoded(tok: &ModelTokenizer, row: &TokenRow) -> (String, String) {
    let (prompt, completion) = row.ids.split_at(row.prompt_len as usize);
    (
        tok.decode(prompt).expect("decode the prompt"),
        tok.decode(completion).expect("decode the completion"),
    )
}

/// The note text of a ChatML prompt of the default template.
fn note_of(prompt: &str) -> &str {
    let user = prompt
        .strip_prefix("<|im_start|>user\n")
        .and_then(|p| p.strip_suffix("<|im_end|>\n<|im_start|>assistant\n"))
        .unwrap_or_else(|| panic!("not a ChatML user turn: {prompt:?}"));
    user.strip_prefix(&prompt_prefix())
        .unwrap_or_else(|| panic!("not the default prompt: {user:?}"))
}

/// The smallest example's length, and a limit under it that still leaves room for the longest
/// completion and part of a note.
fn tight_limit(fx: &MimicFixture, tok: &ModelTokenizer) -> usize {
    tokenize(fx, tok, NO_LIMIT, Truncation::Drop);
    let rows = rows(fx);
    let shortest = rows.iter().map(|r| r.ids.len()).min().expect("rows");
    let completion = rows
        .iter()
        .map(|r| r.ids.len() - r.prompt_len as usize)
        .max()
        .expect("rows");
    let limit = completion + 48;
    assert!(
        limit < shortest,
        "fixture notes too short: {limit} vs {shortest}"
    );
    limit
}

#[test]
fn rows_decode_to_the_chat_prompt_and_the_gold_codes() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let im_end = tok.encode(IM_END).unwrap();
    assert_eq!(im_end.len(), 1, "{IM_END} is one special token");
    let report = tokenize(&fx, &tok, NO_LIMIT, Truncation::HeadTail);
    assert!(report.chat_template);
    let examples = fx.examples(false);
    assert!(examples.len() > 10, "{} examples", examples.len());
    assert_eq!(report.examples, examples.len() as u64);
    assert_eq!(report.rows_written, report.examples);
    assert_eq!((report.over_limit, report.dropped), (0, 0));
    assert_eq!(report.truncation, "head-tail");
    assert!(report.lengths.p50 > 100 && report.lengths.max <= report.lengths.p50 * 3);

    let rows = rows(&fx);
    let stored: Vec<&str> = rows.iter().map(|r| r.doc_id.as_str()).collect();
    let expected: Vec<&str> = examples.iter().map(|d| d.doc_id.as_str()).collect();
    assert_eq!(stored, expected, "one row per ICD-10 document with text");
    for row in &rows {
        let doc = fx.document(&row.doc_id);
        assert_eq!((row.chunk, row.truncation.as_deref()), (0, None));
        assert_eq!(row.split, doc.split.map(|s| s.as_str().to_string()));
        assert!(!doc.diagnoses.is_empty(), "{}", doc.doc_id);
        assert_eq!(row.ids.last(), Some(&im_end[0]), "{}", row.doc_id);
        let (prompt, completion) = decoded(&tok, row);
        let note = doc.text.as_deref().unwrap_or_default();
        assert_eq!(
            prompt,
            chatml_prompt(&PromptTemplate::default().user_text(note))
        );
        assert!(prompt.starts_with("<|im_start|>user\n"), "{prompt}");
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
        assert_eq!(completion, format!("{}{IM_END}", gold_answer(doc)));
        assert!(
            completion.contains('.'),
            "ICD-10-CM codes keep their dot: {completion}"
        );
    }
}

#[test]
fn icd9_documents_are_left_out_unless_asked_for() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let (icd10, all) = (fx.examples(false).len(), fx.examples(true).len());
    assert!(icd10 < all, "the fixture has ICD-9 documents with text");
    let only10 = tokenize(&fx, &tok, NO_LIMIT, Truncation::Drop);
    assert_eq!(only10.examples, icd10 as u64);
    let with9 = tokenize_dataset(
        &fx.store,
        &tok,
        &medcoder_train::TokenizeOptions {
            include_icd9: true,
            ..options(MODEL, NO_LIMIT, Truncation::Drop)
        },
    )
    .unwrap();
    assert_eq!(
        (with9.examples, with9.rows_written),
        (all as u64, all as u64)
    );
    let icd9_rows = rows(&fx)
        .iter()
        .filter(|r| fx.document(&r.doc_id).icd_version == Some(9))
        .count();
    assert_eq!(icd9_rows, all - icd10);
}

#[test]
fn without_a_chat_template_the_prompt_is_the_user_text_and_no_eos_is_added() {
    let fx = MimicFixture::new();
    let tok = fx.bare();
    assert!(tok.chat_template.is_none() && tok.eos_token.is_none());
    let report = tokenize(&fx, &tok, NO_LIMIT, Truncation::Drop);
    assert!(!report.chat_template);
    assert_eq!(report.rows_written, fx.examples(false).len() as u64);
    for row in &rows(&fx) {
        let doc = fx.document(&row.doc_id);
        let (prompt, completion) = decoded(&tok, row);
        let note = doc.text.as_deref().unwrap_or_default();
        assert_eq!(
            prompt,
            format!("{}\n", PromptTemplate::default().user_text(note))
        );
        assert_eq!(completion, gold_answer(doc));
    }
}

#[test]
fn drop_leaves_out_examples_over_the_limit_and_counts_them() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let full = tokenize(&fx, &tok, NO_LIMIT, Truncation::Drop);
    let lengths: Vec<(String, usize)> = rows(&fx)
        .into_iter()
        .map(|r| (r.doc_id, r.ids.len()))
        .collect();
    let max_len = full.lengths.p50;
    let report = tokenize(&fx, &tok, max_len, Truncation::Drop);
    let over: BTreeSet<&str> = lengths
        .iter()
        .filter(|(_, n)| *n > max_len)
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(!over.is_empty() && over.len() < lengths.len());
    assert_eq!(report.examples, full.examples);
    assert_eq!(report.over_limit, over.len() as u64);
    assert_eq!(report.dropped, over.len() as u64);
    assert_eq!(report.rows_written, report.examples - report.dropped);
    assert_eq!(
        report.lengths.max, full.lengths.max,
        "lengths before truncation"
    );
    for row in rows(&fx) {
        assert!(!over.contains(row.doc_id.as_str()), "{} kept", row.doc_id);
        assert!(row.ids.len() <= max_len && row.truncation.is_none());
    }
}

#[test]
fn head_and_head_tail_write_one_row_per_example_within_the_limit() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let max_len = tight_limit(&fx, &tok);
    for (strategy, name) in [
        (Truncation::Head, "head"),
        (Truncation::HeadTail, "head-tail"),
    ] {
        let report = tokenize(&fx, &tok, max_len, strategy);
        assert_eq!(report.over_limit, report.examples, "{name}");
        assert_eq!(
            (report.rows_written, report.dropped),
            (report.examples, 0),
            "{name}"
        );
        let rows = rows(&fx);
        assert_eq!(rows.len() as u64, report.examples);
        for row in &rows {
            assert!(
                row.ids.len() <= max_len,
                "{name} {}: {}",
                row.doc_id,
                row.ids.len()
            );
            assert_eq!((row.chunk, row.truncation.as_deref()), (0, Some(name)));
            let doc = fx.document(&row.doc_id);
            let text = doc.text.as_deref().unwrap_or_default();
            let (prompt, completion) = decoded(&tok, row);
            assert_eq!(completion, format!("{}{IM_END}", gold_answer(doc)));
            let note = note_of(&prompt);
            match strategy {
                Truncation::Head => {
                    assert!(note.len() > 20 && text.starts_with(note), "{note:?}");
                }
                _ => {
                    let (head, tail) = note.split_once("\n…\n").expect("a head and a tail");
                    assert!(text.starts_with(head) && text.ends_with(tail), "{note:?}");
                    assert!(!head.is_empty() && !tail.is_empty(), "{note:?}");
                }
            }
        }
    }
}

#[test]
fn chunk_cuts_long_notes_into_rows_that_each_carry_the_codes() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let max_len = tight_limit(&fx, &tok);
    let report = tokenize(&fx, &tok, max_len, Truncation::Chunk);
    assert_eq!((report.over_limit, report.dropped), (report.examples, 0));
    let rows = rows(&fx);
    assert_eq!(report.rows_written, rows.len() as u64);
    for doc in fx.examples(false) {
        let chunks: Vec<&TokenRow> = rows.iter().filter(|r| r.doc_id == doc.doc_id).collect();
        assert!(chunks.len() >= 2, "{}: {} rows", doc.doc_id, chunks.len());
        let numbers: Vec<u32> = chunks.iter().map(|r| r.chunk).collect();
        assert_eq!(numbers, (0..chunks.len() as u32).collect::<Vec<_>>());
        let mut joined = String::new();
        for row in &chunks {
            assert!(
                row.ids.len() <= max_len,
                "{}: {}",
                row.doc_id,
                row.ids.len()
            );
            assert_eq!(row.truncation.as_deref(), Some("chunk"));
            let (prompt, completion) = decoded(&tok, row);
            assert_eq!(completion, format!("{}{IM_END}", gold_answer(doc)));
            joined.push_str(note_of(&prompt));
        }
        assert_eq!(
            Some(joined.as_str()),
            doc.text.as_deref(),
            "chunks cover the note"
        );
    }
}

#[test]
fn a_limit_without_room_for_the_note_names_the_example_and_keeps_earlier_tokens() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let before = tokenize(&fx, &tok, NO_LIMIT, Truncation::Drop);
    for strategy in [Truncation::Head, Truncation::HeadTail, Truncation::Chunk] {
        let err = tokenize_dataset(&fx.store, &tok, &options(MODEL, 24, strategy)).unwrap_err();
        let message = err.to_string();
        let TrainError::Example { doc_id, .. } = &err else {
            panic!("not an example error: {message}");
        };
        assert_eq!(
            doc_id,
            &fx.examples(false)[0].doc_id,
            "the first example fails"
        );
        assert!(
            message.starts_with(&format!("example {doc_id}: ")),
            "{message}"
        );
        assert!(
            message.contains("leave no room for the note in 24 tokens"),
            "{message}"
        );
    }
    assert_eq!(
        rows(&fx).len() as u64,
        before.rows_written,
        "a failed run changes nothing"
    );
    let dropped = tokenize(&fx, &tok, 24, Truncation::Drop);
    assert_eq!(
        (dropped.rows_written, dropped.dropped),
        (0, dropped.examples)
    );
}

#[test]
fn tokenizing_again_replaces_the_rows_of_that_dataset_and_model() {
    let fx = MimicFixture::new();
    let tok = fx.chatml();
    let first = tokenize(&fx, &tok, NO_LIMIT, Truncation::HeadTail);
    let first_rows = rows(&fx);
    let again = tokenize(&fx, &tok, NO_LIMIT, Truncation::HeadTail);
    assert_eq!(again.rows_written, first.rows_written);
    assert_eq!(rows(&fx), first_rows, "same options, same rows");

    let max_len = tight_limit(&fx, &tok);
    let chunked = tokenize(&fx, &tok, max_len, Truncation::Chunk);
    assert!(chunked.rows_written > first.rows_written);
    assert_eq!(rows(&fx).len() as u64, chunked.rows_written);
    tokenize(&fx, &tok, NO_LIMIT, Truncation::HeadTail);
    assert_eq!(rows(&fx), first_rows, "no chunk rows left behind");

    // Another model's tokens sit beside, untouched.
    tokenize_dataset(
        &fx.store,
        &tok,
        &options("other", max_len, Truncation::Chunk),
    )
    .unwrap();
    let other = fx.store.token_rows(DATASET, "other").unwrap();
    assert_eq!(other.len() as u64, chunked.rows_written);
    assert_eq!(rows(&fx), first_rows);
}

#[test]
fn instruction_examples_render_through_the_chat_template() {
    let fx = MimicFixture::new();
    let src = fx.dir.path().join("alpaca.jsonl");
    let records: Vec<(String, String, String)> = (0..12)
        .map(|i| {
            let input = format!("Note {i}: chest pain, \"acute\".");
            let user = format!("Code this note.\n\n{input}");
            let output = format!("R07.9, I{}", 10 + i);
            (input, user, output)
        })
        .collect();
    let lines: Vec<String> = records
        .iter()
        .enumerate()
        .map(|(i, (input, _, output))| {
            serde_json::json!({"id": format!("ex{i:02}"), "instruction": "Code this note.",
                               "input": input, "output": output})
            .to_string()
        })
        .collect();
    std::fs::write(&src, lines.join("\n") + "\n").unwrap();
    let imported = InstructionOptions {
        src,
        name: "sft".into(),
        format: None,
        drop: false,
        seed: 42,
        ratios: SplitRatios::default(),
    };
    import_instructions(&fx.store, &imported).unwrap();
    let corpus: Vec<String> = records
        .iter()
        .flat_map(|(_, user, output)| [chatml_prompt(user), format!("{output}{IM_END}")])
        .collect();
    let dir = fx.dir.path().join("sft-tokenizer");
    support::tokenizer::write_chatml_tokenizer(&dir, &corpus);
    let tok = ModelTokenizer::from_dir(&dir).unwrap();

    let sft = medcoder_train::TokenizeOptions {
        dataset: "sft".into(),
        ..options(MODEL, 512, Truncation::Drop)
    };
    let report = tokenize_dataset(&fx.store, &tok, &sft).unwrap();
    assert_eq!((report.examples, report.rows_written), (12, 12));
    let rows = fx.store.token_rows("sft", MODEL).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let (_, user, output) = &records[i];
        assert_eq!(row.doc_id, format!("ex{i:02}"));
        assert!(row.split.is_some(), "{}", row.doc_id);
        let (prompt, completion) = decoded(&tok, row);
        assert_eq!(prompt, chatml_prompt(user));
        assert_eq!(completion, format!("{output}{IM_END}"));
    }
}
