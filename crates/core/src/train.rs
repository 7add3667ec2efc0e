//! LoRA training on the CPU reference: the forward pass that saves what the backward needs,
//! and the backward pass, layer by layer in exact reverse order of the forward.
//!
//! Gradient rules (as PyTorch + PEFT compute them on transformers' BitNet):
//! - LoRA A and B are the only trainable tensors; their gradients ACCUMULATE (`+=`), so
//!   several micro-batches can be summed before an optimizer step.
//! - Activation gradients are overwritten, except the residual stream `dh`, which each block
//!   adds into.
//! - Frozen ternary projections give dX only: `dX = dY . (T / s_w)`, straight-through on the
//!   activation quantizer (transformers' `ActQuant.backward` is the identity), no dW.
//! - Norm weights, embeddings and the head are frozen: they pass gradients, they get none.
//!
//! Dimension letters: T tokens, C hidden, F ffn, V vocab, NH/NKV heads, HS head size, R rank.

use crate::config::{Activation, Config};
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraPair};
use crate::model::{Model, Proj};
use crate::ops;
use crate::quant::TernaryLinear;
use crate::rng::Rng;

/// What one projection's forward saved.
pub struct LinearActs {
    /// Dropout's factors (T, I): 0 for a dropped input, 1/(1-p) for a kept one; None when
    /// dropout is off (or the projection has no adapter).
    mask: Option<Vec<f32>>,
    /// u = dropout(x) . A^T (T, R), when the projection has an adapter.
    u: Option<Vec<f32>>,
}

/// What one layer's forward saved for its backward.
struct LayerActs {
    h_in: Vec<f32>,       // (T, C) residual stream entering the layer
    xn1: Vec<f32>,        // (T, C) input_layernorm(h_in)
    q: Vec<f32>,          // (T, NH*HS) after RoPE
    k: Vec<f32>,          // (T, NKV*HS) after RoPE
    v: Vec<f32>,          // (T, NKV*HS)
    probs: Vec<f32>,      // (NH, T, T) attention probabilities (zero above the diagonal)
    att: Vec<f32>,        // (T, NH*HS) attention output, before attn_sub_norm
    an: Vec<f32>,         // (T, NH*HS) attn_sub_norm(att)
    h_mid: Vec<f32>,      // (T, C) residual stream after the attention block
    xn2: Vec<f32>,        // (T, C) post_attention_layernorm(h_mid)
    gate: Vec<f32>,       // (T, F)
    up: Vec<f32>,         // (T, F)
    f: Vec<f32>,          // (T, F) act(gate) * up
    fnorm: Vec<f32>,      // (T, F) ffn_sub_norm(f)
    lin: [LinearActs; 7], // per projection, indexed by Proj
}

/// The result of one forward + backward: the mean loss over the counted targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLoss {
    pub loss: f32,
    pub tokens: usize, // targets that counted
}

/// Logit gradients (softmax - onehot, scaled) smaller in magnitude than this are set to zero
/// before the head's backward. A peaked softmax leaves most of a row's V entries far below
/// f32's smallest normal (1.2e-38: on the random benchmark models ~18% of them subnormal, most
/// of the rest below 1e-20), and x86 multiplies subnormals ~100x slower: the head's backward
/// took 63% of a CPU step. What is dropped moves dX by at most 1e-30 x sum |W| over the
/// vocabulary (< 1e-24 for |W| <= 1 and V = 128k), far below the f32 rounding of any dX
/// element that matters; a row's own target entry (p - 1) is never that small unless p is 1
/// to within f32, where it is 0 already. The GPU's cross-entropy does the same
/// (`shaders/cross_entropy.wgsl`).
pub const LOGIT_GRAD_FLUSH: f32 = 1e-30;

/// One row of logits (V) becomes its dlogits in place: (softmax - onehot(y)) * grad_scale /
/// counted, with [`LOGIT_GRAD_FLUSH`]'s tail set to 0; `lse` is the row's log-sum-exp.
fn logit_grads(row: &mut [f32], y: usize, lse: f32, grad_scale: f32, counted: f32) {
    for (c, chunk) in row.chunks_mut(EXP_CHUNK).enumerate() {
        for l in chunk.iter_mut() {
            *l -= lse;
        }
        crate::expf::expf_in_place(chunk); // libm::expf's bits, several at a time
        for (j, l) in chunk.iter_mut().enumerate() {
            let mut g = *l;
            if c * EXP_CHUNK + j == y {
                g -= 1.0;
            }
            let d = g * grad_scale / counted;
            *l = if d.abs() < LOGIT_GRAD_FLUSH { 0.0 } else { d };
        }
    }
}

/// Elements per call of [`crate::expf::expf_in_place`] in the softmax (a stack buffer's worth).
const EXP_CHUNK: usize = 256;

/// The log-sum-exp of each row of `logits` (rows, V) that has a target (others: 0), rows split
/// between threads; each row's value is [`log_sum_exp`]'s, whatever the threads.
fn row_log_sum_exps(logits: &[f32], v: usize, targets: &[Option<u32>]) -> Vec<f32> {
    let mut lse = vec![0f32; logits.len() / v];
    crate::par::chunks(&mut lse, 1, |k0, out| {
        for (k, l) in out.iter_mut().enumerate() {
            if targets[k0 + k].is_some() {
                *l = log_sum_exp(&logits[(k0 + k) * v..(k0 + k + 1) * v]);
            }
        }
    });
    lse
}

/// Dropout's draws for `n` inputs, in order: true where the input is kept. One `rng.uniform()`
/// per input, dropped when it is below `dropout`. [`linear_forward`] draws its masks through
/// this, and so does every other backend (the GPU uploads them), so that the same RNG gives the
/// same masks everywhere.
pub fn dropout_draws(n: usize, dropout: f32, rng: &mut Rng) -> impl Iterator<Item = bool> + '_ {
    (0..n).map(move |_| rng.uniform() >= dropout)
}

/// The factor a kept input is multiplied by: `1 / (1 - dropout)`, in f32 as PyTorch's
/// `nn.Dropout` scales.
pub fn dropout_keep_factor(dropout: f32) -> f32 {
    1.0 / (1.0 - dropout)
}

/// `y = BitLinear(x) + scale * (dropout(x) . A^T) . B^T`, saving what the backward needs.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    lin: &TernaryLinear,
    pair: Option<&LoraPair>,
    x: &[f32],
    scale: f32,
    r: usize,
    dropout: f32,
    rng: &mut Rng,
) -> (Vec<f32>, LinearActs) {
    let mut y = lin.forward(x); // (T, O)
    let Some(pair) = pair else {
        return (
            y,
            LinearActs {
                mask: None,
                u: None,
            },
        );
    };
    let (o, i) = (lin.out_features, lin.in_features);
    let mask = (dropout > 0.0).then(|| {
        let keep = dropout_keep_factor(dropout);
        dropout_draws(x.len(), dropout, rng)
            .map(|kept| if kept { keep } else { 0.0 })
            .collect::<Vec<f32>>()
    });
    let x_drop = mask
        .as_ref()
        .map(|m| x.iter().zip(m).map(|(a, b)| a * b).collect::<Vec<f32>>());
    let u = ops::matmul_t_fast(x_drop.as_deref().unwrap_or(x), &pair.a, i, r); // (T, R)
    let ub = ops::matmul_t_fast(&u, &pair.b, r, o); // (T, O)
    for (yv, &l) in y.iter_mut().zip(&ub) {
        *yv += scale * l;
    }
    (y, LinearActs { mask, u: Some(u) })
}

/// Backward of [`linear_forward`]: returns dX (T, I); accumulates dA, dB into `grad`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    lin: &TernaryLinear,
    pair: Option<&LoraPair>,
    grad: Option<&mut LoraPair>,
    acts: &LinearActs,
    x: &[f32],
    dy: &[f32],
    scale: f32,
    r: usize,
) -> Vec<f32> {
    let (o, i) = (lin.out_features, lin.in_features);
    let t = dy.len() / o;
    let mut dx = ternary_backward(lin, dy); // (T, I) = dY . (T / s_w)
    if let (Some(pair), Some(grad), Some(u)) = (pair, grad, acts.u.as_ref()) {
        let x_drop = acts
            .mask
            .as_ref()
            .map(|m| x.iter().zip(m).map(|(a, b)| a * b).collect::<Vec<f32>>());
        let xd = x_drop.as_deref().unwrap_or(x);
        // dB (O, R) += scale * dY^T . u: rows of dB on separate threads, tokens in order.
        crate::par::rows(&mut grad.b, r, 64, |o0, gb| {
            for (dyr, ur) in dy.chunks_exact(o).zip(u.chunks_exact(r)) {
                for (&d, gbr) in dyr[o0..].iter().zip(gb.chunks_exact_mut(r)) {
                    let g = scale * d;
                    for (gbv, &uv) in gbr.iter_mut().zip(ur) {
                        *gbv += g * uv;
                    }
                }
            }
        });
        // du (T, R) = scale * dY . B: tokens on separate threads, rows of B in order.
        let mut du = vec![0f32; t * r];
        crate::par::rows(&mut du, r, 1, |t0, block| {
            for (dur, dyr) in block.chunks_exact_mut(r).zip(dy[t0 * o..].chunks_exact(o)) {
                for (&d, b) in dyr.iter().zip(pair.b.chunks_exact(r)) {
                    let g = scale * d;
                    for (duv, &bv) in dur.iter_mut().zip(b) {
                        *duv += g * bv;
                    }
                }
            }
        });
        // dA (R, I) += du^T . dropout(x): rows of dA on separate threads, tokens in order.
        crate::par::rows(&mut grad.a, i, 1, |r0, ga| {
            for (dur, xr) in du.chunks_exact(r).zip(xd.chunks_exact(i)) {
                for (&g, gar) in dur[r0..].iter().zip(ga.chunks_exact_mut(i)) {
                    ops::axpy(gar, g, xr);
                }
            }
        });
        // d dropout(x) (T, I) = du . A: tokens on separate threads, rows of A in order.
        let mut dxd = vec![0f32; t * i];
        crate::par::rows(&mut dxd, i, 1, |t0, block| {
            for (dxr, dur) in block.chunks_exact_mut(i).zip(du[t0 * r..].chunks_exact(r)) {
                for (&g, a) in dur.iter().zip(pair.a.chunks_exact(i)) {
                    ops::axpy(dxr, g, a);
                }
            }
        });
        // Through dropout: the same factors as the forward.
        match &acts.mask {
            None => dx.iter_mut().zip(&dxd).for_each(|(a, b)| *a += b),
            Some(m) => dx
                .iter_mut()
                .zip(&dxd)
                .zip(m)
                .for_each(|((a, b), f)| *a += b * f),
        }
    }
    dx
}

/// dX (T, I) = dY (T, O) . W with W = T / s_w the dequantized ternary weight: the fast
/// path, equal to [`ternary_backward_reference`] within f32 rounding (natively it fuses each
/// multiply-add). Blocks of tokens run on separate threads; natively on x86-64 a
/// register-tiled GEMM (AVX-512F or AVX2+FMA, [`ternary_backward_tiled`]) computes the FMA
/// body's bits, elsewhere (wasm) the body runs as written.
pub fn ternary_backward(lin: &TernaryLinear, dy: &[f32]) -> Vec<f32> {
    let (o, i) = (lin.out_features, lin.in_features);
    let t = dy.len() / o;
    let mut dx = vec![0f32; t * i];
    // Blocks of tokens on separate threads (crate::par): the same sums in the same order.
    crate::par::rows(&mut dx, i, 4, |r0, out| {
        let rows = out.len() / i;
        ternary_backward_block(lin, &dy[r0 * o..(r0 + rows) * o], out)
    });
    dx
}

/// [`ternary_backward`] on a block of tokens: `dx` (rows, I) from `dy` (rows, O).
fn ternary_backward_block(lin: &TernaryLinear, dy: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { tiled::backward_avx512(lin, dy, dx) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { tiled::backward_avx2(lin, dy, dx) };
        }
    }
    // In wasm (the page's CPU fallback) the body: a SIMD128 twin of the tiles (6 x 8, the
    // same bits) measured slower in Chromium (BENCHMARKS.md, issue 16, fifth session).
    ternary_backward_body::<false>(lin, dy, dx)
}

/// The register-tiled form of [`ternary_backward_body`]`::<true>`, equal to it bit for bit:
/// dX = dY . W as a GEMM whose reduction index k runs over the weight rows in the packed order
/// (packed row p ascending, then its four sub-rows s), each element a chain of fused
/// multiply-adds from 0 in that order, then times 1 / s_w, exactly as the body does.
///
/// Layout: dY is copied once into MR-token tiles stored k-major (`gp[tile][k][MR]`, rows past O
/// and tokens past T zero); then per strip of NR columns the weights are dequantized once into
/// `wp[k][NR]` (f32 -1/0/+1; columns past I zero), and `kernel` runs every token tile over the
/// whole reduction with the MR x NR block of dX in registers: per k, NR / lanes loads of W and
/// MR broadcasts of dY feed MR * NR / lanes FMAs. Where the body re-read and re-wrote each dX
/// row for every packed row (L2-bound), the tile touches dX once.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ternary_backward_tiled<const MR: usize, const NR: usize>(
    lin: &TernaryLinear,
    dy: &[f32],
    dx: &mut [f32],
    kernel: impl Fn(&[f32], &[f32], &mut [[f32; NR]; MR]),
) {
    let (o, i) = (lin.out_features, lin.in_features);
    let o4 = lin.packed_rows();
    let k = 4 * o4;
    let t = dy.len() / o;
    let tiles = t.div_ceil(MR);
    // gp[tile][k][r] = dY[tile * MR + r][row of k], k = 4 p + s <-> row = p + s * o4.
    let mut gp = vec![0f32; tiles * k * MR];
    for tt in 0..t {
        let (tile, r) = (tt / MR, tt % MR);
        let g = &mut gp[tile * k * MR..(tile + 1) * k * MR];
        for (row, &v) in dy[tt * o..(tt + 1) * o].iter().enumerate() {
            let (s, p) = (row / o4, row % o4);
            g[(4 * p + s) * MR + r] = v;
        }
    }
    let inv = 1.0 / lin.w_scale;
    let mut wp = vec![0f32; k * NR];
    for c0 in (0..i).step_by(NR) {
        let nc = NR.min(i - c0);
        if nc < NR {
            wp.fill(0.0);
        }
        for p in 0..o4 {
            let bytes = &lin.packed[p * i + c0..p * i + c0 + nc];
            for s in 0..4 {
                let row = &mut wp[(4 * p + s) * NR..(4 * p + s) * NR + nc];
                for (w, &b) in row.iter_mut().zip(bytes) {
                    *w = ((b >> (2 * s)) & 3) as f32 - 1.0;
                }
            }
        }
        for tile in 0..tiles {
            let mut acc = [[0f32; NR]; MR];
            kernel(&gp[tile * k * MR..(tile + 1) * k * MR], &wp, &mut acc);
            for (r, a) in acc.iter().enumerate().take(t - tile * MR) {
                let tt = tile * MR + r;
                for (d, &v) in dx[tt * i + c0..tt * i + c0 + nc].iter_mut().zip(a) {
                    *d = v * inv;
                }
            }
        }
    }
}

/// The micro-kernels of [`ternary_backward_tiled`]: `tile[r][c] = sum over k of g[k][r] w[k][c]`,
/// a chain of FMAs from 0 in k order, the MR x NR block in registers.
#[cfg(target_arch = "x86_64")]
mod tiled {
    use super::{TernaryLinear, ternary_backward_tiled};
    use std::arch::x86_64::*;

    /// [`ternary_backward_tiled`] with 8 x 32 tiles, its copies and dequantization built for
    /// AVX-512 too.
    #[target_feature(enable = "avx512f")]
    pub(super) fn backward_avx512(lin: &TernaryLinear, dy: &[f32], dx: &mut [f32]) {
        // (The closure inherits the feature, so the kernel's call needs no unsafe.)
        ternary_backward_tiled::<8, 32>(lin, dy, dx, |g, w, t| tile_avx512(g, w, t))
    }

    /// [`ternary_backward_tiled`] with 6 x 16 tiles, built for AVX2 + FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn backward_avx2(lin: &TernaryLinear, dy: &[f32], dx: &mut [f32]) {
        ternary_backward_tiled::<6, 16>(lin, dy, dx, |g, w, t| tile_avx2(g, w, t))
    }

    /// 8 tokens x 32 columns: 16 zmm accumulators, 2 loads and 8 broadcasts per k.
    #[target_feature(enable = "avx512f")]
    pub(super) fn tile_avx512(g: &[f32], w: &[f32], tile: &mut [[f32; 32]; 8]) {
        let k = w.len() / 32;
        assert!(
            g.len() >= k * 8,
            "tile_avx512: dY tile shorter than the weights"
        );
        let mut acc = [_mm512_setzero_ps(); 16];
        for kk in 0..k {
            // SAFETY: kk * 32 + 32 <= w.len() and kk * 8 + 8 <= g.len(), checked above.
            unsafe {
                let w0 = _mm512_loadu_ps(w.as_ptr().add(kk * 32));
                let w1 = _mm512_loadu_ps(w.as_ptr().add(kk * 32 + 16));
                for r in 0..8 {
                    let b = _mm512_set1_ps(*g.get_unchecked(kk * 8 + r));
                    acc[2 * r] = _mm512_fmadd_ps(b, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(b, w1, acc[2 * r + 1]);
                }
            }
        }
        for (r, row) in tile.iter_mut().enumerate() {
            // SAFETY: a row holds 32 f32.
            unsafe {
                _mm512_storeu_ps(row.as_mut_ptr(), acc[2 * r]);
                _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[2 * r + 1]);
            }
        }
    }

    /// 6 tokens x 16 columns: 12 ymm accumulators, 2 loads and 6 broadcasts per k.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile_avx2(g: &[f32], w: &[f32], tile: &mut [[f32; 16]; 6]) {
        let k = w.len() / 16;
        assert!(
            g.len() >= k * 6,
            "tile_avx2: dY tile shorter than the weights"
        );
        let mut acc = [_mm256_setzero_ps(); 12];
        for kk in 0..k {
            // SAFETY: kk * 16 + 16 <= w.len() and kk * 6 + 6 <= g.len(), checked above.
            unsafe {
                let w0 = _mm256_loadu_ps(w.as_ptr().add(kk * 16));
                let w1 = _mm256_loadu_ps(w.as_ptr().add(kk * 16 + 8));
                for r in 0..6 {
                    let b = _mm256_set1_ps(*g.get_unchecked(kk * 6 + r));
                    acc[2 * r] = _mm256_fmadd_ps(b, w0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(b, w1, acc[2 * r + 1]);
                }
            }
        }
        for (r, row) in tile.iter_mut().enumerate() {
            // SAFETY: a row holds 16 f32.
            unsafe {
                _mm256_storeu_ps(row.as_mut_ptr(), acc[2 * r]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[2 * r + 1]);
            }
        }
    }
}

/// The untiled FMA body: the twin that the tiled kernels equal bit for bit (tests).
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn ternary_backward_avx2(lin: &TernaryLinear, dy: &[f32], dx: &mut [f32]) {
    ternary_backward_body::<true>(lin, dy, dx)
}

/// Per block of TB tokens and per packed row p: the four weight rows that p's bytes hold are
/// dequantized once to f32 -1/0/+1, then every token of the block does
/// `dx += g0 w0 + g1 w1 + g2 w2 + g3 w3`, a loop the compiler vectorises (with FMA where the
/// CPU has it: `FMA`; wasm has no fused multiply-add, and a software one is slow). Each element
/// of dx sums the same terms in the same order (p ascending) whatever the blocks or threads.
/// (Measured on the 125m shapes: L2-bandwidth bound at about 5 loads + 1 store per 8 FMAs;
/// tiling columns for L1 and pairing tokens gained nothing, so this stays simple.)
#[inline(always)]
fn ternary_backward_body<const FMA: bool>(lin: &TernaryLinear, dy: &[f32], dx: &mut [f32]) {
    const TB: usize = 16; // tokens per block: TB rows of dx stay in L2 while W streams by
    let (o, i) = (lin.out_features, lin.in_features);
    let o4 = lin.packed_rows();
    let t = dy.len() / o;
    let mut wf = vec![0f32; 4 * i];
    for t0 in (0..t).step_by(TB) {
        let tn = TB.min(t - t0);
        for p in 0..o4 {
            let g_of = |tt: usize| -> [f32; 4] {
                [p, p + o4, p + 2 * o4, p + 3 * o4]
                    .map(|row| if row < o { dy[tt * o + row] } else { 0.0 })
            };
            if (t0..t0 + tn).all(|tt| g_of(tt) == [0.0; 4]) {
                continue;
            }
            let (w0, rest) = wf.split_at_mut(i);
            let (w1, rest) = rest.split_at_mut(i);
            let (w2, w3) = rest.split_at_mut(i);
            for (k, &b) in lin.packed[p * i..(p + 1) * i].iter().enumerate() {
                w0[k] = (b & 3) as f32 - 1.0;
                w1[k] = ((b >> 2) & 3) as f32 - 1.0;
                w2[k] = ((b >> 4) & 3) as f32 - 1.0;
                w3[k] = ((b >> 6) & 3) as f32 - 1.0;
            }
            for tt in t0..t0 + tn {
                let g = g_of(tt);
                if g == [0.0; 4] {
                    continue;
                }
                let dxr = &mut dx[tt * i..(tt + 1) * i];
                let rows = dxr.iter_mut().zip(&*w0).zip(&*w1).zip(&*w2).zip(&*w3);
                for ((((d, &a0), &a1), &a2), &a3) in rows {
                    *d = if FMA {
                        g[3].mul_add(a3, g[2].mul_add(a2, g[1].mul_add(a1, g[0].mul_add(a0, *d))))
                    } else {
                        *d + g[0] * a0 + g[1] * a1 + g[2] * a2 + g[3] * a3
                    };
                }
            }
        }
    }
    let inv = 1.0 / lin.w_scale;
    for d in dx.iter_mut() {
        *d *= inv;
    }
}

/// The plain twin of [`ternary_backward`]: one token, one packed row, one weight at a time.
pub fn ternary_backward_reference(lin: &TernaryLinear, dy: &[f32]) -> Vec<f32> {
    let (o, i) = (lin.out_features, lin.in_features);
    let o4 = lin.packed_rows();
    let t = dy.len() / o;
    let mut dx = vec![0f32; t * i];
    for tt in 0..t {
        let dxr = &mut dx[tt * i..(tt + 1) * i];
        for p in 0..o4 {
            let rows = [p, p + o4, p + 2 * o4, p + 3 * o4];
            let g: [f32; 4] = rows.map(|row| if row < o { dy[tt * o + row] } else { 0.0 });
            let w = &lin.packed[p * i..(p + 1) * i];
            for (d, &b) in dxr.iter_mut().zip(w) {
                for (s, &gs) in g.iter().enumerate() {
                    *d += gs * (((b >> (2 * s)) & 3) as f32 - 1.0);
                }
            }
        }
        for d in dxr.iter_mut() {
            *d /= lin.w_scale;
        }
    }
    dx
}

/// RMSNorm backward with a frozen weight: x (T, C), w (C), dy (T, C) -> dx (T, C).
/// With r = 1/sqrt(mean(x^2) + eps): dx = r * (w*dy - x * r^2 * mean(w*dy*x)).
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let c = w.len();
    let mut dx = vec![0f32; x.len()];
    // Rows on separate threads (each row alone).
    crate::par::rows(&mut dx, c, 4, |r0, block| {
        let rows = block.len() / c;
        let (x, dy) = (&x[r0 * c..(r0 + rows) * c], &dy[r0 * c..(r0 + rows) * c]);
        rms_norm_backward_rows(x, w, eps, dy, block);
    });
    dx
}

/// [`rms_norm_backward`] on a block of rows.
fn rms_norm_backward_rows(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let c = w.len();
    for ((dxr, xr), dyr) in dx
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(dy.chunks_exact(c))
    {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let r = 1.0 / (ms + eps).sqrt();
        let dot = xr
            .iter()
            .zip(dyr)
            .zip(w)
            .map(|((&xv, &g), &wv)| wv * g * xv)
            .sum::<f32>()
            / c as f32;
        for k in 0..c {
            dxr[k] = r * (w[k] * dyr[k] - xr[k] * r * r * dot);
        }
    }
}

/// RoPE backward (the transpose of the rotation), in place on dq or dk.
pub fn rope_backward(dx: &mut [f32], n_heads: usize, hs: usize, cos: &[f32], sin: &[f32]) {
    let half = hs / 2;
    let width = n_heads * hs;
    for p in 0..dx.len() / width {
        for h in 0..n_heads {
            let head = &mut dx[p * width + h * hs..p * width + (h + 1) * hs];
            for j in 0..half {
                let (c, s) = (cos[p * half + j], sin[p * half + j]);
                let (d1, d2) = (head[j], head[j + half]);
                head[j] = d1 * c + d2 * s;
                head[j + half] = -d1 * s + d2 * c;
            }
        }
    }
}

/// Causal GQA attention that also returns its probabilities (NH, T, T).
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (qw, kw, group) = (nh * hs, nkv * hs, nh / nkv);
    let scale = 1.0 / (hs as f32).sqrt();
    let mut probs = vec![0f32; nh * t * t];
    // Heads on separate threads: each head's (T, T) block of probabilities alone.
    crate::par::rows(&mut probs, t * t, 1, |h0, block| {
        for (hb, head) in block.chunks_exact_mut(t * t).enumerate() {
            let h = h0 + hb;
            let g = h / group;
            for (i, row) in head.chunks_exact_mut(t).enumerate() {
                let qi = &q[i * qw + h * hs..i * qw + (h + 1) * hs];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in row.iter_mut().enumerate().take(i + 1) {
                    *s = qi
                        .iter()
                        .zip(&k[j * kw + g * hs..j * kw + (g + 1) * hs])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale;
                    max = max.max(*s);
                }
                let row = &mut row[..=i];
                for s in row.iter_mut() {
                    *s -= max;
                }
                crate::expf::expf_in_place(row); // libm::expf's bits
                let mut denom = 0f32;
                for s in row.iter() {
                    denom += *s;
                }
                for s in row.iter_mut() {
                    *s /= denom;
                }
            }
        }
    });
    let mut out = vec![0f32; t * qw];
    // Tokens on separate threads: a token's output sums its keys in order, head by head.
    crate::par::rows(&mut out, qw, 1, |i0, block| {
        for (ib, oi) in block.chunks_exact_mut(qw).enumerate() {
            let i = i0 + ib;
            for h in 0..nh {
                let g = h / group;
                let oh = &mut oi[h * hs..(h + 1) * hs];
                for j in 0..=i {
                    let pij = probs[(h * t + i) * t + j];
                    for (o, &vv) in oh
                        .iter_mut()
                        .zip(&v[j * kw + g * hs..j * kw + (g + 1) * hs])
                    {
                        *o += pij * vv;
                    }
                }
            }
        }
    });
    (out, probs)
}

/// Attention backward: dout (T, NH*HS) -> (dq, dk, dv); kv-head gradients sum over their group.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let (qw, kw, group) = (nh * hs, nkv * hs, nh / nkv);
    let scale = 1.0 / (hs as f32).sqrt();
    // KV groups on separate threads (a group's heads write its dK and dV): each group's
    // gradients in its own (T, HS) blocks, its heads' dQ in (group, T, HS), then copied into
    // place. Every element gets its additions in the order of the one-thread loop.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..nkv)
        .into_par_iter()
        .map(|g| {
            let (mut dq_g, mut dk_g, mut dv_g) = (
                vec![0f32; group * t * hs],
                vec![0f32; t * hs],
                vec![0f32; t * hs],
            );
            let mut dp = vec![0f32; t];
            for hh in 0..group {
                let h = g * group + hh;
                for i in 0..t {
                    let p = &probs[(h * t + i) * t..(h * t + i + 1) * t];
                    let doi = &dout[i * qw + h * hs..i * qw + (h + 1) * hs];
                    // dP[j] = do_i . v_j ;  dv_j += P[i,j] do_i
                    let mut dot = 0f32;
                    for j in 0..=i {
                        let vj = &v[j * kw + g * hs..j * kw + (g + 1) * hs];
                        dp[j] = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                        dot += p[j] * dp[j];
                        for (d, &o) in dv_g[j * hs..(j + 1) * hs].iter_mut().zip(doi) {
                            *d += p[j] * o;
                        }
                    }
                    // dS[j] = P[j] (dP[j] - sum_j' P[j'] dP[j']);  dq_i += scale dS k_j ;
                    // dk_j += scale dS q_i
                    let qi = &q[i * qw + h * hs..i * qw + (h + 1) * hs];
                    let dqi = &mut dq_g[(hh * t + i) * hs..(hh * t + i + 1) * hs];
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - dot) * scale;
                        let kj = &k[j * kw + g * hs..j * kw + (g + 1) * hs];
                        for (d, &kv) in dqi.iter_mut().zip(kj) {
                            *d += ds * kv;
                        }
                        for (d, &qv) in dk_g[j * hs..(j + 1) * hs].iter_mut().zip(qi) {
                            *d += ds * qv;
                        }
                    }
                }
            }
            (dq_g, dk_g, dv_g)
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (vec![0f32; t * qw], vec![0f32; t * kw], vec![0f32; t * kw]);
    for (g, (dq_g, dk_g, dv_g)) in parts.iter().enumerate() {
        for j in 0..t {
            dk[j * kw + g * hs..j * kw + (g + 1) * hs].copy_from_slice(&dk_g[j * hs..(j + 1) * hs]);
            dv[j * kw + g * hs..j * kw + (g + 1) * hs].copy_from_slice(&dv_g[j * hs..(j + 1) * hs]);
        }
        for hh in 0..group {
            let h = g * group + hh;
            for i in 0..t {
                dq[i * qw + h * hs..i * qw + (h + 1) * hs]
                    .copy_from_slice(&dq_g[(hh * t + i) * hs..(hh * t + i + 1) * hs]);
            }
        }
    }
    (dq, dk, dv)
}

/// Gated activation backward: f = act(g) * u -> (dg, du).
pub fn gated_act_backward(
    gate: &[f32],
    up: &[f32],
    df: &[f32],
    act: Activation,
) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    // Elementwise, in blocks on separate threads.
    const BLOCK: usize = 16 << 10;
    dg.par_chunks_mut(BLOCK)
        .zip(du.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(b, (dg, du))| {
            let k0 = b * BLOCK;
            gated_act_backward_block(&gate[k0..], &up[k0..], &df[k0..], act, dg, du)
        });
    (dg, du)
}

/// [`gated_act_backward`] on `dg.len()` elements from the start of `gate`, `up` and `df`.
fn gated_act_backward_block(
    gate: &[f32],
    up: &[f32],
    df: &[f32],
    act: Activation,
    dg: &mut [f32],
    du: &mut [f32],
) {
    for k in 0..dg.len() {
        let g = gate[k];
        let (a, da) = match act {
            Activation::Relu2 => {
                let r = g.max(0.0);
                (r * r, 2.0 * r)
            }
            Activation::Silu => {
                let s = 1.0 / (1.0 + libm::expf(-g));
                (g * s, s * (1.0 + g * (1.0 - s)))
            }
        };
        dg[k] = df[k] * up[k] * da;
        du[k] = df[k] * a;
    }
}

/// The training forward: the final hidden state h (T, C) and what each layer saved.
/// `rope` holds the (cos, sin) tables for positions 0..T; the backward reuses them.
fn forward_saving(
    model: &Model,
    lora: &Lora,
    tokens: &[u32],
    rope: &(Vec<f32>, Vec<f32>),
    rng: &mut Rng,
) -> (Vec<f32>, Vec<LayerActs>) {
    let cfg = &model.config;
    let p = &model.params;
    let (t, c) = (tokens.len(), cfg.hidden_size);
    let (nh, nkv, hs, eps) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rms_norm_eps,
    );
    let (scale, r, dropout) = (lora.config.scale(), lora.config.r, lora.config.dropout);
    let mut h: Vec<f32> = Vec::with_capacity(t * c); // (T, C) = embed[tokens]
    for &tok in tokens {
        p.embed_tokens.push_row(&mut h, tok as usize, c);
    }
    let (cos, sin) = rope;
    let mut saved = Vec::with_capacity(p.layers.len());
    for (layer, adapters) in p.layers.iter().zip(&lora.layers) {
        let mut run = |p: Proj, x: &[f32]| {
            linear_forward(
                layer.proj(p),
                adapters[p].as_ref(),
                x,
                scale,
                r,
                dropout,
                rng,
            )
        };
        let h_in = h.clone();
        let xn1 = ops::rms_norm(&h, &layer.input_layernorm, eps); // (T, C)
        let (mut q, aq) = run(Proj::Q, &xn1); // (T, NH*HS)
        let (mut k, ak) = run(Proj::K, &xn1); // (T, NKV*HS)
        let (vv, av) = run(Proj::V, &xn1); // (T, NKV*HS)
        ops::rope(&mut q, nh, hs, cos, sin);
        ops::rope(&mut k, nkv, hs, cos, sin);
        let (att, probs) = attention_forward(&q, &k, &vv, t, nh, nkv, hs); // (T, NH*HS), (NH, T, T)
        let an = ops::rms_norm(&att, &layer.attn_sub_norm, eps);
        let (o, ao) = run(Proj::O, &an); // (T, C)
        ops::add_in_place(&mut h, &o);
        let h_mid = h.clone();
        let xn2 = ops::rms_norm(&h, &layer.post_attention_layernorm, eps); // (T, C)
        let (gate, ag) = run(Proj::Gate, &xn2); // (T, F)
        let (up, au) = run(Proj::Up, &xn2); // (T, F)
        let f = ops::gated_act(&gate, &up, cfg.hidden_act); // (T, F)
        let fnorm = ops::rms_norm(&f, &layer.ffn_sub_norm, eps);
        let (down, ad) = run(Proj::Down, &fnorm); // (T, C)
        ops::add_in_place(&mut h, &down);
        saved.push(LayerActs {
            h_in,
            xn1,
            q,
            k,
            v: vv,
            probs,
            att,
            an,
            h_mid,
            xn2,
            gate,
            up,
            f,
            fnorm,
            lin: [aq, ak, av, ao, ag, au, ad], // Proj::ALL order
        });
    }
    (h, saved)
}

/// Checks tokens and targets; returns how many targets count.
fn check_targets(model: &Model, tokens: &[u32], targets: &[Option<u32>]) -> Result<usize> {
    check_sequence(&model.config, tokens, targets)
}

/// Checks a training sequence against a model's config: token ids and context length, one
/// target per token, target ids in the vocabulary. Returns how many targets count. Every
/// backend's training step starts with this.
pub fn check_sequence(cfg: &Config, tokens: &[u32], targets: &[Option<u32>]) -> Result<usize> {
    cfg.check_tokens(tokens)?;
    if targets.len() != tokens.len() {
        return Err(Error::Shape {
            op: "train",
            msg: format!("{} targets for {} tokens", targets.len(), tokens.len()),
        });
    }
    let v = cfg.vocab_size;
    if let Some((position, &Some(token))) = targets
        .iter()
        .enumerate()
        .find(|(_, y)| y.is_some_and(|y| y as usize >= v))
    {
        return Err(Error::TokenOutOfRange {
            token,
            position,
            vocab: v,
        });
    }
    Ok(targets.iter().filter(|y| y.is_some()).count())
}

/// The logits computed together take at most this many bytes: as many positions as fit (at
/// least [`HEAD_MIN_ROWS`]), so that the head's weight, larger than the caches (V x C: 49 MB of
/// bf16 on the 125m shape), is streamed from memory once per block in the forward and once in
/// the backward, and the block still stays small. 128 positions of a 32k vocabulary, 32 of
/// 128k. Blocks change no result: each logit, each row's loss and each row of dX is computed
/// alone, the loss summed in order of rows.
const HEAD_BLOCK_BYTES: usize = 16 << 20;
const HEAD_MIN_ROWS: usize = 8;

/// Calls `f(first_row, logits)` with the logits (rows, V) of each block of positions of `xn`
/// (T, C) (see [`HEAD_BLOCK_BYTES`]) that has at least one target, in order.
fn for_head_blocks(
    model: &Model,
    xn: &[f32],
    targets: &[Option<u32>],
    mut f: impl FnMut(usize, &mut [f32]),
) {
    let c = model.config.hidden_size;
    let v = model.config.vocab_size;
    let block = (HEAD_BLOCK_BYTES / (4 * v).max(1)).max(HEAD_MIN_ROWS);
    for r0 in (0..targets.len()).step_by(block) {
        let rows = block.min(targets.len() - r0);
        if targets[r0..r0 + rows].iter().all(Option::is_none) {
            continue;
        }
        let mut logits =
            model
                .params
                .head()
                .matmul_t(&xn[r0 * c..(r0 + rows) * c], c, model.config.vocab_size); // (rows, V)
        f(r0, &mut logits);
    }
}

/// log(sum(exp(logits))), stable.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // sum of libm::expf(l - max) in order of l, as `Iterator::sum` folds (from its empty sum).
    let mut sum = std::iter::empty::<f32>().sum::<f32>();
    let mut buf = [0f32; EXP_CHUNK];
    for chunk in logits.chunks(EXP_CHUNK) {
        let e = &mut buf[..chunk.len()];
        for (d, &l) in e.iter_mut().zip(chunk) {
            *d = l - max;
        }
        crate::expf::expf_in_place(e);
        for &x in e.iter() {
            sum += x;
        }
    }
    max + libm::logf(sum)
}

/// One training step's forward and backward on one sequence. `targets[t]` is the token that
/// position t should predict (None: not counted, e.g. the prompt when training on completions
/// only). Returns the mean cross-entropy over counted targets; adds the LoRA gradients of
/// that mean loss into `grads` (scaled by `grad_scale`, e.g. 1/accumulation steps).
pub fn forward_backward(
    model: &Model,
    lora: &Lora,
    tokens: &[u32],
    targets: &[Option<u32>],
    grads: &mut Lora,
    grad_scale: f32,
    rng: &mut Rng,
) -> Result<StepLoss> {
    let counted = check_targets(model, tokens, targets)?;
    let cfg = &model.config;
    let p = &model.params;
    let (t, c) = (tokens.len(), cfg.hidden_size);
    let (nh, nkv, hs, eps) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.rms_norm_eps,
    );
    let (scale, r) = (lora.config.scale(), lora.config.r);
    let rope = ops::rope_tables(t, hs, cfg.rope_theta);
    let (h, saved) = forward_saving(model, lora, tokens, &rope, rng);
    let (cos, sin) = &rope;
    let xn = ops::rms_norm(&h, &p.norm, eps); // (T, C)

    // ---- loss and its gradient, a block of positions at a time (HEAD_BLOCK_BYTES of logits) ----
    let (head, v) = (p.head(), cfg.vocab_size);
    let mut dxn = vec![0f32; t * c];
    let mut loss_sum = 0f64;
    for_head_blocks(model, &xn, targets, |r0, logits| {
        // logits (rows, V) becomes dlogits = (softmax - onehot) * grad_scale / N, in place;
        // rows on separate threads, the loss summed in order of rows.
        let rows = logits.len() / v;
        let targets = &targets[r0..r0 + rows];
        let lse = row_log_sum_exps(logits, v, targets);
        for ((row, y), lse) in logits.chunks_exact(v).zip(targets).zip(&lse) {
            if let Some(y) = y {
                loss_sum += (lse - row[*y as usize]) as f64;
            }
        }
        crate::par::rows(logits, v, 1, |k0, block| {
            for (k, row) in block.chunks_exact_mut(v).enumerate() {
                match targets[k0 + k] {
                    None => row.fill(0.0),
                    Some(y) => {
                        logit_grads(row, y as usize, lse[k0 + k], grad_scale, counted as f32)
                    }
                }
            }
        });
        // dxn (rows, C) += dlogits . H
        head.matmul_acc(&mut dxn[r0 * c..(r0 + rows) * c], logits, v, c);
    });

    // ---- backward, in exact reverse ----
    let mut dh = rms_norm_backward(&h, &p.norm, eps, &dxn); // (T, C) residual-stream gradient
    for ((layer, adapters), (acts, grad_layer)) in p
        .layers
        .iter()
        .zip(&lora.layers)
        .zip(saved.iter().zip(grads.layers.iter_mut()))
        .rev()
    {
        let [gq, gk, gv, go, gg, gu, gd] = grad_layer; // Proj::ALL order
        let back = |p: Proj, grad: &mut Option<LoraPair>, x: &[f32], dy: &[f32]| {
            linear_backward(
                layer.proj(p),
                adapters[p].as_ref(),
                grad.as_mut(),
                &acts.lin[p],
                x,
                dy,
                scale,
                r,
            )
        };

        // FFN block: h += down(ffn_sub_norm(act(gate(x)) * up(x))), x = post_attention_layernorm(h_mid)
        let dfnorm = back(Proj::Down, gd, &acts.fnorm, &dh);
        let df = rms_norm_backward(&acts.f, &layer.ffn_sub_norm, eps, &dfnorm);
        let (dgate, dup) = gated_act_backward(&acts.gate, &acts.up, &df, cfg.hidden_act);
        let mut dxn2 = back(Proj::Gate, gg, &acts.xn2, &dgate);
        ops::add_in_place(&mut dxn2, &back(Proj::Up, gu, &acts.xn2, &dup));
        ops::add_in_place(
            &mut dh,
            &rms_norm_backward(&acts.h_mid, &layer.post_attention_layernorm, eps, &dxn2),
        );

        // Attention block: h += o(attn_sub_norm(attn(rope(q(x)), rope(k(x)), v(x)))), x = input_layernorm(h_in)
        let dan = back(Proj::O, go, &acts.an, &dh);
        let datt = rms_norm_backward(&acts.att, &layer.attn_sub_norm, eps, &dan);
        let (mut dq, mut dk, dv) = attention_backward(
            &acts.q,
            &acts.k,
            &acts.v,
            &acts.probs,
            &datt,
            t,
            nh,
            nkv,
            hs,
        );
        rope_backward(&mut dq, nh, hs, cos, sin);
        rope_backward(&mut dk, nkv, hs, cos, sin);
        let mut dxn1 = back(Proj::Q, gq, &acts.xn1, &dq);
        ops::add_in_place(&mut dxn1, &back(Proj::K, gk, &acts.xn1, &dk));
        ops::add_in_place(&mut dxn1, &back(Proj::V, gv, &acts.xn1, &dv));
        ops::add_in_place(
            &mut dh,
            &rms_norm_backward(&acts.h_in, &layer.input_layernorm, eps, &dxn1),
        );
    }
    Ok(StepLoss {
        loss: (loss_sum / counted.max(1) as f64) as f32,
        tokens: counted,
    })
}

/// Mean cross-entropy of the model with the adapter applied, forward only (dropout off):
/// the validation loss.
pub fn loss(
    model: &Model,
    lora: &Lora,
    tokens: &[u32],
    targets: &[Option<u32>],
) -> Result<StepLoss> {
    let counted = check_targets(model, tokens, targets)?;
    let mut eval = lora.clone();
    eval.config.dropout = 0.0;
    let rope = ops::rope_tables(tokens.len(), model.config.head_dim, model.config.rope_theta);
    let (h, _) = forward_saving(model, &eval, tokens, &rope, &mut Rng::new(0));
    let xn = ops::rms_norm(&h, &model.params.norm, model.config.rms_norm_eps);
    let mut sum = 0f64;
    let v = model.config.vocab_size;
    for_head_blocks(model, &xn, targets, |r0, logits| {
        let targets = &targets[r0..r0 + logits.len() / v];
        let lse = row_log_sum_exps(logits, v, targets);
        for ((row, y), lse) in logits.chunks_exact(v).zip(targets).zip(&lse) {
            if let Some(y) = y {
                sum += (lse - row[*y as usize]) as f64;
            }
        }
    });
    Ok(StepLoss {
        loss: (sum / counted.max(1) as f64) as f32,
        tokens: counted,
    })
}

#[cfg(test)]
mod tests {
    //! Each op's backward against central finite differences of its forward, along a random
    //! direction d: `(f(x + e d) - f(x - e d)) / 2e` vs `grad . d`, for a scalar
    //! `f = sum(g * op(x))` with a fixed random g. The quantizers make the whole model piecewise
    //! constant, so finite differences apply to each op on its own, and on the full model only
    //! to the last layer's down_proj adapter, which no quantizer follows; the rest is checked
    //! against PyTorch + PEFT's gradients (tests/fixtures).
    use super::*;
    use crate::lora::LoraConfig;
    use crate::model::tiny_config;

    /// f32 central differences with e = 1e-2 on O(1) inputs: truncation ~e^2 and rounding
    /// ~eps_f32/e relative; 1e-2 relative agreement is what a right backward gives and a wrong
    /// one (sign, missing term, transposed index) misses by far.
    const FD_RTOL: f64 = 1e-2;

    fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    /// The softmax's far tail goes to exactly 0 (entries whose dlogit would be below
    /// LOGIT_GRAD_FLUSH, here subnormal-bound products), the rest is (p - onehot) * scale as
    /// before, bit for bit, the target's entry included.
    #[test]
    fn logit_grads_flush_only_the_far_tail() {
        // Relative to the row's max (~lse): -60 gives exp ~ 8.8e-27 (kept), -75 ~ 2.7e-33
        // and -95 ~ 5.5e-42 (subnormal) (both flushed), scaled by 0.5 / 2.
        let logits = [3.0f32, -57.0, -72.0, -92.0, 1.0];
        let lse = log_sum_exp(&logits);
        let mut row = logits;
        logit_grads(&mut row, 4, lse, 0.5, 2.0);
        for (k, (&d, &l)) in row.iter().zip(&logits).enumerate() {
            let mut g = libm::expf(l - lse);
            if k == 4 {
                g -= 1.0;
            }
            let want = g * 0.5 / 2.0;
            if k == 2 || k == 3 {
                assert!(
                    want != 0.0 && want.abs() < LOGIT_GRAD_FLUSH,
                    "{k}: {want:e}"
                );
                assert_eq!(d.to_bits(), 0, "entry {k} ({want:e}) was not flushed");
            } else {
                assert!(want.abs() >= LOGIT_GRAD_FLUSH, "{k}: {want:e}");
                assert_eq!(d.to_bits(), want.to_bits(), "entry {k} changed");
            }
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Checks `grad` (df/dx at x) against finite differences of f along a random direction.
    fn fd_check(name: &str, f: impl Fn(&[f32]) -> f64, x: &[f32], grad: &[f32], rng: &mut Rng) {
        let e = 1e-2f32;
        let d = randn(rng, x.len());
        let plus: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + e * b).collect();
        let minus: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a - e * b).collect();
        let numeric = (f(&plus) - f(&minus)) / (2.0 * e as f64);
        let analytic = dot(grad, &d);
        let rel = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
        assert!(
            rel <= FD_RTOL,
            "{name}: analytic {analytic:.6e} vs finite difference {numeric:.6e} (rel {rel:.2e})"
        );
        println!("{name}: analytic {analytic:.6e}, finite difference {numeric:.6e}, rel {rel:.1e}");
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let (t, c) = (3, 37);
        let (x, w, g) = (
            randn(&mut rng, t * c),
            randn(&mut rng, c),
            randn(&mut rng, t * c),
        );
        let f = |x: &[f32]| dot(&g, &ops::rms_norm(x, &w, 1e-5));
        fd_check(
            "rms_norm",
            f,
            &x,
            &rms_norm_backward(&x, &w, 1e-5, &g),
            &mut rng,
        );
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (t, n, hs) = (5, 3, 8);
        let (cos, sin) = ops::rope_tables(t, hs, 10_000.0);
        let (x, g) = (randn(&mut rng, t * n * hs), randn(&mut rng, t * n * hs));
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            ops::rope(&mut y, n, hs, &cos, &sin);
            dot(&g, &y)
        };
        let mut grad = g.clone();
        rope_backward(&mut grad, n, hs, &cos, &sin);
        fd_check("rope", f, &x, &grad, &mut rng);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = Rng::new(3);
        let (t, nh, nkv, hs) = (6, 4, 2, 8);
        let (q, k, v) = (
            randn(&mut rng, t * nh * hs),
            randn(&mut rng, t * nkv * hs),
            randn(&mut rng, t * nkv * hs),
        );
        let g = randn(&mut rng, t * nh * hs);
        let (out, probs) = attention_forward(&q, &k, &v, t, nh, nkv, hs);
        // The saving forward equals the inference op.
        crate::tolerance::KERNEL_F32.assert_close(
            "attention_forward vs ops::attention",
            &out,
            &ops::attention(&q, &k, &v, t, nh, nkv, hs),
        );
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &probs, &g, t, nh, nkv, hs);
        fd_check(
            "attention dq",
            |x| dot(&g, &ops::attention(x, &k, &v, t, nh, nkv, hs)),
            &q,
            &dq,
            &mut rng,
        );
        fd_check(
            "attention dk",
            |x| dot(&g, &ops::attention(&q, x, &v, t, nh, nkv, hs)),
            &k,
            &dk,
            &mut rng,
        );
        fd_check(
            "attention dv",
            |x| dot(&g, &ops::attention(&q, &k, x, t, nh, nkv, hs)),
            &v,
            &dv,
            &mut rng,
        );
    }

    #[test]
    fn gated_act_backward_matches_finite_differences() {
        let mut rng = Rng::new(4);
        for act in [Activation::Relu2, Activation::Silu] {
            let n = 50;
            let (gate, up, g) = (randn(&mut rng, n), randn(&mut rng, n), randn(&mut rng, n));
            let (dg, du) = gated_act_backward(&gate, &up, &g, act);
            fd_check(
                &format!("{act:?} d gate"),
                |x| dot(&g, &ops::gated_act(x, &up, act)),
                &gate,
                &dg,
                &mut rng,
            );
            fd_check(
                &format!("{act:?} d up"),
                |x| dot(&g, &ops::gated_act(&gate, x, act)),
                &up,
                &du,
                &mut rng,
            );
        }
    }

    #[test]
    fn ternary_backward_is_dy_times_the_dequantized_weight() {
        let mut rng = Rng::new(5);
        for (t, i, o) in [(3, 37, 10), (2, 64, 176), (1, 5, 3)] {
            let lin = TernaryLinear::from_master(&randn(&mut rng, o * i), o, i);
            let dy = randn(&mut rng, t * o);
            let w = lin.unpack();
            let mut dense = vec![0f32; t * i];
            for tt in 0..t {
                for ii in 0..i {
                    dense[tt * i + ii] = (0..o)
                        .map(|oo| dy[tt * o + oo] * (w[oo * i + ii] as f32 / lin.w_scale))
                        .sum();
                }
            }
            crate::tolerance::KERNEL_F32.assert_close(
                &format!("ternary dX T={t} I={i} O={o}"),
                &ternary_backward_reference(&lin, &dy),
                &dense,
            );
            crate::tolerance::KERNEL_F32.assert_close(
                &format!("fast ternary dX T={t} I={i} O={o}"),
                &ternary_backward(&lin, &dy),
                &ternary_backward_reference(&lin, &dy),
            );
        }
    }

    /// The register-tiled kernels (each one this CPU has) give the untiled FMA body's bits, on
    /// shapes with a partial packed row, a partial column strip and a partial token tile, and
    /// through `ternary_backward` on 1 and 3 threads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiled_ternary_backward_equals_the_fma_body_bit_for_bit() {
        use std::arch::is_x86_feature_detected as has;
        assert!(
            has!("avx2") && has!("fma"),
            "the x86-64 test machines have AVX2+FMA"
        );
        let mut rng = Rng::new(11);
        for (t, i, o) in [
            (1, 5, 3),
            (7, 37, 10),
            (13, 70, 45),
            (9, 16, 32),
            (17, 100, 131),
        ] {
            let lin = TernaryLinear::from_master(&randn(&mut rng, o * i), o, i);
            let dy = randn(&mut rng, t * o);
            let mut want = vec![0f32; t * i];
            // SAFETY: AVX2 and FMA, asserted above.
            unsafe { ternary_backward_avx2(&lin, &dy, &mut want) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut got = vec![0f32; t * i];
            ternary_backward_tiled::<6, 16>(&lin, &dy, &mut got, |g, w, tile| unsafe {
                tiled::tile_avx2(g, w, tile)
            });
            assert_eq!(bits(&got), bits(&want), "AVX2 tile, T={t} I={i} O={o}");
            if has!("avx512f") {
                let mut got = vec![0f32; t * i];
                ternary_backward_tiled::<8, 32>(&lin, &dy, &mut got, |g, w, tile| unsafe {
                    tiled::tile_avx512(g, w, tile)
                });
                assert_eq!(bits(&got), bits(&want), "AVX-512 tile, T={t} I={i} O={o}");
            } else {
                eprintln!("this CPU has no AVX-512F: its tile is not run here");
            }
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| ternary_backward(&lin, &dy));
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{threads} threads, T={t} I={i} O={o}"
                );
            }
        }
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let mut rng = Rng::new(6);
        let (t, i, o, r) = (4, 33, 12, 3);
        let lin = TernaryLinear::from_master(&randn(&mut rng, o * i), o, i);
        let pair = LoraPair {
            a: randn(&mut rng, r * i),
            b: randn(&mut rng, o * r),
        };
        let (x, g) = (randn(&mut rng, t * i), randn(&mut rng, t * o));
        let scale = 2.0;
        let (_, acts) = linear_forward(&lin, Some(&pair), &x, scale, r, 0.0, &mut rng);
        let mut grad = LoraPair {
            a: vec![0.0; r * i],
            b: vec![0.0; o * r],
        };
        let dx = linear_backward(&lin, Some(&pair), Some(&mut grad), &acts, &x, &g, scale, r);
        let f_a = |a: &[f32]| {
            dot(
                &g,
                &linear_forward(
                    &lin,
                    Some(&LoraPair {
                        a: a.to_vec(),
                        b: pair.b.clone(),
                    }),
                    &x,
                    scale,
                    r,
                    0.0,
                    &mut Rng::new(0),
                )
                .0,
            )
        };
        let f_b = |b: &[f32]| {
            dot(
                &g,
                &linear_forward(
                    &lin,
                    Some(&LoraPair {
                        a: pair.a.clone(),
                        b: b.to_vec(),
                    }),
                    &x,
                    scale,
                    r,
                    0.0,
                    &mut Rng::new(0),
                )
                .0,
            )
        };
        fd_check("lora dA", f_a, &pair.a, &grad.a, &mut rng);
        fd_check("lora dB", f_b, &pair.b, &grad.b, &mut rng);
        // dX: the LoRA branch is smooth; the ternary branch is straight-through, i.e. the
        // derivative of x . (T/s_w)^T. Check the sum against that smooth surrogate.
        let w = lin.unpack();
        let f_x = |x: &[f32]| {
            let lora_y = linear_forward(
                &TernaryLinear {
                    packed: crate::quant::pack_ternary(&vec![0; o * i], o, i),
                    ..lin.clone()
                },
                Some(&pair),
                x,
                scale,
                r,
                0.0,
                &mut Rng::new(0),
            )
            .0;
            let dense: Vec<f32> = (0..t * o)
                .map(|k| {
                    (0..i)
                        .map(|ii| x[(k / o) * i + ii] * w[(k % o) * i + ii] as f32 / lin.w_scale)
                        .sum()
                })
                .collect();
            dot(&g, &lora_y) + dot(&g, &dense)
        };
        fd_check("lora dX (straight-through)", f_x, &x, &dx, &mut rng);
    }

    #[test]
    fn last_layer_adapter_gradients_match_finite_differences_on_the_whole_model() {
        let model = Model::random(tiny_config(), 42).0;
        let cfg = LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap();
        let mut lora = Lora::init(&model.config, cfg, 7);
        let mut rng = Rng::new(8);
        lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
        let tokens = [1u32, 5, 17, 42, 300, 7, 9, 100];
        let targets: Vec<Option<u32>> =
            tokens[1..].iter().map(|&t| Some(t)).chain([None]).collect();
        let mut grads = lora.zeros_like();
        let step = forward_backward(
            &model,
            &lora,
            &tokens,
            &targets,
            &mut grads,
            1.0,
            &mut Rng::new(0),
        )
        .unwrap();
        assert_eq!(step.tokens, 7);
        assert!((step.loss - loss(&model, &lora, &tokens, &targets).unwrap().loss).abs() < 1e-6);
        let last = model.config.num_hidden_layers - 1;
        for (which, name) in [(0, "A"), (1, "B")] {
            let base = lora.clone();
            let get = |l: &Lora| -> Vec<f32> {
                let p = l.layers[last][Proj::Down].as_ref().unwrap();
                if which == 0 { p.a.clone() } else { p.b.clone() }
            };
            let f = |v: &[f32]| {
                let mut l = base.clone();
                let p = l.layers[last][Proj::Down].as_mut().unwrap();
                if which == 0 {
                    p.a = v.to_vec()
                } else {
                    p.b = v.to_vec()
                }
                loss(&model, &l, &tokens, &targets).unwrap().loss as f64
            };
            fd_check(
                &format!("model: last down_proj d{name}"),
                f,
                &get(&lora),
                &get(&grads),
                &mut rng,
            );
        }
    }

    /// Training through bf16 tables (the embedding lookup, the head's forward and backward)
    /// gives the f32 tables' loss and every gradient bit for bit, tied and untied, and makes no
    /// f32 copy of a table.
    #[test]
    fn bf16_tables_train_as_the_f32_tables_bit_for_bit() {
        for tied in [true, false] {
            let mut cfg = tiny_config();
            cfg.tie_word_embeddings = tied;
            let model = Model::random_model(cfg, 42);
            assert_eq!(model.params.head().dtype(), crate::TableDtype::Bf16);
            let f32_model = crate::model::tests::with_f32_tables(&model);
            let lcfg = LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap();
            let mut lora = Lora::init(&model.config, lcfg, 7);
            let mut rng = Rng::new(8);
            lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
            let tokens: Vec<u32> = (0..40).map(|k| (k * 31 + 3) % 509).collect();
            let targets: Vec<Option<u32>> = tokens[1..]
                .iter()
                .enumerate()
                .map(|(k, &t)| (k % 5 != 0).then_some(t))
                .chain([None])
                .collect();
            let run = |m: &Model| {
                let mut grads = lora.zeros_like();
                let step = forward_backward(
                    m,
                    &lora,
                    &tokens,
                    &targets,
                    &mut grads,
                    1.0,
                    &mut Rng::new(0),
                )
                .unwrap();
                let mut bits = vec![step.loss.to_bits()];
                grads.for_each_mut(|_, _, v| bits.extend(v.iter().map(|x| x.to_bits())));
                bits
            };
            assert_eq!(run(&model), run(&f32_model), "tied {tied}");
            assert!(!model.params.embed_tokens.has_f32_copy());
            assert!(!model.params.head().has_f32_copy());
        }
    }

    #[test]
    fn zero_b_adapter_leaves_the_model_unchanged_and_gradients_accumulate() {
        let model = Model::random(tiny_config(), 42).0;
        let lora = Lora::init(
            &model.config,
            LoraConfig::new(2, 4.0, 0.0, false, &["q_proj", "down_proj"]).unwrap(),
            1,
        );
        let tokens = [3u32, 1, 4, 1, 5, 9];
        let targets: Vec<Option<u32>> =
            tokens[1..].iter().map(|&t| Some(t)).chain([None]).collect();
        // Loss with B = 0 equals the plain model's cross-entropy.
        let logits = model.logits(&tokens).unwrap();
        let v = model.config.vocab_size;
        let reference: f64 = (0..5)
            .map(|t| {
                (log_sum_exp(&logits[t * v..(t + 1) * v])
                    - logits[t * v + targets[t].unwrap() as usize]) as f64
            })
            .sum::<f64>()
            / 5.0;
        let got = loss(&model, &lora, &tokens, &targets).unwrap().loss as f64;
        assert!((got - reference).abs() < 1e-5, "{got} vs {reference}");
        // B = 0: dA = 0 but dB != 0 (PEFT's starting point); two calls accumulate exactly twice.
        let mut g1 = lora.zeros_like();
        forward_backward(
            &model,
            &lora,
            &tokens,
            &targets,
            &mut g1,
            1.0,
            &mut Rng::new(0),
        )
        .unwrap();
        let down = g1.layers[1][Proj::Down].as_ref().unwrap();
        assert!(down.a.iter().all(|&x| x == 0.0) && down.b.iter().any(|&x| x != 0.0));
        let mut g2 = lora.zeros_like();
        for _ in 0..2 {
            forward_backward(
                &model,
                &lora,
                &tokens,
                &targets,
                &mut g2,
                1.0,
                &mut Rng::new(0),
            )
            .unwrap();
        }
        // Term-by-term accumulation rounds differently from doubling: compare under KERNEL_F32.
        let doubled: Vec<f32> = down.b.iter().map(|x| x * 2.0).collect();
        crate::tolerance::KERNEL_F32.assert_close(
            "accumulated dB",
            &g2.layers[1][Proj::Down].as_ref().unwrap().b,
            &doubled,
        );
    }

    #[test]
    fn training_forward_equals_inference_with_the_adapter() {
        let model = Model::random(tiny_config(), 42).0;
        let mut lora = Lora::init(
            &model.config,
            LoraConfig::new(3, 6.0, 0.0, false, &["all-linear"]).unwrap(),
            2,
        );
        let mut rng = Rng::new(3);
        lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x += 0.05 * rng.normal()));
        let tokens = [7u32, 8, 9, 10, 11, 12];
        let targets: Vec<Option<u32>> =
            tokens[1..].iter().map(|&t| Some(t)).chain([None]).collect();
        let logits = model
            .forward_with_adapter(
                &tokens,
                &mut crate::model::KvCache::new(&model.config),
                Some(&lora),
            )
            .unwrap();
        let v = model.config.vocab_size;
        let want: f64 = (0..5)
            .map(|t| {
                (log_sum_exp(&logits[t * v..(t + 1) * v]) - logits[t * v + tokens[t + 1] as usize])
                    as f64
            })
            .sum::<f64>()
            / 5.0;
        let got = loss(&model, &lora, &tokens, &targets).unwrap().loss as f64;
        assert!(
            (got - want).abs() < 1e-5,
            "training forward {got} vs inference forward {want}"
        );
        // And the adapter really changes the model.
        assert_ne!(logits, model.logits(&tokens).unwrap());
    }

    #[test]
    fn bad_targets_and_lora_configs_are_named() {
        let model = Model::random(tiny_config(), 42).0;
        let e = LoraConfig::new(4, 8.0, 0.0, false, &["qkv"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown target module \"qkv\""),
            "{e}"
        );
        assert!(LoraConfig::new(0, 8.0, 0.0, false, &["q_proj"]).is_err());
        let lora = Lora::init(
            &model.config,
            LoraConfig::new(2, 4.0, 0.0, false, &["q_proj"]).unwrap(),
            1,
        );
        let e = loss(&model, &lora, &[1, 2], &[Some(600), None]).unwrap_err();
        assert!(e.to_string().contains("token id 600"), "{e}");
        assert!(loss(&model, &lora, &[1, 2], &[None]).is_err());
    }
}
