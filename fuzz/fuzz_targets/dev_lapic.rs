#![no_main]
use kvmsim_fuzz::devices::{run, LapicRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<LapicRig>(data));
