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
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::loader::{Batch, Loader, Source};
use avexpr_data::sampler::{Cursor, RankSampler};
use avexpr_data::store::Store;
use tch::{Device, Tensor};

use crate::buckets::Buckets;
use crate::checkpoint::{Best, CheckpointState, CheckpointStore};
use crate::dist::Dist;
use crate::eval::{evaluate, summary};
use crate::job::JobConfig;
use crate::metrics::StepMetrics;
use crate::optim::{AdamW, clip_grad_norm, learning_rate};
use crate::session::{Session, raw_batch};

/// Where a rank's step time goes (seconds, summed over steps); CUDA work is synchronised before each reading.
struct Phases {
    device: Device,
    steps: u64,
    data: f64,
    encoders: f64,
    head: f64,
    all_reduce: f64,
    optimizer: f64,
}

impl Phases {
    fn new(device: Device) -> Self {
        Self { device, steps: 0, data: 0.0, encoders: 0.0, head: 0.0, all_reduce: 0.0, optimizer: 0.0 }
    }

    fn time<T>(&mut self, field: impl Fn(&mut Self) -> &mut f64, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        *field(self) += t.elapsed().as_secs_f64();
        out
    }

    fn report(&self, world: usize, accumulation: usize) -> String {
        let n = self.steps as f64;
        let ms = |x: f64| 1e3 * x / n;
        let total = self.data + self.encoders + self.head + self.all_reduce + self.optimizer;
        format!(
            "step time breakdown over {} steps ({world} rank(s) x {accumulation} micro-batch(es)), ms per step: \
             data wait {:.1}, frozen encoders {:.1}, trainable forward+backward {:.1}, all-reduce {:.1}, \
             clip+optimizer {:.1}; total {:.1}",
            self.steps,
            ms(self.data),
            ms(self.encoders),
            ms(self.head),
            ms(self.all_reduce),
            ms(self.optimizer),
            ms(total)
        )
    }
}

pub struct TrainOptions {
    pub resume: bool,
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

pub fn train(job: &JobConfig, dist: &Dist, options: &TrainOptions) -> Result<Trained> {
    let accumulation = job.accumulation(dist.world_size)?;
    let slots = dist.world_size * accumulation;
    let session = Session::open(job, dist)?;
    let (device, mixed, manifest) = (session.device, session.mixed_precision, &session.manifest);
    let checkpoints = CheckpointStore::open(&job.checkpoint.uri, job.checkpoint.keep_last_k)?;
    let cache = match &job.data.features {
        Some(_) => Some(crate::features::open_cache(job, &session.manifest_bytes)?),
        None => None,
    };
    if let Some(plan) = &options.plan {
        plan.check(job, dist.world_size)?;
    }
    let _beacon = crate::heartbeat::Beacon::start(
        Store::open(&job.checkpoint.uri)?,
        dist.rank,
        dist.world_size,
        job.train.steps,
        std::time::Duration::from_secs_f64(job.launch.heartbeat_every_s),
    );

    let model = session.build_model()?;
    let named: Vec<(String, Tensor)> = model.trainable_groups().into_values().flatten().collect();
    let mut vars: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
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
    let mut opt = AdamW::new(job.train.optimizer, &named);

    let mut cursors = vec![Cursor::default(); slots];
    let mut history: Vec<StepMetrics> = Vec::new();
    let mut step = 0u64;
    let mut best: Option<Best> = None;
    let mut last_eval = None;
    if options.resume
        && let Some(ckpt) = checkpoints.latest_valid()?
    {
        anyhow::ensure!(
            ckpt.state.cursors.len() == slots,
            "checkpoint {}: made with {} data slots (ranks x accumulation), this job has {slots}",
            ckpt.name,
            ckpt.state.cursors.len()
        );
        ckpt.restore_variables(&named)?;
        opt.load_state(&ckpt.optimizer, ckpt.state.step)?;
        cursors = ckpt.state.cursors.clone();
        history = ckpt.state.metrics.clone();
        best = ckpt.state.best;
        step = ckpt.state.step;
        if dist.rank == 0 {
            tracing::info!(checkpoint = %ckpt.name, step, "resumed");
        }
    }
    crate::heartbeat::update(|h| {
        h.resumed_from = step;
        h.step = step;
    });

    let sampler_cfg = job.sampler();
    let loader_cfg = job.loader();
    let mut feeds = Vec::with_capacity(accumulation);
    for a in 0..accumulation {
        let slot = dist.rank * accumulation + a;
        let plan = options.plan.as_ref().map(|p| &p.train);
        let sampler = RankSampler::new(manifest, Split::Train, slot, slots, &sampler_cfg, plan)?;
        anyhow::ensure!(!sampler.is_empty(), "data slot {slot} of {slots} has no training clips: too few videos");
        feeds.push(match &cache {
            None => Feed::Frames(Loader::start(
                Source::Store(session.store.clone()),
                manifest.clone(),
                sampler,
                &loader_cfg,
                cursors[slot],
                None,
            )?),
            Some(cache) => Feed::Cached(crate::features::FeatureLoader::start(
                cache.clone(),
                manifest.clone(),
                sampler,
                loader_cfg.batch_size,
                cursors[slot],
                loader_cfg.ready_batches,
                device,
            )?),
        });
    }

    std::fs::create_dir_all(&job.run_dir).with_context(|| format!("run_dir {}", job.run_dir.display()))?;
    let metrics_path = job.run_dir.join("metrics.jsonl");
    if dist.rank == 0 {
        // The file says what the checkpoint says: a resumed run continues it without repeats.
        let mut file = std::fs::File::create(&metrics_path)?;
        for m in &history {
            writeln!(file, "{}", serde_json::to_string(m)?)?;
        }
    }

    let (mut clips, mut waited, started) = (0usize, 0.0f64, Instant::now());
    let first_step = step;
    let mut phases = Phases::new(device);
    while step < job.train.steps {
        buckets.zero_grads();
        let mut sums = [0.0f64; 3];
        for (a, feed) in feeds.iter_mut().enumerate() {
            let slot = dist.rank * accumulation + a;
            let t = Instant::now();
            let fed = match feed {
                Feed::Frames(loader) => Fed::Frames(loader.next().context("the training loader ended")??),
                Feed::Cached(loader) => Fed::Cached(loader.next_batch()?),
            };
            let wait = t.elapsed().as_secs_f64();
            waited += wait;
            phases.data += wait;
            let (feats, labels) = match fed {
                Fed::Frames(batch) => {
                    clips += batch.len();
                    cursors[slot] = batch.cursor;
                    let (raw, labels) = raw_batch(&batch);
                    (phases.time(|p| &mut p.encoders, || model.encode(&raw))?, labels)
                }
                Fed::Cached(cached) => {
                    clips += cached.len;
                    cursors[slot] = cached.cursor;
                    (cached.features, cached.labels)
                }
            };
            tch::manual_seed((job.train.seed ^ (step << 20) ^ slot as u64) as i64);
            let terms = phases.time(
                |p| &mut p.head,
                || {
                    let terms = avexpr_model::autocast::bf16(device, mixed, || {
                        let out = model.forward_t(&feats, true);
                        model.loss(&out, &labels.to_device(device))
                    });
                    (&terms.total / accumulation as f64).backward();
                    terms
                },
            );
            for (s, t) in sums.iter_mut().zip([&terms.total, &terms.classification, &terms.contrastive]) {
                *s += t.double_value(&[]) / accumulation as f64;
            }
        }
        phases.time(|p| &mut p.all_reduce, || buckets.all_reduce_mean(dist))?;
        let t = &job.train;
        let lr = learning_rate(step, t.optimizer.lr, t.warmup_steps, t.steps, t.min_lr_ratio);
        let grad_norm = phases.time(
            |p| &mut p.optimizer,
            || {
                let max = if t.clip_grad_norm > 0.0 { t.clip_grad_norm } else { f64::INFINITY };
                let norm = clip_grad_norm(buckets.buffers_mut(), max);
                opt.step(lr);
                norm
            },
        );
        phases.steps += 1;
        step += 1;

        dist.all_reduce_sum_f64(&mut sums);
        let world = dist.world_size as f64;
        // (elapsed s, clips/s over all ranks, ETA s), as of now.
        let progress = || {
            let elapsed = started.elapsed().as_secs_f64();
            (elapsed, clips as f64 * world / elapsed, elapsed / (step - first_step) as f64 * (t.steps - step) as f64)
        };
        let m = StepMetrics {
            step,
            loss: sums[0] / world,
            classification: sums[1] / world,
            contrastive: sums[2] / world,
            lr,
            grad_norm,
            val_macro_f1: None,
        };
        crate::heartbeat::update(|h| {
            h.phase = "training".into();
            h.step = step;
            h.loss = Some(m.loss);
            if dist.rank == 0 {
                let (_, rate, eta) = progress();
                (h.clips_per_s, h.eta_s) = (Some(rate), Some(eta));
            }
        });
        let m = if t.eval_every > 0 && step.is_multiple_of(t.eval_every) || step == t.steps {
            let eval = evaluate(&session, &model, Split::Validation)?;
            let f1 = eval.confusion.macro_f1();
            if dist.rank == 0 {
                tracing::info!("step {step}: validation {}", summary(&eval.confusion));
            }
            if best.as_ref().is_none_or(|b| f1 > b.macro_f1) {
                best = Some(Best { step, macro_f1: f1 });
            }
            last_eval = Some(eval.confusion);
            crate::heartbeat::update(|h| {
                h.phase = "training".into();
                h.val_macro_f1 = Some(f1);
            });
            StepMetrics { val_macro_f1: Some(f1), ..m }
        } else {
            m
        };
        if step.is_multiple_of(t.log_every) || step == t.steps || m.val_macro_f1.is_some() {
            history.push(m.clone());
            if dist.rank == 0 {
                let (elapsed, rate, eta) = progress();
                tracing::info!(
                    "step {step}/{} loss {:.4} (cls {:.4}, prompt {:.4}) lr {lr:.2e} |g| {grad_norm:.3} \
                     {rate:.1} clips/s data-wait {:.1}% ETA {eta:.0} s",
                    t.steps,
                    m.loss,
                    m.classification,
                    m.contrastive,
                    100.0 * waited / elapsed,
                );
                let mut file = std::fs::OpenOptions::new().append(true).open(&metrics_path)?;
                writeln!(file, "{}", serde_json::to_string(&m)?)?;
            }
        }
        if step.is_multiple_of(job.checkpoint.every) || step == t.steps {
            crate::heartbeat::update(|h| h.phase = "checkpointing".into());
            let all = gather_cursors(dist, &cursors, accumulation);
            if dist.rank == 0 {
                let state = CheckpointState { step, cursors: all, config: job.clone(), metrics: history.clone(), best };
                checkpoints.save(&state, &named, &opt.state())?;
                tracing::info!(step, uri = %job.checkpoint.uri, "checkpoint committed");
            }
            dist.barrier();
            crate::heartbeat::update(|h| h.phase = "training".into());
        }
    }
    if dist.rank == 0 && phases.steps > 0 {
        tracing::info!("{}", phases.report(dist.world_size, accumulation));
    }
    let validation = match last_eval {
        Some(confusion) => confusion,
        // Resumed from the final checkpoint: nothing left to train, but the table is still wanted.
        None => evaluate(&session, &model, Split::Validation)?.confusion,
    };
    if dist.rank == 0 {
        println!("validation after step {step}: {}", summary(&validation));
        print!("{}", validation.render(&avexpr_data::affwild2::PAPER_TRAIN_RATIOS));
        for (file, result) in [
            ("curves.png", crate::plots::curves_png(&job.run_dir.join("curves.png"), &history)),
            (
                "confusion.png",
                crate::plots::confusion_png(
                    &job.run_dir.join("confusion.png"),
                    &validation,
                    &format!("validation, step {step}: {}", summary(&validation)),
                ),
            ),
        ] {
            match result {
                Ok(()) => tracing::info!("wrote {}", job.run_dir.join(file).display()),
                Err(e) => tracing::warn!("{file} not written: {e:#}"),
            }
        }
        if let Some(b) = best {
            println!(
                "best validation macro F1 {:.4} at step {} (kept as checkpoint step-{:08})",
                b.macro_f1, b.step, b.step
            );
        }
    }
    crate::heartbeat::update(|h| h.phase = "done".into());
    Ok(Trained { history, validation })
}

/// Every slot's cursor on every rank (each rank knows its own slots').
fn gather_cursors(dist: &Dist, mine: &[Cursor], accumulation: usize) -> Vec<Cursor> {
    let lo = dist.rank * accumulation;
    let send: Vec<u64> = mine[lo..lo + accumulation].iter().flat_map(|c| [c.epoch, c.position as u64]).collect();
    let all = dist.all_gather_u64(&send);
    all.chunks_exact(2).map(|c| Cursor { epoch: c[0], position: c[1] as usize }).collect()
}
