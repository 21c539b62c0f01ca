//! Object storage with one code path for `s3://bucket/prefix` (any S3-compatible server), `file:///dir` and
//! plain paths, through `object_store`. S3 settings come from the standard environment: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` / `AWS_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) for a
//! non-AWS server (plain `http://` endpoints are allowed). Credentials are never logged: [`Store::uri`] is the
//! location only. Failed requests are retried for up to [`RETRY_FOR`], backing off up to 5 s between tries:
//! `object_store`'s default (10 tries with jittered backoff from 100 ms) can give up after under 2 s of
//! outage (seen in a test), too little for a training job to ride out a storage restart.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// How long a request is retried before the error surfaces.
pub const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// How long [`Store::check_reachable`] tries before calling the storage unreachable.
pub const PROBE_FOR: std::time::Duration = std::time::Duration::from_secs(10);

fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(5),
            base: 2.0,
        },
        // Bounded by time, not count.
        max_retries: usize::MAX,
        retry_timeout: RETRY_FOR,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{uri}: {reason}")]
    Open { uri: String, reason: String },
    #[error("{uri}/{key}: not found")]
    NotFound { uri: String, key: String },
    #[error("{uri}/{key}: {reason}")]
    Request { uri: String, key: String, reason: String },
    /// An object of another size than the one its reader was told (read no further than its headers).
    #[error("{uri}/{key}: {found} bytes, expected {expected}")]
    Size { uri: String, key: String, found: u64, expected: u64 },
    #[error("{uri}: cannot reach the storage{} within {}s: {reason}", .endpoint.as_ref().map(|e| format!(" at {e}")).unwrap_or_default(), PROBE_FOR.as_secs())]
    Unreachable { uri: String, endpoint: Option<String>, reason: String },
}

#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same storage without retries, for [`Store::check_reachable`].
    probe: Arc<dyn ObjectStore>,
    /// The S3 endpoint, when not AWS's default (for messages; it holds no credential).
    endpoint: Option<String>,
    prefix: String,
    uri: String,
    /// The directory of a local store: its writes are made durable (fsync) before they return.
    local_root: Option<std::path::PathBuf>,
}

/// The process's `AWS_*` variables that have a value (an empty one counts as unset), by name.
pub fn aws_environment() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, v)| k.starts_with("AWS_") && !v.is_empty())
        .collect();
    vars.sort();
    vars
}

impl Store {
    pub fn open(uri: &str) -> Result<Store, StoreError> {
        Self::open_with(uri, &[])
    }

    /// Like [`Store::open`], with S3 settings (`object_store` config keys such as `aws_endpoint`,
    /// `aws_access_key_id`) that take precedence over the environment's.
    pub fn open_with(uri: &str, s3_options: &[(&str, &str)]) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open { uri: uri.to_string(), reason };
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(open_err("no bucket name (s3://bucket/prefix)".into()));
            }
            // The AWS_* environment, as `AmazonS3Builder::from_env` reads it, except that an empty variable
            // counts as unset (CI systems and shells export empty secrets; an empty key or endpoint would be
            // used as given).
            let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
            for (name, value) in aws_environment() {
                if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    builder = builder.with_config(key, value);
                }
            }
            let env = |name: &str| aws_environment().into_iter().find(|(n, _)| n == name).map(|(_, v)| v);
            let endpoint = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT"));
            if let Some(endpoint) = &endpoint {
                builder = builder.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
            }
            if let Some(region) = env("AWS_REGION") {
                builder = builder.with_region(region);
            }
            for (key, value) in s3_options {
                let key: AmazonS3ConfigKey = key.parse().map_err(|e: object_store::Error| open_err(e.to_string()))?;
                builder = builder.with_config(key, *value);
            }
            let builder = builder.with_virtual_hosted_style_request(false);
            let probe = builder
                .clone()
                .with_retry(RetryConfig { max_retries: 0, ..retry_config() })
                .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), "3s")
                .build()
                .map_err(|e| open_err(e.to_string()))?;
            let s3 = builder.with_retry(retry_config()).build().map_err(|e| open_err(e.to_string()))?;
            return Ok(Store {
                inner: Arc::new(s3),
                probe: Arc::new(probe),
                endpoint,
                prefix: prefix.trim_matches('/').to_string(),
                uri: uri.to_string(),
                local_root: None,
            });
        }
        let dir = uri.strip_prefix("file://").unwrap_or(uri);
        if dir.is_empty() || uri.contains("://") && !uri.starts_with("file://") {
            return Err(open_err("expected s3://bucket/prefix, file:///dir or a directory path".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create the directory: {e}")))?;
        let local: Arc<dyn ObjectStore> =
            // Deleting a directory's last object removes the directory, as on S3 (pruned checkpoints leave none).
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(|e| open_err(e.to_string()))?.with_automatic_cleanup(true));
        Ok(Store {
            inner: local.clone(),
            probe: local,
            endpoint: None,
            prefix: String::new(),
            uri: uri.to_string(),
            local_root: Some(std::path::PathBuf::from(dir)),
        })
    }

    /// The location, without any credential.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() { ObjectPath::from(key) } else { ObjectPath::from(format!("{}/{key}", self.prefix)) }
    }

    fn request_err(&self, key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => {
                StoreError::NotFound { uri: self.uri.clone(), key: key.to_string() }
            }
            other => StoreError::Request { uri: self.uri.clone(), key: key.to_string(), reason: other.to_string() },
        }
    }

    /// Runs a request again while it fails with a transport or server error, backing off up to 5 s, until
    /// [`RETRY_FOR`] has passed since the first try. `object_store` retries most failures itself; this catches
    /// the ones it classifies as not retryable, such as a pooled connection the server had just closed
    /// ("error sending request", seen in CI right after a server restart). Every request here is
    /// idempotent: whole-object PUT, GET, HEAD, LIST.
    async fn retrying<T, F, Fut>(&self, key: &str, mut request: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let start = std::time::Instant::now();
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match request().await {
                Err(StoreError::Request { reason, .. }) if start.elapsed() < RETRY_FOR => {
                    tracing::warn!(uri = %self.uri, key, %reason, "storage request failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Fails within [`PROBE_FOR`] when the storage cannot be reached at all (a wrong endpoint, a server that is
    /// down, refused credentials), instead of the [`RETRY_FOR`] window that requests get to ride out an outage:
    /// jobs call it before they start, so a typo costs seconds. `key` not existing is fine.
    pub async fn check_reachable(&self, key: &str) -> Result<(), StoreError> {
        let start = std::time::Instant::now();
        loop {
            let reason = match self.probe.head(&self.path(key)).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if start.elapsed() + std::time::Duration::from_millis(500) >= PROBE_FOR {
                return Err(StoreError::Unreachable { uri: self.uri.clone(), endpoint: self.endpoint.clone(), reason });
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Writes an object whole (S3 PUT and the local store's write-then-rename are both atomic). On a local store
    /// the file and its directory are synced before this returns, so that a power loss cannot leave a commit
    /// whose data is not on disk (object_store's local backend does not sync).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.retrying(key, || async {
            self.inner.put(&self.path(key), PutPayload::from(bytes.clone())).await.map_err(|e| self.request_err(key, e))
        })
        .await?;
        self.sync_local(key, true)
    }

    /// fsync of a local store's file `key` (`file`) and of its directory; nothing for S3.
    fn sync_local(&self, key: &str, file: bool) -> Result<(), StoreError> {
        let Some(root) = &self.local_root else { return Ok(()) };
        let path = root.join(key);
        let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        let err = |e: std::io::Error| StoreError::Request {
            uri: self.uri.clone(),
            key: key.to_string(),
            reason: format!("syncing to disk: {e}"),
        };
        if file {
            sync(&path).map_err(err)?;
        }
        match path.parent() {
            // A directory removed with its last object has nothing left to sync.
            Some(dir) if dir.exists() => sync(dir).map_err(err),
            _ => Ok(()),
        }
    }

    /// Writes an object only if none is there (`PutMode::Create`: O_EXCL-like on a local store, `If-None-Match: *`
    /// on S3); `Ok(false)` when one is. Some S3 servers (Garage) ignore the condition and overwrite: callers that
    /// need exclusivity read the object back.
    pub async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let opts = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&self.path(key), PutPayload::from(bytes), opts).await {
            Ok(_) => self.sync_local(key, true).map(|()| true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.request_err(key, e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get_checked(key, None).await
    }

    /// [`Store::get`] of an object whose size is known (a manifest's shard, a commit's object): the size the
    /// response declares is compared first, so an object of another size is never downloaded.
    pub async fn get_sized(&self, key: &str, expected: u64) -> Result<Bytes, StoreError> {
        self.get_checked(key, Some(expected)).await
    }

    async fn get_checked(&self, key: &str, expected: Option<u64>) -> Result<Bytes, StoreError> {
        self.retrying(key, || async {
            let got = self.inner.get(&self.path(key)).await.map_err(|e| self.request_err(key, e))?;
            if let Some(expected) = expected
                && got.meta.size != expected
            {
                return Err(StoreError::Size {
                    uri: self.uri.clone(),
                    key: key.to_string(),
                    found: got.meta.size,
                    expected,
                });
            }
            got.bytes().await.map_err(|e| self.request_err(key, e))
        })
        .await
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.retrying(key, || async {
            match self.inner.head(&self.path(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.request_err(key, e)),
            }
        })
        .await
    }

    /// The immediate "sub-directories" under `dir` ("" for the store's root): their names, sorted.
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let base = if dir.is_empty() { self.path("") } else { self.path(dir) };
        let base = if base.as_ref().is_empty() { None } else { Some(base) };
        let listed = self.inner.list_with_delimiter(base.as_ref()).await.map_err(|e| self.request_err(dir, e))?;
        let mut names: Vec<String> =
            listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(&self.path(key)).await.map_err(|e| self.request_err(key, e))?;
        self.sync_local(key, false)
    }
}

/// The runtime every [`Blocking`] call runs on: one per process, made on first use, never dropped (so
/// pooled connections are never left to a runtime that is gone).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-io")
            .enable_all()
            .build()
            .expect("the store's tokio runtime")
    })
}

/// Runs `future` to completion on the store's runtime, for synchronous callers (not from async code).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

impl Store {
    /// The same calls for synchronous code (checkpoints, plans, heartbeats, the feature cache, the
    /// orchestrator), each run to completion on one runtime the process shares. Not for use inside async code:
    /// the loader's fetch stage calls the async methods.
    pub fn blocking(&self) -> Blocking<'_> {
        Blocking(self)
    }
}

/// [`Store::blocking`].
pub struct Blocking<'a>(&'a Store);

impl Blocking<'_> {
    pub fn check_reachable(&self, key: &str) -> Result<(), StoreError> {
        block_on(self.0.check_reachable(key))
    }

    pub fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        block_on(self.0.put(key, bytes))
    }

    pub fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        block_on(self.0.get(key))
    }

    pub fn get_sized(&self, key: &str, expected: u64) -> Result<Bytes, StoreError> {
        block_on(self.0.get_sized(key, expected))
    }

    pub fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        block_on(self.0.put_if_absent(key, bytes))
    }

    pub fn exists(&self, key: &str) -> Result<bool, StoreError> {
        block_on(self.0.exists(key))
    }

    pub fn list_dirs(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        block_on(self.0.list_dirs(dir))
    }

    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        block_on(self.0.delete(key))
    }
}
