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
        Kernel::entry(device, name, source, "main", constants)
    }

    /// As [`Kernel::new`] for the entry point `entry` (a shader whose fused variant is a second
    /// entry point; its bindings are those the entry point uses).
    ///
    /// Compiled once per device: an equal (source, entry point, constants) on the same device
    /// gets the pipeline compiled the first time ([`kernel_cache`]), whichever model, trainer
    /// or layer asks for it.
    pub fn entry(
        device: &wgpu::Device,
        name: &'static str,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Kernel {
        let key = kernel_cache::Key::new(source, entry, constants);
        if let Some((pipeline, layout)) = kernel_cache::get(device, &key) {
            return Kernel {
                name,
                pipeline,
                layout,
            };
        }
        let t0 = kernel_cache::clock();
        let errors_before = kernel_cache::errors(device);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: true,
            },
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        // A pipeline whose creation reported an error (natively the device's error sink has
        // it now) is not kept: the next request compiles again and reports it again.
        if kernel_cache::errors(device) == errors_before {
            kernel_cache::insert(device, key, (pipeline.clone(), layout.clone()));
        }
        kernel_cache::log(name, entry, constants, t0);
        Kernel {
            name,
            pipeline,
            layout,
        }
    }
}

/// The compiled kernels of each device, shared by everything built on it: a model compiles
/// each distinct (shader source, entry point, override constants) once, not once per layer
/// and projection, and a second model or trainer on the same device compiles nothing that the
/// first one already has. On CPU-emulated adapters compiling is most of a first training step
/// or generation (SwiftShader JIT-compiles every pipeline it is given, however many are equal).
///
/// The pipeline is a pure function of the key (auto layout, fixed compilation options), so a
/// kept one computes exactly what a fresh one would. The entries of a device are dropped with
/// its [`crate::Gpu`] ([`kernel_cache::forget`]). Natively the cache is one per process
/// (wgpu's handles are Send + Sync there, and the tests share a device between threads); on
/// wasm, where they are not, one per thread (the worker that owns the device).
pub mod kernel_cache {
    use std::collections::HashMap;

    use crate::ErrorSink;

    /// What a pipeline is compiled from (besides the device).
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    pub struct Key {
        source: String,
        entry: String,
        /// (name, value's bits): -0.0 and 0.0 are two keys, which costs a compile, never a
        /// wrong pipeline.
        constants: Vec<(String, u64)>,
    }

    impl Key {
        pub fn new(source: &str, entry: &str, constants: &[(&str, f64)]) -> Key {
            Key {
                source: source.to_owned(),
                entry: entry.to_owned(),
                constants: constants
                    .iter()
                    .map(|&(n, v)| (n.to_owned(), v.to_bits()))
                    .collect(),
            }
        }
    }

    type Compiled = (wgpu::ComputePipeline, wgpu::BindGroupLayout);

    #[derive(Default)]
    struct Device {
        kernels: HashMap<Key, Compiled>,
        /// The device's error sink when a [`crate::Gpu`] made it (creation errors land there).
        sink: Option<ErrorSink>,
    }

    type Cache = HashMap<wgpu::Device, Device>;

    #[cfg(not(target_arch = "wasm32"))]
    fn with<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
        use std::sync::{LazyLock, Mutex};
        static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Default::default);
        let mut cache = match CACHE.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut cache)
    }

    #[cfg(target_arch = "wasm32")]
    fn with<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
        use std::cell::RefCell;
        thread_local! {
            static CACHE: RefCell<Cache> = RefCell::new(Cache::new());
        }
        CACHE.with(|c| f(&mut c.borrow_mut()))
    }

    /// The kept pipeline (and its bind group layout) for `key` on `device`.
    pub(crate) fn get(device: &wgpu::Device, key: &Key) -> Option<Compiled> {
        with(|c| c.get(device)?.kernels.get(key).cloned())
    }

    /// Keeps `compiled` for `key` (the first one stays if two threads compiled it at once).
    pub(crate) fn insert(device: &wgpu::Device, key: Key, compiled: Compiled) {
        with(|c| {
            c.entry(device.clone())
                .or_default()
                .kernels
                .entry(key)
                .or_insert(compiled);
        });
    }

    /// Number of errors `device` has reported so far (0 when no [`crate::Gpu`] registered it).
    pub(crate) fn errors(device: &wgpu::Device) -> usize {
        let sink = with(|c| c.get(device).and_then(|d| d.sink.clone()));
        sink.map_or(0, |s| s.count())
    }

    /// Registers the error sink of a new device ([`crate::Gpu`]).
    pub(crate) fn register(device: &wgpu::Device, sink: ErrorSink) {
        with(|c| c.entry(device.clone()).or_default().sink = Some(sink));
    }

    /// Drops every pipeline kept for `device` (its [`crate::Gpu`] is going away). Models and
    /// trainers still holding kernels keep theirs.
    pub fn forget(device: &wgpu::Device) {
        with(|c| c.remove(device));
    }

    /// Number of pipelines kept for `device`.
    pub fn len(device: &wgpu::Device) -> usize {
        with(|c| c.get(device).map_or(0, |d| d.kernels.len()))
    }

    /// `BITLORA_KERNEL_TIMES=1` (native): the time of each compile, on stderr.
    pub(super) fn clock() -> Option<std::time::Instant> {
        #[cfg(not(target_arch = "wasm32"))]
        if std::env::var_os("BITLORA_KERNEL_TIMES").is_some() {
            return Some(std::time::Instant::now());
        }
        None
    }

    pub(super) fn log(
        name: &str,
        entry: &str,
        constants: &[(&str, f64)],
        t0: Option<std::time::Instant>,
    ) {
        if let Some(t0) = t0 {
            eprintln!(
                "bitlora: compiled {name} ({entry}) {constants:?} in {:.3} s",
                t0.elapsed().as_secs_f64()
            );
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
    /// Reusable uniform buffers ([`Recorder::reuse_uniforms`]) by (padded length in words,
    /// ordinal among this recording's distinct values of that length), with the values they
    /// hold.
    slots: HashMap<SlotKey, (Vec<u32>, wgpu::Buffer)>,
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

/// Per-dispatch GPU timing through timestamp queries (`bitlora bench --profile`).
///
/// Needs only `Features::TIMESTAMP_QUERY` (WebGPU's `timestamp-query`): a profiled
/// [`Recorder`] ends its compute pass before every dispatch and opens a new one whose
/// `timestamp_writes` bracket that single dispatch. wgpu already separates the dispatches of
/// one pass with barriers (each reads the last one's writes), so the extra passes change the
/// GPU's work little; the host's recording time does grow. Query sets of
/// `QUERY_SET_MAX_QUERIES` (2,048 dispatches each) are allocated as needed and kept from
/// step to step, as are the resolve and readback buffers.
pub struct Profiler {
    sets: Vec<wgpu::QuerySet>,
    /// Label of each dispatch recorded since the last [`Profiler::read`].
    labels: Vec<&'static str>,
    resolve: Option<wgpu::Buffer>,
    readback: Option<wgpu::Buffer>,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
    resolved: usize,
}

/// Per-dispatch timings of one recording, in dispatch order: (kernel label, nanoseconds).
pub type DispatchTimes = Vec<(&'static str, f64)>;

impl Profiler {
    const PER_SET: u32 = wgpu::QUERY_SET_MAX_QUERIES;

    /// A profiler for `device`, or None when the device was created without
    /// `Features::TIMESTAMP_QUERY` (the adapter lacks it, or it was not requested:
    /// [`crate::Gpu::with_timestamps`]).
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Option<Profiler> {
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        Some(Profiler {
            sets: Vec::new(),
            labels: Vec::new(),
            resolve: None,
            readback: None,
            period_ns: queue.get_timestamp_period() as f64,
            resolved: 0,
        })
    }

    /// The query set and first query index of the next dispatch (its begin; +1 its end).
    fn next(&mut self, device: &wgpu::Device, label: &'static str) -> (wgpu::QuerySet, u32) {
        let q = 2 * self.labels.len() as u32;
        let (set, idx) = ((q / Self::PER_SET) as usize, q % Self::PER_SET);
        while self.sets.len() <= set {
            self.sets
                .push(device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("bitlora profile"),
                    ty: wgpu::QueryType::Timestamp,
                    count: Self::PER_SET,
                }));
        }
        self.labels.push(label);
        (self.sets[set].clone(), idx)
    }

    /// Records the resolution of every query written into the readback buffer (after the
    /// last pass has ended).
    fn resolve(&mut self, device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder) {
        let queries = 2 * self.labels.len() as u64;
        if queries == 0 {
            return;
        }
        let bytes = 8 * queries;
        let big_enough = |b: &Option<wgpu::Buffer>| b.as_ref().is_some_and(|b| b.size() >= bytes);
        if !big_enough(&self.resolve) || !big_enough(&self.readback) {
            let size = 8 * self.sets.len() as u64 * Self::PER_SET as u64;
            let buffer = |label, usage| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage,
                    mapped_at_creation: false,
                })
            };
            self.resolve = Some(buffer(
                "profile resolve",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ));
            self.readback = Some(buffer(
                "profile readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ));
        }
        let (Some(resolve), Some(readback)) = (&self.resolve, &self.readback) else {
            return;
        };
        let mut left = queries as u32;
        for (n, set) in self.sets.iter().enumerate() {
            if left == 0 {
                break;
            }
            let count = left.min(Self::PER_SET);
            // Each set's place is a multiple of 32 KiB: QUERY_RESOLVE_BUFFER_ALIGNMENT holds.
            encoder.resolve_query_set(set, 0..count, resolve, 8 * n as u64 * Self::PER_SET as u64);
            left -= count;
        }
        encoder.copy_buffer_to_buffer(resolve, 0, readback, 0, bytes);
        self.resolved = self.labels.len();
    }

    /// After the recording's submission: each dispatch's label and GPU time (end - begin
    /// timestamp, ns), in dispatch order; forgets them for the next recording.
    pub async fn read(&mut self, device: &wgpu::Device) -> Result<DispatchTimes, GpuError> {
        let labels = std::mem::take(&mut self.labels);
        let n = std::mem::take(&mut self.resolved);
        let Some(readback) = self
            .readback
            .as_ref()
            .filter(|_| n > 0 && n == labels.len())
        else {
            return Ok(Vec::new());
        };
        crate::tensor::map_read(device, readback, "profile readback").await?;
        let ticks: Vec<u64> = {
            let view = readback
                .get_mapped_range(..(16 * n) as u64)
                .map_err(|e| GpuError::Map {
                    tensor: "profile readback".into(),
                    msg: e.to_string(),
                });
            let out = view.map(|v| bytemuck::pod_collect_to_vec::<u8, u64>(&v));
            readback.unmap();
            out?
        };
        Ok(labels
            .into_iter()
            .zip(ticks.chunks_exact(2))
            .map(|(l, t)| (l, t[1].saturating_sub(t[0]) as f64 * self.period_ns))
            .collect())
    }
}

/// One command encoder with an open compute pass.
pub struct Recorder {
    device: wgpu::Device,
    encoder: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    cache: BindCache,
    max_groups: u32,
    profiler: Option<Profiler>,
    /// Set by [`Recorder::reuse_uniforms`]: the queue that rewrites reused uniform buffers.
    slots: Option<UniformSlots>,
    /// Set by [`Recorder::time_wgpu`]: the host's time inside wgpu's compute pass calls.
    clock: Option<PassClock>,
}

/// The host's time inside wgpu while recording ([`Recorder::time_wgpu`]), wall-clock seconds
/// (`std::time::Instant`: native only): what bitlora's own bookkeeping is not.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassClock {
    /// `set_pipeline`, `set_bind_group` and `dispatch_workgroups` of every dispatch.
    pub commands_s: f64,
    /// Ending the compute pass (wgpu validates the pass's commands and encodes them for the
    /// driver there).
    pub pass_end_s: f64,
}

/// A reused uniform buffer's place: (padded length in words, ordinal among a recording's
/// distinct values of that length).
type SlotKey = (usize, usize);

/// [`Recorder::reuse_uniforms`]'s state within one recording.
struct UniformSlots {
    queue: wgpu::Queue,
    /// This recording's slot of each distinct value.
    slot_of: HashMap<Vec<u32>, SlotKey>,
    /// Distinct values of each padded length seen so far (the next one's ordinal).
    count: HashMap<usize, usize>,
}

impl Recorder {
    pub fn new(device: &wgpu::Device) -> Recorder {
        Self::with_cache(device, BindCache::default())
    }

    /// A recorder that reuses (and adds to) the uniform buffers and bind groups of earlier
    /// recordings; [`Recorder::finish_with_cache`] gives the cache back.
    pub fn with_cache(device: &wgpu::Device, mut cache: BindCache) -> Recorder {
        if cache.groups.len() + cache.uniforms.len() + cache.slots.len() > BindCache::LIMIT {
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
            profiler: None,
            slots: None,
            clock: None,
        }
    }

    /// Measures the host's time inside wgpu's pass calls from now on
    /// ([`Recorder::finish_timed`] returns it). Native only.
    pub fn time_wgpu(&mut self) {
        self.clock = Some(PassClock::default());
    }

    /// Uniform values from now on go into buffers kept in the cache by position rather than
    /// by value: the n-th distinct value of a recording reuses the buffer that held the n-th
    /// distinct value of the last one, rewritten through `queue` when the value changed.
    /// Decoding records the same dispatches for every token with only the position changing,
    /// so its bind groups then stay the same from token to token instead of being created
    /// anew. The rewrite is a `Queue::write_buffer`, which lands after every submission made
    /// before it and before the next one's commands, so work in flight still reads the old
    /// values.
    pub fn reuse_uniforms(&mut self, queue: &wgpu::Queue) {
        self.slots = Some(UniformSlots {
            queue: queue.clone(),
            slot_of: HashMap::new(),
            count: HashMap::new(),
        });
    }

    /// Times every dispatch recorded from now on with `profiler` (one compute pass each);
    /// [`Recorder::finish_profiled`] gives it back with the queries resolved.
    pub fn set_profiler(&mut self, profiler: Profiler) {
        self.profiler = Some(profiler);
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
        if let Some(UniformSlots {
            queue,
            slot_of,
            count,
        }) = self.slots.as_mut()
        {
            let key = match slot_of.get(&padded) {
                Some(&key) => key,
                None => {
                    let n = count.entry(padded.len()).or_insert(0);
                    let key = (padded.len(), *n);
                    *n += 1;
                    slot_of.insert(padded.clone(), key);
                    key
                }
            };
            if let Some((held, b)) = self.cache.slots.get_mut(&key) {
                if *held != padded {
                    queue.write_buffer(b, 0, bytemuck::cast_slice(&padded));
                    *held = padded;
                }
                return b.clone();
            }
            let b = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("params (reused)"),
                    contents: bytemuck::cast_slice(&padded),
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                });
            self.cache.slots.insert(key, (padded, b.clone()));
            return b;
        }
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
        self.dispatch_at(kernel, &[], buffers, groups)
    }

    /// [`Recorder::dispatch`] with `buffers` bound whole at the binding numbers `at` (for an
    /// entry point that uses some of its shader's bindings, not 0, 1, ...); `at` empty means
    /// 0, 1, ... A kernel is always dispatched with the same binding numbers, so the bind
    /// group cache keys on its buffers alone.
    pub(crate) fn dispatch_at(
        &mut self,
        kernel: &Kernel,
        at: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: [usize; 3],
    ) -> Result<(), GpuError> {
        debug_assert!(at.is_empty() || at.len() == buffers.len());
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
                        binding: at.get(i).copied().unwrap_or(i as u32),
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
        if let Some(prof) = self.profiler.as_mut() {
            // A pass of its own whose begin and end timestamps bracket this dispatch.
            let (set, idx) = prof.next(&self.device, kernel.name);
            drop(self.pass.take());
            self.pass = Some(
                self.encoder
                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(kernel.name),
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: &set,
                            beginning_of_pass_write_index: Some(idx),
                            end_of_pass_write_index: Some(idx + 1),
                        }),
                    })
                    .forget_lifetime(),
            );
        }
        if self.pass.is_none() {
            self.pass = Some(
                self.encoder
                    .begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("bitlora"),
                        timestamp_writes: None,
                    })
                    .forget_lifetime(),
            );
        }
        let t0 = self.clock.map(|_| std::time::Instant::now());
        let pass = self.pass.as_mut().expect("opened above");
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0] as u32, groups[1] as u32, groups[2] as u32);
        if let (Some(c), Some(t0)) = (self.clock.as_mut(), t0) {
            c.commands_s += t0.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Records a buffer copy between dispatches (ending the compute pass; the next dispatch
    /// opens another): `bytes` from `src` at `src_offset` into `dst` at `dst_offset`.
    pub(crate) fn copy(
        &mut self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        bytes: u64,
    ) {
        self.end_pass();
        self.encoder
            .copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes);
    }

    /// Ends the open compute pass, if any (timed under [`Recorder::time_wgpu`]: wgpu checks
    /// the pass's commands and encodes them for the driver there).
    fn end_pass(&mut self) {
        let t0 = self.clock.map(|_| std::time::Instant::now());
        drop(self.pass.take());
        if let (Some(c), Some(t0)) = (self.clock.as_mut(), t0) {
            c.pass_end_s += t0.elapsed().as_secs_f64();
        }
    }

    /// Ends the pass and returns the encoder, e.g. to append copies before submitting.
    pub fn finish(self) -> wgpu::CommandEncoder {
        self.finish_with_cache().0
    }

    /// Ends the pass; returns the encoder and the cache for the next recording.
    pub fn finish_with_cache(self) -> (wgpu::CommandEncoder, BindCache) {
        let (encoder, cache, _) = self.finish_profiled();
        (encoder, cache)
    }

    /// Ends the pass; returns the encoder (with the profiler's queries resolved into its
    /// readback buffer: read it with [`Profiler::read`] after submitting), the cache and the
    /// profiler.
    pub fn finish_profiled(self) -> (wgpu::CommandEncoder, BindCache, Option<Profiler>) {
        let (encoder, cache, profiler, _) = self.finish_timed();
        (encoder, cache, profiler)
    }

    /// [`Recorder::finish_profiled`], with the time spent in wgpu when
    /// [`Recorder::time_wgpu`] asked for it.
    pub fn finish_timed(
        mut self,
    ) -> (
        wgpu::CommandEncoder,
        BindCache,
        Option<Profiler>,
        Option<PassClock>,
    ) {
        self.end_pass();
        if let Some(p) = self.profiler.as_mut() {
            p.resolve(&self.device, &mut self.encoder);
        }
        (self.encoder, self.cache, self.profiler, self.clock)
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

#[cfg(test)]
mod tests {
    use super::{Kernel, kernel_cache};

    const SOURCE: &str = "override N: u32 = 1u;
@group(0) @binding(0) var<storage, read_write> y: array<u32>;
@compute @workgroup_size(1) fn main() { y[0] = N; }
@compute @workgroup_size(1) fn twice() { y[0] = 2u * N; }";

    /// Equal (source, entry point, constants) on one device give the same pipeline, from any
    /// caller and under any name; other constants or another entry point give another one; a
    /// device's entries go with its `Gpu`.
    #[test]
    fn kernel_cache_keys() {
        let gpu = pollster::block_on(crate::Gpu::new()).expect("a GPU adapter (lavapipe)");
        let dev = &gpu.device;
        let a = Kernel::new(dev, "a", SOURCE, &[("N", 3.0)]);
        let b = Kernel::new(dev, "b", SOURCE, &[("N", 3.0)]);
        assert_eq!(a.pipeline, b.pipeline, "equal keys share the pipeline");
        assert_eq!(a.layout, b.layout);
        assert_eq!(b.name, "b", "the caller's name is kept");
        let c = Kernel::new(dev, "a", SOURCE, &[("N", 4.0)]);
        assert_ne!(a.pipeline, c.pipeline, "other constants, another pipeline");
        let d = Kernel::entry(dev, "a", SOURCE, "twice", &[("N", 3.0)]);
        assert_ne!(
            a.pipeline, d.pipeline,
            "another entry point, another pipeline"
        );
        let e = Kernel::new(dev, "a", SOURCE, &[]);
        assert_ne!(a.pipeline, e.pipeline, "no constants, another pipeline");
        assert_eq!(kernel_cache::len(dev), 4);
        gpu.check_errors().expect("no device errors");
        // A pipeline that failed to compile is not kept: each request reports its error.
        for _ in 0..2 {
            let _ = Kernel::new(dev, "bad", SOURCE, &[("NO_SUCH_CONSTANT", 1.0)]);
            assert!(
                gpu.check_errors().is_err(),
                "the error is reported every time"
            );
        }
        assert_eq!(kernel_cache::len(dev), 4);
        let dev = dev.clone();
        drop(gpu);
        assert_eq!(kernel_cache::len(&dev), 0, "dropped with its Gpu");
    }
}
