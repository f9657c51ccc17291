//! Training passes that must agree, on the tiny random checkpoints: the hand-written CPU pass
//! (`medcoder_models::lora_train_cpu`) and candle's autograd give the same loss and LoRA
//! gradients, with and without dropout and gradient checkpointing, on sequences long enough
//! to span several attention blocks; and checkpointed autograd equals plain autograd for the
//! families and methods the CPU pass leaves to it; QLoRA bases (GGUF blocks, NF4) dequantized
//! layer by layer in the CPU pass give autograd's loss and gradients too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use medcoder_models::layers::Linear;
use medcoder_models::lora::LoraLinear;
use medcoder_models::lora_train_cpu::unsupported_reason;
use medcoder_models::CausalLm;
use medcoder_train::config::LossOn;
use medcoder_train::data::{pad_batch, Example, PaddedBatch};
use medcoder_train::trainable::{make_trainable, Trainable};
use medcoder_train::trainer::{autograd_loss_and_grads, batch_loss_and_grads};
use medcoder_train::TrainConfig;

mod support;

use support::gradients::assert_same;

use support::load_tiny_fixture as load;

fn lora(lm: &mut CausalLm, dropout: f64) -> Trainable {
    let config = TrainConfig::from_yaml(
        &format!(
            "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\n\
             lora: {{r: 4, alpha: 8, dropout: {dropout}}}\n"
        ),
        &[],
        "test",
    )
    .unwrap();
    let trainable = make_trainable(lm, &config, false).unwrap();
    // B starts at zero, which would leave A without gradient.
    for (name, var) in &trainable.vars {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    trainable
}

/// A 100-token row (two 64-query attention blocks) and a 37-token one, right-padded.
fn batch() -> PaddedBatch {
    let mut state = 11u64;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (medcoder_models::lora::splitmix64(&mut state) % 120) as u32 + 3)
            .collect()
    };
    let a = Example {
        doc_id: "a".into(),
        ids: ids(100),
        prompt_len: 30,
    };
    let b = Example {
        doc_id: "b".into(),
        ids: ids(37),
        prompt_len: 5,
    };
    pad_batch(&[&a, &b], 0, LossOn::Completion)
}

#[test]
fn checkpointed_autograd_equals_plain_autograd() {
    for (family, method) in [("gemma3", "lora"), ("qwen3", "full")] {
        let mut lm = load(family);
        let trainable = match method {
            "lora" => lora(&mut lm, 0.0),
            _ => make_trainable(&mut lm, &full_config(), false).unwrap(),
        };
        let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
        let batch = batch();
        let n = batch.targets.len() as f64;
        let (plain_loss, plain) =
            autograd_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, false).unwrap();
        let (loss, ckpt) =
            autograd_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, true).unwrap();
        let case = format!("{family} {method} checkpointed");
        assert_same(&case, &trainable, (plain_loss, &plain), (loss, &ckpt));
    }
}

fn full_config() -> TrainConfig {
    TrainConfig::from_yaml(
        "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\nmethod: full\n",
        &[],
        "test",
    )
    .unwrap()
}

#[test]
fn the_cpu_pass_has_candle_autograds_loss_and_gradients() {
    for family in ["llama", "qwen2"] {
        for dropout in [0.0, 0.2] {
            let mut lm = load(family);
            let trainable = lora(&mut lm, dropout);
            assert_eq!(unsupported_reason(&lm), None, "{family}");
            let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
            let batch = batch();
            let n = batch.targets.len() as f64;
            let reseed = || {
                if let Some(d) = &trainable.dropout {
                    d.set_active(true);
                    d.reseed(42);
                }
            };
            reseed();
            let (want_loss, want) =
                autograd_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, false).unwrap();
            // The CPU pass plain and checkpointed, and autograd checkpointed (whose
            // recomputed layers must draw the dropout masks of their first pass).
            for (path, checkpointing) in [("cpu", false), ("cpu", true), ("autograd", true)] {
                reseed();
                let run = match path {
                    "cpu" => batch_loss_and_grads,
                    _ => autograd_loss_and_grads,
                };
                let (loss, got) = run(&lm, &batch, n, &vars, &Device::Cpu, checkpointing).unwrap();
                let case =
                    format!("{family}, {path}, dropout {dropout}, checkpointing {checkpointing}");
                assert_same(&case, &trainable, (want_loss, &want), (loss, &got));
            }
        }
    }
}

#[test]
fn families_and_modes_the_cpu_pass_does_not_cover_fall_back_to_autograd() {
    for family in ["qwen3", "gemma3"] {
        let mut lm = load(family);
        lora(&mut lm, 0.0);
        assert!(unsupported_reason(&lm).is_some(), "{family}");
    }
    let mut lm = load("llama");
    make_trainable(&mut lm, &full_config(), false).unwrap();
    assert!(unsupported_reason(&lm).is_some(), "full fine-tuning");
}

#[test]
fn qlora_bases_run_on_the_cpu_pass_with_autograds_loss_and_gradients() {
    for family in ["llama", "qwen2"] {
        for quant in ["q8_0", "q4_0", "nf4"] {
            let mut lm = load(family);
            let config = TrainConfig::from_yaml(
                "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\n\
                 method: qlora\nlora: {r: 4, alpha: 8}\n",
                &[format!("qlora_quant={quant}")],
                "test",
            )
            .unwrap();
            let trainable = make_trainable(&mut lm, &config, false).unwrap();
            for (name, var) in &trainable.vars {
                if name.contains("lora_B") {
                    var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                }
            }
            assert_eq!(unsupported_reason(&lm), None, "{family} {quant}");
            let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
            let batch = batch();
            let n = batch.targets.len() as f64;
            // What the CPU pass computes: the LoRA model on the dequantized base.
            let mut dequantized = lm.clone();
            dequantized
                .visit_linears_mut(|_, linear| {
                    let Linear::Lora(lora) = linear else {
                        return Ok(false);
                    };
                    *linear = Linear::Lora(Arc::new(LoraLinear {
                        base: lora.base.dequantized(DType::F32, &Device::Cpu)?,
                        a: lora.a.clone(),
                        b: lora.b.clone(),
                        scale: lora.scale,
                        dropout: lora.dropout.clone(),
                    }));
                    Ok(true)
                })
                .unwrap();
            let want = autograd_loss_and_grads(&dequantized, &batch, n, &vars, &Device::Cpu, false)
                .unwrap();
            for checkpointing in [false, true] {
                let (loss, got) =
                    batch_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, checkpointing)
                        .unwrap();
                let case = format!("{family} {quant}, cpu pass, checkpointing {checkpointing}");
                assert_same(&case, &trainable, (want.0, &want.1), (loss, &got));
            }
            // Autograd on the quantized base itself: the same for NF4 (dequantized by both);
            // close in loss on GGUF blocks, whose forward product in autograd quantizes the
            // activations to 8 bits as llama.cpp does (gradients then differ by a few %).
            let on_blocks =
                autograd_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, false).unwrap();
            let (loss, got) =
                batch_loss_and_grads(&lm, &batch, n, &vars, &Device::Cpu, false).unwrap();
            let case = format!("{family} {quant}, cpu pass vs autograd on the quantized base");
            if quant == "nf4" {
                assert_same(&case, &trainable, (on_blocks.0, &on_blocks.1), (loss, &got));
            } else {
                assert!(
                    (loss - on_blocks.0).abs() <= 2e-3 * loss,
                    "{case}: {loss} vs {}",
                    on_blocks.0
                );
            }
        }
    }
}
