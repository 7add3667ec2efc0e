//! The page's training backend: core's [`Backend`] on WebGPU's resident path (the adapter,
//! its gradients and Adam's moments stay in GPU buffers; a step reads back only the losses and
//! the squared gradient norm), or on the CPU. Core's `Trainer` drives it exactly as the CLI
//! drives `bitlora_gpu::GpuBackend`: the loop is written once.
//!
//! The GPU trainer (the model's weights, pipelines and activation buffers) sits in the loaded
//! model's GPU slot (gpu_slot.rs `GpuSlot`) and serves generation too; a run borrows it for each
//! pass. The run's own state ([`GpuState`]) belongs to the run, so another run borrowing the
//! slot in between loses nothing.

use std::ops::Deref;
use std::rc::Rc;

use bitlora_core::Model;
use bitlora_core::data::Sequence;
use bitlora_core::optim::AdamWScalars;
use bitlora_core::rng::Rng;
use bitlora_core::train::StepLoss;
use bitlora_core::trainer::{Accumulate, AdapterState, Backend, CpuBackend, SequenceResult};
use wasm_bindgen::prelude::*;

use crate::{Loaded, Session};

/// The loaded model as the CPU backend holds it.
pub(crate) struct LoadedModel(pub(crate) Rc<Loaded>);

impl Deref for LoadedModel {
    type Target = Model;
    fn deref(&self) -> &Model {
        &self.0.model
    }
}

/// A run's backend: WebGPU when the session has it and the model is on it, else the CPU.
pub(crate) struct WebBackend {
    device: Device,
    /// Why a WebGPU session trains this run on the CPU (set when the GPU trainer failed).
    pub(crate) note: Option<String>,
}

enum Device {
    Cpu(CpuBackend<LoadedModel>),
    #[cfg(feature = "gpu")]
    Gpu(Box<WebGpu>),
}

/// A run on WebGPU.
#[cfg(feature = "gpu")]
pub(crate) struct WebGpu {
    loaded: Rc<Loaded>,
    gpu: Rc<bitlora_gpu::Gpu>,
    /// Tells the GPU slot which run its trainer was built for.
    owner: u64,
    /// Most tokens a sequence of this run has (the trainer's buffers are sized for it).
    context: usize,
    /// The run's `recompute` option (None: where memory is short).
    recompute: Option<bool>,
    lora: bitlora_core::lora::LoraConfig,
    /// The run's adapter and moments once on the GPU; `pending` until the first pass.
    state: Option<bitlora_gpu::GpuState>,
    pending: Option<AdapterState>,
}

#[cfg(feature = "gpu")]
thread_local! {
    static NEXT_OWNER: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

impl WebBackend {
    /// The backend of a new run: WebGPU when `gpu` is given and the model is on it.
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
    pub(crate) fn new(
        loaded: Rc<Loaded>,
        gpu: Option<Rc<crate::GpuHandle>>,
        lora: &bitlora_core::lora::LoraConfig,
        context: usize,
        recompute: Option<bool>,
    ) -> WebBackend {
        #[cfg(feature = "gpu")]
        if let (Some(gpu), Some(_)) = (gpu, &loaded.gpu_model) {
            let owner = NEXT_OWNER.with(|n| {
                let v = n.get();
                n.set(v + 1);
                v
            });
            let device = Device::Gpu(Box::new(WebGpu {
                loaded,
                gpu,
                owner,
                context,
                recompute,
                lora: lora.clone(),
                state: None,
                pending: None,
            }));
            return WebBackend { device, note: None };
        }
        WebBackend {
            device: Device::Cpu(CpuBackend::new(LoadedModel(loaded))),
            note: None,
        }
    }

    /// "webgpu" or "cpu".
    pub(crate) fn label(&self) -> &'static str {
        match self.device {
            Device::Cpu(_) => "cpu",
            #[cfg(feature = "gpu")]
            Device::Gpu(_) => "webgpu",
        }
    }

    /// GPU bytes the run holds now (the model's weights, the GPU trainer's buffers and the
    /// run's optimizer state); None on the CPU or before the first pass.
    pub(crate) fn gpu_bytes(&self) -> Option<u64> {
        match &self.device {
            Device::Cpu(_) => None,
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => {
                let state = g.state.as_ref()?.bytes();
                let slot = g.loaded.gpu_model.as_ref()?.try_borrow().ok()?;
                Some(slot.trainer_bytes()? + state)
            }
        }
    }

    /// Whether the run's GPU trainer recomputes activations in the backward; None on the CPU
    /// or before the first pass.
    pub(crate) fn recomputes(&self) -> Option<bool> {
        match &self.device {
            Device::Cpu(_) => None,
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => {
                g.state.as_ref()?;
                let slot = g.loaded.gpu_model.as_ref()?.try_borrow().ok()?;
                slot.trainer_recomputes()
            }
        }
    }

    /// Bytes the last pass read back from the GPU (0 on the CPU).
    pub(crate) fn read_bytes(&self) -> u64 {
        match &self.device {
            Device::Cpu(_) => 0,
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.read_bytes(),
        }
    }
}

/// Why a run cannot go on on WebGPU: it moves to the CPU with its state.
#[cfg(feature = "gpu")]
enum GpuFailure {
    Busy,
    Unusable(String),
}

#[cfg(feature = "gpu")]
impl WebGpu {
    /// Borrows the slot's GPU trainer for this run (built at its first use, or when another
    /// run's trainer is there) and makes sure this run's state is on the GPU.
    fn trainer(
        &mut self,
    ) -> Result<
        (
            std::cell::RefMut<'_, bitlora_gpu::GpuTrainer>,
            &mut bitlora_gpu::GpuState,
        ),
        GpuFailure,
    > {
        let tr = crate::gpu_slot::gpu_trainer(
            &self.loaded,
            &self.gpu,
            self.owner,
            &self.lora,
            self.context,
            self.recompute,
        )
        .map_err(|e| match e {
            crate::gpu_slot::GpuTrainError::Busy => GpuFailure::Busy,
            crate::gpu_slot::GpuTrainError::Unusable(why) => GpuFailure::Unusable(why),
        })?;
        if self.state.is_none() {
            let pending = self.pending.take().ok_or(GpuFailure::Unusable(
                "internal: the run has no adapter to put on the GPU".into(),
            ))?;
            match bitlora_gpu::GpuState::new(&tr, pending.clone(), bitlora_gpu::Placement::Auto) {
                Ok(s) => self.state = Some(s),
                Err(e) => {
                    self.pending = Some(pending);
                    return Err(GpuFailure::Unusable(e.to_string()));
                }
            }
        }
        let state = self.state.as_mut().ok_or(GpuFailure::Busy)?;
        Ok((tr, state))
    }

    fn read_bytes(&self) -> u64 {
        self.loaded
            .gpu_model
            .as_ref()
            .and_then(|slot| slot.try_borrow().ok().and_then(|s| s.trainer_read_bytes()))
            .unwrap_or(0)
    }

    /// The run's adapter and moments, from wherever they are.
    async fn take_state(&mut self) -> Result<AdapterState, JsError> {
        if let Some(s) = self.state.as_mut() {
            return s.read().await.map_err(|e| {
                JsError::new(&format!("WebGPU could not read the adapter back: {e}"))
            });
        }
        self.pending
            .clone()
            .ok_or_else(|| JsError::new("internal: the run has no adapter"))
    }
}

#[cfg(feature = "gpu")]
fn busy() -> JsError {
    JsError::new("the WebGPU model is busy with another pass; wait for it to finish")
}

impl WebBackend {
    /// Moves a WebGPU run to the CPU with its adapter and moments (the GPU trainer could not
    /// be built for it); returns the note the page shows.
    #[cfg(feature = "gpu")]
    async fn fall_back_to_cpu(&mut self, why: String) -> Result<(), JsError> {
        let Device::Gpu(g) = &mut self.device else {
            return Ok(());
        };
        let state = g.take_state().await?;
        let mut cpu = CpuBackend::new(LoadedModel(g.loaded.clone()));
        cpu.load(state)?;
        self.device = Device::Cpu(cpu);
        self.note = Some(format!(
            "WebGPU cannot train this run ({why}); it trains on the CPU"
        ));
        Ok(())
    }
}

impl Backend for WebBackend {
    type Error = JsError;

    fn name(&self) -> &'static str {
        self.label()
    }

    fn load(&mut self, state: AdapterState) -> Result<(), JsError> {
        match &mut self.device {
            Device::Cpu(c) => Ok(c.load(state)?),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => {
                g.state = None;
                g.pending = Some(state);
                Ok(())
            }
        }
    }

    async fn forward_backward(
        &mut self,
        seq: &Sequence,
        acc: Accumulate,
        scale: f32,
        rng: &mut Rng,
    ) -> Result<SequenceResult, JsError> {
        #[cfg(feature = "gpu")]
        if let Device::Gpu(g) = &mut self.device {
            let failure = match g.trainer() {
                Ok((mut tr, state)) => {
                    return tr
                        .train_sequence(state, seq, acc, scale, rng)
                        .await
                        .map_err(|e| JsError::new(&format!("WebGPU training step failed: {e}")));
                }
                Err(f) => f,
            };
            match failure {
                GpuFailure::Busy => return Err(busy()),
                GpuFailure::Unusable(why) => {
                    self.fall_back_to_cpu(why).await?;
                    if !acc.first {
                        // The step's earlier gradients stayed behind: run it again from its
                        // first sequence (the loop does, after an error).
                        return Err(JsError::new(
                            "the run moved from WebGPU to the CPU in the middle of a step; the step starts again",
                        ));
                    }
                }
            }
        }
        match &mut self.device {
            Device::Cpu(c) => Ok(c.forward_backward(seq, acc, scale, rng).await?),
            #[cfg(feature = "gpu")]
            Device::Gpu(_) => Err(JsError::new("internal: WebGPU run after the fallback")),
        }
    }

    async fn loss(&mut self, seq: &Sequence) -> Result<StepLoss, JsError> {
        #[cfg(feature = "gpu")]
        if let Device::Gpu(g) = &mut self.device {
            let failure = match g.trainer() {
                Ok((mut tr, state)) => {
                    return tr
                        .sequence_loss(state, seq)
                        .await
                        .map_err(|e| JsError::new(&format!("WebGPU validation failed: {e}")));
                }
                Err(f) => f,
            };
            match failure {
                GpuFailure::Busy => return Err(busy()),
                GpuFailure::Unusable(why) => {
                    self.fall_back_to_cpu(why).await?;
                }
            }
        }
        match &mut self.device {
            Device::Cpu(c) => Ok(c.loss(seq).await?),
            #[cfg(feature = "gpu")]
            Device::Gpu(_) => Err(JsError::new("internal: WebGPU run after the fallback")),
        }
    }

    fn update(&mut self, s: &AdamWScalars) -> Result<(), JsError> {
        match &mut self.device {
            Device::Cpu(c) => Ok(c.update(s)?),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g
                .state
                .as_mut()
                .ok_or_else(|| JsError::new("internal: an update before any WebGPU pass"))?
                .update(s)
                .map_err(|e| JsError::new(&format!("WebGPU optimizer step failed: {e}"))),
        }
    }

    async fn state(&mut self) -> Result<AdapterState, JsError> {
        match &mut self.device {
            Device::Cpu(c) => Ok(c.state().await?),
            #[cfg(feature = "gpu")]
            Device::Gpu(g) => g.take_state().await,
        }
    }
}

/// A WebGPU device asked for after the session's was lost (`Session.requestGpu`), or why the
/// browser granted none; `Session.replaceGpu` takes it.
#[wasm_bindgen]
pub struct NewGpu {
    #[cfg(feature = "gpu")]
    gpu: Option<bitlora_gpu::Gpu>,
    why_not: Option<String>,
}

/// Device loss (gpu_slot.rs `watch`): how the worker finds out and what it does about it.
#[wasm_bindgen]
impl Session {
    /// Why the session's WebGPU device was lost (the browser's device-lost reason and message),
    /// or null while it works or without one. Every pass on a lost device fails; the worker
    /// asks this after one does.
    #[wasm_bindgen(js_name = gpuLost)]
    pub fn gpu_lost(&self) -> Option<String> {
        #[cfg(feature = "gpu")]
        if self.gpu.is_some() {
            return crate::gpu_slot::lost();
        }
        None
    }

    /// Asks the browser for a new WebGPU device (after a loss), for `replaceGpu`, with the
    /// `limits` the session was created with (`Session.create`).
    #[wasm_bindgen(js_name = requestGpu)]
    pub async fn request_gpu(limits: Option<String>) -> NewGpu {
        #[cfg(feature = "gpu")]
        {
            let gpu = match crate::device_limits(limits.as_deref()) {
                Ok(l) => bitlora_gpu::Gpu::with_limits(l)
                    .await
                    .map_err(|e| e.to_string()),
                Err(why) => Err(why),
            };
            match gpu {
                Ok(gpu) => NewGpu {
                    gpu: Some(gpu),
                    why_not: None,
                },
                Err(e) => NewGpu {
                    gpu: None,
                    why_not: Some(e),
                },
            }
        }
        #[cfg(not(feature = "gpu"))]
        let _ = limits;
        #[cfg(not(feature = "gpu"))]
        NewGpu {
            why_not: Some("this build has no WebGPU backend".into()),
        }
    }

    /// Replaces a lost WebGPU device with `new` and puts the loaded model's weights on it (the
    /// old device's buffers are dropped); without a new device (or when the model does not go
    /// onto it) everything runs on the CPU from now on. Runs created before keep the old
    /// device: the worker resumes them from their checkpoints. Returns the session's backend
    /// (BackendInfo) as it is now.
    #[wasm_bindgen(js_name = replaceGpu)]
    pub fn replace_gpu(&mut self, device: NewGpu) -> Result<JsValue, JsError> {
        #[cfg(feature = "gpu")]
        {
            let why =
                crate::gpu_slot::lost().unwrap_or_else(|| "the WebGPU device was lost".into());
            let mut gpu = device.gpu;
            let mut why_cpu = device
                .why_not
                .map(|e| format!("{why}, and the browser granted no new one ({e})"));
            if let Some(loaded) = &self.loaded
                && let Some(slot) = &loaded.gpu_model
            {
                let mut s = slot
                    .try_borrow_mut()
                    .map_err(|_| JsError::new("the WebGPU model is busy with another pass"))?;
                s.adapter = None;
                s.holder = crate::gpu_slot::GpuHolder::Empty;
                if let Some(g) = &gpu {
                    match bitlora_gpu::GpuModel::new(g, &loaded.model) {
                        Ok(m) => s.holder = crate::gpu_slot::GpuHolder::Model(Box::new(m)),
                        Err(e) => {
                            why_cpu = Some(format!(
                                "{why}, and the new device could not take the model ({e})"
                            ));
                            gpu = None;
                        }
                    }
                }
            }
            match gpu {
                Some(g) => {
                    crate::gpu_slot::watch(&g);
                    self.backend.adapter = Some(g.info.clone());
                    self.gpu = Some(Rc::new(g));
                }
                None => {
                    self.gpu = None;
                    self.backend = crate::cpu_backend(format!(
                        "{}; the CPU runs everything from now on",
                        why_cpu.unwrap_or(why)
                    ));
                }
            }
        }
        #[cfg(not(feature = "gpu"))]
        let _ = device;
        crate::to_js(&self.backend)
    }

    /// Test hook (tests/browser/faults.test.mjs): destroys the session's WebGPU device as a
    /// driver reset or a crashed GPU process would lose it; the device-lost callback fires and
    /// every later pass on it fails. Errors without a WebGPU device.
    #[wasm_bindgen(js_name = debugLoseGpu)]
    pub fn debug_lose_gpu(&self) -> Result<(), JsError> {
        #[cfg(feature = "gpu")]
        if let Some(gpu) = &self.gpu {
            gpu.device.destroy();
            return Ok(());
        }
        Err(JsError::new(
            "this session has no WebGPU device to lose (it runs on the CPU)",
        ))
    }
}
