//! The process's allocator settings (glibc): a CPU training step allocates and frees buffers of
//! a few hundred KiB to tens of MiB (activations, gradients, logits) in the same sizes every
//! step. By default glibc serves the largest from fresh mmaps and trims the heap's top back to
//! the kernel, so every step faulted its buffers in again, zeroed page by page on the one thread
//! that allocates while the others waited (`perf`: ~1/8 of the main thread's samples in page
//! faults and page clearing on train-125m). Serving them from the heap and never trimming
//! keeps them in the process after the first step: the peak stays what it was (the same buffers
//! are live at once), only the memory is not handed back between steps.

/// Sets glibc's mmap threshold to its maximum (32 MiB: larger blocks are still mmapped) and
/// turns off trimming. Call once, before the work starts; a failed call leaves the defaults.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tunables; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
