//! Gradients on the tiny random checkpoints of every family: each LoRA matrix receives a
//! non-zero gradient and no frozen weight receives one (candle ops without a backward pass
//! would drop gradients silently); QLoRA's quantized base passes gradients through; and the
//! analytic gradients match finite differences (full fine-tuning in f64, LoRA in f32).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use medcoder_models::layers::Linear;
use medcoder_models::loader::load_hf_dir;
use medcoder_models::CausalLm;
use medcoder_train::config::LossOn;
use medcoder_train::data::{pad_batch, Example, PaddedBatch};
use medcoder_train::trainable::make_trainable;
use medcoder_train::trainer::batch_loss_and_grads;
use medcoder_train::TrainConfig;

const FAMILIES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/tiny")
        .join(family)
}

fn config(method: &str, extra: &[&str]) -> TrainConfig {
    let mut overrides: Vec<String> = vec![format!("method={method}")];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::from_yaml(
        "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\nlora: {r: 4, alpha: 8}\n",
        &overrides,
        "test",
    )
    .unwrap()
}

fn load(family: &str, dtype: DType) -> CausalLm {
    load_hf_dir(&fixture(family), &Device::Cpu, dtype)
        .unwrap()
        .0
}

/// Two sequences of different lengths with completions, over the tiny vocabulary.
fn batch(loss_on: LossOn) -> PaddedBatch {
    let a = Example {
        doc_id: "a".into(),
        ids: vec![1, 17, 42, 99, 5, 63, 7, 120, 33, 2],
        prompt_len: 6,
    };
    let b = Example {
        doc_id: "b".into(),
        ids: vec![1, 8, 77, 3, 91, 2],
        prompt_len: 3,
    };
    pad_batch(&[&a, &b], 0, loss_on)
}

fn loss_and_grads(lm: &CausalLm, vars: &[Var]) -> (f64, Vec<Option<Tensor>>) {
    let batch = batch(LossOn::Completion);
    let n = batch.targets.len() as f64;
    let (sum, grads) = batch_loss_and_grads(lm, &batch, n, vars, &Device::Cpu, false).unwrap();
    (sum / n, grads)
}

/// B starts at zero (the adapted model starts as the base), which leaves A without gradient;
/// give B values so that both matrices are exercised.
fn randomize_b(vars: &[(String, Var)]) {
    for (name, var) in vars {
        if name.contains("lora_B") {
            let values = Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap();
            var.set(&values).unwrap();
        }
    }
}

fn frozen_weights(lm: &mut CausalLm) -> Vec<(String, Tensor)> {
    let mut frozen = Vec::new();
    lm.visit_linears_mut(|name, linear| {
        let base = match linear {
            Linear::Lora(lora) => &lora.base,
            other => other,
        };
        if let Linear::Dense { weight, .. } = base {
            frozen.push((name.to_string(), weight.clone()));
        }
        Ok(false)
    })
    .unwrap();
    frozen
}

#[test]
fn every_lora_matrix_gets_a_gradient_and_no_frozen_weight_does() {
    for family in FAMILIES {
        let mut lm = load(family, DType::F32);
        let trainable = make_trainable(&mut lm, &config("lora", &[]), false).unwrap();
        assert_eq!(
            trainable.modules,
            7 * 2,
            "{family}: 7 layers × 2 blocks adapted"
        );
        randomize_b(&trainable.vars);
        let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
        let batch = batch(LossOn::Completion);
        let n = batch.targets.len() as f64;
        let (loss, grads) =
            batch_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, false).unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{family}: loss {loss}");
        for ((name, _), grad) in trainable.vars.iter().zip(&grads) {
            let grad = grad
                .as_ref()
                .unwrap_or_else(|| panic!("{family}: {name} got no gradient"));
            let norm = grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{family}: {name} gradient norm {norm}"
            );
        }
        // The frozen weights are not variables: a backward pass of the same graph must not
        // hold a gradient for any of them.
        let frozen = frozen_weights(&mut lm);
        assert!(!frozen.is_empty());
        let ids = Tensor::new(&[[1u32, 17, 42, 99, 5]], &Device::Cpu).unwrap();
        let loss = lm
            .hidden_states(&ids, medcoder_models::layers::Mode::Differentiable)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let store = loss.backward().unwrap();
        for (name, weight) in &frozen {
            assert!(
                store.get(weight).is_none(),
                "{family}: frozen {name} got a gradient"
            );
        }
    }
}

#[test]
fn qlora_passes_gradients_through_the_quantized_base() {
    for family in FAMILIES {
        let mut lm = load(family, DType::F32);
        let trainable =
            make_trainable(&mut lm, &config("qlora", &["qlora_quant=q8_0"]), false).unwrap();
        let mut quantized = 0;
        lm.visit_linears_mut(|_, linear| {
            if let Linear::Lora(lora) = linear {
                quantized += usize::from(matches!(lora.base, Linear::Quantized { .. }));
            }
            Ok(false)
        })
        .unwrap();
        assert_eq!(quantized, 14, "{family}: every adapted base quantized");
        randomize_b(&trainable.vars);
        let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
        let (loss, grads) = loss_and_grads(&lm, &vars);
        assert!(loss.is_finite(), "{family}");
        for ((name, _), grad) in trainable.vars.iter().zip(&grads) {
            let norm = grad
                .as_ref()
                .map(|g| {
                    g.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .unwrap_or(0.0);
            assert!(
                norm > 0.0,
                "{family}: {name} got no gradient through the quantized base"
            );
        }
    }
}

/// Central differences on a few elements of each kind of parameter.
fn check_finite_differences(
    lm: &CausalLm,
    vars: &[(String, Var)],
    eps: f64,
    tolerance: f64,
    picks_per_var: usize,
) -> usize {
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let (_, grads) = loss_and_grads(lm, &plain);
    let mut checked = 0;
    for (index, (name, var)) in vars.iter().enumerate() {
        let dtype = var.dtype();
        let original = var
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap();
        let values: Vec<f64> = original.to_vec1().unwrap();
        let grad: Vec<f64> = grads[index]
            .as_ref()
            .map(|g| {
                g.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .unwrap_or_else(|| vec![0.0; values.len()]);
        let step = (values.len() / picks_per_var).max(1);
        for element in (0..values.len()).step_by(step).take(picks_per_var) {
            let at = |delta: f64| {
                let mut shifted = values.clone();
                shifted[element] += delta;
                let t = Tensor::from_vec(shifted, var.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                var.set(&t).unwrap();
                loss_and_grads(lm, &[]).0
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let analytic = grad[element];
            let scale = numeric.abs().max(analytic.abs()).max(1e-3);
            assert!(
                (numeric - analytic).abs() / scale < tolerance,
                "{name}[{element}]: numeric {numeric:e} vs analytic {analytic:e}"
            );
            checked += 1;
        }
        let restored = Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap();
        var.set(&restored.to_dtype(dtype).unwrap()).unwrap();
    }
    checked
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences_in_f64() {
    for family in ["llama", "gemma3"] {
        let mut lm = load(family, DType::F64);
        let trainable = make_trainable(&mut lm, &config("full", &[]), false).unwrap();
        // Embeddings, a norm, attention and MLP weights of the first block, the final norm.
        let picked: Vec<(String, Var)> = trainable
            .vars
            .iter()
            .filter(|(n, _)| {
                n == "model.embed_tokens.weight"
                    || n == "model.norm.weight"
                    || n.starts_with("model.layers.0.") && !n.contains("k_norm")
            })
            .cloned()
            .collect();
        assert!(picked.len() >= 8, "{family}: {} tensors", picked.len());
        let checked = check_finite_differences(&lm, &picked, 1e-5, 1e-4, 3);
        assert!(checked >= 24, "{family}: {checked} elements checked");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let mut lm = load("qwen2", DType::F32);
    let trainable = make_trainable(
        &mut lm,
        &config("lora", &["lora.target_modules=[q_proj, v_proj, down_proj]"]),
        false,
    )
    .unwrap();
    randomize_b(&trainable.vars);
    let checked = check_finite_differences(&lm, &trainable.vars, 1e-2, 3e-2, 2);
    assert!(checked >= 12, "{checked} elements checked");
}
