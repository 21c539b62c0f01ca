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
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Garage {
    /// The `garage` binary scripts/setup installs.
    pub fn binary() -> std::path::PathBuf {
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/garage")
    }

    /// Starts the server and waits until it answers (panics if it cannot: for tests and benchmarks).
    pub fn start() -> Garage {
        let garage = Self::binary();
        assert!(garage.is_file(), "{} not found: run scripts/setup (it installs Garage)", garage.display());
        let dir = tempfile::tempdir().unwrap();
        let (api, rpc) = (free_port(), free_port());
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\ncompression_level = \"none\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{api}\"\n\
             root_domain = \".s3.garage.localhost\"\n",
            d = dir.path().display(),
            secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6",
        );
        std::fs::write(dir.path().join("garage.toml"), config).unwrap();
        let child = Self::spawn(dir.path());
        let endpoint = format!("http://127.0.0.1:{api}");
        let g = Garage { child, endpoint, dir };
        g.wait_ready();
        g
    }

    fn spawn(dir: &std::path::Path) -> Child {
        let garage = Self::binary();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("garage.log")).unwrap();
        Command::new(garage)
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
        self.child = Self::spawn(self.dir.path());
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
