#![no_main]
use kvmsim_fuzz::devices::{run, SimOpsRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<SimOpsRig>(data));
