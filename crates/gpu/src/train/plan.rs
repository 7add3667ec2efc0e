//! One table of a GPU training run's buffers (as llm.c's `fill_in_activation_sizes`): every
//! buffer's name, shape and dtype is listed here once. [`super::GpuTrainer`] and
//! [`super::GpuState`] allocate each buffer by looking its name up in the table, and the memory
//! estimate (the page's `estimateMemory`, the CLI's print) sums the same table, so the estimate
//! is the bytes that get allocated: a buffer allocated without an entry is an error, an entry
//! never allocated shows as a difference in the tests that compare the two.

use std::collections::HashMap;

use bitlora_core::Config;
use bitlora_core::lora::LoraConfig;
use bitlora_core::model::Proj;

use super::optimizer::FLAT_ROW;
use crate::GpuError;
use crate::ops::SumSquares;
use crate::tensor::{DType, GpuTensor};

/// What a buffer is for (the estimate's groups).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Saved by the forward for the backward, per layer.
    Saved,
    /// Scratch of the forward and the backward, reused by every layer.
    Scratch,
    /// The adapter's A and B as the kernels bind them, and their gradients.
    Adapter,
    /// The head's window of logits rows and its split backward's partial sums.
    Head,
    /// Map-read buffers the host reads results through.
    Readback,
    /// The run's resident optimizer state: the adapter, the step's gradients, Adam's m and v,
    /// the norm's partial sums.
    Optimizer,
}

/// One buffer of the table.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub role: Role,
}

impl Planned {
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(&self.shape)
    }
}

/// What the table depends on beyond the model's config and the adapter's shape.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Most tokens one pass takes (T_max).
    pub max_tokens: usize,
    /// The device's largest storage binding, in bytes.
    pub max_binding: u64,
    /// Whether the head's backward splits the vocabulary across workgroups (GPUs do; CPU
    /// adapters such as lavapipe and SwiftShader do not).
    pub split_head: bool,
    /// Whether steps sum several sequences (a second gradient buffer).
    pub accumulate: bool,
    /// Activation recomputation: the forward keeps only each layer's input h[l] and one
    /// layer's worth of the other saved activations, which the backward recomputes layer by
    /// layer ([`Recompute`]).
    pub recompute: bool,
}

/// Activation recomputation (checkpointing per layer). Off, the forward keeps every layer's
/// activations for the backward (h, h_mid, q, k, v, attention, gate, up and the adapters' u:
/// at T = 128 about 240 MB for the 1b shape). On, it keeps each layer's input h[l] and one
/// layer's worth of the rest; the backward runs each layer's forward again from h[l] before
/// that layer's backward: the same kernels on the same inputs, so the same bits, for about one
/// more forward pass of work per step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// On where memory is short: on a device with a phone's limits (buffers of at most
    /// [`Recompute::SHORT_BUFFER`] bytes), off elsewhere.
    #[default]
    Auto,
    On,
    Off,
}

/// A training config's `recompute` (core's `TrainConfig::recompute`): None is `Auto`.
impl From<Option<bool>> for Recompute {
    fn from(forced: Option<bool>) -> Recompute {
        match forced {
            None => Recompute::Auto,
            Some(true) => Recompute::On,
            Some(false) => Recompute::Off,
        }
    }
}

impl Recompute {
    /// The largest buffer a device that [`Recompute::Auto`] treats as short of memory allows:
    /// WebGPU's default `maxBufferSize` (256 MiB), what Android's browsers grant.
    pub const SHORT_BUFFER: u64 = 256 << 20;

    /// Whether a run on a device whose largest buffer is `max_buffer` bytes recomputes.
    pub fn resolve(self, max_buffer: u64) -> bool {
        match self {
            Recompute::On => true,
            Recompute::Off => false,
            Recompute::Auto => max_buffer <= Self::SHORT_BUFFER,
        }
    }

    /// Parses `on`, `off` or `auto` (the CLI's `--recompute`, the page's option).
    pub fn parse(s: &str) -> Option<Recompute> {
        match s {
            "auto" => Some(Recompute::Auto),
            "on" => Some(Recompute::On),
            "off" => Some(Recompute::Off),
            _ => None,
        }
    }
}

/// The table: every buffer of a training run on the GPU.
#[derive(Clone, Debug)]
pub struct TrainPlan {
    pub buffers: Vec<Planned>,
    index: HashMap<String, usize>,
    /// Whether the optimizer's flat buffers fit one binding (else the state stays on the host
    /// and the table has no [`Role::Optimizer`] entries).
    pub resident: bool,
    /// Whether the run recomputes activations ([`PlanOptions::recompute`]).
    pub recompute: bool,
}

/// Most bytes of the head's window of logits rows. A window of 128 rows fits for a 32k
/// vocabulary (15.6 MiB); 2B-4T's 128,256 entries take 32 rows a window (15.7 MiB) instead of
/// 128 (62.6 MiB): four passes of the head, each reading the embedding once more (~0.1 ms
/// a pass on an H200), for 47 MiB less (issue 17's memory target).
pub const HEAD_WINDOW_BYTES: u64 = 16 << 20;

/// Rows of logits per window of the head: as many as one binding and
/// [`HEAD_WINDOW_BYTES`] hold.
pub(super) fn head_rows(cfg: &Config, opts: &PlanOptions) -> usize {
    let bytes = opts.max_binding.min(HEAD_WINDOW_BYTES);
    ((bytes / (4 * cfg.vocab_size as u64)) as usize).clamp(1, opts.max_tokens)
}

/// Rows of [`FLAT_ROW`] floats of the optimizer's readback: the flat buffers are read back
/// (a checkpoint, an export) a chunk at a time through it, so it needs no flat buffer's size.
pub const READBACK_CHUNK_ROWS: usize = 256; // 4 MiB

/// Slabs the head backward splits the vocabulary into on a GPU: enough workgroups to fill a
/// large GPU (~512), each slab at least 256 rows of the vocabulary, as many as one binding
/// holds; 1 means no split.
pub(super) fn head_slabs(cfg: &Config, rows: usize, max_binding: u64) -> usize {
    let groups = cfg.hidden_size.div_ceil(4).div_ceil(crate::ops::WG) * rows.div_ceil(8);
    let want = 512usize
        .div_ceil(groups.max(1))
        .min(cfg.vocab_size / 256)
        .clamp(1, 64);
    let fit = (max_binding / (4 * (rows * cfg.hidden_size) as u64).max(1)) as usize;
    want.min(fit)
}

/// The table's name of projection p's gradient of A or B (`ab`), shared by the layers.
pub(super) fn grad_name(p: Proj, ab: &str) -> String {
    format!("model.layers.*.{}.lora_{ab}.grad", p.hf_name())
}

/// Floats of all the adapter's tensors: the size of each flat optimizer buffer's content.
pub(super) fn adapter_floats(cfg: &Config, lora: &LoraConfig) -> usize {
    let r = lora.r;
    cfg.num_hidden_layers
        * Proj::ALL
            .iter()
            .filter(|&&p| lora.targets[p])
            .map(|&p| {
                let (o, i) = p.shape(cfg);
                r * i + o * r
            })
            .sum::<usize>()
}

impl TrainPlan {
    /// The table for `cfg` and an adapter of `lora`'s shape.
    pub fn new(cfg: &Config, lora: &LoraConfig, opts: &PlanOptions) -> TrainPlan {
        let mut plan = TrainPlan {
            buffers: Vec::new(),
            index: HashMap::new(),
            resident: false,
            recompute: opts.recompute,
        };
        let rows = opts.max_tokens.min(cfg.max_position_embeddings);
        let (c, f, l, v) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.vocab_size,
        );
        let (qd, kvd, nh, r) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_attention_heads, lora.r);
        let max_i = Proj::ALL.iter().map(|p| p.shape(cfg).1).max().unwrap_or(c);
        use DType::{F32, I8x4, U32};
        use Role::*;

        // Per pass: tokens, targets, per-row losses, the activation scales.
        plan.add("train tokens", &[rows], U32, Scratch);
        plan.add("train targets", &[rows], U32, Scratch);
        plan.add("train loss", &[rows], F32, Scratch);
        plan.add("train s_a", &[rows], F32, Scratch);
        // Saved by the forward, per layer: (T, width). Recomputing, one layer's worth of all
        // but h (slot 0, overwritten by each layer's forward and by its recomputation).
        let kept = saved_layers(l, opts.recompute);
        for (what, cols, n) in [
            ("h", c, l + 1),
            ("h_mid", c, kept),
            ("q", qd, kept),
            ("k", kvd, kept),
            ("v", kvd, kept),
            ("attention", qd, kept),
            ("gate", f, kept),
            ("up", f, kept),
        ] {
            for layer in 0..n {
                plan.add(&saved(what, layer), &[rows, cols], F32, Saved);
            }
        }
        for layer in 0..kept {
            for p in Proj::ALL.into_iter().filter(|&p| lora.targets[p]) {
                plan.add(&lora_u(layer, p), &[rows, r], F32, Saved);
            }
        }
        // Scratch of the forward (recomputed in the backward) and of the backward: (T, width).
        for (name, cols, dtype) in [
            ("train x", c, F32),
            ("train x_q (C)", c, I8x4),
            ("train x_q (NH*HS)", qd, I8x4),
            ("train x_q (F)", f, I8x4),
            ("train attention (sub-normed)", qd, F32),
            ("train ffn", f, F32),
            ("train ffn (sub-normed)", f, F32),
            ("d h", c, F32),
            ("d x", c, F32),
            ("d attention (sub-normed)", qd, F32),
            ("d attention", qd, F32),
            ("d q", qd, F32),
            ("d k", kvd, F32),
            ("d v", kvd, F32),
            ("d ffn (sub-normed) / d gate", f, F32),
            ("d ffn", f, F32),
            ("d up", f, F32),
            ("d u", r, F32),
            ("dropout(x)", max_i, F32),
            ("d dropout(x)", max_i, F32),
        ] {
            plan.add(name, &[rows, cols], dtype, Scratch);
        }
        plan.add("attention backward stats", &[nh, rows, 3], F32, Scratch);

        // The adapter as the kernels bind it, and one layer's gradients per projection: each
        // layer's backward ends by copying its dA and dB to where the pass gathers them (the
        // optimizer's flat gradients, or the readback), so the next layer reuses them.
        for layer in 0..l {
            for p in Proj::ALL.into_iter().filter(|&p| lora.targets[p]) {
                let (o, i) = p.shape(cfg);
                let n = format!("model.layers.{layer}.{}", p.hf_name());
                plan.add(&format!("{n}.lora_A.weight"), &[r, i], F32, Adapter);
                plan.add(&format!("{n}.lora_B.weight"), &[o, r], F32, Adapter);
            }
        }
        for p in Proj::ALL.into_iter().filter(|&p| lora.targets[p]) {
            let (o, i) = p.shape(cfg);
            plan.add(&grad_name(p, "A"), &[r, i], F32, Adapter);
            plan.add(&grad_name(p, "B"), &[o, r], F32, Adapter);
        }

        // The head: a window of logits rows; the split backward's partial sums.
        let hr = head_rows(cfg, opts);
        plan.add("train logits window", &[hr, v], F32, Head);
        let slabs = head_slabs(cfg, hr, opts.max_binding);
        if opts.split_head && slabs > 1 {
            plan.add("head backward slabs", &[slabs, hr, c], F32, Head);
        }

        // The resident optimizer (GpuState), when its flat buffers fit one binding.
        let grads = adapter_floats(cfg, lora);
        let flat_rows = grads.div_ceil(FLAT_ROW).max(1);
        plan.resident = (4 * flat_rows * FLAT_ROW) as u64 <= opts.max_binding;

        // The readback of a pass: T losses, then the squared gradient norm (resident) or every
        // dA and dB (the host optimizer's staging mode). A staging pass on a resident run's
        // trainer (tests, `bench train --placement host`) grows it then, outside this table.
        let tail = if plan.resident { 1 } else { grads };
        plan.add("train readback", &[rows + tail], F32, Readback);
        if plan.resident {
            for what in ["adapter", "gradients", "m", "v"] {
                plan.add(
                    &format!("optimizer {what}"),
                    &[flat_rows, FLAT_ROW],
                    F32,
                    Optimizer,
                );
            }
            if opts.accumulate {
                plan.add(
                    "optimizer gradients (next sequence)",
                    &[flat_rows, FLAT_ROW],
                    F32,
                    Optimizer,
                );
            }
            plan.add(
                "grad norm partials",
                &[SumSquares::PARTIALS],
                F32,
                Optimizer,
            );
            plan.add("grad norm squared", &[1], F32, Optimizer);
            // A checkpoint or an export reads p, m and v back through it, a chunk at a time.
            plan.add(
                "optimizer readback",
                &[flat_rows.min(READBACK_CHUNK_ROWS), FLAT_ROW],
                F32,
                Readback,
            );
        }
        plan
    }

    fn add(&mut self, name: &str, shape: &[usize], dtype: DType, role: Role) {
        self.index.insert(name.to_string(), self.buffers.len());
        self.buffers.push(Planned {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            role,
        });
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Result<&Planned, GpuError> {
        self.index
            .get(name)
            .map(|&i| &self.buffers[i])
            .ok_or_else(|| GpuError::Shape {
                op: "TrainPlan",
                msg: format!("`{name}` is not in the table of training buffers"),
            })
    }

    /// Allocates the buffer called `name` with its table shape (zeros).
    pub(super) fn alloc(&self, dev: &wgpu::Device, name: &str) -> Result<GpuTensor, GpuError> {
        let e = self.get(name)?;
        GpuTensor::zeros(dev, name, &e.shape, e.dtype)
    }

    /// Bytes of every buffer in the table.
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(Planned::bytes).sum()
    }

    /// Bytes of the buffers with `role`.
    pub fn bytes_of(&self, role: Role) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.role == role)
            .map(Planned::bytes)
            .sum()
    }

    /// The largest buffer, in bytes.
    pub fn largest(&self) -> u64 {
        self.buffers.iter().map(Planned::bytes).max().unwrap_or(0)
    }
}

/// How many layers' activations other than h the forward keeps: all `layers`, or one when
/// recomputing.
pub(super) fn saved_layers(layers: usize, recompute: bool) -> usize {
    if recompute { layers.min(1) } else { layers }
}

/// The table's name of a buffer saved per layer.
pub(super) fn saved(what: &str, layer: usize) -> String {
    format!("train {what} (layer {layer})")
}

/// The table's name of x A^T saved for projection `p` of `layer`.
pub(super) fn lora_u(layer: usize, p: Proj) -> String {
    format!("lora u layer {layer} {}", p.hf_name())
}
