//! `merge_to_hf`: a LoRA adapter folded into its base and written in HF's layout reads back
//! (our loader) with the logits of the adapted model: HF bases of every family (Gemma's norm
//! convention included), and a GGUF base (SmolLM2, when the asset is installed) whose
//! tokenizer is written as tokenizer.json.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::loader::load_hf_dir;
use medcoder_models::{load_model, CausalLm, LoadedModel};
use medcoder_train::merge::merge_to_hf;
use medcoder_train::trainable::make_trainable;
use medcoder_train::TrainConfig;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/tiny")
        .join(family)
}

fn config() -> TrainConfig {
    TrainConfig::from_yaml(
        "model: tiny\ndb: x\ndataset: x\noutput_dir: x\nlora: {r: 4, alpha: 8}\n",
        &[],
        "test",
    )
    .unwrap()
}

/// An adapter with random B for `lm` (made trainable in place), saved into `dir`.
fn random_adapter(lm: &mut CausalLm, dir: &Path) {
    let trainable = make_trainable(lm, &config(), false).unwrap();
    for (name, var) in &trainable.vars {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    trainable.save(dir).unwrap();
}

fn logits(lm: &CausalLm, ids: &[u32]) -> Vec<f32> {
    let ids = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let options = medcoder_models::ForwardOptions {
        last_only: true,
        ..Default::default()
    };
    lm.forward(&ids, None, &options)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn loaded(dir: &Path) -> LoadedModel {
    let (lm, family, stop_token_ids) = load_hf_dir(dir, &Device::Cpu, DType::F32).unwrap();
    let tokenizer_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        tokenizer_dir.path().join("tokenizer.json"),
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"<unk>":1},"unk_token":"<unk>"}}"#,
    )
    .unwrap();
    LoadedModel {
        lm,
        family,
        tokenizer: medcoder_models::ModelTokenizer::from_dir(tokenizer_dir.path()).unwrap(),
        stop_token_ids,
        source: dir.to_path_buf(),
        quantized: false,
    }
}

#[test]
fn merged_hf_models_read_back_with_the_adapted_logits() {
    let ids = [1u32, 17, 42, 99, 5, 63, 7];
    for family in ["llama", "qwen2", "qwen3", "gemma3"] {
        let mut adapted = load_hf_dir(&fixture(family), &Device::Cpu, DType::F32)
            .unwrap()
            .0;
        let adapter = tempfile::tempdir().unwrap();
        random_adapter(&mut adapted, adapter.path());
        let expected = logits(&adapted, &ids);
        let out = tempfile::tempdir().unwrap();
        let merged_dir = out.path().join("merged");
        let report = merge_to_hf(
            loaded(&fixture(family)),
            adapter.path(),
            &merged_dir,
            DType::F32,
        )
        .unwrap();
        assert_eq!(report.modules_merged, 14, "{family}");
        assert!(
            merged_dir.join("config.json").is_file()
                && merged_dir.join("merge_config.json").is_file()
        );
        let merged = load_hf_dir(&merged_dir, &Device::Cpu, DType::F32)
            .unwrap()
            .0;
        let diff = max_abs_diff(&logits(&merged, &ids), &expected);
        assert!(diff < 1e-4, "{family}: merged logits differ by {diff}");
        // A second merge into the same folder replaces it whole.
        merge_to_hf(
            loaded(&fixture(family)),
            adapter.path(),
            &merged_dir,
            DType::BF16,
        )
        .unwrap();
        let merged = load_hf_dir(&merged_dir, &Device::Cpu, DType::F32)
            .unwrap()
            .0;
        let diff = max_abs_diff(&logits(&merged, &ids), &expected);
        assert!(diff < 0.1, "{family}: bf16 merged logits differ by {diff}");
    }
}

#[test]
fn a_gguf_base_merges_into_an_hf_folder_with_its_tokenizer() {
    let Ok(home) = MedcoderHome::from_env() else {
        return;
    };
    let reference: ModelRef = "smollm2-135m-instruct".parse().unwrap();
    let Ok(resolved) = reference.resolve(&home) else {
        eprintln!("skipping: smollm2-135m-instruct is not installed (medcoder assets fetch)");
        return;
    };
    let mut adapted = load_model(&resolved, &Device::Cpu, None).unwrap();
    adapted.lm.dequantize().unwrap();
    let adapter = tempfile::tempdir().unwrap();
    random_adapter(&mut adapted.lm, adapter.path());
    let prompt = "The patient was admitted with chest pain and";
    let ids = adapted.tokenizer.tokenize(prompt, true, true).unwrap();
    let expected = logits(&adapted.lm, &ids);
    let out = tempfile::tempdir().unwrap();
    let merged_dir = out.path().join("merged");
    let base = load_model(&resolved, &Device::Cpu, None).unwrap();
    merge_to_hf(base, adapter.path(), &merged_dir, DType::F32).unwrap();
    let merged_ref: ModelRef = merged_dir.display().to_string().parse().unwrap();
    let merged = load_model(&merged_ref.resolve(&home).unwrap(), &Device::Cpu, None).unwrap();
    assert_eq!(merged.tokenizer.tokenize(prompt, true, true).unwrap(), ids);
    assert!(merged.tokenizer.chat_template.is_some());
    let diff = max_abs_diff(&logits(&merged.lm, &ids), &expected);
    assert!(diff < 1e-3, "merged SmolLM2 logits differ by {diff}");
}

#[test]
fn an_adapter_for_another_base_is_refused_with_the_layer_named() {
    let mut llama = load_hf_dir(&fixture("llama"), &Device::Cpu, DType::F32)
        .unwrap()
        .0;
    let adapter = tempfile::tempdir().unwrap();
    random_adapter(&mut llama, adapter.path());
    let mut gemma = load_hf_dir(&fixture("gemma3"), &Device::Cpu, DType::F32)
        .unwrap()
        .0;
    let err = medcoder_models::lora::apply_peft_adapter(&mut gemma, adapter.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not fit") && err.contains("q_proj"),
        "{err}"
    );
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}
