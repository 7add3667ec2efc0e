//! The training loop around [`crate::train`]: gradient accumulation, AdamW, validation, NaN/inf
//! guarding and checkpoints. The CLI, the page and the tests all drive this one loop.
//!
//! The trainer holds the adapter, the optimizer, the data and its cursor, but not the model:
//! whichever backend computes the gradients (the CPU reference here, the GPU in bitlora-gpu,
//! synchronously or awaited in a browser) plugs in between the two halves of a step:
//!
//! ```text
//! let seqs = trainer.begin_step();              // the sequence indices of this step
//! let mut grads = trainer.lora.zeros_like();
//! for &i in &seqs { losses.push(backend.forward_backward(&trainer.lora, &trainer.data.train[i],
//!                                 &mut grads, trainer.grad_scale(), trainer.rng())) }
//! let mut report = trainer.finish_step(grads, &seqs, &losses); // clip, AdamW, NaN guard
//! if trainer.validation_due() { report.val_loss = backend.mean_loss(&trainer.lora, &trainer.data.val) }
//! ```
//!
//! [`Trainer::step`] is exactly that with the CPU reference.
//!
//! A checkpoint is one safetensors file: the adapter (`adapter.` + PEFT names), Adam's moments
//! (`adam.m.` / `adam.v.` + PEFT names) and, in the header's metadata under `bitlora`, the JSON
//! state (configs, step counts, data cursor, RNG state, a fingerprint of the data). Resuming
//! from it continues with bit-identical losses on the CPU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::config::Config;
use crate::data::{Dataset, Sequence, epoch_order};
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig};
use crate::model::Model;
use crate::optim::{AdamW, AdamWConfig, Schedule};
use crate::peft;
use crate::rng::Rng;
use crate::train;
use crate::weights::{self, OwnedTensor, WeightFiles};

#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// Optimizer steps to run in all.
    pub steps: usize,
    /// Sequences whose gradients are summed (averaged) into one optimizer step.
    pub accumulation: usize,
    /// Validation every this many steps (0: never during training).
    pub eval_every: usize,
    /// Seed of the data order and of dropout.
    pub seed: u64,
}

/// What one step ([`Trainer::step`], or [`Trainer::finish_step`]) did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Steps done so far, this one included (1-based).
    pub step: usize,
    pub epoch: u64,
    /// Mean training loss over the step's sequences.
    pub loss: f32,
    /// Target tokens the step trained on.
    pub tokens: usize,
    pub lr: f32,
    pub grad_norm: f32,
    /// Validation loss, when this step ran validation.
    pub val_loss: Option<f32>,
    /// Why the update was not applied (a non-finite loss or gradient), if it was not.
    pub skipped: Option<String>,
}

pub struct Trainer {
    /// The base model's config (shapes for checkpoints).
    model: Config,
    pub lora: Lora,
    pub optimizer: AdamW,
    pub data: Dataset,
    pub options: TrainOptions,
    /// Steps taken (including skipped ones).
    pub step: usize,
    epoch: u64,
    /// Next position in this epoch's order.
    cursor: usize,
    order: Vec<usize>,
    rng: Rng,
    /// [`Trainer::id`].
    id: u64,
}

/// The next [`Trainer::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Trainer {
    pub fn new(
        model: &Config,
        lora: Lora,
        optim: AdamWConfig,
        data: Dataset,
        options: TrainOptions,
    ) -> Result<Trainer> {
        if data.train.is_empty() {
            return Err(Error::Data {
                file: "training data".into(),
                msg: "has no training sequences".into(),
            });
        }
        if options.accumulation == 0 || options.steps == 0 {
            return Err(Error::Lora {
                msg: "steps and accumulation must be at least 1".into(),
            });
        }
        let order = epoch_order(data.train.len(), options.seed, 0);
        let rng = Rng::new(options.seed ^ 0xd00d);
        let optimizer = AdamW::new(optim, &lora);
        Ok(Trainer {
            model: model.clone(),
            lora,
            optimizer,
            data,
            options,
            step: 0,
            epoch: 0,
            cursor: 0,
            order,
            rng,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A number no other trainer made in this process (by [`Trainer::new`] or
    /// [`Trainer::resume`]) has: a backend that keeps the adapter and the optimizer's state
    /// itself (the GPU trainer) tells with it whether what it holds is this trainer's.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn done(&self) -> bool {
        self.step >= self.options.steps
    }

    fn next_sequence(&mut self) -> usize {
        if self.cursor == self.order.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.order = epoch_order(self.data.train.len(), self.options.seed, self.epoch);
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }

    /// The training sequences of the next step (indices into `data.train`): `accumulation` of
    /// them, in this epoch's order, moving the data cursor on.
    pub fn begin_step(&mut self) -> Vec<usize> {
        (0..self.options.accumulation)
            .map(|_| self.next_sequence())
            .collect()
    }

    /// The factor each sequence's gradient is scaled by (the mean over the step's sequences).
    pub fn grad_scale(&self) -> f32 {
        1.0 / self.options.accumulation as f32
    }

    /// The RNG that dropout draws from; a backend must draw in the CPU reference's order.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Ends a step begun by [`Trainer::begin_step`]: `grads` holds the sum of the scaled
    /// gradients of `seqs`, whose losses are `losses`. Applies AdamW (with clipping), unless
    /// a loss or the gradient is not finite: then the step is counted and reported as
    /// skipped, and neither the adapter nor the optimizer's moments change.
    pub fn finish_step(
        &mut self,
        mut grads: Lora,
        seqs: &[usize],
        losses: &[train::StepLoss],
    ) -> StepReport {
        let grad_norm = AdamW::grad_norm(&grads);
        let report = self.finish_step_with_norm(grad_norm, seqs, losses, false);
        if report.skipped.is_none() {
            self.optimizer.step(&mut self.lora, &mut grads);
        }
        report
    }

    /// As [`Trainer::finish_step`], for a backend that keeps the adapter, its gradients and
    /// Adam's moments itself (the GPU trainer) and applies the update there: `grad_norm` is
    /// the global norm of the step's gradients it computed. Counts the step and, unless a
    /// loss or the norm is not finite (`skipped`), the optimizer's step; the backend applies
    /// AdamW for optimizer step `self.optimizer.step` as it was before this call (its lr and
    /// bias corrections) exactly when the report is not skipped. `lora` and the moments here
    /// are not touched: the backend brings them back when a checkpoint or export needs them.
    pub fn finish_step_external(
        &mut self,
        grad_norm: f32,
        seqs: &[usize],
        losses: &[train::StepLoss],
    ) -> StepReport {
        self.finish_step_with_norm(grad_norm, seqs, losses, true)
    }

    fn finish_step_with_norm(
        &mut self,
        grad_norm: f32,
        seqs: &[usize],
        losses: &[train::StepLoss],
        count_optimizer_step: bool,
    ) -> StepReport {
        let mut bad = None;
        let (mut loss_sum, mut tokens) = (0f64, 0);
        for (&i, out) in seqs.iter().zip(losses) {
            if bad.is_none() && !out.loss.is_finite() {
                bad = Some(format!("the loss is {} on training sequence {i}", out.loss));
            }
            loss_sum += out.loss as f64;
            tokens += out.tokens;
        }
        self.step += 1;
        if bad.is_none() && !grad_norm.is_finite() {
            bad = Some(format!("the gradient norm is {grad_norm}"));
        }
        let lr = self.optimizer.config.lr_at(self.optimizer.step);
        // A non-finite step never reaches the adapter or the optimizer's moments.
        if bad.is_none() && count_optimizer_step {
            self.optimizer.step += 1;
        }
        StepReport {
            step: self.step,
            epoch: self.epoch,
            loss: (loss_sum / losses.len().max(1) as f64) as f32,
            tokens,
            lr,
            grad_norm,
            val_loss: None,
            skipped: bad,
        }
    }

    /// Whether the step just finished should be followed by validation (every `eval_every`
    /// steps, and after the last one).
    pub fn validation_due(&self) -> bool {
        let eval = self.options.eval_every;
        eval > 0 && self.step > 0 && (self.step.is_multiple_of(eval) || self.done())
    }

    /// One optimizer step over `accumulation` sequences on the CPU reference.
    pub fn step(&mut self, model: &Model) -> Result<StepReport> {
        let seqs = self.begin_step();
        let mut grads = self.lora.zeros_like();
        let scale = self.grad_scale();
        let mut losses = Vec::with_capacity(seqs.len());
        for &i in &seqs {
            let seq = &self.data.train[i];
            losses.push(train::forward_backward(
                model,
                &self.lora,
                &seq.tokens,
                &seq.targets,
                &mut grads,
                scale,
                &mut self.rng,
            )?);
        }
        let mut report = self.finish_step(grads, &seqs, &losses);
        if self.validation_due() {
            report.val_loss = self.validate(model)?;
        }
        Ok(report)
    }

    /// Mean loss over the validation sequences, weighted by their counted tokens.
    pub fn validate(&self, model: &Model) -> Result<Option<f32>> {
        mean_loss(model, &self.lora, &self.data.val)
    }

    /// The whole training state as the bytes of one safetensors file.
    pub fn checkpoint(&self) -> Vec<u8> {
        let c = &self.model;
        let mut tensors: Vec<OwnedTensor> = Vec::new();
        for (prefix, l) in [
            ("adapter.", &self.lora),
            ("adam.m.", &self.optimizer.m),
            ("adam.v.", &self.optimizer.v),
        ] {
            tensors.extend(peft::adapter_tensors(l, c).into_iter().map(|mut t| {
                t.name = format!("{prefix}{}", t.name);
                t
            }));
        }
        let o = &self.optimizer.config;
        let state = json!({
            "version": 1,
            "lora": peft::adapter_config_json(&self.lora.config, ""),
            "optimizer": {"lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps, "weight_decay": o.weight_decay,
                          "max_grad_norm": o.max_grad_norm, "schedule": format!("{:?}", o.schedule), "warmup_steps": o.warmup_steps,
                          "total_steps": o.total_steps, "step": self.optimizer.step},
            "train": {"steps": self.options.steps, "accumulation": self.options.accumulation, "eval_every": self.options.eval_every,
                      "seed": self.options.seed.to_string()},
            "step": self.step, "epoch": self.epoch, "cursor": self.cursor, "rng": self.rng.state().to_string(),
            "data_fingerprint": fingerprint(&self.data).to_string(),
        });
        let meta = HashMap::from([("bitlora".to_string(), state.to_string())]);
        weights::serialize_with_metadata(&tensors, Some(meta))
    }

    /// Continues a run from [`Trainer::checkpoint`]'s bytes, on the same model and data.
    pub fn resume(model: &Config, data: Dataset, file: &str, bytes: &[u8]) -> Result<Trainer> {
        let bad = |msg: String| Error::Data {
            file: file.to_string(),
            msg,
        };
        let w = WeightFiles::parse(&[(file, bytes)])?;
        let state: Value = w
            .metadata("bitlora")
            .ok_or_else(|| {
                bad("is not a bitlora training checkpoint (no `bitlora` metadata)".into())
            })
            .and_then(|s| {
                serde_json::from_str(s)
                    .map_err(|e| bad(format!("checkpoint state is not JSON: {e}")))
            })?;
        if state["version"] != 1 {
            return Err(bad(format!(
                "checkpoint version {} is not supported",
                state["version"]
            )));
        }
        if state["data_fingerprint"].as_str() != Some(&fingerprint(&data).to_string()) {
            return Err(bad("was made with different training data (or data options); resume with the same data file and options".into()));
        }
        let lora_cfg: LoraConfig =
            peft::read_adapter_config(file, state["lora"].to_string().as_bytes())?;
        // Tensors come back through the PEFT reader, which checks every shape against the model.
        let read = |prefix: &str| -> Result<Lora> {
            let tensors: Vec<OwnedTensor> =
                peft::adapter_tensors(&Lora::init(model, lora_cfg.clone(), 0), model)
                    .into_iter()
                    .map(|t| {
                        let shape = t.shape.clone();
                        w.f32(&format!("{prefix}{}", t.name), &shape)
                            .map(|v| OwnedTensor::f32(t.name, &shape, &v))
                    })
                    .collect::<Result<_>>()?;
            peft::read_adapter(lora_cfg.clone(), model, file, &weights::serialize(&tensors))
        };
        let num = |v: &Value, what: &str| {
            v.as_f64()
                .ok_or_else(|| bad(format!("checkpoint field {what} is missing")))
        };
        let int = |v: &Value, what: &str| {
            v.as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("checkpoint field {what} is missing")))
        };
        let big = |v: &Value, what: &str| {
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad(format!("checkpoint field {what} is missing")))
        };
        let o = &state["optimizer"];
        let schedule = match o["schedule"].as_str() {
            Some("Constant") => Schedule::Constant,
            Some("Linear") => Schedule::Linear,
            _ => Schedule::Cosine,
        };
        let optim = AdamWConfig {
            lr: num(&o["lr"], "lr")? as f32,
            beta1: num(&o["beta1"], "beta1")? as f32,
            beta2: num(&o["beta2"], "beta2")? as f32,
            eps: num(&o["eps"], "eps")? as f32,
            weight_decay: num(&o["weight_decay"], "weight_decay")? as f32,
            max_grad_norm: o["max_grad_norm"].as_f64().map(|x| x as f32),
            schedule,
            warmup_steps: int(&o["warmup_steps"], "warmup_steps")?,
            total_steps: int(&o["total_steps"], "total_steps")?,
        };
        let t = &state["train"];
        let options = TrainOptions {
            steps: int(&t["steps"], "steps")?,
            accumulation: int(&t["accumulation"], "accumulation")?,
            eval_every: int(&t["eval_every"], "eval_every")?,
            seed: big(&t["seed"], "seed")?,
        };
        let mut trainer = Trainer::new(model, read("adapter.")?, optim, data, options)?;
        trainer.optimizer.m = read("adam.m.")?;
        trainer.optimizer.v = read("adam.v.")?;
        trainer.optimizer.step = int(&o["step"], "optimizer step")?;
        trainer.step = int(&state["step"], "step")?;
        trainer.epoch = int(&state["epoch"], "epoch")? as u64;
        trainer.cursor = int(&state["cursor"], "cursor")?;
        trainer.order = epoch_order(
            trainer.data.train.len(),
            trainer.options.seed,
            trainer.epoch,
        );
        trainer.rng = Rng::new(big(&state["rng"], "rng")?);
        if trainer.cursor > trainer.order.len() {
            return Err(bad(
                "checkpoint data cursor is past the end of the data".into()
            ));
        }
        Ok(trainer)
    }
}

/// Mean loss of `lora` over `seqs`, weighted by counted tokens; None when there are none.
pub fn mean_loss(model: &Model, lora: &Lora, seqs: &[Sequence]) -> Result<Option<f32>> {
    let (mut sum, mut n) = (0f64, 0usize);
    for s in seqs {
        let out = train::loss(model, lora, &s.tokens, &s.targets)?;
        sum += out.loss as f64 * out.tokens as f64;
        n += out.tokens;
    }
    Ok((n > 0).then(|| (sum / n as f64) as f32))
}

/// FNV-1a over the sequences: tells a checkpoint's data apart from other data.
fn fingerprint(data: &Dataset) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for s in data.train.iter().chain(&data.val) {
        eat(s.tokens.len() as u64);
        s.tokens.iter().for_each(|&t| eat(t as u64));
        s.targets
            .iter()
            .for_each(|t| eat(t.map_or(u64::MAX, |x| x as u64)));
    }
    eat(data.val.len() as u64);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny_config;

    fn setup(model: &Model) -> (Lora, Dataset) {
        let lora = Lora::init(
            &model.config,
            LoraConfig::new(4, 8.0, 0.1, false, &["all-linear"]).unwrap(),
            5,
        );
        let mut rng = Rng::new(9);
        // A small "language": repeated patterns the adapter can learn.
        let seqs: Vec<Sequence> = (0..12)
            .map(|k| {
                let toks: Vec<u32> = (0..17)
                    .map(|i| ((k * 7 + i * 3) % 50 + rng.below(2) as usize) as u32)
                    .collect();
                Sequence {
                    tokens: toks[..16].to_vec(),
                    targets: toks[1..].iter().map(|&t| Some(t)).collect(),
                }
            })
            .collect();
        let (val, train) = seqs.split_at(2);
        (
            lora,
            Dataset {
                train: train.to_vec(),
                val: val.to_vec(),
                format: "test",
                truncated: 0,
            },
        )
    }

    fn optim() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            warmup_steps: 2,
            total_steps: 8,
            ..Default::default()
        }
    }

    fn options() -> TrainOptions {
        TrainOptions {
            steps: 8,
            accumulation: 2,
            eval_every: 4,
            seed: 3,
        }
    }

    #[test]
    fn resume_continues_bit_identically() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let mut straight = Trainer::new(
            &model.config,
            lora.clone(),
            optim(),
            data.clone(),
            options(),
        )
        .unwrap();
        let reports: Vec<StepReport> = (0..8).map(|_| straight.step(&model).unwrap()).collect();
        let mut first =
            Trainer::new(&model.config, lora, optim(), data.clone(), options()).unwrap();
        for _ in 0..3 {
            first.step(&model).unwrap();
        }
        let bytes = first.checkpoint();
        drop(first);
        let mut resumed = Trainer::resume(&model.config, data, "ckpt.safetensors", &bytes).unwrap();
        for want in &reports[3..] {
            assert_eq!(&resumed.step(&model).unwrap(), want);
        }
        assert_eq!(
            resumed.lora, straight.lora,
            "adapters differ after resuming"
        );
        assert!(resumed.done());
    }

    #[test]
    fn training_lowers_the_validation_loss() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let mut t = Trainer::new(
            &model.config,
            lora,
            AdamWConfig {
                lr: 2e-2,
                total_steps: 30,
                ..Default::default()
            },
            data,
            TrainOptions {
                steps: 30,
                accumulation: 1,
                eval_every: 0,
                seed: 1,
            },
        )
        .unwrap();
        let before = t.validate(&model).unwrap().unwrap();
        while !t.done() {
            t.step(&model).unwrap();
        }
        let after = t.validate(&model).unwrap().unwrap();
        println!("validation loss {before:.4} -> {after:.4}");
        assert!(after < before - 0.5, "validation loss {before} -> {after}");
    }

    #[test]
    fn a_non_finite_step_is_skipped_and_never_written() {
        let mut model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        // Poison one token's embedding: any sequence holding it gives a NaN loss.
        let poisoned = data.train[0].tokens[0] as usize;
        let c = model.config.hidden_size;
        model.params.embed_tokens[poisoned * c] = f32::NAN;
        let mut t = Trainer::new(
            &model.config,
            lora.clone(),
            optim(),
            data,
            TrainOptions {
                steps: 12,
                accumulation: 1,
                eval_every: 0,
                seed: 3,
            },
        )
        .unwrap();
        let mut skipped = 0;
        while !t.done() {
            let r = t.step(&model).unwrap();
            if let Some(why) = &r.skipped {
                skipped += 1;
                assert!(why.contains("NaN") || why.contains("nan"), "{why}");
            }
        }
        assert!(skipped > 0, "the poisoned sequence was never drawn");
        let mut finite = true;
        t.lora
            .clone()
            .for_each_mut(|_, _, v| finite &= v.iter().all(|x| x.is_finite()));
        assert!(finite, "a NaN reached the adapter");
        assert_eq!(t.optimizer.step, 12 - skipped);
    }

    /// `finish_step_external` (a backend that applies AdamW itself, the GPU trainer) reports
    /// what `finish_step` reports for the same gradients' norm and counts the optimizer's step,
    /// without touching the adapter or the moments; a non-finite norm is skipped and not
    /// counted. Every trainer, a resumed one too, has its own id.
    #[test]
    fn finish_step_external_reports_and_counts_as_finish_step() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let make = || {
            Trainer::new(
                &model.config,
                lora.clone(),
                optim(),
                data.clone(),
                options(),
            )
        };
        let (mut reference, mut t) = (make().unwrap(), make().unwrap());
        let want = reference.step(&model).unwrap();
        let seqs = t.begin_step();
        let mut grads = t.lora.zeros_like();
        let scale = t.grad_scale();
        let losses: Vec<train::StepLoss> = seqs
            .iter()
            .map(|&i| {
                let s = &t.data.train[i];
                let mut rng = t.rng.clone();
                let out = train::forward_backward(
                    &model, &t.lora, &s.tokens, &s.targets, &mut grads, scale, &mut rng,
                );
                t.rng = rng;
                out.unwrap()
            })
            .collect();
        let got = t.finish_step_external(AdamW::grad_norm(&grads), &seqs, &losses);
        assert_eq!(got, want);
        assert_eq!((t.step, t.optimizer.step), (1, 1));
        assert_eq!(t.lora, lora, "the adapter was touched");
        assert_eq!(t.optimizer.m, lora.zeros_like(), "the moments were touched");
        assert_eq!(t.optimizer.v, lora.zeros_like(), "the moments were touched");
        let seqs = t.begin_step();
        let r = t.finish_step_external(f32::NAN, &seqs, &losses);
        assert_eq!(r.skipped.as_deref(), Some("the gradient norm is NaN"));
        assert_eq!((t.step, t.optimizer.step), (2, 1));
        let resumed = Trainer::resume(
            &model.config,
            data.clone(),
            "c.safetensors",
            &t.checkpoint(),
        )
        .unwrap();
        assert!(t.id() != reference.id() && resumed.id() != t.id());
    }

    #[test]
    fn checkpoints_from_other_data_or_garbage_are_refused() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let t = Trainer::new(&model.config, lora, optim(), data.clone(), options()).unwrap();
        let bytes = t.checkpoint();
        let mut other = data.clone();
        other.train.pop();
        let e = Trainer::resume(&model.config, other, "c.safetensors", &bytes)
            .err()
            .unwrap();
        assert!(e.to_string().contains("different training data"), "{e}");
        let e = Trainer::resume(&model.config, data, "c.safetensors", b"nonsense")
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a safetensors file"), "{e}");
    }
}
