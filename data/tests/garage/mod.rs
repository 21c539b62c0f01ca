//! The library's Garage server, plus the CLI ingest the S3 tests run as a user would.
#![allow(dead_code, unused_imports)] // each test binary uses a different part

pub use avexpr_data::garage::{BUCKET, Garage, SECRET_KEY};

/// `data ingest --root root --out uri` (16-frame segments, 32-frame shards) as a user runs it, with only the
/// standard AWS_* environment pointing at the server.
pub fn ingest_with_cli(garage: &Garage, root: &std::path::Path, uri: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_data"))
        .args(["ingest", "--segment-frames", "16", "--shard-frames", "32", "--root"])
        .arg(root)
        .args(["--out", uri])
        .envs(garage.env())
        .output()
        .unwrap()
}
