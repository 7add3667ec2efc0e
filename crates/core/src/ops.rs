//! The CPU reference ops of the forward pass: plain, obvious f32 loops. Every GPU kernel is
//! tested against these on awkward sizes. Sums that feed a normalisation or softmax are
//! accumulated in f32 in index order, as a straightforward implementation would.
//!
//! Transcendentals (exp, log, pow, sin, cos) come from the `libm` crate, not std: std's call
//! the platform's C library (glibc natively, a musl port in wasm), which round differently in
//! the last bit (0.8% of the default model's RoPE cos entries and 1.3% of its sin entries). The RoPE tables are uploaded to
//! the GPU, so with std the page and the CLI fed the same kernels different inputs and an int8
//! activation code could flip between them (issue 12). One implementation keeps them equal.
//!
//! Dimension letters: T tokens, C channels, F ffn, V vocab, NH heads, NKV kv-heads, HS head size.

use crate::config::Activation;

mod acc_tiles;

/// RMSNorm over rows of x (T, C) with weight (C), as transformers' `BitNetRMSNorm`:
/// `y = w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    assert!(
        c > 0 && x.len().is_multiple_of(c),
        "rms_norm: x is not (T, {c})"
    );
    let mut y = vec![0f32; x.len()];
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        let ms = sum_squares_lanes(xr) / c as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = wv * (xv * inv);
        }
    }
    y
}

/// Lanes of [`sum_squares_lanes`]: the invocations of `shaders/rms_norm.wgsl` that add.
pub const RMS_LANES: usize = 64;

/// The sum of squares of one row in the GPU's parallel order (`shaders/rms_norm.wgsl`), term
/// for term: the row as groups of 4 (the last padded with zeros); lane l adds the squares of
/// groups l, l + 64, l + 128, ... into 4 running sums, one per position in the group; its
/// lane sum is (s0 + s1) + (s2 + s3); then the 64 lane sums are added pairwise in a tree
/// (lane l += lane l + h for h = 32, 16, .., 1). RMSNorm feeds the int8 quantizer, so the two
/// backends must agree to the bit; the order is also 4 x 64 independent sums, which a CPU
/// vectorises.
pub fn sum_squares_lanes(x: &[f32]) -> f32 {
    let groups = x.len().div_ceil(4);
    let mut part = [0f32; RMS_LANES];
    for (lane, p) in part.iter_mut().enumerate() {
        let mut s = [0f32; 4];
        for g in (lane..groups).step_by(RMS_LANES) {
            for (j, sj) in s.iter_mut().enumerate() {
                let v = x.get(4 * g + j).copied().unwrap_or(0.0);
                *sj += v * v;
            }
        }
        *p = (s[0] + s[1]) + (s[2] + s[3]);
    }
    let mut h = RMS_LANES / 2;
    while h > 0 {
        for l in 0..h {
            part[l] += part[l + h];
        }
        h /= 2;
    }
    part[0]
}

/// RoPE tables for positions 0..T: (cos, sin), each (T, HS/2). transformers' default rope:
/// `inv_freq[j] = 1 / theta^(2j/HS)`, `angle = pos * inv_freq[j]`, computed in f32.
pub fn rope_tables(t: usize, hs: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    rope_tables_from(0, t, hs, theta)
}

/// RoPE tables for positions start..start+T (decoding after a KV cache of `start` tokens).
pub fn rope_tables_from(start: usize, t: usize, hs: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = hs / 2;
    let mut cos = vec![0f32; t * half];
    let mut sin = vec![0f32; t * half];
    for j in 0..half {
        let inv_freq = 1.0 / libm::powf(theta, (2 * j) as f32 / hs as f32);
        for p in 0..t {
            let angle = (start + p) as f32 * inv_freq;
            cos[p * half + j] = libm::cosf(angle);
            sin[p * half + j] = libm::sinf(angle);
        }
    }
    (cos, sin)
}

/// Applies RoPE in place to x (T, N*HS) for N heads, HF `rotate_half` convention: within a
/// head the pair is (x[j], x[j + HS/2]), `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`.
pub fn rope(x: &mut [f32], n_heads: usize, hs: usize, cos: &[f32], sin: &[f32]) {
    let half = hs / 2;
    let width = n_heads * hs;
    assert_eq!(x.len() % width, 0, "rope: x is not (T, {n_heads}*{hs})");
    let t = x.len() / width;
    assert!(
        cos.len() >= t * half && sin.len() >= t * half,
        "rope: tables shorter than T={t}"
    );
    for p in 0..t {
        for h in 0..n_heads {
            let head = &mut x[p * width + h * hs..p * width + (h + 1) * hs];
            for j in 0..half {
                let (c, s) = (cos[p * half + j], sin[p * half + j]);
                let (x1, x2) = (head[j], head[j + half]);
                head[j] = x1 * c - x2 * s;
                head[j + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// Causal grouped-query attention. q (T, NH*HS), k and v (T, NKV*HS) -> out (T, NH*HS).
/// Query head h reads kv head h / (NH/NKV). Scores scaled by HS^-0.5, softmax in f32.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Vec<f32> {
    attention_cached(q, k, v, t, t, nh, nkv, hs)
}

/// Keys per chunk of [`attention_cached`]'s softmax (`shaders/attention.wgsl` CH).
pub const ATTENTION_CHUNK: usize = 64;

/// Causal GQA attention of T_Q new queries over T_KV keys/values, the last T_Q of which belong
/// to the queries themselves: query i sits at position T_KV - T_Q + i and sees keys 0..=that.
/// q (T_Q, NH*HS), k and v (T_KV, NKV*HS) -> out (T_Q, NH*HS). With T_Q = T_KV this is the
/// whole-sequence case; with a KV cache, T_KV - T_Q tokens came before. Each output row is
/// computed in the same order either way, so cached decoding equals the full pass bit for bit.
///
/// The softmax runs over chunks of [`ATTENTION_CHUNK`] keys, in the GPU's order
/// (`shaders/attention.wgsl`, which splits a decoded token's keys over workgroups that way),
/// so the two differ only by the GPU's exp: with M the row's largest score, chunk c has
/// m_c = its largest score, e_j = exp(s_j - m_c), l_c = sum e_j and u_c = sum e_j v_j (in key
/// order), f_c = exp(m_c - M); then L = sum l_c f_c, O = sum u_c f_c (in chunk order) and
/// out = O / L. Mathematically the softmax: exp(s_j - M) / sum exp(s - M) weights.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t_q: usize,
    t_kv: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) -> Vec<f32> {
    let (qw, kw) = (nh * hs, nkv * hs);
    assert_eq!(q.len(), t_q * qw, "attention: q is not (T_Q, NH*HS)");
    assert_eq!(k.len(), t_kv * kw, "attention: k is not (T_KV, NKV*HS)");
    assert_eq!(v.len(), t_kv * kw, "attention: v is not (T_KV, NKV*HS)");
    assert!(t_q <= t_kv, "attention: more queries than keys");
    let past = t_kv - t_q;
    let group = nh / nkv;
    let scale = 1.0 / (hs as f32).sqrt();
    let mut out = vec![0f32; t_q * qw];
    let mut scores = vec![0f32; t_kv];
    let mut o = vec![0f32; hs];
    let mut u = vec![0f32; hs];
    for h in 0..nh {
        let kvh = h / group;
        for i in 0..t_q {
            let visible = past + i + 1;
            let qi = &q[i * qw + h * hs..i * qw + (h + 1) * hs];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate().take(visible) {
                let kj = &k[j * kw + kvh * hs..j * kw + (kvh + 1) * hs];
                *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*s);
            }
            o.fill(0.0);
            let mut denom = 0f32;
            for (c, chunk) in scores[..visible].chunks_mut(ATTENTION_CHUNK).enumerate() {
                let mc = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut l = 0f32;
                for s in chunk.iter_mut() {
                    *s = libm::expf(*s - mc);
                    l += *s;
                }
                u.fill(0.0);
                for (jj, &e) in chunk.iter().enumerate() {
                    let j = c * ATTENTION_CHUNK + jj;
                    let vj = &v[j * kw + kvh * hs..j * kw + (kvh + 1) * hs];
                    for (ud, &vv) in u.iter_mut().zip(vj) {
                        *ud += e * vv;
                    }
                }
                let f = libm::expf(mc - max);
                denom += l * f;
                for (od, &ud) in o.iter_mut().zip(&u) {
                    *od += ud * f;
                }
            }
            let oi = &mut out[i * qw + h * hs..i * qw + (h + 1) * hs];
            for (out_d, &od) in oi.iter_mut().zip(&o) {
                *out_d = od / denom;
            }
        }
    }
    out
}

/// Gated activation of the FFN: `act(gate) * up`, elementwise over (T, F).
pub fn gated_act(gate: &[f32], up: &[f32], act: Activation) -> Vec<f32> {
    assert_eq!(
        gate.len(),
        up.len(),
        "gated_act: gate and up differ in shape"
    );
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let a = match act {
                Activation::Relu2 => {
                    let r = g.max(0.0);
                    r * r
                }
                Activation::Silu => g / (1.0 + libm::expf(-g)),
            };
            a * u
        })
        .collect()
}

/// Dense y (T, O) = x (T, I) . W^T for a full-precision W (O, I): the language-model head.
pub fn matmul_t(x: &[f32], w: &[f32], i: usize, o: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * i, "matmul_t: W is not (O, I)");
    assert_eq!(x.len() % i, 0, "matmul_t: x is not (T, I)");
    let t = x.len() / i;
    let mut y = vec![0f32; t * o];
    for r in 0..t {
        let xr = &x[r * i..(r + 1) * i];
        for c in 0..o {
            y[r * o + c] = xr
                .iter()
                .zip(&w[c * i..(c + 1) * i])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    y
}

/// An element of a full-precision weight matrix that widens to f32 exactly: f32 itself, or a
/// bf16 held as its bits (`u16`; bf16 -> f32 is the bits shifted into the top half, exact).
/// The head kernels are generic over it, so a bf16 table goes through the very same f32
/// operations on the very same values as its f32 twin (same bits out) while reading half the
/// bytes: decoding on a CPU is bound by the bytes of the head it streams.
pub(crate) trait Weight: Copy + Send + Sync {
    /// The value as f32 (exact).
    fn widen(self) -> f32;

    /// `[p[0].widen(), .., p[7].widen()]` in one AVX2 register.
    ///
    /// # Safety
    /// The CPU has AVX2, and `p[..8]` is in bounds.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen8(p: *const Self) -> std::arch::x86_64::__m256;

    /// `[p[0].widen(), .., p[15].widen()]` in one AVX-512 register.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and `p[..16]` is in bounds.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract (8 values in bounds, AVX2).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract (16 values in bounds, AVX-512F).
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

/// bf16 bits.
impl Weight for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_to_f32(self)
    }

    /// `vpmovzxwd` + `vpslld 16`: [`bf16_to_f32`] on 8 values.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (8 values = 16 bytes in bounds, AVX2).
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    /// `vpmovzxwd` + `vpslld 16` on 16 values.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 values = 32 bytes in bounds, AVX-512F).
        unsafe {
            let h = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// bf16 bits -> f32, exactly (no rounding, NaN payloads kept): `bits << 16`.
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The bf16 bits of `x` when x is exactly a bf16 (the low 16 bits of its f32 are zero).
#[inline(always)]
pub fn f32_to_bf16_exact(x: f32) -> Option<u16> {
    let b = x.to_bits();
    (b & 0xffff == 0).then_some((b >> 16) as u16)
}

/// The fast path of [`matmul_t`]: 16 independent partial sums per dot product so the compiler
/// can vectorise (a single running f32 sum cannot be reordered), AVX2 + FMA chosen at run time
/// natively. Sums in a different order than [`matmul_t`]: equal within `dot_f32_bound`.
pub fn matmul_t_fast(x: &[f32], w: &[f32], i: usize, o: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * i, "matmul_t_fast: W is not (O, I)");
    matmul_t_fast_any(x, w, i, o)
}

/// [`matmul_t_fast`] with W (O, I) as bf16 bits: y (T, O) = x (T, I) . W^T. Every output is
/// the same operations in the same order on the same (widened) values as [`matmul_t_fast`] of
/// the f32 W, so the two are equal bit for bit, at half the bytes of W read. Natively the
/// AVX2 and FMA build widens 8 bf16 at a time in register (`vpmovzxwd` + `vpslld`); in wasm the
/// same body is built with SIMD128 (`i32x4.extend_*_i16x8_u` + `i32x4.shl`, seen in the linked
/// module).
pub fn matmul_t_fast_bf16(x: &[f32], w: &[u16], i: usize, o: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * i, "matmul_t_fast_bf16: W is not (O, I)");
    matmul_t_fast_any(x, w, i, o)
}

fn matmul_t_fast_any<W: Weight>(x: &[f32], w: &[W], i: usize, o: usize) -> Vec<f32> {
    assert!(
        i > 0 && x.len().is_multiple_of(i),
        "matmul_t_fast: x is not (T, I)"
    );
    let t = x.len() / i;
    let mut y = vec![0f32; t * o];
    if o == 0 {
        return y;
    }
    if t == 1 {
        // One token (decoding): split the outputs, i.e. the rows of W, between threads.
        crate::par::chunks(&mut y, 256, |c0, out| {
            matmul_t_block(x, &w[c0 * i..(c0 + out.len()) * i], i, out.len(), out)
        });
    } else {
        // Blocks of tokens: each thread streams W once for its block.
        crate::par::rows(&mut y, o, 4, |r0, out| {
            let rows = out.len() / o;
            matmul_t_block(&x[r0 * i..(r0 + rows) * i], w, i, o, out)
        });
    }
    y
}

/// [`matmul_t_fast`] on a block: `y` (T', O') = x (T', I) . W' (O', I)^T.
fn matmul_t_block<W: Weight>(x: &[f32], w: &[W], i: usize, o: usize, y: &mut [f32]) {
    if i < MATMUL_LANES {
        return matmul_t_narrow(x, w, i, o, y);
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            // SAFETY: the CPU has AVX-512F and FMA, checked just above.
            return unsafe { matmul_t_avx512(x, w, i, o, y) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { matmul_t_avx2(x, w, i, o, y) };
        }
    }
    matmul_t_body::<false, W>(x, w, i, o, y)
}

/// [`matmul_t_body`] where I < 16 (LoRA's B: I = r): `dot_lanes` then has no full group of
/// lanes, and each output is `(sum of 16 zero lanes) + (((z + x0 w0) + x1 w1) + ..)` with z the
/// empty sum, products rounded before each addition. The same operations here, with W
/// transposed once to (I, O) so that the loop runs along the outputs and vectorises (one
/// scalar chain per output before, bound by the addition's latency).
fn matmul_t_narrow<W: Weight>(x: &[f32], w: &[W], i: usize, o: usize, y: &mut [f32]) {
    let mut wt = vec![0f32; i * o];
    for (c, row) in w.chunks_exact(i).enumerate() {
        for (k, v) in row.iter().enumerate() {
            wt[k * o + c] = v.widen();
        }
    }
    let zero_lanes = [0f32; MATMUL_LANES].iter().sum::<f32>();
    let empty = std::iter::empty::<f32>().sum::<f32>();
    for (xr, yr) in x.chunks_exact(i).zip(y.chunks_exact_mut(o)) {
        yr.fill(empty);
        for (&a, wk) in xr.iter().zip(wt.chunks_exact(o)) {
            for (d, &b) in yr.iter_mut().zip(wk) {
                *d += a * b;
            }
        }
        for d in yr.iter_mut() {
            *d += zero_lanes; // (addition commutes, signed zeros too)
        }
    }
}

/// Tokens x rows of W whose outputs [`matmul_t_avx512`] computes together.
#[cfg(target_arch = "x86_64")]
const TILE_TOKENS: usize = 4;
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 4;

/// [`matmul_t_body`] with FMA on AVX-512 (each output as `dot_lanes::<true, W>` computes it,
/// the same bits): the 16 lanes of one output's partial sums fill one register, so a tile of
/// 4 tokens x 4 rows of W keeps 16 outputs' lanes in 16 registers; per 16 columns, 4 loads of
/// x and 4 (widened) of W feed 16 FMAs (the AVX2 kernel: 10 loads for 8). The 16 outputs'
/// lanes are then transposed ([`fold_lanes_x16`]) and summed lane 0 to 15 as `dot_lanes`
/// sums them, 16 outputs side by side. Tokens past a multiple of 4 (decoding: all) and the
/// last O % 4 rows take `dot_lanes` itself.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn matmul_t_avx512<W: Weight>(x: &[f32], w: &[W], i: usize, o: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    const NT: usize = TILE_TOKENS;
    const NR: usize = TILE_ROWS;
    let t = x.len() / i;
    let (tb, ob) = (t - t % NT, o - o % NR);
    let n = i - i % MATMUL_LANES;
    for c0 in (0..ob).step_by(NR) {
        for r in (0..tb).step_by(NT) {
            // acc[j * NR + c]: the 16 lanes of token r + j, row c0 + c.
            let mut acc = [_mm512_setzero_ps(); NT * NR];
            for k in (0..n).step_by(MATMUL_LANES) {
                // SAFETY: k + 16 <= n <= I: within rows c0..c0 + 4 of W and rows r..r + 4 of
                // x; the CPU has AVX-512F and FMA (this function's features).
                unsafe {
                    let wv: [__m512; NR] =
                        std::array::from_fn(|c| W::widen16(w.as_ptr().add((c0 + c) * i + k)));
                    for j in 0..NT {
                        let xv = _mm512_loadu_ps(x.as_ptr().add((r + j) * i + k));
                        for c in 0..NR {
                            acc[j * NR + c] = _mm512_fmadd_ps(xv, wv[c], acc[j * NR + c]);
                        }
                    }
                }
            }
            let sums = fold_lanes_x16(&acc);
            for j in 0..NT {
                let xr = &x[(r + j) * i..(r + j + 1) * i];
                for c in 0..NR {
                    let wc = &w[(c0 + c) * i..(c0 + c + 1) * i];
                    y[(r + j) * o + c0 + c] = sums[j * NR + c] + dot_tail(&xr[n..], &wc[n..]);
                }
            }
        }
        for r in tb..t {
            for c in c0..c0 + NR {
                y[r * o + c] = dot_lanes::<true, W>(&x[r * i..(r + 1) * i], &w[c * i..(c + 1) * i]);
            }
        }
    }
    for c in ob..o {
        for r in 0..t {
            y[r * o + c] = dot_lanes::<true, W>(&x[r * i..(r + 1) * i], &w[c * i..(c + 1) * i]);
        }
    }
}

/// `lanes.iter().sum::<f32>()` of [`dot_lanes`] for 16 outputs at once, the same bits:
/// `v[a]` holds the 16 lanes of output a. A 16 x 16 transpose (`vunpck*ps`, `vshufps`, then
/// `vshuff32x4` across 128-bit lanes) makes `t[l]` hold lane l of every output in lane a, and
/// `s = ((z + t[0]) + t[1]) + .. + t[15]` (z the empty sum `Sum` starts from) folds each
/// output's lanes in order, 16 outputs side by side.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fold_lanes_x16(v: &[std::arch::x86_64::__m512; 16]) -> [f32; 16] {
    use std::arch::x86_64::*;
    // t[2 p], t[2 p + 1]: v[2 p] and v[2 p + 1] interleaved (elements 4q, 4q + 1 / 4q + 2, 4q + 3
    // of each 128-bit lane q).
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (v[k & !1], v[k | 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4 g + m], 128-bit lane q: element 4q + m of outputs 4g .. 4g + 3.
    let u: [__m512; 16] = std::array::from_fn(|k| {
        let (g, m) = (k / 4, k % 4);
        let (a, b) = (t[4 * g + m / 2], t[4 * g + 2 + m / 2]);
        if m % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    // lanes[4 q + m]: 128-bit lane q of u[m], u[4 + m], u[8 + m], u[12 + m], i.e. element
    // 4q + m of outputs 0..16 in order.
    let mut lanes = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let ab_lo = _mm512_shuffle_f32x4::<0x44>(u[m], u[4 + m]);
        let ab_hi = _mm512_shuffle_f32x4::<0xEE>(u[m], u[4 + m]);
        let cd_lo = _mm512_shuffle_f32x4::<0x44>(u[8 + m], u[12 + m]);
        let cd_hi = _mm512_shuffle_f32x4::<0xEE>(u[8 + m], u[12 + m]);
        lanes[m] = _mm512_shuffle_f32x4::<0x88>(ab_lo, cd_lo);
        lanes[4 + m] = _mm512_shuffle_f32x4::<0xDD>(ab_lo, cd_lo);
        lanes[8 + m] = _mm512_shuffle_f32x4::<0x88>(ab_hi, cd_hi);
        lanes[12 + m] = _mm512_shuffle_f32x4::<0xDD>(ab_hi, cd_hi);
    }
    let mut s = _mm512_set1_ps(std::iter::empty::<f32>().sum::<f32>());
    for l in lanes {
        s = _mm512_add_ps(s, l);
    }
    let mut out = [0f32; 16];
    // SAFETY: out holds 16 f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), s) };
    out
}

/// Tokens whose outputs [`matmul_t_avx2`] computes together from one pass over a row of W.
#[cfg(target_arch = "x86_64")]
const TOKEN_BLOCK: usize = 4;

/// [`matmul_t_body`] with FMA (each output as `dot_lanes::<true, W>` computes it, the same
/// bits), [`TOKEN_BLOCK`] tokens at a time: each row of W is read in pieces of 16 (widened
/// once: `vpmovzxwd` + `vpslld` for bf16) that feed the 16 lanes of 4 tokens, 8 independent
/// chains of `vfmadd231ps` in 8 registers instead of 2. One token's dot product is a chain
/// bound by the FMA latency (2 multiply-adds every 4-5 cycles); 4 tokens' keep both FMA
/// units busy. The lanes are then summed exactly as [`dot_lanes`] sums them
/// (`(((0 + lane 0) + lane 1) + .. + lane 15) + tail`), the 4 tokens' sums being independent
/// chains too. Training runs T = 16 rows a thread of the head (I = 768); the last T % 4
/// tokens, and decoding (T = 1), take [`dot_lanes`] itself, so decoding is as before.
/// Equal to the body bit for bit: `blocked_head_kernels_keep_the_one_token_order`.
///
/// Taking 4 rows of W together for one token instead (x read once for four outputs) was
/// tried and measured on the 2-core EPYC: faster where C = 2560 but slower for 125m decoding
/// (see [`matmul_t_body`]); the token block does not touch decoding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn matmul_t_avx2<W: Weight>(x: &[f32], w: &[W], i: usize, o: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    const LANES: usize = MATMUL_LANES;
    let t = x.len() / i;
    let blocked = t - t % TOKEN_BLOCK;
    let n = i - i % LANES;
    for c in 0..o {
        let wc = &w[c * i..(c + 1) * i];
        for r in (0..blocked).step_by(TOKEN_BLOCK) {
            let xb = &x[r * i..(r + TOKEN_BLOCK) * i];
            // acc[2 j], acc[2 j + 1]: lanes 0..8 and 8..16 of token r + j.
            let mut acc = [_mm256_setzero_ps(); 2 * TOKEN_BLOCK];
            for k in (0..n).step_by(LANES) {
                // SAFETY: k + 16 <= n <= I: within W's row and each of the 4 rows of x
                // (xb is (4, I)); the CPU has AVX2 and FMA (this function's features).
                unsafe {
                    let w0 = W::widen8(wc.as_ptr().add(k));
                    let w1 = W::widen8(wc.as_ptr().add(k + 8));
                    for j in 0..TOKEN_BLOCK {
                        let xp = xb.as_ptr().add(j * i + k);
                        acc[2 * j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), w0, acc[2 * j]);
                        acc[2 * j + 1] =
                            _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), w1, acc[2 * j + 1]);
                    }
                }
            }
            let sums = sum_lanes_x4(&acc);
            for (j, sum) in sums.into_iter().enumerate() {
                let xr = &xb[j * i..(j + 1) * i];
                y[(r + j) * o + c] = sum + dot_tail(&xr[n..], &wc[n..]);
            }
        }
        for r in blocked..t {
            y[r * o + c] = dot_lanes::<true, W>(&x[r * i..(r + 1) * i], wc);
        }
    }
}

/// The lanes of [`dot_lanes`]' partial sums.
const MATMUL_LANES: usize = 16;

/// One output of the head matmul, in the order every fast build computes it: lane l sums
/// x[k] w[k] over k = l, l + 16, .. below I - I % 16, in order of k (a fused multiply-add per
/// term with `FMA`, else a product then a sum: wasm has no FMA, a software one is slow); then
/// `(((0 + lane 0) + lane 1) + .. + lane 15) + tail`, the tail being the last I % 16 products
/// summed in order. 16 independent sums let the compiler vectorise (a single running f32 sum
/// cannot be reordered).
#[inline(always)]
fn dot_lanes<const FMA: bool, W: Weight>(x: &[f32], w: &[W]) -> f32 {
    const LANES: usize = MATMUL_LANES;
    let n = x.len() - x.len() % LANES;
    let mut lanes = [0f32; LANES];
    for (xa, wa) in x[..n].chunks_exact(LANES).zip(w[..n].chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = if FMA {
                xa[l].mul_add(wa[l].widen(), lanes[l])
            } else {
                lanes[l] + xa[l] * wa[l].widen()
            };
        }
    }
    lanes.iter().sum::<f32>() + dot_tail(&x[n..], &w[n..])
}

/// The last I % 16 products of [`dot_lanes`], summed in order.
#[inline(always)]
fn dot_tail<W: Weight>(x: &[f32], w: &[W]) -> f32 {
    x.iter().zip(w).map(|(a, b)| a * b.widen()).sum()
}

/// y (T, O) = x (T, I) . W (O, I)^T, each output as [`dot_lanes`] computes it, one row of W
/// at a time (built with AVX2 + FMA natively where the CPU has them, with SIMD128 in wasm).
///
/// Taking 4 rows of W together (8 independent chains of multiply-adds instead of 2, x read
/// once for four outputs; same sums) was tried with AVX2 intrinsics and measured on the 2-core
/// EPYC: faster where C = 2560 (2b4t shapes, f32: 22.5 against 16.6 GB/s) but slower where C
/// = 768 (125m: bf16 9.3 against 14.3 GB/s, the 4 rows' 64 scalar lane additions stalling the
/// stream), so one row it stays.
#[inline(always)]
fn matmul_t_body<const FMA: bool, W: Weight>(
    x: &[f32],
    w: &[W],
    i: usize,
    o: usize,
    y: &mut [f32],
) {
    let t = x.len() / i;
    for c in 0..o {
        let wc = &w[c * i..(c + 1) * i];
        for r in 0..t {
            y[r * o + c] = dot_lanes::<FMA, W>(&x[r * i..(r + 1) * i], wc);
        }
    }
}

/// `y (T, C) += g (T, V) . W (V, C)`, skipping zeros of g: the head's backward. Every element
/// of y gets exactly the multiply-adds of T x V calls of [`axpy`] in order of v, so it equals
/// that loop bit for bit; blocks of rows run on separate threads, each streaming W once.
pub fn matmul_acc(y: &mut [f32], g: &[f32], w: &[f32], v: usize, c: usize) {
    assert_eq!(w.len(), v * c, "matmul_acc: W is not (V, C)");
    matmul_acc_any(y, g, w, v, c)
}

/// [`matmul_acc`] with W (V, C) as bf16 bits: the same multiply-adds on the same (widened)
/// values, so equal to [`matmul_acc`] of the f32 W bit for bit.
pub fn matmul_acc_bf16(y: &mut [f32], g: &[f32], w: &[u16], v: usize, c: usize) {
    assert_eq!(w.len(), v * c, "matmul_acc_bf16: W is not (V, C)");
    matmul_acc_any(y, g, w, v, c)
}

fn matmul_acc_any<W: Weight>(y: &mut [f32], g: &[f32], w: &[W], v: usize, c: usize) {
    assert_eq!(
        y.len() / c,
        g.len() / v,
        "matmul_acc: y and g have different rows"
    );
    if acc_tiles::matmul_acc(y, g, w, v, c) {
        return;
    }
    crate::par::rows(y, c, 4, |r0, out| {
        let rows = out.len() / c;
        matmul_acc_body(&g[r0 * v..(r0 + rows) * v], w, v, c, out)
    });
}

/// `lanes.iter().sum::<f32>()` of [`dot_lanes`] for 4 tokens at once, the same bits:
/// `acc[2 j]`, `acc[2 j + 1]` hold lanes 0..8 and 8..16 of token j. A 4 x 8 transpose per
/// half (`vunpck*ps` + `vshufps`) puts lane l of the 4 tokens in one register, and
/// `s = ((z + lane 0) + lane 1) + .. + lane 15` runs on the 4 tokens side by side, z being
/// the empty sum `Sum` starts from; each token's sum is the scalar fold's, term for term.
/// (Storing the lanes and folding them one token at a time took 64 scalar additions and as
/// many loads: ~10% of the head's forward.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sum_lanes_x4(acc: &[std::arch::x86_64::__m256; 2 * TOKEN_BLOCK]) -> [f32; TOKEN_BLOCK] {
    use std::arch::x86_64::*;
    let mut s = _mm_set1_ps(std::iter::empty::<f32>().sum::<f32>());
    for h in 0..2 {
        let (a, b, c, d) = (acc[h], acc[2 + h], acc[4 + h], acc[6 + h]);
        let (ab_lo, ab_hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let (cd_lo, cd_hi) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
        // lane_k (k < 4): lanes k (low half) and k + 4 (high half) of a, b, c, d.
        let lane = [
            _mm256_shuffle_ps::<0x44>(ab_lo, cd_lo),
            _mm256_shuffle_ps::<0xEE>(ab_lo, cd_lo),
            _mm256_shuffle_ps::<0x44>(ab_hi, cd_hi),
            _mm256_shuffle_ps::<0xEE>(ab_hi, cd_hi),
        ];
        for l in lane {
            s = _mm_add_ps(s, _mm256_castps256_ps128(l));
        }
        for l in lane {
            s = _mm_add_ps(s, _mm256_extractf128_ps::<1>(l));
        }
    }
    let mut out = [0f32; TOKEN_BLOCK];
    // SAFETY: out holds 4 f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
    out
}

#[inline(always)]
fn matmul_acc_body<W: Weight>(g: &[f32], w: &[W], v: usize, c: usize, y: &mut [f32]) {
    let rows = y.len() / c;
    for vi in 0..v {
        let wr = &w[vi * c..(vi + 1) * c];
        for r in 0..rows {
            let a = g[r * v + vi];
            if a != 0.0 {
                axpy_body(&mut y[r * c..(r + 1) * c], a, wr);
            }
        }
    }
}

/// `y += a * x`, elementwise (the head's backward row by row). The same multiply-add per
/// element in any build; AVX2 + FMA chosen at run time natively.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len(), "axpy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { axpy_avx2(y, a, x) };
    }
    axpy_body(y, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_body(y, a, x)
}

#[inline(always)]
fn axpy_body<W: Weight>(y: &mut [f32], a: f32, x: &[W]) {
    for (d, &v) in y.iter_mut().zip(x) {
        *d += a * v.widen();
    }
}

/// `a += b`, the residual stream update.
pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add_in_place: shapes differ");
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// The k most likely tokens of one row of logits, with their softmax probabilities,
/// most likely first (ties broken by the lower token id).
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let denom: f64 = logits.iter().map(|&l| libm::exp((l - max) as f64)).sum();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter()
        .take(k)
        .map(|i| {
            (
                i,
                (libm::exp((logits[i as usize] - max) as f64) / denom) as f32,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_lanes_is_the_sum_in_its_order() {
        assert_eq!(sum_squares_lanes(&[3.0, 4.0]), 25.0);
        assert_eq!(sum_squares_lanes(&[]), 0.0);
        let mut rng = crate::rng::Rng::new(5);
        for c in [1, 7, 255, 256, 1000, 1030, 3072, 5000] {
            let x: Vec<f32> = (0..c).map(|_| 3.0 * rng.normal()).collect();
            let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_squares_lanes(&x) as f64;
            // Each of the c squares and additions rounds once (relative 2^-24 each).
            assert!(
                (got - exact).abs() <= exact * c as f64 * 6e-8,
                "C={c}: {got} vs {exact}"
            );
            // Lane 0 alone: groups 0, 64, ... -- a row of one group is its own lane sum.
            if c <= 4 {
                let s: Vec<f32> = (0..4).map(|j| x.get(j).map_or(0.0, |v| v * v)).collect();
                assert_eq!(sum_squares_lanes(&x), (s[0] + s[1]) + (s[2] + s[3]));
            }
        }
    }

    #[test]
    fn rms_norm_unit_rows() {
        let y = rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 2.0], 1e-30);
        // row 0: mean square 12.5 -> x / 3.5355; row 1 is zero and eps keeps it finite
        assert!((y[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert!((y[1] - 8.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert_eq!(&y[2..], &[0.0, 0.0]);
    }

    #[test]
    fn rope_position_zero_is_identity_and_norm_preserving() {
        let (cos, sin) = rope_tables(3, 4, 10000.0);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        rope(&mut x, 1, 4, &cos, &sin);
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        for p in 1..3 {
            let n: f32 = x[p * 4..p * 4 + 4].iter().map(|v| v * v).sum();
            assert!((n - 30.0).abs() < 1e-4);
        }
        // position 1, pair (x0, x2) = (1, 3) rotated by angle 1 rad.
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((x[4] - (1.0 * c - 3.0 * s)).abs() < 1e-6);
        assert!((x[6] - (3.0 * c + 1.0 * s)).abs() < 1e-6);
    }

    #[test]
    fn attention_first_token_copies_its_value() {
        // T=2, NH=2, NKV=1, HS=2: token 0 attends only to itself.
        let q = vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, -1.0];
        let k = vec![1.0, 2.0, 3.0, 4.0];
        let v = vec![5.0, 6.0, 7.0, 8.0];
        let o = attention(&q, &k, &v, 2, 2, 1, 2);
        assert_eq!(&o[..4], &[5.0, 6.0, 5.0, 6.0]);
        // token 1 mixes both values: strictly between them.
        assert!(o[4] > 5.0 && o[4] < 7.0);
    }

    #[test]
    fn matmul_fast_path_matches_the_reference() {
        let mut rng = crate::rng::Rng::new(5);
        for (t, i, o) in [(1, 1, 1), (3, 17, 5), (37, 1000, 37), (2, 768, 509)] {
            let x: Vec<f32> = (0..t * i).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..o * i).map(|_| rng.normal()).collect();
            let (fast, reference) = (matmul_t_fast(&x, &w, i, o), matmul_t(&x, &w, i, o));
            let mut worst = 0f32;
            for r in 0..t {
                for c in 0..o {
                    let abs_sum: f32 = (0..i).map(|k| (x[r * i + k] * w[c * i + k]).abs()).sum();
                    let (d, bound) = (
                        (fast[r * o + c] - reference[r * o + c]).abs(),
                        crate::tolerance::dot_f32_bound(i, abs_sum),
                    );
                    assert!(
                        d <= bound,
                        "T={t} I={i} O={o} at ({r},{c}): diff {d:e} > dot_f32_bound {bound:e}"
                    );
                    worst = worst.max(d / bound.max(f32::MIN_POSITIVE));
                }
            }
            println!("matmul_t_fast T={t} I={i} O={o}: worst diff {worst:.3} of dot_f32_bound");
        }
    }

    /// Random values rounded to bf16 (as a bf16 checkpoint holds): (f32 values, bf16 bits).
    fn bf16_data(n: usize, rng: &mut crate::rng::Rng) -> (Vec<f32>, Vec<u16>) {
        let f: Vec<f32> = (0..n)
            .map(|_| half::bf16::from_f32(rng.normal()).to_f32())
            .collect();
        let b = f.iter().map(|&x| f32_to_bf16_exact(x).unwrap()).collect();
        (f, b)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `matmul_t_body` for f32 W as the crate had it before bf16 tables, verbatim but for
    /// the FMA switch: the order the bf16 kernel must keep.
    fn f32_body_as_before(fma: bool, x: &[f32], w: &[f32], i: usize, o: usize) -> Vec<f32> {
        const LANES: usize = 16;
        let t = x.len() / i;
        let mut y = vec![0f32; t * o];
        for c in 0..o {
            let wc = &w[c * i..(c + 1) * i];
            for r in 0..t {
                let xr = &x[r * i..(r + 1) * i];
                let mut lanes = [0f32; LANES];
                let (xc, xt) = xr.split_at(i - i % LANES);
                let (wcc, wct) = wc.split_at(i - i % LANES);
                for (xa, wa) in xc.chunks_exact(LANES).zip(wcc.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        lanes[l] = if fma {
                            xa[l].mul_add(wa[l], lanes[l])
                        } else {
                            lanes[l] + xa[l] * wa[l]
                        };
                    }
                }
                let tail: f32 = xt.iter().zip(wct).map(|(a, b)| a * b).sum();
                y[r * o + c] = lanes.iter().sum::<f32>() + tail;
            }
        }
        y
    }

    /// The bf16 head kernels against the f32 ones on the widened values: equal bit for bit,
    /// on shapes where V is not a multiple of the decode chunk (256) and I not one of the 16
    /// lanes (or smaller than them), for 1 token (decode: W's rows split between threads) and
    /// several (blocks of tokens), on 1 and 3 threads; and each build's body (with and without
    /// FMA: the wasm and non-AVX2 path is the one without) on its own.
    #[test]
    fn bf16_head_kernels_equal_the_f32_ones_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(14);
        let pools: Vec<rayon::ThreadPool> = [1, 3]
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .collect();
        for (t, i, o) in [
            (1, 1, 1),
            (1, 15, 3),
            (1, 17, 5),
            (1, 768, 1000),
            (1, 1030, 513),
            (2, 15, 300),
            (3, 17, 5),
            (5, 1001, 37),
            (37, 100, 509),
        ] {
            let x: Vec<f32> = (0..t * i).map(|_| rng.normal()).collect();
            let (wf, wb) = bf16_data(o * i, &mut rng);
            let reference = matmul_t_fast(&x, &wf, i, o);
            for pool in &pools {
                let (f, b) = pool.install(|| {
                    (
                        matmul_t_fast(&x, &wf, i, o),
                        matmul_t_fast_bf16(&x, &wb, i, o),
                    )
                });
                assert_eq!(
                    bits(&f),
                    bits(&reference),
                    "T={t} I={i} O={o}: f32 on {} threads",
                    pool.current_num_threads()
                );
                assert_eq!(
                    bits(&b),
                    bits(&reference),
                    "T={t} I={i} O={o}: bf16 on {} threads",
                    pool.current_num_threads()
                );
            }
            // The body's order is the one the f32 kernel had before it took bf16 (written out
            // here as it was), with and without FMA.
            for fma in [false, true] {
                let mut yb = vec![0f32; t * o];
                if fma {
                    matmul_t_body::<true, u16>(&x, &wb, i, o, &mut yb);
                } else {
                    matmul_t_body::<false, u16>(&x, &wb, i, o, &mut yb);
                }
                assert_eq!(
                    bits(&yb),
                    bits(&f32_body_as_before(fma, &x, &wf, i, o)),
                    "T={t} I={i} O={o}: FMA {fma}"
                );
            }
            // Each body alone (the paths other machines and wasm take).
            let mut yf = vec![0f32; t * o];
            let mut yb = vec![0f32; t * o];
            matmul_t_body::<false, f32>(&x, &wf, i, o, &mut yf);
            matmul_t_body::<false, u16>(&x, &wb, i, o, &mut yb);
            assert_eq!(
                bits(&yb),
                bits(&yf),
                "T={t} I={i} O={o}: bodies without FMA"
            );
            matmul_t_body::<true, f32>(&x, &wf, i, o, &mut yf);
            matmul_t_body::<true, u16>(&x, &wb, i, o, &mut yb);
            assert_eq!(bits(&yb), bits(&yf), "T={t} I={i} O={o}: bodies with FMA");

            // The backward: dx (T, I) += g (T, O) . W (O, I), g with zeros (skipped terms).
            let g: Vec<f32> = (0..t * o)
                .map(|k| if k % 3 == 0 { 0.0 } else { rng.normal() })
                .collect();
            let start: Vec<f32> = (0..t * i).map(|_| rng.normal()).collect();
            let (mut af, mut ab) = (start.clone(), start.clone());
            matmul_acc(&mut af, &g, &wf, o, i);
            matmul_acc_bf16(&mut ab, &g, &wb, o, i);
            assert_eq!(bits(&ab), bits(&af), "T={t} I={i} O={o}: matmul_acc");
            let (mut af, mut ab) = (start.clone(), start);
            matmul_acc_body(&g, &wf, o, i, &mut af);
            matmul_acc_body(&g, &wb, o, i, &mut ab);
            assert_eq!(bits(&ab), bits(&af), "T={t} I={i} O={o}: matmul_acc body");
        }
    }

    /// Shapes for the blocked head kernels: T around and not a multiple of the token block
    /// (4) and the row tile (4), I / C below, at, and not a multiple of the 16 lanes / tile
    /// columns, O / V odd and across the backward's block of 64 rows of W.
    const BLOCK_SHAPES: [(usize, usize, usize); 11] = [
        (1, 17, 5),
        (6, 8, 45),
        (2, 1, 3),
        (3, 15, 7),
        (4, 16, 1),
        (5, 33, 65),
        (7, 100, 129),
        (8, 31, 64),
        (9, 769, 37),
        (13, 48, 201),
        (37, 257, 131),
    ];

    /// Whether this CPU takes the AVX2 + FMA kernels (else their tests check the bodies only).
    #[cfg(target_arch = "x86_64")]
    fn avx2_fma() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// The head's forward with tokens blocked by 4 (`matmul_t_avx2`) against the unblocked
    /// one-token path (`dot_lanes` per token and output; `matmul_t_block` on one token, as
    /// decoding runs it): equal bit for bit, f32 and bf16 W, the bodies with and without FMA,
    /// and through `matmul_t_fast` on 1 and 3 threads. A changed order of the sums changes the
    /// low bits (random normal data), so this fails if the blocking reorders anything.
    #[test]
    fn blocked_head_kernels_keep_the_one_token_order() {
        let mut rng = crate::rng::Rng::new(16);
        let pools: Vec<rayon::ThreadPool> = [1, 3]
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .collect();
        for (t, i, o) in BLOCK_SHAPES {
            let x: Vec<f32> = (0..t * i).map(|_| rng.normal()).collect();
            let (wf, wb) = bf16_data(o * i, &mut rng);
            // Unblocked, one token at a time, by the body of each build.
            let one_token = |fma: bool| -> Vec<f32> {
                let mut y = vec![0f32; t * o];
                for r in 0..t {
                    let xr = &x[r * i..(r + 1) * i];
                    for c in 0..o {
                        let wc = &wf[c * i..(c + 1) * i];
                        y[r * o + c] = if fma {
                            dot_lanes::<true, f32>(xr, wc)
                        } else {
                            dot_lanes::<false, f32>(xr, wc)
                        };
                    }
                }
                y
            };
            for fma in [false, true] {
                let reference = one_token(fma);
                let (mut yf, mut yb) = (vec![0f32; t * o], vec![0f32; t * o]);
                if fma {
                    matmul_t_body::<true, f32>(&x, &wf, i, o, &mut yf);
                    matmul_t_body::<true, u16>(&x, &wb, i, o, &mut yb);
                } else {
                    matmul_t_body::<false, f32>(&x, &wf, i, o, &mut yf);
                    matmul_t_body::<false, u16>(&x, &wb, i, o, &mut yb);
                }
                assert_eq!(
                    bits(&yf),
                    bits(&reference),
                    "T={t} I={i} O={o}: f32 FMA {fma}"
                );
                assert_eq!(
                    bits(&yb),
                    bits(&reference),
                    "T={t} I={i} O={o}: bf16 FMA {fma}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                let reference = one_token(true);
                let (mut yf, mut yb) = (vec![0f32; t * o], vec![0f32; t * o]);
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                unsafe {
                    matmul_t_avx2(&x, &wf, i, o, &mut yf);
                    matmul_t_avx2(&x, &wb, i, o, &mut yb);
                }
                assert_eq!(bits(&yf), bits(&reference), "T={t} I={i} O={o}: f32 AVX2");
                assert_eq!(bits(&yb), bits(&reference), "T={t} I={i} O={o}: bf16 AVX2");
            }
            if i < MATMUL_LANES {
                let reference = one_token(true);
                let (mut yf, mut yb) = (vec![0f32; t * o], vec![0f32; t * o]);
                matmul_t_narrow(&x, &wf, i, o, &mut yf);
                matmul_t_narrow(&x, &wb, i, o, &mut yb);
                assert_eq!(bits(&yf), bits(&reference), "T={t} I={i} O={o}: f32 narrow");
                assert_eq!(
                    bits(&yb),
                    bits(&reference),
                    "T={t} I={i} O={o}: bf16 narrow"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && avx2_fma() {
                let reference = one_token(true);
                let (mut yf, mut yb) = (vec![0f32; t * o], vec![0f32; t * o]);
                // SAFETY: the CPU has AVX-512F and FMA, checked just above.
                unsafe {
                    matmul_t_avx512(&x, &wf, i, o, &mut yf);
                    matmul_t_avx512(&x, &wb, i, o, &mut yb);
                }
                assert_eq!(
                    bits(&yf),
                    bits(&reference),
                    "T={t} I={i} O={o}: f32 AVX-512"
                );
                assert_eq!(
                    bits(&yb),
                    bits(&reference),
                    "T={t} I={i} O={o}: bf16 AVX-512"
                );
            } else {
                eprintln!("this CPU has no AVX-512F: its head kernel is not run here");
            }
            // The dispatched path: each token alone (as decoding) against all tokens at once.
            let mut reference = vec![0f32; t * o];
            for (xr, yr) in x.chunks_exact(i).zip(reference.chunks_exact_mut(o)) {
                matmul_t_block(xr, &wf, i, o, yr);
            }
            for pool in &pools {
                let n = pool.current_num_threads();
                let (f, b) = pool.install(|| {
                    (
                        matmul_t_fast(&x, &wf, i, o),
                        matmul_t_fast_bf16(&x, &wb, i, o),
                    )
                });
                assert_eq!(
                    bits(&f),
                    bits(&reference),
                    "T={t} I={i} O={o}: f32, {n} threads"
                );
                assert_eq!(
                    bits(&b),
                    bits(&reference),
                    "T={t} I={i} O={o}: bf16, {n} threads"
                );
            }
        }
    }

    /// The head's backward (the body, `matmul_acc`) against the plain loop, `axpy` per (v,
    /// row) in order of v with zeros of g skipped: equal bit for bit, f32 and bf16 W, the body
    /// and `matmul_acc` (this CPU's tiles) on 1 and 3 threads. Each tile kernel alone:
    /// `acc_tiles`' tests.
    /// g has zeros and y starts with some -0.0, so not skipping a zero (-0 + 0 w = +0) fails
    /// too, as would any change in the order of v.
    #[test]
    fn matmul_acc_keeps_the_axpy_order() {
        let mut rng = crate::rng::Rng::new(61);
        let pools: Vec<rayon::ThreadPool> = [1, 3]
            .iter()
            .map(|&n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .collect();
        for (t, c, v) in BLOCK_SHAPES {
            let (wf, wb) = bf16_data(v * c, &mut rng);
            let g: Vec<f32> = (0..t * v)
                .map(|k| if k % 5 == 1 { 0.0 } else { rng.normal() })
                .collect();
            let start: Vec<f32> = (0..t * c)
                .map(|k| if k % 7 == 3 { -0.0 } else { rng.normal() })
                .collect();
            let mut reference = start.clone();
            for vi in 0..v {
                for r in 0..t {
                    let a = g[r * v + vi];
                    if a != 0.0 {
                        axpy(
                            &mut reference[r * c..(r + 1) * c],
                            a,
                            &wf[vi * c..(vi + 1) * c],
                        );
                    }
                }
            }
            let (mut yf, mut yb) = (start.clone(), start.clone());
            matmul_acc_body(&g, &wf, v, c, &mut yf);
            matmul_acc_body(&g, &wb, v, c, &mut yb);
            assert_eq!(bits(&yf), bits(&reference), "T={t} C={c} V={v}: f32 body");
            assert_eq!(bits(&yb), bits(&reference), "T={t} C={c} V={v}: bf16 body");
            for pool in &pools {
                let n = pool.current_num_threads();
                let (mut yf, mut yb) = (start.clone(), start.clone());
                pool.install(|| {
                    matmul_acc(&mut yf, &g, &wf, v, c);
                    matmul_acc_bf16(&mut yb, &g, &wb, v, c);
                });
                assert_eq!(
                    bits(&yf),
                    bits(&reference),
                    "T={t} C={c} V={v}: f32, {n} threads"
                );
                assert_eq!(
                    bits(&yb),
                    bits(&reference),
                    "T={t} C={c} V={v}: bf16, {n} threads"
                );
            }
        }
    }

    /// bf16 <-> f32: exact both ways for every bf16, refused for an f32 with low bits set.
    #[test]
    fn bf16_conversions_are_exact() {
        for b in 0..=u16::MAX {
            let f = bf16_to_f32(b);
            assert_eq!(f.to_bits(), (b as u32) << 16);
            assert_eq!(f32_to_bf16_exact(f), Some(b));
            if !f.is_nan() {
                assert_eq!(f.to_bits(), half::bf16::from_bits(b).to_f32().to_bits());
            }
        }
        assert_eq!(f32_to_bf16_exact(1.0 + f32::EPSILON), None);
        assert_eq!(f32_to_bf16_exact(f32::from_bits(1)), None);
    }

    #[test]
    fn top_k_orders_and_normalises() {
        let top = top_k(&[0.0, 2.0, 1.0, 2.0], 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let all: f32 = top_k(&[0.0, 2.0, 1.0, 2.0], 4).iter().map(|t| t.1).sum();
        assert!((all - 1.0).abs() < 1e-6);
    }
}
