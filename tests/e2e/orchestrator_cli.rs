//! `orchestrator` as a user runs it: a 2-rank local launch runs to the end and reports validation macro F1; a
//! rank killed with SIGKILL, or stopped with SIGSTOP (hung), is detected, the job is relaunched from its last
//! checkpoint and ends with exactly the uninterrupted run's variables; a rank preempted (SIGTERM) makes the job
//! checkpoint and stop, and the relaunch redoes no step; Ctrl-C to the orchestrator stops the job with a checkpoint
//! and a new launch continues it; `status` reports it; bad arguments are
//! rejected before anything starts; the Kubernetes manifests validate against the Kubernetes schemas.

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use avexpr_tests::binary;
use avexpr_tests::jobs::{Dataset, dataset, job, max_diff, ok, run_dir, variables};

const STEPS: u64 = 400;

/// The tiny job with checkpoints every 10 steps and a quick heartbeat; `timeout` for hang detection.
fn launch_job(d: &Dataset, name: &str, timeout: f64) -> PathBuf {
    let config = job(
        d,
        name,
        STEPS,
        &format!("launch: {{heartbeat_every_s: 0.2, heartbeat_timeout_s: {timeout}, max_restarts: 2}}\n"),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace("checkpoint: {every: 2,", "checkpoint: {every: 10,");
    std::fs::write(&config, text).unwrap();
    config
}

/// A 2-rank local launch, running, its output captured.
fn start(config: &Path) -> Child {
    launch(config, 2).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

fn launch(config: &Path, nodes: usize) -> std::process::Command {
    let mut cmd = binary("orchestrator");
    cmd.args(["launch", "--nodes", &nodes.to_string(), "--config"]).arg(config);
    cmd
}

fn heartbeat(config: &Path, rank: usize) -> Option<serde_json::Value> {
    let path = run_dir(config).join("checkpoints/heartbeats").join(format!("rank-{rank}.json"));
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits until rank `rank` of the running launch reports at least `step`; returns its pid.
fn wait_for_step(config: &Path, rank: usize, step: u64, child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the launch ended before step {step}");
        if let Some(b) = heartbeat(config, rank)
            && b["step"].as_u64().unwrap_or(0) >= step
        {
            return b["pid"].as_u64().unwrap() as i32;
        }
        assert!(Instant::now() < deadline, "rank {rank} never reached step {step}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(child: Child) -> (String, String) {
    let out: Output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

fn metrics(config: &Path) -> String {
    std::fs::read_to_string(run_dir(config).join("metrics.jsonl")).unwrap()
}

#[test]
fn local_launch_survives_a_killed_and_a_hung_rank_bitwise() {
    let d = dataset();

    // Uninterrupted.
    let reference = launch_job(&d, "reference", 60.0);
    let out = launch(&reference, 2).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ok(out);
    assert!(stdout.contains("job succeeded: 1 attempt(s), 0 restart(s)"), "{stdout}");
    assert!(stdout.contains("validation macro F1"), "{stdout}");
    assert!(stdout.contains("Macro F1"), "the worker's class-wise table is reported: {stdout}");
    assert!(run_dir(&reference).join("checkpoints/plan.json").is_file());

    // A rank killed: mpirun fails, the orchestrator relaunches from the last checkpoint.
    let killed = launch_job(&d, "killed", 60.0);
    let mut child = start(&killed);
    let pid = wait_for_step(&killed, 1, 25, &mut child);
    // SAFETY: a worker process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (stdout, stderr) = finish(child);
    assert!(stdout.contains("job succeeded: 2 attempt(s), 1 restart(s)"), "{stdout}\n{stderr}");
    assert!(stderr.contains("restarting from the last checkpoint"), "{stderr}");
    let restart = stderr.lines().find(|l| l.contains("restarted:")).expect("the restart cost is logged");
    println!("local restart cost: {restart}");
    assert_eq!(max_diff(&variables(&reference, STEPS), &variables(&killed, STEPS)), 0.0);
    assert_eq!(metrics(&reference), metrics(&killed), "the metrics file continues without repeats or gaps");

    // A rank preempted (SIGTERM, as an eviction or a spot reclaim sends it): every rank stops after the same
    // step with its checkpoint committed, and the relaunch continues from it: no restart, no step redone. The
    // launcher here reports failure without the ranks' exit code, as an MPIJob's status does: the ranks'
    // heartbeats (all preempted at one step) and the committed checkpoint tell the orchestrator.
    let preempted = launch_job(&d, "preempted", 60.0);
    let launcher = d.root.join("launcher");
    std::fs::create_dir_all(&launcher).unwrap();
    let real =
        String::from_utf8(std::process::Command::new("sh").args(["-c", "command -v mpirun"]).output().unwrap().stdout)
            .unwrap();
    std::fs::write(launcher.join("mpirun"), format!("#!/bin/sh\n{} \"$@\" || exit 1\n", real.trim())).unwrap();
    std::fs::set_permissions(launcher.join("mpirun"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", launcher.display(), std::env::var("PATH").unwrap());
    let mut child = launch(&preempted, 2)
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_for_step(&preempted, 1, 25, &mut child);
    // SAFETY: a worker process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (stdout, stderr) = finish(child);
    assert!(
        stdout.contains("job succeeded: 2 attempt(s), 0 restart(s), 0 step(s) redone after restarts, 1 preemption(s)"),
        "{stdout}\n{stderr}"
    );
    assert!(stderr.contains("preempted: the ranks committed a checkpoint"), "{stderr}");
    assert_eq!(max_diff(&variables(&reference, STEPS), &variables(&preempted, STEPS)), 0.0);
    assert_eq!(metrics(&reference), metrics(&preempted), "the metrics file continues without repeats or gaps");

    // The orchestrator interrupted (Ctrl-C): it stops the job with a checkpoint instead of leaving mpirun and the
    // ranks training, and launching again continues from there.
    let interrupted = launch_job(&d, "interrupted", 60.0);
    let mut child = start(&interrupted);
    wait_for_step(&interrupted, 1, 25, &mut child);
    // Meanwhile a second launch, or a bare worker, on the same checkpoint store: refused, naming the holder
    // (one writer per store), before anything is written.
    let out = launch(&interrupted, 2).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is in use by orchestrator launch on"), "{stderr}");
    let out = binary("worker").args(["train", "--config"]).arg(&interrupted).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is in use by orchestrator launch on"), "{stderr}");
    // SAFETY: the orchestrator this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let sent = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("stopped: every rank committed the checkpoint"), "{stderr}");
    assert!(sent.elapsed() < Duration::from_secs(30), "took {:?} to stop", sent.elapsed());
    let left = std::process::Command::new("pgrep").arg("-f").arg(&interrupted).output().unwrap();
    assert!(left.stdout.is_empty(), "processes of the job outlived the orchestrator: {:?}", left.stdout);
    let (stdout, stderr) = finish(start(&interrupted));
    assert!(stdout.contains("job succeeded: 1 attempt(s), 0 restart(s)"), "{stdout}\n{stderr}");
    assert_eq!(max_diff(&variables(&reference, STEPS), &variables(&interrupted, STEPS)), 0.0);
    assert_eq!(metrics(&reference), metrics(&interrupted), "the metrics file continues without repeats or gaps");

    // A rank stopped (hung): no heartbeat progress for 10 s, detected, killed and relaunched.
    let hung = launch_job(&d, "hung", 10.0);
    let mut child = start(&hung);
    let pid = wait_for_step(&hung, 1, 25, &mut child);
    let stopped = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Its heartbeat now names an unrelated process (forged, or a pid reused), one that even looks like a rank:
    // stopping the attempt must not signal it.
    let decoy_exe = d.root.join("worker");
    std::fs::copy("/bin/sleep", &decoy_exe).unwrap();
    let mut decoy = std::process::Command::new(&decoy_exe).arg("600").spawn().unwrap();
    let beat = run_dir(&hung).join("checkpoints/heartbeats/rank-1.json");
    let mut forged = heartbeat(&hung, 1).unwrap();
    forged["pid"] = decoy.id().into();
    std::fs::write(&beat, serde_json::to_vec(&forged).unwrap()).unwrap();
    let (stdout, stderr) = finish(child);
    assert!(decoy.try_wait().unwrap().is_none(), "the orchestrator killed a process that was not its rank");
    decoy.kill().unwrap();
    decoy.wait().unwrap();
    assert!(stdout.contains("1 restart(s)"), "{stdout}\n{stderr}");
    assert!(stderr.contains("made no progress for"), "{stderr}");
    assert!(stopped.elapsed() < Duration::from_secs(240), "the hang took {:?} to get over", stopped.elapsed());
    assert_eq!(max_diff(&variables(&reference, STEPS), &variables(&hung, STEPS)), 0.0);

    // status: the record, the newest checkpoint, the restarts.
    let out = binary("orchestrator").args(["status"]).arg(&hung).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ok(out);
    assert!(text.contains("status succeeded (2 ranks, target local), 1 restart(s)"), "{text}");
    assert!(text.contains(&format!("newest checkpoint step-{STEPS:08} at step {STEPS} of {STEPS}")), "{text}");
    assert!(text.contains("attempt 1: 2 rank(s), resumed from step") && text.contains("restarted in"), "{text}");
}

#[test]
fn bad_arguments_are_rejected_before_anything_starts() {
    let d = dataset();
    let config = launch_job(&d, "bad", 60.0);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--nodes", "0"], "--nodes must be at least 1"),
        (vec!["--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
        // global batch 4 of micro-batches of 2 cannot spread over 3 ranks.
        (vec!["--nodes", "3"], "its 2 data slots (global_batch / micro_batch) run on 1, 2 rank(s)"),
        (vec!["--target", "hostfile"], "--target hostfile needs --hostfile"),
        (
            vec!["--target", "lsf"],
            "invalid value 'lsf' for '--target <TARGET>'\n  [possible values: local, hostfile, k8s, slurm]",
        ),
        (vec!["--worker", "/nonexistent/worker"], "/nonexistent/worker does not exist"),
        // The k8s target needs store URIs the pods can reach.
        (vec!["--target", "k8s", "--dry-run"], "is a local path; pods need an s3:// URI"),
    ];
    for (args, want) in cases {
        let out = binary("orchestrator").args(["launch", "--config"]).arg(&config).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{args:?}: want `{want}`, got {stderr}");
    }
    // Encoders the local ranks could not load: refused before any rank starts, naming the field and where the
    // model id was looked for.
    let missing = d.root.join("missing-encoder.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let clip = avexpr_model::fixtures::clip_tiny_with_tokenizer().unwrap().display().to_string();
    std::fs::write(&missing, text.replace(&clip, "openai/clip-vit-base-patch32")).unwrap();
    let hub = d.root.join("empty-hub");
    let out =
        binary("orchestrator").args(["launch", "--config"]).arg(&missing).env("HF_HUB_CACHE", &hub).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let refs = hub.join("models--openai--clip-vit-base-patch32/refs/main");
    assert!(!out.status.success() && stderr.contains("model.clip.checkpoint"), "{stderr}");
    assert!(stderr.contains(&refs.display().to_string()) && !stderr.contains("started 1 rank"), "{stderr}");

    let hostfile = d.root.join("one-host");
    std::fs::write(&hostfile, "# one host only\nlocalhost slots=2\n").unwrap();
    let out = binary("orchestrator")
        .args(["launch", "--nodes", "2", "--target", "hostfile", "--hostfile"])
        .arg(&hostfile)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("lists 1 host(s), --nodes asks for 2"), "{stderr}");

    // Two hosts: a store path on this machine is refused (the other host would use its own copy) unless every
    // host mounts it; the store's AWS_* variables are forwarded to remote ranks by name, never by value.
    let hostfile = d.root.join("two-hosts");
    std::fs::write(&hostfile, "node-a slots=1\nnode-b slots=1\n").unwrap();
    let two_hosts = |config: &Path| {
        binary("orchestrator")
            .args(["launch", "--nodes", "2", "--target", "hostfile", "--dry-run", "--hostfile"])
            .arg(&hostfile)
            .arg("--config")
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", "GK-not-to-be-printed")
            .env("AWS_ENDPOINT_URL", "http://10.0.0.1:3900")
            .output()
            .unwrap()
    };
    let out = two_hosts(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("data.shards: `"), "{stderr}");
    assert!(
        stderr.contains("is a path on this machine; ranks on other hosts would each use their own copy"),
        "{stderr}"
    );
    let shared = d.root.join("shared.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace("launch: {", "launch: {shared_filesystem: true, ");
    std::fs::write(&shared, text).unwrap();
    let out = two_hosts(&shared);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ok(out);
    assert!(stdout.contains("-x AWS_ACCESS_KEY_ID ") && stdout.contains("-x AWS_ENDPOINT_URL "), "{stdout}");
    assert!(!stdout.contains("GK-not-to-be-printed") && !stdout.contains("10.0.0.1"), "{stdout}");
    assert!(!run_dir(&config).exists(), "nothing started");

    // A plan is per data slot: made on 2 ranks, it holds on any number of ranks with its 2 slots; a job with
    // another slot count (global batch 8 of micro-batches of 2: 4 slots) is refused.
    let out = binary("orchestrator").args(["plan", "--nodes", "2", "--config"]).arg(&config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ok(out);
    assert!(text.contains("imbalance") && text.contains("2 data slots"), "{text}");
    let plan = run_dir(&config).join("checkpoints/plan.json");
    let wider = d.root.join("wider.yaml");
    std::fs::write(&wider, std::fs::read_to_string(&config).unwrap().replace("global_batch: 4,", "global_batch: 8,"))
        .unwrap();
    let out = binary("worker").args(["train", "--config"]).arg(&wider).arg("--plan").arg(&plan).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("the plan was made for 2 data slots, the job has 4"), "{stderr}");

    // k8s without kubectl: said before anything is applied.
    let s3 = d.root.join("s3.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace(&d.shards.display().to_string(), "s3://avexpr/shards");
    std::fs::write(&s3, text + "  # s3\n").unwrap();
    let text = std::fs::read_to_string(&s3).unwrap();
    let text = text
        .replace("checkpoint: {every: 10,", "checkpoint: {uri: s3://avexpr/runs/bad, every: 10,")
        .replace("launch: {", "launch: {k8s: {image: 'registry.example.org/avexpr/worker@sha256:0123'}, ");
    std::fs::write(&s3, text).unwrap();
    let out = binary("orchestrator")
        .args(["launch", "--target", "k8s", "--config"])
        .arg(&s3)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("needs kubectl on PATH"), "{stderr}");
}

/// The README's Kubernetes example, run as written (from the README's text) on `configs/paper.yaml`: 4 worker
/// pods of 8 GPUs, the paper's global batch over its 32 data slots, stores and encoders the pods can reach.
#[test]
fn the_readmes_kubernetes_example_works_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let joined = readme.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| {
            l.starts_with("target/release/orchestrator launch") && l.contains("--target k8s") && l.contains("--image")
        })
        .expect("the README's Kubernetes example");
    let args: Vec<&str> = line.split('#').next().unwrap().split_whitespace().skip(1).collect();
    let out = binary("orchestrator").args(&args).current_dir(&root).output().unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = ok(out);
    let docs: Vec<serde_json::Value> =
        yaml.split("---\n").filter(|d| !d.trim().is_empty()).map(serde_yaml_value).collect();
    let mj = &docs[1];
    assert_eq!(mj["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"], 4, "{yaml}\n{stderr}");
    assert_eq!(mj["spec"]["slotsPerWorker"], 8, "{yaml}");
    let job = docs[0]["data"]["job.yaml"].as_str().unwrap();
    assert!(job.contains("uri: s3://") && job.contains("checkpoint: openai/clip-vit-base-patch32"), "{job}");
}

/// The manifests of `--target k8s --dry-run` against the Kubernetes OpenAPI schemas (kubernetes-validate, from
/// the project venv): the ConfigMap as is, each MPIJob replica's pod template as a PodTemplate (MPIJob is a
/// custom resource the schemas do not know), the Secret and PVC templates; the MPIJob's own required fields
/// per the MPI Operator's v2beta1 API; no credential anywhere.
#[test]
fn k8s_manifests_validate_and_hold_no_credentials() {
    // The image's build context leaves out this machine's build output, runs, git history and cargo settings
    // (whose libtorch path would break the image's build).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ignored = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    for entry in ["target/", "runs/", ".git/", ".cargo/"] {
        assert!(ignored.lines().any(|l| l.trim() == entry), ".dockerignore lacks {entry}");
    }
    let d = dataset();
    let config = job(
        &d,
        "k8s",
        100,
        "launch: {k8s: {image: registry.example.org/avexpr/worker:1.0, cpu: '16', memory: 120Gi, \
         cache_pvc: avexpr-cache}}\n",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&d.shards.display().to_string(), "s3://avexpr/shards")
        .replace("checkpoint: {every: 2,", "checkpoint: {uri: s3://avexpr/runs/k8s, every: 2,")
        .replace("global_batch: 4,", "global_batch: 8,");
    std::fs::write(&config, text).unwrap();
    let secret = "wJalrXUtnFEMI-not-a-real-key";
    let out = binary("orchestrator")
        .args(["launch", "--target", "k8s", "--dry-run", "--nodes", "2", "--gpus-per-node", "2", "--config"])
        .arg(&config)
        .env("AWS_ACCESS_KEY_ID", "GKexample")
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = ok(out);
    assert!(!yaml.contains(secret) && !stderr.contains(secret) && !yaml.contains("GKexample"), "credential leaked");

    let docs: Vec<serde_json::Value> =
        yaml.split("---\n").filter(|d| !d.trim().is_empty()).map(serde_yaml_value).collect();
    assert_eq!(docs.len(), 2, "{yaml}");
    let (cm, mj) = (&docs[0], &docs[1]);
    assert_eq!(cm["kind"], "ConfigMap");
    assert!(cm["data"]["job.yaml"].as_str().unwrap().contains("s3://avexpr/shards"));
    assert_eq!(mj["apiVersion"], "kubeflow.org/v2beta1");
    assert_eq!(mj["kind"], "MPIJob");
    let name = mj["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("avexpr-k8s-") && name.len() == "avexpr-k8s-".len() + 6, "{name}");
    let run_id = mj["metadata"]["labels"]["avexpr.io/run-id"].as_str().unwrap();
    assert_eq!(run_id.len(), 16);
    assert_eq!(cm["metadata"]["labels"]["avexpr.io/run-id"], run_id);
    assert!(name.ends_with(&run_id[..6]), "{name} {run_id}");
    let spec = &mj["spec"];
    assert_eq!(spec["slotsPerWorker"], 2);
    assert_eq!(spec["mpiImplementation"], "OpenMPI");
    assert_eq!(spec["runPolicy"]["backoffLimit"], 0, "restarts are the orchestrator's, from checkpoints");
    let launcher = &spec["mpiReplicaSpecs"]["Launcher"];
    let worker = &spec["mpiReplicaSpecs"]["Worker"];
    assert_eq!(launcher["replicas"], 1);
    assert_eq!(worker["replicas"], 2);
    let args: Vec<&str> = launcher["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let joined = args.join(" ");
    assert!(joined.starts_with("-np 4 -x AWS_ACCESS_KEY_ID -x AWS_SECRET_ACCESS_KEY"), "{joined}");
    assert!(
        joined.ends_with(
            "worker train --config /etc/avexpr/job.yaml --resume auto --plan s3://avexpr/runs/k8s/plan.json"
        ),
        "{joined}"
    );
    let container = &worker["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example.org/avexpr/worker:1.0");
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 2);
    assert_eq!(container["resources"]["limits"]["memory"], "120Gi");
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "avexpr-s3");
    for replica in [launcher, worker] {
        let pod = &replica["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(pod["automountServiceAccountToken"], false);
        let c = &pod["containers"][0];
        assert!(c["resources"]["limits"].is_object(), "resource limits on every container");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["image"], "registry.example.org/avexpr/worker:1.0");
    }

    // Kubernetes' own schemas.
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut write = |name: &str, doc: &serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(doc).unwrap()).unwrap();
        files.push(path);
    };
    write("configmap.json", cm);
    for (name, replica) in [("launcher.json", launcher), ("worker.json", worker)] {
        let pod_template = serde_json::json!({
            "apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name.trim_end_matches(".json")},
            "template": replica["template"],
        });
        write(name, &pod_template);
    }
    let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s");
    for file in ["secret.yaml", "pvc.yaml", "configmap.yaml"] {
        let doc = serde_yaml_value(&std::fs::read_to_string(k8s.join(file)).unwrap());
        write(&format!("template-{file}.json"), &doc);
    }
    let python = PathBuf::from(avexpr_worker::default_python());
    let validate = python.with_file_name("kubernetes-validate");
    assert!(validate.is_file(), "{} missing: run scripts/setup", validate.display());
    let out = std::process::Command::new(&validate).arg("--strict").args(&files).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate rejected a manifest:\n{report}");
    assert_eq!(report.matches(" passed for resource ").count(), files.len(), "{report}");
    // The validator does reject: a misspelt field in a pod template.
    let mut broken: serde_json::Value = serde_json::from_slice(&std::fs::read(&files[2]).unwrap()).unwrap();
    broken["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always".into();
    std::fs::write(&files[2], serde_json::to_string(&broken).unwrap()).unwrap();
    let out = std::process::Command::new(&validate).arg("--strict").arg(&files[2]).output().unwrap();
    assert!(!out.status.success(), "kubernetes-validate --strict accepted an unknown field");
}

/// `--target k8s` never harms what it does not own: no image means no launch (a default would name a public
/// image that would receive the S3 Secret), a name that is not a DNS-1123 label (`--all`) is refused, and an
/// MPIJob of the same name that another job owns (another run-id label) is neither deleted nor replaced. No
/// cluster here: `kubectl` is a stand-in that records its arguments and answers `get` as a cluster holding
/// another job's MPIJob would.
#[test]
fn k8s_launch_never_touches_another_jobs_mpijob() {
    let d = dataset();
    let config = job(&d, "paper", 100, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&d.shards.display().to_string(), "s3://avexpr/shards")
        .replace("checkpoint: {every: 2,", "checkpoint: {uri: s3://avexpr/runs/mine, every: 2,");
    std::fs::write(&config, &text).unwrap();
    let run = |config: &Path, extra: &[&str], path: &str| {
        let out = binary("orchestrator")
            .args(["launch", "--target", "k8s", "--config"])
            .arg(config)
            .args(extra)
            .env("PATH", path)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let path = std::env::var("PATH").unwrap();
    let (ok, stderr) = run(&config, &["--dry-run"], &path);
    assert!(!ok && stderr.contains("launch.k8s.image: not set"), "{stderr}");

    let with_image = d.root.join("with-image.yaml");
    std::fs::write(&with_image, text + "launch: {k8s: {image: 'registry.example.org/avexpr/worker@sha256:0123'}}\n")
        .unwrap();
    let (ok, stderr) = run(&with_image, &["--dry-run", "--name=--all"], &path);
    assert!(!ok && stderr.contains("--name `--all`: not a valid MPIJob name"), "{stderr}");

    let bin = d.root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = d.root.join("kubectl.calls");
    std::fs::write(
        bin.join("kubectl"),
        format!(
            "#!/bin/sh\necho \"$*\" >> {calls}\ncase \"$1\" in\n  version) exit 0 ;;\n  \
             get) echo 'someone-elses-run|' ;;\n  *) exit 0 ;;\nesac\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("kubectl"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ok, stderr) = run(&with_image, &["--name", "shared-name"], &format!("{}:{path}", bin.display()));
    assert!(!ok && stderr.contains("MPIJob default/shared-name belongs to another job"), "{stderr}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(calls.lines().any(|l| l.starts_with("get mpijob") && l.ends_with("-- shared-name")), "{calls}");
    assert!(!calls.contains("delete") && !calls.contains("apply"), "another job's MPIJob was touched: {calls}");
}

fn serde_yaml_value(text: &str) -> serde_json::Value {
    serde_yaml::from_str(text).unwrap()
}

/// Two network namespaces joined by a veth pair stand in for two hosts; removed on drop.
struct TwoHosts {
    names: [String; 2],
    addrs: [String; 2],
    subnet: String,
}

impl TwoHosts {
    fn create() -> Result<TwoHosts, String> {
        let id = std::process::id() % 50_000;
        let names = [format!("avx{id}a"), format!("avx{id}b")];
        let net = 100 + id % 150;
        let addrs = [format!("10.231.{net}.1"), format!("10.231.{net}.2")];
        let hosts = TwoHosts { names: names.clone(), addrs: addrs.clone(), subnet: format!("10.231.{net}.0/24") };
        let (va, vb) = (format!("vx{id}a"), format!("vx{id}b"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        ip(&["netns", "add", &names[0]])?;
        ip(&["netns", "add", &names[1]])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (ns, (dev, addr)) in names.iter().zip([(&va, &addrs[0]), (&vb, &addrs[1])]) {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Bytes sent by host `i`'s end of the pair.
    fn tx_bytes(&self, i: usize) -> u64 {
        let id = self.names[i].trim_start_matches("avx");
        let dev = format!("vx{id}");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.names[i], "cat", &format!("/sys/class/net/{dev}/statistics/tx_bytes")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `--target hostfile` across two "hosts": network namespaces joined by a veth pair, with a stand-in for ssh
/// that enters the other namespace (../shared/ENVIRONMENT.md). The second host is set up as another machine
/// would be: it does not see the launching host's job files (the test's folder is hidden under an empty tmpfs in
/// its own mount namespace) and its ranks start from a login environment (no AWS_* unless mpirun forwards them).
/// Shards and checkpoints live on a Garage server on the first host's address. The job completes (the ranks read
/// the job file from the store, with the credentials forwarded by name), its traffic crosses the veth pair, and
/// the result equals a local 2-rank run's bitwise.
#[test]
fn hostfile_run_across_two_hosts_with_their_own_files_and_environment() {
    let hosts = match TwoHosts::create() {
        Ok(h) => h,
        Err(reason) => {
            println!("skipped: cannot create network namespaces here ({reason})");
            return;
        }
    };
    let d = dataset();
    let steps = 40;
    let local = job(&d, "local", steps, "");
    ok(launch(&local, 2).output().unwrap());

    use avexpr_data::garage::{BUCKET, Garage, in_netns};
    let garage = Garage::start_in_netns(&hosts.names[0], &hosts.addrs[0]);
    let on_host_a = |program: &Path| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &hosts.names[0]]).arg(program).env_remove("LD_LIBRARY_PATH").envs(garage.env());
        cmd
    };
    let shards = format!("s3://{BUCKET}/shards");
    ok(on_host_a(binary("data").get_program().as_ref())
        .args(["ingest", "--segment-frames", "16", "--shard-frames", "32", "--root"])
        .arg(d.root.join("affwild2"))
        .args(["--out", &shards])
        .output()
        .unwrap());

    // The stand-in for ssh is installed on every host, as ssh is: outside the folder the second host cannot see.
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = agent_dir.path().join("agent.sh");
    // While this file exists, the second host cannot be reached (its ssh fails, as for a host that went down).
    let down = agent_dir.path().join("second-host.down");
    let script = r#"#!/bin/sh
# In place of ssh: run the command on the host (in its network namespace). The second host has its own view of
# the files (the test's folder hidden under an empty tmpfs) and a login environment.
host="$1"; shift
case "$host" in
  HOST_A) exec ip netns exec NS_A sh -c "$*" ;;
  HOST_B) [ -e DOWN ] && { echo "ssh: connect to host $host port 22: No route to host" >&2; exit 255; }
      exec ip netns exec NS_B unshare --mount --propagation private sh -c \
      'mount -t tmpfs hostb "$0" && exec env -i PATH="$PATH" HOME="$HOME" sh -c "$1"' ROOT "$*" ;;
  *) echo "unknown host $host" >&2; exit 1 ;;
esac
"#;
    let script = script
        .replace("HOST_A", &hosts.addrs[0])
        .replace("HOST_B", &hosts.addrs[1])
        .replace("NS_A", &hosts.names[0])
        .replace("NS_B", &hosts.names[1])
        .replace("ROOT", &d.root.display().to_string())
        .replace("DOWN", &down.display().to_string());
    std::fs::write(&agent, script).unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hostfile = d.root.join("hostfile");
    std::fs::write(&hostfile, format!("{} slots=1\n{} slots=1\n", hosts.addrs[0], hosts.addrs[1])).unwrap();
    let subnet = &hosts.subnet;
    let remote = job(
        &d,
        "remote",
        steps,
        &format!(
            "launch: {{mpirun_args: [--mca, plm_rsh_agent, {agent}, --mca, oob_tcp_if_include, {subnet}, \
             --mca, btl_tcp_if_include, {subnet}, --mca, btl, 'self,tcp']}}\n",
            agent = agent.display()
        ),
    );
    let text = std::fs::read_to_string(&remote)
        .unwrap()
        .replace(&d.shards.display().to_string(), &shards)
        .replace("checkpoint: {every: 2,", &format!("checkpoint: {{uri: 's3://{BUCKET}/remote', every: 2,"));
    std::fs::write(&remote, text).unwrap();
    let before = hosts.tx_bytes(1);
    // The orchestrator (and mpirun) run on the first host, with the store's credentials in their environment.
    let out = on_host_a(binary("orchestrator").get_program().as_ref())
        .args(["launch", "--nodes", "2", "--target", "hostfile", "--hostfile"])
        .arg(&hostfile)
        .arg("--config")
        .arg(&remote)
        .output()
        .unwrap();
    if !out.status.success() {
        // The ranks' own output says why (kept in the run folder, which the test removes).
        for n in 0..2 {
            let log = run_dir(&remote).join(format!("attempt-{n}.log"));
            println!("--- {}:\n{}", log.display(), std::fs::read_to_string(&log).unwrap_or_default());
        }
    }
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), ok(out));
    assert!(stdout.contains("job succeeded: 1 attempt(s), 0 restart(s)"), "{stdout}");
    assert!(stderr.contains(&format!("job file for the ranks: s3://{BUCKET}/remote/config/remote.yaml")), "{stderr}");
    let sent = hosts.tx_bytes(1) - before;
    println!("the second host sent {sent} bytes over the veth pair");
    assert!(sent > 100_000, "the second host sent only {sent} bytes over the veth pair");
    let variables_file = d.root.join("remote.safetensors");
    let bytes = in_netns(&hosts.names[0], || {
        garage.store(&format!("s3://{BUCKET}/remote")).blocking().get(&format!("step-{steps:08}/variables.safetensors"))
    })
    .unwrap();
    std::fs::write(&variables_file, bytes).unwrap();
    let remote_vars = tch::Tensor::read_safetensors(&variables_file).unwrap().into_iter().collect();
    assert_eq!(max_diff(&variables(&local, steps), &remote_vars), 0.0);

    // Elastic: mid-run the second host goes down (its rank dies, its ssh fails from then on). With --min-nodes 1
    // the orchestrator relaunches on the first host alone, which accumulates 2 micro-batches per step where 2
    // ranks took one each: the same global batches, so the same result as the local 2-rank run.
    let elastic = d.root.join("elastic.yaml");
    let text = std::fs::read_to_string(&remote)
        .unwrap()
        .replace(&format!("s3://{BUCKET}/remote"), &format!("s3://{BUCKET}/elastic"));
    std::fs::write(&elastic, text).unwrap();
    let mut child = on_host_a(binary("orchestrator").get_program().as_ref())
        .args(["launch", "--nodes", "2", "--min-nodes", "1", "--target", "hostfile", "--hostfile"])
        .arg(&hostfile)
        .arg("--config")
        .arg(&elastic)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let store = |uri: &str| garage.store(uri);
    let step_of_rank_0 = || {
        in_netns(&hosts.names[0], || {
            store(&format!("s3://{BUCKET}/elastic")).blocking().get("heartbeats/rank-0.json").ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
    };
    let started = Instant::now();
    while step_of_rank_0() < 10 {
        assert!(child.try_wait().unwrap().is_none(), "the elastic launch ended early");
        assert!(started.elapsed() < Duration::from_secs(180), "no progress on two hosts");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&down, "").unwrap();
    let rank_1 = rank_pid(1, "elastic.yaml").expect("rank 1 of the elastic job");
    // SAFETY: a rank this test started.
    unsafe { libc::kill(rank_1, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), ok(out));
    assert!(stdout.contains("job succeeded: 2 attempt(s), 1 restart(s)"), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("running on 1 of 2 host(s) (unreachable: {})", hosts.addrs[1])), "{stderr}");
    for line in stderr.lines().filter(|l| l.contains("restarted:")) {
        println!("hostfile restart cost: {line}");
    }
    let bytes = in_netns(&hosts.names[0], || {
        store(&format!("s3://{BUCKET}/elastic")).blocking().get(&format!("step-{steps:08}/variables.safetensors"))
    })
    .unwrap();
    std::fs::write(&variables_file, bytes).unwrap();
    let elastic_vars = tch::Tensor::read_safetensors(&variables_file).unwrap().into_iter().collect();
    let diff = max_diff(&variables(&local, steps), &elastic_vars);
    println!("2 hosts -> 1 host mid-run: largest variable difference from the local 2-rank run {diff:e}");
    assert!(diff < 1e-5, "{diff}");
    let out = on_host_a(binary("orchestrator").get_program().as_ref()).arg("status").arg(&elastic).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.contains("attempt 0: 2 rank(s)") && status.contains("attempt 1: 1 rank(s)"), "{status}");
}

/// The pid of rank `rank` of the job whose config file is named `config_name` (from its command line and the
/// rank Open MPI puts in its environment).
fn rank_pid(rank: usize, config_name: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(config_name) || !cmdline.contains("train") {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        if environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// `--target slurm` against a real one-node Slurm (munged, slurmctld, slurmd started by the test): the job is
/// submitted with sbatch and runs to the end; then a run that gets the time-limit warning mid-way (SIGUSR1 to the
/// batch shell, what `--signal=B:USR1@...` sends) checkpoints, requeues itself, resumes and ends with the
/// uninterrupted run's variables and metrics: no step lost or redone.
#[test]
fn slurm_runs_the_job_and_a_warned_job_requeues_and_resumes() {
    let slurm = match avexpr_tests::slurm::Slurm::start() {
        Ok(s) => s,
        Err(reason) => panic!("cannot start Slurm here: {reason}"),
    };
    let d = dataset();
    let submit = |name: &str| {
        let config = launch_job(&d, name, 60.0);
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("max_restarts: 2}", "max_restarts: 2, slurm: {gpus: false, signal_s: 30}}");
        std::fs::write(&config, text).unwrap();
        // One node of the test cluster, two ranks on it.
        let child = launch(&config, 1)
            .args(["--gpus-per-node", "2", "--target", "slurm"])
            .envs(slurm.env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (config, child)
    };
    // A job asking for more nodes than the partition has fails at once, naming Slurm's reason (not pending
    // forever under a watcher that waits for it).
    let config = launch_job(&d, "slurm-too-big", 60.0);
    let text =
        std::fs::read_to_string(&config).unwrap().replace("max_restarts: 2}", "max_restarts: 0, slurm: {gpus: false}}");
    std::fs::write(&config, text).unwrap();
    let out = launch(&config, 2).args(["--target", "slurm"]).envs(slurm.env()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Slurm's reason is PartitionNodeLimit or PartitionConfig, depending on when it looks.
    assert!(!out.status.success() && stderr.contains("cannot start: Partition"), "{stderr}");

    let (reference, child) = submit("slurm-reference");
    let (stdout, stderr) = finish(child);
    assert!(stdout.contains("job succeeded: 1 attempt(s), 0 restart(s)"), "{stdout}\n{stderr}");
    let script = std::fs::read_to_string(run_dir(&reference).join("slurm-attempt-0.sh")).unwrap();
    assert!(script.contains("#SBATCH --requeue") && script.contains("#SBATCH --signal=B:USR1@30"), "{script}");
    assert!(!script.contains("AWS_SECRET_ACCESS_KEY="), "{script}");

    let (warned, mut child) = submit("slurm-warned");
    wait_for_step(&warned, 0, 150, &mut child);
    let ids =
        std::process::Command::new("squeue").args(["-h", "-o", "%i", "-t", "R"]).envs(slurm.env()).output().unwrap();
    let id = String::from_utf8_lossy(&ids.stdout).trim().to_string();
    assert!(!id.is_empty() && !id.contains('\n'), "one running job: {id}");
    let out = std::process::Command::new("scancel")
        .args(["--batch", "--signal=USR1", &id])
        .envs(slurm.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (stdout, stderr) = finish(child);
    if !stdout.contains("job succeeded: 1 attempt(s)") {
        // The job's own output says why (kept in the run folder, which the test removes).
        for e in std::fs::read_dir(run_dir(&warned)).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("slurm-") {
                println!("--- {}:\n{}", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    // The job requeued itself: one attempt, one restart counted by Slurm, no step lost or redone. (With the
    // requeue hold lifted at once, about half the runs failed here: the node refused the restarted job's
    // credential, "Job credential revoked", and the orchestrator had to submit it again.)
    let requeued =
        stdout.contains("job succeeded: 1 attempt(s), 0 restart(s), 0 step(s) redone after restarts, 1 preemption(s)");
    assert!(requeued, "{stdout}\n{stderr}");
    assert_eq!(slurm.job_field(&id, "Restarts").as_deref(), Some("1"), "requeued once");
    for line in stderr.lines().filter(|l| l.contains("restarted:")) {
        println!("Slurm restart cost (requeue): {line}");
    }
    assert_eq!(max_diff(&variables(&reference, STEPS), &variables(&warned, STEPS)), 0.0);
    assert_eq!(metrics(&reference), metrics(&warned), "the metrics file continues without repeats or gaps");
}

/// In place of `kubectl`: a one-namespace cluster of `capacity` nodes (a file the test rewrites) that runs an
/// applied MPIJob's launcher command here once every worker pod fits (the MPI Operator's WaitForWorkersReady),
/// and reports pods that do not fit as the scheduler does (PodScheduled False, reason Unschedulable).
const KUBECTL_STANDIN: &str = r#"
import json, os, signal, subprocess, sys, time, yaml
state = os.environ["KUBECTL_STANDIN_DIR"]
path = lambda name: os.path.join(state, name)
with open(path("calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
def load():
    try:
        return json.load(open(path("job.json")))
    except FileNotFoundError:
        return None
def save(job):
    json.dump(job, open(path("job.json"), "w"))
def capacity():
    return int(open(path("capacity")).read())
def maybe_launch(job):
    if job is None or job.get("pid") or job["replicas"] > capacity():
        return job
    args = [path("job.yaml") if a == "/etc/avexpr/job.yaml" else a for a in job["args"]]
    rc = path("rc-%d" % job["number"])
    log = open(path("launcher-%d.log" % job["number"]), "w")
    p = subprocess.Popen(["sh", "-c", 'mpirun --oversubscribe "$@"; echo $? > ' + rc, "sh"] + args,
                         stdout=log, stderr=log, start_new_session=True)
    job.update(pid=p.pid, rc=rc)
    save(job)
    return job
cmd = sys.argv[1:]
job = maybe_launch(load())
if cmd[0] == "version":
    sys.exit(0)
if cmd[:2] == ["get", "mpijob"]:
    if any(a.startswith("-o=jsonpath={.metadata.labels") for a in cmd):
        print(job["run_id"] + "|" if job else "", end="")
    elif job:
        rc = job.get("rc")
        if rc and os.path.exists(rc) and open(rc).read().strip():
            print("Succeeded" if open(rc).read().strip() == "0" else "Failed", end="")
        else:
            print("Running" if job.get("pid") else "Created", end="")
    sys.exit(0)
if cmd[:2] == ["get", "pods"]:
    items = []
    for i in range((job or {}).get("replicas", 0)):
        fits = i < capacity()
        cond = {"type": "PodScheduled", "status": "True"} if fits else {
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/%d nodes are available: %d Insufficient cpu." % (capacity(), capacity())}
        phase = "Running" if fits and job.get("pid") else "Pending"
        items.append({"metadata": {"name": "%s-worker-%d" % (job["name"], i)},
                      "status": {"phase": phase, "conditions": [cond]}})
    print(json.dumps({"items": items}))
    sys.exit(0)
if cmd[0] == "apply":
    try:
        number = json.load(open(path("last.json")))["number"] + 1
    except FileNotFoundError:
        number = 0
    json.dump({"number": number}, open(path("last.json"), "w"))
    for doc in yaml.safe_load_all(sys.stdin):
        if doc["kind"] == "ConfigMap":
            open(path("job.yaml"), "w").write(doc["data"]["job.yaml"])
        if doc["kind"] == "MPIJob":
            spec = doc["spec"]["mpiReplicaSpecs"]
            job = {"name": doc["metadata"]["name"], "run_id": doc["metadata"]["labels"]["avexpr.io/run-id"],
                   "replicas": spec["Worker"]["replicas"], "number": number,
                   "args": spec["Launcher"]["template"]["spec"]["containers"][0]["args"]}
    save(job)
    maybe_launch(job)
    sys.exit(0)
if cmd[0] == "delete":
    if job and job.get("pid"):
        try:
            os.killpg(job["pid"], signal.SIGTERM)
            for _ in range(100):
                os.killpg(job["pid"], 0)
                time.sleep(0.1)
            os.killpg(job["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    if job:
        os.replace(path("job.json"), path("deleted-%d.json" % job["number"]))
    sys.exit(0)
sys.exit("kubectl stand-in: unknown command " + " ".join(cmd))
"#;

/// Kubernetes, elastic (`--min-nodes`): worker pods the cluster cannot schedule end the attempt after
/// `launch.k8s.unschedulable_s`, the job runs on the nodes it has with the global batch unchanged, and grows back
/// at the next restart when nodes return. No cluster here: `kubectl` is a stand-in that runs the MPIJob's real
/// launcher command (mpirun of the workers) on this machine against Garage; the result equals a local 2-rank run's
/// bitwise.
#[test]
fn k8s_elastic_launch_runs_on_the_pods_it_gets_and_grows_back() {
    let d = dataset();
    let steps = 40;
    let reference = job(&d, "k8s-reference", steps, "");
    ok(launch(&reference, 2).output().unwrap());

    use avexpr_data::garage::{BUCKET, Garage};
    let garage = Garage::start();
    let shards = format!("s3://{BUCKET}/shards");
    ok(binary("data")
        .args(["ingest", "--segment-frames", "16", "--shard-frames", "32", "--root"])
        .arg(d.root.join("affwild2"))
        .args(["--out", &shards])
        .envs(garage.env())
        .output()
        .unwrap());
    let uri = format!("s3://{BUCKET}/k8s-elastic");
    let config = job(
        &d,
        "k8s-elastic",
        steps,
        "launch: {heartbeat_every_s: 0.2, heartbeat_timeout_s: 60, max_restarts: 2, k8s: {image: \
         'registry.example.org/avexpr/worker@sha256:0123', gpu_resource: '', unschedulable_s: 2}}\n",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&d.shards.display().to_string(), &shards)
        .replace("checkpoint: {every: 2,", &format!("checkpoint: {{uri: '{uri}', every: 2,"));
    std::fs::write(&config, text).unwrap();

    let bin = d.root.join("bin");
    let state = d.root.join("cluster");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let python = std::env::var("AVEXPR_PYTHON").unwrap_or_else(|_| "python3".into());
    std::fs::write(bin.join("kubectl"), format!("#!{python}{KUBECTL_STANDIN}")).unwrap();
    std::fs::set_permissions(bin.join("kubectl"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(binary("worker").get_program(), bin.join("worker")).unwrap();
    // One node of the two the job asks for.
    std::fs::write(state.join("capacity"), "1").unwrap();
    let mut child = binary("orchestrator")
        .args(["launch", "--target", "k8s", "--nodes", "2", "--min-nodes", "1", "--gpus-per-node", "1", "--config"])
        .arg(&config)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .env("KUBECTL_STANDIN_DIR", &state)
        .envs(garage.env())
        .env("AWS_REGION", avexpr_data::garage::REGION)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("LD_LIBRARY_PATH")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let store = garage.store(&uri);
    let rank_0 = || {
        store
            .blocking()
            .get("heartbeats/rank-0.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|b| b["world_size"].as_u64() == Some(1))
    };
    // The attempt on the one node that fits gets going; then the second node is back and the rank dies.
    let started = Instant::now();
    let pid = loop {
        if let Some(b) = rank_0()
            && b["step"].as_u64().unwrap_or(0) >= 10
        {
            break b["pid"].as_u64().unwrap() as i32;
        }
        if child.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("no progress on one node:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::fs::write(state.join("capacity"), "2").unwrap();
    // SAFETY: a rank this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (stdout, stderr) = finish(child);
    assert!(stdout.contains("job succeeded: 3 attempt(s), 1 restart(s)"), "{stdout}\n{stderr}");
    assert!(stderr.contains("1 of 2 worker pod(s) unschedulable"), "{stderr}");
    for line in stderr.lines().filter(|l| l.contains("restarted:") || l.contains("unschedulable for")) {
        println!("{line}");
    }
    let out = binary("orchestrator").args(["status"]).arg(&config).envs(garage.env()).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in ["attempt 0: 2 rank(s)", "attempt 1: 1 rank(s)", "attempt 2: 2 rank(s)"] {
        assert!(status.contains(line), "{line}: {status}");
    }
    assert!(status.contains("unschedulable: 1 of 2 worker pod(s)"), "{status}");
    let file = d.root.join("k8s-elastic.safetensors");
    std::fs::write(&file, store.blocking().get(&format!("step-{steps:08}/variables.safetensors")).unwrap()).unwrap();
    let vars = tch::Tensor::read_safetensors(&file).unwrap().into_iter().collect();
    assert_eq!(max_diff(&variables(&reference, steps), &vars), 0.0);
}

/// Slurm over two nodes: a slurmd in each of two network namespaces (the controller in the first), the job's
/// mpirun inside the allocation starting the second node's ranks through Slurm itself (srun, as Open MPI does in
/// an allocation). The stores are local paths both nodes see (a shared file system). Ranks on both nodes train
/// (traffic crosses the veth pair) and the result equals a local 2-rank run's bitwise.
#[test]
fn slurm_runs_a_job_across_two_nodes() {
    let hosts = match TwoHosts::create() {
        Ok(h) => h,
        Err(reason) => {
            println!("skipped: cannot create network namespaces here ({reason})");
            return;
        }
    };
    let slurm = avexpr_tests::slurm::Slurm::start_on(&[
        (hosts.names[0].as_str(), hosts.addrs[0].as_str()),
        (hosts.names[1].as_str(), hosts.addrs[1].as_str()),
    ])
    .unwrap_or_else(|reason| panic!("cannot start a two-node Slurm here: {reason}"));
    let d = dataset();
    let steps = 20;
    let local = job(&d, "slurm-local", steps, "");
    ok(launch(&local, 2).output().unwrap());
    let subnet = &hosts.subnet;
    let config = job(
        &d,
        "slurm-two",
        steps,
        &format!(
            "launch: {{heartbeat_every_s: 0.2, heartbeat_timeout_s: 60, max_restarts: 0, shared_filesystem: true, \
             mpirun_args: [--mca, oob_tcp_if_include, {subnet}, --mca, btl_tcp_if_include, {subnet}, --mca, btl, \
             'self,tcp'], slurm: {{gpus: false}}}}\n"
        ),
    );
    let before = hosts.tx_bytes(1);
    let out = slurm
        .command(binary("orchestrator").get_program())
        .args(["launch", "--nodes", "2", "--gpus-per-node", "1", "--target", "slurm", "--config"])
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    if !out.status.success() {
        for e in std::fs::read_dir(run_dir(&config)).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("slurm-") {
                println!("--- {}:\n{}", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ok(out);
    assert!(stdout.contains("job succeeded: 1 attempt(s), 0 restart(s)"), "{stdout}");
    let sent = hosts.tx_bytes(1) - before;
    println!("the second node sent {sent} bytes over the veth pair");
    assert!(sent > 100_000, "the second node sent only {sent} bytes over the veth pair");
    assert_eq!(max_diff(&variables(&local, steps), &variables(&config, steps)), 0.0);
}

/// `orchestrator folds`: one training per fold on the re-split videos, each validating on its fold (the folds
/// partition the labelled videos), and the report of their macro F1.
#[test]
fn folds_train_one_job_per_fold_and_report_mean_and_std() {
    let d = dataset();
    let config = job(&d, "folds", 2, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("log_every: 1, threads: 1}", "log_every: 1, threads: 1, eval_every: 2}");
    std::fs::write(&config, text).unwrap();
    let out = binary("orchestrator")
        .args(["folds", "--folds", "3", "--seed", "1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("3-fold cross-validation"), "{stdout}");
    let f1s: Vec<f64> = stdout
        .lines()
        .filter(|l| l.contains("/fold-") && l.contains("step-") && !l.contains("--checkpoint"))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(f1s.len(), 3, "{stdout}");
    let mean = f1s.iter().sum::<f64>() / 3.0;
    assert!(stdout.contains(&format!("macro F1 over 3 folds: {mean:.4} +- ")), "{stdout}");
    // Each fold validated on its own videos: the validation videos of the three runs partition the labelled
    // videos (the test split is not among them).
    let store = avexpr_data::store::Store::open(&d.shards.display().to_string()).unwrap();
    let manifest = avexpr_data::manifest::read_manifest(&store).unwrap();
    let mut validated: Vec<String> = Vec::new();
    for fold in 0..3 {
        let eval_log = std::fs::read_to_string(run_dir(&config).join(format!("fold-{fold}")).join("metrics.jsonl"))
            .unwrap_or_else(|e| panic!("fold {fold}: {e}"));
        assert!(eval_log.contains("val_macro_f1"), "fold {fold} validated");
        let fold_config = run_dir(&config).join("folds").join(format!("fold-{fold}.yaml"));
        let fold_job = avexpr_worker::job::JobConfig::from_file(&fold_config).unwrap();
        let mut m = manifest.clone();
        avexpr_data::folds::apply(&mut m, &fold_job.data.folds.unwrap());
        validated.extend(
            m.videos.iter().filter(|v| v.split == avexpr_data::layout::Split::Validation).map(|v| v.name.clone()),
        );
    }
    validated.sort();
    let mut labelled: Vec<String> =
        avexpr_data::folds::labelled_videos(&manifest).iter().map(|v| v.name.clone()).collect();
    labelled.sort();
    assert_eq!(validated, labelled);
    // The three best checkpoints, from three stores, predict the test split as one ensemble, as the report says.
    let checkpoints =
        stdout.lines().find_map(|l| l.split("--checkpoint ").nth(1)).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(checkpoints.split(',').count(), 3, "{checkpoints}");
    let out = binary("worker")
        .args(["predict", "--split", "test", "--checkpoint", checkpoints, "--out"])
        .arg(d.root.join("folds-test.txt"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.contains("from the ensemble of"),
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
