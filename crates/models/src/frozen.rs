//! Frozen linear layers on the training path. Candle's matmul backward computes the gradient
//! of both operands, so a frozen weight would still cost a full matmul per layer in every
//! backward pass; these ops pass the gradient to the input only (`dx = dy · W`), which is all
//! LoRA and QLoRA need. Quantized weights are dequantized for the backward product only.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
};

use crate::qmatmul_cpu::CpuQMatMul;

/// `x (m, k) · Wᵀ` with `W` (n, k) dense and frozen.
#[derive(Debug)]
pub(crate) struct FrozenDenseMatMul {
    pub weight: Tensor,
}

impl FrozenDenseMatMul {
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, wk) = self.weight.dims2()?;
        if k != wk {
            bail!("frozen linear: input width {k} does not match the weight's {wk}")
        }
        Ok((m, n, k))
    }
}

impl CustomOp1 for FrozenDenseMatMul {
    fn name(&self) -> &'static str {
        "frozen-dense-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        let weight_t = self.weight.t()?;
        let (guard, weight_layout) = weight_t.storage_and_layout();
        let Storage::Cpu(weight) = &*guard else {
            bail!("frozen linear: the weight is not on the CPU")
        };
        let out = storage.matmul(weight, (1, m, n, k), layout, weight_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        let weight_t = self.weight.t()?;
        let (guard, weight_layout) = weight_t.storage_and_layout();
        let Storage::Cuda(weight) = &*guard else {
            bail!("frozen linear: the weight is not on the CUDA device")
        };
        let out = storage.matmul(weight, (1, m, n, k), layout, weight_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // (m, n) · (n, k) → (m, k)
        Ok(Some(
            grad_res.matmul(&self.weight.to_dtype(grad_res.dtype())?)?,
        ))
    }
}

/// `x (m, k) · Wᵀ` with `W` quantized and frozen (QLoRA's base).
#[derive(Debug)]
pub(crate) struct FrozenQuantizedMatMul {
    pub source: Arc<QTensor>,
    pub cpu_kernel: Option<Arc<CpuQMatMul>>,
}

impl CustomOp1 for FrozenQuantizedMatMul {
    fn name(&self) -> &'static str {
        "frozen-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match &self.cpu_kernel {
            Some(kernel) if storage.dtype() == DType::F32 => kernel.cpu_fwd(storage, layout),
            _ => self.source.cpu_fwd(storage, layout),
        }
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.source.cuda_fwd(storage, layout)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let weight = self
            .source
            .dequantize(grad_res.device())?
            .to_dtype(grad_res.dtype())?;
        Ok(Some(grad_res.matmul(&weight)?))
    }
}

/// Apply a frozen 2-D op to `xs` (.., k) → (.., n).
pub(crate) fn apply_flattened(
    xs: &Tensor,
    op: impl CustomOp1 + Send + Sync + 'static,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("frozen linear: a scalar input")
    };
    let m: usize = lead.iter().product();
    let ys = xs.contiguous()?.reshape((m, k))?.apply_op1(op)?;
    let n = ys.dim(1)?;
    let mut out = lead.to_vec();
    out.push(n);
    ys.reshape(out)
}
