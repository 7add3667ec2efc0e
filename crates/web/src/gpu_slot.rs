//! The loaded model's place on the GPU, lent between inference and training: a plain
//! `GpuModel`, or the model inside a run's `GpuTrainer` (which still serves inference), so the
//! weights are uploaded once. Generation borrows it with its adapter (`use_gpu_adapter`), a
//! training run with its trainer (`gpu_trainer`); the worker runs one pass at a time.

use std::cell::RefCell;

use wasm_bindgen::prelude::*;

use crate::{Loaded, LoraAdapter};

/// The loaded model on the GPU: a plain `GpuModel`, or one lent to a `GpuTrainer` (which owns
/// it, and whose model still serves inference), so the weights are uploaded once.
pub(crate) struct GpuSlot {
    pub(crate) holder: GpuHolder,
    /// `LoraAdapter::serial` of the inference adapter uploaded, None for the plain model.
    pub(crate) adapter: Option<u64>,
}

pub(crate) enum GpuHolder {
    Model(Box<bitlora_gpu::GpuModel>),
    /// Built for the run `owner` (its rank, targets and context).
    Trainer {
        trainer: Box<bitlora_gpu::GpuTrainer>,
        owner: u64,
    },
    /// Only while a trainer is being built, or after uploading the model again failed.
    Empty,
}

impl GpuSlot {
    /// GPU bytes of the model's weights and the GPU trainer's buffers, when a trainer is there.
    pub(crate) fn trainer_bytes(&self) -> Option<u64> {
        match &self.holder {
            GpuHolder::Trainer { trainer, .. } => {
                Some(trainer.model().weight_bytes() + trainer.bytes())
            }
            _ => None,
        }
    }

    /// Whether the GPU trainer recomputes activations, when a trainer is there.
    pub(crate) fn trainer_recomputes(&self) -> Option<bool> {
        match &self.holder {
            GpuHolder::Trainer { trainer, .. } => Some(trainer.plan().recompute),
            _ => None,
        }
    }

    /// Bytes the GPU trainer's last pass read back, when a trainer is there.
    pub(crate) fn trainer_read_bytes(&self) -> Option<u64> {
        match &self.holder {
            GpuHolder::Trainer { trainer, .. } => Some(trainer.read_bytes()),
            _ => None,
        }
    }

    pub(crate) fn model_mut(&mut self) -> Option<&mut bitlora_gpu::GpuModel> {
        match &mut self.holder {
            GpuHolder::Model(m) => Some(m),
            GpuHolder::Trainer { trainer, .. } => Some(trainer.model_mut()),
            GpuHolder::Empty => None,
        }
    }
}

/// Why a run cannot use the GPU trainer now.
pub(crate) enum GpuTrainError {
    /// Another pass holds the GPU model (a bug in the caller's ordering).
    Busy,
    /// This run cannot train on this GPU (e.g. a tensor larger than a binding): train on the CPU.
    Unusable(String),
}

/// The GPU trainer for run `owner`, built (from the loaded model's GPU weights) at its first
/// use or when another run's trainer is there.
pub(crate) fn gpu_trainer<'a>(
    loaded: &'a Loaded,
    gpu: &bitlora_gpu::Gpu,
    owner: u64,
    lora: &bitlora_core::lora::LoraConfig,
    max_tokens: usize,
    recompute: Option<bool>,
) -> Result<std::cell::RefMut<'a, bitlora_gpu::GpuTrainer>, GpuTrainError> {
    let recompute = bitlora_gpu::Recompute::from(recompute);
    let slot = loaded
        .gpu_model
        .as_ref()
        .ok_or_else(|| GpuTrainError::Unusable("the model is not on the GPU".into()))?;
    let mut s = slot.try_borrow_mut().map_err(|_| GpuTrainError::Busy)?;
    let reuse = matches!(&s.holder, GpuHolder::Trainer { trainer, owner: o }
        if *o == owner && trainer.max_tokens() >= max_tokens
            && trainer.plan().recompute == trainer.model().would_recompute(recompute));
    if !reuse {
        let model = match std::mem::replace(&mut s.holder, GpuHolder::Empty) {
            GpuHolder::Model(m) => Ok(*m),
            GpuHolder::Trainer { trainer, .. } => Ok(trainer.into_model()),
            GpuHolder::Empty => {
                s.adapter = None;
                bitlora_gpu::GpuModel::new(gpu, &loaded.model)
            }
        };
        let mut model = model.map_err(|e| GpuTrainError::Unusable(e.to_string()))?;
        model.set_recompute(recompute);
        match bitlora_gpu::GpuTrainer::try_new(model, lora, max_tokens) {
            Ok(t) => {
                s.holder = GpuHolder::Trainer {
                    trainer: Box::new(t),
                    owner,
                }
            }
            Err(failed) => {
                // The model comes back with the error and keeps serving inference.
                let (e, model) = *failed;
                s.holder = GpuHolder::Model(Box::new(model));
                return Err(GpuTrainError::Unusable(e.to_string()));
            }
        }
    }
    std::cell::RefMut::filter_map(s, |s| match &mut s.holder {
        GpuHolder::Trainer { trainer, .. } => Some(trainer.as_mut()),
        _ => None,
    })
    .map_err(|_| GpuTrainError::Unusable("internal: the GPU trainer vanished".into()))
}

/// Borrows the GPU model with `adapter` (None: the plain model) uploaded, uploading it only when
/// another one is there; None when the model is not on the GPU any more (the caller uses the
/// CPU). The borrow lasts for the caller's pass; the worker runs one pass at a time, so finding
/// it taken means a bug in the caller, reported rather than panicking.
pub(crate) fn use_gpu_adapter<'a>(
    slot: &'a RefCell<GpuSlot>,
    adapter: Option<&LoraAdapter>,
) -> Result<Option<std::cell::RefMut<'a, bitlora_gpu::GpuModel>>, JsError> {
    let mut slot = slot.try_borrow_mut().map_err(|_| {
        JsError::new("the WebGPU model is busy with another pass; wait for it to finish")
    })?;
    let want = adapter.map(|a| a.serial);
    let current = slot.adapter;
    let Some(model) = slot.model_mut() else {
        return Ok(None);
    };
    if current != want {
        model
            .set_adapter(adapter.map(|a| a.lora.as_ref()))
            .map_err(|e| JsError::new(&format!("WebGPU could not take the adapter: {e}")))?;
    }
    slot.adapter = want;
    Ok(std::cell::RefMut::filter_map(slot, GpuSlot::model_mut).ok())
}

// ---- device loss ------------------------------------------------------------------------------
//
// A WebGPU device can be lost at any time (a driver reset, the GPU process crashing, the tab
// backgrounded on some systems, `GPUDevice.destroy()`): every later pass on it fails. The
// browser resolves the device's `lost` promise, which wgpu turns into the device-lost callback;
// `watch` records its reason here, and the worker asks (`Session.gpuLost`) after a pass fails,
// then replaces the device (`Session.requestGpu` / `replaceGpu`, backend.rs) and resumes the run
// from its last stored checkpoint.

thread_local! {
    /// Which device `watch` last watched (a serial), and why it was lost, once it was.
    static WATCHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static LOST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records in [`lost`] why `gpu`'s device is lost, when it is; a device watched before it is
/// forgotten (its callback may still fire, late, and is ignored).
pub(crate) fn watch(gpu: &bitlora_gpu::Gpu) {
    let serial = WATCHED.with(|w| {
        w.set(w.get() + 1);
        w.get()
    });
    LOST.with(|l| *l.borrow_mut() = None);
    gpu.device.set_device_lost_callback(move |reason, message| {
        if WATCHED.with(|w| w.get()) != serial {
            return;
        }
        let reason = match reason {
            bitlora_gpu::wgpu::DeviceLostReason::Destroyed => "destroyed",
            bitlora_gpu::wgpu::DeviceLostReason::Unknown => "lost",
        };
        // The browser's message is a sentence ("Device was destroyed."); ours goes on.
        let message = message.trim().trim_end_matches('.');
        let why = if message.is_empty() {
            format!("the WebGPU device was {reason}")
        } else {
            format!("the WebGPU device was {reason}: {message}")
        };
        LOST.with(|l| *l.borrow_mut() = Some(why));
    });
}

/// Why the watched device was lost, or None while it works.
pub(crate) fn lost() -> Option<String> {
    LOST.with(|l| l.borrow().clone())
}
