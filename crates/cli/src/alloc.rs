//! The process's allocator settings (glibc): a CPU training step allocates and frees buffers of
//! a few hundred KiB to tens of MiB (activations, gradients, logits) in the same sizes every
//! step. By default glibc serves the largest from fresh mmaps and trims the heap's top back to
//! the kernel, so every step faulted its buffers in again, zeroed page by page on the one thread
//! that allocates while the others waited (`perf`: ~1/8 of the main thread's samples in page
//! faults and page clearing on train-125m). Serving them from the heap and never trimming
//! keeps them in the process after the first step: the peak stays what it was (the same buffers
//! are live at once), only the memory is not handed back between steps.
//!
//! One arena: the CPU trainer's step runs on a pool thread (`core::par::in_pool`), and glibc
//! gives each thread that allocates its own arena, whose heaps are trimmed by other rules and
//! whose blocks above 64 MiB are always mmapped: the step's buffers faulted in again each step
//! (train-125m: 74 K page faults a run on the main arena, 248 K on a thread's). The allocations
//! are few and large, so sharing one arena's lock costs nothing measurable.

/// Sets glibc's mmap threshold to its maximum (32 MiB: larger blocks are still mmapped) and
/// turns off trimming, with every thread on the main arena. Call once, before the work starts;
/// a failed call leaves the defaults.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tunables; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
