//! The f32 weights the hand-written training pass (`lora_train_cpu`) reads: dense tensors
//! borrowed in place, quantized bases (GGUF blocks, NF4) dequantized into one scratch buffer
//! that the pass reuses from layer to layer.

use std::cell::{RefCell, RefMut};

use candle_core::{bail, DType, Device, Result, Storage, StorageRef, Tensor};

use crate::layers::Linear;

/// A frozen dense f32 weight.
pub(crate) fn frozen_dense(linear: &Linear) -> bool {
    matches!(linear, Linear::Dense { weight, .. } if !weight.is_variable() && weight.dtype() == DType::F32)
}

/// A frozen f32 weight, or a quantized one (GGUF blocks, NF4) dequantized when used.
pub(crate) fn frozen_base(linear: &Linear) -> bool {
    frozen_dense(linear) || matches!(linear, Linear::Quantized { .. } | Linear::Nf4 { .. })
}

/// A base layer's (out, in) f32 weight: borrowed when dense, else dequantized into the
/// pass's scratch buffer (one layer's weight at a time, the buffer reused from layer to layer:
/// QLoRA never holds the model dense).
pub(crate) enum BaseWeight<'a> {
    Dense(Held<'a>),
    Dequantized(RefMut<'a, Vec<f32>>),
}

impl<'a> BaseWeight<'a> {
    pub(crate) fn new(base: &'a Linear, scratch: &'a RefCell<Vec<f32>>) -> Result<Self> {
        let scratch = || {
            scratch.try_borrow_mut().map_err(|_| {
                candle_core::Error::Msg(
                    "CPU training path: the dequantization scratch is in use".into(),
                )
            })
        };
        match base {
            Linear::Dense { weight, .. } => Ok(Self::Dense(Held::new(weight)?)),
            Linear::Nf4 { weight, .. } => {
                let mut buffer = scratch()?;
                let (out, inp) = weight.dims();
                buffer.resize(out * inp, 0.0);
                weight.dequantize_into(&mut buffer);
                Ok(Self::Dequantized(buffer))
            }
            Linear::Quantized { source, .. } => {
                let dense = source.dequantize(&Device::Cpu)?.flatten_all()?;
                let mut buffer = scratch()?;
                buffer.clear();
                buffer.extend(dense.to_vec1::<f32>()?);
                Ok(Self::Dequantized(buffer))
            }
            Linear::Lora(_) => bail!("CPU training path: a LoRA layer as a base"),
        }
    }

    pub(crate) fn get(&self) -> Result<&[f32]> {
        match self {
            Self::Dense(held) => held.get(),
            Self::Dequantized(buffer) => Ok(buffer),
        }
    }
}

/// A tensor's f32 data, borrowed for as long as the guard lives.
pub(crate) struct Held<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> Held<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("CPU training path: a non-contiguous weight")
        };
        Ok(Self {
            guard,
            start,
            len: end - start,
        })
    }

    pub(crate) fn get(&self) -> Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[self.start..self.start + self.len]),
            _ => bail!("CPU training path: a weight is not on the CPU"),
        }
    }
}
