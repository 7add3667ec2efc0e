//! LoRA adapters with PEFT's semantics: `y = BitLinear(x) + scale * B(A(dropout(x)))` on the
//! float input x, `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA), A (R, I) initialised
//! kaiming-uniform with a = sqrt(5) as `nn.Linear` (so A ~ U(-1/sqrt(I), 1/sqrt(I))), B (O, R)
//! zero. The base weights stay frozen.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Proj, projections};
use crate::rng::Rng;

/// The seven projections LoRA can target, in `model::projections` order, with PEFT's names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    /// Which of [`TARGETS`] carry an adapter.
    pub targets: [bool; 7],
}

impl LoraConfig {
    /// A config from PEFT-style target names ("q_proj", ...; "all-linear" for all seven).
    pub fn new(
        r: usize,
        alpha: f32,
        dropout: f32,
        use_rslora: bool,
        targets: &[&str],
    ) -> Result<LoraConfig> {
        let bad = |msg: String| Error::Lora { msg };
        if r == 0 {
            return Err(bad("rank r must be at least 1".into()));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(bad(format!("lora_alpha is {alpha}; it must be positive")));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(bad(format!(
                "lora_dropout is {dropout}; it must be in [0, 1)"
            )));
        }
        let mut on = [false; 7];
        for &t in targets {
            if t == "all-linear" {
                on = [true; 7];
                continue;
            }
            let Some(i) = TARGETS.iter().position(|&n| n == t) else {
                return Err(bad(format!(
                    "unknown target module \"{t}\"; choose from {}, or all-linear",
                    TARGETS.join(", ")
                )));
            };
            on[i] = true;
        }
        if !on.contains(&true) {
            return Err(bad("no target modules given".into()));
        }
        Ok(LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            targets: on,
        })
    }

    /// The largest rank that means anything on `model` for these targets: the smallest side
    /// of an adapted projection (a pair's B A has rank at most min(O, I), so a larger r only
    /// adds parameters). A new run's rank and a checkpoint's are checked against it before any
    /// adapter is allocated.
    pub fn max_rank(&self, model: &Config) -> usize {
        Proj::ALL
            .into_iter()
            .filter(|&p| self.targets[p])
            .map(|p| {
                let (o, i) = p.shape(model);
                o.min(i)
            })
            .min()
            .unwrap_or(0)
    }

    /// Fails unless `r` is at most [`LoraConfig::max_rank`] for `model`.
    pub fn check_rank(&self, model: &Config) -> Result<()> {
        let max = self.max_rank(model);
        if self.r > max {
            return Err(Error::Lora {
                msg: format!(
                    "rank r is {}; on this model the adapted projections allow at most {max} (the smallest side of an adapted weight)",
                    self.r
                ),
            });
        }
        Ok(())
    }

    /// The factor on B(A(x)).
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// One adapter pair.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>, // (R, I)
    pub b: Vec<f32>, // (O, R)
}

/// Adapters for every layer; `layers[l][p]` is projection p (TARGETS order) of layer l.
/// The same type holds gradients and optimizer moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    pub config: LoraConfig,
    pub layers: Vec<[Option<LoraPair>; 7]>, // L x 7
}

impl Lora {
    /// PEFT's initialisation: A kaiming-uniform, B zero. Deterministic from `seed`.
    pub fn init(model: &Config, config: LoraConfig, seed: u64) -> Lora {
        let mut rng = Rng::new(seed);
        let r = config.r;
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                let mut pairs: [Option<LoraPair>; 7] = Default::default();
                for (p, &(_, o, i)) in projections(model).iter().enumerate() {
                    if config.targets[p] {
                        let bound = 1.0 / (i as f32).sqrt();
                        let a = (0..r * i)
                            .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                            .collect();
                        pairs[p] = Some(LoraPair {
                            a,
                            b: vec![0.0; o * r],
                        });
                    }
                }
                pairs
            })
            .collect();
        Lora { config, layers }
    }

    /// Zeros of the same shapes (gradients, Adam moments).
    pub fn zeros_like(&self) -> Lora {
        let mut z = self.clone();
        z.for_each_mut(|_, _, v| v.fill(0.0));
        z
    }

    /// Visits every tensor: (layer, projection, tensor) with A before B.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(usize, usize, &mut Vec<f32>)) {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (p, pair) in layer.iter_mut().enumerate() {
                if let Some(pair) = pair {
                    f(l, p, &mut pair.a);
                    f(l, p, &mut pair.b);
                }
            }
        }
    }

    /// Every tensor in [`Lora::for_each_mut`]'s order.
    pub fn tensors(&self) -> impl Iterator<Item = &Vec<f32>> {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .flat_map(|p| [&p.a, &p.b])
    }

    /// Every tensor, mutably, in [`Lora::for_each_mut`]'s order.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.layers
            .iter_mut()
            .flatten()
            .flatten()
            .flat_map(|p| [&mut p.a, &mut p.b])
    }

    /// The first tensor holding a NaN or an infinity, as PEFT names it (layer, module, A or
    /// B); None when every value is finite.
    pub fn first_non_finite(&self) -> Option<String> {
        for (l, layer) in self.layers.iter().enumerate() {
            for (p, pair) in layer.iter().enumerate() {
                let Some(pair) = pair else { continue };
                for (ab, v) in [("A", &pair.a), ("B", &pair.b)] {
                    if v.iter().any(|x| !x.is_finite()) {
                        return Some(format!("layer {l} {} lora_{ab}", crate::lora::TARGETS[p]));
                    }
                }
            }
        }
        None
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.a.len() + p.b.len())
            .sum()
    }
}
