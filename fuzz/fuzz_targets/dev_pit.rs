#![no_main]
use kvmsim_fuzz::devices::{run, PitRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<PitRig>(data));
