//! Reading the tar shards that ingest writes (see `ingest` for the sample layout). Zero-copy: a sample's
//! JPEGs and audio are slices of the shard's buffer, so a parsed shard takes the memory of its bytes, which is
//! what the loader's budget counts.

use std::collections::BTreeMap;

use bytes::Bytes;

/// One segment of one video.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    /// JPEG bytes of each frame's face, in frame order.
    pub faces: Vec<Bytes>,
    /// 16 kHz mono PCM of the segment's frames, little-endian f32 (see [`Sample::audio`]).
    pub pcm: Bytes,
    /// Per frame, -1 = ignored.
    pub labels: Vec<i8>,
    /// Per frame, 1 where the face crop was missing and the nearest earlier one stands in.
    pub face_missing: Vec<u8>,
    pub meta: serde_json::Value,
}

impl Sample {
    /// The audio samples.
    pub fn audio(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.pcm.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn audio_len(&self) -> usize {
        self.pcm.len() / 4
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{shard}: {reason}")]
pub struct ShardError {
    pub shard: String,
    pub reason: String,
}

/// Parses a shard's bytes into its samples, in key order. `name` is used in errors.
pub fn read_shard(name: &str, bytes: &Bytes) -> Result<Vec<Sample>, ShardError> {
    let err = |reason: String| ShardError { shard: name.to_string(), reason };
    let mut files: BTreeMap<String, BTreeMap<String, Bytes>> = BTreeMap::new();
    let mut archive = tar::Archive::new(&bytes[..]);
    for entry in archive.entries().map_err(|e| err(format!("not a tar archive: {e}")))? {
        let entry = entry.map_err(|e| err(format!("bad tar entry: {e}")))?;
        let path = entry.path().map_err(|e| err(e.to_string()))?.display().to_string();
        let (key, ext) = path.split_once('.').ok_or_else(|| err(format!("`{path}` has no extension")))?;
        let start = entry.raw_file_position() as usize;
        let end = start.checked_add(entry.size() as usize).filter(|&end| end <= bytes.len());
        let end = end.ok_or_else(|| err(format!("`{path}` is cut short: the archive is truncated")))?;
        files.entry(key.to_string()).or_default().insert(ext.to_string(), bytes.slice(start..end));
    }
    files
        .into_iter()
        .map(|(key, mut parts)| {
            let mut take = |ext: &str| parts.remove(ext).ok_or_else(|| err(format!("sample `{key}` has no .{ext}")));
            let meta: serde_json::Value =
                serde_json::from_slice(&take("json")?).map_err(|e| err(format!("`{key}.json`: {e}")))?;
            let pcm = take("audio.f32")?;
            if pcm.len() % 4 != 0 {
                return Err(err(format!("`{key}.audio.f32` has {} bytes, not a whole number of f32", pcm.len())));
            }
            let labels = take("labels.i8")?.iter().map(|&b| b as i8).collect::<Vec<_>>();
            if let Some(bad) = labels.iter().find(|&&l| !(-1..crate::NUM_CLASSES as i8).contains(&l)) {
                return Err(err(format!("`{key}.labels.i8`: label {bad} is not -1 (ignored) or a class 0..8")));
            }
            let face_missing = take("mask.u8")?.to_vec();
            if face_missing.len() != labels.len() {
                return Err(err(format!("`{key}`: {} labels but {} mask bytes", labels.len(), face_missing.len())));
            }
            let faces = (0..labels.len()).map(|i| take(&format!("{i:03}.jpg"))).collect::<Result<Vec<_>, _>>()?;
            Ok(Sample { key, faces, pcm, labels, face_missing, meta })
        })
        .collect()
}
