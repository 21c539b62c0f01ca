//! avexpr's data layer: everything about Aff-Wild2 that does not need a model.
//!
//! For now this holds the expression classes of the ABAW EXPR challenge in their official order; the dataset
//! parser, ingest into shards and the streaming loader build on it.

pub mod affwild2;

pub use affwild2::{Expression, NUM_CLASSES};
