//! The optimizer's state of a GPU training run ([`GpuState`]) and the backend that plugs the
//! GPU into core's training loop ([`GpuBackend`]).
//!
//! A run's adapter and Adam's moments live in one of two homes:
//! - **resident** (the default): flat f32 GPU buffers for the adapter `p`, the step's gradients
//!   `g` (and `g2`, a later sequence's before they are added in), and the moments `m`, `v`.
//!   Each sequence's dA and dB are gathered into `g`, the squared global norm is reduced on the
//!   GPU and read back as one scalar with the per-row losses, and the `adamw` kernel updates
//!   `p`, `m`, `v` in place. Nothing else is read back until [`GpuState::read`] (a checkpoint or
//!   an export).
//! - **host**: when the flat buffers would not fit one storage binding (or when asked for, to
//!   measure the difference): every dA and dB is read back each sequence and AdamW runs on the
//!   CPU, as core's reference does.
//!
//! The state is owned by the run (a [`GpuBackend`], or the page's backend), not by the
//! [`GpuTrainer`] whose buffers and pipelines do the work: in the page one GPU trainer serves
//! whichever run steps, and a run's state survives another run borrowing it. The trainer's
//! adapter buffers (the A and B its kernels bind) remember which state (a serial) and version
//! (bumped by each update) they hold, and are refreshed from it only when that changes.

use std::sync::atomic::{AtomicU64, Ordering};

use bitlora_core::data::Sequence;
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::optim::{AdamW, AdamWScalars, adamw_update};
use bitlora_core::rng::Rng;
use bitlora_core::train::StepLoss;
use bitlora_core::trainer::{Accumulate, AdapterState, Backend, SequenceResult};

use super::{GpuTrainer, PairBufs};
use crate::GpuError;
use crate::ops::{AdamWStep, ResidualAdd, SumSquares};
use crate::record::Recorder;
use crate::tensor::{self, DType, GpuTensor};

/// Row width of the optimizer's flat buffers.
pub(super) const FLAT_ROW: usize = 4096;

/// The next [`GpuState`] serial.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// Where a run keeps its adapter and moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the GPU when the flat buffers fit one binding, else on the host.
    Auto,
    /// On the host: gradients read back every sequence, AdamW on the CPU (the path before the
    /// resident optimizer; `bench train` measures it with BITLORA_BENCH_CPU_ADAMW=1).
    Host,
}

/// A run's adapter and Adam's moments, on the GPU or on the host (see the module doc).
pub struct GpuState {
    serial: u64,
    /// Bumped by every change of the adapter (an update, a load).
    version: u64,
    pub(super) config: LoraConfig,
    pub(super) home: Home,
}

pub(super) enum Home {
    Gpu(Box<Resident>),
    Host {
        state: AdapterState,
        /// The step's gradients so far (None between steps).
        grads: Option<Lora>,
    },
}

/// The resident optimizer's buffers: each one flat f32 buffer holding every pair's A then B,
/// layer by layer, projections in `Proj::ALL` order (the staging order), zero-padded to whole
/// rows of [`FLAT_ROW`]. The trainer's A and B buffers (which the kernels bind) are copies of
/// `p`.
pub(super) struct Resident {
    pub(super) p: GpuTensor,
    pub(super) g: GpuTensor,
    /// A later sequence's gradients before they are added into `g`: made at the first step
    /// that has a second sequence.
    pub(super) g2: Option<GpuTensor>,
    m: GpuTensor,
    v: GpuTensor,
    pub(super) partials: GpuTensor, // (SumSquares::PARTIALS)
    pub(super) sumsq: GpuTensor,    // (1)
    adamw: AdamWStep,
    pub(super) sum_squares: SumSquares,
    pub(super) add: ResidualAdd,
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Zeros of the adapter's shapes: the layout [`GpuState::read`] unpacks into.
    template: Lora,
    /// Map-read buffer of [`GpuState::read`] (3 flat buffers) and its size in the table.
    readback: Option<wgpu::Buffer>,
    readback_bytes: u64,
}

impl Resident {
    /// Records copies of the adapter held in `p` into the pairs' A and B buffers (`p` is laid
    /// out as the staging buffer past its `base` loss rows).
    pub(super) fn copy_adapter_out(
        &self,
        rec: &mut Recorder,
        adapter: &[[Option<PairBufs>; 7]],
        base: usize,
    ) {
        for pair in adapter.iter().flatten().flatten() {
            let (oa, ob) = pair.staging;
            for (off, t) in [(oa, &pair.a), (ob, &pair.b)] {
                rec.copy(
                    &self.p.buffer,
                    (4 * (off - base)) as u64,
                    &t.buffer,
                    0,
                    t.bytes(),
                );
            }
        }
    }

    /// Makes `g2` if there is none yet.
    pub(super) fn ensure_g2(&mut self) -> Result<(), GpuError> {
        if self.g2.is_none() {
            self.g2 = Some(GpuTensor::zeros(
                &self.device,
                "optimizer gradients (next sequence)",
                &self.g.shape,
                DType::F32,
            )?);
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        [
            &self.p,
            &self.g,
            &self.m,
            &self.v,
            &self.partials,
            &self.sumsq,
        ]
        .into_iter()
        .chain(&self.g2)
        .map(|t| t.buffer.size())
        .sum::<u64>()
            + self.readback.as_ref().map_or(0, wgpu::Buffer::size)
    }
}

/// The adapter's tensors in order (A then B, layer by layer, `Proj::ALL` order), flattened
/// into `n` floats (zero-padded).
fn pack(l: &Lora, n: usize) -> Vec<f32> {
    let mut flat = vec![0f32; n];
    let mut k = 0;
    for pair in l.layers.iter().flatten().flatten() {
        for x in [&pair.a, &pair.b] {
            flat[k..k + x.len()].copy_from_slice(x);
            k += x.len();
        }
    }
    flat
}

impl GpuState {
    /// Takes `state` for a run on `trainer` (its rank and targets must be the trainer's):
    /// uploads it into resident buffers, or keeps it on the host (see [`Placement`]).
    pub fn new(
        trainer: &GpuTrainer,
        state: AdapterState,
        placement: Placement,
    ) -> Result<GpuState, GpuError> {
        for (what, l) in [
            ("adapter", &state.lora),
            ("first moments", &state.m),
            ("second moments", &state.v),
        ] {
            trainer.check_adapter(what, l)?;
        }
        let config = state.lora.config.clone();
        let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
        let host = |state| GpuState {
            serial,
            version: 0,
            config: config.clone(),
            home: Home::Host { state, grads: None },
        };
        if placement == Placement::Host {
            return Ok(host(state));
        }
        let model = trainer.model();
        let dev = &model.device;
        let plan = trainer.plan();
        if !plan.resident {
            return Ok(host(state));
        }
        let bufs = (|| {
            let t = |name: &str| plan.alloc(dev, name);
            Ok::<_, GpuError>((
                t("optimizer adapter")?,
                t("optimizer gradients")?,
                t("optimizer m")?,
                t("optimizer v")?,
            ))
        })();
        let (p, g, m, v) = match bufs {
            Ok(b) => b,
            Err(GpuError::TooLarge { .. }) => return Ok(host(state)),
            Err(e) => return Err(e),
        };
        let n = p.numel();
        for (t, l) in [(&p, &state.lora), (&m, &state.m), (&v, &state.v)] {
            model
                .queue
                .write_buffer(&t.buffer, 0, bytemuck::cast_slice(&pack(l, n)));
        }
        let resident = Resident {
            p,
            g,
            g2: None,
            m,
            v,
            partials: plan.alloc(dev, "grad norm partials")?,
            sumsq: plan.alloc(dev, "grad norm squared")?,
            readback_bytes: plan.get("optimizer readback")?.bytes(),
            adamw: AdamWStep::new(dev),
            sum_squares: SumSquares::new(dev),
            add: ResidualAdd::new(dev, FLAT_ROW),
            device: dev.clone(),
            queue: model.queue.clone(),
            template: state.lora.zeros_like(),
            readback: None,
        };
        // The readback of a checkpoint or an export: made now, so the run's memory is what the
        // table says from its first step on.
        let mut resident = resident;
        resident.readback = Some(dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("optimizer readback"),
            size: resident.readback_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }));
        model.errors.take()?;
        Ok(GpuState {
            serial,
            version: 0,
            config,
            home: Home::Gpu(Box::new(resident)),
        })
    }

    /// Whether the adapter and moments stay on the GPU.
    pub fn resident(&self) -> bool {
        matches!(self.home, Home::Gpu(_))
    }

    /// GPU bytes of the resident buffers (0 on the host).
    pub fn bytes(&self) -> u64 {
        match &self.home {
            Home::Gpu(r) => r.bytes(),
            Home::Host { .. } => 0,
        }
    }

    /// One AdamW update with the step's gradients. On the GPU it is recorded and submitted
    /// without waiting (the next submission runs after it).
    pub fn update(&mut self, s: &AdamWScalars) -> Result<(), GpuError> {
        match &mut self.home {
            Home::Gpu(r) => {
                let mut rec = Recorder::new(&r.device);
                r.adamw.encode(&mut rec, s, &r.p, &r.g, &r.m, &r.v)?;
                rec.submit(&r.queue);
            }
            Home::Host { state, grads } => {
                let mut g = grads.take().ok_or(GpuError::Shape {
                    op: "GpuState",
                    msg: "an optimizer update without a step's gradients".into(),
                })?;
                adamw_update(s, &mut state.lora, &mut g, &mut state.m, &mut state.v);
            }
        }
        self.version += 1;
        Ok(())
    }

    /// A copy of the adapter and the moments: on the GPU, `p`, `m` and `v` read back one after
    /// the other through one buffer of at most [`super::plan::READBACK_CHUNK_ROWS`] rows, a
    /// chunk at a time.
    pub async fn read(&mut self) -> Result<AdapterState, GpuError> {
        let r = match &mut self.home {
            Home::Host { state, .. } => return Ok(state.clone()),
            Home::Gpu(r) => r,
        };
        let n = r.p.buffer.size();
        let dev = r.device.clone();
        let size = r.readback_bytes;
        let readback = r
            .readback
            .get_or_insert_with(|| {
                dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("optimizer readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .clone();
        let mut values = Vec::with_capacity(3);
        for t in [&r.p, &r.m, &r.v] {
            let mut out = Vec::with_capacity((n / 4) as usize);
            let mut at = 0;
            while at < n {
                let len = size.min(n - at);
                let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("optimizer read"),
                });
                enc.copy_buffer_to_buffer(&t.buffer, at, &readback, 0, len);
                r.queue.submit([enc.finish()]);
                tensor::map_read(&dev, &readback, "optimizer readback").await?;
                let view = readback.get_mapped_range(..len).map_err(|e| GpuError::Map {
                    tensor: "optimizer readback".into(),
                    msg: e.to_string(),
                });
                let chunk = view.map(|v| bytemuck::pod_collect_to_vec::<u8, f32>(&v));
                readback.unmap();
                out.extend_from_slice(&chunk?);
                at += len;
            }
            values.push(out);
        }
        let unpack = |k: usize| {
            let mut l = r.template.clone();
            let values = &values[k];
            let mut at = 0;
            l.for_each_mut(|_, _, x| {
                let len = x.len();
                x.copy_from_slice(&values[at..at + len]);
                at += len;
            });
            l
        };
        Ok(AdapterState {
            lora: unpack(0),
            m: unpack(1),
            v: unpack(2),
        })
    }
}

impl GpuTrainer {
    /// One training sequence of a run whose adapter and moments are `state`: its loss, and
    /// its gradient (times `scale`) set into (`acc.first`) or added to the step's gradients,
    /// with their global norm after the step's last sequence. Resident: one submission, and
    /// one readback of the per-row losses (and, last, the squared norm). Host: the gradients
    /// are read back and summed on the CPU.
    ///
    /// One difference to the CPU: the resident squared norm is summed in f32 (the CPU sums in
    /// f64), so gradients with a norm above ~1.8e19 overflow to inf here and the step is
    /// skipped where the CPU would clip it; a run that far gone has diverged either way.
    pub async fn train_sequence(
        &mut self,
        state: &mut GpuState,
        seq: &Sequence,
        acc: Accumulate,
        scale: f32,
        rng: &mut Rng,
    ) -> Result<SequenceResult, GpuError> {
        let (counted, plan) = self.prepare(&state.config, &seq.tokens, &seq.targets, Some(rng))?;
        let t = seq.tokens.len();
        let weight = if counted > 0 {
            scale / counted as f32
        } else {
            0.0
        };
        let config = state.config.clone();
        match &mut state.home {
            Home::Gpu(res) => {
                if !acc.first {
                    res.ensure_g2()?;
                }
                let restore = self.holds != Some((state.serial, state.version));
                let mode = super::Mode::Flat {
                    first: acc.first,
                    last: acc.last,
                };
                self.holds = None;
                let values = self
                    .run(&config, Some(res.as_ref()), restore, t, weight, &plan, mode)
                    .await?;
                self.holds = Some((state.serial, state.version));
                let grad_norm = acc.last.then(|| (values[t] as f64).sqrt() as f32);
                Ok(SequenceResult {
                    loss: super::mean(&values[..t], &seq.targets, counted),
                    grad_norm,
                })
            }
            Home::Host { state: st, grads } => {
                self.hold_host(&st.lora, (state.serial, state.version));
                let values = self
                    .run(&config, None, false, t, weight, &plan, super::Mode::Staging)
                    .await?;
                let g = match grads.take() {
                    Some(g) if !acc.first => grads.insert(g),
                    _ => grads.insert(st.lora.zeros_like()),
                };
                self.add_staged(&values, g);
                Ok(SequenceResult {
                    loss: super::mean(&values[..t], &seq.targets, counted),
                    grad_norm: acc.last.then(|| AdamW::grad_norm(g)),
                })
            }
        }
    }

    /// The mean loss of `seq` with the run's adapter, forward only, dropout off.
    pub async fn sequence_loss(
        &mut self,
        state: &GpuState,
        seq: &Sequence,
    ) -> Result<StepLoss, GpuError> {
        let (counted, plan) = self.prepare(&state.config, &seq.tokens, &seq.targets, None)?;
        let t = seq.tokens.len();
        let values = match &state.home {
            Home::Gpu(res) => {
                let restore = self.holds != Some((state.serial, state.version));
                self.holds = None;
                let v = self
                    .run(
                        &state.config,
                        Some(res.as_ref()),
                        restore,
                        t,
                        0.0,
                        &plan,
                        super::Mode::Loss,
                    )
                    .await?;
                self.holds = Some((state.serial, state.version));
                v
            }
            Home::Host { state: st, .. } => {
                self.hold_host(&st.lora, (state.serial, state.version));
                self.run(&state.config, None, false, t, 0.0, &plan, super::Mode::Loss)
                    .await?
            }
        };
        Ok(super::mean(&values[..t], &seq.targets, counted))
    }
}

/// The GPU as core's training backend: a [`GpuTrainer`] (the model's weights, the pipelines
/// and the activation buffers) and the run's [`GpuState`].
pub struct GpuBackend {
    trainer: GpuTrainer,
    state: Option<GpuState>,
    placement: Placement,
    /// Host seconds of the last update (recording and submitting AdamW on the GPU, or AdamW
    /// itself on the host); measured only while profiling.
    update_s: f64,
}

impl GpuBackend {
    pub fn new(trainer: GpuTrainer) -> GpuBackend {
        GpuBackend::with_placement(trainer, Placement::Auto)
    }

    pub fn with_placement(trainer: GpuTrainer, placement: Placement) -> GpuBackend {
        GpuBackend {
            trainer,
            state: None,
            placement,
            update_s: 0.0,
        }
    }

    pub fn trainer(&self) -> &GpuTrainer {
        &self.trainer
    }

    pub fn trainer_mut(&mut self) -> &mut GpuTrainer {
        &mut self.trainer
    }

    pub fn into_trainer(self) -> GpuTrainer {
        self.trainer
    }

    /// Whether the run's adapter and moments stay on the GPU (false before a load).
    pub fn resident(&self) -> bool {
        self.state.as_ref().is_some_and(GpuState::resident)
    }

    /// GPU bytes beyond the model's weights: the trainer's buffers and the optimizer's state.
    pub fn bytes(&self) -> u64 {
        self.trainer.bytes() + self.state.as_ref().map_or(0, GpuState::bytes)
    }

    /// Host seconds of the last optimizer update (0 unless the trainer is profiling).
    pub fn update_seconds(&self) -> f64 {
        self.update_s
    }

    fn state_mut(&mut self) -> Result<&mut GpuState, GpuError> {
        self.state.as_mut().ok_or(GpuError::Shape {
            op: "GpuBackend",
            msg: "no adapter loaded (a Trainer loads it)".into(),
        })
    }
}

impl Backend for GpuBackend {
    type Error = GpuError;

    fn name(&self) -> &'static str {
        "gpu"
    }

    fn load(&mut self, state: AdapterState) -> Result<(), GpuError> {
        self.state = None;
        self.state = Some(GpuState::new(&self.trainer, state, self.placement)?);
        Ok(())
    }

    async fn forward_backward(
        &mut self,
        seq: &Sequence,
        acc: Accumulate,
        scale: f32,
        rng: &mut Rng,
    ) -> Result<SequenceResult, GpuError> {
        let state = self.state.as_mut().ok_or(GpuError::Shape {
            op: "GpuBackend",
            msg: "no adapter loaded (a Trainer loads it)".into(),
        })?;
        self.trainer
            .train_sequence(state, seq, acc, scale, rng)
            .await
    }

    async fn loss(&mut self, seq: &Sequence) -> Result<StepLoss, GpuError> {
        let state = self.state.as_ref().ok_or(GpuError::Shape {
            op: "GpuBackend",
            msg: "no adapter loaded (a Trainer loads it)".into(),
        })?;
        self.trainer.sequence_loss(state, seq).await
    }

    fn update(&mut self, s: &AdamWScalars) -> Result<(), GpuError> {
        let t0 = super::clock(self.trainer.profiling);
        self.state_mut()?.update(s)?;
        self.update_s = super::secs(t0);
        Ok(())
    }

    async fn state(&mut self) -> Result<AdapterState, GpuError> {
        self.state_mut()?.read().await
    }
}
