//! End-to-end test of `medcoder export gguf` on a tiny random llama written here with a LoRA
//! adapter registered as `coder`: `export gguf --adapter coder@dev` writes the GGUF, its
//! Modelfile and LM Studio layout and records the file in the registry; `generate` on the GGUF
//! alone gives the tokens `generate --adapter coder@dev` gives on the base; `merge` takes the
//! registered adapter too. With llama-cpp-python installed, llama.cpp continues the prompt with
//! the same tokens.

#![allow(clippy::unwrap_used)]

#[path = "../../train/tests/support/bpe_tokenizer.rs"]
mod bpe_tokenizer;
#[path = "../../train/tests/support/llama_cpp.rs"]
mod llama_cpp;
mod support;
#[path = "../../train/tests/support/tiny_model.rs"]
mod tiny_model;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use medcoder_models::ModelTokenizer;
use serde_json::Value;
use support::{assert_ok, json, medcoder, Run};

const PROMPT: &str = "Predict the medical codes for the following text: chest pain";

/// A PEFT LoRA adapter (r 4 on q_proj and down_proj of every layer) with deterministic
/// nonzero B, and the config.yaml `medcoder train` leaves, naming `base` as its model.
fn write_adapter(dir: &Path, base: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (hidden, intermediate, r) = (tiny_model::HIDDEN, tiny_model::INTERMEDIATE, 4);
    let values = |n: usize, k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| 0.3 * ((i * 7 + k * 13) as f32 * 0.37).sin())
            .collect()
    };
    let mut tensors = HashMap::new();
    for layer in 0..tiny_model::LAYERS {
        for (k, (module, rows, cols)) in [
            ("self_attn.q_proj", hidden, hidden),
            ("mlp.down_proj", hidden, intermediate),
        ]
        .into_iter()
        .enumerate()
        {
            let prefix = format!("base_model.model.model.layers.{layer}.{module}");
            let a = Tensor::from_vec(values(r * cols, k + layer), (r, cols), &Device::Cpu);
            let b = Tensor::from_vec(values(rows * r, k + layer + 5), (rows, r), &Device::Cpu);
            tensors.insert(format!("{prefix}.lora_A.weight"), a.unwrap());
            tensors.insert(format!("{prefix}.lora_B.weight"), b.unwrap());
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "down_proj"],
        "fan_in_fan_out": false,
        "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        format!("model: {}\nlora:\n  r: 4\n", base.display()),
    )
    .unwrap();
}

fn generated_ids(run: &Run) -> Vec<u32> {
    assert_ok(run);
    serde_json::from_value(json(run)["token_ids"].clone()).unwrap()
}

#[test]
fn export_gguf_of_a_registered_adapter_generates_as_the_adapter_does() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let run = |args: &[&str]| medcoder(&home, args, None);
    let base = tmp.path().join("base");
    let vocab = bpe_tokenizer::write_chatml_bpe_tokenizer(&base, &[PROMPT, "E11.9, I10, R07.9"]);
    tiny_model::write_tiny_llama(&base, vocab, 11);
    let adapter = tmp.path().join("run");
    write_adapter(&adapter, &base);
    let adapter_arg = adapter.display().to_string();
    assert_ok(&run(&[
        "models",
        "register",
        "--name",
        "coder",
        "--run",
        &adapter_arg,
    ]));

    let out = tmp.path().join("export").join("coder-f16.gguf");
    let out_arg = out.display().to_string();
    let exported = run(&[
        "export",
        "gguf",
        "--adapter",
        "coder@dev",
        "--quant",
        "f16",
        "--out",
        &out_arg,
        "--json",
    ]);
    assert_ok(&exported);
    let report = json(&exported);
    assert_eq!(report["modules_merged"], 2 * tiny_model::LAYERS);
    assert_eq!(report["bytes"], std::fs::metadata(&out).unwrap().len());
    assert!(out.with_file_name("Modelfile").is_file());
    let registered = report["registered"].as_str().unwrap().to_string();
    assert!(registered.starts_with("coder@"), "{registered}");
    // LM Studio's layout beside it: <root>/<publisher>/<repo>/<file>, the same bytes.
    let lmstudio = tmp
        .path()
        .join("export/lmstudio/medcoder/coder-GGUF/coder-f16.gguf");
    assert_eq!(report["lmstudio"]["gguf"], lmstudio.display().to_string());
    assert_eq!(
        std::fs::read(&lmstudio).unwrap(),
        std::fs::read(&out).unwrap()
    );
    assert!(tmp.path().join("export/lmstudio/README.md").is_file());
    // The registry entry records the GGUF.
    let shown = run(&["models", "show", "coder@dev"]);
    assert_ok(&shown);
    assert_eq!(json(&shown)["gguf"], out.display().to_string());

    // The GGUF alone generates what the base with the registered adapter generates.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "8",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        generated_ids(&run(&args))
    };
    let from_gguf = generate(&["--model", &out_arg]);
    let from_adapter = generate(&["--adapter", "coder@dev"]);
    assert!(!from_gguf.is_empty());
    assert_eq!(from_gguf, from_adapter);
    let base_arg = base.display().to_string();
    let from_base = generate(&["--model", &base_arg]);
    assert_ne!(from_base, from_adapter, "the adapter changes the model");

    // merge takes the registered adapter as well, and the registry records the folder.
    let merged = tmp.path().join("merged");
    let merged_arg = merged.display().to_string();
    assert_ok(&run(&[
        "merge",
        "--adapter",
        &registered,
        "--out",
        &merged_arg,
        "--dtype",
        "f32",
    ]));
    assert_eq!(generate(&["--model", &merged_arg]), from_adapter);
    let shown: Value = json(&run(&["models", "show", &registered]));
    assert_eq!(shown["merged"], merged.display().to_string());

    // llama.cpp continues the prompt with the same tokens.
    let llama = match llama_cpp::LlamaCpp::find() {
        Ok(llama) => llama,
        Err(why) => {
            eprintln!("skipped the llama.cpp part: {why}");
            return;
        }
    };
    let ids = ModelTokenizer::from_dir(&base)
        .unwrap()
        .tokenize(PROMPT, true, true)
        .unwrap();
    let answer = llama.run(&out, &[(PROMPT.to_string(), ids)], from_gguf.len());
    assert_eq!(answer.results[0].greedy, from_gguf);
}
