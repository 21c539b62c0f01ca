//! The Kubernetes target: the MPIJob and ConfigMap of a launch, rendered from the templates in `k8s/` (built
//! in; `--templates DIR` reads edited copies) by setting fields on the parsed YAML, and applied, followed and
//! deleted with `kubectl`.

use std::cell::Cell;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_yaml::{Mapping, Value};

use crate::spec::{Job, Outcome};

pub const MPIJOB: &str = include_str!("../../k8s/mpijob.yaml");
pub const CONFIGMAP: &str = include_str!("../../k8s/configmap.yaml");

/// Where the config is mounted in the pods.
pub const CONFIG_PATH: &str = "/etc/avexpr/job.yaml";

/// The S3 settings every rank needs, passed by name from the launcher's environment (the Secret) with
/// `mpirun -x`: values never appear in an argument.
const AWS_VARS: [&str; 4] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"];

fn template(templates: Option<&Path>, file: &str, builtin: &str) -> Result<Value> {
    let text = match templates {
        Some(dir) => std::fs::read_to_string(dir.join(file)).with_context(|| dir.join(file).display().to_string())?,
        None => builtin.to_string(),
    };
    serde_yaml::from_str(&text).with_context(|| format!("template {file}: not YAML"))
}

/// `value[path...]`, creating mappings on the way.
fn at<'a>(value: &'a mut Value, path: &[&str]) -> Result<&'a mut Value> {
    let mut v = value;
    for key in path {
        if v.is_null() {
            *v = Value::Mapping(Mapping::new());
        }
        let map = v.as_mapping_mut().with_context(|| format!("template: `{key}` is under a non-mapping"))?;
        v = map.entry(Value::from(*key)).or_insert(Value::Null);
    }
    Ok(v)
}

fn first_container<'a>(spec: &'a mut Value, replica: &str) -> Result<&'a mut Value> {
    at(spec, &["mpiReplicaSpecs", replica, "template", "spec", "containers"])?
        .as_sequence_mut()
        .and_then(|c| c.first_mut())
        .with_context(|| format!("template mpijob.yaml: {replica} has no container"))
}

/// The ConfigMap and MPIJob of a launch, in apply order. `config_text` is the job's config file.
pub fn render(job: &Job, name: &str, config_text: &str, templates: Option<&Path>) -> Result<Vec<Value>> {
    let k = &job.job.launch.k8s;
    check_name(name)?;
    let run_id = run_id(&job.job);
    for (field, uri) in [("data.shards", &job.job.data.shards), ("checkpoint.uri", &job.job.checkpoint.uri)] {
        anyhow::ensure!(
            uri.starts_with("s3://") || uri.starts_with("/cache/") && !k.cache_pvc.is_empty(),
            "{field}: `{uri}` is a local path; pods need an s3:// URI (or /cache/... with launch.k8s.cache_pvc)"
        );
    }
    anyhow::ensure!(
        !k.image.is_empty(),
        "launch.k8s.image: not set: the worker image built from k8s/Dockerfile and pushed to your registry, best \
         by digest (registry.example.org/avexpr/worker@sha256:...), so that the pods run exactly that build"
    );
    if !k.image.contains("@sha256:") {
        tracing::warn!(image = %k.image, "launch.k8s.image is a tag, not a digest: the pods run whatever it points to");
    }
    let config_name = format!("{name}-config");

    let mut cm = template(templates, "configmap.yaml", CONFIGMAP)?;
    *at(&mut cm, &["metadata", "name"])? = config_name.clone().into();
    *at(&mut cm, &["metadata", "namespace"])? = k.namespace.clone().into();
    *at(&mut cm, &["metadata", "labels", RUN_ID_LABEL])? = run_id.clone().into();
    *at(&mut cm, &["data", "job.yaml"])? = config_text.into();

    let mut mj = template(templates, "mpijob.yaml", MPIJOB)?;
    *at(&mut mj, &["metadata", "name"])? = name.into();
    *at(&mut mj, &["metadata", "namespace"])? = k.namespace.clone().into();
    *at(&mut mj, &["metadata", "labels", RUN_ID_LABEL])? = run_id.into();
    let spec = at(&mut mj, &["spec"])?;
    *at(spec, &["slotsPerWorker"])? = (job.gpus_per_node as u64).into();
    *at(spec, &["mpiReplicaSpecs", "Worker", "replicas"])? = (job.nodes as u64).into();

    let mut args: Vec<String> = vec!["-np".into(), job.world_size().to_string()];
    for var in AWS_VARS {
        args.extend(["-x".into(), var.into()]);
    }
    args.extend(job.job.launch.mpirun_args.iter().cloned());
    args.push("worker".into());
    args.extend(job.worker_args(CONFIG_PATH));
    let launcher = first_container(spec, "Launcher")?;
    *at(launcher, &["image"])? = k.image.clone().into();
    *at(launcher, &["args"])? = Value::Sequence(args.into_iter().map(Value::from).collect());
    *at(launcher, &["envFrom"])? = secret_ref(&k.s3_secret);

    let worker = first_container(spec, "Worker")?;
    *at(worker, &["image"])? = k.image.clone().into();
    *at(worker, &["envFrom"])? = secret_ref(&k.s3_secret);
    for side in ["requests", "limits"] {
        let r = at(worker, &["resources", side])?;
        *at(r, &["cpu"])? = k.cpu.clone().into();
        *at(r, &["memory"])? = k.memory.clone().into();
        if !k.gpu_resource.is_empty() {
            *at(r, &[k.gpu_resource.as_str()])? = (job.gpus_per_node as u64).into();
        }
    }
    let volumes = at(spec, &["mpiReplicaSpecs", "Worker", "template", "spec", "volumes"])?;
    for v in volumes.as_sequence_mut().into_iter().flatten() {
        if v.get("name").and_then(Value::as_str) == Some("config") {
            *at(v, &["configMap", "name"])? = config_name.clone().into();
        }
    }
    if !k.cache_pvc.is_empty() {
        let volume = serde_yaml::from_str::<Value>(&format!(
            "{{name: cache, persistentVolumeClaim: {{claimName: {}}}}}",
            serde_json::to_string(&k.cache_pvc)?
        ))?;
        at(spec, &["mpiReplicaSpecs", "Worker", "template", "spec", "volumes"])?
            .as_sequence_mut()
            .context("template mpijob.yaml: Worker volumes is not a list")?
            .push(volume);
        let worker = first_container(spec, "Worker")?;
        let mounts = at(worker, &["volumeMounts"])?;
        if mounts.is_null() {
            *mounts = Value::Sequence(Vec::new());
        }
        mounts
            .as_sequence_mut()
            .context("template mpijob.yaml: Worker volumeMounts is not a list")?
            .push(serde_yaml::from_str("{name: cache, mountPath: /cache}")?);
    }
    Ok(vec![cm, mj])
}

fn secret_ref(secret: &str) -> Value {
    let mut inner = Mapping::new();
    inner.insert("name".into(), secret.into());
    let mut item = Mapping::new();
    item.insert("secretRef".into(), Value::Mapping(inner));
    Value::Sequence(vec![Value::Mapping(item)])
}

/// The documents as one multi-document YAML stream.
pub fn to_yaml(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for d in docs {
        out += "---\n";
        out += &serde_yaml::to_string(d)?;
    }
    Ok(out)
}

/// Fails (before anything is applied) when `kubectl` cannot be run.
pub fn check_kubectl() -> Result<()> {
    let out = Command::new("kubectl").args(["version", "--client"]).output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => anyhow::bail!("kubectl version --client failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => anyhow::bail!("--target k8s needs kubectl on PATH: {e}"),
    }
}

pub fn apply(yaml: &str) -> Result<()> {
    let mut child =
        Command::new("kubectl").args(["apply", "-f", "-"]).stdin(Stdio::piped()).spawn().context("kubectl apply")?;
    child.stdin.take().context("kubectl stdin")?.write_all(yaml.as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "kubectl apply failed ({status})");
    Ok(())
}

/// The label that ties an MPIJob and its ConfigMap to one job (its checkpoint store): checked before any
/// delete, so that a launch never deletes another job's MPIJob that happens to have the same name.
pub const RUN_ID_LABEL: &str = "avexpr.io/run-id";

/// A job's run id: its checkpoint store (one job writes a store at a time), hashed.
pub fn run_id(job: &avexpr_worker::job::JobConfig) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(job.checkpoint.uri.trim_end_matches('/').as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The longest MPIJob name: the operator names pods `<name>-worker-<i>` and their hostnames must stay DNS labels.
pub const MAX_NAME: usize = 50;

/// An MPIJob name as Kubernetes accepts it (a DNS-1123 label, short enough for the pods' names).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    anyhow::ensure!(
        ok,
        "--name `{name}`: not a valid MPIJob name (a DNS-1123 label: lowercase letters, digits and '-', starting \
         and ending with a letter or digit, at most {MAX_NAME} characters)"
    );
    Ok(())
}

/// One launch's MPIJob in the cluster.
#[derive(Debug, Clone)]
pub struct MpiJob {
    pub name: String,
    pub namespace: String,
    pub run_id: String,
}

impl MpiJob {
    /// The outcome from its last condition. A failed launcher carries no exit code here: the watcher tells a
    /// preemption apart by the ranks' heartbeats.
    pub fn state(&self) -> Option<Outcome> {
        let out = Command::new("kubectl")
            .args(["get", "mpijob", "-n", &self.namespace, "-o", "jsonpath={.status.conditions[-1:].type}", "--"])
            .arg(&self.name)
            .output()
            .ok()?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "Succeeded" => Some(Outcome::Succeeded),
            "Failed" => Some(Outcome::Failed(format!("MPIJob {}/{} failed", self.namespace, self.name))),
            _ => None,
        }
    }

    /// Fails if an MPIJob of this name exists for another job (another run id, or none).
    pub fn check_ours(&self) -> Result<()> {
        let label = RUN_ID_LABEL.replace('.', "\\.");
        let out = Command::new("kubectl")
            .args(["get", "mpijob", "-n", &self.namespace, "--ignore-not-found"])
            .arg(format!("-o=jsonpath={{.metadata.labels.{label}}}|"))
            .arg("--")
            .arg(&self.name)
            .output()
            .context("kubectl get mpijob")?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl get mpijob {}/{} failed: {}",
            self.namespace,
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Empty: no such MPIJob. Otherwise `<run id>|` (an empty id: not made by a launch of this version).
        let Some(found) = stdout.trim().strip_suffix('|') else { return Ok(()) };
        anyhow::ensure!(
            found == self.run_id,
            "MPIJob {}/{} belongs to another job (run id `{found}`, this job's is `{}`: another checkpoint.uri); \
             it is left alone: pass another --name",
            self.namespace,
            self.name,
            self.run_id
        );
        Ok(())
    }

    /// Deletes it (and waits), only if it is this job's.
    pub fn delete(&self) -> Result<()> {
        self.check_ours()?;
        let status = Command::new("kubectl")
            .args(["delete", "mpijob", "-n", &self.namespace, "--ignore-not-found", "--wait=true", "--"])
            .arg(&self.name)
            .status()
            .context("kubectl delete mpijob")?;
        anyhow::ensure!(status.success(), "kubectl delete mpijob {}/{} failed ({status})", self.namespace, self.name);
        Ok(())
    }

    /// [`Self::delete`] where nothing more can be done about a failure than saying it.
    pub fn delete_or_warn(&self) {
        if let Err(e) = self.delete() {
            tracing::warn!("{e:#}");
        }
    }
}

/// The MPI Operator's labels on a job's pods: the job's name and the pod's role.
const JOB_NAME_LABEL: &str = "training.kubeflow.org/job-name";
const JOB_ROLE_LABEL: &str = "training.kubeflow.org/job-role";

/// Where an MPIJob's worker pods stand.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Workers {
    /// Placed on a node (PodScheduled true).
    pub scheduled: usize,
    /// Not running yet, placed or not.
    pub pending: usize,
    /// The scheduler's message for each pod it could not place (PodScheduled false, reason Unschedulable).
    pub unschedulable: Vec<String>,
}

impl Workers {
    /// From `kubectl get pods -o json`.
    pub fn parse(json: &[u8]) -> Result<Workers> {
        let list: serde_json::Value = serde_json::from_slice(json).context("kubectl get pods: not JSON")?;
        let mut w = Workers::default();
        for pod in list["items"].as_array().context("kubectl get pods: no `items`")? {
            let status = &pod["status"];
            if status["phase"].as_str() != Some("Running") {
                w.pending += 1;
            }
            let scheduled = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"].as_str() == Some("PodScheduled"));
            match scheduled {
                Some(c) if c["status"].as_str() == Some("True") => w.scheduled += 1,
                Some(c) if c["reason"].as_str() == Some("Unschedulable") => {
                    let name = pod["metadata"]["name"].as_str().unwrap_or("?");
                    w.unschedulable.push(format!("{name}: {}", c["message"].as_str().unwrap_or("no message")));
                }
                _ => {}
            }
        }
        Ok(w)
    }
}

impl MpiJob {
    /// Its worker pods, as the MPI Operator labels them.
    pub fn workers(&self) -> Result<Workers> {
        let out = Command::new("kubectl")
            .args(["get", "pods", "-n", &self.namespace, "-o", "json", "-l"])
            .arg(format!("{JOB_NAME_LABEL}={},{JOB_ROLE_LABEL}=worker", self.name))
            .output()
            .context("kubectl get pods")?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl get pods of MPIJob {}/{} failed: {}",
            self.namespace,
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Workers::parse(&out.stdout)
    }
}

/// An elastic launch's limits (`--min-nodes`): the fewest nodes, and how long a worker pod may stay
/// unschedulable before the attempt is given up for a smaller one.
#[derive(Clone)]
pub struct Elastic {
    /// The node counts the job can run on, given how many worker pods the cluster placed
    /// ([`crate::launch::fitting_nodes`]).
    pub fits: Rc<dyn Fn(usize) -> Option<usize>>,
    pub after: Duration,
    /// Set when an attempt ends for want of nodes: the number of nodes the next attempt should ask for.
    pub next_nodes: Rc<Cell<Option<usize>>>,
}

/// A running MPIJob attempt: its conditions, and its worker pods while they wait for nodes.
pub struct K8sAttempt {
    pub mpijob: MpiJob,
    pub nodes: usize,
    pub elastic: Option<Elastic>,
    unschedulable_since: Option<Instant>,
    pending: bool,
}

impl K8sAttempt {
    pub fn new(mpijob: MpiJob, nodes: usize, elastic: Option<Elastic>) -> K8sAttempt {
        K8sAttempt { mpijob, nodes, elastic, unschedulable_since: None, pending: true }
    }

    /// The MPIJob's outcome once it has one; before that, worker pods the scheduler cannot place end an elastic
    /// attempt after `launch.k8s.unschedulable_s` when the job fits on the pods that were placed.
    pub fn poll(&mut self) -> Option<Outcome> {
        if let Some(outcome) = self.mpijob.state() {
            return Some(outcome);
        }
        let workers = match self.mpijob.workers() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("{e:#}");
                return None;
            }
        };
        self.pending = workers.pending > 0;
        if workers.unschedulable.is_empty() {
            self.unschedulable_since = None;
            return None;
        }
        let since = *self.unschedulable_since.get_or_insert_with(|| {
            tracing::warn!(
                "{} of {} worker pod(s) cannot be scheduled: {}",
                workers.unschedulable.len(),
                self.nodes,
                workers.unschedulable[0]
            );
            Instant::now()
        });
        let elastic = self.elastic.as_ref()?;
        let smaller = (elastic.fits)(workers.scheduled).filter(|&n| n < self.nodes)?;
        if since.elapsed() < elastic.after {
            return None;
        }
        elastic.next_nodes.set(Some(smaller));
        Some(Outcome::Unschedulable(format!(
            "{} of {} worker pod(s) unschedulable for {:.0} s (launch.k8s.unschedulable_s; {}); relaunching on {smaller} \
             node(s)",
            workers.unschedulable.len(),
            self.nodes,
            since.elapsed().as_secs_f64(),
            workers.unschedulable[0]
        )))
    }

    /// Worker pods not running yet: no rank can beat.
    pub fn waiting(&self) -> bool {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_pods_are_read_as_kubectl_prints_them() {
        // Abridged from `kubectl get pods -o json` of a cluster with one free node for two worker pods.
        let json = br#"{"apiVersion": "v1", "kind": "List", "items": [
          {"metadata": {"name": "j-worker-0", "labels": {"training.kubeflow.org/job-role": "worker"}},
           "status": {"phase": "Running", "conditions": [
             {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"},
             {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-02T10:00:00Z"}]}},
          {"metadata": {"name": "j-worker-1"},
           "status": {"phase": "Pending", "conditions": [
             {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
              "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}},
          {"metadata": {"name": "j-worker-2"}, "status": {"phase": "Pending"}}]}"#;
        let w = Workers::parse(json).unwrap();
        assert_eq!(w.scheduled, 1);
        assert_eq!(w.pending, 2);
        assert_eq!(w.unschedulable, ["j-worker-1: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."]);
        assert!(Workers::parse(b"{}").is_err());
    }
}
