//! Data parallelism for the CPU backend: an output matrix is cut into blocks of whole rows
//! (or, for a single row, of columns) and each block is computed on its own thread by the
//! same code that would compute it alone. Every output element therefore sees exactly the
//! same arithmetic in the same order whatever the number of threads: results are identical
//! on 1 or 64 cores, and between native and wasm (where rayon, without threads, runs all
//! blocks on the calling thread).

use rayon::prelude::*;

/// Calls `f(first_row, block)` for disjoint blocks of whole rows of `out` (rows of `width`
/// elements), in parallel. Blocks have at least `min_rows` rows (the kernels' token tile) and
/// there are about two per thread natively (one on a single thread): the loop starts on one
/// thread ([`in_pool`]) and the others take blocks as they come, so with one block per thread a
/// thread that came late left its block to the first one (train-125m, 2 threads: 217 tok/s
/// against 223 with two per thread). In wasm one per thread: with two, rayon's halving made the
/// threads take blocks back from each other and each wait for the other's (a sleep and an
/// `Atomics.notify` apiece, slow between Web Workers): the page's CPU fallback on 2 threads
/// trained at 601.8 / 605.0 / 587.1 tok/s with two blocks a thread against 632.0 / 672.5 /
/// 621.5 with one (interleaved, BENCHMARKS.md, seventh session).
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
    let threads = rayon::current_num_threads();
    let blocks = if threads == 1 {
        1
    } else if cfg!(target_arch = "wasm32") {
        threads
    } else {
        2 * threads
    };
    let per = n.div_ceil(blocks).max(min_rows).max(1);
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

/// Runs `f` on one of the pool's threads and returns its value (inline when already on one, or
/// when there is a single thread), with the pool's other threads kept awake until it returns.
///
/// A step's many parallel loops then start from a pool thread: each queues its blocks on that
/// thread's own deque and starts on the first one at once. Called from outside the pool, every
/// loop would instead be injected into the pool while the caller slept: two wake-ups per loop
/// (a futex natively, `Atomics.wait`/`notify` between the page's Web Workers), which on small
/// models cost as much as the second thread gained. And the other threads do not go to sleep
/// between loops: rayon parks a thread that finds no work after a few dozen tries (in wasm,
/// where yielding is a no-op, within a microsecond), so each of a step's ~200 loops waited for
/// a wake-up before its blocks were shared (the page's two pool workers slept through 45% of a
/// step, V8's profile). Each other thread runs a helper job for the length of `f` that keeps
/// taking the blocks `f` queues (`rayon::yield_now`) and otherwise spins, as OpenMP's active
/// wait does. A helper that lands on `f`'s own thread (which may run queued jobs while it
/// waits for a block) returns at once, so `f` is never stuck behind one.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let threads = rayon::current_num_threads();
    if threads <= 1 || rayon::current_thread_index().is_some() {
        return f();
    }
    let done = AtomicBool::new(false);
    let owner = AtomicUsize::new(usize::MAX);
    rayon::scope(|s| {
        owner.store(
            rayon::current_thread_index().unwrap_or(usize::MAX),
            Ordering::Release,
        );
        for _ in 1..threads {
            s.spawn(|_| {
                if rayon::current_thread_index() == Some(owner.load(Ordering::Acquire)) {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Set when `f` returns or unwinds: a panic in `f` must not leave the helpers spinning,
        // since the scope waits for them before it passes the panic on.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(&done);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row r of a (rows, 7) matrix: r * 7 + c, computed block by block.
    fn filled(n: usize) -> Vec<u64> {
        let mut out = vec![0u64; n * 7];
        rows(&mut out, 7, 1, |r0, block| {
            for (k, v) in block.iter_mut().enumerate() {
                *v = (r0 * 7 + k) as u64;
            }
        });
        out
    }

    /// in_pool from several threads at once (a pool thread's helper job then runs another
    /// call's step inside it), nested in a pool thread (inline), and around loops of every
    /// size: every call returns, and the rows are the serial ones.
    #[test]
    fn in_pool_returns_the_serial_rows_from_many_threads_at_once() {
        let want = |n: usize| (0..n as u64 * 7).collect::<Vec<_>>();
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for i in 0..60 {
                        let n = 1 + (t * 61 + i * 7) % 97;
                        assert_eq!(in_pool(|| filled(n)), want(n), "thread {t}, {n} rows");
                        let nested = in_pool(|| in_pool(|| filled(n)));
                        assert_eq!(nested, want(n), "nested, thread {t}, {n} rows");
                    }
                });
            }
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| in_pool(|| filled(50))), want(50));
    }

    /// A panic inside the step reaches the caller (the helpers are released, nothing hangs),
    /// and the pool works afterwards.
    #[test]
    fn a_panic_in_pool_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| in_pool(|| -> usize { panic!("step failed") }));
        assert!(r.is_err());
        assert_eq!(in_pool(|| filled(9)), (0..63).collect::<Vec<_>>());
    }
}
