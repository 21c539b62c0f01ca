//! A training job's YAML config: the `data`, `model`, `train` and `checkpoint` sections and the run folder.
//! Unknown fields are rejected; every error names the file and the field (`train.global_batch: ...`).

use std::path::{Path, PathBuf};

use avexpr_data::config::DataConfig;
use avexpr_data::loader::LoaderConfig;
use avexpr_data::sampler::SamplerConfig;
use avexpr_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::optim::AdamWConfig;

/// A job file's error: the file, the field at fault (empty when the file as a whole is: unreadable, not text)
/// and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {}{reason}", if .field.is_empty() { String::new() } else { format!("{}: ", .field) })]
pub struct JobError {
    pub path: PathBuf,
    pub field: String,
    pub reason: String,
}

/// `train`: batch arithmetic, optimizer, schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Clips per optimizer step over all ranks: micro_batch x ranks x accumulation steps.
    pub global_batch: usize,
    /// Clips per forward pass on one rank.
    pub micro_batch: usize,
    /// Optimizer steps.
    pub steps: u64,
    pub optimizer: AdamWConfig,
    pub warmup_steps: u64,
    /// The cosine ends at this fraction of the peak learning rate.
    pub min_lr_ratio: f64,
    /// Gradient-norm clipping (0: off).
    pub clip_grad_norm: f64,
    pub seed: u64,
    /// Torch threads per rank (0: the host's cores divided among its ranks).
    pub threads: usize,
    /// Size of the gradient all-reduce buckets.
    pub bucket_bytes: usize,
    pub log_every: u64,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validate after the last step too (false: benchmarks, or a separate `worker evaluate` later).
    pub eval_at_end: bool,
    /// bf16 autocast of the trainable forward and loss: `auto` (on CUDA only), `bf16`, `off`.
    pub mixed_precision: MixedPrecision,
    /// TensorBoard event files under `<run_dir>/tensorboard/` (rank 0): the logged scalars and the validation
    /// confusion matrix.
    pub tensorboard: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    #[default]
    Auto,
    Bf16,
    Off,
}

impl MixedPrecision {
    /// Whether the trainable part runs under bf16 autocast on `device`.
    pub fn enabled(self, device: tch::Device) -> bool {
        match self {
            MixedPrecision::Auto => device.is_cuda(),
            MixedPrecision::Bf16 => true,
            MixedPrecision::Off => false,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            global_batch: 32,
            micro_batch: 32,
            steps: 1000,
            optimizer: AdamWConfig::default(),
            warmup_steps: 50,
            min_lr_ratio: 0.0,
            clip_grad_norm: 1.0,
            seed: 0,
            threads: 0,
            bucket_bytes: 4 << 20,
            log_every: 10,
            eval_every: 0,
            eval_at_end: true,
            mixed_precision: MixedPrecision::Auto,
            tensorboard: true,
        }
    }
}

/// `checkpoint`: where and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Store URI (default: `<run_dir>/checkpoints`).
    pub uri: String,
    /// Every this many optimizer steps, and at the end.
    pub every: u64,
    pub keep_last_k: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { uri: String::new(), every: 100, keep_last_k: 3 }
    }
}

/// `launch`: how `orchestrator launch` starts, watches and restarts the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchSection {
    /// Relaunches (with `--resume auto`) after a failed or hung attempt before giving up.
    pub max_restarts: u32,
    /// A rank whose heartbeat has not advanced for this long is hung (it must cover start-up, an evaluation
    /// pass and a checkpoint write; ranks beat on every step and every evaluation batch).
    pub heartbeat_timeout_s: f64,
    /// How often a rank writes its heartbeat (at most).
    pub heartbeat_every_s: f64,
    /// Extra `mpirun` arguments (e.g. `--mca btl_tcp_if_include eth0`), for the local and hostfile targets
    /// and the Kubernetes launcher.
    pub mpirun_args: Vec<String>,
    /// Hostfile launches over several hosts: every host mounts the job's local store paths (shards,
    /// checkpoints, the feature cache) with the same content, e.g. over NFS. Without it, local store paths are
    /// refused there (each host would read or write its own copy). The job file reaches the ranks through the
    /// checkpoint store either way; the encoders' directories must exist on every host (like the binaries).
    pub shared_filesystem: bool,
    pub k8s: K8sSection,
    pub slurm: SlurmSection,
}

/// `launch.slurm`: what the rendered sbatch script asks of the cluster (`orchestrator launch --target slurm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSection {
    /// `--partition` ("": the cluster's default).
    pub partition: String,
    /// `--time`, e.g. `24:00:00` ("": the partition's limit). Before it runs out, Slurm sends the warning
    /// signal; the ranks checkpoint and the job requeues itself and resumes.
    pub time: String,
    /// Seconds before the time limit (or a preemption's grace) that the ranks get SIGUSR1: time for a step, an
    /// evaluation if one is due and a checkpoint write.
    pub signal_s: u32,
    /// Ask for `--gpus-per-node` GPUs per node (off for CPU clusters without GPU GRES).
    pub gpus: bool,
    /// Extra `#SBATCH` options, e.g. `--account=abaw`, `--qos=normal`.
    pub sbatch_args: Vec<String>,
}

impl Default for SlurmSection {
    fn default() -> Self {
        Self { partition: String::new(), time: String::new(), signal_s: 300, gpus: true, sbatch_args: Vec::new() }
    }
}

impl Default for LaunchSection {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            heartbeat_timeout_s: 600.0,
            heartbeat_every_s: 2.0,
            mpirun_args: Vec::new(),
            shared_filesystem: false,
            k8s: K8sSection::default(),
            slurm: SlurmSection::default(),
        }
    }
}

/// `launch.k8s`: what the rendered MPIJob asks of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sSection {
    /// The worker image built from k8s/Dockerfile and pushed to your registry; required, best by digest
    /// (`registry.example.org/avexpr/worker@sha256:...`). No default: a default would name an image on a
    /// public registry, which would then receive the S3 Secret.
    pub image: String,
    pub namespace: String,
    /// CPU cores and memory per worker pod (requests = limits).
    pub cpu: String,
    pub memory: String,
    /// The Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_ENDPOINT_URL,
    /// AWS_REGION) for the store.
    pub s3_secret: String,
    /// A PersistentVolumeClaim mounted at /cache in worker pods ("": none), e.g. shards near the nodes.
    pub cache_pvc: String,
    /// The extended resource that counts GPUs (`nvidia.com/gpu`); "" for CPU-only pods.
    pub gpu_resource: String,
    /// An elastic launch (`--min-nodes`): how long a worker pod may stay unschedulable before the attempt is
    /// relaunched on the worker pods the cluster did place (a pod merely waiting for its image is not counted).
    pub unschedulable_s: f64,
}

impl Default for K8sSection {
    fn default() -> Self {
        Self {
            image: String::new(),
            namespace: "default".into(),
            cpu: "8".into(),
            memory: "64Gi".into(),
            s3_secret: "avexpr-s3".into(),
            cache_pvc: String::new(),
            gpu_resource: "nvidia.com/gpu".into(),
            unschedulable_s: 300.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    #[serde(default)]
    run_dir: Option<PathBuf>,
    #[serde(default)]
    data: DataConfig,
    model: ModelConfig,
    #[serde(default)]
    train: TrainSection,
    #[serde(default)]
    checkpoint: CheckpointSection,
    #[serde(default)]
    launch: LaunchSection,
}

/// A validated job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// Local folder for metrics and plots.
    pub run_dir: PathBuf,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub launch: LaunchSection,
    /// The file it was read from, for messages (not saved with checkpoints).
    #[serde(skip)]
    pub source: PathBuf,
}

impl JobConfig {
    pub fn from_file(path: &Path) -> Result<JobConfig, JobError> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError {
            path: path.to_path_buf(),
            field: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_text(&text, path)
    }

    /// A job file from a path or from a store (`s3://bucket/run/checkpoints/config/paper.yaml`: where
    /// `orchestrator launch` puts it for ranks on hosts that do not see the launching machine's files).
    pub fn load(location: &Path) -> Result<JobConfig, JobError> {
        let uri = location.to_string_lossy();
        if !uri.starts_with("s3://") {
            return Self::from_file(location);
        }
        let err = |reason: String| JobError { path: location.to_path_buf(), field: String::new(), reason };
        let (dir, file) = uri.rsplit_once('/').ok_or_else(|| err("not an object URI".into()))?;
        let store = avexpr_data::store::Store::open(dir).map_err(|e| err(e.to_string()))?;
        let bytes = store.blocking().get(file).map_err(|e| err(format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| err("not UTF-8 text".into()))?;
        Self::from_text(&text, location)
    }

    /// A job file's text; `path` names it in messages and gives the default `run_dir` (`runs/<file stem>`).
    pub fn from_text(text: &str, path: &Path) -> Result<JobConfig, JobError> {
        let err = |field: &str, reason: String| JobError { path: path.to_path_buf(), field: field.into(), reason };
        let file: JobFile =
            serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
                let path = e.path().to_string();
                err(&path, avexpr_model::config::without_path(&path, e.into_inner().to_string()))
            })?;
        file.model.validate().map_err(|e| err(&e.field, e.reason))?;
        let run_dir = file.run_dir.unwrap_or_else(|| {
            PathBuf::from("runs").join(path.file_stem().map_or("job".into(), |s| s.to_string_lossy().into_owned()))
        });
        let mut checkpoint = file.checkpoint;
        if checkpoint.uri.is_empty() {
            checkpoint.uri = run_dir.join("checkpoints").display().to_string();
        }
        let job = JobConfig {
            run_dir,
            data: file.data,
            model: file.model,
            train: file.train,
            checkpoint,
            launch: file.launch,
            source: path.to_path_buf(),
        };
        job.validate().map_err(|(field, reason)| err(field, reason))?;
        Ok(job)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        // The loader's batch size is train.micro_batch: checked here, where the user writes it.
        if self.train.micro_batch == 0 {
            return Err(("train.micro_batch", "must be positive".into()));
        }
        self.data.validate().map_err(|e| (e.field, e.reason))?;
        for (field, adapt) in self.model.adapts() {
            if !adapt.is_frozen() && self.data.features.is_some() {
                return Err((
                    field,
                    "an adapted encoder changes as it trains, so a feature cache (data.features, made once with \
                     the frozen one) cannot stand in for it: remove data.features, or keep the encoder frozen"
                        .into(),
                ));
            }
        }
        let t = &self.train;
        if t.global_batch == 0 || !t.global_batch.is_multiple_of(t.micro_batch) {
            return Err((
                "train.global_batch",
                format!("{} must be a positive multiple of train.micro_batch ({})", t.global_batch, t.micro_batch),
            ));
        }
        if t.steps == 0 {
            return Err(("train.steps", "must be positive".into()));
        }
        if t.optimizer.lr.is_nan() || t.optimizer.lr <= 0.0 {
            return Err(("train.optimizer.lr", "must be positive".into()));
        }
        if !(0.0..1.0).contains(&t.optimizer.betas[0]) || !(0.0..1.0).contains(&t.optimizer.betas[1]) {
            return Err(("train.optimizer.betas", "each must be in [0, 1)".into()));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(("train.min_lr_ratio", "must be in [0, 1]".into()));
        }
        if t.clip_grad_norm < 0.0 {
            return Err(("train.clip_grad_norm", "must be >= 0 (0: off)".into()));
        }
        if t.log_every == 0 {
            return Err(("train.log_every", "must be positive".into()));
        }
        if self.checkpoint.every == 0 {
            return Err(("checkpoint.every", "must be positive".into()));
        }
        if self.checkpoint.keep_last_k == 0 {
            return Err(("checkpoint.keep_last_k", "must be at least 1 (resuming needs one)".into()));
        }
        let l = &self.launch;
        if l.heartbeat_every_s.is_nan() || l.heartbeat_every_s <= 0.0 {
            return Err(("launch.heartbeat_every_s", "must be positive".into()));
        }
        if l.heartbeat_timeout_s.is_nan() || l.heartbeat_timeout_s < 3.0 * l.heartbeat_every_s {
            return Err((
                "launch.heartbeat_timeout_s",
                format!("must be at least 3 x launch.heartbeat_every_s ({})", l.heartbeat_every_s),
            ));
        }
        if !(l.k8s.unschedulable_s > 0.0 && l.k8s.unschedulable_s.is_finite()) {
            return Err(("launch.k8s.unschedulable_s", "must be a positive number of seconds".into()));
        }
        Ok(())
    }

    /// Data slots (`global_batch / micro_batch`): fixed by the job, whatever the number of ranks. A checkpoint
    /// holds one cursor per slot, so a job resumes on any number of ranks that divides it.
    pub fn slots(&self) -> usize {
        self.train.global_batch / self.train.micro_batch.max(1)
    }

    /// The numbers of ranks the job can run on (the divisors of its slot count).
    pub fn world_sizes(&self) -> Vec<usize> {
        let slots = self.slots();
        (1..=slots).filter(|r| slots.is_multiple_of(*r)).collect()
    }

    /// Micro-batches per optimizer step on each of `world_size` ranks.
    pub fn accumulation(&self, world_size: usize) -> Result<usize, JobError> {
        let per_step = self.train.micro_batch * world_size;
        if !self.train.global_batch.is_multiple_of(per_step) {
            return Err(JobError {
                path: self.source.clone(),
                field: "train.global_batch".into(),
                reason: format!(
                    "{} is not a multiple of train.micro_batch ({}) x ranks ({world_size}): its {} data slots \
                     (global_batch / micro_batch) run on {} rank(s)",
                    self.train.global_batch,
                    self.train.micro_batch,
                    self.slots(),
                    self.world_sizes().iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        Ok(self.train.global_batch / per_step)
    }

    /// The training windows: `data`, labelled at `model.head.target`, shuffled from `train.seed`.
    pub fn sampler(&self) -> SamplerConfig {
        self.data.sampler(self.model.head.target, self.train.seed)
    }

    /// The training loader: `data`, `train.micro_batch` clips per batch.
    pub fn loader(&self) -> LoaderConfig {
        self.data.loader(self.train.micro_batch)
    }

    /// The settings of `saved` (a checkpoint's job) that differ from this job's and that a resumed run cannot
    /// change, each as `field: saved -> now`. What may change: the length of the run and its logging,
    /// evaluation, checkpoint and launch cadence, where the store, shards, cache and encoder checkpoints are,
    /// the loader's performance settings, and mixed precision.
    pub fn changes_that_forbid_resuming(&self, saved: &JobConfig) -> Vec<String> {
        const MAY_CHANGE: [&str; 24] = [
            "run_dir",
            "checkpoint",
            "launch",
            "train.steps",
            "train.log_every",
            "train.tensorboard",
            "train.eval_every",
            "train.eval_at_end",
            "train.threads",
            "train.bucket_bytes",
            // The same state under other numerics (a GPU run resumed on a CPU, or the reverse).
            "train.mixed_precision",
            "data.shards",
            "data.features",
            "data.prefetch_bytes",
            "data.fetch_concurrency",
            "data.decode_threads",
            "data.ready_batches",
            "data.skip_bad",
            "model.clip.checkpoint",
            "model.dinov2.checkpoint",
            "model.wav2vec2.checkpoint",
            "model.clip.revision",
            "model.dinov2.revision",
            "model.wav2vec2.revision",
        ];
        let (now, then) = (serde_json::to_value(self), serde_json::to_value(saved));
        let (Ok(now), Ok(then)) = (now, then) else { return vec!["the config cannot be compared".into()] };
        let mut changed = Vec::new();
        diff("", &then, &now, &mut changed);
        changed.retain(|(field, _)| !MAY_CHANGE.iter().any(|m| field == m || field.starts_with(&format!("{m}."))));
        changed.into_iter().map(|(field, what)| format!("{field}: {what}")).collect()
    }
}

/// The leaves of two JSON values that differ, by path (`train.optimizer.lr`), as `then -> now`. A field one
/// side omits (settings at their default are not serialized) reads `(default)`.
fn diff(path: &str, then: &serde_json::Value, now: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let show = |v: Option<&Value>| v.map_or_else(|| "(default)".to_string(), Value::to_string);
    match (then, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            let empty = Value::Object(Default::default());
            for k in keys {
                let child = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&child, x, y, out),
                    // An omitted section: its leaves, one by one (some of them may change).
                    (Some(x @ Value::Object(_)), None) => diff(&child, x, &empty, out),
                    (None, Some(y @ Value::Object(_))) => diff(&child, &empty, y, out),
                    (x, y) => out.push((child, format!("{} -> {}", show(x), show(y)))),
                }
            }
        }
        (a, b) if a != b => out.push((path.to_string(), format!("{a} -> {b}"))),
        _ => {}
    }
}
