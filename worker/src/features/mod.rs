//! The frozen-encoder feature cache. The CLIP and Wav2Vec 2.0 encoders never train, so `worker extract` runs
//! them once over every training clip and stores what the trainable head consumes; training then reads those
//! features instead of decoding frames and running the encoders, with the same sampler (sharding, order,
//! class balance, cursor and resume are unchanged) and the same results.
//!
//! - What is cached: per training clip (the clips of `data.frames_per_clip` / `data.stride`), its per-frame
//!   CLIP image embeddings, face mask and labels, and the Wav2Vec 2.0 states the adapter takes (the last layer,
//!   or every layer for the weighted sum) with their valid length. Audio is cached per clip, not per frame,
//!   because Wav2Vec 2.0 sees each clip's audio as one sequence (its attention and group norm span the clip).
//! - Per-frame CLIP image embeddings of every video of every split (`frames/<video>.safetensors`), so that
//!   validation, `worker evaluate` and `worker predict` encode no face (their audio stays per window).
//! - Layout: one safetensors object per unit of the sampler (the clips whose target frame lies in one frame
//!   shard), `<video>/<unit:05>.safetensors`, stacked per field, in `f32` (exact) or `f16`.
//! - `features.json`, written last, is the commit point: the cache key, and every unit's size and SHA-256.
//!   The key holds the SHA-256 of both encoders' weight files, the preprocessing settings and the SHA-256 of
//!   the dataset's `manifest.json`; training refuses a cache whose key differs, saying what differs.
//! - Extraction runs under mpirun (videos balanced over ranks); a unit already in the store is not encoded or
//!   written again, so a killed extraction resumes where it stopped, and every object is written whole.

mod extract;
mod frames;
mod key;
mod loader;
mod unit;

pub use extract::{ExtractReport, extract};
pub use frames::FramesRecord;
pub use key::{CACHE_KEY, CACHE_MANIFEST, CacheKey, CacheManifest, Preprocessing, UnitRecord};
pub use loader::{Cache, CachedBatch, FeatureLoader, open_cache};
pub use unit::check_unit;
