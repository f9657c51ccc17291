//! llama.cpp's side of the GGUF export checks: `scripts/llama_cpp_greedy.py` run by a Python
//! that has llama-cpp-python. Which Python: `$MEDCODER_LLAMA_PYTHON`, else the venv that
//! `scripts/install-llama-cpp` makes (`.venv-llama/` in the repository root), else `python3`.
//! Without one that can `import llama_cpp`, [`LlamaCpp::find`] says why, for the test to skip.
#![allow(dead_code)] // each test binary uses a subset

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

pub const PYTHON_ENV: &str = "MEDCODER_LLAMA_PYTHON";

/// The repository root (two folders above a crate's manifest).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Debug)]
pub struct LlamaCpp {
    pub python: PathBuf,
}

/// What llama.cpp did with one prompt.
#[derive(Debug, Deserialize)]
pub struct PromptResult {
    /// llama.cpp's tokenization of the prompt's text (no BOS, special tokens parsed).
    pub tokens: Vec<u32>,
    /// The greedy continuation of the prompt's ids.
    pub greedy: Vec<u32>,
    /// The logits after the prompt's ids.
    pub first_logits: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct Answer {
    pub llama_cpp: String,
    /// The file's metadata as llama.cpp read it (the tokenizer's lists left out).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub results: Vec<PromptResult>,
}

impl LlamaCpp {
    /// The Python to run llama.cpp with, or why there is none.
    pub fn find() -> Result<Self, String> {
        Self::find_with("llama_cpp, numpy", "llama-cpp-python")
    }

    /// A Python with gguf-py (llama.cpp's own GGUF reader, pure Python), or why there is none.
    pub fn find_gguf_py() -> Result<Self, String> {
        Self::find_with("gguf, numpy", "gguf (gguf-py)")
    }

    fn find_with(imports: &str, what: &str) -> Result<Self, String> {
        let venv = repo_root().join(".venv-llama/bin/python");
        let candidates: Vec<PathBuf> = match std::env::var_os(PYTHON_ENV) {
            Some(python) => vec![PathBuf::from(python)],
            None => vec![venv, PathBuf::from("python3")],
        };
        for python in &candidates {
            let probe = Command::new(python)
                .args(["-c", &format!("import {imports}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if probe.is_ok_and(|s| s.success()) {
                return Ok(Self {
                    python: python.clone(),
                });
            }
        }
        Err(format!(
            "{what} is not installed ({} cannot `import {imports}`); \
             scripts/install-llama-cpp installs it into .venv-llama, or set ${PYTHON_ENV}",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// llama.cpp's tokenization of each prompt's text, greedy continuation (`max_tokens`, not
    /// stopping at EOS) of its ids, and logits after its ids.
    pub fn run(&self, gguf: &Path, prompts: &[(String, Vec<u32>)], max_tokens: usize) -> Answer {
        let request = serde_json::json!({
            "prompts": prompts
                .iter()
                .map(|(text, ids)| serde_json::json!({"text": text, "ids": ids}))
                .collect::<Vec<_>>(),
            "max_tokens": max_tokens,
            "threads": 2,
        });
        let mut child = Command::new(&self.python)
            .arg(repo_root().join("scripts/llama_cpp_greedy.py"))
            .arg(gguf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start llama_cpp_greedy.py");
        child
            .stdin
            .take()
            .expect("its stdin")
            .write_all(request.to_string().as_bytes())
            .expect("write the request");
        let output = child
            .wait_with_output()
            .expect("wait for llama_cpp_greedy.py");
        assert!(
            output.status.success(),
            "llama.cpp could not run {}: {}",
            gguf.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("llama_cpp_greedy.py's JSON")
    }
}

impl LlamaCpp {
    /// `scripts/gguf_py_summary.py` on `gguf`: the file as gguf-py decodes it.
    pub fn gguf_py_summary(&self, gguf: &Path) -> serde_json::Value {
        let output = Command::new(&self.python)
            .arg(repo_root().join("scripts/gguf_py_summary.py"))
            .arg(gguf)
            .output()
            .expect("run gguf_py_summary.py");
        assert!(
            output.status.success(),
            "gguf-py could not read {}: {}",
            gguf.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("gguf_py_summary.py's JSON")
    }
}

/// How far two greedy continuations agree: the length of their common prefix.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The largest |a - b| and the largest |a|.
pub fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "logit vectors of different lengths");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    (diff, scale)
}
