//! A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's packages (installed
//! by scripts/setup), started as this user in a temporary directory with their own munge key, ports, state and
//! `slurm.conf`; stopped when dropped. Commands that talk to it need [`Slurm::env`] (`SLURM_CONF`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Slurm {
    dir: tempfile::TempDir,
    pub conf: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Slurm {
    /// Starts the cluster and waits until its node is idle; `Err` says what is missing or failed.
    pub fn start() -> Result<Slurm, String> {
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
        let text = format!(
            "ClusterName=avexpr\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             AuthType=auth/munge\nAuthInfo=socket={socket}\nCredType=cred/munge\nSlurmUser={user}\nSlurmdUser={user}\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
             MpiDefault=none\nReturnToService=2\nKillWait=30\nMinJobAge=600\nSchedulerType=sched/backfill\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
             PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4\n",
            ctld = free_port(),
            slurmd = free_port(),
            socket = socket.display(),
            d = d.display(),
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let slurm = Slurm { dir, conf };
        run(Command::new("/usr/sbin/slurmctld").arg("-c").envs(slurm.env()))?;
        run(Command::new("/usr/sbin/slurmd").envs(slurm.env()))?;
        let start = Instant::now();
        loop {
            let out = Command::new("sinfo").args(["-h", "-o", "%T"]).envs(slurm.env()).output();
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

    /// `scontrol show job -o ID`'s field `key`.
    pub fn job_field(&self, id: &str, key: &str) -> Option<String> {
        let out = Command::new("scontrol").args(["show", "job", "-o", id]).envs(self.env()).output().ok()?;
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
            let _ = Command::new("scancel").arg(format!("--user={user}")).envs(self.env()).status();
            std::thread::sleep(Duration::from_secs(1));
        }
        for daemon in ["slurmd", "slurmctld", "munged"] {
            let pid = std::fs::read_to_string(self.dir.path().join(format!("{daemon}.pid")));
            if let Ok(pid) = pid.as_deref().unwrap_or("").trim().parse::<i32>() {
                // SAFETY: a daemon this helper started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
