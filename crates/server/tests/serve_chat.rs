//! The OpenAI-compatible endpoint on a tiny random llama the test writes (ChatML tokenizer, no
//! download): plain and streamed completions agree, seeds repeat, concurrent requests are
//! batched without crossing, and bad requests are refused naming the field.

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

/// A server with the tiny chat model as `tiny`, and the corpus it lives in.
fn tiny_chat_server() -> (support::Corpus, TestServer) {
    let corpus = corpus();
    let model_dir = corpus.dir.path().join("tiny");
    let texts: Vec<String> = WORDS.split(' ').map(str::to_string).collect();
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
        max_tokens_limit: 64,
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
    let a = post(&url, &json!({"model": "tiny"}));
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("messages"), "{}", a.body);
    let a = post(&url, &chat("tiny", "hi", json!({"temperature": 3})));
    assert_eq!(a.status, 422);
}

/// The official `openai` Python client streams a completion and lists the models. Runs when
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
import sys, openai
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
print("streamed", len(pieces), "pieces;", finish)
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
    config.engine.openai.max_tokens = Some(24);
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
    // The JSON-schema request was refused (400), the plain-text retry answered (200).
    assert!(
        metrics.contains("route=\"/v1/chat/completions\",status=\"400\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("route=\"/v1/chat/completions\",status=\"200\"} 1"),
        "{metrics}"
    );
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
