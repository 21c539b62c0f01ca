//! A rank's working context, opened the same way by `train`, `extract`, `evaluate` and `predict`: torch
//! threads, the device, mixed precision, the shard store and its manifest, and the model built from them.

use std::sync::Arc;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::loader::Batch;
use avexpr_data::manifest::{Manifest, read_manifest_bytes};
use avexpr_data::store::Store;
use avexpr_model::{EncoderOptions, Encoders, ExprModel, RawBatch};
use bytes::Bytes;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::CheckpointStore;
use crate::dist::Dist;
use crate::job::JobConfig;

pub struct Session<'a> {
    pub job: &'a JobConfig,
    pub dist: &'a Dist,
    pub device: Device,
    /// The trainable head under bf16 autocast (`train.mixed_precision` on this device).
    pub mixed_precision: bool,
    /// The shard store (`data.shards`).
    pub store: Store,
    pub manifest: Arc<Manifest>,
    /// `manifest.json` as stored (the feature cache's key hashes it).
    pub manifest_bytes: Bytes,
}

impl<'a> Session<'a> {
    /// Sets the torch threads, picks the device and reads the dataset's manifest.
    pub fn open(job: &'a JobConfig, dist: &'a Dist) -> Result<Self> {
        set_threads(job);
        let device = device_for(dist);
        let store = Store::open(&job.data.shards).context("data.shards")?;
        let (manifest_bytes, mut manifest) = read_manifest_bytes(&store).context("data.shards")?;
        if let Some(folds) = &job.data.folds {
            avexpr_data::folds::apply(&mut manifest, folds);
        }
        Ok(Session {
            job,
            dist,
            device,
            mixed_precision: job.train.mixed_precision.enabled(device),
            store,
            manifest: Arc::new(manifest),
            manifest_bytes,
        })
    }

    /// The frozen encoders and the trainable head on the device, initialised from `train.seed`.
    pub fn build_model(&self) -> Result<ExprModel> {
        let precision =
            if self.device.is_cuda() { avexpr_model::Precision::Bf16 } else { avexpr_model::Precision::F32 };
        let encoders = Encoders::load(&self.job.model, EncoderOptions { device: self.device, precision })?;
        // The initial variables come from the seed (and are rank 0's everywhere after the broadcast).
        tch::manual_seed(self.job.train.seed as i64);
        Ok(ExprModel::new(&self.job.model, encoders, Some(class_counts(&self.manifest)), self.device)?)
    }

    /// The model with the trainable variables of a checkpoint of the job (`best`, `latest` or a name), or of
    /// another store (`<store URI>/<best, latest or a name>`, e.g. another fold's), and the checkpoint's name.
    pub fn load_checkpoint(&self, checkpoint: &str) -> Result<(ExprModel, String)> {
        let job = self.job;
        let (uri, which) = match checkpoint.rsplit_once('/') {
            Some((uri, which)) => (uri, which),
            None => (job.checkpoint.uri.as_str(), checkpoint),
        };
        let ckpt = CheckpointStore::open(uri, job.checkpoint.keep_last_k)?.select(which)?;
        let model = self.build_model()?;
        let named: Vec<(String, Tensor)> = model.trainable_groups().into_values().flatten().collect();
        ckpt.restore_variables(&named)?;
        let name = if uri == job.checkpoint.uri { ckpt.name } else { format!("{uri}/{}", ckpt.name) };
        Ok((model, name))
    }
}

/// Training-set frames per class, from the manifest (for the class weights).
fn class_counts(manifest: &Manifest) -> [f64; avexpr_data::NUM_CLASSES] {
    let mut counts = [0.0; avexpr_data::NUM_CLASSES];
    for v in manifest.videos.iter().filter(|v| v.split == Split::Train) {
        for (c, n) in counts.iter_mut().zip(v.label_histogram) {
            *c += n as f64;
        }
    }
    counts
}

/// The rank's GPU (by local rank) when CUDA is available, else the CPU.
pub fn device_for(dist: &Dist) -> Device {
    if tch::Cuda::is_available() {
        Device::Cuda(dist.local_rank % tch::Cuda::device_count().max(1) as usize)
    } else {
        Device::Cpu
    }
}

/// Torch threads: `train.threads`, else the host's cores divided among its ranks.
fn set_threads(job: &JobConfig) {
    let threads = if job.train.threads > 0 {
        job.train.threads
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Ranks of one host share its cores.
        let local = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(1usize);
        (cores / local.max(1)).max(1)
    };
    tch::set_num_threads(threads as i32);
}

/// A loader batch as the model's input tensors, and the per-frame labels.
pub fn raw_batch(b: &Batch) -> (RawBatch, Tensor) {
    let (n, f, s) = (b.len() as i64, b.frames as i64, b.image_size as i64);
    let frames = Tensor::from_slice(&b.faces).view([n, f, 3, s, s]);
    let face_mask = Tensor::from_slice(&b.face_mask).view([n, f]).to_kind(Kind::Bool);
    let audio = Tensor::from_slice(&b.audio).view([n, b.samples as i64]);
    let audio_mask = Tensor::from_slice(&b.audio_mask).view([n, b.samples as i64]).to_kind(Kind::Bool);
    let labels = Tensor::from_slice(&b.labels).view([n, f]).to_kind(Kind::Int64);
    let fps = b.clips.iter().map(|c| c.fps).collect();
    (RawBatch { frames, face_mask, audio, audio_mask, fps }, labels)
}
