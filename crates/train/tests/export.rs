//! `export_gguf` (the test_export): a tiny random llama with a byte-level BPE tokenizer
//! and a ChatML template, a random LoRA adapter folded in, exported as f16, q8_0 and q4_k_m GGUF;
//! each file loads back in our own loader with the merged model's logits (within the
//! quantization's error), f16 with its greedy tokens, and every one with the same tokenizer and
//! chat template. A model wide enough for Q4_K's 256-wide blocks checks the real Q4_K_M mix.
//! The llama.cpp checks run when llama-cpp-python is installed (`scripts/install-llama-cpp`):
//! each export loads in llama.cpp with our tokenizer's ids and our loader's greedy tokens.
//! `MEDCODER_EXPORT_CHECK_GGUF=FILE` runs the same comparison on any GGUF file (a real export).
#![allow(clippy::unwrap_used)]

#[path = "support/bpe_tokenizer.rs"]
mod bpe_tokenizer;
#[path = "support/llama_cpp.rs"]
mod llama_cpp;
#[path = "support/tiny_model.rs"]
mod tiny_model;

use std::path::{Path, PathBuf};

use bpe_tokenizer::{write_chatml_bpe_tokenizer, CHATML};
use candle_core::{DType, Device, Tensor};
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::gguf_export::ExportQuant;
use medcoder_models::{load_model, ChatMessage, LoadedModel};
use medcoder_train::export::export_gguf;
use medcoder_train::merge::merge_to_hf;
use medcoder_train::trainable::make_trainable;
use medcoder_train::TrainConfig;
use tiny_model::TinyShape;

const TEXTS: [&str; 4] = [
    "Predict the medical codes for the following text: type 2 diabetes mellitus without complications, essential hypertension.",
    "Patient admitted with chest pain; troponin negative. Codes: E11.9, I10, R07.9",
    "<|im_start|>user\nCode this note<|im_end|>\n<|im_start|>assistant\nE11.9",
    "Ünïcödé and digits 12345 survive a round trip.",
];

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
        Self::shaped(TinyShape::SMALL)
    }

    fn shaped(shape: TinyShape) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = MedcoderHome::at(dir.path().join("home"));
        let vocab = write_chatml_bpe_tokenizer(&dir.path().join("base"), &TEXTS);
        tiny_model::write_tiny_llama_shaped(&dir.path().join("base"), vocab, 11, shape);
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

/// A model whose rows (256 and 512 wide) fill Q4_K's 256-wide blocks.
const WIDE: TinyShape = TinyShape {
    hidden: 256,
    intermediate: 512,
    layers: 2,
    heads: 4,
    kv_heads: 2,
};

#[test]
fn q4_k_m_of_a_model_wide_enough_writes_real_q4_k_and_q6_k_blocks_in_llama_cpps_mix() {
    let setup = Setup::shaped(WIDE);
    let (exported, report) = setup.export(ExportQuant::Q4KM);
    let (diff, relative) = relative_logit_diff(&setup.merged, &exported);
    println!(
        "q4_k_m (hidden 256): {} bytes, logits max |diff| {diff:.5} ({:.3}% of the largest)",
        report.bytes,
        relative * 100.0
    );
    assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
    assert!(
        relative < 0.3,
        "logits differ by {diff} ({relative} relative)"
    );
    // The types as written in the file, read back by name.
    let out = setup.path("q4_k_m").join("tiny.gguf");
    let mut file = std::fs::File::open(&out).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let dtype = |name: &str| format!("{:?}", content.tensor_infos[name].ggml_dtype);
    // 2 layers: llama.cpp's use_more_bits picks layer 1 (the last eighth) for attn_v and
    // ffn_down; the output head is Q6_K; every other matrix Q4_K; norms stay f32.
    assert_eq!(dtype("output.weight"), "Q6K");
    assert_eq!(dtype("token_embd.weight"), "Q4K");
    assert_eq!(dtype("blk.1.attn_v.weight"), "Q6K");
    assert_eq!(dtype("blk.1.ffn_down.weight"), "Q6K");
    assert_eq!(dtype("blk.0.attn_v.weight"), "Q4K");
    assert_eq!(dtype("blk.0.ffn_down.weight"), "Q4K");
    for name in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
        assert_eq!(dtype(&format!("blk.0.{name}.weight")), "Q4K", "{name}");
        assert_eq!(dtype(&format!("blk.1.{name}.weight")), "Q4K", "{name}");
    }
    assert_eq!(dtype("blk.0.attn_norm.weight"), "F32");
    assert_eq!(
        content.metadata["general.file_type"].to_u32().unwrap(),
        15,
        "LLAMA_FTYPE_MOSTLY_Q4_K_M"
    );
}

/// gguf-py (llama.cpp's reader, with numpy ports of ggml's block formats) reads `gguf` as our
/// loader does: version 3, every tensor 32-byte aligned, the same types and shapes, and the
/// same values out of every quantized block.
fn assert_gguf_py_reads_as_we_do(python: &llama_cpp::LlamaCpp, gguf: &Path, what: &str) {
    let summary = python.gguf_py_summary(gguf);
    assert_eq!(summary["version"], 3, "{what}");
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let theirs = summary["tensors"].as_object().unwrap();
    assert_eq!(theirs.len(), content.tensor_infos.len(), "{what}");
    for (name, info) in &content.tensor_infos {
        let t = &theirs[name.as_str()];
        assert_eq!(t["aligned"], true, "{what}: {name}");
        let ours_type = format!("{:?}", info.ggml_dtype).replace('_', "");
        let their_type = t["type"].as_str().unwrap().replace('_', "");
        assert_eq!(ours_type.to_uppercase(), their_type, "{what}: {name}");
        assert_eq!(
            t["shape"].as_array().unwrap().len(),
            info.shape.rank(),
            "{what}: {name}"
        );
        for (d, dim) in info.shape.dims().iter().enumerate() {
            assert_eq!(t["shape"][d], *dim, "{what}: {name}");
        }
        let values: Vec<f32> = content
            .tensor(&mut file, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let sum_sq: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-5 * scale.max(1e-6);
        let norm = sum_sq.sqrt() * (values.len() as f64).sqrt();
        assert!(
            close(sum, t["sum"].as_f64().unwrap(), norm),
            "{what}: {name} sum"
        );
        assert!(
            close(sum_sq, t["sum_sq"].as_f64().unwrap(), sum_sq),
            "{what}: {name} sum of squares"
        );
        for (i, v) in t["first"].as_array().unwrap().iter().enumerate() {
            let v = v.as_f64().unwrap();
            assert!(
                close(f64::from(values[i]), v, v.abs()),
                "{what}: {name}[{i}]"
            );
        }
    }
}

#[test]
fn gguf_py_decodes_every_export_as_our_loader_does_when_gguf_py_is_installed() {
    let python = match llama_cpp::LlamaCpp::find_gguf_py() {
        Ok(python) => python,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let setup = Setup::new();
    for quant in [ExportQuant::F16, ExportQuant::Q8_0, ExportQuant::Q4KM] {
        setup.export(quant);
        let out = setup.path(quant.as_str()).join("tiny.gguf");
        assert_gguf_py_reads_as_we_do(&python, &out, quant.as_str());
    }
    let wide = Setup::shaped(WIDE);
    wide.export(ExportQuant::Q4KM);
    let out = wide.path("q4_k_m").join("tiny.gguf");
    assert_gguf_py_reads_as_we_do(&python, &out, "q4_k_m (hidden 256)");
}

/// The comparison with llama.cpp of one exported file: llama.cpp tokenizes the texts as our
/// tokenizer does, and continues our ids with our loader's greedy tokens.
fn assert_llama_cpp_agrees(
    llama: &llama_cpp::LlamaCpp,
    gguf: &Path,
    ours: &LoadedModel,
    what: &str,
    logit_tolerance: f32,
) {
    let prompts: Vec<(String, Vec<u32>)> = TEXTS
        .iter()
        .map(|t| (t.to_string(), ours.tokenizer.encode(t).unwrap()))
        .collect();
    let steps = 8;
    let answer = llama.run(gguf, &prompts, steps);
    assert_eq!(answer.metadata["general.architecture"], "llama", "{what}");
    let mut agreed = 0;
    for ((text, ids), theirs) in prompts.iter().zip(&answer.results) {
        assert_eq!(&theirs.tokens, ids, "{what}: llama.cpp's ids of {text:?}");
        let greedy_ours = greedy(ours, ids, steps);
        let (diff, scale) = llama_cpp::max_diff(&last_logits(ours, ids), &theirs.first_logits);
        println!(
            "{what}: llama.cpp {} greedy {:?} ours {:?}; logits max |diff| {diff:.5} of {scale:.3}",
            answer.llama_cpp, theirs.greedy, greedy_ours
        );
        assert!(
            diff <= logit_tolerance * scale,
            "{what}: llama.cpp's logits after {text:?} differ from ours by {diff} (largest {scale})"
        );
        let prefix = llama_cpp::common_prefix(&greedy_ours, &theirs.greedy);
        agreed += prefix;
        if prefix < steps {
            // Where the two part, the tokens must be a near tie in our own logits: a
            // difference of rounding (llama.cpp keeps the KV cache in f16, and both quantize
            // activations for q8_0 / k-quant products), not of the model.
            let mut context = ids.clone();
            context.extend_from_slice(&greedy_ours[..prefix]);
            let logits = last_logits(ours, &context);
            let margin =
                logits[greedy_ours[prefix] as usize] - logits[theirs.greedy[prefix] as usize];
            println!("{what}: parted at token {prefix} with a margin of {margin:.5}");
            assert!(
                margin <= logit_tolerance * scale,
                "{what}: after {prefix} agreeing tokens llama.cpp picks {} where ours picks {} \
                 by a margin of {margin} (largest logit {scale})",
                theirs.greedy[prefix],
                greedy_ours[prefix]
            );
        }
    }
    println!(
        "{what}: greedy tokens agreeing with llama.cpp {agreed}/{}",
        steps * prompts.len()
    );
    assert!(
        agreed * 4 >= steps * prompts.len() * 3,
        "{what}: llama.cpp's greedy tokens agree with ours for only {agreed} of {}",
        steps * prompts.len()
    );
}

#[test]
fn llama_cpp_runs_every_export_with_our_tokens_when_llama_cpp_python_is_installed() {
    let llama = match llama_cpp::LlamaCpp::find() {
        Ok(llama) => llama,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let setup = Setup::new();
    for (quant, tolerance) in [
        (ExportQuant::F16, 1e-2),
        (ExportQuant::Q8_0, 3e-2),
        (ExportQuant::Q4KM, 5e-2),
    ] {
        let (exported, _) = setup.export(quant);
        let out = setup.path(quant.as_str()).join("tiny.gguf");
        assert_llama_cpp_agrees(&llama, &out, &exported, quant.as_str(), tolerance);
    }
    let wide = Setup::shaped(WIDE);
    let (exported, _) = wide.export(ExportQuant::Q4KM);
    let out = wide.path("q4_k_m").join("tiny.gguf");
    assert_llama_cpp_agrees(&llama, &out, &exported, "q4_k_m (hidden 256)", 5e-2);
}

/// `MEDCODER_EXPORT_CHECK_GGUF=FILE`: a real export (e.g. SmolLM2 with a fine-tuned adapter)
/// compared with llama.cpp on a few chat prompts; prints the figures. `MEDCODER_EXPORT_CHECK_TOKENS`
/// sets the greedy tokens per prompt (default 24).
#[test]
fn llama_cpp_agrees_with_our_loader_on_the_gguf_named_by_the_environment() {
    let Some(gguf) = std::env::var_os("MEDCODER_EXPORT_CHECK_GGUF") else {
        eprintln!("skipped: set MEDCODER_EXPORT_CHECK_GGUF=FILE.gguf to compare a real export");
        return;
    };
    let llama = match llama_cpp::LlamaCpp::find() {
        Ok(llama) => llama,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let steps: usize = std::env::var("MEDCODER_EXPORT_CHECK_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let gguf = PathBuf::from(gguf);
    let home = MedcoderHome::at(tempfile::tempdir().unwrap().path().join("home"));
    let ours = load(&gguf, &home);
    let questions = [
        "What is the capital of France?",
        "Predict the medical codes for the following text: 67-year-old man with type 2 \
         diabetes mellitus and essential hypertension, admitted for community-acquired pneumonia.",
        "Predict the medical codes for the following text: Paciente de 45 años con dolor \
         torácico; se descarta infarto agudo de miocardio.",
        "List three symptoms of anemia.",
    ];
    let template = ours.tokenizer.chat_template.as_ref().unwrap();
    let prompts: Vec<(String, Vec<u32>)> = questions
        .iter()
        .map(|q| {
            let text = template
                .render(
                    &[ChatMessage::new("user", *q)],
                    true,
                    ours.tokenizer.bos_token.as_deref(),
                    ours.tokenizer.eos_token.as_deref(),
                )
                .unwrap();
            let ids = ours.tokenizer.encode(&text).unwrap();
            (text, ids)
        })
        .collect();
    let answer = llama.run(&gguf, &prompts, steps);
    let (mut same_ids, mut agreed, mut worst) = (0, 0, 0f32);
    for ((_, ids), theirs) in prompts.iter().zip(&answer.results) {
        same_ids += usize::from(&theirs.tokens == ids);
        let ours_greedy = greedy(&ours, ids, steps);
        let prefix = llama_cpp::common_prefix(&ours_greedy, &theirs.greedy);
        agreed += prefix;
        if prefix < steps {
            let mut context = ids.clone();
            context.extend_from_slice(&ours_greedy[..prefix]);
            let logits = last_logits(&ours, &context);
            let margin =
                logits[ours_greedy[prefix] as usize] - logits[theirs.greedy[prefix] as usize];
            println!(
                "  parted at token {prefix}: ours {:?} over llama.cpp's {:?} by {margin:.4} in our logits",
                ours.tokenizer.decode(&ours_greedy[prefix..=prefix]).unwrap(),
                ours.tokenizer.decode(&theirs.greedy[prefix..=prefix]).unwrap(),
            );
        }
        let first = last_logits(&ours, ids);
        let (diff, scale) = llama_cpp::max_diff(&first, &theirs.first_logits);
        let mean = first
            .iter()
            .zip(&theirs.first_logits)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / first.len() as f32;
        worst = worst.max(diff);
        println!(
            "{} prompt tokens: greedy agree for {prefix}/{steps} tokens; first-step logits max \
             |diff| {diff:.4}, mean {mean:.4} (largest logit {scale:.2})\n  ours:      {:?}\n  llama.cpp: {:?}",
            ids.len(),
            ours.tokenizer.decode(&ours_greedy).unwrap(),
            ours.tokenizer.decode(&theirs.greedy).unwrap(),
        );
    }
    println!(
        "{}: {} bytes; llama.cpp {}; same prompt ids {same_ids}/{}; greedy tokens agreeing \
         (common prefix) {agreed}/{}; worst first-step logit |diff| {worst:.4}",
        gguf.display(),
        std::fs::metadata(&gguf).unwrap().len(),
        answer.llama_cpp,
        prompts.len(),
        steps * prompts.len(),
    );
    assert_eq!(
        same_ids,
        prompts.len(),
        "llama.cpp tokenizes the prompts otherwise"
    );
}
