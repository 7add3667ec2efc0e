//! `libm::expf` over slices, bit for bit, several lanes at a time.
//!
//! The CPU reference computes every exponential with the `libm` crate's `expf` (FreeBSD's
//! `e_expf.c`, pure Rust, so native and wasm agree), one call per element: the softmax of a
//! training step is 2 x V calls per position (V = 32k on the 125m shape), ~9% of a CPU step.
//! [`expf_in_place`] computes the same function on 8 lanes (AVX2) or 4 (SIMD128): every
//! operation of `expf`'s path for finite x <= 87 is an IEEE f32 operation (products, sums, one
//! division, a truncating conversion), done lane-wise in the same order with no fused
//! multiply-add, so each lane rounds exactly as the scalar code does. The scalar code's
//! branches become blends:
//! - |x| <= 2^-14: `1 + x`;
//! - |x| <= 0.5 ln 2: k = 0, which the general reduction reproduces exactly (k ln2_hi = 0, lo = 0);
//! - |x| <= 1.5 ln 2: k = +-1; beyond: k = (x / ln 2 + +-0.5) truncated;
//! - x <= -103.972084: 0; k < -126 (a subnormal result): `scalbnf`'s two products,
//!   y * 2^-102 (exact) then * 2^(k + 102).
//!
//! A vector holding a NaN or an x > 87 (overflow, or k > 127) is handed to `libm::expf` lane by
//! lane, and so are the last len % lanes elements. `expf_matches_libm_bit_for_bit` checks every
//! 61st f32 from -110 to 90 plus the branch edges and the special values (natively, and every
//! 997th in the SIMD128 build in node).

/// `xs[i] = libm::expf(xs[i])` for every element, the same bits.
pub fn expf_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::expf_in_place(xs) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd128::expf_in_place(xs);
    #[allow(unreachable_code)]
    scalar(xs)
}

fn scalar(xs: &mut [f32]) {
    for x in xs {
        *x = libm::expf(*x);
    }
}

// expf's constants, as libm 0.2 writes them (src/math/expf.rs).
#[allow(clippy::excessive_precision)]
const LN2_HI: f32 = 6.9314575195e-01; // 0x3f317200
#[allow(clippy::excessive_precision)]
const LN2_LO: f32 = 1.4286067653e-06; // 0x35bfbe8e
#[allow(clippy::excessive_precision)]
const INV_LN2: f32 = 1.4426950216e+00; // 0x3fb8aa3b
#[allow(clippy::excessive_precision)]
const P1: f32 = 1.6666625440e-1; // 0xaaaa8f.0p-26
#[allow(clippy::excessive_precision)]
const P2: f32 = -2.7667332906e-3; // -0xb55215.0p-32
/// A vector with a NaN or an x above this is left to the scalar code (x > 87 overflows or
/// needs k > 127); x < -87 is handled in the vector path.
const POS_LIMIT: f32 = 87.0;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub(super) fn expf_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 f32; the CPU has AVX2 (this function's feature).
            unsafe {
                let x = _mm256_loadu_ps(c.as_ptr());
                // NaN or x > 87: not ordered-less-or-equal to 87.
                let fine =
                    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_set1_ps(POS_LIMIT)));
                if fine != 0xff {
                    super::scalar(c);
                    continue;
                }
                _mm256_storeu_ps(c.as_mut_ptr(), lanes(x));
            }
        }
        super::scalar(chunks.into_remainder());
    }

    /// expf of 8 finite lanes <= 87 (no closures: they would not inherit the feature).
    #[target_feature(enable = "avx2")]
    fn lanes(x: __m256) -> __m256 {
        let abs_bits = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fff_ffff));
        let neg = _mm256_castsi256_ps(_mm256_srai_epi32::<31>(_mm256_castps_si256(x)));
        let above_half_ln2 = _mm256_cmpgt_epi32(abs_bits, _mm256_set1_epi32(0x3eb1_7218));
        let above_1_5_ln2 = _mm256_cmpgt_epi32(abs_bits, _mm256_set1_epi32(0x3f85_1592));
        // k: |x| > 1.5 ln2: trunc(INV_LN2 x + (x < 0 ? -0.5 : 0.5)); |x| > 0.5 ln2: +-1; else 0.
        let half = _mm256_blendv_ps(_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5), neg);
        let k_far = _mm256_cvttps_epi32(_mm256_add_ps(
            _mm256_mul_ps(_mm256_set1_ps(INV_LN2), x),
            half,
        ));
        let one = _mm256_blendv_ps(
            _mm256_castsi256_ps(_mm256_set1_epi32(1)),
            _mm256_castsi256_ps(_mm256_set1_epi32(-1)),
            neg,
        );
        let k_near = _mm256_and_si256(_mm256_castps_si256(one), above_half_ln2);
        let k = _mm256_blendv_epi8(k_near, k_far, above_1_5_ln2);
        let kf = _mm256_cvtepi32_ps(k);
        let hi = _mm256_sub_ps(x, _mm256_mul_ps(kf, _mm256_set1_ps(LN2_HI)));
        let lo = _mm256_mul_ps(kf, _mm256_set1_ps(LN2_LO));
        let r = _mm256_sub_ps(hi, lo);
        let xx = _mm256_mul_ps(r, r);
        let poly = _mm256_add_ps(_mm256_set1_ps(P1), _mm256_mul_ps(xx, _mm256_set1_ps(P2)));
        let c = _mm256_sub_ps(r, _mm256_mul_ps(xx, poly));
        let q = _mm256_div_ps(_mm256_mul_ps(r, c), _mm256_sub_ps(_mm256_set1_ps(2.0), c));
        let y = _mm256_add_ps(_mm256_set1_ps(1.0), _mm256_add_ps(_mm256_sub_ps(q, lo), hi));
        // scalbnf(y, k): k >= -126: y 2^k; k < -126: (y 2^-102) 2^(k + 102).
        let sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(-126), k);
        let two_m102 = _mm256_castsi256_ps(_mm256_set1_epi32(25 << 23));
        let s1 = _mm256_blendv_ps(_mm256_set1_ps(1.0), two_m102, _mm256_castsi256_ps(sub));
        let n = _mm256_add_epi32(k, _mm256_and_si256(sub, _mm256_set1_epi32(102)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            n,
            _mm256_set1_epi32(127),
        )));
        let scaled = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
        // |x| <= 2^-14: 1 + x; x <= -103.972084: 0.
        let tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3900_0001), abs_bits);
        let one_plus_x = _mm256_add_ps(_mm256_set1_ps(1.0), x);
        let out = _mm256_blendv_ps(scaled, one_plus_x, _mm256_castsi256_ps(tiny));
        let deep = _mm256_cmpgt_epi32(abs_bits, _mm256_set1_epi32(0x42cf_f1b4));
        let zero = _mm256_and_ps(neg, _mm256_castsi256_ps(deep));
        _mm256_andnot_ps(zero, out)
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use super::*;
    use std::arch::wasm32::*;

    pub(super) fn expf_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(4);
        for c in &mut chunks {
            // SAFETY: c holds 4 f32 (unaligned loads and stores are allowed in wasm).
            let x = unsafe { v128_load(c.as_ptr() as *const v128) };
            if !i32x4_all_true(f32x4_le(x, f32x4_splat(POS_LIMIT))) {
                super::scalar(c);
                continue;
            }
            // SAFETY: as above.
            unsafe { v128_store(c.as_mut_ptr() as *mut v128, lanes(x)) };
        }
        super::scalar(chunks.into_remainder());
    }

    /// expf of 4 finite lanes <= 87; the AVX2 twin's steps.
    fn lanes(x: v128) -> v128 {
        let f = f32x4_splat;
        let abs_bits = v128_and(x, i32x4_splat(0x7fff_ffff));
        let gt = |b: i32| i32x4_gt(abs_bits, i32x4_splat(b)); // (the module is built with simd128)
        let neg = i32x4_shr(x, 31);
        let half = v128_bitselect(f(-0.5), f(0.5), neg);
        let k_far = i32x4_trunc_sat_f32x4(f32x4_add(f32x4_mul(f(INV_LN2), x), half));
        let one = v128_bitselect(i32x4_splat(-1), i32x4_splat(1), neg);
        let k = v128_bitselect(k_far, v128_and(one, gt(0x3eb1_7218)), gt(0x3f85_1592));
        let kf = f32x4_convert_i32x4(k);
        let hi = f32x4_sub(x, f32x4_mul(kf, f(LN2_HI)));
        let lo = f32x4_mul(kf, f(LN2_LO));
        let r = f32x4_sub(hi, lo);
        let xx = f32x4_mul(r, r);
        let c = f32x4_sub(r, f32x4_mul(xx, f32x4_add(f(P1), f32x4_mul(xx, f(P2)))));
        let q = f32x4_div(f32x4_mul(r, c), f32x4_sub(f(2.0), c));
        let y = f32x4_add(f(1.0), f32x4_add(f32x4_sub(q, lo), hi));
        let sub = i32x4_gt(i32x4_splat(-126), k);
        let s1 = v128_bitselect(i32x4_splat(25 << 23), f(1.0), sub);
        let n = i32x4_add(k, v128_and(sub, i32x4_splat(102)));
        let s2 = i32x4_shl(i32x4_add(n, i32x4_splat(127)), 23);
        let scaled = f32x4_mul(f32x4_mul(y, s1), s2);
        let tiny = i32x4_gt(i32x4_splat(0x3900_0001), abs_bits);
        let out = v128_bitselect(f32x4_add(f(1.0), x), scaled, tiny);
        let zero = v128_and(neg, gt(0x42cf_f1b4));
        v128_andnot(out, zero)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(xs: &[f32]) {
        let mut got = xs.to_vec();
        expf_in_place(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = libm::expf(*x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "expf({x:e}) [{:#010x}]: {g:e} [{:#010x}], libm {want:e} [{:#010x}]",
                x.to_bits(),
                g.to_bits(),
                want.to_bits()
            );
        }
    }

    /// The f32s from 2^-15 to 90 and to -110 in steps of `stride` ulps (every value would be
    /// ~4e8 calls; below 2^-15 a coarser stride), the branch edges and the special values, in
    /// vectors that mix the branches, at every offset into a vector and with every tail length.
    fn sweep(stride: u32) {
        let mut xs = Vec::new();
        for (lo, hi) in [
            (0u32, 0x42b4_0000u32),
            (0x8000_0000, 0x8000_0000 | 0x42dc_0000),
        ] {
            let mut b = lo;
            while b < hi {
                xs.push(f32::from_bits(b));
                b += if b & 0x7fff_ffff < 0x3800_0000 {
                    1 << 16
                } else {
                    stride
                };
            }
        }
        let edges = [
            0x3900_0000u32,
            0x3eb1_7218,
            0x3f85_1592,
            0x42ae_ac50,
            0x42b1_7218,
            0x42cf_f1b5,
        ];
        for e in edges {
            for d in -3i32..=3 {
                let b = (e as i32 + d) as u32;
                xs.push(f32::from_bits(b));
                xs.push(f32::from_bits(b | 0x8000_0000));
            }
        }
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.5,
            100.0,
            -200.0,
            f32::MIN_POSITIVE,
            -1e-45,
        ]);
        check(&xs);
        for skip in 1..8 {
            check(&xs[skip..skip + 4099]);
        }
    }

    #[test]
    fn expf_matches_libm_bit_for_bit() {
        sweep(61);
    }

    /// The SIMD128 build, run in wasm (node) by tools/test.sh with quant.rs' `simd128_tests`.
    #[cfg(target_arch = "wasm32")]
    mod simd128_tests {
        #[wasm_bindgen_test::wasm_bindgen_test]
        fn expf_simd128_matches_libm_bit_for_bit() {
            const { assert!(cfg!(target_feature = "simd128"), "build with +simd128") };
            super::sweep(997);
        }
    }
}
