//! Ternary weights and int8 activations, exactly as transformers' BitNet integration computes
//! them (`transformers/integrations/bitnet.py`: `WeightQuant`, `ActQuant`, `BitLinear`,
//! `pack_weights` / `unpack_weights`).
//!
//! Maths (per tensor for weights, per token for activations):
//! - weights: `s_w = 1 / max(mean|W|, 1e-5)`, `T = clamp(round(W * s_w), -1, 1)`
//! - activations: `s_a = 127 / max(max|x|, 1e-5)`, `x_q = clamp(round(x * s_a), -128, 127)`
//! - BitLinear: `y = (x_q . T^T) / (s_a * s_w)`; the integer product is exact (i32), only the
//!   final scaling is floating point, so every backend must agree on `x_q . T^T` bit for bit.
//!
//! Rounding is half-to-even like `torch.round` (`f32::round_ties_even`, not `f32::round`).
//!
//! Packed layout (transformers `pack_weights`): a (O, I) ternary matrix is stored as u8
//! (ceil(O/4), I); byte (p, i) holds the codes (value + 1, in 0..=2) of rows
//! p, p + O4, p + 2*O4, p + 3*O4 (O4 = ceil(O/4)) in bits 0-1, 2-3, 4-5, 6-7. HF checkpoints
//! always have O % 4 == 0; for other O the missing rows are padding with value 0 (code 1).

use rayon::prelude::*;

/// Lower bounds transformers clamps `mean|W|` and `max|x|` to before dividing.
pub const QUANT_EPS: f32 = 1e-5;

/// A frozen BitLinear layer: ternary weight (O, I), packed, plus its per-tensor scale.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryLinear {
    pub out_features: usize, // O
    pub in_features: usize,  // I
    /// (ceil(O/4), I) packed 2-bit codes, HF layout (module doc).
    pub packed: Vec<u8>,
    /// `s_w` with `W = T / s_w`, so `y = acc / (s_a * s_w)`.
    pub w_scale: f32,
}

impl TernaryLinear {
    /// Quantizes full-precision master weights (O, I) row-major, as `WeightQuant`.
    pub fn from_master(w: &[f32], out_features: usize, in_features: usize) -> TernaryLinear {
        assert_eq!(
            w.len(),
            out_features * in_features,
            "from_master: W is not (O, I)"
        );
        let (t, w_scale) = quantize_weights(w);
        TernaryLinear {
            out_features,
            in_features,
            packed: pack_ternary(&t, out_features, in_features),
            w_scale,
        }
    }

    /// Number of packed rows, ceil(O/4).
    pub fn packed_rows(&self) -> usize {
        self.out_features.div_ceil(4)
    }

    /// The ternary matrix (O, I) as i8 in {-1, 0, 1}.
    pub fn unpack(&self) -> Vec<i8> {
        unpack_ternary(&self.packed, self.out_features, self.in_features)
    }

    /// BitLinear forward: x (T, I) -> y (T, O), quantizing each row of x to int8.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (o, i) = (self.out_features, self.in_features);
        assert_eq!(x.len() % i, 0, "BitLinear: x is not (T, {i})");
        let t = x.len() / i;
        let (xq, s_a) = quantize_activations(x, i);
        let acc = ternary_matmul_fast(&xq, &self.packed, t, i, o);
        let mut y = vec![0f32; t * o];
        crate::par::rows(&mut y, o.max(1), 4, |r0, block| {
            for (k, yr) in block.chunks_exact_mut(o).enumerate() {
                let r = r0 + k;
                let denom = s_a[r] * self.w_scale;
                for (yv, &a) in yr.iter_mut().zip(&acc[r * o..(r + 1) * o]) {
                    *yv = a as f32 / denom;
                }
            }
        });
        y
    }
}

/// Absmean ternary quantization of a whole tensor: returns (T in {-1,0,1}, s_w).
/// The mean is accumulated in f64 so the result does not depend on summation order beyond
/// f32 rounding of the final value (the reference computes it in f32 with a tree reduction;
/// the two agree to within one ulp of s_w).
pub fn quantize_weights(w: &[f32]) -> (Vec<i8>, f32) {
    let mean = (w.iter().map(|&v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let s_w = 1.0 / mean.max(QUANT_EPS);
    let t = w
        .par_iter()
        .map(|&v| (v * s_w).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (t, s_w)
}

/// Per-token absmax int8 quantization of x (T, C): returns (x_q (T, C), s_a (T)).
pub fn quantize_activations(x: &[f32], c: usize) -> (Vec<i8>, Vec<f32>) {
    assert!(
        c > 0 && x.len().is_multiple_of(c),
        "quantize_activations: x is not (T, {c})"
    );
    let t = x.len() / c;
    let mut xq = vec![0i8; x.len()];
    let mut scales = vec![0f32; t];
    // Rows on separate threads (each row alone).
    xq.par_chunks_mut(c)
        .zip(scales.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(4)
        .for_each(|((q, s_a), row)| {
            // The SIMD128 wasm has a hand-written twin: there the scalar loop's f32::max is a call
            // to fmaxf per element (wasm's f32.max propagates NaN, Rust's ignores it), and the
            // conversion to i8 went lane by lane (measured in node, the default model's seven
            // inputs at T = 32: 0.11 ms a layer against 0.83).
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            {
                *s_a = quantize_row_simd128(row, q);
            }
            #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
            {
                *s_a = quantize_row(row, q);
            }
        });
    (xq, scales)
}

/// One token of [`quantize_activations`]: writes x_q into `q`, returns s_a.
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128", not(test)),
    allow(dead_code)
)]
fn quantize_row(row: &[f32], q: &mut [i8]) -> f32 {
    let s_a = activation_scale(row);
    for (q, &v) in q.iter_mut().zip(row) {
        *q = round_half_even_small(v * s_a).clamp(-128.0, 127.0) as i8;
    }
    s_a
}

/// [`quantize_row`] in WASM SIMD128, equal to it bit for bit, NaN and infinities included:
/// - absmax: `f32x4.pmax(m, |v|)` is `m < |v| ? |v| : m`, so a NaN leaves m as `f32::max`
///   does (m starts at +0 and never holds NaN); max over non-NaN values is exact, so lanes
///   and order do not matter.
/// - x_q: the same multiply, add and subtract of 1.5 * 2^23 as `round_half_even_small`;
///   `clamp` is `x < -128 ? -128 : x` then `127 < x ? 127 : x`, which are `pmax(x, -128)` and
///   `pmin(x, 127)` with x first (a NaN stays NaN), and `trunc_sat` makes NaN 0 as `as i8`
///   does; the in-range integers then narrow to i8 exactly.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn quantize_row_simd128(row: &[f32], q: &mut [i8]) -> f32 {
    use core::arch::wasm32::*;
    assert_eq!(
        q.len(),
        row.len(),
        "quantize_row_simd128: x_q and x differ in length"
    );
    let n = row.len();
    let (n4, n16) = (n - n % 4, n - n % 16);
    // SAFETY (every load below): k + 4 <= n4 <= n = row.len(); v128_load is unaligned.
    let load = |k: usize| unsafe { v128_load(row.as_ptr().add(k) as *const v128) };
    let mut m = f32x4_splat(0.0);
    for k in (0..n4).step_by(4) {
        m = f32x4_pmax(m, f32x4_abs(load(k)));
    }
    let lanes = [
        f32x4_extract_lane::<0>(m),
        f32x4_extract_lane::<1>(m),
        f32x4_extract_lane::<2>(m),
        f32x4_extract_lane::<3>(m),
    ];
    let absmax = row[n4..]
        .iter()
        .fold(lanes.into_iter().fold(0f32, f32::max), |m, &v| {
            m.max(v.abs())
        });
    let s_a = 127.0 / absmax.max(QUANT_EPS);
    let (scale, magic) = (f32x4_splat(s_a), f32x4_splat(12_582_912.0)); // 1.5 * 2^23
    let (lo, hi) = (f32x4_splat(-128.0), f32x4_splat(127.0));
    let quant = |v: v128| -> v128 {
        let r = f32x4_sub(f32x4_add(f32x4_mul(v, scale), magic), magic);
        i32x4_trunc_sat_f32x4(f32x4_pmin(f32x4_pmax(r, lo), hi))
    };
    for k in (0..n16).step_by(16) {
        let a = i16x8_narrow_i32x4(quant(load(k)), quant(load(k + 4)));
        let b = i16x8_narrow_i32x4(quant(load(k + 8)), quant(load(k + 12)));
        // SAFETY: k + 16 <= n16 <= q.len() (= row.len()); v128_store is unaligned.
        unsafe { v128_store(q.as_mut_ptr().add(k) as *mut v128, i8x16_narrow_i16x8(a, b)) };
    }
    for (q, &v) in q[n16..].iter_mut().zip(&row[n16..]) {
        *q = round_half_even_small(v * s_a).clamp(-128.0, 127.0) as i8;
    }
    s_a
}

/// `round_ties_even(x)` for |x| <= 2^22, by adding and subtracting 1.5 * 2^23: the sum lands
/// where f32 has no fraction bits, so the hardware's round-to-nearest-even does the rounding.
/// Unlike `f32::round_ties_even`, which is a libm call on baseline x86-64, this vectorises.
/// Activations always qualify: |x * s_a| <= 127 by the choice of s_a.
#[inline(always)]
pub fn round_half_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

/// `s_a = 127 / max(max|x|, 1e-5)` for one token.
pub fn activation_scale(row: &[f32]) -> f32 {
    let absmax = row.iter().fold(0f32, |m, &v| m.max(v.abs()));
    127.0 / absmax.max(QUANT_EPS)
}

/// Packs a ternary (O, I) matrix into the HF layout (ceil(O/4), I). See the module doc.
pub fn pack_ternary(t: &[i8], out_features: usize, in_features: usize) -> Vec<u8> {
    assert_eq!(
        t.len(),
        out_features * in_features,
        "pack_ternary: T is not (O, I)"
    );
    let o4 = out_features.div_ceil(4);
    // Code 1 (value 0) everywhere, so padding rows read back as zeros.
    let mut packed = vec![0b0101_0101u8; o4 * in_features];
    // Packed row p holds rows p, p + o4, p + 2 o4, p + 3 o4 (slots 0..4): rows in parallel.
    packed
        .par_chunks_mut(in_features.max(1))
        .enumerate()
        .for_each(|(p, row)| {
            for slot in 0..4 {
                let r = p + slot * o4;
                if r >= out_features {
                    break;
                }
                for (i, byte) in row.iter_mut().enumerate() {
                    let code = (t[r * in_features + i] + 1) as u8;
                    *byte = (*byte & !(3 << (2 * slot))) | (code << (2 * slot));
                }
            }
        });
    packed
}

/// Inverse of [`pack_ternary`]. A code of 3 (never written by a packer) reads as +2, as in
/// transformers' `unpack_weights`; loaders reject such tensors before they get here.
pub fn unpack_ternary(packed: &[u8], out_features: usize, in_features: usize) -> Vec<i8> {
    let o4 = out_features.div_ceil(4);
    assert_eq!(
        packed.len(),
        o4 * in_features,
        "unpack_ternary: packed is not (ceil(O/4), I)"
    );
    let mut t = vec![0i8; out_features * in_features];
    for r in 0..out_features {
        let (p, slot) = (r % o4, r / o4);
        for i in 0..in_features {
            t[r * in_features + i] = ((packed[p * in_features + i] >> (2 * slot)) & 3) as i8 - 1;
        }
    }
    t
}

/// The exact integer product acc (T, O) = x_q (T, I) . T^T, reading the packed weights directly.
/// This is the CPU reference every fast path (SIMD, GPU) is checked against, bit for bit.
pub fn ternary_matmul_packed(xq: &[i8], packed: &[u8], t: usize, i: usize, o: usize) -> Vec<i32> {
    let o4 = o.div_ceil(4);
    assert_eq!(xq.len(), t * i, "ternary_matmul_packed: x_q is not (T, I)");
    assert_eq!(
        packed.len(),
        o4 * i,
        "ternary_matmul_packed: packed is not (ceil(O/4), I)"
    );
    let mut acc = vec![0i32; t * o];
    for r in 0..t {
        let x = &xq[r * i..(r + 1) * i];
        for oc in 0..o {
            let (p, shift) = (oc % o4, 2 * (oc / o4));
            let w = &packed[p * i..(p + 1) * i];
            let mut sum = 0i32;
            for (&xv, &b) in x.iter().zip(w) {
                sum += xv as i32 * (((b >> shift) & 3) as i32 - 1);
            }
            acc[r * o + oc] = sum;
        }
    }
    acc
}

/// Each token's sum of its int8 activations: the kernels multiply by the codes (weights + 1)
/// and subtract this.
fn token_sums(xq: &[i8], i: usize) -> Vec<i32> {
    xq.chunks_exact(i)
        .map(|x| x.iter().map(|&v| v as i32).sum())
        .collect()
}

/// The fast CPU path of [`ternary_matmul_packed`], equal to it bit for bit. Each packed byte
/// holds one column of four rows a quarter of the matrix apart, so the four rows are computed
/// together: every weight byte is loaded once, and the inner loop is branch-free byte
/// arithmetic that the compiler vectorises. Natively on x86-64 the same body is compiled a
/// second time with AVX2 and chosen at run time (measured 3.8x over the SSE2 build on the
/// 125m shapes); in the SIMD128 wasm a hand-written kernel replaces it (the compiler's
/// vectorisation there moved bytes lane by lane).
pub fn ternary_matmul_fast(xq: &[i8], packed: &[u8], t: usize, i: usize, o: usize) -> Vec<i32> {
    let o4 = o.div_ceil(4);
    assert_eq!(xq.len(), t * i, "ternary_matmul_fast: x_q is not (T, I)");
    assert_eq!(
        packed.len(),
        o4 * i,
        "ternary_matmul_fast: packed is not (ceil(O/4), I)"
    );
    let mut acc = vec![0i32; t * o];
    let threads = rayon::current_num_threads();
    if threads > 1 && t < 4 * threads && o4 >= 2 * threads {
        // Few tokens (decoding: one): blocks of tokens would leave threads idle, so the
        // packed rows of W are split between the threads instead; each streams its share of
        // W once. The sums are the same integers either way.
        let per = o4.div_ceil(threads);
        let starts: Vec<usize> = (0..o4).step_by(per).collect();
        let parts: Vec<Vec<(usize, i32)>> = starts
            .into_par_iter()
            .map(|p0| {
                let ps = p0..(p0 + per).min(o4);
                let mut part = Vec::with_capacity(4 * t * ps.len());
                ternary_matmul_block(xq, packed, i, o, ps, |r, row, v| {
                    part.push((r * o + row, v))
                });
                part
            })
            .collect();
        for (k, v) in parts.into_iter().flatten() {
            acc[k] = v;
        }
        return acc;
    }
    // Blocks of tokens on separate threads; each block streams the packed weight once.
    crate::par::rows(&mut acc, o, 4, |r0, out| {
        let rows = out.len() / o.max(1);
        ternary_matmul_block(
            &xq[r0 * i..(r0 + rows) * i],
            packed,
            i,
            o,
            0..o4,
            |r, row, v| out[r * o + row] = v,
        )
    });
    acc
}

/// [`ternary_matmul_fast`] on a block of tokens `xq` (rows, I) and the packed rows `ps` of W:
/// `store(r, row, acc)` for each token r and output row of those packed rows.
fn ternary_matmul_block(
    xq: &[i8],
    packed: &[u8],
    i: usize,
    o: usize,
    ps: std::ops::Range<usize>,
    store: impl FnMut(usize, usize, i32),
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            // SAFETY: the CPU has AVX-512F, BW and VNNI, checked just above.
            return unsafe { ternary_matmul_vnni(xq, packed, i, o, ps, store) };
        }
        if has!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { ternary_matmul_avx2(xq, packed, i, o, ps, store) };
        }
    }
    // The page's CPU fallback is built with +simd128 (tools/build-web.sh), so this is decided
    // at compile time: wasm has no run-time feature detection, and a module that uses SIMD128
    // does not validate where it is missing.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    ternary_matmul_simd128(xq, packed, i, o, ps, store);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    ternary_matmul_body(xq, packed, i, o, ps, store)
}

/// The AVX2 kernel: per 32 input columns, the four rows' codes (0..=2) come out of the packed
/// bytes with a shift and a mask, and `vpmaddubsw` multiplies them with 32 int8 activations and
/// adds neighbouring pairs (|2 * 2 * 128| = 512 cannot saturate i16), `vpmaddwd` widens to i32.
/// 128 exact multiply-adds in about a dozen instructions; equal to the body bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn ternary_matmul_avx2(
    xq: &[i8],
    packed: &[u8],
    i: usize,
    o: usize,
    ps: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, i32),
) {
    use std::arch::x86_64::*;
    let o4 = o.div_ceil(4);
    let t = xq.len() / i.max(1);
    let n32 = i - i % 32;
    let xsum = token_sums(xq, i);
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let hsum = |v: __m256i| -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    };
    for p in ps {
        let w = &packed[p * i..(p + 1) * i];
        for r in 0..t {
            let x = &xq[r * i..(r + 1) * i];
            let mut s = [_mm256_setzero_si256(); 4];
            for k in (0..n32).step_by(32) {
                // SAFETY: k + 32 <= n32 <= i = w.len() = x.len(); unaligned loads.
                let (b, xv) = unsafe {
                    (
                        _mm256_loadu_si256(w.as_ptr().add(k) as *const __m256i),
                        _mm256_loadu_si256(x.as_ptr().add(k) as *const __m256i),
                    )
                };
                let codes = [
                    _mm256_and_si256(b, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask),
                ];
                for (acc, c) in s.iter_mut().zip(codes) {
                    let pairs = _mm256_maddubs_epi16(c, xv);
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(pairs, ones));
                }
            }
            let mut sums = s.map(hsum);
            for (&xv, &b) in x[n32..].iter().zip(&w[n32..]) {
                let (xv, b) = (xv as i32, b as i32);
                sums[0] += xv * (b & 3);
                sums[1] += xv * ((b >> 2) & 3);
                sums[2] += xv * ((b >> 4) & 3);
                sums[3] += xv * ((b >> 6) & 3);
            }
            for (slot, &sum) in sums.iter().enumerate() {
                let row = slot * o4 + p;
                if row < o {
                    store(r, row, sum - xsum[r]);
                }
            }
        }
    }
}

/// The AVX-512 VNNI kernel: per 64 input columns the packed bytes are loaded once and their
/// four rows' codes (0..=2) taken out with a 16-bit shift and a mask; `vpdpbusd` multiplies
/// 64 unsigned codes by 64 int8 activations and adds each group of four products into an i32
/// lane (no saturation: a lane gains at most 4 * 2 * 128 a step), for [`VNNI_TOKENS`] tokens
/// from the same codes. The last I % 64 columns are read with masked loads (zeros add
/// nothing), so there is no scalar tail. Then, as every kernel: sum - sum(x) per row (the codes
/// are the weights plus one). The same integers as the body, so equal to it bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn ternary_matmul_vnni(
    xq: &[i8],
    packed: &[u8],
    i: usize,
    o: usize,
    ps: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, i32),
) {
    let t = xq.len() / i.max(1);
    let xsum = token_sums(xq, i);
    let grouped = t - t % VNNI_TOKENS;
    for p in ps {
        for r in (0..grouped).step_by(VNNI_TOKENS) {
            vnni::rows::<VNNI_TOKENS>(xq, packed, i, o, p, r, &xsum, &mut store);
        }
        for r in grouped..t {
            vnni::rows::<1>(xq, packed, i, o, p, r, &xsum, &mut store);
        }
    }
}

/// Tokens that [`ternary_matmul_vnni`] runs from one pass over a packed row's codes.
#[cfg(target_arch = "x86_64")]
const VNNI_TOKENS: usize = 4;

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// The four rows of packed row `p` for tokens `r..r + N`: 4 N accumulators of 16 lanes.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn rows<const N: usize>(
        xq: &[i8],
        packed: &[u8],
        i: usize,
        o: usize,
        p: usize,
        r: usize,
        xsum: &[i32],
        store: &mut impl FnMut(usize, usize, i32),
    ) {
        let o4 = o.div_ceil(4);
        let w = &packed[p * i..(p + 1) * i];
        let x = &xq[r * i..(r + N) * i];
        let mask = _mm512_set1_epi8(3);
        let mut acc = [[_mm512_setzero_si512(); 4]; N];
        for k in (0..i).step_by(64) {
            let m: __mmask64 = if i - k >= 64 {
                !0
            } else {
                (1u64 << (i - k)) - 1
            };
            // SAFETY: the mask covers columns k..min(k + 64, i) only, inside w and each row of x.
            let b = unsafe { _mm512_maskz_loadu_epi8(m, w.as_ptr().add(k) as *const i8) };
            let codes = [
                _mm512_and_si512(b, mask),
                _mm512_and_si512(_mm512_srli_epi16::<2>(b), mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(b), mask),
                _mm512_and_si512(_mm512_srli_epi16::<6>(b), mask),
            ];
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above, row j of x.
                let xv = unsafe { _mm512_maskz_loadu_epi8(m, x.as_ptr().add(j * i + k)) };
                for (a, &c) in acc.iter_mut().zip(&codes) {
                    *a = _mm512_dpbusd_epi32(*a, c, xv);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let sums = hsum4(acc);
            for (slot, &sum) in sums.iter().enumerate() {
                let row = slot * o4 + p;
                if row < o {
                    store(r + j, row, sum - xsum[r + j]);
                }
            }
        }
    }

    /// The lane sums of four vectors (exact: i32 additions of a sum that fits).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum4(v: &[__m512i; 4]) -> [i32; 4] {
        let q = v.map(|z| {
            let y = _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64::<1>(z));
            _mm_add_epi32(_mm256_castsi256_si128(y), _mm256_extracti128_si256::<1>(y))
        });
        let h = _mm_hadd_epi32(_mm_hadd_epi32(q[0], q[1]), _mm_hadd_epi32(q[2], q[3]));
        let mut out = [0i32; 4];
        // SAFETY: out holds 4 i32.
        unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, h) };
        out
    }
}

/// The WASM SIMD128 kernel, the same sums as the body: per 16 input columns the packed bytes
/// and the int8 activations are widened to two i16x8 halves each, the four rows' codes (0..=3)
/// come out of the widened bytes with a 16-bit shift and a mask, and `i32x4.dot_i16x8_s`
/// multiplies them with the activations and adds neighbouring pairs straight into i32 lanes
/// (exact: a step adds at most 2 * 3 * 128 to a lane). Why 16-bit lanes and not bytes: x86 has
/// no byte shift, so engines emulate `i8x16.shr_u` (and the i8 extending multiplies) with
/// several instructions, where `i16x8.shr_u`, `v128.and` and `i32x4.dot_i16x8_s` are one x86
/// instruction each (psrlw, pand, pmaddwd). 64 exact multiply-adds in about 35 wasm
/// instructions. The auto-vectorised body kept the four rows in the lanes of one i32x4 and
/// moved bytes lane by lane (extract_lane / replace_lane): measured in node on the default
/// model's seven projections (T = 32), 3.5 ms a layer here against 6.0 for the body. Two
/// tokens per pass over the codes measured no faster. Relaxed-simd's i8 dot (the codes would
/// fit its 7-bit operand) is not used: a module that uses it does not validate in a browser
/// without relaxed-simd, and wasm cannot test for a feature inside one module, so it would
/// need a third build. Equal to the body bit for bit (quant.rs `simd128_tests`).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn ternary_matmul_simd128(
    xq: &[i8],
    packed: &[u8],
    i: usize,
    o: usize,
    ps: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, i32),
) {
    use core::arch::wasm32::*;
    let o4 = o.div_ceil(4);
    let t = xq.len() / i.max(1);
    let n16 = i - i % 16;
    let xsum = token_sums(xq, i);
    let mask = u16x8_splat(3);
    let hsum = |v: v128| -> i32 {
        i32x4_extract_lane::<0>(v)
            + i32x4_extract_lane::<1>(v)
            + i32x4_extract_lane::<2>(v)
            + i32x4_extract_lane::<3>(v)
    };
    for p in ps {
        let w = &packed[p * i..(p + 1) * i];
        for r in 0..t {
            let x = &xq[r * i..(r + 1) * i];
            let mut s = [i32x4_splat(0); 4];
            for k in (0..n16).step_by(16) {
                // SAFETY: k + 16 <= n16 <= i = w.len() = x.len(); v128_load is unaligned.
                let (b, xv) = unsafe {
                    (
                        v128_load(w.as_ptr().add(k) as *const v128),
                        v128_load(x.as_ptr().add(k) as *const v128),
                    )
                };
                // Bytes 0..8 and 8..16 as u16 (the weights) and i16 (the activations).
                let (b0, b1) = (u16x8_extend_low_u8x16(b), u16x8_extend_high_u8x16(b));
                let (x0, x1) = (i16x8_extend_low_i8x16(xv), i16x8_extend_high_i8x16(xv));
                // Slot 0 needs no shift, slot 3 no mask (a byte >> 6 is at most 3).
                let codes = [
                    (v128_and(b0, mask), v128_and(b1, mask)),
                    (
                        v128_and(u16x8_shr(b0, 2), mask),
                        v128_and(u16x8_shr(b1, 2), mask),
                    ),
                    (
                        v128_and(u16x8_shr(b0, 4), mask),
                        v128_and(u16x8_shr(b1, 4), mask),
                    ),
                    (u16x8_shr(b0, 6), u16x8_shr(b1, 6)),
                ];
                for (acc, (c0, c1)) in s.iter_mut().zip(codes) {
                    let d = i32x4_add(i32x4_dot_i16x8(x0, c0), i32x4_dot_i16x8(x1, c1));
                    *acc = i32x4_add(*acc, d);
                }
            }
            let mut sums = s.map(hsum);
            for (&xv, &b) in x[n16..].iter().zip(&w[n16..]) {
                let (xv, b) = (xv as i32, b as i32);
                sums[0] += xv * (b & 3);
                sums[1] += xv * ((b >> 2) & 3);
                sums[2] += xv * ((b >> 4) & 3);
                sums[3] += xv * ((b >> 6) & 3);
            }
            for (slot, &sum) in sums.iter().enumerate() {
                let row = slot * o4 + p;
                if row < o {
                    store(r, row, sum - xsum[r]);
                }
            }
        }
    }
}

/// dot(x, T) = dot(x, code) - sum(x) with code = T + 1 in 0..=2, so the inner loop is one
/// multiply-add per row; sum(x) is taken once per token. In the SIMD128 wasm it is only the
/// twin the wasm tests compare the kernel with.
#[inline(always)]
#[cfg_attr(
    all(target_arch = "wasm32", target_feature = "simd128", not(test)),
    allow(dead_code)
)]
fn ternary_matmul_body(
    xq: &[i8],
    packed: &[u8],
    i: usize,
    o: usize,
    ps: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, i32),
) {
    let o4 = o.div_ceil(4);
    let t = xq.len() / i.max(1);
    let xsum = token_sums(xq, i);
    for p in ps {
        let w = &packed[p * i..(p + 1) * i];
        for r in 0..t {
            let x = &xq[r * i..(r + 1) * i];
            let mut sums = [0i32; 4];
            for (&xv, &b) in x.iter().zip(w) {
                let xv = xv as i32;
                let b = b as i32;
                sums[0] += xv * (b & 3);
                sums[1] += xv * ((b >> 2) & 3);
                sums[2] += xv * ((b >> 4) & 3);
                sums[3] += xv * ((b >> 6) & 3);
            }
            for (slot, &sum) in sums.iter().enumerate() {
                let row = slot * o4 + p;
                if row < o {
                    store(r, row, sum - xsum[r]);
                }
            }
        }
    }
}

/// Naive twin of [`ternary_matmul_packed`] on an unpacked i8 matrix (O, I).
pub fn ternary_matmul_unpacked(xq: &[i8], w: &[i8], t: usize, i: usize, o: usize) -> Vec<i32> {
    let mut acc = vec![0i32; t * o];
    for r in 0..t {
        for oc in 0..o {
            acc[r * o + oc] = (0..i)
                .map(|k| xq[r * i + k] as i32 * w[oc * i + k] as i32)
                .sum();
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn rounding_is_half_to_even() {
        // 0.5 * s rounds to 0, 1.5 to 2, -2.5 to -2: torch.round semantics.
        let (q, s) = quantize_activations(&[127.0, 0.5, 1.5, -2.5], 4);
        assert_eq!(s, vec![1.0]);
        assert_eq!(q, vec![127, 0, 2, -2]);
    }

    #[test]
    fn magic_rounding_equals_round_ties_even() {
        let mut rng = Rng::new(17);
        let halves = (-300..=300).map(|k| k as f32 * 0.5);
        let randoms: Vec<f32> = (0..100_000)
            .map(|_| (rng.uniform() - 0.5) * 300.0)
            .collect();
        let near: Vec<f32> = (0..10_000)
            .map(|_| (rng.below(255) as f32 - 127.0) + 0.5 + (rng.uniform() - 0.5) * 1e-5)
            .collect();
        for x in halves
            .chain(randoms)
            .chain(near)
            .chain([0.0, -0.0, 127.0, -128.0, 4194304.0, -4194303.5])
        {
            assert_eq!(round_half_even_small(x), x.round_ties_even(), "x = {x:e}");
        }
    }

    #[test]
    fn zero_rows_use_the_epsilon() {
        let (q, s) = quantize_activations(&[0.0; 3], 3);
        assert_eq!(q, vec![0; 3]);
        assert_eq!(s, vec![127.0 / QUANT_EPS]);
        let (t, sw) = quantize_weights(&[0.0; 8]);
        assert_eq!(t, vec![0; 8]);
        assert_eq!(sw, 1.0 / QUANT_EPS);
    }

    #[test]
    fn weight_quant_matches_the_formula() {
        // mean|W| = 0.5 -> s_w = 2: 0.2*2=0.4->0, 0.3*2=0.6->1, -0.25*2=-0.5->-0 (even), 1.25*2->1
        let (t, s) = quantize_weights(&[0.2, 0.3, -0.25, 1.25]);
        assert_eq!(s, 2.0);
        assert_eq!(t, vec![0, 1, 0, 1]);
    }

    #[test]
    fn pack_matches_transformers_layout() {
        // O = 8, I = 1: byte p holds rows p, p+2, p+4, p+6 in bit pairs 0,1,2,3.
        let t: Vec<i8> = vec![-1, 0, 1, 1, 0, -1, 1, -1];
        let packed = pack_ternary(&t, 8, 1);
        // row0=-1 (0), row2=1 (2), row4=0 (1), row6=1 (2) -> 0b10_01_10_00
        assert_eq!(packed[0], 0b10_01_10_00);
        // row1=0 (1), row3=1 (2), row5=-1 (0), row7=-1 (0) -> 0b00_00_10_01
        assert_eq!(packed[1], 0b00_00_10_01);
        assert_eq!(unpack_ternary(&packed, 8, 1), t);
    }

    #[test]
    fn pack_round_trips_awkward_shapes() {
        let mut rng = Rng::new(7);
        for (o, i) in [(1, 1), (3, 5), (37, 1000), (64, 64), (101, 7)] {
            let t: Vec<i8> = (0..o * i).map(|_| rng.below(3) as i8 - 1).collect();
            assert_eq!(
                unpack_ternary(&pack_ternary(&t, o, i), o, i),
                t,
                "O={o} I={i}"
            );
        }
    }

    /// The ternary product three ways: packed kernel, unpacked scalar, dense f32. All exact.
    #[test]
    fn ternary_matmul_three_ways() {
        let mut rng = Rng::new(11);
        for (t, i, o) in [
            (1, 1, 1),
            (37, 1000, 37),
            (5, 129, 64),
            (3, 4096, 10),
            (2, 7, 5),
            (1, 3, 2),
        ] {
            let w: Vec<i8> = (0..o * i).map(|_| rng.below(3) as i8 - 1).collect();
            let x: Vec<i8> = (0..t * i)
                .map(|_| (rng.below(256) as i32 - 128) as i8)
                .collect();
            let packed = ternary_matmul_packed(&x, &pack_ternary(&w, o, i), t, i, o);
            let unpacked = ternary_matmul_unpacked(&x, &w, t, i, o);
            assert_eq!(packed, unpacked, "packed vs unpacked, T={t} I={i} O={o}");
            let fast = ternary_matmul_fast(&x, &pack_ternary(&w, o, i), t, i, o);
            assert_eq!(fast, packed, "fast vs packed, T={t} I={i} O={o}");
            // Dense f32: exact while |acc| < 2^24, i.e. I * 128 < 2^24.
            for r in 0..t {
                for c in 0..o {
                    let dense: f32 = (0..i)
                        .map(|k| x[r * i + k] as f32 * w[c * i + k] as f32)
                        .sum();
                    assert_eq!(dense, packed[r * o + c] as f32, "dense f32 at ({r},{c})");
                }
            }
        }
    }

    /// Property: the fast path equals the reference on random shapes. A failure prints the
    /// case; reproduce it by adding the shape to `ternary_matmul_three_ways`.
    #[test]
    fn fast_path_equals_reference_on_random_shapes() {
        let mut rng = Rng::new(2026);
        for case in 0..60 {
            let (t, i, o) = (
                1 + rng.below(9) as usize,
                1 + rng.below(300) as usize,
                1 + rng.below(70) as usize,
            );
            let w: Vec<i8> = (0..o * i).map(|_| rng.below(3) as i8 - 1).collect();
            let x: Vec<i8> = (0..t * i)
                .map(|_| (rng.below(256) as i32 - 128) as i8)
                .collect();
            let p = pack_ternary(&w, o, i);
            assert_eq!(
                ternary_matmul_fast(&x, &p, t, i, o),
                ternary_matmul_packed(&x, &p, t, i, o),
                "case {case}: T={t} I={i} O={o}"
            );
        }
    }

    /// Each x86-64 kernel this CPU has (AVX2; AVX-512 VNNI), called directly, equals the body
    /// on random shapes (I across the 32- and 64-column steps, T across the token groups) and
    /// on a range of packed rows that starts past 0.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_x86_kernel_equals_the_body() {
        use std::arch::is_x86_feature_detected as has;
        type Kernel =
            fn(&[i8], &[u8], usize, usize, std::ops::Range<usize>, &mut Vec<(usize, usize, i32)>);
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        assert!(has!("avx2"), "the x86-64 test machines have AVX2");
        // SAFETY (both): the CPU has the kernel's features, checked before it is listed.
        kernels.push(("avx2", |x, p, i, o, ps, out| unsafe {
            ternary_matmul_avx2(x, p, i, o, ps, |r, row, v| out.push((r, row, v)))
        }));
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            kernels.push(("vnni", |x, p, i, o, ps, out| unsafe {
                ternary_matmul_vnni(x, p, i, o, ps, |r, row, v| out.push((r, row, v)))
            }));
        } else {
            eprintln!("this CPU has no AVX-512 VNNI: that kernel is not run here");
        }
        let mut rng = Rng::new(77);
        let mut shapes: Vec<(usize, usize, usize)> = vec![(9, 4160, 13), (1, 64, 4), (5, 127, 6)];
        shapes.extend((0..40).map(|_| {
            (
                1 + rng.below(11) as usize,
                1 + rng.below(400) as usize,
                1 + rng.below(40) as usize,
            )
        }));
        for (t, i, o) in shapes {
            let w: Vec<i8> = (0..o * i).map(|_| rng.below(3) as i8 - 1).collect();
            let x: Vec<i8> = (0..t * i)
                .map(|_| (rng.below(256) as i32 - 128) as i8)
                .collect();
            let p = pack_ternary(&w, o, i);
            let o4 = o.div_ceil(4);
            let ps = o4 / 3..o4;
            let mut want = Vec::new();
            ternary_matmul_body(&x, &p, i, o, ps.clone(), |r, row, v| want.push((r, row, v)));
            want.sort_unstable();
            for (name, kernel) in &kernels {
                let mut got = Vec::new();
                kernel(&x, &p, i, o, ps.clone(), &mut got);
                got.sort_unstable();
                assert_eq!(got, want, "{name}: T={t} I={i} O={o} rows {ps:?}");
            }
        }
    }

    /// The extremes: every activation -128 against every weight +1 (the largest products the
    /// SIMD kernels' 16-bit pair sums see), and against -1.
    #[test]
    fn fast_path_holds_at_the_extremes() {
        for wv in [1i8, -1] {
            let (t, i, o) = (3, 4128, 9);
            let w = vec![wv; o * i];
            let x = vec![-128i8; t * i];
            let p = pack_ternary(&w, o, i);
            let fast = ternary_matmul_fast(&x, &p, t, i, o);
            assert_eq!(fast, ternary_matmul_packed(&x, &p, t, i, o));
            assert_eq!(fast[0], -128 * i as i32 * wv as i32);
        }
    }

    #[test]
    fn bitlinear_forward_matches_dequantized_matmul() {
        let mut rng = Rng::new(3);
        let (t, i, o) = (4, 33, 12);
        let w: Vec<f32> = (0..o * i).map(|_| rng.normal() * 0.02).collect();
        let x: Vec<f32> = (0..t * i).map(|_| rng.normal()).collect();
        let lin = TernaryLinear::from_master(&w, o, i);
        let y = lin.forward(&x);
        let (xq, sa) = quantize_activations(&x, i);
        let tw = lin.unpack();
        for r in 0..t {
            for c in 0..o {
                let deq: f64 = (0..i)
                    .map(|k| {
                        (xq[r * i + k] as f64 / sa[r] as f64)
                            * (tw[c * i + k] as f64 / lin.w_scale as f64)
                    })
                    .sum();
                let got = y[r * o + c] as f64;
                assert!(
                    (got - deq).abs() <= 1e-5 * (1.0 + deq.abs()),
                    "({r},{c}) {got} vs {deq}"
                );
            }
        }
    }
}

/// The SIMD128 kernel against its scalar twin, run in wasm (node) by tools/test.sh:
/// `RUSTFLAGS='-C target-feature=+simd128' cargo test -p bitlora-core --target
/// wasm32-unknown-unknown --lib simd128` with `wasm-bindgen-test-runner` as the runner. Native
/// `cargo test` does not build this module; in wasm only these `#[wasm_bindgen_test]`s run.
#[cfg(all(test, target_arch = "wasm32"))]
mod simd128_tests {
    use super::*;
    use crate::rng::Rng;
    use std::ops::Range;
    use wasm_bindgen_test::wasm_bindgen_test;

    /// Without +simd128 the tests below would not be built and nothing would be compared: that
    /// build fails here instead (a const assertion), and this test makes the count nonzero.
    #[wasm_bindgen_test]
    fn built_with_simd128() {
        const {
            assert!(
                cfg!(target_feature = "simd128"),
                "build the wasm tests with RUSTFLAGS='-C target-feature=+simd128'"
            )
        };
    }

    /// A ternary kernel: (x_q, packed, I, O, packed rows, store).
    type Kernel = fn(&[i8], &[u8], usize, usize, Range<usize>, &mut dyn FnMut(usize, usize, i32));

    /// Runs `kernel` over the packed rows `ps` into a (T, O) matrix; rows outside `ps` keep
    /// i32::MIN, so a kernel that skips or invents an output shows up too.
    fn run(
        kernel: Kernel,
        xq: &[i8],
        packed: &[u8],
        (t, i, o): (usize, usize, usize),
        ps: Range<usize>,
    ) -> Vec<i32> {
        let mut acc = vec![i32::MIN; t * o];
        kernel(xq, packed, i, o, ps, &mut |r, row, v| acc[r * o + row] = v);
        acc
    }

    #[cfg(target_feature = "simd128")]
    fn simd(
        xq: &[i8],
        packed: &[u8],
        i: usize,
        o: usize,
        ps: Range<usize>,
        store: &mut dyn FnMut(usize, usize, i32),
    ) {
        ternary_matmul_simd128(xq, packed, i, o, ps, store)
    }

    fn body(
        xq: &[i8],
        packed: &[u8],
        i: usize,
        o: usize,
        ps: Range<usize>,
        store: &mut dyn FnMut(usize, usize, i32),
    ) {
        ternary_matmul_body(xq, packed, i, o, ps, store)
    }

    /// Exact equality, naming the case and the first differing (token, row) on failure.
    fn assert_same(name: &str, got: &[i32], want: &[i32], o: usize) {
        if let Some(k) = (0..want.len()).find(|&k| got[k] != want[k]) {
            let bad = (0..want.len()).filter(|&k| got[k] != want[k]).count();
            panic!(
                "{name}: {bad} of {} differ; first at (t {}, o {}): simd128 {} vs body {}",
                want.len(),
                k / o,
                k % o,
                got[k],
                want[k]
            );
        }
    }

    /// Kernel vs body on one case, over all packed rows and over an inner range of them (the
    /// few-token path splits W's packed rows between threads).
    #[cfg(target_feature = "simd128")]
    fn check(name: &str, xq: &[i8], packed: &[u8], (t, i, o): (usize, usize, usize)) {
        let o4 = o.div_ceil(4);
        let parts = [0..o4, o4 / 3..o4 - o4 / 3];
        for ps in parts {
            let want = run(body, xq, packed, (t, i, o), ps.clone());
            let got = run(simd, xq, packed, (t, i, o), ps.clone());
            assert_same(
                &format!("{name} T={t} I={i} O={o} ps={ps:?}"),
                &got,
                &want,
                o,
            );
        }
        // And the public entry point against the naive reference.
        assert_eq!(
            ternary_matmul_fast(xq, packed, t, i, o),
            ternary_matmul_packed(xq, packed, t, i, o),
            "{name}: fast vs packed, T={t} I={i} O={o}"
        );
    }

    /// Awkward shapes (I not a multiple of 16 or 32, O not of 4, T = 1 and more) with random
    /// packed bytes 0..=255, so code 3 (which the body reads as +2) is covered too.
    #[cfg(target_feature = "simd128")]
    #[wasm_bindgen_test]
    fn simd128_equals_body_on_awkward_shapes() {
        let mut rng = Rng::new(16);
        let mut cases = 0;
        let shapes: [(usize, usize, usize); 11] = [
            (1, 1, 1),
            (1, 15, 3),
            (1, 16, 4),
            (1, 17, 5),
            (2, 31, 7),
            (3, 33, 9),
            (1, 1000, 37),
            (5, 129, 64),
            (37, 1000, 37),
            (4, 4096, 10),
            (2, 7, 2),
        ];
        for (t, i, o) in shapes {
            let x: Vec<i8> = (0..t * i).map(|_| rng.below(256) as u8 as i8).collect();
            let packed: Vec<u8> = (0..o.div_ceil(4) * i)
                .map(|_| rng.below(256) as u8)
                .collect();
            check("random bytes", &x, &packed, (t, i, o));
            cases += 1;
        }
        println!("simd128 vs body: {cases} shapes equal bit for bit");
    }

    /// Property: random shapes. A failure names the case; add its shape to the test above.
    #[cfg(target_feature = "simd128")]
    #[wasm_bindgen_test]
    fn simd128_equals_body_on_random_shapes() {
        let mut rng = Rng::new(2027);
        for case in 0..80 {
            let (t, i, o) = (
                1 + rng.below(9) as usize,
                1 + rng.below(300) as usize,
                1 + rng.below(70) as usize,
            );
            let w: Vec<i8> = (0..o * i).map(|_| rng.below(3) as i8 - 1).collect();
            let x: Vec<i8> = (0..t * i).map(|_| rng.below(256) as u8 as i8).collect();
            check(
                &format!("case {case}"),
                &x,
                &pack_ternary(&w, o, i),
                (t, i, o),
            );
        }
    }

    /// Activation quantization, SIMD128 vs scalar: awkward lengths, exact ties (x * s_a = k +
    /// 0.5), zeros of both signs, denormals, infinities and NaN (which the scalar max ignores
    /// and `as i8` makes 0); x_q bytes and s_a bits must be equal.
    #[cfg(target_feature = "simd128")]
    #[wasm_bindgen_test]
    fn quantize_simd128_equals_scalar() {
        let mut rng = Rng::new(33);
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            1e-40,
            -3e38,
            0.5,
            -2.5,
        ];
        let mut rows = 0;
        for n in [1, 3, 4, 5, 15, 16, 17, 31, 33, 384, 1000, 1031] {
            for kind in 0..6 {
                let mut row: Vec<f32> = (0..n).map(|_| rng.normal() * 3.0).collect();
                match kind {
                    0 => {}
                    // max|x| = 127 gives s_a = 1, so k + 0.5 values are ties for the rounding.
                    1 => {
                        for v in row.iter_mut() {
                            *v = (rng.below(255) as f32 - 127.0) + 0.5;
                        }
                        row[n / 2] = 127.0;
                    }
                    2 => row.iter_mut().for_each(|v| *v = 0.0),
                    3 => row.iter_mut().for_each(|v| *v = -0.0),
                    // One special value at a random place, the rest normal.
                    4 => row[rng.below(n as u64) as usize] = specials[rng.below(9) as usize],
                    _ => {
                        for v in row.iter_mut() {
                            *v = specials[rng.below(9) as usize];
                        }
                    }
                }
                let (mut want, mut got) = (vec![0i8; n], vec![0i8; n]);
                let (sw, sg) = (
                    quantize_row(&row, &mut want),
                    quantize_row_simd128(&row, &mut got),
                );
                assert_eq!(
                    sg.to_bits(),
                    sw.to_bits(),
                    "s_a, n={n} kind={kind}: {sg} vs {sw}"
                );
                if let Some(k) = (0..n).find(|&k| got[k] != want[k]) {
                    panic!(
                        "x_q, n={n} kind={kind}: first difference at {k}: x={} simd128 {} vs scalar {}",
                        row[k], got[k], want[k]
                    );
                }
                rows += 1;
            }
        }
        println!("quantize simd128 vs scalar: {rows} rows equal bit for bit");
    }

    /// The extremes: activations -128 and 127 against weights all +1, all -1 and all code 3,
    /// the largest sums the i32 lanes see, checked against the closed form too.
    #[cfg(target_feature = "simd128")]
    #[wasm_bindgen_test]
    fn simd128_holds_at_the_extremes() {
        let (t, i, o): (usize, usize, usize) = (3, 4128 + 7, 9);
        for xv in [-128i8, 127] {
            for code in [0u8, 2, 3] {
                let byte = code * 0b0101_0101;
                let packed = vec![byte; o.div_ceil(4) * i];
                let x = vec![xv; t * i];
                check(&format!("x={xv} code={code}"), &x, &packed, (t, i, o));
                let got = run(simd, &x, &packed, (t, i, o), 0..o.div_ceil(4));
                assert_eq!(got[0], xv as i32 * i as i32 * (code as i32 - 1));
            }
        }
    }
}
