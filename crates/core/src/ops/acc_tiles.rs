//! The head's backward, `y (T, C) += g (T, V) . W (V, C)` skipping zeros of g, in register
//! tiles: the same multiply, then add, per element and in the same order of v as
//! [`super::matmul_acc_body`] (one `axpy` per (v, row)), so equal to it bit for bit.
//!
//! The body streams a whole row of y through memory for every (v, row): two loads and a store
//! for each multiply-add. Here a tile of R rows x N columns of y stays in registers while v
//! runs over a block of `V_BLOCK` rows of W: per v, N / lanes loads of W and R broadcasts of g
//! feed R x N / lanes multiplies and adds. Each block of W is first widened to f32 and packed
//! tile column by tile column (read once, in memory order; the tiles then read it
//! contiguously from L1 and L2). Rows past a multiple of R go through the body's loop on the
//! block of v, columns past a multiple of N through the same operations per element.
//!
//! Threads split the columns, not the rows: every thread then reads only its columns of W,
//! so W (the embedding: 49 MB for 125m as bf16) crosses the memory bus once a call instead of
//! once per block of rows (head backward of train-125m, T = 128, 2 threads, perf: 10.5% of
//! the step's samples with the body on blocks of rows, 7.95% here: ~6% tiles, ~2% packing).
//!
//! Kernels: AVX-512 8 x 32, AVX2 4 x 16 and SIMD128 4 x 8. A tile whose rows of g have no zero
//! on the block of v (`zero_flags`) runs without a test; one that has masks (AVX-512) or skips
//! (the others) the row's multiply-adds where g is 0, as the body does.

use super::{Weight, axpy_body};
use std::ops::Range;

/// Rows of W (values of v) the tiles run through before the next block: 256 rows of a
/// 768-wide W, widened and packed, are 768 KiB (L2); one tile's 32 columns of them 32 KiB (L1).
const V_BLOCK: usize = 256;

/// A tile kernel: `(g, w, v, ldw, zeros, y)` adds g (T, V) . W to y (T, C'), where W's row vi
/// is `w[vi * ldw..][..C']` (the caller's block of columns) and `zeros` is [`zero_flags`] of g.
type Kernel<W> = unsafe fn(&[f32], &[W], usize, usize, &[bool], &mut [f32]);

/// This CPU's (or build's) tile kernel and its width N, if it has one.
#[allow(unreachable_code)]
fn kernel<W: Weight>() -> Option<(Kernel<W>, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx2") && has!("fma") {
            return Some((matmul_acc_avx512::<W>, 32));
        }
        if has!("avx2") && has!("fma") {
            return Some((matmul_acc_avx2::<W>, 16));
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return Some((matmul_acc_simd128::<W>, 8));
    None
}

/// Whether row r of g (T, V) has a zero among the v of block b: `flags[r * blocks + b]`.
fn zero_flags(g: &[f32], v: usize) -> Vec<bool> {
    g.chunks_exact(v)
        .flat_map(|row| row.chunks(V_BLOCK).map(|b| b.contains(&0.0)))
        .collect()
}

/// `y (T, C) += g (T, V) . W (V, C)` with this machine's tile kernel, the columns split
/// between threads in blocks of whole tiles. Returns false, y untouched, where there is no
/// tile kernel (the caller runs the body).
pub(super) fn matmul_acc<W: Weight>(y: &mut [f32], g: &[f32], w: &[W], v: usize, c: usize) -> bool {
    let Some((kernel, n)) = kernel::<W>() else {
        return false;
    };
    assert!(
        c > 0 && y.len().is_multiple_of(c) && w.len() == v * c && g.len() == y.len() / c * v,
        "matmul_acc: g, W and y do not fit (T, V), (V, C), (T, C)"
    );
    if v == 0 || y.is_empty() {
        return true;
    }
    let zeros = zero_flags(g, v);
    // (T > 0 and V > 0 here: an empty y or g returned above.)
    let tiles = c / n;
    let blocks = (2 * rayon::current_num_threads()).min(tiles);
    if rayon::current_num_threads() == 1 || blocks <= 1 {
        // SAFETY: `kernel` checked this CPU's features.
        unsafe { kernel(g, w, v, c, &zeros, y) };
        return true;
    }
    // Blocks of whole tiles; the last also takes the columns past the last whole tile.
    let per = tiles.div_ceil(blocks);
    let mut parts: Vec<(Range<usize>, Vec<f32>)> = (0..tiles.div_ceil(per))
        .map(|b| {
            let cols = b * per * n..if (b + 1) * per >= tiles {
                c
            } else {
                (b + 1) * per * n
            };
            let part = y
                .chunks_exact(c)
                .flat_map(|row| &row[cols.clone()])
                .copied()
                .collect();
            (cols, part)
        })
        .collect();
    crate::par::rows(&mut parts, 1, 1, |_, mine| {
        for (cols, part) in mine {
            // SAFETY: as above.
            unsafe { kernel(g, &w[cols.start..], v, c, &zeros, part) };
        }
    });
    for (cols, part) in &parts {
        for (row, p) in y.chunks_exact_mut(c).zip(part.chunks_exact(cols.len())) {
            row[cols.clone()].copy_from_slice(p);
        }
    }
    true
}

/// Runs `tile(y, C', r0, c0, vs, strip, zeros)` for every R x N tile of y (T, C') and every block
/// `vs` of v, blocks of v outermost (so each element's additions stay in order of v). `strip`
/// holds W's rows `vs`, columns c0..c0 + N, widened to f32 and packed row after row; `zeros`
/// says whether g has a zero in the tile's rows on `vs`. Rows and columns left over go through
/// the body's operations on the same block of v.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tiles<W: Weight, const R: usize, const N: usize>(
    g: &[f32],
    w: &[W],
    v: usize,
    ldw: usize,
    zero_rows: &[bool],
    y: &mut [f32],
    mut tile: impl FnMut(&mut [f32], usize, usize, usize, Range<usize>, &[f32], bool),
) {
    let Some(c) = check(g, w, v, ldw, zero_rows, y) else {
        return;
    };
    let rows = y.len() / c;
    let (full_rows, full_cols) = (rows - rows % R, c - c % N);
    let nvb = v.div_ceil(V_BLOCK);
    // (Allocated here rather than kept per thread: inside a thread-local's `with` the loops
    // below were compiled without the kernel's target features, and packing took 4% of a
    // train-125m step.)
    let mut packed = Vec::new();
    if full_rows > 0 && full_cols > 0 {
        packed.resize(V_BLOCK.min(v) * full_cols, 0.0);
    }
    {
        for (b, v0) in (0..v).step_by(V_BLOCK).enumerate() {
            let vs = v0..(v0 + V_BLOCK).min(v);
            let nv = vs.len();
            if full_rows > 0 && full_cols > 0 {
                for (k, vi) in vs.clone().enumerate() {
                    let wr = &w[vi * ldw..vi * ldw + full_cols];
                    for (t, chunk) in wr.chunks_exact(N).enumerate() {
                        let at = (t * nv + k) * N;
                        for (d, &x) in packed[at..at + N].iter_mut().zip(chunk) {
                            *d = x.widen();
                        }
                    }
                }
            }
            for r0 in (0..full_rows).step_by(R) {
                let zeros = (r0..r0 + R).any(|r| zero_rows[r * nvb + b]);
                for (t, c0) in (0..full_cols).step_by(N).enumerate() {
                    let strip = &packed[t * nv * N..(t + 1) * nv * N];
                    tile(y, c, r0, c0, vs.clone(), strip, zeros);
                }
            }
            if full_cols < c {
                for vi in vs.clone() {
                    let wr = &w[vi * ldw + full_cols..vi * ldw + c];
                    for r in 0..full_rows {
                        let a = g[r * v + vi];
                        if a != 0.0 {
                            axpy_body(&mut y[r * c + full_cols..(r + 1) * c], a, wr);
                        }
                    }
                }
            }
            for vi in vs {
                let wr = &w[vi * ldw..vi * ldw + c];
                for r in full_rows..rows {
                    let a = g[r * v + vi];
                    if a != 0.0 {
                        axpy_body(&mut y[r * c..(r + 1) * c], a, wr);
                    }
                }
            }
        }
    }
}

/// Checks the shapes every kernel's unchecked loads rely on: g (T, V), y (T, C'), W's rows
/// `ldw` apart with C' <= ldw values each, a zero flag per row and block of v. Returns C', or
/// None where there is nothing to add (T or V is 0).
fn check<W>(
    g: &[f32],
    w: &[W],
    v: usize,
    ldw: usize,
    zero_rows: &[bool],
    y: &[f32],
) -> Option<usize> {
    if v == 0 || g.is_empty() {
        assert!(g.is_empty(), "matmul_acc tiles: g is not (T, 0)");
        return None;
    }
    let t = g.len() / v;
    let fits = g.len() == t * v && y.len().is_multiple_of(t) && y.len() / t <= ldw;
    assert!(
        fits && w.len() >= (v - 1) * ldw + y.len() / t
            && zero_rows.len() == t * v.div_ceil(V_BLOCK),
        "matmul_acc tiles: g, W and y do not fit (T, V), (V, C), (T, C)"
    );
    Some(y.len() / t)
}

/// 8 rows x 32 columns: 16 zmm accumulators; per v, 2 loads of W, 8 broadcasts of g, 16
/// multiplies and 16 adds (masked by g != 0, NaN included as in the body's test, where the
/// tile's g has a zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) fn matmul_acc_avx512<W: Weight>(
    g: &[f32],
    w: &[W],
    v: usize,
    ldw: usize,
    zero_rows: &[bool],
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    tiles::<W, 8, 32>(
        g,
        w,
        v,
        ldw,
        zero_rows,
        y,
        |y, c, r0, c0, vs, strip, zeros| {
            let v0 = vs.start;
            assert!(
                strip.len() >= vs.len() * 32,
                "matmul_acc_avx512: short strip"
            );
            // SAFETY: rows r0..r0 + 8 <= T and columns c0..c0 + 32 <= C (whole tiles only), v in
            // 0..V (shapes checked above), and the strip holds 32 values per v of the block.
            unsafe {
                let yp = y.as_mut_ptr();
                let mut acc = [[_mm512_setzero_ps(); 2]; 8];
                for (r, a) in acc.iter_mut().enumerate() {
                    let p = yp.add((r0 + r) * c + c0);
                    a[0] = _mm512_loadu_ps(p);
                    a[1] = _mm512_loadu_ps(p.add(16));
                }
                let zero = _mm512_setzero_ps();
                for vi in vs {
                    let wp = strip.as_ptr().add((vi - v0) * 32);
                    let (w0, w1) = (_mm512_loadu_ps(wp), _mm512_loadu_ps(wp.add(16)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*g.get_unchecked((r0 + r) * v + vi));
                        if zeros {
                            let k = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(b, zero);
                            a[0] = _mm512_mask_add_ps(a[0], k, a[0], _mm512_mul_ps(b, w0));
                            a[1] = _mm512_mask_add_ps(a[1], k, a[1], _mm512_mul_ps(b, w1));
                        } else {
                            a[0] = _mm512_add_ps(a[0], _mm512_mul_ps(b, w0));
                            a[1] = _mm512_add_ps(a[1], _mm512_mul_ps(b, w1));
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let p = yp.add((r0 + r) * c + c0);
                    _mm512_storeu_ps(p, a[0]);
                    _mm512_storeu_ps(p.add(16), a[1]);
                }
            }
        },
    )
}

/// 4 rows x 16 columns: 8 ymm accumulators; per v, 2 loads of W, then per row (with g != 0
/// where the tile's g has a zero) a broadcast, 2 multiplies and 2 adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn matmul_acc_avx2<W: Weight>(
    g: &[f32],
    w: &[W],
    v: usize,
    ldw: usize,
    zero_rows: &[bool],
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    tiles::<W, 4, 16>(
        g,
        w,
        v,
        ldw,
        zero_rows,
        y,
        |y, c, r0, c0, vs, strip, zeros| {
            let v0 = vs.start;
            assert!(strip.len() >= vs.len() * 16, "matmul_acc_avx2: short strip");
            // SAFETY: as in the AVX-512 kernel (whole 4 x 16 tiles, shapes checked).
            unsafe {
                let yp = y.as_mut_ptr();
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for (r, a) in acc.iter_mut().enumerate() {
                    let p = yp.add((r0 + r) * c + c0);
                    a[0] = _mm256_loadu_ps(p);
                    a[1] = _mm256_loadu_ps(p.add(8));
                }
                for vi in vs {
                    let wp = strip.as_ptr().add((vi - v0) * 16);
                    let (w0, w1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let s = *g.get_unchecked((r0 + r) * v + vi);
                        if !zeros || s != 0.0 {
                            let b = _mm256_set1_ps(s);
                            a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(b, w0));
                            a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(b, w1));
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let p = yp.add((r0 + r) * c + c0);
                    _mm256_storeu_ps(p, a[0]);
                    _mm256_storeu_ps(p.add(8), a[1]);
                }
            }
        },
    )
}

/// 4 rows x 8 columns in SIMD128: 8 v128 accumulators (V8 has 16 registers); per v, 2 loads
/// of W, then per row (with g != 0 where the tile's g has a zero) a splat, 2 multiplies and 2
/// adds.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(super) fn matmul_acc_simd128<W: Weight>(
    g: &[f32],
    w: &[W],
    v: usize,
    ldw: usize,
    zero_rows: &[bool],
    y: &mut [f32],
) {
    use core::arch::wasm32::*;
    tiles::<W, 4, 8>(
        g,
        w,
        v,
        ldw,
        zero_rows,
        y,
        |y, c, r0, c0, vs, strip, zeros| {
            let v0 = vs.start;
            assert!(
                strip.len() >= vs.len() * 8,
                "matmul_acc_simd128: short strip"
            );
            // SAFETY: as in the AVX-512 kernel (whole 4 x 8 tiles, shapes checked); v128 loads and
            // stores are unaligned.
            unsafe {
                let yp = y.as_mut_ptr();
                let mut acc = [[f32x4_splat(0.0); 2]; 4];
                for (r, a) in acc.iter_mut().enumerate() {
                    let p = yp.add((r0 + r) * c + c0);
                    a[0] = v128_load(p as *const v128);
                    a[1] = v128_load(p.add(4) as *const v128);
                }
                for vi in vs {
                    let wp = strip.as_ptr().add((vi - v0) * 8);
                    let (w0, w1) = (
                        v128_load(wp as *const v128),
                        v128_load(wp.add(4) as *const v128),
                    );
                    for (r, a) in acc.iter_mut().enumerate() {
                        let s = *g.get_unchecked((r0 + r) * v + vi);
                        if !zeros || s != 0.0 {
                            let b = f32x4_splat(s);
                            a[0] = f32x4_add(a[0], f32x4_mul(b, w0));
                            a[1] = f32x4_add(a[1], f32x4_mul(b, w1));
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let p = yp.add((r0 + r) * c + c0);
                    v128_store(p as *mut v128, a[0]);
                    v128_store(p.add(4) as *mut v128, a[1]);
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::matmul_acc_body;
    use super::*;

    /// Shapes with whole tiles and left-over rows and columns for every kernel (8 x 32, 4 x 16,
    /// 4 x 8), fewer rows or columns than one tile, and V over one and several blocks of v.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 40, 7),
        (3, 5, 300),
        (4, 8, 1),
        (8, 32, 256),
        (9, 33, 257),
        (12, 64, 600),
        (13, 100, 70),
        (17, 48, 513),
        (5, 768, 40),
    ];

    /// g with zeros for even seeds (every fifth value and all of row 2: a position without a
    /// target; odd seeds have none, the kernels' unmasked path), y
    /// starting with some -0.0 (adding 0 x w to -0.0 gives +0.0, so a kernel that does not
    /// skip or mask a zero of g fails), W as f32 and as the bf16 bits of the same values.
    fn case(t: usize, c: usize, v: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<u16>, Vec<f32>) {
        let mut rng = crate::rng::Rng::new(seed);
        let g = (0..t * v)
            .map(|k| {
                if seed.is_multiple_of(2) && (k % 5 == 1 || k / v == 2) {
                    0.0
                } else {
                    rng.normal()
                }
            })
            .collect();
        let wb: Vec<u16> = (0..v * c)
            .map(|_| (rng.normal().to_bits() >> 16) as u16)
            .collect();
        let wf = wb.iter().map(|&b| super::super::bf16_to_f32(b)).collect();
        let y = (0..t * c)
            .map(|k| if k % 7 == 3 { -0.0 } else { rng.normal() })
            .collect();
        (g, wf, wb, y)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every tile kernel this build and CPU can run equals the body bit for bit, f32 and bf16
    /// W, on the whole matrix and on a block of its columns (W's rows further apart than the
    /// block is wide, as the threads run them); `matmul_acc` too, on 1 and 3 threads where
    /// there are threads. Run natively by `avx_tiles_equal_the_body`, in wasm (node) by
    /// `simd128_tests` (`tools/test.sh`).
    pub(super) fn kernels_equal_the_body() {
        let mut kernels: Vec<(&str, Kernel<f32>, Kernel<u16>)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx2") && has!("fma") {
                kernels.push(("AVX-512", matmul_acc_avx512, matmul_acc_avx512));
            }
            if has!("avx2") && has!("fma") {
                kernels.push(("AVX2", matmul_acc_avx2, matmul_acc_avx2));
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            kernels.push(("SIMD128", matmul_acc_simd128, matmul_acc_simd128));
        }
        assert!(
            !kernels.is_empty(),
            "no tile kernel runs here: nothing tested"
        );
        for (n, &(t, c, v)) in SHAPES.iter().enumerate() {
            let (g, wf, wb, start) = case(t, c, v, 90 + n as u64);
            let mut want = start.clone();
            matmul_acc_body(&g, &wf, v, c, &mut want);
            let zeros = zero_flags(&g, v);
            // Columns 3.. of the first 2/3 (at least one): a block that starts off a tile.
            let cols = 3.min(c - 1)..(c * 2 / 3).max(4.min(c));
            let block = |y: &[f32]| -> Vec<f32> {
                y.chunks_exact(c)
                    .flat_map(|r| &r[cols.clone()])
                    .copied()
                    .collect()
            };
            for &(name, kf, kb) in &kernels {
                let (mut yf, mut yb) = (start.clone(), start.clone());
                let (mut pf, mut pb) = (block(&start), block(&start));
                // SAFETY: the kernel's features were detected above (or built in).
                unsafe {
                    kf(&g, &wf, v, c, &zeros, &mut yf);
                    kb(&g, &wb, v, c, &zeros, &mut yb);
                    kf(&g, &wf[cols.start..], v, c, &zeros, &mut pf);
                    kb(&g, &wb[cols.start..], v, c, &zeros, &mut pb);
                }
                let shape = format!("T={t} C={c} V={v}");
                assert_eq!(bits(&yf), bits(&want), "{name}, f32 W, {shape}");
                assert_eq!(bits(&yb), bits(&want), "{name}, bf16 W, {shape}");
                assert_eq!(
                    bits(&pf),
                    bits(&block(&want)),
                    "{name}, f32 W, {cols:?}, {shape}"
                );
                assert_eq!(
                    bits(&pb),
                    bits(&block(&want)),
                    "{name}, bf16 W, {cols:?}, {shape}"
                );
            }
            #[cfg(not(target_arch = "wasm32"))]
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (mut yf, mut yb) = (start.clone(), start.clone());
                pool.install(|| {
                    assert!(matmul_acc(&mut yf, &g, &wf, v, c));
                    assert!(matmul_acc(&mut yb, &g, &wb, v, c));
                });
                let shape = format!("T={t} C={c} V={v}, {threads} threads");
                assert_eq!(bits(&yf), bits(&want), "matmul_acc, f32 W, {shape}");
                assert_eq!(bits(&yb), bits(&want), "matmul_acc, bf16 W, {shape}");
            }
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod native_tests {
    #[test]
    fn avx_tiles_equal_the_body() {
        super::tests::kernels_equal_the_body()
    }
}

/// Run in wasm (node) by tools/test.sh (`cargo test --target wasm32-unknown-unknown --lib
/// simd128` with wasm-bindgen-test-runner), where only `#[wasm_bindgen_test]`s run.
#[cfg(all(test, target_arch = "wasm32"))]
mod simd128_tests {
    #[wasm_bindgen_test::wasm_bindgen_test]
    fn simd128_tiles_equal_the_body() {
        super::tests::kernels_equal_the_body()
    }
}
