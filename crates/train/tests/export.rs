//! `export_gguf` (the test_export): a tiny random llama with a byte-level BPE tokenizer
//! and a ChatML template, a random LoRA adapter folded in, exported as f16, q8_0 and q4_k_m GGUF;
//! each file loads back in our own loader with the merged model's logits (within the
//! quantization's error), f16 with its greedy tokens, and every one with the same tokenizer and
//! chat template. A llama.cpp check runs when `llama_cpp` (llama-cpp-python) is installed.
#![allow(clippy::unwrap_used)]

#[path = "support/tiny_model.rs"]
mod tiny_model;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::gguf_export::ExportQuant;
use medcoder_models::{load_model, ChatMessage, LoadedModel};
use medcoder_train::export::export_gguf;
use medcoder_train::merge::merge_to_hf;
use medcoder_train::trainable::make_trainable;
use medcoder_train::TrainConfig;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEXTS: [&str; 4] = [
    "Predict the medical codes for the following text: type 2 diabetes mellitus without complications, essential hypertension.",
    "Patient admitted with chest pain; troponin negative. Codes: E11.9, I10, R07.9",
    "<|im_start|>user\nCode this note<|im_end|>\n<|im_start|>assistant\nE11.9",
    "Ünïcödé and digits 12345 survive a round trip.",
];

/// A byte-level BPE tokenizer (as SmolLM2's and GPT-2's) trained on `TEXTS`, with ChatML's
/// special tokens, and tokenizer_config.json with the ChatML template.
fn write_bpe_tokenizer(dir: &Path) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(400)
        .min_frequency(1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let corpus: Vec<String> = TEXTS.iter().map(|t| t.to_string()).collect();
    tokenizer.train(&mut trainer, corpus.into_iter()).unwrap();
    tokenizer.save(dir.join("tokenizer.json"), true).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": CHATML,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    tokenizer.get_vocab_size(true)
}

fn load(path: &Path, home: &MedcoderHome) -> LoadedModel {
    let reference: ModelRef = path.display().to_string().parse().unwrap();
    load_model(
        &reference.resolve(home).unwrap(),
        &Device::Cpu,
        Some(DType::F32),
    )
    .unwrap()
}

/// A LoRA adapter with random B over every linear layer of `base`, saved into `dir`.
fn random_adapter(base: &Path, home: &MedcoderHome, dir: &Path) {
    let mut model = load(base, home);
    let config = TrainConfig::from_yaml(
        "model: tiny\ndb: x\ndataset: x\noutput_dir: x\nlora: {r: 4, alpha: 8, target_modules: [all-linear]}\n",
        &[],
        "test",
    )
    .unwrap();
    let trainable = make_trainable(&mut model.lm, &config, false).unwrap();
    // Deterministic (a sine of the index) rather than randn: the test must not depend on a
    // draw, as greedy tokens of a random tiny model can sit near a tie.
    for (k, (name, var)) in trainable.vars.iter().enumerate() {
        if name.contains("lora_B") {
            let n = var.shape().elem_count();
            let values: Vec<f32> = (0..n)
                .map(|i| 0.2 * ((i * 7 + k * 13) as f32 * 0.37).sin())
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    trainable.save(dir).unwrap();
}

fn last_logits(model: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.lm.new_cache();
    model
        .lm
        .next_token_logits(ids, &mut cache)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn greedy(model: &LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let logits = last_logits(model, &ids);
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        ids.push(best as u32);
    }
    ids[prompt.len()..].to_vec()
}

struct Setup {
    dir: tempfile::TempDir,
    home: MedcoderHome,
    merged: LoadedModel,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = MedcoderHome::at(dir.path().join("home"));
        let vocab = write_bpe_tokenizer(&dir.path().join("base"));
        tiny_model::write_tiny_llama(&dir.path().join("base"), vocab, 11);
        random_adapter(&dir.path().join("base"), &home, &dir.path().join("adapter"));
        let base = load(&dir.path().join("base"), &home);
        merge_to_hf(
            base,
            &dir.path().join("adapter"),
            &dir.path().join("merged"),
            DType::F32,
        )
        .unwrap();
        let merged = load(&dir.path().join("merged"), &home);
        Self { dir, home, merged }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Export with the adapter as `quant` into its own folder (no tokenizer.json beside it,
    /// so the loader reads the GGUF's own tokenizer); returns the loaded export and its report.
    fn export(&self, quant: ExportQuant) -> (LoadedModel, medcoder_train::export::ExportReport) {
        let base = load(&self.path("base"), &self.home);
        let out = self.path(quant.as_str()).join("tiny.gguf");
        let report = export_gguf(base, Some(&self.path("adapter")), quant, &out).unwrap();
        (load(&out, &self.home), report)
    }
}

fn prompts(model: &LoadedModel) -> Vec<Vec<u32>> {
    TEXTS
        .iter()
        .map(|t| model.tokenizer.encode(t).unwrap())
        .collect()
}

/// The largest logit difference over the prompts, relative to the largest logit.
fn relative_logit_diff(a: &LoadedModel, b: &LoadedModel) -> (f32, f32) {
    let mut worst = (0f32, 0f32);
    for ids in prompts(a) {
        let (x, y) = (last_logits(a, &ids), last_logits(b, &ids));
        let diff = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        if diff / scale > worst.1 {
            worst = (diff, diff / scale);
        }
    }
    worst
}

fn assert_same_tokenizer(a: &LoadedModel, b: &LoadedModel) {
    for text in TEXTS {
        let (x, y) = (
            a.tokenizer.encode(text).unwrap(),
            b.tokenizer.encode(text).unwrap(),
        );
        assert_eq!(x, y, "ids of {text:?}");
        assert_eq!(
            a.tokenizer.decode(&x).unwrap(),
            b.tokenizer.decode(&y).unwrap()
        );
    }
    assert_eq!(a.tokenizer.eos_token, b.tokenizer.eos_token);
    assert_eq!(a.tokenizer.bos_token, b.tokenizer.bos_token);
    assert_eq!(a.tokenizer.add_bos_token, b.tokenizer.add_bos_token);
    let messages = [ChatMessage::new("user", "Code this note")];
    let render = |m: &LoadedModel| {
        let template = m.tokenizer.chat_template.as_ref().unwrap();
        assert_eq!(template.source(), CHATML);
        template
            .render(
                &messages,
                true,
                m.tokenizer.bos_token.as_deref(),
                m.tokenizer.eos_token.as_deref(),
            )
            .unwrap()
    };
    assert_eq!(render(a), render(b));
    assert_eq!(a.stop_token_ids, b.stop_token_ids);
}

#[test]
fn exported_gguf_files_load_back_with_the_merged_models_logits_tokenizer_and_template() {
    let setup = Setup::new();
    let merged = &setup.merged;
    for (quant, tolerance) in [
        (ExportQuant::F16, 1e-2),
        (ExportQuant::Q8_0, 8e-2),
        (ExportQuant::Q4KM, 0.3),
    ] {
        let (exported, report) = setup.export(quant);
        let (diff, relative) = relative_logit_diff(merged, &exported);
        println!(
            "{}: {} bytes (Modelfile {} bytes), logits max |diff| {diff:.5} ({:.3}% of the largest), {} fallbacks",
            quant.as_str(),
            report.bytes,
            report.modelfile_bytes,
            relative * 100.0,
            report.fallbacks.len(),
        );
        assert!(
            relative < tolerance,
            "{}: logits differ by {diff} ({relative} relative)",
            quant.as_str()
        );
        assert_eq!(report.modules_merged, 2 * 7);
        assert_same_tokenizer(merged, &exported);
        let modelfile = std::fs::read_to_string(&report.modelfile).unwrap();
        assert!(modelfile.starts_with("FROM ./tiny.gguf\n"), "{modelfile}");
        assert!(modelfile.contains("TEMPLATE \"\"\""), "{modelfile}");
        assert!(
            modelfile.contains("PARAMETER stop \"<|im_end|>\""),
            "{modelfile}"
        );
        match quant {
            ExportQuant::F16 => {
                assert!(report.fallbacks.is_empty());
                for ids in prompts(merged) {
                    assert_eq!(greedy(merged, &ids, 6), greedy(&exported, &ids, 6));
                }
            }
            ExportQuant::Q8_0 => assert!(report.fallbacks.is_empty()),
            // hidden 64 and intermediate 128: no row splits into Q4_K's 256-wide blocks, so
            // every matrix falls back (Q4_K → Q5_0, Q6_K → Q8_0), and says so.
            ExportQuant::Q4KM => {
                assert_eq!(report.fallbacks.len(), report.tensors - (2 * 2 + 1));
                assert!(report
                    .fallbacks
                    .iter()
                    .all(|t| t.written == "q5_0" || t.written == "q8_0"));
            }
        }
    }
}

#[test]
fn llama_cpp_reads_the_export_when_llama_cpp_python_is_installed() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: llama-cpp-python (`import llama_cpp`) is not installed");
        return;
    }
    let setup = Setup::new();
    let (exported, _) = setup.export(ExportQuant::F16);
    let out = setup.path("f16").join("tiny.gguf");
    let text = TEXTS[1];
    let ours = exported.tokenizer.encode(text).unwrap();
    let script = format!(
        "import json, llama_cpp\nm = llama_cpp.Llama(model_path={:?}, vocab_only=True, verbose=False)\nprint(json.dumps(m.tokenize({:?}.encode(), add_bos=False, special=True)))",
        out.display().to_string(),
        text
    );
    let run = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let theirs: Vec<u32> = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(ours, theirs);
}
