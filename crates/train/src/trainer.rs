//! The training loop: batches from the token table, completion-only (or all-token) loss
//! computed on the scored positions only, gradient accumulation and clipping, AdamW with a
//! schedule, evaluation with early stopping, checkpoints that resume to the same curve.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, TensorId, Var};
use medcoder_models::layers::Mode;
use medcoder_models::lora_train_cpu::{self, ScoredBatch};
use medcoder_models::transformer::compute_pool;
use medcoder_models::{CausalLm, LoadedModel};
use medcoder_store::Store;
use serde::Serialize;

use crate::checkpoint::{list_checkpoints, restore, save_checkpoint, TrainerState};
use crate::config::TrainConfig;
use crate::data::{
    epoch_batches, examples_of_split, pack_batch, pad_batch, BatchPlan, BatchRows, Example,
    PaddedBatch,
};
use crate::metrics::{peak_rss_mib, MetricsLog, MetricsRecord};
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::trainable::{make_trainable, Trainable};
use crate::TrainError;

/// Logits are computed for at most this many (rows × vocab) elements at once.
const LOGITS_CHUNK_ELEMENTS: usize = 1 << 25;

/// What the loop reports as it goes (for progress bars and logs).
#[derive(Debug)]
pub enum TrainEvent<'a> {
    Started {
        total_steps: usize,
        start_step: usize,
        train_examples: usize,
        eval_examples: usize,
        trainable_parameters: usize,
    },
    Step(&'a MetricsRecord),
    Eval(&'a MetricsRecord),
    Checkpoint(&'a Path),
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub total_steps: usize,
    pub finished: String,
    pub last_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub first_eval_loss: Option<f64>,
    pub mean_tokens_per_s: Option<f64>,
    pub peak_rss_mib: f64,
    pub trainable_parameters: usize,
    /// Where the final weights (adapter or full) are.
    pub weights_dir: PathBuf,
}

/// A run: the model made trainable, its data, optimizer and state.
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    config_yaml: String,
    run_dir: PathBuf,
    lm: CausalLm,
    device: Device,
    pad_id: u32,
    trainable: Trainable,
    optimizer: AdamW,
    train: Vec<Example>,
    eval: Vec<Example>,
    state: TrainerState,
    /// The batches of one epoch (a pure function of the seed and the epoch), kept for the
    /// steps of that epoch.
    epoch_plan: Option<(usize, Vec<BatchRows>)>,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run_dir", &self.run_dir)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<'a> Trainer<'a> {
    /// Prepare a run in `run_dir`: a new one, or (with `resume`) the continuation of the last
    /// complete checkpoint there.
    pub fn new(
        config: &'a TrainConfig,
        model: LoadedModel,
        run_dir: &Path,
        resume: bool,
    ) -> Result<Self, TrainError> {
        let store = Store::open(&config.db)?;
        let tokens_model = config.tokens_model();
        let rows = store.token_rows(&config.dataset, tokens_model)?;
        if rows.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: no tokens of dataset `{}` for model `{tokens_model}`: run `medcoder prepare tokens --db {} --dataset {} --model {tokens_model}` first",
                config.db.display(),
                config.dataset,
                config.db.display(),
                config.dataset
            )));
        }
        let vocab = model.lm.spec().vocab_size;
        if let Some(row) = rows
            .iter()
            .find(|r| r.ids.iter().any(|&id| id as usize >= vocab))
        {
            return Err(TrainError::Data(format!(
                "example {} holds token ids beyond the model's vocabulary of {vocab}: the tokens were prepared for another tokenizer",
                row.doc_id
            )));
        }
        let (train, report) = examples_of_split(
            &rows,
            &config.train_split,
            config.max_len,
            config.overlong,
            config.loss_on,
        )?;
        if train.is_empty() {
            return Err(TrainError::Data(format!(
                "split `{}` of dataset `{}` has no trainable examples ({} rows, {} over max_len dropped, {} without targets)",
                config.train_split, config.dataset, report.rows, report.dropped_overlong, report.without_targets
            )));
        }
        tracing::info!(?report, split = %config.train_split, "training examples");
        let eval = match &config.eval_split {
            Some(split) => {
                let (mut eval, _) = examples_of_split(
                    &rows,
                    split,
                    config.max_len,
                    config.overlong,
                    config.loss_on,
                )?;
                if eval.is_empty() {
                    return Err(TrainError::Data(format!(
                        "evaluation split `{split}` of dataset `{}` has no examples: name another (eval_split) or none (eval_split: null)",
                        config.dataset
                    )));
                }
                if let Some(limit) = config.eval_examples {
                    eval.truncate(limit);
                }
                eval
            }
            None => Vec::new(),
        };
        let LoadedModel {
            mut lm,
            tokenizer,
            quantized,
            ..
        } = model;
        let pad_id = tokenizer
            .pad_token
            .as_deref()
            .or(tokenizer.eos_token.as_deref())
            .and_then(|t| tokenizer.token_to_id(t))
            .unwrap_or(0);
        let trainable = make_trainable(&mut lm, config, quantized)?;
        let mut optimizer = AdamW::new(config.optimizer.clone(), trainable.vars.clone())?;
        let device = lm.device().clone();
        let total_steps = match config.max_steps {
            Some(steps) => steps,
            // An optimizer step does not straddle two epochs; packed epochs may differ in
            // their number of batches.
            None => (0..config.epochs)
                .map(|epoch| {
                    epoch_batches(&train, &batch_plan(config), config.seed, epoch)
                        .len()
                        .div_ceil(config.grad_accum)
                })
                .sum(),
        }
        .max(1);
        fs_err::create_dir_all(run_dir)?;
        let config_yaml = config.to_yaml()?;
        let mut state = TrainerState {
            seed: config.seed,
            total_steps,
            ..TrainerState::default()
        };
        if resume {
            if let Some((_, dir)) = list_checkpoints(run_dir).pop() {
                state = restore(&dir, &trainable, &mut optimizer, &device)?;
                state.total_steps = total_steps;
                tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
            }
        }
        crate::atomic::write_file(&run_dir.join("config.yaml"), config_yaml.as_bytes())?;
        Ok(Self {
            config,
            config_yaml,
            run_dir: run_dir.to_path_buf(),
            lm,
            device,
            pad_id,
            trainable,
            optimizer,
            train,
            eval,
            state,
            epoch_plan: None,
        })
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The model being trained (with its adapters), e.g. to generate with after training.
    pub fn model(&self) -> &CausalLm {
        &self.lm
    }

    /// Train to the end (or to early stopping), checkpointing as configured.
    pub fn run(
        &mut self,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<TrainSummary, TrainError> {
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let resumed_at = (self.state.step > 0).then_some(self.state.step);
        let mut log = MetricsLog::open(&metrics_path, resumed_at)?;
        on_event(TrainEvent::Started {
            total_steps: self.state.total_steps,
            start_step: self.state.step,
            train_examples: self.train.len(),
            eval_examples: self.eval.len(),
            trainable_parameters: self.trainable.trainable_parameters,
        });
        if self.state.step == 0 && !self.eval.is_empty() {
            let record = self.evaluate_record()?;
            log.append(&record)?;
            on_event(TrainEvent::Eval(&record));
        }
        let mut last_loss = None;
        let mut finished = self.state.finished.clone();
        while finished.is_none() {
            if self.state.step >= self.state.total_steps {
                finished = Some(
                    if self.config.max_steps.is_some() {
                        "max_steps"
                    } else {
                        "epochs"
                    }
                    .into(),
                );
                break;
            }
            let Some(micro) = self.next_micro_batches() else {
                finished = Some("epochs".into());
                break;
            };
            let record = self.train_step(&micro)?;
            last_loss = record.loss;
            log.append(&record)?;
            on_event(TrainEvent::Step(&record));
            let step = self.state.step;
            let at_end = step >= self.state.total_steps;
            if !self.eval.is_empty() && (step.is_multiple_of(self.config.eval_every) || at_end) {
                let record = self.evaluate_record()?;
                log.append(&record)?;
                on_event(TrainEvent::Eval(&record));
                if let Some(patience) = self.config.early_stopping_patience {
                    if self.state.evals_without_improvement >= patience {
                        finished = Some("early_stopping".into());
                    }
                }
            }
            if step.is_multiple_of(self.config.save_every) || at_end || finished.is_some() {
                self.state.finished = finished.clone();
                let dir = self.checkpoint()?;
                on_event(TrainEvent::Checkpoint(&dir));
                self.plot(&metrics_path);
            }
        }
        let finished = finished.unwrap_or_else(|| "epochs".into());
        if self.state.finished.as_deref() != Some(finished.as_str()) {
            self.state.finished = Some(finished.clone());
            let dir = self.checkpoint()?;
            on_event(TrainEvent::Checkpoint(&dir));
        }
        self.plot(&metrics_path);
        let weights_dir = self.publish_final_weights()?;
        let records = crate::metrics::read_metrics(&metrics_path)?;
        let speeds: Vec<f64> = records.iter().filter_map(|r| r.tokens_per_s).collect();
        let summary = TrainSummary {
            run_dir: self.run_dir.clone(),
            steps: self.state.step,
            total_steps: self.state.total_steps,
            finished,
            last_loss: last_loss.or_else(|| records.iter().rev().find_map(|r| r.loss)),
            best_eval_loss: self.state.best_eval_loss,
            best_step: self.state.best_step,
            first_eval_loss: records.iter().find_map(|r| r.eval_loss),
            mean_tokens_per_s: (!speeds.is_empty())
                .then(|| speeds.iter().sum::<f64>() / speeds.len() as f64),
            peak_rss_mib: peak_rss_mib(),
            trainable_parameters: self.trainable.trainable_parameters,
            weights_dir,
        };
        let json = serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?;
        crate::atomic::write_file(&self.run_dir.join("train_summary.json"), json.as_bytes())?;
        Ok(summary)
    }

    fn plot(&self, metrics_path: &Path) {
        let result = crate::metrics::read_metrics(metrics_path)
            .and_then(|records| crate::plot_loss_curves(&records, &self.run_dir.join("loss.png")));
        if let Err(error) = result {
            tracing::warn!(%error, "could not draw the loss plot");
        }
    }

    /// The micro-batches of the next optimizer step, advancing the data cursor; `None` when
    /// the epochs are done (without `max_steps`, which cycles through epochs).
    fn next_micro_batches(&mut self) -> Option<Vec<BatchRows>> {
        let mut micro = Vec::new();
        while micro.len() < self.config.grad_accum {
            let in_epoch = self.epoch_batches().len();
            if self.state.batch_in_epoch >= in_epoch {
                if self.config.max_steps.is_none() && self.state.epoch + 1 >= self.config.epochs {
                    break;
                }
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                if !micro.is_empty() {
                    // An optimizer step does not straddle two epochs.
                    break;
                }
            }
            let index = self.state.batch_in_epoch;
            micro.push(self.epoch_batches()[index].clone());
            self.state.batch_in_epoch += 1;
        }
        (!micro.is_empty()).then_some(micro)
    }

    /// The batches of the current epoch, planned once per epoch.
    fn epoch_batches(&mut self) -> &[BatchRows] {
        let epoch = self.state.epoch;
        if self.epoch_plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let plan = batch_plan(self.config);
            let batches = epoch_batches(&self.train, &plan, self.config.seed, epoch);
            self.epoch_plan = Some((epoch, batches));
        }
        self.epoch_plan.as_ref().map_or(&[], |(_, b)| b.as_slice())
    }

    fn train_step(&mut self, micro: &[BatchRows]) -> Result<MetricsRecord, TrainError> {
        let started = Instant::now();
        let loss_on = self.config.loss_on;
        let batches: Vec<PaddedBatch> = micro
            .iter()
            .map(|rows| {
                let rows: Vec<Vec<&Example>> = rows
                    .iter()
                    .map(|row| row.iter().map(|&i| &self.train[i]).collect())
                    .collect();
                if self.config.packing {
                    pack_batch(&rows, self.pad_id, loss_on)
                } else {
                    pad_batch(&rows.concat(), self.pad_id, loss_on)
                }
            })
            .collect();
        let total_targets: usize = batches.iter().map(|b| b.targets.len()).sum();
        let real_tokens: usize = micro
            .iter()
            .flatten()
            .flatten()
            .map(|&i| self.train[i].ids.len())
            .sum();
        let vars: Vec<Var> = self.trainable.vars.iter().map(|(_, v)| v.clone()).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        if let Some(dropout) = &self.trainable.dropout {
            dropout.set_active(true);
        }
        for (i, batch) in batches.iter().enumerate() {
            if let Some(dropout) = &self.trainable.dropout {
                dropout.reseed(self.config.seed ^ ((self.state.step as u64) << 16 | i as u64));
            }
            let run = || {
                batch_loss_and_grads(
                    &self.lm,
                    batch,
                    total_targets as f64,
                    &vars,
                    &self.device,
                    self.config.gradient_checkpointing,
                )
            };
            let (sum, batch_grads) = match compute_pool() {
                Some(pool) => pool.install(run)?,
                None => run()?,
            };
            loss_sum += sum;
            for (slot, grad) in grads.iter_mut().zip(batch_grads) {
                *slot = match (slot.take(), grad) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        if let Some(dropout) = &self.trainable.dropout {
            dropout.set_active(false);
        }
        let loss = loss_sum / total_targets.max(1) as f64;
        if !loss.is_finite() {
            let checkpoint = list_checkpoints(&self.run_dir)
                .pop()
                .map_or_else(|| "none yet".into(), |(_, p)| p.display().to_string());
            return Err(TrainError::NonFiniteLoss {
                step: self.state.step + 1,
                loss,
                checkpoint,
            });
        }
        let grad_norm = clip_grad_norm(&mut grads, self.config.optimizer.max_grad_norm)?;
        let lr = learning_rate(
            &self.config.optimizer,
            self.state.step,
            self.state.total_steps,
        );
        self.optimizer.apply(&grads, lr)?;
        self.state.step += 1;
        self.state.tokens_seen += total_targets as u64;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(MetricsRecord {
            step: self.state.step,
            epoch: self.state.epoch,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens_per_s: Some(real_tokens as f64 / elapsed.max(1e-9)),
            target_tokens: Some(total_targets as u64),
            step_s: Some(elapsed),
            peak_rss_mib: peak_rss_mib(),
            ..MetricsRecord::default()
        })
    }

    /// Mean loss per target token over the evaluation examples.
    pub fn evaluate(&self) -> Result<f64, TrainError> {
        let _no_grad = medcoder_models::autograd::no_grad();
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in self.eval.chunks(self.config.batch_size) {
            let examples: Vec<&Example> = chunk.iter().collect();
            let batch = pad_batch(&examples, self.pad_id, self.config.loss_on);
            let run = || -> Result<f64, TrainError> {
                let ids =
                    Tensor::from_vec(batch.ids.clone(), (batch.rows, batch.len), &self.device)?;
                let hidden = self.lm.hidden_states(&ids, Mode::Inference)?;
                let selected = select_positions(&hidden, &batch.positions, &self.device)?;
                let mut total = 0f64;
                for (start, len) in logit_chunks(batch.targets.len(), self.lm.spec().vocab_size) {
                    let logits = self
                        .lm
                        .logits_from_hidden(&selected.narrow(0, start, len)?)?;
                    let targets = &batch.targets[start..start + len];
                    total += cross_entropy_sum(&logits, targets, &self.device)?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                }
                Ok(total)
            };
            sum += match compute_pool() {
                Some(pool) => pool.install(run)?,
                None => run()?,
            };
            count += batch.targets.len();
        }
        Ok(sum / count.max(1) as f64)
    }

    fn evaluate_record(&mut self) -> Result<MetricsRecord, TrainError> {
        let eval_loss = self.evaluate()?;
        if !eval_loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: self.state.step,
                loss: eval_loss,
                checkpoint: list_checkpoints(&self.run_dir)
                    .pop()
                    .map_or_else(|| "none yet".into(), |(_, p)| p.display().to_string()),
            });
        }
        let improved = self
            .state
            .best_eval_loss
            .is_none_or(|best| eval_loss < best);
        if improved {
            self.state.best_eval_loss = Some(eval_loss);
            self.state.best_step = Some(self.state.step);
            self.state.evals_without_improvement = 0;
        } else {
            self.state.evals_without_improvement += 1;
        }
        Ok(MetricsRecord {
            step: self.state.step,
            epoch: self.state.epoch,
            eval_loss: Some(eval_loss),
            peak_rss_mib: peak_rss_mib(),
            ..MetricsRecord::default()
        })
    }

    fn checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        save_checkpoint(
            &self.run_dir,
            &self.state,
            &self.trainable,
            &self.optimizer,
            &self.config_yaml,
            self.config.keep_last,
        )
    }

    /// The final weights in the run folder itself (as PEFT's `save_pretrained` lays out an
    /// adapter): those of the best evaluation when there was one (and its checkpoint is
    /// kept), else the last.
    fn publish_final_weights(&self) -> Result<PathBuf, TrainError> {
        let best = self.state.best_step.filter(|&s| s > 0).and_then(|step| {
            list_checkpoints(&self.run_dir)
                .into_iter()
                .find(|(s, _)| *s == step)
                .map(|(_, p)| p)
        });
        match best {
            Some(dir) if self.state.best_step != Some(self.state.step) => {
                for name in [
                    "adapter_model.safetensors",
                    "adapter_config.json",
                    "model.safetensors",
                ] {
                    let from = dir.join(name);
                    if from.is_file() {
                        crate::atomic::write_file(&self.run_dir.join(name), &fs_err::read(&from)?)?;
                    }
                }
            }
            _ => self.trainable.save(&self.run_dir)?,
        }
        Ok(self.run_dir.clone())
    }
}

fn batch_plan(config: &TrainConfig) -> BatchPlan {
    BatchPlan {
        batch_size: config.batch_size,
        bucket_by_length: config.bucket_by_length,
        pack_to: config.packing.then_some(config.max_len),
    }
}

/// (start, len) chunks of `rows` so that no chunk's logits exceed the element budget.
fn logit_chunks(rows: usize, vocab: usize) -> Vec<(usize, usize)> {
    let per = (LOGITS_CHUNK_ELEMENTS / vocab.max(1)).max(1);
    (0..rows)
        .step_by(per)
        .map(|s| (s, per.min(rows - s)))
        .collect()
}

/// hidden (b, len, h) → the rows at flat positions (n, h)
fn select_positions(
    hidden: &Tensor,
    positions: &[u32],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (b, len, h) = hidden.dims3()?;
    let index = Tensor::from_vec(positions.to_vec(), positions.len(), device)?;
    hidden.reshape((b * len, h))?.index_select(&index, 0)
}

/// Σ −log p(target) over the rows of `logits` (n, vocab) (fused, with its backward).
fn cross_entropy_sum(
    logits: &Tensor,
    targets: &[u32],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let targets = Tensor::from_vec(targets.to_vec(), targets.len(), device)?;
    medcoder_models::autograd::cross_entropy_sum(logits, &targets)
}

/// The loss of one micro-batch (Σ over its targets, not divided) and its gradients scaled by
/// `1 / total_targets` of the whole step. Logits are computed in chunks of the scored
/// positions on a detached copy of the hidden states, so that (rows × vocab) logits never
/// exist at once; the hidden states' gradient is then pushed through the network: in one
/// backward pass of `Σ hidden · grad`, or layer by layer with recomputation (`checkpointing`,
/// which keeps one layer's activations at a time).
pub fn batch_loss_and_grads(
    lm: &CausalLm,
    batch: &PaddedBatch,
    total_targets: f64,
    vars: &[Var],
    device: &Device,
    checkpointing: bool,
) -> Result<(f64, Vec<Option<Tensor>>), TrainError> {
    if lora_train_cpu::unsupported_reason(lm).is_none() {
        // The hand-written CPU pass: same gradients, no autograd graph.
        let scored = ScoredBatch {
            ids: &batch.ids,
            rows: batch.rows,
            len: batch.len,
            positions: &batch.positions,
            targets: &batch.targets,
            doc_starts: batch.doc_starts.as_deref(),
        };
        let out = lora_train_cpu::loss_and_grads(lm, &scored, total_targets, checkpointing)?;
        let mut by_id: HashMap<TensorId, Tensor> = out.grads.into_iter().collect();
        let grads = vars
            .iter()
            .map(|var| by_id.remove(&var.as_tensor().id()))
            .collect();
        return Ok((out.loss_sum, grads));
    }
    autograd_loss_and_grads(lm, batch, total_targets, vars, device, checkpointing)
}

/// [`batch_loss_and_grads`] through candle's autograd: every family, dtype and device, and
/// full fine-tuning.
pub fn autograd_loss_and_grads(
    lm: &CausalLm,
    batch: &PaddedBatch,
    total_targets: f64,
    vars: &[Var],
    device: &Device,
    checkpointing: bool,
) -> Result<(f64, Vec<Option<Tensor>>), TrainError> {
    let ids = Tensor::from_vec(batch.ids.clone(), (batch.rows, batch.len), device)?;
    let (graph, saved) = if checkpointing {
        let (hidden, saved) = lm.hidden_states_recomputed(&ids, batch.doc_starts.as_deref())?;
        (hidden, Some(saved))
    } else {
        let doc_starts = batch.doc_starts.as_deref();
        (
            lm.hidden_states_packed(&ids, Mode::Differentiable, doc_starts)?,
            None,
        )
    };
    let (b, len, h) = graph.dims3()?;
    let detached = Var::from_tensor(&graph.detach().reshape((b * len, h))?)?;
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut hidden_grad: Option<Tensor> = None;
    let mut loss_sum = 0f64;
    let add = |grads: &mut Vec<Option<Tensor>>,
               store: &candle_core::backprop::GradStore|
     -> candle_core::Result<()> {
        for (slot, var) in grads.iter_mut().zip(vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    };
    for (start, count) in logit_chunks(batch.targets.len(), lm.spec().vocab_size) {
        let index = Tensor::from_vec(
            batch.positions[start..start + count].to_vec(),
            count,
            device,
        )?;
        let part = detached.as_tensor().index_select(&index, 0)?;
        let logits = lm.logits_from_hidden(&part)?;
        let sum = cross_entropy_sum(&logits, &batch.targets[start..start + count], device)?;
        loss_sum += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = (sum / total_targets)?.backward()?;
        add(&mut grads, &store)?;
        if let Some(g) = store.get(detached.as_tensor()) {
            hidden_grad = Some(match hidden_grad {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            });
        }
    }
    let Some(hidden_grad) = hidden_grad else {
        return Ok((loss_sum, grads));
    };
    let hidden_grad = hidden_grad
        .reshape((b, len, h))?
        .to_dtype(graph.dtype())?
        .detach();
    match saved {
        Some(saved) => {
            lm.backward_recomputed(&saved, &hidden_grad, |store| add(&mut grads, store))?
        }
        None => {
            let store = (graph * hidden_grad)?.sum_all()?.backward()?;
            add(&mut grads, &store)?;
        }
    }
    Ok((loss_sum, grads))
}
