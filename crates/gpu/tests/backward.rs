//! The training kernels (backward ops, cross-entropy, LoRA products, AdamW) against the CPU
//! reference in bitlora_core::train / optim, on awkward sizes (I odd, O not a multiple of 4,
//! T above the workgroup size, NH/NKV groups of 3), with fixed seeds and the named tolerances
//! of bitlora_core::tolerance. Runs on whatever adapter wgpu finds: Mesa lavapipe in CI.

mod common;

use bitlora_core::lora::{Lora, LoraConfig, LoraPair};
use bitlora_core::optim::{AdamW, AdamWConfig, Schedule};
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::{KERNEL_F32, KERNEL_TRANSCENDENTAL};
use bitlora_core::{Activation, TernaryLinear, ops, train};
use bitlora_gpu::ops::cross_entropy::MASKED;
use bitlora_gpu::ops::{
    AdamWScalars, AdamWStep, AttentionBackward, CrossEntropy, Dropout, GatedActBackward,
    LoraMatmul, MatmulBackward, RmsNormBackward, RopeBackward, TernaryBackward,
};
use bitlora_gpu::{GpuError, GpuTensor, Recorder};
use common::{f32t, gpu, normal, read, run, zeros};

#[test]
fn ternary_backward_matches_reference() {
    let mut rng = Rng::new(21);
    let g = gpu();
    // O not a multiple of 4 (padding rows of the last packed row), I odd (columns mid-word),
    // T above the workgroup size, a single output; O long enough to split 8 ways.
    for (t, i, o) in [
        (37, 1000, 37),
        (70, 37, 10),
        (5, 65, 177),
        (1, 5, 1),
        (20, 41, 603),
    ] {
        let lin = TernaryLinear::from_master(&normal(&mut rng, o * i, 0.02), o, i);
        let dy = normal(&mut rng, t * o, 1.0);
        let (dyt, dx) = (f32t("dy", &[t, o], &dy), zeros("dx", &[t, i]));
        let w = GpuTensor::ternary(&g.device, "W", &lin).unwrap();
        let sw = f32t("s_w", &[1], &[lin.w_scale]);
        // Every blocking (1, 2 or 4 tokens per invocation, workgroups of 8 x 16 or 8 x 32):
        // the same sums.
        let one = f32t("s_w", &[1], &[1.0]);
        let unit = TernaryLinear {
            w_scale: 1.0,
            ..lin.clone()
        };
        for (tt, tg) in [(1, 16), (2, 16), (4, 32)] {
            let op = TernaryBackward::with_blocking(&g.device, i, o, tt, tg);
            run(|r| op.encode(r, &dyt, &w, &sw, &dx));
            KERNEL_F32.assert_close(
                &format!(
                    "ternary_backward T={t} I={i} O={o} ({tt} tokens per invocation, {tg} blocks)"
                ),
                &read(&dx),
                &train::ternary_backward(&lin, &dy),
            );
            // With s_w = 1 the sums themselves: the reference's terms in its order, bit for bit.
            run(|r| op.encode(r, &dyt, &w, &one, &dx));
            assert_eq!(
                read(&dx),
                train::ternary_backward_reference(&unit, &dy),
                "ternary_backward sums T={t} I={i} O={o} ({tt} tokens per invocation, {tg} blocks)"
            );
            // The packed rows split n ways (as on GPUs): each split's terms in the reference's
            // order, the partial sums added in split order (with s_w = 1 bit for bit, written
            // and added into what dx holds), then divided by s_w: within 3 ulp, as Vulkan lets
            // a division be 2.5 ulp off (NVIDIA's is).
            for n in [2, 3, 8] {
                let split = op.clone().with_splits(n);
                let what =
                    format!("ternary_backward T={t} I={i} O={o} ({tt}, {tg}) split {n} ways");
                let sums = split_sums(&unit, &dy, 16 / tt, n);
                run(|r| split.encode(r, &dyt, &w, &one, &dx));
                assert_same_bits(&what, &read(&dx), &sums);
                run(|r| split.encode_add(r, &dyt, &w, &one, &dx));
                let twice: Vec<f32> = sums.iter().map(|v| v + v).collect();
                assert_same_bits(&format!("{what}, added"), &read(&dx), &twice);
                run(|r| split.encode(r, &dyt, &w, &sw, &dx));
                for (k, (&got, &s)) in read(&dx).iter().zip(&sums).enumerate() {
                    let want = s / lin.w_scale;
                    assert!(
                        (got - want).abs() <= 3.0 * f32::EPSILON * want.abs(),
                        "{what}, over s_w: element {k} is {got} instead of {want}"
                    );
                }
            }
        }
    }
}

/// Fails naming the first element where `got` and `want` differ (not printing all of them).
fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(k) = (0..got.len()).find(|&k| got[k] != want[k]) {
        panic!("{what}: element {k} is {} instead of {}", got[k], want[k]);
    }
}

/// What ternary_backward.wgsl computes with its packed rows split `n` ways in chunks of `pc`
/// rows: per split, the reference's terms (packed rows ascending, then the four slots) summed
/// serially; the splits' sums added in order; divided by s_w.
fn split_sums(lin: &TernaryLinear, dy: &[f32], pc: usize, n: usize) -> Vec<f32> {
    let (o, i) = (lin.out_features, lin.in_features);
    let (o4, t) = (o.div_ceil(4), dy.len() / o);
    let want = n.min(o4.div_ceil(pc));
    let ps = if want <= 1 {
        o4
    } else {
        o4.div_ceil(want).div_ceil(pc) * pc
    };
    let mut dx = vec![0f32; t * i];
    for tt in 0..t {
        for col in 0..i {
            let mut total = 0f32;
            for z in 0..o4.div_ceil(ps) {
                let mut part = 0f32;
                for p in z * ps..((z + 1) * ps).min(o4) {
                    let b = lin.packed[p * i + col];
                    for slot in 0..4 {
                        let row = p + slot * o4;
                        let g = if row < o { dy[tt * o + row] } else { 0.0 };
                        part += g * (((b >> (2 * slot)) & 3) as f32 - 1.0);
                    }
                }
                total = if z == 0 { part } else { total + part };
            }
            dx[tt * i + col] = total / lin.w_scale;
        }
    }
    dx
}

#[test]
fn rms_norm_backward_matches_reference() {
    let mut rng = Rng::new(22);
    // Widths past one chunk of the serial sums (1,024 values), and not a multiple of 4.
    for (t, c) in [(37, 1000), (1, 64), (70, 177), (3, 3072), (2, 1030)] {
        let x = normal(&mut rng, t * c, 3.0);
        let w: Vec<f32> = normal(&mut rng, c, 0.1).iter().map(|v| 1.0 + v).collect();
        let dy = normal(&mut rng, t * c, 1.0);
        let (xt, wt, dyt, dx) = (
            f32t("x", &[t, c], &x),
            f32t("w", &[c], &w),
            f32t("dy", &[t, c], &dy),
            zeros("dx", &[t, c]),
        );
        run(|r| RmsNormBackward::new(&gpu().device, c, 1e-5).encode(r, &xt, &wt, &dyt, &dx));
        KERNEL_F32.assert_close(
            &format!("rms_norm_backward T={t} C={c}"),
            &read(&dx),
            &train::rms_norm_backward(&x, &w, 1e-5, &dy),
        );
    }
}

#[test]
fn gated_act_backward_matches_reference() {
    let mut rng = Rng::new(23);
    let (t, f) = (37, 1001);
    let gate = normal(&mut rng, t * f, 3.0);
    let up = normal(&mut rng, t * f, 1.0);
    let df = normal(&mut rng, t * f, 1.0);
    let (gt, ut, dft) = (
        f32t("gate", &[t, f], &gate),
        f32t("up", &[t, f], &up),
        f32t("df", &[t, f], &df),
    );
    for (act, tol) in [
        (Activation::Relu2, KERNEL_F32),
        (Activation::Silu, KERNEL_TRANSCENDENTAL),
    ] {
        let (dg, du) = (zeros("dgate", &[t, f]), zeros("dup", &[t, f]));
        run(|r| GatedActBackward::new(&gpu().device, f, act).encode(r, &gt, &ut, &dft, &dg, &du));
        let (want_g, want_u) = train::gated_act_backward(&gate, &up, &df, act);
        tol.assert_close(
            &format!("gated_act_backward {act:?} dgate"),
            &read(&dg),
            &want_g,
        );
        tol.assert_close(
            &format!("gated_act_backward {act:?} dup"),
            &read(&du),
            &want_u,
        );
    }
}

#[test]
fn rope_backward_matches_reference() {
    let mut rng = Rng::new(24);
    for (t, n, hs) in [(37, 3, 16), (5, 2, 6), (100, 4, 64)] {
        let d = normal(&mut rng, t * n * hs, 1.0);
        let p = t + 13;
        let (cos, sin) = ops::rope_tables(p, hs, 10_000.0);
        let (dt, ct, st) = (
            f32t("d", &[t, n * hs], &d),
            f32t("cos", &[p, hs / 2], &cos),
            f32t("sin", &[p, hs / 2], &sin),
        );
        run(|r| RopeBackward::new(&gpu().device, n, hs).encode(r, &dt, &ct, &st));
        let mut want = d.clone();
        train::rope_backward(&mut want, n, hs, &cos, &sin);
        KERNEL_F32.assert_close(
            &format!("rope_backward T={t} N={n} HS={hs}"),
            &read(&dt),
            &want,
        );
    }
}

#[test]
fn attention_backward_matches_reference() {
    let mut rng = Rng::new(25);
    // T = 100 > 64 rows spans two workgroups; NH = 6, NKV = 2 groups by 3; MHA; MQA.
    for (t, nh, nkv, hs) in [
        (37, 4, 2, 16),
        (100, 6, 2, 12),
        (1, 2, 2, 80),
        (70, 3, 1, 128),
    ] {
        let q = normal(&mut rng, t * nh * hs, 1.0);
        let k = normal(&mut rng, t * nkv * hs, 1.0);
        let v = normal(&mut rng, t * nkv * hs, 1.0);
        let dout = normal(&mut rng, t * nh * hs, 1.0);
        let (qt, kt, vt, dot) = (
            f32t("q", &[t, nh * hs], &q),
            f32t("k", &[t, nkv * hs], &k),
            f32t("v", &[t, nkv * hs], &v),
            f32t("dout", &[t, nh * hs], &dout),
        );
        let stats = zeros("stats", &[nh, t, 3]);
        let (dq, dk, dv) = (
            zeros("dq", &[t, nh * hs]),
            zeros("dk", &[t, nkv * hs]),
            zeros("dv", &[t, nkv * hs]),
        );
        run(|r| {
            AttentionBackward::new(&gpu().device, nh, nkv, hs)
                .encode(r, &qt, &kt, &vt, &dot, &stats, &dq, &dk, &dv)
        });
        let (_, probs) = train::attention_forward(&q, &k, &v, t, nh, nkv, hs);
        let (wq, wk, wv) = train::attention_backward(&q, &k, &v, &probs, &dout, t, nh, nkv, hs);
        let name = format!("attention_backward T={t} NH={nh} NKV={nkv} HS={hs}");
        KERNEL_TRANSCENDENTAL.assert_close(&format!("{name} dq"), &read(&dq), &wq);
        KERNEL_TRANSCENDENTAL.assert_close(&format!("{name} dk"), &read(&dk), &wk);
        KERNEL_TRANSCENDENTAL.assert_close(&format!("{name} dv"), &read(&dv), &wv);
        // Pass 1 keeping the scores of rows up to 5 keys only (recomputing them for longer
        // rows): the same values, bit for bit.
        let (dq2, dk2, dv2) = (
            zeros("dq", &[t, nh * hs]),
            zeros("dk", &[t, nkv * hs]),
            zeros("dv", &[t, nkv * hs]),
        );
        run(|r| {
            AttentionBackward::with_kept_keys(&gpu().device, nh, nkv, hs, 5)
                .encode(r, &qt, &kt, &vt, &dot, &stats, &dq2, &dk2, &dv2)
        });
        assert_eq!(
            read(&dq2),
            read(&dq),
            "{name} dq, scores recomputed past 5 keys"
        );
        assert_eq!(
            read(&dk2),
            read(&dk),
            "{name} dk, scores recomputed past 5 keys"
        );
        assert_eq!(
            read(&dv2),
            read(&dv),
            "{name} dv, scores recomputed past 5 keys"
        );
    }
}

/// The CPU's row loop of `train::forward_backward`: (loss per row, dlogits) with weight w.
fn cross_entropy_reference(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    weight: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut loss = vec![0f32; targets.len()];
    let mut dl = vec![0f32; logits.len()];
    for (t, &y) in targets.iter().enumerate() {
        if y == MASKED {
            continue;
        }
        let row = &logits[t * v..(t + 1) * v];
        let lse = train::log_sum_exp(row);
        loss[t] = lse - row[y as usize];
        for (vi, &l) in row.iter().enumerate() {
            let mut g = (l - lse).exp();
            if vi == y as usize {
                g -= 1.0;
            }
            let d = g * weight;
            dl[t * v + vi] = if d.abs() < train::LOGIT_GRAD_FLUSH {
                0.0
            } else {
                d
            };
        }
    }
    (loss, dl)
}

#[test]
fn cross_entropy_matches_reference_with_masked_rows() {
    let mut rng = Rng::new(26);
    let g = gpu();
    // V not a multiple of the workgroup; a vocabulary of 2B-4T's order in a few rows; one row;
    // logits spread so wide (std 40) that most of the softmax lies below LOGIT_GRAD_FLUSH.
    for (t, v, std) in [
        (37, 1000, 3.0),
        (3, 128_256, 3.0),
        (1, 5, 3.0),
        (4, 300, 40.0),
    ] {
        let logits = normal(&mut rng, t * v, std);
        let targets: Vec<u32> = (0..t)
            .map(|i| {
                if i % 5 == 2 {
                    MASKED
                } else {
                    rng.below(v as u64) as u32
                }
            })
            .collect();
        let tt = GpuTensor::u32(&g.device, "targets", &[t], &targets).unwrap();
        let op = CrossEntropy::new(&g.device, v);
        // weight 1: dlogits = softmax - onehot, O(1) values for the tolerance; weight 1/4
        // scales them exactly.
        let mut got = Vec::new();
        for weight in [1.0f32, 0.25] {
            let (lt, loss) = (f32t("logits", &[t, v], &logits), zeros("loss", &[t]));
            run(|r| op.encode(r, &lt, &tt, weight, &loss));
            got.push((read(&loss), read(&lt)));
        }
        let (want_loss, want_dl) = cross_entropy_reference(&logits, &targets, v, 1.0);
        let name = format!("cross_entropy T={t} V={v}");
        KERNEL_TRANSCENDENTAL.assert_close(&format!("{name} loss"), &got[0].0, &want_loss);
        KERNEL_TRANSCENDENTAL.assert_close(&format!("{name} dlogits"), &got[0].1, &want_dl);
        if std > 10.0 {
            // The flushed tail is exactly 0 on the GPU too (a tolerance would pass a tiny
            // nonzero), and there is one.
            let tail: Vec<usize> = (0..want_dl.len())
                .filter(|&k| want_dl[k] == 0.0 && targets[k / v] != MASKED)
                .collect();
            assert!(tail.len() > t * v / 2, "{name}: {} flushed", tail.len());
            assert!(
                tail.iter().all(|&k| got[0].1[k] == 0.0),
                "{name}: tail not flushed"
            );
        } else {
            let quarter: Vec<f32> = got[0].1.iter().map(|x| x * 0.25).collect();
            assert_eq!(got[1].1, quarter, "{name}: weight scales dlogits exactly");
        }
        assert_eq!(got[1].0, got[0].0, "{name}: weight leaves the loss");
        for (i, &y) in targets.iter().enumerate() {
            if y == MASKED {
                assert_eq!(got[0].0[i], 0.0, "{name}: masked row {i} loss");
                assert!(got[0].1[i * v..(i + 1) * v].iter().all(|&x| x == 0.0));
            }
        }
    }
}

/// The LoRA products chained into one projection's forward and backward, against
/// `train::linear_forward` / `linear_backward` (dropout off): y, dX (ternary straight-through
/// plus the LoRA path) and dA, dB accumulated into nonzero gradients.
#[test]
fn lora_linear_forward_and_backward_match_reference() {
    let mut rng = Rng::new(27);
    let g = gpu();
    for (t, i, o, r) in [
        (37, 101, 70, 8),
        (70, 64, 177, 3),
        (1, 33, 12, 1),
        (9, 70, 40, 12),
    ] {
        let lin = TernaryLinear::from_master(&normal(&mut rng, o * i, 0.02), o, i);
        let pair = LoraPair {
            a: normal(&mut rng, r * i, 0.1),
            b: normal(&mut rng, o * r, 0.1),
        };
        let x = normal(&mut rng, t * i, 1.0);
        let dy = normal(&mut rng, t * o, 1.0);
        let scale = 16.0 / r as f32;
        let grad0 = LoraPair {
            a: normal(&mut rng, r * i, 0.1),
            b: normal(&mut rng, o * r, 0.1),
        };
        let (want_y, acts) =
            train::linear_forward(&lin, Some(&pair), &x, scale, r, 0.0, &mut Rng::new(0));
        let mut want_grad = grad0.clone();
        let want_dx = train::linear_backward(
            &lin,
            Some(&pair),
            Some(&mut want_grad),
            &acts,
            &x,
            &dy,
            scale,
            r,
        );

        // Both forms of down and grad_u: one invocation per output (CPU adapters) and one
        // workgroup per output splitting the sum (GPUs).
        for reduce in [false, true] {
            let op = LoraMatmul::with_reduce(&g.device, i, o, r, reduce);
            let (xt, at, bt, dyt) = (
                f32t("x", &[t, i], &x),
                f32t("A", &[r, i], &pair.a),
                f32t("B", &[o, r], &pair.b),
                f32t("dy", &[t, o], &dy),
            );
            // The base BitLinear output from the CPU: this test is about the LoRA products.
            let y = f32t("y", &[t, o], &lin.forward(&x));
            let (u, du) = (zeros("u", &[t, r]), zeros("du", &[t, r]));
            let (da, db) = (f32t("dA", &[r, i], &grad0.a), f32t("dB", &[o, r], &grad0.b));
            let dx = zeros("dx", &[t, i]);
            let w = GpuTensor::ternary(&g.device, "W", &lin).unwrap();
            let sw = f32t("s_w", &[1], &[lin.w_scale]);
            run(|rec| {
                op.down(rec, &xt, &at, &u)?;
                op.up_add(rec, &u, &bt, scale, &y)?;
                TernaryBackward::new(&g.device, i, o).encode(rec, &dyt, &w, &sw, &dx)?;
                op.grad_b(rec, &dyt, &u, scale, &db)?;
                op.grad_u(rec, &dyt, &bt, scale, &du)?;
                op.grad_a(rec, &du, &xt, &da)?;
                op.grad_x_add(rec, &du, &at, &dx)
            });
            let name = format!("lora T={t} I={i} O={o} R={r} (split sums: {reduce})");
            KERNEL_F32.assert_close(&format!("{name} y"), &read(&y), &want_y);
            KERNEL_F32.assert_close(&format!("{name} dX"), &read(&dx), &want_dx);
            KERNEL_F32.assert_close(&format!("{name} dA"), &read(&da), &want_grad.a);
            KERNEL_F32.assert_close(&format!("{name} dB"), &read(&db), &want_grad.b);
        }
    }
}

fn flat(l: &Lora) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    l.clone().for_each_mut(|_, _, t| out.push(t.clone()));
    out
}

fn random_like(l: &Lora, rng: &mut Rng, std: f32) -> Lora {
    let mut z = l.zeros_like();
    z.for_each_mut(|_, _, t| t.iter_mut().for_each(|x| *x = std * rng.normal()));
    z
}

#[test]
fn adamw_step_matches_reference() {
    let mut rng = Rng::new(28);
    let g = gpu();
    // Two adapted projections, odd sizes; clipping active (the gradient norm is far above 1),
    // weight decay, warmup then cosine.
    let mut layer: [Option<LoraPair>; 7] = Default::default();
    layer[0] = Some(LoraPair {
        a: normal(&mut rng, 3 * 37, 0.1),
        b: normal(&mut rng, 70 * 3, 0.1),
    });
    layer[6] = Some(LoraPair {
        a: normal(&mut rng, 3 * 1001, 0.1),
        b: normal(&mut rng, 5 * 3, 0.1),
    });
    let mut params = Lora {
        config: LoraConfig::new(3, 6.0, 0.0, false, &["q_proj", "down_proj"]).unwrap(),
        layers: vec![layer],
    };
    let config = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
        schedule: Schedule::Cosine,
        warmup_steps: 1,
        total_steps: 5,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(config.clone(), &params);
    let names = ["q.A", "q.B", "down.A", "down.B"];
    let up = |v: &[Vec<f32>], what: &str| -> Vec<GpuTensor> {
        v.iter()
            .zip(names)
            .map(|(x, n)| f32t(&format!("{what} {n}"), &[x.len()], x))
            .collect()
    };
    let (p, m, v) = (
        up(&flat(&params), "p"),
        up(&flat(&opt.m), "m"),
        up(&flat(&opt.v), "v"),
    );
    let kernel = AdamWStep::new(&g.device);
    for step in 0..4 {
        // Step 3 has small gradients: no clipping.
        let std = if step == 3 { 1e-3 } else { 1.0 };
        let mut grads = random_like(&params, &mut rng, std);
        let gt = up(&flat(&grads), "g");
        let s = AdamWScalars::new(&config, opt.step, AdamW::grad_norm(&grads));
        let info = opt.step(&mut params, &mut grads);
        assert_eq!(info.lr, s.lr);
        run(|rec| {
            for k in 0..4 {
                kernel.encode(rec, &s, &p[k], &gt[k], &m[k], &v[k])?;
            }
            Ok(())
        });
        for (k, n) in names.iter().enumerate() {
            let what = format!("adamw step {} (coef {:.3}) {n}", step + 1, s.coef);
            KERNEL_F32.assert_close(&format!("{what} g"), &read(&gt[k]), &flat(&grads)[k]);
            KERNEL_F32.assert_close(&format!("{what} m"), &read(&m[k]), &flat(&opt.m)[k]);
            KERNEL_F32.assert_close(&format!("{what} v"), &read(&v[k]), &flat(&opt.v)[k]);
            KERNEL_F32.assert_close(&format!("{what} p"), &read(&p[k]), &flat(&params)[k]);
        }
    }
}

#[test]
fn training_launchers_reject_wrong_shapes() {
    let g = gpu();
    let mut rec = Recorder::new(&g.device);
    let (a, b) = (zeros("a", &[4, 10]), zeros("b", &[4, 11]));
    let e = LoraMatmul::new(&g.device, 10, 7, 2)
        .down(&mut rec, &a, &b, &a)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("`b` is F32 [4, 11], expected F32 [2, 10]"),
        "{e}"
    );
    let e = AdamWStep::new(&g.device)
        .encode(
            &mut rec,
            &AdamWScalars::new(&AdamWConfig::default(), 0, 0.0),
            &a,
            &a,
            &b,
            &a,
        )
        .unwrap_err();
    assert!(matches!(e, GpuError::Shape { op: "adamw", .. }), "{e}");
    let stats = zeros("stats", &[2, 4, 2]);
    let q = zeros("q", &[4, 16]);
    let kv = zeros("k", &[4, 8]);
    let e = AttentionBackward::new(&g.device, 2, 1, 8)
        .encode(&mut rec, &q, &kv, &kv, &q, &stats, &q, &kv, &kv)
        .unwrap_err();
    assert!(e.to_string().contains("`stats`"), "{e}");
}

/// The dropout kernel draws the CPU's numbers itself (SplitMix64 emulated in u32 pairs): its
/// masks equal `train::dropout_draws` from the same state bit for bit, the masked values are the
/// CPU's products exactly, and the add form adds them (to rounding: see below).
#[test]
fn dropout_kernel_draws_the_cpu_masks_exactly() {
    let g = gpu();
    let mut rng = Rng::new(31);
    let (t, i) = (37, 1001);
    let x = normal(&mut rng, t * i, 1.0);
    let xt = f32t("x", &[t, i], &x);
    let op = Dropout::new(&g.device, i);
    for (seed, p) in [
        (0u64, 0.1f32),
        (0xdead_beef_1234_5678, 0.5),
        (u64::MAX, 0.05),
    ] {
        let mut cpu = Rng::new(seed);
        cpu.skip(1000); // a stream that starts mid-way, as a later projection's does
        let state = cpu.state();
        let keep = train::dropout_keep_factor(p);
        let want: Vec<f32> = train::dropout_draws(t * i, p, &mut cpu)
            .zip(&x)
            .map(|(kept, &v)| v * if kept { keep } else { 0.0 })
            .collect();
        let out = zeros("out", &[t, i]);
        run(|r| op.encode(r, &xt, state, p, &out));
        let got = read(&out);
        let dropped = want.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(got, want, "dropout p={p} from state {state:#x}");
        let acc = f32t("acc", &[t, i], &x);
        run(|r| op.encode_add(r, &xt, state, p, &acc));
        let sum: Vec<f32> = x.iter().zip(&want).map(|(a, b)| a + b).collect();
        // `acc + x * keep`: a real GPU's compiler may fuse it into one FMA (SPIR-V allows the
        // contraction; NVIDIA's does, lavapipe does not), one rounding instead of two, so the
        // add form is within KERNEL_F32 of the CPU's, not equal. The masks above are exact.
        KERNEL_F32.assert_close(&format!("dropout add p={p}"), &read(&acc), &sum);
        println!(
            "dropout p={p}: {dropped} of {} dropped, equal to the CPU's bit for bit",
            t * i
        );
    }
}

/// The head's dX: dlogits (T, V) . W, with W whole and split along V into chunks (the first
/// chunk writes, the others add), into a window of rows of dx.
#[test]
fn matmul_backward_matches_reference() {
    let g = gpu();
    let mut rng = Rng::new(32);
    for (t, v, c, chunk) in [(37, 509, 64, 509), (9, 1001, 33, 100), (1, 70, 5, 7)] {
        let dy = normal(&mut rng, t * v, 1.0);
        let w = normal(&mut rng, v * c, 0.3);
        let mut want = vec![0f32; t * c];
        for tt in 0..t {
            for o in 0..v {
                ops::axpy(
                    &mut want[tt * c..(tt + 1) * c],
                    dy[tt * v + o],
                    &w[o * c..(o + 1) * c],
                );
            }
        }
        let split = bitlora_gpu::SplitTensor::f32(&g.device, "W", v, c, &w, (chunk * c * 4) as u64)
            .unwrap();
        let dyt = f32t("dy", &[t, v], &dy);
        // Rows 2 .. 2+T of a taller dx.
        let dx = zeros("dx", &[t + 3, c]);
        run(|r| MatmulBackward::new(&g.device, c, v).encode_split(r, &dyt, &split, &dx, 2));
        let got = read(&dx);
        KERNEL_F32.assert_close(
            &format!(
                "matmul_backward T={t} V={v} C={c} in {} chunks",
                split.chunks.len()
            ),
            &got[2 * c..(2 + t) * c],
            &want,
        );
        assert!(
            got[..2 * c]
                .iter()
                .chain(&got[(2 + t) * c..])
                .all(|&x| x == 0.0)
        );
        // The sum over V split into 3 slabs per chunk (as on GPUs), then reduced.
        let dx = zeros("dx", &[t + 3, c]);
        let scratch = zeros("scratch", &[3, t + 1, c]);
        let op = MatmulBackward::new(&g.device, c, v);
        run(|r| op.encode_split_k(r, &dyt, &split, &dx, 2, &scratch));
        let got = read(&dx);
        KERNEL_F32.assert_close(
            &format!("matmul_backward in 3 slabs T={t} V={v} C={c}"),
            &got[2 * c..(2 + t) * c],
            &want,
        );
        assert!(
            got[..2 * c]
                .iter()
                .chain(&got[(2 + t) * c..])
                .all(|&x| x == 0.0)
        );
    }
}
