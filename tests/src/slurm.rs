//! A real Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's packages (installed by
//! scripts/setup), started as this user in a temporary directory with their own munge key, ports, state and
//! `slurm.conf`; stopped when dropped. One node on this machine ([`Slurm::start`]), or one node per network
//! namespace ([`Slurm::start_on`]: a slurmd in each, the controller in the first). Commands that talk to it are
//! made by [`Slurm::command`] (`SLURM_CONF`, and the first namespace when there are several).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Slurm {
    dir: tempfile::TempDir,
    pub conf: PathBuf,
    /// The network namespace of the controller (and of the commands that talk to it), if any.
    netns: Option<String>,
}

/// A node of the test cluster: its Slurm name and address, and the network namespace its slurmd runs in.
struct Node {
    name: String,
    addr: String,
    netns: Option<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Slurm {
    /// Starts a one-node cluster (this machine) and waits until its node is idle; `Err` says what is missing or
    /// failed.
    pub fn start() -> Result<Slurm, String> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
        Self::start_nodes(vec![Node { name: host, addr: "127.0.0.1".into(), netns: None }])
    }

    /// Starts a cluster of one node per `(network namespace, address)`, named n0, n1, ...: each node's slurmd
    /// runs in its namespace, the controller in the first; waits until every node is idle.
    pub fn start_on(hosts: &[(&str, &str)]) -> Result<Slurm, String> {
        let nodes = hosts
            .iter()
            .enumerate()
            .map(|(i, (ns, addr))| Node { name: format!("n{i}"), addr: addr.to_string(), netns: Some(ns.to_string()) })
            .collect();
        Self::start_nodes(nodes)
    }

    fn start_nodes(nodes: Vec<Node>) -> Result<Slurm, String> {
        for bin in ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch"] {
            if !std::path::Path::new(bin).is_file() {
                return Err(format!("{bin} not found: run scripts/setup (it installs Slurm and munge)"));
            }
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let d = dir.path();
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let key: Vec<u8> = (0..1024).map(|i| (i * 7919 % 251) as u8 ^ std::process::id() as u8).collect();
        std::fs::write(d.join("munge.key"), key).map_err(|e| e.to_string())?;
        std::fs::set_permissions(d.join("munge.key"), std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .map_err(|e| e.to_string())?;
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        let socket = d.join("munge.socket");
        run(Command::new("/usr/sbin/munged")
            .arg("--force")
            .arg(format!("--key-file={}", d.join("munge.key").display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", d.join("munged.pid").display()))
            .arg(format!("--log-file={}", d.join("log/munged.log").display()))
            .arg(format!("--seed-file={}", d.join("munge.seed").display())))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let user = Command::new("id").arg("-un").output().map_err(|e| e.to_string())?;
        let user = String::from_utf8_lossy(&user.stdout).trim().to_string();
        let conf = d.join("slurm.conf");
        let several = nodes.len() > 1;
        // Several daemons share this file system: their spool, pid and log files are per node (%n).
        let per_node = if several { "-%n" } else { "" };
        let mut text = format!(
            "ClusterName=avexpr\nSlurmctldHost={host}({ctld_addr})\nSlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             AuthType=auth/munge\nAuthInfo=socket={socket}\nCredType=cred/munge\nSlurmUser={user}\nSlurmdUser={user}\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool{per_node}\nSlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd{per_node}.pid\nSlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd{per_node}.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
             MpiDefault=none\nReturnToService=2\nKillWait=30\nMinJobAge=600\nSchedulerType=sched/backfill\n",
            ctld_addr = nodes[0].addr,
            ctld = free_port(),
            slurmd = free_port(),
            socket = socket.display(),
            d = d.display(),
        );
        for n in &nodes {
            text += &format!("NodeName={} NodeAddr={} CPUs={cpus} State=UNKNOWN\n", n.name, n.addr);
        }
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        text += &format!(
            "PartitionName=debug Nodes={} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4\n",
            names.join(",")
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        for n in nodes.iter().filter(|_| several) {
            std::fs::create_dir_all(d.join(format!("spool-{}", n.name))).map_err(|e| e.to_string())?;
        }
        let slurm = Slurm { dir, conf, netns: nodes[0].netns.clone() };
        run(slurm.command("/usr/sbin/slurmctld").arg("-c"))?;
        for n in &nodes {
            let mut cmd = in_netns(n.netns.as_deref(), "/usr/sbin/slurmd");
            cmd.envs(slurm.env());
            if several {
                cmd.args(["-N", &n.name]);
            }
            run(&mut cmd).map_err(|e| {
                let log = if several { format!("slurmd-{}.log", n.name) } else { "slurmd.log".into() };
                let text = std::fs::read_to_string(slurm.dir.path().join("log").join(&log)).unwrap_or_default();
                format!("{e}\n{log}:\n{text}")
            })?;
        }
        let start = Instant::now();
        loop {
            let out = slurm.command("sinfo").args(["-h", "-o", "%T"]).output();
            if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle") {
                return Ok(slurm);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("the Slurm node did not become idle; logs in {}", slurm.dir.path().display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The environment of commands that use this cluster.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("SLURM_CONF", self.conf.display().to_string())]
    }

    /// `program` with this cluster's environment, in the controller's network namespace if it has one.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = in_netns(self.netns.as_deref(), program);
        cmd.envs(self.env());
        cmd
    }

    /// `scontrol show job -o ID`'s field `key`.
    pub fn job_field(&self, id: &str, key: &str) -> Option<String> {
        let out = self.command("scontrol").args(["show", "job", "-o", id]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // The jobs first (their processes belong to slurmstepd, which outlives a stopped slurmd).
        let user =
            Command::new("id").arg("-un").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if let Ok(user) = user {
            let _ = self.command("scancel").arg(format!("--user={user}")).status();
            std::thread::sleep(Duration::from_secs(1));
        }
        // Every slurmd's (slurmd.pid, or slurmd-<node>.pid each), then the controller's and munge's.
        let mut pid_files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("slurmd")))
            .filter(|p| p.extension().is_some_and(|e| e == "pid"))
            .collect();
        pid_files.extend(["slurmctld.pid", "munged.pid"].map(|f| self.dir.path().join(f)));
        for file in pid_files {
            if let Ok(pid) = std::fs::read_to_string(file).unwrap_or_default().trim().parse::<i32>() {
                // SAFETY: a daemon this helper started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `program`, run in the network namespace `netns` (of `ip netns`) when there is one. Entered with nsenter, not
/// `ip netns exec`, which would mount a /sys of its own without the cgroup file system slurmd needs.
fn in_netns(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}
