//! Bounds on what a dataset's documents and media may declare (manifest, video records, feature units, the
//! decoder's input): beyond them a number is damage or hostility, and trusting it would divide by zero, index
//! out of bounds or allocate what the file asks for.

/// Frames in one video (about 90 hours at 30 fps).
pub const MAX_FRAMES: usize = 10_000_000;
pub const MAX_SEGMENT_FRAMES: usize = 100_000;
pub const MAX_FACE_SIZE: u32 = 4096;
/// Frame rates a video may have (Aff-Wild2's lie between about 7.5 and 60).
pub const FPS: std::ops::RangeInclusive<f64> = 0.5..=1000.0;
/// One shard object.
pub const MAX_SHARD_BYTES: u64 = 16 << 30;
