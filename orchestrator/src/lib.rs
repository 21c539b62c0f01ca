//! The orchestrator: plans, launches and watches avexpr workers. For now it checks that a machine can run them.

pub mod doctor;
