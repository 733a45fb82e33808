#![no_main]
use kvmsim_fuzz::devices::{run, TimerRig};
libfuzzer_sys::fuzz_target!(|data: &[u8]| run::<TimerRig>(data));
