//! Packed rows keep documents apart: on the tiny random checkpoints, a packed batch has the
//! loss and LoRA gradients of the same examples one per row (the same tokens scored, the same
//! weighting), in the hand-written CPU pass and in candle's autograd (plain and checkpointed),
//! for every family the autograd path serves (Gemma 3's sliding windows included). A document
//! that could see another's tokens, or whose rotary positions did not restart, would change
//! both.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};
use medcoder_models::lora_train_cpu::unsupported_reason;
use medcoder_models::CausalLm;
use medcoder_train::config::LossOn;
use medcoder_train::data::{pack_batch, pad_batch, Example, PaddedBatch};
use medcoder_train::trainable::{make_trainable, Trainable};
use medcoder_train::trainer::{autograd_loss_and_grads, batch_loss_and_grads};
use medcoder_train::TrainConfig;

mod support;

use support::gradients::assert_same;
use support::load_tiny_fixture as load;

fn lora(lm: &mut CausalLm) -> Trainable {
    let config = TrainConfig::from_yaml(
        "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\nlora: {r: 4, alpha: 8}\n",
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

/// Five examples, as two packed rows (102 and 80 tokens: the first spans two 64-query
/// attention blocks, with a document boundary inside each) or one per row.
fn batches() -> (PaddedBatch, PaddedBatch) {
    let mut state = 5u64;
    let examples: Vec<Example> = [(40, 12), (37, 5), (25, 24), (20, 1), (60, 30)]
        .into_iter()
        .enumerate()
        .map(|(i, (len, prompt_len))| Example {
            doc_id: i.to_string(),
            ids: (0..len)
                .map(|_| (medcoder_models::lora::splitmix64(&mut state) % 120) as u32 + 3)
                .collect(),
            prompt_len,
        })
        .collect();
    let e: Vec<&Example> = examples.iter().collect();
    let packed = pack_batch(
        &[vec![e[0], e[1], e[2]], vec![e[3], e[4]]],
        0,
        LossOn::Completion,
    );
    let unpacked = pad_batch(&e, 0, LossOn::Completion);
    assert_eq!(packed.targets.len(), unpacked.targets.len());
    assert!(packed.rows * packed.len < unpacked.rows * unpacked.len);
    (packed, unpacked)
}

type Pass = fn(
    &CausalLm,
    &PaddedBatch,
    f64,
    &[Var],
    &Device,
    bool,
) -> Result<(f64, Vec<Option<Tensor>>), medcoder_train::TrainError>;

#[test]
fn a_packed_batch_has_the_loss_and_gradients_of_its_examples_one_per_row() {
    let (packed, unpacked) = batches();
    let n = packed.targets.len() as f64;
    for family in ["llama", "qwen2", "qwen3", "gemma3"] {
        let mut lm = load(family);
        let trainable = lora(&mut lm);
        let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
        let want = autograd_loss_and_grads(&lm, &unpacked, n, &vars, &Device::Cpu, false).unwrap();
        let cpu_pass = unsupported_reason(&lm).is_none();
        assert_eq!(cpu_pass, matches!(family, "llama" | "qwen2"), "{family}");
        // batch_loss_and_grads is the hand-written CPU pass where it covers the model.
        let paths: [(&str, Pass); 2] = [
            ("autograd", autograd_loss_and_grads),
            (
                if cpu_pass { "cpu" } else { "default" },
                batch_loss_and_grads,
            ),
        ];
        for (path, run) in paths {
            for checkpointing in [false, true] {
                let case = format!("{family}, {path}, checkpointing {checkpointing}");
                let got = run(&lm, &packed, n, &vars, &Device::Cpu, checkpointing).unwrap();
                assert_same(
                    &format!("{case}, packed"),
                    &trainable,
                    (want.0, &want.1),
                    (got.0, &got.1),
                );
                let plain = run(&lm, &unpacked, n, &vars, &Device::Cpu, checkpointing).unwrap();
                assert_same(
                    &format!("{case}, unpacked"),
                    &trainable,
                    (want.0, &want.1),
                    (plain.0, &plain.1),
                );
            }
        }
    }
}

#[test]
fn without_the_document_mask_a_packed_row_would_differ() {
    // The same ids in one row as one document: the later examples then see the earlier ones
    // and sit at later positions, so the loss changes (the test above is not vacuous).
    let (packed, _) = batches();
    let n = packed.targets.len() as f64;
    let mut lm = load("llama");
    let trainable = lora(&mut lm);
    let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
    let run = |batch: &PaddedBatch| {
        batch_loss_and_grads(&lm, batch, n, &vars, &Device::Cpu, false)
            .unwrap()
            .0
    };
    let one_document = PaddedBatch {
        doc_starts: None,
        ..packed.clone()
    };
    let (kept_apart, mixed) = (run(&packed), run(&one_document));
    assert!(
        (kept_apart - mixed).abs() > 1e-4 * kept_apart.abs(),
        "{kept_apart} vs {mixed}"
    );
}
