//! Fetching one shard for the loader: read through the store (which retries transient failures for up to
//! [`crate::store::RETRY_FOR`]), check its size and SHA-256 against the manifest, parse it. A missing or corrupt shard is an error naming its key; a loader configured to tolerate
//! them skips it and counts it.

use crate::manifest::ShardRecord;
use crate::shard::{Sample, read_shard};
use crate::store::{Store, StoreError};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("shard {key} is missing from {uri}")]
    Missing { uri: String, key: String },
    #[error("shard {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(StoreError),
}

/// Shards fetched, skipped and read, for the loader's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub fetched: u64,
    pub bytes: u64,
    pub skipped_missing: u64,
    pub skipped_corrupt: u64,
}

pub async fn fetch_shard(store: &Store, shard: &ShardRecord) -> Result<Vec<Sample>, FetchError> {
    let corrupt = |reason: String| FetchError::Corrupt { key: shard.key.clone(), reason };
    // The size is compared before the body is read: a shard of another size is never downloaded.
    let bytes = store.get_sized(&shard.key, shard.bytes).await.map_err(|e| match e {
        StoreError::NotFound { uri, key } => FetchError::Missing { uri, key },
        StoreError::Size { found, expected, .. } => corrupt(format!("{found} bytes, the manifest says {expected}")),
        other => FetchError::Store(other),
    })?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != shard.sha256 {
        return Err(corrupt(format!("SHA-256 {sha}, the manifest says {}", shard.sha256)));
    }
    read_shard(&shard.key, &bytes).map_err(|e| corrupt(e.reason))
}

/// `fetch_shard`, or with `skip_bad` a missing or corrupt shard becomes `None` and is counted.
pub async fn fetch_or_skip(
    store: &Store,
    shard: &ShardRecord,
    skip_bad: bool,
    stats: &mut FetchStats,
) -> Result<Option<Vec<Sample>>, FetchError> {
    match fetch_shard(store, shard).await {
        Ok(samples) => {
            stats.fetched += 1;
            stats.bytes += shard.bytes;
            Ok(Some(samples))
        }
        Err(FetchError::Missing { .. }) if skip_bad => {
            tracing::warn!(shard = %shard.key, "missing shard skipped");
            stats.skipped_missing += 1;
            Ok(None)
        }
        Err(FetchError::Corrupt { reason, .. }) if skip_bad => {
            tracing::warn!(shard = %shard.key, %reason, "corrupt shard skipped");
            stats.skipped_corrupt += 1;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
