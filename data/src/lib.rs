//! avexpr's data layer: everything about Aff-Wild2 that does not need a model: the classes, a participant's
//! copy of the dataset as the challenge ships it, the annotation files and the label/frame policy, the
//! official metric and the submission format. Ingest into shards and the streaming loader build on it.

pub mod affwild2;
pub mod annotation;
pub mod augment;
pub mod bench;
pub mod config;
pub mod decode;
pub mod error;
pub mod fetch;
pub mod files;
pub mod folds;
pub mod garage;
pub mod ingest;
pub mod layout;
pub mod limits;
pub mod loader;
pub mod logging;
pub mod manifest;
pub mod metric;
pub mod predictions;
pub mod progress;
pub mod sampler;
pub mod shard;
pub mod stack;
pub mod store;
pub mod synth;

pub use affwild2::{Expression, NUM_CLASSES};
pub use error::DataError;
