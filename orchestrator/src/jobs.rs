//! The orchestrator's commands end to end: `plan`, `launch` (check everything, write the plan, run attempts
//! until the job succeeds, report) and `status`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use avexpr_data::store::Store;
use avexpr_worker::checkpoint::CheckpointStore;
use avexpr_worker::job::JobConfig;
use avexpr_worker::lease::Lease;

use crate::launch::Attempt;
use crate::spec::{Job, Target};
use crate::watch::{RECORD_KEY, RunRecord, Started, Watcher};
use crate::{k8s, plan};

#[derive(Debug, Clone)]
pub struct LaunchArgs {
    pub config: PathBuf,
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub target: crate::spec::TargetKind,
    pub hostfile: Option<PathBuf>,
    pub dry_run: bool,
    /// The worker binary (default: `worker` beside this program).
    pub worker: Option<PathBuf>,
    /// Edited copies of the k8s/ templates.
    pub templates: Option<PathBuf>,
    /// The MPIJob's name (default: avexpr-<config file stem>).
    pub name: Option<String>,
    /// Hostfile launches: relaunch on the hosts that remain reachable, down to this many.
    pub min_nodes: Option<usize>,
    /// `--target k8s`: the worker image, instead of `launch.k8s.image`.
    pub image: Option<String>,
}

/// Where in the checkpoint store a launch across hosts puts the job file for its ranks.
pub const CONFIG_DIR: &str = "config";

/// The job's micro-batches per step on `world` ranks; the error names the config file.
fn check_ranks(job: &JobConfig, world: usize) -> Result<()> {
    job.accumulation(world).with_context(|| format!("{world} ranks"))?;
    Ok(())
}

/// The job file, read by its absolute path (`source`), as the ranks will read it.
fn load_job(config: &Path) -> Result<JobConfig> {
    let abs = std::fs::canonicalize(config).with_context(|| format!("--config {}", config.display()))?;
    Ok(JobConfig::from_file(&abs)?)
}

/// `orchestrator plan`.
pub fn plan(config: &Path, nodes: usize, gpus_per_node: usize) -> Result<String> {
    let world = plan::world_size(nodes, gpus_per_node)?;
    let job = load_job(config)?;
    check_ranks(&job, world)?;
    let manifest = plan::read_job_manifest(&job)?;
    let (p, uri) = plan::make(&job, &manifest, world)?;
    Ok(format!("wrote {uri}\n{}", plan::describe(&p, &manifest)))
}

fn default_worker() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating this program")?;
    Ok(me.with_file_name("worker"))
}

/// A DNS-1123 name for the MPIJob: `avexpr-<config stem>-<run id prefix>`, so that two `paper.yaml` of
/// different folders (different checkpoint stores) get different MPIJobs.
fn k8s_name(config: &Path, run_id: &str) -> String {
    let stem = config.file_stem().map_or("job".into(), |s| s.to_string_lossy().to_lowercase());
    let clean: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let suffix = format!("-{}", &run_id[..6]);
    let name = format!("avexpr-{}", clean.trim_matches('-'));
    let head: String = name.chars().take(k8s::MAX_NAME - suffix.len()).collect();
    head.trim_end_matches('-').to_string() + &suffix
}

/// `orchestrator launch`: returns the final report.
pub fn launch(a: &LaunchArgs) -> Result<String> {
    let world = plan::world_size(a.nodes, a.gpus_per_node)?;
    let target = Target::new(a.target, a.hostfile.as_deref())?;
    let mut job_cfg = load_job(&a.config)?;
    if let Some(image) = &a.image {
        anyhow::ensure!(target == Target::K8s, "--image is for --target k8s");
        job_cfg.launch.k8s.image = image.clone();
    }
    let config = job_cfg.source.clone();
    check_ranks(&job_cfg, world)?;
    let min_nodes = a.min_nodes.filter(|&m| m < a.nodes);
    if let Some(m) = a.min_nodes {
        anyhow::ensure!((1..=a.nodes).contains(&m), "--min-nodes {m}: must be in 1..=--nodes ({})", a.nodes);
        anyhow::ensure!(
            matches!(target, Target::Hostfile(_) | Target::K8s),
            "--min-nodes is for --target hostfile and k8s"
        );
    }
    // Local ranks find the encoders where this process does: a model id missing from the hub cache, a wrong
    // path or an unreadable store fails here, once, not in every rank and every restart (an s3:// checkpoint is
    // fetched into this host's cache, which the ranks then use).
    if target == Target::Local && !a.dry_run {
        avexpr_model::locate::locate_encoders(&job_cfg.model).with_context(|| config.display().to_string())?;
        avexpr_model::locate::locate_image_encoder(&job_cfg.model).with_context(|| config.display().to_string())?;
    }
    if let Target::Hostfile(file) = &target {
        crate::launch::check_hostfile(file, a.nodes)?;
        if a.nodes > 1 {
            crate::spec::check_stores_reachable_from_every_host(&job_cfg)?;
        }
    }
    let worker = match &a.worker {
        Some(w) => w.clone(),
        None => default_worker()?,
    };
    if target != Target::K8s {
        anyhow::ensure!(worker.is_file(), "the worker binary {} does not exist (--worker PATH)", worker.display());
    }
    // Ranks on other hosts do not see this machine's files: they read the job file from the checkpoint store,
    // where this launch puts it (under the file's own name, so the default run_dir stays `runs/<stem>`).
    let across_hosts = matches!(target, Target::Hostfile(_)) && a.nodes > 1;
    let file_name = config.file_name().map_or("job.yaml".into(), |n| n.to_string_lossy().into_owned());
    let ranks_config = match across_hosts {
        true => PathBuf::from(format!("{}/{CONFIG_DIR}/{file_name}", job_cfg.checkpoint.uri.trim_end_matches('/'))),
        false => config.clone(),
    };
    let job = Job {
        config: ranks_config,
        job: job_cfg.clone(),
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        target: target.clone(),
        worker,
        plan: format!("{}/{}", job_cfg.checkpoint.uri.trim_end_matches('/'), avexpr_worker::plan::PLAN_KEY),
    };
    let run_id = k8s::run_id(&job_cfg);
    let name = a.name.clone().unwrap_or_else(|| k8s_name(&config, &run_id));
    let mpijob = k8s::MpiJob { name: name.clone(), namespace: job_cfg.launch.k8s.namespace.clone(), run_id };
    let mut k8s_yaml = None;
    let mut config_text = String::new();
    if target == Target::K8s {
        config_text = std::fs::read_to_string(&config).with_context(|| config.display().to_string())?;
        let yaml = k8s::to_yaml(&k8s::render(&job, &name, &config_text, a.templates.as_deref())?)?;
        if a.dry_run {
            return Ok(yaml);
        }
        k8s::check_kubectl()?;
        // Before anything is written: an MPIJob of this name that another job owns is never replaced.
        mpijob.check_ours()?;
        k8s_yaml = Some(yaml);
    } else if target == Target::Slurm {
        if a.dry_run {
            return Ok(crate::slurm::render(&job, &name));
        }
        crate::slurm::check_sbatch()?;
    } else if a.dry_run {
        return Ok(job.mpirun_argv().join(" ") + "\n");
    }

    // Everything that can be checked without the store is; now the store (fast failure when unreachable).
    let manifest = plan::read_job_manifest(&job_cfg)?;
    // One writer per store: this launch holds its lease for all its attempts (the ranks join it). Under
    // Kubernetes the job's rank 0 takes it instead (the pods do not see this process).
    let lease = match &k8s_yaml {
        None => Some(Lease::acquire(
            &Store::open(&job_cfg.checkpoint.uri)?,
            "orchestrator launch",
            avexpr_worker::train::lease_ttl(&job_cfg),
        )?),
        Some(_) => None,
    };
    let lease_id = lease.as_ref().map(|l| l.id().to_string()).unwrap_or_default();
    let (p, uri) = plan::make(&job_cfg, &manifest, world)?;
    eprint!("plan {uri}\n{}", plan::describe(&p, &manifest));
    if across_hosts {
        let text = std::fs::read(&config).with_context(|| config.display().to_string())?;
        let key = format!("{CONFIG_DIR}/{file_name}");
        Store::open(&job_cfg.checkpoint.uri)?
            .blocking()
            .put(&key, text.into())
            .context("checkpoint.uri: writing the job file")?;
        eprintln!("job file for the ranks: {}", job.config.display());
    }
    std::fs::create_dir_all(&job_cfg.run_dir).with_context(|| format!("run_dir {}", job_cfg.run_dir.display()))?;

    let watcher = Watcher::new(&job)?;
    let mut record = RunRecord {
        config: config.clone(),
        target: clap::ValueEnum::to_possible_value(&a.target).expect("every target is named").get_name().to_string(),
        world_size: world,
        status: "running".into(),
        ..RunRecord::default()
    };
    watcher.save(&record)?;
    let mut last_out = None;
    let mut previous_slurm: Option<crate::slurm::SlurmJob> = None;
    let elastic = match (&target, min_nodes) {
        (Target::K8s, Some(min)) => {
            let shape = job.clone();
            Some(k8s::Elastic {
                fits: std::rc::Rc::new(move |available| crate::launch::fitting_nodes(&shape, min, available)),
                after: std::time::Duration::from_secs_f64(job_cfg.launch.k8s.unschedulable_s),
                next_nodes: Default::default(),
            })
        }
        _ => None,
    };
    let absolute_run_dir = std::env::current_dir()?.join(&job_cfg.run_dir);
    watcher.run(&job, &mut record, |n| match &k8s_yaml {
        None if target == Target::Slurm => {
            // Never two jobs on one store: the previous attempt's job is cancelled first (it may have requeued
            // itself after ending in a state that looked final).
            if let Some(previous) = previous_slurm.take() {
                crate::slurm::SlurmJob::cancel(&previous);
            }
            let script = job_cfg.run_dir.join(format!("slurm-attempt-{n}.sh"));
            std::fs::write(&script, crate::slurm::render(&job, &name)).with_context(|| script.display().to_string())?;
            let id = crate::slurm::submit(&script, &lease_id)?;
            tracing::info!(attempt = n, "submitted {} as Slurm job {id}", script.display());
            let log = absolute_run_dir.join(format!("slurm-{id}.out"));
            previous_slurm = Some(crate::slurm::SlurmJob::new(id.clone()));
            Ok(Started { attempt: Attempt::Slurm(crate::slurm::SlurmJob::new(id)), log: Some(log), world })
        }
        None => {
            let out = job_cfg.run_dir.join(format!("attempt-{n}.out"));
            let log = job_cfg.run_dir.join(format!("attempt-{n}.log"));
            last_out = Some(out.clone());
            let this = match (&target, min_nodes) {
                (Target::Hostfile(file), Some(min)) => crate::launch::elastic_job(&job, file, min, n)?,
                _ => job.clone(),
            };
            Ok(Started {
                attempt: Attempt::mpirun(&this, &out, &log, &lease_id)?,
                log: Some(log),
                world: this.world_size(),
            })
        }
        Some(yaml) => {
            // After worker pods stayed unschedulable: the nodes that were placed; otherwise (the first attempt,
            // and every restart: nodes may be back) all of them.
            let nodes = elastic.as_ref().and_then(|e| e.next_nodes.take()).unwrap_or(job.nodes);
            let this = Job { nodes, ..job.clone() };
            let yaml = match nodes == job.nodes {
                true => yaml.clone(),
                false => {
                    tracing::warn!(
                        attempt = n,
                        "running on {nodes} of {} node(s); the global batch stays {}: each rank accumulates {} \
                         micro-batch(es)",
                        job.nodes,
                        job_cfg.train.global_batch,
                        job_cfg.slots() / this.world_size()
                    );
                    k8s::to_yaml(&k8s::render(&this, &name, &config_text, a.templates.as_deref())?)?
                }
            };
            mpijob.delete()?;
            k8s::apply(&yaml)?;
            let attempt = k8s::K8sAttempt::new(mpijob.clone(), nodes, elastic.clone());
            Ok(Started { attempt: Attempt::K8s(attempt), log: None, world: this.world_size() })
        }
    })?;

    let mut report = String::new();
    if let Some(out) = last_out {
        report += &std::fs::read_to_string(&out).unwrap_or_default();
    }
    report += &summary(&job_cfg, &record)?;
    Ok(report)
}

/// The end of a report: steps, restarts, validation.
fn summary(job: &JobConfig, record: &RunRecord) -> Result<String> {
    let ckpt = CheckpointStore::open(&job.checkpoint.uri, job.checkpoint.keep_last_k)?.latest_valid()?;
    let mut text = format!(
        "job {}: {} attempt(s), {} restart(s), {} step(s) redone after restarts, {} preemption(s)\n",
        record.status,
        record.attempts.len(),
        record.restarts,
        record.steps_redone,
        record.preemptions
    );
    if let Some(c) = ckpt {
        text += &format!("newest checkpoint {} (step {} of {})\n", c.name, c.state.step, job.train.steps);
        if let Some(f1) = c.state.metrics.iter().rev().find_map(|m| m.val_macro_f1) {
            text += &format!("validation macro F1 {f1:.4}");
        }
        if let Some(b) = c.state.best {
            text += &format!(" (best {:.4} at step {})", b.macro_f1, b.step);
        }
        text += "\n";
    }
    Ok(text)
}

/// `orchestrator status RUN`: RUN is a job's config file or its checkpoint store URI.
pub fn status(run: &str) -> Result<String> {
    let (uri, keep, steps) = if Path::new(run).is_file() {
        let job = load_job(Path::new(run))?;
        (job.checkpoint.uri.clone(), job.checkpoint.keep_last_k, Some(job.train.steps))
    } else {
        (run.to_string(), 1, None)
    };
    let store = Store::open(&uri)?;
    store.blocking().check_reachable(RECORD_KEY)?;
    let mut text = format!("run {uri}\n");
    match store.blocking().get(RECORD_KEY) {
        Ok(bytes) => {
            let r: RunRecord = serde_json::from_slice(&bytes).context("orchestrator.json")?;
            text += &format!(
                "status {} ({} ranks, target {}), {} restart(s), {} step(s) redone, {} preemption(s)\n",
                r.status, r.world_size, r.target, r.restarts, r.steps_redone, r.preemptions
            );
            for at in &r.attempts {
                text += &format!(
                    "  attempt {}: {} rank(s), resumed from step {}, reached step {}{}: {}\n",
                    at.number,
                    at.world_size,
                    at.resumed_from.map_or("?".into(), |s| s.to_string()),
                    at.reached_step,
                    at.restart_s.map_or(String::new(), |s| format!(", restarted in {s:.1} s")),
                    at.outcome
                );
            }
        }
        Err(avexpr_data::store::StoreError::NotFound { .. }) => text += "not launched by the orchestrator\n",
        Err(e) => return Err(e.into()),
    }
    match CheckpointStore::open(&uri, keep)?.latest_valid()? {
        Some(c) => {
            text += &format!("newest checkpoint {} at step {}", c.name, c.state.step);
            if let Some(steps) = steps {
                text += &format!(" of {steps}");
            }
            text += "\n";
            if let Some(m) = c.state.metrics.last() {
                text += &format!("last logged step {}: loss {:.4}, lr {:.2e}\n", m.step, m.loss, m.lr);
            }
            if let Some(b) = c.state.best {
                text += &format!("best validation macro F1 {:.4} at step {}\n", b.macro_f1, b.step);
            }
        }
        None => text += "no committed checkpoint yet\n",
    }
    let world = store
        .blocking()
        .get(avexpr_worker::plan::PLAN_KEY)
        .ok()
        .and_then(|b| serde_json::from_slice::<avexpr_worker::plan::JobPlan>(&b).ok().map(|p| p.ranks));
    for r in 0..world.unwrap_or(0) {
        if let Ok(Some(b)) = avexpr_data::store::block_on(avexpr_worker::heartbeat::read(&store, r)) {
            text +=
                &format!("  rank {r}: {} at step {}/{} (host {}, pid {})\n", b.phase, b.step, b.steps, b.host, b.pid);
        }
    }
    Ok(text)
}
