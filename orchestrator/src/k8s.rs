//! The Kubernetes target: the MPIJob and ConfigMap of a launch, rendered from the templates in `k8s/` (built
//! in; `--templates DIR` reads edited copies) by setting fields on the parsed YAML, and applied, followed and
//! deleted with `kubectl`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

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
    for (field, uri) in [("data.shards", &job.job.data.shards), ("checkpoint.uri", &job.job.checkpoint.uri)] {
        anyhow::ensure!(
            uri.starts_with("s3://") || uri.starts_with("/cache/") && !k.cache_pvc.is_empty(),
            "{field}: `{uri}` is a local path; pods need an s3:// URI (or /cache/... with launch.k8s.cache_pvc)"
        );
    }
    let config_name = format!("{name}-config");

    let mut cm = template(templates, "configmap.yaml", CONFIGMAP)?;
    *at(&mut cm, &["metadata", "name"])? = config_name.clone().into();
    *at(&mut cm, &["metadata", "namespace"])? = k.namespace.clone().into();
    *at(&mut cm, &["data", "job.yaml"])? = config_text.into();

    let mut mj = template(templates, "mpijob.yaml", MPIJOB)?;
    *at(&mut mj, &["metadata", "name"])? = name.into();
    *at(&mut mj, &["metadata", "namespace"])? = k.namespace.clone().into();
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

/// The MPIJob's outcome from its last condition (a preempted launcher fails like any other: not told apart here).
pub fn job_state(name: &str, namespace: &str) -> Option<Outcome> {
    let out = Command::new("kubectl")
        .args(["get", "mpijob", name, "-n", namespace, "-o", "jsonpath={.status.conditions[-1:].type}"])
        .output()
        .ok()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "Succeeded" => Some(Outcome::Succeeded),
        "Failed" => Some(Outcome::Failed(format!("MPIJob {namespace}/{name} failed"))),
        _ => None,
    }
}

pub fn delete(name: &str, namespace: &str) {
    let status = Command::new("kubectl")
        .args(["delete", "mpijob", name, "-n", namespace, "--ignore-not-found", "--wait=true"])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::warn!("kubectl delete mpijob {namespace}/{name} failed: {status:?}");
    }
}
