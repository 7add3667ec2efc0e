//! Shared by the GPU test binaries: one device per binary, random test data.
#![allow(dead_code)]

use std::sync::OnceLock;

use bitlora_core::rng::Rng;
use bitlora_gpu::{DType, Gpu, GpuError, GpuTensor, Recorder};

/// The GPU every test of this binary shares. Panics (fails, never skips) without an adapter.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        // Mesa warns on every start without a private runtime dir.
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let dir = std::env::temp_dir().join(format!("bitlora-xdg-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            }
            // SAFETY: set once, before any thread of this test binary reads the environment
            // through wgpu (the OnceLock serialises initialisation).
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
        let gpu = pollster::block_on(Gpu::new()).unwrap_or_else(|e| {
            panic!("no GPU adapter: install mesa-vulkan-drivers (lavapipe) or a Vulkan driver: {e}")
        });
        println!(
            "GPU adapter: {} ({}, {}), max storage binding {} bytes",
            gpu.info.name,
            gpu.info.backend,
            gpu.info.device_type,
            gpu.info.max_storage_buffer_binding_size
        );
        gpu
    })
}

/// Runs a future to completion (native tests only; the library itself never blocks).
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// `n` samples of `std * N(0, 1)`.
pub fn normal(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * rng.normal()).collect()
}

/// `n` int8 codes over the whole range [-128, 127].
pub fn codes(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n)
        .map(|_| (rng.below(256) as i32 - 128) as i8)
        .collect()
}

/// `n` ternary values in {-1, 0, 1}.
pub fn ternary(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n).map(|_| rng.below(3) as i8 - 1).collect()
}

/// Uploads an f32 tensor.
pub fn f32t(name: &str, shape: &[usize], data: &[f32]) -> GpuTensor {
    gpu().upload_f32(name, shape, data).unwrap()
}

/// A zeroed f32 tensor.
pub fn zeros(name: &str, shape: &[usize]) -> GpuTensor {
    gpu().zeros(name, shape, DType::F32).unwrap()
}

/// Reads an f32 tensor back.
pub fn read(t: &GpuTensor) -> Vec<f32> {
    block(gpu().read_f32(t)).unwrap()
}

/// Records ops with `f`, submits them, and fails on any device error they raised.
pub fn run(f: impl FnOnce(&mut Recorder) -> Result<(), GpuError>) {
    let g = gpu();
    let mut rec = Recorder::new(&g.device);
    f(&mut rec).unwrap();
    rec.submit(&g.queue);
    g.check_errors().unwrap();
}
