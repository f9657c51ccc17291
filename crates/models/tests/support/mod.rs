//! What the models tests (and the generation tests of `infer`) share: the tiny transformers
//! fixtures with their reference logits, and the real small models of the assets.
#![allow(dead_code)] // each test binary uses a subset of these helpers
#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

use std::path::{Path, PathBuf};

use candle_core::Device;
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::{load_model, LoadedModel};
use serde::Deserialize;

/// transformers' logits for a tiny checkpoint (`reference.json`).
#[derive(Deserialize)]
pub struct Reference {
    pub inputs: Vec<Input>,
}

#[derive(Deserialize)]
pub struct Input {
    pub input_ids: Vec<u32>,
    /// Logits of the last position, whole vocabulary.
    pub last_logits: Vec<f32>,
    /// Logits of the first 8 vocabulary entries at every position.
    pub first8_logits: Vec<Vec<f32>>,
}

/// The folder of the tiny checkpoint of `family` (`tests/fixtures/tiny/<family>`).
pub fn tiny_fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/tiny")
        .join(family)
}

pub fn tiny_reference(family: &str) -> Reference {
    let text = std::fs::read_to_string(tiny_fixture(family).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The largest absolute difference between two logit vectors of the same length.
pub fn max_abs_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// An asset model loaded on the CPU, or `None` (saying why) when it is not installed.
pub fn installed_model(alias: &str) -> Option<LoadedModel> {
    let home = MedcoderHome::from_env().ok()?;
    let reference: ModelRef = alias.parse().ok()?;
    match reference.resolve(&home) {
        Ok(resolved) => Some(load_model(&resolved, &Device::Cpu, None).unwrap()),
        Err(e) => {
            eprintln!(
                "skipping: {alias} is not installed ({e}); run `medcoder assets fetch {alias}`"
            );
            None
        }
    }
}
