//! A real S3-compatible server for tests and benchmarks: a single-node Garage (installed by scripts/setup
//! into `~/.cargo/bin`) on free loopback ports in a temporary directory, with a default bucket and a key that
//! exist only there, stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "avexpr-test";
pub const ACCESS_KEY: &str = "GK31c2f218a2e44f485b94239e";
pub const SECRET_KEY: &str = "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835";
pub const REGION: &str = "us-east-1";

pub struct Garage {
    child: Child,
    pub endpoint: String,
    dir: tempfile::TempDir,
    /// The network namespace it runs in (`ip netns`), if not this process's.
    netns: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `f` on a thread that has entered the network namespace `netns` (`/run/netns/<name>`, as `ip netns`
/// makes them): a namespace switch is per thread, so the caller's stays as it was.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

impl Garage {
    /// The `garage` binary scripts/setup installs.
    pub fn binary() -> std::path::PathBuf {
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/garage")
    }

    /// Starts the server and waits until it answers (panics if it cannot: for tests and benchmarks).
    pub fn start() -> Garage {
        Self::start_at("127.0.0.1", None)
    }

    /// Starts the server in the network namespace `netns` (`ip netns`), listening on `ip` there: a store that
    /// the "hosts" of a multi-host test reach over their network.
    pub fn start_in_netns(netns: &str, ip: &str) -> Garage {
        Self::start_at(ip, Some(netns.to_string()))
    }

    fn start_at(ip: &str, netns: Option<String>) -> Garage {
        let garage = Self::binary();
        assert!(garage.is_file(), "{} not found: run scripts/setup (it installs Garage)", garage.display());
        let dir = tempfile::tempdir().unwrap();
        // Ports free here are as good as any in a fresh namespace.
        let (api, rpc) = (free_port(), free_port());
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\ncompression_level = \"none\"\n\
             rpc_bind_addr = \"{ip}:{rpc}\"\nrpc_public_addr = \"{ip}:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"{ip}:{api}\"\n\
             root_domain = \".s3.garage.localhost\"\n",
            d = dir.path().display(),
            secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6",
        );
        std::fs::write(dir.path().join("garage.toml"), config).unwrap();
        let child = Self::spawn(dir.path(), netns.as_deref());
        let endpoint = format!("http://{ip}:{api}");
        let g = Garage { child, endpoint, dir, netns };
        match &g.netns {
            Some(ns) => in_netns(ns, || g.wait_ready()),
            None => g.wait_ready(),
        }
        g
    }

    fn spawn(dir: &std::path::Path, netns: Option<&str>) -> Child {
        let garage = Self::binary();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("garage.log")).unwrap();
        let mut command = match netns {
            // `ip netns exec` execs the program: the child is the server itself.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(garage);
                c
            }
            None => Command::new(garage),
        };
        command
            .arg("-c")
            .arg(dir.join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server (its data stays); `restart` brings it back on the same address.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.netns.as_deref());
    }

    /// A store on this server, configured with explicit options (not the process environment).
    pub fn store(&self, uri: &str) -> crate::store::Store {
        let options = [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_access_key_id", ACCESS_KEY),
            ("aws_secret_access_key", SECRET_KEY),
            ("aws_region", REGION),
            ("aws_allow_http", "true"),
        ];
        crate::store::Store::open_with(uri, &options).unwrap()
    }

    /// The standard AWS_* environment a user would set for this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_DEFAULT_REGION", REGION.into()),
        ]
    }

    fn wait_ready(&self) {
        let store = self.store(&format!("s3://{BUCKET}/ready"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let start = Instant::now();
        loop {
            if rt.block_on(store.put("probe", bytes::Bytes::from_static(b"ok"))).is_ok() {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "Garage did not become ready within 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
