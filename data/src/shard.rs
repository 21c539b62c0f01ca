//! Reading the tar shards that ingest writes (see `ingest` for the sample layout).

use std::collections::BTreeMap;
use std::io::Read;

/// One segment of one video.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    /// JPEG bytes of each frame's face, in frame order.
    pub faces: Vec<Vec<u8>>,
    /// 16 kHz mono PCM of the segment's frames.
    pub audio: Vec<f32>,
    /// Per frame, -1 = ignored.
    pub labels: Vec<i8>,
    /// Per frame, 1 where the face crop was missing and the nearest earlier one stands in.
    pub face_missing: Vec<u8>,
    pub meta: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
#[error("{shard}: {reason}")]
pub struct ShardError {
    pub shard: String,
    pub reason: String,
}

/// Parses a shard's bytes into its samples, in key order. `name` is used in errors.
pub fn read_shard(name: &str, bytes: &[u8]) -> Result<Vec<Sample>, ShardError> {
    let err = |reason: String| ShardError { shard: name.to_string(), reason };
    let mut files: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().map_err(|e| err(format!("not a tar archive: {e}")))? {
        let mut entry = entry.map_err(|e| err(format!("bad tar entry: {e}")))?;
        let path = entry.path().map_err(|e| err(e.to_string()))?.display().to_string();
        let (key, ext) = path.split_once('.').ok_or_else(|| err(format!("`{path}` has no extension")))?;
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(|e| err(format!("`{path}`: {e}")))?;
        files.entry(key.to_string()).or_default().insert(ext.to_string(), data);
    }
    files
        .into_iter()
        .map(|(key, mut parts)| {
            let mut take = |ext: &str| parts.remove(ext).ok_or_else(|| err(format!("sample `{key}` has no .{ext}")));
            let meta: serde_json::Value =
                serde_json::from_slice(&take("json")?).map_err(|e| err(format!("`{key}.json`: {e}")))?;
            let audio = take("audio.f32")?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            let labels = take("labels.i8")?.into_iter().map(|b| b as i8).collect::<Vec<_>>();
            let face_missing = take("mask.u8")?;
            let faces = (0..labels.len()).map(|i| take(&format!("{i:03}.jpg"))).collect::<Result<Vec<_>, _>>()?;
            Ok(Sample { key, faces, audio, labels, face_missing, meta })
        })
        .collect()
}
