//! Instruction datasets in JSONL, so that the trainer can fine-tune on any task: alpaca
//! (`instruction`, `input`, `output`), sharegpt (`conversations` of `from`/`value`) and OpenAI
//! chat (`messages` of `role`/`content`). Each line becomes one conversation.

use std::io::BufRead;
use std::path::PathBuf;
use std::str::FromStr;

use duckdb::params;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::db::DatasetKind;
use crate::error::DbContext;
use crate::splits::{seeded_rank, Split, SplitRatios};
use crate::{ImportReport, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstructionFormat {
    Alpaca,
    Sharegpt,
    Messages,
}

impl FromStr for InstructionFormat {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "alpaca" => Ok(Self::Alpaca),
            "sharegpt" => Ok(Self::Sharegpt),
            "messages" | "openai" => Ok(Self::Messages),
            other => Err(StoreError::Invalid(format!(
                "unknown instruction format `{other}` (alpaca, sharegpt, messages)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstructionOptions {
    pub src: PathBuf,
    pub name: String,
    /// Detected from the first record when not given.
    pub format: Option<InstructionFormat>,
    pub drop: bool,
    pub seed: u64,
    pub ratios: SplitRatios,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn detect(record: &Value) -> Option<InstructionFormat> {
    if record.get("messages").is_some() {
        Some(InstructionFormat::Messages)
    } else if record.get("conversations").is_some() {
        Some(InstructionFormat::Sharegpt)
    } else if record.get("instruction").is_some() && record.get("output").is_some() {
        Some(InstructionFormat::Alpaca)
    } else {
        None
    }
}

fn text_field<'a>(record: &'a Value, key: &str) -> Option<&'a str> {
    record.get(key).and_then(Value::as_str)
}

/// One record as a conversation, or why it is not one.
fn to_messages(record: &Value, format: InstructionFormat) -> Result<Vec<Message>, String> {
    let messages = match format {
        InstructionFormat::Alpaca => {
            let instruction =
                text_field(record, "instruction").ok_or("missing string field `instruction`")?;
            let output = text_field(record, "output").ok_or("missing string field `output`")?;
            let mut user = instruction.to_string();
            if let Some(input) = text_field(record, "input").filter(|i| !i.trim().is_empty()) {
                user.push_str("\n\n");
                user.push_str(input);
            }
            let mut messages = Vec::new();
            if let Some(system) = text_field(record, "system").filter(|s| !s.trim().is_empty()) {
                messages.push(Message {
                    role: "system".into(),
                    content: system.into(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: user,
            });
            messages.push(Message {
                role: "assistant".into(),
                content: output.into(),
            });
            messages
        }
        InstructionFormat::Sharegpt | InstructionFormat::Messages => {
            let (list_key, role_key, content_key) = match format {
                InstructionFormat::Sharegpt => ("conversations", "from", "value"),
                _ => ("messages", "role", "content"),
            };
            let list = record
                .get(list_key)
                .and_then(Value::as_array)
                .ok_or_else(|| format!("`{list_key}` is not a list"))?;
            list.iter()
                .enumerate()
                .map(|(i, turn)| {
                    let role = text_field(turn, role_key)
                        .ok_or_else(|| format!("turn {i}: missing `{role_key}`"))?;
                    let content = text_field(turn, content_key)
                        .ok_or_else(|| format!("turn {i}: missing `{content_key}`"))?;
                    let role = match role {
                        "human" | "user" => "user",
                        "gpt" | "assistant" | "model" => "assistant",
                        "system" => "system",
                        other => return Err(format!("turn {i}: unknown role `{other}`")),
                    };
                    Ok(Message {
                        role: role.into(),
                        content: content.into(),
                    })
                })
                .collect::<Result<_, String>>()?
        }
    };
    match messages.last() {
        Some(last) if last.role == "assistant" => Ok(messages),
        Some(_) => Err("the last turn is not the assistant's: nothing to learn".into()),
        None => Err("empty conversation".into()),
    }
}

pub fn import_instructions(
    store: &Store,
    options: &InstructionOptions,
) -> Result<ImportReport, StoreError> {
    let name = &options.name;
    let options_json =
        serde_json::to_string(options).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if store.already_imported(name, &options_json, options.drop)? {
        return crate::stats::import_report(store, name, Vec::new(), Vec::new());
    }
    let path = &options.src;
    let file = fs_err::File::open(path)?;
    let mut format = options.format;
    let mut examples: Vec<(String, String, Option<Split>)> = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| StoreError::InputLine {
            path: path.clone(),
            line: i as u64 + 1,
            message,
        };
        let record: Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let record_format = match format {
            Some(f) => f,
            None => {
                let detected = detect(&record).ok_or_else(|| {
                    bad("unknown format: expected `messages`, `conversations`, or `instruction` + `output` (or pass --format)".into())
                })?;
                format = Some(detected);
                detected
            }
        };
        let messages = to_messages(&record, record_format).map_err(bad)?;
        let id = record
            .get("id")
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .unwrap_or_else(|| format!("{}", i + 1));
        let split = match record.get("split").and_then(Value::as_str) {
            Some(s) => Some(s.parse().map_err(|e: StoreError| bad(e.to_string()))?),
            None => None,
        };
        let json = serde_json::to_string(&messages).map_err(|e| bad(e.to_string()))?;
        examples.push((id, json, split));
    }
    if examples.is_empty() {
        return Err(StoreError::Input {
            path: path.clone(),
            message: "no examples".into(),
        });
    }
    // Examples without a `split` field: seeded, by example.
    let mut unsplit: Vec<(u64, usize)> = examples
        .iter()
        .enumerate()
        .filter(|(_, e)| e.2.is_none())
        .map(|(i, e)| (seeded_rank(options.seed, &e.0), i))
        .collect();
    unsplit.sort_unstable();
    let n = unsplit.len() as f64;
    let train_end = (n * options.ratios.train).round() as usize;
    let validation_end = (n * (options.ratios.train + options.ratios.validation)).round() as usize;
    for (rank, (_, i)) in unsplit.iter().enumerate() {
        examples[*i].2 = Some(if rank < train_end {
            Split::Train
        } else if rank < validation_end {
            Split::Validation
        } else {
            Split::Test
        });
    }
    store.in_transaction(&format!("importing {}", path.display()), |conn| {
        Store::reset_dataset(
            conn,
            name,
            DatasetKind::Instructions,
            &path.to_string_lossy(),
            &options_json,
        )?;
        let ctx = || format!("writing {name}");
        let mut conversations = conn.appender("conversations").db(ctx)?;
        for (id, json, _) in &examples {
            conversations.append_row(params![name, id, json]).db(ctx)?;
        }
        conversations.flush().db(ctx)?;
        drop(conversations);
        let mut splits = conn.appender("splits").db(ctx)?;
        for (id, _, split) in &examples {
            let split = split.unwrap_or(Split::Train);
            splits
                .append_row(params![name, id, split.as_str()])
                .db(ctx)?;
        }
        splits.flush().db(ctx)?;
        Ok(())
    })?;
    crate::stats::import_report(
        store,
        name,
        vec![("conversations".into(), examples.len() as u64)],
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn three_formats_become_the_same_conversation() {
        let alpaca =
            json!({"instruction": "Code this note.", "input": "Chest pain.", "output": "R07.9"});
        let sharegpt = json!({"conversations": [
            {"from": "human", "value": "Code this note.\n\nChest pain."}, {"from": "gpt", "value": "R07.9"}]});
        let messages = json!({"messages": [
            {"role": "user", "content": "Code this note.\n\nChest pain."}, {"role": "assistant", "content": "R07.9"}]});
        let a = to_messages(&alpaca, detect(&alpaca).unwrap()).unwrap();
        assert_eq!(
            a,
            to_messages(&sharegpt, detect(&sharegpt).unwrap()).unwrap()
        );
        assert_eq!(
            a,
            to_messages(&messages, detect(&messages).unwrap()).unwrap()
        );
    }

    #[test]
    fn a_conversation_must_end_with_the_assistant() {
        let record = json!({"messages": [{"role": "user", "content": "hi"}]});
        let err = to_messages(&record, InstructionFormat::Messages).unwrap_err();
        assert!(err.contains("not the assistant"), "{err}");
        let record = json!({"messages": [{"role": "robot", "content": "hi"}]});
        assert!(to_messages(&record, InstructionFormat::Messages)
            .unwrap_err()
            .contains("unknown role"));
    }
}
