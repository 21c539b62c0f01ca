//! TensorBoard event files (`<run_dir>/tensorboard/events.out.tfevents.<secs>.<host>.<pid>`): what training logs,
//! as scalars, and the validation confusion matrix as an image, readable by TensorBoard itself.
//!
//! No maintained Rust crate writes them (`tensorboard-rs`, the only one, is unmaintained since 2022 and pulls in
//! protobuf 2 and image 0.23), so the few messages TensorBoard needs are declared here with `prost` (field numbers
//! from tensorflow's `event.proto` and `summary.proto`) and framed as TFRecords: the length (u64 LE), its masked
//! CRC-32C, the data, its masked CRC-32C.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

/// `tensorflow.Event` (only the fields written).
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or an image.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<SummaryImage>,
}

/// `tensorflow.Summary.Image`: an encoded PNG.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// TFRecord's CRC: CRC-32C, rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn unix_time() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// An event file, flushed after every write (a killed run loses nothing it logged).
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard's writers name theirs.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        let now = unix_time();
        let host = crate::heartbeat::hostname();
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id()));
        let file = File::create(&path).with_context(|| format!("{}", path.display()))?;
        let mut writer = Self { file, path };
        writer.write(Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(writer)
    }

    fn write(&mut self, event: Event) -> Result<()> {
        self.file
            .write_all(&record(&event.encode_to_vec()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}", self.path.display()))
    }

    fn summary(&mut self, step: u64, value: Vec<SummaryValue>) -> Result<()> {
        self.write(Event {
            wall_time: unix_time().as_secs_f64(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    /// Scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let value = scalars
            .iter()
            .map(|(tag, v)| SummaryValue { tag: tag.to_string(), simple_value: Some(*v as f32), image: None })
            .collect();
        self.summary(step, value)
    }

    /// A PNG image of `(width, height)` pixels at `step`.
    pub fn png(&mut self, step: u64, tag: &str, png: Vec<u8>, (width, height): (u32, u32)) -> Result<()> {
        let image =
            SummaryImage { height: height as i32, width: width as i32, colorspace: 3, encoded_image_string: png };
        self.summary(step, vec![SummaryValue { tag: tag.into(), simple_value: None, image: Some(image) }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TFRecord framing: CRC-32C (the standard check value of "123456789"), length first. That TensorBoard
    /// reads the files is tested end to end with its own reader (tests/e2e/train_cli.rs).
    #[test]
    fn records_are_framed_as_tfrecords() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
    }
}
