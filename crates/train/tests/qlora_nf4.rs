//! QLoRA on an NF4 base (`qlora_quant: nf4`), on the tiny random checkpoints: every adapted
//! base layer is NF4, every LoRA matrix receives a non-zero gradient through it and the frozen
//! weights none, the loss stays close to the unquantized model's, and a few optimizer steps
//! on one batch bring the loss down.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};
use medcoder_models::layers::{Linear, Mode};
use medcoder_models::CausalLm;
use medcoder_train::config::LossOn;
use medcoder_train::data::{pad_batch, Example, PaddedBatch};
use medcoder_train::optim::AdamW;
use medcoder_train::trainable::{make_trainable, Trainable};
use medcoder_train::trainer::batch_loss_and_grads;
use medcoder_train::TrainConfig;

mod support;

use support::load_tiny_fixture as load;

fn config(extra: &[&str]) -> TrainConfig {
    let mut overrides = vec!["method=qlora".to_string(), "qlora_quant=nf4".to_string()];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::from_yaml(
        "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\nlora: {r: 4, alpha: 8}\n",
        &overrides,
        "test",
    )
    .unwrap()
}

fn batch() -> PaddedBatch {
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
    pad_batch(&[&a, &b], 0, LossOn::Completion)
}

fn loss_and_grads(lm: &CausalLm, trainable: &Trainable) -> (f64, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
    let batch = batch();
    let n = batch.targets.len() as f64;
    let (sum, grads) = batch_loss_and_grads(lm, &batch, n, &vars, &Device::Cpu, false).unwrap();
    (sum / n, grads)
}

fn nf4_bases(lm: &mut CausalLm) -> usize {
    let mut count = 0;
    lm.visit_linears_mut(|_, linear| {
        if let Linear::Lora(lora) = linear {
            count += usize::from(matches!(lora.base, Linear::Nf4 { .. }));
        }
        Ok(false)
    })
    .unwrap();
    count
}

#[test]
fn every_lora_matrix_gets_a_gradient_through_an_nf4_base_and_no_frozen_weight_does() {
    for family in ["llama", "qwen2", "qwen3", "gemma3"] {
        let mut lm = load(family);
        let trainable = make_trainable(&mut lm, &config(&[]), false).unwrap();
        assert_eq!(
            nf4_bases(&mut lm),
            14,
            "{family}: every adapted base in NF4"
        );
        for (name, var) in &trainable.vars {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let (loss, grads) = loss_and_grads(&lm, &trainable);
        assert!(loss.is_finite() && loss > 0.0, "{family}: loss {loss}");
        for ((name, _), grad) in trainable.vars.iter().zip(&grads) {
            let norm = grad
                .as_ref()
                .unwrap_or_else(|| panic!("{family}: {name} got no gradient"))
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{family}: {name}: {norm}");
        }
        // The NF4 bases hold no tensor a gradient could reach; the dense frozen weights left
        // (the LM head) get none either.
        let mut dense_frozen = Vec::new();
        lm.visit_linears_mut(|name, linear| {
            if let Linear::Dense { weight, .. } = linear {
                dense_frozen.push((name.to_string(), weight.clone()));
            }
            Ok(false)
        })
        .unwrap();
        let ids = Tensor::new(&[[1u32, 17, 42, 99, 5]], &Device::Cpu).unwrap();
        let hidden = lm.hidden_states(&ids, Mode::Differentiable).unwrap();
        let store = lm
            .logits_from_hidden(&hidden)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, weight) in &dense_frozen {
            assert!(
                store.get(weight).is_none(),
                "{family}: frozen {name} got one"
            );
        }
    }
}

#[test]
fn an_nf4_base_stays_close_to_the_weights_it_was_made_from() {
    // B starts at zero: both models compute their bases alone.
    let mut nf4 = load("qwen2");
    let trainable = make_trainable(&mut nf4, &config(&[]), false).unwrap();
    let (nf4_loss, _) = loss_and_grads(&nf4, &trainable);
    let mut dense = load("qwen2");
    let lora = TrainConfig {
        method: medcoder_train::config::Method::Lora,
        ..config(&[])
    };
    let trainable = make_trainable(&mut dense, &lora, false).unwrap();
    let (dense_loss, _) = loss_and_grads(&dense, &trainable);
    assert!(
        nf4_loss != dense_loss && (dense_loss - nf4_loss).abs() < 0.05 * dense_loss,
        "{dense_loss} vs {nf4_loss}"
    );
}

#[test]
fn training_on_an_nf4_base_lowers_the_loss() {
    let mut lm = load("llama");
    let config = config(&["optimizer.learning_rate=1.0e-2"]);
    let trainable = make_trainable(&mut lm, &config, false).unwrap();
    let mut optimizer = AdamW::new(config.optimizer.clone(), trainable.vars.clone()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let (loss, grads) = loss_and_grads(&lm, &trainable);
        losses.push(loss);
        optimizer.apply(&grads, 1e-2).unwrap();
    }
    assert!(
        losses[7] < 0.9 * losses[0],
        "the loss did not fall: {losses:?}"
    );
    assert!(
        losses.windows(2).filter(|w| w[1] < w[0]).count() >= 6,
        "{losses:?}"
    );
}
