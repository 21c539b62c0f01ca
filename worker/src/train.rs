//! `worker train`: one rank of a data-parallel training job.
//!
//! - Data: the global batch is `micro_batch x ranks x accumulation` clips from `ranks x accumulation` data
//!   slots (slot = rank x accumulation + micro-step), each a [`RankSampler`] of the same plan. So a global batch
//!   holds the same clips however the job is split: 1 rank accumulating 2 micro-batches sees exactly what 2
//!   ranks see, and the results agree.
//! - Step: for each micro-batch, encoders (frozen, no grad) -> trainable head -> loss / accumulation ->
//!   backward into the gradient buckets; the buckets are averaged over ranks in place, clipped by global norm,
//!   and AdamW steps with the warm-up + cosine learning rate. Dropout draws from a generator reseeded from
//!   (seed, step, slot), so a resumed run draws what the original would have.
//! - Checkpoints ([`crate::checkpoint`]) hold the variables, the optimizer state, the step, every slot's loader
//!   cursor, the resolved config and the metrics so far; `--resume auto` continues from the newest valid one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_data::Expression;
use avexpr_data::layout::Split;
use avexpr_data::loader::{Batch, Loader, Source};
use avexpr_data::metric::Confusion;
use avexpr_data::sampler::{Cursor, RankSampler};
use avexpr_data::store::Store;
use avexpr_model::ExprModel;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::buckets::Buckets;
use crate::checkpoint::{Best, COMMIT, CheckpointState, CheckpointStore, checkpoint_name};
use crate::dist::Dist;
use crate::eval::{evaluate, summary};
use crate::job::JobConfig;
use crate::lease::{LEASE_ENV, Lease};
use crate::metrics::{Phases, StepMetrics};
use crate::optim::{AdamW, clip_grad_norm, learning_rate};
use crate::preempt::{Preempted, Preemption};
use crate::session::{Session, raw_batch};
use crate::tensorboard::EventWriter;
use avexpr_data::files::replace_with;

pub struct TrainOptions {
    pub resume: bool,
    /// A fresh start (`resume: false`) into a store that holds checkpoints deletes them first (else refused).
    pub overwrite: bool,
    /// An explicit shard plan (`orchestrator plan`); `None`: the balanced plan every rank computes.
    pub plan: Option<crate::plan::JobPlan>,
}

/// Where a data slot's training batches come from.
enum Feed {
    Frames(Loader),
    Cached(crate::features::FeatureLoader),
}

/// One batch of a [`Feed`]: frames for the encoders, or their cached outputs.
enum Fed {
    Frames(Batch),
    Cached(crate::features::CachedBatch),
}

/// What a finished training run reports: its logged steps and the final validation (summed over ranks).
pub struct Trained {
    pub history: Vec<StepMetrics>,
    pub validation: avexpr_data::metric::Confusion,
}

/// Trains the job on this rank: the loop of [`Trainer`].
pub fn train(job: &JobConfig, dist: &Dist, options: &TrainOptions) -> Result<Trained> {
    let mut trainer = Trainer::new(job, dist, options)?;
    while !trainer.finished() {
        let metrics = trainer.step()?;
        let metrics = trainer.maybe_evaluate(metrics)?;
        trainer.log(metrics)?;
        trainer.maybe_checkpoint()?;
        if trainer.preempted {
            crate::heartbeat::update(|h| h.phase = "preempted".into());
            return Err(Preempted { step: trainer.step, checkpoint: checkpoint_name(trainer.step) }.into());
        }
    }
    trainer.finish()
}

/// One rank's training state: the model and its optimizer, the data feeds, the checkpoints and what has been
/// measured so far.
pub struct Trainer<'a> {
    job: &'a JobConfig,
    dist: &'a Dist,
    session: Session<'a>,
    model: ExprModel,
    /// The trainable variables by name (what checkpoints hold and the optimizer steps).
    named: Vec<(String, Tensor)>,
    buckets: Buckets,
    opt: AdamW,
    checkpoints: CheckpointStore,
    /// Micro-batches per step on this rank (one data slot each).
    accumulation: usize,
    feeds: Vec<Feed>,
    /// Every data slot's loader position (only this rank's slots are current between checkpoints).
    cursors: Vec<Cursor>,
    /// Steps done so far (the next step is `step + 1`).
    step: u64,
    history: Vec<StepMetrics>,
    best: Option<Best>,
    last_eval: Option<Confusion>,
    metrics_path: PathBuf,
    /// Rank 0's TensorBoard event file (`train.tensorboard`).
    tensorboard: Option<EventWriter>,
    throughput: Throughput,
    phases: Phases,
    preemption: Preemption,
    /// Some rank was asked to stop (as of the last step): checkpoint and exit.
    preempted: bool,
    /// Rank 0's hold on the checkpoint store (checked before every commit); `None` on the other ranks.
    lease: Option<Lease>,
    _beacon: crate::heartbeat::Beacon,
}

/// Clips trained and seconds waited for data since this process started training.
struct Throughput {
    started: Instant,
    first_step: u64,
    clips: usize,
    waited: f64,
}

impl<'a> Trainer<'a> {
    /// Opens the session, builds the model, restores the newest valid checkpoint when resuming and starts one
    /// data feed per micro-batch.
    pub fn new(job: &'a JobConfig, dist: &'a Dist, options: &TrainOptions) -> Result<Self> {
        let accumulation = job.accumulation(dist.world_size)?;
        let slots = dist.world_size * accumulation;
        let session = Session::open(job, dist)?;
        let device = session.device;
        let checkpoints = CheckpointStore::open(&job.checkpoint.uri, job.checkpoint.keep_last_k)?;
        if let Some(plan) = &options.plan {
            plan.check(job, &session.manifest, dist.world_size)?;
        }
        // Rank 0 writes the store: it holds its lease (or joins the orchestrator's) before anything, heartbeats
        // included, is written there. (A rank 0 that an aborting peer's mpirun is tearing down may hold its
        // lease a few seconds more; `Lease::acquire` waits that long for a holder on the same machine.)
        let lease = if dist.rank == 0 { Some(take_lease(job, checkpoints.store())?) } else { None };
        // The other ranks write their heartbeats only once it is held (a refused rank 0 aborts the job here).
        dist.barrier();
        let beacon = crate::heartbeat::Beacon::start(
            checkpoints.store().clone(),
            dist.rank,
            dist.world_size,
            job.train.steps,
            std::time::Duration::from_secs_f64(job.launch.heartbeat_every_s),
        );

        let model = session.build_model()?;
        let named: Vec<(String, Tensor)> = model.trainable_groups().into_values().flatten().collect();
        let mut vars: Vec<Tensor> = named.iter().map(|(_, v)| v.shallow_clone()).collect();
        let mut buckets = Buckets::new(&vars, job.train.bucket_bytes);
        if let Device::Cuda(ordinal) = device
            && dist.world_size > 1
        {
            buckets.use_nccl(crate::nccl::NcclComm::new(dist, ordinal)?);
            if dist.rank == 0 {
                tracing::info!(version = crate::nccl::version().unwrap_or(0), "gradients all-reduced with NCCL");
            }
        }
        buckets.broadcast_from_root(dist, &mut vars)?;
        buckets.attach_grads(&vars)?;
        // An adapted encoder's variables (`backbone`) learn at their own rate.
        let mut opt = AdamW::new(job.train.optimizer, &named).with_lr_scale(|name| job.model.lr_scale(name));

        if !options.resume && dist.rank == 0 {
            fresh_start(&checkpoints, options.overwrite)?;
        }
        let resumed = if options.resume { resume(job, &checkpoints, slots, &named, &mut opt, dist)? } else { None };
        let Start { step, cursors, history, best } = resumed.unwrap_or_else(|| Start::fresh(slots));
        crate::heartbeat::update(|h| {
            h.resumed_from = step;
            h.step = step;
        });

        let feeds = start_feeds(&session, options, accumulation, &cursors)?;

        std::fs::create_dir_all(&job.run_dir).with_context(|| format!("run_dir {}", job.run_dir.display()))?;
        let metrics_path = job.run_dir.join("metrics.jsonl");
        if dist.rank == 0 {
            start_metrics_file(&metrics_path, &history)?;
        }
        let tensorboard = match dist.rank == 0 && job.train.tensorboard {
            true => Some(EventWriter::create(&job.run_dir.join("tensorboard"))?),
            false => None,
        };

        Ok(Trainer {
            job,
            dist,
            session,
            model,
            named,
            buckets,
            opt,
            checkpoints,
            accumulation,
            feeds,
            cursors,
            step,
            history,
            best,
            last_eval: None,
            metrics_path,
            tensorboard,
            throughput: Throughput { started: Instant::now(), first_step: step, clips: 0, waited: 0.0 },
            phases: Phases::new(device),
            preemption: Preemption::install().context("catching SIGTERM and SIGUSR1")?,
            lease,
            preempted: false,
            _beacon: beacon,
        })
    }

    /// Whether every step of `train.steps` is done.
    pub fn finished(&self) -> bool {
        self.step >= self.job.train.steps
    }

    /// One optimizer step: every micro-batch forward and backward, gradients averaged over ranks, clipped, and
    /// AdamW at this step's learning rate. Returns the step's losses averaged over ranks.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let (job, dist, device) = (self.job, self.dist, self.session.device);
        let model = &self.model;
        self.buckets.zero_grads();
        // Losses (total, classification, contrastive) and the ranks asked to stop, summed over ranks together.
        let mut sums = [0.0f64; 4];
        for (a, feed) in self.feeds.iter_mut().enumerate() {
            let slot = dist.rank * self.accumulation + a;
            let waiting = Instant::now();
            let fed = match feed {
                Feed::Frames(loader) => Fed::Frames(loader.next().context("the training loader ended")??),
                Feed::Cached(loader) => Fed::Cached(loader.next_batch()?),
            };
            let wait = waiting.elapsed().as_secs_f64();
            self.throughput.waited += wait;
            self.phases.data += wait;
            let (feats, labels) = match fed {
                Fed::Frames(batch) => {
                    self.throughput.clips += batch.len();
                    self.cursors[slot] = batch.cursor;
                    let (raw, labels) = raw_batch(&batch);
                    (self.phases.time(|p| &mut p.encoders, || model.encode(&raw))?, labels)
                }
                Fed::Cached(cached) => {
                    self.throughput.clips += cached.len;
                    self.cursors[slot] = cached.cursor;
                    (cached.features, cached.labels)
                }
            };
            tch::manual_seed((job.train.seed ^ (self.step << 20) ^ slot as u64) as i64);
            let accumulation = self.accumulation as f64;
            let terms = self.phases.time(
                |p| &mut p.head,
                || {
                    let terms = avexpr_model::autocast::bf16(device, self.session.mixed_precision, || {
                        let out = model.forward_t(&feats, true);
                        model.loss(&out, &labels.to_device(device))
                    });
                    (&terms.total / accumulation).backward();
                    terms
                },
            );
            for (sum, term) in sums.iter_mut().zip([&terms.total, &terms.classification, &terms.contrastive]) {
                *sum += term.double_value(&[]) / accumulation;
            }
        }
        let buckets = &mut self.buckets;
        self.phases.time(|p| &mut p.all_reduce, || buckets.all_reduce_mean(dist))?;
        let cfg = &job.train;
        let lr = learning_rate(self.step, cfg.optimizer.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio);
        let opt = &mut self.opt;
        let grad_norm = self.phases.time(
            |p| &mut p.optimizer,
            || {
                let max = if cfg.clip_grad_norm > 0.0 { cfg.clip_grad_norm } else { f64::INFINITY };
                let norm = clip_grad_norm(buckets.buffers_mut(), max);
                opt.step(lr);
                norm
            },
        );
        self.phases.steps += 1;
        self.step += 1;

        sums[3] = self.preemption.requested() as u8 as f64;
        dist.all_reduce_sum_f64(&mut sums);
        if sums[3] > 0.0 && !self.preempted {
            self.preempted = true;
            if dist.rank == 0 {
                tracing::warn!(
                    step = self.step,
                    ranks = sums[3] as u64,
                    "preemption requested: checkpointing and stopping"
                );
            }
        }
        let world = dist.world_size as f64;
        let metrics = StepMetrics {
            step: self.step,
            loss: sums[0] / world,
            classification: sums[1] / world,
            contrastive: sums[2] / world,
            lr,
            grad_norm,
            val_macro_f1: None,
            val_f1: None,
        };
        let progress = (dist.rank == 0).then(|| self.progress());
        crate::heartbeat::update(|h| {
            h.phase = "training".into();
            h.step = metrics.step;
            h.loss = Some(metrics.loss);
            if let Some((_, rate, eta)) = progress {
                (h.clips_per_s, h.eta_s) = (Some(rate), Some(eta));
            }
        });
        Ok(metrics)
    }

    /// (elapsed s, clips/s over all ranks, ETA s), as of now.
    fn progress(&self) -> (f64, f64, f64) {
        let t = &self.throughput;
        let elapsed = t.started.elapsed().as_secs_f64();
        let rate = t.clips as f64 * self.dist.world_size as f64 / elapsed;
        let eta = elapsed / (self.step - t.first_step) as f64 * (self.job.train.steps - self.step) as f64;
        (elapsed, rate, eta)
    }

    /// Evaluates on the validation split every `train.eval_every` steps and after the last, keeping the best.
    pub fn maybe_evaluate(&mut self, metrics: StepMetrics) -> Result<StepMetrics> {
        let cfg = &self.job.train;
        let step = self.step;
        if !(cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every) || step == cfg.steps && cfg.eval_at_end) {
            return Ok(metrics);
        }
        let eval = evaluate(&self.session, &self.model, Split::Validation)?;
        let f1 = eval.confusion.macro_f1();
        if self.dist.rank == 0 {
            tracing::info!("step {step}: validation {}", summary(&eval.confusion));
        }
        if self.best.as_ref().is_none_or(|b| f1 > b.macro_f1) {
            self.best = Some(Best { step, macro_f1: f1 });
        }
        self.last_eval = Some(eval.confusion.clone());
        crate::heartbeat::update(|h| {
            h.phase = "training".into();
            h.val_macro_f1 = Some(f1);
        });
        Ok(StepMetrics { val_macro_f1: Some(f1), val_f1: Some(eval.confusion.f1_per_class().to_vec()), ..metrics })
    }

    /// Keeps the step's metrics every `train.log_every` steps, after an evaluation and after the last step;
    /// rank 0 prints them and appends them to `metrics.jsonl`.
    pub fn log(&mut self, m: StepMetrics) -> Result<()> {
        let cfg = &self.job.train;
        let step = self.step;
        if !(step.is_multiple_of(cfg.log_every) || step == cfg.steps || m.val_macro_f1.is_some()) {
            return Ok(());
        }
        if self.dist.rank == 0 {
            let (elapsed, rate, eta) = self.progress();
            let wait = 100.0 * self.throughput.waited / elapsed;
            tracing::info!(
                "step {step}/{} loss {:.4} (cls {:.4}, prompt {:.4}) lr {:.2e} |g| {:.3} \
                 {rate:.2} clips/s data-wait {:.1}% ETA {eta:.0} s",
                cfg.steps,
                m.loss,
                m.classification,
                m.contrastive,
                m.lr,
                m.grad_norm,
                wait,
            );
            let mut file = std::fs::OpenOptions::new().append(true).open(&self.metrics_path)?;
            writeln!(file, "{}", serde_json::to_string(&m)?)?;
            if let Err(e) = self.write_tensorboard(&m, rate, wait) {
                tracing::warn!("TensorBoard: {e:#}; its files stop here");
                self.tensorboard = None;
            }
        }
        self.history.push(m);
        Ok(())
    }

    /// The logged step's scalars and, after a validation, its per-class F1 and confusion matrix (rank 0).
    fn write_tensorboard(&mut self, m: &StepMetrics, clips_per_s: f64, data_wait_pct: f64) -> Result<()> {
        let Some(tb) = &mut self.tensorboard else { return Ok(()) };
        let mut scalars = vec![
            ("train/loss", m.loss),
            ("train/classification", m.classification),
            ("train/contrastive", m.contrastive),
            ("train/lr", m.lr),
            ("train/grad_norm", m.grad_norm),
            ("train/clips_per_s", clips_per_s),
            ("train/data_wait_pct", data_wait_pct),
        ];
        let tags: Vec<String> = Expression::ALL.iter().map(|e| format!("val/f1/{}", e.name())).collect();
        if let Some(f1) = m.val_macro_f1 {
            scalars.push(("val/macro_f1", f1));
        }
        for (tag, f1) in tags.iter().zip(m.val_f1.iter().flatten()) {
            scalars.push((tag, *f1));
        }
        tb.scalars(m.step, &scalars)?;
        if let (Some(_), Some(confusion)) = (m.val_macro_f1, &self.last_eval) {
            let png = self.job.run_dir.join("tensorboard").join(".confusion.png");
            let title = format!("validation, step {}: {}", m.step, summary(confusion));
            crate::plots::confusion_png(&png, confusion, &title)?;
            let bytes = std::fs::read(&png).with_context(|| png.display().to_string())?;
            let _ = std::fs::remove_file(&png);
            tb.png(m.step, "val/confusion", bytes, crate::plots::CONFUSION_PNG_SIZE)?;
        }
        Ok(())
    }

    /// Commits a checkpoint every `checkpoint.every` steps, after the last, at a new best validation (so that
    /// `--checkpoint best` names one that exists) and when preempted (rank 0 writes; all ranks wait).
    pub fn maybe_checkpoint(&mut self) -> Result<()> {
        let (job, dist, step) = (self.job, self.dist, self.step);
        let new_best = self.best.is_some_and(|b| b.step == step);
        if !(step.is_multiple_of(job.checkpoint.every) || step == job.train.steps || new_best || self.preempted) {
            return Ok(());
        }
        crate::heartbeat::update(|h| h.phase = "checkpointing".into());
        let cursors = gather_cursors(dist, &self.cursors, self.accumulation);
        if dist.rank == 0 {
            // Not if another job took the store over (a stale lease, or a server that ignored the create condition).
            if let Some(lease) = &self.lease {
                lease.check()?;
            }
            let state =
                CheckpointState { step, cursors, config: job.clone(), metrics: self.history.clone(), best: self.best };
            self.checkpoints.save(&state, &self.named, &self.opt.state())?;
            tracing::info!(step, uri = %job.checkpoint.uri, "checkpoint committed");
        }
        dist.barrier();
        crate::heartbeat::update(|h| h.phase = "training".into());
        Ok(())
    }

    /// The final validation (evaluated now if the run was resumed with nothing left to train); rank 0 prints the
    /// table and draws `curves.png` and `confusion.png`.
    pub fn finish(self) -> Result<Trained> {
        let (job, dist, step) = (self.job, self.dist, self.step);
        if dist.rank == 0 && self.phases.steps > 0 {
            tracing::info!("{}", self.phases.report(dist.world_size, self.accumulation));
        }
        let validation = match self.last_eval {
            Some(confusion) => Some(confusion),
            None if !job.train.eval_at_end => None,
            None => Some(evaluate(&self.session, &self.model, Split::Validation)?.confusion),
        };
        if dist.rank == 0 {
            match &validation {
                Some(v) => {
                    println!("validation after step {step}: {}", summary(v));
                    print!("{}", v.render(Some(&self.session.manifest.class_ratios)));
                }
                None => println!("no validation after step {step} (train.eval_at_end: false)"),
            }
            let curves =
                replace_with(&job.run_dir.join("curves.png"), |tmp| crate::plots::curves_png(tmp, &self.history));
            let confusion = validation.as_ref().map(|v| {
                replace_with(&job.run_dir.join("confusion.png"), |tmp| {
                    let title = format!("validation, step {step}: {}", summary(v));
                    crate::plots::confusion_png(tmp, v, &title)
                })
            });
            for (file, result) in [("curves.png", Some(curves)), ("confusion.png", confusion)] {
                match result {
                    Some(Ok(())) => tracing::info!("wrote {}", job.run_dir.join(file).display()),
                    Some(Err(e)) => tracing::warn!("{file} not written: {e:#}"),
                    None => {}
                }
            }
            if let Some(b) = self.best {
                println!(
                    "best validation macro F1 {:.4} at step {} (kept as checkpoint step-{:08})",
                    b.macro_f1, b.step, b.step
                );
            }
        }
        crate::heartbeat::update(|h| h.phase = "done".into());
        Ok(Trained { history: self.history, validation: validation.unwrap_or_default() })
    }
}

/// Where training starts: step 0, or a checkpoint's step, loader cursors, metrics and best validation.
struct Start {
    step: u64,
    cursors: Vec<Cursor>,
    history: Vec<StepMetrics>,
    best: Option<Best>,
}

impl Start {
    fn fresh(slots: usize) -> Self {
        Start { step: 0, cursors: vec![Cursor::default(); slots], history: Vec::new(), best: None }
    }
}

/// The checkpoint store's lease: the orchestrator's ([`LEASE_ENV`]) when it started this rank, else this job's.
fn take_lease(job: &JobConfig, store: &Store) -> Result<Lease> {
    Ok(match std::env::var(LEASE_ENV) {
        Ok(id) => Lease::join(store, &id)?,
        // Says it is ending once SIGTERM/SIGUSR1 arrive (a preemption, or mpirun tearing the job down).
        Err(_) => Lease::acquire_ending_on(store, "worker train", lease_ttl(job), Preemption::install()?.flag())?,
    })
}

/// How long a lease lives without renewal: 15 heartbeat periods (30 s by default), at least 10 s.
pub fn lease_ttl(job: &JobConfig) -> std::time::Duration {
    std::time::Duration::from_secs_f64((15.0 * job.launch.heartbeat_every_s).max(10.0))
}

/// `metrics.jsonl` says what the checkpoint says: a resumed run continues it without repeats. A file that does
/// not begin with that history is another run's (a fresh start into a used run folder): it is kept as
/// `metrics.<unix seconds>.jsonl`, never truncated. The new file replaces the old whole.
fn start_metrics_file(path: &Path, history: &[StepMetrics]) -> Result<()> {
    let mut text = String::new();
    for m in history {
        text += &serde_json::to_string(m)?;
        text.push('\n');
    }
    if let Ok(old) = std::fs::read_to_string(path)
        && !old.is_empty()
        && (text.is_empty() || !old.starts_with(&text))
    {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kept = path.with_file_name(format!("metrics.{secs}.jsonl"));
        std::fs::rename(path, &kept).with_context(|| format!("keeping {} as {}", path.display(), kept.display()))?;
        tracing::warn!("{} held another run's metrics: kept as {}", path.display(), kept.display());
    }
    avexpr_data::files::write_atomic(path, text.as_bytes()).with_context(|| path.display().to_string())
}

/// A fresh start must not share a store with another run's checkpoints: pruning would delete the new run's and
/// `--resume auto` would later continue the old one. Refused unless `overwrite`, which deletes them.
fn fresh_start(checkpoints: &CheckpointStore, overwrite: bool) -> Result<()> {
    let existing = checkpoints.committed()?;
    let Some(newest) = existing.last() else { return Ok(()) };
    anyhow::ensure!(
        overwrite,
        "--resume none: checkpoint.uri {} already holds {} checkpoint(s) of a run (newest {newest}): \
         `--resume auto` continues it, `--resume none --overwrite` deletes them, or set another checkpoint.uri",
        checkpoints.uri(),
        existing.len()
    );
    tracing::warn!(uri = checkpoints.uri(), count = existing.len(), "--overwrite: deleting the store's checkpoints");
    Ok(checkpoints.clear()?)
}

/// Which checkpoint every rank resumes from: rank 0's choice, by name and commit hash.
#[derive(Debug, Serialize, Deserialize)]
struct Choice {
    name: String,
    commit_sha256: String,
}

/// Restores the checkpoint rank 0 chooses (the newest that verifies there; `None`: a fresh start everywhere) on
/// every rank: each loads exactly that one (same name, same commit), and the ranks agree before the first step
/// that all of them did. A rank that cannot (its store unreadable, the checkpoint corrupt or changed in its view)
/// fails the job with its reason; no rank falls back on its own to an older checkpoint or to a fresh start,
/// which would train from other weights, cursors and optimizer state than its peers.
fn resume(
    job: &JobConfig,
    checkpoints: &CheckpointStore,
    slots: usize,
    named: &[(String, Tensor)],
    opt: &mut AdamW,
    dist: &Dist,
) -> Result<Option<Start>> {
    let mine = if dist.rank == 0 { checkpoints.latest_valid()? } else { None };
    let choice = mine.as_ref().map(|c| Choice { name: c.name.clone(), commit_sha256: c.commit_sha256.clone() });
    let choice: Option<Choice> =
        serde_json::from_slice(&dist.broadcast_any_length(serde_json::to_vec(&choice)?)).context("rank 0's choice")?;
    let Some(choice) = choice else { return Ok(None) };
    let restored = (|| -> Result<Start> {
        let ckpt = match mine {
            Some(ckpt) => ckpt,
            None => checkpoints.load(&choice.name)?,
        };
        if ckpt.commit_sha256 != choice.commit_sha256 {
            let reason = format!(
                "its {COMMIT} has SHA-256 {} here, {} on rank 0: the store changed under the job",
                ckpt.commit_sha256, choice.commit_sha256
            );
            return Err(ckpt.mismatch(reason).into());
        }
        let changed = job.changes_that_forbid_resuming(&ckpt.state.config);
        if !changed.is_empty() {
            let reason = format!(
                "it was made with other settings, which a resumed run cannot change: {}. Train with the \
                 checkpoint's settings, or start a new run (another checkpoint.uri, or `--resume none --overwrite`)",
                changed.join("; ")
            );
            return Err(ckpt.mismatch(reason).into());
        }
        if ckpt.state.cursors.len() != slots {
            let made_with = ckpt.state.cursors.len();
            let reason = format!("made with {made_with} data slots (ranks x accumulation), this job has {slots}");
            return Err(ckpt.mismatch(reason).into());
        }
        ckpt.restore_variables(named)?;
        opt.load_state(&ckpt.optimizer, ckpt.state.step)?;
        let state = ckpt.state;
        Ok(Start { step: state.step, cursors: state.cursors, history: state.metrics, best: state.best })
    })();
    if let Err(e) = &restored {
        // Said before the verdict: a peer's abort may end this process right after it.
        tracing::error!("cannot resume from {} (rank 0's choice): {e:#}", choice.name);
    }
    let failed = dist.count_failed(restored.is_err());
    if failed > 0 {
        let verdict = format!(
            "{failed} rank(s) could not resume from {} (their errors are above); no rank trains from another state",
            choice.name
        );
        if restored.is_ok() {
            tracing::error!("{verdict}");
        }
        // Every rank's message is out before any returns: the first to return aborts them all.
        dist.barrier();
        restored?;
        anyhow::bail!(verdict);
    }
    let start = restored?;
    if dist.rank == 0 {
        tracing::info!(checkpoint = %choice.name, step = start.step, "resumed on every rank");
    }
    Ok(Some(start))
}

/// One training feed per micro-batch of this rank, each positioned at its slot's cursor.
fn start_feeds(
    session: &Session,
    options: &TrainOptions,
    accumulation: usize,
    cursors: &[Cursor],
) -> Result<Vec<Feed>> {
    let (job, dist) = (session.job, session.dist);
    let slots = dist.world_size * accumulation;
    let cache = match &job.data.features {
        Some(_) => Some(crate::features::open_cache(job, &session.manifest_bytes)?),
        None => None,
    };
    let sampler_cfg = job.sampler();
    let loader_cfg = job.loader();
    let mut feeds = Vec::with_capacity(accumulation);
    for a in 0..accumulation {
        let slot = dist.rank * accumulation + a;
        let plan = options.plan.as_ref().map(|p| &p.train);
        let sampler = RankSampler::new(&session.manifest, Split::Train, slot, slots, &sampler_cfg, plan)?;
        anyhow::ensure!(!sampler.is_empty(), "data slot {slot} of {slots} has no training clips: too few videos");
        feeds.push(match &cache {
            None => Feed::Frames(Loader::start(
                Source::Store(session.store.clone()),
                session.manifest.clone(),
                sampler,
                &loader_cfg,
                cursors[slot],
                None,
            )?),
            Some(cache) => Feed::Cached(crate::features::FeatureLoader::start(
                cache.clone(),
                session.manifest.clone(),
                sampler,
                loader_cfg.batch_size,
                cursors[slot],
                loader_cfg.ready_batches,
                session.device,
            )?),
        });
    }
    Ok(feeds)
}

/// Every slot's cursor on every rank (each rank knows its own slots').
fn gather_cursors(dist: &Dist, mine: &[Cursor], accumulation: usize) -> Vec<Cursor> {
    let lo = dist.rank * accumulation;
    let send: Vec<u64> = mine[lo..lo + accumulation].iter().flat_map(|c| [c.epoch, c.position as u64]).collect();
    let all = dist.all_gather_u64(&send);
    all.chunks_exact(2).map(|c| Cursor { epoch: c[0], position: c[1] as usize }).collect()
}
