//! [`Recorder`]: records a sequence of compute dispatches into one command encoder and one
//! compute pass, then submits them together. wgpu orders the dispatches of a pass and makes
//! each one's storage writes visible to the next, so a whole forward pass is one submission.
//!
//! [`Kernel`]: one WGSL shader compiled into a compute pipeline with its override constants.

use std::collections::HashMap;

use crate::GpuError;
use crate::tensor::{DType, GpuTensor};

/// A compute pipeline: a shader from `shaders/` specialised with override constants.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub name: &'static str,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Kernel {
    /// Compiles `source` (entry point `main`) with the given override constants.
    pub fn new(
        device: &wgpu::Device,
        name: &'static str,
        source: &str,
        constants: &[(&str, f64)],
    ) -> Kernel {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: true,
            },
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        Kernel {
            name,
            pipeline,
            layout,
        }
    }
}

/// Uniform parameter buffers and bind groups, kept from one recording to the next
/// ([`Recorder::with_cache`]): a training step records the same dispatches on the same buffers
/// every time, so after its first step no bind group and no uniform buffer is created (on a
/// fast GPU, creating ~1,000 of each per step would cost as much host time as the step's
/// kernels). Within one recording the cache also shares them between identical dispatches.
#[derive(Default)]
pub struct BindCache {
    /// Uniform buffers by content (padded to 16 bytes).
    uniforms: HashMap<Vec<u32>, wgpu::Buffer>,
    /// Bind groups by pipeline and the buffers bound at 0, 1, ...
    groups: HashMap<(wgpu::ComputePipeline, Vec<wgpu::Buffer>), wgpu::BindGroup>,
}

impl BindCache {
    /// Entries kept at most; a cache past this (e.g. after many different sequence lengths,
    /// each with its own uniform values) starts over.
    const LIMIT: usize = 1 << 14;

    /// Number of bind groups held.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// One command encoder with an open compute pass.
pub struct Recorder {
    device: wgpu::Device,
    encoder: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    cache: BindCache,
    max_groups: u32,
}

impl Recorder {
    pub fn new(device: &wgpu::Device) -> Recorder {
        Self::with_cache(device, BindCache::default())
    }

    /// A recorder that reuses (and adds to) the uniform buffers and bind groups of earlier
    /// recordings; [`Recorder::finish_with_cache`] gives the cache back.
    pub fn with_cache(device: &wgpu::Device, mut cache: BindCache) -> Recorder {
        if cache.groups.len() + cache.uniforms.len() > BindCache::LIMIT {
            cache = BindCache::default();
        }
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bitlora"),
        });
        let pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bitlora"),
                timestamp_writes: None,
            })
            .forget_lifetime();
        Recorder {
            device: device.clone(),
            encoder,
            pass: Some(pass),
            cache,
            max_groups: device.limits().max_compute_workgroups_per_dimension,
        }
    }

    /// A uniform buffer holding a shader's `Dims` struct: up to four u32 (T and the row and
    /// position offsets of a pass), padded to 16 bytes as uniform buffers must be. Buffers
    /// are shared between dispatches that use the same values.
    pub(crate) fn uniform(&mut self, words: [u32; 4]) -> wgpu::Buffer {
        self.uniform_words(&words)
    }

    /// A uniform buffer holding `words` (u32s or f32 bits), zero-padded to a multiple of 16
    /// bytes; for parameter structs larger than [`Recorder::uniform`]'s four words. Shared,
    /// like those, between the dispatches that use the same values (a training step records
    /// the same LoRA product shapes in every layer).
    pub(crate) fn uniform_words(&mut self, words: &[u32]) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        let mut padded = words.to_vec();
        padded.resize(words.len().div_ceil(4).max(1) * 4, 0);
        if let Some(b) = self.cache.uniforms.get(&padded) {
            return b.clone();
        }
        let b = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&padded),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        self.cache.uniforms.insert(padded, b.clone());
        b
    }

    /// The device's limit on workgroups along one dispatch dimension.
    pub(crate) fn max_groups(&self) -> usize {
        self.max_groups as usize
    }

    /// [`Recorder::uniform`] of sizes and offsets given as `usize`, checked to fit a u32.
    pub(crate) fn dims(
        &mut self,
        op: &'static str,
        values: &[usize],
    ) -> Result<wgpu::Buffer, GpuError> {
        let mut words = [0u32; 4];
        if values.len() > 4 {
            return Err(GpuError::Shape {
                op,
                msg: format!("{} uniform values, at most 4", values.len()),
            });
        }
        for (w, &v) in words.iter_mut().zip(values) {
            *w = u32::try_from(v).map_err(|_| GpuError::Shape {
                op,
                msg: format!("{v} does not fit a u32 shader constant"),
            })?;
        }
        Ok(self.uniform(words))
    }

    /// Records one dispatch of `kernel` with `buffers` bound whole at bindings 0, 1, ...
    pub(crate) fn dispatch(
        &mut self,
        kernel: &Kernel,
        buffers: &[&wgpu::Buffer],
        groups: [usize; 3],
    ) -> Result<(), GpuError> {
        for &g in &groups {
            if g as u64 > self.max_groups as u64 {
                return Err(GpuError::Dispatch {
                    op: kernel.name,
                    groups: g as u64,
                    limit: self.max_groups,
                });
            }
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let key = (
            kernel.pipeline.clone(),
            buffers.iter().map(|&b| b.clone()).collect::<Vec<_>>(),
        );
        let bind_group = match self.cache.groups.get(&key) {
            Some(g) => g.clone(),
            None => {
                let entries: Vec<wgpu::BindGroupEntry> = buffers
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource: b.as_entire_binding(),
                    })
                    .collect();
                let g = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(kernel.name),
                    layout: &kernel.layout,
                    entries: &entries,
                });
                self.cache.groups.insert(key, g.clone());
                g
            }
        };
        let pass = self.pass.as_mut().expect("the pass is open until submit");
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0] as u32, groups[1] as u32, groups[2] as u32);
        Ok(())
    }

    /// Ends the pass and returns the encoder, e.g. to append copies before submitting.
    pub fn finish(self) -> wgpu::CommandEncoder {
        self.finish_with_cache().0
    }

    /// Ends the pass; returns the encoder and the cache for the next recording.
    pub fn finish_with_cache(mut self) -> (wgpu::CommandEncoder, BindCache) {
        drop(self.pass.take());
        (self.encoder, self.cache)
    }

    /// Ends the pass and submits everything recorded.
    pub fn submit(self, queue: &wgpu::Queue) {
        let encoder = self.finish();
        queue.submit([encoder.finish()]);
    }
}

/// Checks that `t` has type `dtype` and shape `shape`, naming the op and the tensor if not.
pub(crate) fn expect(
    op: &'static str,
    t: &GpuTensor,
    dtype: DType,
    shape: &[usize],
) -> Result<(), GpuError> {
    if t.dtype != dtype || t.shape != shape {
        return Err(GpuError::Shape {
            op,
            msg: format!(
                "`{}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                t.name, t.dtype, t.shape
            ),
        });
    }
    Ok(())
}

/// Checks that `t` is a 2-D tensor of type `dtype` with `cols` columns and at least `rows`
/// rows (a buffer of which a pass uses a window, e.g. the KV cache); returns its row count.
pub(crate) fn at_least(
    op: &'static str,
    t: &GpuTensor,
    dtype: DType,
    rows: usize,
    cols: usize,
) -> Result<usize, GpuError> {
    match t.shape[..] {
        [r, c] if c == cols && t.dtype == dtype && r >= rows => Ok(r),
        _ => Err(GpuError::Shape {
            op,
            msg: format!(
                "`{}` is {:?} {:?}, expected {dtype:?} (R, {cols}) with R >= {rows}",
                t.name, t.dtype, t.shape
            ),
        }),
    }
}

/// The first dimension of a 2-D tensor of type `dtype` whose second dimension must be `cols`:
/// T of a (T, C) activation.
pub(crate) fn rows(
    op: &'static str,
    t: &GpuTensor,
    dtype: DType,
    cols: usize,
) -> Result<usize, GpuError> {
    match t.shape[..] {
        [r, c] if c == cols && t.dtype == dtype && r > 0 => Ok(r),
        _ => Err(GpuError::Shape {
            op,
            msg: format!(
                "`{}` is {:?} {:?}, expected {dtype:?} (T, {cols}) with T > 0",
                t.name, t.dtype, t.shape
            ),
        }),
    }
}
