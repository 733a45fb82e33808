//! kvmsim's fuzz targets (see README.md beside this crate). The targets in
//! `fuzz_targets/` are one line each; what they feed and check lives here.

pub mod devices;
pub mod script;
pub mod targets;
