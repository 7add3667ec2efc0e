//! AdamW with PyTorch's semantics (`torch.optim.AdamW`), transformers' learning-rate schedules
//! and `torch.nn.utils.clip_grad_norm_`, over a [`Lora`]'s tensors.
//!
//! One step, for every parameter p with gradient g (t = step number from 1):
//! ```text
//! p -= lr * weight_decay * p                     (decoupled decay, applied first)
//! m  = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
//! p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! Clipping: `norm = sqrt(sum g^2)` over all tensors; if norm > max, g *= max / (norm + 1e-6).

use crate::lora::Lora;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Linear warmup, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine down to 0 (transformers' get_cosine_schedule_with_warmup).
    Cosine,
}

/// "constant", "linear" or "cosine", as the CLI and the page name them.
impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Schedule, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(format!(
                "unknown schedule \"{s}\"; use \"cosine\", \"linear\" or \"constant\""
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clipping (None: off).
    pub max_grad_norm: Option<f32>,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            total_steps: 1,
        }
    }
}

impl AdamWConfig {
    /// The learning rate of optimizer step `step` (0-based), as transformers' LambdaLR gives it:
    /// warmup `step / warmup`, then the schedule's decay over the remaining steps.
    pub fn lr_at(&self, step: usize) -> f32 {
        let factor = if step < self.warmup_steps {
            step as f64 / self.warmup_steps.max(1) as f64
        } else {
            let rest = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
            let progress = (step - self.warmup_steps) as f64 / rest;
            match self.schedule {
                Schedule::Constant => 1.0,
                Schedule::Linear => (1.0 - progress).max(0.0),
                Schedule::Cosine => {
                    (0.5 * (1.0 + libm::cos(std::f64::consts::PI * progress))).max(0.0)
                }
            }
        };
        (self.lr as f64 * factor) as f32
    }
}

/// Optimizer state: first and second moments and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Lora,
    pub v: Lora,
    pub step: usize, // optimizer steps taken
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    pub lr: f32,
    /// The gradient norm before clipping.
    pub grad_norm: f32,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &Lora) -> AdamW {
        AdamW {
            config,
            m: params.zeros_like(),
            v: params.zeros_like(),
            step: 0,
        }
    }

    /// Global L2 norm of all gradient tensors: each tensor's sum of squares in f64 in order,
    /// the tensors' sums added in order (tensors on separate threads; the same bits on any
    /// number of them).
    pub fn grad_norm(grads: &Lora) -> f32 {
        use rayon::prelude::*;
        let tensors: Vec<&Vec<f32>> = grads.tensors().collect();
        let sums: Vec<f64> = tensors
            .par_iter()
            .map(|t| t.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        let mut sum = 0f64;
        for s in sums {
            sum += s;
        }
        sum.sqrt() as f32
    }

    /// Clips `grads` in place, updates `params`; the caller zeroes `grads` afterwards.
    pub fn step(&mut self, params: &mut Lora, grads: &mut Lora) -> StepInfo {
        let norm = Self::grad_norm(grads);
        let s = AdamWScalars::new(&self.config, self.step, norm);
        self.step += 1;
        adamw_update(&s, params, grads, &mut self.m, &mut self.v);
        StepInfo {
            lr: s.lr,
            grad_norm: norm,
        }
    }
}

/// The scalars of one AdamW step: the learning rate of optimizer step `step`, the bias
/// corrections (in f64, as PyTorch) and the clipping factor. Every backend's update takes them
/// from here ([`adamw_update`] on the CPU, the `adamw` kernel on the GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bc2_sqrt: f32,
    /// Clipping factor on the gradients (1: none), `max / (norm + 1e-6)` when below 1.
    pub coef: f32,
}

impl AdamWScalars {
    /// For optimizer step `step` (0-based: the number of steps taken before this one) with
    /// global gradient norm `grad_norm` (before clipping).
    pub fn new(config: &AdamWConfig, step: usize, grad_norm: f32) -> AdamWScalars {
        let coef = match config.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = config.lr_at(step);
        let t = (step + 1) as i32;
        let bc1 = 1.0 - (config.beta1 as f64).powi(t);
        let bc2 = 1.0 - (config.beta2 as f64).powi(t);
        AdamWScalars {
            lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            step_size: (lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            coef,
        }
    }
}

/// One AdamW update of `params` with `grads` (clipped in place by `s.coef` when it is below
/// 1) and the moments `m`, `v`; all four share one shape.
pub fn adamw_update(
    s: &AdamWScalars,
    params: &mut Lora,
    grads: &mut Lora,
    m: &mut Lora,
    v: &mut Lora,
) {
    use rayon::prelude::*;
    let n = params.tensors().count();
    assert!(
        [
            grads.tensors().count(),
            m.tensors().count(),
            v.tensors().count()
        ] == [n; 3],
        "adamw_update: the adapter, gradients and moments hold different tensors"
    );
    // Walk the four trees in step; tensors on separate threads (each element's arithmetic is
    // its own, so the bits do not depend on the threads).
    let mut work: Vec<_> = params
        .tensors_mut()
        .zip(grads.tensors_mut())
        .zip(m.tensors_mut().zip(v.tensors_mut()))
        .collect();
    work.par_iter_mut().for_each(|((p, g), (m, v))| {
        assert!(
            g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
            "adamw_update: the adapter, gradients and moments differ in shape"
        );
        for j in 0..p.len() {
            if s.coef < 1.0 {
                g[j] *= s.coef;
            }
            p[j] *= 1.0 - s.lr * s.weight_decay;
            m[j] = s.beta1 * m[j] + (1.0 - s.beta1) * g[j];
            v[j] = s.beta2 * v[j] + (1.0 - s.beta2) * g[j] * g[j];
            let denom = v[j].sqrt() / s.bc2_sqrt + s.eps;
            p[j] -= s.step_size * m[j] / denom;
        }
    });
}
