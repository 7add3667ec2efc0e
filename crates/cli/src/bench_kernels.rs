//! `bitlora bench ternary`: the ternary BitLinear kernels on their own, at the training
//! sequence length (T = 128 by default), for each distinct projection shape of a model:
//! the forward `ternary_matmul` (exact int8 x ternary product, dot4I8Packed) and the backward
//! `ternary_backward` (dx = dy . W / s_w, f32 multiply-adds in the CPU reference's order).
//!
//! Each kernel is dispatched `reps` times in one submission with a GPU timestamp pair around
//! every dispatch (the profiler of `bench train --profile`); the report gives the median per
//! dispatch, the FLOP-equivalent rate (2 T I O per dispatch: one multiply-add per weight and
//! token) and that rate as a share of the f32 FMA roofline measured on the lent H100
//! (shared/BENCHMARKS-TARGETS.md: 51.6 TFLOP/s, PyTorch f32 matmul without TF32), the
//! BENCHMARKS target being >= 25% at T = 128. The share means something only on that GPU.
//!
//! Before timing, each shape's outputs are checked against bitlora-core on the same inputs:
//! the forward bit for bit (unit scales: y = f32(acc)), the backward within dot_f32_bound.
//!
//! `BITLORA_BENCH_SWEEP=1` also times the kernels' other blockings (tokens per invocation, the
//! forward's K split) and prints a table on stderr: how the defaults were chosen.

use bitlora_core::TernaryLinear;
use bitlora_core::quant;
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::dot_f32_bound;
use bitlora_core::train;
use bitlora_gpu::ops::{TernaryBackward, TernaryMatmul};
use bitlora_gpu::{Gpu, GpuError, GpuTensor, Profiler, Recorder};

/// f32 FMA roofline of the lent NVIDIA H100 (PyTorch f32 matmul, no TF32), TFLOP/s.
pub const H100_F32_TFLOPS: f64 = 51.6;

#[derive(serde::Serialize)]
pub struct KernelReport {
    pub workload: String,
    pub backend: &'static str,
    pub adapter: String,
    pub tokens: usize,
    pub reps: usize,
    pub roofline_f32_tflops: f64,
    pub shapes: Vec<ShapeReport>,
}

#[derive(serde::Serialize)]
pub struct ShapeReport {
    /// The projections of this shape (q, k, v, o, gate, up, down).
    pub modules: String,
    pub in_features: usize,
    pub out_features: usize,
    pub forward_us: f64,
    pub forward_gflops: f64,
    pub forward_pct_roofline: f64,
    pub backward_us: f64,
    pub backward_gflops: f64,
    pub backward_pct_roofline: f64,
    /// Largest |GPU - CPU| of the backward (the forward is checked to be bit-exact).
    pub backward_max_abs_diff: f32,
}

/// The distinct (I, O) of a shape's projections, with the modules that have it.
fn projection_shapes(shape: &str) -> Option<Vec<(String, usize, usize)>> {
    let c = bitlora_core::model::bench_config(shape)?;
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let kv = c.num_key_value_heads * c.head_dim;
    let q = c.num_attention_heads * c.head_dim;
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    for (name, i, o) in [
        ("q", h, q),
        ("k", h, kv),
        ("v", h, kv),
        ("o", q, h),
        ("gate", h, f),
        ("up", h, f),
        ("down", f, h),
    ] {
        match out.iter_mut().find(|s| s.1 == i && s.2 == o) {
            Some(s) => s.0 = format!("{},{name}", s.0),
            None => out.push((name.to_string(), i, o)),
        }
    }
    Some(out)
}

/// Median GPU time of `reps` dispatches recorded by `encode`, in microseconds.
fn time_us(
    gpu: &Gpu,
    reps: usize,
    mut encode: impl FnMut(&mut Recorder) -> Result<(), GpuError>,
) -> Result<f64, GpuError> {
    let Some(prof) = Profiler::new(&gpu.device, &gpu.queue) else {
        return Err(GpuError::Device(
            "bench ternary: the device has no TIMESTAMP_QUERY".into(),
        ));
    };
    let mut rec = Recorder::new(&gpu.device);
    rec.set_profiler(prof);
    for _ in 0..reps {
        encode(&mut rec)?;
    }
    let (encoder, _, prof) = rec.finish_profiled();
    gpu.queue.submit([encoder.finish()]);
    let mut prof = prof.expect("set above");
    let times = pollster::block_on(prof.read(&gpu.device))?;
    gpu.check_errors()?;
    let mut ns: Vec<f64> = times.iter().map(|t| t.1).collect();
    ns.sort_by(f64::total_cmp);
    Ok(ns.get(ns.len() / 2).copied().unwrap_or(f64::NAN) * 1e-3)
}

/// `bench ternary --shape S --backend gpu`: Ok(None) for an unknown shape.
pub fn ternary_gpu(
    shape: &str,
    tokens: usize,
    reps: usize,
    seed: u64,
) -> Result<Option<KernelReport>, GpuError> {
    let Some(shapes) = projection_shapes(shape) else {
        return Ok(None);
    };
    let gpu = pollster::block_on(Gpu::with_timestamps())?;
    eprintln!(
        "bitlora bench: GPU adapter {} ({})",
        gpu.info.name, gpu.info.backend
    );
    let sweep = std::env::var_os("BITLORA_BENCH_SWEEP").is_some_and(|v| v == "1");
    let dev = &gpu.device;
    let mut rng = Rng::new(seed);
    let t = tokens.max(1);
    let mut report = KernelReport {
        workload: format!("ternary-{shape}"),
        backend: "gpu",
        adapter: format!("{} ({})", gpu.info.name, gpu.info.backend),
        tokens: t,
        reps,
        roofline_f32_tflops: H100_F32_TFLOPS,
        shapes: Vec::new(),
    };
    for (modules, i, o) in shapes {
        // Random ternary weights, int8 codes and dy; unit scales so that y = f32(acc).
        let w: Vec<i8> = (0..o * i).map(|_| rng.below(3) as i8 - 1).collect();
        let lin = TernaryLinear {
            out_features: o,
            in_features: i,
            packed: quant::pack_ternary(&w, o, i),
            w_scale: 1.0,
        };
        drop(w);
        let xq: Vec<i8> = (0..t * i)
            .map(|_| (rng.below(256) as i32 - 128) as i8)
            .collect();
        let dy: Vec<f32> = (0..t * o)
            .map(|_| rng.below(1 << 20) as f32 / (1 << 19) as f32 - 1.0)
            .collect();
        let wt = GpuTensor::ternary(dev, "W", &lin)?;
        let xt = GpuTensor::i8x4(dev, "x_q", &[t, i], &xq)?;
        let sa = GpuTensor::f32(dev, "s_a", &[t], &vec![1.0; t])?;
        let sw = GpuTensor::f32(dev, "s_w", &[1], &[1.0])?;
        let yt = GpuTensor::f32(dev, "y", &[t, o], &vec![f32::NAN; t * o])?;
        let dyt = GpuTensor::f32(dev, "dy", &[t, o], &dy)?;
        let dxt = GpuTensor::f32(dev, "dx", &[t, i], &vec![f32::NAN; t * i])?;

        let fwd = TernaryMatmul::new(dev, i, o);
        let bwd = TernaryBackward::new(dev, i, o);
        let mut rec = Recorder::new(dev);
        fwd.encode(&mut rec, &xt, &sa, &wt, &sw, &yt)?;
        bwd.encode(&mut rec, &dyt, &wt, &sw, &dxt)?;
        rec.submit(&gpu.queue);
        let y = pollster::block_on(gpu.read_f32(&yt))?;
        let dx = pollster::block_on(gpu.read_f32(&dxt))?;
        gpu.check_errors()?;
        let want = quant::ternary_matmul_fast(&xq, &lin.packed, t, i, o);
        if let Some(k) = (0..t * o).find(|&k| y[k] != want[k] as f32) {
            return Err(GpuError::Device(format!(
                "bench ternary: forward I={i} O={o}: y[{k}] = {} but the CPU's accumulator is {}",
                y[k], want[k]
            )));
        }
        // dx sums O terms dy * {-1, 0, 1} in another order than the CPU (the GPU splits the
        // rows across workgroups): each element within dot_f32_bound of its terms' magnitudes,
        // the backward of |dy| through |W|.
        let want_dx = train::ternary_backward(&lin, &dy);
        let abs_lin = TernaryLinear {
            packed: lin
                .packed
                .iter()
                .map(|&b| {
                    (0..4).fold(0u8, |acc, s| {
                        let code = (b >> (2 * s)) & 3;
                        acc | ((1 + u8::from(code != 1)) << (2 * s))
                    })
                })
                .collect(),
            ..lin.clone()
        };
        let dy_abs: Vec<f32> = dy.iter().map(|v| v.abs()).collect();
        let magnitudes = train::ternary_backward(&abs_lin, &dy_abs);
        let mut max_abs = 0f32;
        for k in 0..t * i {
            let diff = (dx[k] - want_dx[k]).abs();
            max_abs = max_abs.max(diff);
            if diff.is_nan() || diff > dot_f32_bound(o, magnitudes[k]) {
                return Err(GpuError::Device(format!(
                    "bench ternary: backward I={i} O={o}: dx[{k}] = {} but the CPU's is {} (beyond dot_f32_bound {:.3e})",
                    dx[k],
                    want_dx[k],
                    dot_f32_bound(o, magnitudes[k])
                )));
            }
        }

        let flop = 2.0 * (t * i * o) as f64;
        let rate = |us: f64| flop / us * 1e-3; // GFLOP/s
        let pct = |us: f64| 100.0 * rate(us) / (1e3 * H100_F32_TFLOPS);
        let f_us = time_us(&gpu, reps, |r| fwd.encode(r, &xt, &sa, &wt, &sw, &yt))?;
        let b_us = time_us(&gpu, reps, |r| bwd.encode(r, &dyt, &wt, &sw, &dxt))?;
        eprintln!(
            "bitlora bench: {modules:<14} I={i:<5} O={o:<5} T={t}: forward {f_us:8.1} us ({:7.0} GFLOP/s, {:5.1}%), backward {b_us:8.1} us ({:7.0} GFLOP/s, {:5.1}%), backward max |diff| {:.2e}",
            rate(f_us),
            pct(f_us),
            rate(b_us),
            pct(b_us),
            max_abs
        );
        if sweep && t == 1 {
            // The one-token kernel: rows per workgroup x K split (invocations per workgroup at
            // most the device's), against the many-token blocking (32 rows) it replaced.
            let most = dev.limits().max_compute_invocations_per_workgroup as usize;
            for (lanes, split) in [
                (32, 16),
                (32, 8),
                (16, 16),
                (8, 32),
                (8, 64),
                (4, 64),
                (4, 128),
                (2, 128),
            ] {
                if lanes * split > most {
                    continue;
                }
                let op = TernaryMatmul::new(dev, i, o).with_decode_blocking(lanes, split);
                let us = time_us(&gpu, reps, |r| op.encode(r, &xt, &sa, &wt, &sw, &yt))?;
                eprintln!("  sweep forward  T=1 lanes {lanes:>2} split {split:>3}: {us:8.1} us");
            }
        }
        if sweep {
            for tm in [4, 8] {
                for split in [4, 8, 16, 32] {
                    let op = TernaryMatmul::with_blocking(dev, i, o, Some(tm), split);
                    let us = time_us(&gpu, reps, |r| op.encode(r, &xt, &sa, &wt, &sw, &yt))?;
                    eprintln!("  sweep forward  tm {tm} split {split:>2}: {us:8.1} us");
                }
            }
            for (tm, tg) in [(1, 16), (2, 16), (2, 32), (4, 32)] {
                for splits in [1, 2, 4, 8, 16] {
                    let op = TernaryBackward::with_blocking(dev, i, o, tm, tg).with_splits(splits);
                    let us = time_us(&gpu, reps, |r| op.encode(r, &dyt, &wt, &sw, &dxt))?;
                    eprintln!("  sweep backward tm {tm} tg {tg} splits {splits:>2}: {us:8.1} us");
                }
            }
        }
        report.shapes.push(ShapeReport {
            modules,
            in_features: i,
            out_features: o,
            forward_us: f_us,
            forward_gflops: rate(f_us),
            forward_pct_roofline: pct(f_us),
            backward_us: b_us,
            backward_gflops: rate(b_us),
            backward_pct_roofline: pct(b_us),
            backward_max_abs_diff: max_abs,
        });
    }
    Ok(Some(report))
}
