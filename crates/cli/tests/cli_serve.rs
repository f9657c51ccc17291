//! `medcoder serve` as a process: configured from a `serve.yaml` with a relative database path,
//! port chosen by the OS, a note coded over HTTP with an API key, SIGTERM ends it cleanly, and
//! its log — even at debug level — carries request ids and routes but never the note's text.

#![allow(clippy::unwrap_used)]

#[path = "../../server/tests/support/mod.rs"]
mod server_support;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use medcoder_assets::MedcoderHome;
use serde_json::json;
use server_support::{corpus, get, post_with, THEMES};

#[test]
fn serve_codes_over_http_stops_on_sigterm_and_never_logs_note_text() {
    let corpus = corpus();
    let key = support::medcoder(corpus.home.root(), &["serve", "--hash-key", "s3cret"], None);
    assert_eq!(key.code, Some(0), "{}", key.stderr);
    let hash = key.stdout.trim().to_string();
    assert_eq!(hash.len(), 64);
    let yaml = format!(
        "host: 127.0.0.1\nport: 0\nengine:\n  engine: retrieval\n  db: c.duckdb\n  dataset: codiesp\nauth:\n  api_key_sha256: [{hash}]\n"
    );
    let config = corpus.dir.path().join("serve.yaml");
    std::fs::write(&config, yaml).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_medcoder"))
        .args(["-vv", "serve", "--config", config.to_str().unwrap()])
        .env(MedcoderHome::ENV, corpus.home.root())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let address = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "serve ended:\n{log}"
        );
        log += &line;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(
        log.contains("<1 key hashes>") && !log.contains(&hash),
        "{log}"
    );
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in stderr.lines() {
            rest += &line.unwrap();
            rest.push('\n');
        }
        rest
    });
    let url = |p: &str| format!("http://{address}{p}");
    let started = std::time::Instant::now();
    while get(&url("/ready"), None).0 != 200 {
        assert!(started.elapsed().as_secs() < 120, "not ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let marker = "Zebrafinch-Quokka";
    let note = json!({"id": "n1", "text": format!("{marker} reports {}", THEMES[1].0)}).to_string();
    let unauthorized = post_with(&url("/v1/code"), &note, Some("application/json"), &[]);
    assert_eq!(unauthorized.status, 401);
    let a = post_with(
        &url("/v1/code"),
        &note,
        Some("application/json"),
        &[
            ("authorization", "Bearer s3cret"),
            ("x-request-id", "req-42"),
        ],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.request_id.as_deref(), Some("req-42"));
    assert_eq!(a.json()["diagnoses"][0]["code"], THEMES[1].1);
    // A refusal echoing nothing of the note.
    let bad = json!({"text": format!("{marker} "), "options": {"top": "x"}}).to_string();
    let a = post_with(
        &url("/v1/code"),
        &bad,
        Some("application/json"),
        &[("authorization", "Bearer s3cret")],
    );
    assert_eq!(a.status, 422);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    log += &rest.join().unwrap();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(
        log.contains("request_id") && log.contains("req-42"),
        "{log}"
    );
    assert!(
        log.contains("/v1/code") && log.contains("draining"),
        "{log}"
    );
    assert!(
        !log.contains(marker),
        "the note's text reached the log:\n{log}"
    );
}

#[test]
fn serve_refuses_a_bad_config_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("serve.yaml");
    std::fs::write(&config, "port: 8080\nlimits:\n  queue_capacty: 3\n").unwrap();
    let run = support::medcoder(
        tmp.path(),
        &["serve", "--config", config.to_str().unwrap()],
        None,
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("queue_capacty") && run.stderr.contains("serve.yaml"),
        "{}",
        run.stderr
    );
    std::fs::write(&config, "port: 8080\n").unwrap();
    let run = support::medcoder(
        tmp.path(),
        &["serve", "--config", config.to_str().unwrap()],
        None,
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("--db FILE --dataset NAME"),
        "{}",
        run.stderr
    );
}
