//! The OpenAI-compatible endpoint on a tiny random llama the test writes (ChatML tokenizer, no
//! download): plain and streamed completions agree, seeds repeat, concurrent requests are
//! batched without crossing (continuous batching: a request arriving mid-generation joins it),
//! `response_format` JSON schemas are followed, and bad requests are refused naming the field.

#![allow(clippy::unwrap_used)]

mod support;
#[path = "../../train/tests/support/tiny_model.rs"]
mod tiny_model;
#[path = "../../train/tests/support/tokenizer.rs"]
mod tokenizer_fixture;

use medcoder_models::ModelTokenizer;
use medcoder_server::config::GenerationConfig;
use serde_json::{json, Value};
use support::{corpus, get, post, TestServer};

const WORDS: &str = "the patient has fever cough pneumonia diabetes fracture of the femur and was treated with antibiotics metformin surgery rest";

fn chat(model: &str, user: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": user}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The streamed events' content deltas joined, and the finish reason of the last chunk.
fn read_stream(body: &str) -> (String, String) {
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish = chunks.last().unwrap()["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    (text, finish)
}

/// JSON punctuation, letters and digits as tokens of their own, so that constrained decoding
/// can always write what a schema needs, and the pieces of a typical answer.
fn json_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "{",
        "}",
        "[",
        "]",
        "\"",
        ":",
        ",",
        "-",
        ".",
        "{\"",
        "\":",
        "\",",
        "\"}",
        "\"}]",
        "[]",
        "true",
        "false",
        "null",
        r#"{"diagnoses": [{"code": "E11.9", "evidence": "fever"}], "procedures": []}"#,
    ]
    .map(String::from)
    .to_vec();
    texts.extend(
        ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .map(String::from),
    );
    texts
}

/// The schema the `openai` coding engine sends (its `answer_schema`).
fn codes_schema() -> Value {
    let items = json!({"type": "array", "items": {"type": "object",
        "properties": {"code": {"type": "string"}, "evidence": {"type": "string"}},
        "required": ["code", "evidence"], "additionalProperties": false}});
    json!({"type": "object", "properties": {"diagnoses": items, "procedures": items},
        "required": ["diagnoses", "procedures"], "additionalProperties": false})
}

/// Whether `value` follows [`codes_schema`].
fn follows_codes_schema(value: &Value) -> bool {
    let items_ok = |v: &Value| {
        v.as_array().is_some_and(|items| {
            items.iter().all(|item| {
                item.as_object().is_some_and(|o| {
                    o.len() == 2 && o["code"].is_string() && o["evidence"].is_string()
                })
            })
        })
    };
    value.as_object().is_some_and(|o| {
        o.len() == 2
            && o.get("diagnoses").is_some_and(items_ok)
            && o.get("procedures").is_some_and(items_ok)
    })
}

/// A server with the tiny chat model as `tiny`, and the corpus it lives in.
fn tiny_chat_server() -> (support::Corpus, TestServer) {
    let corpus = corpus();
    let model_dir = corpus.dir.path().join("tiny");
    let mut texts: Vec<String> = WORDS.split(' ').map(str::to_string).collect();
    texts.extend(json_texts());
    tokenizer_fixture::write_chatml_tokenizer(&model_dir, &texts);
    let vocab = ModelTokenizer::from_dir(&model_dir).unwrap().vocab_size();
    tiny_model::write_tiny_llama(&model_dir, vocab, 5);
    let mut config = corpus.config();
    config.generation = Some(GenerationConfig {
        model: model_dir.display().to_string(),
        served_name: Some("tiny".into()),
        device: "cpu".into(),
        max_batch: 8,
        default_max_tokens: 12,
        max_tokens_limit: 512,
    });
    let server = TestServer::start(config, corpus.home.root(), true);
    (corpus, server)
}

#[test]
fn chat_completions_plain_streamed_seeded_batched_and_refused() {
    let (_corpus, server) = tiny_chat_server();
    let url = server.url("/v1/chat/completions");

    let (status, models) = get(&server.url("/v1/models"), None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    // Greedy, plain: an OpenAI-shaped answer within max_tokens.
    let greedy = json!({"temperature": 0, "max_tokens": 10});
    let a = post(&url, &chat("tiny", "the patient has fever", greedy.clone()));
    assert_eq!(a.status, 200, "{}", a.body);
    let c = a.json();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["model"], "tiny");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    let plain = c["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &c["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=10).contains(&completion), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    let finish = c["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        finish == "stop" || (finish == "length" && completion == 10),
        "{c}"
    );

    // Streamed: server-sent events whose deltas join to the same text.
    let mut streamed = greedy.clone();
    streamed["stream"] = json!(true);
    let a = post(&url, &chat("tiny", "the patient has fever", streamed));
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.content_type.unwrap().starts_with("text/event-stream"));
    let (text, finish_streamed) = read_stream(&a.body);
    assert_eq!(text, plain);
    assert_eq!(finish_streamed, finish);

    // A seed repeats a sampled answer; stop strings end it early.
    let seeded = json!({"temperature": 1.0, "seed": 7, "max_tokens": 16});
    let first = post(&url, &chat("tiny", "cough", seeded.clone())).json();
    let second = post(&url, &chat("tiny", "cough", seeded)).json();
    assert_eq!(
        first["choices"][0]["message"],
        second["choices"][0]["message"]
    );

    // Concurrent requests (batched on the generation thread) each get their own answer: the
    // one they get alone.
    let prompts = [
        "fever",
        "cough and fever",
        "diabetes",
        "fracture of the femur",
        "the patient",
        "surgery",
    ];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            post(&url, &chat("tiny", p, greedy.clone())).json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, body) = (url.clone(), chat("tiny", p, greedy.clone()));
            std::thread::spawn(move || post(&url, &body))
        })
        .collect();
    for (thread, expected) in threads.into_iter().zip(&alone) {
        let a = thread.join().unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            a.json()["choices"][0]["message"]["content"],
            expected.as_str()
        );
    }

    // Refusals name the field.
    let a = post(&url, &chat("gpt-4", "hi", json!({})));
    assert_eq!(a.status, 404);
    assert!(a.error_message().contains("serves `tiny`"), "{}", a.body);
    let a = post(&url, &chat("tiny", "hi", json!({"max_tokens": 100_000})));
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("max_tokens"), "{}", a.body);
    let a = post(
        &url,
        &chat(
            "tiny",
            "hi",
            json!({"response_format": {"type": "json_schema"}}),
        ),
    );
    assert_eq!(a.status, 400);
    assert!(a.error_message().contains("response_format"), "{}", a.body);
    let a = post(
        &url,
        &chat(
            "tiny",
            "hi",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "string", "pattern": "^[A-Z]"}}}}),
        ),
    );
    assert_eq!(a.status, 400);
    assert!(a.error_message().contains("`pattern`"), "{}", a.body);
    let a = post(&url, &json!({"model": "tiny"}));
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("messages"), "{}", a.body);
    let a = post(&url, &chat("tiny", "hi", json!({"temperature": 3})));
    assert_eq!(a.status, 422);
}

/// The official `openai` Python client streams a completion, lists the models and gets JSON
/// valid against a schema it sends as `response_format`. Runs when
/// Python with `openai` is installed (`pip install openai`), skips saying so otherwise.
#[test]
fn the_official_openai_python_client_streams_a_completion() {
    let installed = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!(
            "skipping: python3 with the openai package is not installed (pip install openai)"
        );
        return;
    }
    let (_corpus, server) = tiny_chat_server();
    let script = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
assert [m.id for m in client.models.list().data] == ["tiny"]
pieces, finish = [], None
for chunk in client.chat.completions.create(model="tiny", stream=True, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "the patient has fever"}]):
    delta = chunk.choices[0].delta.content
    if delta:
        pieces.append(delta)
    finish = chunk.choices[0].finish_reason or finish
plain = client.chat.completions.create(model="tiny", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "the patient has fever"}])
assert "".join(pieces) == plain.choices[0].message.content, (pieces, plain)
assert finish in ("stop", "length"), finish
schema = {"type": "object", "properties": {"code": {"type": "string"}, "present": {"type": "boolean"}},
          "required": ["code", "present"], "additionalProperties": False}
answer = client.chat.completions.create(model="tiny", temperature=0.8, seed=2, max_tokens=300,
        messages=[{"role": "user", "content": "the patient has fever"}],
        response_format={"type": "json_schema", "json_schema": {"name": "code", "strict": True, "schema": schema}})
assert answer.choices[0].finish_reason == "stop", answer
value = json.loads(answer.choices[0].message.content)
assert set(value) == {"code", "present"} and isinstance(value["present"], bool), value
print("streamed", len(pieces), "pieces;", finish, "; json_schema answer", value)
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script, &server.url("/v1")])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("streamed"));
}

/// The `openai` coding engine pointed at our own chat endpoint: a second server codes notes
/// through the first one's `/v1/chat/completions`. The tiny model's answer is noise; what is
/// checked is the round trip and that only allowed codes come out.
#[test]
fn the_openai_engine_codes_through_our_own_chat_endpoint() {
    let (corpus, chat_server) = tiny_chat_server();
    let mut config = corpus.config();
    config.engine.engine = medcoder_coding::EngineKind::Openai;
    config.engine.openai.base_url = Some(chat_server.url("/v1"));
    config.engine.openai.model = Some("tiny".into());
    config.engine.openai.max_tokens = Some(200);
    config.engine.openai.retries = 0;
    let coder = TestServer::start(config, corpus.home.root(), true);
    let a = post(
        &coder.url("/v1/code"),
        &json!({"id": "o1", "text": "the patient has fever and cough"}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let p = a.json();
    assert_eq!(p["engine"], "openai");
    assert_eq!(p["id"], "o1");
    let allowed = ["E11.9", "J18.9", "S72.009A"];
    for c in p["diagnoses"].as_array().unwrap() {
        assert!(allowed.contains(&c["code"].as_str().unwrap()), "{p}");
    }
    let metrics = support::get_with(&chat_server.url("/metrics"), &[]).body;
    // The JSON-schema request was answered at once (200), with no refusal and retry.
    assert!(
        !metrics.contains("route=\"/v1/chat/completions\",status=\"400\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("route=\"/v1/chat/completions\",status=\"200\"} 1"),
        "{metrics}"
    );
}

/// POSTs `body` and hands each server-sent event's data to `on_event` as it arrives.
fn stream_events(url: &str, body: &Value, mut on_event: impl FnMut(&str)) {
    use std::io::BufRead;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into();
    let response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    let reader = std::io::BufReader::new(response.into_body().into_reader());
    for line in reader.lines() {
        if let Some(data) = line.unwrap().strip_prefix("data: ") {
            on_event(data);
        }
    }
}

/// The content of a `chat.completion.chunk` event, if it has some.
fn chunk_content(data: &str) -> Option<String> {
    let chunk: Value = serde_json::from_str(data).ok()?;
    let content = chunk["choices"][0]["delta"]["content"].as_str()?;
    (!content.is_empty()).then(|| content.to_string())
}

/// Continuous batching: a request sent while a long one is generating joins it at once (its
/// text streams before the long one ends) and both get what they get alone.
#[test]
fn a_request_arriving_mid_generation_streams_before_the_running_one_ends() {
    let (_corpus, server) = tiny_chat_server();
    let url = server.url("/v1/chat/completions");
    let solo = |prompt: &str, max_tokens: usize| -> Value {
        let body = chat(
            "tiny",
            prompt,
            json!({"temperature": 0, "max_tokens": max_tokens}),
        );
        post(&url, &body).json()["choices"][0].clone()
    };
    // A prompt the tiny model goes on about until max_tokens.
    let long_prompt = [
        "the patient has fever",
        "cough",
        "diabetes",
        "fracture of the femur",
        "rest",
    ]
    .into_iter()
    .find(|p| solo(p, 400)["finish_reason"] == "length")
    .expect("a prompt that runs to max_tokens");
    let long_alone = solo(long_prompt, 400)["message"]["content"].clone();
    let short_alone = solo("surgery", 6)["message"]["content"].clone();

    let stream_body = |prompt: &str, max_tokens: usize| {
        chat(
            "tiny",
            prompt,
            json!({"temperature": 0, "max_tokens": max_tokens, "stream": true}),
        )
    };
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let long = {
        let (url, body) = (url.clone(), stream_body(long_prompt, 400));
        std::thread::spawn(move || {
            let (mut text, mut pieces, mut last) = (String::new(), 0, None);
            stream_events(&url, &body, |data| {
                if let Some(content) = chunk_content(data) {
                    text.push_str(&content);
                    pieces += 1;
                    last = Some(std::time::Instant::now());
                    if pieces == 3 {
                        let _ = started_tx.send(());
                    }
                }
            });
            (text, last.unwrap())
        })
    };
    started_rx.recv().unwrap();
    let (mut short_text, mut short_first) = (String::new(), None);
    stream_events(&url, &stream_body("surgery", 6), |data| {
        if let Some(content) = chunk_content(data) {
            short_first.get_or_insert_with(std::time::Instant::now);
            short_text.push_str(&content);
        }
    });
    let (long_text, long_last) = long.join().unwrap();
    assert!(
        short_first.unwrap() < long_last,
        "the second request streamed only after the first ended"
    );
    assert_eq!(long_text, long_alone.as_str().unwrap());
    assert_eq!(short_text, short_alone.as_str().unwrap());
}

/// `response_format` with the `openai` engine's schema: constrained decoding makes even the
/// random tiny model answer JSON valid against it, plain and streamed; `json_object` gives an
/// object.
#[test]
fn json_schema_response_format_gives_schema_valid_json() {
    let (_corpus, server) = tiny_chat_server();
    let url = server.url("/v1/chat/completions");
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "icd10_codes", "strict": true, "schema": codes_schema()}});
    for seed in 1..=4 {
        let body = chat(
            "tiny",
            "the patient has fever",
            json!({"response_format": format, "temperature": 0.8, "seed": seed, "max_tokens": 500}),
        );
        let a = post(&url, &body);
        assert_eq!(a.status, 200, "{}", a.body);
        let c = a.json();
        let content = c["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "stop", "{content}");
        let value: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("seed {seed}: {e}: {content}"));
        assert!(follows_codes_schema(&value), "seed {seed}: {content}");

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let a = post(&url, &streamed);
        assert_eq!(a.status, 200, "{}", a.body);
        let (text, finish) = read_stream(&a.body);
        assert_eq!((text.as_str(), finish.as_str()), (content, "stop"));
    }
    let body = chat(
        "tiny",
        "cough",
        json!({"response_format": {"type": "json_object"}, "temperature": 0.8, "seed": 3, "max_tokens": 500}),
    );
    let a = post(&url, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    let c = a.json();
    let content = c["choices"][0]["message"]["content"].as_str().unwrap();
    if c["choices"][0]["finish_reason"] == "stop" {
        let value: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
        assert!(value.is_object(), "{content}");
    } else {
        assert!(content.starts_with('{'), "{content}");
    }
}

/// The llm coding engine behind `/v1/code`: notes sent together are generated as one batch
/// (up to `limits.llm_batch`) and each gets the codes it gets alone, all of them allowed.
#[test]
fn llm_engine_notes_arriving_together_are_coded_as_they_are_alone() {
    let corpus = corpus();
    let model_dir = corpus.dir.path().join("tiny");
    let texts: Vec<String> = WORDS.split(' ').map(str::to_string).collect();
    tokenizer_fixture::write_chatml_tokenizer(&model_dir, &texts);
    let vocab = ModelTokenizer::from_dir(&model_dir).unwrap().vocab_size();
    tiny_model::write_tiny_llama(&model_dir, vocab, 5);
    let mut config = corpus.config();
    config.engine.engine = medcoder_coding::EngineKind::Llm;
    config.engine.model = Some(model_dir.display().to_string());
    config.engine.device = "cpu".into();
    config.limits.llm_batch = 4;
    let server = TestServer::start(config, corpus.home.root(), true);
    let url = server.url("/v1/code");
    let notes = [
        "fever and cough",
        "diabetes",
        "fracture of the femur",
        "the patient has pneumonia",
        "surgery",
        "rest",
    ];
    let alone: Vec<Value> = notes
        .iter()
        .map(|n| {
            let a = post(&url, &json!({"id": n, "text": n}));
            assert_eq!(a.status, 200, "{}", a.body);
            a.json()
        })
        .collect();
    let threads: Vec<_> = notes
        .iter()
        .map(|n| {
            let (url, body) = (url.clone(), json!({"id": n, "text": n}));
            std::thread::spawn(move || post(&url, &body))
        })
        .collect();
    let allowed = ["E11.9", "J18.9", "S72.009A"];
    for (thread, one) in threads.into_iter().zip(&alone) {
        let a = thread.join().unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        let p = a.json();
        assert_eq!(p["engine"], "llm");
        assert_eq!(p["id"], one["id"]);
        assert_eq!(p["diagnoses"], one["diagnoses"], "{p}\n{one}");
        for c in p["diagnoses"].as_array().unwrap() {
            assert!(allowed.contains(&c["code"].as_str().unwrap()), "{p}");
        }
    }
}
