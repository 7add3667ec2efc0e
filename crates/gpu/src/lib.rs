//! bitlora-gpu: the wgpu backend. The same forward pass as `bitlora_core::Model::logits`, run
//! as WGSL compute shaders through wgpu: natively on Vulkan (Mesa lavapipe in CI, a real GPU
//! elsewhere) and in the browser on WebGPU.
//!
//! Layout, one concern per file:
//! - `shaders/*.wgsl` (repository root): one shader per op, every binding annotated with its
//!   shape, specialised with `override` constants.
//! - [`ops`]: one launcher per shader. Its doc comment lists the shapes; `encode` checks the
//!   tensors it is given against them before recording the dispatch.
//! - [`tensor`]: [`GpuTensor`] (a buffer with a name, a shape and an element type), uploads,
//!   async readbacks.
//! - [`record`]: [`Recorder`], one command encoder + compute pass for a sequence of dispatches.
//! - training kernels (`ops::*Backward`, [`ops::CrossEntropy`], [`ops::LoraMatmul`],
//!   [`ops::AdamWStep`]): the backward of every op, the loss, the LoRA products and the
//!   optimizer step, each tested against `bitlora_core::train` / `optim` (tests/backward.rs).
//! - [`model`]: [`GpuModel`], the weights on the GPU, the KV-cached forward pass
//!   ([`GpuKvCache`]), generation, and a LoRA adapter applied unmerged
//!   ([`GpuModel::set_adapter`], tests/adapter.rs).
//! - [`train`]: [`GpuTrainer`], LoRA training: the forward that saves activations, the loss
//!   and the backward chained into one submission per step, with one readback of the loss and
//!   the LoRA gradients (tests/train.rs, against PEFT's gradients and the CPU reference).
//!
//! Everything that waits on the GPU is `async`: on the web the browser drives the device, so
//! nothing may block; natively the futures poll the device themselves (use `pollster`).
//!
//! No shader-f16 and no subgroups: the browsers' SwiftShader adapter lacks f16 and wgpu's web
//! backend does not expose subgroups.

pub mod model;
pub mod ops;
pub mod record;
pub mod tensor;
pub mod train;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The wgpu this crate is built on, for callers that name its types (a device-lost reason).
pub use wgpu;

pub use model::{DecodeHostTimes, GpuKvCache, GpuModel, PassProfile};
pub use record::{DispatchTimes, PassClock, Profiler, Recorder};
pub use tensor::{DType, GpuTensor, SplitTensor};
pub use train::{
    GpuBackend, GpuState, GpuTrainer, Placement, PlanOptions, Planned, Recompute, Role,
    StepProfile, TrainPlan,
};

/// Errors of the GPU backend. Each names the tensor, op or adapter involved.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter was granted ({reason}); natively install a Vulkan driver (e.g. mesa-vulkan-drivers), in a browser enable WebGPU"
    )]
    NoAdapter { reason: String },

    #[error("the GPU adapter `{adapter}` refused to create a device: {msg}")]
    RequestDevice { adapter: String, msg: String },

    #[error(
        "tensor `{tensor}` needs {bytes} bytes, more than this GPU allows in one storage buffer ({limit} bytes); only the embedding and the head are split along the vocabulary, so this model (or this many tokens at once) does not fit this GPU"
    )]
    TooLarge {
        tensor: String,
        bytes: u64,
        limit: u64,
    },

    #[error(transparent)]
    Model(#[from] bitlora_core::Error),

    /// A launcher was given tensors of the wrong shape or type: a bug in the caller.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("{op}: {groups} workgroups along one dimension exceed this GPU's limit of {limit}")]
    Dispatch {
        op: &'static str,
        groups: u64,
        limit: u32,
    },

    #[error("reading `{tensor}` back from the GPU failed: {msg}")]
    Map { tensor: String, msg: String },

    /// A validation or out-of-memory error the device reported (wgpu's error scopes, or an
    /// uncaptured error caught by the handler [`Gpu::new`] installs).
    #[error("the GPU device reported an error: {0}")]
    Device(String),
}

/// What the page and the CLI show about the adapter in use.
#[derive(serde::Serialize, Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_size_x: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub features: Vec<String>,
}

/// The wgpu instance devices are asked of. Natively one per process: wgpu-core numbers each
/// instance's devices from the start, and `wgpu::Device`'s equality and hash compare those
/// numbers only, so the devices of two instances were equal keys of [`record::kernel_cache`]
/// and the second device was handed the first one's pipelines (a wgpu-core panic on its first
/// dispatch; tests/limits.rs runs two devices side by side). In the browser every device has an
/// identity of its own, and the instance holds nothing across calls.
fn instance() -> wgpu::Instance {
    let make =
        || wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    #[cfg(not(target_arch = "wasm32"))]
    {
        static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
        INSTANCE.get_or_init(make).clone()
    }
    #[cfg(target_arch = "wasm32")]
    make()
}

/// Which limits [`Gpu::with_limits`] asks the adapter for.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum DeviceLimits {
    /// The adapter's own (what [`Gpu::new`] asks for): lavapipe 128 MiB storage bindings,
    /// SwiftShader in Chromium 1 GiB, a desktop GPU 2-4 GiB.
    #[default]
    Adapter,
    /// WebGPU's default limits ([`wgpu::Limits::defaults`]), those a phone's browser grants
    /// (Chrome on Android: maxStorageBufferBindingSize 128 MiB, maxBufferSize 256 MiB), each
    /// lowered further where the adapter has less.
    Phone,
    /// These limits, each lowered where the adapter has less.
    Custom(Box<wgpu::Limits>),
}

impl DeviceLimits {
    /// The limits to request from an adapter that has `adapter`.
    pub fn resolve(&self, adapter: &wgpu::Limits) -> wgpu::Limits {
        match self {
            DeviceLimits::Adapter => adapter.clone(),
            DeviceLimits::Phone => wgpu::Limits::defaults().or_worse_values_from(adapter),
            DeviceLimits::Custom(l) => (**l).clone().or_worse_values_from(adapter),
        }
    }
}

/// A device and its queue, with what the adapter is.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: AdapterSummary,
    errors: ErrorSink,
}

/// Errors the device reports outside any error scope. wgpu's default handler panics natively;
/// this one records them, and the next forward pass returns them as [`GpuError::Device`].
#[derive(Clone, Default)]
pub(crate) struct ErrorSink {
    errors: Arc<Mutex<Vec<String>>>,
    /// Errors recorded since the device was made (never goes down, unlike `errors`).
    total: Arc<AtomicUsize>,
}

impl ErrorSink {
    fn install(&self, device: &wgpu::Device) {
        let sink = self.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.total.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut v) = sink.errors.lock() {
                v.push(e.to_string());
            }
        }));
    }

    /// The first recorded error, if any (and forgets them all).
    pub(crate) fn take(&self) -> Result<(), GpuError> {
        let mut v = match self.errors.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        match v.drain(..).next() {
            Some(e) => Err(GpuError::Device(e)),
            None => Ok(()),
        }
    }

    /// Errors recorded since the device was made (natively a creation's error is recorded
    /// before the call that caused it returns).
    pub(crate) fn count(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

impl Gpu {
    /// Asks for the best adapter and a device with the adapter's own limits (lavapipe: 128 MiB
    /// storage bindings; SwiftShader in Chromium: 1 GiB; the WebGPU defaults would cap every
    /// adapter at 128 MiB). No optional features are requested ([`Gpu::with_timestamps`] asks
    /// for timestamp queries). The backends can be narrowed
    /// with `WGPU_BACKEND` (e.g. `vulkan`) natively.
    pub async fn new() -> Result<Gpu, GpuError> {
        Self::with_features(wgpu::Features::empty()).await
    }

    /// As [`Gpu::new`], also asking for `Features::TIMESTAMP_QUERY` where the adapter has it
    /// (for [`record::Profiler`]; whether it was granted shows in `device.features()`).
    pub async fn with_timestamps() -> Result<Gpu, GpuError> {
        Self::with_features(wgpu::Features::TIMESTAMP_QUERY).await
    }

    /// As [`Gpu::new`], asking for those of `wanted` the adapter has.
    async fn with_features(wanted: wgpu::Features) -> Result<Gpu, GpuError> {
        Self::request(wanted, DeviceLimits::Adapter).await
    }

    /// As [`Gpu::new`], with the device's limits chosen by `limits`: [`DeviceLimits::Phone`]
    /// asks for WebGPU's default limits (what a phone's browser grants: 128 MiB storage
    /// bindings, 256 MiB buffers, 16 KiB of workgroup memory, 256 invocations per workgroup,
    /// 8 storage buffers per stage), so that everything the backend allocates and binds is
    /// held to them. The device enforces the limits it was created with, not the adapter's:
    /// a buffer or a binding past them is a validation error ([`GpuError::Device`], or
    /// [`Gpu::check_errors`] when it happens outside a pass), never a silent success.
    /// tests/limits.rs and tests/browser/limits.test.mjs train and decode through it.
    pub async fn with_limits(limits: DeviceLimits) -> Result<Gpu, GpuError> {
        Self::request(wgpu::Features::empty(), limits).await
    }

    async fn request(wanted: wgpu::Features, limits: DeviceLimits) -> Result<Gpu, GpuError> {
        let adapter = instance()
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::NoAdapter {
                reason: e.to_string(),
            })?;
        let ainfo = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("bitlora"),
                required_features: wanted & adapter.features(),
                required_limits: limits.resolve(&adapter.limits()),
                // wgpu's default (Performance) suballocates device memory from 128-256 MiB
                // blocks and host-visible memory from 64-128 MiB ones (wgpu-hal's
                // AllocationSizes): a process whose buffers need 211 MB held 555-626 MiB on an
                // H100. Our buffers are allocated once per model or run, so smaller blocks
                // (8-64 MiB device, 4-32 MiB host) cost nothing per step. WebGPU in the browser
                // ignores the hint. `BITLORA_GPU_PERFORMANCE_BLOCKS=1` (benchmarks) keeps
                // wgpu's default.
                memory_hints: if ops::bench_switch("BITLORA_GPU_PERFORMANCE_BLOCKS") {
                    wgpu::MemoryHints::Performance
                } else {
                    wgpu::MemoryHints::MemoryUsage
                },
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::RequestDevice {
                adapter: ainfo.name.clone(),
                msg: e.to_string(),
            })?;
        let limits = device.limits();
        let info = AdapterSummary {
            name: ainfo.name,
            backend: format!("{:?}", ainfo.backend),
            device_type: format!("{:?}", ainfo.device_type),
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_size_x: limits.max_compute_workgroup_size_x,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            features: adapter
                .features()
                .iter_names()
                .map(|(name, _)| name.to_string())
                .collect(),
        };
        let errors = ErrorSink::default();
        errors.install(&device);
        record::kernel_cache::register(&device, errors.clone());
        Ok(Gpu {
            device,
            queue,
            info,
            errors,
        })
    }

    /// Fails with the first error the device reported outside an error scope since the last
    /// call, if any.
    pub fn check_errors(&self) -> Result<(), GpuError> {
        self.errors.take()
    }

    pub(crate) fn error_sink(&self) -> ErrorSink {
        self.errors.clone()
    }
}

impl Drop for Gpu {
    /// Lets go of the pipelines compiled for this device ([`record::kernel_cache`]).
    fn drop(&mut self) {
        record::kernel_cache::forget(&self.device);
    }
}
