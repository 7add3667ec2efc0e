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

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// Linear warmup, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine down to 0 (transformers' get_cosine_schedule_with_warmup).
    Cosine,
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
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
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

    /// Global L2 norm of all gradient tensors.
    pub fn grad_norm(grads: &Lora) -> f32 {
        let mut sum = 0f64;
        let mut g = grads.clone();
        g.for_each_mut(|_, _, t| sum += t.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>());
        sum.sqrt() as f32
    }

    /// Clips `grads` in place, updates `params`; the caller zeroes `grads` afterwards.
    pub fn step(&mut self, params: &mut Lora, grads: &mut Lora) -> StepInfo {
        let c = self.config.clone();
        let norm = Self::grad_norm(grads);
        if let Some(max) = c.max_grad_norm {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                grads.for_each_mut(|_, _, t| t.iter_mut().for_each(|x| *x *= coef));
            }
        }
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - (c.beta1 as f64).powi(t);
        let bc2 = 1.0 - (c.beta2 as f64).powi(t);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        // Walk the four trees in step: params, grads, m, v share one shape.
        let mut flat_g = Vec::new();
        grads.for_each_mut(|_, _, g| flat_g.push(std::mem::take(g)));
        let mut flat_m = Vec::new();
        self.m
            .for_each_mut(|_, _, m| flat_m.push(std::mem::take(m)));
        let mut flat_v = Vec::new();
        self.v
            .for_each_mut(|_, _, v| flat_v.push(std::mem::take(v)));
        let mut k = 0;
        params.for_each_mut(|_, _, p| {
            let (g, m, v) = (&flat_g[k], &mut flat_m[k], &mut flat_v[k]);
            for j in 0..p.len() {
                p[j] *= 1.0 - lr * c.weight_decay;
                m[j] = c.beta1 * m[j] + (1.0 - c.beta1) * g[j];
                v[j] = c.beta2 * v[j] + (1.0 - c.beta2) * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + c.eps;
                p[j] -= step_size * m[j] / denom;
            }
            k += 1;
        });
        let mut it = flat_g.into_iter();
        grads.for_each_mut(|_, _, g| *g = it.next().expect("same shapes"));
        let mut it = flat_m.into_iter();
        self.m
            .for_each_mut(|_, _, m| *m = it.next().expect("same shapes"));
        let mut it = flat_v.into_iter();
        self.v
            .for_each_mut(|_, _, v| *v = it.next().expect("same shapes"));
        StepInfo {
            lr,
            grad_norm: norm,
        }
    }
}
