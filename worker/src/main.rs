//! `worker`: one avexpr process. Thin: parse, set up logging, call the library, report errors with their chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use avexpr_data::layout::Split;
use avexpr_model::config::EncoderConfig;
use avexpr_model::locate::locate;
use avexpr_worker::{DeviceChoice, PrecisionChoice, bench, embed, encoder_options, logging};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "worker", version, about = "avexpr worker: one rank of an audio-visual expression recognition job")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `worker train --resume`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Resume {
    /// Continue from the newest valid checkpoint if there is one.
    Auto,
    /// Start afresh (refused when the checkpoint store holds checkpoints, unless --overwrite).
    None,
}

#[derive(Subcommand)]
enum Command {
    /// Embed images, the class prompts and audio with the frozen encoders of HF checkpoint directories.
    Embed {
        /// CLIP checkpoint (config.json, model.safetensors, tokenizer.json): a directory, a Hugging Face model id
        /// in the local hub cache (openai/clip-vit-base-patch32), or a store URI written by `push-encoder`.
        #[arg(long)]
        clip: Option<String>,
        /// The branch, tag or commit of a --clip model id (default main).
        #[arg(long)]
        clip_revision: Option<String>,
        /// Wav2Vec 2.0 checkpoint, as --clip (e.g. facebook/wav2vec2-base).
        #[arg(long)]
        wav2vec2: Option<String>,
        /// The branch, tag or commit of a --wav2vec2 model id (default main).
        #[arg(long)]
        wav2vec2_revision: Option<String>,
        /// Image files (JPEG, PNG) to embed with the CLIP vision tower.
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// 16 kHz WAV files to encode with Wav2Vec 2.0.
        #[arg(long, num_args = 1..)]
        audio: Vec<PathBuf>,
        /// Prompt template for the 8 classes; `{}` becomes the lower-case class name.
        #[arg(long, default_value = embed::DEFAULT_TEMPLATE)]
        template: String,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto)]
        precision: PrecisionChoice,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Upload an encoder checkpoint directory to a store, for `model.<encoder>.checkpoint: s3://...` (each host
    /// fetches it once into a local cache, verified by SHA-256).
    PushEncoder {
        /// A checkpoint directory or a Hugging Face model id in the local hub cache.
        #[arg(long)]
        from: String,
        /// The branch, tag or commit of a --from model id.
        #[arg(long)]
        revision: Option<String>,
        /// The store URI, e.g. s3://bucket/models/clip-vit-base-patch32.
        #[arg(long)]
        to: String,
    },
    /// Train on the job's config as one rank (start N ranks with `mpirun -np N worker train ...`).
    Train {
        /// The job file: a path, or an s3:// URI (how `orchestrator launch` gives it to ranks on other hosts).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = Resume::Auto)]
        resume: Resume,
        /// With `--resume none`: delete the checkpoints already in `checkpoint.uri` first.
        #[arg(long, requires = "resume")]
        overwrite: bool,
        /// A shard plan written by `orchestrator plan` (URI or path); default: the balanced plan.
        #[arg(long)]
        plan: Option<String>,
    },
    /// Run the frozen encoders once over every training clip into the feature cache (`data.features`);
    /// under mpirun, videos are shared among ranks. Resumable: units already in the cache are skipped.
    Extract {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write the official predictions.txt for a split from a checkpoint of the job (under mpirun: sharded).
    Predict {
        #[arg(long)]
        config: PathBuf,
        /// best, latest or a checkpoint name (step-00001200); several, comma-separated
        /// (step-00001000,step-00001200,best), predict as an ensemble averaging their class probabilities.
        #[arg(long, default_value = "best")]
        checkpoint: String,
        #[arg(long, value_enum, default_value_t = Split::Test)]
        split: Split,
        #[arg(long)]
        out: PathBuf,
        /// Soft voting: class probabilities averaged over a centred window of this many frames (1: none).
        #[arg(long, default_value_t = 1)]
        soft_vote: usize,
        /// Temporal smoothing, last: the most frequent class in a centred window of this many frames (1: none).
        #[arg(long, default_value_t = 1)]
        smooth: usize,
        /// Also write the probabilities the classes come from (one [frames, 8] tensor per video, safetensors).
        #[arg(long)]
        probabilities: Option<PathBuf>,
        /// Test-time augmentation: each face's embedding averaged with these views of it (flip, zoom).
        #[arg(long, value_delimiter = ',')]
        tta: Vec<avexpr_model::expr::ImageView>,
    },
    /// Train the job and four ablations of it (video only, audio only, concatenation instead of
    /// cross-attention, no prompt loss) and compare their validation macro F1.
    Ablate {
        #[arg(long)]
        config: PathBuf,
        /// Steps per variant (default: train.steps).
        #[arg(long)]
        steps: Option<u64>,
    },
    /// The class-wise table, eval.json, confusion.png and every frame's logits (logits.safetensors) of a split
    /// from a checkpoint of the job; the encoder passes per frame and the time per 1,000 frames.
    Evaluate {
        #[arg(long)]
        config: PathBuf,
        /// best, latest or a checkpoint name (step-00001200).
        #[arg(long, default_value = "best")]
        checkpoint: String,
        /// A labelled split: validation or train.
        #[arg(long, value_enum, default_value_t = Split::Validation)]
        split: Split,
        /// per-frame: each face through the image encoder once; per-window: once per window it is in, as
        /// training encodes clips (frames_per_clip times the work, the same result: a check).
        #[arg(long, value_enum, default_value_t = avexpr_worker::eval::FaceEncoding::PerFrame)]
        faces: avexpr_worker::eval::FaceEncoding,
        /// Test-time augmentation: each face's embedding averaged with these views of it (flip, zoom).
        #[arg(long, value_delimiter = ',')]
        tta: Vec<avexpr_model::expr::ImageView>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Can this job use NCCL? libnccl's version, rank 0's unique id broadcast over MPI to every rank, and on
    /// GPUs an all-reduce across the ranks. Run under mpirun like the training.
    NcclCheck,
    /// Bandwidth of the bucketed gradient all-reduce against one plain MPI all-reduce of the same bytes, with
    /// every result checked against the exact mean. Run under mpirun (`mpirun -np 2 worker bench-allreduce`).
    BenchAllreduce {
        /// Bytes of gradients reduced per step (default: the paper model's trainable variables in f32).
        #[arg(long, default_value_t = 4 * 4_672_662)]
        bytes: usize,
        #[arg(long, default_value_t = 4 << 20)]
        bucket_bytes: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Throughput of our encoders against transformers + PyTorch eager, same machine, same settings.
    BenchEncoders(bench::EncoderBench),
    /// One training step's time and all-reduced bytes with each way of adapting the encoders.
    BenchAdapt(bench::AdaptBench),
    /// Forward + backward of the trainable part against the same head in PyTorch eager, same machine.
    BenchHead {
        /// Job config whose `model` section shapes the head (default: configs/paper.yaml's, built in).
        #[arg(long)]
        config: Option<PathBuf>,
        /// cpu, cuda, cuda:N or auto; on CUDA the head runs under bf16 autocast, as in training.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 32)]
        batch: i64,
        #[arg(long, default_value_t = 16)]
        frames: i64,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long)]
        python: Option<String>,
        #[arg(long)]
        no_reference: bool,
        /// Also write the medians of both sides as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Trainable parameters per group (tcn, adapter, fusion, prompt, and backbone when an encoder adapts) of a
    /// job config's model.
    Params {
        #[arg(long)]
        config: PathBuf,
        /// Take the encoder widths from the config's checkpoint directories instead of the paper's encoders (and
        /// count an adapted encoder's variables).
        #[arg(long)]
        from_checkpoints: bool,
    },
}

fn model_config(config: Option<&std::path::Path>) -> Result<avexpr_model::ModelConfig> {
    Ok(match config {
        Some(path) => avexpr_model::ModelConfig::from_job_file(path)?,
        None => avexpr_model::ModelConfig::default(),
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed {
            clip,
            clip_revision,
            wav2vec2,
            wav2vec2_revision,
            images,
            audio,
            template,
            device,
            precision,
            out,
        } => {
            let options = encoder_options(device, precision)?;
            let locate = |spec: Option<String>, revision, fields| {
                spec.map(|checkpoint| locate(&EncoderConfig { checkpoint, revision, ..Default::default() }, fields))
                    .transpose()
            };
            let clip = locate(clip, clip_revision, ["--clip", "--clip-revision"])?;
            let wav2vec2 = locate(wav2vec2, wav2vec2_revision, ["--wav2vec2", "--wav2vec2-revision"])?;
            let req = embed::EmbedRequest { clip, wav2vec2, images, audio, template, options, out };
            let summary = embed::run(&req)?;
            for (name, shape) in &summary.tensors {
                println!("{name:<32} {shape:?}");
            }
            for line in &summary.lines {
                println!("{line}");
            }
            for (path, class, cos) in &summary.nearest_prompt {
                println!("{}: nearest class prompt {class} (cosine {cos:.3})", path.display());
            }
            println!("wrote {}", req.out.display());
        }
        Command::PushEncoder { from, revision, to } => {
            let dir =
                locate(&EncoderConfig { checkpoint: from, revision, ..Default::default() }, ["--from", "--revision"])?;
            let manifest = avexpr_model::locate::push(&dir, &to).map_err(|e| anyhow::anyhow!(e))?;
            let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
            println!(
                "{} files ({bytes} bytes) from {} to {to}, key {}",
                manifest.files.len(),
                dir.display(),
                manifest.key()
            );
        }
        Command::BenchAdapt(cfg) => {
            let (table, rows) = bench::adaptation(&cfg)?;
            print!("{table}");
            if let Some(path) = &cfg.json {
                std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
        }
        Command::BenchEncoders(cfg) => {
            let report = bench::encoders(&cfg)?;
            print!("{}", report.table);
            if let Some(path) = &cfg.json {
                report.write_json(path)?;
            }
        }
        Command::Train { config, resume, overwrite, plan } => {
            anyhow::ensure!(resume == Resume::None || !overwrite, "--overwrite is for --resume none");
            let resume = resume == Resume::Auto;
            // The config is checked before MPI starts: a bad one fails every rank at once, with its message.
            let job = avexpr_worker::job::JobConfig::load(&config)?;
            let plan = plan.as_deref().map(avexpr_worker::plan::JobPlan::load).transpose()?;
            let dist = avexpr_worker::dist::Dist::init()?;
            avexpr_worker::train::train(&job, &dist, &avexpr_worker::train::TrainOptions { resume, overwrite, plan })?;
        }
        Command::Extract { config } => {
            let job = avexpr_worker::job::JobConfig::load(&config)?;
            let dist = avexpr_worker::dist::Dist::init()?;
            let r = avexpr_worker::features::extract(&job, &dist)?;
            tracing::info!(
                "{} unit(s) written, {} already there; {} clips ({} frames) encoded; frame embeddings of {} \
                 video(s) written ({} faces encoded); {:.1} s: {:.1} frames/s",
                r.units_written,
                r.units_skipped,
                r.clips_encoded,
                r.frames_encoded,
                r.videos_written,
                r.faces_encoded,
                r.seconds,
                (r.frames_encoded + r.faces_encoded) as f64 / r.seconds.max(1e-9)
            );
            if dist.rank == 0 {
                println!("feature cache committed: {}", job.data.features.as_ref().map_or("", |f| f.uri.as_str()));
            }
        }
        Command::Predict { config, checkpoint, split, out, soft_vote, smooth, probabilities, tta } => {
            let job = avexpr_worker::job::JobConfig::load(&config)?;
            let dist = avexpr_worker::dist::Dist::init()?;
            let options = avexpr_worker::predict::PredictOptions {
                checkpoint: &checkpoint,
                split,
                out: &out,
                smooth,
                soft_vote,
                probabilities: probabilities.as_deref(),
                views: tta,
            };
            avexpr_worker::predict::predict(&job, &dist, &options)?;
        }
        Command::Ablate { config, steps } => {
            let job = avexpr_worker::job::JobConfig::load(&config)?;
            let dist = avexpr_worker::dist::Dist::init()?;
            let outcomes = avexpr_worker::ablate::ablate(&job, &dist, steps)?;
            if dist.rank == 0 {
                print!("{}", avexpr_worker::ablate::render(&outcomes));
            }
        }
        Command::Evaluate { config, checkpoint, split, faces, tta, out } => {
            let job = avexpr_worker::job::JobConfig::load(&config)?;
            let dist = avexpr_worker::dist::Dist::init()?;
            let faces = avexpr_worker::eval::FaceOptions { encoding: faces, views: tta };
            avexpr_worker::eval::evaluate_to(&job, &dist, &checkpoint, split, &faces, &out)?;
        }
        Command::NcclCheck => {
            let dist = avexpr_worker::dist::Dist::init()?;
            let report = avexpr_worker::nccl::check(&dist)?;
            if dist.rank == 0 {
                print!("{report}");
            }
        }
        Command::BenchAllreduce { bytes, bucket_bytes, iters, rounds } => {
            let dist = avexpr_worker::dist::Dist::init()?;
            let f = avexpr_worker::buckets::bench_all_reduce(&dist, bytes, bucket_bytes, iters, rounds)?;
            if dist.rank == 0 {
                println!(
                    "all-reduce of {} bytes over {} ranks ({} buckets of <= {bucket_bytes} bytes)\n\
                     bucketed (gradients as bucket views, reduced in place, averaged): {:.3} GB/s\nplain MPI all-reduce of the same bytes: \
                     {:.3} GB/s\nratio: {:.3}\nlargest error against the exact mean: {:e}",
                    f.bytes,
                    dist.world_size,
                    f.buckets,
                    f.ours,
                    f.plain,
                    f.ours / f.plain,
                    f.max_error
                );
            }
            anyhow::ensure!(f.max_error < 1e-3, "the reduced values are wrong (error {})", f.max_error);
        }
        Command::BenchHead { config, device, threads, batch, frames, iters, rounds, python, no_reference, json } => {
            let model = model_config(config.as_deref())?;
            // The head's device; bf16 autocast on CUDA as training has it (`train.mixed_precision: auto`).
            let device = encoder_options(device, PrecisionChoice::Auto)?.device;
            let threads = threads.unwrap_or_else(avexpr_worker::all_cores);
            let cfg = bench::HeadBench::new(model, device, threads, batch, frames, iters);
            let python = python.unwrap_or_else(avexpr_worker::default_python);
            let report = bench::head(&cfg, device, (!no_reference).then_some(python.as_str()), rounds)?;
            print!("{}", report.table);
            if let Some(path) = &json {
                report.write_json(path)?;
            }
        }
        Command::Params { config, from_checkpoints } => {
            let model = model_config(Some(&config))?;
            let adapted = model.adapts().iter().any(|(_, a)| !a.is_frozen());
            let (dims, counts) = if from_checkpoints {
                // The whole model, so that an adapted encoder's `backbone` variables are counted too.
                let encoders = avexpr_model::Encoders::load(&model, avexpr_model::EncoderOptions::default())?;
                let dims = encoders.dims();
                let built = avexpr_model::ExprModel::new(&model, encoders, None, tch::Device::Cpu)?;
                (dims, built.parameter_counts())
            } else {
                let dims = avexpr_model::expr::EncoderDims::paper();
                if adapted {
                    println!("(an adapted encoder's backbone group is counted with --from-checkpoints)");
                }
                let counts = avexpr_model::expr::parameter_counts(&model, &dims)?;
                (dims, counts)
            };
            println!(
                "trainable parameters of {} (image {}, audio {} x {} states):",
                config.display(),
                dims.image_dim,
                dims.audio_hidden,
                dims.audio_layers + 1
            );
            for (group, n) in &counts {
                println!("  {group:<8} {n:>12}");
            }
            println!("  {:<8} {:>12}", "total", counts.iter().map(|(_, n)| n).sum::<i64>());
            println!("TCN receptive field: {} frames", model.tcn.receptive_field());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    logging::init_worker();
    if !avexpr_worker::allocator::keep_freed_memory() {
        tracing::warn!("could not tune the allocator: encoders will page-fault their activations on every pass");
    }
    // A panic of the main thread ends the job as an error does (the default hook has printed it first).
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        if std::thread::current().name() == Some("main") {
            avexpr_worker::dist::abort_job_if_distributed(101);
        }
    }));
    match run(Cli::parse()) {
        Ok(()) => {
            avexpr_worker::dist::finalize();
            ExitCode::SUCCESS
        }
        Err(e) if e.is::<avexpr_worker::preempt::Preempted>() => {
            // Every rank stops after the same step (they agreed), so every rank finalises.
            tracing::warn!("{e}");
            avexpr_worker::preempt::write_marker(&e.to_string());
            avexpr_worker::dist::finalize();
            ExitCode::from(avexpr_worker::preempt::EXIT_PREEMPTED)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            // Under mpirun the other ranks would wait for this one in their next collective, forever.
            avexpr_worker::dist::abort_job_if_distributed(1);
            avexpr_worker::dist::finalize();
            ExitCode::FAILURE
        }
    }
}
