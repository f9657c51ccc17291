//! Gradient checkpointing: the forward pass keeps only each layer's input; the backward pass
//! recomputes one layer at a time and pushes the gradient through it, so activation memory is
//! one layer's instead of all of them, for one extra forward pass.
//!
//! Each layer's backward is the backward of `Σ layer(x) · g` with `x` a fresh variable: its
//! gradient is `g` pulled back through the layer (for the layer below), and the gradients of
//! the layer's trainable tensors come out of the same pass.

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, Var};

use crate::layers::{Embedding, Mode};
use crate::transformer::{CausalLm, ForwardOptions};

/// What the forward pass kept for the backward pass.
#[derive(Debug)]
pub struct Recompute {
    ids: Tensor,
    /// Packed rows' document starts (see `ForwardOptions::doc_starts`).
    doc_starts: Option<Vec<u32>>,
    /// The input of every layer, then the input of the final norm; all detached.
    inputs: Vec<Tensor>,
    /// Where each layer's LoRA dropout masks started, so that its recomputation draws the
    /// same masks.
    dropout_positions: Vec<Option<u64>>,
}

impl CausalLm {
    /// ids (b, seq) → the final normed hidden states (b, seq, hidden), detached from any graph,
    /// and what [`Self::backward_recomputed`] needs. `doc_starts`: packed rows, as
    /// [`ForwardOptions::doc_starts`].
    pub fn hidden_states_recomputed(
        &self,
        ids: &Tensor,
        doc_starts: Option<&[u32]>,
    ) -> Result<(Tensor, Recompute)> {
        let (b, seq) = ids.dims2()?;
        let options = ForwardOptions {
            mode: Mode::Differentiable,
            doc_starts,
            ..ForwardOptions::default()
        };
        let step = self.step(b, seq, 0, &options, false)?;
        let mut inputs = Vec::with_capacity(self.layers.len() + 1);
        let mut xs = self.embed(ids)?.detach();
        let mut dropout_positions = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            inputs.push(xs.clone());
            dropout_positions.push(layer.lora_dropout().map(|d| d.position()));
            xs = layer.forward(&xs, &step, &mut None)?.detach();
        }
        inputs.push(xs.clone());
        let hidden = self.norm.forward(&xs, Mode::Differentiable)?.detach();
        Ok((
            hidden,
            Recompute {
                ids: ids.clone(),
                doc_starts: doc_starts.map(<[u32]>::to_vec),
                inputs,
                dropout_positions,
            },
        ))
    }

    /// Push `grad_hidden` (the loss's gradient on the hidden states returned by
    /// [`Self::hidden_states_recomputed`]) down through the network, handing each partial
    /// backward pass's gradients to `on_grads` (accumulate the trainable tensors' from it).
    pub fn backward_recomputed(
        &self,
        saved: &Recompute,
        grad_hidden: &Tensor,
        mut on_grads: impl FnMut(&GradStore) -> Result<()>,
    ) -> Result<()> {
        let (b, seq) = saved.ids.dims2()?;
        let options = ForwardOptions {
            mode: Mode::Differentiable,
            doc_starts: saved.doc_starts.as_deref(),
            ..ForwardOptions::default()
        };
        let step = self.step(b, seq, 0, &options, false)?;
        let Some((final_input, layer_inputs)) = saved.inputs.split_last() else {
            bail!("recompute: nothing was saved")
        };
        let pull_back = |input: &Tensor,
                         grad: &Tensor,
                         f: &dyn Fn(&Tensor) -> Result<Tensor>,
                         on_grads: &mut dyn FnMut(&GradStore) -> Result<()>|
         -> Result<Tensor> {
            let x = Var::from_tensor(input)?;
            let out = f(x.as_tensor())?;
            let store = (out * grad)?.sum_all()?.backward()?;
            on_grads(&store)?;
            match store.get(x.as_tensor()) {
                Some(g) => Ok(g.detach()),
                None => bail!("recompute: no gradient reached a layer's input"),
            }
        };
        let mut grad = pull_back(
            final_input,
            grad_hidden,
            &|x| self.norm.forward(x, Mode::Differentiable),
            &mut on_grads,
        )?;
        for ((layer, input), position) in self
            .layers
            .iter()
            .zip(layer_inputs)
            .zip(&saved.dropout_positions)
            .rev()
        {
            if let (Some(dropout), Some(position)) = (layer.lora_dropout(), position) {
                dropout.rewind(*position);
            }
            grad = pull_back(
                input,
                &grad,
                &|x| layer.forward(x, &step, &mut None),
                &mut on_grads,
            )?;
        }
        // Trainable embeddings (full fine-tuning) get theirs from one more pass.
        if matches!(&self.embed_tokens, Embedding::Dense(table) if table.is_variable()) {
            let store = (self.embed(&saved.ids)? * grad)?.sum_all()?.backward()?;
            on_grads(&store)?;
        }
        Ok(())
    }
}
