//! The training loop, written once: accumulation, validation, the NaN/inf guard, schedules,
//! checkpoints and pauses between sequences. The CPU reference, the GPU (natively and in the
//! page) and every caller (CLI, `bench train`, the page's worker, the tests) drive this loop
//! through a [`Backend`]; no other copy of it exists.
//!
//! ```text
//!                      Trainer<B>  (this file: owns the loop and the run's state)
//!   data order, cursor, RNG ---+--- per sequence: B::forward_backward(seq, first, last) -> loss
//!   step counts, schedule      |                  (last: + the step's gradient norm)
//!   NaN guard, validation      +--- per step:     B::update(AdamWScalars)   (unless skipped)
//!   checkpoints                +--- validation:   B::loss(seq)
//!                              +--- checkpoint / export: B::state()  (adapter + Adam's moments)
//!
//!   B = CpuBackend (here)      the reference; adapter, gradients and moments in host memory
//!     | GpuBackend (gpu)       adapter, gradients and moments resident in GPU buffers; a step
//!     |                        reads back only the losses and the squared gradient norm
//!     | WebBackend (web)       the page: WebGPU's resident path, or the CPU
//! ```
//!
//! The backend owns the optimizer state (the adapter and Adam's moments): the loop never
//! reads it except through [`Backend::state`] for a checkpoint or an export. A unit of work
//! ([`Trainer::advance`]) is one training sequence's forward and backward, or one validation
//! sequence's loss, so a caller (the browser's worker) can yield, pause or stop between them;
//! [`Trainer::step`] runs units until a step (and its validation, when due) is done.
//!
//! A checkpoint is one safetensors file: the adapter (`adapter.` + PEFT names), Adam's moments
//! (`adam.m.` / `adam.v.` + PEFT names) and, in the header's metadata under `bitlora`, the JSON
//! state (configs, step counts, data cursor, RNG state, a fingerprint of the data). Resuming
//! from it continues with bit-identical losses on the same backend.

use std::collections::HashMap;
use std::ops::Deref;

use serde_json::{Value, json};

use crate::config::Config;
use crate::data::{Dataset, Sequence, epoch_order};
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig};
use crate::model::Model;
use crate::optim::{AdamW, AdamWConfig, AdamWScalars, Schedule, adamw_update};
use crate::peft;
use crate::rng::Rng;
use crate::train::{self, StepLoss};
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

/// What one step did.
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

/// The optimizer's state: the adapter and Adam's moments (all of one shape).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterState {
    pub lora: Lora,
    pub m: Lora,
    pub v: Lora,
}

impl AdapterState {
    /// A fresh run's state: `lora` with zero moments.
    pub fn new(lora: Lora) -> AdapterState {
        let m = lora.zeros_like();
        AdapterState {
            v: m.clone(),
            m,
            lora,
        }
    }
}

/// Where a sequence's gradient goes in the step's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accumulate {
    /// The step's first sequence: its gradient replaces what the last step left.
    pub first: bool,
    /// The step's last sequence: the backend also returns the global gradient norm.
    pub last: bool,
}

/// One training sequence's result from [`Backend::forward_backward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SequenceResult {
    pub loss: StepLoss,
    /// After the step's last sequence: the global L2 norm of the step's summed gradients.
    pub grad_norm: Option<f32>,
}

/// What the loop needs from a device: one sequence's forward and backward, one sequence's loss,
/// and AdamW applied where the backend keeps the adapter and the moments. The op-level kernels
/// behind it (core's `train` functions, the GPU's launchers) stay separate twins; only this
/// orchestration is shared.
///
/// The futures are not `Send` (the browser's are not); native callers block on them.
#[allow(async_fn_in_trait)]
pub trait Backend {
    type Error: From<Error>;

    /// "cpu", "gpu" or "webgpu": for reports and logs.
    fn name(&self) -> &'static str;

    /// Takes `state` as the adapter and moments the next step starts from (a new run, or a
    /// resumed one). Its rank and targets must be those the backend was built for.
    fn load(&mut self, state: AdapterState) -> std::result::Result<(), Self::Error>;

    /// Forward and backward of `seq` with the backend's adapter: returns its mean loss over the
    /// counted targets, and sets (`acc.first`) or adds `scale` times its gradient into the
    /// step's gradients; with `acc.last` also their global norm. Dropout draws from `rng` in
    /// the CPU reference's order.
    async fn forward_backward(
        &mut self,
        seq: &Sequence,
        acc: Accumulate,
        scale: f32,
        rng: &mut Rng,
    ) -> std::result::Result<SequenceResult, Self::Error>;

    /// The mean loss of `seq` with the backend's adapter, forward only, dropout off.
    async fn loss(&mut self, seq: &Sequence) -> std::result::Result<StepLoss, Self::Error>;

    /// One AdamW update with the step's gradients (clipped by `s.coef`).
    fn update(&mut self, s: &AdamWScalars) -> std::result::Result<(), Self::Error>;

    /// A copy of the adapter and the moments (for a checkpoint or an export; a device backend
    /// reads them back here and only here).
    async fn state(&mut self) -> std::result::Result<AdapterState, Self::Error>;
}

/// The CPU reference backend: core's `train::forward_backward` and `train::loss`, AdamW on the
/// host. `M` is how the caller holds the model (`&Model`, `Rc<Model>`, ...).
pub struct CpuBackend<M> {
    model: M,
    state: Option<AdapterState>,
    grads: Option<Lora>,
}

impl<M: Deref<Target = Model>> CpuBackend<M> {
    pub fn new(model: M) -> CpuBackend<M> {
        CpuBackend {
            model,
            state: None,
            grads: None,
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The adapter as it is now (no copy: the CPU holds it).
    pub fn adapter(&self) -> Option<&Lora> {
        self.state.as_ref().map(|s| &s.lora)
    }

    fn held(state: &mut Option<AdapterState>) -> Result<&mut AdapterState> {
        state.as_mut().ok_or(Error::Lora {
            msg: "the CPU backend holds no adapter yet (load one first)".into(),
        })
    }
}

impl<M: Deref<Target = Model>> Backend for CpuBackend<M> {
    type Error = Error;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn load(&mut self, state: AdapterState) -> Result<()> {
        self.grads = None;
        self.state = Some(state);
        Ok(())
    }

    async fn forward_backward(
        &mut self,
        seq: &Sequence,
        acc: Accumulate,
        scale: f32,
        rng: &mut Rng,
    ) -> Result<SequenceResult> {
        let lora = &Self::held(&mut self.state)?.lora;
        let mut grads = match self.grads.take() {
            Some(g) if !acc.first => g,
            _ => lora.zeros_like(),
        };
        let model: &Model = &self.model;
        // The norm too runs in the pool (its tensors on separate threads).
        let (out, grad_norm) = crate::par::in_pool(|| {
            let out = train::forward_backward(
                model,
                lora,
                &seq.tokens,
                &seq.targets,
                &mut grads,
                scale,
                rng,
            );
            (out, acc.last.then(|| AdamW::grad_norm(&grads)))
        });
        self.grads = Some(grads);
        Ok(SequenceResult {
            loss: out?,
            grad_norm,
        })
    }

    async fn loss(&mut self, seq: &Sequence) -> Result<StepLoss> {
        let lora = &Self::held(&mut self.state)?.lora;
        let model: &Model = &self.model;
        crate::par::in_pool(|| train::loss(model, lora, &seq.tokens, &seq.targets))
    }

    fn update(&mut self, s: &AdamWScalars) -> Result<()> {
        let mut grads = self.grads.take().ok_or(Error::Lora {
            msg: "an optimizer update without a step's gradients".into(),
        })?;
        let st = Self::held(&mut self.state)?;
        crate::par::in_pool(|| adamw_update(s, &mut st.lora, &mut grads, &mut st.m, &mut st.v));
        Ok(())
    }

    async fn state(&mut self) -> Result<AdapterState> {
        Ok(Self::held(&mut self.state)?.clone())
    }
}

/// A validation loss summed one sequence at a time: the mean weighted by counted tokens, summed
/// in f64 in order, the same whether a whole validation runs at once or a unit at a time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Validation {
    pub sum: f64,
    pub tokens: usize,
}

impl Validation {
    pub fn add(&mut self, out: StepLoss) {
        self.sum += out.loss as f64 * out.tokens as f64;
        self.tokens += out.tokens;
    }

    /// None without counted targets.
    pub fn mean(&self) -> Option<f32> {
        (self.tokens > 0).then(|| (self.sum / self.tokens as f64) as f32)
    }
}

/// Where the loop is within a step.
#[derive(Clone, Debug)]
enum Phase {
    /// Between steps: a checkpoint can be taken.
    Idle,
    /// The step's sequences (`seqs`) are running; `losses` holds those done. `rng` is the RNG
    /// as the step began: a failed sequence restarts the step from its first sequence.
    Train {
        seqs: Vec<usize>,
        losses: Vec<StepLoss>,
        rng: Rng,
    },
    /// The step is applied; validation sequence `next` is the next to run.
    Validate {
        report: StepReport,
        next: usize,
        v: Validation,
    },
}

/// A training run: the data and its order, the step counts, the RNG and the schedule, driving
/// a [`Backend`] that holds the adapter and the optimizer's moments.
pub struct Trainer<B> {
    /// The base model's config (shapes for checkpoints).
    model: Config,
    lora_config: LoraConfig,
    /// The optimizer's settings; `opt_step` counts the updates applied (skipped steps not).
    optim: AdamWConfig,
    opt_step: usize,
    pub data: Dataset,
    pub options: TrainOptions,
    /// Steps taken (including skipped ones).
    pub step: usize,
    epoch: u64,
    /// Next position in this epoch's order.
    cursor: usize,
    order: Vec<usize>,
    rng: Rng,
    phase: Phase,
    backend: B,
}

impl<B: Backend> Trainer<B> {
    /// A new run of `lora` (PEFT-initialised) on `data`; the backend takes the adapter with
    /// zero moments.
    pub fn new(
        backend: B,
        model: &Config,
        lora: Lora,
        optim: AdamWConfig,
        data: Dataset,
        options: TrainOptions,
    ) -> std::result::Result<Trainer<B>, B::Error> {
        Trainer::start(
            backend,
            model,
            AdapterState::new(lora),
            optim,
            data,
            options,
        )
    }

    /// A run at step 0 whose backend takes `state`.
    fn start(
        mut backend: B,
        model: &Config,
        state: AdapterState,
        optim: AdamWConfig,
        data: Dataset,
        options: TrainOptions,
    ) -> std::result::Result<Trainer<B>, B::Error> {
        if data.train.is_empty() {
            return Err(Error::Data {
                file: "training data".into(),
                msg: "has no training sequences".into(),
            }
            .into());
        }
        if options.accumulation == 0 || options.steps == 0 {
            return Err(Error::Lora {
                msg: "steps and accumulation must be at least 1".into(),
            }
            .into());
        }
        if options.accumulation > data.train.len() {
            return Err(Error::Data {
                file: "training data".into(),
                msg: format!(
                    "has {} training sequences, fewer than the batch of {}: a step would take some sequences twice; use a batch of at most {} or add data",
                    data.train.len(),
                    options.accumulation,
                    data.train.len()
                ),
            }
            .into());
        }
        let order = epoch_order(data.train.len(), options.seed, 0);
        let rng = Rng::new(options.seed ^ 0xd00d);
        let lora_config = state.lora.config.clone();
        backend.load(state)?;
        Ok(Trainer {
            model: model.clone(),
            lora_config,
            optim,
            opt_step: 0,
            data,
            options,
            step: 0,
            epoch: 0,
            cursor: 0,
            order,
            rng,
            phase: Phase::Idle,
            backend,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Ends the run and gives the backend back (with the adapter it holds).
    pub fn into_backend(self) -> B {
        self.backend
    }

    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora_config
    }

    pub fn optimizer_config(&self) -> &AdamWConfig {
        &self.optim
    }

    /// Optimizer updates applied so far (steps skipped for a non-finite loss are not counted).
    pub fn optimizer_steps(&self) -> usize {
        self.opt_step
    }

    pub fn done(&self) -> bool {
        self.step >= self.options.steps && matches!(self.phase, Phase::Idle)
    }

    /// Between two steps: where checkpoints are taken.
    pub fn at_step_boundary(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    /// Between steps, or while a finished step's validation runs: validation changes nothing a
    /// checkpoint holds, so a checkpoint may be taken (a run resumed from it continues with
    /// the next step, without that step's validation loss).
    pub fn at_safe_point(&self) -> bool {
        matches!(self.phase, Phase::Idle | Phase::Validate { .. })
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

    /// Whether the step just finished should be followed by validation (every `eval_every`
    /// steps, and after the last one).
    fn validation_due(&self) -> bool {
        let eval = self.options.eval_every;
        eval > 0
            && self.step > 0
            && !self.data.val.is_empty()
            && (self.step.is_multiple_of(eval) || self.step >= self.options.steps)
    }

    /// One unit of work: one training sequence's forward and backward, or one validation
    /// sequence's loss. Returns the step's report when this unit finished a step (with its
    /// validation loss when validation was due). An error leaves the run where it was: a
    /// failed training sequence restarts its step from the step's first sequence (never a
    /// half-summed gradient), a failed validation sequence runs again.
    pub async fn advance(&mut self) -> std::result::Result<Option<StepReport>, B::Error> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => {
                if self.step >= self.options.steps {
                    return Err(Error::Lora {
                        msg: format!(
                            "the run is complete: all {} steps have run",
                            self.options.steps
                        ),
                    }
                    .into());
                }
                let seqs = (0..self.options.accumulation)
                    .map(|_| self.next_sequence())
                    .collect::<Vec<_>>();
                let losses = Vec::with_capacity(seqs.len());
                let rng = self.rng.clone();
                self.phase = Phase::Train { seqs, losses, rng };
                self.train_sequence().await
            }
            phase @ Phase::Train { .. } => {
                self.phase = phase;
                self.train_sequence().await
            }
            Phase::Validate {
                mut report,
                next,
                mut v,
            } => {
                let out = match self.backend.loss(&self.data.val[next]).await {
                    Ok(out) => out,
                    Err(e) => {
                        self.phase = Phase::Validate { report, next, v };
                        return Err(e);
                    }
                };
                v.add(out);
                if next + 1 < self.data.val.len() {
                    self.phase = Phase::Validate {
                        report,
                        next: next + 1,
                        v,
                    };
                    return Ok(None);
                }
                report.val_loss = v.mean();
                Ok(Some(report))
            }
        }
    }

    /// The next sequence of the step in `self.phase` (Phase::Train).
    async fn train_sequence(&mut self) -> std::result::Result<Option<StepReport>, B::Error> {
        let Phase::Train { seqs, losses, rng } = &mut self.phase else {
            unreachable!("called in the Train phase");
        };
        let k = losses.len();
        let acc = Accumulate {
            first: k == 0,
            last: k + 1 == seqs.len(),
        };
        let scale = 1.0 / self.options.accumulation as f32;
        let seq = &self.data.train[seqs[k]];
        let out = match self
            .backend
            .forward_backward(seq, acc, scale, &mut self.rng)
            .await
        {
            Ok(out) => out,
            Err(e) => {
                // Start the step again from its first sequence, with the RNG as it began.
                self.rng = rng.clone();
                losses.clear();
                return Err(e);
            }
        };
        losses.push(out.loss);
        if !acc.last {
            return Ok(None);
        }
        let Phase::Train { seqs, losses, rng } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("matched above");
        };
        let finished = out
            .grad_norm
            .ok_or_else(|| {
                Error::Lora {
                    msg: "the backend returned no gradient norm after a step's last sequence"
                        .into(),
                }
                .into()
            })
            .and_then(|norm| self.finish_step(norm, &seqs, &losses));
        let report = match finished {
            Ok(report) => report,
            Err(e) => {
                // Nothing was counted or applied: the step runs again from its first sequence.
                self.rng = rng.clone();
                self.phase = Phase::Train {
                    seqs,
                    losses: Vec::new(),
                    rng,
                };
                return Err(e);
            }
        };
        if self.validation_due() {
            self.phase = Phase::Validate {
                report,
                next: 0,
                v: Validation::default(),
            };
            return Ok(None);
        }
        Ok(Some(report))
    }

    /// Counts the step; applies AdamW on the backend unless a loss or the gradient norm is not
    /// finite (then the step is reported as skipped, and neither the adapter nor the moments
    /// change).
    fn finish_step(
        &mut self,
        grad_norm: f32,
        seqs: &[usize],
        losses: &[StepLoss],
    ) -> std::result::Result<StepReport, B::Error> {
        let mut bad = None;
        let (mut loss_sum, mut tokens) = (0f64, 0);
        for (&i, out) in seqs.iter().zip(losses) {
            if bad.is_none() && !out.loss.is_finite() {
                bad = Some(format!("the loss is {} on training sequence {i}", out.loss));
            }
            loss_sum += out.loss as f64;
            tokens += out.tokens;
        }
        if bad.is_none() && !grad_norm.is_finite() {
            bad = Some(format!("the gradient norm is {grad_norm}"));
        }
        let lr = self.optim.lr_at(self.opt_step);
        // A non-finite step never reaches the adapter or the optimizer's moments.
        if bad.is_none() {
            let s = AdamWScalars::new(&self.optim, self.opt_step, grad_norm);
            self.backend.update(&s)?;
            self.opt_step += 1;
        }
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            epoch: self.epoch,
            loss: (loss_sum / losses.len().max(1) as f64) as f32,
            tokens,
            lr,
            grad_norm,
            val_loss: None,
            skipped: bad,
        })
    }

    /// One optimizer step over `accumulation` sequences, with its validation when due
    /// ([`Trainer::advance`] until the step is done).
    pub async fn step(&mut self) -> std::result::Result<StepReport, B::Error> {
        loop {
            if let Some(report) = self.advance().await? {
                return Ok(report);
            }
        }
    }

    /// Mean loss over the validation sequences, weighted by their counted tokens, with the
    /// adapter as it is now (None without counted targets). May run at any safe point.
    pub async fn validate(&mut self) -> std::result::Result<Option<f32>, B::Error> {
        let mut v = Validation::default();
        for i in 0..self.data.val.len() {
            v.add(self.validation_loss(i).await?);
        }
        Ok(v.mean())
    }

    /// Validation sequence `i`'s loss with the adapter as it is now: one unit of a validation
    /// that a driver runs a sequence at a time (to stay responsive), summed with
    /// [`Validation`] as [`Trainer::validate`] sums. May run at any safe point.
    pub async fn validation_loss(&mut self, i: usize) -> std::result::Result<StepLoss, B::Error> {
        let seq = self.data.val.get(i).ok_or_else(|| Error::Lora {
            msg: format!(
                "validation sequence {i} asked for; the run has {}",
                self.data.val.len()
            ),
        })?;
        self.backend.loss(seq).await
    }

    /// `(done, total)` validation sequences while a finished step's validation runs.
    pub fn validation_progress(&self) -> Option<(usize, usize)> {
        match self.phase {
            Phase::Validate { next, .. } => Some((next, self.data.val.len())),
            _ => None,
        }
    }

    /// Abandons the running validation of a finished step (a stop that should not wait for
    /// it) and returns that step's report without a validation loss; None when no validation
    /// runs. The step itself is applied and counted either way.
    pub fn skip_validation(&mut self) -> Option<StepReport> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Validate { report, .. } => Some(report),
            phase => {
                self.phase = phase;
                None
            }
        }
    }

    /// The adapter and Adam's moments as they are now (read back from the backend's device).
    pub async fn state(&mut self) -> std::result::Result<AdapterState, B::Error> {
        self.backend.state().await
    }

    /// The adapter as it is now.
    pub async fn adapter(&mut self) -> std::result::Result<Lora, B::Error> {
        Ok(self.backend.state().await?.lora)
    }

    /// The whole training state as the bytes of one safetensors file; only at a safe point
    /// ([`Trainer::at_safe_point`]).
    pub async fn checkpoint(&mut self) -> std::result::Result<Vec<u8>, B::Error> {
        Ok(self.checkpoint_and_adapter().await?.0)
    }

    /// [`Trainer::checkpoint`] and the adapter it holds, from one read of the backend's state.
    pub async fn checkpoint_and_adapter(
        &mut self,
    ) -> std::result::Result<(Vec<u8>, Lora), B::Error> {
        if !self.at_safe_point() {
            return Err(Error::Lora {
                msg: "a checkpoint was asked for in the middle of a step".into(),
            }
            .into());
        }
        let state = self.backend.state().await?;
        Ok((self.checkpoint_bytes(&state), state.lora))
    }

    fn checkpoint_bytes(&self, state: &AdapterState) -> Vec<u8> {
        let c = &self.model;
        let mut tensors: Vec<OwnedTensor> = Vec::new();
        for (prefix, l) in [
            ("adapter.", &state.lora),
            ("adam.m.", &state.m),
            ("adam.v.", &state.v),
        ] {
            tensors.extend(peft::adapter_tensors(l, c).into_iter().map(|mut t| {
                t.name = format!("{prefix}{}", t.name);
                t
            }));
        }
        let o = &self.optim;
        let json = json!({
            "version": 1,
            "lora": peft::adapter_config_json(&state.lora.config, ""),
            "optimizer": {"lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps, "weight_decay": o.weight_decay,
                          "max_grad_norm": o.max_grad_norm, "schedule": format!("{:?}", o.schedule), "warmup_steps": o.warmup_steps,
                          "total_steps": o.total_steps, "step": self.opt_step},
            "train": {"steps": self.options.steps, "accumulation": self.options.accumulation, "eval_every": self.options.eval_every,
                      "seed": self.options.seed.to_string()},
            "step": self.step, "epoch": self.epoch, "cursor": self.cursor, "rng": self.rng.state().to_string(),
            "data_fingerprint": fingerprint(&self.data).to_string(),
        });
        let meta = HashMap::from([("bitlora".to_string(), json.to_string())]);
        weights::serialize_with_metadata(&tensors, Some(meta))
    }

    /// Continues a run from a checkpoint ([`Checkpoint::read`] of [`Trainer::checkpoint`]'s
    /// bytes), on the same model and data; the backend takes the checkpoint's adapter and
    /// moments.
    pub fn resume(
        backend: B,
        model: &Config,
        data: Dataset,
        checkpoint: Checkpoint,
    ) -> std::result::Result<Trainer<B>, B::Error> {
        let r = checkpoint;
        if r.fingerprint != fingerprint(&data) {
            return Err(Error::Data {
                file: r.file,
                msg: "was made with different training data (or data options); resume with the same data file and options".into(),
            }
            .into());
        }
        let mut trainer = Trainer::new(
            backend,
            model,
            r.state.lora.clone(),
            r.optim,
            data,
            r.options,
        )?;
        trainer.backend.load(r.state)?;
        trainer.opt_step = r.opt_step;
        trainer.step = r.step;
        trainer.epoch = r.epoch;
        trainer.cursor = r.cursor;
        trainer.order = epoch_order(
            trainer.data.train.len(),
            trainer.options.seed,
            trainer.epoch,
        );
        trainer.rng = r.rng;
        if trainer.cursor > trainer.order.len() {
            return Err(Error::Data {
                file: r.file,
                msg: "checkpoint data cursor is past the end of the data".into(),
            }
            .into());
        }
        Ok(trainer)
    }
}

/// A checkpoint's contents, read and checked against the model ([`Checkpoint::read`]), ready
/// for [`Trainer::resume`] (which checks it against the data).
pub struct Checkpoint {
    file: String,
    fingerprint: u64,
    state: AdapterState,
    optim: AdamWConfig,
    options: TrainOptions,
    opt_step: usize,
    step: usize,
    epoch: u64,
    cursor: usize,
    rng: Rng,
}

impl Checkpoint {
    /// The adapter's rank, alpha, dropout and targets (what a backend is built for).
    pub fn lora_config(&self) -> &LoraConfig {
        &self.state.lora.config
    }

    /// Steps taken and steps in all.
    pub fn steps(&self) -> (usize, usize) {
        (self.step, self.options.steps)
    }

    /// Reads a checkpoint made by [`Trainer::checkpoint`] for `model`; `file` names it in
    /// errors.
    pub fn read(model: &Config, file: &str, bytes: &[u8]) -> Result<Checkpoint> {
        read_checkpoint(model, file, bytes)
    }
}

fn read_checkpoint(model: &Config, file: &str, bytes: &[u8]) -> Result<Checkpoint> {
    let bad = |msg: String| Error::Data {
        file: file.to_string(),
        msg,
    };
    let w = WeightFiles::parse(&[(file, bytes)])?;
    let state: Value = w
        .metadata("bitlora")
        .ok_or_else(|| bad("is not a bitlora training checkpoint (no `bitlora` metadata)".into()))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| bad(format!("checkpoint state is not JSON: {e}")))
        })?;
    if state["version"] != 1 {
        return Err(bad(format!(
            "checkpoint version {} is not supported",
            state["version"]
        )));
    }
    let lora_cfg: LoraConfig =
        peft::read_adapter_config(file, state["lora"].to_string().as_bytes())?;
    // Before anything is allocated by its size.
    lora_cfg.check_rank(model).map_err(|e| bad(e.to_string()))?;
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
    let fingerprint = big(&state["data_fingerprint"], "data_fingerprint")?;
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
    let adapter = AdapterState {
        lora: read("adapter.")?,
        m: read("adam.m.")?,
        v: read("adam.v.")?,
    };
    // A run resumed from non-finite values would skip every step and save them again.
    for (what, l) in [
        ("adapter", &adapter.lora),
        ("Adam's m", &adapter.m),
        ("Adam's v", &adapter.v),
    ] {
        if let Some(t) = l.first_non_finite() {
            return Err(bad(format!(
                "the {what} holds a NaN or an infinity ({t}): the checkpoint is damaged; resume from an earlier copy or start over with --overwrite"
            )));
        }
    }
    Ok(Checkpoint {
        file: file.to_string(),
        fingerprint,
        state: adapter,
        optim,
        options,
        opt_step: int(&o["step"], "optimizer step")?,
        step: int(&state["step"], "step")?,
        epoch: int(&state["epoch"], "epoch")? as u64,
        cursor: int(&state["cursor"], "cursor")?,
        rng: Rng::new(big(&state["rng"], "rng")?),
    })
}

/// Mean loss of `lora` over `seqs` on the CPU reference, weighted by counted tokens; None when
/// there are none (a model's loss outside a run: tests, the CLI's reports).
pub fn mean_loss(model: &Model, lora: &Lora, seqs: &[Sequence]) -> Result<Option<f32>> {
    let mut v = Validation::default();
    for s in seqs {
        v.add(train::loss(model, lora, &s.tokens, &s.targets)?);
    }
    Ok(v.mean())
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
    use pollster::block_on;

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
                examples: seqs.len(),
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

    type Cpu<'a> = Trainer<CpuBackend<&'a Model>>;

    fn trainer<'a>(model: &'a Model, lora: Lora, data: Dataset, options: TrainOptions) -> Cpu<'a> {
        Trainer::new(
            CpuBackend::new(model),
            &model.config,
            lora,
            optim(),
            data,
            options,
        )
        .unwrap()
    }

    #[test]
    fn resume_continues_bit_identically() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let mut straight = trainer(&model, lora.clone(), data.clone(), options());
        let reports: Vec<StepReport> = (0..8).map(|_| block_on(straight.step()).unwrap()).collect();
        assert!(reports[3].val_loss.is_some() && reports[7].val_loss.is_some());
        let mut first = trainer(&model, lora, data.clone(), options());
        for _ in 0..3 {
            block_on(first.step()).unwrap();
        }
        let bytes = block_on(first.checkpoint()).unwrap();
        drop(first);
        let ckpt = Checkpoint::read(&model.config, "ckpt.safetensors", &bytes).unwrap();
        let mut resumed =
            Trainer::resume(CpuBackend::new(&model), &model.config, data, ckpt).unwrap();
        for want in &reports[3..] {
            assert_eq!(&block_on(resumed.step()).unwrap(), want);
        }
        assert_eq!(
            block_on(resumed.state()).unwrap(),
            block_on(straight.state()).unwrap(),
            "adapters or moments differ after resuming"
        );
        assert!(resumed.done());
    }

    /// The loop with the CPU backend computes what core's functions compute by hand:
    /// forward_backward over the step's sequences (gradients summed, each scaled by
    /// 1/accumulation), the norm, clipping and AdamW with the schedule's lr.
    #[test]
    fn a_step_is_forward_backward_then_adamw() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let mut t = trainer(&model, lora.clone(), data.clone(), options());
        let got = block_on(t.step()).unwrap();

        let order = epoch_order(data.train.len(), 3, 0);
        let mut rng = Rng::new(3 ^ 0xd00d);
        let mut grads = lora.zeros_like();
        let mut losses = Vec::new();
        for &i in &order[..2] {
            let s = &data.train[i];
            let out = train::forward_backward(
                &model, &lora, &s.tokens, &s.targets, &mut grads, 0.5, &mut rng,
            )
            .unwrap();
            losses.push(out);
        }
        let mut opt = AdamW::new(optim(), &lora);
        let mut want_lora = lora.clone();
        let info = opt.step(&mut want_lora, &mut grads);
        assert_eq!(got.grad_norm, info.grad_norm);
        assert_eq!(got.lr, info.lr);
        let mean = (losses[0].loss as f64 + losses[1].loss as f64) / 2.0;
        assert_eq!(got.loss, mean as f32);
        assert_eq!(got.tokens, losses[0].tokens + losses[1].tokens);
        let state = block_on(t.state()).unwrap();
        assert_eq!(state.lora, want_lora);
        assert_eq!((state.m, state.v), (opt.m, opt.v));
        assert_eq!(t.optimizer_steps(), 1);
    }

    #[test]
    fn training_lowers_the_validation_loss() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let mut t = Trainer::new(
            CpuBackend::new(&model),
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
        let before = block_on(t.validate()).unwrap().unwrap();
        while !t.done() {
            block_on(t.step()).unwrap();
        }
        let after = block_on(t.validate()).unwrap().unwrap();
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
        let options = TrainOptions {
            steps: 12,
            accumulation: 1,
            eval_every: 0,
            seed: 3,
        };
        let mut t = trainer(&model, lora, data, options);
        let mut skipped = 0;
        while !t.done() {
            let r = block_on(t.step()).unwrap();
            if let Some(why) = &r.skipped {
                skipped += 1;
                assert!(why.contains("NaN") || why.contains("nan"), "{why}");
            }
        }
        assert!(skipped > 0, "the poisoned sequence was never drawn");
        let mut finite = true;
        block_on(t.adapter())
            .unwrap()
            .for_each_mut(|_, _, v| finite &= v.iter().all(|x| x.is_finite()));
        assert!(finite, "a NaN reached the adapter");
        assert_eq!(t.optimizer_steps(), 12 - skipped);
    }

    /// `advance` does one unit at a time: a step of two sequences and its validation over two
    /// sequences take four calls, with checkpoints refused mid-step and allowed during
    /// validation; the result equals `step`'s.
    #[test]
    fn advance_runs_one_sequence_per_call() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let opts = TrainOptions {
            eval_every: 1,
            ..options()
        };
        let mut whole = trainer(&model, lora.clone(), data.clone(), opts.clone());
        let want = block_on(whole.step()).unwrap();
        let mut t = trainer(&model, lora, data, opts);
        assert!(block_on(t.advance()).unwrap().is_none());
        assert!(!t.at_safe_point());
        assert!(block_on(t.checkpoint()).is_err());
        assert!(block_on(t.advance()).unwrap().is_none());
        assert!(t.at_safe_point() && !t.at_step_boundary());
        assert!(block_on(t.advance()).unwrap().is_none());
        let got = block_on(t.advance())
            .unwrap()
            .expect("the step and its validation");
        assert_eq!(got, want);
        assert!(t.at_step_boundary());
    }

    #[test]
    fn checkpoints_from_other_data_or_garbage_are_refused() {
        let model = Model::random(tiny_config(), 42).0;
        let (lora, data) = setup(&model);
        let mut t = trainer(&model, lora, data.clone(), options());
        let bytes = block_on(t.checkpoint()).unwrap();
        let mut other = data.clone();
        other.train.pop();
        let resume = |d: Dataset, b: &[u8]| -> Error {
            match Checkpoint::read(&model.config, "c.safetensors", b) {
                Ok(c) => Trainer::resume(CpuBackend::new(&model), &model.config, d, c)
                    .err()
                    .unwrap(),
                Err(e) => e,
            }
        };
        let e = resume(other, &bytes);
        assert!(e.to_string().contains("different training data"), "{e}");
        let e = resume(data.clone(), b"nonsense");
        assert!(e.to_string().contains("not a safetensors file"), "{e}");

        // Sizes from a checkpoint's metadata are checked before anything is allocated by them
        // (a rank or batch of 1e11 once aborted on a 150 TB / 800 GB allocation).
        let e = resume(
            data.clone(),
            &with_state(&bytes, |st| st["lora"]["r"] = 100_000_000_000u64.into()),
        );
        assert!(e.to_string().contains("rank r is 100000000000"), "{e}");
        let e = resume(
            data.clone(),
            &with_state(&bytes, |st| {
                st["train"]["accumulation"] = 100_000_000_000u64.into()
            }),
        );
        assert!(
            e.to_string()
                .contains("fewer than the batch of 100000000000"),
            "{e}"
        );
        // A NaN in a tensor (the last value of the file).
        let mut nan = bytes.clone();
        let n = nan.len();
        nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = resume(data, &nan);
        assert!(e.to_string().contains("holds a NaN or an infinity"), "{e}");
    }

    /// `bytes` (a checkpoint) with its `bitlora` metadata edited by `edit`.
    fn with_state(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut state: Value =
            serde_json::from_str(header["__metadata__"]["bitlora"].as_str().unwrap()).unwrap();
        edit(&mut state);
        header["__metadata__"]["bitlora"] = state.to_string().into();
        let mut h = header.to_string().into_bytes();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(&bytes[8 + n..]);
        out
    }
}
