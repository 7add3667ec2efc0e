//! Data parallelism for the CPU backend: an output matrix is cut into blocks of whole rows
//! (or, for a single row, of columns) and each block is computed on its own thread by the
//! same code that would compute it alone. Every output element therefore sees exactly the
//! same arithmetic in the same order whatever the number of threads: results are identical
//! on 1 or 64 cores, and between native and wasm (where rayon, without threads, runs all
//! blocks on the calling thread).

use rayon::prelude::*;

/// Calls `f(first_row, block)` for disjoint blocks of whole rows of `out` (rows of `width`
/// elements), in parallel. Blocks have at least `min_rows` rows (the kernels' token tile) and
/// there are about as many as threads.
pub fn rows<T: Send>(
    out: &mut [T],
    width: usize,
    min_rows: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    assert!(
        width > 0 && out.len().is_multiple_of(width),
        "par::rows: not whole rows"
    );
    let n = out.len() / width;
    let per = n
        .div_ceil(rayon::current_num_threads())
        .max(min_rows)
        .max(1);
    if per >= n {
        return f(0, out);
    }
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(b, block)| f(b * per, block));
}

/// Calls `f(first, chunk)` for disjoint chunks of `out` of at least `min_len` elements, in
/// parallel.
pub fn chunks<T: Send>(out: &mut [T], min_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    rows(out, 1, min_len, f)
}
