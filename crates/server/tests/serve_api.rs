//! The server on loopback: every route, every refusal (400, 401, 413, 415, 422, 429, 503,
//! 504), many concurrent notes answered without crossing, and a graceful shutdown that lets the
//! request in flight finish.

#![allow(clippy::unwrap_used)]

#[path = "../../coding/tests/support/pdf_fixture.rs"]
mod pdf_fixture;
mod support;

use std::time::Duration;

use medcoder_server::hash_api_key;
use serde_json::{json, Value};
use support::{corpus, get, get_with, post, post_multipart, post_with, TestServer, THEMES};

fn codes(prediction: &Value, kind: &str) -> Vec<String> {
    prediction[kind]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn routes_answer_and_bad_requests_are_refused_naming_the_problem() {
    let corpus = corpus();
    let mut config = corpus.config();
    config.limits.max_note_chars = 2_000;
    config.limits.max_body_bytes = 16 * 1024;
    config.limits.max_batch_notes = 4;
    let server = TestServer::start(config, corpus.home.root(), true);
    let url = |p: &str| server.url(p);

    assert_eq!(
        get(&url("/health"), None),
        (200, r#"{"status":"ok"}"#.into())
    );
    assert_eq!(get(&url("/ready"), None).0, 200);
    let (status, info) = get(&url("/v1/model"), None);
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["engine"], "retrieval");
    assert!(
        info["model"]
            .as_str()
            .unwrap()
            .contains("codiesp train (18 notes)"),
        "{info}"
    );

    // One note per theme: its own code ranks first.
    for (i, (text, code)) in THEMES.iter().enumerate() {
        let a = post(
            &url("/v1/code"),
            &json!({"id": format!("n{i}"), "text": text}),
        );
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(a.request_id.is_some());
        let p = a.json();
        assert_eq!(p["id"], format!("n{i}"));
        assert_eq!(codes(&p, "diagnoses")[0], *code, "{p}");
        assert_eq!(p["engine"], "retrieval");
    }
    // Options: the head of the ranking, assigned codes only.
    let a = post(
        &url("/v1/code"),
        &json!({"text": THEMES[1].0, "options": {"top": 1, "assigned_only": true}}),
    );
    let p = a.json();
    assert_eq!(p["id"], "note");
    assert_eq!(codes(&p, "diagnoses").len(), 1);
    assert!(p["procedures"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["assigned"] == true));

    // Refusals, each naming what is wrong.
    let a = post_with(
        &url("/v1/code"),
        "{\"text\": ",
        Some("application/json"),
        &[],
    );
    assert_eq!(
        (a.status, a.json()["error"]["code"].clone()),
        (400, json!("invalid_json"))
    );
    let a = post_with(
        &url("/v1/code"),
        "{\"txt\": \"x\"}",
        Some("application/json"),
        &[],
    );
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("txt"), "{}", a.body);
    let a = post_with(
        &url("/v1/code"),
        "{\"id\": \"x\"}",
        Some("application/json"),
        &[],
    );
    assert_eq!(a.status, 422);
    assert!(
        a.error_message().contains("missing field `text`"),
        "{}",
        a.body
    );
    let a = post_with(
        &url("/v1/code"),
        "{\"text\": \"fever\"}",
        Some("text/plain"),
        &[],
    );
    assert_eq!(a.status, 415, "{}", a.body);
    let a = post(&url("/v1/code"), &json!({"text": "   "}));
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("empty"), "{}", a.body);
    let long = "fever and cough. ".repeat(200);
    let a = post(&url("/v1/code"), &json!({"text": long}));
    assert_eq!(a.status, 422);
    assert!(
        a.error_message()
            .contains("3400 characters; the limit is 2000"),
        "{}",
        a.body
    );
    let huge = "x".repeat(20 * 1024);
    let a = post(&url("/v1/code"), &json!({"text": huge}));
    assert_eq!(a.status, 413, "{}", a.body);
    let a = post(&url("/v1/code?format=xml"), &json!({"text": "fever"}));
    assert_eq!(a.status, 422);
    assert_eq!(get(&url("/v1/nothing"), None).0, 404);

    // FHIR: a Bundle whose Conditions carry the ICD-10-CM codes.
    let a = post(
        &url("/v1/code?format=fhir"),
        &json!({"id": "f1", "text": THEMES[1].0}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a
        .content_type
        .as_deref()
        .unwrap()
        .starts_with("application/fhir+json"));
    let bundle = a.json();
    assert_eq!(bundle["resourceType"], "Bundle");
    let coding = &bundle["entry"][0]["resource"]["code"]["coding"][0];
    assert_eq!(coding["system"], "http://hl7.org/fhir/sid/icd-10-cm");
    assert_eq!(coding["code"], THEMES[1].1);

    // A PDF upload is coded from its text layer; a scan is refused saying why.
    let page = "BT /F1 12 Tf 72 720 Td (Type 2 diabetes mellitus with poor glycemic) Tj 0 -14 Td (control and polyuria.) Tj ET";
    let pdf = pdf_fixture::pdf(&[page], pdf_fixture::Protection::None);
    let a = post_multipart(
        &url("/v1/code/pdf"),
        &[("id", None, b"d17"), ("file", Some("d17.pdf"), &pdf)],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["id"], "d17");
    assert_eq!(codes(&a.json(), "diagnoses")[0], THEMES[0].1);
    let scan = pdf_fixture::pdf(&["0 0 612 792 re f"], pdf_fixture::Protection::None);
    let a = post_multipart(&url("/v1/code/pdf"), &[("file", Some("scan.pdf"), &scan)]);
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("no text layer"), "{}", a.body);
    let a = post_multipart(&url("/v1/code/pdf"), &[("id", None, b"x")]);
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("`file`"), "{}", a.body);
    let a = post(&url("/v1/code/pdf"), &json!({"text": "x"}));
    assert_eq!(a.status, 415, "{}", a.body);

    // A batch: results in order, ids given or numbered; a blank note refuses it, naming it.
    let a = post(
        &url("/v1/code/batch"),
        &json!([{"id": "a", "text": THEMES[0].0}, {"text": THEMES[2].0}]),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let results = a.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 2);
    assert_eq!(
        codes(&results[0]["prediction"], "diagnoses")[0],
        THEMES[0].1
    );
    assert_eq!(results[1]["id"], "note-2");
    assert_eq!(
        codes(&results[1]["prediction"], "diagnoses")[0],
        THEMES[2].1
    );
    let a = post(
        &url("/v1/code/batch"),
        &json!([{"id": "a", "text": THEMES[0].0}, {"id": "b", "text": " "}]),
    );
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(
        a.error_message().contains("[1]: note b: text is empty"),
        "{}",
        a.body
    );
    // Counts may be written as whole floats (JSON Schema's integers); fractions are refused.
    let a = post(
        &url("/v1/code"),
        &json!({"text": THEMES[0].0, "options": {"top": 2.0}}),
    );
    assert_eq!(codes(&a.json(), "diagnoses").len(), 2);
    let a = post(
        &url("/v1/code"),
        &json!({"text": THEMES[0].0, "options": {"top": 2.5}}),
    );
    assert_eq!(a.status, 422);
    assert!(a.error_message().contains("whole number"), "{}", a.body);
    let five: Vec<Value> = (0..5).map(|_| json!({"text": "fever"})).collect();
    let a = post(&url("/v1/code/batch"), &json!(five));
    assert_eq!(a.status, 422);
    assert!(
        a.error_message().contains("1 to 4 notes; this one has 5"),
        "{}",
        a.body
    );

    // No generation model configured: the chat route says so.
    let a = post(
        &url("/v1/chat/completions"),
        &json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(a.status, 404);
    assert!(a.error_message().contains("generation.model"), "{}", a.body);
    assert_eq!(
        get(&url("/v1/models"), None),
        (200, r#"{"object":"list","data":[]}"#.into())
    );

    // Metrics count what happened; the OpenAPI document lists the routes.
    let metrics = get_with(&url("/metrics"), &[]);
    assert!(metrics.content_type.unwrap().starts_with("text/plain"));
    for line in [
        "medcoder_http_requests_total{route=\"/v1/code\",status=\"200\"} 6",
        "medcoder_http_requests_total{route=\"/v1/code\",status=\"413\"} 1",
        "medcoder_http_request_duration_seconds_count{route=\"/v1/code/batch\"} 3",
        "medcoder_notes_coded_total 9",
        "medcoder_model_load_seconds{what=\"coding\"}",
    ] {
        assert!(
            metrics.body.contains(line),
            "{line} not in\n{}",
            metrics.body
        );
    }
    let (status, doc) = get(&url("/openapi.json"), None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for path in [
        "/v1/code",
        "/v1/code/batch",
        "/v1/chat/completions",
        "/v1/models",
        "/ready",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["NotePrediction"].is_object());
}

#[test]
fn keys_rate_limits_cors_queue_and_timeouts() {
    let corpus = corpus();
    let mut config = corpus.config();
    config.auth.api_key_sha256 = vec![hash_api_key("k-one"), hash_api_key("k-two")];
    config.auth.rate_limit_per_minute = 3;
    config.cors_origins = vec!["https://coder.example".into()];
    config.limits.queue_capacity = 2;
    let server = TestServer::start(config, corpus.home.root(), true);
    let url = |p: &str| server.url(p);
    let note = json!({"text": THEMES[0].0}).to_string();
    let code = |key: Option<&str>| {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        post_with(&url("/v1/code"), &note, Some("application/json"), &headers)
    };
    // Liveness and readiness stay open; the rest needs a key.
    assert_eq!(get(&url("/health"), None).0, 200);
    let a = code(None);
    assert_eq!(a.status, 401);
    assert!(
        a.error_message().contains("Authorization: Bearer"),
        "{}",
        a.body
    );
    assert_eq!(code(Some("wrong")).status, 401);
    assert_eq!(get(&url("/v1/model"), None).0, 401);
    // Three requests a minute per key; the fourth waits, and says how long.
    for _ in 0..3 {
        assert_eq!(code(Some("k-one")).status, 200);
    }
    let a = code(Some("k-one"));
    assert_eq!(a.status, 429, "{}", a.body);
    let wait: u64 = a.retry_after.unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    // Another key has its own budget.
    let a = code(Some("k-two"));
    assert_eq!(a.status, 200);
    assert_eq!(a.cors, None, "no Origin, no CORS header");
    // A batch larger than the queue is refused whole, with Retry-After.
    let three: Vec<Value> = (0..3).map(|_| json!({"text": "fever"})).collect();
    let a = post_with(
        &url("/v1/code/batch"),
        &json!(three).to_string(),
        Some("application/json"),
        &[("authorization", "Bearer k-two")],
    );
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    // An allowed origin gets its CORS header; another does not.
    let a = get_with(&url("/health"), &[("origin", "https://coder.example")]);
    assert_eq!(a.cors.as_deref(), Some("https://coder.example"));
    let a = get_with(&url("/health"), &[("origin", "https://evil.example")]);
    assert_eq!(a.cors, None);

    // A request timeout far shorter than coding one note of a batch on one worker: 504. (The
    // timeout is per answer awaited, so one note must take longer than it: ~700k characters,
    // tens of milliseconds, against 5 ms.)
    let mut config = corpus.config();
    config.limits.request_timeout_s = 0.005;
    config.limits.workers = 1;
    config.limits.max_note_chars = 1_000_000;
    config.limits.max_body_bytes = 16 << 20;
    let fast = TestServer::start(config, corpus.home.root(), true);
    let notes: Vec<Value> = (0..4)
        .map(|i| json!({"text": format!("{} ", THEMES[i % 3].0).repeat(8000)}))
        .collect();
    let a = post(&fast.url("/v1/code/batch"), &json!(notes));
    assert_eq!(a.status, 504, "{}", &a.body[..a.body.len().min(500)]);
    assert!(
        a.error_message().contains("request timeout (0.005 s)"),
        "{}",
        a.body
    );
}

#[test]
fn concurrent_notes_are_answered_without_crossing_and_readiness_waits_for_the_engine() {
    let corpus = corpus();
    let server = TestServer::start(corpus.config(), corpus.home.root(), false);
    // Loading is in the background: /ready is 503 with Retry-After until it is done (or 200
    // already, on a fast machine).
    let ready = get_with(&server.url("/ready"), &[]);
    if ready.status != 200 {
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert!(ready.retry_after.is_some());
    }
    server.wait_ready();
    let url = server.url("/v1/code");
    let threads: Vec<_> = (0..48)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let (text, code) = THEMES[i % 3];
                let a = post(
                    &url,
                    &json!({"id": format!("c{i}"), "text": format!("Case {i}. {text}")}),
                );
                assert_eq!(a.status, 200, "{}", a.body);
                let p = a.json();
                assert_eq!(p["id"], format!("c{i}"));
                assert_eq!(codes(&p, "diagnoses")[0], code);
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn shutdown_lets_the_request_in_flight_finish_then_refuses_connections() {
    let corpus = corpus();
    let mut config = corpus.config();
    config.limits.workers = 1;
    config.limits.max_batch_notes = 64;
    let mut server = TestServer::start(config, corpus.home.root(), true);
    let url = server.url("/v1/code/batch");
    let notes: Vec<Value> = (0..64)
        .map(|i| json!({"text": format!("{} ", THEMES[i % 3].0).repeat(40)}))
        .collect();
    let in_flight = std::thread::spawn(move || post(&url, &json!(notes)));
    std::thread::sleep(Duration::from_millis(100));
    server.stop();
    let a = in_flight.join().unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["results"].as_array().unwrap().len(), 64);
    assert!(std::net::TcpStream::connect(server.address).is_err());
}

/// Schemathesis (PyPI) against /openapi.json: every operation, every check, 0 failures. Runs
/// when `schemathesis` is installed (`pip install schemathesis`), skips saying so otherwise.
#[test]
fn schemathesis_finds_no_failure_against_the_openapi_document() {
    let installed = std::process::Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("skipping: schemathesis is not installed (pip install schemathesis)");
        return;
    }
    let corpus = corpus();
    let server = TestServer::start(corpus.config(), corpus.home.root(), true);
    let reports = corpus.dir.path().join("schemathesis");
    let output = std::process::Command::new("schemathesis")
        .args(["run", &server.url("/openapi.json"), "--checks", "all"])
        .args([
            "--max-examples",
            "50",
            "--generation-deterministic",
            "--report-dir",
        ])
        .arg(&reports)
        .current_dir(corpus.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}
