//! Process-wide allocator settings for ranks that run the encoders.
//!
//! libtorch allocates every activation with `posix_memalign`. glibc serves blocks above its mmap threshold
//! (at most 32 MiB by default) with fresh mappings and returns them to the kernel on free, and trims the heap
//! top eagerly, so each forward pass page-faults its large activations in again (a Wav2Vec 2.0 feature-encoder
//! activation is 130 MB for 2 x 10 s of audio). Keeping freed memory in the heap removes those faults: about
//! +10 % frames/s on CLIP and +15 % audio-s/s on Wav2Vec 2.0 in `worker bench-encoders` (see the issue note).
//! The price is that the process's resident size stays at its high-water mark, which a training rank reaches
//! on its first step anyway.

/// Applies the settings; returns whether glibc accepted all of them (always `false` off glibc).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before any worker thread starts.
        let ok = unsafe {
            [
                libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX),
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX),
                libc::mallopt(libc::M_TOP_PAD, 256 << 20),
            ]
        };
        tracing::debug!(?ok, "glibc malloc tuned to keep freed memory");
        ok.iter().all(|&r| r == 1)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
