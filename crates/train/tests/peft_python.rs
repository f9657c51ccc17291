//! Our adapters in PEFT's format, checked against Python `peft` itself: an adapter saved by
//! the trainer loads with `PeftModel.from_pretrained` on the same base and gives the same
//! logits as our adapted model; and an adapter saved by Python `peft` loads in our loader with
//! the same logits. Runs when Python with torch, transformers and peft is found
//! (`$MEDCODER_PYTHON`, `.venv-reference/bin/python`, or `python3`); skips saying why otherwise.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use medcoder_models::loader::load_hf_dir;
use medcoder_models::lora::apply_peft_adapter;
use medcoder_models::CausalLm;
use medcoder_train::trainable::make_trainable;
use medcoder_train::TrainConfig;

const IDS: [u32; 9] = [1, 17, 42, 99, 5, 63, 7, 120, 33];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(family: &str) -> PathBuf {
    workspace_root()
        .join("crates/models/tests/fixtures/tiny")
        .join(family)
}

/// A Python that imports torch, transformers and peft, or `None` after saying why not.
fn python_with_peft() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("MEDCODER_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            workspace_root().join(".venv-reference/bin/python"),
            PathBuf::from("python3"),
        ])
        .collect();
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import torch, transformers, peft"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    eprintln!(
        "skipping: no Python with torch, transformers and peft (set MEDCODER_PYTHON, or run scripts/reference/setup-venv)"
    );
    None
}

/// Last-position logits of Python's model (base + adapter) for IDS.
fn python_logits(python: &Path, base: &Path, adapter: &Path, save_to: Option<&Path>) -> Vec<f32> {
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel, LoraConfig, get_peft_model
base, adapter, save_to, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
if save_to:
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(save_to)
else:
    model = PeftModel.from_pretrained(model, adapter)
model.eval()
with torch.no_grad():
    out = model(torch.tensor([ids])).logits[0, -1].tolist()
print(json.dumps(out))
"#;
    let output = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(base)
        .arg(adapter)
        .arg(save_to.map(|p| p.display().to_string()).unwrap_or_default())
        .arg(serde_json::to_string(&IDS).unwrap())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn our_logits(lm: &CausalLm) -> Vec<f32> {
    let ids = Tensor::new(&IDS, &Device::Cpu)
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
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn our_adapters_load_in_python_peft_and_theirs_in_ours() {
    let Some(python) = python_with_peft() else {
        return;
    };
    for family in ["llama", "qwen2", "gemma3"] {
        let base = fixture(family);
        // Ours → PEFT: an adapter with non-zero B (a trained one) and rsLoRA scaling.
        let mut lm = load_hf_dir(&base, &Device::Cpu, DType::F32).unwrap().0;
        let config = TrainConfig::from_yaml(
            "model: tiny\ndb: x\ndataset: x\noutput_dir: x\nlora: {r: 4, alpha: 8, rslora: true}\n",
            &[],
            "test",
        )
        .unwrap();
        let trainable = make_trainable(&mut lm, &config, false).unwrap();
        for (name, var) in &trainable.vars {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        trainable.save(dir.path()).unwrap();
        let theirs = python_logits(&python, &base, dir.path(), None);
        let ours = our_logits(&lm);
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff < 1e-4,
            "{family}: our adapter in PEFT differs by {diff}"
        );

        // PEFT → ours.
        let saved = tempfile::tempdir().unwrap();
        let theirs = python_logits(&python, &base, Path::new(""), Some(saved.path()));
        let mut lm = load_hf_dir(&base, &Device::Cpu, DType::F32).unwrap().0;
        let applied = apply_peft_adapter(&mut lm, saved.path()).unwrap();
        assert_eq!(applied.modules, 14, "{family}");
        let diff = max_abs_diff(&our_logits(&lm), &theirs);
        assert!(
            diff < 1e-4,
            "{family}: PEFT's adapter in our loader differs by {diff}"
        );
    }
}
