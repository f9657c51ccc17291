//! AdamW with decoupled weight decay (Loshchilov & Hutter), its moments kept by parameter name
//! so that a checkpoint can save and restore them; learning-rate schedules with warmup.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

use crate::config::{OptimizerSettings, Schedule};

/// A trainable parameter and its optimizer state.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
    /// Weight decay applies to matrices, not to norms and biases (as HF's trainer).
    pub decay: bool,
}

#[derive(Debug)]
pub struct AdamW {
    pub settings: OptimizerSettings,
    pub params: Vec<Param>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    pub fn new(settings: OptimizerSettings, vars: Vec<(String, Var)>) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Param {
                    decay: var.as_tensor().rank() >= 2,
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            settings,
            params,
            step: 0,
        })
    }

    /// One update with `grads` (by parameter index, f32, already averaged) at learning rate `lr`.
    pub fn apply(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let s = &self.settings;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - s.beta1.powi(t), 1.0 - s.beta2.powi(t));
        for (param, grad) in self.params.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            param.m = ((&param.m * s.beta1)? + (grad * (1.0 - s.beta1))?)?;
            param.v = ((&param.v * s.beta2)? + (grad.sqr()? * (1.0 - s.beta2))?)?;
            let m_hat = (&param.m / c1)?;
            let v_hat = (&param.v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
            let current = param.var.as_tensor().to_dtype(DType::F32)?;
            let decayed = if param.decay && s.weight_decay > 0.0 {
                (&current * (1.0 - lr * s.weight_decay))?
            } else {
                current
            };
            let next = (decayed - (update * lr)?)?;
            param.var.set(&next.to_dtype(param.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`), for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.clone());
            out.insert(format!("v.{}", p.name), p.v.clone());
        }
        out
    }

    /// Restore moments saved by [`Self::state_tensors`]; every parameter must be there.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: usize,
    ) -> std::result::Result<(), String> {
        for p in &mut self.params {
            for (key, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let name = format!("{key}.{}", p.name);
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| format!("optimizer state lacks `{name}`"))?;
                if t.dims() != slot.dims() {
                    return Err(format!(
                        "optimizer state `{name}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        slot.dims()
                    ));
                }
                *slot = t.to_dtype(DType::F32).map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(settings: &OptimizerSettings, step: usize, total: usize) -> f64 {
    let peak = settings.learning_rate;
    let warmup = settings.warmup_steps;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match settings.schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for grad in grads.iter().flatten() {
        total += grad.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for grad in grads.iter_mut().flatten() {
            *grad = (&*grad * factor)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_warm_up_then_decay() {
        let mut s = OptimizerSettings {
            learning_rate: 1.0,
            warmup_steps: 2,
            ..OptimizerSettings::default()
        };
        assert_eq!(learning_rate(&s, 0, 10), 0.5);
        assert_eq!(learning_rate(&s, 1, 10), 1.0);
        assert_eq!(learning_rate(&s, 2, 10), 1.0);
        assert!(learning_rate(&s, 9, 10) < 0.05);
        s.schedule = Schedule::Linear;
        assert!((learning_rate(&s, 6, 10) - 0.5).abs() < 1e-12);
        s.schedule = Schedule::Constant;
        assert_eq!(learning_rate(&s, 9, 10), 1.0);
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step_and_decays_decoupled() -> Result<()> {
        let var = Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &Device::Cpu)?)?;
        let settings = OptimizerSettings {
            weight_decay: 0.1,
            ..OptimizerSettings::default()
        };
        let mut opt = AdamW::new(settings, vec![("w".into(), var.clone())])?;
        let grad = Tensor::new(&[[0.5f32, -0.25]], &Device::Cpu)?;
        opt.apply(&[Some(grad)], 0.1)?;
        // First step: m̂ = g, v̂ = g², update = sign(g) (up to eps); decay 1 - 0.1·0.1.
        let got: Vec<Vec<f32>> = var.as_tensor().to_vec2()?;
        assert!((got[0][0] - (1.0 * 0.99 - 0.1)).abs() < 1e-5, "{got:?}");
        assert!((got[0][1] - (-2.0 * 0.99 + 0.1)).abs() < 1e-5, "{got:?}");
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let mut grads = vec![
            Some(Tensor::new(&[3f32], &Device::Cpu)?),
            None,
            Some(Tensor::new(&[4f32], &Device::Cpu)?),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let after = clip_grad_norm(&mut grads, 0.0)?;
        assert!((after - 1.0).abs() < 1e-4);
        Ok(())
    }
}
